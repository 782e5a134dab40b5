//! Scheduled loops and overnight batches (DESIGN §2 "Start time and overnight pre-load"), with
//! real `mcastd` and `mcast-recv batch` processes on loopback and a compressed clock: windows
//! of a few seconds given as HH:MM:SS in UTC.
//!
//! 1. A scheduled window: the server loops with no receivers, refuses joins outside it and
//!    closes the loop at its end whatever receivers remain; the batch stops there with its
//!    partial title resumable, and the next window completes it receiving about what was
//!    missing (the loop carries on from where the last window stopped).
//! 2. Twenty titles, six already complete and five partial: only what is missing travels.
//! 3. Disk full mid-batch (tmpfs in a private mount namespace): clean stop, report naming
//!    the full disk, no damaged file; with more space the next run completes.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mcast::archive::ArchiveFile;
use mcast::carousel::LoopShape;
use mcast::wire::control::{Control, ErrorCode};
use serde_json::Value;

const KB: usize = 1024;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// HH:MM:SS (UTC) of a Unix time.
fn hms(t: u64) -> String {
    let s = t % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn window(from: u64, to: u64) -> String {
    format!("{}-{}", hms(from), hms(to))
}

/// `mcast-recv batch --list LIST --server … -o OUT --report REPORT [extra]`, waited for.
fn batch(
    control: std::net::SocketAddr,
    list: &Path,
    out: &Path,
    report: &Path,
    extra: &[&str],
    limit: Duration,
) -> (i32, Value, String) {
    let mut cmd = Command::new(recv_bin());
    cmd.arg("batch")
        .arg("--list")
        .arg(list)
        .arg("--server")
        .arg(control.to_string())
        .arg("-o")
        .arg(out)
        .arg("--report")
        .arg(report)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(report.with_extension("log")).unwrap());
    let mut g = Guard::spawn(&mut cmd, true);
    let st = g
        .wait_for(limit)
        .unwrap_or_else(|| panic!("batch did not end within {limit:?}"));
    let log = fs::read_to_string(report.with_extension("log")).unwrap_or_default();
    let text = fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("no report {}: {e}; exit {st:?}\n{log}", report.display()));
    (
        st.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap(),
        log,
    )
}

