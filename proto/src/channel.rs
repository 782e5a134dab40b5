//! The channel manager (FIG. 4C): the server's protocol logic as a sans-I/O state machine.
//!
//! It takes control datagrams and `now`, and hands back replies ([`ChannelManager::poll_reply`]),
//! data-channel packets that are due ([`ChannelManager::poll_transmit`]), log-worthy events and
//! its next deadline. It never touches a socket, a file or the clock: the driver in
//! [`crate::server`] does, and the tests drive it with a simulated clock.
//!
//! * A join for a looping title gets that channel; otherwise a channel (group + port from the
//!   configured pool) is opened and SYNC packets announce it for `sync_lead` before data starts.
//! * The loop runs while any member holds a lease and has not completed; then it closes.
//! * Unicast fallback uses a stateless cookie (keyed BLAKE3 over address, receiver, archive and
//!   a time epoch): the stream starts only once the requester proved it receives at that address.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::archive::{Head, PacketId};
use crate::carousel::{Carousel, LoopShape};
use crate::pacer::Pacer;
use crate::wire::control::{
    ArchiveId, CatalogItem, Control, Cookie, Envelope, ErrorCode, HEAD_CHUNK,
};
use crate::wire::data::{archive_tag, DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN, SYNC_LEN};

/// Server protocol parameters (from `[server]` in `mcastd.toml`).
#[derive(Clone, Debug)]
pub struct Params {
    pub lease: Duration,
    pub sync_lead: Duration,
    pub sync_interval: Duration,
    pub rate_bps: u64,
    pub burst: Duration,
    /// Multicast group + port of each channel slot.
    pub groups: Vec<SocketAddrV4>,
    pub max_unicast_per_channel: usize,
    pub cookie_epoch: Duration,
    /// Secret for unicast cookies (random per server start).
    pub cookie_secret: [u8; 32],
    /// GRTT advertised before any member reported an RTT, and its bounds.
    pub grtt_initial: Duration,
    pub grtt_min: Duration,
    pub grtt_max: Duration,
    /// Largest share of a channel's packets that may be repairs (the rest is the loop).
    pub repair_share: f64,
    /// NAKs accepted per second from one source address (burst: one second's worth).
    pub nak_rate: f64,
    /// Units one NAK may ask for; more are ignored (and counted).
    pub max_nak_units: u64,
    /// Throughput tiers: nominal channel rates (bit/s, ascending). Empty: one tier at
    /// `rate_bps`. A title can loop on one channel per tier; tier i's rate moves within
    /// `(tiers[i-1], tiers[i]]` following its members' reports.
    pub tiers_bps: Vec<u64>,
    /// How a tier's rate follows its members' reported throughput.
    pub rate_policy: RatePolicy,
    /// Tier a new receiver starts on (conservative: 0, the slowest).
    pub start_tier: usize,
}

/// Rate policy of a tier's channel (DESIGN.md §2: "their average, or the lowest").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RatePolicy {
    /// Follow the slowest member: nobody on the tier is overrun.
    Lowest,
    /// Follow the average: the tier favours its typical member.
    Average,
}

impl Params {
    /// Defaults for tests and the simulation: 16 loopback channel slots.
    pub fn for_tests(rate_bps: u64) -> Params {
        Params {
            lease: Duration::from_secs(5),
            sync_lead: Duration::from_millis(100),
            sync_interval: Duration::from_millis(100),
            rate_bps,
            burst: Duration::from_millis(4),
            groups: (0..16)
                .map(|i| {
                    SocketAddrV4::new(
                        std::net::Ipv4Addr::new(239, 255, 77, 1 + i),
                        7700 + i as u16,
                    )
                })
                .collect(),
            max_unicast_per_channel: 64,
            cookie_epoch: Duration::from_secs(10),
            cookie_secret: [7; 32],
            grtt_initial: Duration::from_millis(20),
            grtt_min: Duration::from_millis(1),
            grtt_max: Duration::from_secs(2),
            repair_share: 0.5,
            nak_rate: 5000.0,
            max_nak_units: 8192,
            tiers_bps: Vec::new(),
            rate_policy: RatePolicy::Lowest,
            start_tier: 0,
        }
    }

    /// Nominal rates of the tiers (at least one).
    pub fn tiers(&self) -> Vec<u64> {
        if self.tiers_bps.is_empty() {
            vec![self.rate_bps]
        } else {
            self.tiers_bps.clone()
        }
    }
}

/// A title this server can loop.
#[derive(Clone, Debug)]
pub struct TitleInfo {
    /// The verified head; the server may drop its block-hash list (it never checks packets).
    pub head: Arc<Head>,
    pub head_bytes: HeadBytes,
    pub archive_len: u64,
}

/// The signed head's bytes, which receivers fetch in chunks. A server reads them from the
/// archive file when asked, so its memory does not grow with the size of what it serves
/// (a 4 GiB title's head is ~5 MB at 1280-byte symbols).
#[derive(Clone, Debug)]
pub enum HeadBytes {
    Memory(Arc<Vec<u8>>),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u32,
    },
}

