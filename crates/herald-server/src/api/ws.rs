//! `GET /v1/ws`: WebSocket. JSON text frames; one connection carries many subscriptions,
//! added and removed by the client, each resumable from a watermark, and optionally bound to
//! a durable subscription whose acknowledgements are stored.

use std::collections::HashMap;

use crate::auth::{ConnectionPermit, Principal};
use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::response::Response;
use herald_core::{Filter, Watermark};
use herald_log::{EventLog, FollowError, Follower, ReadError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use utoipa::ToSchema;

use crate::AppState;
use crate::connections::{Lease, LiveConnection};
use crate::hooks::refused;
use crate::json::EventJson;
use crate::metrics::{ConnectionGauge, delivered};
use crate::subscriptions::FilterJson;
use crate::subscriptions::{owner_name, target_of};
use herald_core::hooks::{HookError, HookRequest, Operation};
use std::convert::Infallible;

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
        /// Comma-separated kinds (default: all).
        #[serde(default)]
        kinds: Option<String>,
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
    let id = format!("ws-{}", uuid::Uuid::new_v4().simple());
    let req = HookRequest::new(Operation::Connect, id.clone(), owner.clone(), "ws", "");
    let opened = state
        .hooks()
        .run(&req, || async {
            Ok::<_, Infallible>(state.connections().open(
                Some(id.clone()),
                "ws",
                &owner,
                "",
                Lease::Stream,
            ))
        })
        .await;
    let conn = match opened {
        Ok(conn) => conn,
        Err(HookError::Cancelled { hook, reason }) => {
            return refused(&hook, &reason).into_response();
        }
        Err(HookError::Failed(never)) => match never {},
    };
    // Dropped with the closure if the upgrade never completes: then it ends as a `close`.
    let live = LiveConnection::new(conn, req, state.clone());
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

struct Sub {
    task: JoinHandle<()>,
    durable: Option<String>,
    /// For the cancel hooks when it ends.
    req: HookRequest,
}

/// A frame on its way out: typed, or already serialized (events, whose JSON is shared by
/// every subscriber of the event).
enum Outgoing {
    Frame(ServerFrame),
    Text(String),
}

impl From<ServerFrame> for Outgoing {
    fn from(f: ServerFrame) -> Self {
        Outgoing::Frame(f)
    }
}

/// Frames waiting to go out, per connection. When full, subscription tasks wait, their hub
/// queues fill, and they resync from the log: a slow client costs reads, not events.
const OUTBOX: usize = 1024;

async fn connection(
    state: AppState,
    mut socket: WebSocket,
    principal: Principal,
    _permit: ConnectionPermit,
    mut live: LiveConnection,
) {
    let conn = live.conn();
    let _gauge = ConnectionGauge::open("websocket");
    let mut reason = "close";
    let expired = conn.expired().clone();
    // Offline, frames already queued wait here too: no delivery starts once the gate closes.
    let mut gate = state.server_state().gate();
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTBOX);
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut ping = tokio::time::interval(state.config().limits.keepalive);
    ping.reset();
    let shutdown = state.shutdown().clone();
    loop {
        let delivering = gate.is_open();
        tokio::select! {
            () = gate.changed() => {}
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    conn.renew();
                    let reply = handle(&state, &principal, conn.id(), &mut subs, &out_tx, text.as_str()).await;
                    if let Some(frame) = reply {
                        if send(&mut socket, &frame).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let frame = ServerFrame::Error { id: None, code: "binary_not_supported".into(), message: "send JSON text frames".into() };
                    if send(&mut socket, &frame).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                // Pongs and pings: the client is alive.
                Some(Ok(_)) => conn.renew(),
            },
            Some(out) = out_rx.recv(), if delivering => {
                let sent = match out {
                    Outgoing::Frame(frame) => send(&mut socket, &frame).await,
                    Outgoing::Text(text) => socket.send(Message::Text(text.into())).await,
                };
                if sent.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            () = expired.cancelled() => {
                reason = conn.end_reason();
                let why = if reason == "kick" { "closed by an operator" } else { "lease expired: no answer to pings" };
                let _ = socket.send(Message::Close(Some(CloseFrame { code: 1008, reason: why.into() }))).await;
                break;
            }
            () = shutdown.cancelled() => {
                reason = "shutdown";
                let _ = send(&mut socket, &ServerFrame::Shutdown).await;
                let _ = socket.send(Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }))).await;
                break;
            }
        }
    }
    for (_, s) in subs {
        s.task.abort();
        state.cancelled(s.req.cancel(reason, true));
    }
    live.end(reason);
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

