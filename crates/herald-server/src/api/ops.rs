//! Operations: health, readiness, metrics, status, the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use herald_log::EventLog;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::AppState;
use crate::metrics::names;

/// A page that watches events live with the browser's EventSource.
#[utoipa::path(get, path = "/", tag = "operate", responses((status = 200, description = "An HTML page to watch events", content_type = "text/html")))]
pub(super) async fn watch_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../assets/watch.html"),
    )
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operate", responses((status = 200, description = "Alive", body = String)))]
pub(super) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the log can be read and the server is not shutting down.
#[utoipa::path(
    get, path = "/readyz", tag = "operate",
    responses((status = 200, description = "Ready", body = String), (status = 503, description = "Not ready", body = String))
)]
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown().is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned());
    }
    match state.log().bounds() {
        Ok(_) => (StatusCode::OK, "ready".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("log unavailable: {e}"),
        ),
    }
}

/// Prometheus metrics.
#[utoipa::path(
    get, path = "/metrics", tag = "operate",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"))
)]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let hub = state.log().hub().stats();
    metrics::counter!(names::QUEUE_OVERFLOWS).absolute(hub.overflows);
    metrics::gauge!(names::DURABLE_SUBSCRIPTIONS).set(state.durables().list().len() as f64);
    metrics::gauge!(names::LOG_LAST_WATERMARK).set(state.log_last() as f64);
    if let Some(bytes) = state.log().stored_bytes() {
        metrics::gauge!(names::LOG_BYTES).set(bytes as f64);
    }
    metrics::gauge!(names::TOKIO_TASKS).set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as f64,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

/// The server's health and figures.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct StatusResponse {
    /// The server's version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The oldest watermark the log holds.
    pub log_first: u64,
    /// The last watermark assigned.
    pub log_last: u64,
    /// Live engine subscriptions (streams, sockets, watchers).
    pub engine_subscriptions: usize,
    /// Durable subscriptions.
    pub durable_subscriptions: usize,
    /// Subscriber queue overflows since start.
    pub queue_overflows: u64,
}

/// Health and figures, for `herald status`.
#[utoipa::path(get, path = "/v1/status", tag = "operate", responses((status = 200, description = "Status", body = StatusResponse)))]
pub(super) async fn status(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Result<Json<StatusResponse>, crate::error::ApiError> {
    state.auth().require_admin(&principal)?;
    let bounds = state.log().bounds().ok();
    let hub = state.log().hub().stats();
    Ok(Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: state.uptime().as_secs(),
        log_first: bounds.map_or(0, |b| b.first.0),
        log_last: bounds.map_or(0, |b| b.last.0),
        engine_subscriptions: hub.subscriptions,
        durable_subscriptions: state.durables().list().len(),
        queue_overflows: hub.overflows,
    }))
}

/// Query of `GET /v1/stats`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Only the samples of the last this many seconds (default: every sample kept, up to an
    /// hour; at most a day).
    #[param(minimum = 0, maximum = 86400)]
    pub seconds: Option<u32>,
}

/// The server at a glance, and its figures over the last hour: what the console shows.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsView {
    /// The server's version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// `online` or `offline`.
    pub state: String,
    /// This node's name in a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The oldest watermark the log holds.
    pub log_first: u64,
    /// The last watermark assigned.
    pub log_last: u64,
    /// Bytes the log holds (embedded: the events' records, what `max_bytes` retention counts;
    /// JetStream: the stream's, as of its last info, at most a second old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    /// Durable subscriptions.
    pub durable_subscriptions: usize,
    /// Client connections now, by transport.
    pub connections: std::collections::BTreeMap<String, u64>,
    /// Samples, oldest first, every `stats.sample_every`.
    pub samples: Vec<crate::stats::Sample>,
}

/// The server at a glance and its figures over the last hour, kept in memory (no external
/// Prometheus needed); the console draws its charts from it.
#[utoipa::path(
    get, path = "/v1/stats", tag = "operate", params(StatsQuery),
    responses(
        (status = 200, description = "Figures", body = StatsView),
        (status = 403, description = "This needs an API key", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn stats(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    crate::error::JsonQuery(q): crate::error::JsonQuery<StatsQuery>,
) -> Result<Json<StatsView>, crate::error::ApiError> {
    state.auth().require_admin(&principal)?;
    if q.seconds.is_some_and(|s| s > 86_400) {
        return Err(crate::error::ApiError::field(
            "seconds",
            "at most 86400 (a day)",
        ));
    }
    let bounds = state.log().bounds().ok();
    let mut connections = std::collections::BTreeMap::new();
    for c in state.delivery().connections().list(None) {
        *connections
            .entry(c.transport.as_str().to_owned())
            .or_insert(0u64) += 1;
    }
    let since = q.seconds.map(|s| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(u64::from(s))
    });
    let engine = state.delivery().state().engine();
    Ok(Json(StatsView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: state.uptime().as_secs(),
        state: herald_delivery::state_name(engine.current_state()).to_owned(),
        node: state.node_name(),
        log_first: bounds.map_or(0, |b| b.first.0),
        log_last: bounds.map_or(0, |b| b.last.0),
        log_bytes: state.log().stored_bytes(),
        durable_subscriptions: state.durables().len(),
        connections,
        samples: state.stats().samples(since),
    }))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operate", responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub(super) async fn openapi() -> impl IntoResponse {
    Json(super::ApiDoc::openapi())
}
