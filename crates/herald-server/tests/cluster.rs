//! Two `herald serve` processes on one JetStream log (a real 3-node `nats-server` cluster,
//! sync always): events published on one node reach subscribers of the other; a client of a
//! node that dies resumes on the other from its last watermark with nothing missed; a poll
//! subscription made on one node is read and acknowledged on the other; a dead node's webhooks
//! are taken over (same `webhook-id` on redelivery) and its connections go offline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{
    EXCHANGE_USERS, PRODUCER_KEY, Receiver, Server, SseClient, client, client_no_timeout, created,
    publish_ok,
};
use futures_util::StreamExt;
use herald_testkit::{ClusterOptions, NatsCluster};
use serde_json::{Value, json};

/// A Herald node on the cluster's server `nats`, on stream `stream`.
fn node(cluster: &NatsCluster, nats: usize, stream: &str) -> (Server, tempfile::TempDir) {
    node_config(cluster, nats, stream, "", &[])
}

/// A node with more settings (environment).
fn node_with(
    cluster: &NatsCluster,
    nats: usize,
    stream: &str,
    env: &[(&str, &str)],
) -> (Server, tempfile::TempDir) {
    node_config(cluster, nats, stream, "", env)
}

/// A node with a configuration file (`toml`, possibly empty) and environment.
fn node_config(
    cluster: &NatsCluster,
    nats: usize,
    stream: &str,
    toml: &str,
    env: &[(&str, &str)],
) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, toml).unwrap();
    let servers = cluster.url(nats);
    let mut all = vec![
        ("HERALD_JETSTREAM__STREAM", stream),
        ("HERALD_JETSTREAM__REQUEST_TIMEOUT", "5s"),
    ];
    all.extend_from_slice(env);
    let server = Server::start_in(
        &tmp.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--log-backend",
            "jetstream",
            "--jetstream-servers",
            &servers,
        ],
        &all,
    );
    (server, tmp)
}

