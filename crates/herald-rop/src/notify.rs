//! RopNotify (0x2A) and its NotificationData (MS-OXCNOTIF 2.2.1.4.1.2), with the presence
//! rules of the spec in one place: [`Presence::of`]. Encoding refuses data whose fields do not
//! match the rules; decoding reads exactly the fields the flags call for.

use crate::ids::{Fid, GlobalId, Mid};
use crate::wire::{DecodeError, EncodeError, Put, Reader};

/// RopNotify's id.
pub const ROP_NOTIFY: u8 = 0x2A;

/// NotificationFlags bit: TotalMessageCount follows (ObjectModified only).
pub const FLAG_TOTAL: u16 = 0x1000;
/// NotificationFlags bit: UnreadMessageCount follows (ObjectModified only).
pub const FLAG_UNREAD: u16 = 0x2000;
/// NotificationFlags bit: the event comes from a search folder (requires [`FLAG_MESSAGE`]).
pub const FLAG_SEARCH: u16 = 0x4000;
/// NotificationFlags bit: the event concerns a message (clear: a folder).
pub const FLAG_MESSAGE: u16 = 0x8000;
/// The NotificationType part of NotificationFlags.
pub const TYPE_MASK: u16 = 0x0FFF;

/// The kinds of notification (the same values select them in RopRegisterNotification).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum NotificationType {
    /// A new message was delivered.
    NewMail = 0x0002,
    /// A folder or message was created.
    ObjectCreated = 0x0004,
    /// A folder or message was deleted.
    ObjectDeleted = 0x0008,
    /// A folder or message was modified.
    ObjectModified = 0x0010,
    /// A folder or message was moved.
    ObjectMoved = 0x0020,
    /// A folder or message was copied.
    ObjectCopied = 0x0040,
    /// A search completed.
    SearchComplete = 0x0080,
    /// A table changed.
    TableModified = 0x0100,
}

impl NotificationType {
    /// Every type RopNotify carries.
    pub const ALL: [NotificationType; 8] = [
        NotificationType::NewMail,
        NotificationType::ObjectCreated,
        NotificationType::ObjectDeleted,
        NotificationType::ObjectModified,
        NotificationType::ObjectMoved,
        NotificationType::ObjectCopied,
        NotificationType::SearchComplete,
        NotificationType::TableModified,
    ];

    /// The type with this value, if RopNotify may carry it.
    pub fn from_u16(v: u16) -> Option<Self> {
        NotificationType::ALL.into_iter().find(|t| *t as u16 == v)
    }
}

/// The properties that changed (`TagCount` and `Tags`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tags {
    /// Up to 0xFFFE property tags (Exchange 2013+ sends none for ObjectModified).
    List(Vec<u32>),
    /// `TagCount` 0xFFFF: the server does not say which properties changed.
    Unspecified,
}

/// Identifies a table row: its folder, and for message rows the message and instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowId {
    /// The folder id of the row (the folder itself in hierarchy tables).
    pub folder_id: Fid,
    /// For contents tables (the M flag): the message id and the row instance.
    pub message: Option<(Mid, u32)>,
}

/// An added or modified row, where it now sits, and its columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    /// The row.
    pub row: RowId,
    /// The row it now follows (folder id 0: it is first).
    pub after: RowId,
    /// A PropertyRow (MS-OXCDATA 2.8) over the table's columns, at most 0xFFFF bytes.
    pub data: Vec<u8>,
}

/// A table event (`TableEventType` and its fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableEvent {
    /// 0x0001: the table changed; re-read it.
    Changed,
    /// 0x0003: a row was added.
    RowAdded(RowChange),
    /// 0x0004: a row was deleted.
    RowDeleted(RowId),
    /// 0x0005: a row was modified.
    RowModified(RowChange),
    /// 0x0007: the restriction changed.
    RestrictionChanged,
}

impl TableEvent {
    /// The `TableEventType` value.
    pub fn code(&self) -> u16 {
        match self {
            TableEvent::Changed => 0x0001,
            TableEvent::RowAdded(_) => 0x0003,
            TableEvent::RowDeleted(_) => 0x0004,
            TableEvent::RowModified(_) => 0x0005,
            TableEvent::RestrictionChanged => 0x0007,
        }
    }
}

/// New mail's own fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMailInfo {
    /// A copy of the message's PidTagMessageFlags.
    pub message_flags: u32,
    /// Whether the message class travels as UTF-16LE (else 8-bit).
    pub unicode: bool,
    /// The message class, e.g. `IPM.Note`.
    pub message_class: String,
}

