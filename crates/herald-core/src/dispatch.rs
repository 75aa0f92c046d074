//! Delivery on a thread or task the subscriber owns.
//!
//! * [`Receiver`]: a subscription whose queue the owner drains itself, with `recv().await`
//!   from any async task or `recv_blocking()` from a thread. This is how transports (a stream,
//!   a long-poll) consume the hub.
//! * [`Dispatcher`]: MAPI's thread-safe advise-sink wrapper (`HrThisThreadAdviseSink`). A sink
//!   wrapped by a dispatcher runs only on the thread that created the dispatcher, when that
//!   thread calls [`Dispatcher::dispatch_pending`] (MAPI's `HrDispatchNotifications`). The
//!   wrapped sink need not be `Send` or `Sync`.

use std::cell::RefCell;
use std::future::poll_fn;
use std::marker::PhantomData;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use crate::hub::{Hub, HubInner};
use crate::sink::{Delivery, Flow, OwnedDelivery};
use crate::subscription::{ConnectionId, Drained, Subscription, Target};
use crate::sync::{Arc, Condvar, Mutex, Weak, lock, wait_timeout};

/// Wakes the owner of one or more owner-drained subscriptions.
pub(crate) struct Signal {
    /// Whether the owner wants the list of ready subscriptions (a dispatcher does; a receiver
    /// owns one subscription and drains it directly).
    collect: bool,
    state: Mutex<SignalState>,
    cv: Condvar,
    waker: AtomicWaker,
}

#[derive(Default)]
struct SignalState {
    ready: Vec<Arc<Subscription>>,
    /// Set by every wake; cleared by the owner before it looks for work.
    woken: bool,
}

impl Signal {
    pub(crate) fn new(collect: bool) -> Arc<Signal> {
        Arc::new(Signal {
            collect,
            state: Mutex::new(SignalState::default()),
            cv: Condvar::new(),
            waker: AtomicWaker::new(),
        })
    }

    /// A subscription of this owner became scheduled.
    pub(crate) fn ready(&self, sub: Arc<Subscription>) {
        let mut s = lock(&self.state);
        if self.collect {
            s.ready.push(sub);
        }
        s.woken = true;
        drop(s);
        self.cv.notify_all();
        self.waker.wake();
    }

    /// A subscription of this owner was removed: wake the owner so it sees it (a dispatcher
    /// then drops the wrapped sink on its own thread).
    pub(crate) fn closed(&self, sub: Arc<Subscription>) {
        self.ready(sub);
    }

    fn take_ready(&self) -> Vec<Arc<Subscription>> {
        let mut s = lock(&self.state);
        s.woken = false;
        std::mem::take(&mut s.ready)
    }

    /// Blocks until woken or the deadline; returns whether it was woken.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut s = lock(&self.state);
        loop {
            if s.woken {
                s.woken = false;
                return true;
            }
            match deadline {
                None => s = crate::sync::wait(&self.cv, s),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    s = wait_timeout(&self.cv, s, d - now);
                }
            }
        }
    }
}

/// Why [`Receiver::try_recv`] returned nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is queued right now.
    #[error("no delivery is queued")]
    Empty,
    /// The subscription was removed (unsubscribed, or the hub shut down).
    #[error("the subscription is closed")]
    Closed,
}

/// A subscription drained by its owner: the executor-affine way to consume the hub.
///
/// Deliveries keep the hub's guarantees: in notify order, whole batches, bounded queue with an
/// explicit [`crate::Overflow`]. Dropping the receiver unsubscribes.
pub struct Receiver {
    sub: Arc<Subscription>,
    signal: Arc<Signal>,
    hub: Weak<HubInner>,
}

impl Receiver {
    pub(crate) fn new(sub: Arc<Subscription>, signal: Arc<Signal>, hub: Weak<HubInner>) -> Self {
        Receiver { sub, signal, hub }
    }

    /// The subscription's connection id.
    pub fn id(&self) -> ConnectionId {
        self.sub.id
    }

    /// Takes the next delivery if one is queued.
    pub fn try_recv(&mut self) -> Result<OwnedDelivery, TryRecvError> {
        if !self.sub.is_active() {
            return Err(TryRecvError::Closed);
        }
        self.sub.pop().ok_or(TryRecvError::Empty)
    }

    /// Waits for the next delivery; `None` once the subscription is closed.
    pub async fn recv(&mut self) -> Option<OwnedDelivery> {
        poll_fn(|cx| match self.try_recv() {
            Ok(d) => Poll::Ready(Some(d)),
            Err(TryRecvError::Closed) => Poll::Ready(None),
            Err(TryRecvError::Empty) => {
                self.signal.waker.register(cx.waker());
                match self.try_recv() {
                    Ok(d) => Poll::Ready(Some(d)),
                    Err(TryRecvError::Closed) => Poll::Ready(None),
                    Err(TryRecvError::Empty) => Poll::Pending,
                }
            }
        })
        .await
    }

    /// Blocks the thread until the next delivery, the timeout (`Err(Empty)`), or closure.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<OwnedDelivery, TryRecvError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_recv() {
                Err(TryRecvError::Empty) => {
                    if !self.signal.wait_until(Some(deadline)) {
                        return self.try_recv();
                    }
                }
                other => return other,
            }
        }
    }

    /// Blocks the thread until the next delivery; `None` once the subscription is closed.
    pub fn recv_blocking(&mut self) -> Option<OwnedDelivery> {
        loop {
            match self.try_recv() {
                Ok(d) => return Some(d),
                Err(TryRecvError::Closed) => return None,
                Err(TryRecvError::Empty) => {
                    self.signal.wait_until(None);
                }
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            // NotFound means someone already unsubscribed it: nothing left to do.
            let _ = hub.unsubscribe(self.sub.id);
        }
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("id", &self.sub.id)
            .finish()
    }
}

