//! Herald's promises beyond the MAPI contract: scopes, order across batches, bounded queues
//! with an explicit overflow, panic isolation, owner-drained receivers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use herald_core::*;

#[test]
fn subtree_subscription_sees_its_key_and_everything_below_it_only() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(
        Scope::Subtree("alice/inbox".into()),
        EventMask::ALL,
        rec,
        SubscribeOptions::default(),
    )
    .unwrap();
    for k in [
        "alice/inbox",
        "alice/inbox/m1",
        "alice/inbox/sub/m2",
        "alice/inbox2/m3",
        "alice",
        "bob/inbox/m1",
    ] {
        hub.notify(created(k)).unwrap();
    }
    let keys: Vec<String> = recv_events(&rx, 3)
        .iter()
        .map(|n| n.key.to_string())
        .collect();
    assert_eq!(
        keys,
        ["alice/inbox", "alice/inbox/m1", "alice/inbox/sub/m2"]
    );
    assert_quiet(&rx);
}

#[test]
fn children_subscription_sees_what_is_directly_in_its_folder_only() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(
        Scope::Children("alice/inbox".into()),
        EventMask::ALL,
        rec,
        SubscribeOptions::default(),
    )
    .unwrap();
    // A message that names its folder although its key is elsewhere is in that folder.
    let named = Notification::new(
        "alice/store/m9",
        Event::ObjectCreated(ObjectChange {
            parent: Some("alice/inbox".into()),
            ..Default::default()
        }),
    );
    // New mail always names the folder it arrived in.
    let mail = Notification::new(
        "alice/x/m10",
        Event::NewMail(NewMail {
            parent: "alice/inbox".into(),
            ..Default::default()
        }),
    );
    for n in [
        created("alice/inbox"),
        created("alice/inbox/m1"),
        created("alice/inbox/sub/m2"),
        created("alice/inbox2/m3"),
        moved("alice/inbox/m4", "alice/archive/m4"),
        moved("alice/drafts/m5", "alice/inbox/m5"),
        moved("alice/inbox/m6", "alice/inbox/m7"),
        named,
        mail,
        created("bob/inbox/m1"),
    ] {
        hub.notify(vec![n]).unwrap();
    }
    let keys: Vec<String> = recv_events(&rx, 6)
        .iter()
        .map(|n| n.key.to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "alice/inbox/m1",
            "alice/archive/m4",
            "alice/inbox/m5",
            "alice/inbox/m7",
            "alice/store/m9",
            "alice/x/m10",
        ],
        "its folder's own change, a subfolder's content and another folder are not in it; a \
         move out, a move in and a move within once each"
    );
    assert_quiet(&rx);
}

#[test]
fn moves_reach_subscribers_of_the_old_and_the_new_key_once_each() {
    let hub = hub();
    let (old_rec, old_rx) = Recorder::new();
    let (new_rec, new_rx) = Recorder::new();
    let (both_rec, both_rx) = Recorder::new();
    let (other_rec, other_rx) = Recorder::new();
    let opts = SubscribeOptions::default();
    hub.subscribe(
        Scope::Subtree("a/inbox".into()),
        EventMask::ALL,
        old_rec,
        opts,
    )
    .unwrap();
    hub.subscribe(
        Scope::Subtree("a/archive".into()),
        EventMask::ALL,
        new_rec,
        opts,
    )
    .unwrap();
    hub.subscribe(Scope::Subtree("a".into()), EventMask::ALL, both_rec, opts)
        .unwrap();
    hub.subscribe(Scope::Subtree("b".into()), EventMask::ALL, other_rec, opts)
        .unwrap();
    let m = moved("a/inbox/m1", "a/archive/m1");
    let out = hub.notify(m.clone()).unwrap();
    assert_eq!(out.matched, 3);
    assert_eq!(recv_events(&old_rx, 1), vec![m.clone()]);
    assert_eq!(recv_events(&new_rx, 1), vec![m.clone()]);
    assert_eq!(recv_events(&both_rx, 1), vec![m]);
    assert_quiet(&both_rx);
    assert_quiet(&other_rx);
}

#[test]
fn batches_arrive_whole_and_in_notify_order_for_every_subscriber() {
    let hub = hub();
    let receivers: Vec<_> = (0..8)
        .map(|i| {
            let (rec, rx) = Recorder::new();
            let scope = if i % 2 == 0 {
                Scope::Exact("k/x".into())
            } else {
                Scope::Subtree("k".into())
            };
            hub.subscribe(scope, EventMask::ALL, rec, SubscribeOptions::default())
                .unwrap();
            rx
        })
        .collect();
    let batches: Vec<Vec<Notification>> = (0..200)
        .map(|b| (0..3).map(|i| numbered("k/x", b * 3 + i)).collect())
        .collect();
    for b in &batches {
        hub.notify(b.clone()).unwrap();
    }
    for rx in &receivers {
        for b in &batches {
            // Each delivery is exactly one batch, whole and in order.
            assert_eq!(rx.recv_timeout(WAIT).unwrap(), Seen::Events(b.clone()));
        }
    }
}

