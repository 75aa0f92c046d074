//! Durable subscriptions and long-poll (MS-OXCMAPIHTTP `NotificationWait` semantics): create,
//! wait until something is pending, fetch pages of events, delete.

use std::time::Duration;

use futures_util::StreamExt;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::Watermark;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, JsonQuery};
use crate::frames::told;
use crate::json::EventJson;
use crate::subscriptions::{
    DurableError, DurableRef, FilterJson, SecretSpec, Transport, UdpSpec, WebhookSpec,
    WebhookState, hook_request, new_secret, owner_name, target_of,
};
use axum::Extension;
use herald_core::Timestamp;
use herald_delivery::{Connect, PushState};
use serde_json::value::RawValue;

/// A new durable subscription.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// Exactly this key.
    #[serde(default)]
    pub key: Option<String>,
    /// This key and everything below it.
    #[serde(default)]
    pub subtree: Option<String>,
    /// What is directly in this folder (events whose parent, or old parent, is this key).
    #[serde(default)]
    pub children: Option<String>,
    /// Comma-separated kinds (default: all).
    #[serde(default)]
    pub kinds: Option<String>,
    /// Advise on connection state with this client token: each presence change is told as
    /// `start`, `change` and `done`, each carrying it.
    #[serde(default)]
    pub state_token: Option<u32>,
    /// That advise's state mask (decimal or `0x` hex, within `0x003f037f`, covering `0x3`).
    #[serde(default)]
    pub state_mask: Option<String>,
    /// `poll` (long-poll `wait` + `events`), `webhook` (Herald POSTs to `url`) or `udp`
    /// (as poll, with datagrams to `udp.address` while events wait).
    #[schema(value_type = String, pattern = "^(poll|webhook|udp)$")]
    pub transport: String,
    /// Start after this watermark (default: with the next event).
    #[serde(default)]
    pub after: Option<u64>,
    /// For `webhook`: where to POST (http or https; private, loopback and link-local
    /// addresses are refused unless the operator allows them).
    #[serde(default)]
    pub url: Option<String>,
    /// For `udp`: where datagrams go and what they carry.
    #[serde(default)]
    pub udp: Option<UdpSpec>,
}

/// A durable subscription as the API shows it.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Its id.
    pub id: String,
    /// Its filter.
    pub filter: FilterJson,
    /// Its transport.
    pub transport: Transport,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at: u64,
    /// The last watermark the subscriber acknowledged.
    pub acked: u64,
    /// The newest matching watermark seen (kept for poll and udp subscriptions; 0 for
    /// webhooks, which follow the log directly).
    pub latest: u64,
    /// The log's last watermark when this view was made: what the lag is measured to.
    pub head: u64,
    /// Whether events are waiting after the acknowledged watermark.
    pub pending: bool,
    /// Lag: the matching events after the acknowledged watermark, counted among the next 256
    /// events of the log (each event beyond those counts too: an upper bound when far behind).
    pub lag: u64,
    /// Lag in time: the age, in seconds, of the oldest matching event after the acknowledged
    /// watermark, looked for among the next 256 events of the log (0 when none waits).
    pub lag_seconds: f64,
    /// The token subject that owns it, if a token created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// For webhooks: the endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For udp subscriptions: the datagram target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSpec>,
    /// For webhooks: `active`, `paused` or `disabled`, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// For webhooks: why it is paused or disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For webhooks: delivery state (last success, last error, attempts, next attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryState>,
    /// For webhooks, only when created or rotated: the signing secret (`whsec_…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Where a webhook subscription's deliveries stand.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryState {
    /// `verifying`, `active`, `retrying`, `paused` (failing too long), `disabled` (410).
    pub status: String,
    /// When the last delivery succeeded, microseconds since the Unix epoch.
    pub last_success_at: Option<u64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Attempts made for the delivery in progress.
    pub attempts: u32,
    /// When the next attempt is due, microseconds since the Unix epoch.
    pub next_attempt_at: Option<u64>,
    /// Since when deliveries have been failing, microseconds since the Unix epoch.
    pub failing_since: Option<u64>,
}

impl From<PushState> for DeliveryState {
    fn from(s: PushState) -> Self {
        DeliveryState {
            status: s.status.as_str().to_owned(),
            last_success_at: s.last_success_at,
            last_error: s.last_error,
            attempts: s.attempts,
            next_attempt_at: s.next_attempt_at,
            failing_since: s.failing_since,
        }
    }
}

