//! Throughput tiers in the simulation: one title looping on several tier channels (the real
//! [`ChannelManager`] with a tier list), and receivers that each run the real [`NakEngine`] and
//! [`TierEngine`] behind a link of their own rate — a rate that can change mid-transfer.
//!
//! A receiver's link is a drop-tail queue like `tc tbf`: packets of every group the receiver
//! is subscribed to share it, wait while it is busy and are dropped once the wait would exceed
//! `queue_limit`. Leaving a group takes `leave_latency` to reach the switch (IGMP last-member
//! queries), so after a tier move the old channel keeps filling the link for a while — the
//! effect that makes failed join experiments costly on real networks.
//!
//! The receivers are driven as `mcast-recv get` drives them (`client/src/get.rs`): loss is
//! what the NAK engine's gap detection finds, delay samples come from SYNCs, a tier move is a
//! `ChangeTier` request and, once granted, a socket on the new group plus
//! [`NakEngine::switch_channel`]; NAKs wait while the tier engine settles. Same seed, same
//! configuration → the same report.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{hold_packet, sim_head, Queued};
use crate::archive::PacketId;
use crate::carousel::LoopShape;
use crate::channel::{ChannelManager, Params, RatePolicy, TitleInfo, TransmitPayload};
use crate::receiver::nak::NakEngine;
use crate::receiver::tier::{TierEngine, TierMove, TierParams};
use crate::wire::control::{Control, Envelope};
use crate::wire::data::{DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN, SYNC_LEN};
use crate::wire::nak::Nak;

/// The longest `mcast-recv get` waits in `poll` before its loop runs again.
const POLL_MAX: Duration = Duration::from_millis(20);

/// IPv4 + UDP header bytes: a link carries them too.
const IP_UDP: usize = 28;

