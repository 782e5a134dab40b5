//! The Debian package: `packaging/build-deb.sh` (cargo-deb on the already built release
//! binaries) makes `mcast_<version>_<arch>.deb`; it is installed with a real `dpkg -i` into a
//! fresh root (`dpkg --root`, maintainer scripts run outside a chroot with `DPKG_ROOT` set:
//! `--force-script-chrootless`), and what it installed is checked: the programs run, manual
//! pages and completions are where man and the shells look, the postinst made the `mcast`
//! user and /var/lib/mcast inside that root, the configs are conffiles, and
//! `systemd-analyze verify --root` passes the units with no warning (their ExecStart= binaries
//! resolve inside the root, their man: pages too).
//!
//! Needs cargo-deb, dpkg, systemd-analyze and systemd-sysusers, root, and release binaries
//! (`cargo build --release --workspace --bins`, as CI does first): under `CI=true` a missing
//! one fails the test, elsewhere it is skipped with the reason.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mcast::config::{Config, DirectorConfig};

const BINS: [&str; 3] = ["mcastd", "mcast-director", "mcast-recv"];
const UNITS: [&str; 4] = [
    "mcastd.service",
    "mcast-director.service",
    "mcast-recv-batch.service",
    "mcast-recv-batch.timer",
];
/// Each installed program stays under this (README: release binaries).
const MAX_BIN_BYTES: u64 = 15 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Why this host cannot build and install the package, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !cargo_deb {
        return Some("cargo-deb is not installed (cargo install cargo-deb --locked)".into());
    }
    if let Some(why) = common::missing_tool(&[
        "dpkg",
        "dpkg-deb",
        "systemd-analyze",
        "systemd-sysusers",
        "systemd-tmpfiles",
        "gzip",
    ]) {
        return Some(format!("{why}; apt-get install dpkg systemd gzip"));
    }
    if common::euid() != Some(0) {
        return Some("not root: dpkg cannot install files owned by root and the mcast user".into());
    }
    let release = common::mcastd_bin();
    if release.parent().and_then(Path::file_name) != Some("release".as_ref()) {
        return Some(format!(
            "{} is not a release build: run cargo test --release",
            release.display()
        ));
    }
    None
}

/// The configs the package installs in /etc/mcast load, and put the server's state in
/// /var/lib/mcast (where the unit's StateDirectory and the tmpfiles entry make it).
#[test]
fn packaged_configs_load() {
    let cfg = Config::load(Some(&repo().join("packaging/etc/mcastd.toml")))
        .unwrap_or_else(|e| panic!("packaging/etc/mcastd.toml: {e}"));
    for p in [&cfg.store.archive_dir, &cfg.store.key_dir, &cfg.tickets.db] {
        assert!(p.starts_with("/var/lib/mcast/"), "{}", p.display());
    }
    let d = DirectorConfig::load(Some(&repo().join("packaging/etc/director.toml")))
        .unwrap_or_else(|e| panic!("packaging/etc/director.toml: {e}"));
    assert_eq!(d.director.key_file, Path::new("/etc/mcast/heartbeat.key"));
    // The units run the installed programs with these files.
    for (unit, exec) in [
        (
            "mcastd.service",
            "ExecStart=/usr/bin/mcastd --config /etc/mcast/mcastd.toml serve",
        ),
        (
            "mcast-director.service",
            "ExecStart=/usr/bin/mcast-director --config /etc/mcast/director.toml serve",
        ),
        (
            "mcast-recv-batch.service",
            "ExecStart=/usr/bin/mcast-recv batch",
        ),
    ] {
        let text = fs::read_to_string(repo().join("conf/systemd").join(unit)).unwrap();
        assert!(text.contains(exec), "{unit} lacks {exec:?}");
    }
}

