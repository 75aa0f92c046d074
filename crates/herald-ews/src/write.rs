//! Writing responses, push messages and (for clients and tests) requests. Every document
//! starts `<s:Envelope xmlns:s=…` with exactly one space after the name: exchangelib finds
//! envelopes in a stream by that text.

use std::fmt::Write as _;

use quick_xml::escape::escape;

use crate::{
    EventKind, EwsEvent, FolderRef, Id, NS_MESSAGES, NS_SOAP, NS_TYPES, Notification, Request,
    RequestEnvelope, SubscriptionKind, SubscriptionStatus, Target,
};

/// The server version Herald reports (Exchange 2016 CU builds report `V2017_07_11`).
const SERVER_VERSION: &str = r#"<t:ServerVersionInfo MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" Version="V2017_07_11"/>"#;

/// A whole SOAP envelope around `body` (with the server-version header).
pub fn envelope(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><s:Header>{SERVER_VERSION}</s:Header><s:Body>{body}</s:Body></s:Envelope>"#
    )
}

/// A response document for `op` holding these response messages.
pub fn response(op: &str, messages: &[String]) -> String {
    let mut body = format!("<m:{op}Response><m:ResponseMessages>");
    for m in messages {
        body.push_str(m);
    }
    let _ = write!(body, "</m:ResponseMessages></m:{op}Response>");
    envelope(&body)
}

/// A successful `m:{op}ResponseMessage` carrying `payload`.
pub fn success_message(op: &str, payload: &str) -> String {
    format!(
        r#"<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{payload}</m:{op}ResponseMessage>"#
    )
}

/// A failed `m:{op}ResponseMessage`: the EWS way to report an error (not a SOAP fault,
/// which makes some clients retry under every schema version).
pub fn error_message(op: &str, code: &str, text: &str, payload: &str) -> String {
    format!(
        r#"<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{}</m:MessageText><m:ResponseCode>{}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>{payload}</m:{op}ResponseMessage>"#,
        escape(text),
        escape(code)
    )
}

/// A SOAP fault, for requests that cannot be read at all (so no operation is known). The
/// code should not be one that makes clients retry under other schema versions
/// (`ErrorInvalidServerVersion`, `ErrorInvalidRequest`, …); `ErrorSchemaValidation` is not.
pub fn soap_fault(code: &str, message: &str) -> String {
    let errors = "http://schemas.microsoft.com/exchange/services/2006/errors";
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}"><s:Body><s:Fault><faultcode xmlns:a="{errors}">a:{code}</faultcode><faultstring xml:lang="en-US">{msg}</faultstring><detail><e:ResponseCode xmlns:e="{errors}">{code}</e:ResponseCode><e:Message xmlns:e="{errors}">{msg}</e:Message></detail></s:Fault></s:Body></s:Envelope>"#,
        code = escape(code),
        msg = escape(message)
    )
}

/// A response of one error message.
pub fn error_response(op: &str, code: &str, text: &str) -> String {
    response(op, &[error_message(op, code, text, "")])
}

/// `SubscribeResponse`: the id, and the watermark for pull and push.
pub fn subscribe_ok(subscription_id: &str, watermark: Option<&str>) -> String {
    let mut payload = format!(
        "<m:SubscriptionId>{}</m:SubscriptionId>",
        escape(subscription_id)
    );
    if let Some(w) = watermark {
        let _ = write!(payload, "<m:Watermark>{}</m:Watermark>", escape(w));
    }
    response("Subscribe", &[success_message("Subscribe", &payload)])
}

/// `GetEventsResponse` with one notification.
pub fn get_events_ok(n: &Notification) -> String {
    response(
        "GetEvents",
        &[success_message("GetEvents", &notification(n))],
    )
}

/// `UnsubscribeResponse`.
pub fn unsubscribe_ok() -> String {
    response("Unsubscribe", &[success_message("Unsubscribe", "")])
}

/// What `GetFolder` says about one folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderInfo {
    /// Its id.
    pub id: Id,
    /// Its parent's id.
    pub parent: Option<Id>,
    /// Its display name.
    pub display_name: String,
    /// Its distinguished name, if it has one.
    pub distinguished: Option<String>,
    /// `IPF.Note`, …
    pub folder_class: String,
}