/// The answer of `wait`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct WaitResponse {
    /// Whether events are waiting.
    pub pending: bool,
}

/// A page of events.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct EventsPage {
    /// Matching events after `after`, in order (each as the frames of every transport carry
    /// it: serialized once, shared).
    #[schema(value_type = Vec<EventJson>)]
    pub events: Vec<Box<RawValue>>,
    /// Where to continue: pass it as `after` next time (which also acknowledges it).
    pub next_after: u64,
    /// Whether more events are already waiting.
    pub more: bool,
}

/// An event's shared JSON as a raw value of a page (its bytes are JSON the server wrote).
fn raw(json: bytes::Bytes) -> Option<Box<RawValue>> {
    let text = String::from_utf8(json.to_vec()).ok()?;
    RawValue::from_string(text).ok()
}

/// How many events after a subscription's acknowledged watermark are read to count those it
/// waits for and find the age of the oldest.
const LAG_SCAN: usize = 256;

/// Lag reads a listing runs at once.
const LAG_READS: usize = 16;

/// A subscription's lag up to the log's last watermark `last`: the matching events after its
/// acknowledged watermark (counted among the next [`LAG_SCAN`] events; every event beyond them
/// counts, an upper bound; events retention removed before it got them count too), and the
/// age in seconds of the oldest of them still held.
async fn lag(state: &AppState, d: &DurableRef, last: u64) -> (u64, f64) {
    let acked = d.acked().0;
    if last <= acked {
        return (0, 0.0);
    }
    let (from, removed) =
        match herald_log::EventLog::read(state.log(), Watermark(acked), LAG_SCAN).await {
            Ok(events) => return count_waiting(d, &events, acked, last, 0),
            // Retention removed the oldest it waits for: count them, and read what is held.
            Err(herald_log::ReadError::Expired {
                oldest_available, ..
            }) => {
                let from = oldest_available.0.saturating_sub(1).max(acked);
                (from, from - acked)
            }
            // The log cannot be read now: every event after the acknowledged one may be waiting.
            Err(_) => return (last - acked, 0.0),
        };
    match herald_log::EventLog::read(state.log(), Watermark(from), LAG_SCAN).await {
        Ok(events) => count_waiting(d, &events, from, last, removed),
        Err(_) => (last - acked, 0.0),
    }
}

/// The lag in `events`, read after `from`: those `d` matches up to `last`, those after what
/// was read up to `last` (not read: counted), and `removed`; and the age of the oldest match.
fn count_waiting(
    d: &DurableRef,
    events: &[herald_core::Notification],
    from: u64,
    last: u64,
    removed: u64,
) -> (u64, f64) {
    let read_to = events
        .last()
        .and_then(|e| e.watermark)
        .map_or(from, |w| w.0);
    let beyond = last.saturating_sub(read_to);
    let waiting = events
        .iter()
        .filter(|e| e.watermark.is_none_or(|w| w.0 <= last) && d.filter().matches(e));
    let age = waiting.clone().next().map_or(0.0, |e| {
        Timestamp::now().0.saturating_sub(e.timestamp.0) as f64 / 1e6
    });
    (removed + waiting.count() as u64 + beyond, age)
}

async fn view(state: &AppState, d: &DurableRef) -> SubscriptionView {
    let last = state.log_last();
    let pending = d.cursor().pending();
    let (lag, lag_seconds) = lag(state, d, last).await;
    let spec = d.spec();
    let webhook = spec.webhook.as_ref();
    SubscriptionView {
        id: d.id().to_owned(),
        filter: spec.filter.clone(),
        transport: spec.transport,
        created_at: spec.created_at,
        acked: d.acked().0,
        latest: d.cursor().latest().0,
        head: last,
        pending,
        lag,
        lag_seconds,
        owner: spec.owner.clone(),
        url: webhook.map(|w| w.url.clone()),
        udp: spec.udp.clone(),
        state: webhook.map(|w| w.state.as_str().to_owned()),
        reason: webhook.and_then(|w| w.reason.clone()),
        delivery: webhook
            .and(d.pusher())
            .map(|p| DeliveryState::from(p.state())),
        secret: None,
    }
}

