//! Edge servers with real processes in network namespaces: an origin `mcastd` and two edge
//! `mcastd`s, each edge with an identity of its own, the origin's key in `origin_keys` and a
//! delegation the origin issued (`mcastd delegate`). Each edge starts with an empty archive
//! directory and is filled while it serves by `mcast-recv batch` from the origin (the edge
//! picks the archives up by rescanning its directory). Receivers on each edge's own segment
//! (a bridge of its own; the edge multicasts there) fetch from their edge with `--server-key
//! ORIGIN`: byte-identical to the origin's archive, every SYNC taken under the delegation
//! (`syncs_forged` 0, `syncs_delegated` > 0), on multicast. Then receivers that ask traffic
//! directors fetch again, the edge serving most of them is killed mid-transfer, and they
//! complete from the other edge (across the segments, by unicast). Last, the same edge
//! without its delegation: its receiver drops every SYNC (`syncs_forged`) and still
//! completes (the packets verify against the origin-signed head).
//!
//! ```text
//!  origin 198.18.0.1   director 198.18.0.4        (backbone bridge bb)
//!      edge1 198.18.0.2 | 198.18.1.1  --  seg1 bridge: r1 198.18.1.11, r1b 198.18.1.12
//!      edge2 198.18.0.3 | 198.18.2.1  --  seg2 bridge: r2 198.18.2.11, r2b 198.18.2.12
//! ```
//! The edges route between the segments and the backbone. Root only: skips with a reason
//! otherwise, fails under `CI=true`. `EDGE_KEEP=1` keeps the directory (logs, reports).

use std::path::Path;
use std::process::Command;

mod common;
use common::{done_report, missing_tool, skip_or_fail};

const MB: usize = 1_000_000;
const TITLES: [(&str, usize); 2] = [("film", 4 * MB), ("doc", 2 * MB)];

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn mcastd(cfg: &Path) -> Command {
    let mut c = Command::new(common::mcastd_bin());
    c.arg("--config").arg(cfg).env_remove("RUST_LOG");
    c
}

/// A server directory: config, identity; returns (config path, public key hex).
fn server_dir(d: &Path, name: &str, server_toml: &str) -> (std::path::PathBuf, String) {
    let root = d.join(name);
    std::fs::create_dir_all(root.join("archives")).unwrap();
    let cfg = root.join("mcastd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\narchive_dir = \"{0}/archives\"\nkey_dir = \"{0}/keys\"\n\
             [tickets]\ndb = \"{0}/tickets.sqlite\"\n[server]\n{server_toml}\n[log]\nlevel = \"info\"\n",
            root.display()
        ),
    )
    .unwrap();
    run_ok(mcastd(&cfg).arg("keygen"));
    let key = run_ok(mcastd(&cfg).arg("identity")).trim().to_string();
    assert_eq!(key.len(), 64, "identity prints the full key: {key}");
    (cfg, key)
}

