//! The connect and cancel sequences, written once for every transport: *before* hooks, the
//! transport's own work, presence, *after* hooks; and, when a connection ends, its cancel
//! hooks (in the background, tracked, so that shutdown waits for them).

use std::future::Future;
use std::sync::Arc;

use herald_core::hooks::{HookError, HookRequest, Hooks, Operation};
use tokio_util::task::TaskTracker;

use crate::Transport;
use crate::presence::{Conn, Connections, Lease};

/// Why a connection or subscription ends, as cancel hooks are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The client closed it (or went away).
    Close,
    /// The client asked to end it.
    Unsubscribe,
    /// Its lease, timeout or idle time ran out.
    Expiry,
    /// An operator closed it.
    Kick,
    /// The server is stopping.
    Shutdown,
    /// A newer connection of the same client took its place.
    Replaced,
    /// The client's credentials were revoked.
    Revoked,
}

impl EndReason {
    /// `close`, `unsubscribe`, `expiry`, `kick`, `shutdown`, `replaced`, `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Close => "close",
            EndReason::Unsubscribe => "unsubscribe",
            EndReason::Expiry => "expiry",
            EndReason::Kick => "kick",
            EndReason::Shutdown => "shutdown",
            EndReason::Replaced => "replaced",
            EndReason::Revoked => "revoked",
        }
    }
}

/// Who connects, how, to what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The connection (or subscription) id.
    pub id: String,
    /// Who: a token's subject, a mailbox user, `anonymous`…
    pub owner: String,
    /// The transport.
    pub transport: Transport,
    /// What it follows: a key, a subtree (`key/`), a mailbox; empty when nothing yet.
    pub target: String,
}

impl Connect {
    /// The hook request of this connect.
    pub fn request(&self) -> HookRequest {
        HookRequest::new(
            Operation::Connect,
            self.id.clone(),
            self.owner.clone(),
            self.transport.as_str(),
            self.target.clone(),
        )
    }
}

/// The owner as presence and hooks name it: `anonymous` when nobody authenticated (auth
/// off, or an API key, whose connections belong to no token subject).
pub fn owner_name(owner: Option<&str>) -> &str {
    owner.unwrap_or("anonymous")
}

/// What a filter follows, as hooks and the connections list show it: the key, the subtree
/// with a trailing `/`, or a folder's children with a trailing `/*`.
pub fn target_of(filter: &herald_core::Filter) -> String {
    match &filter.scope {
        herald_core::Scope::Exact(k) => k.to_string(),
        herald_core::Scope::Subtree(k) => format!("{k}/"),
        herald_core::Scope::Children(k) => format!("{k}/*"),
    }
}

/// Why a hooked operation did not happen.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError<E> {
    /// A *before* hook refused it; nothing was done.
    #[error("refused by {hook}: {reason}")]
    Refused {
        /// The hook's name.
        hook: String,
        /// Its reason, for the client.
        reason: String,
    },
    /// Too many connections have presence changes waiting to be written: try again shortly.
    #[error("the server is busy recording connections; try again shortly")]
    Busy,
    /// The operation itself failed (after any retries the hooks asked for).
    #[error("{0}")]
    Failed(E),
}

impl<E> ConnectError<E> {
    /// The same refusal, with the operation's error mapped.
    pub fn map_failed<F>(self, f: impl FnOnce(E) -> F) -> ConnectError<F> {
        match self {
            ConnectError::Refused { hook, reason } => ConnectError::Refused { hook, reason },
            ConnectError::Busy => ConnectError::Busy,
            ConnectError::Failed(e) => ConnectError::Failed(f(e)),
        }
    }
}

impl<E> From<HookError<E>> for ConnectError<E> {
    fn from(e: HookError<E>) -> Self {
        match e {
            HookError::Cancelled { hook, reason } => ConnectError::Refused { hook, reason },
            HookError::Failed(e) => ConnectError::Failed(e),
        }
    }
}

/// Runs hooked operations and the cancel hooks of connections that ended; cheap to clone.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    hooks: Arc<Hooks>,
    connections: Connections,
    tasks: TaskTracker,
}

impl Lifecycle {
    /// Over `hooks` and `connections`; cancel hooks run on `tasks`.
    pub fn new(hooks: Arc<Hooks>, connections: Connections, tasks: TaskTracker) -> Lifecycle {
        Lifecycle {
            hooks,
            connections,
            tasks,
        }
    }

    /// The connections registry.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// A connect of `transport` with a fresh id (`<transport>-<uuid>`, and `.<node>` in a
    /// cluster).
    pub fn fresh(
        &self,
        transport: Transport,
        owner: impl Into<String>,
        target: impl Into<String>,
    ) -> Connect {
        Connect {
            id: self.connections.fresh_id(transport.as_str()),
            owner: owner.into(),
            transport,
            target: target.into(),
        }
    }

