//! `mcast-recv get`: the receive driver. It owns the sockets, the part file, the state file,
//! the disk thread, the clock and the progress display, and makes no protocol decision: the
//! [`Session`] (`mcast_proto::receiver::session`) decides what to send, when, and what is
//! written; this file moves its datagrams, carries out its events and wakes it on time.
//!
//! 1. The session joins over the control port and fetches and verifies the signed head.
//! 2. On [`Event::HeadReady`] the driver preallocates `<title>.mca.part` (or resumes it from
//!    `<title>.mca.state`) and starts the session's receive phase.
//! 3. Data sockets (the group, and the unicast socket after a fallback) are drained in
//!    batches; every verified payload is queued for the disk thread at its offset.
//! 4. Checkpoints (fdatasync + state file) when the session asks, behind the writes they cover.
//! 5. [`Event::Done`]: make it durable, check the signature, rename it into place.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use mcast_io::iface::Iface;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_io::archive::{self, ArchiveFile, Head};
use mcast_io::fastio::{OverflowCounter, RecvBatch};
use mcast_keys::PublicIdentity;
use mcast_proto::receiver::session::Prior;
use mcast_proto::receiver::{Event, Failure as SessionFailure, Session, SessionConfig, Via};
use mcast_proto::wire::control::MAX_CONTROL_LEN;
use mcast_proto::wire::director::NoMulticastPolicy;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::disk::Disk;
use crate::error::{Failure, RecvError};
use crate::known_servers::KnownServers;
use crate::state::State;

/// Messages per recvmmsg on the data sockets.
const RECV_BATCH: usize = 64;
/// Packets handled per turn of the receive loop before timers and control are looked at.
const DRAIN_PACKETS: u64 = 4096;
/// The longest the loop sleeps in `poll` (stop flag, overall timeout).
const POLL_MAX: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct GetOptions {
    pub server: SocketAddr,
    pub title: String,
    pub out_dir: PathBuf,
    /// Interface to join multicast on (and send group NAKs from).
    pub iface: Iface,
    /// Pinned server identity; `None` trusts the key in the first head seen (and pins it in
    /// the state file for resumes).
    pub server_key: Option<PublicIdentity>,
    pub sync_timeout: Duration,
    pub checkpoint: Duration,
    /// Give up (state kept, resumable) after this long.
    pub timeout: Option<Duration>,
    pub json: bool,
    pub progress_bar: bool,
    pub recv_buffer: usize,
    /// Write the part file with `O_DIRECT` (bypassing the page cache) where possible.
    pub direct_io: bool,
    /// Give up on the server (exit "unreachable", state kept) when nothing verifiable — a
    /// verified packet or a control reply — came from it for this long. Set by the director
    /// fail-over (`crate::failover`); `None`: wait for it.
    pub silence_timeout: Option<Duration>,
    /// Ask the server to start a new loop at this block (a resume: where this receiver's
    /// missing units begin; see `crate::failover::resume_block`).
    pub start_block: Option<u64>,
    /// The known-servers store (`crate::known_servers`): a server's key seen once is
    /// required from then on. `None`: trust on first use, pinned per title only.
    pub known_servers: Option<PathBuf>,
    /// DSCP of what the receiver sends (control requests, NAKs).
    pub dscp: mcast_io::dscp::Dscp,
    /// TTL of the NAKs multicast to the group (1: this subnet; raise it only where the
    /// group's receivers sit behind multicast routers).
    pub nak_ttl: u32,
    /// What to do when multicast does not arrive: the policy of this receiver's site, from
    /// its director (`crate::failover`); `Stream` (the adaptive unicast fallback) otherwise.
    pub no_multicast: mcast_proto::wire::director::NoMulticastPolicy,
    /// HTTP mirrors of the archives (URL prefixes; `<title>.mca` is appended), from the
    /// director with the site policy; empty without.
    pub http_mirrors: Vec<String>,
    /// Policy `both`: how long the unicast stream runs before what it has not delivered is
    /// fetched over HTTP (`get --repair-after`).
    pub repair_after: Duration,
}

impl GetOptions {
    pub fn new(server: SocketAddr, title: &str, out_dir: &Path) -> GetOptions {
        GetOptions {
            server,
            title: title.to_string(),
            out_dir: out_dir.to_path_buf(),
            iface: Iface::loopback(),
            server_key: None,
            known_servers: None,
            dscp: mcast_io::dscp::Dscp::DEFAULT,
            nak_ttl: 1,
            sync_timeout: Duration::from_millis(1500),
            checkpoint: Duration::from_millis(250),
            timeout: None,
            json: false,
            progress_bar: false,
            recv_buffer: 4 << 20,
            direct_io: false,
            silence_timeout: None,
            start_block: None,
            no_multicast: mcast_proto::wire::director::NoMulticastPolicy::Stream,
            http_mirrors: Vec::new(),
            repair_after: Duration::from_secs(30),
        }
    }
}

