//! Exchange Web Services event notifications: the requests a client sends (Subscribe,
//! GetEvents, GetStreamingEvents, Unsubscribe, GetFolder), the responses and push messages a
//! server writes (including SendNotification), and the client's SendNotificationResult.
//!
//! Reading is namespace-aware and tolerant where real clients differ from the schema (a
//! `Watermark` in `m` or `t`, children in any order); writing is byte-careful where real
//! clients are strict (`<s:Envelope xmlns…>` with one space, for exchangelib's stream
//! splitter). No I/O; no DTDs or entity expansion.
//!
//! ```
//! use herald_ews::{parse_request, Request, SubscriptionKind};
//! let body = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
//!   xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
//!   xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Body>
//!   <m:Subscribe><m:PullSubscriptionRequest SubscribeToAllFolders="true">
//!   <t:EventTypes><t:EventType>CreatedEvent</t:EventType></t:EventTypes><t:Timeout>5</t:Timeout>
//!   </m:PullSubscriptionRequest></m:Subscribe></s:Body></s:Envelope>"#;
//! let Request::Subscribe(s) = parse_request(body).unwrap().request else { panic!() };
//! assert!(s.all_folders);
//! assert_eq!(s.kind, SubscriptionKind::Pull { timeout_minutes: 5 });
//! ```

pub mod dom;
mod read;
mod write;
pub mod wsdl;

pub use dom::{Element, Ns, XmlError};
pub use read::{
    ParseError, parse_notification, parse_request, parse_send_notification_result,
    request_operation,
};
pub use write::*;

/// SOAP 1.1 envelope namespace.
pub const NS_SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS messages namespace (`m`).
pub const NS_MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// EWS types namespace (`t`).
pub const NS_TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";

/// The event types a subscription may ask for (`t:EventType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// `CopiedEvent`.
    Copied,
    /// `CreatedEvent`.
    Created,
    /// `DeletedEvent`.
    Deleted,
    /// `ModifiedEvent`.
    Modified,
    /// `MovedEvent`.
    Moved,
    /// `NewMailEvent`.
    NewMail,
    /// `FreeBusyChangedEvent`.
    FreeBusyChanged,
}

impl EventType {
    /// Every type, in exchangelib's default order.
    pub const ALL: [EventType; 7] = [
        EventType::Copied,
        EventType::Created,
        EventType::Deleted,
        EventType::Modified,
        EventType::Moved,
        EventType::NewMail,
        EventType::FreeBusyChanged,
    ];

    /// The element name (`CreatedEvent`, …).
    pub fn element(self) -> &'static str {
        match self {
            EventType::Copied => "CopiedEvent",
            EventType::Created => "CreatedEvent",
            EventType::Deleted => "DeletedEvent",
            EventType::Modified => "ModifiedEvent",
            EventType::Moved => "MovedEvent",
            EventType::NewMail => "NewMailEvent",
            EventType::FreeBusyChanged => "FreeBusyChangedEvent",
        }
    }

    /// The type named `name`.
    pub fn from_element(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.element() == name)
    }
}

/// A folder named in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FolderRef {
    /// `t:FolderId Id= ChangeKey=`.
    Id {
        /// The opaque id.
        id: String,
        /// The change key, if given.
        change_key: Option<String>,
    },
    /// `t:DistinguishedFolderId Id="inbox"`, optionally with a mailbox.
    Distinguished {
        /// `inbox`, `root`, `msgfolderroot`, …
        id: String,
        /// The mailbox's SMTP address, when given.
        mailbox: Option<String>,
    },
}

/// Which kind of subscription, with its kind's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionKind {
    /// `PullSubscriptionRequest`.
    Pull {
        /// Minutes without GetEvents before the subscription expires (1–1440).
        timeout_minutes: u32,
    },
    /// `PushSubscriptionRequest`.
    Push {
        /// Keep-alive period and retry window, minutes (1–1440).
        status_frequency_minutes: u32,
        /// Where notifications are POSTed.
        url: String,
    },
    /// `StreamingSubscriptionRequest`.
    Streaming,
}

