//! How Herald's model appears to a MAPI client: folder and message ids for keys, the special
//! folders of a logon, and the one table from Herald event kinds to NotificationData.
//!
//! | Herald kind | NotificationData | ids |
//! |---|---|---|
//! | `new_mail` | NewMail, M | FolderId = parent, MessageId = key; class 8-bit when Latin-1, else UTF-16 |
//! | `object_created` | ObjectCreated | folder: FolderId = key, ParentFolderId = parent; message (M): FolderId = parent, MessageId = key; tags = changed props |
//! | `object_deleted` | ObjectDeleted | as created, no tags |
//! | `object_modified` | ObjectModified | as created without ParentFolderId, TagCount 0 (the spec's SHOULD); T/U from total and unread counts (folders) |
//! | `object_moved`, `object_copied` | ObjectMoved, ObjectCopied | folder: + OldFolderId = old key, OldParentFolderId; message: + OldFolderId = old parent, OldMessageId = old key |
//! | `search_complete` | SearchComplete | FolderId = key |
//! | `table_modified` | TableModified (M for contents tables) | the event's key is the table's folder; rows as below; sent to registrations whose types include TableModified |
//! | `status_object_modified`, `critical_error`, `extended`, `connection_state` | — | RopNotify has no form for them (0x0400 is reserved, 0x0001 historical) |
//!
//! Table rows: a row's `PR_INSTANCE_KEY` (and its prior row's) names the row's object by its
//! key (the bytes of a binary or string value; a number in decimal). A row whose object is a
//! folder Herald knows is a hierarchy-table row (FolderId = its id, no M); any other is a
//! contents-table row (FolderId = the table's folder, MessageId = its id, instance 0). A
//! first row's prior (`PR_NULL`) is the zero row. Row data is a PropertyRow (MS-OXCDATA
//! 2.8.1) of the event's columns in the order given. `restrict_done` is
//! TableRestrictionChanged; `sort_done`, `setcol_done`, `reload` and `error`, which the wire
//! has no code for, are TableChanged (re-read the table), and so is a row event whose row
//! data cannot be encoded (a string 8-bit cannot carry, over 0xFFFF bytes): the spec's basic
//! level, which clients must handle.
//!
//! Objects whose `object_type` is `folder` or `store` are folders; all others are messages.
//! Ids are replica 1 and the first 48 bits of SHA-256 of the key: stable across sessions and
//! restarts. A folder id is resolved back to its key only if Herald has seen the key (logon
//! folders, folders named by events); others are `ecNotFound` on RopOpenFolder.

use std::collections::HashMap;
use std::sync::Mutex;

use herald_core::{
    Event, Key, Notification, ObjectChange, ObjectType, PropData, PropValue, TableChange,
};
use herald_rop::{
    Fid, GlobalId, Mid, NewMailInfo, NotificationData, NotificationType, Put, RowChange, RowId,
    Tags,
};
use sha2::{Digest, Sha256};

/// The replica id of every Herald id.
pub const REPLICA: u16 = 1;

/// Most folder keys remembered for RopOpenFolder.
const MAX_KNOWN: usize = 1 << 20;

/// The logon folders in RopLogon's order, as folder names under the mailbox (`""` is the
/// mailbox itself).
pub const LOGON_FOLDERS: [&str; 13] = [
    "",
    "deferredaction",
    "spoolerqueue",
    "msgfolderroot",
    "inbox",
    "outbox",
    "sentitems",
    "deleteditems",
    "commonviews",
    "schedule",
    "searchfolders",
    "views",
    "shortcuts",
];

/// The id of a key.
pub fn id_of(key: &Key) -> GlobalId {
    let h = Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&h[..6]);
    let counter = u64::from_be_bytes(b).max(1);
    GlobalId::new(REPLICA, counter)
}

/// Folder ids Herald can resolve back to keys.
#[derive(Default)]
pub struct KnownFolders(Mutex<HashMap<GlobalId, Key>>);

impl KnownFolders {
    /// The id of a folder key, remembered for [`KnownFolders::key_of`].
    pub fn fid(&self, key: &Key) -> Fid {
        let id = id_of(key);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < MAX_KNOWN {
            m.entry(id).or_insert_with(|| key.clone());
        }
        id
    }

