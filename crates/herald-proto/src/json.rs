//! The HTTP API's JSON form of an event, and its mapping to and from the engine's model: the
//! one place where `kind` names, per-kind fields and property values are spelled for JSON.
//!
//! An event is one flat object: `key`, `kind`, and the fields of that kind. A field that does
//! not apply to the kind is refused with an error naming it, so a producer never believes it
//! sent something that was dropped.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use herald_core::{
    ConnectionStateChange, CriticalError, Event, EventKind, Extended, Key, NewMail, Notification,
    ObjectChange, ObjectType, PropData, PropValue, Relocation, StateChangePhase,
    StatusObjectChange, TableChange, TableEvent, Timestamp, Watermark,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An event as producers send it and subscribers receive it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventJson {
    /// The object's key in path form, e.g. `alice@example.test/inbox/msg-1`.
    pub key: String,
    /// The kind: `new_mail`, `object_created`, `object_deleted`, `object_modified`,
    /// `object_moved`, `object_copied`, `search_complete`, `table_modified`,
    /// `status_object_modified`, `extended`, `critical_error`; `connection_state` events come
    /// from the server only.
    pub kind: String,
    /// The log position; set by the server on delivery, ignored on input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<u64>,
    /// When it happened, in microseconds since the Unix epoch (default: when received).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Object events: `store`, `folder`, `message`, `attachment`, … (MAPI object types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_type: Option<String>,
    /// Object events and new mail: the parent folder's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Moves and copies: the key the object had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key: Option<String>,
    /// Moves and copies: the parent it had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_parent: Option<String>,
    /// Object events: the tags of the properties that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_props: Option<Vec<u32>>,
    /// Object events on folders: the total item count after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_count: Option<u32>,
    /// Object events on folders: the unread item count after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread_count: Option<u32>,
    /// New mail: the message class (default `IPM.Note`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_class: Option<String>,
    /// New mail: a copy of the message's `PR_MESSAGE_FLAGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_flags: Option<u32>,
    /// Table events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<TableJson>,
    /// Status object events: the changed properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<Vec<PropJson>>,
    /// Critical errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorJson>,
    /// Extended events: the provider's event code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_event: Option<u32>,
    /// Extended events: opaque parameters, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Connection-state events (server-made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionStateJson>,
}

/// A table event (`TABLE_NOTIFICATION`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TableJson {
    /// `changed`, `error`, `row_added`, `row_deleted`, `row_modified`, `sort_done`,
    /// `restrict_done`, `setcol_done`, `reload`.
    pub event: String,
    /// For `error`: the HRESULT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hresult: Option<u32>,
    /// For row events: the row's `PR_INSTANCE_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<PropJson>,
    /// For added and modified rows: the row before it; absent when the row is first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<PropJson>,
    /// For added and modified rows: the row's columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<Vec<PropJson>>,
}

/// A property value: the MAPI tag and a value whose JSON type follows the tag's property type
/// (`PT_LONG` a number, `PT_UNICODE` a string, `PT_BINARY` base64, `PT_BOOLEAN` a bool, …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropJson {
    /// The property tag (id in the high 16 bits, type in the low 16).
    pub tag: u32,
    /// The value.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

/// A critical error (`ERROR_NOTIFICATION`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorJson {
    /// The SCODE.
    #[serde(default)]
    pub scode: u32,
    /// A description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The component that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// `ulLowLevelError`.
    #[serde(default)]
    pub low_level_error: u32,
    /// `ulContext`.
    #[serde(default)]
    pub context: u32,
}

/// A connection-state change (`MAPIOFFLINE_NOTIFY`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionStateJson {
    /// `start`, `change` or `done`.
    pub phase: String,
    /// The client's token.
    pub client_token: u32,
    /// Which part of the state changed (3: online/offline).
    pub changed_mask: u32,
    /// The state before (1 offline, 2 online).
    pub old_state: u32,
    /// The state after.
    pub new_state: u32,
}

/// Why a JSON event could not be turned into an engine event: the field, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field, as a JSON path relative to the event (`kind`, `table.index`, …).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

