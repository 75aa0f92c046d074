//! Client connections and their presence: every stream, long-poll or webhook subscription,
//! EWS streaming connection and MAPI session has an id, an owner and a state, online or
//! offline. Each change is a `connection_state` event on `$herald/presence/<owner>/<id>`, so
//! a client can watch one connection (that key) or everyone of an owner (its subtree) through
//! any transport. A connection not heard from within its lease goes offline; a stream whose
//! lease expires is closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use herald_core::{
    ConnectionStateChange, Event, Key, Notification, STATE_OFFLINE, STATE_OFFLINE_MASK,
    STATE_ONLINE, StateChangePhase, Timestamp,
};
use herald_log::{AppendOptions, EmbeddedLog, EventLog};

use crate::server_state::state_name;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// Where presence events go: `$herald/presence/<owner>/<connection id>`.
pub const PRESENCE_PREFIX: &str = "$herald/presence";
/// Keys under this prefix are the server's own; producers may not publish there.
pub const RESERVED_PREFIX: &str = "$herald";

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

/// A connection as `GET /v1/connections` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionView {
    /// Its id (for a subscription, the subscription's id).
    pub id: String,
    /// Who holds it.
    pub owner: String,
    /// `sse`, `ws`, `poll`, `udp`, `webhook`, `ews`, `mapi`.
    pub transport: String,
    /// What it follows (a key, a subtree, or a mailbox).
    pub target: String,
    /// `online` or `offline`.
    pub state: String,
    /// The key its presence events are published on.
    pub presence_key: String,
    /// When it opened, microseconds since the Unix epoch.
    pub opened_at: u64,
    /// When its state last changed, microseconds since the Unix epoch.
    pub state_since: u64,
    /// Milliseconds since the client was last heard from.
    pub idle_ms: u64,
}

struct Entry {
    id: String,
    owner: String,
    transport: String,
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
    kicked: Arc<std::sync::atomic::AtomicBool>,
}

