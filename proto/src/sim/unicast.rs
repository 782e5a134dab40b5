//! A receiver whose network drops multicast, behind a slower link than the title's rate,
//! next to a clean multicast receiver of the same title: the unicast fallback's own stream
//! (`channel::unicast_stream`) must fill that link and not much more — it starts at a
//! modest rate, finds the link's capacity from the receiver's reports and repairs to that
//! receiver alone — while the multicast receiver keeps the title's full rate.
//!
//! The server runs the default configuration's shape: the adaptive ladder of four tiers
//! below `rate_bps`, a 5 s lease, SYNC every 50 ms. `cargo test --release --test sim --
//! unicast --nocapture` prints the report.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::world::{self, RxSpec, WorldConfig};
use crate::channel::{default_ladder, Params};

#[derive(Clone, Debug, Serialize)]
pub struct UnicastConfig {
    pub seed: u64,
    pub data_packets: u64,
    pub symbol_size: u32,
    /// The title's rate (the top of the default ladder).
    pub rate_bps: u64,
    /// The no-multicast receiver's link (bit/s).
    pub link_bps: u64,
    /// Random loss on that link.
    pub loss: f64,
    pub one_way_delay: Duration,
    pub queue_limit: Duration,
    pub max_time: Duration,
}

impl UnicastConfig {
    /// A 50 MB title at 200 Mbit/s (the default rate), the unicast receiver behind `link_bps`.
    pub fn new(link_bps: u64, seed: u64) -> UnicastConfig {
        UnicastConfig {
            seed,
            data_packets: 50_000_000 / 1280,
            symbol_size: 1280,
            rate_bps: 200_000_000,
            link_bps,
            loss: 0.0,
            one_way_delay: Duration::from_millis(2),
            queue_limit: Duration::from_millis(50),
            max_time: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct UnicastReport {
    /// Payload bytes of one loop (every data and hash packet once).
    pub archive_bytes: u64,
    /// How long the link takes to carry them (payload only: a lower bound).
    pub link_seconds: f64,
    /// The unicast receiver: from its join to its first loop packet (multicast never comes:
    /// the fallback's wait and handshake), and to holding everything.
    pub first_packet_s: Option<f64>,
    pub seconds: Option<f64>,
    pub received_per_archive_byte: f64,
    pub unicast: bool,
    pub repairs_received: u64,
    pub naks_sent: u64,
    pub link_drops: u64,
    /// The multicast receiver, for comparison.
    pub multicast_seconds: Option<f64>,
    pub multicast_received_per_archive_byte: f64,
    /// Packets and repairs the server sent on the unicast stream.
    pub unicast_packets_sent: u64,
    pub unicast_repairs_sent: u64,
    pub repairs_sent: u64,
}

/// Run the scenario from `t0` (the simulator reads no clock).
pub fn run(cfg: &UnicastConfig, t0: Instant) -> UnicastReport {
    let mut params = Params::for_tests(cfg.rate_bps);
    params.tiers_bps = default_ladder(cfg.rate_bps);
    let mut uni = RxSpec::new(Duration::ZERO);
    uni.multicast = false;
    uni.link = vec![(Duration::ZERO, cfg.link_bps)];
    uni.loss = cfg.loss;
    let clean = RxSpec::new(Duration::ZERO);
    let w = WorldConfig {
        one_way_delay: cfg.one_way_delay,
        peer_delay: cfg.one_way_delay * 2,
        queue_limit: cfg.queue_limit,
        max_time: cfg.max_time,
        ..WorldConfig::new(
            cfg.seed,
            cfg.data_packets,
            cfg.symbol_size,
            params,
            vec![uni, clean],
        )
    };
    let out = world::run(&w, t0);
    let k = (cfg.symbol_size / 32) as u64;
    let units = cfg.data_packets + cfg.data_packets.div_ceil(k);
    let archive_bytes = units * cfg.symbol_size as u64;
    let per = |b: u64| b as f64 / archive_bytes as f64;
    let (u, m) = (&out.receivers[0], &out.receivers[1]);
    UnicastReport {
        archive_bytes,
        link_seconds: archive_bytes as f64 * 8.0 / cfg.link_bps as f64,
        first_packet_s: u.first_at.map(|t| t.as_secs_f64()),
        seconds: u.done_at.map(|t| t.as_secs_f64()),
        received_per_archive_byte: per(u.received_bytes),
        unicast: u.unicast,
        repairs_received: u.stats.repairs_received,
        naks_sent: u.stats.nak.naks_sent,
        link_drops: u.link_drops,
        multicast_seconds: m.done_at.map(|t| t.as_secs_f64()),
        multicast_received_per_archive_byte: per(m.received_bytes),
        unicast_packets_sent: out.unicast_packets_sent,
        unicast_repairs_sent: out.unicast_repairs_sent,
        repairs_sent: out.repairs_sent,
    }
}
