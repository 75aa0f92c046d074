//! The soak's producers and its JSON-API subscribers: SSE, WebSocket, durable long-poll, a
//! webhook receiver, and the short-lived ("churn") clients of those transports.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use super::track::{ChurnRecord, Lat, Ledger, MapiSessionRecord, Tracker, g};
use crate::now_micros;

/// The producers' (and operators') API key.
pub(crate) const API_KEY: &str = "soak-producer-key-0123456789abcdef";

/// What every client shares.
pub(crate) struct Shared {
    pub(crate) base: String,
    pub(crate) port: u16,
    pub(crate) ledger: Ledger,
    pub(crate) lat: Lat,
    /// Ends every client.
    pub(crate) stop: CancellationToken,
    pub(crate) stop_producers: CancellationToken,
    pub(crate) stop_churn: CancellationToken,
    /// Churn clients start no new connection while set.
    pub(crate) churn_paused: AtomicBool,
    pub(crate) churn: Mutex<Vec<ChurnRecord>>,
    /// Churn connections opened, per kind (sse, websocket, long-poll, ews, mapi).
    pub(crate) churn_opened: [AtomicU64; 5],
    /// Churn connections that failed (outside the restart these are worth a look).
    pub(crate) churn_failed: AtomicU64,
    pub(crate) churn_first_error: Mutex<Option<String>>,
    pub(crate) mapi_sessions: Mutex<Vec<MapiSessionRecord>>,
    /// Publish rate multiplier.
    pub(crate) rate: f64,
    /// Events published (answered or not).
    pub(crate) published: AtomicU64,
}

pub(crate) const CHURN_KINDS: [&str; 5] = ["sse", "websocket", "long-poll", "ews-pull", "mapi"];

impl Shared {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn churn_error(&self, what: String) {
        self.churn_failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.churn_first_error.lock().unwrap();
        if e.is_none() {
            *e = Some(what);
        }
    }
}

/// A random duration between `a` and `b` seconds.
pub(crate) fn between(a: f64, b: f64) -> Duration {
    Duration::from_secs_f64(rand::rng().random_range(a..b))
}

/// A client for short requests.
pub(crate) fn http(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("http client")
}

/// A client for streams (no overall timeout).
pub(crate) fn stream_http() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

// ------------------------------------------------------------------------------------------
// Producers

/// One producer: a group of keys, a rate, a batch size, and whether it sends an
/// Idempotency-Key (and retries until answered) or sends once (a failure is unacknowledged).
#[derive(Clone, Copy)]
pub(crate) struct ProducerSpec {
    pub(crate) name: &'static str,
    pub(crate) group: u8,
    /// Events per second.
    pub(crate) rate: f64,
    pub(crate) batch: (u64, u64),
    pub(crate) idempotent: bool,
}

pub(crate) const PRODUCERS: [ProducerSpec; 7] = [
    ProducerSpec {
        name: "m0-a",
        group: 0,
        rate: 8.0,
        batch: (1, 3),
        idempotent: false,
    },
    ProducerSpec {
        name: "m0-b",
        group: 0,
        rate: 8.0,
        batch: (1, 1),
        idempotent: false,
    },
    ProducerSpec {
        name: "m1",
        group: 1,
        rate: 15.0,
        batch: (1, 5),
        idempotent: true,
    },
    ProducerSpec {
        name: "m2",
        group: 2,
        rate: 20.0,
        batch: (10, 10),
        idempotent: true,
    },
    ProducerSpec {
        name: "hot",
        group: 3,
        rate: 10.0,
        batch: (1, 1),
        idempotent: false,
    },
    ProducerSpec {
        name: "alice",
        group: 4,
        rate: 10.0,
        batch: (1, 2),
        idempotent: true,
    },
    ProducerSpec {
        name: "bob",
        group: 5,
        rate: 10.0,
        batch: (1, 2),
        idempotent: false,
    },
];

/// The MAPI message id counter of a key: replica 1 and the first 48 bits of its SHA-256 (as
/// `herald-server`'s `mapi::map::id_of`).
pub(crate) fn mapi_counter(key: &str) -> u64 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&h[..6]);
    herald_rop::GlobalId::new(1, u64::from_be_bytes(b).max(1)).counter
}