/// The subscription `id`, if the principal may act on it.
async fn owned(state: &AppState, principal: &Principal, id: &str) -> Result<DurableRef, ApiError> {
    let d = state.durables().get(id).await?;
    if !principal.may_manage(d.owner().as_deref()) {
        return Err(crate::auth::forbidden(
            "not_owner",
            "this subscription belongs to someone else",
        ));
    }
    Ok(d)
}

impl From<DurableError> for ApiError {
    fn from(e: DurableError) -> Self {
        match e {
            DurableError::NotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "subscription_not_found",
                e.to_string(),
            ),
            DurableError::Field(f) => ApiError::field_in("", f),
            DurableError::Position(p) => ApiError::position(&p),
            DurableError::Log(l) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                l.to_string(),
            ),
        }
    }
}

/// Creates a durable subscription (`poll`, `webhook` with a `url`, or `udp` with `udp`).
#[utoipa::path(
    post, path = "/v1/subscriptions", tag = "subscribe",
    request_body = CreateSubscription,
    responses(
        (status = 201, description = "Created (and stored); a webhook's `secret` is shown only here", body = SubscriptionView),
        (status = 400, description = "Invalid field", body = crate::error::ErrorBody),
        (status = 403, description = "The token may not read this key or kind", body = crate::error::ErrorBody),
        (status = 410, description = "`after` is older than the log holds", body = crate::error::ErrorBody),
        (status = 429, description = "The token holds all the subscriptions it may", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<CreateSubscription>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::field("body", e.body_text()))?;
    let transport = match herald_delivery::Transport::parse(&req.transport) {
        Some(herald_delivery::Transport::Poll) => Transport::Poll,
        Some(herald_delivery::Transport::Webhook) => Transport::Webhook,
        Some(herald_delivery::Transport::Udp) => Transport::Udp,
        _ => {
            let other = &req.transport;
            return Err(ApiError::field(
                "transport",
                format!("unknown transport {other:?}; one of poll, webhook, udp"),
            ));
        }
    };
    let filter = FilterJson {
        key: req.key,
        subtree: req.subtree,
        children: req.children,
        kinds: req.kinds,
        state_token: req.state_token,
        state_mask: req.state_mask,
    };
    let engine_filter = filter
        .to_filter(state.config().limits.max_key_bytes)
        .map_err(|e| ApiError::field_in("", e))?;
    state.auth().check_filter(&principal, &engine_filter)?;
    let max = state.config().subscriptions.max;
    if state.durables().len() >= max {
        return Err(crate::auth::too_many(format!(
            "the server holds subscriptions.max ({max}) durable subscriptions"
        )));
    }
    if let Principal::Token(claims) = &principal {
        if let Some(max) = claims.max_subscriptions {
            let held = state
                .durables()
                .list()
                .iter()
                .filter(|d| d.owner().as_deref() == Some(claims.sub.as_str()))
                .count();
            if held >= max as usize {
                return Err(crate::auth::too_many(format!(
                    "the token already holds its {max} subscriptions"
                )));
            }
        }
    }
    let (webhook, secret) = match (transport, req.url) {
        (Transport::Webhook, Some(url)) => {
            state
                .egress()
                .check_url(&url)
                .map_err(|e| ApiError::field("url", e))?;
            let secret = new_secret();
            let spec = WebhookSpec {
                url,
                secrets: vec![SecretSpec {
                    secret: secret.clone(),
                    retire_at: None,
                }],
                verified: false,
                state: WebhookState::Active,
                reason: None,
            };
            (Some(spec), Some(secret))
        }
        (Transport::Webhook, None) => {
            return Err(ApiError::field("url", "required for webhook subscriptions"));
        }
        (Transport::Poll | Transport::Udp, Some(_)) => {
            return Err(ApiError::field(
                "url",
                "only webhook subscriptions take a url",
            ));
        }
        (Transport::Poll | Transport::Udp, None) => (None, None),
    };
    let udp = match (transport, req.udp) {
        (Transport::Udp, Some(spec)) => {
            let (addr, _) = spec.target().map_err(|e| ApiError::field_in("", e))?;
            state
                .egress()
                .check(addr.ip())
                .map_err(|e| ApiError::field("udp.address", e))?;
            Some(spec)
        }
        (Transport::Udp, None) => {
            return Err(ApiError::field("udp", "required for udp subscriptions"));
        }
        (_, Some(_)) => {
            return Err(ApiError::field("udp", "only udp subscriptions take udp"));
        }
        (_, None) => None,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let owner = principal.owner();
    let hook = Connect {
        id: id.clone(),
        owner: owner_name(owner.as_deref()).to_owned(),
        transport: transport.kind(),
        target: target_of(&engine_filter),
    }
    .request();
    let d = state
        .delivery()
        .lifecycle()
        .run(&hook, || {
            state.durables().create(
                id.clone(),
                filter.clone(),
                transport,
                req.after.map(Watermark),
                owner.clone(),
                webhook.clone(),
                udp.clone(),
            )
        })
        .await
        .map_err(crate::hooks::api_error)?;
    metrics::gauge!(crate::metrics::names::DURABLE_SUBSCRIPTIONS)
        .set(state.durables().len() as f64);
    let mut v = view(&state, &d).await;
    v.secret = secret;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Enables a paused or disabled webhook subscription: it resumes from its acknowledged
/// watermark, so the endpoint receives everything it missed.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/enable", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 200, description = "Enabled", body = SubscriptionView),
        (status = 403, description = "Not yours", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn enable(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    owned(&state, &principal, &id).await?;
    let d = state.durables().enable(&id).await?;
    Ok(Json(view(&state, &d).await))
}

/// Replaces a webhook subscription's signing secret. Deliveries carry signatures with both
/// the new and the old secret until `webhooks.secret_grace` passes.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/rotate-secret", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 200, description = "The new secret is in `secret`", body = SubscriptionView),
        (status = 403, description = "Not yours", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn rotate_secret(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let d = owned(&state, &principal, &id).await?;
    let secret = state
        .durables()
        .rotate_secret(&id, state.config().webhooks.secret_grace)
        .await?;
    let mut v = view(&state, &d).await;
    v.secret = Some(secret);
    Ok(Json(v))
}

/// Which durable subscriptions.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this transport's (`poll`, `webhook`, `udp`).
    transport: Option<Transport>,
    /// Only those whose id, filter key, owner or URL contains this (ignoring case).
    search: Option<String>,
    /// At most this many, sorted by id (default and most: 10,000); `x-total-count` says how
    /// many matched. Each one returned reads the log for its lag; those cut are not read.
    limit: Option<usize>,
}

/// Lists durable subscriptions (a token sees its own).
#[utoipa::path(
    get, path = "/v1/subscriptions", tag = "subscribe", params(ListQuery),
    responses((status = 200, description = "The durable subscriptions the caller may see", body = Vec<SubscriptionView>, headers(("x-total-count" = u64, description = "How many matched before `limit`"))))
)]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonQuery(q): JsonQuery<ListQuery>,
) -> Response {
    let mut matching: Vec<DurableRef> = state
        .durables()
        .list()
        .into_iter()
        .filter(|d| {
            let spec = d.spec();
            let f = &spec.filter;
            principal.may_manage(d.owner().as_deref())
                && q.transport.is_none_or(|t| spec.transport == t)
                && super::matches_search(
                    q.search.as_deref(),
                    &[
                        d.id(),
                        f.key.as_deref().unwrap_or_default(),
                        f.subtree.as_deref().unwrap_or_default(),
                        f.children.as_deref().unwrap_or_default(),
                        spec.owner.as_deref().unwrap_or_default(),
                        spec.webhook.as_ref().map_or("", |w| w.url.as_str()),
                    ],
                )
        })
        .collect();
    matching.sort_by(|a, b| a.id().cmp(b.id()));
    let total = matching.len();
    matching.truncate(super::limit(q.limit));
    // Each view reads the log for its lag: a few at a time, in order.
    let views: Vec<SubscriptionView> = futures_util::stream::iter(matching)
        .map(|d| {
            let state = state.clone();
            async move { view(&state, &d).await }
        })
        .buffered(LAG_READS)
        .collect()
        .await;
    super::listing(views, total)
}

