//! `POST /EWS/Exchange.asmx`: Exchange Web Services notifications over Herald's log.
//!
//! Pull (GetEvents dequeues at most 50 events; a StatusEvent when empty; Timeout expiry),
//! streaming (one chunked response of whole envelopes, heartbeats, Closed at
//! ConnectionTimeout, subscriptions outliving their connection), push (SendNotification with
//! an initial StatusEvent, keep-alives after StatusFrequency, the client's OK/Unsubscribe,
//! 30 s doubling retries within StatusFrequency). Watermarks are Herald's log watermarks, so
//! resubscribing from one misses nothing. Errors are EWS response messages.

pub mod map;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::hooks::{HookError, HookRequest, Operation};
use herald_core::{EventMask, Filter, Key, Notification as HNotification, Scope, Watermark};
use herald_ews::{
    EventType, EwsEvent, FolderInfo, FolderRef, Notification, Request, Subscribe, SubscriptionKind,
    SubscriptionStatus,
};
use herald_log::{EmbeddedLog, EventLog, ReadError};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::connections::{Conn, Lease, LiveConnection};
use crate::subscriptions::owner_name;
use map::{id_of, key_of, watermark_from, watermark_of};

/// Most events in one notification.
const MAX_EVENTS: usize = 50;
/// Most log events one GetEvents scans (non-matching ones included) before answering.
const SCAN_BUDGET: usize = 10_000;

/// Which kind of subscription, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Pull { timeout: Duration },
    Push,
    Streaming,
}

/// One EWS subscription.
pub struct EwsSub {
    id: String,
    owner: Option<String>,
    mailbox: Key,
    /// `None`: every folder of the mailbox.
    folders: Option<Vec<Key>>,
    types: Vec<EventType>,
    kind: Kind,
    cursor: Mutex<Watermark>,
    last_used: Mutex<Instant>,
    stop: CancellationToken,
    /// The streaming connection currently serving it.
    stream: Mutex<Option<CancellationToken>>,
    /// What its connect hooks were told; its cancel hooks get the same.
    hook: HookRequest,
    /// A push subscription's endpoint as a connection: online while it takes notifications.
    conn: Mutex<Option<Conn>>,
}

impl EwsSub {
    /// Marks a push subscription's endpoint online or offline.
    fn set_online(&self, online: bool) {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.set_online(online);
        }
    }

    /// The hook request for ending it.
    pub fn cancel_request(&self, reason: &str, forced: bool) -> HookRequest {
        self.hook.clone().cancel(reason, forced)
    }

    fn cursor(&self) -> Watermark {
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, w: Watermark) {
        let mut c = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if w > *c {
            *c = w;
        }
    }

    /// Whether `user` may use it (anyone, when authentication is off).
    fn belongs_to(&self, user: &Option<String>) -> bool {
        user.is_none() || self.owner.as_deref() == user.as_deref()
    }

    /// Whether a streaming connection serves it now.
    fn connected(&self) -> bool {
        self.stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_cancelled())
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Whether the subscription wants this event: its type, its mailbox, and its folders
    /// (the event's parent folder, a move's or copy's old parent, or the folder itself).
    fn selects(&self, n: &HNotification) -> bool {
        let Some(t) = map::ews_type(n) else {
            return false;
        };
        if !self.types.contains(&t) {
            return false;
        }
        let in_mailbox = n.key.is_within(&self.mailbox)
            || n.old_key().is_some_and(|k| k.is_within(&self.mailbox));
        if !in_mailbox {
            return false;
        }
        match &self.folders {
            None => true,
            Some(fs) => {
                let parent = map::parent_of(n);
                let old = map::old_parent_of(n);
                // The folder's own changes (its unread count) count too, as in Exchange.
                fs.iter()
                    .any(|f| parent.as_ref() == Some(f) || old.as_ref() == Some(f) || &n.key == f)
            }
        }
    }

    fn filter(&self) -> Filter {
        Filter {
            scope: Scope::Subtree(self.mailbox.clone()),
            mask: EventMask::ALL,
        }
    }
}

/// Every EWS subscription of this server.
#[derive(Default)]
pub struct Ews {
    subs: Mutex<HashMap<String, Arc<EwsSub>>>,
    streams: Mutex<HashMap<String, u32>>,
    /// Ids of subscriptions that expired, and when: GetEvents on one says
    /// `ErrorExpiredSubscription` rather than "not found".
    expired: Mutex<HashMap<String, Instant>>,
}

