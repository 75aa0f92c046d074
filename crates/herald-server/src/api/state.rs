//! The server's state and its clients' connections: `GET`/`PUT /v1/state`, advise on state
//! changes with `GET /v1/state/advise` (a Server-Sent Events stream of `start`, `change` and
//! `done`), `DELETE /v1/state/advise/{token}`, and `GET /v1/connections`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::offline::{self, AdviseError, SetStateError};
use herald_core::{
    ConnectionStateChange, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE, StateChangePhase,
};
use herald_delivery::{Advice, ConnectError, ConnectionInfo, state_name};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, JsonQuery};
use crate::frames::{SSE_KEEPALIVE, sse_named};
use herald_core::hooks::{HookRequest, Operation};

/// A connection as `GET /v1/connections` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionView {
    /// Its id (for a subscription, the subscription's id).
    pub id: String,
    /// Who holds it.
    pub owner: String,
    /// `sse`, `ws`, `poll`, `udp`, `webhook`, `ews`, `mapi`.
    pub transport: String,
    /// What it follows (a key, a subtree, or a mailbox).
    pub target: String,
    /// `online` or `offline`.
    pub state: String,
    /// The key its presence events are published on.
    pub presence_key: String,
    /// When it opened, microseconds since the Unix epoch.
    pub opened_at: u64,
    /// When its state last changed, microseconds since the Unix epoch.
    pub state_since: u64,
    /// Milliseconds since the client was last heard from.
    pub idle_ms: u64,
    /// How it proves it is alive: `stream` (closed when its lease runs out), `session`
    /// (offline when it runs out, online again when heard from) or `none` (Herald calls it).
    pub lease: String,
    /// Milliseconds left before its lease runs out; absent for `none` and while it is being
    /// served (a long-poll wait holds its lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
}

impl From<ConnectionInfo> for ConnectionView {
    fn from(c: ConnectionInfo) -> Self {
        ConnectionView {
            id: c.id,
            owner: c.owner,
            transport: c.transport.as_str().to_owned(),
            target: c.target,
            state: if c.online { "online" } else { "offline" }.to_owned(),
            presence_key: c.presence_key.to_string(),
            opened_at: c.opened_at,
            state_since: c.state_since,
            idle_ms: c.idle.as_millis() as u64,
            lease: c.lease.as_str().to_owned(),
            lease_left_ms: c.lease_left.map(|d| d.as_millis() as u64),
        }
    }
}

/// The server's state.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct StateView {
    /// `online` or `offline`.
    pub state: String,
    /// Whether a transition is running (a change now is refused as `pending`).
    pub transitioning: bool,
    /// `MAPIOFFLINE_CAPABILITY_*` bits: 0x1 offline, 0x2 online.
    pub capabilities: u32,
    /// Clients advised on state changes.
    pub advised: usize,
}

/// A state change.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetState {
    /// `online` or `offline`.
    #[schema(value_type = String, pattern = "^(online|offline)$")]
    pub state: String,
    /// Answer only when the transition is done (`MAPIOFFLINE_FLAG_BLOCK`); by default the
    /// call returns at once with 202.
    #[serde(default)]
    pub block: bool,
}

fn view(state: &AppState) -> StateView {
    let engine = state.delivery().state().engine();
    StateView {
        state: state_name(engine.current_state()).into(),
        transitioning: engine.is_transitioning(),
        capabilities: engine.capabilities(),
        advised: engine.advised(),
    }
}

/// The server's state.
#[utoipa::path(get, path = "/v1/state", tag = "operate", responses((status = 200, body = StateView)))]
pub(super) async fn get_state(State(state): State<AppState>) -> Json<StateView> {
    Json(view(&state))
}

