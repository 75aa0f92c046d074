//! Herald's event log on a NATS JetStream cluster, so that several Herald nodes share one log:
//! a client publishes to any node, subscribes on any other, and after a node dies resumes
//! anywhere from its last watermark.
//!
//! - One stream; its sequence is the watermark. A batch is one JetStream atomic batch, so its
//!   events are contiguous; the commit's acknowledgement gives the last sequence and the
//!   count, so the first follows.
//! - Each node runs one ordered consumer from its own position into its [`Hub`]
//!   (`tail`); reads never return past what the node's hub has seen, so a follower that
//!   catches up from the log and then goes live has no gap, whichever replica answered.
//! - Idempotency keys and durable subscriptions live in JetStream key-value buckets, changed
//!   with compare-and-set (`idempotency`, `subscriptions`).
//!
//! See `docs/design/cluster.md`.

pub mod cluster;
mod directget;
mod epoch;
mod idempotency;
mod subscriptions;
mod tail;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use herald_core::{Hub, Notification, Watermark};
use herald_log::prepare::prepare;
use herald_log::{
    AppendError, AppendOptions, Appended, EventLog, LogBounds, LogError, Place, ReadError,
    Retention, SubscriptionRecord, SubscriptionStore,
};
use tokio::sync::watch;

pub use cluster::{Cluster, Lease, Liveness, NodeEntry, NodeRecord};
pub use idempotency::IDEMPOTENCY_HEADER;
pub use subscriptions::{Records, SubscriptionChange};

/// JetStream's limit on the messages of one atomic batch (the server's default).
pub const MAX_BATCH: usize = 1000;

/// How to reach the cluster and what the stream is.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// `nats://` URLs of the cluster's servers (any subset; the client learns the others).
    pub servers: Vec<String>,
    /// The stream's name; the key-value buckets are named after it.
    pub stream: String,
    /// Replicas of the stream and the buckets (3 survives the loss of one server).
    pub replicas: usize,
    /// How much history the stream keeps (age, bytes, events), as the embedded log does.
    pub retention: Retention,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// A credentials file (`.creds`) for the connection, if the cluster needs one.
    pub credentials: Option<std::path::PathBuf>,
    /// A CA file to trust for TLS to the servers.
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate and key for mutual TLS.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// How long one request to the cluster may take before it fails (and may be retried).
    pub request_timeout: Duration,
    /// This node's name (in connection names, and for leases).
    pub node: String,
    /// How long [`JetStreamLog::connect`] waits for a cluster that is not ready yet.
    pub start_timeout: Duration,
    /// Where this node remembers the stream it follows and the highest watermark it saw, so
    /// that a recreated stream cannot make watermarks go back (the server's data directory).
    pub state_dir: Option<std::path::PathBuf>,
    /// How long a node holds push work without renewing its lease, and how long a silent
    /// node is given before a survivor speaks for it.
    pub lease: Duration,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            stream: "HERALD".to_owned(),
            replicas: 3,
            retention: Retention::default(),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            credentials: None,
            tls_ca: None,
            tls_client: None,
            request_timeout: Duration::from_secs(10),
            node: "herald".to_owned(),
            start_timeout: Duration::from_secs(60),
            state_dir: None,
            lease: Duration::from_secs(10),
        }
    }
}

impl JetStreamOptions {
    /// The subjects of the stream: `herald.<stream>.ev.<token>`.
    fn subject_prefix(&self) -> String {
        format!("herald.{}.ev", self.stream.to_ascii_lowercase())
    }
}

/// The subject an event is stored under: the prefix, then a bounded token made of the key's
/// first segment (its mailbox or owner) in base64url, at most 43 characters. The whole key is
/// in the record; the token only spreads subjects and bounds their number per owner.
pub fn subject_for(prefix: &str, key: &[u8]) -> String {
    let first = key.split(|b| *b == b'/').next().unwrap_or_default();
    let first = &first[..first.len().min(32)];
    let token = if first.is_empty() {
        "_".to_owned()
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(first)
    };
    format!("{prefix}.{token}")
}