/// SIGKILLs a node.
fn kill(server: &mut Server) {
    if let Some(mut c) = server.child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// Retries `check` every 100 ms until it returns `Some`, for at most `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads SSE events until watermark `through`; the watermarks, checked contiguous from
/// `after + 1`.
async fn sse_until(sse: &mut SseClient, after: u64, through: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    let mut last = after;
    while last < through {
        let e = sse.next().await.expect("the stream ended");
        if e.id.is_empty() {
            continue;
        }
        let w: u64 = e.id.parse().unwrap();
        assert_eq!(w, last + 1, "a gap or a duplicate after {last}");
        last = w;
        seen.push(w);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_on_one_node_reach_sse_subscribers_of_the_other_and_survive_its_death() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    // The first node creates the stream (the cluster elects its leaders meanwhile).
    let (a, _ta) = node(&cluster, 0, "E2E");
    let (mut b, _tb) = node(&cluster, 1, "E2E");
    let mut on_b = SseClient::connect(&b, "subtree=alice", None).await;
    let mut acked = Vec::new();
    for i in 0..50 {
        let batch: Vec<_> = (0..4)
            .map(|j| created(&format!("alice/inbox/m{i}-{j}")))
            .collect();
        acked.extend(publish_ok(&a, serde_json::Value::Array(batch)).await);
    }
    assert_eq!(acked, (1..=200).collect::<Vec<_>>());
    assert_eq!(sse_until(&mut on_b, 0, 120).await.len(), 120);
    // Node B dies mid-stream; its client resumes on A from the last id it saw.
    kill(&mut b);
    for i in 50..60 {
        publish_ok(
            &a,
            serde_json::json!([created(&format!("alice/inbox/late{i}"))]),
        )
        .await;
    }
    let mut on_a = SseClient::connect(&a, "subtree=alice", Some(120)).await;
    assert_eq!(
        sse_until(&mut on_a, 120, 210).await,
        (121..=210).collect::<Vec<_>>()
    );
    assert!(on_a.quiet_for(Duration::from_millis(300)).await);
}

async fn get_json(url: String) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_subscription_made_on_one_node_is_read_acknowledged_and_deleted_on_the_other() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let (a, _ta) = node(&cluster, 0, "POLL");
    let (b, _tb) = node(&cluster, 1, "POLL");
    let r = client()
        .post(a.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "subtree": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut published = Vec::new();
    for i in 0..10 {
        published.extend(publish_ok(&a, json!([created(&format!("alice/inbox/m{i}"))])).await);
    }
    // Read on B at once (B may not have heard of it yet: it asks the store).
    let (status, page) = get_json(b.url(&format!("/v1/subscriptions/{id}/events?limit=100"))).await;
    assert_eq!(status, 200, "{page}");
    let got: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["watermark"].as_u64().unwrap())
        .collect();
    assert_eq!(got, published);
    // Acknowledged on B: A's next page starts after it.
    let next = page["next_after"].as_u64().unwrap();
    let (status, _) = get_json(b.url(&format!("/v1/subscriptions/{id}/events?after={next}"))).await;
    assert_eq!(status, 200);
    eventually(
        "the acknowledgement made on B seen on A",
        Duration::from_secs(10),
        || async {
            let (_, page) = get_json(a.url(&format!("/v1/subscriptions/{id}/events"))).await;
            page["events"].as_array().unwrap().is_empty().then_some(())
        },
    )
    .await;
    let more = publish_ok(&a, json!([created("alice/inbox/late")])).await;
    let (_, page) = get_json(a.url(&format!("/v1/subscriptions/{id}/events"))).await;
    assert_eq!(page["events"][0]["watermark"].as_u64(), Some(more[0]));
    // Deleted on B: gone on A too.
    let r = client()
        .delete(b.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    eventually(
        "the delete made on B seen on A",
        Duration::from_secs(10),
        || async {
            let (status, _) = get_json(a.url(&format!("/v1/subscriptions/{id}"))).await;
            (status == 404).then_some(())
        },
    )
    .await;
}

/// Fast webhook retries and a short lease, so that a takeover shows within seconds.
const TAKEOVER: [(&str, &str); 5] = [
    ("HERALD_WEBHOOKS__RETRY_BASE", "100ms"),
    ("HERALD_WEBHOOKS__RETRY_CAP", "400ms"),
    ("HERALD_WEBHOOKS__REQUEST_TIMEOUT", "2s"),
    ("HERALD_WEBHOOKS__STATUS_INTERVAL", "1h"),
    ("HERALD_JETSTREAM__LEASE", "2s"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_of_a_node_that_dies_is_taken_over_with_nothing_missed_and_the_same_ids() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let receiver = Receiver::start().await;
    let mut env = TAKEOVER.to_vec();
    env.push(("HERALD_JETSTREAM__NODE", "a"));
    let (mut a, _ta) = node_with(&cluster, 0, "HOOK", &env);
    env.pop();
    env.push(("HERALD_JETSTREAM__NODE", "b"));
    let (b, _tb) = node_with(&cluster, 1, "HOOK", &env);
    let r = client()
        .post(a.url("/v1/subscriptions"))
        .json(&json!({"transport": "webhook", "url": receiver.url(), "subtree": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Events keep coming, on both nodes, while A delivers and then dies.
    let mut keys = Vec::new();
    for i in 0..60 {
        let key = format!("alice/inbox/m{i}");
        publish_ok(if i % 2 == 0 { &a } else { &b }, json!([created(&key)])).await;
        keys.push(key);
    }
    let before = receiver.wait_for_keys(20, Duration::from_secs(20)).await;
    assert!(before.len() >= 20, "A delivered {} events", before.len());
    kill(&mut a);
    for i in 60..100 {
        let key = format!("alice/inbox/m{i}");
        publish_ok(&b, json!([created(&key)])).await;
        keys.push(key);
    }
    // B takes the lease once it runs out, and resumes from what A had acknowledged.
    let got = receiver
        .wait_for_keys(keys.len(), Duration::from_secs(30))
        .await;
    assert_eq!(
        got, keys,
        "every event once, in order (repeats only under one webhook-id)"
    );
    // A repeat is the same delivery: the same events under the same webhook-id.
    let mut ids_of: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in receiver.requests() {
        let v = r.json();
        if v["type"] != "events" {
            continue;
        }
        for e in v["events"].as_array().unwrap() {
            ids_of
                .entry(e["watermark"].as_u64().unwrap())
                .or_default()
                .insert(r.headers["webhook-id"].clone());
        }
    }
    for (w, ids) in &ids_of {
        assert_eq!(
            ids.len(),
            1,
            "watermark {w} delivered under several ids: {ids:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_connections_of_a_node_that_dies_go_offline_and_its_clients_resume_elsewhere() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let presence = ("HERALD_CONNECTIONS__PRESENCE", "true");
    let lease = ("HERALD_JETSTREAM__LEASE", "2s");
    let (mut a, _ta) = node_with(
        &cluster,
        0,
        "LIVE",
        &[presence, lease, ("HERALD_JETSTREAM__NODE", "a")],
    );
    let (b, _tb) = node_with(
        &cluster,
        1,
        "LIVE",
        &[presence, lease, ("HERALD_JETSTREAM__NODE", "b")],
    );
    let resp = client_no_timeout()
        .get(b.url("/v1/stream?subtree=$herald/presence"))
        .send()
        .await
        .unwrap();
    let mut watcher = Box::pin(
        eventsource_stream::EventStream::new(resp.bytes_stream())
            .filter_map(|e| async move { e.ok() })
            .filter(|e| std::future::ready(e.event == "connection_state"))
            .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()),
    );
    // A WebSocket client on A: its id names A.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", a.port))
        .await
        .unwrap();
    let online = loop {
        let e = tokio::time::timeout(common::WAIT, watcher.next())
            .await
            .unwrap()
            .unwrap();
        if e["key"].as_str().unwrap().contains("/ws-") {
            break e;
        }
    };
    let key = online["key"].as_str().unwrap().to_owned();
    assert!(key.ends_with(".a"), "{key}");
    assert_eq!(online["connection_state"]["new_state"], 2);
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"op": "subscribe", "id": "s1", "subtree": "alice"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let first = publish_ok(&a, json!([created("alice/inbox/before")])).await[0];
    // A dies without a word: B says its connection is offline, within about a lease.
    kill(&mut a);
    let t0 = Instant::now();
    let offline = loop {
        let e = tokio::time::timeout(common::WAIT, watcher.next())
            .await
            .unwrap()
            .unwrap();
        if e["key"] == key.as_str() {
            break e;
        }
    };
    assert_eq!(offline["connection_state"]["new_state"], 1, "{offline}");
    let took = t0.elapsed();
    eprintln!("offline said {took:?} after the kill");
    assert!(took < Duration::from_secs(10), "offline after {took:?}");
    drop(ws);
    // The client resumes on B from its last watermark: nothing missed.
    let later = publish_ok(&b, json!([created("alice/inbox/after")])).await[0];
    let mut sse = SseClient::connect(&b, "subtree=alice", Some(first - 1)).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = sse.next().await.expect("stream ended");
        if !e.id.is_empty() {
            seen.push(e.id.parse::<u64>().unwrap());
        }
    }
    assert_eq!(seen, vec![first, later]);
}

/// exchangelib, the real EWS client, subscribed on node B while events are published on node
/// A: streaming and push notifications arrive as on one node, and a pull client that moves
/// to A with its last watermark gets exactly what it had not seen.
#[test]
fn exchangelib_on_one_node_sees_what_is_published_on_the_other_and_resumes_there() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let minute = "1.5";
    let toml = format!(
        "{EXCHANGE_USERS}[ews]\nminute = \"{minute}s\"\nheartbeat = \"700ms\"\npush_retry_base = \"250ms\"\n"
    );
    let (a, _ta) = node_config(
        &cluster,
        0,
        "EWS",
        &toml,
        &[("HERALD_JETSTREAM__NODE", "a")],
    );
    let (b, _tb) = node_config(
        &cluster,
        1,
        "EWS",
        &toml,
        &[("HERALD_JETSTREAM__NODE", "b")],
    );
    common::exchangelib(
        &b.base(),
        PRODUCER_KEY,
        minute,
        &["streaming", "push", "resume"],
        &[("HERALD_PUBLISH_BASE", &a.base())],
    );
}

/// exchangelib's push subscription made on node A, which is SIGKILLed mid-stream while
/// events are published on node B: B takes the subscription over (its lease runs out) and
/// pushes every event in order under the same subscription id, and the client's Unsubscribe
/// answer ends it on B.
#[test]
fn an_ews_push_subscription_of_a_node_that_dies_is_taken_over_by_the_other() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let minute = "1.5";
    let toml =
        format!("{EXCHANGE_USERS}[ews]\nminute = \"{minute}s\"\npush_retry_base = \"250ms\"\n");
    let lease = ("HERALD_JETSTREAM__LEASE", "2s");
    let (mut a, _ta) = node_config(
        &cluster,
        0,
        "EWSPUSH",
        &toml,
        &[lease, ("HERALD_JETSTREAM__NODE", "a")],
    );
    let (b, _tb) = node_config(
        &cluster,
        1,
        "EWSPUSH",
        &toml,
        &[lease, ("HERALD_JETSTREAM__NODE", "b")],
    );
    let pid = a.child.as_ref().unwrap().id().to_string();
    common::exchangelib(
        &a.base(),
        PRODUCER_KEY,
        minute,
        &["takeover"],
        &[
            ("HERALD_PUBLISH_BASE", &b.base()),
            ("HERALD_KILL_PID", &pid),
        ],
    );
    // The process the client killed is reaped.
    kill(&mut a);
}

/// A MAPI client logged on to node A is told (RopNotify) of what is published on node B;
/// when A dies, it connects to B, logs on and registers again (MAPI sessions are per node;
/// the protocol has no watermark on the wire) and is told of what is published after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapi_client_is_told_of_events_from_the_other_node_and_registers_again_after_a_node_dies()
{
    use common::mapi::{ALICE, CREATED, Client, created_in, notifies, publish_to, register};
    use herald_rop::{NotificationScope, OpenFolder, RopRequest};
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let toml =
        format!("{EXCHANGE_USERS}[mapi]\nnotification_wait = \"2s\"\npending_period = \"300ms\"\n");
    let (mut a, _ta) = node_config(
        &cluster,
        0,
        "MAPI",
        &toml,
        &[("HERALD_JETSTREAM__NODE", "a")],
    );
    let (b, _tb) = node_config(
        &cluster,
        1,
        "MAPI",
        &toml,
        &[("HERALD_JETSTREAM__NODE", "b")],
    );
    let inbox_key = format!("{ALICE}/inbox");
    // Logs on, registers for new messages in the inbox, and returns the client.
    async fn registered(server: &Server) -> Client {
        let mut c = Client::new(server, ALICE);
        assert_eq!(c.connect().await.error_code, 0);
        let folders = c.logon().await;
        let inbox = folders[4];
        let answers = c
            .execute(&[
                RopRequest::OpenFolder(OpenFolder {
                    logon_id: 0,
                    input_handle_index: 0,
                    output_handle_index: 1,
                    folder_id: inbox,
                    open_mode_flags: 0,
                }),
                register(1, 2, CREATED, NotificationScope::Folder(inbox)),
            ])
            .await;
        assert_eq!(answers.len(), 2, "{answers:?}");
        c
    }
    // Waits (NotificationWait) and fetches (an empty Execute) until `n` notifications came.
    async fn told(c: &mut Client, n: usize) -> Vec<herald_rop::Fid> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && Instant::now() < deadline {
            let (w, _) = c.wait().await;
            if w.event_pending {
                let answers = c.execute(&[]).await;
                got.extend(
                    notifies(&answers)
                        .iter()
                        .map(|n| n.data.message_id.unwrap()),
                );
            }
        }
        got
    }
    let id = |name: &str| {
        herald_server::mapi::map::id_of(&herald_core::Key::from(
            format!("{inbox_key}/{name}").as_str(),
        ))
    };
    let mut on_a = registered(&a).await;
    publish_to(
        &b.base(),
        json!([created_in(&inbox_key, "m-1"), created_in(&inbox_key, "m-2")]),
    )
    .await;
    assert_eq!(
        told(&mut on_a, 2).await,
        vec![id("m-1"), id("m-2")],
        "told on A of B's events"
    );
    kill(&mut a);
    let mut on_b = registered(&b).await;
    publish_to(&b.base(), json!([created_in(&inbox_key, "m-3")])).await;
    assert_eq!(
        told(&mut on_b, 1).await,
        vec![id("m-3")],
        "told on B after registering there"
    );
}

/// A WebSocket client on node B gets, in order and once, what is published on node A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_client_on_one_node_gets_what_is_published_on_the_other() {
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let (a, _ta) = node(&cluster, 0, "WS");
    let (b, _tb) = node(&cluster, 1, "WS");
    let mut ws = common::WsClient::connect(&b).await;
    ws.subscribe(json!({"op": "subscribe", "id": "s1", "subtree": "alice"}))
        .await;
    let mut published = Vec::new();
    for i in 0..30 {
        published.extend(publish_ok(&a, json!([created(&format!("alice/inbox/w{i}"))])).await);
    }
    let mut got = Vec::new();
    while got.len() < published.len() {
        let v = ws.frame().await;
        if v["type"] == "event" {
            got.push(v["event"]["watermark"].as_u64().unwrap());
        }
    }
    assert_eq!(got, published);
}

/// `herald-client` given both nodes: its publisher and its subscriber are on node B when B is
/// SIGKILLed in the middle of a stream; both go on on node A. The subscriber sees every event
/// once, in order; the publisher's unanswered batches, sent again to A with their idempotency
/// keys, are appended once (the keys live in the cluster's bucket, not in a node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_rides_through_a_node_kill_with_every_event_once_in_order() {
    use herald_client::{Backoff, Client, EventJson, Subscribe};

    const BATCHES: u64 = 120;
    const PER_BATCH: u64 = 3;
    const TOTAL: u64 = BATCHES * PER_BATCH;
    let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
    let (a, _ta) = node(&cluster, 0, "CLIENT");
    let (mut b, _tb) = node(&cluster, 1, "CLIENT");
    let client = Client::builder()
        .server(&b.base())
        .server(&a.base())
        .backoff(Backoff {
            first: Duration::from_millis(50),
            max: Duration::from_millis(500),
        })
        .build()
        .unwrap();
    let subscriber = client.subscriber();
    let mut all = subscriber
        .subscribe(Subscribe::subtree("mail").after(0))
        .await
        .unwrap();
    let publisher = client.publisher();
    let producing = tokio::spawn(async move {
        let mut answers = Vec::new();
        for batch in 0..BATCHES {
            let events = (0..PER_BATCH)
                .map(|i| EventJson {
                    key: format!("mail/box{}", (batch * PER_BATCH + i) % 4),
                    kind: "extended".into(),
                    extended_event: Some((batch * PER_BATCH + i) as u32),
                    ..Default::default()
                })
                .collect();
            answers.push(publisher.send(events).await.unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut watermarks = Vec::new();
        for a in answers {
            watermarks.extend(a.await.expect("a batch failed").watermarks);
        }
        watermarks
    });
    let mut seen = Vec::new();
    let mut last = 0;
    while (seen.len() as u64) < TOTAL {
        let e = tokio::time::timeout(Duration::from_secs(60), all.next())
            .await
            .expect("no event within a minute")
            .expect("the subscription ended")
            .expect("an error instead of an event");
        assert!(e.watermark > last, "watermark {} after {last}", e.watermark);
        last = e.watermark;
        let herald_core::Event::Extended(x) = &e.notification.event else {
            panic!("not ours: {:?}", e.notification);
        };
        seen.push(u64::from(x.event));
        if seen.len() == 100 {
            kill(&mut b);
        }
    }
    assert_eq!(
        seen,
        (0..TOTAL).collect::<Vec<_>>(),
        "lost, repeated or reordered"
    );
    let watermarks = producing.await.unwrap();
    assert_eq!(watermarks.len() as u64, TOTAL);
    assert!(
        watermarks.windows(2).all(|w| w[0] < w[1]),
        "appended twice or out of order"
    );
    drop(a);
}
