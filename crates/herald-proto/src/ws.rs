//! The WebSocket protocol (`GET /v1/ws`): JSON text frames. The client sends
//! [`ClientFrame`]s (`op`-tagged), the server [`ServerFrame`]s (`type`-tagged). One connection
//! carries many subscriptions, each resumable from a watermark, and publishes batches in order
//! with many in flight.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::json::EventJson;

/// A frame the client sends.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Adds a subscription named `id` (the client's choice, unique on the connection).
    Subscribe {
        /// The client's name for it.
        id: String,
        /// Exactly this key.
        #[serde(default)]
        key: Option<String>,
        /// This key and everything below it.
        #[serde(default)]
        subtree: Option<String>,
        /// What is directly in this folder (events whose parent, or old parent, is this key).
        #[serde(default)]
        children: Option<String>,
        /// Comma-separated kinds (default: all).
        #[serde(default)]
        kinds: Option<String>,
        /// Advise on connection state with this client token: each presence change is told as
        /// `start`, `change` and `done`, each carrying it.
        #[serde(default)]
        state_token: Option<u32>,
        /// That advise's state mask (decimal or `0x` hex, within `0x003f037f`, covering `0x3`).
        #[serde(default)]
        state_mask: Option<String>,
        /// Resume after this watermark (default: from the next event, or from the durable
        /// subscription's acknowledged watermark).
        #[serde(default)]
        after: Option<u64>,
        /// Stream a durable subscription (its filter and acknowledged watermark) instead of
        /// giving a filter; acks on this connection are then stored.
        #[serde(default)]
        subscription: Option<String>,
    },
    /// Removes the subscription named `id`.
    Unsubscribe {
        /// The client's name for it.
        id: String,
    },
    /// Publishes a batch (a producer's credentials): appended after every batch this
    /// connection published before it, answered `published` or `error` in the order the
    /// batches were sent, without waiting for one answer before sending the next. After a
    /// failed batch, later ones are answered `aborted` and not appended until one comes with
    /// `restart`.
    Publish {
        /// The producer's name for the batch, echoed in its answer.
        id: String,
        /// The events, appended atomically, in order.
        events: Vec<EventJson>,
        /// Makes a retry safe, as the `Idempotency-Key` header does.
        #[serde(default)]
        idempotency_key: Option<String>,
        /// Begins a new sequence (after a failure, to go on).
        #[serde(default)]
        restart: bool,
    },
    /// Acknowledges everything up to `watermark` on subscription `id`.
    Ack {
        /// The client's name for it.
        id: String,
        /// The last watermark processed.
        watermark: u64,
    },
}

/// A frame the server sends.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The subscription is live; events after `after` follow.
    Subscribed {
        /// Its name.
        id: String,
        /// The watermark it resumes after.
        after: u64,
    },
    /// An event of subscription `id`.
    Event {
        /// Its name.
        id: String,
        /// The event, with its watermark.
        event: Box<EventJson>,
    },
    /// A published batch is durable: its watermarks.
    Published {
        /// The producer's name for the batch.
        id: String,
        /// One watermark per event, in order.
        watermarks: Vec<u64>,
        /// A retry of an earlier batch with the same idempotency key: nothing new appended.
        replayed: bool,
    },
    /// The subscription is gone.
    Unsubscribed {
        /// Its name.
        id: String,
    },
    /// The acknowledgement was recorded (stored, for a durable subscription).
    Acked {
        /// Its name.
        id: String,
        /// The watermark.
        watermark: u64,
    },
    /// The subscription's position is older than the log holds; it has ended.
    Expired {
        /// Its name.
        id: String,
        /// The oldest watermark the log holds.
        oldest_available: u64,
    },
    /// A request could not be done.
    Error {
        /// The subscription it concerns, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// A stable code.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// The server is shutting down; reconnect and resume.
    Shutdown,
}

/// A `publish` frame read straight into its fields. Read as the tagged [`ClientFrame`], serde
/// first buffers the whole frame (every event, every string) in its generic form and then
/// reads that again; for publish frames that cost more than the rest of the ingest
/// (measured: a profile of one ordered producer).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishFrame {
    #[allow(dead_code)]
    op: PublishOp,
    id: String,
    events: Vec<EventJson>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    restart: bool,
}

/// The only `op` a [`PublishFrame`] has.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum PublishOp {
    Publish,
}

impl ClientFrame {
    /// Reads a client frame: `publish` frames the cheap way, any other (and any malformed
    /// one, for its error message) as the tagged enum.
    pub fn parse(text: &str) -> Result<ClientFrame, serde_json::Error> {
        match serde_json::from_str::<PublishFrame>(text) {
            Ok(p) => Ok(ClientFrame::Publish {
                id: p.id,
                events: p.events,
                idempotency_key: p.idempotency_key,
                restart: p.restart,
            }),
            Err(_) => serde_json::from_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frames_read_the_cheap_way_read_as_the_tagged_enum_does() {
        let frames = [
            r#"{"op":"publish","id":"b1","events":[{"key":"a/b","kind":"new_mail"}]}"#,
            r#"{"id":"b2","restart":true,"op":"publish","idempotency_key":"k","events":[]}"#,
            r#"{"op":"subscribe","id":"s","subtree":"a"}"#,
            r#"{"op":"ack","id":"s","watermark":4}"#,
        ];
        for f in frames {
            let cheap = serde_json::to_value(ClientFrame::parse(f).unwrap()).unwrap();
            let tagged =
                serde_json::to_value(serde_json::from_str::<ClientFrame>(f).unwrap()).unwrap();
            assert_eq!(cheap, tagged, "{f}");
        }
        // A malformed publish frame is refused with the tagged enum's message.
        for bad in [
            r#"{"op":"publish","id":"b1"}"#,
            r#"{"op":"publish","id":"b1","events":[],"extra":1}"#,
            r#"{"op":"nope"}"#,
        ] {
            let a = ClientFrame::parse(bad).unwrap_err().to_string();
            let b = serde_json::from_str::<ClientFrame>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(a, b);
        }
    }
}
