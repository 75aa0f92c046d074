//! The engine's behavioural contract, one test per numbered property (P1–P28) of the MAPI
//! digest §6. Properties P29–P40 (offline state and connection hooks) are in `connection.rs`
//! and, over HTTP, in the server's `tests/connection.rs`.

mod common;

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use herald_core::*;

fn exact(k: &str) -> Scope {
    Scope::Exact(k.into())
}

fn any() -> EventMask {
    EventMask::ALL
}

fn async_opts() -> SubscribeOptions {
    SubscribeOptions::default()
}

/// A sink that records when it is dropped.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn p01_connection_ids_are_nonzero_unique_and_never_reused() {
    let hub = hub();
    let mut seen = HashSet::new();
    let mut live = Vec::new();
    for round in 0..5 {
        for i in 0..200 {
            let id = hub
                .subscribe(
                    exact(&format!("k{i}")),
                    any(),
                    |_: Delivery<'_>| Flow::Continue,
                    async_opts(),
                )
                .unwrap();
            assert_ne!(id.get(), 0);
            assert!(seen.insert(id), "id {id} reused in round {round}");
            live.push(id);
        }
        for id in live.drain(..100) {
            hub.unsubscribe(id).unwrap();
        }
    }
    assert_eq!(seen.len(), 1000);
}

/// P1 across hubs: ids are unique in the process, so an id from one hub is not found in
/// another, and unsubscribing it there leaves the other hub's registration alone.
#[test]
fn p01_connection_ids_are_unique_across_hubs_and_a_wrong_hub_unsubscribe_is_not_found() {
    let (a, b) = (hub(), hub());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let in_b = b
        .subscribe(
            exact("k"),
            any(),
            move |_: Delivery<'_>| {
                c.fetch_add(1, Ordering::SeqCst);
                Flow::Continue
            },
            SubscribeOptions::sync(),
        )
        .unwrap();
    let in_a = a
        .subscribe(
            exact("k"),
            any(),
            |_: Delivery<'_>| Flow::Continue,
            async_opts(),
        )
        .unwrap();
    assert_ne!(in_a, in_b, "two hubs gave out the same id");
    assert_eq!(
        a.unsubscribe(in_b),
        Err(herald_core::UnsubscribeError::NotFound(in_b.get()))
    );
    b.notify(Notification::new("k", Event::Extended(Extended::default())))
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "b's registration still works"
    );
    a.unsubscribe(in_a).unwrap();
    b.unsubscribe(in_b).unwrap();
}

#[test]
fn p02_missing_key_is_rejected_and_keys_are_raw_bytes() {
    let hub = hub();
    let sink = |_: Delivery<'_>| Flow::Continue;
    assert_eq!(
        hub.subscribe(
            Scope::Exact(Key::new(Vec::<u8>::new())),
            any(),
            sink,
            async_opts()
        ),
        Err(SubscribeError::EmptyKey)
    );
    assert_eq!(
        hub.subscribe(Scope::Subtree(Key::default()), any(), sink, async_opts()),
        Err(SubscribeError::EmptyKey)
    );
    let err = hub.notify(vec![
        created("a"),
        Notification::new(
            Key::default(),
            Event::ObjectCreated(ObjectChange::default()),
        ),
    ]);
    assert_eq!(
        err,
        Err(NotifyError::InvalidEvent {
            index: 1,
            reason: InvalidEvent::EmptyKey
        })
    );

    // Binary keys, with bytes that look like separators, match exactly and only exactly.
    let binary = Key::new(vec![0x00, 0xff, b'/', 0x10]);
    let (rec, rx) = Recorder::new();
    hub.subscribe(Scope::Exact(binary.clone()), any(), rec, async_opts())
        .unwrap();
    let mut under = binary.as_bytes().to_vec();
    under.extend_from_slice(b"/child");
    hub.notify(Notification::new(
        Key::new(under),
        Event::ObjectCreated(ObjectChange::default()),
    ))
    .unwrap();
    hub.notify(Notification::new(
        binary.clone(),
        Event::ObjectCreated(ObjectChange::default()),
    ))
    .unwrap();
    let got = recv_events(&rx, 1);
    assert_eq!(got[0].key, binary);
    assert_quiet(&rx);
}

