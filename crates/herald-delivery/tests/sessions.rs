//! Session registries, the connect/cancel hooks around them, and the one shutdown path, on
//! tokio's paused clock over an in-memory log.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::hooks::{
    After, Before, ConnectionHook, Context, HookFuture, HookRequest, Hooks, Operation, Status,
};
use herald_core::{Event, STATE_OFFLINE, STATE_ONLINE};
use herald_delivery::presence::presence_key;
use herald_delivery::{Connect, DeliveryOptions, EndReason, Lease, Transport};
use herald_log::{AppendError, EventLog, LogError};
use herald_testkit::memlog::MemoryLog;
use tokio::time::{Instant, sleep, timeout};

use common::{append, created, delivery, delivery_with};

/// A hook that records every request it is called before.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<HookRequest>>,
}

impl Recorder {
    /// The cancels seen: connection, reason, forced.
    fn cancels(&self) -> Vec<(String, Option<String>, bool)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.operation == Operation::Cancel)
            .map(|r| (r.connection.clone(), r.reason.clone(), r.forced))
            .collect()
    }
}

impl ConnectionHook for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    fn before<'a>(&'a self, req: &'a HookRequest) -> HookFuture<'a, Before> {
        self.seen.lock().unwrap().push(req.clone());
        Box::pin(std::future::ready(Before::Proceed(None)))
    }

    fn after<'a>(
        &'a self,
        _: &'a HookRequest,
        _: &'a Context,
        _: &'a Status,
    ) -> HookFuture<'a, After> {
        Box::pin(std::future::ready(After::Done))
    }
}

fn hooked() -> (Arc<Hooks>, Arc<Recorder>) {
    let hooks = Arc::new(Hooks::default());
    let recorder = Arc::new(Recorder::default());
    hooks.register(recorder.clone());
    (hooks, recorder)
}

fn poll_connect(id: &str) -> Connect {
    Connect {
        id: id.into(),
        owner: "alice".into(),
        transport: Transport::Poll,
        target: "inbox".into(),
    }
}

async fn opened() -> Result<(), Infallible> {
    Ok(())
}

