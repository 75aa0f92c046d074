//! Hooks called before and after every connect and every cancel, after the Windows
//! multiple-provider router's connection notification API (`AddConnectNotify`,
//! `CancelConnectNotify`):
//!
//! - the *before* call gets no context and may cancel the operation with a reason; the
//!   operation is then skipped and that hook gets no *after* call;
//! - a hook that returns no context from *before* gets no *after* call; a context it returns
//!   comes back unchanged in *after*, with the operation's result;
//! - an *after* call may ask to retry a failed operation: it is retried without a second
//!   *before* call (a retry asked after a success counts as success);
//! - *before* calls run in reverse registration order, *after* calls in the reverse of that.
//!
//! Requests refused before the attempt (bad input, failed authentication) and automatic
//! restores must not go through [`Hooks::run`]: those are not operations hooks see.
//!
//! ```
//! use std::sync::Arc;
//! use herald_core::hooks::{Before, ConnectionHook, HookFuture, HookRequest, Hooks, Operation, Status, After, Context, HookError};
//!
//! struct DenyGuests;
//! impl ConnectionHook for DenyGuests {
//!     fn before<'a>(&'a self, req: &'a HookRequest) -> HookFuture<'a, Before> {
//!         let out = if req.owner == "guest" { Before::Cancel("guests may not connect".into()) } else { Before::Proceed(None) };
//!         Box::pin(std::future::ready(out))
//!     }
//!     fn after<'a>(&'a self, _: &'a HookRequest, _: &'a Context, _: &'a Status) -> HookFuture<'a, After> {
//!         Box::pin(std::future::ready(After::Done))
//!     }
//! }
//!
//! let hooks = Hooks::default();
//! hooks.register(Arc::new(DenyGuests));
//! let req = HookRequest::new(Operation::Connect, "c1", "guest", "sse", "inbox");
//! let out = futures_lite_block_on(hooks.run(&req, || async { Ok::<_, String>(()) }));
//! assert!(matches!(out, Err(HookError::Cancelled { .. })));
//! # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! #     rt.block_on(f)
//! # }
//! ```

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::sync::{Arc, Mutex, lock};

/// What a hook is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A client opens a stream or session, or creates or resumes a subscription
    /// (`AddConnectNotify`).
    Connect,
    /// A subscription or session ends: unsubscribe, close, expiry or kick
    /// (`CancelConnectNotify`).
    Cancel,
}

impl Operation {
    /// `connect` or `cancel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Connect => "connect",
            Operation::Cancel => "cancel",
        }
    }
}

/// The operation a hook is called around.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRequest {
    /// Connect or cancel.
    pub operation: Operation,
    /// The connection or subscription id.
    pub connection: String,
    /// Who: the token's subject, the mailbox, the API key's name.
    pub owner: String,
    /// How: `sse`, `ws`, `poll`, `webhook`, `ews`, `mapi`, ….
    pub transport: String,
    /// What: the key or subtree subscribed to (empty when the operation has none).
    pub target: String,
    /// For a cancel: why (`unsubscribe`, `close`, `expiry`, `kick`).
    pub reason: Option<String>,
    /// For a cancel that cannot be refused (the client is already gone): a *before* hook's
    /// cancel is ignored (`NOTIFYCANCEL.fForce`).
    pub forced: bool,
}

impl HookRequest {
    /// A request with no reason, not forced.
    pub fn new(
        operation: Operation,
        connection: impl Into<String>,
        owner: impl Into<String>,
        transport: impl Into<String>,
        target: impl Into<String>,
    ) -> HookRequest {
        HookRequest {
            operation,
            connection: connection.into(),
            owner: owner.into(),
            transport: transport.into(),
            target: target.into(),
            reason: None,
            forced: false,
        }
    }

    /// A cancel for `reason`; `forced` when it cannot be refused.
    pub fn cancel(mut self, reason: impl Into<String>, forced: bool) -> HookRequest {
        self.operation = Operation::Cancel;
        self.reason = Some(reason.into());
        self.forced = forced;
        self
    }
}

/// What a hook keeps from its *before* call to its *after* call (`NOTIFYINFO.lpContext`).
pub type Context = Box<dyn Any + Send + Sync>;

/// A hook's answer to a *before* call.
pub enum Before {
    /// Go on; with a context, the hook gets an *after* call carrying it; without, none.
    Proceed(Option<Context>),
    /// Skip the operation (`WN_CANCEL`); the reason reaches the client.
    Cancel(String),
}

impl fmt::Debug for Before {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Before::Proceed(c) => write!(f, "Proceed(context: {})", c.is_some()),
            Before::Cancel(r) => write!(f, "Cancel({r:?})"),
        }
    }
}

