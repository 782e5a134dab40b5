//! Hygiene against a hostile local environment (issue 20, item 10), with the real binaries:
//! the director's `genkey` never prints the key and writes only a new 0600 file; played and
//! unpacked plaintext is 0600 from its creation; a symbolic link planted at a download's part
//! path is refused and what it points to is untouched.
//!
//! Sites use `common::Site` numbers 120 and 121 (control ports 18800/18810, groups
//! 239.255.220-221.1, data ports 39000-39199), clear of the other test files. No assertion
//! depends on timing; waits are bounded only so that a broken build fails instead of hanging.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{director_bin, mcastd_bin, recv_bin, Site};

const MB: usize = 1 << 20;

/// Run to completion under umask 022 (so a file created without an explicit mode would be
/// 0644), killing the process after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let child = cmd
        .env_remove("RUST_LOG")
        .env_remove("MCASTD_CONFIG")
        .env_remove("MCAST_DIRECTOR_CONFIG")
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

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn genkey(args: &[&str]) -> Output {
    run(
        Command::new(director_bin()).arg("genkey").args(args),
        Duration::from_secs(30),
    )
}

fn mcastd(site: &Site, args: &[&str]) -> Output {
    run(
        Command::new(mcastd_bin())
            .arg("--config")
            .arg(&site.cfg)
            .args(args),
        Duration::from_secs(60),
    )
}

/// A file name in `dir` that starts with '.' (a temp file left behind).
fn hidden_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// `mcast-director genkey`: "-o -" and no -o are refused (nothing on stdout); a path gets a
/// new 0600 file holding 64 hex digits that appear on no output; an existing file is kept
/// unless --force, which replaces it through a new 0600 temp file; a symbolic link at the
/// path is never followed (refused without --force, replaced by a file with it).
#[test]
fn genkey_never_prints_the_key_and_writes_a_new_0600_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    for args in [&["-o", "-"][..], &["--output=-"][..], &[][..]] {
        let o = genkey(args);
        assert!(!o.status.success(), "genkey {args:?} succeeded: {o:?}");
        assert_eq!(o.status.code(), Some(2), "a usage error: {o:?}");
        assert!(o.stdout.is_empty(), "genkey {args:?} printed: {o:?}");
        if !args.is_empty() {
            assert!(
                text(&o.stderr).contains("file path"),
                "the error must say to give a file path: {}",
                text(&o.stderr)
            );
        }
    }

    let key = p("hb.key");
    let o = genkey(&["-o", key.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let k1 = fs::read_to_string(&key).unwrap();
    assert_eq!(k1.len(), 65, "{k1:?}");
    assert!(k1[..64].bytes().all(|b| b.is_ascii_hexdigit()) && k1.ends_with('\n'));
    assert_eq!(mode(&key), 0o600);
    assert!(o.stdout.is_empty(), "stdout: {}", text(&o.stdout));
    assert!(!text(&o.stderr).contains(&k1[..64]), "the key was printed");
    mcast::heartbeat::read_key(&key).unwrap();

    let o = genkey(&["-o", key.to_str().unwrap()]);
    assert!(!o.status.success(), "an existing key was replaced: {o:?}");
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    assert_eq!(fs::read_to_string(&key).unwrap(), k1);

    let o = genkey(&["-o", key.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{o:?}");
    let k2 = fs::read_to_string(&key).unwrap();
    assert_ne!(k2, k1, "--force must write a new key");
    assert_eq!(mode(&key), 0o600);
    assert!(o.stdout.is_empty() && !text(&o.stderr).contains(&k2[..64]));
    assert_eq!(hidden_files(dir.path()), Vec::<String>::new(), "temp left");

    // A symbolic link planted at the key path.
    let victim = p("victim");
    fs::write(&victim, b"precious").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    let link = p("link.key");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let o = genkey(&["-o", link.to_str().unwrap()]);
    assert!(!o.status.success(), "wrote through a link: {o:?}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    let o = genkey(&["-o", link.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious", "followed the link");
    assert_eq!(mode(&victim), 0o644);
    assert!(
        fs::symlink_metadata(&link).unwrap().is_file(),
        "link replaced"
    );
    assert_eq!(mode(&link), 0o600);
    mcast::heartbeat::read_key(&link).unwrap();
}

/// `mcast-recv play -o FILE` and `mcastd unpack -o FILE` write plaintext: 0600 even under
/// umask 022, and no temp file is left.
#[test]
fn played_and_unpacked_plaintext_is_0600() {
    let site = Site::new(120, "rate_mbps = 40.0");
    let db = site.path("tickets.sqlite");
    let mut cfg = fs::read_to_string(&site.cfg).unwrap();
    cfg.push_str(&format!("\n[tickets]\ndb = '{}'\n", db.display()));
    fs::write(&site.cfg, cfg).unwrap();
    let archive = site.pack("film", MB / 2, 120);

    let unpacked = site.path("unpacked.media");
    let o = mcastd(&site, &["unpack", "film", "-o", unpacked.to_str().unwrap()]);
    assert!(o.status.success(), "unpack: {o:?}");
    assert_eq!(fs::metadata(&unpacked).unwrap().len(), (MB / 2) as u64);
    assert_eq!(mode(&unpacked), 0o600, "unpacked plaintext");

    let ticket = site.path("box.ticket");
    let o = mcastd(
        &site,
        &[
            "ticket",
            "issue",
            "film",
            "--holder",
            "box-1",
            "-o",
            ticket.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "issue: {o:?}");
    let wallet = site.path("wallet");
    let played = site.path("played");
    fs::create_dir_all(&wallet).unwrap();
    fs::create_dir_all(&played).unwrap();
    fs::copy(&archive, wallet.join("film.mca")).unwrap();
    let _srv = site.serve();
    let out = played.join("film.out");
    let o = run(
        Command::new(recv_bin())
            .args(["play", "film", "--ticket"])
            .arg(&ticket)
            .arg("--dir")
            .arg(&wallet)
            .arg("-o")
            .arg(&out)
            .arg("--server")
            .arg(site.control.to_string()),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "play: {o:?}");
    assert_eq!(fs::read(&out).unwrap(), fs::read(&unpacked).unwrap());
    assert_eq!(mode(&out), 0o600, "played plaintext");
    assert_eq!(hidden_files(&played), Vec::<String>::new(), "temp left");
}

/// A symbolic link planted at `<out>/<title>.mca.part` (a shared download directory): `get`
/// refuses it with an error naming it, and the file it points to is untouched.
#[test]
fn a_symlink_at_the_part_path_is_refused() {
    let site = Site::new(121, "rate_mbps = 40.0");
    site.pack("film", MB / 2, 121);
    let _srv = site.serve();
    let out = site.path("out");
    fs::create_dir_all(&out).unwrap();
    let victim = site.path("victim");
    fs::write(&victim, b"precious").unwrap();
    let part = out.join("film.mca.part");
    std::os::unix::fs::symlink(&victim, &part).unwrap();
    let o = run(
        Command::new(recv_bin())
            .args(["get", "film", "--server"])
            .arg(site.control.to_string())
            .arg("-o")
            .arg(&out)
            .args(["--timeout", "30"]),
        Duration::from_secs(60),
    );
    assert!(!o.status.success(), "get wrote through a link: {o:?}");
    let err = text(&o.stderr);
    assert!(
        err.contains("symbolic link") && err.contains("film.mca.part"),
        "{err}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(fs::symlink_metadata(&part)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!out.join("film.mca").exists());
}
