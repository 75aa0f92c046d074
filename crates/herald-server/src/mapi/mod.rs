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

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{EventMask, Filter, Key, Scope, Watermark};
use herald_delivery::{
    Connect, ConnectError, Delivery, EndReason, Feed, FeedItem, Lease, NudgeTarget, Outbox, Quota,
    QuotaPermit, Registry, Session, Transport,
};
use herald_rop::mapihttp::{
    self, ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse,
    NotificationWaitResponse,
};
use herald_rop::{
    LogonSuccess, NotificationScope, OpenFolderSuccess, RopBuffer, RopNotify, RopRequest,
    RopResponse, TypesWidth, decode_requests, ec,
};
use tokio::sync::watch;

use crate::Log;
use crate::config::MapiConfig;
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

use herald_rop::mapihttp::{CONTEXT_COOKIE as COOKIE, SEQUENCE_COOKIE as SEQUENCE};
/// What Herald says it is.
const SERVER_APPLICATION: &str = "Exchange/15.00.0847.4040";
/// ecLoginPerm: Connect to a mailbox that is not the user's.
const LOGIN_PERM: u32 = 0x0000_03F2;

/// Most objects (logons, folders, registrations) one session may hold open; past it the
/// ROP that would open one more fails with MAPI_E_NOT_ENOUGH_MEMORY.
const MAX_OBJECTS: usize = 4096;

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
    /// For a folder registration whose folder is known: the engine's scopes of a folder
    /// (the folder itself, and what is directly in it), which select its events.
    folder: Option<[Scope; 2]>,
    /// Events at or before this watermark predate the registration.
    after: Watermark,
}

#[derive(Default)]
struct Objects {
    /// The handle of the UDP push registration, if any.
    push_handle: Option<u32>,
    next_handle: u32,
    objects: HashMap<u32, Object>,
    subscriptions: HashMap<u32, Subscription>,
}

/// A MAPI/HTTP session (the registry's session adds its id, stop signal, idle clock and
/// connection).
pub struct MapiSession {
    owner: Option<String>,
    mailbox: String,
    index: u16,
    objects: Mutex<Objects>,
    /// RopNotify bytes with their subscription handle, in log order, until fetched.
    outbox: Outbox<(u32, Vec<u8>)>,
    /// One Execute at a time.
    busy: AtomicBool,
    /// The `MapiSequence` value the next Execute must carry.
    sequence: Mutex<String>,
    /// The UDP push target (EcRRegisterPushNotification).
    udp: watch::Sender<Option<NudgeTarget>>,
    /// Whether the UDP nudger runs.
    nudging: AtomicBool,
    /// Most registrations it may hold (`mapi.max_registrations`).
    max_registrations: usize,
    /// Its place among its user's sessions.
    _quota: QuotaPermit,
}

type SessionRef = Arc<Session<MapiSession>>;

impl MapiSession {
    fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If `given` is the current sequence value, replaces it and returns the cookie that
    /// carries the new one; otherwise `None` (a stale or missing sequence).
    fn advance(&self, given: Option<&str>) -> Option<HeaderValue> {
        let mut current = self.sequence.lock().unwrap_or_else(|e| e.into_inner());
        if given != Some(current.as_str()) {
            return None;
        }
        *current = new_sequence();
        Some(sequence_cookie(&current))
    }
}

/// A fresh, unguessable sequence value.
fn new_sequence() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

fn sequence_cookie(value: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{SEQUENCE}={value}; Path=/mapi/; HttpOnly"))
        .unwrap_or_else(|_| HeaderValue::from_static("MapiSequence=; Path=/mapi/"))
}

/// Every MAPI/HTTP session of this server, and what serving them needs; cheap to clone.
#[derive(Clone)]
pub struct Mapi {
    inner: Arc<MapiInner>,
}

struct MapiInner {
    delivery: Delivery<Log>,
    config: MapiConfig,
    egress: crate::egress::EgressPolicy,
    sessions: Registry<MapiSession>,
    /// Sessions each user holds.
    per_user: Quota,
    known: KnownFolders,
    next_index: AtomicU16,
}