#[test]
fn concurrent_notifiers_give_all_subscribers_one_order() {
    let hub = hub();
    let logs: Vec<_> = (0..4)
        .map(|_| {
            let (rec, rx) = Recorder::new();
            hub.subscribe(
                Scope::Subtree("k".into()),
                EventMask::ALL,
                rec,
                SubscribeOptions::default(),
            )
            .unwrap();
            rx
        })
        .collect();
    let producers: Vec<_> = (0..4u32)
        .map(|p| {
            let h = hub.clone();
            thread::spawn(move || {
                for i in 0..500 {
                    h.notify(numbered(&format!("k/p{p}"), p * 10_000 + i))
                        .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let orders: Vec<Vec<u32>> = logs
        .iter()
        .map(|rx| recv_events(rx, 2000).iter().map(number).collect())
        .collect();
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "two subscribers saw different orders");
    }
    for p in 0..4u32 {
        let mine: Vec<u32> = orders[0]
            .iter()
            .copied()
            .filter(|n| n / 10_000 == p)
            .collect();
        assert_eq!(mine, (0..500).map(|i| p * 10_000 + i).collect::<Vec<_>>());
    }
}

#[test]
fn a_slow_subscriber_overflows_with_an_explicit_signal_and_bounded_memory() {
    let hub = hub();
    let (entered_tx, entered_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
    let (rec, rx) = Recorder::new();
    let first = AtomicUsize::new(0);
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        move |d: Delivery<'_>| {
            if first.fetch_add(1, Ordering::SeqCst) == 0 {
                entered_tx.lock().unwrap().send(()).unwrap();
                go_rx.lock().unwrap().recv_timeout(WAIT).unwrap();
            }
            rec.on_notify(d)
        },
        SubscribeOptions::default().with_queue_capacity(10),
    )
    .unwrap();
    // A fast subscriber on the same key is not affected.
    let (fast_count, fast) = counter();
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        fast,
        SubscribeOptions::default(),
    )
    .unwrap();
    hub.notify(logged("k", 1)).unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    let mut dropped = 0;
    for w in 2..=100 {
        dropped += hub.notify(logged("k", w)).unwrap().dropped_events;
    }
    go_tx.send(()).unwrap();
    assert!(hub.flush(WAIT));
    assert_eq!(fast_count.load(Ordering::SeqCst), 100);

    let mut seen = Vec::new();
    let mut overflows = Vec::new();
    while let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
        match s {
            Seen::Events(e) => seen.extend(e.iter().map(|n| n.watermark.unwrap().0)),
            Seen::Overflow(o) => overflows.push((seen.len(), o)),
        }
    }
    // Event 1 was in flight; then exactly one overflow, then the newest events, in order.
    assert_eq!(overflows.len(), 1, "{overflows:?}");
    let (at, o) = overflows[0];
    assert_eq!(at, 1);
    assert_eq!(o.resume_after, Some(Watermark(1)));
    let after: Vec<u64> = seen[1..].to_vec();
    assert!(
        after.len() <= 10,
        "more than the capacity was kept: {after:?}"
    );
    assert_eq!(o.missed_through, Some(Watermark(after[0] - 1)));
    assert_eq!(after, (after[0]..=100).collect::<Vec<_>>());
    assert_eq!(o.missed_events, dropped);
    assert_eq!(
        1 + o.missed_events + after.len() as u64,
        100,
        "an event vanished"
    );
    let stats = hub.stats();
    assert!(stats.overflows >= 1);
    assert_eq!(stats.dropped_events, dropped);
}

#[test]
fn a_panicking_sink_is_unsubscribed_and_the_others_go_on() {
    let hub = hub();
    let bad = hub
        .subscribe(
            Scope::Exact("k".into()),
            EventMask::ALL,
            |_: Delivery<'_>| -> Flow { panic!("sink bug") },
            SubscribeOptions::default(),
        )
        .unwrap();
    let (good_count, good) = counter();
    let good_id = hub
        .subscribe(
            Scope::Exact("k".into()),
            EventMask::ALL,
            good,
            SubscribeOptions::default(),
        )
        .unwrap();
    let (sync_count, sync_good) = counter();
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        sync_good,
        SubscribeOptions::sync(),
    )
    .unwrap();
    for _ in 0..5 {
        hub.notify(created("k")).unwrap();
        assert!(hub.flush(WAIT));
    }
    assert_eq!(good_count.load(Ordering::SeqCst), 5);
    assert_eq!(sync_count.load(Ordering::SeqCst), 5);
    assert_eq!(hub.stats().sink_panics, 1);
    assert!(!hub.connections().contains(&bad));
    assert!(hub.connections().contains(&good_id));
    assert_eq!(
        hub.unsubscribe(bad),
        Err(UnsubscribeError::NotFound(bad.get()))
    );
}

