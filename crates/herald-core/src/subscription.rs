//! One registration: its filter, its bounded queue, and the lock that makes `unsubscribe` wait
//! for an in-flight callback.

use std::collections::VecDeque;
use std::fmt;
use std::num::NonZeroU64;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::dispatch::Signal;
use crate::event::{EventMask, Watermark};
use crate::hub::HubInner;
use crate::key::Scope;
use crate::sink::{Batch, Flow, Overflow, OwnedDelivery, Sink};
use crate::sync::{
    Arc, AtomicBool, Condvar, Mutex, Ordering, Weak, lock, thread_local, try_lock, wait,
};

/// A registration's connection number: non-zero and never reused within a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(NonZeroU64);

impl ConnectionId {
    /// The id as a number (never 0).
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// The id with the number `n`, if `n` is not 0.
    pub fn new(n: u64) -> Option<Self> {
        NonZeroU64::new(n).map(ConnectionId)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

thread_local! {
    /// How many sink callbacks this thread is inside of, and how many of them are synchronous.
    static CALLBACK_DEPTH: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// Whether the current thread is running a sink callback.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get().0 > 0)
}

/// Whether the current thread is running a synchronous sink callback.
pub(crate) fn in_sync_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get().1 > 0)
}

/// Marks the current thread as inside a callback until dropped.
struct CallbackScope {
    sync: bool,
}

impl CallbackScope {
    fn enter(sync: bool) -> Self {
        CALLBACK_DEPTH.with(|d| {
            let (all, s) = d.get();
            d.set((all + 1, s + u32::from(sync)));
        });
        CallbackScope { sync }
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| {
            let (all, s) = d.get();
            d.set((all - 1, s - u32::from(self.sync)));
        });
    }
}

/// Where a subscription's deliveries are run.
pub(crate) enum Route {
    /// Inline, inside `notify` (the `sync` option); `turns` keeps concurrent notifies in
    /// the hub's total order.
    Inline(Turns),
    /// On the hub's delivery pool.
    Pool,
    /// By the subscriber itself, on a thread or task it owns; `signal` wakes it. `slot` is the
    /// sink's place in its dispatcher (none for a receiver, which drains the queue itself).
    Owned {
        signal: Arc<Signal>,
        slot: Option<usize>,
    },
}

/// Tickets that make concurrent notifies call one synchronous sink in the hub's total order:
/// a notify takes its ticket under the registry lock (where the order is decided), then waits
/// for its turn before calling. Every notify takes its tickets in the same order, so no two
/// wait for each other.
#[derive(Default)]
pub(crate) struct Turns {
    /// The next ticket to hand out, and the ticket whose turn it is.
    state: Mutex<(u64, u64)>,
    turn: Condvar,
}

impl Turns {
    /// Takes the next ticket. Call under the registry lock.
    pub(crate) fn take(&self) -> u64 {
        let mut s = lock(&self.state);
        s.0 += 1;
        s.0 - 1
    }

    /// Waits until it is `ticket`'s turn.
    pub(crate) fn wait(&self, ticket: u64) {
        let mut s = lock(&self.state);
        while s.1 != ticket {
            s = wait(&self.turn, s);
        }
    }

    /// Ends the current turn (called or skipped), letting the next ticket go.
    pub(crate) fn pass(&self) {
        lock(&self.state).1 += 1;
        self.turn.notify_all();
    }
}

/// The sink, behind the lock held for the duration of every callback.
pub(crate) enum Target {
    /// A thread-safe sink the hub calls.
    Shared(Arc<dyn Sink>),
    /// A sink its owner runs (see [`Route::Owned`]).
    Owned,
    /// Unsubscribed: the hub has dropped its reference.
    Gone,
}

/// A queued batch, and the notify that queued it while that notify still runs (P9: a
/// batch is handed out only once the call that caused it has run its synchronous sinks).
struct Queued {
    batch: Batch,
    /// The causing notify, until it releases the batch.
    held_by: Option<u64>,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Queued>,
    events: usize,
    overflow: Option<Overflow>,
    /// Whether the subscription is in its runner's ready list (or being run).
    scheduled: bool,
    /// The watermark of the last event handed to the sink.
    last_handed: Option<Watermark>,
}

/// What [`Subscription::push`] did.
pub(crate) struct Pushed {
    /// Events dropped by an overflow.
    pub(crate) dropped: u64,
    /// Whether the caller must hand the subscription to its runner.
    pub(crate) schedule: bool,
}

