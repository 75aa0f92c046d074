//! How Herald's model appears in EWS: ids, watermarks, folders, and the one table from
//! Herald event kinds to EWS event elements.
//!
//! | Herald kind | EWS event | target | notes |
//! |---|---|---|---|
//! | `object_created` | `CreatedEvent` | `ItemId`, or `FolderId` for folders and stores | |
//! | `object_deleted` | `DeletedEvent` | same | |
//! | `object_modified` | `ModifiedEvent` | same | `UnreadCount` for folders when known |
//! | `object_moved` | `MovedEvent` | same | `OldItemId`/`OldFolderId` = old key, `OldParentFolderId` |
//! | `object_copied` | `CopiedEvent` | same | as moved |
//! | `new_mail` | `NewMailEvent` | `ItemId` | `ParentFolderId` = the receive folder |
//! | `search_complete`, `table_modified`, `status_object_modified`, `critical_error`, `connection_state`, `extended` | — | | not representable in EWS notifications; not sent |
//!
//! EWS's `FreeBusyChangedEvent` has no Herald kind and is never produced.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use herald_core::{Event, Key, Notification, ObjectType, Watermark};
use herald_ews::{EventKind, EventType, EwsEvent, Id, Target};

/// The distinguished folders Herald answers for: `<mailbox>/<name>`, except `root`, which is
/// the mailbox key itself.
pub const DISTINGUISHED: [&str; 20] = [
    "root",
    "msgfolderroot",
    "inbox",
    "drafts",
    "sentitems",
    "deleteditems",
    "outbox",
    "junkemail",
    "calendar",
    "contacts",
    "tasks",
    "notes",
    "journal",
    "searchfolders",
    "voicemail",
    "conversationhistory",
    "archiveroot",
    "archivemsgfolderroot",
    "recoverableitemsroot",
    "publicfoldersroot",
];

/// The change key Herald gives every id (it keeps no item versions).
pub const CHANGE_KEY: &str = "AQAAABYAAAA=";

/// An opaque, stable EWS id for a key.
pub fn id_of(key: &Key) -> Id {
    Id {
        id: format!("HK{}", B64.encode(key.as_bytes())),
        change_key: CHANGE_KEY.to_owned(),
    }
}

/// The key an id names, if it is one of Herald's.
pub fn key_of(id: &str) -> Option<Key> {
    let bytes = B64.decode(id.strip_prefix("HK")?).ok()?;
    (!bytes.is_empty()).then(|| Key::new(bytes))
}

/// An opaque watermark string for a log watermark.
pub fn watermark_of(w: Watermark) -> String {
    format!("HW{}", B64.encode(w.0.to_be_bytes()))
}

/// The log watermark a watermark string names.
pub fn watermark_from(s: &str) -> Option<Watermark> {
    let bytes = B64.decode(s.strip_prefix("HW")?).ok()?;
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(Watermark(u64::from_be_bytes(arr)))
}

/// The key of a distinguished folder in a mailbox.
pub fn distinguished_key(mailbox: &str, name: &str) -> Option<Key> {
    let name = name.to_ascii_lowercase();
    if !DISTINGUISHED.contains(&name.as_str()) {
        return None;
    }
    Some(if name == "root" {
        Key::from(mailbox)
    } else {
        Key::from(format!("{mailbox}/{name}"))
    })
}

/// The mailbox a key belongs to: its first segment.
pub fn mailbox_of(key: &Key) -> Option<&str> {
    key.as_str().map(|s| s.split('/').next().unwrap_or(s))
}

fn target(key: &Key, t: ObjectType) -> Target {
    match t {
        ObjectType::Folder | ObjectType::Store => Target::Folder(id_of(key)),
        _ => Target::Item(id_of(key)),
    }
}

/// `xs:dateTime` of a Herald timestamp.
fn timestamp(n: &Notification) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(n.timestamp.0);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The EWS type of a Herald event, if EWS can carry it.
pub fn ews_type(n: &Notification) -> Option<EventType> {
    Some(match &n.event {
        Event::ObjectCreated(_) => EventType::Created,
        Event::ObjectDeleted(_) => EventType::Deleted,
        Event::ObjectModified(_) => EventType::Modified,
        Event::ObjectMoved(_) => EventType::Moved,
        Event::ObjectCopied(_) => EventType::Copied,
        Event::NewMail(_) => EventType::NewMail,
        _ => return None,
    })
}

/// The EWS event for a Herald event (see the table above).
pub fn to_ews(n: &Notification) -> Option<EwsEvent> {
    let kind = ews_type(n)?;
    let parent = n.parent().map(|p| id_of(&p));
    let mut e = EwsEvent {
        kind: EventKind::Event(kind),
        watermark: n.watermark.map(watermark_of),
        timestamp: Some(timestamp(n)),
        target: None,
        parent_folder_id: parent,
        old_target: None,
        old_parent_folder_id: None,
        unread_count: None,
    };
    match &n.event {
        Event::NewMail(_) => e.target = Some(Target::Item(id_of(&n.key))),
        Event::ObjectCreated(o) | Event::ObjectDeleted(o) => {
            e.target = Some(target(&n.key, o.object_type))
        }
        Event::ObjectModified(o) => {
            e.target = Some(target(&n.key, o.object_type));
            if matches!(o.object_type, ObjectType::Folder | ObjectType::Store) {
                e.unread_count = o.unread_count;
            }
        }
        Event::ObjectMoved(r) | Event::ObjectCopied(r) => {
            e.target = Some(target(&n.key, r.object.object_type));
            e.old_target = Some(target(&r.old_key, r.object.object_type));
            e.old_parent_folder_id = n.old_parent().map(|p| id_of(&p));
        }
        _ => return None,
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{ObjectChange, Relocation};

    #[test]
    fn ids_and_watermarks_round_trip_and_reject_strangers() {
        let k = Key::from("alice@example.test/inbox/m1");
        assert_eq!(key_of(&id_of(&k).id), Some(k));
        assert_eq!(key_of("AAMk…"), None);
        assert_eq!(
            watermark_from(&watermark_of(Watermark(42))),
            Some(Watermark(42))
        );
        assert_eq!(watermark_from("AQAAAA=="), None);
        assert_eq!(
            distinguished_key("a@x", "Inbox"),
            Some(Key::from("a@x/inbox"))
        );
        assert_eq!(distinguished_key("a@x", "root"), Some(Key::from("a@x")));
        assert_eq!(distinguished_key("a@x", "nope"), None);
    }

    #[test]
    fn moves_carry_old_ids_and_unrepresentable_kinds_are_not_sent() {
        let mut n = Notification::new(
            "a@x/archive/m1",
            Event::ObjectMoved(Relocation {
                object: ObjectChange {
                    object_type: ObjectType::Message,
                    ..Default::default()
                },
                old_key: Key::from("a@x/inbox/m1"),
                old_parent: None,
            }),
        );
        n.watermark = Some(Watermark(3));
        let e = to_ews(&n).unwrap();
        assert_eq!(e.kind, EventKind::Event(EventType::Moved));
        assert_eq!(e.parent_folder_id, Some(id_of(&Key::from("a@x/archive"))));
        assert_eq!(e.old_parent_folder_id, Some(id_of(&Key::from("a@x/inbox"))));
        assert_eq!(
            e.old_target,
            Some(Target::Item(id_of(&Key::from("a@x/inbox/m1"))))
        );
        let ext = Notification::new("a@x/inbox", Event::Extended(Default::default()));
        assert!(to_ews(&ext).is_none());
    }
}
