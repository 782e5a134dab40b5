#![allow(dead_code)] // each test file uses a different part of this harness
//! Harness for the real-socket delivery tests: a site (temp dir + config + keys + archives), a
//! running `mcastd`, `mcast-recv` processes with their JSON output, and a raw control client.
//!
//! Every process is killed on drop and every wait has a deadline, so a broken build fails a
//! test instead of hanging it. All traffic stays on 127.0.0.1 and loopback multicast (TTL 0/1).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcast::wire::control::{Control, Envelope, MAX_CONTROL_LEN};
use mcast::wire::data::DataHeader;
use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;

pub fn mcastd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcastd"))
}

pub fn director_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcast-director"))
}

/// A fresh heartbeat key at `dir/heartbeat.key` (`mcast-director genkey`).
pub fn heartbeat_key(dir: &Path) -> PathBuf {
    let key = dir.join("heartbeat.key");
    let o = Command::new(director_bin())
        .args(["genkey", "-o"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "genkey: {o:?}");
    key
}

/// Copy a directory tree (keys, archives), keeping the top directory's mode.
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    fs::set_permissions(dst, fs::metadata(src).unwrap().permissions()).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// `mcast-recv` is built by the `client` package into the same directory as `mcastd`.
pub fn recv_bin() -> PathBuf {
    // Every test site makes a new server key, and sites reuse their addresses from run to
    // run: the receivers the tests start remember no server keys (the known-servers store
    // has its own test, which names its file).
    static NO_KNOWN_SERVERS: std::sync::Once = std::sync::Once::new();
    NO_KNOWN_SERVERS.call_once(|| std::env::set_var("MCAST_KNOWN_SERVERS", "none"));
    let p = mcastd_bin().with_file_name("mcast-recv");
    assert!(
        p.exists(),
        "{} not found: build the whole workspace (cargo test --release --workspace, or \
         cargo build --release --workspace first)",
        p.display()
    );
    p
}

/// Deterministic pseudo-random bytes (xorshift), incompressible like media.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A child process killed (with its whole process group when `group`) on drop.
pub struct Guard {
    pub child: Child,
    group: bool,
}

impl Guard {
    pub fn spawn(cmd: &mut Command, group: bool) -> Guard {
        if group {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Guard { child, group }
    }

    pub fn kill(&mut self) {
        if self.group {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for exit, at most `limit`; `None` when it did not exit in time (still running).
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Per-test site: config with a unique control port, group pool and data ports derived from
/// `n`, its own key store and archive directory.
pub struct Site {
    pub dir: TempDir,
    pub cfg: PathBuf,
    pub control: SocketAddr,
}

impl Site {
    /// `server_extra` is appended to `[server]` (e.g. `rate_mbps = 20.0`).
    pub fn new(n: u16, server_extra: &str) -> Site {
        // `MCAST_TEST_KEEP` keeps the site's directory (logs, archives) to debug a test.
        let keep = std::env::var_os("MCAST_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix(&format!("mcast-delivery-{n}-"))
            .disable_cleanup(keep)
            .tempdir()
            .expect("temp dir");
        if keep {
            println!("keeping {}", dir.path().display());
        }
        let control: SocketAddr = format!("127.0.0.1:{}", 17600 + n * 10).parse().unwrap();
        let cfg = dir.path().join("mcastd.toml");
        let site = Site { cfg, control, dir };
        fs::write(
            &site.cfg,
            format!(
                "[store]\narchive_dir = '{}'\nkey_dir = '{}'\n\n\
                 [pack]\nsymbol_size = 1280\ncompress = \"none\"\n\n\
                 [server]\ncontrol = \"{control}\"\nmulticast_iface = \"127.0.0.1\"\n\
                 group_base = \"239.255.{}.1\"\nport_base = {}\nchannels = 4\nttl = 1\n\
                 sync_lead_ms = 200\nsync_interval_ms = 100\n{server_extra}\n\n\
                 [log]\nlevel = \"info\"\n",
                site.archive_dir().display(),
                site.path("keys").display(),
                100 + n,
                27000 + n * 100,
            ),
        )
        .unwrap();
        let out = Command::new(mcastd_bin())
            .arg("--config")
            .arg(&site.cfg)
            .arg("keygen")
            .env_remove("RUST_LOG")
            .env_remove("MCASTD_CONFIG")
            .output()
            .expect("run mcastd keygen");
        assert!(out.status.success(), "keygen failed: {out:?}");
        site
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn archive_dir(&self) -> PathBuf {
        self.path("archives")
    }

    pub fn archive_path(&self, title: &str) -> PathBuf {
        mcast::archive::archive_path(&self.archive_dir(), title)
    }

    /// Pack `len` random bytes as `title` (no compression). Returns the archive path.
    pub fn pack(&self, title: &str, len: usize, seed: u64) -> PathBuf {
        let input = self.path(&format!("{title}.media"));
        fs::write(&input, random_bytes(len, seed)).unwrap();
        let out = Command::new(mcastd_bin())
            .arg("--config")
            .arg(&self.cfg)
            .args(["pack", "--compress", "none", "--title", title])
            .arg(&input)
            .env_remove("RUST_LOG")
            .output()
            .expect("run mcastd pack");
        assert!(out.status.success(), "pack failed: {out:?}");
        fs::remove_file(&input).unwrap();
        self.archive_path(title)
    }

    /// Start `mcastd serve` and wait until it answers a stats request.
    pub fn serve(&self) -> Server {
        let log = self.path("mcastd.log");
        let mut cmd = Command::new(mcastd_bin());
        cmd.arg("--config")
            .arg(&self.cfg)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let mut srv = Server {
            guard: Guard::spawn(&mut cmd, false),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = srv.guard.child.try_wait().unwrap() {
                panic!("mcastd exited at start-up ({st}):\n{}", srv.log_text());
            }
            if try_stats(self.control).is_some() {
                return srv;
            }
            assert!(
                Instant::now() < deadline,
                "mcastd did not answer on {} within 20 s:\n{}",
                self.control,
                srv.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Counters and channels via `mcast-recv stats`.
    pub fn stats(&self) -> Value {
        stats(self.control)
    }

    pub fn out_dir(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    /// `mcast-recv get TITLE --server CONTROL --dir DIR [extra]` (`--timeout 60s` unless given).
    pub fn get(&self, title: &str, out: &Path, extra: &[&str]) -> Receiver {
        let mut cmd = Command::new(recv_bin());
        cmd.arg("get")
            .arg(title)
            .arg("--server")
            .arg(self.control.to_string())
            .arg("--dir")
            .arg(out)
            .args(extra);
        if !extra.contains(&"--timeout") {
            cmd.args(["--timeout", "60s"]);
        }
        Receiver::spawn(cmd, out, title, false)
    }

    /// The group and port the running channel of `title` loops on (from stats).
    pub fn wait_channel_group(&self, title: &str, limit: Duration) -> SocketAddrV4 {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.stats();
            if let Some(c) = channels(&s).iter().find(|c| c["title"] == title) {
                return c["group"]
                    .as_str()
                    .expect("group string")
                    .parse()
                    .expect("group addr");
            }
            assert!(
                Instant::now() < deadline,
                "no channel for {title:?} within {limit:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Server {
    pub guard: Guard,
    pub log: PathBuf,
}

impl Server {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running (panics with the log otherwise).
    pub fn assert_running(&mut self) {
        if let Some(st) = self.guard.child.try_wait().unwrap() {
            panic!("mcastd exited ({st}):\n{}", self.log_text());
        }
    }
}

pub fn try_stats(server: SocketAddr) -> Option<Value> {
    let out = Command::new(recv_bin())
        .args(["stats", "--server"])
        .arg(server.to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

pub fn stats(server: SocketAddr) -> Value {
    try_stats(server).unwrap_or_else(|| panic!("`mcast-recv stats --server {server}` failed"))
}

pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name:?} in {stats}"))
}

pub fn channels(stats: &Value) -> Vec<Value> {
    stats["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("no channels array in {stats}"))
        .clone()
}

/// The final JSON line of `mcast-recv get`. A mirror of the fields tests read, on purpose:
/// it pins the JSON contract operators script against (and the root package cannot
/// dev-depend on `mcast-recv` without a dependency cycle).
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    pub event: String,
    pub archive_bytes: u64,
    pub loop_units: u64,
    pub loop_bytes: u64,
    pub units_at_start: u64,
    #[serde(default)]
    pub units_failed_recheck: u64,
    pub received_bytes: u64,
    pub received_packets: u64,
    pub missing_bytes_at_start: u64,
    pub written: u64,
    /// Units a complete download holds (data and data hash packets; `loop_units` less FEC
    /// repair symbols and their hash packets).
    pub needed_units: u64,
    /// FEC repair symbols written (among `written`): they help decode, and are not needed.
    #[serde(default)]
    pub fec_repairs_written: u64,
    #[serde(default)]
    pub fec_restored: u64,
    pub duplicates: u64,
    pub no_hash_yet: u64,
    /// Packets not parked: their packet id already had the most candidates allowed.
    #[serde(default)]
    pub parked_excess: u64,
    pub rejected: u64,
    pub foreign: u64,
    pub malformed: u64,
    pub syncs_forged: u64,
    pub syncs_stale: u64,
    pub unicast: bool,
    pub seconds: f64,
    pub naks_sent: u64,
    pub units_naked: u64,
    pub repairs_received: u64,
    /// Datagrams the receiver's data sockets dropped (`SO_RXQ_OVFL`).
    pub socket_drops: u64,
    pub tier: usize,
    pub settled_tier: usize,
    pub tier_changes: u32,
}

/// A running `mcast-recv get` (or a shell wrapping one); stdout lines are collected live.
pub struct Receiver {
    pub guard: Guard,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
    pub out: PathBuf,
    pub title: String,
}

/// A receiver that has exited.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub lines: Vec<String>,
    pub stderr: String,
    pub out: PathBuf,
    pub title: String,
}

impl Receiver {
    pub fn spawn(mut cmd: Command, out: &Path, title: &str, group: bool) -> Receiver {
        let stderr = out.with_extension(format!(
            "stderr.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(stderr.parent().unwrap()).unwrap();
        // `MCAST_TEST_RECV_LOG` sets the receivers' log filter, to debug a test.
        match std::env::var("MCAST_TEST_RECV_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap());
        let mut guard = Guard::spawn(&mut cmd, group);
        let stdout = guard.child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        Receiver {
            guard,
            lines,
            reader: Some(reader),
            stderr,
            out: out.to_path_buf(),
            title: title.to_string(),
        }
    }

    /// Percent of the latest JSON progress line.
    pub fn percent(&self) -> Option<f64> {
        let lines = self.lines.lock().unwrap();
        lines.iter().rev().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["event"] == "progress")
                .then(|| v["percent"].as_f64())
                .flatten()
        })
    }

    /// Wait until the progress percent satisfies `ok`; returns it.
    pub fn wait_progress(&mut self, ok: impl Fn(f64) -> bool, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(p) = self.percent().filter(|p| ok(*p)) {
                return p;
            }
            if let Some(st) = self.guard.child.try_wait().unwrap() {
                panic!(
                    "receiver exited ({st}) before the expected progress:\n{}\n{}",
                    self.lines.lock().unwrap().join("\n"),
                    fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no matching progress within {limit:?}; last {:?}",
                self.percent()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, like `kill -9`.
    pub fn kill9(mut self) -> Finished {
        self.guard.kill();
        self.finish(None)
    }

    /// Wait for exit (killing it and failing after `limit`).
    pub fn wait(mut self, limit: Duration) -> Finished {
        match self.guard.wait_for(limit) {
            Some(st) => self.finish(st.code()),
            None => {
                self.guard.kill();
                let f = self.finish(None);
                panic!(
                    "receiver for {:?} still running after {limit:?}: {f:#?}",
                    f.title
                );
            }
        }
    }

    fn finish(&mut self, code: Option<i32>) -> Finished {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Finished {
            code,
            lines: std::mem::take(&mut *self.lines.lock().unwrap()),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
            out: self.out.clone(),
            title: self.title.clone(),
        }
    }
}

impl Finished {
    pub fn assert_code(&self, code: i32) -> &Finished {
        assert_eq!(self.code, Some(code), "wrong exit status: {self:#?}");
        self
    }

    pub fn report(&self) -> Report {
        let line = self
            .lines
            .iter()
            .rev()
            .find(|l| l.contains("\"event\":\"done\""))
            .unwrap_or_else(|| panic!("no final JSON report: {self:#?}"));
        let r: Report = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(r.event, "done");
        r
    }

    /// Exit 0 and `<out>/<title>.mca` byte-identical to `reference`. Returns the report.
    pub fn assert_complete(&self, reference: &Path) -> Report {
        self.assert_code(0);
        let r = self.report();
        let got = mcast::archive::archive_path(&self.out, &self.title);
        assert_identical(&got, reference);
        assert_eq!(
            r.archive_bytes,
            fs::metadata(reference).unwrap().len(),
            "report archive_bytes"
        );
        r
    }
}

pub fn assert_identical(got: &Path, want: &Path) {
    let a = fs::read(got).unwrap_or_else(|e| panic!("cannot read {}: {e}", got.display()));
    let b = fs::read(want).unwrap_or_else(|e| panic!("cannot read {}: {e}", want.display()));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{} differs from {}: lengths {} vs {}, first difference at {first:?}",
            got.display(),
            want.display(),
            a.len(),
            b.len()
        );
    }
}

/// A raw control-port client (the test plays receiver or attacker).
pub struct Ctl {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub rid: u64,
    req: u32,
    /// Data-channel packets that arrived while waiting for a reply.
    pub data_seen: u64,
    /// The server's address token, once a Retry gave one.
    pub token: Option<mcast::wire::control::AddressToken>,
    /// The session's key, once a JoinOk gave one: the session's messages are sealed with it.
    pub session_key: Option<mcast::wire::control::SessionKey>,
}

impl Ctl {
    pub fn new(server: SocketAddr, rid: u64) -> Ctl {
        Ctl::on(UdpSocket::bind("127.0.0.1:0").unwrap(), server, rid)
    }

    /// A client on `sock` (e.g. bound to another loopback address).
    pub fn on(sock: UdpSocket, server: SocketAddr, rid: u64) -> Ctl {
        Ctl {
            sock,
            server,
            rid,
            req: rand::random::<u32>() >> 1,
            data_seen: 0,
            token: None,
            session_key: None,
        }
    }

    pub fn send(&mut self, msg: Control) -> u32 {
        self.req = self.req.wrapping_add(1);
        let sealed = msg.session_archive().is_some();
        let env = Envelope::new(self.rid, self.req, msg).with_token(self.token);
        let b = match &self.session_key {
            Some(k) if sealed => env.encode_sealed(k),
            _ => env.encode_request(),
        };
        self.sock.send_to(&b, self.server).unwrap();
        self.req
    }

    /// Send and wait for the reply with our request id (5 tries of 500 ms); a Retry's token
    /// is kept and the request sent again with it, as receivers do.
    pub fn request(&mut self, msg: Control) -> Control {
        for _ in 0..5 {
            let id = self.send(msg.clone());
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Some(b) = recv_until(&self.sock, deadline) {
                match Envelope::decode(&b) {
                    Ok(env) if env.req_id == id && env.receiver_id == self.rid => {
                        if let Control::Retry { token } = env.msg {
                            self.token = Some(token);
                            break;
                        }
                        if let Control::JoinOk { session_key, .. } = env.msg {
                            self.session_key = Some(session_key);
                        }
                        return env.msg;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if DataHeader::decode(&b).is_ok() {
                            self.data_seen += 1;
                        }
                    }
                }
            }
        }
        panic!("no reply to {msg:?} from {}", self.server);
    }
}

/// One datagram, or `None` at the deadline.
pub fn recv_until(sock: &UdpSocket, deadline: Instant) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_CONTROL_LEN + 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return Some(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => continue,
        }
    }
}

/// Datagrams arriving on `sock` for `dur`: (data-channel packets, any other datagrams).
pub fn count_arrivals(sock: &UdpSocket, dur: Duration) -> (u64, u64) {
    let deadline = Instant::now() + dur;
    let (mut data, mut other) = (0, 0);
    while let Some(b) = recv_until(sock, deadline) {
        if Envelope::decode(&b).is_err() && DataHeader::decode(&b).is_ok() {
            data += 1;
        } else {
            other += 1;
        }
    }
    (data, other)
}

/// Effective uid (from /proc; no libc dependency).
pub fn euid() -> Option<u32> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The `unshare` prefix for a private namespace of `kind` ("--net" or "--mount"): plain for
/// root, with a user namespace (`-r`) otherwise. `Err(reason)` when this host cannot do it.
pub fn namespace_prefix(kind: &str, tools: &[&str]) -> Result<Vec<String>, String> {
    for t in tools.iter().chain(&["unshare", "sh"]) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("`{t}` is not installed"));
        }
    }
    let prefix: Vec<String> = match euid() {
        Some(0) => vec!["unshare".into(), kind.into()],
        _ => vec!["unshare".into(), "-r".into(), kind.into()],
    };
    let ok = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(prefix)
    } else {
        Err(format!(
            "`{}` is not permitted here (uid {:?}; needs root or unprivileged user namespaces)",
            prefix.join(" "),
            euid()
        ))
    }
}

/// Namespace prefix, or `None` after printing why the test is skipped; in CI a missing
/// capability is a failure, not a skip.
pub fn namespace_or_skip(test: &str, kind: &str, tools: &[&str]) -> Option<Vec<String>> {
    match namespace_prefix(kind, tools) {
        Ok(p) => Some(p),
        Err(why) if in_ci() => panic!("{test}: cannot run in CI: {why}"),
        Err(why) => {
            println!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// The first of `tools` not on PATH, as a reason to skip.
pub fn missing_tool(tools: &[&str]) -> Option<String> {
    tools.iter().find_map(|tool| {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        (!ok).then(|| {
            format!("`{tool}` not installed (apt-get install nftables iproute2 util-linux)")
        })
    })
}

/// Outside CI a test that cannot run here skips with the reason; under CI ([`in_ci`]) it fails.
pub fn skip_or_fail(why: &str) {
    if in_ci() {
        panic!("CI: this test must run, but {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// The final `"event":"done"` JSON report in a receiver's stdout log (lines may carry a
/// prefix before the JSON, such as [`STAMP_LINES_PY`]'s arrival time).
pub fn done_report(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("{} has no done report:\n{text}", path.display()));
    serde_json::from_str(&line[line.find('{').unwrap_or(0)..]).unwrap()
}

/// A server directory for a test that runs `mcastd` itself (e.g. inside a namespace):
/// `mcastd.toml` with the store under `dir` plus `server_toml` as its `[server]` section, a
/// server identity, and `title` packed from `len` incompressible bytes. Returns the config path.
pub fn packed_server_dir(dir: &Path, server_toml: &str, title: &str, len: usize) -> PathBuf {
    let cfg = dir.join("mcastd.toml");
    fs::write(
        &cfg,
        format!(
            "[store]\narchive_dir = \"{0}/archives\"\nkey_dir = \"{0}/keys\"\n[server]\n{server_toml}\n",
            dir.display()
        ),
    )
    .unwrap();
    let input = dir.join(format!("{title}.bin"));
    fs::write(&input, random_bytes(len, 0x5eed)).unwrap();
    let input = input.to_str().unwrap().to_string();
    for args in [
        vec!["keygen"],
        vec!["pack", &input, "--title", title, "--compress", "none"],
    ] {
        let o = Command::new(mcastd_bin())
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    cfg
}

// ---- Crash loop and load test (tests/crash_loop.rs, tests/load.rs) ----

impl Receiver {
    /// The latest JSON progress line, if one arrived yet.
    pub fn last_progress(&self) -> Option<Value> {
        let lines = self.lines.lock().unwrap();
        lines.iter().rev().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["event"] == "progress").then_some(v)
        })
    }

    /// `Some(finished)` when the process has exited on its own, without waiting.
    pub fn try_finish(&mut self) -> Option<Finished> {
        let st = self.guard.child.try_wait().expect("try_wait")?;
        Some(self.finish(st.code()))
    }
}

impl Finished {
    /// The JSON progress lines of this run, in order.
    pub fn progress(&self) -> Vec<Value> {
        self.lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "progress")
            .collect()
    }
}

/// Stats from the control port directly (no process start, 100 ms per try), so polling a
/// server that is down or starting costs at most `limit`.
pub fn stats_within(server: SocketAddr, limit: Duration) -> Option<Value> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    let deadline = Instant::now() + limit;
    let rid = rand::random::<u64>();
    let mut req = 0u32;
    let mut token = None;
    while Instant::now() < deadline {
        req += 1;
        let b = Envelope::new(rid, req, Control::StatsRequest)
            .with_token(token)
            .encode_request();
        sock.send_to(&b, server).ok()?;
        let wait = (Instant::now() + Duration::from_millis(100)).min(deadline);
        while let Some(b) = recv_until(&sock, wait) {
            match Envelope::decode(&b) {
                Ok(Envelope {
                    req_id,
                    msg: Control::StatsReply { json },
                    ..
                }) if req_id == req => return serde_json::from_str(&json).ok(),
                // Our address is to be proven first: ask again at once with the token.
                Ok(Envelope {
                    req_id,
                    msg: Control::Retry { token: t },
                    ..
                }) if req_id == req => {
                    token = Some(t);
                    break;
                }
                _ => {}
            }
        }
    }
    None
}

/// Start `mcastd --config CFG serve`, appending its stderr to `log` (so the log of a server
/// that is killed and restarted keeps every run), and wait until it answers stats.
pub fn serve_appending(cfg: &Path, control: SocketAddr, log: &Path) -> Guard {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut g = Guard::spawn(
        Command::new(mcastd_bin())
            .arg("--config")
            .arg(cfg)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env_remove("MCASTD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f),
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            panic!(
                "mcastd exited at start-up ({st}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if stats_within(control, Duration::from_millis(100)).is_some() {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "mcastd did not answer on {control} within 20 s:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Files in `dir` (names, sorted).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---- Namespace bridge bed (tests/tiers.rs, tests/mixed_bed.rs) ----

/// One receiver's port on the bridge bed: a token bucket towards it (`rate_mbit`, 0 = none)
/// and random loss towards it (`loss_pct`, 0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct BedPort {
    pub rate_mbit: u32,
    pub loss_pct: u32,
}

/// The start of a shell script for `unshare --net --mount` (root) that builds the bridge bed:
/// a bridge with IGMP snooping and its own querier at IGMP version `igmp` (2 or 3; hosts are
/// forced to the same version), so a group reaches only ports whose host joined it, as on a
/// managed switch; namespace `srv` at 198.18.0.1 and `cI` at 198.18.0.1I (I = 1..9), each on a
/// veth port of the same name (the server's GSO bursts cut into datagrams as they leave it,
/// as on a wire); per port a `tc tbf` and an nftables bridge-family
/// `numgen random` drop as `ports` says. A Linux bridge floods every group to every port for
/// several seconds after it comes up (until its querier counts as present): the script ends
/// once a group nobody joined stops reaching c1, and writes how long that took to
/// `<dir>/bridge-ready.txt`. It leaves `set -eu` on.
pub fn bridge_bed_prelude(igmp: u8, ports: &[BedPort], dir: &str) -> String {
    assert!(matches!(igmp, 2 | 3), "IGMP version 2 or 3");
    assert!((1..=9).contains(&ports.len()), "1 to 9 receivers");
    let mut s = format!(
        r#"set -eu
mount -t tmpfs tmpfs /run
ip link set lo up
ip link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 1
ip addr add 198.18.0.254/24 dev br0
ip link set br0 type bridge mcast_query_use_ifaddr 1 mcast_querier 1 mcast_igmp_version {igmp}
ip link set br0 up
host() {{ # NAME PORT ADDR
  ip netns add "$1"
  ip link add "$2" type veth peer name eth0 netns "$1"
  ip link set "$2" master br0 up
  ip -n "$1" link set lo up
  ip netns exec "$1" sysctl -qw net.ipv4.conf.all.force_igmp_version={igmp}
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" route add 224.0.0.0/4 dev eth0
}}
host srv s0 198.18.0.1
# The server's UDP GSO bursts are cut into datagrams as they leave it, as a NIC does on a
# wire: a loss rule or a token bucket on the bridge then acts on datagrams, not 64 KB bursts.
ip -n srv link set dev eth0 gso_max_segs 1
"#
    );
    if ports.iter().any(|p| p.loss_pct > 0) {
        s += "nft add table bridge bed\n\
              nft add chain bridge bed loss '{ type filter hook forward priority 0; policy accept; }'\n";
    }
    for (i, p) in ports.iter().enumerate() {
        let n = i + 1;
        s += &format!("host c{n} c{n} 198.18.0.1{n}\n");
        if p.rate_mbit > 0 {
            s += &format!(
                "tc qdisc add dev c{n} root tbf rate {}mbit burst 64kb latency 50ms\n",
                p.rate_mbit
            );
        }
        if p.loss_pct > 0 {
            s += &format!(
                "nft add rule bridge bed loss oifname c{n} ether type ip numgen random mod 100 \
                 '<' {} counter drop\n",
                p.loss_pct
            );
        }
    }
    s += &format!(
        r#"txp() {{ ip -s link show c1 | awk '/TX:/{{getline; print $2}}'; }}
ready=0
for k in $(seq 1 40); do
  before=$(txp)
  ip netns exec srv python3 -c "
import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('198.18.0.1'))
[s.sendto(b'x',('239.255.1.1',5000)) for i in range(20)]"
  sleep 0.1
  if [ $(( $(txp) - before )) -lt 10 ]; then ready=1; break; fi
  sleep 0.4
done
[ $ready = 1 ] || {{ echo "the bridge still floods multicast after 20 s" >&2; exit 11; }}
echo "bridge filtering after $k checks" > "{dir}/bridge-ready.txt"
"#
    );
    s
}

/// Prefix each line of stdin with the arrival time (Unix seconds): `… | python3 -u -c "$X"`.
pub const STAMP_LINES_PY: &str =
    "import sys,time\nfor l in sys.stdin: print('%.3f %s' % (time.time(), l), end='', flush=True)";

/// From a receiver's `--json` output with arrival times ([`STAMP_LINES_PY`]): the longest
/// time (s) between consecutive increases of the units held, from the first unit held to the
/// `done` report (which counts as the last increase), or `None` when nothing was held.
/// Progress lines come every 250 ms, so the figure is good to about ±0.25 s.
pub fn longest_progress_stall(stamped: &str) -> Option<f64> {
    let (mut last, mut have, mut worst) = (None::<f64>, 0u64, 0f64);
    for line in stamped.lines() {
        let Some((t, json)) = line.split_once(' ') else {
            continue;
        };
        let (Ok(t), Ok(v)) = (t.parse::<f64>(), serde_json::from_str::<Value>(json)) else {
            continue;
        };
        let grew = match v["event"].as_str() {
            Some("progress") => {
                let h = v["have"].as_u64().unwrap_or(0);
                let grew = h > have;
                have = have.max(h);
                grew
            }
            Some("done") => last.is_some(),
            _ => false,
        };
        if grew {
            if let Some(l) = last {
                worst = worst.max(t - l);
            }
            last = Some(t);
        }
    }
    last.map(|_| worst)
}

/// Run a bed script ([`bridge_bed_prelude`] + the run) as root in a private network and mount
/// namespace, killed after `limit_s`; `Err` with its exit status and output when it fails.
pub fn run_bed_script(script: &str, limit_s: u32) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg(limit_s.to_string())
        .args(["unshare", "--net", "--mount", "--propagation", "private"])
        .args(["sh", "-c", script])
        .output()
        .unwrap();
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "bed run failed ({:?}): {}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A test's directory: removed with the returned guard, or kept (and its path printed) when
/// the environment variable `keep_env` is set.
pub fn test_dir(keep_env: &str) -> (Option<TempDir>, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os(keep_env).is_some() {
        let p = tmp.keep();
        println!("keeping {}", p.display());
        (None, p)
    } else {
        let p = tmp.path().to_path_buf();
        (Some(tmp), p)
    }
}