const OBJECT_TYPES: [(ObjectType, &str); 13] = [
    (ObjectType::Unspecified, "unspecified"),
    (ObjectType::Store, "store"),
    (ObjectType::AddressBook, "address_book"),
    (ObjectType::Folder, "folder"),
    (ObjectType::AddressBookContainer, "address_book_container"),
    (ObjectType::Message, "message"),
    (ObjectType::MailUser, "mail_user"),
    (ObjectType::Attachment, "attachment"),
    (ObjectType::DistList, "dist_list"),
    (ObjectType::ProfileSection, "profile_section"),
    (ObjectType::Status, "status"),
    (ObjectType::Session, "session"),
    (ObjectType::FormInfo, "form_info"),
];

const TABLE_EVENTS: [(TableEvent, &str); 9] = [
    (TableEvent::Changed, "changed"),
    (TableEvent::Error, "error"),
    (TableEvent::RowAdded, "row_added"),
    (TableEvent::RowDeleted, "row_deleted"),
    (TableEvent::RowModified, "row_modified"),
    (TableEvent::SortDone, "sort_done"),
    (TableEvent::RestrictDone, "restrict_done"),
    (TableEvent::SetColDone, "setcol_done"),
    (TableEvent::Reload, "reload"),
];

const PHASES: [(StateChangePhase, &str); 3] = [
    (StateChangePhase::Start, "start"),
    (StateChangePhase::Change, "change"),
    (StateChangePhase::Done, "done"),
];