/// `GetFolderResponse`: one message per requested folder, in order; `Err((code, text))` for
/// folders that cannot be given.
pub fn get_folder(folders: &[Result<FolderInfo, (String, String)>]) -> String {
    let messages: Vec<String> = folders
        .iter()
        .map(|f| match f {
            Ok(f) => {
                let mut x = String::from("<m:Folders><t:Folder>");
                let _ = write!(x, "{}", id_element("FolderId", &f.id));
                if let Some(p) = &f.parent {
                    let _ = write!(x, "{}", id_element("ParentFolderId", p));
                }
                let _ = write!(
                    x,
                    "<t:FolderClass>{}</t:FolderClass><t:DisplayName>{}</t:DisplayName><t:TotalCount>0</t:TotalCount><t:ChildFolderCount>0</t:ChildFolderCount>",
                    escape(&f.folder_class),
                    escape(&f.display_name)
                );
                if let Some(d) = &f.distinguished {
                    let _ = write!(x, "<t:DistinguishedFolderId>{}</t:DistinguishedFolderId>", escape(d));
                }
                x.push_str("<t:UnreadCount>0</t:UnreadCount></t:Folder></m:Folders>");
                success_message("GetFolder", &x)
            }
            Err((code, text)) => error_message("GetFolder", code, text, ""),
        })
        .collect();
    response("GetFolder", &messages)
}

/// One streaming envelope carrying notifications (at most one per subscription).
pub fn streaming_notifications(ns: &[Notification]) -> String {
    let mut payload = String::from("<m:Notifications>");
    for n in ns {
        payload.push_str(&notification(n));
    }
    payload.push_str("</m:Notifications>");
    response(
        "GetStreamingEvents",
        &[success_message("GetStreamingEvents", &payload)],
    )
}

/// One streaming envelope with only a connection status: `OK` (heartbeat) or `Closed`.
pub fn streaming_status(closed: bool) -> String {
    let status = if closed { "Closed" } else { "OK" };
    response(
        "GetStreamingEvents",
        &[success_message(
            "GetStreamingEvents",
            &format!("<m:ConnectionStatus>{status}</m:ConnectionStatus>"),
        )],
    )
}

/// One streaming envelope reporting bad subscription ids, then `Closed`.
pub fn streaming_error(code: &str, text: &str, bad_ids: &[String]) -> String {
    let mut payload = String::from("<m:ErrorSubscriptionIds>");
    for id in bad_ids {
        let _ = write!(
            payload,
            "<m:SubscriptionId>{}</m:SubscriptionId>",
            escape(id)
        );
    }
    payload.push_str("</m:ErrorSubscriptionIds><m:ConnectionStatus>Closed</m:ConnectionStatus>");
    response(
        "GetStreamingEvents",
        &[error_message("GetStreamingEvents", code, text, &payload)],
    )
}

/// The push body Herald POSTs to a push subscription's URL.
pub fn send_notification(n: &Notification) -> String {
    let body = format!(
        r#"<m:SendNotification><m:ResponseMessages>{}</m:ResponseMessages></m:SendNotification>"#,
        success_message("SendNotification", &notification(n))
    );
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><s:Header><t:RequestServerVersion Version="Exchange2016"/></s:Header><s:Body>{body}</s:Body></s:Envelope>"#
    )
}

/// The push body telling the client its subscription failed (`ErrorReadEventsFailed`: its
/// events can no longer be read): the subscription is gone, and the client recreates it from
/// the last watermark it holds.
pub fn send_notification_error(code: &str, text: &str, subscription_id: &str) -> String {
    let payload = format!(
        r#"<m:MessageXml><t:Value Name="SubscriptionId">{}</t:Value></m:MessageXml>"#,
        escape(subscription_id)
    );
    let body = format!(
        r#"<m:SendNotification><m:ResponseMessages>{}</m:ResponseMessages></m:SendNotification>"#,
        error_message("SendNotification", code, text, &payload)
    );
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><s:Header><t:RequestServerVersion Version="Exchange2016"/></s:Header><s:Body>{body}</s:Body></s:Envelope>"#
    )
}

/// The client's answer to a push.
pub fn send_notification_result(status: SubscriptionStatus) -> String {
    let s = match status {
        SubscriptionStatus::Ok => "OK",
        SubscriptionStatus::Unsubscribe => "Unsubscribe",
    };
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}"><s:Body><m:SendNotificationResult><m:SubscriptionStatus>{s}</m:SubscriptionStatus></m:SendNotificationResult></s:Body></s:Envelope>"#
    )
}

/// An attribute value, escaped so that it reads back the same: a parser normalizes a literal
/// tab, newline or carriage return in an attribute to a space, so they go as references.
fn attr(v: &str) -> String {
    escape(v)
        .replace('\t', "&#x9;")
        .replace('\n', "&#xA;")
        .replace('\r', "&#xD;")
}

