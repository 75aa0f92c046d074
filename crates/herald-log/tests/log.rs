//! The embedded log on real files: watermarks, durability across reopen, idempotency,
//! retention, durable subscriptions, resume without gaps or duplicates, damaged files.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use herald_core::*;
use herald_log::*;

fn event(key: &str, n: u32) -> Notification {
    Notification::new(
        key,
        Event::Extended(Extended {
            event: n,
            data: bytes::Bytes::from(vec![n as u8; 32]),
        }),
    )
}

fn number(n: &Notification) -> u32 {
    match &n.event {
        Event::Extended(e) => e.event,
        other => panic!("{other:?}"),
    }
}

fn open(dir: &std::path::Path, options: LogOptions) -> EmbeddedLog {
    EmbeddedLog::open(dir, options, Hub::default()).unwrap()
}

fn unlimited() -> LogOptions {
    LogOptions {
        retention: Retention::default(),
        ..Default::default()
    }
}

#[test]
fn appends_get_contiguous_watermarks_that_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let a = log
        .append_blocking(vec![event("k", 1), event("k", 2)], AppendOptions::default())
        .unwrap();
    let b = log
        .append_blocking(vec![event("k", 3)], AppendOptions::default())
        .unwrap();
    assert_eq!(
        a.watermarks().collect::<Vec<_>>(),
        vec![Watermark(1), Watermark(2)]
    );
    assert_eq!(b.first, Watermark(3));
    log.close().unwrap();
    drop(log);

    let log = open(dir.path(), unlimited());
    assert_eq!(
        log.bounds().unwrap(),
        LogBounds {
            first: Watermark(1),
            last: Watermark(3)
        }
    );
    let all = log.read_blocking(Watermark(0), 100).unwrap();
    assert_eq!(all.iter().map(number).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        all.iter()
            .map(|n| n.watermark.unwrap().0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let c = log
        .append_blocking(vec![event("k", 4)], AppendOptions::default())
        .unwrap();
    assert_eq!(c.first, Watermark(4), "a watermark was reused after reopen");
    // Reads page from any watermark.
    let page = log.read_blocking(Watermark(1), 2).unwrap();
    assert_eq!(page.iter().map(number).collect::<Vec<_>>(), vec![2, 3]);
    assert!(log.read_blocking(Watermark(4), 10).unwrap().is_empty());
}

#[test]
fn durable_batches_are_published_to_the_hub_with_their_watermarks() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let mut rx = log
        .hub()
        .subscribe_receiver(
            Scope::Subtree("m".into()),
            EventMask::ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    log.append_blocking(
        vec![event("m/a", 1), event("x", 2), event("m/b", 3)],
        AppendOptions::default(),
    )
    .unwrap();
    match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        OwnedDelivery::Events(b) => {
            let got: Vec<(u32, u64)> = b
                .iter()
                .map(|n| (number(n), n.watermark.unwrap().0))
                .collect();
            assert_eq!(got, vec![(1, 1), (3, 3)]);
        }
        other @ OwnedDelivery::Overflow(_) => panic!("{other:?}"),
    }
}

#[test]
fn invalid_and_empty_batches_are_refused_without_appending() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    assert!(matches!(
        log.append_blocking(vec![], AppendOptions::default()),
        Err(AppendError::Empty)
    ));
    let bad = Notification::new(
        Key::default(),
        Event::ObjectCreated(ObjectChange::default()),
    );
    assert!(matches!(
        log.append_blocking(vec![event("k", 1), bad], AppendOptions::default()),
        Err(AppendError::InvalidEvent { index: 1, .. })
    ));
    assert_eq!(log.bounds().unwrap().last, Watermark(0));
}

