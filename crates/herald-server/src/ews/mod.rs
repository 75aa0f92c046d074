//! `POST /EWS/Exchange.asmx`: Exchange Web Services notifications over Herald's log.
//!
//! Pull (GetEvents dequeues at most 50 events; a StatusEvent when empty; Timeout expiry),
//! streaming (one chunked response of whole envelopes, heartbeats, Closed at
//! ConnectionTimeout, subscriptions outliving their connection), push (SendNotification with
//! an initial StatusEvent, keep-alives after StatusFrequency without a notification to this
//! subscription, the client's OK/Unsubscribe, doubling retries within StatusFrequency,
//! `ErrorReadEventsFailed` when its events can no longer be read). Watermarks are Herald's log
//! watermarks, so resubscribing from one misses nothing. Errors are EWS response messages.
//! Feeds, pages, pushes and sessions are the delivery layer's; this module speaks EWS.

pub mod map;
mod shared;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use herald_core::{EventMask, Filter, Key, Notification as HNotification, Scope, Watermark};
use herald_delivery::{
    Backoff, Connect, ConnectError, Cursor, Delivery, EndReason, FeedItem, GiveUp, Lease, Live,
    PageRequest, Pushed, Pusher, Quota, QuotaPermit, Registry, RetryPolicy, Session, Transport,
};
use herald_ews::{
    EventType, EwsEvent, FolderInfo, FolderRef, Notification, Request, Subscribe, SubscriptionKind,
    SubscriptionStatus,
};
use herald_log::{EventLog, FollowError, ReadError};
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;

use crate::Log;
use crate::config::EwsConfig;
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
    Push { url: String, frequency: Duration },
    Streaming,
}

/// One EWS subscription (the registry's session adds its id, stop signal, idle clock and
/// connection).
pub struct EwsSub {
    owner: Option<String>,
    mailbox: Key,
    /// `None`: every folder of the mailbox.
    folders: Option<Vec<Key>>,
    types: Vec<EventType>,
    kind: Kind,
    /// What the client has been given (an EWS subscription's position lives in memory).
    cursor: Cursor,
    /// The streaming connection currently serving it.
    stream: Mutex<Option<CancellationToken>>,
}

type SubRef = Arc<Session<EwsSub>>;

impl EwsSub {
    fn cursor(&self) -> Watermark {
        self.cursor.acked()
    }

    fn advance(&self, w: Watermark) {
        self.cursor.advance(w);
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
            // What is in a folder (the engine's children scope) and the folder's own changes
            // (its unread count), as in Exchange.
            Some(fs) => fs.iter().any(|f| {
                Scope::Children(f.clone()).selects(n) || Scope::Exact(f.clone()).selects(n)
            }),
        }
    }

    fn filter(&self) -> Filter {
        Filter {
            scope: Scope::Subtree(self.mailbox.clone()),
            mask: EventMask::ALL,
        }
    }

    /// What it selects, for a feed.
    fn select(sub: &SubRef) -> herald_delivery::Select {
        let sub = sub.clone();
        Arc::new(move |n| sub.selects(n) && map::to_ews(n).is_some())
    }
}

/// Every EWS subscription of this server, and what serving them needs; cheap to clone.
#[derive(Clone)]
pub struct Ews {
    inner: Arc<EwsInner>,
}

struct EwsInner {
    delivery: Delivery<Log>,
    config: EwsConfig,
    egress: crate::egress::EgressPolicy,
    /// The outbound client for push notifications (egress policy applied).
    push_client: reqwest::Client,
    subs: Registry<EwsSub>,
    /// Streaming connections each account holds.
    streams: Quota,
    /// In a cluster, what the nodes share: push subscriptions live there too, so that
    /// another node takes one over when its node dies.
    cluster: Option<herald_jetstream::Cluster>,
}
/// EWS minutes a streaming subscription outlives its last connection.
const STREAMING_IDLE_MINUTES: u32 = 30;