/// `m:Subscribe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// Pull, push or streaming, with settings.
    pub kind: SubscriptionKind,
    /// `SubscribeToAllFolders="true"`.
    pub all_folders: bool,
    /// The folders (empty with `all_folders`).
    pub folders: Vec<FolderRef>,
    /// Event types asked for.
    pub event_types: Vec<EventType>,
    /// Resume after this watermark (pull and push).
    pub watermark: Option<String>,
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `m:Subscribe`.
    Subscribe(Subscribe),
    /// `m:GetEvents`.
    GetEvents {
        /// The subscription.
        subscription_id: String,
        /// The watermark the client has.
        watermark: String,
    },
    /// `m:GetStreamingEvents`.
    GetStreamingEvents {
        /// The subscriptions (1–200).
        subscription_ids: Vec<String>,
        /// Minutes to keep the connection open (1–30).
        connection_timeout_minutes: u32,
    },
    /// `m:Unsubscribe`.
    Unsubscribe {
        /// The subscription.
        subscription_id: String,
    },
    /// `m:GetFolder`.
    GetFolder {
        /// The folders asked for, in order.
        folders: Vec<FolderRef>,
    },
}

impl Request {
    /// The operation's name (`Subscribe`, `GetEvents`, …), which names its response.
    pub fn operation(&self) -> &'static str {
        match self {
            Request::Subscribe(_) => "Subscribe",
            Request::GetEvents { .. } => "GetEvents",
            Request::GetStreamingEvents { .. } => "GetStreamingEvents",
            Request::Unsubscribe { .. } => "Unsubscribe",
            Request::GetFolder { .. } => "GetFolder",
        }
    }
}

/// A request with what its header said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEnvelope {
    /// `t:RequestServerVersion Version=`.
    pub server_version: Option<String>,
    /// The operation.
    pub request: Request,
}

/// An item or folder id (`Id`, `ChangeKey`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Id {
    /// The opaque id.
    pub id: String,
    /// The change key.
    pub change_key: String,
}

/// What an event is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A folder (`t:FolderId`).
    Folder(Id),
    /// An item (`t:ItemId`).
    Item(Id),
}

/// The kind of a notification event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// One of the subscribable types.
    Event(EventType),
    /// `StatusEvent`: a keep-alive, or "nothing happened".
    Status,
}

/// One event in a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EwsEvent {
    /// Which event.
    pub kind: EventKind,
    /// Its watermark.
    pub watermark: Option<String>,
    /// `xs:dateTime`, e.g. `2026-11-23T10:00:00Z` (not for StatusEvent).
    pub timestamp: Option<String>,
    /// The item or folder (not for StatusEvent).
    pub target: Option<Target>,
    /// Its parent folder (not for StatusEvent).
    pub parent_folder_id: Option<Id>,
    /// Moves and copies: where it was.
    pub old_target: Option<Target>,
    /// Moves and copies: its parent before.
    pub old_parent_folder_id: Option<Id>,
    /// ModifiedEvent on a folder: its unread count.
    pub unread_count: Option<u32>,
}

impl EwsEvent {
    /// A StatusEvent at `watermark`.
    pub fn status(watermark: impl Into<String>) -> Self {
        EwsEvent {
            kind: EventKind::Status,
            watermark: Some(watermark.into()),
            timestamp: None,
            target: None,
            parent_folder_id: None,
            old_target: None,
            old_parent_folder_id: None,
            unread_count: None,
        }
    }
}

/// `m:Notification`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The subscription.
    pub subscription_id: String,
    /// The watermark before these events.
    pub previous_watermark: Option<String>,
    /// Whether more events are queued.
    pub more_events: Option<bool>,
    /// The events, in queue order.
    pub events: Vec<EwsEvent>,
}

/// The client's answer to a push (`m:SendNotificationResult`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionStatus {
    /// Keep sending.
    Ok,
    /// Stop and delete the subscription.
    Unsubscribe,
}
