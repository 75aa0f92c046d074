//! Bodies of the HTTP API that a client sends or reads.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::json::EventJson;

/// A batch of events to append, in order.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The events; the batch is appended atomically and delivered in this order.
    pub events: Vec<EventJson>,
}

/// The watermarks the batch got, once it is durable.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct PublishResponse {
    /// One watermark per event, in order.
    pub watermarks: Vec<u64>,
    /// Whether this answers a retry of an earlier request with the same `Idempotency-Key`
    /// (nothing new was appended).
    pub replayed: bool,
}