/// How long an expired subscription's id is remembered.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most expired ids remembered.
const TOMBSTONE_CAP: usize = 10_000;
/// EWS minutes a streaming subscription outlives its last connection.
const STREAMING_IDLE_MINUTES: u32 = 30;

impl Ews {
    fn get(&self, id: &str) -> Option<Arc<EwsSub>> {
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The subscription `id` if `user` may use it, else the EWS error code and text. An
    /// expired id is `ErrorExpiredSubscription` when `tell_expired` (GetEvents), else not found.
    fn for_user(
        &self,
        id: &str,
        user: &Option<String>,
        tell_expired: bool,
    ) -> Result<Arc<EwsSub>, (&'static str, &'static str)> {
        let Some(sub) = self.get(id) else {
            if tell_expired && self.was_expired(id) {
                return Err((
                    "ErrorExpiredSubscription",
                    "The subscription expired: it was not polled within its Timeout.",
                ));
            }
            return Err((
                "ErrorSubscriptionNotFound",
                "The specified subscription was not found.",
            ));
        };
        if !sub.belongs_to(user) {
            return Err((
                "ErrorSubscriptionAccessDenied",
                "The subscription belongs to another account.",
            ));
        }
        Ok(sub)
    }

    fn remove(&self, id: &str) -> Option<Arc<EwsSub>> {
        let s = self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(s) = &s {
            s.stop.cancel();
            s.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        s
    }

    fn count_in(&self, mailbox: &Key) -> usize {
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| &s.mailbox == mailbox)
            .count()
    }

    /// Removes pull subscriptions past their Timeout without a GetEvents, and streaming
    /// subscriptions that have had no connection for 30 EWS minutes; `minute` is the length
    /// of an EWS minute. Returns those removed.
    pub fn expire(&self, minute: Duration) -> Vec<Arc<EwsSub>> {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|id, s| {
                let idle = s
                    .last_used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                let keep = match s.kind {
                    Kind::Pull { timeout } => idle <= timeout,
                    Kind::Streaming => s.connected() || idle <= minute * STREAMING_IDLE_MINUTES,
                    Kind::Push => true,
                };
                if !keep {
                    s.stop.cancel();
                    gone.push((id.clone(), s.clone()));
                }
                keep
            });
        }
        let (gone, subs): (Vec<String>, Vec<Arc<EwsSub>>) = gone.into_iter().unzip();
        let mut expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        expired.retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
        if expired.len() + gone.len() > TOMBSTONE_CAP {
            expired.clear();
        }
        expired.extend(gone.into_iter().map(|id| (id, now)));
        subs
    }

    fn was_expired(&self, id: &str) -> bool {
        self.expired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Stops every push worker and stream (at shutdown); returns the subscriptions, which
    /// end with the process.
    pub fn stop_all(&self) -> Vec<Arc<EwsSub>> {
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.values() {
            s.stop.cancel();
        }
        subs.values().cloned().collect()
    }

    /// Ends subscription `id` (an operator's kick of an EWS push endpoint); whether it existed.
    pub fn kick(&self, id: &str) -> bool {
        self.remove(id).is_some()
    }
}

