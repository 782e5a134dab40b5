//! One download, as one sans-I/O state machine (quinn-proto's `Connection` shape): the driver
//! feeds it datagrams ([`Session::handle_datagram`]) and timer expiries
//! ([`Session::handle_timeout`]), sends what [`Session::poll_transmit`] returns, wakes it at
//! [`Session::poll_timeout`] and carries out what [`Session::poll_event`] asks (join a group,
//! write a run, read back a hash packet, checkpoint, finish). `mcast-recv get` and the
//! simulator drive this same type, so a scenario the simulator passes is one the real
//! receiver passes.
//!
//! The session composes the [`Download`] (verify and place packets), [`NakEngine`] (gaps,
//! suppression, hold-off) and tier engine ([`Tiering`]), and owns what used to be driver
//! glue: the join and re-join, the head fetch, keepalives and RTT, silence detection,
//! unicast fallback, tier moves and which download verdicts feed the NAK engine. Control
//! replies are events it handles when they come; nothing waits for one.
//!
//! Phases: join → fetch the head → (driver opens the part file: [`Session::start`]) →
//! receive → report completion → done. Any phase can end in [`Event::Failed`].

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_keys::PublicIdentity;

use super::download::{Download, DownloadCounters, Verdict};
use super::fec_gate::FecGate;
use super::head_fetch::{HeadFetch, HeadFetchError};
use super::nak::{NakCounters, NakEngine};
use super::requests::{Purpose, Requests, Transmit, Via};
use super::resume;
use super::symbol_naks::SymbolNaks;
use super::tier::TierMove;
pub use super::tiering::TierSample;
use super::tiering::Tiering;
use crate::archive::{Head, PacketId};
use crate::delegation::Delegation;
use crate::wire::control::{Control, Envelope, ErrorCode, SessionKey};
use crate::wire::data::{
    archive_tag, split_signed_sync, sync_signed_bytes, DataHeader, DataKind, SyncInfo,
    DATA_HEADER_LEN,
};
use crate::wire::nak::{is_nak, Nak, MAX_NAK_RANGES};

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Join: tries per attempt and the wait for each; attempts while the server is busy.
const JOIN_TRIES: u32 = 5;
const JOIN_PER_TRY: Duration = Duration::from_millis(400);
const JOIN_ATTEMPTS: u32 = 10;
/// Tier change, completion and unicast handshake steps.
const SHORT_TRIES: u32 = 3;
const SHORT_PER_TRY: Duration = Duration::from_millis(300);
/// After a failed unicast handshake, the next one.
const FALLBACK_RETRY: Duration = Duration::from_secs(1);
/// A live channel silent this long (no verified packet, no SYNC): re-join its group (a fresh
/// IGMP/MLD report: under an IGMPv2 querier a switch may stop forwarding a group to everyone
/// when one member leaves, until somebody reports again); silent as long again after that:
/// fall back to unicast.
const SILENT_REJOIN: Duration = Duration::from_secs(1);
/// Loss, over the interval that made a receiver move down, above which its holes are left to
/// the slower tier's loop rather than repaired (see `tier_move`).
const DENSE_LOSS: f64 = 0.3;
/// Packets held back while their block's hash packet is read from disk.
const MAX_AWAITING_HASH: usize = 256;

/// What the session needs to know to start.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub title: String,
    /// The server's control endpoint.
    pub server: SocketAddr,
    pub receiver_id: u64,
    /// Seeds the NAK back-off timers.
    pub seed: u64,
    /// Pinned server identity; `None`: the key of a resumed download, else trust on first use.
    pub server_key: Option<PublicIdentity>,
    /// No multicast heard within this: ask for unicast.
    pub sync_timeout: Duration,
    /// How often a checkpoint is asked for while new units arrive.
    pub checkpoint: Duration,
    /// Fail as [`Failure::Silent`] when nothing verifiable came from the server for this long.
    pub silence_timeout: Option<Duration>,
    /// Ask for a new loop to start at this block (a resume on another server).
    pub start_block: Option<u64>,
    /// An earlier run's state: which archive, which key it was pinned to, what it held.
    pub prior: Option<Prior>,
    /// NAK suppression (NORM back-off, NAKs multicast to the group). Off: NAK as soon as a
    /// loss is seen, to the server only — for comparison runs.
    pub nak_suppression: bool,
    /// No multicast heard within `sync_timeout`: ask for the unicast stream (true), or end
    /// as [`Failure::NoMulticast`] so the driver fetches over HTTP instead (a site whose
    /// policy for receivers without multicast is HTTP).
    pub unicast_fallback: bool,
    /// End as [`Failure::UnicastLimit`] once the unicast stream has run this long without
    /// completing, so the driver fetches the rest over HTTP (a site whose policy is `both`).
    /// `None`: the stream runs to the end.
    pub unicast_limit: Option<Duration>,
    /// Wall-clock unix seconds when the session is made (the driver's clock; the session
    /// reads none): delegations an edge hands out (`JoinOk`) are checked against it for
    /// expiry. `None`: no delegation is accepted, only SYNCs signed by the head's key.
    pub unix_secs: Option<u64>,
}

impl SessionConfig {
    pub fn new(title: &str, server: SocketAddr, receiver_id: u64, seed: u64) -> SessionConfig {
        SessionConfig {
            title: title.to_string(),
            server,
            receiver_id,
            seed,
            server_key: None,
            sync_timeout: Duration::from_millis(1500),
            checkpoint: Duration::from_millis(250),
            silence_timeout: None,
            start_block: None,
            prior: None,
            nak_suppression: true,
            unicast_fallback: true,
            unicast_limit: None,
            unix_secs: None,
        }
    }
}

/// An earlier run's state file, as the session needs it.
#[derive(Clone, Debug)]
pub struct Prior {
    pub archive_id: [u8; 16],
    pub server_key: PublicIdentity,
    pub have: Vec<u64>,
}

/// Why a session ended without the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server does not have the title (`redirect`: one that may).
    NotFound { redirect: Option<SocketAddr> },
    /// The server is draining and takes no new receivers.
    Draining,
    /// The server stayed busy through every join attempt.
    Busy,
    /// The server did not answer a join or the head fetch.
    Unreachable(String),
    /// Nothing verifiable from the server for the silence timeout.
    Silent(Duration),
    /// The head is malformed, for another archive, or not signed by the trusted key.
    Integrity(String),
    /// The title was re-packed on the server while this download ran.
    Repacked,
    /// A reply the protocol does not allow here.
    Unexpected(String),
    /// No multicast heard within the sync timeout, and unicast fallback is off
    /// (`SessionConfig::unicast_fallback`).
    NoMulticast(Duration),
    /// The unicast stream ran `SessionConfig::unicast_limit` without completing.
    UnicastLimit(Duration),
}

/// What the driver is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The signed head arrived and verified against `trusted`: open (or resume) the part file
    /// and call [`Session::start`], or [`Session::finish_already_complete`] if the archive is
    /// already on disk.
    HeadReady {
        head: Arc<Head>,
        head_bytes: Arc<Vec<u8>>,
        trusted: PublicIdentity,
        /// The prior run's have-bitmap, when it belongs to this archive.
        prior_have: Option<Vec<u64>>,
    },
    /// Subscribe to a multicast group (a socket bound to it); with a source, to that source's
    /// packets to it only (source-specific multicast).
    JoinGroup(SocketAddr, Option<IpAddr>),
    /// Leave a group (the driver drops its socket).
    LeaveGroup(SocketAddr),
    /// Open the unicast data socket: the unicast handshake is sent from it next.
    OpenUnicast,
    /// Unicast fallback is active: the loop now comes to the unicast socket.
    UnicastActive,
    /// Moved to a throughput tier.
    TierChanged {
        tier: u8,
        group: SocketAddr,
    },
    /// The tier engine judged an interval.
    TierJudged(TierSample),
    /// Verified bytes (packets released from parking) to write at `offset`.
    Write {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The block's hash packet left the in-memory cache: read `len` bytes at `offset` of the
    /// part file (after the writes queued so far) and pass them to [`Session::restore_hash`].
    ReadHash {
        block: u64,
        offset: u64,
        len: usize,
    },
    /// A FEC source block holds enough symbols to decode: read each (packet, offset, len)
    /// from the part file (after the writes queued so far) and pass them, in this order, to
    /// [`Session::fec_symbols`].
    ReadFec {
        block: u64,
        reads: Vec<(PacketId, u64, usize)>,
    },
    /// Make what was written durable and save [`Session::have_bits`] as the state file.
    Checkpoint,
    Progress(Progress),
    /// The server forgot this session (restart or lease expiry): joining again.
    Rejoining,
    /// Everything is held and the server was told: make it durable and finish.
    Done,
    Failed(Failure),
}

