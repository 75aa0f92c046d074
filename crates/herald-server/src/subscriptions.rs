//! Durable subscriptions: created by `POST /v1/subscriptions`, stored through the log's
//! [`SubscriptionStore`], restored on start (without counting as new subscribes), expired when
//! idle. Each poll or udp subscription has a watcher (a feed) that records the newest matching
//! watermark, which long-poll waits on and the UDP nudger follows; a webhook subscription has
//! a worker (see `webhook`), started through [`Durables::set_webhook_worker`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_core::{EventMask, Filter, Scope, Timestamp, Watermark};
use herald_delivery::{
    Connect, Cursor, Delivery, Lease, NudgeTarget, PageRequest, Pusher, Registry, Session,
};
pub use herald_delivery::{owner_name, target_of};
use herald_log::{EventLog, ReadError, SubscriptionStore};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use utoipa::ToSchema;

use crate::Log;

use crate::frames::StateAdvise;
use crate::json::{FieldError, key_param, parse_kinds, parse_number};

/// A subscription's filter as the API spells it: one of `key` (exact), `subtree` or
/// `children`, and the kinds (all when absent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterJson {
    /// Exactly this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// This key and everything below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<String>,
    /// What is directly in this folder: events whose parent (the one the event names, else
    /// its key's parent), or a move's or copy's old parent, is this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<String>,
    /// Comma-separated kinds, e.g. `new_mail,object_created` (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<String>,
    /// Advise on connection state with this client token (`MAPIOFFLINE_ADVISEINFO`'s
    /// `ulClientToken`): each presence change is told as `start`, `change` and `done`, each
    /// carrying the token. Without it (and without `state_mask`) a change is one `done` with
    /// token 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_token: Option<u32>,
    /// That advise's state mask, decimal or `0x` hex: within `0x003f037f` and covering the
    /// online/offline bits `0x3` (default `0x003f037f`). Giving it alone advises with token 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_mask: Option<String>,
}

impl FilterJson {
    /// The engine filter, or the field at fault.
    pub fn to_filter(&self, max_key: usize) -> Result<Filter, FieldError> {
        let given: Vec<(&str, &String)> = [
            ("key", &self.key),
            ("subtree", &self.subtree),
            ("children", &self.children),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.as_ref().map(|v| (f, v)))
        .collect();
        let scope = match given[..] {
            [("key", k)] => Scope::Exact(key_param("key", k, max_key)?),
            [("subtree", k)] => Scope::Subtree(key_param("subtree", k, max_key)?),
            [(_, k)] => Scope::Children(key_param("children", k, max_key)?),
            [] => {
                return Err(FieldError {
                    field: "key".into(),
                    message: "a key, a subtree or children is required".into(),
                });
            }
            [_, (second, _), ..] => {
                return Err(FieldError {
                    field: second.into(),
                    message: "give one of key, subtree and children".into(),
                });
            }
        };
        let mask = match &self.kinds {
            Some(list) => parse_kinds("kinds", list)?,
            None => EventMask::ALL,
        };
        self.state_advise()?;
        Ok(Filter { scope, mask })
    }