/// Why the log could not start against the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The cluster could not be reached or refused the connection.
    #[error("cannot connect to NATS at {servers:?}: {reason}")]
    Connect {
        /// The servers tried.
        servers: Vec<String>,
        /// Why.
        reason: String,
    },
    /// The stream exists with settings that break Herald's promises.
    #[error("stream {stream} cannot hold Herald's log: {reason}")]
    Unsafe {
        /// The stream.
        stream: String,
        /// The setting at fault, and what it must be.
        reason: String,
    },
    /// The stream was recreated and starts lower than watermarks already handed out.
    #[error(
        "stream {stream} was recreated (created {created}) and its last sequence {last} is below watermark {seen}, which this node already handed out: clients would resume at the wrong events. Remove {file} only if every client may start again from nothing"
    )]
    Reset {
        /// The stream.
        stream: String,
        /// When the stream now there was created.
        created: String,
        /// Its last sequence.
        last: u64,
        /// The highest watermark this node saw.
        seen: u64,
        /// The file that remembers it.
        file: String,
    },
    /// A JetStream request failed.
    #[error("JetStream: {0}")]
    JetStream(String),
    /// The node's record of its stream could not be read or written.
    #[error("{0}")]
    State(String),
}

/// Whether a compare-and-set lost to another writer. The client reports a lost race as
/// `WrongLastRevision`, or (for JetStream's error 10164 on a subject's last sequence) only in
/// its message.
pub(crate) fn lost_race(e: &jetstream::kv::UpdateError) -> bool {
    e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision
        || format!("{e:?}").contains("wrong last sequence")
}

/// Whether a create found the key there (or lost the race to make it).
pub(crate) fn already_exists(e: &jetstream::kv::CreateError) -> bool {
    e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists
        || format!("{e:?}").contains("wrong last sequence")
}

/// A name (subscription id, lease, node) as a bucket key: keys allow `[-/_=.a-zA-Z0-9]`, so
/// names are encoded (URL-safe base64) to fit whatever they hold.
pub(crate) fn bucket_key(name: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

/// The name a [`bucket_key`] encodes.
pub(crate) fn bucket_name(key: &str) -> Option<String> {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key)
        .ok()?;
    String::from_utf8(b).ok()
}

pub(crate) fn js_err(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("JetStream: {e}"))
}

/// Events with their sequences, in order; `None` for a record that does not decode.
pub(crate) type Sequenced = Vec<(u64, Option<Notification>)>;

/// What the node's tail has published to its hub, and what it knows of the stream.
#[derive(Debug)]
pub(crate) struct Position {
    /// The last watermark this node's hub has seen.
    pub(crate) hub: watch::Sender<u64>,
    /// The highest sequence known to be in the stream (acknowledged appends, stream info).
    pub(crate) known_last: AtomicU64,
    /// The oldest sequence the stream still holds, as last seen.
    pub(crate) first: AtomicU64,
    /// The bytes the stream holds, as last seen (refreshed every second).
    pub(crate) bytes: AtomicU64,
    /// Held while events are handed to the hub and `hub` moves (by the tail, and by appends
    /// handing over their own batches); holds, by first sequence, the batches of appends
    /// acknowledged before the batches that precede them reached the hub. Each entry lives
    /// while its append waits (at most the request timeout), so it holds at most the batches
    /// in flight.
    pub(crate) feed: std::sync::Mutex<std::collections::BTreeMap<u64, Sequenced>>,
}

impl Position {
    pub(crate) fn hub_last(&self) -> u64 {
        *self.hub.borrow()
    }