fn id_element(name: &str, id: &Id) -> String {
    format!(
        r#"<t:{name} Id="{}" ChangeKey="{}"/>"#,
        attr(&id.id),
        attr(&id.change_key)
    )
}

fn target_element(t: &Target, folder: &str, item: &str) -> String {
    match t {
        Target::Folder(id) => id_element(folder, id),
        Target::Item(id) => id_element(item, id),
    }
}

/// One `m:Notification` element.
pub fn notification(n: &Notification) -> String {
    let mut x = format!(
        "<m:Notification><t:SubscriptionId>{}</t:SubscriptionId>",
        escape(&n.subscription_id)
    );
    if let Some(w) = &n.previous_watermark {
        let _ = write!(
            x,
            "<t:PreviousWatermark>{}</t:PreviousWatermark>",
            escape(w)
        );
    }
    if let Some(m) = n.more_events {
        let _ = write!(x, "<t:MoreEvents>{m}</t:MoreEvents>");
    }
    for e in &n.events {
        x.push_str(&event(e));
    }
    x.push_str("</m:Notification>");
    x
}

fn event(e: &EwsEvent) -> String {
    let name = match e.kind {
        EventKind::Status => "StatusEvent",
        EventKind::Event(t) => t.element(),
    };
    let mut x = format!("<t:{name}>");
    if let Some(w) = &e.watermark {
        let _ = write!(x, "<t:Watermark>{}</t:Watermark>", escape(w));
    }
    if e.kind != EventKind::Status {
        if let Some(ts) = &e.timestamp {
            let _ = write!(x, "<t:TimeStamp>{}</t:TimeStamp>", escape(ts));
        }
        if let Some(t) = &e.target {
            x.push_str(&target_element(t, "FolderId", "ItemId"));
        }
        if let Some(p) = &e.parent_folder_id {
            x.push_str(&id_element("ParentFolderId", p));
        }
        if let Some(u) = e.unread_count {
            let _ = write!(x, "<t:UnreadCount>{u}</t:UnreadCount>");
        }
        if let Some(t) = &e.old_target {
            x.push_str(&target_element(t, "OldFolderId", "OldItemId"));
        }
        if let Some(p) = &e.old_parent_folder_id {
            x.push_str(&id_element("OldParentFolderId", p));
        }
    }
    let _ = write!(x, "</t:{name}>");
    x
}

