//! Random sequences of subscribe / notify / unsubscribe / drain, checked against a simple model:
//! every subscriber (exact, subtree and children scopes) gets exactly the events its scope and
//! mask select, once, in notify order, one delivery per notify; nothing after it is
//! unsubscribed.

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum ScopeKind {
    Exact,
    Subtree,
    Children,
}

#[derive(Clone, Debug)]
enum Op {
    /// key index, scope kind, mask bits over KINDS, receiver (owner-drained) or pool sink
    Subscribe(usize, ScopeKind, u8, bool),
    /// index into the subscriptions made so far
    Unsubscribe(usize),
    /// (key index, kind index, old key index for moves, named parent: a key index, or
    /// KEYS.len() for none, in which case new mail names the key's own parent)
    Notify(Vec<(usize, usize, usize, usize)>),
    /// drain one receiver now
    Drain(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            0..KEYS.len(),
            prop_oneof![Just(ScopeKind::Exact), Just(ScopeKind::Subtree), Just(ScopeKind::Children)],
            1u8..16,
            any::<bool>(),
        )
            .prop_map(|(k, t, m, r)| Op::Subscribe(k, t, m, r)),
        1 => (0usize..32).prop_map(Op::Unsubscribe),
        5 => prop::collection::vec(
            (0..KEYS.len(), 0..KINDS.len(), 0..KEYS.len(), 0..=KEYS.len()),
            1..5
        )
            .prop_map(Op::Notify),
        1 => (0usize..32).prop_map(Op::Drain),
    ]
}

fn make_event(key: usize, kind: usize, old: usize, parent: usize, seq: u32) -> Notification {
    let named = KEYS.get(parent).map(|p| Key::from(*p));
    let change = ObjectChange {
        parent: named.clone(),
        ..Default::default()
    };
    let mut n = match KINDS[kind] {
        EventKind::ObjectCreated => Notification::new(KEYS[key], Event::ObjectCreated(change)),
        EventKind::ObjectModified => Notification::new(KEYS[key], Event::ObjectModified(change)),
        EventKind::ObjectMoved => Notification::new(
            KEYS[key],
            Event::ObjectMoved(Relocation {
                object: change,
                old_key: KEYS[old].into(),
                old_parent: None,
            }),
        ),
        _ => Notification::new(
            KEYS[key],
            Event::NewMail(NewMail {
                parent: named.unwrap_or_else(|| path_parent(KEYS[key]).unwrap_or("").into()),
                ..Default::default()
            }),
        ),
    };
    n.watermark = Some(Watermark(u64::from(seq)));
    n
}

fn path_parent(k: &str) -> Option<&str> {
    k.rfind('/').map(|i| &k[..i])
}

/// The model's own reading of "does this subscription select this event": keys for exact
/// and subtree scopes; for a children scope the folder the event names (else the key's path
/// parent) or, for a move, the old key's path parent.
fn selects(
    scope_key: &str,
    scope: ScopeKind,
    mask: u8,
    n: &Notification,
    spec: (usize, usize, usize, usize),
) -> bool {
    let kind_ok = KINDS
        .iter()
        .enumerate()
        .any(|(i, k)| mask & (1 << i) != 0 && *k == n.kind());
    let (key, kind, old, parent) = spec;
    let in_scope = match scope {
        ScopeKind::Exact => {
            KEYS[key] == scope_key
                || (KINDS[kind] == EventKind::ObjectMoved && KEYS[old] == scope_key)
        }
        ScopeKind::Subtree => {
            let within = |k: &str| k == scope_key || k.starts_with(&format!("{scope_key}/"));
            within(KEYS[key]) || (KINDS[kind] == EventKind::ObjectMoved && within(KEYS[old]))
        }
        ScopeKind::Children => {
            let folder = KEYS.get(parent).copied().or_else(|| path_parent(KEYS[key]));
            folder == Some(scope_key)
                || (KINDS[kind] == EventKind::ObjectMoved
                    && path_parent(KEYS[old]) == Some(scope_key))
        }
    };
    kind_ok && in_scope
}

enum Handle {
    Receiver(Receiver),
    Pool(std::sync::mpsc::Receiver<common::Seen>),
}

struct Sub {
    id: ConnectionId,
    handle: Handle,
    scope_key: &'static str,
    scope: ScopeKind,
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
                Op::Subscribe(k, kind, mask, receiver) => {
                    let scope = match kind {
                        ScopeKind::Exact => Scope::Exact(KEYS[k].into()),
                        ScopeKind::Subtree => Scope::Subtree(KEYS[k].into()),
                        ScopeKind::Children => Scope::Children(KEYS[k].into()),
                    };
                    let emask: EventMask = KINDS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, k)| *k).collect();
                    let opts = SubscribeOptions::default().with_queue_capacity(1 << 16);
                    let (id, handle) = if receiver {
                        let rx = hub.subscribe_receiver(scope, emask, opts).unwrap();
                        (rx.id(), Handle::Receiver(rx))
                    } else {
                        let (rec, rx) = Recorder::new();
                        (hub.subscribe(scope, emask, rec, opts).unwrap(), Handle::Pool(rx))
                    };
                    subs.push(Sub { id, handle, scope_key: KEYS[k], scope: kind, mask, live: true, expected: vec![], got: vec![] });
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
                    let batch: Vec<Notification> = spec.iter().map(|&(k, kind, old, parent)| { seq += 1; make_event(k, kind, old, parent, seq) }).collect();
                    let mut matched = 0;
                    for sub in subs.iter_mut().filter(|s| s.live) {
                        let part: Vec<u64> = batch.iter().zip(&spec).filter(|(n, sp)| selects(sub.scope_key, sub.scope, sub.mask, n, **sp)).map(|(n, _)| n.watermark.unwrap().0).collect();
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
