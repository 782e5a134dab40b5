//! The carousel loop order (FIG. 4C, 9B): which packet comes next, forever.
//!
//! Each block goes out as its hash packet followed by its data packets, so a receiver that
//! joins anywhere can verify everything it hears from the next block boundary on; at the end of
//! the last block the loop restarts at block 0. Pure arithmetic: no I/O, no clock.
//!
//! A FEC archive's repair symbols follow the data as a **repair section** of their own hash
//! blocks (hash packet first, as for data). A source block's repair symbols thus travel far
//! from its data: a burst loss can take either, not both, and a receiver that heard the
//! whole data section clean finishes before the repair section starts.

use crate::archive::{Head, PacketId};

/// Shape of one loop, derived from an archive head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopShape {
    pub data_packets: u64,
    /// Data blocks (hash packets of data).
    pub n_blocks: u64,
    /// Data packets per block.
    pub block_symbols: u64,
    /// FEC repair symbols (0 without FEC).
    pub repair_packets: u64,
    /// Hash blocks of repair symbols, numbered after the data blocks.
    pub repair_blocks: u64,
    /// Data packets per FEC source block (a whole number of blocks; 0 without FEC).
    pub fec_source: u64,
    /// Repair symbols per FEC source block.
    pub fec_repair: u64,
    /// Symbols per FEC source block the repair hash packets list: the stored repairs, then
    /// the extras a server makes on demand ([`crate::archive::fec::hashed_symbols`]).
    pub fec_hashed: u64,
}

impl LoopShape {
    pub fn of(head: &Head) -> LoopShape {
        LoopShape {
            data_packets: head.data_packets(),
            n_blocks: head.n_blocks(),
            block_symbols: head.block_symbols as u64,
            repair_packets: head.repair_packets(),
            repair_blocks: head.repair_hash_blocks(),
            fec_source: if head.repair_symbols == 0 {
                0
            } else {
                head.fec_source as u64
            },
            fec_repair: head.repair_symbols as u64,
            fec_hashed: crate::archive::fec::hashed_symbols(head.repair_symbols as usize) as u64,
        }
    }

    /// A loop of data only (no FEC).
    pub fn data_only(data_packets: u64, block_symbols: u64) -> LoopShape {
        LoopShape {
            data_packets,
            n_blocks: data_packets.div_ceil(block_symbols.max(1)),
            block_symbols,
            repair_packets: 0,
            repair_blocks: 0,
            fec_source: 0,
            fec_repair: 0,
            fec_hashed: 0,
        }
    }

    /// A loop with FEC: source blocks of `source` data packets (a multiple of
    /// `block_symbols`), each with `repair` repair symbols.
    pub fn with_fec(data_packets: u64, block_symbols: u64, source: u64, repair: u64) -> LoopShape {
        let fec_blocks = data_packets.div_ceil(source.max(1));
        let hashed = crate::archive::fec::hashed_symbols(repair as usize) as u64;
        LoopShape {
            repair_packets: fec_blocks * repair,
            repair_blocks: fec_blocks * hashed.div_ceil(block_symbols.max(1)),
            fec_source: source,
            fec_repair: repair,
            fec_hashed: hashed,
            ..LoopShape::data_only(data_packets, block_symbols)
        }
    }

    pub fn loop_packets(&self) -> u64 {
        self.data_section() + self.repair_packets + self.repair_blocks
    }

    /// Packets of data and their hash packets.
    pub fn data_section(&self) -> u64 {
        self.data_packets + self.n_blocks
    }

    /// Hash blocks of data and repair symbols.
    pub fn all_blocks(&self) -> u64 {
        self.n_blocks + self.repair_blocks
    }

    fn fec(&self) -> bool {
        self.fec_source > 0 && self.fec_repair > 0
    }

    /// FEC source blocks.
    pub fn fec_blocks(&self) -> u64 {
        if self.fec() {
            self.data_packets.div_ceil(self.fec_source)
        } else {
            0
        }
    }

    /// Data hash blocks per full FEC block, repair hash blocks per FEC block.
    fn per_fec(&self) -> (u64, u64) {
        (
            self.fec_source / self.block_symbols,
            self.fec_hashed.div_ceil(self.block_symbols),
        )
    }

