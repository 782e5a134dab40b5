//! The receiver's crash-safe progress record (`<title>.mca.state`), read back after a crash,
//! and what the receiver builds from it: the resumed download and the block its loop should
//! start at.
//!
//! Oracles: no panic; a decoded record re-encodes to exactly its bytes; a record whose units
//! match the fixture archive resumes a download that holds exactly the units it marks.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mcast::receiver::download::Download;
use mcast_fuzz_common::{world, World};
use mcast_recv::failover::best_start;
use mcast_recv::state::State;

fn the_world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(world)
}

fuzz_target!(|input: &[u8]| {
    let Some(st) = State::decode(input) else {
        return;
    };
    assert_eq!(st.encode(), input, "re-encoding differs");
    assert_eq!(st.have.len() as u64, st.units.div_ceil(64));
    for u in [0, st.units.saturating_sub(1), st.units, u64::MAX] {
        let _ = st.has(u);
    }
    // As `load_resume` does: a record is used only for the archive (and shape) it describes.
    let w = the_world();
    if st.archive_id != w.head.archive_id || st.units != w.shape.loop_packets() {
        return;
    }
    let dl = Download::new(w.head.clone(), w.head_len, Some(st.have.clone()));
    let held = (0..st.units).filter(|&u| st.has(u)).count() as u64;
    assert_eq!(dl.have_count(), held);
    for u in 0..st.units {
        assert_eq!(dl.has(u), st.has(u));
    }
    let s = w.shape;
    let complete: Vec<bool> = (0..s.n_blocks)
        .map(|b| {
            let k = s.block_symbols;
            st.has(s.data_packets + b)
                && (b * k..((b + 1) * k).min(s.data_packets)).all(|u| st.has(u))
        })
        .collect();
    if let Some(b) = best_start(&complete) {
        assert!(b < s.n_blocks);
    }
});
