//! Byte-level encoding shared by the manifest, the file index and the wire messages.
//!
//! Everything the project persists or sends is built from three primitives: LEB128 varints,
//! length-prefixed byte strings and fixed 32-byte hashes. Decoding is defensive: every read is
//! bounds-checked and every length is checked against a caller-supplied limit *before* anything
//! is allocated, so a hostile or corrupt input yields a [`DecodeError`], never a panic or an
//! unbounded allocation.

use thiserror::Error;

/// Why a byte string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("input ends early (needed {needed} more bytes)")]
    Truncated { needed: usize },
    #[error("varint is longer than 10 bytes or overflows 64 bits")]
    BadVarint,
    #[error("{what} length {len} exceeds the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u64 },
    #[error("invalid {what}: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
    #[error("{0} trailing bytes after the end of the record")]
    Trailing(usize),
}

/// Appends encoded values to a byte vector.
#[derive(Default, Debug)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// Signed values use zig-zag encoding so small negatives stay small.
    pub fn varint_signed(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub fn hash(&mut self, h: &[u8; 32]) {
        self.buf.extend_from_slice(h);
    }

    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Reads encoded values from a byte slice, never past its end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// Fails unless the whole input was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(DecodeError::BadVarint);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarint)
    }

    /// A varint that must fit `limit` (inclusive).
    pub fn varint_max(&mut self, what: &'static str, limit: u64) -> Result<u64, DecodeError> {
        let v = self.varint()?;
        if v > limit {
            return Err(DecodeError::TooLong {
                what,
                len: v,
                limit,
            });
        }
        Ok(v)
    }

    pub fn varint_signed(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.varint_max(what, u64::from(u32::MAX))? as u32)
    }

    /// A length-prefixed byte string of at most `limit` bytes.
    pub fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint_max(what, limit as u64)? as usize;
        self.take(len)
    }

    pub fn hash(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.take(32)?);
        Ok(out)
    }
}

/// Decodes a sequence of records from a byte stream (a file), holding one read buffer, never
/// the whole stream: the stored manifest and the quick-check index are read this way.
pub struct StreamDecoder<R> {
    input: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

/// Bytes read at a time; a record larger than this doubles the buffer until it fits.
const STREAM_READ: usize = 256 * 1024;

impl<R: std::io::Read> StreamDecoder<R> {
    pub fn new(input: R) -> Self {
        StreamDecoder {
            input,
            buf: Vec::new(),
            start: 0,
            eof: false,
        }
    }

    /// Decodes the next record with `decode`; `Ok(None)` at the clean end of the stream. A
    /// record cut off by the end of the stream is an error, and so is whatever `decode` says.
    pub fn next<T>(
        &mut self,
        decode: impl Fn(&mut Reader<'_>) -> Result<T, DecodeError>,
    ) -> std::io::Result<Option<T>> {
        loop {
            if self.start < self.buf.len() {
                let mut r = Reader::new(&self.buf[self.start..]);
                match decode(&mut r) {
                    Ok(v) => {
                        self.start += r.position();
                        return Ok(Some(v));
                    }
                    Err(DecodeError::Truncated { .. }) if !self.eof => {}
                    Err(e) => return Err(invalid(e)),
                }
            } else if self.eof {
                return Ok(None);
            }
            self.refill()?;
        }
    }

    /// Drops what was decoded and reads more (at least as much again as is buffered, so a
    /// record larger than one read costs a logarithmic number of retries).
    fn refill(&mut self) -> std::io::Result<()> {
        self.buf.drain(..self.start);
        self.start = 0;
        let have = self.buf.len();
        self.buf.resize(have + STREAM_READ.max(have), 0);
        let mut filled = have;
        while filled < self.buf.len() {
            match self.input.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(filled);
                    return Err(e);
                }
            }
        }
        self.buf.truncate(filled);
        Ok(())
    }
}

fn invalid(e: DecodeError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Lower-case hexadecimal of a byte string.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses lower- or upper-case hexadecimal into exactly `N` bytes.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(v: u64, s: i64) {
            let mut w = Writer::new();
            w.varint(v);
            w.varint_signed(s);
            let mut r = Reader::new(&w.buf);
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert_eq!(r.varint_signed().unwrap(), s);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn reader_never_panics(data: Vec<u8>) {
            let mut r = Reader::new(&data);
            let _ = r.varint();
            let _ = r.bytes("x", 16);
            let _ = r.hash();
        }
    }

    #[test]
    fn overlong_varint_is_rejected() {
        let bytes = [0xffu8; 11];
        assert_eq!(Reader::new(&bytes).varint(), Err(DecodeError::BadVarint));
        let mut bytes = [0xffu8; 10];
        bytes[9] = 0x02;
        assert_eq!(Reader::new(&bytes).varint(), Err(DecodeError::BadVarint));
    }

    #[test]
    fn length_limit_is_checked_before_reading() {
        let mut w = Writer::new();
        w.varint(1 << 40);
        let err = Reader::new(&w.buf).bytes("name", 255).unwrap_err();
        assert!(matches!(err, DecodeError::TooLong { what: "name", .. }));
    }

    #[test]
    fn hex_round_trip() {
        let h = [0xabu8; 32];
        assert_eq!(from_hex::<32>(&to_hex(&h)), Some(h));
        assert_eq!(from_hex::<32>("zz"), None);
    }
}
