//! What long-polling transports wait on and read, on tokio's paused clock: cursors, outboxes,
//! state advises, and pages of the log.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::offline::{ADVISE_TYPE_STATECHANGE, CALLBACK_TYPE_NOTIFY, STATE_ALL};
use herald_core::{
    Notification, STATE_OFFLINE, STATE_ONLINE, StateChangePhase, WaitOutcome, Watermark,
};
use herald_delivery::{Advice, Cursor, PageRequest};
use herald_testkit::memlog::MemoryLog;
use tokio::time::{Instant, sleep, timeout};

use common::{append, delivery, online_state, set_online, subtree, watermarks};

const HOUR: Duration = Duration::from_secs(3600);

fn in_a(n: &Notification) -> bool {
    n.key.as_str().is_some_and(|k| k.starts_with("a/"))
}

/// A log of ten events: `a/…` at the odd watermarks, `b/…` at the even ones.
async fn alternating() -> MemoryLog {
    let log = MemoryLog::new();
    for _ in 0..5 {
        append(&log, &["a/1", "b/1"]).await;
    }
    log
}

fn request(after: u64, limit: usize, scan_budget: usize) -> PageRequest {
    PageRequest {
        after: Watermark(after),
        limit,
        scan_budget,
        ceiling: Watermark(u64::MAX),
    }
}

#[tokio::test(start_paused = true)]
async fn a_cursor_wait_ends_when_its_watcher_sees_a_matching_event_and_advancing_clears_pending() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let cursor = Arc::new(Cursor::new(Watermark(0)));
    let feed = d.feed(subtree("a"), Watermark(0)).unwrap();
    {
        let c = cursor.clone();
        tokio::spawn(async move { c.watch(feed).await });
    }
    let mut pending = cursor.pending_signal();
    let started = Instant::now();
    assert!(!cursor.wait(Duration::from_secs(30)).await);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(30),
        "not the timeout"
    );
    {
        let log = log.clone();
        tokio::spawn(async move {
            sleep(Duration::from_secs(5)).await;
            append(&log, &["b/1"]).await;
            sleep(Duration::from_secs(2)).await;
            append(&log, &["a/1"]).await;
        });
    }
    assert!(cursor.wait(Duration::from_secs(30)).await);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(37),
        "the wait did not end when the matching event came"
    );
    assert_eq!(cursor.latest(), Watermark(2));
    assert!(*pending.borrow_and_update());
    // Something pending: a wait ends at once.
    assert!(cursor.wait(HOUR).await);
    assert_eq!(started.elapsed(), Duration::from_secs(37));
    assert!(cursor.advance(Watermark(2)));
    assert!(!cursor.pending() && cursor.acked() == Watermark(2));
    assert!(pending.has_changed().unwrap() && !*pending.borrow_and_update());
    assert!(!cursor.advance(Watermark(1)), "a cursor moved back");
    assert_eq!(cursor.acked(), Watermark(2));
}

#[tokio::test(start_paused = true)]
async fn a_watched_position_that_falls_behind_retention_is_recorded_and_ends_waits() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let feed = d.feed(subtree("a"), Watermark(0)).unwrap();
    for _ in 0..5 {
        append(&log, &["a/1"]).await;
    }
    // Retention takes events the watcher had not read yet.
    log.drop_oldest(3);
    let cursor = Arc::new(Cursor::new(Watermark(0)));
    {
        let c = cursor.clone();
        tokio::spawn(async move { c.watch(feed).await });
    }
    let started = Instant::now();
    assert!(!cursor.wait(HOUR).await);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the wait ran to its timeout"
    );
    assert_eq!(cursor.expired(), Some(Watermark(4)));
}

