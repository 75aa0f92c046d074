//! The push driver: one message to one endpoint Herald calls (a webhook, an EWS push
//! client), attempted until it is delivered, the endpoint is gone, the retry policy gives up,
//! or the subscription stops. Every attempt waits at the server's gate and counts as in
//! flight while on the wire; retries follow a [`Backoff`]; the endpoint's presence and its
//! delivery status follow the attempts.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::Timestamp;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Backoff;
use crate::metrics::names;
use crate::state::ServerState;

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt<R> {
    /// The endpoint took it; `R` is what it answered.
    Delivered(R),
    /// The endpoint says it is gone for good (HTTP 410): no retry.
    Gone(String),
    /// It failed; retry (no sooner than `retry_after`, if the endpoint said so).
    Failed {
        /// What happened.
        error: String,
        /// The endpoint's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

/// When the driver stops retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// Once deliveries have been failing this long (webhooks: then paused).
    FailingFor(Duration),
    /// Once the next wait would exceed the back-off's cap (EWS push: retries stay within
    /// the subscription's status frequency, then it ends).
    BeyondCap,
}

/// A retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The waits between attempts.
    pub backoff: Backoff,
    /// When to stop.
    pub give_up: GiveUp,
    /// Whether an endpoint's `Retry-After` sets the wait (up to when it would give up).
    pub honour_retry_after: bool,
    /// Failed attempts in a row after which the endpoint counts as offline.
    pub offline_after: u32,
}

impl RetryPolicy {
    /// The wait before retry `attempt` (1 for the first), or `None` to give up.
    pub fn wait(
        &self,
        attempt: u32,
        failing_for: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        match self.give_up {
            GiveUp::FailingFor(limit) => {
                if failing_for >= limit {
                    return None;
                }
                Some(match retry_after.filter(|_| self.honour_retry_after) {
                    Some(r) => r.min(limit),
                    None => self.backoff.delay(attempt, unit),
                })
            }
            GiveUp::BeyondCap => {
                if self
                    .backoff
                    .base
                    .checked_mul(1 << attempt.saturating_sub(1).min(31))
                    .is_none_or(|full| full > self.backoff.cap)
                {
                    return None;
                }
                let wait = self.backoff.delay(attempt, unit);
                Some(match retry_after.filter(|_| self.honour_retry_after) {
                    Some(r) => r.max(wait).min(self.backoff.cap),
                    None => wait,
                })
            }
        }
    }
}

/// Where an endpoint's deliveries stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PushStatus {
    /// Checking that the endpoint is the subscriber's (webhooks echo a challenge).
    Verifying,
    /// Delivering.
    #[default]
    Active,
    /// The last attempt failed; another is due.
    Retrying,
    /// Failing for too long: no attempts until enabled again.
    Paused,
    /// The endpoint said it is gone.
    Disabled,
}

impl PushStatus {
    /// `verifying`, `active`, `retrying`, `paused`, `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            PushStatus::Verifying => "verifying",
            PushStatus::Active => "active",
            PushStatus::Retrying => "retrying",
            PushStatus::Paused => "paused",
            PushStatus::Disabled => "disabled",
        }
    }
}

/// An endpoint's delivery state, as operators see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushState {
    /// Where it stands.
    pub status: PushStatus,
    /// When the last delivery succeeded, microseconds since the Unix epoch.
    pub last_success_at: Option<u64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Attempts made for the message in progress.
    pub attempts: u32,
    /// When the next attempt is due, microseconds since the Unix epoch.
    pub next_attempt_at: Option<u64>,
    /// Since when deliveries have been failing, microseconds since the Unix epoch.
    pub failing_since: Option<u64>,
}

/// How many attempts an endpoint's history keeps (the oldest go first).
pub const ATTEMPT_HISTORY: usize = 32;

/// One delivery attempt, as operators see it in an endpoint's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When it started, microseconds since the Unix epoch.
    pub at: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `delivered`, `failed` or `gone`.
    pub outcome: &'static str,
    /// Why it failed.
    pub error: Option<String>,
}

/// How a push ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed<R> {
    /// Delivered, with the endpoint's answer.
    Delivered(R),
    /// The endpoint is gone (HTTP 410).
    Gone(String),
    /// The policy gave up; the last error.
    GaveUp(String),
    /// The subscription stopped first.
    Stopped,
}

/// One endpoint's pushes: its policy, its state, its presence. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Pusher {
    server: ServerState,
    transport: &'static str,
    policy: RetryPolicy,
    state: Arc<Mutex<Tracked>>,
}

/// The state, and since when it has been failing on the runtime's clock (which tests can
/// pause; the wall-clock time in the state is for people).
#[derive(Debug, Default)]
struct Tracked {
    view: PushState,
    failing_at: Option<Instant>,
    /// The last [`ATTEMPT_HISTORY`] attempts, oldest first.
    history: std::collections::VecDeque<AttemptRecord>,
}