fn xml(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

fn ok(body: String) -> Response {
    xml(StatusCode::OK, body)
}

fn op_error(op: &str, code: &str, text: &str) -> Response {
    ok(herald_ews::error_response(op, code, text))
}

/// The mailbox a request is about when it names none: the user's, else `X-AnchorMailbox`.
fn default_mailbox(user: &Option<String>, headers: &HeaderMap) -> Option<String> {
    user.clone().or_else(|| {
        headers
            .get("x-anchormailbox")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
    })
}

/// A folder reference as a key, if it names one in a mailbox the caller may use.
fn resolve_folder(
    f: &FolderRef,
    user: &Option<String>,
    headers: &HeaderMap,
) -> Result<Key, (&'static str, String)> {
    let key = match f {
        FolderRef::Id { id, .. } => key_of(id).ok_or((
            "ErrorInvalidIdMalformed",
            format!("Id {id:?} is malformed."),
        ))?,
        FolderRef::Distinguished { id, mailbox } => {
            let mbx = mailbox
                .as_ref()
                .map(|m| m.to_ascii_lowercase())
                .or_else(|| default_mailbox(user, headers))
                .ok_or((
                    "ErrorMissingEmailAddress",
                    "No mailbox: give one in the request or authenticate.".to_owned(),
                ))?;
            map::distinguished_key(&mbx, id).ok_or((
                "ErrorFolderNotFound",
                format!("The distinguished folder {id:?} is not known."),
            ))?
        }
    };
    check_mailbox(&key, user)?;
    Ok(key)
}

fn check_mailbox(key: &Key, user: &Option<String>) -> Result<(), (&'static str, String)> {
    if let Some(u) = user {
        if map::mailbox_of(key).is_none_or(|m| !m.eq_ignore_ascii_case(u)) {
            return Err((
                "ErrorAccessDenied",
                "The mailbox belongs to another user.".to_owned(),
            ));
        }
    }
    Ok(())
}

/// The EWS endpoint.
pub async fn handle(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let user = match state.auth().basic_user(&headers) {
        Ok(u) => u,
        Err(challenge) => return challenge.into_response(),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            herald_ews::soap_fault("ErrorSchemaValidation", "The request is not UTF-8."),
        );
    };
    let env = match herald_ews::parse_request(text) {
        Ok(e) => e,
        Err(herald_ews::ParseError::UnknownOperation(op)) => {
            return xml(
                StatusCode::INTERNAL_SERVER_ERROR,
                herald_ews::soap_fault(
                    "ErrorInvalidOperation",
                    &format!("The operation {op} is not supported by this server."),
                ),
            );
        }
        Err(e @ (herald_ews::ParseError::Missing(_) | herald_ews::ParseError::Invalid { .. })) => {
            let op = herald_ews::request_operation(text).unwrap_or_else(|| "Subscribe".into());
            return op_error(
                &op,
                "ErrorInvalidRequest",
                &format!("The request is invalid: {e}."),
            );
        }
        Err(e) => {
            return xml(
                StatusCode::INTERNAL_SERVER_ERROR,
                herald_ews::soap_fault(
                    "ErrorSchemaValidation",
                    &format!("The request failed schema validation: {e}."),
                ),
            );
        }
    };
    match env.request {
        Request::Subscribe(s) => subscribe(&state, &user, &headers, s).await,
        Request::GetEvents {
            subscription_id,
            watermark,
        } => get_events(&state, &user, &subscription_id, &watermark).await,
        Request::GetStreamingEvents {
            subscription_ids,
            connection_timeout_minutes,
        } => streaming(&state, &user, subscription_ids, connection_timeout_minutes).await,
        Request::Unsubscribe { subscription_id } => {
            unsubscribe(&state, &user, &subscription_id).await
        }
        Request::GetFolder { folders } => get_folder(&user, &headers, &folders),
    }
}

