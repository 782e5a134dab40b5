//! `mcast-recv batch`: unattended overnight pre-load (DESIGN §2, FIG. 8). Fetches a list of
//! titles inside a time window with a concurrency limit; each fetch is one `mcast-recv get`
//! child process (same state-file resume, same `--director` fail-over), so a title that
//! misbehaves cannot take the batch down and the window's end can always stop it: SIGINT
//! (the child checkpoints and exits 130), then SIGKILL after a grace period (the state file
//! on disk is still a valid resume point).
//!
//! Before a title starts, the free space of the output filesystem (statvfs) must cover what
//! it still needs: its archive size minus what its part file already holds on disk, minus
//! what the titles running now still have to allocate. When it does not, the batch stops
//! starting titles ("disk full") and lets the running ones finish; a receiver that still hits
//! ENOSPC exits 6 with its state resumable. The report says, per title, done / partial with
//! percent / failed with the reason; the exit code says whether the next window has work.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcast_io::archive::{self, ArchiveFile};
use mcast_keys::PublicIdentity;
use mcast_proto::schedule::{Window, WindowState};
use mcast_proto::wire::control::CatalogItem;
use serde::Serialize;

use crate::error::{Failure, RecvError};
use crate::get::file_names;

/// Exit code: some titles are left (partial or not started) for the next window; nothing
/// failed for good. Run the same batch again.
pub const EXIT_LEFT: u8 = 9;
/// Exit code: at least one title failed for a reason another run will not fix (not on the
/// server, integrity, bad title); see the report.
pub const EXIT_FAILED: u8 = 10;

/// At the window's end running fetches keep listening this long before they are stopped, so
/// they hold everything the server sent before it closed its loop (the next window's loop
/// carries on from there: stopping earlier would leave a hole behind that position).
const END_LINGER: Duration = Duration::from_secs(1);

/// Bytes kept free beyond a title's need (state file, temp files, filesystem metadata).
const SPACE_MARGIN: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub titles: Vec<String>,
    pub out_dir: PathBuf,
    /// Fetch only inside this window (waits for it to open); `None`: until all are done.
    pub window: Option<Window>,
    pub window_text: String,
    pub concurrency: usize,
    pub report: Option<PathBuf>,
    /// The `mcast-recv` binary to run for each title.
    pub exe: PathBuf,
    /// Arguments every `get` child gets (`--server`/`--director`, `--iface`, ...).
    pub get_args: Vec<OsString>,
    /// A server to ask for title sizes and adverts (the catalogue; with directors, one they
    /// picked); `None` (no director answered): no adverts, sizes are learnt from part files,
    /// and an unknown size is only checked against a full disk.
    pub catalog_server: Option<SocketAddr>,
    /// DSCP of the batch's own requests (the catalogue), as its `get`s are given.
    pub dscp: mcast_io::dscp::Dscp,
    pub server_key: Option<PublicIdentity>,
    /// After SIGINT at the window's end, SIGKILL a child that has not exited after this.
    pub grace: Duration,
}

/// One title's line in the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TitleReport {
    pub title: String,
    /// "done", "partial" (resumable: run again) or "failed" (see `reason`).
    pub status: &'static str,
    pub percent: f64,
    pub archive_bytes: Option<u64>,
    /// Payload bytes newly held after this run (what was missing and arrived).
    pub bytes_this_run: u64,
    /// Payload bytes that arrived on the data sockets (incl. duplicates; from `get`'s report).
    pub received_bytes: u64,
    /// From `get`'s report: payload bytes missing when it started, packets it already had.
    pub missing_bytes_at_start: u64,
    pub duplicates: u64,
    /// Complete before this run; nothing was fetched.
    pub already_complete: bool,
    /// The `get` child's exit code (`None`: not started, or killed by a signal).
    pub exit_code: Option<i32>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchReport {
    pub event: &'static str,
    pub window: String,
    pub started_unix: u64,
    pub ended_unix: u64,
    /// Why the batch ended: "all done", "list finished", "window ended", "disk full",
    /// "interrupted".
    pub stopped: String,
    pub done: usize,
    pub partial: usize,
    pub failed: usize,
    pub bytes_this_run: u64,
    pub received_bytes: u64,
    pub titles: Vec<TitleReport>,
}

