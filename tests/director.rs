//! Traffic directors, heartbeats and fail-over with real processes (issue 8): two `mcastd`
//! holding the same archive (one packed data directory copied to both), two `mcast-director`,
//! `mcast-recv get --director A,B`. Servers on 127.0.0.2/.3, directors on 127.0.0.4/.5, each
//! test with its own ports and multicast groups (loopback multicast, as in `delivery.rs`).
//!
//! Run with `cargo test --release --workspace --test director -- --nocapture` to see the
//! measured figures. The PostgreSQL test needs `MCAST_TEST_PG_URL`, and `MCAST_TEST_PG_CA`
//! for the CA of its TLS certificate (else the system roots); `.ci/run` starts a server with
//! `.ci/pg.sh`. Without a URL it is skipped with the reason, and fails under `CI=true`.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mcast::wire::director::{Heartbeat, ServerState};
use serde_json::Value;

const MB: usize = 1_000_000;
const LIMIT: Duration = Duration::from_secs(90);

/// One test's cluster: a key file, directors and servers under one temp dir.
struct Cluster {
    dir: tempfile::TempDir,
    n: u16,
    key: PathBuf,
    directors: Vec<(SocketAddr, Guard)>,
    /// Directors and servers on `[::1]` (one server at most: loopback has one IPv6 address).
    v6: bool,
}

struct Srv {
    control: SocketAddr,
    cfg: PathBuf,
    root: PathBuf,
    proc: Option<Server>,
    health: Option<SocketAddr>,
}

impl Srv {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.proc.as_ref().unwrap().guard.child.id() as i32)
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.guard.kill();
        }
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

impl Cluster {
    /// `n` picks the ports: directors 19100+20n.., servers 19500+20n.., data 41000+400n...
    fn new(n: u16, directors: usize) -> Cluster {
        Cluster::with_family(n, directors, false)
    }

