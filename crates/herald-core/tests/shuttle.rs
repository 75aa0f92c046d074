//! Randomized schedules of the real engine under shuttle: the unsubscribe-versus-notify race,
//! ordering under concurrent notifiers, and overflow accounting.
//!
//! Run with `RUSTFLAGS="--cfg shuttle" cargo test -p herald-core --test shuttle`
//! (`scripts/test` does). Without that flag this file compiles to nothing.
#![cfg(shuttle)]

use shuttle::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use shuttle::sync::{Arc, Mutex, mpsc};
use shuttle::thread;

use herald_core::{
    Delivery, Event, EventMask, Extended, Flow, Hub, HubOptions, Notification, Scope,
    SubscribeOptions, Watermark,
};

const ITERATIONS: usize = 3_000;

/// Explores `f` under random schedules and under PCT (which favours the rare interleavings
/// that need a few preemptions at the right places).
fn explore(f: impl Fn() + Send + Sync + 'static) {
    let f = std::sync::Arc::new(f);
    let g = f.clone();
    shuttle::check_random(move || f(), ITERATIONS);
    shuttle::check_pct(move || g(), ITERATIONS, 3);
}

fn hub() -> Hub {
    Hub::new(HubOptions {
        workers: 2,
        ..Default::default()
    })
}

fn numbered(key: &str, n: u32) -> Notification {
    let mut e = Notification::new(
        key,
        Event::Extended(Extended {
            event: n,
            data: Default::default(),
        }),
    );
    e.watermark = Some(Watermark(u64::from(n)));
    e
}

fn number(n: &Notification) -> u32 {
    match &n.event {
        Event::Extended(e) => e.event,
        _ => unreachable!(),
    }
}

/// A sink that records every event number it sees.
fn recording(log: Arc<Mutex<Vec<u32>>>) -> impl Fn(Delivery<'_>) -> Flow + Send + Sync {
    move |d| {
        if let Delivery::Events(e) = d {
            log.lock().unwrap().extend(e.iter().map(number));
        }
        Flow::Continue
    }
}