fn folder_ref(f: &FolderRef) -> String {
    match f {
        FolderRef::Id { id, change_key } => match change_key {
            Some(c) => format!(r#"<t:FolderId Id="{}" ChangeKey="{}"/>"#, attr(id), attr(c)),
            None => format!(r#"<t:FolderId Id="{}"/>"#, attr(id)),
        },
        FolderRef::Distinguished { id, mailbox } => match mailbox {
            Some(m) => format!(
                r#"<t:DistinguishedFolderId Id="{}"><t:Mailbox><t:EmailAddress>{}</t:EmailAddress><t:RoutingType>SMTP</t:RoutingType><t:MailboxType>Mailbox</t:MailboxType></t:Mailbox></t:DistinguishedFolderId>"#,
                attr(id),
                escape(m)
            ),
            None => format!(r#"<t:DistinguishedFolderId Id="{}"/>"#, attr(id)),
        },
    }
}

/// A request document, as a client would send it (for tests and Rust clients).
pub fn write_request(r: &RequestEnvelope) -> String {
    let body = match &r.request {
        Request::Subscribe(s) => {
            let (name, tail) = match &s.kind {
                SubscriptionKind::Pull { timeout_minutes } => (
                    "PullSubscriptionRequest",
                    format!("<t:Timeout>{timeout_minutes}</t:Timeout>"),
                ),
                SubscriptionKind::Push {
                    status_frequency_minutes,
                    url,
                } => (
                    "PushSubscriptionRequest",
                    format!(
                        "<t:StatusFrequency>{status_frequency_minutes}</t:StatusFrequency><t:URL>{}</t:URL>",
                        escape(url)
                    ),
                ),
                SubscriptionKind::Streaming => ("StreamingSubscriptionRequest", String::new()),
            };
            let attr = if s.all_folders {
                r#" SubscribeToAllFolders="true""#
            } else {
                ""
            };
            let mut x = format!("<m:Subscribe><m:{name}{attr}>");
            if !s.all_folders {
                x.push_str("<t:FolderIds>");
                for f in &s.folders {
                    x.push_str(&folder_ref(f));
                }
                x.push_str("</t:FolderIds>");
            }
            x.push_str("<t:EventTypes>");
            for t in &s.event_types {
                let _ = write!(x, "<t:EventType>{}</t:EventType>", t.element());
            }
            x.push_str("</t:EventTypes>");
            if let Some(w) = &s.watermark {
                let _ = write!(x, "<m:Watermark>{}</m:Watermark>", escape(w));
            }
            let _ = write!(x, "{tail}</m:{name}></m:Subscribe>");
            x
        }
        Request::GetEvents {
            subscription_id,
            watermark,
        } => format!(
            "<m:GetEvents><m:SubscriptionId>{}</m:SubscriptionId><m:Watermark>{}</m:Watermark></m:GetEvents>",
            escape(subscription_id),
            escape(watermark)
        ),
        Request::GetStreamingEvents {
            subscription_ids,
            connection_timeout_minutes,
        } => {
            let mut x = String::from("<m:GetStreamingEvents><m:SubscriptionIds>");
            for id in subscription_ids {
                let _ = write!(x, "<t:SubscriptionId>{}</t:SubscriptionId>", escape(id));
            }
            let _ = write!(
                x,
                "</m:SubscriptionIds><m:ConnectionTimeout>{connection_timeout_minutes}</m:ConnectionTimeout></m:GetStreamingEvents>"
            );
            x
        }
        Request::Unsubscribe { subscription_id } => format!(
            "<m:Unsubscribe><m:SubscriptionId>{}</m:SubscriptionId></m:Unsubscribe>",
            escape(subscription_id)
        ),
        Request::GetFolder { folders } => {
            let mut x = String::from(
                "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds>",
            );
            for f in folders {
                x.push_str(&folder_ref(f));
            }
            x.push_str("</m:FolderIds></m:GetFolder>");
            x
        }
    };
    let header = match &r.server_version {
        Some(v) => format!(
            r#"<s:Header><t:RequestServerVersion Version="{}"/></s:Header>"#,
            escape(v)
        ),
        None => String::new(),
    };
    format!(
        r#"<s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}">{header}<s:Body>{body}</s:Body></s:Envelope>"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        EventType, Subscribe, parse_notification, parse_request, parse_send_notification_result,
    };
    use proptest::prelude::*;

    #[test]
    fn envelopes_have_one_space_after_the_name() {
        for doc in [
            unsubscribe_ok(),
            streaming_status(false),
            subscribe_ok("s", Some("w")),
        ] {
            assert!(doc.contains("<s:Envelope xmlns:s="), "{doc}");
            assert!(!doc.contains("<s:Envelope\n"));
        }
    }

    #[test]
    fn errors_are_response_messages_not_faults() {
        let e = error_response(
            "GetEvents",
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
        );
        assert!(e.contains(r#"ResponseClass="Error""#));
        assert!(e.contains("<m:ResponseCode>ErrorSubscriptionNotFound</m:ResponseCode>"));
        assert!(!e.contains("Fault"));
    }

    /// Found by the fuzzer: a StatusEvent carrying a timestamp and a folder (not in the schema)
    /// read them, the writer leaves them out, and the round trip changed the notification.
    #[test]
    fn a_status_event_is_read_as_its_watermark_only() {
        let xml = include_str!(
            "../../../fuzz/corpus/ews_notification/regression-status-event-extra-fields"
        );
        let read = parse_notification(xml).unwrap();
        assert_eq!(read[0].events[0], EwsEvent::status("HWC"));
        let again = parse_notification(&send_notification(&read[0])).unwrap();
        assert_eq!(again, read);
    }

    /// Found by the fuzzer: an id whose attribute holds a newline reference (`&#xa;`) read
    /// as a newline, was written back as a literal newline, and read again as a space.
    #[test]
    fn attribute_values_with_newlines_tabs_and_returns_read_back_the_same() {
        let xml =
            include_str!("../../../fuzz/corpus/ews_notification/regression-attribute-newline");
        let read = parse_notification(xml).unwrap();
        let again = parse_notification(&send_notification(&read[0])).unwrap();
        assert_eq!(again, read);
        let id = Id {
            id: "a\nb\tc\rd".into(),
            change_key: "k\n".into(),
        };
        let written = id_element("ItemId", &id);
        assert!(!written.contains('\n') && !written.contains('\t') && !written.contains('\r'));
    }

    #[test]
    fn push_replies_are_read_tolerantly() {
        assert_eq!(
            parse_send_notification_result(&send_notification_result(
                SubscriptionStatus::Unsubscribe
            )),
            SubscriptionStatus::Unsubscribe
        );
        assert_eq!(
            parse_send_notification_result(&send_notification_result(SubscriptionStatus::Ok)),
            SubscriptionStatus::Ok
        );
        assert_eq!(parse_send_notification_result(""), SubscriptionStatus::Ok);
        assert_eq!(
            parse_send_notification_result("garbage<"),
            SubscriptionStatus::Ok
        );
    }

    fn text() -> impl Strategy<Value = String> {
        "[A-Za-z0-9+/=_.@<>&'\"-]{1,24}"
    }

    fn id() -> impl Strategy<Value = Id> {
        (text(), text()).prop_map(|(id, change_key)| Id { id, change_key })
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![id().prop_map(Target::Folder), id().prop_map(Target::Item)]
    }

    fn ews_event() -> impl Strategy<Value = EwsEvent> {
        let kind = prop_oneof![
            Just(EventKind::Status),
            prop::sample::select(EventType::ALL.to_vec()).prop_map(EventKind::Event)
        ];
        (
            kind,
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(target()),
            prop::option::of(id()),
            prop::option::of(target()),
            prop::option::of(id()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(
                |(kind, watermark, timestamp, target, parent, old, old_parent, unread)| {
                    if kind == EventKind::Status {
                        EwsEvent {
                            watermark,
                            ..EwsEvent::status("")
                        }
                    } else {
                        EwsEvent {
                            kind,
                            watermark,
                            timestamp,
                            target,
                            parent_folder_id: parent,
                            old_target: old,
                            old_parent_folder_id: old_parent,
                            unread_count: unread,
                        }
                    }
                },
            )
    }

    fn notification_strategy() -> impl Strategy<Value = Notification> {
        (
            text(),
            prop::option::of(text()),
            prop::option::of(any::<bool>()),
            prop::collection::vec(ews_event(), 0..5),
        )
            .prop_map(
                |(subscription_id, previous_watermark, more_events, events)| Notification {
                    subscription_id,
                    previous_watermark,
                    more_events,
                    events,
                },
            )
    }

    fn folder_ref_strategy() -> impl Strategy<Value = FolderRef> {
        prop_oneof![
            (text(), prop::option::of(text()))
                .prop_map(|(id, change_key)| FolderRef::Id { id, change_key }),
            (text(), prop::option::of(text()))
                .prop_map(|(id, mailbox)| FolderRef::Distinguished { id, mailbox }),
        ]
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        let kind = prop_oneof![
            (1u32..=1440).prop_map(|t| SubscriptionKind::Pull { timeout_minutes: t }),
            (1u32..=1440, text()).prop_map(|(f, url)| SubscriptionKind::Push {
                status_frequency_minutes: f,
                url
            }),
            Just(SubscriptionKind::Streaming),
        ];
        prop_oneof![
            (
                kind,
                any::<bool>(),
                prop::collection::vec(folder_ref_strategy(), 1..3),
                prop::collection::btree_set(prop::sample::select(EventType::ALL.to_vec()), 1..7),
                prop::option::of(text())
            )
                .prop_map(|(kind, all, folders, types, watermark)| Request::Subscribe(
                    Subscribe {
                        kind,
                        all_folders: all,
                        folders: if all { vec![] } else { folders },
                        event_types: types.into_iter().collect(),
                        watermark,
                    }
                )),
            (text(), text()).prop_map(|(s, w)| Request::GetEvents {
                subscription_id: s,
                watermark: w
            }),
            (prop::collection::vec(text(), 1..4), 1u32..=30).prop_map(|(ids, t)| {
                Request::GetStreamingEvents {
                    subscription_ids: ids,
                    connection_timeout_minutes: t,
                }
            }),
            text().prop_map(|s| Request::Unsubscribe { subscription_id: s }),
            prop::collection::vec(folder_ref_strategy(), 1..4)
                .prop_map(|folders| Request::GetFolder { folders }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(r in request_strategy(), v in prop::option::of("[A-Za-z0-9_]{1,12}")) {
            let env = RequestEnvelope { server_version: v, request: r };
            let xml = write_request(&env);
            prop_assert_eq!(parse_request(&xml).unwrap(), env);
        }

        #[test]
        fn notifications_round_trip_through_push_and_get_events(n in notification_strategy()) {
            prop_assert_eq!(parse_notification(&send_notification(&n)).unwrap(), vec![n.clone()]);
            prop_assert_eq!(parse_notification(&get_events_ok(&n)).unwrap(), vec![n.clone()]);
            prop_assert_eq!(parse_notification(&streaming_notifications(&[n.clone(), n.clone()])).unwrap(), vec![n.clone(), n]);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,400}") {
            let _ = parse_request(&s);
            let _ = parse_notification(&s);
            let _ = parse_send_notification_result(&s);
        }
    }
}
