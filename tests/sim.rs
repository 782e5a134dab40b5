//! Protocol tests on the deterministic simulation harness (`mcast::sim`): the real channel
//! manager and NAK engines, seeded loss, late joins, crashes.

use std::time::Duration;

use mcast::sim::{run, SimConfig};

fn show(name: &str, r: &mcast::sim::SimReport) {
    println!(
        "{name}: {}/{} complete, loops mean {:.2} max {:.2}, loss events {}, NAKs at server {} asking {} units + {} FEC symbols ({:.2}/loss), repairs {} (extra symbols {}, dup {}), wire/file {:.3}",
        r.completed, r.receivers, r.loops_mean, r.loops_max, r.loss_events, r.naks_at_server,
        r.nak_units_at_server, r.nak_symbols_at_server, r.naks_per_loss, r.repairs_sent,
        r.extras_sent, r.duplicate_repairs, r.wire_per_file_byte
    );
}

#[test]
fn all_receivers_complete_under_1_5_and_20_percent_loss() {
    for (loss, seed) in [(0.01, 1), (0.05, 2), (0.20, 3)] {
        let mut cfg = SimConfig::new(50, loss * 0.75, seed);
        cfg.shared_loss = loss * 0.25;
        let r = run(&cfg);
        show(&format!("loss {loss}"), &r);
        assert_eq!(r.completed, 50, "loss {loss}: {r:?}");
        assert!(
            r.channel_closed,
            "channel must close once everyone completed"
        );
    }
}

#[test]
fn repairs_beat_the_next_loop_under_shared_loss() {
    // A few receivers behind one lossy link: without repair each would need a second loop.
    for (loss, seed) in [(0.02, 21), (0.05, 22)] {
        let mut cfg = SimConfig::new(3, 0.0, seed);
        cfg.shared_loss = loss;
        let r = run(&cfg);
        show(&format!("shared loss {loss}"), &r);
        assert_eq!(r.completed, 3);
        assert!(
            r.loops_max < 1.3,
            "loss {loss}: slowest took {:.2} loops",
            r.loops_max
        );
    }
}

#[test]
fn suppression_keeps_naks_per_loss_at_most_two_with_100_receivers_shared_loss() {
    let mut cfg = SimConfig::new(100, 0.0, 7);
    cfg.shared_loss = 0.03;
    let with = run(&cfg);
    cfg.suppression = false;
    let without = run(&cfg);
    show("suppression on ", &with);
    show("suppression off", &without);
    assert_eq!(with.completed, 100);
    assert_eq!(without.completed, 100);
    assert!(
        with.naks_per_loss <= 2.0,
        "with suppression: {}",
        with.naks_per_loss
    );
    assert!(
        without.naks_per_loss > 20.0,
        "without suppression: {}",
        without.naks_per_loss
    );
}

/// An attacker on the group multicasts a forged NAK for every unit every 2 ms. Peers' NAKs
/// cannot be authenticated, so each may hold a missing unit back only a bounded number of
/// times: repairs still beat the loop. (Before that bound the receivers never NAKed and
/// waited for the next loop: ~2 loops.)
#[test]
fn forged_naks_on_the_group_do_not_silence_receivers() {
    let mut cfg = SimConfig::new(20, 0.0, 31);
    cfg.shared_loss = 0.03;
    let alone = run(&cfg);
    cfg.forged_naks = Some(Duration::from_millis(2));
    let attacked = run(&cfg);
    show("alone   ", &alone);
    show("attacked", &attacked);
    println!(
        "attacked: heard NAK units/amounts ignored {}",
        attacked.heard_naks_ignored
    );
    assert_eq!(attacked.completed, 20);
    assert!(attacked.heard_naks_ignored > 0);
    assert!(
        attacked.loops_max < 1.3,
        "attacked: slowest took {:.2} loops (alone {:.2})",
        attacked.loops_max,
        alone.loops_max
    );
}

#[test]
fn late_joiners_and_crashed_receivers_complete() {
    let mut cfg = SimConfig::new(40, 0.05, 11);
    cfg.join_spread = Duration::from_millis(400);
    cfg.crashes = 10;
    let r = run(&cfg);
    show("late joins + crashes", &r);
    // Everyone needs about one loop from where it joined, plus the crash downtime.
    assert!(r.loops_max < 4.0, "{}", r.loops_max);
    assert_eq!(r.completed, 40, "{r:?}");
    assert!(r.channel_closed);
}

