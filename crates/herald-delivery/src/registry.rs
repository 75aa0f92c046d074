//! One registry type for every kind of session Herald keeps between requests (durable
//! subscriptions, EWS subscriptions, MAPI sessions): get and touch, expire when idle, end one
//! (with its cancel hooks), stop them all at shutdown, and the tasks working for each,
//! tracked so that shutdown waits for them.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connect::{EndReason, Live};

/// A registered session: the transport's own state `S`, and what every session has.
pub struct Session<S> {
    id: String,
    value: S,
    stop: CancellationToken,
    last_used: Mutex<Instant>,
    live: Mutex<Option<Live>>,
}

impl<S> std::fmt::Debug for Session<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<S> Deref for Session<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.value
    }
}

impl<S> Session<S> {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client used it now: it is not idle, and its lease is renewed.
    pub fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if let Some(live) = self.live().as_ref() {
            live.renew();
        }
    }

    /// The client used it, elsewhere (another node): it is not idle; its lease here is not
    /// renewed.
    pub fn mark_used(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Gives it a connection made by `attach`, unless it has one already.
    pub fn attach_with(&self, attach: impl FnOnce() -> Live) {
        let mut live = self.live();
        if live.is_none() && !self.is_stopped() {
            *live = Some(attach());
        }
    }

    /// How long since it was last touched.
    pub fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Cancelled when it ends (removed, expired, or the server stops).
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Whether it has ended.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when it ends.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Its connection (presence and cancel hooks), while it is registered.
    pub fn live(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds its lease while the client is being served (a long-poll waits).
    pub fn busy(&self) -> Option<crate::presence::BusyGuard> {
        self.live().as_ref().and_then(Live::conn).map(|c| c.busy())
    }

    /// Marks it online or offline (a push endpoint answering or failing).
    pub fn set_online(&self, online: bool) {
        if let Some(c) = self.live().as_ref().and_then(Live::conn) {
            c.set_online(online);
        }
    }

    /// Ends it: stops its tasks; its presence goes offline and its cancel hooks run with
    /// `reason` (unless it was disarmed).
    fn end(&self, reason: EndReason) {
        self.stop.cancel();
        let live = self.live().take();
        if let Some(mut live) = live {
            live.end(reason);
        }
    }
}

/// Sessions by id; cheap to clone.
pub struct Registry<S> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    sessions: Mutex<HashMap<String, Arc<Session<S>>>>,
    /// Ids of sessions that expired, and when (so that a client is told "expired", not
    /// "unknown"); forgotten after [`TOMBSTONE_TTL`], at most [`TOMBSTONE_CAP`] of them.
    expired: Mutex<HashMap<String, Instant>>,
    tasks: TaskTracker,
}

/// How long an expired session's id is remembered.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most expired ids remembered.
const TOMBSTONE_CAP: usize = 10_000;

impl<S> Clone for Registry<S> {
    fn clone(&self) -> Self {
        Registry {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Registry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "sessions",
                &self
                    .inner
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .len(),
            )
            .finish()
    }
}