#[tokio::test(start_paused = true)]
async fn an_outbox_makes_its_reader_wait_for_room_below_its_byte_capacity() {
    let d = delivery(&MemoryLog::new());
    let outbox = Arc::new(d.outbox::<u32>(100));
    outbox.push(1, 60);
    assert!(
        timeout(Duration::ZERO, outbox.room()).await.is_ok(),
        "no room below the capacity"
    );
    outbox.push(2, 50);
    let started = Instant::now();
    let reader = {
        let o = outbox.clone();
        tokio::spawn(async move {
            o.room().await;
            Instant::now()
        })
    };
    sleep(Duration::from_secs(10)).await;
    assert!(!reader.is_finished(), "room at 110 of 100 bytes");
    let taken = outbox.take(|n, _| *n == 1);
    assert_eq!((taken.items, taken.more), (vec![1], true));
    let at = timeout(HOUR, reader)
        .await
        .expect("taking did not make room")
        .unwrap();
    assert_eq!(at - started, Duration::from_secs(10));
    // An item bigger than the capacity still goes in, alone.
    assert!(outbox.take(|_, _| true).items == [2] && outbox.is_empty());
    outbox.push(3, 500);
    assert_eq!(outbox.len(), 1);
    assert!(timeout(HOUR, outbox.room()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn an_outbox_hands_out_nothing_while_the_server_is_offline() {
    let d = delivery(&MemoryLog::new());
    let outbox = d.outbox::<u32>(1000);
    let pending = outbox.pending();
    outbox.push(1, 10);
    outbox.push(2, 10);
    set_online(d.state(), false);
    let taken = outbox.take(|_, _| true);
    assert!(taken.items.is_empty(), "handed out while offline");
    assert_eq!(outbox.len(), 2);
    assert!(*pending.borrow(), "no longer pending while offline");
    set_online(d.state(), true);
    let taken = outbox.take(|_, _| true);
    assert_eq!((taken.items, taken.more), (vec![1, 2], false));
    assert!(!*pending.borrow());
}

#[tokio::test(start_paused = true)]
async fn an_outbox_long_poll_resolves_only_once_something_is_queued_and_the_server_is_online() {
    let d = delivery(&MemoryLog::new());
    let outbox = Arc::new(d.outbox::<u32>(1000));
    let poll = tokio::spawn(outbox.wait().unwrap());
    assert!(outbox.wait().is_err(), "a second long-poll was accepted");
    sleep(HOUR).await;
    assert!(!poll.is_finished(), "resolved with nothing queued");
    set_online(d.state(), false);
    outbox.push(1, 10);
    sleep(HOUR).await;
    assert!(!poll.is_finished(), "resolved while the server was offline");
    set_online(d.state(), true);
    let online = Instant::now();
    let outcome = timeout(HOUR, poll).await;
    assert_eq!(outcome.map(Result::unwrap), Ok(WaitOutcome::Pending));
    assert_eq!(
        online.elapsed(),
        Duration::ZERO,
        "not resolved when the server came online"
    );
    assert_eq!(outbox.take(|_, _| true).items, [1]);
    // A session that ends ends its long-poll.
    let poll = tokio::spawn(outbox.wait().unwrap());
    sleep(HOUR).await;
    outbox.close();
    let closed = Instant::now();
    let outcome = timeout(HOUR, poll).await;
    assert_eq!(outcome.map(Result::unwrap), Ok(WaitOutcome::Exiting));
    assert_eq!(closed.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_outbox_long_poll_held_at_the_gate_is_still_the_one_outstanding_wait() {
    let d = delivery(&MemoryLog::new());
    let outbox = Arc::new(d.outbox::<u32>(1000));
    set_online(d.state(), false);
    outbox.push(1, 10);
    let poll = tokio::spawn(outbox.wait().unwrap());
    sleep(HOUR).await;
    assert!(!poll.is_finished());
    // Items wait, but the server is offline: the client is still parked in its long-poll.
    assert!(
        outbox.is_waiting(),
        "a parked long-poll does not count as waiting"
    );
    assert!(outbox.wait().is_err(), "a second long-poll was accepted");
    set_online(d.state(), true);
    let outcome = timeout(HOUR, poll).await;
    assert_eq!(outcome.map(Result::unwrap), Ok(WaitOutcome::Pending));
    assert!(!outbox.is_waiting());
}

#[tokio::test(start_paused = true)]
async fn an_advise_client_that_reads_gets_every_state_notification_in_order() {
    let state = online_state();
    let mut advice = state
        .advise(
            None,
            7,
            CALLBACK_TYPE_NOTIFY,
            ADVISE_TYPE_STATECHANGE,
            STATE_ALL,
            16,
        )
        .unwrap();
    set_online(&state, false);
    set_online(&state, true);
    let mut got = Vec::new();
    for _ in 0..6 {
        match timeout(HOUR, advice.next()).await {
            Ok(Some(Advice::Notification(n))) => {
                assert_eq!(n.client_token, 7);
                got.push((n.phase, n.new_state));
            }
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    use StateChangePhase::{Change, Done, Start};
    assert_eq!(
        got,
        [
            (Start, STATE_OFFLINE),
            (Change, STATE_OFFLINE),
            (Done, STATE_OFFLINE),
            (Start, STATE_ONLINE),
            (Change, STATE_ONLINE),
            (Done, STATE_ONLINE),
        ]
    );
    assert!(
        timeout(HOUR, advice.next()).await.is_err(),
        "the stream ended"
    );
    drop(advice);
    assert_eq!(
        state.engine().advised(),
        0,
        "dropping the stream did not unadvise"
    );
}

#[tokio::test(start_paused = true)]
async fn an_advise_client_that_does_not_read_gets_what_was_queued_then_overflow_then_the_end() {
    let state = online_state();
    let mut advice = state
        .advise(
            None,
            7,
            CALLBACK_TYPE_NOTIFY,
            ADVISE_TYPE_STATECHANGE,
            STATE_ALL,
            4,
        )
        .unwrap();
    // Six notifications for a queue of four, while the client does not read.
    set_online(&state, false);
    set_online(&state, true);
    let mut got = Vec::new();
    loop {
        match timeout(HOUR, advice.next()).await {
            Ok(Some(a)) => got.push(a),
            Ok(None) => break,
            Err(_) => panic!("the stream neither ended nor said it overflowed: {got:?}"),
        }
    }
    assert_eq!(got.len(), 5, "{got:?}");
    let phases: Vec<_> = got[..4]
        .iter()
        .map(|a| match a {
            Advice::Notification(n) => (n.phase, n.new_state),
            Advice::Overflow => panic!("overflow before the queued notifications: {got:?}"),
        })
        .collect();
    use StateChangePhase::{Change, Done, Start};
    assert_eq!(
        phases,
        [
            (Start, STATE_OFFLINE),
            (Change, STATE_OFFLINE),
            (Done, STATE_OFFLINE),
            (Start, STATE_ONLINE),
        ]
    );
    assert_eq!(got[4], Advice::Overflow);
    assert_eq!(advice.next().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_page_stops_at_its_limit_and_says_there_is_more() {
    let log = alternating().await;
    let d = delivery(&log);
    let page = d
        .page(request(0, 3, 1000), Watermark(0), in_a)
        .await
        .unwrap();
    assert_eq!(watermarks(&page.events), [1, 3, 5]);
    assert_eq!((page.cursor, page.more), (Watermark(5), true));
    let page = d
        .page(request(5, 10, 1000), Watermark(0), in_a)
        .await
        .unwrap();
    assert_eq!(watermarks(&page.events), [7, 9]);
    assert_eq!((page.cursor, page.more), (Watermark(10), false));
    let page = d
        .page(request(10, 10, 1000), Watermark(0), in_a)
        .await
        .unwrap();
    assert!(page.events.is_empty());
    assert_eq!((page.cursor, page.more), (Watermark(10), false));
}

#[tokio::test(start_paused = true)]
async fn a_page_stops_at_its_scan_budget_and_says_there_is_more() {
    let log = alternating().await;
    let d = delivery(&log);
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = d
            .page(request(after, 100, 4), Watermark(0), in_a)
            .await
            .unwrap();
        pages.push((watermarks(&page.events), page.cursor.0, page.more));
        after = page.cursor.0;
        if !page.more {
            break;
        }
        assert!(pages.len() < 10, "no end: {pages:?}");
    }
    assert_eq!(
        pages,
        [
            (vec![1, 3], 4, true),
            (vec![5, 7], 8, true),
            (vec![9], 10, false),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn while_offline_a_page_goes_no_further_than_what_the_subscriber_had_seen() {
    let log = alternating().await;
    let d = delivery(&log);
    set_online(d.state(), false);
    let page = d
        .page(request(0, 100, 1000), Watermark(4), in_a)
        .await
        .unwrap();
    assert_eq!(watermarks(&page.events), [1, 3]);
    assert!(page.cursor <= Watermark(4) && !page.more);
    set_online(d.state(), true);
    let page = d
        .page(request(page.cursor.0, 100, 1000), Watermark(4), in_a)
        .await
        .unwrap();
    assert_eq!(watermarks(&page.events), [5, 7, 9]);
}