/// Figures of one run, printed as the final JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct GetReport {
    pub event: &'static str,
    pub title: String,
    pub path: PathBuf,
    pub archive_bytes: u64,
    pub loop_units: u64,
    /// Units a complete download holds: data and data hash packets (`loop_units` less FEC
    /// repair symbols and their hash packets).
    pub needed_units: u64,
    pub loop_bytes: u64,
    /// Units already held when this run started (resume).
    pub units_at_start: u64,
    /// Units the state file said were held that no longer verified on disk (re-fetched).
    pub units_failed_recheck: u64,
    /// Payload bytes that arrived on data sockets during this run (incl. duplicates).
    pub received_bytes: u64,
    pub received_packets: u64,
    /// Payload bytes of the units that were missing at start.
    pub missing_bytes_at_start: u64,
    pub written: u64,
    pub duplicates: u64,
    pub no_hash_yet: u64,
    /// Packets not parked because their packet id already had the most candidates allowed
    /// waiting for its hash packet (forgeries on the group, most likely).
    pub parked_excess: u64,
    pub rejected: u64,
    pub foreign: u64,
    pub malformed: u64,
    /// SYNCs dropped: not signed by the archive's server, or replayed.
    pub syncs_forged: u64,
    pub syncs_stale: u64,
    /// SYNCs taken that an edge signed under its origin's delegation.
    pub syncs_delegated: u64,
    pub unicast: bool,
    /// NAK datagrams sent, units asked for, units whose NAK another receiver's suppressed.
    pub naks_sent: u64,
    pub units_naked: u64,
    pub units_suppressed: u64,
    /// Units, and FEC amounts, in heard NAKs that no longer held ours back: the unit or block
    /// had been held by heard NAKs twice already (a forged NAK flood on the group shows here).
    pub units_heard_ignored: u64,
    pub amounts_heard_ignored: u64,
    /// Repair packets received (including ones for units already held).
    pub repairs_received: u64,
    /// Datagrams of discovery bursts received (a short unicast burst at the top tier's
    /// rate that told the tier engine what the path carries).
    pub burst_packets: u64,
    /// FEC source blocks decoded, and data packets (and hash packets) they restored.
    pub fec_decodes: u64,
    pub fec_restored: u64,
    /// FEC repair symbols written to the part file (counted in `written`).
    pub fec_repairs_written: u64,
    /// FEC amounts asked for ("block f: n more symbols", one per block per NAK), the
    /// symbols they asked for, amounts left unsent because another receiver asked for as
    /// many, and extra symbols received and kept for decoding.
    pub amounts_naked: u64,
    pub symbols_naked: u64,
    pub amounts_suppressed: u64,
    pub fec_extras_kept: u64,
    /// Whole run, from start-up (join, head download) to the verified archive.
    pub seconds: f64,
    /// From the first loop packet to the last missing one (the part the loop and repairs
    /// decide; compare it with `loop_bytes * 8 / rate`).
    pub receive_seconds: f64,
    /// Throughput tier at the end (0 for a title with one tier), and tier moves made.
    pub tier: usize,
    /// The tier it spent the most time on.
    pub settled_tier: usize,
    pub tier_changes: u32,
    /// Times the channel went silent and its group was joined again.
    pub silent_rejoins: u64,
    /// Datagrams the data sockets dropped because their buffer was full (`SO_RXQ_OVFL`):
    /// this receiver was short of CPU for the channel's rate, and its tier engine moved it
    /// down on them.
    pub socket_drops: u64,
    /// HTTP fetch and repair (`get --http`, `crate::http_fetch`): body bytes fetched from
    /// mirrors (tail and head included), requests made, packets a mirror served that failed
    /// verification, mirrors dropped, and the payload bytes still missing when the HTTP
    /// phase started (0 when no HTTP was used).
    pub http_bytes: u64,
    pub http_requests: u64,
    pub http_packets_rejected: u64,
    pub mirrors_dropped: u64,
    pub missing_bytes_at_http_start: u64,
}

impl GetReport {
    /// The report of a run that found the archive already complete on disk (and the base
    /// the HTTP fetch fills in with its own figures).
    pub(crate) fn already_complete(
        title: &str,
        path: &Path,
        head: &Head,
        head_len: u64,
        started: Instant,
    ) -> GetReport {
        let needed = mcast_proto::carousel::LoopShape::of(head).required_units();
        GetReport {
            event: "done",
            title: title.to_string(),
            path: path.to_path_buf(),
            archive_bytes: archive::Layout::of(head, head_len).file_len(),
            loop_units: head.loop_packets(),
            needed_units: needed,
            loop_bytes: head.loop_bytes(),
            units_at_start: needed,
            units_failed_recheck: 0,
            received_bytes: 0,
            received_packets: 0,
            missing_bytes_at_start: 0,
            written: 0,
            duplicates: 0,
            no_hash_yet: 0,
            parked_excess: 0,
            rejected: 0,
            foreign: 0,
            malformed: 0,
            syncs_forged: 0,
            syncs_stale: 0,
            syncs_delegated: 0,
            unicast: false,
            naks_sent: 0,
            units_naked: 0,
            units_suppressed: 0,
            units_heard_ignored: 0,
            amounts_heard_ignored: 0,
            repairs_received: 0,
            burst_packets: 0,
            fec_decodes: 0,
            fec_restored: 0,
            fec_repairs_written: 0,
            amounts_naked: 0,
            symbols_naked: 0,
            amounts_suppressed: 0,
            fec_extras_kept: 0,
            seconds: started.elapsed().as_secs_f64(),
            receive_seconds: 0.0,
            tier: 0,
            settled_tier: 0,
            tier_changes: 0,
            silent_rejoins: 0,
            socket_drops: 0,
            http_bytes: 0,
            http_requests: 0,
            http_packets_rejected: 0,
            mirrors_dropped: 0,
            missing_bytes_at_http_start: 0,
        }
    }
}

/// The terminal progress bar of a download, in payload bytes held of `needed` (so rate and
/// ETA are of useful bytes); `msg` names the title and how it arrives.
pub(crate) fn bytes_bar(needed: u64, held: u64, msg: String) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(needed);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:32}] {decimal_bytes}/{decimal_total_bytes} {percent}% \
             {decimal_bytes_per_sec} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    b.set_message(msg);
    b.set_position(held);
    b.reset_eta();
    b
}

