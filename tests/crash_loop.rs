//! Crash loop (issue 10): `kill -9` the server, the receivers and the play clients at random
//! moments over many iterations, with the real binaries on loopback.
//!
//! Each iteration (re)starts `mcastd` if it is down, (re)starts a `mcast-recv get` for every
//! unfinished download slot, maybe launches play clients just before the kill moment, sleeps a
//! random time and then SIGKILLs a random subset of server, receivers and play clients. At the
//! end everyone runs to completion. Asserted:
//!
//! * every completed archive is byte-identical to the server's, and the download directory
//!   then holds only `<title>.mca` (no part, state or temp file);
//! * every partial download resumes: a run never starts with fewer units than the previous
//!   run had held a checkpoint interval (with margin) before it was killed, or than it held
//!   when it exited on its own; and the final run completes it;
//! * the ticket database survives: `PRAGMA integrity_check` is ok, and for every ticket the
//!   plays used (`plays - plays_left` from `mcastd ticket list --json`) equal its grants,
//!   never exceed `plays`, are at least the plays the clients saw succeed and at most those
//!   plus the plays whose outcome a kill hid; a refusal ("already used") only when all were
//!   used; every successful play's output is the plaintext.
//!
//! Seeded: the seed is printed; `CRASH_SEED=N` replays one, `CRASH_ITERATIONS=N` runs longer.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcast_keys::ticket::TicketFile;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

mod common;
use common::{
    dir_names, mcastd_bin, random_bytes, recv_bin, serve_appending, Finished, Guard, Receiver, Site,
};

/// Downloaded titles (name, bytes); two download slots each.
const TITLES: [(&str, usize); 3] = [
    ("alpha", 3_000_000),
    ("beta", 2_400_017),
    ("gamma", 3_600_001),
];
const SLOTS_PER_TITLE: usize = 2;
/// The played title: downloaded once up front, then played with tickets throughout.
const FILM: (&str, usize, u64) = ("film", 700_001, 77);
/// Slow enough that a download spans several kills (a loop of `alpha` takes ~3 s).
const SERVER: &str = "rate_mbps = 8.0\nlease_ms = 3000";
/// `mcast-recv get` exit codes after which the same command resumes (README).
const RESUMABLE: [i32; 5] = [1, 4, 6, 7, 130];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// One download destination: a fresh directory per generation (a finished slot starts over).
struct Slot {
    title: &'static str,
    reference: PathBuf,
    idx: usize,
    generation: u32,
    run: Option<Receiver>,
    /// Runs of the current generation, and packets they received (last progress line for a
    /// killed run, the final report for the completing one).
    runs: u32,
    packets: u64,
    /// Units the next run must start with at least (checkpointed by an earlier run: the
    /// `saved` of its last progress line, which counts only what a completed checkpoint made
    /// durable, so no timing assumption about fsync on a loaded host is needed).
    owed: u64,
}

impl Slot {
    /// The file is complete: start over in a fresh directory.
    fn next_generation(&mut self) {
        self.generation += 1;
        self.runs = 0;
        self.packets = 0;
        self.owed = 0;
    }

    fn dir(&self, site: &Site) -> PathBuf {
        site.path(&format!(
            "recv/{}-{}-g{}",
            self.title, self.idx, self.generation
        ))
    }
}

/// Totals for the summary.
#[derive(Default)]
struct Tally {
    server_kills: u32,
    receiver_kills: u32,
    receiver_runs: u32,
    resumable_exits: BTreeMap<i32, u32>,
    completed: u32,
    resumed_completions: u32,
    /// Over completed files: packets received across all runs / loop units.
    packet_ratio_sum: f64,
    packet_ratio_max: f64,
    play_kills: u32,
    plays_ok: u32,
    plays_refused: u32,
    plays_unknown: u32,
}

/// A play ticket and what its clients saw.
struct TicketLog {
    file: PathBuf,
    id: String,
    plays: u32,
    ok: u32,
    refused: u32,
    /// Attempts a kill (of the client, or the server it was talking to) left undecided.
    unknown: u32,
}

struct Play {
    guard: Guard,
    ticket: usize,
    out: PathBuf,
    stderr: PathBuf,
}

