//! `herald serve` as users meet it: a real process on a free port, real HTTP, SSE and
//! WebSocket clients, real files.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn publish_then_stream_and_resume_with_last_event_id() {
    let server = Server::start();
    let mut sse = SseClient::connect(&server, "subtree=alice@example.test&after=0", None).await;
    let w = publish_ok(
        &server,
        json!([
            created("alice@example.test/inbox/m1"),
            {"key": "alice@example.test/inbox/m2", "kind": "new_mail", "message_class": "IPM.Note"},
            {"key": "bob@example.test/inbox/m1", "kind": "object_created"},
            {"key": "alice@example.test/archive/m1", "kind": "object_moved", "old_key": "alice@example.test/inbox/m1",
             "parent": "alice@example.test/archive", "old_parent": "alice@example.test/inbox", "object_type": "message"}
        ]),
    )
    .await;
    assert_eq!(w, vec![1, 2, 3, 4]);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse.next().await.unwrap());
    }
    assert_eq!(
        got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["1", "2", "4"]
    );
    assert_eq!(got[1].event, "new_mail");
    let moved: Value = serde_json::from_str(&got[2].data).unwrap();
    assert_eq!(moved["old_key"], "alice@example.test/inbox/m1");
    assert_eq!(moved["watermark"], 4);
    drop(sse);

    // Away while two more events happen; back with Last-Event-ID.
    publish_ok(
        &server,
        json!([
            created("alice@example.test/inbox/m5"),
            created("alice@example.test/inbox/m6")
        ]),
    )
    .await;
    let mut sse = SseClient::connect(&server, "subtree=alice@example.test", Some(4)).await;
    assert_eq!(sse.next().await.unwrap().id, "5");
    assert_eq!(sse.next().await.unwrap().id, "6");
    assert!(
        sse.quiet_for(Duration::from_millis(300)).await,
        "a duplicate or stray event"
    );
    // And live ones keep coming.
    publish_ok(&server, json!([created("alice@example.test/inbox/m7")])).await;
    assert_eq!(sse.next().await.unwrap().id, "7");
}