/// One JSON progress line (`get --json`, and the HTTP fetch with `via: "http"`).
#[derive(Serialize)]
pub(crate) struct ProgressLine<'a> {
    pub(crate) event: &'static str,
    pub(crate) title: &'a str,
    pub(crate) have: u64,
    pub(crate) total: u64,
    pub(crate) percent: f64,
    pub(crate) received_packets: u64,
    pub(crate) rejected: u64,
    pub(crate) via: &'static str,
    /// Units the last completed checkpoint made durable: a restart after a crash resumes
    /// with at least these.
    pub(crate) saved: u64,
    /// Payload bytes held (verified) and needed in all.
    pub(crate) bytes: u64,
    pub(crate) total_bytes: u64,
    /// Bytes received per second since the previous progress line (every byte off the wire,
    /// duplicates and repairs included: what the link carries to this receiver).
    pub(crate) rate_mbps: f64,
    /// Seconds to go at the rate new payload arrived since the previous line (`null` while
    /// nothing new arrives).
    pub(crate) eta_s: Option<f64>,
    /// The throughput tier joined, as the server numbers them (always 0 for a title with one).
    pub(crate) tier: usize,
}

/// What the previous progress report saw, for rates.
#[derive(Clone, Copy)]
struct RateMark {
    at: Instant,
    received_bytes: u64,
    held_bytes: u64,
}

/// The finished archive, its part file and its state file for `title` in `out_dir`.
pub(crate) fn file_names(out_dir: &Path, title: &str) -> (PathBuf, PathBuf, PathBuf) {
    let fin = archive::archive_path(out_dir, title);
    let part = out_dir.join(format!("{title}.{}.part", archive::ARCHIVE_EXT));
    let state = out_dir.join(format!("{title}.{}.state", archive::ARCHIVE_EXT));
    (fin, part, state)
}

/// Run a download to completion.
pub fn get(opts: &GetOptions, stop: Arc<AtomicBool>) -> Result<GetReport, RecvError> {
    let started = Instant::now();
    mcast_keys::title::validate_title(&opts.title)
        .map_err(|e| RecvError::new(Failure::Usage, e.to_string()))?;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RecvError::io("cannot create output directory", &opts.out_dir, e))?;
    let (final_path, part_path, state_path) = file_names(&opts.out_dir, &opts.title);

    let mut cfg = SessionConfig::new(&opts.title, opts.server, rand::random(), rand::random());
    cfg.server_key = opts.server_key;
    let known = opts
        .known_servers
        .as_deref()
        .map(KnownServers::load)
        .transpose()?;
    let known_line = known
        .as_ref()
        .and_then(|k| k.get(&opts.server.to_string()))
        .filter(|_| opts.server_key.is_none());
    if let Some((k, _)) = known_line {
        cfg.server_key = Some(k);
    }
    cfg.sync_timeout = opts.sync_timeout;
    cfg.checkpoint = opts.checkpoint;
    cfg.silence_timeout = opts.silence_timeout;
    cfg.start_block = opts.start_block;
    // The site's policy for receivers without multicast (from its director): `http` ends the
    // session where it would ask for the unicast stream, and the HTTP fetch takes over.
    cfg.unicast_fallback =
        opts.no_multicast != NoMulticastPolicy::Http || opts.http_mirrors.is_empty();
    // `both`: the unicast stream gets `repair_after`, then HTTP fetches what it has not sent.
    cfg.unicast_limit = (opts.no_multicast == NoMulticastPolicy::Both
        && !opts.http_mirrors.is_empty())
    .then_some(opts.repair_after);
    // Wall clock for the expiry of an edge's delegation (the session reads no clock).
    cfg.unix_secs = Some(mcast_io::process::unix_secs());
    cfg.prior = State::load(&state_path).map(|s| Prior {
        archive_id: s.archive_id,
        server_key: PublicIdentity(s.server_key),
        have: s.have,
    });
    let bind: SocketAddr = if opts.server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().expect("address")
    };
    let ctl = UdpSocket::bind(bind)
        .and_then(|s| s.set_nonblocking(true).map(|_| s))
        .and_then(|s| opts.dscp.apply(&s).map(|_| s))
        .map_err(|e| RecvError::new(Failure::Other, format!("control socket: {e}")))?;
    let mut d = Driver {
        opts,
        final_path,
        part_path,
        state_path,
        started,
        ctl,
        group: None,
        unicast: None,
        nak_out: None,
        files: None,
        already: None,
        bar: None,
        rate_mark: None,
        missing_bytes_at_start: 0,
        sockets_changed: false,
        group_ovfl: OverflowCounter::default(),
        unicast_ovfl: OverflowCounter::default(),
        known,
    };
    let mut sess = Session::new(cfg, Instant::now());
    let result = d.run(&mut sess, &stop);
    if let Some(b) = &d.bar {
        b.finish_and_clear();
    }
    match result {
        Ok(()) => d.finish(&sess),
        Err(mut e) => {
            e.received_bytes = sess.stats(Instant::now()).received_bytes;
            e.resume = sess.resume_info();
            if let (Failure::Integrity, Some((_, line)), Some(k)) = (e.kind, known_line, &d.known) {
                e.message.push_str(&format!(
                    "; that key is the one known for {} ({}, line {line}): if the server's key \
                     was changed on purpose, delete that line",
                    opts.server,
                    k.path().display()
                ));
            }
            Err(e)
        }
    }
}

/// The part file, the disk thread and the state record, once the head is known.
struct Files {
    part: File,
    disk: Disk,
    state: State,
    head: Arc<Head>,
    head_len: u64,
    trusted: PublicIdentity,
}