impl HeadBytes {
    pub fn len(&self) -> usize {
        match self {
            HeadBytes::Memory(b) => b.len(),
            HeadBytes::File { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `off..off + n` (clipped to the head), or `None` if the file cannot be read.
    pub fn read(&self, off: usize, n: usize) -> Option<Vec<u8>> {
        let end = (off + n).min(self.len());
        let off = off.min(end);
        match self {
            HeadBytes::Memory(b) => Some(b[off..end].to_vec()),
            HeadBytes::File { file, offset, .. } => {
                let mut v = vec![0u8; end - off];
                std::os::unix::fs::FileExt::read_exact_at(&**file, &mut v, offset + off as u64)
                    .ok()?;
                Some(v)
            }
        }
    }
}

/// A data-channel packet that is due now. The driver fills in the payload (from the archive
/// for `Packet`) and sends header + payload to every destination.
#[derive(Clone, Debug)]
pub struct Transmit {
    pub channel: u32,
    pub archive_id: ArchiveId,
    pub header: [u8; DATA_HEADER_LEN],
    pub payload: TransmitPayload,
    pub dests: Arc<[SocketAddr]>,
}

#[derive(Clone, Debug)]
pub enum TransmitPayload {
    Sync([u8; SYNC_LEN]),
    Packet(PacketId),
}

/// Things an operator wants in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    ChannelOpened {
        channel: u32,
        title: String,
        group: SocketAddrV4,
    },
    ChannelClosed {
        channel: u32,
        title: String,
        loops: u32,
        packets: u64,
    },
    Joined {
        channel: u32,
        receiver: u64,
        from: SocketAddr,
    },
    Completed {
        channel: u32,
        receiver: u64,
    },
    LeaseExpired {
        channel: u32,
        receiver: u64,
    },
    UnicastStarted {
        channel: u32,
        receiver: u64,
        to: SocketAddr,
    },
    NotHere {
        title: String,
        from: SocketAddr,
    },
}

/// Counters, reported by `StatsRequest` and in logs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub control_received: u64,
    pub control_malformed: u64,
    pub joins: u64,
    pub not_here: u64,
    pub channels_opened: u64,
    pub channels_closed: u64,
    pub completions: u64,
    pub leases_expired: u64,
    pub unknown_session: u64,
    pub cookies_sent: u64,
    pub unicast_started: u64,
    pub bad_cookies: u64,
    pub sync_sent: u64,
    pub packets_sent: u64,
    pub payload_bytes_sent: u64,
    pub head_chunks_sent: u64,
    /// NAK datagrams accepted, and the units they asked for.
    pub naks_received: u64,
    pub nak_units_received: u64,
    /// NAKs dropped: malformed, unknown channel, or over the per-address rate.
    pub naks_malformed: u64,
    pub naks_unknown_channel: u64,
    pub naks_rate_limited: u64,
    /// Units out of range or beyond `max_nak_units` in one NAK.
    pub nak_units_ignored: u64,
    /// Units whose repair was already queued, or sent within the last GRTT.
    pub nak_units_coalesced: u64,
    pub repairs_sent: u64,
    /// Joins refused while draining.
    pub refused_draining: u64,
    /// Archives left out at start-up: unreadable, truncated, or not signed by this server.
    pub archives_skipped: u64,
    /// Titles withdrawn while serving because their archive could no longer be read.
    pub archives_withdrawn: u64,
    /// Play requests answered with a grant, and refused (replayed, used up, forged, ...).
    pub plays_granted: u64,
    pub plays_refused: u64,
    /// Scheduled loops opened at a window's start / closed at its end (`crate::schedule`).
    pub scheduled_opened: u64,
    pub scheduled_closed: u64,
    /// Members dropped when a scheduled loop closed at its window's end.
    pub scheduled_members_dropped: u64,
    /// Joins turned away because the title loops only in its scheduled window.
    pub refused_outside_window: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChannelStats {
    pub channel: u32,
    pub tier: usize,
    /// Mean of the members' reported throughput (bit/s) and loss (ppm).
    pub reported_bps: u64,
    pub reported_loss_ppm: u32,
    pub payload_bytes_sent: u64,
    pub title: String,
    pub group: String,
    pub members: usize,
    pub unicast: usize,
    pub loops: u32,
    pub packets_sent: u64,
    pub rate_bps: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub counters: Counters,
    pub channels: Vec<ChannelStats>,
}

struct Member {
    lease_until: Instant,
    unicast: Option<SocketAddr>,
    /// Last control RTT the receiver reported (0 = none yet).
    rtt_us: u32,
    /// Last throughput (bit/s) and loss (ppm) the receiver reported (0 = none yet).
    rx_bps: u64,
    loss_ppm: u32,
}

/// NAK-rate bucket of one source address.
struct NakBucket {
    tokens: f64,
    at: Instant,
}

struct Channel {
    /// Throughput tier (index into the tier list) this channel loops at.
    tier: usize,
    /// A member left for another tier: keep looping (empty) until then, so a failed probe
    /// falls back to a running channel at its loop position instead of a fresh one.
    linger_until: Option<Instant>,
    title: String,
    archive_id: ArchiveId,
    tag: [u8; 8],
    slot: usize,
    group: SocketAddrV4,
    carousel: Carousel,
    pacer: Pacer,
    data_start: Instant,
    next_sync: Instant,
    members: HashMap<u64, Member>,
    dests: Arc<[SocketAddr]>,
    symbol_size: usize,
    packets_sent: u64,
    /// Loop positions to repair (ordered, so a block's hash packet precedes its data).
    repair_pending: BTreeSet<u64>,
    /// When the current NAK aggregation window ends.
    repair_due: Option<Instant>,
    /// Repair credit: grows with loop packets, spent by repairs.
    repair_tokens: f64,
    /// Unit → when it was last repaired (NAKs for it within a GRTT are stale).
    repaired_at: HashMap<u64, Instant>,
    /// Opened by a schedule: loops with no members until its window closes.
    scheduled: bool,
    /// Rate ceiling from the schedule (bit/s), kept through tier rate adaption.
    rate_cap: Option<u64>,
}

impl Channel {
    fn grtt(&self, p: &Params) -> Duration {
        let max = self.members.values().map(|m| m.rtt_us).max().unwrap_or(0);
        if max == 0 {
            p.grtt_initial
        } else {
            Duration::from_micros(max as u64).clamp(p.grtt_min, p.grtt_max)
        }
    }