fn name_of<T: PartialEq + Copy>(table: &[(T, &'static str)], v: T) -> &'static str {
    table
        .iter()
        .find(|(t, _)| *t == v)
        .map_or("unknown", |(_, n)| n)
}

fn parse_name<T: Copy>(table: &[(T, &'static str)], field: &str, s: &str) -> Result<T, FieldError> {
    table
        .iter()
        .find(|(_, n)| *n == s)
        .map(|(t, _)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
            field_err(
                field,
                format!("unknown value {s:?}; one of {}", names.join(", ")),
            )
        })
}

/// The fields each kind may carry (besides `key`, `kind`, `timestamp`, `watermark`).
fn allowed_fields(kind: EventKind) -> &'static [&'static str] {
    const OBJECT: &[&str] = &[
        "object_type",
        "parent",
        "changed_props",
        "total_count",
        "unread_count",
    ];
    const RELOCATION: &[&str] = &[
        "object_type",
        "parent",
        "changed_props",
        "total_count",
        "unread_count",
        "old_key",
        "old_parent",
    ];
    match kind {
        EventKind::CriticalError => &["error"],
        EventKind::NewMail => &["parent", "message_class", "message_flags", "object_type"],
        EventKind::ObjectCreated
        | EventKind::ObjectDeleted
        | EventKind::ObjectModified
        | EventKind::SearchComplete => OBJECT,
        EventKind::ObjectMoved | EventKind::ObjectCopied => RELOCATION,
        EventKind::TableModified => &["table"],
        EventKind::StatusObjectModified => &["props"],
        EventKind::ConnectionState => &["connection_state"],
        EventKind::Extended => &["extended_event", "data"],
    }
}

/// Who made the JSON being read: a producer (checked strictly, never the server's own
/// events) or the server (a delivered event, read by a client).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Producer,
    Server,
}

impl EventJson {
    /// The per-kind fields that are present.
    fn present_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |present: bool, name: &'static str| {
            if present {
                v.push(name);
            }
        };
        add(self.object_type.is_some(), "object_type");
        add(self.parent.is_some(), "parent");
        add(self.old_key.is_some(), "old_key");
        add(self.old_parent.is_some(), "old_parent");
        add(self.changed_props.is_some(), "changed_props");
        add(self.total_count.is_some(), "total_count");
        add(self.unread_count.is_some(), "unread_count");
        add(self.message_class.is_some(), "message_class");
        add(self.message_flags.is_some(), "message_flags");
        add(self.table.is_some(), "table");
        add(self.props.is_some(), "props");
        add(self.error.is_some(), "error");
        add(self.extended_event.is_some(), "extended_event");
        add(self.data.is_some(), "data");
        add(self.connection_state.is_some(), "connection_state");
        v
    }

    /// Turns a producer's event into the engine's, checking every field. `now` stamps events
    /// that carry no timestamp.
    pub fn to_notification(
        &self,
        now: Timestamp,
        max_key: usize,
    ) -> Result<Notification, FieldError> {
        self.convert(now, max_key, Origin::Producer)
    }

    /// Turns an event as the server delivers it into the engine's: its watermark kept, and
    /// the server's own events (connection state, keys under `$herald/`) accepted. This is
    /// how a client reads what it receives.
    pub fn to_delivered(&self) -> Result<Notification, FieldError> {
        let stamp = Timestamp(self.timestamp.unwrap_or(0));
        self.convert(stamp, usize::MAX, Origin::Server)
    }

    fn convert(
        &self,
        now: Timestamp,
        max_key: usize,
        origin: Origin,
    ) -> Result<Notification, FieldError> {
        let any_key = |field: &str, s: &str| match origin {
            Origin::Producer => producer_key(field, s, max_key),
            Origin::Server => parse_key(field, s, max_key),
        };
        let key = any_key("key", &self.key)?;
        let kind = EventKind::from_name(&self.kind).ok_or_else(|| {
            let names: Vec<&str> = EventKind::ALL
                .iter()
                .filter(|k| **k != EventKind::ConnectionState)
                .map(|k| k.name())
                .collect();
            field_err(
                "kind",
                format!("unknown kind {:?}; one of {}", self.kind, names.join(", ")),
            )
        })?;
        if kind == EventKind::ConnectionState && origin == Origin::Producer {
            return Err(field_err(
                "kind",
                "connection_state events come from the server itself",
            ));
        }
        let allowed = allowed_fields(kind);
        if let Some(extra) = self
            .present_fields()
            .into_iter()
            .find(|f| !allowed.contains(f))
        {
            return Err(field_err(
                extra,
                format!(
                    "does not apply to {}; it takes {}",
                    kind.name(),
                    allowed.join(", ")
                ),
            ));
        }
        let opt_key = |field: &str, v: &Option<String>| -> Result<Option<Key>, FieldError> {
            v.as_deref().map(|s| any_key(field, s)).transpose()
        };
        let object = || -> Result<ObjectChange, FieldError> {
            Ok(ObjectChange {
                object_type: match &self.object_type {
                    Some(t) => parse_name(&OBJECT_TYPES, "object_type", t)?,
                    None => ObjectType::Unspecified,
                },
                parent: opt_key("parent", &self.parent)?,
                changed_props: self.changed_props.clone().unwrap_or_default(),
                total_count: self.total_count,
                unread_count: self.unread_count,
            })
        };
        let event = match kind {
            EventKind::CriticalError => {
                let e = self.error.clone().unwrap_or_default();
                Event::CriticalError(CriticalError {
                    scode: e.scode,
                    message: e.message,
                    component: e.component,
                    low_level_error: e.low_level_error,
                    context: e.context,
                })
            }
            EventKind::NewMail => {
                if let Some(t) = &self.object_type {
                    if parse_name(&OBJECT_TYPES, "object_type", t)? != ObjectType::Message {
                        return Err(field_err("object_type", "new mail is always a message"));
                    }
                }
                Event::NewMail(NewMail {
                    parent: match opt_key("parent", &self.parent)? {
                        Some(p) => p,
                        None => key.parent().ok_or_else(|| {
                            field_err("parent", "required: the receive folder's key")
                        })?,
                    },
                    message_class: self
                        .message_class
                        .clone()
                        .unwrap_or_else(|| "IPM.Note".to_owned()),
                    message_flags: self.message_flags.unwrap_or(0),
                })
            }
            EventKind::ObjectCreated => Event::ObjectCreated(object()?),
            EventKind::ObjectDeleted => Event::ObjectDeleted(object()?),
            EventKind::ObjectModified => Event::ObjectModified(object()?),
            EventKind::SearchComplete => Event::SearchComplete(object()?),
            EventKind::ObjectMoved | EventKind::ObjectCopied => {
                let old_key = opt_key("old_key", &self.old_key)?
                    .ok_or_else(|| field_err("old_key", format!("required for {}", kind.name())))?;
                let r = Relocation {
                    object: object()?,
                    old_key,
                    old_parent: opt_key("old_parent", &self.old_parent)?,
                };
                if kind == EventKind::ObjectMoved {
                    Event::ObjectMoved(r)
                } else {
                    Event::ObjectCopied(r)
                }
            }
            EventKind::TableModified => {
                let t = self
                    .table
                    .as_ref()
                    .ok_or_else(|| field_err("table", "required for table_modified"))?;
                Event::TableModified(t.to_model()?)
            }
            EventKind::StatusObjectModified => Event::StatusObjectModified(StatusObjectChange {
                props: props_to_model("props", self.props.as_deref().unwrap_or_default())?,
            }),
            EventKind::Extended => Event::Extended(Extended {
                event: self.extended_event.unwrap_or(0),
                data: match &self.data {
                    Some(d) => B64
                        .decode(d)
                        .map_err(|e| field_err("data", format!("not base64: {e}")))?
                        .into(),
                    None => bytes::Bytes::new(),
                },
            }),
            EventKind::ConnectionState => match (origin, &self.connection_state) {
                (Origin::Server, Some(c)) => Event::ConnectionState(ConnectionStateChange {
                    phase: parse_name(&PHASES, "connection_state.phase", &c.phase)?,
                    client_token: c.client_token,
                    changed_mask: c.changed_mask,
                    old_state: c.old_state,
                    new_state: c.new_state,
                }),
                (Origin::Server, None) => {
                    return Err(field_err(
                        "connection_state",
                        "required for connection_state",
                    ));
                }
                (Origin::Producer, _) => unreachable_kind()?,
            },
        };
        let n = Notification {
            key,
            timestamp: self.timestamp.map_or(now, Timestamp),
            watermark: match origin {
                Origin::Producer => None,
                Origin::Server => self.watermark.map(Watermark),
            },
            event,
        };
        n.validate().map_err(|e| {
            field_err(
                if kind == EventKind::TableModified {
                    "table"
                } else {
                    "key"
                },
                e.to_string(),
            )
        })?;
        Ok(n)
    }
}

