//! Reading requests and notifications.

use crate::dom::{self, Element, Ns, XmlError};
use crate::{
    EventKind, EventType, EwsEvent, FolderRef, Id, Notification, Request, RequestEnvelope,
    Subscribe, SubscriptionKind, SubscriptionStatus, Target,
};

/// Why a request could not be read. The server answers each with the EWS error that fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not readable XML (or refused: DTD, entity, too deep).
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// Not a SOAP envelope with a body.
    #[error("not a SOAP 1.1 envelope with a Body")]
    NotSoap,
    /// An operation this server does not offer.
    #[error("operation {0} is not supported by this server")]
    UnknownOperation(String),
    /// A required element is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// An element has a value outside its type or range.
    #[error("{field}: {message}")]
    Invalid {
        /// The element.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ParseError {
    ParseError::Invalid {
        field,
        message: message.into(),
    }
}

fn required<'a>(e: &'a Element, name: &'static str) -> Result<&'a Element, ParseError> {
    e.child(name).ok_or(ParseError::Missing(name))
}

fn text<'a>(e: &'a Element, name: &'static str) -> Result<&'a str, ParseError> {
    let t = required(e, name)?.text.as_str();
    if t.is_empty() {
        return Err(invalid(name, "must not be empty"));
    }
    Ok(t)
}