async fn subscribe(
    state: &AppState,
    user: &Option<String>,
    headers: &HeaderMap,
    s: Subscribe,
) -> Response {
    let op = "Subscribe";
    let mut folders = Vec::new();
    for f in &s.folders {
        match resolve_folder(f, user, headers) {
            Ok(k) => folders.push(k),
            Err((code, text)) => return op_error(op, code, &text),
        }
    }
    let mailbox = if s.all_folders {
        match default_mailbox(user, headers) {
            Some(m) => Key::from(m),
            None => {
                return op_error(
                    op,
                    "ErrorMissingEmailAddress",
                    "No mailbox: authenticate or send X-AnchorMailbox.",
                );
            }
        }
    } else {
        let mbxs: Vec<&str> = folders.iter().filter_map(map::mailbox_of).collect();
        if mbxs.windows(2).any(|w| !w[0].eq_ignore_ascii_case(w[1])) {
            return op_error(
                op,
                "ErrorInvalidSubscriptionRequest",
                "Folders from several mailboxes cannot share one subscription.",
            );
        }
        Key::from(mbxs.first().copied().unwrap_or_default())
    };
    if let Err((code, text)) = check_mailbox(&mailbox, user) {
        return op_error(op, code, &text);
    }
    let ews = state.ews();
    if ews.count_in(&mailbox) >= state.config().ews.max_subscriptions_per_mailbox as usize {
        return op_error(
            op,
            "ErrorExceededSubscriptionCount",
            "The mailbox has as many subscriptions as it may.",
        );
    }
    let bounds = match state.log().bounds() {
        Ok(b) => b,
        Err(e) => return op_error(op, "ErrorInternalServerError", &e.to_string()),
    };
    let start = match &s.watermark {
        Some(w) => match watermark_from(w) {
            Some(w) if bounds.check(w).is_ok() => w,
            _ => {
                return op_error(
                    op,
                    "ErrorInvalidWatermark",
                    "The watermark is invalid or no longer held.",
                );
            }
        },
        None => bounds.last,
    };
    let minute = state.config().ews.minute;
    let (kind, push) = match &s.kind {
        SubscriptionKind::Pull { timeout_minutes } => (
            Kind::Pull {
                timeout: minute * *timeout_minutes,
            },
            None,
        ),
        SubscriptionKind::Push {
            status_frequency_minutes,
            url,
        } => {
            if url.is_empty() || url.len() > 2082 || state.egress().check_url(url).is_err() {
                return op_error(
                    op,
                    "ErrorInvalidPushSubscriptionUrl",
                    "The push subscription URL is invalid.",
                );
            }
            (
                Kind::Push,
                Some((url.clone(), minute * *status_frequency_minutes)),
            )
        }
        SubscriptionKind::Streaming => (Kind::Streaming, None),
    };
    let id = format!("HS{}", uuid::Uuid::new_v4().simple());
    let hook = HookRequest::new(
        Operation::Connect,
        id.clone(),
        owner_name(user.as_deref()),
        "ews",
        format!("{mailbox}/"),
    );
    let sub = Arc::new(EwsSub {
        id: id.clone(),
        owner: user.clone(),
        mailbox,
        folders: (!s.all_folders).then_some(folders),
        types: s.event_types.clone(),
        kind: kind.clone(),
        cursor: Mutex::new(start),
        last_used: Mutex::new(Instant::now()),
        stop: CancellationToken::new(),
        stream: Mutex::new(None),
        hook: hook.clone(),
        conn: Mutex::new(None),
    });
    let made = state
        .hooks()
        .run(&hook, || {
            if push.is_some() {
                *sub.conn.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(state.connections().open(
                        Some(id.clone()),
                        "ews",
                        &hook.owner,
                        &hook.target,
                        Lease::None,
                    ));
            }
            ews.subs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), sub.clone());
            std::future::ready(Ok::<_, Infallible>(()))
        })
        .await;
    if let Err(e) = made {
        return op_error(op, "ErrorAccessDenied", &refusal(e));
    }
    tracing::debug!(%id, ?kind, "EWS subscription created");
    if let Some((url, frequency)) = push {
        tokio::spawn(push_worker(state.clone(), sub, url, frequency));
    }
    let watermark = (kind != Kind::Streaming).then(|| watermark_of(start));
    ok(herald_ews::subscribe_ok(&id, watermark.as_deref()))
}

/// Reads matching events after the subscription's cursor: up to `max`, scanning at most
/// [`SCAN_BUDGET`] log events. Returns the events, the position reached, and whether more
/// may be waiting.
async fn dequeue(
    log: &EmbeddedLog,
    sub: &EwsSub,
    max: usize,
) -> Result<(Vec<EwsEvent>, Watermark, bool), ReadError> {
    let mut cursor = sub.cursor();
    let mut out = Vec::new();
    let mut scanned = 0;
    loop {
        let page = log.read(cursor, 512).await?;
        if page.is_empty() {
            return Ok((out, cursor, false));
        }
        for n in page {
            scanned += 1;
            let w = n.watermark.unwrap_or(cursor);
            if sub.selects(&n) {
                if let Some(e) = map::to_ews(&n) {
                    out.push(e);
                }
            }
            cursor = w;
            if out.len() >= max {
                let last = log.bounds().map(|b| b.last).unwrap_or(cursor);
                return Ok((out, cursor, cursor < last));
            }
        }
        if scanned >= SCAN_BUDGET {
            return Ok((out, cursor, true));
        }
    }
}

