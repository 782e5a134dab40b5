//! What a resume needs from what is held: the payload still missing, and the block a new
//! loop should start at (right after the longest run of complete blocks, cyclically, so the
//! loop passes every missing packet as soon as it can).

use super::download::Download;
use crate::carousel::LoopShape;

/// Payload bytes of the required units not held yet (a FEC archive's repair symbols are
/// not counted: the data they stand in for is).
pub fn missing_bytes(dl: &Download) -> u64 {
    let shape = dl.shape();
    (0..dl.all_units())
        .filter(|&u| shape.required(u) && !dl.has(u))
        .map(|u| {
            dl.layout()
                .packet_range(dl.shape().unit_packet(u))
                .map(|r| r.1 as u64)
                .unwrap_or(0)
        })
        .sum()
}

/// The block a resumed loop should start at; `None` when every block is complete (or
/// there are none).
pub fn start_block(shape: &LoopShape, has: impl Fn(u64) -> bool) -> Option<u64> {
    if shape.n_blocks == 0 {
        return None;
    }
    let k = shape.block_symbols;
    let complete: Vec<bool> = (0..shape.n_blocks)
        .map(|b| {
            has(shape
                .unit_index(crate::archive::PacketId::Hash(b))
                .expect("in range"))
                && (b * k..((b + 1) * k).min(shape.data_packets)).all(&has)
        })
        .collect();
    best_start(&complete)
}

/// Start index after the longest cyclic run of `true`; `None` when all are `true`.
pub fn best_start(complete: &[bool]) -> Option<u64> {
    let n = complete.len();
    if n == 0 || complete.iter().all(|c| *c) {
        return None;
    }
    // Walk twice round so a run that wraps is measured whole.
    let (mut best_len, mut best_end, mut run) = (0usize, 0usize, 0usize);
    for i in 0..2 * n {
        if complete[i % n] {
            run += 1;
            if run > best_len {
                best_len = run;
                best_end = i % n;
            }
        } else {
            run = 0;
        }
    }
    if best_len == 0 {
        // Nothing held: start at the first block.
        return Some(0);
    }
    Some(((best_end + 1) % n) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_starts_after_the_longest_complete_run() {
        let t = true;
        let f = false;
        assert_eq!(best_start(&[t, t, t]), None);
        assert_eq!(best_start(&[f, f, f]), Some(0));
        // Held a prefix: start where it ends.
        assert_eq!(best_start(&[t, t, t, f, f]), Some(3));
        // Held a wrapped range (joined mid-loop): start after it.
        assert_eq!(best_start(&[t, f, f, t, t]), Some(1));
        // Two held runs: skip the longer one.
        assert_eq!(best_start(&[t, f, t, t, t, f, f]), Some(5));
    }
}
