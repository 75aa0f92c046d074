//! Client connections and their presence: every stream, long-poll or webhook subscription,
//! EWS streaming connection or push endpoint, and MAPI session has an id, an owner and a
//! state, online or offline. Each change is a `connection_state` event on
//! `$herald/presence/<owner>/<id>`, so a client can watch one connection (that key) or every
//! connection of an owner (its subtree) through any transport. A connection not heard from
//! within its lease goes offline; a stream whose lease expires is closed.
//!
//! Presence is written to the log by one task, from a backlog bounded in connections: the
//! changes of one connection are kept as its first state and a count (states alternate, so
//! the count says every transition exactly), so flapping costs no memory; and while the
//! backlog holds [`PresenceOptions::backlog`] connections, new connects are refused
//! ([`Connections::is_backlogged`]) until the writer catches up. No change is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use herald_core::{
    ConnectionStateChange, Event, Key, Notification, STATE_OFFLINE, STATE_OFFLINE_MASK,
    STATE_ONLINE, StateChangePhase, Timestamp,
};
use herald_log::{AppendOptions, EventLog};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::Transport;
use crate::metrics::names;
use crate::state::state_name;

/// Where presence events go: `$herald/presence/<owner>/<connection id>`.
pub const PRESENCE_PREFIX: &str = "$herald/presence";
pub use herald_core::RESERVED_PREFIX;
/// The most events one presence append carries.
const WRITE_BATCH: usize = 1024;

/// The presence key of `owner`'s connection `id`.
pub fn presence_key(owner: &str, id: &str) -> Key {
    Key::from(format!("{PRESENCE_PREFIX}/{}/{}", segment(owner), segment(id)).as_str())
}

/// The presence subtree of `owner`.
pub fn owner_presence(owner: &str) -> String {
    format!("{PRESENCE_PREFIX}/{}", segment(owner))
}

/// A key segment naming `s`: `/` would split it, so it is escaped, as are empty names.
fn segment(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    s.replace('%', "%25").replace('/', "%2F")
}

/// The node a connection id names (the part after its last `.`), if it names one.
pub fn node_of(id: &str) -> Option<&str> {
    id.rsplit_once('.')
        .map(|(_, node)| node)
        .filter(|n| !n.is_empty())
}

/// A presence event's connection: its key's owner and id segments (as escaped in the key)
/// and whether it is now online; `None` for any other event.
pub fn presence_change(n: &Notification) -> Option<(&str, bool)> {
    let rest = n
        .key
        .as_str()?
        .strip_prefix(PRESENCE_PREFIX)?
        .strip_prefix('/')?;
    let (_, id) = rest.rsplit_once('/')?;
    match &n.event {
        Event::ConnectionState(c) => Some((id, c.new_state == STATE_ONLINE)),
        _ => None,
    }
}

/// The event that says the connection of presence key `key` went offline.
pub fn offline_event(key: Key) -> Notification {
    Notification::new(
        key,
        Event::ConnectionState(ConnectionStateChange {
            phase: StateChangePhase::Done,
            client_token: 0,
            changed_mask: STATE_OFFLINE_MASK,
            old_state: STATE_ONLINE,
            new_state: STATE_OFFLINE,
        }),
    )
}

/// A connection as the operator's API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Its id (for a subscription, the subscription's id).
    pub id: String,
    /// Who holds it.
    pub owner: String,
    /// Its transport.
    pub transport: Transport,
    /// What it follows (a key, a subtree, or a mailbox).
    pub target: String,
    /// Whether it is online.
    pub online: bool,
    /// The key its presence events are published on.
    pub presence_key: Key,
    /// When it opened, microseconds since the Unix epoch.
    pub opened_at: u64,
    /// When its state last changed, microseconds since the Unix epoch.
    pub state_since: u64,
    /// How long since the client was last heard from (zero while it is being served).
    pub idle: Duration,
    /// How it proves it is alive.
    pub lease: Lease,
    /// Time left before its lease expires; `None` when Herald is the one that calls
    /// ([`Lease::None`]) or while it is being served.
    pub lease_left: Option<Duration>,
}

/// How a connection proves it is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// A stream: it must be heard from within the lease, and when the lease expires it is
    /// closed (it cannot come back; the client reconnects).
    Stream,
    /// A session that outlives quiet spells (long-poll subscriptions, MAPI sessions): offline
    /// when the lease expires, online again when the client is heard from.
    Session,
    /// Herald is the one that calls (webhooks, EWS push): its state follows the calls' results.
    None,
}

impl Lease {
    /// Its name in views: `stream`, `session` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Lease::Stream => "stream",
            Lease::Session => "session",
            Lease::None => "none",
        }
    }
}

