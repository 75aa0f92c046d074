//! Power loss, not only a process crash: the log runs on `herald-testkit`'s power-cut disk,
//! which keeps the synced image apart from the writes not yet synced and throws the latter
//! away (or scrambles and tears them) when the power fails. Each round runs one to three
//! phases on one disk; a phase reopens the log on what survived, checks it against what was
//! acknowledged, then runs random work from several producers (appends of random sizes,
//! durable and buffered, some with idempotency keys, some replayed, flushes) and two
//! subscription writers (puts, acks, in-flight marks, deletes) under retention, until the
//! power fails: at a chosen write, resize or sync of the disk (inside a commit or inside the
//! open), after a chosen number of acknowledged operations, or when the work is done.
//!
//! What every reopen checks:
//! - every acknowledged durable append (and every append acknowledged before a successful
//!   flush, a durable replay of it, or a later surviving append of its producer) is there, at
//!   the watermarks it was given, unless retention removed it from the front;
//! - watermarks run from `first` to `last` with no hole, every record decodes, no event is
//!   stored twice, a batch is whole (or cut only at the front, by retention) and each
//!   producer's batches are in order, with no batch missing between two that survived;
//! - retention removed nothing it did not have to;
//! - each subscription writer's records are exactly the state after its last acknowledged
//!   operation, or after the one in flight at the cut; no acknowledged position lies past the
//!   log;
//! - retrying every idempotency key of the phase replays the surviving batches at their
//!   watermarks and appends the lost ones anew, once;
//! - the log keeps working: an append after reopen reads back.
//!
//! The last phase closes the log cleanly and cuts the power at once: nothing may be lost.
//!
//! Rounds alternate between the two `CutMode`s (every unsynced write lost; unsynced writes
//! kept at random, some torn at sector boundaries) and run one per core at a time.
//! `HERALD_POWERCUT_ROUNDS` (default 200) sets the number of rounds for a long run,
//! `HERALD_POWERCUT_SEED` the seed, and `HERALD_POWERCUT_ONLY` runs one round of that seed (a
//! failure prints both). Run with `--nocapture` to see the cut points covered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::future::join_all;
use herald_core::*;
use herald_log::*;
use herald_testkit::powercut::{CutMode, CutReport, IoCall, PowerCutDisk, SplitMix64};

const PRODUCERS: u32 = 3;
const SUB_WRITERS: usize = 2;
const SUB_IDS: u64 = 3;
const MAX_EVENTS: u64 = 120;
/// Producer ids of the appends made right after a reopen.
const MARKER: u32 = 1000;

fn options() -> LogOptions {
    LogOptions {
        retention: Retention {
            max_age: None,
            max_bytes: None,
            max_events: Some(MAX_EVENTS),
        },
        ..Default::default()
    }
}

fn open(disk: &PowerCutDisk) -> Result<EmbeddedLog, LogError> {
    EmbeddedLog::open_with_backend(disk.backend(), "powercut", options(), Hub::default())
}

/// An event that says who appended it: (producer, batch sequence, index in the batch).
fn event(producer: u32, seq: u32, index: u32) -> Notification {
    let mut data = Vec::with_capacity(12);
    for v in [producer, seq, index] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Notification::new(
        format!("power/p{producer}"),
        Event::Extended(Extended {
            event: producer,
            data: data.into(),
        }),
    )
}

fn identity(n: &Notification) -> (u32, u32, u32) {
    let Event::Extended(e) = &n.event else {
        panic!("an event nobody appended: {n:?}")
    };
    assert_eq!(e.data.len(), 12, "an event nobody appended: {n:?}");
    let at = |i: usize| u32::from_le_bytes(e.data[i..i + 4].try_into().unwrap());
    (at(0), at(4), at(8))
}

/// Where a batch stands after the checks of a reopen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Appended in the phase that just ended; not checked yet.
    Pending,
    /// In the log from this watermark (or removed by retention from there).
    Present(u64),
    /// Never made it to the disk: must never appear.
    Lost,
}