fn title<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["titles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["title"] == name)
        .unwrap_or_else(|| panic!("{name} not in report {report:#}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// 1. Compressed-clock windows: W1 stops the batch with `long` partial, W2 completes it.
#[test]
fn window_end_stops_batch_and_next_window_completes() {
    let t0 = unix_now();
    let (w1, w2) = ((t0 + 4, t0 + 10), (t0 + 18, t0 + 45));
    // Two windows for both titles, looped at most at 8 Mbit/s (1 MB/s).
    let sched = |(a, b): (u64, u64)| {
        format!(
            "[[schedule]]\ntitles = [\"short\", \"long\"]\nwindow = \"{}\"\ntz = \"UTC\"\nrate_mbps = 8.0\n",
            window(a, b)
        )
    };
    let site = Site::new(
        60,
        &format!(
            "rate_mbps = 40.0\nlease_ms = 1500\n{}{}",
            sched(w1),
            sched(w2)
        ),
    );
    let short = site.pack("short", 1500 * KB, 601);
    let long = site.pack("long", 8000 * KB, 602);
    let _srv = site.serve();
    let out = site.out_dir("night");
    let list = site.path("list.txt");
    fs::write(
        &list,
        "# tomorrow's catalogue\nshort\nlong  # the big one\n",
    )
    .unwrap();

    // Before the window: no loop, and a join is turned away.
    assert!(
        unix_now() < w1.0,
        "set-up took too long for the compressed clock"
    );
    let s = site.stats();
    assert!(
        channels(&s).is_empty(),
        "a loop runs before its window: {s}"
    );
    match Ctl::new(site.control, 7).request(Control::Join {
        title: "long".into(),
    }) {
        Control::Error {
            code: ErrorCode::Busy,
            message,
        } => {
            assert!(message.contains("window"), "{message}")
        }
        other => panic!("join outside the window: {other:?}"),
    }
    assert_eq!(counter(&site.stats(), "refused_outside_window"), 1);

    // Window 1: the batch waits for it, fetches both, stops at its end.
    let w1s = window(w1.0, w1.1);
    let bg = {
        let (ctl, list, out) = (site.control, list.clone(), out.clone());
        let r1 = site.path("r1.json");
        let w = w1s.clone();
        std::thread::spawn(move || {
            batch(
                ctl,
                &list,
                &out,
                &r1,
                &["--window", &w, "--concurrency", "2"],
                Duration::from_secs(40),
            )
        })
    };
    // A receiver with no window of its own joins the scheduled loop of `long`: the window's
    // end drops it (it does not hold the loop open).
    site.wait_channel_group("long", Duration::from_secs(8));
    let s = site.stats();
    assert!(channels(&s).iter().any(|c| c["title"] == "short"), "{s}");
    let plain = site.get("long", &site.out_dir("plain"), &["--timeout", "30"]);
    let (code, r1, log1) = bg.join().unwrap();
    let s = site.stats();
    assert!(unix_now() < w2.0, "batch 1 took too long to stop\n{log1}");
    println!("window 1 report: {r1:#}");
    assert!(
        channels(&s).is_empty(),
        "loops still open after the window: {s}"
    );
    assert!(counter(&s, "scheduled_opened") >= 2, "{s}");
    assert!(counter(&s, "scheduled_closed") >= 2, "{s}");
    assert!(
        counter(&s, "scheduled_members_dropped") >= 1,
        "the plain receiver was not dropped: {s}"
    );
    drop(plain);
    assert_eq!(
        code, 9,
        "batch 1 exit (some left for the next window)\n{log1}"
    );
    assert_eq!(r1["stopped"], "window ended", "{r1:#}");
    assert!(unix_now() <= w1.1 + 5, "batch 1 ran on past its window");
    let rs = title(&r1, "short");
    assert_eq!(rs["status"], "done", "{r1:#}");
    assert_identical(&mcast::archive::archive_path(&out, "short"), &short);
    let rl = title(&r1, "long");
    assert_eq!(rl["status"], "partial", "{r1:#}");
    let pct1 = rl["percent"].as_f64().unwrap();
    assert!((10.0..95.0).contains(&pct1), "long after window 1: {pct1}%");
    assert!(out.join("long.mca.state").exists() && out.join("long.mca.part").exists());
    assert!(!out.join("long.mca").exists());
    let fetched1 = u(rl, "bytes_this_run");

    // Window 2: `short` is already complete (nothing fetched), `long` carries on.
    let (code, r2, log2) = batch(
        site.control,
        &list,
        &out,
        &site.path("r2.json"),
        &["--window", &window(w2.0, w2.1), "--concurrency", "2"],
        Duration::from_secs(50),
    );
    println!("window 2 report: {r2:#}");
    assert_eq!(code, 0, "batch 2 exit\n{log2}");
    assert_eq!(r2["stopped"], "all done");
    let rs = title(&r2, "short");
    assert_eq!(rs["already_complete"], true, "{r2:#}");
    assert_eq!(u(rs, "received_bytes"), 0);
    let rl = title(&r2, "long");
    assert_eq!(rl["status"], "done", "{r2:#}");
    assert_identical(&mcast::archive::archive_path(&out, "long"), &long);
    let (missing, received, dups) = (
        u(rl, "missing_bytes_at_start"),
        u(rl, "received_bytes"),
        u(rl, "duplicates"),
    );
    let a = ArchiveFile::open(&long).unwrap();
    // What a download holds when complete (FEC repair symbols are not needed).
    let loop_bytes = a.head.needed_bytes();
    println!(
        "window 1 fetched {fetched1} B ({pct1}%); window 2: missing {missing} B, received {received} B \
         (ratio {:.3}), duplicates {dups} packets",
        received as f64 / missing.max(1) as f64
    );
    assert!(missing > 0 && fetched1 > 0);
    assert!(
        fetched1 + missing >= loop_bytes && fetched1 + missing <= loop_bytes + 64 * KB as u64,
        "window 1 held {fetched1} + window 2 missing {missing} != loop {loop_bytes}"
    );
    // The loop carries on where window 1 stopped: what arrives is about what was missing.
    assert!(
        // The loop carries the default 10 % of FEC repair symbols besides the data.
        received <= missing + missing / 5 + 128 * KB as u64,
        "window 2 received {received} B for {missing} B missing"
    );
}

/// Mark blocks of a complete archive missing: rename it to a part file, zero the units of the
/// blocks not kept and write a state file holding the kept ones (the receiver's state format,
/// see client/src/state.rs) — a download interrupted with those blocks on disk.
/// `keep(block, blocks)`; returns the payload bytes now missing.
fn make_partial(dir: &Path, title: &str, keep: impl Fn(u64, u64) -> bool) -> u64 {
    let fin = mcast::archive::archive_path(dir, title);
    let part = dir.join(format!("{title}.mca.part"));
    let a = ArchiveFile::open(&fin).unwrap();
    let shape = LoopShape::of(&a.head);
    let units = shape.loop_packets();
    fs::rename(&fin, &part).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&part).unwrap();
    let mut have = vec![0u64; units.div_ceil(64) as usize];
    let mut missing = 0u64;
    for u in 0..units {
        let (off, len) = a.layout.packet_range(shape.unit_packet(u)).unwrap();
        let block = shape.hash_block_of(shape.unit_packet(u));
        if block < shape.n_blocks && keep(block, shape.n_blocks) {
            have[(u / 64) as usize] |= 1 << (u % 64);
        } else {
            // FEC repair symbols are dropped with the rest, but are not "missing": a complete
            // download need not hold them.
            f.write_all_at(&vec![0u8; len], off).unwrap();
            if shape.required(u) {
                missing += len as u64;
            }
        }
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"MCRS");
    b.push(1);
    b.extend_from_slice(&a.head.archive_id);
    b.extend_from_slice(&a.head.server_key.0);
    b.extend_from_slice(&units.to_le_bytes());
    for w in &have {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    fs::write(dir.join(format!("{title}.mca.state")), b).unwrap();
    missing
}

/// 2. Twenty titles: 6 complete, 5 partial, 9 new. Only the missing bytes travel.
#[test]
fn twenty_titles_only_missing_bytes_travel() {
    let site = Site::new(61, "rate_mbps = 40.0\nlease_ms = 1500");
    let names: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    let archives: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| site.pack(n, 300 * KB + i * 7 * KB, 700 + i as u64))
        .collect();
    let _srv = site.serve();
    let out = site.out_dir("shelf");
    // Fetch 11 first (one batch), then turn 5 of them back into partial downloads.
    let first = site.path("first.txt");
    fs::write(&first, names[..11].join("\n")).unwrap();
    let (code, r0, log0) = batch(
        site.control,
        &first,
        &out,
        &site.path("r0.json"),
        &["--concurrency", "3"],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "first batch\n{log0}\n{r0:#}");
    let mut missing_made = 0;
    for (i, n) in names[6..11].iter().enumerate() {
        // Different holes: the start held, the end held, the middle held.
        missing_made += match i % 3 {
            0 => make_partial(&out, n, |b, all| b < all / 2),
            1 => make_partial(&out, n, |b, all| b >= all / 3),
            _ => make_partial(&out, n, |b, all| b >= all / 4 && b < all * 3 / 4),
        };
    }
    let mtimes: Vec<_> = names[..6]
        .iter()
        .map(|n| {
            fs::metadata(mcast::archive::archive_path(&out, n))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let before = site.stats();
    let list = site.path("list.txt");
    fs::write(&list, format!("# all twenty\n{}\n", names.join("\n"))).unwrap();
    let started = Instant::now();
    let (code, r, log) = batch(
        site.control,
        &list,
        &out,
        &site.path("r.json"),
        &["--concurrency", "3"],
        Duration::from_secs(90),
    );
    let secs = started.elapsed().as_secs_f64();
    let after = site.stats();
    assert_eq!(code, 0, "batch\n{log}\n{r:#}");
    assert_eq!(
        (u(&r, "done"), u(&r, "partial"), u(&r, "failed")),
        (20, 0, 0),
        "{r:#}"
    );
    for (n, a) in names.iter().zip(&archives) {
        assert_identical(&mcast::archive::archive_path(&out, n), a);
    }
    for (n, m) in names[..6].iter().zip(&mtimes) {
        let t = title(&r, n);
        assert_eq!(t["already_complete"], true, "{n}: {t}");
        assert_eq!(u(t, "received_bytes"), 0);
        let now = fs::metadata(mcast::archive::archive_path(&out, n))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(*m, now, "{n} was rewritten");
    }
    let mut partial_missing = 0;
    for n in &names[6..11] {
        let t = title(&r, n);
        assert_eq!(t["already_complete"], false);
        partial_missing += u(t, "missing_bytes_at_start");
    }
    assert_eq!(
        partial_missing, missing_made,
        "the receiver did not resume from the states"
    );
    let fresh: u64 = names[11..]
        .iter()
        .map(|n| {
            ArchiveFile::open(&mcast::archive::archive_path(&out, n))
                .unwrap()
                .head
                .needed_bytes()
        })
        .sum();
    let missing = missing_made + fresh;
    let received = u(&r, "received_bytes");
    let sent = counter(&after, "payload_bytes_sent") - counter(&before, "payload_bytes_sent");
    let held: u64 = names[..11]
        .iter()
        .map(|n| {
            ArchiveFile::open(&mcast::archive::archive_path(&out, n))
                .unwrap()
                .head
                .needed_bytes()
        })
        .sum::<u64>()
        - missing_made;
    println!(
        "20 titles: {missing} B missing ({held} B already held), receivers got {received} B \
         ({:.3}), server sent {sent} B ({:.3}) in {secs:.1} s",
        received as f64 / missing as f64,
        sent as f64 / missing as f64
    );
    assert_eq!(u(&r, "bytes_this_run"), missing, "{r:#}");
    // Each fetch may hear a little past its last missing packet before the loop closes, and
    // the loop carries the default 10 % of FEC repair symbols besides.
    let slack = 14 * 64 * KB as u64;
    assert!(
        received <= missing + missing / 5 + slack,
        "received {received} for {missing} missing"
    );
    assert!(
        sent <= missing + missing / 5 + slack,
        "server sent {sent} for {missing} missing"
    );
    assert!(
        sent < missing + held / 4,
        "the server re-sent what receivers held"
    );
}

const NS_DISK_FULL: &str = r#"
mount -t tmpfs -o size=5m tmpfs "$OUT" || exit 90
cp --sparse=never "$PREP"/px.mca.part "$PREP"/px.mca.state "$OUT"/ || exit 92
"$RECV" batch --list "$LIST" --server "$SERVER" -o "$OUT" --concurrency 1 --report "$HOST/r1.json" >/dev/null 2>"$HOST/r1.log"
echo $? > "$HOST/r1.code"
mkdir -p "$HOST/after1" && ls -la "$OUT" > "$HOST/ls1" && cp "$OUT"/*.mca "$HOST/after1/" 2>/dev/null
mount -o remount,size=24m "$OUT" || exit 91
"$RECV" batch --list "$LIST" --server "$SERVER" -o "$OUT" --concurrency 2 --report "$HOST/r2.json" >/dev/null 2>"$HOST/r2.log"
echo $? > "$HOST/r2.code"
mkdir -p "$HOST/after2" && ls -la "$OUT" > "$HOST/ls2" && cp "$OUT"/*.mca "$HOST/after2/"
"#;

/// 3. A 5 MiB output filesystem for five ~1.5 MB titles, one of them half fetched already:
///    the partial one resumes, the batch stops cleanly when the next title does not fit, the
///    report names the full disk, every archive on it is whole; with the filesystem grown to
///    24 MiB the next run fetches only the rest.
#[test]
fn disk_full_stops_cleanly_and_next_run_continues() {
    let test = "disk_full_stops_cleanly_and_next_run_continues";
    let Some(prefix) = namespace_or_skip(test, "--mount", &["mount"]) else {
        return;
    };
    let site = Site::new(62, "rate_mbps = 40.0\nlease_ms = 1500");
    let names = ["px", "d0", "d1", "d2", "d3"];
    let archives: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| site.pack(n, 1500 * KB, 800 + i as u64))
        .collect();
    let _srv = site.serve();
    let list = site.path("list.txt");
    fs::write(&list, names.join("\n")).unwrap();
    let out = site.out_dir("small");
    let host = site.out_dir("host");
    // `px` was half fetched in an earlier night (on another disk; copied onto the small one).
    let prep = site.out_dir("prep");
    let px_list = site.path("px.txt");
    fs::write(&px_list, "px\n").unwrap();
    let (code, r0, log0) = batch(
        site.control,
        &px_list,
        &prep,
        &site.path("r0.json"),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "{log0}\n{r0:#}");
    let px_missing = make_partial(&prep, "px", |b, all| b < all / 2);
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&host).unwrap();
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .args(["sh", "-c", NS_DISK_FULL])
        .env("RECV", recv_bin())
        .env("SERVER", site.control.to_string())
        .env("LIST", &list)
        .env("OUT", &out)
        .env("HOST", &host)
        .env("PREP", &prep)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    let mut g = Guard::spawn(&mut cmd, true);
    let st = g
        .wait_for(Duration::from_secs(90))
        .expect("namespace script did not end");
    let read = |f: &str| fs::read_to_string(host.join(f)).unwrap_or_default();
    assert!(
        st.success(),
        "script: {st:?}\n{}\n{}",
        read("r1.log"),
        read("r2.log")
    );
    let r1: Value = serde_json::from_str(&read("r1.json"))
        .unwrap_or_else(|e| panic!("r1: {e}\n{}", read("r1.log")));
    println!("run 1 (5 MiB): {r1:#}\n{}", read("ls1"));
    assert_eq!(read("r1.code").trim(), "9", "{}", read("r1.log"));
    assert_eq!(r1["stopped"], "disk full", "{r1:#}");
    let done1: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| title(&r1, n)["status"] == "done")
        .collect();
    assert!(!done1.is_empty() && done1.len() < names.len(), "{r1:#}");
    let stopped_at = names
        .iter()
        .find(|n| title(&r1, n)["status"] != "done")
        .unwrap();
    let why = title(&r1, stopped_at)["reason"]
        .as_str()
        .unwrap()
        .to_string();
    // The partial title resumed on the small disk: only its missing half was fetched.
    let px = title(&r1, "px");
    assert_eq!(px["status"], "done", "{px}");
    assert_eq!(u(px, "missing_bytes_at_start"), px_missing, "{px}");
    assert_eq!(u(px, "bytes_this_run"), px_missing, "{px}");
    assert!(why.starts_with("disk full"), "{why}");
    // No damaged file: every archive on the small disk is whole and byte-identical.
    let mut whole = 0;
    for e in fs::read_dir(host.join("after1")).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_stem().unwrap().to_str().unwrap().to_string();
        let i = names.iter().position(|x| *x == n).unwrap();
        assert_identical(&p, &archives[i]);
        whole += 1;
    }
    assert_eq!(whole, done1.len());
    let r2: Value = serde_json::from_str(&read("r2.json"))
        .unwrap_or_else(|e| panic!("r2: {e}\n{}", read("r2.log")));
    println!("run 2 (24 MiB): {r2:#}");
    assert_eq!(read("r2.code").trim(), "0", "{}", read("r2.log"));
    for (n, a) in names.iter().zip(&archives) {
        let t = title(&r2, n);
        assert_eq!(t["status"], "done", "{t}");
        assert_eq!(t["already_complete"], done1.contains(n), "{t}");
        assert_identical(&host.join("after2").join(format!("{n}.mca")), a);
    }
}

/// 4. A batch pre-loads each listed title's adverts (as the server's catalogue names them)
///    with it, and reports them as titles of their own; adverts of other titles stay away.
#[test]
fn batch_preloads_the_adverts_of_its_titles() {
    let site = Site::new(63, "");
    site.pack("film", 200 * KB, 630);
    let pack_advert = |title: &str, extra: &[&str]| {
        let input = site.path(&format!("{title}.media"));
        fs::write(&input, random_bytes(20 * KB, 631)).unwrap();
        let out = Command::new(mcastd_bin())
            .arg("--config")
            .arg(&site.cfg)
            .args(["pack", "--advert", "--title", title])
            .args(extra)
            .arg(&input)
            .env_remove("RUST_LOG")
            .output()
            .expect("run mcastd pack");
        assert!(out.status.success(), "pack failed: {out:?}");
    };
    pack_advert("ad-1", &["--for", "film", "--trailer"]);
    pack_advert("ad-2", &["--for", "other"]);
    let _srv = site.serve();
    let out = site.out_dir("shelf");
    let list = site.path("list.txt");
    fs::write(&list, "film\n").unwrap();
    let (code, r, log) = batch(
        site.control,
        &list,
        &out,
        &site.path("r.json"),
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{log}\n{r:#}");
    assert_eq!(title(&r, "film")["status"], "done", "{r:#}");
    assert_eq!(title(&r, "ad-1")["status"], "done", "{r:#}");
    assert!(mcast::archive::archive_path(&out, "ad-1").exists());
    assert!(!mcast::archive::archive_path(&out, "ad-2").exists());
    assert_eq!(r["titles"].as_array().unwrap().len(), 2, "{r:#}");
}
