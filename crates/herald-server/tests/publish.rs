//! Ordered pipelined publishing over the WebSocket, with a real server and a real client:
//! many batches in flight, appended and answered in the order they were sent; a failure
//! aborts the batches after it until the producer restarts; the bound on batches in flight.

mod common;

use common::*;
use serde_json::{Value, json};

fn batch(id: &str, keys: &[String]) -> Value {
    json!({
        "op": "publish",
        "id": id,
        "events": keys.iter().map(|k| created(k)).collect::<Vec<_>>(),
    })
}

/// The keys of every event the log holds after watermark 0, in order.
async fn stored_keys(server: &Server) -> Vec<String> {
    let mut sse = SseClient::connect(server, "subtree=p&after=0", None).await;
    let head: Value = client()
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = head["log_last"].as_u64().unwrap();
    let mut keys = Vec::new();
    while let Some(e) = sse.next().await {
        let v: Value = serde_json::from_str(&e.data).unwrap();
        keys.push(v["key"].as_str().unwrap().to_owned());
        if v["watermark"].as_u64().unwrap() >= last {
            break;
        }
    }
    keys
}

/// The answers to `n` publishes, in the order they come.
async fn answers(ws: &mut WsClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = ws.frame().await;
        if f["type"] == "published" || f["type"] == "error" {
            out.push(f);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_pipelines_batches_and_they_are_appended_and_answered_in_order() {
    let server = Server::start();
    let mut ws = WsClient::connect(&server).await;
    // 400 batches of two events, sent without waiting for any answer.
    let mut want = Vec::new();
    for i in 0..400 {
        let keys = vec![format!("p/{i}/a"), format!("p/{i}/b")];
        want.extend(keys.clone());
        ws.send(batch(&format!("b{i}"), &keys)).await;
    }
    let got = answers(&mut ws, 400).await;
    for (i, a) in got.iter().enumerate() {
        assert_eq!(a["type"], "published", "{a}");
        assert_eq!(a["id"], format!("b{i}"));
        let w = i as u64 * 2 + 1;
        assert_eq!(a["watermarks"], json!([w, w + 1]), "{a}");
    }
    assert_eq!(stored_keys(&server).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_aborts_the_ones_after_it_until_the_producer_restarts() {
    let server = Server::start();
    let mut ws = WsClient::connect(&server).await;
    let k = |s: &str| vec![format!("p/{s}")];
    // A key taken by another batch, for a conflict found by the log's writer.
    ws.send(json!({"op": "publish", "id": "seed", "events": [created("p/seed")], "idempotency_key": "taken"}))
        .await;
    assert_eq!(answers(&mut ws, 1).await[0]["type"], "published");

    // Refused before the log (an invalid event), then by the log (the key reused): each
    // time the batches behind it, already sent, are aborted and not appended.
    let invalid =
        json!({"op": "publish", "id": "x1", "events": [{"key": "p/x1", "kind": "no_such_kind"}]});
    let conflict = json!({"op": "publish", "id": "x1", "events": [created("p/other")], "idempotency_key": "taken"});
    for (round, bad) in [invalid, conflict].into_iter().enumerate() {
        ws.send(batch("x0", &k(&format!("r{round}-0")))).await;
        ws.send(bad).await;
        ws.send(batch("x2", &k(&format!("r{round}-2")))).await;
        ws.send(batch("x3", &k(&format!("r{round}-3")))).await;
        let got = answers(&mut ws, 4).await;
        let summary: Vec<(&str, &str)> = got
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap(),
                    a["code"].as_str().unwrap_or("published"),
                )
            })
            .collect();
        let failure = if round == 0 {
            "invalid_field"
        } else {
            "idempotency_conflict"
        };
        assert_eq!(
            summary,
            [
                ("x0", "published"),
                ("x1", failure),
                ("x2", "aborted"),
                ("x3", "aborted")
            ],
            "{got:?}"
        );
        assert!(
            got[2]["message"].as_str().unwrap().contains("x1"),
            "{got:?}"
        );
        // Still aborted until a restart; then the producer resends from the failed one.
        ws.send(batch("x4", &k(&format!("r{round}-4")))).await;
        assert_eq!(answers(&mut ws, 1).await[0]["code"], "aborted");
        let mut again = batch("x2", &k(&format!("r{round}-2")));
        again["restart"] = json!(true);
        ws.send(again).await;
        ws.send(batch("x3", &k(&format!("r{round}-3")))).await;
        let got = answers(&mut ws, 2).await;
        assert!(got.iter().all(|a| a["type"] == "published"), "{got:?}");
    }
    let keys: Vec<String> = ["seed", "r0-0", "r0-2", "r0-3", "r1-0", "r1-2", "r1-3"]
        .iter()
        .map(|s| format!("p/{s}"))
        .collect();
    assert_eq!(stored_keys(&server).await, keys);
}
