//! The delivery pool: a few threads that run asynchronous sinks, one subscription at a time.
//!
//! A subscription is in the ready list at most once (its queue's `scheduled` flag), so one
//! subscription's deliveries never run concurrently and keep their order, while different
//! subscriptions run in parallel.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::subscription::{Drained, Subscription};
use crate::sync::{
    Arc, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, lock, thread, thread_local, wait,
    wait_timeout,
};

/// How many subscriptions a worker takes from the ready list at once.
const CHUNK: usize = 64;
/// How many deliveries a worker runs for one subscription before moving on to the next.
const BUDGET: usize = 32;

thread_local! {
    static IS_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Default)]
struct Ready {
    list: VecDeque<Arc<Subscription>>,
    /// Workers waiting for work: notifying the condition variable costs a system call, so it
    /// is done only when someone sleeps.
    sleeping: usize,
    shutdown: bool,
}

pub(crate) struct PoolShared {
    ready: Mutex<Ready>,
    work: Condvar,
    idle: Condvar,
    workers: usize,
    /// Subscriptions scheduled on the pool and not yet drained empty. Kept outside the lock
    /// so that a worker finishing a subscription does not contend with producers.
    outstanding: AtomicUsize,
    /// Threads in `wait_idle`.
    idle_waiters: AtomicUsize,
    pub(crate) deliveries: AtomicU64,
}

pub(crate) struct Pool {
    pub(crate) shared: Arc<PoolShared>,
    handles: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Pool {
    pub(crate) fn start(workers: usize) -> Pool {
        let shared = Arc::new(PoolShared {
            ready: Mutex::new(Ready::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            workers: workers.max(1),
            outstanding: AtomicUsize::new(0),
            idle_waiters: AtomicUsize::new(0),
            deliveries: AtomicU64::new(0),
        });
        let handles = (0..workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                thread::Builder::new()
                    .name(format!("herald-deliver-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a delivery thread")
            })
            .collect();
        Pool {
            shared,
            handles: Mutex::new(handles),
        }
    }

    /// Hands newly scheduled subscriptions to the workers, emptying `subs`.
    pub(crate) fn schedule(&self, subs: &mut Vec<Arc<Subscription>>) {
        if subs.is_empty() {
            return;
        }
        let n = subs.len();
        self.shared.outstanding.fetch_add(n, Ordering::SeqCst);
        let sleeping = {
            let mut r = lock(&self.shared.ready);
            r.list.extend(subs.drain(..));
            r.sleeping
        };
        if sleeping > 0 {
            if n > 1 {
                self.shared.work.notify_all();
            } else {
                self.shared.work.notify_one();
            }
        }
    }

    /// Waits until no subscription has deliveries pending on the pool, or the timeout.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let shared = &self.shared;
        // Announce the waiter before checking: a worker that brings `outstanding` to zero
        // either sees the announcement (and notifies under the lock) or we see the zero.
        shared.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let mut r = lock(&shared.ready);
        let mut done = true;
        while shared.outstanding.load(Ordering::SeqCst) > 0 {
            let now = Instant::now();
            if now >= deadline {
                done = false;
                break;
            }
            r = wait_timeout(&shared.idle, r, deadline - now);
        }
        drop(r);
        shared.idle_waiters.fetch_sub(1, Ordering::SeqCst);
        done
    }

    /// Stops the workers once the ready list is empty; joins them unless called from one.
    pub(crate) fn stop(&self) {
        lock(&self.shared.ready).shutdown = true;
        self.shared.work.notify_all();
        if IS_WORKER.with(|w| w.get()) {
            return;
        }
        let handles = std::mem::take(&mut *lock(&self.handles));
        for h in handles {
            let _ = h.join();
        }
    }
}

fn worker(shared: &PoolShared) {
    IS_WORKER.with(|w| w.set(true));
    let mut chunk: Vec<Arc<Subscription>> = Vec::with_capacity(CHUNK);
    let mut again: Vec<Arc<Subscription>> = Vec::new();
    let mut buf = Vec::with_capacity(BUDGET);
    loop {
        {
            let mut r = lock(&shared.ready);
            while r.list.is_empty() {
                if r.shutdown {
                    return;
                }
                r.sleeping += 1;
                r = wait(&shared.work, r);
                r.sleeping -= 1;
            }
            // Share a short list among the workers, so that one slow sink holds up as few
            // others as possible; take bigger chunks when there is plenty to do.
            let take = r.list.len().div_ceil(shared.workers).min(CHUNK);
            chunk.extend(r.list.drain(..take));
        }
        let mut finished = 0;
        let mut delivered = 0;
        for sub in chunk.drain(..) {
            match sub.drain(BUDGET, &mut buf, &mut delivered) {
                Drained::Empty => finished += 1,
                Drained::More => again.push(sub),
            }
        }
        shared.deliveries.fetch_add(delivered, Ordering::Relaxed);
        if !again.is_empty() {
            let mut r = lock(&shared.ready);
            r.list.extend(again.drain(..));
            let sleeping = r.sleeping;
            drop(r);
            if sleeping > 0 {
                shared.work.notify_one();
            }
        }
        if finished > 0
            && shared.outstanding.fetch_sub(finished, Ordering::SeqCst) == finished
            && shared.idle_waiters.load(Ordering::SeqCst) > 0
        {
            // Take the lock so the notification cannot slip between a waiter's check and its
            // wait.
            drop(lock(&shared.ready));
            shared.idle.notify_all();
        }
    }
}