fn event(spec: &ProducerSpec, seq: u64, ts: u64) -> (String, Value) {
    let p = spec.name;
    match spec.group {
        0 => {
            let key = format!("soak/m0/{p}-{seq}");
            let v = json!({"key": key, "kind": "object_modified", "object_type": "message", "timestamp": ts});
            (key, v)
        }
        1 => {
            let key = format!("soak/m1/e{seq}");
            let v = json!({"key": key, "kind": "object_created", "object_type": "message", "timestamp": ts});
            (key, v)
        }
        2 => {
            let key = format!("soak/m2/e{seq}");
            let data = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                seq.to_le_bytes().repeat(8),
            );
            let v = json!({"key": key, "kind": "extended", "extended_event": seq % 65536, "data": data, "timestamp": ts});
            (key, v)
        }
        3 => {
            let key = "soak/hot".to_owned();
            let v = json!({"key": key, "kind": "object_modified", "object_type": "folder", "unread_count": seq % 1000, "timestamp": ts});
            (key, v)
        }
        4 => {
            // The publish time is in the key: EWS events carry only the key (as an item id).
            let folder = if seq % 5 == 0 { "drafts" } else { "inbox" };
            let key = format!("alice@example.test/{folder}/a{seq}-{ts}");
            let v = if seq % 4 == 1 && folder == "inbox" {
                json!({"key": key, "kind": "new_mail", "timestamp": ts})
            } else {
                json!({"key": key, "kind": "object_created", "object_type": "message", "timestamp": ts})
            };
            (key, v)
        }
        _ => {
            let key = format!("bob@example.test/inbox/b{seq}");
            let v = json!({"key": key, "kind": "object_created", "object_type": "message", "timestamp": ts});
            (key, v)
        }
    }
}