/// An engine event written as its JSON form (the fields of [`EventJson`], in that order)
/// straight from the model: no owned intermediate, keys and base64 streamed into the output.
/// The one writer of events as JSON: every frame and page comes from it.
pub struct EventOut<'a>(pub &'a Notification);

/// A key: its text as it is (the common case, without the formatting machinery a `Display`
/// goes through), or its `Display` form when it is not UTF-8.
struct KeyOut<'a>(&'a Key);

impl Serialize for KeyOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_str() {
            Some(text) => s.serialize_str(text),
            None => s.collect_str(self.0),
        }
    }
}

/// Bytes as base64, encoded on the stack when short (event payloads usually are).
struct Base64Out<'a>(&'a [u8]);

impl Serialize for Base64Out<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 1024];
        match B64.encode_slice(self.0, &mut buf) {
            // Base64's alphabet is ASCII.
            Ok(n) => s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default()),
            Err(_) => s.collect_str(&base64::display::Base64Display::new(self.0, &B64)),
        }
    }
}

impl Serialize for EventOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let n = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("key", &KeyOut(&n.key))?;
        m.serialize_entry("kind", n.kind().name())?;
        if let Some(w) = n.watermark {
            m.serialize_entry("watermark", &w.0)?;
        }
        m.serialize_entry("timestamp", &n.timestamp.0)?;
        match &n.event {
            Event::CriticalError(e) => m.serialize_entry(
                "error",
                &ErrorJson {
                    scode: e.scode,
                    message: e.message.clone(),
                    component: e.component.clone(),
                    low_level_error: e.low_level_error,
                    context: e.context,
                },
            )?,
            Event::NewMail(nm) => {
                m.serialize_entry("parent", &KeyOut(&nm.parent))?;
                m.serialize_entry("message_class", &nm.message_class)?;
                m.serialize_entry("message_flags", &nm.message_flags)?;
            }
            Event::ObjectCreated(o)
            | Event::ObjectDeleted(o)
            | Event::ObjectModified(o)
            | Event::SearchComplete(o) => object_fields(&mut m, o, None)?,
            Event::ObjectMoved(r) | Event::ObjectCopied(r) => {
                object_fields(&mut m, &r.object, Some((&r.old_key, r.old_parent.as_ref())))?;
            }
            Event::TableModified(t) => m.serialize_entry("table", &TableJson::from_model(t))?,
            Event::StatusObjectModified(st) => {
                let props: Vec<PropJson> = st.props.iter().map(PropJson::from_model).collect();
                m.serialize_entry("props", &props)?;
            }
            Event::ConnectionState(c) => {
                m.serialize_entry("connection_state", &connection_state(c))?;
            }
            Event::Extended(e) => {
                m.serialize_entry("extended_event", &e.event)?;
                m.serialize_entry("data", &Base64Out(&e.data))?;
            }
        }
        m.end()
    }
}

