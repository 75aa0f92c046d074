//! The embedded log: one redb file, one writer thread doing group commits.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_core::{Batch, Hub, Notification, Timestamp, Watermark};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, StorageBackend,
    TableDefinition,
};
use tokio::sync::oneshot;

use crate::prepare::{Digest, Prepared, prepare};
use crate::record;
use crate::{
    AppendError, AppendOptions, Appended, Durability, EventLog, LogBounds, LogError, Place,
    ReadError, SubscriptionStore,
};

const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const IDEMPOTENCY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("idempotency");
/// Idempotency keys by the time they were recorded, to forget them in order.
const IDEMPOTENCY_BY_TIME: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("idempotency_by_time");
const SUBSCRIPTIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("subscriptions");
const ACKS: TableDefinition<'_, &str, u64> = TableDefinition::new("acks");
/// The delivery each push subscription is attempting (see `SubscriptionStore::set_inflight`).
const INFLIGHT: TableDefinition<'_, &str, u64> = TableDefinition::new("inflight");

const META_NEXT: &str = "next";
const META_FIRST: &str = "first";
const META_BYTES: &str = "bytes";
const META_FORMAT: &str = "format";
/// The file's format: 2 stores events in runs; files of format 1 (one event per entry) are
/// read as they are and marked 2 when opened, since their entries read as runs of one.
const FILE_FORMAT: u64 = 2;

/// The log file's name inside the data directory.
pub(crate) const LOG_FILE: &str = "events.redb";

/// How long buffered appends may wait for a durable commit.
const BUFFERED_FLUSH: Duration = Duration::from_secs(1);
/// How often retention runs at most (unless a limit is badly exceeded).
const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// How many events one retention pass removes at most, so appends never wait long.
const RETENTION_PASS: usize = 100 * 1024;
/// How many expired idempotency keys one retention pass forgets at most.
const IDEMPOTENCY_PASS: usize = 10 * 1024;

/// How much history the log keeps. `None` means no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Events appended longer ago than this are removed.
    pub max_age: Option<Duration>,
    /// The oldest events are removed while the records exceed this many bytes.
    pub max_bytes: Option<u64>,
    /// The oldest events are removed while there are more than this many.
    pub max_events: Option<u64>,
}

impl Retention {
    fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_bytes.is_none() && self.max_events.is_none()
    }
}

/// How the embedded log is set up.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// How much history to keep.
    pub retention: Retention,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// The most events one group commit takes.
    pub max_group_events: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            retention: Retention {
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
                max_bytes: None,
                max_events: None,
            },
            idempotency_ttl: Duration::from_secs(24 * 3600),
            max_group_events: 64 * 1024,
        }
    }
}

/// A durable subscription as stored: the server's own description of it, and the last
/// watermark its subscriber acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The subscription's id.
    pub id: String,
    /// Its description, in the server's format.
    pub spec: Vec<u8>,
    /// The last watermark acknowledged (0 if none).
    pub acked: Watermark,
    /// The end of the delivery being attempted when it was stored (0 if none; not past
    /// `acked` when that delivery was acknowledged).
    pub inflight: Watermark,
}

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

struct AppendJob {
    batch: Vec<Notification>,
    records: Vec<Vec<u8>>,
    idempotency: Option<(String, Digest)>,
    durability: Durability,
    /// Its place in the producer's sequence: aborted after an earlier failure, failed when
    /// this fails.
    place: Option<Place>,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
}

enum Command {
    Append(AppendJob),
    PutSubscription {
        id: String,
        spec: Vec<u8>,
        reply: Reply<()>,
    },
    DeleteSubscription {
        id: String,
        reply: Reply<bool>,
    },
    Ack {
        id: String,
        watermark: Watermark,
        reply: Reply<bool>,
    },
    Inflight {
        id: String,
        watermark: Watermark,
        reply: Reply<bool>,
    },
    Flush {
        reply: Reply<()>,
    },
}

impl Command {
    fn events(&self) -> usize {
        match self {
            Command::Append(job) => job.records.len(),
            _ => 1,
        }
    }

    fn needs_fsync(&self) -> bool {
        match self {
            Command::Append(job) => job.durability == Durability::Durable,
            _ => true,
        }
    }
}