/// A sink run on its dispatcher's thread only. It need not be `Send` or `Sync`.
pub trait LocalSink: 'static {
    /// Called with each delivery for the subscription, in order, on the dispatcher's thread.
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow;
}

impl<F> LocalSink for F
where
    F: Fn(Delivery<'_>) -> Flow + 'static,
{
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow {
        self(delivery)
    }
}

/// The thread-safe face of a [`LocalSink`] wrapped by a [`Dispatcher`]: pass it to
/// [`Hub::subscribe`]. It cannot be registered with the `sync` option.
pub struct AffineSink {
    pub(crate) signal: Arc<Signal>,
    pub(crate) slot: usize,
}

impl std::fmt::Debug for AffineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffineSink")
            .field("slot", &self.slot)
            .finish()
    }
}

/// Runs wrapped sinks on the thread that created it (MAPI's `HrThisThreadAdviseSink` and
/// `HrDispatchNotifications`). Not `Send`: it stays on its thread.
pub struct Dispatcher {
    signal: Arc<Signal>,
    sinks: RefCell<Vec<Option<Rc<dyn LocalSink>>>>,
    _not_send: PhantomData<*const ()>,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    /// A dispatcher bound to the current thread.
    pub fn new() -> Self {
        Dispatcher {
            signal: Signal::new(true),
            sinks: RefCell::new(Vec::new()),
            _not_send: PhantomData,
        }
    }

    /// Wraps `sink` so that the hub's deliveries to it run on this thread.
    pub fn wrap(&self, sink: impl LocalSink) -> AffineSink {
        let mut sinks = self.sinks.borrow_mut();
        let slot = sinks.len();
        sinks.push(Some(Rc::new(sink)));
        AffineSink {
            signal: self.signal.clone(),
            slot,
        }
    }

    /// Subscribes a local sink through `hub`: shorthand for wrap, then subscribe.
    pub fn subscribe(
        &self,
        hub: &Hub,
        scope: crate::Scope,
        mask: crate::EventMask,
        sink: impl LocalSink,
        options: crate::SubscribeOptions,
    ) -> Result<ConnectionId, crate::SubscribeError> {
        hub.subscribe(scope, mask, self.wrap(sink), options)
    }

    /// Delivers everything that was queued for this dispatcher's sinks when it was called,
    /// before returning; returns the number of deliveries made.
    pub fn dispatch_pending(&self) -> usize {
        let ready = self.signal.take_ready();
        let mut delivered = 0;
        let mut again = Vec::new();
        for sub in ready {
            if sub.is_active() {
                // Bound the work to what is queued now, so a busy producer cannot keep us here.
                let budget = sub.queued_deliveries().max(1);
                let mut count = 0u64;
                let drained = self.drain_one(&sub, budget, &mut count);
                delivered += count as usize;
                if sub.is_active() {
                    if let Drained::More = drained {
                        again.push(sub);
                    }
                    continue;
                }
            }
            self.release(&sub);
        }
        for sub in again {
            // Still marked scheduled: put it back for the next dispatch.
            self.signal.ready(sub);
        }
        delivered
    }

    /// Blocks until something is ready to dispatch or the timeout passes, then dispatches it.
    pub fn dispatch_timeout(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.dispatch_pending();
            if n > 0 || !self.signal.wait_until(Some(deadline)) {
                return n;
            }
        }
    }

    /// Waits (in an async task on this thread, e.g. in a `LocalSet`) until there is something
    /// to dispatch, then dispatches it.
    pub async fn dispatch_next(&self) -> usize {
        loop {
            let n = self.dispatch_pending();
            if n > 0 {
                return n;
            }
            poll_fn(|cx| {
                self.signal.waker.register(cx.waker());
                let woken = {
                    let mut s = lock(&self.signal.state);
                    std::mem::replace(&mut s.woken, false) || !s.ready.is_empty()
                };
                if woken {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
    }

    fn drain_one(&self, sub: &Arc<Subscription>, budget: usize, delivered: &mut u64) -> Drained {
        let slot = sub.owned_slot().unwrap_or(usize::MAX);
        let mut buf = Vec::new();
        let mut left = budget;
        while left > 0 {
            if !sub.pop_into(left, &mut buf) {
                return Drained::Empty;
            }
            left -= buf.len();
            let called = sub.call_each(buf.drain(..), |target, d| {
                if !matches!(target, Target::Owned) {
                    return Flow::Continue;
                }
                // Clone the sink out: it may wrap more sinks into this dispatcher.
                let sink = self.sinks.borrow().get(slot).cloned().flatten();
                match sink {
                    Some(sink) => sink.on_notify(d.as_delivery()),
                    None => Flow::Continue,
                }
            });
            *delivered += called.count as u64;
        }
        Drained::More
    }

    /// Drops the wrapped sink of a removed subscription, here on the owning thread.
    fn release(&self, sub: &Subscription) {
        if let Some(slot) = sub.owned_slot() {
            // Take it out first: the sink's destructor may call back into the dispatcher.
            let old = self.sinks.borrow_mut().get_mut(slot).and_then(Option::take);
            drop(old);
        }
    }
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("sinks", &self.sinks.borrow().len())
            .finish()
    }
}
