//! Listings an operator pages through (`GET /v1/connections`, `GET /v1/subscriptions`):
//! searched and cut on the server, with how many matched in `x-total-count`, so that a console
//! over thousands of connections fetches the few it shows.

mod common;

use common::*;
use serde_json::{Value, json};

async fn listed(server: &Server, path: &str) -> (Vec<Value>, u64) {
    let r = client().get(server.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let total = r
        .headers()
        .get("x-total-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no x-total-count"));
    (r.json().await.unwrap(), total)
}

fn field(items: &[Value], name: &str) -> Vec<String> {
    items
        .iter()
        .map(|v| v[name].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn connections_and_subscriptions_are_searched_and_cut_with_the_total_in_a_header() {
    let server = Server::start();
    let _a = SseClient::connect(&server, "subtree=team-a/inbox", None).await;
    let _b1 = SseClient::connect(&server, "subtree=team-b/inbox", None).await;
    let _b2 = SseClient::connect(&server, "subtree=team-b/drafts", None).await;
    for subtree in ["team-a/x", "team-b/y", "team-b/z"] {
        let r = client()
            .post(server.url("/v1/subscriptions"))
            .json(&json!({"transport": "poll", "subtree": subtree}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    let (all, total) = listed(&server, "/v1/connections?transport=sse").await;
    assert_eq!((all.len(), total), (3, 3));
    let (b, total) = listed(&server, "/v1/connections?transport=sse&search=TEAM-B").await;
    assert_eq!(total, 2);
    let mut targets = field(&b, "target");
    targets.sort();
    assert_eq!(targets, ["team-b/drafts/", "team-b/inbox/"]);
    let (one, total) = listed(
        &server,
        "/v1/connections?transport=sse&search=team-b&limit=1",
    )
    .await;
    assert_eq!((one.len(), total), (1, 2));
    assert_eq!(
        one[0]["id"],
        b.iter()
            .map(|v| &v["id"])
            .min_by_key(|v| v.as_str())
            .cloned()
            .unwrap(),
        "sorted by id"
    );

    let (subs, total) = listed(&server, "/v1/subscriptions").await;
    assert_eq!((subs.len(), total), (3, 3));
    let (b, total) = listed(&server, "/v1/subscriptions?search=team-b&limit=1").await;
    assert_eq!((b.len(), total), (1, 2));
    assert!(
        b[0]["filter"]["subtree"]
            .as_str()
            .unwrap()
            .starts_with("team-b/")
    );
    let (none, total) = listed(&server, "/v1/subscriptions?transport=webhook").await;
    assert_eq!((none.len(), total), (0, 0));
    let ids = field(&subs, "id");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "sorted by id");
}
