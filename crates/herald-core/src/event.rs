//! The event model: one [`Notification`] per event, covering every MAPI notification kind.
//!
//! Field names follow MAPI's `NOTIFICATION` union (see the MAPI digest §3). Entry ids are
//! [`Key`]s. Fields that do not apply to a kind are absent by construction (a plain object
//! change has no old key; only a [`Relocation`] does), which is MAPI's "zero all unused members"
//! made structural.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::key::Key;

/// A position in the event log. Watermarks increase strictly within one log and are never
/// reused; resuming "after W" yields every later event exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Watermark(pub u64);

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Microseconds since the Unix epoch, when the event happened (as the producer saw it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(0);
        Timestamp(micros)
    }
}

/// The kind of an event. The discriminants are MAPI's `fnev*` event-mask bits; connection state
/// is Herald's own bit, outside the range MAPI defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u32)]
pub enum EventKind {
    /// `fnevCriticalError`: a serious error, such as a store going away.
    CriticalError = 0x0000_0001,
    /// `fnevNewMail`: a message arrived in a receive folder.
    NewMail = 0x0000_0002,
    /// `fnevObjectCreated`.
    ObjectCreated = 0x0000_0004,
    /// `fnevObjectDeleted`.
    ObjectDeleted = 0x0000_0008,
    /// `fnevObjectModified`.
    ObjectModified = 0x0000_0010,
    /// `fnevObjectMoved`: carries the old key and old parent.
    ObjectMoved = 0x0000_0020,
    /// `fnevObjectCopied`: carries the key copied from and its parent.
    ObjectCopied = 0x0000_0040,
    /// `fnevSearchComplete`: the first pass of a search folder finished.
    SearchComplete = 0x0000_0080,
    /// `fnevTableModified`: a row or the whole of a table changed.
    TableModified = 0x0000_0100,
    /// `fnevStatusObjectModified`: a status object's properties changed.
    StatusObjectModified = 0x0000_0200,
    /// Herald's connection-state change (the Offline State API's notification).
    ConnectionState = 0x0000_0400,
    /// `fnevExtended`: a provider-defined event.
    Extended = 0x8000_0000,
}

impl EventKind {
    /// Every kind, in mask-bit order.
    pub const ALL: [EventKind; 12] = [
        EventKind::CriticalError,
        EventKind::NewMail,
        EventKind::ObjectCreated,
        EventKind::ObjectDeleted,
        EventKind::ObjectModified,
        EventKind::ObjectMoved,
        EventKind::ObjectCopied,
        EventKind::SearchComplete,
        EventKind::TableModified,
        EventKind::StatusObjectModified,
        EventKind::ConnectionState,
        EventKind::Extended,
    ];

    /// The kind's event-mask bit.
    pub const fn bit(self) -> u32 {
        self as u32
    }

    /// The kind's snake-case name, as the JSON API spells it (`new_mail`, `object_moved`, …).
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::CriticalError => "critical_error",
            EventKind::NewMail => "new_mail",
            EventKind::ObjectCreated => "object_created",
            EventKind::ObjectDeleted => "object_deleted",
            EventKind::ObjectModified => "object_modified",
            EventKind::ObjectMoved => "object_moved",
            EventKind::ObjectCopied => "object_copied",
            EventKind::SearchComplete => "search_complete",
            EventKind::TableModified => "table_modified",
            EventKind::StatusObjectModified => "status_object_modified",
            EventKind::ConnectionState => "connection_state",
            EventKind::Extended => "extended",
        }
    }

    /// The kind named `name` (see [`EventKind::name`]).
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of event kinds, with MAPI's numeric mask values.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EventMask(u32);

impl EventMask {
    /// No kinds. The hub refuses a subscription with an empty mask.
    pub const NONE: EventMask = EventMask(0);
    /// Every kind Herald knows.
    pub const ALL: EventMask = EventMask(
        EventKind::CriticalError.bit()
            | EventKind::NewMail.bit()
            | EventKind::ObjectCreated.bit()
            | EventKind::ObjectDeleted.bit()
            | EventKind::ObjectModified.bit()
            | EventKind::ObjectMoved.bit()
            | EventKind::ObjectCopied.bit()
            | EventKind::SearchComplete.bit()
            | EventKind::TableModified.bit()
            | EventKind::StatusObjectModified.bit()
            | EventKind::ConnectionState.bit()
            | EventKind::Extended.bit(),
    );

