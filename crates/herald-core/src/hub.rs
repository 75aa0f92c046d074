//! The hub: subscribe, unsubscribe, notify.

use std::collections::HashMap;
use std::time::Duration;

use foldhash::fast::RandomState;

use crate::dispatch::{AffineSink, Receiver, Signal};
use crate::event::{EventMask, InvalidEvent, Notification};
use crate::key::{Key, Scope, ancestors_and_self};
use crate::pool::Pool;
use crate::sink::{Batch, Delivery, Flow, Sink};
use crate::subscription::{ConnectionId, Route, Subscription, Target, Turns, in_sync_callback};
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, lock, thread_local};

thread_local! {
    static SCHEDULE_SCRATCH: std::cell::Cell<Vec<Arc<Subscription>>> =
        const { std::cell::Cell::new(Vec::new()) };
}

/// How many events a subscription's queue holds by default before it overflows.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// MAPI's `NOTIFY_SYNC` subscribe flag (provider-internal use only).
pub const NOTIFY_SYNC: u32 = 0x4000_0000;
/// The next connection id, for every hub of the process: an id one hub gave out never names
/// another hub's registration, so unsubscribing from the wrong hub is `NotFound`, never
/// someone else's subscription (P1). A plain atomic even under shuttle: only uniqueness
/// depends on it, not any interleaving.
static NEXT_CONNECTION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// MAPI's `NOTIFY_CANCELED` out-flag: a synchronous sink discontinued the notify.
pub const NOTIFY_CANCELED: u32 = 0x8000_0000;
/// MAPI's `MAPI_E_NOT_FOUND`, for an unknown connection.
pub const MAPI_E_NOT_FOUND: u32 = 0x8004_010F;

/// How a hub is set up.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Threads that run asynchronous sinks. Defaults to the number of CPUs.
    pub workers: usize,
    /// Queue capacity, in events, for subscriptions that do not choose one.
    pub queue_capacity: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// How one subscription is delivered to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Run the sink inline inside `notify`, which returns only after it ran (MAPI's
    /// `NOTIFY_SYNC`). For the embedding program's own use: such a sink may answer
    /// [`Flow::Discontinue`], and must not itself cause a synchronous notify.
    pub sync: bool,
    /// This subscription's queue capacity in events (asynchronous delivery only).
    pub queue_capacity: Option<usize>,
}

impl SubscribeOptions {
    /// Options for a synchronous subscription.
    pub fn sync() -> Self {
        SubscribeOptions {
            sync: true,
            ..Default::default()
        }
    }

    /// These options with a queue capacity.
    pub fn with_queue_capacity(self, events: usize) -> Self {
        SubscribeOptions {
            queue_capacity: Some(events),
            ..self
        }
    }

    /// Options from MAPI's numeric subscribe flags.
    pub fn from_mapi_flags(flags: u32) -> Self {
        SubscribeOptions {
            sync: flags & NOTIFY_SYNC != 0,
            ..Default::default()
        }
    }
}

/// A sink as [`Hub::subscribe`] takes it: any [`Sink`], or a dispatcher-wrapped local sink.
pub enum SinkRef {
    /// A thread-safe sink.
    Shared(Arc<dyn Sink>),
    /// A sink that runs on its dispatcher's thread.
    Affine(AffineSink),
}

impl<S: Sink> From<S> for SinkRef {
    fn from(s: S) -> Self {
        SinkRef::Shared(Arc::new(s))
    }
}

impl From<AffineSink> for SinkRef {
    fn from(s: AffineSink) -> Self {
        SinkRef::Affine(s)
    }
}

/// Why a subscribe was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The scope's key is empty (MAPI: a missing key).
    #[error("the subscription key is empty")]
    EmptyKey,
    /// The mask selects no known event kind.
    #[error("the event mask {0:#010x} selects no event kind")]
    EmptyMask(u32),
    /// A sink delivered on its owner's thread cannot be synchronous.
    #[error("a thread-affine sink cannot be registered with the sync option")]
    AffineSync,
    /// The queue capacity is zero.
    #[error("the queue capacity must be at least 1 event")]
    ZeroCapacity,
    /// The hub was shut down.
    #[error("the hub is shut down")]
    ShutDown,
}

/// Why an unsubscribe failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnsubscribeError {
    /// No live registration has this id (never issued, or already removed).
    #[error("no subscription with connection id {0}")]
    NotFound(u64),
}

impl UnsubscribeError {
    /// The MAPI error code for this error.
    pub fn hresult(&self) -> u32 {
        match self {
            UnsubscribeError::NotFound(_) => MAPI_E_NOT_FOUND,
        }
    }
}