async fn get_events(
    state: &AppState,
    user: &Option<String>,
    id: &str,
    watermark: &str,
) -> Response {
    let op = "GetEvents";
    let ews = state.ews();
    let sub = match ews.for_user(id, user, true) {
        Ok(s) => s,
        Err((code, text)) => return op_error(op, code, text),
    };
    if !matches!(sub.kind, Kind::Pull { .. }) {
        return op_error(
            op,
            "ErrorInvalidPullSubscriptionId",
            "The subscription is not a pull subscription.",
        );
    }
    if watermark_from(watermark).is_none() {
        return op_error(op, "ErrorInvalidWatermark", "The watermark is invalid.");
    }
    sub.touch();
    // Offline, nothing is handed out: the answer is a status event at the same watermark.
    if !state.server_state().delivering() {
        let at = watermark_of(sub.cursor());
        return ok(herald_ews::get_events_ok(&Notification {
            subscription_id: id.to_owned(),
            previous_watermark: Some(watermark.to_owned()),
            more_events: Some(false),
            events: vec![EwsEvent::status(at)],
        }));
    }
    match dequeue(state.log(), &sub, MAX_EVENTS).await {
        Ok((mut events, cursor, more)) => {
            sub.advance(cursor);
            if events.is_empty() {
                events.push(EwsEvent::status(watermark_of(cursor)));
            }
            ok(herald_ews::get_events_ok(&Notification {
                subscription_id: id.to_owned(),
                previous_watermark: Some(watermark.to_owned()),
                more_events: Some(more),
                events,
            }))
        }
        Err(e) => {
            // EWS deletes a subscription whose events cannot be read.
            end(state, &sub, "close");
            let code = match e {
                ReadError::Expired { .. } => "ErrorEventNotFound",
                _ => "ErrorReadEventsFailed",
            };
            op_error(op, code, &format!("Reading events failed: {e}."))
        }
    }
}

/// The text of a refusal by a hook.
fn refusal(e: HookError<Infallible>) -> String {
    match e {
        HookError::Cancelled { hook, reason } => format!("Refused by {hook}: {reason}"),
        HookError::Failed(never) => match never {},
    }
}

async fn unsubscribe(state: &AppState, user: &Option<String>, id: &str) -> Response {
    let op = "Unsubscribe";
    let ews = state.ews();
    let sub = match ews.for_user(id, user, false) {
        Ok(s) => s,
        Err((code, text)) => return op_error(op, code, text),
    };
    if sub.kind == Kind::Push {
        // A push subscription ends only by the client answering Unsubscribe to a push.
        return op_error(
            op,
            "ErrorInvalidPullSubscriptionId",
            "Push subscriptions end when the client answers Unsubscribe.",
        );
    }
    let req = sub.cancel_request("unsubscribe", false);
    let ended = state
        .hooks()
        .run(&req, || {
            ews.remove(id);
            std::future::ready(Ok::<_, Infallible>(()))
        })
        .await;
    match ended {
        Ok(()) => ok(herald_ews::unsubscribe_ok()),
        Err(e) => op_error(op, "ErrorAccessDenied", &refusal(e)),
    }
}

fn get_folder(user: &Option<String>, headers: &HeaderMap, folders: &[FolderRef]) -> Response {
    let results: Vec<Result<FolderInfo, (String, String)>> = folders
        .iter()
        .map(|f| {
            let key = resolve_folder(f, user, headers).map_err(|(c, t)| (c.to_owned(), t))?;
            let name = key
                .as_str()
                .and_then(|s| s.rsplit('/').next())
                .unwrap_or_default()
                .to_owned();
            let distinguished = match f {
                FolderRef::Distinguished { id, .. } => Some(id.to_ascii_lowercase()),
                FolderRef::Id { .. } => None,
            };
            Ok(FolderInfo {
                id: id_of(&key),
                parent: key.parent().map(|p| id_of(&p)),
                display_name: name,
                distinguished,
                folder_class: "IPF.Note".into(),
            })
        })
        .collect();
    ok(herald_ews::get_folder(&results))
}

