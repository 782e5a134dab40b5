//! Real networks (issue 21): IPv6, source-specific multicast, what the packets carry on the
//! wire, and the serve flags.
//!
//! Each network test runs `mcastd` and `mcast-recv` inside a private network namespace whose
//! nftables hooks drop and count packets: DSCP / traffic class on every packet sent, a second
//! sender on a source-specific group (232/8, ff35::) never received, a full delivery over
//! IPv6 multicast (ff15::) with loss repaired, the unicast fallback over IPv6. Needs root (CI
//! is root); elsewhere it skips with a reason, and under `CI=true` a skip is a failure.

use std::process::Command;

mod common;
use common::{done_report, missing_tool, skip_or_fail};

fn cannot_run() -> Option<String> {
    if common::euid() != Some(0) {
        return Some("needs root (network namespace + nftables)".into());
    }
    missing_tool(&["unshare", "nft", "ip"])
}

/// Run `script` in a private network namespace (two minutes at most), with `$MCASTD`, `$RECV`,
/// `$CFG` (the server config) and `$D` (the test directory) set; it leaves the server's log in
/// `$D/server.log` and one receiver's in `$D/r.{log,err}`, its copy in `$D/r/film.mca`.
/// Asserts the run succeeded and the copy equals the archive.
fn run_in_namespace(script: &str, d: &std::path::Path, cfg: &std::path::Path) {
    let out = Command::new("timeout")
        .args(["120", "unshare", "--net", "sh", "-c", script])
        .env("MCASTD", common::mcastd_bin())
        .env("RECV", common::recv_bin())
        .env("CFG", cfg)
        .env("D", d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "namespace run failed: {}\n{}\nreceiver: {}\nserver: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(d.join("r.err")).unwrap_or_default(),
        std::fs::read_to_string(d.join("server.log")).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read(d.join("r/film.mca")).unwrap(),
        std::fs::read(d.join("archives/film.mca")).unwrap(),
        "the receiver's copy differs from the archive"
    );
}