/// Shows one durable subscription.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 200, description = "The subscription", body = SubscriptionView),
        (status = 404, description = "Unknown or expired", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let d = owned(&state, &principal, &id).await?;
    Ok(Json(view(&state, &d).await))
}

/// One webhook delivery attempt.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct DeliveryAttempt {
    /// When it started, microseconds since the Unix epoch.
    pub at: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `delivered`, `failed` or `gone`.
    pub outcome: String,
    /// Why it failed (the HTTP status or the connection error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A webhook subscription's last delivery attempts, newest first (at most 32, kept in memory
/// by the node that delivers it).
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}/deliveries", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 200, description = "The attempts, newest first; empty for other transports", body = Vec<DeliveryAttempt>),
        (status = 403, description = "Not yours", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn deliveries(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeliveryAttempt>>, ApiError> {
    let d = owned(&state, &principal, &id).await?;
    let history = d.pusher().map(|p| p.history()).unwrap_or_default();
    Ok(Json(
        history
            .into_iter()
            .map(|a| DeliveryAttempt {
                at: a.at,
                duration_ms: a.duration_ms,
                outcome: a.outcome.to_owned(),
                error: a.error,
            })
            .collect(),
    ))
}

/// Ends a durable subscription.
#[utoipa::path(
    delete, path = "/v1/subscriptions/{id}", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown or expired", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let sub = owned(&state, &principal, &id).await?;
    let hook = hook_request(&sub).cancel("unsubscribe", false);
    state
        .delivery()
        .lifecycle()
        .run(&hook, || state.durables().delete(&id))
        .await
        .map_err(crate::hooks::api_error)?;
    metrics::gauge!(crate::metrics::names::DURABLE_SUBSCRIPTIONS)
        .set(state.durables().len() as f64);
    Ok(StatusCode::NO_CONTENT)
}

/// How long to wait.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct WaitQuery {
    /// Longest wait: seconds (`30`) or a duration (`30s`, `2m`); default 30 s, capped at
    /// `limits.max_wait`.
    timeout: Option<String>,
}

