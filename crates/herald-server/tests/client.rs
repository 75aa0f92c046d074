//! The Rust client (`herald-client`) against a real `herald serve`: ordered pipelined
//! publishing and resumable subscriptions through a server kill, failures in a pipeline,
//! durable subscriptions with acknowledgements across a client restart, and typed ends.

mod common;

use std::time::Duration;

use common::{Server, WAIT};
use herald_client::{Backoff, Client, Error, EventJson, Subscribe};
use herald_core::Event as ModelEvent;

fn quick(server: &Server) -> Client {
    Client::builder()
        .server(&server.base())
        .backoff(Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(300),
        })
        .build()
        .unwrap()
}

/// Event number `seq`, on one of eight mailboxes: an extended event carrying the number.
fn numbered(seq: u64) -> EventJson {
    EventJson {
        key: format!("mail/box{}", seq % 8),
        kind: "extended".into(),
        extended_event: Some(seq as u32),
        ..Default::default()
    }
}

fn seq_of(e: &herald_client::Event) -> u64 {
    match &e.notification.event {
        ModelEvent::Extended(x) => u64::from(x.event),
        other => panic!("not one of ours: {other:?}"),
    }
}

async fn next(s: &mut herald_client::Subscription) -> herald_client::Event {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("no event in time")
        .expect("the subscription ended")
        .expect("an error instead of an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_subscriber_ride_through_a_server_kill_seeing_every_event_once_in_order() {
    const BATCHES: u64 = 400;
    const PER_BATCH: u64 = 5;
    const TOTAL: u64 = BATCHES * PER_BATCH;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_in(&dir, &[], &[]);
    let port = server.port;
    let client = quick(&server);
    let subscriber = client.subscriber();
    let mut all = subscriber
        .subscribe(Subscribe::subtree("mail").after(0))
        .await
        .unwrap();
    let mut box3 = subscriber
        .subscribe(Subscribe::key("mail/box3").after(0))
        .await
        .unwrap();

    // One ordered producer, paced so that the kill lands in the middle of the stream.
    let publisher = client.publisher();
    let producing = tokio::spawn(async move {
        let mut answers = Vec::new();
        for b in 0..BATCHES {
            let events = (0..PER_BATCH)
                .map(|i| numbered(b * PER_BATCH + i))
                .collect();
            answers.push(publisher.send(events).await.unwrap());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut watermarks = Vec::new();
        for a in answers {
            watermarks.extend(a.await.expect("a batch failed").watermarks);
        }
        watermarks
    });

    let mut seen = Vec::new();
    let mut last = 0;
    while (seen.len() as u64) < TOTAL {
        let e = next(&mut all).await;
        assert!(
            e.watermark > last,
            "watermark {} after {last}: a duplicate or out of order",
            e.watermark
        );
        last = e.watermark;
        seen.push(seq_of(&e));
        if seen.len() == 500 {
            // SIGKILL: no goodbye, no flush. Then the server comes back where it was.
            let mut child = server.child.take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            let d = dir.clone();
            server = tokio::task::spawn_blocking(move || Server::start_on(port, &d, &[], &[]))
                .await
                .unwrap();
        }
    }
    // Every event once, in the order it was published.
    let expected: Vec<u64> = (0..TOTAL).collect();
    assert_eq!(
        seen, expected,
        "the subtree subscription lost, repeated or reordered events"
    );
    let watermarks = producing.await.unwrap();
    assert_eq!(watermarks.len() as u64, TOTAL);
    assert!(
        watermarks.windows(2).all(|w| w[0] < w[1]),
        "the log holds the batches out of order or twice"
    );
    // The key subscription saw its own events, once each, in order.
    let mut mine = Vec::new();
    while (mine.len() as u64) < TOTAL / 8 {
        mine.push(seq_of(&next(&mut box3).await));
    }
    let expected: Vec<u64> = (0..TOTAL).filter(|s| s % 8 == 3).collect();
    assert_eq!(mine, expected);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all.next())
            .await
            .is_err(),
        "an event after the last one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_aborts_those_sent_behind_it_and_the_next_one_starts_again() {
    let server = Server::start();
    let client = quick(&server);
    let publisher = client.publisher();
    let first = publisher.send(vec![numbered(1)]).await.unwrap();
    let bad = publisher
        .send(vec![EventJson {
            key: "mail/box1".into(),
            kind: "no_such_kind".into(),
            ..Default::default()
        }])
        .await
        .unwrap();
    let behind = publisher.send(vec![numbered(3)]).await.unwrap();
    assert_eq!(first.await.unwrap().watermarks, vec![1]);
    match bad.await {
        Err(Error::Refused { code, .. }) => assert_eq!(code, "invalid_field"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        matches!(behind.await, Err(Error::Aborted { .. })),
        "a batch behind a failed one was not aborted"
    );
    // The next batch starts a new sequence and is appended right after the first.
    assert_eq!(
        publisher
            .publish(vec![numbered(4)])
            .await
            .unwrap()
            .watermarks,
        vec![2]
    );
    let subscriber = client.subscriber();
    let mut s = subscriber
        .subscribe(Subscribe::subtree("mail").after(0))
        .await
        .unwrap();
    assert_eq!(seq_of(&next(&mut s).await), 1);
    assert_eq!(seq_of(&next(&mut s).await), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_resumes_after_its_acknowledgement_in_a_new_client() {
    let server = Server::start();
    let created: serde_json::Value = common::client()
        .post(server.url("/v1/subscriptions"))
        .json(&serde_json::json!({"subtree": "mail", "transport": "poll", "after": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let name = created["id"].as_str().unwrap().to_owned();
    let client = quick(&server);
    for seq in 1..=10 {
        client.publish(vec![numbered(seq)]).await.unwrap();
    }
    {
        let subscriber = client.subscriber();
        let mut s = subscriber
            .subscribe(Subscribe::durable(&name))
            .await
            .unwrap();
        for seq in 1..=10 {
            let e = next(&mut s).await;
            assert_eq!(seq_of(&e), seq);
            if seq == 6 {
                s.ack(e.watermark).unwrap();
            }
        }
        // The acknowledgement is stored before the client goes away.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let view: serde_json::Value =
                common::get_json(&server.url(&format!("/v1/subscriptions/{name}"))).await;
            if view["acked"] == 6 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ack not stored: {view}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A new client (a restarted worker) gets what was not acknowledged, and only that.
    let again = quick(&server).subscriber();
    let mut s = again.subscribe(Subscribe::durable(&name)).await.unwrap();
    assert_eq!(s.started_after(), 6);
    assert_eq!(seq_of(&next(&mut s).await), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_is_created_on_the_next_server_when_the_first_is_down() {
    let server = Server::start();
    let down = format!("http://127.0.0.1:{}", herald_testkit::free_port().unwrap());
    let client = Client::builder()
        .server(&down)
        .server(&server.base())
        .backoff(Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(100),
        })
        .build()
        .unwrap();
    let id = client
        .create_subscription(&Subscribe::subtree("mail").after(0))
        .await
        .expect("created on the server that is up");
    let view: serde_json::Value =
        common::get_json(&server.url(&format!("/v1/subscriptions/{id}"))).await;
    assert_eq!(view["filter"]["subtree"], "mail", "{view}");
    assert_eq!(view["transport"], "poll", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_the_log_cannot_serve_end_with_typed_errors() {
    let server = Server::start();
    let client = quick(&server);
    client.publish(vec![numbered(1)]).await.unwrap();
    let subscriber = client.subscriber();
    match subscriber
        .subscribe(Subscribe::key("mail/box1").after(1_000))
        .await
    {
        Err(Error::Reset { .. }) => {}
        other => panic!("a position ahead of the log should be a reset, got {other:?}"),
    }
    match subscriber.subscribe(Subscribe::durable("no-such")).await {
        Err(Error::Refused { code, .. }) => assert_eq!(code, "subscription_not_found"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // An unreachable server is reported once the client gives up, not waited for forever.
    let gone = Client::builder()
        .server(&format!(
            "http://127.0.0.1:{}",
            herald_testkit::free_port().unwrap()
        ))
        .backoff(Backoff {
            first: Duration::from_millis(10),
            max: Duration::from_millis(50),
        })
        .give_up_after(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    match gone.subscriber().subscribe(Subscribe::key("a")).await {
        Err(Error::Unreachable { .. }) => {}
        other => panic!("expected unreachable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_appended_whose_answers_were_lost_are_sent_again_and_appended_once() {
    let server = Server::start();
    let proxy =
        herald_testkit::proxy::Proxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap())
            .unwrap();
    let via_proxy = Client::builder()
        .server(&format!("http://{}", proxy.addr()))
        .backoff(Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(200),
        })
        .build()
        .unwrap();
    let watcher = quick(&server).subscriber();
    let mut log = watcher
        .subscribe(Subscribe::subtree("mail").after(0))
        .await
        .unwrap();
    let publisher = via_proxy.publisher();
    // Connected, and one batch answered.
    assert_eq!(
        publisher
            .publish(vec![numbered(0)])
            .await
            .unwrap()
            .watermarks,
        vec![1]
    );
    assert_eq!(seq_of(&next(&mut log).await), 0);

    // The server appends the next ten, but its answers never reach the publisher.
    proxy.drop_replies();
    let mut pending = Vec::new();
    for seq in 1..=10 {
        pending.push(publisher.send(vec![numbered(seq)]).await.unwrap());
    }
    for seq in 1..=10 {
        assert_eq!(seq_of(&next(&mut log).await), seq);
    }
    // The connection breaks; the publisher reconnects and sends the ten again.
    proxy.cut();
    proxy.heal();
    for (i, p) in pending.into_iter().enumerate() {
        let answer = tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
        assert_eq!(answer.watermarks, vec![i as u64 + 2]);
        assert!(answer.replayed, "batch {} appended twice", i + 1);
    }
    assert_eq!(
        publisher
            .publish(vec![numbered(11)])
            .await
            .unwrap()
            .watermarks,
        vec![12]
    );
    assert_eq!(
        seq_of(&next(&mut log).await),
        11,
        "the log holds a batch twice"
    );
}
