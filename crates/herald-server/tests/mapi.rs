//! MAPI over HTTP with a real client over real sockets: a client built on `herald-rop`
//! connects to a running `herald serve`, logs on, opens a folder, registers for
//! notifications, waits with NotificationWait, and reads the RopNotify bytes that follow a
//! change made through the JSON API.

mod common;

use std::time::Duration;

use common::mapi::*;
use common::*;
use herald_core::Key;
use herald_rop::{
    Fid, NotificationData, NotificationScope, NotificationType, OpenFolder, Release, RopBuffer,
    RopRequest, RopResponse, decode_responses, ec,
};
use herald_server::mapi::map::id_of;

fn mapi_server(extra: &str) -> (Server, tempfile::TempDir) {
    start_with_config(&format!(
        "{EXCHANGE_USERS}[mapi]\nnotification_wait = \"2s\"\npending_period = \"300ms\"\n{extra}\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_logs_on_registers_waits_and_reads_ropnotify() {
    let (server, _tmp) = mapi_server("");
    let mut c = Client::new(&server, ALICE);
    let connected = c.connect().await;
    assert_eq!(connected.error_code, 0);
    assert_eq!(connected.display_name, ALICE);
    let folders = c.logon().await;
    let inbox_key = format!("{ALICE}/inbox");
    let inbox = folders[4];
    assert_eq!(inbox, id_of(&Key::from(inbox_key.as_str())));

    // Open the inbox, register three scopes: the folder, the whole store, one message.
    let message_key = format!("{inbox_key}/m-1");
    let message = id_of(&Key::from(message_key.as_str()));
    let answers = c
        .execute(&[
            RopRequest::OpenFolder(OpenFolder {
                logon_id: 0,
                input_handle_index: 0,
                output_handle_index: 1,
                folder_id: inbox,
                open_mode_flags: 0,
            }),
            register(
                1,
                2,
                CREATED | NotificationType::ObjectModified as u16,
                NotificationScope::Folder(inbox),
            ),
            register(0, 3, CREATED, NotificationScope::WholeStore),
            register(
                0,
                4,
                NotificationType::ObjectModified as u16,
                NotificationScope::Message(inbox, message),
            ),
        ])
        .await;
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert!(matches!(
        answers[0],
        RopResponse::OpenFolder {
            output_handle_index: 1,
            ..
        }
    ));
    for (i, a) in answers[1..].iter().enumerate() {
        assert_eq!(
            *a,
            RopResponse::RegisterNotification {
                output_handle_index: i as u8 + 2
            }
        );
    }
    let (folder_sub, store_sub, message_sub) = (c.handles[2], c.handles[3], c.handles[4]);

    // A wait with nothing pending stays open until a producer changes the inbox.
    let url_server = server.base();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        publish_to(&url_server, serde_json::json!([
            created_in(&format!("{ALICE}/inbox"), "m-1"),
            created_in(&format!("{ALICE}/drafts"), "d-1"),
            {"key": format!("{ALICE}/inbox/m-1"), "kind": "object_modified", "object_type": "message", "parent": format!("{ALICE}/inbox")},
            {"key": format!("{ALICE}/inbox/m-2"), "kind": "object_modified", "object_type": "message", "parent": format!("{ALICE}/inbox")},
        ])).await;
    });
    let (w, pendings) = c.wait().await;
    producer.await.unwrap();
    assert!(w.event_pending && w.error_code == 0, "{w:?}");
    assert!(pendings >= 1, "PENDING keep-alives while waiting");

    // An empty Execute fetches them: in log order, one RopNotify per matching subscription.
    let got = c.execute(&[]).await;
    let got = notifies(&got);
    let summary: Vec<(u32, NotificationType, Option<Fid>, Option<Fid>)> = got
        .iter()
        .map(|n| (n.handle, n.data.kind, n.data.folder_id, n.data.message_id))
        .collect();
    let drafts = id_of(&Key::from(format!("{ALICE}/drafts")));
    let m2 = id_of(&Key::from(format!("{inbox_key}/m-2")));
    assert_eq!(
        summary,
        vec![
            (
                folder_sub,
                NotificationType::ObjectCreated,
                Some(inbox),
                Some(message)
            ),
            (
                store_sub,
                NotificationType::ObjectCreated,
                Some(inbox),
                Some(message)
            ),
            (
                store_sub,
                NotificationType::ObjectCreated,
                Some(drafts),
                Some(id_of(&Key::from(format!("{ALICE}/drafts/d-1"))))
            ),
            (
                folder_sub,
                NotificationType::ObjectModified,
                Some(inbox),
                Some(message)
            ),
            (
                message_sub,
                NotificationType::ObjectModified,
                Some(inbox),
                Some(message)
            ),
            (
                folder_sub,
                NotificationType::ObjectModified,
                Some(inbox),
                Some(m2)
            ),
        ]
    );
    // The exact bytes of the first: RopNotify, handle, logon 0, flags 0x8004, FID, MID, no tags.
    let mut want = vec![0x2A];
    want.extend_from_slice(&folder_sub.to_le_bytes());
    want.extend_from_slice(&[0x00, 0x04, 0x80]);
    want.extend_from_slice(&inbox.to_bytes());
    want.extend_from_slice(&message.to_bytes());
    want.extend_from_slice(&[0x00, 0x00]);
    assert_eq!(got[0].to_bytes().unwrap(), want);

    // Nothing is left: a wait now times out with nothing pending.
    let (w, _) = c.wait().await;
    assert!(!w.event_pending && w.error_code == 0, "{w:?}");

    // Many at once and a small MaxRopOut: as many as fit, then RopPending, the rest next time,
    // in order.
    let names: Vec<String> = (0..40).map(|i| format!("bulk-{i:02}")).collect();
    publish_to(
        &server.base(),
        serde_json::Value::Array(
            names
                .iter()
                .map(|n| created_in(&format!("{ALICE}/junk"), n))
                .collect(),
        ),
    )
    .await;
    let mut seen = Vec::new();
    let mut pendings = 0;
    for _ in 0..40 {
        let answers = c.execute_with(&[], 0x200).await;
        pendings += answers
            .iter()
            .filter(|a| matches!(a, RopResponse::Pending { .. }))
            .count();
        let n = notifies(&answers);
        seen.extend(n.iter().map(|n| n.data.message_id.unwrap()));
        if seen.len() == 40 && n.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want: Vec<Fid> = names
        .iter()
        .map(|n| id_of(&Key::from(format!("{ALICE}/junk/{n}"))))
        .collect();
    assert_eq!(seen, want, "all 40, in order, once each");
    assert!(
        pendings >= 2,
        "RopPending told the client more was waiting ({pendings})"
    );

    // Release ends delivery; the others go on.
    let answers = c
        .execute(&[RopRequest::Release(Release {
            logon_id: 0,
            input_handle_index: 3,
        })])
        .await;
    assert!(answers.is_empty(), "RopRelease has no answer: {answers:?}");
    publish_to(
        &server.base(),
        serde_json::json!([created_in(&inbox_key, "m-3")]),
    )
    .await;
    let (w, _) = c.wait().await;
    assert!(w.event_pending);
    let answers = c.execute(&[]).await;
    let handles: Vec<u32> = notifies(&answers).iter().map(|n| n.handle).collect();
    assert_eq!(handles, vec![folder_sub]);

    // Disconnect ends the session: the old cookie no longer works.
    let old = c.cookie.clone();
    let a = c.post("Disconnect", vec![]).await;
    assert_eq!(a.response_code, 0);
    assert_eq!(c.cookie, None, "the cookie is expired");
    c.cookie = old;
    let a = c.post("Execute", execute_body(vec![], 0x8000)).await;
    assert_eq!(a.response_code, 10, "Context Not Found after Disconnect");
}

/// Table events: a registration whose types include TableModified hears `table_modified`
/// events on its folder (or the whole store) as RopNotify with its handle, the table event
/// type and the row (ids, prior row, row data); one without the bit hears none; and an SSE
/// client of the folder reads the same events as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_registration_hears_table_events_as_ropnotify_and_sse_reads_the_same() {
    use base64::Engine;
    let (server, _tmp) = mapi_server("");
    let mut c = Client::new(&server, ALICE);
    c.connect().await;
    let inbox = c.logon().await[4];
    let inbox_key = format!("{ALICE}/inbox");
    let table = NotificationType::TableModified as u16;
    let answers = c
        .execute(&[
            RopRequest::OpenFolder(OpenFolder {
                logon_id: 0,
                input_handle_index: 0,
                output_handle_index: 1,
                folder_id: inbox,
                open_mode_flags: 0,
            }),
            register(1, 2, table, NotificationScope::Folder(inbox)),
            register(0, 3, table | CREATED, NotificationScope::WholeStore),
            register(1, 4, CREATED, NotificationScope::Folder(inbox)),
        ])
        .await;
    assert_eq!(answers.len(), 4, "{answers:?}");
    let (folder_sub, store_sub) = (c.handles[2], c.handles[3]);
    let mut sse = SseClient::connect(
        &server,
        &format!("key={inbox_key}&kinds=table_modified&access_token={PRODUCER_KEY}"),
        None,
    )
    .await;

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let instance_key = 0x0FF6_0102u32;
    let m1 = format!("{inbox_key}/m-1");
    publish_to(
        &server.base(),
        serde_json::json!([
            {"key": inbox_key, "kind": "table_modified", "table": {"event": "row_added",
                "index": {"tag": instance_key, "value": b64(&m1)},
                "row": [{"tag": 0x0E08_0003u32, "value": 1234}]}},
            {"key": inbox_key, "kind": "table_modified", "table": {"event": "restrict_done"}},
            {"key": format!("{ALICE}/drafts"), "kind": "table_modified", "table": {"event": "reload"}},
        ]),
    )
    .await;
    let (w, _) = c.wait().await;
    assert!(w.event_pending, "{w:?}");
    let got = c.execute(&[]).await;
    let got = notifies(&got);
    let summary: Vec<(u32, u16)> = got
        .iter()
        .map(|n| {
            assert_eq!(n.data.kind, NotificationType::TableModified);
            (n.handle, n.data.table.as_ref().unwrap().code())
        })
        .collect();
    assert_eq!(
        summary,
        [
            (folder_sub, 0x03),
            (store_sub, 0x03),
            (folder_sub, 0x07),
            (store_sub, 0x07),
            (store_sub, 0x01),
        ],
        "the registration without TableModified hears none"
    );
    // The row added, byte for byte: contents table, the row's ids, first, its data.
    let mut want = vec![0x2A];
    want.extend_from_slice(&folder_sub.to_le_bytes());
    want.extend_from_slice(&[0x00, 0x00, 0x81, 0x03, 0x00]);
    want.extend_from_slice(&inbox.to_bytes());
    want.extend_from_slice(&id_of(&Key::from(m1.as_str())).to_bytes());
    want.extend_from_slice(&[0; 24]);
    want.extend_from_slice(&[5, 0, 0x00, 0xD2, 0x04, 0, 0]);
    assert_eq!(got[0].to_bytes().unwrap(), want);

    // The same events over SSE, as JSON.
    let first: serde_json::Value = serde_json::from_str(&sse.next().await.unwrap().data).unwrap();
    assert_eq!(first["kind"], "table_modified");
    assert_eq!(first["table"]["event"], "row_added");
    assert_eq!(first["table"]["index"]["value"], b64(&m1));
    assert_eq!(first["table"]["row"][0]["value"], 1234);
    let second: serde_json::Value = serde_json::from_str(&sse.next().await.unwrap().data).unwrap();
    assert_eq!(second["table"]["event"], "restrict_done");
}

