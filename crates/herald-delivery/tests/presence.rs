//! Presence on tokio's paused clock: leases, busy guards, streams closing, the events written
//! for each change, and the bounded backlog while the log does not keep up.

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use herald_core::hooks::Hooks;
use herald_core::{Event, Key, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE, StateChangePhase};
use herald_delivery::presence::presence_key;
use herald_delivery::{
    Connect, ConnectError, Connections, EndReason, Lease, Lifecycle, PresenceOptions, Transport,
};
use herald_testkit::memlog::MemoryLog;
use tokio::time::{sleep, timeout};
use tokio_util::task::TaskTracker;

const LEASE: Duration = Duration::from_secs(45);
const ONLINE: (u32, u32) = (STATE_OFFLINE, STATE_ONLINE);
const OFFLINE: (u32, u32) = (STATE_ONLINE, STATE_OFFLINE);

fn options(backlog: usize) -> PresenceOptions {
    PresenceOptions {
        lease: LEASE,
        publish: true,
        backlog,
        node: None,
    }
}

/// Every presence change written to `log`, by key, in log order, as (old, new) states;
/// checks that each is a `connection_state` *done* event on the online/offline bits.
fn written(log: &MemoryLog) -> HashMap<Key, Vec<(u32, u32)>> {
    let mut by_key: HashMap<Key, Vec<(u32, u32)>> = HashMap::new();
    for n in log.events() {
        let Event::ConnectionState(c) = &n.event else {
            panic!("a presence write that is not a connection_state event: {n:?}");
        };
        assert_eq!(c.phase, StateChangePhase::Done);
        assert_eq!(c.changed_mask, STATE_OFFLINE_MASK);
        by_key
            .entry(n.key.clone())
            .or_default()
            .push((c.old_state, c.new_state));
    }
    by_key
}

fn written_for(log: &MemoryLog, owner: &str, id: &str) -> Vec<(u32, u32)> {
    written(log)
        .remove(&presence_key(owner, id))
        .unwrap_or_default()
}

fn connect(id: String) -> Connect {
    Connect {
        id,
        owner: "load".into(),
        transport: Transport::Sse,
        target: "k".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_not_renewed_within_its_lease_goes_offline_and_comes_back_when_renewed() {
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(64));
    let conn = conns.open(
        Some("s1".into()),
        Transport::Poll,
        "alice",
        "inbox",
        Lease::Session,
    );
    sleep(LEASE - Duration::from_secs(1)).await;
    assert_eq!(conns.expire_leases(), 0, "expired within its lease");
    assert!(conn.is_online());
    sleep(Duration::from_secs(2)).await;
    assert_eq!(conns.expire_leases(), 1);
    assert!(!conn.is_online());
    assert!(!conns.get("s1").unwrap().online);
    assert!(
        !conn.expired().is_cancelled(),
        "a session is not closed by its lease"
    );
    conn.renew();
    assert!(conn.is_online(), "renewing did not bring the session back");
    conns.flush().await;
    assert_eq!(written_for(&log, "alice", "s1"), [ONLINE, OFFLINE, ONLINE]);
}

#[tokio::test(start_paused = true)]
async fn a_connection_being_served_does_not_expire_until_its_busy_guard_drops() {
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(64));
    let conn = conns.open(
        Some("s1".into()),
        Transport::Poll,
        "alice",
        "inbox",
        Lease::Session,
    );
    let guard = conn.busy();
    sleep(Duration::from_secs(600)).await;
    assert_eq!(
        conns.expire_leases(),
        0,
        "expired while it was being served"
    );
    assert!(conn.is_online());
    assert_eq!(conns.get("s1").unwrap().idle, Duration::ZERO);
    drop(guard);
    // The lease runs again from when the guard dropped.
    sleep(LEASE - Duration::from_secs(1)).await;
    assert_eq!(conns.expire_leases(), 0);
    sleep(Duration::from_secs(2)).await;
    assert_eq!(conns.expire_leases(), 1);
    assert!(!conn.is_online());
}

#[tokio::test(start_paused = true)]
async fn a_stream_whose_lease_expires_is_told_to_close_and_does_not_come_back() {
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(64));
    let lifecycle = Lifecycle::new(
        Arc::new(Hooks::default()),
        conns.clone(),
        TaskTracker::new(),
    );
    let ((), live) = lifecycle
        .connect(connect("st".into()), Some(Lease::Stream), || async {
            Ok::<_, Infallible>(())
        })
        .await
        .unwrap();
    let conn = live.conn().unwrap();
    sleep(LEASE + Duration::from_secs(1)).await;
    assert_eq!(conns.expire_leases(), 1);
    assert!(
        conn.expired().is_cancelled(),
        "the stream was not told to close"
    );
    assert_eq!(
        timeout(Duration::ZERO, live.expired()).await,
        Ok(EndReason::Expiry)
    );
    conn.renew();
    conn.set_online(true);
    assert!(!conn.is_online(), "an expired stream came back online");
    conns.flush().await;
    assert_eq!(written_for(&log, "load", "st"), [ONLINE, OFFLINE]);
}