impl Entry {
    fn view(&self) -> ConnectionView {
        ConnectionView {
            id: self.id.clone(),
            owner: self.owner.clone(),
            transport: self.transport.clone(),
            target: self.target.clone(),
            state: state_name(self.state()).into(),
            presence_key: presence_key(&self.owner, &self.id).to_string(),
            opened_at: self.opened_at,
            state_since: self.state_since,
            idle_ms: if self.busy > 0 {
                0
            } else {
                self.seen.elapsed().as_millis() as u64
            },
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
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

enum Command {
    Publish(Notification),
    Flush(oneshot::Sender<()>),
}

struct Inner {
    entries: Mutex<HashMap<String, Entry>>,
    events: mpsc::UnboundedSender<Command>,
    lease: Duration,
    presence: bool,
    /// The server is stopping: everything stays offline.
    closing: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, e: &Entry, old: u32) {
        let new = e.state();
        let n = Notification::new(
            presence_key(&e.owner, &e.id),
            Event::ConnectionState(ConnectionStateChange {
                phase: StateChangePhase::Done,
                client_token: 0,
                changed_mask: STATE_OFFLINE_MASK,
                old_state: old,
                new_state: new,
            }),
        );
        metrics::counter!(crate::metrics::names::PRESENCE_CHANGES, "state" => state_name(new))
            .increment(1);
        if !self.presence {
            return;
        }
        // Unbounded: one entry per connect, disconnect or lease change, which the connection
        // limits bound; presence must not be dropped.
        let _ = self.events.send(Command::Publish(n));
    }

    /// Sets the state; publishes when it changed.
    fn set(&self, id: &str, online: bool) {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(id) else {
            return;
        };
        if online
            && (self.closing.load(std::sync::atomic::Ordering::SeqCst)
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

impl Connections {
    /// A registry publishing presence events to `log` (unless `presence` is off). Must be
    /// called inside a tokio runtime.
    pub fn new(log: EmbeddedLog, lease: Duration, presence: bool) -> Connections {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_presence(log, rx));
        Connections {
            inner: Arc::new(Inner {
                entries: Mutex::new(HashMap::new()),
                events: tx,
                lease,
                presence,
                closing: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Registers a connection, online, and publishes it. `id` defaults to a fresh one.
    pub fn open(
        &self,
        id: Option<String>,
        transport: &str,
        owner: &str,
        target: &str,
        lease: Lease,
    ) -> Conn {
        let id = id.unwrap_or_else(|| format!("{transport}-{}", uuid::Uuid::new_v4().simple()));
        let now = Timestamp::now().0;
        let expired = CancellationToken::new();
        let kicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Once the server is stopping, nothing comes online.
        let online = !self.inner.closing.load(std::sync::atomic::Ordering::SeqCst);
        let entry = Entry {
            id: id.clone(),
            owner: owner.to_owned(),
            transport: transport.to_owned(),
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
    pub fn list(&self, owner: Option<&str>) -> Vec<ConnectionView> {
        let entries = self.inner.entries();
        let mut v: Vec<ConnectionView> = entries
            .values()
            .filter(|e| owner.is_none_or(|o| e.owner == o))
            .map(Entry::view)
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Marks offline every leased connection not heard from within the lease, and tells the
    /// streams among them to close. Returns how many went offline.
    pub fn expire_leases(&self) -> usize {
        let lease = self.inner.lease;
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
    pub fn get(&self, id: &str) -> Option<ConnectionView> {
        self.inner.entries().get(id).map(Entry::view)
    }

    /// Ends a stream or session (an operator's kick): it is told to close, and its end
    /// counts as a kick, whose hooks the caller has run. Returns whether it was open.
    pub fn kick(&self, id: &str) -> bool {
        let entries = self.inner.entries();
        match entries.get(id) {
            Some(e) => {
                e.kicked.store(true, std::sync::atomic::Ordering::SeqCst);
                e.expired.cancel();
                true
            }
            None => false,
        }
    }

    /// Marks every connection offline (the server is stopping: none of them is served any
    /// more). Durable subscriptions come back online when restored.
    pub fn all_offline(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let ids: Vec<String> = self.inner.entries().keys().cloned().collect();
        for id in ids {
            self.inner.set(&id, false);
        }
    }

    /// Resolves once every presence event published so far is in the log.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.events.send(Command::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }
}

/// A registered connection; dropping it publishes it offline (if it was online) and removes
/// it.
pub struct Conn {
    id: String,
    inner: Arc<Inner>,
    expired: CancellationToken,
    generation: u64,
    kicked: Arc<std::sync::atomic::AtomicBool>,
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

    /// Sets the state (a webhook endpoint failing or answering again).
    pub fn set_online(&self, online: bool) {
        self.inner.set(&self.id, online);
    }

    /// Cancelled when the lease expires, the connection is kicked, or the id is registered
    /// again: a stream closes.
    pub fn expired(&self) -> &CancellationToken {
        &self.expired
    }

    /// Why [`Conn::expired`] fired: `kick` or `expiry`.
    pub fn end_reason(&self) -> &'static str {
        if self.was_kicked() { "kick" } else { "expiry" }
    }

    /// Whether an operator kicked it (its cancel hooks have run already).
    pub fn was_kicked(&self) -> bool {
        self.kicked.load(std::sync::atomic::Ordering::SeqCst)
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

/// A stream or session whose connect hooks ran: when it drops, the connection goes offline
/// and the cancel hooks run with [`LiveConnection::end`]'s reason (unless a kick ran them).
pub struct LiveConnection {
    conn: Conn,
    connect: herald_core::hooks::HookRequest,
    state: crate::AppState,
    reason: &'static str,
}

impl LiveConnection {
    /// `conn`, opened by the hooked `connect`; it ends as a `close` unless told otherwise.
    pub fn new(
        conn: Conn,
        connect: herald_core::hooks::HookRequest,
        state: crate::AppState,
    ) -> LiveConnection {
        LiveConnection {
            conn,
            connect,
            state,
            reason: "close",
        }
    }

    /// The registration.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Why it ends (`close`, `expiry`, `kick`, `shutdown`), for the cancel hooks.
    pub fn end(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        if !self.conn.was_kicked() {
            self.state
                .cancelled(self.connect.clone().cancel(self.reason, true));
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

/// Appends presence events in the order they were made.
async fn write_presence(log: EmbeddedLog, mut rx: mpsc::UnboundedReceiver<Command>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Publish(n) => {
                let mut batch = vec![n];
                let mut flushes = Vec::new();
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(Command::Publish(n)) => batch.push(n),
                        Ok(Command::Flush(tx)) => {
                            flushes.push(tx);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = log.append(batch, AppendOptions::default()).await {
                    tracing::error!(error = %e, "presence events could not be written");
                }
                for tx in flushes {
                    let _ = tx.send(());
                }
            }
            Command::Flush(tx) => {
                let _ = tx.send(());
            }
        }
    }
}
