//! Fan-out benchmark of the hub against `tokio::sync::broadcast` doing the same work in the
//! same run, plus memory per idle subscription.
//!
//! `cargo bench -p herald-core --bench fanout` prints Markdown tables (deliveries per second,
//! Herald ÷ baseline) ready for `docs/benchmarks.md`. `HERALD_BENCH_SECONDS` sets the time per
//! measurement (default 2); `HERALD_BENCH_ONLY` runs only scenarios whose name contains it.

use std::alloc::System;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use herald_core::{
    Delivery, Event, EventMask, Extended, Flow, Hub, HubOptions, Notification, Scope,
    SubscribeOptions,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Delivery threads for Herald and worker threads for the baseline runtime: the same budget.
const THREADS: usize = 2;

/// Counts deliveries and wakes the measuring thread when a target is reached.
struct Tally {
    count: AtomicUsize,
    target: AtomicUsize,
    reached: Mutex<bool>,
    cv: Condvar,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            count: AtomicUsize::new(0),
            target: AtomicUsize::new(usize::MAX),
            reached: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    fn add(&self, n: usize) {
        let now = self.count.fetch_add(n, Ordering::AcqRel) + n;
        if now == self.target.load(Ordering::Acquire) {
            *self.reached.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    /// Arms the tally for `more` further deliveries; returns a waiter.
    fn arm(&self, more: usize) {
        *self.reached.lock().unwrap() = false;
        let target = self.count.load(Ordering::Acquire) + more;
        self.target.store(target, Ordering::Release);
        // Deliveries may already have caught up while arming.
        if self.count.load(Ordering::Acquire) >= target {
            *self.reached.lock().unwrap() = true;
        }
    }

    fn wait(&self) {
        let mut r = self.reached.lock().unwrap();
        while !*r {
            let (g, timeout) = self.cv.wait_timeout(r, Duration::from_secs(60)).unwrap();
            assert!(!timeout.timed_out(), "deliveries stalled");
            r = g;
        }
    }
}

fn event(key: &str) -> Notification {
    Notification::new(
        key,
        Event::Extended(Extended {
            event: 1,
            data: bytes::Bytes::from_static(&[0u8; 128]),
        }),
    )
}

fn budget() -> Duration {
    let secs = std::env::var("HERALD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Runs `round` (which makes `per_round` deliveries and waits for them) until the time budget
/// is spent; returns deliveries per second.
fn measure(per_round: usize, mut round: impl FnMut()) -> f64 {
    // Warm up.
    round();
    let budget = budget();
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < budget {
        round();
        rounds += 1;
    }
    (rounds as f64 * per_round as f64) / start.elapsed().as_secs_f64()
}

fn hub() -> Hub {
    Hub::new(HubOptions {
        workers: THREADS,
        queue_capacity: 4096,
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .unwrap()
}

fn counting_sink(tally: &Arc<Tally>) -> impl Fn(Delivery<'_>) -> Flow + Send + Sync + 'static {
    let t = tally.clone();
    move |d| {
        if let Delivery::Events(e) = d {
            t.add(e.len());
        }
        Flow::Continue
    }
}

/// One key, `subs` subscribers, `burst` notifies per round.
fn herald_one_key(subs: usize, burst: usize, sync: bool) -> f64 {
    let hub = hub();
    let tally = Tally::new();
    let options = SubscribeOptions {
        sync,
        ..Default::default()
    };
    for _ in 0..subs {
        hub.subscribe(
            Scope::Exact("bench/k".into()),
            EventMask::ALL,
            counting_sink(&tally),
            options,
        )
        .unwrap();
    }
    let e = event("bench/k");
    let r = measure(subs * burst, || {
        tally.arm(subs * burst);
        for _ in 0..burst {
            hub.notify(e.clone()).unwrap();
        }
        tally.wait();
    });
    hub.shutdown(Duration::from_secs(60));
    r
}

fn broadcast_one_key(subs: usize, burst: usize) -> f64 {
    let rt = runtime();
    let tally = Tally::new();
    let (tx, _) = tokio::sync::broadcast::channel::<Notification>(1024);
    for _ in 0..subs {
        let mut rx = tx.subscribe();
        let t = tally.clone();
        rt.spawn(async move {
            while let Ok(_n) = rx.recv().await {
                t.add(1);
            }
        });
    }
    let e = event("bench/k");
    let r = measure(subs * burst, || {
        tally.arm(subs * burst);
        for _ in 0..burst {
            tx.send(e.clone()).unwrap();
        }
        tally.wait();
    });
    drop(tx);
    rt.shutdown_timeout(Duration::from_secs(10));
    r
}

/// `keys` keys with `per_key` subscribers each; one notify per key per round.
fn herald_many_keys(keys: usize, per_key: usize) -> f64 {
    let hub = hub();
    let tally = Tally::new();
    let names: Vec<String> = (0..keys).map(|i| format!("bench/k{i}")).collect();
    for k in &names {
        for _ in 0..per_key {
            hub.subscribe(
                Scope::Exact(k.as_str().into()),
                EventMask::ALL,
                counting_sink(&tally),
                SubscribeOptions::default(),
            )
            .unwrap();
        }
    }
    let events: Vec<Notification> = names.iter().map(|k| event(k)).collect();
    let r = measure(keys * per_key, || {
        tally.arm(keys * per_key);
        for e in &events {
            hub.notify(e.clone()).unwrap();
        }
        tally.wait();
    });
    hub.shutdown(Duration::from_secs(60));
    r
}

fn broadcast_many_keys(keys: usize, per_key: usize) -> f64 {
    let rt = runtime();
    let tally = Tally::new();
    let mut senders = Vec::with_capacity(keys);
    for i in 0..keys {
        let (tx, _) = tokio::sync::broadcast::channel::<Notification>(16);
        for _ in 0..per_key {
            let mut rx = tx.subscribe();
            let t = tally.clone();
            rt.spawn(async move {
                while let Ok(_n) = rx.recv().await {
                    t.add(1);
                }
            });
        }
        senders.push((tx, event(&format!("bench/k{i}"))));
    }
    let r = measure(keys * per_key, || {
        tally.arm(keys * per_key);
        for (tx, e) in &senders {
            tx.send(e.clone()).unwrap();
        }
        tally.wait();
    });
    drop(senders);
    rt.shutdown_timeout(Duration::from_secs(10));
    r
}

/// Net heap bytes per item after building `n` items with `build`, keeping them alive.
fn bytes_per<T>(n: usize, mut build: impl FnMut(usize) -> T) -> f64 {
    let region = Region::new(GLOBAL);
    let mut keep = Vec::with_capacity(n);
    let base = region.change();
    for i in 0..n {
        keep.push(build(i));
    }
    let after = region.change();
    let net = (after.bytes_allocated as f64 - after.bytes_deallocated as f64)
        - (base.bytes_allocated as f64 - base.bytes_deallocated as f64);
    drop(keep);
    net / n as f64
}

fn memory() {
    const N: usize = 100_000;
    let hub = hub();
    let keys: Vec<herald_core::Key> = (0..N)
        .map(|i| format!("alice@example.test/inbox/m{i}").into())
        .collect();
    let shared_key: herald_core::Key = "alice@example.test/inbox".into();
    let noop = |_: Delivery<'_>| Flow::Continue;

    let herald_own_key = bytes_per(N, |i| {
        hub.subscribe(
            Scope::Exact(keys[i].clone()),
            EventMask::ALL,
            noop,
            SubscribeOptions::default(),
        )
        .unwrap()
    });
    let herald_one_key = bytes_per(N, |_| {
        hub.subscribe(
            Scope::Exact(shared_key.clone()),
            EventMask::ALL,
            noop,
            SubscribeOptions::default(),
        )
        .unwrap()
    });
    let rt = runtime();
    let herald_receiver_task = bytes_per(N, |i| {
        let mut rx = hub
            .subscribe_receiver(
                Scope::Exact(keys[i].clone()),
                EventMask::ALL,
                SubscribeOptions::default(),
            )
            .unwrap();
        rt.spawn(async move { while rx.recv().await.is_some() {} })
    });
    let (tx, _) = tokio::sync::broadcast::channel::<Notification>(1024);
    let broadcast_receiver_task = bytes_per(N, |_| {
        let mut rx = tx.subscribe();
        rt.spawn(async move { while rx.recv().await.is_ok() {} })
    });
    let broadcast_channel_per_key = bytes_per(N, |_| {
        let (tx, mut rx) = tokio::sync::broadcast::channel::<Notification>(16);
        let task = rt.spawn(async move { while rx.recv().await.is_ok() {} });
        (tx, task)
    });
    println!("\n### Memory per idle subscription ({N} subscriptions, heap bytes)\n");
    println!("| subscriber | bytes each |");
    println!("|---|---:|");
    println!("| Herald sink, each on its own key (key bytes included) | {herald_own_key:.0} |");
    println!("| Herald sink, all on one key | {herald_one_key:.0} |");
    println!(
        "| Herald receiver drained by a parked tokio task, own key | {herald_receiver_task:.0} |"
    );
    println!(
        "| baseline: broadcast receiver + parked tokio task, one channel | {broadcast_receiver_task:.0} |"
    );
    println!(
        "| baseline: broadcast channel (capacity 16) + one receiver task per key | {broadcast_channel_per_key:.0} |"
    );
    drop(tx);
    rt.shutdown_timeout(Duration::from_secs(10));
    hub.shutdown(Duration::from_secs(60));
}

fn row(name: &str, herald: f64, baseline: f64) {
    println!(
        "| {name} | {:.2} M/s | {:.2} M/s | {:.2}× |",
        herald / 1e6,
        baseline / 1e6,
        herald / baseline
    );
}

/// Whether the scenario named `name` is selected by `HERALD_BENCH_ONLY` (a substring).
fn selected(name: &str) -> bool {
    std::env::var("HERALD_BENCH_ONLY").map_or(true, |f| name.contains(&f))
}

fn main() {
    println!(
        "## Hub fan-out vs tokio::sync::broadcast ({THREADS} delivery threads / runtime workers)\n"
    );
    println!("| scenario | Herald | broadcast baseline | ratio |");
    println!("|---|---:|---:|---:|");
    // (subscriptions, notifies per round): a round ends when every delivery has arrived.
    let one_key = [
        (1usize, 1usize),
        (1_000, 1),
        (100_000, 1),
        (1, 256),
        (1_000, 16),
    ];
    for (subs, burst) in one_key {
        let what = if burst == 1 {
            format!("1 notify to {subs} subscriptions on one key")
        } else {
            format!("{burst} notifies back to back to {subs} subscriptions on one key")
        };
        if !selected(&what) {
            continue;
        }
        let b = broadcast_one_key(subs, burst);
        row(
            &format!("async: {what}"),
            herald_one_key(subs, burst, false),
            b,
        );
        row(
            &format!("sync: {what}"),
            herald_one_key(subs, burst, true),
            b,
        );
    }
    let what = "1 notify to each of 10,000 keys × 10 subscriptions";
    if selected(what) {
        let b = broadcast_many_keys(10_000, 10);
        row(&format!("async: {what}"), herald_many_keys(10_000, 10), b);
    }
    if selected("memory") {
        memory();
    }
}