impl Tracked {
    fn record(&mut self, r: AttemptRecord) {
        if self.history.len() == ATTEMPT_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(r);
    }
}

impl Pusher {
    /// A pusher for one endpoint over `transport` (its metrics label).
    pub fn new(server: ServerState, transport: &'static str, policy: RetryPolicy) -> Pusher {
        Pusher {
            server,
            transport,
            policy,
            state: Arc::default(),
        }
    }

    /// The delivery state now (a copy).
    pub fn state(&self) -> PushState {
        self.tracked().view.clone()
    }

    /// The last attempts, newest first (at most [`ATTEMPT_HISTORY`]).
    pub fn history(&self) -> Vec<AttemptRecord> {
        self.tracked().history.iter().rev().cloned().collect()
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut PushState)) {
        f(&mut self.tracked().view);
    }

    /// Sets the status (verifying, paused, disabled: decisions of the transport).
    pub fn set_status(&self, status: PushStatus, error: Option<String>) {
        self.update(|s| {
            s.status = status;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Starts afresh (an operator enabled it again): active, no failures counted.
    pub fn reset(&self) {
        let mut t = self.tracked();
        t.failing_at = None;
        t.view.status = PushStatus::Active;
        t.view.attempts = 0;
        t.view.failing_since = None;
        t.view.next_attempt_at = None;
    }

    /// Attempts `send` until it is delivered, gone, given up, or `stop` is cancelled. Each
    /// attempt waits while the server is offline and is in flight until it returns; the
    /// waits between attempts follow the policy; `presence` is told the endpoint is online at
    /// a success and offline after `offline_after` failures in a row.
    pub async fn push<R, F, Fut>(
        &self,
        presence: impl Fn(bool),
        stop: &CancellationToken,
        mut send: F,
    ) -> Pushed<R>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<R>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.update(|s| {
                s.attempts = attempt;
                s.next_attempt_at = None;
            });
            let guard = tokio::select! {
                g = self.server.push() => g,
                () = stop.cancelled() => return Pushed::Stopped,
            };
            metrics::counter!(names::PUSH_ATTEMPTS, "transport" => self.transport).increment(1);
            let started = (Timestamp::now().0, Instant::now());
            let outcome = tokio::select! {
                o = send() => o,
                () = stop.cancelled() => return Pushed::Stopped,
            };
            drop(guard);
            let (outcome_name, error) = match &outcome {
                Attempt::Delivered(_) => ("delivered", None),
                Attempt::Gone(why) => ("gone", Some(why.clone())),
                Attempt::Failed { error, .. } => ("failed", Some(error.clone())),
            };
            self.tracked().record(AttemptRecord {
                at: started.0,
                duration_ms: started.1.elapsed().as_millis() as u64,
                outcome: outcome_name,
                error,
            });
            let (error, retry_after) = match outcome {
                Attempt::Delivered(r) => {
                    presence(true);
                    let mut t = self.tracked();
                    t.failing_at = None;
                    let s = &mut t.view;
                    if s.status != PushStatus::Verifying {
                        s.status = PushStatus::Active;
                    }
                    s.last_success_at = Some(Timestamp::now().0);
                    s.last_error = None;
                    s.attempts = 0;
                    s.failing_since = None;
                    drop(t);
                    return Pushed::Delivered(r);
                }
                Attempt::Gone(why) => {
                    metrics::counter!(names::PUSH_FAILURES, "transport" => self.transport)
                        .increment(1);
                    presence(false);
                    self.update(|s| {
                        s.status = PushStatus::Disabled;
                        s.last_error = Some(why.clone());
                    });
                    return Pushed::Gone(why);
                }
                Attempt::Failed { error, retry_after } => (error, retry_after),
            };
            metrics::counter!(names::PUSH_FAILURES, "transport" => self.transport).increment(1);
            // A single failure that the next retry fixes is not worth telling.
            if attempt >= self.policy.offline_after {
                presence(false);
            }
            let now = Timestamp::now().0;
            let (failing_since, failing_at) = {
                let mut t = self.tracked();
                let at = *t.failing_at.get_or_insert_with(Instant::now);
                (t.view.failing_since.unwrap_or(now), at)
            };
            let failing_for = failing_at.elapsed();
            let unit = rand::random::<f64>();
            let Some(wait) = self.policy.wait(attempt, failing_for, retry_after, unit) else {
                self.update(|s| {
                    s.status = PushStatus::Paused;
                    s.last_error = Some(error.clone());
                    s.failing_since = Some(failing_since);
                });
                return Pushed::GaveUp(error);
            };
            self.update(|s| {
                if s.status != PushStatus::Verifying {
                    s.status = PushStatus::Retrying;
                }
                s.last_error = Some(error);
                s.failing_since = Some(failing_since);
                s.next_attempt_at = Some(now + wait.as_micros() as u64);
            });
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return Pushed::Stopped,
            }
        }
    }
}
