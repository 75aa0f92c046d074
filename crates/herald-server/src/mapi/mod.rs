//! `POST /mapi/emsmdb/`: the notification subset of MAPI over HTTP (MS-OXCMAPIHTTP).
//!
//! `Connect` creates a session (cookie `MapiContext`); `Execute` runs RopLogon,
//! RopOpenFolder, RopRegisterNotification and RopRelease and appends pending RopNotify (as
//! many as fit, in order, then RopPending); `NotificationWait` is a long poll that completes
//! when something is pending or at the notification timer; `PING` refreshes the session;
//! `Disconnect` ends it. Each session follows the log for its mailbox, so notifications come
//! in log order and none is dropped: a full queue stops the session reading until the client
//! fetches.

pub mod map;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::hooks::{HookError, HookRequest, Operation};
use herald_core::{AsyncWait, EventMask, Filter, Key, Scope, Watermark};
use herald_log::EventLog;
use herald_rop::mapihttp::{
    self, ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse,
    NotificationWaitResponse,
};
use herald_rop::{
    LogonSuccess, NotificationScope, OpenFolderSuccess, RopBuffer, RopNotify, RopRequest,
    RopResponse, TypesWidth, decode_requests, ec,
};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::connections::{BusyGuard, Conn, Lease};
use crate::subscriptions::owner_name;
use map::KnownFolders;

/// X-ResponseCode values (MS-OXCMAPIHTTP 2.2.3.3.3).
mod code {
    pub(super) const INVALID_REQUEST_TYPE: u32 = 5;
    pub(super) const MISSING_HEADER: u32 = 7;
    pub(super) const ANONYMOUS_NOT_ALLOWED: u32 = 8;
    pub(super) const CONTEXT_NOT_FOUND: u32 = 10;
    pub(super) const INVALID_REQUEST_BODY: u32 = 12;
    pub(super) const MISSING_COOKIE: u32 = 13;
    pub(super) const INVALID_SEQUENCE: u32 = 15;
    pub(super) const SHUTTING_DOWN: u32 = 18;
}

/// The cookie naming a session.
const COOKIE: &str = "MapiContext";
/// What Herald says it is.
const SERVER_APPLICATION: &str = "Exchange/15.00.0847.4040";
/// ecLoginPerm: Connect to a mailbox that is not the user's.
const LOGIN_PERM: u32 = 0x0000_03F2;

/// A handle's object.
#[derive(Clone, Debug)]
enum Object {
    Logon { logon_id: u8 },
    Folder { logon_id: u8 },
    Subscription { logon_id: u8 },
}

/// A registered subscription.
#[derive(Clone, Debug)]
struct Subscription {
    logon_id: u8,
    types: u16,
    scope: NotificationScope,
    /// Events at or before this watermark predate the registration.
    after: Watermark,
}

#[derive(Default)]
struct Objects {
    next_handle: u32,
    objects: HashMap<u32, Object>,
    subscriptions: HashMap<u32, Subscription>,
    /// RopNotify bytes with their subscription handle, in log order.
    queue: VecDeque<(u32, Vec<u8>)>,
}

/// A MAPI/HTTP session.
pub struct Session {
    owner: Option<String>,
    mailbox: String,
    index: u16,
    objects: Mutex<Objects>,
    wait: Arc<AsyncWait>,
    last_used: Mutex<Instant>,
    busy: AtomicBool,
    /// Woken when the client drained the queue (the log reader waits on it when full).
    drained: tokio::sync::Notify,
    stop: CancellationToken,
    /// A UDP push target: address and opaque context.
    udp: Mutex<Option<(std::net::SocketAddr, Vec<u8>)>>,
    /// Whether the UDP repeat task is running.
    udp_running: AtomicBool,
    /// Its presence; taken (published offline) when the session ends.
    conn: Mutex<Option<Conn>>,
    /// What its connect hooks were told; its cancel hooks get the same.
    hook: HookRequest,
}

impl Session {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if let Some(c) = self.conn().as_ref() {
            c.renew();
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy(&self) -> Option<BusyGuard> {
        self.conn().as_ref().map(|c| c.busy())
    }

