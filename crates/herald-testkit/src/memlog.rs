//! An in-memory [`EventLog`] + [`SubscriptionStore`] for tests on tokio's paused clock.
//!
//! [`herald_log::EmbeddedLog`] commits on a writer thread: while a test awaits it, the
//! runtime looks idle and a paused clock jumps to the next timer, so timings mean nothing.
//! [`MemoryLog`] does everything inside its async fns, on the caller's task, with no thread
//! and no spawn: an append is committed (and published to the hub) before its future
//! resolves. It keeps the contract of the trait (validation, contiguous watermarks, reads
//! checked against [`LogBounds::check`], idempotency keys, publication in watermark order,
//! [`LogError::Closed`] after shutdown) and adds two levers a disk log cannot offer:
//! [`MemoryLog::drop_oldest`] (retention, so that a position expires) and
//! [`MemoryLog::stall`] / [`MemoryLog::release`] (appends wait, as behind a slow disk).
//!
//! ```
//! use herald_core::{Event, Notification, ObjectChange, Watermark};
//! use herald_log::{AppendOptions, EventLog};
//! use herald_testkit::memlog::MemoryLog;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let log = MemoryLog::new();
//! let done = log
//!     .append(
//!         vec![Notification::new("a/1", Event::ObjectCreated(ObjectChange::default()))],
//!         AppendOptions::default(),
//!     )
//!     .await
//!     .unwrap();
//! assert_eq!(done.first, Watermark(1));
//! assert_eq!(log.read(Watermark(0), 10).await.unwrap()[0].watermark, Some(Watermark(1)));
//! # });
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use herald_core::{Batch, Event, Hub, Key, Notification, Watermark};
use herald_log::{
    AppendError, AppendOptions, Appended, EventLog, LogBounds, LogError, ReadError,
    SubscriptionRecord, SubscriptionStore,
};
use tokio::sync::watch;

/// An event log held in memory; cheap to clone (clones share the log).
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    state: Mutex<State>,
    /// Appends take their turn here (a fair lock), so that appends released from a stall
    /// commit in the order they were made.
    turn: tokio::sync::Mutex<()>,
    /// `true` while appends are held.
    stalled: watch::Sender<bool>,
    /// Appends waiting at the stall now.
    waiting: AtomicUsize,
}

/// What an idempotency key appended: the batch's first watermark and its keys and events.
struct Remembered {
    first: u64,
    batch: Vec<(Key, Event)>,
}

struct State {
    /// The events held, `first` first: the event at index `i` has watermark `first + i`.
    events: VecDeque<Notification>,
    /// The oldest watermark held (the next one to be assigned when none is).
    first: u64,
    /// The next watermark to assign.
    next: u64,
    idempotency: HashMap<String, Remembered>,
    /// Subscriptions by id: their description and acknowledged watermark.
    subscriptions: BTreeMap<String, (Vec<u8>, Watermark)>,
    /// Deliveries being attempted, by subscription.
    inflight: BTreeMap<String, Watermark>,
    closed: bool,
}

impl State {
    fn bounds(&self) -> LogBounds {
        LogBounds {
            first: Watermark(self.first),
            last: Watermark(self.next - 1),
        }
    }
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("MemoryLog")
            .field("bounds", &s.bounds())
            .field("closed", &s.closed)
            .field("stalled", &self.is_stalled())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog::new()
    }
}

impl MemoryLog {
    /// An empty log publishing to a hub of its own.
    pub fn new() -> MemoryLog {
        MemoryLog::with_hub(Hub::default())
    }