    /// Repair hash blocks per FEC block that list stored repair symbols (the rest list
    /// extras only, and travel as bare hash packets at the end of the repair segment).
    fn stored_hash_blocks(&self) -> u64 {
        self.fec_repair.div_ceil(self.block_symbols)
    }

    /// Data packets of FEC block `f` (0 past the last).
    pub fn fec_source_count(&self, f: u64) -> u64 {
        let a = (f * self.fec_source).min(self.data_packets);
        ((f + 1) * self.fec_source).min(self.data_packets) - a
    }

    /// The FEC block whose repair segment `id` is the last packet of, if it is.
    pub fn ends_repair_segment(&self, id: PacketId) -> Option<u64> {
        let b = self.hash_block_of(id);
        if b < self.n_blocks || matches!(id, PacketId::Data(_) | PacketId::Extra(_)) {
            return None;
        }
        let g = self.fec_block_of_hash(b)?;
        let last = self.repair_seg_start(g) + self.repair_seg_len() - 1;
        (self.loop_pos(id) == last).then_some(g)
    }

    /// Extra symbols per FEC block.
    pub fn fec_extras(&self) -> u64 {
        self.fec_hashed.saturating_sub(self.fec_repair)
    }

    /// Packets of FEC block `f`'s data segment (its data and data hash packets).
    fn data_seg_len(&self, f: u64) -> u64 {
        let (m, _) = self.per_fec();
        let first = f * self.fec_source;
        let n = (self.data_packets - first).min(self.fec_source);
        n + (self.n_blocks - f * m).min(m)
    }

    /// Packets of one FEC block's repair segment.
    fn repair_seg_len(&self) -> u64 {
        self.fec_repair + self.per_fec().1
    }

    /// Where FEC block `f`'s data segment starts. The loop is `D0 D1 R0 D2 R1 … D(F-1)
    /// R(F-2) R(F-1)`: each block's repair symbols follow the *next* block's data, so a
    /// burst loss never takes a block's data and its repairs together, and a receiver holds
    /// at most two blocks' unverified or undecoded symbols at a time.
    fn data_seg_start(&self, f: u64) -> u64 {
        let (m, _) = self.per_fec();
        f * m * (self.block_symbols + 1) + f.saturating_sub(1) * self.repair_seg_len()
    }

    /// Where FEC block `g`'s repair segment starts.
    fn repair_seg_start(&self, g: u64) -> u64 {
        let f = self.fec_blocks();
        if g + 1 < f {
            self.data_seg_start(g + 1) + self.data_seg_len(g + 1)
        } else if f >= 2 {
            self.repair_seg_start(f - 2) + self.repair_seg_len()
        } else {
            self.data_seg_len(0)
        }
    }

    /// Packet at `o` within FEC block `f`'s data segment.
    fn data_seg_packet(&self, f: u64, o: u64) -> PacketId {
        let per = self.block_symbols + 1;
        let b = f * self.per_fec().0 + o / per;
        match o % per {
            0 => PacketId::Hash(b),
            p => PacketId::Data(b * self.block_symbols + p - 1),
        }
    }

    /// Packet at `o` within FEC block `g`'s repair segment: each hash packet listing stored
    /// repairs followed by them, then the hash packets that list extras only.
    fn repair_seg_packet(&self, g: u64, o: u64) -> PacketId {
        let per = self.block_symbols + 1;
        let stored = self.fec_repair + self.stored_hash_blocks();
        if o >= stored {
            let u = self.stored_hash_blocks() + (o - stored);
            return PacketId::Hash(self.n_blocks + g * self.per_fec().1 + u);
        }
        let (u, p) = (o / per, o % per);
        match p {
            0 => PacketId::Hash(self.n_blocks + g * self.per_fec().1 + u),
            p => PacketId::Repair(g * self.fec_repair + u * self.block_symbols + p - 1),
        }
    }

