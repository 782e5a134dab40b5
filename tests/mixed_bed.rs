//! The mixed audience on a real namespace bed, once under an IGMPv3 and once under an IGMPv2
//! querier: a clean receiver, one with 5 % random loss, one behind a 200 Mbit/s `tc tbf`
//! link and a clean one that starts 2 s late fetch one title from one server, each leaving
//! its group when done. Every archive must be byte-identical to the server's and no receiver
//! may go long without progress while its channel is live: under IGMPv2 snooping a member's
//! leave can cut the group off from the others until the next general query (31 s) unless
//! they report again — the receiver re-joins a channel that has been silent for 1 s.
//!
//! The bed (`common::bridge_bed_prelude`) is built inside a private network and mount
//! namespace (`unshare`, root): a bridge with IGMP snooping and its own querier, one
//! namespace per host on a veth port, a token bucket or an nftables `numgen random` drop on
//! a receiver's port. Skips with a reason where that cannot be done; fails under `CI=true`.
//!
//! Asserted: what does not depend on the machine's speed, and a stall bound (10 s) far above
//! any this bed shows when it works (under 1 s); printed: seconds, bytes received per archive
//! byte, tiers, tier changes, silent re-joins and the longest stall (from the `--json`
//! progress lines, stamped on arrival: they come every 250 ms). The title is 48 MB so that
//! on a 2-core host the late joiner is on the group when the others leave (they finish after
//! ~2.5 s). `MIXED_BED_FILE_MB` (default 48), `MIXED_BED_RATE_MBPS` (default 900) and
//! `MIXED_BED_TIERS` (e.g. "40,180,900"; default: the server's default) change the run;
//! `MIXED_BED_KEEP=1` keeps its directory.

use std::sync::Mutex;

mod common;
use common::{done_report, longest_progress_stall, missing_tool, skip_or_fail, BedPort};

/// The audience: name, port shaping, start delay (s).
const AUDIENCE: [(&str, BedPort, u32); 4] = [
    (
        "clean",
        BedPort {
            rate_mbit: 0,
            loss_pct: 0,
        },
        0,
    ),
    (
        "5 % random loss",
        BedPort {
            rate_mbit: 0,
            loss_pct: 5,
        },
        0,
    ),
    (
        "200 Mbit/s link",
        BedPort {
            rate_mbit: 200,
            loss_pct: 0,
        },
        0,
    ),
    (
        "clean, 2 s late",
        BedPort {
            rate_mbit: 0,
            loss_pct: 0,
        },
        2,
    ),
];

/// Longest time a receiver may go without a new unit while its channel is live (s). The
/// IGMPv2 failure this catches lasts ~31 s (the querier's general query interval).
const MAX_STALL_S: f64 = 10.0;

/// The two runs share the machine's two cores: one at a time.
static ONE_BED: Mutex<()> = Mutex::new(());

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bed and the run, as one shell script for `unshare --net --mount`.
fn bed_script(igmp: u8, mcastd: &str, recv: &str, cfg: &str, d: &str) -> String {
    let ports: Vec<BedPort> = AUDIENCE.iter().map(|a| a.1).collect();
    let mut s = common::bridge_bed_prelude(igmp, &ports, d);
    s += &format!(
        r#"set +e
ip netns exec srv "{mcastd}" -c "{cfg}" > "{d}/server.log" 2>&1 &
srv=$!
sleep 0.5
pids=""
start() {{ # I: mcast-recv in cI, its --json lines stamped with their arrival time
  ( ip netns exec c$1 "{recv}" get film --server 198.18.0.1:7600 --iface 198.18.0.1$1 \
      -o "{d}/r$1" --json --timeout 60 2> "{d}/r$1.err"; echo $? > "{d}/r$1.rc" ) \
    | python3 -u "{d}/stamp.py" > "{d}/r$1.log" &
  pids="$pids $!"
}}
"#
    );
    let mut at = 0;
    let mut order: Vec<(usize, u32)> = AUDIENCE.iter().map(|a| a.2).enumerate().collect();
    order.sort_by_key(|&(_, delay)| delay);
    for (i, delay) in order {
        if delay > at {
            s += &format!("sleep {}\n", delay - at);
            at = delay;
        }
        s += &format!("start {}\n", i + 1);
    }
    s += &format!(
        r#"for p in $pids; do wait $p; done
ip netns exec c1 "{recv}" stats --server 198.18.0.1:7600 > "{d}/stats.json" 2>/dev/null
bridge mdb show > "{d}/mdb.txt" 2>&1
nft list table bridge bed > "{d}/nft.txt" 2>&1
kill $srv; wait $srv
for i in $(seq {n}); do tc -s qdisc show dev c$i | grep -o 'dropped [0-9]*' | head -1 > "{d}/tbf$i.txt"; done
for i in $(seq {n}); do ip netns del c$i; done; ip netns del srv
exit 0
"#,
        n = AUDIENCE.len()
    );
    s
}