/// MAPI over HTTP session hygiene: the `MapiSequence` cookie orders Executes (a missing or
/// stale one is Invalid Sequence, 15; each Execute sets the next; NotificationWait and PING
/// neither check nor set it); PING answers with the meta-tags and the refreshed expiry and
/// keeps an idle session alive; a compressed and obfuscated ROP buffer is read as the plain
/// one; and a logon id used again releases what the old logon opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_cookies_ping_compressed_input_and_a_reused_logon_id() {
    let (server, _tmp) = mapi_server("session_idle = \"2s\"");
    let mut c = Client::new(&server, ALICE);
    c.connect().await;
    let first = c.sequence.clone().expect("Connect sets MapiSequence");
    let inbox = c.logon().await[4];
    let second = c.sequence.clone().unwrap();
    assert_ne!(first, second, "an Execute sets the next value");
    // A stale value (the one before), and none at all: Invalid Sequence, nothing run.
    for stale in [Some(first), None] {
        c.sequence = stale;
        let a = c.post("Execute", execute_body(vec![], 0x8000)).await;
        assert_eq!(a.response_code, 15, "{}", String::from_utf8_lossy(&a.raw));
        assert!(a.set_cookies.is_empty());
    }
    c.sequence = Some(second.clone());
    // NotificationWait and PING neither check nor set it.
    let w = c
        .post(
            "NotificationWait",
            herald_rop::mapihttp::notification_wait_request(),
        )
        .await;
    assert_eq!(w.response_code, 0);
    assert!(w.set_cookies.is_empty());
    for _ in 0..6 {
        let ping = c.post("PING", vec![]).await;
        assert_eq!(ping.response_code, 0);
        assert!(ping.set_cookies.is_empty());
        assert_eq!(ping.expiration.as_deref(), Some("2000"));
        let stream = ping.stream.unwrap();
        assert!(stream.body.is_empty(), "PING has no body");
        assert!(stream.header("X-ElapsedTime").is_some());
        assert!(stream.header("X-StartTime").is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Three seconds of PINGs outlived the two-second idle timer.
    assert!(c.execute(&[]).await.is_empty());

    // Compressed (and obfuscated) input: the same ROPs as plain ones.
    let mut rops = Vec::new();
    for r in [
        RopRequest::OpenFolder(OpenFolder {
            logon_id: 0,
            input_handle_index: 0,
            output_handle_index: 1,
            folder_id: inbox,
            open_mode_flags: 0,
        }),
        register(1, 2, CREATED, NotificationScope::Folder(inbox)),
        register(1, 3, CREATED, NotificationScope::Folder(inbox)),
        register(1, 4, CREATED, NotificationScope::Folder(inbox)),
    ] {
        r.encode(&mut rops).unwrap();
    }
    let mut handles = c.handles.clone();
    handles.resize(8, u32::MAX);
    let plain = RopBuffer { rops, handles }.encode().unwrap();
    let payload = &plain[8..];
    let packed = herald_rop::lz77::compress(payload);
    assert!(packed.len() < payload.len());
    let mut buf = vec![0, 0];
    buf.extend(0x0007u16.to_le_bytes()); // Compressed | XorMagic | Last
    buf.extend((packed.len() as u16).to_le_bytes());
    buf.extend((payload.len() as u16).to_le_bytes());
    buf.extend(packed.iter().map(|b| b ^ 0xA5));
    let r = c.execute_raw(execute_body(buf, 0x8000)).await.unwrap();
    assert_eq!(r.error_code, 0);
    let out = RopBuffer::decode(&r.rop_buffer).unwrap();
    let answers = decode_responses(&out.rops).unwrap();
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert!(
        answers[1..]
            .iter()
            .all(|a| matches!(a, RopResponse::RegisterNotification { .. }))
    );
    c.handles = out.handles;
    let old_registration = c.handles[2];

    // Logon 0 again: the old logon's folder and registrations are gone.
    c.logon().await;
    let answers = c
        .execute(&[register(1, 5, CREATED, NotificationScope::Folder(inbox))])
        .await;
    assert_eq!(
        answers,
        [RopResponse::Failure {
            rop_id: 0x29,
            handle_index: 5,
            return_value: ec::INVALID_OBJECT
        }],
        "the folder handle went with its logon"
    );
    publish_to(
        &server.base(),
        serde_json::json!([created_in(&format!("{ALICE}/inbox"), "after-relogon")]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = c.execute(&[]).await;
    assert!(
        notifies(&got).iter().all(|n| n.handle != old_registration),
        "a released registration is told nothing: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocol_errors() {
    let (server, _tmp) = mapi_server("session_idle = \"2s\"");
    let mut c = Client::new(&server, ALICE);
    // No session yet: Execute without a cookie, and with an unknown one.
    let exec = execute_body(vec![], 0x8000);
    assert_eq!(c.post("Execute", exec.clone()).await.response_code, 13);
    c.cookie = Some("nope".into());
    assert_eq!(c.post("Execute", exec.clone()).await.response_code, 10);
    c.cookie = None;
    assert_eq!(c.post("Bogus", vec![]).await.response_code, 5);
    // A malformed Connect body.
    assert_eq!(c.post("Connect", vec![1, 2, 3]).await.response_code, 12);
    c.connect().await;
    c.logon().await;
    // Garbage instead of an Execute body.
    assert_eq!(c.post("Execute", vec![0xFF; 5]).await.response_code, 12);
    // A truncated ROP buffer: ecRpcFormat and no ROP buffer.
    let mut rops = Vec::new();
    register(0, 1, CREATED, NotificationScope::WholeStore)
        .encode(&mut rops)
        .unwrap();
    let mut buf = RopBuffer {
        rops,
        handles: vec![c.handles[0], u32::MAX],
    }
    .encode()
    .unwrap();
    buf.truncate(buf.len() - 9);
    let r = c.execute_raw(execute_body(buf, 0x8000)).await.unwrap();
    assert_eq!((r.error_code, r.rop_buffer.len()), (ec::RPC_FORMAT, 0));
    // Oversized and undersized limits.
    assert_eq!(
        c.execute_raw(execute_body(vec![], 4)).await,
        Err(ec::BUFFER_TOO_SMALL)
    );
    assert_eq!(
        c.execute_raw(execute_body(vec![], 0x50000)).await,
        Err(ec::BUFFER_TOO_LARGE)
    );
    // An unknown ROP: its failure with ecNotSupported, after the ROPs before it ran.
    let mut rops = Vec::new();
    register(0, 1, CREATED, NotificationScope::WholeStore)
        .encode(&mut rops)
        .unwrap();
    rops.extend_from_slice(&[0x99, 0x00, 0x00, 0x01, 0x02]);
    let mut handles = c.handles.clone();
    handles.resize(4, u32::MAX);
    let r = c
        .execute_raw(execute_body(
            RopBuffer { rops, handles }.encode().unwrap(),
            0x8000,
        ))
        .await
        .unwrap();
    let answers = decode_responses(&RopBuffer::decode(&r.rop_buffer).unwrap().rops).unwrap();
    assert_eq!(
        answers,
        vec![
            RopResponse::RegisterNotification {
                output_handle_index: 1
            },
            RopResponse::Failure {
                rop_id: 0x99,
                handle_index: 0,
                return_value: ec::NOT_SUPPORTED
            }
        ]
    );
    // Bad handles: an empty slot, a folder nobody has seen.
    let answers = c
        .execute(&[
            register(6, 7, CREATED, NotificationScope::WholeStore),
            RopRequest::OpenFolder(OpenFolder {
                logon_id: 0,
                input_handle_index: 0,
                output_handle_index: 5,
                folder_id: herald_rop::GlobalId::new(9, 9),
                open_mode_flags: 0,
            }),
        ])
        .await;
    assert_eq!(
        answers,
        vec![
            RopResponse::Failure {
                rop_id: 0x29,
                handle_index: 7,
                return_value: ec::NULL_OBJECT
            },
            RopResponse::Failure {
                rop_id: 0x02,
                handle_index: 5,
                return_value: ec::NOT_FOUND
            }
        ]
    );
    // One wait per session: a second is rejected while the first is open.
    let mut second = Client {
        url: c.url.clone(),
        user: ALICE,
        cookie: c.cookie.clone(),
        sequence: c.sequence.clone(),
        handles: vec![],
        counter: 100,
    };
    let first = tokio::spawn(async move { c.wait().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (w, _) = second.wait().await;
    assert_eq!(w.error_code, ec::REJECTED);
    let (w, _) = first.await.unwrap();
    assert_eq!((w.error_code, w.event_pending), (0, false));
    // Bob may not connect to Alice's mailbox.
    let mut bob = Client::new(&server, "bob@example.test");
    bob.url = server.url(&format!("/mapi/emsmdb/?MailboxId={ALICE}"));
    assert_ne!(bob.connect().await.error_code, 0);
    // An idle session expires.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(second.post("Execute", exec).await.response_code, 10);
}

#[test]
fn the_notification_data_the_server_sends_is_what_the_codec_reads() {
    // Guard for the byte layout used above: created message = flags 0x8004, FID, MID, tags.
    let mut d = NotificationData::empty(NotificationType::ObjectCreated, true);
    d.folder_id = Some(herald_rop::GlobalId::new(1, 2));
    d.message_id = Some(herald_rop::GlobalId::new(1, 3));
    d.tags = Some(herald_rop::Tags::List(vec![]));
    assert_eq!(d.flags(), 0x8004);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_push_sends_the_context_until_fetched() {
    let (server, _tmp) = mapi_server("udp_repeat = \"400ms\"");
    let mut c = Client::new(&server, ALICE);
    c.connect().await;
    c.logon().await;
    c.execute(&[register(0, 1, CREATED, NotificationScope::WholeStore)])
        .await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let register = |context: Vec<u8>, address: Vec<u8>| {
        herald_rop::mapihttp::RegisterPush {
            context,
            advise_bits: herald_rop::mapihttp::ADVISE_BITS_ALL,
            address,
        }
        .encode()
    };
    // (StatusCode, ErrorCode); a refusal has no notification handle.
    let status = |a: Answer| {
        let (error, handle) =
            herald_rop::mapihttp::decode_register_push_body(&a.stream.unwrap().body).unwrap();
        assert_eq!(
            handle == 0,
            error != 0,
            "a handle exactly when it succeeded"
        );
        (0, error)
    };
    let here = herald_rop::mapihttp::RegisterPush::sockaddr(socket.local_addr().unwrap());
    // Too big a context, a family that is not IP.
    assert_eq!(
        status(
            c.post(
                "RegisterPushNotification",
                register(vec![0; 17], here.clone())
            )
            .await
        ),
        (0, ec::TOO_BIG)
    );
    let mut odd = here.clone();
    odd[0] = 1;
    assert_eq!(
        status(
            c.post("RegisterPushNotification", register(vec![1], odd))
                .await
        ),
        (0, ec::INVALID_PARAM)
    );
    // Advise bits other than 0xFFFFFFFF are refused.
    let some_bits = herald_rop::mapihttp::RegisterPush {
        context: vec![1],
        advise_bits: 0x2,
        address: here.clone(),
    }
    .encode();
    assert_eq!(
        status(c.post("RegisterPushNotification", some_bits).await),
        (0, ec::INVALID_PARAM)
    );
    let context = b"herald-ctx-16byt".to_vec();
    assert_eq!(
        status(
            c.post("RegisterPushNotification", register(context.clone(), here))
                .await
        ),
        (0, 0)
    );

    publish_to(
        &server.base(),
        serde_json::json!([created_in(&format!("{ALICE}/inbox"), "u-1")]),
    )
    .await;
    let mut buf = [0u8; 64];
    let mut times = Vec::new();
    for _ in 0..3 {
        let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        assert_eq!(&buf[..n], &context[..], "exactly the registered context");
        times.push(std::time::Instant::now());
    }
    let gap = times[2] - times[1];
    assert!(
        gap >= Duration::from_millis(300),
        "repeated every udp_repeat ({gap:?})"
    );
    // Fetching stops the repeats.
    let got = c.execute(&[]).await;
    assert_eq!(notifies(&got).len(), 1);
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
    {}
    let quiet = tokio::time::timeout(Duration::from_millis(1200), socket.recv_from(&mut buf)).await;
    assert!(quiet.is_err(), "no datagram once everything was fetched");
    // A new event starts them again.
    publish_to(
        &server.base(),
        serde_json::json!([created_in(&format!("{ALICE}/inbox"), "u-2")]),
    )
    .await;
    let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("a datagram")
        .unwrap();
    assert_eq!(&buf[..n], &context[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_a_session_is_told_nothing_and_online_it_gets_everything_queued() {
    let (server, _tmp) = mapi_server("");
    let mut c = Client::new(&server, ALICE);
    assert_eq!(c.connect().await.error_code, 0);
    c.logon().await;
    let answers = c
        .execute(&[register(0, 1, CREATED, NotificationScope::WholeStore)])
        .await;
    assert_eq!(answers.len(), 1);
    let state = |s: &'static str| {
        client()
            .put(server.url("/v1/state"))
            .bearer_auth(PRODUCER_KEY)
            .json(&serde_json::json!({"state": s, "block": true}))
            .send()
    };
    // One notification is queued while online; then the server goes offline and two more
    // events are logged.
    publish_to(
        &server.base(),
        serde_json::json!([created_in(&format!("{ALICE}/inbox"), "m-1")]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state("offline").await.unwrap().status(), 200);
    publish_to(
        &server.base(),
        serde_json::json!([
            created_in(&format!("{ALICE}/inbox"), "m-2"),
            created_in(&format!("{ALICE}/inbox"), "m-3")
        ]),
    )
    .await;
    // The wait runs to its timer (2 s) without saying "pending", and Execute hands out nothing.
    let (w, _) = c.wait().await;
    assert!(!w.event_pending, "{w:?}");
    assert!(notifies(&c.execute(&[]).await).is_empty());
    assert_eq!(state("online").await.unwrap().status(), 200);
    let (w, _) = c.wait().await;
    assert!(w.event_pending, "{w:?}");
    let mut got = 0;
    for _ in 0..10 {
        got += notifies(&c.execute(&[]).await).len();
        if got == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, 3, "the queued one and the two logged while offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_at_most_its_registrations_and_a_user_at_most_its_sessions() {
    let (server, _tmp) = mapi_server("max_registrations = 5\nmax_sessions_per_user = 2");
    let mut c = Client::new(&server, ALICE);
    assert_eq!(c.connect().await.error_code, 0);
    c.logon().await;
    let six: Vec<RopRequest> = (1..=6)
        .map(|i| register(0, i, CREATED, NotificationScope::WholeStore))
        .collect();
    let answers = c.execute(&six).await;
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| matches!(a, RopResponse::Failure { .. }))
        .collect();
    assert_eq!(answers.len(), 6);
    assert_eq!(refused.len(), 1, "{answers:?}");
    assert!(
        matches!(
            refused[0],
            RopResponse::Failure {
                return_value: herald_rop::ec::NOT_ENOUGH_MEMORY,
                ..
            }
        ),
        "{answers:?}"
    );
    // A logon again under the same id releases what the old one registered.
    c.logon().await;
    let five: Vec<RopRequest> = (1..=5)
        .map(|i| register(0, i, CREATED, NotificationScope::WholeStore))
        .collect();
    let answers = c.execute(&five).await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, RopResponse::RegisterNotification { .. })),
        "{answers:?}"
    );
    // A second session of the same user is allowed, a third is not.
    let mut second = Client::new(&server, ALICE);
    assert_eq!(second.connect().await.error_code, 0);
    let mut third = Client::new(&server, ALICE);
    assert_eq!(
        third.connect().await.error_code,
        herald_rop::ec::SERVER_MEMORY
    );
    // Another user is counted apart.
    let mut bob = Client::new(&server, "bob@example.test");
    assert_eq!(bob.connect().await.error_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_at_most_4096_open_objects() {
    let (server, _tmp) = mapi_server("");
    let mut c = Client::new(&server, ALICE);
    c.connect().await;
    let folders = c.logon().await;
    let (mut opened, mut refused) = (0usize, 0usize);
    for _ in 0..21 {
        let opens: Vec<RopRequest> = (1..=200u8)
            .map(|i| {
                RopRequest::OpenFolder(OpenFolder {
                    logon_id: 0,
                    input_handle_index: 0,
                    output_handle_index: i,
                    folder_id: folders[3],
                    open_mode_flags: 0,
                })
            })
            .collect();
        for a in c.execute(&opens).await {
            match a {
                RopResponse::OpenFolder { .. } => opened += 1,
                RopResponse::Failure {
                    return_value: herald_rop::ec::NOT_ENOUGH_MEMORY,
                    ..
                } => refused += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    // The logon is one object; 4,095 folders fit beside it.
    assert_eq!((opened, refused), (4095, 4200 - 4095));
}