#[derive(Clone, Debug)]
struct Batch {
    events: Vec<Notification>,
    key: Option<String>,
    acked: Option<Appended>,
    /// Acknowledged durably, directly or through a flush or durable replay after it.
    must_survive: bool,
    fate: Fate,
    /// Placed by a retry after a reopen, after its producer's later batches.
    by_retry: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SubRec {
    spec: String,
    acked: u64,
    inflight: u64,
}

type Subs = BTreeMap<String, SubRec>;

#[derive(Clone, Debug)]
enum SubOp {
    Put(String, String),
    Delete(String),
    Ack(String, u64),
    Inflight(String, u64),
}

/// The store's semantics, applied to the model; returns what the call answers.
fn apply(subs: &mut Subs, op: &SubOp) -> bool {
    match op {
        SubOp::Put(id, spec) => {
            subs.entry(id.clone()).or_default().spec = spec.clone();
            true
        }
        SubOp::Delete(id) => subs.remove(id).is_some(),
        SubOp::Ack(id, w) => subs
            .get_mut(id)
            .map(|r| r.acked = r.acked.max(*w))
            .is_some(),
        SubOp::Inflight(id, w) => subs.get_mut(id).map(|r| r.inflight = *w).is_some(),
    }
}

/// A subscription writer's records: as after its last acknowledged operation, and the
/// operation it was waiting for when the power failed.
#[derive(Clone, Debug, Default)]
struct SubWriter {
    now: Subs,
    pending: Option<SubOp>,
}

#[derive(Default)]
struct Model {
    batches: BTreeMap<(u32, u32), Batch>,
    subs: Vec<SubWriter>,
}

/// What the run covered, printed at the end.
#[derive(Default)]
struct Totals {
    rounds: u64,
    phases: u64,
    cuts: u64,
    cuts_mid_commit: u64,
    cuts_in_open: u64,
    by_point: BTreeMap<&'static str, u64>,
    ops_before_cut: [u64; 6],
    pending_writes_lost: u64,
    kept: u64,
    torn: u64,
    reopens: u64,
    /// Reopens that found retention had removed the oldest events.
    trimmed_reopens: u64,
    durable_checked: u64,
    events_checked: u64,
    replayed_after_reopen: u64,
    appended_anew: u64,
    sub_states_checked: u64,
    io_calls: u64,
    clean_closes: u64,
    /// Why redb refused images left by a cut during the log's creation.
    creations_rejected: Vec<String>,
}

const OPS_BUCKETS: [&str; 6] = ["0", "1-3", "4-15", "16-63", "64-255", "256+"];

impl Totals {
    fn add(&mut self, o: Totals) {
        for (mine, theirs) in [
            (&mut self.rounds, o.rounds),
            (&mut self.phases, o.phases),
            (&mut self.cuts, o.cuts),
            (&mut self.cuts_mid_commit, o.cuts_mid_commit),
            (&mut self.cuts_in_open, o.cuts_in_open),
            (&mut self.pending_writes_lost, o.pending_writes_lost),
            (&mut self.kept, o.kept),
            (&mut self.torn, o.torn),
            (&mut self.reopens, o.reopens),
            (&mut self.trimmed_reopens, o.trimmed_reopens),
            (&mut self.durable_checked, o.durable_checked),
            (&mut self.events_checked, o.events_checked),
            (&mut self.replayed_after_reopen, o.replayed_after_reopen),
            (&mut self.appended_anew, o.appended_anew),
            (&mut self.sub_states_checked, o.sub_states_checked),
            (&mut self.io_calls, o.io_calls),
            (&mut self.clean_closes, o.clean_closes),
        ] {
            *mine += theirs;
        }
        for (point, n) in o.by_point {
            *self.by_point.entry(point).or_default() += n;
        }
        for (mine, theirs) in self.ops_before_cut.iter_mut().zip(o.ops_before_cut) {
            *mine += theirs;
        }
        self.creations_rejected.extend(o.creations_rejected);
    }