/// A progress sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub have: u64,
    pub total: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
    pub rejected: u64,
    pub unicast: bool,
}

/// A verified payload to write now, straight from the datagram just handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    /// Where the payload sits in the datagram.
    pub payload: Range<usize>,
}

/// Figures of the run so far.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub received_bytes: u64,
    pub received_packets: u64,
    pub foreign: u64,
    pub malformed: u64,
    /// SYNCs dropped: signature not the archive's server's, or older than one already taken
    /// (a replay).
    pub syncs_forged: u64,
    pub syncs_stale: u64,
    /// SYNCs taken that an edge signed under a delegation from the head's signer.
    pub syncs_delegated: u64,
    pub repairs_received: u64,
    /// Datagrams of discovery bursts (`channel::burst`) received.
    pub burst_packets: u64,
    /// Re-joins of a channel that went silent.
    pub silent_rejoins: u64,
    /// Datagrams the driver's socket dropped (reported through
    /// [`Session::on_receive_drops`]).
    pub socket_drops: u64,
    pub units_at_start: u64,
    pub units_failed_recheck: u64,
    pub download: DownloadCounters,
    pub nak: NakCounters,
    /// FEC amounts asked for ([`SymbolNaks`]).
    pub symbol_naks: super::symbol_naks::SymbolNakCounters,
    pub unicast: bool,
    pub tier: usize,
    pub settled_tier: usize,
    pub tier_changes: u32,
    /// First loop packet and last write (the part of the run the loop and repairs decide).
    pub first_packet: Option<Instant>,
    pub last_write: Option<Instant>,
}

/// What a later run (or another server) needs to resume, straight from the session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResumeInfo {
    /// Loop units held and in all.
    pub have: u64,
    pub total: u64,
    /// Payload bytes of the loop in all, and still missing.
    pub loop_bytes: u64,
    pub missing_bytes: u64,
    /// Payload bytes a complete download holds (`loop_bytes` less FEC repair symbols).
    pub needed_bytes: u64,
    /// Where a new loop should start (after the longest run of complete blocks).
    pub start_block: Option<u64>,
    /// Throughput measured on the last tier interval, bit/s (0 if unmeasured).
    pub measured_bps: u64,
    pub received_bytes: u64,
}

enum Phase {
    Joining,
    Head,
    AwaitStart,
    Receiving,
    Completing,
    Finished,
}

/// What the join reply said.
struct Joined {
    archive_id: [u8; 16],
    group: SocketAddr,
    lease: Duration,
    tier: u8,
    tiers_bps: Vec<u64>,
}

/// The receive-side engines, once the head is known.
struct Engines {
    head: Arc<Head>,
    tag: [u8; 8],
    dl: Download,
    nak: NakEngine,
    tiering: Tiering,
    packet_bytes: usize,
    /// `send_us` of the last SYNC taken, on the channel and in discovery bursts (two paths,
    /// read in either order): an older one on the same path is a replay.
    last_sync_us: Option<u64>,
    last_burst_sync_us: Option<u64>,
    /// FEC archives: when a source block is judged short ([`FecGate`]), and the data units
    /// picked to NAK for it (the NAK engine leaves every other FEC-covered unit alone).
    gate: Option<FecGate>,
    wanted: std::collections::HashSet<u64>,
    /// FEC archives: blocks short by an amount of symbols, asked for as such.
    symbols: SymbolNaks,
}

impl Engines {
    /// What the NAK engine must not ask for (see [`Download::settled`]).
    fn settled(dl: &Download, wanted: &std::collections::HashSet<u64>, u: u64) -> bool {
        dl.settled(u, |x| wanted.contains(&x))
    }

    /// FEC block `f` is short after its loop pass (or after an answer did not cover it):
    /// ask for an amount of symbols while the block's extras can cover it, else for that
    /// many of its missing data packets.
    fn fec_short(&mut self, now: Instant, f: u64) {
        match self.dl.fec_amount(f) {
            Some(0) => {}
            Some(n) => {
                tracing::debug!(
                    block = f,
                    symbols = n,
                    "FEC block short: asking for symbols"
                );
                self.symbols.short(now, f, n, self.nak.backoff_bounds());
            }
            None => {
                let wanted = self.dl.fec_wanted(f);
                tracing::debug!(
                    block = f,
                    short = wanted.len(),
                    "FEC block short: asking for data"
                );
                for u in wanted {
                    self.wanted.insert(u);
                    self.nak.on_lost(now, u);
                }
            }
        }
    }
}

pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    requests: Requests,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    joined: Option<Joined>,
    /// Join attempts answered "busy", and the wait before the next.
    busy: u32,
    busy_backoff: Duration,
    busy_until: Option<Instant>,
    rejoin: bool,
    head_fetch: Option<HeadFetch>,
    /// The verified head and its length, between [`Event::HeadReady`] and [`Session::start`].
    head_fetch_result: Option<(Arc<Head>, u64)>,
    eng: Option<Engines>,
    /// The latest `now` the driver gave.
    now: Instant,
    stats: SessionStats,
    // Receiving.
    group: Option<SocketAddr>,
    /// The channel's source, for a source-specific group (from the last `JoinOk`).
    ssm_source: Option<IpAddr>,
    /// The group left at a move down, before the new tier's was granted.
    left_early: Option<SocketAddr>,
    heard: bool,
    unicast_opened: bool,
    unicast_ok: bool,
    /// When the unicast stream started (for `SessionConfig::unicast_limit`).
    unicast_since: Option<Instant>,
    next_fallback_try: Option<Instant>,
    keepalive_every: Duration,
    next_keepalive: Instant,
    keepalive_sent: Option<(u32, Instant)>,
    rtt_us: u32,
    reported_tier: Option<usize>,
    /// The capacity the last keepalive carried.
    reported_capacity: u64,
    next_checkpoint: Instant,
    dirty: bool,
    next_progress: Instant,
    last_heard: Instant,
    last_loop_no: Option<u32>,
    /// Last verified packet or SYNC on the channel, and the last silent-channel re-join.
    last_channel: Instant,
    rejoined_at: Option<Instant>,
    awaiting_hash: Vec<(PacketId, Source, Vec<u8>)>,
    /// When the session began (its first join): the elapsed time its `Complete` reports.
    started: Instant,
    /// The delegation the server's last `JoinOk` carried (an edge serving another server's
    /// title), and the wall clock to check its expiry against.
    sync_delegation: SyncDelegation,
}

/// A second key a SYNC may be signed by: an edge's, named by a [`Delegation`] from the
/// head's signer, while it has not expired.
struct SyncDelegation {
    cert: Option<Delegation>,
    /// The certificate's signature checked (once per certificate).
    sig_ok: Option<bool>,
    /// Wall clock: unix seconds at `at`.
    unix: Option<(u64, Instant)>,
}

impl SyncDelegation {
    fn set(&mut self, cert: Option<Delegation>) {
        if cert != self.cert {
            self.cert = cert;
            self.sig_ok = None;
        }
    }

    /// The delegated key valid for SYNCs of a title signed by `signer` at `now`.
    fn key(&mut self, signer: &PublicIdentity, now: Instant) -> Option<PublicIdentity> {
        let d = self.cert.as_ref()?;
        let (unix, at) = self.unix?;
        let unix = unix + now.saturating_duration_since(at).as_secs();
        if d.origin != *signer || unix > d.not_after {
            return None;
        }
        let ok = *self
            .sig_ok
            .get_or_insert_with(|| d.check(signer, unix).is_ok());
        ok.then_some(d.edge)
    }
}