#[test]
fn a_retry_with_the_same_idempotency_key_does_not_append_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let opts = AppendOptions {
        idempotency_key: Some("req-1".into()),
        ..Default::default()
    };
    // A retry sends the same batch again (its events' timestamps included).
    let batch = vec![event("k", 1), event("k", 2)];
    let first = log.append_blocking(batch.clone(), opts.clone()).unwrap();
    assert!(!first.replayed);
    let again = log.append_blocking(batch.clone(), opts.clone()).unwrap();
    assert!(again.replayed);
    assert_eq!(again.first, first.first);
    assert_eq!(again.count, 2);
    // The same key with a different batch is a conflict, not a silent replay.
    assert!(matches!(
        log.append_blocking(vec![event("k", 9)], opts.clone()),
        Err(AppendError::IdempotencyConflict { .. })
    ));
    assert_eq!(log.bounds().unwrap().last, Watermark(2));
    // It is remembered across a restart.
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), unlimited());
    let after = log.append_blocking(batch, opts).unwrap();
    assert!(after.replayed);
    assert_eq!(after.first, Watermark(1));
}

/// An event without a timestamp (zero): the log stamps it.
fn unstamped(key: &str, n: u32) -> Notification {
    let mut e = event(key, n);
    e.timestamp = Timestamp(0);
    e
}

#[test]
fn a_different_batch_under_a_used_idempotency_key_is_a_conflict_even_when_its_crc_matches() {
    // Two different events whose encodings have the same CRC-32: found by trying keys.
    let crc = |n: &Notification| {
        let bytes = postcard::to_stdvec(&(&n.key, n.timestamp, &n.event)).unwrap();
        crc32fast::hash(&bytes)
    };
    let mut seen = std::collections::HashMap::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let (a, b) = (0..2_000_000u32)
        .find_map(|_| {
            let mut data = [0u8; 16];
            for chunk in data.chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                chunk.copy_from_slice(&rng.to_le_bytes());
            }
            let mut n = unstamped("k", 1);
            n.event = Event::Extended(Extended {
                event: 1,
                data: bytes::Bytes::copy_from_slice(&data),
            });
            seen.insert(crc(&n), n.clone()).map(|earlier| (earlier, n))
        })
        .expect("a CRC-32 collision among two million events");
    assert_ne!(a.event, b.event);
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let opts = AppendOptions {
        idempotency_key: Some("req-1".into()),
        ..Default::default()
    };
    assert!(!log.append_blocking(vec![a], opts.clone()).unwrap().replayed);
    assert!(matches!(
        log.append_blocking(vec![b], opts),
        Err(AppendError::IdempotencyConflict { .. })
    ));
    assert_eq!(log.bounds().unwrap().last, Watermark(1));
}

#[test]
fn a_producers_own_timestamps_are_part_of_what_makes_a_batch_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let opts = |k: &str| AppendOptions {
        idempotency_key: Some(k.into()),
        ..Default::default()
    };
    let mut early = unstamped("k", 1);
    early.timestamp = Timestamp(1_000);
    let mut late = early.clone();
    late.timestamp = Timestamp(2_000);
    log.append_blocking(vec![early.clone()], opts("t")).unwrap();
    assert!(
        log.append_blocking(vec![early], opts("t"))
            .unwrap()
            .replayed
    );
    assert!(matches!(
        log.append_blocking(vec![late], opts("t")),
        Err(AppendError::IdempotencyConflict { .. })
    ));
    // Events without a timestamp are stamped by the log, anew on a retry, and still the same.
    let first = log
        .append_blocking(vec![unstamped("k", 2)], opts("u"))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let again = log
        .append_blocking(vec![unstamped("k", 2)], opts("u"))
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.first, first.first);
    let stored = log.read_blocking(Watermark(first.first.0 - 1), 1).unwrap();
    assert_ne!(stored[0].timestamp, Timestamp(0), "stamped at append");
}

