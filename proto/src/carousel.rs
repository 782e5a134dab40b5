//! The carousel loop order (FIG. 4C, 9B): which packet comes next, forever.
//!
//! Each block goes out as its hash packet followed by its data packets, so a receiver that
//! joins anywhere can verify everything it hears from the next block boundary on; at the end of
//! the last block the loop restarts at block 0. Pure arithmetic: no I/O, no clock.

use crate::archive::{Head, PacketId};

/// Shape of one loop, derived from an archive head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopShape {
    pub data_packets: u64,
    pub n_blocks: u64,
    /// Data packets per block.
    pub block_symbols: u64,
}

impl LoopShape {
    pub fn of(head: &Head) -> LoopShape {
        LoopShape {
            data_packets: head.data_packets(),
            n_blocks: head.n_blocks(),
            block_symbols: head.block_symbols as u64,
        }
    }

    pub fn loop_packets(&self) -> u64 {
        self.data_packets + self.n_blocks
    }

    /// The packet at position `j` of the loop (`j < loop_packets`).
    pub fn packet_at(&self, j: u64) -> PacketId {
        let per = self.block_symbols + 1;
        let (b, pos) = (j / per, j % per);
        if pos == 0 {
            PacketId::Hash(b)
        } else {
            PacketId::Data(b * self.block_symbols + pos - 1)
        }
    }

    /// Position of a packet in the loop (inverse of [`LoopShape::packet_at`]). The server's
    /// repair queue and the receiver's gap detection both order packets by it.
    pub fn loop_pos(&self, id: PacketId) -> u64 {
        let per = self.block_symbols + 1;
        match id {
            PacketId::Hash(b) => b * per,
            PacketId::Data(s) => (s / self.block_symbols) * per + s % self.block_symbols + 1,
        }
    }

    /// Dense index of a packet among the loop's units: data serials first, then hash packets.
    /// Receivers use it for their have-bitmaps.
    pub fn unit_index(&self, id: PacketId) -> Option<u64> {
        match id {
            PacketId::Data(s) if s < self.data_packets => Some(s),
            PacketId::Hash(b) if b < self.n_blocks => Some(self.data_packets + b),
            _ => None,
        }
    }

    pub fn unit_packet(&self, unit: u64) -> PacketId {
        if unit < self.data_packets {
            PacketId::Data(unit)
        } else {
            PacketId::Hash(unit - self.data_packets)
        }
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
        let pos = block.saturating_mul(shape.block_symbols + 1);
        Carousel {
            shape,
            pos: if pos < shape.loop_packets() { pos } else { 0 },
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
        self.pos / (self.shape.block_symbols + 1)
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
        let shape = LoopShape {
            data_packets: 20,
            n_blocks: 3,
            block_symbols: 8,
        };
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
        for (data, k) in [(0u64, 8u64), (1, 8), (8, 8), (9, 8), (100, 8), (17, 1)] {
            let shape = LoopShape {
                data_packets: data,
                n_blocks: data.div_ceil(k),
                block_symbols: k,
            };
            let mut c = Carousel::new(shape);
            let mut seen = vec![false; shape.loop_packets() as usize];
            let mut hashes_seen = std::collections::HashSet::new();
            for _ in 0..shape.loop_packets() {
                let id = c.next_packet().unwrap();
                let u = shape.unit_index(id).unwrap() as usize;
                assert_eq!(
                    shape.packet_at(shape.loop_pos(id)),
                    id,
                    "loop_pos inverts packet_at"
                );
                assert!(!seen[u], "{id:?} twice");
                seen[u] = true;
                assert_eq!(shape.unit_packet(u as u64), id);
                match id {
                    PacketId::Hash(b) => {
                        hashes_seen.insert(b);
                    }
                    PacketId::Data(s) => {
                        assert!(hashes_seen.contains(&(s / k)), "data before its hash")
                    }
                }
            }
            assert!(seen.iter().all(|s| *s));
            assert!(c.at_loop_start());
            assert_eq!(c.loops(), if data == 0 { 0 } else { 1 });
        }
    }
}