    fn repair_ready(&self, now: Instant) -> bool {
        self.repair_tokens >= 1.0
            && self.repair_due.is_some_and(|t| t <= now)
            && !self.repair_pending.is_empty()
    }

    fn rebuild_dests(&mut self) {
        let mut d: Vec<SocketAddr> = vec![SocketAddr::V4(self.group)];
        d.extend(self.members.values().filter_map(|m| m.unicast));
        self.dests = d.into();
    }

    /// When this channel next has something to send: SYNCs until `data_start`, then loop
    /// packets (with a SYNC in place of one every `sync_interval`), never before the pacer allows.
    fn due(&self) -> Instant {
        let wanted = if self.carousel.shape().loop_packets() == 0 {
            self.next_sync
        } else {
            self.next_sync.min(self.data_start)
        };
        wanted.max(self.pacer.next_send())
    }

    /// Mean reported (throughput, loss) over members that reported.
    fn mean_report(&self) -> (u64, u32) {
        let r: Vec<&Member> = self.members.values().filter(|m| m.rx_bps > 0).collect();
        if r.is_empty() {
            return (0, 0);
        }
        let n = r.len() as u64;
        (
            r.iter().map(|m| m.rx_bps).sum::<u64>() / n,
            (r.iter().map(|m| m.loss_ppm as u64).sum::<u64>() / n) as u32,
        )
    }

    fn unicast_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.unicast.is_some())
            .count()
    }
}

pub struct ChannelManager {
    params: Params,
    titles: BTreeMap<String, TitleInfo>,
    by_id: HashMap<ArchiveId, String>,
    channels: BTreeMap<u32, Channel>,
    slots: Vec<Option<u32>>,
    next_channel: u32,
    epoch_origin: Instant,
    replies: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<Event>,
    counters: Counters,
    nak_buckets: HashMap<IpAddr, NakBucket>,
    /// Leases are checked at most this often (a scan of every member), so expiry is
    /// noticed up to `LEASE_CHECK` late.
    next_lease_check: Instant,
    next_rate_update: Instant,
    /// Draining: members keep their channels, new receivers are refused.
    draining: bool,
    /// Scheduled titles outside their window: joins are refused (`ErrorCode::Busy`).
    window_closed: HashSet<String>,
    /// Where a scheduled loop stopped (block), so the next window carries on from there and
    /// receivers that held the first part get the rest first.
    resume_block: HashMap<ArchiveId, u64>,
}

/// `rate` (0 = unlimited) under an optional cap.
fn capped(rate: u64, cap: Option<u64>) -> u64 {
    match cap {
        Some(c) if rate == 0 => c,
        Some(c) => rate.min(c),
        None => rate,
    }
}

/// Packets due within this much of `now` go out now: the driver then wakes once per quantum
/// and sends a burst (one GSO batch) instead of waking for every packet, which at Gbit/s
/// rates would cost more CPU in timer wake-ups than in sending. Bursts stay small (500 µs at
/// 2.5 Gbit/s is 156 KB) and the average rate is unchanged.
pub const SEND_AHEAD: Duration = Duration::from_micros(500);
/// Most repairs queued per channel (positions, ~40 bytes each): bounds server memory under a
/// NAK storm whatever the archive size; units beyond it come round with the loop.
pub const MAX_REPAIR_QUEUE: usize = 65_536;
const LEASE_CHECK: Duration = Duration::from_millis(50);
/// Tier rates follow member reports this often.
const RATE_UPDATE: Duration = Duration::from_secs(1);
/// A tier runs this much above what its members report, so they can show they keep up with
/// more (the rate then creeps up to the tier's ceiling) or fall behind (it comes down).
const RATE_HEADROOM: f64 = 1.05;
/// How long a tier's channel keeps looping after its last member moved to another tier.
const TIER_LINGER: Duration = Duration::from_secs(3);
/// Reported loss at which a member counts as limited by its tier's rate (1%).
const CONGESTED_PPM: u32 = 10_000;

impl ChannelManager {
    pub fn new(params: Params, titles: Vec<TitleInfo>, now: Instant) -> ChannelManager {
        let mut m = ChannelManager {
            slots: vec![None; params.groups.len()],
            params,
            titles: BTreeMap::new(),
            by_id: HashMap::new(),
            channels: BTreeMap::new(),
            next_channel: 1,
            epoch_origin: now,
            replies: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            nak_buckets: HashMap::new(),
            next_lease_check: now,
            next_rate_update: now + RATE_UPDATE,
            draining: false,
            window_closed: HashSet::new(),
            resume_block: HashMap::new(),
        };
        for t in titles {
            m.add_title(t);
        }
        m
    }

