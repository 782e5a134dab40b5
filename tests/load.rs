//! Load test (issue 10): one `mcastd`, several titles, dozens of `mcast-recv get` processes on
//! one machine, started staggered. Asserted: every receiver completes with an archive
//! byte-identical to the server's, and every channel held its configured loop rate (wire
//! bytes sent over the time it looped, sampled from the server's stats, within ±10 %).
//!
//! `LOAD_RECEIVERS=N` runs more receivers (default 40). The rate per title is modest on
//! purpose: on 2 cores dozens of receivers compete for CPU; the point is correctness and rate
//! holding under many processes, not peak speed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcast::wire::data::DATA_HEADER_LEN;
use serde_json::Value;

mod common;
use common::{cpu_seconds, stats_within, Site};

const TITLES: usize = 4;
const TITLE_BYTES: usize = 5_000_000;
const RATE_MBPS: f64 = 24.0;
const SYMBOL: u64 = 1280;
/// Receivers start this far apart in total (spread evenly), so joins land mid-loop.
const STAGGER: Duration = Duration::from_secs(8);
/// A channel must have looped this long to have its rate judged (shorter ones are mostly
/// start-up and sampling error).
const MIN_WINDOW: Duration = Duration::from_millis(1500);

/// One channel while it was open: first and last stats sample with data sent.
struct Window {
    title: String,
    rate_bps: u64,
    first: Option<(Instant, u64)>,
    last: (Instant, u64),
}