/// A receiver's link: `(from, rate bit/s)` steps, the first from zero.
pub type LinkProfile = Vec<(Duration, u64)>;

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

    /// The fastest tier whose nominal rate the link carries (0 if none does).
    pub fn fitting_tier(&self, link_bps: u64) -> usize {
        self.tiers_bps
            .iter()
            .rposition(|&t| t <= link_bps)
            .unwrap_or(0)
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

enum Ev {
    ServerWake,
    ToServer(SocketAddr, Vec<u8>),
    ToRx(usize, Vec<u8>),
    Arrive {
        rx: usize,
        group: SocketAddrV4,
        id: Option<PacketId>,
        repair: bool,
        sync: Option<SyncInfo>,
    },
    NakHeard(usize, SocketAddrV4, Vec<(u64, u32)>),
    RxTimer(usize),
    Join(usize),
    SampleRates,
}

struct Rx {
    addr: SocketAddr,
    rid: u64,
    link: LinkProfile,
    join_at: Instant,
    alive: bool,
    /// When the link has sent everything queued on it.
    busy_until: Instant,
    group: Option<SocketAddrV4>,
    /// Groups left, still reaching the link until the given moment.
    leaving: Vec<(SocketAddrV4, Instant)>,
    have: Vec<bool>,
    have_count: u64,
    nak: NakEngine,
    tier: Option<TierEngine>,
    last_missed: u64,
    move_pending: bool,
    req: u32,
    timer: Option<Instant>,
    next_keepalive: Instant,
    /// The tier the last non-zero throughput report was about.
    reported_tier: Option<usize>,
    done_at: Option<Instant>,
    received_bytes: u64,
    link_drops: u64,
    moves: Vec<(f64, usize)>,
    /// (time s, tier, probing, probes so far) at each judged interval.
    samples: Vec<(f64, usize, bool, u32)>,
}

impl Rx {
    fn link_bps(&self, since_start: Duration) -> u64 {
        self.link
            .iter()
            .rev()
            .find(|(from, _)| *from <= since_start)
            .or(self.link.first())
            .map_or(1, |&(_, r)| r.max(1))
    }

    fn subscribed(&self, g: SocketAddrV4, now: Instant) -> bool {
        self.group == Some(g) || self.leaving.iter().any(|&(l, t)| l == g && t > now)
    }

    fn leave(&mut self, now: Instant, latency: Duration) {
        if let Some(g) = self.group.take() {
            self.leaving.retain(|&(_, t)| t > now);
            self.leaving.push((g, now + latency));
        }
    }

    fn envelope(&mut self, msg: Control) -> Vec<u8> {
        self.req += 1;
        Envelope::new(self.rid, self.req, msg).encode()
    }
}

/// Run one tier simulation.
pub fn run(cfg: &TierSimConfig) -> TierSimReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let t0 = Instant::now();
    let head = sim_head(cfg.data_packets, cfg.symbol_size);
    let shape = LoopShape::of(&head);
    let units = shape.loop_packets();
    let archive_id = head.archive_id;
    let tag = crate::wire::data::archive_tag(&archive_id);
    let mut params = Params::for_tests(cfg.tiers_bps[0]);
    params.tiers_bps = cfg.tiers_bps.clone();
    params.rate_policy = cfg.policy;
    params.lease = Duration::from_secs(2);
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: crate::channel::HeadBytes::Memory(Arc::new(Vec::new())),
        archive_len: 0,
    };
    let mut mgr = ChannelManager::new(params.clone(), vec![info], t0);
    let d = cfg.one_way_delay;
    let rtt_us = (d * 2).as_micros() as u32;

    let mut rx: Vec<Rx> = cfg
        .links
        .iter()
        .enumerate()
        .map(|(i, link)| {
            let join_at = t0 + cfg.join_spread.mul_f64(rng.gen::<f64>());
            Rx {
                addr: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8),
                    5000,
                )),
                rid: 2000 + i as u64,
                link: link.clone(),
                join_at,
                alive: false,
                busy_until: t0,
                group: None,
                leaving: Vec::new(),
                have: vec![false; units as usize],
                have_count: 0,
                nak: NakEngine::new(shape, rng.gen()),
                tier: None,
                last_missed: 0,
                move_pending: false,
                req: 0,
                timer: None,
                next_keepalive: join_at,
                reported_tier: None,
                done_at: None,
                received_bytes: 0,
                link_drops: 0,
                moves: Vec::new(),
                samples: Vec::new(),
            }
        })
        .collect();
    let by_addr: HashMap<SocketAddr, usize> =
        rx.iter().enumerate().map(|(i, r)| (r.addr, i)).collect();

    let mut q: BinaryHeap<Reverse<Queued<Ev>>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |q: &mut BinaryHeap<Reverse<Queued<Ev>>>, at: Instant, ev: Ev| {
        seq += 1;
        q.push(Reverse(Queued(at, seq, ev)));
    };
    for (i, r) in rx.iter().enumerate() {
        push(&mut q, r.join_at, Ev::Join(i));
    }
    push(&mut q, t0, Ev::SampleRates);

    let mut tiers: Vec<TierStat> = (0..cfg.tiers_bps.len())
        .map(|tier| TierStat {
            tier,
            payload_bytes: 0,
            rate_min_bps: u64::MAX,
            rate_max_bps: 0,
            max_members: 0,
        })
        .collect();
    let mut channel_tier: HashMap<u32, usize> = HashMap::new();
    let (mut wakeups, mut idle_wakeups, mut spins) = (0u64, 0u64, 0u32);
    let mut spinning = false;
    let mut last_idle: Option<Instant> = None;
    let mut server_wake: Option<Instant> = None;
    let deadline = t0 + cfg.max_time;
    let mut now = t0;
    let mut done = 0usize;
    let data_wire = DATA_HEADER_LEN + cfg.symbol_size as usize + IP_UDP;
    let sync_wire = DATA_HEADER_LEN + SYNC_LEN + IP_UDP;

    while let Some(Reverse(Queued(at, _, ev))) = q.pop() {
        if at > deadline || (done == rx.len() && mgr.open_channels() == 0) {
            break;
        }
        now = at;
        let mut touched: Option<usize> = None;
        match ev {
            Ev::ServerWake => {
                if server_wake == Some(now) {
                    server_wake = None;
                }
                wakeups += 1;
                mgr.handle_timeout(now);
                let mut sent = 0;
                while let Some(t) = mgr.poll_transmit(now) {
                    sent += 1;
                    let (hdr, _) = DataHeader::decode(&t.header).expect("own header");
                    let (id, sync) = match (&hdr.kind, &t.payload) {
                        (DataKind::Sync, TransmitPayload::Sync(b)) => {
                            (None, SyncInfo::decode(b).ok())
                        }
                        (DataKind::Packet(id), _) => (Some(*id), None),
                        _ => (None, None),
                    };
                    let SocketAddr::V4(group) = t.dests[0] else {
                        continue;
                    };
                    if id.is_some() {
                        let tier = *channel_tier.entry(t.channel).or_insert_with(|| {
                            mgr.stats()
                                .channels
                                .iter()
                                .find(|c| c.channel == t.channel)
                                .map_or(0, |c| c.tier)
                        });
                        tiers[tier].payload_bytes += cfg.symbol_size as u64;
                    }
                    let wire = if id.is_some() { data_wire } else { sync_wire };
                    for (i, r) in rx.iter_mut().enumerate() {
                        if !r.subscribed(group, now) {
                            continue;
                        }
                        // The receiver's link: wait behind what is queued, or be dropped.
                        let rate = r.link_bps(now - t0);
                        if r.busy_until.saturating_duration_since(now) > cfg.queue_limit {
                            r.link_drops += 1;
                            continue;
                        }
                        let tx = Duration::from_secs_f64(wire as f64 * 8.0 / rate as f64);
                        r.busy_until = r.busy_until.max(now) + tx;
                        push(
                            &mut q,
                            r.busy_until + d,
                            Ev::Arrive {
                                rx: i,
                                group,
                                id,
                                repair: hdr.repair,
                                sync,
                            },
                        );
                    }
                }
                if sent == 0 {
                    idle_wakeups += 1;
                    if last_idle == Some(now) {
                        spins += 1;
                        if spins > 10_000 {
                            spinning = true;
                            break;
                        }
                    } else {
                        spins = 0;
                    }
                    last_idle = Some(now);
                }
                while let Some((to, bytes)) = mgr.poll_reply() {
                    if let Some(&i) = by_addr.get(&to) {
                        push(&mut q, now + d, Ev::ToRx(i, bytes));
                    }
                }
                while mgr.poll_event().is_some() {}
            }
            Ev::ToServer(from, bytes) => {
                mgr.handle_control(now, from, &bytes);
                while let Some((to, bytes)) = mgr.poll_reply() {
                    if let Some(&i) = by_addr.get(&to) {
                        push(&mut q, now + d, Ev::ToRx(i, bytes));
                    }
                }
                while mgr.poll_event().is_some() {}
            }
            Ev::ToRx(i, bytes) => {
                let r = &mut rx[i];
                let Ok(env) = Envelope::decode(&bytes) else {
                    continue;
                };
                match env.msg {
                    Control::JoinOk {
                        group,
                        tier,
                        tiers_bps,
                        ..
                    } if r.done_at.is_none() => match r.group {
                        None if r.tier.is_none() => {
                            // The first join: start the tier engine where the server put us.
                            r.group = Some(group);
                            let mut p = TierParams::new(tiers_bps);
                            p.start = tier as usize;
                            r.tier = Some(TierEngine::new(p, now));
                        }
                        Some(old) if r.move_pending && old != group => {
                            r.leave(now, cfg.leave_latency);
                            r.nak.switch_channel(now, old, group);
                            r.group = Some(group);
                            r.move_pending = false;
                            r.moves.push(((now - t0).as_secs_f64(), tier as usize));
                        }
                        _ => r.move_pending = false,
                    },
                    Control::Error { .. } => r.move_pending = false,
                    _ => {}
                }
                touched = Some(i);
            }
            Ev::Arrive {
                rx: i,
                group,
                id,
                repair,
                sync,
            } => {
                let r = &mut rx[i];
                // A left group's packets still cross the link, but no socket takes them.
                if r.group != Some(group) || r.done_at.is_some() {
                    continue;
                }
                let Some(tier) = r.tier.as_mut() else {
                    continue;
                };
                if let Some(s) = sync {
                    r.nak
                        .on_sync(&s, DATA_HEADER_LEN + cfg.symbol_size as usize);
                    let local = now.saturating_duration_since(t0).as_micros() as i64;
                    tier.on_delay(local - s.send_us as i64);
                    continue;
                }
                let id = id.expect("packet");
                r.received_bytes += cfg.symbol_size as u64;
                tier.on_packet(cfg.symbol_size as usize, None);
                if !hold_packet(&mut r.nak, &mut r.have, &shape, now, id, repair) {
                    continue;
                }
                r.have_count += 1;
                if r.have_count == units {
                    r.done_at = Some(now);
                    done += 1;
                    r.leave(now, cfg.leave_latency);
                    let msg = r.envelope(Control::Complete { archive_id });
                    push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                    continue;
                }
                if let Some(t) = r.nak.poll_timeout().map(|t| t.max(now)) {
                    if r.timer.is_none_or(|x| t < x) {
                        r.timer = Some(t);
                        push(&mut q, t, Ev::RxTimer(i));
                    }
                }
            }
            Ev::NakHeard(i, group, ranges) => {
                let r = &mut rx[i];
                if r.group == Some(group) && r.done_at.is_none() {
                    r.nak
                        .on_nak_heard(now, ranges.iter().flat_map(|&(f, l)| f..f + l as u64));
                }
            }
            Ev::RxTimer(i) => {
                if rx[i].timer == Some(now) {
                    rx[i].timer = None;
                }
                touched = Some(i);
            }
            Ev::Join(i) => {
                let r = &mut rx[i];
                r.alive = true;
                let msg = r.envelope(Control::Join {
                    title: "sim".into(),
                });
                push(&mut q, now + d, Ev::ToServer(r.addr, msg));
            }
            Ev::SampleRates => {
                for c in mgr.stats().channels {
                    let s = &mut tiers[c.tier.min(cfg.tiers_bps.len() - 1)];
                    s.rate_min_bps = s.rate_min_bps.min(c.rate_bps);
                    s.rate_max_bps = s.rate_max_bps.max(c.rate_bps);
                    s.max_members = s.max_members.max(c.members);
                }
                push(&mut q, now + Duration::from_millis(500), Ev::SampleRates);
            }
        }

        // A receiver's turn, in the order of `mcast-recv get`'s loop: keepalive, tier
        // judgement (a move asks the server), NAK timers, NAKs unless settling.
        if let Some(i) = touched {
            let r = &mut rx[i];
            if r.alive && r.done_at.is_none() && r.group.is_some() {
                let tier = r.tier.as_mut().expect("joined");
                // As in `get`: a tier's first measurement is reported at once.
                let (rx_bps, loss_ppm) = (tier.counters.measured_bps, tier.counters.loss_ppm);
                if now >= r.next_keepalive || (rx_bps > 0 && r.reported_tier != Some(tier.tier())) {
                    r.next_keepalive = now + params.lease / 3;
                    if rx_bps > 0 {
                        r.reported_tier = Some(tier.tier());
                    }
                    let msg = r.envelope(Control::Keepalive {
                        archive_id,
                        have: r.have_count,
                        total: units,
                        rtt_us,
                        rx_bps,
                        loss_ppm,
                    });
                    push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                }
                let tier = r.tier.as_mut().expect("joined");
                let missed = r.nak.counters.units_missed;
                tier.on_lost(missed.saturating_sub(r.last_missed));
                r.last_missed = missed;
                // As in `get`, the engine is polled every turn (a move it decides while an
                // earlier request is in flight is simply asked for too).
                let due = now >= tier.next_deadline();
                let mv = tier.poll(now);
                if let Some(TierMove::To(t)) = mv {
                    r.move_pending = true;
                    let msg = r.envelope(Control::ChangeTier {
                        archive_id,
                        tier: t as u8,
                    });
                    push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                }
                let tier = r.tier.as_ref().expect("joined");
                if due {
                    r.samples.push((
                        (now - t0).as_secs_f64(),
                        tier.tier(),
                        tier.probing(),
                        tier.counters.probes,
                    ));
                }
                let settling = tier.settling(now);
                let next_judgement = tier.next_deadline();
                let have = &r.have;
                r.nak.handle_timeout(now, |x| have[x as usize]);
                while let Some(ranges) = (!settling).then(|| r.nak.poll_nak(now)).flatten() {
                    let bytes = Nak {
                        archive_tag: tag,
                        receiver_id: r.rid,
                        ranges: ranges.clone(),
                    }
                    .encode();
                    push(&mut q, now + d, Ev::ToServer(r.addr, bytes));
                    let g = r.group.expect("joined");
                    for j in (0..cfg.links.len()).filter(|&j| j != i) {
                        push(&mut q, now + d * 2, Ev::NakHeard(j, g, ranges.clone()));
                    }
                }
                // `get` waits at most 20 ms, and ignores NAK deadlines while settling (they
                // are held, not due).
                let next = r
                    .nak
                    .poll_timeout()
                    .filter(|_| !settling)
                    .into_iter()
                    .chain([r.next_keepalive, next_judgement, now + POLL_MAX])
                    .min()
                    .expect("non-empty")
                    .max(now + Duration::from_micros(1));
                if r.timer.is_none_or(|x| next < x) {
                    r.timer = Some(next);
                    push(&mut q, next, Ev::RxTimer(i));
                }
            }
        }
        if let Some(t) = mgr.poll_timeout() {
            let t = t.max(now);
            if server_wake.is_none_or(|w| t < w) {
                server_wake = Some(t);
                push(&mut q, t, Ev::ServerWake);
            }
        }
    }

    let end_s = (now - t0).as_secs_f64();
    let file_bytes = (cfg.data_packets * cfg.symbol_size as u64) as f64;
    let receivers = rx
        .iter()
        .map(|r| {
            let e = r.tier.as_ref();
            let c = e.map(|e| e.counters.clone()).unwrap_or_default();
            let done_s = r.done_at.map(|t| (t - t0).as_secs_f64());
            let segments = r
                .link
                .iter()
                .enumerate()
                .map(|(k, &(from, bps))| {
                    let from_s = from.as_secs_f64();
                    let until_s = r
                        .link
                        .get(k + 1)
                        .map_or(end_s, |n| n.0.as_secs_f64())
                        .min(done_s.unwrap_or(end_s));
                    let fitting = cfg.fitting_tier(bps);
                    let probes_before = r
                        .samples
                        .iter()
                        .rev()
                        .find(|s| s.0 < from_s)
                        .map_or(0, |s| s.3);
                    let within: Vec<_> = r
                        .samples
                        .iter()
                        .filter(|s| s.0 >= from_s && s.0 < until_s)
                        .collect();
                    let reached = within.iter().find(|s| s.1 == fitting && !s.2);
                    let on = within.iter().filter(|s| s.1 == fitting).count();
                    Segment {
                        from_s,
                        link_bps: bps,
                        fitting_tier: fitting,
                        reached_after_s: reached.map(|s| s.0 - from_s),
                        probes: reached
                            .map_or(c.probes, |s| s.3)
                            .saturating_sub(probes_before),
                        share_on_fitting: on as f64 / within.len().max(1) as f64,
                    }
                })
                .collect();
            RxTierReport {
                completed_at_s: done_s,
                final_tier: e.map_or(0, |e| e.tier()),
                tier_changes: r.moves.len() as u32,
                probes: c.probes,
                probes_failed: c.probes_failed,
                moves_down: c.moves_down,
                received_per_file_byte: r.received_bytes as f64 / file_bytes,
                link_drops: r.link_drops,
                naks_sent: r.nak.counters.naks_sent,
                units_naked: r.nak.counters.units_naked,
                segments,
                moves: r.moves.clone(),
            }
        })
        .collect();
    for s in tiers.iter_mut().filter(|s| s.rate_min_bps == u64::MAX) {
        s.rate_min_bps = 0;
    }
    let c = mgr.counters();
    TierSimReport {
        receivers,
        tiers,
        channels_opened: c.channels_opened,
        channels_closed: c.channels_closed,
        server_wakeups: wakeups,
        idle_server_wakeups: idle_wakeups,
        server_spinning: spinning,
        channels_open_at_end: mgr.open_channels(),
        sim_seconds: end_s,
    }
}
