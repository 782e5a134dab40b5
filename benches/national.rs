//! A national deployment, simulated: 1 origin, 100 edges, 1,000,000 receivers, 1,000 titles.
//!
//! `cargo bench --bench national` prints what the origin and each edge send in one day
//! (an overnight pre-load, then one evening of requests), for mcast (origin → edges by
//! multicast or unicast, carousels at each edge, HTTP for receivers without multicast) and for
//! a unicast-only CDN delivering the same requests from the same edge sites. Arguments
//! `key=value` change the model (`edges=`, `receivers=`, `titles=`, `zipf=`, `rate_mbps=`,
//! `preload=`, `no_mcast=`, `seed=`, `evening_h=`); every figure comes from a seeded run, so
//! one command reproduces it.
//!
//! The model, and why:
//! - *Titles*: sizes drawn uniformly from 1–4 GB (a 90-minute film at 1.5–6 Mbit/s);
//!   popularity Zipf(s) over the catalogue (0.9 by default: the VoD literature's 0.6–1.0).
//! - *Requests*: every receiver asks for one title per evening, at a uniform time in a
//!   4-hour window (19:00–23:00); receivers are spread evenly over the edges.
//! - *Edges* hold the `preload` most popular titles (pre-loaded overnight by `mcast-recv
//!   batch`, placed by the directors' demand report). The first request at an edge for any
//!   other title makes the edge fetch it from the origin once (counted as origin egress for
//!   both systems: a CDN's cache fill is the same).
//! - *Carousel*: a title loops at an edge at `rate_mbps` while any receiver is listening; a
//!   receiver joins wherever the loop is and leaves after one loop's worth plus 5 % repairs
//!   (the mixed-bed and simulator figures: 1.00–1.06 loops). The edge sends
//!   `rate × (union of the receivers' listening intervals)`: exact, by a sweep over each
//!   title's sorted arrivals. One multicast domain per edge (its own segment).
//! - *No multicast*: a share of receivers (`no_mcast`, 20 %) sit where multicast does not
//!   reach; they fetch the whole title over HTTP (or the adaptive unicast stream: 1.01× in
//!   the simulator), one copy each, from their edge.
//! - *Boxes pre-load* (`box_preload`, 10): every receiver pre-loads the most popular titles
//!   overnight (`mcast-recv batch`) from one loop of each at its edge, so an evening request
//!   for one is played from disk. Boxes without multicast do not pre-load (one copy each
//!   would cost more than fetching on demand). The CDN is given its best case: on demand only.
//! - *CDN*: every receiver gets its own copy from its edge (HTTP, plus 3 % for TCP/IP and
//!   HTTP overhead, against our 5 % repairs). Peak rates assume each download runs at the
//!   same `rate_mbps` for both systems.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Model {
    edges: usize,
    receivers: usize,
    titles: usize,
    zipf: f64,
    rate_mbps: f64,
    preload: usize,
    no_mcast: f64,
    evening_h: f64,
    /// Titles every receiver (set-top box) pre-loads overnight with `mcast-recv batch`.
    box_preload: usize,
    seed: u64,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            edges: 100,
            receivers: 1_000_000,
            titles: 1_000,
            zipf: 0.9,
            rate_mbps: 40.0,
            preload: 1_000,
            no_mcast: 0.2,
            evening_h: 4.0,
            box_preload: 10,
            seed: 16,
        }
    }
}

const GB: f64 = 1e9;
/// Repairs on top of one loop (the mixed-bed receivers fetched 1.00–1.06 loops).
const REPAIR: f64 = 0.05;
/// TCP/IP + HTTP overhead of a unicast copy.
const HTTP_OVERHEAD: f64 = 0.03;

fn parse_args() -> Model {
    let mut m = Model::default();
    for a in std::env::args().skip(1) {
        let Some((k, v)) = a.split_once('=') else {
            continue; // `--bench` from cargo
        };
        let f: f64 = v
            .parse()
            .unwrap_or_else(|_| panic!("{k}={v}: not a number"));
        match k {
            "edges" => m.edges = f as usize,
            "receivers" => m.receivers = f as usize,
            "titles" => m.titles = f as usize,
            "zipf" => m.zipf = f,
            "rate_mbps" => m.rate_mbps = f,
            "preload" => m.preload = f as usize,
            "no_mcast" => m.no_mcast = f,
            "evening_h" => m.evening_h = f,
            "seed" => m.seed = f as u64,
            "box_preload" => m.box_preload = f as usize,
            _ => panic!("unknown parameter {k} (edges, receivers, titles, zipf, rate_mbps, preload, no_mcast, evening_h, box_preload, seed)"),
        }
    }
    m
}

