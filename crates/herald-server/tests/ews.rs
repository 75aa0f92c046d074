//! Exchange Web Services: the Python `exchangelib` 5.6.0 drives a real server through pull,
//! streaming and push (tests/py/ews_conformance.py), and raw requests check what a client
//! library cannot send: malformed XML, entity tricks, deep nesting, missing credentials, and
//! the final `Closed` status at shutdown.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// One EWS "minute" on the servers under test.
const MINUTE: &str = "2";

/// A server whose EWS users are Alice and Bob, with short EWS timings.
fn ews_server(auth: bool) -> (Server, tempfile::TempDir) {
    ews_server_with(auth, "")
}

/// As [`ews_server`], with more `[ews]` settings.
fn ews_server_with(auth: bool, ews: &str) -> (Server, tempfile::TempDir) {
    let users = if auth { EXCHANGE_USERS } else { "" };
    start_with_config(&format!(
        "{users}[ews]\nminute = \"{MINUTE}s\"\nheartbeat = \"700ms\"\npush_retry_base = \"250ms\"\n{ews}\n"
    ))
}

/// Runs sections of the exchangelib suite against a fresh server.
fn conformance(sections: &[&str], auth: bool) {
    let (server, _tmp) = ews_server(auth);
    let key = if auth { PRODUCER_KEY } else { "-" };
    exchangelib(&server.base(), key, MINUTE, sections, &[]);
}

#[test]
fn exchangelib_folders_and_pull() {
    conformance(&["folders", "pull"], true);
}

#[test]
fn exchangelib_streaming() {
    conformance(&["streaming"], true);
}

#[test]
fn exchangelib_push() {
    conformance(&["push"], true);
}

#[test]
fn exchangelib_without_authentication() {
    conformance(&["noauth"], false);
}

/// zeep, a SOAP toolkit, builds its client from `GET /EWS/Services.wsdl` alone and drives
/// GetFolder, pull and streaming subscriptions (tests/py/ews_zeep.py). The description and
/// its schemas need no credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeep_drives_pull_and_streaming_from_the_service_description_alone() {
    let (server, _tmp) = ews_server(true);
    for (path, needle) in [
        (
            "/EWS/Services.wsdl",
            format!("location=\"{}/EWS/Exchange.asmx\"", server.base()),
        ),
        (
            "/EWS/messages.xsd",
            "schemaLocation=\"types.xsd\"".to_owned(),
        ),
        (
            "/EWS/types.xsd",
            "targetNamespace=\"http://schemas.microsoft.com/exchange/services/2006/types\""
                .to_owned(),
        ),
    ] {
        let r = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.text().await.unwrap().contains(&needle),
            "{path} lacks {needle}"
        );
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ews_zeep.py");
    let out = tokio::process::Command::new("timeout")
        .arg("120")
        .arg(python())
        .arg(script)
        .arg(server.base())
        .arg(PRODUCER_KEY)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "zeep failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in ["GetFolder", "pull", "streaming"] {
        assert!(
            stdout.contains(&format!("zeep {part}: ok")),
            "{part} did not run"
        );
    }
}