    /// A mask from MAPI's numeric value; bits Herald does not know are kept but match nothing.
    pub const fn from_bits(bits: u32) -> Self {
        EventMask(bits)
    }

    /// The numeric value.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether `kind` is selected.
    pub const fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Whether no known kind is selected.
    pub const fn is_empty(self) -> bool {
        self.0 & Self::ALL.0 == 0
    }

    /// This mask with `kind` added.
    pub const fn with(self, kind: EventKind) -> Self {
        EventMask(self.0 | kind.bit())
    }
}

impl From<EventKind> for EventMask {
    fn from(kind: EventKind) -> Self {
        EventMask(kind.bit())
    }
}

impl FromIterator<EventKind> for EventMask {
    fn from_iter<I: IntoIterator<Item = EventKind>>(iter: I) -> Self {
        iter.into_iter().fold(EventMask::NONE, EventMask::with)
    }
}

impl std::ops::BitOr for EventMask {
    type Output = EventMask;
    fn bitor(self, rhs: EventMask) -> EventMask {
        EventMask(self.0 | rhs.0)
    }
}

impl std::ops::BitOr<EventKind> for EventMask {
    type Output = EventMask;
    fn bitor(self, rhs: EventKind) -> EventMask {
        self.with(rhs)
    }
}

impl std::ops::BitOr for EventKind {
    type Output = EventMask;
    fn bitor(self, rhs: EventKind) -> EventMask {
        EventMask::from(self).with(rhs)
    }
}

impl fmt::Debug for EventMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = EventKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(EventKind::name)
            .collect();
        write!(f, "EventMask({:#010x}: {})", self.0, names.join("|"))
    }
}

/// MAPI object types (`ulObjType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u32)]
pub enum ObjectType {
    /// Unknown or not applicable (MAPI's zero).
    #[default]
    Unspecified = 0,
    /// `MAPI_STORE`.
    Store = 1,
    /// `MAPI_ADDRBOOK`.
    AddressBook = 2,
    /// `MAPI_FOLDER`.
    Folder = 3,
    /// `MAPI_ABCONT`.
    AddressBookContainer = 4,
    /// `MAPI_MESSAGE`.
    Message = 5,
    /// `MAPI_MAILUSER`.
    MailUser = 6,
    /// `MAPI_ATTACH`.
    Attachment = 7,
    /// `MAPI_DISTLIST`.
    DistList = 8,
    /// `MAPI_PROFSECT`.
    ProfileSection = 9,
    /// `MAPI_STATUS`.
    Status = 10,
    /// `MAPI_SESSION`.
    Session = 11,
    /// `MAPI_FORMINFO`.
    FormInfo = 12,
}

impl ObjectType {
    /// The object type with MAPI's numeric value `v`.
    pub fn from_u32(v: u32) -> Option<ObjectType> {
        use ObjectType::*;
        [
            Unspecified,
            Store,
            AddressBook,
            Folder,
            AddressBookContainer,
            Message,
            MailUser,
            Attachment,
            DistList,
            ProfileSection,
            Status,
            Session,
            FormInfo,
        ]
        .into_iter()
        .find(|t| *t as u32 == v)
    }
}

/// A MAPI property tag: the property id in the high 16 bits, its type in the low 16.
pub type PropTag = u32;

/// `PR_NULL`: the tag of "no property" (`PT_NULL` with id 0). A table event on the first row
/// has this as its prior-row tag, never 0.
pub const PR_NULL: PropTag = 0x0000_0001;

/// `PR_INSTANCE_KEY`, the property that identifies a table row.
pub const PR_INSTANCE_KEY: PropTag = 0x0FF6_0102;

/// A property value (MAPI's `SPropValue`), as carried in table rows and status objects.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PropValue {
    /// The property tag.
    pub tag: PropTag,
    /// The value.
    pub value: PropData,
}

