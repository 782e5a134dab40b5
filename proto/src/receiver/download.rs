//! The receiver's download state machine: which loop units it has, and whether a packet may be
//! written. Sans-I/O: the driver feeds it packets and writes what it is told to write.
//!
//! A data packet is written only after it verified against its block's hash packet, which
//! itself verified against the signed head, so a forged or foreign packet can neither corrupt
//! the file nor count as received.
//!
//! Data packets that arrive before their block's hash packet (a late joiner's first block, or
//! a lost hash packet) are *parked* in memory, bounded by [`MAX_PARKED_BYTES`], and written
//! as soon as the hash packet arrives; so losing one hash packet costs one repair, not a
//! block's worth.
//!
//! A FEC archive's repair symbols are verified and written the same way (into the repair
//! region). [`FecTally`] counts the symbols held per source block: once a block holds as
//! many as it has data packets, [`Download::take_decodable`] names it and the session has it
//! decoded ([`crate::archive::fec::decode_block`]); the restored packets come back through
//! [`Download::accept_decoded`]. The download is complete when every data packet and data
//! hash packet is held; repair symbols only help get there.
//!
//! Extra symbols ([`PacketId::Extra`], the server's answers to amount NAKs) are verified the
//! same way, against the repair hash packets that list them, but never written: the archive
//! does not store them. They are kept in memory ([`MAX_EXTRA_BYTES`]) until their block
//! decodes, and count towards it like any symbol.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::archive::fec::FecShape;
use crate::archive::{Head, Layout, PacketId, PacketVerifier};
use crate::carousel::LoopShape;
use serde::Serialize;

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and verified: write the payload at this file offset.
    Write { offset: u64 },
    /// Already held.
    Duplicate,
    /// Its block's hash packet has not arrived yet: kept in memory until it does.
    Parked,
    /// Its block's hash packet has not arrived and the parking space (or this packet id's
    /// share of it, [`MAX_PARKED_CANDIDATES`]) is full: dropped.
    NoHashYet,
    /// Failed verification or out of range: dropped and counted.
    Rejected,
    /// Its block's hash packet is held but was evicted from memory: the driver reads it back
    /// from the file, passes it to [`Download::restore_hash`] and offers the packet again.
    NeedHash(u64),
    /// An extra FEC symbol, verified and kept in memory until its block decodes: nothing to
    /// write.
    Kept,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadCounters {
    pub written: u64,
    /// Data packets restored by FEC decoding.
    pub fec_restored: u64,
    /// FEC source blocks decoded.
    pub fec_decodes: u64,
    /// Repair symbols that arrived for a block already complete.
    pub fec_unneeded: u64,
    /// Repair symbols and their hash packets written (they count in `written`).
    pub fec_repairs_written: u64,
    /// Extra symbols verified and kept for decoding (answers to amount NAKs), and those
    /// dropped for want of memory.
    pub fec_extras_kept: u64,
    pub fec_extras_dropped: u64,
    pub duplicates: u64,
    pub no_hash_yet: u64,
    pub parked: u64,
    /// Packets not parked because their packet id already had [`MAX_PARKED_CANDIDATES`]
    /// different candidates waiting (forgeries on the group, most likely).
    pub parked_excess: u64,
    pub rejected: u64,
}

pub struct Download {
    head: Arc<Head>,
    shape: LoopShape,
    layout: Layout,
    verifier: PacketVerifier,
    have: Vec<u64>,
    /// Units held, of every kind (FEC repair symbols and their hash packets too).
    held_all: u64,
    /// Held units a complete download needs (data and data hash packets).
    have_required: u64,
    fec: Option<FecTally>,
    /// Verified symbols of the FEC blocks in flight, kept so that a block is decoded from
    /// memory, without reading the part file back (which waits for the disk thread and
    /// stalls the socket drain). At most [`FEC_MEM_BLOCKS`] blocks; a block that was evicted,
    /// or held symbols before this run, is decoded from the file instead.
    fec_mem: HashMap<u64, Vec<(PacketId, Vec<u8>)>>,
    fec_mem_order: VecDeque<u64>,
    /// Per FEC block: every held symbol is in `fec_mem`.
    fec_mem_whole: Vec<bool>,
    /// Verified hash packets of blocks that still miss data, at most `hash_cache_max` (the
    /// rest are re-read from the file when needed: memory stays bounded whatever the loss).
    hash_cache: HashMap<u64, Vec<u8>>,
    hash_order: VecDeque<u64>,
    hash_cache_max: usize,
    /// Leaves (data or repair packets) still missing per hash block.
    block_missing: Vec<u32>,
    /// Unverifiable leaves waiting for their hash block's packet.
    parked: HashMap<u64, Vec<(PacketId, Vec<u8>)>>,
    parked_order: VecDeque<u64>,
    parked_bytes: usize,
    /// Writes made possible by the last hash packet (see [`Download::take_released`]).
    released: Vec<(u64, Vec<u8>)>,
    /// Parked units that turned out forged (still missing, and now known to be).
    unpark_rejects: Vec<u64>,
    /// Verified extra symbols per FEC block, as (code index, payload), until it decodes.
    extras: HashMap<u64, Vec<(u64, Vec<u8>)>>,
    extras_bytes: usize,
    pub counters: DownloadCounters,
}

/// Per FEC source block: symbols held, and which blocks can be decoded now.
#[derive(Clone, Debug)]
pub struct FecTally {
    pub shape: FecShape,
    data_held: Vec<u32>,
    repair_held: Vec<u32>,
    /// Extra symbols kept in memory (see [`Download::extras_held`]).
    extra_held: Vec<u32>,
    /// Symbols parked (unverified, their hash packet missing) per block: a decode may use
    /// them, and checks what it restores against the signed manifest.
    parked: Vec<u32>,
    /// Blocks named by [`Download::take_decodable`] and not yet decoded.
    pending: Vec<bool>,
    ready: Vec<u64>,
}

impl FecTally {
    fn new(shape: FecShape) -> FecTally {
        let n = shape.blocks as usize;
        FecTally {
            shape,
            data_held: vec![0; n],
            repair_held: vec![0; n],
            extra_held: vec![0; n],
            parked: vec![0; n],
            pending: vec![false; n],
            ready: Vec::new(),
        }
    }