/// The presence id of session `id`.
fn conn_id(id: &str) -> String {
    format!("mapi-{id}")
}

impl Mapi {
    /// The endpoint's state over `delivery`.
    pub fn new(
        delivery: Delivery<Log>,
        config: MapiConfig,
        egress: crate::egress::EgressPolicy,
    ) -> Mapi {
        Mapi {
            inner: Arc::new(MapiInner {
                sessions: delivery.registry(),
                per_user: Quota::default(),
                delivery,
                config,
                egress,
                known: KnownFolders::default(),
                next_index: AtomicU16::new(0),
            }),
        }
    }

    /// Ends the session whose connection id is `conn_id` (`mapi-<session>`), as an
    /// operator's kick whose hooks ran; returns whether there was one.
    pub fn kick(&self, conn_id: &str) -> bool {
        conn_id
            .strip_prefix("mapi-")
            .and_then(|id| self.inner.sessions.take(id))
            .is_some()
    }

    /// Destroys sessions idle for longer than `mapi.session_idle` (a session with a
    /// NotificationWait open is not idle). Returns how many.
    pub fn expire(&self) -> usize {
        let idle = self.inner.config.session_idle;
        self.inner
            .sessions
            .expire(|s, quiet| quiet > idle && !s.outbox.is_waiting())
            .len()
    }