/// Handles one client frame; returns the frame to answer with, if any.
async fn handle(
    state: &AppState,
    principal: &Principal,
    conn_id: &str,
    subs: &mut HashMap<String, Sub>,
    out: &mpsc::Sender<Outgoing>,
    text: &str,
) -> Option<ServerFrame> {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Some(error(None, "invalid_frame", e.to_string())),
    };
    match frame {
        ClientFrame::Subscribe {
            id,
            key,
            subtree,
            kinds,
            after,
            subscription,
        } => {
            if subs.contains_key(&id) {
                return Some(error(
                    Some(id),
                    "duplicate_id",
                    "a subscription with this id is open on this connection",
                ));
            }
            if subs.len() >= state.config().limits.max_ws_subscriptions {
                return Some(error(
                    Some(id),
                    "too_many_subscriptions",
                    "limits.max_ws_subscriptions reached",
                ));
            }
            let (filter, start): (Filter, Option<Watermark>) = match &subscription {
                Some(sid) => match state.durables().get(sid) {
                    Ok(d) if !principal.may_manage(d.owner().as_deref()) => {
                        return Some(error(
                            Some(id),
                            "not_owner",
                            "this durable subscription belongs to someone else",
                        ));
                    }
                    Ok(d) => (d.filter().clone(), Some(after.map_or(d.acked(), Watermark))),
                    Err(e) => {
                        return Some(error(Some(id), "subscription_not_found", e.to_string()));
                    }
                },
                None => match (FilterJson {
                    key,
                    subtree,
                    kinds,
                })
                .to_filter(state.config().limits.max_key_bytes)
                {
                    Ok(f) => (f, after.map(Watermark)),
                    Err(e) => return Some(error(Some(id), "invalid_field", e.to_string())),
                },
            };
            if let Err(e) = state.auth().check_filter(principal, &filter) {
                let message = e.message().to_owned();
                return Some(error(Some(id), e.code(), message));
            }
            let start = match start {
                Some(w) => w,
                None => match state.log().bounds() {
                    Ok(b) => b.last,
                    Err(e) => return Some(error(Some(id), "internal", e.to_string())),
                },
            };
            let req = HookRequest::new(
                Operation::Connect,
                format!("{conn_id}/{id}"),
                owner_name(principal.owner().as_deref()),
                "ws",
                target_of(&filter),
            );
            let started = state
                .hooks()
                .run(&req, || {
                    std::future::ready(state.follow(filter.clone(), start))
                })
                .await;
            let follower = match started {
                Ok(f) => f,
                Err(HookError::Cancelled { hook, reason }) => {
                    return Some(error(
                        Some(id),
                        "refused_by_hook",
                        format!("{hook}: {reason}"),
                    ));
                }
                Err(HookError::Failed(FollowError::Position(ReadError::Expired {
                    oldest_available,
                    ..
                }))) => {
                    return Some(ServerFrame::Expired {
                        id,
                        oldest_available: oldest_available.0,
                    });
                }
                Err(HookError::Failed(e)) => {
                    return Some(error(Some(id), "invalid_position", e.to_string()));
                }
            };
            // Announce before the task can send events.
            if out
                .send(Outgoing::Frame(ServerFrame::Subscribed {
                    id: id.clone(),
                    after: start.0,
                }))
                .await
                .is_err()
            {
                return None;
            }
            let task = tokio::spawn(forward(id.clone(), follower, out.clone(), state.clone()));
            subs.insert(
                id,
                Sub {
                    task,
                    durable: subscription,
                    req,
                },
            );
            None
        }
        ClientFrame::Unsubscribe { id } => match subs.get(&id) {
            Some(s) => {
                let req = s.req.clone().cancel("unsubscribe", false);
                let ended = state
                    .hooks()
                    .run(&req, || {
                        if let Some(s) = subs.remove(&id) {
                            s.task.abort();
                        }
                        std::future::ready(Ok::<_, Infallible>(()))
                    })
                    .await;
                match ended {
                    Ok(()) => Some(ServerFrame::Unsubscribed { id }),
                    Err(HookError::Cancelled { hook, reason }) => Some(error(
                        Some(id),
                        "refused_by_hook",
                        format!("{hook}: {reason}"),
                    )),
                    Err(HookError::Failed(never)) => match never {},
                }
            }
            None => Some(error(
                Some(id),
                "unknown_id",
                "no subscription with this id on this connection",
            )),
        },
        ClientFrame::Ack { id, watermark } => match subs.get(&id) {
            None => Some(error(
                Some(id),
                "unknown_id",
                "no subscription with this id on this connection",
            )),
            Some(Sub {
                durable: Some(d), ..
            }) => match state
                .durables()
                .fetch(d, Some(Watermark(watermark)), 0)
                .await
            {
                Ok(_) => Some(ServerFrame::Acked { id, watermark }),
                Err(e) => Some(error(Some(id), "ack_failed", e.to_string())),
            },
            Some(Sub { durable: None, .. }) => Some(ServerFrame::Acked { id, watermark }),
        },
    }
}

/// Sends a subscription's events to the connection until it ends.
async fn forward(
    id: String,
    mut follower: Follower<herald_log::EmbeddedLog>,
    out: mpsc::Sender<Outgoing>,
    state: AppState,
) {
    loop {
        match follower.next().await {
            Ok(batch) => {
                for n in batch.iter() {
                    delivered("websocket", n);
                    let text = state.frames().ws_event(&id, n);
                    if out.send(Outgoing::Text(text)).await.is_err() {
                        return;
                    }
                }
            }
            Err(FollowError::Position(ReadError::Expired {
                oldest_available, ..
            })) => {
                let frame = ServerFrame::Expired {
                    id,
                    oldest_available: oldest_available.0,
                };
                let _ = out.send(frame.into()).await;
                return;
            }
            Err(e) => {
                let _ = out
                    .send(error(Some(id), "stream_ended", e.to_string()).into())
                    .await;
                return;
            }
        }
    }
}