#[test]
fn the_same_idempotency_key_racing_from_many_threads_appends_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let batch = vec![event("k", 1)];
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (log, batch) = (log.clone(), batch.clone());
            std::thread::spawn(move || {
                log.append_blocking(
                    batch,
                    AppendOptions {
                        idempotency_key: Some("same".into()),
                        ..Default::default()
                    },
                )
                .unwrap()
            })
        })
        .collect();
    let results: Vec<Appended> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|a| !a.replayed).count(), 1);
    assert!(results.iter().all(|a| a.first == Watermark(1)));
    assert_eq!(log.bounds().unwrap().last, Watermark(1));
}

#[test]
fn concurrent_producers_get_unique_contiguous_watermarks() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let threads: Vec<_> = (0..32u32)
        .map(|p| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50u32)
                    .map(|i| {
                        let batch: Vec<_> =
                            (0..3).map(|j| event("k", p * 1000 + i * 3 + j)).collect();
                        let a = log
                            .append_blocking(batch, AppendOptions::default())
                            .unwrap();
                        (a, p * 1000 + i * 3)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut results = Vec::new();
    for t in threads {
        results.extend(t.join().unwrap());
    }
    let stored = log.read_blocking(Watermark(0), 100_000).unwrap();
    assert_eq!(stored.len(), 32 * 50 * 3);
    for (a, base) in results {
        assert_eq!(a.count, 3);
        for (i, w) in a.watermarks().enumerate() {
            assert!(seen.insert(w), "watermark {w} given twice");
            // The batch is stored contiguously, in its order.
            assert_eq!(number(&stored[(w.0 - 1) as usize]), base + i as u32);
        }
    }
}

#[test]
fn buffered_appends_are_acknowledged_and_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let a = log
        .append_blocking(
            vec![event("k", 1)],
            AppendOptions {
                durability: Durability::Buffered,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.first, Watermark(1));
    assert_eq!(log.read_blocking(Watermark(0), 10).unwrap().len(), 1);
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), unlimited());
    assert_eq!(log.read_blocking(Watermark(0), 10).unwrap().len(), 1);
}

#[test]
fn retention_by_count_expires_old_watermarks_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(
        dir.path(),
        LogOptions {
            retention: Retention {
                max_events: Some(10),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    for i in 0..30 {
        log.append_blocking(vec![event("k", i)], AppendOptions::default())
            .unwrap();
    }
    // Retention runs on the writer after a commit when a limit is exceeded by more than a
    // tenth; a flush is answered after it.
    log.flush_blocking().unwrap();
    let bounds = log.bounds().unwrap();
    assert_eq!(bounds.last, Watermark(30));
    assert!(
        bounds.first.0 > 1 && bounds.last.0 - bounds.first.0 < 11,
        "{bounds:?}"
    );
    let err = log.read_blocking(Watermark(0), 10).unwrap_err();
    assert_eq!(
        err,
        ReadError::Expired {
            after: Watermark(0),
            oldest_available: bounds.first
        }
    );
    // Resuming exactly before the oldest held event is fine.
    let from_oldest = log
        .read_blocking(Watermark(bounds.first.0 - 1), 100)
        .unwrap();
    assert_eq!(from_oldest[0].watermark, Some(bounds.first));
    assert_eq!(
        log.read_blocking(Watermark(31), 1).unwrap_err(),
        ReadError::Ahead {
            after: Watermark(31),
            last: Watermark(30)
        }
    );
    // After removing everything, watermarks still never go back.
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), unlimited());
    let a = log
        .append_blocking(vec![event("k", 99)], AppendOptions::default())
        .unwrap();
    assert_eq!(a.first, Watermark(31));
}

