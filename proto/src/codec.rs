//! Little-endian byte reading and writing shared by every on-disk and on-wire format.
//!
//! [`Reader`] never panics: every read is bounds-checked and returns [`Short`] when the input
//! ends early, so decoders of untrusted bytes stay total.

/// The input ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("input ends inside field {0}")]
pub struct Short(pub &'static str);

/// A cursor over untrusted bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Short> {
        if self.remaining() < n {
            return Err(Short(field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, Short> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, Short> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u16-length-prefixed byte string of at most `max` bytes.
    pub fn short_bytes(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], Short> {
        let n = self.u16(field)? as usize;
        if n > max {
            return Err(Short(field));
        }
        self.bytes(n, field)
    }
}

/// Append-only little-endian writer.
pub trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_short_bytes(&mut self, b: &[u8]);
}

impl Writer for Vec<u8> {
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
    /// u16 length prefix; callers validate lengths before encoding.
    fn put_short_bytes(&mut self, b: &[u8]) {
        let n = u16::try_from(b.len()).expect("short byte string over 65535 bytes");
        self.put_u16(n);
        self.extend_from_slice(b);
    }
}