impl Ews {
    /// The endpoint's state over `delivery`.
    pub fn new(
        delivery: Delivery<Log>,
        config: EwsConfig,
        egress: crate::egress::EgressPolicy,
        push_client: reqwest::Client,
        cluster: Option<herald_jetstream::Cluster>,
    ) -> Ews {
        Ews {
            inner: Arc::new(EwsInner {
                subs: delivery.registry(),
                delivery,
                config,
                egress,
                push_client,
                streams: Quota::default(),
                cluster,
            }),
        }
    }

    fn delivery(&self) -> &Delivery<Log> {
        &self.inner.delivery
    }

    /// The subscription `id` if `user` may use it, else the EWS error code and text. An
    /// expired id is `ErrorExpiredSubscription` when `tell_expired` (GetEvents), else not found.
    fn for_user(
        &self,
        id: &str,
        user: &Option<String>,
        tell_expired: bool,
    ) -> Result<SubRef, (&'static str, &'static str)> {
        let Some(sub) = self.inner.subs.peek(id) else {
            if tell_expired && self.inner.subs.was_expired(id) {
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

    /// Removes pull subscriptions past their Timeout without a GetEvents, and streaming
    /// subscriptions that have had no connection for 30 EWS minutes. Returns how many.
    pub fn expire(&self) -> usize {
        let minute = self.inner.config.minute;
        self.inner
            .subs
            .expire(|s, idle| match s.kind {
                Kind::Pull { timeout } => idle > timeout,
                Kind::Streaming => !s.connected() && idle > minute * STREAMING_IDLE_MINUTES,
                Kind::Push { .. } => false,
            })
            .len()
    }

    /// Ends every subscription (at shutdown): they live in memory and end with the process;
    /// their cancel hooks hear it. In a cluster, push subscriptions stay (without hooks):
    /// another node takes them over.
    pub fn stop_all(&self) {
        let clustered = self.inner.cluster.is_some();
        self.inner
            .subs
            .stop_all(|s| clustered && matches!(s.kind, Kind::Push { .. }));
    }

    /// Ends subscription `id` (an operator's kick of an EWS push endpoint, whose hooks ran);
    /// whether it existed.
    pub fn kick(&self, id: &str) -> bool {
        let kicked = self.inner.subs.take(id);
        if let Some(sub) = &kicked {
            shared::unshare(self, sub);
        }
        kicked.is_some()
    }

    /// Ends a subscription that ended on its own (the client answered Unsubscribe, pushes
    /// failed, its events can no longer be read); its cancel hooks run.
    fn end(&self, sub: &SubRef, reason: EndReason) {
        if self.inner.subs.remove_this(sub, reason) {
            shared::unshare(self, sub);
        }
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

/// `GET /EWS/Services.wsdl`: the service description SOAP toolkits build clients from, its
/// address the `Exchange.asmx` of the host the client asked (`X-Forwarded-Proto: https`
/// behind a TLS proxy). Public, like Exchange's: it describes the service and serves nothing.
pub async fn services_wsdl(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let scheme = match headers.get("x-forwarded-proto").map(|v| v.as_bytes()) {
        Some(b"https") => "https",
        _ => "http",
    };
    let endpoint = format!("{scheme}://{host}/EWS/Exchange.asmx");
    ok(herald_ews::wsdl::services_wsdl(&endpoint))
}

/// `GET /EWS/messages.xsd`, imported by the service description.
pub async fn messages_xsd() -> Response {
    ok(herald_ews::wsdl::MESSAGES_XSD.to_owned())
}

/// `GET /EWS/types.xsd`, imported by `messages.xsd`.
pub async fn types_xsd() -> Response {
    ok(herald_ews::wsdl::TYPES_XSD.to_owned())
}

/// The EWS endpoint.
pub async fn handle(
    State(ews): State<Ews>,
    State(auth): State<Arc<crate::auth::Auth>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = match auth.basic_user(&headers) {
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
        Request::Subscribe(s) => subscribe(&ews, &user, &headers, s).await,
        Request::GetEvents {
            subscription_id,
            watermark,
        } => get_events(&ews, &user, &subscription_id, &watermark).await,
        Request::GetStreamingEvents {
            subscription_ids,
            connection_timeout_minutes,
        } => streaming(&ews, &user, subscription_ids, connection_timeout_minutes).await,
        Request::Unsubscribe { subscription_id } => {
            unsubscribe(&ews, &user, &subscription_id).await
        }
        Request::GetFolder { folders } => get_folder(&user, &headers, &folders),
    }
}

async fn subscribe(
    ews: &Ews,
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
    let config = &ews.inner.config;
    if ews.inner.subs.count(|s| s.mailbox == mailbox)
        >= config.max_subscriptions_per_mailbox as usize
    {
        return op_error(
            op,
            "ErrorExceededSubscriptionCount",
            "The mailbox has as many subscriptions as it may.",
        );
    }
    let bounds = match ews.delivery().log().bounds() {
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
    let minute = config.minute;
    let (kind, push) = match &s.kind {
        SubscriptionKind::Pull { timeout_minutes } => (
            Kind::Pull {
                timeout: minute * *timeout_minutes,
            },
            false,
        ),
        SubscriptionKind::Push {
            status_frequency_minutes,
            url,
        } => {
            if url.is_empty() || url.len() > 2082 || ews.inner.egress.check_url(url).is_err() {
                return op_error(
                    op,
                    "ErrorInvalidPushSubscriptionUrl",
                    "The push subscription URL is invalid.",
                );
            }
            (
                Kind::Push {
                    url: url.clone(),
                    frequency: minute * *status_frequency_minutes,
                },
                true,
            )
        }
        SubscriptionKind::Streaming => (Kind::Streaming, false),
    };
    let id = format!("HS{}", uuid::Uuid::new_v4().simple());
    // A shared push subscription moves between nodes: its id names none.
    let id = if push && ews.inner.cluster.is_some() {
        id
    } else {
        ews.delivery().connections().node_named(id)
    };
    let connect = Connect {
        id: id.clone(),
        owner: owner_name(user.as_deref()).to_owned(),
        transport: Transport::Ews,
        target: format!("{mailbox}/"),
    };
    // A push endpoint is a connection whose state follows the pushes.
    let lease = push.then_some(Lease::None);
    let made = ews
        .delivery()
        .lifecycle()
        .connect(connect, lease, || {
            std::future::ready(Ok::<_, Infallible>(()))
        })
        .await;
    let live = match made {
        Ok(((), live)) => live,
        Err(e) => return op_error(op, "ErrorAccessDenied", &refusal(e)),
    };
    let sub = ews.inner.subs.insert(
        id.clone(),
        EwsSub {
            owner: user.clone(),
            mailbox,
            folders: (!s.all_folders).then_some(folders),
            types: s.event_types.clone(),
            kind: kind.clone(),
            cursor: Cursor::new(start),
            stream: Mutex::new(None),
        },
        Some(live),
    );
    tracing::debug!(%id, ?kind, "EWS subscription created");
    if push {
        if let Err(e) = shared::start_push(ews, &sub).await {
            ews.end(&sub, EndReason::Close);
            return op_error(op, "ErrorInternalServerError", &e.to_string());
        }
    }
    let watermark = (kind != Kind::Streaming).then(|| watermark_of(start));
    ok(herald_ews::subscribe_ok(&id, watermark.as_deref()))
}

async fn get_events(ews: &Ews, user: &Option<String>, id: &str, watermark: &str) -> Response {
    let op = "GetEvents";
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
    let cursor = sub.cursor();
    // Offline, nothing is handed out (the page stops at the cursor): the answer is a status
    // event at the same watermark.
    let page = ews
        .delivery()
        .page(
            PageRequest {
                after: cursor,
                limit: MAX_EVENTS,
                scan_budget: SCAN_BUDGET,
                ceiling: Watermark(u64::MAX),
            },
            cursor,
            |n| sub.selects(n) && map::to_ews(n).is_some(),
        )
        .await;
    match page {
        Ok(page) => {
            sub.advance(page.cursor);
            let mut events: Vec<EwsEvent> = page.events.iter().filter_map(map::to_ews).collect();
            if events.is_empty() {
                events.push(EwsEvent::status(watermark_of(page.cursor)));
            }
            ok(herald_ews::get_events_ok(&Notification {
                subscription_id: id.to_owned(),
                previous_watermark: Some(watermark.to_owned()),
                more_events: Some(page.more),
                events,
            }))
        }
        Err(e) => {
            // EWS deletes a subscription whose events cannot be read.
            ews.end(&sub, EndReason::Close);
            let code = match e {
                ReadError::Expired { .. } => "ErrorEventNotFound",
                _ => "ErrorReadEventsFailed",
            };
            op_error(op, code, &format!("Reading events failed: {e}."))
        }
    }
}

/// The text of a refusal.
fn refusal<E: std::fmt::Display>(e: ConnectError<E>) -> String {
    match e {
        ConnectError::Refused { hook, reason } => format!("Refused by {hook}: {reason}"),
        other => other.to_string(),
    }
}

async fn unsubscribe(ews: &Ews, user: &Option<String>, id: &str) -> Response {
    let op = "Unsubscribe";
    let sub = match ews.for_user(id, user, false) {
        Ok(s) => s,
        Err((code, text)) => return op_error(op, code, text),
    };
    if matches!(sub.kind, Kind::Push { .. }) {
        // A push subscription ends only by the client answering Unsubscribe to a push.
        return op_error(
            op,
            "ErrorInvalidPullSubscriptionId",
            "Push subscriptions end when the client answers Unsubscribe.",
        );
    }
    let Some(req) = sub.live().as_ref().map(|l| l.request().clone()) else {
        return op_error(
            op,
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
        );
    };
    let ended = ews
        .delivery()
        .lifecycle()
        .run(&req.cancel("unsubscribe", false), || {
            ews.inner.subs.take(id);
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

async fn streaming(
    ews: &Ews,
    user: &Option<String>,
    ids: Vec<String>,
    timeout_minutes: u32,
) -> Response {
    let mut subs = Vec::new();
    let mut bad = Vec::new();
    for id in &ids {
        match ews.inner.subs.peek(id) {
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
    let max = ews.inner.config.max_streaming_connections;
    let Some(permit) = ews.inner.streams.acquire(&owner, Some(max)) else {
        return op_error(
            "GetStreamingEvents",
            "ErrorExceededConnectionCount",
            "The account has as many streaming connections as it may.",
        );
    };
    // What it follows: the subscriptions' mailbox (hooks and access rules judge keys).
    let mut mailboxes: Vec<String> = subs.iter().map(|s| format!("{}/", s.mailbox)).collect();
    mailboxes.dedup();
    let target = if mailboxes.len() == 1 {
        mailboxes.remove(0)
    } else {
        String::new()
    };
    let connect = ews
        .delivery()
        .lifecycle()
        .fresh(Transport::Ews, owner, target);
    let opened = ews
        .delivery()
        .lifecycle()
        .connect(connect, Some(Lease::Stream), || {
            std::future::ready(Ok::<_, Infallible>(()))
        })
        .await;
    let live = match opened {
        Ok(((), live)) => live,
        Err(e) => return op_error("GetStreamingEvents", "ErrorAccessDenied", &refusal(e)),
    };
    let body = Body::from_stream(stream_body(
        ews.clone(),
        subs,
        ews.inner.config.minute * timeout_minutes,
        permit,
        live,
    ));
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// What one subscription of a streaming connection yields.
enum SubItem {
    Feed(Result<FeedItem, FollowError>),
    /// Another connection took the subscription over.
    TakenOver,
}

type SubStream = Pin<Box<dyn Stream<Item = SubItem> + Send>>;

struct StreamState {
    ews: Ews,
    subs: Vec<SubRef>,
    feeds: StreamMap<usize, SubStream>,
    queue: VecDeque<Bytes>,
    /// Cursor moves to apply once the chunk carrying their events has been taken.
    commit: Vec<(usize, Watermark)>,
    pending_commit: Vec<(usize, Watermark)>,
    heartbeat: tokio::time::Interval,
    deadline: tokio::time::Instant,
    done: bool,
    /// Cancels this connection's hold on its subscriptions when it ends.
    stop: CancellationToken,
    /// The connection's presence; dropping it runs the cancel hooks.
    live: Live,
    _permit: QuotaPermit,
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

/// The merged feeds of a streaming connection's subscriptions (no task per subscription):
/// each ends when its subscription ends, and says so when another connection takes it over.
fn sub_stream(ews: &Ews, sub: &SubRef, mine: CancellationToken) -> SubStream {
    let feed = match ews.delivery().feed(sub.filter(), sub.cursor()) {
        Ok(f) => f.select(EwsSub::select(sub)).into_stream().left_stream(),
        Err(e) => futures_util::stream::once(async { Err(e) }).right_stream(),
    };
    let taken_over =
        futures_util::stream::once(mine.cancelled_owned()).map(|()| SubItem::TakenOver);
    let gone = sub.stop().clone().cancelled_owned();
    Box::pin(futures_util::stream::select(feed.map(SubItem::Feed), taken_over).take_until(gone))
}

fn stream_body(
    ews: Ews,
    subs: Vec<SubRef>,
    timeout: Duration,
    permit: QuotaPermit,
    live: Live,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    let stop = CancellationToken::new();
    let mut feeds = StreamMap::new();
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
        feeds.insert(i, sub_stream(&ews, sub, mine));
    }
    let mut heartbeat = tokio::time::interval(ews.inner.config.heartbeat);
    heartbeat.reset();
    let s = StreamState {
        subs,
        feeds,
        queue: VecDeque::from([Bytes::from(herald_ews::streaming_status(false))]),
        commit: Vec::new(),
        pending_commit: Vec::new(),
        heartbeat,
        deadline: tokio::time::Instant::now() + timeout,
        done: false,
        stop,
        live,
        ews,
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
            let shutdown = s.ews.delivery().shutdown().clone();
            s.live.renew();
            tokio::select! {
                Some((i, item)) = s.feeds.next(), if !s.feeds.is_empty() => match item {
                    SubItem::Feed(Ok(FeedItem::Events { batch, cursor })) => {
                        let sub = s.subs[i].clone();
                        let events: Vec<EwsEvent> = batch.iter().filter_map(map::to_ews).collect();
                        for c in events.chunks(MAX_EVENTS) {
                            s.queue.push_back(Bytes::from(herald_ews::streaming_notifications(&[Notification {
                                subscription_id: sub.id().to_owned(),
                                previous_watermark: None,
                                more_events: Some(false),
                                events: c.to_vec(),
                            }])));
                        }
                        s.pending_commit.push((i, cursor));
                    }
                    SubItem::Feed(Ok(FeedItem::KeepAlive { .. })) => {}
                    SubItem::TakenOver => {
                        s.feeds.remove(&i);
                        let id = s.subs[i].id().to_owned();
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
                    SubItem::Feed(Err(e)) => {
                        let id = s.subs[i].id().to_owned();
                        s.queue.push_back(Bytes::from(herald_ews::streaming_error("ErrorReadEventsFailed", &e.to_string(), &[id])));
                        s.done = true;
                    }
                },
                _ = s.heartbeat.tick() => s.queue.push_back(Bytes::from(herald_ews::streaming_status(false))),
                () = tokio::time::sleep_until(s.deadline) => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    s.done = true;
                }
                why = s.live.expired() => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    s.live.end(why);
                    s.done = true;
                }
                () = shutdown.cancelled() => {
                    s.queue.push_back(Bytes::from(herald_ews::streaming_status(true)));
                    s.live.end(EndReason::Shutdown);
                    s.done = true;
                }
            }
        }
    })
}

/// The retry policy of EWS push: 30 s, 60 s, 120 s, … (with jitter) while the next wait
/// stays within StatusFrequency; then the subscription is dropped. Every failure takes the
/// endpoint offline (retries are half a minute apart or more: each is worth telling).
fn push_policy(base: Duration, frequency: Duration) -> RetryPolicy {
    RetryPolicy {
        backoff: Backoff {
            base,
            cap: frequency,
        },
        give_up: GiveUp::BeyondCap,
        honour_retry_after: false,
        offline_after: 1,
    }
}

/// POSTs one push body until the client takes it; whether the subscription goes on (the
/// client answered OK). Ends the subscription otherwise.
async fn push(
    ews: &Ews,
    sub: &SubRef,
    pusher: &Pusher,
    url: &str,
    body: String,
    events: usize,
) -> bool {
    let client = &ews.inner.push_client;
    let pushed = pusher
        .push(
            |online| sub.set_online(online),
            sub.stop(),
            || {
                crate::egress::attempt(
                    client
                        .post(url)
                        .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
                        .body(body.clone()),
                )
            },
        )
        .await;
    match pushed {
        Pushed::Delivered(reply) => {
            crate::metrics::delivered_count("ews-push", events);
            match herald_ews::parse_send_notification_result(&String::from_utf8_lossy(&reply)) {
                SubscriptionStatus::Ok => true,
                SubscriptionStatus::Unsubscribe => {
                    tracing::info!(id = %sub.id(), "EWS push subscription ended by the client");
                    ews.end(sub, EndReason::Unsubscribe);
                    false
                }
            }
        }
        Pushed::GaveUp(error) | Pushed::Gone(error) => {
            tracing::warn!(id = %sub.id(), %error, "EWS push subscription dropped after retries exceeded StatusFrequency");
            ews.end(sub, EndReason::Expiry);
            false
        }
        Pushed::Stopped => false,
    }
}

/// Delivers a push subscription: an initial StatusEvent, then events as they come, a
/// StatusEvent after StatusFrequency without a notification to it; ends when the client
/// answers Unsubscribe, when retries would exceed StatusFrequency, or, after telling the
/// client `ErrorReadEventsFailed`, when its events can no longer be read.
async fn push_worker(ews: Ews, sub: SubRef) {
    let Kind::Push { url, frequency } = sub.kind.clone() else {
        return;
    };
    let pusher = ews.delivery().pusher(
        "ews-push",
        push_policy(ews.inner.config.push_retry_base, frequency),
    );
    let status = |w: Watermark| {
        herald_ews::send_notification(&Notification {
            subscription_id: sub.id().to_owned(),
            previous_watermark: Some(watermark_of(w)),
            more_events: Some(false),
            events: vec![EwsEvent::status(watermark_of(w))],
        })
    };
    if !push(&ews, &sub, &pusher, &url, status(sub.cursor()), 0).await {
        return;
    }
    let mut feed = match ews.delivery().feed(sub.filter(), sub.cursor()) {
        Ok(f) => f.select(EwsSub::select(&sub)).keepalive(frequency),
        Err(e) => return read_failed(&ews, &sub, &pusher, &url, &e).await,
    };
    loop {
        match feed.next().await {
            Ok(FeedItem::KeepAlive { cursor }) => {
                sub.advance(cursor);
                if !push(&ews, &sub, &pusher, &url, status(sub.cursor()), 0).await {
                    return;
                }
                shared::store_cursor(&ews, &sub).await;
            }
            Ok(FeedItem::Events { batch, cursor }) => {
                let events: Vec<EwsEvent> = batch.iter().filter_map(map::to_ews).collect();
                let chunks: Vec<&[EwsEvent]> = events.chunks(MAX_EVENTS).collect();
                for (k, c) in chunks.iter().enumerate() {
                    let n = Notification {
                        subscription_id: sub.id().to_owned(),
                        previous_watermark: Some(watermark_of(sub.cursor())),
                        more_events: Some(k + 1 < chunks.len()),
                        events: c.to_vec(),
                    };
                    let body = herald_ews::send_notification(&n);
                    if !push(&ews, &sub, &pusher, &url, body, c.len()).await {
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
                sub.advance(cursor);
                shared::store_cursor(&ews, &sub).await;
            }
            Err(e) => return read_failed(&ews, &sub, &pusher, &url, &e).await,
        }
    }
}

/// Tells the client its subscription's events can no longer be read, and ends it: the
/// client recreates it from the last watermark it holds.
async fn read_failed(ews: &Ews, sub: &SubRef, pusher: &Pusher, url: &str, e: &FollowError) {
    tracing::warn!(id = %sub.id(), error = %e, "EWS push subscription cannot read its events");
    let body = herald_ews::send_notification_error(
        "ErrorReadEventsFailed",
        &format!("Reading events failed: {e}."),
        sub.id(),
    );
    // Whatever the client answers, the subscription is gone.
    if push(ews, sub, pusher, url, body, 0).await {
        ews.end(sub, EndReason::Close);
    }
}
