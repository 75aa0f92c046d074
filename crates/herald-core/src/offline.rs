//! The offline-state API of Outlook (`IMAPIOffline`, `IMAPIOfflineMgr`, `IMAPIOfflineNotify`)
//! for any component that can go online and offline: clients *advise* with a token and a
//! state mask, and every transition tells each of them *start*, *change* and *done*, in that
//! order, echoing the token. A transition runs in the background unless the caller asks to
//! block; a second change while one is running is refused with *pending*.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use herald_core::offline::{self, AdviseInfo, OfflineState};
//! use herald_core::{ConnectionStateChange, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE};
//!
//! let state = OfflineState::new(STATE_ONLINE);
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let token = state.advise(0, AdviseInfo::notify(7, move |n: &ConnectionStateChange| {
//!     log.lock().unwrap().push((n.phase as u32, n.client_token, n.new_state));
//! }))?;
//! state.set_current_state(offline::FLAG_BLOCK, STATE_OFFLINE_MASK, STATE_OFFLINE)?;
//! assert_eq!(*seen.lock().unwrap(), [(1, 7, STATE_OFFLINE), (2, 7, STATE_OFFLINE), (3, 7, STATE_OFFLINE)]);
//! state.unadvise(0, token);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::event::{
    ConnectionStateChange, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE, StateChangePhase,
};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, Weak, lock, thread};

/// `MAPIOFFLINE_STATE_ALL`: every state bit a client may advise on.
pub const STATE_ALL: u32 = 0x003f_037f;
/// Checks an advise's state mask: within [`STATE_ALL`] and covering the online/offline bits,
/// the only part of a state that changes (`E_INVALIDARG` otherwise). Shared by the server's
/// advise and by subscribers advising on a connection's state.
pub fn check_state_mask(mask: u32) -> Result<(), AdviseError> {
    if mask & !STATE_ALL != 0 || mask & STATE_OFFLINE_MASK != STATE_OFFLINE_MASK {
        return Err(AdviseError::InvalidArg(
            "the state mask must be within 0x003f037f and include the online/offline bits 0x3",
        ));
    }
    Ok(())
}

/// `MAPIOFFLINE_ADVISE_TYPE_STATECHANGE`: the only advise type.
pub const ADVISE_TYPE_STATECHANGE: u32 = 1;
/// `MAPIOFFLINE_CALLBACK_TYPE_NOTIFY`: the only callback type.
pub const CALLBACK_TYPE_NOTIFY: u32 = 0;
/// `MAPIOFFLINE_CAPABILITY_OFFLINE`.
pub const CAPABILITY_OFFLINE: u32 = 0x1;
/// `MAPIOFFLINE_CAPABILITY_ONLINE`.
pub const CAPABILITY_ONLINE: u32 = 0x2;
/// `MAPIOFFLINE_FLAG_BLOCK`: `set_current_state` returns only when the transition is done.
pub const FLAG_BLOCK: u32 = 0x0000_2000;
/// `MAPIOFFLINE_FLAG_DEFAULT` (and `MAPIOFFLINE_ADVISE_DEFAULT`, `_UNADVISE_DEFAULT`).
pub const FLAG_DEFAULT: u32 = 0;
/// `E_PENDING`: a transition is already running.
pub const E_PENDING: u32 = 0x8000_000A;
/// `E_INVALIDARG`.
pub const E_INVALIDARG: u32 = 0x8007_0057;
/// `E_NOINTERFACE`: no usable callback.
pub const E_NOINTERFACE: u32 = 0x8000_4002;

/// `IMAPIOfflineNotify`: receives the notifications of the transitions it advised on. It runs
/// on the thread doing the transition and should return quickly.
pub trait StateSink: Send + Sync {
    /// One notification: `START`, `STATECHANGE` or `DONE` of one transition.
    fn notify(&self, n: &ConnectionStateChange);
}

impl<F: Fn(&ConnectionStateChange) + Send + Sync> StateSink for F {
    fn notify(&self, n: &ConnectionStateChange) {
        self(n)
    }
}

/// `MAPIOFFLINE_ADVISEINFO`.
#[derive(Clone)]
pub struct AdviseInfo {
    /// Echoed in every notification.
    pub client_token: u32,
    /// Must be [`CALLBACK_TYPE_NOTIFY`].
    pub callback_type: u32,
    /// The callback; `None` is refused with `E_NOINTERFACE`.
    pub callback: Option<Arc<dyn StateSink>>,
    /// Must be [`ADVISE_TYPE_STATECHANGE`].
    pub advise_types: u32,
    /// The state bits of interest: within [`STATE_ALL`] and including the online/offline bits.
    pub state_mask: u32,
}

impl AdviseInfo {
    /// The usual advise: state changes of every kind, notified to `sink` with `client_token`.
    pub fn notify(client_token: u32, sink: impl StateSink + 'static) -> AdviseInfo {
        AdviseInfo {
            client_token,
            callback_type: CALLBACK_TYPE_NOTIFY,
            callback: Some(Arc::new(sink)),
            advise_types: ADVISE_TYPE_STATECHANGE,
            state_mask: STATE_ALL,
        }
    }
}

impl std::fmt::Debug for AdviseInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdviseInfo")
            .field("client_token", &self.client_token)
            .field("callback_type", &self.callback_type)
            .field("callback", &self.callback.is_some())
            .field("advise_types", &self.advise_types)
            .field("state_mask", &format_args!("{:#x}", self.state_mask))
            .finish()
    }
}