    /// The key of a folder id, if known.
    pub fn key_of(&self, fid: Fid) -> Option<Key> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fid)
            .cloned()
    }

    /// Whether `key` is a folder Herald has named (a logon folder, a folder an event named).
    pub fn is_folder(&self, key: &Key) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id_of(key))
            .is_some_and(|k| k == key)
    }

    /// The 13 logon folders of a mailbox, remembered.
    pub fn logon_folders(&self, mailbox: &str) -> [Fid; 13] {
        LOGON_FOLDERS.map(|name| {
            let key = if name.is_empty() {
                Key::from(mailbox)
            } else {
                Key::from(format!("{mailbox}/{name}"))
            };
            self.fid(&key)
        })
    }
}

fn is_folder(t: ObjectType) -> bool {
    matches!(t, ObjectType::Folder | ObjectType::Store)
}

/// The folder the event's object is in (the engine's reading); a one-segment key is its
/// own folder.
fn parent(n: &Notification) -> Key {
    n.parent().unwrap_or_else(|| n.key.clone())
}

fn tags(o: &ObjectChange) -> Tags {
    Tags::List(o.changed_props.iter().take(0xFFFE).copied().collect())
}

/// The NotificationData for a Herald event (see the table above), or `None` when RopNotify
/// cannot carry it.
pub fn to_notification_data(n: &Notification, known: &KnownFolders) -> Option<NotificationData> {
    let mid = |k: &Key| -> Mid { id_of(k) };
    Some(match &n.event {
        Event::NewMail(m) => {
            let mut d = NotificationData::empty(NotificationType::NewMail, true);
            d.folder_id = Some(known.fid(&m.parent));
            d.message_id = Some(mid(&n.key));
            let latin1 = m
                .message_class
                .chars()
                .all(|c| u32::from(c) < 256 && c != '\0');
            d.new_mail = Some(NewMailInfo {
                message_flags: m.message_flags,
                unicode: !latin1,
                message_class: m.message_class.replace('\0', ""),
            });
            d
        }
        Event::ObjectCreated(o) | Event::ObjectDeleted(o) | Event::ObjectModified(o) => {
            let kind = match &n.event {
                Event::ObjectCreated(_) => NotificationType::ObjectCreated,
                Event::ObjectDeleted(_) => NotificationType::ObjectDeleted,
                _ => NotificationType::ObjectModified,
            };
            let folder = is_folder(o.object_type);
            let mut d = NotificationData::empty(kind, !folder);
            if folder {
                d.folder_id = Some(known.fid(&n.key));
                if kind != NotificationType::ObjectModified {
                    d.parent_folder_id = Some(known.fid(&parent(n)));
                }
            } else {
                d.folder_id = Some(known.fid(&parent(n)));
                d.message_id = Some(mid(&n.key));
            }
            match kind {
                NotificationType::ObjectCreated => d.tags = Some(tags(o)),
                // MS-OXCNOTIF: for ObjectModified TagCount SHOULD be 0 (as Exchange 2013 on);
                // the changed properties still travel in the JSON form.
                NotificationType::ObjectModified => d.tags = Some(Tags::List(Vec::new())),
                _ => {}
            }
            if kind == NotificationType::ObjectModified {
                d.total_count = o.total_count;
                d.unread_count = o.unread_count;
            }
            d
        }
        Event::ObjectMoved(r) | Event::ObjectCopied(r) => {
            let kind = if matches!(n.event, Event::ObjectMoved(_)) {
                NotificationType::ObjectMoved
            } else {
                NotificationType::ObjectCopied
            };
            let folder = is_folder(r.object.object_type);
            let old_parent = n.old_parent().unwrap_or_else(|| r.old_key.clone());
            let mut d = NotificationData::empty(kind, !folder);
            if folder {
                d.folder_id = Some(known.fid(&n.key));
                d.parent_folder_id = Some(known.fid(&parent(n)));
                d.old_folder_id = Some(known.fid(&r.old_key));
                d.old_parent_folder_id = Some(known.fid(&old_parent));
            } else {
                d.folder_id = Some(known.fid(&parent(n)));
                d.message_id = Some(mid(&n.key));
                d.old_folder_id = Some(known.fid(&old_parent));
                d.old_message_id = Some(mid(&r.old_key));
            }
            d
        }
        Event::SearchComplete(_) => {
            let mut d = NotificationData::empty(NotificationType::SearchComplete, false);
            d.folder_id = Some(known.fid(&n.key));
            d
        }
        Event::TableModified(t) => table_data(&n.key, t, known),
        _ => return None,
    })
}