fn mixed_audience(igmp: u8) {
    if let Some(why) = missing_tool(&["unshare", "ip", "tc", "nft", "bridge", "python3"]) {
        return skip_or_fail(&why);
    }
    if common::euid() != Some(0) {
        return skip_or_fail(
            "the mixed bed needs root (network namespaces, tc, nftables, a bridge)",
        );
    }
    let _one = ONE_BED.lock().unwrap_or_else(|e| e.into_inner());
    let (mcastd, recv) = (common::mcastd_bin(), common::recv_bin());
    let (_tmp, dir) = common::test_dir("MIXED_BED_KEEP");
    let d = dir.as_path();
    let tiers = std::env::var("MIXED_BED_TIERS").unwrap_or_default();
    let tiers = if tiers.trim().is_empty() {
        String::new()
    } else {
        format!("\ntiers_mbps = [{tiers}]")
    };
    let rate: f64 = env_or("MIXED_BED_RATE_MBPS", 900.0);
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"198.18.0.1:7600\"\nmulticast_iface = \"198.18.0.1\"\n\
             admin = [\"198.18.0.0/24\"]\nrate_mbps = {rate:.1}{tiers}"
        ),
        "film",
        env_or("MIXED_BED_FILE_MB", 48usize) * 1_000_000,
    );
    std::fs::write(d.join("stamp.py"), common::STAMP_LINES_PY).unwrap();
    let script = bed_script(
        igmp,
        mcastd.to_str().unwrap(),
        recv.to_str().unwrap(),
        cfg.to_str().unwrap(),
        d.to_str().unwrap(),
    );
    if let Err(e) = common::run_bed_script(&script, 120) {
        panic!("IGMPv{igmp}: {e}");
    }
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
    println!(
        "IGMPv{igmp} querier, {}; {:.1} Mbit/s, tiers: {}",
        read("bridge-ready.txt").trim(),
        rate,
        if tiers.is_empty() {
            "server default"
        } else {
            tiers.trim()
        }
    );
    let archive = std::fs::read(d.join("archives/film.mca")).unwrap();
    let mut stalls = Vec::new();
    for (i, (name, _, delay)) in AUDIENCE.iter().enumerate() {
        let n = i + 1;
        let rc = read(&format!("r{n}.rc"));
        assert_eq!(
            rc.trim(),
            "0",
            "IGMPv{igmp}: receiver {n} ({name}) failed: {}",
            read(&format!("r{n}.err"))
        );
        let r = done_report(&d.join(format!("r{n}.log")));
        assert!(
            std::fs::read(d.join(format!("r{n}/film.mca"))).unwrap() == archive,
            "IGMPv{igmp}: receiver {n}'s archive differs from the server's"
        );
        let stall = longest_progress_stall(&read(&format!("r{n}.log")))
            .expect("progress lines with units held");
        println!(
            "IGMPv{igmp} c{n} {name:<16} (starts at {delay} s): {:.2} s, {:.2} received / \
             archive ({} B), tier {} (settled {}), {} tier changes, {} silent re-joins, \
             unicast {}, longest stall {stall:.2} s; tbf {}",
            r["seconds"].as_f64().unwrap(),
            r["received_bytes"].as_f64().unwrap() / archive.len() as f64,
            archive.len(),
            r["tier"],
            r["settled_tier"],
            r["tier_changes"],
            r["silent_rejoins"],
            r["unicast"],
            read(&format!("tbf{n}.txt")).trim(),
        );
        stalls.push((n, stall));
    }
    println!(
        "IGMPv{igmp} loss rule: {}",
        read("nft.txt")
            .lines()
            .find(|l| l.contains("numgen"))
            .unwrap_or("")
            .trim()
    );
    for (n, stall) in stalls {
        assert!(
            stall < MAX_STALL_S,
            "IGMPv{igmp}: receiver {n} went {stall:.1} s without progress (bridge groups:\n{})",
            read("mdb.txt")
        );
    }
}

#[test]
fn mixed_audience_under_an_igmpv3_querier() {
    mixed_audience(3);
}

#[test]
fn mixed_audience_under_an_igmpv2_querier() {
    mixed_audience(2);
}
