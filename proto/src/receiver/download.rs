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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
    /// Its block's hash packet has not arrived and the parking space is full: dropped.
    NoHashYet,
    /// Failed verification or out of range: dropped and counted.
    Rejected,
    /// Its block's hash packet is held but was evicted from memory: the driver reads it back
    /// from the file, passes it to [`Download::restore_hash`] and offers the packet again.
    NeedHash(u64),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadCounters {
    pub written: u64,
    pub duplicates: u64,
    pub no_hash_yet: u64,
    pub parked: u64,
    pub rejected: u64,
}

pub struct Download {
    head: Arc<Head>,
    shape: LoopShape,
    layout: Layout,
    verifier: PacketVerifier,
    have: Vec<u64>,
    have_count: u64,
    /// Verified hash packets of blocks that still miss data, at most `hash_cache_max` (the
    /// rest are re-read from the file when needed: memory stays bounded whatever the loss).
    hash_cache: HashMap<u64, Vec<u8>>,
    hash_order: VecDeque<u64>,
    hash_cache_max: usize,
    /// Data packets still missing per block.
    block_missing: Vec<u32>,
    /// Unverifiable data packets waiting for their block's hash packet.
    parked: HashMap<u64, Vec<(u64, Vec<u8>)>>,
    parked_order: VecDeque<u64>,
    parked_bytes: usize,
    /// Writes made possible by the last hash packet (see [`Download::take_released`]).
    released: Vec<(u64, Vec<u8>)>,
    /// Parked units that turned out forged (still missing, and now known to be).
    unpark_rejects: Vec<u64>,
    pub counters: DownloadCounters,
}