#[tokio::test]
async fn streams_honour_key_subtree_and_kind_filters() {
    let server = Server::start();
    let mut exact = SseClient::connect(&server, "key=a/inbox/m1", None).await;
    let mut tree = SseClient::connect(&server, "subtree=a/inbox&kinds=new_mail", None).await;
    publish_ok(
        &server,
        json!([
            created("a/inbox/m1"),
            created("a/inbox/m1/attachment"),
            {"key": "a/inbox/m2", "kind": "new_mail"},
            {"key": "a/inboxes/m3", "kind": "new_mail"},
            {"key": "a/inbox/m1", "kind": "object_deleted"}
        ]),
    )
    .await;
    assert_eq!(exact.next().await.unwrap().id, "1");
    assert_eq!(exact.next().await.unwrap().id, "5");
    assert!(exact.quiet_for(Duration::from_millis(300)).await);
    assert_eq!(tree.next().await.unwrap().id, "3");
    assert!(tree.quiet_for(Duration::from_millis(300)).await);
    // Bad filters are refused with the field named.
    for (q, field) in [
        ("", "key"),
        ("key=a&subtree=b", "subtree"),
        ("key=a&kinds=nope", "kinds"),
        ("key=a//b", "key"),
    ] {
        let r = client()
            .get(server.url(&format!("/v1/stream?{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["field"], field, "{q}: {body}");
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[
            ("HERALD_LIMITS__MAX_BODY_BYTES", "4096"),
            ("HERALD_LIMITS__MAX_BATCH_EVENTS", "3"),
        ],
    );
    let c = client();
    let post = |body: String| {
        c.post(server.url("/v1/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let r = post("x".repeat(10_000)).await.unwrap();
    assert_eq!(r.status(), 413);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "body_too_large");
    assert_eq!(b["error"]["field"], "body");

    let four = json!({"events": [created("k"), created("k"), created("k"), created("k")]});
    let r = post(four.to_string()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["field"], "events");

    for (body, field) in [
        (json!({"events": []}), "events"),
        (
            json!({"events": [{"key": "k", "kind": "bogus"}]}),
            "events[0].kind",
        ),
        (
            json!({"events": [created("k"), {"key": "k", "kind": "object_created", "old_key": "x"}]}),
            "events[1].old_key",
        ),
        (
            json!({"events": [{"key": "k", "kind": "object_copied"}]}),
            "events[0].old_key",
        ),
        (
            json!({"events": [{"key": "", "kind": "object_created"}]}),
            "events[0].key",
        ),
        (
            json!({"events": [{"key": "k", "kind": "table_modified", "table": {"event": "row_added"}}]}),
            "events[0].table.index",
        ),
        (
            json!({"events": [{"key": "k", "kind": "connection_state"}]}),
            "events[0].kind",
        ),
        (
            json!({"events": [{"key": "k", "kind": "extended", "data": "not base64!"}]}),
            "events[0].data",
        ),
        (json!({"evnets": []}), "body"),
    ] {
        let r = post(body.to_string()).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["field"], field, "{body} → {b}");
    }
    let r = post("{not json".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["field"], "body");
    let r = c
        .post(server.url("/v1/events"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // Nothing was appended by any of these.
    let s: Value = c
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["log_last"], 0);
    // Unknown routes and subscriptions.
    let r = c
        .get(server.url("/v1/subscriptions/nope/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "subscription_not_found"
    );
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retry_safe() {
    let server = Server::start();
    let c = client();
    let body = json!({"events": [created("k/1"), created("k/2")]});
    let send = |key: &str, body: &Value| {
        c.post(server.url("/v1/events"))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
    };
    let first = send("req-42", &body).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let retry = send("req-42", &body).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["watermarks"], first["watermarks"]);
    assert_eq!(retry["replayed"], true);
    let other = send("req-42", &json!({"events": [created("k/9")]}))
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(
        other.json::<Value>().await.unwrap()["error"]["code"],
        "idempotency_conflict"
    );
    let s: Value = c
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["log_last"], 2);
}

async fn ws_next(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame in time")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn a_websocket_carries_many_subscriptions_with_resume_and_acks() {
    let server = Server::start();
    publish_ok(&server, json!([created("a/1"), created("b/1")])).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "A", "subtree": "a", "after": 0}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "subscribed", "id": "A", "after": 0})
    );
    let e = ws_next(&mut ws).await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["id"].as_str(),
            e["event"]["watermark"].as_u64()
        ),
        (Some("event"), Some("A"), Some(1))
    );
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "B", "key": "b/1"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
    publish_ok(&server, json!([created("a/2"), created("b/1")])).await;
    let mut seen = [ws_next(&mut ws).await, ws_next(&mut ws).await];
    seen.sort_by_key(|f| f["id"].as_str().unwrap().to_owned());
    assert_eq!(
        (
            seen[0]["id"].as_str(),
            seen[0]["event"]["watermark"].as_u64()
        ),
        (Some("A"), Some(3))
    );
    assert_eq!(
        (
            seen[1]["id"].as_str(),
            seen[1]["event"]["watermark"].as_u64()
        ),
        (Some("B"), Some(4))
    );
    // Ack, unsubscribe, and errors.
    ws.send(Message::text(
        json!({"op": "ack", "id": "A", "watermark": 3}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "acked", "id": "A", "watermark": 3})
    );
    ws.send(Message::text(
        json!({"op": "unsubscribe", "id": "B"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "unsubscribed", "id": "B"})
    );
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "A", "key": "x"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["code"], "duplicate_id");
    ws.send(Message::text("{\"op\":\"fly\"}")).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["code"], "invalid_frame");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "C", "key": "a//b"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["code"], "invalid_field");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "D", "key": "a", "after": 999}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["code"], "invalid_position");
    // B is gone: only A sees this.
    publish_ok(&server, json!([created("b/1"), created("a/3")])).await;
    let f = ws_next(&mut ws).await;
    assert_eq!(
        (f["id"].as_str(), f["event"]["watermark"].as_u64()),
        (Some("A"), Some(6))
    );
}

