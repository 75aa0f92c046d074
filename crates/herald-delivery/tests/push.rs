//! The push driver on tokio's paused clock: the back-off between attempts, Retry-After,
//! giving up, gone endpoints, presence, stopping, and the server's gate. Jitter is random, so
//! every wait is checked against its whole range.

mod common;

use std::future::Ready;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_delivery::{
    Attempt, Backoff, GiveUp, PushState, PushStatus, Pushed, Pusher, RetryPolicy, ServerState,
};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use common::{online_state, set_online};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Webhooks: 5 s doubling to an hour, paused after failing for a day, Retry-After honoured,
/// offline from the third failure in a row.
fn webhook() -> RetryPolicy {
    RetryPolicy {
        backoff: Backoff {
            base: Duration::from_secs(5),
            cap: HOUR,
        },
        give_up: GiveUp::FailingFor(DAY),
        honour_retry_after: true,
        offline_after: 3,
    }
}

/// EWS push: 250 ms doubling to 2 s, ending once the next wait would pass the cap, offline at
/// the first failure.
fn ews() -> RetryPolicy {
    RetryPolicy {
        backoff: Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(2),
        },
        give_up: GiveUp::BeyondCap,
        honour_retry_after: false,
        offline_after: 1,
    }
}

fn failed(retry_after: Option<Duration>) -> Attempt<usize> {
    Attempt::Failed {
        error: "503 Service Unavailable".into(),
        retry_after,
    }
}