    /// The packet at position `j` of the loop (`j < loop_packets`).
    pub fn packet_at(&self, j: u64) -> PacketId {
        let per = self.block_symbols + 1;
        if !self.fec() {
            let (b, pos) = (j / per, j % per);
            return if pos == 0 {
                PacketId::Hash(b)
            } else {
                PacketId::Data(b * self.block_symbols + pos - 1)
            };
        }
        let fb = self.fec_blocks();
        let d0 = self.data_seg_len(0);
        if j < d0 {
            return self.data_seg_packet(0, j);
        }
        // Full pairs `D(f) R(f-1)` for f in 1..F-1, then the tail `D(F-1) R(F-2) R(F-1)`.
        let pair = self.per_fec().0 * per + self.repair_seg_len();
        let t = (j - d0) / pair;
        let f = 1 + t;
        if f + 1 < fb {
            let o = (j - d0) % pair;
            let dl = self.per_fec().0 * per;
            return if o < dl {
                self.data_seg_packet(f, o)
            } else {
                self.repair_seg_packet(f - 1, o - dl)
            };
        }
        let last = fb - 1;
        let mut o = j - self.data_seg_start(last);
        if last > 0 {
            if o < self.data_seg_len(last) {
                return self.data_seg_packet(last, o);
            }
            o -= self.data_seg_len(last);
            if o < self.repair_seg_len() {
                return self.repair_seg_packet(last - 1, o);
            }
            o -= self.repair_seg_len();
        } else {
            o -= d0;
        }
        self.repair_seg_packet(last, o)
    }

    /// Position of a packet in the loop (inverse of [`LoopShape::packet_at`]). The server's
    /// repair queue and the receiver's gap detection both order packets by it.
    pub fn loop_pos(&self, id: PacketId) -> u64 {
        let per = self.block_symbols + 1;
        let k = self.block_symbols;
        if !self.fec() {
            return match id {
                PacketId::Hash(b) => b * per,
                PacketId::Data(s) => (s / k) * per + s % k + 1,
                PacketId::Repair(_) | PacketId::Extra(_) => 0,
            };
        }
        let (m, q) = self.per_fec();
        match id {
            PacketId::Hash(b) if b < self.n_blocks => {
                let f = b / m;
                self.data_seg_start(f) + (b - f * m) * per
            }
            PacketId::Data(s) => {
                let b = s / k;
                let f = b / m;
                self.data_seg_start(f) + (b - f * m) * per + s % k + 1
            }
            PacketId::Hash(b) => {
                let j = b - self.n_blocks;
                let (g, u) = (j / q, j % q);
                let qs = self.stored_hash_blocks();
                if u < qs {
                    self.repair_seg_start(g) + u * per
                } else {
                    self.repair_seg_start(g) + self.fec_repair + qs + (u - qs)
                }
            }
            // Never in the loop: where its hash packet is.
            PacketId::Extra(_) => self.loop_pos(PacketId::Hash(self.hash_block_of(id))),
            PacketId::Repair(r) => {
                let (g, i) = (r / self.fec_repair, r % self.fec_repair);
                self.repair_seg_start(g) + (i / k) * per + i % k + 1
            }
        }
    }

    /// The hash block the packet at position `pos` belongs to.
    pub fn block_at(&self, pos: u64) -> u64 {
        self.hash_block_of(self.packet_at(pos))
    }

    /// The hash block whose packet verifies `id` (a hash packet's own block).
    pub fn hash_block_of(&self, id: PacketId) -> u64 {
        match id {
            PacketId::Data(s) => s / self.block_symbols,
            PacketId::Repair(r) => {
                let (g, i) = (r / self.fec_repair.max(1), r % self.fec_repair.max(1));
                self.n_blocks + g * self.per_fec().1 + i / self.block_symbols
            }
            PacketId::Extra(e) => {
                let x = self.fec_extras().max(1);
                let (g, j) = (e / x, self.fec_repair + e % x);
                self.n_blocks + g * self.per_fec().1 + j / self.block_symbols
            }
            PacketId::Hash(b) => b,
        }
    }

    /// The FEC source block whose data or repair symbols hash block `b` lists (`None`
    /// without FEC or out of range).
    pub fn fec_block_of_hash(&self, b: u64) -> Option<u64> {
        if !self.fec() || b >= self.all_blocks() {
            return None;
        }
        Some(if b < self.n_blocks {
            b / self.per_fec().0
        } else {
            (b - self.n_blocks) / self.per_fec().1
        })
    }

