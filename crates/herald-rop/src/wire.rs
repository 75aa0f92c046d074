//! Little-endian, unaligned reading and writing with errors that name the field and offset.

use thiserror::Error;

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The buffer ended inside a field.
    #[error("{field} at offset {offset}: needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{field} at offset {offset}: invalid value {value:#x}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// The value read.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Bytes were left over after a structure that must fill its buffer.
    #[error("{left} unexpected bytes after {what} at offset {offset}")]
    Trailing {
        /// The structure.
        what: &'static str,
        /// Where the extra bytes start.
        offset: usize,
        /// How many.
        left: usize,
    },
}

/// Why a value could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("cannot encode {field}: {why}")]
pub struct EncodeError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub why: &'static str,
}

/// A cursor over a byte slice. Every read is checked against what is left, so no length
/// field can make a caller allocate more than the input holds.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Added to positions in errors, when this reader covers part of a larger buffer.
    base: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            base: 0,
        }
    }

    /// Reads `buf`, reporting offsets as if it started at `base`.
    pub fn at(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    /// The offset of the next byte (in the larger buffer, if any).
    pub fn offset(&self) -> usize {
        self.base + self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated {
                field,
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// A byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Sixteen bytes.
    pub fn guid(&mut self, field: &'static str) -> Result<[u8; 16], DecodeError> {
        self.array(field)
    }

    /// A NUL-terminated 8-bit string (without its NUL), each byte one Latin-1 character.
    pub fn asciiz(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.offset();
        let rest = self.rest();
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Truncated {
                field,
                offset: start,
                needed: rest.len() + 1,
                available: rest.len(),
            });
        };
        let s = rest[..end].iter().map(|&b| char::from(b)).collect();
        self.pos += end + 1;
        Ok(s)
    }

    /// A NUL-terminated UTF-16LE string (without its two-byte NUL).
    pub fn utf16z(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.offset();
        let rest = self.rest();
        let units = rest
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        let Some(end) = units.clone().position(|u| u == 0) else {
            return Err(DecodeError::Truncated {
                field,
                offset: start,
                needed: rest.len() + 2,
                available: rest.len(),
            });
        };
        let s = char::decode_utf16(units.take(end))
            .collect::<Result<String, _>>()
            .map_err(|e| DecodeError::Invalid {
                field,
                offset: start,
                value: u64::from(e.unpaired_surrogate()),
                why: "unpaired UTF-16 surrogate",
            })?;
        self.pos += end * 2 + 2;
        Ok(s)
    }

    /// Fails if bytes are left.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                what,
                offset: self.offset(),
                left: self.remaining(),
            })
        }
    }
}

/// Appends little-endian values to a byte vector.
pub trait Put {
    /// A byte.
    fn put_u8(&mut self, v: u8);
    /// A little-endian u16.
    fn put_u16(&mut self, v: u16);
    /// A little-endian u32.
    fn put_u32(&mut self, v: u32);
    /// A little-endian u64.
    fn put_u64(&mut self, v: u64);
    /// Raw bytes.
    fn put(&mut self, b: &[u8]);
    /// A NUL-terminated 8-bit string; fails on characters beyond Latin-1 or NULs.
    fn put_asciiz(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError>;
    /// A NUL-terminated UTF-16LE string; fails on NULs.
    fn put_utf16z(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError>;
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn put_asciiz(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError> {
        for c in s.chars() {
            let b = u8::try_from(u32::from(c)).map_err(|_| EncodeError {
                field,
                why: "a character beyond Latin-1 in an 8-bit string",
            })?;
            if b == 0 {
                return Err(EncodeError {
                    field,
                    why: "a NUL inside the string",
                });
            }
            self.push(b);
        }
        self.push(0);
        Ok(())
    }
    fn put_utf16z(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError> {
        if s.contains('\0') {
            return Err(EncodeError {
                field,
                why: "a NUL inside the string",
            });
        }
        for u in s.encode_utf16() {
            self.put_u16(u);
        }
        self.put_u16(0);
        Ok(())
    }
}
