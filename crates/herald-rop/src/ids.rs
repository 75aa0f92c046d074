//! Folder and message ids (MS-OXCDATA 2.2.1.1–2.2.1.2): a replica id and a 48-bit global
//! counter, the counter in big-endian order.

use crate::wire::{DecodeError, Put, Reader};

/// A folder or message id: `ReplicaId` (u16, little-endian) then `GlobalCounter` (6 bytes,
/// big-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalId {
    /// The replica (store) the object was created in.
    pub replica: u16,
    /// The counter, below 2^48.
    pub counter: u64,
}

/// A folder id.
pub type Fid = GlobalId;
/// A message id.
pub type Mid = GlobalId;

/// The largest global counter (48 bits).
pub const MAX_COUNTER: u64 = (1 << 48) - 1;

impl GlobalId {
    /// The id with this replica and counter; the counter is cut to 48 bits.
    pub const fn new(replica: u16, counter: u64) -> Self {
        GlobalId {
            replica,
            counter: counter & MAX_COUNTER,
        }
    }

    /// The zero id (no object; "first row" in table events).
    pub const ZERO: GlobalId = GlobalId {
        replica: 0,
        counter: 0,
    };

    /// The eight wire bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&self.replica.to_le_bytes());
        b[2..].copy_from_slice(&(self.counter & MAX_COUNTER).to_be_bytes()[2..]);
        b
    }

    /// From the eight wire bytes.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        let mut c = [0u8; 8];
        c[2..].copy_from_slice(&b[2..]);
        GlobalId {
            replica: u16::from_le_bytes([b[0], b[1]]),
            counter: u64::from_be_bytes(c),
        }
    }

    /// The same bytes read as one little-endian u64 (how handles and tables often carry them).
    pub fn as_u64(self) -> u64 {
        u64::from_le_bytes(self.to_bytes())
    }

    pub(crate) fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Self, DecodeError> {
        let b = r.bytes(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(GlobalId::from_bytes(a))
    }

    pub(crate) fn write(self, out: &mut Vec<u8>) {
        out.put(&self.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_little_endian_counter_big_endian() {
        let id = GlobalId::new(1, 0x123);
        assert_eq!(id.to_bytes(), [0x01, 0x00, 0, 0, 0, 0, 0x01, 0x23]);
        assert_eq!(GlobalId::from_bytes(id.to_bytes()), id);
        assert_eq!(GlobalId::new(0, u64::MAX).counter, MAX_COUNTER);
    }
}