/// Two threads notify `m/k` concurrently, `per` events each (numbered from 0 and from 100),
/// and are joined.
fn two_producers(hub: &Hub, per: u32) {
    let producers: Vec<_> = [0u32, 100]
        .into_iter()
        .map(|base| {
            let h = hub.clone();
            thread::spawn(move || {
                for i in 0..per {
                    h.notify(numbered("m/k", base + i)).unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
}

#[test]
fn unsubscribe_racing_notify_never_calls_the_sink_afterwards() {
    explore(|| {
        let hub = hub();
        let unsubscribed = Arc::new(AtomicBool::new(false));
        let late_calls = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (u, late, guard) = (
            unsubscribed.clone(),
            late_calls.clone(),
            OnDrop(dropped.clone()),
        );
        let id = hub
            .subscribe(
                Scope::Exact("k".into()),
                EventMask::ALL,
                move |_: Delivery<'_>| {
                    let _keep = &guard;
                    if u.load(Ordering::SeqCst) {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                    Flow::Continue
                },
                SubscribeOptions::default(),
            )
            .unwrap();
        let h = hub.clone();
        let producer = thread::spawn(move || {
            for i in 0..3 {
                h.notify(numbered("k", i)).unwrap();
            }
        });
        let h = hub.clone();
        let (u, d) = (unsubscribed.clone(), dropped.clone());
        let canceller = thread::spawn(move || {
            h.unsubscribe(id).unwrap();
            u.store(true, Ordering::SeqCst);
            // The hub released its reference when unsubscribe returned.
            assert!(
                d.load(Ordering::SeqCst),
                "sink still referenced after unsubscribe"
            );
        });
        producer.join().unwrap();
        canceller.join().unwrap();
        drop(hub);
        assert_eq!(late_calls.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn concurrent_notifiers_give_every_subscriber_the_same_order() {
    explore(|| {
        let hub = hub();
        let exact_log = Arc::new(Mutex::new(Vec::new()));
        let subtree_log = Arc::new(Mutex::new(Vec::new()));
        hub.subscribe(
            Scope::Exact("m/k".into()),
            EventMask::ALL,
            recording(exact_log.clone()),
            SubscribeOptions::default(),
        )
        .unwrap();
        hub.subscribe(
            Scope::Subtree("m".into()),
            EventMask::ALL,
            recording(subtree_log.clone()),
            SubscribeOptions::default(),
        )
        .unwrap();
        two_producers(&hub, 3);
        drop(hub); // joins the delivery threads after they drained every queue
        let a = exact_log.lock().unwrap().clone();
        let b = subtree_log.lock().unwrap().clone();
        assert_eq!(a.len(), 6, "exactly once: {a:?}");
        assert_eq!(a, b, "two subscribers saw different orders");
        for base in [0, 100] {
            let mine: Vec<u32> = a
                .iter()
                .copied()
                .filter(|n| n / 100 == base / 100)
                .collect();
            assert_eq!(
                mine,
                vec![base, base + 1, base + 2],
                "a producer's order broke"
            );
        }
    });
}

/// P9 under concurrent notifiers: an asynchronous sink never sees an event before the
/// notify that carried it has run its synchronous sinks, whatever the delivery threads were
/// doing; and it still gets every event once, in one order shared with a second subscriber.
#[test]
fn async_sinks_start_only_after_their_notify_ran_its_sync_sinks() {
    explore(|| {
        let hub = hub();
        let done = Arc::new(Mutex::new(Vec::new()));
        hub.subscribe(
            Scope::Exact("m/k".into()),
            EventMask::ALL,
            recording(done.clone()),
            SubscribeOptions::sync(),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, sync_done) = (seen.clone(), done.clone());
        hub.subscribe(
            Scope::Subtree("m".into()),
            EventMask::ALL,
            move |del: Delivery<'_>| {
                if let Delivery::Events(e) = del {
                    for n in e.iter().map(number) {
                        assert!(
                            sync_done.lock().unwrap().contains(&n),
                            "event {n} reached an async sink before its notify was done"
                        );
                        log.lock().unwrap().push(n);
                    }
                }
                Flow::Continue
            },
            SubscribeOptions::default(),
        )
        .unwrap();
        two_producers(&hub, 2);
        drop(hub);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 4, "exactly once: {got:?}");
    });
}

/// Synchronous sinks under concurrent notifiers see the hub's one total order: a sync and an
/// async subscriber of the same key get the same sequence, and each producer's own order.
#[test]
fn sync_sinks_see_the_same_order_as_async_ones_under_concurrent_notifiers() {
    explore(|| {
        let hub = hub();
        let sync_log = Arc::new(Mutex::new(Vec::new()));
        let async_log = Arc::new(Mutex::new(Vec::new()));
        hub.subscribe(
            Scope::Exact("m/k".into()),
            EventMask::ALL,
            recording(sync_log.clone()),
            SubscribeOptions::sync(),
        )
        .unwrap();
        hub.subscribe(
            Scope::Subtree("m".into()),
            EventMask::ALL,
            recording(async_log.clone()),
            SubscribeOptions::default(),
        )
        .unwrap();
        two_producers(&hub, 2);
        drop(hub);
        let s = sync_log.lock().unwrap().clone();
        let a = async_log.lock().unwrap().clone();
        assert_eq!(s.len(), 4, "exactly once: {s:?}");
        assert_eq!(s, a, "the sync sink saw another order than the async one");
    });
}

#[test]
fn unsubscribe_from_inside_the_sink_while_others_notify() {
    explore(|| {
        let hub = hub();
        let calls = Arc::new(AtomicUsize::new(0));
        let id_cell: Arc<Mutex<Option<herald_core::ConnectionId>>> = Arc::default();
        let (h, c, cell) = (hub.clone(), calls.clone(), id_cell.clone());
        let id = hub
            .subscribe(
                Scope::Exact("k".into()),
                EventMask::ALL,
                move |_: Delivery<'_>| {
                    c.fetch_add(1, Ordering::SeqCst);
                    if let Some(id) = cell.lock().unwrap().take() {
                        h.unsubscribe(id).unwrap();
                    }
                    Flow::Continue
                },
                SubscribeOptions::default(),
            )
            .unwrap();
        *id_cell.lock().unwrap() = Some(id);
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let h = hub.clone();
                thread::spawn(move || {
                    for i in 0..2 {
                        h.notify(numbered("k", p * 10 + i)).unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        // The sink holds a hub handle until it unsubscribes, so drain explicitly.
        hub.shutdown(std::time::Duration::from_secs(30));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "called after it unsubscribed itself"
        );
    });
}

#[test]
fn overflow_accounts_for_every_event_and_keeps_order() {
    explore(|| {
        let hub = hub();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        hub.subscribe(
            Scope::Exact("k".into()),
            EventMask::ALL,
            move |d: Delivery<'_>| {
                let item = match d {
                    Delivery::Events(e) => Ok(e.iter().map(number).collect::<Vec<_>>()),
                    Delivery::Overflow(o) => Err(*o),
                };
                tx.lock().unwrap().send(item).unwrap();
                Flow::Continue
            },
            SubscribeOptions::default().with_queue_capacity(2),
        )
        .unwrap();
        let h = hub.clone();
        let producer = thread::spawn(move || {
            for i in 1..=6 {
                h.notify(numbered("k", i)).unwrap();
            }
        });
        producer.join().unwrap();
        drop(hub);
        let mut delivered = Vec::new();
        let mut missed = 0;
        let mut last = 0;
        while let Ok(item) = rx.try_recv() {
            match item {
                Ok(nums) => {
                    for n in nums {
                        assert!(n > last, "order broke: {n} after {last}");
                        last = n;
                        delivered.push(n);
                    }
                }
                Err(o) => {
                    assert_eq!(
                        o.resume_after,
                        (last > 0).then_some(Watermark(u64::from(last)))
                    );
                    missed += o.missed_events;
                }
            }
        }
        assert_eq!(
            delivered.len() as u64 + missed,
            6,
            "lost without a signal: {delivered:?}"
        );
    });
}

/// State changes racing each other and an unadvise: transitions never interleave (each
/// adviser sees whole start/change/done triples, each starting where the last ended), a
/// change during a transition is refused as pending, and after unadvise returns at most the
/// one notification already under way reaches the callback.
#[test]
fn racing_state_changes_never_interleave_and_unadvise_stops_the_callback() {
    use herald_core::offline::{AdviseInfo, FLAG_BLOCK, OfflineState, SetStateError};
    use herald_core::{ConnectionStateChange, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE};
    explore(|| {
        let state = OfflineState::new(STATE_ONLINE);
        let seen: Arc<Mutex<Vec<(u32, u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        state
            .advise(
                0,
                AdviseInfo::notify(1, move |n: &ConnectionStateChange| {
                    s.lock()
                        .unwrap()
                        .push((n.phase as u32, n.old_state, n.new_state));
                }),
            )
            .unwrap();
        let unadvised = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicUsize::new(0));
        let (u, l) = (unadvised.clone(), late.clone());
        let token = state
            .advise(
                0,
                AdviseInfo::notify(2, move |_: &ConnectionStateChange| {
                    if u.load(Ordering::SeqCst) {
                        l.fetch_add(1, Ordering::SeqCst);
                    }
                }),
            )
            .unwrap();
        let mut threads = Vec::new();
        for target in [STATE_OFFLINE, STATE_ONLINE, STATE_OFFLINE] {
            let st = state.clone();
            threads.push(thread::spawn(move || {
                match st.set_current_state(FLAG_BLOCK, STATE_OFFLINE_MASK, target) {
                    Ok(()) | Err(SetStateError::Pending) => {}
                    Err(e) => panic!("{e}"),
                }
            }));
        }
        let st = state.clone();
        threads.push(thread::spawn(move || {
            st.unadvise(0, token);
            unadvised.store(true, Ordering::SeqCst);
        }));
        for t in threads {
            t.join().unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len() % 3, 0, "{seen:?}");
        let mut current = STATE_ONLINE;
        for triple in seen.chunks(3) {
            let (old, new) = (triple[0].1, triple[0].2);
            assert_eq!(
                old, current,
                "a transition starts where the last ended: {seen:?}"
            );
            assert_ne!(old, new);
            let phases: Vec<u32> = triple.iter().map(|t| t.0).collect();
            assert_eq!(phases, [1, 2, 3], "interleaved: {seen:?}");
            assert!(triple.iter().all(|t| (t.1, t.2) == (old, new)));
            current = new;
        }
        assert_eq!(state.current_state(), current);
        assert!(!state.is_transitioning());
        assert!(late.load(Ordering::SeqCst) <= 1, "notified after unadvise");
    });
}