#[test]
fn p03_hub_holds_its_own_reference_to_the_sink() {
    let hub = hub();
    let dropped = Arc::new(AtomicBool::new(false));
    let (count, counting) = counter();
    let flag = DropFlag(dropped.clone());
    let sink = move |d: Delivery<'_>| {
        let _keep = &flag;
        counting.on_notify(d)
    };
    let id = hub
        .subscribe(exact("a"), any(), sink, async_opts())
        .unwrap();
    // The caller's handle is gone (moved in); the hub keeps the sink alive.
    assert!(!dropped.load(Ordering::SeqCst));
    hub.notify(created("a")).unwrap();
    assert!(hub.flush(WAIT));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(!dropped.load(Ordering::SeqCst));
    hub.unsubscribe(id).unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "unsubscribe releases the hub's reference"
    );
}

#[test]
fn p04_unsubscribe_live_ok_unknown_or_removed_not_found() {
    let hub = hub();
    let id = hub
        .subscribe(
            exact("a"),
            any(),
            |_: Delivery<'_>| Flow::Continue,
            async_opts(),
        )
        .unwrap();
    assert_eq!(hub.unsubscribe(id), Ok(()));
    let again = hub.unsubscribe(id).unwrap_err();
    assert_eq!(again, UnsubscribeError::NotFound(id.get()));
    assert_eq!(again.hresult(), MAPI_E_NOT_FOUND);
    let never = ConnectionId::new(987_654).unwrap();
    assert_eq!(
        hub.unsubscribe(never),
        Err(UnsubscribeError::NotFound(987_654))
    );
}

#[test]
fn p05_unpaired_registrations_are_reported_at_shutdown() {
    let hub = hub();
    let sink = |_: Delivery<'_>| Flow::Continue;
    let a = hub
        .subscribe(exact("a"), any(), sink, async_opts())
        .unwrap();
    let b = hub
        .subscribe(exact("b"), any(), sink, async_opts())
        .unwrap();
    let c = hub
        .subscribe(exact("c"), any(), sink, async_opts())
        .unwrap();
    hub.unsubscribe(b).unwrap();
    let report = hub.shutdown(WAIT);
    assert!(report.drained);
    assert_eq!(report.unpaired, vec![a, c]);
    assert_eq!(hub.notify(created("a")), Err(NotifyError::ShutDown));
    assert_eq!(
        hub.subscribe(exact("a"), any(), sink, async_opts()),
        Err(SubscribeError::ShutDown)
    );
}

#[test]
fn p06_notify_reaches_only_byte_equal_keys() {
    let hub = hub();
    let (ra, rx_a) = Recorder::new();
    let (rb, rx_b) = Recorder::new();
    let (rab, rx_ab) = Recorder::new();
    hub.subscribe(exact("a"), any(), ra, async_opts()).unwrap();
    hub.subscribe(exact("b"), any(), rb, async_opts()).unwrap();
    hub.subscribe(exact("a/b"), any(), rab, async_opts())
        .unwrap();
    hub.notify(created("a")).unwrap();
    hub.notify(created("A")).unwrap();
    hub.notify(created("a ")).unwrap();
    assert!(hub.flush(WAIT));
    assert_eq!(recv_events(&rx_a, 1)[0].key, Key::from("a"));
    assert_quiet(&rx_a);
    assert_quiet(&rx_b);
    assert_quiet(&rx_ab);
}

#[test]
fn p07_a_registration_sees_only_kinds_in_its_mask() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(
        exact("f"),
        EventKind::ObjectCreated.into(),
        rec,
        async_opts(),
    )
    .unwrap();
    let mut a = created("f");
    a.watermark = Some(Watermark(1));
    let mut c = created("f");
    c.watermark = Some(Watermark(3));
    hub.notify(vec![a.clone(), modified("f"), c.clone()])
        .unwrap();
    // A mixed batch is split: the subscriber gets the kinds it asked for, in order, as one
    // delivery.
    let first = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(first, Seen::Events(vec![a, c]));
    hub.notify(modified("f")).unwrap();
    assert_quiet(&rx);
    assert_eq!(
        hub.subscribe(
            exact("f"),
            EventMask::from_bits(0x4000_0000),
            |_: Delivery<'_>| Flow::Continue,
            async_opts()
        ),
        Err(SubscribeError::EmptyMask(0x4000_0000))
    );
}

