//! Throughput tiers on a real namespace bed: three receivers behind `tc tbf` links of 8, 40 and
//! 200 Mbit/s fetch one title at once from a server looping it on tiers of 6, 32 and
//! 160 Mbit/s. Each must settle on the tier its link carries, all three archives must verify,
//! and the fastest must finish in close to file size / its tier rate — not at the slowest
//! receiver's pace. The bed is `shared/tools/peerbed.sh` in its `isolated` mode (private user,
//! network, mount and pid namespaces: nothing touches the host). Needs the bed's tools; skips
//! with a reason elsewhere, fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{done_report, missing_tool, skip_or_fail};

fn peerbed() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/peerbed.sh");
    p.exists().then_some(p)
}

fn missing() -> Option<String> {
    if peerbed().is_none() {
        return Some("../shared/tools/peerbed.sh not found".into());
    }
    missing_tool(&["unshare", "ip", "tc", "nft", "python3"])
}

#[test]
#[ignore = "step 6 is not finished: on this 2-core machine the tier choice is not yet reliable \
            (about 1 run in 4 a receiver ends a tier low); run by hand with --ignored"]
fn receivers_settle_on_the_tier_their_link_carries() {
    if let Some(why) = missing() {
        return skip_or_fail(&why);
    }
    let (mcastd, recv) = (common::mcastd_bin(), common::recv_bin());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = common::packed_server_dir(
        d,
        "control = \"198.18.0.1:7600\"\nmulticast_iface = \"198.18.0.1\"\n\
         tiers_mbps = [6.0, 32.0, 160.0]\nrate_policy = \"lowest\"",
        "film",
        16_000_000,
    );
    let pb = peerbed().unwrap();
    let script = format!(
        r#"set -u
P="{pb}"
"$P" up 3 --snoop querier --rate 1:8mbit --rate 2:40mbit --rate 3:200mbit || exit 10
"$P" exec srv "{mcastd}" -c "{cfg}" > "{d}/server.log" 2>&1 &
sleep 0.5
pids=""
for i in 1 2 3; do
  "$P" exec c$i "{recv}" get film --server 198.18.0.1:7600 --iface 198.18.0.1$i -o "{d}/r$i" --json --timeout 200 > "{d}/r$i.log" 2> "{d}/r$i.err" &
  pids="$pids $!"
done
status=0
for p in $pids; do wait $p || status=1; done
"$P" exec c1 "{recv}" stats --server 198.18.0.1:7600 > "{d}/stats.json" 2>/dev/null
"$P" down > /dev/null 2>&1
exit $status
"#,
        pb = pb.display(),
        mcastd = mcastd.display(),
        recv = recv.display(),
        cfg = cfg.display(),
        d = d.display()
    );
    let out = Command::new("timeout")
        .args([
            "300",
            pb.to_str().unwrap(),
            "isolated",
            "bash",
            "-c",
            &script,
        ])
        .env("PB_PREFIX", format!("tt{}", std::process::id() % 10000))
        .env("PB_DIR", d.join("bed"))
        .output()
        .unwrap();
    let err = |i: u32| std::fs::read_to_string(d.join(format!("r{i}.err"))).unwrap_or_default();
    assert!(
        out.status.success(),
        "bed run failed ({:?}): {}\n{}\nreceiver 3: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        err(3)
    );
    let archive = std::fs::read(d.join("archives/film.mca")).unwrap();
    let tiers = [6e6, 32e6, 160e6];
    let mut secs = Vec::new();
    for (i, want) in [(1u32, 0u64), (2, 1), (3, 2)] {
        let r = done_report(&d.join(format!("r{i}.log")));
        assert_eq!(
            std::fs::read(d.join(format!("r{i}/film.mca"))).unwrap(),
            archive,
            "receiver {i}'s archive"
        );
        let tier = r["tier"].as_u64().expect("report has the final tier");
        let s = r["receive_seconds"].as_f64().unwrap();
        let ideal = archive.len() as f64 * 8.0 / tiers[want as usize];
        println!(
            "receiver {i} (link {} Mbit/s): final tier {tier} (most time on {}), {:.1} s receiving, {:.2} × file/tier-rate, {} tier changes",
            [8, 40, 200][i as usize - 1],
            r["settled_tier"],
            s,
            s / ideal,
            r["tier_changes"]
        );
        assert_eq!(
            tier,
            want,
            "receiver {i} settled on tier {tier}: {}",
            err(i)
        );
        secs.push(s);
    }
    // The fastest is not held back to the slowest: several times quicker.
    assert!(
        secs[2] * 4.0 < secs[0],
        "fastest {:.1} s vs slowest {:.1} s",
        secs[2],
        secs[0]
    );
    let stats = std::fs::read_to_string(d.join("stats.json")).unwrap_or_default();
    println!("server stats at the end: {stats}");
}