/// `packets N` of the nft rule whose text contains `rule`.
fn packets(nft: &str, rule: &str) -> u64 {
    let line = nft
        .lines()
        .find(|l| l.contains(rule))
        .unwrap_or_else(|| panic!("no rule {rule:?} in\n{nft}"));
    let after = line.split("packets ").nth(1).expect("a counter");
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// DSCP on the wire; interfaces given by name (server `multicast_iface = "lo"`, receiver
/// `--iface lo`).
#[test]
fn dscp_is_on_every_packet_sent() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (control, group, port) = (7660, "239.255.91.1", 7760);
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"127.0.0.1:{control}\"\ngroup_base = \"{group}\"\nport_base = {port}\n\
             rate_mbps = 50.0\ntiers_mbps = [50.0]\ndscp = \"AF41\"\n\
             multicast_iface = \"lo\""
        ),
        "film",
        2_000_000,
    );
    // Counted on the way out: data to the group's port, the receiver's NAKs to the group (the
    // second payload byte is the NAK kind, 0x80; a data packet's is 0..=2), replies from the
    // control port, and the receiver's requests and NAKs to it (AF41 = 34, AF11 = 10). 3 % of
    // the data is dropped on the way in, so there are NAKs.
    let script = format!(
        r#"set -e
ip link set lo up
nft add table ip q
nft add chain ip q out '{{ type filter hook output priority 0; }}'
nft add rule ip q out udp dport {port} @th,72,8 != 0x80 ip dscp af41 counter
nft add rule ip q out udp dport {port} @th,72,8 != 0x80 ip dscp != af41 counter
nft add rule ip q out udp dport {port} @th,72,8 0x80 ip dscp af11 counter
nft add rule ip q out udp dport {port} @th,72,8 0x80 ip dscp != af11 counter
nft add chain ip q in '{{ type filter hook input priority 0; }}'
nft add rule ip q in udp dport {port} numgen random mod 100 '<' 3 drop
nft add rule ip q out udp sport {control} ip dscp af41 counter
nft add rule ip q out udp sport {control} ip dscp != af41 counter
nft add rule ip q out udp dport {control} ip dscp af11 counter
nft add rule ip q out udp dport {control} ip dscp != af11 counter
"$MCASTD" --config "$CFG" > "$D/server.log" 2>&1 &
server=$!
sleep 0.5
"$RECV" get film --server 127.0.0.1:{control} -o "$D/r" --json --timeout 60 --dscp AF11 --iface lo \
  > "$D/r.log" 2> "$D/r.err"
nft list chain ip q out > "$D/nft.txt"
kill $server
"#,
    );
    run_in_namespace(&script, d, &cfg);
    let r = done_report(&d.join("r.log"));
    let nft = std::fs::read_to_string(d.join("nft.txt")).unwrap();
    let data = (
        packets(&nft, "!= 0x80 ip dscp af41"),
        packets(&nft, "!= 0x80 ip dscp != af41"),
    );
    let group_naks = (
        packets(&nft, "0x80 ip dscp af11"),
        packets(&nft, "0x80 ip dscp != af11"),
    );
    let replies = (
        packets(&nft, &format!("sport {control} ip dscp af41")),
        packets(&nft, &format!("sport {control} ip dscp != af41")),
    );
    let requests = (
        packets(&nft, &format!("dport {control} ip dscp af11")),
        packets(&nft, &format!("dport {control} ip dscp != af11")),
    );
    println!(
        "DSCP on the wire: data AF41 {} / other {}; NAKs to the group AF11 {} / other {}; \
         server replies AF41 {} / other {}; receiver requests and NAKs AF11 {} / other {}; \
         receiver naks_sent {}; download {:.2} s",
        data.0,
        data.1,
        group_naks.0,
        group_naks.1,
        replies.0,
        replies.1,
        requests.0,
        requests.1,
        r["naks_sent"],
        r["seconds"]
    );
    // The output hook sees GSO batches (up to 64 packets each), not single datagrams.
    assert!(data.0 > 100, "data packets not marked AF41: {nft}");
    assert_eq!(data.1, 0, "data packets without AF41: {nft}");
    assert!(r["naks_sent"].as_u64().unwrap() > 0, "no NAKs: {r}");
    assert!(group_naks.0 > 0, "NAKs to the group not marked AF11: {nft}");
    assert_eq!(group_naks.1, 0, "NAKs to the group without AF11: {nft}");
    assert!(replies.0 > 0, "control replies not marked: {nft}");
    assert_eq!(replies.1, 0, "control replies without AF41: {nft}");
    assert!(requests.0 > 0, "receiver requests not marked AF11: {nft}");
    assert_eq!(requests.1, 0, "receiver requests without AF11: {nft}");
}