/// One edge's day.
#[derive(Default)]
struct EdgeDay {
    carousel_bytes: f64,
    http_bytes: f64,
    cdn_bytes: f64,
    fills: usize,
    fill_bytes: f64,
    /// Busiest instant: concurrent loops (carousel + unicast copies) and CDN copies, in Mbit/s.
    peak_mbps: f64,
    cdn_peak_mbps: f64,
    titles_looped: usize,
    /// Evening requests for titles the box pre-loaded overnight (no network).
    local_plays: usize,
}

/// Largest number of open intervals at once, times `rate`.
fn peak(intervals: &mut [(f64, f64)], rate: f64) -> f64 {
    let mut ev: Vec<(f64, i32)> = Vec::with_capacity(intervals.len() * 2);
    for &(a, b) in intervals.iter() {
        ev.push((a, 1));
        ev.push((b, -1));
    }
    ev.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        max = max.max(cur);
    }
    max as f64 * rate
}

fn main() {
    let m = parse_args();
    let mut rng = SmallRng::seed_from_u64(m.seed);
    let sizes: Vec<f64> = (0..m.titles)
        .map(|_| rng.gen_range(1.0..4.0) * GB)
        .collect();
    // Zipf popularity: cumulative weights, drawn by binary search.
    let mut cum = Vec::with_capacity(m.titles);
    let mut acc = 0.0;
    for k in 1..=m.titles {
        acc += 1.0 / (k as f64).powf(m.zipf);
        cum.push(acc);
    }
    let draw = |rng: &mut SmallRng| -> usize {
        let x = rng.gen::<f64>() * acc;
        cum.partition_point(|&c| c < x).min(m.titles - 1)
    };
    let rate_bps = m.rate_mbps * 1e6 / 8.0;
    let window = m.evening_h * 3600.0;
    let per_edge = m.receivers / m.edges;
    let preload_bytes: f64 = sizes[..m.preload.min(m.titles)].iter().sum::<f64>() + 0.0;

    let mut days = Vec::with_capacity(m.edges);
    for _ in 0..m.edges {
        // Per title: multicast arrivals; unicast (no multicast) copies counted apart.
        let mut arrivals: HashMap<usize, Vec<f64>> = HashMap::new();
        let mut d = EdgeDay::default();
        let mut unicast_iv: Vec<(f64, f64)> = Vec::new();
        let mut cdn_iv: Vec<(f64, f64)> = Vec::with_capacity(per_edge);
        let mut requested = vec![false; m.titles];
        for _ in 0..per_edge {
            let t = draw(&mut rng);
            let at = rng.gen::<f64>() * window;
            let secs = sizes[t] / rate_bps;
            // The CDN is best on demand: it pre-loads no box.
            d.cdn_bytes += sizes[t] * (1.0 + HTTP_OVERHEAD);
            cdn_iv.push((at, at + secs * (1.0 + HTTP_OVERHEAD)));
            let multicast = rng.gen::<f64>() >= m.no_mcast;
            if multicast && t < m.box_preload {
                d.local_plays += 1;
                continue; // pre-loaded overnight from the edge's loop: played from disk
            }
            requested[t] = true;
            if !multicast {
                d.http_bytes += sizes[t] * (1.0 + HTTP_OVERHEAD);
                unicast_iv.push((at, at + secs * (1.0 + HTTP_OVERHEAD)));
            } else {
                arrivals.entry(t).or_default().push(at);
            }
        }
        for (t, was) in requested.iter().enumerate() {
            if *was && t >= m.preload {
                d.fills += 1;
                d.fill_bytes += sizes[t];
            }
        }
        // Carousel busy intervals: the union of [arrival, arrival + one loop + repairs].
        let mut busy: Vec<(f64, f64)> = Vec::new();
        for (t, mut a) in arrivals {
            a.sort_by(f64::total_cmp);
            let listen = sizes[t] / rate_bps * (1.0 + REPAIR);
            let (mut s, mut e) = (a[0], a[0] + listen);
            for &x in &a[1..] {
                if x <= e {
                    e = x + listen;
                } else {
                    busy.push((s, e));
                    (s, e) = (x, x + listen);
                }
            }
            busy.push((s, e));
            d.titles_looped += 1;
        }
        d.carousel_bytes = busy.iter().map(|(a, b)| (b - a) * rate_bps).sum();
        busy.extend(unicast_iv);
        d.peak_mbps = peak(&mut busy, m.rate_mbps);
        d.cdn_peak_mbps = peak(&mut cdn_iv, m.rate_mbps);
        days.push(d);
    }

    let sum = |f: &dyn Fn(&EdgeDay) -> f64| days.iter().map(f).sum::<f64>();
    let max = |f: &dyn Fn(&EdgeDay) -> f64| days.iter().map(f).fold(0.0, f64::max);
    let mcast_edge = |d: &EdgeDay| d.carousel_bytes + d.http_bytes;
    let fills = sum(&|d| d.fill_bytes);
    let catalogue: f64 = sizes.iter().sum();

    println!(
        "national deployment: {} edges, {} receivers ({} per edge), {} titles ({:.2} TB, mean {:.2} GB), Zipf {}, {} Mbit/s loops, {} titles pre-loaded per edge ({:.2} TB), {:.0} % without multicast, {} h evening, seed {}",
        m.edges,
        m.receivers,
        per_edge,
        m.titles,
        catalogue / 1e12,
        catalogue / m.titles as f64 / GB,
        m.zipf,
        m.rate_mbps,
        m.preload,
        preload_bytes / 1e12,
        m.no_mcast * 100.0,
        m.evening_h,
        m.seed
    );
    println!();
    println!("origin egress (one day)");
    println!(
        "  overnight pre-load, origin -> edges by multicast (one copy + 5 % repairs): {:>9.2} TB  ({:.2} Gbit/s over an 8 h night)",
        preload_bytes * (1.0 + REPAIR) / 1e12,
        preload_bytes * (1.0 + REPAIR) * 8.0 / (8.0 * 3600.0) / 1e9
    );
    println!(
        "  overnight pre-load, origin -> edges by unicast (batch over the stream/HTTP): {:>9.2} TB  ({:.2} Gbit/s over an 8 h night)",
        preload_bytes * m.edges as f64 * (1.0 + HTTP_OVERHEAD) / 1e12,
        preload_bytes * m.edges as f64 * (1.0 + HTTP_OVERHEAD) * 8.0 / (8.0 * 3600.0) / 1e9
    );
    println!(
        "  evening fills of titles not pre-loaded (both systems): {:>9.2} TB  ({:.1} titles per edge)",
        fills / 1e12,
        sum(&|d| d.fills as f64) / m.edges as f64
    );
    // Overnight box pre-load: one loop (+ repairs) of each title per edge domain, for the
    // boxes multicast reaches; the others fetch on demand.
    let box_bytes: f64 = sizes[..m.box_preload.min(m.titles)].iter().sum::<f64>() + 0.0;
    let box_mcast = box_bytes * (1.0 + REPAIR);
    println!();
    println!(
        "edge egress (night): the multicast boxes pre-load the top {} titles ({:.1} GB) from one loop each: {:.3} TB per edge; {:.1} % of the evening's requests are then played from disk",
        m.box_preload,
        box_bytes / GB,
        box_mcast / 1e12,
        sum(&|d| d.local_plays as f64) * 100.0 / (per_edge * m.edges) as f64
    );
    println!();
    println!("edge egress (evening)           mcast           unicast CDN      ratio");
    println!(
        "  mean per edge            {:>9.2} TB        {:>9.2} TB     {:>6.3}",
        sum(&mcast_edge) / m.edges as f64 / 1e12,
        sum(&|d| d.cdn_bytes) / m.edges as f64 / 1e12,
        sum(&mcast_edge) / sum(&|d| d.cdn_bytes)
    );
    println!(
        "    of which carousels     {:>9.2} TB   ({:.0} titles looped per edge)",
        sum(&|d| d.carousel_bytes) / m.edges as f64 / 1e12,
        sum(&|d| d.titles_looped as f64) / m.edges as f64
    );
    println!(
        "    of which HTTP/unicast  {:>9.2} TB   (receivers without multicast)",
        sum(&|d| d.http_bytes) / m.edges as f64 / 1e12
    );
    println!(
        "  largest edge             {:>9.2} TB        {:>9.2} TB",
        max(&mcast_edge) / 1e12,
        max(&|d| d.cdn_bytes) / 1e12
    );
    println!(
        "  peak rate, busiest edge  {:>9.2} Gbit/s    {:>9.2} Gbit/s {:>6.3}",
        max(&|d| d.peak_mbps) / 1e3,
        max(&|d| d.cdn_peak_mbps) / 1e3,
        max(&|d| d.peak_mbps) / max(&|d| d.cdn_peak_mbps)
    );
    println!(
        "  all edges together       {:>9.2} PB        {:>9.2} PB",
        sum(&mcast_edge) / 1e15,
        sum(&|d| d.cdn_bytes) / 1e15
    );
    let day_mcast = sum(&mcast_edge) / m.edges as f64 + box_mcast;
    let day_cdn = sum(&|d| d.cdn_bytes) / m.edges as f64;
    println!(
        "  day per edge (night + evening) {:>9.2} TB  {:>9.2} TB     {:>6.3}",
        day_mcast / 1e12,
        day_cdn / 1e12,
        day_mcast / day_cdn
    );
}