    /// The hook request for ending it.
    pub fn cancel_request(&self, reason: &str, forced: bool) -> HookRequest {
        self.hook.clone().cancel(reason, forced)
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every MAPI/HTTP session of this server.
#[derive(Default)]
pub struct Mapi {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    known: KnownFolders,
    next_index: AtomicU16,
}

impl Mapi {
    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let s = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(s) = &s {
            s.stop.cancel();
            s.wait.close();
            s.conn().take();
        }
        s
    }

    /// Ends the session whose connection id is `conn_id` (`mapi-<session>`), as an
    /// operator's kick; returns whether there was one.
    pub fn kick(&self, conn_id: &str) -> bool {
        conn_id
            .strip_prefix("mapi-")
            .and_then(|id| self.remove(id))
            .is_some()
    }

    /// Destroys sessions idle for longer than `idle` (a session with a NotificationWait open
    /// is not idle). Returns them.
    pub fn expire(&self, idle: Duration) -> Vec<Arc<Session>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        sessions.retain(|_, s| {
            let quiet = s
                .last_used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            let keep = quiet <= idle || s.wait.is_waiting();
            if !keep {
                s.stop.cancel();
                s.wait.close();
                s.conn().take();
                gone.push(s.clone());
            }
            keep
        });
        gone
    }

    /// Ends every session (at shutdown): outstanding waits complete with ecExiting. Returns
    /// the sessions, which end with the process.
    pub fn stop_all(&self) -> Vec<Arc<Session>> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for s in sessions.values() {
            s.stop.cancel();
            s.wait.close();
        }
        sessions.values().cloned().collect()
    }
}

/// The echoed request headers and the session's timers, for every response.
struct Echo {
    request_type: String,
    request_id: Option<HeaderValue>,
    client_info: Option<HeaderValue>,
    expiration_ms: u128,
    pending_ms: u128,
}

impl Echo {
    fn headers(&self, response_code: u32, content_type: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) = HeaderValue::from_str(&self.request_type) {
            h.insert("x-requesttype", v);
        }
        if let Some(v) = &self.request_id {
            h.insert("x-requestid", v.clone());
        }
        if let Some(v) = &self.client_info {
            h.insert("x-clientinfo", v.clone());
        }
        h.insert("x-responsecode", HeaderValue::from(response_code));
        h.insert(
            "x-serverapplication",
            HeaderValue::from_static(SERVER_APPLICATION),
        );
        h.insert(
            "x-expirationinfo",
            HeaderValue::from_str(&self.expiration_ms.to_string()).unwrap_or(HeaderValue::from(0)),
        );
        h.insert(
            "x-pendingperiod",
            HeaderValue::from_str(&self.pending_ms.to_string()).unwrap_or(HeaderValue::from(0)),
        );
        h
    }

    /// A transport-level failure: non-zero X-ResponseCode and a diagnostic HTML body.
    fn fail(&self, response_code: u32, why: &str) -> Response {
        let body = format!(
            "<html><head><title>MAPI/HTTP error {response_code}</title></head><body>{}</body></html>",
            why.replace('<', "&lt;")
        );
        (
            StatusCode::OK,
            self.headers(response_code, "text/html"),
            body,
        )
            .into_response()
    }

    /// A complete response stream: PROCESSING, DONE, the additional headers, the body.
    fn done(&self, body: &[u8], started: Instant, set_cookie: Option<HeaderValue>) -> Response {
        let mut out = mapihttp::PROCESSING.to_vec();
        out.extend(mapihttp::done(
            0,
            started.elapsed().as_millis() as u64,
            &httpdate::fmt_http_date(std::time::SystemTime::now()),
            body,
        ));
        let mut h = self.headers(0, "application/mapi-http");
        if let Some(cookie) = set_cookie {
            h.insert(header::SET_COOKIE, cookie);
        }
        (StatusCode::OK, h, out).into_response()
    }
}