/// `mcastd serve --control/--iface/--group-base/--rate` override the config, and are checked
/// like it: a bad value is refused before anything starts, naming the field.
#[test]
fn serve_flags_override_the_config_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(common::mcastd_bin())
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["serve", "--group-base", "10.1.2.3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("command line: field server.group_base: 10.1.2.3 is not a multicast address"),
        "{err}"
    );
    let o = run(&["serve", "--rate=-5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("field server.rate_mbps"), "{err}");
    let o = run(&["serve", "--control", "not-an-address"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["keygen"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::create_dir_all(dir.path().join("mcast-data/archives")).unwrap();
    // A good set starts: it binds the control address given (a second start on it is refused
    // as "in use", which proves the first took it).
    let mut first = std::process::Command::new(common::mcastd_bin())
        .current_dir(dir.path())
        .args([
            "serve",
            "--control",
            "127.0.0.1:7668",
            "--group-base",
            "239.255.92.1",
            "--rate",
            "5",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = run(&["serve", "--control", "127.0.0.1:7668"]);
    let _ = first.kill();
    let _ = first.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("127.0.0.1:7668") && err.contains("in use"),
        "{err}"
    );
}

/// A receiver interface that is neither an address nor an interface is refused before
/// anything is sent (exit 2, naming the flag and the interfaces there are).
#[test]
fn a_bad_receiver_interface_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(common::recv_bin())
        .args([
            "get",
            "film",
            "--server",
            "127.0.0.1:9",
            "--iface",
            "nosuch0",
            "-o",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--iface: \"nosuch0\" is neither"), "{err}");
    assert!(err.contains("lo"), "{err}");
}

/// The namespace's IPv6 link: `lo` cannot carry IPv6 multicast, so a veth `v0` (its peer
/// down: nothing leaves; packets reach this host's sockets by multicast loopback) holding
/// fd00::1 (the server) and fd00::2 (a second sender).
const V6_LINK: &str = "ip link add v0 type veth peer name v1
ip link set v0 up
ip -6 addr add fd00::1/64 dev v0 nodad
ip -6 addr add fd00::2/64 dev v0 nodad";

/// One namespace run: `mcastd` looping a title on `group`, a second sender (127.0.0.2, or
/// fd00::2 for an IPv6 group) multicasting junk (data-packet-shaped) to the same group and
/// port the whole time, and one receiver (`--iface auto`). Returns the receiver's done report
/// and how many junk datagrams went out.
fn run_with_second_sender(
    control: u16,
    group: &str,
    port: u16,
) -> (serde_json::Value, u64, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v6 = group.contains(':');
    // The IPv6 interface exists only in the namespace: named on the serve command line.
    let (server, iface, junk_from, family, link) = match v6 {
        false => ("127.0.0.1", "127.0.0.1", "127.0.0.2", "ip", ""),
        true => ("fd00::1", "lo", "fd00::2", "ip6", V6_LINK),
    };
    let serve = if v6 { "serve --iface fd00::1" } else { "" };
    let ctl = std::net::SocketAddr::new(server.parse().unwrap(), control);
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"{ctl}\"\ngroup_base = \"{group}\"\nport_base = {port}\n\
             rate_mbps = 50.0\ntiers_mbps = [50.0]\nchannels = 4\nmulticast_iface = \"{iface}\""
        ),
        "film",
        3_000_000,
    );
    let forger = r#"
import os, socket, sys, time
g, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if ":" in g:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("v0"))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(src))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
while True:
    for _ in range(10):
        s.sendto(bytes([1, 1]) + os.urandom(198), (g, port))
    time.sleep(0.01)
"#;
    std::fs::write(d.join("forger.py"), forger).unwrap();
    let script = format!(
        r#"set -e
ip link set lo up
{link}
nft add table inet q
nft add chain inet q out '{{ type filter hook output priority 0; }}'
nft add rule inet q out {family} saddr {junk_from} udp dport {port} counter
nft add rule inet q out icmpv6 type mld2-listener-report counter
"$MCASTD" --config "$CFG" {serve} > "$D/server.log" 2>&1 &
server=$!
python3 "$D/forger.py" {group} {port} {junk_from} &
forger=$!
sleep 0.5
"$RECV" get film --server '{ctl}' -o "$D/r" --json --timeout 60 \
  > "$D/r.log" 2> "$D/r.err"
kill $forger
nft list chain inet q out > "$D/nft.txt"
kill $server
"#,
    );
    run_in_namespace(&script, d, &cfg);
    let nft = std::fs::read_to_string(d.join("nft.txt")).unwrap();
    let junk = packets(&nft, &format!("saddr {junk_from}"));
    let mld2 = packets(&nft, "mld2-listener-report");
    assert!(
        !v6 || mld2 > 0,
        "no MLDv2 report left the receiver's host: {nft}"
    );
    (done_report(&d.join("r.log")), junk, dir)
}

/// Source-specific multicast: on a 232/8 group the server tells receivers its source in
/// `JoinOk` and they join (source, group), so a second sender's datagrams to the same group
/// and port never reach them (malformed, foreign and rejected all stay 0) while the download
/// completes byte-identical. On an any-source group the same junk does reach the receiver
/// (the control: it is counted there).
#[test]
fn ssm_receivers_never_see_a_second_sender() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    if missing_tool(&["python3"]).is_some() {
        return skip_or_fail("needs python3 (the second sender)");
    }
    second_sender_on(7662, "232.1.91.1", 7664, "239.255.94.1");
}

/// The same over IPv6: an ff35:: group (MLDv2 INCLUDE join of fd00::1) against an ff15::
/// any-source control.
#[test]
fn ssm_over_ipv6_never_sees_a_second_sender() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    if missing_tool(&["python3"]).is_some() {
        return skip_or_fail("needs python3 (the second sender)");
    }
    second_sender_on(7666, "ff35::9101", 7672, "ff15::9401");
}