    /// An empty log publishing every appended batch to `hub`.
    pub fn with_hub(hub: Hub) -> MemoryLog {
        MemoryLog {
            inner: Arc::new(Inner {
                hub,
                state: Mutex::new(State {
                    events: VecDeque::new(),
                    first: 1,
                    next: 1,
                    idempotency: HashMap::new(),
                    subscriptions: BTreeMap::new(),
                    inflight: BTreeMap::new(),
                    closed: false,
                }),
                turn: tokio::sync::Mutex::new(()),
                stalled: watch::Sender::new(false),
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the `count` oldest events held (retention): reading after a watermark before
    /// them then fails with [`ReadError::Expired`]. Returns the bounds after.
    pub fn drop_oldest(&self, count: usize) -> LogBounds {
        let mut s = self.state();
        let n = count.min(s.events.len());
        s.events.drain(..n);
        s.first += n as u64;
        s.bounds()
    }

    /// Every event held, in order (a synchronous [`EventLog::read`] of the whole log).
    pub fn events(&self) -> Vec<Notification> {
        self.state().events.iter().cloned().collect()
    }

    /// Holds every append (from now on, and those not yet committed) until
    /// [`MemoryLog::release`]: a log behind a disk that stopped answering.
    pub fn stall(&self) {
        self.inner.stalled.send_replace(true);
    }

    /// Lets the appends held by [`MemoryLog::stall`] go, in the order they were made.
    pub fn release(&self) {
        self.inner.stalled.send_replace(false);
    }

    /// Whether appends are held.
    pub fn is_stalled(&self) -> bool {
        *self.inner.stalled.borrow()
    }

    /// How many appends are waiting at the stall now.
    pub fn stalled_appends(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Whether [`EventLog::shutdown`] was called.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Waits while the log is stalled, counted in [`MemoryLog::stalled_appends`].
    async fn pass_stall(&self) {
        if !self.is_stalled() {
            return;
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.inner.waiting);
        let mut stalled = self.inner.stalled.subscribe();
        // The sender lives in `inner`, which outlives this borrow: this cannot fail.
        let _ = stalled.wait_for(|s| !*s).await;
    }

    /// Commits `batch` (already validated) and returns it stamped, or what to answer at once.
    fn commit(
        &self,
        mut batch: Vec<Notification>,
        options: &AppendOptions,
    ) -> Result<(Appended, Option<Batch>), AppendError> {
        let mut s = self.state();
        if s.closed {
            return Err(AppendError::Log(LogError::Closed));
        }
        let count = batch.len() as u32;
        if let Some(key) = &options.idempotency_key {
            if let Some(seen) = s.idempotency.get(key) {
                // Keys and events, not timestamps: a retry is stamped anew but is the same.
                let same = seen.batch.len() == batch.len()
                    && seen
                        .batch
                        .iter()
                        .zip(&batch)
                        .all(|((k, e), n)| *k == n.key && *e == n.event);
                return if same {
                    Ok((
                        Appended {
                            first: Watermark(seen.first),
                            count,
                            replayed: true,
                        },
                        None,
                    ))
                } else {
                    Err(AppendError::IdempotencyConflict { key: key.clone() })
                };
            }
        }
        let first = s.next;
        for (n, w) in batch.iter_mut().zip(first..) {
            n.watermark = Some(Watermark(w));
        }
        s.events.extend(batch.iter().cloned());
        s.next += u64::from(count);
        if let Some(key) = &options.idempotency_key {
            let remembered = Remembered {
                first,
                batch: batch
                    .iter()
                    .map(|n| (n.key.clone(), n.event.clone()))
                    .collect(),
            };
            s.idempotency.insert(key.clone(), remembered);
        }
        Ok((
            Appended {
                first: Watermark(first),
                count,
                replayed: false,
            },
            Some(Batch::from(batch)),
        ))
    }
}

impl MemoryLog {
    /// [`EventLog::append`] without the sequence guard.
    async fn append_now(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<Appended, AppendError> {
        if batch.is_empty() {
            return Err(AppendError::Empty);
        }
        for (index, n) in batch.iter().enumerate() {
            n.validate()
                .map_err(|reason| AppendError::InvalidEvent { index, reason })?;
        }
        // One append at a time, in call order: commit and publication stay in watermark
        // order, as the embedded log's single writer keeps them.
        let _turn = self.inner.turn.lock().await;
        self.pass_stall().await;
        let (appended, publish) = self.commit(batch, &options)?;
        if let Some(batch) = publish {
            // Committed, so published, as the embedded log does after its commit. A hub shut
            // down already has nobody left to tell.
            let _ = self.inner.hub.notify(batch);
        }
        Ok(appended)
    }
}

impl EventLog for MemoryLog {
    async fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<Appended, AppendError> {
        herald_log::Place::guard(options.place.clone(), self.append_now(batch, options)).await
    }

    async fn read(&self, after: Watermark, limit: usize) -> Result<Vec<Notification>, ReadError> {
        let s = self.state();
        s.bounds().check(after)?;
        // `check` passed: `after + 1 >= first`.
        let skip = (after.0 + 1 - s.first) as usize;
        Ok(s.events.iter().skip(skip).take(limit).cloned().collect())
    }

    fn bounds(&self) -> Result<LogBounds, LogError> {
        Ok(self.state().bounds())
    }

    fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Stops accepting appends and subscription changes (everything is "durable" already).
    /// Appends still held by a stall fail with [`LogError::Closed`] when released. Reads go
    /// on working, as they do on a closed embedded log.
    async fn shutdown(&self) -> Result<(), LogError> {
        self.state().closed = true;
        Ok(())
    }
}

impl SubscriptionStore for MemoryLog {
    async fn put_subscription(&self, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
        let mut s = self.state();
        if s.closed {
            return Err(LogError::Closed);
        }
        let acked = s.subscriptions.get(id).map_or(Watermark(0), |(_, a)| *a);
        s.subscriptions.insert(id.to_owned(), (spec, acked));
        Ok(())
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, LogError> {
        let mut s = self.state();
        if s.closed {
            return Err(LogError::Closed);
        }
        s.inflight.remove(id);
        Ok(s.subscriptions.remove(id).is_some())
    }

    async fn ack(&self, id: &str, watermark: Watermark) -> Result<bool, LogError> {
        let mut s = self.state();
        if s.closed {
            return Err(LogError::Closed);
        }
        Ok(match s.subscriptions.get_mut(id) {
            Some((_, acked)) => {
                *acked = (*acked).max(watermark);
                true
            }
            None => false,
        })
    }

    async fn set_inflight(&self, id: &str, through: Watermark) -> Result<bool, LogError> {
        let mut s = self.state();
        if s.closed {
            return Err(LogError::Closed);
        }
        if !s.subscriptions.contains_key(id) {
            return Ok(false);
        }
        s.inflight.insert(id.to_owned(), through);
        Ok(true)
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        let s = self.state();
        Ok(s.subscriptions
            .iter()
            .map(|(id, (spec, acked))| SubscriptionRecord {
                id: id.clone(),
                spec: spec.clone(),
                acked: *acked,
                inflight: s.inflight.get(id).copied().unwrap_or(Watermark(0)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{EventMask, ObjectChange, Scope, SubscribeOptions};

    fn created(key: &str) -> Notification {
        Notification::new(key, Event::ObjectCreated(ObjectChange::default()))
    }

    #[tokio::test]
    async fn appends_get_contiguous_watermarks_are_published_and_read_back_in_order() {
        let log = MemoryLog::new();
        let mut rx = log
            .hub()
            .subscribe_receiver(
                Scope::Subtree("a".into()),
                EventMask::ALL,
                SubscribeOptions::default(),
            )
            .unwrap();
        assert!(matches!(
            log.append(vec![], AppendOptions::default()).await,
            Err(AppendError::Empty)
        ));
        assert!(matches!(
            log.append(vec![created("")], AppendOptions::default())
                .await,
            Err(AppendError::InvalidEvent { index: 0, .. })
        ));
        let one = log
            .append(
                vec![created("a/1"), created("a/2")],
                AppendOptions::default(),
            )
            .await
            .unwrap();
        let two = log
            .append(vec![created("a/3")], AppendOptions::default())
            .await
            .unwrap();
        assert_eq!((one.first, one.count), (Watermark(1), 2));
        assert_eq!(two.first, Watermark(3));
        let Ok(herald_core::OwnedDelivery::Events(b)) = rx.try_recv() else {
            panic!("the first batch was not published at once");
        };
        assert_eq!(b.last_watermark(), Some(Watermark(2)));
        let read = log.read(Watermark(1), 10).await.unwrap();
        let ws: Vec<_> = read.iter().map(|n| n.watermark.unwrap().0).collect();
        assert_eq!(ws, [2, 3]);
        assert_eq!(log.read(Watermark(0), 1).await.unwrap().len(), 1);
        assert!(matches!(
            log.read(Watermark(4), 1).await,
            Err(ReadError::Ahead { .. })
        ));
    }

    #[tokio::test]
    async fn dropping_the_oldest_events_expires_the_positions_before_them() {
        let log = MemoryLog::new();
        for i in 0..5 {
            log.append(vec![created(&format!("a/{i}"))], AppendOptions::default())
                .await
                .unwrap();
        }
        let b = log.drop_oldest(3);
        assert_eq!((b.first, b.last), (Watermark(4), Watermark(5)));
        assert_eq!(
            log.read(Watermark(2), 10).await,
            Err(ReadError::Expired {
                after: Watermark(2),
                oldest_available: Watermark(4)
            })
        );
        let ws: Vec<_> = log.read(Watermark(3), 10).await.unwrap();
        assert_eq!(ws[0].watermark, Some(Watermark(4)));
    }

    #[tokio::test]
    async fn an_idempotent_retry_appends_nothing_and_a_different_batch_conflicts() {
        let log = MemoryLog::new();
        let opts = AppendOptions {
            idempotency_key: Some("k".into()),
            ..Default::default()
        };
        let first = log
            .append(vec![created("a/1")], opts.clone())
            .await
            .unwrap();
        let again = log
            .append(vec![created("a/1")], opts.clone())
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.first, first.first);
        assert_eq!(log.bounds().unwrap().last, Watermark(1));
        assert!(matches!(
            log.append(vec![created("a/2")], opts).await,
            Err(AppendError::IdempotencyConflict { .. })
        ));
    }

    #[tokio::test]
    async fn a_stalled_log_holds_appends_until_released_and_refuses_them_after_shutdown() {
        let log = MemoryLog::new();
        log.stall();
        let held = {
            let log = log.clone();
            tokio::spawn(async move { log.append(vec![created("a/1")], Default::default()).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(log.stalled_appends(), 1);
        assert_eq!(log.bounds().unwrap().last, Watermark(0));
        log.release();
        assert_eq!(held.await.unwrap().unwrap().first, Watermark(1));
        assert_eq!(log.stalled_appends(), 0);
        log.shutdown().await.unwrap();
        assert!(matches!(
            log.append(vec![created("a/2")], Default::default()).await,
            Err(AppendError::Log(LogError::Closed))
        ));
    }

    #[tokio::test]
    async fn subscriptions_keep_their_spec_and_highest_ack_until_deleted() {
        let log = MemoryLog::new();
        assert!(!log.ack("s", Watermark(3)).await.unwrap());
        log.put_subscription("s", b"spec".to_vec()).await.unwrap();
        assert!(log.ack("s", Watermark(3)).await.unwrap());
        assert!(log.ack("s", Watermark(2)).await.unwrap());
        let subs = log.subscriptions().await.unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(
            (subs[0].spec.as_slice(), subs[0].acked),
            (&b"spec"[..], Watermark(3))
        );
        assert!(log.delete_subscription("s").await.unwrap());
        assert!(!log.delete_subscription("s").await.unwrap());
        assert!(log.subscriptions().await.unwrap().is_empty());
    }
}