/// An object event's fields, with a move's or copy's old key and parent in their place.
fn object_fields<M: serde::ser::SerializeMap>(
    m: &mut M,
    o: &ObjectChange,
    old: Option<(&Key, Option<&Key>)>,
) -> Result<(), M::Error> {
    if o.object_type != ObjectType::Unspecified {
        m.serialize_entry("object_type", name_of(&OBJECT_TYPES, o.object_type))?;
    }
    if let Some(p) = &o.parent {
        m.serialize_entry("parent", &KeyOut(p))?;
    }
    if let Some((old_key, old_parent)) = old {
        m.serialize_entry("old_key", &KeyOut(old_key))?;
        if let Some(p) = old_parent {
            m.serialize_entry("old_parent", &KeyOut(p))?;
        }
    }
    if !o.changed_props.is_empty() {
        m.serialize_entry("changed_props", &o.changed_props)?;
    }
    if let Some(c) = o.total_count {
        m.serialize_entry("total_count", &c)?;
    }
    if let Some(c) = o.unread_count {
        m.serialize_entry("unread_count", &c)?;
    }
    Ok(())
}

fn unreachable_kind() -> Result<Event, FieldError> {
    Err(field_err(
        "kind",
        "connection_state events come from the server itself",
    ))
}

/// A number written in decimal or as `0x` hex (masks are usually given in hex).
pub fn parse_number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The kinds named in a comma-separated list (`new_mail,object_created`), as a mask.
pub fn parse_kinds(field: &str, list: &str) -> Result<herald_core::EventMask, FieldError> {
    let mut mask = herald_core::EventMask::NONE;
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind = EventKind::from_name(name)
            .ok_or_else(|| field_err(field, format!("unknown kind {name:?}")))?;
        mask = mask.with(kind);
    }
    if mask.is_empty() {
        return Err(field_err(field, "names no kind"));
    }
    Ok(mask)
}