/// Long-polls: returns as soon as events are pending, or at the timeout.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}/wait", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id"), WaitQuery),
    responses(
        (status = 200, description = "Whether events are pending", body = WaitResponse),
        (status = 404, description = "Unknown or expired", body = crate::error::ErrorBody),
        (status = 410, description = "The subscription fell behind retention", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn wait(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    JsonQuery(q): JsonQuery<WaitQuery>,
) -> Result<Json<WaitResponse>, ApiError> {
    let max = state.config().limits.max_wait;
    let timeout = match q.timeout.as_deref() {
        None => Duration::from_secs(30),
        Some(t) => t
            .parse::<u64>()
            .map(Duration::from_secs)
            .or_else(|_| humantime::parse_duration(t))
            .map_err(|_| ApiError::field("timeout", "seconds, or a duration such as 30s or 2m"))?,
    }
    .min(max);
    let d = owned(&state, &principal, &id).await?;
    if let Some(oldest) = d.cursor().expired() {
        return Err(ApiError::position(&herald_log::ReadError::Expired {
            after: d.acked(),
            oldest_available: oldest,
        }));
    }
    let pending = state.durables().wait(&d, timeout).await?;
    Ok(Json(WaitResponse { pending }))
}

/// Which events to fetch.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct EventsQuery {
    /// Fetch after this watermark, acknowledging it (default: the acknowledged watermark).
    after: Option<u64>,
    /// Most events to return, at least 1 (default 100, capped at `limits.max_page`).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// Fetches events after a watermark, acknowledging that watermark.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}/events", tag = "subscribe",
    params(("id" = String, Path, description = "Subscription id"), EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 400, description = "`after` is ahead of the log", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown or expired", body = crate::error::ErrorBody),
        (status = 410, description = "`after` is older than the log holds", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    JsonQuery(q): JsonQuery<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let d = owned(&state, &principal, &id).await?;
    if q.limit == Some(0) {
        return Err(ApiError::field("limit", "at least 1"));
    }
    let limit = q.limit.unwrap_or(100).min(state.config().limits.max_page);
    let (events, next, more) = state
        .durables()
        .fetch(&d, q.after.map(Watermark), limit)
        .await?;
    crate::metrics::delivered_all("poll", &events);
    let advise = d.advise();
    let mut page = Vec::with_capacity(events.len());
    for n in &events {
        page.extend(
            told(n, advise)
                .as_slice()
                .iter()
                .filter_map(|m| raw(state.frames().json(m))),
        );
    }
    Ok(Json(EventsPage {
        events: page,
        next_after: next.0,
        more,
    }))
}
