//! The ROP buffer inside Execute (MS-OXCRPC 2.2.2.1): RPC_HEADER_EXT, then RopSize, the
//! RopsList and the server object handle table.

use crate::wire::{DecodeError, EncodeError, Put, Reader};

/// RPC_HEADER_EXT flag: the payload is LZ77-compressed.
pub const HEADER_COMPRESSED: u16 = 0x0001;
/// RPC_HEADER_EXT flag: every payload byte is XORed with 0xA5.
pub const HEADER_XOR_MAGIC: u16 = 0x0002;
/// RPC_HEADER_EXT flag: the last header of the buffer.
pub const HEADER_LAST: u16 = 0x0004;
/// The largest payload (RopSize + RopsList + handle table) of one header.
pub const MAX_PAYLOAD: usize = 0x8000;

/// A decoded ROP buffer: the RopsList bytes and the handle table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RopBuffer {
    /// The ROPs, back to back.
    pub rops: Vec<u8>,
    /// Server object handles, indexed by the ROPs' handle indexes.
    pub handles: Vec<u32>,
}

impl RopBuffer {
    /// Reads a buffer of one payload (Last set). XorMagic is undone and compressed input
    /// decompressed (to at most SizeActual bytes); chained payloads are refused with an error
    /// naming the flag.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let at = r.offset();
        let version = r.u16("RPC_HEADER_EXT.Version")?;
        if version != 0 {
            return Err(DecodeError::Invalid {
                field: "RPC_HEADER_EXT.Version",
                offset: at,
                value: u64::from(version),
                why: "must be 0",
            });
        }
        let flags_at = r.offset();
        let flags = r.u16("RPC_HEADER_EXT.Flags")?;
        let size = r.u16("RPC_HEADER_EXT.Size")?;
        let actual = r.u16("RPC_HEADER_EXT.SizeActual")?;
        let bad_flags = |why| DecodeError::Invalid {
            field: "RPC_HEADER_EXT.Flags",
            offset: flags_at,
            value: u64::from(flags),
            why,
        };
        let compressed = flags & HEADER_COMPRESSED != 0;
        if !compressed && size != actual {
            return Err(bad_flags("Size and SizeActual differ without Compressed"));
        }
        if compressed && (size >= actual || usize::from(actual) > MAX_PAYLOAD) {
            return Err(bad_flags(
                "a compressed payload is smaller than SizeActual, at most 0x8000 bytes",
            ));
        }
        if flags & HEADER_LAST == 0 {
            return Err(bad_flags("only one payload (with Last) per request"));
        }
        let base = r.offset();
        let mut payload = r
            .bytes(usize::from(size), "RPC_HEADER_EXT payload")?
            .to_vec();
        r.finish("the ROP buffer")?;
        // The sender compresses, then obfuscates: undone in reverse.
        if flags & HEADER_XOR_MAGIC != 0 {
            for b in &mut payload {
                *b ^= 0xA5;
            }
        }
        if compressed {
            payload = crate::lz77::decompress(&payload, usize::from(actual))?;
        }
        let mut p = Reader::at(&payload, base);
        let rop_at = p.offset();
        let rop_size = p.u16("RopSize")?;
        if rop_size < 2 {
            return Err(DecodeError::Invalid {
                field: "RopSize",
                offset: rop_at,
                value: u64::from(rop_size),
                why: "counts itself, so at least 2",
            });
        }
        let rops = p.bytes(usize::from(rop_size) - 2, "RopsList")?.to_vec();
        let table_at = p.offset();
        let rest = p.rest();
        if rest.len() % 4 != 0 {
            return Err(DecodeError::Invalid {
                field: "ServerObjectHandleTable",
                offset: table_at,
                value: rest.len() as u64,
                why: "not a whole number of 4-byte handles",
            });
        }
        let handles = rest
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(RopBuffer { rops, handles })
    }

    /// The payload's size once encoded (RopSize + RopsList + handle table).
    pub fn payload_len(&self) -> usize {
        2 + self.rops.len() + 4 * self.handles.len()
    }

    /// Writes one payload with Last (never compressed or obfuscated).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let n = self.payload_len();
        if n > MAX_PAYLOAD {
            return Err(EncodeError {
                field: "RPC_HEADER_EXT.Size",
                why: "payload over 0x8000 bytes",
            });
        }
        let mut out = Vec::with_capacity(8 + n);
        out.put_u16(0);
        out.put_u16(HEADER_LAST);
        out.put_u16(n as u16);
        out.put_u16(n as u16);
        out.put_u16((2 + self.rops.len()) as u16);
        out.put(&self.rops);
        for h in &self.handles {
            out.put_u32(*h);
        }
        Ok(out)
    }
}
