//! Random sequences of subscribe / notify / unsubscribe / drain, checked against a simple model:
//! every subscriber gets exactly the events its scope and mask select, once, in notify order,
//! one delivery per notify; nothing after it is unsubscribed.

mod common;

use std::collections::HashMap;

use common::Recorder;
use herald_core::*;
use proptest::prelude::*;

const KEYS: [&str; 6] = ["a", "a/x", "a/x/1", "a/y", "b", "b/x"];
const KINDS: [EventKind; 4] = [
    EventKind::ObjectCreated,
    EventKind::ObjectModified,
    EventKind::ObjectMoved,
    EventKind::NewMail,
];

#[derive(Clone, Debug)]
enum Op {
    /// key index, subtree?, mask bits over KINDS, receiver (owner-drained) or pool sink
    Subscribe(usize, bool, u8, bool),
    /// index into the subscriptions made so far
    Unsubscribe(usize),
    /// (key index, kind index, old key index for moves)
    Notify(Vec<(usize, usize, usize)>),
    /// drain one receiver now
    Drain(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..KEYS.len(), any::<bool>(), 1u8..16, any::<bool>())
            .prop_map(|(k, t, m, r)| Op::Subscribe(k, t, m, r)),
        1 => (0usize..32).prop_map(Op::Unsubscribe),
        5 => prop::collection::vec((0..KEYS.len(), 0..KINDS.len(), 0..KEYS.len()), 1..5)
            .prop_map(Op::Notify),
        1 => (0usize..32).prop_map(Op::Drain),
    ]
}

fn make_event(key: usize, kind: usize, old: usize, seq: u32) -> Notification {
    let mut n = match KINDS[kind] {
        EventKind::ObjectCreated => {
            Notification::new(KEYS[key], Event::ObjectCreated(ObjectChange::default()))
        }
        EventKind::ObjectModified => {
            Notification::new(KEYS[key], Event::ObjectModified(ObjectChange::default()))
        }
        EventKind::ObjectMoved => Notification::new(
            KEYS[key],
            Event::ObjectMoved(Relocation {
                old_key: KEYS[old].into(),
                ..Default::default()
            }),
        ),
        _ => Notification::new(KEYS[key], Event::NewMail(NewMail::default())),
    };
    n.watermark = Some(Watermark(u64::from(seq)));
    n
}

/// The model's own reading of "does this subscription select this event".
fn selects(scope_key: &str, subtree: bool, mask: u8, n: &Notification) -> bool {
    let kind_ok = KINDS
        .iter()
        .enumerate()
        .any(|(i, k)| mask & (1 << i) != 0 && *k == n.kind());
    let within = |k: &Key| {
        let k = k.as_str().unwrap();
        if subtree {
            k == scope_key || k.starts_with(&format!("{scope_key}/"))
        } else {
            k == scope_key
        }
    };
    kind_ok && (within(&n.key) || n.old_key().is_some_and(within))
}

enum Handle {
    Receiver(Receiver),
    Pool(std::sync::mpsc::Receiver<common::Seen>),
}

struct Sub {
    id: ConnectionId,
    handle: Handle,
    scope_key: &'static str,
    subtree: bool,
    mask: u8,
    live: bool,
    /// What the model says it must receive, delivery by delivery (watermark lists).
    expected: Vec<Vec<u64>>,
    /// What it received.
    got: Vec<Vec<u64>>,
}

fn drain(sub: &mut Sub) {
    if let Handle::Receiver(rx) = &mut sub.handle {
        while let Ok(d) = rx.try_recv() {
            match d {
                OwnedDelivery::Events(b) => sub
                    .got
                    .push(b.iter().map(|n| n.watermark.unwrap().0).collect()),
                OwnedDelivery::Overflow(o) => panic!("unexpected overflow {o:?}"),
            }
        }
    }
}

fn collect_pool(sub: &mut Sub) {
    if let Handle::Pool(rx) = &sub.handle {
        while let Ok(s) = rx.try_recv() {
            sub.got
                .push(s.events().iter().map(|n| n.watermark.unwrap().0).collect());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn deliveries_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let hub = common::hub();
        let mut subs: Vec<Sub> = Vec::new();
        let mut seq = 0u32;
        for op in ops {
            match op {
                Op::Subscribe(k, subtree, mask, receiver) => {
                    let scope = if subtree { Scope::Subtree(KEYS[k].into()) } else { Scope::Exact(KEYS[k].into()) };
                    let emask: EventMask = KINDS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, k)| *k).collect();
                    let opts = SubscribeOptions::default().with_queue_capacity(1 << 16);
                    let (id, handle) = if receiver {
                        let rx = hub.subscribe_receiver(scope, emask, opts).unwrap();
                        (rx.id(), Handle::Receiver(rx))
                    } else {
                        let (rec, rx) = Recorder::new();
                        (hub.subscribe(scope, emask, rec, opts).unwrap(), Handle::Pool(rx))
                    };
                    subs.push(Sub { id, handle, scope_key: KEYS[k], subtree, mask, live: true, expected: vec![], got: vec![] });
                }
                Op::Unsubscribe(i) => {
                    if let Some(sub) = subs.get_mut(i) {
                        let r = hub.unsubscribe(sub.id);
                        prop_assert_eq!(r.is_ok(), sub.live);
                        if sub.live {
                            sub.live = false;
                            // Whatever a pool sink got before this point is a prefix of the
                            // model; nothing may come after.
                            collect_pool(sub);
                            let n = sub.got.len();
                            prop_assert!(n <= sub.expected.len());
                            sub.expected.truncate(n);
                        }
                    }
                }
                Op::Notify(spec) => {
                    let batch: Vec<Notification> = spec.iter().map(|&(k, kind, old)| { seq += 1; make_event(k, kind, old, seq) }).collect();
                    let mut matched = 0;
                    for sub in subs.iter_mut().filter(|s| s.live) {
                        let part: Vec<u64> = batch.iter().filter(|n| selects(sub.scope_key, sub.subtree, sub.mask, n)).map(|n| n.watermark.unwrap().0).collect();
                        if !part.is_empty() {
                            matched += 1;
                            sub.expected.push(part);
                        }
                    }
                    let out = hub.notify(batch).unwrap();
                    prop_assert_eq!(out.matched, matched);
                }
                Op::Drain(i) => {
                    if let Some(sub) = subs.get_mut(i) {
                        drain(sub);
                    }
                }
            }
        }
        prop_assert!(hub.flush(common::WAIT));
        let mut by_id = HashMap::new();
        for sub in subs.iter_mut() {
            if sub.live {
                drain(sub);
                collect_pool(sub);
            }
            prop_assert_eq!(&sub.got, &sub.expected, "subscription {}", sub.id);
            by_id.insert(sub.id, ());
        }
        prop_assert_eq!(by_id.len(), subs.len(), "connection ids must be unique");
    }
}
