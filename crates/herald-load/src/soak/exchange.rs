//! The soak's Exchange clients: an EWS streaming subscriber (reconnecting
//! GetStreamingEvents, resubscribing from its last watermark after the restart), a MAPI/HTTP
//! session (NotificationWait, then Execute to fetch RopNotify), and their churn.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use herald_ews::{
    EventKind, EventType, Request, RequestEnvelope, Subscribe, SubscriptionKind, Target,
};
use herald_rop::mapihttp;
use herald_rop::mapihttp::{
    ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse, NotificationWaitResponse,
    ResponseStream,
};
use herald_rop::{
    Logon, NotificationScope, NotificationType, RegisterNotification, RopBuffer, RopRequest,
    RopResponse, decode_responses,
};
use rand::Rng;
use tokio::time::sleep;

use super::clients::{Shared, between, churn_gate, http, stream_http};
use super::track::{ChurnRecord, MapiSessionRecord, Tracker, g, transport_index};
use crate::now_micros;

pub(crate) const ALICE: (&str, &str) = ("alice@example.test", "alice-pw");
pub(crate) const BOB: (&str, &str) = ("bob@example.test", "bob-pw");

// ------------------------------------------------------------------------------------------
// EWS

/// An EWS watermark string for a log watermark.
fn watermark_of(w: u64) -> String {
    format!("HW{}", B64.encode(w.to_be_bytes()))
}

/// The log watermark of an EWS watermark string.
fn watermark_from(s: &str) -> Option<u64> {
    let b = B64.decode(s.strip_prefix("HW")?).ok()?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// The key an EWS item id names.
fn key_of(id: &str) -> Option<String> {
    String::from_utf8(B64.decode(id.strip_prefix("HK")?).ok()?).ok()
}

/// The publish time the alice producer put at the end of its keys.
fn sent_of(key: &str) -> Option<u64> {
    key.rsplit('-').next()?.parse().ok()
}

async fn ews_post(
    s: &Shared,
    http: &reqwest::Client,
    user: (&str, &str),
    request: Request,
) -> anyhow::Result<reqwest::Response> {
    let body = herald_ews::write_request(&RequestEnvelope {
        server_version: Some("Exchange2016".into()),
        request,
    });
    let r = http
        .post(s.url("/EWS/Exchange.asmx"))
        .basic_auth(user.0, Some(user.1))
        .header("content-type", "text/xml; charset=utf-8")
        .body(body)
        .send()
        .await?;
    if r.status() != 200 {
        anyhow::bail!("EWS: HTTP {}", r.status());
    }
    Ok(r)
}

fn text_of<'a>(xml: &'a str, element: &str) -> Option<&'a str> {
    let open = format!("<{element}>");
    let at = xml.find(&open)? + open.len();
    xml[at..].split('<').next()
}

/// Subscribes Alice's mailbox (all folders, created and new-mail events) after `after`;
/// the subscription id.
async fn ews_subscribe(
    s: &Shared,
    http: &reqwest::Client,
    kind: SubscriptionKind,
    after: u64,
) -> anyhow::Result<(String, Option<String>)> {
    let r = ews_post(
        s,
        http,
        ALICE,
        Request::Subscribe(Subscribe {
            kind,
            all_folders: true,
            folders: Vec::new(),
            event_types: vec![EventType::Created, EventType::NewMail],
            watermark: Some(watermark_of(after)),
        }),
    )
    .await?;
    let body = r.text().await?;
    match text_of(&body, "m:SubscriptionId") {
        Some(id) if body.contains("NoError") => Ok((
            id.to_owned(),
            text_of(&body, "m:Watermark").map(str::to_owned),
        )),
        _ => anyhow::bail!(
            "EWS Subscribe after {after}: {}",
            text_of(&body, "m:ResponseCode").unwrap_or(&body)
        ),
    }
}

