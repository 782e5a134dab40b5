//! The receiver's download state machine: which loop units it has, and whether a packet may be
//! written. Sans-I/O: the driver feeds it packets and writes what it is told to write.
//!
//! A data packet is written only after it verified against its block's hash packet, which
//! itself verified against the signed head, so a forged or foreign packet can neither corrupt
//! the file nor count as received.

use std::collections::HashMap;
use std::sync::Arc;

use mcast::archive::{Head, Layout, PacketId, PacketVerifier};
use mcast::carousel::LoopShape;
use serde::Serialize;

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and verified: write the payload at this file offset.
    Write { offset: u64 },
    /// Already held.
    Duplicate,
    /// Its block's hash packet has not arrived yet, so it cannot be verified: dropped.
    NoHashYet,
    /// Failed verification or out of range: dropped and counted.
    Rejected,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadCounters {
    pub written: u64,
    pub duplicates: u64,
    pub no_hash_yet: u64,
    pub rejected: u64,
}

pub struct Download {
    head: Arc<Head>,
    shape: LoopShape,
    layout: Layout,
    verifier: PacketVerifier,
    have: Vec<u64>,
    have_count: u64,
    /// Verified hash packets of blocks that still miss data.
    hash_cache: HashMap<u64, Vec<u8>>,
    /// Data packets still missing per block.
    block_missing: Vec<u32>,
    pub counters: DownloadCounters,
}

impl Download {
    /// A fresh download, or a resumed one when `have_bits` comes from a state file.
    pub fn new(head: Arc<Head>, head_len: u64, have_bits: Option<Vec<u64>>) -> Download {
        let shape = LoopShape::of(&head);
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
            block_missing,
            counters: DownloadCounters::default(),
        }
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

    fn has(&self, unit: u64) -> bool {
        self.have[(unit / 64) as usize] & (1 << (unit % 64)) != 0
    }

    fn mark(&mut self, unit: u64) {
        self.have[(unit / 64) as usize] |= 1 << (unit % 64);
        self.have_count += 1;
    }

    /// Blocks whose hash packet is held (on disk) but whose data is incomplete: after a resume
    /// the driver reads these hash packets back and passes them to [`Self::restore_hash`].
    pub fn blocks_needing_hash_reload(&self) -> Vec<u64> {
        (0..self.shape.n_blocks)
            .filter(|&b| {
                self.block_missing[b as usize] > 0
                    && self.has(self.shape.unit_index(PacketId::Hash(b)).expect("in range"))
            })
            .collect()
    }

    /// Re-admit a hash packet read back from our own file after a restart. A packet that no
    /// longer verifies (file damaged) is forgotten, so it will be fetched again.
    pub fn restore_hash(&mut self, block: u64, payload: Vec<u8>) {
        if self
            .verifier
            .check_hash_packet(&self.head, block, &payload)
            .is_ok()
        {
            self.hash_cache.insert(block, payload);
        } else if let Some(u) = self.shape.unit_index(PacketId::Hash(block)) {
            if self.has(u) {
                self.have[(u / 64) as usize] &= !(1 << (u % 64));
                self.have_count -= 1;
            }
        }
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
                    None => {
                        self.counters.no_hash_yet += 1;
                        return Verdict::NoHashYet;
                    }
                    Some(hp) => self.verifier.check_data_packet(hp, s, payload),
                }
            }
        };
        if let Err(e) = check {
            tracing::debug!(?id, error = %e, "packet rejected");
            self.counters.rejected += 1;
            return Verdict::Rejected;
        }
        self.mark(unit);
        self.counters.written += 1;
        match id {
            PacketId::Hash(b) => {
                if self.block_missing[b as usize] > 0 {
                    self.hash_cache.insert(b, payload.to_vec());
                }
            }
            PacketId::Data(s) => {
                let b = (s / self.shape.block_symbols) as usize;
                self.block_missing[b] -= 1;
                if self.block_missing[b] == 0 {
                    self.hash_cache.remove(&(b as u64));
                }
            }
        }
        let (offset, _) = self.layout.packet_range(id).expect("unit in range");
        Verdict::Write { offset }
    }
}
