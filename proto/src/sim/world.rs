//! The simulated network every scenario runs on: one real [`ChannelManager`] and N real
//! receiver [`Session`]s — the very types `mcastd` and `mcast-recv` drive — on a virtual
//! clock. The world only moves bytes and time, as the drivers do: it delivers control
//! datagrams, fans channel packets out to the receivers subscribed to a group, carries out
//! the sessions' events (join/leave a group, read a hash packet back, open a unicast socket)
//! and wakes each engine at its `poll_timeout`.
//!
//! What a real network adds, modelled per receiver: a link of its own rate (a drop-tail
//! queue like `tc tbf`, rate steps over time), random loss on the link, one-way delay, a
//! shared upstream loss, IGMP leave latency (a left group keeps filling the link), late
//! joins, crashes (a new session resumes from what was written), receivers whose network
//! drops multicast (they fall back to unicast), and receivers short of CPU (their socket
//! buffer overflows and the socket counts the drops, as `SO_RXQ_OVFL` does). Same seed, same
//! configuration → the same outcome, bit for bit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::archive::SimArchive;
use super::Queued;
use crate::archive::PacketId;
use crate::carousel::LoopShape;
use crate::channel::{ChannelManager, HeadBytes, Params, TitleInfo, TransmitPayload};
use crate::receiver::session::{Prior, TierSample};
use crate::receiver::{Event, Failure, Session, SessionConfig, SessionStats, Via};
use crate::wire::data::{DataHeader, DataKind, DATA_HEADER_LEN, SIGNED_SYNC_LEN};
use crate::wire::nak::{is_nak, Nak};

/// The receivers' wall clock at a world's start (unix seconds), unless a scenario sets one.
pub const SIM_UNIX_START: u64 = 1_800_000_000;

/// IPv4 + UDP header bytes: a link carries them too.
pub const IP_UDP: usize = 28;

/// Datagram bytes (headers included) a CPU-limited receiver's socket buffer holds
/// ([`RxSpec::cpu_bps`]): a small buffer (256 KiB, as `mcast-recv --recv-buffer 262144`), so
/// it overruns soon after the rate passes what it processes, but large enough for a pacer
/// burst: the server sends in bursts, which a buffer sized in time would cut short.
pub const SOCKET_BUFFER: usize = 256 << 10;

/// A receiver's link: `(from, rate bit/s)` steps, the first from zero. Empty: no limit.
pub type LinkProfile = Vec<(Duration, u64)>;

/// One receiver of a scenario.
#[derive(Clone, Debug)]
pub struct RxSpec {
    pub join_at: Duration,
    pub link: LinkProfile,
    /// Random loss on its own link (data, SYNC and NAKs it sends or hears).
    pub loss: f64,
    /// Crashes once at this moment (if not done) and comes back `crash_downtime` later.
    pub crash_at: Option<Duration>,
    /// Its network delivers multicast (false: it must fall back to unicast).
    pub multicast: bool,
    /// Channel datagram bits (headers included) it can process per second; `None`: as fast
    /// as they come. Datagrams arriving faster wait in its socket buffer
    /// ([`SOCKET_BUFFER`] bytes); when that is full they are dropped and counted,
    /// and the count reaches its session with the next datagram it takes, as the driver
    /// reports `SO_RXQ_OVFL`.
    pub cpu_bps: Option<u64>,
    /// Its site's policy without multicast (`SessionConfig::unicast_fallback`,
    /// `unicast_limit`): the stream (true, None) unless a test says HTTP.
    pub unicast_fallback: bool,
    pub unicast_limit: Option<Duration>,
}