#[test]
fn p08_notify_without_registrations_does_nothing() {
    let hub = hub();
    let out = hub
        .notify(vec![created("nobody"), modified("nobody")])
        .unwrap();
    assert_eq!(out, NotifyOutcome::default());
    assert_eq!(out.flags(), 0);
}

#[test]
fn p09_async_notify_returns_before_any_sink_runs() {
    let hub = hub();
    let (gate_tx, gate_rx) = channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let caller = thread::current().id();
    let (result_tx, result_rx) = channel();
    let result_tx = Mutex::new(result_tx);
    hub.subscribe(
        exact("a"),
        any(),
        move |_: Delivery<'_>| {
            // If notify waited for this sink, the gate would never open.
            let opened = gate_rx.lock().unwrap().recv_timeout(WAIT).is_ok();
            let on_caller = thread::current().id() == caller;
            result_tx.lock().unwrap().send((opened, on_caller)).unwrap();
            Flow::Continue
        },
        async_opts(),
    )
    .unwrap();
    hub.notify(created("a")).unwrap();
    gate_tx.send(()).unwrap();
    let (opened, on_caller) = result_rx.recv_timeout(WAIT).unwrap();
    assert!(opened, "the sink ran before notify returned");
    assert!(!on_caller, "an async sink ran on the notifying thread");
}

#[test]
fn p09_no_async_sink_starts_while_the_causing_notify_still_runs_its_sync_sinks() {
    let hub = hub();
    // A slow sync sink: notify is still running while it sleeps.
    let notify_done = Arc::new(AtomicUsize::new(0));
    let flag = notify_done.clone();
    hub.subscribe(
        exact("a"),
        any(),
        move |_: Delivery<'_>| {
            thread::sleep(Duration::from_millis(50));
            flag.store(1, Ordering::SeqCst);
            Flow::Continue
        },
        SubscribeOptions::sync(),
    )
    .unwrap();
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let seen = notify_done.clone();
    hub.subscribe(
        exact("a"),
        any(),
        move |_: Delivery<'_>| {
            tx.lock()
                .unwrap()
                .send(seen.load(Ordering::SeqCst))
                .unwrap();
            Flow::Continue
        },
        async_opts(),
    )
    .unwrap();
    // Later rounds find the delivery thread still busy with the subscription (it takes what
    // is queued without being scheduled again): the batch must wait for its release there too.
    for round in 0..20 {
        notify_done.store(0, Ordering::SeqCst);
        hub.notify(created("a")).unwrap();
        let at_start = rx.recv_timeout(WAIT).unwrap();
        assert_eq!(
            at_start, 1,
            "an async sink started while the notify that caused it was still running (round {round})"
        );
    }
}

#[test]
fn p10_sync_notify_returns_after_every_sync_sink_ran() {
    let hub = hub();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let ran = ran.clone();
        hub.subscribe(
            exact("a"),
            any(),
            move |_: Delivery<'_>| {
                thread::sleep(Duration::from_millis(20));
                ran.fetch_add(1, Ordering::SeqCst);
                Flow::Continue
            },
            SubscribeOptions::sync(),
        )
        .unwrap();
    }
    let out = hub.notify(created("a")).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    assert_eq!(out.sync_calls, 3);
    assert!(!out.canceled);
}

#[test]
fn p11_discontinue_from_a_sync_sink_stops_the_rest() {
    let hub = hub();
    let calls = Arc::new(Mutex::new(Vec::new()));
    for i in 0..3 {
        let calls = calls.clone();
        hub.subscribe(
            exact("a"),
            any(),
            move |_: Delivery<'_>| {
                calls.lock().unwrap().push(i);
                if i == 1 {
                    Flow::from_mapi(CALLBACK_DISCONTINUE)
                } else {
                    Flow::Continue
                }
            },
            SubscribeOptions::from_mapi_flags(NOTIFY_SYNC),
        )
        .unwrap();
    }
    let out = hub.notify(created("a")).unwrap();
    assert!(out.canceled);
    assert_eq!(out.flags(), NOTIFY_CANCELED);
    assert_eq!(*calls.lock().unwrap(), vec![0, 1]);
    assert_eq!(out.sync_calls, 2);
}