    fn with_family(n: u16, directors: usize, v6: bool) -> Cluster {
        // `MCAST_TEST_KEEP` keeps the cluster's directory (logs, archives) to debug a test.
        let keep = std::env::var_os("MCAST_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix(&format!("mcast-director-{n}-"))
            .disable_cleanup(keep)
            .tempdir()
            .unwrap();
        if keep {
            println!("keeping {}", dir.path().display());
        }
        let key = heartbeat_key(dir.path());
        let mut c = Cluster {
            dir,
            n,
            key,
            directors: Vec::new(),
            v6,
        };
        for i in 0..directors {
            c.start_director(i);
        }
        c
    }

    /// Loopback address `127.0.0.{last}`, or `::1` for an IPv6 cluster.
    fn host(&self, last: u16, port: u16) -> SocketAddr {
        match self.v6 {
            false => format!("127.0.0.{last}:{port}").parse().unwrap(),
            true => format!("[::1]:{port}").parse().unwrap(),
        }
    }

    fn director_addr(&self, i: usize) -> SocketAddr {
        self.host(4 + i as u16, 19100 + self.n * 20 + i as u16)
    }

    fn start_director(&mut self, i: usize) {
        let addr = self.director_addr(i);
        let cfg = self.dir.path().join(format!("director{i}.toml"));
        fs::write(
            &cfg,
            format!(
                "[director]\nlisten = \"{addr}\"\nkey_file = '{}'\ndown_after = 3\nmax_skew_ms = 30000\n",
                self.key.display()
            ),
        )
        .unwrap();
        let log = self.dir.path().join(format!("director{i}.log"));
        let mut cmd = Command::new(director_bin());
        cmd.arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let g = Guard::spawn(&mut cmd, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while try_stats(addr).is_none() {
            assert!(Instant::now() < deadline, "director {addr} did not start");
            std::thread::sleep(Duration::from_millis(30));
        }
        self.directors.push((addr, g));
    }

    fn director_list(&self) -> String {
        (0..self.directors.len())
            .map(|i| self.director_addr(i).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s config. Server 0 is packed here (`title` of `len` bytes); the others get a
    /// copy of server 0's data directory (same archive, identity and ticket key).
    fn server(&self, i: u16, title: &str, len: usize, extra: &str, sections: &str) -> Srv {
        let root = self.dir.path().join(format!("srv{i}"));
        let control = self.host(2 + i, 19500 + self.n * 20 + i);
        let health = self.host(2 + i, 19510 + self.n * 20 + i);
        let group = 210 + self.n * 4 + i;
        let port = 41000 + self.n * 400 + i * 50;
        let directors: Vec<String> = (0..self.directors.len())
            .map(|d| format!("\"{}\"", self.director_addr(d)))
            .collect();
        let server_toml = format!(
            "control = \"{control}\"\nmulticast_iface = \"127.0.0.1\"\n\
             group_base = \"239.255.{group}.1\"\nport_base = {port}\nchannels = 64\nttl = 1\n\
             sync_lead_ms = 200\nsync_interval_ms = 100\nhealth_listen = \"{health}\"\n{extra}\n\
             [directors]\naddrs = [{}]\nheartbeat_ms = 200\nkey_file = '{}'\n\
             capacity_mbps = 10000.0\n{sections}\n[log]\nlevel = \"info\"\n",
            directors.join(", "),
            self.key.display()
        );
        let cfg = if i == 0 {
            fs::create_dir_all(&root).unwrap();
            packed_server_dir(&root, &server_toml, title, len)
        } else {
            let src = self.dir.path().join("srv0");
            fs::create_dir_all(&root).unwrap();
            for d in ["archives", "keys"] {
                copy_dir(&src.join(d), &root.join(d));
            }
            let cfg = root.join("mcastd.toml");
            fs::write(
                &cfg,
                format!(
                    "[store]\narchive_dir = \"{0}/archives\"\nkey_dir = \"{0}/keys\"\n[server]\n{server_toml}\n",
                    root.display()
                ),
            )
            .unwrap();
            cfg
        };
        Srv {
            control,
            cfg,
            root,
            proc: None,
            health: Some(health),
        }
    }

    fn start(&self, s: &mut Srv) {
        let log = s.root.join("mcastd.log");
        let mut cmd = Command::new(mcastd_bin());
        cmd.arg("--config")
            .arg(&s.cfg)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let mut p = Server {
            guard: Guard::spawn(&mut cmd, false),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while try_stats(s.control).is_none() {
            if let Some(st) = p.guard.child.try_wait().unwrap() {
                panic!("mcastd exited at start-up ({st}):\n{}", p.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mcastd {} did not start",
                s.control
            );
            std::thread::sleep(Duration::from_millis(30));
        }
        s.proc = Some(p);
    }

    /// Wait until director `d` sees every server in `servers` up with `state`.
    fn wait_state(&self, d: usize, servers: &[&Srv], state: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats(self.director_addr(d));
            let ok = servers.iter().all(|srv| {
                s["servers"].as_array().unwrap().iter().any(|e| {
                    e["server"] == srv.control.to_string() && e["up"] == true && e["state"] == state
                })
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "director {d} never saw {state}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `mcast-recv get TITLE --director ... -o OUT --json`.
    fn get(&self, title: &str, out: &Path, extra: &[&str]) -> Receiver {
        let mut cmd = Command::new(recv_bin());
        cmd.arg("get")
            .arg(title)
            .arg("--director")
            .arg(self.director_list())
            .arg("--dir")
            .arg(out)
            .args(["--json", "--timeout", "80s", "--silence-timeout", "1500ms"])
            .args(extra);
        Receiver::spawn(cmd, out, title, false)
    }
}

fn done_json(f: &Finished) -> Value {
    let line = f
        .lines
        .iter()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("no done report: {f:#?}"));
    serde_json::from_str(line).unwrap()
}

/// Members on each server's open channels (from its stats; 0 when it does not answer).
fn members(s: &Srv) -> u64 {
    try_stats(s.control)
        .map(|v| {
            channels(&v)
                .iter()
                .map(|c| c["members"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Two servers with the same title, two directors, three receivers: `kill -9` the server
/// serving them mid-transfer; every receiver completes from the other, byte for byte, and
/// what it fetched after the switch is about what it was missing (the new server's loop
/// starts where the receivers' missing packets begin).
#[test]
fn receivers_fail_over_when_their_server_is_killed() {
    let c = Cluster::new(0, 2);
    // 24 MB at 40 Mbit/s: a ~5 s loop.
    let mut a = c.server(0, "film", 24 * MB, "rate_mbps = 40.0\nlease_ms = 3000", "");
    let mut b = c.server(1, "film", 0, "rate_mbps = 40.0\nlease_ms = 3000", "");
    let reference = a.root.join("archives/film.mca");
    c.start(&mut a);
    c.start(&mut b);
    c.wait_state(0, &[&a, &b], "online");
    c.wait_state(1, &[&a, &b], "online");

    // The directors send receivers of one title to the loop that runs it (joining costs a
    // multicast server nothing).
    let mut rx = Vec::new();
    for i in 0..3 {
        rx.push(c.get("film", &c.dir.path().join(format!("r{i}")), &[]));
        std::thread::sleep(Duration::from_millis(300));
    }
    rx[2].wait_progress(|p| p >= 35.0, Duration::from_secs(30));
    let (ma, mb) = (members(&a), members(&b));
    println!("failover: members before the kill: server A {ma}, server B {mb}");
    let (victim, survivor) = if ma >= mb {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let victim_addr = victim.control.to_string();
    let at_kill: Vec<f64> = rx.iter().map(|r| r.percent().unwrap_or(0.0)).collect();
    victim.kill9();
    let t_kill = Instant::now();

    let done: Vec<Finished> = rx.into_iter().map(|r| r.wait(LIMIT)).collect();
    let recovery = t_kill.elapsed();
    survivor.proc.as_mut().unwrap().assert_running();
    let mut switched = 0;
    for (i, f) in done.iter().enumerate() {
        f.assert_complete(&reference);
        let v = done_json(f);
        let servers: Vec<String> = v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let (missing, after) = (
            v["missing_bytes_at_switch"].as_u64().unwrap(),
            v["received_bytes_after_switch"].as_u64().unwrap(),
        );
        println!(
            "failover: receiver {i}: {:.1} % at the kill, servers {servers:?}, switches {}, \
             missing at switch {missing} B, received after switch {after} B \
             (ratio {:.3}), loop {} B",
            at_kill[i],
            v["switches"],
            after as f64 / missing.max(1) as f64,
            v["loop_bytes"]
        );
        if servers.first() == Some(&victim_addr) {
            switched += 1;
            assert!(v["switches"].as_u64().unwrap() >= 1, "{v}");
            assert_ne!(servers.last(), Some(&victim_addr), "{v}");
            assert!(
                missing > 0 && missing < v["loop_bytes"].as_u64().unwrap(),
                "{v}"
            );
            // Resumed, not restarted: the new server sent about what was missing.
            assert!(
                (after as f64) < 1.35 * missing as f64,
                "fetched {after} B after the switch for {missing} B missing: {v}"
            );
            // Nothing written twice: the last run wrote exactly the units it lacked.
            assert_eq!(
                v["written"].as_u64().unwrap() - v["fec_repairs_written"].as_u64().unwrap()
                    + v["units_at_start"].as_u64().unwrap(),
                v["needed_units"].as_u64().unwrap()
            );
        }
    }
    println!(
        "failover: {switched} receivers switched servers; all done {recovery:?} after the kill"
    );
    assert!(switched >= 1, "nobody was on the killed server");
    let s = stats(survivor.control);
    assert!(counter(&s, "completions") >= switched, "{s}");
    // Both directors marked the killed server down.
    for d in 0..2 {
        let ds = stats(c.director_addr(d));
        let e = ds["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["server"] == victim_addr)
            .cloned()
            .unwrap();
        assert_eq!(e["up"], false, "director {d}: {ds}");
        assert!(ds["counters"]["servers_marked_down"].as_u64().unwrap() >= 1);
    }
}

/// Kill one director: new requests are still routed (by the other), and downloads complete.
/// Directors, heartbeats, routes and health checks over IPv6: a director on `[::1]` hears a
/// server whose control endpoint is `[::1]` (heartbeats leave from it), routes a receiver
/// there, and the receiver completes (the channel itself is IPv4 multicast on `lo`).
#[test]
fn an_ipv6_director_routes_to_an_ipv6_server() {
    let c = Cluster::with_family(5, 1, true);
    let mut a = c.server(0, "doc", MB, "rate_mbps = 100.0", "");
    let reference = a.root.join("archives/doc.mca");
    // An advert for the title: a `get` through the director fetches it too, from the server
    // that delivered the title.
    let ad = a.root.join("ad.media");
    fs::write(&ad, random_bytes(40_000, 9)).unwrap();
    let o = Command::new(mcastd_bin())
        .arg("--config")
        .arg(&a.cfg)
        .args(["pack", "--title", "ad-doc", "--advert", "--for", "doc"])
        .arg(&ad)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    c.start(&mut a);
    c.wait_state(0, &[&a], "online");
    let f = c.get("doc", &c.dir.path().join("r0"), &[]).wait(LIMIT);
    f.assert_complete(&reference);
    assert_identical(
        &c.dir.path().join("r0/ad-doc.mca"),
        &a.root.join("archives/ad-doc.mca"),
    );
    let v = done_json(&f);
    let ds = stats(c.director_addr(0));
    let (code, health) = http_get(a.health.unwrap(), "/health");
    println!(
        "IPv6 director {}: routed to {}, routes_ok {}, heartbeats_accepted {}; health {code}",
        c.director_addr(0),
        v["servers"],
        ds["counters"]["routes_ok"],
        ds["counters"]["heartbeats_accepted"]
    );
    assert_eq!(v["servers"][0], a.control.to_string(), "{v}");
    assert_eq!(ds["counters"]["routes_ok"], 1, "{ds}");
    assert_eq!(ds["counters"]["heartbeats_wrong_source"], 0, "{ds}");
    assert_eq!(code, 200, "{health}");

    // `catalog` and `stats` through the director: the catalogue of the server it picks, and
    // the director's own stats.
    let o = Command::new(recv_bin())
        .args(["catalog", "--json", "--director", &c.director_list()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let items: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(items.len(), 2, "{items:?}");
    let item = &items[1];
    assert_eq!(
        (items[0]["title"].as_str(), item["title"].as_str()),
        (Some("ad-doc"), Some("doc"))
    );
    assert_eq!(item["server"], a.control.to_string(), "{item}");
    let o = Command::new(recv_bin())
        .args(["stats", "--director", &c.director_list()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let ds: Value = serde_json::from_slice(&o.stdout).expect("JSON off a terminal");
    assert_eq!(ds["counters"]["routes_ok"], 2, "{ds}");
}

#[test]
fn requests_are_routed_when_a_director_is_killed() {
    let mut c = Cluster::new(1, 2);
    let mut a = c.server(0, "doc", 2 * MB, "rate_mbps = 100.0", "");
    let reference = a.root.join("archives/doc.mca");
    c.start(&mut a);
    c.wait_state(1, &[&a], "online");
    // The first director is the one a receiver asks first.
    c.directors[0].1.kill();
    let t = Instant::now();
    let f = c.get("doc", &c.dir.path().join("r0"), &[]).wait(LIMIT);
    f.assert_complete(&reference);
    let v = done_json(&f);
    println!(
        "director down: completed in {:.2} s via {}, director failovers {}",
        t.elapsed().as_secs_f64(),
        v["servers"],
        v["director_failovers"]
    );
    assert!(v["director_failovers"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["switches"], 0, "{v}");
    let ds = stats(c.director_addr(1));
    assert!(ds["counters"]["routes_ok"].as_u64().unwrap() >= 1, "{ds}");
    // A title no server holds: exit 5, after a short grace period.
    let t = Instant::now();
    let f = c.get("nope", &c.dir.path().join("r2"), &[]).wait(LIMIT);
    f.assert_code(5);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // With no director left the receiver says so (exit 4), promptly.
    c.directors[1].1.kill();
    let f = c.get("doc", &c.dir.path().join("r1"), &[]).wait(LIMIT);
    f.assert_code(4);
    assert!(f.stderr.contains("no director answered"), "{}", f.stderr);
}

/// A draining server (SIGUSR1) finishes its receivers but gets no new ones: directors route
/// elsewhere, a direct join is refused, and its health check turns 503.
#[test]
fn draining_server_finishes_its_receivers_but_gets_no_new_ones() {
    let c = Cluster::new(2, 1);
    // 6 MB at 12 Mbit/s: a ~4 s loop.
    let mut a = c.server(0, "show", 6 * MB, "rate_mbps = 12.0\nlease_ms = 3000", "");
    let mut b = c.server(1, "show", 0, "rate_mbps = 12.0\nlease_ms = 3000", "");
    let reference = a.root.join("archives/show.mca");
    c.start(&mut a);
    c.start(&mut b);
    c.wait_state(0, &[&a, &b], "online");
    let (code, h) = http_get(a.health.unwrap(), "/health");
    assert_eq!((code, h["state"].as_str()), (200, Some("online")), "{h}");
    assert_eq!(h["titles"][0], "show");

    let mut first = c.get("show", &c.dir.path().join("r0"), &[]);
    first.wait_progress(|p| p >= 10.0, Duration::from_secs(20));
    let (x, y) = if members(&a) > 0 { (&a, &b) } else { (&b, &a) };
    assert_eq!(members(x), 1);
    nix::sys::signal::kill(x.pid(), nix::sys::signal::Signal::SIGUSR1).unwrap();
    c.wait_state(0, &[x], "draining");
    let (code, h) = http_get(x.health.unwrap(), "/health");
    assert_eq!((code, h["state"].as_str()), (503, Some("draining")), "{h}");
    assert_eq!(h["receivers"], 1, "{h}");

    // New receivers go to the other server.
    let second = c.get("show", &c.dir.path().join("r1"), &[]);
    // A receiver that insists on the draining server is refused (exit 4, says why).
    let direct = Command::new(recv_bin())
        .args(["get", "show", "--json", "--timeout", "20", "--server"])
        .arg(x.control.to_string())
        .arg("-o")
        .arg(c.dir.path().join("r2"))
        .output()
        .unwrap();
    assert_eq!(direct.status.code(), Some(4), "{direct:?}");
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("draining"),
        "{direct:?}"
    );

    let f1 = first.wait(LIMIT);
    let f2 = second.wait(LIMIT);
    f1.assert_complete(&reference);
    f2.assert_complete(&reference);
    let (v1, v2) = (done_json(&f1), done_json(&f2));
    println!(
        "draining: first receiver via {} (switches {}), second via {}",
        v1["servers"], v1["switches"], v2["servers"]
    );
    assert_eq!(
        v1["servers"],
        serde_json::json!([x.control.to_string()]),
        "{v1}"
    );
    assert_eq!(
        v1["switches"], 0,
        "the draining server kept its receiver: {v1}"
    );
    assert_eq!(
        v2["servers"],
        serde_json::json!([y.control.to_string()]),
        "{v2}"
    );
    let sx = stats(x.control);
    assert_eq!(counter(&sx, "completions"), 1, "{sx}");
    assert!(counter(&sx, "refused_draining") >= 1, "{sx}");
    assert_eq!(counter(&sx, "joins"), 1, "{sx}");
    let _ = x.log();
}

/// Forged and replayed heartbeats are rejected and counted, and change nothing: the test
/// listens as an extra "director" to capture genuine heartbeats, then replays one and forges
/// others (wrong key; a genuine one with a byte changed) at a real director.
#[test]
fn forged_and_replayed_heartbeats_are_rejected_and_counted() {
    let c = Cluster::new(3, 1);
    let tap = UdpSocket::bind("127.0.0.9:19199").unwrap();
    let mut a = c.server(0, "clip", MB, "", "");
    // Also send heartbeats to the tap.
    let text = fs::read_to_string(&a.cfg).unwrap().replace(
        &format!("addrs = [\"{}\"]", c.director_addr(0)),
        &format!("addrs = [\"{}\", \"127.0.0.9:19199\"]", c.director_addr(0)),
    );
    fs::write(&a.cfg, text).unwrap();
    c.start(&mut a);
    c.wait_state(0, &[&a], "online");
    let d = c.director_addr(0);

    let captured = recv_until(&tap, Instant::now() + Duration::from_secs(5)).expect("heartbeat");
    let hb = Heartbeat::decode_unverified(&captured).expect("a heartbeat");
    assert_eq!(hb.server.to_string(), a.control.to_string());
    std::thread::sleep(Duration::from_millis(300)); // the director has this one (and newer)
    let before = stats(d)["counters"].clone();

    let sender = UdpSocket::bind("127.0.0.9:0").unwrap();
    // Replay the genuine heartbeat, twice.
    sender.send_to(&captured, d).unwrap();
    sender.send_to(&captured, d).unwrap();
    // Forged: right format, wrong key, claiming the server is stopping and much later.
    let mut forged = hb.clone();
    forged.seq += 1_000_000;
    forged.state = ServerState::Stopping;
    sender.send_to(&forged.encode(&[0x55; 32]), d).unwrap();
    // Tampered: a genuine heartbeat with its state byte changed.
    let mut tampered = captured.clone();
    // version, type, server (family, 4, port: 7), boot_id, seq, unix_ms, interval_ms (4),
    // then the state byte.
    tampered[37] = ServerState::Draining as u8;
    sender.send_to(&tampered, d).unwrap();
    sender
        .send_to(
            &[mcast::wire::WIRE_VERSION, 0x90, b'j', b'u', b'n', b'k'],
            d,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let s = stats(d);
    let after = &s["counters"];
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    println!(
        "heartbeats: accepted {}, replayed +{}, forged +{}, malformed +{}",
        after["heartbeats_accepted"],
        delta("heartbeats_replayed"),
        delta("heartbeats_forged"),
        delta("heartbeats_malformed")
    );
    assert_eq!(delta("heartbeats_replayed"), 2, "{s}");
    assert_eq!(delta("heartbeats_forged"), 2, "{s}");
    assert_eq!(delta("heartbeats_malformed"), 1, "{s}");
    assert!(after["heartbeats_accepted"].as_u64().unwrap() >= 3, "{s}");
    // Nothing changed: the server is up, online, and requests still go to it.
    let e = &s["servers"][0];
    assert_eq!(
        (e["up"].as_bool(), e["state"].as_str()),
        (Some(true), Some("online")),
        "{s}"
    );
    assert!(e["seq"].as_u64().unwrap() < forged.seq, "{s}");
    let f = c.get("clip", &c.dir.path().join("r0"), &[]).wait(LIMIT);
    f.assert_complete(&a.root.join("archives/clip.mca"));
}

/// Two servers on one PostgreSQL (over TLS, the certificate checked against
/// `MCAST_TEST_PG_CA`): a single-use ticket issued through one is presented to both at the same
/// moment; it plays exactly once (the other is refused, exit 8).
#[test]
fn single_use_ticket_on_two_servers_plays_once() {
    let Ok(url) = std::env::var("MCAST_TEST_PG_URL") else {
        skip_or_fail(
            "MCAST_TEST_PG_URL is not set (a PostgreSQL server for the shared ticket database; \
             .ci/run starts one)",
        );
        return;
    };
    // Over verified TLS: the CA of the `.ci/pg.sh` server (the system roots when unset).
    let ca = std::env::var("MCAST_TEST_PG_CA").unwrap_or_default();
    let c = Cluster::new(4, 0);
    let db = format!(
        "[tickets]\ndatabase = \"postgres\"\npostgres_url = \"{url}\"\n\
         postgres_tls = \"verify-full\"\npostgres_ca_file = \"{ca}\"\n"
    );
    let mut a = c.server(0, "film", 2 * MB, "rate_mbps = 100.0", &db);
    // Tickets first, so the copied key store holds the ticket database key too.
    let mut tickets = Vec::new();
    let mut ids = Vec::new();
    for i in 0..4 {
        let t = c.dir.path().join(format!("t{i}.ticket"));
        let o = Command::new(mcastd_bin())
            .arg("--config")
            .arg(&a.cfg)
            .args([
                "ticket",
                "issue",
                "film",
                "--holder",
                &format!("box-{i}"),
                "-o",
            ])
            .arg(&t)
            .output()
            .unwrap();
        assert!(o.status.success(), "issue: {o:?}");
        // "ticket <id> for ..."
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        ids.push(out.split_whitespace().nth(1).unwrap().to_string());
        tickets.push(t);
    }
    let mut b = c.server(1, "film", 0, "rate_mbps = 100.0", &db);
    c.start(&mut a);
    c.start(&mut b);
    // A receiver that has the archive (any server's copy is the same file).
    let wallet = c.dir.path().join("wallet");
    fs::create_dir_all(&wallet).unwrap();
    fs::copy(a.root.join("archives/film.mca"), wallet.join("film.mca")).unwrap();

    let play = |t: &Path, server: SocketAddr, out: &str| {
        let mut cmd = Command::new(recv_bin());
        cmd.args(["play", "film", "--json", "--ticket"])
            .arg(t)
            .arg("--dir")
            .arg(&wallet)
            .arg("--server")
            .arg(server.to_string())
            .arg("-o")
            .arg(c.dir.path().join(out))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let mut wins = [0u32; 2];
    for (i, t) in tickets.iter().enumerate() {
        let pa = play(t, a.control, &format!("a{i}.out"));
        let pb = play(t, b.control, &format!("b{i}.out"));
        let (oa, ob) = (
            pa.wait_with_output().unwrap(),
            pb.wait_with_output().unwrap(),
        );
        let codes = (oa.status.code(), ob.status.code());
        println!("ticket {i} on both servers at once: exit codes (A, B) = {codes:?}");
        match codes {
            (Some(0), Some(8)) => wins[0] += 1,
            (Some(8), Some(0)) => wins[1] += 1,
            _ => panic!("ticket {i} must play exactly once: {oa:?}\n{ob:?}"),
        }
        let refused = if codes.0 == Some(8) { &oa } else { &ob };
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("used"),
            "{refused:?}"
        );
    }
    println!(
        "single use across servers: plays won by A {}, by B {}",
        wins[0], wins[1]
    );
    // Either server's ticket list shows every ticket used once.
    let o = Command::new(mcastd_bin())
        .arg("--config")
        .arg(&b.cfg)
        .args(["ticket", "list", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for id in &ids {
        let r = rows
            .iter()
            .find(|r| r["ticket_id"] == id.as_str())
            .unwrap_or_else(|| panic!("ticket {id} not listed by the other server: {text}"));
        assert_eq!(
            (r["plays_left"].as_u64(), r["grants"].as_u64()),
            (Some(0), Some(1)),
            "{r}"
        );
        assert_eq!(r["state"], "used", "{r}");
    }
}

/// `mcast-director` usage: help, a bad config exits 2, a missing key file exits 1.
#[test]
fn director_cli_exit_codes() {
    let o = Command::new(director_bin()).arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("--director") && help.contains("Exit status"),
        "{help}"
    );
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.toml");
    fs::write(&bad, "[director]\nlisten = \"nope\"\n").unwrap();
    let o = Command::new(director_bin())
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let nokey = d.path().join("nokey.toml");
    fs::write(
        &nokey,
        format!(
            "[director]\nlisten = \"127.0.0.1:0\"\nkey_file = '{}'\n",
            d.path().join("missing.key").display()
        ),
    )
    .unwrap();
    let o = Command::new(director_bin())
        .arg("--config")
        .arg(&nokey)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.key"),
        "{o:?}"
    );
}
