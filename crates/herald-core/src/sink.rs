//! What a subscriber implements to be told of events: the advise sink.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::event::{Notification, Watermark};

/// An immutable, shared batch of notifications: one `notify` call's events, in order.
///
/// Cloning is cheap; every subscriber of a key shares one copy of the batch.
#[derive(Clone, PartialEq)]
pub struct Batch(Arc<[Notification]>);

impl Batch {
    /// The batch's events in notify order.
    pub fn events(&self) -> &[Notification] {
        &self.0
    }

    /// The watermark of the last event that has one.
    pub fn last_watermark(&self) -> Option<Watermark> {
        self.0.iter().rev().find_map(|n| n.watermark)
    }
}

impl Deref for Batch {
    type Target = [Notification];
    fn deref(&self) -> &[Notification] {
        &self.0
    }
}

impl From<Vec<Notification>> for Batch {
    fn from(v: Vec<Notification>) -> Self {
        Batch(v.into())
    }
}

impl From<&[Notification]> for Batch {
    fn from(v: &[Notification]) -> Self {
        Batch(v.into())
    }
}

impl From<Notification> for Batch {
    fn from(n: Notification) -> Self {
        Batch(Arc::from([n]))
    }
}

impl FromIterator<Notification> for Batch {
    fn from_iter<I: IntoIterator<Item = Notification>>(iter: I) -> Self {
        Batch(iter.into_iter().collect())
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

/// A subscriber's queue overflowed: its backlog was dropped and it must resync.
///
/// Everything after `resume_after` up to and including `missed_through` was not delivered;
/// the subscriber reads that range from the log (or refreshes its view) before trusting the
/// deliveries that follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// The watermark of the last event handed to the sink before the gap (`None` if no logged
    /// event was delivered before it).
    pub resume_after: Option<Watermark>,
    /// The watermark of the last event dropped (`None` if the dropped events were not logged).
    pub missed_through: Option<Watermark>,
    /// How many events were dropped.
    pub missed_events: u64,
}

/// One call into a sink.
#[derive(Clone, Copy, Debug)]
pub enum Delivery<'a> {
    /// Events, in notify order. The view lives only for the call: keep a copy to keep them.
    Events(&'a [Notification]),
    /// The subscriber's queue overflowed; events were dropped (see [`Overflow`]).
    Overflow(&'a Overflow),
}

/// A delivery the receiver owns (see [`crate::Receiver`]).
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedDelivery {
    /// Events, in notify order.
    Events(Batch),
    /// The subscriber's queue overflowed.
    Overflow(Overflow),
}

impl OwnedDelivery {
    /// Borrows this delivery as a sink would see it.
    pub fn as_delivery(&self) -> Delivery<'_> {
        match self {
            OwnedDelivery::Events(b) => Delivery::Events(b),
            OwnedDelivery::Overflow(o) => Delivery::Overflow(o),
        }
    }
}

/// What a sink answers. Only a synchronous sink's answer has an effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Flow {
    /// Go on delivering (MAPI's `S_OK`).
    #[default]
    Continue,
    /// Stop this notify: no further sink is called for it and the outcome says *canceled*
    /// (MAPI's `CALLBACK_DISCONTINUE`). Ignored from asynchronous sinks.
    Discontinue,
}

/// MAPI's `CALLBACK_DISCONTINUE`, the value a synchronous callback returns to stop a notify.
pub const CALLBACK_DISCONTINUE: u32 = 0x8000_0000;

impl Flow {
    /// The flow MAPI's numeric callback result stands for.
    pub fn from_mapi(value: u32) -> Flow {
        if value == CALLBACK_DISCONTINUE {
            Flow::Discontinue
        } else {
            Flow::Continue
        }
    }
}

/// An advise sink: told of every event its subscription matches.
///
/// The hub holds its own reference to the sink from `subscribe` until `unsubscribe`, so the
/// caller may drop its handle at once. An asynchronous sink is called on one of the hub's
/// delivery threads, never inside the `notify` that caused the event, and never concurrently
/// with itself for one subscription.
pub trait Sink: Send + Sync + 'static {
    /// Called with each delivery for the subscription, in order.
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow;
}

impl<F> Sink for F
where
    F: Fn(Delivery<'_>) -> Flow + Send + Sync + 'static,
{
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow {
        self(delivery)
    }
}

impl<S: Sink + ?Sized> Sink for Arc<S> {
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow {
        (**self).on_notify(delivery)
    }
}

impl Sink for Box<dyn Sink> {
    fn on_notify(&self, delivery: Delivery<'_>) -> Flow {
        (**self).on_notify(delivery)
    }
}