fn bed_script(d: &str, mcastd: &str, recv: &str, director: &str) -> String {
    format!(
        r#"set -eu
mount -t tmpfs tmpfs /run
ip link set lo up
br() {{ ip link add "$1" type bridge stp_state 0 forward_delay 0 mcast_snooping 0; ip link set "$1" up; }}
br bb; br seg1; br seg2
port() {{ # NS IFACE BRIDGE ADDR
  ip netns list | grep -qw "$1" || {{ ip netns add "$1"; ip -n "$1" link set lo up; }}
  ip link add "$1-$2" type veth peer name "$2" netns "$1"
  ip link set "$1-$2" master "$3" up
  ip -n "$1" addr add "$4/24" dev "$2"
  ip -n "$1" link set "$2" up
  ip netns exec "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}}
port origin eth0 bb 198.18.0.1
port dir eth0 bb 198.18.0.4
port edge1 eth0 bb 198.18.0.2
port edge1 eth1 seg1 198.18.1.1
port edge2 eth0 bb 198.18.0.3
port edge2 eth1 seg2 198.18.2.1
for r in r1:seg1:198.18.1.11:198.18.1.1 r1b:seg1:198.18.1.12:198.18.1.1 \
         r2:seg2:198.18.2.11:198.18.2.1 r2b:seg2:198.18.2.12:198.18.2.1; do
  IFS=: read n b a gw <<EOF
$r
EOF
  port "$n" eth0 "$b" "$a"
  ip -n "$n" route add default via "$gw"
  ip -n "$n" route add 224.0.0.0/4 dev eth0
done
for e in edge1 edge2; do ip netns exec $e sysctl -qw net.ipv4.ip_forward=1; done
ip -n edge1 route add 198.18.2.0/24 via 198.18.0.3
ip -n edge2 route add 198.18.1.0/24 via 198.18.0.2
for n in origin dir; do
  ip -n $n route add 198.18.1.0/24 via 198.18.0.2
  ip -n $n route add 198.18.2.0/24 via 198.18.0.3
done
ip -n origin route add 224.0.0.0/4 dev eth0
for e in edge1 edge2; do ip -n $e route add 224.0.0.0/4 dev eth0; done

set +e
ip netns exec dir "{director}" --config "{d}/director.toml" > "{d}/director.log" 2>&1 &
dpid=$!
ip netns exec origin "{mcastd}" --config "{d}/origin/mcastd.toml" serve > "{d}/origin.log" 2>&1 &
opid=$!
ip netns exec edge1 "{mcastd}" --config "{d}/edge1/mcastd.toml" serve > "{d}/edge1.log" 2>&1 &
e1=$!
ip netns exec edge2 "{mcastd}" --config "{d}/edge2/mcastd.toml" serve > "{d}/edge2.log" 2>&1 &
e2=$!
sleep 0.7
# Pre-load both edges from the origin while they serve.
ms() {{ echo $(( ($(date +%s%N) - t0) / 1000000 )); }}
t0=$(date +%s%N)
ip netns exec edge1 "{recv}" batch --list "{d}/tonight.list" --server 198.18.0.1:7600 \
   --dir "{d}/edge1/archives" --server-key $(cat "{d}/origin.key") --report "{d}/batch1.json" \
   > /dev/null 2> "{d}/batch1.err" &
b1=$!
ip netns exec edge2 "{recv}" batch --list "{d}/tonight.list" --server 198.18.0.1:7600 \
   --dir "{d}/edge2/archives" --server-key $(cat "{d}/origin.key") --report "{d}/batch2.json" \
   > /dev/null 2> "{d}/batch2.err" &
b2=$!
wait $b1; echo $? > "{d}/batch1.rc"
wait $b2; echo $? > "{d}/batch2.rc"
echo "batch $(ms) ms" > "{d}/times.txt"
# The edges pick the titles up by rescan (every 300 ms), and say so in their heartbeats.
for k in $(seq 1 50); do
  n1=$(grep -c 'title added' "{d}/edge1.log"); n2=$(grep -c 'title added' "{d}/edge2.log")
  [ "$n1" -ge 2 ] && [ "$n2" -ge 2 ] && break
  sleep 0.1
done
sleep 0.6
ip netns exec dir "{recv}" stats --director 198.18.0.4:7650 --json > "{d}/director-before.json" 2>&1
gets=""
get() {{ # NAME NS ARGS...: mcast-recv get film in NS, JSON to NAME.log, exit code to NAME.rc
  name=$1; ns=$2; shift 2
  ( ip netns exec $ns "{recv}" get film --dir "{d}/$name" --json --timeout 50s \
      --server-key $(cat "{d}/origin.key") --known-servers "{d}/$name.known" "$@" \
      > "{d}/$name.log" 2> "{d}/$name.err"; echo $? > "{d}/$name.rc" ) &
  gets="$gets $!"
}}
# Phase 1: each segment's receiver from its own edge.
t0=$(date +%s%N)
get p1-r1 r1 --server 198.18.1.1:7600 --iface 198.18.1.11
get p1-r2 r2 --server 198.18.2.1:7600 --iface 198.18.2.11
for p in $gets; do wait $p; done
gets=""
echo "phase1 $(ms) ms" >> "{d}/times.txt"
# Phase 2: through the director; kill the edge serving most of them mid-transfer.
get p2-r1 r1 --director 198.18.0.4:7650 --silence-timeout 1500ms
get p2-r1b r1b --director 198.18.0.4:7650 --silence-timeout 1500ms
get p2-r2 r2 --director 198.18.0.4:7650 --silence-timeout 1500ms
get p2-r2b r2b --director 198.18.0.4:7650 --silence-timeout 1500ms
sleep 1.8
members() {{ ip netns exec dir "{recv}" stats --server $1 --json 2>/dev/null | python3 -c "
import json,sys
n=0
for l in sys.stdin:
    try: v=json.loads(l)
    except Exception: continue
    for c in v.get('channels',[]): n+=c.get('members',0)
print(n)"; }}
m1=$(members 198.18.1.1:7600); m2=$(members 198.18.2.1:7600)
if [ "${{m1:-0}}" -ge "${{m2:-0}}" ]; then victim=edge1; kill -9 $e1; else victim=edge2; kill -9 $e2; fi
echo "$victim $m1 $m2" > "{d}/victim.txt"
t0=$(date +%s%N)
for p in $gets; do wait $p; done
echo "after the kill $(ms) ms" >> "{d}/times.txt"
# An edge without a delegation (same identity and archives, another port and groups).
ip netns exec edge1 "{mcastd}" --config "{d}/nodeleg.toml" serve > "{d}/nodeleg.log" 2>&1 &
nd=$!
sleep 0.5
gets=""
get p3-r1 r1 --server 198.18.1.1:7601 --iface 198.18.1.11
for p in $gets; do wait $p; done
kill $nd
kill $opid $e1 $e2 $dpid 2>/dev/null
wait
for n in origin dir edge1 edge2 r1 r1b r2 r2b; do ip netns del $n; done
exit 0
"#
    )
}

#[test]
fn edges_preload_serve_with_delegated_syncs_and_fail_over() {
    if let Some(why) = missing_tool(&["unshare", "ip", "python3"]) {
        return skip_or_fail(&why);
    }
    if common::euid() != Some(0) {
        return skip_or_fail("the edge bed needs root (network namespaces, bridges)");
    }
    let (_tmp, dir) = common::test_dir("EDGE_KEEP");
    let d = dir.as_path();
    let director_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_mcast-director"));
    let key = d.join("heartbeat.key");
    run_ok(Command::new(&director_bin).args(["genkey", "-o"]).arg(&key));
    std::fs::write(
        d.join("director.toml"),
        format!(
            "[director]\nlisten = \"198.18.0.4:7650\"\nkey_file = '{}'\ndown_after = 3\n\
             max_skew_ms = 30000\nadmin = [\"198.18.0.0/16\"]\n",
            key.display()
        ),
    )
    .unwrap();

    // The origin: both titles packed; no directors (receivers are sent to the edges).
    let (origin_cfg, origin_key) = server_dir(
        d,
        "origin",
        "control = \"198.18.0.1:7600\"\nmulticast_iface = \"198.18.0.1\"\n\
         group_base = \"239.255.77.1\"\nrate_mbps = 40.0\ntiers_mbps = [40.0]\n\
         admin = [\"198.18.0.0/16\"]",
    );
    for (i, (title, len)) in TITLES.iter().enumerate() {
        let input = d.join(format!("{title}.bin"));
        std::fs::write(&input, common::random_bytes(*len, 0xed9e + i as u64)).unwrap();
        run_ok(mcastd(&origin_cfg).arg("pack").arg(&input).args([
            "--title",
            title,
            "--compress",
            "none",
        ]));
    }
    std::fs::write(d.join("origin.key"), &origin_key).unwrap();
    std::fs::write(
        d.join("tonight.list"),
        TITLES.map(|t| t.0).join("\n") + "\n",
    )
    .unwrap();

    // Two edges: own identity, the origin's key, a delegation from the origin, heartbeats to
    // the director, multicast on their own segment, rescans every 300 ms. Each edge has
    // groups of its own: a receiver the director sends to the other edge must not hear its
    // own segment's edge looping the same archive on the same group (that edge's SYNCs are
    // not signed by the server it joined: they would be dropped and counted as forged).
    let mut edge_keys = Vec::new();
    for (n, seg) in [(1, 1), (2, 2)] {
        let name = format!("edge{n}");
        let delegation = d.join(format!("{name}.delegation"));
        let (_, edge_key) = server_dir(
            d,
            &name,
            &format!(
                "control = \"198.18.{seg}.1:7600\"\nmulticast_iface = \"198.18.{seg}.1\"\n\
                 group_base = \"239.255.{}.1\"\nrate_mbps = 8.0\ntiers_mbps = [8.0]\n\
                 lease_ms = 3000\nadmin = [\"198.18.0.0/16\"]\n\
                 origin_keys = [\"{origin_key}\"]\ndelegations = [\"{}\"]\n\
                 archive_rescan_ms = 300\n\
                 [directors]\naddrs = [\"198.18.0.4:7650\"]\nheartbeat_ms = 200\nkey_file = '{}'",
                87 + seg,
                delegation.display(),
                key.display()
            ),
        );
        let out = run_ok(
            mcastd(&origin_cfg)
                .args(["delegate", "--edge-key", &edge_key, "--valid", "2d", "-o"])
                .arg(&delegation),
        );
        assert!(out.contains(&edge_key), "{out}");
        edge_keys.push(edge_key);
    }
    assert_ne!(edge_keys[0], edge_keys[1]);

    // The same edge identity and archives, without the delegation.
    std::fs::write(
        d.join("nodeleg.toml"),
        format!(
            "[store]\narchive_dir = \"{0}/edge1/archives\"\nkey_dir = \"{0}/edge1/keys\"\n\
             [tickets]\ndb = \"{0}/nodeleg.sqlite\"\n[server]\ncontrol = \"198.18.1.1:7601\"\n\
             multicast_iface = \"198.18.1.1\"\ngroup_base = \"239.255.90.1\"\nport_base = 7800\n\
             rate_mbps = 8.0\ntiers_mbps = [8.0]\norigin_keys = [\"{origin_key}\"]\n",
            d.display()
        ),
    )
    .unwrap();

    let script = bed_script(
        d.to_str().unwrap(),
        common::mcastd_bin().to_str().unwrap(),
        common::recv_bin().to_str().unwrap(),
        director_bin.to_str().unwrap(),
    );
    let t = std::time::Instant::now();
    if let Err(e) = common::run_bed_script(&script, 110) {
        panic!("{e}");
    }
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
    println!(
        "edge bed: {:.1} s in all; {}",
        t.elapsed().as_secs_f64(),
        read("times.txt").replace('\n', "; ")
    );

    // Pre-load: both batches complete; each edge added both titles while serving, and the
    // heartbeats told the director.
    for n in [1, 2] {
        assert_eq!(
            read(&format!("batch{n}.rc")).trim(),
            "0",
            "batch into edge{n}: {}\n{}",
            read(&format!("batch{n}.err")),
            read(&format!("batch{n}.json"))
        );
        let log = read(&format!("edge{n}.log"));
        for (title, _) in TITLES {
            assert!(
                log.lines()
                    .any(|l| l.contains("title added") && l.contains(&format!("title={title}"))),
                "edge{n} never added {title}:\n{log}"
            );
            assert_eq!(
                std::fs::read(d.join(format!("edge{n}/archives/{title}.mca"))).unwrap(),
                std::fs::read(d.join(format!("origin/archives/{title}.mca"))).unwrap(),
                "edge{n}'s pre-loaded {title} differs from the origin's"
            );
        }
        // `mcastd verify` on the edge checks the origin's archives against origin_keys.
        let out = run_ok(
            mcastd(&d.join(format!("edge{n}/mcastd.toml")))
                .arg("verify")
                .arg("film"),
        );
        assert!(out.contains("verified"), "{out}");
        assert!(
            log.contains("delegation loaded"),
            "edge{n} did not load its delegation:\n{log}"
        );
        // Edges play nothing of the origin's; nobody asked here, the log has no failure.
        assert!(!log.contains("ERROR"), "edge{n}:\n{log}");
    }
    let dir_stats = read("director-before.json");
    for seg in [1, 2] {
        let addr = format!("198.18.{seg}.1:7600");
        let entry = dir_stats
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .flat_map(|v| v["servers"].as_array().cloned().unwrap_or_default())
            .find(|e| e["server"] == addr.as_str())
            .unwrap_or_else(|| panic!("director does not know {addr}: {dir_stats}"));
        assert_eq!(
            entry["titles"].as_u64(),
            Some(TITLES.len() as u64),
            "heartbeats of {addr} do not list the added titles: {entry}"
        );
    }

    let reference = d.join("origin/archives/film.mca");
    let want = std::fs::read(&reference).unwrap();
    let check = |name: &str| -> serde_json::Value {
        assert_eq!(
            read(&format!("{name}.rc")).trim(),
            "0",
            "{name} failed: {}",
            read(&format!("{name}.err"))
        );
        assert!(
            std::fs::read(d.join(format!("{name}/film.mca"))).unwrap() == want,
            "{name}'s archive differs from the origin's"
        );
        done_report(&d.join(format!("{name}.log")))
    };
    // Phase 1: from their own edge, on multicast, every SYNC taken under the delegation.
    for name in ["p1-r1", "p1-r2"] {
        let r = check(name);
        println!(
            "{name}: {:.2} s, unicast {}, syncs_delegated {}, syncs_forged {}, servers {}",
            r["seconds"].as_f64().unwrap_or(0.0),
            r["unicast"],
            r["syncs_delegated"],
            r["syncs_forged"],
            r["servers"]
        );
        assert_eq!(r["syncs_forged"], 0, "{name}: {r}");
        assert!(r["syncs_delegated"].as_u64().unwrap() > 0, "{name}: {r}");
        assert_eq!(r["unicast"], false, "{name} left multicast: {r}");
    }

    // Phase 2: the victim's receivers switched to the other edge and completed.
    let victim = read("victim.txt").trim().to_string();
    let victim_edge = victim.split_whitespace().next().unwrap_or("").to_string();
    let victim_addr = if victim_edge == "edge1" {
        "198.18.1.1:7600"
    } else {
        "198.18.2.1:7600"
    };
    let mut switched = 0;
    for name in ["p2-r1", "p2-r1b", "p2-r2", "p2-r2b"] {
        let r = check(name);
        let servers: Vec<String> = r["servers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{name}: {:.2} s, servers {servers:?}, switches {}, unicast {}, syncs_delegated {}, syncs_forged {}",
            r["seconds"].as_f64().unwrap_or(0.0),
            r["switches"],
            r["unicast"],
            r["syncs_delegated"],
            r["syncs_forged"]
        );
        assert_eq!(r["syncs_forged"], 0, "{name}: {r}");
        if servers.first().map(String::as_str) == Some(victim_addr) {
            switched += 1;
            assert!(r["switches"].as_u64().unwrap_or(0) >= 1, "{name}: {r}");
            assert_ne!(servers.last().map(String::as_str), Some(victim_addr), "{r}");
        }
    }
    println!("killed {victim_edge} (members edge1 edge2: {victim}); {switched} receivers switched");
    assert!(switched >= 1, "nobody was on the killed edge: {victim}");

    // Without a delegation the edge warns at start; its receivers drop every SYNC (counted)
    // and still complete: every packet verifies against the origin-signed head.
    let log = read("nodeleg.log");
    assert!(
        log.contains("no delegation from this origin key"),
        "no warning:\n{log}"
    );
    let r = check("p3-r1");
    println!(
        "p3-r1 (edge without a delegation): {:.2} s, unicast {}, syncs_forged {}, syncs_delegated {}",
        r["seconds"].as_f64().unwrap_or(0.0),
        r["unicast"],
        r["syncs_forged"],
        r["syncs_delegated"]
    );
    assert!(r["syncs_forged"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["syncs_delegated"], 0, "{r}");
}