impl Session {
    /// A session that starts by joining `cfg.title` on `cfg.server`.
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        let requests = Requests::new(cfg.server, cfg.receiver_id);
        let mut s = Session {
            cfg,
            phase: Phase::Joining,
            requests,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            joined: None,
            busy: 0,
            busy_backoff: Duration::from_millis(200),
            busy_until: None,
            rejoin: false,
            head_fetch: None,
            head_fetch_result: None,
            eng: None,
            now,
            stats: SessionStats::default(),
            group: None,
            ssm_source: None,
            left_early: None,
            heard: false,
            unicast_opened: false,
            unicast_ok: false,
            unicast_since: None,
            next_fallback_try: None,
            keepalive_every: Duration::from_secs(1),
            next_keepalive: now,
            keepalive_sent: None,
            rtt_us: 0,
            reported_tier: None,
            reported_capacity: 0,
            next_checkpoint: now,
            dirty: false,
            next_progress: now,
            last_heard: now,
            last_loop_no: None,
            last_channel: now,
            rejoined_at: None,
            awaiting_hash: Vec::new(),
            started: now,
            sync_delegation: SyncDelegation {
                cert: None,
                sig_ok: None,
                unix: None,
            },
        };
        s.sync_delegation.unix = s.cfg.unix_secs.map(|u| (u, now));
        s.send_join(now, s.cfg.start_block);
        s
    }

    // ----- the driver's interface -------------------------------------------------------

    /// A datagram arrived on any of the session's sockets. Control replies come from the
    /// server's control endpoint; everything else is channel traffic (data, SYNC, NAKs heard
    /// on the group). Returns a verified payload to write at once, if the datagram was one.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<Write> {
        self.now = self.now.max(now);
        if from == self.cfg.server {
            self.on_control(now, bytes);
            return None;
        }
        if matches!(self.phase, Phase::Receiving) {
            return self.on_channel(now, bytes);
        }
        None
    }

    /// Timers that are due: request retries, keepalives, tier intervals, NAK timers, unicast
    /// fallback, checkpoints, progress and silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let failed = self.requests.handle_timeout(now, &mut out);
        self.transmits.extend(out);
        for p in failed {
            self.on_request_failed(now, p);
        }
        if let Some(until) = self.busy_until {
            if now >= until {
                self.busy_until = None;
                let start = if self.rejoin {
                    None
                } else {
                    self.cfg.start_block
                };
                self.send_join(now, start);
            }
        }
        match self.phase {
            Phase::Head => self.poll_head(now),
            Phase::Receiving => self.receiving_timers(now),
            _ => {}
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next moment [`Session::handle_timeout`] has work; `None` when finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Finished) {
            return None;
        }
        let mut t = self.requests.poll_timeout();
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        at(self.busy_until);
        match self.phase {
            Phase::Head => at(self.head_fetch.as_ref().map(|f| f.poll_timeout())),
            Phase::Receiving => {
                let eng = self.eng.as_ref().expect("receiving");
                at(Some(self.next_keepalive));
                at(Some(self.next_progress));
                at(self.dirty.then_some(self.next_checkpoint));
                at(self.silence_deadline());
                at(self.silent_deadline());
                at(self
                    .fallback_due()
                    .then_some(self.next_fallback_try)
                    .flatten());
                at(eng.tiering.next_deadline());
                if eng.tiering.settling(self.now) {
                    // NAKs wait while a tier move settles.
                    at(eng.tiering.settle_end());
                } else {
                    at(eng.nak.poll_timeout());
                    at(eng.symbols.poll_timeout());
                }
            }
            _ => {}
        }
        t
    }

    /// The head verified and the part file is open: receive. `prior_have` is the have-bitmap
    /// to resume from (only if the part file is intact and sized right); `read` reads the part
    /// file (offset, buffer) to re-verify what it says is held. Returns the units that failed
    /// that check (they are fetched again).
    pub fn start(
        &mut self,
        now: Instant,
        prior_have: Option<Vec<u64>>,
        read: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> u64 {
        let Some(j) = &self.joined else {
            return 0;
        };
        let Some(head) = self.head_fetch_result.take() else {
            return 0;
        };
        let (head, head_len) = head;
        let resumed = prior_have.is_some();
        let mut dl = Download::new(head.clone(), head_len, prior_have);
        let failed = if resumed { dl.recheck_held(read) } else { 0 };
        self.stats.units_failed_recheck = failed;
        self.stats.units_at_start = dl.have_count();
        let mut nak = NakEngine::new(*dl.shape(), self.cfg.seed);
        nak.set_unicast(!self.group_naks());
        let packet_bytes = DATA_HEADER_LEN + head.symbol_size as usize;
        let tiering = Tiering::new(j.tier, j.tiers_bps.clone(), head.loop_bytes(), now);
        self.keepalive_every = (j.lease / 3).max(Duration::from_millis(50));
        self.next_keepalive = now + self.keepalive_every;
        self.next_checkpoint = now + self.cfg.checkpoint;
        self.next_progress = now;
        self.last_heard = now;
        self.last_channel = now;
        self.next_fallback_try = Some(now + self.cfg.sync_timeout);
        let group = j.group;
        let gate = dl.fec().map(|t| FecGate::new(t.shape, *dl.shape()));
        self.eng = Some(Engines {
            tag: archive_tag(&head.archive_id),
            head,
            dl,
            nak,
            tiering,
            packet_bytes,
            last_sync_us: None,
            last_burst_sync_us: None,
            gate,
            wanted: Default::default(),
            symbols: SymbolNaks::new(self.cfg.receiver_id),
        });
        self.fec_reads();
        self.group = Some(group);
        self.events
            .push_back(Event::JoinGroup(group, self.ssm_source));
        self.phase = Phase::Receiving;
        if self.eng.as_ref().is_some_and(|e| e.dl.is_complete()) {
            self.complete(now);
        }
        failed
    }

    /// The archive is already complete on disk: tell the server, then finish.
    pub fn finish_already_complete(&mut self, now: Instant) {
        self.head_fetch_result = None;
        self.complete(now);
    }

    /// The bytes of a hash packet asked for by [`Event::ReadHash`] (`None`: unreadable);
    /// packets held back for it are offered again. Returns writes to make now.
    pub fn restore_hash(&mut self, now: Instant, block: u64, bytes: Option<Vec<u8>>) {
        let Some(eng) = self.eng.as_mut() else {
            return;
        };
        let ok = bytes.is_some_and(|b| eng.dl.restore_hash(block, b));
        if !ok {
            tracing::warn!(
                block,
                "hash packet on disk no longer verifies: fetching it again"
            );
        }
        let held: Vec<_> = std::mem::take(&mut self.awaiting_hash);
        for (id, source, payload) in held {
            let b = eng_block(self.eng.as_ref().expect("engines"), id);
            if b != Some(block) {
                self.awaiting_hash.push((id, source, payload));
                continue;
            }
            if let Some(w) = self.on_loop_packet(now, id, source, &payload, 0) {
                let offset = w.offset;
                self.events.push_back(Event::Write {
                    offset,
                    bytes: payload,
                });
            }
        }
    }

    /// The symbols asked for by [`Event::ReadFec`] (`None`: unreadable): decode the block
    /// ([`Download::decode`]) and queue what it restored as writes.
    pub fn fec_symbols(
        &mut self,
        now: Instant,
        block: u64,
        symbols: Vec<(PacketId, Option<Vec<u8>>)>,
    ) {
        let Some(eng) = self.eng.as_mut() else {
            return;
        };
        let writes = eng.dl.decode(block, symbols);
        if !writes.is_empty() {
            self.dirty = true;
            self.stats.last_write = Some(now);
        }
        for (offset, bytes) in writes {
            self.events.push_back(Event::Write { offset, bytes });
        }
        eng.wanted.retain(|&u| !eng.dl.has(u));
        self.fec_reads();
        if self.eng.as_ref().is_some_and(|e| e.dl.is_complete()) {
            self.complete(now);
        }
    }

    /// Ask the driver for the symbols of every FEC block that became decodable.
    fn fec_reads(&mut self) {
        let Some(eng) = self.eng.as_mut() else {
            return;
        };
        let mut decodable = eng.dl.take_decodable();
        while let Some(block) = decodable.pop() {
            match eng.dl.decode_from_memory(block) {
                Some(writes) => {
                    if !writes.is_empty() {
                        self.dirty = true;
                    }
                    for (offset, bytes) in writes {
                        self.events.push_back(Event::Write { offset, bytes });
                    }
                    eng.wanted.retain(|&u| !eng.dl.has(u));
                    // A failed decode from memory is tried again from the file.
                    decodable.extend(eng.dl.take_decodable());
                }
                None => {
                    let reads = eng.dl.decode_reads(block);
                    self.events.push_back(Event::ReadFec { block, reads });
                }
            }
        }
    }

    /// The driver could not take a checkpoint now (its queue is full): ask again later.
    pub fn checkpoint_deferred(&mut self) {
        self.dirty = true;
    }

    /// The driver's receive socket dropped `dropped` datagrams since the last call (its
    /// buffer overflowed: `SO_RXQ_OVFL`). That is congestion of this receiver's own making —
    /// it is short of CPU for the channel's rate — and moves it down a tier.
    pub fn on_receive_drops(&mut self, dropped: u64) {
        self.stats.socket_drops += dropped;
        if let Some(e) = self.eng.as_mut() {
            e.tiering.on_overrun(dropped);
        }
    }

    /// Whether loop unit `unit` is held.
    pub fn has_unit(&self, unit: u64) -> bool {
        self.eng.as_ref().is_some_and(|e| e.dl.has(unit))
    }

    /// Whether a symbol of FEC block `f` would still help (its data is not all held and it
    /// cannot be decoded yet).
    pub fn fec_block_short(&self, f: u64) -> bool {
        self.eng
            .as_ref()
            .and_then(|e| e.dl.fec())
            .is_some_and(|t| f < t.shape.blocks && t.deficit(f) > 0)
    }

    /// The tier engine's counters (`None` for a title with one tier, or before the head).
    pub fn tier_counters(&self) -> Option<super::tier::TierCounters> {
        self.eng
            .as_ref()
            .and_then(|e| e.tiering.counters().cloned())
    }

    pub fn have_bits(&self) -> &[u64] {
        self.eng.as_ref().map_or(&[], |e| e.dl.have_bits())
    }

    pub fn head(&self) -> Option<&Arc<Head>> {
        self.eng.as_ref().map(|e| &e.head)
    }

    pub fn archive_id(&self) -> Option<[u8; 16]> {
        self.joined.as_ref().map(|j| j.archive_id)
    }

    pub fn group(&self) -> Option<SocketAddr> {
        self.group
    }

    pub fn is_unicast(&self) -> bool {
        self.unicast_ok
    }

    /// Units held and in all (0/0 before the head).
    pub fn progress_units(&self) -> (u64, u64) {
        self.eng
            .as_ref()
            .map_or((0, 0), |e| (e.dl.have_count(), e.dl.units()))
    }

    pub fn stats(&self, now: Instant) -> SessionStats {
        let mut s = self.stats.clone();
        if let Some(e) = &self.eng {
            s.download = e.dl.counters.clone();
            s.nak = e.nak.counters.clone();
            s.symbol_naks = e.symbols.counters.clone();
            s.tier = e.tiering.tier().unwrap_or(0);
            s.settled_tier = e.tiering.settled_tier(now);
            s.tier_changes = e.tiering.changes;
        }
        s.unicast = self.unicast_ok;
        s
    }

    /// What a resume elsewhere needs, from what this session holds.
    pub fn resume_info(&self) -> Option<ResumeInfo> {
        let e = self.eng.as_ref()?;
        Some(ResumeInfo {
            have: e.dl.have_count(),
            total: e.dl.units(),
            loop_bytes: e.head.loop_bytes(),
            missing_bytes: resume::missing_bytes(&e.dl),
            needed_bytes: e.head.needed_bytes(),
            start_block: resume::start_block(e.dl.shape(), |u| e.dl.has(u)),
            measured_bps: e.tiering.report().0,
            received_bytes: self.stats.received_bytes,
        })
    }

    /// Payload bytes of the units missing now.
    pub fn missing_bytes(&self) -> u64 {
        self.eng
            .as_ref()
            .map_or(0, |e| resume::missing_bytes(&e.dl))
    }
}