/// The mailbox a request names in `?MailboxId=`.
fn mailbox_id(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case("mailboxid"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}

/// The endpoint.
pub async fn handle(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let config = &state.config().mapi;
    let echo = Echo {
        request_type: headers
            .get("x-requesttype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        request_id: headers.get("x-requestid").cloned(),
        client_info: headers.get("x-clientinfo").cloned(),
        expiration_ms: config.session_idle.as_millis(),
        pending_ms: config.pending_period.as_millis(),
    };
    if echo.request_type.is_empty() {
        return echo.fail(code::MISSING_HEADER, "X-RequestType is missing");
    }
    if state.shutdown().is_cancelled() {
        return echo.fail(code::SHUTTING_DOWN, "the server is shutting down");
    }
    let user = match state.auth().basic_user(&headers) {
        Ok(u) => u,
        Err(challenge) => return challenge.into_response(),
    };
    let request_type = echo.request_type.to_ascii_lowercase();
    match request_type.as_str() {
        "connect" => {
            connect(
                &state,
                &echo,
                user,
                query.as_deref(),
                &headers,
                &body,
                started,
            )
            .await
        }
        "execute" | "notificationwait" | "disconnect" | "ping" | "registerpushnotification" => {
            let Some(id) = crate::auth::cookie(&headers, COOKIE) else {
                return echo.fail(code::MISSING_COOKIE, "the MapiContext cookie is missing");
            };
            let Some(session) = state.mapi().get(&id) else {
                return echo.fail(
                    code::CONTEXT_NOT_FOUND,
                    "no such session (expired or ended)",
                );
            };
            if session.owner != user {
                return echo.fail(
                    code::CONTEXT_NOT_FOUND,
                    "the session belongs to another user",
                );
            }
            session.touch();
            match request_type.as_str() {
                "execute" => execute(&state, &echo, &session, &body, started),
                "notificationwait" => notification_wait(&state, echo, session, &body),
                "registerpushnotification" => {
                    register_push(&state, &echo, &session, &body, started)
                }
                "disconnect" => {
                    if mapihttp::decode_disconnect_request(&body).is_err() {
                        return echo.fail(
                            code::INVALID_REQUEST_BODY,
                            "the Disconnect body is malformed",
                        );
                    }
                    let req = session.cancel_request("unsubscribe", false);
                    let ended = state
                        .hooks()
                        .run(&req, || {
                            state.mapi().remove(&id);
                            std::future::ready(Ok::<_, String>(()))
                        })
                        .await;
                    match ended {
                        Ok(()) => echo.done(
                            &mapihttp::status_error_body(0),
                            started,
                            Some(expired_cookie()),
                        ),
                        Err(e) => {
                            tracing::info!(reason = %refusal(e), "a hook refused a MAPI Disconnect");
                            echo.done(
                                &mapihttp::status_error_body(ec::ACCESS_DENIED),
                                started,
                                None,
                            )
                        }
                    }
                }
                _ => echo.done(&[], started, None),
            }
        }
        "anonymous" => echo.fail(
            code::ANONYMOUS_NOT_ALLOWED,
            "anonymous requests are not allowed",
        ),
        _ => echo.fail(
            code::INVALID_REQUEST_TYPE,
            "X-RequestType is not one this endpoint serves",
        ),
    }
}

fn expired_cookie() -> HeaderValue {
    HeaderValue::from_static("MapiContext=; Path=/mapi/; Max-Age=0; HttpOnly")
}

/// The text of a refusal by a hook.
fn refusal(e: HookError<String>) -> String {
    match e {
        HookError::Cancelled { hook, reason } => format!("refused by {hook}: {reason}"),
        HookError::Failed(e) => e,
    }
}

async fn connect(
    state: &AppState,
    echo: &Echo,
    user: Option<String>,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Response {
    let Ok(req) = ConnectRequest::decode(body) else {
        return echo.fail(code::INVALID_REQUEST_BODY, "the Connect body is malformed");
    };
    // A reconnect carries the old cookie: that session ends.
    if let Some(old) = crate::auth::cookie(headers, COOKIE) {
        if state.mapi().get(&old).is_some_and(|s| s.owner == user) {
            if let Some(s) = state.mapi().remove(&old) {
                state.cancelled(s.cancel_request("replaced", true));
            }
        }
    }
    let mailbox = mailbox_id(query).or_else(|| user.clone());
    let refuse = |error_code| {
        let body = ConnectResponse {
            error_code,
            ..Default::default()
        }
        .encode()
        .unwrap_or_default();
        echo.done(&body, started, None)
    };
    let Some(mailbox) = mailbox else {
        return refuse(ec::LOGIN_FAILURE);
    };
    if user
        .as_ref()
        .is_some_and(|u| !u.eq_ignore_ascii_case(&mailbox))
    {
        return refuse(LOGIN_PERM);
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let owner = owner_name(user.as_deref()).to_owned();
    let hook = HookRequest::new(
        Operation::Connect,
        format!("mapi-{id}"),
        owner.clone(),
        "mapi",
        format!("{mailbox}/"),
    );
    let session = Arc::new(Session {
        owner: user.clone(),
        mailbox: mailbox.clone(),
        index: state.mapi().next_index.fetch_add(1, Ordering::Relaxed),
        objects: Mutex::default(),
        wait: AsyncWait::new(),
        last_used: Mutex::new(Instant::now()),
        busy: AtomicBool::new(false),
        drained: tokio::sync::Notify::new(),
        stop: CancellationToken::new(),
        udp: Mutex::new(None),
        udp_running: AtomicBool::new(false),
        conn: Mutex::new(None),
        hook: hook.clone(),
    });
    let start = state.log().bounds().map_or(Watermark(0), |b| b.last);
    let made = state
        .hooks()
        .run(&hook, || {
            let made = spawn_reader(state, session.clone(), start).map(|()| {
                *session.conn() = Some(state.connections().open(
                    Some(hook.connection.clone()),
                    "mapi",
                    &owner,
                    &hook.target,
                    Lease::Session,
                ));
                state
                    .mapi()
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), session.clone());
            });
            std::future::ready(made)
        })
        .await;
    match made {
        Ok(()) => {}
        Err(e @ HookError::Cancelled { .. }) => {
            tracing::info!(reason = %refusal(e), %mailbox, "a hook refused a MAPI Connect");
            return refuse(ec::ACCESS_DENIED);
        }
        Err(e) => {
            tracing::warn!(error = %refusal(e), "a MAPI session cannot follow the log");
            return refuse(ec::LOGIN_FAILURE);
        }
    }
    tracing::debug!(%mailbox, user_dn = %req.user_dn, "MAPI session connected");
    let body = ConnectResponse {
        error_code: 0,
        polls_max: 60_000,
        retry_count: 6,
        retry_delay: 10_000,
        dn_prefix: String::new(),
        display_name: user.unwrap_or(mailbox),
    }
    .encode()
    .unwrap_or_default();
    let cookie = HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/mapi/; HttpOnly"))
        .unwrap_or_else(|_| expired_cookie());
    echo.done(&body, started, Some(cookie))
}

/// Follows the log for the session's mailbox and queues a RopNotify per matching
/// subscription.
fn spawn_reader(state: &AppState, session: Arc<Session>, start: Watermark) -> Result<(), String> {
    let filter = Filter {
        scope: Scope::Subtree(Key::from(session.mailbox.as_str())),
        mask: EventMask::ALL,
    };
    let mut follower = state.follow(filter, start).map_err(|e| e.to_string())?;
    let state = state.clone();
    let max_queue = state.config().mapi.max_queue.max(1);
    tokio::spawn(async move {
        loop {
            // Back-pressure, not loss: wait for the client to fetch.
            loop {
                let drained = session.drained.notified();
                if session.objects().queue.len() < max_queue {
                    break;
                }
                tokio::select! {
                    () = drained => {}
                    () = session.stop.cancelled() => return,
                }
            }
            let batch = tokio::select! {
                b = follower.next() => b,
                () = session.stop.cancelled() => return,
            };
            let Ok(batch) = batch else {
                tracing::warn!("a MAPI session stopped following the log");
                return;
            };
            let mut queued = false;
            for n in batch.events() {
                let Some(data) = map::to_notification_data(n, &state.mapi().known) else {
                    continue;
                };
                let w = n.watermark.unwrap_or(Watermark(u64::MAX));
                let mut objects = session.objects();
                let mut matching: Vec<(u32, u8)> = objects
                    .subscriptions
                    .iter()
                    .filter(|(_, s)| {
                        w > s.after
                            && s.types & (data.kind as u16) != 0
                            && in_scope(&s.scope, &data)
                    })
                    .map(|(h, s)| (*h, s.logon_id))
                    .collect();
                matching.sort_unstable();
                for (handle, logon_id) in matching {
                    let notify = RopNotify {
                        handle,
                        logon_id,
                        data: data.clone(),
                    };
                    match notify.to_bytes() {
                        Ok(bytes) => {
                            objects.queue.push_back((handle, bytes));
                            queued = true;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "an event did not encode as RopNotify")
                        }
                    }
                }
            }
            if queued {
                session.wait.set_pending();
                udp_push(&state, &session);
            }
        }
    });
    Ok(())
}

fn in_scope(scope: &NotificationScope, d: &herald_rop::NotificationData) -> bool {
    match *scope {
        NotificationScope::WholeStore => true,
        NotificationScope::Folder(fid) => [
            d.folder_id,
            d.parent_folder_id,
            d.old_folder_id,
            d.old_parent_folder_id,
        ]
        .contains(&Some(fid)),
        NotificationScope::Message(_, mid) => {
            d.message_id == Some(mid) || d.old_message_id == Some(mid)
        }
    }
}

/// While notifications stay unfetched, sends the session's registered context to its UDP
/// address at once and every `mapi.udp_repeat`; stops once everything is fetched.
fn udp_push(state: &AppState, session: &Arc<Session>) {
    let Some((addr, context)) = session
        .udp
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    else {
        return;
    };
    if session.udp_running.swap(true, Ordering::AcqRel) {
        return;
    }
    let repeat = state.config().mapi.udp_repeat;
    let session = session.clone();
    let mut gate = state.server_state().gate();
    tokio::spawn(async move {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = match tokio::net::UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no UDP socket for push notifications");
                session.udp_running.store(false, Ordering::Release);
                return;
            }
        };
        loop {
            while !session.objects().queue.is_empty() && !session.stop.is_cancelled() {
                // Offline, no nudges either.
                tokio::select! {
                    () = gate.opened() => {}
                    () = session.stop.cancelled() => continue,
                }
                if let Err(e) = socket.send_to(&context, addr).await {
                    tracing::debug!(error = %e, %addr, "UDP push failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(repeat) => {}
                    () = session.stop.cancelled() => {}
                }
            }
            session.udp_running.store(false, Ordering::Release);
            // Events queued while this task was ending: carry on unless another task did.
            if session.objects().queue.is_empty()
                || session.stop.is_cancelled()
                || session.udp_running.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
    });
}

/// Herald's `RegisterPushNotification` request: EcRRegisterPushNotification for MAPI/HTTP.
fn register_push(
    state: &AppState,
    echo: &Echo,
    session: &Arc<Session>,
    body: &[u8],
    started: Instant,
) -> Response {
    let Ok(req) = mapihttp::RegisterPush::decode(body) else {
        return echo.fail(
            code::INVALID_REQUEST_BODY,
            "the RegisterPushNotification body is malformed",
        );
    };
    let answer = match req.target() {
        Err(refused) => refused.code(),
        Ok(addr) if state.egress().check(addr.ip()).is_err() => ec::ACCESS_DENIED,
        Ok(addr) => {
            *session.udp.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, req.context));
            if session.wait.is_pending() {
                udp_push(state, session);
            }
            0
        }
    };
    echo.done(&mapihttp::status_error_body(answer), started, None)
}

