//! Fixtures shared by the fuzz targets and the seed generator: fixed keys, a small genuine
//! archive "world" for the receiver's download engine, and the record framing that lets one
//! fuzz input carry a sequence of datagrams.
//!
//! Everything here is deterministic, so seeds generated once keep matching the targets.

use std::sync::Arc;

use mcast::archive::head::Compression;
use mcast::archive::manifest::{LeafHash, TreeBuilder};
use mcast::archive::{Head, Layout, PacketId, PREAMBLE_LEN};
use mcast::carousel::LoopShape;
use mcast_keys::{Cipher, Identity};

/// Server identity the targets trust (and re-sign with, where a target explores what lies
/// behind a signature check).
pub const IDENTITY_SECRET: [u8; 32] = [0x11; 32];
/// Shared heartbeat key of the director target.
pub const HEARTBEAT_KEY: [u8; 32] = [0x22; 32];
/// Ticket database key of the ticket target.
pub const DB_KEY: [u8; 32] = [0x33; 32];
/// Director wall clock in the director target (heartbeat seeds are stamped with it).
pub const DIRECTOR_UNIX_MS: u64 = 1_800_000_000_000;

pub fn identity() -> Identity {
    Identity::from_secret(&IDENTITY_SECRET)
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A small genuine archive as a receiver sees it: its signed head and every packet.
pub struct World {
    pub head: Arc<Head>,
    pub head_len: u64,
    pub layout: Layout,
    pub shape: LoopShape,
    /// The archive file as a finished download holds it (head and tail regions left zero:
    /// the download engine only writes packets).
    pub file: Vec<u8>,
}

/// 256-byte symbols (8 per block), 3 full blocks and a short fourth one ending in a short
/// last packet: every edge of the block arithmetic in a few packets.
pub const WORLD_SYMBOL: u32 = 256;
pub const WORLD_DATA_LEN: u64 = 3 * 8 * 256 + 300;
pub const WORLD_ARCHIVE_ID: [u8; 16] = [0x5a; 16];

pub fn world() -> World {
    let data = bytes(WORLD_DATA_LEN as usize, 7);
    let mut tree = TreeBuilder::new(&WORLD_ARCHIVE_ID, WORLD_SYMBOL, LeafHash::Sha256);
    tree.update(&data);
    let (hash_region, block_hashes) = tree.finish();
    let mut head = Head {
        advert: false,
        plugin: false,
        advert_for: Vec::new(),
        placement: Default::default(),
        leaf_hash: LeafHash::Sha256,
        cipher: Cipher::Aes256Gcm,
        compression: Compression::None,
        archive_id: WORLD_ARCHIVE_ID,
        key_id: [0; 16],
        title: "fuzz".into(),
        watermark: String::new(),
        created_unix: 0,
        plain_len: 0,
        plain_hash: [0; 32],
        plain_hash_keyed: false,
        frame_size: 1 << 20,
        frame_count: 0,
        data_len: WORLD_DATA_LEN,
        symbol_size: WORLD_SYMBOL,
        block_symbols: WORLD_SYMBOL / 32,
        repair_symbols: 0,
        fec_source: 0,
        server_key: mcast_keys::PublicIdentity([0; 32]),
        block_hashes,
        signature: [0; 64],
    };
    head.sign(&identity());
    let head_len = head.encode().len() as u64;
    let layout = Layout::of(&head, head_len);
    let mut file = vec![0u8; layout.file_len() as usize];
    let d0 = layout.data_offset() as usize;
    file[d0..d0 + data.len()].copy_from_slice(&data);
    let h0 = layout.hash_offset() as usize;
    file[h0..h0 + hash_region.len()].copy_from_slice(&hash_region);
    debug_assert_eq!(layout.data_offset(), PREAMBLE_LEN);
    World {
        shape: LoopShape::of(&head),
        head: Arc::new(head),
        head_len,
        layout,
        file,
    }
}

impl World {
    /// The genuine payload of a packet.
    pub fn packet(&self, id: PacketId) -> Option<&[u8]> {
        let (off, len) = self.layout.packet_range(id)?;
        Some(&self.file[off as usize..off as usize + len])
    }

    /// Every packet in loop order.
    pub fn loop_packets(&self) -> Vec<PacketId> {
        (0..self.shape.loop_packets())
            .map(|j| self.shape.packet_at(j))
            .collect()
    }
}

/// Split a fuzz input into records: `len:u16 LE` then `len` bytes, the last record taking
/// whatever is left. One input is then a sequence of datagrams.
pub fn records(mut input: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if input.is_empty() {
            return None;
        }
        if input.len() < 2 {
            let r = input;
            input = &[];
            return Some(r);
        }
        let n = u16::from_le_bytes([input[0], input[1]]) as usize;
        let rest = &input[2..];
        let n = n.min(rest.len());
        let (r, tail) = rest.split_at(n);
        input = tail;
        Some(r)
    })
}

/// The inverse of [`records`], for seeds.
pub fn join_records<T: AsRef<[u8]>>(recs: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in recs {
        let r = r.as_ref();
        out.extend_from_slice(&(r.len() as u16).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}