    /// Hands `events` (sequences in order, some perhaps already handed over; `None` for a
    /// record that does not decode, passed over) to `hub`, keeping only those after what it
    /// has, then every waiting append's batch that now follows on; moves the hub's position.
    /// A gap in `events` means retention removed events before this node read them.
    pub(crate) fn feed(&self, hub: &Hub, events: Sequenced) {
        let mut waiting = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = self.hub_last();
        let mut batch = Vec::with_capacity(events.len());
        let mut take = |events: Sequenced, last: &mut u64, gap_ok: bool| {
            for (seq, n) in events {
                if seq <= *last {
                    continue;
                }
                if seq != *last + 1 && gap_ok {
                    tracing::warn!(
                        expected = *last + 1,
                        got = seq,
                        "the node's tail skipped events removed by retention"
                    );
                }
                batch.extend(n);
                *last = seq;
            }
        };
        take(events, &mut last, true);
        // Appends acknowledged out of order wait here for the batches before theirs.
        while let Some(entry) = waiting.first_entry() {
            if *entry.key() > last + 1 {
                break;
            }
            let own = entry.remove();
            take(own, &mut last, false);
        }
        drop(waiting);
        if !batch.is_empty() {
            // A hub shut down has nobody left to tell.
            let _ = hub.notify(herald_core::Batch::from(batch));
        }
        self.saw_last(last);
        // After the hub has it: a read up to here then leaves nothing for the live side.
        self.hub.send_if_modified(|p| {
            let moved = *p < last;
            *p = (*p).max(last);
            moved
        });
    }

    /// An append's own batch `first..` (its records): handed to `hub` now if it follows what
    /// the hub has, or kept until the batches before it arrive (by the tail, or by the appends
    /// they belong to), so that the append need not wait for the tail to bring it back.
    pub(crate) fn feed_own(&self, hub: &Hub, first: u64, records: &[Vec<u8>]) {
        let last = first + records.len() as u64 - 1;
        if self.hub_last() >= last {
            return;
        }
        let mut events = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let seq = first + i as u64;
            match herald_log::record::decode(r, Watermark(seq)) {
                Ok(n) => events.push((seq, Some(n))),
                // Cannot happen for what prepare encoded; the tail then brings it.
                Err(_) => return,
            }
        }
        if self.hub_last() + 1 >= first {
            self.feed(hub, events);
        } else {
            self.feed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(first, events);
            // The hub may have caught up meanwhile: hand over whatever now follows on.
            self.feed(hub, Vec::new());
        }
    }

    /// Drops what an append left waiting (it has returned, whether or not the hub has it).
    pub(crate) fn forget_own(&self, first: u64) {
        let mut waiting = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        waiting.remove(&first);
        // Whatever the hub has passed is not needed either.
        let at = self.hub_last();
        while waiting
            .first_key_value()
            .is_some_and(|(k, v)| *k <= at && v.last().is_none_or(|(seq, _)| *seq <= at))
        {
            waiting.pop_first();
        }
    }

    pub(crate) fn saw_last(&self, seq: u64) {
        self.known_last.fetch_max(seq, Ordering::SeqCst);
    }
}

pub(crate) struct Inner {
    pub(crate) options: JetStreamOptions,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    /// The stream, fetched once (its info is asked for through it).
    pub(crate) stream: jetstream::stream::Stream,
    pub(crate) prefix: String,
    pub(crate) hub: Hub,
    pub(crate) position: Arc<Position>,
    pub(crate) idempotency: jetstream::kv::Store,
    pub(crate) subscriptions: Records,
    pub(crate) cluster: Cluster,
    pub(crate) closed: AtomicBool,
    pub(crate) tail: tail::TailHandle,
}

/// Herald's log on JetStream; cheap to clone.
#[derive(Clone)]
pub struct JetStreamLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("stream", &self.inner.options.stream)
            .field("node", &self.inner.options.node)
            .field("hub_last", &self.inner.position.hub_last())
            .finish_non_exhaustive()
    }
}

