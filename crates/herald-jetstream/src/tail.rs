//! The node's tail: one ordered consumer from the node's position into its hub, batch by
//! batch in sequence order, and a refresh of the stream's bounds every second. One consumer
//! per node, not per subscription: a stream's consumers are few and each replicated one is a
//! consensus group of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use herald_core::{Hub, Watermark};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::Position;

/// Events handed to the hub in one batch at most (whatever has arrived, up to this).
const HUB_BATCH: usize = 512;

/// Stops the tail when told or dropped.
#[derive(Debug)]
pub(crate) struct TailHandle {
    token: CancellationToken,
    _guard: DropGuard,
}

impl TailHandle {
    pub(crate) fn stop(&self) {
        self.token.cancel();
    }
}

/// Starts the tail after `position.hub`'s value.
pub(crate) async fn start(
    s: jetstream::stream::Stream,
    hub: Hub,
    position: Arc<Position>,
    epoch: Option<(std::path::PathBuf, crate::epoch::Epoch)>,
) -> Result<TailHandle, String> {
    let token = CancellationToken::new();
    let handle = TailHandle {
        token: token.clone(),
        _guard: token.clone().drop_guard(),
    };
    tokio::spawn(refresh(s.clone(), position.clone(), token.clone(), epoch));
    tokio::spawn(async move {
        loop {
            let from = position.hub_last() + 1;
            tokio::select! {
                () = token.cancelled() => return,
                r = follow(&s, from, &hub, &position) => {
                    if let Err(e) = r {
                        tracing::warn!(from, "the node's tail stopped ({e}); starting again");
                    }
                }
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    });
    Ok(handle)
}

/// Runs one ordered consumer from `from` until it fails.
async fn follow(
    s: &jetstream::stream::Stream,
    from: u64,
    hub: &Hub,
    position: &Position,
) -> Result<(), String> {
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = c
        .messages()
        .await
        .map_err(|e| e.to_string())?
        .ready_chunks(HUB_BATCH);
    while let Some(chunk) = messages.next().await {
        let mut events = Vec::with_capacity(chunk.len());
        let last = position.hub_last();
        for m in chunk {
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let seq = info.stream_sequence;
            if seq <= last {
                // An append handed it over already.
                continue;
            }
            match herald_log::record::decode(&m.payload, Watermark(seq)) {
                Ok(n) => events.push((seq, Some(n))),
                Err(e) => {
                    tracing::error!(seq, "a record in the stream does not decode: {e}");
                    events.push((seq, None));
                }
            }
        }
        // Retention may have removed events before this node read them: they are gone for
        // every reader, and readers after them get `expired` (`feed` says so).
        position.feed(hub, events);
    }
    Err("the consumer's messages ended".to_owned())
}

/// Keeps the stream's first and last sequence fresh (retention moves the first), and records
/// the highest watermark seen in the node's epoch file, when it has one.
async fn refresh(
    mut s: jetstream::stream::Stream,
    position: Arc<Position>,
    stop: CancellationToken,
    mut epoch: Option<(std::path::PathBuf, crate::epoch::Epoch)>,
) {
    let record = |file: &std::path::Path, e: &crate::epoch::Epoch| {
        if let Err(err) = crate::epoch::store(file, e) {
            tracing::error!(
                "cannot record the stream's epoch in {}: {err}",
                file.display()
            );
        }
    };
    if let Some((file, e)) = &epoch {
        record(file, e);
    }
    loop {
        if let Ok(info) = s.info().await {
            position
                .first
                .store(info.state.first_sequence.max(1), Ordering::SeqCst);
            position.bytes.store(info.state.bytes, Ordering::Relaxed);
            position.saw_last(info.state.last_sequence);
        }
        if let Some((file, e)) = &mut epoch {
            let last = position.known_last.load(Ordering::SeqCst);
            if last > e.last {
                e.last = last;
                record(file, e);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
