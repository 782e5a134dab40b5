//! Simulation report: the NAK/repair protocol at 10, 100 and 1,000 receivers.
//!
//! `cargo bench --bench sim` prints, per configuration: completion time in loops (from each
//! receiver's first packet), loss events, NAKed units reaching the server per loss event in
//! three columns — `naks/loss` with suppression, `naks/loss_2d` with suppression and peers
//! twice as far apart, `naks/loss_off` without suppression on the same seed — duplicate
//! repairs, and bytes on the wire per byte of archive.
//!
//! `cargo bench --bench sim -- tiers` prints the throughput-tier simulation instead: four
//! receivers whose links change mid-transfer, over several seeds — per link step, the time
//! to reach the tier that fits and the join experiments it took, and tier changes per
//! receiver.
//!
//! `cargo bench --bench sim -- mixed` prints the mixed audience (clean, 1–10 % random loss,
//! links of 8–1000 Mbit/s, late joiners, no multicast; everyone leaving when done) with 4 and
//! with 200 receivers, on tiers and on one fixed rate: per receiver its completion time,
//! bytes received per archive byte, the tier it settled on and its tier changes. Every
//! receiver is the real `Session` that `mcast-recv` runs.

use std::time::{Duration, Instant};

use mcast::sim::mixed::{self, MixedConfig};
use mcast::sim::tiers::{self, TierSimConfig};
use mcast::sim::{run, SimConfig};

