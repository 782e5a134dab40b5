//! Throughput tiers in the simulation: one title looping on several tier channels (the real
//! [`ChannelManager`](crate::channel::ChannelManager) with a tier list), and receivers — real
//! [`Session`](crate::receiver::Session)s, whose tier engine decides the moves — behind links
//! of their own rate, a rate that can change mid-transfer.
//!
//! A receiver's link is a drop-tail queue like `tc tbf` ([`super::world`]): packets of every
//! group the receiver is subscribed to share it, wait while it is busy and are dropped once
//! the wait would exceed `queue_limit`. Leaving a group takes `leave_latency` to reach the
//! switch (IGMP last-member queries), so after a tier move the old channel keeps filling the
//! link for a while — the effect that makes failed join experiments costly on real
//! networks. Same seed, same configuration → the same report.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::world::{self, RxSpec, WorldConfig};
use crate::channel::{Params, RatePolicy};

pub use super::world::LinkProfile;

#[derive(Clone, Debug, Serialize)]
pub struct TierSimConfig {
    pub seed: u64,
    /// Nominal tier rates, ascending (bit/s).
    pub tiers_bps: Vec<u64>,
    pub policy: RatePolicy,
    /// One link per receiver.
    pub links: Vec<LinkProfile>,
    /// Receivers join at uniformly random moments in `[0, join_spread]`.
    pub join_spread: Duration,
    pub data_packets: u64,
    pub symbol_size: u32,
    pub one_way_delay: Duration,
    /// Longest wait in a link's queue before a packet is dropped (`tbf latency`).
    pub queue_limit: Duration,
    /// How long a left group keeps reaching the receiver's link.
    pub leave_latency: Duration,
    pub max_time: Duration,
}

impl TierSimConfig {
    /// Tiers of 4, 16, 64 and 256 Mbit/s; a 50 ms link queue; a 1 s leave latency.
    pub fn new(links: Vec<LinkProfile>, data_packets: u64, seed: u64) -> TierSimConfig {
        TierSimConfig {
            seed,
            tiers_bps: vec![4_000_000, 16_000_000, 64_000_000, 256_000_000],
            policy: RatePolicy::Lowest,
            links,
            join_spread: Duration::from_millis(200),
            data_packets,
            symbol_size: 1280,
            one_way_delay: Duration::from_millis(2),
            queue_limit: Duration::from_millis(50),
            leave_latency: Duration::from_secs(1),
            max_time: Duration::from_secs(300),
        }
    }

    /// The tier a receiver behind this link should hold: the highest whose band (its rate can
    /// come down to just above the next tier's) reaches the link's rate — the tier engine's
    /// own [`best_fit`](crate::receiver::tier::TierParams::best_fit).
    pub fn fitting_tier(&self, link_bps: u64) -> usize {
        crate::receiver::tier::TierParams::new(self.tiers_bps.clone()).best_fit(link_bps)
    }
}