/// Where a loop packet came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The channel's loop (or the unicast stream's).
    Loop,
    /// A repair, sent ahead of the loop.
    Repair,
    /// A discovery burst.
    Burst,
}

/// The block a packet belongs to.
fn eng_block(e: &Engines, id: PacketId) -> Option<u64> {
    Some(e.dl.shape().hash_block_of(id))
}

// ----- control: join, head, replies --------------------------------------------------------

impl Session {
    fn send_join(&mut self, now: Instant, start: Option<u64>) {
        let title = self.cfg.title.clone();
        let msg = match start {
            Some(block) => Control::JoinAt { title, block },
            None => Control::Join { title },
        };
        let mut out = Vec::new();
        self.requests.request(
            now,
            Purpose::Join,
            Via::Control,
            msg,
            JOIN_TRIES,
            JOIN_PER_TRY,
            &mut out,
        );
        self.transmits.extend(out);
    }

    fn request(&mut self, now: Instant, purpose: Purpose, via: Via, msg: Control) {
        let mut out = Vec::new();
        self.requests
            .request(now, purpose, via, msg, SHORT_TRIES, SHORT_PER_TRY, &mut out);
        self.transmits.extend(out);
    }

    fn fail(&mut self, f: Failure) {
        if matches!(self.phase, Phase::Finished) {
            return;
        }
        self.phase = Phase::Finished;
        self.events.push_back(Event::Failed(f));
    }

    fn on_control(&mut self, now: Instant, bytes: &[u8]) {
        let Ok(env) = Envelope::decode(bytes) else {
            return;
        };
        if env.receiver_id != self.cfg.receiver_id {
            return;
        }
        self.last_heard = now;
        let mut out = Vec::new();
        if self.requests.on_retry(now, &env, &mut out) {
            self.transmits.extend(out);
            // A head chunk asked for without the token is asked again now.
            if self.head_fetch.is_some() {
                self.poll_head(now);
            }
            return;
        }
        if let (Control::LeaseOk { .. }, Some((id, at))) = (&env.msg, self.keepalive_sent) {
            if env.req_id == id {
                self.rtt_us = now
                    .saturating_duration_since(at)
                    .as_micros()
                    .clamp(1, u32::MAX as u128) as u32;
                self.keepalive_sent = None;
            }
        }
        if let Control::HeadChunk {
            archive_id,
            offset,
            bytes,
            ..
        } = &env.msg
        {
            if let Some(f) = self.head_fetch.as_mut() {
                f.on_chunk(archive_id, *offset, bytes);
                // Each chunk frees a slot in the window: ask for the next at once.
                self.poll_head(now);
            }
        }
        let purpose = self.requests.answer(&env);
        match purpose {
            Some(Purpose::Join) => self.on_join_reply(now, env.msg),
            Some(Purpose::HeadFirst) => self.on_first_chunk(now, env.msg),
            Some(Purpose::ChangeTier(t)) => self.on_tier_reply(now, t, env.msg),
            Some(Purpose::Complete) => self.finish(),
            Some(Purpose::UnicastRequest) => match env.msg {
                Control::Cookie { archive_id, cookie } => self.request(
                    now,
                    Purpose::UnicastConfirm,
                    Via::Unicast,
                    Control::UnicastConfirm { archive_id, cookie },
                ),
                other => self.unicast_failed(
                    now,
                    &format!("unexpected reply to unicast request: {other:?}"),
                ),
            },
            Some(Purpose::UnicastConfirm) => match env.msg {
                Control::UnicastOk { .. } => {
                    self.unicast_ok = true;
                    self.unicast_since.get_or_insert(now);
                    if let Some(e) = self.eng.as_mut() {
                        e.nak.set_unicast(true);
                        e.tiering.hold_for_unicast(now);
                    }
                    self.events.push_back(Event::UnicastActive);
                }
                other => self.unicast_failed(now, &format!("unicast refused: {other:?}")),
            },
            Some(Purpose::BurstCookie(tier, ms)) => match env.msg {
                Control::Cookie { archive_id, cookie } => self.request(
                    now,
                    Purpose::Burst,
                    Via::Unicast,
                    Control::ProbeBurst {
                        archive_id,
                        cookie,
                        tier,
                        ms,
                    },
                ),
                other => self.burst_refused(now, &other),
            },
            Some(Purpose::Burst) => match env.msg {
                Control::UnicastOk { .. } => {
                    tracing::debug!("discovery burst granted");
                    if let Some(e) = self.eng.as_mut() {
                        e.tiering.on_burst_granted(now);
                    }
                }
                other => self.burst_refused(now, &other),
            },
            None => {
                if let Control::Error {
                    code: ErrorCode::UnknownSession,
                    ..
                } = env.msg
                {
                    if matches!(self.phase, Phase::Receiving)
                        && !self.requests.in_flight(Purpose::Join)
                    {
                        tracing::info!(
                            "server forgot this session (restart or lease expiry): joining again"
                        );
                        self.events.push_back(Event::Rejoining);
                        self.rejoin = true;
                        self.busy = 0;
                        self.send_join(now, None);
                    }
                }
            }
        }
    }