/// Why a notify was refused. Nothing was delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// An event breaks the model's rules.
    #[error("event {index} is invalid: {reason}")]
    InvalidEvent {
        /// The event's position in the batch.
        index: usize,
        /// What is wrong with it.
        reason: InvalidEvent,
    },
    /// A synchronous sink tried to cause another synchronous notification.
    #[error("a synchronous sink may not cause another synchronous notification")]
    ReentrantSync,
    /// The hub was shut down.
    #[error("the hub is shut down")]
    ShutDown,
}

/// What a notify did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyOutcome {
    /// A synchronous sink answered [`Flow::Discontinue`]; the sinks after it were not called.
    pub canceled: bool,
    /// How many subscriptions the batch matched.
    pub matched: usize,
    /// How many synchronous sinks ran.
    pub sync_calls: usize,
    /// How many events were dropped from slow subscribers' queues by this notify.
    pub dropped_events: u64,
}

impl NotifyOutcome {
    /// MAPI's out-flags: [`NOTIFY_CANCELED`] or 0. The input `MAPI_UNICODE` bit, which shares
    /// the value, is never echoed.
    pub fn flags(&self) -> u32 {
        if self.canceled { NOTIFY_CANCELED } else { 0 }
    }
}

/// Counters for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Live subscriptions.
    pub subscriptions: usize,
    /// Notify calls accepted.
    pub notifies: u64,
    /// Deliveries made by the delivery pool.
    pub pool_deliveries: u64,
    /// Queue overflows signalled.
    pub overflows: u64,
    /// Events dropped by overflows.
    pub dropped_events: u64,
    /// Sinks removed because they panicked.
    pub sink_panics: u64,
}

/// What [`Hub::shutdown`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Registrations never unsubscribed (MAPI pairs subscribe and unsubscribe one to one).
    pub unpaired: Vec<ConnectionId>,
    /// Whether every queued delivery ran before the timeout.
    pub drained: bool,
}

type Map<V> = HashMap<Key, V, RandomState>;

#[derive(Default)]
struct Registry {
    by_id: HashMap<ConnectionId, Arc<Subscription>, RandomState>,
    exact: Map<Vec<Arc<Subscription>>>,
    subtree: Map<Vec<Arc<Subscription>>>,
    /// Children scopes, by folder.
    children: Map<Vec<Arc<Subscription>>>,
    /// How many registrations are synchronous. While there are none, no notify has
    /// synchronous sinks to run, so its batches need not be held until it ends (P9).
    sync_count: usize,
}

impl Registry {
    fn insert(&mut self, sub: Arc<Subscription>) {
        self.sync_count += usize::from(sub.is_sync());
        let map = match &sub.scope {
            Scope::Exact(_) => &mut self.exact,
            Scope::Subtree(_) => &mut self.subtree,
            Scope::Children(_) => &mut self.children,
        };
        map.entry(sub.scope.key().clone())
            .or_default()
            .push(sub.clone());
        self.by_id.insert(sub.id, sub);
    }

    fn remove(&mut self, id: ConnectionId) -> Option<Arc<Subscription>> {
        let sub = self.by_id.remove(&id)?;
        self.sync_count -= usize::from(sub.is_sync());
        let map = match &sub.scope {
            Scope::Exact(_) => &mut self.exact,
            Scope::Subtree(_) => &mut self.subtree,
            Scope::Children(_) => &mut self.children,
        };
        if let Some(list) = map.get_mut(sub.scope.key().as_bytes()) {
            if let Some(pos) = list.iter().position(|s| s.id == id) {
                list.swap_remove(pos);
            }
            if list.is_empty() {
                map.remove(sub.scope.key().as_bytes());
            }
        }
        Some(sub)
    }

    /// Calls `f` once for every subscription whose scope holds `key` and whose mask selects
    /// the event.
    fn visit_key(&self, key: &Key, n: &Notification, f: &mut impl FnMut(&Arc<Subscription>)) {
        let kind = n.kind();
        if let Some(list) = self.exact.get(key.as_bytes()) {
            list.iter()
                .filter(|s| s.mask.contains(kind))
                .for_each(&mut *f);
        }
        if !self.subtree.is_empty() {
            for prefix in ancestors_and_self(key.as_bytes()) {
                if let Some(list) = self.subtree.get(prefix) {
                    list.iter()
                        .filter(|s| s.mask.contains(kind))
                        .for_each(&mut *f);
                }
            }
        }
    }

