//! `GET /v1/ws`: WebSocket. JSON text frames; one connection carries many subscriptions,
//! added and removed by the client, each resumable from a watermark, and optionally bound to
//! a durable subscription whose acknowledgements are stored.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::response::Response;
use futures_util::{FutureExt, SinkExt, Stream};
use herald_core::{Filter, Watermark};
use herald_delivery::{Connect, ConnectError, EndReason, FeedItem, Lease, Live, Transport};
use herald_log::{FollowError, ReadError};
use tokio_stream::{StreamExt, StreamMap};

use crate::AppState;
use crate::auth::{ConnectionPermit, Principal};
use crate::frames::{StateAdvise, told};
use crate::metrics::{ConnectionGauge, delivered_all};
use crate::publisher::{Answer, Publisher};
use crate::subscriptions::{DurableRef, FilterJson, owner_name, target_of};
use herald_proto::json::EventJson;
pub use herald_proto::ws::{ClientFrame, ServerFrame};

/// Opens a WebSocket; see `ClientFrame` and `ServerFrame` for the protocol.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "subscribe",
    responses((status = 101, description = "Switching to WebSocket: the client sends ClientFrame JSON text frames, the server ServerFrame ones"))
)]
pub(super) async fn websocket(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let permit = match state.auth().connect(&principal) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let owner = owner_name(principal.owner().as_deref()).to_owned();
    let connect = state
        .delivery()
        .lifecycle()
        .fresh(Transport::WebSocket, owner, "");
    let opened = state
        .delivery()
        .lifecycle()
        .connect(connect, Some(Lease::Stream), || {
            std::future::ready(Ok::<_, Infallible>(()))
        })
        .await;
    // Dropped with the closure if the upgrade never completes: then it ends as a `close`.
    let live = match opened {
        Ok(((), live)) => live,
        Err(e) => {
            return crate::hooks::api_error(e).into_response();
        }
    };
    // tungstenite's default buffers (128 KiB to read, more to write) would cost every idle
    // connection well over 100 KiB; client frames are small.
    upgrade
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .on_upgrade(move |socket| connection(state, socket, principal, permit, live))
}

/// One subscription on the connection.
struct Sub {
    /// The durable subscription it streams, whose acks are stored.
    durable: Option<DurableRef>,
    /// Its connect hooks ran; dropping it runs its cancel hooks.
    live: Live,
    /// Its advise on connection state, if it gave one.
    advise: Option<StateAdvise>,
}

/// A subscription's feed, merged with the others of the connection.
type FeedStream = Pin<Box<dyn Stream<Item = Result<FeedItem, FollowError>> + Send>>;

