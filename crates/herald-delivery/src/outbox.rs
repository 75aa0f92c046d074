//! An outbox: notifications already made for one session, waiting for the client to fetch
//! them (MAPI's RopNotify queue). Bounded in bytes; the session's reader waits for room
//! (back-pressure on the log, never a drop); nothing is handed out while the server is
//! offline; a long-poll on it completes only when something is there and may go.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use herald_core::{AsyncWait, WaitOutcome, WaitRejected};
use herald_log::Gate;
use tokio::sync::{Notify, watch};

struct Queue<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
}

/// What [`Outbox::take`] handed out.
#[derive(Debug)]
pub struct Taken<T> {
    /// The items, in order.
    pub items: Vec<T>,
    /// Items are left that could go now (what did not fit).
    pub more: bool,
}

/// A session's queue of notifications; share it in an `Arc`.
pub struct Outbox<T> {
    queue: Mutex<Queue<T>>,
    capacity: usize,
    room: Notify,
    wait: Arc<AsyncWait>,
    pending: watch::Sender<bool>,
    gate: Gate,
}

impl<T> std::fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<T> Outbox<T> {
    /// An outbox holding at most `capacity` bytes (one item bigger than that still goes in
    /// alone), gated by `gate`.
    pub(crate) fn new(capacity: usize, gate: Gate) -> Outbox<T> {
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
            }),
            capacity,
            room: Notify::new(),
            wait: AsyncWait::new(),
            pending: watch::Sender::new(false),
            gate,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the outbox has room (below its capacity).
    pub async fn room(&self) {
        loop {
            let drained = self.room.notified();
            if self.queue().bytes < self.capacity {
                return;
            }
            drained.await;
        }
    }

    /// Queues `item` of `bytes` bytes (call after [`Outbox::room`]; the reader may add one
    /// event's items past the capacity).
    pub fn push(&self, item: T, bytes: usize) {
        let mut q = self.queue();
        q.items.push_back((item, bytes));
        q.bytes += bytes;
        drop(q);
        self.wait.set_pending();
        self.pending.send_replace(true);
    }

    /// Keeps only the items `keep` chooses (a released subscription's go).
    pub fn retain(&self, mut keep: impl FnMut(&T) -> bool) {
        let mut q = self.queue();
        q.items.retain(|(t, _)| keep(t));
        q.bytes = q.items.iter().map(|(_, b)| b).sum();
        let empty = q.items.is_empty();
        drop(q);
        self.after_removal(empty);
    }

    /// Hands out items in order while `fits` takes them (it is told whether the item is the
    /// last one waiting); nothing while the server is offline (the items stay, and stay
    /// pending).
    pub fn take(&self, mut fits: impl FnMut(&T, bool) -> bool) -> Taken<T> {
        if !self.gate.is_open() {
            return Taken {
                items: Vec::new(),
                more: false,
            };
        }
        let mut q = self.queue();
        let mut items = Vec::new();
        while let Some((t, _)) = q.items.front() {
            if !fits(t, q.items.len() == 1) {
                break;
            }
            if let Some((t, b)) = q.items.pop_front() {
                q.bytes -= b;
                items.push(t);
            }
        }
        let empty = q.items.is_empty();
        drop(q);
        self.after_removal(empty);
        Taken {
            items,
            more: !empty,
        }
    }

    fn after_removal(&self, empty: bool) {
        if empty {
            self.wait.clear_pending();
            self.pending.send_replace(false);
        }
        self.room.notify_waiters();
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.queue().items.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.queue().items.is_empty()
    }

    /// Follows whether items wait (for the UDP nudger).
    pub fn pending(&self) -> watch::Receiver<bool> {
        self.pending.subscribe()
    }

    /// A long-poll: resolves `Pending` once items wait and the server is online, `Exiting`
    /// when the outbox is closed. One at a time (a second is rejected, as
    /// `EcDoAsyncWaitEx` rejects a second call).
    pub fn wait(&self) -> Result<impl Future<Output = WaitOutcome> + Send + 'static, WaitRejected> {
        let mut wait = self.wait.begin()?;
        let mut gate = self.gate.clone();
        Ok(async move {
            match (&mut wait).await {
                WaitOutcome::Pending => {
                    // Held at the gate, it is still the session's one outstanding wait.
                    gate.opened().await;
                    drop(wait);
                    WaitOutcome::Pending
                }
                WaitOutcome::Exiting => WaitOutcome::Exiting,
            }
        })
    }

    /// Whether a long-poll is open on it.
    pub fn is_waiting(&self) -> bool {
        self.wait.is_waiting()
    }

    /// Ends every long-poll with `Exiting` (the session ended).
    pub fn close(&self) {
        self.wait.close();
    }
}