impl RxSpec {
    pub fn new(join_at: Duration) -> RxSpec {
        RxSpec {
            join_at,
            link: Vec::new(),
            loss: 0.0,
            crash_at: None,
            multicast: true,
            cpu_bps: None,
            unicast_fallback: true,
            unicast_limit: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct WorldConfig {
    pub seed: u64,
    pub data_packets: u64,
    pub symbol_size: u32,
    /// FEC repair symbols per data packet in the title (0: none), as `mcastd pack
    /// --fec-overhead`.
    pub fec_overhead: f64,
    pub params: Params,
    pub receivers: Vec<RxSpec>,
    /// Probability a channel packet is lost for every receiver (an upstream link).
    pub shared_loss: f64,
    pub one_way_delay: Duration,
    /// How long a NAK multicast by one receiver takes to reach the others.
    pub peer_delay: Duration,
    /// Longest wait in a link's queue before a packet is dropped (`tbf latency`).
    pub queue_limit: Duration,
    /// How long a left group keeps reaching the receiver's link.
    pub leave_latency: Duration,
    pub crash_downtime: Duration,
    /// NAK suppression on (back-off, NAKs heard on the group) or off.
    pub suppression: bool,
    /// An IGMPv2 querier with snooping, general queries this often: when a member's leave
    /// takes effect, the switch stops forwarding the group to the other members until they
    /// report again (a join) or the next general query. `None`: IGMPv3 (per-host state).
    pub igmp_v2_query: Option<Duration>,
    /// An attacker on the LAN multicasting, this often, a forged NAK for every unit of the
    /// loop (and every FEC block) to the groups receivers are on: it would poison their
    /// suppression. `None`: no attacker.
    pub forged_naks: Option<Duration>,
    /// The server is an edge: delegations it hands receivers (the archive is signed by
    /// [`super::archive::sim_identity`], `params.sync_signer` signs SYNCs).
    pub delegations: Vec<crate::delegation::Delegation>,
    /// The receivers' wall clock (unix seconds at the start), for delegation expiry.
    pub unix_secs: Option<u64>,
    pub max_time: Duration,
}

impl WorldConfig {
    /// A world with these receivers on the given title and channel parameters: no shared
    /// loss, 2 ms one way (peers 4 ms apart), a 50 ms link queue, 1 s leave latency, NAK
    /// suppression on, IGMPv3, five minutes at most. Scenarios change what they model.
    pub fn new(
        seed: u64,
        data_packets: u64,
        symbol_size: u32,
        params: Params,
        receivers: Vec<RxSpec>,
    ) -> WorldConfig {
        WorldConfig {
            seed,
            data_packets,
            symbol_size,
            fec_overhead: 0.0,
            params,
            receivers,
            shared_loss: 0.0,
            one_way_delay: Duration::from_millis(2),
            peer_delay: Duration::from_millis(4),
            queue_limit: Duration::from_millis(50),
            leave_latency: Duration::from_secs(1),
            crash_downtime: Duration::ZERO,
            suppression: true,
            igmp_v2_query: None,
            forged_naks: None,
            delegations: Vec::new(),
            unix_secs: Some(SIM_UNIX_START),
            max_time: Duration::from_secs(300),
        }
    }
}

/// What one receiver did.
#[derive(Clone, Debug)]
pub struct RxOutcome {
    /// When it held every unit (from the start of the run).
    pub done_at: Option<Duration>,
    /// Its first loop packet.
    pub first_at: Option<Duration>,
    pub failed: Option<Failure>,
    /// The last session's figures (a crashed receiver's earlier sessions are added in).
    pub stats: SessionStats,
    /// Payload bytes that reached its sessions (all sessions).
    pub received_bytes: u64,
    pub link_drops: u64,
    /// Datagrams its socket dropped for want of CPU ([`RxSpec::cpu_bps`]).
    pub socket_drops: u64,
    /// (time s, tier) after each granted tier move.
    pub moves: Vec<(f64, usize)>,
    /// (time s, judged interval).
    pub samples: Vec<(f64, TierSample)>,
    pub tier_counters: crate::receiver::tier::TierCounters,
    pub unicast: bool,
}

/// Per tier: what the server sent and the rates it set.
#[derive(Clone, Debug, Default)]
pub struct TierTrace {
    pub payload_bytes: u64,
    pub rate_min_bps: u64,
    pub rate_max_bps: u64,
    pub max_members: usize,
}

#[derive(Clone, Debug)]
pub struct WorldOutcome {
    pub receivers: Vec<RxOutcome>,
    pub tiers: Vec<TierTrace>,
    /// Transmissions lost by at least one receiver that needed them.
    pub loss_events: u64,
    pub repairs_sent: u64,
    /// Repairs that no active receiver needed when they went out.
    pub duplicate_repairs: u64,
    /// Bytes on the channel (data, repairs, SYNC, NAKs).
    pub wire_bytes: f64,
    pub server_wakeups: u64,
    pub idle_server_wakeups: u64,
    pub server_spinning: bool,
    pub channels_opened: u64,
    pub channels_closed: u64,
    pub channels_open_at_end: usize,
    pub naks_at_server: u64,
    pub nak_units_at_server: u64,
    /// FEC symbols asked for by amount, and extra symbols sent in answer.
    pub nak_symbols_at_server: u64,
    pub extras_sent: u64,
    /// Packets (and of them, repairs) unicast members' own streams carried.
    pub unicast_packets_sent: u64,
    pub unicast_repairs_sent: u64,
    pub sim_seconds: f64,
    pub loop_units: u64,
}

/// The server's control endpoint, and where its channel packets come from.
const SERVER_CTL: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 7600));
const SERVER_DATA: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000));

enum Ev {
    ServerWake,
    ToServer(SocketAddr, Vec<u8>),
    /// A control reply reaching receiver `.0` (session generation `.1`).
    ToRx(usize, u32, Vec<u8>),
    /// A channel packet reaching the group (fan-out to subscribers, through their links).
    Packet {
        group: SocketAddr,
        bytes: Rc<Vec<u8>>,
        id: Option<PacketId>,
        shared_lost: bool,
    },
    /// A packet leaving receiver `.0`'s link (after its queue), or a unicast packet.
    Arrive(usize, Option<SocketAddr>, Rc<Vec<u8>>),
    /// A unicast channel packet reaching receiver `.0`'s link.
    Unicast(usize, Rc<Vec<u8>>),
    /// Receiver `.0`'s leave of `.1` reaches the switch.
    IgmpLeave(usize, SocketAddr),
    /// A NAK multicast by another receiver on `.1`, reaching receiver `.0`.
    NakHeard(usize, SocketAddr, Rc<Vec<u8>>),
    RxTimer(usize),
    Join(usize),
    Crash(usize),
    SampleRates,
    /// The attacker's next forged NAK (see [`WorldConfig::forged_naks`]).
    ForgedNak,
}

struct Host {
    spec: RxSpec,
    gen: u32,
    addr: SocketAddr,
    uaddr: SocketAddr,
    sess: Option<Session>,
    group: Option<SocketAddr>,
    leaving: Vec<(SocketAddr, Instant)>,
    busy_until: Instant,
    /// Groups the switch stopped forwarding to this host (IGMPv2), until when.
    unforwarded: Vec<(SocketAddr, Instant)>,
    /// When it last reported each group (joined it).
    reported: Vec<(SocketAddr, Instant)>,
    timer: Option<Instant>,
    done_at: Option<Instant>,
    first_at: Option<Instant>,
    failed: Option<Failure>,
    /// What a crashed session had written (its state file).
    held: Option<Prior>,
    received_before: u64,
    link_drops: u64,
    /// Until when its CPU is busy with datagrams already taken from the socket.
    cpu_busy_until: Instant,
    socket_drops: u64,
    /// Socket drops its session has not been told of yet.
    unreported_drops: u64,
    moves: Vec<(f64, usize)>,
    samples: Vec<(f64, TierSample)>,
    last_stats: SessionStats,
    tier_counters: crate::receiver::tier::TierCounters,
}

impl Host {
    fn subscribed(&self, g: SocketAddr, now: Instant) -> bool {
        (self.group == Some(g) || self.leaving.iter().any(|&(l, t)| l == g && t > now))
            && !self.unforwarded.iter().any(|&(u, t)| u == g && t > now)
    }