#[test]
fn same_seed_same_report() {
    let mut cfg = SimConfig::new(30, 0.1, 99);
    cfg.shared_loss = 0.02;
    cfg.join_spread = Duration::from_millis(100);
    cfg.crashes = 3;
    assert_eq!(run(&cfg), run(&cfg));
    cfg.seed = 100;
    let other = run(&cfg);
    cfg.seed = 99;
    assert_ne!(run(&cfg).loss_events, other.loss_events);
}

#[test]
fn thousand_receivers_complete_under_shared_and_independent_loss() {
    let mut cfg = SimConfig::new(1000, 0.02, 5);
    cfg.shared_loss = 0.01;
    cfg.data_packets = 800;
    let r = run(&cfg);
    show("1000 receivers", &r);
    assert_eq!(r.completed, 1000);
    assert!(r.naks_per_loss < 4.0, "{}", r.naks_per_loss);
}

// ---- Throughput tiers (`mcast::sim::tiers`): real channel manager, NAK and tier engines,
// receivers behind links of their own (changing) rate.

mod tiers {
    use std::time::Duration;

    use mcast::sim::tiers::{run, LinkProfile, TierSimConfig, TierSimReport};

    const MBIT: u64 = 1_000_000;

    fn steady(mbit: u64) -> LinkProfile {
        vec![(Duration::ZERO, mbit * MBIT)]
    }

    fn steps(s: &[(u64, u64)]) -> LinkProfile {
        s.iter()
            .map(|&(at, mbit)| (Duration::from_secs(at), mbit * MBIT))
            .collect()
    }

    fn show(name: &str, r: &TierSimReport) {
        println!(
            "{name}: {:.1} s simulated, channels opened {} closed {}, server wake-ups {} ({} idle)",
            r.sim_seconds,
            r.channels_opened,
            r.channels_closed,
            r.server_wakeups,
            r.idle_server_wakeups
        );
        for t in &r.tiers {
            println!(
                "  tier {}: {:.1} MB sent, rate {:.1}–{:.1} Mbit/s, up to {} members",
                t.tier,
                t.payload_bytes as f64 / 1e6,
                t.rate_min_bps as f64 / 1e6,
                t.rate_max_bps as f64 / 1e6,
                t.max_members
            );
        }
        for (i, x) in r.receivers.iter().enumerate() {
            println!(
                "  rx{i}: done {:?} s, final tier {}, {} tier changes ({} probes, {} failed, {} down), received/file {:.2}, link drops {}, {} NAKs naming {} units",
                x.completed_at_s.map(|t| (t * 10.0).round() / 10.0),
                x.final_tier,
                x.tier_changes,
                x.probes,
                x.probes_failed,
                x.moves_down,
                x.received_per_file_byte,
                x.link_drops,
                x.naks_sent,
                x.units_naked
            );
            for s in &x.segments {
                println!(
                    "    from {:>5.1} s link {:>4} Mbit/s → tier {}: reached after {:?} s with {} probes, {:.0} % of the step on it",
                    s.from_s,
                    s.link_bps / MBIT,
                    s.fitting_tier,
                    s.reached_after_s,
                    s.probes,
                    s.share_on_fitting * 100.0
                );
            }
        }
    }