/// Memory for parked packets (a few blocks' worth at any symbol size).
pub const MAX_PARKED_BYTES: usize = 8 << 20;
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
        let have_count = have.iter().map(|w| w.count_ones() as u64).sum();
        let k = shape.block_symbols;
        let mut block_missing = vec![0u32; shape.n_blocks as usize];
        for s in 0..shape.data_packets {
            if have[(s / 64) as usize] & (1 << (s % 64)) == 0 {
                block_missing[(s / k) as usize] += 1;
            }
        }
        Download {
            verifier: PacketVerifier::new(&head),
            layout: Layout::of(&head, head_len),
            head,
            shape,
            have,
            have_count,
            hash_cache: HashMap::new(),
            hash_order: VecDeque::new(),
            hash_cache_max,
            block_missing,
            parked: HashMap::new(),
            parked_order: VecDeque::new(),
            parked_bytes: 0,
            released: Vec::new(),
            unpark_rejects: Vec::new(),
            counters: DownloadCounters::default(),
        }
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

    pub fn units(&self) -> u64 {
        self.shape.loop_packets()
    }

    pub fn have_count(&self) -> u64 {
        self.have_count
    }

    pub fn have_bits(&self) -> &[u64] {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have_count == self.units()
    }

    /// Held, or parked waiting for its hash packet (the NAK engine need not ask for it).
    pub fn has_or_parked(&self, unit: u64) -> bool {
        if self.has(unit) {
            return true;
        }
        match self.shape.unit_packet(unit) {
            PacketId::Data(s) => self
                .parked
                .get(&(s / self.shape.block_symbols))
                .is_some_and(|v| v.iter().any(|(x, _)| *x == s)),
            PacketId::Hash(_) => false,
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
            PacketId::Data(s) => self
                .hash_cache
                .get(&(s / self.shape.block_symbols))
                .is_some_and(|hp| self.verifier.check_data_packet(hp, s, payload).is_ok()),
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

    fn park(&mut self, s: u64, payload: &[u8]) -> Verdict {
        let b = s / self.shape.block_symbols;
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
            }
        }
        let v = self.parked.entry(b).or_default();
        if v.is_empty() {
            self.parked_order.push_back(b);
        }
        v.push((s, payload.to_vec()));
        self.parked_bytes += payload.len();
        self.counters.parked += 1;
        Verdict::Parked
    }

    /// The hash packet of `b` is verified: verify and release what was parked for it.
    fn unpark(&mut self, b: u64) {
        let Some(list) = self.parked.remove(&b) else {
            return;
        };
        self.parked_order.retain(|x| *x != b);
        for (s, payload) in list {
            self.parked_bytes -= payload.len();
            let unit = s;
            if self.has(unit) {
                continue;
            }
            let hp = self
                .hash_cache
                .get(&b)
                .expect("hash cached while data missing");
            if self.verifier.check_data_packet(hp, s, &payload).is_err() {
                self.counters.rejected += 1;
                self.unpark_rejects.push(s);
                continue;
            }
            self.accept_data(s);
            let (offset, _) = self
                .layout
                .packet_range(PacketId::Data(s))
                .expect("in range");
            self.released.push((offset, payload));
        }
    }

    fn accept_data(&mut self, s: u64) {
        self.mark(s);
        self.counters.written += 1;
        let b = (s / self.shape.block_symbols) as usize;
        self.block_missing[b] -= 1;
        if self.block_missing[b] == 0 {
            self.hash_cache.remove(&(b as u64));
        }
    }

    pub fn has(&self, unit: u64) -> bool {
        self.have[(unit / 64) as usize] & (1 << (unit % 64)) != 0
    }

    fn mark(&mut self, unit: u64) {
        self.have[(unit / 64) as usize] |= 1 << (unit % 64);
        self.have_count += 1;
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
            if self
                .block_missing
                .get(block as usize)
                .is_some_and(|&m| m > 0)
            {
                self.cache_hash(block, payload);
            }
            true
        } else {
            if let Some(u) = self.shape.unit_index(PacketId::Hash(block)) {
                self.unmark(u);
            }
            false
        }
    }

    fn unmark(&mut self, unit: u64) {
        if self.has(unit) {
            self.have[(unit / 64) as usize] &= !(1 << (unit % 64));
            self.have_count -= 1;
            if let PacketId::Data(s) = self.shape.unit_packet(unit) {
                self.block_missing[(s / self.shape.block_symbols) as usize] += 1;
            }
        }
    }

    /// After a resume: read back every unit the state file says is held and verify it again
    /// (hash packets against the signed head, data against its block's hash packet); what no
    /// longer verifies (a write torn by a crash, a damaged disk) is forgotten and fetched
    /// again. Units received in this run are verified before they are written, so with this
    /// the finished file needs no second full pass. `read(offset, buf)` fills `buf` from the
    /// part file. Returns the number of units forgotten.
    pub fn recheck_held(&mut self, mut read: impl FnMut(u64, &mut [u8]) -> bool) -> u64 {
        let before = self.have_count;
        let k = self.shape.block_symbols;
        let mut hash = vec![0u8; self.head.symbol_size as usize];
        let mut data = Vec::new();
        for b in 0..self.shape.n_blocks {
            let hu = self.shape.unit_index(PacketId::Hash(b)).expect("in range");
            let first = b * k;
            let last = ((b + 1) * k).min(self.shape.data_packets);
            let held_data = (first..last).any(|s| self.has(s));
            if !self.has(hu) {
                // Data is only ever accepted after its hash packet: without it, start over.
                for s in first..last {
                    self.unmark(s);
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
                for s in first..last {
                    self.unmark(s);
                }
                continue;
            }
            if held_data {
                let (off0, _) = self
                    .layout
                    .packet_range(PacketId::Data(first))
                    .expect("in range");
                let (offn, lenn) = self
                    .layout
                    .packet_range(PacketId::Data(last - 1))
                    .expect("in range");
                data.resize((offn - off0) as usize + lenn, 0);
                let ok = read(off0, &mut data);
                for s in first..last {
                    if !self.has(s) {
                        continue;
                    }
                    let (o, l) = self
                        .layout
                        .packet_range(PacketId::Data(s))
                        .expect("in range");
                    let at = (o - off0) as usize;
                    if !ok
                        || self
                            .verifier
                            .check_data_packet(&hash, s, &data[at..at + l])
                            .is_err()
                    {
                        self.unmark(s);
                    }
                }
            }
            if self.block_missing[b as usize] > 0 {
                self.cache_hash(b, hash.clone());
            }
        }
        before - self.have_count
    }

    /// Judge one packet from the channel.
    pub fn on_packet(&mut self, id: PacketId, payload: &[u8]) -> Verdict {
        let Some(unit) = self.shape.unit_index(id) else {
            self.counters.rejected += 1;
            return Verdict::Rejected;
        };
        if self.has(unit) {
            self.counters.duplicates += 1;
            return Verdict::Duplicate;
        }
        let check = match id {
            PacketId::Hash(b) => self.verifier.check_hash_packet(&self.head, b, payload),
            PacketId::Data(s) => {
                let b = s / self.shape.block_symbols;
                match self.hash_cache.get(&b) {
                    None if self
                        .has(self.shape.unit_index(PacketId::Hash(b)).expect("in range")) =>
                    {
                        return Verdict::NeedHash(b)
                    }
                    None => return self.park(s, payload),
                    Some(hp) => self.verifier.check_data_packet(hp, s, payload),
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
                if self.block_missing[b as usize] > 0 {
                    self.cache_hash(b, payload.to_vec());
                    self.unpark(b);
                }
            }
            PacketId::Data(s) => self.accept_data(s),
        }
        let (offset, _) = self.layout.packet_range(id).expect("unit in range");
        Verdict::Write { offset }
    }
}