#[test]
fn p12_out_flags_are_zero_without_discontinue() {
    let hub = hub();
    hub.subscribe(
        exact("a"),
        any(),
        |_: Delivery<'_>| Flow::Continue,
        SubscribeOptions::sync(),
    )
    .unwrap();
    let out = hub.notify(created("a")).unwrap();
    assert_eq!(out.flags(), 0);
    // The MAPI_UNICODE input bit shares NOTIFY_CANCELED's value; it is never an output.
    assert_eq!(out.flags() & 0x8000_0000, 0);
}

#[test]
fn p13_discontinue_from_an_async_sink_has_no_effect() {
    let hub = hub();
    let (stopper_count, stopper_counting) = counter();
    hub.subscribe(
        exact("a"),
        any(),
        move |d: Delivery<'_>| {
            stopper_counting.on_notify(d);
            Flow::Discontinue
        },
        async_opts(),
    )
    .unwrap();
    let (after_count, after) = counter();
    hub.subscribe(exact("a"), any(), after, async_opts())
        .unwrap();
    let (sync_count, sync_sink) = counter();
    hub.subscribe(exact("a"), any(), sync_sink, SubscribeOptions::sync())
        .unwrap();
    for _ in 0..3 {
        let out = hub.notify(created("a")).unwrap();
        assert!(!out.canceled);
    }
    assert!(hub.flush(WAIT));
    assert_eq!(stopper_count.load(Ordering::SeqCst), 3);
    assert_eq!(after_count.load(Ordering::SeqCst), 3);
    assert_eq!(sync_count.load(Ordering::SeqCst), 3);
}

#[test]
fn p14_a_sink_sees_a_batch_in_notify_order() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(Scope::Subtree("s".into()), any(), rec, async_opts())
        .unwrap();
    let batch: Vec<_> = (0..200)
        .map(|i| numbered(&format!("s/{}", i % 7), i))
        .collect();
    hub.notify(batch.clone()).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Seen::Events(batch));
}

#[test]
fn p15_notify_copies_the_batch() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(exact("a"), any(), rec, async_opts()).unwrap();
    let mut events = vec![numbered("a", 1), numbered("a", 2)];
    let expected = events.clone();
    hub.notify(&events[..]).unwrap();
    // The caller frees and reuses its buffer right away.
    events.clear();
    events.push(numbered("a", 99));
    drop(events);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Seen::Events(expected));
}

#[test]
fn p16_the_hub_keeps_no_copy_after_delivery() {
    let hub = hub();
    let kept = Arc::new(Mutex::new(Vec::new()));
    let k = kept.clone();
    hub.subscribe(
        exact("a"),
        any(),
        move |d: Delivery<'_>| {
            if let Delivery::Events(e) = d {
                // A sink that wants the events beyond the call copies them.
                k.lock().unwrap().extend(e.iter().cloned());
            }
            Flow::Continue
        },
        async_opts(),
    )
    .unwrap();
    let payload = Bytes::from(vec![7u8; 64]);
    hub.notify(Notification::new(
        "a",
        Event::Extended(Extended {
            event: 1,
            data: payload.clone(),
        }),
    ))
    .unwrap();
    assert!(hub.flush(WAIT));
    let copies = kept.lock().unwrap().clone();
    assert_eq!(copies.len(), 1);
    drop(copies);
    kept.lock().unwrap().clear();
    // Only the test's handle is left: the hub released the delivered batch.
    assert!(
        payload.is_unique(),
        "the hub still holds the delivered batch"
    );
}

#[test]
fn p17_n_events_are_n_entries() {
    let hub = hub();
    let (rec, rx) = Recorder::new();
    hub.subscribe(
        exact("t"),
        EventKind::TableModified.into(),
        rec,
        async_opts(),
    )
    .unwrap();
    let rows: Vec<_> = (0..5u8)
        .map(|i| {
            Notification::new(
                "t",
                Event::TableModified(TableChange::row_added(
                    PropValue::instance_key(vec![i]),
                    None,
                    vec![],
                )),
            )
        })
        .collect();
    hub.notify(rows).unwrap();
    match rx.recv_timeout(WAIT).unwrap() {
        Seen::Events(e) => assert_eq!(e.len(), 5),
        other @ Seen::Overflow(_) => panic!("{other:?}"),
    }
}