struct Crash {
    site: Site,
    log: PathBuf,
    server: Option<Guard>,
    film_dir: PathBuf,
    film: Vec<u8>,
    tickets: Vec<TicketLog>,
    plays: Vec<Play>,
    play_n: u32,
    tally: Tally,
}

impl Crash {
    fn mcastd(&self, args: &[&str]) -> std::process::Output {
        Command::new(mcastd_bin())
            .arg("--config")
            .arg(&self.site.cfg)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("MCASTD_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run mcastd")
    }

    fn ensure_server(&mut self) {
        let up = match &mut self.server {
            Some(g) => g.child.try_wait().unwrap().is_none(),
            None => false,
        };
        if !up {
            assert!(
                self.server.is_none(),
                "mcastd exited on its own:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            self.server = Some(serve_appending(
                &self.site.cfg,
                self.site.control,
                &self.log,
            ));
        }
    }

    fn kill_server(&mut self) {
        if let Some(mut g) = self.server.take() {
            g.kill();
            self.tally.server_kills += 1;
        }
    }

    fn issue(&mut self, plays: u32) -> usize {
        let n = self.tickets.len();
        let file = self.site.path(&format!("wallet/t{n}.ticket"));
        let out = self.mcastd(&[
            "ticket",
            "issue",
            FILM.0,
            "--holder",
            &format!("box-{n}"),
            "--plays",
            &plays.to_string(),
            "-o",
            file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "ticket issue: {out:?}");
        let id = TicketFile::from_file_bytes(&fs::read(&file).unwrap())
            .expect("ticket file decodes")
            .ticket()
            .id_hex();
        self.tickets.push(TicketLog {
            file,
            id,
            plays,
            ok: 0,
            refused: 0,
            unknown: 0,
        });
        n
    }

    fn start_play(&mut self, ticket: usize) {
        self.play_n += 1;
        let out = self.site.path(&format!("plays/p{}.bin", self.play_n));
        let stderr = self.site.path(&format!("plays/p{}.stderr", self.play_n));
        let guard = Guard::spawn(
            Command::new(recv_bin())
                .args(["play", FILM.0, "--ticket"])
                .arg(&self.tickets[ticket].file)
                .arg("--dir")
                .arg(&self.film_dir)
                .arg("-o")
                .arg(&out)
                .arg("--server")
                .arg(self.site.control.to_string())
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&stderr).unwrap()),
            false,
        );
        self.plays.push(Play {
            guard,
            ticket,
            out,
            stderr,
        });
    }

    /// Record the outcome of every play client that has exited (or of all, killing the
    /// ones still running, when `kill_all`).
    fn reap_plays(&mut self, kill_all: bool) {
        let mut still = Vec::new();
        for mut p in std::mem::take(&mut self.plays) {
            let code = match p.guard.child.try_wait().unwrap() {
                Some(st) => st.code(),
                None if kill_all => {
                    p.guard.kill();
                    self.tally.play_kills += 1;
                    None
                }
                None => {
                    still.push(p);
                    continue;
                }
            };
            self.record_play(&p, code);
        }
        self.plays = still;
    }

    fn kill_play(&mut self, i: usize) {
        let mut p = self.plays.swap_remove(i);
        p.guard.kill();
        self.tally.play_kills += 1;
        self.record_play(&p, None);
    }

    /// One play's outcome: `None` = killed by the test.
    fn record_play(&mut self, p: &Play, code: Option<i32>) {
        let err = fs::read_to_string(&p.stderr).unwrap_or_default();
        let t = &mut self.tickets[p.ticket];
        // Whatever the outcome, an output under its final name is the whole plaintext: the
        // client renames it into place only after every frame checked out.
        if p.out.exists() {
            assert!(
                fs::read(&p.out).unwrap() == self.film,
                "{} is not the plaintext (exit {code:?}): {err}",
                p.out.display()
            );
        }
        match code {
            Some(0) => {
                assert!(p.out.exists(), "play exited 0 without its output: {err}");
                t.ok += 1;
                self.tally.plays_ok += 1;
            }
            Some(8) => {
                assert!(
                    err.contains("already used"),
                    "ticket {} refused for another reason: {err}",
                    t.id
                );
                t.refused += 1;
                self.tally.plays_refused += 1;
            }
            // Killed, or gave up on a server that was killed (unreachable / timed out).
            None | Some(4) | Some(7) => {
                t.unknown += 1;
                self.tally.plays_unknown += 1;
            }
            Some(c) => panic!("play of ticket {} exited {c}: {err}", t.id),
        }
    }
}

