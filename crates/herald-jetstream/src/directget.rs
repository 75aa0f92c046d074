//! Reading the log: JetStream's batched direct get (any replica answers, many messages per
//! request), checked for completeness: a replica that lags may answer short, and then the
//! missing events are asked again, finally from the stream leader.

use futures_util::StreamExt;
use herald_core::{Notification, Watermark};
use herald_log::ReadError;

use crate::Inner;

/// How many times a short answer from a replica is asked again before the leader is asked.
const REPLICA_TRIES: usize = 3;

fn log_err(e: impl std::fmt::Display) -> ReadError {
    ReadError::Log(format!("JetStream: {e}"))
}

/// The `want` events from sequence `from` on (all of which this node's hub has seen, so the
/// stream holds them unless retention removed them).
pub(crate) async fn read(
    inner: &Inner,
    from: u64,
    want: usize,
) -> Result<Vec<Notification>, ReadError> {
    let mut out: Vec<Notification> = Vec::with_capacity(want);
    let mut next = from;
    let mut short = 0;
    while out.len() < want {
        let got = if short < REPLICA_TRIES {
            batch(inner, next, want - out.len()).await?
        } else {
            leader(inner, next).await?.into_iter().collect()
        };
        let first = got.first().and_then(|n| n.watermark).map(|w| w.0);
        // Where the stream now begins, when what was asked for is gone.
        let gone_from = match first {
            Some(seq) => (seq > next).then_some(seq),
            // Nothing at or after `next`: removed, or a lagging replica.
            None if short >= REPLICA_TRIES => {
                let oldest = oldest(inner).await?;
                (oldest > next).then_some(oldest)
            }
            None => None,
        };
        if let Some(oldest) = gone_from {
            if out.is_empty() {
                // Retention removed what was asked for.
                inner
                    .position
                    .first
                    .fetch_max(oldest, std::sync::atomic::Ordering::SeqCst);
                return Err(ReadError::Expired {
                    after: Watermark(from - 1),
                    oldest_available: Watermark(oldest),
                });
            }
            // Removed while being read: what was read is returned, the next read expires.
            return Ok(out);
        }
        for n in got {
            if n.watermark == Some(Watermark(next)) && out.len() < want {
                out.push(n);
                next += 1;
            }
        }
        if out.len() < want {
            short += 1;
            if short > REPLICA_TRIES + 3 {
                return Err(ReadError::Log(format!(
                    "the stream did not answer sequence {next}, which this node has seen"
                )));
            }
        }
    }
    Ok(out)
}

/// The stream's first sequence, from its leader.
async fn oldest(inner: &Inner) -> Result<u64, ReadError> {
    let info = inner.stream.clone().info().await.map_err(log_err)?.clone();
    Ok(info.state.first_sequence)
}

/// One batched direct get: up to `n` messages from sequence `from`, decoded.
async fn batch(inner: &Inner, from: u64, n: usize) -> Result<Vec<Notification>, ReadError> {
    batch_raw(inner, from, n)
        .await?
        .into_iter()
        .map(|m| {
            herald_log::record::decode(&m.payload, Watermark(m.seq))
                .map_err(|e| ReadError::Log(format!("record {}: {e}", m.seq)))
        })
        .collect()
}

/// A stored message as a direct get answers it.
pub(crate) struct Raw {
    pub(crate) seq: u64,
    pub(crate) headers: Option<async_nats::HeaderMap>,
    pub(crate) payload: bytes::Bytes,
}

/// One batched direct get: up to `n` messages from sequence `from` (fewer when the stream
/// ends, or the replica that answered lags).
pub(crate) async fn batch_raw(inner: &Inner, from: u64, n: usize) -> Result<Vec<Raw>, ReadError> {
    let subject = format!("$JS.API.DIRECT.GET.{}", inner.options.stream);
    let inbox = inner.client.new_inbox();
    let mut sub = inner
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(log_err)?;
    let body = serde_json::json!({ "seq": from, "batch": n }).to_string();
    inner
        .client
        .publish_with_reply(subject, inbox, body.into())
        .await
        .map_err(log_err)?;
    let mut out = Vec::with_capacity(n);
    let timeout = inner.options.request_timeout;
    loop {
        let m = match tokio::time::timeout(timeout, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(log_err("the direct get's subscription ended")),
            Err(_) => return Err(log_err("a direct get timed out")),
        };
        if let Some(status) = m.status {
            return match status.as_u16() {
                // End of batch, or nothing at or after `from`.
                204 | 404 | 408 => Ok(out),
                other => Err(log_err(format!(
                    "direct get answered {other} {}",
                    m.description.unwrap_or_default()
                ))),
            };
        }
        let seq = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| log_err("a direct get answer without Nats-Sequence"))?;
        out.push(Raw {
            seq,
            headers: m.headers,
            payload: m.payload,
        });
    }
}

/// One message from the stream leader (`STREAM.MSG.GET`), or none if it is gone.
async fn leader(inner: &Inner, seq: u64) -> Result<Option<Notification>, ReadError> {
    match inner.stream.get_raw_message(seq).await {
        Ok(m) => herald_log::record::decode(&m.payload, Watermark(m.sequence))
            .map(Some)
            .map_err(|e| ReadError::Log(format!("record {seq}: {e}"))),
        Err(e)
            if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
        {
            Ok(None)
        }
        Err(e) => Err(log_err(e)),
    }
}