#[test]
fn p18_fields_that_do_not_apply_are_empty() {
    let changed = TableChange::without_row(TableEvent::Changed);
    assert_eq!(changed.row, vec![]);
    assert_eq!(changed.index.tag, PR_NULL);
    assert_eq!(changed.prior.tag, PR_NULL);
    assert_eq!(changed.hresult, 0);
    let deleted = TableChange::row_deleted(PropValue::instance_key(vec![1]));
    assert!(deleted.row.is_empty());
    assert_eq!(deleted.prior.tag, PR_NULL);
    assert_eq!(created("a").old_key(), None);
    // A row on an event that carries none is refused.
    let hub = hub();
    let mut bad = TableChange::without_row(TableEvent::Reload);
    bad.row.push(PropValue::null());
    assert_eq!(
        hub.notify(Notification::new("t", Event::TableModified(bad))),
        Err(NotifyError::InvalidEvent {
            index: 0,
            reason: InvalidEvent::UnexpectedRow(TableEvent::Reload)
        })
    );
}

#[test]
fn p19_first_row_prior_is_pr_null_never_zero() {
    let first = TableChange::row_added(PropValue::instance_key(vec![1]), None, vec![]);
    assert_eq!(first.prior.tag, PR_NULL);
    assert_eq!(PR_NULL, 0x0000_0001);
    let hub = hub();
    let mut bad = first.clone();
    bad.prior.tag = 0;
    assert_eq!(
        hub.notify(Notification::new("t", Event::TableModified(bad))),
        Err(NotifyError::InvalidEvent {
            index: 0,
            reason: InvalidEvent::PriorTagZero
        })
    );
}

#[test]
fn p20_an_entry_may_refer_to_a_row_added_earlier_in_the_batch() {
    let hub = hub();
    let table: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let t = table.clone();
    hub.subscribe(
        exact("t"),
        EventKind::TableModified.into(),
        move |d: Delivery<'_>| {
            if let Delivery::Events(events) = d {
                let mut rows = t.lock().unwrap();
                for n in events {
                    let Event::TableModified(tc) = &n.event else {
                        continue;
                    };
                    let PropData::Binary(index) = &tc.index.value else {
                        continue;
                    };
                    let at = match &tc.prior.value {
                        PropData::Binary(prior) => {
                            rows.iter()
                                .position(|r| r[..] == prior[..])
                                .expect("prior row is known")
                                + 1
                        }
                        _ => 0,
                    };
                    rows.insert(at, index.to_vec());
                }
            }
            Flow::Continue
        },
        async_opts(),
    )
    .unwrap();
    let add = |i: u8, prior: Option<u8>| {
        Notification::new(
            "t",
            Event::TableModified(TableChange::row_added(
                PropValue::instance_key(vec![i]),
                prior.map(|p| PropValue::instance_key(vec![p])),
                vec![],
            )),
        )
    };
    // B is placed after A, which only exists because of the entry before it.
    hub.notify(vec![add(1, None), add(2, Some(1)), add(3, Some(1))])
        .unwrap();
    assert!(hub.flush(WAIT));
    assert_eq!(*table.lock().unwrap(), vec![vec![1], vec![3], vec![2]]);
}

#[test]
fn p21_what_a_sink_sees_does_not_depend_on_batch_boundaries() {
    let events: Vec<_> = (0..50).map(|i| numbered("a", i)).collect();
    let run = |batches: Vec<Vec<Notification>>| {
        let hub = hub();
        let (rec, rx) = Recorder::new();
        hub.subscribe(exact("a"), any(), rec, async_opts()).unwrap();
        for b in batches {
            hub.notify(b).unwrap();
        }
        recv_events(&rx, 50)
    };
    let whole = run(vec![events.clone()]);
    let singles = run(events.iter().cloned().map(|e| vec![e]).collect());
    let chunks = run(events.chunks(7).map(<[_]>::to_vec).collect());
    assert_eq!(whole, events);
    assert_eq!(singles, events);
    assert_eq!(chunks, events);
}