    #[test]
    fn tiers_static_links_end_on_their_fitting_tier() {
        // 40 MB: the 8 Mbit/s receiver needs ~80 s on tier 0, the 200 Mbit/s one ~5 s on tier 2.
        let cfg = TierSimConfig::new(vec![steady(8), steady(40), steady(200)], 32_000, 1);
        let r = run(&cfg);
        show("static 8/40/200", &r);
        assert!(!r.server_spinning);
        // The fitting tier's band (down to half a tier's rate, never into the tier below)
        // reaches each link: 8 Mbit/s on tier 0 (a 16 Mbit/s tier may not go below 8), 40 on
        // tier 2 (brought down from 64), 200 on tier 3 (from 256).
        for (i, (x, want)) in r.receivers.iter().zip([0, 2, 3]).enumerate() {
            assert!(x.completed_at_s.is_some(), "rx{i} did not complete");
            let s = &x.segments[0];
            assert_eq!(s.fitting_tier, want);
            if i == 1 {
                // 40 Mbit/s is 25 % above tier 2's floor: the capacity read during the join
                // (the queue filling, the old group draining) may land it a tier short, where
                // it stays until its probe timer allows (known limit, stated in the README).
                assert!(
                    (1..=2).contains(&x.final_tier),
                    "rx{i}: moves {:?}",
                    x.moves
                );
                continue;
            }
            assert_eq!(x.final_tier, want, "rx{i}: moves {:?}", x.moves);
            let reached = s.reached_after_s.expect("reached its tier");
            // Discovery (under 1.5 s), or one early retry 4 s after landing.
            assert!(
                reached <= 7.0,
                "rx{i} took {reached} s to reach tier {want}"
            );
            assert!(x.tier_changes <= 6, "rx{i}: moves {:?}", x.moves);
        }
        // The slow receiver did not hold the fast one back: tier 2 finished far sooner.
        let t = |i: usize| r.receivers[i].completed_at_s.unwrap();
        assert!(t(2) * 4.0 < t(0), "fast {} s, slow {} s", t(2), t(0));
        assert_eq!(
            r.channels_open_at_end, 0,
            "channels close once everyone is done"
        );
    }

    fn changing() -> TierSimConfig {
        // Links that fall and rise mid-transfer; the file is large enough that nobody finishes.
        TierSimConfig {
            max_time: Duration::from_secs(200),
            ..TierSimConfig::new(
                vec![
                    steps(&[(0, 200), (40, 20), (100, 200)]),
                    steps(&[(0, 40), (30, 8), (80, 100)]),
                    steps(&[(0, 8), (60, 40)]),
                    steady(100),
                ],
                4_000_000,
                2,
            )
        }
    }

    #[test]
    fn tiers_receivers_follow_links_that_change_mid_transfer() {
        let r = run(&changing());
        show("changing links", &r);
        assert!(!r.server_spinning);
        for (i, x) in r.receivers.iter().enumerate() {
            for s in &x.segments {
                let reached = s.reached_after_s.unwrap_or_else(|| {
                    panic!(
                        "rx{i} never reached tier {} from {} s: moves {:?}",
                        s.fitting_tier, s.from_s, x.moves
                    )
                });
                // A fall is followed within a few judged intervals, a rise within the longest
                // probe back-off (60 s) plus the probe itself.
                let (bound, probes) = if s.from_s == 0.0 { (5.0, 3) } else { (70.0, 3) };
                assert!(reached <= bound, "rx{i} from {} s: {reached} s", s.from_s);
                assert!(
                    s.probes <= probes,
                    "rx{i} from {} s: {} probes",
                    s.from_s,
                    s.probes
                );
            }
            assert!(
                x.tier_changes <= 20,
                "rx{i}: {} changes {:?}",
                x.tier_changes,
                x.moves
            );
        }
    }

    #[test]
    fn tiers_simulation_is_deterministic() {
        let mut cfg = TierSimConfig::new(vec![steady(8), steps(&[(0, 200), (5, 20)])], 8_000, 7);
        cfg.max_time = Duration::from_secs(40);
        assert_eq!(run(&cfg), run(&cfg));
    }
}

mod unicast {
    use mcast::sim::unicast::{run, UnicastConfig, UnicastReport};

    fn show(name: &str, r: &UnicastReport) {
        println!(
            "{name}: unicast rx first packet {:?} s, done {:?} s (link time {:.2} s), received/archive {:.3}, repairs {} \
             (stream sent {} packets, {} repairs), NAKs {}, link drops {}; multicast rx {:?} s, \
             received/archive {:.3}",
            r.first_packet_s.map(|s| (s * 100.0).round() / 100.0),
            r.seconds.map(|s| (s * 100.0).round() / 100.0),
            r.link_seconds,
            r.received_per_archive_byte,
            r.repairs_received,
            r.unicast_packets_sent,
            r.unicast_repairs_sent,
            r.naks_sent,
            r.link_drops,
            r.multicast_seconds.map(|s| (s * 100.0).round() / 100.0),
            r.multicast_received_per_archive_byte,
        );
    }

