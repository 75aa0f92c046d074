//! Herald's idempotency contract on JetStream: the same key with the same batch gets the
//! first append's watermarks for as long as the key is remembered (24 h by default); the same
//! key with another batch is a conflict. `Nats-Msg-Id` alone cannot keep it: JetStream keeps
//! ids for minutes and answers a duplicate without its sequence.
//!
//! Each key has an entry in the `<stream>_IDEM` bucket, changed only by compare-and-set:
//! 1. `Pending` (the batch's SHA-256, when, and the stream's last sequence before it) is
//!    *created*; only one appender can create it.
//! 2. The batch is published with the key's hash in a header of its first event and in every
//!    event's `Nats-Msg-Id`.
//! 3. The entry becomes `Done` (first watermark, count).
//!
//! A retry that finds `Done` answers its watermarks; one that finds `Pending` waits for the
//! first attempt, and if that attempt is older than twice the request timeout (it died between 1 and
//! 3) it looks for the batch in the stream after the sequence `Pending` recorded: found, it
//! records `Done`; not found, the batch was never committed (atomic batches are whole or
//! absent) and it takes the entry over and publishes. An attempt still committing while it
//! is taken over is refused by JetStream for its message ids, so the batch cannot be stored
//! twice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::Notification;
use herald_log::prepare::Digest;
use herald_log::{AppendError, LogError};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{JetStreamLog, js_err};

/// The header of a batch's first event that names its idempotency key (hashed).
pub const IDEMPOTENCY_HEADER: &str = "Herald-Idempotency";

/// How long a `Pending` entry is left to the attempt that made it before another looks for
/// its batch (a multiple of the request timeout).
const PENDING_GRACE_TIMEOUTS: u32 = 2;

/// Events scanned at most when looking for an attempt's batch.
const SCAN_LIMIT: u64 = 1_000_000;

/// A fresh id for one atomic batch (JetStream allows up to 64 characters).
pub(crate) fn batch_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
enum Entry {
    Pending {
        sha256: [u8; 32],
        /// The stream's last sequence known before the attempt: the batch is after it.
        after: u64,
        /// When the attempt began (ms since the epoch).
        at_ms: u64,
    },
    Done {
        sha256: [u8; 32],
        first: u64,
        count: u32,
    },
}

