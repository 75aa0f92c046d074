//! API errors: an HTTP status with a JSON body naming the code, the message and, when one is
//! to blame, the field.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::json::FieldError;

/// The body of every error response: `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code (`invalid_field`, `body_too_large`, …).
    pub code: &'static str,
    /// A sentence for humans.
    pub message: String,
    /// The request field at fault, as a JSON path (`events[3].kind`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For an expired watermark: the oldest one still held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_available: Option<u64>,
}

/// An error that becomes an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: ErrorDetail {
                code,
                message: message.into(),
                field: None,
                oldest_available: None,
            },
            retry_after: None,
        }
    }

    /// This error, telling the client when to try again (`Retry-After`, seconds).
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// A 400 naming the field at fault.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message);
        e.detail.field = Some(field.into());
        e
    }

    /// A 400 for a field error inside a prefix (`events[3]`).
    pub fn field_in(prefix: &str, e: FieldError) -> Self {
        let path = if prefix.is_empty() {
            e.field
        } else {
            format!("{prefix}.{}", e.field)
        };
        ApiError::field(path, e.message)
    }

    /// This error, naming the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    /// A 404 for an unknown resource.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// A 500 for a failure that is ours.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }

    /// The error for a watermark that cannot be resumed from.
    pub fn position(e: &herald_log::ReadError) -> Self {
        match e {
            herald_log::ReadError::Expired {
                oldest_available, ..
            } => {
                let mut err = ApiError::new(StatusCode::GONE, "watermark_expired", e.to_string());
                err.detail.oldest_available = Some(oldest_available.0);
                err
            }
            herald_log::ReadError::Ahead { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "watermark_ahead", e.to_string())
            }
            other => ApiError::internal(other),
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        self.detail.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.detail.message
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<herald_log::AppendError> for ApiError {
    fn from(e: herald_log::AppendError) -> Self {
        match e {
            herald_log::AppendError::Empty => {
                ApiError::field("events", "must hold at least one event")
            }
            herald_log::AppendError::InvalidEvent { index, reason } => {
                ApiError::field(format!("events[{index}]"), reason.to_string())
            }
            herald_log::AppendError::IdempotencyConflict { key } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                format!("Idempotency-Key {key:?} was already used with a different batch"),
            ),
            herald_log::AppendError::Aborted => ApiError::new(
                StatusCode::CONFLICT,
                "aborted",
                "an earlier batch of this connection failed; this one was not appended",
            ),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                other.to_string(),
            ),
        }
    }
}

impl From<std::convert::Infallible> for ApiError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// A query string read into `T`, where every failure is the API's JSON error naming the
/// parameter at fault (a bad number, a repeated parameter), never axum's plain text.
#[derive(Debug)]
pub struct JsonQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for JsonQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = || url::form_urlencoded::parse(query.as_bytes());
        let mut seen = std::collections::HashSet::new();
        for (name, _) in pairs() {
            if !seen.insert(name.clone()) {
                return Err(ApiError::field(name, "given more than once"));
            }
        }
        serde_urlencoded::from_str::<T>(query)
            .map(JsonQuery)
            .map_err(|e| {
                // The parameter that fails on its own is the one to name.
                let field = pairs()
                    .find(|(k, v)| {
                        let alone = url::form_urlencoded::Serializer::new(String::new())
                            .append_pair(k, v)
                            .finish();
                        serde_urlencoded::from_str::<T>(&alone).is_err()
                    })
                    .map_or_else(|| "query".to_owned(), |(k, _)| k.into_owned());
                ApiError::field(field, e.to_string())
            })
    }
}