    /// Add or replace a title (a re-packed title takes effect for channels opened later).
    pub fn add_title(&mut self, t: TitleInfo) {
        self.by_id.insert(t.head.archive_id, t.head.title.clone());
        self.titles.insert(t.head.title.clone(), t);
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The driver left `n` archives out at start-up (see [`Counters::archives_skipped`]).
    pub fn count_archives_skipped(&mut self, n: u64) {
        self.counters.archives_skipped += n;
    }

    /// Stop serving `archive_id` (its file became unreadable): its channels close at once and
    /// later joins get NotHere, so receivers stop waiting for packets that cannot come.
    /// False if it was not served (already withdrawn).
    pub fn withdraw_title(&mut self, archive_id: &ArchiveId) -> bool {
        let Some(title) = self.by_id.remove(archive_id) else {
            return false;
        };
        if self
            .titles
            .get(&title)
            .is_some_and(|t| &t.head.archive_id == archive_id)
        {
            self.titles.remove(&title);
        }
        let ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| &c.archive_id == archive_id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let c = self.channels.remove(&id).expect("listed");
            self.slots[c.slot] = None;
            self.counters.channels_closed += 1;
            self.events.push_back(Event::ChannelClosed {
                channel: id,
                title: c.title,
                loops: c.carousel.loops(),
                packets: c.packets_sent,
            });
        }
        self.counters.archives_withdrawn += 1;
        true
    }

    /// The ticket service (outside this state machine) answered a play request.
    pub fn count_play(&mut self, granted: bool) {
        if granted {
            self.counters.plays_granted += 1;
        } else {
            self.counters.plays_refused += 1;
        }
    }

    /// Titles this server can loop (for heartbeats and health checks).
    pub fn title_names(&self) -> impl Iterator<Item = &str> {
        self.titles.keys().map(|t| t.as_str())
    }

