//! What the producers published and what every subscriber received, and the checks made on
//! them at the end of a soak.
//!
//! The ledger holds every acknowledged event by watermark (its group, that is which producer
//! and keys). A tracker holds what one subscriber (one resumable position) received, as a
//! bitset of watermarks, and counts on the fly what breaks its transport's promise: a
//! watermark seen twice, a watermark lower than the last one, an event outside its filter.
//! At the end, every acknowledged event of the tracker's groups must be in its bitset.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hdrhistogram::Histogram;

/// The producers' groups of keys; a subscriber's filter is a set of groups.
pub(crate) const GROUPS: usize = 6;

/// The key prefixes of the groups, in group order, and what each is for.
pub(crate) const GROUP_NAMES: [&str; GROUPS] = [
    "soak/m0/…",
    "soak/m1/…",
    "soak/m2/…",
    "soak/hot",
    "alice@example.test/…",
    "bob@example.test/…",
];

/// The group of a key, if it is one the producers write.
pub(crate) fn group_of_key(key: &str) -> Option<u8> {
    if key.starts_with("soak/m0/") {
        Some(0)
    } else if key.starts_with("soak/m1/") {
        Some(1)
    } else if key.starts_with("soak/m2/") {
        Some(2)
    } else if key == "soak/hot" {
        Some(3)
    } else if key.starts_with("alice@example.test/") {
        Some(4)
    } else if key.starts_with("bob@example.test/") {
        Some(5)
    } else {
        None
    }
}

/// The mask of one group.
pub(crate) const fn g(group: u8) -> u8 {
    1 << group
}

/// Transports whose latency is measured, in column order.
pub(crate) const TRANSPORTS: [&str; 6] =
    ["sse", "websocket", "long-poll", "webhook", "ews", "mapi"];

/// Index of a transport in [`TRANSPORTS`].
pub(crate) fn transport_index(t: &str) -> usize {
    TRANSPORTS.iter().position(|x| *x == t).unwrap_or(0)
}

/// A growable set of watermarks.
#[derive(Default)]
pub(crate) struct BitSet(Vec<u64>);

impl BitSet {
    /// Sets `w`; whether it was already set.
    pub(crate) fn insert(&mut self, w: u64) -> bool {
        let (i, b) = ((w / 64) as usize, w % 64);
        if i >= self.0.len() {
            self.0.resize(i + 1 + i / 4, 0);
        }
        let was = self.0[i] & (1 << b) != 0;
        self.0[i] |= 1 << b;
        was
    }

    pub(crate) fn contains(&self, w: u64) -> bool {
        let (i, b) = ((w / 64) as usize, w % 64);
        self.0.get(i).is_some_and(|x| x & (1 << b) != 0)
    }
}

/// One acknowledged MAPI event (group 5): when it was sent, and its watermark once
/// acknowledged. MAPI notifications carry no watermark, only the message id.
#[derive(Clone, Copy, Default)]
pub(crate) struct MapiEvent {
    pub(crate) sent_us: u64,
    pub(crate) watermark: Option<u64>,
}

#[derive(Default)]
struct LedgerInner {
    /// Per watermark: 0 if not acknowledged (or not ours), else group + 1.
    by_w: Vec<u8>,
    max_w: u64,
    acked: [u64; GROUPS],
    /// Events whose request failed or was never answered (they may or may not be in the log).
    unacked: [u64; GROUPS],
    /// MAPI message id counter → the event.
    mapi: HashMap<u64, MapiEvent>,
}

/// Every acknowledged event.
#[derive(Default)]
pub(crate) struct Ledger {
    inner: Mutex<LedgerInner>,
    /// Idempotent retries answered `replayed: true` (the first attempt had been appended).
    pub(crate) replayed: AtomicU64,
    /// Idempotent requests retried (failed, timed out, or refused during the restart).
    pub(crate) retries: AtomicU64,
    /// Idempotent retries whose watermarks differed from an earlier answer (must be 0).
    pub(crate) replay_mismatch: AtomicU64,
}

impl Ledger {
    pub(crate) fn ack(&self, group: u8, watermarks: &[u64]) {
        let mut l = self.inner.lock().unwrap();
        for &w in watermarks {
            let i = w as usize;
            if i >= l.by_w.len() {
                let n = (i + 1).max(l.by_w.len() * 2);
                l.by_w.resize(n, 0);
            }
            l.by_w[i] = group + 1;
            l.max_w = l.max_w.max(w);
        }
        l.acked[group as usize] += watermarks.len() as u64;
    }