/// Releases a handle: its object, and for a subscription its registration and queued notifies.
fn release(objects: &mut Objects, handle: u32) {
    if let Some(Object::Subscription { .. }) = objects.objects.remove(&handle) {
        objects.subscriptions.remove(&handle);
        objects.queue.retain(|(h, _)| *h != handle);
    }
}

/// Releases every object `pick` chooses.
fn release_where(objects: &mut Objects, pick: impl Fn(&Object) -> bool) {
    let chosen: Vec<u32> = objects
        .objects
        .iter()
        .filter(|(_, o)| pick(o))
        .map(|(h, _)| *h)
        .collect();
    for h in chosen {
        release(objects, h);
    }
}

/// Guards the one Execute a session may run at a time.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn execute(
    state: &AppState,
    echo: &Echo,
    session: &Arc<Session>,
    body: &[u8],
    started: Instant,
) -> Response {
    if session.busy.swap(true, Ordering::AcqRel) {
        return echo.fail(
            code::INVALID_SEQUENCE,
            "another request is running on this session",
        );
    }
    let _busy = Busy(&session.busy);
    let req = match ExecuteRequest::decode(body) {
        Ok(r) => r,
        Err(herald_rop::DecodeError::Invalid {
            field: "RopBufferSize" | "AuxiliaryBufferSize",
            ..
        }) => {
            return echo.done(&mapihttp::failure_body(ec::BUFFER_TOO_LARGE), started, None);
        }
        Err(_) => return echo.fail(code::INVALID_REQUEST_BODY, "the Execute body is malformed"),
    };
    if req.max_rop_out < 8 {
        return echo.done(&mapihttp::failure_body(ec::BUFFER_TOO_SMALL), started, None);
    }
    if req.max_rop_out > 0x40000 {
        return echo.done(&mapihttp::failure_body(ec::BUFFER_TOO_LARGE), started, None);
    }
    let rpc_format = || {
        ExecuteResponse {
            error_code: ec::RPC_FORMAT,
            rop_buffer: Vec::new(),
        }
        .encode()
    };
    // An empty buffer is a bare poll for notifications.
    let (requests, mut handles) = if req.rop_buffer.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let Ok(buf) = RopBuffer::decode(&req.rop_buffer) else {
            return echo.done(&rpc_format(), started, None);
        };
        let Ok(requests) = decode_requests(&buf.rops, TypesWidth::U16) else {
            return echo.done(&rpc_format(), started, None);
        };
        (requests, buf.handles)
    };
    let mapi = state.mapi();
    let now = state.log().bounds().map_or(Watermark(0), |b| b.last);
    let mut out: Vec<u8> = Vec::new();
    let mut objects = session.objects();
    for rop in requests {
        let answer = run_rop(&mut objects, session, &mapi.known, &mut handles, rop, now);
        if let Some(a) = answer {
            if let Err(e) = a.encode(&mut out) {
                tracing::warn!(error = %e, "a ROP answer did not encode");
            }
        }
    }
    // Pending notifications: as many as fit, in order, then RopPending if any are left.
    let budget = (req.max_rop_out as usize).min(8 + herald_rop::MAX_PAYLOAD);
    let fixed = 8 + 2 + 4 * handles.len();
    let mut room = budget.saturating_sub(fixed + out.len());
    let mut sent = 0usize;
    // Offline, queued notifications stay queued (and pending) until deliveries resume.
    let delivering = state.server_state().delivering();
    while let Some((_, bytes)) = objects.queue.front().filter(|_| delivering) {
        let last = objects.queue.len() == 1;
        let need = bytes.len() + if last { 0 } else { 3 };
        if need > room {
            break;
        }
        room -= bytes.len();
        if let Some((_, b)) = objects.queue.pop_front() {
            out.extend_from_slice(&b);
            sent += 1;
        }
    }
    if objects.queue.is_empty() {
        session.wait.clear_pending();
    } else if room >= 3 && delivering {
        let _ = RopResponse::Pending {
            session_index: session.index,
        }
        .encode(&mut out);
    }
    drop(objects);
    if sent > 0 {
        crate::metrics::delivered_count("mapi", sent);
        session.drained.notify_waiters();
    }
    let rop_buffer = match (RopBuffer { rops: out, handles }).encode() {
        Ok(b) => b,
        Err(_) => return echo.done(&rpc_format(), started, None),
    };
    echo.done(
        &ExecuteResponse {
            error_code: 0,
            rop_buffer,
        }
        .encode(),
        started,
        None,
    )
}

