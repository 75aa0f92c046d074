//! The digests' constructed vectors, both readings of RopRegisterNotification, the presence
//! rules, decoding errors, and round trips of every message.

use proptest::prelude::*;

use crate::mapihttp::{
    ConnectRequest, ExecuteRequest, ExecuteResponse, NotificationWaitResponse, ResponseStream,
};
use crate::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn inbox() -> Fid {
    GlobalId::new(1, 5)
}

#[test]
fn register_vectors() {
    let whole = RegisterNotification {
        logon_id: 0,
        input_handle_index: 0,
        output_handle_index: 1,
        types: NotificationType::NewMail as u16 | NotificationType::ObjectCreated as u16,
        scope: NotificationScope::WholeStore,
    };
    let folder = RegisterNotification {
        types: NotificationType::NewMail as u16,
        scope: NotificationScope::Folder(inbox()),
        ..whole.clone()
    };
    for (req, bytes) in [
        (&whole, hex("29 00 00 01 06 00 01")),
        (
            &folder,
            hex("29 00 00 01 02 00 00 01 00 00 00 00 00 00 05 00 00 00 00 00 00 00 00"),
        ),
    ] {
        let mut out = Vec::new();
        req.encode(&mut out);
        assert_eq!(out, bytes);
        // Without 0x0400 both readings of NotificationTypes agree.
        for width in [TypesWidth::U16, TypesWidth::U8Reserved] {
            assert_eq!(
                decode_requests(&bytes, width).unwrap(),
                vec![RopRequest::RegisterNotification(req.clone())]
            );
        }
    }
    let resp = RopResponse::RegisterNotification {
        output_handle_index: 1,
    };
    assert_eq!(resp.to_bytes().unwrap(), hex("29 01 00 00 00 00"));
    assert_eq!(
        RopResponse::Pending { session_index: 5 }
            .to_bytes()
            .unwrap(),
        hex("6E 05 00")
    );
}

#[test]
fn the_two_readings_of_notification_types_differ_as_the_digest_says() {
    // TableModified (0x0100): the u16 reading keeps it; the u8 reading takes 0x01 as Reserved.
    let bytes = hex("29 00 00 01 00 01 01");
    let [RopRequest::RegisterNotification(wide)] =
        &decode_requests(&bytes, TypesWidth::U16).unwrap()[..]
    else {
        panic!()
    };
    assert_eq!(wide.types, 0x0100);
    assert_eq!(wide.scope, NotificationScope::WholeStore);
    let [RopRequest::RegisterNotification(narrow)] =
        &decode_requests(&bytes, TypesWidth::U8Reserved).unwrap()[..]
    else {
        panic!()
    };
    assert_eq!(narrow.types, 0x0000);
    // Extended (0x0400): the u16 reading consumes one Reserved byte after the types.
    let ext = RegisterNotification {
        logon_id: 0,
        input_handle_index: 0,
        output_handle_index: 1,
        types: 0x0402,
        scope: NotificationScope::WholeStore,
    };
    let mut out = Vec::new();
    ext.encode(&mut out);
    assert_eq!(out, hex("29 00 00 01 02 04 00 01"));
    assert_eq!(
        decode_requests(&out, TypesWidth::U16).unwrap(),
        vec![RopRequest::RegisterNotification(ext)]
    );
    // Read as u8 + Reserved the same bytes are NewMail with WantWholeStore 0, then a cut FID.
    assert!(matches!(
        decode_requests(&out, TypesWidth::U8Reserved),
        Err(DecodeError::Truncated {
            field: "FolderId",
            ..
        })
    ));
}

fn new_mail() -> NotificationData {
    let mut d = NotificationData::empty(NotificationType::NewMail, true);
    d.folder_id = Some(inbox());
    d.message_id = Some(GlobalId::new(1, 0x123));
    d.new_mail = Some(NewMailInfo {
        message_flags: 0,
        unicode: false,
        message_class: "IPM.Note".into(),
    });
    d
}