/// How a receiver followed one step of its link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Segment {
    pub from_s: f64,
    pub link_bps: u64,
    pub fitting_tier: usize,
    /// From the step until the receiver held the fitting tier (not as a probe); `None`: not
    /// within the step.
    pub reached_after_s: Option<f64>,
    /// Join experiments it made from the step until then.
    pub probes: u32,
    /// Share of the step's judged intervals spent on the fitting tier.
    pub share_on_fitting: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RxTierReport {
    pub completed_at_s: Option<f64>,
    pub final_tier: usize,
    /// Tier moves granted by the server (probes, their fall-backs and moves down).
    pub tier_changes: u32,
    pub probes: u32,
    pub probes_failed: u32,
    pub moves_down: u32,
    /// Bytes received on the receiver's own channel per byte of the file.
    pub received_per_file_byte: f64,
    /// Packets its link dropped (queue full), of every group it was subscribed to.
    pub link_drops: u64,
    /// NAK datagrams sent, and units named in them.
    pub naks_sent: u64,
    pub units_naked: u64,
    pub segments: Vec<Segment>,
    /// (time s, tier) after each granted move.
    pub moves: Vec<(f64, usize)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TierStat {
    pub tier: usize,
    pub payload_bytes: u64,
    /// Lowest and highest rate the server set for the tier's channel while it was open.
    pub rate_min_bps: u64,
    pub rate_max_bps: u64,
    pub max_members: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TierSimReport {
    pub receivers: Vec<RxTierReport>,
    pub tiers: Vec<TierStat>,
    pub channels_opened: u64,
    pub channels_closed: u64,
    pub server_wakeups: u64,
    /// Server wake-ups that sent nothing.
    pub idle_server_wakeups: u64,
    /// The server asked to be woken at the same instant over and over (a busy loop); the run
    /// was cut short.
    pub server_spinning: bool,
    pub channels_open_at_end: usize,
    pub sim_seconds: f64,
}

/// Run one tier simulation from `t0` (the simulator reads no clock).
pub fn run(cfg: &TierSimConfig, t0: Instant) -> TierSimReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x7135);
    let mut params = Params::for_tests(cfg.tiers_bps[0]);
    params.tiers_bps = cfg.tiers_bps.clone();
    params.rate_policy = cfg.policy;
    params.lease = Duration::from_secs(2);
    let receivers = cfg
        .links
        .iter()
        .map(|link| {
            let mut r = RxSpec::new(cfg.join_spread.mul_f64(rng.gen::<f64>()));
            r.link = link.clone();
            r
        })
        .collect();
    let w = WorldConfig {
        one_way_delay: cfg.one_way_delay,
        peer_delay: cfg.one_way_delay * 2,
        queue_limit: cfg.queue_limit,
        leave_latency: cfg.leave_latency,
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
    let end_s = out.sim_seconds;
    let file_bytes = (cfg.data_packets * cfg.symbol_size as u64) as f64;
    let receivers = out
        .receivers
        .iter()
        .zip(&cfg.links)
        .map(|(r, link)| {
            let c = &r.tier_counters;
            let done_s = r.done_at.map(|t| t.as_secs_f64());
            let segments = link
                .iter()
                .enumerate()
                .map(|(k, &(from, bps))| {
                    let from_s = from.as_secs_f64();
                    let until_s = link
                        .get(k + 1)
                        .map_or(end_s, |n| n.0.as_secs_f64())
                        .min(done_s.unwrap_or(end_s));
                    let fitting = cfg.fitting_tier(bps);
                    let probes_before = r
                        .samples
                        .iter()
                        .rev()
                        .find(|s| s.0 < from_s)
                        .map_or(0, |s| s.1.probes);
                    let within: Vec<_> = r
                        .samples
                        .iter()
                        .filter(|s| s.0 >= from_s && s.0 < until_s)
                        .collect();
                    let reached = within.iter().find(|s| s.1.tier == fitting && !s.1.probing);
                    let on = within.iter().filter(|s| s.1.tier == fitting).count();
                    Segment {
                        from_s,
                        link_bps: bps,
                        fitting_tier: fitting,
                        reached_after_s: reached.map(|s| s.0 - from_s),
                        probes: reached
                            .map_or(c.probes, |s| s.1.probes)
                            .saturating_sub(probes_before),
                        share_on_fitting: on as f64 / within.len().max(1) as f64,
                    }
                })
                .collect();
            RxTierReport {
                completed_at_s: done_s,
                final_tier: r.stats.tier,
                tier_changes: r.moves.len() as u32,
                probes: c.probes,
                probes_failed: c.probes_failed,
                moves_down: c.moves_down,
                received_per_file_byte: r.received_bytes as f64 / file_bytes,
                link_drops: r.link_drops,
                naks_sent: r.stats.nak.naks_sent,
                units_naked: r.stats.nak.units_naked,
                segments,
                moves: r.moves.clone(),
            }
        })
        .collect();
    let tiers = out
        .tiers
        .iter()
        .enumerate()
        .map(|(tier, t)| TierStat {
            tier,
            payload_bytes: t.payload_bytes,
            rate_min_bps: t.rate_min_bps,
            rate_max_bps: t.rate_max_bps,
            max_members: t.max_members,
        })
        .collect();
    TierSimReport {
        receivers,
        tiers,
        channels_opened: out.channels_opened,
        channels_closed: out.channels_closed,
        server_wakeups: out.server_wakeups,
        idle_server_wakeups: out.idle_server_wakeups,
        server_spinning: out.server_spinning,
        channels_open_at_end: out.channels_open_at_end,
        sim_seconds: end_s,
    }
}