/// The embedded, on-disk event log. Cheap to clone; every clone is the same log. The writer
/// thread stops when the last clone is dropped or [`EmbeddedLog::close`] is called.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    hub: Hub,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`, publishing every durable batch to `hub`.
    pub fn open(dir: &Path, options: LogOptions, hub: Hub) -> Result<EmbeddedLog, LogError> {
        crate::create_data_dir(dir).map_err(|source| LogError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            create_fresh(dir, &path)?;
        }
        let db = database_builder()
            .create(&path)
            .map_err(|e| open_error(e, &path))?;
        EmbeddedLog::start(db, path, options, hub)
    }

    /// Opens (or creates) the log on a storage `backend` instead of a file: the seam for a
    /// simulated disk, such as the power-cut disk of `herald-testkit`. `name` stands for the
    /// file in messages and in [`EmbeddedLog::path`]. An empty backend becomes an empty log.
    /// There is no file to create beside it and rename, so that step of [`EmbeddedLog::open`]
    /// is left out: a backend whose very first creation was interrupted may hold an image
    /// that fails to open with [`LogError::Corrupt`].
    pub fn open_with_backend(
        backend: impl StorageBackend,
        name: impl Into<PathBuf>,
        options: LogOptions,
        hub: Hub,
    ) -> Result<EmbeddedLog, LogError> {
        let path = name.into();
        let db = database_builder()
            .create_with_backend(backend)
            .map_err(|e| open_error(e, &path))?;
        EmbeddedLog::start(db, path, options, hub)
    }

    /// Everything after the database is open: counters, writer thread, handle.
    fn start(
        db: Database,
        path: PathBuf,
        options: LogOptions,
        hub: Hub,
    ) -> Result<EmbeddedLog, LogError> {
        let db = Arc::new(db);
        let state = WriterState::load(&db, &path)?;
        tracing::info!(
            path = %path.display(),
            first = state.first,
            next = state.next,
            bytes = state.bytes,
            "event log open"
        );
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            hub: hub.clone(),
            options,
            state,
            last_retention: Instant::now() - RETENTION_EVERY,
            unsynced_since: None,
        };
        let handle = std::thread::Builder::new()
            .name("herald-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| storage(format!("starting the writer thread: {e}")))?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                path,
                hub,
                commands: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The log file (for a log on a storage backend, the name it was opened with).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn send(&self, cmd: Command) -> Result<(), LogError> {
        let guard = self
            .inner
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .ok_or(LogError::Closed)?
            .send(cmd)
            .map_err(|_| LogError::Closed)
    }

    /// Validates and encodes a batch on the caller's thread, then hands it to the writer.
    fn submit(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<oneshot::Receiver<Result<Appended, AppendError>>, AppendError> {
        let place = options.place;
        if place.as_ref().is_some_and(Place::is_aborted) {
            return Err(AppendError::Aborted);
        }
        let submitted = prepare(batch, options.idempotency_key.is_some()).and_then(
            |Prepared {
                 batch,
                 records,
                 digest,
             }| {
                let (reply, rx) = oneshot::channel();
                self.send(Command::Append(AppendJob {
                    batch,
                    records,
                    idempotency: options.idempotency_key.zip(digest),
                    durability: options.durability,
                    place: place.clone(),
                    reply,
                }))?;
                Ok(rx)
            },
        );
        if submitted.is_err() {
            if let Some(p) = &place {
                p.fail();
            }
        }
        submitted
    }

    /// [`EventLog::append`] for threads outside an async runtime.
    pub fn append_blocking(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<Appended, AppendError> {
        self.submit(batch, options)?
            .blocking_recv()
            .map_err(|_| AppendError::Log(LogError::Closed))?
    }

    /// [`EventLog::read`] for threads outside an async runtime.
    pub fn read_blocking(
        &self,
        after: Watermark,
        limit: usize,
    ) -> Result<Vec<Notification>, ReadError> {
        let rerr = |e: LogError| ReadError::Log(e.to_string());
        let txn = self.inner.db.begin_read().map_err(|e| rerr(storage(e)))?;
        let bounds = bounds_in(&txn).map_err(rerr)?;
        bounds.check(after)?;
        let events = txn.open_table(EVENTS).map_err(|e| rerr(storage(e)))?;
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit == 0 {
            return Ok(out);
        }
        let start = after.0 + 1;
        // The run holding `start` begins at or before it.
        let from = events
            .range(..=start)
            .map_err(|e| rerr(storage(e)))?
            .next_back()
            .transpose()
            .map_err(|e| rerr(storage(e)))?
            .map_or(start, |(k, _)| k.value());
        'runs: for entry in events.range(from..).map_err(|e| rerr(storage(e)))? {
            let (k, v) = entry.map_err(|e| rerr(storage(e)))?;
            for (i, r) in record::records(v.value()).enumerate() {
                let watermark = Watermark(k.value() + i as u64);
                if watermark.0 < start {
                    continue;
                }
                let n = r
                    .and_then(|r| record::decode(r, watermark))
                    .map_err(|source| rerr(LogError::Record { watermark, source }))?;
                out.push(n);
                if out.len() == limit {
                    break 'runs;
                }
            }
        }
        Ok(out)
    }

    /// Waits until everything submitted so far is durable.
    pub fn flush_blocking(&self) -> Result<(), LogError> {
        self.request(|reply| Command::Flush { reply })?
            .blocking_recv()
            .map_err(|_| LogError::Closed)?
    }

    /// Every stored durable subscription, by id ([`SubscriptionStore::subscriptions`] for
    /// threads outside an async runtime).
    pub fn subscriptions_blocking(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let subs = match txn.open_table(SUBSCRIPTIONS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let acks = txn.open_table(ACKS).map_err(storage)?;
        let inflight = match txn.open_table(INFLIGHT) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(storage(e)),
        };
        let mut out = Vec::new();
        for entry in subs.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let id = k.value().to_owned();
            let acked = acks
                .get(id.as_str())
                .map_err(storage)?
                .map_or(0, |a| a.value());
            let through = match &inflight {
                Some(t) => t
                    .get(id.as_str())
                    .map_err(storage)?
                    .map_or(0, |a| a.value()),
                None => 0,
            };
            out.push(SubscriptionRecord {
                id,
                spec: v.value().to_vec(),
                acked: Watermark(acked),
                inflight: Watermark(through),
            });
        }
        Ok(out)
    }

    /// Stops the writer after everything submitted so far is durable. Later calls fail with
    /// [`LogError::Closed`].
    pub fn close(&self) -> Result<(), LogError> {
        let flushed = self.flush_blocking();
        self.inner
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
        flushed
    }

    fn request<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<oneshot::Receiver<Result<T, LogError>>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        Ok(rx)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, LogError> {
        self.request(make)?.await.map_err(|_| LogError::Closed)?
    }
}