fn number(e: &Element, name: &'static str, min: u32, max: u32) -> Result<u32, ParseError> {
    let t = text(e, name)?;
    let n: u32 = t
        .parse()
        .map_err(|_| invalid(name, format!("{t:?} is not a whole number")))?;
    if !(min..=max).contains(&n) {
        return Err(invalid(name, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn folder_ref(e: &Element) -> Result<Option<FolderRef>, ParseError> {
    Ok(match e.name.as_str() {
        "FolderId" => Some(FolderRef::Id {
            id: e
                .attr("Id")
                .filter(|s| !s.is_empty())
                .ok_or(ParseError::Missing("FolderId/@Id"))?
                .to_owned(),
            change_key: e.attr("ChangeKey").map(str::to_owned),
        }),
        "DistinguishedFolderId" => Some(FolderRef::Distinguished {
            id: e
                .attr("Id")
                .filter(|s| !s.is_empty())
                .ok_or(ParseError::Missing("DistinguishedFolderId/@Id"))?
                .to_owned(),
            mailbox: e
                .child("Mailbox")
                .and_then(|m| m.child("EmailAddress"))
                .map(|a| a.text.clone())
                .filter(|a| !a.is_empty()),
        }),
        _ => None,
    })
}

fn folders(container: Option<&Element>) -> Result<Vec<FolderRef>, ParseError> {
    let mut out = Vec::new();
    if let Some(c) = container {
        for f in &c.children {
            if let Some(r) = folder_ref(f)? {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn subscribe(op: &Element) -> Result<Subscribe, ParseError> {
    let req = op
        .children
        .iter()
        .find(|c| {
            matches!(
                c.name.as_str(),
                "PullSubscriptionRequest"
                    | "PushSubscriptionRequest"
                    | "StreamingSubscriptionRequest"
            )
        })
        .ok_or(ParseError::Missing(
            "PullSubscriptionRequest, PushSubscriptionRequest or StreamingSubscriptionRequest",
        ))?;
    let all_folders = match req.attr("SubscribeToAllFolders") {
        None => false,
        Some(v) => boolean(v)
            .ok_or_else(|| invalid("SubscribeToAllFolders", format!("{v:?} is not a boolean")))?,
    };
    let folder_list = folders(req.child("FolderIds"))?;
    if !all_folders && folder_list.is_empty() {
        return Err(ParseError::Missing(
            "FolderIds (or SubscribeToAllFolders=\"true\")",
        ));
    }
    let types = required(req, "EventTypes")?;
    let mut event_types = Vec::new();
    for t in types.children_named("EventType") {
        let ty = EventType::from_element(&t.text)
            .ok_or_else(|| invalid("EventType", format!("{:?} is not an event type", t.text)))?;
        if !event_types.contains(&ty) {
            event_types.push(ty);
        }
    }
    if event_types.is_empty() {
        return Err(ParseError::Missing("EventType"));
    }
    // The schema puts Watermark in t; exchangelib sends it in m. Both are accepted.
    let watermark = req
        .child("Watermark")
        .map(|w| w.text.clone())
        .filter(|w| !w.is_empty());
    let kind = match req.name.as_str() {
        "PullSubscriptionRequest" => SubscriptionKind::Pull {
            timeout_minutes: number(req, "Timeout", 1, 1440)?,
        },
        "PushSubscriptionRequest" => SubscriptionKind::Push {
            status_frequency_minutes: match req.child("StatusFrequency") {
                Some(_) => number(req, "StatusFrequency", 1, 1440)?,
                None => 30,
            },
            url: text(req, "URL")?.to_owned(),
        },
        _ => SubscriptionKind::Streaming,
    };
    Ok(Subscribe {
        kind,
        all_folders,
        folders: if all_folders { Vec::new() } else { folder_list },
        event_types,
        watermark,
    })
}

/// The operation a SOAP request names (the first element of its Body), if it is well-formed:
/// for answering, by name, a request [`parse_request`] refused.
pub fn request_operation(xml: &str) -> Option<String> {
    let root = dom::parse(xml).ok()?;
    let op = root.child("Body")?.children.first()?;
    Some(op.name.clone())
}

/// Reads a SOAP request.
pub fn parse_request(xml: &str) -> Result<RequestEnvelope, ParseError> {
    let root = dom::parse(xml)?;
    if root.ns != Ns::Soap || root.name != "Envelope" {
        return Err(ParseError::NotSoap);
    }
    let body = root.child("Body").ok_or(ParseError::NotSoap)?;
    let op = body.children.first().ok_or(ParseError::NotSoap)?;
    let server_version = root
        .child("Header")
        .and_then(|h| h.child("RequestServerVersion"))
        .and_then(|v| v.attr("Version"))
        .map(str::to_owned);
    let request = match op.name.as_str() {
        "Subscribe" => Request::Subscribe(subscribe(op)?),
        "GetEvents" => Request::GetEvents {
            subscription_id: text(op, "SubscriptionId")?.to_owned(),
            watermark: text(op, "Watermark")?.to_owned(),
        },
        "GetStreamingEvents" => {
            let ids: Vec<String> = required(op, "SubscriptionIds")?
                .children_named("SubscriptionId")
                .map(|e| e.text.clone())
                .collect();
            if ids.is_empty() {
                return Err(ParseError::Missing("SubscriptionId"));
            }
            if ids.len() > 200 {
                return Err(invalid(
                    "SubscriptionIds",
                    "at most 200 subscriptions per connection",
                ));
            }
            Request::GetStreamingEvents {
                subscription_ids: ids,
                connection_timeout_minutes: number(op, "ConnectionTimeout", 1, 30)?,
            }
        }
        "Unsubscribe" => Request::Unsubscribe {
            subscription_id: text(op, "SubscriptionId")?.to_owned(),
        },
        "GetFolder" => {
            let f = folders(op.child("FolderIds"))?;
            if f.is_empty() {
                return Err(ParseError::Missing("FolderIds"));
            }
            Request::GetFolder { folders: f }
        }
        other => return Err(ParseError::UnknownOperation(other.to_owned())),
    };
    Ok(RequestEnvelope {
        server_version,
        request,
    })
}

fn id(e: &Element) -> Id {
    Id {
        id: e.attr("Id").unwrap_or_default().to_owned(),
        change_key: e.attr("ChangeKey").unwrap_or_default().to_owned(),
    }
}

fn target(e: &Element, folder: &str, item: &str) -> Option<Target> {
    e.child(folder)
        .map(|f| Target::Folder(id(f)))
        .or_else(|| e.child(item).map(|i| Target::Item(id(i))))
}

fn event(e: &Element) -> Result<Option<EwsEvent>, ParseError> {
    let kind = match e.name.as_str() {
        "StatusEvent" => EventKind::Status,
        other => match EventType::from_element(other) {
            Some(t) => EventKind::Event(t),
            None => return Ok(None),
        },
    };
    let watermark = e.child("Watermark").map(|w| w.text.clone());
    if kind == EventKind::Status {
        // A StatusEvent is `BaseNotificationEventType`: a watermark and nothing else. Anything
        // else inside one is not part of the schema and is ignored, as the writer never sends it.
        return Ok(Some(EwsEvent {
            watermark,
            ..EwsEvent::status(String::new())
        }));
    }
    Ok(Some(EwsEvent {
        kind,
        watermark,
        timestamp: e.child("TimeStamp").map(|t| t.text.clone()),
        target: target(e, "FolderId", "ItemId"),
        parent_folder_id: e.child("ParentFolderId").map(id),
        old_target: target(e, "OldFolderId", "OldItemId"),
        old_parent_folder_id: e.child("OldParentFolderId").map(id),
        unread_count: match e.child("UnreadCount") {
            Some(u) => Some(
                u.text
                    .parse()
                    .map_err(|_| invalid("UnreadCount", format!("{:?} is not a count", u.text)))?,
            ),
            None => None,
        },
    }))
}

fn notification(n: &Element) -> Result<Notification, ParseError> {
    let mut events = Vec::new();
    for c in &n.children {
        if let Some(e) = event(c)? {
            events.push(e);
        }
    }
    Ok(Notification {
        subscription_id: text(n, "SubscriptionId")?.to_owned(),
        previous_watermark: n.child("PreviousWatermark").map(|w| w.text.clone()),
        more_events: match n.child("MoreEvents") {
            Some(m) => {
                Some(boolean(&m.text).ok_or_else(|| invalid("MoreEvents", "not a boolean"))?)
            }
            None => None,
        },
        events,
    })
}

fn find<'a>(e: &'a Element, name: &str) -> Option<&'a Element> {
    if e.name == name {
        return Some(e);
    }
    e.children.iter().find_map(|c| find(c, name))
}

/// Reads every `m:Notification` in a document (a SendNotification push, a GetEvents
/// response, or one streaming envelope).
pub fn parse_notification(xml: &str) -> Result<Vec<Notification>, ParseError> {
    let root = dom::parse(xml)?;
    let mut out = Vec::new();
    collect(&root, &mut out)?;
    Ok(out)
}

fn collect(e: &Element, out: &mut Vec<Notification>) -> Result<(), ParseError> {
    if e.name == "Notification" {
        out.push(notification(e)?);
        return Ok(());
    }
    for c in &e.children {
        collect(c, out)?;
    }
    Ok(())
}

/// Reads the client's answer to a push. A 2xx with an empty or unreadable body counts as OK;
/// only an explicit `Unsubscribe` stops the subscription.
pub fn parse_send_notification_result(xml: &str) -> SubscriptionStatus {
    match dom::parse(xml) {
        Ok(root) => match find(&root, "SubscriptionStatus") {
            Some(s) if s.text == "Unsubscribe" => SubscriptionStatus::Unsubscribe,
            _ => SubscriptionStatus::Ok,
        },
        Err(_) => SubscriptionStatus::Ok,
    }
}