/// Counts an account's open streaming connections until dropped.
struct StreamPermit {
    state: AppState,
    owner: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut streams = self
            .state
            .ews()
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn streaming(
    state: &AppState,
    user: &Option<String>,
    ids: Vec<String>,
    timeout_minutes: u32,
) -> Response {
    let ews = state.ews();
    let mut subs = Vec::new();
    let mut bad = Vec::new();
    for id in &ids {
        match ews.get(id) {
            Some(s) if s.kind == Kind::Streaming => {
                if !s.belongs_to(user) {
                    return ok(herald_ews::streaming_error(
                        "ErrorSubscriptionAccessDenied",
                        "The subscription belongs to another account.",
                        std::slice::from_ref(id),
                    ));
                }
                subs.push(s);
            }
            _ => bad.push(id.clone()),
        }
    }
    if !bad.is_empty() {
        return ok(herald_ews::streaming_error(
            "ErrorInvalidSubscription",
            "Subscription is invalid.",
            &bad,
        ));
    }
    let owner = owner_name(user.as_deref()).to_owned();
    {
        let mut streams = ews.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = streams.entry(owner.clone()).or_default();
        if *n >= state.config().ews.max_streaming_connections {
            return op_error(
                "GetStreamingEvents",
                "ErrorExceededConnectionCount",
                "The account has as many streaming connections as it may.",
            );
        }
        *n += 1;
    }
    let permit = StreamPermit {
        state: state.clone(),
        owner: owner.clone(),
    };
    let conn_id = format!("ews-{}", uuid::Uuid::new_v4().simple());
    // What it follows: the subscriptions' mailbox (hooks and access rules judge keys).
    let mut mailboxes: Vec<String> = subs.iter().map(|s| format!("{}/", s.mailbox)).collect();
    mailboxes.dedup();
    let target = if mailboxes.len() == 1 {
        mailboxes.remove(0)
    } else {
        String::new()
    };
    let req = HookRequest::new(
        Operation::Connect,
        conn_id.clone(),
        owner.clone(),
        "ews",
        target.clone(),
    );
    let opened = state
        .hooks()
        .run(&req, || {
            std::future::ready(Ok::<_, Infallible>(state.connections().open(
                Some(conn_id.clone()),
                "ews",
                &owner,
                &target,
                Lease::Stream,
            )))
        })
        .await;
    let conn = match opened {
        Ok(c) => c,
        Err(e) => return op_error("GetStreamingEvents", "ErrorAccessDenied", &refusal(e)),
    };
    let body = Body::from_stream(stream_body(
        state.clone(),
        subs,
        state.config().ews.minute * timeout_minutes,
        permit,
        LiveConnection::new(conn, req, state.clone()),
    ));
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// What a subscription's follower tells the connection.
enum Feed {
    Batch(usize, herald_core::Batch),
    /// Another connection took the subscription over.
    TakenOver(usize),
    Failed(usize, String),
}

struct StreamState {
    state: AppState,
    subs: Vec<Arc<EwsSub>>,
    rx: tokio::sync::mpsc::Receiver<Feed>,
    queue: VecDeque<Bytes>,
    /// Cursor moves to apply once the chunk carrying their events has been taken.
    commit: Vec<(usize, Watermark)>,
    pending_commit: Vec<(usize, Watermark)>,
    heartbeat: tokio::time::Interval,
    deadline: tokio::time::Instant,
    done: bool,
    stop: CancellationToken,
    /// The connection's presence; dropping it runs the cancel hooks.
    live: LiveConnection,
    /// Offline, batches already fed wait here: no delivery starts once the gate closes.
    gate: herald_log::Gate,
    _permit: StreamPermit,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.stop.cancel();
        // A streaming subscription's idle clock starts when its last connection ends.
        for sub in &self.subs {
            sub.touch();
        }
    }
}

fn stream_body(
    state: AppState,
    subs: Vec<Arc<EwsSub>>,
    timeout: Duration,
    permit: StreamPermit,
    live: LiveConnection,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for (i, sub) in subs.iter().enumerate() {
        let mine = stop.child_token();
        // This connection now serves the subscription; an older one is told to let go.
        if let Some(old) = sub
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mine.clone())
        {
            old.cancel();
        }
        let (app, sub, tx) = (state.clone(), sub.clone(), tx.clone());
        let gone = sub.stop.clone();
        tokio::spawn(async move {
            let mut follower = match app.follow(sub.filter(), sub.cursor()) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Feed::Failed(i, e.to_string())).await;
                    return;
                }
            };
            loop {
                tokio::select! {
                    next = follower.next() => match next {
                        Ok(b) => {
                            if tx.send(Feed::Batch(i, b)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Feed::Failed(i, e.to_string())).await;
                            return;
                        }
                    },
                    () = mine.cancelled() => {
                        if !gone.is_cancelled() {
                            let _ = tx.try_send(Feed::TakenOver(i));
                        }
                        return;
                    }
                    () = gone.cancelled() => return,
                }
            }
        });
    }
    let gate = state.server_state().gate();
    let mut heartbeat = tokio::time::interval(state.config().ews.heartbeat);
    heartbeat.reset();
    let s = StreamState {
        state,
        subs,
        rx,
        queue: VecDeque::from([Bytes::from(herald_ews::streaming_status(false))]),
        commit: Vec::new(),
        pending_commit: Vec::new(),
        heartbeat,
        deadline: tokio::time::Instant::now() + timeout,
        done: false,
        stop,
        live,
        gate,
        _permit: permit,
    };
    futures_util::stream::unfold(s, |mut s| async move {
        // The previous chunk was taken by the connection: its events count as delivered.
        for (i, w) in s.commit.drain(..) {
            s.subs[i].advance(w);
        }
        loop {
            if let Some(chunk) = s.queue.pop_front() {
                s.commit = std::mem::take(&mut s.pending_commit);
                return Some((Ok(chunk), s));
            }
            if s.done {
                return None;
            }
            let shutdown = s.state.shutdown().clone();
            s.live.conn().renew();
            let expired = s.live.conn().expired().clone();
            let delivering = s.gate.is_open();
            tokio::select! {
                () = s.gate.changed() => {}
                feed = s.rx.recv(), if delivering => match feed {
                    Some(Feed::Batch(i, batch)) => {
                        let sub = s.subs[i].clone();
                        let last = batch.last_watermark();
                        let events: Vec<EwsEvent> = batch.iter().filter(|n| sub.selects(n)).filter_map(map::to_ews).collect();
                        if events.is_empty() {
                            if let Some(w) = last {
                                sub.advance(w);
                            }
                            continue;
                        }
                        let chunks: Vec<&[EwsEvent]> = events.chunks(MAX_EVENTS).collect();
                        for c in &chunks {
                            s.queue.push_back(Bytes::from(herald_ews::streaming_notifications(&[Notification {
                                subscription_id: sub.id.clone(),
                                previous_watermark: None,
                                more_events: Some(false),
                                events: c.to_vec(),
                            }])));
                        }
                        if let Some(w) = last {
                            s.pending_commit.push((i, w));
                        }
                    }
                    Some(Feed::TakenOver(i)) => {
                        let id = s.subs[i].id.clone();
                        s.queue.push_back(Bytes::from(herald_ews::response(
                            "GetStreamingEvents",
                            &[herald_ews::error_message(
                                "GetStreamingEvents",
                                "ErrorNewEventStreamConnectionOpened",
                                "A newer connection opened for this subscription.",
                                &format!("<m:ErrorSubscriptionIds><m:SubscriptionId>{id}</m:SubscriptionId></m:ErrorSubscriptionIds>"),
                            )],
                        )));
                    }
                    Some(Feed::Failed(i, why)) => {
                        let id = s.subs[i].id.clone();
                        s.queue.push_back(Bytes::from(herald_ews::streaming_error("ErrorReadEventsFailed", &why, &[id])));
                        s.done = true;
                    }
                    None => {
                        s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                        s.done = true;
                    }
                },
                _ = s.heartbeat.tick() => s.queue.push_back(Bytes::from(herald_ews::streaming_status(false))),
                () = tokio::time::sleep_until(s.deadline) => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    s.done = true;
                }
                () = expired.cancelled() => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    let why = s.live.conn().end_reason();
                    s.live.end(why);
                    s.done = true;
                }
                () = shutdown.cancelled() => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    s.live.end("shutdown");
                    s.done = true;
                }
            }
        }
    })
}

