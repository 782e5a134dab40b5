//! The mixed audience: what an operator's network looks like, in one run — clean receivers,
//! receivers with 1–10 % random loss, receivers behind links of 8–1000 Mbit/s, late joiners,
//! a receiver whose network drops multicast, all fetching one title at once, each leaving
//! when done (its IGMP leave reaching the switch after the leave latency). Every receiver is
//! a real [`Session`](crate::receiver::Session) against the real channel manager.
//!
//! No thresholds here: the report (per receiver completion time, bytes received per archive
//! byte, the tier it settled on and its tier changes) shows where adaptation holds and where
//! it does not; `cargo bench --bench sim -- mixed` prints it.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::world::{self, RxSpec, WorldConfig};
use crate::channel::{Params, RatePolicy};

#[derive(Clone, Debug, Serialize)]
pub struct MixedConfig {
    pub seed: u64,
    pub receivers: usize,
    pub data_packets: u64,
    pub symbol_size: u32,
    /// Tier rates, ascending (bit/s); one entry: a single fixed-rate channel.
    pub tiers_bps: Vec<u64>,
    pub one_way_delay: Duration,
    pub queue_limit: Duration,
    pub leave_latency: Duration,
    /// An IGMPv2 querier (general queries this often): a member leaving stops the group for
    /// the others until they report again. `None`: IGMPv3.
    pub igmp_v2_query: Option<Duration>,
    pub max_time: Duration,
}

impl MixedConfig {
    /// `receivers` receivers; tiers of 8, 40, 200 and 800 Mbit/s.
    pub fn new(receivers: usize, data_packets: u64, seed: u64) -> MixedConfig {
        MixedConfig {
            seed,
            receivers,
            data_packets,
            symbol_size: 1280,
            tiers_bps: vec![8_000_000, 40_000_000, 200_000_000, 800_000_000],
            one_way_delay: Duration::from_millis(2),
            queue_limit: Duration::from_millis(50),
            leave_latency: Duration::from_secs(1),
            igmp_v2_query: None,
            max_time: Duration::from_secs(300),
        }
    }
}

/// What kind of receiver it is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    pub kind: &'static str,
    /// Its link's rate (bit/s), 0 for no limit.
    pub link_bps: u64,
    pub loss: f64,
    pub join_s: f64,
    pub multicast: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MixedRx {
    pub profile: Profile,
    /// From its join to holding every packet; `None`: not within the run.
    pub seconds: Option<f64>,
    /// Payload bytes received per byte of the archive's loop.
    pub received_per_archive_byte: f64,
    pub settled_tier: usize,
    pub final_tier: usize,
    pub tier_changes: u32,
    pub naks_sent: u64,
    /// Repair packets and packets already held, among those received.
    pub repairs_received: u64,
    pub duplicates: u64,
    pub unicast: bool,
    pub failed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MixedReport {
    pub receivers: Vec<MixedRx>,
    /// Seconds one loop takes at each tier's nominal rate.
    pub loop_seconds: Vec<f64>,
    pub completed: usize,
    pub sim_seconds: f64,
}

/// The audience: profiles cycle so that 4 receivers are one of each main kind and 200 are
/// fifty of each, with the rates and losses spread.
fn profile(i: usize, rng: &mut SmallRng) -> Profile {
    let rates = [
        8_000_000u64,
        20_000_000,
        50_000_000,
        200_000_000,
        1_000_000_000,
    ];
    let mut p = Profile {
        kind: "clean",
        link_bps: 0,
        loss: 0.0,
        join_s: rng.gen::<f64>() * 0.2,
        multicast: true,
    };
    match i % 4 {
        0 => {}
        1 => {
            p.kind = "lossy";
            p.loss = [0.01, 0.03, 0.05, 0.10][(i / 4) % 4];
        }
        2 => {
            p.kind = "rate-limited";
            p.link_bps = rates[(i / 4) % rates.len()];
        }
        _ => {
            p.kind = "late";
            p.join_s = 2.0 + rng.gen::<f64>() * 3.0;
        }
    }
    if i > 0 && i % 25 == 0 {
        p.kind = "no-multicast";
        p.multicast = false;
    }
    p
}

/// Run the mixed audience from `t0` (the simulator reads no clock).
pub fn run(cfg: &MixedConfig, t0: Instant) -> MixedReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x313d);
    let profiles: Vec<Profile> = (0..cfg.receivers).map(|i| profile(i, &mut rng)).collect();
    let mut params = Params::for_tests(cfg.tiers_bps[0]);
    if cfg.tiers_bps.len() > 1 {
        params.tiers_bps = cfg.tiers_bps.clone();
    }
    params.rate_policy = RatePolicy::Lowest;
    params.lease = Duration::from_secs(2);
    params.max_unicast_per_channel = cfg.receivers.max(1);
    let receivers = profiles
        .iter()
        .map(|p| {
            let mut r = RxSpec::new(Duration::from_secs_f64(p.join_s));
            if p.link_bps > 0 {
                r.link = vec![(Duration::ZERO, p.link_bps)];
            }
            r.loss = p.loss;
            r.multicast = p.multicast;
            r
        })
        .collect();
    let w = WorldConfig {
        one_way_delay: cfg.one_way_delay,
        peer_delay: cfg.one_way_delay * 2,
        queue_limit: cfg.queue_limit,
        leave_latency: cfg.leave_latency,
        igmp_v2_query: cfg.igmp_v2_query,
        max_time: cfg.max_time,
        ..WorldConfig::new(
            cfg.seed,
            cfg.data_packets,
            cfg.symbol_size,
            params,
            receivers,
        )
    };
    let out = world::run(&w, t0);
    let k = (cfg.symbol_size / 32) as u64;
    let units = cfg.data_packets + cfg.data_packets.div_ceil(k);
    let loop_bytes = (units * cfg.symbol_size as u64) as f64;
    let wire = (crate::wire::data::DATA_HEADER_LEN + cfg.symbol_size as usize) as f64;
    let receivers: Vec<MixedRx> = out
        .receivers
        .iter()
        .zip(profiles)
        .map(|(r, p)| MixedRx {
            seconds: r.done_at.map(|t| t.as_secs_f64() - p.join_s),
            profile: p,
            received_per_archive_byte: r.received_bytes as f64 / loop_bytes,
            settled_tier: r.stats.settled_tier,
            final_tier: r.stats.tier,
            tier_changes: r.moves.len() as u32,
            naks_sent: r.stats.nak.naks_sent,
            repairs_received: r.stats.repairs_received,
            duplicates: r.stats.download.duplicates,
            unicast: r.unicast,
            failed: r.failed.as_ref().map(|f| format!("{f:?}")),
        })
        .collect();
    MixedReport {
        completed: receivers.iter().filter(|r| r.seconds.is_some()).count(),
        receivers,
        loop_seconds: cfg
            .tiers_bps
            .iter()
            .map(|&b| units as f64 * wire * 8.0 / b as f64)
            .collect(),
        sim_seconds: out.sim_seconds,
    }
}