impl EventLog for EmbeddedLog {
    /// The batch takes its place in the writer's queue when this is called, before the
    /// future is polled: appends made one after another are stored in that order, however
    /// their futures are awaited (a producer may keep many in flight).
    fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> impl Future<Output = Result<Appended, AppendError>> + Send {
        let submitted = self.submit(batch, options);
        async move {
            submitted?
                .await
                .map_err(|_| AppendError::Log(LogError::Closed))?
        }
    }

    fn pipelines_sequences(&self) -> bool {
        true
    }

    async fn read(&self, after: Watermark, limit: usize) -> Result<Vec<Notification>, ReadError> {
        // A page read is a short, CPU-bound walk of an ordered table: done inline.
        self.read_blocking(after, limit)
    }

    fn bounds(&self) -> Result<LogBounds, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        bounds_in(&txn)
    }

    fn stored_bytes(&self) -> Option<u64> {
        let txn = self.inner.db.begin_read().ok()?;
        let meta = txn.open_table(META).ok()?;
        Some(meta.get(META_BYTES).ok()?.map_or(0, |v| v.value()))
    }

    fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    async fn shutdown(&self) -> Result<(), LogError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.close())
            .await
            .map_err(|e| storage(format!("closing the log: {e}")))?
    }
}

impl SubscriptionStore for EmbeddedLog {
    async fn put_subscription(&self, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
        let id = id.to_owned();
        self.call(|reply| Command::PutSubscription { id, spec, reply })
            .await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, LogError> {
        let id = id.to_owned();
        self.call(|reply| Command::DeleteSubscription { id, reply })
            .await
    }

    async fn ack(&self, id: &str, watermark: Watermark) -> Result<bool, LogError> {
        let id = id.to_owned();
        self.call(|reply| Command::Ack {
            id,
            watermark,
            reply,
        })
        .await
    }

    async fn set_inflight(&self, id: &str, through: Watermark) -> Result<bool, LogError> {
        let id = id.to_owned();
        self.call(|reply| Command::Inflight {
            id,
            watermark: through,
            reply,
        })
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        self.subscriptions_blocking()
    }
}

/// What [`check`] found in a log file that passed the integrity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogReport {
    /// The watermarks it holds (`last < first` when it holds none).
    pub bounds: LogBounds,
    /// How many events it holds.
    pub events: u64,
    /// How many durable subscriptions are stored in it.
    pub subscriptions: u64,
    /// The file's size in bytes.
    pub file_bytes: u64,
}

/// Verifies the log file at `path` offline: redb's integrity check (every page's checksum,
/// the allocator state rebuilt), then Herald's own counters against the events table. It takes
/// the file's lock as a server does, so a log in use fails with [`LogError::Locked`]; a file
/// that is not a sound Herald log fails with [`LogError::Corrupt`]. Like opening the log after
/// an unclean shutdown, the check may repair what redb can; it changes nothing else.
pub fn check(path: &Path) -> Result<LogReport, LogError> {
    // redb can panic on a page altered outside it even while it checks (seen with flipped
    // bits in a tree page): that is a damaged file too, not a reason to abort the caller.
    std::panic::catch_unwind(|| check_file(path)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(LogError::Corrupt {
            path: path.to_owned(),
            reason: format!("the store failed reading it ({why})"),
        })
    })
}