/// Records the events of one EWS document; the notifications' watermark-carrying events.
fn ews_events(s: &Shared, t: &Tracker, doc: &str) -> Result<(), String> {
    let ns = herald_ews::parse_notification(doc).map_err(|e| e.to_string())?;
    for n in ns {
        for e in n.events {
            if e.kind == EventKind::Status {
                continue;
            }
            let w = e.watermark.as_deref().and_then(watermark_from);
            let key = match &e.target {
                Some(Target::Item(id) | Target::Folder(id)) => key_of(&id.id),
                None => None,
            };
            match (w, key) {
                (Some(w), Some(key)) => t.receive(&s.lat, w, &key, sent_of(&key)),
                _ => t.error(format!("an EWS event without watermark or id: {e:?}")),
            }
        }
    }
    Ok(())
}

/// The long-lived EWS streaming subscriber of Alice's mailbox: GetStreamingEvents with a
/// one-"minute" ConnectionTimeout, again after each `Closed`; after the restart (the
/// subscription is gone, as in Exchange) Subscribe again from the last watermark seen.
pub(crate) async fn ews_streaming(s: Arc<Shared>, t: Arc<Tracker>) {
    let http = stream_http();
    let short = super::clients::http(Duration::from_secs(10));
    let mut sub: Option<String> = None;
    'outer: while !s.stop.is_cancelled() {
        let id = match &sub {
            Some(id) => id.clone(),
            None => match ews_subscribe(&s, &short, SubscriptionKind::Streaming, t.last()).await {
                Ok((id, _)) => {
                    sub = Some(id.clone());
                    id
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if text.contains("ErrorInvalidWatermark") {
                        t.error(text);
                    }
                    sleep(Duration::from_millis(300)).await;
                    continue;
                }
            },
        };
        let r = ews_post(
            &s,
            &http,
            ALICE,
            Request::GetStreamingEvents {
                subscription_ids: vec![id],
                connection_timeout_minutes: 1,
            },
        )
        .await;
        let mut r = match r {
            Ok(r) => r,
            Err(_) => {
                sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        t.connected.store(true, Ordering::Relaxed);
        t.connections.fetch_add(1, Ordering::Relaxed);
        let mut buf = String::new();
        'conn: loop {
            let chunk = tokio::select! {
                () = s.stop.cancelled() => break 'outer,
                c = r.chunk() => c,
            };
            let Ok(Some(chunk)) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("</s:Envelope>") {
                let doc: String = buf.drain(..end + "</s:Envelope>".len()).collect();
                if doc.contains("ResponseClass=\"Error\"") {
                    if doc.contains("ErrorInvalidSubscription")
                        || doc.contains("ErrorSubscriptionNotFound")
                    {
                        sub = None;
                    } else {
                        t.error(format!(
                            "EWS streaming error: {}",
                            text_of(&doc, "m:ResponseCode").unwrap_or_default()
                        ));
                    }
                }
                if let Err(e) = ews_events(&s, &t, &doc) {
                    t.error(format!("EWS streaming document: {e}"));
                }
                if doc.contains("<m:ConnectionStatus>Closed</m:ConnectionStatus>") {
                    break 'conn;
                }
            }
        }
        t.connected.store(false, Ordering::Relaxed);
    }
    t.connected.store(false, Ordering::Relaxed);
}