#[test]
fn deb_installs_and_its_units_verify() {
    if let Some(why) = missing_prerequisite() {
        common::skip_or_fail(&format!("deb_installs_and_its_units_verify: {why}"));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let release_dir = common::mcastd_bin().parent().unwrap().to_path_buf();
    let target_dir = release_dir.parent().unwrap();

    // Build: the release binaries as they are (no cargo build inside a test).
    let out = ok(Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .current_dir(repo())
        .env("MCAST_DEB_NO_BUILD", "1")
        .env("MCAST_DEB_FAST", "1")
        .env("MCAST_DEB_OUTPUT", format!("{}/", tmp.path().display()))
        .env("CARGO_TARGET_DIR", target_dir));
    let deb = PathBuf::from(
        out.lines()
            .last()
            .expect("build-deb.sh prints the .deb path"),
    );
    assert!(
        deb.starts_with(tmp.path()) && deb.is_file(),
        "{}",
        deb.display()
    );
    let info = ok(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(info.contains("Package: mcast\n"), "{info}");

    // Install into a fresh root: dpkg needs its database there (status, info, updates).
    let root = tmp.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    // --force-depends: the empty root has no libc6 or systemd packages to satisfy Depends.
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&deb));
    let status = ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "mcast"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    for conffile in ["/etc/mcast/mcastd.toml", "/etc/mcast/director.toml"] {
        assert!(
            status
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{conffile} "))),
            "{conffile} is not a conffile:\n{status}"
        );
    }

    // The programs, under 15 MB each, run from where they were installed.
    for b in BINS {
        let p = root.join("usr/bin").join(b);
        let m = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            m.permissions().mode() & 0o111 != 0,
            "{} not executable",
            p.display()
        );
        assert!(
            m.len() < MAX_BIN_BYTES,
            "{} is {} bytes",
            p.display(),
            m.len()
        );
        let help = ok(Command::new(&p).arg("--help").env_remove("MCASTD_CONFIG"));
        assert!(help.contains("completions"), "{b} --help:\n{help}");
    }
    let help = ok(Command::new(root.join("usr/bin/mcastd")).arg("--help"));
    assert!(
        help.contains("keygen") && help.contains("Exit status"),
        "{help}"
    );

    // Manual pages (gzipped, where man looks) and completions (where each shell looks).
    for page in [
        "mcastd",
        "mcastd-serve",
        "mcastd-ticket-issue",
        "mcast-director",
        "mcast-recv",
        "mcast-recv-batch",
    ] {
        let gz = root.join(format!("usr/share/man/man1/{page}.1.gz"));
        let text = ok(Command::new("gzip").arg("-dc").arg(&gz));
        assert!(
            text.contains(".TH"),
            "{} is not a manual page",
            gz.display()
        );
        let name = page.split('-').next_back().unwrap();
        assert!(text.contains(name), "{} does not name {name}", gz.display());
    }
    assert!(!root.join("usr/share/man/man1/mcastd-man.1.gz").exists());
    for b in BINS {
        for (dir, file) in [
            ("usr/share/bash-completion/completions", b.to_string()),
            ("usr/share/zsh/vendor-completions", format!("_{b}")),
            ("usr/share/fish/vendor_completions.d", format!("{b}.fish")),
        ] {
            let p = root.join(dir).join(file);
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(text.contains(b), "{}", p.display());
        }
    }
    let bash =
        fs::read_to_string(root.join("usr/share/bash-completion/completions/mcastd")).unwrap();
    assert!(
        bash.contains("keygen") && bash.contains("--config"),
        "{bash}"
    );

    // The postinst made the mcast user and its 0700 state directory inside the root.
    let passwd = fs::read_to_string(root.join("etc/passwd")).expect("postinst wrote etc/passwd");
    let uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("mcast:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no mcast user in the root's etc/passwd:\n{passwd}"));
    let state = fs::metadata(root.join("var/lib/mcast")).expect("var/lib/mcast made");
    assert_eq!(state.uid(), uid);
    assert_eq!(state.permissions().mode() & 0o777, 0o700);

    verify_units(&root);
}

/// `systemd-analyze verify --root` on the installed units: no output at all (an unknown
/// directive, a missing ExecStart= binary or man: page is a line there and a failure).
fn verify_units(root: &Path) {
    // The units need the standard targets (multi-user, network-online, sysinit …) the empty
    // root lacks: copy the host's unit directory in, never over the package's files.
    let units = root.join("lib/systemd/system");
    ok(Command::new("cp")
        .arg("-an")
        .arg("/lib/systemd/system/.")
        .arg(&units));
    let verify = |names: &[&str]| {
        let mut c = Command::new("systemd-analyze");
        c.arg("verify")
            .arg(format!("--root={}", root.display()))
            .args(names)
            // Documentation=man:… is checked with `man`: find the package's pages.
            .env("MANPATH", root.join("usr/share/man"));
        if common::missing_tool(&["man"]).is_some() {
            println!("no `man` here: man: links in the units are not checked");
            c.arg("--man=no");
        }
        run(&mut c)
    };
    let o = verify(&UNITS);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        o.status
    );
    // The check can fail here: a unit with an unknown directive and a missing binary.
    fs::write(
        units.join("mcast-broken.service"),
        "[Service]\nType=notify\nFrobnicate=yes\nExecStart=/usr/bin/mcast-missing\n",
    )
    .unwrap();
    let o = verify(&["mcast-broken.service"]);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("Frobnicate") && said.contains("mcast-missing"),
        "systemd-analyze verify missed a broken unit:\n{said}"
    );
}