/// NotificationData: the flags and the fields they call for. Build it with the constructors
/// or by hand; [`NotificationData::validate`] says whether the fields match the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationData {
    /// The notification type.
    pub kind: NotificationType,
    /// M: about a message (clear: a folder).
    pub message: bool,
    /// S: from a search folder (requires M).
    pub search: bool,
    /// TableModified: the table event.
    pub table: Option<TableEvent>,
    /// The folder (or the message's folder).
    pub folder_id: Option<Fid>,
    /// The message.
    pub message_id: Option<Mid>,
    /// The parent folder (folder events; the search folder for search-folder messages).
    pub parent_folder_id: Option<Fid>,
    /// Moves and copies: the old folder id (of the object or of the message's folder).
    pub old_folder_id: Option<Fid>,
    /// Moves and copies of messages: the old message id.
    pub old_message_id: Option<Mid>,
    /// Moves and copies of folders: the old parent.
    pub old_parent_folder_id: Option<Fid>,
    /// Created and modified: the properties that changed.
    pub tags: Option<Tags>,
    /// Modified (T): the folder's total message count.
    pub total_count: Option<u32>,
    /// Modified (U): the folder's unread message count.
    pub unread_count: Option<u32>,
    /// New mail's fields.
    pub new_mail: Option<NewMailInfo>,
}

/// Which of NotificationData's fields a given type and flags call for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    /// `TableEventType` and the table fields.
    pub table: bool,
    /// `FolderId`.
    pub folder_id: bool,
    /// `MessageId`.
    pub message_id: bool,
    /// `ParentFolderId`.
    pub parent_folder_id: bool,
    /// `OldFolderId`.
    pub old_folder_id: bool,
    /// `OldMessageId`.
    pub old_message_id: bool,
    /// `OldParentFolderId`.
    pub old_parent_folder_id: bool,
    /// `TagCount` (and `Tags`).
    pub tags: bool,
    /// Whether the T and U flags (and their counts) may be set.
    pub counts_allowed: bool,
    /// `MessageFlags`, `UnicodeFlag`, `MessageClass`.
    pub new_mail: bool,
}

impl Presence {
    /// The rules of MS-OXCNOTIF 2.2.1.4.1.2 for a type and the M and S flags.
    pub fn of(kind: NotificationType, message: bool, search: bool) -> Presence {
        use NotificationType as T;
        let relocation = matches!(kind, T::ObjectMoved | T::ObjectCopied);
        let folder_id = kind != T::TableModified;
        Presence {
            table: kind == T::TableModified,
            folder_id,
            message_id: folder_id && message,
            parent_folder_id: matches!(
                kind,
                T::ObjectCreated | T::ObjectDeleted | T::ObjectMoved | T::ObjectCopied
            ) && search == message,
            old_folder_id: relocation,
            old_message_id: relocation && message,
            old_parent_folder_id: relocation && !message,
            tags: matches!(kind, T::ObjectCreated | T::ObjectModified),
            counts_allowed: kind == T::ObjectModified,
            new_mail: kind == T::NewMail,
        }
    }
}

fn check(present: bool, wanted: bool, field: &'static str) -> Result<(), EncodeError> {
    match (present, wanted) {
        (true, false) => Err(EncodeError {
            field,
            why: "present, but the flags say it is absent",
        }),
        (false, true) => Err(EncodeError {
            field,
            why: "absent, but the flags say it is present",
        }),
        _ => Ok(()),
    }
}

impl NotificationData {
    /// Data of this kind with no fields set.
    pub fn empty(kind: NotificationType, message: bool) -> Self {
        NotificationData {
            kind,
            message,
            search: false,
            table: None,
            folder_id: None,
            message_id: None,
            parent_folder_id: None,
            old_folder_id: None,
            old_message_id: None,
            old_parent_folder_id: None,
            tags: None,
            total_count: None,
            unread_count: None,
            new_mail: None,
        }
    }

    /// The NotificationFlags value.
    pub fn flags(&self) -> u16 {
        let mut f = self.kind as u16;
        if self.total_count.is_some() {
            f |= FLAG_TOTAL;
        }
        if self.unread_count.is_some() {
            f |= FLAG_UNREAD;
        }
        if self.search {
            f |= FLAG_SEARCH;
        }
        if self.message {
            f |= FLAG_MESSAGE;
        }
        f
    }