impl Entry {
    fn sha256(&self) -> &[u8; 32] {
        match self {
            Entry::Pending { sha256, .. } | Entry::Done { sha256, .. } => sha256,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn encode(e: &Entry) -> bytes::Bytes {
    postcard::to_allocvec(e)
        .expect("an entry always encodes")
        .into()
}

/// The bucket key of an idempotency key: its SHA-256 in hex (keys are free text).
fn bucket_key(key: &str) -> String {
    let h = sha2::Sha256::digest(key.as_bytes());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends under `key`, or answers what an earlier append with it did: `(first, last,
/// replayed)`.
pub(crate) async fn append(
    log: &JetStreamLog,
    key: &str,
    digest: Digest,
    batch: Vec<Notification>,
    records: Vec<Vec<u8>>,
) -> Result<(u64, u64, bool), AppendError> {
    let inner = &log.inner;
    let kv = &inner.idempotency;
    let k = bucket_key(key);
    let count = batch.len() as u32;
    let grace = inner.options.request_timeout * PENDING_GRACE_TIMEOUTS;
    let conflict = || AppendError::IdempotencyConflict {
        key: key.to_owned(),
    };
    for _ in 0..1000 {
        let entry = kv.entry(k.clone()).await.map_err(js_err)?;
        let Some(entry) =
            entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
        else {
            let after = inner
                .position
                .known_last
                .load(std::sync::atomic::Ordering::SeqCst);
            let pending = Entry::Pending {
                sha256: digest.sha256,
                after,
                at_ms: now_ms(),
            };
            let revision = match kv.create(&k, encode(&pending)).await {
                Ok(r) => r,
                // Another attempt created it first: read it again.
                Err(e) if crate::already_exists(&e) => {
                    continue;
                }
                Err(e) => return Err(js_err(e).into()),
            };
            let (first, last) = log.publish_batch(&batch, records, Some(&k)).await?;
            let done = Entry::Done {
                sha256: digest.sha256,
                first,
                count,
            };
            if let Err(e) = kv.update(&k, encode(&done), revision).await {
                // The batch is stored; a retry finds it by its header.
                tracing::warn!("idempotency entry not marked done: {e}");
            }
            return Ok((first, last, false));
        };
        let value: Entry = postcard::from_bytes(&entry.value)
            .map_err(|e| js_err(format!("idempotency entry: {e}")))?;
        if value.sha256() != &digest.sha256 {
            return Err(conflict());
        }
        match value {
            Entry::Done {
                first, count: c, ..
            } => {
                if c != count {
                    return Err(conflict());
                }
                return Ok((first, first + u64::from(c) - 1, true));
            }
            Entry::Pending { after, at_ms, .. } => {
                let age = Duration::from_millis(now_ms().saturating_sub(at_ms));
                if age < grace {
                    // The attempt that made it is (probably) still at work.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                if let Some(first) = find(log, &k, after).await? {
                    let done = Entry::Done {
                        sha256: digest.sha256,
                        first,
                        count,
                    };
                    let _ = kv.update(&k, encode(&done), entry.revision).await;
                    return Ok((first, first + u64::from(count) - 1, true));
                }
                // Never committed: take it over (the same `after`, so that a late commit of
                // the first attempt is still found), then publish.
                let pending = Entry::Pending {
                    sha256: digest.sha256,
                    after,
                    at_ms: now_ms(),
                };
                let revision = match kv.update(&k, encode(&pending), entry.revision).await {
                    Ok(r) => r,
                    Err(e) if crate::lost_race(&e) => continue,
                    Err(e) => return Err(js_err(e).into()),
                };
                match log.publish_batch(&batch, records.clone(), Some(&k)).await {
                    Ok((first, last)) => {
                        let done = Entry::Done {
                            sha256: digest.sha256,
                            first,
                            count,
                        };
                        let _ = kv.update(&k, encode(&done), revision).await;
                        return Ok((first, last, false));
                    }
                    // The first attempt committed after all: the next round finds it.
                    Err(LogError::Storage(e)) if e.contains("duplicate") => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Err(js_err(format!("idempotency key {key:?} could not be settled")).into())
}

/// The first sequence of the batch stored under bucket key `k` after sequence `after`.
async fn find(log: &JetStreamLog, k: &str, after: u64) -> Result<Option<u64>, LogError> {
    let inner = &log.inner;
    let last = inner
        .stream
        .clone()
        .info()
        .await
        .map_err(js_err)?
        .state
        .last_sequence;
    let mut next = after + 1;
    while next <= last && next - after <= SCAN_LIMIT {
        let page = crate::directget::batch_raw(inner, next, 256)
            .await
            .map_err(|e| LogError::Storage(e.to_string()))?;
        let Some(end) = page.last().map(|m| m.seq) else {
            break;
        };
        for m in &page {
            let marked = m
                .headers
                .as_ref()
                .and_then(|h| h.get(IDEMPOTENCY_HEADER))
                .is_some_and(|v| v.as_str() == k);
            if marked {
                return Ok(Some(m.seq));
            }
        }
        next = end + 1;
    }
    if next <= last {
        return Err(LogError::Storage(format!(
            "an interrupted idempotent append could not be found within {SCAN_LIMIT} events; retry later"
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_keys_are_bucket_safe() {
        for e in [
            Entry::Pending {
                sha256: [7; 32],
                after: 9,
                at_ms: 1,
            },
            Entry::Done {
                sha256: [1; 32],
                first: 10,
                count: 3,
            },
        ] {
            assert_eq!(postcard::from_bytes::<Entry>(&encode(&e)).unwrap(), e);
        }
        let k = bucket_key("any text / with . and * >");
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
