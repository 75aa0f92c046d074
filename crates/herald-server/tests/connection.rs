//! Connection state and connection hooks against a running server: the server's own state
//! (offline pauses every delivery, online resumes from each watermark) advised to a real SSE
//! client; presence events for clients going online and offline, leases that expire; and
//! external hooks served by a real HTTP server in the test, which cancel, retry and time out.
//! Tests named `pNN_…` check property NN of the MAPI digest §6 over HTTP.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A 2 s lease, with streams writing often enough to renew it.
const SHORT_LEASE: &str = "[connections]\nlease = \"2s\"\n[limits]\nkeepalive = \"300ms\"\n[ews]\nheartbeat = \"500ms\"\n";

/// Starts a server with this TOML and presence events on.
fn start(toml: &str) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, toml).unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &["--config", config.to_str().unwrap()],
        &[("HERALD_CONNECTIONS__PRESENCE", "true")],
    );
    (server, tmp)
}

async fn put_state(server: &Server, state: &str, block: bool) -> (u16, Value) {
    // The producer key is ignored when authentication is off.
    let r = client()
        .put(server.url("/v1/state"))
        .bearer_auth(PRODUCER_KEY)
        .json(&json!({"state": state, "block": block}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn get_json(server: &Server, path: &str) -> Value {
    client()
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// An SSE stream of named events with JSON data.
struct Events {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = (String, Value)> + Send>>,
}

impl Events {
    async fn open(url: String) -> Events {
        let resp = client_no_timeout().get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let stream =
            eventsource_stream::EventStream::new(resp.bytes_stream()).filter_map(|e| async move {
                e.ok()
                    .map(|e| (e.event, serde_json::from_str(&e.data).unwrap_or_default()))
            });
        Events {
            stream: Box::pin(stream),
        }
    }

    async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("no event in time")
            .expect("the stream ended")
    }

    /// The next presence event whose key contains `part`.
    async fn presence(&mut self, part: &str) -> Value {
        loop {
            let (name, data) = self.next().await;
            if name == "connection_state" && data["key"].as_str().unwrap().contains(part) {
                return data;
            }
        }
    }
}

/// Asserts that `r` is a 403 whose message holds `text`; returns its body.
async fn refused_with(r: reqwest::Response, text: &str) -> Value {
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains(text),
        "{body}"
    );
    body
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connection(server: &Server, id: &str) -> Option<Value> {
    let list = get_json(server, "/v1/connections").await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
}

// ---- the server's state ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p30_p32_an_sse_client_sees_start_change_done_with_its_token_for_each_transition() {
    let (server, _t) = start("");
    let mut advise = Events::open(server.url("/v1/state/advise?token=77")).await;
    let (name, first) = advise.next().await;
    assert_eq!(name, "advised");
    assert_eq!(first["client_token"], 77);
    assert_eq!(first["state"], "online");
    assert!(first["advise_token"].as_u64().unwrap() > 0);

    let (status, body) = put_state(&server, "offline", false).await;
    assert_eq!(status, 202, "{body}");
    for (i, phase) in ["start", "change", "done"].into_iter().enumerate() {
        let (name, n) = advise.next().await;
        assert_eq!(name, phase);
        assert_eq!(n["notify_type"], i + 1);
        assert_eq!(n["client_token"], 77);
        assert_eq!(n["mask"], 3);
        assert_eq!(
            (n["old_state"].as_u64(), n["new_state"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(
            (n["old"].as_str(), n["new"].as_str()),
            (Some("online"), Some("offline"))
        );
    }
    let (status, body) = put_state(&server, "online", true).await;
    assert_eq!(status, 200);
    assert_eq!(body["state"], "online");
    assert_eq!(body["transitioning"], false);
    let phases: Vec<String> = [
        advise.next().await,
        advise.next().await,
        advise.next().await,
    ]
    .into_iter()
    .map(|(name, n)| {
        assert_eq!(n["client_token"], 77);
        assert_eq!(
            (n["old_state"].as_u64(), n["new_state"].as_u64()),
            (Some(1), Some(2))
        );
        name
    })
    .collect();
    assert_eq!(phases, ["start", "change", "done"]);
    let s = get_json(&server, "/v1/state").await;
    assert_eq!(s["state"], "online");
    assert_eq!(s["capabilities"], 3);
    assert_eq!(s["advised"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p29_advise_without_a_notify_callback_or_with_a_bad_mask_is_refused() {
    let (server, _t) = start("");
    let r = client()
        .get(server.url("/v1/state/advise?callback_type=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_interface");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("0x80004002")
    );
    for query in ["mask=0x40000000", "advise_types=2", "mask=banana"] {
        let r = client()
            .get(server.url(&format!("/v1/state/advise?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert!(
            ["invalid_arg", "invalid_field"].contains(&body["error"]["code"].as_str().unwrap()),
            "{body}"
        );
    }
    assert_eq!(get_json(&server, "/v1/state").await["advised"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p31_unadvise_always_succeeds_and_stops_the_notifications() {
    let (server, _t) = start("");
    let mut advise = Events::open(server.url("/v1/state/advise?token=5")).await;
    let token = advise.next().await.1["advise_token"].as_u64().unwrap();
    for t in [
        token.to_string(),
        token.to_string(),
        "999999".into(),
        "x".into(),
    ] {
        let r = client()
            .delete(server.url(&format!("/v1/state/advise/{t}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    assert_eq!(get_json(&server, "/v1/state").await["advised"], 0);
    assert_eq!(put_state(&server, "offline", true).await.0, 200);
    // The callback was released: the stream ends without another notification.
    let next = tokio::time::timeout(WAIT, advise.stream.next())
        .await
        .unwrap();
    assert!(next.is_none(), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p34_a_change_returns_at_once_and_another_during_the_transition_is_pending() {
    let (server, _t) = start("[webhooks]\nrequest_timeout = \"20s\"\n");
    let mut recv = Receiver::start().await;
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "webhook", "url": recv.url(), "subtree": "slow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_until("the endpoint is verified", || {
        let n = recv.requests().len();
        async move { n >= 1 }
    })
    .await;
    // A delivery on the wire that takes 3 s: going offline waits for it.
    recv.set(Mode::Slow(Duration::from_secs(3)));
    publish_ok(&server, json!([created("slow/1")])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, body) = put_state(&server, "offline", false).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["transitioning"], true, "it returned before the end");
    for block in [false, true] {
        let (status, body) = put_state(&server, "online", block).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "pending");
    }
    wait_until("the transition ends", || async {
        get_json(&server, "/v1/state").await["transitioning"] == false
    })
    .await;
    assert_eq!(get_json(&server, "/v1/state").await["state"], "offline");
    assert_eq!(
        recv.delivered_keys(),
        ["slow/1"],
        "the delivery in flight finished"
    );
    // Blocking: the answer comes when the transition is done.
    let (status, body) = put_state(&server, "online", true).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["state"].as_str(), body["transitioning"].as_bool()),
        (Some("online"), Some(false))
    );
    let (status, body) = put_state(&server, "sideways", false).await;
    assert_eq!(status, 400, "{body}");
    recv.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_pauses_every_delivery_and_online_resumes_each_from_its_watermark() {
    let (server, _t) = start("");
    let mut recv = Receiver::start().await;
    let mut sse = SseClient::connect(&server, "subtree=p", None).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "A", "subtree": "p"}).to_string(),
    ))
    .await
    .unwrap();
    let subscribed: Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(subscribed["type"], "subscribed");
    let poll: Value = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "subtree": "p"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let poll_id = poll["id"].as_str().unwrap().to_owned();
    let hook = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "webhook", "url": recv.url(), "subtree": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status(), 201);
    wait_until("the endpoint is verified", || {
        let n = recv.requests().len();
        async move { n >= 1 }
    })
    .await;

    let metrics = || async { get_text(&server.url("/metrics")).await };
    assert!(metrics().await.contains("herald_server_online 1"));
    assert_eq!(put_state(&server, "offline", true).await.0, 200);
    assert!(metrics().await.contains("herald_server_online 0"));
    let events: Vec<Value> = (0..10).map(|i| created(&format!("p/{i}"))).collect();
    let watermarks = publish_ok(&server, Value::Array(events)).await;
    assert_eq!(watermarks.len(), 10, "offline, events are still accepted");

    assert!(
        sse.quiet_for(Duration::from_millis(700)).await,
        "SSE delivered while offline"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ws.next())
            .await
            .is_err(),
        "WebSocket delivered while offline"
    );
    let wait = get_json(
        &server,
        &format!("/v1/subscriptions/{poll_id}/wait?timeout=1"),
    )
    .await;
    assert_eq!(wait["pending"], false);
    let page = get_json(&server, &format!("/v1/subscriptions/{poll_id}/events")).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 0, "{page}");
    assert!(
        recv.delivered_watermarks().is_empty(),
        "webhook delivered while offline"
    );

    assert_eq!(put_state(&server, "online", true).await.0, 200);
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(sse.next().await.unwrap().id.parse::<u64>().unwrap());
    }
    assert_eq!(got, watermarks, "SSE: every event, in order");
    let mut ws_got = Vec::new();
    while ws_got.len() < 10 {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if v["type"] == "event" {
            ws_got.push(v["event"]["watermark"].as_u64().unwrap());
        }
    }
    assert_eq!(ws_got, watermarks, "WebSocket: every event, in order");
    let wait = get_json(
        &server,
        &format!("/v1/subscriptions/{poll_id}/wait?timeout=5"),
    )
    .await;
    assert_eq!(wait["pending"], true);
    let page = get_json(
        &server,
        &format!("/v1/subscriptions/{poll_id}/events?limit=100"),
    )
    .await;
    let polled: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["watermark"].as_u64().unwrap())
        .collect();
    assert_eq!(polled, watermarks, "long-poll: every event, in order");
    assert_eq!(
        recv.wait_for(10, WAIT).await,
        watermarks,
        "webhook: every event, in order"
    );
    recv.down().await;
}

// ---- presence ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_watches_another_connection_go_online_and_offline() {
    let (server, _t) = start("");
    let mut watcher = Events::open(server.url("/v1/stream?subtree=$herald/presence")).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    let online = watcher.presence("/ws-").await;
    let key = online["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("$herald/presence/anonymous/ws-"), "{key}");
    let state = &online["connection_state"];
    assert_eq!(
        (state["old_state"].as_u64(), state["new_state"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(state["changed_mask"], 3);
    let id = key.rsplit('/').next().unwrap().to_owned();
    let listed = connection(&server, &id).await.expect("listed");
    assert_eq!(listed["state"], "online");
    assert_eq!(listed["transport"], "ws");
    assert_eq!(listed["presence_key"], key);

    ws.send(Message::Close(None)).await.unwrap();
    drop(ws);
    let offline = watcher.presence(&id).await;
    assert_eq!(offline["key"], key);
    let state = &offline["connection_state"];
    assert_eq!(
        (state["old_state"].as_u64(), state["new_state"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(
        connection(&server, &id).await.is_none(),
        "a closed connection is no longer listed"
    );
    // And producers cannot fake presence.
    let r = publish(&server, json!([created("$herald/presence/anonymous/x")])).await;
    assert_eq!(r.status(), 400);
}

/// The phases one watcher was told for connection `id`: (phase, token, mask, old, new,
/// watermark).
type Told = Vec<(String, u64, u64, u64, u64, Option<u64>)>;

fn told_of(event: &Value) -> (String, u64, u64, u64, u64, Option<u64>) {
    let c = &event["connection_state"];
    (
        c["phase"].as_str().unwrap().to_owned(),
        c["client_token"].as_u64().unwrap(),
        c["changed_mask"].as_u64().unwrap(),
        c["old_state"].as_u64().unwrap(),
        c["new_state"].as_u64().unwrap(),
        event["watermark"].as_u64(),
    )
}

/// Asserts `told` is a connection going online then offline, each as start, change and
/// done with `token`, the online/offline mask and the states; only the done has a
/// watermark. Returns the online done's watermark.
fn assert_told_twice(told: &Told, token: u64) -> u64 {
    let phases: Vec<&str> = told.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        phases,
        ["start", "change", "done", "start", "change", "done"],
        "{told:?}"
    );
    for (i, t) in told.iter().enumerate() {
        let (old, new) = if i < 3 { (1, 2) } else { (2, 1) };
        assert_eq!((t.1, t.2, t.3, t.4), (token, 3, old, new), "{told:?}");
        assert_eq!(
            t.5.is_some(),
            t.0 == "done",
            "only done is a position: {told:?}"
        );
    }
    told[2].5.unwrap()
}

/// The offline-state API per client: a watcher that advises on connection state (its own
/// client token, and a state mask) is told every presence change as start, change and done,
/// each echoing its token with the changed mask and the old and new states, for a connection
/// going online and offline; over SSE, WebSocket and a durable poll subscription. Only done
/// carries the watermark, so an SSE client resuming after it gets the next change whole. A
/// mask without the online/offline bits is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_advising_on_a_connections_state_is_told_start_change_and_done_with_its_token() {
    let (server, _t) = start("");
    let mut sse = SseClient::connect(&server, "subtree=$herald/presence&state_token=7", None).await;
    let mut ws = WsClient::connect(&server).await;
    ws.subscribe(
        json!({"op": "subscribe", "id": "p", "subtree": "$herald/presence",
        "state_token": 9, "state_mask": "0x003f037f"}),
    )
    .await;
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "subtree": "$herald/presence", "state_token": 11}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let poll: Value = r.json().await.unwrap();
    assert_eq!(poll["filter"]["state_token"], 11);
    let poll_id = poll["id"].as_str().unwrap().to_owned();

    // The connection watched: an SSE stream, online while open.
    let watched = client_no_timeout()
        .get(server.url("/v1/stream?key=somewhere"))
        .send()
        .await
        .unwrap();
    let id = watched.headers()["herald-connection"]
        .to_str()
        .unwrap()
        .to_owned();
    let mine = |e: &Value| {
        e["key"]
            .as_str()
            .is_some_and(|k| k.ends_with(&format!("/{id}")))
    };
    wait_until("the watched stream is listed", || async {
        connection(&server, &id).await.is_some()
    })
    .await;
    drop(watched);

    let mut over_sse = Told::new();
    while over_sse.len() < 6 {
        let e = sse.next().await.expect("the stream ended");
        let v: Value = serde_json::from_str(&e.data).unwrap();
        if e.event == "connection_state" && mine(&v) {
            over_sse.push(told_of(&v));
        }
    }
    let online_done = assert_told_twice(&over_sse, 7);

    let mut over_ws = Told::new();
    while over_ws.len() < 6 {
        let f = ws.frame().await;
        if f["type"] == "event" && mine(&f["event"]) {
            over_ws.push(told_of(&f["event"]));
        }
    }
    assert_told_twice(&over_ws, 9);

    let deadline = Instant::now() + WAIT;
    let over_poll: Told = loop {
        let page = get_json(&server, &format!("/v1/subscriptions/{poll_id}/events")).await;
        let told: Told = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| mine(e))
            .map(told_of)
            .collect();
        if told.len() >= 6 || Instant::now() > deadline {
            break told;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_told_twice(&over_poll, 11);

    // Resuming after the online change's done: the offline change, whole.
    let mut resumed = SseClient::connect(
        &server,
        "subtree=$herald/presence&state_token=7",
        Some(online_done),
    )
    .await;
    let mut again = Told::new();
    while again.len() < 3 {
        let e = resumed.next().await.expect("the stream ended");
        let v: Value = serde_json::from_str(&e.data).unwrap();
        if mine(&v) {
            again.push(told_of(&v));
        }
    }
    assert_eq!(again, over_sse[3..].to_vec());

    // A mask that leaves out the online/offline bits asks for nothing Herald can tell.
    let r = client()
        .get(server.url("/v1/stream?subtree=$herald/presence&state_mask=0x4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "state_mask", "{body}");
    ws.send(
        json!({"op": "subscribe", "id": "q", "subtree": "$herald/presence", "state_mask": "nope"}),
    )
    .await;
    loop {
        let f = ws.frame().await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "invalid_field", "{f}");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_answering_pings_goes_offline_when_its_lease_expires() {
    let hooks = HookServer::start(|_, _| json!({})).await;
    let (server, _t) = start(&format!("{SHORT_LEASE}{}", hooks.config(&["audit"])));
    let mut watcher = Events::open(server.url("/v1/stream?subtree=$herald/presence")).await;
    // Connected, then never read again: pings go unanswered.
    let (_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    let online = watcher.presence("/ws-").await;
    let id = online["key"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let offline = watcher.presence(&id).await;
    assert_eq!(offline["connection_state"]["new_state"], 1);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "offline only after the lease"
    );
    assert!(connection(&server, &id).await.is_none());
    // The expiry counts as a cancel for the hooks, and cannot be refused.
    wait_until("the cancel hook ran", || {
        let calls = hooks.calls();
        let id = id.clone();
        async move {
            calls.iter().any(|(_, c)| {
                c["operation"] == "cancel"
                    && c["connection"] == id.as_str()
                    && c["reason"] == "expiry"
                    && c["forced"] == true
            })
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_client_that_stops_polling_goes_offline_and_back_online_when_it_polls() {
    let (server, _t) = start(SHORT_LEASE);
    let poll: Value = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "subtree": "lp"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = poll["id"].as_str().unwrap().to_owned();
    assert_eq!(connection(&server, &id).await.unwrap()["state"], "online");
    // A wait longer than the lease keeps it online.
    let wait = get_json(&server, &format!("/v1/subscriptions/{id}/wait?timeout=3")).await;
    assert_eq!(wait["pending"], false);
    assert_eq!(connection(&server, &id).await.unwrap()["state"], "online");
    wait_until("the lease expires", || async {
        connection(&server, &id).await.unwrap()["state"] == "offline"
    })
    .await;
    let mut watcher = Events::open(server.url(&format!(
        "/v1/stream?key=$herald/presence/anonymous/{id}&after=0"
    )))
    .await;
    let (_, first) = watcher.next().await;
    let (_, second) = watcher.next().await;
    assert_eq!(first["connection_state"]["new_state"], 2);
    assert_eq!(second["connection_state"]["new_state"], 1);
    get_json(&server, &format!("/v1/subscriptions/{id}/wait?timeout=0")).await;
    assert_eq!(connection(&server, &id).await.unwrap()["state"], "online");
    assert_eq!(watcher.next().await.1["connection_state"]["new_state"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_endpoint_is_offline_until_it_answers_again() {
    let (server, _t) = start(
        "[webhooks]\nretry_base = \"100ms\"\nretry_cap = \"300ms\"\nrequest_timeout = \"1s\"\nfail_after = \"1h\"\n",
    );
    let mut recv = Receiver::start().await;
    let sub: Value = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "webhook", "url": recv.url(), "subtree": "wh"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["id"].as_str().unwrap().to_owned();
    wait_until("the endpoint is verified", || {
        let n = recv.requests().len();
        async move { n >= 1 }
    })
    .await;
    recv.set(Mode::Status(503, None));
    publish_ok(&server, json!([created("wh/1")])).await;
    wait_until("the webhook is offline", || async {
        connection(&server, &id).await.unwrap()["state"] == "offline"
    })
    .await;
    recv.set(Mode::Ok);
    wait_until("the webhook is online again", || async {
        connection(&server, &id).await.unwrap()["state"] == "online"
    })
    .await;
    assert_eq!(recv.wait_for_keys(1, WAIT).await, ["wh/1"]);
    recv.down().await;
}

// ---- hooks ----

type Policy = dyn Fn(&str, &Value) -> Value + Send + Sync;

/// A real HTTP server playing external hooks: every path is a hook; it records each call
/// and answers what the policy says (`{"delay_ms": n}` in the answer makes it slow).
struct HookServer {
    port: u16,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

impl HookServer {
    async fn start(policy: impl Fn(&str, &Value) -> Value + Send + Sync + 'static) -> HookServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let policy: Arc<Policy> = Arc::new(policy);
        let recorded = calls.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
            let (calls, policy) = (recorded.clone(), policy.clone());
            async move {
                let call: Value = serde_json::from_str(&body).unwrap_or_default();
                let path = uri.path().trim_start_matches('/').to_owned();
                calls.lock().unwrap().push((path.clone(), call.clone()));
                let mut answer = policy(&path, &call);
                if let Some(ms) = answer.get("delay_ms").and_then(Value::as_u64) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    answer.as_object_mut().unwrap().remove("delay_ms");
                }
                axum::Json(answer)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        HookServer { port, calls }
    }

    /// `[[hooks.http]]` entries for these paths (`path` or `path:closed` for fail-closed).
    fn config(&self, paths: &[&str]) -> String {
        let mut s = String::new();
        for p in paths {
            let (name, failure) = p.split_once(':').unwrap_or((p, "open"));
            s.push_str(&format!(
                "[[hooks.http]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{}/{name}\"\ntimeout = \"400ms\"\nfailure = \"{failure}\"\n",
                self.port
            ));
        }
        s
    }

    fn calls(&self) -> Vec<(String, Value)> {
        self.calls.lock().unwrap().clone()
    }

    /// `path phase operation` of every call so far.
    fn trace(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|(p, c)| {
                format!(
                    "{p} {} {}",
                    c["phase"].as_str().unwrap(),
                    c["operation"].as_str().unwrap()
                )
            })
            .collect()
    }

    async fn wait_calls(&self, n: usize) -> Vec<(String, Value)> {
        wait_until("the hooks are called", || {
            let len = self.calls().len();
            async move { len >= n }
        })
        .await;
        self.calls()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p35_before_gets_a_null_context_and_success_and_after_gets_the_real_result() {
    let hooks = HookServer::start(|_, c| {
        if c["phase"] == "before" {
            json!({"context": {"n": 1}})
        } else {
            json!({})
        }
    })
    .await;
    let (server, _t) = start(&hooks.config(&["a"]));
    let sub = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "k/1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sub.status(), 201);
    let calls = hooks.wait_calls(2).await;
    let (_, before) = &calls[0];
    assert_eq!(before["phase"], "before");
    assert_eq!(before["operation"], "connect");
    assert_eq!(before["context"], Value::Null);
    assert_eq!(before["status"], "success");
    assert_eq!(before["transport"], "poll");
    assert_eq!(before["target"], "k/1");
    let (_, after) = &calls[1];
    assert_eq!(after["phase"], "after");
    assert_eq!(after["status"], "success");
    // A failed connect: the after call says so.
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "k/2", "after": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a position ahead of the log");
    let calls = hooks.wait_calls(4).await;
    assert_eq!(calls[3].1["status"], "failed");
    assert!(
        calls[3].1["error"].as_str().unwrap().contains("ahead"),
        "{}",
        calls[3].1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p36_no_context_means_no_after_call_and_a_context_comes_back_unchanged() {
    let context = json!({"ticket": "T-9", "nested": {"list": [1, 2, 3]}, "n": 1.5});
    let ctx = context.clone();
    let hooks = HookServer::start(move |path, c| match (path, c["phase"].as_str().unwrap()) {
        ("keeper", "before") => json!({"decision": "proceed", "context": ctx}),
        _ => json!({}),
    })
    .await;
    let (server, _t) = start(&hooks.config(&["silent", "keeper"]));
    let mut sse = SseClient::connect(&server, "key=x/1", None).await;
    let calls = hooks.wait_calls(3).await;
    assert_eq!(
        hooks.trace()[..3],
        [
            "keeper before connect",
            "silent before connect",
            "keeper after connect"
        ]
    );
    assert_eq!(calls[2].1["context"], context);
    assert!(sse.quiet_for(Duration::from_millis(300)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hooks.calls().len(),
        3,
        "no after call for the hook that kept no context"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p37_a_before_hook_cancels_and_the_client_gets_a_403_with_the_reason_and_no_after_call() {
    let hooks = HookServer::start(|_, c| {
        if c["phase"] == "before" && c["target"].as_str().unwrap().starts_with("secret") {
            json!({"decision": "cancel", "reason": "secrets are not for you"})
        } else {
            json!({"context": "seen"})
        }
    })
    .await;
    let (server, _t) = start(&hooks.config(&["gate"]));
    for r in [
        client()
            .get(server.url("/v1/stream?key=secret/plans"))
            .send()
            .await
            .unwrap(),
        client()
            .post(server.url("/v1/subscriptions"))
            .json(&json!({"transport": "poll", "subtree": "secret"}))
            .send()
            .await
            .unwrap(),
    ] {
        let body = refused_with(r, "secrets are not for you").await;
        assert_eq!(body["error"]["code"], "refused_by_hook");
    }
    assert_eq!(
        hooks.trace(),
        ["gate before connect", "gate before connect"],
        "no after calls"
    );
    assert!(
        get_json(&server, "/v1/subscriptions")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The same hook lets other keys through, and hears the stream's end as a forced cancel.
    let sse = SseClient::connect(&server, "key=public/news", None).await;
    hooks.wait_calls(4).await;
    drop(sse);
    let calls = hooks.wait_calls(6).await;
    let cancel = &calls[4].1;
    assert_eq!(
        (cancel["phase"].as_str(), cancel["operation"].as_str()),
        (Some("before"), Some("cancel"))
    );
    assert_eq!(
        (cancel["reason"].as_str(), cancel["forced"].as_bool()),
        (Some("close"), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p38_a_retry_after_a_failure_reruns_the_operation_without_a_second_before_call() {
    let herald_url: Arc<Mutex<String>> = Arc::default();
    let url = herald_url.clone();
    let hooks = HookServer::start(move |_, c| {
        if c["phase"] == "before" {
            return json!({"context": 1});
        }
        if c["status"] == "failed" {
            // Make the failed request valid (its `after` is one event ahead), then retry.
            let base = url.lock().unwrap().clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let r = client()
                        .post(format!("{base}/v1/events"))
                        .json(&json!({"events": [{"key": "r/1", "kind": "object_created"}]}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                })
            });
            return json!({"decision": "retry"});
        }
        json!({"decision": "retry"})
    })
    .await;
    let (server, _t) = start(&hooks.config(&["retrier"]));
    *herald_url.lock().unwrap() = server.base();
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "r/1", "after": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let calls = hooks.calls();
    let summary: Vec<String> = calls
        .iter()
        .map(|(_, c)| {
            format!(
                "{} {}",
                c["phase"].as_str().unwrap(),
                c["status"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(summary, ["before success", "after failed", "after success"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p39_before_calls_run_in_reverse_registration_order_and_after_calls_in_reverse_of_that() {
    let hooks = HookServer::start(|_, _| json!({"context": true})).await;
    let (server, _t) = start(&hooks.config(&["first", "second", "third"]));
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "o/1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        hooks.trace(),
        [
            "third before connect",
            "second before connect",
            "first before connect",
            "first after connect",
            "second after connect",
            "third after connect"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p40_requests_refused_up_front_and_subscriptions_restored_at_start_call_no_hook() {
    let hooks = HookServer::start(|_, _| json!({"context": 1})).await;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, hooks.config(&["h"])).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let env = [("HERALD_CONNECTIONS__PRESENCE", "true")];
    let mut server = Server::start_in(&tmp.path().join("d"), &args, &env);
    // Bad input is refused before any attempt.
    for body in [
        json!({"transport": "carrier-pigeon", "key": "a"}),
        json!({"transport": "poll", "key": "/bad//key"}),
        json!({"transport": "poll"}),
    ] {
        let r = client()
            .post(server.url("/v1/subscriptions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    let r = client()
        .get(server.url("/v1/stream?kinds=nonsense"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(hooks.calls().is_empty(), "{:?}", hooks.trace());
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "kept/1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(hooks.calls().len(), 2);
    // A restart restores the subscription without a connect.
    assert!(server.terminate());
    let port = server.port;
    let server = Server::start_on(port, &tmp.path().join("d"), &args, &env);
    assert_eq!(
        get_json(&server, "/v1/subscriptions")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hooks.calls().len(), 2, "{:?}", hooks.trace());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_times_out_lets_through_when_open_and_refuses_when_closed() {
    let hooks = HookServer::start(|_, _| json!({"delay_ms": 2000})).await;
    let (open, _t1) = start(&hooks.config(&["lazy"]));
    let started = Instant::now();
    let _sse = SseClient::connect(&open, "key=t/1", None).await;
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "the timeout applied"
    );
    let (closed, _t2) = start(&hooks.config(&["lazy:closed"]));
    let r = client()
        .get(closed.url("/v1/stream?key=t/1"))
        .send()
        .await
        .unwrap();
    refused_with(r, "unavailable").await;
    // So is a hook that answers nonsense.
    let nonsense = HookServer::start(|_, _| json!({"decision": "maybe"})).await;
    let (confused, _t4) = start(&nonsense.config(&["confused:closed"]));
    let r = client()
        .get(confused.url("/v1/stream?key=t/1"))
        .send()
        .await
        .unwrap();
    refused_with(r, "unknown decision").await;
    // An unreachable hook is the same.
    let (gone, _t3) = start(
        "[[hooks.http]]\nname = \"gone\"\nurl = \"http://127.0.0.1:9/\"\ntimeout = \"500ms\"\nfailure = \"closed\"\n",
    );
    let r = client()
        .get(gone.url("/v1/stream?key=t/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_is_a_cancel_a_hook_may_refuse() {
    let hooks = HookServer::start(|_, c| {
        if c["operation"] == "cancel" && c["target"] == "locked/1" && c["phase"] == "before" {
            json!({"decision": "cancel", "reason": "locked subscriptions stay"})
        } else {
            json!({})
        }
    })
    .await;
    let (server, _t) = start(&hooks.config(&["h"]));
    let mut ids = Vec::new();
    for key in ["locked/1", "free/1"] {
        let v: Value = client()
            .post(server.url("/v1/subscriptions"))
            .json(&json!({"transport": "poll", "key": key}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let r = client()
        .delete(server.url(&format!("/v1/subscriptions/{}", ids[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .delete(server.url(&format!("/v1/subscriptions/{}", ids[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let left = get_json(&server, "/v1/subscriptions").await;
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["id"], ids[0].as_str());
    let cancels: Vec<Value> = hooks
        .calls()
        .into_iter()
        .filter(|(_, c)| c["operation"] == "cancel")
        .map(|(_, c)| c)
        .collect();
    assert_eq!(cancels.len(), 2);
    assert!(
        cancels
            .iter()
            .all(|c| c["reason"] == "unsubscribe" && c["forced"] == false)
    );
}

/// P37 for MAPI: a *before* hook that cancels a Disconnect leaves the session as it was and
/// the client is told WN_CANCEL (1223) as the Disconnect's ErrorCode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_mapi_disconnect_answers_wn_cancel_and_the_session_goes_on() {
    let hooks = HookServer::start(|_, c| {
        if c["operation"] == "cancel" && c["transport"] == "mapi" && c["phase"] == "before" {
            json!({"decision": "cancel", "reason": "sessions stay"})
        } else {
            json!({})
        }
    })
    .await;
    let (server, _t) = start(&format!("{EXCHANGE_USERS}{}", hooks.config(&["h"])));
    let mut c = common::mapi::Client::new(&server, common::mapi::ALICE);
    c.connect().await;
    c.logon().await;
    let a = c.post("Disconnect", vec![]).await;
    assert_eq!(a.response_code, 0);
    let body = a.stream.unwrap().body;
    assert_eq!(
        u32::from_le_bytes(body[4..8].try_into().unwrap()),
        herald_core::hooks::WN_CANCEL
    );
    assert!(c.cookie.is_some(), "the session cookie stays");
    assert!(c.execute(&[]).await.is_empty(), "the session goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_list_refuses_by_owner_and_prefix_over_every_protocol() {
    let (server, _t) = start(&format!(
        "{EXCHANGE_USERS}[hooks]\naudit = true\n[[hooks.access.deny]]\nprefix = \"secret\"\n[[hooks.access.deny]]\nowner = \"bob@example.test\"\ntransport = \"ews\"\n[[hooks.access.deny]]\nowner = \"bob@example.test\"\ntransport = \"mapi\"\n"
    ));
    let api = |r: reqwest::RequestBuilder| r.bearer_auth(PRODUCER_KEY);
    let r = api(client().get(server.url("/v1/stream?subtree=secret")))
        .send()
        .await
        .unwrap();
    refused_with(r, "hooks.access.deny").await;
    let r = api(client().get(server.url("/v1/stream?key=public/1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // EWS: the refusal is an EWS error.
    let subscribe = envelope(
        "<m:Subscribe><m:PullSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:Timeout>5</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>",
    );
    let ews = |user: &str, pw: &str| {
        client()
            .post(server.url("/EWS/Exchange.asmx"))
            .header("content-type", "text/xml; charset=utf-8")
            .basic_auth(user, Some(pw))
            .body(subscribe.clone())
            .send()
    };
    let bob = ews("bob@example.test", "bob-pw")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(bob.contains("ErrorAccessDenied"), "{bob}");
    let alice = ews("alice@example.test", "alice-pw")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(alice.contains("NoError"), "{alice}");
    // MAPI: a cancelled Connect answers WN_CANCEL (1223), as P37 says the caller is told.
    let connect = |user: &'static str, pw: &'static str| {
        let body = herald_rop::mapihttp::ConnectRequest {
            user_dn: "/o=Herald/cn=Recipients/cn=x".into(),
            flags: 0,
            code_page: 1252,
            lcid_sort: 0x409,
            lcid_string: 0x409,
            aux: vec![],
        }
        .encode()
        .unwrap();
        client()
            .post(server.url(&format!("/mapi/emsmdb/?MailboxId={user}")))
            .basic_auth(user, Some(pw))
            .header("content-type", "application/mapi-http")
            .header("x-requesttype", "Connect")
            .header("x-requestid", "{E2EA6C1C-E61B-49E9-9CFB-38184F907552}:1")
            .header("x-clientinfo", "{2F94A2BF-A2E6-4CCC-BF98-B5F22C542226}:1")
            .body(body)
            .send()
    };
    let error_code = |raw: &[u8]| {
        let stream = herald_rop::mapihttp::ResponseStream::parse(raw).unwrap();
        herald_rop::mapihttp::ConnectResponse::decode(&stream.body)
            .unwrap()
            .unwrap()
            .error_code
    };
    let bob = connect("bob@example.test", "bob-pw")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(error_code(&bob), herald_core::hooks::WN_CANCEL);
    let alice = connect("alice@example.test", "alice-pw")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(error_code(&alice), 0);
}

#[test]
fn the_cli_sets_and_shows_the_state_and_lists_connections() {
    let server = Server::start();
    let run = |args: &[&str]| {
        let out = herald()
            .args(args)
            .arg("--server")
            .arg(server.base())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&["state"]).trim(), "online");
    assert_eq!(run(&["state", "offline", "--block"]).trim(), "offline");
    assert_eq!(run(&["state"]).trim(), "offline");
    assert_eq!(run(&["state", "online", "--block"]).trim(), "online");
    assert_eq!(run(&["connections"]).trim(), "no connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_kicks_a_stream_and_hooks_hear_it_once_and_may_refuse() {
    let hooks = HookServer::start(|_, c| {
        if c["phase"] == "before" && c["reason"] == "kick" && c["target"] == "vip/1" {
            json!({"decision": "cancel", "reason": "VIPs stay"})
        } else {
            json!({})
        }
    })
    .await;
    let (server, _t) = start(&hooks.config(&["h"]));
    let mut watcher = Events::open(server.url("/v1/stream?subtree=$herald/presence")).await;
    let r = client_no_timeout()
        .get(server.url("/v1/stream?key=plain/1"))
        .send()
        .await
        .unwrap();
    let id = r.headers()["herald-connection"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut plain = eventsource_stream::EventStream::new(r.bytes_stream());
    let vip = client_no_timeout()
        .get(server.url("/v1/stream?key=vip/1"))
        .send()
        .await
        .unwrap();
    let vip_id = vip.headers()["herald-connection"]
        .to_str()
        .unwrap()
        .to_owned();
    watcher.presence(&id).await;

    let out = herald()
        .args(["kick", &id, "--server", &server.base()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let closed = tokio::time::timeout(WAIT, plain.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.event, "closed");
    assert!(closed.data.contains("kicked"));
    assert!(
        tokio::time::timeout(WAIT, plain.next())
            .await
            .unwrap()
            .is_none(),
        "the stream ended"
    );
    assert_eq!(
        watcher.presence(&id).await["connection_state"]["new_state"],
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kicks: Vec<Value> = hooks
        .calls()
        .into_iter()
        .filter(|(_, c)| c["operation"] == "cancel" && c["connection"] == id.as_str())
        .map(|(_, c)| c)
        .collect();
    assert_eq!(
        kicks.len(),
        1,
        "one cancel, not a second one for the close: {kicks:?}"
    );
    assert_eq!(
        (kicks[0]["reason"].as_str(), kicks[0]["forced"].as_bool()),
        (Some("kick"), Some(false))
    );

    let r = client()
        .delete(server.url(&format!("/v1/connections/{vip_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        connection(&server, &vip_id).await.unwrap()["state"],
        "online"
    );
    let r = client()
        .delete(server.url("/v1/connections/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    drop(vip);
}

#[test]
fn a_lease_streams_cannot_renew_in_time_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, "[connections]\nlease = \"10s\"\n").unwrap();
    let out = herald()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connections.lease") && err.contains("limits.keepalive"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ews_streaming_connections_and_mapi_sessions_are_connections_too() {
    let (server, _t) = start(EXCHANGE_USERS);
    let admin = |path: &str| {
        client()
            .get(server.url(path))
            .bearer_auth(PRODUCER_KEY)
            .send()
    };
    let by_transport = |list: &Value, t: &str| -> Vec<Value> {
        list.as_array()
            .unwrap()
            .iter()
            .filter(|c| c["transport"] == t)
            .cloned()
            .collect()
    };
    // EWS: a streaming connection is online while it is open.
    let ews = |body: String| {
        client_no_timeout()
            .post(server.url("/EWS/Exchange.asmx"))
            .header("content-type", "text/xml; charset=utf-8")
            .basic_auth("alice@example.test", Some("alice-pw"))
            .body(body)
            .send()
    };
    let subscribed = ews(envelope("<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sub_id = subscribed
        .split("<m:SubscriptionId>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    let stream = ews(envelope(&format!("<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub_id}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>")))
        .await
        .unwrap();
    let mut body = stream.bytes_stream();
    body.next().await.unwrap().unwrap();
    let list: Value = admin("/v1/connections")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streams = by_transport(&list, "ews");
    assert_eq!(streams.len(), 1, "{list}");
    assert_eq!(streams[0]["owner"], "alice@example.test");
    assert_eq!(streams[0]["state"], "online");
    assert_eq!(
        streams[0]["target"], "alice@example.test/",
        "the mailbox it follows"
    );
    drop(body);
    wait_until("the EWS stream is gone", || async {
        let list: Value = admin("/v1/connections")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        by_transport(&list, "ews").is_empty()
    })
    .await;

    // MAPI: a session is a connection from Connect to Disconnect.
    let mapi = |request_type: &'static str, body: Vec<u8>, cookie: Option<String>| {
        let mut r = client()
            .post(server.url("/mapi/emsmdb/?MailboxId=alice@example.test"))
            .basic_auth("alice@example.test", Some("alice-pw"))
            .header("content-type", "application/mapi-http")
            .header("x-requesttype", request_type)
            .header("x-requestid", "{E2EA6C1C-E61B-49E9-9CFB-38184F907552}:1")
            .header("x-clientinfo", "{2F94A2BF-A2E6-4CCC-BF98-B5F22C542226}:1")
            .body(body);
        if let Some(c) = cookie {
            r = r.header("cookie", format!("MapiContext={c}"));
        }
        r.send()
    };
    let connect = herald_rop::mapihttp::ConnectRequest {
        user_dn: "/o=Herald/cn=Recipients/cn=alice".into(),
        flags: 0,
        code_page: 1252,
        lcid_sort: 0x409,
        lcid_string: 0x409,
        aux: vec![],
    }
    .encode()
    .unwrap();
    let r = mapi("Connect", connect, None).await.unwrap();
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .strip_prefix("MapiContext=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let list: Value = admin("/v1/connections")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sessions = by_transport(&list, "mapi");
    assert_eq!(sessions.len(), 1, "{list}");
    assert_eq!(sessions[0]["id"], format!("mapi-{cookie}"));
    assert_eq!(sessions[0]["owner"], "alice@example.test");
    assert_eq!(sessions[0]["state"], "online");
    let r = mapi("Disconnect", vec![], Some(cookie)).await.unwrap();
    assert_eq!(r.headers()["x-responsecode"], "0");
    let list: Value = admin("/v1/connections")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(by_transport(&list, "mapi").is_empty(), "{list}");
    // Both left presence events behind: online, then offline, per connection.
    let mut watcher = Events::open(format!(
        "{}&access_token={PRODUCER_KEY}",
        server.url("/v1/stream?subtree=$herald/presence/alice@example.test&after=0")
    ))
    .await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = watcher.next().await.1;
        let key = e["key"].as_str().unwrap().to_owned();
        let transport = if key.contains("/ews-") { "ews" } else { "mapi" };
        seen.push(format!(
            "{transport} {}",
            e["connection_state"]["new_state"]
        ));
    }
    assert_eq!(seen, ["ews 2", "ews 1", "mapi 2", "mapi 1"]);
}

/// The README's walk-through: `herald tail` on the presence subtree shows another client come
/// online and go offline, in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_tail_shows_another_client_go_offline() {
    use std::io::{BufRead, BufReader};
    let (server, _t) = start("");
    let mut tail = herald()
        .args([
            "tail",
            "$herald/presence",
            "--subtree",
            "--server",
            &server.base(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for tail's own connection to show up, then open and close another client.
    wait_until("tail is connected", || async {
        let list = get_json(&server, "/v1/connections").await;
        list.as_array().unwrap().len() == 1
    })
    .await;
    let tails = get_json(&server, "/v1/connections").await[0]["id"].clone();
    let other = SseClient::connect(&server, "key=k/1", None).await;
    let list = get_json(&server, "/v1/connections").await;
    let id = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .find(|id| *id != tails)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(other);
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !lines
        .iter()
        .any(|l: &String| l.contains(&id) && l.ends_with("online -> offline"))
    {
        assert!(Instant::now() < deadline, "tail printed {lines:#?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    assert!(
        lines.iter().any(|l| l.contains(&id)
            && l.contains("connection_state")
            && l.ends_with("offline -> online")),
        "{lines:#?}"
    );
    let _ = tail.kill();
    let _ = tail.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_every_connection_offline_and_restored_subscriptions_online_again() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HERALD_CONNECTIONS__PRESENCE", "true")];
    let mut server = Server::start_in(&tmp.path().join("d"), &[], &env);
    let sub: Value = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "key": "r/1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["id"].as_str().unwrap().to_owned();
    assert!(server.terminate());
    let port = server.port;
    let server = Server::start_on(port, &tmp.path().join("d"), &[], &env);
    let mut history = Events::open(server.url(&format!(
        "/v1/stream?key=$herald/presence/anonymous/{id}&after=0"
    )))
    .await;
    let mut states = Vec::new();
    for _ in 0..3 {
        states.push(
            history.next().await.1["connection_state"]["new_state"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        states,
        [2, 1, 2],
        "online, offline at shutdown, online when restored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ews_push_endpoint_is_a_connection_offline_while_it_cannot_be_reached() {
    let (server, _t) = start(&format!(
        "{EXCHANGE_USERS}[ews]\nminute = \"1s\"\nheartbeat = \"500ms\"\npush_retry_base = \"200ms\"\n"
    ));
    let mut recv = Receiver::start().await;
    let subscribe = envelope(&format!(
        "<m:Subscribe><m:PushSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:StatusFrequency>3</t:StatusFrequency><t:URL>{}</t:URL></m:PushSubscriptionRequest></m:Subscribe>",
        recv.url()
    ));
    let answer = client()
        .post(server.url("/EWS/Exchange.asmx"))
        .header("content-type", "text/xml; charset=utf-8")
        .basic_auth("alice@example.test", Some("alice-pw"))
        .body(subscribe)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let id = answer
        .split("<m:SubscriptionId>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    let state = |server: &Server, id: String| {
        let r = client()
            .get(server.url("/v1/connections"))
            .bearer_auth(PRODUCER_KEY)
            .send();
        async move {
            let list: Value = r.await.unwrap().json().await.unwrap();
            list.as_array()
                .unwrap()
                .iter()
                .find(|c| c["id"] == id.as_str())
                .map(|c| c["state"].as_str().unwrap().to_owned())
        }
    };
    assert_eq!(state(&server, id.clone()).await.as_deref(), Some("online"));
    recv.down().await;
    publish_ok_with_key(&server, json!([created("alice@example.test/inbox/m1")])).await;
    wait_until("the push endpoint is offline", || {
        state(&server, id.clone()).map(|s| s.as_deref() == Some("offline"))
    })
    .await;
    recv.up().await;
    wait_until("the push endpoint is online again", || {
        state(&server, id.clone()).map(|s| s.as_deref() == Some("online"))
    })
    .await;
    recv.down().await;
}

async fn publish_ok_with_key(server: &Server, events: Value) {
    let r = client()
        .post(server.url("/v1/events"))
        .bearer_auth(PRODUCER_KEY)
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_an_ews_pull_gets_only_a_status_event_and_online_everything() {
    let (server, _t) = start(EXCHANGE_USERS);
    let ews = |body: String| async {
        client()
            .post(server.url("/EWS/Exchange.asmx"))
            .header("content-type", "text/xml; charset=utf-8")
            .basic_auth("alice@example.test", Some("alice-pw"))
            .body(body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let field = |xml: &str, tag: &str| -> String {
        xml.split(&format!("<m:{tag}>"))
            .nth(1)
            .or_else(|| xml.split(&format!("<t:{tag}>")).nth(1))
            .unwrap()
            .split('<')
            .next()
            .unwrap()
            .to_owned()
    };
    let subscribed = ews(envelope("<m:Subscribe><m:PullSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:Timeout>5</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>")).await;
    let id = field(&subscribed, "SubscriptionId");
    let watermark = field(&subscribed, "Watermark");
    assert_eq!(put_state(&server, "offline", true).await.0, 200);
    for i in 0..3 {
        publish_ok_with_key(
            &server,
            json!([created(&format!("alice@example.test/inbox/m{i}"))]),
        )
        .await;
    }
    let get = |wm: String| {
        envelope(&format!(
            "<m:GetEvents><m:SubscriptionId>{id}</m:SubscriptionId><m:Watermark>{wm}</m:Watermark></m:GetEvents>"
        ))
    };
    let offline = ews(get(watermark.clone())).await;
    assert!(offline.contains("StatusEvent"), "{offline}");
    assert!(
        !offline.contains("CreatedEvent"),
        "delivered while offline: {offline}"
    );
    assert_eq!(put_state(&server, "online", true).await.0, 200);
    let online = ews(get(watermark)).await;
    assert_eq!(online.matches("<t:CreatedEvent>").count(), 3, "{online}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_unadvises_only_what_it_advised_and_sees_only_its_own_connections() {
    const SECRET: &str = "a-token-secret-of-at-least-32-bytes!";
    let (server, _t) = start(&format!(
        "[auth]\nkeys = [\"{PRODUCER_KEY}\"]\ntoken_secret = \"{SECRET}\"\n"
    ));
    let mint = |sub: &str| {
        let out = herald()
            .args(["token", "create", "--sub", sub, "--prefix", sub])
            .env("HERALD_AUTH__TOKEN_SECRET", SECRET)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (alice, bob) = (mint("alice"), mint("bob"));
    let mut advise =
        Events::open(server.url(&format!("/v1/state/advise?token=1&access_token={alice}"))).await;
    let token = advise.next().await.1["advise_token"].as_u64().unwrap();
    let advised = || async {
        let v: Value = client()
            .get(server.url("/v1/state"))
            .bearer_auth(PRODUCER_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["advised"].as_u64().unwrap()
    };
    let r = client()
        .delete(server.url(&format!("/v1/state/advise/{token}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "unadvise always succeeds…");
    assert_eq!(advised().await, 1, "…but bob cannot cut alice's advise");
    // Each sees only their own connections; alice may watch her own presence.
    let _bobs = Events::open(server.url(&format!("/v1/stream?key=bob/1&access_token={bob}"))).await;
    let mine: Value = client()
        .get(server.url("/v1/connections"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(mine.as_array().unwrap().is_empty(), "{mine}");
    let all: Value = client()
        .get(server.url("/v1/connections"))
        .bearer_auth(PRODUCER_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    let r = client()
        .get(server.url("/v1/stream?subtree=$herald/presence/alice"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    let r = client()
        .get(server.url("/v1/stream?subtree=$herald/presence/bob"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .delete(server.url(&format!("/v1/state/advise/{token}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(advised().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_hook_logs_every_connect_and_cancel_with_its_result() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(
        &config,
        "[hooks]\naudit = true\n[[hooks.access.deny]]\nprefix = \"secret\"\n",
    )
    .unwrap();
    let port = herald_testkit::free_port().unwrap();
    let child = herald()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(tmp.path().join("d"))
        .env("HERALD_LOG", "warn,herald::audit=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the server is ready", || {
        let url = format!("{base}/readyz");
        async move {
            client()
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    let r = client()
        .get(format!("{base}/v1/stream?key=secret/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let ok = client_no_timeout()
        .get(format!("{base}/v1/stream?key=open/x"))
        .send()
        .await
        .unwrap();
    let id = ok.headers()["herald-connection"]
        .to_str()
        .unwrap()
        .to_owned();
    drop(ok);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM: a graceful stop, which waits for the cancel hooks.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("herald::audit"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("connect cancelled")
            && l.contains("secret/x")
            && l.contains("hooks.access.deny")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("connect success") && l.contains(&id)),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cancel success") && l.contains(&id) && l.contains("close")),
        "{log}"
    );
}

/// Producers keep publishing while the state flips offline and online again and again: every
/// subscriber still gets every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_offline_and_online_under_load_loses_and_repeats_nothing() {
    let (server, _t) = start("");
    let mut sse = SseClient::connect(&server, "subtree=x&after=0", None).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "A", "subtree": "x", "after": 0}).to_string(),
    ))
    .await
    .unwrap();
    let base = server.base();
    let producer = tokio::spawn(async move {
        let mut all = Vec::new();
        for i in 0..100 {
            let events: Vec<Value> = (0..4).map(|j| created(&format!("x/{i}/{j}"))).collect();
            let r = client()
                .post(format!("{base}/v1/events"))
                .json(&json!({"events": events}))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            all.extend(
                v["watermarks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_u64().unwrap()),
            );
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        all
    });
    let base = server.base();
    let flipper = tokio::spawn(async move {
        for i in 0..12u64 {
            for state in ["offline", "online"] {
                // Asynchronous changes; a change during a transition is refused: try again.
                loop {
                    let r = client()
                        .put(format!("{base}/v1/state"))
                        .json(&json!({"state": state}))
                        .send()
                        .await
                        .unwrap();
                    if r.status() != 409 {
                        assert!(r.status().is_success());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(5 + (i * 7) % 30)).await;
            }
        }
    });
    let published = producer.await.unwrap();
    flipper.await.unwrap();
    wait_until("the last transition ends", || async {
        get_json(&server, "/v1/state").await["transitioning"] == false
    })
    .await;
    assert_eq!(put_state(&server, "online", true).await.0, 200);
    assert_eq!(published.len(), 400);
    let mut got = Vec::new();
    while got.len() < published.len() {
        got.push(sse.next().await.unwrap().id.parse::<u64>().unwrap());
    }
    assert_eq!(got, published, "SSE");
    let mut ws_got = Vec::new();
    while ws_got.len() < published.len() {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if v["type"] == "event" {
            ws_got.push(v["event"]["watermark"].as_u64().unwrap());
        }
    }
    assert_eq!(ws_got, published, "WebSocket");
    assert!(
        sse.quiet_for(Duration::from_millis(300)).await,
        "a duplicate"
    );
}

/// Reads a WebSocket until its close frame: its code and reason (an error or the end of the
/// stream first, such as a reset, fails the test).
async fn close_frame<S>(ws: &mut S) -> (u16, String)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (f.code.into(), f.reason.to_string()),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reader_silent_past_its_lease_gets_a_close_frame_1008_not_a_reset() {
    let (server, _t) = start(SHORT_LEASE);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    // Silent: nothing is read (so no ping is answered) until well past the 2 s lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("lease"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_frame_over_the_limit_gets_a_close_frame_1009() {
    let (server, _t) = start("");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    ws.send(Message::text("x".repeat(70 * 1024))).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");
}