/// What [`Subscription::call_each`] did.
#[derive(Default)]
pub(crate) struct Called {
    /// Calls that returned normally.
    pub(crate) count: usize,
    /// The last of their answers.
    pub(crate) last: Option<Flow>,
}

/// Whether a runner should come back to a subscription.
pub(crate) enum Drained {
    /// The queue is empty and the subscription is no longer scheduled.
    Empty,
    /// The budget ran out with deliveries left; it stays scheduled.
    More,
}

pub(crate) struct Subscription {
    pub(crate) id: ConnectionId,
    pub(crate) scope: Scope,
    pub(crate) mask: EventMask,
    pub(crate) route: Route,
    capacity: usize,
    active: AtomicBool,
    /// Set when an unsubscribe from inside a callback could not take the sink itself: the
    /// callback in flight releases it when it returns.
    release_deferred: AtomicBool,
    queue: Mutex<Queue>,
    target: Mutex<Target>,
    hub: Weak<HubInner>,
}

impl Subscription {
    pub(crate) fn new(
        id: ConnectionId,
        scope: Scope,
        mask: EventMask,
        route: Route,
        target: Target,
        capacity: usize,
        hub: Weak<HubInner>,
    ) -> Self {
        Subscription {
            id,
            scope,
            mask,
            route,
            capacity,
            active: AtomicBool::new(true),
            release_deferred: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            target: Mutex::new(target),
            hub,
        }
    }

    pub(crate) fn is_sync(&self) -> bool {
        matches!(self.route, Route::Inline(_))
    }