    /// Leaves its group; the group it left, whose leave reaches the switch `latency` later.
    fn leave(&mut self, now: Instant, latency: Duration) -> Option<SocketAddr> {
        let g = self.group.take()?;
        self.leaving.retain(|&(_, t)| t > now);
        self.leaving.push((g, now + latency));
        Some(g)
    }

    fn link_bps(&self, since_start: Duration) -> Option<u64> {
        self.spec
            .link
            .iter()
            .rev()
            .find(|(from, _)| *from <= since_start)
            .or(self.spec.link.first())
            .map(|&(_, r)| r.max(1))
    }

    fn active(&self) -> bool {
        self.sess.is_some() && self.done_at.is_none() && self.failed.is_none()
    }
}

struct World<'a> {
    cfg: &'a WorldConfig,
    t0: Instant,
    rng: SmallRng,
    arc: SimArchive,
    shape: LoopShape,
    mgr: ChannelManager,
    hosts: Vec<Host>,
    by_addr: HashMap<SocketAddr, usize>,
    q: BinaryHeap<Reverse<Queued<Ev>>>,
    seq: u64,
    server_wake: Option<Instant>,
    channel_tier: HashMap<u32, usize>,
    out: WorldOutcome,
}

/// Run a world from `t0` until every receiver is done (and the channels closed) or
/// `max_time` passed.
pub fn run(cfg: &WorldConfig, t0: Instant) -> WorldOutcome {
    let arc = SimArchive::with_fec(
        cfg.data_packets,
        cfg.symbol_size,
        cfg.seed,
        cfg.fec_overhead,
    );
    let shape = LoopShape::of(&arc.head);
    let info = TitleInfo {
        head: arc.head.clone(),
        head_bytes: HeadBytes::Memory(arc.head_bytes.clone()),
        archive_len: arc.layout.file_len(),
    };
    let mut mgr = ChannelManager::new(cfg.params.clone(), vec![info], t0);
    mgr.set_delegations(cfg.delegations.clone());
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let hosts: Vec<Host> = cfg
        .receivers
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let ip = Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            Host {
                spec: spec.clone(),
                gen: 0,
                addr: SocketAddr::V4(SocketAddrV4::new(ip, 5000)),
                uaddr: SocketAddr::V4(SocketAddrV4::new(ip, 6000)),
                sess: None,
                group: None,
                leaving: Vec::new(),
                busy_until: t0,
                unforwarded: Vec::new(),
                reported: Vec::new(),
                timer: None,
                done_at: None,
                first_at: None,
                failed: None,
                held: None,
                received_before: 0,
                link_drops: 0,
                cpu_busy_until: t0,
                socket_drops: 0,
                unreported_drops: 0,
                moves: Vec::new(),
                samples: Vec::new(),
                last_stats: SessionStats::default(),
                tier_counters: Default::default(),
            }
        })
        .collect();
    let _ = rng.gen::<u64>();
    let n_tiers = cfg.params.tiers().len();
    let mut w = World {
        cfg,
        t0,
        rng,
        shape,
        arc,
        mgr,
        hosts,
        by_addr: HashMap::new(),
        q: BinaryHeap::new(),
        seq: 0,
        server_wake: None,
        channel_tier: HashMap::new(),
        out: WorldOutcome {
            receivers: Vec::new(),
            tiers: vec![
                TierTrace {
                    rate_min_bps: u64::MAX,
                    ..Default::default()
                };
                n_tiers
            ],
            loss_events: 0,
            repairs_sent: 0,
            duplicate_repairs: 0,
            wire_bytes: 0.0,
            server_wakeups: 0,
            idle_server_wakeups: 0,
            server_spinning: false,
            channels_opened: 0,
            channels_closed: 0,
            channels_open_at_end: 0,
            naks_at_server: 0,
            nak_units_at_server: 0,
            nak_symbols_at_server: 0,
            extras_sent: 0,
            unicast_packets_sent: 0,
            unicast_repairs_sent: 0,
            sim_seconds: 0.0,
            loop_units: shape.loop_packets(),
        },
    };
    w.main_loop();
    w.finish()
}