/// Delivers a push subscription: an initial StatusEvent, then events as they come, a
/// StatusEvent after StatusFrequency without events; ends when the client answers
/// Unsubscribe or when retries would exceed StatusFrequency.
async fn push_worker(state: AppState, sub: Arc<EwsSub>, url: String, frequency: Duration) {
    let first = sub.cursor();
    let status = Notification {
        subscription_id: sub.id.clone(),
        previous_watermark: Some(watermark_of(first)),
        more_events: Some(false),
        events: vec![EwsEvent::status(watermark_of(first))],
    };
    if !push(&state, &sub, &url, frequency, &status).await {
        return;
    }
    let mut follower = match state.follow(sub.filter(), sub.cursor()) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(id = %sub.id, error = %e, "EWS push subscription cannot follow; dropped");
            end(&state, &sub, "close");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            n = follower.next() => Some(n),
            () = tokio::time::sleep(frequency) => None,
            () = sub.stop.cancelled() => return,
        };
        match next {
            None => {
                let w = watermark_of(sub.cursor());
                let n = Notification {
                    subscription_id: sub.id.clone(),
                    previous_watermark: Some(w.clone()),
                    more_events: Some(false),
                    events: vec![EwsEvent::status(w)],
                };
                if !push(&state, &sub, &url, frequency, &n).await {
                    return;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(id = %sub.id, error = %e, "EWS push subscription stopped");
                end(&state, &sub, "close");
                return;
            }
            Some(Ok(batch)) => {
                let last = batch.last_watermark();
                let events: Vec<EwsEvent> = batch
                    .iter()
                    .filter(|n| sub.selects(n))
                    .filter_map(map::to_ews)
                    .collect();
                let chunks: Vec<&[EwsEvent]> = events.chunks(MAX_EVENTS).collect();
                for (k, c) in chunks.iter().enumerate() {
                    let n = Notification {
                        subscription_id: sub.id.clone(),
                        previous_watermark: Some(watermark_of(sub.cursor())),
                        more_events: Some(k + 1 < chunks.len()),
                        events: c.to_vec(),
                    };
                    if !push(&state, &sub, &url, frequency, &n).await {
                        return;
                    }
                    if let Some(w) = c
                        .last()
                        .and_then(|e| e.watermark.as_deref())
                        .and_then(watermark_from)
                    {
                        sub.advance(w);
                    }
                }
                if let Some(w) = last {
                    sub.advance(w);
                }
            }
        }
    }
}