#[test]
fn retention_by_age_and_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(
        dir.path(),
        LogOptions {
            retention: Retention {
                max_age: Some(Duration::from_millis(300)),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    for i in 0..5 {
        log.append_blocking(vec![event("k", i)], AppendOptions::default())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1300));
    // Retention runs on the writer after a commit.
    log.append_blocking(vec![event("k", 5)], AppendOptions::default())
        .unwrap();
    log.flush_blocking().unwrap();
    let b = log.bounds().unwrap();
    assert_eq!(b.first, Watermark(6), "{b:?}");

    let dir = tempfile::tempdir().unwrap();
    let log = open(
        dir.path(),
        LogOptions {
            retention: Retention {
                max_bytes: Some(2_000),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    for i in 0..200 {
        log.append_blocking(vec![event("k", i)], AppendOptions::default())
            .unwrap();
    }
    log.flush_blocking().unwrap();
    let b = log.bounds().unwrap();
    let held = log.read_blocking(Watermark(b.first.0 - 1), 1000).unwrap();
    assert!(
        held.len() < 60,
        "size limit not applied: {} held",
        held.len()
    );
    assert_eq!(held.last().unwrap().watermark, Some(Watermark(200)));
}

#[tokio::test]
async fn durable_subscriptions_and_their_acks_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    log.put_subscription("s1", b"{\"transport\":\"poll\"}".to_vec())
        .await
        .unwrap();
    log.put_subscription("s2", b"{}".to_vec()).await.unwrap();
    assert!(log.ack("s1", Watermark(7)).await.unwrap());
    assert!(
        log.ack("s1", Watermark(5)).await.unwrap(),
        "an older ack is ignored, not refused"
    );
    assert!(!log.ack("nope", Watermark(1)).await.unwrap());
    assert!(log.set_inflight("s1", Watermark(9)).await.unwrap());
    assert!(log.set_inflight("s2", Watermark(3)).await.unwrap());
    assert!(!log.set_inflight("nope", Watermark(1)).await.unwrap());
    assert!(log.delete_subscription("s2").await.unwrap());
    assert!(!log.delete_subscription("s2").await.unwrap());
    let l2 = log.clone();
    tokio::task::spawn_blocking(move || l2.close().unwrap())
        .await
        .unwrap();
    drop(log);
    let log = open(dir.path(), unlimited());
    assert_eq!(
        log.subscriptions_blocking().unwrap(),
        vec![SubscriptionRecord {
            id: "s1".into(),
            spec: b"{\"transport\":\"poll\"}".to_vec(),
            acked: Watermark(7),
            inflight: Watermark(9),
        }]
    );
}

fn filter(scope: &str) -> Filter {
    Filter {
        scope: Scope::Subtree(scope.into()),
        mask: EventMask::ALL,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_catches_up_then_follows_live_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    // History before the subscriber comes back.
    for i in 0..500u32 {
        log.append(
            vec![event(if i % 2 == 0 { "m/a" } else { "other" }, i)],
            AppendOptions::default(),
        )
        .await
        .unwrap();
    }
    // Producers keep appending while it catches up.
    let producers: Vec<_> = (0..4u32)
        .map(|p| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..250u32 {
                    let n = 1000 + p * 1000 + i;
                    log.append(
                        vec![event(if i % 2 == 0 { "m/b" } else { "other" }, n)],
                        AppendOptions::default(),
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    let resume_after = Watermark(100);
    let mut follower = Follower::start(
        &log,
        filter("m"),
        resume_after,
        FollowOptions {
            page: 64,
            queue_capacity: 64,
        },
    )
    .unwrap();
    for p in producers {
        p.await.unwrap();
    }
    let expected: Vec<u64> = log
        .read_blocking(resume_after, 100_000)
        .unwrap()
        .iter()
        .filter(|n| n.key.as_str().unwrap().starts_with("m/"))
        .map(|n| n.watermark.unwrap().0)
        .collect();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let batch = tokio::time::timeout(Duration::from_secs(10), follower.next())
            .await
            .expect("follower stalled")
            .unwrap();
        got.extend(batch.iter().map(|n| n.watermark.unwrap().0));
    }
    assert_eq!(got, expected, "gap, duplicate or disorder");
    // And then it follows live appends.
    let a = log
        .append(vec![event("m/c", 9)], AppendOptions::default())
        .await
        .unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), follower.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].watermark, Some(a.first));
    assert_eq!(follower.cursor(), a.first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_slower_than_producers_recovers_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let mut follower = Follower::start(
        &log,
        filter("k"),
        Watermark(0),
        FollowOptions {
            page: 16,
            queue_capacity: 8,
        },
    )
    .unwrap();
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for i in 0..200u32 {
                let batch = (0..10).map(|j| event("k/x", i * 10 + j)).collect();
                let fast = AppendOptions {
                    durability: Durability::Buffered,
                    ..Default::default()
                };
                log.append(batch, fast).await.unwrap();
            }
        })
    };
    let mut next_expected = 0u32;
    while next_expected < 2000 {
        let batch = tokio::time::timeout(Duration::from_secs(20), follower.next())
            .await
            .expect("follower stalled")
            .unwrap();
        for n in batch.iter() {
            assert_eq!(number(n), next_expected);
            next_expected += 1;
        }
        // Be slow, so the live queue overflows.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writer.await.unwrap();
    assert!(
        log.hub().stats().overflows > 0,
        "the test did not exercise an overflow"
    );
}

#[test]
fn a_follower_cannot_start_from_an_expired_or_future_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(
        dir.path(),
        LogOptions {
            retention: Retention {
                max_events: Some(5),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    for i in 0..20 {
        log.append_blocking(vec![event("k", i)], AppendOptions::default())
            .unwrap();
    }
    let err =
        Follower::start(&log, filter("k"), Watermark(0), FollowOptions::default()).unwrap_err();
    assert!(
        matches!(err, FollowError::Position(ReadError::Expired { .. })),
        "{err:?}"
    );
    let err =
        Follower::start(&log, filter("k"), Watermark(500), FollowOptions::default()).unwrap_err();
    assert!(
        matches!(err, FollowError::Position(ReadError::Ahead { .. })),
        "{err:?}"
    );
}

#[test]
fn damaged_files_give_a_clear_error_not_a_panic() {
    // Not a log at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(LOG_FILE),
        b"this is not a database file, just text",
    )
    .unwrap();
    let err = EmbeddedLog::open(dir.path(), unlimited(), Hub::default()).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(LOG_FILE), "{err}");

    // A real log cut in half.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), unlimited());
        for i in 0..2000 {
            log.append_blocking(vec![event("k", i)], AppendOptions::default())
                .unwrap();
        }
        log.close().unwrap();
    }
    let path = dir.path().join(LOG_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let result =
        std::panic::catch_unwind(|| EmbeddedLog::open(dir.path(), unlimited(), Hub::default()));
    let result = result.expect("opening a truncated log panicked");
    match result {
        Err(e) => assert!(matches!(e, LogError::Corrupt { .. }), "{e}"),
        // If the store repaired it, what it kept must read back cleanly.
        Ok(log) => {
            let b = log.bounds().unwrap();
            log.read_blocking(Watermark(b.first.0 - 1), 100_000)
                .unwrap();
        }
    }

    // A data directory that is a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let err = EmbeddedLog::open(&file, unlimited(), Hub::default()).unwrap_err();
    assert!(matches!(err, LogError::Directory { .. }), "{err}");
}

#[test]
fn a_second_open_of_the_same_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _log = open(dir.path(), unlimited());
    let err = EmbeddedLog::open(dir.path(), unlimited(), Hub::default()).unwrap_err();
    assert!(
        matches!(err, LogError::Locked { .. } | LogError::Corrupt { .. }),
        "{err}"
    );
}

#[test]
fn many_clones_share_one_log_and_close_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path(), unlimited()));
    let l = log.clone();
    std::thread::spawn(move || {
        l.append_blocking(vec![event("k", 1)], AppendOptions::default())
            .unwrap();
    })
    .join()
    .unwrap();
    log.close().unwrap();
    assert!(matches!(
        log.append_blocking(vec![event("k", 2)], AppendOptions::default()),
        Err(AppendError::Log(LogError::Closed))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_holds_deliveries_and_opening_it_resumes_in_order_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    let switch = GateSwitch::new(true);
    let mut follower = Follower::start(
        &log,
        filter("k"),
        Watermark(0),
        FollowOptions {
            page: 16,
            queue_capacity: 8,
        },
    )
    .unwrap()
    .gated(switch.gate());
    log.append(vec![event("k/a", 1)], AppendOptions::default())
        .await
        .unwrap();
    let first = follower.next().await.unwrap();
    assert_eq!(first.len(), 1);
    switch.set_open(false);
    // More than the live queue holds arrive while closed.
    for i in 0..100u32 {
        log.append(vec![event("k/b", 2 + i)], AppendOptions::default())
            .await
            .unwrap();
    }
    // Nothing comes out while closed, however often the caller gives up and asks again.
    for _ in 0..3 {
        assert!(
            tokio::time::timeout(Duration::from_millis(50), follower.next())
                .await
                .is_err()
        );
    }
    switch.set_open(true);
    let mut got = Vec::new();
    while got.len() < 100 {
        let batch = tokio::time::timeout(Duration::from_secs(10), follower.next())
            .await
            .unwrap()
            .unwrap();
        got.extend(batch.iter().map(|n| n.watermark.unwrap().0));
    }
    let expected: Vec<u64> = (2..=101).collect();
    assert_eq!(got, expected);
}

#[test]
fn a_log_killed_while_being_created_opens_afresh() {
    // A process killed while creating its log leaves at most a partial file beside it,
    // never a half-written log that refuses to open.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("events.redb.new"), b"half a header").unwrap();
    let log = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap();
    assert_eq!(log.bounds().unwrap().last, Watermark(0));
    assert!(!dir.path().join("events.redb.new").exists());
    log.close().unwrap();
    drop(log);
    let log = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap();
    assert_eq!(log.bounds().unwrap().first, Watermark(1));
}

/// A producer keeps many batches in flight: each takes its turn when `append` is called,
/// so they are stored in call order however their futures are awaited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_are_stored_in_the_order_they_were_made() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    assert!(log.pipelines_sequences());
    let sequence = Sequence::new();
    let in_flight: Vec<_> = (0..200u32)
        .map(|i| {
            log.append(
                vec![event("k", i), event("k", i + 1000)],
                AppendOptions {
                    place: Some(sequence.place()),
                    ..Default::default()
                },
            )
        })
        .collect();
    // Awaited last to first: the order was fixed when they were made.
    let mut firsts = Vec::new();
    for f in in_flight.into_iter().rev() {
        firsts.push(f.await.unwrap().first.0);
    }
    firsts.reverse();
    assert_eq!(firsts, (0..200).map(|i| 1 + 2 * i).collect::<Vec<u64>>());
    let stored: Vec<u32> = log
        .read(Watermark(0), 1000)
        .await
        .unwrap()
        .iter()
        .map(number)
        .collect();
    let want: Vec<u32> = (0..200).flat_map(|i| [i, i + 1000]).collect();
    assert_eq!(stored, want);
}