    fn on_request_failed(&mut self, now: Instant, p: Purpose) {
        match p {
            Purpose::Join | Purpose::HeadFirst => self.fail(Failure::Unreachable(format!(
                "server {} did not answer ({JOIN_TRIES} tries): is mcastd running there, and is --server right?",
                self.cfg.server,
            ))),
            Purpose::ChangeTier(t) => {
                tracing::warn!(tier = t, "tier change not granted (no answer)");
                self.back_on_group();
            }
            Purpose::Complete => self.finish(),
            Purpose::UnicastRequest | Purpose::UnicastConfirm => {
                let server = self.cfg.server;
                self.unicast_failed(now, &format!("server {server} did not answer ({SHORT_TRIES} tries)"))
            }
            Purpose::BurstCookie(..) | Purpose::Burst => {
                self.burst_refused(now, &"no answer")
            }
        }
    }

    /// A discovery burst was refused or got no answer (an older server; a busy one, already
    /// running a few for receivers that started together; unicast filtered): the tier
    /// engine probes the group instead, at once.
    fn burst_refused(&mut self, now: Instant, why: &dyn std::fmt::Debug) {
        tracing::debug!(
            ?why,
            "discovery burst not granted: probing the group instead"
        );
        if let Some(e) = self.eng.as_mut() {
            e.tiering.on_burst_refused(now);
        }
    }

    /// Ask for a discovery burst (cookie first: it goes to the unicast socket).
    fn ask_burst(&mut self, now: Instant, tier: u8, ms: u16) {
        let Some(archive_id) = self.archive_id() else {
            return;
        };
        if !self.unicast_opened {
            self.unicast_opened = true;
            self.events.push_back(Event::OpenUnicast);
        }
        tracing::debug!(tier, ms, "asking for a discovery burst");
        self.request(
            now,
            Purpose::BurstCookie(tier, ms),
            Via::Unicast,
            Control::UnicastRequest { archive_id },
        );
    }

    fn on_join_reply(&mut self, now: Instant, msg: Control) {
        match msg {
            Control::JoinOk {
                archive_id,
                group,
                lease_ms,
                tier,
                tiers_bps,
                session_key,
                source,
                delegation,
                ..
            } => {
                self.requests.set_session_key(session_key);
                self.ssm_source = source;
                self.sync_delegation.set(delegation);
                let j = Joined {
                    archive_id,
                    group,
                    lease: Duration::from_millis(lease_ms as u64),
                    tier,
                    tiers_bps,
                };
                if self.rejoin {
                    self.rejoined(now, j);
                } else {
                    self.joined = Some(j);
                    self.phase = Phase::Head;
                    self.request_first_chunk(now, archive_id);
                }
            }
            Control::NotHere { redirect, .. } => self.fail(Failure::NotFound { redirect }),
            Control::Error {
                code: ErrorCode::Draining,
                ..
            } => self.fail(Failure::Draining),
            Control::Error {
                code: ErrorCode::Busy,
                message,
            } => {
                self.busy += 1;
                if self.busy >= JOIN_ATTEMPTS {
                    self.fail(Failure::Busy);
                    return;
                }
                tracing::warn!(%message, "server busy; retrying");
                self.busy_until = Some(now + self.busy_backoff);
                self.busy_backoff = (self.busy_backoff * 2).min(Duration::from_secs(5));
            }
            other => self.fail(Failure::Unexpected(format!(
                "unexpected reply to join: {other:?}"
            ))),
        }
    }

    /// The join after the server forgot us.
    fn rejoined(&mut self, now: Instant, j: Joined) {
        self.rejoin = false;
        let Some(old) = self.joined.as_ref().map(|o| o.archive_id) else {
            return;
        };
        if j.archive_id != old {
            self.fail(Failure::Repacked);
            return;
        }
        if let Some(e) = self.eng.as_mut() {
            if Some(j.group) != self.group {
                if let Some(g) = self.group {
                    self.events.push_back(Event::LeaveGroup(g));
                }
                self.events
                    .push_back(Event::JoinGroup(j.group, self.ssm_source));
                self.group = Some(j.group);
                e.nak.reset_position();
                self.last_channel = now;
                self.rejoined_at = None;
            }
            e.tiering = Tiering::new(j.tier, j.tiers_bps.clone(), e.head.loop_bytes(), now);
            // A restarted server's SYNC clock starts again.
            e.last_sync_us = None;
            e.last_burst_sync_us = None;
            self.reported_tier = None;
        }
        self.keepalive_every = (j.lease / 3).max(Duration::from_millis(50));
        self.joined = Some(j);
        if self.unicast_ok {
            self.unicast_ok = false;
            let group_naks = self.group_naks();
            if let Some(e) = self.eng.as_mut() {
                e.nak.set_unicast(!group_naks);
            }
        }
        self.heard = false;
        self.next_fallback_try = Some(now + self.cfg.sync_timeout);
    }

    fn request_first_chunk(&mut self, now: Instant, archive_id: [u8; 16]) {
        let mut out = Vec::new();
        self.requests.request(
            now,
            Purpose::HeadFirst,
            Via::Control,
            Control::HeadRequest {
                archive_id,
                offset: 0,
            },
            JOIN_TRIES,
            JOIN_PER_TRY,
            &mut out,
        );
        self.transmits.extend(out);
    }

    fn on_first_chunk(&mut self, now: Instant, msg: Control) {
        let Some(archive_id) = self.joined.as_ref().map(|j| j.archive_id) else {
            return;
        };
        let Control::HeadChunk { total, bytes, .. } = msg else {
            self.fail(Failure::Unexpected(format!(
                "unexpected reply to head request: {msg:?}"
            )));
            return;
        };
        match HeadFetch::new(now, archive_id, total, &bytes) {
            Ok(f) => {
                self.head_fetch = Some(f);
                self.poll_head(now);
            }
            Err(_) => self.fail(Failure::Integrity(
                "server announced an oversized head".into(),
            )),
        }
    }

    fn poll_head(&mut self, now: Instant) {
        let Some(f) = self.head_fetch.as_mut() else {
            return;
        };
        let mut msgs = Vec::new();
        let r = f.poll(now, |m| msgs.push(m));
        let mut out = Vec::new();
        for m in msgs {
            self.requests.send(m, &mut out);
        }
        self.transmits.extend(out);
        if let Err(HeadFetchError::TimedOut) = r {
            self.fail(Failure::Unreachable(
                "timed out fetching the archive head".into(),
            ));
            return;
        }
        if self.head_fetch.as_ref().is_some_and(|f| f.is_complete()) {
            let bytes = self.head_fetch.take().expect("fetch").into_bytes();
            self.head_arrived(bytes);
        }
    }