#[tokio::test]
async fn durable_subscriptions_long_poll_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_in(&dir, &[], &[]);
    let c = client();
    let sub: Value = c
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"subtree": "alice", "kinds": "new_mail,object_created", "transport": "poll"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["id"].as_str().unwrap().to_owned();
    let wait = |t: &str| {
        c.get(server.url(&format!("/v1/subscriptions/{id}/wait?timeout={t}")))
            .send()
    };

    // Nothing pending: the wait runs to its timeout.
    let started = std::time::Instant::now();
    let w: Value = wait("1").await.unwrap().json().await.unwrap();
    assert_eq!(w["pending"], false);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A wait in progress returns as soon as a matching event is appended.
    let waiter = tokio::spawn({
        let url = server.url(&format!("/v1/subscriptions/{id}/wait?timeout=30s"));
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_ok(&server, json!([{"key": "bob/inbox/x", "kind": "new_mail"}, {"key": "alice/inbox/x", "kind": "object_modified"}])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "non-matching events woke the wait");
    let t0 = std::time::Instant::now();
    publish_ok(
        &server,
        json!([{"key": "alice/inbox/m1", "kind": "new_mail"}, created("alice/inbox/m2")]),
    )
    .await;
    let w = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert_eq!(w["pending"], true);
    assert!(t0.elapsed() < Duration::from_secs(5));

    let page: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events?limit=1")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["watermark"], 3);
    assert_eq!(page["more"], true);
    let next = page["next_after"].as_u64().unwrap();
    let page: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events?after={next}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"][0]["watermark"], 4);
    let next = page["next_after"].as_u64().unwrap();
    // Acknowledge everything: nothing pending any more.
    let page: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events?after={next}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(page["events"].as_array().unwrap().is_empty());
    let w: Value = wait("0").await.unwrap().json().await.unwrap();
    assert_eq!(w["pending"], false);

    // Listed, then restored after a restart with its acknowledged watermark.
    let list: Value = c
        .get(server.url("/v1/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["acked"], 4);
    assert!(server.terminate());
    let server = Server::start_in(&dir, &[], &[]);
    publish_ok(&server, json!([created("alice/inbox/m9")])).await;
    let one: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["acked"], 4);
    let w: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}/wait?timeout=10")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(w["pending"], true);
    let page: Value = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"][0]["watermark"], 5);
    // Positions: too new is 400; deleting ends it.
    let r = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events?after=99")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "watermark_ahead"
    );
    let r = c
        .delete(server.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .get(server.url(&format!("/v1/subscriptions/{id}/wait")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"key": "k", "transport": "carrier-pigeon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["field"],
        "transport"
    );
}

#[tokio::test]
async fn idle_durable_subscriptions_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_SUBSCRIPTIONS__IDLE_TIMEOUT", "2s")],
    );
    let c = client();
    let sub: Value = c
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"key": "k", "transport": "poll"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = c
        .get(server.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn an_expired_position_is_a_named_event_on_sse_and_410_on_poll() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_RETENTION__MAX_EVENTS", "5")],
    );
    for i in 0..40 {
        publish_ok(&server, json!([created(&format!("k/{i}"))])).await;
    }
    let mut sse = SseClient::connect(&server, "subtree=k&after=1", None).await;
    let e = sse.next().await.unwrap();
    assert_eq!(e.event, "expired");
    let data: Value = serde_json::from_str(&e.data).unwrap();
    assert!(data["oldest_available"].as_u64().unwrap() > 2);
    assert!(
        sse.next().await.is_none(),
        "the stream did not end after expired"
    );
    let mut sse = SseClient::connect(&server, "subtree=k&after=500", None).await;
    assert_eq!(sse.next().await.unwrap().event, "reset");

    let c = client();
    let r = c
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"subtree": "k", "transport": "poll", "after": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "watermark_expired");
    assert!(b["error"]["oldest_available"].as_u64().is_some());
}

