//! `POST /v1/events`: the producer API.

use std::time::Instant;

use crate::auth::Principal;
use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_core::Timestamp;
use herald_log::{AppendOptions, EventLog};

use crate::AppState;
use crate::error::ApiError;
use crate::json::EventJson;
use crate::metrics::names;

pub use herald_proto::http::{PublishRequest, PublishResponse};

/// The most bytes an `Idempotency-Key` may have.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Appends a batch of events; answers only once they are durable.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "produce",
    request_body = PublishRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: a retry with the same key and batch appends nothing and gets the same watermarks")),
    responses(
        (status = 200, description = "Durably appended", body = PublishResponse),
        (status = 400, description = "A field is invalid; `error.field` names it", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid credentials", body = crate::error::ErrorBody),
        (status = 403, description = "A subscriber token cannot publish", body = crate::error::ErrorBody),
        (status = 413, description = "The body is larger than `limits.max_body_bytes`", body = crate::error::ErrorBody),
        (status = 422, description = "The idempotency key was used for a different batch", body = crate::error::ErrorBody),
        (status = 503, description = "The log cannot store it now", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn publish(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // Before the body is read: a token that may not publish learns that first.
    state.auth().require_producer(&principal)?;
    let result = append(&state, &principal, &headers, body).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.status().is_client_error() => "rejected",
        Err(_) => "failed",
    };
    metrics::counter!(names::APPEND_REQUESTS, "outcome" => outcome).increment(1);
    let (resp, replayed) = result?;
    metrics::histogram!(names::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
    let mut r = (StatusCode::OK, Json(resp)).into_response();
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(r)
}

async fn append(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<(PublishResponse, bool), ApiError> {
    let Json(req) = body.map_err(|e| match e {
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than limits.max_body_bytes ({} bytes)",
                    state.config().limits.max_body_bytes
                ),
            )
            .with_field("body")
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ),
        other => ApiError::field("body", other.body_text()),
    })?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::field(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            )
        })?),
    };
    let (batch, options) = check_batch(state, principal, &req.events, key, "Idempotency-Key")?;
    let appended = state.log().append(batch, options).await;
    count_appended(&appended);
    let appended = appended?;
    Ok((
        PublishResponse {
            watermarks: appended.watermarks().map(|w| w.0).collect(),
            replayed: appended.replayed,
        },
        appended.replayed,
    ))
}

/// Checks a batch a producer sent, as every publishing path does: its size, its idempotency
/// key (`key_field` names where it came from), each event, and the producer's right to
/// publish it. Returns the engine's batch and its append options.
pub(crate) fn check_batch(
    state: &AppState,
    principal: &Principal,
    events: &[EventJson],
    key: Option<&str>,
    key_field: &str,
) -> Result<(Vec<herald_core::Notification>, AppendOptions), ApiError> {
    state.auth().require_producer(principal)?;
    let limits = &state.config().limits;
    if events.is_empty() {
        return Err(ApiError::field("events", "must hold at least one event"));
    }
    if events.len() > limits.max_batch_events {
        return Err(ApiError::field(
            "events",
            format!(
                "{} events is more than limits.max_batch_events ({})",
                events.len(),
                limits.max_batch_events
            ),
        ));
    }
    let idempotency_key = match key {
        None => None,
        Some(k) => {
            if k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY
                || !k.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            {
                return Err(ApiError::field(
                    key_field,
                    format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
                ));
            }
            // Scoped to the producer: one API key can neither replay nor block another's.
            Some(format!("{}\u{1f}{k}", principal.idempotency_scope()))
        }
    };
    // An event without a timestamp is stamped by the log when it is appended (so that a
    // retry of the same batch is recognised as the same, while a producer's own timestamps
    // are part of what makes a batch the same).
    let now = Timestamp(0);
    let batch = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.to_notification(now, limits.max_key_bytes)
                .map_err(|fe| ApiError::field_in(&format!("events[{i}]"), fe))
        })
        .collect::<Result<Vec<_>, _>>()?;
    state.auth().check_publish(principal, &batch)?;
    Ok((
        batch,
        AppendOptions {
            idempotency_key,
            ..Default::default()
        },
    ))
}

/// Counts what an append stored.
pub(crate) fn count_appended(appended: &Result<herald_log::Appended, herald_log::AppendError>) {
    if let Ok(a) = appended {
        if !a.replayed {
            metrics::counter!(names::EVENTS_APPENDED).increment(u64::from(a.count));
        }
    }
}