/// How presence is kept.
#[derive(Clone, Debug)]
pub struct PresenceOptions {
    /// How long a connection may stay unheard before it goes offline.
    pub lease: Duration,
    /// Whether presence events are written at all.
    pub publish: bool,
    /// Most connections with unwritten changes; new connects are refused beyond it.
    pub backlog: usize,
    /// This node's name, in a cluster: the connections it makes end in `.<node>`, so that
    /// a survivor can tell them apart once this node dies ([`node_of`]).
    pub node: Option<String>,
}

impl Default for PresenceOptions {
    fn default() -> Self {
        PresenceOptions {
            lease: Duration::from_secs(45),
            publish: true,
            backlog: 65_536,
            node: None,
        }
    }
}

struct Entry {
    id: String,
    owner: String,
    transport: Transport,
    target: String,
    online: bool,
    opened_at: u64,
    state_since: u64,
    seen: Instant,
    busy: usize,
    lease: Lease,
    expired: CancellationToken,
    generation: u64,
    /// Set when an operator kicked it (its end is then a kick, already hooked).
    kicked: Arc<AtomicBool>,
}

impl Entry {
    fn info(&self, lease: Duration) -> ConnectionInfo {
        let idle = if self.busy > 0 {
            Duration::ZERO
        } else {
            self.seen.elapsed()
        };
        ConnectionInfo {
            id: self.id.clone(),
            owner: self.owner.clone(),
            transport: self.transport,
            target: self.target.clone(),
            online: self.online,
            presence_key: presence_key(&self.owner, &self.id),
            opened_at: self.opened_at,
            state_since: self.state_since,
            idle,
            lease: self.lease,
            lease_left: (self.lease != Lease::None && self.busy == 0)
                .then(|| lease.saturating_sub(idle)),
        }
    }

    fn state(&self) -> u32 {
        if self.online {
            STATE_ONLINE
        } else {
            STATE_OFFLINE
        }
    }
}

/// Tells registrations of the same id apart.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// The unwritten changes of one connection: its state before them and how many there are
/// (each one flips the state).
struct Pending {
    first_old: u32,
    changes: u32,
}

/// Changes waiting for the writer, by presence key, in the order each key first changed.
#[derive(Default)]
struct Backlog {
    pending: HashMap<Key, Pending>,
    order: VecDeque<Key>,
    /// Changes recorded so far (for flush).
    recorded: u64,
}

impl Backlog {
    fn record(&mut self, key: Key, old: u32) {
        self.recorded += 1;
        match self.pending.get_mut(&key) {
            Some(p) => p.changes += 1,
            None => {
                self.order.push_back(key.clone());
                self.pending.insert(
                    key,
                    Pending {
                        first_old: old,
                        changes: 1,
                    },
                );
            }
        }
    }

    /// Up to `max` events, oldest connections first; a connection's changes stay together.
    fn take(&mut self, max: usize) -> Vec<Notification> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            let mut old = p.first_old;
            for _ in 0..p.changes {
                let new = if old == STATE_ONLINE {
                    STATE_OFFLINE
                } else {
                    STATE_ONLINE
                };
                out.push(Notification::new(
                    key.clone(),
                    Event::ConnectionState(ConnectionStateChange {
                        phase: StateChangePhase::Done,
                        client_token: 0,
                        changed_mask: STATE_OFFLINE_MASK,
                        old_state: old,
                        new_state: new,
                    }),
                ));
                old = new;
            }
        }
        out
    }
}

struct Inner {
    entries: Mutex<HashMap<String, Entry>>,
    backlog: Mutex<Backlog>,
    /// Wakes the writer.
    wake: Notify,
    /// How many recorded changes the writer has written (or given up on).
    written: watch::Sender<u64>,
    options: PresenceOptions,
    /// The server is stopping: everything stays offline.
    closing: AtomicBool,
    /// The writer task, awaited by [`Connections::close`].
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change of `e` from `old`. Called with the entries locked, so that the
    /// changes of one id are recorded in the order they happened.
    fn publish(&self, e: &Entry, old: u32) {
        let new = e.state();
        metrics::counter!(names::PRESENCE_CHANGES, "state" => state_name(new)).increment(1);
        if !self.options.publish {
            return;
        }
        self.backlog().record(presence_key(&e.owner, &e.id), old);
        self.wake.notify_one();
    }