/// Why `advise` refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdviseError {
    /// The callback type is not `NOTIFY`, or there is no callback (`E_NOINTERFACE`).
    #[error("no notify callback: the callback type must be NOTIFY (0) with a callback")]
    NoInterface,
    /// Another field is out of range (`E_INVALIDARG`).
    #[error("invalid advise: {0}")]
    InvalidArg(&'static str),
}

impl AdviseError {
    /// The HRESULT Outlook returns for it.
    pub fn hresult(&self) -> u32 {
        match self {
            AdviseError::NoInterface => E_NOINTERFACE,
            AdviseError::InvalidArg(_) => E_INVALIDARG,
        }
    }
}

/// Why `set_current_state` refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetStateError {
    /// A transition is running (`E_PENDING`); try again when it is done.
    #[error("a state transition is already in progress")]
    Pending,
    /// The mask, state or flags are not allowed (`E_INVALIDARG`).
    #[error("invalid state change: {0}")]
    InvalidArg(&'static str),
}

impl SetStateError {
    /// The HRESULT Outlook returns for it.
    pub fn hresult(&self) -> u32 {
        match self {
            SetStateError::Pending => E_PENDING,
            SetStateError::InvalidArg(_) => E_INVALIDARG,
        }
    }
}

/// The owner's side of a transition: what actually goes offline or online. It is called
/// after the `STATECHANGE` notifications and before `DONE`, on the transition's thread, and
/// may take its time (draining work in flight); the transition is pending until it returns.
pub type Transition = dyn Fn(u32, u32) + Send + Sync;

struct Adviser {
    token: u32,
    client_token: u32,
    sink: Arc<dyn StateSink>,
    live: AtomicBool,
}

struct State {
    current: u32,
    transitioning: bool,
    next_token: u32,
    advisers: Vec<Arc<Adviser>>,
}

struct Inner {
    state: Mutex<State>,
    transition: Option<Arc<Transition>>,
}

/// An online/offline state with advise, unadvise and transitions; cheap to clone.
#[derive(Clone)]
pub struct OfflineState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OfflineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.inner.state);
        f.debug_struct("OfflineState")
            .field("current", &s.current)
            .field("transitioning", &s.transitioning)
            .field("advisers", &s.advisers.len())
            .finish()
    }
}

impl OfflineState {
    /// A state starting at `initial` ([`STATE_ONLINE`] or [`STATE_OFFLINE`]) whose
    /// transitions only notify.
    pub fn new(initial: u32) -> OfflineState {
        Self::build(initial, None)
    }

    /// A state whose transitions also run `transition(old, new)`.
    pub fn with_transition(
        initial: u32,
        transition: impl Fn(u32, u32) + Send + Sync + 'static,
    ) -> OfflineState {
        Self::build(initial, Some(Arc::new(transition)))
    }

