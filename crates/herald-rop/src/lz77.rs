//! The LZ77 + DIRECT2 compression of RPC_HEADER_EXT payloads (MS-OXCRPC 3.1.4.1.1.2; the
//! same bit layout as MS-XCA's plain LZ77): 32-bit flag words read from the top bit, a 0 bit
//! a literal byte, a 1 bit a 2-byte match (offset in the high 13 bits, length in the low 3,
//! extended through shared half-bytes, a byte and a 16-bit length). Decompression is bounded
//! by the size the header announces, so no input makes it allocate more.

use crate::wire::{DecodeError, Put, Reader};

/// The shortest match.
const MIN_MATCH: usize = 3;
/// The farthest back a match may point (13 bits of offset, plus one).
const WINDOW: usize = 8192;
/// The longest match the 16-bit length form can say.
const MAX_MATCH: usize = 0xFFFF + MIN_MATCH;

/// Decompresses `input`, which must expand to exactly `size` bytes.
pub fn decompress(input: &[u8], size: usize) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(input);
    let mut out: Vec<u8> = Vec::with_capacity(size);
    let mut flags = 0u32;
    let mut flag_count = 0u32;
    // Where the half-byte shared by two long matches is, while its second half is unused.
    let mut half_byte: Option<usize> = None;
    let invalid = |field, offset, value: usize, why| DecodeError::Invalid {
        field,
        offset,
        value: value as u64,
        why,
    };
    while out.len() < size {
        if flag_count == 0 {
            flags = r.u32("LZ77 flags")?;
            flag_count = 32;
        }
        flag_count -= 1;
        if flags & (1 << flag_count) == 0 {
            out.push(r.u8("LZ77 literal")?);
            continue;
        }
        let at = r.offset();
        let meta = usize::from(r.u16("LZ77 match")?);
        let offset = (meta >> 3) + 1;
        let mut length = meta & 7;
        if length == 7 {
            length = match half_byte.take() {
                Some(pos) => usize::from(input[pos] >> 4),
                None => {
                    half_byte = Some(r.offset());
                    usize::from(r.u8("LZ77 length nibble")? & 0x0F)
                }
            };
            if length == 15 {
                length = usize::from(r.u8("LZ77 length byte")?);
                if length == 255 {
                    let long_at = r.offset();
                    length = usize::from(r.u16("LZ77 length")?);
                    if length < 15 + 7 {
                        return Err(invalid(
                            "LZ77 length",
                            long_at,
                            length,
                            "a long length is at least 22",
                        ));
                    }
                    length -= 15 + 7;
                }
                length += 15;
            }
            length += 7;
        }
        length += MIN_MATCH;
        if offset > out.len() {
            return Err(invalid(
                "LZ77 match",
                at,
                offset,
                "points before the start of the data",
            ));
        }
        if out.len() + length > size {
            return Err(invalid(
                "LZ77 match",
                at,
                length,
                "expands past the announced size",
            ));
        }
        let start = out.len() - offset;
        // Byte by byte: a match may overlap what it is copying.
        for i in 0..length {
            out.push(out[start + i]);
        }
    }
    Ok(out)
}

/// Compresses `data` (greedy matching over a hash of three bytes). Herald never compresses
/// what it sends; this is for clients and tests that do.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 8);
    let mut flags_at = 0usize;
    let mut flags = 0u32;
    let mut flag_count = 0u32;
    let mut half_byte: Option<usize> = None;
    let mut last_seen: std::collections::HashMap<[u8; 3], usize> = Default::default();
    let mut i = 0;
    let mut bit = |out: &mut Vec<u8>, is_match: bool| {
        if flag_count == 0 {
            flags_at = out.len();
            out.put_u32(0);
            flags = 0;
            flag_count = 32;
        }
        flag_count -= 1;
        if is_match {
            flags |= 1 << flag_count;
        }
        out[flags_at..flags_at + 4].copy_from_slice(&flags.to_le_bytes());
    };
    while i < data.len() {
        let mut found = None;
        if i + MIN_MATCH <= data.len() {
            let key = [data[i], data[i + 1], data[i + 2]];
            if let Some(&at) = last_seen.get(&key) {
                if i - at <= WINDOW {
                    let len = data[i..]
                        .iter()
                        .zip(&data[at..])
                        .take(MAX_MATCH)
                        .take_while(|(a, b)| a == b)
                        .count();
                    found = Some((i - at, len));
                }
            }
            last_seen.insert(key, i);
        }
        match found {
            Some((offset, len)) if len >= MIN_MATCH => {
                bit(&mut out, true);
                let l = len - MIN_MATCH;
                let meta = ((offset - 1) << 3) | l.min(7);
                out.put_u16(meta as u16);
                if l >= 7 {
                    let rest = l - 7;
                    let nibble = rest.min(15) as u8;
                    match half_byte.take() {
                        Some(pos) => out[pos] |= nibble << 4,
                        None => {
                            half_byte = Some(out.len());
                            out.put_u8(nibble);
                        }
                    }
                    if rest >= 15 {
                        let rest = rest - 15;
                        if rest < 255 {
                            out.put_u8(rest as u8);
                        } else {
                            out.put_u8(255);
                            out.put_u16((len - MIN_MATCH) as u16);
                        }
                    }
                }
                i += len;
            }
            _ => {
                bit(&mut out, false);
                out.put_u8(data[i]);
                i += 1;
            }
        }
    }
    out
}
