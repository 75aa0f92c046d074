//! Authentication and scopes against a real server: API keys (configured and created with
//! `herald keys create`), tokens minted with `herald token create`, every failure path, a
//! token reading outside its prefix refused on each transport, per-token limits, and the
//! refusal to serve openly on a non-loopback address.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "a-token-secret-of-at-least-32-bytes!";
const ADMIN: &str = "admin-key-1";

fn secured() -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[
            ("HERALD_AUTH__KEYS", "[\"admin-key-1\"]"),
            ("HERALD_AUTH__TOKEN_SECRET", SECRET),
        ],
    );
    (s, tmp)
}

fn mint(args: &[&str]) -> String {
    let out = herald()
        .args(["token", "create"])
        .args(args)
        .env("HERALD_AUTH__TOKEN_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn alice() -> String {
    mint(&[
        "--sub",
        "alice",
        "--prefix",
        "alice@example.test",
        "--kinds",
        "new_mail,object_created",
        "--max-connections",
        "2",
        "--max-subscriptions",
        "1",
    ])
}

async fn err_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or_default();
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn producers_need_an_api_key() {
    let (server, tmp) = secured();
    let c = client();
    let body = json!({"events": [created("alice@example.test/inbox/m1")]});
    let post = |auth: Option<String>| {
        let mut r = c.post(server.url("/v1/events")).json(&body);
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        r.send()
    };
    assert_eq!(
        err_code(post(None).await.unwrap()).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        err_code(post(Some("nope".into())).await.unwrap()).await,
        (401, "invalid_credentials".into())
    );
    assert_eq!(
        err_code(post(Some(alice())).await.unwrap()).await,
        (403, "forbidden".into())
    );
    assert_eq!(post(Some(ADMIN.into())).await.unwrap().status(), 200);
    // A key made with `herald keys create` works on the running server.
    let out = herald()
        .args(["keys", "create", "--data-dir"])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("hk_"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(post(Some(key)).await.unwrap().status(), 200);
    // Operator endpoints need a key too; health does not.
    assert_eq!(
        c.get(server.url("/v1/status"))
            .bearer_auth(alice())
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn expired_and_forged_tokens_are_refused_with_reasons() {
    let (server, _tmp) = secured();
    let c = client();
    let forged = {
        let out = herald()
            .args(["token", "create", "--sub", "mallory", "--prefix", ""])
            .env(
                "HERALD_AUTH__TOKEN_SECRET",
                "another-secret-that-is-32-bytes-long",
            )
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let r = c
        .get(server.url("/v1/stream?subtree=alice@example.test"))
        .bearer_auth(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(err_code(r).await, (401, "invalid_credentials".into()));
    let expired = mint(&[
        "--sub",
        "alice",
        "--prefix",
        "alice@example.test",
        "--ttl",
        "1s",
    ]);
    tokio::time::sleep(Duration::from_millis(7000)).await;
    let r = c
        .get(server.url("/v1/stream?subtree=alice@example.test"))
        .bearer_auth(expired)
        .send()
        .await
        .unwrap();
    assert_eq!(err_code(r).await, (401, "token_expired".into()));
}

#[tokio::test]
async fn a_token_reads_only_its_prefixes_and_kinds_on_sse() {
    let (server, _tmp) = secured();
    let t = alice();
    let c = client_no_timeout();
    let get = |q: &str| {
        c.get(server.url(&format!("/v1/stream?{q}")))
            .bearer_auth(&t)
            .send()
    };
    let r = get("subtree=bob@example.test").await.unwrap();
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
    let r = get("subtree=alice@example.testimony").await.unwrap();
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
    let r = get("subtree=alice@example.test").await.unwrap();
    assert_eq!(
        err_code(r).await,
        (403, "forbidden_kind".into()),
        "all kinds asked, two allowed"
    );
    // Allowed: header, then query parameter (EventSource), then cookie.
    publish_with(
        &server,
        json!([{"key": "alice@example.test/inbox/m1", "kind": "new_mail"}]),
    )
    .await;
    let ok = get("subtree=alice@example.test&kinds=new_mail&after=0")
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let mut events = eventsource_stream::EventStream::new(ok.bytes_stream());
    let e = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.id, "1");
    let by_query = c
        .get(server.url(&format!(
            "/v1/stream?subtree=alice@example.test&kinds=new_mail&access_token={t}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    // Two connections held: the third is over the token's limit.
    let third = c
        .get(server.url("/v1/stream?subtree=alice@example.test&kinds=new_mail"))
        .header("cookie", format!("herald_token={t}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("5".into())
    );
    assert_eq!(err_code(third).await, (429, "limit_reached".into()));
    drop(by_query);
    drop(events);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let by_cookie = c
        .get(server.url("/v1/stream?subtree=alice@example.test&kinds=new_mail"))
        .header("cookie", format!("herald_token={t}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_cookie.status(), 200);
}

async fn publish_with(server: &Server, events: Value) {
    let r = client()
        .post(server.url("/v1/events"))
        .bearer_auth(ADMIN)
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_token_reads_only_its_prefixes_on_websocket() {
    let (server, _tmp) = secured();
    let mut req = format!("ws://127.0.0.1:{}/v1/ws", server.port)
        .into_client_request()
        .unwrap();
    let unauth = tokio_tungstenite::connect_async(req.clone()).await;
    assert!(
        unauth.is_err(),
        "a WebSocket without credentials was accepted"
    );
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice()).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "b", "subtree": "bob@example.test", "kinds": "new_mail"})
            .to_string(),
    ))
    .await
    .unwrap();
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("forbidden_scope")),
        "{f}"
    );
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "a", "subtree": "alice@example.test", "kinds": "new_mail"})
            .to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut ws).await["type"], "subscribed");
    publish_with(&server, json!([{"key": "bob@example.test/inbox/m1", "kind": "new_mail"}, {"key": "alice@example.test/inbox/m1", "kind": "new_mail"}])).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["event"]["key"], "alice@example.test/inbox/m1");
}