    /// Ends every session (at shutdown): outstanding waits complete with ecExiting; their
    /// cancel hooks hear it.
    pub fn stop_all(&self) {
        self.inner.sessions.stop_all(|_| false);
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
    fn done(
        &self,
        body: &[u8],
        started: Instant,
        set_cookies: impl IntoIterator<Item = HeaderValue>,
    ) -> Response {
        let mut out = mapihttp::PROCESSING.to_vec();
        out.extend(mapihttp::done(
            0,
            started.elapsed().as_millis() as u64,
            &httpdate::fmt_http_date(std::time::SystemTime::now()),
            body,
        ));
        let mut h = self.headers(0, "application/mapi-http");
        for cookie in set_cookies {
            h.append(header::SET_COOKIE, cookie);
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
    State(mapi): State<Mapi>,
    State(auth): State<Arc<crate::auth::Auth>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let config = &mapi.inner.config;
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
    if mapi.inner.delivery.shutdown().is_cancelled() {
        return echo.fail(code::SHUTTING_DOWN, "the server is shutting down");
    }
    let user = match auth.basic_user(&headers) {
        Ok(u) => u,
        Err(challenge) => return challenge.into_response(),
    };
    let request_type = echo.request_type.to_ascii_lowercase();
    match request_type.as_str() {
        "connect" => {
            connect(
                &mapi,
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
            let Some(session) = mapi.inner.sessions.peek(&id) else {
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
                "execute" => {
                    let given = crate::auth::cookie(&headers, SEQUENCE);
                    let Some(next) = session.advance(given.as_deref()) else {
                        return echo.fail(
                            code::INVALID_SEQUENCE,
                            "the MapiSequence cookie is missing or stale: send the value the last response set",
                        );
                    };
                    // Whatever this Execute answers, it carries the next sequence value.
                    let mut response = execute(&mapi, &echo, &session, &body, started);
                    response.headers_mut().append(header::SET_COOKIE, next);
                    response
                }
                "notificationwait" => notification_wait(&mapi, echo, session, &body),
                "registerpushnotification" => register_push(&mapi, &echo, &session, &body, started),
                "disconnect" => {
                    if mapihttp::decode_disconnect_request(&body).is_err() {
                        return echo.fail(
                            code::INVALID_REQUEST_BODY,
                            "the Disconnect body is malformed",
                        );
                    }
                    let Some(req) = session.live().as_ref().map(|l| l.request().clone()) else {
                        return echo.fail(code::CONTEXT_NOT_FOUND, "the session ended");
                    };
                    let ended = mapi
                        .inner
                        .delivery
                        .lifecycle()
                        .run(&req.cancel("unsubscribe", false), || {
                            mapi.inner.sessions.take(&id);
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
                                &mapihttp::status_error_body(herald_core::hooks::WN_CANCEL),
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
fn refusal<E: std::fmt::Display>(e: ConnectError<E>) -> String {
    e.to_string()
}

async fn connect(
    mapi: &Mapi,
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
        if mapi
            .inner
            .sessions
            .peek(&old)
            .is_some_and(|s| s.owner == user)
        {
            mapi.inner.sessions.remove(&old, EndReason::Replaced);
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
    let owner = owner_name(user.as_deref()).to_owned();
    let Some(quota) = mapi
        .inner
        .per_user
        .acquire(&owner, Some(mapi.inner.config.max_sessions_per_user))
    else {
        tracing::info!(%owner, "a MAPI Connect past mapi.max_sessions_per_user was refused");
        return refuse(ec::SERVER_MEMORY);
    };
    let id = mapi
        .inner
        .delivery
        .connections()
        .node_named(uuid::Uuid::new_v4().simple().to_string());
    let connect = Connect {
        id: conn_id(&id),
        owner,
        transport: Transport::Mapi,
        target: format!("{mailbox}/"),
    };
    let delivery = &mapi.inner.delivery;
    let start = delivery.head().unwrap_or(Watermark(0));
    let filter = Filter {
        scope: Scope::Subtree(Key::from(mailbox.as_str())),
        mask: EventMask::ALL,
    };
    let made = delivery
        .lifecycle()
        .connect(connect, Some(Lease::Session), || {
            std::future::ready(delivery.feed(filter.clone(), start))
        })
        .await;
    let (feed, live) = match made {
        Ok(made) => made,
        Err(e @ ConnectError::Refused { .. }) => {
            tracing::info!(reason = %refusal(e), %mailbox, "a hook refused a MAPI Connect");
            return refuse(herald_core::hooks::WN_CANCEL);
        }
        Err(ConnectError::Busy) => return refuse(ec::SERVER_MEMORY),
        Err(e) => {
            tracing::warn!(error = %refusal(e), "a MAPI session cannot follow the log");
            return refuse(ec::LOGIN_FAILURE);
        }
    };
    let sequence = new_sequence();
    let session = mapi.inner.sessions.insert(
        id.clone(),
        MapiSession {
            owner: user.clone(),
            mailbox: mailbox.clone(),
            index: mapi.inner.next_index.fetch_add(1, Ordering::Relaxed),
            objects: Mutex::default(),
            outbox: delivery.outbox(mapi.inner.config.max_queue_bytes),
            busy: AtomicBool::new(false),
            sequence: Mutex::new(sequence.clone()),
            udp: watch::Sender::new(None),
            nudging: AtomicBool::new(false),
            max_registrations: mapi.inner.config.max_registrations,
            _quota: quota,
        },
        Some(live),
    );
    mapi.inner
        .sessions
        .spawn(&session, read(mapi.clone(), session.clone(), feed));
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
    echo.done(&body, started, [cookie, sequence_cookie(&sequence)])
}

/// Follows the log for the session's mailbox and queues a RopNotify per matching
/// subscription; waits for the client to fetch when the outbox is full.
async fn read(mapi: Mapi, session: SessionRef, mut feed: Feed<Log>) {
    loop {
        let batch = match feed.next().await {
            Ok(FeedItem::Events { batch, .. }) => batch,
            Ok(FeedItem::KeepAlive { .. }) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "a MAPI session stopped following the log");
                return;
            }
        };
        for n in batch.events() {
            let Some(data) = map::to_notification_data(n, &mapi.inner.known) else {
                continue;
            };
            // Back-pressure, not loss: wait for the client to fetch. The outbox holds at most
            // its capacity plus one event's notifications.
            session.outbox.room().await;
            let w = n.watermark.unwrap_or(Watermark(u64::MAX));
            // Under the objects lock: a subscription released meanwhile gets nothing.
            let objects = session.objects();
            let mut matching: Vec<(u32, u8)> = objects
                .subscriptions
                .iter()
                .filter(|(_, s)| {
                    w > s.after && s.types & (data.kind as u16) != 0 && in_scope(s, n, &data)
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
                        let len = bytes.len();
                        session.outbox.push((handle, bytes), len);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "an event did not encode as RopNotify")
                    }
                }
            }
        }
    }
}

/// Whether registration `s` hears event `n` (encoded as `d`): a folder registration by the
/// engine's scopes (MS-OXCNOTIF: the folder's own events and those of the objects in it,
/// moves and copies by their old place too); a whole-store one always; a message one by
/// the message's id. A folder this server never named (no key for its id) is matched by
/// the ids in the notification.
fn in_scope(
    s: &Subscription,
    n: &herald_core::Notification,
    d: &herald_rop::NotificationData,
) -> bool {
    if let Some(scopes) = &s.folder {
        return scopes.iter().any(|scope| scope.selects(n));
    }
    match s.scope {
        NotificationScope::WholeStore => true,
        // A table event's key is its table's folder.
        NotificationScope::Folder(fid) if d.table.is_some() => map::id_of(&n.key) == fid,
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

/// Herald's `RegisterPushNotification` request: EcRRegisterPushNotification for MAPI/HTTP.
/// While notifications stay unfetched, the registered context goes to the address at once
/// and every `mapi.udp_repeat`.
fn register_push(
    mapi: &Mapi,
    echo: &Echo,
    session: &SessionRef,
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
        Err(refused) => Err(refused.code()),
        Ok(addr) if mapi.inner.egress.check(addr.ip()).is_err() => Err(ec::ACCESS_DENIED),
        Ok(addr) => {
            session.udp.send_replace(Some(NudgeTarget {
                addr,
                context: req.context,
            }));
            if !session.nudging.swap(true, Ordering::AcqRel) {
                let nudger = mapi.inner.delivery.nudger(
                    session.outbox.pending(),
                    session.udp.subscribe(),
                    mapi.inner.config.udp_repeat,
                );
                mapi.inner.sessions.spawn(session, nudger);
            }
            // hNotification: a handle of the session's own, replaced by the next registration.
            let mut objects = session.objects();
            let handle = next_free_handle(&mut objects);
            objects.push_handle = Some(handle);
            Ok(handle)
        }
    };
    let body = match answer {
        Ok(handle) => mapihttp::register_push_body(0, handle),
        Err(code) => mapihttp::register_push_body(code, 0),
    };
    echo.done(&body, started, None)
}

/// A handle no object (nor the push registration) holds: nonzero, never 0xFFFFFFFF (the
/// handle table's "no object").
fn next_free_handle(objects: &mut Objects) -> u32 {
    loop {
        objects.next_handle = objects.next_handle.wrapping_add(1).max(1);
        let h = objects.next_handle;
        if h != u32::MAX && !objects.objects.contains_key(&h) && objects.push_handle != Some(h) {
            return h;
        }
    }
}

/// Releases a handle: its object, and for a subscription its registration and queued notifies.
fn release(session: &MapiSession, objects: &mut Objects, handle: u32) {
    if let Some(Object::Subscription { .. }) = objects.objects.remove(&handle) {
        objects.subscriptions.remove(&handle);
        session.outbox.retain(|(h, _)| *h != handle);
    }
}

/// Releases every object `pick` chooses.
fn release_where(session: &MapiSession, objects: &mut Objects, pick: impl Fn(&Object) -> bool) {
    let chosen: Vec<u32> = objects
        .objects
        .iter()
        .filter(|(_, o)| pick(o))
        .map(|(h, _)| *h)
        .collect();
    for h in chosen {
        release(session, objects, h);
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
    mapi: &Mapi,
    echo: &Echo,
    session: &SessionRef,
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
    let now = mapi.inner.delivery.head().unwrap_or(Watermark(0));
    let mut out: Vec<u8> = Vec::new();
    let mut objects = session.objects();
    for rop in requests {
        let answer = run_rop(
            &mut objects,
            session,
            &mapi.inner.known,
            &mut handles,
            rop,
            now,
        );
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
    drop(objects);
    // Offline, queued notifications stay queued (and pending) until deliveries resume.
    let taken = session.outbox.take(|(_, bytes), last| {
        let need = bytes.len() + if last { 0 } else { 3 };
        if need > room {
            return false;
        }
        room -= bytes.len();
        true
    });
    for (_, b) in &taken.items {
        out.extend_from_slice(b);
    }
    if taken.more && room >= 3 {
        let _ = RopResponse::Pending {
            session_index: session.index,
        }
        .encode(&mut out);
    }
    if !taken.items.is_empty() {
        crate::metrics::delivered_count("mapi", taken.items.len());
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
    session: &MapiSession,
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
        let h = next_free_handle(objects);
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
            // Reusing a logon id replaces that logon, and everything opened through it.
            release_where(session, objects, |o| match o {
                Object::Logon { logon_id }
                | Object::Folder { logon_id }
                | Object::Subscription { logon_id } => *logon_id == l.logon_id,
            });
            if objects.objects.len() >= MAX_OBJECTS {
                return fail(
                    herald_rop::ROP_LOGON,
                    l.output_handle_index,
                    ec::NOT_ENOUGH_MEMORY,
                );
            }
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
                    if objects.objects.len() >= MAX_OBJECTS {
                        return fail(id, o.output_handle_index, ec::NOT_ENOUGH_MEMORY);
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
                Ok(Object::Logon { .. } | Object::Folder { .. })
                    if objects.subscriptions.len() >= session.max_registrations
                        || objects.objects.len() >= MAX_OBJECTS =>
                {
                    fail(id, r.output_handle_index, ec::NOT_ENOUGH_MEMORY)
                }
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
                            folder: match r.scope {
                                NotificationScope::Folder(fid) => known
                                    .key_of(fid)
                                    .map(|k| [Scope::Exact(k.clone()), Scope::Children(k)]),
                                _ => None,
                            },
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
                release(session, objects, h);
                if is_logon {
                    // Releasing a logon releases everything opened through it.
                    release_where(session, objects, |o| match o {
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

fn notification_wait(mapi: &Mapi, echo: Echo, session: SessionRef, body: &[u8]) -> Response {
    let started = Instant::now();
    if mapihttp::decode_notification_wait_request(body).is_err() {
        return echo.fail(
            code::INVALID_REQUEST_BODY,
            "the NotificationWait body is malformed",
        );
    }
    let timer = mapi.inner.config.notification_wait;
    let period = mapi.inner.config.pending_period;
    let shutdown = mapi.inner.delivery.shutdown().clone();
    // Completes only with notifications that may go (held while the server is offline).
    let wait = session.outbox.wait();
    let headers = echo.headers(0, "application/mapi-http");
    // A client waiting for notifications is present however long the wait.
    let busy = session.busy();
    let stream = async_stream(&mapi.inner.delivery, move |tx| async move {
        let _busy = busy;
        let _ = tx.send(Bytes::from_static(mapihttp::PROCESSING)).await;
        let (error_code, event_pending) = match wait {
            Err(_) => (ec::REJECTED, false),
            Ok(w) => {
                let deadline = tokio::time::Instant::now() + timer;
                let mut tick = tokio::time::interval(period);
                tick.reset();
                let mut w = std::pin::pin!(w);
                loop {
                    tokio::select! {
                        outcome = &mut w => match outcome {
                            herald_core::WaitOutcome::Pending => break (0, true),
                            herald_core::WaitOutcome::Exiting => break (ec::EXITING, false),
                        },
                        () = tokio::time::sleep_until(deadline) => break (0, false),
                        () = shutdown.cancelled() => break (ec::EXITING, false),
                        () = session.stopped() => break (ec::EXITING, false),
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
fn async_stream<F, Fut>(
    delivery: &Delivery<Log>,
    f: F,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + use<F, Fut>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    delivery.track(f(tx));
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