#[test]
fn a_panicking_sync_sink_does_not_break_notify() {
    let hub = hub();
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        |_: Delivery<'_>| -> Flow { panic!("sync sink bug") },
        SubscribeOptions::sync(),
    )
    .unwrap();
    let (n, after) = counter();
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        after,
        SubscribeOptions::sync(),
    )
    .unwrap();
    let out = hub.notify(created("k")).unwrap();
    assert!(!out.canceled);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(hub.stats().sink_panics, 1);
    assert_eq!(hub.connections().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_is_drained_by_its_task_in_order() {
    let hub = hub();
    let mut rx = hub
        .subscribe_receiver(
            Scope::Subtree("k".into()),
            EventMask::ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    let id = rx.id();
    let h = hub.clone();
    let producer = std::thread::spawn(move || {
        for i in 0..1000 {
            h.notify(numbered("k/a", i)).unwrap();
        }
    });
    let mut next = 0;
    while next < 1000 {
        match tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
            Some(OwnedDelivery::Events(b)) => {
                for n in b.iter() {
                    assert_eq!(number(n), next);
                    next += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    producer.join().unwrap();
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    // Unsubscribing from elsewhere closes it; dropping it afterwards is harmless.
    hub.unsubscribe(id).unwrap();
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap(), None);
    drop(rx);
    assert!(hub.connections().is_empty());
}

#[test]
fn dropping_a_receiver_unsubscribes_and_wakes_a_blocked_owner() {
    let hub = hub();
    let rx = hub
        .subscribe_receiver(
            Scope::Exact("k".into()),
            EventMask::ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    assert_eq!(hub.connections().len(), 1);
    drop(rx);
    assert!(hub.connections().is_empty());

    let mut rx = hub
        .subscribe_receiver(
            Scope::Exact("k".into()),
            EventMask::ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    let id = rx.id();
    let waiter = thread::spawn(move || rx.recv_blocking());
    thread::sleep(Duration::from_millis(50));
    hub.unsubscribe(id).unwrap();
    assert_eq!(waiter.join().unwrap(), None);
}

#[test]
fn a_receiver_overflow_is_delivered_before_newer_events() {
    let hub = hub();
    let mut rx = hub
        .subscribe_receiver(
            Scope::Exact("k".into()),
            EventMask::ALL,
            SubscribeOptions::default().with_queue_capacity(4),
        )
        .unwrap();
    for w in 1..=10 {
        hub.notify(logged("k", w)).unwrap();
    }
    let mut got = Vec::new();
    while let Ok(d) = rx.try_recv() {
        got.push(d);
    }
    assert_eq!(
        got[0],
        OwnedDelivery::Overflow(Overflow {
            resume_after: None,
            missed_through: Some(Watermark(8)),
            missed_events: 8
        })
    );
    let rest: Vec<u64> = got[1..]
        .iter()
        .map(|d| match d {
            OwnedDelivery::Events(b) => b[0].watermark.unwrap().0,
            OwnedDelivery::Overflow(o) => panic!("second overflow {o:?}"),
        })
        .collect();
    assert_eq!(rest, vec![9, 10]);
}

#[test]
fn a_dispatcher_releases_a_wrapped_sink_on_its_own_thread_after_unsubscribe() {
    let hub = hub();
    let dispatcher = Dispatcher::new();
    struct Owned(std::rc::Rc<std::cell::Cell<bool>>);
    impl Drop for Owned {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }
    let dropped = std::rc::Rc::new(std::cell::Cell::new(false));
    let owned = Owned(dropped.clone());
    let id = dispatcher
        .subscribe(
            &hub,
            Scope::Exact("k".into()),
            EventMask::ALL,
            move |_: Delivery<'_>| {
                let _keep = &owned;
                Flow::Continue
            },
            SubscribeOptions::default(),
        )
        .unwrap();
    hub.notify(created("k")).unwrap();
    let h = hub.clone();
    thread::spawn(move || h.unsubscribe(id).unwrap())
        .join()
        .unwrap();
    assert!(!dropped.get());
    // The queued delivery is discarded; the sink is dropped here, on the owning thread.
    assert_eq!(dispatcher.dispatch_pending(), 0);
    assert!(dropped.get());
}

#[test]
fn a_subscriber_added_during_notifies_sees_a_suffix_without_gaps() {
    let hub = hub();
    let h = hub.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let producer = thread::spawn(move || {
        let mut i = 0;
        while !s.load(Ordering::SeqCst) {
            h.notify(numbered("k", i)).unwrap();
            i += 1;
        }
        i
    });
    thread::sleep(Duration::from_millis(20));
    let (rec, rx) = Recorder::new();
    hub.subscribe(
        Scope::Exact("k".into()),
        EventMask::ALL,
        rec,
        SubscribeOptions::default().with_queue_capacity(1 << 20),
    )
    .unwrap();
    thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    let total = producer.join().unwrap();
    assert!(hub.flush(WAIT));
    let mut nums = Vec::new();
    while let Ok(s) = rx.try_recv() {
        nums.extend(s.events().iter().map(number));
    }
    assert!(!nums.is_empty());
    let first = nums[0];
    assert_eq!(nums, (first..total).collect::<Vec<_>>());
}
