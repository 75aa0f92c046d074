//! The children scope (`children=`) everywhere a scope is chosen: SSE, the WebSocket subscribe
//! frame and durable subscriptions select what is directly in a folder (by the parent an event
//! names, else its key's parent; moves by their old place too), not the folder's own changes
//! nor its subfolders' contents; tokens are checked on it, and a producer's named parents are
//! checked against its key's prefixes.

mod common;

use common::{SseClient, WsClient, client, herald, publish_ok};
use serde_json::{Value, json};

const INBOX: &str = "alice/inbox";

/// Events around the inbox; the watermarks a children subscription of the inbox selects are
/// those of the events marked `true`.
fn events() -> Vec<(Value, bool)> {
    vec![
        // The folder's own change: not in it.
        (
            json!({"key": INBOX, "kind": "object_modified", "object_type": "folder"}),
            false,
        ),
        (
            json!({"key": "alice/inbox/m1", "kind": "object_created", "object_type": "message"}),
            true,
        ),
        // A subfolder's content.
        (
            json!({"key": "alice/inbox/sub/m2", "kind": "object_created", "object_type": "message"}),
            false,
        ),
        // Another folder whose name starts alike.
        (
            json!({"key": "alice/inbox2/m3", "kind": "object_created", "object_type": "message"}),
            false,
        ),
        // Moved out of it: heard by its old place.
        (
            json!({"key": "alice/archive/m4", "kind": "object_moved", "object_type": "message", "old_key": "alice/inbox/m4"}),
            true,
        ),
        // New mail names the folder it arrived in, whatever its key.
        (
            json!({"key": "alice/store/m5", "kind": "new_mail", "parent": INBOX}),
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_selects_what_is_directly_in_a_folder_on_sse_websocket_and_durable_subscriptions()
{
    let server = common::Server::start();
    let mut sse = SseClient::connect(&server, &format!("children={INBOX}"), None).await;
    let mut ws = WsClient::connect(&server).await;
    ws.subscribe(json!({"op": "subscribe", "id": "s", "children": INBOX}))
        .await;
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&json!({"transport": "poll", "children": INBOX}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["filter"]["children"], INBOX, "{created}");

    let mut wanted = Vec::new();
    for (event, selected) in events() {
        let w = publish_ok(&server, json!([event])).await[0];
        if selected {
            wanted.push(w);
        }
    }

    let mut by_sse = Vec::new();
    while by_sse.len() < wanted.len() {
        let e = sse.next().await.expect("the stream ended");
        if !e.id.is_empty() {
            by_sse.push(e.id.parse::<u64>().unwrap());
        }
    }
    assert_eq!(by_sse, wanted, "SSE");

    let mut by_ws = Vec::new();
    while by_ws.len() < wanted.len() {
        let v = ws.frame().await;
        if v["type"] == "event" {
            by_ws.push(v["event"]["watermark"].as_u64().unwrap());
        }
    }
    assert_eq!(by_ws, wanted, "WebSocket");

    let page: Value = client()
        .get(server.url(&format!("/v1/subscriptions/{id}/events?limit=100")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let by_poll: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["watermark"].as_u64().unwrap())
        .collect();
    assert_eq!(by_poll, wanted, "durable subscription");

    // One scope at a time.
    let r = client()
        .get(server.url(&format!("/v1/stream?children={INBOX}&subtree=alice")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "children", "{v}");
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_is_checked_against_a_tokens_prefixes_and_named_parents_against_a_producers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let server = common::Server::start_in(
        &data,
        &[],
        &[
            ("HERALD_AUTH__KEYS", "[\"admin-key-1\"]"),
            ("HERALD_AUTH__TOKEN_SECRET", SECRET),
        ],
    );
    let out = herald()
        .args(["token", "create", "--sub", "alice", "--prefix", "alice"])
        .env("HERALD_AUTH__TOKEN_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let r = client()
        .get(server.url("/v1/stream?children=bob/inbox"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "children", "{v}");
    let r = client()
        .get(server.url(&format!("/v1/stream?children={INBOX}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);

    // A producer allowed only `bob` may not file an event in Alice's folder by naming it.
    let out = herald()
        .args(["keys", "create", "--prefix", "bob", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bob_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let publish = |event: Value| {
        client()
            .post(server.url("/v1/events"))
            .bearer_auth(&bob_key)
            .json(&json!({"events": [event]}))
            .send()
    };
    let r = publish(json!({"key": "bob/x/m1", "kind": "new_mail", "parent": INBOX}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "events[0].parent", "{v}");
    let r = publish(json!({"key": "bob/archive/m2", "kind": "object_moved", "object_type": "message", "old_key": "bob/inbox/m2", "old_parent": INBOX}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "events[0].old_parent", "{v}");
    let r = publish(json!({"key": "bob/inbox/m3", "kind": "new_mail", "parent": "bob/inbox"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
