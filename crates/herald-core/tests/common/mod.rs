//! Helpers shared by the engine's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::{
    Delivery, Event, Extended, Flow, Hub, HubOptions, Notification, ObjectChange, Overflow,
    Relocation, Sink, Watermark,
};

pub const WAIT: Duration = Duration::from_secs(10);

pub fn hub() -> Hub {
    Hub::new(HubOptions {
        workers: 2,
        ..Default::default()
    })
}

/// What a recording sink saw.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    Events(Vec<Notification>),
    Overflow(Overflow),
}

impl Seen {
    pub fn events(&self) -> &[Notification] {
        match self {
            Seen::Events(v) => v,
            Seen::Overflow(_) => &[],
        }
    }
}

/// A sink that sends a copy of every delivery to a channel.
pub struct Recorder {
    tx: Mutex<Sender<Seen>>,
}

impl Recorder {
    pub fn new() -> (Recorder, Receiver<Seen>) {
        let (tx, rx) = channel();
        (Recorder { tx: Mutex::new(tx) }, rx)
    }
}

impl Sink for Recorder {
    fn on_notify(&self, d: Delivery<'_>) -> Flow {
        let seen = match d {
            Delivery::Events(e) => Seen::Events(e.to_vec()),
            Delivery::Overflow(o) => Seen::Overflow(*o),
        };
        let _ = self.tx.lock().unwrap().send(seen);
        Flow::Continue
    }
}

/// An object-created event on `key`.
pub fn created(key: &str) -> Notification {
    Notification::new(key, Event::ObjectCreated(ObjectChange::default()))
}

/// An object-modified event on `key`.
pub fn modified(key: &str) -> Notification {
    Notification::new(key, Event::ObjectModified(ObjectChange::default()))
}

/// A moved event from `old` to `new`.
pub fn moved(old: &str, new: &str) -> Notification {
    Notification::new(
        new,
        Event::ObjectMoved(Relocation {
            old_key: old.into(),
            ..Default::default()
        }),
    )
}

/// An extended event on `key` numbered `n` (handy for checking order).
pub fn numbered(key: &str, n: u32) -> Notification {
    Notification::new(
        key,
        Event::Extended(Extended {
            event: n,
            data: Default::default(),
        }),
    )
}

/// `numbered` with a watermark.
pub fn logged(key: &str, w: u64) -> Notification {
    let mut n = numbered(key, w as u32);
    n.watermark = Some(Watermark(w));
    n
}

/// The number of an extended event.
pub fn number(n: &Notification) -> u32 {
    match &n.event {
        Event::Extended(e) => e.event,
        other => panic!("not a numbered event: {other:?}"),
    }
}

/// Receives exactly `count` events (flattening batches) or fails after `WAIT`.
pub fn recv_events(rx: &Receiver<Seen>, count: usize) -> Vec<Notification> {
    let mut out = Vec::new();
    while out.len() < count {
        match rx.recv_timeout(WAIT) {
            Ok(Seen::Events(e)) => out.extend(e),
            Ok(Seen::Overflow(o)) => panic!("unexpected overflow {o:?}"),
            Err(_) => panic!("only {} of {count} events arrived", out.len()),
        }
    }
    assert_eq!(out.len(), count, "more events than expected");
    out
}

/// Asserts nothing more arrives within a short grace period.
pub fn assert_quiet(rx: &Receiver<Seen>) {
    if let Ok(s) = rx.recv_timeout(Duration::from_millis(100)) {
        panic!("unexpected delivery {s:?}");
    }
}

/// A sink that counts events.
pub fn counter() -> (Arc<std::sync::atomic::AtomicUsize>, impl Sink) {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = n.clone();
    (n, move |d: Delivery<'_>| {
        if let Delivery::Events(e) = d {
            c.fetch_add(e.len(), std::sync::atomic::Ordering::SeqCst);
        }
        Flow::Continue
    })
}
