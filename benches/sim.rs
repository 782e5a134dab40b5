//! Simulation report: the NAK/repair protocol at 10, 100 and 1,000 receivers.
//!
//! `cargo bench --bench sim` prints, per configuration: completion time in loops (from each
//! receiver's first packet), loss events, NAKed units reaching the server per loss event in
//! three columns — `naks/loss` with suppression, `naks/loss_2d` with suppression and peers
//! twice as far apart, `naks/loss_off` without suppression on the same seed — duplicate
//! repairs, and bytes on the wire per byte of archive.

use std::time::Instant;

use mcast::sim::{run, SimConfig};

fn main() {
    // `cargo bench` passes --bench; any other argument filters by receiver count.
    let only: Option<usize> = std::env::args().skip(1).find_map(|a| a.parse().ok());
    println!(
        "{:>9} {:>7} {:>7} {:>10} {:>10} {:>8} {:>11} {:>13} {:>13} {:>9} {:>9} {:>8}",
        "receivers",
        "shared",
        "indep",
        "loops_mean",
        "loops_max",
        "losses",
        "naks/loss",
        "naks/loss_2d",
        "naks/loss_off",
        "repairs",
        "dup_rep",
        "wire/B"
    );
    for receivers in [10usize, 100, 1000] {
        if only.is_some_and(|n| n != receivers) {
            continue;
        }
        for (shared, indep) in [(0.01, 0.0), (0.0, 0.01), (0.01, 0.02), (0.05, 0.0)] {
            let mut cfg = SimConfig::new(receivers, indep, 42);
            cfg.shared_loss = shared;
            if receivers >= 1000 {
                cfg.data_packets = 4000;
            }
            let t = Instant::now();
            let on = run(&cfg);
            cfg.peer_delay = cfg.one_way_delay * 2;
            let star = run(&cfg);
            cfg.peer_delay = cfg.one_way_delay;
            cfg.suppression = false;
            let off = run(&cfg);
            println!(
                "{:>9} {:>7.3} {:>7.3} {:>10.3} {:>10.3} {:>8} {:>11.2} {:>13.2} {:>13.2} {:>9} {:>9} {:>8.3}   ({} complete, {:.1}s)",
                receivers,
                shared,
                indep,
                on.loops_mean,
                on.loops_max,
                on.loss_events,
                on.naks_per_loss,
                star.naks_per_loss,
                off.naks_per_loss,
                on.repairs_sent,
                on.duplicate_repairs,
                on.wire_per_file_byte,
                on.completed,
                t.elapsed().as_secs_f64()
            );
        }
    }
}