    /// Calls `f` once for every subscription that selects `n` (by its key or, for moves and
    /// copies, its old key; children scopes by its folder or old folder).
    fn visit(&self, n: &Notification, f: &mut impl FnMut(&Arc<Subscription>)) {
        if !self.children.is_empty() {
            let kind = n.kind();
            let parent = n.parent();
            let old = n.old_parent().filter(|o| Some(o) != parent.as_ref());
            for folder in parent.iter().chain(old.iter()) {
                if let Some(list) = self.children.get(folder.as_bytes()) {
                    list.iter()
                        .filter(|s| s.mask.contains(kind))
                        .for_each(&mut *f);
                }
            }
        }
        match n.old_key() {
            None => self.visit_key(&n.key, n, f),
            Some(old) => {
                // A subscription may hold both keys: call it once.
                self.visit_key(&n.key, n, f);
                self.visit_key(old, n, &mut |s| {
                    if !s.scope.matches(&n.key) {
                        f(s)
                    }
                });
            }
        }
    }

    /// Every subscription the batch reaches, with the part of the batch it selects (the whole
    /// batch, shared, when it selects all of it).
    fn visit_batch(&self, batch: &Batch, mut f: impl FnMut(&Arc<Subscription>, Batch)) {
        if let [single] = batch.events() {
            self.visit(single, &mut |s| f(s, batch.clone()));
            return;
        }
        let mut per_sub: HashMap<ConnectionId, (Arc<Subscription>, Vec<u32>), RandomState> =
            HashMap::default();
        for (i, n) in batch.iter().enumerate() {
            self.visit(n, &mut |s| {
                per_sub
                    .entry(s.id)
                    .or_insert_with(|| (s.clone(), Vec::new()))
                    .1
                    .push(i as u32);
            });
        }
        for (sub, indices) in per_sub.into_values() {
            let part = if indices.len() == batch.len() {
                batch.clone()
            } else {
                indices.iter().map(|&i| batch[i as usize].clone()).collect()
            };
            f(&sub, part);
        }
    }
}

pub(crate) struct HubInner {
    registry: Mutex<Registry>,
    pool: Pool,
    options: HubOptions,
    closed: AtomicBool,
    notifies: AtomicU64,
    /// The number of the next notify call (its queued batches are held until it ends).
    next_notify: AtomicU64,
    overflows: AtomicU64,
    dropped_events: AtomicU64,
    sink_panics: AtomicU64,
}

impl HubInner {
    pub(crate) fn unsubscribe(&self, id: ConnectionId) -> Result<(), UnsubscribeError> {
        let sub = lock(&self.registry)
            .remove(id)
            .ok_or(UnsubscribeError::NotFound(id.get()))?;
        sub.deactivate();
        if let Route::Owned { signal, .. } = &sub.route {
            signal.closed(sub.clone());
        }
        tracing::debug!(connection = %id, "unsubscribed");
        Ok(())
    }

    pub(crate) fn sink_panicked(&self, id: ConnectionId) {
        self.sink_panics.fetch_add(1, Ordering::Relaxed);
        let _ = self.unsubscribe(id);
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        let live = lock(&self.registry).by_id.len();
        if live > 0 {
            tracing::debug!(live, "hub dropped with live subscriptions");
        }
        self.pool.stop();
    }
}