    pub(crate) fn unacked(&self, group: u8, n: usize) {
        self.inner.lock().unwrap().unacked[group as usize] += n as u64;
    }

    /// Notes a MAPI event before it is published (its message id counter).
    pub(crate) fn mapi_sent(&self, mid: u64, sent_us: u64) {
        self.inner.lock().unwrap().mapi.insert(
            mid,
            MapiEvent {
                sent_us,
                watermark: None,
            },
        );
    }

    pub(crate) fn mapi_acked(&self, mid: u64, w: u64) {
        if let Some(e) = self.inner.lock().unwrap().mapi.get_mut(&mid) {
            e.watermark = Some(w);
        }
    }

    pub(crate) fn mapi_event(&self, mid: u64) -> Option<MapiEvent> {
        self.inner.lock().unwrap().mapi.get(&mid).copied()
    }

    /// The highest acknowledged watermark.
    pub(crate) fn max_w(&self) -> u64 {
        self.inner.lock().unwrap().max_w
    }

    pub(crate) fn acked_total(&self) -> u64 {
        self.inner.lock().unwrap().acked.iter().sum()
    }

    pub(crate) fn acked(&self) -> [u64; GROUPS] {
        self.inner.lock().unwrap().acked
    }

    pub(crate) fn unacked_counts(&self) -> [u64; GROUPS] {
        self.inner.lock().unwrap().unacked
    }

    /// Acknowledged watermarks in `mask` within `(after, through]`, in order.
    pub(crate) fn expected(&self, mask: u8, after: u64, through: u64) -> Vec<u64> {
        let l = self.inner.lock().unwrap();
        let end = (through.min(l.max_w) as usize + 1).min(l.by_w.len());
        let start = (after as usize + 1).min(end);
        (start..end)
            .filter(|&i| l.by_w[i] != 0 && mask & (1 << (l.by_w[i] - 1)) != 0)
            .map(|i| i as u64)
            .collect()
    }

    /// How many acknowledged events are in `mask`.
    pub(crate) fn expected_count(&self, mask: u8) -> u64 {
        let l = self.inner.lock().unwrap();
        (0..GROUPS)
            .filter(|gi| mask & (1 << gi) != 0)
            .map(|gi| l.acked[gi])
            .sum()
    }

    /// The MAPI events, by message id counter.
    pub(crate) fn mapi_events(&self) -> HashMap<u64, MapiEvent> {
        self.inner.lock().unwrap().mapi.clone()
    }
}