/// The key a row value names: a binary's or string's bytes, a number in decimal.
fn row_key(v: &PropValue) -> Option<Key> {
    Some(match &v.value {
        PropData::Binary(b) => Key::from(&b[..]),
        PropData::String(s) => Key::from(s.as_str()),
        PropData::I16(i) => Key::from(i.to_string().as_str()),
        PropData::I32(i) => Key::from(i.to_string().as_str()),
        PropData::I64(i) => Key::from(i.to_string().as_str()),
        _ => return None,
    })
}

/// TableModified for a table event on the table of folder `table` (see the module's table).
fn table_data(table: &Key, t: &TableChange, known: &KnownFolders) -> NotificationData {
    use herald_core::TableEvent as E;
    use herald_rop::TableEvent as W;
    let row = row_key(&t.index);
    // Hierarchy rows are folders; table-wide events say nothing of rows: contents.
    let message = !row.as_ref().is_some_and(|k| known.is_folder(k));
    let id = |k: &Key| -> RowId {
        if message {
            RowId {
                folder_id: known.fid(table),
                message: Some((id_of(k), 0)),
            }
        } else {
            RowId {
                folder_id: known.fid(k),
                message: None,
            }
        }
    };
    let first = RowId {
        folder_id: GlobalId::ZERO,
        message: message.then_some((GlobalId::ZERO, 0)),
    };
    let change = |row: &Key| -> Option<RowChange> {
        let after = match row_key(&t.prior) {
            Some(p) => id(&p),
            None => first.clone(),
        };
        Some(RowChange {
            row: id(row),
            after,
            data: property_row(&t.row)?,
        })
    };
    let event = match (t.event, &row) {
        (E::RowAdded, Some(k)) => change(k).map_or(W::Changed, W::RowAdded),
        (E::RowModified, Some(k)) => change(k).map_or(W::Changed, W::RowModified),
        (E::RowDeleted, Some(k)) => W::RowDeleted(id(k)),
        (E::RestrictDone, _) => W::RestrictionChanged,
        _ => W::Changed,
    };
    let mut d = NotificationData::empty(NotificationType::TableModified, message);
    d.table = Some(event);
    d
}

/// A PropertyRow (MS-OXCDATA 2.8.1) of `values`, in order, in ROP-buffer widths (binary
/// lengths 16-bit, multi-value counts 32-bit): standard when every value is present,
/// flagged when one is an error (flag 0x0A and its code) or `PT_NULL` (flag 0x01, absent).
/// `None` when a value cannot be carried (an 8-bit string beyond Latin-1, a binary over
/// 0xFFFF bytes) or the row is longer than TableRowDataSize allows.
pub fn property_row(values: &[PropValue]) -> Option<Vec<u8>> {
    let flagged = values
        .iter()
        .any(|v| matches!(v.value, PropData::Error(_) | PropData::Null));
    let mut out = vec![u8::from(flagged)];
    for v in values {
        match &v.value {
            PropData::Null if flagged => out.put_u8(0x01),
            PropData::Error(code) => {
                out.put_u8(0x0A);
                out.put_u32(*code);
            }
            value => {
                if flagged {
                    out.put_u8(0x00);
                }
                put_value(&mut out, v.tag, value)?;
            }
        }
    }
    (out.len() <= 0xFFFF).then_some(out)
}