    /// Step 11 (6): behind a 50 Mbit/s link a no-multicast receiver's own stream fills the
    /// link and not much more — done within 1.3× the link's time for the archive (+ 2 s to
    /// notice that multicast is dropped and ask for unicast), having received at most 1.15×
    /// the archive — while a clean multicast receiver of the same title is not slowed.
    #[test]
    fn unicast_stream_fills_a_50_mbit_link_and_not_more() {
        let r = run(&UnicastConfig::new(50_000_000, 11));
        show("unicast behind 50 Mbit/s", &r);
        assert!(r.unicast, "{r:?}");
        let done = r.seconds.expect("the unicast receiver completes");
        let bound = 1.3 * r.link_seconds + 2.0;
        assert!(done <= bound, "{done:.2} s > {bound:.2} s: {r:?}");
        assert!(
            r.received_per_archive_byte <= 1.15,
            "received {:.3}× the archive: {r:?}",
            r.received_per_archive_byte
        );
        // The multicast receiver loops at the title's rate (200 Mbit/s: ~2 s) after its
        // discovery probe, as if the unicast one were not there.
        let m = r
            .multicast_seconds
            .expect("the multicast receiver completes");
        assert!(m < 6.0, "multicast receiver took {m:.2} s: {r:?}");
    }
}

/// Receivers short of CPU (step 11, item 3): their socket overflows, the overruns reach the
/// session (`SO_RXQ_OVFL` in the real driver), and they move down to a tier they can process
/// instead of living on repairs.
mod cpu {
    use std::time::{Duration, Instant};

    use mcast::channel::{default_ladder, Params};
    use mcast::sim::world::{run, RxSpec, WorldConfig};

    const MBIT: u64 = 1_000_000;

    #[test]
    fn a_receiver_short_of_cpu_moves_down_and_does_not_live_on_repairs() {
        // The adaptive default ladder below 400 Mbit/s: about 40, 86, 186 and 400.
        let top = 400 * MBIT;
        let ladder = default_ladder(top);
        let mut params = Params::for_tests(top);
        params.tiers_bps = ladder.clone();
        params.lease = Duration::from_secs(2);
        // rx0 processes 120 Mbit/s (its capacity fits tier 1); rx1 has CPU to spare.
        let mut starved = RxSpec::new(Duration::ZERO);
        starved.cpu_bps = Some(120 * MBIT);
        let receivers = vec![starved, RxSpec::new(Duration::from_millis(50))];
        // 128 MB. Finding the limit costs a fixed amount: the discovery burst's holes, which
        // the fitting tier's loop fills.
        let (data_packets, symbol) = (100_000u64, 1280u32);
        let cfg = WorldConfig {
            max_time: Duration::from_secs(120),
            ..WorldConfig::new(11, data_packets, symbol, params, receivers)
        };
        let out = run(&cfg, Instant::now());
        let file = (data_packets * symbol as u64) as f64;
        println!(
            "ladder {:?} Mbit/s, {:.1} MB file, {:.1} s simulated",
            ladder.iter().map(|t| t / MBIT).collect::<Vec<_>>(),
            file / 1e6,
            out.sim_seconds
        );
        for (i, r) in out.receivers.iter().enumerate() {
            println!(
                "  rx{i}: done {:?}, received/file {:.3}, socket drops {}, final tier {} (settled {}), moves {:?}, moves down {}, overrun intervals {}, repairs received {}, duplicates {}",
                r.done_at,
                r.received_bytes as f64 / file,
                r.socket_drops,
                r.stats.tier,
                r.stats.settled_tier,
                r.moves,
                r.tier_counters.moves_down,
                r.tier_counters.congested_overrun,
                r.stats.repairs_received,
                r.stats.download.duplicates
            );
        }
        for (t, x) in out.tiers.iter().enumerate() {
            println!(
                "  tier {t}: {:.1} MB sent, rate {:.1}–{:.1} Mbit/s",
                x.payload_bytes as f64 / 1e6,
                x.rate_min_bps as f64 / 1e6,
                x.rate_max_bps as f64 / 1e6
            );
        }
        assert!(!out.server_spinning);
        let (s, fast) = (&out.receivers[0], &out.receivers[1]);
        assert!(
            s.done_at.is_some() && s.failed.is_none(),
            "starved rx: {s:?}"
        );
        assert_eq!(s.stats.download.written, out.loop_units);
        assert!(s.socket_drops > 0, "the starved receiver never overran");
        assert_eq!(s.stats.socket_drops, s.socket_drops, "every drop reported");
        // Its overruns are judged: in its discovery burst (which then lands it on a tier it
        // processes) or in an interval on a tier.
        assert!(
            s.tier_counters.congested_overrun >= 1 || s.tier_counters.bursts_failed >= 1,
            "overruns not judged: {:?}",
            s.tier_counters
        );
        // It settles below the top, on a tier it can process, and not on repairs.
        assert!(s.stats.settled_tier < ladder.len() - 1, "{:?}", s.moves);
        let ratio = s.received_bytes as f64 / file;
        // The bound. (A discovery probe that joined the top tier's group left holes
        // all over the loop and measured 1.18; the burst leaves only its own.) A receiver
        // living on repairs receives 1.5–2×.
        assert!(
            ratio <= 1.15,
            "starved receiver received {ratio:.3}× the file"
        );
        // The receiver with CPU to spare is not held down by it.
        assert!(fast.done_at.is_some(), "fast rx: {fast:?}");
        assert_eq!(fast.socket_drops, 0);
        assert!(fast.done_at < s.done_at, "fast {fast:?}");
    }
}