/// Children's CPU seconds (user + system) of processes already waited for.
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[test]
fn load_dozens_of_receivers_several_titles() {
    let receivers: usize = std::env::var("LOAD_RECEIVERS")
        .ok()
        .map(|v| v.parse().expect("LOAD_RECEIVERS is a number"))
        .unwrap_or(40);
    let site = Site::new(41, &format!("rate_mbps = {RATE_MBPS}\nlease_ms = 5000"));
    let titles: Vec<(String, std::path::PathBuf)> = (0..TITLES)
        .map(|i| {
            let t = format!("title{i}");
            let p = site.pack(&t, TITLE_BYTES + i * 100_003, 500 + i as u64);
            (t, p)
        })
        .collect();
    let mut srv = site.serve();
    let server_pid = srv.guard.child.id();
    let cpu0 = cpu_seconds(server_pid).unwrap();

    // Stats sampler: every channel's packet count over time.
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
    let sampler = {
        let (stop, samples, control) = (stop.clone(), samples.clone(), site.control);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = stats_within(control, Duration::from_millis(300)) {
                    samples.lock().unwrap().push((Instant::now(), v));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let started = Instant::now();
    let children0 = children_cpu();
    let gap = STAGGER / receivers.max(1) as u32;
    let mut running = Vec::new();
    for i in 0..receivers {
        let (title, _) = &titles[i % TITLES];
        running.push(site.get(
            title,
            &site.out_dir(&format!("recv/r{i}")),
            &["--timeout", "150"],
        ));
        std::thread::sleep(gap);
    }
    let mut reports = Vec::new();
    for (i, r) in running.into_iter().enumerate() {
        let f = r.wait(Duration::from_secs(170));
        reports.push(f.assert_complete(&titles[i % TITLES].1));
    }
    let wall = started.elapsed();
    let receivers_cpu = children_cpu() - children0;
    srv.assert_running();
    let server_cpu = cpu_seconds(server_pid).unwrap() - cpu0;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    // Loop rates: per channel instance (a channel id whose packet count restarts is a new
    // one), wire bytes (header + symbol per packet, as the pacer counts them) over the time
    // between its first and last sample with data.
    let samples = samples.lock().unwrap();
    let mut open: BTreeMap<u64, Window> = BTreeMap::new();
    let mut windows = Vec::new();
    for (at, s) in samples.iter() {
        let chans = s["channels"].as_array().expect("channels");
        let ids: Vec<u64> = chans
            .iter()
            .map(|c| c["channel"].as_u64().unwrap())
            .collect();
        // Channels that closed since the last sample.
        for id in open.keys().copied().collect::<Vec<_>>() {
            if !ids.contains(&id) {
                windows.push(open.remove(&id).unwrap());
            }
        }
        for c in chans {
            let id = c["channel"].as_u64().unwrap();
            let packets = c["packets_sent"].as_u64().unwrap();
            let title = c["title"].as_str().unwrap().to_string();
            let restarted = open
                .get(&id)
                .is_some_and(|w| w.title != title || packets < w.last.1);
            if restarted {
                windows.push(open.remove(&id).unwrap());
            }
            let w = open.entry(id).or_insert(Window {
                title,
                rate_bps: c["rate_bps"].as_u64().unwrap(),
                first: None,
                last: (*at, packets),
            });
            w.last = (*at, packets);
            if packets > 0 && w.first.is_none() {
                w.first = Some((*at, packets));
            }
        }
    }
    windows.extend(open.into_values());

    let mut per_title: BTreeMap<String, (f64, f64, u64)> = BTreeMap::new();
    let mut judged = 0;
    let mut off_rate = Vec::new();
    for w in &windows {
        let Some((t0, p0)) = w.first else { continue };
        let (t1, p1) = w.last;
        let secs = t1.duration_since(t0).as_secs_f64();
        if t1.duration_since(t0) < MIN_WINDOW {
            continue;
        }
        judged += 1;
        let bits = (p1 - p0) as f64 * (DATA_HEADER_LEN as u64 + SYMBOL) as f64 * 8.0;
        let measured = bits / secs;
        let ratio = measured / w.rate_bps as f64;
        if !(0.9..=1.1).contains(&ratio) {
            off_rate.push(format!(
                "channel of {} looped at {:.2} Mbit/s over {secs:.1} s; configured {:.2}",
                w.title,
                measured / 1e6,
                w.rate_bps as f64 / 1e6
            ));
        }
        let e = per_title.entry(w.title.clone()).or_default();
        e.0 += bits;
        e.1 += secs;
        e.2 = w.rate_bps;
    }
    assert!(
        judged >= TITLES,
        "only {judged} channel windows long enough to judge: {} samples",
        samples.len()
    );

    let secs: Vec<f64> = reports.iter().map(|r| r.seconds).collect();
    let mean = secs.iter().sum::<f64>() / secs.len() as f64;
    let max = secs.iter().cloned().fold(0.0, f64::max);
    println!(
        "load summary: receivers {receivers}, titles {TITLES} x ~{:.1} MB at {RATE_MBPS} Mbit/s, \
         wall {:.1} s, failures {}",
        TITLE_BYTES as f64 / 1e6,
        wall.as_secs_f64(),
        off_rate.len()
    );
    println!(
        "  server CPU {server_cpu:.2} s ({:.0} % of one core); receivers' CPU {receivers_cpu:.1} s \
         in all ({:.2} s each)",
        100.0 * server_cpu / wall.as_secs_f64(),
        receivers_cpu / receivers.max(1) as f64
    );
    println!(
        "  per receiver: mean {mean:.1} s, max {max:.1} s; NAKs sent {}, repairs received {}, \
         unicast {}",
        reports.iter().map(|r| r.naks_sent).sum::<u64>(),
        reports.iter().map(|r| r.repairs_received).sum::<u64>(),
        reports.iter().filter(|r| r.unicast).count()
    );
    println!(
        "  {:<8} {:>10} {:>10} {:>8}",
        "title", "configured", "measured", "seconds"
    );
    for (t, (bits, secs, rate)) in &per_title {
        println!(
            "  {t:<8} {:>10.2} {:>10.2} {secs:>8.1}",
            *rate as f64 / 1e6,
            bits / secs / 1e6
        );
    }
    println!(
        "  channel windows judged {judged} (of {}), stats samples {}",
        windows.len(),
        samples.len()
    );
    assert!(off_rate.is_empty(), "loop rate not held: {off_rate:#?}");
}
