//! Feeds: resume from a watermark, expiry, the server's gate and keep-alives, on tokio's
//! paused clock over an in-memory log (so that every duration below is exact).

mod common;

use std::sync::Arc;
use std::time::Duration;

use herald_core::hooks::Hooks;
use herald_core::{Notification, Watermark};
use herald_delivery::{DeliveryOptions, Feed, FeedItem, Select};
use herald_log::{FollowError, ReadError};
use herald_testkit::memlog::MemoryLog;
use tokio::time::{Instant, sleep, timeout};

use common::{append, delivery, delivery_with, set_online, subtree, watermarks};

const LONG: Duration = Duration::from_secs(3600);

/// Takes items until `n` events have come; fails if they do not come within an hour.
async fn events(feed: &mut Feed<MemoryLog>, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match timeout(LONG, feed.next()).await {
            Ok(Ok(FeedItem::Events { batch, .. })) => got.extend(watermarks(&batch)),
            Ok(Ok(FeedItem::KeepAlive { .. })) => {}
            Ok(Err(e)) => panic!("the feed failed: {e}"),
            Err(_) => panic!("only {got:?} of {n} events came"),
        }
    }
    got
}

#[tokio::test(start_paused = true)]
async fn a_feed_keepalive_counts_only_what_this_subscription_sent() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let not_noise: Select = Arc::new(|n: &Notification| n.key.as_str() != Some("busy/noise"));
    let mut feed = d
        .feed(subtree("busy"), Watermark(0))
        .unwrap()
        .select(not_noise)
        .keepalive(Duration::from_secs(10));
    // The key is busy: an event every second for a minute, none of them for this subscription.
    let producer = {
        let log = log.clone();
        tokio::spawn(async move {
            for _ in 0..60 {
                append(&log, &["busy/noise"]).await;
                sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let started = Instant::now();
    for period in 1..=3 {
        let item = timeout(Duration::from_secs(60), feed.next())
            .await
            .expect("no keep-alive while filtered-out events kept coming")
            .unwrap();
        let FeedItem::KeepAlive { cursor } = item else {
            panic!("the feed yielded events its select rejects: {item:?}");
        };
        assert_eq!(started.elapsed(), Duration::from_secs(10 * period));
        assert!(
            cursor.0 >= 10 * period,
            "the cursor {cursor} did not move past the skipped events"
        );
    }
    producer.abort();
}

#[tokio::test(start_paused = true)]
async fn a_feed_that_yields_events_restarts_its_keepalive_when_the_consumer_comes_back() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let mut feed = d
        .feed(subtree("a"), Watermark(0))
        .unwrap()
        .keepalive(Duration::from_secs(10));
    {
        let log = log.clone();
        tokio::spawn(async move {
            sleep(Duration::from_secs(4)).await;
            append(&log, &["a/1"]).await;
        });
    }
    let started = Instant::now();
    let item = feed.next().await.unwrap();
    assert!(matches!(item, FeedItem::Events { .. }), "{item:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(4));
    // The consumer takes three seconds to write the event out, then comes back.
    sleep(Duration::from_secs(3)).await;
    let item = feed.next().await.unwrap();
    assert!(matches!(item, FeedItem::KeepAlive { .. }), "{item:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(4 + 3 + 10),
        "the keep-alive period did not restart when the consumer came back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_feed_resumed_from_a_watermark_gives_every_later_matching_event_once_in_order() {
    let log = MemoryLog::new();
    // 1..=12: `a` at the odd watermarks, `b` at the even ones.
    for _ in 0..6 {
        append(&log, &["a/x", "b/x"]).await;
    }
    // A live queue of two events: the live batches below overflow it, and the feed reads
    // them from the log again.
    let options = DeliveryOptions {
        queue_capacity: 2,
        ..Default::default()
    };
    let d = delivery_with(&log, options, Arc::new(Hooks::default()));
    let mut feed = d.feed(subtree("a"), Watermark(4)).unwrap();
    // Appended after the feed started and before it read the log: both in the log and live.
    let mut expected = vec![5, 7, 9, 11];
    for _ in 0..5 {
        let w = append(&log, &["a/y", "b/y", "a/z"]).await;
        expected.extend([w[0], w[2]]);
    }
    assert_eq!(events(&mut feed, expected.len()).await, expected);
    assert!(
        timeout(LONG, feed.next()).await.is_err(),
        "the feed yielded an event twice"
    );
    let w = append(&log, &["b/1", "a/1"]).await;
    assert_eq!(events(&mut feed, 1).await, [w[1]]);
    assert_eq!(feed.cursor(), Watermark(w[1]));
}

#[tokio::test(start_paused = true)]
async fn a_feed_from_an_expired_watermark_fails_at_once_with_expired() {
    let log = MemoryLog::new();
    for _ in 0..6 {
        append(&log, &["a/1"]).await;
    }
    log.drop_oldest(4);
    let d = delivery(&log);
    match d.feed(subtree("a"), Watermark(2)) {
        Err(FollowError::Position(ReadError::Expired {
            after,
            oldest_available,
        })) => {
            assert_eq!((after, oldest_available), (Watermark(2), Watermark(5)));
        }
        other => panic!("resuming from an expired watermark gave {other:?}"),
    }
    // The position just before the oldest event held still resumes, without a gap.
    let mut feed = d.feed(subtree("a"), Watermark(4)).unwrap();
    assert_eq!(events(&mut feed, 2).await, [5, 6]);
}

#[tokio::test(start_paused = true)]
async fn while_the_server_is_offline_a_feed_yields_nothing_and_going_online_yields_what_was_held() {
    let log = MemoryLog::new();
    let d = delivery(&log);
    let mut feed = d.feed(subtree("a"), Watermark(0)).unwrap();
    set_online(d.state(), false);
    append(&log, &["a/1"]).await;
    append(&log, &["a/2", "b/1"]).await;
    append(&log, &["a/3"]).await;
    assert!(
        timeout(LONG, feed.next()).await.is_err(),
        "the feed delivered while the server was offline"
    );
    set_online(d.state(), true);
    let started = Instant::now();
    assert_eq!(events(&mut feed, 3).await, [1, 2, 4]);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "held events wait no longer"
    );
}