/// A failed batch aborts the batches at later places of its sequence, already in flight,
/// and leaves the earlier ones alone, whether the failure is found before the writer (an
/// invalid event) or by it (an idempotency conflict); a new sequence goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_lets_no_later_batch_of_its_sequence_be_stored() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    log.append(
        vec![event("k", 1)],
        AppendOptions {
            idempotency_key: Some("taken".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for (round, fail_at) in [(0, 2usize), (1, 0), (2, 3), (3, 4)] {
        let s = Sequence::new();
        let before = log.bounds().unwrap().last.0;
        let mut in_flight = Vec::new();
        for i in 0..6u32 {
            let place = Some(s.place());
            let (batch, options) = match (i as usize == fail_at, round % 2) {
                // The same key, another batch: a conflict in the writer.
                (true, 0) => (
                    vec![event("k", 100 + i)],
                    AppendOptions {
                        idempotency_key: Some("taken".into()),
                        place,
                        ..Default::default()
                    },
                ),
                // An event without a key: refused before the writer.
                (true, _) => (
                    vec![Notification::new(
                        Key::new(Vec::<u8>::new()),
                        Event::Extended(Extended::default()),
                    )],
                    AppendOptions {
                        place,
                        ..Default::default()
                    },
                ),
                (false, _) => (
                    vec![event("k", 100 + i)],
                    AppendOptions {
                        place,
                        ..Default::default()
                    },
                ),
            };
            in_flight.push(log.append(batch, options));
        }
        let mut outcomes = Vec::new();
        for f in in_flight {
            outcomes.push(f.await);
        }
        assert!(s.is_broken());
        for (i, o) in outcomes.iter().enumerate() {
            match i.cmp(&fail_at) {
                std::cmp::Ordering::Less => assert!(o.is_ok(), "{round} {i}: {o:?}"),
                std::cmp::Ordering::Equal => assert!(
                    matches!(
                        o,
                        Err(AppendError::IdempotencyConflict { .. }
                            | AppendError::InvalidEvent { .. })
                    ),
                    "{round} {i}: {o:?}"
                ),
                std::cmp::Ordering::Greater => {
                    assert!(matches!(o, Err(AppendError::Aborted)), "{round} {i}: {o:?}")
                }
            }
        }
        assert_eq!(log.bounds().unwrap().last.0, before + fail_at as u64);
    }
    // A new sequence goes on.
    let last = log.bounds().unwrap().last.0;
    let a = log
        .append(
            vec![event("k", 8)],
            AppendOptions {
                place: Some(Sequence::new().place()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.first.0, last + 1);
}

/// Events are stored in runs (one entry for many events, closed at 32 KiB): a read from any
/// position inside a run, across runs and across batches gives exactly the events after it;
/// retention by count cuts inside a run, keeping the rest; all of it survives a reopen.
#[test]
fn reads_start_anywhere_inside_runs_and_retention_cuts_inside_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), unlimited());
    // One batch spanning several runs (about 90 bytes a record: 1,500 of them are ~135 KB),
    // then small batches from many threads sharing group commits, so runs span batches.
    log.append_blocking(
        (0..1500).map(|i| event("k", i)).collect(),
        AppendOptions::default(),
    )
    .unwrap();
    let log = Arc::new(log);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    log.append_blocking(
                        vec![event("k", 10_000 + t * 100 + i), event("k", 20_000)],
                        AppendOptions::default(),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let last = 1500 + 4 * 50 * 2;
    assert_eq!(log.bounds().unwrap().last, Watermark(last));
    let check = |log: &EmbeddedLog, first: u64| {
        for after in [
            first - 1,
            first,
            first + 1,
            700,
            1499,
            1500,
            1501,
            last - 1,
            last,
        ] {
            if after < first - 1 {
                continue;
            }
            let got: Vec<u64> = log
                .read_blocking(Watermark(after), 5000)
                .unwrap()
                .iter()
                .map(|n| n.watermark.unwrap().0)
                .collect();
            assert_eq!(got, (after + 1..=last).collect::<Vec<_>>(), "after {after}");
            let three: Vec<u64> = log
                .read_blocking(Watermark(after), 3)
                .unwrap()
                .iter()
                .map(|n| n.watermark.unwrap().0)
                .collect();
            assert_eq!(
                three,
                (after + 1..=last).take(3).collect::<Vec<_>>(),
                "after {after}"
            );
        }
        // The first batch's events are where they were put, in order.
        let firsts = log.read_blocking(Watermark(first - 1), 1).unwrap();
        if first <= 1500 {
            assert_eq!(number(&firsts[0]), (first - 1) as u32);
        }
    };
    check(&log, 1);
    let log = Arc::into_inner(log).unwrap();
    log.close().unwrap();
    drop(log);
    // Keep the newest 1,000: the cut falls inside the first batch's runs.
    let log = open(
        dir.path(),
        LogOptions {
            retention: Retention {
                max_events: Some(1000),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    log.append_blocking(vec![event("k", 30_000)], AppendOptions::default())
        .unwrap();
    log.flush_blocking().unwrap();
    let last = last + 1;
    let b = log.bounds().unwrap();
    assert_eq!(b.first, Watermark(last - 999), "{b:?}");
    assert_eq!(
        log.read_blocking(Watermark(b.first.0 - 2), 1).unwrap_err(),
        ReadError::Expired {
            after: Watermark(b.first.0 - 2),
            oldest_available: b.first
        }
    );
    let held: Vec<u64> = log
        .read_blocking(Watermark(b.first.0 - 1), 5000)
        .unwrap()
        .iter()
        .map(|n| n.watermark.unwrap().0)
        .collect();
    assert_eq!(held, (b.first.0..=last).collect::<Vec<_>>());
    assert_eq!(
        number(&log.read_blocking(Watermark(b.first.0 - 1), 1).unwrap()[0]),
        (b.first.0 - 1) as u32
    );
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), unlimited());
    assert_eq!(log.bounds().unwrap().first, b.first);
    assert_eq!(
        log.read_blocking(Watermark(b.first.0 - 1), 5000)
            .unwrap()
            .len() as u64,
        last - b.first.0 + 1
    );
}

#[test]
fn check_reports_a_sound_log_and_refuses_a_locked_or_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    {
        let log = open(dir.path(), unlimited());
        for n in 0..3 {
            log.append_blocking(
                vec![event("a/b", n), event("a/c", n)],
                AppendOptions::default(),
            )
            .unwrap();
        }
        assert!(
            matches!(check(&path), Err(LogError::Locked { .. })),
            "an open log is in use"
        );
        log.close().unwrap();
    }
    let report = check(&path).unwrap();
    assert_eq!(report.bounds.first, Watermark(1));
    assert_eq!(report.bounds.last, Watermark(6));
    assert_eq!(report.events, 6);
    assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
    // Checking changed nothing a server would see.
    let log = open(dir.path(), unlimited());
    assert_eq!(log.bounds().unwrap().last, Watermark(6));
    log.close().unwrap();
    drop(log);

    let len = std::fs::metadata(&path).unwrap().len();
    let original = std::fs::read(&path).unwrap();
    // One byte flipped in one page at a time: the store may panic on some of them (it did
    // on a tree page); check reports damage or, for a page nothing refers to, the same log.
    let mut damaged = 0;
    for page in (4096..original.len()).step_by(4096) {
        for offset in [0, 8, 16, 64, 200, 1000, 4000] {
            let mut rotten = original.clone();
            rotten[page + offset] ^= 0xff;
            std::fs::write(&path, &rotten).unwrap();
            match check(&path) {
                Ok(r) => assert_eq!(r, report, "page {page} offset {offset}"),
                Err(LogError::Corrupt { .. }) => damaged += 1,
                Err(e) => panic!("page {page} offset {offset}: {e}"),
            }
        }
    }
    assert!(damaged > 0, "no flipped page was noticed");
    std::fs::write(&path, &original[..(len / 3) as usize]).unwrap();
    assert!(
        matches!(check(&path), Err(LogError::Corrupt { .. })),
        "a truncated file"
    );
    std::fs::write(&path, vec![0x5a; len as usize]).unwrap();
    assert!(
        matches!(check(&path), Err(LogError::Corrupt { .. })),
        "garbage"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(
        matches!(check(&path), Err(LogError::Corrupt { .. })),
        "an empty file"
    );
}
