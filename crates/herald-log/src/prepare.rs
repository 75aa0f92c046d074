//! What every log does to a batch before storing it, written once: validate each event,
//! fingerprint the batch for its idempotency key, stamp events that came without a time, and
//! encode the stored records.

use herald_core::{Notification, Timestamp};

use crate::{AppendError, LogError, record};

/// What identifies a batch for its idempotency key: SHA-256 over its keys, events and the
/// producer's own timestamps (a CRC-32, as before, let a different batch pass for the first
/// one), and the CRC-32 still, to compare with entries stored by older versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    /// SHA-256 of the batch.
    pub sha256: [u8; 32],
    /// CRC-32 of the same bytes.
    pub crc: u32,
}

/// Hashes what postcard writes into it.
#[derive(Default)]
struct Fingerprint {
    sha: sha2::Sha256,
    crc: crc32fast::Hasher,
}

impl Fingerprint {
    fn finish(self) -> Digest {
        use sha2::Digest as _;
        Digest {
            sha256: self.sha.finalize().into(),
            crc: self.crc.finalize(),
        }
    }
}

impl std::io::Write for Fingerprint {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        self.sha.update(buf);
        self.crc.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A batch ready to store.
#[derive(Debug)]
pub struct Prepared {
    /// The events, each with a timestamp (those sent without one get the append time).
    pub batch: Vec<Notification>,
    /// Each event's stored record, in order.
    pub records: Vec<Vec<u8>>,
    /// The batch's identity for its idempotency key, when asked for.
    pub digest: Option<Digest>,
}

/// Validates, fingerprints (when `digest`), stamps and encodes `batch`. Nothing is stored.
pub fn prepare(mut batch: Vec<Notification>, digest: bool) -> Result<Prepared, AppendError> {
    if batch.is_empty() {
        return Err(AppendError::Empty);
    }
    let storage = |e: postcard::Error| AppendError::Log(LogError::Storage(e.to_string()));
    let now = Timestamp::now();
    let mut records = Vec::with_capacity(batch.len());
    let mut fingerprint = Fingerprint::default();
    for (index, n) in batch.iter_mut().enumerate() {
        n.validate()
            .map_err(|reason| AppendError::InvalidEvent { index, reason })?;
        if digest {
            // Keys, events and the producer's own timestamps; an event that came without
            // one (zero) is stamped below, anew on a retry, and is still the same event.
            postcard::to_io(&(&n.key, n.timestamp, &n.event), &mut fingerprint).map_err(storage)?;
        }
        if n.timestamp.0 == 0 {
            n.timestamp = now;
        }
        records.push(record::encode(n, now).map_err(storage)?);
    }
    Ok(Prepared {
        batch,
        records,
        digest: digest.then(|| fingerprint.finish()),
    })
}