    /// The whole head is here: decode, check it is ours, check who signed it.
    fn head_arrived(&mut self, bytes: Vec<u8>) {
        let archive_id = self.joined.as_ref().expect("joined").archive_id;
        let head = match Head::decode(&bytes) {
            Ok(h) => h,
            Err(e) => {
                self.fail(Failure::Integrity(format!(
                    "bad archive head from server: {e}"
                )));
                return;
            }
        };
        if head.archive_id != archive_id {
            self.fail(Failure::Integrity("head is for another archive".into()));
            return;
        }
        let prior = self
            .cfg
            .prior
            .as_ref()
            .filter(|p| p.archive_id == archive_id);
        // Trust: a pinned key, else the key a resumed download was pinned to, else first use.
        let trusted = match (&self.cfg.server_key, prior) {
            (Some(k), _) => *k,
            (None, Some(p)) => p.server_key,
            (None, None) => {
                tracing::warn!(key = %hex::encode(head.server_key.0), "server key not pinned (--server-key): trusting it on first use");
                head.server_key
            }
        };
        if head.verify_with(&trusted).is_err() {
            self.fail(Failure::Integrity(format!(
                "archive head for {:?} is not signed by the trusted server key {}",
                self.cfg.title,
                trusted.fingerprint()
            )));
            return;
        }
        // A validly signed head of *another* title (a join rewritten on the way, or a
        // server that mapped the name wrongly) must not be saved under the name asked for.
        if head.title != self.cfg.title {
            self.fail(Failure::Integrity(format!(
                "asked for {:?}, but the server answered with the signed archive of {:?}: refused (a control message was altered on the way, or the server's catalog is wrong)",
                self.cfg.title, head.title
            )));
            return;
        }
        let prior_have = prior.map(|p| p.have.clone());
        let head = Arc::new(head);
        let head_len = bytes.len() as u64;
        self.head_fetch_result = Some((head.clone(), head_len));
        self.phase = Phase::AwaitStart;
        self.events.push_back(Event::HeadReady {
            head,
            head_bytes: Arc::new(bytes),
            trusted,
            prior_have,
        });
    }

    fn on_tier_reply(&mut self, now: Instant, tier: u8, msg: Control) {
        match msg {
            Control::JoinOk {
                group: g,
                session_key,
                source,
                delegation,
                ..
            } => {
                self.requests.set_session_key(session_key);
                self.ssm_source = source;
                self.sync_delegation.set(delegation);
                let Some(e) = self.eng.as_mut() else {
                    return;
                };
                let left = self.left_early.take();
                if let Some(old) = self.group {
                    e.nak.switch_channel(now, old, g);
                    if old != g && left != Some(old) {
                        self.events.push_back(Event::LeaveGroup(old));
                    }
                }
                self.events.push_back(Event::JoinGroup(g, self.ssm_source));
                self.group = Some(g);
                // A new channel may still be in its SYNC lead: silence counts from now.
                self.last_channel = now;
                self.rejoined_at = None;
                tracing::info!(tier, group = %g, "moved to throughput tier");
                self.events.push_back(Event::TierChanged { tier, group: g });
            }
            other => {
                tracing::warn!(?other, tier, "tier change not granted");
                self.back_on_group();
            }
        }
    }

    /// A move down was refused: back on the group left early.
    fn back_on_group(&mut self) {
        if let Some(g) = self.left_early.take() {
            self.events.push_back(Event::JoinGroup(g, self.ssm_source));
        }
    }

    fn unicast_failed(&mut self, now: Instant, why: &str) {
        tracing::warn!(error = %why, "unicast fallback request failed; retrying");
        self.next_fallback_try = Some(now + FALLBACK_RETRY);
    }

    /// Everything held: tell the server (the channel can close), then finish.
    fn complete(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Completing | Phase::Finished) {
            return;
        }
        self.phase = Phase::Completing;
        let Some(archive_id) = self.archive_id() else {
            self.finish();
            return;
        };
        self.requests.cancel(Purpose::Join);
        self.busy_until = None;
        // This run's figures, for the server's completion histograms.
        let elapsed_ms = now
            .saturating_duration_since(self.started)
            .as_millis()
            .min(u32::MAX as u128) as u32;
        let loop_bytes = self.head().map_or(0, |h| h.loop_bytes()).max(1);
        let milli_loops = (self.stats.received_bytes as u128 * 1000 / loop_bytes as u128)
            .min(u32::MAX as u128) as u32;
        self.request(
            now,
            Purpose::Complete,
            Via::Control,
            Control::Complete {
                archive_id,
                elapsed_ms,
                milli_loops,
            },
        );
    }

    fn finish(&mut self) {
        if matches!(self.phase, Phase::Finished) {
            return;
        }
        self.phase = Phase::Finished;
        self.events.push_back(Event::Done);
    }
}

// ----- the channel: data, SYNC, NAKs heard ---------------------------------------------------

impl Session {
    fn on_channel(&mut self, now: Instant, dg: &[u8]) -> Option<Write> {
        let eng = self.eng.as_mut().expect("receiving");
        if is_nak(dg) {
            match Nak::decode(dg) {
                Ok(h)
                    if h.archive_tag == eng.tag
                        && Some(h.session_tag) != self.requests.session_tag() =>
                {
                    eng.nak.on_nak_heard(now, h.units_in(eng.dl.all_units()));
                    let nak = &eng.nak;
                    eng.symbols
                        .on_heard(now, &h.symbols, |n| nak.holdoff_for(n as usize));
                }
                Ok(_) => {}
                Err(_) => self.stats.malformed += 1,
            }
            return None;
        }
        let Ok((hdr, payload)) = DataHeader::decode(dg) else {
            self.stats.malformed += 1;
            return None;
        };
        if hdr.archive_tag != eng.tag {
            self.stats.foreign += 1;
            return None;
        }
        if hdr.probe {
            // A discovery burst: judged apart from the channel; its loop packets are kept
            // (verified like any) but, like repairs, do not move the loop position.
            let id = match hdr.kind {
                DataKind::Packet(id) => id,
                DataKind::Sync => {
                    let d = &mut self.sync_delegation;
                    if let Some(info) =
                        verified_sync(eng, &mut self.stats, d, now, dg, payload, true)
                    {
                        eng.tiering.on_burst_sync(&info, now);
                    }
                    return None;
                }
            };
            let shape = eng.dl.shape();
            eng.tiering
                .on_burst_packet(now, dg.len(), shape.loop_pos(id), shape.loop_packets());
            self.stats.received_packets += 1;
            self.stats.received_bytes += payload.len() as u64;
            self.stats.burst_packets += 1;
            let start = dg.len() - payload.len();
            return self.on_loop_packet(now, id, Source::Burst, payload, start);
        }
        let id = match hdr.kind {
            DataKind::Sync => {
                let d = &mut self.sync_delegation;
                if let Some(info) = verified_sync(eng, &mut self.stats, d, now, dg, payload, false)
                {
                    eng.nak.on_sync(&info, eng.packet_bytes);
                    eng.tiering.on_sync(&info, now);
                    self.last_channel = now;
                }
                return None;
            }
            DataKind::Packet(id) => id,
        };
        self.stats.received_packets += 1;
        self.stats.received_bytes += payload.len() as u64;
        eng.tiering.on_data(dg.len());
        self.stats.repairs_received += hdr.repair as u64;
        self.stats.first_packet.get_or_insert(now);
        if !hdr.repair && self.last_loop_no != Some(hdr.loop_no) {
            if self.last_loop_no.is_some() {
                tracing::debug!(
                    loop_no = hdr.loop_no,
                    missing = eng.dl.units() - eng.dl.have_count(),
                    nak_table = eng.nak.table_len(),
                    "loop wrapped"
                );
            }
            self.last_loop_no = Some(hdr.loop_no);
        }
        let start = dg.len() - payload.len();
        let source = if hdr.repair {
            Source::Repair
        } else {
            Source::Loop
        };
        self.on_loop_packet(now, id, source, payload, start)
    }