#[test]
fn notify_vectors() {
    let n = RopNotify {
        handle: 0x10,
        logon_id: 0,
        data: new_mail(),
    };
    let bytes = hex(
        "2A 10 00 00 00 00 02 80 01 00 00 00 00 00 00 05 01 00 00 00 00 00 01 23 00 00 00 00 00 49 50 4D 2E 4E 6F 74 65 00",
    );
    assert_eq!(n.to_bytes().unwrap(), bytes);
    assert_eq!(
        decode_responses(&bytes).unwrap(),
        vec![RopResponse::Notify(Box::new(n))]
    );

    let mut table = NotificationData::empty(NotificationType::TableModified, true);
    table.table = Some(TableEvent::Changed);
    let n = RopNotify {
        handle: 0x11,
        logon_id: 0,
        data: table,
    };
    let bytes = hex("2A 11 00 00 00 00 00 81 01 00");
    assert_eq!(n.to_bytes().unwrap(), bytes);
    assert_eq!(
        decode_responses(&bytes).unwrap(),
        vec![RopResponse::Notify(Box::new(n))]
    );

    let mut modified = NotificationData::empty(NotificationType::ObjectModified, false);
    modified.folder_id = Some(inbox());
    modified.tags = Some(Tags::List(vec![]));
    modified.total_count = Some(10);
    modified.unread_count = Some(2);
    let n = RopNotify {
        handle: 0x12,
        logon_id: 0,
        data: modified,
    };
    let bytes =
        hex("2A 12 00 00 00 00 10 30 01 00 00 00 00 00 00 05 00 00 0A 00 00 00 02 00 00 00");
    assert_eq!(n.to_bytes().unwrap(), bytes);
    assert_eq!(
        decode_responses(&bytes).unwrap(),
        vec![RopResponse::Notify(Box::new(n))]
    );
}

#[test]
fn unicode_message_class() {
    let mut d = new_mail();
    d.new_mail = Some(NewMailInfo {
        message_flags: 1,
        unicode: true,
        message_class: "IPM.Note.Ü".into(),
    });
    let n = RopNotify {
        handle: 1,
        logon_id: 2,
        data: d,
    };
    let bytes = n.to_bytes().unwrap();
    assert!(bytes.ends_with(&[0xDC, 0x00, 0x00, 0x00]));
    assert_eq!(
        decode_responses(&bytes).unwrap(),
        vec![RopResponse::Notify(Box::new(n))]
    );
    // A character beyond Latin-1 cannot go in an 8-bit class.
    let mut d = new_mail();
    d.new_mail.as_mut().unwrap().message_class = "IPM.☃".into();
    assert!(d.encode(&mut Vec::new()).is_err());
}

/// The field layout of each common flags value (the digest's table of section 3): the bytes
/// after the flags.
#[test]
fn presence_matches_the_digest_table() {
    use NotificationType as T;
    // (type, M, S) -> FID, MID, ParentFID, OldFID, OldMID, OldParentFID, tags
    let cases = [
        (T::ObjectCreated, false, false, [1, 0, 1, 0, 0, 0, 1]),
        (T::ObjectCreated, true, false, [1, 1, 0, 0, 0, 0, 1]),
        (T::ObjectCreated, true, true, [1, 1, 1, 0, 0, 0, 1]),
        (T::ObjectDeleted, false, false, [1, 0, 1, 0, 0, 0, 0]),
        (T::ObjectDeleted, true, false, [1, 1, 0, 0, 0, 0, 0]),
        (T::ObjectDeleted, true, true, [1, 1, 1, 0, 0, 0, 0]),
        (T::ObjectModified, false, false, [1, 0, 0, 0, 0, 0, 1]),
        (T::ObjectModified, true, false, [1, 1, 0, 0, 0, 0, 1]),
        (T::ObjectMoved, false, false, [1, 0, 1, 1, 0, 1, 0]),
        (T::ObjectCopied, true, false, [1, 1, 0, 1, 1, 0, 0]),
        (T::SearchComplete, false, false, [1, 0, 0, 0, 0, 0, 0]),
        (T::NewMail, true, false, [1, 1, 0, 0, 0, 0, 0]),
        (T::TableModified, false, false, [0, 0, 0, 0, 0, 0, 0]),
    ];
    for (t, m, s, want) in cases {
        let p = Presence::of(t, m, s);
        let got = [
            p.folder_id,
            p.message_id,
            p.parent_folder_id,
            p.old_folder_id,
            p.old_message_id,
            p.old_parent_folder_id,
            p.tags,
        ]
        .map(u8::from);
        assert_eq!(got, want, "{t:?} M={m} S={s}");
    }
}