    /// Checks the fields against the presence rules.
    pub fn validate(&self) -> Result<(), EncodeError> {
        if self.search && !self.message {
            return Err(EncodeError {
                field: "NotificationFlags",
                why: "S without M",
            });
        }
        let p = Presence::of(self.kind, self.message, self.search);
        check(self.table.is_some(), p.table, "TableEventType")?;
        check(self.folder_id.is_some(), p.folder_id, "FolderId")?;
        check(self.message_id.is_some(), p.message_id, "MessageId")?;
        check(
            self.parent_folder_id.is_some(),
            p.parent_folder_id,
            "ParentFolderId",
        )?;
        check(self.old_folder_id.is_some(), p.old_folder_id, "OldFolderId")?;
        check(
            self.old_message_id.is_some(),
            p.old_message_id,
            "OldMessageId",
        )?;
        check(
            self.old_parent_folder_id.is_some(),
            p.old_parent_folder_id,
            "OldParentFolderId",
        )?;
        check(self.tags.is_some(), p.tags, "TagCount")?;
        if !p.counts_allowed {
            check(self.total_count.is_some(), false, "TotalMessageCount")?;
            check(self.unread_count.is_some(), false, "UnreadMessageCount")?;
        }
        check(self.new_mail.is_some(), p.new_mail, "MessageClass")?;
        if let Some(Tags::List(tags)) = &self.tags {
            if tags.len() >= 0xFFFF {
                return Err(EncodeError {
                    field: "TagCount",
                    why: "more than 0xFFFE tags",
                });
            }
        }
        if let Some(t) = &self.table {
            let row_ok = |r: &RowId| r.message.is_some() == self.message;
            match t {
                TableEvent::RowAdded(c) | TableEvent::RowModified(c) => {
                    if !row_ok(&c.row) || !row_ok(&c.after) {
                        return Err(EncodeError {
                            field: "TableRowMessageID",
                            why: "message row ids must be given exactly when M is set",
                        });
                    }
                    if c.data.len() > 0xFFFF {
                        return Err(EncodeError {
                            field: "TableRowData",
                            why: "longer than 0xFFFF bytes",
                        });
                    }
                }
                TableEvent::RowDeleted(r) if !row_ok(r) => {
                    return Err(EncodeError {
                        field: "TableRowMessageID",
                        why: "message row ids must be given exactly when M is set",
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Appends the wire form; fails if the fields do not match the flags.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.validate()?;
        out.put_u16(self.flags());
        if let Some(t) = &self.table {
            out.put_u16(t.code());
            let row = |out: &mut Vec<u8>, r: &RowId| {
                r.folder_id.write(out);
                if let Some((mid, instance)) = r.message {
                    mid.write(out);
                    out.put_u32(instance);
                }
            };
            match t {
                TableEvent::RowAdded(c) | TableEvent::RowModified(c) => {
                    row(out, &c.row);
                    row(out, &c.after);
                    out.put_u16(c.data.len() as u16);
                    out.put(&c.data);
                }
                TableEvent::RowDeleted(r) => row(out, r),
                TableEvent::Changed | TableEvent::RestrictionChanged => {}
            }
        }
        for id in [
            self.folder_id,
            self.message_id,
            self.parent_folder_id,
            self.old_folder_id,
            self.old_message_id,
            self.old_parent_folder_id,
        ]
        .into_iter()
        .flatten()
        {
            id.write(out);
        }
        match &self.tags {
            Some(Tags::List(tags)) => {
                out.put_u16(tags.len() as u16);
                for t in tags {
                    out.put_u32(*t);
                }
            }
            Some(Tags::Unspecified) => out.put_u16(0xFFFF),
            None => {}
        }
        if let Some(n) = self.total_count {
            out.put_u32(n);
        }
        if let Some(n) = self.unread_count {
            out.put_u32(n);
        }
        if let Some(m) = &self.new_mail {
            out.put_u32(m.message_flags);
            out.put_u8(u8::from(m.unicode));
            if m.unicode {
                out.put_utf16z(&m.message_class, "MessageClass")?;
            } else {
                out.put_asciiz(&m.message_class, "MessageClass")?;
            }
        }
        Ok(())
    }

    /// Reads NotificationData, exactly the fields its flags call for.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let at = r.offset();
        let flags = r.u16("NotificationFlags")?;
        let invalid = |why| DecodeError::Invalid {
            field: "NotificationFlags",
            offset: at,
            value: u64::from(flags),
            why,
        };
        let kind = NotificationType::from_u16(flags & TYPE_MASK)
            .ok_or_else(|| invalid("not one notification type RopNotify carries"))?;
        let message = flags & FLAG_MESSAGE != 0;
        let search = flags & FLAG_SEARCH != 0;
        if search && !message {
            return Err(invalid("S without M"));
        }
        let p = Presence::of(kind, message, search);
        if !p.counts_allowed && flags & (FLAG_TOTAL | FLAG_UNREAD) != 0 {
            return Err(invalid("T or U on a type other than ObjectModified"));
        }
        let mut d = NotificationData::empty(kind, message);
        d.search = search;
        if p.table {
            let at = r.offset();
            let code = r.u16("TableEventType")?;
            let row =
                |r: &mut Reader<'_>, fid: &'static str, mid: &'static str, inst: &'static str| {
                    let folder_id = GlobalId::read(r, fid)?;
                    let message = if message {
                        Some((GlobalId::read(r, mid)?, r.u32(inst)?))
                    } else {
                        None
                    };
                    Ok::<_, DecodeError>(RowId { folder_id, message })
                };
            let change = |r: &mut Reader<'_>| {
                let row_id = row(
                    r,
                    "TableRowFolderID",
                    "TableRowMessageID",
                    "TableRowInstance",
                )?;
                let after = row(
                    r,
                    "InsertAfterTableRowFolderID",
                    "InsertAfterTableRowID",
                    "InsertAfterTableRowInstance",
                )?;
                let n = r.u16("TableRowDataSize")?;
                let data = r.bytes(usize::from(n), "TableRowData")?.to_vec();
                Ok::<_, DecodeError>(RowChange {
                    row: row_id,
                    after,
                    data,
                })
            };
            d.table = Some(match code {
                0x0001 => TableEvent::Changed,
                0x0003 => TableEvent::RowAdded(change(r)?),
                0x0004 => TableEvent::RowDeleted(row(
                    r,
                    "TableRowFolderID",
                    "TableRowMessageID",
                    "TableRowInstance",
                )?),
                0x0005 => TableEvent::RowModified(change(r)?),
                0x0007 => TableEvent::RestrictionChanged,
                other => {
                    return Err(DecodeError::Invalid {
                        field: "TableEventType",
                        offset: at,
                        value: u64::from(other),
                        why: "not a table event sent on the wire (1, 3, 4, 5, 7)",
                    });
                }
            });
        }
        let id =
            |r: &mut Reader<'_>, on: bool, field| on.then(|| GlobalId::read(r, field)).transpose();
        d.folder_id = id(r, p.folder_id, "FolderId")?;
        d.message_id = id(r, p.message_id, "MessageId")?;
        d.parent_folder_id = id(r, p.parent_folder_id, "ParentFolderId")?;
        d.old_folder_id = id(r, p.old_folder_id, "OldFolderId")?;
        d.old_message_id = id(r, p.old_message_id, "OldMessageId")?;
        d.old_parent_folder_id = id(r, p.old_parent_folder_id, "OldParentFolderId")?;
        if p.tags {
            let count = r.u16("TagCount")?;
            d.tags = Some(if count == 0xFFFF {
                Tags::Unspecified
            } else {
                // Checked against what is left before anything is allocated.
                let raw = r.bytes(usize::from(count) * 4, "Tags")?;
                Tags::List(
                    raw.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            });
        }
        if flags & FLAG_TOTAL != 0 {
            d.total_count = Some(r.u32("TotalMessageCount")?);
        }
        if flags & FLAG_UNREAD != 0 {
            d.unread_count = Some(r.u32("UnreadMessageCount")?);
        }
        if p.new_mail {
            let message_flags = r.u32("MessageFlags")?;
            let at = r.offset();
            let unicode = match r.u8("UnicodeFlag")? {
                0 => false,
                1 => true,
                v => {
                    return Err(DecodeError::Invalid {
                        field: "UnicodeFlag",
                        offset: at,
                        value: u64::from(v),
                        why: "must be 0 or 1",
                    });
                }
            };
            let message_class = if unicode {
                r.utf16z("MessageClass")?
            } else {
                r.asciiz("MessageClass")?
            };
            d.new_mail = Some(NewMailInfo {
                message_flags,
                unicode,
                message_class,
            });
        }
        Ok(d)
    }
}

/// RopNotify: a notification for one subscription (or table) handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RopNotify {
    /// The server object handle of the subscription or table (not an index).
    pub handle: u32,
    /// The logon it belongs to.
    pub logon_id: u8,
    /// What happened.
    pub data: NotificationData,
}

impl RopNotify {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut body = Vec::with_capacity(32);
        self.data.encode(&mut body)?;
        out.put_u8(ROP_NOTIFY);
        out.put_u32(self.handle);
        out.put_u8(self.logon_id);
        out.put(&body);
        Ok(())
    }

    /// The wire form as a new vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }

    /// Reads a RopNotify, its RopId included.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let at = r.offset();
        let id = r.u8("RopId")?;
        if id != ROP_NOTIFY {
            return Err(DecodeError::Invalid {
                field: "RopId",
                offset: at,
                value: u64::from(id),
                why: "not RopNotify (0x2A)",
            });
        }
        Ok(RopNotify {
            handle: r.u32("NotificationHandle")?,
            logon_id: r.u8("LogonId")?,
            data: NotificationData::decode(r)?,
        })
    }
}