/// SSM `ssm_group` (control port `ssm_ctl`) and any-source `asm_group`, each with a second
/// sender: the SSM receiver sees none of its junk, the any-source one does.
fn second_sender_on(ssm_ctl: u16, ssm_group: &str, asm_ctl: u16, asm_group: &str) {
    let seen = |r: &serde_json::Value| {
        ["malformed", "foreign", "rejected"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .sum::<u64>()
    };
    let (ssm, ssm_junk, _d1) = run_with_second_sender(ssm_ctl, ssm_group, ssm_ctl + 100);
    let (asm, asm_junk, _d2) = run_with_second_sender(asm_ctl, asm_group, asm_ctl + 100);
    println!(
        "second sender: SSM {ssm_group}: {ssm_junk} junk datagrams sent, receiver saw {} \
         ({:.2} s); any-source {asm_group}: {asm_junk} sent, receiver saw {} ({:.2} s)",
        seen(&ssm),
        ssm["seconds"].as_f64().unwrap(),
        seen(&asm),
        asm["seconds"].as_f64().unwrap()
    );
    assert!(
        ssm_junk > 50,
        "the second sender sent nothing on the SSM group"
    );
    assert_eq!(
        seen(&ssm),
        0,
        "a second sender's packets reached an SSM receiver: {ssm}"
    );
    assert!(asm_junk > 50);
    assert!(
        seen(&asm) > 0,
        "control: the junk should reach an any-source receiver: {asm}"
    );
}

/// A full delivery over IPv6 multicast: an ff15:: (site-local scope) pool on the veth link,
/// 3 % of the group's datagrams dropped on the way in, two receivers (`--iface auto` toward
/// the server's IPv6 control address) that repair by NAKs — to the server and, multicast, to
/// each other — and both copies byte-identical. nftables counts the data: IPv6 only, every
/// datagram with the traffic class of `[server] dscp` (AF41).
#[test]
fn a_full_delivery_over_ipv6_multicast_repairs_loss() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (control, port) = (7674, 7774);
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"[fd00::1]:{control}\"\ngroup_base = \"ff15::7701\"\nport_base = {port}\n\
             rate_mbps = 50.0\ntiers_mbps = [50.0]\nchannels = 4\nadmin = [\"fd00::1\"]\n\
             dscp = \"AF41\""
        ),
        "film",
        3_000_000,
    );
    let script = format!(
        r#"set -e
ip link set lo up
{V6_LINK}
nft add table inet q
nft add chain inet q in '{{ type filter hook input priority 0; }}'
nft add rule inet q in ip6 daddr ff15::7701 udp dport {port} numgen random mod 100 '<' 3 drop
nft add chain inet q out '{{ type filter hook output priority 0; }}'
nft add rule inet q out ip6 daddr ff15::/16 udp dport {port} @th,72,8 != 0x80 ip6 dscp af41 counter
nft add rule inet q out ip6 daddr ff15::/16 udp dport {port} @th,72,8 != 0x80 ip6 dscp != af41 counter
nft add rule inet q out ip daddr 224.0.0.0/4 counter
"$MCASTD" --config "$CFG" serve --iface v0 > "$D/server.log" 2>&1 &
server=$!
sleep 0.5
"$RECV" get film --server '[fd00::1]:{control}' -o "$D/r2" --json --timeout 60 \
  > "$D/r2.log" 2> "$D/r2.err" &
second=$!
"$RECV" get film --server '[fd00::1]:{control}' -o "$D/r" --json --timeout 60 \
  > "$D/r.log" 2> "$D/r.err"
wait $second
"$RECV" stats --server '[fd00::1]:{control}' > "$D/stats.json"
nft list table inet q > "$D/nft.txt"
kill $server
"#,
    );
    run_in_namespace(&script, d, &cfg);
    assert_eq!(
        std::fs::read(d.join("r2/film.mca")).unwrap(),
        std::fs::read(d.join("archives/film.mca")).unwrap(),
        "the second receiver's copy differs from the archive"
    );
    let (r, r2) = (
        done_report(&d.join("r.log")),
        done_report(&d.join("r2.log")),
    );
    let nft = std::fs::read_to_string(d.join("nft.txt")).unwrap();
    let (v6, unmarked, v4) = (
        packets(&nft, "dscp af41"),
        packets(&nft, "dscp != af41"),
        packets(&nft, "224.0.0.0/4"),
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("stats.json")).unwrap()).unwrap();
    println!(
        "IPv6 multicast ff15::7701, 3 % loss: {:.2} s and {:.2} s, naks_sent {} and {}, \
         unicast {} and {}; IPv6 group datagrams (GSO batches) AF41 {v6} / other {unmarked}, \
         IPv4 multicast {v4}; server repairs {}",
        r["seconds"],
        r2["seconds"],
        r["naks_sent"],
        r2["naks_sent"],
        r["unicast"],
        r2["unicast"],
        stats["counters"]["repairs_sent"]
    );
    for r in [&r, &r2] {
        assert_eq!(r["unicast"], false, "{r}");
    }
    assert!(
        r["naks_sent"].as_u64().unwrap() + r2["naks_sent"].as_u64().unwrap() > 0,
        "no NAKs under 3 % loss: {r} {r2}"
    );
    assert!(v6 > 100, "the data did not go to the IPv6 group: {nft}");
    // The server's data (NAKs to the group, second payload byte 0x80, are the receivers').
    assert_eq!(unmarked, 0, "IPv6 data without its traffic class: {nft}");
    assert_eq!(v4, 0, "IPv4 multicast sent: {nft}");
}