/// The (old, new) states written for `owner`'s connection `id`, and where in the log.
fn presence_writes(log: &MemoryLog, owner: &str, id: &str) -> Vec<(u64, (u32, u32))> {
    let key = presence_key(owner, id);
    log.events()
        .into_iter()
        .filter(|n| n.key == key)
        .map(|n| match n.event {
            Event::ConnectionState(c) => (n.watermark.unwrap().0, (c.old_state, c.new_state)),
            other => panic!("not a presence event: {other:?}"),
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn sessions_idle_past_their_timeout_expire_with_their_tasks_stopped() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let reg = d.registry::<&'static str>();
    let a = reg.insert("a".into(), "a", None);
    let b = reg.insert("b".into(), "b", None);
    let (tx, mut task_ended) = tokio::sync::mpsc::channel::<()>(1);
    reg.spawn(&a, async move {
        let _alive = tx;
        std::future::pending::<()>().await;
    });
    sleep(Duration::from_secs(20)).await;
    assert!(reg.get("b").is_some(), "getting a session touches it");
    sleep(Duration::from_secs(15)).await;
    assert_eq!(a.idle_for(), Duration::from_secs(35));
    assert_eq!(b.idle_for(), Duration::from_secs(15));
    let timeout_after = Duration::from_secs(30);
    let gone = reg.expire(|_, idle| idle > timeout_after);
    let gone: Vec<&str> = gone.iter().map(|s| s.id()).collect();
    assert_eq!(gone, ["a"]);
    assert!(a.is_stopped() && !b.is_stopped());
    assert_eq!(
        timeout(Duration::from_secs(1), task_ended.recv()).await,
        Ok(None),
        "the expired session's task is still running"
    );
    assert!(reg.peek("a").is_none());
    assert!(reg.was_expired("a"), "an expired id is not remembered");
    assert!(!reg.was_expired("b"));
    // Peeking does not touch: `b` expires once idle long enough.
    sleep(Duration::from_secs(20)).await;
    assert!(reg.peek("b").is_some());
    assert_eq!(reg.expire(|_, idle| idle > timeout_after).len(), 1);
    assert!(b.is_stopped() && reg.is_empty() && reg.was_expired("b"));
}

#[tokio::test(start_paused = true)]
async fn removing_a_session_runs_its_cancel_hooks_and_taking_it_does_not() {
    let log = MemoryLog::new();
    let (hooks, recorder) = hooked();
    let d = delivery_with(&log, DeliveryOptions::default(), hooks);
    let reg = d.registry::<()>();
    for id in ["removed", "taken"] {
        let ((), live) = d
            .lifecycle()
            .connect(poll_connect(id), Some(Lease::Session), opened)
            .await
            .unwrap();
        reg.insert(id.into(), (), Some(live));
    }
    let removed = reg.remove("removed", EndReason::Unsubscribe).unwrap();
    let taken = reg.take("taken").unwrap();
    assert!(removed.is_stopped() && taken.is_stopped() && reg.is_empty());
    // Both connections went offline as they ended, not later.
    assert!(d.connections().get("removed").is_none());
    assert!(d.connections().get("taken").is_none());
    // Closing waits for the cancel hooks running in the background.
    d.close(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        recorder.cancels(),
        [("removed".into(), Some("unsubscribe".into()), true)]
    );
    for id in ["removed", "taken"] {
        let states: Vec<_> = presence_writes(&log, "alice", id)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            states,
            [(STATE_OFFLINE, STATE_ONLINE), (STATE_ONLINE, STATE_OFFLINE)],
            "{id}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn closing_waits_for_tracked_tasks_then_writes_every_connection_offline_then_shuts_the_log() {
    let log = MemoryLog::new();
    let (hooks, _) = hooked();
    let d = delivery_with(&log, DeliveryOptions::default(), hooks);
    let (_, live) = d
        .lifecycle()
        .connect(
            d.lifecycle().fresh(Transport::Sse, "alice", "inbox"),
            Some(Lease::Stream),
            opened,
        )
        .await
        .unwrap();
    let stream_id = live.request().connection.clone();
    let session = d.connections().open(
        Some("session".into()),
        Transport::Mapi,
        "bob",
        "mailbox",
        Lease::Session,
    );
    // A worker that finishes its answer after the shutdown signal, and a task that only ends
    // with the server.
    let (stop, worker_log) = (d.shutdown().clone(), log.clone());
    d.track(async move {
        stop.cancelled().await;
        sleep(Duration::from_secs(5)).await;
        append(&worker_log, &["worker/done"]).await;
    });
    d.spawn(std::future::pending());
    let started = Instant::now();
    d.close(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "close did not wait for the worker (or waited for the timeout)"
    );
    let worker_done = log
        .events()
        .iter()
        .find(|n| n.key.as_str() == Some("worker/done"))
        .and_then(|n| n.watermark)
        .expect("the worker's answer was not written")
        .0;
    for (owner, id) in [("alice", stream_id.as_str()), ("bob", "session")] {
        let writes = presence_writes(&log, owner, id);
        let states: Vec<_> = writes.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            states,
            [(STATE_OFFLINE, STATE_ONLINE), (STATE_ONLINE, STATE_OFFLINE)],
            "{id} was not written offline"
        );
        assert!(
            writes[1].0 > worker_done,
            "{id} went offline before the tasks finished"
        );
    }
    assert!(!session.is_online() && !live.conn().unwrap().is_online());
    session.renew();
    assert!(
        !session.is_online(),
        "a connection came back during shutdown"
    );
    assert!(matches!(
        log.append(vec![created("late/1")], Default::default())
            .await,
        Err(AppendError::Log(LogError::Closed))
    ));
}
