//! systemd `Type=notify` as the units use it: the real `mcastd serve` and `mcast-director`
//! started with `NOTIFY_SOCKET` (a Unix datagram socket this test binds, as systemd does) and
//! `WATCHDOG_USEC` send `READY=1` once they serve, `WATCHDOG=1` pings from their loops,
//! `STATUS=` lines, and `STOPPING=1` on SIGTERM, then exit 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Guard, Site};

/// One second: pings every half second (the loops wake at least every 200 ms).
const WATCHDOG_USEC: &str = "1000000";
const LIMIT: Duration = Duration::from_secs(20);

/// The notification socket and every datagram received on it (its assignments), in order.
struct Manager {
    sock: UnixDatagram,
    seen: Vec<Vec<String>>,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let sock = UnixDatagram::bind(dir.join("notify.sock")).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.sock
            .local_addr()
            .unwrap()
            .as_pathname()
            .unwrap()
            .to_path_buf()
    }

    /// Reads until `done(all seen so far)` holds; panics with what was seen after [`LIMIT`]
    /// or when the process exits first.
    fn until(&mut self, what: &str, guard: &mut Guard, done: impl Fn(&[Vec<String>]) -> bool) {
        let deadline = Instant::now() + LIMIT;
        let mut buf = [0u8; 4096];
        while !done(&self.seen) {
            assert!(
                Instant::now() < deadline,
                "no {what} within {LIMIT:?}; got {:?}",
                self.seen
            );
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = std::str::from_utf8(&buf[..n]).expect("notifications are text");
                    self.seen.push(
                        text.lines()
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                    );
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(st) = guard.child.try_wait().unwrap() {
                        // Drain what it sent before exiting, then judge.
                        if !done(&self.seen) {
                            panic!("exited ({st}) before {what}; got {:?}", self.seen);
                        }
                    }
                }
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }
}

/// Whether any datagram carries `line`.
fn has(seen: &[Vec<String>], line: &str) -> bool {
    seen.iter().flatten().any(|l| l == line)
}

/// Datagrams carrying `line` after the one that said READY=1 (none before it).
fn after_ready(seen: &[Vec<String>], line: &str) -> usize {
    let Some(i) = seen.iter().position(|d| d.iter().any(|l| l == "READY=1")) else {
        return 0;
    };
    seen[i + 1..]
        .iter()
        .filter(|d| d.iter().any(|l| l == line))
        .count()
}

/// The last `STATUS=` sent.
fn last_status(seen: &[Vec<String>]) -> String {
    seen.iter()
        .flatten()
        .filter_map(|l| l.strip_prefix("STATUS="))
        .next_back()
        .expect("a STATUS= line")
        .to_string()
}

fn notified(cmd: &mut Command, mgr: &Manager) -> Guard {
    cmd.env("NOTIFY_SOCKET", mgr.path())
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Guard::spawn(cmd, false)
}

fn sigterm(guard: &Guard) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guard.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// Ready means serving (a stats request is answered at once), two or more watchdog pings come
/// after it, a status line names the titles, SIGTERM says STOPPING=1 and exits 0.
#[test]
fn mcastd_notifies_ready_watchdog_status_stopping() {
    let site = Site::new(130, "");
    site.pack("notify-a", 100_000, 130);
    let mut mgr = Manager::bind(site.dir.path());
    let log = site.path("mcastd.log");
    let mut srv = notified(
        Command::new(common::mcastd_bin())
            .arg("--config")
            .arg(&site.cfg)
            .arg("serve")
            .stderr(std::fs::File::create(&log).unwrap()),
        &mgr,
    );
    mgr.until("READY=1", &mut srv, |s| has(s, "READY=1"));
    // Readiness comes after the control socket is bound and the loop runs: it answers now.
    assert!(
        common::try_stats(site.control).is_some(),
        "READY=1 sent, but the control endpoint does not answer"
    );
    mgr.until("two WATCHDOG=1 after READY=1", &mut srv, |s| {
        after_ready(s, "WATCHDOG=1") >= 2
    });
    let readies = mgr
        .seen
        .iter()
        .flatten()
        .filter(|l| *l == "READY=1")
        .count();
    assert_eq!(readies, 1, "{:?}", mgr.seen);
    let status = last_status(&mgr.seen);
    assert!(status.contains("titles: 1,"), "{status}");
    assert!(!has(&mgr.seen, "STOPPING=1"), "{:?}", mgr.seen);
    sigterm(&srv);
    mgr.until("STOPPING=1", &mut srv, |s| has(s, "STOPPING=1"));
    let st = srv.wait_for(LIMIT).expect("mcastd exits after SIGTERM");
    assert!(
        st.success(),
        "{st}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The same for the director.
#[test]
fn director_notifies_ready_watchdog_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("heartbeat.key");
    let out = Command::new(env!("CARGO_BIN_EXE_mcast-director"))
        .arg("genkey")
        .arg("-o")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cfg = dir.path().join("director.toml");
    std::fs::write(
        &cfg,
        format!(
            "[director]\nlisten = \"127.0.0.1:0\"\nkey_file = '{}'\n",
            key.display()
        ),
    )
    .unwrap();
    let mut mgr = Manager::bind(dir.path());
    let mut d = notified(
        Command::new(env!("CARGO_BIN_EXE_mcast-director"))
            .arg("--config")
            .arg(&cfg)
            .stderr(Stdio::null()),
        &mgr,
    );
    mgr.until("READY=1", &mut d, |s| has(s, "READY=1"));
    mgr.until("two WATCHDOG=1 after READY=1", &mut d, |s| {
        after_ready(s, "WATCHDOG=1") >= 2
    });
    let status = last_status(&mgr.seen);
    assert!(status.contains("servers up: 0,"), "{status}");
    sigterm(&d);
    mgr.until("STOPPING=1", &mut d, |s| has(s, "STOPPING=1"));
    let st = d
        .wait_for(LIMIT)
        .expect("mcast-director exits after SIGTERM");
    assert!(st.success(), "{st}");
}
