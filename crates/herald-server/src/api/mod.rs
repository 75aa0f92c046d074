//! The HTTP API: routes, auth, body limits, and the OpenAPI document generated from them.

mod console;
pub(crate) mod events;
mod ops;
mod state;
mod stream;
mod subs;
mod ws;

pub use crate::auth::Principal;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use utoipa::OpenApi;

use crate::AppState;
use crate::error::ApiError;

pub use events::{PublishRequest, PublishResponse};
pub use ops::{StatsQuery, StatsView, StatusResponse};
pub use state::{ConnectionView, SetState, StateNotification, StateView};
pub use subs::{CreateSubscription, DeliveryAttempt, EventsPage, SubscriptionView, WaitResponse};
pub use ws::{ClientFrame, ServerFrame};

/// The OpenAPI document of the HTTP API, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Notification server: producers publish events on keys; subscribers receive them in order, without loss, over SSE, WebSocket or long-poll, and resume from a watermark."
    ),
    paths(
        events::publish,
        stream::stream,
        ws::websocket,
        subs::create,
        subs::list,
        subs::get_one,
        subs::delete,
        subs::wait,
        subs::events,
        subs::enable,
        subs::rotate_secret,
        subs::deliveries,
        ops::watch_page,
        console::page,
        console::script,
        console::style,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::status,
        ops::stats,
        ops::openapi,
        state::get_state,
        state::put_state,
        state::advise,
        state::unadvise,
        state::connections,
        state::kick,
    ),
    components(schemas(
        crate::json::EventJson,
        crate::error::ErrorBody,
        ws::ClientFrame,
        ws::ServerFrame,
        state::StateView,
        state::SetState,
        state::StateNotification,
        state::ConnectionView,
    )),
    modifiers(&CommonErrors),
    tags(
        (name = "produce", description = "Publishing events"),
        (name = "subscribe", description = "Receiving events"),
        (name = "operate", description = "Health, metrics, status")
    )
)]
pub struct ApiDoc;

/// Adds to every `/v1` operation the errors any of them can answer, whatever the handler:
/// 400 (a malformed query string or body), 401 (credentials, when authentication is on), 413
/// (a body over `limits.max_body_bytes`), 415 (a body that is not JSON), 503 (the log is
/// unavailable) — each with the JSON error body.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
        let common = [
            (
                "400",
                "A malformed query string, path or body (the field is named)",
            ),
            ("401", "Missing, invalid or revoked credentials"),
            ("413", "The body is larger than limits.max_body_bytes"),
            ("415", "The body is not JSON"),
            ("503", "The log cannot be used now"),
        ];
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for op in [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                for (code, description) in common {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(
                                        "application/json",
                                        ContentBuilder::new()
                                            .schema(Some(utoipa::openapi::Ref::from_schema_name(
                                                "ErrorBody",
                                            )))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

/// The router over `state`.
pub fn app(state: AppState) -> Router {
    let limit = state.config().limits.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/events", post(events::publish))
        .route("/v1/stream", get(stream::stream))
        .route("/v1/ws", get(ws::websocket))
        .route("/v1/subscriptions", post(subs::create).get(subs::list))
        .route(
            "/v1/subscriptions/{id}",
            get(subs::get_one).delete(subs::delete),
        )
        .route("/v1/subscriptions/{id}/wait", get(subs::wait))
        .route("/v1/subscriptions/{id}/events", get(subs::events))
        .route("/v1/subscriptions/{id}/enable", post(subs::enable))
        .route("/v1/subscriptions/{id}/deliveries", get(subs::deliveries))
        .route(
            "/v1/subscriptions/{id}/rotate-secret",
            post(subs::rotate_secret),
        )
        .route("/v1/status", get(ops::status))
        .route("/v1/stats", get(ops::stats))
        .route("/v1/state", get(state::get_state).put(state::put_state))
        .route("/v1/state/advise", get(state::advise))
        .route("/v1/state/advise/{token}", delete(state::unadvise))
        .route("/v1/connections", get(state::connections))
        .route("/v1/connections/{id}", delete(state::kick))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/", get(ops::watch_page))
        .route("/console", get(console::page))
        .route("/console/", get(console::page))
        .route("/console/app.js", get(console::script))
        .route("/console/app.css", get(console::style))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/EWS/Exchange.asmx", post(crate::ews::handle))
        .route("/ews/exchange.asmx", post(crate::ews::handle))
        .route("/EWS/Services.wsdl", get(crate::ews::services_wsdl))
        .route("/ews/services.wsdl", get(crate::ews::services_wsdl))
        .route("/EWS/messages.xsd", get(crate::ews::messages_xsd))
        .route("/ews/messages.xsd", get(crate::ews::messages_xsd))
        .route("/EWS/types.xsd", get(crate::ews::types_xsd))
        .route("/ews/types.xsd", get(crate::ews::types_xsd))
        .route("/mapi/emsmdb", post(crate::mapi::handle))
        .route("/mapi/emsmdb/", post(crate::mapi::handle))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(body_limit_as_json))
        .with_state(state)
}

/// The header of a listing that says how many items matched before `limit` cut the list.
pub(crate) const TOTAL_COUNT: &str = "x-total-count";

/// The most items a listing returns, whatever `limit` asks.
pub(crate) const MAX_LIMIT: usize = 10_000;

/// How many items a listing asked to return `limit` may hold.
pub(crate) fn limit(limit: Option<usize>) -> usize {
    limit.unwrap_or(MAX_LIMIT).min(MAX_LIMIT)
}

/// A listing cut to [`limit`] out of `total` matches, with [`TOTAL_COUNT`]: a console or a
/// script shows the first of thousands of connections without fetching them all.
pub(crate) fn listing<T: Serialize>(items: Vec<T>, total: usize) -> Response {
    ([(TOTAL_COUNT, total.to_string())], axum::Json(items)).into_response()
}

/// Whether `needle` is empty or in any of `fields`, ignoring ASCII case.
pub(crate) fn matches_search(needle: Option<&str>, fields: &[&str]) -> bool {
    let Some(needle) = needle.filter(|n| !n.is_empty()) else {
        return true;
    };
    let needle = needle.to_ascii_lowercase();
    fields
        .iter()
        .any(|f| f.to_ascii_lowercase().contains(&needle))
}

/// Authenticates every `/v1` request and hands the handlers its [`Principal`]; a request
/// without valid credentials gets a 401 here (when authentication is on).
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state.auth().authenticate(req.headers(), req.uri().query()) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Turns axum's plain-text 413 into the API's JSON error naming the body.
async fn body_limit_as_json(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE
        && res
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| !v.as_bytes().starts_with(b"application/json"))
    {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than limits.max_body_bytes",
        )
        .with_field("body")
        .into_response();
    }
    res
}
