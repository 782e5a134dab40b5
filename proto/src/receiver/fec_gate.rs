//! When a FEC source block is judged short, so that NAKs ask only for what the loop's repair
//! symbols did not cover.
//!
//! A receiver of a FEC archive NAKs nothing while a block's data and then its repair symbols
//! go by: most losses are covered by the repair symbols, which serve every receiver at once.
//! A block is judged once the receiver heard some of its data and then its repair range, when
//! the loop moves past that range: it is then short by
//! [`super::download::FecTally::deficit`] symbols, and the session NAKs that many of its
//! missing data packets — including the part that went by before the receiver joined the
//! channel (a late joiner, or a tier move, asks for at most one block that way; waiting a
//! whole loop for it cost more on the bed). A block none of whose data was heard is not
//! judged on that pass: the loop brings it round, as for packets without FEC.

use crate::archive::fec::FecShape;
use crate::archive::PacketId;
use crate::carousel::LoopShape;

pub struct FecGate {
    loop_shape: LoopShape,
    /// Per source block: some of its data heard, and its repair range heard.
    started: Vec<bool>,
    repair_heard: Vec<bool>,
    /// Blocks with both, waiting for the loop to move past their repair range (ascending).
    armed: Vec<u64>,
}

impl FecGate {
    pub fn new(shape: FecShape, loop_shape: LoopShape) -> FecGate {
        let n = shape.blocks as usize;
        FecGate {
            loop_shape,
            started: vec![false; n],
            repair_heard: vec![false; n],
            armed: Vec::new(),
        }
    }

    /// A verified loop packet (not a repair, not a burst): the source blocks it makes due
    /// for judging, ascending.
    pub fn on_loop_packet(&mut self, id: PacketId) -> Vec<u64> {
        let b = self.loop_shape.hash_block_of(id);
        if b < self.loop_shape.n_blocks {
            // A data segment: its block was heard, and every block whose repairs were heard
            // is now past them.
            if let Some(f) = self.loop_shape.fec_block_of_hash(b) {
                self.started[f as usize] = true;
            }
            return self.take_due(u64::MAX);
        }
        match self.loop_shape.fec_block_of_hash(b) {
            Some(g) => self.repair_at(g),
            None => Vec::new(),
        }
    }

    /// The repair section is at source block `g`: `g` heard its repairs; blocks before it
    /// are due.
    fn repair_at(&mut self, g: u64) -> Vec<u64> {
        if let Some(i) = usize::try_from(g).ok().filter(|&i| i < self.started.len()) {
            if self.started[i] && !self.repair_heard[i] {
                self.repair_heard[i] = true;
                let at = self.armed.partition_point(|&x| x < g);
                self.armed.insert(at, g);
            }
        }
        self.take_due(g)
    }

    /// Armed blocks before `before`, disarmed for the next pass.
    fn take_due(&mut self, before: u64) -> Vec<u64> {
        let n = self.armed.partition_point(|&x| x < before);
        let due: Vec<u64> = self.armed.drain(..n).collect();
        for &f in &due {
            self.started[f as usize] = false;
            self.repair_heard[f as usize] = false;
        }
        due
    }

    /// The receiver moved to another channel or lost its place: judge nothing from the
    /// partial pass.
    pub fn reset(&mut self) {
        self.started.iter_mut().for_each(|s| *s = false);
        self.repair_heard.iter_mut().for_each(|s| *s = false);
        self.armed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carousel::LoopShape;

    #[test]
    fn a_block_is_judged_after_its_data_and_its_repairs_went_by() {
        // 100 data packets, source blocks of 56 with 5 repairs, hash blocks of 8: the loop
        // is D0 D1 R0 R1.
        let shape = FecShape {
            source: 56,
            repair: 5,
            data_packets: 100,
            blocks: 2,
        };
        let loop_shape = LoopShape::with_fec(100, 8, 56, 5);
        let mut g = FecGate::new(shape, loop_shape);
        let mut judged = Vec::new();
        // Join in the middle of block 0's data: it is judged when the repairs reach block 1's.
        for j in loop_shape.loop_pos(PacketId::Data(20))..loop_shape.loop_packets() {
            judged.extend(g.on_loop_packet(loop_shape.packet_at(j)));
        }
        assert_eq!(
            judged,
            vec![0],
            "block 0 when the repairs moved past its own"
        );
        judged.extend(g.on_loop_packet(loop_shape.packet_at(0)));
        assert_eq!(
            judged,
            vec![0, 1],
            "block 1 once the loop wrapped past its repairs"
        );
        // Joining during block 1's repairs: block 1's data was not heard, it is not judged.
        let mut g = FecGate::new(shape, loop_shape);
        let mut judged = Vec::new();
        for j in loop_shape.loop_pos(PacketId::Repair(5))..loop_shape.loop_packets() {
            judged.extend(g.on_loop_packet(loop_shape.packet_at(j)));
        }
        judged.extend(g.on_loop_packet(loop_shape.packet_at(0)));
        assert!(judged.is_empty(), "{judged:?}");
    }
}