/// A scripted endpoint: attempt `n` (1 for the first) gets `answer(n)`; the time of every
/// attempt is recorded.
struct Endpoint {
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Endpoint {
    fn new() -> Endpoint {
        Endpoint {
            attempts: Arc::default(),
        }
    }

    fn send(
        &self,
        answer: impl Fn(usize) -> Attempt<usize> + Send + 'static,
    ) -> impl FnMut() -> Ready<Attempt<usize>> + Send + 'static {
        let attempts = self.attempts.clone();
        move || {
            let mut a = attempts.lock().unwrap();
            a.push(Instant::now());
            std::future::ready(answer(a.len()))
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    /// The waits between consecutive attempts.
    fn gaps(&self) -> Vec<Duration> {
        self.times().windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// A presence callback recording what it was told after how many attempts.
    fn presence(&self) -> (Told, impl Fn(bool) + Send + 'static) {
        let told = Arc::new(Mutex::new(Vec::new()));
        let (log, attempts) = (told.clone(), self.attempts.clone());
        let callback = move |online| {
            let n = attempts.lock().unwrap().len();
            log.lock().unwrap().push((n, online));
        };
        (told, callback)
    }
}

/// What a presence callback was told: (attempts made so far, online).
type Told = Arc<Mutex<Vec<(usize, bool)>>>;

/// Asserts that retry `n`'s wait `gap` lies between half and all of `backoff`'s `base·2^(n-1)`
/// (capped).
fn assert_within_backoff(backoff: Backoff, n: u32, gap: Duration) {
    let full = backoff.base.saturating_mul(1 << (n - 1)).min(backoff.cap);
    assert!(
        gap >= full / 2 && gap <= full,
        "retry {n} waited {gap:?}, not within [{:?}, {full:?}]",
        full / 2
    );
}

#[tokio::test(start_paused = true)]
async fn webhook_retries_wait_between_half_and_all_of_a_doubling_backoff() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    // Twelve failures: the waits double from 5 s and reach the hour's cap at the eleventh.
    // Watch the state from inside the endpoint, as an operator would between attempts.
    let seen: Arc<Mutex<Vec<PushState>>> = Arc::default();
    let (p, s) = (pusher.clone(), seen.clone());
    let mut send = ep.send(|n| {
        if n <= 12 {
            failed(None)
        } else {
            Attempt::Delivered(n)
        }
    });
    let send = move || {
        s.lock().unwrap().push(p.state());
        send()
    };
    let out = pusher.push(|_| {}, &CancellationToken::new(), send).await;
    assert_eq!(out, Pushed::Delivered(13));
    let gaps = ep.gaps();
    assert_eq!(gaps.len(), 12);
    for (i, gap) in gaps.iter().enumerate() {
        assert_within_backoff(webhook().backoff, i as u32 + 1, *gap);
    }
    let seen = seen.lock().unwrap();
    let retrying = &seen[3];
    assert_eq!(retrying.status, PushStatus::Retrying);
    assert_eq!(retrying.attempts, 4);
    assert!(retrying.last_error.is_some() && retrying.failing_since.is_some());
    let done = pusher.state();
    assert_eq!(done.status, PushStatus::Active);
    assert_eq!((done.attempts, done.failing_since), (0, None));
    assert!(done.last_error.is_none() && done.last_success_at.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_answer_sets_the_wait_up_to_the_give_up_limit() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    let send = ep.send(|n| match n {
        1 => failed(Some(Duration::from_secs(90))),
        2 => failed(Some(3 * DAY)),
        _ => Attempt::Delivered(n),
    });
    let out = pusher.push(|_| {}, &CancellationToken::new(), send).await;
    assert_eq!(out, Pushed::Delivered(3));
    assert_eq!(ep.gaps(), [Duration::from_secs(90), DAY]);
}

#[tokio::test(start_paused = true)]
async fn a_webhook_failing_for_its_limit_gives_up_and_is_paused() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    let out = pusher
        .push(|_| {}, &CancellationToken::new(), ep.send(|_| failed(None)))
        .await;
    assert_eq!(out, Pushed::GaveUp("503 Service Unavailable".into()));
    let times = ep.times();
    let (first, n) = (times[0], times.len());
    assert!(
        times[n - 1] - first >= DAY,
        "gave up after failing for only {:?}",
        times[n - 1] - first
    );
    assert!(
        times[n - 2] - first < DAY,
        "kept retrying after failing for {:?}",
        times[n - 2] - first
    );
    let state = pusher.state();
    assert_eq!(state.status, PushStatus::Paused);
    assert_eq!(state.last_error.as_deref(), Some("503 Service Unavailable"));
    assert!(state.failing_since.is_some());
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_is_gone_ends_the_push_and_is_disabled() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    let (told, presence) = ep.presence();
    let send = ep.send(|n| match n {
        1 => failed(None),
        _ => Attempt::Gone("410 Gone".into()),
    });
    let out = pusher.push(presence, &CancellationToken::new(), send).await;
    assert_eq!(out, Pushed::Gone("410 Gone".into()));
    assert_eq!(ep.count(), 2, "a gone endpoint was tried again");
    assert_eq!(pusher.state().status, PushStatus::Disabled);
    assert_eq!(*told.lock().unwrap(), [(2, false)]);
}

#[tokio::test(start_paused = true)]
async fn a_push_endpoint_is_told_offline_only_from_its_third_failure_in_a_row_and_online_at_a_success()
 {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    let (told, presence) = ep.presence();
    let send = ep.send(|n| {
        if n <= 4 {
            failed(None)
        } else {
            Attempt::Delivered(n)
        }
    });
    let out = pusher.push(presence, &CancellationToken::new(), send).await;
    assert_eq!(out, Pushed::Delivered(5));
    assert_eq!(*told.lock().unwrap(), [(3, false), (4, false), (5, true)]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_stop_token_ends_a_back_off_wait_at_once() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    let stop = CancellationToken::new();
    let canceller = stop.clone();
    tokio::spawn(async move {
        sleep(Duration::from_secs(10)).await;
        canceller.cancel();
    });
    let started = Instant::now();
    let out = pusher
        .push(|_| {}, &stop, ep.send(|_| failed(Some(HOUR))))
        .await;
    assert_eq!(out, Pushed::Stopped);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn while_the_server_is_offline_an_attempt_waits_and_is_made_once_online() {
    let state = ServerState::new(true, Duration::from_secs(1));
    let pusher = Pusher::new(state.clone(), "webhook", webhook());
    let ep = Endpoint::new();
    let send = ep.send(Attempt::Delivered);
    let started = Instant::now();
    let push =
        tokio::spawn(async move { pusher.push(|_| {}, &CancellationToken::new(), send).await });
    sleep(Duration::from_secs(60)).await;
    assert_eq!(
        ep.count(),
        0,
        "an attempt was made while the server was offline"
    );
    set_online(&state, true);
    assert_eq!(push.await.unwrap(), Pushed::Delivered(1));
    assert_eq!(ep.times()[0] - started, Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn ews_push_retries_only_while_the_unjittered_wait_stays_within_the_cap() {
    let pusher = Pusher::new(online_state(), "ews", ews());
    let ep = Endpoint::new();
    let (told, presence) = ep.presence();
    let out = pusher
        .push(
            presence,
            &CancellationToken::new(),
            ep.send(|_| failed(None)),
        )
        .await;
    assert_eq!(out, Pushed::GaveUp("503 Service Unavailable".into()));
    // Attempts at 0, then after about 0.25, 0.5, 1 and 2 s; a 4 s wait would pass the cap.
    let gaps = ep.gaps();
    assert_eq!(gaps.len(), 4, "attempts at {:?}", ep.times());
    for (i, gap) in gaps.iter().enumerate() {
        assert_within_backoff(ews().backoff, i as u32 + 1, *gap);
    }
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0]),
        "a wait was shorter than the one before: {gaps:?}"
    );
    let told = told.lock().unwrap();
    assert_eq!(*told, (1..=5).map(|n| (n, false)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn the_attempt_history_keeps_the_newest_attempts_newest_first_within_its_bound() {
    let pusher = Pusher::new(online_state(), "webhook", webhook());
    let ep = Endpoint::new();
    // Forty failures, then a success: more attempts than the history holds.
    let send = ep.send(|n| {
        if n <= 40 {
            failed(None)
        } else {
            Attempt::Delivered(n)
        }
    });
    let out = pusher.push(|_| {}, &CancellationToken::new(), send).await;
    assert_eq!(out, Pushed::Delivered(41));
    let history = pusher.history();
    assert_eq!(history.len(), herald_delivery::ATTEMPT_HISTORY);
    assert_eq!(history[0].outcome, "delivered");
    assert_eq!(history[0].error, None);
    assert!(history[1..].iter().all(|a| a.outcome == "failed"
        && a.error.as_deref() == Some("503 Service Unavailable")));
    assert!(
        history.windows(2).all(|w| w[0].at >= w[1].at),
        "not newest first"
    );
}