impl PropValue {
    /// The `PR_NULL` placeholder value.
    pub const fn null() -> Self {
        PropValue {
            tag: PR_NULL,
            value: PropData::Null,
        }
    }

    /// A `PR_INSTANCE_KEY` value, the usual row index.
    pub fn instance_key(bytes: impl Into<Bytes>) -> Self {
        PropValue {
            tag: PR_INSTANCE_KEY,
            value: PropData::Binary(bytes.into()),
        }
    }
}

/// The data of a property value, by MAPI property type.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PropData {
    /// `PT_NULL`.
    Null,
    /// `PT_SHORT`.
    I16(i16),
    /// `PT_LONG`.
    I32(i32),
    /// `PT_I8`.
    I64(i64),
    /// `PT_FLOAT`.
    F32(f32),
    /// `PT_DOUBLE`.
    F64(f64),
    /// `PT_BOOLEAN`.
    Bool(bool),
    /// `PT_SYSTIME`, as a Windows FILETIME (100 ns ticks since 1601).
    SysTime(u64),
    /// `PT_UNICODE` or `PT_STRING8`.
    String(String),
    /// `PT_BINARY`.
    Binary(Bytes),
    /// `PT_CLSID`.
    Guid([u8; 16]),
    /// `PT_ERROR`: the property could not be read; the SCODE says why.
    Error(u32),
    /// `PT_MV_LONG`.
    MultiI32(Vec<i32>),
    /// `PT_MV_UNICODE` or `PT_MV_STRING8`.
    MultiString(Vec<String>),
    /// `PT_MV_BINARY`.
    MultiBinary(Vec<Bytes>),
}

/// One event, as delivered to a sink.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Notification {
    /// The notification key: which object the event is about. Subscribers of this key (or of a
    /// subtree containing it) receive the event.
    pub key: Key,
    /// When the event happened.
    pub timestamp: Timestamp,
    /// The event's position in the log; `None` until it has been logged.
    pub watermark: Option<Watermark>,
    /// What happened, with the kind's own fields.
    pub event: Event,
}

impl Notification {
    /// A notification of `event` on `key`, timestamped now and not yet logged.
    pub fn new(key: impl Into<Key>, event: Event) -> Self {
        Notification {
            key: key.into(),
            timestamp: Timestamp::now(),
            watermark: None,
            event,
        }
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        self.event.kind()
    }

    /// The key the object had before a move or copy; `None` for every other kind.
    pub fn old_key(&self) -> Option<&Key> {
        match &self.event {
            Event::ObjectMoved(r) | Event::ObjectCopied(r) => Some(&r.old_key),
            _ => None,
        }
    }

    /// The folder the object is in: the parent the event names (new mail, object changes),
    /// else its key's parent in path form. A [`crate::Scope::Children`] subscription of that
    /// folder selects the event.
    pub fn parent(&self) -> Option<Key> {
        let named = match &self.event {
            Event::NewMail(m) => Some(&m.parent),
            Event::ObjectCreated(o)
            | Event::ObjectDeleted(o)
            | Event::ObjectModified(o)
            | Event::SearchComplete(o) => o.parent.as_ref(),
            Event::ObjectMoved(r) | Event::ObjectCopied(r) => r.object.parent.as_ref(),
            _ => None,
        };
        named.cloned().or_else(|| self.key.parent())
    }

    /// The folder a moved or copied object was in: the old parent the event names, else its
    /// old key's parent in path form; `None` for every other kind.
    pub fn old_parent(&self) -> Option<Key> {
        match &self.event {
            Event::ObjectMoved(r) | Event::ObjectCopied(r) => {
                r.old_parent.clone().or_else(|| r.old_key.parent())
            }
            _ => None,
        }
    }

    /// Checks MAPI's presence rules that the types alone cannot enforce.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        if self.key.is_empty() {
            return Err(InvalidEvent::EmptyKey);
        }
        match &self.event {
            Event::ObjectMoved(r) | Event::ObjectCopied(r) if r.old_key.is_empty() => {
                Err(InvalidEvent::EmptyOldKey)
            }
            Event::TableModified(t) => t.validate(),
            _ => Ok(()),
        }
    }
}

