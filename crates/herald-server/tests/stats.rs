//! `GET /v1/stats`: the figures the console draws, sampled in memory from the same registry
//! `/metrics` renders, against a real server with a fast sampling interval.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn stats_show_rates_latency_and_connections_over_time() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[("HERALD_STATS__SAMPLE_EVERY", "200ms")],
    );
    let mut sse = SseClient::connect(&server, "subtree=alice", None).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    let stats: Value = loop {
        publish_ok(&server, json!([created(&format!("alice/inbox/m{i}"))])).await;
        i += 1;
        while let Some(e) = sse.next().await {
            if !e.id.is_empty() {
                break;
            }
        }
        let s: Value = get_json(&server.url("/v1/stats")).await;
        let samples = s["samples"].as_array().cloned().unwrap_or_default();
        let busy = samples.iter().any(|x| {
            x["events_in_per_second"].as_f64() > Some(0.0)
                && x["deliveries_per_second"].as_f64() > Some(0.0)
                && x["latency_p50_ms"].is_number()
        });
        if busy {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no busy sample: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["connections"]["sse"], 1, "{stats}");
    assert_eq!(stats["state"], "online");
    assert!(stats["log_last"].as_u64() >= Some(1));
    // The log's size in bytes grows with what it holds, and /metrics says the same.
    let bytes = stats["log_bytes"].as_u64().expect("log_bytes");
    assert!(bytes > 0, "{stats}");
    publish_ok(&server, json!([created("alice/inbox/big")])).await;
    let later: Value = get_json(&server.url("/v1/stats?seconds=0")).await;
    assert!(later["log_bytes"].as_u64() > Some(bytes), "{later}");
    let metrics = get_text(&server.url("/metrics")).await;
    let exported = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herald_log_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no herald_log_bytes in\n{metrics}"));
    assert!(exported >= later["log_bytes"].as_f64().unwrap());
    let last = stats["samples"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["connections"]["sse"], 1, "{last}");
    // `seconds` keeps only the recent samples.
    let recent: Value = get_json(&server.url("/v1/stats?seconds=0")).await;
    assert!(
        recent["samples"].as_array().unwrap().len() < stats["samples"].as_array().unwrap().len()
            || stats["samples"].as_array().unwrap().len() <= 1
    );
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_herald_exports() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/ops/grafana-herald.json");
    let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("herald_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 6, "{used:?}");
    // A server at work: an event published, delivered to a subscriber.
    let server = Server::start();
    let mut sse = SseClient::connect(&server, "subtree=alice", None).await;
    publish_ok(&server, json!([created("alice/inbox/m1")])).await;
    while let Some(e) = sse.next().await {
        if !e.id.is_empty() {
            break;
        }
    }
    let metrics = get_text(&server.url("/metrics")).await;
    for name in &used {
        assert!(
            metrics
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name.as_str())),
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
}