#[test]
fn encode_refuses_fields_the_flags_do_not_call_for() {
    let mut d = new_mail();
    d.parent_folder_id = Some(inbox());
    assert_eq!(
        d.encode(&mut Vec::new()).unwrap_err().field,
        "ParentFolderId"
    );
    let mut d = new_mail();
    d.message_id = None;
    assert_eq!(d.encode(&mut Vec::new()).unwrap_err().field, "MessageId");
    let mut d = new_mail();
    d.total_count = Some(1);
    assert_eq!(
        d.encode(&mut Vec::new()).unwrap_err().field,
        "TotalMessageCount"
    );
    let mut d = new_mail();
    d.message = false;
    d.search = true;
    assert_eq!(
        d.encode(&mut Vec::new()).unwrap_err().field,
        "NotificationFlags"
    );
    let mut t = NotificationData::empty(NotificationType::TableModified, true);
    t.table = Some(TableEvent::RowDeleted(RowId {
        folder_id: inbox(),
        message: None,
    }));
    assert_eq!(
        t.encode(&mut Vec::new()).unwrap_err().field,
        "TableRowMessageID"
    );
}

#[test]
fn decode_names_the_field_and_offset() {
    let bad = |b: &str| decode_responses(&hex(b)).unwrap_err();
    // S without M.
    assert!(matches!(
        bad("2A 01 00 00 00 00 04 40"),
        DecodeError::Invalid {
            field: "NotificationFlags",
            offset: 6,
            ..
        }
    ));
    // T on a type other than ObjectModified.
    assert!(matches!(
        bad("2A 01 00 00 00 00 04 10"),
        DecodeError::Invalid {
            field: "NotificationFlags",
            ..
        }
    ));
    // Extended is reserved in RopNotify.
    assert!(matches!(
        bad("2A 01 00 00 00 00 00 04"),
        DecodeError::Invalid {
            field: "NotificationFlags",
            ..
        }
    ));
    // Unknown table event.
    assert!(matches!(
        bad("2A 01 00 00 00 00 00 01 02 00"),
        DecodeError::Invalid {
            field: "TableEventType",
            offset: 8,
            ..
        }
    ));
    // A tag count far beyond the buffer fails without allocating for it.
    assert!(matches!(
        bad("2A 01 00 00 00 00 04 80 01 00 00 00 00 00 00 05 01 00 00 00 00 00 00 06 FE FF"),
        DecodeError::Truncated {
            field: "Tags",
            needed: 0x3FFF8,
            available: 0,
            ..
        }
    ));
    // A class with no terminator.
    assert!(matches!(
        bad(
            "2A 10 00 00 00 00 02 80 01 00 00 00 00 00 00 05 01 00 00 00 00 00 01 23 00 00 00 00 00 49 50"
        ),
        DecodeError::Truncated {
            field: "MessageClass",
            ..
        }
    ));
}

#[test]
fn every_prefix_of_a_valid_buffer_is_an_error_not_a_panic() {
    let mut data = NotificationData::empty(NotificationType::ObjectMoved, true);
    data.folder_id = Some(inbox());
    data.message_id = Some(GlobalId::new(1, 9));
    data.old_folder_id = Some(GlobalId::new(1, 6));
    data.old_message_id = Some(GlobalId::new(1, 8));
    let full = RopNotify {
        handle: 7,
        logon_id: 0,
        data,
    }
    .to_bytes()
    .unwrap();
    for n in 1..full.len() {
        assert!(decode_responses(&full[..n]).is_err(), "prefix of {n} bytes");
    }
    let mut reqs = Vec::new();
    RopRequest::Logon(Logon {
        logon_id: 0,
        output_handle_index: 0,
        logon_flags: 1,
        open_flags: 0x0100_0000,
        store_state: 0,
        essdn: "/o=Herald/cn=Recipients/cn=alice".into(),
    })
    .encode(&mut reqs)
    .unwrap();
    for n in 1..reqs.len() {
        assert!(
            decode_requests(&reqs[..n], TypesWidth::U16).is_err(),
            "prefix of {n} bytes"
        );
    }
}

