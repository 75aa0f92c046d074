//! The log against a reference model: random appends (of every event kind, some with
//! idempotency keys), reads from random watermarks, and reopenings, checked step by step.

use std::collections::HashMap;

use herald_core::{Hub, Key, Notification, Watermark};
use herald_log::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<Notification>, Option<u8>),
    Read(u64, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop::collection::vec(herald_testkit::arb::notification(), 1..5),
            prop::option::of(0u8..4)
        )
            .prop_map(|(b, k)| Op::Append(b, k)),
        3 => (0u64..40, 1usize..10).prop_map(|(a, l)| Op::Read(a, l)),
        1 => Just(Op::Reopen),
    ]
}

/// What identifies a batch for idempotency: keys and events, not timestamps.
fn fingerprint(batch: &[Notification]) -> Vec<(Key, herald_core::Event)> {
    batch
        .iter()
        .map(|n| (n.key.clone(), n.event.clone()))
        .collect()
}

fn options() -> LogOptions {
    LogOptions {
        retention: Retention::default(),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_log_behaves_like_a_vector(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EmbeddedLog::open(dir.path(), options(), Hub::default()).unwrap();
        let mut model: Vec<Notification> = Vec::new();
        let mut keys: HashMap<u8, (u64, Vec<(Key, herald_core::Event)>)> = HashMap::new();
        for op in ops {
            match op {
                Op::Append(batch, key) => {
                    let opts = AppendOptions {
                        idempotency_key: key.map(|k| format!("key-{k}")),
                        ..Default::default()
                    };
                    let got = log.append_blocking(batch.clone(), opts);
                    match key.and_then(|k| keys.get(&k).map(|e| (k, e.clone()))) {
                        Some((_, (first, fp))) if fp == fingerprint(&batch) => {
                            let a = got.unwrap();
                            prop_assert!(a.replayed);
                            prop_assert_eq!(a.first, Watermark(first));
                        }
                        Some(_) => {
                            let is_conflict = matches!(got, Err(AppendError::IdempotencyConflict { .. }));
                            prop_assert!(is_conflict);
                        }
                        None => {
                            let a = got.unwrap();
                            prop_assert!(!a.replayed);
                            prop_assert_eq!(a.first, Watermark(model.len() as u64 + 1));
                            if let Some(k) = key {
                                keys.insert(k, (a.first.0, fingerprint(&batch)));
                            }
                            for (n, w) in batch.into_iter().zip(a.watermarks()) {
                                let mut n = n;
                                n.watermark = Some(w);
                                model.push(n);
                            }
                        }
                    }
                }
                Op::Read(after, limit) => {
                    let got = log.read_blocking(Watermark(after), limit);
                    let last = model.len() as u64;
                    if after > last {
                        let is_ahead = matches!(got, Err(ReadError::Ahead { .. }));
                        prop_assert!(is_ahead, "{:?}", got);
                    } else {
                        let want: Vec<Notification> = model
                            .iter()
                            .skip(after as usize)
                            .take(limit)
                            .cloned()
                            .collect();
                        prop_assert_eq!(got.unwrap(), want);
                    }
                }
                Op::Reopen => {
                    log.close().unwrap();
                    drop(log);
                    log = EmbeddedLog::open(dir.path(), options(), Hub::default()).unwrap();
                    prop_assert_eq!(log.bounds().unwrap().last, Watermark(model.len() as u64));
                }
            }
        }
    }
}