fn check_file(path: &Path) -> Result<LogReport, LogError> {
    let corrupt = |reason: String| LogError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let file_bytes = std::fs::metadata(path)
        .map_err(|source| LogError::Directory {
            path: path.to_owned(),
            source,
        })?
        .len();
    if file_bytes == 0 {
        return Err(corrupt("the file is empty".to_owned()));
    }
    // Not `database_builder`: with the check on open redb calls the repair callback every
    // time, and its warning would be wrong here.
    let mut builder = Database::builder();
    // Without it redb trusts the file's recorded state, and a file altered outside redb may
    // make it panic instead of failing.
    builder.set_check_integrity_on_open(true);
    let db = builder.open(path).map_err(|e| open_error(e, path))?;
    let txn = db.begin_read().map_err(|e| corrupt(e.to_string()))?;
    let missing = |table: &str, e: redb::TableError| {
        corrupt(format!("no {table} table, not a Herald log ({e})"))
    };
    let meta = txn.open_table(META).map_err(|e| missing("meta", e))?;
    match meta
        .get(META_FORMAT)
        .map_err(|e| corrupt(e.to_string()))?
        .map(|v| v.value())
    {
        None | Some(1) | Some(FILE_FORMAT) => {}
        Some(other) => {
            return Err(corrupt(format!(
                "file format {other} is not one this version reads ({FILE_FORMAT})"
            )));
        }
    }
    drop(meta);
    let bounds = bounds_in(&txn)?;
    let events = txn.open_table(EVENTS).map_err(|e| missing("events", e))?;
    let next = bounds.last.0 + 1;
    if let Some(last) = last_stored(&events).map_err(|e| corrupt(e.to_string()))? {
        if last >= next {
            return Err(corrupt(format!(
                "event {last} is beyond the recorded next watermark {next}"
            )));
        }
    }
    let subscriptions = txn
        .open_table(SUBSCRIPTIONS)
        .map_err(|e| missing("subscriptions", e))?
        .len()
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(LogReport {
        bounds,
        events: next.saturating_sub(bounds.first.0),
        subscriptions,
        file_bytes,
    })
}