/// Runs one ROP; returns its answer (RopRelease has none).
fn run_rop(
    objects: &mut Objects,
    session: &Session,
    known: &KnownFolders,
    handles: &mut Vec<u32>,
    rop: RopRequest,
    now: Watermark,
) -> Option<RopResponse> {
    let slot = |handles: &mut Vec<u32>, i: u8, h: u32| {
        let i = usize::from(i);
        if handles.len() <= i {
            handles.resize(i + 1, u32::MAX);
        }
        handles[i] = h;
    };
    let lookup = |objects: &Objects, handles: &[u32], i: u8| -> Result<Object, u32> {
        let h = *handles.get(usize::from(i)).ok_or(ec::NULL_OBJECT)?;
        if h == u32::MAX {
            return Err(ec::NULL_OBJECT);
        }
        objects.objects.get(&h).cloned().ok_or(ec::INVALID_OBJECT)
    };
    let fail = |rop_id, handle_index, return_value| {
        Some(RopResponse::Failure {
            rop_id,
            handle_index,
            return_value,
        })
    };
    let new_handle = |objects: &mut Objects, o: Object| {
        objects.next_handle = objects.next_handle.wrapping_add(1).max(1);
        while objects.next_handle == u32::MAX || objects.objects.contains_key(&objects.next_handle)
        {
            objects.next_handle = objects.next_handle.wrapping_add(1).max(1);
        }
        let h = objects.next_handle;
        objects.objects.insert(h, o);
        h
    };
    match rop {
        RopRequest::Logon(l) => {
            if l.logon_flags & 0x01 == 0 {
                // Public folder logons are not served.
                return fail(
                    herald_rop::ROP_LOGON,
                    l.output_handle_index,
                    ec::NOT_SUPPORTED,
                );
            }
            // Reusing a logon id replaces that logon.
            release_where(
                objects,
                |o| matches!(o, Object::Logon { logon_id } if *logon_id == l.logon_id),
            );
            let h = new_handle(
                objects,
                Object::Logon {
                    logon_id: l.logon_id,
                },
            );
            slot(handles, l.output_handle_index, h);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let (time, year) = logon_time(now);
            let guid = |salt: &str| -> [u8; 16] {
                use sha2::Digest;
                let d = sha2::Sha256::digest(format!("{salt}:{}", session.mailbox).as_bytes());
                let mut g = [0u8; 16];
                g.copy_from_slice(&d[..16]);
                g
            };
            Some(RopResponse::Logon {
                output_handle_index: l.output_handle_index,
                success: Box::new(LogonSuccess {
                    logon_flags: l.logon_flags,
                    folder_ids: known.logon_folders(&session.mailbox),
                    response_flags: 0x07,
                    mailbox_guid: guid("mailbox"),
                    repl_id: map::REPLICA,
                    repl_guid: guid("replica"),
                    logon_time: time,
                    logon_year: year,
                    gwart_time: 0,
                    store_state: 0,
                }),
            })
        }
        RopRequest::OpenFolder(o) => {
            let id = herald_rop::ROP_OPEN_FOLDER;
            match lookup(objects, handles, o.input_handle_index) {
                Ok(Object::Logon { logon_id } | Object::Folder { logon_id, .. })
                    if logon_id == o.logon_id =>
                {
                    let mailbox = Key::from(session.mailbox.as_str());
                    let mine = known
                        .key_of(o.folder_id)
                        .is_some_and(|k| k.is_within(&mailbox));
                    if !mine {
                        return fail(id, o.output_handle_index, ec::NOT_FOUND);
                    }
                    let h = new_handle(
                        objects,
                        Object::Folder {
                            logon_id: o.logon_id,
                        },
                    );
                    slot(handles, o.output_handle_index, h);
                    Some(RopResponse::OpenFolder {
                        output_handle_index: o.output_handle_index,
                        success: OpenFolderSuccess { has_rules: false },
                    })
                }
                Ok(_) => fail(id, o.output_handle_index, ec::ACCESS_DENIED),
                Err(e) => fail(id, o.output_handle_index, e),
            }
        }
        RopRequest::RegisterNotification(r) => {
            let id = herald_rop::ROP_REGISTER_NOTIFICATION;
            match lookup(objects, handles, r.input_handle_index) {
                Ok(Object::Logon { logon_id } | Object::Folder { logon_id, .. })
                    if logon_id == r.logon_id =>
                {
                    let h = new_handle(
                        objects,
                        Object::Subscription {
                            logon_id: r.logon_id,
                        },
                    );
                    objects.subscriptions.insert(
                        h,
                        Subscription {
                            logon_id: r.logon_id,
                            types: r.types,
                            scope: r.scope,
                            after: now,
                        },
                    );
                    slot(handles, r.output_handle_index, h);
                    Some(RopResponse::RegisterNotification {
                        output_handle_index: r.output_handle_index,
                    })
                }
                Ok(_) => fail(id, r.output_handle_index, ec::ACCESS_DENIED),
                Err(e) => fail(id, r.output_handle_index, e),
            }
        }
        RopRequest::Release(r) => {
            if let Some(&h) = handles.get(usize::from(r.input_handle_index)) {
                let is_logon = matches!(objects.objects.get(&h), Some(Object::Logon { .. }));
                release(objects, h);
                if is_logon {
                    // Releasing a logon releases everything opened through it.
                    release_where(objects, |o| match o {
                        Object::Folder { logon_id } | Object::Subscription { logon_id } => {
                            *logon_id == r.logon_id
                        }
                        Object::Logon { .. } => false,
                    });
                }
            }
            None
        }
        RopRequest::Unsupported {
            rop_id,
            handle_index,
            ..
        } => fail(rop_id, handle_index, ec::NOT_SUPPORTED),
    }
}