async fn ws_frame(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        if let Message::Text(t) = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn durable_subscriptions_belong_to_their_token() {
    let (server, _tmp) = secured();
    let c = client();
    let t = alice();
    let bob = mint(&["--sub", "bob", "--prefix", "bob@example.test"]);
    let create = |tok: &str, body: Value| {
        c.post(server.url("/v1/subscriptions"))
            .bearer_auth(tok.to_owned())
            .json(&body)
            .send()
    };
    let r = create(
        &t,
        json!({"transport": "poll", "subtree": "bob@example.test", "kinds": "new_mail"}),
    )
    .await
    .unwrap();
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
    let r = create(
        &t,
        json!({"transport": "poll", "subtree": "alice@example.test", "kinds": "new_mail"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let mine: Value = r.json().await.unwrap();
    assert_eq!(mine["owner"], "alice");
    let id = mine["id"].as_str().unwrap();
    // Its limit is one subscription.
    let r = create(
        &t,
        json!({"transport": "poll", "key": "alice@example.test/x", "kinds": "new_mail"}),
    )
    .await
    .unwrap();
    assert_eq!(err_code(r).await, (429, "limit_reached".into()));
    // Bob can neither see nor use it; the admin key sees everything.
    let r = c
        .get(server.url(&format!("/v1/subscriptions/{id}/events")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(err_code(r).await, (403, "not_owner".into()));
    let r = c
        .delete(server.url(&format!("/v1/subscriptions/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let bobs: Value = c
        .get(server.url("/v1/subscriptions"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bobs.as_array().unwrap().len(), 0);
    let all: Value = c
        .get(server.url("/v1/subscriptions"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    let r = c
        .get(server.url(&format!("/v1/subscriptions/{id}/wait?timeout=0")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A webhook outside the token's prefix is refused too.
    let r = create(&bob, json!({"transport": "webhook", "url": "http://127.0.0.1:9/x", "subtree": "alice@example.test"})).await.unwrap();
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
}

#[test]
fn serving_openly_on_a_non_loopback_address_is_refused_unless_chosen() {
    let tmp = tempfile::tempdir().unwrap();
    let port = herald_testkit::free_port().unwrap();
    let out = herald()
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
        ])
        .arg(tmp.path().join("d"))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without authentication") && err.contains("allow_open"),
        "{err}"
    );
    // Explicitly chosen: it starts.
    let mut child = herald()
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
        ])
        .arg(tmp.path().join("d"))
        .env("HERALD_AUTH__ALLOW_OPEN", "true")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "did not start with allow_open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the CLI; its stdout.
fn cli(args: &[&str]) -> String {
    let out = herald().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "herald {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn publish_as(server: &Server, key: &str, event_key: &str) -> reqwest::Response {
    client()
        .post(server.url("/v1/events"))
        .bearer_auth(key)
        .json(&json!({"events": [{"key": event_key, "kind": "object_created"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_prefixes_and_operations_is_listed_and_revoked_without_a_restart() {
    let (server, _tmp) = secured();
    let dir = server.data_dir.to_str().unwrap().to_owned();
    let key = cli(&[
        "keys",
        "create",
        "--data-dir",
        &dir,
        "--name",
        "shop-feed",
        "--prefix",
        "shop",
        "--ops",
        "publish",
    ])
    .trim()
    .to_owned();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        publish_as(&server, &key, "shop/orders/1").await.status(),
        200
    );
    let r = publish_as(&server, &key, "bank/accounts/1").await;
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
    // Not an administrator.
    let r = client()
        .put(server.url("/v1/state"))
        .bearer_auth(&key)
        .json(&json!({"state": "offline"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // It reads only its prefixes too.
    let r = client()
        .get(server.url("/v1/stream?subtree=bank"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(err_code(r).await, (403, "forbidden_scope".into()));
    let listed = cli(&["keys", "list", "--data-dir", &dir]);
    assert!(
        listed.contains("shop-feed") && listed.contains("ops=publish") && listed.contains("live"),
        "{listed}"
    );
    assert!(!listed.contains(&key), "a listing never shows the key");
    // An open stream of the key closes when it is revoked.
    let mut stream = client_no_timeout()
        .get(server.url("/v1/stream?subtree=shop"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    cli(&["keys", "revoke", "shop-feed", "--data-dir", &dir]);
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("\"revoked\"") {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("the stream did not close as revoked: {other:?} after {seen:?}"),
        }
    }
    assert!(seen.contains("event: closed"), "{seen}");
    let r = publish_as(&server, &key, "shop/orders/2").await;
    assert_eq!(r.status(), 401);
    assert!(cli(&["keys", "list", "--data-dir", &dir]).contains("revoked at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_and_its_open_streams_close() {
    let (server, _tmp) = secured();
    let dir = server.data_dir.to_str().unwrap().to_owned();
    let token = alice();
    let mut stream = client_no_timeout()
        .get(server.url("/v1/stream?subtree=alice@example.test&kinds=new_mail"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (mut ws, _) = tokio_tungstenite::connect_async({
        let mut req = format!("ws://127.0.0.1:{}/v1/ws", server.port)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    })
    .await
    .unwrap();
    cli(&["token", "revoke", "--sub", "alice", "--data-dir", &dir]);
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("\"revoked\"") {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("the SSE stream did not close as revoked: {other:?} after {seen:?}"),
        }
    }
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1008);
                assert!(f.reason.contains("revoked"), "{}", f.reason);
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the WebSocket did not close as revoked: {other:?}"),
        }
    }
    let r = client()
        .get(server.url("/v1/connections"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(err_code(r).await, (401, "token_revoked".into()));
    // A token minted after the revocation works.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = alice();
    let r = client()
        .get(server.url("/v1/connections"))
        .bearer_auth(&fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = ws.send(Message::Close(None)).await;
}
