//! The asynchronous wait of MS-OXCRPC's EcDoAsyncWaitEx, shared by every transport that tells
//! a client "notifications are pending" instead of carrying them (MAPI/HTTP NotificationWait,
//! UDP push): one outstanding wait per session, a second is rejected, a wait completes at once
//! when something is already pending, and closing completes every wait with `Exiting`.
//! Timeouts are the caller's (wrap [`Wait`] in the runtime's timeout).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::sync::{Mutex, lock};

/// How a wait completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Notifications are pending: the client should fetch them.
    Pending,
    /// The session or server is closing (EcDoAsyncWaitEx's ecExiting).
    Exiting,
}

/// A second wait while one is outstanding (EcDoAsyncWaitEx's ecRejected).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("another wait is outstanding on this session")]
pub struct WaitRejected;

#[derive(Default)]
struct State {
    pending: bool,
    outstanding: bool,
    closed: bool,
    waker: Option<Waker>,
}

/// A session's "something is pending" flag with at most one waiter.
#[derive(Default)]
pub struct AsyncWait {
    state: Mutex<State>,
}

impl AsyncWait {
    /// A new flag, nothing pending.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Marks notifications pending and completes the outstanding wait, if any.
    pub fn set_pending(&self) {
        self.update_and_wake(|s| s.pending = true);
    }

    /// Applies `change` and wakes the outstanding wait (outside the lock).
    fn update_and_wake(&self, change: impl FnOnce(&mut State)) {
        let waker = {
            let mut s = lock(&self.state);
            change(&mut s);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Marks everything fetched.
    pub fn clear_pending(&self) {
        lock(&self.state).pending = false;
    }

    /// Whether notifications are pending.
    pub fn is_pending(&self) -> bool {
        lock(&self.state).pending
    }

    /// Whether a wait is outstanding.
    pub fn is_waiting(&self) -> bool {
        lock(&self.state).outstanding
    }

    /// Completes the outstanding wait (and every later one) with [`WaitOutcome::Exiting`].
    pub fn close(&self) {
        self.update_and_wake(|s| s.closed = true);
    }

    /// Starts the session's one wait; it resolves when something is pending (at once if it
    /// already is) or the flag is closed. Dropping it ends the wait.
    pub fn begin(self: &Arc<Self>) -> Result<Wait, WaitRejected> {
        let mut s = lock(&self.state);
        if s.outstanding {
            return Err(WaitRejected);
        }
        s.outstanding = true;
        Ok(Wait {
            owner: self.clone(),
        })
    }
}

/// The outstanding wait of an [`AsyncWait`].
pub struct Wait {
    owner: Arc<AsyncWait>,
}

impl Future for Wait {
    type Output = WaitOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WaitOutcome> {
        let mut s = lock(&self.owner.state);
        if s.closed {
            Poll::Ready(WaitOutcome::Exiting)
        } else if s.pending {
            Poll::Ready(WaitOutcome::Pending)
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut s = lock(&self.owner.state);
        s.outstanding = false;
        s.waker = None;
    }
}

#[cfg(all(test, not(shuttle)))]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn poll(w: &mut Wait, flag: &Arc<Flag>) -> Poll<WaitOutcome> {
        let waker = Waker::from(flag.clone());
        Pin::new(w).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn one_wait_at_a_time_completing_when_pending() {
        let aw = AsyncWait::new();
        let flag = Arc::new(Flag(Default::default()));
        let mut w = aw.begin().unwrap();
        assert!(aw.begin().is_err(), "a second wait is rejected");
        assert_eq!(poll(&mut w, &flag), Poll::Pending);
        aw.set_pending();
        assert!(
            flag.0.load(std::sync::atomic::Ordering::SeqCst),
            "the waiter was woken"
        );
        assert_eq!(poll(&mut w, &flag), Poll::Ready(WaitOutcome::Pending));
        drop(w);
        // Already pending: completes at once.
        let mut w = aw.begin().unwrap();
        assert_eq!(poll(&mut w, &flag), Poll::Ready(WaitOutcome::Pending));
        drop(w);
        aw.clear_pending();
        let mut w = aw.begin().unwrap();
        assert_eq!(poll(&mut w, &flag), Poll::Pending);
        aw.close();
        assert_eq!(poll(&mut w, &flag), Poll::Ready(WaitOutcome::Exiting));
    }
}
