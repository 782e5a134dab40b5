//! The integrity tree that lets a receiver check every packet before it writes it, long before
//! it holds any key (DESIGN.md §2 "Integrity").
//!
//! ```text
//!   signed head ── block_hashes[b] = BLAKE3-keyed(block_key, hash packet b)
//!   hash packet b ── leaf[s] for each data packet (b, s), 32 bytes each, zero-padded to a symbol
//!   leaf[s] = BLAKE3-keyed(leaf_key, payload)      (LeafHash::Blake3)
//!           | SHA-256(leaf_key || payload)         (LeafHash::Sha256)
//! ```
//!
//! The leaf hash is the receiver's biggest per-packet cost. BLAKE3 is fastest on long inputs
//! (its SIMD works across 1 KiB chunks: ~4.7 GB/s at 8 KiB here) but a 1280-byte packet is one
//! chunk and a bit, hashed serially (~0.9 GB/s); SHA-256 with the SHA extensions that current
//! x86 (SHA-NI) and ARMv8 CPUs have does ~1.65 GB/s on the same packet. So `auto` picks SHA-256
//! below 4 KiB symbols and BLAKE3 above; the choice is a flag in the signed head.
//!
//! Both keys are derived from the archive id (`derive_key`), so hashes are bound to one archive
//! and a leaf can never be mistaken for a hash packet. One hash packet covers a whole block
//! (`block_symbols = symbol_size / 32`), so the tree costs one packet in `K + 1` (2.4% at the
//! default 1280-byte symbol) and the signed head one hash per block.

use super::head::Head;

pub const HASH_LEN: usize = 32;

/// How data packets are hashed into leaves (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LeafHash {
    #[default]
    Blake3,
    Sha256,
}

impl LeafHash {
    /// The faster of the two for packets of `symbol_size` bytes.
    pub fn auto(symbol_size: u32) -> LeafHash {
        if symbol_size < 4096 {
            LeafHash::Sha256
        } else {
            LeafHash::Blake3
        }
    }

    /// `"auto"` is resolved by the caller ([`LeafHash::auto`]); `None` for anything unknown.
    pub fn from_name(name: &str) -> Option<LeafHash> {
        match name {
            "blake3" => Some(LeafHash::Blake3),
            "sha256" => Some(LeafHash::Sha256),
            _ => None,
        }
    }
}

/// Keys of the integrity tree of one archive.
#[derive(Clone)]
pub struct TreeKeys {
    leaf: [u8; 32],
    block: [u8; 32],
    leaf_hash: LeafHash,
}

impl TreeKeys {
    pub fn new(archive_id: &[u8; 16], leaf_hash: LeafHash) -> TreeKeys {
        TreeKeys {
            leaf: blake3::derive_key("mcast manifest leaf v1", archive_id),
            block: blake3::derive_key("mcast manifest block v1", archive_id),
            leaf_hash,
        }
    }

    pub fn leaf(&self, payload: &[u8]) -> [u8; HASH_LEN] {
        match self.leaf_hash {
            LeafHash::Blake3 => *blake3::keyed_hash(&self.leaf, payload).as_bytes(),
            LeafHash::Sha256 => {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(self.leaf);
                h.update(payload);
                h.finalize().into()
            }
        }
    }

    pub fn block(&self, hash_packet: &[u8]) -> [u8; HASH_LEN] {
        *blake3::keyed_hash(&self.block, hash_packet).as_bytes()
    }
}

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketCheck {
    #[error("hash packet of block {0} does not match the signed manifest")]
    HashPacket(u64),
    #[error("data packet {0} does not match its manifest hash")]
    DataPacket(u64),
    #[error("repair symbol {0} does not match its manifest hash")]
    RepairPacket(u64),
    #[error("extra FEC symbol {0} does not match its manifest hash")]
    ExtraPacket(u64),
    #[error("packet address out of range")]
    OutOfRange,
    #[error("packet has the wrong length")]
    Length,
}

/// Checks packets of one archive against its (signature-verified) head.
#[derive(Clone)]
pub struct PacketVerifier {
    keys: TreeKeys,
    symbol_size: usize,
    block_symbols: u64,
    data_len: u64,
    data_blocks: u64,
    /// The FEC geometry: which repair and extra symbols exist, and where their leaves are
    /// (each block's [`super::fec::FecShape::hashed`] symbols start a hash packet).
    fec: Option<super::fec::FecShape>,
}

impl PacketVerifier {
    pub fn new(head: &Head) -> PacketVerifier {
        PacketVerifier {
            keys: TreeKeys::new(&head.archive_id, head.leaf_hash),
            symbol_size: head.symbol_size as usize,
            block_symbols: head.block_symbols as u64,
            data_len: head.data_len,
            data_blocks: head.n_blocks(),
            fec: super::fec::FecShape::of(head),
        }
    }