/// Latency histograms per transport: this sampling interval, and the whole run.
pub(crate) struct Lat {
    interval: Mutex<Vec<Histogram<u64>>>,
    total: Mutex<Vec<Histogram<u64>>>,
    /// Deliveries counted (first receipts only), all transports.
    pub(crate) delivered: AtomicU64,
    pub(crate) per_transport: [AtomicU64; TRANSPORTS.len()],
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Lat {
    pub(crate) fn new() -> Lat {
        Lat {
            interval: Mutex::new((0..TRANSPORTS.len()).map(|_| histogram()).collect()),
            total: Mutex::new((0..TRANSPORTS.len()).map(|_| histogram()).collect()),
            delivered: AtomicU64::new(0),
            per_transport: Default::default(),
        }
    }

    /// Records one first delivery, `sent_us` being the publish timestamp.
    pub(crate) fn record(&self, transport: usize, sent_us: Option<u64>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.per_transport[transport].fetch_add(1, Ordering::Relaxed);
        let Some(sent) = sent_us else { return };
        let us = crate::now_micros()
            .saturating_sub(sent)
            .clamp(1, 3_600_000_000);
        let _ = self.interval.lock().unwrap()[transport].record(us);
        let _ = self.total.lock().unwrap()[transport].record(us);
    }

    /// This interval's histograms (all transports merged first), reset for the next.
    pub(crate) fn take_interval(&self) -> (Histogram<u64>, Vec<Histogram<u64>>) {
        let mut i = self.interval.lock().unwrap();
        let per: Vec<Histogram<u64>> = std::mem::replace(
            &mut *i,
            (0..TRANSPORTS.len()).map(|_| histogram()).collect(),
        );
        let mut all = histogram();
        for h in &per {
            let _ = all.add(h);
        }
        (all, per)
    }

    pub(crate) fn totals(&self) -> Vec<Histogram<u64>> {
        self.total.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct TrackState {
    seen: BitSet,
    last: u64,
    received: u64,
    duplicates: u64,
    reordered: u64,
    foreign: u64,
}

/// What one resumable subscriber (an SSE stream, a WebSocket subscription, a durable
/// subscription, an EWS subscription chain) received.
pub(crate) struct Tracker {
    pub(crate) name: String,
    pub(crate) transport: &'static str,
    /// Groups its filter selects.
    pub(crate) mask: u8,
    state: Mutex<TrackState>,
    /// Whether its client is connected and subscribed now.
    pub(crate) connected: AtomicBool,
    /// Connections it opened (1 + reconnects).
    pub(crate) connections: AtomicU64,
    /// Deliveries the transport repeated and the client dropped by its own promise (webhook
    /// requests with a `webhook-id` already processed).
    pub(crate) redelivered: AtomicU64,
    /// Errors that end the subscriber's promise (expired position, a vanished durable
    /// subscription, an unreadable frame).
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Tracker {
    pub(crate) fn new(name: &str, transport: &'static str, mask: u8) -> Tracker {
        Tracker {
            name: name.to_owned(),
            transport,
            mask,
            state: Mutex::default(),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            errors: Mutex::default(),
        }
    }

    /// The last watermark received (where to resume).
    pub(crate) fn last(&self) -> u64 {
        self.state.lock().unwrap().last
    }

    pub(crate) fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(e);
        }
    }

    /// Records an event: its watermark, key and publish timestamp.
    pub(crate) fn receive(&self, lat: &Lat, w: u64, key: &str, sent_us: Option<u64>) {
        let first = {
            let mut s = self.state.lock().unwrap();
            if group_of_key(key).is_none_or(|g| self.mask & (1 << g) == 0) {
                s.foreign += 1;
            }
            if s.seen.insert(w) {
                s.duplicates += 1;
                false
            } else {
                if w < s.last {
                    s.reordered += 1;
                }
                s.last = s.last.max(w);
                s.received += 1;
                true
            }
        };
        if first {
            lat.record(transport_index(self.transport), sent_us);
        }
    }

    /// The end-of-run check against the ledger.
    pub(crate) fn verdict(&self, ledger: &Ledger) -> Verdict {
        let s = self.state.lock().unwrap();
        let expected = ledger.expected(self.mask, 0, u64::MAX);
        let lost = expected.iter().filter(|w| !s.seen.contains(**w)).count() as u64;
        let acked_received = expected.len() as u64 - lost;
        Verdict {
            name: self.name.clone(),
            transport: self.transport,
            expected: expected.len() as u64,
            received: s.received,
            lost,
            duplicates: s.duplicates,
            reordered: s.reordered,
            foreign: s.foreign,
            unacked_received: s.received.saturating_sub(acked_received),
            connections: self.connections.load(Ordering::Relaxed),
            redelivered: self.redelivered.load(Ordering::Relaxed),
            errors: self.errors.lock().unwrap().clone(),
            first_lost: expected.iter().find(|w| !s.seen.contains(**w)).copied(),
        }
    }

    /// Whether it holds every acknowledged event of its groups.
    pub(crate) fn caught_up(&self, ledger: &Ledger) -> bool {
        let s = self.state.lock().unwrap();
        // Cheap test first: counts.
        if s.received < ledger.expected_count(self.mask) {
            return false;
        }
        ledger
            .expected(self.mask, 0, u64::MAX)
            .iter()
            .all(|w| s.seen.contains(*w))
    }
}

/// One subscriber's result.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub(crate) name: String,
    pub(crate) transport: &'static str,
    pub(crate) expected: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    pub(crate) foreign: u64,
    pub(crate) unacked_received: u64,
    pub(crate) connections: u64,
    pub(crate) redelivered: u64,
    pub(crate) errors: Vec<String>,
    pub(crate) first_lost: Option<u64>,
}

impl Verdict {
    pub(crate) fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.foreign == 0
            && self.errors.is_empty()
    }
}

/// A short-lived ("churn") stream: where it started and what it got before it left. Its
/// promise: no gap, no repeat and no reordering within what it received.
pub(crate) struct ChurnRecord {
    pub(crate) transport: &'static str,
    pub(crate) mask: u8,
    pub(crate) after: u64,
    pub(crate) received: Vec<u64>,
}

/// The churn streams' result.
#[derive(Default, Debug, Clone)]
pub(crate) struct ChurnVerdict {
    pub(crate) streams: u64,
    pub(crate) events: u64,
    pub(crate) gaps: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    pub(crate) example: Option<String>,
}

