//! The HTTP API: routes, auth, body limits, and the OpenAPI document generated from them.

mod events;
mod ops;
mod stream;
mod subs;
mod ws;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use utoipa::OpenApi;

use crate::AppState;
use crate::error::ApiError;

pub use events::{PublishRequest, PublishResponse};
pub use ops::StatusResponse;
pub use subs::{CreateSubscription, EventsPage, SubscriptionView, WaitResponse};
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
        ops::watch_page,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::status,
        ops::openapi,
    ),
    components(schemas(
        crate::json::EventJson,
        crate::error::ErrorBody,
        ws::ClientFrame,
        ws::ServerFrame,
    )),
    tags(
        (name = "produce", description = "Publishing events"),
        (name = "subscribe", description = "Receiving events"),
        (name = "operate", description = "Health, metrics, status")
    )
)]
pub struct ApiDoc;

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
        .route("/v1/status", get(ops::status))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/", get(ops::watch_page))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(body_limit_as_json))
        .with_state(state)
}

/// With API keys configured, requires `Authorization: Bearer <key>` (or `?access_token=` for
/// clients, like the browser's EventSource, that cannot set headers).
async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config().auth.keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let from_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("access_token="))
            .map(str::to_owned)
    });
    match from_header.or(from_query) {
        Some(token)
            if keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), token.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required: Authorization: Bearer <key>",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