/// Why an event breaks the model's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEvent {
    /// The notification key is empty.
    #[error("the notification key is empty")]
    EmptyKey,
    /// A move or copy has an empty old key.
    #[error("a moved or copied object needs its old key")]
    EmptyOldKey,
    /// A table event names its prior row with tag 0; the first row's prior is `PR_NULL`.
    #[error("prior-row tag 0 is invalid; the first row's prior is PR_NULL (0x00000001)")]
    PriorTagZero,
    /// A table event that carries no row data has a row.
    #[error("table event {0:?} carries no row data but a row was given")]
    UnexpectedRow(TableEvent),
}

/// What happened, with the fields of that kind of event.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Event {
    /// `fnevCriticalError` (`ERROR_NOTIFICATION`).
    CriticalError(CriticalError),
    /// `fnevNewMail` (`NEWMAIL_NOTIFICATION`).
    NewMail(NewMail),
    /// `fnevObjectCreated`.
    ObjectCreated(ObjectChange),
    /// `fnevObjectDeleted`.
    ObjectDeleted(ObjectChange),
    /// `fnevObjectModified`.
    ObjectModified(ObjectChange),
    /// `fnevObjectMoved`: the notification key is the new key.
    ObjectMoved(Relocation),
    /// `fnevObjectCopied`: the notification key is the copy's key.
    ObjectCopied(Relocation),
    /// `fnevSearchComplete`: the notification key is the search folder.
    SearchComplete(ObjectChange),
    /// `fnevTableModified` (`TABLE_NOTIFICATION`).
    TableModified(TableChange),
    /// `fnevStatusObjectModified` (`STATUS_OBJECT_NOTIFICATION`).
    StatusObjectModified(StatusObjectChange),
    /// A connection's state changed (`MAPIOFFLINE_NOTIFY`).
    ConnectionState(ConnectionStateChange),
    /// `fnevExtended` (`EXTENDED_NOTIFICATION`).
    Extended(Extended),
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::CriticalError(_) => EventKind::CriticalError,
            Event::NewMail(_) => EventKind::NewMail,
            Event::ObjectCreated(_) => EventKind::ObjectCreated,
            Event::ObjectDeleted(_) => EventKind::ObjectDeleted,
            Event::ObjectModified(_) => EventKind::ObjectModified,
            Event::ObjectMoved(_) => EventKind::ObjectMoved,
            Event::ObjectCopied(_) => EventKind::ObjectCopied,
            Event::SearchComplete(_) => EventKind::SearchComplete,
            Event::TableModified(_) => EventKind::TableModified,
            Event::StatusObjectModified(_) => EventKind::StatusObjectModified,
            Event::ConnectionState(_) => EventKind::ConnectionState,
            Event::Extended(_) => EventKind::Extended,
        }
    }
}

/// `ERROR_NOTIFICATION` with its `MAPIERROR`.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CriticalError {
    /// The error's SCODE.
    pub scode: u32,
    /// `lpszError`: a description, if the source gave one.
    pub message: Option<String>,
    /// `lpszComponent`: the component that failed.
    pub component: Option<String>,
    /// `ulLowLevelError`.
    pub low_level_error: u32,
    /// `ulContext`.
    pub context: u32,
}

/// `NEWMAIL_NOTIFICATION`: the notification key is the new message.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NewMail {
    /// The receive folder the message arrived in.
    pub parent: Key,
    /// The message class (`IPM.Note`, …).
    pub message_class: String,
    /// A copy of the message's `PR_MESSAGE_FLAGS`.
    pub message_flags: u32,
}

/// `OBJECT_NOTIFICATION` for created, deleted, modified and search-complete events.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ObjectChange {
    /// The object's type.
    pub object_type: ObjectType,
    /// The parent folder's key, if known.
    pub parent: Option<Key>,
    /// The properties that changed (`lpPropTagArray`); empty when not known.
    pub changed_props: Vec<PropTag>,
    /// A folder's total item count after the change, when the producer knows it.
    pub total_count: Option<u32>,
    /// A folder's unread item count after the change, when the producer knows it.
    pub unread_count: Option<u32>,
}