    /// Symbols of block `f` held (data, repair and extra).
    pub fn held(&self, f: u64) -> u64 {
        let i = f as usize;
        (self.data_held[i] + self.repair_held[i] + self.extra_held[i]) as u64
    }

    /// Extra symbols of block `f` held.
    pub fn extras_held(&self, f: u64) -> u64 {
        self.extra_held[f as usize] as u64
    }

    /// Whether block `f`'s data is all held.
    pub fn complete(&self, f: u64) -> bool {
        self.data_held[f as usize] as u64 == self.shape.source_count(f)
    }

    /// Symbols block `f` still needs before it can be decoded (0: complete or decodable),
    /// counting parked ones.
    pub fn deficit(&self, f: u64) -> u64 {
        self.shape
            .source_count(f)
            .saturating_sub(self.held(f) + self.parked[f as usize] as u64)
    }

    fn check(&mut self, f: u64) {
        let i = f as usize;
        if !self.pending[i] && !self.complete(f) && self.deficit(f) == 0 {
            self.pending[i] = true;
            self.ready.push(f);
        }
    }
}

/// FEC blocks whose symbols are kept in memory (the loop has about two in flight).
pub const FEC_MEM_BLOCKS: usize = 4;

/// Memory for extra symbols waiting for their block to decode (~50,000 at 1280 bytes).
pub const MAX_EXTRA_BYTES: usize = 64 << 20;

/// Memory for parked packets (a few blocks' worth at any symbol size).
pub const MAX_PARKED_BYTES: usize = 8 << 20;
/// Byte-different candidates parked per packet id. Anyone on the group can send any number
/// of forged versions of one packet before its hash packet: past this many the rest are
/// dropped ([`DownloadCounters::parked_excess`]), so a flood on one id neither fills the
/// parking space nor evicts other blocks' packets. A genuine packet among the first few is
/// found when the hash packet comes; one that came later was dropped, and when every
/// candidate kept fails, the unit is NAKed like a lost one (never written from a forgery).
pub const MAX_PARKED_CANDIDATES: usize = 4;
/// Memory for cached hash packets (6,553 blocks at 1280-byte symbols).
pub const MAX_HASH_CACHE_BYTES: usize = 8 << 20;

impl Download {
    /// A fresh download, or a resumed one when `have_bits` comes from a state file.
    pub fn new(head: Arc<Head>, head_len: u64, have_bits: Option<Vec<u64>>) -> Download {
        let shape = LoopShape::of(&head);
        let hash_cache_max = (MAX_HASH_CACHE_BYTES / (head.symbol_size as usize).max(1)).max(16);
        let units = shape.loop_packets();
        let words = units.div_ceil(64) as usize;
        let mut have = have_bits.unwrap_or_default();
        have.resize(words, 0);
        if units % 64 != 0 {
            if let Some(last) = have.last_mut() {
                *last &= (1u64 << (units % 64)) - 1;
            }
        }
        let mut dl = Download {
            verifier: PacketVerifier::new(&head),
            layout: Layout::of(&head, head_len),
            head,
            shape,
            have,
            held_all: 0,
            have_required: 0,
            fec: None,
            fec_mem: HashMap::new(),
            fec_mem_order: VecDeque::new(),
            fec_mem_whole: Vec::new(),
            hash_cache: HashMap::new(),
            hash_order: VecDeque::new(),
            hash_cache_max,
            block_missing: Vec::new(),
            parked: HashMap::new(),
            parked_order: VecDeque::new(),
            parked_bytes: 0,
            released: Vec::new(),
            unpark_rejects: Vec::new(),
            extras: HashMap::new(),
            extras_bytes: 0,
            counters: DownloadCounters::default(),
        };
        dl.recount();
        dl
    }

    /// Rebuild every count from the have-bitmap (at start, and after units were forgotten).
    fn recount(&mut self) {
        let shape = self.shape;
        self.held_all = self.have.iter().map(|w| w.count_ones() as u64).sum();
        self.have_required = (0..shape.loop_packets())
            .filter(|&u| shape.required(u) && self.has(u))
            .count() as u64;
        self.block_missing = vec![0u32; shape.all_blocks() as usize];
        let mut fec = FecShape::of(&self.head).map(FecTally::new);
        for u in 0..shape.data_packets + shape.repair_packets {
            let id = shape.unit_packet(u);
            if !self.has(u) {
                self.block_missing[shape.hash_block_of(id) as usize] += 1;
            } else if let Some(t) = fec.as_mut() {
                match id {
                    PacketId::Data(s) => t.data_held[t.shape.block_of_data(s) as usize] += 1,
                    PacketId::Repair(r) => t.repair_held[t.shape.block_of_repair(r) as usize] += 1,
                    PacketId::Hash(_) | PacketId::Extra(_) => {}
                }
            }
        }
        if let Some(t) = fec.as_mut() {
            for (f, v) in &self.extras {
                t.extra_held[*f as usize] = v.len() as u32;
            }
        }
        self.fec_mem.clear();
        self.fec_mem_order.clear();
        self.fec_mem_whole = fec
            .as_ref()
            .map(|t| (0..t.shape.blocks).map(|f| t.held(f) == 0).collect())
            .unwrap_or_default();
        self.fec = fec;
        let parked: Vec<(u64, usize)> = self
            .parked
            .iter()
            .map(|(b, v)| {
                let mut ids: Vec<PacketId> = v.iter().map(|(id, _)| *id).collect();
                ids.sort_unstable();
                ids.dedup();
                (*b, ids.len())
            })
            .collect();
        for (b, n) in parked {
            self.parked_delta(b, true, n);
        }
        if let Some(t) = self.fec.as_mut() {
            for f in 0..t.shape.blocks {
                t.check(f);
            }
        }
    }

    /// The FEC tally (`None` without FEC).
    pub fn fec(&self) -> Option<&FecTally> {
        self.fec.as_ref()
    }

