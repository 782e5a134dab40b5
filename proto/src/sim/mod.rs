//! Deterministic simulation harness: the real [`ChannelManager`] and N real receiver
//! [`Session`](crate::receiver::Session)s — the same types `mcastd` and `mcast-recv` drive —
//! on a virtual clock ([`world`]), with seeded loss (shared: one draw per packet for
//! everyone; independent: one per receiver), one-way delay, rate-limited links, IGMP leave
//! latency, late joins, receivers without multicast and crashes. The simulator has no
//! receiver logic of its own: it moves bytes and time, as the drivers do.
//!
//! Scenarios: [`run`] (NAK suppression and repair at 10–1,000 receivers), [`tiers`]
//! (throughput tiers behind links that change rate), [`mixed`] (a mixed audience: clean,
//! lossy, rate-limited, late and leaving receivers together) and [`unicast`] (a
//! no-multicast receiver's own stream behind a slow link). Same seed, same configuration
//! → the same report, bit for bit. The archive is real ([`archive`]): every packet is
//! verified by the sessions as on a real network.
//!
//! [`ChannelManager`]: crate::channel::ChannelManager

pub mod archive;
pub mod mixed;
pub mod tiers;
pub mod unicast;
pub mod world;

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::archive::{Compression, Head};
use crate::channel::Params;
use world::{RxSpec, WorldConfig};

#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub seed: u64,
    pub receivers: usize,
    /// Data packets in the archive (hash packets are added: one per `symbol_size / 32`).
    pub data_packets: u64,
    pub symbol_size: u32,
    /// FEC repair symbols per data packet (0: none), pre-encoded as `mcastd pack` does.
    pub fec_overhead: f64,
    /// Extra FEC symbols the (one-tier) channel sends unasked per block, as a share of its
    /// packets (`[server] tier_fec_extra`).
    pub fec_extra: f64,
    pub rate_bps: u64,
    /// Probability a packet is lost for every receiver (e.g. an upstream link).
    pub shared_loss: f64,
    /// Probability a packet is lost for one receiver (its own link).
    pub independent_loss: f64,
    pub one_way_delay: Duration,
    /// How long a NAK multicast by one receiver takes to reach the others. Defaults to
    /// `one_way_delay` (peers as far from each other as from the server); `2 ×` models a
    /// server at the hub of a star.
    pub peer_delay: Duration,
    /// Receivers join at uniformly random moments in `[0, join_spread]`.
    pub join_spread: Duration,
    /// This many receivers crash once, mid-download, and come back after `crash_downtime`
    /// with what they had written (the state file) but no protocol state.
    pub crashes: usize,
    pub crash_downtime: Duration,
    /// NAK suppression on (NORM back-off + hearing NAKs) or off (every receiver NAKs at once).
    pub suppression: bool,
    /// An attacker multicasting a forged NAK for everything this often
    /// ([`world::WorldConfig::forged_naks`]).
    pub forged_naks: Option<Duration>,
    /// Give up after this much simulated time.
    pub max_time: Duration,
}