    /// Hash block and leaf position of symbol `j` of FEC block `g`'s code.
    fn code_leaf(&self, fec: &super::fec::FecShape, g: u64, j: u64) -> (u64, u64) {
        let k = self.block_symbols;
        let per_group = fec.hashed().div_ceil(k);
        (self.data_blocks + g * per_group + j / k, j % k)
    }

    /// Hash block and leaf position of repair symbol `r` (`None` out of range).
    fn repair_leaf(&self, r: u64) -> Option<(u64, u64)> {
        let fec = self.fec?;
        (r < fec.blocks * fec.repair).then(|| self.code_leaf(&fec, r / fec.repair, r % fec.repair))
    }

    /// Hash block and leaf position of extra symbol `e` (`None` out of range).
    fn extra_leaf(&self, e: u64) -> Option<(u64, u64)> {
        let fec = self.fec?;
        let (g, j) = fec.extra_of(e)?;
        Some(self.code_leaf(&fec, g, j))
    }

    /// Check extra symbol `e` against the (already verified) hash packet of its block.
    pub fn check_extra_packet(
        &self,
        verified_hash_packet: &[u8],
        e: u64,
        payload: &[u8],
    ) -> Result<(), PacketCheck> {
        let (_, leaf) = self.extra_leaf(e).ok_or(PacketCheck::OutOfRange)?;
        self.check_symbol(verified_hash_packet, leaf, payload)
            .map_err(|c| c.unwrap_or(PacketCheck::ExtraPacket(e)))
    }

    /// Check repair symbol `r` against the (already verified) hash packet of its block.
    pub fn check_repair_packet(
        &self,
        verified_hash_packet: &[u8],
        r: u64,
        payload: &[u8],
    ) -> Result<(), PacketCheck> {
        let (_, leaf) = self.repair_leaf(r).ok_or(PacketCheck::OutOfRange)?;
        self.check_symbol(verified_hash_packet, leaf, payload)
            .map_err(|c| c.unwrap_or(PacketCheck::RepairPacket(r)))
    }

    /// A full-size FEC symbol against leaf `leaf` of a verified hash packet: `Err(None)` when
    /// the hash differs (the caller names the symbol), `Err(Some(_))` for the other refusals.
    fn check_symbol(
        &self,
        verified_hash_packet: &[u8],
        leaf: u64,
        payload: &[u8],
    ) -> Result<(), Option<PacketCheck>> {
        if payload.len() != self.symbol_size {
            return Err(Some(PacketCheck::Length));
        }
        let s = leaf as usize * HASH_LEN;
        let expected = verified_hash_packet
            .get(s..s + HASH_LEN)
            .ok_or(Some(PacketCheck::OutOfRange))?;
        if self.keys.leaf(payload) != expected {
            return Err(None);
        }
        Ok(())
    }

    /// Check a data or repair packet against its (already verified) hash packet.
    pub fn check_leaf(
        &self,
        verified_hash_packet: &[u8],
        id: super::PacketId,
        payload: &[u8],
    ) -> Result<(), PacketCheck> {
        match id {
            super::PacketId::Data(s) => self.check_data_packet(verified_hash_packet, s, payload),
            super::PacketId::Repair(r) => {
                self.check_repair_packet(verified_hash_packet, r, payload)
            }
            super::PacketId::Extra(e) => self.check_extra_packet(verified_hash_packet, e, payload),
            super::PacketId::Hash(_) => Err(PacketCheck::OutOfRange),
        }
    }

    /// Length a data packet must have (the last one may be short).
    pub fn data_packet_len(&self, serial: u64) -> Option<usize> {
        let start = serial.checked_mul(self.symbol_size as u64)?;
        if start >= self.data_len {
            return None;
        }
        Some((self.data_len - start).min(self.symbol_size as u64) as usize)
    }

    /// Check a hash packet against the head's block hash.
    pub fn check_hash_packet(
        &self,
        head: &Head,
        block: u64,
        payload: &[u8],
    ) -> Result<(), PacketCheck> {
        let expected = head
            .block_hashes
            .get(usize::try_from(block).map_err(|_| PacketCheck::OutOfRange)?)
            .ok_or(PacketCheck::OutOfRange)?;
        if payload.len() != self.symbol_size {
            return Err(PacketCheck::Length);
        }
        if &self.keys.block(payload) != expected {
            return Err(PacketCheck::HashPacket(block));
        }
        Ok(())
    }