    /// Draining: receivers already on a channel finish (and may rejoin or change tier), new
    /// ones get [`ErrorCode::Draining`] so they ask a director for another server.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    pub fn stats(&self) -> Stats {
        Stats {
            counters: self.counters.clone(),
            channels: self
                .channels
                .iter()
                .map(|(id, c)| ChannelStats {
                    channel: *id,
                    tier: c.tier,
                    reported_bps: c.mean_report().0,
                    reported_loss_ppm: c.mean_report().1,
                    payload_bytes_sent: c.packets_sent * c.symbol_size as u64,
                    title: c.title.clone(),
                    group: c.group.to_string(),
                    members: c.members.len(),
                    unicast: c.unicast_count(),
                    loops: c.carousel.loops(),
                    packets_sent: c.packets_sent,
                    rate_bps: c.pacer.rate_bps(),
                })
                .collect(),
        }
    }

    pub fn open_channels(&self) -> usize {
        self.channels.len()
    }

    pub fn poll_reply(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.replies.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn reply(&mut self, to: SocketAddr, env: &Envelope, msg: Control) {
        self.replies
            .push_back((to, Envelope::new(env.receiver_id, env.req_id, msg).encode()));
    }

    fn error(&mut self, to: SocketAddr, env: &Envelope, code: ErrorCode, message: &str) {
        self.reply(
            to,
            env,
            Control::Error {
                code,
                message: message.to_string(),
            },
        );
    }

    /// The receiver's session is gone (restart, lease expiry) or never existed.
    fn unknown_session(&mut self, to: SocketAddr, env: &Envelope, message: &str) {
        self.counters.unknown_session += 1;
        self.error(to, env, ErrorCode::UnknownSession, message);
    }

    /// The channel of `archive_id` that receiver `rid` is a member of.
    fn member_channel(&self, archive_id: &ArchiveId, rid: u64) -> Option<u32> {
        self.channels
            .iter()
            .find(|(_, c)| &c.archive_id == archive_id && c.members.contains_key(&rid))
            .map(|(id, _)| *id)
    }

    /// The channel looping `archive_id` at `tier`, if open.
    fn tier_channel(&self, archive_id: &ArchiveId, tier: usize) -> Option<u32> {
        self.channels
            .iter()
            .find(|(_, c)| &c.archive_id == archive_id && c.tier == tier)
            .map(|(id, _)| *id)
    }

    /// One datagram arrived on the control port.
    pub fn handle_control(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if crate::wire::nak::is_nak(datagram) {
            self.handle_nak(now, from, datagram);
            return;
        }
        self.counters.control_received += 1;
        let env = match Envelope::decode(datagram) {
            Ok(e) => e,
            Err(e) => {
                self.counters.control_malformed += 1;
                tracing::debug!(%from, error = %e, "malformed control datagram dropped");
                return;
            }
        };
        let rid = env.receiver_id;
        match env.msg.clone() {
            Control::CatalogRequest { start } => {
                let items: Vec<CatalogItem> = self
                    .titles
                    .values()
                    .skip(start as usize)
                    .take(40)
                    .map(|t| CatalogItem {
                        title: t.head.title.clone(),
                        plain_len: t.head.plain_len,
                        archive_len: t.archive_len,
                        advert: t.head.advert,
                    })
                    .collect();
                let more = start as usize + items.len() < self.titles.len();
                self.reply(from, &env, Control::CatalogReply { items, more });
            }
            Control::Join { title } => self.join(now, from, &env, &title, None, None),
            Control::JoinAt { title, block } => {
                self.join(now, from, &env, &title, None, Some(block))
            }
            Control::ChangeTier { archive_id, tier } => {
                match self.by_id.get(&archive_id).cloned() {
                    Some(title) => self.join(now, from, &env, &title, Some(tier as usize), None),
                    None => self.unknown_session(from, &env, "unknown archive: join again"),
                }
            }
            Control::HeadRequest { archive_id, offset } => {
                let Some(t) = self.by_id.get(&archive_id).and_then(|n| self.titles.get(n)) else {
                    self.error(from, &env, ErrorCode::UnknownSession, "unknown archive");
                    return;
                };
                let off = offset as usize;
                let total = t.head_bytes.len();
                if off > total {
                    self.error(
                        from,
                        &env,
                        ErrorCode::BadRequest,
                        "head offset out of range",
                    );
                    return;
                }
                let Some(bytes) = t.head_bytes.read(off, HEAD_CHUNK) else {
                    tracing::warn!(title = %t.head.title, "cannot read the archive's head");
                    self.error(
                        from,
                        &env,
                        ErrorCode::BadRequest,
                        "head unreadable on server",
                    );
                    return;
                };
                self.counters.head_chunks_sent += 1;
                self.reply(
                    from,
                    &env,
                    Control::HeadChunk {
                        archive_id,
                        offset,
                        total: total as u32,
                        bytes,
                    },
                );
            }
            Control::Keepalive {
                archive_id,
                rtt_us,
                rx_bps,
                loss_ppm,
                ..
            } => {
                let lease = self.params.lease;
                let member = self
                    .member_channel(&archive_id, rid)
                    .and_then(|id| self.channels.get_mut(&id))
                    .and_then(|c| c.members.get_mut(&rid));
                match member {
                    Some(m) => {
                        m.lease_until = now + lease;
                        if rtt_us > 0 {
                            m.rtt_us = rtt_us;
                        }
                        if rx_bps > 0 {
                            m.rx_bps = rx_bps;
                            m.loss_ppm = loss_ppm;
                        }
                        self.reply(
                            from,
                            &env,
                            Control::LeaseOk {
                                archive_id,
                                lease_ms: lease.as_millis() as u32,
                            },
                        );
                    }
                    None => {
                        self.unknown_session(from, &env, "no such session: join again");
                    }
                }
            }
            Control::Complete { archive_id } => {
                if let Some(id) = self.member_channel(&archive_id, rid) {
                    let c = self.channels.get_mut(&id).expect("channel exists");
                    if let Some(m) = c.members.remove(&rid) {
                        if m.unicast.is_some() {
                            c.rebuild_dests();
                        }
                        self.counters.completions += 1;
                        self.events.push_back(Event::Completed {
                            channel: id,
                            receiver: rid,
                        });
                    }
                }
                // Idempotent: a retried Complete is acknowledged again.
                self.reply(from, &env, Control::CompleteOk { archive_id });
                self.close_idle(now);
            }
            Control::UnicastRequest { archive_id } => {
                let known = self.member_channel(&archive_id, rid).is_some();
                if !known {
                    self.unknown_session(from, &env, "join before asking for unicast");
                    return;
                }
                let cookie = self.cookie(from, rid, &archive_id, self.epoch(now));
                self.counters.cookies_sent += 1;
                self.reply(from, &env, Control::Cookie { archive_id, cookie });
            }
            Control::UnicastConfirm { archive_id, cookie } => {
                let e = self.epoch(now);
                let valid = cookie == self.cookie(from, rid, &archive_id, e)
                    || (e > 0 && cookie == self.cookie(from, rid, &archive_id, e - 1));
                if !valid {
                    self.counters.bad_cookies += 1;
                    self.error(
                        from,
                        &env,
                        ErrorCode::BadCookie,
                        "cookie does not verify for this address",
                    );
                    return;
                }
                let max = self.params.max_unicast_per_channel;
                let Some(id) = self.member_channel(&archive_id, rid) else {
                    self.unknown_session(from, &env, "no such session: join again");
                    return;
                };
                let c = self.channels.get_mut(&id).expect("channel exists");
                let full = c.unicast_count() >= max;
                let Some(m) = c.members.get_mut(&rid) else {
                    self.unknown_session(from, &env, "no such session: join again");
                    return;
                };
                if m.unicast != Some(from) {
                    if full {
                        self.error(
                            from,
                            &env,
                            ErrorCode::Busy,
                            "unicast stream limit reached on this channel",
                        );
                        return;
                    }
                    m.unicast = Some(from);
                    m.lease_until = now + self.params.lease;
                    c.rebuild_dests();
                    self.counters.unicast_started += 1;
                    self.events.push_back(Event::UnicastStarted {
                        channel: id,
                        receiver: rid,
                        to: from,
                    });
                }
                self.reply(from, &env, Control::UnicastOk { archive_id });
            }
            Control::StatsRequest => {
                let json = serde_json::to_string(&self.stats()).unwrap_or_default();
                self.reply(from, &env, Control::StatsReply { json });
            }
            // Server-to-receiver messages arriving here are noise.
            _ => self.counters.control_malformed += 1,
        }
    }

    /// Join `title` (`tier: None`: the receiver's current tier, or the start tier) or move to
    /// `tier`. A receiver is a member of one channel of a title at a time.
    fn join(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        title: &str,
        tier: Option<usize>,
        start_block: Option<u64>,
    ) {
        let Some(info) = self.titles.get(title).cloned() else {
            self.counters.not_here += 1;
            self.events.push_back(Event::NotHere {
                title: title.to_string(),
                from,
            });
            self.reply(
                from,
                env,
                Control::NotHere {
                    title: title.to_string(),
                    redirect: None,
                },
            );
            return;
        };
        let archive_id = info.head.archive_id;
        let tiers = self.params.tiers();
        let rid = env.receiver_id;
        let current = self.member_channel(&archive_id, rid);
        if current.is_none() && self.window_closed.contains(title) {
            self.counters.refused_outside_window += 1;
            self.error(
                from,
                env,
                ErrorCode::Busy,
                "title loops only in its scheduled window; retry in the next one",
            );
            return;
        }
        if self.draining && current.is_none() {
            self.counters.refused_draining += 1;
            self.error(
                from,
                env,
                ErrorCode::Draining,
                "server is draining: ask a traffic director for another server",
            );
            return;
        }
        let tier = match (tier, current) {
            (Some(t), _) if t >= tiers.len() => {
                self.error(from, env, ErrorCode::BadRequest, "no such tier");
                return;
            }
            (Some(t), _) => t,
            (None, Some(id)) => self.channels[&id].tier,
            (None, None) => self.params.start_tier.min(tiers.len() - 1),
        };
        let id = match self.tier_channel(&archive_id, tier) {
            Some(id) => id,
            None => match self.open_channel(now, &info, tier, start_block.unwrap_or(0)) {
                Some(id) => id,
                None => {
                    self.error(
                        from,
                        env,
                        ErrorCode::Busy,
                        "all channel slots are in use; retry later",
                    );
                    return;
                }
            },
        };
        let lease = self.params.lease;
        let c = self.channels.get_mut(&id).expect("channel exists");
        let fresh = c
            .members
            .insert(
                env.receiver_id,
                Member {
                    lease_until: now + lease,
                    unicast: None,
                    rtt_us: 0,
                    rx_bps: 0,
                    loss_ppm: 0,
                },
            )
            .is_none_or(|old| {
                // A re-join drops a unicast stream: the receiver will ask again if it needs it.
                old.unicast.is_some()
            });
        if fresh {
            c.rebuild_dests();
        }
        let (group, rate) = (c.group, c.pacer.rate_bps());
        // Moving tiers: leave the old channel (closed if that was its last member) only once
        // in the new one, so the two never share a group.
        if let Some(old) = current.filter(|old| *old != id) {
            let c = self
                .channels
                .get_mut(&old)
                .expect("member's channel exists");
            c.members.remove(&rid);
            c.rebuild_dests();
            // Only an emptied channel lingers; one that still has members just carries on
            // (a stale linger on it would be "due" forever and spin the driver).
            if c.members.is_empty() {
                c.linger_until = Some(now + TIER_LINGER);
            }
        }
        // A lingering channel that gets a member back stops lingering.
        if let Some(c) = self.channels.get_mut(&id) {
            c.linger_until = None;
        }
        self.counters.joins += 1;
        self.events.push_back(Event::Joined {
            channel: id,
            receiver: env.receiver_id,
            from,
        });
        self.reply(
            from,
            env,
            Control::JoinOk {
                archive_id,
                group,
                head_len: info.head_bytes.len() as u32,
                loop_packets: info.head.loop_packets(),
                rate_bps: rate,
                lease_ms: lease.as_millis() as u32,
                tier: tier as u8,
                tiers_bps: tiers,
            },
        );
    }

    fn open_channel(
        &mut self,
        now: Instant,
        info: &TitleInfo,
        tier: usize,
        start_block: u64,
    ) -> Option<u32> {
        let slot = self.slots.iter().position(|s| s.is_none())?;
        let id = self.next_channel;
        self.next_channel = self.next_channel.wrapping_add(1).max(1);
        self.slots[slot] = Some(id);
        let group = self.params.groups[slot];
        let rate = self.params.tiers()[tier];
        let mut c = Channel {
            tier,
            linger_until: None,
            title: info.head.title.clone(),
            archive_id: info.head.archive_id,
            tag: archive_tag(&info.head.archive_id),
            slot,
            group,
            carousel: Carousel::starting_at(LoopShape::of(&info.head), start_block),
            pacer: Pacer::new(rate, self.params.burst, now),
            data_start: now + self.params.sync_lead,
            next_sync: now,
            members: HashMap::new(),
            dests: Arc::from(Vec::new()),
            symbol_size: info.head.symbol_size as usize,
            packets_sent: 0,
            repair_pending: BTreeSet::new(),
            repair_due: None,
            repair_tokens: 0.0,
            repaired_at: HashMap::new(),
            scheduled: false,
            rate_cap: None,
        };
        c.rebuild_dests();
        self.channels.insert(id, c);
        self.counters.channels_opened += 1;
        self.events.push_back(Event::ChannelOpened {
            channel: id,
            title: info.head.title.clone(),
            group,
        });
        Some(id)
    }

    fn close_idle(&mut self, now: Instant) {
        let idle: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                !c.scheduled && c.members.is_empty() && c.linger_until.is_none_or(|t| t <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            let c = self.channels.remove(&id).expect("listed");
            self.slots[c.slot] = None;
            self.counters.channels_closed += 1;
            self.events.push_back(Event::ChannelClosed {
                channel: id,
                title: c.title,
                loops: c.carousel.loops(),
                packets: c.packets_sent,
            });
        }
    }

    /// Set each tier's rate from its members' reports (policy lowest/average), within the
    /// tier's bounds: above the next tier down, at most its nominal rate.
    fn adapt_rates(&mut self) {
        let tiers = self.params.tiers();
        for c in self.channels.values_mut() {
            let hi = tiers[c.tier];
            // A member that is not losing packets is not limited by this rate: it asks for
            // the ceiling. Only congested members (loss above CONGESTED_PPM) pull a tier down.
            let reports: Vec<u64> = c
                .members
                .values()
                .filter(|m| m.rx_bps > 0)
                .map(|m| {
                    if m.loss_ppm >= CONGESTED_PPM {
                        m.rx_bps
                    } else {
                        hi
                    }
                })
                .collect();
            if reports.is_empty() {
                continue;
            }
            let target = match self.params.rate_policy {
                RatePolicy::Lowest => *reports.iter().min().expect("non-empty"),
                RatePolicy::Average => reports.iter().sum::<u64>() / reports.len() as u64,
            };
            let lo = if c.tier == 0 {
                hi / 4
            } else {
                tiers[c.tier - 1] + 1
            };
            let rate = ((target as f64 * RATE_HEADROOM) as u64).clamp(lo.min(hi), hi);
            c.pacer.set_rate(capped(rate, c.rate_cap));
        }
    }

    /// A schedule's window opened: loop `title` now (start tier), with no receivers needed,
    /// at most at `rate_cap` bit/s; an already running loop of it is kept and re-capped.
    /// `None` when the title is unknown or no channel slot is free.
    pub fn open_scheduled(
        &mut self,
        now: Instant,
        title: &str,
        rate_cap: Option<u64>,
    ) -> Option<u32> {
        let info = self.titles.get(title).cloned()?;
        self.window_closed.remove(title);
        let tier = self.params.start_tier.min(self.params.tiers().len() - 1);
        let id = match self.tier_channel(&info.head.archive_id, tier) {
            Some(id) => id,
            None => {
                let start = self
                    .resume_block
                    .get(&info.head.archive_id)
                    .copied()
                    .unwrap_or(0);
                self.open_channel(now, &info, tier, start)?
            }
        };
        let c = self.channels.get_mut(&id).expect("just found or opened");
        c.scheduled = true;
        c.rate_cap = rate_cap;
        let rate = capped(c.pacer.rate_bps(), rate_cap);
        c.pacer.set_rate(rate);
        self.counters.scheduled_opened += 1;
        Some(id)
    }

    /// A schedule's window closed: stop every loop of `title` now, whatever members remain
    /// (they hear nothing more; their state files keep what they have). `refuse`: turn joins
    /// away until the next window. Returns the members dropped.
    pub fn close_scheduled(&mut self, title: &str, refuse: bool) -> usize {
        if refuse {
            self.window_closed.insert(title.to_string());
        }
        let ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| c.title == title)
            .map(|(id, _)| *id)
            .collect();
        let mut dropped = 0;
        for id in ids {
            let c = self.channels.remove(&id).expect("listed");
            self.slots[c.slot] = None;
            dropped += c.members.len();
            if c.scheduled {
                self.resume_block.insert(c.archive_id, c.carousel.block());
            }
            self.counters.channels_closed += 1;
            self.counters.scheduled_closed += 1;
            self.events.push_back(Event::ChannelClosed {
                channel: id,
                title: c.title,
                loops: c.carousel.loops(),
                packets: c.packets_sent,
            });
        }
        self.counters.scheduled_members_dropped += dropped as u64;
        dropped
    }

    /// Mark `title` as refusing joins (outside its scheduled window) or not.
    pub fn set_window_closed(&mut self, title: &str, closed: bool) {
        if closed {
            self.window_closed.insert(title.to_string());
        } else {
            self.window_closed.remove(title);
        }
    }

    /// Expire leases and close channels nobody holds any more.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_lease_check {
            return;
        }
        self.next_lease_check = now + LEASE_CHECK;
        if now >= self.next_rate_update && !self.params.tiers_bps.is_empty() {
            self.next_rate_update = now + RATE_UPDATE;
            self.adapt_rates();
        }
        for (id, c) in self.channels.iter_mut() {
            let before = c.members.len();
            let mut expired = Vec::new();
            c.members.retain(|rid, m| {
                let keep = m.lease_until > now;
                if !keep {
                    expired.push(*rid);
                }
                keep
            });
            if c.members.len() != before {
                c.rebuild_dests();
            }
            for rid in expired {
                self.counters.leases_expired += 1;
                self.events.push_back(Event::LeaseExpired {
                    channel: *id,
                    receiver: rid,
                });
            }
        }
        self.close_idle(now);
    }

    /// The earliest moment something is due: a packet, a SYNC, or a lease expiry. A lingering
    /// channel's end is not a wake-up of its own: the lease check (every `LEASE_CHECK`) closes it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let due = self.channels.values().map(|c| c.due()).min()?;
        Some(due.min(self.next_lease_check))
    }

    /// The next data-channel packet due by `now` (+ [`SEND_AHEAD`]), if any. Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let params = &self.params;
        let horizon = now + SEND_AHEAD;
        let (&id, c) = self
            .channels
            .iter_mut()
            .filter(|(_, c)| c.due() <= horizon)
            .min_by_key(|(_, c)| c.due())?;
        let mut header = [0u8; DATA_HEADER_LEN];
        if c.next_sync <= now {
            c.next_sync = now + params.sync_interval;
            let info = SyncInfo {
                loop_packets: c.carousel.shape().loop_packets(),
                rate_bps: c.pacer.rate_bps(),
                grtt_us: c.grtt(params).as_micros().min(u32::MAX as u128) as u32,
                group_size: c.members.len().max(1) as u32,
                send_us: now.saturating_duration_since(self.epoch_origin).as_micros() as u64,
            };
            DataHeader {
                kind: DataKind::Sync,
                repair: false,
                archive_tag: c.tag,
                loop_no: c.carousel.loops(),
            }
            .encode_into(&mut header);
            c.pacer.on_send(now, DATA_HEADER_LEN + SYNC_LEN);
            self.counters.sync_sent += 1;
            return Some(Transmit {
                channel: id,
                archive_id: c.archive_id,
                header,
                payload: TransmitPayload::Sync(info.encode()),
                dests: c.dests.clone(),
            });
        }
        let loop_no = c.carousel.loops();
        let shape = *c.carousel.shape();
        let (pkt, repair) = if c.repair_ready(now) {
            let pos = c.repair_pending.pop_first().expect("repair_ready checked");
            if c.repair_pending.is_empty() {
                c.repair_due = None;
            }
            c.repair_tokens -= 1.0;
            let pkt = shape.packet_at(pos);
            c.repaired_at
                .insert(shape.unit_index(pkt).expect("in range"), now);
            self.counters.repairs_sent += 1;
            (pkt, true)
        } else {
            let pkt = c.carousel.next_packet().expect("non-empty loop");
            // Sent in the loop now: a queued repair of it is moot.
            c.repair_pending
                .remove(&shape.loop_pos(pkt));
            let share = params.repair_share.clamp(0.0, 0.95);
            c.repair_tokens = (c.repair_tokens + share / (1.0 - share)).min(64.0);
            (pkt, false)
        };
        DataHeader {
            kind: DataKind::Packet(pkt),
            repair,
            archive_tag: c.tag,
            loop_no,
        }
        .encode_into(&mut header);
        c.pacer.on_send(now, DATA_HEADER_LEN + c.symbol_size);
        c.packets_sent += 1;
        self.counters.packets_sent += 1;
        self.counters.payload_bytes_sent += c.symbol_size as u64;
        Some(Transmit {
            channel: id,
            archive_id: c.archive_id,
            header,
            payload: TransmitPayload::Packet(pkt),
            dests: c.dests.clone(),
        })
    }

    /// A NAK arrived on the control port: queue repairs, within bounds. Floods from one
    /// address are rate-limited, absurd ranges clipped, and units already queued, or repaired
    /// within the last GRTT, coalesced, so no NAK pattern can stall the loop.
    fn handle_nak(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let nak = match crate::wire::nak::Nak::decode(datagram) {
            Ok(n) => n,
            Err(_) => {
                self.counters.naks_malformed += 1;
                return;
            }
        };
        let rate = self.params.nak_rate.max(1.0);
        let b = self.nak_buckets.entry(from.ip()).or_insert(NakBucket {
            tokens: rate,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens < 1.0 {
            self.counters.naks_rate_limited += 1;
            return;
        }
        b.tokens -= 1.0;
        if self.nak_buckets.len() > 4096 {
            self.nak_buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(2));
        }
        let params = &self.params;
        // The NAKer's own tier channel (a title may loop on several), else any of the title's.
        let id = self
            .channels
            .iter()
            .find(|(_, c)| c.tag == nak.archive_tag && c.members.contains_key(&nak.receiver_id))
            .or_else(|| self.channels.iter().find(|(_, c)| c.tag == nak.archive_tag))
            .map(|(id, _)| *id);
        let Some(c) = id.and_then(|id| self.channels.get_mut(&id)) else {
            self.counters.naks_unknown_channel += 1;
            return;
        };
        self.counters.naks_received += 1;
        let shape = *c.carousel.shape();
        let units = shape.loop_packets();
        let grtt = c.grtt(params);
        let mut budget = params.max_nak_units;
        for &(first, len) in &nak.ranges {
            let end = first.saturating_add(len as u64);
            let in_range = first.min(units)..end.min(units);
            self.counters.nak_units_ignored += (end - first) - (in_range.end - in_range.start);
            for u in in_range.clone() {
                if budget == 0 || c.repair_pending.len() >= MAX_REPAIR_QUEUE {
                    // Over this NAK's budget or the channel's queue: the loop brings them.
                    self.counters.nak_units_ignored += in_range.end - u;
                    break;
                }
                budget -= 1;
                self.counters.nak_units_received += 1;
                let recent = c
                    .repaired_at
                    .get(&u)
                    .is_some_and(|t| now.saturating_duration_since(*t) < grtt);
                let pos = shape.loop_pos(shape.unit_packet(u));
                if recent || !c.repair_pending.insert(pos) {
                    self.counters.nak_units_coalesced += 1;
                }
            }
        }
        if !c.repair_pending.is_empty() && c.repair_due.is_none() {
            // Aggregate NAKs for one GRTT before repairing.
            c.repair_due = Some(now + grtt);
        }
        if c.repaired_at.len() > 65_536 {
            c.repaired_at
                .retain(|_, t| now.saturating_duration_since(*t) < grtt);
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let e = self.params.cookie_epoch.as_millis().max(1) as u64;
        now.saturating_duration_since(self.epoch_origin).as_millis() as u64 / e
    }

    fn cookie(&self, from: SocketAddr, rid: u64, archive_id: &ArchiveId, epoch: u64) -> Cookie {
        let mut h = blake3::Hasher::new_keyed(&self.params.cookie_secret);
        h.update(b"mcast unicast cookie v1");
        h.update(from.to_string().as_bytes());
        h.update(&rid.to_le_bytes());
        h.update(archive_id);
        h.update(&epoch.to_le_bytes());
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }
}