/// EWS pull subscriptions that come and go: Subscribe after a recent watermark, GetEvents
/// once or twice, Unsubscribe (or, now and then, leave it to expire).
pub(crate) async fn churn_ews(s: Arc<Shared>) {
    let http = http(Duration::from_secs(10));
    while churn_gate(&s).await {
        s.churn_opened[3].fetch_add(1, Ordering::Relaxed);
        let after = s
            .ledger
            .max_w()
            .saturating_sub(rand::rng().random_range(0..400));
        let (id, mut watermark) = match ews_subscribe(
            &s,
            &http,
            SubscriptionKind::Pull { timeout_minutes: 1 },
            after,
        )
        .await
        {
            Ok((id, w)) => (id, w.unwrap_or_else(|| watermark_of(after))),
            Err(e) => {
                s.churn_error(format!("churn EWS: {e:#}"));
                sleep(between(0.2, 0.6)).await;
                continue;
            }
        };
        let mut received = Vec::new();
        let rounds = rand::rng().random_range(1..=2);
        for _ in 0..rounds {
            let r = ews_post(
                &s,
                &http,
                ALICE,
                Request::GetEvents {
                    subscription_id: id.clone(),
                    watermark: watermark.clone(),
                },
            )
            .await;
            let Ok(r) = r else { break };
            let Ok(doc) = r.text().await else { break };
            let Ok(ns) = herald_ews::parse_notification(&doc) else {
                break;
            };
            for n in ns {
                for e in n.events {
                    if let Some(w) = e.watermark.as_deref() {
                        watermark = w.to_owned();
                        if e.kind != EventKind::Status {
                            received.extend(watermark_from(w));
                        }
                    }
                }
            }
            sleep(between(0.1, 1.0)).await;
        }
        if rand::rng().random_bool(0.9) {
            let _ = ews_post(
                &s,
                &http,
                ALICE,
                Request::Unsubscribe {
                    subscription_id: id,
                },
            )
            .await;
        }
        s.churn.lock().unwrap().push(ChurnRecord {
            transport: "ews-pull",
            mask: g(4),
            after,
            received,
        });
        sleep(between(0.0, 0.5)).await;
    }
}

// ------------------------------------------------------------------------------------------
// MAPI over HTTP

/// A MAPI/HTTP client: one session cookie and its handle table.
struct Mapi {
    http: reqwest::Client,
    url: String,
    user: (&'static str, &'static str),
    cookie: Option<String>,
    /// The `MapiSequence` value the server set last.
    sequence: Option<String>,
    handles: Vec<u32>,
    counter: u32,
}

/// Why a MAPI request failed.
enum MapiError {
    /// X-ResponseCode (10: the session is gone).
    Code(u32),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for MapiError {
    fn from(e: anyhow::Error) -> Self {
        MapiError::Other(e)
    }
}

impl From<reqwest::Error> for MapiError {
    fn from(e: reqwest::Error) -> Self {
        MapiError::Other(e.into())
    }
}

impl std::fmt::Display for MapiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapiError::Code(c) => write!(f, "X-ResponseCode {c}"),
            MapiError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl Mapi {
    fn new(s: &Shared, user: (&'static str, &'static str), http: reqwest::Client) -> Mapi {
        Mapi {
            http,
            url: s.url(&format!("/mapi/emsmdb/?MailboxId={}", user.0)),
            user,
            cookie: None,
            sequence: None,
            handles: Vec::new(),
            counter: 0,
        }
    }

    async fn post(&mut self, request_type: &str, body: Vec<u8>) -> Result<Vec<u8>, MapiError> {
        self.counter += 1;
        let mut req = self
            .http
            .post(&self.url)
            .basic_auth(self.user.0, Some(self.user.1))
            .header("content-type", "application/mapi-http")
            .header("x-requesttype", request_type)
            .header(
                "x-requestid",
                format!("{{E2EA6C1C-E61B-49E9-9CFB-38184F907552}}:{}", self.counter),
            )
            .header("x-clientinfo", "{2F94A2BF-A2E6-4CCC-BF98-B5F22C542226}:1")
            .body(body);
        if let Some(h) = mapihttp::cookie_header(self.cookie.as_deref(), self.sequence.as_deref()) {
            req = req.header("cookie", h);
        }
        let r = req.send().await?;
        if r.status() != 200 {
            return Err(anyhow::anyhow!("MAPI {request_type}: HTTP {}", r.status()).into());
        }
        let code: u32 = r
            .headers()
            .get("x-responsecode")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX);
        for set in r.headers().get_all("set-cookie") {
            let Some((name, value)) = set.to_str().ok().and_then(mapihttp::parse_set_cookie) else {
                continue;
            };
            let value = value.map(str::to_owned);
            match name {
                mapihttp::CONTEXT_COOKIE => self.cookie = value,
                mapihttp::SEQUENCE_COOKIE => self.sequence = value,
                _ => {}
            }
        }
        let raw = r.bytes().await?;
        if code != 0 {
            return Err(MapiError::Code(code));
        }
        let stream = ResponseStream::parse(&raw)
            .map_err(|e| anyhow::anyhow!("MAPI {request_type} response: {e}"))?;
        Ok(stream.body)
    }