/// Takes the server online or offline. Offline, events are still accepted and logged, but
/// nothing is delivered; online, every subscriber resumes where it was.
#[utoipa::path(
    put, path = "/v1/state", tag = "operate", request_body = SetState,
    responses(
        (status = 200, description = "Done (with `block`), or already in that state", body = StateView),
        (status = 202, description = "Started; watch `GET /v1/state/advise` or poll `GET /v1/state`", body = StateView),
        (status = 400, description = "Not `online` or `offline`", body = crate::error::ErrorBody),
        (status = 403, description = "This needs an API key", body = crate::error::ErrorBody),
        (status = 409, description = "`pending`: a transition is running (E_PENDING)", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn put_state(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<SetState>, JsonRejection>,
) -> Result<Response, ApiError> {
    state.auth().require_admin(&principal)?;
    let Json(req) = body.map_err(|e| ApiError::field("body", e.body_text()))?;
    let target = match req.state.as_str() {
        "online" => STATE_ONLINE,
        "offline" => STATE_OFFLINE,
        other => {
            return Err(ApiError::field(
                "state",
                format!("{other:?} is not a state: online or offline"),
            ));
        }
    };
    let engine = state.delivery().state().engine().clone();
    let unchanged = engine.current_state() == target && !engine.is_transitioning();
    let flags = if req.block {
        offline::FLAG_BLOCK
    } else {
        offline::FLAG_DEFAULT
    };
    let result = if req.block {
        // The transition runs on this thread until DONE: keep it off the runtime's workers.
        tokio::task::spawn_blocking(move || {
            engine.set_current_state(flags, STATE_OFFLINE_MASK, target)
        })
        .await
        .map_err(ApiError::internal)?
    } else {
        engine.set_current_state(flags, STATE_OFFLINE_MASK, target)
    };
    match result {
        Ok(()) => {
            let status = if req.block || unchanged {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok((status, Json(view(&state))).into_response())
        }
        Err(SetStateError::Pending) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "pending",
            "a state transition is in progress (E_PENDING 0x8000000A); try again when it is done",
        )),
        Err(e) => Err(ApiError::field("state", e.to_string())),
    }
}

/// How to advise.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AdviseQuery {
    /// The client's token, echoed in every notification (default 0).
    token: Option<u32>,
    /// The state mask: decimal or `0x` hex, within `0x003f037f` (default: all of it).
    mask: Option<String>,
    /// `MAPIOFFLINE_CALLBACK_TYPE`: must be 0 (notify).
    callback_type: Option<u32>,
    /// `MAPIOFFLINE_ADVISE_TYPE`: must be 1 (state change).
    advise_types: Option<u32>,
    /// An API key or token, for clients that cannot send an Authorization header.
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// One notification as the advise stream sends it.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct StateNotification {
    /// `MAPIOFFLINE_NOTIFY_TYPE`: 1 start, 2 change, 3 done.
    pub notify_type: u32,
    /// The token given at advise.
    pub client_token: u32,
    /// What changed: 0x3, the online/offline bits.
    pub mask: u32,
    /// The state before (1 offline, 2 online).
    pub old_state: u32,
    /// The state after.
    pub new_state: u32,
    /// `online` or `offline`.
    pub old: String,
    /// `online` or `offline`.
    pub new: String,
}

/// Notifications a slow advise client may have waiting; past that its stream ends with an
/// `overflow` event.
const ADVISE_QUEUE: usize = 64;

