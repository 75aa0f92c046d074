//! Herald's notification engine: subscribers register sinks on keys, producers notify batches
//! of events, and every matching sink is told, in order, without silent loss.
//!
//! It implements the subscription machinery of MAPI's "supporting event notification"
//! (`IMAPISupport::Subscribe`, `Unsubscribe`, `Notify`) for Rust programs, with Herald's
//! additions: subtree scopes, bounded per-subscription queues with an explicit overflow signal,
//! and watermarks on events. It does no I/O and knows no wire format.
//!
//! ```
//! use std::sync::mpsc;
//! use std::time::Duration;
//! use herald_core::{
//!     Delivery, Event, EventKind, Flow, Hub, Notification, ObjectChange, Scope,
//!     SubscribeOptions,
//! };
//!
//! let hub = Hub::default();
//! let (tx, rx) = mpsc::channel();
//! let tx = std::sync::Mutex::new(tx);
//! let id = hub.subscribe(
//!     Scope::Subtree("alice@example.test/inbox".into()),
//!     EventKind::ObjectCreated | EventKind::ObjectDeleted,
//!     move |d: Delivery<'_>| {
//!         if let Delivery::Events(events) = d {
//!             for n in events {
//!                 tx.lock().unwrap().send(n.key.to_string()).unwrap();
//!             }
//!         }
//!         Flow::Continue
//!     },
//!     SubscribeOptions::default(),
//! )?;
//!
//! hub.notify(Notification::new(
//!     "alice@example.test/inbox/msg-1",
//!     Event::ObjectCreated(ObjectChange::default()),
//! ))?;
//! assert_eq!(
//!     rx.recv_timeout(Duration::from_secs(5))?,
//!     "alice@example.test/inbox/msg-1"
//! );
//! hub.unsubscribe(id)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dispatch;
mod event;
pub mod hooks;
mod hub;
mod key;
pub mod offline;
mod pool;
mod sink;
mod subscription;
mod sync;
mod wait;

pub use dispatch::{AffineSink, Dispatcher, LocalSink, Receiver, TryRecvError};
pub use event::{
    ConnectionStateChange, CriticalError, Event, EventKind, EventMask, Extended, InvalidEvent,
    NewMail, Notification, ObjectChange, ObjectType, PR_INSTANCE_KEY, PR_NULL, PropData, PropTag,
    PropValue, Relocation, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE, StateChangePhase,
    StatusObjectChange, TableChange, TableEvent, Timestamp, Watermark,
};
pub use hub::{
    DEFAULT_QUEUE_CAPACITY, Hub, HubOptions, HubStats, MAPI_E_NOT_FOUND, NOTIFY_CANCELED,
    NOTIFY_SYNC, NotifyError, NotifyOutcome, ShutdownReport, SinkRef, SubscribeError,
    SubscribeOptions, UnsubscribeError,
};
pub use key::{Filter, Key, PATH_SEPARATOR, RESERVED_PREFIX, Scope};
pub use sink::{Batch, CALLBACK_DISCONTINUE, Delivery, Flow, Overflow, OwnedDelivery, Sink};
pub use subscription::ConnectionId;
pub use wait::{AsyncWait, Wait, WaitOutcome, WaitRejected};
