//! The router in process: `app()` over a real `AppState` (a log on disk in a temporary
//! directory), driven with `oneshot` requests. For what needs no process or socket: a
//! response body that is not read is a client that does not read.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use herald_server::{AppState, Config, app};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A state over a fresh data directory, on loopback with authentication off.
async fn state() -> (AppState, tempfile::TempDir) {
    state_with(|_| {}).await
}

/// As [`state`], with the configuration changed first.
async fn state_with(change: impl FnOnce(&mut Config)) -> (AppState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    change(&mut config);
    let state = AppState::open(config, CancellationToken::new())
        .await
        .unwrap();
    (state, dir)
}

async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn json_request(method: &str, uri: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::builder().uri(uri).body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_advise_client_that_stops_reading_gets_an_explicit_overflow_not_silence() {
    let (state, _dir) = state().await;
    // The advise stream is opened and then not read, while the state flips 30 times: 90
    // notifications for a queue of 64.
    let advise = app(state.clone())
        .oneshot(get("/v1/state/advise?token=7"))
        .await
        .unwrap();
    assert_eq!(advise.status(), StatusCode::OK);
    for i in 0..30 {
        let target = if i % 2 == 0 { "offline" } else { "online" };
        let (status, body) = call(
            &state,
            json_request("PUT", "/v1/state", json!({"state": target, "block": true})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Read now: what was queued, in order, then an explicit overflow, then the end.
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        axum::body::to_bytes(advise.into_body(), 1 << 20),
    )
    .await
    .expect("the advise stream of a client that fell behind must end, not go quiet")
    .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"advised"), "{text}");
    assert_eq!(events.last(), Some(&"overflow"), "{text}");
    let notifications = &events[1..events.len() - 1];
    assert!(
        !notifications.is_empty() && notifications.len() <= 64,
        "{} notifications",
        notifications.len()
    );
    // Those that came are the first ones, whole transitions in order.
    for (i, name) in notifications.iter().enumerate() {
        assert_eq!(*name, ["start", "change", "done"][i % 3], "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_long_polls_and_fetches_through_the_router() {
    let (state, _dir) = state().await;
    let (status, sub) = call(
        &state,
        json_request(
            "POST",
            "/v1/subscriptions",
            json!({"transport": "poll", "subtree": "alice/inbox"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let id = sub["id"].as_str().unwrap().to_owned();
    let (status, wait) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/wait?timeout=0")),
    )
    .await;
    assert_eq!((status, &wait["pending"]), (StatusCode::OK, &json!(false)));
    let (status, published) = call(
        &state,
        json_request(
            "POST",
            "/v1/events",
            json!({"events": [
                {"key": "alice/inbox/m1", "kind": "object_created", "object_type": "message"},
                {"key": "bob/inbox/m1", "kind": "object_created", "object_type": "message"},
            ]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{published}");
    let (_, wait) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/wait?timeout=5")),
    )
    .await;
    assert_eq!(wait["pending"], true);
    let (status, page) = call(&state, get(&format!("/v1/subscriptions/{id}/events"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let keys: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["alice/inbox/m1"]);
    assert_eq!(page["next_after"], published["watermarks"][1]);
    // Passing the cursor back acknowledges it: nothing is pending any more.
    let next = page["next_after"].as_u64().unwrap();
    let (_, page) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/events?after={next}")),
    )
    .await;
    assert_eq!(page["events"], json!([]));
    let (_, wait) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/wait?timeout=0")),
    )
    .await;
    assert_eq!(wait["pending"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_connections_and_subscriptions_are_json_404s() {
    let (state, _dir) = state().await;
    let kick = Request::builder()
        .method("DELETE")
        .uri("/v1/connections/sse-nothing")
        .body(Body::empty())
        .unwrap();
    let (status, body) = call(&state, kick).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    let (status, body) = call(&state, get("/v1/subscriptions/nope/wait")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "subscription_not_found", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_repeated_query_parameters_are_json_errors_naming_the_parameter() {
    let (state, _dir) = state().await;
    let (_, sub) = call(
        &state,
        json_request(
            "POST",
            "/v1/subscriptions",
            json!({"transport": "poll", "subtree": "a"}),
        ),
    )
    .await;
    let id = sub["id"].as_str().unwrap();
    for (uri, field) in [
        ("/v1/stream?subtree=a&after=soon".to_owned(), "after"),
        ("/v1/stream?subtree=a&after=1&after=2".to_owned(), "after"),
        (
            "/v1/stream?subtree=a&access_token=x&access_token=y".to_owned(),
            "access_token",
        ),
        (format!("/v1/subscriptions/{id}/events?limit=-3"), "limit"),
        (format!("/v1/subscriptions/{id}/events?after=x"), "after"),
        (
            format!("/v1/subscriptions/{id}/wait?timeout=forever"),
            "timeout",
        ),
        ("/v1/state/advise?token=abc".to_owned(), "token"),
    ] {
        let resp = app(state.clone()).oneshot(get(&uri)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{uri}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["field"], field, "{uri}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_belong_to_the_api_key_that_used_them() {
    let (state, _dir) =
        state_with(|c| c.auth.keys = vec!["key-one".into(), "key-two".into()]).await;
    let publish = |key: &str, n: u32| {
        Request::builder()
            .method("POST")
            .uri("/v1/events")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .header("idempotency-key", "order-42")
            .body(Body::from(
                json!({"events": [{"key": format!("shop/{n}"), "kind": "object_created"}]})
                    .to_string(),
            ))
            .unwrap()
    };
    let (status, one) = call(&state, publish("key-one", 1)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    // Another producer's same key is its own: appended, not replayed, not refused.
    let (status, two) = call(&state, publish("key-two", 2)).await;
    assert_eq!(status, StatusCode::OK, "{two}");
    assert_eq!(two["replayed"], false);
    assert_ne!(one["watermarks"], two["watermarks"]);
    // Each still replays its own, and a different batch under its own key is a conflict.
    let (_, again) = call(&state, publish("key-one", 1)).await;
    assert_eq!(
        (again["replayed"].clone(), again["watermarks"].clone()),
        (json!(true), one["watermarks"].clone())
    );
    let (status, body) = call(&state, publish("key-one", 3)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_holds_at_most_subscriptions_max_durable_subscriptions() {
    let (state, _dir) = state_with(|c| c.subscriptions.max = 2).await;
    let create = || {
        json_request(
            "POST",
            "/v1/subscriptions",
            json!({"transport": "poll", "subtree": "a"}),
        )
    };
    assert_eq!(call(&state, create()).await.0, StatusCode::CREATED);
    let (status, second) = call(&state, create()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = call(&state, create()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "limit_reached");
    // Deleting one makes room.
    let id = second["id"].as_str().unwrap();
    let delete = Request::builder()
        .method("DELETE")
        .uri(format!("/v1/subscriptions/{id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&state, delete).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&state, create()).await.0, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_waits_at_most_max_wait_and_a_page_holds_at_most_max_page() {
    let (state, _dir) = state_with(|c| {
        c.limits.max_wait = Duration::from_secs(1);
        c.limits.max_page = 3;
    })
    .await;
    let (_, sub) = call(
        &state,
        json_request(
            "POST",
            "/v1/subscriptions",
            json!({"transport": "poll", "subtree": "a"}),
        ),
    )
    .await;
    let id = sub["id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let (status, wait) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/wait?timeout=60")),
    )
    .await;
    assert_eq!((status, &wait["pending"]), (StatusCode::OK, &json!(false)));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"key": format!("a/{i}"), "kind": "object_created"}))
        .collect();
    let (status, _) = call(
        &state,
        json_request("POST", "/v1/events", json!({ "events": events })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, page) = call(
        &state,
        get(&format!("/v1/subscriptions/{id}/events?limit=100")),
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 3, "{page}");
    assert_eq!(page["more"], true);
}