    fn record_cut(&mut self, point: &'static str, report: CutReport, ops: u64) {
        self.cuts += 1;
        *self.by_point.entry(point).or_default() += 1;
        if report.pending > 0 {
            self.cuts_mid_commit += 1;
        }
        self.pending_writes_lost += (report.pending - report.kept) as u64;
        self.kept += report.kept as u64;
        self.torn += report.torn as u64;
        let bucket = match ops {
            0 => 0,
            1..=3 => 1,
            4..=15 => 2,
            16..=63 => 3,
            64..=255 => 4,
            _ => 5,
        };
        self.ops_before_cut[bucket] += 1;
    }
}

fn point(report: &CutReport, planned: &'static str) -> &'static str {
    match report.fuse {
        Some(IoCall::Write) => "fuse at a write",
        Some(IoCall::SetLen) => "fuse at a resize",
        Some(IoCall::Sync) => "fuse at a sync",
        None => planned,
    }
}

/// Checks the reopened log against the model, settles the fate of the last phase's batches
/// and subscription operations, retries the phase's idempotency keys, and appends a marker.
fn check(
    log: &EmbeddedLog,
    model: &mut Model,
    rt: &tokio::runtime::Runtime,
    phase: u64,
    totals: &mut Totals,
) {
    totals.reopens += 1;
    let bounds = log.bounds().unwrap();
    let (first, last) = (bounds.first.0, bounds.last.0);
    assert!(
        first >= 1 && first <= last + 1,
        "inconsistent bounds {bounds:?}"
    );
    // Every record decodes (a record that does not is an error here) and the watermarks are
    // contiguous.
    let events = log
        .read_blocking(Watermark(first - 1), usize::MAX)
        .unwrap_or_else(|e| panic!("reading the log after a power cut: {e}"));
    assert_eq!(
        events.len() as u64,
        last + 1 - first,
        "holes in the log ({bounds:?})"
    );
    if first > 1 {
        totals.trimmed_reopens += 1;
        assert!(
            matches!(
                log.read_blocking(Watermark(0), 1),
                Err(ReadError::Expired { .. })
            ),
            "reading before `first` must say Expired"
        );
        assert!(
            last + 1 - first >= MAX_EVENTS,
            "retention removed more than it had to: {bounds:?} holds {} events, the limit is {MAX_EVENTS}",
            last + 1 - first
        );
    }
    let mut seen: HashMap<(u32, u32), Vec<(u32, u64)>> = HashMap::new();
    let mut ids = HashSet::new();
    for (i, n) in events.iter().enumerate() {
        let w = first + i as u64;
        assert_eq!(n.watermark, Some(Watermark(w)), "watermarks out of step");
        let id = identity(n);
        assert!(ids.insert(id), "event {id:?} stored twice");
        let batch = model
            .batches
            .get(&(id.0, id.1))
            .unwrap_or_else(|| panic!("event {id:?} at {w} was never appended"));
        let sent = batch
            .events
            .get(id.2 as usize)
            .unwrap_or_else(|| panic!("event {id:?} at {w} is beyond its batch"));
        assert!(
            sent.key == n.key && sent.timestamp == n.timestamp && sent.event == n.event,
            "event {id:?} at {w} is not the one appended"
        );
        seen.entry((id.0, id.1)).or_default().push((id.2, w));
    }
    totals.events_checked += events.len() as u64;

    // Batch by batch: whole, in place, and there if it must be.
    let pending: Vec<(u32, u32)> = model
        .batches
        .iter()
        .filter(|(_, b)| b.fate == Fate::Pending)
        .map(|(id, _)| *id)
        .collect();
    for (&(p, s), batch) in model.batches.iter_mut() {
        let count = batch.events.len() as u64;
        let found = seen.get(&(p, s)).map(|v| {
            let base = v[0].1 - u64::from(v[0].0);
            for &(i, w) in v {
                assert_eq!(w, base + u64::from(i), "batch ({p}, {s}) is not contiguous");
            }
            // Only retention may cut a batch, and only at the front of the log.
            let from = u64::from(v[0].0);
            assert_eq!(
                v.len() as u64,
                count - from,
                "batch ({p}, {s}) half-written"
            );
            if from > 0 {
                assert_eq!(base + from, first, "batch ({p}, {s}) cut inside the log");
            }
            base
        });
        let trimmed = |base: u64| base + count - 1 < first;
        match (batch.fate, found) {
            (Fate::Present(base), Some(b)) => {
                assert_eq!(b, base, "batch ({p}, {s}) moved from {base} to {b}")
            }
            (Fate::Present(base), None) => assert!(
                trimmed(base),
                "batch ({p}, {s}) at {base} is gone (log {bounds:?})"
            ),
            (Fate::Lost, None) => {}
            (Fate::Lost, Some(b)) => panic!("batch ({p}, {s}) came back at {b}"),
            (Fate::Pending, found) => {
                let acked_at = batch.acked.map(|a| a.first.0);
                batch.fate = match (found, acked_at) {
                    (Some(b), Some(a)) => {
                        assert_eq!(b, a, "batch ({p}, {s}) acknowledged at {a} is at {b}");
                        Fate::Present(b)
                    }
                    (Some(b), None) => Fate::Present(b),
                    (None, Some(a)) if trimmed(a) => Fate::Present(a),
                    (None, _) => {
                        assert!(
                            !batch.must_survive,
                            "acknowledged durable batch ({p}, {s}) at {acked_at:?} lost (log {bounds:?})"
                        );
                        Fate::Lost
                    }
                };
                if batch.must_survive {
                    totals.durable_checked += 1;
                }
            }
        }
    }

    // Producer by producer: in order, and nothing acknowledged missing before a batch that
    // survived (a commit that survives makes every earlier one durable).
    let mut by_producer: BTreeMap<u32, Vec<(u32, &Batch)>> = BTreeMap::new();
    for (&(p, s), b) in &model.batches {
        by_producer.entry(p).or_default().push((s, b));
    }
    for (p, batches) in by_producer {
        let last_present = batches
            .iter()
            .filter(|(_, b)| !b.by_retry && matches!(b.fate, Fate::Present(_)))
            .map(|(s, _)| *s)
            .max();
        let mut previous = 0;
        for (s, b) in batches {
            if let (Some(m), true) = (last_present, b.acked.is_some()) {
                assert!(
                    s > m || b.fate != Fate::Lost || b.by_retry,
                    "producer {p}: batch {s} lost, but its later batch {m} survived"
                );
            }
            if let (Fate::Present(base), false) = (b.fate, b.by_retry) {
                assert!(base > previous, "producer {p}: batch {s} out of order");
                previous = base;
            }
        }
    }

    // Subscriptions: exactly after the last acknowledged operation, or after the one in
    // flight; no acknowledged position past the log.
    let stored = log.subscriptions_blocking().unwrap();
    for r in &stored {
        assert!(
            r.acked.0 <= last && r.inflight.0 <= last,
            "subscription {} acknowledged past the log: {r:?} (log {bounds:?})",
            r.id
        );
        assert!(
            (0..SUB_WRITERS).any(|t| r.id.starts_with(&format!("s{t}-"))),
            "unknown subscription {}",
            r.id
        );
    }
    for (t, writer) in model.subs.iter_mut().enumerate() {
        let prefix = format!("s{t}-");
        let actual: Subs = stored
            .iter()
            .filter(|r| r.id.starts_with(&prefix))
            .map(|r| {
                (
                    r.id.clone(),
                    SubRec {
                        spec: String::from_utf8_lossy(&r.spec).into_owned(),
                        acked: r.acked.0,
                        inflight: r.inflight.0,
                    },
                )
            })
            .collect();
        if actual != writer.now {
            let mut after = writer.now.clone();
            let op = writer.pending.as_ref().unwrap_or_else(|| {
                panic!(
                    "subscription writer {t}: stored {actual:?}, acknowledged {:?}",
                    writer.now
                )
            });
            apply(&mut after, op);
            assert_eq!(
                actual, after,
                "subscription writer {t}: neither the acknowledged state nor the one after {op:?}"
            );
            writer.now = after;
        }
        writer.pending = None;
        totals.sub_states_checked += 1;
    }

    // Retry every idempotency key of the last phase, as producers do after an outage.
    let retries: Vec<((u32, u32), Vec<Notification>, String)> = pending
        .iter()
        .filter_map(|id| {
            let b = &model.batches[id];
            Some((*id, b.events.clone(), b.key.clone()?))
        })
        .collect();
    let answers = rt.block_on(join_all(retries.into_iter().map(|(id, events, key)| {
        let log = log.clone();
        async move {
            let options = AppendOptions {
                idempotency_key: Some(key),
                durability: Durability::Durable,
                ..Default::default()
            };
            (id, log.append(events, options).await)
        }
    })));
    for ((p, s), answer) in answers {
        let a = answer.unwrap_or_else(|e| panic!("retrying batch ({p}, {s}): {e}"));
        let batch = model.batches.get_mut(&(p, s)).unwrap();
        assert_eq!(a.count as usize, batch.events.len());
        match batch.fate {
            Fate::Present(base) => {
                assert!(
                    a.replayed && a.first.0 == base,
                    "retry of batch ({p}, {s}) at {base} answered {a:?}"
                );
                totals.replayed_after_reopen += 1;
            }
            // Lost, or committed and then removed by retention before the cut.
            Fate::Lost if a.replayed => {
                assert!(
                    a.first.0 + u64::from(a.count) - 1 < first,
                    "retry of lost batch ({p}, {s}) replayed {a:?}, which is not in the log"
                );
                batch.fate = Fate::Present(a.first.0);
                totals.replayed_after_reopen += 1;
            }
            Fate::Lost => {
                batch.fate = Fate::Present(a.first.0);
                batch.by_retry = true;
                batch.must_survive = true;
                totals.appended_anew += 1;
            }
            Fate::Pending => unreachable!(),
        }
    }

    // The log keeps working: append and read back.
    let events: Vec<Notification> = (0..3).map(|i| event(MARKER, phase as u32, i)).collect();
    let a = log
        .append_blocking(events.clone(), AppendOptions::default())
        .unwrap_or_else(|e| panic!("appending after reopen: {e}"));
    let back = log.read_blocking(Watermark(a.first.0 - 1), 3).unwrap();
    assert_eq!(back.len(), 3);
    for (n, sent) in back.iter().zip(&events) {
        assert_eq!(identity(n), identity(sent));
    }
    model.batches.insert(
        (MARKER, phase as u32),
        Batch {
            events,
            key: None,
            acked: Some(a),
            must_survive: true,
            fate: Fate::Present(a.first.0),
            by_retry: false,
        },
    );
}

/// Shared by the tasks of one phase.
struct Phase {
    log: EmbeddedLog,
    disk: PowerCutDisk,
    cuts_before: u64,
    acked: AtomicU64,
    /// Cut the power when this many operations have been acknowledged (0: never).
    cut_at: u64,
}

impl Phase {
    fn acknowledged(&self) {
        if self.acked.fetch_add(1, Ordering::SeqCst) + 1 == self.cut_at {
            self.disk.cut();
        }
    }

    fn powered(&self) -> bool {
        self.disk.cuts() == self.cuts_before
    }
}

async fn producer(phase: Arc<Phase>, id: u32, mut rng: SplitMix64) -> Vec<((u32, u32), Batch)> {
    let mut batches: Vec<((u32, u32), Batch)> = Vec::new();
    let ops = rng.below(24);
    for _ in 0..ops {
        if !phase.powered() {
            break;
        }
        let roll = rng.below(100);
        let replayable: Vec<usize> = (0..batches.len())
            .filter(|&i| batches[i].1.key.is_some() && batches[i].1.acked.is_some())
            .collect();
        if roll < 8 && !replayable.is_empty() {
            // A retry of an acknowledged batch: answered from the first append.
            let i = replayable[rng.below(replayable.len() as u64) as usize];
            let (events, key, acked) = {
                let b = &batches[i].1;
                (b.events.clone(), b.key.clone(), b.acked.unwrap())
            };
            let durable = rng.percent(50);
            let options = AppendOptions {
                idempotency_key: key,
                durability: if durable {
                    Durability::Durable
                } else {
                    Durability::Buffered
                },
                ..Default::default()
            };
            match phase.log.append(events, options).await {
                Ok(a) => {
                    assert!(
                        a.replayed && a.first == acked.first && a.count == acked.count,
                        "replay answered {a:?}, the first append {acked:?}"
                    );
                    if durable {
                        // A durable commit after the first append makes it durable too.
                        batches[i].1.must_survive = true;
                    }
                    phase.acknowledged();
                }
                Err(_) => break,
            }
        } else if roll < 13 {
            let log = phase.log.clone();
            match tokio::task::spawn_blocking(move || log.flush_blocking())
                .await
                .unwrap()
            {
                Ok(()) => {
                    for (_, b) in &mut batches {
                        b.must_survive |= b.acked.is_some();
                    }
                    phase.acknowledged();
                }
                Err(_) => break,
            }
        } else {
            let seq = batches.len() as u32;
            let size = if rng.percent(10) {
                rng.between(20, 60)
            } else {
                rng.between(1, 8)
            } as u32;
            let events: Vec<Notification> = (0..size).map(|i| event(id, seq, i)).collect();
            let durable = rng.percent(75);
            let key = rng.percent(50).then(|| format!("k{id}/{seq}"));
            let options = AppendOptions {
                idempotency_key: key.clone(),
                durability: if durable {
                    Durability::Durable
                } else {
                    Durability::Buffered
                },
                ..Default::default()
            };
            batches.push((
                (id, seq),
                Batch {
                    events: events.clone(),
                    key,
                    acked: None,
                    must_survive: false,
                    fate: Fate::Pending,
                    by_retry: false,
                },
            ));
            match phase.log.append(events, options).await {
                Ok(a) => {
                    assert!(!a.replayed && a.count == size, "a new batch answered {a:?}");
                    let b = &mut batches.last_mut().unwrap().1;
                    b.acked = Some(a);
                    b.must_survive = durable;
                    phase.acknowledged();
                }
                Err(_) => break,
            }
        }
    }
    batches
}

async fn sub_writer(
    phase: Arc<Phase>,
    t: usize,
    mut state: SubWriter,
    mut rng: SplitMix64,
) -> SubWriter {
    let ops = rng.below(12);
    for n in 0..ops {
        if !phase.powered() {
            break;
        }
        let id = format!("s{t}-{}", rng.below(SUB_IDS));
        let Ok(bounds) = phase.log.bounds() else {
            break;
        };
        let w = rng.below(bounds.last.0 + 1);
        let op = match rng.below(100) {
            0..30 => SubOp::Put(id, format!("{t}/{n}/{}", rng.next_u64())),
            30..65 => SubOp::Ack(id, w),
            65..85 => SubOp::Inflight(id, w),
            _ => SubOp::Delete(id),
        };
        let mut after = state.now.clone();
        let expected = apply(&mut after, &op);
        state.pending = Some(op.clone());
        let log = &phase.log;
        let answer = match &op {
            SubOp::Put(id, spec) => log
                .put_subscription(id, spec.clone().into_bytes())
                .await
                .map(|()| true),
            SubOp::Delete(id) => log.delete_subscription(id).await,
            SubOp::Ack(id, w) => log.ack(id, Watermark(*w)).await,
            SubOp::Inflight(id, w) => log.set_inflight(id, Watermark(*w)).await,
        };
        match answer {
            Ok(found) => {
                assert_eq!(found, expected, "{op:?}");
                state.now = after;
                state.pending = None;
                phase.acknowledged();
            }
            Err(_) => break,
        }
    }
    state
}

/// Opens the log on what survived. If the power failed while the log was first created, redb
/// may reject the half-made image ("not a redb database"). `EmbeddedLog::open` creates its
/// file beside its name and renames it into place (`create_fresh`) so that this cannot happen
/// on a file; a backend has no such step. Nothing was acknowledged yet, so the round goes on
/// with a new disk, as the rename would have.
fn reopen(
    disk: &mut PowerCutDisk,
    created: &mut bool,
    mode: CutMode,
    rng: &mut SplitMix64,
    totals: &mut Totals,
) -> Result<EmbeddedLog, LogError> {
    let cuts = disk.cuts();
    let log = match open(disk) {
        // Rejected with no cut during this open: what an earlier cut left.
        Err(LogError::Corrupt { reason, .. }) if !*created && cuts > 0 && disk.cuts() == cuts => {
            totals.creations_rejected.push(reason);
            *disk = PowerCutDisk::new(mode, rng.next_u64());
            open(disk)
        }
        other => other,
    }?;
    *created = true;
    Ok(log)
}

/// How the power fails during a phase's work.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// At the n-th write, resize or sync of the disk.
    Fuse(u64),
    /// When the n-th operation is acknowledged, with others in flight.
    AfterOps(u64),
    /// When the work is done.
    Quiet,
}

fn run_round(seed: u64, mode: CutMode, rt: &tokio::runtime::Runtime, totals: &mut Totals) {
    let mut rng = SplitMix64::new(seed);
    let mut disk = PowerCutDisk::new(mode, rng.next_u64());
    let mut created = false;
    let mut model = Model {
        batches: BTreeMap::new(),
        subs: vec![SubWriter::default(); SUB_WRITERS],
    };
    let phases = rng.between(1, 3);
    for phase in 0..phases {
        totals.phases += 1;
        let cuts_at_open = disk.cuts();
        let calls_at_open = disk.stats().io_calls();
        if rng.percent(15) {
            // The power fails (again) while the log opens: while redb creates or repairs it.
            disk.cut_after(rng.between(1, 40));
        }
        let opened = reopen(&mut disk, &mut created, mode, &mut rng, totals);
        if disk.cuts() > cuts_at_open {
            let report = disk.last_cut().unwrap();
            totals.cuts_in_open += 1;
            totals.record_cut(point(&report, "in open"), report, 0);
            drop(opened);
            continue;
        }
        disk.cut_after(0);
        let log = opened.unwrap_or_else(|e| panic!("the log did not reopen: {e}"));
        check(&log, &mut model, rt, phase, totals);
        let cuts_before = disk.cuts();

        let plan = match rng.below(100) {
            0..50 => Plan::Fuse(rng.between(1, 250)),
            50..85 => Plan::AfterOps(rng.between(1, 70)),
            _ => Plan::Quiet,
        };
        let shared = Arc::new(Phase {
            log: log.clone(),
            disk: disk.clone(),
            cuts_before,
            acked: AtomicU64::new(0),
            cut_at: match plan {
                Plan::AfterOps(n) => n,
                _ => 0,
            },
        });
        if let Plan::Fuse(n) = plan {
            disk.cut_after(n);
        }
        let seeds: Vec<u64> = (0..PRODUCERS as usize + SUB_WRITERS)
            .map(|_| rng.next_u64())
            .collect();
        let subs = std::mem::take(&mut model.subs);
        let (produced, subs) = rt.block_on(async {
            let producers: Vec<_> = (0..PRODUCERS)
                .map(|t| {
                    let id = phase as u32 * 16 + t;
                    let rng = SplitMix64::new(seeds[t as usize]);
                    tokio::spawn(producer(shared.clone(), id, rng))
                })
                .collect();
            let writers: Vec<_> = subs
                .into_iter()
                .enumerate()
                .map(|(t, state)| {
                    let rng = SplitMix64::new(seeds[PRODUCERS as usize + t]);
                    tokio::spawn(sub_writer(shared.clone(), t, state, rng))
                })
                .collect();
            let mut produced = Vec::new();
            for p in producers {
                produced.extend(p.await.unwrap());
            }
            let mut subs = Vec::new();
            for w in writers {
                subs.push(w.await.unwrap());
            }
            (produced, subs)
        });
        model.subs = subs;
        model.batches.extend(produced);
        let ops = shared.acked.load(Ordering::SeqCst);
        let planned = match plan {
            Plan::Quiet => "when the work was done",
            Plan::AfterOps(n) if ops >= n => "after n acknowledged operations",
            // The work ended before the fuse or the count was reached.
            _ => "when the work was done",
        };
        let report = if disk.cuts() == cuts_before {
            disk.cut()
        } else {
            disk.last_cut().unwrap()
        };
        totals.io_calls += disk.stats().io_calls().saturating_sub(calls_at_open);
        totals.record_cut(point(&report, planned), report, ops);
        drop(shared);
        // The writer thread stops; everything it still tries fails: the power is off.
        drop(log);
    }

    // Reopen, check, and close cleanly: a power cut right after `close` loses nothing.
    let log = reopen(&mut disk, &mut created, mode, &mut rng, totals)
        .unwrap_or_else(|e| panic!("the log did not reopen: {e}"));
    check(&log, &mut model, rt, phases, totals);
    let buffered = AppendOptions {
        durability: Durability::Buffered,
        ..Default::default()
    };
    log.append_blocking(vec![event(MARKER, 999, 0)], buffered)
        .unwrap();
    let first = log.bounds().unwrap().first.0;
    let events = log.read_blocking(Watermark(first - 1), usize::MAX).unwrap();
    let subs = log.subscriptions_blocking().unwrap();
    log.close().unwrap();
    let report = disk.cut();
    drop(log);
    let log = open(&disk).unwrap_or_else(|e| panic!("the log did not reopen after close: {e}"));
    let bounds = log.bounds().unwrap();
    let after = log
        .read_blocking(Watermark(bounds.first.0 - 1), usize::MAX)
        .unwrap();
    let span = |v: &[Notification]| {
        (
            v.len(),
            v.first().and_then(|n| n.watermark),
            v.last().and_then(|n| n.watermark),
        )
    };
    // The commit of `close` may let retention remove the oldest events; nothing else changes.
    let kept = events.len() - after.len().min(events.len());
    assert!(
        events[kept..] == after[..] && (kept == 0 || after.len() as u64 >= MAX_EVENTS),
        "a cleanly closed log lost events to a power cut ({report:?}): (count, first, last) \
         {:?} before, {:?} after",
        span(&events),
        span(&after)
    );
    assert_eq!(log.subscriptions_blocking().unwrap(), subs);
    totals.clean_closes += 1;
    log.close().unwrap();
}

#[test]
fn acknowledged_writes_survive_power_cuts() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let rounds = env("HERALD_POWERCUT_ROUNDS").unwrap_or(200);
    let seed = env("HERALD_POWERCUT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let only = env("HERALD_POWERCUT_ONLY");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = SplitMix64::new(seed);
    let seeds: Vec<u64> = (0..rounds).map(|_| rng.next_u64()).collect();
    // Rounds are independent: one per core at a time (each log has one writer thread).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let started = Instant::now();
    let totals = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (seeds, rt) = (&seeds, &rt);
                scope.spawn(move || {
                    let mut totals = Totals::default();
                    for round in (w..seeds.len()).step_by(workers) {
                        if only.is_some_and(|o| o != round as u64) {
                            continue;
                        }
                        let mode = if round % 2 == 0 {
                            CutMode::LoseUnsynced
                        } else {
                            CutMode::Scramble
                        };
                        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            run_round(seeds[round], mode, rt, &mut totals)
                        }));
                        if let Err(panic) = result {
                            eprintln!(
                                "power-cut round {round} ({mode:?}) failed; replay with \
                                 HERALD_POWERCUT_SEED={seed} HERALD_POWERCUT_ONLY={round}"
                            );
                            std::panic::resume_unwind(panic);
                        }
                        totals.rounds += 1;
                    }
                    totals
                })
            })
            .collect();
        let mut all = Totals::default();
        for h in handles {
            all.add(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    let t = &totals;
    eprintln!(
        "power cuts: {} rounds (seed {seed}) in {:.1?}: {} phases, {} cuts, {} inside a \
         commit (unsynced writes pending), {} while opening; {} unsynced writes lost, {} kept \
         ({} torn) by scrambled cuts; {} disk writes/resizes/syncs",
        t.rounds,
        started.elapsed(),
        t.phases,
        t.cuts,
        t.cuts_mid_commit,
        t.cuts_in_open,
        t.pending_writes_lost,
        t.kept,
        t.torn,
        t.io_calls,
    );
    eprintln!("  cut points: {:?}", t.by_point);
    eprintln!(
        "  operations acknowledged before the cut: {}",
        OPS_BUCKETS
            .iter()
            .zip(t.ops_before_cut)
            .map(|(b, n)| format!("{b}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "  checked after {} reopens ({} after retention): {} acknowledged durable appends, {} events, {} retried \
         keys replayed, {} lost batches appended anew, {} subscription states; {} clean closes \
         cut at once lost nothing",
        t.reopens,
        t.trimmed_reopens,
        t.durable_checked,
        t.events_checked,
        t.replayed_after_reopen,
        t.appended_anew,
        t.sub_states_checked,
        t.clean_closes,
    );
    if !t.creations_rejected.is_empty() {
        eprintln!(
            "  {} cuts during the log's creation left an image redb refused: {:?}",
            t.creations_rejected.len(),
            t.creations_rejected.iter().collect::<HashSet<_>>()
        );
    }
    if t.rounds >= 50 {
        // Enough rounds cover the points that matter; fewer (a replay) need not.
        assert!(
            t.durable_checked > 0 && t.cuts_mid_commit > 0 && t.kept > 0,
            "the rounds never checked a durable append, cut inside a commit or kept a write"
        );
    }
}