async fn post(server: &Server, body: String, auth: Option<(&str, &str)>) -> (u16, String) {
    let mut req = client()
        .post(server.url("/EWS/Exchange.asmx"))
        .header("content-type", "text/xml; charset=utf-8")
        .body(body);
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

const ALICE: Option<(&str, &str)> = Some(("alice@example.test", "alice-pw"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_nothing_expands() {
    let (server, _tmp) = ews_server(true);
    let subscribe = envelope(
        "<m:Subscribe><m:PullSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:Timeout>5</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>",
    );

    // No or wrong credentials: a Basic challenge, before any parsing.
    let r = client()
        .post(server.url("/EWS/Exchange.asmx"))
        .body(subscribe.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let (status, _) = post(
        &server,
        subscribe.clone(),
        Some(("alice@example.test", "nope")),
    )
    .await;
    assert_eq!(status, 401);

    // The same request with credentials works.
    let (status, body) = post(&server, subscribe.clone(), ALICE).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ResponseClass=\"Success\""), "{body}");

    // Not XML: a SOAP fault with a code that does not make clients retry under other versions.
    for junk in ["", "not xml", "<s:Envelope", "\u{0}\u{1}\u{2}"] {
        let (status, body) = post(&server, junk.to_owned(), ALICE).await;
        assert_eq!(status, 500, "{junk:?}: {body}");
        assert!(body.contains("<s:Fault>"), "{body}");
        assert!(body.contains("ErrorSchemaValidation"), "{body}");
    }

    // A DTD with an entity is refused; the entity is never expanded.
    let evil = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE s [<!ENTITY x \"EXPANDED\">]>{}",
        envelope("<m:GetFolder><m:FolderIds><t:DistinguishedFolderId Id=\"inbox\"/></m:FolderIds><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape></m:GetFolder>")
            .replace("inbox", "&x;")
    );
    let (status, body) = post(&server, evil, ALICE).await;
    assert_eq!(status, 500, "{body}");
    assert!(!body.contains("EXPANDED"), "{body}");

    // Deep nesting stops at the depth limit instead of recursing.
    let deep = envelope(&format!(
        "<m:Subscribe>{}{}</m:Subscribe>",
        "<a>".repeat(10_000),
        "</a>".repeat(10_000)
    ));
    let (status, body) = post(&server, deep, ALICE).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("ErrorSchemaValidation"), "{body}");

    // An operation Herald does not serve.
    let (status, body) = post(&server, envelope("<m:FindItem/>"), ALICE).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("ErrorInvalidOperation"), "{body}");

    // A known operation with a missing element: a response-message error naming it.
    let (status, body) = post(
        &server,
        envelope("<m:GetEvents><m:SubscriptionId>x</m:SubscriptionId></m:GetEvents>"),
        ALICE,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ResponseClass=\"Error\""), "{body}");
    assert!(body.contains("Watermark"), "{body}");

    // An oversized body is refused before it is read.
    let big = envelope(&"x".repeat(2 << 20));
    let (status, _) = post(&server, big, ALICE).await;
    assert_eq!(status, 413);

    // The server is still fine.
    let (status, body) = post(&server, subscribe, ALICE).await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn open_streams_end_with_closed_at_shutdown() {
    let (mut server, _tmp) = ews_server(true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, body) = rt.block_on(post(
        &server,
        envelope(
            "<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>",
        ),
        ALICE,
    ));
    let id = body
        .split("<m:SubscriptionId>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("a subscription id")
        .to_owned();
    let request = envelope(&format!(
        "<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{id}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>"
    ));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWxpY2VAZXhhbXBsZS50ZXN0OmFsaWNlLXB3\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.terminate(), "clean exit");
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(
        rest.contains("<m:ConnectionStatus>Closed</m:ConnectionStatus>"),
        "{rest}"
    );
}

fn pull_request(folders: &str) -> String {
    envelope(&format!(
        "<m:Subscribe><m:PullSubscriptionRequest><t:FolderIds>{folders}</t:FolderIds><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:Timeout>5</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>"
    ))
}

fn streaming_request(id: &str) -> String {
    envelope(&format!(
        "<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{id}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>"
    ))
}