#[test]
fn p22_unsubscribe_during_a_callback_on_another_thread_waits_for_it() {
    let hub = hub();
    let (entered_tx, entered_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicBool::new(false));
    let entered_tx = Mutex::new(entered_tx);
    let go_rx = Mutex::new(go_rx);
    let f = finished.clone();
    let flag = DropFlag(dropped.clone());
    let id = hub
        .subscribe(
            exact("a"),
            any(),
            move |_: Delivery<'_>| {
                let _keep = &flag;
                entered_tx.lock().unwrap().send(()).unwrap();
                go_rx.lock().unwrap().recv_timeout(WAIT).unwrap();
                thread::sleep(Duration::from_millis(50));
                f.store(true, Ordering::SeqCst);
                Flow::Continue
            },
            async_opts(),
        )
        .unwrap();
    hub.notify(created("a")).unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    let h = hub.clone();
    let (fin, drp) = (finished.clone(), dropped.clone());
    let unsub = thread::spawn(move || {
        h.unsubscribe(id).unwrap();
        (fin.load(Ordering::SeqCst), drp.load(Ordering::SeqCst))
    });
    thread::sleep(Duration::from_millis(50));
    go_tx.send(()).unwrap();
    let (finished_when_returned, dropped_when_returned) = unsub.join().unwrap();
    assert!(
        finished_when_returned,
        "unsubscribe returned while the callback was running"
    );
    assert!(
        dropped_when_returned,
        "the sink was not released after the callback"
    );
}

#[test]
fn p23_nothing_reaches_the_sink_after_unsubscribe() {
    let hub = hub();
    let (entered_tx, entered_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let id = hub
        .subscribe(
            exact("a"),
            any(),
            move |_: Delivery<'_>| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    go_rx.lock().unwrap().recv_timeout(WAIT).unwrap();
                }
                Flow::Continue
            },
            async_opts(),
        )
        .unwrap();
    hub.notify(created("a")).unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    // These are queued behind the running callback when unsubscribe happens.
    for _ in 0..5 {
        hub.notify(created("a")).unwrap();
    }
    let h = hub.clone();
    let unsub = thread::spawn(move || h.unsubscribe(id));
    thread::sleep(Duration::from_millis(50));
    go_tx.send(()).unwrap();
    unsub.join().unwrap().unwrap();
    assert_eq!(hub.notify(created("a")).unwrap().matched, 0);
    assert!(hub.flush(WAIT));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "queued deliveries ran after unsubscribe"
    );
}

#[test]
fn p24_a_callback_may_subscribe_and_unsubscribe_itself_and_others() {
    let hub = hub();
    let (rec_y, rx_y) = Recorder::new();
    let y = hub
        .subscribe(exact("a"), any(), rec_y, async_opts())
        .unwrap();
    let (rec_z, rx_z) = Recorder::new();
    let rec_z = Arc::new(Mutex::new(Some(rec_z)));
    let self_id: Arc<Mutex<Option<ConnectionId>>> = Arc::default();
    let (h, sid) = (hub.clone(), self_id.clone());
    let x = hub
        .subscribe(
            exact("a"),
            any(),
            move |_: Delivery<'_>| {
                if let Some(z) = rec_z.lock().unwrap().take() {
                    h.subscribe(exact("a"), any(), z, SubscribeOptions::default())
                        .unwrap();
                    h.unsubscribe(y).unwrap();
                    h.unsubscribe(sid.lock().unwrap().unwrap()).unwrap();
                }
                Flow::Continue
            },
            async_opts(),
        )
        .unwrap();
    *self_id.lock().unwrap() = Some(x);
    hub.notify(numbered("a", 1)).unwrap();
    assert!(hub.flush(WAIT));
    hub.notify(numbered("a", 2)).unwrap();
    assert!(hub.flush(WAIT));
    let z_events = recv_events(&rx_z, 1);
    assert_eq!(number(&z_events[0]), 2);
    assert_eq!(hub.connections().len(), 1);
    // Y may or may not have seen event 1 (it raced with X), but never event 2.
    while let Ok(seen) = rx_y.try_recv() {
        assert!(seen.events().iter().all(|n| number(n) == 1));
    }

    // Two sinks running at once that unsubscribe each other do not deadlock.
    let hub = common::hub();
    let barrier = Arc::new(Barrier::new(2));
    let ids: Arc<Mutex<Vec<ConnectionId>>> = Arc::default();
    for me in 0..2usize {
        let (h, b, all) = (hub.clone(), barrier.clone(), ids.clone());
        let id = hub
            .subscribe(
                exact(&format!("m{me}")),
                any(),
                move |_: Delivery<'_>| {
                    b.wait();
                    let other = all.lock().unwrap()[1 - me];
                    let _ = h.unsubscribe(other);
                    Flow::Continue
                },
                async_opts(),
            )
            .unwrap();
        ids.lock().unwrap().push(id);
    }
    hub.notify(vec![created("m0"), created("m1")]).unwrap();
    assert!(hub.flush(WAIT), "mutual unsubscribe deadlocked");
    assert!(hub.connections().is_empty());
}

