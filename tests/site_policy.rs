//! A site's policy for receivers without multicast, end to end: in a private network namespace
//! where nftables drops every multicast packet, a director whose site says `http` (or `both`)
//! with the server's own `archive_http_listen` as the site's mirror, and `mcast-recv get
//! --director`. With `http` the receiver never asks for the unicast stream: it fetches the
//! archive over HTTP; with `both` the stream runs `--repair-after`, then HTTP fetches only what
//! it has not delivered. Root (or user namespaces) and nftables; skipped with the reason
//! outside CI, a failure under `CI=true`.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use serde_json::Value;

const MB: usize = 1 << 20;

/// Runs inside the namespace: multicast dropped, a director, a server with heartbeats and its
/// archive directory over HTTP, then one `get --director`.
const NS_POLICY: &str = r#"
ip link set lo up || exit 90
nft add table ip t || exit 91
nft add chain ip t o '{ type filter hook output priority 0; }' || exit 91
nft add rule ip t o ip daddr 239.0.0.0/8 drop || exit 91
"$DIRECTOR" --config "$DCFG" 2>"$DIR/director.log" &
d=$!
"$MCASTD" --config "$CFG" serve 2>"$DIR/mcastd.log" &
srv=$!
trap 'kill -9 $srv $d 2>/dev/null' EXIT
i=0
until "$RECV" stats --director 127.0.0.1:19950 --json 2>/dev/null | grep -q '"up":true'; do
  i=$((i+1)); [ $i -ge 100 ] && exit 92
  sleep 0.1
done
"$RECV" get film --director 127.0.0.1:19950 --dir "$DIR/out" --json --timeout 60s \
  --sync-timeout 800ms --repair-after 2s --known-servers none --log info \
  >"$DIR/get.json" 2>"$DIR/get.log"
rc=$?
"$RECV" stats --server 127.0.0.1:19951 --json >"$DIR/stats.json" 2>/dev/null
exit $rc
"#;

fn run(policy: &str) -> Option<(Value, Value, String)> {
    let test = format!("site_policy_{policy}");
    let prefix = namespace_or_skip(&test, "--net", &["nft", "ip"])?;
    let tmp = tempfile::Builder::new()
        .prefix("mcast-site-policy-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let key = heartbeat_key(dir);
    // 6 Mbit/s: the stream cannot deliver 4 MB within --repair-after (2 s).
    let server = format!(
        "control = \"127.0.0.1:19951\"\nmulticast_iface = \"127.0.0.1\"\n\
         group_base = \"239.255.60.1\"\nport_base = 46900\nchannels = 16\nttl = 1\n\
         rate_mbps = 6.0\ntiers_mbps = [6.0]\nlease_ms = 3000\n\
         archive_http_listen = \"127.0.0.1:19952\"\n\
         [directors]\naddrs = [\"127.0.0.1:19950\"]\nheartbeat_ms = 200\nkey_file = '{}'\n\
         capacity_mbps = 10000.0\n",
        key.display()
    );
    let root = dir.join("server");
    fs::create_dir_all(&root).unwrap();
    let cfg = packed_server_dir(&root, &server, "film", 4 * MB);
    let archive = root.join("archives/film.mca");
    let dcfg = dir.join("director.toml");
    fs::write(
        &dcfg,
        format!(
            "[director]\nlisten = \"127.0.0.1:19950\"\nkey_file = '{}'\n\
             [[director.sites]]\nname = \"here\"\nprefixes = [\"127.0.0.0/8\"]\n\
             no_multicast = \"{policy}\"\nhttp = [\"http://127.0.0.1:19952/archives/\"]\n\
             [[director.servers]]\naddr = \"127.0.0.1:19951\"\nsite = \"here\"\n",
            key.display()
        ),
    )
    .unwrap();
    let status = Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(["sh", "-c", NS_POLICY])
        .env_remove("RUST_LOG")
        .env("DIRECTOR", director_bin())
        .env("MCASTD", mcastd_bin())
        .env("RECV", recv_bin())
        .env("CFG", &cfg)
        .env("DCFG", &dcfg)
        .env("DIR", dir)
        .status()
        .unwrap();
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(
        status.success(),
        "{test}: {status:?}\nget:\n{}\n{}\nmcastd:\n{}\ndirector:\n{}",
        read("get.json"),
        read("get.log"),
        read("mcastd.log"),
        read("director.log")
    );
    assert_identical(&dir.join("out/film.mca"), &archive);
    let report = done_report(&dir.join("get.json"));
    let stats: Value = serde_json::from_str(&read("stats.json")).expect("server stats");
    Some((report, stats, read("get.log")))
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Policy `http`: no multicast arrives, and the receiver goes to the site's mirror instead
/// of asking the server for a unicast stream.
#[test]
fn site_policy_http_fetches_over_http_instead_of_the_stream() {
    let Some((report, stats, log)) = run("http") else {
        return;
    };
    println!(
        "policy http: {report}\nserver counters: {}",
        stats["counters"]
    );
    assert!(log.contains("no_multicast=http"), "{log}");
    assert!(num(&report, "http_bytes") > 0, "{report}");
    assert_eq!(counter(&stats, "unicast_started"), 0, "{stats}");
    // Everything was missing when HTTP took over; it fetched that and little more.
    let missing = num(&report, "missing_bytes_at_http_start");
    assert!(missing > 3 * MB as u64, "{report}");
    assert!(
        num(&report, "http_bytes") as f64 <= 1.05 * missing as f64 + 65_536.0,
        "{report}"
    );
}

/// Policy `both`: the unicast stream runs `--repair-after`, then HTTP fetches only what it has
/// not delivered.
#[test]
fn site_policy_both_gives_the_stream_a_loop_then_http() {
    let Some((report, stats, log)) = run("both") else {
        return;
    };
    println!(
        "policy both: {report}\nserver counters: {}",
        stats["counters"]
    );
    assert!(log.contains("no_multicast=both"), "{log}");
    assert_eq!(counter(&stats, "unicast_started"), 1, "{stats}");
    let missing = num(&report, "missing_bytes_at_http_start");
    let http = num(&report, "http_bytes");
    assert!(
        num(&report, "received_bytes") > 0,
        "stream delivered nothing: {report}"
    );
    assert!(missing > 0 && missing < 4 * MB as u64, "{report}");
    assert!(http as f64 <= 1.05 * missing as f64 + 65_536.0, "{report}");
}
