//! The stored form of one event: `[format u8][appended_at µs u64 LE][postcard(Notification)]`.
//! The watermark is the table key, not part of the record.

use herald_core::{Event, Key, Notification, Timestamp};
use serde::{Deserialize, Serialize};

/// The only record format so far.
pub(crate) const FORMAT: u8 = 1;
const HEADER: usize = 9;

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record is shorter than its header.
    #[error("record of {0} bytes is shorter than its 9-byte header")]
    Short(usize),
    /// The record's format byte is not one this version reads.
    #[error("record format {0} is unknown (this version reads format {FORMAT})")]
    UnknownFormat(u8),
    /// The body does not decode.
    #[error("record body does not decode: {0}")]
    Body(#[from] postcard::Error),
}

/// The body of a record: a notification without its watermark. Field order is the format.
#[derive(Serialize)]
struct Body<'a> {
    key: &'a Key,
    timestamp: Timestamp,
    event: &'a Event,
}

#[derive(Deserialize)]
struct OwnedBody {
    key: Key,
    timestamp: Timestamp,
    event: Event,
}

/// Encodes `n` (its watermark is ignored) with the time it was appended.
pub fn encode(n: &Notification, appended_at: Timestamp) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT);
    out.extend_from_slice(&appended_at.0.to_le_bytes());
    let body = Body {
        key: &n.key,
        timestamp: n.timestamp,
        event: &n.event,
    };
    postcard::to_io(&body, &mut out)?;
    Ok(out)
}

/// The append time of a record, without decoding its body.
pub fn appended_at(bytes: &[u8]) -> Result<Timestamp, RecordError> {
    let header = bytes.get(..HEADER).ok_or(RecordError::Short(bytes.len()))?;
    if header[0] != FORMAT {
        return Err(RecordError::UnknownFormat(header[0]));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&header[1..HEADER]);
    Ok(Timestamp(u64::from_le_bytes(t)))
}

/// Decodes a record into the notification stored at `watermark`.
pub fn decode(
    bytes: &[u8],
    watermark: herald_core::Watermark,
) -> Result<Notification, RecordError> {
    appended_at(bytes)?;
    let body: OwnedBody = postcard::from_bytes(&bytes[HEADER..])?;
    Ok(Notification {
        key: body.key,
        timestamp: body.timestamp,
        watermark: Some(watermark),
        event: body.event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{ObjectChange, ObjectType, Relocation, Watermark};

    /// The stored bytes of a known event. If this fails, the on-disk format changed: add a new
    /// format byte instead (see docs/design/log.md).
    #[test]
    fn record_format_is_pinned() {
        let n = Notification {
            key: Key::from("a/b"),
            timestamp: Timestamp(1_000_000),
            watermark: Some(Watermark(7)),
            event: Event::ObjectMoved(Relocation {
                object: ObjectChange {
                    object_type: ObjectType::Message,
                    parent: Some(Key::from("a")),
                    changed_props: vec![0x0037_001F],
                    total_count: None,
                    unread_count: Some(3),
                },
                old_key: Key::from("c/b"),
                old_parent: Some(Key::from("c")),
            }),
        };
        let bytes = encode(&n, Timestamp(2)).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0102000000000000000361
2f62c0843d0505010161019f80dc0100010303632f62010163"
                .replace('\n', "")
        );
        assert_eq!(decode(&bytes, Watermark(7)).unwrap(), n);
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert!(matches!(
            decode(&[], Watermark(1)),
            Err(RecordError::Short(0))
        ));
        assert!(matches!(
            decode(&[9; 12], Watermark(1)),
            Err(RecordError::UnknownFormat(9))
        ));
        let mut bytes = encode(
            &Notification::new("k", Event::ObjectCreated(ObjectChange::default())),
            Timestamp(1),
        )
        .unwrap();
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode(&bytes, Watermark(1)),
            Err(RecordError::Body(_))
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use herald_core::Watermark;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_event_round_trips(n in herald_testkit::arb::logged_notification(), at in any::<u64>()) {
            let w = n.watermark.unwrap();
            let bytes = encode(&n, Timestamp(at)).unwrap();
            prop_assert_eq!(appended_at(&bytes).unwrap(), Timestamp(at));
            prop_assert_eq!(decode(&bytes, w).unwrap(), n);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, Watermark(1));
        }
    }
}