#[test]
fn p25_a_sync_notify_from_inside_a_sync_callback_is_an_error() {
    let hub = hub();
    let inner: Arc<Mutex<Vec<Result<NotifyOutcome, NotifyError>>>> = Arc::default();
    let (h, r) = (hub.clone(), inner.clone());
    hub.subscribe(
        exact("a"),
        any(),
        move |_: Delivery<'_>| {
            r.lock().unwrap().push(h.notify(created("a")));
            // Async-only targets may still be notified from here.
            r.lock().unwrap().push(h.notify(created("async-only")));
            Flow::Continue
        },
        SubscribeOptions::sync(),
    )
    .unwrap();
    let (n, async_sink) = counter();
    hub.subscribe(exact("async-only"), any(), async_sink, async_opts())
        .unwrap();
    let out = hub.notify(created("a")).unwrap();
    assert_eq!(out.sync_calls, 1);
    let results = inner.lock().unwrap().clone();
    assert_eq!(results[0], Err(NotifyError::ReentrantSync));
    assert!(results[1].is_ok());
    assert!(hub.flush(WAIT));
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn p26_a_thread_affine_sink_runs_only_on_its_dispatcher_thread() {
    let hub = hub();
    let dispatcher = Dispatcher::new();
    // Rc: the inner sink is neither Send nor Sync.
    let threads = Rc::new(std::cell::RefCell::new(Vec::new()));
    let t = threads.clone();
    dispatcher
        .subscribe(
            &hub,
            exact("a"),
            any(),
            move |d: Delivery<'_>| {
                if let Delivery::Events(e) = d {
                    for _ in e {
                        t.borrow_mut().push(thread::current().id());
                    }
                }
                Flow::Continue
            },
            async_opts(),
        )
        .unwrap();
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let h = hub.clone();
            thread::spawn(move || {
                for _ in 0..25 {
                    h.notify(created("a")).unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let mut got = 0;
    while got < 100 {
        got += dispatcher.dispatch_timeout(WAIT);
    }
    let me = thread::current().id();
    assert_eq!(threads.borrow().len(), 100);
    assert!(threads.borrow().iter().all(|t| *t == me));
}

#[test]
fn p27_a_thread_affine_sink_cannot_be_sync() {
    let hub = hub();
    let dispatcher = Dispatcher::new();
    let wrapped = dispatcher.wrap(|_: Delivery<'_>| Flow::Continue);
    assert_eq!(
        hub.subscribe(exact("a"), any(), wrapped, SubscribeOptions::sync()),
        Err(SubscribeError::AffineSync)
    );
    assert_eq!(
        hub.subscribe_receiver(exact("a"), any(), SubscribeOptions::sync())
            .map(|_| ()),
        Err(SubscribeError::AffineSync)
    );
}

#[test]
fn p28_dispatch_pending_delivers_everything_queued_before_returning() {
    let hub = hub();
    let dispatcher = Dispatcher::new();
    let seen = Rc::new(std::cell::Cell::new(0));
    let s = seen.clone();
    for key in ["a", "b"] {
        let s = s.clone();
        dispatcher
            .subscribe(
                &hub,
                exact(key),
                any(),
                move |d: Delivery<'_>| {
                    if let Delivery::Events(e) = d {
                        s.set(s.get() + e.len());
                    }
                    Flow::Continue
                },
                async_opts(),
            )
            .unwrap();
    }
    for i in 0..10 {
        hub.notify(numbered(if i % 2 == 0 { "a" } else { "b" }, i))
            .unwrap();
    }
    assert_eq!(seen.get(), 0, "nothing runs before dispatch");
    let n = dispatcher.dispatch_pending();
    assert_eq!(n, 10);
    assert_eq!(seen.get(), 10);
    assert_eq!(dispatcher.dispatch_pending(), 0);
}