/// RopLogon's LogonTime (seconds, minutes, hour, day of week, day, month) and year, UTC.
fn logon_time(unix: u64) -> ([u8; 6], u16) {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let dow = ((days + 4) % 7) as u8; // 1970-01-01 was a Thursday.
    (
        [
            (secs % 60) as u8,
            ((secs / 60) % 60) as u8,
            (secs / 3600) as u8,
            dow,
            day as u8,
            month as u8,
        ],
        year as u16,
    )
}

fn notification_wait(state: &AppState, echo: Echo, session: Arc<Session>, body: &[u8]) -> Response {
    let started = Instant::now();
    if mapihttp::decode_notification_wait_request(body).is_err() {
        return echo.fail(
            code::INVALID_REQUEST_BODY,
            "the NotificationWait body is malformed",
        );
    }
    let timer = state.config().mapi.notification_wait;
    let period = state.config().mapi.pending_period;
    let shutdown = state.shutdown().clone();
    let wait = session.wait.begin();
    let headers = echo.headers(0, "application/mapi-http");
    // A client waiting for notifications is present however long the wait.
    let busy = session.busy();
    let mut gate = state.server_state().gate();
    let stream = async_stream(move |tx| async move {
        let _busy = busy;
        let _ = tx.send(Bytes::from_static(mapihttp::PROCESSING)).await;
        let (error_code, event_pending) = match wait {
            Err(_) => (ec::REJECTED, false),
            Ok(mut w) => {
                let deadline = tokio::time::Instant::now() + timer;
                let mut tick = tokio::time::interval(period);
                tick.reset();
                // Offline, "pending" is held back until deliveries resume (or the timer ends).
                let mut seen = false;
                loop {
                    if seen && gate.is_open() {
                        break (0, true);
                    }
                    tokio::select! {
                        outcome = &mut w, if !seen => match outcome {
                            herald_core::WaitOutcome::Pending => seen = true,
                            herald_core::WaitOutcome::Exiting => break (ec::EXITING, false),
                        },
                        () = gate.changed(), if seen => {}
                        () = tokio::time::sleep_until(deadline) => break (0, false),
                        () = shutdown.cancelled() => break (ec::EXITING, false),
                        _ = tick.tick() => {
                            if tx.send(Bytes::from_static(mapihttp::PENDING)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        };
        // Completing a wait refreshes the session.
        session.touch();
        let body = NotificationWaitResponse {
            error_code,
            event_pending,
        }
        .encode();
        let done = mapihttp::done(
            0,
            started.elapsed().as_millis() as u64,
            &httpdate::fmt_http_date(std::time::SystemTime::now()),
            &body,
        );
        let _ = tx.send(Bytes::from(done)).await;
    });
    (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
}

/// A body stream fed by a task through a channel (each send is one chunk, flushed as sent).
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logon_time_is_civil_utc() {
        // 2024-01-15 10:30:00 UTC, a Monday.
        assert_eq!(logon_time(1_705_314_600), ([0, 30, 10, 1, 15, 1], 2024));
        assert_eq!(logon_time(0), ([0, 0, 0, 4, 1, 1], 1970));
    }

    #[test]
    fn cookies_and_mailbox_ids() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; MapiContext=xyz; c=d"),
        );
        assert_eq!(crate::auth::cookie(&h, COOKIE).as_deref(), Some("xyz"));
        assert_eq!(
            mailbox_id(Some("MailboxId=Alice%40example.test")).as_deref(),
            Some("alice@example.test")
        );
        assert_eq!(mailbox_id(Some("x=1")), None);
    }
}