fn subscription_id(body: &str) -> String {
    body.split("<m:SubscriptionId>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_else(|| panic!("no subscription id in {body}"))
        .to_owned()
}

/// Reads a chunked streaming response until `needle` appears (or the wait ends).
async fn read_until(r: &mut ::reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains(needle) {
        match tokio::time::timeout_at(deadline, r.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_mailboxes_and_a_newer_stream_taking_over() {
    let (server, _tmp) = ews_server_with(
        true,
        "max_subscriptions_per_mailbox = 3\nmax_streaming_connections = 1",
    );
    let inbox = "<t:DistinguishedFolderId Id=\"inbox\"/>";

    // Folders of two mailboxes in one subscription.
    let (_, body) = post(
        &server,
        pull_request(
            "<t:DistinguishedFolderId Id=\"inbox\"><t:Mailbox><t:EmailAddress>alice@example.test</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId><t:DistinguishedFolderId Id=\"inbox\"><t:Mailbox><t:EmailAddress>bob@example.test</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId>",
        ),
        ALICE,
    )
    .await;
    assert!(body.contains("ErrorAccessDenied"), "{body}");
    // Without authentication the mailboxes are anyone's, but still not in one subscription.
    let (open_server, _tmp_open) = ews_server(false);
    let (_, body) = post(
        &open_server,
        pull_request(
            "<t:DistinguishedFolderId Id=\"inbox\"><t:Mailbox><t:EmailAddress>alice@example.test</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId><t:DistinguishedFolderId Id=\"inbox\"><t:Mailbox><t:EmailAddress>bob@example.test</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId>",
        ),
        None,
    )
    .await;
    assert!(body.contains("ErrorInvalidSubscriptionRequest"), "{body}");
    drop(open_server);
    // A malformed folder id.
    let (_, body) = post(
        &server,
        pull_request("<t:FolderId Id=\"AAMk-not-ours\"/>"),
        ALICE,
    )
    .await;
    assert!(body.contains("ErrorInvalidIdMalformed"), "{body}");
    // An unknown distinguished folder.
    let (_, body) = post(
        &server,
        pull_request("<t:DistinguishedFolderId Id=\"attic\"/>"),
        ALICE,
    )
    .await;
    assert!(body.contains("ErrorFolderNotFound"), "{body}");

    // Three subscriptions per mailbox, then ErrorExceededSubscriptionCount.
    for _ in 0..2 {
        let (_, body) = post(&server, pull_request(inbox), ALICE).await;
        assert!(body.contains("NoError"), "{body}");
    }
    let (_, body) = post(
        &server,
        envelope("<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id=\"inbox\"/></t:FolderIds><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"),
        ALICE,
    )
    .await;
    let streaming = subscription_id(&body);
    let (_, body) = post(&server, pull_request(inbox), ALICE).await;
    assert!(body.contains("ErrorExceededSubscriptionCount"), "{body}");

    // One streaming connection per account: a second is refused while the first is open.
    let open = |body: String| {
        client()
            .post(server.url("/EWS/Exchange.asmx"))
            .basic_auth("alice@example.test", Some("alice-pw"))
            .body(body)
            .send()
    };
    let mut first = open(streaming_request(&streaming)).await.unwrap();
    let head = read_until(&mut first, "ConnectionStatus").await;
    assert!(
        head.contains("<m:ConnectionStatus>OK</m:ConnectionStatus>"),
        "{head}"
    );
    let second = open(streaming_request(&streaming))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(second.contains("ErrorExceededConnectionCount"), "{second}");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // With room for two, a newer connection for the same subscription takes it over: the
    // older one is told ErrorNewEventStreamConnectionOpened, the newer gets the events.
    let (server2, _tmp2) = ews_server_with(true, "max_streaming_connections = 2");
    let (_, body) = post(
        &server2,
        envelope("<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders=\"true\"><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"),
        ALICE,
    )
    .await;
    let id = subscription_id(&body);
    let open2 = |body: String| {
        client()
            .post(server2.url("/EWS/Exchange.asmx"))
            .basic_auth("alice@example.test", Some("alice-pw"))
            .body(body)
            .send()
    };
    let mut old = open2(streaming_request(&id)).await.unwrap();
    read_until(&mut old, "ConnectionStatus").await;
    let mut new = open2(streaming_request(&id)).await.unwrap();
    read_until(&mut new, "ConnectionStatus").await;
    let told = read_until(&mut old, "ErrorNewEventStreamConnectionOpened").await;
    assert!(
        told.contains("ErrorNewEventStreamConnectionOpened") && told.contains(&id),
        "{told}"
    );
    let r = client()
        .post(server2.url("/v1/events"))
        .bearer_auth(PRODUCER_KEY)
        .json(&serde_json::json!({"events": [{"key": "alice@example.test/inbox/t1", "kind": "object_created", "object_type": "message", "parent": "alice@example.test/inbox"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = read_until(&mut new, "CreatedEvent").await;
    assert!(got.contains("CreatedEvent"), "{got}");
}

/// Publishes with the producer key of [`EXCHANGE_USERS`].
async fn publish_as_producer(server: &Server, events: serde_json::Value) {
    let r = client()
        .post(server.url("/v1/events"))
        .bearer_auth(PRODUCER_KEY)
        .json(&serde_json::json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// A push subscription of Alice's inbox to `url`, with StatusFrequency `minutes`.
async fn subscribe_push(server: &Server, folders: &str, minutes: u32, url: &str) -> String {
    let body = envelope(&format!(
        "<m:Subscribe><m:PushSubscriptionRequest><t:FolderIds>{folders}</t:FolderIds><t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:StatusFrequency>{minutes}</t:StatusFrequency><t:URL>{url}</t:URL></m:PushSubscriptionRequest></m:Subscribe>"
    ));
    let (status, answer) = post(server, body, ALICE).await;
    assert_eq!(status, 200, "{answer}");
    subscription_id(&answer)
}

/// Bodies the receiver got, in order.
fn pushes(recv: &Receiver) -> Vec<String> {
    recv.requests().into_iter().map(|r| r.body).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_subscription_gets_its_status_notifications_while_other_folders_are_busy() {
    let (server, _tmp) = ews_server(true);
    let recv = Receiver::start().await;
    let inbox = "<t:DistinguishedFolderId Id=\"inbox\"/>";
    // StatusFrequency 1 EWS minute (2 s here).
    let id = subscribe_push(&server, inbox, 1, &recv.url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while pushes(&recv).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pushes(&recv).len(), 1, "the first push is a status");
    // The mailbox is busy, but not in the subscribed folder: events every 300 ms for 7 s.
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(7) {
        publish_as_producer(
            &server,
            serde_json::json!([created(&format!("alice@example.test/drafts/d-{i}"))]),
        )
        .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let bodies = pushes(&recv);
    assert!(
        bodies
            .iter()
            .all(|b| b.contains(&id) && !b.contains("CreatedEvent")),
        "only status notifications reach an inbox subscription: {bodies:?}"
    );
    // Silence past StatusFrequency means a dead subscription to an EWS client: it must hear
    // from Herald about every 2 s, whatever the rest of the mailbox does.
    let statuses = bodies.len() - 1;
    assert!(
        statuses >= 2,
        "{statuses} status notifications in 7 s with a 2 s StatusFrequency while {i} events went to another folder"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_subscription_whose_events_cannot_be_read_is_told_error_read_events_failed() {
    // A tiny retention and live queue: a push subscription held up by a slow endpoint falls
    // behind what the log still holds.
    let (server, _tmp) = start_with_config(&format!(
        "{EXCHANGE_USERS}[ews]\nminute = \"{MINUTE}s\"\npush_retry_base = \"250ms\"\n[retention]\nmax_events = 20\n[limits]\nqueue_capacity = 8\n"
    ));
    let recv = Receiver::start().await;
    let inbox = "<t:DistinguishedFolderId Id=\"inbox\"/>";
    let id = subscribe_push(&server, inbox, 30, &recv.url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while pushes(&recv).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pushes(&recv).len(), 1, "the first push is a status");
    // The endpoint takes 3 s to answer the next push; meanwhile 300 events pass and the log
    // keeps only the last 20.
    recv.set(Mode::Slow(Duration::from_secs(3)));
    publish_as_producer(
        &server,
        serde_json::json!([created("alice@example.test/inbox/first")]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for batch in 0..30 {
        let events: Vec<serde_json::Value> = (0..10)
            .map(|i| created(&format!("alice@example.test/inbox/m-{batch}-{i}")))
            .collect();
        publish_as_producer(&server, serde_json::Value::Array(events)).await;
    }
    recv.set(Mode::Ok);
    let deadline = tokio::time::Instant::now() + WAIT;
    let failed = loop {
        let bodies = pushes(&recv);
        if let Some(b) = bodies.iter().find(|b| b.contains("ErrorReadEventsFailed")) {
            break b.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ErrorReadEventsFailed push: {bodies:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failed.contains("ResponseClass=\"Error\""), "{failed}");
    assert!(
        failed.contains(&format!("<t:Value Name=\"SubscriptionId\">{id}</t:Value>")),
        "{failed}"
    );
    // The subscription is gone: nothing more is pushed.
    let count = pushes(&recv).len();
    publish_as_producer(
        &server,
        serde_json::json!([created("alice@example.test/inbox/after")]),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pushes(&recv).len(),
        count,
        "a push after the subscription ended"
    );
}