/// Posts one body; `Ok((watermarks, replayed))` on 200.
async fn post_events(
    s: &Shared,
    http: &reqwest::Client,
    body: &bytes::Bytes,
    idempotency_key: Option<&str>,
) -> anyhow::Result<(Vec<u64>, bool)> {
    let mut req = http
        .post(s.url("/v1/events"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body.clone());
    if let Some(k) = idempotency_key {
        req = req.header("idempotency-key", k);
    }
    let r = req.send().await?;
    let status = r.status();
    if !status.is_success() {
        anyhow::bail!("publish: {status}: {}", r.text().await.unwrap_or_default());
    }
    let v: Value = r.json().await?;
    let ws = v["watermarks"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    Ok((ws, v["replayed"].as_bool().unwrap_or(false)))
}

/// Publishes steadily until told to stop.
pub(crate) async fn producer(s: Arc<Shared>, spec: ProducerSpec) {
    let http = http(Duration::from_secs(10));
    let mut seq = 0u64;
    let mut next = Instant::now();
    let mut last_error = Instant::now() - Duration::from_secs(60);
    loop {
        tokio::select! {
            () = s.stop_producers.cancelled() => return,
            () = sleep_until(next) => {}
        }
        let n = rand::rng().random_range(spec.batch.0..=spec.batch.1);
        next += Duration::from_secs_f64(n as f64 / (spec.rate * s.rate));
        if next + Duration::from_secs(5) < Instant::now() {
            // After a stall (the restart), go on at the steady rate rather than in a burst.
            next = Instant::now();
        }
        let ts = now_micros();
        let mut keys = Vec::new();
        let events: Vec<Value> = (0..n)
            .map(|i| {
                let (k, v) = event(&spec, seq + i, ts);
                keys.push(k);
                v
            })
            .collect();
        if spec.group == 5 {
            for k in &keys {
                s.ledger.mapi_sent(mapi_counter(k), ts);
            }
        }
        let body = bytes::Bytes::from(
            serde_json::to_vec(&json!({ "events": events })).expect("json body"),
        );
        let idem = spec.idempotent.then(|| format!("{}-{seq}", spec.name));
        seq += n;
        s.published.fetch_add(n, Ordering::Relaxed);
        let answered = if let Some(key) = &idem {
            // Retried with the same key and body until answered: appended exactly once.
            let mut attempt = 0u32;
            loop {
                match post_events(&s, &http, &body, Some(key)).await {
                    Ok(ok) => {
                        if attempt > 0 && ok.1 {
                            s.ledger.replayed.fetch_add(1, Ordering::Relaxed);
                        }
                        break Some(ok.0);
                    }
                    Err(e) => {
                        attempt += 1;
                        s.ledger.retries.fetch_add(1, Ordering::Relaxed);
                        if last_error.elapsed() > Duration::from_secs(30) {
                            last_error = Instant::now();
                            eprintln!("soak: producer {}: {e:#} (retrying)", spec.name);
                        }
                        if s.stop.is_cancelled() || attempt > 600 {
                            break None;
                        }
                        sleep(Duration::from_millis(100 * u64::from(attempt.min(5)))).await;
                    }
                }
            }
        } else {
            match post_events(&s, &http, &body, None).await {
                Ok(ok) => Some(ok.0),
                Err(e) => {
                    if last_error.elapsed() > Duration::from_secs(30) {
                        last_error = Instant::now();
                        eprintln!("soak: producer {}: {e:#} (not retried)", spec.name);
                    }
                    None
                }
            }
        };
        match answered {
            Some(ws) if ws.len() == keys.len() => {
                s.ledger.ack(spec.group, &ws);
                if spec.group == 5 {
                    for (k, w) in keys.iter().zip(&ws) {
                        s.ledger.mapi_acked(mapi_counter(k), *w);
                    }
                }
                // Now and then, replay an answered request: the same watermarks must come
                // back, and nothing be appended.
                if let Some(key) = &idem {
                    if rand::rng().random_bool(0.02) {
                        match post_events(&s, &http, &body, Some(key)).await {
                            Ok((again, true)) if again == ws => {
                                s.ledger.replayed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {
                                s.ledger.replay_mismatch.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
            Some(_) => {
                eprintln!("soak: producer {}: wrong number of watermarks", spec.name);
                s.ledger.unacked(spec.group, keys.len());
            }
            None => s.ledger.unacked(spec.group, keys.len()),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Event frames

/// The watermark, key and timestamp of an event as the JSON API writes it.
fn fields(e: &Value) -> Option<(u64, &str, Option<u64>)> {
    Some((
        e["watermark"].as_u64()?,
        e["key"].as_str()?,
        e["timestamp"].as_u64(),
    ))
}

// ------------------------------------------------------------------------------------------
// SSE

/// Opens an SSE stream after `last`.
async fn open_sse(
    s: &Shared,
    http: &reqwest::Client,
    query: &str,
    last: u64,
) -> anyhow::Result<reqwest::Response> {
    let r = http
        .get(s.url(&format!("/v1/stream?{query}")))
        .bearer_auth(API_KEY)
        .header("last-event-id", last.to_string())
        .send()
        .await?;
    if r.status() != 200 {
        anyhow::bail!(
            "SSE: {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(r)
}

/// A long-lived SSE subscriber: resumes with Last-Event-ID after every disconnect (the
/// server's restart and shutdown event, and its own, every minute or so).
pub(crate) async fn sse(s: Arc<Shared>, t: Arc<Tracker>, query: String) {
    let http = stream_http();
    'outer: while !s.stop.is_cancelled() {
        let r = match open_sse(&s, &http, &query, t.last()).await {
            Ok(r) => r,
            Err(e) => {
                if e.to_string().contains("400") {
                    t.error(format!("{e:#}"));
                }
                sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        t.connected.store(true, Ordering::Relaxed);
        t.connections.fetch_add(1, Ordering::Relaxed);
        let mut events = eventsource_stream::EventStream::new(r.bytes_stream());
        let leave = Instant::now() + between(40.0, 90.0);
        loop {
            tokio::select! {
                () = s.stop.cancelled() => break 'outer,
                () = sleep_until(leave) => break,
                e = events.next() => match e {
                    None | Some(Err(_)) => break,
                    Some(Ok(e)) => match e.event.as_str() {
                        "shutdown" | "closed" => break,
                        "expired" | "reset" | "error" => {
                            t.error(format!("SSE {}: {}", e.event, e.data));
                            break;
                        }
                        _ => match serde_json::from_str::<Value>(&e.data) {
                            Ok(v) => match fields(&v) {
                                Some((w, key, ts)) => t.receive(&s.lat, w, key, ts),
                                None => t.error(format!("SSE event without watermark: {}", e.data)),
                            },
                            Err(err) => t.error(format!("SSE data: {err}")),
                        },
                    },
                },
            }
        }
        t.connected.store(false, Ordering::Relaxed);
        sleep(Duration::from_millis(50)).await;
    }
    t.connected.store(false, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------
// WebSocket

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(s: &Shared) -> anyhow::Result<Ws> {
    let mut req = format!("ws://127.0.0.1:{}/v1/ws", s.port).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {API_KEY}").parse()?);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await??;
    Ok(ws)
}

fn subscribe_frame(id: &str, filter: &Value, after: u64) -> Message {
    let mut f = filter.clone();
    f["op"] = json!("subscribe");
    f["id"] = json!(id);
    f["after"] = json!(after);
    Message::text(f.to_string())
}

/// One subscription of a WebSocket subscriber.
pub(crate) struct WsSub {
    pub(crate) id: String,
    /// `{"subtree": …}` or `{"key": …}`.
    pub(crate) filter: Value,
    pub(crate) tracker: Arc<Tracker>,
}

/// A long-lived WebSocket subscriber with several subscriptions: each resumes with `after`
/// on reconnect; now and then one is unsubscribed and subscribed again on the same
/// connection; the connection itself is dropped every minute or two.
pub(crate) async fn websocket(s: Arc<Shared>, subs: Vec<WsSub>) {
    let by_id: HashMap<String, &WsSub> = subs.iter().map(|x| (x.id.clone(), x)).collect();
    'outer: while !s.stop.is_cancelled() {
        let mut ws = match open_ws(&s).await {
            Ok(ws) => ws,
            Err(_) => {
                sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut ok = true;
        for sub in &subs {
            ok &= ws
                .send(subscribe_frame(&sub.id, &sub.filter, sub.tracker.last()))
                .await
                .is_ok();
        }
        if !ok {
            continue;
        }
        let leave = Instant::now() + between(60.0, 120.0);
        let mut flip = Instant::now() + between(15.0, 40.0);
        loop {
            tokio::select! {
                () = s.stop.cancelled() => {
                    let _ = ws.close(None).await;
                    break 'outer;
                }
                () = sleep_until(leave) => {
                    // Half the time a clean close, half the time the socket just goes.
                    if rand::rng().random_bool(0.5) {
                        let _ = ws.close(None).await;
                    }
                    break;
                }
                () = sleep_until(flip) => {
                    flip = Instant::now() + between(15.0, 40.0);
                    let k = rand::rng().random_range(0..subs.len());
                    let frame = json!({"op": "unsubscribe", "id": subs[k].id}).to_string();
                    if ws.send(Message::text(frame)).await.is_err() {
                        break;
                    }
                }
                m = ws.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => continue,
                    };
                    let v: Value = match serde_json::from_str(text.as_str()) {
                        Ok(v) => v,
                        Err(e) => {
                            subs[0].tracker.error(format!("WebSocket frame: {e}"));
                            continue;
                        }
                    };
                    let sub = v["id"].as_str().and_then(|id| by_id.get(id));
                    match (v["type"].as_str(), sub) {
                        (Some("event"), Some(sub)) => match fields(&v["event"]) {
                            Some((w, key, ts)) => sub.tracker.receive(&s.lat, w, key, ts),
                            None => sub.tracker.error(format!("event without watermark: {v}")),
                        },
                        (Some("subscribed"), Some(sub)) => {
                            sub.tracker.connected.store(true, Ordering::Relaxed);
                            sub.tracker.connections.fetch_add(1, Ordering::Relaxed);
                        }
                        (Some("unsubscribed"), Some(sub)) => {
                            sub.tracker.connected.store(false, Ordering::Relaxed);
                            let f = subscribe_frame(&sub.id, &sub.filter, sub.tracker.last());
                            if ws.send(f).await.is_err() {
                                break;
                            }
                        }
                        (Some("shutdown"), _) => break,
                        (Some("expired" | "error"), Some(sub)) => {
                            sub.tracker.error(format!("WebSocket: {v}"));
                        }
                        _ => subs[0].tracker.error(format!("WebSocket: unexpected frame {v}")),
                    }
                }
            }
        }
        for sub in &subs {
            sub.tracker.connected.store(false, Ordering::Relaxed);
        }
        sleep(Duration::from_millis(50)).await;
    }
    for sub in &subs {
        sub.tracker.connected.store(false, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------------------------------
// Durable long-poll subscriptions

/// Creates a durable subscription; its id.
pub(crate) async fn create_subscription(s: &Shared, body: Value) -> anyhow::Result<String> {
    let r = http(Duration::from_secs(10))
        .post(s.url("/v1/subscriptions"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?;
    if r.status() != 201 {
        anyhow::bail!(
            "create subscription: {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let v: Value = r.json().await?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no id in {v}"))
}

/// Fetches a page after `after` (acknowledging it); the events, the next position, and
/// whether more are waiting. `Err(Some(status))` for an HTTP error.
async fn fetch_page(
    s: &Shared,
    http: &reqwest::Client,
    id: &str,
    after: u64,
) -> Result<(Vec<Value>, u64, bool), Option<u16>> {
    let v = get_json(
        s,
        http,
        &format!("/v1/subscriptions/{id}/events?after={after}&limit=500"),
    )
    .await?;
    let events = v["events"].as_array().cloned().unwrap_or_default();
    Ok((
        events,
        v["next_after"].as_u64().unwrap_or(after),
        v["more"].as_bool().unwrap_or(false),
    ))
}

/// `GET path` with the producers' key: the JSON body of a 200, `Err(Some(status))` for
/// another status, `Err(None)` when the request or its body failed.
async fn get_json(s: &Shared, http: &reqwest::Client, path: &str) -> Result<Value, Option<u16>> {
    let r = http
        .get(s.url(path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .map_err(|_| None)?;
    if r.status() != 200 {
        return Err(Some(r.status().as_u16()));
    }
    r.json().await.map_err(|_| None)
}

/// Long-polls `wait`; whether events are pending. `Err(Some(status))` for an HTTP error.
async fn wait_pending(
    s: &Shared,
    http: &reqwest::Client,
    id: &str,
    secs: u64,
) -> Result<bool, Option<u16>> {
    let v = get_json(
        s,
        http,
        &format!("/v1/subscriptions/{id}/wait?timeout={secs}"),
    )
    .await?;
    Ok(v["pending"].as_bool().unwrap_or(false))
}

/// A long-lived long-poll subscriber of durable subscription `id`: `wait`, then `events`
/// after its own last position (which acknowledges it) until nothing more is waiting.
pub(crate) async fn long_poll(s: Arc<Shared>, t: Arc<Tracker>, id: String) {
    let http = http(Duration::from_secs(20));
    let mut after = 0u64;
    let mut up = false;
    while !s.stop.is_cancelled() {
        let pending = tokio::select! {
            () = s.stop.cancelled() => break,
            p = wait_pending(&s, &http, &id, 5) => p,
        };
        match pending {
            Ok(_) => {
                if !up {
                    up = true;
                    t.connected.store(true, Ordering::Relaxed);
                    t.connections.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(status) => {
                up = false;
                t.connected.store(false, Ordering::Relaxed);
                if status == Some(404) || status == Some(410) {
                    t.error(format!("durable subscription {id}: HTTP {status:?}"));
                    sleep(Duration::from_secs(1)).await;
                } else {
                    sleep(Duration::from_millis(250)).await;
                }
                continue;
            }
        }
        // Fetch whether or not `wait` said so: a page after the position is cheap, and
        // acknowledges it.
        loop {
            match fetch_page(&s, &http, &id, after).await {
                Ok((events, next, more)) => {
                    for e in &events {
                        match fields(e) {
                            Some((w, key, ts)) => t.receive(&s.lat, w, key, ts),
                            None => t.error(format!("long-poll event without watermark: {e}")),
                        }
                    }
                    after = next;
                    if !more {
                        break;
                    }
                }
                Err(status) => {
                    if status == Some(404) || status == Some(410) {
                        t.error(format!("durable subscription {id}: events HTTP {status:?}"));
                    }
                    break;
                }
            }
        }
    }
    t.connected.store(false, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------
// Webhooks

/// The webhook receiver: fails a share of requests, answers some slowly (some past Herald's
/// request timeout, after having processed them, as a receiver that crashed before
/// answering), and dedupes on `webhook-id`.
pub(crate) struct Receiver {
    pub(crate) tracker: Arc<Tracker>,
    lat: Arc<Shared>,
    processed: Mutex<HashSet<String>>,
    pub(crate) requests: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) too_slow: AtomicU64,
    pub(crate) verifications: AtomicU64,
    pub(crate) status: AtomicU64,
}

impl Receiver {
    pub(crate) fn new(s: Arc<Shared>, tracker: Arc<Tracker>) -> Arc<Receiver> {
        Arc::new(Receiver {
            tracker,
            lat: s,
            processed: Mutex::default(),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            too_slow: AtomicU64::new(0),
            verifications: AtomicU64::new(0),
            status: AtomicU64::new(0),
        })
    }

    /// Processes a delivery once per webhook-id.
    fn process(&self, id: &str, v: &Value) {
        if !self.processed.lock().unwrap().insert(id.to_owned()) {
            self.tracker.redelivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for e in v["events"].as_array().into_iter().flatten() {
            match fields(e) {
                Some((w, key, ts)) => self.tracker.receive(&self.lat.lat, w, key, ts),
                None => self
                    .tracker
                    .error(format!("webhook event without watermark: {e}")),
            }
        }
    }

    async fn answer(
        self: Arc<Self>,
        headers: axum::http::HeaderMap,
        body: bytes::Bytes,
    ) -> axum::response::Response {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let id = headers
            .get("webhook-id")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if headers.get("webhook-signature").is_none() {
            self.tracker
                .error("a webhook without a signature".to_owned());
        }
        match v["type"].as_str() {
            Some("verification") => {
                self.verifications.fetch_add(1, Ordering::Relaxed);
                return v["challenge"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    .into_response();
            }
            Some("events") => {}
            _ => {
                self.status.fetch_add(1, Ordering::Relaxed);
                return StatusCode::NO_CONTENT.into_response();
            }
        }
        let roll: f64 = rand::rng().random();
        if roll < 0.10 {
            self.failed.fetch_add(1, Ordering::Relaxed);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        } else if roll < 0.13 {
            self.failed.fetch_add(1, Ordering::Relaxed);
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
        } else if roll < 0.17 {
            // Processed, then too slow: Herald's request times out and it sends the same
            // webhook-id again, which is dropped here.
            self.too_slow.fetch_add(1, Ordering::Relaxed);
            self.process(&id, &v);
            sleep(Duration::from_millis(3000)).await;
            StatusCode::NO_CONTENT.into_response()
        } else if roll < 0.27 {
            self.slow.fetch_add(1, Ordering::Relaxed);
            sleep(between(0.2, 1.2)).await;
            self.process(&id, &v);
            StatusCode::NO_CONTENT.into_response()
        } else {
            self.process(&id, &v);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// Serves the receiver on a free loopback port until `stop`; its URL.
pub(crate) async fn serve_receiver(
    r: Arc<Receiver>,
    stop: CancellationToken,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let app =
        axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let r = r.clone();
            async move { r.answer(headers, body).await }
        });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(format!("http://127.0.0.1:{port}/hook"))
}

// ------------------------------------------------------------------------------------------
// Churn: clients that come and go

/// Where a churn client starts: a little before the newest acknowledged event.
fn churn_after(s: &Shared) -> u64 {
    s.ledger
        .max_w()
        .saturating_sub(rand::rng().random_range(0..400))
}

/// Waits while churn is paused; false when churn is over.
pub(crate) async fn churn_gate(s: &Shared) -> bool {
    while s.churn_paused.load(Ordering::Relaxed) {
        if s.stop_churn.is_cancelled() {
            return false;
        }
        sleep(Duration::from_millis(200)).await;
    }
    !s.stop_churn.is_cancelled()
}

const CHURN_FILTERS: [(&str, u8); 3] = [
    ("subtree=soak/m0", g(0)),
    ("key=soak/hot", g(3)),
    ("subtree=soak/m1", g(1)),
];

/// SSE streams that open after a recent watermark, read for a few seconds and leave.
pub(crate) async fn churn_sse(s: Arc<Shared>) {
    let http = stream_http();
    while churn_gate(&s).await {
        let (query, mask) = CHURN_FILTERS[rand::rng().random_range(0..CHURN_FILTERS.len())];
        let after = churn_after(&s);
        s.churn_opened[0].fetch_add(1, Ordering::Relaxed);
        match open_sse(&s, &http, query, after).await {
            Ok(r) => {
                let mut received = Vec::new();
                let mut events = eventsource_stream::EventStream::new(r.bytes_stream());
                let leave = Instant::now() + between(0.3, 4.0);
                loop {
                    tokio::select! {
                        () = sleep_until(leave) => break,
                        e = events.next() => match e {
                            Some(Ok(e)) if e.event != "shutdown" && e.event != "closed" => {
                                if let Ok(id) = e.id.parse::<u64>() {
                                    received.push(id);
                                }
                            }
                            _ => break,
                        }
                    }
                }
                s.churn.lock().unwrap().push(ChurnRecord {
                    transport: "sse",
                    mask,
                    after,
                    received,
                });
            }
            Err(e) => s.churn_error(format!("churn SSE: {e:#}")),
        }
        sleep(between(0.0, 0.4)).await;
    }
}

const CHURN_WS_FILTERS: [(&str, &str, u8); 3] = [
    ("subtree", "soak/m0", g(0)),
    ("key", "soak/hot", g(3)),
    ("subtree", "soak/m2", g(2)),
];

/// WebSocket connections with one to three subscriptions that read for a few seconds,
/// sometimes unsubscribe one, and close (or just vanish).
pub(crate) async fn churn_ws(s: Arc<Shared>) {
    while churn_gate(&s).await {
        s.churn_opened[1].fetch_add(1, Ordering::Relaxed);
        let mut ws = match open_ws(&s).await {
            Ok(ws) => ws,
            Err(e) => {
                s.churn_error(format!("churn WebSocket: {e:#}"));
                sleep(between(0.2, 0.6)).await;
                continue;
            }
        };
        let n = rand::rng().random_range(1..=3);
        let mut subs: Vec<(u8, u64, Vec<u64>)> = Vec::new();
        for (i, &(field, value, mask)) in CHURN_WS_FILTERS.iter().take(n).enumerate() {
            let after = churn_after(&s);
            let frame = subscribe_frame(&i.to_string(), &json!({ field: value }), after);
            if ws.send(frame).await.is_err() {
                break;
            }
            subs.push((mask, after, Vec::new()));
        }
        let leave = Instant::now() + between(0.3, 4.0);
        let unsub_at = Instant::now() + between(0.1, 3.0);
        let mut unsubscribed = false;
        loop {
            tokio::select! {
                () = sleep_until(leave) => break,
                () = sleep_until(unsub_at), if !unsubscribed => {
                    unsubscribed = true;
                    let frame = json!({"op": "unsubscribe", "id": "0"}).to_string();
                    if ws.send(Message::text(frame)).await.is_err() {
                        break;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["type"] == "event" {
                            let i: usize = v["id"].as_str().and_then(|x| x.parse().ok()).unwrap_or(0);
                            if let (Some(sub), Some(w)) = (subs.get_mut(i), v["event"]["watermark"].as_u64()) {
                                sub.2.push(w);
                            }
                        } else if v["type"] == "shutdown" {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        }
        if rand::rng().random_bool(0.5) {
            let _ = tokio::time::timeout(Duration::from_secs(3), ws.close(None)).await;
        }
        drop(ws);
        s.churn
            .lock()
            .unwrap()
            .extend(subs.into_iter().map(|(mask, after, received)| ChurnRecord {
                transport: "websocket",
                mask,
                after,
                received,
            }));
        sleep(between(0.0, 0.4)).await;
    }
}

/// Durable poll subscriptions created after a recent watermark, read a few times and
/// deleted.
pub(crate) async fn churn_poll(s: Arc<Shared>) {
    let http = http(Duration::from_secs(10));
    while churn_gate(&s).await {
        s.churn_opened[2].fetch_add(1, Ordering::Relaxed);
        let after = churn_after(&s);
        let id = match create_subscription(
            &s,
            json!({"transport": "poll", "subtree": "soak/m1", "after": after}),
        )
        .await
        {
            Ok(id) => id,
            Err(e) => {
                s.churn_error(format!("churn long-poll: {e:#}"));
                sleep(between(0.2, 0.6)).await;
                continue;
            }
        };
        let mut received = Vec::new();
        let mut pos = after;
        let rounds = rand::rng().random_range(1..=3);
        for _ in 0..rounds {
            let _ = wait_pending(&s, &http, &id, 1).await;
            match fetch_page(&s, &http, &id, pos).await {
                Ok((events, next, _)) => {
                    received.extend(events.iter().filter_map(|e| e["watermark"].as_u64()));
                    pos = next;
                }
                Err(_) => break,
            }
        }
        let deleted = http
            .delete(s.url(&format!("/v1/subscriptions/{id}")))
            .bearer_auth(API_KEY)
            .send()
            .await;
        if !deleted.is_ok_and(|r| r.status() == 204) {
            s.churn_error(format!("churn long-poll: delete {id} failed"));
        }
        s.churn.lock().unwrap().push(ChurnRecord {
            transport: "long-poll",
            mask: g(1),
            after,
            received,
        });
        sleep(between(0.0, 0.4)).await;
    }
}
