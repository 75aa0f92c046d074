//! The one road from Herald's log to a client. A transport (SSE, WebSocket, long-poll,
//! webhooks, EWS, MAPI, UDP) parses its requests and renders its frames; everything between
//! the log and those frames is here, written once: following the log from a watermark behind
//! the server's online/offline gate, pages for long-poll, the push driver with its back-off,
//! the UDP nudger, the connect/cancel sequence with hooks and presence, and the registries
//! of sessions with their tracked tasks. `docs/design/delivery.md` explains the layer.
//!
//! A transport in a few lines: connect (hooks, presence), follow, render, end.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use herald_core::{Event, EventMask, Filter, Hub, Notification, ObjectChange, Scope, Watermark};
//! use herald_delivery::{Connect, Delivery, FeedItem, Lease, ServerState, Transport};
//! use herald_log::{EmbeddedLog, EventLog, LogOptions, SharedLog};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let log = SharedLog::new(EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap());
//! let delivery = Delivery::new(
//!     log.clone(),
//!     Default::default(),
//!     ServerState::new(false, Duration::from_secs(1)),
//!     Arc::default(),
//!     Default::default(),
//! );
//! let filter = Filter { scope: Scope::Subtree("alice".into()), mask: EventMask::ALL };
//! // The connect sequence: before hooks, the feed, presence (online), after hooks.
//! let connect = delivery.lifecycle().fresh(Transport::Sse, "alice", "alice/");
//! let (mut feed, live) = delivery
//!     .lifecycle()
//!     .connect(connect, Some(Lease::Stream), || {
//!         std::future::ready(delivery.feed(filter.clone(), Watermark(0)))
//!     })
//!     .await
//!     .unwrap();
//! let appended = log
//!     .append(vec![Notification::new("alice/inbox/m1", Event::ObjectCreated(ObjectChange::default()))], Default::default())
//!     .await
//!     .unwrap();
//! // Render what the feed yields, in order, each event with its watermark (the connection's
//! // own presence event is in the log too, under `$herald/presence`, outside this filter).
//! match feed.next().await.unwrap() {
//!     FeedItem::Events { batch, .. } => assert_eq!(batch[0].watermark, Some(appended.first)),
//!     FeedItem::KeepAlive { .. } => unreachable!("no keep-alive was asked for"),
//! }
//! // Dropping `live` takes the connection offline and runs its cancel hooks.
//! drop(live);
//! delivery.close(Duration::from_secs(1)).await.unwrap();
//! # });
//! ```

mod backoff;
mod connect;
mod cursor;
mod feed;
pub mod metrics;
mod nudge;
mod outbox;
mod page;
pub mod presence;
mod push;
mod quota;
mod registry;
mod state;

use std::sync::Arc;
use std::time::Duration;

use herald_core::hooks::Hooks;
use herald_core::{Filter, Notification, Watermark};
use herald_log::{EventLog, FollowError, FollowOptions, Follower, LogError, ReadError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use backoff::Backoff;
pub use connect::{Connect, ConnectError, EndReason, Lifecycle, Live, owner_name, target_of};
pub use cursor::Cursor;
pub use feed::{Feed, FeedItem, Select};
pub use nudge::NudgeTarget;
pub use outbox::{Outbox, Taken};
pub use page::{Page, PageRequest};
pub use presence::{
    BusyGuard, Conn, ConnectionInfo, Connections, Lease, PresenceOptions, node_of, offline_event,
    presence_change,
};
pub use push::{
    ATTEMPT_HISTORY, Attempt, AttemptRecord, GiveUp, PushState, PushStatus, Pushed, Pusher,
    RetryPolicy,
};
pub use quota::{Quota, QuotaPermit};
pub use registry::{Registry, Session};
pub use state::{Advice, AdviseStream, PushGuard, ServerState, state_name};

/// How deliveries are set up.
#[derive(Clone, Debug)]
pub struct DeliveryOptions {
    /// Capacity, in events, of each feed's live queue (overflowing it costs log reads, not
    /// events).
    pub queue_capacity: usize,
    /// Presence: lease, publishing, backlog.
    pub presence: PresenceOptions,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            queue_capacity: herald_core::DEFAULT_QUEUE_CAPACITY,
            presence: PresenceOptions::default(),
        }
    }
}

/// Everything transports share to deliver, over a log `L`; cheap to clone. Transports ask
/// it for feeds, pages, pushers, nudgers, outboxes and registries, and run their connects
/// through its [`Lifecycle`]; [`Delivery::close`] is the one shutdown path.
pub struct Delivery<L> {
    inner: Arc<Inner<L>>,
}

impl<L> Clone for Delivery<L> {
    fn clone(&self) -> Self {
        Delivery {
            inner: self.inner.clone(),
        }
    }
}

impl<L> std::fmt::Debug for Delivery<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