/// The watermark of the last event stored in `events` (a key is its batch's first watermark).
fn last_stored(
    events: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Option<u64>, redb::StorageError> {
    Ok(events
        .last()?
        .map(|(k, v)| k.value() + u64::from(record::records(v.value()).stated().saturating_sub(1))))
}

/// How every log database is opened: repairs after an unclean shutdown are reported.
fn database_builder() -> redb::Builder {
    let mut builder = Database::builder();
    builder.set_repair_callback(|session| {
        tracing::warn!(
            progress = session.progress(),
            "repairing the log after an unclean shutdown"
        );
    });
    builder
}

/// What a database that does not open means for the log at `path`.
fn open_error(e: redb::DatabaseError, path: &Path) -> LogError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => LogError::Locked {
            path: path.to_owned(),
        },
        other => LogError::Corrupt {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn bounds_in(txn: &redb::ReadTransaction) -> Result<LogBounds, LogError> {
    let meta = txn.open_table(META).map_err(storage)?;
    let get = |k: &str| -> Result<u64, LogError> {
        Ok(meta.get(k).map_err(storage)?.map_or(0, |v| v.value()))
    };
    let next = get(META_NEXT)?.max(1);
    let first = get(META_FIRST)?.max(1);
    Ok(LogBounds {
        first: Watermark(first),
        last: Watermark(next - 1),
    })
}

/// Creates an empty log at `path` all at once: made beside it, initialised and synced, then
/// renamed into place. A process killed (or a machine losing power) while creating its log
/// for the first time leaves no half-written file that would refuse to open; nothing was
/// acknowledged from it yet.
fn create_fresh(dir: &Path, path: &Path) -> Result<(), LogError> {
    let fresh = dir.join(format!("{LOG_FILE}.new"));
    let io = |source: std::io::Error| LogError::Directory {
        path: dir.to_owned(),
        source,
    };
    match std::fs::remove_file(&fresh) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    {
        let db = Database::create(&fresh).map_err(|e| LogError::Corrupt {
            path: fresh.clone(),
            reason: e.to_string(),
        })?;
        WriterState::load(&db, &fresh)?;
    }
    std::fs::File::open(&fresh)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&fresh, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// The writer's view of the log's counters, kept in step with `meta`.
#[derive(Clone, Copy)]
struct WriterState {
    next: u64,
    first: u64,
    bytes: u64,
}

impl WriterState {
    /// Reads the counters, creating the tables on first use and checking the file format.
    fn load(db: &Database, path: &Path) -> Result<WriterState, LogError> {
        let corrupt = |e: &dyn std::fmt::Display| LogError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let txn = db.begin_write().map_err(|e| corrupt(&e))?;
        let state = {
            let mut meta = txn.open_table(META).map_err(|e| corrupt(&e))?;
            let events = txn.open_table(EVENTS).map_err(|e| corrupt(&e))?;
            txn.open_table(IDEMPOTENCY).map_err(|e| corrupt(&e))?;
            txn.open_table(IDEMPOTENCY_BY_TIME)
                .map_err(|e| corrupt(&e))?;
            txn.open_table(SUBSCRIPTIONS).map_err(|e| corrupt(&e))?;
            txn.open_table(ACKS).map_err(|e| corrupt(&e))?;
            txn.open_table(INFLIGHT).map_err(|e| corrupt(&e))?;
            let get =
                |meta: &redb::Table<'_, &str, u64>, k: &str| -> Result<Option<u64>, LogError> {
                    Ok(meta.get(k).map_err(|e| corrupt(&e))?.map(|v| v.value()))
                };
            match get(&meta, META_FORMAT)? {
                None => {
                    meta.insert(META_FORMAT, FILE_FORMAT)
                        .map_err(|e| corrupt(&e))?;
                }
                Some(FILE_FORMAT) => {}
                Some(1) => {
                    meta.insert(META_FORMAT, FILE_FORMAT)
                        .map_err(|e| corrupt(&e))?;
                }
                Some(other) => {
                    return Err(corrupt(&format!(
                        "file format {other} is not one this version reads ({FILE_FORMAT})"
                    )));
                }
            }
            let next = get(&meta, META_NEXT)?.unwrap_or(1).max(1);
            let first = get(&meta, META_FIRST)?.unwrap_or(1).max(1);
            let bytes = get(&meta, META_BYTES)?.unwrap_or(0);
            // The counters and the table are written in one transaction; check they agree.
            if let Some(last) = last_stored(&events).map_err(|e| corrupt(&e))? {
                if last >= next {
                    return Err(corrupt(&format!(
                        "event {last} is beyond the recorded next watermark {next}"
                    )));
                }
            }
            WriterState { next, first, bytes }
        };
        txn.commit().map_err(|e| corrupt(&e))?;
        Ok(state)
    }
}

struct Writer {
    db: Arc<Database>,
    hub: Hub,
    options: LogOptions,
    state: WriterState,
    last_retention: Instant,
    /// When the oldest commit not yet fsynced was made.
    unsynced_since: Option<Instant>,
}

/// What one command did inside a group commit, answered after the commit.
enum Outcome {
    Appended(Appended),
    Conflict(String),
    /// An earlier batch of its sequence failed.
    Aborted,
    Done,
    Found(bool),
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            let first = match self.unsynced_since {
                // Buffered commits wait at most BUFFERED_FLUSH for a durable one.
                Some(since) => {
                    match rx.recv_timeout(BUFFERED_FLUSH.saturating_sub(since.elapsed())) {
                        Ok(c) => c,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.sync();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            let mut group = vec![first];
            let mut events = group[0].events();
            while events < self.options.max_group_events {
                match rx.try_recv() {
                    Ok(c) => {
                        events += c.events();
                        group.push(c);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group);
            self.retain();
        }
        if self.unsynced_since.is_some() {
            self.sync();
        }
        tracing::debug!("log writer stopped");
    }

    /// Makes every earlier buffered commit durable with an empty durable commit.
    fn sync(&mut self) {
        let synced = self
            .db
            .begin_write()
            .map_err(storage)
            .and_then(|t| t.commit().map_err(storage));
        match synced {
            Ok(()) => self.unsynced_since = None,
            Err(e) => tracing::error!(error = %e, "log sync failed"),
        }
    }

    fn commit(&mut self, group: Vec<Command>) {
        let fsync = group.iter().any(Command::needs_fsync);
        let before = self.state;
        let result = self.write(&group, fsync);
        let outcomes = match result {
            Ok(outcomes) => {
                if fsync {
                    self.unsynced_since = None;
                } else if self.unsynced_since.is_none() {
                    self.unsynced_since = Some(Instant::now());
                }
                outcomes
            }
            Err(e) => {
                self.state = before;
                tracing::error!(error = %e, "log commit failed");
                for cmd in group {
                    let msg = e.to_string();
                    match cmd {
                        Command::Append(job) => {
                            if let Some(p) = &job.place {
                                p.fail();
                            }
                            let _ = job
                                .reply
                                .send(Err(AppendError::Log(LogError::Storage(msg))));
                        }
                        Command::PutSubscription { reply, .. } | Command::Flush { reply } => {
                            let _ = reply.send(Err(LogError::Storage(msg)));
                        }
                        Command::DeleteSubscription { reply, .. }
                        | Command::Ack { reply, .. }
                        | Command::Inflight { reply, .. } => {
                            let _ = reply.send(Err(LogError::Storage(msg)));
                        }
                    }
                }
                return;
            }
        };
        // Durable now: publish in watermark order, then answer.
        for (cmd, outcome) in group.into_iter().zip(outcomes) {
            match (cmd, outcome) {
                (Command::Append(job), Outcome::Appended(appended)) => {
                    if !appended.replayed {
                        let mut batch = job.batch;
                        for (n, w) in batch.iter_mut().zip(appended.watermarks()) {
                            n.watermark = Some(w);
                        }
                        if let Err(e) = self.hub.notify(Batch::from(batch)) {
                            tracing::warn!(error = %e, "publishing a durable batch failed");
                        }
                    }
                    let _ = job.reply.send(Ok(appended));
                }
                (Command::Append(job), Outcome::Conflict(key)) => {
                    let _ = job
                        .reply
                        .send(Err(AppendError::IdempotencyConflict { key }));
                }
                (Command::Append(job), Outcome::Aborted) => {
                    let _ = job.reply.send(Err(AppendError::Aborted));
                }
                (Command::PutSubscription { reply, .. } | Command::Flush { reply }, _) => {
                    let _ = reply.send(Ok(()));
                }
                (
                    Command::DeleteSubscription { reply, .. }
                    | Command::Ack { reply, .. }
                    | Command::Inflight { reply, .. },
                    Outcome::Found(found),
                ) => {
                    let _ = reply.send(Ok(found));
                }
                (Command::Append(job), _) => {
                    let _ = job
                        .reply
                        .send(Err(AppendError::Log(storage("internal: no outcome"))));
                }
                (
                    Command::DeleteSubscription { reply, .. }
                    | Command::Ack { reply, .. }
                    | Command::Inflight { reply, .. },
                    _,
                ) => {
                    let _ = reply.send(Err(storage("internal: no outcome")));
                }
            }
        }
    }

    /// Writes the group in one transaction and commits it.
    fn write(&mut self, group: &[Command], fsync: bool) -> Result<Vec<Outcome>, LogError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        if !fsync {
            txn.set_durability(redb::Durability::None)
                .map_err(storage)?;
        }
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut events = txn.open_table(EVENTS).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(storage)?;
            let mut idem_by_time = txn.open_table(IDEMPOTENCY_BY_TIME).map_err(storage)?;
            let mut subs = txn.open_table(SUBSCRIPTIONS).map_err(storage)?;
            let mut acks = txn.open_table(ACKS).map_err(storage)?;
            let mut inflight = txn.open_table(INFLIGHT).map_err(storage)?;
            let now = Timestamp::now().0;
            // The group's events go into runs (one insert for many events); batches appended
            // one after the other have consecutive watermarks, so a run may span them.
            let mut run = record::RunWriter::default();
            let mut run_first = 0;
            for cmd in group {
                let outcome = match cmd {
                    Command::Append(job) if job.place.as_ref().is_some_and(Place::is_aborted) => {
                        Outcome::Aborted
                    }
                    Command::Append(job) => {
                        let count = job.records.len() as u32;
                        let seen = match &job.idempotency {
                            Some((key, _)) => idem
                                .get(key.as_str())
                                .map_err(storage)?
                                .map(|v| IdempotencyEntry::decode(v.value())),
                            None => None,
                        };
                        match (seen, &job.idempotency) {
                            (Some(Some(entry)), Some((key, digest))) => {
                                if entry.is_batch(digest, count) {
                                    Outcome::Appended(Appended {
                                        first: Watermark(entry.first),
                                        count,
                                        replayed: true,
                                    })
                                } else {
                                    if let Some(p) = &job.place {
                                        p.fail();
                                    }
                                    Outcome::Conflict(key.clone())
                                }
                            }
                            (seen, idempotency) => {
                                if let Some(None) = seen {
                                    tracing::warn!("unreadable idempotency entry replaced");
                                }
                                let first = self.state.next;
                                for (i, r) in job.records.iter().enumerate() {
                                    if run.count() == 0 {
                                        run_first = first + i as u64;
                                    }
                                    run.push(r);
                                    self.state.bytes += r.len() as u64;
                                    if run.is_full() {
                                        events
                                            .insert(run_first, run.take().as_slice())
                                            .map_err(storage)?;
                                    }
                                }
                                self.state.next += u64::from(count);
                                if let Some((key, digest)) = idempotency {
                                    let entry = IdempotencyEntry {
                                        first,
                                        count,
                                        crc: digest.crc,
                                        at: now,
                                        sha256: Some(digest.sha256),
                                    };
                                    idem.insert(key.as_str(), entry.encode().as_slice())
                                        .map_err(storage)?;
                                    idem_by_time
                                        .insert((now, key.as_str()), ())
                                        .map_err(storage)?;
                                }
                                Outcome::Appended(Appended {
                                    first: Watermark(first),
                                    count,
                                    replayed: false,
                                })
                            }
                        }
                    }
                    Command::PutSubscription { id, spec, .. } => {
                        subs.insert(id.as_str(), spec.as_slice()).map_err(storage)?;
                        Outcome::Done
                    }
                    Command::DeleteSubscription { id, .. } => {
                        let existed = subs.remove(id.as_str()).map_err(storage)?.is_some();
                        acks.remove(id.as_str()).map_err(storage)?;
                        inflight.remove(id.as_str()).map_err(storage)?;
                        Outcome::Found(existed)
                    }
                    Command::Inflight { id, watermark, .. } => {
                        if subs.get(id.as_str()).map_err(storage)?.is_some() {
                            inflight.insert(id.as_str(), watermark.0).map_err(storage)?;
                            Outcome::Found(true)
                        } else {
                            Outcome::Found(false)
                        }
                    }
                    Command::Ack { id, watermark, .. } => {
                        if subs.get(id.as_str()).map_err(storage)?.is_some() {
                            let old = acks
                                .get(id.as_str())
                                .map_err(storage)?
                                .map_or(0, |v| v.value());
                            if watermark.0 > old {
                                acks.insert(id.as_str(), watermark.0).map_err(storage)?;
                            }
                            Outcome::Found(true)
                        } else {
                            Outcome::Found(false)
                        }
                    }
                    Command::Flush { .. } => Outcome::Done,
                };
                outcomes.push(outcome);
            }
            if run.count() > 0 {
                events
                    .insert(run_first, run.take().as_slice())
                    .map_err(storage)?;
            }
            meta.insert(META_NEXT, self.state.next).map_err(storage)?;
            meta.insert(META_BYTES, self.state.bytes).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(outcomes)
    }

    /// Removes what the retention limits no longer allow, at most once a second unless a
    /// limit is exceeded by more than a tenth.
    fn retain(&mut self) {
        let r = self.options.retention;
        let held = self.state.next - self.state.first;
        let badly_over = r.max_bytes.is_some_and(|m| self.state.bytes > m + m / 10)
            || r.max_events.is_some_and(|m| held > m + m / 10);
        if self.last_retention.elapsed() < RETENTION_EVERY && !badly_over {
            return;
        }
        self.last_retention = Instant::now();
        let before = self.state;
        if let Err(e) = self.trim(&r) {
            self.state = before;
            tracing::error!(error = %e, "log retention failed");
        }
    }

    fn trim(&mut self, r: &Retention) -> Result<(), LogError> {
        let now = Timestamp::now().0;
        let age_cutoff = r
            .max_age
            .map(|a| now.saturating_sub(a.as_micros().min(u128::from(u64::MAX)) as u64));
        let ttl_cutoff = now.saturating_sub(
            self.options
                .idempotency_ttl
                .as_micros()
                .min(u128::from(u64::MAX)) as u64,
        );
        let mut txn = self.db.begin_write().map_err(storage)?;
        // Removals need not be fsynced: if lost in a crash they are simply done again.
        txn.set_durability(redb::Durability::None)
            .map_err(storage)?;
        let mut removed = 0;
        {
            let mut events = txn.open_table(EVENTS).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            if !r.is_unlimited() {
                // Oldest run first: its leading events that must go are removed; if some
                // remain, they are written back as a run at the new first watermark.
                'runs: while removed < RETENTION_PASS {
                    let Some((k, v)) = events.first().map_err(storage)? else {
                        break;
                    };
                    let w = k.value();
                    // How many leading events go, and the rest of the run if any stay.
                    let mut gone = 0u64;
                    let mut rest = record::RunWriter::default();
                    let recs: Vec<_> = record::records(v.value()).collect();
                    if recs.iter().any(Result::is_err) {
                        // A run that cannot be read whole goes whole, when its time comes.
                        tracing::error!(first = w, "log retention met an unreadable run");
                        let held = self.state.next - self.state.first;
                        let due = r.max_bytes.is_some_and(|m| self.state.bytes > m)
                            || r.max_events.is_some_and(|m| held > m)
                            || age_cutoff.is_some();
                        if !due {
                            break;
                        }
                        let stated = u64::from(record::records(v.value()).stated()).max(1);
                        let len = v.value().len() as u64;
                        drop((k, v));
                        events.remove(w).map_err(storage)?;
                        self.state.bytes = self.state.bytes.saturating_sub(len);
                        self.state.first = (w + stated).min(self.state.next);
                        removed += stated as usize;
                        continue;
                    }
                    for rec in recs.into_iter().flatten() {
                        if rest.count() == 0 && removed < RETENTION_PASS {
                            let held = self.state.next - self.state.first;
                            let over_size = r.max_bytes.is_some_and(|m| self.state.bytes > m)
                                || r.max_events.is_some_and(|m| held > m);
                            let too_old = age_cutoff.is_some_and(|cut| {
                                record::appended_at(rec).map_or(true, |t| t.0 < cut)
                            });
                            if over_size || too_old {
                                self.state.bytes =
                                    self.state.bytes.saturating_sub(rec.len() as u64);
                                self.state.first = w + gone + 1;
                                gone += 1;
                                removed += 1;
                                continue;
                            }
                        }
                        rest.push(rec);
                    }
                    drop((k, v));
                    if gone == 0 {
                        break;
                    }
                    events.remove(w).map_err(storage)?;
                    if rest.count() > 0 {
                        events
                            .insert(w + gone, rest.take().as_slice())
                            .map_err(storage)?;
                        break 'runs;
                    }
                }
                if removed > 0 {
                    meta.insert(META_FIRST, self.state.first).map_err(storage)?;
                    meta.insert(META_BYTES, self.state.bytes).map_err(storage)?;
                }
            }
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(storage)?;
            let mut by_time = txn.open_table(IDEMPOTENCY_BY_TIME).map_err(storage)?;
            let expired: Vec<(u64, String)> = by_time
                .range(..(ttl_cutoff, ""))
                .map_err(storage)?
                .take(IDEMPOTENCY_PASS)
                .map(|e| {
                    e.map(|(k, _)| {
                        let (at, key) = k.value();
                        (at, key.to_owned())
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            for (at, key) in &expired {
                by_time.remove((*at, key.as_str())).map_err(storage)?;
                // The key may have been recorded again later; forget only this recording.
                let current = idem
                    .get(key.as_str())
                    .map_err(storage)?
                    .and_then(|v| IdempotencyEntry::decode(v.value()));
                if current.is_some_and(|e| e.at == *at) {
                    idem.remove(key.as_str()).map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
        if removed > 0 {
            self.unsynced_since.get_or_insert_with(Instant::now);
            tracing::debug!(
                removed,
                first = self.state.first,
                "retention trimmed the log"
            );
        }
        Ok(())
    }
}

/// An idempotency key's memory: the batch it appended and when.
struct IdempotencyEntry {
    first: u64,
    count: u32,
    crc: u32,
    at: u64,
    /// `None` in entries written before batches were identified by SHA-256.
    sha256: Option<[u8; 32]>,
}

impl IdempotencyEntry {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(56);
        b.extend_from_slice(&self.first.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&self.crc.to_le_bytes());
        b.extend_from_slice(&self.at.to_le_bytes());
        if let Some(sha) = &self.sha256 {
            b.extend_from_slice(sha);
        }
        b
    }

    fn decode(b: &[u8]) -> Option<IdempotencyEntry> {
        let head: &[u8; 24] = b.get(..24)?.try_into().ok()?;
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
        let sha256 = match b.len() {
            24 => None,
            56 => Some(b[24..].try_into().ok()?),
            _ => return None,
        };
        Some(IdempotencyEntry {
            first: u64_at(0),
            count: u32_at(8),
            crc: u32_at(12),
            at: u64_at(16),
            sha256,
        })
    }

    /// Whether this entry recorded the batch with `digest` and `count` events.
    fn is_batch(&self, digest: &Digest, count: u32) -> bool {
        self.count == count
            && match &self.sha256 {
                Some(sha) => *sha == digest.sha256,
                None => self.crc == digest.crc,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Event, Extended};
    use redb::ReadableTableMetadata;

    fn event(n: u32) -> Notification {
        Notification::new(
            "k",
            Event::Extended(Extended {
                event: n,
                data: bytes::Bytes::from(vec![n as u8; 16]),
            }),
        )
    }

    /// A file written before runs (format 1: one record per entry, keyed by its watermark)
    /// opens, reads as it was, takes new appends after it, and is marked format 2.
    #[test]
    fn a_file_of_single_records_reads_on_and_takes_runs_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        {
            let db = database_builder().create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut events = txn.open_table(EVENTS).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                let mut bytes = 0;
                for w in 1..=5u64 {
                    let r = record::encode(&event(w as u32), Timestamp::now()).unwrap();
                    bytes += r.len() as u64;
                    events.insert(w, r.as_slice()).unwrap();
                }
                meta.insert(META_FORMAT, 1).unwrap();
                meta.insert(META_NEXT, 6).unwrap();
                meta.insert(META_FIRST, 1).unwrap();
                meta.insert(META_BYTES, bytes).unwrap();
            }
            txn.commit().unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap();
        let a = log
            .append_blocking(vec![event(6), event(7), event(8)], AppendOptions::default())
            .unwrap();
        assert_eq!(a.first, Watermark(6));
        for after in 0..8u64 {
            let got: Vec<u64> = log
                .read_blocking(Watermark(after), 100)
                .unwrap()
                .iter()
                .map(|n| n.watermark.unwrap().0)
                .collect();
            assert_eq!(got, (after + 1..=8).collect::<Vec<_>>(), "after {after}");
        }
        log.close().unwrap();
        drop(log);
        let db = database_builder().create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get(META_FORMAT).unwrap().unwrap().value(), 2);
        // The new events are one entry: a run of three at watermark 6.
        let events = txn.open_table(EVENTS).unwrap();
        assert_eq!(events.len().unwrap(), 6);
        let run = events.get(6).unwrap().unwrap();
        assert_eq!(record::records(run.value()).stated(), 3);
    }

    /// A file from a newer version is refused by name, not misread.
    #[test]
    fn a_file_format_from_the_future_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        {
            let db = database_builder().create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(META_FORMAT, 3)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap_err();
        assert!(err.to_string().contains("file format 3"), "{err}");
    }
}