    /// The advise on connection state this filter asks for, if any, or the field at fault.
    pub fn state_advise(&self) -> Result<Option<StateAdvise>, FieldError> {
        if self.state_token.is_none() && self.state_mask.is_none() {
            return Ok(None);
        }
        if let Some(m) = &self.state_mask {
            let mask = parse_number(m).ok_or_else(|| FieldError {
                field: "state_mask".into(),
                message: "a number, decimal or 0x hex".into(),
            })?;
            herald_core::offline::check_state_mask(mask).map_err(|e| FieldError {
                field: "state_mask".into(),
                message: e.to_string(),
            })?;
        }
        Ok(Some(StateAdvise {
            token: self.state_token.unwrap_or(0),
        }))
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

/// Whether a webhook subscription is delivered to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookState {
    /// Deliveries go.
    #[default]
    Active,
    /// It failed for too long (or its position expired): enable it to resume.
    Paused,
    /// The endpoint answered 410 Gone: enable it to resume.
    Disabled,
}

impl WebhookState {
    /// `active`, `paused`, `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookState::Active => "active",
            WebhookState::Paused => "paused",
            WebhookState::Disabled => "disabled",
        }
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
    /// Whether Herald delivers to it.
    pub state: WebhookState,
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

/// A new random signing secret, `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    use base64::Engine;
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

impl Transport {
    /// The delivery layer's name for it.
    pub fn kind(self) -> herald_delivery::Transport {
        match self {
            Transport::Poll => herald_delivery::Transport::Poll,
            Transport::Webhook => herald_delivery::Transport::Webhook,
            Transport::Udp => herald_delivery::Transport::Udp,
        }
    }
}

/// One durable subscription, live (in the registry, which adds its id, its stop signal, its
/// idle clock and its presence).
pub struct Durable {
    spec: Mutex<SubscriptionSpec>,
    filter: Filter,
    /// Its advise on connection state, if its filter gives one.
    advise: Option<StateAdvise>,
    /// What the subscriber acknowledged (stored) and what the watcher has seen.
    cursor: Cursor,
    /// The end of the push delivery being attempted (stored), so that after a restart the
    /// same delivery goes again under the same identity.
    inflight: std::sync::atomic::AtomicU64,
    /// A webhook's delivery state and retries.
    pusher: Option<Pusher>,
    /// Woken when a paused webhook is enabled again.
    enable: Notify,
}

/// A registered durable subscription.
pub type DurableRef = Arc<Session<Durable>>;

impl Durable {
    fn spec_lock(&self) -> MutexGuard<'_, SubscriptionSpec> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What it is (a copy).
    pub fn spec(&self) -> SubscriptionSpec {
        self.spec_lock().clone()
    }

    /// Its owner.
    pub fn owner(&self) -> Option<String> {
        self.spec_lock().owner.clone()
    }

    /// The webhook URL, if it is a webhook subscription.
    pub fn webhook_url(&self) -> Option<String> {
        self.spec_lock().webhook.as_ref().map(|w| w.url.clone())
    }

