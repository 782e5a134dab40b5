//! A receiver short of CPU (step 11, item 3): `mcastd` at 4000 Mbit/s with the adaptive
//! default ladder and `mcast-recv` with a small receive buffer, both pinned to one core
//! (`taskset -c 0`) on the loopback of a private network namespace. The receiver cannot keep
//! up with the top tier: its socket overflows, it reads the drops (`SO_RXQ_OVFL`) and moves
//! down instead of living on repairs.
//!
//! Asserts behaviour (an identical archive, overruns seen and counted, a move off the top
//! tier); the speed and the bytes received per archive byte are printed, not asserted.
//! Needs a network namespace (root, or unprivileged user namespaces); skipped without one,
//! except under `CI=true`, where that is a failure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The server and the receiver inside the namespace, both on core 0.
const NS_CPU_STARVED: &str = r#"
ip link set lo up || exit 90
ip link set lo multicast on || exit 90
ip route add 224.0.0.0/4 dev lo || exit 90
taskset -c 0 "$MCASTD" --config "$CFG" serve 2>"$SRVLOG" &
srv=$!
trap 'kill -9 $srv 2>/dev/null' EXIT
i=0
until "$RECV" stats --server "$SERVER" >/dev/null 2>&1; do
  i=$((i+1)); [ $i -ge 50 ] && exit 92
  sleep 0.1
done
taskset -c 0 "$RECV" get "$TITLE" --server "$SERVER" -o "$OUT" --json --timeout 50 \
  --recv-buffer "$RCVBUF"
"#;

#[test]
fn a_receiver_short_of_cpu_moves_down_a_tier() {
    let test = "a_receiver_short_of_cpu_moves_down_a_tier";
    let Some(prefix) = namespace_or_skip(test, "--net", &["ip", "taskset"]) else {
        return;
    };
    // 4000 Mbit/s and no tiers configured: the server derives the 4-tier default ladder.
    let site = Site::new(97, "rate_mbps = 4000.0\nlease_ms = 3000");
    let archive = site.pack("film", 256 << 20, 97);
    let out = site.out_dir("out");
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .args(["sh", "-c", NS_CPU_STARVED])
        .env("MCASTD", mcastd_bin())
        .env("RECV", recv_bin())
        .env("CFG", &site.cfg)
        .env("SERVER", site.control.to_string())
        .env("TITLE", "film")
        .env("OUT", &out)
        .env("SRVLOG", site.path("mcastd.log"))
        // 256 KiB: a fraction of a millisecond at the top tier's rate.
        .env("RCVBUF", (256 << 10).to_string());
    let f = Receiver::spawn(cmd, &out, "film", true).wait(Duration::from_secs(60));
    if f.code != Some(0) {
        panic!(
            "receiver failed: {f:#?}\nmcastd:\n{}",
            std::fs::read_to_string(site.path("mcastd.log")).unwrap_or_default()
        );
    }
    let r = f.assert_complete(&archive);
    let top = mcast::channel::LADDER_TIERS - 1;
    println!(
        "one core, 4000 Mbit/s ladder: {:.2} s ({:.0} MB/s), received/archive {:.3}, socket drops {}, \
         repairs {}, duplicates {}, final tier {} settled {} of 0..={top}, {} tier changes",
        r.seconds,
        r.archive_bytes as f64 / 1e6 / r.seconds,
        r.received_bytes as f64 / r.archive_bytes as f64,
        r.socket_drops,
        r.repairs_received,
        r.duplicates,
        r.tier,
        r.settled_tier,
        r.tier_changes
    );
    assert!(
        r.socket_drops > 0,
        "the receiver never saw its socket overrun (SO_RXQ_OVFL): {r:?}"
    );
    // It moved off a tier it could not keep up with — or, overrunning already on the lowest
    // tier it starts on, never climbed (there is nowhere lower to go).
    assert!(
        r.tier_changes >= 1 || r.settled_tier == 0,
        "it never changed tier: {r:?}"
    );
    assert!(
        r.settled_tier < top,
        "it spent most of its time on the top tier it cannot keep up with: {r:?}"
    );
}
