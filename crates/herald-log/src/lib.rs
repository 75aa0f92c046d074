//! Herald's durable event log: every event gets a watermark when it is durably appended, is
//! published to the hub in watermark order, and can be read again after any watermark still
//! held, so a subscriber that was away resumes exactly where it stopped.
//!
//! [`EmbeddedLog`] is the default implementation: one directory, one redb file, group commit.
//! [`Follower`] turns "resume after W" into a gap-free, duplicate-free stream that continues
//! with live events.
//!
//! ```
//! use herald_core::{Event, EventMask, Filter, Hub, Notification, ObjectChange, Scope, Watermark};
//! use herald_log::{AppendOptions, EmbeddedLog, EventLog, Follower, LogOptions};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let log = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap();
//! let done = log
//!     .append(
//!         vec![Notification::new("alice/inbox/m1", Event::ObjectCreated(ObjectChange::default()))],
//!         AppendOptions::default(),
//!     )
//!     .await
//!     .unwrap();
//! assert_eq!(done.first, Watermark(1));
//!
//! let filter = Filter { scope: Scope::Subtree("alice".into()), mask: EventMask::ALL };
//! let mut follower = Follower::start(&log, filter, Watermark(0), Default::default()).unwrap();
//! let batch = follower.next().await.unwrap();
//! assert_eq!(batch[0].watermark, Some(Watermark(1)));
//! # });
//! ```

mod embedded;
mod follow;
pub mod prepare;
pub mod record;
mod shared;

use std::future::Future;

use herald_core::{Hub, InvalidEvent, Notification, Watermark};

pub use embedded::{EmbeddedLog, LogOptions, LogReport, Retention, SubscriptionRecord, check};
/// The storage under an [`EmbeddedLog`] opened with [`EmbeddedLog::open_with_backend`]:
/// redb's trait, re-exported so that a backend is written against the same redb as the log.
pub use redb::StorageBackend;

/// The log file's name inside the data directory.
pub const LOG_FILE: &str = embedded::LOG_FILE;

/// Creates the data directory and any missing parents, readable and writable by this user
/// only: it holds the log, key hashes and revocations. An existing directory keeps its mode.
pub fn create_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
pub use follow::{FollowError, FollowOptions, Follower, Gate, GateSwitch};
pub use record::RecordError;
pub use shared::SharedLog;

/// Whether an append waits for the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged only once fsynced: survives `kill -9` and power loss. The default.
    #[default]
    Durable,
    /// Acknowledged once written to the log's memory; made durable by the next durable commit
    /// or within a second. A crash can lose the last second of such appends.
    Buffered,
}

/// How to append.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOptions {
    /// A producer-chosen key that makes a retry safe: a second append with the same key and
    /// the same batch returns the first one's watermarks and appends nothing.
    pub idempotency_key: Option<String>,
    /// When the append is acknowledged.
    pub durability: Durability,
    /// The batch's place in its producer's ordered sequence, if it has one (see
    /// [`Sequence`]).
    pub place: Option<Place>,
}

/// One producer's ordered sequence of appends (a publishing connection). Each batch takes
/// a [`Place`] in it, in the order the producer made them; the log stores them in the order
/// they were handed to [`EventLog::append`]. Once a batch fails, every batch at a later place
/// fails with [`AppendError::Aborted`] and is not stored, so a failure never lets a later
/// batch land before the failed one; the batches before it are not affected. A producer
/// that saw the failure starts a new sequence to go on.
#[derive(Clone, Debug)]
pub struct Sequence(std::sync::Arc<SequenceState>);

#[derive(Debug)]
struct SequenceState {
    /// The next place to give out.
    next: std::sync::atomic::AtomicU64,
    /// The first place that failed (`u64::MAX`: none).
    failed_at: std::sync::atomic::AtomicU64,
}

impl Default for Sequence {
    fn default() -> Self {
        Sequence(std::sync::Arc::new(SequenceState {
            next: std::sync::atomic::AtomicU64::new(0),
            failed_at: std::sync::atomic::AtomicU64::new(u64::MAX),
        }))
    }
}