    async fn connect(&mut self) -> Result<(), MapiError> {
        let body = ConnectRequest {
            user_dn: format!("/o=Herald/cn=Recipients/cn={}", self.user.0),
            flags: 0,
            code_page: 1252,
            lcid_sort: 0x409,
            lcid_string: 0x409,
            aux: vec![],
        }
        .encode()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let answer = self.post("Connect", body).await?;
        match ConnectResponse::decode(&answer) {
            Ok(Ok(c)) if c.error_code == 0 => Ok(()),
            other => Err(anyhow::anyhow!("MAPI Connect: {other:?}").into()),
        }
    }

    async fn execute(&mut self, rops: &[RopRequest]) -> Result<Vec<RopResponse>, MapiError> {
        let mut bytes = Vec::new();
        for r in rops {
            r.encode(&mut bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let mut handles = self.handles.clone();
        handles.resize(handles.len().max(8), u32::MAX);
        let rop_buffer = RopBuffer {
            rops: bytes,
            handles,
        }
        .encode()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let body = ExecuteRequest {
            flags: 3,
            rop_buffer,
            max_rop_out: 0x10008,
            aux: vec![],
        }
        .encode();
        let answer = self.post("Execute", body).await?;
        let resp = match ExecuteResponse::decode(&answer) {
            Ok(Ok(r)) if r.error_code == 0 => r,
            other => return Err(anyhow::anyhow!("MAPI Execute: {other:?}").into()),
        };
        let buf = RopBuffer::decode(&resp.rop_buffer).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.handles = buf.handles;
        decode_responses(&buf.rops).map_err(|e| anyhow::anyhow!("MAPI ROPs: {e}").into())
    }

    /// Logs on and registers for created and new-mail notifications on the whole store.
    async fn logon_and_register(&mut self) -> Result<(), MapiError> {
        let answers = self
            .execute(&[
                RopRequest::Logon(Logon {
                    logon_id: 0,
                    output_handle_index: 0,
                    logon_flags: 1,
                    open_flags: 0x0100_0000,
                    store_state: 0,
                    essdn: format!("/o=Herald/cn=Recipients/cn={}", self.user.0),
                }),
                RopRequest::RegisterNotification(RegisterNotification {
                    logon_id: 0,
                    input_handle_index: 0,
                    output_handle_index: 1,
                    types: NotificationType::ObjectCreated as u16
                        | NotificationType::NewMail as u16,
                    scope: NotificationScope::WholeStore,
                }),
            ])
            .await?;
        match &answers[..] {
            [
                RopResponse::Logon { .. },
                RopResponse::RegisterNotification { .. },
                ..,
            ] => Ok(()),
            other => Err(anyhow::anyhow!("MAPI logon/register: {other:?}").into()),
        }
    }

    /// NotificationWait: whether notifications are pending.
    async fn wait(&mut self) -> Result<bool, MapiError> {
        let answer = self
            .post(
                "NotificationWait",
                herald_rop::mapihttp::notification_wait_request(),
            )
            .await?;
        match NotificationWaitResponse::decode(&answer) {
            Ok(Ok(w)) if w.error_code == 0 => Ok(w.event_pending),
            // ecExiting: the server is shutting down; the session ends with it.
            Ok(Ok(w)) if w.error_code == herald_rop::ec::EXITING => Err(MapiError::Code(18)),
            other => Err(anyhow::anyhow!("MAPI NotificationWait: {other:?}").into()),
        }
    }

    /// Empty Executes until nothing is pending: the message ids of the RopNotify, in order.
    async fn fetch(&mut self) -> Result<Vec<u64>, MapiError> {
        let mut mids = Vec::new();
        for _ in 0..1000 {
            let answers = self.execute(&[]).await?;
            let mut pending = false;
            for a in &answers {
                match a {
                    RopResponse::Notify(n) => {
                        if let Some(m) = n.data.message_id {
                            mids.push(m.counter);
                        }
                    }
                    RopResponse::Pending { .. } => pending = true,
                    _ => {}
                }
            }
            if !pending {
                break;
            }
        }
        Ok(mids)
    }

    async fn disconnect(&mut self) {
        let _ = self.post("Disconnect", Vec::new()).await;
    }
}

/// The long-lived MAPI client of Bob's mailbox: a session registered for the whole store,
/// NotificationWait then Execute to fetch, as long as the session lives; a new session when
/// it is gone (after the restart).
pub(crate) async fn mapi(s: Arc<Shared>, t: Arc<Tracker>) {
    let lat_index = transport_index("mapi");
    'outer: while !s.stop.is_cancelled() {
        let mut c = Mapi::new(&s, BOB, http(Duration::from_secs(40)));
        if c.connect().await.is_err() || c.logon_and_register().await.is_err() {
            sleep(Duration::from_millis(300)).await;
            continue;
        }
        let index = {
            let mut sessions = s.mapi_sessions.lock().unwrap();
            sessions.push(MapiSessionRecord {
                registered_us: now_micros(),
                ..Default::default()
            });
            sessions.len() - 1
        };
        t.connected.store(true, Ordering::Relaxed);
        t.connections.fetch_add(1, Ordering::Relaxed);
        loop {
            let pending = tokio::select! {
                () = s.stop.cancelled() => break 'outer,
                p = c.wait() => p,
            };
            let fetched = match pending {
                Ok(_) => c.fetch().await,
                Err(e) => Err(e),
            };
            match fetched {
                Ok(mids) => {
                    for m in &mids {
                        let sent = s.ledger.mapi_event(*m).map(|e| e.sent_us);
                        s.lat.record(lat_index, sent);
                    }
                    s.mapi_sessions.lock().unwrap()[index].mids.extend(mids);
                }
                Err(e) => {
                    if !matches!(e, MapiError::Code(10 | 18))
                        && !e.to_string().contains("error sending")
                    {
                        t.error(format!("MAPI session {index}: {e}"));
                    }
                    break;
                }
            }
        }
        s.mapi_sessions.lock().unwrap()[index].ended = true;
        t.connected.store(false, Ordering::Relaxed);
        sleep(Duration::from_millis(200)).await;
    }
    t.connected.store(false, Ordering::Relaxed);
}

/// MAPI sessions that come and go: Connect, Logon, register, an Execute or two, Disconnect
/// (or, now and then, leave it to expire).
pub(crate) async fn churn_mapi(s: Arc<Shared>) {
    let http = http(Duration::from_secs(10));
    while churn_gate(&s).await {
        s.churn_opened[4].fetch_add(1, Ordering::Relaxed);
        let mut c = Mapi::new(&s, ALICE, http.clone());
        let opened = match c.connect().await {
            Ok(()) => c.logon_and_register().await,
            Err(e) => Err(e),
        };
        if let Err(e) = opened {
            s.churn_error(format!("churn MAPI: {e}"));
            sleep(between(0.2, 0.6)).await;
            continue;
        }
        let rounds = rand::rng().random_range(1..=2);
        for _ in 0..rounds {
            sleep(between(0.2, 1.5)).await;
            if c.fetch().await.is_err() {
                break;
            }
        }
        if rand::rng().random_bool(0.9) {
            c.disconnect().await;
        }
        sleep(between(0.0, 0.5)).await;
    }
}