/// POSTs one notification, retrying 30 s, 60 s, 120 s, … while the next wait stays within
/// StatusFrequency. Returns `false` when the subscription has ended (Unsubscribe answered,
/// retries exhausted, or deleted).
async fn push(
    state: &AppState,
    sub: &EwsSub,
    url: &str,
    frequency: Duration,
    n: &Notification,
) -> bool {
    let body = herald_ews::send_notification(n);
    let client = state.push_client();
    let mut wait = state.config().ews.push_retry_base;
    loop {
        // Offline, the attempt waits here; going offline waits for this one to finish.
        let push = tokio::select! {
            p = state.server_state().push() => p,
            () = sub.stop.cancelled() => return false,
        };
        let result = client
            .post(url)
            .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .body(body.clone())
            .send()
            .await;
        drop(push);
        match result {
            Ok(r) if r.status().is_success() => {
                sub.set_online(true);
                let reply = r.text().await.unwrap_or_default();
                crate::metrics::delivered_count("ews-push", n.events.len());
                return match herald_ews::parse_send_notification_result(&reply) {
                    SubscriptionStatus::Ok => true,
                    SubscriptionStatus::Unsubscribe => {
                        tracing::info!(id = %sub.id, "EWS push subscription ended by the client");
                        end(state, sub, "unsubscribe");
                        false
                    }
                };
            }
            Ok(r) => tracing::debug!(id = %sub.id, status = %r.status(), "EWS push failed"),
            Err(e) => tracing::debug!(id = %sub.id, error = %e, "EWS push failed"),
        }
        // Retries are half a minute apart or more: each failure is worth telling.
        sub.set_online(false);
        if wait > frequency {
            tracing::warn!(id = %sub.id, "EWS push subscription dropped after retries exceeded StatusFrequency");
            end(state, sub, "expiry");
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = sub.stop.cancelled() => return false,
        }
        wait *= 2;
    }
}

/// Removes a subscription that ended on its own (the client answered Unsubscribe, pushes
/// failed, its events can no longer be read), with its cancel hooks.
fn end(state: &AppState, sub: &EwsSub, reason: &str) {
    if state.ews().remove(&sub.id).is_some() {
        state.cancelled(sub.cancel_request(reason, true));
    }
}