impl Sequence {
    /// A new sequence, nothing failed.
    pub fn new() -> Sequence {
        Sequence::default()
    }

    /// The next place: take it when the producer makes the batch, in its order.
    pub fn place(&self) -> Place {
        let index = self
            .0
            .next
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Place {
            sequence: self.clone(),
            index,
        }
    }

    /// Whether a batch of it failed.
    pub fn is_broken(&self) -> bool {
        self.0.failed_at.load(std::sync::atomic::Ordering::SeqCst) != u64::MAX
    }
}

impl PartialEq for Sequence {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Sequence {}

/// A batch's place in its producer's [`Sequence`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    sequence: Sequence,
    index: u64,
}

impl Place {
    /// Whether a batch at an earlier place failed: this one must not be stored.
    pub fn is_aborted(&self) -> bool {
        self.index
            > self
                .sequence
                .0
                .failed_at
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that the batch at this place failed: every later place is aborted.
    pub fn fail(&self) {
        self.sequence
            .0
            .failed_at
            .fetch_min(self.index, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `append` at `place`, for a backend whose appends of one producer are awaited
    /// one after another: aborted without running after an earlier failure, and failing the
    /// place when it fails.
    pub async fn guard(
        place: Option<Place>,
        append: impl Future<Output = Result<Appended, AppendError>>,
    ) -> Result<Appended, AppendError> {
        if place.as_ref().is_some_and(Place::is_aborted) {
            return Err(AppendError::Aborted);
        }
        let result = append.await;
        if let (Err(_), Some(p)) = (&result, &place) {
            p.fail();
        }
        result
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The watermark of the batch's first event; the others follow contiguously.
    pub first: Watermark,
    /// How many events the batch had.
    pub count: u32,
    /// The idempotency key had been seen: nothing new was appended.
    pub replayed: bool,
}

impl Appended {
    /// The watermark of each event of the batch, in order.
    pub fn watermarks(&self) -> impl Iterator<Item = Watermark> + use<> {
        let first = self.first.0;
        (0..u64::from(self.count)).map(move |i| Watermark(first + i))
    }
}

/// The range of watermarks a log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBounds {
    /// The oldest watermark still held (the next one to be assigned when the log is empty).
    pub first: Watermark,
    /// The last watermark assigned (0 when nothing was ever appended).
    pub last: Watermark,
}

impl LogBounds {
    /// Whether reading after `after` is possible without a gap.
    pub fn check(&self, after: Watermark) -> Result<(), ReadError> {
        if after.0.saturating_add(1) < self.first.0 {
            Err(ReadError::Expired {
                after,
                oldest_available: self.first,
            })
        } else if after > self.last {
            Err(ReadError::Ahead {
                after,
                last: self.last,
            })
        } else {
            Ok(())
        }
    }
}

/// Why an append was refused. Nothing was appended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The batch has no events.
    #[error("the batch is empty")]
    Empty,
    /// An event breaks the model's rules.
    #[error("event {index} is invalid: {reason}")]
    InvalidEvent {
        /// Its position in the batch.
        index: usize,
        /// What is wrong.
        reason: InvalidEvent,
    },
    /// The idempotency key was used before for a different batch.
    #[error("idempotency key {key:?} was already used for a different batch")]
    IdempotencyConflict {
        /// The key.
        key: String,
    },
    /// The log could not store the batch.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A batch at an earlier place of the same [`Sequence`] failed; this one was not stored.
    #[error("an earlier batch of this sequence failed; this one was not appended")]
    Aborted,
}

/// Why a read returned nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Events after `after` were removed by retention: resuming would skip them.
    #[error("watermark {after} has expired: the oldest event still held is {oldest_available}")]
    Expired {
        /// The watermark asked for.
        after: Watermark,
        /// The oldest watermark the log still holds.
        oldest_available: Watermark,
    },
    /// The log has not reached this watermark: it comes from another log (or a wiped one).
    #[error("watermark {after} is ahead of the log, whose last watermark is {last}")]
    Ahead {
        /// The watermark asked for.
        after: Watermark,
        /// The last watermark assigned.
        last: Watermark,
    },
    /// The log could not be read.
    #[error("{0}")]
    Log(String),
}

/// A storage failure, with the file or operation it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The data directory could not be created or used.
    #[error("data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The log file is damaged or not a log file.
    #[error("log file {path} is damaged or is not a Herald log: {reason}")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// What the store reported.
        reason: String,
    },
    /// Another process has the log open.
    #[error("log file {path} is in use by another process")]
    Locked {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A read or write failed.
    #[error("log storage: {0}")]
    Storage(String),
    /// A stored record does not decode.
    #[error("record {watermark}: {source}")]
    Record {
        /// Its watermark.
        watermark: Watermark,
        /// Why.
        source: RecordError,
    },
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
}