impl JetStreamLog {
    /// Connects, creates the stream and buckets if they are missing (or checks them if they
    /// exist), and starts this node's tail into `hub` after the stream's current end: events
    /// appended from now on reach the hub, older ones are read from the log.
    pub async fn connect(
        options: JetStreamOptions,
        hub: Hub,
    ) -> Result<JetStreamLog, ConnectError> {
        let client = connect_client(&options).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(options.request_timeout);
        // A cluster that is starting too elects its leaders first: wait for it, a bounded time.
        let deadline = tokio::time::Instant::now() + options.start_timeout;
        let epoch_file = options
            .state_dir
            .as_ref()
            .map(|d| epoch::path(d, &options.stream));
        let remembered = match &epoch_file {
            Some(f) => epoch::load(f).map_err(|e| ConnectError::State(e.to_string()))?,
            None => None,
        };
        let floor = remembered.as_ref().map_or(0, |e| e.last);
        let info = loop {
            match ensure_stream(&js, &options, floor).await {
                Ok(info) => break info,
                Err(ConnectError::JetStream(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("JetStream is not ready ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let kv = |suffix: &str, ttl: Duration| jetstream::kv::Config {
            bucket: format!("{}_{suffix}", options.stream),
            history: 1,
            max_age: ttl,
            num_replicas: options.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let idempotency = ensure_bucket(&js, kv("IDEM", options.idempotency_ttl), deadline).await?;
        let subscriptions =
            Records::new(ensure_bucket(&js, kv("SUBS", Duration::ZERO), deadline).await?);
        let ews_push = Records::new(ensure_bucket(&js, kv("EWS", Duration::ZERO), deadline).await?);
        let leases = ensure_bucket(&js, kv("LEASES", options.lease), deadline).await?;
        let nodes = ensure_bucket(&js, kv("NODES", Duration::ZERO), deadline).await?;
        let cluster = Cluster::new(
            options.node.clone(),
            options.lease,
            leases,
            nodes,
            subscriptions.clone(),
            ews_push,
        );
        let last = info.state.last_sequence;
        let created = format!("{:?}", info.created);
        if let (Some(file), Some(seen)) = (&epoch_file, &remembered) {
            if seen.created != created && last < seen.last {
                return Err(ConnectError::Reset {
                    stream: options.stream.clone(),
                    created,
                    last,
                    seen: seen.last,
                    file: file.display().to_string(),
                });
            }
        }
        let position = Arc::new(Position {
            hub: watch::Sender::new(last),
            known_last: AtomicU64::new(last),
            first: AtomicU64::new(info.state.first_sequence.max(1)),
            bytes: AtomicU64::new(info.state.bytes),
            feed: std::sync::Mutex::default(),
        });
        let prefix = options.subject_prefix();
        let epoch = epoch_file.map(|file| {
            (
                file,
                epoch::Epoch {
                    created,
                    last: last.max(floor),
                },
            )
        });
        let stream = js
            .get_stream(&options.stream)
            .await
            .map_err(|e| ConnectError::JetStream(e.to_string()))?;
        let tail = tail::start(stream.clone(), hub.clone(), position.clone(), epoch)
            .await
            .map_err(|e| ConnectError::JetStream(e.to_string()))?;
        Ok(JetStreamLog {
            inner: Arc::new(Inner {
                options,
                client,
                js,
                stream,
                prefix,
                hub,
                position,
                idempotency,
                subscriptions,
                cluster,
                closed: AtomicBool::new(false),
                tail,
            }),
        })
    }

    /// The options it runs with.
    pub fn options(&self) -> &JetStreamOptions {
        &self.inner.options
    }

    /// What the nodes on this stream share besides the log: leases, liveness, and the
    /// changes to durable subscriptions.
    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// The last watermark this node's hub has seen.
    pub fn hub_last(&self) -> Watermark {
        Watermark(self.inner.position.hub_last())
    }

    /// Waits until this node's hub has seen `w` (or `timeout` passes); whether it has.
    pub async fn wait_for_hub(&self, w: Watermark, timeout: Duration) -> bool {
        let mut rx = self.inner.position.hub.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p >= w.0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Publishes `records` as one atomic batch; the first and last sequence it got.
    async fn publish_batch(
        &self,
        batch: &[Notification],
        records: Vec<Vec<u8>>,
        idem: Option<&str>,
    ) -> Result<(u64, u64), LogError> {
        let inner = &self.inner;
        let n = records.len();
        let batch_id = idempotency::batch_id();
        let mut commit = None;
        for (i, (record, event)) in records.into_iter().zip(batch).enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if let Some(key) = idem {
                // JetStream refuses a batch whose ids it has seen within its duplicate window:
                // a retry racing an attempt that is still committing cannot append twice.
                headers.insert("Nats-Msg-Id", format!("{key}-{i}").as_str());
                if i == 0 {
                    headers.insert(IDEMPOTENCY_HEADER, key);
                }
            }
            let subject = subject_for(&inner.prefix, event.key.as_bytes());
            if i + 1 == n {
                headers.insert("Nats-Batch-Commit", "1");
                commit = Some((subject, headers, record));
            } else {
                inner
                    .client
                    .publish_with_headers(subject, headers, record.into())
                    .await
                    .map_err(js_err)?;
            }
        }
        let (subject, headers, record) = commit.expect("a batch has at least one event");
        let ack = inner
            .js
            .publish_with_headers(subject, headers, record.into())
            .await
            .map_err(js_err)?
            .await
            .map_err(js_err)?;
        let count = ack.batch_size.unwrap_or(n as u64);
        if count != n as u64 {
            return Err(LogError::Storage(format!(
                "JetStream committed {count} of a batch of {n} events"
            )));
        }
        let last = ack.sequence;
        inner.position.saw_last(last);
        Ok((last + 1 - count, last))
    }
}

async fn connect_client(options: &JetStreamOptions) -> Result<async_nats::Client, ConnectError> {
    let fail = |reason: String| ConnectError::Connect {
        servers: options.servers.clone(),
        reason,
    };
    let mut co = async_nats::ConnectOptions::new()
        .name(format!("herald {}", options.node))
        .retry_on_initial_connect()
        .connection_timeout(options.request_timeout)
        .request_timeout(Some(options.request_timeout));
    if let Some(creds) = &options.credentials {
        co = co
            .credentials_file(creds)
            .await
            .map_err(|e| fail(format!("credentials {}: {e}", creds.display())))?;
    }
    if let Some(ca) = &options.tls_ca {
        co = co.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &options.tls_client {
        co = co.add_client_certificate(cert.clone(), key.clone());
    }
    let servers: Vec<async_nats::ServerAddr> = options
        .servers
        .iter()
        .map(|s| s.parse().map_err(|e| fail(format!("{s}: {e}"))))
        .collect::<Result<_, _>>()?;
    // The initial connect is retried in the background; wait here a bounded time.
    tokio::time::timeout(options.request_timeout * 3, co.connect(servers))
        .await
        .map_err(|_| fail("no server answered".to_owned()))?
        .map_err(|e| fail(e.to_string()))
}

/// The stream's configuration Herald needs: limits retention that discards the oldest, no
/// deletes or purges (a hole would be a lost event), atomic batches, direct gets.
fn stream_config(options: &JetStreamOptions) -> stream::Config {
    let r = &options.retention;
    stream::Config {
        name: options.stream.clone(),
        subjects: vec![format!("{}.>", options.subject_prefix())],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        max_age: r.max_age.unwrap_or_default(),
        max_bytes: r.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
        max_messages: r.max_events.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        duplicate_window: Duration::from_secs(120),
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// Checks what an existing stream must be for Herald's promises; the reason if it is not.
fn check_stream(have: &stream::Config, want: &stream::Config) -> Result<(), String> {
    if have.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "retention is {:?}; Herald needs limits (events are removed by age, bytes or count only)",
            have.retention
        ));
    }
    if have.discard != stream::DiscardPolicy::Old {
        return Err("discard is new; Herald needs old (a full stream must not refuse appends it already acknowledged elsewhere, and retention removes the oldest)".to_owned());
    }
    if !have.deny_delete || !have.deny_purge {
        return Err("deletes or purges are allowed; Herald needs deny_delete and deny_purge (a removed event in the middle is a lost event)".to_owned());
    }
    if !have.allow_atomic_publish {
        return Err("atomic publish is off; Herald needs allow_atomic_publish (a batch is stored whole or not at all)".to_owned());
    }
    if !have.allow_direct {
        return Err("direct get is off; Herald needs allow_direct to read the log".to_owned());
    }
    if have.subjects != want.subjects {
        return Err(format!(
            "its subjects are {:?}; Herald writes to {:?}",
            have.subjects, want.subjects
        ));
    }
    if have.storage != stream::StorageType::File {
        return Err(
            "storage is memory; Herald needs file storage (acknowledged means durable)".to_owned(),
        );
    }
    Ok(())
}

async fn ensure_stream(
    js: &jetstream::Context,
    options: &JetStreamOptions,
    floor: u64,
) -> Result<stream::Info, ConnectError> {
    let mut want = stream_config(options);
    let unsafe_ = |reason: String| ConnectError::Unsafe {
        stream: options.stream.clone(),
        reason,
    };
    match js.get_stream(&options.stream).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| ConnectError::JetStream(e.to_string()))?
                .clone();
            check_stream(&info.config, &want).map_err(unsafe_)?;
            // Limits may change with the configuration; the promises above may not.
            let limits_differ = info.config.max_age != want.max_age
                || info.config.max_bytes != want.max_bytes
                || info.config.max_messages != want.max_messages;
            if limits_differ {
                let mut updated = info.config.clone();
                updated.max_age = want.max_age;
                updated.max_bytes = want.max_bytes;
                updated.max_messages = want.max_messages;
                js.update_stream(&updated)
                    .await
                    .map_err(|e| ConnectError::JetStream(e.to_string()))?;
            }
            Ok(info)
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            if floor > 0 {
                // Watermarks go on after the highest this node handed out.
                want.first_sequence = Some(floor + 1);
                tracing::warn!(
                    stream = %options.stream,
                    first = floor + 1,
                    "the stream is missing: creating it to continue after the last watermark seen"
                );
            }
            let mut s = js
                .create_stream(want)
                .await
                .map_err(|e| ConnectError::JetStream(format!("creating stream: {e}")))?;
            Ok(s.info()
                .await
                .map_err(|e| ConnectError::JetStream(e.to_string()))?
                .clone())
        }
        Err(e) => Err(ConnectError::JetStream(e.to_string())),
    }
}

async fn ensure_bucket(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
    deadline: tokio::time::Instant,
) -> Result<jetstream::kv::Store, ConnectError> {
    loop {
        if let Ok(kv) = js.get_key_value(&config.bucket).await {
            return Ok(kv);
        }
        match js.create_key_value(config.clone()).await {
            Ok(kv) => return Ok(kv),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!("bucket {} not ready ({e}); trying again", config.bucket);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(ConnectError::JetStream(format!(
                    "bucket {}: {e}",
                    config.bucket
                )));
            }
        }
    }
}

impl JetStreamLog {
    /// [`EventLog::append`] without the sequence guard.
    async fn append_now(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<Appended, AppendError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(AppendError::Log(LogError::Closed));
        }
        let prepared = prepare(batch, options.idempotency_key.is_some())?;
        let count = prepared.batch.len();
        if count > MAX_BATCH {
            return Err(AppendError::Log(LogError::Storage(format!(
                "a batch of {count} events is over JetStream's atomic batch limit of {MAX_BATCH}"
            ))));
        }
        let (first, last, replayed) = match (&options.idempotency_key, prepared.digest) {
            (Some(key), Some(digest)) => {
                idempotency::append(self, key, digest, prepared.batch, prepared.records).await?
            }
            _ => {
                let records = prepared.records;
                let (first, last) = self
                    .publish_batch(&prepared.batch, records.clone(), None)
                    .await?;
                // The batch goes to the hub from here, not after the tail brings it back.
                self.inner
                    .position
                    .feed_own(&self.inner.hub, first, &records);
                (first, last, false)
            }
        };
        // Acknowledged once durable in the cluster, and answered once this node's hub has it:
        // whoever appended here and then reads or follows here sees it.
        let timeout = self.inner.options.request_timeout;
        let seen = self.wait_for_hub(Watermark(last), timeout).await;
        self.inner.position.forget_own(first);
        if !seen {
            tracing::warn!(
                last,
                "appended, but this node's hub has not seen it within {timeout:?}"
            );
        }
        Ok(Appended {
            first: Watermark(first),
            count: count as u32,
            replayed,
        })
    }
}