/// Check a run that ended (killed or exited); update the slot. Returns true when the slot's
/// file is complete (and verified).
fn end_run(slot: &mut Slot, f: &Finished, killed: bool, tally: &mut Tally) -> bool {
    let progress = f.progress();
    // Resume: the first thing this run reported holding covers what earlier runs owed it.
    if let Some(first) = progress.first() {
        let have = first["have"].as_u64().unwrap();
        assert!(
            have >= slot.owed,
            "{}: run {} started with {have} units, but {} were checkpointed before: {f:#?}",
            slot.title,
            slot.runs,
            slot.owed
        );
    }
    if killed {
        slot.packets += progress
            .last()
            .map_or(0, |p| p["received_packets"].as_u64().unwrap());
        if let Some(saved) = progress.last().and_then(|p| p["saved"].as_u64()) {
            slot.owed = slot.owed.max(saved);
        }
        return false;
    }
    match f.code {
        Some(0) => {
            let r = f.assert_complete(&slot.reference);
            assert!(
                r.units_at_start >= slot.owed,
                "{}: final run started with {} units, {} were owed",
                slot.title,
                r.units_at_start,
                slot.owed
            );
            assert_eq!(
                r.units_failed_recheck, 0,
                "{}: units of the part file failed the re-check",
                slot.title
            );
            slot.packets += r.received_packets;
            let ratio = slot.packets as f64 / r.loop_units as f64;
            tally.completed += 1;
            tally.resumed_completions += (slot.runs > 1) as u32;
            tally.packet_ratio_sum += ratio;
            tally.packet_ratio_max = tally.packet_ratio_max.max(ratio);
            let names = dir_names(&f.out);
            assert_eq!(
                names,
                vec![format!("{}.mca", slot.title)],
                "stray files next to a finished download"
            );
            true
        }
        Some(c) if RESUMABLE.contains(&c) => {
            // A graceful give-up checkpoints what it holds.
            if let Some(last) = progress.last() {
                slot.owed = slot.owed.max(last["have"].as_u64().unwrap());
            }
            slot.packets += progress
                .last()
                .map_or(0, |p| p["received_packets"].as_u64().unwrap());
            *tally.resumable_exits.entry(c).or_default() += 1;
            false
        }
        _ => panic!("{}: receiver failed: {f:#?}", slot.title),
    }
}

fn start_run(site: &Site, slot: &mut Slot, tally: &mut Tally, timeout: &str) {
    let dir = slot.dir(site);
    slot.run = Some(site.get(slot.title, &dir, &["--timeout", timeout]));
    slot.runs += 1;
    tally.receiver_runs += 1;
}