/// The mixed audience at scale (step 11, item 7): 200 real `Session`s on one title — clean,
/// 1–10 % random loss, links of 8–1000 Mbit/s, late joiners, a few that never hear multicast —
/// against the real channel manager with tiers of 8, 40, 200 and 800 Mbit/s.
mod mixed {
    use mcast::sim::mixed::{run, MixedConfig, MixedRx};
    use std::time::Duration;

    fn worst(rx: &[&MixedRx], f: impl Fn(&MixedRx) -> f64) -> f64 {
        rx.iter().map(|x| f(x)).fold(0.0, f64::max)
    }

    #[test]
    fn two_hundred_receivers_each_get_what_their_link_carries() {
        let mut cfg = MixedConfig::new(200, 40_000, 11);
        cfg.max_time = Duration::from_secs(150);
        // The default ladder's spacing (a decade per three steps) from 8 to 800 Mbit/s.
        cfg.tiers_bps = (0..7)
            .map(|k| (8_000_000.0 * 10f64.powf(k as f64 / 3.0)) as u64)
            .collect();
        let r = run(&cfg);
        let archive_bits = r.loop_seconds[0] * cfg.tiers_bps[0] as f64;
        let mut kinds: Vec<&str> = r.receivers.iter().map(|x| x.profile.kind).collect();
        kinds.sort();
        kinds.dedup();
        for kind in &kinds {
            let rx: Vec<&MixedRx> = r
                .receivers
                .iter()
                .filter(|x| x.profile.kind == *kind)
                .collect();
            let done: Vec<f64> = rx.iter().filter_map(|x| x.seconds).collect();
            println!(
                "{kind:>13}: {} receivers, {} complete, done mean {:.1} s worst {:.1} s, \
                 received/archive worst {:.2}, worst time / link time {:.2}, tier changes worst {}",
                rx.len(),
                done.len(),
                done.iter().sum::<f64>() / done.len().max(1) as f64,
                done.iter().copied().fold(0.0, f64::max),
                worst(&rx, |x| x.received_per_archive_byte),
                worst(&rx, |x| match (x.seconds, x.profile.link_bps) {
                    (Some(s), l) if l > 0 => s / (archive_bits / l as f64),
                    _ => 0.0,
                }),
                rx.iter().map(|x| x.tier_changes).max().unwrap_or(0),
            );
        }
        for x in r
            .receivers
            .iter()
            .filter(|x| x.profile.kind == "rate-limited")
            .take(5)
        {
            println!(
                "  rate-limited {} Mbit/s: {:.1} s, received/archive {:.2} ({} repairs, {} \
                 duplicates), settled on tier {}, {} changes",
                x.profile.link_bps / 1_000_000,
                x.seconds.unwrap_or(f64::NAN),
                x.received_per_archive_byte,
                x.repairs_received,
                x.duplicates,
                x.settled_tier,
                x.tier_changes
            );
        }
        assert_eq!(r.completed, r.receivers.len(), "everyone completes");
        let top = cfg.tiers_bps.len() - 1;
        for (i, x) in r.receivers.iter().enumerate() {
            let what = format!("rx{i} {:?}: {x:?}", x.profile.kind);
            match x.profile.kind {
                // Clean and late receivers: the top tier at once, one copy of the archive.
                "clean" | "late" => {
                    assert_eq!(x.settled_tier, top, "{what}");
                    assert!(x.received_per_archive_byte <= 1.05, "{what}");
                    assert!(x.seconds.unwrap() < 2.0, "{what}");
                }
                // Random loss is not congestion: no move down, the top tier, repaired there.
                "lossy" => {
                    assert_eq!(x.settled_tier, top, "{what}");
                    assert!(x.tier_changes <= 1, "{what}");
                    assert!(x.seconds.unwrap() < 5.0, "{what}");
                }
                // Settled within at most two probes (discovery, and one more).
                "rate-limited" => assert!(x.tier_changes <= 4, "{what}"),
                // Their own unicast stream: one copy of the archive.
                "no-multicast" => {
                    assert!(x.unicast, "{what}");
                    assert!(x.received_per_archive_byte <= 1.10, "{what}");
                }
                _ => {}
            }
        }
    }
}

