//! The receiver's command line against a real server: one meaning for `-o`, durations with
//! units (the 0.1 spellings still work, with a deprecation warning), progress with bytes and
//! rate, `catalog --json`, and `list DIR` (complete, partial with percent, verified or not).

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{assert_identical, recv_bin, Site};

fn recv(args: &[&str]) -> std::process::Output {
    Command::new(recv_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run mcast-recv")
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn the_tidied_command_line_fetches_lists_and_keeps_the_old_spellings() {
    // 16 Mbit/s: the 2 MB title takes about a second, long enough for progress lines.
    let site = Site::new(1, "rate_mbps = 16.0");
    site.pack("film", 2_000_000, 1);
    site.pack("show", 300_000, 2);
    site.pack("long", 12_000_000, 3);
    let _srv = site.serve();
    let ctl = site.control.to_string();

    // New spellings: --dir, --timeout with a unit. Progress lines carry bytes and the rate.
    let d = site.out_dir("new");
    let got = site
        .get("film", &d, &["--json", "--timeout", "40s"])
        .wait(Duration::from_secs(60));
    got.assert_code(0);
    assert_identical(&d.join("film.mca"), &site.archive_path("film"));
    assert!(!got.stderr.contains("deprecated"), "{}", got.stderr);
    let progress: Vec<Value> = got
        .lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .collect();
    assert!(!progress.is_empty(), "no progress lines: {:#?}", got.lines);
    let last = progress.last().unwrap();
    assert!(last["total_bytes"].as_u64().unwrap() >= 2_000_000, "{last}");
    assert!(last["bytes"].as_u64().unwrap() <= last["total_bytes"].as_u64().unwrap());
    assert!(
        progress
            .iter()
            .any(|p| p["rate_mbps"].as_f64().unwrap() > 0.0),
        "no rate in {progress:#?}"
    );
    assert!(last["tier"].is_u64(), "{last}");

    // The 0.1 spellings: -o DIR, a bare --timeout in seconds, --sync-timeout-ms: still
    // work, and say they are deprecated.
    let old = site.out_dir("old");
    let o = recv(&[
        "get",
        "show",
        "--server",
        &ctl,
        "-o",
        old.to_str().unwrap(),
        "--timeout",
        "40",
        "--sync-timeout-ms",
        "1500",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_identical(&old.join("show.mca"), &site.archive_path("show"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`-o/--output DIR`"), "{err}");
    assert!(err.contains("(\"40\") is read as 40s"), "{err}");
    assert!(err.contains("(\"1500\") is read as 1500ms"), "{err}");
    // A duration flag without a unit where none was ever allowed is a usage error.
    let o = recv(&["get", "show", "--server", &ctl, "--sync-timeout", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // -o and --dir together: refused, not guessed.
    let o = recv(&["get", "show", "-o", "a", "--dir", "b"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    // A partial download: cut short by --timeout (exit 7, state kept).
    let o = recv(&[
        "get",
        "long",
        "--server",
        &ctl,
        "--dir",
        d.to_str().unwrap(),
        "--timeout",
        "2s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");

    // `list`: JSON lines off a terminal; the complete ones verified, the partial with its percent.
    let o = recv(&["list", d.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let l = json_lines(&o.stdout);
    assert_eq!(l.len(), 2, "{l:#?}");
    assert_eq!(
        (l[0]["title"].as_str(), l[0]["state"].as_str()),
        (Some("film"), Some("complete"))
    );
    assert_eq!(l[0]["verified"], "signature");
    assert_eq!(l[0]["percent"], 100.0);
    assert_eq!(
        (l[1]["title"].as_str(), l[1]["state"].as_str()),
        (Some("long"), Some("partial"))
    );
    let pct = l[1]["percent"].as_f64().unwrap();
    assert!(pct > 0.0 && pct < 100.0, "partial at {pct}%: {l:#?}");

    // A damaged payload: the signed head still checks, every-packet verification does not.
    let film = d.join("film.mca");
    let mut bytes = fs::read(&film).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    fs::write(&film, bytes).unwrap();
    let o = recv(&["list", d.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let o = recv(&["list", d.to_str().unwrap(), "--verify", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let l = json_lines(&o.stdout);
    assert!(
        l[0]["verified"].as_str().unwrap().starts_with("FAILED"),
        "{l:#?}"
    );

    // `catalog --json`: one object per title.
    let o = recv(&["catalog", "--server", &ctl, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let titles: Vec<String> = json_lines(&o.stdout)
        .iter()
        .map(|v| v["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(titles, ["film", "long", "show"]);
}
