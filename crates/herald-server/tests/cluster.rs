//! Two `herald serve` processes on one JetStream log (a real 3-node `nats-server` cluster,
//! sync always): events published on one node reach subscribers of the other, and a client of
//! a node that dies resumes on the other from its last watermark with nothing missed.

mod common;

use std::time::Duration;

use common::{Server, SseClient, created, publish_ok};
use herald_testkit::{ClusterOptions, NatsCluster};

/// A Herald node on the cluster's server `nats`, on stream `stream`.
fn node(cluster: &NatsCluster, nats: usize, stream: &str) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let servers = cluster.url(nats);
    let server = Server::start_in(
        &tmp.path().join("data"),
        &[
            "--log-backend",
            "jetstream",
            "--jetstream-servers",
            &servers,
        ],
        &[
            ("HERALD_JETSTREAM__STREAM", stream),
            ("HERALD_JETSTREAM__REQUEST_TIMEOUT", "5s"),
        ],
    );
    (server, tmp)
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
    if let Some(mut c) = b.child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
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