// ---- FEC (`[pack] fec_overhead`): repair symbols pre-encoded in the archive and looped.

mod fec {
    use mcast::sim::{run, SimConfig};

    use super::show;

    #[test]
    fn five_percent_loss_with_ten_percent_fec_completes_in_one_loop_without_naks() {
        let mut cfg = SimConfig::new(20, 0.05, 31);
        cfg.fec_overhead = 0.10;
        let r = run(&cfg);
        show("fec 10%, loss 5%", &r);
        assert_eq!(r.completed, 20, "{r:?}");
        assert_eq!(r.naks_at_server, 0, "{r:?}");
        assert!(r.loops_max <= 1.05, "{r:?}");
        assert!(r.channel_closed);
    }

    #[test]
    fn twenty_percent_loss_100_receivers_fec_against_none() {
        let mut cfg = SimConfig::new(100, 0.20, 41);
        cfg.data_packets = 8000;
        let without = run(&cfg);
        cfg.fec_overhead = 0.10;
        let with = run(&cfg);
        show("20% loss, no FEC ", &without);
        show("20% loss, FEC 10%", &with);
        assert_eq!(with.completed, 100);
        assert_eq!(without.completed, 100);
        let fewer = without.repairs_sent as f64 / with.repairs_sent.max(1) as f64;
        println!(
            "repairs sent: {} without FEC, {} with ({fewer:.1}x fewer)",
            without.repairs_sent, with.repairs_sent,
        );
        // Step 12: repairs fall at least 5x, and what reaches the server per loss (units
        // and symbols asked for) stays at most 2.
        assert!(fewer >= 5.0, "{with:?}");
        assert!(with.naks_per_loss <= 2.0, "{with:?}");
        // The repairs are answers to amounts: extra symbols, each new to every receiver.
        assert!(with.extras_sent * 10 >= with.repairs_sent * 9, "{with:?}");
        assert!(with.loops_max < without.loops_max, "{with:?}");
    }

    #[test]
    fn a_lossy_tier_gets_extra_symbols_unasked_and_needs_fewer_nak_rounds() {
        let mut cfg = SimConfig::new(50, 0.20, 43);
        cfg.data_packets = 8000;
        cfg.fec_overhead = 0.10;
        // A distant audience: every NAK round costs a round trip of 80 ms.
        cfg.one_way_delay = std::time::Duration::from_millis(40);
        let asked = run(&cfg);
        // 15 % more symbols per block sent after each block's repairs, made on demand.
        cfg.fec_extra = 0.15;
        let unasked = run(&cfg);
        show("20% loss, FEC 10%, answers only   ", &asked);
        show("20% loss, FEC 10% + 15% unasked   ", &unasked);
        assert_eq!(unasked.completed, 50);
        assert!(unasked.extras_sent > 0, "{unasked:?}");
        // 10 % + 15 % covers most blocks at 20 % loss: half the NAKs or fewer reach the
        // server, asking for a third of the symbols, and receivers are done sooner on the
        // whole (the last one waits for the part of its first block it joined too late for).
        assert!(
            unasked.naks_at_server * 2 < asked.naks_at_server.max(1),
            "{unasked:?}"
        );
        assert!(
            unasked.nak_symbols_at_server * 2 < asked.nak_symbols_at_server,
            "{unasked:?}"
        );
        assert!(unasked.loops_mean < asked.loops_mean, "{unasked:?}");
    }
}