/// The notification engine: subscribers register sinks on keys; producers notify batches of
/// events; every matching sink is told, in order.
///
/// Cloning is cheap and every clone is the same hub. The hub stops its delivery threads when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(HubOptions::default())
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub with its delivery threads started.
    pub fn new(options: HubOptions) -> Self {
        let pool = Pool::start(options.workers);
        Hub {
            inner: Arc::new(HubInner {
                registry: Mutex::new(Registry::default()),
                pool,
                options,
                closed: AtomicBool::new(false),
                notifies: AtomicU64::new(0),
                next_notify: AtomicU64::new(0),
                overflows: AtomicU64::new(0),
                dropped_events: AtomicU64::new(0),
                sink_panics: AtomicU64::new(0),
            }),
        }
    }

    /// Registers `sink` for the events of `scope` whose kind is in `mask`. Returns the
    /// registration's connection id, valid until [`Hub::unsubscribe`] succeeds. The hub keeps
    /// its own reference to the sink until then.
    pub fn subscribe(
        &self,
        scope: Scope,
        mask: EventMask,
        sink: impl Into<SinkRef>,
        options: SubscribeOptions,
    ) -> Result<ConnectionId, SubscribeError> {
        let (route, target) = match sink.into() {
            SinkRef::Shared(s) if options.sync => {
                (Route::Inline(Turns::default()), Target::Shared(s))
            }
            SinkRef::Shared(s) => (Route::Pool, Target::Shared(s)),
            SinkRef::Affine(_) if options.sync => return Err(SubscribeError::AffineSync),
            SinkRef::Affine(a) => (
                Route::Owned {
                    signal: a.signal,
                    slot: Some(a.slot),
                },
                Target::Owned,
            ),
        };
        let sub = self.register(scope, mask, route, target, options)?;
        Ok(sub.id)
    }

    /// Registers a subscription drained by its owner through the returned [`Receiver`]
    /// (`recv().await` in a task, or `recv_blocking()` on a thread). Dropping the receiver
    /// unsubscribes.
    pub fn subscribe_receiver(
        &self,
        scope: Scope,
        mask: EventMask,
        options: SubscribeOptions,
    ) -> Result<Receiver, SubscribeError> {
        if options.sync {
            return Err(SubscribeError::AffineSync);
        }
        let signal = Signal::new(false);
        let route = Route::Owned {
            signal: signal.clone(),
            slot: None,
        };
        let sub = self.register(scope, mask, route, Target::Owned, options)?;
        Ok(Receiver::new(sub, signal, Arc::downgrade(&self.inner)))
    }

    fn register(
        &self,
        scope: Scope,
        mask: EventMask,
        route: Route,
        target: Target,
        options: SubscribeOptions,
    ) -> Result<Arc<Subscription>, SubscribeError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::ShutDown);
        }
        if scope.key().is_empty() {
            return Err(SubscribeError::EmptyKey);
        }
        if mask.is_empty() {
            return Err(SubscribeError::EmptyMask(mask.bits()));
        }
        let capacity = options
            .queue_capacity
            .unwrap_or(self.inner.options.queue_capacity);
        if capacity == 0 {
            return Err(SubscribeError::ZeroCapacity);
        }
        let id = self.next_id();
        let sub = Arc::new(Subscription::new(
            id,
            scope,
            mask,
            route,
            target,
            capacity,
            Arc::downgrade(&self.inner),
        ));
        lock(&self.inner.registry).insert(sub.clone());
        tracing::debug!(connection = %id, scope = ?sub.scope, "subscribed");
        Ok(sub)
    }

    fn next_id(&self) -> ConnectionId {
        let n = NEXT_CONNECTION_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The counter starts at 1 and 2^64 registrations will not happen; the fallback keeps
        // the type honest without a panic.
        ConnectionId::new(n).unwrap_or(ConnectionId::new(u64::MAX).expect("non-zero"))
    }

    /// Removes a registration. Once this returns the sink is never called again, and the hub
    /// has dropped its reference to it. Called from outside any sink, it first waits for a
    /// callback of that sink running on another thread to return; called from inside a sink
    /// (its own or another's), it does not wait, so sinks can unsubscribe each other freely.
    pub fn unsubscribe(&self, id: ConnectionId) -> Result<(), UnsubscribeError> {
        self.inner.unsubscribe(id)
    }

    /// Tells every matching subscription of the events in `batch`.
    ///
    /// Each subscription gets, as one delivery, the events of the batch its scope and mask
    /// select, in batch order; deliveries to one subscription keep notify order. Asynchronous
    /// sinks run later on the delivery threads: this returns without waiting for them, and
    /// never runs them on the calling thread. Synchronous sinks run here, in subscription
    /// order, before this returns; one that answers [`Flow::Discontinue`] stops the rest.
    /// Concurrent notifies reach a synchronous sink one at a time, in the hub's total order.
    pub fn notify(&self, batch: impl Into<Batch>) -> Result<NotifyOutcome, NotifyError> {
        let batch = batch.into();
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(NotifyError::ShutDown);
        }
        for (index, n) in batch.iter().enumerate() {
            n.validate()
                .map_err(|reason| NotifyError::InvalidEvent { index, reason })?;
        }
        let mut outcome = NotifyOutcome::default();
        if batch.is_empty() {
            return Ok(outcome);
        }
        let mut sync_calls: Vec<(Arc<Subscription>, Batch, u64)> = Vec::new();
        // Subscriptions this call queued for: their batches are released at its end.
        let mut queued: Vec<Arc<Subscription>> = Vec::new();
        // Subscriptions to hand to their runners now (nothing held them).
        let mut ready: Vec<Arc<Subscription>> = Vec::new();
        // A reused buffer: most notifies schedule a few subscriptions, and allocating for them
        // every time shows in profiles.
        let mut to_pool = SCHEDULE_SCRATCH.with(std::cell::Cell::take);
        // This notify's number, when it holds what it queues until its end (P9).
        let hold;
        {
            // Enqueueing under the registry lock gives every notify one place in a total
            // order, so any two subscriptions see two batches in the same order.
            let registry = lock(&self.inner.registry);
            if in_sync_callback() {
                let mut any_sync = false;
                registry.visit_batch(&batch, |s, _| any_sync |= s.is_sync());
                if any_sync {
                    return Err(NotifyError::ReentrantSync);
                }
            }
            // Held until this notify ends only if it may have synchronous sinks to run first;
            // only then does it need a number to release them by.
            hold = (registry.sync_count > 0)
                .then(|| self.inner.next_notify.fetch_add(1, Ordering::Relaxed));
            registry.visit_batch(&batch, |sub, part| {
                outcome.matched += 1;
                match &sub.route {
                    Route::Inline(turns) => sync_calls.push((sub.clone(), part, turns.take())),
                    Route::Pool | Route::Owned { .. } => {
                        let pushed = sub.push(part, hold);
                        if hold.is_some() {
                            queued.push(sub.clone());
                        } else if pushed.schedule {
                            ready.push(sub.clone());
                        }
                        if pushed.dropped > 0 {
                            let dropped = pushed.dropped;
                            outcome.dropped_events += dropped;
                            self.inner.overflows.fetch_add(1, Ordering::Relaxed);
                            self.inner
                                .dropped_events
                                .fetch_add(dropped, Ordering::Relaxed);
                            tracing::debug!(connection = %sub.id, dropped, "queue overflow");
                        }
                    }
                }
            });
        }
        self.inner.notifies.fetch_add(1, Ordering::Relaxed);

        // Each sync sink is called in its turn, so concurrent notifies reach it in the same
        // total order as the queues; one cancelled by a Discontinue still passes its turns.
        sync_calls.sort_by_key(|(s, _, _)| s.id);
        for (sub, part, ticket) in sync_calls {
            let Route::Inline(turns) = &sub.route else {
                continue;
            };
            turns.wait(ticket);
            if !outcome.canceled
                && let Some(flow) = sub
                    .call_each([&part], |t, part| match t {
                        Target::Shared(sink) => sink.on_notify(Delivery::Events(part)),
                        Target::Owned | Target::Gone => Flow::Continue,
                    })
                    .last
            {
                outcome.sync_calls += 1;
                outcome.canceled = flow == Flow::Discontinue;
            }
            turns.pass();
        }
        // Last, after every synchronous sink returned: the asynchronous deliveries queued
        // above (in the total order) may be handed out (P9).
        for sub in queued {
            if hold.is_some_and(|notify| sub.release(notify)) {
                ready.push(sub);
            }
        }
        for sub in ready {
            match &sub.route {
                Route::Owned { signal, .. } => signal.ready(sub.clone()),
                _ => to_pool.push(sub),
            }
        }
        self.inner.pool.schedule(&mut to_pool);
        SCHEDULE_SCRATCH.with(|s| s.set(to_pool));
        Ok(outcome)
    }

    /// Waits until the delivery threads have run every delivery queued so far (and any queued
    /// meanwhile), or until `timeout`. Returns whether they finished. Owner-drained
    /// subscriptions ([`Receiver`], dispatchers) are not waited for.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.inner.pool.wait_idle(timeout)
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> HubStats {
        HubStats {
            subscriptions: lock(&self.inner.registry).by_id.len(),
            notifies: self.inner.notifies.load(Ordering::Relaxed),
            pool_deliveries: self.inner.pool.shared.deliveries.load(Ordering::Relaxed),
            overflows: self.inner.overflows.load(Ordering::Relaxed),
            dropped_events: self.inner.dropped_events.load(Ordering::Relaxed),
            sink_panics: self.inner.sink_panics.load(Ordering::Relaxed),
        }
    }

    /// The live registrations, in connection-id order.
    pub fn connections(&self) -> Vec<ConnectionId> {
        let mut ids: Vec<_> = lock(&self.inner.registry).by_id.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Stops the hub: refuses new subscribes and notifies, runs what is queued (up to
    /// `timeout`), stops the delivery threads, and reports registrations never unsubscribed.
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.closed.store(true, Ordering::Release);
        let drained = self.flush(timeout);
        self.inner.pool.stop();
        let unpaired = self.connections();
        if !unpaired.is_empty() {
            tracing::warn!(
                count = unpaired.len(),
                "hub shut down with registrations never unsubscribed"
            );
        }
        ShutdownReport { unpaired, drained }
    }
}