    /// FEC blocks that now hold enough symbols to decode: the session reads their held
    /// symbols back and decodes them.
    pub fn take_decodable(&mut self) -> Vec<u64> {
        self.fec
            .as_mut()
            .map(|t| std::mem::take(&mut t.ready))
            .unwrap_or_default()
    }

    /// What to read to decode block `f`: its held data packets, enough held repair symbols,
    /// and its held data hash packets (to check what the decode restores), as (packet, file
    /// offset, length).
    pub fn decode_reads(&self, f: u64) -> Vec<(PacketId, u64, usize)> {
        let Some(t) = &self.fec else {
            return Vec::new();
        };
        let unit = |id| self.shape.unit_index(id).expect("in range");
        let mut out: Vec<PacketId> = t
            .shape
            .data_range(f)
            .map(PacketId::Data)
            .filter(|&id| self.has(unit(id)))
            .collect();
        let need = t.shape.source_count(f).saturating_sub(out.len() as u64);
        out.extend(
            t.shape
                .repair_range(f)
                .map(PacketId::Repair)
                .filter(|&id| self.has(unit(id)))
                .take(need as usize),
        );
        out.extend(
            self.data_hash_blocks(f)
                .map(PacketId::Hash)
                .filter(|&id| self.has(unit(id))),
        );
        out.into_iter()
            .filter_map(|id| self.layout.packet_range(id).map(|(o, l)| (id, o, l)))
            .collect()
    }

    /// Data hash blocks of FEC block `f` (FEC blocks are whole hash blocks).
    fn data_hash_blocks(&self, f: u64) -> std::ops::Range<u64> {
        let Some(t) = &self.fec else {
            return 0..0;
        };
        let k = self.shape.block_symbols;
        let r = t.shape.data_range(f);
        r.start / k..r.end.div_ceil(k)
    }

    /// Hash blocks (data and repair) whose leaves belong to FEC block `f`.
    fn fec_hash_blocks(&self, f: u64) -> Vec<u64> {
        let Some(t) = &self.fec else {
            return Vec::new();
        };
        let q = t.shape.hashed().div_ceil(self.shape.block_symbols);
        let first = self.shape.n_blocks + f * q;
        self.data_hash_blocks(f).chain(first..first + q).collect()
    }

    fn parked_delta(&mut self, b: u64, added: bool, n: usize) {
        let Some(f) = self.shape.fec_block_of_hash(b) else {
            return;
        };
        if let Some(t) = self.fec.as_mut() {
            let c = &mut t.parked[f as usize];
            if added {
                *c += n as u32;
                t.check(f);
            } else {
                *c = c.saturating_sub(n as u32);
            }
        }
    }

    /// Decode FEC block `f` from the symbols [`Self::decode_reads`] named (read back from
    /// the part file; `None`: unreadable) and any parked ones. Every restored packet, and
    /// every parked one used, is checked against its data hash packet — held, or rebuilt
    /// from the decoded block and checked against the signed head (that is how a lost hash
    /// packet is recovered without a NAK) — before anything is accepted. Returns the writes
    /// (file offset, bytes) to make; empty when the block could not be decoded yet.
    pub fn decode(
        &mut self,
        f: u64,
        symbols: Vec<(PacketId, Option<Vec<u8>>)>,
    ) -> Vec<(u64, Vec<u8>)> {
        let writes = self.try_decode(f, symbols).unwrap_or_else(|why| {
            tracing::debug!(block = f, why, "FEC decode deferred");
            Vec::new()
        });
        if let Some(t) = self.fec.as_mut() {
            if let Some(p) = t.pending.get_mut(f as usize) {
                *p = false;
            }
        }
        if !writes.is_empty() {
            self.counters.fec_decodes += 1;
        }
        writes
    }