#[test]
fn crash_loop_kill9_server_receivers_and_players() {
    let seed = env_u64("CRASH_SEED").unwrap_or_else(rand::random);
    let iterations = env_u64("CRASH_ITERATIONS").unwrap_or(30) as u32;
    println!("crash loop: seed {seed} (CRASH_SEED={seed} replays it), {iterations} iterations");
    let mut rng = SmallRng::seed_from_u64(seed);
    let started = Instant::now();

    let site = Site::new(40, SERVER);
    let db = site.path("tickets.sqlite");
    let mut cfg = fs::read_to_string(&site.cfg).unwrap();
    cfg.push_str(&format!("\n[tickets]\ndb = '{}'\n", db.display()));
    fs::write(&site.cfg, cfg).unwrap();
    for d in ["wallet", "plays", "recv"] {
        fs::create_dir_all(site.path(d)).unwrap();
    }
    let mut slots = Vec::new();
    for (i, (title, len)) in TITLES.iter().enumerate() {
        let reference = site.pack(title, *len, 100 + i as u64);
        for s in 0..SLOTS_PER_TITLE {
            slots.push(Slot {
                title,
                reference: reference.clone(),
                idx: s,
                generation: 0,
                run: None,
                runs: 0,
                packets: 0,
                owed: 0,
            });
        }
    }
    let film_ref = site.pack(FILM.0, FILM.1, FILM.2);
    let log = site.path("mcastd.log");
    let film_dir = site.path("film");
    let mut c = Crash {
        server: None,
        log,
        film_dir,
        film: random_bytes(FILM.1, FILM.2),
        tickets: Vec::new(),
        plays: Vec::new(),
        play_n: 0,
        tally: Tally::default(),
        site,
    };
    c.ensure_server();
    // The played archive is downloaded once, undisturbed.
    c.site
        .get(FILM.0, &c.film_dir, &["--timeout", "40"])
        .wait(Duration::from_secs(50))
        .assert_complete(&film_ref);

    for it in 0..iterations {
        // A server killed last time comes back after a random pause (play clients retry
        // meanwhile; receivers wait and join again).
        if c.server.is_none() {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        }
        c.ensure_server();
        c.reap_plays(false);
        for slot in slots.iter_mut() {
            let exited = slot.run.as_mut().and_then(|r| r.try_finish());
            if let Some(f) = exited {
                slot.run = None;
                if end_run(slot, &f, false, &mut c.tally) {
                    slot.next_generation();
                }
            }
            if slot.run.is_none() {
                start_run(&c.site, slot, &mut c.tally, "60");
            }
        }

        // Sleep to the kill moment, and start play clients in the last few tens of ms, so
        // some exchanges are cut.
        let sleep = Duration::from_millis(rng.gen_range(200..2500));
        let kill_at = Instant::now() + sleep;
        let plays = if rng.gen_bool(0.7) {
            rng.gen_range(1..=2)
        } else {
            0
        };
        let play_lead = Duration::from_millis(rng.gen_range(0..80));
        std::thread::sleep(
            kill_at
                .saturating_duration_since(Instant::now())
                .saturating_sub(play_lead),
        );
        for _ in 0..plays {
            let t = if c.tickets.is_empty() || rng.gen_bool(0.4) {
                let n = [1, 1, 2, 3][rng.gen_range(0..4)];
                c.issue(n)
            } else {
                rng.gen_range(0..c.tickets.len())
            };
            c.start_play(t);
        }
        std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));

        // The kills.
        if rng.gen_bool(0.35) {
            c.kill_server();
        }
        let mut killed = 0;
        for slot in slots.iter_mut() {
            if slot.run.is_none() || !rng.gen_bool(0.5) {
                continue;
            }
            let mut run = slot.run.take().unwrap();
            // One that already finished is judged by its exit (next iteration).
            if let Some(f) = run.try_finish() {
                if end_run(slot, &f, false, &mut c.tally) {
                    slot.next_generation();
                }
                continue;
            }
            let f = run.kill9();
            killed += 1;
            end_run(slot, &f, true, &mut c.tally);
        }
        c.tally.receiver_kills += killed;
        let mut i = 0;
        while i < c.plays.len() {
            if rng.gen_bool(0.5) {
                c.kill_play(i);
            } else {
                i += 1;
            }
        }
        println!(
            "iteration {it}: server {}, {killed} receivers killed, {} tickets, {:.0} s",
            if c.server.is_some() { "up" } else { "KILLED" },
            c.tickets.len(),
            started.elapsed().as_secs_f64()
        );
    }

    // Everyone runs to completion.
    c.ensure_server();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !c.plays.is_empty() && Instant::now() < deadline {
        c.reap_plays(false);
        std::thread::sleep(Duration::from_millis(20));
    }
    c.reap_plays(true);
    for slot in slots.iter_mut() {
        if let Some(mut r) = slot.run.take() {
            match r.try_finish() {
                Some(f) if end_run(slot, &f, false, &mut c.tally) => {
                    slot.next_generation();
                    continue;
                }
                Some(_) => {}
                None => {
                    slot.run = Some(r);
                    continue;
                }
            }
        }
        start_run(&c.site, slot, &mut c.tally, "90");
    }
    for slot in slots.iter_mut() {
        if let Some(r) = slot.run.take() {
            let f = r.wait(Duration::from_secs(100));
            assert_eq!(
                f.code,
                Some(0),
                "{}: final run did not complete: {f:#?}",
                slot.title
            );
            assert!(end_run(slot, &f, false, &mut c.tally));
            slot.next_generation();
        }
    }

    // The ticket database still works: a fresh single-use ticket plays once, then is refused.
    let t = c.issue(1);
    for _ in 0..2 {
        c.start_play(t);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.plays.is_empty() {
            c.reap_plays(false);
            assert!(Instant::now() < deadline, "play did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert_eq!(
        (c.tickets[t].ok, c.tickets[t].refused),
        (1, 1),
        "fresh ticket after the crash loop"
    );
    c.kill_server();

    let cut_used = check_ticket_db(&c, &db);

    let t = &c.tally;
    let stray_play_tmp = dir_names(&c.site.path("plays"))
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .count();
    println!(
        "crash loop summary: seed {seed}, iterations {iterations}, wall {:.0} s\n\
         server kills {}, receiver runs {}, receiver kills {}, resumable exits {:?}\n\
         files completed {} ({} after resumes), received/loop packets mean {:.2} max {:.2}\n\
         tickets {}, plays ok {}, refused {}, cut by a kill {} ({cut_used} of them had used a play; play clients killed {}), \
         play temp files left by killed clients {stray_play_tmp}\nfailures: 0",
        started.elapsed().as_secs_f64(),
        t.server_kills,
        t.receiver_runs,
        t.receiver_kills,
        t.resumable_exits,
        t.completed,
        t.resumed_completions,
        t.packet_ratio_sum / t.completed.max(1) as f64,
        t.packet_ratio_max,
        c.tickets.len(),
        t.plays_ok,
        t.plays_refused,
        t.plays_unknown,
        t.play_kills,
    );
    assert_eq!(
        t.completed as usize,
        slots.iter().map(|s| s.generation as usize).sum::<usize>()
    );
    assert!(t.completed as usize >= slots.len(), "every slot completes");
    // Resumes are checked run by run above; this bounds the duplicates a resumed download
    // takes in (it joins mid-loop each time): seen 1.3-1.8 on average.
    let mean_ratio = t.packet_ratio_sum / t.completed.max(1) as f64;
    assert!(
        mean_ratio <= 3.0,
        "downloads took in {mean_ratio:.2}x their packets on average"
    );
}

/// The database after the loop: integrity, and every ticket's count against its clients.
fn check_ticket_db(c: &Crash, db: &Path) -> u32 {
    let mut cut_used = 0;
    let conn = rusqlite::Connection::open(db).expect("ticket DB opens");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "integrity_check");
    let fk: i64 = conn
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(fk, 0, "foreign_key_check");
    drop(conn);

    let out = c.mcastd(&["ticket", "list", "--json"]);
    assert!(out.status.success(), "ticket list: {out:?}");
    let rows: BTreeMap<String, Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["ticket_id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(rows.len(), c.tickets.len(), "every issued ticket is listed");
    for t in &c.tickets {
        let row = &rows[&t.id];
        let plays = row["plays"].as_u64().unwrap() as u32;
        let left = row["plays_left"].as_u64().unwrap() as u32;
        let grants = row["grants"].as_u64().unwrap() as u32;
        let used = plays - left.min(plays);
        let what = format!(
            "ticket {} ({} plays): used {used}, grants {grants}, clients saw ok {} refused {} \
             undecided {}",
            t.id, t.plays, t.ok, t.refused, t.unknown
        );
        assert_eq!(plays, t.plays, "{what}");
        assert!(left <= plays, "{what}");
        assert_eq!(grants, used, "every play used is one grant: {what}");
        assert!(
            used >= t.ok && used <= t.ok + t.unknown,
            "plays used must be the successes plus at most the cut ones: {what}"
        );
        if t.refused > 0 {
            assert_eq!(used, plays, "refused while plays were left: {what}");
        }
        cut_used += used - t.ok;
    }
    cut_used
}
