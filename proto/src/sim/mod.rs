//! Deterministic simulation harness: the real [`ChannelManager`] and receiver [`NakEngine`]s
//! on a virtual clock, with seeded loss (shared: one draw per packet for everyone; independent:
//! one per receiver), one-way delay, late joins and receiver crashes.
//!
//! Receivers here keep only a have-bitmap (packet verification is the download engine's job
//! and is tested on its own), but follow the same rule as the real one: a data packet whose
//! block hash packet is not yet held is dropped. NAKs travel to the server (with loss) and,
//! when suppression is on, to every other receiver through the group (with loss).
//!
//! Same seed, same configuration → the same report, bit for bit.
//!
//! [`tiers`] runs the same machines across a title's throughput tiers, with receivers behind
//! links of their own rate.

pub mod tiers;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::archive::{Compression, Head, PacketId};
use crate::carousel::LoopShape;
use crate::channel::{ChannelManager, Params, TitleInfo, TransmitPayload};
use crate::receiver::nak::NakEngine;
use crate::wire::control::{Control, Envelope};
use crate::wire::data::{DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN};
use crate::wire::nak::Nak;

#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub seed: u64,
    pub receivers: usize,
    /// Data packets in the archive (hash packets are added: one per `symbol_size / 32`).
    pub data_packets: u64,
    pub symbol_size: u32,
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
            rate_bps: 100_000_000,
            shared_loss: 0.0,
            independent_loss: loss,
            one_way_delay: Duration::from_millis(5),
            peer_delay: Duration::from_millis(5),
            join_spread: Duration::ZERO,
            crashes: 0,
            crash_downtime: Duration::from_millis(300),
            suppression: true,
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
    /// NAKed units reaching the server per loss event.
    pub naks_per_loss: f64,
    pub repairs_sent: u64,
    /// Repairs that no active receiver needed when they went out.
    pub duplicate_repairs: u64,
    /// Bytes on the channel (data, repairs, SYNC, NAKs) per byte of the archive's loop.
    pub wire_per_file_byte: f64,
    pub sim_seconds: f64,
    pub channel_closed: bool,
}

struct Rx {
    addr: SocketAddr,
    rid: u64,
    join_at: Instant,
    crash_at: Option<Instant>,
    joined: bool,
    alive: bool,
    have: Vec<bool>,
    have_count: u64,
    nak: NakEngine,
    timer: Option<Instant>,
    done_at: Option<Instant>,
    /// First loop packet heard (completion time is measured from here, not from the join,
    /// so a new channel's SYNC lead does not count as protocol time).
    first_at: Option<Instant>,
    next_keepalive: Instant,
}

