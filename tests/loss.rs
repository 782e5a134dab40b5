//! Real sockets, real loss: NAK repair under nftables packet drop.
//!
//! Runs `mcastd` and three receivers inside a private network namespace whose input hook drops
//! 3% of the channel's multicast packets (shared by all three, as behind one lossy link).
//! Without repair every receiver would need a second loop for the lost packets; with NAK
//! repair they complete in clearly less than two loops. With FEC in the archive, 5% loss is
//! covered by the looped repair symbols: no NAK at all. Needs root (CI is root); elsewhere it
//! skips with a reason, and under `CI=true` a skip is a failure.

use std::process::Command;

mod common;
use common::{done_report, missing_tool, skip_or_fail};

/// Why this machine cannot run the namespace test, if it cannot.
fn cannot_run() -> Option<String> {
    if common::euid() != Some(0) {
        return Some("needs root (network namespace + nftables)".into());
    }
    missing_tool(&["unshare", "nft", "ip"])
}

/// What one lossy namespace run left: its directory, the receivers' done reports and the
/// server's stats counters.
struct LossyRun {
    dir: tempfile::TempDir,
    reports: Vec<serde_json::Value>,
    counters: serde_json::Value,
    rate_mbps: f64,
}

impl LossyRun {
    fn loop_secs(&self, r: &serde_json::Value) -> f64 {
        r["loop_bytes"].as_f64().unwrap() * (1304.0 / 1280.0) * 8.0 / (self.rate_mbps * 1e6)
    }
}

/// `mcastd` (channel on `group`:`port`, control on `control`) and three receivers in a
/// namespace that drops `per_mille`/1000 of the channel's packets; `pack` is extra `[pack]`
/// configuration. Asserts that the drop rule dropped and that every copy equals the archive.
fn lossy_run(control: u16, group: &str, port: u16, per_mille: u32, pack: &str) -> LossyRun {
    let (mcastd, recv) = (common::mcastd_bin(), common::recv_bin());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rate_mbps = 100.0;
    // 12 MB of incompressible "media": one loop is ~1 s at 100 Mbit/s. One channel (no tier
    // ladder): this is about repair, and a tier discovery's first half second on a slower
    // tier would count against the loops (tiers are tested in `tiers`, `mixed_bed`, `sim`).
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"127.0.0.1:{control}\"\ngroup_base = \"{group}\"\nport_base = {port}\nrate_mbps = {rate_mbps}\ntiers_mbps = [{rate_mbps}]\n[pack]\n{pack}"
        ),
        "film",
        12_000_000,
    );
    let script = format!(
        r#"set -e
ip link set lo up
nft add table ip lossy
nft add chain ip lossy in '{{ type filter hook input priority 0; }}'
nft add rule ip lossy in ip daddr {group} udp dport {port} numgen random mod 1000 '<' {per_mille} counter drop
"{mcastd}" --config "{cfg}" > "{d}/server.log" 2>&1 &
server=$!
sleep 0.5
pids=""
for i in 1 2 3; do
  "{recv}" get film --server 127.0.0.1:{control} -o "{d}/r$i" --json --timeout 60 > "{d}/r$i.log" 2> "{d}/r$i.err" &
  pids="$pids $!"
done
status=0
for p in $pids; do wait $p || status=1; done
"{recv}" stats --server 127.0.0.1:{control} > "{d}/stats.json" || true
nft list chain ip lossy in > "{d}/nft.txt"
kill $server
exit $status
"#,
        mcastd = mcastd.display(),
        recv = recv.display(),
        cfg = cfg.display(),
        d = d.display()
    );
    let out = Command::new("timeout")
        .args(["120", "unshare", "--net", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = |i: u32| std::fs::read_to_string(d.join(format!("r{i}.err"))).unwrap_or_default();
    assert!(
        out.status.success(),
        "namespace run failed: {}\n{}\nreceiver 1: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        err(1)
    );
    let nft = std::fs::read_to_string(d.join("nft.txt")).unwrap();
    println!(
        "nft: {}",
        nft.lines()
            .find(|l| l.contains("drop"))
            .unwrap_or("")
            .trim()
    );
    assert!(
        !nft.contains("packets 0 "),
        "the drop rule dropped nothing: {nft}\nreceiver 1: {}",
        err(1)
    );
    let archive = std::fs::read(d.join("archives/film.mca")).unwrap();
    let mut reports = Vec::new();
    for i in 1..=3 {
        assert_eq!(
            std::fs::read(d.join(format!("r{i}/film.mca"))).unwrap(),
            archive,
            "receiver {i}"
        );
        reports.push(done_report(&d.join(format!("r{i}.log"))));
    }
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("stats.json")).unwrap()).unwrap();
    let counters = stats["counters"].clone();
    println!(
        "server: NAKs {} for {} units, repairs sent {}, coalesced {}, rate-limited {}",
        counters["naks_received"],
        counters["nak_units_received"],
        counters["repairs_sent"],
        counters["nak_units_coalesced"],
        counters["naks_rate_limited"]
    );
    LossyRun {
        dir,
        reports,
        counters,
        rate_mbps,
    }
}

