//! Durable subscriptions: created by `POST /v1/subscriptions`, stored in the log, restored on
//! start (without counting as new subscribes), expired when idle. Each has a watcher that
//! follows the log from the acknowledged watermark and records the newest matching event, which
//! is what long-poll waits on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_core::{EventMask, Filter, Scope, Timestamp, Watermark};
use herald_log::{EmbeddedLog, EventLog, FollowOptions, Follower, ReadError};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::json::{FieldError, key_param, parse_kinds};

/// A subscription's filter as the API spells it: one of `key` (exact) or `subtree`, and the
/// kinds (all when absent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterJson {
    /// Exactly this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// This key and everything below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<String>,
    /// Comma-separated kinds, e.g. `new_mail,object_created` (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<String>,
}

impl FilterJson {
    /// The engine filter, or the field at fault.
    pub fn to_filter(&self, max_key: usize) -> Result<Filter, FieldError> {
        let scope = match (&self.key, &self.subtree) {
            (Some(k), None) => Scope::Exact(key_param("key", k, max_key)?),
            (None, Some(k)) => Scope::Subtree(key_param("subtree", k, max_key)?),
            (Some(_), Some(_)) => {
                return Err(FieldError {
                    field: "subtree".into(),
                    message: "give key or subtree, not both".into(),
                });
            }
            (None, None) => {
                return Err(FieldError {
                    field: "key".into(),
                    message: "a key or a subtree is required".into(),
                });
            }
        };
        let mask = match &self.kinds {
            Some(list) => parse_kinds("kinds", list)?,
            None => EventMask::ALL,
        };
        Ok(Filter { scope, mask })
    }
}

/// How a durable subscription is delivered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The subscriber long-polls `…/wait` and fetches `…/events`.
    Poll,
    /// Herald POSTs signed batches to a URL.
    Webhook,
    /// As `poll`, and Herald sends a UDP datagram (the subscriber's context) while events
    /// wait unacknowledged: at once, then every `mapi.udp_repeat`.
    Udp,
}

/// Where a `udp` subscription's datagrams go, and what they carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UdpSpec {
    /// `host:port` (an IP address; the egress policy applies).
    pub address: String,
    /// The datagram's payload, base64, at most 16 bytes (as MAPI's push context).
    pub context: String,
}

impl UdpSpec {
    /// The target and the payload, checked: an IP socket address and at most 16 bytes.
    pub fn target(&self) -> Result<(std::net::SocketAddr, Vec<u8>), FieldError> {
        use base64::Engine;
        let addr = self.address.parse().map_err(|_| FieldError {
            field: "udp.address".into(),
            message: "an IP address and port, e.g. 192.0.2.7:4000".into(),
        })?;
        let context = base64::engine::general_purpose::STANDARD
            .decode(&self.context)
            .map_err(|_| FieldError {
                field: "udp.context".into(),
                message: "base64".into(),
            })?;
        if context.len() > 16 {
            return Err(FieldError {
                field: "udp.context".into(),
                message: format!("at most 16 bytes, not {}", context.len()),
            });
        }
        Ok((addr, context))
    }
}

/// A signing secret and, once rotated out, when it stops being used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecretSpec {
    /// `whsec_…`.
    pub secret: String,
    /// Microseconds since the Unix epoch after which it is no longer used (rotated out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<u64>,
}

/// A webhook subscription's endpoint and state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookSpec {
    /// Where batches are POSTed.
    pub url: String,
    /// Current secret first; rotated-out ones until they retire.
    pub secrets: Vec<SecretSpec>,
    /// The endpoint echoed the verification challenge.
    pub verified: bool,
    /// `active`, `paused` (failed for too long) or `disabled` (410 Gone).
    pub state: String,
    /// Why it is paused or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What is stored for a durable subscription (its record in the log's registry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionSpec {
    /// The filter.
    pub filter: FilterJson,
    /// The transport.
    pub transport: Transport,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at: u64,
    /// The token subject that created it (`None`: an API key, or auth off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The endpoint, for webhook subscriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// The datagram target, for udp subscriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSpec>,
}

