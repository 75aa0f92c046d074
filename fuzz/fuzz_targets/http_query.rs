//! Any bytes as the query string of every endpoint that reads one with `JsonQuery`
//! (`/v1/stream`, `/v1/subscriptions/{id}/events`, `/v1/subscriptions/{id}/wait`,
//! `/v1/state/advise`, `/v1/connections`), sent through the router of a real server: no
//! panic, no 5xx, and every 4xx has the API's JSON error body. Streams (SSE, advise) are
//! checked by status and headers only: their bodies stay open.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use herald_fuzz::{Harness, query_of};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    harness: Harness,
    /// A durable poll subscription on `alice@example.test`, so that `events` and `wait` reach
    /// the log instead of stopping at 404.
    sub: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let harness = Harness::new(|c| {
            // A long-poll with a fuzzed timeout returns at once.
            c.limits.max_wait = Duration::from_millis(1);
            c.limits.max_page = 50;
        });
        let post = |uri: &str, body: serde_json::Value| {
            let req = Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let (resp, body) = harness.call_read(req, Duration::from_secs(10));
            assert!(
                resp.status().is_success(),
                "{uri}: {} {}",
                resp.status(),
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        };
        let sub = post(
            "/v1/subscriptions",
            serde_json::json!({"transport": "poll", "subtree": "alice@example.test"}),
        );
        let sub = sub["id"].as_str().unwrap().to_owned();
        let events: Vec<_> = (0..5)
            .map(|i| serde_json::json!({"key": format!("alice@example.test/inbox/m{i}"), "kind": "new_mail", "parent": "alice@example.test/inbox"}))
            .collect();
        post("/v1/events", serde_json::json!({ "events": events }));
        Fixture { harness, sub }
    })
}

/// Whether the answer is the API's error: `{"error": {"code": "...", "message": "..."}}`.
fn is_api_error(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    v["error"]["code"].is_string() && v["error"]["message"].is_string()
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let query = query_of(data);
    let paths = [
        ("/v1/stream", true),
        ("/v1/state/advise", true),
        (&*format!("/v1/subscriptions/{}/events", f.sub), false),
        (&*format!("/v1/subscriptions/{}/wait", f.sub), false),
        ("/v1/subscriptions/x/events", false),
        ("/v1/connections", false),
    ];
    for (path, streams) in paths {
        let uri = format!("{path}?{query}");
        let req = Request::get(&uri)
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("{uri:?} is not a request: {e}"));
        let resp = f.harness.call(req);
        let status = resp.status();
        assert!(!status.is_server_error(), "{uri:?}: {status}");
        if streams && status == StatusCode::OK {
            assert_eq!(
                resp.headers()[header::CONTENT_TYPE],
                "text/event-stream",
                "{uri:?}"
            );
            // Dropped unread: the stream ends and its connection is released.
            continue;
        }
        let body = f.harness.rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                axum::body::to_bytes(resp.into_body(), 1 << 20),
            )
            .await
            .unwrap_or_else(|_| panic!("{uri:?}: the answer did not end"))
            .unwrap()
        });
        if status.is_client_error() {
            assert!(
                is_api_error(&body),
                "{uri:?}: {status} with a body that is not the API's JSON error: {:?}",
                String::from_utf8_lossy(&body)
            );
        } else {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&body).is_ok(),
                "{uri:?}: {status} {:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }
});
