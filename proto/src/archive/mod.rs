//! The archive layout: a media file compressed, framed, sealed with per-frame keys and covered by a
//! signed manifest, ready to be looped by the carousel with no crypto on the send path.
//!
//! File layout (everything a receiver writes is at a fixed offset known from the head):
//!
//! ```text
//! preamble   16 bytes  "MCASTARC" version:u8 0*7
//! frames     data_len bytes; data packet i is bytes [i*S, (i+1)*S) of this region
//! repairs    repair_packets * S bytes; repair symbol r is bytes [r*S, (r+1)*S) (FEC only)
//! hashes     hash_blocks * S bytes; hash packet b is bytes [b*S, (b+1)*S) of this region
//! head       head_len bytes (see [`head`]), signed
//! tail       16 bytes  head_len:u64 "MCASTEND"
//! ```
//!
//! Packets are addressed by [`PacketId`]: a data packet by its serial (`block = serial / K`,
//! `symbol = serial % K`, with `K = S / 32` leaves per hash packet), a repair symbol by its
//! index `r` (hash block `n_blocks + r / K`, leaf `r % K`: repair symbols are verified exactly
//! like data) and a hash packet by its block. FEC ([`fec`]) groups data packets into larger
//! source blocks of their own; an archive without it has no repair region and a version-1
//! head, as before.

pub mod extras;
pub mod fec;
pub mod frame;
pub mod head;
pub mod manifest;

pub use head::{Compression, Head, HeadError};
pub use manifest::{PacketCheck, PacketVerifier};

pub const PREAMBLE: &[u8; 8] = b"MCASTARC";
pub const PREAMBLE_LEN: u64 = 16;
pub const TAIL_MAGIC: &[u8; 8] = b"MCASTEND";
pub const TAIL_LEN: u64 = 16;
/// Largest head we will read (bounds memory on hostile files): 64 MiB is ~2 million blocks,
/// i.e. archives up to ~100 GiB at the default symbol size.
pub const MAX_HEAD_LEN: u64 = 64 << 20;

/// A packet of the carousel, as addressed in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketId {
    /// Data packet by serial (block = serial / K, symbol = serial % K).
    Data(u64),
    /// The hash packet of a block (data blocks first, then the repair symbols' blocks).
    Hash(u64),
    /// A FEC repair symbol by index (`fec block = r / repair_symbols`).
    Repair(u64),
    /// An extra FEC symbol, never stored: made by the server on demand
    /// ([`extras::ExtraCache`]); `fec block = e / extras`, see [`fec::FecShape::extra_of`].
    Extra(u64),
}

/// Byte offsets of the regions of one archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub symbol_size: u64,
    pub data_len: u64,
    /// Repair symbols (each a full symbol).
    pub repair_packets: u64,
    /// Hash packets of data and repair blocks.
    pub n_blocks: u64,
    pub head_len: u64,
}

impl Layout {
    pub fn of(head: &Head, head_len: u64) -> Layout {
        Layout {
            symbol_size: head.symbol_size as u64,
            data_len: head.data_len,
            repair_packets: head.repair_packets(),
            n_blocks: head.hash_blocks(),
            head_len,
        }
    }

    pub fn data_offset(&self) -> u64 {
        PREAMBLE_LEN
    }

    pub fn repair_offset(&self) -> u64 {
        PREAMBLE_LEN + self.data_len
    }

    pub fn hash_offset(&self) -> u64 {
        self.repair_offset() + self.repair_packets * self.symbol_size
    }

    pub fn head_offset(&self) -> u64 {
        self.hash_offset() + self.n_blocks * self.symbol_size
    }

    pub fn file_len(&self) -> u64 {
        self.head_offset() + self.head_len + TAIL_LEN
    }

    /// File offset and length of a packet's payload, or `None` if it does not exist.
    pub fn packet_range(&self, id: PacketId) -> Option<(u64, usize)> {
        match id {
            PacketId::Data(serial) => {
                let start = serial.checked_mul(self.symbol_size)?;
                if start >= self.data_len {
                    return None;
                }
                let len = (self.data_len - start).min(self.symbol_size);
                Some((self.data_offset() + start, len as usize))
            }
            PacketId::Hash(block) => {
                if block >= self.n_blocks {
                    return None;
                }
                Some((
                    self.hash_offset() + block * self.symbol_size,
                    self.symbol_size as usize,
                ))
            }
            PacketId::Extra(_) => None,
            PacketId::Repair(r) => {
                if r >= self.repair_packets {
                    return None;
                }
                Some((
                    self.repair_offset() + r * self.symbol_size,
                    self.symbol_size as usize,
                ))
            }
        }
    }
}

/// Version of the file layout in the preamble. The layout is fully described by the head
/// (a FEC archive's repair region included), so it stays 1 across head versions.
pub const PREAMBLE_VERSION: u8 = 1;

pub fn preamble_bytes() -> [u8; PREAMBLE_LEN as usize] {
    let mut p = [0u8; PREAMBLE_LEN as usize];
    p[..8].copy_from_slice(PREAMBLE);
    p[8] = PREAMBLE_VERSION;
    p
}

pub fn tail_bytes(head_len: u64) -> [u8; TAIL_LEN as usize] {
    let mut t = [0u8; TAIL_LEN as usize];
    t[..8].copy_from_slice(&head_len.to_le_bytes());
    t[8..].copy_from_slice(TAIL_MAGIC);
    t
}
