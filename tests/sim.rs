//! Protocol tests on the deterministic simulation harness (`mcast::sim`): the real channel
//! manager and NAK engines, seeded loss, late joins, crashes.

use std::time::Duration;

use mcast::sim::{run, SimConfig};

fn show(name: &str, r: &mcast::sim::SimReport) {
    println!(
        "{name}: {}/{} complete, loops mean {:.2} max {:.2}, loss events {}, NAK units at server {} ({:.2}/loss), repairs {} (dup {}), wire/file {:.3}",
        r.completed, r.receivers, r.loops_mean, r.loops_max, r.loss_events, r.nak_units_at_server,
        r.naks_per_loss, r.repairs_sent, r.duplicate_repairs, r.wire_per_file_byte
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