impl BatchReport {
    /// 0 all done, [`EXIT_LEFT`] some left for the next window, [`EXIT_FAILED`] some failed.
    pub fn exit_code(&self) -> u8 {
        if self.failed > 0 {
            EXIT_FAILED
        } else if self.partial > 0 {
            EXIT_LEFT
        } else {
            0
        }
    }
}

/// The list file: one title per line; blank lines and `#` comments (whole line or after the
/// title) are ignored; a title listed twice is fetched once.
pub fn parse_list(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.split('#').next().unwrap_or("").trim();
        if t.is_empty() {
            continue;
        }
        mcast_keys::store::validate_title(t).map_err(|e| format!("line {}: {e}", i + 1))?;
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

/// The titles of `--list` (first, in their order) and then those a director's placement
/// gave (`--placement-from`), each once; a placed title that is no valid title is refused.
pub fn merge_titles(list: Vec<String>, placed: Vec<String>) -> Result<Vec<String>, String> {
    let mut out = list;
    for t in placed {
        mcast_keys::store::validate_title(&t).map_err(|e| format!("placement title {t:?}: {e}"))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// What the disk holds of a title: (payload bytes held, payload bytes in all, archive length)
/// from its state and part files; `None` without a usable pair.
pub fn held(out_dir: &Path, title: &str) -> Option<(u64, u64, u64)> {
    let (st, a, shape) = crate::failover::load_resume(out_dir, title)?;
    let (mut have, mut all) = (0u64, 0u64);
    for u in 0..st.units {
        let len = a
            .layout
            .packet_range(shape.unit_packet(u))
            .map(|r| r.1 as u64)
            .unwrap_or(0);
        all += len;
        if st.has(u) {
            have += len;
        }
    }
    Some((have, all, a.layout.file_len()))
}

/// A finished archive for `title` that verifies (signature + every packet), with its length.
fn complete_on_disk(out_dir: &Path, title: &str, key: Option<&PublicIdentity>) -> Option<u64> {
    let (fin, part, _) = file_names(out_dir, title);
    if part.exists() {
        return None;
    }
    let a = ArchiveFile::open(&fin).ok()?;
    let k = key.copied().unwrap_or(a.head.server_key);
    archive::verify(&a, &k).ok()?;
    (a.head.title == title).then(|| a.layout.file_len())
}

/// Bytes the filesystem holding `dir` can still give an unprivileged writer.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Bytes already allocated on disk for a title's part file.
fn allocated(out_dir: &Path, title: &str) -> u64 {
    let (_, part, _) = file_names(out_dir, title);
    std::fs::metadata(part)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The listed titles, each followed by the adverts the catalogue names for it (candidates:
/// `play` acts only on their signed heads), without repeats.
pub fn with_adverts(titles: &[String], items: &[CatalogItem]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in titles {
        for x in std::iter::once(t.clone()).chain(crate::adverts::candidates(items, t)) {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    out
}

/// How a `get` child ended, as a report status and reason.
pub fn classify(
    code: Option<i32>,
    signal: Option<i32>,
    stderr_tail: &str,
) -> (&'static str, String) {
    let why = |default: &str| {
        if stderr_tail.is_empty() {
            default.to_string()
        } else {
            stderr_tail.to_string()
        }
    };
    match (code, signal) {
        (Some(0), _) => ("done", String::new()),
        (Some(6), _) => ("partial", format!("disk full: {}", why("no space left"))),
        (Some(130), _) => ("partial", "window ended".to_string()),
        (Some(c), _) if [1, 4, 7].contains(&c) => ("partial", why("receiver failed")),
        (Some(c), _) => ("failed", why(&format!("receiver exited {c}"))),
        (None, Some(s)) if s == libc::SIGKILL => (
            "partial",
            "window ended (receiver stopped; resumes from its last checkpoint)".to_string(),
        ),
        (None, Some(s)) => ("partial", format!("receiver killed by signal {s}")),
        (None, None) => ("partial", "receiver ended without status".to_string()),
    }
}

struct Running {
    title: String,
    child: Child,
    /// Bytes it needed when started (its archive size minus what its part held).
    need: u64,
    alloc_at_start: u64,
    held_at_start: u64,
    stdout: Arc<Mutex<Option<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    signalled: Option<Instant>,
}

fn unix_now() -> i64 {
    mcast_io::process::unix_secs() as i64
}

/// Run the batch until every title is done, the window ends, the disk is full or `stop`.
pub fn run(opts: &BatchOptions, stop: Arc<AtomicBool>) -> Result<BatchReport, RecvError> {
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RecvError::io("cannot create output directory", &opts.out_dir, e))?;
    let started_unix = unix_now();
    let mut deadline: Option<i64> = None;
    if let Some(w) = &opts.window {
        let mut said = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(RecvError::new(
                    Failure::Interrupted,
                    "interrupted while waiting for the window",
                ));
            }
            match w.state_at(unix_now()) {
                WindowState::Open { until } => {
                    deadline = Some(until);
                    break;
                }
                WindowState::Closed { opens: None } => {
                    return Err(RecvError::new(
                        Failure::Usage,
                        "--window never opens (no days selected)",
                    ))
                }
                WindowState::Closed { opens: Some(t) } => {
                    if !said {
                        tracing::info!(opens = %utc(t), "waiting for the window to open");
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    // The catalogue: title sizes, and the adverts of each listed title (fetched with it).
    let items = opts
        .catalog_server
        .and_then(|s| crate::adverts::catalog(s, opts.dscp, 5, Duration::from_millis(400)).ok())
        .unwrap_or_default();
    let sizes: BTreeMap<String, u64> = items
        .iter()
        .map(|i| (i.title.clone(), i.archive_len))
        .collect();
    let all_titles = with_adverts(&opts.titles, &items);
    tracing::info!(
        titles = opts.titles.len(),
        with_adverts = all_titles.len(),
        until = %deadline.map_or_else(|| "all are done".to_string(), utc),
        "batch starting"
    );

    let mut reports: BTreeMap<String, TitleReport> = BTreeMap::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    for t in &all_titles {
        if let Some(len) = complete_on_disk(&opts.out_dir, t, opts.server_key.as_ref()) {
            reports.insert(
                t.clone(),
                TitleReport {
                    title: t.clone(),
                    status: "done",
                    percent: 100.0,
                    archive_bytes: Some(len),
                    bytes_this_run: 0,
                    received_bytes: 0,
                    missing_bytes_at_start: 0,
                    duplicates: 0,
                    already_complete: true,
                    exit_code: None,
                    reason: String::new(),
                },
            );
        } else {
            queue.push_back(t.clone());
        }
    }

    let mut running: Vec<Running> = Vec::new();
    let mut stopped: Option<String> = None;
    let mut window_over_at: Option<Instant> = None;
    loop {
        let window_over = deadline.is_some_and(|d| unix_now() >= d);
        let past_linger = window_over && {
            let over_at = *window_over_at.get_or_insert_with(Instant::now);
            over_at.elapsed() >= END_LINGER
        };
        if stopped.is_none() {
            if stop.load(Ordering::Relaxed) {
                stopped = Some("interrupted".into());
            } else if window_over {
                stopped = Some("window ended".into());
            }
        }
        // Stopping: SIGINT every child once, SIGKILL after the grace period.
        if stop.load(Ordering::Relaxed) || past_linger {
            for r in running.iter_mut() {
                match r.signalled {
                    None => {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(r.child.id() as i32),
                            nix::sys::signal::Signal::SIGINT,
                        );
                        r.signalled = Some(Instant::now());
                    }
                    Some(at) if at.elapsed() > opts.grace => {
                        let _ = r.child.kill();
                    }
                    Some(_) => {}
                }
            }
        }
        // Start what fits.
        while stopped.is_none() && running.len() < opts.concurrency.max(1) {
            let Some(title) = queue.pop_front() else {
                break;
            };
            let alloc = allocated(&opts.out_dir, &title);
            let size = sizes
                .get(&title)
                .copied()
                .or_else(|| held(&opts.out_dir, &title).map(|h| h.2));
            let need = size.map_or(0, |s| s.saturating_sub(alloc));
            let pending: u64 = running
                .iter()
                .map(|r| {
                    let grown = allocated(&opts.out_dir, &r.title).saturating_sub(r.alloc_at_start);
                    r.need.saturating_sub(grown)
                })
                .sum();
            let free = free_bytes(&opts.out_dir)
                .map_err(|e| RecvError::io("cannot stat filesystem of", &opts.out_dir, e))?;
            if free < need + pending + SPACE_MARGIN {
                tracing::warn!(%title, disk_needed = need, free, pending, "not enough disk space: stopping the batch");
                let mut r = partial_report(&opts.out_dir, &title, size, 0);
                r.reason = format!(
                    "disk full: needs {need} more bytes (+{SPACE_MARGIN} kept free), {} free \
                     besides what running titles still need; free space and run again",
                    free.saturating_sub(pending)
                );
                reports.insert(title.clone(), r);
                stopped = Some("disk full".into());
                break;
            }
            running.push(start(opts, &title, need, alloc)?);
        }
        // Reap.
        let mut i = 0;
        while i < running.len() {
            let st = running[i]
                .child
                .try_wait()
                .map_err(|e| RecvError::new(Failure::Other, format!("waiting for get: {e}")))?;
            match st {
                Some(status) => {
                    let r = running.swap_remove(i);
                    let mut rep = finish(opts, r, status, &sizes);
                    if rep.exit_code == Some(130) && stop.load(Ordering::Relaxed) {
                        rep.reason = "interrupted".into();
                    }
                    if rep.reason.starts_with("disk full") && stopped.is_none() {
                        stopped = Some("disk full".into());
                    }
                    reports.insert(rep.title.clone(), rep);
                }
                None => i += 1,
            }
        }
        if running.is_empty() && (queue.is_empty() || stopped.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Titles never started.
    for t in queue {
        let size = sizes.get(&t).copied();
        let mut r = partial_report(&opts.out_dir, &t, size, 0);
        r.reason = format!(
            "not started: {}",
            stopped.as_deref().unwrap_or("batch stopped")
        );
        reports.entry(t).or_insert(r);
    }
    let titles: Vec<TitleReport> = all_titles
        .iter()
        .filter_map(|t| reports.remove(t))
        .collect();
    let count = |s: &str| titles.iter().filter(|t| t.status == s).count();
    let (done, partial, failed) = (count("done"), count("partial"), count("failed"));
    let report = BatchReport {
        event: "batch",
        window: opts.window_text.clone(),
        started_unix: started_unix as u64,
        ended_unix: unix_now() as u64,
        stopped: stopped.unwrap_or_else(|| {
            if partial + failed == 0 {
                "all done".into()
            } else {
                "list finished".into()
            }
        }),
        done,
        partial,
        failed,
        bytes_this_run: titles.iter().map(|t| t.bytes_this_run).sum(),
        received_bytes: titles.iter().map(|t| t.received_bytes).sum(),
        titles,
    };
    if let Some(path) = &opts.report {
        write_report(path, &report)?;
    }
    Ok(report)
}

fn partial_report(out_dir: &Path, title: &str, size: Option<u64>, before: u64) -> TitleReport {
    let h = held(out_dir, title);
    TitleReport {
        title: title.to_string(),
        status: "partial",
        percent: h.map_or(0.0, |(have, all, _)| percent(have, all)),
        archive_bytes: size.or(h.map(|x| x.2)),
        bytes_this_run: h.map_or(0, |x| x.0.saturating_sub(before)),
        received_bytes: 0,
        missing_bytes_at_start: 0,
        duplicates: 0,
        already_complete: false,
        exit_code: None,
        reason: String::new(),
    }
}

/// A unix time for logs, as RFC 3339 UTC (the window's own time zone is in the report).
fn utc(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn percent(have: u64, all: u64) -> f64 {
    if all == 0 {
        100.0
    } else {
        (have as f64 * 1000.0 / all as f64).floor() / 10.0
    }
}

/// Start `mcast-recv get TITLE` with the shared arguments; stdout (JSON) and stderr are read
/// on threads, keeping the final report line and the last error line.
fn start(opts: &BatchOptions, title: &str, need: u64, alloc: u64) -> Result<Running, RecvError> {
    let held_at_start = held(&opts.out_dir, title).map_or(0, |h| h.0);
    let mut cmd = Command::new(&opts.exe);
    cmd.arg("get")
        .arg(title)
        .arg("--dir")
        .arg(&opts.out_dir)
        .arg("--json")
        .arg("--resume-at-gap")
        .arg("--no-adverts") // the batch lists adverts as titles of their own
        .args(&opts.get_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        RecvError::new(
            Failure::Other,
            format!("cannot start {}: {e}", opts.exe.display()),
        )
    })?;
    // `disk_needed` is what the part file may still grow by (0 once fully allocated), not
    // what is left to fetch: that is `held_percent`.
    let held_percent = held(&opts.out_dir, title).map_or(0.0, |h| percent(h.0, h.1));
    tracing::info!(%title, pid = child.id(), held_percent, disk_needed = need, "fetching");
    let stdout = Arc::new(Mutex::new(None));
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let keep = stdout.clone();
        readers.push(std::thread::spawn(move || {
            // The last report: "done", or "stopped" with what the session held.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("\"event\":\"done\"") || line.contains("\"event\":\"stopped\"") {
                    *keep.lock().unwrap() = Some(line);
                }
            }
        }));
    }
    if let Some(mut err) = child.stderr.take() {
        let keep = stderr.clone();
        readers.push(std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            let last = all
                .lines()
                .rev()
                .find(|l| l.contains("error"))
                .or_else(|| all.lines().last())
                .unwrap_or("")
                .trim()
                .trim_start_matches("mcast-recv: error: ")
                .to_string();
            *keep.lock().unwrap() = last;
        }));
    }
    Ok(Running {
        title: title.to_string(),
        child,
        need,
        alloc_at_start: alloc,
        held_at_start,
        stdout,
        stderr,
        readers,
        signalled: None,
    })
}

fn finish(
    opts: &BatchOptions,
    r: Running,
    status: ExitStatus,
    sizes: &BTreeMap<String, u64>,
) -> TitleReport {
    for h in r.readers {
        let _ = h.join();
    }
    let stderr = r.stderr.lock().unwrap().clone();
    let (state, reason) = classify(status.code(), status.signal(), &stderr);
    let done_line = r.stdout.lock().unwrap().clone();
    if state == "done" {
        let v: serde_json::Value = done_line
            .as_deref()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        tracing::info!(title = %r.title, received = n("received_bytes"), "done");
        return TitleReport {
            title: r.title,
            status: "done",
            percent: 100.0,
            archive_bytes: Some(n("archive_bytes")),
            bytes_this_run: n("missing_bytes_at_start"),
            received_bytes: n("received_bytes"),
            missing_bytes_at_start: n("missing_bytes_at_start"),
            duplicates: n("duplicates"),
            already_complete: false,
            exit_code: status.code(),
            reason,
        };
    }
    // What the stopped session said it held; the state file only when it could not say (killed).
    let said = done_line
        .as_deref()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "stopped");
    let mut t = match said {
        Some(v) => {
            let n = |k: &str| v["resume"][k].as_u64().unwrap_or(0);
            // Older receivers' reports have no `needed_bytes`: the loop is what they need.
            let needed = match n("needed_bytes") {
                0 => n("loop_bytes"),
                x => x,
            };
            let have = needed.saturating_sub(n("missing_bytes"));
            TitleReport {
                title: r.title.clone(),
                status: "partial",
                percent: percent(have, needed),
                archive_bytes: sizes.get(&r.title).copied(),
                bytes_this_run: have.saturating_sub(r.held_at_start),
                received_bytes: n("received_bytes"),
                missing_bytes_at_start: 0,
                duplicates: 0,
                already_complete: false,
                exit_code: None,
                reason: String::new(),
            }
        }
        None => partial_report(
            &opts.out_dir,
            &r.title,
            sizes.get(&r.title).copied(),
            r.held_at_start,
        ),
    };
    t.status = state;
    t.exit_code = status.code();
    t.reason = reason;
    tracing::info!(title = %t.title, status = t.status, percent = t.percent, reason = %t.reason, "stopped");
    t
}

/// Write the report atomically (a reader never sees half of it).
fn write_report(path: &Path, report: &BatchReport) -> Result<(), RecvError> {
    use std::io::Write;
    let json = serde_json::to_vec_pretty(report).expect("report serializes");
    let mut f = mcast_io::fsutil::AtomicFile::create(path)
        .map_err(|e| RecvError::io("cannot write report", path, e))?;
    f.file()
        .write_all(&json)
        .and_then(|_| f.file().write_all(b"\n"))
        .map_err(|e| RecvError::io("cannot write report", path, e))?;
    f.commit()
        .map_err(|e| RecvError::io("cannot write report", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adverts_follow_their_titles_once() {
        let ad = |t: &str, f: &[&str]| CatalogItem {
            title: t.into(),
            advert: true,
            advert_for: f.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let items = [ad("ad-1", &["a", "b"]), ad("ad-2", &["b"])];
        let titles = ["a".to_string(), "b".to_string(), "ad-2".to_string()];
        assert_eq!(with_adverts(&titles, &items), ["a", "ad-1", "b", "ad-2"]);
    }

    #[test]
    fn list_file_format() {
        let l = parse_list("# tomorrow\nfilm-1\n\n  film-2  # the long one\nfilm-1\n").unwrap();
        assert_eq!(l, vec!["film-1".to_string(), "film-2".to_string()]);
        let e = parse_list("ok\nbad/title\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn child_exits_map_to_statuses() {
        assert_eq!(classify(Some(0), None, "").0, "done");
        let (s, why) = classify(Some(6), None, "cannot write x: no space left on device");
        assert_eq!(s, "partial");
        assert!(
            why.starts_with("disk full") && why.contains("no space"),
            "{why}"
        );
        assert_eq!(classify(Some(130), None, "").1, "window ended");
        assert_eq!(classify(Some(4), None, "unreachable").0, "partial");
        assert_eq!(classify(Some(7), None, "").0, "partial");
        assert_eq!(classify(Some(5), None, "no title").0, "failed");
        assert_eq!(classify(Some(3), None, "forged").0, "failed");
        assert_eq!(classify(None, Some(libc::SIGKILL), "").0, "partial");
        assert_eq!(percent(1, 3), 33.3);
        assert_eq!(percent(0, 0), 100.0);
    }

    #[test]
    fn exit_code_says_whether_work_is_left() {
        let mut r = BatchReport {
            event: "batch",
            window: String::new(),
            started_unix: 0,
            ended_unix: 0,
            stopped: String::new(),
            done: 3,
            partial: 0,
            failed: 0,
            bytes_this_run: 0,
            received_bytes: 0,
            titles: Vec::new(),
        };
        assert_eq!(r.exit_code(), 0);
        r.partial = 1;
        assert_eq!(r.exit_code(), EXIT_LEFT);
        r.failed = 1;
        assert_eq!(r.exit_code(), EXIT_FAILED);
    }
}