#[derive(Debug)]
enum Ev {
    ServerWake,
    /// Control or NAK bytes reaching the server.
    ToServer(SocketAddr, Vec<u8>),
    /// A channel packet reaching the group; `shared_lost` decided at send time.
    Packet {
        id: Option<PacketId>,
        repair: bool,
        sync: Option<SyncInfo>,
        shared_lost: bool,
    },
    NakHeard(usize, Vec<(u64, u32)>),
    RxTimer(usize),
    Join(usize),
    Crash(usize),
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

/// A loop packet reached a simulated receiver: hold it and drive the NAK engine as
/// `mcast-recv get` does. Data before its block's hash packet is parked (the sim counts it
/// held; completion still needs every hash packet) and the hash packet is missed; of
/// duplicates only hash packets move the engine (the driver can verify those against the
/// signed head, not unverifiable data). True when the unit is new.
pub(crate) fn hold_packet(
    nak: &mut NakEngine,
    have: &mut [bool],
    shape: &LoopShape,
    now: Instant,
    id: PacketId,
    repair: bool,
) -> bool {
    let u = shape.unit_index(id).expect("in range") as usize;
    if have[u] {
        if matches!(id, PacketId::Hash(_)) {
            nak.on_packet(now, id, repair, |x| have[x as usize]);
        }
        return false;
    }
    have[u] = true;
    if let PacketId::Data(s) = id {
        let h = shape
            .unit_index(PacketId::Hash(s / shape.block_symbols))
            .expect("in range");
        if !have[h as usize] {
            nak.on_parked(now, s, |x| have[x as usize]);
        }
    }
    nak.on_packet(now, id, repair, |x| have[x as usize]);
    true
}

/// A synthetic head with the requested shape (the sim never reads payloads; tests of the
/// channel manager use it too).
pub fn sim_head(data_packets: u64, symbol_size: u32) -> Head {
    let k = (symbol_size / 32) as u64;
    let n_blocks = data_packets.div_ceil(k);
    Head {
        advert: false,
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
        frame_size: 1 << 20,
        frame_count: 0,
        data_len: data_packets * symbol_size as u64,
        symbol_size,
        block_symbols: k as u32,
        repair_symbols: 0,
        server_key: mcast_keys::PublicIdentity([0; 32]),
        block_hashes: vec![[0; 32]; n_blocks as usize],
        signature: [0; 64],
    }
}

/// Run one simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let t0 = Instant::now();
    let head = sim_head(cfg.data_packets, cfg.symbol_size);
    let shape = LoopShape::of(&head);
    let units = shape.loop_packets();
    let archive_id = head.archive_id;
    let tag = crate::wire::data::archive_tag(&archive_id);
    let mut params = Params::for_tests(cfg.rate_bps);
    params.lease = Duration::from_secs(2);
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: crate::channel::HeadBytes::Memory(Arc::new(Vec::new())),
        archive_len: 0,
    };
    let mut mgr = ChannelManager::new(params.clone(), vec![info], t0);
    let pkt_bytes = (DATA_HEADER_LEN + cfg.symbol_size as usize) as f64;
    let loop_seconds = units as f64 * pkt_bytes * 8.0 / cfg.rate_bps as f64;

    let mut rx: Vec<Rx> = (0..cfg.receivers)
        .map(|i| {
            let join_at = t0 + cfg.join_spread.mul_f64(rng.gen::<f64>());
            Rx {
                addr: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
                    5000,
                )),
                rid: 1000 + i as u64,
                join_at,
                crash_at: None,
                joined: false,
                alive: false,
                have: vec![false; units as usize],
                have_count: 0,
                nak: NakEngine::new(shape, rng.gen()),
                timer: None,
                done_at: None,
                first_at: None,
                next_keepalive: join_at,
            }
        })
        .collect();
    for r in rx.iter_mut() {
        // Without suppression every receiver NAKs at once and hears nobody.
        r.nak.set_unicast(!cfg.suppression);
    }
    let mut q: BinaryHeap<Reverse<Queued<Ev>>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |q: &mut BinaryHeap<Reverse<Queued<Ev>>>, at: Instant, ev: Ev| {
        seq += 1;
        q.push(Reverse(Queued(at, seq, ev)));
    };
    for (i, r) in rx.iter().enumerate() {
        push(&mut q, r.join_at, Ev::Join(i));
    }
    for (i, r) in rx.iter_mut().enumerate().take(cfg.crashes) {
        // Crash somewhere in the middle of the first loop after joining.
        let at = r.join_at + Duration::from_secs_f64(loop_seconds * (0.3 + 0.4 * rng.gen::<f64>()));
        r.crash_at = Some(at);
        push(&mut q, at, Ev::Crash(i));
    }

    let d = cfg.one_way_delay;
    let rtt_us = (d * 2).as_micros() as u32;
    let (mut loss_events, mut repairs_sent, mut duplicate_repairs) = (0u64, 0u64, 0u64);
    let mut wire_bytes = 0f64;
    let mut server_wake: Option<Instant> = None;
    let mut now = t0;
    let deadline = t0 + cfg.max_time;
    let mut done = 0usize;

    let mut all_done_at: Option<Instant> = None;
    while let Some(Reverse(Queued(at, _, ev))) = q.pop() {
        if at > deadline {
            break;
        }
        // Once everyone is done, run on just long enough for the completions to arrive.
        if done == cfg.receivers {
            let t = *all_done_at.get_or_insert(at);
            if at > t + d * 4 {
                break;
            }
        }
        now = at;
        let mut touched: Option<usize> = None;
        match ev {
            Ev::ServerWake => {
                if server_wake == Some(now) {
                    server_wake = None;
                }
                mgr.handle_timeout(now);
                while let Some(t) = mgr.poll_transmit(now) {
                    let (hdr, _) = DataHeader::decode(&t.header).expect("own header");
                    let (id, sync) = match (&hdr.kind, &t.payload) {
                        (DataKind::Sync, TransmitPayload::Sync(b)) => {
                            (None, SyncInfo::decode(b).ok())
                        }
                        (DataKind::Packet(id), _) => (Some(*id), None),
                        _ => (None, None),
                    };
                    wire_bytes += if id.is_some() {
                        pkt_bytes
                    } else {
                        (DATA_HEADER_LEN + crate::wire::data::SYNC_LEN) as f64
                    };
                    if hdr.repair {
                        repairs_sent += 1;
                        let u = shape
                            .unit_index(id.expect("repairs carry packets"))
                            .expect("in range") as usize;
                        if !rx
                            .iter()
                            .any(|r| r.alive && r.done_at.is_none() && !r.have[u])
                        {
                            duplicate_repairs += 1;
                        }
                    }
                    let shared_lost = rng.gen::<f64>() < cfg.shared_loss;
                    push(
                        &mut q,
                        now + d,
                        Ev::Packet {
                            id,
                            repair: hdr.repair,
                            sync,
                            shared_lost,
                        },
                    );
                }
                while mgr.poll_reply().is_some() {}
                while mgr.poll_event().is_some() {}
            }
            Ev::ToServer(from, bytes) => {
                mgr.handle_control(now, from, &bytes);
                while mgr.poll_reply().is_some() {}
            }
            Ev::Packet {
                id,
                repair,
                sync,
                shared_lost,
            } => {
                let mut lost_needed = false;
                for (i, r) in rx.iter_mut().enumerate() {
                    if !r.alive || r.done_at.is_some() {
                        continue;
                    }
                    let lost = shared_lost || rng.gen::<f64>() < cfg.independent_loss;
                    if let Some(s) = sync {
                        if !lost {
                            r.nak
                                .on_sync(&s, DATA_HEADER_LEN + cfg.symbol_size as usize);
                        }
                        continue;
                    }
                    let id = id.expect("packet");
                    let u = shape.unit_index(id).expect("in range") as usize;
                    if !lost && r.first_at.is_none() {
                        r.first_at = Some(now);
                    }
                    if lost {
                        lost_needed |= !r.have[u];
                        continue;
                    }
                    if !hold_packet(&mut r.nak, &mut r.have, &shape, now, id, repair) {
                        continue;
                    }
                    r.have_count += 1;
                    if r.have_count == units && r.done_at.is_none() {
                        r.done_at = Some(now);
                        done += 1;
                        let msg =
                            Envelope::new(r.rid, 3, Control::Complete { archive_id }).encode();
                        push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                        continue;
                    }
                    if let Some(t) = r.nak.poll_timeout() {
                        if r.timer.is_none_or(|x| t < x) {
                            r.timer = Some(t);
                            push(&mut q, t, Ev::RxTimer(i));
                        }
                    }
                }
                loss_events += lost_needed as u64;
            }
            Ev::NakHeard(i, ranges) => {
                let r = &mut rx[i];
                if r.alive && r.done_at.is_none() {
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
                r.joined = true;
                r.alive = true;
                let msg = Envelope::new(
                    r.rid,
                    1,
                    Control::Join {
                        title: "sim".into(),
                    },
                )
                .encode();
                push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                touched = Some(i);
            }
            Ev::Crash(i) => {
                let r = &mut rx[i];
                if r.done_at.is_none() {
                    r.alive = false;
                    r.nak = NakEngine::new(shape, rng.gen());
                    r.nak.set_unicast(!cfg.suppression);
                    r.timer = None;
                    push(&mut q, now + cfg.crash_downtime, Ev::Join(i));
                }
            }
        }

        // Receiver timers, NAKs and keepalives.
        if let Some(i) = touched {
            let r = &mut rx[i];
            if r.alive && r.done_at.is_none() {
                let have = &r.have;
                r.nak.handle_timeout(now, |x| have[x as usize]);
                while let Some(ranges) = r.nak.poll_nak(now) {
                    let nak = Nak {
                        archive_tag: tag,
                        receiver_id: r.rid,
                        ranges: ranges.clone(),
                    };
                    let bytes = nak.encode();
                    wire_bytes += bytes.len() as f64;
                    if rng.gen::<f64>() >= cfg.independent_loss {
                        push(&mut q, now + d, Ev::ToServer(r.addr, bytes));
                    }
                    if cfg.suppression {
                        for j in 0..cfg.receivers {
                            if j != i && rng.gen::<f64>() >= cfg.independent_loss {
                                push(
                                    &mut q,
                                    now + cfg.peer_delay,
                                    Ev::NakHeard(j, ranges.clone()),
                                );
                            }
                        }
                    }
                }
                if now >= r.next_keepalive {
                    r.next_keepalive = now + params.lease / 3;
                    let msg = Envelope::new(
                        r.rid,
                        2,
                        Control::Keepalive {
                            archive_id,
                            have: r.have_count,
                            total: units,
                            rtt_us,
                            rx_bps: 0,
                            loss_ppm: 0,
                        },
                    )
                    .encode();
                    push(&mut q, now + d, Ev::ToServer(r.addr, msg));
                }
                let next = r
                    .nak
                    .poll_timeout()
                    .into_iter()
                    .chain([r.next_keepalive])
                    .min();
                if let Some(t) = next {
                    if r.timer.is_none_or(|x| t < x) {
                        r.timer = Some(t);
                        push(&mut q, t.max(now), Ev::RxTimer(i));
                    }
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

    if std::env::var("MCAST_SIM_DEBUG").is_ok() {
        let (mut sent, mut units_naked, mut supp, mut missed) = (0, 0, 0, 0);
        for r in &rx {
            sent += r.nak.counters.naks_sent;
            units_naked += r.nak.counters.units_naked;
            supp += r.nak.counters.units_suppressed;
            missed += r.nak.counters.units_missed;
        }
        eprintln!("debug: naks_sent {sent} units_naked {units_naked} suppressed {supp} missed {missed} grtt {:?}", rx[0].nak.grtt());
    }
    let c = mgr.counters();
    let times: Vec<f64> = rx
        .iter()
        .filter_map(|r| {
            let start = r.first_at.unwrap_or(r.join_at);
            r.done_at.map(|t| (t - start).as_secs_f64() / loop_seconds)
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
        loss_events,
        naks_at_server: c.naks_received,
        nak_units_at_server: c.nak_units_received,
        naks_per_loss: c.nak_units_received as f64 / loss_events.max(1) as f64,
        repairs_sent,
        duplicate_repairs,
        wire_per_file_byte: wire_bytes / loop_bytes,
        sim_seconds: (now - t0).as_secs_f64(),
        channel_closed: mgr.open_channels() == 0,
    }
}
