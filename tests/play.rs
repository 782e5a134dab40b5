//! Play tickets end to end (DESIGN §2 "Play ticket", FIG. 10) with the real binaries on
//! loopback: `mcastd pack` → carousel → `mcast-recv get` → `mcastd ticket issue` →
//! `mcast-recv play`, plus raw `PlayRequest` datagrams to the server for the refusals a
//! well-behaved receiver would already catch locally.
//!
//! Each test has its own site (temp dir, config, control port 18600+10n, group pool
//! 239.254.(100+n).1, data ports 29000+100n), so the tests run in parallel with each other and
//! with the other test files. Every process is killed on drop and every wait is bounded.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mcast::process::unix_secs as unix_now;
use mcast::wire::control::{Control, ErrorCode};
use mcast_keys::seal::ReceiverKey;
use mcast_keys::ticket::{
    grant_signed_bytes, possession_proof, KeyPart, Ticket, TicketFile, TicketSpec,
};
use mcast_keys::{Identity, KeyStore, MasterKey};
use tempfile::TempDir;

const EXIT_NOT_FOUND: i32 = 5;
const EXIT_TICKET_REFUSED: i32 = 8;

mod common;
use common::{mcastd_bin, random_bytes, recv_bin, Guard};

/// Run a command to completion, killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One server with its directories, and the receiver's.
struct Site {
    dir: TempDir,
    cfg: PathBuf,
    control: SocketAddr,
    server_key: String,
}

