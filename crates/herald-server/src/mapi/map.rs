//! How Herald's model appears to a MAPI client: folder and message ids for keys, the special
//! folders of a logon, and the one table from Herald event kinds to NotificationData.
//!
//! | Herald kind | NotificationData | ids |
//! |---|---|---|
//! | `new_mail` | NewMail, M | FolderId = parent, MessageId = key; class 8-bit when Latin-1, else UTF-16 |
//! | `object_created` | ObjectCreated | folder: FolderId = key, ParentFolderId = parent; message (M): FolderId = parent, MessageId = key; tags = changed props |
//! | `object_deleted` | ObjectDeleted | as created, no tags |
//! | `object_modified` | ObjectModified | as created without ParentFolderId; T/U from total and unread counts (folders) |
//! | `object_moved`, `object_copied` | ObjectMoved, ObjectCopied | folder: + OldFolderId = old key, OldParentFolderId; message: + OldFolderId = old parent, OldMessageId = old key |
//! | `search_complete` | SearchComplete | FolderId = key |
//! | `table_modified` | — | Herald serves no table objects, whose handles table events belong to |
//! | `status_object_modified`, `critical_error`, `extended`, `connection_state` | — | RopNotify has no form for them (0x0400 is reserved, 0x0001 historical) |
//!
//! Objects whose `object_type` is `folder` or `store` are folders; all others are messages.
//! Ids are replica 1 and the first 48 bits of SHA-256 of the key: stable across sessions and
//! restarts. A folder id is resolved back to its key only if Herald has seen the key (logon
//! folders, folders named by events); others are `ecNotFound` on RopOpenFolder.

use std::collections::HashMap;
use std::sync::Mutex;

use herald_core::{Event, Key, Notification, ObjectChange, ObjectType};
use herald_rop::{Fid, GlobalId, Mid, NewMailInfo, NotificationData, NotificationType, Tags};
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
            if kind != NotificationType::ObjectDeleted {
                d.tags = Some(tags(o));
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
        _ => return None,
    })
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
}