#[test]
fn the_logon_example_of_the_mapihttp_digest() {
    let request = hex("03 00 00 00 3D 00 00 00 00 00 04 00 35 00 35 00
         31 00 FE 00 00 01 00 00 00 01 00 00 00 00 21 00
         2F 6F 3D 48 65 72 61 6C 64 2F 63 6E 3D 52 65 63
         69 70 69 65 6E 74 73 2F 63 6E 3D 61 6C 69 63 65
         00 FF FF FF FF 08 00 01 00 00 00 00 00");
    let exec = ExecuteRequest::decode(&request).unwrap();
    assert_eq!((exec.flags, exec.max_rop_out), (3, 0x10008));
    let buf = RopBuffer::decode(&exec.rop_buffer).unwrap();
    assert_eq!(buf.handles, vec![0xFFFF_FFFF]);
    let logon = Logon {
        logon_id: 0,
        output_handle_index: 0,
        logon_flags: 1,
        open_flags: 0x0100_0000,
        store_state: 0,
        essdn: "/o=Herald/cn=Recipients/cn=alice".into(),
    };
    assert_eq!(
        decode_requests(&buf.rops, TypesWidth::U16).unwrap(),
        vec![RopRequest::Logon(logon.clone())]
    );
    // And back, byte for byte.
    let mut rops = Vec::new();
    logon.encode(&mut rops).unwrap();
    let again = ExecuteRequest {
        flags: 3,
        rop_buffer: RopBuffer {
            rops,
            handles: vec![0xFFFF_FFFF],
        }
        .encode()
        .unwrap(),
        max_rop_out: 0x10008,
        aux: vec![],
    };
    assert_eq!(again.encode(), request);

    let response = hex("00 00 00 00 00 00 00 00 00 00 00 00 B4 00 00 00
         00 00 04 00 AC 00 AC 00 A8 00 FE 00 00 00 00 00
         01 01 00 00 00 00 00 00 01 01 00 00 00 00 00 00
         02 01 00 00 00 00 00 00 03 01 00 00 00 00 00 00
         04 01 00 00 00 00 00 00 05 01 00 00 00 00 00 00
         06 01 00 00 00 00 00 00 07 01 00 00 00 00 00 00
         08 01 00 00 00 00 00 00 09 01 00 00 00 00 00 00
         0A 01 00 00 00 00 00 00 0B 01 00 00 00 00 00 00
         0C 01 00 00 00 00 00 00 0D 07 4E 8A 2B 6F 3D 1C
         5F 4E 8A 9B 0C 1D 2E 3F 4A 5B 01 00 3D 2C 1B 0A
         5F 4E 61 40 82 93 A4 B5 C6 D7 E8 F9 00 1E 0A 01
         0F 01 E8 07 00 00 00 00 00 00 00 00 00 00 00 00
         01 00 00 00 00 00 00 00");
    let success = LogonSuccess {
        logon_flags: 1,
        folder_ids: std::array::from_fn(|i| GlobalId::new(1, i as u64 + 1)),
        response_flags: 7,
        mailbox_guid: hex("4E 8A 2B 6F 3D 1C 5F 4E 8A 9B 0C 1D 2E 3F 4A 5B")
            .try_into()
            .unwrap(),
        repl_id: 1,
        repl_guid: hex("3D 2C 1B 0A 5F 4E 61 40 82 93 A4 B5 C6 D7 E8 F9")
            .try_into()
            .unwrap(),
        logon_time: [0, 30, 10, 1, 15, 1],
        logon_year: 2024,
        gwart_time: 0,
        store_state: 0,
    };
    let answer = RopResponse::Logon {
        output_handle_index: 0,
        success: Box::new(success),
    };
    let body = ExecuteResponse {
        error_code: 0,
        rop_buffer: RopBuffer {
            rops: answer.to_bytes().unwrap(),
            handles: vec![1],
        }
        .encode()
        .unwrap(),
    }
    .encode();
    assert_eq!(body, response);
    let back = ExecuteResponse::decode(&response).unwrap().unwrap();
    let buf = RopBuffer::decode(&back.rop_buffer).unwrap();
    assert_eq!(decode_responses(&buf.rops).unwrap(), vec![answer]);

    // The follow-up RopOpenFolder on the inbox.
    let open = OpenFolder {
        logon_id: 0,
        input_handle_index: 0,
        output_handle_index: 1,
        folder_id: inbox(),
        open_mode_flags: 0,
    };
    let mut out = Vec::new();
    open.encode(&mut out);
    assert_eq!(out, hex("02 00 00 01 01 00 00 00 00 00 00 05 00"));
    let ok = RopResponse::OpenFolder {
        output_handle_index: 1,
        success: OpenFolderSuccess { has_rules: false },
    };
    assert_eq!(ok.to_bytes().unwrap(), hex("02 01 00 00 00 00 00 00"));
}

#[test]
fn notification_wait_vectors_and_the_response_stream() {
    assert_eq!(
        mapihttp::notification_wait_request(),
        hex("00 00 00 00 00 00 00 00")
    );
    assert_eq!(
        mapihttp::decode_notification_wait_request(&hex("00 00 00 00 00 00 00 00")).unwrap(),
        0
    );
    let r = NotificationWaitResponse {
        error_code: 0,
        event_pending: true,
    };
    assert_eq!(
        r.encode(),
        hex("00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00")
    );
    assert_eq!(
        NotificationWaitResponse::decode(&r.encode()).unwrap(),
        Ok(r)
    );
    let mut stream = mapihttp::PROCESSING.to_vec();
    stream.extend_from_slice(mapihttp::PENDING);
    stream.extend_from_slice(mapihttp::PENDING);
    stream.extend(mapihttp::done(
        0,
        12,
        "Mon, 15 Jan 2024 10:30:00 GMT",
        &r.encode(),
    ));
    let parsed = ResponseStream::parse(&stream).unwrap();
    assert_eq!(parsed.pendings, 2);
    assert_eq!(parsed.header("X-ResponseCode"), Some("0"));
    assert_eq!(parsed.body, r.encode());
    // XorMagic input is undone; compressed input is refused by name.
    let plain = RopBuffer {
        rops: vec![0x01, 0x00, 0x00],
        handles: vec![1],
    };
    let mut xored = plain.encode().unwrap();
    xored[2] |= HEADER_XOR_MAGIC as u8;
    for b in &mut xored[8..] {
        *b ^= 0xA5;
    }
    assert_eq!(RopBuffer::decode(&xored).unwrap(), plain);
    let mut compressed = plain.encode().unwrap();
    compressed[2] |= HEADER_COMPRESSED as u8;
    assert!(matches!(
        RopBuffer::decode(&compressed),
        Err(DecodeError::Invalid {
            field: "RPC_HEADER_EXT.Flags",
            ..
        })
    ));
    // An unknown ROP stops reading and is reported, with what came before it.
    let rops = hex("01 00 02 99 00 03 AA BB");
    assert_eq!(
        decode_requests(&rops, TypesWidth::U16).unwrap(),
        vec![
            RopRequest::Release(Release {
                logon_id: 0,
                input_handle_index: 2
            }),
            RopRequest::Unsupported {
                rop_id: 0x99,
                logon_id: 0,
                handle_index: 3
            }
        ]
    );
}

#[test]
fn a_request_list_with_a_response_only_rop_id_is_invalid_not_answered_as_unsupported() {
    // Found by fuzz/fuzz_targets/mapi_session.rs (corpus/mapi_session/regression-response_only_rop):
    // RopLogon then 2A 00 00. Answered as an unsupported ROP, the failure `2A 00 02 01 04 80`
    // reads back as a RopNotify, and the client cannot read the response buffer.
    for id in [0x2A, 0x6E, 0xF9, 0xFF] {
        let rops = [0x01, 0x00, 0x00, id, 0x00, 0x00];
        for width in [TypesWidth::U16, TypesWidth::U8Reserved] {
            assert_eq!(
                decode_requests(&rops, width),
                Err(DecodeError::Invalid {
                    field: "RopId",
                    offset: 3,
                    value: u64::from(id),
                    why: "a ROP that exists only in responses",
                }),
                "RopId {id:#04x}"
            );
        }
    }
    // Every other id Herald does not know is still answered, as before.
    assert_eq!(
        decode_requests(&[0x03, 0x00, 0x01], TypesWidth::U16).unwrap(),
        vec![RopRequest::Unsupported {
            rop_id: 0x03,
            logon_id: 0,
            handle_index: 1
        }]
    );
}

// ---- round trips --------------------------------------------------------------------------

fn gid() -> impl Strategy<Value = GlobalId> {
    (any::<u16>(), 0..=MAX_COUNTER).prop_map(|(r, c)| GlobalId::new(r, c))
}

fn row(message: bool) -> impl Strategy<Value = RowId> {
    (gid(), gid(), any::<u32>()).prop_map(move |(f, m, i)| RowId {
        folder_id: f,
        message: message.then_some((m, i)),
    })
}

fn row_change(message: bool) -> impl Strategy<Value = RowChange> {
    (
        row(message),
        row(message),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(row, after, data)| RowChange { row, after, data })
}

fn table_event(message: bool) -> impl Strategy<Value = TableEvent> {
    prop_oneof![
        Just(TableEvent::Changed),
        row_change(message).prop_map(TableEvent::RowAdded),
        row(message).prop_map(TableEvent::RowDeleted),
        row_change(message).prop_map(TableEvent::RowModified),
        Just(TableEvent::RestrictionChanged),
    ]
}

fn tags() -> impl Strategy<Value = Tags> {
    prop_oneof![
        proptest::collection::vec(any::<u32>(), 0..8).prop_map(Tags::List),
        Just(Tags::Unspecified)
    ]
}

/// Any NotificationData that obeys the presence rules: every type, with M and S in every
/// allowed combination, and every optional part.
fn notification_data() -> impl Strategy<Value = NotificationData> {
    (
        proptest::sample::select(NotificationType::ALL.to_vec()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(kind, message, search)| {
            let search = search && message;
            let p = Presence::of(kind, message, search);
            (
                Just((kind, message, search, p)),
                table_event(message),
                proptest::array::uniform6(gid()),
                tags(),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                (any::<u32>(), any::<bool>(), "[ -~&&[^\0]]{0,24}"),
            )
        })
        .prop_map(
            |(
                (kind, message, search, p),
                table,
                ids,
                tags,
                total,
                unread,
                (flags, unicode, class),
            )| {
                NotificationData {
                    kind,
                    message,
                    search,
                    table: p.table.then_some(table),
                    folder_id: p.folder_id.then_some(ids[0]),
                    message_id: p.message_id.then_some(ids[1]),
                    parent_folder_id: p.parent_folder_id.then_some(ids[2]),
                    old_folder_id: p.old_folder_id.then_some(ids[3]),
                    old_message_id: p.old_message_id.then_some(ids[4]),
                    old_parent_folder_id: p.old_parent_folder_id.then_some(ids[5]),
                    tags: p.tags.then_some(tags),
                    total_count: total.filter(|_| p.counts_allowed),
                    unread_count: unread.filter(|_| p.counts_allowed),
                    new_mail: p.new_mail.then_some(NewMailInfo {
                        message_flags: flags,
                        unicode,
                        message_class: class,
                    }),
                }
            },
        )
}

fn scope() -> impl Strategy<Value = NotificationScope> {
    prop_oneof![
        Just(NotificationScope::WholeStore),
        gid().prop_map(NotificationScope::Folder),
        (
            gid(),
            gid().prop_filter("non-zero", |m| *m != GlobalId::ZERO)
        )
            .prop_map(|(f, m)| NotificationScope::Message(f, m)),
    ]
}

proptest! {
    #[test]
    fn notify_round_trips(data in notification_data(), handle in any::<u32>(), logon in any::<u8>()) {
        let n = RopNotify { handle, logon_id: logon, data };
        let bytes = n.to_bytes().unwrap();
        prop_assert_eq!(decode_responses(&bytes).unwrap(), vec![RopResponse::Notify(Box::new(n))]);
    }

    #[test]
    fn register_round_trips(types in any::<u16>(), scope in scope(), l in any::<u8>(), i in any::<u8>(), o in any::<u8>()) {
        let req = RegisterNotification { logon_id: l, input_handle_index: i, output_handle_index: o, types, scope };
        let mut out = Vec::new();
        req.encode(&mut out);
        prop_assert_eq!(out.len(), if scope == NotificationScope::WholeStore { 7 } else { 23 } + usize::from(types & TYPE_EXTENDED != 0));
        prop_assert_eq!(decode_requests(&out, TypesWidth::U16).unwrap(), vec![RopRequest::RegisterNotification(req)]);
    }

    #[test]
    fn request_lists_and_buffers_round_trip(
        folders in proptest::collection::vec((gid(), any::<u8>(), any::<u8>()), 0..6),
        handles in proptest::collection::vec(any::<u32>(), 0..8),
        essdn in "[ -~]{0,40}",
    ) {
        let mut reqs = vec![RopRequest::Logon(Logon { logon_id: 0, output_handle_index: 0, logon_flags: 1, open_flags: 0x0100_0000, store_state: 0, essdn })];
        for (fid, i, o) in folders {
            reqs.push(RopRequest::OpenFolder(OpenFolder { logon_id: 0, input_handle_index: i, output_handle_index: o, folder_id: fid, open_mode_flags: 0 }));
            reqs.push(RopRequest::Release(Release { logon_id: 0, input_handle_index: o }));
        }
        let mut rops = Vec::new();
        for r in &reqs {
            r.encode(&mut rops).unwrap();
        }
        let buf = RopBuffer { rops, handles };
        let exec = ExecuteRequest { flags: 3, rop_buffer: buf.encode().unwrap(), max_rop_out: 0x8000, aux: vec![] };
        let back = ExecuteRequest::decode(&exec.encode()).unwrap();
        prop_assert_eq!(&back, &exec);
        let decoded = RopBuffer::decode(&back.rop_buffer).unwrap();
        prop_assert_eq!(&decoded, &buf);
        prop_assert_eq!(decode_requests(&decoded.rops, TypesWidth::U16).unwrap(), reqs);
    }

    #[test]
    fn responses_round_trip(
        datas in proptest::collection::vec(notification_data(), 0..4),
        failures in proptest::collection::vec((any::<u8>(), any::<u8>(), 1..u32::MAX), 0..4),
        pending in proptest::option::of(any::<u16>()),
    ) {
        let mut all: Vec<RopResponse> = failures.into_iter().map(|(rop_id, handle_index, return_value)| {
            // A failure's RopId must not be one that is read differently.
            let rop_id = if rop_id == ROP_NOTIFY || rop_id == ROP_PENDING { 0x99 } else { rop_id };
            RopResponse::Failure { rop_id, handle_index, return_value }
        }).collect();
        all.push(RopResponse::RegisterNotification { output_handle_index: 3 });
        all.extend(datas.into_iter().enumerate().map(|(i, data)| RopResponse::Notify(Box::new(RopNotify { handle: i as u32, logon_id: 0, data }))));
        all.extend(pending.map(|session_index| RopResponse::Pending { session_index }));
        let mut bytes = Vec::new();
        for r in &all {
            r.encode(&mut bytes).unwrap();
        }
        prop_assert_eq!(decode_responses(&bytes).unwrap(), all);
    }

    #[test]
    fn connect_round_trips(dn in "[ -~]{0,60}", cp in any::<u32>(), a in any::<u32>(), b in any::<u32>()) {
        let c = ConnectRequest { user_dn: dn, flags: 0, code_page: cp, lcid_sort: a, lcid_string: b, aux: vec![] };
        prop_assert_eq!(ConnectRequest::decode(&c.encode().unwrap()).unwrap(), c);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_responses(&bytes);
        let _ = decode_requests(&bytes, TypesWidth::U16);
        let _ = decode_requests(&bytes, TypesWidth::U8Reserved);
        let _ = RopBuffer::decode(&bytes);
        let _ = ExecuteRequest::decode(&bytes);
        let _ = ConnectRequest::decode(&bytes);
        let _ = ResponseStream::parse(&bytes);
    }
}

#[test]
fn push_registrations_check_context_and_address() {
    use crate::mapihttp::{
        ADVISE_BITS_ALL, PushRefused, RegisterPush, decode_register_push_body, register_push_body,
    };
    let v4: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let v6: std::net::SocketAddr = "[::1]:4001".parse().unwrap();
    for addr in [v4, v6] {
        let r = RegisterPush {
            context: vec![7; 16],
            advise_bits: ADVISE_BITS_ALL,
            address: RegisterPush::sockaddr(addr),
        };
        let back = RegisterPush::decode(&r.encode()).unwrap();
        assert_eq!(back.target(), Ok(addr));
    }
    let too_big = RegisterPush {
        context: vec![0; 17],
        advise_bits: ADVISE_BITS_ALL,
        address: RegisterPush::sockaddr(v4),
    };
    assert_eq!(too_big.target(), Err(PushRefused::TooBig));
    let mut wrong_size = RegisterPush::sockaddr(v4);
    wrong_size.pop();
    assert_eq!(
        RegisterPush {
            context: vec![],
            advise_bits: ADVISE_BITS_ALL,
            address: wrong_size
        }
        .target(),
        Err(PushRefused::InvalidParam)
    );
    let mut unix = RegisterPush::sockaddr(v4);
    unix[0] = 1;
    assert_eq!(
        RegisterPush {
            context: vec![],
            advise_bits: ADVISE_BITS_ALL,
            address: unix
        }
        .target(),
        Err(PushRefused::InvalidParam)
    );
    assert_eq!(PushRefused::TooBig.code(), ec::TOO_BIG);
    // Advise bits other than all of them are refused.
    let some_bits = RegisterPush {
        context: vec![],
        advise_bits: 0x0000_0002,
        address: RegisterPush::sockaddr(v4),
    };
    let back = RegisterPush::decode(&some_bits.encode()).unwrap();
    assert_eq!(back.advise_bits, 2);
    assert_eq!(back.target(), Err(PushRefused::InvalidParam));
    // The answer carries the notification handle.
    let body = register_push_body(0, 0x1234);
    assert_eq!(body, hex("00 00 00 00 00 00 00 00 34 12 00 00 00 00 00 00"));
    assert_eq!(decode_register_push_body(&body), Ok((0, 0x1234)));
}

#[test]
fn lz77_reads_literals_matches_and_shared_half_bytes() {
    use crate::lz77::decompress;
    // "abc", then a match 3 back for 9 bytes (meta 0x0016): flags 0b0001… = 0x10000000.
    let short = hex("00 00 00 10 61 62 63 16 00");
    assert_eq!(decompress(&short, 12).unwrap(), b"abcabcabcabc");
    // "a", then two long matches 1 back: 20 bytes (nibble 10) and 25 bytes (nibble 15 in the
    // same byte's high half, then a length byte 0).
    let long = hex("00 00 00 60 61 07 00 FA 07 00 00");
    assert_eq!(decompress(&long, 46).unwrap(), vec![b'a'; 46]);
    // A 16-bit length: 300 bytes (u16 = 297).
    let huge = hex("00 00 00 40 61 07 00 0F FF 29 01");
    assert_eq!(decompress(&huge, 301).unwrap(), vec![b'a'; 301]);
}

#[test]
fn lz77_refuses_what_points_outside_or_overflows_and_never_grows_past_its_size() {
    use crate::lz77::decompress;
    // A match before any data.
    assert!(matches!(
        decompress(&hex("00 00 00 80 00 00"), 3),
        Err(DecodeError::Invalid {
            field: "LZ77 match",
            ..
        })
    ));
    // A match past the announced size.
    assert!(matches!(
        decompress(&hex("00 00 00 10 61 62 63 16 00"), 8),
        Err(DecodeError::Invalid {
            field: "LZ77 match",
            ..
        })
    ));
    // Cut short.
    assert!(matches!(
        decompress(&hex("00 00 00 10 61 62"), 12),
        Err(DecodeError::Truncated { .. })
    ));
    // A long length under 22 is not a length.
    assert!(matches!(
        decompress(&hex("00 00 00 40 61 07 00 0F FF 05 00"), 100),
        Err(DecodeError::Invalid {
            field: "LZ77 length",
            ..
        })
    ));
}

#[test]
fn a_compressed_and_obfuscated_rop_buffer_reads_as_the_plain_one() {
    let plain = RopBuffer {
        rops: [hex("29 00 00 01 04 00 01"), [0x01, 0x00, 0x01].repeat(20)].concat(),
        handles: vec![7, 0xFFFF_FFFF],
    };
    let body = plain.encode().unwrap();
    let payload = &body[8..];
    let packed = crate::lz77::compress(payload);
    assert!(packed.len() < payload.len(), "the repeats compress");
    let mut buf = Vec::new();
    buf.put_u16(0);
    buf.put_u16(HEADER_LAST | HEADER_COMPRESSED | HEADER_XOR_MAGIC);
    buf.put_u16(packed.len() as u16);
    buf.put_u16(payload.len() as u16);
    buf.extend(packed.iter().map(|b| b ^ 0xA5));
    assert_eq!(RopBuffer::decode(&buf).unwrap(), plain);
    // The fuzz corpus's seed: twenty RopRelease, compressed by hand.
    let seed = hex("00 00 05 00 11 00 42 00 00 00 00 04 3E 00 01 00 00 17 00 0F 20 01 00 00 00");
    let read = RopBuffer::decode(&seed).unwrap();
    assert_eq!(read.rops, [0x01, 0x00, 0x00].repeat(20));
    assert_eq!(read.handles, [1]);
    // The same bytes announced as bigger than they expand to: refused, not misread.
    let at = 6;
    buf[at..at + 2].copy_from_slice(&((payload.len() + 1) as u16).to_le_bytes());
    assert!(RopBuffer::decode(&buf).is_err());
}

proptest! {
    #[test]
    fn lz77_round_trips(
        parts in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..40), 0usize..400), 0..20)
    ) {
        // Random runs and repeats, so matches of every length form occur.
        let mut data = Vec::new();
        for (bytes, repeat) in parts {
            data.extend_from_slice(&bytes);
            if let Some(&b) = bytes.first() {
                data.extend(std::iter::repeat_n(b, repeat));
            }
        }
        let packed = crate::lz77::compress(&data);
        prop_assert_eq!(crate::lz77::decompress(&packed, data.len()).unwrap(), data);
    }
}
