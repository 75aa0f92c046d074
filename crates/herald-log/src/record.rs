//! The stored form of one event: `[format u8][appended_at µs u64 LE][postcard(Notification)]`.
//! The watermark is the table key, not part of the record.
//!
//! Events are stored in **runs**: one table entry holding the records of consecutive
//! watermarks, `[RUN u8][count u32 LE]` then, per event, `[length u32 LE][record]`; the entry's
//! key is the first event's watermark. A run costs one B-tree insert for many events (a
//! profile of one producer put a third of the log writer in per-event inserts). A value that
//! is a single record (format 1, written before runs) reads as a run of one.

use herald_core::{Event, Key, Notification, Timestamp};
use serde::{Deserialize, Serialize};

/// The only record format so far.
pub(crate) const FORMAT: u8 = 1;
const HEADER: usize = 9;

/// The format byte of a run of records.
pub(crate) const RUN: u8 = 2;
/// A run is closed once it holds this many bytes, so that a read of one event never loads
/// much more than it needs.
pub(crate) const RUN_TARGET: usize = 32 * 1024;

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
    /// A run's count or lengths do not fit its bytes.
    #[error("run of records is malformed: {0}")]
    Run(&'static str),
}

/// A run being written: records of consecutive watermarks.
#[derive(Default)]
pub(crate) struct RunWriter {
    bytes: Vec<u8>,
    count: u32,
}

impl RunWriter {
    /// Adds the next record.
    pub(crate) fn push(&mut self, record: &[u8]) {
        if self.bytes.is_empty() {
            self.bytes.reserve(RUN_TARGET.min(record.len() * 64) + 5);
            self.bytes.push(RUN);
            self.bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        self.bytes
            .extend_from_slice(&(record.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(record);
        self.count += 1;
        self.bytes[1..5].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Whether it holds enough to be closed.
    pub(crate) fn is_full(&self) -> bool {
        self.bytes.len() >= RUN_TARGET
    }

    /// How many records it holds.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// The stored value, leaving the writer empty for the next run.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.count = 0;
        std::mem::take(&mut self.bytes)
    }
}

/// The records of a stored value, in watermark order from its key: the records of a run, or
/// the value itself if it is a single record. Lengths are checked against the value, so a
/// corrupt one is an error, never a read out of bounds or a large allocation.
pub(crate) fn records(value: &[u8]) -> Records<'_> {
    match value.first() {
        Some(&RUN) => match value.get(1..5) {
            Some(c) => Records {
                rest: &value[5..],
                left: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                single: false,
            },
            None => Records {
                rest: &[],
                left: 1,
                single: false,
            },
        },
        _ => Records {
            rest: value,
            left: 1,
            single: true,
        },
    }
}

/// The iterator of [`records`].
pub(crate) struct Records<'a> {
    rest: &'a [u8],
    left: u32,
    single: bool,
}

impl Records<'_> {
    /// How many records the value says it holds.
    pub(crate) fn stated(&self) -> u32 {
        self.left
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<&'a [u8], RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.single {
            return Some(Ok(std::mem::take(&mut self.rest)));
        }
        let Some(len) = self.rest.get(..4) else {
            self.left = 0;
            return Some(Err(RecordError::Run("a length is cut short")));
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(record) = self.rest.get(4..4 + len) else {
            self.left = 0;
            return Some(Err(RecordError::Run("a record is longer than the run")));
        };
        self.rest = &self.rest[4 + len..];
        Some(Ok(record))
    }
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

    #[test]
    fn a_single_record_reads_as_a_run_of_one_and_a_bad_run_is_an_error() {
        let one = encode(
            &Notification::new("k", Event::ObjectCreated(ObjectChange::default())),
            Timestamp(1),
        )
        .unwrap();
        let got: Vec<_> = records(&one).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![one.as_slice()]);
        // A run claiming more records than it holds, or a length past its end.
        let mut run = RunWriter::default();
        run.push(&one);
        let mut value = run.take();
        value[1..5].copy_from_slice(&2u32.to_le_bytes());
        let got: Vec<_> = records(&value).collect();
        assert!(got[0].is_ok() && matches!(got[1], Err(RecordError::Run(_))));
        value[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            records(&value).next(),
            Some(Err(RecordError::Run(_)))
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
            for r in records(&bytes).flatten() {
                let _ = decode(r, Watermark(1));
            }
        }

        #[test]
        fn a_run_gives_back_its_records_in_order(
            events in prop::collection::vec(herald_testkit::arb::logged_notification(), 1..40),
        ) {
            let mut run = RunWriter::default();
            let encoded: Vec<Vec<u8>> = events.iter().map(|n| encode(n, Timestamp(5)).unwrap()).collect();
            for e in &encoded {
                run.push(e);
            }
            prop_assert_eq!(run.count() as usize, events.len());
            let value = run.take();
            prop_assert_eq!(records(&value).stated(), events.len() as u32);
            let back: Vec<&[u8]> = records(&value).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(back.len(), encoded.len());
            for (b, e) in back.iter().zip(&encoded) {
                prop_assert_eq!(*b, e.as_slice());
            }
            // Cut anywhere, a run is an error or fewer records, never a panic.
            for cut in 0..value.len() {
                let _ = records(&value[..cut]).collect::<Vec<_>>();
            }
        }
    }
}