/// An append-only, watermarked, durable log of events that publishes each durable batch to a
/// hub. Implemented on disk by [`EmbeddedLog`]; a NATS JetStream implementation can take the
/// same place.
pub trait EventLog: Send + Sync + 'static {
    /// Appends `batch`; resolves once it is stored as `options.durability` asks, with the
    /// watermarks given to its events. The batch is then published to [`EventLog::hub`].
    /// A batch whose [`Place`] comes after a failed one fails with [`AppendError::Aborted`];
    /// a failure fails the batch's place.
    fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> impl Future<Output = Result<Appended, AppendError>> + Send;

    /// Up to `limit` events after watermark `after`, in order.
    fn read(
        &self,
        after: Watermark,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Notification>, ReadError>> + Send;

    /// Whether [`EventLog::append`] takes a batch's turn when it is called, so that one
    /// producer may keep many batches of a [`Sequence`] in flight and have them stored in
    /// the order it made them. When `false`, a producer that needs order awaits each append
    /// before the next.
    fn pipelines_sequences(&self) -> bool {
        false
    }

    /// The watermarks the log holds now.
    fn bounds(&self) -> Result<LogBounds, LogError>;

    /// The bytes of the events it holds (what `max_bytes` retention counts), when the backend
    /// knows it without a round trip; `None` otherwise.
    fn stored_bytes(&self) -> Option<u64> {
        None
    }

    /// The hub every durable batch is published to, in watermark order: the log's tail.
    fn hub(&self) -> &Hub;

    /// Makes everything submitted so far durable and stops accepting appends (at shutdown).
    /// Later appends fail with [`LogError::Closed`].
    fn shutdown(&self) -> impl Future<Output = Result<(), LogError>> + Send;
}

/// Where a log keeps durable subscriptions and their acknowledged watermarks, so that they
/// survive restarts beside the events they follow. Part of the storage seam: a server built
/// over [`EventLog`] + [`SubscriptionStore`] runs on any backend.
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Stores (or replaces) a subscription's description; durable when it resolves.
    fn put_subscription(
        &self,
        id: &str,
        spec: Vec<u8>,
    ) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Removes a subscription and its acknowledgement; resolves to whether it existed.
    fn delete_subscription(&self, id: &str) -> impl Future<Output = Result<bool, LogError>> + Send;

    /// Records that the subscriber of `id` has everything up to `watermark` (an older one
    /// than stored is ignored); resolves to whether the subscription exists.
    fn ack(
        &self,
        id: &str,
        watermark: Watermark,
    ) -> impl Future<Output = Result<bool, LogError>> + Send;

    /// Records that a delivery up to `through` is being attempted for `id` (a push), so that
    /// after a restart the same delivery, with the same identity, is attempted again before
    /// anything new. Resolves to whether the subscription exists.
    fn set_inflight(
        &self,
        id: &str,
        through: Watermark,
    ) -> impl Future<Output = Result<bool, LogError>> + Send;

    /// Every stored subscription.
    fn subscriptions(
        &self,
    ) -> impl Future<Output = Result<Vec<SubscriptionRecord>, LogError>> + Send;
}
