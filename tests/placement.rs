//! Sites, demand and placement with real processes (step 16): an origin server in site B
//! holding two titles, an edge server in site A holding one, a director with both sites
//! (receivers on 127.0.0.1 are site A), and `mcast-recv get --director`, `placement` and
//! `batch --placement-from`.
//!
//! * A receiver of site A is routed to site A's server even while site B's is cheaper (it is
//!   already looping the title).
//! * A title only site B holds is served from B, and recorded as unplaced for site A (stats,
//!   `/metrics`), and `mcast-recv placement --site A` lists it.
//! * `mcast-recv batch --placement-from D --site A --server <B> --dir <A's archive dir>`
//!   pre-loads it there, byte for byte.
//!
//! `cargo test --release --test placement -- --nocapture` shows the steps.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MB: usize = 1_000_000;

fn director_stats(d: SocketAddr) -> Value {
    let o = Command::new(recv_bin())
        .args(["stats", "--director"])
        .arg(d.to_string())
        .arg("--json")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "stats --director: {o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

fn server_entry(s: &Value, server: SocketAddr) -> Option<Value> {
    s["servers"]
        .as_array()?
        .iter()
        .find(|e| e["server"] == server.to_string())
        .cloned()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// `[server]` of a test server sending heartbeats to `director`.
fn server_toml(
    control: SocketAddr,
    group: u8,
    port: u16,
    director: SocketAddr,
    key: &Path,
) -> String {
    format!(
        "control = \"{control}\"\nmulticast_iface = \"127.0.0.1\"\n\
         group_base = \"239.255.{group}.1\"\nport_base = {port}\nchannels = 64\nttl = 1\n\
         sync_lead_ms = 200\nsync_interval_ms = 100\nrate_mbps = 12.0\nlease_ms = 3000\n\
         [directors]\naddrs = [\"{director}\"]\nheartbeat_ms = 200\nkey_file = '{}'\n\
         capacity_mbps = 10000.0\n[log]\nlevel = \"info\"\n",
        key.display()
    )
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Guard {
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    Guard::spawn(&mut cmd, false)
}

#[test]
fn receivers_go_to_their_site_and_unplaced_titles_are_placed() {
    let t0 = Instant::now();
    let keep = std::env::var_os("MCAST_TEST_KEEP").is_some();
    let tmp = tempfile::Builder::new()
        .prefix("mcast-placement-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    if keep {
        println!("keeping {}", dir.display());
    }
    let key = heartbeat_key(dir);

    // Site A's server sorts before site B's: without sites, a tie would go to B.
    let director: SocketAddr = "127.0.0.4:19930".parse().unwrap();
    let metrics_at: SocketAddr = "127.0.0.4:19933".parse().unwrap();
    let ctl_b: SocketAddr = "127.0.0.2:19931".parse().unwrap();
    let ctl_a: SocketAddr = "127.0.0.3:19932".parse().unwrap();

    // The origin (site B): "film" and "only-b".
    let root_b = dir.join("origin");
    fs::create_dir_all(&root_b).unwrap();
    let cfg_b = packed_server_dir(
        &root_b,
        &server_toml(ctl_b, 250, 46000, director, &key),
        "film",
        4 * MB,
    );
    let input = root_b.join("only-b.bin");
    fs::write(&input, random_bytes(MB + 12_345, 77)).unwrap();
    let o = Command::new(mcastd_bin())
        .arg("--config")
        .arg(&cfg_b)
        .args(["pack", "--compress", "none", "--title", "only-b"])
        .arg(&input)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "pack: {o:?}");
    // The edge (site A): the same identity, "film" only.
    let root_a = dir.join("edge");
    fs::create_dir_all(root_a.join("archives")).unwrap();
    copy_dir(&root_b.join("keys"), &root_a.join("keys"));
    fs::copy(
        root_b.join("archives/film.mca"),
        root_a.join("archives/film.mca"),
    )
    .unwrap();
    let cfg_a = root_a.join("mcastd.toml");
    fs::write(
        &cfg_a,
        format!(
            "[store]\narchive_dir = \"{0}/archives\"\nkey_dir = \"{0}/keys\"\n[server]\n{1}",
            root_a.display(),
            server_toml(ctl_a, 251, 46500, director, &key)
        ),
    )
    .unwrap();

    let dcfg = dir.join("director.toml");
    fs::write(
        &dcfg,
        format!(
            "[director]\nlisten = \"{director}\"\nkey_file = '{}'\nmetrics_listen = \"{metrics_at}\"\n\
             [[director.sites]]\nname = \"A\"\nprefixes = [\"127.0.0.1/32\", \"2001:db8:a::/48\"]\n\
             preload = [\"film\"]\nno_multicast = \"both\"\nhttp = [\"http://mirror-a.example/archives/\"]\n\
             [[director.sites]]\nname = \"B\"\nprefixes = [\"127.0.1.0/24\"]\n\
             [[director.servers]]\naddr = \"{ctl_a}\"\nsite = \"A\"\n\
             [[director.servers]]\naddr = \"{ctl_b}\"\nsite = \"B\"\n",
            key.display()
        ),
    )
    .unwrap();
    let mut dcmd = Command::new(director_bin());
    dcmd.arg("--config").arg(&dcfg);
    let _dg = spawn_logged(dcmd, &dir.join("director.log"));
    let mut servers = Vec::new();
    for (cfg, name) in [(&cfg_a, "edge"), (&cfg_b, "origin")] {
        let mut c = Command::new(mcastd_bin());
        c.arg("--config").arg(cfg).arg("serve");
        servers.push(spawn_logged(c, &dir.join(format!("{name}.log"))));
    }
    wait_until(
        "both servers up at the director",
        Duration::from_secs(20),
        || {
            let o = Command::new(recv_bin())
                .args(["stats", "--json", "--director"])
                .arg(director.to_string())
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let Ok(s) = serde_json::from_slice::<Value>(&o.stdout) else {
                return false;
            };
            [ctl_a, ctl_b]
                .iter()
                .all(|c| server_entry(&s, *c).is_some_and(|e| e["up"] == true))
        },
    );
    println!("placement: cluster up after {:?}", t0.elapsed());

    // Make site B's server the cheaper one for "film": its loop runs already (a receiver
    // asking it directly). Site A's receivers still go to A.
    let warm = dir.join("warm");
    let mut warm_cmd = Command::new(recv_bin());
    warm_cmd
        .args(["get", "film", "--server"])
        .arg(ctl_b.to_string())
        .arg("--dir")
        .arg(&warm)
        .args(["--json", "--timeout", "40s", "--known-servers", "none"]);
    let warm_rx = Receiver::spawn(warm_cmd, &warm, "film", false);
    wait_until(
        "site B's loop of film at the director",
        Duration::from_secs(15),
        || {
            server_entry(&director_stats(director), ctl_b)
                .is_some_and(|e| e["channels"].as_u64().unwrap_or(0) >= 1)
        },
    );
    let get = |title: &str, out: &Path| {
        let mut cmd = Command::new(recv_bin());
        cmd.args(["get", title, "--director"])
            .arg(director.to_string())
            .arg("--dir")
            .arg(out)
            .args([
                "--json",
                "--timeout",
                "40s",
                "--known-servers",
                "none",
                "--log",
                "info",
            ]);
        Receiver::spawn(cmd, out, title, false)
    };
    let r1 = dir.join("rx-film");
    let f = get("film", &r1).wait(Duration::from_secs(45));
    f.assert_complete(&root_a.join("archives/film.mca"));
    let done: Value = f
        .lines
        .iter()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .expect("a done report");
    assert_eq!(
        done["servers"],
        serde_json::json!([ctl_a.to_string()]),
        "{done}"
    );
    // The site policy came with the route and was carried into the download's options.
    let log = f.stderr.clone();
    assert!(
        log.contains("site=A")
            && (log.contains("no_multicast=both") || log.contains("no_multicast=\"both\"")),
        "route log lacks the site policy:\n{log}"
    );
    assert!(log.contains("http://mirror-a.example/archives/"), "{log}");
    warm_rx
        .wait(Duration::from_secs(45))
        .assert_complete(&root_b.join("archives/film.mca"));
    println!("placement: site A's receiver fetched film from site A's server ({ctl_a})");

    // A title only site B holds: served from B, recorded as unplaced for A.
    let r2 = dir.join("rx-only-b");
    let f = get("only-b", &r2).wait(Duration::from_secs(45));
    f.assert_complete(&root_b.join("archives/only-b.mca"));
    let s = director_stats(director);
    assert_eq!(
        s["unplaced"],
        serde_json::json!([{"site": "A", "title": "only-b", "requests": 1}]),
        "{s}"
    );
    assert_eq!(s["counters"]["requests_unplaced"], 1, "{s}");
    let site_a = s["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["site"] == "A")
        .cloned()
        .unwrap();
    assert_eq!(site_a["unplaced_titles"], 1, "{s}");
    wait_until(
        "the unplaced gauge in /metrics",
        Duration::from_secs(5),
        || metrics(metrics_at).contains("mcast_director_site_unplaced_titles{site=\"A\"} 1"),
    );
    let m = metrics(metrics_at);
    assert!(
        m.contains("mcast_director_site_unplaced_titles{site=\"B\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("mcast_director_requests_unplaced_total 1"),
        "{m}"
    );

    // The placement list of site A: "film" is preloaded there already; "only-b" is asked for.
    let placement = |extra: &[&str]| {
        Command::new(recv_bin())
            .args(["placement", "--director"])
            .arg(director.to_string())
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let o = placement(&["--site", "A"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "only-b\n");
    let o = placement(&["--site", "A", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["titles"], serde_json::json!(["only-b"]), "{v}");
    let o = placement(&["--site", "B"]);
    assert!(o.status.success() && o.stdout.is_empty(), "{o:?}");
    let o = placement(&["--site", "Z"]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no site \"Z\"") && err.contains("sites: A, B"),
        "{err}"
    );
    println!("placement: site A should pre-load [\"only-b\"]");

    // Pre-load it into site A's archive directory from the origin.
    let report = dir.join("batch.json");
    let o = Command::new(recv_bin())
        .args(["batch", "--placement-from"])
        .arg(director.to_string())
        .args(["--site", "A", "--server"])
        .arg(ctl_b.to_string())
        .arg("--dir")
        .arg(root_a.join("archives"))
        .arg("--report")
        .arg(&report)
        .args(["--known-servers", "none"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "batch: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["done"], 1, "{r}");
    assert_identical(
        &root_a.join("archives/only-b.mca"),
        &root_b.join("archives/only-b.mca"),
    );
    println!(
        "placement: batch pre-loaded only-b into site A's archive directory; test took {:?}",
        t0.elapsed()
    );
}