    /// The hooks.
    pub fn hooks(&self) -> &Arc<Hooks> {
        &self.hooks
    }

    /// The connect sequence: refused at once while presence is backlogged; then the
    /// *before* hooks, `open` (the transport's own work, such as starting a feed), the
    /// connection's presence (online, with `lease`; none when `lease` is `None`), the *after*
    /// hooks. The [`Live`] returned runs the cancel hooks when it drops.
    pub async fn connect<T, E, F, Fut>(
        &self,
        connect: Connect,
        lease: Option<Lease>,
        mut open: F,
    ) -> Result<(T, Live), ConnectError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        if lease.is_some() && self.connections.is_backlogged() {
            metrics::counter!(crate::metrics::names::PRESENCE_OVERFLOWS).increment(1);
            return Err(ConnectError::Busy);
        }
        let req = connect.request();
        let (value, conn) = self
            .hooks
            .run(&req, || {
                let opened = open();
                async {
                    let value = opened.await?;
                    let conn = lease.map(|lease| {
                        self.connections.open(
                            Some(connect.id.clone()),
                            connect.transport,
                            &connect.owner,
                            &connect.target,
                            lease,
                        )
                    });
                    Ok((value, conn))
                }
            })
            .await?;
        Ok((
            value,
            Live {
                conn,
                request: req,
                lifecycle: self.clone(),
                reason: EndReason::Close,
                armed: true,
            },
        ))
    }

    /// Registers a connection's presence without running hooks (a durable subscription
    /// restored at start, or one whose connect ran as a hooked [`Lifecycle::run`]). Its end
    /// runs no cancel hooks either: its cancels are hooked where they happen.
    pub fn attach(&self, connect: Connect, lease: Lease) -> Live {
        let conn = self.connections.open(
            Some(connect.id.clone()),
            connect.transport,
            &connect.owner,
            &connect.target,
            lease,
        );
        Live {
            conn: Some(conn),
            request: connect.request(),
            lifecycle: self.clone(),
            reason: EndReason::Close,
            armed: false,
        }
    }

    /// Runs `op` between the hooks' calls for `req` (a subscription created, an unsubscribe,
    /// a kick: operations a hook may refuse).
    pub async fn run<T, E, F, Fut>(&self, req: &HookRequest, op: F) -> Result<T, ConnectError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        Ok(self.hooks.run(req, op).await?)
    }

    /// Runs the hooks around a cancel that has already happened (a stream closed, a lease
    /// expired): in the background, and it cannot be refused. Shutdown waits for them.
    pub fn cancelled(&self, req: HookRequest) {
        if self.hooks.is_empty() {
            return;
        }
        let hooks = self.hooks.clone();
        self.tasks.spawn(async move {
            let _ = hooks
                .run(&req, || async { Ok::<(), std::convert::Infallible>(()) })
                .await;
        });
    }
}

/// A stream, session or subscription whose connect hooks ran: when it drops, its presence
/// goes offline and its cancel hooks run with the reason given to [`Live::end`] (`close`
/// unless told otherwise; none when an operator's kick already ran them).
pub struct Live {
    conn: Option<Conn>,
    request: HookRequest,
    lifecycle: Lifecycle,
    reason: EndReason,
    armed: bool,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("connection", &self.request.connection)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Its presence registration, if it has one.
    pub fn conn(&self) -> Option<&Conn> {
        self.conn.as_ref()
    }

    /// What its connect hooks were told.
    pub fn request(&self) -> &HookRequest {
        &self.request
    }

    /// Why it ends, for the cancel hooks.
    pub fn end(&mut self, reason: EndReason) {
        self.reason = reason;
    }

    /// Why it will end as things stand.
    pub fn reason(&self) -> EndReason {
        self.reason
    }

    /// Ends without cancel hooks (it ends with the process and is restored without connect
    /// hooks, like a durable subscription).
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Cancelled when its lease expires or it is kicked (a stream closes then). Never, for a
    /// connection without presence.
    pub async fn expired(&self) -> EndReason {
        match &self.conn {
            Some(c) => {
                c.expired().cancelled().await;
                if c.was_kicked() {
                    EndReason::Kick
                } else {
                    EndReason::Expiry
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The client was heard from (renews the lease).
    pub fn renew(&self) {
        if let Some(c) = &self.conn {
            c.renew();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let kicked = self.conn.as_ref().is_some_and(Conn::was_kicked);
        // Presence first: the connection is offline before its hooks hear it ended.
        self.conn.take();
        if self.armed && !kicked {
            self.lifecycle
                .cancelled(self.request.clone().cancel(self.reason.as_str(), true));
        }
    }
}