    /// The secrets to sign with now: the current one and those not yet retired.
    pub fn webhook_secrets(&self) -> Vec<String> {
        let now = Timestamp::now().0;
        self.spec_lock()
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

    /// The webhook's state.
    pub fn webhook_state(&self) -> WebhookState {
        self.spec_lock()
            .webhook
            .as_ref()
            .map_or(WebhookState::Active, |w| w.state)
    }

    /// Whether the webhook endpoint passed verification.
    pub fn webhook_verified(&self) -> bool {
        self.spec_lock()
            .webhook
            .as_ref()
            .is_some_and(|w| w.verified)
    }

    /// A webhook's pushes (delivery state, retries).
    pub fn pusher(&self) -> Option<&Pusher> {
        self.pusher.as_ref()
    }

    /// Resolves when the subscription is enabled again.
    pub async fn enabled(&self) {
        self.enable.notified().await;
    }

    /// The filter.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Its advise on connection state, if its filter gives one.
    pub fn advise(&self) -> Option<StateAdvise> {
        self.advise
    }

    /// Its position: acknowledged, seen, pending.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The acknowledged watermark.
    pub fn acked(&self) -> Watermark {
        self.cursor.acked()
    }

    /// The end of a push delivery attempted but not acknowledged, if there is one.
    pub fn inflight(&self) -> Option<Watermark> {
        let w = Watermark(self.inflight.load(std::sync::atomic::Ordering::Acquire));
        (w > self.acked()).then_some(w)
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

/// What delivers webhook subscriptions (the `webhook` module provides it): their retry
/// policy, and the worker run for each.
#[derive(Clone)]
pub struct WebhookWorker {
    /// How deliveries are retried.
    pub policy: herald_delivery::RetryPolicy,
    /// The worker of one subscription.
    pub run: Arc<dyn Fn(Durables, DurableRef) -> WorkerFuture + Send + Sync>,
}

/// A webhook subscription's worker, running until the subscription stops.
pub type WorkerFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// All durable subscriptions of this server; cheap to clone.
#[derive(Clone)]
pub struct Durables {
    inner: Arc<DurablesInner>,
}

struct DurablesInner {
    delivery: Delivery<Log>,
    registry: Registry<Durable>,
    webhook_worker: Mutex<Option<WebhookWorker>>,
    /// In a cluster: what the nodes share (the subscriptions' changes, push leases).
    cluster: Mutex<Option<herald_jetstream::Cluster>>,
    idle_timeout: Duration,
    max_key: usize,
    udp_repeat: Duration,
}

impl Durables {
    /// The subscriptions; set the webhook worker, then call [`Durables::restore`] once.
    pub fn new(
        delivery: Delivery<Log>,
        idle_timeout: Duration,
        max_key: usize,
        udp_repeat: Duration,
    ) -> Self {
        Durables {
            inner: Arc::new(DurablesInner {
                registry: delivery.registry(),
                delivery,
                webhook_worker: Mutex::new(None),
                cluster: Mutex::new(None),
                idle_timeout,
                max_key,
                udp_repeat,
            }),
        }
    }

    /// Sets what delivers webhook subscriptions (before [`Durables::restore`]).
    pub fn set_webhook_worker(&self, worker: WebhookWorker) {
        *self
            .inner
            .webhook_worker
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(worker);
    }

    /// Runs them on a cluster (before [`Durables::restore`]): a subscription made on any
    /// node is served on every node, and a webhook is delivered by the node holding its lease.
    pub fn set_cluster(&self, cluster: herald_jetstream::Cluster) {
        *self.inner.cluster.lock().unwrap_or_else(|e| e.into_inner()) = Some(cluster);
    }

    /// The cluster, when there is one.
    pub fn cluster(&self) -> Option<herald_jetstream::Cluster> {
        self.inner
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn log(&self) -> &Log {
        self.inner.delivery.log()
    }

    /// The delivery layer.
    pub fn delivery(&self) -> &Delivery<Log> {
        &self.inner.delivery
    }

    /// Brings back every stored subscription. This is an automatic restoration, not a new
    /// subscribe: no subscribe hooks run. Records that no longer parse are logged and skipped.
    ///
    /// In a cluster, the changes other nodes make are followed from before the listing on,
    /// for as long as the server runs.
    pub async fn restore(&self) -> Result<usize, herald_log::LogError> {
        let changes = match self.cluster() {
            Some(c) => Some(c.subscriptions().changes().await?),
            None => None,
        };
        // One node alone serves every subscription: its connection is attached now. In a
        // cluster, on the node a client uses (or, for a webhook, the one holding its lease).
        let attach = changes.is_none();
        let mut restored = 0;
        for record in self.log().subscriptions().await? {
            if self.start_record(record, attach).is_some() {
                restored += 1;
            }
        }
        if let Some(changes) = changes {
            let this = self.clone();
            self.inner.delivery.spawn(async move {
                let stop = this.inner.delivery.shutdown().clone();
                tokio::select! {
                    () = crate::cluster::follow_subscriptions(this, changes) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
        Ok(restored)
    }

    /// Starts a stored subscription; `None` (logged) if its record no longer parses.
    fn start_record(
        &self,
        record: herald_log::SubscriptionRecord,
        attach: bool,
    ) -> Option<DurableRef> {
        let spec: SubscriptionSpec = match serde_json::from_slice(&record.spec) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(id = %record.id, error = %e, "stored subscription does not parse; skipped");
                return None;
            }
        };
        match spec.filter.to_filter(self.inner.max_key) {
            Ok(filter) => Some(self.start(
                record.id,
                spec,
                filter,
                record.acked,
                record.inflight,
                attach,
            )),
            Err(e) => {
                tracing::error!(id = %record.id, error = %e, "stored subscription filter is invalid; skipped");
                None
            }
        }
    }

    /// Another node changed subscription `record.id` (or made it): this node follows.
    pub(crate) fn apply_remote(&self, record: herald_log::SubscriptionRecord) {
        let Some(sub) = self.inner.registry.peek(&record.id) else {
            self.start_record(record, false);
            return;
        };
        self.refresh(&sub, &record);
    }

    /// Brings `sub` up to its stored `record`: acknowledgements only move forward; a webhook
    /// enabled elsewhere resumes here.
    pub(crate) fn refresh(&self, sub: &DurableRef, record: &herald_log::SubscriptionRecord) {
        if sub.cursor.advance(record.acked) {
            // Acknowledged on another node: the subscriber is alive.
            sub.mark_used();
        }
        sub.inflight
            .store(record.inflight.0, std::sync::atomic::Ordering::Release);
        let Ok(spec) = serde_json::from_slice::<SubscriptionSpec>(&record.spec) else {
            return;
        };
        let was_held = sub.webhook_state() != WebhookState::Active;
        *sub.spec_lock() = spec;
        if was_held && sub.webhook_state() == WebhookState::Active {
            if let Some(p) = sub.pusher() {
                p.reset();
            }
            sub.enable.notify_one();
        }
    }

    /// Another node deleted subscription `id`: it ends here too, without hooks (they ran
    /// where it was deleted).
    pub(crate) fn forget_remote(&self, id: &str) {
        self.inner.registry.take(id);
    }

    /// Gives `sub` its connection on this node, if it has none yet (in a cluster, the node
    /// a client uses, or the one that took a webhook's lease).
    pub(crate) fn attach_here(&self, sub: &DurableRef) {
        let spec = sub.spec();
        let transport = spec.transport;
        sub.attach_with(|| {
            self.inner.delivery.lifecycle().attach(
                Connect {
                    id: sub.id().to_owned(),
                    owner: owner_name(spec.owner.as_deref()).to_owned(),
                    transport: transport.kind(),
                    target: target_of(&sub.filter),
                },
                match transport {
                    Transport::Poll | Transport::Udp => Lease::Session,
                    Transport::Webhook => Lease::None,
                },
            )
        });
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
    ) -> Result<DurableRef, DurableError> {
        let filter = filter_json.to_filter(self.inner.max_key)?;
        let bounds = self.log().bounds()?;
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
        self.log().put_subscription(&id, bytes).await?;
        self.log().ack(&id, start).await?;
        // Made here, so the client is here; a webhook's connection is its lease holder's.
        let attach = transport != Transport::Webhook || self.cluster().is_none();
        Ok(self.start(id, spec, filter, start, Watermark(0), attach))
    }

    fn start(
        &self,
        id: String,
        spec: SubscriptionSpec,
        filter: Filter,
        acked: Watermark,
        inflight: Watermark,
        attach: bool,
    ) -> DurableRef {
        let transport = spec.transport;
        let udp = spec.udp.as_ref().and_then(|u| u.target().ok());
        let worker = self
            .inner
            .webhook_worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pusher = match (&worker, transport) {
            (Some(w), Transport::Webhook) => Some(self.inner.delivery.pusher("webhook", w.policy)),
            _ => None,
        };
        let advise = spec.filter.state_advise().ok().flatten();
        let durable = Durable {
            spec: Mutex::new(spec),
            filter,
            advise,
            cursor: Cursor::new(acked),
            inflight: std::sync::atomic::AtomicU64::new(inflight.0),
            pusher,
            enable: Notify::new(),
        };
        let sub = self.inner.registry.insert(id, durable, None);
        if attach {
            self.attach_here(&sub);
        }
        match transport {
            Transport::Poll | Transport::Udp => {
                let watcher = sub.clone();
                let feed = self.inner.delivery.feed(sub.filter.clone(), sub.acked());
                self.inner.registry.spawn(&sub, async move {
                    match feed {
                        Ok(feed) => watcher.cursor.watch(feed).await,
                        Err(e) => tracing::warn!(id = %watcher.id(), error = %e, "durable subscription cannot follow the log"),
                    }
                });
                if let Some((addr, context)) = udp {
                    let (_target, rx) = watch::channel(Some(NudgeTarget { addr, context }));
                    let nudger = self.inner.delivery.nudger(
                        sub.cursor.pending_signal(),
                        rx,
                        self.inner.udp_repeat,
                    );
                    // The target never changes: the sender lives as long as the nudger.
                    self.inner.registry.spawn(&sub, async move {
                        let _target = _target;
                        nudger.await;
                    });
                }
            }
            Transport::Webhook => match (worker, self.cluster()) {
                (Some(worker), None) => self
                    .inner
                    .registry
                    .spawn(&sub, (worker.run)(self.clone(), sub.clone())),
                (Some(worker), Some(cluster)) => self.inner.delivery.spawn(
                    crate::cluster::hold_webhook(cluster, self.clone(), sub.clone(), worker),
                ),
                (None, _) => {
                    tracing::error!(id = %sub.id(), "webhook subscription without a webhook worker");
                }
            },
        }
        sub
    }

    /// Stores the subscription's description again after a change.
    async fn persist(&self, sub: &DurableRef) -> Result<(), herald_log::LogError> {
        let bytes = serde_json::to_vec(&sub.spec())
            .map_err(|e| herald_log::LogError::Storage(e.to_string()))?;
        self.log().put_subscription(sub.id(), bytes).await
    }

    /// Records (and stores) that the subscriber has everything up to `w`.
    pub async fn ack(&self, sub: &DurableRef, w: Watermark) -> Result<(), DurableError> {
        if sub.cursor.advance(w) {
            self.log().ack(sub.id(), w).await?;
        }
        Ok(())
    }

    /// Records (and stores) that a push delivery up to `through` is being attempted.
    pub async fn set_inflight(&self, sub: &DurableRef, through: Watermark) {
        sub.inflight
            .store(through.0, std::sync::atomic::Ordering::Release);
        if let Err(e) = self.log().set_inflight(sub.id(), through).await {
            tracing::warn!(id = %sub.id(), error = %e, "could not store a delivery in flight");
        }
    }

    /// Sets a webhook's state and stores it.
    pub async fn set_webhook_state(
        &self,
        sub: &DurableRef,
        state: WebhookState,
        reason: Option<&str>,
    ) {
        if let Some(w) = sub.spec_lock().webhook.as_mut() {
            w.state = state;
            w.reason = reason.map(str::to_owned);
        }
        if let Err(e) = self.persist(sub).await {
            tracing::warn!(id = %sub.id(), error = %e, "could not store a webhook state change");
        }
    }

    /// Marks a webhook endpoint verified and stores it.
    pub async fn set_webhook_verified(&self, sub: &DurableRef) {
        if let Some(w) = sub.spec_lock().webhook.as_mut() {
            w.verified = true;
        }
        if let Err(e) = self.persist(sub).await {
            tracing::warn!(id = %sub.id(), error = %e, "could not store a webhook verification");
        }
    }

    /// Enables a paused or disabled webhook: it resumes from its acknowledged watermark.
    pub async fn enable(&self, id: &str) -> Result<DurableRef, DurableError> {
        let sub = self.get(id).await?;
        self.set_webhook_state(&sub, WebhookState::Active, None)
            .await;
        if let Some(p) = sub.pusher() {
            p.reset();
        }
        sub.enable.notify_one();
        Ok(sub)
    }

    /// Replaces a webhook's signing secret; the old one keeps signing until `grace` passes.
    pub async fn rotate_secret(&self, id: &str, grace: Duration) -> Result<String, DurableError> {
        let sub = self.get(id).await?;
        let new = new_secret();
        {
            let mut spec = sub.spec_lock();
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

    /// The subscription `id`, touched (so it does not expire). In a cluster, one made on
    /// another node a moment ago is read from the store, and its connection is attached here.
    pub async fn get(&self, id: &str) -> Result<DurableRef, DurableError> {
        let sub = match (self.inner.registry.get(id), self.cluster()) {
            (Some(sub), _) => sub,
            (None, None) => return Err(DurableError::NotFound(id.to_owned())),
            (None, Some(cluster)) => {
                let record = cluster
                    .subscriptions()
                    .get(id)
                    .await?
                    .ok_or_else(|| DurableError::NotFound(id.to_owned()))?;
                let sub = self
                    .start_record(record, false)
                    .ok_or_else(|| DurableError::NotFound(id.to_owned()))?;
                sub.touch();
                sub
            }
        };
        if self.cluster().is_some() && sub.spec().transport != Transport::Webhook {
            self.attach_here(&sub);
        }
        Ok(sub)
    }

    /// Every subscription, by id.
    pub fn list(&self) -> Vec<DurableRef> {
        self.inner.registry.list()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.inner.registry.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.inner.registry.is_empty()
    }

    /// Removes a subscription and its stored record (run it inside its cancel hooks).
    pub async fn delete(&self, id: &str) -> Result<(), DurableError> {
        if self.inner.registry.peek(id).is_none() {
            return Err(DurableError::NotFound(id.to_owned()));
        }
        // The stored record first: if that fails, the subscription is still whole and the
        // delete can be retried.
        if !self.log().delete_subscription(id).await? && self.cluster().is_some() {
            // Another node deleted it first.
            self.inner.registry.take(id);
            return Err(DurableError::NotFound(id.to_owned()));
        }
        // In a cluster, the echo of this very delete may have ended it here already.
        self.inner.registry.take(id);
        Ok(())
    }

    /// Waits up to `timeout` for events after the acknowledged watermark.
    pub async fn wait(&self, sub: &DurableRef, timeout: Duration) -> Result<bool, DurableError> {
        let _busy = sub.busy();
        tokio::select! {
            pending = sub.cursor.wait(timeout) => Ok(pending),
            () = self.inner.delivery.shutdown().cancelled() => Ok(sub.cursor.pending()),
            () = sub.stopped() => Err(DurableError::NotFound(sub.id().to_owned())),
        }
    }

    /// Acknowledges `after` (if newer) and returns up to `limit` matching events after it,
    /// with the cursor to fetch the next page from and whether more are waiting.
    pub async fn fetch(
        &self,
        sub: &DurableRef,
        after: Option<Watermark>,
        limit: usize,
    ) -> Result<(Vec<herald_core::Notification>, Watermark, bool), DurableError> {
        let after = after.unwrap_or_else(|| sub.acked());
        self.log()
            .bounds()?
            .check(after)
            .map_err(DurableError::Position)?;
        self.ack(sub, after).await?;
        let page = self
            .inner
            .delivery
            .page(
                PageRequest {
                    after,
                    limit,
                    scan_budget: limit.saturating_mul(16).max(4096),
                    ceiling: Watermark(u64::MAX),
                },
                // Offline, nothing past what the (gated) watcher had seen is handed out.
                sub.cursor.latest(),
                |n| sub.filter.matches(n),
            )
            .await
            .map_err(DurableError::Position)?;
        let more = page.more || page.cursor < sub.cursor.latest();
        Ok((page.events, page.cursor, more))
    }

    /// Removes poll subscriptions idle longer than the idle timeout; returns how many.
    /// (A webhook subscription is never idle: Herald is the one that calls.)
    ///
    /// In a cluster, a node expires only what a client used on it (the others never saw the
    /// client), and an acknowledgement on any node counts as use everywhere.
    pub async fn expire_idle(&self) -> usize {
        let clustered = self.cluster().is_some();
        let idle: Vec<DurableRef> = self
            .list()
            .into_iter()
            .filter(|s| {
                matches!(s.spec().transport, Transport::Poll | Transport::Udp)
                    && s.idle_for() > self.inner.idle_timeout
                    && (!clustered || s.live().is_some())
            })
            .collect();
        let mut n = 0;
        for sub in idle {
            let id = sub.id().to_owned();
            let req = hook_request(&sub).cancel("expiry", true);
            let removed = self
                .inner
                .delivery
                .lifecycle()
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

    /// Stops every watcher and worker (at shutdown). Stored records stay, and they are
    /// restored at the next start without hooks, so they end without them too.
    pub fn stop_all(&self) {
        self.inner.registry.stop_all(|_| true);
    }
}

/// The hook request describing a connect to `sub`.
pub fn hook_request(sub: &DurableRef) -> herald_core::hooks::HookRequest {
    Connect {
        id: sub.id().to_owned(),
        owner: owner_name(sub.owner().as_deref()).to_owned(),
        transport: sub.spec().transport.kind(),
        target: target_of(&sub.filter),
    }
    .request()
}