/// The control endpoint and the unicast fallback over IPv6: `mcastd` listens on `[::1]` with an
/// IPv6 pool (ff15::) whose group traffic is dropped on the way in, and the receiver, given
/// `--server [::1]:PORT`, completes by a unicast stream that comes over IPv6 (counted by
/// nftables: IPv6 UDP to the receiver, none of it IPv4).
#[test]
fn control_and_unicast_fallback_over_ipv6() {
    if let Some(why) = cannot_run() {
        return skip_or_fail(&why);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (control, group, port) = (7670, "ff15::9501", 7770);
    let cfg = common::packed_server_dir(
        d,
        &format!(
            "control = \"[::1]:{control}\"\ngroup_base = \"{group}\"\nport_base = {port}\n\
             rate_mbps = 30.0\ntiers_mbps = [30.0]\nchannels = 4\nadmin = [\"::1\"]"
        ),
        "film",
        2_000_000,
    );
    let script = format!(
        r#"set -e
ip link set lo up
{V6_LINK}
nft add table inet q
nft add chain inet q in '{{ type filter hook input priority 0; }}'
nft add rule inet q in ip6 daddr {group} drop
nft add chain inet q out '{{ type filter hook output priority 0; }}'
nft add rule inet q out meta nfproto ipv6 ip6 daddr ::1 udp sport != {control} udp dport != {control} counter
"$MCASTD" --config "$CFG" serve --iface v0 > "$D/server.log" 2>&1 &
server=$!
sleep 0.5
"$RECV" get film --server '[::1]:{control}' --iface v0 -o "$D/r" --json --timeout 60 \
  --sync-timeout-ms 500 > "$D/r.log" 2> "$D/r.err"
"$RECV" stats --server '[::1]:{control}' > "$D/stats.json"
nft list table inet q > "$D/nft.txt"
kill $server
"#,
    );
    run_in_namespace(&script, d, &cfg);
    let r = done_report(&d.join("r.log"));
    let nft = std::fs::read_to_string(d.join("nft.txt")).unwrap();
    let v6_data = packets(&nft, "ip6 daddr ::1 udp sport");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("stats.json")).unwrap()).unwrap();
    println!(
        "IPv6 control + unicast fallback: unicast {}, {:.2} s, IPv6 data datagrams (GSO batches) {}, \
         unicast_started {}",
        r["unicast"], r["seconds"], v6_data, stats["counters"]["unicast_started"]
    );
    assert_eq!(r["unicast"], true, "{r}");
    assert_eq!(stats["counters"]["unicast_started"], 1, "{stats}");
    assert!(v6_data > 10, "the stream did not come over IPv6: {nft}");
}