pub(crate) fn check_churn(records: &[ChurnRecord], ledger: &Ledger) -> ChurnVerdict {
    let mut v = ChurnVerdict::default();
    for r in records {
        v.streams += 1;
        v.events += r.received.len() as u64;
        let mut seen = std::collections::HashSet::new();
        let mut last = r.after;
        for &w in &r.received {
            if !seen.insert(w) {
                v.duplicates += 1;
            } else if w <= last {
                v.reordered += 1;
            }
            last = last.max(w);
        }
        let Some(&through) = r.received.iter().max() else {
            continue;
        };
        let missing: Vec<u64> = ledger
            .expected(r.mask, r.after, through)
            .into_iter()
            .filter(|w| !seen.contains(w))
            .collect();
        if !missing.is_empty() {
            v.gaps += missing.len() as u64;
            if v.example.is_none() {
                v.example = Some(format!(
                    "{} stream after {} through {}: {} missing, first {}",
                    r.transport,
                    r.after,
                    through,
                    missing.len(),
                    missing[0]
                ));
            }
        }
    }
    v
}

/// One MAPI session of the long-lived MAPI client: when its registration was answered and
/// the message ids it fetched, in order.
#[derive(Default, Clone)]
pub(crate) struct MapiSessionRecord {
    pub(crate) registered_us: u64,
    pub(crate) mids: Vec<u64>,
    /// Whether it ended (the server restarted): then only what it received is checked.
    pub(crate) ended: bool,
}

/// The MAPI client's result: per session, no gap, repeat or reordering; the session alive
/// at the end also misses nothing published after its registration.
#[derive(Default, Debug, Clone)]
pub(crate) struct MapiVerdict {
    pub(crate) sessions: u64,
    pub(crate) received: u64,
    pub(crate) expected_final: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    pub(crate) unknown: u64,
    /// Acknowledged events no session was registered for (between sessions): MAPI promises
    /// nothing for them.
    pub(crate) between_sessions: u64,
    pub(crate) example: Option<String>,
}

impl MapiVerdict {
    pub(crate) fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0 && self.unknown == 0
    }
}

pub(crate) fn check_mapi(sessions: &[MapiSessionRecord], ledger: &Ledger) -> MapiVerdict {
    let events = ledger.mapi_events();
    let mut v = MapiVerdict {
        sessions: sessions.len() as u64,
        ..Default::default()
    };
    let mut covered = BitSet::default();
    for s in sessions {
        let mut seen = std::collections::HashSet::new();
        let mut last = 0u64;
        let mut ws = Vec::new();
        for mid in &s.mids {
            v.received += 1;
            let Some(e) = events.get(mid) else {
                v.unknown += 1;
                continue;
            };
            if !seen.insert(*mid) {
                v.duplicates += 1;
                continue;
            }
            // Events never acknowledged have no watermark: nothing to order them by.
            let Some(w) = e.watermark else { continue };
            if w < last {
                v.reordered += 1;
            }
            last = last.max(w);
            ws.push(w);
            covered.insert(w);
        }
        let (Some(&first), Some(&through)) = (ws.iter().min(), ws.iter().max()) else {
            continue;
        };
        let got: std::collections::HashSet<u64> = ws.iter().copied().collect();
        // Within what the session received: no gap.
        let mut missing: Vec<u64> = ledger
            .expected(g(5), first - 1, through)
            .into_iter()
            .filter(|w| !got.contains(w))
            .collect();
        if !s.ended {
            // The session alive at the end: everything sent after its registration.
            let after_registration: Vec<u64> = events
                .values()
                .filter(|e| e.sent_us > s.registered_us)
                .filter_map(|e| e.watermark)
                .collect();
            v.expected_final = after_registration.len() as u64;
            missing.extend(
                after_registration
                    .into_iter()
                    .filter(|w| !got.contains(w) && (*w < first || *w > through)),
            );
        }
        if !missing.is_empty() && v.example.is_none() {
            missing.sort_unstable();
            v.example = Some(format!(
                "session registered at {} µs: {} missing, first watermark {}",
                s.registered_us,
                missing.len(),
                missing[0]
            ));
        }
        v.lost += missing.len() as u64;
    }
    v.between_sessions = events
        .values()
        .filter_map(|e| e.watermark)
        .filter(|w| !covered.contains(*w))
        .count() as u64;
    v
}
