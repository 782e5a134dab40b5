//! The channel manager (FIG. 4C): the server's protocol logic as a sans-I/O state machine.
//!
//! It takes control datagrams and `now`, and hands back replies ([`ChannelManager::poll_reply`]),
//! data-channel packets that are due ([`ChannelManager::poll_transmit`]), head chunks for the
//! driver to read ([`ChannelManager::poll_head_read`]), log-worthy events and its next deadline.
//! It never touches a socket, a file or the clock: the server driver does, and the tests drive it
//! with a simulated clock.
//!
//! * A join for a looping title gets that channel; otherwise a channel (group + port from the
//!   configured pool) is opened and SYNC packets announce it for `sync_lead` before data starts.
//! * The loop runs while any member holds a lease and has not completed; then it closes.
//! * Unicast fallback uses a stateless cookie (keyed BLAKE3 over address, receiver, archive and
//!   a time epoch): the stream starts only once the requester proved it receives at that address.
//!   Each unicast member gets a stream of its own (own pacer, loop position, repairs, SYNCs),
//!   whose rate follows that receiver's capacity reports.
//!
//! This file holds the type, its public API, the control dispatch and the `poll_*` /
//! `handle_timeout` driver interface; each concept's state and logic is a module of its own:
//!
//! * `catalog` — the titles served, catalog replies, head chunks (read by the driver).
//! * `loops` — open channels: the channel record, slot pool, opening, the one close path.
//! * `members` — members, joins and leases.
//! * `unicast` — unicast requests and stateless cookies.
//! * `unicast_stream` — a unicast member's own stream and its rate controller.
//! * `burst` — discovery bursts: a short unicast burst at a faster tier's rate, so a receiver
//!   can judge that tier without joining its group.
//! * `repair` — NAK intake, per-source NAK budget, the repair queue.
//! * `tiers` — tier channels and the rate policy fed by members' reports.
//! * `schedule` — scheduled windows: opening and closing scheduled loops.
//! * `stats` — counters and the stats report.

mod burst;
mod catalog;
mod emit;
mod loops;
mod members;
mod repair;
mod schedule;
mod stats;
mod tiers;
mod unicast;
mod unicast_stream;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::address_token::{AddressToken, AddressTokens};
use crate::archive::PacketId;
use crate::wire::control::{ArchiveId, Control, Envelope, ErrorCode};
use crate::wire::data::DATA_HEADER_LEN;

pub use burst::{BURST_EVERY, MAX_BURST, MAX_BURSTS};
pub use catalog::{HeadBytes, HeadRead, HotAdd, TitleInfo};
pub use repair::MAX_REPAIR_QUEUE;
pub use stats::{
    ChannelStats, Counters, Sample, Stats, MAX_REPORTED_ELAPSED, MAX_REPORTED_MILLI_LOOPS,
    MAX_SAMPLES,
};
pub use tiers::{band, default_ladder, RatePolicy, LADDER_TIERS, TIER_LINGER};

use loops::Channel;

/// Server protocol parameters (from `[server]` in `mcastd.toml`).
#[derive(Clone, Debug)]
pub struct Params {
    pub lease: Duration,
    pub sync_lead: Duration,
    pub sync_interval: Duration,
    pub rate_bps: u64,
    pub burst: Duration,
    /// Multicast group + port of each channel slot.
    pub groups: Vec<SocketAddr>,
    pub max_unicast_per_channel: usize,
    pub cookie_epoch: Duration,
    /// Secret for unicast cookies and address tokens (random per server start).
    pub cookie_secret: [u8; 32],
    /// The server identity, which signs every SYNC (`None`: unsigned, channel-only tests).
    pub sync_signer: Option<Arc<mcast_keys::Identity>>,
    /// Source-specific multicast: the address channel packets leave from, told to receivers in
    /// `JoinOk` for groups in 232.0.0.0/8 and ff3x::/32 (they join that source only). `None`: any-source.
    pub ssm_source: Option<std::net::IpAddr>,
    /// Tell receivers `ssm_source` for every group, not only source-specific ranges.
    pub ssm_all_groups: bool,
    /// Sessions (members, over every channel) one source address may hold: a spoofer who
    /// proved one address cannot fill the server with members (NAT: raise it).
    pub max_sessions_per_address: usize,
    /// Source addresses answered a `StatsRequest` (operators' hosts; the counters say who
    /// is joined where, so not everyone may read them).
    pub admin: Vec<crate::address_token::IpPrefix>,
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
    /// Extra FEC symbols each tier's loop sends unasked after every FEC block's repair
    /// segment, as a share of the block's data packets, by tier from the slowest (missing:
    /// none). Lossier tiers get more without repacking: the archive's stored repairs serve
    /// every tier, these are made on demand like answers to amount NAKs.
    pub tier_fec_extra: Vec<f64>,
}