    /// A loop packet of this archive: verify it, move the NAK engine, say what to write.
    /// `start`: where `payload` sits in the datagram (for the returned [`Write`]).
    fn on_loop_packet(
        &mut self,
        now: Instant,
        id: PacketId,
        source: Source,
        payload: &[u8],
        start: usize,
    ) -> Option<Write> {
        let eng = self.eng.as_mut().expect("receiving");
        let verdict = eng.dl.on_packet(id, payload);
        // Only verified packets may move the NAK engine (and prove the channel works): a
        // forged position must not mark a loop's worth of units missing. A burst's proves
        // nothing about the channel, and like a repair's is no loop position.
        let dl = &eng.dl;
        let repair = source != Source::Loop;
        let channel = source != Source::Burst;
        let mut positioned = matches!(verdict, Verdict::Write { .. } | Verdict::Parked);
        match verdict {
            Verdict::Write { .. } => {
                if channel {
                    self.heard = true;
                    self.last_channel = now;
                }
                self.last_heard = now;
                let w = &eng.wanted;
                eng.nak
                    .on_packet(now, id, repair, |u| Engines::settled(dl, w, u));
            }
            Verdict::Parked => {
                let w = &eng.wanted;
                if let PacketId::Data(s) = id {
                    eng.nak.on_parked(now, s, |u| Engines::settled(dl, w, u));
                }
            }
            // Genuine duplicates still tell the loop position (a loss at the end of a loop is
            // only seen from the next loop's packets, which are duplicates).
            Verdict::Duplicate if dl.duplicate_is_genuine(id, payload) => {
                positioned = true;
                if channel {
                    self.heard = true;
                    self.last_channel = now;
                }
                self.last_heard = now;
                let w = &eng.wanted;
                eng.nak
                    .on_packet(now, id, repair, |u| Engines::settled(dl, w, u));
            }
            Verdict::NeedHash(block) => {
                // Read back from disk by the driver; the packet waits for it.
                if self.awaiting_hash.len() < MAX_AWAITING_HASH {
                    if !self
                        .awaiting_hash
                        .iter()
                        .any(|(i, _, _)| eng_block(eng, *i) == Some(block))
                    {
                        let (offset, len) = dl
                            .layout()
                            .packet_range(PacketId::Hash(block))
                            .expect("block in range");
                        self.events
                            .push_back(Event::ReadHash { block, offset, len });
                    }
                    self.awaiting_hash.push((id, source, payload.to_vec()));
                }
            }
            // An extra FEC symbol, kept for its block's decode: the channel works.
            Verdict::Kept => self.last_heard = now,
            Verdict::Duplicate | Verdict::NoHashYet | Verdict::Rejected => {}
        }
        // A parked packet that failed its check loses its unit, unless a genuine copy was
        // parked or written meanwhile (forgeries must not cause NAKs).
        for unit in eng.dl.take_unpark_rejects() {
            if !Engines::settled(&eng.dl, &eng.wanted, unit) {
                eng.nak.on_lost(now, unit);
            }
        }
        // FEC: a loop packet may make source blocks due for judging; NAK what each is short.
        if source == Source::Loop && positioned {
            let due = eng
                .gate
                .as_mut()
                .map(|g| g.on_loop_packet(id))
                .unwrap_or_default();
            for f in due {
                eng.fec_short(now, f);
            }
        }
        for (offset, bytes) in eng.dl.take_released() {
            self.events.push_back(Event::Write { offset, bytes });
            self.dirty = true;
        }
        self.fec_reads();
        let eng = self.eng.as_mut().expect("receiving");
        let Verdict::Write { offset } = verdict else {
            if eng.dl.is_complete() {
                self.complete(now);
            }
            return None;
        };
        self.stats.last_write = Some(now);
        self.dirty = true;
        if eng.dl.is_complete() {
            self.complete(now);
        }
        Some(Write {
            offset,
            payload: start..start + payload.len(),
        })
    }

    fn silence_deadline(&self) -> Option<Instant> {
        self.cfg.silence_timeout.map(|l| self.last_heard + l)
    }

    /// When a silent channel is next looked at (`None` off multicast or before it was heard).
    fn silent_deadline(&self) -> Option<Instant> {
        if self.unicast_ok || !self.heard || self.group.is_none() {
            return None;
        }
        let from = self
            .rejoined_at
            .map_or(self.last_channel, |r| r.max(self.last_channel));
        Some(from + SILENT_REJOIN)
    }

    /// The channel went silent while it should be sending: re-join its group once, then
    /// fall back to unicast.
    fn silent_channel(&mut self, now: Instant) {
        let (Some(due), Some(g)) = (self.silent_deadline(), self.group) else {
            return;
        };
        if now < due {
            return;
        }
        if self.rejoined_at.is_some_and(|r| r >= self.last_channel) {
            tracing::info!(group = %g, "channel still silent after a re-join: asking for unicast");
            self.rejoined_at = None;
            self.heard = false;
            self.next_fallback_try = Some(now);
            return;
        }
        tracing::info!(group = %g, silent_ms = now.saturating_duration_since(self.last_channel).as_millis() as u64, "channel silent: joining its group again");
        self.stats.silent_rejoins += 1;
        self.rejoined_at = Some(now);
        self.events.push_back(Event::LeaveGroup(g));
        self.events.push_back(Event::JoinGroup(g, self.ssm_source));
    }

    fn fallback_due(&self) -> bool {
        !self.heard
            && !self.unicast_ok
            && !self.requests.in_flight(Purpose::UnicastRequest)
            && !self.requests.in_flight(Purpose::UnicastConfirm)
    }

    /// Keepalives, tier moves, NAKs, unicast fallback, checkpoints, progress, silence.
    fn receiving_timers(&mut self, now: Instant) {
        if let Some(limit) = self.cfg.silence_timeout {
            if now.saturating_duration_since(self.last_heard) > limit {
                self.fail(Failure::Silent(limit));
                return;
            }
        }
        self.silent_channel(now);
        self.tier_move(now);
        self.keepalive(now);
        self.naks(now);
        if let (Some(limit), Some(since), true) =
            (self.cfg.unicast_limit, self.unicast_since, self.unicast_ok)
        {
            if now.saturating_duration_since(since) >= limit {
                self.fail(Failure::UnicastLimit(limit));
                return;
            }
        }
        if self.fallback_due() && self.next_fallback_try.is_some_and(|t| now >= t) {
            if !self.cfg.unicast_fallback {
                self.fail(Failure::NoMulticast(self.cfg.sync_timeout));
                return;
            }
            self.start_unicast(now);
        }
        if self.dirty && now >= self.next_checkpoint {
            // Taken behind every write asked for so far: when the driver does it, every unit
            // marked held is in the file, and its sync covers the snapshot.
            self.events.push_back(Event::Checkpoint);
            self.dirty = false;
            self.next_checkpoint = now + self.cfg.checkpoint;
        } else if now >= self.next_checkpoint {
            self.next_checkpoint = now + self.cfg.checkpoint;
        }
        if now >= self.next_progress {
            let (have, total) = self.progress_units();
            self.events.push_back(Event::Progress(Progress {
                have,
                total,
                received_packets: self.stats.received_packets,
                received_bytes: self.stats.received_bytes,
                rejected: self.eng.as_ref().map_or(0, |e| e.dl.counters.rejected),
                unicast: self.unicast_ok,
            }));
            self.next_progress = now + PROGRESS_EVERY;
        }
    }

    fn keepalive(&mut self, now: Instant) {
        let Some(archive_id) = self.archive_id() else {
            return;
        };
        let eng = self.eng.as_ref().expect("receiving");
        // The first measurement on a tier goes out at once, not a keepalive period later: the
        // server sets the tier's rate (and shows its members' figures) from these reports.
        // So does a new capacity: the tier's (or the unicast stream's) rate follows it, and
        // the tier engine waits only so long for that before moving down.
        let (rx_bps, loss_ppm, capacity_bps) = eng.tiering.report();
        let tier = eng.tiering.tier();
        let new_capacity =
            capacity_bps.abs_diff(self.reported_capacity) * 20 > self.reported_capacity;
        if now < self.next_keepalive && !(rx_bps > 0 && self.reported_tier != tier) && !new_capacity
        {
            return;
        }
        if rx_bps > 0 {
            self.reported_tier = tier;
        }
        self.reported_capacity = capacity_bps;
        let msg = Control::Keepalive {
            archive_id,
            have: eng.dl.have_count(),
            total: eng.dl.units(),
            rtt_us: self.rtt_us,
            rx_bps,
            loss_ppm,
            capacity_bps,
        };
        let mut out = Vec::new();
        let id = self.requests.send(msg, &mut out);
        self.transmits.extend(out);
        self.keepalive_sent = Some((id, now));
        self.next_keepalive = now + self.keepalive_every;
    }