/// One PropertyValue's bytes (no tag).
fn put_value(out: &mut Vec<u8>, tag: u32, value: &PropData) -> Option<()> {
    const PT_STRING8: u32 = 0x001E;
    const PT_MV_STRING8: u32 = 0x101E;
    let string = |out: &mut Vec<u8>, s: &str, eight_bit: bool| {
        if eight_bit {
            out.put_asciiz(s, "TableRowData").ok()
        } else {
            out.put_utf16z(s, "TableRowData").ok()
        }
    };
    let binary = |out: &mut Vec<u8>, b: &[u8]| {
        out.put_u16(u16::try_from(b.len()).ok()?);
        out.put(b);
        Some(())
    };
    let count = |n: usize| u32::try_from(n).ok();
    match value {
        PropData::Null | PropData::Error(_) => {}
        PropData::I16(v) => out.put_u16(*v as u16),
        PropData::I32(v) => out.put_u32(*v as u32),
        PropData::I64(v) => out.put_u64(*v as u64),
        PropData::F32(v) => out.put_u32(v.to_bits()),
        PropData::F64(v) => out.put_u64(v.to_bits()),
        PropData::Bool(v) => out.put_u8(u8::from(*v)),
        PropData::SysTime(v) => out.put_u64(*v),
        PropData::String(s) => string(out, s, tag & 0xFFFF == PT_STRING8)?,
        PropData::Binary(b) => binary(out, b)?,
        PropData::Guid(g) => out.put(g),
        PropData::MultiI32(vs) => {
            out.put_u32(count(vs.len())?);
            for v in vs {
                out.put_u32(*v as u32);
            }
        }
        PropData::MultiString(vs) => {
            out.put_u32(count(vs.len())?);
            for s in vs {
                string(out, s, tag & 0xFFFF == PT_MV_STRING8)?;
            }
        }
        PropData::MultiBinary(vs) => {
            out.put_u32(count(vs.len())?);
            for b in vs {
                binary(out, b)?;
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{NewMail, Relocation};

    #[test]
    fn every_mapped_event_obeys_the_presence_rules() {
        let known = KnownFolders::default();
        let folder = ObjectChange {
            object_type: ObjectType::Folder,
            unread_count: Some(3),
            total_count: Some(9),
            ..Default::default()
        };
        let message = ObjectChange {
            object_type: ObjectType::Message,
            changed_props: vec![0x0037_001F],
            ..Default::default()
        };
        let moved = |o: &ObjectChange| Relocation {
            object: o.clone(),
            old_key: Key::from("a@x/inbox/old"),
            old_parent: None,
        };
        let events = [
            Event::NewMail(NewMail {
                parent: Key::from("a@x/inbox"),
                message_class: "IPM.Note".into(),
                message_flags: 1,
            }),
            Event::NewMail(NewMail {
                parent: Key::from("a@x/inbox"),
                message_class: "IPM.Note.☃".into(),
                message_flags: 1,
            }),
            Event::ObjectCreated(folder.clone()),
            Event::ObjectCreated(message.clone()),
            Event::ObjectDeleted(folder.clone()),
            Event::ObjectDeleted(message.clone()),
            Event::ObjectModified(folder.clone()),
            Event::ObjectModified(message.clone()),
            Event::ObjectMoved(moved(&folder)),
            Event::ObjectMoved(moved(&message)),
            Event::ObjectCopied(moved(&folder)),
            Event::ObjectCopied(moved(&message)),
            Event::SearchComplete(ObjectChange::default()),
        ];
        for e in events {
            let n = Notification::new("a@x/inbox/obj", e.clone());
            let d = to_notification_data(&n, &known).unwrap();
            d.validate().unwrap_or_else(|err| panic!("{e:?}: {err}"));
        }
        let inbox = id_of(&Key::from("a@x/inbox"));
        assert_eq!(known.key_of(inbox), Some(Key::from("a@x/inbox")));
        let ext = Notification::new("a@x", Event::Extended(Default::default()));
        assert!(to_notification_data(&ext, &known).is_none());
    }

    #[test]
    fn ids_are_stable_and_never_zero() {
        let k = Key::from("alice@example.test/inbox");
        assert_eq!(id_of(&k), id_of(&k.clone()));
        assert_ne!(id_of(&k), GlobalId::ZERO);
        assert_eq!(id_of(&k).replica, REPLICA);
        assert_ne!(id_of(&k), id_of(&Key::from("alice@example.test/drafts")));
    }

    #[test]
    fn object_modified_sends_tag_count_zero_and_object_created_its_tags() {
        let known = KnownFolders::default();
        let change = ObjectChange {
            object_type: ObjectType::Message,
            changed_props: vec![0x0037_001F, 0x0E07_0003],
            ..Default::default()
        };
        let bytes = |event| {
            let n = Notification::new("alice/inbox/m1", event);
            herald_rop::RopNotify {
                handle: 1,
                logon_id: 0,
                data: to_notification_data(&n, &known).unwrap(),
            }
            .to_bytes()
            .unwrap()
        };
        let mut want = vec![0x2A, 1, 0, 0, 0, 0x00, 0x10, 0x80];
        want.extend(id_bytes("alice/inbox"));
        want.extend(id_bytes("alice/inbox/m1"));
        want.extend([0, 0]); // TagCount 0: present, no tags
        assert_eq!(bytes(Event::ObjectModified(change.clone())), want);
        let mut want = vec![0x2A, 1, 0, 0, 0, 0x00, 0x04, 0x80];
        want.extend(id_bytes("alice/inbox"));
        want.extend(id_bytes("alice/inbox/m1"));
        want.extend([2, 0, 0x1F, 0x00, 0x37, 0x00, 0x03, 0x00, 0x07, 0x0E]);
        assert_eq!(bytes(Event::ObjectCreated(change)), want);
    }

    /// The RopNotify bytes of a table event on `table`, for handle 0x11 on logon 0.
    fn table_notify(table: &str, t: TableChange, known: &KnownFolders) -> Vec<u8> {
        let n = Notification::new(table, Event::TableModified(t));
        let data = to_notification_data(&n, known).expect("table events map");
        herald_rop::RopNotify {
            handle: 0x11,
            logon_id: 0,
            data,
        }
        .to_bytes()
        .unwrap()
    }

    fn id_bytes(key: &str) -> Vec<u8> {
        id_of(&Key::from(key)).to_bytes().to_vec()
    }

    #[test]
    fn a_contents_row_added_carries_the_row_its_place_and_its_data() {
        let known = KnownFolders::default();
        let t = TableChange::row_added(
            PropValue::instance_key(&b"alice/inbox/m1"[..]),
            None,
            vec![
                PropValue {
                    tag: 0x0E08_0003,
                    value: PropData::I32(1234),
                },
                PropValue {
                    tag: 0x0037_001F,
                    value: PropData::String("Hi".into()),
                },
                PropValue {
                    tag: 0x0E1B_000B,
                    value: PropData::Bool(true),
                },
            ],
        );
        let got = table_notify("alice/inbox", t, &known);
        let mut want = vec![0x2A, 0x11, 0, 0, 0, 0x00];
        want.extend([0x00, 0x81, 0x03, 0x00]); // contents table, TableRowAdded
        want.extend(id_bytes("alice/inbox")); // TableRowFolderID: the table's folder
        want.extend(id_bytes("alice/inbox/m1")); // TableRowMessageID
        want.extend([0, 0, 0, 0]); // TableRowInstance
        want.extend([0; 20]); // after the zero row: it is first
        let data = [0x00, 0xD2, 0x04, 0, 0, b'H', 0, b'i', 0, 0, 0, 0x01];
        want.extend([data.len() as u8, 0]);
        want.extend(data);
        assert_eq!(got, want);
    }

    #[test]
    fn a_modified_row_names_its_prior_row() {
        let known = KnownFolders::default();
        let mut t = TableChange::row_added(
            PropValue::instance_key(&b"alice/inbox/m2"[..]),
            Some(PropValue::instance_key(&b"alice/inbox/m1"[..])),
            vec![],
        );
        t.event = herald_core::TableEvent::RowModified;
        let got = table_notify("alice/inbox", t, &known);
        let mut want = vec![0x2A, 0x11, 0, 0, 0, 0x00, 0x00, 0x81, 0x05, 0x00];
        want.extend(id_bytes("alice/inbox"));
        want.extend(id_bytes("alice/inbox/m2"));
        want.extend([0; 4]);
        want.extend(id_bytes("alice/inbox"));
        want.extend(id_bytes("alice/inbox/m1"));
        want.extend([0; 4]);
        want.extend([1, 0, 0x00]); // an empty standard row
        assert_eq!(got, want);
    }

    #[test]
    fn a_deleted_subfolder_is_a_hierarchy_row() {
        let known = KnownFolders::default();
        known.fid(&Key::from("alice/inbox/sub"));
        let t = TableChange::row_deleted(PropValue::instance_key(&b"alice/inbox/sub"[..]));
        let got = table_notify("alice/inbox", t, &known);
        let mut want = vec![0x2A, 0x11, 0, 0, 0, 0x00, 0x00, 0x01, 0x04, 0x00];
        want.extend(id_bytes("alice/inbox/sub"));
        assert_eq!(got, want);
    }

    #[test]
    fn table_wide_events_have_the_two_wire_codes() {
        use herald_core::TableEvent as E;
        let known = KnownFolders::default();
        for (event, code) in [
            (E::Changed, 0x01),
            (E::RestrictDone, 0x07),
            (E::SortDone, 0x01),
            (E::SetColDone, 0x01),
            (E::Reload, 0x01),
            (E::Error, 0x01),
        ] {
            let got = table_notify("alice/inbox", TableChange::without_row(event), &known);
            assert_eq!(
                got,
                [0x2A, 0x11, 0, 0, 0, 0x00, 0x00, 0x81, code, 0x00],
                "{event:?}"
            );
        }
    }

    #[test]
    fn a_row_that_cannot_be_carried_degrades_to_table_changed() {
        let known = KnownFolders::default();
        for value in [
            PropData::Binary(vec![7u8; 0x1_0000].into()),
            PropData::MultiBinary(vec![vec![7u8; 0x8000].into(); 2]),
        ] {
            let t = TableChange::row_added(
                PropValue::instance_key(&b"alice/inbox/big"[..]),
                None,
                vec![PropValue {
                    tag: 0x1000_0102,
                    value,
                }],
            );
            let got = table_notify("alice/inbox", t, &known);
            assert_eq!(got, [0x2A, 0x11, 0, 0, 0, 0x00, 0x00, 0x81, 0x01, 0x00]);
        }
        // An 8-bit string beyond Latin-1, too.
        let t = TableChange::row_added(
            PropValue::instance_key(&b"alice/inbox/x"[..]),
            None,
            vec![PropValue {
                tag: 0x0037_001E,
                value: PropData::String("\u{4e2d}".into()),
            }],
        );
        assert_eq!(table_notify("alice/inbox", t, &known)[8], 0x01);
    }

    #[test]
    fn property_rows_are_flagged_only_when_a_value_is_missing_or_an_error() {
        let v = |tag, value| PropValue { tag, value };
        assert_eq!(
            property_row(&[
                v(0x0001_000A, PropData::Error(0x8004_010F)),
                v(0x0002_0001, PropData::Null),
                v(0x0003_0002, PropData::I16(5)),
            ]),
            Some(vec![
                0x01, 0x0A, 0x0F, 0x01, 0x04, 0x80, 0x01, 0x00, 0x05, 0x00
            ])
        );
        assert_eq!(
            property_row(&[
                v(0x0004_1003, PropData::MultiI32(vec![1, -1])),
                v(0x0005_101E, PropData::MultiString(vec!["a".into()])),
                v(0x0006_1102, PropData::MultiBinary(vec![vec![9u8].into()])),
                v(0x0007_0048, PropData::Guid([3; 16])),
                v(0x0008_0040, PropData::SysTime(1)),
                v(0x0009_0014, PropData::I64(-2)),
            ])
            .unwrap(),
            [
                &[0x00, 2, 0, 0, 0, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF][..],
                &[1, 0, 0, 0, b'a', 0],
                &[1, 0, 0, 0, 1, 0, 9],
                &[3; 16],
                &[1, 0, 0, 0, 0, 0, 0, 0],
                &[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            ]
            .concat()
        );
    }
}