impl World<'_> {
    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.q.push(Reverse(Queued(at, self.seq, ev)));
    }

    /// The attacker's NAK: the archive's tag (public, in every data packet), a made-up
    /// receiver id, every unit and every FEC block asked for; heard at once by every
    /// receiver on a group.
    fn forge_nak(&mut self, now: Instant) {
        let Some(every) = self.cfg.forged_naks else {
            return;
        };
        let units = self.shape.loop_packets();
        let blocks = self.shape.fec_blocks();
        let nak = Nak {
            archive_tag: crate::wire::data::archive_tag(&self.arc.head.archive_id),
            session_tag: self.rng.gen(),
            ranges: vec![(0, units.min(u32::MAX as u64) as u32)],
            symbols: (0..blocks.min(32)).map(|b| (b, 1_000)).collect(),
        };
        let bytes = Rc::new(nak.encode());
        for j in 0..self.hosts.len() {
            if let Some(g) = self.hosts[j].group.filter(|_| self.hosts[j].active()) {
                self.push(now, Ev::NakHeard(j, g, bytes.clone()));
            }
        }
        self.push(now + every, Ev::ForgedNak);
    }

    fn main_loop(&mut self) {
        if let Some(every) = self.cfg.forged_naks {
            self.push(self.t0 + every, Ev::ForgedNak);
        }
        for i in 0..self.hosts.len() {
            let at = self.t0 + self.hosts[i].spec.join_at;
            self.push(at, Ev::Join(i));
            if let Some(c) = self.hosts[i].spec.crash_at {
                self.push(self.t0 + c, Ev::Crash(i));
            }
        }
        self.push(self.t0, Ev::SampleRates);
        let deadline = self.t0 + self.cfg.max_time;
        let (mut last_idle, mut spins) = (None, 0u32);
        let mut now = self.t0;
        let mut all_done_at: Option<Instant> = None;
        while let Some(Reverse(Queued(at, _, ev))) = self.q.pop() {
            if at > deadline {
                break;
            }
            let finished = self
                .hosts
                .iter()
                .all(|h| h.done_at.is_some() || h.failed.is_some());
            if finished {
                // Run on just long enough for completions to arrive and channels to close.
                let t = *all_done_at.get_or_insert(at);
                if self.mgr.open_channels() == 0 || at > t + self.cfg.params.lease * 2 {
                    break;
                }
            }
            now = at;
            match ev {
                Ev::ServerWake => {
                    if self.server_wake == Some(now) {
                        self.server_wake = None;
                    }
                    if self.server_turn(now) == 0 {
                        self.out.idle_server_wakeups += 1;
                        if last_idle == Some(now) {
                            spins += 1;
                            if spins > 10_000 {
                                self.out.server_spinning = true;
                                break;
                            }
                        } else {
                            spins = 0;
                        }
                        last_idle = Some(now);
                    }
                }
                Ev::ToServer(from, bytes) => {
                    self.mgr.handle_control(now, from, &bytes);
                    self.server_replies(now);
                }
                Ev::ToRx(i, gen, bytes) => {
                    if self.hosts[i].gen == gen {
                        self.deliver(i, now, SERVER_CTL, &bytes);
                    }
                }
                Ev::Packet {
                    group,
                    bytes,
                    id,
                    shared_lost,
                } => self.fan_out(now, group, bytes, id, shared_lost),
                Ev::Arrive(i, group, bytes) => {
                    let h = &self.hosts[i];
                    // A left group's packets still cross the link, but no socket takes them.
                    if group.is_none() || h.group == group {
                        self.deliver(i, now, SERVER_DATA, &bytes);
                    }
                }
                Ev::IgmpLeave(i, g) => self.igmp_leave(i, g, now),
                Ev::Unicast(i, bytes) => {
                    self.through_link(i, now, None, bytes);
                }
                Ev::NakHeard(i, group, bytes) => {
                    if self.hosts[i].group == Some(group) {
                        let from = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 1));
                        self.deliver(i, now, from, &bytes);
                    }
                }
                Ev::RxTimer(i) => {
                    if self.hosts[i].timer == Some(now) {
                        self.hosts[i].timer = None;
                    }
                    if let Some(s) = self.hosts[i].sess.as_mut() {
                        s.handle_timeout(now);
                    }
                    self.service(i, now);
                }
                Ev::Join(i) => self.start_session(i, now),
                Ev::Crash(i) => self.crash(i, now),
                Ev::SampleRates => {
                    let n = self.out.tiers.len();
                    for c in self.mgr.stats().channels {
                        let s = &mut self.out.tiers[c.tier.min(n - 1)];
                        s.rate_min_bps = s.rate_min_bps.min(c.rate_bps);
                        s.rate_max_bps = s.rate_max_bps.max(c.rate_bps);
                        s.max_members = s.max_members.max(c.members);
                    }
                    self.push(now + Duration::from_millis(500), Ev::SampleRates);
                }
                Ev::ForgedNak => self.forge_nak(now),
            }
            if let Some(t) = self.mgr.poll_timeout() {
                let t = t.max(now);
                if self.server_wake.is_none_or(|w| t < w) {
                    self.server_wake = Some(t);
                    self.push(t, Ev::ServerWake);
                }
            }
        }
        self.out.sim_seconds = (now - self.t0).as_secs_f64();
    }

    /// A new session for receiver `i` (its first, or after a crash, resuming what it held).
    fn start_session(&mut self, i: usize, now: Instant) {
        let rid: u64 = self.rng.gen();
        let seed: u64 = self.rng.gen();
        let h = &mut self.hosts[i];
        if h.done_at.is_some() || h.failed.is_some() {
            return;
        }
        h.gen += 1;
        // A restarted receiver binds new sockets: new ports.
        let port = |base: u16, gen: u32| base.wrapping_add(gen as u16);
        if let (SocketAddr::V4(a), SocketAddr::V4(u)) = (h.addr, h.uaddr) {
            h.addr = SocketAddr::V4(SocketAddrV4::new(*a.ip(), port(5000, h.gen)));
            h.uaddr = SocketAddr::V4(SocketAddrV4::new(*u.ip(), port(6000, h.gen)));
        }
        let mut c = SessionConfig::new("sim", SERVER_CTL, rid, seed);
        c.server_key = Some(self.arc.head.server_key);
        c.prior = h.held.take();
        c.nak_suppression = self.cfg.suppression;
        c.unicast_fallback = h.spec.unicast_fallback;
        c.unicast_limit = h.spec.unicast_limit;
        c.unix_secs = self
            .cfg
            .unix_secs
            .map(|u| u + now.saturating_duration_since(self.t0).as_secs());
        h.sess = Some(Session::new(c, now));
        h.timer = None;
        let (addr, uaddr) = (h.addr, h.uaddr);
        self.by_addr.insert(addr, i);
        self.by_addr.insert(uaddr, i);
        self.service(i, now);
    }

    fn crash(&mut self, i: usize, now: Instant) {
        let latency = self.cfg.leave_latency;
        let h = &mut self.hosts[i];
        if !h.active() {
            return;
        }
        let s = h.sess.take().expect("active");
        if let (Some(archive_id), Some(head)) = (s.archive_id(), s.head()) {
            h.held = Some(Prior {
                archive_id,
                server_key: head.server_key,
                have: s.have_bits().to_vec(),
            });
        }
        h.received_before += s.stats(now).received_bytes;
        let left = h.leave(now, latency);
        h.timer = None;
        if let Some(g) = left {
            self.push(now + latency, Ev::IgmpLeave(i, g));
        }
        let back = now + self.cfg.crash_downtime;
        self.push(back, Ev::Join(i));
    }

    /// A datagram reaching receiver `i`'s session.
    fn deliver(&mut self, i: usize, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let h = &mut self.hosts[i];
        if !h.active() {
            return;
        }
        if let (Some(cpu), true) = (h.spec.cpu_bps, from == SERVER_DATA) {
            // Its socket buffer: full when the datagrams queued ahead (the work not yet done,
            // in bytes at its processing rate) and this one exceed SOCKET_BUFFER.
            let queued = h
                .cpu_busy_until
                .saturating_duration_since(now)
                .as_secs_f64()
                * cpu as f64
                / 8.0;
            if queued + (bytes.len() + IP_UDP) as f64 > SOCKET_BUFFER as f64 {
                h.socket_drops += 1;
                h.unreported_drops += 1;
                return;
            }
            let work = (bytes.len() + IP_UDP) as f64 * 8.0 / cpu.max(1) as f64;
            h.cpu_busy_until = h.cpu_busy_until.max(now) + Duration::from_secs_f64(work);
        }
        let s = h.sess.as_mut().expect("active");
        if h.unreported_drops > 0 {
            // The drop counter rides on the next datagram taken, as SO_RXQ_OVFL's does.
            s.on_receive_drops(std::mem::take(&mut h.unreported_drops));
        }
        s.handle_datagram(now, from, bytes);
        if from == SERVER_DATA && h.first_at.is_none() {
            if let Ok((hdr, _)) = DataHeader::decode(bytes) {
                if matches!(hdr.kind, DataKind::Packet(_)) {
                    h.first_at = Some(now);
                }
            }
        }
        self.service(i, now);
    }

    /// Send what receiver `i`'s session has to send, carry out its events, set its timer.
    fn service(&mut self, i: usize, now: Instant) {
        loop {
            let Some(s) = self.hosts[i].sess.as_mut() else {
                return;
            };
            if let Some(t) = s.poll_transmit() {
                self.transmit(i, now, t.via, t.to, t.bytes);
                continue;
            }
            let Some(ev) = s.poll_event() else {
                break;
            };
            self.on_event(i, now, ev);
        }
        let latency = self.cfg.leave_latency;
        let h = &mut self.hosts[i];
        let Some((have, total)) = h.sess.as_ref().map(|s| s.progress_units()) else {
            return;
        };
        if h.done_at.is_none() && total > 0 && have == total {
            h.done_at = Some(now);
            // Its socket closes: the group is left (and takes the leave latency).
            if let Some(g) = h.leave(now, latency) {
                self.push(now + latency, Ev::IgmpLeave(i, g));
            }
        }
        let h = &mut self.hosts[i];
        if let Some(t) = h.sess.as_ref().and_then(|s| s.poll_timeout()) {
            let t = t.max(now + Duration::from_micros(1));
            if h.timer.is_none_or(|x| t < x) {
                h.timer = Some(t);
                self.push(t, Ev::RxTimer(i));
            }
        }
    }

    fn transmit(&mut self, i: usize, now: Instant, via: Via, to: SocketAddr, bytes: Vec<u8>) {
        let (d, pd) = (self.cfg.one_way_delay, self.cfg.peer_delay);
        let h = &self.hosts[i];
        let loss = h.spec.loss;
        let from = if via == Via::Unicast { h.uaddr } else { h.addr };
        match via {
            Via::Control | Via::Unicast => {
                // NAKs cross the lossy link; requests are retried by the session anyway and
                // are not dropped here.
                if is_nak(&bytes) {
                    self.out.wire_bytes += bytes.len() as f64;
                    if self.rng.gen::<f64>() < loss {
                        return;
                    }
                }
                self.push(now + d, Ev::ToServer(from, bytes));
            }
            Via::Group => {
                let g = to;
                if !self.cfg.suppression || !h.spec.multicast {
                    return;
                }
                let bytes = Rc::new(bytes);
                for j in 0..self.hosts.len() {
                    if j == i || !self.hosts[j].active() || !self.hosts[j].spec.multicast {
                        continue;
                    }
                    let l = self.hosts[j].spec.loss;
                    if self.rng.gen::<f64>() >= l {
                        self.push(now + pd, Ev::NakHeard(j, g, bytes.clone()));
                    }
                }
            }
        }
    }

    fn on_event(&mut self, i: usize, now: Instant, ev: Event) {
        let latency = self.cfg.leave_latency;
        let t_s = (now - self.t0).as_secs_f64();
        let h = &mut self.hosts[i];
        match ev {
            Event::HeadReady { prior_have, .. } => {
                let arc = &self.arc;
                let s = h.sess.as_mut().expect("session");
                s.start(now, prior_have, |off, buf| arc.read(off, buf));
            }
            Event::JoinGroup(g, _) => {
                if h.group != Some(g) {
                    h.leave(now, Duration::ZERO);
                }
                h.leaving.retain(|&(l, _)| l != g);
                h.group = Some(g);
                // A join sends a report: the switch forwards the group to this host again.
                h.unforwarded.retain(|&(u, _)| u != g);
                h.reported.retain(|&(u, _)| u != g);
                h.reported.push((g, now));
            }
            Event::LeaveGroup(g) => {
                if h.group == Some(g) {
                    h.leave(now, latency);
                    self.push(now + latency, Ev::IgmpLeave(i, g));
                }
            }
            Event::ReadHash { block, offset, len } => {
                let mut bytes = vec![0u8; len];
                let ok = self.arc.read(offset, &mut bytes);
                let s = h.sess.as_mut().expect("session");
                s.restore_hash(now, block, ok.then_some(bytes));
            }
            Event::ReadFec { block, reads } => {
                let symbols = reads
                    .into_iter()
                    .map(|(id, offset, len)| {
                        let mut bytes = vec![0u8; len];
                        let ok = self.arc.read(offset, &mut bytes);
                        (id, ok.then_some(bytes))
                    })
                    .collect();
                let s = h.sess.as_mut().expect("session");
                s.fec_symbols(now, block, symbols);
            }
            Event::TierChanged { tier, .. } => h.moves.push((t_s, tier as usize)),
            Event::TierJudged(sample) => h.samples.push((t_s, sample)),
            Event::Failed(f) => {
                h.failed = Some(f);
                if let Some(g) = h.leave(now, latency) {
                    self.push(now + latency, Ev::IgmpLeave(i, g));
                }
            }
            Event::Done => {
                if let Some(g) = h.leave(now, latency) {
                    self.push(now + latency, Ev::IgmpLeave(i, g));
                }
            }
            Event::OpenUnicast
            | Event::UnicastActive
            | Event::Write { .. }
            | Event::Checkpoint
            | Event::Progress(_)
            | Event::Rejoining => {}
        }
    }

    /// Host `i`'s leave of `g` reached the switch. Under an IGMPv2 querier the others that
    /// have not reported since stop getting the group until they do, or the next query.
    fn igmp_leave(&mut self, i: usize, g: SocketAddr, now: Instant) {
        let Some(q) = self.cfg.igmp_v2_query else {
            return;
        };
        if self.hosts[i].group == Some(g) {
            return; // it joined again meanwhile (a re-join's leave and report)
        }
        let since = (now - self.t0).as_secs_f64();
        let next_query = self.t0 + q.mul_f64((since / q.as_secs_f64()).floor() + 1.0);
        for (j, h) in self.hosts.iter_mut().enumerate() {
            let reported_after = h.reported.iter().any(|&(u, t)| u == g && t > now);
            if j != i && h.group == Some(g) && !reported_after {
                h.unforwarded.retain(|&(u, _)| u != g);
                h.unforwarded.push((g, next_query));
            }
        }
    }

    /// The server's turn: timers, channel packets out, replies.
    fn server_turn(&mut self, now: Instant) -> u64 {
        self.out.server_wakeups += 1;
        self.mgr.handle_timeout(now);
        let mut sent = 0;
        let d = self.cfg.one_way_delay;
        let symbol = self.cfg.symbol_size as u64;
        while let Some(t) = self.mgr.poll_transmit(now) {
            sent += 1;
            let (hdr, _) = DataHeader::decode(&t.header).expect("own header");
            let (id, payload): (Option<PacketId>, Vec<u8>) = match (&hdr.kind, &t.payload) {
                (DataKind::Sync, TransmitPayload::Sync(b)) => (None, b.to_vec()),
                (DataKind::Packet(id), _) => (Some(*id), self.arc.payload(*id)),
                _ => continue,
            };
            let mut bytes = Vec::with_capacity(DATA_HEADER_LEN + payload.len());
            bytes.extend_from_slice(&t.header);
            bytes.extend_from_slice(&payload);
            let bytes = Rc::new(bytes);
            if id.is_some() {
                let tier = match self.channel_tier.get(&t.channel) {
                    Some(&x) => x,
                    None => {
                        let x = self
                            .mgr
                            .stats()
                            .channels
                            .iter()
                            .find(|c| c.channel == t.channel)
                            .map_or(0, |c| c.tier);
                        self.channel_tier.insert(t.channel, x);
                        x
                    }
                };
                let n = self.out.tiers.len();
                self.out.tiers[tier.min(n - 1)].payload_bytes += symbol;
            }
            self.out.wire_bytes += if id.is_some() {
                (DATA_HEADER_LEN as u64 + symbol) as f64
            } else {
                (DATA_HEADER_LEN + SIGNED_SYNC_LEN) as f64
            };
            if hdr.repair {
                self.out.repairs_sent += 1;
                let id = id.expect("repairs carry packets");
                let u = self.shape.unit_index(id);
                // An extra FEC symbol is needed by a receiver whose block is still short.
                let extra_block = match id {
                    PacketId::Extra(e) => Some(e / self.shape.fec_extras().max(1)),
                    _ => None,
                };
                let needed = self.hosts.iter().any(|h| {
                    h.active()
                        && match (u, extra_block) {
                            (Some(u), _) => !h.sess.as_ref().is_some_and(|s| s.has_unit(u)),
                            (None, Some(f)) => {
                                h.sess.as_ref().is_some_and(|s| s.fec_block_short(f))
                            }
                            _ => false,
                        }
                });
                if !needed {
                    self.out.duplicate_repairs += 1;
                }
            }
            for dest in t.dests.iter() {
                match dest {
                    g if g.ip().is_multicast() => {
                        let shared_lost = self.rng.gen::<f64>() < self.cfg.shared_loss;
                        self.push(
                            now + d,
                            Ev::Packet {
                                group: *g,
                                bytes: bytes.clone(),
                                id,
                                shared_lost,
                            },
                        );
                    }
                    u => {
                        if let Some(&i) = self.by_addr.get(u) {
                            if self.hosts[i].uaddr == *u {
                                self.push(now + d, Ev::Unicast(i, bytes.clone()));
                            }
                        }
                    }
                }
            }
        }
        self.server_replies(now);
        sent
    }

    fn server_replies(&mut self, now: Instant) {
        let d = self.cfg.one_way_delay;
        while let Some((to, bytes)) = self.mgr.poll_reply() {
            if let Some(&i) = self.by_addr.get(&to) {
                let h = &self.hosts[i];
                if h.addr == to || h.uaddr == to {
                    let gen = h.gen;
                    self.push(now + d, Ev::ToRx(i, gen, bytes));
                }
            }
        }
        while self.mgr.poll_event().is_some() {}
    }

    /// A channel packet reached the group: every subscribed receiver gets it through its link.
    fn fan_out(
        &mut self,
        now: Instant,
        group: SocketAddr,
        bytes: Rc<Vec<u8>>,
        id: Option<PacketId>,
        shared_lost: bool,
    ) {
        let unit = id.and_then(|id| self.shape.unit_index(id));
        let mut lost_needed = false;
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            if !h.spec.multicast || !h.subscribed(group, now) {
                continue;
            }
            let needs = unit.is_some_and(|u| {
                h.active()
                    && h.group == Some(group)
                    && !h.sess.as_ref().is_some_and(|s| s.has_unit(u))
            });
            if shared_lost {
                lost_needed |= needs;
                continue;
            }
            if self.through_link(i, now, Some(group), bytes.clone()) {
                lost_needed |= needs;
            }
        }
        self.out.loss_events += lost_needed as u64;
    }

    /// Send `bytes` through receiver `i`'s link from `now`: random loss, then its queue (if
    /// it has a rate). True when the packet was lost.
    fn through_link(
        &mut self,
        i: usize,
        now: Instant,
        group: Option<SocketAddr>,
        bytes: Rc<Vec<u8>>,
    ) -> bool {
        let loss = self.hosts[i].spec.loss;
        if loss > 0.0 && self.rng.gen::<f64>() < loss {
            return true;
        }
        let since = now - self.t0;
        let h = &mut self.hosts[i];
        let Some(rate) = h.link_bps(since) else {
            // No rate limit: straight to the socket.
            if group.is_none() || h.group == group {
                self.deliver(i, now, SERVER_DATA, &bytes);
            }
            return false;
        };
        if h.busy_until.saturating_duration_since(now) > self.cfg.queue_limit {
            h.link_drops += 1;
            return true;
        }
        let wire = bytes.len() + IP_UDP;
        let tx = Duration::from_secs_f64(wire as f64 * 8.0 / rate as f64);
        h.busy_until = h.busy_until.max(now) + tx;
        let at = h.busy_until;
        self.push(at, Ev::Arrive(i, group, bytes));
        false
    }

    fn finish(mut self) -> WorldOutcome {
        let end = self.t0 + Duration::from_secs_f64(self.out.sim_seconds);
        let c = self.mgr.counters().clone();
        self.out.channels_opened = c.channels_opened;
        self.out.channels_closed = c.channels_closed;
        self.out.naks_at_server = c.naks_received;
        self.out.nak_units_at_server = c.nak_units_received;
        self.out.nak_symbols_at_server = c.nak_symbols_received;
        self.out.extras_sent = c.extras_sent;
        self.out.unicast_packets_sent = c.unicast_packets_sent;
        self.out.unicast_repairs_sent = c.unicast_repairs_sent;
        self.out.channels_open_at_end = self.mgr.open_channels();
        for s in self
            .out
            .tiers
            .iter_mut()
            .filter(|s| s.rate_min_bps == u64::MAX)
        {
            s.rate_min_bps = 0;
        }
        let t0 = self.t0;
        self.out.receivers = self
            .hosts
            .iter_mut()
            .map(|h| {
                let stats = h
                    .sess
                    .as_ref()
                    .map(|s| s.stats(end))
                    .unwrap_or_else(|| h.last_stats.clone());
                if let Some(tc) = h.sess.as_ref().and_then(|s| s.tier_counters()) {
                    h.tier_counters = tc;
                }
                RxOutcome {
                    done_at: h.done_at.map(|t| t - t0),
                    first_at: h.first_at.map(|t| t - t0),
                    failed: h.failed.clone(),
                    received_bytes: h.received_before + stats.received_bytes,
                    unicast: stats.unicast,
                    stats,
                    link_drops: h.link_drops,
                    socket_drops: h.socket_drops,
                    moves: std::mem::take(&mut h.moves),
                    samples: std::mem::take(&mut h.samples),
                    tier_counters: h.tier_counters.clone(),
                }
            })
            .collect();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site's policy without multicast, on a receiver multicast does not reach: `http` ends
    /// the session where it would ask for the stream (the server streams nothing); `both`
    /// lets the stream run `unicast_limit`, then ends it for HTTP to fetch the rest.
    #[test]
    fn site_policies_hand_receivers_without_multicast_to_http() {
        let world = |fallback: bool, limit: Option<Duration>| {
            let mut rx = RxSpec::new(Duration::ZERO);
            rx.multicast = false;
            rx.link = vec![(Duration::ZERO, 20_000_000)];
            rx.unicast_fallback = fallback;
            rx.unicast_limit = limit;
            let cfg = WorldConfig {
                max_time: Duration::from_secs(30),
                ..WorldConfig::new(9, 8000, 1280, Params::for_tests(50_000_000), vec![rx])
            };
            run(&cfg, Instant::now())
        };
        let http = world(false, None);
        let r = &http.receivers[0];
        assert!(
            matches!(r.failed, Some(Failure::NoMulticast(_))),
            "{:?}",
            r.failed
        );
        assert_eq!(http.unicast_packets_sent, 0);
        assert_eq!(r.received_bytes, 0);

        let both = world(true, Some(Duration::from_secs(1)));
        let r = &both.receivers[0];
        assert!(
            matches!(r.failed, Some(Failure::UnicastLimit(_))),
            "{:?}",
            r.failed
        );
        assert!(r.unicast && r.done_at.is_none());
        // It held part of the title when the stream's second was up (8,000 packets take
        // ~4 s at 20 Mbit/s).
        assert!(both.unicast_packets_sent > 0 && r.received_bytes > 0);
        assert!(r.received_bytes < 8000 * 1280, "{}", r.received_bytes);

        let stream = world(true, None);
        assert!(
            stream.receivers[0].done_at.is_some(),
            "{:?}",
            stream.receivers[0].failed
        );
    }

    /// An edge (SYNCs signed by its own key `[0xed; 32]`) looping a title signed by the
    /// origin ([`super::super::archive::sim_identity`]), handing receivers `delegations`.
    fn edge_world(delegations: Vec<crate::delegation::Delegation>) -> WorldOutcome {
        let mut params = Params::for_tests(50_000_000);
        params.lease = Duration::from_secs(2);
        params.sync_signer = Some(std::sync::Arc::new(edge_identity()));
        let cfg = WorldConfig {
            delegations,
            max_time: Duration::from_secs(20),
            ..WorldConfig::new(5, 1500, 1280, params, vec![RxSpec::new(Duration::ZERO); 2])
        };
        run(&cfg, Instant::now())
    }

    fn edge_identity() -> mcast_keys::Identity {
        mcast_keys::Identity::from_secret(&[0xed; 32])
    }

    #[test]
    fn edge_syncs_signed_under_a_delegation_are_taken() {
        use crate::delegation::Delegation;
        let origin = super::super::archive::sim_identity();
        let d = Delegation::issue(&origin, edge_identity().public(), SIM_UNIX_START + 3600);
        let out = edge_world(vec![d]);
        for r in &out.receivers {
            assert!(r.done_at.is_some() && r.failed.is_none(), "{r:?}");
            assert_eq!(r.stats.syncs_forged, 0, "{:?}", r.stats);
            assert!(r.stats.syncs_delegated > 0, "{:?}", r.stats);
            assert!(!r.unicast, "stayed on multicast");
        }
    }

    #[test]
    fn edge_syncs_without_a_valid_delegation_are_refused_and_counted() {
        use crate::delegation::Delegation;
        let origin = super::super::archive::sim_identity();
        let other = mcast_keys::Identity::from_secret(&[0x0b; 32]);
        let edge = edge_identity().public();
        let mut forged_origin = Delegation::issue(&other, edge, SIM_UNIX_START + 3600);
        forged_origin.origin = origin.public();
        let cases = [
            ("no delegation", vec![]),
            (
                "expired",
                vec![Delegation::issue(&origin, edge, SIM_UNIX_START - 1)],
            ),
            (
                "from another key",
                vec![Delegation::issue(&other, edge, SIM_UNIX_START + 3600)],
            ),
            (
                "claims the origin, signed by another key",
                vec![forged_origin],
            ),
            (
                "for another edge",
                vec![Delegation::issue(
                    &origin,
                    other.public(),
                    SIM_UNIX_START + 3600,
                )],
            ),
        ];
        for (what, delegations) in cases {
            let out = edge_world(delegations);
            for r in &out.receivers {
                assert!(r.stats.syncs_forged > 0, "{what}: {:?}", r.stats);
                assert_eq!(r.stats.syncs_delegated, 0, "{what}: {:?}", r.stats);
                // Data packets verify against the signed head whoever sends them: a clean
                // receiver still completes, without SYNC timing (GRTT, loop position).
                assert!(r.done_at.is_some(), "{what}: {r:?}");
            }
        }
    }

    #[test]
    fn three_clean_receivers_verify_and_complete() {
        let mut params = Params::for_tests(100_000_000);
        params.lease = Duration::from_secs(2);
        let cfg = WorldConfig {
            seed: 1,
            data_packets: 2000,
            symbol_size: 1280,
            fec_overhead: 0.0,
            params,
            receivers: vec![RxSpec::new(Duration::ZERO); 3],
            shared_loss: 0.0,
            one_way_delay: Duration::from_millis(5),
            peer_delay: Duration::from_millis(5),
            queue_limit: Duration::from_millis(50),
            leave_latency: Duration::ZERO,
            crash_downtime: Duration::from_millis(300),
            suppression: true,
            igmp_v2_query: None,
            forged_naks: None,
            delegations: Vec::new(),
            unix_secs: None,
            max_time: Duration::from_secs(30),
        };
        let out = run(&cfg, Instant::now());
        for r in &out.receivers {
            assert!(r.done_at.is_some() && r.failed.is_none(), "{r:?}");
            // Every unit was verified and written once; nothing forged, nothing rejected.
            assert_eq!(r.stats.download.written, out.loop_units);
            assert_eq!(r.stats.download.rejected, 0);
        }
        assert_eq!(out.channels_open_at_end, 0);
    }

    /// Under an IGMPv2 querier the first receiver's leave stops the group for the others
    /// (they last reported before it); a silent channel is joined again within about a
    /// second, so nobody waits for the next general query (30 s here).
    #[test]
    fn a_leave_under_igmp_v2_stalls_nobody_for_long() {
        let mut params = Params::for_tests(40_000_000);
        params.lease = Duration::from_secs(2);
        let mut receivers = vec![RxSpec::new(Duration::ZERO)];
        // Three more join 1.5 s later: the first finishes and leaves while they receive.
        receivers.extend((0..3).map(|_| RxSpec::new(Duration::from_millis(1500))));
        let cfg = WorldConfig {
            seed: 3,
            data_packets: 8000,
            symbol_size: 1280,
            fec_overhead: 0.0,
            params,
            receivers,
            shared_loss: 0.0,
            one_way_delay: Duration::from_millis(2),
            peer_delay: Duration::from_millis(4),
            queue_limit: Duration::from_millis(50),
            leave_latency: Duration::from_millis(500),
            crash_downtime: Duration::ZERO,
            suppression: true,
            igmp_v2_query: Some(Duration::from_secs(30)),
            forged_naks: None,
            delegations: Vec::new(),
            unix_secs: None,
            max_time: Duration::from_secs(60),
        };
        let out = run(&cfg, Instant::now());
        // One loop: 8,200 packets of 1,304 bytes at 40 Mbit/s ≈ 2.1 s.
        let first = out.receivers[0].done_at.expect("first completes");
        for (i, r) in out.receivers.iter().enumerate().skip(1) {
            let done = r
                .done_at
                .unwrap_or_else(|| panic!("rx{i} did not complete: {r:?}"));
            assert!(first < done, "rx{i} finished before the first left");
            assert!(r.stats.silent_rejoins >= 1, "rx{i} never re-joined: {r:?}");
            assert!(
                !r.unicast,
                "rx{i} fell back to unicast: the re-join should do"
            );
            // Without the re-join they would wait for the query at 30 s.
            assert!(done < Duration::from_secs(8), "rx{i} done at {done:?}");
        }
    }
}