struct Inner<L> {
    log: L,
    options: DeliveryOptions,
    state: ServerState,
    lifecycle: Lifecycle,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl<L: EventLog + Clone> Delivery<L> {
    /// Deliveries from `log`, behind `state`'s gate, with `hooks` around connects; `shutdown`
    /// is cancelled when the server starts stopping. Must be called inside a tokio runtime.
    pub fn new(
        log: L,
        options: DeliveryOptions,
        state: ServerState,
        hooks: Arc<Hooks>,
        shutdown: CancellationToken,
    ) -> Delivery<L> {
        let tasks = TaskTracker::new();
        let connections = Connections::new(log.clone(), options.presence.clone());
        Delivery {
            inner: Arc::new(Inner {
                lifecycle: Lifecycle::new(hooks, connections, tasks.clone()),
                log,
                options,
                state,
                tasks,
                shutdown,
            }),
        }
    }

    /// The log.
    pub fn log(&self) -> &L {
        &self.inner.log
    }

    /// The server's state and gate.
    pub fn state(&self) -> &ServerState {
        &self.inner.state
    }

    /// Connects, cancels and hooks.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// The connections and their presence.
    pub fn connections(&self) -> &Connections {
        self.inner.lifecycle.connections()
    }

    /// Cancelled when the server starts shutting down: streams end with their final frame.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// A registry of sessions whose tasks this delivery tracks.
    pub fn registry<S: Send + Sync + 'static>(&self) -> Registry<S> {
        Registry::new(self.inner.tasks.clone())
    }

    /// Runs `task` until it ends or the server shuts down; shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Runs `task` to its end (it must watch [`Delivery::shutdown`] itself, to finish its
    /// answer); shutdown waits for it.
    pub fn track<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// The log's last watermark: where a subscription that names none starts.
    pub fn head(&self) -> Result<Watermark, LogError> {
        Ok(self.inner.log.bounds()?.last)
    }

    /// A feed of `filter` after `after`: fails at once if that position has expired or is
    /// ahead of the log.
    pub fn feed(&self, filter: Filter, after: Watermark) -> Result<Feed<L>, FollowError> {
        let options = FollowOptions {
            queue_capacity: self.inner.options.queue_capacity,
            ..Default::default()
        };
        let follower = Follower::start(&self.inner.log, filter, after, options)?
            .gated(self.inner.state.gate());
        Ok(Feed::new(follower))
    }

    /// A page of events after `req.after` that `select` keeps. While the server is offline
    /// nothing after `seen` (what the subscriber had already been told was there) is
    /// returned.
    pub async fn page(
        &self,
        mut req: PageRequest,
        seen: Watermark,
        select: impl Fn(&Notification) -> bool,
    ) -> Result<Page, ReadError> {
        if !self.inner.state.delivering() {
            req.ceiling = req.ceiling.min(seen);
        }
        page::read_page(&self.inner.log, req, select).await
    }

    /// A pusher for one endpoint of `transport` (its metrics label).
    pub fn pusher(&self, transport: &'static str, policy: RetryPolicy) -> Pusher {
        Pusher::new(self.inner.state.clone(), transport, policy)
    }

    /// The UDP nudger of one session, to spawn on its registry: datagrams while `pending`.
    pub fn nudger(
        &self,
        pending: watch::Receiver<bool>,
        target: watch::Receiver<Option<NudgeTarget>>,
        repeat: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        nudge::nudge(pending, target, repeat, self.inner.state.gate())
    }

    /// An outbox of at most `capacity` bytes, behind the gate.
    pub fn outbox<T>(&self, capacity: usize) -> Outbox<T> {
        Outbox::new(capacity, self.inner.state.gate())
    }

    /// The one shutdown path, after the registries have stopped their sessions: waits up to
    /// `timeout` for every tracked task (workers, cancel hooks), then takes every connection
    /// offline and writes its presence, then makes the log durable and closes it.
    pub async fn close(&self, timeout: Duration) -> Result<(), LogError> {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery tasks still running after the shutdown timeout");
        }
        self.connections().close().await;
        self.inner.log.shutdown().await
    }
}

/// The transports Herald speaks, as hooks, presence and metrics name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Server-Sent Events (`GET /v1/stream`).
    Sse,
    /// WebSocket (`GET /v1/ws`).
    WebSocket,
    /// A durable long-poll subscription.
    Poll,
    /// A durable subscription nudged by UDP datagrams.
    Udp,
    /// A durable webhook subscription.
    Webhook,
    /// Exchange Web Services (pull, streaming, push).
    Ews,
    /// MAPI over HTTP.
    Mapi,
}

impl Transport {
    /// Every transport.
    pub const ALL: [Transport; 7] = [
        Transport::Sse,
        Transport::WebSocket,
        Transport::Poll,
        Transport::Udp,
        Transport::Webhook,
        Transport::Ews,
        Transport::Mapi,
    ];

    /// Its name in hooks, presence and the API: `sse`, `ws`, `poll`, `udp`, `webhook`,
    /// `ews`, `mapi`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "ws",
            Transport::Poll => "poll",
            Transport::Udp => "udp",
            Transport::Webhook => "webhook",
            Transport::Ews => "ews",
            Transport::Mapi => "mapi",
        }
    }

    /// The transport named `s`, if any.
    pub fn parse(s: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether a connection of this transport is a durable subscription (it ends by being
    /// deleted, not kicked).
    pub fn is_durable(self) -> bool {
        matches!(self, Transport::Poll | Transport::Udp | Transport::Webhook)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
