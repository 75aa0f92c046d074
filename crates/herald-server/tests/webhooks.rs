//! Webhooks against a real HTTP receiver that fails, times out, answers 410, goes away and
//! comes back; signatures checked by the Python `standardwebhooks` package; SSRF refused.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Fast retry settings, so a test sees many attempts in seconds.
const FAST: [(&str, &str); 5] = [
    ("HERALD_WEBHOOKS__RETRY_BASE", "100ms"),
    ("HERALD_WEBHOOKS__RETRY_CAP", "400ms"),
    ("HERALD_WEBHOOKS__REQUEST_TIMEOUT", "1s"),
    ("HERALD_WEBHOOKS__FAIL_AFTER", "4s"),
    ("HERALD_WEBHOOKS__STATUS_INTERVAL", "1h"),
];

fn server_with(extra: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, &str)> = FAST.to_vec();
    env.extend_from_slice(extra);
    (Server::start_in(&tmp.path().join("d"), &[], &env), tmp)
}

async fn create_webhook(server: &Server, url: &str, subtree: &str) -> Value {
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "webhook", "url": url, "subtree": subtree}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

async fn sub_state(server: &Server, id: &str) -> Value {
    client()
        .get(server.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_state(server: &Server, id: &str, state: &str, within: Duration) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = sub_state(server, id).await;
        if v["state"] == state || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn keys(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("a/m{i}")).collect()
}

async fn publish_n(server: &Server, from: usize, n: usize) {
    for i in from..from + n {
        publish_ok(server, json!([created(&format!("a/m{i}"))])).await;
    }
}

fn verify_with_python(requests: &[Recorded], secrets: &[&str]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let recorded: Vec<Value> = requests
        .iter()
        .map(|r| json!({"headers": r.headers, "body": r.body}))
        .collect();
    std::fs::write(file.path(), serde_json::to_vec(&recorded).unwrap()).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/verify_webhooks.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(file.path())
        .args(secrets)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks rejected a signature:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_in_order_through_failures_timeouts_and_an_outage() {
    let (server, _tmp) = server_with(&[]);
    let mut rx = Receiver::start().await;
    let sub = create_webhook(&server, &rx.url(), "a").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    let secret = sub["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));

    // Verified first, then events flow.
    publish_n(&server, 0, 5).await;
    assert_eq!(rx.wait_for_keys(5, WAIT).await, keys(0, 5));
    let first = &rx.requests()[0];
    assert_eq!(first.json()["type"], "verification");

    // 5xx: retried until it works.
    rx.set(Mode::Status(503, None));
    publish_n(&server, 5, 5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = sub_state(&server, &id).await;
    assert_eq!(during["delivery"]["status"], "retrying", "{during}");
    assert!(
        during["delivery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("503")
    );
    assert!(during["delivery"]["attempts"].as_u64().unwrap() >= 2);
    assert!(during["lag"].as_u64().unwrap() >= 5);
    rx.set(Mode::Ok);
    assert_eq!(rx.wait_for_keys(10, WAIT).await, keys(0, 10));

    // Timeouts: the receiver may have taken a request Herald gave up on; webhook-id dedupes.
    rx.set(Mode::Slow(Duration::from_millis(1500)));
    publish_n(&server, 10, 3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rx.set(Mode::Ok);
    assert_eq!(rx.wait_for_keys(13, WAIT).await, keys(0, 13));

    // The endpoint goes away, events keep coming, it comes back on the same port.
    rx.down().await;
    publish_n(&server, 13, 7).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let away = sub_state(&server, &id).await;
    assert_eq!(away["delivery"]["status"], "retrying", "{away}");
    rx.up().await;
    assert_eq!(rx.wait_for_keys(20, WAIT).await, keys(0, 20));
    let back = sub_state(&server, &id).await;
    assert_eq!(back["delivery"]["status"], "active");
    assert!(back["delivery"]["last_success_at"].as_u64().is_some());
    assert_eq!(
        back["acked"].as_u64(),
        rx.delivered_watermarks().last().copied()
    );

    // Every request, whatever the outcome, carries a valid Standard Webhooks signature.
    verify_with_python(&rx.requests(), &[&secret]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_and_long_failure_pauses_then_enable_resumes_from_the_watermark() {
    let (server, _tmp) = server_with(&[]);
    // 410 Gone disables at once.
    let gone = Receiver::start().await;
    let sub = create_webhook(&server, &gone.url(), "g").await;
    let gid = sub["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    gone.set(Mode::Status(410, None));
    publish_ok(&server, json!([created("g/1")])).await;
    let v = wait_state(&server, &gid, "disabled", WAIT).await;
    assert_eq!(v["state"], "disabled", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("410"));

    // Failing longer than fail_after pauses, with an operational event.
    let rx = Receiver::start().await;
    let sub = create_webhook(&server, &rx.url(), "p").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.set(Mode::Status(500, None));
    publish_ok(&server, json!([created("p/1"), created("p/2")])).await;
    let v = wait_state(&server, &id, "paused", Duration::from_secs(20)).await;
    assert_eq!(v["state"], "paused", "{v}");
    let mut ops =
        SseClient::connect(&server, &format!("key=herald/webhooks/{id}&after=0"), None).await;
    let op = ops.next().await.unwrap();
    let op: Value = serde_json::from_str(&op.data).unwrap();
    assert_eq!(op["extended_event"], 1, "{op}");
    // Paused means paused: no attempts while it is.
    let before = rx.requests().len();
    publish_ok(&server, json!([created("p/3")])).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.requests().len(), before);
    // Enabled again: everything since the acknowledged watermark arrives, in order.
    rx.set(Mode::Ok);
    let r = client()
        .post(server.url(&format!("/v1/subscriptions/{id}/enable")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = rx.wait_for(3, WAIT).await;
    let all: Vec<u64> = got.into_iter().collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_idle_subscriptions_get_status_deliveries() {
    let (server, _tmp) = server_with(&[("HERALD_WEBHOOKS__STATUS_INTERVAL", "1s")]);
    let rx = Receiver::start().await;
    let sub = create_webhook(&server, &rx.url(), "r").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    // Idle: a status delivery comes.
    let deadline = std::time::Instant::now() + WAIT;
    while !rx.requests().iter().any(|r| r.json()["type"] == "status") {
        assert!(std::time::Instant::now() < deadline, "no status delivery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = rx
        .requests()
        .into_iter()
        .find(|r| r.json()["type"] == "status")
        .unwrap();
    assert_eq!(status.json()["subscription"], id.as_str());
    // 429 with Retry-After: 2 waits (about) two seconds, not the 100 ms back-off.
    rx.set(Mode::Status(429, Some(2)));
    publish_ok(&server, json!([created("r/1")])).await;
    let deadline = std::time::Instant::now() + WAIT;
    while rx.requests().iter().filter(|r| r.status == 429).count() < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tries: Vec<_> = rx
        .requests()
        .into_iter()
        .filter(|r| r.status == 429)
        .collect();
    let gap = tries[1].at - tries[0].at;
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    let v = sub_state(&server, &id).await;
    assert!(
        v["delivery"]["next_attempt_at"].as_u64().is_some()
            || v["delivery"]["status"] == "retrying"
    );
    rx.set(Mode::Ok);
    assert_eq!(rx.wait_for(1, WAIT).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_before_the_endpoint_echoes_the_challenge() {
    let (server, _tmp) = server_with(&[]);
    let rx = Receiver::start().await;
    rx.set(Mode::NoEcho);
    let sub = create_webhook(&server, &rx.url(), "v").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    publish_ok(&server, json!([created("v/1")])).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.json()["type"] == "verification")
    );
    let v = sub_state(&server, &id).await;
    assert_eq!(v["delivery"]["status"], "verifying");
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("challenge"),
        "{v}"
    );
    rx.set(Mode::Ok);
    assert_eq!(rx.wait_for(1, WAIT).await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_keeps_the_old_one_valid_for_a_while() {
    let (server, _tmp) = server_with(&[]);
    let rx = Receiver::start().await;
    let sub = create_webhook(&server, &rx.url(), "s").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    let old = sub["secret"].as_str().unwrap().to_owned();
    publish_ok(&server, json!([created("s/1")])).await;
    rx.wait_for(1, WAIT).await;
    let rotated: Value = client()
        .post(server.url(&format!("/v1/subscriptions/{id}/rotate-secret")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    publish_ok(&server, json!([created("s/2")])).await;
    rx.wait_for(2, WAIT).await;
    let after: Vec<Recorded> = rx
        .requests()
        .into_iter()
        .filter(|r| r.json()["events"][0]["watermark"] == 2)
        .collect();
    assert_eq!(after[0].headers["webhook-signature"].split(' ').count(), 2);
    verify_with_python(&after, &[&new, &old]);
    // The secret is not shown again.
    assert!(sub_state(&server, &id).await.get("secret").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_private_loopback_and_link_local_addresses_are_refused() {
    let (server, _tmp) = server_with(&[("HERALD_WEBHOOKS__ALLOW_LOOPBACK", "false")]);
    let rx = Receiver::start().await;
    for url in [
        rx.url(),
        "http://10.0.0.1/hook".to_owned(),
        "http://192.168.1.1/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[::1]:9/hook".to_owned(),
        "ftp://example.com/".to_owned(),
    ] {
        let r = client()
            .post(server.url("/v1/subscriptions"))
            .json(&json!({"transport": "webhook", "url": url, "key": "k"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["field"], "url");
    }
    // A name that resolves to loopback is refused after resolution: the receiver never hears.
    let sub = create_webhook(&server, &format!("http://localhost:{}/hook", rx.port), "k").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        rx.requests().is_empty(),
        "a request reached a loopback receiver"
    );
    let v = sub_state(&server, &id).await;
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_never_followed() {
    // Only 127.0.0.1 is allowed; the receiver there redirects to 127.0.0.2, which is not.
    let (server, _tmp) = server_with(&[
        ("HERALD_WEBHOOKS__ALLOW_LOOPBACK", "false"),
        ("HERALD_WEBHOOKS__ALLOWED_NETWORKS", "[\"127.0.0.1/32\"]"),
    ]);
    let target = Receiver::start_at("127.0.0.2".parse().unwrap(), 0).await;
    let rx = Receiver::start().await;
    let sub = create_webhook(&server, &rx.url(), "k").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    rx.wait_for(0, Duration::from_millis(500)).await;
    rx.set(Mode::Redirect(target.url()));
    publish_ok(&server, json!([created("k/1")])).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(target.requests().is_empty(), "Herald followed a redirect");
    let v = sub_state(&server, &id).await;
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("302"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_by_a_crash_comes_again_under_the_same_webhook_id() {
    let recv = Receiver::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut server = Server::start_in(&dir, &[], &FAST);
    let port = server.port;
    let sub = create_webhook(&server, &recv.url(), "a").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    wait_state(&server, &id, "active", WAIT).await;
    // The receiver takes the next delivery but answers late; meanwhile more events come.
    recv.set(Mode::Hold(Duration::from_secs(30)));
    publish_n(&server, 0, 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    while recv.delivered_watermarks().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        recv.delivered_watermarks().len(),
        1,
        "the first delivery is in flight"
    );
    publish_n(&server, 1, 4).await;
    // kill -9 while that delivery is unacknowledged, and start again.
    server.child.take().unwrap().kill().unwrap();
    recv.set(Mode::Ok);
    let server = Server::start_on(port, &dir, &[], &FAST);
    let got = recv.wait_for(5, WAIT).await;
    assert!(got.len() >= 5, "{got:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every event is under one webhook-id only, however often it was delivered.
    let mut ids: std::collections::HashMap<u64, std::collections::BTreeSet<String>> =
        Default::default();
    for r in recv.requests() {
        let v = r.json();
        if v["type"] != "events" {
            continue;
        }
        for e in v["events"].as_array().unwrap() {
            ids.entry(e["watermark"].as_u64().unwrap())
                .or_default()
                .insert(r.headers["webhook-id"].clone());
        }
    }
    assert_eq!(ids.len(), 5, "{ids:?}");
    for (w, set) in &ids {
        assert_eq!(set.len(), 1, "event {w} came under several ids: {set:?}");
    }
    drop(server);
}

/// Polls `check` on the subscription's view every 50 ms until it holds (15 s at most).
async fn until(server: &Server, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = sub_state(server, id).await;
        if check(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deliveries(server: &Server, id: &str) -> Vec<Value> {
    get_json(&server.url(&format!("/v1/subscriptions/{id}/deliveries"))).await
}

#[tokio::test]
async fn lag_grows_while_the_receiver_is_down_and_the_attempts_say_why() {
    let (server, _tmp) = server_with(&[]);
    let mut receiver = Receiver::start().await;
    let sub = create_webhook(&server, &receiver.url(), "a").await;
    let id = sub["id"].as_str().unwrap().to_owned();
    publish_n(&server, 0, 1).await;
    until(&server, &id, "first delivery", |v| {
        v["lag"] == 0 && v["acked"] == 1
    })
    .await;
    let first = deliveries(&server, &id).await;
    assert_eq!(first[0]["outcome"], "delivered", "{first:?}");

    receiver.down().await;
    publish_n(&server, 1, 2).await;
    // Events it does not follow do not count in its lag.
    publish_ok(&server, json!([created("b/m0")])).await;
    publish_n(&server, 3, 1).await;
    let lagging = until(&server, &id, "lag while down", |v| {
        v["lag"].as_u64() >= Some(3) && v["lag_seconds"].as_f64().unwrap_or(0.0) > 0.2
    })
    .await;
    assert_eq!(lagging["acked"], 1);
    assert_eq!(lagging["lag"], 3, "{lagging}");
    let failing = deliveries(&server, &id).await;
    assert_eq!(failing[0]["outcome"], "failed", "{failing:?}");
    assert!(
        failing[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a failed attempt says why: {failing:?}"
    );
    assert!(
        failing
            .windows(2)
            .all(|w| w[0]["at"].as_u64() >= w[1]["at"].as_u64()),
        "newest first"
    );

    receiver.up().await;
    // Caught up: every matching event acknowledged, nothing matching waits — even though
    // events it does not follow came after its last one.
    let caught_up = until(&server, &id, "caught up", |v| v["acked"] == 5).await;
    assert_eq!(caught_up["lag_seconds"], 0.0);
    publish_ok(&server, json!([created("b/m1"), created("b/m2")])).await;
    let after_others = sub_state(&server, &id).await;
    assert_eq!(after_others["acked"], 5, "{after_others}");
    assert_eq!(after_others["lag"], 0, "{after_others}");
    assert_eq!(after_others["lag_seconds"], 0.0, "{after_others}");
    assert_eq!(deliveries(&server, &id).await[0]["outcome"], "delivered");
}