impl SimConfig {
    pub fn new(receivers: usize, loss: f64, seed: u64) -> SimConfig {
        SimConfig {
            seed,
            receivers,
            data_packets: 16000,
            symbol_size: 1280,
            fec_overhead: 0.0,
            fec_extra: 0.0,
            rate_bps: 100_000_000,
            shared_loss: 0.0,
            independent_loss: loss,
            one_way_delay: Duration::from_millis(5),
            peer_delay: Duration::from_millis(5),
            join_spread: Duration::ZERO,
            crashes: 0,
            crash_downtime: Duration::from_millis(300),
            suppression: true,
            forged_naks: None,
            max_time: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    pub receivers: usize,
    pub completed: usize,
    pub loop_seconds: f64,
    /// Time from the first packet heard to completion, in loops.
    pub loops_mean: f64,
    pub loops_max: f64,
    /// Transmissions lost by at least one receiver that needed them.
    pub loss_events: u64,
    pub naks_at_server: u64,
    pub nak_units_at_server: u64,
    /// FEC symbols asked for by amount (FEC archives), and extra symbols sent in answer.
    pub nak_symbols_at_server: u64,
    pub extras_sent: u64,
    /// Units and FEC symbols asked for at the server, per loss event.
    pub naks_per_loss: f64,
    pub repairs_sent: u64,
    /// Repairs that no active receiver needed when they went out.
    pub duplicate_repairs: u64,
    /// Bytes on the channel (data, repairs, SYNC, NAKs) per byte of the archive's loop.
    pub wire_per_file_byte: f64,
    pub sim_seconds: f64,
    pub channel_closed: bool,
    /// Units and FEC amounts in heard NAKs that suppressed nothing: the unit or block had been
    /// held back by heard NAKs too often already (a forged NAK flood shows here).
    pub heard_naks_ignored: u64,
}

/// An event due at `.0`; `.1` (insertion order) breaks ties, so runs are reproducible.
pub(crate) struct Queued<E>(pub(crate) Instant, pub(crate) u64, pub(crate) E);
impl<E> PartialEq for Queued<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl<E> Eq for Queued<E> {}
impl<E> PartialOrd for Queued<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Queued<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

/// A synthetic, unsigned head with the requested shape, for tests of the channel manager
/// (which never reads payloads). The simulator itself uses a real archive ([`archive`]).
pub fn sim_head(data_packets: u64, symbol_size: u32) -> Head {
    let k = (symbol_size / 32) as u64;
    let n_blocks = data_packets.div_ceil(k);
    Head {
        advert: false,
        plugin: false,
        advert_for: Vec::new(),
        placement: Default::default(),
        leaf_hash: Default::default(),
        cipher: mcast_keys::Cipher::Aes256Gcm,
        compression: Compression::None,
        archive_id: [0x5a; 16],
        key_id: [0; 16],
        title: "sim".into(),
        watermark: String::new(),
        created_unix: 0,
        plain_len: 0,
        plain_hash: [0; 32],
        plain_hash_keyed: false,
        frame_size: 1 << 20,
        frame_count: 0,
        data_len: data_packets * symbol_size as u64,
        symbol_size,
        block_symbols: k as u32,
        repair_symbols: 0,
        fec_source: 0,
        server_key: mcast_keys::PublicIdentity([0; 32]),
        block_hashes: vec![[0; 32]; n_blocks as usize],
        signature: [0; 64],
    }
}

/// Run one simulation from `t0` (the simulator reads no clock: any instant will do).
pub fn run(cfg: &SimConfig, t0: Instant) -> SimReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let mut params = Params::for_tests(cfg.rate_bps);
    params.lease = Duration::from_secs(2);
    params.tier_fec_extra = vec![cfg.fec_extra];
    let k = (cfg.symbol_size / 32) as u64;
    let shape = match crate::archive::fec::FecShape::choose(
        cfg.data_packets,
        crate::archive::fec::DEFAULT_SOURCE_BLOCK,
        cfg.fec_overhead,
        k as u32,
    ) {
        Some((src, rep)) => {
            crate::carousel::LoopShape::with_fec(cfg.data_packets, k, src as u64, rep as u64)
        }
        None => crate::carousel::LoopShape::data_only(cfg.data_packets, k),
    };
    let units = shape.loop_packets();
    let pkt_bytes = (crate::wire::data::DATA_HEADER_LEN + cfg.symbol_size as usize) as f64;
    let loop_seconds = units as f64 * pkt_bytes * 8.0 / cfg.rate_bps as f64;
    let receivers = (0..cfg.receivers)
        .map(|i| {
            let join_at = cfg.join_spread.mul_f64(rng.gen::<f64>());
            let mut r = RxSpec::new(join_at);
            r.loss = cfg.independent_loss;
            if i < cfg.crashes {
                // Crash somewhere in the middle of the first loop after joining.
                let f = 0.3 + 0.4 * rng.gen::<f64>();
                r.crash_at = Some(join_at + Duration::from_secs_f64(loop_seconds * f));
            }
            r
        })
        .collect();
    let w = WorldConfig {
        shared_loss: cfg.shared_loss,
        one_way_delay: cfg.one_way_delay,
        peer_delay: cfg.peer_delay,
        leave_latency: Duration::ZERO,
        crash_downtime: cfg.crash_downtime,
        suppression: cfg.suppression,
        forged_naks: cfg.forged_naks,
        max_time: cfg.max_time,
        fec_overhead: cfg.fec_overhead,
        ..WorldConfig::new(
            cfg.seed,
            cfg.data_packets,
            cfg.symbol_size,
            params,
            receivers,
        )
    };
    let out = world::run(&w, t0);
    if std::env::var_os("MCAST_SIM_DEBUG").is_some() {
        let n = |f: fn(&world::RxOutcome) -> u64| out.receivers.iter().map(f).sum::<u64>();
        tracing::info!(
            naks_sent = n(|r| r.stats.nak.naks_sent),
            units_naked = n(|r| r.stats.nak.units_naked),
            suppressed = n(|r| r.stats.nak.units_suppressed),
            missed = n(|r| r.stats.nak.units_missed),
            "sim NAK counters"
        );
    }
    let times: Vec<f64> = out
        .receivers
        .iter()
        .zip(&w.receivers)
        .filter_map(|(r, spec)| {
            let start = r.first_at.unwrap_or(spec.join_at);
            r.done_at
                .map(|t| t.saturating_sub(start).as_secs_f64() / loop_seconds)
        })
        .collect();
    let loop_bytes = units as f64 * cfg.symbol_size as f64;
    SimReport {
        receivers: cfg.receivers,
        completed: times.len(),
        loop_seconds,
        loops_mean: if times.is_empty() {
            f64::NAN
        } else {
            times.iter().sum::<f64>() / times.len() as f64
        },
        loops_max: times.iter().cloned().fold(0.0, f64::max),
        loss_events: out.loss_events,
        naks_at_server: out.naks_at_server,
        nak_units_at_server: out.nak_units_at_server,
        nak_symbols_at_server: out.nak_symbols_at_server,
        extras_sent: out.extras_sent,
        naks_per_loss: (out.nak_units_at_server + out.nak_symbols_at_server) as f64
            / out.loss_events.max(1) as f64,
        repairs_sent: out.repairs_sent,
        duplicate_repairs: out.duplicate_repairs,
        wire_per_file_byte: out.wire_bytes / loop_bytes,
        sim_seconds: out.sim_seconds,
        channel_closed: out.channels_open_at_end == 0,
        heard_naks_ignored: out
            .receivers
            .iter()
            .map(|r| r.stats.nak.units_heard_ignored + r.stats.symbol_naks.amounts_heard_ignored)
            .sum(),
    }
}