/// `OBJECT_NOTIFICATION` for moved and copied events, the only ones with old ids.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Relocation {
    /// The object as it is now; its key is the notification key.
    pub object: ObjectChange,
    /// The key the object had before (`lpOldID`).
    pub old_key: Key,
    /// The parent it had before (`lpOldParentID`).
    pub old_parent: Option<Key>,
}

/// `ulTableEvent`: enumerated values, not flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u32)]
pub enum TableEvent {
    /// `TABLE_CHANGED`: re-read the table; instance keys and bookmarks stay valid.
    Changed = 1,
    /// `TABLE_ERROR`: the contents are unreliable; `hresult` says why.
    Error = 2,
    /// `TABLE_ROW_ADDED`.
    RowAdded = 3,
    /// `TABLE_ROW_DELETED`.
    RowDeleted = 4,
    /// `TABLE_ROW_MODIFIED`.
    RowModified = 5,
    /// `TABLE_SORT_DONE`.
    SortDone = 6,
    /// `TABLE_RESTRICT_DONE`.
    RestrictDone = 7,
    /// `TABLE_SETCOL_DONE`.
    SetColDone = 8,
    /// `TABLE_RELOAD`: nothing about the table stays valid.
    Reload = 9,
}

impl TableEvent {
    /// Whether events of this kind carry a row (`row`, `index`, `prior`).
    pub const fn has_row(self) -> bool {
        matches!(
            self,
            TableEvent::RowAdded | TableEvent::RowModified | TableEvent::RowDeleted
        )
    }

    /// The table event with MAPI's numeric value `v`.
    pub fn from_u32(v: u32) -> Option<TableEvent> {
        use TableEvent::*;
        [
            Changed,
            Error,
            RowAdded,
            RowDeleted,
            RowModified,
            SortDone,
            RestrictDone,
            SetColDone,
            Reload,
        ]
        .into_iter()
        .find(|t| *t as u32 == v)
    }
}

/// `TABLE_NOTIFICATION`. Build it with the constructors, which apply MAPI's presence rules.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TableChange {
    /// Which table event.
    pub event: TableEvent,
    /// For [`TableEvent::Error`], the error's HRESULT; otherwise 0.
    pub hresult: u32,
    /// The affected row's `PR_INSTANCE_KEY`; `PR_NULL` when there is no row.
    pub index: PropValue,
    /// The row before the affected one; `PR_NULL` when the affected row is first.
    pub prior: PropValue,
    /// The row's columns, in the column set in force when the event was made; empty for
    /// events without row data.
    pub row: Vec<PropValue>,
}

impl TableChange {
    /// An event without row data (`TABLE_CHANGED`, `TABLE_RELOAD`, `*_DONE`).
    pub fn without_row(event: TableEvent) -> Self {
        TableChange {
            event,
            hresult: 0,
            index: PropValue::null(),
            prior: PropValue::null(),
            row: Vec::new(),
        }
    }

    /// `TABLE_ERROR` with its HRESULT.
    pub fn error(hresult: u32) -> Self {
        TableChange {
            hresult,
            ..TableChange::without_row(TableEvent::Error)
        }
    }

    /// `TABLE_ROW_ADDED`; `prior` is `None` when the row is first (it becomes `PR_NULL`).
    pub fn row_added(index: PropValue, prior: Option<PropValue>, row: Vec<PropValue>) -> Self {
        TableChange {
            event: TableEvent::RowAdded,
            hresult: 0,
            index,
            prior: prior.unwrap_or_else(PropValue::null),
            row,
        }
    }

    /// `TABLE_ROW_MODIFIED`; `prior` is `None` when the row is first.
    pub fn row_modified(index: PropValue, prior: Option<PropValue>, row: Vec<PropValue>) -> Self {
        TableChange {
            event: TableEvent::RowModified,
            ..TableChange::row_added(index, prior, row)
        }
    }