impl<S: Send + Sync + 'static> Registry<S> {
    /// An empty registry whose sessions' tasks run on `tasks`.
    pub fn new(tasks: TaskTracker) -> Registry<S> {
        Registry {
            inner: Arc::new(Inner {
                sessions: Mutex::new(HashMap::new()),
                expired: Mutex::default(),
                tasks,
            }),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Arc<Session<S>>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `value` as session `id` with its connection; a session of the same id ends
    /// (replaced).
    pub fn insert(&self, id: String, value: S, live: Option<Live>) -> Arc<Session<S>> {
        let session = Arc::new(Session {
            id: id.clone(),
            value,
            stop: CancellationToken::new(),
            last_used: Mutex::new(Instant::now()),
            live: Mutex::new(live),
        });
        let old = self.sessions().insert(id, session.clone());
        if let Some(old) = old {
            old.end(EndReason::Replaced);
        }
        session
    }

    /// Runs `task` for `session` until it ends (or the task does); shutdown waits for it.
    pub fn spawn<F>(&self, session: &Arc<Session<S>>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = session.stop.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// The session `id`, without touching it.
    pub fn peek(&self, id: &str) -> Option<Arc<Session<S>>> {
        self.sessions().get(id).cloned()
    }

    /// The session `id`, touched.
    pub fn get(&self, id: &str) -> Option<Arc<Session<S>>> {
        let s = self.peek(id)?;
        s.touch();
        Some(s)
    }

    /// Ends session `id` for `reason`; returns it if it was registered.
    pub fn remove(&self, id: &str, reason: EndReason) -> Option<Arc<Session<S>>> {
        let s = self.sessions().remove(id)?;
        s.end(reason);
        Some(s)
    }

    /// Ends session `id` whose cancel hooks the caller ran around this removal (a refusable
    /// unsubscribe, an operator's kick); returns it if it was registered.
    pub fn take(&self, id: &str) -> Option<Arc<Session<S>>> {
        let s = self.sessions().remove(id)?;
        if let Some(live) = s.live().as_mut() {
            live.disarm();
        }
        s.end(EndReason::Close);
        Some(s)
    }

    /// Ends session `id` only if it is `session` (not a newer one of the same id).
    pub fn remove_this(&self, session: &Arc<Session<S>>, reason: EndReason) -> bool {
        let mut sessions = self.sessions();
        if sessions
            .get(&session.id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.id);
            drop(sessions);
            session.end(reason);
            true
        } else {
            false
        }
    }

    /// Ends every session `expired` says is over (it gets each session and its idle time);
    /// returns them.
    pub fn expire(
        &self,
        mut expired: impl FnMut(&Session<S>, Duration) -> bool,
    ) -> Vec<Arc<Session<S>>> {
        let gone: Vec<Arc<Session<S>>> = {
            let mut sessions = self.sessions();
            let ids: Vec<String> = sessions
                .values()
                .filter(|s| expired(s, s.idle_for()))
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| sessions.remove(id)).collect()
        };
        for s in &gone {
            s.end(EndReason::Expiry);
        }
        let now = Instant::now();
        let mut expired = self.inner.expired.lock().unwrap_or_else(|e| e.into_inner());
        expired.retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
        if expired.len() + gone.len() > TOMBSTONE_CAP {
            expired.clear();
        }
        expired.extend(gone.iter().map(|s| (s.id.clone(), now)));
        gone
    }

    /// Whether session `id` expired (within the last hour).
    pub fn was_expired(&self, id: &str) -> bool {
        self.inner
            .expired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Every session, sorted by id.
    pub fn list(&self) -> Vec<Arc<Session<S>>> {
        let mut v: Vec<_> = self.sessions().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// How many sessions `pick` chooses.
    pub fn count(&self, mut pick: impl FnMut(&S) -> bool) -> usize {
        self.sessions().values().filter(|s| pick(&s.value)).count()
    }

    /// How many sessions there are.
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sessions().is_empty()
    }

    /// Ends every session at shutdown. Those `keep` chooses end without cancel hooks (they
    /// are restored at the next start, without connect hooks); the others end as
    /// `shutdown`. Their tasks stop.
    pub fn stop_all(&self, mut keep: impl FnMut(&S) -> bool) {
        let all: Vec<Arc<Session<S>>> = self.sessions().drain().map(|(_, s)| s).collect();
        for s in all {
            if keep(&s.value) {
                if let Some(live) = s.live().as_mut() {
                    live.disarm();
                }
            }
            s.end(EndReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sessions_idle_longer_than_their_timeout_expire_and_their_tasks_stop() {
        let tasks = TaskTracker::new();
        let reg: Registry<u32> = Registry::new(tasks.clone());
        let a = reg.insert("a".into(), 1, None);
        let b = reg.insert("b".into(), 2, None);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        reg.spawn(&a, async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        // std Instant does not follow tokio's paused clock: expire by predicate on the value.
        let gone = reg.expire(|s, _| **s == 1);
        assert_eq!(gone.len(), 1);
        assert!(a.is_stopped());
        assert!(!b.is_stopped());
        // The task of `a` ended: its sender dropped.
        assert!(rx.recv().await.is_none());
        assert!(reg.peek("a").is_none());
        assert_eq!(reg.len(), 1);
        reg.stop_all(|_| false);
        assert!(b.is_stopped());
        tasks.close();
        tasks.wait().await;
    }

    #[test]
    fn a_session_registered_again_under_its_id_replaces_the_old_one() {
        let reg: Registry<&str> = Registry::new(TaskTracker::new());
        let old = reg.insert("x".into(), "old", None);
        let new = reg.insert("x".into(), "new", None);
        assert!(old.is_stopped());
        assert!(!new.is_stopped());
        assert!(!reg.remove_this(&old, EndReason::Close));
        assert_eq!(**reg.peek("x").unwrap(), "new");
        assert!(reg.remove_this(&new, EndReason::Close));
        assert!(reg.is_empty());
    }
}