    fn try_decode(
        &mut self,
        f: u64,
        symbols: Vec<(PacketId, Option<Vec<u8>>)>,
    ) -> Result<Vec<(u64, Vec<u8>)>, &'static str> {
        let shape = self.fec.as_ref().ok_or("no FEC")?.shape;
        if f >= shape.blocks || self.fec.as_ref().is_some_and(|t| t.complete(f)) {
            return Err("nothing to decode");
        }
        let (first, rfirst) = (shape.data_range(f).start, shape.repair_range(f).start);
        let k = shape.source_count(f) as usize;
        let ss = self.head.symbol_size as usize;
        // Inputs: verified symbols first, then parked ones (first candidate per packet).
        let mut data: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        let mut repairs: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        let mut hashes: HashMap<u64, Vec<u8>> = HashMap::new();
        for (id, bytes) in symbols {
            let bytes = bytes.ok_or("a held symbol could not be read back")?;
            match id {
                PacketId::Data(s) if shape.data_range(f).contains(&s) => {
                    data.insert(s - first, bytes);
                }
                PacketId::Repair(r) if shape.repair_range(f).contains(&r) => {
                    repairs.insert(r - rfirst, bytes);
                }
                PacketId::Hash(b) => {
                    hashes.insert(b, bytes);
                }
                _ => return Err("a symbol of another block"),
            }
        }
        let verified: std::collections::HashSet<u64> = data.keys().copied().collect();
        for (j, p) in self.extras.get(&f).into_iter().flatten() {
            repairs.entry(*j).or_insert_with(|| p.clone());
        }
        for b in self.fec_hash_blocks(f) {
            for (id, p) in self.parked.get(&b).into_iter().flatten() {
                match *id {
                    PacketId::Data(s) if shape.data_range(f).contains(&s) => {
                        data.entry(s - first).or_insert_with(|| p.clone());
                    }
                    PacketId::Repair(r) if shape.repair_range(f).contains(&r) => {
                        repairs.entry(r - rfirst).or_insert_with(|| p.clone());
                    }
                    PacketId::Data(_) | PacketId::Repair(_) => {}
                    PacketId::Extra(e) => {
                        if let Some((_, j)) = shape.extra_of(e).filter(|&(g, _)| g == f) {
                            repairs.entry(j).or_insert_with(|| p.clone());
                        }
                    }
                    PacketId::Hash(_) => {}
                }
            }
        }
        if data.len() + repairs.len() < k {
            return Err("too few symbols");
        }
        let d: Vec<(u64, &[u8])> = data.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        let r: Vec<(u64, &[u8])> = repairs.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        let restored = crate::archive::fec::decode_block(&shape, f, ss, &d, &r).map_err(|e| {
            tracing::debug!(block = f, error = %e, "FEC decode failed");
            "the code could not decode"
        })?;
        let decoded: std::collections::HashSet<u64> = restored.iter().map(|(i, _)| *i).collect();
        for (i, mut sym) in restored {
            let len = self
                .verifier
                .data_packet_len(first + i)
                .ok_or("restored packet out of range")?;
            sym.truncate(len);
            data.insert(i, sym);
        }
        // Check every packet not verified before, hash block by hash block.
        let mut new_hashes = Vec::new();
        for b in self.data_hash_blocks(f) {
            let leaves = self.shape.leaves_of(b);
            let hp = match hashes.get(&b).or_else(|| self.hash_cache.get(&b)) {
                Some(hp) => hp.clone(),
                None => {
                    let keys = crate::archive::manifest::TreeKeys::new(
                        &self.head.archive_id,
                        self.head.leaf_hash,
                    );
                    let mut leaf_hashes = Vec::with_capacity(leaves.len());
                    for id in &leaves {
                        let PacketId::Data(s) = *id else { continue };
                        leaf_hashes.push(keys.leaf(data.get(&(s - first)).ok_or("data missing")?));
                    }
                    let (hp, _) = crate::archive::manifest::hash_packets(&keys, &leaf_hashes, ss);
                    new_hashes.push(b);
                    hp
                }
            };
            if self.verifier.check_hash_packet(&self.head, b, &hp).is_err() {
                self.drop_parked_of(f);
                self.counters.rejected += 1;
                return Err(
                    "a rebuilt hash packet does not match the signed head (a forged parked symbol)",
                );
            }
            for id in leaves {
                let PacketId::Data(s) = id else { continue };
                if verified.contains(&(s - first)) {
                    continue;
                }
                let p = data.get(&(s - first)).ok_or("data missing")?;
                if self.verifier.check_data_packet(&hp, s, p).is_err() {
                    self.drop_parked_of(f);
                    self.counters.rejected += 1;
                    return Err("a decoded packet does not match its manifest hash");
                }
            }
            hashes.insert(b, hp);
        }
        // All checked: accept.
        let mut writes = Vec::new();
        for b in new_hashes {
            let unit = self.shape.unit_index(PacketId::Hash(b)).expect("in range");
            if !self.has(unit) {
                self.mark(unit);
                self.counters.written += 1;
                self.counters.fec_restored += 1;
                let (o, _) = self
                    .layout
                    .packet_range(PacketId::Hash(b))
                    .expect("in range");
                writes.push((o, hashes.remove(&b).expect("checked")));
            }
        }
        for (i, p) in data {
            let s = first + i;
            // Held already: read back for the decode, or accepted since it was asked for
            // (a hash packet that arrived meanwhile released parked packets).
            if verified.contains(&i) || self.has(s) {
                continue;
            }
            self.accept_leaf(PacketId::Data(s));
            self.counters.fec_restored += decoded.contains(&i) as u64;
            let (o, _) = self
                .layout
                .packet_range(PacketId::Data(s))
                .expect("in range");
            writes.push((o, p));
        }
        self.drop_parked_of(f);
        self.drop_extras_of(f);
        Ok(writes)
    }

    /// Forget block `f`'s extra symbols (decoded or complete).
    fn drop_extras_of(&mut self, f: u64) {
        if let Some(v) = self.extras.remove(&f) {
            self.extras_bytes -= v.iter().map(|(_, p)| p.len()).sum::<usize>();
            if let Some(t) = self.fec.as_mut() {
                t.extra_held[f as usize] = 0;
            }
        }
    }

    /// An extra symbol arrived (see the module doc).
    fn on_extra(&mut self, e: u64, payload: &[u8]) -> Verdict {
        let Some((f, j)) = self.fec.as_ref().and_then(|t| t.shape.extra_of(e)) else {
            self.counters.rejected += 1;
            return Verdict::Rejected;
        };
        let t = self.fec.as_ref().expect("checked");
        if t.complete(f) || t.deficit(f) == 0 {
            self.counters.fec_unneeded += 1;
            return Verdict::Duplicate;
        }
        if self
            .extras
            .get(&f)
            .is_some_and(|v| v.iter().any(|(x, _)| *x == j))
        {
            self.counters.duplicates += 1;
            return Verdict::Duplicate;
        }
        let id = PacketId::Extra(e);
        let b = self.shape.hash_block_of(id);
        let hash_unit = self.shape.unit_index(PacketId::Hash(b)).expect("in range");
        let check = match self.hash_cache.get(&b) {
            None if self.has(hash_unit) => return Verdict::NeedHash(b),
            None => return self.park(id, payload),
            Some(hp) => self.verifier.check_leaf(hp, id, payload),
        };
        if let Err(err) = check {
            tracing::debug!(?id, error = %err, "extra symbol rejected");
            self.counters.rejected += 1;
            return Verdict::Rejected;
        }
        self.keep_extra(f, j, payload)
    }

    /// Keep a verified extra symbol of block `f` (code index `j`) for its decode.
    fn keep_extra(&mut self, f: u64, j: u64, payload: &[u8]) -> Verdict {
        if self.extras_bytes + payload.len() > MAX_EXTRA_BYTES {
            self.counters.fec_extras_dropped += 1;
            return Verdict::NoHashYet;
        }
        self.extras
            .entry(f)
            .or_default()
            .push((j, payload.to_vec()));
        self.extras_bytes += payload.len();
        self.counters.fec_extras_kept += 1;
        if let Some(t) = self.fec.as_mut() {
            t.extra_held[f as usize] += 1;
            t.check(f);
        }
        Verdict::Kept
    }

    /// Whether hash packet `b` is worth keeping in memory: its block misses leaves, or it
    /// lists extra symbols of a FEC block that is not complete yet.
    fn wants_hash(&self, b: u64) -> bool {
        if self.block_missing.get(b as usize).is_some_and(|&m| m > 0) {
            return true;
        }
        match (&self.fec, self.shape.fec_block_of_hash(b)) {
            (Some(t), Some(f)) if b >= self.shape.n_blocks => {
                !t.complete(f) && t.shape.extras() > 0
            }
            _ => false,
        }
    }

    /// Keep a verified symbol of an incomplete FEC block in memory (see `fec_mem`).
    fn keep_symbol(&mut self, id: PacketId, payload: &[u8]) {
        let Some(t) = &self.fec else {
            return;
        };
        let f = match id {
            PacketId::Data(s) => t.shape.block_of_data(s),
            PacketId::Repair(r) => t.shape.block_of_repair(r),
            PacketId::Hash(_) | PacketId::Extra(_) => return,
        };
        if t.complete(f) || !self.fec_mem_whole.get(f as usize).copied().unwrap_or(false) {
            return;
        }
        if !self.fec_mem.contains_key(&f) {
            while self.fec_mem.len() >= FEC_MEM_BLOCKS {
                let Some(old) = self.fec_mem_order.pop_front() else {
                    break;
                };
                if self.fec_mem.remove(&old).is_some() {
                    self.fec_mem_whole[old as usize] = false;
                }
            }
            self.fec_mem_order.push_back(f);
        }
        self.fec_mem
            .entry(f)
            .or_default()
            .push((id, payload.to_vec()));
    }

    /// Decode block `f` from the symbols kept in memory, when they are all there (`None`:
    /// read them from the file, [`Self::decode_reads`]). Returns the writes to make.
    pub fn decode_from_memory(&mut self, f: u64) -> Option<Vec<(u64, Vec<u8>)>> {
        if !self.fec_mem_whole.get(f as usize).copied().unwrap_or(false) {
            return None;
        }
        let mut symbols: Vec<(PacketId, Option<Vec<u8>>)> = self
            .fec_mem
            .remove(&f)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, p)| (id, Some(p)))
            .collect();
        // The held data hash packets of the block, from the cache (a held one that left the
        // cache is rebuilt from the decoded data and checked against the head like a lost one).
        for b in self.data_hash_blocks(f) {
            if let Some(hp) = self.hash_cache.get(&b) {
                symbols.push((PacketId::Hash(b), Some(hp.clone())));
            }
        }
        let writes = self.decode(f, symbols);
        if writes.is_empty() {
            // Not decoded (a forged parked symbol, say): the file has what is held.
            self.fec_mem_whole[f as usize] = false;
        }
        self.fec_mem_order.retain(|x| *x != f);
        Some(writes)
    }

    /// Forget every parked symbol of FEC block `f` (decoded, or suspected forged).
    fn drop_parked_of(&mut self, f: u64) {
        for b in self.fec_hash_blocks(f) {
            if let Some(v) = self.parked.remove(&b) {
                self.parked_bytes -= v.iter().map(|(_, p)| p.len()).sum::<usize>();
                self.parked_order.retain(|x| *x != b);
                self.parked_delta(b, false, v.len());
            }
        }
    }

    /// Whether the NAK engine should leave `unit` alone: held or parked, or covered by FEC
    /// (repair symbols and their hash packets are never asked for; a data packet of a FEC
    /// block only when the session decided the block is short, see [`Self::fec_wanted`]).
    pub fn settled(&self, unit: u64, wanted: impl Fn(u64) -> bool) -> bool {
        if self.has_or_parked(unit) {
            return true;
        }
        if self.fec.is_none() {
            return false;
        }
        match self.shape.unit_packet(unit) {
            // A lost hash packet is rebuilt from its decoded block (see `Self::decode`).
            PacketId::Repair(_) | PacketId::Hash(_) | PacketId::Extra(_) => true,
            PacketId::Data(_) => !wanted(unit),
        }
    }

    /// How many symbols FEC block `f` should ask for by amount: what it is short of
    /// decoding, inflated by the loss it saw on the block's pass (the answer is lost as
    /// often), plus one. `Some(0)`: nothing to ask; `None`: the block's extras this receiver
    /// does not hold cannot cover it, so it asks for data packets ([`Self::fec_wanted`]).
    pub fn fec_amount(&self, f: u64) -> Option<u32> {
        let t = self.fec.as_ref()?;
        if f >= t.shape.blocks {
            return Some(0);
        }
        let short = t.deficit(f);
        if short == 0 || t.complete(f) {
            return Some(0);
        }
        let free = t.shape.extras().saturating_sub(t.extras_held(f));
        if free < short {
            return None;
        }
        let i = f as usize;
        let looped = t.shape.source_count(f) + t.shape.repair;
        let got = (t.data_held[i] + t.repair_held[i]) as f64;
        let loss = (1.0 - got / looped as f64).clamp(0.0, 0.5);
        let n = (short as f64 / (1.0 - loss)).ceil() as u64 + 1;
        Some(n.min(free).min(u32::MAX as u64) as u32)
    }

    /// Missing data units of FEC block `f` to ask for: as many as it is short of decoding,
    /// lowest first (the server's repair of any of them serves every receiver short there).
    pub fn fec_wanted(&self, f: u64) -> Vec<u64> {
        let Some(t) = &self.fec else {
            return Vec::new();
        };
        let need = t.deficit(f) as usize;
        t.shape
            .data_range(f)
            .filter(|&s| !self.has_or_parked(s))
            .take(need)
            .collect()
    }

    /// Bound the hash-packet cache to `blocks` (tests; the default is
    /// [`MAX_HASH_CACHE_BYTES`] worth).
    pub fn set_hash_cache_max(&mut self, blocks: usize) {
        self.hash_cache_max = blocks.max(1);
    }

    /// Hash packets held in memory.
    pub fn hash_cache_len(&self) -> usize {
        self.hash_cache.len()
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn shape(&self) -> &LoopShape {
        &self.shape
    }

    /// Units a complete download holds (data and data hash packets).
    pub fn units(&self) -> u64 {
        self.shape.required_units()
    }

    /// Every unit of the loop (repair symbols and their hash packets too).
    pub fn all_units(&self) -> u64 {
        self.shape.loop_packets()
    }

    /// Required units held (see [`Self::units`]).
    pub fn have_count(&self) -> u64 {
        self.have_required
    }

    pub fn have_bits(&self) -> &[u64] {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have_required == self.units()
    }

    /// Held, or parked waiting for its hash packet (the NAK engine need not ask for it).
    pub fn has_or_parked(&self, unit: u64) -> bool {
        if self.has(unit) {
            return true;
        }
        match self.shape.unit_packet(unit) {
            PacketId::Hash(_) => false,
            id => self
                .parked
                .get(&self.shape.hash_block_of(id))
                .is_some_and(|v| v.iter().any(|(x, _)| *x == id)),
        }
    }

    /// Whether a packet judged [`Verdict::Duplicate`] is genuine, when that is cheap to tell:
    /// a hash packet always (against the signed head), a data packet while its block's hash
    /// packet is still cached. Verified duplicates may drive loss detection and prove the
    /// channel works; unverifiable ones must not.
    pub fn duplicate_is_genuine(&self, id: PacketId, payload: &[u8]) -> bool {
        match id {
            PacketId::Hash(b) => self
                .verifier
                .check_hash_packet(&self.head, b, payload)
                .is_ok(),
            id => self
                .hash_cache
                .get(&self.shape.hash_block_of(id))
                .is_some_and(|hp| self.verifier.check_leaf(hp, id, payload).is_ok()),
        }
    }

    /// Parked packets that the last hash packet verified: write each at its offset.
    pub fn take_released(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.released)
    }

    /// Units whose parked packets all failed verification and are still missing: the NAK
    /// engine should ask for them ([`crate::receiver::nak::NakEngine::on_lost`]).
    pub fn take_unpark_rejects(&mut self) -> Vec<u64> {
        let mut v = std::mem::take(&mut self.unpark_rejects);
        v.retain(|u| !self.has(*u));
        v.sort_unstable();
        v.dedup();
        v
    }

    fn park(&mut self, s: PacketId, payload: &[u8]) -> Verdict {
        let b = self.shape.hash_block_of(s);
        // Several candidates per serial may wait (a forgery parked first must not shadow the
        // genuine packet); only byte-identical copies are duplicates.
        if self
            .parked
            .get(&b)
            .is_some_and(|v| v.iter().any(|(x, p)| *x == s && p == payload))
        {
            self.counters.duplicates += 1;
            return Verdict::Duplicate;
        }
        if self
            .parked
            .get(&b)
            .is_some_and(|v| v.iter().filter(|(x, _)| *x == s).count() >= MAX_PARKED_CANDIDATES)
        {
            self.counters.parked_excess += 1;
            return Verdict::NoHashYet;
        }
        if payload.len() > MAX_PARKED_BYTES {
            self.counters.no_hash_yet += 1;
            return Verdict::NoHashYet;
        }
        while self.parked_bytes + payload.len() > MAX_PARKED_BYTES {
            let Some(old) = self.parked_order.pop_front() else {
                break;
            };
            if let Some(v) = self.parked.remove(&old) {
                self.parked_bytes -= v.iter().map(|(_, p)| p.len()).sum::<usize>();
                self.counters.no_hash_yet += v.len() as u64;
                self.parked_delta(old, false, v.len());
            }
        }
        let v = self.parked.entry(b).or_default();
        if v.is_empty() {
            self.parked_order.push_back(b);
        }
        let fresh = !v.iter().any(|(x, _)| *x == s);
        v.push((s, payload.to_vec()));
        self.parked_bytes += payload.len();
        self.counters.parked += 1;
        if fresh {
            self.parked_delta(b, true, 1);
        }
        Verdict::Parked
    }

    /// The hash packet of `b` is verified: verify and release what was parked for it.
    fn unpark(&mut self, b: u64) {
        let Some(list) = self.parked.remove(&b) else {
            return;
        };
        self.parked_order.retain(|x| *x != b);
        let mut distinct: Vec<PacketId> = list.iter().map(|(id, _)| *id).collect();
        distinct.sort_unstable();
        distinct.dedup();
        self.parked_delta(b, false, distinct.len());
        for (id, payload) in list {
            self.parked_bytes -= payload.len();
            if let PacketId::Extra(e) = id {
                let hp = self.hash_cache.get(&b).expect("hash cached for extras");
                let Some((f, j)) = self.fec.as_ref().and_then(|t| t.shape.extra_of(e)) else {
                    continue;
                };
                if self.verifier.check_leaf(hp, id, &payload).is_err() {
                    self.counters.rejected += 1;
                    continue;
                }
                let t = self.fec.as_ref().expect("extra_of checked");
                let held = self
                    .extras
                    .get(&f)
                    .is_some_and(|v| v.iter().any(|(x, _)| *x == j));
                if t.complete(f) || t.deficit(f) == 0 || held {
                    self.counters.fec_unneeded += 1;
                    continue;
                }
                self.keep_extra(f, j, &payload);
                continue;
            }
            let unit = self.shape.unit_index(id).expect("parked in range");
            if self.has(unit) {
                continue;
            }
            let hp = self
                .hash_cache
                .get(&b)
                .expect("hash cached while data missing");
            if self.verifier.check_leaf(hp, id, &payload).is_err() {
                self.counters.rejected += 1;
                self.unpark_rejects.push(unit);
                continue;
            }
            if self.repair_unneeded(id) {
                self.counters.fec_unneeded += 1;
                continue;
            }
            self.accept_leaf(id);
            self.keep_symbol(id, &payload);
            let (offset, _) = self.layout.packet_range(id).expect("in range");
            self.released.push((offset, payload));
        }
    }

    /// A repair symbol of a FEC block whose data is all held (or being decoded).
    fn repair_unneeded(&self, id: PacketId) -> bool {
        match (id, &self.fec) {
            (PacketId::Repair(r), Some(t)) => {
                let f = t.shape.block_of_repair(r);
                t.complete(f) || t.deficit(f) == 0
            }
            (PacketId::Hash(b), Some(t)) if b >= self.shape.n_blocks => self
                .shape
                .fec_block_of_hash(b)
                .is_some_and(|f| t.complete(f) || t.deficit(f) == 0),
            _ => false,
        }
    }

    /// A verified data packet or repair symbol is held from now on.
    fn accept_leaf(&mut self, id: PacketId) {
        let unit = self.shape.unit_index(id).expect("in range");
        self.mark(unit);
        self.counters.written += 1;
        if let PacketId::Repair(_) = id {
            self.counters.fec_repairs_written += 1;
        }
        let b = self.shape.hash_block_of(id) as usize;
        self.block_missing[b] -= 1;
        if self.block_missing[b] == 0 && !self.wants_hash(b as u64) {
            self.hash_cache.remove(&(b as u64));
        }
        if let Some(t) = self.fec.as_mut() {
            let f = match id {
                PacketId::Data(s) => {
                    let f = t.shape.block_of_data(s);
                    t.data_held[f as usize] += 1;
                    f
                }
                PacketId::Repair(r) => {
                    let f = t.shape.block_of_repair(r);
                    t.repair_held[f as usize] += 1;
                    f
                }
                PacketId::Hash(_) | PacketId::Extra(_) => return,
            };
            t.check(f);
            if t.complete(f) {
                if self.fec_mem.remove(&f).is_some() {
                    self.fec_mem_order.retain(|x| *x != f);
                }
                self.drop_extras_of(f);
            }
        }
    }

    pub fn has(&self, unit: u64) -> bool {
        self.have[(unit / 64) as usize] & (1 << (unit % 64)) != 0
    }

    fn mark(&mut self, unit: u64) {
        self.have[(unit / 64) as usize] |= 1 << (unit % 64);
        self.held_all += 1;
        if self.shape.required(unit) {
            self.have_required += 1;
        }
    }

    /// Keep a verified hash packet for a block that still misses data, evicting the oldest.
    fn cache_hash(&mut self, b: u64, payload: Vec<u8>) {
        if self.hash_cache.insert(b, payload).is_none() {
            self.hash_order.push_back(b);
        }
        while self.hash_cache.len() > self.hash_cache_max {
            match self.hash_order.pop_front() {
                Some(old) if old != b => {
                    self.hash_cache.remove(&old);
                }
                Some(old) => self.hash_order.push_back(old),
                None => break,
            }
        }
        if self.hash_order.len() > 2 * self.hash_cache_max {
            let cache = &self.hash_cache;
            self.hash_order.retain(|b| cache.contains_key(b));
        }
    }

    /// A hash packet read back from our own file ([`Verdict::NeedHash`]). One that no longer
    /// verifies (file damaged) is forgotten, so it will be fetched again. Returns whether it
    /// was accepted.
    pub fn restore_hash(&mut self, block: u64, payload: Vec<u8>) -> bool {
        if self
            .verifier
            .check_hash_packet(&self.head, block, &payload)
            .is_ok()
        {
            if self.wants_hash(block) {
                self.cache_hash(block, payload);
            }
            true
        } else {
            if let Some(u) = self.shape.unit_index(PacketId::Hash(block)) {
                self.unmark(u);
                self.recount();
            }
            false
        }
    }

    /// Forget a unit (only the bit: callers [`Self::recount`] when done).
    fn unmark(&mut self, unit: u64) {
        self.have[(unit / 64) as usize] &= !(1 << (unit % 64));
    }

    /// After a resume: read back every unit the state file says is held and verify it again
    /// (hash packets against the signed head, data against its block's hash packet); what no
    /// longer verifies (a write torn by a crash, a damaged disk) is forgotten and fetched
    /// again. Units received in this run are verified before they are written, so with this
    /// the finished file needs no second full pass. `read(offset, buf)` fills `buf` from the
    /// part file. Returns the number of units forgotten.
    pub fn recheck_held(&mut self, mut read: impl FnMut(u64, &mut [u8]) -> bool) -> u64 {
        let before = self.held_all;
        let mut hash = vec![0u8; self.head.symbol_size as usize];
        let mut data = Vec::new();
        for b in 0..self.shape.all_blocks() {
            let hu = self.shape.unit_index(PacketId::Hash(b)).expect("in range");
            let leaves = self.shape.leaves_of(b);
            let unit = |id| self.shape.unit_index(id).expect("in range");
            let held: Vec<PacketId> = leaves
                .iter()
                .copied()
                .filter(|&id| self.has(unit(id)))
                .collect();
            if !self.has(hu) {
                // Leaves are only ever accepted after their hash packet: without it, start
                // over. (A packet restored by FEC may precede it: it comes round again.)
                for id in held {
                    self.unmark(self.shape.unit_index(id).expect("in range"));
                }
                continue;
            }
            let (hoff, _) = self
                .layout
                .packet_range(PacketId::Hash(b))
                .expect("in range");
            let hash_ok = read(hoff, &mut hash)
                && self
                    .verifier
                    .check_hash_packet(&self.head, b, &hash)
                    .is_ok();
            if !hash_ok {
                self.unmark(hu);
                for id in held {
                    self.unmark(self.shape.unit_index(id).expect("in range"));
                }
                continue;
            }
            if let (Some(&first), Some(&last)) = (leaves.first(), leaves.last()) {
                if !held.is_empty() {
                    let (off0, _) = self.layout.packet_range(first).expect("in range");
                    let (offn, lenn) = self.layout.packet_range(last).expect("in range");
                    data.resize((offn - off0) as usize + lenn, 0);
                    let ok = read(off0, &mut data);
                    for id in held {
                        let (o, l) = self.layout.packet_range(id).expect("in range");
                        let at = (o - off0) as usize;
                        if !ok
                            || self
                                .verifier
                                .check_leaf(&hash, id, &data[at..at + l])
                                .is_err()
                        {
                            self.unmark(self.shape.unit_index(id).expect("in range"));
                        }
                    }
                }
            }
        }
        self.recount();
        for b in 0..self.shape.all_blocks() {
            let hu = self.shape.unit_index(PacketId::Hash(b)).expect("in range");
            if self.has(hu) && self.wants_hash(b) {
                let (hoff, _) = self
                    .layout
                    .packet_range(PacketId::Hash(b))
                    .expect("in range");
                if self.hash_cache.len() < self.hash_cache_max && read(hoff, &mut hash) {
                    self.cache_hash(b, hash.clone());
                }
            }
        }
        before - self.held_all
    }

    /// Judge one packet from the channel.
    pub fn on_packet(&mut self, id: PacketId, payload: &[u8]) -> Verdict {
        if let PacketId::Extra(e) = id {
            return self.on_extra(e, payload);
        }
        let Some(unit) = self.shape.unit_index(id) else {
            self.counters.rejected += 1;
            return Verdict::Rejected;
        };
        if self.has(unit) {
            self.counters.duplicates += 1;
            return Verdict::Duplicate;
        }
        if self.repair_unneeded(id) {
            self.counters.fec_unneeded += 1;
            return Verdict::Duplicate;
        }
        let check = match id {
            PacketId::Hash(b) => self.verifier.check_hash_packet(&self.head, b, payload),
            leaf => {
                let b = self.shape.hash_block_of(leaf);
                match self.hash_cache.get(&b) {
                    None if self
                        .has(self.shape.unit_index(PacketId::Hash(b)).expect("in range")) =>
                    {
                        return Verdict::NeedHash(b)
                    }
                    None => return self.park(leaf, payload),
                    Some(hp) => self.verifier.check_leaf(hp, leaf, payload),
                }
            }
        };
        if let Err(e) = check {
            tracing::debug!(?id, error = %e, "packet rejected");
            self.counters.rejected += 1;
            return Verdict::Rejected;
        }
        match id {
            PacketId::Hash(b) => {
                self.mark(unit);
                self.counters.written += 1;
                if b >= self.shape.n_blocks {
                    self.counters.fec_repairs_written += 1;
                }
                if self.wants_hash(b) {
                    self.cache_hash(b, payload.to_vec());
                    self.unpark(b);
                }
            }
            leaf => {
                self.accept_leaf(leaf);
                self.keep_symbol(leaf, payload);
            }
        }
        let (offset, _) = self.layout.packet_range(id).expect("unit in range");
        Verdict::Write { offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::archive::SimArchive;

    /// 1,000 forged versions of one data packet, sent before its block's hash packet.
    fn flood(dl: &mut Download, id: PacketId, genuine: &[u8], genuine_at: usize) {
        for i in 0..1001usize {
            if i == genuine_at {
                dl.on_packet(id, genuine);
                continue;
            }
            let mut forged = genuine.to_vec();
            forged[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            let v = dl.on_packet(id, &forged);
            assert!(
                matches!(v, Verdict::Parked | Verdict::NoHashYet),
                "a forgery before its hash packet: {v:?}"
            );
        }
    }

    fn candidates(dl: &Download, id: PacketId) -> usize {
        let b = dl.shape().hash_block_of(id);
        dl.parked
            .get(&b)
            .map_or(0, |v| v.iter().filter(|(x, _)| *x == id).count())
    }

    /// A flood of forged candidates for one packet id keeps at most MAX_PARKED_CANDIDATES;
    /// the genuine one, among the first few, is written when the hash packet comes.
    #[test]
    fn parked_candidates_per_packet_are_bounded_and_the_genuine_one_is_kept() {
        let a = SimArchive::new(200, 1280, 20);
        let mut dl = Download::new(a.head.clone(), a.head_bytes.len() as u64, None);
        let id = PacketId::Data(5);
        let genuine = a.payload(id);
        flood(&mut dl, id, &genuine, 2);
        assert_eq!(candidates(&dl, id), MAX_PARKED_CANDIDATES);
        assert_eq!(dl.counters.parked, MAX_PARKED_CANDIDATES as u64);
        assert_eq!(
            dl.counters.parked_excess,
            1001 - MAX_PARKED_CANDIDATES as u64
        );
        assert_eq!(dl.parked_bytes, MAX_PARKED_CANDIDATES * genuine.len());

        let unit = dl.shape().unit_index(id).unwrap();
        let hash = PacketId::Hash(0);
        assert!(matches!(
            dl.on_packet(hash, &a.payload(hash)),
            Verdict::Write { .. }
        ));
        let (offset, _) = dl.layout().packet_range(id).unwrap();
        assert_eq!(dl.take_released(), vec![(offset, genuine)]);
        assert!(dl.has(unit));
        // The two forgeries parked before it fail; the one after is not even checked.
        assert_eq!(dl.counters.rejected, 2);
        assert!(dl.take_unpark_rejects().is_empty(), "held: nothing to NAK");
        assert_eq!(dl.parked_bytes, 0);
    }

    /// The genuine packet arrives after the bound: it is dropped with the excess forgeries.
    /// When the hash packet comes every kept candidate fails: nothing is written, the unit
    /// is handed to the NAK engine, and the genuine packet's next copy (repair or next loop)
    /// is verified and written.
    #[test]
    fn a_genuine_packet_past_the_bound_is_recovered_by_nak_never_a_wrong_write() {
        let a = SimArchive::new(200, 1280, 21);
        let mut dl = Download::new(a.head.clone(), a.head_bytes.len() as u64, None);
        let id = PacketId::Data(7);
        let genuine = a.payload(id);
        flood(&mut dl, id, &genuine, 10);
        assert_eq!(candidates(&dl, id), MAX_PARKED_CANDIDATES);
        assert_eq!(
            dl.counters.parked_excess,
            1001 - MAX_PARKED_CANDIDATES as u64
        );
        let unit = dl.shape().unit_index(id).unwrap();
        assert!(dl.has_or_parked(unit), "no NAK while candidates wait");

        let hash = PacketId::Hash(0);
        assert!(matches!(
            dl.on_packet(hash, &a.payload(hash)),
            Verdict::Write { .. }
        ));
        assert!(dl.take_released().is_empty(), "a forgery was released");
        assert!(!dl.has(unit));
        assert_eq!(dl.counters.rejected, MAX_PARKED_CANDIDATES as u64);
        assert_eq!(
            dl.take_unpark_rejects(),
            vec![unit],
            "the unit must be NAKed"
        );
        assert!(!dl.has_or_parked(unit));

        let (offset, _) = dl.layout().packet_range(id).unwrap();
        assert_eq!(dl.on_packet(id, &genuine), Verdict::Write { offset });
        assert!(dl.has(unit));
    }
}