impl Params {
    /// Defaults for tests and the simulation: 16 loopback channel slots.
    pub fn for_tests(rate_bps: u64) -> Params {
        Params {
            lease: Duration::from_secs(5),
            sync_lead: Duration::from_millis(100),
            sync_interval: Duration::from_millis(50),
            rate_bps,
            burst: Duration::from_millis(4),
            groups: (0..16)
                .map(|i| {
                    SocketAddr::new(
                        std::net::Ipv4Addr::new(239, 255, 77, 1 + i).into(),
                        7700 + i as u16,
                    )
                })
                .collect(),
            max_unicast_per_channel: 64,
            cookie_epoch: Duration::from_secs(10),
            cookie_secret: [7; 32],
            admin: crate::address_token::IpPrefix::loopback(),
            max_sessions_per_address: 256,
            sync_signer: Some(Arc::new(crate::sim::archive::sim_identity())),
            ssm_source: None,
            ssm_all_groups: false,
            grtt_initial: Duration::from_millis(20),
            grtt_min: Duration::from_millis(1),
            grtt_max: Duration::from_secs(2),
            repair_share: 0.5,
            nak_rate: 5000.0,
            max_nak_units: 8192,
            tiers_bps: Vec::new(),
            rate_policy: RatePolicy::Lowest,
            start_tier: 0,
            tier_fec_extra: Vec::new(),
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
    /// Info and signature ([`crate::wire::data::SIGNED_SYNC_LEN`]).
    Sync([u8; crate::wire::data::SIGNED_SYNC_LEN]),
    Packet(PacketId),
}

/// Things an operator wants in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    ChannelOpened {
        channel: u32,
        title: String,
        group: SocketAddr,
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

pub struct ChannelManager {
    params: Params,
    /// Titles served, by name and by archive id.
    catalog: catalog::Catalog,
    channels: BTreeMap<u32, Channel>,
    /// Channel slots (group + port) and channel ids.
    slots: loops::Slots,
    /// Clock origin of SYNC timestamps.
    origin: Instant,
    replies: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Replies to addresses that proved nothing (no token, no session MAC): Retry and cut
    /// errors. Kept apart so the driver can send them where a spoofed flood, whose replies
    /// wait for address resolution that never comes, cannot hold up anyone else's.
    unvalidated_replies: VecDeque<(SocketAddr, Vec<u8>)>,
    /// While a request is handled: its sender proved neither address nor session.
    replying_unvalidated: bool,
    events: VecDeque<Event>,
    counters: Counters,
    samples: stats::Samples,
    /// Payload bytes the group loops of closed channels sent, by (title, tier): bounded by
    /// the catalogue and the tiers.
    closed_sent: BTreeMap<(String, usize), u64>,
    naks: repair::NakLimiter,
    cookies: unicast::Cookies,
    tokens: AddressTokens,
    /// While a request from an unproven address is handled: its length, which no reply to it
    /// may exceed.
    reply_cap: Option<usize>,
    /// Play requests from proven addresses, for the driver's ticket service.
    plays: VecDeque<(SocketAddr, Vec<u8>)>,
    rates: tiers::RateClock,
    windows: schedule::Windows,
    /// Where each (archive, tier) loop stood when its channel last closed idle: a channel
    /// opened again carries on from there, so a receiver that left for a probe (its channel
    /// emptied and closed meanwhile) is not sent the loop's start again and again.
    stopped_at: std::collections::HashMap<(ArchiveId, usize), u64>,
    /// Leases are checked at most this often (a scan of every member), so expiry is
    /// noticed up to `LEASE_CHECK` late.
    next_lease_check: Instant,
    /// Draining: members keep their channels, new receivers are refused.
    draining: bool,
    /// Delegations from origin servers letting this server's key sign SYNCs of their
    /// titles (an edge): the one from a title's signer goes with every `JoinOk` for it.
    delegations: Vec<crate::delegation::Delegation>,
}

/// Packets due within this much of `now` go out now: the driver then wakes once per quantum
/// and sends a burst (one GSO batch) instead of waking for every packet, which at Gbit/s
/// rates would cost more CPU in timer wake-ups than in sending. Bursts stay small (500 µs at
/// 2.5 Gbit/s is 156 KB) and the average rate is unchanged.
pub const SEND_AHEAD: Duration = Duration::from_micros(500);
const LEASE_CHECK: Duration = Duration::from_millis(50);

impl ChannelManager {
    pub fn new(params: Params, titles: Vec<TitleInfo>, now: Instant) -> ChannelManager {
        let mut m = ChannelManager {
            slots: loops::Slots::new(params.groups.len()),
            cookies: unicast::Cookies::new(&params, now),
            tokens: AddressTokens::new(&params.cookie_secret, now),
            reply_cap: None,
            plays: VecDeque::new(),
            params,
            catalog: catalog::Catalog::default(),
            channels: BTreeMap::new(),
            origin: now,
            replies: VecDeque::new(),
            unvalidated_replies: VecDeque::new(),
            replying_unvalidated: false,
            events: VecDeque::new(),
            counters: Counters::default(),
            samples: stats::Samples::default(),
            closed_sent: BTreeMap::new(),
            naks: repair::NakLimiter::default(),
            rates: tiers::RateClock::new(now),
            windows: schedule::Windows::default(),
            stopped_at: std::collections::HashMap::new(),
            next_lease_check: now,
            draining: false,
            delegations: Vec::new(),
        };
        for t in titles {
            m.add_title(t);
        }
        m
    }

    /// Draining: receivers already on a channel finish (and may rejoin or change tier), new
    /// ones get [`ErrorCode::Draining`] so they ask a director for another server.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// An edge's delegations (checked by the driver at start: for this server's key, from a
    /// configured origin, not expired). A `JoinOk` for a title signed by another server
    /// carries the delegation from that server, so receivers accept this server's SYNCs.
    pub fn set_delegations(&mut self, delegations: Vec<crate::delegation::Delegation>) {
        self.delegations = delegations;
    }

    /// The delegation for titles signed by `signer`; `None` when `signer` is this server's
    /// own key (its SYNCs verify as they are) or no delegation from it is held.
    pub(crate) fn delegation_for(
        &self,
        signer: &mcast_keys::PublicIdentity,
    ) -> Option<crate::delegation::Delegation> {
        let own = self.params.sync_signer.as_ref().map(|s| s.public());
        if own.as_ref() == Some(signer) {
            return None;
        }
        self.delegations
            .iter()
            .filter(|d| d.origin == *signer && Some(d.edge) == own)
            .max_by_key(|d| d.not_after)
            .cloned()
    }

    pub fn open_channels(&self) -> usize {
        self.channels.len()
    }

    /// The next reply to send, those to validated addresses first.
    pub fn poll_reply(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.replies
            .pop_front()
            .or_else(|| self.unvalidated_replies.pop_front())
    }

    /// The next reply to an address that proved nothing (a Retry, a cut error). A driver
    /// that drains these first can send them on a path of their own; `poll_reply` then
    /// yields only replies to validated addresses.
    pub fn poll_unvalidated_reply(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.unvalidated_replies.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn reply(&mut self, to: SocketAddr, env: &Envelope, msg: Control) {
        self.reply_to(to, env.receiver_id, env.req_id, msg);
    }

    /// Every reply goes through here: to an unproven address none is larger than its request
    /// (an error's message is cut to fit; anything else that does not fit is withheld).
    fn reply_to(&mut self, to: SocketAddr, receiver_id: u64, req_id: u32, msg: Control) {
        let env = Envelope::new(receiver_id, req_id, msg);
        let mut bytes = env.encode();
        if let Some(cap) = self.reply_cap.filter(|&c| bytes.len() > c) {
            let Control::Error { code, message } = env.msg else {
                self.counters.replies_withheld += 1;
                return;
            };
            let over = bytes.len() - cap;
            if over > message.len() {
                self.counters.replies_withheld += 1;
                return;
            }
            let mut keep = message.len() - over;
            while !message.is_char_boundary(keep) {
                keep -= 1;
            }
            let message = message[..keep].to_string();
            bytes = Envelope::new(receiver_id, req_id, Control::Error { code, message }).encode();
        }
        if self.replying_unvalidated {
            self.unvalidated_replies.push_back((to, bytes));
        } else {
            self.replies.push_back((to, bytes));
        }
    }

    /// A request that needs a proven address came without a valid token: send one (QUIC's
    /// Retry), if that is no larger than the request; the requester repeats it with the token.
    fn retry(&mut self, now: Instant, from: SocketAddr, env: &Envelope, len: usize) {
        let token = self.tokens.issue(from.ip(), now);
        let bytes = Envelope::new(env.receiver_id, env.req_id, Control::Retry { token }).encode();
        if bytes.len() > len {
            self.counters.unvalidated_dropped += 1;
            return;
        }
        self.counters.retries_sent += 1;
        self.unvalidated_replies.push_back((from, bytes));
    }

    /// A token for `ip`, as a Retry would carry (tests and tools that drive the manager
    /// directly).
    pub fn address_token(&self, ip: std::net::IpAddr, now: Instant) -> AddressToken {
        self.tokens.issue(ip, now)
    }

    /// A play request from a proven address, for the ticket service (the driver answers it).
    pub fn poll_play(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.plays.pop_front()
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
        let proven = env
            .token
            .is_some_and(|t| self.tokens.check(from.ip(), &t, now));
        if !proven && env.msg.needs_token() {
            self.retry(now, from, &env, datagram.len());
            return;
        }
        let sealed = match self.session_check(from, &env, datagram) {
            members::SessionCheck::Forged => return,
            members::SessionCheck::Sealed => true,
            members::SessionCheck::Open => false,
        };
        self.reply_cap = (!proven).then_some(datagram.len());
        self.replying_unvalidated = !proven && !sealed;
        self.dispatch(now, from, env, datagram);
        self.reply_cap = None;
        self.replying_unvalidated = false;
    }

    fn dispatch(&mut self, now: Instant, from: SocketAddr, env: Envelope, datagram: &[u8]) {
        match env.msg.clone() {
            Control::CatalogRequest { start } => self.catalog_request(from, &env, start),
            Control::Join { title } => self.join(now, from, &env, &title, None, None),
            Control::JoinAt { title, block } => {
                self.join(now, from, &env, &title, None, Some(block))
            }
            Control::ChangeTier { archive_id, tier } => {
                match self.catalog.title_of(&archive_id).map(str::to_string) {
                    Some(title) => self.join(now, from, &env, &title, Some(tier as usize), None),
                    None => self.unknown_session(from, &env, "unknown archive: join again"),
                }
            }
            Control::HeadRequest { archive_id, offset } => {
                self.head_request(from, &env, archive_id, offset)
            }
            Control::Keepalive {
                archive_id,
                rtt_us,
                rx_bps,
                loss_ppm,
                capacity_bps,
                ..
            } => self.keepalive(
                now,
                from,
                &env,
                archive_id,
                rtt_us,
                (rx_bps, loss_ppm, capacity_bps),
            ),
            Control::Complete {
                archive_id,
                elapsed_ms,
                milli_loops,
            } => self.complete(now, from, &env, archive_id, (elapsed_ms, milli_loops)),
            Control::UnicastRequest { archive_id } => {
                self.unicast_request(now, from, &env, archive_id)
            }
            Control::UnicastConfirm { archive_id, cookie } => {
                self.unicast_confirm(now, from, &env, archive_id, cookie)
            }
            Control::ProbeBurst {
                archive_id,
                cookie,
                tier,
                ms,
            } => self.probe_burst(now, from, &env, archive_id, cookie, tier, ms),
            Control::StatsRequest => {
                if !self.params.admin.iter().any(|p| p.contains(from.ip())) {
                    self.counters.stats_refused += 1;
                    let why = "stats are answered only to [server] admin addresses";
                    self.error(from, &env, ErrorCode::BadRequest, why);
                    return;
                }
                let json = serde_json::to_string(&self.stats()).unwrap_or_default();
                self.reply(from, &env, Control::StatsReply { json });
            }
            Control::PlayRequest { .. } => self.plays.push_back((from, datagram.to_vec())),
            // Server-to-receiver messages arriving here are noise.
            _ => self.counters.control_malformed += 1,
        }
    }

    /// Expire leases and close channels nobody holds any more.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_lease_check {
            return;
        }
        self.next_lease_check = now + LEASE_CHECK;
        if !self.params.tiers_bps.is_empty() && self.rates.due(now) {
            self.adapt_rates();
        }
        let fresh = unicast::report_fresh(self.params.lease);
        let lease = self.params.lease;
        for c in self.channels.values_mut() {
            for s in c.members.streams.values_mut() {
                s.adapt(now, fresh);
            }
            let before = c.members.streams.len();
            c.members
                .streams
                .retain(|_, s| !s.consent_expired(now, lease));
            self.counters.streams_consent_expired += (before - c.members.streams.len()) as u64;
            // An ended burst is kept a moment: a move it leads to starts after it.
            c.members
                .bursts
                .retain(|_, b| b.until().is_some_and(|u| now < u + burst::BURST_KEEP));
        }
        self.expire_leases(now);
        self.close_idle(now);
    }

    /// The driver learned that `to` is unreachable (an ICMP destination or port unreachable
    /// for a packet sent there: the receiver's socket is gone). Consent ends at once (RFC
    /// 7675): every unicast stream and discovery burst to it stops, counted in
    /// `streams_unreachable`, instead of running on until its consent lease runs out.
    /// Returns how many ended.
    pub fn on_unreachable(&mut self, to: SocketAddr) -> usize {
        let mut ended = 0;
        for c in self.channels.values_mut() {
            let before = c.members.streams.len() + c.members.bursts.len();
            c.members.streams.retain(|_, s| s.to != to);
            c.members.bursts.retain(|_, b| b.to != to);
            ended += before - (c.members.streams.len() + c.members.bursts.len());
        }
        self.counters.streams_unreachable += ended as u64;
        ended
    }

    /// The earliest moment something is due: a packet, a SYNC, or a lease expiry. A lingering
    /// channel's end is not a wake-up of its own: the lease check (every `LEASE_CHECK`) closes it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let due = self.channels.values().map(|c| c.due()).min()?;
        Some(due.min(self.next_lease_check))
    }

