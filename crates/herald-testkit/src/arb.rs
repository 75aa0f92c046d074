//! proptest strategies for the event model: any valid notification, of any kind.

use bytes::Bytes;
use herald_core::{
    ConnectionStateChange, CriticalError, Event, Extended, Key, NewMail, Notification,
    ObjectChange, ObjectType, PropData, PropValue, Relocation, StateChangePhase,
    StatusObjectChange, TableChange, TableEvent, Timestamp, Watermark,
};
use proptest::prelude::*;

/// A key in path form from a small alphabet, so that subtrees overlap often.
pub fn key() -> impl Strategy<Value = Key> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "inbox", "m1", "m2", "x"]),
        1..4,
    )
    .prop_map(|segments| Key::from(segments.join("/")))
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._é-]{0,12}"
}

fn object_type() -> impl Strategy<Value = ObjectType> {
    (0u32..=12).prop_map(|v| ObjectType::from_u32(v).unwrap_or_default())
}

/// Any property value, its tag's property type matching its data (as MAPI requires).
pub fn prop_value() -> impl Strategy<Value = PropValue> {
    let data = prop_oneof![
        Just((0x0001u32, PropData::Null)),
        any::<i16>().prop_map(|v| (0x0002, PropData::I16(v))),
        any::<i32>().prop_map(|v| (0x0003, PropData::I32(v))),
        any::<i64>().prop_map(|v| (0x0014, PropData::I64(v))),
        any::<bool>().prop_map(|v| (0x000B, PropData::Bool(v))),
        (-1e9f64..1e9).prop_map(|v| (0x0005, PropData::F64(v))),
        any::<u64>().prop_map(|v| (0x0040, PropData::SysTime(v))),
        text().prop_map(|v| (0x001F, PropData::String(v))),
        prop::collection::vec(any::<u8>(), 0..16)
            .prop_map(|b| (0x0102, PropData::Binary(Bytes::from(b)))),
        any::<[u8; 16]>().prop_map(|g| (0x0048, PropData::Guid(g))),
        any::<u32>().prop_map(|v| (0x000A, PropData::Error(v))),
        prop::collection::vec(any::<i32>(), 0..4).prop_map(|v| (0x1003, PropData::MultiI32(v))),
        prop::collection::vec(text(), 0..3).prop_map(|v| (0x101F, PropData::MultiString(v))),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..3).prop_map(|v| {
            (
                0x1102,
                PropData::MultiBinary(v.into_iter().map(Bytes::from).collect()),
            )
        }),
    ];
    (1u32..0xFFFF, data).prop_map(|(id, (pt, value))| PropValue {
        tag: (id << 16) | pt,
        value,
    })
}

fn object_change() -> impl Strategy<Value = ObjectChange> {
    (
        object_type(),
        prop::option::of(key()),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(object_type, parent, changed_props, total_count, unread_count)| ObjectChange {
                object_type,
                parent,
                changed_props,
                total_count,
                unread_count,
            },
        )
}

fn relocation() -> impl Strategy<Value = Relocation> {
    (object_change(), key(), prop::option::of(key())).prop_map(|(object, old_key, old_parent)| {
        Relocation {
            object,
            old_key,
            old_parent,
        }
    })
}

fn table_change() -> impl Strategy<Value = TableChange> {
    prop_oneof![
        prop::sample::select(vec![
            TableEvent::Changed,
            TableEvent::SortDone,
            TableEvent::RestrictDone,
            TableEvent::SetColDone,
            TableEvent::Reload
        ])
        .prop_map(TableChange::without_row),
        any::<u32>().prop_map(TableChange::error),
        (
            prop_value(),
            prop::option::of(prop_value()),
            prop::collection::vec(prop_value(), 0..4)
        )
            .prop_map(|(i, p, r)| TableChange::row_added(i, p, r)),
        (
            prop_value(),
            prop::option::of(prop_value()),
            prop::collection::vec(prop_value(), 0..4)
        )
            .prop_map(|(i, p, r)| TableChange::row_modified(i, p, r)),
        prop_value().prop_map(TableChange::row_deleted),
    ]
}

/// Any event, of every kind.
pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            any::<u32>(),
            prop::option::of(text()),
            prop::option::of(text()),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(scode, message, component, low_level_error, context)| {
                Event::CriticalError(CriticalError {
                    scode,
                    message,
                    component,
                    low_level_error,
                    context,
                })
            }),
        (key(), text(), any::<u32>()).prop_map(|(parent, message_class, message_flags)| {
            Event::NewMail(NewMail {
                parent,
                message_class,
                message_flags,
            })
        }),
        object_change().prop_map(Event::ObjectCreated),
        object_change().prop_map(Event::ObjectDeleted),
        object_change().prop_map(Event::ObjectModified),
        relocation().prop_map(Event::ObjectMoved),
        relocation().prop_map(Event::ObjectCopied),
        object_change().prop_map(Event::SearchComplete),
        table_change().prop_map(Event::TableModified),
        prop::collection::vec(prop_value(), 0..4)
            .prop_map(|props| Event::StatusObjectModified(StatusObjectChange { props })),
        (
            prop::sample::select(vec![
                StateChangePhase::Start,
                StateChangePhase::Change,
                StateChangePhase::Done
            ]),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(phase, client_token, changed_mask, old_state, new_state)| {
                    Event::ConnectionState(ConnectionStateChange {
                        phase,
                        client_token,
                        changed_mask,
                        old_state,
                        new_state,
                    })
                }
            ),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(event, data)| {
            Event::Extended(Extended {
                event,
                data: Bytes::from(data),
            })
        }),
    ]
}

/// Any valid notification, not yet logged (no watermark).
pub fn notification() -> impl Strategy<Value = Notification> {
    (key(), any::<u64>(), event())
        .prop_map(|(key, t, event)| Notification {
            key,
            timestamp: Timestamp(t),
            watermark: None,
            event,
        })
        .prop_filter("valid per the model's rules", |n| n.validate().is_ok())
}

/// Any valid notification with a watermark.
pub fn logged_notification() -> impl Strategy<Value = Notification> {
    (notification(), 1u64..u64::MAX / 2).prop_map(|(mut n, w)| {
        n.watermark = Some(Watermark(w));
        n
    })
}
