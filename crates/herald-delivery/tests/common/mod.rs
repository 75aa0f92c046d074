//! Helpers shared by the delivery layer's integration tests: a [`Delivery`] over an in-memory
//! log, events, and the server's state switch.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use herald_core::hooks::Hooks;
use herald_core::offline::FLAG_BLOCK;
use herald_core::{
    Event, EventMask, Filter, Notification, ObjectChange, STATE_OFFLINE, STATE_OFFLINE_MASK,
    STATE_ONLINE, Scope, Watermark,
};
use herald_delivery::{Delivery, DeliveryOptions, ServerState};
use herald_log::{AppendOptions, EventLog};
use herald_testkit::memlog::MemoryLog;
use tokio_util::sync::CancellationToken;

/// An object-created event on `key`.
pub fn created(key: &str) -> Notification {
    Notification::new(key, Event::ObjectCreated(ObjectChange::default()))
}

/// Every kind of event under `root`.
pub fn subtree(root: &str) -> Filter {
    Filter {
        scope: Scope::Subtree(root.into()),
        mask: EventMask::ALL,
    }
}

/// A server state, online, whose offline transition waits at most a second for pushes.
pub fn online_state() -> ServerState {
    ServerState::new(false, Duration::from_secs(1))
}

/// A delivery over `log`, online, with default options and no hooks.
pub fn delivery(log: &MemoryLog) -> Delivery<MemoryLog> {
    delivery_with(log, DeliveryOptions::default(), Arc::new(Hooks::default()))
}

/// A delivery over `log` with `options` and `hooks`, online.
pub fn delivery_with(
    log: &MemoryLog,
    options: DeliveryOptions,
    hooks: Arc<Hooks>,
) -> Delivery<MemoryLog> {
    Delivery::new(
        log.clone(),
        options,
        online_state(),
        hooks,
        CancellationToken::new(),
    )
}

/// Takes the server online or offline and returns once the transition is done. Nothing may
/// be on the wire (going offline would wait for it on this thread).
pub fn set_online(state: &ServerState, online: bool) {
    let new = if online { STATE_ONLINE } else { STATE_OFFLINE };
    state
        .engine()
        .set_current_state(FLAG_BLOCK, STATE_OFFLINE_MASK, new)
        .expect("state change");
}

/// Appends one created event per key, as one batch; returns the batch's watermarks.
pub async fn append(log: &MemoryLog, keys: &[&str]) -> Vec<u64> {
    let done = log
        .append(
            keys.iter().map(|k| created(k)).collect(),
            AppendOptions::default(),
        )
        .await
        .expect("append");
    done.watermarks().map(|w| w.0).collect()
}

/// The watermarks of `events`.
pub fn watermarks(events: &[Notification]) -> Vec<u64> {
    events
        .iter()
        .map(|n| n.watermark.unwrap_or(Watermark(0)).0)
        .collect()
}