    /// The next data-channel packet due by `now` (+ [`SEND_AHEAD`]), if any. Call until `None`.
    /// A channel's group loop and its unicast members' streams are paced apart; whichever is
    /// due first goes first.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let params = &self.params;
        let horizon = now + SEND_AHEAD;
        let (&id, c) = self
            .channels
            .iter_mut()
            .map(|(id, c)| {
                let due = c.due();
                (id, c, due)
            })
            .filter(|(_, _, due)| *due <= horizon)
            .min_by_key(|(_, _, due)| *due)
            .map(|(id, c, _)| (id, c))?;
        let stream = c
            .stream_due()
            .filter(|(_, s, _)| c.group_due().is_none_or(|g| *s < g));
        let ctx = emit::EmitCtx {
            tag: c.tag,
            signer: params.sync_signer.as_deref(),
            symbol_size: c.symbol_size,
            sync_interval: params.sync_interval,
            repair_share: params.repair_share,
            send_us: now.saturating_duration_since(self.origin).as_micros() as u64,
            probe: false,
            fec_extra: params.tier_fec_extra.get(c.tier).copied().unwrap_or(0.0),
        };
        if let Some((rid, _, burst)) = stream {
            let rtt = c
                .members
                .get(rid)
                .map_or(params.grtt_initial, |m| m.rtt(params));
            let s = if burst {
                c.members.bursts.get_mut(&rid)
            } else {
                c.members.streams.get_mut(&rid)
            };
            let s = s.expect("due stream exists");
            let (header, payload, dests) =
                s.transmit(now, ctx, rtt, &mut self.counters, &mut self.samples);
            return Some(Transmit {
                channel: id,
                archive_id: c.archive_id,
                header,
                payload,
                dests,
            });
        }
        let parts = emit::LoopParts {
            carousel: &mut c.carousel,
            repair: &mut c.repair,
            pacer: &mut c.pacer,
            next_sync: &mut c.next_sync,
        };
        let members = &c.members;
        let group = || (members.grtt(params), members.len().max(1) as u32);
        let (header, payload, sent) = emit::next_datagram(
            now,
            parts,
            &ctx,
            group,
            &mut self.counters,
            &mut self.samples,
        );
        if sent != emit::Sent::Sync {
            c.packets_sent += 1;
            for joined in c.awaiting_first.drain(..) {
                self.samples.push(Sample::JoinToFirstPacket(
                    now.saturating_duration_since(joined),
                ));
            }
        }
        Some(Transmit {
            channel: id,
            archive_id: c.archive_id,
            header,
            payload,
            dests: c.dests.clone(),
        })
    }
}