    /// Sets the state; publishes when it changed.
    fn set(&self, id: &str, online: bool) {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(id) else {
            return;
        };
        if online
            && (self.closing.load(Ordering::SeqCst)
                || (e.lease == Lease::Stream && e.expired.is_cancelled()))
        {
            // Stopping, or a stream whose lease ran out: it is closing, not coming back.
            return;
        }
        if e.online == online {
            return;
        }
        let old = e.state();
        e.online = online;
        e.state_since = Timestamp::now().0;
        if online {
            e.seen = Instant::now();
        }
        self.publish(e, old);
    }
}

/// The registry of connections; cheap to clone.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.inner.entries().len())
            .finish()
    }
}

impl Connections {
    /// A registry publishing presence to `log` (unless `options.publish` is off); its writer
    /// runs until [`Connections::close`]. Must be called inside a tokio runtime.
    pub fn new<L: EventLog>(log: L, options: PresenceOptions) -> Connections {
        let inner = Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            backlog: Mutex::default(),
            wake: Notify::new(),
            written: watch::Sender::new(0),
            options,
            closing: AtomicBool::new(false),
            writer: Mutex::new(None),
        });
        let writer = tokio::spawn(write_presence(log, inner.clone()));
        *inner.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        Connections { inner }
    }

    /// A fresh connection id, `<prefix>-<uuid>`, ending in `.<node>` in a cluster.
    pub fn fresh_id(&self, prefix: &str) -> String {
        self.node_named(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// `id` as this node names it: `<id>.<node>` in a cluster, `id` alone otherwise.
    pub fn node_named(&self, id: String) -> String {
        match &self.inner.options.node {
            Some(node) => format!("{id}.{node}"),
            None => id,
        }
    }

    /// Whether the presence backlog is full: new connects are refused until it drains.
    pub fn is_backlogged(&self) -> bool {
        self.inner.backlog().pending.len() >= self.inner.options.backlog
    }

    /// How many connections have unwritten presence changes.
    pub fn backlog_len(&self) -> usize {
        self.inner.backlog().pending.len()
    }

    /// Registers a connection, online, and publishes it. `id` defaults to a fresh one.
    pub fn open(
        &self,
        id: Option<String>,
        transport: Transport,
        owner: &str,
        target: &str,
        lease: Lease,
    ) -> Conn {
        let id = id.unwrap_or_else(|| self.fresh_id(transport.as_str()));
        let now = Timestamp::now().0;
        let expired = CancellationToken::new();
        let kicked = Arc::new(AtomicBool::new(false));
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        // Once the server is stopping, nothing comes online.
        let online = !self.inner.closing.load(Ordering::SeqCst);
        let entry = Entry {
            id: id.clone(),
            owner: owner.to_owned(),
            transport,
            target: target.to_owned(),
            online,
            opened_at: now,
            state_since: now,
            seen: Instant::now(),
            busy: 0,
            lease,
            expired: expired.clone(),
            generation,
            kicked: kicked.clone(),
        };
        let mut entries = self.inner.entries();
        // Published under the lock, so that no change of the same id can come between.
        if online {
            self.inner.publish(&entry, STATE_OFFLINE);
        }
        let previous = entries.insert(id.clone(), entry);
        drop(entries);
        if let Some(p) = previous {
            // The same id opened again (a subscription re-created with its id): the old one
            // is gone.
            p.expired.cancel();
        }
        Conn {
            id,
            inner: self.inner.clone(),
            expired,
            generation,
            kicked,
        }
    }

    /// Every connection, or those of `owner`, sorted by id.
    pub fn list(&self, owner: Option<&str>) -> Vec<ConnectionInfo> {
        let entries = self.inner.entries();
        let mut v: Vec<ConnectionInfo> = entries
            .values()
            .filter(|e| owner.is_none_or(|o| e.owner == o))
            .map(|e| e.info(self.inner.options.lease))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Marks offline every leased connection not heard from within the lease, and tells the
    /// streams among them to close. Returns how many went offline.
    pub fn expire_leases(&self) -> usize {
        let lease = self.inner.options.lease;
        let expired: Vec<(String, Option<CancellationToken>)> = self
            .inner
            .entries()
            .values()
            .filter(|e| {
                e.lease != Lease::None && e.busy == 0 && e.online && e.seen.elapsed() > lease
            })
            .map(|e| {
                (
                    e.id.clone(),
                    (e.lease == Lease::Stream).then(|| e.expired.clone()),
                )
            })
            .collect();
        for (id, stream) in &expired {
            tracing::info!(%id, ?lease, "connection lease expired: offline");
            if let Some(token) = stream {
                token.cancel();
            }
            self.inner.set(id, false);
        }
        expired.len()
    }

    /// The connection `id`, if open.
    pub fn get(&self, id: &str) -> Option<ConnectionInfo> {
        let lease = self.inner.options.lease;
        self.inner.entries().get(id).map(|e| e.info(lease))
    }

    /// Ends a stream or session (an operator's kick): it is told to close, and its end
    /// counts as a kick, whose hooks the caller has run. Returns whether it was open.
    pub fn kick(&self, id: &str) -> bool {
        let entries = self.inner.entries();
        match entries.get(id) {
            Some(e) => {
                e.kicked.store(true, Ordering::SeqCst);
                e.expired.cancel();
                true
            }
            None => false,
        }
    }

    /// Resolves once every presence change recorded so far is in the log (or could not be
    /// written, which is logged).
    pub async fn flush(&self) {
        let target = self.inner.backlog().recorded;
        let mut written = self.inner.written.subscribe();
        self.inner.wake.notify_one();
        let _ = written.wait_for(|w| *w >= target).await;
    }

    /// At shutdown: marks every connection offline (none of them is served any more; durable
    /// subscriptions come back online when restored), writes every change, and stops the
    /// writer.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.inner.entries().keys().cloned().collect();
        for id in ids {
            self.inner.set(&id, false);
        }
        self.flush().await;
        // The writer sees `closing` with an empty backlog and ends.
        self.inner.wake.notify_one();
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = writer {
            let _ = w.await;
        }
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.inner.options.lease
    }
}

/// A registered connection; dropping it publishes it offline (if it was online) and removes
/// it.
pub struct Conn {
    id: String,
    inner: Arc<Inner>,
    expired: CancellationToken,
    generation: u64,
    kicked: Arc<AtomicBool>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("id", &self.id).finish()
    }
}

