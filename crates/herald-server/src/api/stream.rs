//! `GET /v1/stream`: Server-Sent Events.
//!
//! Each event's `id:` is its watermark and its `event:` its kind, so a browser's EventSource
//! resumes without gap or duplicate through `Last-Event-ID`. A subscriber slower than the
//! producers never loses events: its queue overflowing makes it read the log instead. A
//! position that cannot be resumed (older than retention, or ahead of the log) is told as a
//! named event, `expired` or `reset`, and the stream ends; so does a server shutdown
//! (`shutdown`).

use std::convert::Infallible;

use crate::auth::{ConnectionPermit, Principal};
use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use herald_core::Watermark;
use herald_delivery::{ConnectError, EndReason, Feed, FeedItem, Lease, Live, Transport};
use herald_log::{FollowError, ReadError};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, JsonQuery};
use crate::frames::{SSE_KEEPALIVE, StateAdvise, sse_named, told};
use crate::metrics::{ConnectionGauge, delivered_all};
use crate::subscriptions::FilterJson;
use crate::subscriptions::{owner_name, target_of};
use crate::{AppState, Log};

/// What to stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct StreamQuery {
    /// Exactly this key.
    key: Option<String>,
    /// This key and everything below it.
    subtree: Option<String>,
    /// What is directly in this folder (events whose parent, or old parent, is this key).
    children: Option<String>,
    /// Comma-separated kinds (default: all).
    kinds: Option<String>,
    /// Advise on connection state with this client token: each presence change is told as
    /// `start`, `change` and `done`, each carrying it.
    state_token: Option<u32>,
    /// That advise's state mask (decimal or `0x` hex, within `0x003f037f`, covering `0x3`).
    state_mask: Option<String>,
    /// Resume after this watermark (`Last-Event-ID` takes precedence). Without either, the
    /// stream starts with the next event.
    after: Option<u64>,
    /// An API key, for clients that cannot send an Authorization header.
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// Streams events as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/v1/stream",
    tag = "subscribe",
    params(StreamQuery, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this watermark")),
    responses(
        (status = 200, description = "`text/event-stream`: one SSE event per Herald event (`id:` watermark, `event:` kind, `data:` the event as JSON); named events `expired`, `reset` and `shutdown` end the stream; comments keep it alive", content_type = "text/event-stream"),
        (status = 400, description = "An invalid filter or position", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid credentials", body = crate::error::ErrorBody),
        (status = 403, description = "The token may not read this key or kind", body = crate::error::ErrorBody),
        (status = 429, description = "The token holds all the connections it may", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn stream(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonQuery(q): JsonQuery<StreamQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let limits = &state.config().limits;
    let filter_json = FilterJson {
        key: q.key,
        subtree: q.subtree,
        children: q.children,
        kinds: q.kinds,
        state_token: q.state_token,
        state_mask: q.state_mask,
    };
    let filter = filter_json
        .to_filter(limits.max_key_bytes)
        .map_err(|e| ApiError::field_in("", e))?;
    let advise = filter_json
        .state_advise()
        .map_err(|e| ApiError::field_in("", e))?;
    state.auth().check_filter(&principal, &filter)?;
    let permit = state.auth().connect(&principal)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::field("Last-Event-ID", "must be a watermark (an integer)")
                })?,
        ),
    };
    let after = match last_event_id.or(q.after) {
        Some(w) => Watermark(w),
        None => state.delivery().head().map_err(ApiError::internal)?,
    };
    let owner = principal.owner();
    let connect = state.delivery().lifecycle().fresh(
        Transport::Sse,
        owner_name(owner.as_deref()),
        target_of(&filter),
    );
    let id = connect.id.clone();
    let delivery = state.delivery();
    let started = delivery
        .lifecycle()
        .connect(connect, Some(Lease::Stream), || {
            std::future::ready(
                delivery
                    .feed(filter.clone(), after)
                    .map(|f| f.keepalive(state.config().limits.keepalive)),
            )
        })
        .await;
    let start = match started {
        Ok(started) => Ok(started),
        Err(ConnectError::Failed(e)) => Err(e),
        Err(e) => return Err(crate::hooks::api_error(e.map_failed(ApiError::internal))),
    };
    let body = Body::from_stream(events(start, state.clone(), principal, permit, advise));
    Ok((
        [
            (
                header::HeaderName::from_static("herald-connection"),
                id.as_str(),
            ),
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

struct StreamState {
    feed: Option<Feed<Log>>,
    ending: Option<Bytes>,
    state: AppState,
    /// The connection's presence; dropping it runs the cancel hooks.
    live: Option<Live>,
    /// Who opened it: the stream closes if its credentials are revoked.
    principal: Principal,
    /// Its advise on connection state, if it gave one.
    advise: Option<StateAdvise>,
    _gauge: ConnectionGauge,
    _permit: ConnectionPermit,
}

fn final_event(e: &FollowError) -> Bytes {
    let (name, body) = match e {
        FollowError::Position(ReadError::Expired {
            oldest_available, ..
        }) => (
            "expired",
            serde_json::json!({"code": "watermark_expired", "message": e.to_string(), "oldest_available": oldest_available.0}),
        ),
        FollowError::Position(ReadError::Ahead { last, .. }) => (
            "reset",
            serde_json::json!({"code": "watermark_ahead", "message": e.to_string(), "last": last.0}),
        ),
        other => (
            "error",
            serde_json::json!({"code": "internal", "message": other.to_string()}),
        ),
    };
    sse_named(name, &body)
}

/// The body: every batch the feed yields is written as one chunk (one socket write for
/// many events); a comment keeps an idle stream open; a named event ends it.
fn events(
    start: Result<(Feed<Log>, Live), FollowError>,
    state: AppState,
    principal: Principal,
    permit: ConnectionPermit,
    advise: Option<StateAdvise>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let (feed, ending, live) = match start {
        Ok((feed, live)) => (Some(feed), None, Some(live)),
        Err(e) => (None, Some(final_event(&e)), None),
    };
    let s = StreamState {
        feed,
        ending,
        state,
        live,
        principal,
        advise,
        _gauge: ConnectionGauge::open("sse"),
        _permit: permit,
    };
    futures_util::stream::unfold(s, |mut s| async move {
        if let Some(end) = s.ending.take() {
            s.feed = None;
            return Some((Ok(end), s));
        }
        let (feed, live) = (s.feed.as_mut()?, s.live.as_mut()?);
        // Being polled means the last chunk went out: the client is (as far as TCP knows)
        // still there.
        live.renew();
        let chunk = tokio::select! {
            next = feed.next() => match next {
                Ok(FeedItem::Events { batch, .. }) => {
                    let cache = s.state.frames();
                    let mut out = BytesMut::with_capacity(batch.len() * 384);
                    for n in batch.iter() {
                        for m in told(n, s.advise).as_slice() {
                            cache.sse_frame(m, &mut out);
                        }
                    }
                    delivered_all("sse", batch.iter());
                    out.freeze()
                }
                Ok(FeedItem::KeepAlive { .. }) => Bytes::from_static(SSE_KEEPALIVE),
                Err(e) => {
                    s.feed = None;
                    final_event(&e)
                }
            },
            why = live.expired() => {
                live.end(why);
                s.feed = None;
                if why == EndReason::Kick {
                    sse_named("closed", &serde_json::json!({"code": "kicked", "message": "an operator closed this connection"}))
                } else {
                    sse_named("closed", &serde_json::json!({"code": "lease_expired", "message": "the connection's lease expired; reconnect with Last-Event-ID"}))
                }
            }
            () = s.state.auth().revoked(&s.principal) => {
                live.end(EndReason::Revoked);
                s.feed = None;
                sse_named("closed", &serde_json::json!({"code": "revoked", "message": "the credentials of this stream were revoked"}))
            }
            () = s.state.shutdown().cancelled() => {
                live.end(EndReason::Shutdown);
                s.feed = None;
                sse_named("shutdown", &serde_json::json!({"code": "shutdown", "message": "the server is shutting down; reconnect with Last-Event-ID"}))
            }
        };
        Some((Ok(chunk), s))
    })
}