    /// The tier engine judges each interval; a move is a `ChangeTier` request, and a socket
    /// on the new group once granted (the download state is the same on every tier).
    fn tier_move(&mut self, now: Instant) {
        let eng = self.eng.as_mut().expect("receiving");
        eng.tiering.on_missed_total(eng.nak.counters.units_missed);
        eng.tiering.on_missing(
            eng.dl.units().saturating_sub(eng.dl.have_count()),
            eng.dl.units(),
        );
        // On unicast the engine still judges (its capacity reports set the stream's rate)
        // but never moves: the stream's rate is the receiver's own.
        let from = eng.tiering.tier();
        let mv = eng.tiering.poll(now);
        if let Some(s) = eng.tiering.take_sample() {
            self.events.push_back(Event::TierJudged(s));
        }
        let t = match mv.filter(|_| !self.unicast_ok) {
            None => return,
            Some(TierMove::Burst { .. }) if !self.heard => {
                // Nothing heard on the channel yet (it may be in its SYNC lead, or multicast
                // may not reach us at all): no path to compare a burst with.
                eng.tiering.on_burst_not_asked();
                return;
            }
            Some(TierMove::Burst { tier, ms }) => {
                self.ask_burst(now, tier as u8, ms);
                return;
            }
            Some(TierMove::To(t)) => t as u8,
        };
        if from.is_some_and(|f| (t as usize) < f) {
            // A move down (a failed probe, or congestion): what was found missing was lost
            // to a rate the path could not carry — on a probed tier, a scatter over its whole
            // loop. When most of it was lost, the slower tier's loop brings it anyway, and
            // asking for it would only fill that tier with repairs every member already gets
            // from the loop. Sparse holes are cheaper to repair: waiting for the loop would
            // bring every packet around them again.
            if eng.tiering.last_loss() > DENSE_LOSS {
                eng.nak.forget_losses();
            }
            // Leave the faster group now, not when the slower one is granted: until the
            // leave, the channel the path (or the CPU) cannot carry keeps flooding it and
            // scattering holes over the loop — on a loaded host the reply can take a while.
            if let Some(g) = self.group.filter(|_| self.left_early.is_none()) {
                self.events.push_back(Event::LeaveGroup(g));
                self.left_early = Some(g);
            }
        }
        let Some(archive_id) = self.archive_id() else {
            return;
        };
        self.request(
            now,
            Purpose::ChangeTier(t),
            Via::Control,
            Control::ChangeTier {
                archive_id,
                tier: t,
            },
        );
    }

    /// NAK timers that expired, and NAKs whose back-off ran out: to the server, and to the
    /// group so other receivers suppress theirs. Loss during a join experiment (or just after
    /// a tier move) is congestion, not something to repair: it waits until the move settles.
    fn naks(&mut self, now: Instant) {
        let to = self.nak_destinations();
        let eng = self.eng.as_mut().expect("receiving");
        let (dl, w) = (&eng.dl, &eng.wanted);
        eng.nak.handle_timeout(now, |u| Engines::settled(dl, w, u));
        if eng.tiering.settling(now) {
            return;
        }
        while let Some(ranges) = eng.nak.poll_nak(now) {
            tracing::trace!(
                first = ranges[0].0,
                ranges = ranges.len(),
                missing = eng.dl.units() - eng.dl.have_count(),
                "NAK"
            );
            let nak = Nak {
                archive_tag: eng.tag,
                session_tag: 0, // set from the session key when sealed
                ranges,
                symbols: Vec::new(),
            };
            send_nak(&mut self.transmits, to, self.requests.session_key(), &nak);
        }
        self.symbol_naks(now);
    }

    /// Where a NAK goes: the server, and the group so other receivers suppress theirs (not
    /// on unicast, where nobody hears it, nor with suppression off).
    fn nak_destinations(&self) -> (SocketAddr, Option<SocketAddr>) {
        let group = (!self.unicast_ok && self.group_naks())
            .then_some(self.group)
            .flatten();
        (self.cfg.server, group)
    }

    /// Whether NAKs are multicast to the group for others to hear (suppression). Not on a
    /// source-specific group: its members receive only the server's packets, so nobody would
    /// hear them; NAKs go to the server at once, which coalesces them.
    fn group_naks(&self) -> bool {
        self.cfg.nak_suppression && self.ssm_source.is_none()
    }

    /// FEC amounts: blocks whose answer did not make them decodable are asked about again;
    /// amounts whose back-off ran out go in one NAK, to the server and the group.
    fn symbol_naks(&mut self, now: Instant) {
        let to = self.nak_destinations();
        let eng = self.eng.as_mut().expect("receiving");
        for f in eng.symbols.expired(now) {
            eng.fec_short(now, f);
        }
        loop {
            let (dl, nak) = (&eng.dl, &eng.nak);
            let symbols = eng.symbols.poll(
                now,
                MAX_NAK_RANGES,
                |f| dl.fec_amount(f).unwrap_or(0),
                |n| nak.holdoff_for(n as usize),
            );
            if symbols.is_empty() {
                break;
            }
            tracing::trace!(blocks = symbols.len(), first = ?symbols[0], "symbol NAK");
            let nak = Nak {
                archive_tag: eng.tag,
                session_tag: 0, // set from the session key when sealed
                ranges: Vec::new(),
                symbols,
            };
            send_nak(&mut self.transmits, to, self.requests.session_key(), &nak);
        }
    }

    /// Nothing verifiable heard on the group: ask for the loop by unicast, from the unicast
    /// socket (the server sends a cookie there and streams only once it comes back).
    fn start_unicast(&mut self, now: Instant) {
        let Some(archive_id) = self.archive_id() else {
            return;
        };
        if !self.unicast_opened {
            self.unicast_opened = true;
            self.events.push_back(Event::OpenUnicast);
        }
        tracing::info!(title = %self.cfg.title, "no multicast heard: asking for unicast fallback");
        self.next_fallback_try = None;
        self.request(
            now,
            Purpose::UnicastRequest,
            Via::Unicast,
            Control::UnicastRequest { archive_id },
        );
    }
}

/// A SYNC's info, if its signature is the archive server's (the head's signer), or an
/// edge's that the head's signer delegated to (`delegation`, unexpired), and it is newer than
/// the last one taken on its path (`burst`: a discovery burst's, else the channel's;
/// `wire::data::SIGNED_SYNC_LEN`); else counted and `None`.
fn verified_sync(
    eng: &mut Engines,
    stats: &mut SessionStats,
    delegation: &mut SyncDelegation,
    now: Instant,
    dg: &[u8],
    payload: &[u8],
    burst: bool,
) -> Option<SyncInfo> {
    let header = &dg[..dg.len() - payload.len()];
    let mut delegated = false;
    let signed = split_signed_sync(payload).filter(|(info, sig)| {
        let msg = sync_signed_bytes(header, info);
        if eng.head.server_key.verify(&msg, sig).is_ok() {
            return true;
        }
        delegated = delegation
            .key(&eng.head.server_key, now)
            .is_some_and(|k| k.verify(&msg, sig).is_ok());
        delegated
    });
    let Some(info) = signed.and_then(|(info, _)| SyncInfo::decode(info).ok()) else {
        stats.syncs_forged += 1;
        return None;
    };
    let last = if burst {
        &mut eng.last_burst_sync_us
    } else {
        &mut eng.last_sync_us
    };
    if last.is_some_and(|l| info.send_us <= l) {
        stats.syncs_stale += 1;
        return None;
    }
    *last = Some(info.send_us);
    stats.syncs_delegated += delegated as u64;
    Some(info)
}

/// Queue `nak` to the server and, when `to.1` names one, to the channel's group.
/// Sealed with the session's key once joined: the server repairs only for its members.
fn send_nak(
    transmits: &mut VecDeque<Transmit>,
    to: (SocketAddr, Option<SocketAddr>),
    key: Option<&SessionKey>,
    nak: &Nak,
) {
    let bytes = key.map_or_else(|| nak.encode(), |k| nak.encode_sealed(k));
    transmits.push_back(Transmit {
        via: Via::Control,
        to: to.0,
        bytes: bytes.clone(),
    });
    if let Some(g) = to.1 {
        transmits.push_back(Transmit {
            via: Via::Group,
            to: g,
            bytes,
        });
    }
}