/// The connection: client frames are handled as they come; the subscriptions' feeds are
/// merged and polled only when the socket has taken what came before, so a slow client makes
/// its feeds fall back to reading the log (costing reads, never events).
async fn connection(
    state: AppState,
    mut socket: WebSocket,
    principal: Principal,
    _permit: ConnectionPermit,
    mut live: Live,
) {
    let _gauge = ConnectionGauge::open("websocket");
    let conn_id = live.request().connection.clone();
    let mut reason = EndReason::Close;
    let mut closing: Option<(u16, &'static str)> = None;
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut feeds: StreamMap<String, FeedStream> = StreamMap::new();
    let mut ping = tokio::time::interval(state.config().limits.keepalive);
    ping.reset();
    let shutdown = state.shutdown().clone();
    // Made at the first `publish`: most connections only subscribe.
    let mut publisher: Option<Publisher> = None;
    loop {
        let reading = !publisher.as_ref().is_some_and(Publisher::is_full);
        let answering = publisher.as_ref().is_some_and(Publisher::is_busy);
        tokio::select! {
            incoming = socket.recv(), if reading => match incoming {
                Some(Ok(Message::Text(text))) => {
                    live.renew();
                    let (reply, feed) = match ClientFrame::parse(text.as_str()) {
                        Ok(ClientFrame::Publish { id, events, idempotency_key, restart }) => {
                            let p = publisher.get_or_insert_with(|| {
                                Publisher::new(
                                    state.log().clone(),
                                    state.config().limits.max_ws_publishes_in_flight,
                                )
                            });
                            (publish(&state, &principal, p, id, &events, idempotency_key.as_deref(), restart), None)
                        }
                        Ok(frame) => handle(&state, &principal, &conn_id, &mut subs, frame).await,
                        Err(e) => (Some(error(None, "invalid_frame", e.to_string())), None),
                    };
                    if let Some(frame) = reply {
                        if send(&mut socket, &frame).await.is_err() {
                            break;
                        }
                    }
                    match feed {
                        Some(Change::Add(id, f)) => { feeds.insert(id, f); }
                        Some(Change::Remove(id)) => { feeds.remove(&id); }
                        None => {}
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let frame = error(None, "binary_not_supported", "send JSON text frames");
                    if send(&mut socket, &frame).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // A frame over the limit is told as such (1009); anything else is a broken
                    // connection.
                    if is_too_big(&e) {
                        closing = Some((1009, "frame too large: at most 64 KiB"));
                    }
                    break;
                }
                // Pongs and pings: the client is alive.
                Some(Ok(_)) => live.renew(),
            },
            Some(answer) = next_answer(&mut publisher), if answering => {
                let frame = match answer.result {
                    Ok(a) => ServerFrame::Published {
                        id: answer.id,
                        watermarks: a.watermarks().map(|w| w.0).collect(),
                        replayed: a.replayed,
                    },
                    Err(e) => error(Some(answer.id), e.code(), e.message().to_owned()),
                };
                if send(&mut socket, &frame).await.is_err() {
                    break;
                }
            }
            Some((id, item)) = feeds.next(), if !feeds.is_empty() => {
                // What else the feeds already hold goes out in the same socket write.
                let mut next = Some((id, item));
                let mut written = 0;
                let mut failed = false;
                while let Some((id, item)) = next.take() {
                    let advise = subs.get(&id).and_then(|s| s.advise);
                    if write(&state, &mut socket, &id, advise, item).await.is_err() {
                        failed = true;
                        break;
                    }
                    written += 1;
                    if written < WRITE_BATCHES {
                        next = feeds.next().now_or_never().flatten();
                    }
                }
                if failed || socket.flush().await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            why = live.expired() => {
                reason = why;
                let text = if why == EndReason::Kick { "closed by an operator" } else { "lease expired: no answer to pings" };
                closing = Some((1008, text));
                break;
            }
            () = state.auth().revoked(&principal) => {
                reason = EndReason::Revoked;
                closing = Some((1008, "credentials revoked"));
                break;
            }
            () = shutdown.cancelled() => {
                reason = EndReason::Shutdown;
                let _ = send(&mut socket, &ServerFrame::Shutdown).await;
                closing = Some((1001, "server shutting down"));
                break;
            }
        }
    }
    // The connection is over for presence and hooks before the closing handshake, which may
    // wait for a silent client.
    for (_, mut s) in subs {
        s.live.end(reason);
    }
    live.end(reason);
    drop(live);
    if let Some((code, why)) = closing {
        close(&mut socket, code, why).await;
    }
}

/// How many batches the feeds already hold are written before one flush.
const WRITE_BATCHES: usize = 16;

/// Writes what a feed yielded, unflushed: the caller flushes once for what it wrote.
async fn write(
    state: &AppState,
    socket: &mut WebSocket,
    id: &str,
    advise: Option<StateAdvise>,
    item: Result<FeedItem, FollowError>,
) -> Result<(), axum::Error> {
    match item {
        Ok(FeedItem::Events { batch, .. }) => {
            delivered_all("websocket", batch.iter());
            for n in batch.iter() {
                for m in told(n, advise).as_slice() {
                    let text = state.frames().ws_event(id, m);
                    socket.feed(Message::Text(text.into())).await?;
                }
            }
            Ok(())
        }
        Ok(FeedItem::KeepAlive { .. }) => Ok(()),
        Err(FollowError::Position(ReadError::Expired {
            oldest_available, ..
        })) => {
            let frame = ServerFrame::Expired {
                id: id.to_owned(),
                oldest_available: oldest_available.0,
            };
            feed(socket, &frame).await
        }
        Err(e) => {
            feed(
                socket,
                &error(Some(id.to_owned()), "stream_ended", e.to_string()),
            )
            .await
        }
    }
}

/// How long the closing handshake may take before the socket is dropped.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The closing handshake: a close frame with `code` and `reason`, then what the client still
/// sends is read (and dropped) until its close, for at most [`CLOSE_WAIT`]. Dropping a socket
/// with unread data makes the kernel reset the connection, and a reset can discard the close
/// frame before the client reads it.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    if socket.send(frame).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Whether a read failed because a frame or message was over the limits.
fn is_too_big(e: &axum::Error) -> bool {
    // axum hides its WebSocket library's error type; its message names the capacity limit.
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}

/// Queues a frame without flushing it.
async fn feed(socket: &mut WebSocket, frame: &ServerFrame) -> Result<(), axum::Error> {
    let text = serde_json::to_string(frame).unwrap_or_default();
    socket.feed(Message::Text(text.into())).await
}

async fn send(socket: &mut WebSocket, frame: &ServerFrame) -> Result<(), axum::Error> {
    let text = serde_json::to_string(frame).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}

fn error(id: Option<String>, code: &str, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: code.into(),
        message: message.into(),
    }
}

/// Checks a `publish` frame's batch and hands it to the connection's publisher, which
/// answers it later, in order; an answer now only if the publisher is gone.
fn publish(
    state: &AppState,
    principal: &Principal,
    publisher: &mut Publisher,
    id: String,
    events: &[EventJson],
    idempotency_key: Option<&str>,
    restart: bool,
) -> Option<ServerFrame> {
    let batch = crate::api::events::check_batch(
        state,
        principal,
        events,
        idempotency_key,
        "idempotency_key",
    );
    let refused = publisher.push(id.clone(), batch, restart).err()?;
    Some(error(
        Some(id),
        refused.code(),
        refused.message().to_owned(),
    ))
}

/// The next answer of the connection's publisher (pending without one).
async fn next_answer(publisher: &mut Option<Publisher>) -> Option<Answer> {
    match publisher {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// What a client frame changes in the merged feeds.
enum Change {
    Add(String, FeedStream),
    Remove(String),
}

/// Handles one client frame; returns the frame to answer with, if any, and the change to the
/// feeds (made after the answer went out, so `subscribed` comes before the first event).
async fn handle(
    state: &AppState,
    principal: &Principal,
    conn_id: &str,
    subs: &mut HashMap<String, Sub>,
    frame: ClientFrame,
) -> (Option<ServerFrame>, Option<Change>) {
    match frame {
        ClientFrame::Subscribe {
            id,
            key,
            subtree,
            children,
            kinds,
            state_token,
            state_mask,
            after,
            subscription,
        } => match subscribe(
            state,
            principal,
            conn_id,
            subs,
            id,
            FilterJson {
                key,
                subtree,
                children,
                kinds,
                state_token,
                state_mask,
            },
            after,
            subscription,
        )
        .await
        {
            Ok((frame, change)) => (Some(frame), Some(change)),
            Err(frame) => (Some(frame), None),
        },
        ClientFrame::Unsubscribe { id } => {
            let Some(s) = subs.get(&id) else {
                return (
                    Some(error(
                        Some(id),
                        "unknown_id",
                        "no subscription with this id on this connection",
                    )),
                    None,
                );
            };
            let req = s.live.request().clone().cancel("unsubscribe", false);
            let ended = state
                .delivery()
                .lifecycle()
                .run(&req, || std::future::ready(Ok::<_, Infallible>(())))
                .await;
            match ended {
                Ok(()) => {
                    // Its cancel hooks ran around this unsubscribe.
                    if let Some(mut s) = subs.remove(&id) {
                        s.live.disarm();
                    }
                    (
                        Some(ServerFrame::Unsubscribed { id: id.clone() }),
                        Some(Change::Remove(id)),
                    )
                }
                Err(e) => (Some(refusal(id, e)), None),
            }
        }
        // Taken by the connection's publisher before this is called.
        ClientFrame::Publish { id, .. } => (
            Some(error(
                Some(id),
                "internal",
                "a publish frame reached the wrong handler",
            )),
            None,
        ),
        ClientFrame::Ack { id, watermark } => {
            let frame = match subs.get(&id) {
                None => error(
                    Some(id),
                    "unknown_id",
                    "no subscription with this id on this connection",
                ),
                Some(Sub {
                    durable: Some(d), ..
                }) => match state
                    .durables()
                    .fetch(d, Some(Watermark(watermark)), 0)
                    .await
                {
                    Ok(_) => ServerFrame::Acked { id, watermark },
                    Err(e) => error(Some(id), "ack_failed", e.to_string()),
                },
                Some(Sub { durable: None, .. }) => ServerFrame::Acked { id, watermark },
            };
            (Some(frame), None)
        }
    }
}

fn refusal<E: std::fmt::Display>(id: String, e: ConnectError<E>) -> ServerFrame {
    match e {
        ConnectError::Refused { hook, reason } => {
            error(Some(id), "refused_by_hook", format!("{hook}: {reason}"))
        }
        ConnectError::Busy => error(Some(id), "busy", e.to_string()),
        ConnectError::Failed(e) => error(Some(id), "internal", e.to_string()),
    }
}

/// Adds subscription `id`: its filter (or durable subscription), its start, its connect
/// hooks and its feed.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    state: &AppState,
    principal: &Principal,
    conn_id: &str,
    subs: &mut HashMap<String, Sub>,
    id: String,
    filter: FilterJson,
    after: Option<u64>,
    subscription: Option<String>,
) -> Result<(ServerFrame, Change), ServerFrame> {
    if subs.contains_key(&id) {
        return Err(error(
            Some(id),
            "duplicate_id",
            "a subscription with this id is open on this connection",
        ));
    }
    if subs.len() >= state.config().limits.max_ws_subscriptions {
        return Err(error(
            Some(id),
            "too_many_subscriptions",
            "limits.max_ws_subscriptions reached",
        ));
    }
    let (filter, start, durable, advise): (Filter, _, Option<DurableRef>, _) = match &subscription {
        Some(sid) => match state.durables().get(sid).await {
            Ok(d) if !principal.may_manage(d.owner().as_deref()) => {
                return Err(error(
                    Some(id),
                    "not_owner",
                    "this durable subscription belongs to someone else",
                ));
            }
            Ok(d) => {
                let advise = d.advise();
                (
                    d.filter().clone(),
                    Some(after.map_or(d.acked(), Watermark)),
                    Some(d),
                    advise,
                )
            }
            Err(e) => return Err(error(Some(id), "subscription_not_found", e.to_string())),
        },
        None => match (
            filter.to_filter(state.config().limits.max_key_bytes),
            filter.state_advise(),
        ) {
            (Ok(f), Ok(advise)) => (f, after.map(Watermark), None, advise),
            (Err(e), _) | (_, Err(e)) => {
                return Err(error(Some(id), "invalid_field", e.to_string()));
            }
        },
    };
    if let Err(e) = state.auth().check_filter(principal, &filter) {
        let message = e.message().to_owned();
        return Err(error(Some(id), e.code(), message));
    }
    let start = match start {
        Some(w) => w,
        None => match state.delivery().head() {
            Ok(w) => w,
            Err(e) => return Err(error(Some(id), "internal", e.to_string())),
        },
    };
    let connect = Connect {
        id: format!("{conn_id}/{id}"),
        owner: owner_name(principal.owner().as_deref()).to_owned(),
        transport: Transport::WebSocket,
        target: target_of(&filter),
    };
    let delivery = state.delivery();
    let started = delivery
        .lifecycle()
        .connect(connect, None, || {
            std::future::ready(delivery.feed(filter.clone(), start))
        })
        .await;
    let (feed, live) = match started {
        Ok(started) => started,
        Err(ConnectError::Failed(FollowError::Position(ReadError::Expired {
            oldest_available,
            ..
        }))) => {
            return Err(ServerFrame::Expired {
                id,
                oldest_available: oldest_available.0,
            });
        }
        Err(ConnectError::Failed(e)) => {
            return Err(error(Some(id), "invalid_position", e.to_string()));
        }
        Err(e) => return Err(refusal(id, e)),
    };
    subs.insert(
        id.clone(),
        Sub {
            durable,
            live,
            advise,
        },
    );
    Ok((
        ServerFrame::Subscribed {
            id: id.clone(),
            after: start.0,
        },
        Change::Add(id, Box::pin(feed.into_stream())),
    ))
}