    /// Check data packet `serial` against the (already verified) hash packet of its block.
    pub fn check_data_packet(
        &self,
        verified_hash_packet: &[u8],
        serial: u64,
        payload: &[u8],
    ) -> Result<(), PacketCheck> {
        let len = self
            .data_packet_len(serial)
            .ok_or(PacketCheck::OutOfRange)?;
        if payload.len() != len {
            return Err(PacketCheck::Length);
        }
        let s = (serial % self.block_symbols) as usize * HASH_LEN;
        let expected = verified_hash_packet
            .get(s..s + HASH_LEN)
            .ok_or(PacketCheck::OutOfRange)?;
        if self.keys.leaf(payload) != expected {
            return Err(PacketCheck::DataPacket(serial));
        }
        Ok(())
    }
}

/// Builds the tree while the packer streams the frames region out: call [`Self::update`] with
/// every byte in order, then [`Self::finish`].
pub struct TreeBuilder {
    keys: TreeKeys,
    symbol_size: usize,
    pending: Vec<u8>,
    leaves: Vec<[u8; HASH_LEN]>,
    repair_leaves: Vec<[u8; HASH_LEN]>,
    repair_group: usize,
}

impl TreeBuilder {
    pub fn new(archive_id: &[u8; 16], symbol_size: u32, leaf_hash: LeafHash) -> TreeBuilder {
        TreeBuilder {
            keys: TreeKeys::new(archive_id, leaf_hash),
            symbol_size: symbol_size as usize,
            pending: Vec::with_capacity(symbol_size as usize),
            leaves: Vec::new(),
            repair_leaves: Vec::new(),
            repair_group: 1,
        }
    }

    /// A symbol of a FEC block's code, in index order, after every data byte
    /// ([`Self::update`]): each block's [`super::fec::hashed_symbols`] (stored repairs, then
    /// extras); `per_block` is that count (each block's start a hash packet).
    pub fn push_repair(&mut self, symbol: &[u8], per_block: usize) {
        self.repair_group = per_block.max(1);
        self.repair_leaves.push(self.keys.leaf(symbol));
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if !self.pending.is_empty() {
            let take = (self.symbol_size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == self.symbol_size {
                self.leaves.push(self.keys.leaf(&self.pending));
                self.pending.clear();
            }
        }
        let mut chunks = bytes.chunks_exact(self.symbol_size);
        for c in &mut chunks {
            self.leaves.push(self.keys.leaf(c));
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    /// The hash packets (each exactly one symbol: the data blocks', then the repair
    /// symbols') and their block hashes.
    pub fn finish(mut self) -> (Vec<u8>, Vec<[u8; HASH_LEN]>) {
        if !self.pending.is_empty() {
            self.leaves.push(self.keys.leaf(&self.pending));
        }
        let (mut region, mut hashes) = hash_packets(&self.keys, &self.leaves, self.symbol_size);
        let (r, h) = repair_hash_packets(
            &self.keys,
            &self.repair_leaves,
            self.repair_group,
            self.symbol_size,
        );
        region.extend_from_slice(&r);
        hashes.extend_from_slice(&h);
        (region, hashes)
    }
}

/// Hash packets of repair symbols: each FEC block's `per_block` leaves start a packet.
pub fn repair_hash_packets(
    keys: &TreeKeys,
    leaves: &[[u8; HASH_LEN]],
    per_block: usize,
    symbol_size: usize,
) -> (Vec<u8>, Vec<[u8; HASH_LEN]>) {
    let (mut region, mut hashes) = (Vec::new(), Vec::new());
    for group in leaves.chunks(per_block.max(1)) {
        let (r, h) = hash_packets(keys, group, symbol_size);
        region.extend_from_slice(&r);
        hashes.extend_from_slice(&h);
    }
    (region, hashes)
}

/// Hash packets (one symbol each, `symbol_size / 32` leaves per packet) and their block
/// hashes.
pub fn hash_packets(
    keys: &TreeKeys,
    leaves: &[[u8; HASH_LEN]],
    symbol_size: usize,
) -> (Vec<u8>, Vec<[u8; HASH_LEN]>) {
    let per_block = symbol_size / HASH_LEN;
    let n_blocks = leaves.len().div_ceil(per_block);
    let mut region = vec![0u8; n_blocks * symbol_size];
    let mut block_hashes = Vec::with_capacity(n_blocks);
    for (b, leaves) in leaves.chunks(per_block).enumerate() {
        let packet = &mut region[b * symbol_size..(b + 1) * symbol_size];
        for (i, l) in leaves.iter().enumerate() {
            packet[i * HASH_LEN..(i + 1) * HASH_LEN].copy_from_slice(l);
        }
        block_hashes.push(keys.block(packet));
    }
    (region, block_hashes)
}