fn main() {
    if std::env::args().any(|a| a == "tiers") {
        return tier_report();
    }
    if std::env::args().any(|a| a == "mixed") {
        return mixed_report();
    }
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

fn tier_report() {
    const M: u64 = 1_000_000;
    let steps = |s: &[(u64, u64)]| -> Vec<(Duration, u64)> {
        s.iter()
            .map(|&(at, mbit)| (Duration::from_secs(at), mbit * M))
            .collect()
    };
    println!(
        "{:>4} {:>3} {:>7} {:>9} {:>5} {:>10} {:>7} {:>8}",
        "seed", "rx", "step_s", "link_Mbit", "tier", "reached_s", "probes", "changes"
    );
    let (mut worst_up, mut worst_down, mut most_changes) = (0.0f64, 0.0f64, 0u32);
    for seed in 1..=5 {
        let mut cfg = TierSimConfig::new(
            vec![
                steps(&[(0, 200), (40, 20), (100, 200)]),
                steps(&[(0, 40), (30, 8), (80, 100)]),
                steps(&[(0, 8), (60, 40)]),
                steps(&[(0, 100)]),
            ],
            4_000_000,
            seed,
        );
        cfg.max_time = Duration::from_secs(200);
        let t = Instant::now();
        let r = tiers::run(&cfg);
        for (i, x) in r.receivers.iter().enumerate() {
            most_changes = most_changes.max(x.tier_changes);
            for (k, s) in x.segments.iter().enumerate() {
                let reached = s.reached_after_s.unwrap_or(f64::INFINITY);
                if k > 0 {
                    let prev = x.segments[k - 1].link_bps;
                    if s.link_bps > prev {
                        worst_up = worst_up.max(reached);
                    } else {
                        worst_down = worst_down.max(reached);
                    }
                }
                println!(
                    "{:>4} {:>3} {:>7.0} {:>9} {:>5} {:>10.1} {:>7} {:>8}",
                    seed,
                    i,
                    s.from_s,
                    s.link_bps / M,
                    s.fitting_tier,
                    reached,
                    s.probes,
                    if k == 0 {
                        x.tier_changes.to_string()
                    } else {
                        String::new()
                    }
                );
            }
        }
        println!(
            "     (seed {seed}: {:.1} s to simulate)",
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "worst: link fell → tier reached in {worst_down:.1} s; link rose → {worst_up:.1} s; \
         most tier changes per receiver in 200 s: {most_changes}"
    );
}

fn mixed_report() {
    // A 50 MB title (40,000 packets of 1280 bytes).
    let packets: u64 = std::env::var("MIXED_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    // IGMPv3, then an IGMPv2 querier (general queries every 31 s, the Linux bridge's startup
    // interval): a member's leave stops the group for the others until they report again.
    for (receivers, v2) in [(4usize, false), (4, true), (200, false)] {
        for tiered in [true, false] {
            let mut cfg = MixedConfig::new(receivers, packets, 11);
            if v2 {
                cfg.igmp_v2_query = Some(Duration::from_secs(31));
            }
            if receivers > 4 {
                // Receivers that never finish keep the simulator busy (every packet reaches
                // every receiver and is verified): 2 minutes of them on tiers, 40 s on one
                // fixed rate, where the slow links never finish anyway.
                cfg.max_time = Duration::from_secs(if tiered { 120 } else { 40 });
            }
            if !tiered {
                // One fixed rate, as an operator's default config (200 Mbit/s).
                cfg.tiers_bps = vec![200_000_000];
            }
            let t = Instant::now();
            let r = mixed::run(&cfg);
            println!(
                "\n== {receivers} receivers, {}, {}: {} of {} complete, {:.0} s simulated in {:.1} s; one loop takes {} s ==",
                if tiered { "tiers 8/40/200/800 Mbit/s" } else { "one channel at 200 Mbit/s" },
                if v2 { "IGMPv2 querier" } else { "IGMPv3" },
                r.completed,
                receivers,
                r.sim_seconds,
                t.elapsed().as_secs_f64(),
                r.loop_seconds
                    .iter()
                    .map(|s| format!("{s:.1}"))
                    .collect::<Vec<_>>()
                    .join("/")
            );
            println!(
                "{:>4} {:>13} {:>9} {:>6} {:>6} {:>9} {:>9} {:>8} {:>5} {:>7} {:>6} {:>7}",
                "rx",
                "kind",
                "link_Mbit",
                "loss%",
                "join_s",
                "done_s",
                "rcvd/arch",
                "settled",
                "final",
                "changes",
                "NAKs",
                "unicast"
            );
            // 200 receivers: every receiver of the first 12, then one line per kind summary.
            let show = if receivers <= 12 { receivers } else { 12 };
            for (i, x) in r.receivers.iter().enumerate().take(show) {
                println!(
                    "{:>4} {:>13} {:>9} {:>6.1} {:>6.1} {:>9} {:>9.2} {:>8} {:>5} {:>7} {:>6} {:>7}",
                    i,
                    x.profile.kind,
                    if x.profile.link_bps == 0 { "-".to_string() } else { (x.profile.link_bps / 1_000_000).to_string() },
                    x.profile.loss * 100.0,
                    x.profile.join_s,
                    x.seconds.map_or("-".to_string(), |s| format!("{s:.1}")),
                    x.received_per_archive_byte,
                    x.settled_tier,
                    x.final_tier,
                    x.tier_changes,
                    x.naks_sent,
                    x.unicast
                );
            }
            if receivers > show {
                let mut kinds: Vec<&str> = r.receivers.iter().map(|x| x.profile.kind).collect();
                kinds.sort();
                kinds.dedup();
                for k in kinds {
                    let xs: Vec<_> = r.receivers.iter().filter(|x| x.profile.kind == k).collect();
                    let done: Vec<f64> = xs.iter().filter_map(|x| x.seconds).collect();
                    let worst = done.iter().cloned().fold(0.0, f64::max);
                    let mean = done.iter().sum::<f64>() / done.len().max(1) as f64;
                    let rcvd = xs.iter().map(|x| x.received_per_archive_byte).sum::<f64>()
                        / xs.len() as f64;
                    let changes =
                        xs.iter().map(|x| x.tier_changes).sum::<u32>() as f64 / xs.len() as f64;
                    println!(
                        "  {k:>13}: {} receivers, {} complete, done mean {mean:.1} s worst {worst:.1} s, rcvd/arch {rcvd:.2}, tier changes {changes:.1}",
                        xs.len(),
                        done.len()
                    );
                }
            }
        }
    }
}
