//! `udp` subscriptions of the JSON API, with a real UDP socket: the registered context
//! arrives at once and every `mapi.udp_repeat` while events wait unacknowledged, stops once
//! they are acknowledged, starts again with new events, and survives a restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const REPEAT: [(&str, &str); 1] = [("HERALD_MAPI__UDP_REPEAT", "400ms")];

async fn create(server: &Server, body: Value) -> (u16, Value) {
    let r = client()
        .post(server.url("/v1/subscriptions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn datagram(socket: &tokio::net::UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("a datagram")
        .unwrap();
    buf[..n].to_vec()
}

async fn quiet(socket: &tokio::net::UdpSocket, for_: Duration) -> bool {
    let mut buf = [0u8; 64];
    // Whatever was already in flight is not the question.
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
    {}
    tokio::time::timeout(for_, socket.recv_from(&mut buf))
        .await
        .is_err()
}

/// Fetches everything after `after` and acknowledges it; returns the new position.
async fn fetch_and_ack(server: &Server, id: &str, after: u64) -> u64 {
    let page: Value = client()
        .get(server.url(&format!("/v1/subscriptions/{id}/events?after={after}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let next = page["next_after"].as_u64().unwrap();
    let r = client()
        .get(server.url(&format!("/v1/subscriptions/{id}/events?after={next}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_until_acknowledged_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut server = Server::start_in(&dir, &[], &REPEAT);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let context = b"0123456789abcdef";
    let b64 = "MDEyMzQ1Njc4OWFiY2RlZg==";

    // Bad registrations are refused by field.
    for (udp, field) in [
        (
            json!({"address": "127.0.0.1:9", "context": "AAECAwQFBgcICQoLDA0ODxA="}),
            "udp.context",
        ),
        (
            json!({"address": "not an address", "context": b64}),
            "udp.address",
        ),
        (
            json!({"address": "10.0.0.7:4000", "context": b64}),
            "udp.address",
        ),
    ] {
        let (status, body) = create(
            &server,
            json!({"transport": "udp", "subtree": "alice@example.test", "udp": udp}),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    let (status, body) = create(&server, json!({"transport": "udp", "subtree": "a"})).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("udp"))
    );

    let (status, sub) = create(
        &server,
        json!({"transport": "udp", "subtree": "alice@example.test", "udp": {
            "address": socket.local_addr().unwrap().to_string(), "context": b64}}),
    )
    .await;
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().unwrap().to_owned();
    assert!(
        quiet(&socket, Duration::from_millis(600)).await,
        "nothing before an event"
    );

    // An event: the context at once, then again every 400 ms while unacknowledged.
    publish_ok(&server, json!([created("alice@example.test/inbox/1")])).await;
    assert_eq!(datagram(&socket).await, context);
    let t0 = std::time::Instant::now();
    assert_eq!(datagram(&socket).await, context);
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "repeated, not flooded"
    );
    // Events elsewhere do not count.
    let after = fetch_and_ack(&server, &id, 0).await;
    publish_ok(&server, json!([created("bob@example.test/inbox/1")])).await;
    assert!(
        quiet(&socket, Duration::from_millis(1200)).await,
        "quiet once acknowledged"
    );

    // It is stored: after a restart, an unacknowledged event brings the datagrams back.
    let port = server.port;
    assert!(server.terminate());
    let server = Server::start_on(port, &dir, &[], &REPEAT);
    publish_ok(&server, json!([created("alice@example.test/inbox/2")])).await;
    assert_eq!(datagram(&socket).await, context);
    let view: Value = client()
        .get(server.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["transport"], "udp");
    assert_eq!(view["udp"]["context"], b64);
    assert!(view["pending"].as_bool().unwrap());
    fetch_and_ack(&server, &id, after).await;
    assert!(quiet(&socket, Duration::from_millis(1200)).await);
}