/// The sockets, files and display of one download.
struct Driver<'a> {
    opts: &'a GetOptions,
    final_path: PathBuf,
    part_path: PathBuf,
    state_path: PathBuf,
    started: Instant,
    ctl: UdpSocket,
    /// The group joined and its socket.
    group: Option<(SocketAddr, UdpSocket)>,
    unicast: Option<UdpSocket>,
    nak_out: Option<UdpSocket>,
    files: Option<Files>,
    /// The archive was already complete on disk (head, its length).
    already: Option<(Arc<Head>, u64)>,
    bar: Option<indicatif::ProgressBar>,
    rate_mark: Option<RateMark>,
    missing_bytes_at_start: u64,
    /// A socket was opened or closed while draining: re-read the socket list.
    sockets_changed: bool,
    /// The drop counters of the group and unicast sockets (fresh with each new socket).
    group_ovfl: OverflowCounter,
    unicast_ovfl: OverflowCounter,
    known: Option<KnownServers>,
}

impl Driver<'_> {
    /// Until the session is done (Ok) or failed, interrupted or out of time (Err).
    fn run(&mut self, sess: &mut Session, stop: &AtomicBool) -> Result<(), RecvError> {
        // Batched receive: RECV_BATCH datagrams (or GRO super-datagrams) per recvmmsg, into
        // buffers reused for the whole run.
        let mut rx = RecvBatch::new(RECV_BATCH, 65_536);
        let mut ctl_buf = vec![0u8; MAX_CONTROL_LEN + 1];
        let mut received = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return self.fail_checkpointed(
                    sess,
                    RecvError::new(
                        Failure::Interrupted,
                        "interrupted; run the same command again to resume",
                    ),
                );
            }
            if let Some(t) = self.opts.timeout {
                if self.started.elapsed() > t {
                    let (have, total) = sess.progress_units();
                    return self.fail_checkpointed(
                        sess,
                        RecvError::new(
                            Failure::Timeout,
                            format!("gave up after {t:?} with {have}/{total} packets; run again to resume"),
                        ),
                    );
                }
            }
            sess.handle_timeout(Instant::now());
            if self.service(sess)? {
                return Ok(());
            }

            // Wait for a datagram on any socket, at most until the session's next timer.
            let wait = sess
                .poll_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(POLL_MAX)
                .min(POLL_MAX);
            self.wait(wait)?;

            // Control replies.
            while let Ok((n, from)) = self.ctl.recv_from(&mut ctl_buf) {
                sess.handle_datagram(Instant::now(), from, &ctl_buf[..n]);
            }
            if self.service(sess)? {
                return Ok(());
            }

            // Data from multicast and unicast, drained in bursts bounded by packets, not
            // calls (a call can return 64 GRO super-datagrams of ~50 packets each): timers,
            // keepalives and control replies are serviced every few ms, so NAKs go out on
            // time and the RTT this receiver reports is not inflated by a long drain.
            let drain_until = received + DRAIN_PACKETS;
            self.sockets_changed = false;
            for fd in self.data_fds() {
                while received < drain_until && !self.sockets_changed {
                    let got = match rx.recv(fd) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    let now = Instant::now();
                    // Datagrams the socket dropped before these (its buffer was full): this
                    // receiver is short of CPU for the rate, and the session moves down.
                    let dropped = self.overflow(fd).delta(rx.overflow_count());
                    if dropped > 0 {
                        tracing::debug!(fd, dropped, "receive socket overrun");
                        sess.on_receive_drops(dropped);
                    }
                    for (from, dg) in rx.datagrams_from() {
                        received += 1;
                        if let Some(w) = sess.handle_datagram(now, from, dg) {
                            self.write(w.offset, &dg[w.payload])?;
                        }
                        if self.service(sess)? {
                            return Ok(());
                        }
                    }
                    if got < rx.capacity() {
                        break;
                    }
                }
                if self.sockets_changed {
                    break;
                }
            }
        }
    }

    /// The drop counter of data socket `fd`.
    fn overflow(&mut self, fd: RawFd) -> &mut OverflowCounter {
        if self
            .group
            .as_ref()
            .is_some_and(|(_, s)| s.as_raw_fd() == fd)
        {
            &mut self.group_ovfl
        } else {
            &mut self.unicast_ovfl
        }
    }

    fn data_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.group.iter().map(|(_, s)| s.as_raw_fd()).collect();
        v.extend(self.unicast.iter().map(|s| s.as_raw_fd()));
        v
    }

    /// Sleep until a datagram arrives on any socket, or `wait` passes.
    fn wait(&self, wait: Duration) -> Result<(), RecvError> {
        let flags = nix::poll::PollFlags::POLLIN;
        let mut fds = vec![nix::poll::PollFd::new(self.ctl.as_fd(), flags)];
        if let Some((_, s)) = &self.group {
            fds.push(nix::poll::PollFd::new(s.as_fd(), flags));
        }
        if let Some(u) = &self.unicast {
            fds.push(nix::poll::PollFd::new(u.as_fd(), flags));
        }
        let ms = wait.as_millis().min(u16::MAX as u128) as u16;
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(RecvError::new(Failure::Other, format!("poll: {e}"))),
        }
    }

    /// Send what the session has to send and carry out its events; true once it is done.
    fn service(&mut self, sess: &mut Session) -> Result<bool, RecvError> {
        self.send_transmits(sess);
        while let Some(ev) = sess.poll_event() {
            if self.on_event(sess, ev)? {
                return Ok(true);
            }
            // An event may have queued transmits (a start, a restored hash).
            self.send_transmits(sess);
        }
        Ok(false)
    }

    /// Each datagram the session queued, from the socket it names. The unicast socket may
    /// be asked for by an event still queued behind this datagram: it is opened now.
    fn send_transmits(&mut self, sess: &mut Session) {
        while let Some(t) = sess.poll_transmit() {
            if t.via == Via::Unicast {
                if let Err(e) = self.open_unicast() {
                    tracing::warn!(error = %e.message, "cannot open the unicast socket");
                }
            }
            let sock = match t.via {
                Via::Control => Some(&self.ctl),
                Via::Unicast => self.unicast.as_ref(),
                Via::Group => self.nak_out.as_ref(),
            };
            if let Some(s) = sock {
                let _ = s.send_to(&t.bytes, t.to);
            }
        }
    }

    /// The unicast socket (fallback stream, discovery bursts), opened once.
    fn open_unicast(&mut self) -> Result<(), RecvError> {
        if self.unicast.is_some() {
            return Ok(());
        }
        // The stream comes from the server's address family (IPv6 servers stream over IPv6).
        let bind: SocketAddr = if self.opts.server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(bind)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .and_then(|s| self.opts.dscp.apply(&s).map(|_| s))
            .map_err(|e| RecvError::new(Failure::Other, format!("unicast socket: {e}")))?;
        let r = socket2::SockRef::from(&s);
        set_recv_buffer(&r, self.opts.recv_buffer);
        tracing::info!(
            requested = self.opts.recv_buffer,
            granted = r.recv_buffer_size().unwrap_or(0),
            gro = mcast_io::fastio::enable_gro(&s),
            drop_counter = mcast_io::fastio::enable_rxq_ovfl(&s),
            "unicast receive buffer"
        );
        self.unicast = Some(s);
        self.unicast_ovfl = OverflowCounter::default();
        self.sockets_changed = true;
        Ok(())
    }

    fn on_event(&mut self, sess: &mut Session, ev: Event) -> Result<bool, RecvError> {
        let opts = self.opts;
        match ev {
            Event::HeadReady {
                head,
                head_bytes,
                trusted,
                prior_have,
            } => self.open_files(sess, head, &head_bytes, trusted, prior_have)?,
            Event::JoinGroup(g, source) => {
                let s = multicast_socket(g, source, &opts.iface, opts.recv_buffer)?;
                let family = |s: &UdpSocket| s.local_addr().map(|a| a.is_ipv6()).ok();
                if self.nak_out.as_ref().and_then(family) != Some(g.is_ipv6()) {
                    self.nak_out = Some(nak_socket(opts, g.ip())?);
                }
                self.group = Some((g, s));
                self.group_ovfl = OverflowCounter::default();
                self.sockets_changed = true;
                tracing::debug!(group = %g, "joined");
            }
            Event::LeaveGroup(g) => {
                if self.group.as_ref().is_some_and(|(x, _)| *x == g) {
                    self.group = None;
                    self.sockets_changed = true;
                }
            }
            Event::OpenUnicast => self.open_unicast()?,
            Event::UnicastActive => {
                let local = self.unicast.as_ref().and_then(|s| s.local_addr().ok());
                tracing::info!(?local, "unicast fallback active");
            }
            Event::TierChanged { .. } | Event::TierJudged(_) | Event::Rejoining => {}
            Event::Write { offset, bytes } => self.write(offset, &bytes)?,
            Event::ReadHash { block, offset, len } => {
                // It may still be queued for the disk: wait for that first.
                let f = self.files.as_mut().expect("files open");
                f.disk.barrier()?;
                let mut hp = vec![0u8; len];
                let ok = f.part.read_exact_at(&mut hp, offset).is_ok();
                sess.restore_hash(Instant::now(), block, ok.then_some(hp));
            }
            Event::ReadFec { block, reads } => {
                // The symbols may still be queued for the disk: wait for that first.
                let f = self.files.as_mut().expect("files open");
                f.disk.barrier()?;
                let symbols = reads
                    .into_iter()
                    .map(|(id, offset, len)| {
                        let mut b = vec![0u8; len];
                        let ok = f.part.read_exact_at(&mut b, offset).is_ok();
                        (id, ok.then_some(b))
                    })
                    .collect();
                sess.fec_symbols(Instant::now(), block, symbols);
            }
            Event::Checkpoint => {
                if let Some(f) = self.files.as_mut() {
                    let (units, _) = sess.progress_units();
                    if !f.disk.request_checkpoint(sess.have_bits(), units)? {
                        sess.checkpoint_deferred();
                    }
                }
            }
            Event::Progress(p) => self.progress(&p, sess),
            Event::Done => return Ok(true),
            Event::Failed(f) => {
                let e = self.failure(sess, f);
                return self.fail_checkpointed(sess, e);
            }
        }
        Ok(false)
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), RecvError> {
        // No checkpoint on a write failure: queued units are marked held in memory but not on
        // disk; the last checkpoint (taken behind its writes) is the consistent one.
        self.files
            .as_mut()
            .expect("files open")
            .disk
            .write(offset, bytes)
    }

    /// The verified head is here: finish at once if the archive is already on disk, else open
    /// (or resume) the part file and start receiving.
    fn open_files(
        &mut self,
        sess: &mut Session,
        head: Arc<Head>,
        head_bytes: &[u8],
        trusted: PublicIdentity,
        prior_have: Option<Vec<u64>>,
    ) -> Result<(), RecvError> {
        let now = Instant::now();
        let server = self.opts.server.to_string();
        if let Some(k) = self.known.as_mut() {
            if k.get(&server).is_none_or(|(known, _)| known != trusted) {
                match k.remember(&server, trusted) {
                    Ok(()) => {
                        tracing::info!(%server, key = %hex::encode(trusted.0), file = %k.path().display(), "server key remembered: a head signed by another key will be refused")
                    }
                    Err(e) => tracing::warn!(%server, error = %e, "server key not remembered"),
                }
            }
        }
        if let Ok(a) = ArchiveFile::open(&self.final_path) {
            if a.head.archive_id == head.archive_id && archive::verify(&a, &trusted).is_ok() {
                // A run killed between the rename and the state file's removal left it behind.
                let _ = std::fs::remove_file(&self.state_path);
                self.already = Some((head, head_bytes.len() as u64));
                sess.finish_already_complete(now);
                return Ok(());
            }
        }
        let (part, resumable) =
            open_part(&self.part_path, &head, head_bytes, prior_have.is_some())?;
        let have = if resumable { prior_have } else { None };
        let failed = sess.start(now, have, |off, buf| part.read_exact_at(buf, off).is_ok());
        if failed > 0 {
            tracing::warn!(
                units = failed,
                "units held before the restart no longer verify on disk: fetching them again"
            );
        }
        self.missing_bytes_at_start = sess.missing_bytes();
        let (have, needed) = sess.progress_units();
        // The bitmap covers every unit of the loop (FEC repair symbols too), not only the
        // `needed` ones progress counts.
        let units = head.loop_packets();
        let state = State {
            archive_id: head.archive_id,
            server_key: trusted.0,
            units,
            have: sess.have_bits().to_vec(),
        };
        state
            .save(&self.state_path)
            .map_err(|e| RecvError::io("cannot write state file", &self.state_path, e))?;
        tracing::info!(title = %self.opts.title, group = ?sess.group(), units = needed, have, "receiving");
        // Writes and periodic checkpoints run on the disk thread, in order (a slow disk must
        // not stall the socket drain); the final and error-path checkpoints drain it first.
        let disk = Disk::start(
            &part,
            &self.part_path,
            &self.state_path,
            state.clone(),
            self.opts.direct_io,
        )?;
        // In payload bytes held (verified, of what the title needs), so the rate and ETA
        // are of useful bytes; the message carries the tier.
        let needed_bytes = head.needed_bytes();
        let held_bytes = needed_bytes.saturating_sub(sess.missing_bytes());
        self.bar = self
            .opts
            .progress_bar
            .then(|| bytes_bar(needed_bytes, held_bytes, self.opts.title.clone()));
        self.files = Some(Files {
            part,
            disk,
            state,
            head_len: head_bytes.len() as u64,
            head,
            trusted,
        });
        Ok(())
    }

    fn progress(&mut self, p: &mcast_proto::receiver::Progress, sess: &Session) {
        let now = Instant::now();
        let total_bytes = sess.head().map_or(0, |h| h.needed_bytes());
        let held_bytes = total_bytes.saturating_sub(sess.missing_bytes());
        let tiered = sess.tier_counters().is_some();
        let tier = if tiered { sess.stats(now).tier } else { 0 };
        let mark = RateMark {
            at: now,
            received_bytes: p.received_bytes,
            held_bytes,
        };
        let prev = self.rate_mark.replace(mark).unwrap_or(RateMark {
            at: self.started,
            received_bytes: 0,
            held_bytes,
        });
        let secs = now
            .saturating_duration_since(prev.at)
            .as_secs_f64()
            .max(1e-3);
        let rate_mbps =
            p.received_bytes.saturating_sub(prev.received_bytes) as f64 * 8.0 / secs / 1e6;
        let new_per_s = held_bytes.saturating_sub(prev.held_bytes) as f64 / secs;
        let eta_s = (new_per_s > 0.0).then(|| {
            (total_bytes.saturating_sub(held_bytes) as f64 / new_per_s * 10.0).round() / 10.0
        });
        if let Some(b) = &self.bar {
            b.set_position(held_bytes);
            if tiered {
                b.set_message(format!("{} tier {tier}", self.opts.title));
            }
        }
        if self.opts.json {
            let line = ProgressLine {
                event: "progress",
                title: &self.opts.title,
                have: p.have,
                total: p.total,
                percent: 100.0 * p.have as f64 / p.total.max(1) as f64,
                received_packets: p.received_packets,
                rejected: p.rejected,
                via: if p.unicast { "unicast" } else { "multicast" },
                saved: self.files.as_ref().map_or(0, |f| f.disk.saved_units()),
                bytes: held_bytes,
                total_bytes,
                rate_mbps: (rate_mbps * 100.0).round() / 100.0,
                eta_s,
                tier,
            };
            println!("{}", serde_json::to_string(&line).unwrap());
        }
    }

    /// The session's failure, as the receiver's error (and exit code).
    fn failure(&self, sess: &Session, f: SessionFailure) -> RecvError {
        let server = self.opts.server;
        let title = &self.opts.title;
        // Through directors (they set the silence limit) the fail-over acts on these itself.
        let via_director = self.opts.silence_timeout.is_some();
        match f {
            SessionFailure::NotFound { redirect } => {
                let hint = redirect
                    .map(|r| format!(" (try --server {r})"))
                    .unwrap_or_default();
                RecvError::new(
                    Failure::NotFound,
                    format!("server {server} does not have title {title:?}{hint}; `mcast-recv catalog` lists what it has"),
                )
            }
            SessionFailure::Draining => {
                RecvError::new(
                    Failure::Unreachable,
                    if via_director {
                        format!("server {server} is draining (finishing its receivers, taking no new ones)")
                    } else {
                        format!(
                        "server {server} is draining (finishing its receivers, taking no new ones): \
                         use --director, or another --server"
                    )
                    },
                )
            }
            SessionFailure::Busy => {
                RecvError::new(Failure::Other, "server stayed busy; try again later")
            }
            SessionFailure::Unreachable(m) => RecvError::new(Failure::Unreachable, m),
            SessionFailure::Silent(limit) => {
                let (have, total) = sess.progress_units();
                let mut e = RecvError::new(
                    Failure::Unreachable,
                    format!(
                        "server {server} went silent (nothing verifiable for {limit:?}) with {have}/{total} packets; \
                         state kept{}",
                        if via_director { "" } else { ": run again, or use --director, to resume" }
                    ),
                );
                e.silent = true;
                e
            }
            SessionFailure::Integrity(m) => RecvError::new(Failure::Integrity, m),
            SessionFailure::Repacked => RecvError::new(
                Failure::Other,
                format!(
                    "title {title:?} was re-packed on the server; remove {} and start again",
                    self.part_path.display()
                ),
            ),
            SessionFailure::Unexpected(m) => RecvError::new(Failure::Other, m),
            SessionFailure::UnicastLimit(limit) => {
                let (have, total) = sess.progress_units();
                let mut e = RecvError::new(
                    Failure::Timeout,
                    format!(
                        "no multicast here: the unicast stream delivered {have}/{total} packets in {limit:?}; the site's policy fetches the rest over HTTP"
                    ),
                );
                e.http_handover = true;
                e
            }
            SessionFailure::NoMulticast(waited) => {
                let mut e = RecvError::new(
                    Failure::Unreachable,
                    format!("no multicast heard from server {server} within {waited:?}; the site's policy fetches over HTTP instead of the unicast stream"),
                );
                e.http_handover = true;
                e
            }
        }
    }

    /// Make what was written durable and save the state file.
    fn checkpoint(&mut self, sess: &Session) -> Result<(), RecvError> {
        let Some(f) = self.files.as_mut() else {
            return Ok(());
        };
        f.disk.finish()?;
        f.part
            .sync_data()
            .map_err(|e| RecvError::io("cannot sync", &self.part_path, e))?;
        f.state.have.copy_from_slice(sess.have_bits());
        f.state
            .save(&self.state_path)
            .map_err(|e| RecvError::io("cannot write state file", &self.state_path, e))
    }

    fn fail_checkpointed<T>(&mut self, sess: &Session, e: RecvError) -> Result<T, RecvError> {
        self.checkpoint(sess)?;
        Err(e)
    }

    /// Done: make it durable, check the signature, rename it into place.
    fn finish(mut self, sess: &Session) -> Result<GetReport, RecvError> {
        let now = Instant::now();
        let st = sess.stats(now);
        if let Some((head, head_len)) = self.already.take() {
            return Ok(GetReport::already_complete(
                &self.opts.title,
                &self.final_path,
                &head,
                head_len,
                self.started,
            ));
        }
        self.checkpoint(sess)?;
        let f = self.files.take().expect("files open");
        drop(f.disk);
        finish_part(
            f.part,
            &self.part_path,
            &self.final_path,
            &self.state_path,
            &f.head,
            f.head_len,
            &f.trusted,
        )?;
        let head = &f.head;
        Ok(GetReport {
            event: "done",
            title: self.opts.title.clone(),
            path: self.final_path.clone(),
            archive_bytes: f.head_len
                + head.loop_bytes()
                + archive::PREAMBLE_LEN
                + archive::TAIL_LEN,
            loop_units: head.loop_packets(),
            needed_units: mcast_proto::carousel::LoopShape::of(head).required_units(),
            loop_bytes: head.loop_bytes(),
            units_at_start: st.units_at_start,
            units_failed_recheck: st.units_failed_recheck,
            received_bytes: st.received_bytes,
            received_packets: st.received_packets,
            missing_bytes_at_start: self.missing_bytes_at_start,
            written: st.download.written,
            duplicates: st.download.duplicates,
            no_hash_yet: st.download.no_hash_yet,
            parked_excess: st.download.parked_excess,
            rejected: st.download.rejected,
            foreign: st.foreign,
            malformed: st.malformed,
            syncs_forged: st.syncs_forged,
            syncs_stale: st.syncs_stale,
            syncs_delegated: st.syncs_delegated,
            unicast: st.unicast,
            naks_sent: st.nak.naks_sent,
            units_naked: st.nak.units_naked,
            units_suppressed: st.nak.units_suppressed,
            units_heard_ignored: st.nak.units_heard_ignored,
            amounts_heard_ignored: st.symbol_naks.amounts_heard_ignored,
            repairs_received: st.repairs_received,
            burst_packets: st.burst_packets,
            fec_decodes: st.download.fec_decodes,
            fec_restored: st.download.fec_restored,
            fec_repairs_written: st.download.fec_repairs_written,
            amounts_naked: st.symbol_naks.amounts_naked,
            symbols_naked: st.symbol_naks.symbols_naked,
            amounts_suppressed: st.symbol_naks.amounts_suppressed,
            fec_extras_kept: st.download.fec_extras_kept,
            seconds: self.started.elapsed().as_secs_f64(),
            receive_seconds: match (st.first_packet, st.last_write) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
                _ => 0.0,
            },
            tier: st.tier,
            settled_tier: st.settled_tier,
            tier_changes: st.tier_changes,
            silent_rejoins: st.silent_rejoins,
            socket_drops: st.socket_drops,
            http_bytes: 0,
            http_requests: 0,
            http_packets_rejected: 0,
            mirrors_dropped: 0,
            missing_bytes_at_http_start: 0,
        })
    }
}