impl Site {
    fn new(n: u16) -> Site {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mcast-play-{n}-"))
            .tempdir()
            .unwrap();
        let control: SocketAddr = format!("127.0.0.1:{}", 18600 + n * 10).parse().unwrap();
        let cfg = dir.path().join("mcastd.toml");
        let srv = dir.path().join("server");
        fs::write(
            &cfg,
            format!(
                "[store]\narchive_dir = '{}'\nkey_dir = '{}'\n\n\
                 [pack]\nframe_size = 262144\nsymbol_size = 1280\ncompress = \"none\"\n\n\
                 [server]\ncontrol = \"{control}\"\nmulticast_iface = \"127.0.0.1\"\n\
                 group_base = \"239.254.{}.1\"\nport_base = {}\nchannels = 4\nttl = 1\n\
                 rate_mbps = 400.0\n\n\
                 [tickets]\ndb = '{}'\n\n[log]\nlevel = \"info\"\n",
                srv.join("archives").display(),
                srv.join("keys").display(),
                100 + n,
                29000 + n * 100,
                srv.join("tickets.sqlite").display(),
            ),
        )
        .unwrap();
        for d in ["server", "recv", "wallet", "play"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let mut site = Site {
            dir,
            cfg,
            control,
            server_key: String::new(),
        };
        let out = site.mcastd(&["keygen"]);
        assert!(out.status.success(), "keygen: {out:?}");
        site.server_key = text(&out.stdout)
            .split_whitespace()
            .nth(2)
            .expect("keygen prints the key")
            .to_string();
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn keys(&self) -> KeyStore {
        KeyStore::open(self.path("server/keys")).unwrap()
    }

    fn mcastd(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(mcastd_bin())
                .arg("--config")
                .arg(&self.cfg)
                .args(args)
                .current_dir(self.dir.path())
                .env_remove("RUST_LOG")
                .env_remove("MCASTD_CONFIG"),
            Duration::from_secs(30),
        )
    }

    /// The common start: a site serving a random `len`-byte "film" that its receiver has
    /// already downloaded. Returns the site, the film's bytes and the server.
    fn with_film(n: u16, len: usize, seed: u64) -> (Site, Vec<u8>, Guard) {
        let site = Site::new(n);
        let media = random_bytes(len, seed);
        site.pack("film", &media);
        let srv = site.serve();
        site.get("film");
        (site, media, srv)
    }

    /// Pack `data` as `title`; returns the input file (kept to compare with).
    fn pack(&self, title: &str, data: &[u8]) -> PathBuf {
        self.pack_with(title, data, &[])
    }

    /// Pack with extra `mcastd pack` flags (`--advert --for film`, `--plugin`, ...).
    fn pack_with(&self, title: &str, data: &[u8], extra: &[&str]) -> PathBuf {
        let input = self.path(&format!("{title}.media"));
        fs::write(&input, data).unwrap();
        let mut args = vec!["pack", "--title", title, input.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.mcastd(&args);
        assert!(out.status.success(), "pack: {out:?}");
        input
    }

    /// `mcast-recv play` with any arguments after the title (`--ticket` optional).
    fn play_args(&self, title: &str, args: &[&str]) -> Output {
        run_bounded(
            Command::new(recv_bin())
                .args(["play", title, "--dir"])
                .arg(self.path("recv"))
                .arg("--server")
                .arg(self.control.to_string())
                .args(args)
                .env_remove("RUST_LOG"),
            Duration::from_secs(30),
        )
    }

    /// `mcastd ticket audit --json` lines.
    fn audit(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["ticket", "audit", "--json"];
        args.extend_from_slice(extra);
        let out = self.mcastd(&args);
        assert!(out.status.success(), "{out:?}");
        text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn serve(&self) -> Guard {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("server/mcastd.log"))
            .unwrap();
        let mut p = Guard::spawn(
            Command::new(mcastd_bin())
                .arg("--config")
                .arg(&self.cfg)
                .arg("serve")
                .current_dir(self.dir.path())
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
            false,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.stats().is_none() {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!(
                    "mcastd exited at start-up ({st}):\n{}",
                    fs::read_to_string(self.path("server/mcastd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "mcastd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// One control request over UDP (a few tries); `None` if there is no answer.
    /// One control request (`common::Ctl` matches the reply to the request id).
    fn request(&self, msg: Control) -> Control {
        common::Ctl::new(self.control, rand::random()).request(msg)
    }

    fn stats(&self) -> Option<serde_json::Value> {
        common::try_stats(self.control)
    }

    fn counter(&self, name: &str) -> u64 {
        common::counter(&common::stats(self.control), name)
    }

    /// Download `title` into recv/ over the carousel.
    fn get(&self, title: &str) {
        let out = run_bounded(
            Command::new(recv_bin())
                .args(["get", title, "--server"])
                .arg(self.control.to_string())
                .arg("-o")
                .arg(self.path("recv"))
                .args(["--server-key", &self.server_key, "--timeout", "40"])
                .env_remove("RUST_LOG"),
            Duration::from_secs(50),
        );
        assert!(out.status.success(), "get {title}: {out:?}");
        assert!(self.path(&format!("recv/{title}.mca")).exists());
    }

    /// `mcastd ticket issue`; returns the ticket file.
    fn issue(&self, title: &str, name: &str, extra: &[&str]) -> PathBuf {
        let file = self.path(&format!("wallet/{name}.ticket"));
        let mut args = vec![
            "ticket",
            "issue",
            title,
            "--holder",
            "viewer-1",
            "-o",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = self.mcastd(&args);
        assert!(out.status.success(), "ticket issue: {out:?}");
        assert!(text(&out.stdout).starts_with("ticket "), "{out:?}");
        file
    }

    fn play_cmd(&self, title: &str, ticket: &Path, out: &str) -> Command {
        let mut c = Command::new(recv_bin());
        c.args(["play", title, "--ticket"])
            .arg(ticket)
            .arg("--dir")
            .arg(self.path("recv"))
            .args(["-o", out, "--server"])
            .arg(self.control.to_string())
            .env_remove("RUST_LOG");
        c
    }

    /// `mcast-recv play` to `play/<out>` (or stdout for "-").
    fn play(&self, title: &str, ticket: &Path, out: &str) -> Output {
        let target = if out == "-" {
            "-".to_string()
        } else {
            self.path(&format!("play/{out}")).display().to_string()
        };
        run_bounded(
            &mut self.play_cmd(title, ticket, &target),
            Duration::from_secs(30),
        )
    }

    /// Files in play/ (outputs and any temp file a failed play left behind).
    fn play_dir(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path("play"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn ticket_row(&self, file: &Path) -> serde_json::Value {
        let id = TicketFile::from_file_bytes(&fs::read(file).unwrap())
            .unwrap()
            .ticket()
            .id_hex();
        let out = self.mcastd(&["ticket", "list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["ticket_id"] == id.as_str())
            .unwrap_or_else(|| panic!("ticket {id} not listed"))
    }
}

fn assert_refused(out: &Output, why: &str) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_TICKET_REFUSED),
        "expected exit 8 ({why}): {out:?}"
    );
    assert!(
        err.to_lowercase().contains(why),
        "stderr does not say {why:?}: {err}"
    );
}

/// Both key parts of a ticket, recomputed from the server's key store: A from the ticket
/// file, B = master XOR A.
fn parts_of(site: &Site, ticket: &Path) -> (KeyPart, KeyPart, MasterKey) {
    let tf = TicketFile::from_file_bytes(&fs::read(ticket).unwrap()).unwrap();
    let t = tf.ticket();
    let master = site.keys().title_key(&t.title, &t.archive_id).unwrap();
    let mut b = [0u8; 32];
    for (i, o) in b.iter_mut().enumerate() {
        *o = master.as_bytes()[i] ^ tf.part_a().as_bytes()[i];
    }
    (tf.part_a().clone(), KeyPart::from_bytes(b), master)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Files under `dirs` holding `secret`, raw or in hex; and how many files were read.
fn find_in(dirs: &[PathBuf], secret: &[u8]) -> (Vec<PathBuf>, usize) {
    let mut files = Vec::new();
    for d in dirs {
        files_under(d, &mut files);
    }
    let hexed = hex::encode(secret).into_bytes();
    let found = files
        .iter()
        .filter(|f| {
            let data = fs::read(f).unwrap();
            [secret, &hexed[..]]
                .iter()
                .any(|n| data.windows(n.len()).any(|w| w == *n))
        })
        .cloned()
        .collect();
    (found, files.len())
}

/// No file under `dirs` holds `secret`; returns the number of files scanned.
fn assert_nowhere(dirs: &[PathBuf], secret: &[u8], what: &str) -> usize {
    let (found, n) = find_in(dirs, secret);
    assert!(found.is_empty(), "{what} found in {found:?}");
    n
}

/// 1. pack → carousel → play: the plaintext is the input, to a file and to stdout; a second
///    ticket plays the file already on disk without a new download; the single-use ticket
///    is refused the second time; and no file of server or receiver holds a key part.
#[test]
fn pack_deliver_play_round_trip() {
    let (site, media, _srv) = Site::with_film(0, 3_000_017, 1);
    let input = site.path("film.media");
    let archive = site.path("recv/film.mca");
    let archive_meta = fs::metadata(&archive).unwrap();
    let joins = site.counter("joins");

    let t1 = site.issue("film", "t1", &[]);
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&t1).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "ticket file mode");
    let out = site.play("film", &t1, "film.out");
    assert!(out.status.success(), "play: {out:?}");
    assert!(
        fs::read(site.path("play/film.out")).unwrap() == fs::read(&input).unwrap(),
        "played file differs from the input"
    );

    // Single use: refused the second time, saying so, and nothing is written.
    let again = site.play("film", &t1, "again.out");
    assert_refused(&again, "already used");
    assert_eq!(site.play_dir(), vec!["film.out".to_string()]);

    // A new ticket plays the file on disk again, to stdout, without downloading it again.
    let t2 = site.issue("film", "t2", &["--plays", "3", "--expires", "30d"]);
    let out = site.play("film", &t2, "-");
    assert!(out.status.success(), "play to stdout: {out:?}");
    assert!(out.stdout == media, "stdout differs from the input");
    assert_eq!(site.counter("joins"), joins, "play must not join a channel");
    let now_meta = fs::metadata(&archive).unwrap();
    assert_eq!(
        (now_meta.len(), now_meta.modified().unwrap()),
        (archive_meta.len(), archive_meta.modified().unwrap()),
        "archive on disk was rewritten"
    );
    let row = site.ticket_row(&t2);
    assert_eq!(
        (row["plays_left"].as_u64(), row["state"].as_str()),
        (Some(2), Some("valid"))
    );
    let row = site.ticket_row(&t1);
    assert_eq!(
        (row["plays_left"].as_u64(), row["state"].as_str()),
        (Some(0), Some("used"))
    );

    // No file the server or the receiver wrote holds either part (or the key): the ticket
    // database and its WAL, the server log, the downloaded archive, the plaintext outputs.
    let dirs = [site.path("server"), site.path("recv"), site.path("play")];
    let mut scanned = 0;
    for t in [&t1, &t2] {
        let (a, b, master) = parts_of(&site, t);
        scanned = assert_nowhere(&dirs, a.as_bytes(), "part A");
        assert_nowhere(&dirs, b.as_bytes(), "part B");
        // The master key lives in the key store only (which also shows the scan finds what
        // is there).
        assert_nowhere(
            &[site.path("recv"), site.path("play")],
            master.as_bytes(),
            "the master key",
        );
        let (found, _) = find_in(&dirs, master.as_bytes());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with(site.path("server/keys/titles")));
    }
    assert!(
        site.path("server/tickets.sqlite").exists() && scanned >= 5,
        "scan covered {scanned} files"
    );
}

/// 2. Twenty receivers present one single-use ticket at once: exactly one plays.
#[test]
fn single_use_ticket_plays_exactly_once_under_concurrency() {
    let (site, media, _srv) = Site::with_film(1, 700_001, 2);
    let t = site.issue("film", "once", &[]);

    let children: Vec<Guard> = (0..20)
        .map(|i| {
            let out = site.path(&format!("play/out{i}")).display().to_string();
            Guard::spawn(
                site.play_cmd("film", &t, &out)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
                false,
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut codes = Vec::new();
    for mut p in children {
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                codes.push((st.code(), err));
                break;
            }
            assert!(Instant::now() < deadline, "a play did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let wins = codes.iter().filter(|(c, _)| *c == Some(0)).count();
    assert_eq!(wins, 1, "{codes:#?}");
    for (c, err) in codes.iter().filter(|(c, _)| *c != Some(0)) {
        assert_eq!(*c, Some(EXIT_TICKET_REFUSED), "{err}");
        assert!(err.contains("already used"), "{err}");
    }
    let outs = site.play_dir();
    assert_eq!(outs.len(), 1, "exactly one output, no temp files: {outs:?}");
    assert!(fs::read(site.path(&format!("play/{}", outs[0]))).unwrap() == media);
    let row = site.ticket_row(&t);
    assert_eq!(
        (row["plays_left"].as_u64(), row["grants"].as_u64()),
        (Some(0), Some(1))
    );
}

/// Write a ticket file for `tf` into the wallet.
fn write_ticket(site: &Site, name: &str, tf: &TicketFile) -> PathBuf {
    let p = site.path(&format!("wallet/{name}.ticket"));
    fs::write(&p, tf.to_armor().as_bytes()).unwrap();
    p
}

/// A copy of a ticket file with its signed part changed by `f` (signature left as it was).
fn tampered(site: &Site, src: &Path, name: &str, f: impl FnOnce(&mut Ticket)) -> PathBuf {
    let tf = TicketFile::from_file_bytes(&fs::read(src).unwrap()).unwrap();
    let mut t = tf.ticket().clone();
    f(&mut t);
    let mut bytes = t.encode();
    bytes.extend_from_slice(tf.part_a().as_bytes());
    write_ticket(site, name, &TicketFile::decode(&bytes).unwrap())
}

/// 3. Expired, revoked, forged, tampered and wrong-title tickets are refused with a message
///    that says why; nothing is decrypted, no play is used, nothing is left at OUT.
#[test]
fn bad_tickets_are_refused_and_leave_nothing() {
    let site = Site::new(2);
    site.pack("film", &random_bytes(600_000, 3));
    site.pack("trailer", &random_bytes(100_000, 4));
    let _srv = site.serve();
    site.get("film");
    site.get("trailer");
    let head = mcast::archive::ArchiveFile::open(&site.path("recv/film.mca"))
        .unwrap()
        .head;

    let expired = site.issue("film", "expired", &["--expires", "1s"]);
    let revoked = site.issue("film", "revoked", &["--plays", "2"]);
    let good = site.issue("film", "good", &[]);
    let for_trailer = site.issue("trailer", "trailer", &[]);
    let id = |p: &Path| {
        TicketFile::from_file_bytes(&fs::read(p).unwrap())
            .unwrap()
            .ticket()
            .id_hex()
    };
    let out = site.mcastd(&["ticket", "revoke", &id(&revoked)[..10]]);
    assert!(
        out.status.success() && text(&out.stdout).contains("revoked"),
        "{out:?}"
    );

    // Forged: issued by another identity for this very archive; and the same claiming to be
    // from the real server (bad signature).
    let forger = Identity::generate();
    let spec = TicketSpec {
        title: "film".into(),
        archive_id: head.archive_id,
        holder: "mallory".into(),
        plays: 100,
        expires_unix: 0,
        issued_unix: unix_now(),
    };
    let (forged, _) = Ticket::issue(&forger, &MasterKey::generate(), &spec).unwrap();
    let forged_file = write_ticket(&site, "forged", &forged);
    let server_pub = head.server_key;
    let forged_as_server = tampered(&site, &forged_file, "forged-as-server", |t| {
        t.server_key = server_pub
    });
    // Tampered: more plays, another holder, or another part A than the server signed.
    let more_plays = tampered(&site, &good, "more-plays", |t| t.plays = 50);
    let other_holder = tampered(&site, &good, "other-holder", |t| t.holder = "eve".into());
    let other_part = {
        let tf = TicketFile::from_file_bytes(&fs::read(&good).unwrap()).unwrap();
        let mut bytes = tf.encode();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        write_ticket(&site, "other-part", &TicketFile::decode(&bytes).unwrap())
    };

    // Let the 1 s ticket expire.
    let exp = TicketFile::from_file_bytes(&fs::read(&expired).unwrap())
        .unwrap()
        .ticket()
        .expires_unix;
    while unix_now() < exp {
        std::thread::sleep(Duration::from_millis(50));
    }

    for (ticket, why) in [
        (&expired, "expired"),
        (&revoked, "revoked"),
        (&forged_file, "issued by server"),
        (&forged_as_server, "forged or modified"),
        (&more_plays, "forged or modified"),
        (&other_holder, "forged or modified"),
        (&other_part, "was modified"),
        (&for_trailer, "not for this title"),
    ] {
        for out_name in ["x.out", "-"] {
            let out = site.play("film", ticket, out_name);
            assert_refused(&out, why);
            assert!(out.stdout.is_empty(), "plaintext on stdout: {why}");
        }
        assert!(
            site.play_dir().is_empty(),
            "{why}: left {:?}",
            site.play_dir()
        );
    }
    // The refused tickets kept their plays; the good one still works after all that.
    for (t, left) in [(&expired, 1), (&revoked, 2), (&good, 1), (&for_trailer, 1)] {
        assert_eq!(site.ticket_row(t)["plays_left"].as_u64(), Some(left));
    }
    let out = site.play("film", &good, "good.out");
    assert!(out.status.success(), "{out:?}");

    // A ticket with no archive on disk: exit 5, nothing used.
    let absent = site.issue("trailer", "absent", &[]);
    fs::remove_file(site.path("recv/trailer.mca")).unwrap();
    let out = site.play("trailer", &absent, "t.out");
    assert_eq!(out.status.code(), Some(EXIT_NOT_FOUND), "{out:?}");
    assert_eq!(site.ticket_row(&absent)["plays_left"].as_u64(), Some(1));
}

/// 3b. The server's own refusals, for requests a receiver would not send (raw datagrams):
///     each says why, and a repeated request with the same receiver key gets its grant again
///     without using a second play.
#[test]
fn server_refuses_bad_play_requests_and_repeats_grants() {
    let site = Site::new(3);
    site.pack("film", &random_bytes(50_000, 5));
    let _srv = site.serve();
    let good = site.issue("film", "good", &[]);
    let expired = site.issue("film", "expired", &["--expires", "1s"]);
    let revoked = site.issue("film", "revoked", &[]);
    let rid = TicketFile::from_file_bytes(&fs::read(&revoked).unwrap())
        .unwrap()
        .ticket()
        .id_hex();
    assert!(site.mcastd(&["ticket", "revoke", &rid]).status.success());
    let signed = |p: &Path| {
        TicketFile::from_file_bytes(&fs::read(p).unwrap())
            .unwrap()
            .ticket()
            .encode()
    };
    // Signed by the server but never recorded: unknown.
    let ks = site.keys();
    let good_t = TicketFile::from_file_bytes(&fs::read(&good).unwrap()).unwrap();
    let spec = TicketSpec {
        title: "film".into(),
        archive_id: good_t.ticket().archive_id,
        holder: "x".into(),
        plays: 1,
        expires_unix: 0,
        issued_unix: 1,
    };
    let (unknown, _) =
        Ticket::issue(&ks.identity().unwrap(), &MasterKey::generate(), &spec).unwrap();
    let (foreign, _) = Ticket::issue(&Identity::generate(), &MasterKey::generate(), &spec).unwrap();
    let mut tampered = signed(&good);
    tampered[30] ^= 1; // inside the archive id
    let exp = TicketFile::from_file_bytes(&fs::read(&expired).unwrap())
        .unwrap()
        .ticket()
        .expires_unix;
    while unix_now() < exp {
        std::thread::sleep(Duration::from_millis(50));
    }

    // One client whose address is proven: its play requests' proofs are bound to its token.
    let mut ctl = common::Ctl::new(site.control, rand::random());
    assert!(matches!(
        ctl.request(Control::CatalogRequest { start: 0 }),
        Control::CatalogReply { .. }
    ));
    let token = ctl.token.expect("an address token");
    // Each request proves the part A of `prover` (a holder's ticket file).
    let mut play = |title: &str, ticket: Vec<u8>, key: &ReceiverKey, prover: &TicketFile| {
        let id = prover.ticket().ticket_id;
        let proof = possession_proof(prover.part_a(), &id, &key.public(), title, &token);
        ctl.request(Control::PlayRequest {
            title: title.into(),
            ticket,
            receiver_pub: key.public(),
            proof,
        })
    };
    let file = |p: &Path| TicketFile::from_file_bytes(&fs::read(p).unwrap()).unwrap();
    let k = ReceiverKey::generate();
    for (title, ticket, prover, why) in [
        ("film", signed(&expired), file(&expired), "expired"),
        ("film", signed(&revoked), file(&revoked), "revoked"),
        (
            "film",
            unknown.ticket().encode(),
            unknown.clone(),
            "unknown ticket",
        ),
        (
            "film",
            foreign.ticket().encode(),
            foreign.clone(),
            "another server",
        ),
        ("film", tampered.clone(), good_t.clone(), "bad signature"),
        ("other", signed(&good), good_t.clone(), "not for this title"),
        (
            "film",
            b"MCTK\x01garbage".to_vec(),
            good_t.clone(),
            "malformed",
        ),
    ] {
        match play(title, ticket, &k, &prover) {
            Control::Error {
                code: ErrorCode::TicketRefused,
                message,
            } => assert!(message.contains(why), "{why}: {message}"),
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
    }

    // The signed ticket without part A (copied or overheard): the proof does not check, no
    // play is used.
    let bytes = signed(&good);
    let copied = site.request(Control::PlayRequest {
        title: "film".into(),
        ticket: bytes.clone(),
        receiver_pub: ReceiverKey::generate().public(),
        proof: [0x11; 32],
    });
    assert!(
        matches!(&copied, Control::Error { code: ErrorCode::TicketRefused, message } if message.contains("key part")),
        "{copied:?}"
    );
    assert_eq!(site.ticket_row(&good)["plays_left"].as_u64(), Some(1));
    // A lost reply: the same request again gets a grant again; the play is used once. Each
    // grant is signed by the server identity over the ticket, the receiver key and the part.
    let server_key = ks.identity().unwrap().public();
    let mut grants = Vec::new();
    for _ in 0..3 {
        match play("film", bytes.clone(), &k, &good_t) {
            Control::PlayGrant {
                ticket_id,
                sealed_part,
                signature,
            } => {
                let signed = grant_signed_bytes(&ticket_id, &k.public(), &sealed_part);
                server_key.verify(&signed, &signature).unwrap();
                let other = grant_signed_bytes(&ticket_id, &[0; 32], &sealed_part);
                assert!(server_key.verify(&other, &signature).is_err());
                grants.push(k.open_part(&ticket_id, &sealed_part).unwrap())
            }
            other => panic!("expected a grant, got {other:?}"),
        }
    }
    assert!(grants.windows(2).all(|w| w[0] == w[1]));
    let (_, b, _) = parts_of(&site, &good);
    assert_eq!(grants[0], b, "the grant is part B");
    let row = site.ticket_row(&good);
    assert_eq!(
        (row["plays_left"].as_u64(), row["grants"].as_u64()),
        (Some(0), Some(1))
    );
    // Another key: used up.
    match play("film", bytes, &ReceiverKey::generate(), &good_t) {
        Control::Error { message, .. } => assert!(message.contains("already used"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// 4. After a server restart (kill -9), used tickets stay used and valid ones still work.
#[test]
fn restart_keeps_used_tickets_used() {
    let (site, media, srv) = Site::with_film(4, 500_000, 6);
    let used = site.issue("film", "used", &[]);
    let fresh = site.issue("film", "fresh", &[]);
    let twice = site.issue("film", "twice", &["--plays", "2"]);
    assert!(site.play("film", &used, "1.out").status.success());
    assert!(site.play("film", &twice, "2.out").status.success());

    drop(srv); // SIGKILL: no clean shutdown
    let _srv = site.serve();
    assert_refused(&site.play("film", &used, "3.out"), "already used");
    let out = site.play("film", &fresh, "4.out");
    assert!(out.status.success(), "{out:?}");
    assert!(fs::read(site.path("play/4.out")).unwrap() == media);
    assert!(site.play("film", &twice, "5.out").status.success());
    assert_refused(&site.play("film", &twice, "6.out"), "already used");
    assert_eq!(
        site.play_dir(),
        vec!["1.out", "2.out", "4.out", "5.out"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    for t in [&used, &fresh, &twice] {
        let (a, b, _) = parts_of(&site, t);
        let dirs = [site.path("server"), site.path("recv"), site.path("play")];
        assert_nowhere(&dirs, a.as_bytes(), "part A");
        assert_nowhere(&dirs, b.as_bytes(), "part B");
    }
}

/// `mcastd ticket` usage errors and listing.
#[test]
fn ticket_commands_report_bad_input() {
    let site = Site::new(5);
    site.pack("film", &random_bytes(20_000, 7));
    let out = site.mcastd(&["ticket", "issue", "nosuch", "--holder", "a"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("no archive of title \"nosuch\""),
        "{out:?}"
    );
    let out = site.mcastd(&[
        "ticket",
        "issue",
        "film",
        "--holder",
        "a",
        "--expires",
        "soon",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--expires"), "{out:?}");
    let out = site.mcastd(&["ticket", "issue", "film", "--holder", "a", "--plays", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = site.mcastd(&["ticket", "revoke", "0123456789abcdef"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no ticket with id"), "{out:?}");
    let t = site.issue("film", "a", &["--plays", "4", "--expires", "12h"]);
    let list = text(&site.mcastd(&["ticket", "list"]).stdout);
    assert!(
        list.contains("film") && list.contains("4/4") && list.contains("valid"),
        "{list}"
    );
    // The file name is taken: refuse rather than overwrite a ticket.
    let out = site.mcastd(&[
        "ticket",
        "issue",
        "film",
        "--holder",
        "b",
        "-o",
        t.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("already exists"), "{out:?}");
    // The refused issue left no ticket behind.
    let n = text(&site.mcastd(&["ticket", "list", "--json"]).stdout)
        .lines()
        .count();
    assert_eq!(n, 1);
}

/// 7. Adverts by association (FIG. 3): a leader and a trailer signed as going with "film"
///    arrive with one `get film`; `play film` writes leader, film, trailer on one ticket use,
///    and the audit log has that one grant with its holder. An advert whose signed head names
///    another film is not played with it, even when on disk; adverts and plug-ins play
///    without a ticket; a missing advert only warns.
#[test]
fn adverts_play_around_their_film_on_one_ticket() {
    let site = Site::new(6);
    let film = site.pack_with(
        "film",
        &random_bytes(600_011, 71),
        &["--watermark", "studio-7"],
    );
    let lead = site.pack_with(
        "ad-lead",
        &random_bytes(70_001, 72),
        &["--advert", "--for", "film,other-film"],
    );
    let trail = site.pack_with(
        "ad-trail",
        &random_bytes(50_003, 73),
        &["--advert", "--for", "film", "--trailer"],
    );
    let other = site.pack_with(
        "ad-other",
        &random_bytes(40_009, 74),
        &["--advert", "--for", "other-film"],
    );
    let codec = site.pack_with("codec", &random_bytes(30_011, 75), &["--plugin"]);
    // Associations belong to adverts; plug-ins carry no watermark.
    let out = site.mcastd(&[
        "pack",
        "--title",
        "x",
        film.to_str().unwrap(),
        "--for",
        "film",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = site.mcastd(&[
        "pack",
        "--title",
        "x",
        film.to_str().unwrap(),
        "--plugin",
        "--watermark",
        "w",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let cat = text(&site.mcastd(&["catalog"]).stdout);
    assert!(
        cat.contains("trailer:film")
            && cat.contains("leader:film,other-film")
            && cat.contains("plugin"),
        "{cat}"
    );
    let _srv = site.serve();

    // The receiver's catalogue lists kinds and associations (as the server says them).
    let out = run_bounded(
        Command::new(recv_bin())
            .args(["catalog", "--server", &site.control.to_string()])
            .env_remove("RUST_LOG"),
        Duration::from_secs(20),
    );
    let cat = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // Off a terminal: one JSON object per title.
    let items: Vec<serde_json::Value> = cat
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let item = |t: &str| {
        items
            .iter()
            .find(|i| i["title"] == t)
            .unwrap_or_else(|| panic!("{cat}"))
    };
    assert_eq!(
        item("ad-lead")["advert_for"],
        serde_json::json!(["film", "other-film"])
    );
    assert_eq!(item("ad-lead")["trailer"], false);
    assert_eq!(item("ad-trail")["advert_for"], serde_json::json!(["film"]));
    assert_eq!(item("ad-trail")["trailer"], true);
    assert_eq!(item("codec")["plugin"], true);
    assert_eq!(item("film")["watermark_unverified"], "studio-7");

    // One `get film` brings the film and its two adverts, not the other film's.
    site.get("film");
    for t in ["film", "ad-lead", "ad-trail"] {
        assert!(
            site.path(&format!("recv/{t}.mca")).exists(),
            "{t} not fetched"
        );
    }
    assert!(!site.path("recv/ad-other.mca").exists());
    // Again: the adverts on disk are not fetched a second time.
    let joins = site.counter("joins");
    site.get("film");
    assert_eq!(
        site.counter("joins"),
        joins + 1,
        "only the film joined again"
    );
    // The other film's advert on disk (fetched by hand) must not play with "film".
    site.get("ad-other");

    let t = site.issue("film", "adverts", &["--plays", "2"]);
    let out = site.play("film", &t, "with-ads.out");
    assert!(out.status.success(), "play: {out:?}");
    let mut want = fs::read(&lead).unwrap();
    want.extend(fs::read(&film).unwrap());
    want.extend(fs::read(&trail).unwrap());
    assert!(
        fs::read(site.path("play/with-ads.out")).unwrap() == want,
        "output is not leader + film + trailer"
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("leader adverts [ad-lead], trailer adverts [ad-trail]")
            && said.contains("owner (signed): studio-7"),
        "{said}"
    );
    // One play used for the three archives, and the audit log says who played it from where.
    let row = site.ticket_row(&t);
    assert_eq!(
        (row["plays_left"].as_u64(), row["grants"].as_u64()),
        (Some(1), Some(1))
    );
    let audit = site.audit(&["--title", "film"]);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["outcome"], "granted");
    assert_eq!(audit[0]["holder"], "viewer-1");
    assert_eq!(audit[0]["plays_left"], 1);
    assert!(
        audit[0]["receiver"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{audit:?}"
    );
    assert!(audit[0]["at_unix"].as_u64().unwrap() + 60 > unix_now());
    let table = text(&site.mcastd(&["ticket", "audit"]).stdout);
    assert!(
        table.contains("viewer-1") && table.contains("granted"),
        "{table}"
    );
    assert!(unix_now() > 0 && !other.as_os_str().is_empty());

    // The JSON report names the adverts and the signed watermark.
    fs::remove_file(site.path("recv/ad-trail.mca")).unwrap();
    let out = site.play_args(
        "film",
        &[
            "--ticket",
            t.to_str().unwrap(),
            "-o",
            site.path("play/no-trailer.out").to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["leaders"], serde_json::json!(["ad-lead"]));
    assert_eq!(r["trailers"], serde_json::json!([]));
    assert_eq!(r["missing_adverts"], serde_json::json!(["ad-trail"]));
    assert_eq!(r["watermark"], "studio-7");
    // The missing trailer: the film plays with its leader, and the user is told.
    let mut want = fs::read(&lead).unwrap();
    want.extend(fs::read(&film).unwrap());
    assert!(fs::read(site.path("play/no-trailer.out")).unwrap() == want);
    assert!(text(&out.stderr).contains("ad-trail"), "{out:?}");
    assert_eq!(site.ticket_row(&t)["plays_left"].as_u64(), Some(0));
    assert_eq!(site.audit(&["--title", "film", "--limit", "10"]).len(), 2);

    // An advert plays alone, without a ticket; so does a plug-in.
    let out = site.play_args(
        "ad-lead",
        &["-o", site.path("play/ad.out").to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(fs::read(site.path("play/ad.out")).unwrap() == fs::read(&lead).unwrap());
    assert!(
        text(&out.stdout).contains("advert played without a ticket"),
        "{out:?}"
    );
    site.get("codec");
    let out = site.play_args(
        "codec",
        &[
            "-o",
            site.path("play/codec.out").to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(fs::read(site.path("play/codec.out")).unwrap() == fs::read(&codec).unwrap());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["kind"].as_str(), r["ticket_id"].as_str()),
        (Some("plugin"), Some(""))
    );
    // The film still needs one, and says so; tickets for adverts are refused at issue.
    let out = site.play_args(
        "film",
        &["-o", site.path("play/none.out").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--ticket"), "{out:?}");
    let out = site.mcastd(&["ticket", "issue", "ad-lead", "--holder", "h"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("without a ticket"),
        "{out:?}"
    );
    // No ticket use besides the two film plays.
    let audit = site.audit(&[]);
    assert_eq!(
        audit.iter().filter(|e| e["outcome"] == "granted").count(),
        2,
        "{audit:?}"
    );
}