    fn build(initial: u32, transition: Option<Arc<Transition>>) -> OfflineState {
        let current = if initial == STATE_OFFLINE {
            STATE_OFFLINE
        } else {
            STATE_ONLINE
        };
        OfflineState {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    current,
                    transitioning: false,
                    next_token: 1,
                    advisers: Vec::new(),
                }),
                transition,
            }),
        }
    }

    /// `GetCapabilities`: this state can go both online and offline.
    pub fn capabilities(&self) -> u32 {
        CAPABILITY_OFFLINE | CAPABILITY_ONLINE
    }

    /// `GetCurrentState`: [`STATE_ONLINE`] or [`STATE_OFFLINE`] (the new state as soon as a
    /// transition has passed its `STATECHANGE`).
    pub fn current_state(&self) -> u32 {
        lock(&self.inner.state).current
    }

    /// Whether a transition is running (a change now would be refused with `Pending`).
    pub fn is_transitioning(&self) -> bool {
        lock(&self.inner.state).transitioning
    }

    /// How many clients are advised.
    pub fn advised(&self) -> usize {
        lock(&self.inner.state).advisers.len()
    }

    /// `IMAPIOfflineMgr::Advise`: registers a callback for state changes; returns its advise
    /// token (nonzero, unique while advised).
    pub fn advise(&self, flags: u32, info: AdviseInfo) -> Result<u32, AdviseError> {
        if info.callback_type != CALLBACK_TYPE_NOTIFY {
            return Err(AdviseError::NoInterface);
        }
        let Some(sink) = info.callback else {
            return Err(AdviseError::NoInterface);
        };
        if flags != FLAG_DEFAULT {
            return Err(AdviseError::InvalidArg("flags must be 0"));
        }
        if info.advise_types != ADVISE_TYPE_STATECHANGE {
            return Err(AdviseError::InvalidArg(
                "advise types must be STATECHANGE (1)",
            ));
        }
        check_state_mask(info.state_mask)?;
        let mut s = lock(&self.inner.state);
        let mut token = s.next_token;
        while token == 0 || s.advisers.iter().any(|a| a.token == token) {
            token = token.wrapping_add(1);
        }
        s.next_token = token.wrapping_add(1);
        s.advisers.push(Arc::new(Adviser {
            token,
            client_token: info.client_token,
            sink,
            live: AtomicBool::new(true),
        }));
        Ok(token)
    }

    /// `IMAPIOfflineMgr::Unadvise`: always succeeds. The callback is released at once (a
    /// running transition does not keep it), and at most one notification that another
    /// thread was already delivering may still reach it after this returns.
    pub fn unadvise(&self, _flags: u32, token: u32) {
        let removed = {
            let mut s = lock(&self.inner.state);
            let at = s.advisers.iter().position(|a| a.token == token);
            at.map(|i| s.advisers.remove(i))
        };
        if let Some(a) = removed {
            a.live.store(false, Ordering::SeqCst);
        }
    }

    /// `IMAPIOffline::SetCurrentState`: starts a transition to `state` (the mask must be
    /// [`STATE_OFFLINE_MASK`]). Without [`FLAG_BLOCK`] it returns at once and the transition
    /// runs on its own thread; with it, it returns when `DONE` has been sent. Setting the
    /// current state again is a no-op.
    pub fn set_current_state(
        &self,
        flags: u32,
        mask: u32,
        state: u32,
    ) -> Result<(), SetStateError> {
        if flags & !FLAG_BLOCK != 0 {
            return Err(SetStateError::InvalidArg(
                "flags must be DEFAULT (0) or BLOCK (0x2000)",
            ));
        }
        if mask != STATE_OFFLINE_MASK {
            return Err(SetStateError::InvalidArg(
                "the mask must be 0x3 (online/offline)",
            ));
        }
        if state != STATE_ONLINE && state != STATE_OFFLINE {
            return Err(SetStateError::InvalidArg(
                "the state must be ONLINE (2) or OFFLINE (1)",
            ));
        }
        let old = {
            let mut s = lock(&self.inner.state);
            if s.transitioning {
                return Err(SetStateError::Pending);
            }
            if s.current == state {
                return Ok(());
            }
            s.transitioning = true;
            s.current
        };
        let inner = self.inner.clone();
        if flags & FLAG_BLOCK != 0 {
            run_transition(&inner, old, state);
        } else {
            thread::spawn(move || run_transition(&inner, old, state));
        }
        Ok(())
    }
}

fn run_transition(inner: &Inner, old: u32, new: u32) {
    // Weak: unadvising during the transition releases the callback at once.
    let advisers: Vec<Weak<Adviser>> = lock(&inner.state)
        .advisers
        .iter()
        .map(Arc::downgrade)
        .collect();
    let tell = |phase: StateChangePhase| {
        for a in &advisers {
            let Some(a) = a.upgrade() else {
                continue;
            };
            if !a.live.load(Ordering::SeqCst) {
                continue;
            }
            let n = ConnectionStateChange {
                phase,
                client_token: a.client_token,
                changed_mask: STATE_OFFLINE_MASK,
                old_state: old,
                new_state: new,
            };
            if catch_unwind(AssertUnwindSafe(|| a.sink.notify(&n))).is_err() {
                tracing::error!(token = a.token, "an offline-state callback panicked");
            }
        }
    };
    tell(StateChangePhase::Start);
    lock(&inner.state).current = new;
    tell(StateChangePhase::Change);
    if let Some(t) = &inner.transition {
        if catch_unwind(AssertUnwindSafe(|| t(old, new))).is_err() {
            tracing::error!(old, new, "the state transition panicked");
        }
    }
    tell(StateChangePhase::Done);
    lock(&inner.state).transitioning = false;
}