/// The operation's result as an *after* call sees it (`NOTIFYINFO.dwOperationStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// It was done.
    Success,
    /// It failed, with the error's text.
    Failed(String),
    /// Another hook cancelled it in its *before* call, with that reason (sent to the hooks
    /// already called, so that they can release their context).
    Cancelled(String),
}

/// A hook's answer to an *after* call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Nothing more.
    Done,
    /// Try the failed operation again (`WN_RETRY`); ignored after a success.
    Retry,
}

/// A hook's boxed future.
pub type HookFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A plug-in called around connects and cancels.
pub trait ConnectionHook: Send + Sync {
    /// A name for logs and errors.
    fn name(&self) -> &str {
        "hook"
    }

    /// Before the operation: proceed (with or without a context) or cancel.
    fn before<'a>(&'a self, req: &'a HookRequest) -> HookFuture<'a, Before>;

    /// After the operation, for a hook that returned a context from `before`: the same
    /// context, and the result.
    fn after<'a>(
        &'a self,
        req: &'a HookRequest,
        context: &'a Context,
        status: &'a Status,
    ) -> HookFuture<'a, After>;
}

/// Why [`Hooks::run`] did not return the operation's value.
#[derive(Debug, PartialEq, Eq)]
pub enum HookError<E> {
    /// A *before* hook cancelled it (`WN_CANCEL`, 1223); the operation was not attempted.
    Cancelled {
        /// The hook's name.
        hook: String,
        /// Its reason.
        reason: String,
    },
    /// The operation failed (after any retries the hooks asked for).
    Failed(E),
}

impl<E: fmt::Display> fmt::Display for HookError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::Cancelled { hook, reason } => write!(f, "cancelled by {hook}: {reason}"),
            HookError::Failed(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for HookError<E> {}

/// The default cap on retries of one operation.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// `WN_CANCEL` (`ERROR_CANCELLED`, 1223): what the caller of an operation a *before* hook
/// cancelled is told (P37), where its protocol has a numeric status (MAPI's ErrorCode).
pub const WN_CANCEL: u32 = 1223;

/// The registered hooks, in registration order.
pub struct Hooks {
    list: Mutex<Vec<Arc<dyn ConnectionHook>>>,
    max_retries: u32,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks::with_max_retries(DEFAULT_MAX_RETRIES)
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("hooks", &lock(&self.list).len())
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl Hooks {
    /// No hooks; an operation is retried at most `max_retries` times.
    pub fn with_max_retries(max_retries: u32) -> Hooks {
        Hooks {
            list: Mutex::new(Vec::new()),
            max_retries,
        }
    }

    /// Adds a hook (there is no removal, as in the MPR).
    pub fn register(&self, hook: Arc<dyn ConnectionHook>) {
        lock(&self.list).push(hook);
    }

    /// Whether no hook is registered.
    pub fn is_empty(&self) -> bool {
        lock(&self.list).is_empty()
    }

    /// Runs `attempt` between the hooks' *before* and *after* calls, retrying it when an
    /// *after* call asks after a failure.
    pub async fn run<T, E, F, Fut>(
        &self,
        req: &HookRequest,
        mut attempt: F,
    ) -> Result<T, HookError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display,
    {
        let hooks: Vec<Arc<dyn ConnectionHook>> = lock(&self.list).clone();
        // Before: reverse registration order; remember who asked for an after call.
        let mut called: Vec<(Arc<dyn ConnectionHook>, Context)> = Vec::new();
        for hook in hooks.iter().rev() {
            match hook.before(req).await {
                Before::Proceed(Some(context)) => called.push((hook.clone(), context)),
                Before::Proceed(None) => {}
                Before::Cancel(reason) if req.forced => {
                    tracing::warn!(hook = hook.name(), %reason, connection = %req.connection,
                        "a hook tried to refuse a forced cancel; it goes ahead");
                }
                Before::Cancel(reason) => {
                    let status = Status::Cancelled(reason.clone());
                    for (h, context) in called.iter().rev() {
                        h.after(req, context, &status).await;
                    }
                    return Err(HookError::Cancelled {
                        hook: hook.name().to_owned(),
                        reason,
                    });
                }
            }
        }
        let mut retries = 0;
        loop {
            let result = attempt().await;
            let status = match &result {
                Ok(_) => Status::Success,
                Err(e) => Status::Failed(e.to_string()),
            };
            // After: the reverse of the before order.
            let mut retry = false;
            for (h, context) in called.iter().rev() {
                retry |= h.after(req, context, &status).await == After::Retry;
            }
            match result {
                Ok(v) => return Ok(v),
                Err(e) if !retry || retries >= self.max_retries => {
                    return Err(HookError::Failed(e));
                }
                Err(_) => retries += 1,
            }
        }
    }
}