#[tokio::test]
async fn sigterm_closes_streams_with_a_final_status_and_keeps_every_event() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_in(&dir, &[], &[]);
    let mut sse = SseClient::connect(&server, "subtree=k", None).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "A", "subtree": "k"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
    publish_ok(&server, json!([created("k/1"), created("k/2")])).await;
    assert_eq!(sse.next().await.unwrap().id, "1");
    assert_eq!(sse.next().await.unwrap().id, "2");
    let term = tokio::task::spawn_blocking(move || {
        let clean = server.terminate();
        (clean, server)
    });
    let last = sse.next().await.unwrap();
    assert_eq!(last.event, "shutdown");
    assert!(sse.next().await.is_none());
    let mut ws_frames = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
        ws_frames.push(m);
    }
    assert!(
        ws_frames
            .iter()
            .any(|m| matches!(m, Message::Text(t) if t.contains("\"shutdown\""))),
        "{ws_frames:?}"
    );
    assert!(
        ws_frames
            .iter()
            .any(|m| matches!(m, Message::Close(Some(f)) if u16::from(f.code) == 1001)),
        "{ws_frames:?}"
    );
    let (clean, _server) = term.await.unwrap();
    assert!(clean, "herald did not exit cleanly on SIGTERM");
    let server = Server::start_in(&dir, &[], &[]);
    let mut sse = SseClient::connect(&server, "subtree=k&after=0", None).await;
    assert_eq!(sse.next().await.unwrap().id, "1");
    assert_eq!(sse.next().await.unwrap().id, "2");
}

#[tokio::test]
async fn health_metrics_status_and_openapi() {
    let server = Server::start();
    let c = client();
    assert_eq!(
        c.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    assert_eq!(
        c.get(server.url("/readyz")).send().await.unwrap().status(),
        200
    );
    publish_ok(&server, json!([created("k/1")])).await;
    let mut sse = SseClient::connect(&server, "subtree=k&after=0", None).await;
    sse.next().await.unwrap();
    let m = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "herald_events_appended_total 1",
        "herald_append_duration_seconds_bucket",
        "herald_deliveries_total{transport=\"sse\"} 1",
        "herald_connections{transport=\"sse\"} 1",
        "herald_queue_overflows_total",
        "herald_log_last_watermark 1",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    let s: Value = c
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["log_last"], 1);
    let doc: Value = c
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    for path in [
        "/v1/events",
        "/v1/stream",
        "/v1/ws",
        "/v1/subscriptions",
        "/v1/subscriptions/{id}",
        "/v1/subscriptions/{id}/wait",
        "/v1/subscriptions/{id}/events",
        "/v1/status",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"].get("EventJson").is_some());
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_AUTH__KEYS", "[\"s3cret\"]")],
    );
    let c = client();
    let r = c
        .post(server.url("/v1/events"))
        .json(&json!({"events": [created("k")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(server.url("/v1/events"))
        .bearer_auth("wrong")
        .json(&json!({"events": [created("k")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(server.url("/v1/events"))
        .bearer_auth("s3cret")
        .json(&json!({"events": [created("k")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A browser's EventSource cannot set headers: the key may come in the query.
    let r = client_no_timeout()
        .get(server.url("/v1/stream?key=k&after=0&access_token=s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health stays open for probes.
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_websocket_holds_at_most_max_ws_subscriptions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_LIMITS__MAX_WS_SUBSCRIPTIONS", "3")],
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
            .await
            .unwrap();
    for i in 0..4 {
        let frame = json!({"op": "subscribe", "id": format!("s{i}"), "key": format!("k/{i}")});
        ws.send(Message::text(frame.to_string())).await.unwrap();
        let answer = ws_next(&mut ws).await;
        if i < 3 {
            assert_eq!(answer["type"], "subscribed", "{answer}");
        } else {
            assert_eq!(answer["code"], "too_many_subscriptions", "{answer}");
        }
    }
    // One unsubscribed makes room again.
    ws.send(Message::text(
        json!({"op": "unsubscribe", "id": "s0"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "unsubscribed");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "s4", "key": "k/4"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_LIMITS__HEADER_TIMEOUT", "1s")],
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server gives up on the headers and closes: the read ends (0 bytes, or a 408).
    let _ = s.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}