/// Advises on the server's state changes: a Server-Sent Events stream whose first event,
/// `advised`, carries the advise token; then `start`, `change` and `done` for each
/// transition. Closing the stream unadvises.
#[utoipa::path(
    get, path = "/v1/state/advise", tag = "operate", params(AdviseQuery),
    responses(
        (status = 200, description = "`text/event-stream`: `advised`, then `start`/`change`/`done` events carrying StateNotification JSON", content_type = "text/event-stream"),
        (status = 400, description = "`invalid_arg` (E_INVALIDARG) or `no_interface` (E_NOINTERFACE)", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn advise(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonQuery(q): JsonQuery<AdviseQuery>,
) -> Result<Response, ApiError> {
    let mask = match q.mask.as_deref() {
        None => offline::STATE_ALL,
        Some(m) => crate::json::parse_number(m)
            .ok_or_else(|| ApiError::field("mask", "a number, decimal or 0x hex"))?,
    };
    let server = state.delivery().state();
    let client_token = q.token.unwrap_or(0);
    let advised = server
        .advise(
            principal.owner(),
            client_token,
            q.callback_type.unwrap_or(offline::CALLBACK_TYPE_NOTIFY),
            q.advise_types.unwrap_or(offline::ADVISE_TYPE_STATECHANGE),
            mask,
            ADVISE_QUEUE,
        )
        .map_err(|e| {
            let code = match e {
                AdviseError::NoInterface => "no_interface",
                _ => "invalid_arg",
            };
            ApiError::new(
                StatusCode::BAD_REQUEST,
                code,
                format!("{e} (HRESULT {:#010x})", e.hresult()),
            )
        })?;
    let token = advised.token();
    let first = sse_named(
        "advised",
        &serde_json::json!({"advise_token": token, "client_token": client_token, "state": state_name(server.engine().current_state())}),
    );
    let keepalive = state.config().limits.keepalive;
    let shutdown = state.shutdown().clone();
    struct Advising {
        first: Option<Bytes>,
        advised: herald_delivery::AdviseStream,
        done: bool,
    }
    let start = Advising {
        first: Some(first),
        advised,
        done: false,
    };
    let body = futures_util::stream::unfold(start, move |mut s| {
        let shutdown = shutdown.clone();
        async move {
            if let Some(f) = s.first.take() {
                return Some((Ok::<Bytes, Infallible>(f), s));
            }
            if s.done {
                return None;
            }
            let chunk = tokio::select! {
                n = s.advised.next() => match n? {
                    Advice::Notification(n) => notification(&n),
                    Advice::Overflow => {
                        s.done = true;
                        sse_named("overflow", &serde_json::json!({
                            "code": "overflow",
                            "message": "this client did not read its notifications and may have missed some; read GET /v1/state and advise again",
                        }))
                    }
                },
                () = tokio::time::sleep(keepalive) => Bytes::from_static(SSE_KEEPALIVE),
                () = shutdown.cancelled() => {
                    s.done = true;
                    sse_named("shutdown", &serde_json::json!({"code": "shutdown"}))
                }
            };
            Some((Ok(chunk), s))
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::HeaderName::from_static("herald-advise-token"),
                &token.to_string(),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

fn notification(n: &ConnectionStateChange) -> Bytes {
    let name = match n.phase {
        StateChangePhase::Start => "start",
        StateChangePhase::Change => "change",
        StateChangePhase::Done => "done",
    };
    let body = StateNotification {
        notify_type: n.phase as u32,
        client_token: n.client_token,
        mask: n.changed_mask,
        old_state: n.old_state,
        new_state: n.new_state,
        old: state_name(n.old_state).into(),
        new: state_name(n.new_state).into(),
    };
    sse_named(name, &serde_json::to_value(body).unwrap_or_default())
}

/// Stops the notifications of an advise token. Always succeeds (`IMAPIOfflineMgr::Unadvise`
/// returns S_OK for any token); a subscriber token unadvises only what it advised.
#[utoipa::path(
    delete, path = "/v1/state/advise/{token}", tag = "operate",
    params(("token" = String, Path, description = "The advise token (any value: unadvising always succeeds, as IMAPIOfflineMgr::Unadvise does)")),
    responses((status = 204, description = "Unadvised"))
)]
pub(super) async fn unadvise(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(token): Path<String>,
) -> StatusCode {
    if let Ok(t) = token.parse::<u32>() {
        state
            .delivery()
            .state()
            .unadvise_if(t, |owner| principal.may_manage(owner));
    }
    StatusCode::NO_CONTENT
}

/// Which connections.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConnectionsQuery {
    /// Only this owner's (a token sees only its own).
    owner: Option<String>,
    /// Only this transport's.
    transport: Option<String>,
    /// Only `online` or `offline` ones.
    state: Option<String>,
    /// Only those whose id, owner or target contains this (ignoring case).
    search: Option<String>,
    /// At most this many, sorted by id (default and most: 10,000); `x-total-count` says how
    /// many matched.
    limit: Option<usize>,
}

/// The client connections Herald serves, with their state.
#[utoipa::path(
    get, path = "/v1/connections", tag = "operate", params(ConnectionsQuery),
    responses((status = 200, body = Vec<ConnectionView>, headers(("x-total-count" = u64, description = "How many matched before `limit`"))))
)]
pub(super) async fn connections(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonQuery(q): JsonQuery<ConnectionsQuery>,
) -> Response {
    let owner = match &principal {
        Principal::Token(c) => Some(c.sub.clone()),
        Principal::Open | Principal::Key(_) => q.owner,
    };
    let mut list: Vec<ConnectionView> = state
        .delivery()
        .connections()
        .list(owner.as_deref())
        .into_iter()
        .map(ConnectionView::from)
        .collect();
    list.retain(|c| {
        q.transport.as_deref().is_none_or(|t| c.transport == t)
            && q.state.as_deref().is_none_or(|s| c.state == s)
            && super::matches_search(q.search.as_deref(), &[&c.id, &c.owner, &c.target])
    });
    let total = list.len();
    list.truncate(super::limit(q.limit));
    super::listing(list, total)
}

/// Closes a client's stream or session (a kick). Hooks hear it as a cancel, and may refuse
/// it. Durable subscriptions are not kicked: delete them.
#[utoipa::path(
    delete, path = "/v1/connections/{id}", tag = "operate",
    params(("id" = String, Path, description = "The connection id")),
    responses(
        (status = 204, description = "Kicked: the client is told and the connection closes"),
        (status = 403, description = "This needs an API key, or a hook refused", body = crate::error::ErrorBody),
        (status = 404, description = "No such connection", body = crate::error::ErrorBody),
        (status = 409, description = "A durable subscription's connection: delete the subscription instead", body = crate::error::ErrorBody),
    )
)]
pub(super) async fn kick(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.auth().require_admin(&principal)?;
    let Some(view) = state.delivery().connections().get(&id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no connection {id:?}"),
        ));
    };
    if view.transport.is_durable() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "durable",
            format!("{id} is a durable subscription: DELETE /v1/subscriptions/{id} ends it"),
        ));
    }
    let req = HookRequest::new(
        Operation::Cancel,
        id.clone(),
        view.owner,
        view.transport.as_str(),
        view.target,
    )
    .cancel("kick", false);
    state
        .delivery()
        .lifecycle()
        .run(&req, || {
            // A MAPI session or an EWS subscription ends with its session; a stream is told
            // to close.
            let kicked = state.mapi().kick(&id)
                || state.ews().kick(&id)
                || state.delivery().connections().kick(&id);
            std::future::ready(if kicked {
                Ok(())
            } else {
                Err("the connection closed before the kick")
            })
        })
        .await
        .map_err(|e| match e {
            ConnectError::Failed(why) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{id}: {why}"))
            }
            other => crate::hooks::api_error(other.map_failed(ApiError::internal)),
        })?;
    Ok(StatusCode::NO_CONTENT)
}