impl EventLog for JetStreamLog {
    async fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> Result<Appended, AppendError> {
        Place::guard(options.place.clone(), self.append_now(batch, options)).await
    }

    async fn read(&self, after: Watermark, limit: usize) -> Result<Vec<Notification>, ReadError> {
        let bounds = self.bounds().map_err(|e| ReadError::Log(e.to_string()))?;
        bounds.check(after)?;
        // Never past what this node's hub has seen: a follower that goes live after this read
        // gets the rest from the hub.
        let through = self.inner.position.hub_last();
        if after.0 >= through || limit == 0 {
            return Ok(Vec::new());
        }
        let want = (through - after.0).min(limit as u64) as usize;
        directget::read(&self.inner, after.0 + 1, want).await
    }

    fn bounds(&self) -> Result<LogBounds, LogError> {
        let p = &self.inner.position;
        let last = p.hub_last().max(p.known_last.load(Ordering::SeqCst));
        Ok(LogBounds {
            first: Watermark(p.first.load(Ordering::SeqCst).min(last + 1).max(1)),
            last: Watermark(last),
        })
    }

    /// The bytes the stream holds (messages with their subjects and headers), as of the last
    /// stream info this node read (at most a second old).
    fn stored_bytes(&self) -> Option<u64> {
        Some(self.inner.position.bytes.load(Ordering::Relaxed))
    }

    fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    async fn shutdown(&self) -> Result<(), LogError> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.tail.stop();
        self.inner.client.flush().await.map_err(js_err)?;
        Ok(())
    }
}

impl SubscriptionStore for JetStreamLog {
    async fn put_subscription(&self, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
        self.check_open()?;
        self.inner.subscriptions.put(id, spec).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, LogError> {
        self.check_open()?;
        self.inner.subscriptions.delete(id).await
    }

    async fn ack(&self, id: &str, watermark: Watermark) -> Result<bool, LogError> {
        self.check_open()?;
        self.inner.subscriptions.ack(id, watermark).await
    }

    async fn set_inflight(&self, id: &str, through: Watermark) -> Result<bool, LogError> {
        self.check_open()?;
        self.inner.subscriptions.set_inflight(id, through).await
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        self.inner.subscriptions.list().await
    }
}

impl JetStreamLog {
    /// [`LogError::Closed`] once [`EventLog::shutdown`] was called.
    fn check_open(&self) -> Result<(), LogError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(LogError::Closed)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_hold_a_bounded_token_of_the_first_segment() {
        assert_eq!(
            subject_for("herald.x.ev", b"alice/inbox/m1"),
            "herald.x.ev.YWxpY2U"
        );
        assert_eq!(subject_for("p", b""), "p._");
        assert_eq!(subject_for("p", b"/x"), "p._");
        let long = subject_for("p", &[b'a'; 500]);
        assert_eq!(long.len(), 2 + 43);
        // Bytes a subject cannot hold are encoded.
        let odd = subject_for("p", b"a.b *>\xff/c");
        assert!(!odd[2..].contains(['.', ' ', '*', '>']), "{odd}");
    }

    #[test]
    fn a_stream_that_breaks_the_promises_is_refused_with_the_reason() {
        let options = JetStreamOptions::default();
        let want = stream_config(&options);
        assert_eq!(check_stream(&want, &want), Ok(()));
        let mut c = want.clone();
        c.deny_delete = false;
        assert!(check_stream(&c, &want).unwrap_err().contains("deny_delete"));
        let mut c = want.clone();
        c.retention = stream::RetentionPolicy::WorkQueue;
        assert!(check_stream(&c, &want).unwrap_err().contains("retention"));
        let mut c = want.clone();
        c.discard = stream::DiscardPolicy::New;
        assert!(check_stream(&c, &want).unwrap_err().contains("discard"));
        let mut c = want.clone();
        c.allow_atomic_publish = false;
        assert!(check_stream(&c, &want).unwrap_err().contains("atomic"));
        let mut c = want.clone();
        c.storage = stream::StorageType::Memory;
        assert!(check_stream(&c, &want).unwrap_err().contains("file"));
    }
}