fn parse_key(field: &str, s: &str, max: usize) -> Result<Key, FieldError> {
    if s.is_empty() {
        return Err(field_err(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(field_err(field, format!("longer than {max} bytes")));
    }
    if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
        return Err(field_err(
            field,
            "segments are separated by single '/', with none empty",
        ));
    }
    Ok(Key::from(s))
}

/// A key a producer names (the event's key, a parent, a move's or copy's old key and old
/// parent): as [`parse_key`], and never under `$herald/`, the server's own space (presence),
/// whichever field names it: moves are matched on their old key too.
fn producer_key(field: &str, s: &str, max: usize) -> Result<Key, FieldError> {
    let key = parse_key(field, s, max)?;
    let reserved = Key::from(herald_core::RESERVED_PREFIX);
    if key.is_within(&reserved) {
        return Err(field_err(
            field,
            "keys under $herald/ are the server's own (presence); producers may not name them",
        ));
    }
    Ok(key)
}

/// A key from a query parameter or path, with the same rules as in events.
pub fn key_param(field: &str, s: &str, max: usize) -> Result<Key, FieldError> {
    parse_key(field, s, max)
}

impl TableJson {
    fn to_model(&self) -> Result<TableChange, FieldError> {
        let event = parse_name(&TABLE_EVENTS, "table.event", &self.event)?;
        let prop = |field: &str, p: &Option<PropJson>| -> Result<Option<PropValue>, FieldError> {
            p.as_ref().map(|p| p.to_model(field)).transpose()
        };
        let row = props_to_model("table.row", self.row.as_deref().unwrap_or_default())?;
        let index = || {
            prop("table.index", &self.index)?
                .ok_or_else(|| field_err("table.index", format!("required for {}", self.event)))
        };
        let no = |name: &str, present: bool| {
            if present {
                Err(field_err(
                    format!("table.{name}"),
                    format!("does not apply to {}", self.event),
                ))
            } else {
                Ok(())
            }
        };
        Ok(match event {
            TableEvent::RowAdded | TableEvent::RowModified => {
                no("hresult", self.hresult.is_some())?;
                let t = TableChange::row_added(index()?, prop("table.prior", &self.prior)?, row);
                if event == TableEvent::RowModified {
                    TableChange {
                        event: TableEvent::RowModified,
                        ..t
                    }
                } else {
                    t
                }
            }
            TableEvent::RowDeleted => {
                no("hresult", self.hresult.is_some())?;
                no("prior", self.prior.is_some())?;
                no("row", self.row.is_some())?;
                TableChange::row_deleted(index()?)
            }
            TableEvent::Error => {
                no("index", self.index.is_some())?;
                no("prior", self.prior.is_some())?;
                no("row", self.row.is_some())?;
                TableChange::error(self.hresult.unwrap_or(0))
            }
            other => {
                no("hresult", self.hresult.is_some())?;
                no("index", self.index.is_some())?;
                no("prior", self.prior.is_some())?;
                no("row", self.row.is_some())?;
                TableChange::without_row(other)
            }
        })
    }

    fn from_model(t: &TableChange) -> TableJson {
        let has_row = t.event.has_row();
        TableJson {
            event: name_of(&TABLE_EVENTS, t.event).to_owned(),
            hresult: (t.event == TableEvent::Error).then_some(t.hresult),
            index: has_row.then(|| PropJson::from_model(&t.index)),
            prior: (has_row && t.prior.tag != herald_core::PR_NULL)
                .then(|| PropJson::from_model(&t.prior)),
            row: (has_row && t.event != TableEvent::RowDeleted)
                .then(|| t.row.iter().map(PropJson::from_model).collect()),
        }
    }
}

fn props_to_model(field: &str, props: &[PropJson]) -> Result<Vec<PropValue>, FieldError> {
    props
        .iter()
        .enumerate()
        .map(|(i, p)| p.to_model(&format!("{field}[{i}]")))
        .collect()
}

// MAPI property types (the low 16 bits of a tag).
const PT_NULL: u32 = 0x0001;
const PT_SHORT: u32 = 0x0002;
const PT_LONG: u32 = 0x0003;
const PT_FLOAT: u32 = 0x0004;
const PT_DOUBLE: u32 = 0x0005;
const PT_ERROR: u32 = 0x000A;
const PT_BOOLEAN: u32 = 0x000B;
const PT_I8: u32 = 0x0014;
const PT_STRING8: u32 = 0x001E;
const PT_UNICODE: u32 = 0x001F;
const PT_SYSTIME: u32 = 0x0040;
const PT_CLSID: u32 = 0x0048;
const PT_BINARY: u32 = 0x0102;
const PT_MV_LONG: u32 = 0x1003;
const PT_MV_STRING8: u32 = 0x101E;
const PT_MV_UNICODE: u32 = 0x101F;
const PT_MV_BINARY: u32 = 0x1102;

impl PropJson {
    fn to_model(&self, field: &str) -> Result<PropValue, FieldError> {
        use serde_json::Value as J;
        let bad = |what: &str| {
            field_err(
                format!("{field}.value"),
                format!("expected {what} for tag {:#010x}", self.tag),
            )
        };
        let v = &self.value;
        let int = |v: &J| v.as_i64().ok_or_else(|| bad("an integer"));
        let value = match self.tag & 0xFFFF {
            PT_NULL => PropData::Null,
            PT_SHORT => PropData::I16(i16::try_from(int(v)?).map_err(|_| bad("a 16-bit integer"))?),
            PT_LONG => PropData::I32(i32::try_from(int(v)?).map_err(|_| bad("a 32-bit integer"))?),
            PT_I8 => PropData::I64(int(v)?),
            PT_FLOAT => PropData::F32(v.as_f64().ok_or_else(|| bad("a number"))? as f32),
            PT_DOUBLE => PropData::F64(v.as_f64().ok_or_else(|| bad("a number"))?),
            PT_BOOLEAN => PropData::Bool(v.as_bool().ok_or_else(|| bad("true or false"))?),
            PT_SYSTIME => PropData::SysTime(v.as_u64().ok_or_else(|| bad("a FILETIME (u64)"))?),
            PT_ERROR => PropData::Error(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad("an SCODE (u32)"))?,
            ),
            PT_STRING8 | PT_UNICODE => {
                PropData::String(v.as_str().ok_or_else(|| bad("a string"))?.to_owned())
            }
            PT_BINARY => PropData::Binary(
                B64.decode(v.as_str().ok_or_else(|| bad("base64"))?)
                    .map_err(|_| bad("base64"))?
                    .into(),
            ),
            PT_CLSID => {
                let hex: String = v
                    .as_str()
                    .ok_or_else(|| bad("a GUID"))?
                    .chars()
                    .filter(|c| *c != '-')
                    .collect();
                let mut g = [0u8; 16];
                if hex.len() != 32 {
                    return Err(bad("a GUID of 32 hex digits"));
                }
                for (i, b) in g.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                        .map_err(|_| bad("a GUID"))?;
                }
                PropData::Guid(g)
            }
            PT_MV_LONG => PropData::MultiI32(
                v.as_array()
                    .ok_or_else(|| bad("an array of integers"))?
                    .iter()
                    .map(|x| {
                        int(x).and_then(|n| i32::try_from(n).map_err(|_| bad("32-bit integers")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            PT_MV_STRING8 | PT_MV_UNICODE => PropData::MultiString(
                v.as_array()
                    .ok_or_else(|| bad("an array of strings"))?
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad("strings")))
                    .collect::<Result<_, _>>()?,
            ),
            PT_MV_BINARY => PropData::MultiBinary(
                v.as_array()
                    .ok_or_else(|| bad("an array of base64 strings"))?
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .and_then(|s| B64.decode(s).ok())
                            .map(bytes::Bytes::from)
                            .ok_or_else(|| bad("base64 strings"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(field_err(
                    format!("{field}.tag"),
                    format!("property type {other:#06x} is not supported"),
                ));
            }
        };
        if self.tag == 0 {
            return Err(field_err(
                format!("{field}.tag"),
                "0 is not a property tag (PR_NULL is 1)",
            ));
        }
        Ok(PropValue {
            tag: self.tag,
            value,
        })
    }

    fn from_model(p: &PropValue) -> PropJson {
        use serde_json::json;
        let value = match &p.value {
            PropData::Null => serde_json::Value::Null,
            PropData::I16(v) => json!(v),
            PropData::I32(v) => json!(v),
            PropData::I64(v) => json!(v),
            PropData::F32(v) => json!(v),
            PropData::F64(v) => json!(v),
            PropData::Bool(v) => json!(v),
            PropData::SysTime(v) => json!(v),
            PropData::String(v) => json!(v),
            PropData::Binary(v) => json!(B64.encode(v)),
            PropData::Guid(g) => json!(g.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            PropData::Error(v) => json!(v),
            PropData::MultiI32(v) => json!(v),
            PropData::MultiString(v) => json!(v),
            PropData::MultiBinary(v) => json!(v.iter().map(|b| B64.encode(b)).collect::<Vec<_>>()),
        };
        PropJson { tag: p.tag, value }
    }
}

/// The watermark of a delivered event, for the SSE `id:` field.
pub fn watermark_of(n: &Notification) -> Watermark {
    n.watermark.unwrap_or(Watermark(0))
}

/// The connection-state model, for events the server makes.
pub fn connection_state(c: &ConnectionStateChange) -> ConnectionStateJson {
    ConnectionStateJson {
        phase: name_of(&PHASES, c.phase).to_owned(),
        client_token: c.client_token,
        changed_mask: c.changed_mask,
        old_state: c.old_state,
        new_state: c.new_state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Notification, FieldError> {
        let j: EventJson =
            serde_json::from_str(json).map_err(|e| field_err("body", e.to_string()))?;
        j.to_notification(Timestamp(5), 1024)
    }

    #[test]
    fn a_minimal_event_takes_the_mapi_defaults() {
        let n = parse(r#"{"key":"a/inbox/m1","kind":"object_created","object_type":"message","parent":"a/inbox"}"#).unwrap();
        assert_eq!(n.timestamp, Timestamp(5));
        match n.event {
            Event::ObjectCreated(o) => {
                assert_eq!(o.object_type, ObjectType::Message);
                assert_eq!(o.parent, Some(Key::from("a/inbox")));
                assert!(o.changed_props.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fields_of_another_kind_are_refused_by_name() {
        let e = parse(r#"{"key":"a/m1","kind":"object_created","old_key":"b/m1"}"#).unwrap_err();
        assert_eq!(e.field, "old_key");
        let e = parse(r#"{"key":"a/m1","kind":"object_moved"}"#).unwrap_err();
        assert_eq!(e.field, "old_key");
        let e = parse(r#"{"key":"a/m1","kind":"nope"}"#).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = parse(r#"{"key":"a/m1","kind":"connection_state"}"#).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = parse(r#"{"key":"","kind":"object_created"}"#).unwrap_err();
        assert_eq!(e.field, "key");
        let e = parse(r#"{"key":"a//b","kind":"object_created"}"#).unwrap_err();
        assert_eq!(e.field, "key");
    }

    #[test]
    fn no_field_of_an_event_may_name_the_servers_own_space() {
        for (json, field) in [
            (
                r#"{"key":"$herald/presence/bob/ws-1","kind":"object_created"}"#,
                "key",
            ),
            (r#"{"key":"$herald","kind":"object_created"}"#, "key"),
            (
                r#"{"key":"a/m1","kind":"object_moved","old_key":"$herald/presence/bob/ws-1"}"#,
                "old_key",
            ),
            (
                r#"{"key":"a/m1","kind":"object_copied","old_key":"b/m1","old_parent":"$herald/presence/bob"}"#,
                "old_parent",
            ),
            (
                r#"{"key":"a/m1","kind":"object_created","parent":"$herald/presence"}"#,
                "parent",
            ),
            (
                r#"{"key":"a/m1","kind":"new_mail","parent":"$herald/x"}"#,
                "parent",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e.field, field, "{json}");
        }
        // A key that only starts with the same letters is a producer's.
        assert!(parse(r#"{"key":"$heraldic/m1","kind":"object_created"}"#).is_ok());
    }

    #[test]
    fn table_events_follow_the_presence_rules() {
        let n = parse(r#"{"key":"t","kind":"table_modified","table":{"event":"row_added","index":{"tag":267780354,"value":"AQI="},"row":[{"tag":3604511,"value":"Hello"}]}}"#).unwrap();
        let Event::TableModified(t) = &n.event else {
            panic!()
        };
        assert_eq!(t.prior.tag, herald_core::PR_NULL);
        assert_eq!(t.row[0].value, PropData::String("Hello".into()));
        let e = parse(r#"{"key":"t","kind":"table_modified","table":{"event":"reload","row":[]}}"#)
            .unwrap_err();
        assert_eq!(e.field, "table.row");
        let e = parse(r#"{"key":"t","kind":"table_modified","table":{"event":"row_added"}}"#)
            .unwrap_err();
        assert_eq!(e.field, "table.index");
        let e = parse(r#"{"key":"t","kind":"table_modified","table":{"event":"row_added","index":{"tag":3,"value":"x"}}}"#).unwrap_err();
        assert_eq!(e.field, "table.index.value");
    }

    #[test]
    fn new_mail_parent_defaults_to_the_key_parent() {
        let n = parse(r#"{"key":"a/inbox/m1","kind":"new_mail"}"#).unwrap();
        let Event::NewMail(m) = n.event else { panic!() };
        assert_eq!(m.parent, Key::from("a/inbox"));
        assert_eq!(m.message_class, "IPM.Note");
    }

    #[test]
    fn payloads_too_long_for_the_stack_and_keys_that_are_not_text_are_written_too() {
        for len in [0, 1, 767, 768, 769, 5000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let n = Notification::new(
                "a/b",
                Event::Extended(Extended {
                    event: 1,
                    data: data.clone().into(),
                }),
            );
            let v: serde_json::Value = serde_json::to_value(EventOut(&n)).unwrap();
            assert_eq!(B64.decode(v["data"].as_str().unwrap()).unwrap(), data);
        }
        let n = Notification::new(
            Key::new(vec![0xff, 0x01]),
            Event::ObjectCreated(ObjectChange::default()),
        );
        let v: serde_json::Value = serde_json::to_value(EventOut(&n)).unwrap();
        assert_eq!(v["key"], "0xff01");
    }

    proptest::proptest! {
        #[test]
        fn every_producible_event_round_trips_through_json(n in herald_testkit::arb::notification()) {
            proptest::prop_assume!(n.kind() != EventKind::ConnectionState);
            // JSON keys are text in path form.
            proptest::prop_assume!(n.key.as_str().is_some());
            let text = serde_json::to_string(&EventOut(&n)).unwrap();
            let back: EventJson = serde_json::from_str(&text).unwrap();
            let m = back.to_notification(Timestamp(0), 1 << 20).unwrap();
            // Floats go through f64 and text; compare the JSON forms.
            proptest::prop_assert_eq!(serde_json::to_string(&EventOut(&m)).unwrap(), text);
        }

        /// What a client receives reads back as the event the server sent, watermark and the
        /// server's own connection-state events included.
        #[test]
        fn every_delivered_event_reads_back_as_the_model(n in herald_testkit::arb::logged_notification()) {
            proptest::prop_assume!(n.key.as_str().is_some());
            let text = serde_json::to_string(&EventOut(&n)).unwrap();
            let back: EventJson = serde_json::from_str(&text).unwrap();
            let m = back.to_delivered().unwrap();
            proptest::prop_assert_eq!(m.watermark, n.watermark);
            proptest::prop_assert_eq!(m.kind(), n.kind());
            proptest::prop_assert_eq!(serde_json::to_string(&EventOut(&m)).unwrap(), text);
        }
    }
}