    /// Leaves (data packets or stored repair symbols: the loop's units) of hash block `b`.
    pub fn leaves_of(&self, b: u64) -> Vec<PacketId> {
        let k = self.block_symbols;
        if b < self.n_blocks {
            (b * k..((b + 1) * k).min(self.data_packets))
                .map(PacketId::Data)
                .collect()
        } else if self.fec() {
            let q = self.per_fec().1;
            let j = b - self.n_blocks;
            let (g, u) = (j / q, j % q);
            let first = g * self.fec_repair + u * k;
            (first..(first + k).min((g + 1) * self.fec_repair))
                .map(PacketId::Repair)
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Dense index of a packet among the loop's units: data serials first, then repair
    /// symbols, then hash packets. Receivers use it for their have-bitmaps (without FEC this
    /// is the layout of earlier state files).
    pub fn unit_index(&self, id: PacketId) -> Option<u64> {
        match id {
            PacketId::Data(s) if s < self.data_packets => Some(s),
            PacketId::Repair(r) if r < self.repair_packets => Some(self.data_packets + r),
            PacketId::Hash(b) if b < self.all_blocks() => {
                Some(self.data_packets + self.repair_packets + b)
            }
            _ => None,
        }
    }

    pub fn unit_packet(&self, unit: u64) -> PacketId {
        if unit < self.data_packets {
            PacketId::Data(unit)
        } else if unit < self.data_packets + self.repair_packets {
            PacketId::Repair(unit - self.data_packets)
        } else {
            PacketId::Hash(unit - self.data_packets - self.repair_packets)
        }
    }

    /// Units a download must hold to be complete: data and their hash packets (repair
    /// symbols and their hash packets only help get there).
    pub fn required(&self, unit: u64) -> bool {
        unit < self.data_packets
            || (unit >= self.data_packets + self.repair_packets
                && unit < self.data_packets + self.repair_packets + self.n_blocks)
    }

    pub fn required_units(&self) -> u64 {
        self.data_packets + self.n_blocks
    }
}

/// Position in the loop of one channel.
#[derive(Clone, Debug)]
pub struct Carousel {
    shape: LoopShape,
    pos: u64,
    loops: u32,
}

impl Carousel {
    pub fn new(shape: LoopShape) -> Carousel {
        Carousel {
            shape,
            pos: 0,
            loops: 0,
        }
    }

    /// A loop that starts at block `block` (its hash packet) and wraps round as usual; a
    /// block out of range starts at 0. Used for a channel opened by a resuming receiver.
    pub fn starting_at(shape: LoopShape, block: u64) -> Carousel {
        let pos = if block < shape.all_blocks() {
            shape.loop_pos(PacketId::Hash(block))
        } else {
            0
        };
        Carousel {
            shape,
            pos,
            loops: 0,
        }
    }

    pub fn shape(&self) -> &LoopShape {
        &self.shape
    }

    /// Completed loops so far.
    pub fn loops(&self) -> u32 {
        self.loops
    }

    /// The block the next packet belongs to (where a loop stopped now would carry on).
    pub fn block(&self) -> u64 {
        self.shape.block_at(self.pos)
    }

    /// True when the next packet starts a new loop.
    pub fn at_loop_start(&self) -> bool {
        self.pos == 0
    }

    /// The next packet, or `None` for an empty archive (nothing to loop).
    pub fn next_packet(&mut self) -> Option<PacketId> {
        let n = self.shape.loop_packets();
        if n == 0 {
            return None;
        }
        let id = self.shape.packet_at(self.pos);
        self.pos += 1;
        if self.pos == n {
            self.pos = 0;
            self.loops = self.loops.wrapping_add(1);
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_can_start_at_any_block() {
        let shape = LoopShape::data_only(20, 8);
        let mut c = Carousel::starting_at(shape, 2);
        assert_eq!(c.next_packet(), Some(PacketId::Hash(2)));
        assert_eq!(c.next_packet(), Some(PacketId::Data(16)));
        for _ in 0..3 {
            c.next_packet();
        }
        assert!(c.at_loop_start(), "wraps after the last block");
        assert_eq!(c.next_packet(), Some(PacketId::Hash(0)));
        let mut c = Carousel::starting_at(shape, 3);
        assert_eq!(
            c.next_packet(),
            Some(PacketId::Hash(0)),
            "out of range: block 0"
        );
    }

    #[test]
    fn one_loop_is_every_unit_once_hash_first() {
        for (data, k, source, repair) in [
            (0u64, 8u64, 0u64, 0u64),
            (1, 8, 0, 0),
            (8, 8, 0, 0),
            (9, 8, 0, 0),
            (100, 8, 0, 0),
            (17, 1, 0, 0),
            (100, 8, 24, 10),
            (9, 8, 16, 17),
            (100, 8, 32, 8),
            (100, 8, 40, 3),
            (100, 8, 104, 9),
            (80, 8, 16, 2),
        ] {
            let shape = if repair == 0 {
                LoopShape::data_only(data, k)
            } else {
                LoopShape::with_fec(data, k, source, repair)
            };
            let mut c = Carousel::new(shape);
            let mut seen = vec![false; shape.loop_packets() as usize];
            let mut hashes_seen = std::collections::HashSet::new();
            for j in 0..shape.loop_packets() {
                let id = c.next_packet().unwrap();
                let u = shape.unit_index(id).unwrap() as usize;
                assert_eq!(
                    shape.packet_at(shape.loop_pos(id)),
                    id,
                    "loop_pos inverts packet_at"
                );
                assert_eq!(shape.block_at(j), shape.hash_block_of(id));
                assert!(!seen[u], "{id:?} twice");
                seen[u] = true;
                assert_eq!(shape.unit_packet(u as u64), id);
                match id {
                    PacketId::Hash(b) => {
                        hashes_seen.insert(b);
                    }
                    leaf => assert!(
                        hashes_seen.contains(&shape.hash_block_of(leaf)),
                        "{leaf:?} before its hash"
                    ),
                }
                if let PacketId::Repair(r) = id {
                    // A block's repairs come after the next block's data (or at the end).
                    let g = r / repair;
                    let next_data = ((g + 1) * source).min(data - 1);
                    assert!(
                        j > shape.loop_pos(PacketId::Data(next_data)),
                        "{id:?} before the next block's data"
                    );
                }
            }
            assert!(seen.iter().all(|s| *s));
            assert!(c.at_loop_start());
            assert_eq!(c.loops(), if data == 0 { 0 } else { 1 });
            // Each FEC block's repair segment ends once per loop, with a packet of its own
            // (a hash packet listing extras only, or its last stored repair).
            let ends: Vec<u64> = (0..shape.loop_packets())
                .filter_map(|j| shape.ends_repair_segment(shape.packet_at(j)))
                .collect();
            let mut sorted = ends.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..shape.fec_blocks()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn extra_symbols_map_to_the_hash_packets_that_list_them() {
        // 8 leaves per hash packet, 10 stored repairs of RS(24, 64): 54 extras per block,
        // listed after the stored ones (hash packets 0-1 of the block's 8 list stored ones).
        let shape = LoopShape::with_fec(100, 8, 24, 10);
        assert_eq!((shape.fec_hashed, shape.fec_extras()), (64, 54));
        let first_repair_hash = shape.n_blocks;
        assert_eq!(
            shape.hash_block_of(PacketId::Extra(0)),
            first_repair_hash + 1,
            "code index 10: the second hash packet, after stored 8 and 9"
        );
        assert_eq!(
            shape.hash_block_of(PacketId::Extra(53)),
            first_repair_hash + 7
        );
        // Block 1's first extra: its own second repair hash packet.
        assert_eq!(
            shape.hash_block_of(PacketId::Extra(54)),
            first_repair_hash + 9
        );
        assert_eq!(shape.fec_block_of_hash(first_repair_hash + 8), Some(1));
        assert_eq!(
            shape.unit_index(PacketId::Extra(0)),
            None,
            "never a loop unit"
        );
    }
}