#[tokio::test(start_paused = true)]
async fn presence_changes_are_written_in_order_alternating_on_the_connection_key() {
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(64));
    let a = conns.open(
        Some("a".into()),
        Transport::Sse,
        "alice",
        "k",
        Lease::Stream,
    );
    let b = conns.open(
        Some("b".into()),
        Transport::Webhook,
        "bob",
        "k",
        Lease::None,
    );
    // Let the writer take some of them: the changes span several appends.
    tokio::task::yield_now().await;
    b.set_online(false);
    a.set_online(false);
    a.set_online(false);
    tokio::task::yield_now().await;
    a.set_online(true);
    b.set_online(true);
    drop(a);
    tokio::task::yield_now().await;
    b.set_online(false);
    b.set_online(true);
    conns.flush().await;
    let written = written(&log);
    assert_eq!(written.len(), 2, "{written:?}");
    assert_eq!(
        written[&presence_key("alice", "a")],
        [ONLINE, OFFLINE, ONLINE, OFFLINE]
    );
    assert_eq!(
        written[&presence_key("bob", "b")],
        [ONLINE, OFFLINE, ONLINE, OFFLINE, ONLINE]
    );
}

#[test]
fn a_presence_key_names_owner_and_id_as_one_segment_each() {
    assert_eq!(
        presence_key("alice/x", "c%1").as_str(),
        Some("$herald/presence/alice%2Fx/c%251")
    );
    assert_eq!(presence_key("", "c").as_str(), Some("$herald/presence/-/c"));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_conn_publishes_it_offline_and_removes_it() {
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(64));
    let conn = conns.open(
        Some("c".into()),
        Transport::Ews,
        "alice",
        "inbox",
        Lease::Stream,
    );
    conns.flush().await;
    assert_eq!(written_for(&log, "alice", "c"), [ONLINE]);
    drop(conn);
    conns.flush().await;
    assert_eq!(written_for(&log, "alice", "c"), [ONLINE, OFFLINE]);
    assert!(conns.get("c").is_none());
    assert!(conns.list(None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_presence_backlog_stays_bounded_while_the_log_is_stalled_and_nothing_is_lost() {
    const BACKLOG: usize = 100;
    const AT_ONCE: usize = 8;
    let log = MemoryLog::new();
    let conns = Connections::new(log.clone(), options(BACKLOG));
    let lifecycle = Lifecycle::new(
        Arc::new(Hooks::default()),
        conns.clone(),
        TaskTracker::new(),
    );
    let mut held = VecDeque::new();
    let mut opened = Vec::new();
    let mut busy = 0;
    let mut seen_backlogged = false;
    let mut attempt = 0;
    // Rounds of churn with the log stalled, then released for a moment.
    for _ in 0..20 {
        log.stall();
        for _ in 0..250 {
            attempt += 1;
            let id = format!("c{attempt}");
            let connected = lifecycle
                .connect(connect(id.clone()), Some(Lease::Stream), || async {
                    Ok::<_, Infallible>(())
                })
                .await;
            match connected {
                Ok(((), live)) => {
                    opened.push(id);
                    held.push_back(live);
                    if held.len() > AT_ONCE {
                        held.pop_front();
                    }
                }
                Err(ConnectError::Busy) => {
                    busy += 1;
                    held.pop_front();
                }
                Err(e) => panic!("connect failed: {e}"),
            }
            seen_backlogged |= conns.is_backlogged();
            assert!(
                conns.backlog_len() <= BACKLOG + AT_ONCE,
                "{} connections wait for the log",
                conns.backlog_len()
            );
            // The writer runs between connects (and gets stuck at the stalled log).
            tokio::task::yield_now().await;
        }
        assert_eq!(
            log.stalled_appends(),
            1,
            "the writer is not waiting on the log"
        );
        // Without presence, a connect is not refused.
        let unleased = lifecycle
            .connect(connect("no-presence".into()), None, || async {
                Ok::<_, Infallible>(())
            })
            .await;
        assert!(unleased.is_ok());
        log.release();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }
    assert!(seen_backlogged, "the backlog never filled");
    assert!(busy > 0, "no connect was refused");
    assert!(
        opened.len() >= 1000,
        "only {} connections opened",
        opened.len()
    );
    drop(held);
    conns.flush().await;
    assert_eq!(conns.backlog_len(), 0);
    assert!(!conns.is_backlogged());
    let written = written(&log);
    assert_eq!(written.len(), opened.len());
    for id in &opened {
        assert_eq!(
            written.get(&presence_key("load", id)).map(Vec::as_slice),
            Some(&[ONLINE, OFFLINE][..]),
            "connection {id}"
        );
    }
}
