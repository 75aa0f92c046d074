//! The server's own state, online or offline, with the offline-state semantics of the engine
//! ([`herald_core::offline`]), and the one gate every delivery passes. Offline, Herald keeps
//! accepting and logging events but delivers nothing: feeds hold their next batch, pages stop
//! at what was already seen, pushes wait before their next attempt, nudges stop. Going offline
//! completes once the pushes already on the wire have finished (or the drain timeout has
//! passed); going online opens the gate, and every subscriber resumes from its own position.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use herald_core::offline::{AdviseError, AdviseInfo, OfflineState};
use herald_core::{ConnectionStateChange, STATE_OFFLINE, STATE_ONLINE};
use herald_log::{Gate, GateSwitch};
use tokio::sync::mpsc;

use crate::metrics::names;

/// Pushes on the wire now.
#[derive(Debug, Default)]
struct InFlight(AtomicUsize);

/// The server's state and the gate it drives; cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerState {
    engine: OfflineState,
    switch: Arc<GateSwitch>,
    in_flight: Arc<InFlight>,
    /// Who advised with each advise token (`None`: an API key or open access).
    advisers: Arc<Mutex<HashMap<u32, Option<String>>>>,
}

impl ServerState {
    /// Starts online (or offline); going offline waits at most `drain_timeout` for the pushes
    /// on the wire.
    pub fn new(start_offline: bool, drain_timeout: Duration) -> ServerState {
        let switch = Arc::new(GateSwitch::new(!start_offline));
        let in_flight = Arc::new(InFlight::default());
        let initial = if start_offline {
            STATE_OFFLINE
        } else {
            STATE_ONLINE
        };
        metrics::gauge!(names::SERVER_ONLINE).set(f64::from(u8::from(!start_offline)));
        let (sw, inf) = (switch.clone(), in_flight.clone());
        let engine = OfflineState::with_transition(initial, move |old, new| {
            let online = new == STATE_ONLINE;
            sw.set_open(online);
            metrics::gauge!(names::SERVER_ONLINE).set(f64::from(u8::from(online)));
            tracing::info!(
                old = state_name(old),
                new = state_name(new),
                "server state changing"
            );
            if !online {
                let started = Instant::now();
                while inf.0.load(Ordering::SeqCst) > 0 && started.elapsed() < drain_timeout {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let left = inf.0.load(Ordering::SeqCst);
                if left > 0 {
                    tracing::warn!(
                        left,
                        "pushes still in flight after the drain timeout; offline anyway"
                    );
                }
            }
        });
        ServerState {
            engine,
            switch,
            in_flight,
            advisers: Arc::default(),
        }
    }

    /// The engine's state object: advise, unadvise, set and get the state.
    pub fn engine(&self) -> &OfflineState {
        &self.engine
    }

    /// Advises on state changes for a client that reads them from a stream: the
    /// notifications queue up to `capacity`; past that the stream ends with
    /// [`Advice::Overflow`] (never a silent drop). Dropping the stream unadvises.
    pub fn advise(
        &self,
        owner: Option<String>,
        client_token: u32,
        callback_type: u32,
        advise_types: u32,
        state_mask: u32,
        capacity: usize,
    ) -> Result<AdviseStream, AdviseError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        let info = AdviseInfo {
            client_token,
            callback_type,
            callback: Some(Arc::new(move |n: &ConnectionStateChange| {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                if tx.try_send(n.clone()).is_err() {
                    tracing::warn!(
                        "an advise client is not reading: its stream ends with overflow"
                    );
                    flag.store(true, Ordering::Release);
                }
            })),
            advise_types,
            state_mask,
        };
        let token = self.engine.advise(0, info)?;
        self.advisers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, owner);
        Ok(AdviseStream {
            token,
            rx,
            overflowed,
            ended: false,
            state: self.clone(),
        })
    }

    /// Unadvises `token` if `may(owner)` says the caller may; the record goes either way when
    /// the token is unadvised.
    pub fn unadvise_if(&self, token: u32, may: impl FnOnce(Option<&str>) -> bool) {
        let mut advisers = self.advisers.lock().unwrap_or_else(|e| e.into_inner());
        let allowed = match advisers.get(&token) {
            Some(owner) => may(owner.as_deref()),
            None => false,
        };
        if allowed {
            advisers.remove(&token);
            drop(advisers);
            self.engine.unadvise(0, token);
        }
    }

    /// A gate that is open while deliveries may go.
    pub fn gate(&self) -> Gate {
        self.switch.gate()
    }

    /// Whether deliveries may go now.
    pub fn delivering(&self) -> bool {
        self.switch.is_open()
    }

    /// Waits until deliveries may go, then counts a push on the wire until the guard drops.
    /// Going offline waits for the guards taken before it closed the gate.
    pub async fn push(&self) -> PushGuard {
        loop {
            self.in_flight.0.fetch_add(1, Ordering::SeqCst);
            let guard = PushGuard(self.in_flight.clone());
            if self.switch.is_open() {
                return guard;
            }
            drop(guard);
            self.gate().opened().await;
        }
    }
}

/// One push on the wire.
#[derive(Debug)]
pub struct PushGuard(Arc<InFlight>);

impl Drop for PushGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What an advise stream yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Advice {
    /// A start, change or done notification, with the client's token.
    Notification(ConnectionStateChange),
    /// The client did not read and its queue filled: it may have missed notifications. The
    /// stream ends after this; the client reads the state again and re-advises.
    Overflow,
}

/// The notifications of one advise, in order; unadvises when dropped.
#[derive(Debug)]
pub struct AdviseStream {
    token: u32,
    rx: mpsc::Receiver<ConnectionStateChange>,
    overflowed: Arc<AtomicBool>,
    ended: bool,
    state: ServerState,
}

impl AdviseStream {
    /// The advise token (for unadvise).
    pub fn token(&self) -> u32 {
        self.token
    }
}

impl futures_util::Stream for AdviseStream {
    type Item = Advice;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Advice>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // What was queued before the overflow still goes out first, in order.
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(n)) => Poll::Ready(Some(Advice::Notification(n))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending if self.overflowed.load(Ordering::Acquire) => {
                self.ended = true;
                Poll::Ready(Some(Advice::Overflow))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for AdviseStream {
    fn drop(&mut self) {
        self.state.unadvise_if(self.token, |_| true);
    }
}

/// `online` or `offline`.
pub fn state_name(state: u32) -> &'static str {
    if state == STATE_ONLINE {
        "online"
    } else {
        "offline"
    }
}