/// One durable subscription, live.
pub struct Durable {
    /// Its id.
    pub id: String,
    spec: Mutex<SubscriptionSpec>,
    filter: Filter,
    delivery: Mutex<crate::webhook::DeliveryState>,
    enable: Notify,
    acked: AtomicU64,
    /// The newest matching watermark seen by the watcher.
    latest: AtomicU64,
    /// Set when the watcher's position expired (it fell behind retention).
    expired_at: AtomicU64,
    changed: Notify,
    touched: Mutex<Instant>,
    stop: CancellationToken,
    /// Its presence; taken (published offline) when the subscription is deleted.
    conn: Mutex<Option<crate::connections::Conn>>,
}

impl Durable {
    /// What it is (a copy).
    pub fn spec(&self) -> SubscriptionSpec {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its owner.
    pub fn owner(&self) -> Option<String> {
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owner
            .clone()
    }

    /// The webhook URL, if it is a webhook subscription.
    pub fn webhook_url(&self) -> Option<String> {
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .webhook
            .as_ref()
            .map(|w| w.url.clone())
    }

    /// The secrets to sign with now: the current one and those not yet retired.
    pub fn webhook_secrets(&self) -> Vec<String> {
        let now = Timestamp::now().0;
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .webhook
            .as_ref()
            .map(|w| {
                w.secrets
                    .iter()
                    .filter(|s| s.retire_at.is_none_or(|t| t > now))
                    .map(|s| s.secret.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The webhook's state (`active`, `paused`, `disabled`).
    pub fn webhook_state(&self) -> String {
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .webhook
            .as_ref()
            .map_or_else(|| "active".to_owned(), |w| w.state.clone())
    }

    /// Whether the webhook endpoint passed verification.
    pub fn webhook_verified(&self) -> bool {
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .webhook
            .as_ref()
            .is_some_and(|w| w.verified)
    }

    /// Delivery state (webhooks).
    pub fn delivery(&self) -> crate::webhook::DeliveryState {
        self.delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Updates the delivery state.
    pub fn set_delivery(&self, f: impl FnOnce(&mut crate::webhook::DeliveryState)) {
        f(&mut self.delivery.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Resolves when the subscription is deleted (or the server stops).
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Whether the subscription was deleted.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when the subscription is enabled again.
    pub async fn enabled(&self) {
        self.enable.notified().await;
    }

    /// The filter.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The acknowledged watermark.
    pub fn acked(&self) -> Watermark {
        Watermark(self.acked.load(Ordering::Acquire))
    }

    /// Whether events are pending after the acknowledged watermark.
    pub fn pending(&self) -> bool {
        self.latest.load(Ordering::Acquire) > self.acked.load(Ordering::Acquire)
    }

    /// The newest matching watermark the watcher has seen.
    pub fn latest(&self) -> Watermark {
        Watermark(self.latest.load(Ordering::Acquire))
    }

    fn touch(&self) {
        *self.touched.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if let Some(c) = self.conn().as_ref() {
            c.renew();
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<crate::connections::Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the subscriber online or offline (a webhook endpoint answering or failing).
    pub fn set_online(&self, online: bool) {
        if let Some(c) = self.conn().as_ref() {
            c.set_online(online);
        }
    }

    /// Keeps the subscriber's lease while a long-poll waits.
    fn busy(&self) -> Option<crate::connections::BusyGuard> {
        self.conn().as_ref().map(|c| c.busy())
    }

    fn idle_for(&self) -> Duration {
        self.touched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Why a durable-subscription call failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// No such subscription (never made, deleted, or expired when idle).
    #[error("no subscription {0:?} (it may have expired after being idle)")]
    NotFound(String),
    /// A field of the request.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A position that cannot be used.
    #[error(transparent)]
    Position(ReadError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] herald_log::LogError),
}

/// All durable subscriptions of this server.
#[derive(Clone)]
pub struct Durables {
    inner: Arc<DurablesInner>,
}

struct DurablesInner {
    log: EmbeddedLog,
    connections: crate::connections::Connections,
    server_state: crate::server_state::ServerState,
    hooks: Arc<herald_core::hooks::Hooks>,
    webhooks: Mutex<Option<Arc<crate::webhook::WebhookContext>>>,
    subs: Mutex<HashMap<String, Arc<Durable>>>,
    idle_timeout: Duration,
    max_key: usize,
    queue_capacity: usize,
    udp_repeat: Duration,
}

impl Durables {
    /// The manager; call [`Durables::restore`] once at start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: EmbeddedLog,
        connections: crate::connections::Connections,
        server_state: crate::server_state::ServerState,
        hooks: Arc<herald_core::hooks::Hooks>,
        idle_timeout: Duration,
        max_key: usize,
        queue_capacity: usize,
        udp_repeat: Duration,
    ) -> Self {
        Durables {
            inner: Arc::new(DurablesInner {
                log,
                connections,
                server_state,
                hooks,
                webhooks: Mutex::new(None),
                subs: Mutex::new(HashMap::new()),
                idle_timeout,
                max_key,
                queue_capacity,
                udp_repeat,
            }),
        }
    }

    /// Sets how webhook subscriptions deliver (before [`Durables::restore`]).
    pub fn set_webhooks(&self, ctx: Arc<crate::webhook::WebhookContext>) {
        *self
            .inner
            .webhooks
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(ctx);
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Durable>>> {
        self.inner.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings back every stored subscription. This is an automatic restoration, not a new
    /// subscribe: no subscribe hooks run. Records that no longer parse are logged and skipped.
    pub fn restore(&self) -> Result<usize, herald_log::LogError> {
        let mut restored = 0;
        for record in self.inner.log.subscriptions()? {
            let spec: SubscriptionSpec = match serde_json::from_slice(&record.spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "stored subscription does not parse; skipped");
                    continue;
                }
            };
            match spec.filter.to_filter(self.inner.max_key) {
                Ok(filter) => {
                    self.start(record.id, spec, filter, record.acked);
                    restored += 1;
                }
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "stored subscription filter is invalid; skipped")
                }
            }
        }
        Ok(restored)
    }

    /// Creates subscription `id` starting after `after` (default: now). Durable when it
    /// returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        id: String,
        filter_json: FilterJson,
        transport: Transport,
        after: Option<Watermark>,
        owner: Option<String>,
        webhook: Option<WebhookSpec>,
        udp: Option<UdpSpec>,
    ) -> Result<Arc<Durable>, DurableError> {
        let filter = filter_json.to_filter(self.inner.max_key)?;
        let bounds = self.inner.log.bounds()?;
        let start = match after {
            Some(w) => {
                bounds.check(w).map_err(DurableError::Position)?;
                w
            }
            None => bounds.last,
        };
        let spec = SubscriptionSpec {
            filter: filter_json,
            transport,
            created_at: Timestamp::now().0,
            owner,
            webhook,
            udp,
        };
        let bytes =
            serde_json::to_vec(&spec).map_err(|e| herald_log::LogError::Storage(e.to_string()))?;
        self.inner.log.put_subscription(&id, bytes).await?;
        self.inner.log.ack(&id, start).await?;
        Ok(self.start(id, spec, filter, start))
    }

    fn start(
        &self,
        id: String,
        spec: SubscriptionSpec,
        filter: Filter,
        acked: Watermark,
    ) -> Arc<Durable> {
        let transport = spec.transport;
        let udp = spec.udp.as_ref().and_then(|u| u.target().ok());
        let (transport_name, lease) = match transport {
            Transport::Poll => ("poll", crate::connections::Lease::Session),
            Transport::Udp => ("udp", crate::connections::Lease::Session),
            Transport::Webhook => ("webhook", crate::connections::Lease::None),
        };
        let conn = self.inner.connections.open(
            Some(id.clone()),
            transport_name,
            owner_name(spec.owner.as_deref()),
            &target_of(&filter),
            lease,
        );
        let sub = Arc::new(Durable {
            id: id.clone(),
            spec: Mutex::new(spec),
            filter,
            delivery: Mutex::new(crate::webhook::DeliveryState::default()),
            enable: Notify::new(),
            acked: AtomicU64::new(acked.0),
            latest: AtomicU64::new(acked.0),
            expired_at: AtomicU64::new(0),
            changed: Notify::new(),
            touched: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
            conn: Mutex::new(Some(conn)),
        });
        self.subs().insert(id, sub.clone());
        match transport {
            Transport::Poll | Transport::Udp => {
                tokio::spawn(watch(
                    self.inner.log.clone(),
                    self.inner.server_state.gate(),
                    sub.clone(),
                    self.inner.queue_capacity,
                ));
                if let Some((addr, context)) = udp {
                    tokio::spawn(ping_udp(
                        sub.clone(),
                        addr,
                        context,
                        self.inner.udp_repeat,
                        self.inner.server_state.gate(),
                    ));
                }
            }
            Transport::Webhook => {
                let ctx = self
                    .inner
                    .webhooks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match ctx {
                    Some(ctx) => {
                        tokio::spawn(crate::webhook::run(ctx, self.clone(), sub.clone()));
                    }
                    None => {
                        tracing::error!(id = %sub.id, "webhook subscription without a webhook context");
                    }
                }
            }
        }
        sub
    }

    /// Stores the subscription's description again after a change.
    async fn persist(&self, sub: &Durable) -> Result<(), herald_log::LogError> {
        let bytes = serde_json::to_vec(&sub.spec())
            .map_err(|e| herald_log::LogError::Storage(e.to_string()))?;
        self.inner.log.put_subscription(&sub.id, bytes).await
    }

    /// Records (and stores) that the subscriber has everything up to `w`.
    pub async fn ack(&self, id: &str, w: Watermark) -> Result<(), DurableError> {
        let sub = self.get(id)?;
        if w > sub.acked() {
            sub.acked.fetch_max(w.0, Ordering::AcqRel);
            self.inner.log.ack(id, w).await?;
        }
        Ok(())
    }

    /// Sets a webhook's state (`active`, `paused`, `disabled`) and stores it.
    pub async fn set_webhook_state(&self, id: &str, state: &str, reason: Option<&str>) {
        let Ok(sub) = self.get(id) else { return };
        {
            let mut spec = sub.spec.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = spec.webhook.as_mut() {
                w.state = state.to_owned();
                w.reason = reason.map(str::to_owned);
            }
        }
        if let Err(e) = self.persist(&sub).await {
            tracing::warn!(%id, error = %e, "could not store a webhook state change");
        }
    }

    /// Marks a webhook endpoint verified and stores it.
    pub async fn set_webhook_verified(&self, id: &str) {
        let Ok(sub) = self.get(id) else { return };
        if let Some(w) = sub
            .spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .webhook
            .as_mut()
        {
            w.verified = true;
        }
        if let Err(e) = self.persist(&sub).await {
            tracing::warn!(%id, error = %e, "could not store a webhook verification");
        }
    }

    /// Enables a paused or disabled webhook: it resumes from its acknowledged watermark.
    pub async fn enable(&self, id: &str) -> Result<Arc<Durable>, DurableError> {
        let sub = self.get(id)?;
        self.set_webhook_state(id, "active", None).await;
        sub.set_delivery(|d| {
            d.failing_since = None;
            d.attempts = 0;
            d.status = "active".into();
        });
        sub.enable.notify_one();
        Ok(sub)
    }

    /// Replaces a webhook's signing secret; the old one keeps signing until `grace` passes.
    pub async fn rotate_secret(&self, id: &str, grace: Duration) -> Result<String, DurableError> {
        let sub = self.get(id)?;
        let new = crate::webhook::new_secret();
        {
            let mut spec = sub.spec.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = spec.webhook.as_mut() else {
                return Err(DurableError::Field(FieldError {
                    field: "transport".into(),
                    message: "only webhook subscriptions have a secret".into(),
                }));
            };
            let now = Timestamp::now().0;
            let retire = now + grace.as_micros() as u64;
            for s in &mut w.secrets {
                s.retire_at = Some(s.retire_at.map_or(retire, |r| r.min(retire)));
            }
            w.secrets.retain(|s| s.retire_at.is_none_or(|r| r > now));
            w.secrets.insert(
                0,
                SecretSpec {
                    secret: new.clone(),
                    retire_at: None,
                },
            );
        }
        self.persist(&sub).await?;
        Ok(new)
    }

    /// The subscription `id`, touched (so it does not expire).
    pub fn get(&self, id: &str) -> Result<Arc<Durable>, DurableError> {
        let sub = self
            .subs()
            .get(id)
            .cloned()
            .ok_or_else(|| DurableError::NotFound(id.to_owned()))?;
        sub.touch();
        Ok(sub)
    }

    /// Every subscription, by id.
    pub fn list(&self) -> Vec<Arc<Durable>> {
        let mut v: Vec<_> = self.subs().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Removes a subscription and its stored record.
    pub async fn delete(&self, id: &str) -> Result<(), DurableError> {
        if !self.subs().contains_key(id) {
            return Err(DurableError::NotFound(id.to_owned()));
        }
        // The stored record first: if that fails, the subscription is still whole and the
        // delete can be retried.
        self.inner.log.delete_subscription(id).await?;
        let sub = self
            .subs()
            .remove(id)
            .ok_or_else(|| DurableError::NotFound(id.to_owned()))?;
        sub.stop.cancel();
        sub.conn().take();
        Ok(())
    }

    /// The hooks, to run around creating and deleting subscriptions.
    pub fn hooks(&self) -> &Arc<herald_core::hooks::Hooks> {
        &self.inner.hooks
    }

    /// Waits up to `timeout` for events after the acknowledged watermark.
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<bool, DurableError> {
        let sub = self.get(id)?;
        let _busy = sub.busy();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = sub.changed.notified();
            if sub.pending() {
                return Ok(true);
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return Ok(sub.pending()),
                () = shutdown.cancelled() => return Ok(sub.pending()),
                () = sub.stop.cancelled() => return Err(DurableError::NotFound(id.to_owned())),
            }
        }
    }

    /// Acknowledges `after` (if newer) and returns up to `limit` matching events after it,
    /// with the cursor to fetch the next page from and whether more are waiting.
    pub async fn fetch(
        &self,
        id: &str,
        after: Option<Watermark>,
        limit: usize,
    ) -> Result<(Vec<herald_core::Notification>, Watermark, bool), DurableError> {
        let sub = self.get(id)?;
        let after = after.unwrap_or_else(|| sub.acked());
        let bounds = self.inner.log.bounds()?;
        bounds.check(after).map_err(DurableError::Position)?;
        self.ack(id, after).await?;
        if limit == 0 {
            return Ok((Vec::new(), after, sub.pending()));
        }
        // Offline, nothing past what the (gated) watcher had seen is handed out.
        let ceiling = if self.inner.server_state.delivering() {
            Watermark(u64::MAX)
        } else {
            sub.latest()
        };
        // Scan at most a bounded number of log events per request, so a sparse filter over a
        // long log answers promptly; the cursor lets the client continue.
        let mut cursor = after;
        let mut out = Vec::new();
        let mut scanned = 0;
        let budget = limit.saturating_mul(16).max(4096);
        let mut capped = false;
        while out.len() < limit && scanned < budget && !capped {
            let page = self
                .inner
                .log
                .read(cursor, 512)
                .await
                .map_err(DurableError::Position)?;
            let Some(last) = page.last().and_then(|n| n.watermark) else {
                break;
            };
            for n in page {
                scanned += 1;
                let w = n.watermark.unwrap_or(cursor);
                if w > ceiling {
                    capped = true;
                    break;
                }
                if sub.filter.matches(&n) {
                    out.push(n);
                }
                cursor = w;
                if out.len() == limit {
                    break;
                }
            }
            if cursor >= last && out.len() == limit {
                break;
            }
        }
        let more =
            cursor < sub.latest() || cursor < self.inner.log.bounds()?.last && out.len() == limit;
        Ok((out, cursor, more))
    }

    /// Removes poll subscriptions idle longer than the idle timeout; returns how many.
    /// (A webhook subscription is never idle: Herald is the one that calls.)
    pub async fn expire_idle(&self) -> usize {
        let idle: Vec<String> = self
            .subs()
            .values()
            .filter(|s| {
                matches!(s.spec().transport, Transport::Poll | Transport::Udp)
                    && s.idle_for() > self.inner.idle_timeout
            })
            .map(|s| s.id.clone())
            .collect();
        let mut n = 0;
        for id in idle {
            let Some(sub) = self.subs().get(&id).cloned() else {
                continue;
            };
            let req = hook_request(&sub).cancel("expiry", true);
            let removed = self
                .inner
                .hooks
                .run(&req, || self.delete(&id))
                .await
                .is_ok();
            if removed {
                tracing::info!(%id, "durable subscription expired after being idle");
                n += 1;
            }
        }
        n
    }

    /// Stops every watcher (at shutdown). Stored records stay.
    pub fn stop_all(&self) {
        for s in self.subs().values() {
            s.stop.cancel();
        }
    }

    /// Whether this subscription's watcher has fallen behind retention.
    pub fn expired_position(&self, sub: &Durable) -> Option<Watermark> {
        match sub.expired_at.load(Ordering::Acquire) {
            0 => None,
            w => Some(Watermark(w)),
        }
    }
}

/// Follows the log from the subscription's acknowledged watermark and records the newest
/// matching event, waking long-polls.
async fn watch(log: EmbeddedLog, gate: herald_log::Gate, sub: Arc<Durable>, queue_capacity: usize) {
    let options = FollowOptions {
        queue_capacity,
        ..Default::default()
    };
    let mut follower = match Follower::start(&log, sub.filter.clone(), sub.acked(), options) {
        Ok(f) => f.gated(gate),
        Err(e) => {
            note_expired(&sub, &e);
            return;
        }
    };
    loop {
        tokio::select! {
            () = sub.stop.cancelled() => return,
            next = follower.next() => match next {
                Ok(batch) => {
                    if let Some(w) = batch.last_watermark() {
                        sub.latest.fetch_max(w.0, Ordering::AcqRel);
                        sub.changed.notify_waiters();
                    }
                }
                Err(e) => {
                    note_expired(&sub, &e);
                    return;
                }
            },
        }
    }
}

/// Sends `context` to `addr` while events wait unacknowledged: at once, then every
/// `repeat`; quiet once the subscriber has acknowledged everything.
async fn ping_udp(
    sub: Arc<Durable>,
    addr: std::net::SocketAddr,
    context: Vec<u8>,
    repeat: Duration,
    mut gate: herald_log::Gate,
) {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = match tokio::net::UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(id = %sub.id, error = %e, "no UDP socket for a udp subscription");
            return;
        }
    };
    loop {
        // A `Notified` made before the check sees every later change.
        let changed = sub.changed.notified();
        if !sub.pending() {
            tokio::select! {
                () = changed => continue,
                () = sub.stop.cancelled() => return,
            }
        }
        // Offline, no pings either.
        tokio::select! {
            () = gate.opened() => {}
            () = sub.stop.cancelled() => return,
        }
        if let Err(e) = socket.send_to(&context, addr).await {
            tracing::debug!(id = %sub.id, error = %e, %addr, "UDP ping failed");
        }
        tokio::select! {
            () = tokio::time::sleep(repeat) => {}
            () = sub.stop.cancelled() => return,
        }
    }
}

fn note_expired(sub: &Durable, e: &herald_log::FollowError) {
    if let herald_log::FollowError::Position(ReadError::Expired {
        oldest_available, ..
    }) = e
    {
        sub.expired_at
            .store(oldest_available.0.max(1), Ordering::Release);
        sub.changed.notify_waiters();
    } else {
        tracing::warn!(id = %sub.id, error = %e, "durable subscription watcher stopped");
    }
}

/// The owner as presence and hooks name it (`anonymous` when auth is off or an API key made it).
pub fn owner_name(owner: Option<&str>) -> &str {
    owner.unwrap_or("anonymous")
}

/// What a filter follows, as hooks and `GET /v1/connections` show it: the key, or the
/// subtree with a trailing `/`.
pub fn target_of(filter: &Filter) -> String {
    match &filter.scope {
        Scope::Exact(k) => k.to_string(),
        Scope::Subtree(k) => format!("{k}/"),
    }
}

/// The hook request describing a connect to `sub`.
pub fn hook_request(sub: &Durable) -> herald_core::hooks::HookRequest {
    let spec = sub.spec();
    let transport = match spec.transport {
        Transport::Poll => "poll",
        Transport::Udp => "udp",
        Transport::Webhook => "webhook",
    };
    herald_core::hooks::HookRequest::new(
        herald_core::hooks::Operation::Connect,
        sub.id.clone(),
        owner_name(spec.owner.as_deref()),
        transport,
        target_of(&sub.filter),
    )
}