    /// `TABLE_ROW_DELETED`: only the index of the row that went away.
    pub fn row_deleted(index: PropValue) -> Self {
        TableChange {
            event: TableEvent::RowDeleted,
            hresult: 0,
            index,
            prior: PropValue::null(),
            row: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), InvalidEvent> {
        if self.prior.tag == 0 || self.index.tag == 0 {
            return Err(InvalidEvent::PriorTagZero);
        }
        if !self.event.has_row() && !self.row.is_empty() {
            return Err(InvalidEvent::UnexpectedRow(self.event));
        }
        Ok(())
    }
}

/// `STATUS_OBJECT_NOTIFICATION`: the notification key is the status object.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StatusObjectChange {
    /// The properties that changed, with their new values.
    pub props: Vec<PropValue>,
}

/// `MAPIOFFLINE_NOTIFY_TYPE`: where in a state transition a notification comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u32)]
pub enum StateChangePhase {
    /// `MAPIOFFLINE_NOTIFY_TYPE_STATECHANGE_START`: the state is about to change.
    Start = 1,
    /// `MAPIOFFLINE_NOTIFY_TYPE_STATECHANGE`: the state is changing.
    Change = 2,
    /// `MAPIOFFLINE_NOTIFY_TYPE_STATECHANGE_DONE`: the change is complete.
    Done = 3,
}

/// `MAPIOFFLINE_STATE_OFFLINE_MASK`: the part of the state that says online or offline.
pub const STATE_OFFLINE_MASK: u32 = 0x0000_0003;
/// `MAPIOFFLINE_STATE_OFFLINE`.
pub const STATE_OFFLINE: u32 = 0x0000_0001;
/// `MAPIOFFLINE_STATE_ONLINE`.
pub const STATE_ONLINE: u32 = 0x0000_0002;

/// `MAPIOFFLINE_NOTIFY`: a connection went online or offline.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ConnectionStateChange {
    /// Which phase of the transition this is.
    pub phase: StateChangePhase,
    /// The token the client chose when it advised, echoed back.
    pub client_token: u32,
    /// Which part of the state changed; [`STATE_OFFLINE_MASK`] for online/offline.
    pub changed_mask: u32,
    /// The state before.
    pub old_state: u32,
    /// The state after.
    pub new_state: u32,
}

/// `EXTENDED_NOTIFICATION`: a provider-defined event code with opaque parameters.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Extended {
    /// `ulEvent`: the provider's event code.
    pub event: u32,
    /// `pbEventParameters`.
    pub data: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_are_mapi_values() {
        assert_eq!(EventKind::NewMail.bit(), 0x2);
        assert_eq!(EventKind::TableModified.bit(), 0x100);
        assert_eq!(EventKind::Extended.bit(), 0x8000_0000);
        let m = EventKind::ObjectCreated | EventKind::ObjectDeleted;
        assert_eq!(m.bits(), 0xC);
        assert!(m.contains(EventKind::ObjectCreated));
        assert!(!m.contains(EventKind::NewMail));
    }

    #[test]
    fn unknown_mask_bits_select_nothing() {
        let m = EventMask::from_bits(0x4000_0000);
        assert!(m.is_empty());
        assert!(EventKind::ALL.iter().all(|k| !m.contains(*k)));
    }

    #[test]
    fn kind_names_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
        assert_eq!(EventKind::from_name("nope"), None);
    }

    #[test]
    fn only_moves_and_copies_have_an_old_key() {
        let moved = Notification::new(
            "a/new",
            Event::ObjectMoved(Relocation {
                old_key: Key::from("a/old"),
                ..Default::default()
            }),
        );
        assert_eq!(moved.old_key(), Some(&Key::from("a/old")));
        let modified = Notification::new("a/x", Event::ObjectModified(ObjectChange::default()));
        assert_eq!(modified.old_key(), None);
    }

    #[test]
    fn numeric_enums_round_trip() {
        for v in 0..=12 {
            assert_eq!(ObjectType::from_u32(v).map(|t| t as u32), Some(v));
        }
        for v in 1..=9 {
            assert_eq!(TableEvent::from_u32(v).map(|t| t as u32), Some(v));
        }
        assert_eq!(TableEvent::from_u32(0), None);
    }
}