/// A complete part file (every required unit written and verified): make it durable, fill a
/// FEC archive's repair region, check its structure and signature, rename it into place and
/// remove the state file. `get` and the HTTP fetch both finish here.
pub(crate) fn finish_part(
    part: File,
    part_path: &Path,
    final_path: &Path,
    state_path: &Path,
    head: &Head,
    head_len: u64,
    trusted: &PublicIdentity,
) -> Result<(), RecvError> {
    // A FEC archive finished by decoding (or fetched over HTTP) holds only some repair
    // symbols: re-encode them all from the (complete, verified) data so the copy equals the
    // server's archive.
    archive::fec_file::fill_repairs(&part, part_path, head, &archive::Layout::of(head, head_len))
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    part.sync_data()
        .map_err(|e| RecvError::io("cannot sync", part_path, e))?;
    drop(part);
    let a = ArchiveFile::open(part_path)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    // Every unit was verified before it was written (or re-verified from disk at resume),
    // so the file needs only its structure and signature checked, not a second full pass.
    a.verify_signature(trusted)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    drop(a);
    std::fs::rename(part_path, final_path)
        .map_err(|e| RecvError::io("cannot rename", part_path, e))?;
    if let Some(dir) = final_path.parent() {
        let _ = mcast_io::fsutil::sync_dir(dir);
    }
    let _ = std::fs::remove_file(state_path);
    Ok(())
}
/// Create or reopen the part file, preallocated to the archive's size, with preamble, head
/// and tail already in place (they are known from the verified head).
/// Returns the file and whether it can be resumed (`prior`: there is a state to resume).
pub(crate) fn open_part(
    path: &Path,
    head: &Head,
    head_bytes: &[u8],
    prior: bool,
) -> Result<(File, bool), RecvError> {
    let head_len = head_bytes.len() as u64;
    let layout = archive::Layout::of(head, head_len);
    let resumable = prior
        && std::fs::metadata(path)
            .map(|m| m.len() == layout.file_len())
            .unwrap_or(false);
    // Never through a symbolic link; a part that is not resumed is a new file.
    let file = mcast_io::fsutil::open_part(path, resumable)
        .map_err(|e| RecvError::io("cannot open", path, e))?;
    if !resumable {
        if let Err(e) = nix::fcntl::posix_fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            layout.file_len() as i64,
        ) {
            let err = std::io::Error::from_raw_os_error(e as i32);
            if e != nix::errno::Errno::EOPNOTSUPP && e != nix::errno::Errno::EINVAL {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Err(RecvError::io("cannot preallocate", path, err));
            }
            file.set_len(layout.file_len())
                .map_err(|e| RecvError::io("cannot size", path, e))?;
        }
    }
    // The fixed parts (preamble, signed head, tail), rewritten on resume too: cheap, and a
    // crash cannot have left them torn.
    let w = |b: &[u8], off: u64| {
        file.write_all_at(b, off)
            .map_err(|e| RecvError::io("cannot write", path, e))
    };
    w(&archive::preamble_bytes(), 0)?;
    w(head_bytes, layout.head_offset())?;
    w(
        &archive::tail_bytes(head_len),
        layout.head_offset() + head_len,
    )?;
    Ok((file, resumable))
}