    /// The sink's slot in its dispatcher, for a thread-affine subscription.
    pub(crate) fn owned_slot(&self) -> Option<usize> {
        match &self.route {
            Route::Owned { slot, .. } => *slot,
            Route::Inline(_) | Route::Pool => None,
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Appends a batch to the queue; on overflow drops the backlog and records the gap.
    /// Returns whether the caller must schedule the subscription, and how many events were
    /// dropped.
    pub(crate) fn push(&self, batch: Batch, held_by: Option<u64>) -> Pushed {
        let mut q = lock(&self.queue);
        let mut dropped = 0;
        if q.events + batch.len() > self.capacity {
            // The subscriber is too slow: drop everything queued (and the incoming batch if
            // it cannot fit even alone) and tell it where the gap is.
            let keep_incoming = batch.len() <= self.capacity;
            let mut missed_through = None;
            for b in q.batches.drain(..) {
                dropped += b.batch.len() as u64;
                missed_through = b.batch.last_watermark().or(missed_through);
            }
            if !keep_incoming {
                dropped += batch.len() as u64;
                missed_through = batch.last_watermark().or(missed_through);
            }
            q.events = 0;
            let resume_after = q.last_handed;
            let o = q.overflow.get_or_insert(Overflow {
                resume_after,
                missed_through: None,
                missed_events: 0,
            });
            o.missed_events += dropped;
            o.missed_through = missed_through.or(o.missed_through);
            if keep_incoming {
                q.events = batch.len();
                q.batches.push_back(Queued { batch, held_by });
            }
        } else {
            q.events += batch.len();
            q.batches.push_back(Queued { batch, held_by });
        }
        // Not held: it may be handed out at once, by a runner this caller wakes if none has it.
        let schedule = held_by.is_none() && Self::claim_if_ready(&mut q);
        Pushed { dropped, schedule }
    }

    /// Marks the subscription scheduled if something can be taken and no runner has it;
    /// whether the caller must hand it to one.
    fn claim_if_ready(q: &mut Queue) -> bool {
        let ready = q.overflow.is_some() || q.batches.front().is_some_and(|b| b.held_by.is_none());
        if ready && !q.scheduled {
            q.scheduled = true;
            return true;
        }
        false
    }

    /// Notify `notify` is done with its synchronous sinks: what it queued here may be handed
    /// out. Whether the caller must hand the subscription to its runner (it was not
    /// scheduled, and something can be taken now).
    pub(crate) fn release(&self, notify: u64) -> bool {
        let mut q = lock(&self.queue);
        // A notify queues at most one batch per subscription, at the back when it did.
        if let Some(b) = q
            .batches
            .iter_mut()
            .rev()
            .find(|b| b.held_by == Some(notify))
        {
            b.held_by = None;
        }
        Self::claim_if_ready(&mut q)
    }

    /// Takes the next delivery, or marks the subscription unscheduled when there is none.
    pub(crate) fn pop(&self) -> Option<OwnedDelivery> {
        let mut q = lock(&self.queue);
        let d = Self::take_one(&mut q);
        if d.is_none() {
            q.scheduled = false;
        }
        d
    }

    /// Moves up to `max` deliveries into `out` under one lock. Returns `false`, and marks the
    /// subscription unscheduled, only when there were none: while the caller holds deliveries
    /// the subscription must stay scheduled, or a second runner could start on it.
    pub(crate) fn pop_into(&self, max: usize, out: &mut Vec<OwnedDelivery>) -> bool {
        let mut q = lock(&self.queue);
        while out.len() < max {
            match Self::take_one(&mut q) {
                Some(d) => out.push(d),
                None => break,
            }
        }
        if out.is_empty() {
            q.scheduled = false;
            return false;
        }
        true
    }

    fn take_one(q: &mut Queue) -> Option<OwnedDelivery> {
        if let Some(o) = q.overflow.take() {
            return Some(OwnedDelivery::Overflow(o));
        }
        // A batch whose notify still runs, and everything behind it, waits for its release.
        if q.batches.front()?.held_by.is_some() {
            return None;
        }
        let b = q.batches.pop_front()?.batch;
        q.events -= b.len();
        q.last_handed = b.last_watermark().or(q.last_handed);
        Some(OwnedDelivery::Events(b))
    }

    /// How many deliveries are queued right now.
    pub(crate) fn queued_deliveries(&self) -> usize {
        let q = lock(&self.queue);
        q.batches.len() + usize::from(q.overflow.is_some())
    }

    fn clear_queue(&self) {
        let mut q = lock(&self.queue);
        q.batches.clear();
        q.overflow = None;
        q.events = 0;
    }

    /// Runs up to `budget` queued deliveries through a shared sink (pool route), taking them
    /// from the queue in bulk. `buf` is the worker's scratch space.
    pub(crate) fn drain(
        &self,
        budget: usize,
        buf: &mut Vec<OwnedDelivery>,
        delivered: &mut u64,
    ) -> Drained {
        let mut left = budget;
        while left > 0 {
            if !self.pop_into(left, buf) {
                return Drained::Empty;
            }
            left -= buf.len();
            let called = self.call_each(buf.drain(..), |target, d| match target {
                Target::Shared(sink) => sink.on_notify(d.as_delivery()),
                Target::Owned | Target::Gone => Flow::Continue,
            });
            *delivered += called.count as u64;
        }
        Drained::More
    }

    /// Calls `call` for each delivery with the target under the callback lock, as long as the
    /// subscription is live; stops early if it is unsubscribed meanwhile or a call panics (the
    /// subscription is then removed and the panic logged).
    pub(crate) fn call_each<D>(
        &self,
        items: impl IntoIterator<Item = D>,
        mut call: impl FnMut(&Target, &D) -> Flow,
    ) -> Called {
        let mut target = lock(&self.target);
        let mut called = Called::default();
        let mut panicked = None;
        {
            let _scope = CallbackScope::enter(self.is_sync());
            for item in items {
                if !self.is_active() {
                    // Unsubscribed: the unsubscriber releases the sink.
                    break;
                }
                match catch_unwind(AssertUnwindSafe(|| call(&target, &item))) {
                    Ok(flow) => {
                        called.count += 1;
                        called.last = Some(flow);
                    }
                    Err(panic) => {
                        panicked = Some(panic);
                        break;
                    }
                }
            }
        }
        let release = self.release_deferred.load(Ordering::Acquire);
        let old = release.then(|| std::mem::replace(&mut *target, Target::Gone));
        drop(target);
        // Drop the sink outside the lock: its destructor may call back into the hub.
        drop(old);
        if let Some(panic) = panicked {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            tracing::error!(connection = %self.id, panic = %what, "sink panicked; unsubscribing it");
            if let Some(hub) = self.hub.upgrade() {
                hub.sink_panicked(self.id);
            }
        }
        called
    }

    /// Deactivates the subscription after it left the registry. Outside a callback, waits for
    /// an in-flight callback of this sink to return, then drops the hub's reference to it.
    pub(crate) fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        self.clear_queue();
        let old = if in_callback() {
            // Waiting here could deadlock two sinks unsubscribing each other; the callback in
            // flight (if any) drops the sink when it returns.
            self.release_deferred.store(true, Ordering::Release);
            try_lock(&self.target).map(|mut t| std::mem::replace(&mut *t, Target::Gone))
        } else {
            let mut t = lock(&self.target);
            Some(std::mem::replace(&mut *t, Target::Gone))
        };
        drop(old);
    }
}