impl Conn {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client was heard from: renews the lease, and brings it back online if its lease
    /// had expired.
    pub fn renew(&self) {
        let back = {
            let mut entries = self.inner.entries();
            match entries.get_mut(&self.id) {
                Some(e) => {
                    e.seen = Instant::now();
                    !e.online
                }
                None => false,
            }
        };
        if back {
            self.inner.set(&self.id, true);
        }
    }

    /// Holds the lease while the client is being served (a long-poll wait): it cannot expire
    /// until the guard drops.
    pub fn busy(&self) -> BusyGuard {
        self.renew();
        if let Some(e) = self.inner.entries().get_mut(&self.id) {
            e.busy += 1;
        }
        BusyGuard {
            id: self.id.clone(),
            inner: self.inner.clone(),
        }
    }

    /// Sets the state (a push endpoint failing or answering again).
    pub fn set_online(&self, online: bool) {
        self.inner.set(&self.id, online);
    }

    /// Cancelled when the lease expires, the connection is kicked, or the id is registered
    /// again: a stream closes.
    pub fn expired(&self) -> &CancellationToken {
        &self.expired
    }

    /// Whether an operator kicked it (its cancel hooks have run already).
    pub fn was_kicked(&self) -> bool {
        self.kicked.load(Ordering::SeqCst)
    }

    /// Whether the connection is online now.
    pub fn is_online(&self) -> bool {
        self.inner.entries().get(&self.id).is_some_and(|e| e.online)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut entries = self.inner.entries();
        // Only our own entry: a newer registration of the same id stays.
        let ours = entries
            .get(&self.id)
            .is_some_and(|e| e.generation == self.generation);
        if !ours {
            return;
        }
        if let Some(mut e) = entries.remove(&self.id) {
            if e.online {
                e.online = false;
                self.inner.publish(&e, STATE_ONLINE);
            }
        }
    }
}

/// Keeps a connection's lease from expiring while it is being served.
pub struct BusyGuard {
    id: String,
    inner: Arc<Inner>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Some(e) = self.inner.entries().get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            e.seen = Instant::now();
        }
    }
}

/// Appends presence changes in the order they were recorded, until closed and drained.
async fn write_presence<L: EventLog>(log: L, inner: Arc<Inner>) {
    loop {
        let (batch, recorded) = {
            let mut backlog = inner.backlog();
            let batch = backlog.take(WRITE_BATCH);
            let recorded = if backlog.pending.is_empty() {
                Some(backlog.recorded)
            } else {
                None
            };
            (batch, recorded)
        };
        if batch.is_empty() {
            if let Some(r) = recorded {
                inner.written.send_replace(r);
            }
            if inner.closing.load(Ordering::SeqCst) && inner.backlog().pending.is_empty() {
                return;
            }
            inner.wake.notified().await;
            continue;
        }
        if let Err(e) = log.append(batch, AppendOptions::default()).await {
            tracing::error!(error = %e, "presence events could not be written");
        }
        if let Some(r) = recorded {
            inner.written.send_replace(r);
        }
    }
}