#[test]
fn receivers_under_3_percent_loss_finish_well_before_two_loops() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    let run = lossy_run(7650, "239.255.90.1", 7750, 30, "fec_overhead = 0");
    for (i, r) in run.reports.iter().enumerate() {
        let loops = r["receive_seconds"].as_f64().unwrap() / run.loop_secs(r);
        println!(
            "receiver {}: {:.2} s receiving = {loops:.2} loops (loop {:.2} s), NAKs sent {}, units NAKed {}, suppressed {}, repairs received {}",
            i + 1,
            r["receive_seconds"].as_f64().unwrap(),
            run.loop_secs(r),
            r["naks_sent"],
            r["units_naked"],
            r["units_suppressed"],
            r["repairs_received"]
        );
        assert!(
            r["repairs_received"].as_u64().unwrap() > 0,
            "no repairs reached receiver {}",
            i + 1
        );
        assert!(
            loops < 1.7,
            "receiver {} took {loops:.2} loops: repairs did not beat the loop",
            i + 1
        );
    }
    assert!(run.counters["repairs_sent"].as_u64().unwrap() > 0);
    drop(run.dir);
}

#[test]
fn fec_covers_5_percent_loss_in_one_loop_without_a_nak() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    let run = lossy_run(7651, "239.255.91.1", 7760, 50, "fec_overhead = 0.1");
    let mut naked = 0;
    for (i, r) in run.reports.iter().enumerate() {
        let loops = r["receive_seconds"].as_f64().unwrap() / run.loop_secs(r);
        println!(
            "receiver {}: {:.2} s receiving = {loops:.2} loops, FEC decodes {}, packets restored {}, NAKs sent {} ({} units)",
            i + 1,
            r["receive_seconds"].as_f64().unwrap(),
            r["fec_decodes"],
            r["fec_restored"],
            r["naks_sent"],
            r["units_naked"]
        );
        assert!(
            r["fec_restored"].as_u64().unwrap() > 0,
            "receiver {}",
            i + 1
        );
        assert!(loops < 1.3, "receiver {} took {loops:.2} loops", i + 1);
        naked += r["units_naked"].as_u64().unwrap();
    }
    // The drops come in GSO bursts of up to ~6 datagrams, so a block can now and then lose
    // more than its repair symbols (or a receiver join a little after the loop's start and
    // ask for the part of its first block it missed); without FEC the same run NAKs and
    // repairs every lost packet (the test above: hundreds of units).
    let loop_units = run.reports[0]["loop_units"].as_u64().unwrap();
    assert!(naked <= loop_units / 100, "{naked} units NAKed");
    assert!(
        run.counters["repairs_sent"].as_u64().unwrap() <= loop_units / 100,
        "{}",
        run.counters
    );
}

#[test]
fn fec_amount_naks_repair_20_percent_loss_with_extra_symbols_made_on_demand() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    // 20 % loss against 10 % overhead: every block is short after its pass. Receivers ask
    // for amounts, and mcastd answers with extra symbols it encodes from the archive's data;
    // the receivers verify them against the signed manifest, decode, and end with archives
    // byte-identical to the server's (checked in `lossy_run`).
    let run = lossy_run(7652, "239.255.92.1", 7770, 200, "fec_overhead = 0.1");
    let c = &run.counters;
    for (i, r) in run.reports.iter().enumerate() {
        println!(
            "receiver {}: {:.2} loops, FEC decodes {}, amounts asked {} ({} symbols, {} suppressed), extras kept {}, units NAKed {}",
            i + 1,
            r["receive_seconds"].as_f64().unwrap() / run.loop_secs(r),
            r["fec_decodes"],
            r["amounts_naked"],
            r["symbols_naked"],
            r["amounts_suppressed"],
            r["fec_extras_kept"],
            r["units_naked"],
        );
        assert!(
            r["fec_extras_kept"].as_u64().unwrap() > 0,
            "receiver {}",
            i + 1
        );
    }
    println!(
        "server: symbols asked {} (coalesced {}), extra symbols sent {} of {} repairs",
        c["nak_symbols_received"], c["nak_symbols_coalesced"], c["extras_sent"], c["repairs_sent"]
    );
    let asked: u64 = run
        .reports
        .iter()
        .map(|r| r["amounts_naked"].as_u64().unwrap())
        .sum();
    assert!(asked > 0);
    assert!(c["extras_sent"].as_u64().unwrap() > 0, "{c}");
    // Amounts, not packets: most repairs are extra symbols.
    assert!(
        c["extras_sent"].as_u64().unwrap() * 2 >= c["repairs_sent"].as_u64().unwrap(),
        "{c}"
    );
}
