//! The server's own state, online or offline, with the offline-state semantics of the engine
//! ([`herald_core::offline`]). Offline, Herald keeps accepting and logging events but delivers
//! nothing: every follower waits at a closed gate, webhook and EWS pushes wait before their
//! next attempt. Going offline completes once the pushes already on the wire have finished
//! (or the drain timeout has passed); going online opens the gate, and every subscriber
//! resumes from its own position in the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use herald_core::offline::OfflineState;
use herald_core::{STATE_OFFLINE, STATE_ONLINE};
use herald_log::{Gate, GateSwitch};

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
    advisers: Arc<std::sync::Mutex<std::collections::HashMap<u32, Option<String>>>>,
}

impl ServerState {
    /// Starts online (or offline) with pushes drained for at most `drain_timeout` when going
    /// offline.
    pub fn new(start_offline: bool, drain_timeout: Duration) -> ServerState {
        let switch = Arc::new(GateSwitch::new(!start_offline));
        let in_flight = Arc::new(InFlight::default());
        let initial = if start_offline {
            STATE_OFFLINE
        } else {
            STATE_ONLINE
        };
        metrics::gauge!(crate::metrics::names::SERVER_ONLINE)
            .set(f64::from(u8::from(!start_offline)));
        let (sw, inf) = (switch.clone(), in_flight.clone());
        let engine = OfflineState::with_transition(initial, move |old, new| {
            let online = new == STATE_ONLINE;
            sw.set_open(online);
            metrics::gauge!(crate::metrics::names::SERVER_ONLINE).set(f64::from(u8::from(online)));
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

    /// Records who advised with `token`.
    pub fn advised_by(&self, token: u32, owner: Option<String>) {
        self.advisers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, owner);
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

/// `online` or `offline`.
pub fn state_name(state: u32) -> &'static str {
    if state == STATE_ONLINE {
        "online"
    } else {
        "offline"
    }
}