/// Multicast data socket: several receivers on one host can bind the same group and port.
/// A socket on `group` joined on `iface`: for `source` only when given (source-specific
/// multicast, IGMPv3 / MLDv2 INCLUDE: the kernel passes this socket no other sender's
/// packets).
fn multicast_socket(
    group: SocketAddr,
    source: Option<IpAddr>,
    iface: &Iface,
    recv_buffer: usize,
) -> Result<UdpSocket, RecvError> {
    let err = |what: &str, e: std::io::Error| {
        RecvError::new(
            Failure::Other,
            format!("multicast {group} on {}: {what}: {e}", iface.label()),
        )
    };
    let s = Socket::new(Domain::for_address(group), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    if group.is_ipv6() {
        s.set_only_v6(true).map_err(|e| err("IPV6_V6ONLY", e))?;
    }
    s.set_reuse_address(true)
        .map_err(|e| err("SO_REUSEADDR", e))?;
    set_recv_buffer(&s, recv_buffer);
    tracing::info!(
        requested = recv_buffer,
        granted = s.recv_buffer_size().unwrap_or(0),
        gro = mcast_io::fastio::enable_gro(&s),
        drop_counter = mcast_io::fastio::enable_rxq_ovfl(&s),
        "multicast receive buffer (granted is capped by net.core.rmem_max)"
    );
    s.bind(&group.into()).map_err(|e| err("bind", e))?;
    let what = match source {
        Some(src) => format!("join source {src}"),
        None => "join".to_string(),
    };
    mcast_io::multicast::join(&s, group.ip(), source, iface, &iface.label())
        .map_err(|(opt, e)| err(&format!("{what} ({opt})"), e))?;
    Ok(s.into())
}

/// SO_RCVBUF, and SO_RCVBUFFORCE (CAP_NET_ADMIN) when net.core.rmem_max caps it lower.
fn set_recv_buffer(s: &Socket, bytes: usize) {
    let _ = s.set_recv_buffer_size(bytes);
    // Linux reports twice the size it books for bookkeeping overhead.
    if s.recv_buffer_size().unwrap_or(0) < bytes.saturating_mul(2) {
        let v = bytes.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: setsockopt reads size_of::<c_int>() bytes from `v`; failure (no
        // CAP_NET_ADMIN) leaves the SO_RCVBUF size in place.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Socket NAKs are multicast from (a socket bound to the group address cannot send: its
/// source would be a multicast address): out of `iface`, looped back to receivers on this
/// host, of the family of `group`.
fn nak_socket(opts: &GetOptions, group: IpAddr) -> Result<UdpSocket, RecvError> {
    let iface = &opts.iface;
    let err = |what: &str, e: std::io::Error| {
        RecvError::new(
            Failure::Other,
            format!("NAK socket on {}: {what}: {e}", iface.label()),
        )
    };
    let any = match group {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let s = Socket::new(Domain::for_address(any), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    mcast_io::multicast::set_sending(&s, group, iface, &iface.label(), opts.nak_ttl)
        .map_err(|(opt, e)| err(opt, e))?;
    s.bind(&any.into()).map_err(|e| err("bind", e))?;
    opts.dscp
        .apply(&s)
        .map_err(|e| err("IP_TOS / IPV6_TCLASS (--dscp)", e))?;
    Ok(s.into())
}
