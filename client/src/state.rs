//! The crash-safe progress record of one download (`<title>.mca.state`).
//!
//! Written atomically (temp, fsync, rename) and only after the part file was fdatasync'ed, so
//! every unit it marks is on disk. After `kill -9` the receiver resumes from the last record
//! and fetches only what it lacks (plus what arrived after the last checkpoint).
//!
//! ```text
//! "MCRS" version:u8 archive_id:[16] server_key:[32] units:u64 bitmap:[u64 LE; ceil(units/64)]
//! checksum:[32] (BLAKE3 of everything before)
//! ```

use std::io::Write;
use std::path::Path;

use mcast_io::fsutil::AtomicFile;
use mcast_proto::codec::{Reader, Writer};

const MAGIC: &[u8; 4] = b"MCRS";
const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub archive_id: [u8; 16],
    /// The server key the download was pinned to when it started.
    pub server_key: [u8; 32],
    pub units: u64,
    pub have: Vec<u64>,
}

impl State {
    /// Whether unit `u` is recorded as held.
    pub fn has(&self, u: u64) -> bool {
        self.have
            .get((u / 64) as usize)
            .is_some_and(|w| w & (1 << (u % 64)) != 0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + self.have.len() * 8);
        b.extend_from_slice(MAGIC);
        b.put_u8(VERSION);
        b.extend_from_slice(&self.archive_id);
        b.extend_from_slice(&self.server_key);
        b.put_u64(self.units);
        for w in &self.have {
            b.put_u64(*w);
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Decode; `None` for anything damaged (the download then starts over).
    pub fn decode(buf: &[u8]) -> Option<State> {
        if buf.len() < 32 {
            return None;
        }
        let (body, sum) = buf.split_at(buf.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader::new(body);
        if r.bytes(4, "magic").ok()? != MAGIC || r.u8("version").ok()? != VERSION {
            return None;
        }
        let archive_id = r.array("archive_id").ok()?;
        let server_key = r.array("server_key").ok()?;
        let units = r.u64("units").ok()?;
        let words = units.div_ceil(64);
        if words * 8 != r.remaining() as u64 {
            return None;
        }
        let mut have = Vec::with_capacity(words as usize);
        for _ in 0..words {
            have.push(r.u64("bitmap").ok()?);
        }
        Some(State {
            archive_id,
            server_key,
            units,
            have,
        })
    }

    pub fn load(path: &Path) -> Option<State> {
        State::decode(&std::fs::read(path).ok()?)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut f = AtomicFile::create(path)?;
        f.file().write_all(&self.encode())?;
        f.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let s = State {
            archive_id: [1; 16],
            server_key: [2; 32],
            units: 130,
            have: vec![u64::MAX, 5, 1],
        };
        let b = s.encode();
        assert_eq!(State::decode(&b), Some(s));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert_eq!(State::decode(&d), None);
        }
        assert_eq!(State::decode(&b[..b.len() - 1]), None);
    }
}
