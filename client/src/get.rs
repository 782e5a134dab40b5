//! `mcast-recv get`: the receive driver. Owns the sockets, the part file, the state file and
//! the clock; the [`Download`] state machine decides what is written.
//!
//! 1. Join over the control port; fetch and verify the signed head.
//! 2. Preallocate `<title>.mca.part` (or resume it from `<title>.mca.state`).
//! 3. Join the multicast group; write every verified packet at its offset.
//! 4. No SYNC or data within `sync_timeout`: ask for unicast (cookie round trip) and take the
//!    same loop packets by unicast.
//! 5. Keepalives hold the lease; checkpoints (fdatasync + state) every `checkpoint` interval.
//! 6. Everything held: report completion, verify the whole archive, rename it into place.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_io::archive::{self, ArchiveFile, Head, PacketId};
use mcast_keys::PublicIdentity;
use mcast_proto::receiver::nak::NakEngine;
use mcast_proto::wire::control::{Control, Envelope, ErrorCode, HEAD_CHUNK, MAX_CONTROL_LEN};
use mcast_proto::wire::data::{archive_tag, DataHeader, DataKind, SyncInfo};
use mcast_proto::wire::nak::{is_nak, Nak};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::control::ControlClient;
use crate::disk::Disk;
use crate::error::{Failure, RecvError};
use crate::state::State;
use crate::tiering::Tiering;
use mcast_proto::receiver::download::{Download, Verdict};

/// Messages per recvmmsg on the data sockets.
const RECV_BATCH: usize = 64;
/// Packets handled per turn of the receive loop before timers and control are looked at.
const DRAIN_PACKETS: u64 = 4096;

#[derive(Clone, Debug)]
pub struct GetOptions {
    pub server: SocketAddr,
    pub title: String,
    pub out_dir: PathBuf,
    /// Interface address to join multicast on.
    pub iface: Ipv4Addr,
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
}

impl GetOptions {
    pub fn new(server: SocketAddr, title: &str, out_dir: &Path) -> GetOptions {
        GetOptions {
            server,
            title: title.to_string(),
            out_dir: out_dir.to_path_buf(),
            iface: Ipv4Addr::LOCALHOST,
            server_key: None,
            sync_timeout: Duration::from_millis(1500),
            checkpoint: Duration::from_millis(250),
            timeout: None,
            json: false,
            progress_bar: false,
            recv_buffer: 4 << 20,
            direct_io: false,
            silence_timeout: None,
            start_block: None,
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
    pub rejected: u64,
    pub foreign: u64,
    pub malformed: u64,
    pub unicast: bool,
    /// NAK datagrams sent, units asked for, units whose NAK another receiver's suppressed.
    pub naks_sent: u64,
    pub units_naked: u64,
    pub units_suppressed: u64,
    /// Repair packets received (including ones for units already held).
    pub repairs_received: u64,
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
}

#[derive(Serialize)]
struct Progress<'a> {
    event: &'static str,
    title: &'a str,
    have: u64,
    total: u64,
    percent: f64,
    received_packets: u64,
    rejected: u64,
    via: &'static str,
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
    mcast_keys::store::validate_title(&opts.title)
        .map_err(|e| RecvError::new(Failure::Usage, e.to_string()))?;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RecvError::io("cannot create output directory", &opts.out_dir, e))?;
    let (final_path, part_path, state_path) = file_names(&opts.out_dir, &opts.title);

    let receiver_id: u64 = rand::random();
    let mut ctl = ControlClient::new(opts.server, receiver_id)?;
    let joined = join(&mut ctl, &opts.title, opts.start_block, &stop)?;
    let (archive_id, mut group, lease) = (joined.archive_id, joined.group, joined.lease);
    let (head, head_bytes) = fetch_head(&mut ctl, archive_id)?;

    // Trust: a pinned key, else the key a resumed download was pinned to, else first use.
    let prior = State::load(&state_path).filter(|s| s.archive_id == archive_id);
    let trusted = match (&opts.server_key, &prior) {
        (Some(k), _) => *k,
        (None, Some(s)) => PublicIdentity(s.server_key),
        (None, None) => {
            tracing::warn!(key = %hex::encode(head.server_key.0), "server key not pinned (--server-key): trusting it on first use");
            head.server_key
        }
    };
    head.verify_with(&trusted).map_err(|_| {
        RecvError::new(
            Failure::Integrity,
            format!(
                "archive head for {:?} is not signed by the trusted server key {}",
                opts.title,
                trusted.fingerprint()
            ),
        )
    })?;

    // Already complete from an earlier run?
    if let Ok(a) = ArchiveFile::open(&final_path) {
        if a.head.archive_id == archive_id && archive::verify(&a, &trusted).is_ok() {
            let _ = ctl.request(
                Control::Complete { archive_id },
                3,
                Duration::from_millis(300),
            );
            // A run killed between the rename and the state file's removal left it behind.
            let _ = std::fs::remove_file(&state_path);
            let len = a.layout.file_len();
            return Ok(GetReport {
                event: "done",
                title: opts.title.clone(),
                path: final_path,
                archive_bytes: len,
                loop_units: head.loop_packets(),
                loop_bytes: head.loop_bytes(),
                units_at_start: head.loop_packets(),
                units_failed_recheck: 0,
                received_bytes: 0,
                received_packets: 0,
                missing_bytes_at_start: 0,
                written: 0,
                duplicates: 0,
                no_hash_yet: 0,
                rejected: 0,
                foreign: 0,
                malformed: 0,
                unicast: false,
                naks_sent: 0,
                units_naked: 0,
                units_suppressed: 0,
                repairs_received: 0,
                seconds: started.elapsed().as_secs_f64(),
                receive_seconds: 0.0,
                tier: 0,
                settled_tier: 0,
                tier_changes: 0,
            });
        }
    }

    let head = Arc::new(head);
    let head_len = head_bytes.len() as u64;
    let (part, mut dl) = open_part(&part_path, &head, &head_bytes, prior.as_ref())?;
    let mut units_failed_recheck = 0;
    if prior.is_some() {
        units_failed_recheck = dl.recheck_held(|off, buf| part.read_exact_at(buf, off).is_ok());
        if units_failed_recheck > 0 {
            tracing::warn!(
                units = units_failed_recheck,
                "units held before the restart no longer verify on disk: fetching them again"
            );
        }
    }
    let units_at_start = dl.have_count();
    let missing_bytes_at_start = missing_bytes(&dl);
    let mut state = State {
        archive_id,
        server_key: trusted.0,
        units: dl.units(),
        have: dl.have_bits().to_vec(),
    };
    state
        .save(&state_path)
        .map_err(|e| RecvError::io("cannot write state file", &state_path, e))?;
    tracing::info!(title = %opts.title, %group, units = dl.units(), have = units_at_start, "receiving");

    let mut mcast = multicast_socket(group, opts.iface, opts.recv_buffer)?;
    let nak_out = nak_socket(opts.iface)?;
    let tag = archive_tag(&archive_id);
    let mut nak = NakEngine::new(*dl.shape(), rand::random());
    // One data packet on the wire (the rate in SYNC counts UDP payload bytes).
    let packet_bytes = mcast_proto::wire::data::DATA_HEADER_LEN + head.symbol_size as usize;
    let mut tiering = Tiering::new(joined.tier, joined.tiers_bps.clone(), Instant::now());
    let mut repairs_received = 0u64;
    let mut first_packet: Option<Instant> = None;
    let mut last_loop_no: Option<u32> = None;
    let mut last_write = Instant::now();
    let mut rtt_us = 0u32;
    let mut keepalive_sent: Option<(u32, Instant)> = None;
    let mut unicast: Option<UdpSocket> = None;
    let mut unicast_ok = false;
    let mut heard = false;
    let joined_at = Instant::now();
    let mut next_fallback_try = joined_at + opts.sync_timeout;
    let keepalive_every = (lease / 3).max(Duration::from_millis(50));
    let mut next_keepalive = Instant::now() + keepalive_every;
    // The tier the last non-zero throughput report was about.
    let mut reported_tier: Option<usize> = None;
    let mut next_checkpoint = Instant::now() + opts.checkpoint;
    let mut next_progress = Instant::now();
    let (mut received_bytes, mut received_packets, mut foreign, mut malformed) =
        (0u64, 0u64, 0u64, 0u64);
    let mut dirty = false;
    // Last verified packet or control reply from the server (silence detection).
    let mut last_heard = Instant::now();
    let bar = opts.progress_bar.then(|| {
        let b = indicatif::ProgressBar::new(dl.units());
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} packets {percent}% eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b.set_message(opts.title.clone());
        b
    });
    // Batched receive: RECV_BATCH datagrams (or GRO super-datagrams) per recvmmsg, into
    // buffers reused for the whole run.
    let mut rx = mcast_io::fastio::RecvBatch::new(RECV_BATCH, 65_536);
    let mut ctl_buf = vec![0u8; MAX_CONTROL_LEN + 1];

    // Writes and periodic checkpoints run on the disk thread, in order (a slow disk must not
    // stall the socket drain); the final and error-path checkpoint below first drains it.
    let mut disk = Disk::start(
        &part,
        &part_path,
        &state_path,
        state.clone(),
        opts.direct_io,
    )?;
    let checkpoint =
        |disk: &mut Disk, dl: &Download, state: &mut State, part: &File| -> Result<(), RecvError> {
            disk.finish()?;
            part.sync_data()
                .map_err(|e| RecvError::io("cannot sync", &part_path, e))?;
            state.have.copy_from_slice(dl.have_bits());
            state
                .save(&state_path)
                .map_err(|e| RecvError::io("cannot write state file", &state_path, e))
        };

    while !dl.is_complete() {
        if stop.load(Ordering::Relaxed) {
            checkpoint(&mut disk, &dl, &mut state, &part)?;
            return Err(RecvError::new(
                Failure::Interrupted,
                "interrupted; run the same command again to resume",
            ));
        }
        if let Some(t) = opts.timeout {
            if started.elapsed() > t {
                checkpoint(&mut disk, &dl, &mut state, &part)?;
                return Err(RecvError::new(
                    Failure::Timeout,
                    format!(
                        "gave up after {t:?} with {}/{} packets; run again to resume",
                        dl.have_count(),
                        dl.units()
                    ),
                ));
            }
        }
        let now = Instant::now();
        if let Some(limit) = opts.silence_timeout {
            if now.saturating_duration_since(last_heard) > limit {
                checkpoint(&mut disk, &dl, &mut state, &part)?;
                let mut e = RecvError::new(
                    Failure::Unreachable,
                    format!(
                        "server {} went silent (nothing verifiable for {limit:?}) with {}/{} packets; \
                         state kept: run again, or use --director, to resume",
                        opts.server,
                        dl.have_count(),
                        dl.units()
                    ),
                );
                e.silent = true;
                e.received_bytes = received_bytes;
                return Err(e);
            }
        }
        // The first measurement on a tier goes out at once, not a keepalive period later: the
        // server sets the tier's rate (and shows its members' figures) from these reports.
        let (rx_bps, loss_ppm) = tiering.report();
        if now >= next_keepalive || (rx_bps > 0 && reported_tier != tiering.tier()) {
            if rx_bps > 0 {
                reported_tier = tiering.tier();
            }
            let id = ctl.send(Control::Keepalive {
                archive_id,
                have: dl.have_count(),
                total: dl.units(),
                rtt_us,
                rx_bps,
                loss_ppm,
            });
            keepalive_sent = Some((id, now));
            next_keepalive = now + keepalive_every;
        }
        // Throughput tier: the engine judges each interval; a move is a ChangeTier request and
        // a socket on the new tier's group (the download state is the same on every tier).
        tiering.on_missed_total(nak.counters.units_missed);
        if let Some(t) = (!unicast_ok).then(|| tiering.poll(now)).flatten() {
            match ctl.request(
                Control::ChangeTier {
                    archive_id,
                    tier: t,
                },
                3,
                Duration::from_millis(300),
            ) {
                Ok(Control::JoinOk { group: g, .. }) => {
                    mcast = multicast_socket(g, opts.iface, opts.recv_buffer)?;
                    nak.switch_channel(now, group, g);
                    group = g;
                    tracing::info!(tier = t, group = %g, "moved to throughput tier");
                }
                other => tracing::warn!(?other, tier = t, "tier change not granted"),
            }
        }
        // NAK timers: hold-offs that expired, and a NAK whose back-off ran out.
        nak.handle_timeout(now, |u| dl.has_or_parked(u));
        // Loss during a join experiment (or just after a tier move) is congestion, not something
        // to repair: the units stay in the table and are NAKed once the receiver settles.
        let settling = tiering.settling(now);
        while let Some(ranges) = (!settling).then(|| nak.poll_nak(now)).flatten() {
            tracing::trace!(
                first = ranges[0].0,
                ranges = ranges.len(),
                missing = dl.units() - dl.have_count(),
                "NAK"
            );
            let bytes = Nak {
                archive_tag: tag,
                receiver_id,
                ranges,
            }
            .encode();

            let _ = ctl.sock.send_to(&bytes, opts.server);
            if !unicast_ok {
                // On the group too, so other receivers suppress their NAKs for these units.
                let _ = nak_out.send_to(&bytes, group);
            }
        }
        if !heard && !unicast_ok && now >= next_fallback_try {
            let s = unicast.get_or_insert_with(|| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind unicast socket");
                let r = socket2::SockRef::from(&s);
                set_recv_buffer(&r, opts.recv_buffer);
                tracing::info!(
                    requested = opts.recv_buffer,
                    granted = r.recv_buffer_size().unwrap_or(0),
                    gro = mcast_io::fastio::enable_gro(&s),
                    "unicast receive buffer"
                );
                s
            });
            tracing::info!(title = %opts.title, "no multicast heard: asking for unicast fallback");
            match unicast_handshake(&mut ctl, s, archive_id) {
                Ok(()) => {
                    unicast_ok = true;
                    nak.set_unicast(true);
                    tracing::info!(local = ?s.local_addr().ok(), "unicast fallback active");
                }
                Err(e) => {
                    tracing::warn!(error = %e.message, "unicast fallback request failed; retrying")
                }
            }
            next_fallback_try = Instant::now() + Duration::from_secs(1);
        }
        if now >= next_checkpoint && dirty {
            // Queued behind every write made so far: when the disk thread takes it, every
            // unit marked held is in the file, and its sync covers the snapshot.
            if disk.request_checkpoint(dl.have_bits())? {
                dirty = false;
            }
            next_checkpoint = now + opts.checkpoint;
        }
        if now >= next_progress {
            let via = if unicast_ok { "unicast" } else { "multicast" };
            if let Some(b) = &bar {
                b.set_position(dl.have_count());
            }
            if opts.json {
                let p = Progress {
                    event: "progress",
                    title: &opts.title,
                    have: dl.have_count(),
                    total: dl.units(),
                    percent: 100.0 * dl.have_count() as f64 / dl.units().max(1) as f64,
                    received_packets,
                    rejected: dl.counters.rejected,
                    via,
                };
                println!("{}", serde_json::to_string(&p).unwrap());
            }
            next_progress = now + Duration::from_millis(250);
        }

        // Wait for a datagram on any socket, at most until the next timer.
        let mut fds = vec![
            nix::poll::PollFd::new(mcast.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(ctl.sock.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        if let Some(u) = &unicast {
            fds.push(nix::poll::PollFd::new(
                u.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        let wait_ms = nak
            .poll_timeout()
            .filter(|_| !settling)
            .map(|t| {
                t.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(20) as u16
            })
            .unwrap_or(20);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait_ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(RecvError::new(Failure::Other, format!("poll: {e}"))),
        }
        drop(fds);

        // Control replies (keepalive acks, or "join again").
        ctl.sock.set_nonblocking(true).ok();
        while let Ok((n, from)) = ctl.sock.recv_from(&mut ctl_buf) {
            if from != opts.server {
                continue;
            }
            let env = Envelope::decode(&ctl_buf[..n]);
            if env.is_ok() {
                last_heard = Instant::now();
            }
            if let (
                Ok(Envelope {
                    req_id,
                    msg: Control::LeaseOk { .. },
                    ..
                }),
                Some((id, at)),
            ) = (&env, keepalive_sent)
            {
                if *req_id == id {
                    rtt_us = at.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32;
                    keepalive_sent = None;
                }
            }
            if let Ok(Envelope {
                msg:
                    Control::Error {
                        code: ErrorCode::UnknownSession,
                        ..
                    },
                ..
            }) = env
            {
                tracing::info!(
                    "server forgot this session (restart or lease expiry): joining again"
                );
                ctl.sock.set_nonblocking(false).ok();
                // A refused re-join (e.g. a scheduled window closed) still leaves a checkpoint.
                let j = match join(&mut ctl, &opts.title, None, &stop) {
                    Ok(j) => j,
                    Err(e) => {
                        checkpoint(&mut disk, &dl, &mut state, &part)?;
                        return Err(e);
                    }
                };
                if j.group != group {
                    mcast = multicast_socket(j.group, opts.iface, opts.recv_buffer)?;
                    group = j.group;
                    nak.reset_position();
                }
                tiering = Tiering::new(j.tier, j.tiers_bps, Instant::now());
                if j.archive_id != archive_id {
                    checkpoint(&mut disk, &dl, &mut state, &part)?;
                    return Err(RecvError::new(
                        Failure::Other,
                        format!(
                            "title {:?} was re-packed on the server; remove {} and start again",
                            opts.title,
                            part_path.display()
                        ),
                    ));
                }
                unicast_ok = false;
                next_fallback_try = Instant::now() + opts.sync_timeout;
            }
        }

        // Data from multicast and unicast, drained in bursts.
        let socks: Vec<&UdpSocket> = std::iter::once(&mcast).chain(unicast.as_ref()).collect();
        // Bounded by packets, not calls (a call can return 64 GRO super-datagrams of ~50
        // packets each): timers, keepalives and control replies are serviced every few ms,
        // so NAKs go out on time and the RTT this receiver reports is not inflated by a
        // long drain.
        let drain_until = received_packets + DRAIN_PACKETS;
        for s in socks {
            while received_packets < drain_until {
                let got = match rx.recv(s.as_raw_fd()) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                // Verified packets of this batch, written with one pwritev per contiguous run
                // before the buffers are reused.
                let mut complete = false;
                for dg in rx.datagrams() {
                    if is_nak(dg) {
                        match Nak::decode(dg) {
                            Ok(h) if h.archive_tag == tag && h.receiver_id != receiver_id => {
                                nak.on_nak_heard(Instant::now(), h.units_in(dl.units()));
                            }
                            Ok(_) => {}
                            Err(_) => malformed += 1,
                        }
                        continue;
                    }
                    let Ok((hdr, payload)) = DataHeader::decode(dg) else {
                        malformed += 1;
                        continue;
                    };
                    if hdr.archive_tag != tag {
                        foreign += 1;
                        continue;
                    }
                    let id = match hdr.kind {
                        DataKind::Sync => {
                            if let Ok(info) = SyncInfo::decode(payload) {
                                nak.on_sync(&info, packet_bytes);
                                tiering.on_sync(&info, Instant::now());
                            }
                            continue;
                        }
                        DataKind::Packet(id) => id,
                    };
                    received_packets += 1;
                    received_bytes += payload.len() as u64;
                    tiering.on_data(payload.len());
                    repairs_received += hdr.repair as u64;
                    first_packet.get_or_insert_with(Instant::now);
                    if !hdr.repair && last_loop_no != Some(hdr.loop_no) {
                        if last_loop_no.is_some() {
                            tracing::debug!(
                                loop_no = hdr.loop_no,
                                missing = dl.units() - dl.have_count(),
                                nak_table = nak.table_len(),
                                "loop wrapped"
                            );
                        }
                        last_loop_no = Some(hdr.loop_no);
                    }
                    let mut verdict = dl.on_packet(id, payload);
                    if let Verdict::NeedHash(b) = verdict {
                        // The block's hash packet left the in-memory cache: read it back (it may
                        // still be queued for the disk, so wait for that first) and offer the packet again.
                        disk.barrier()?;
                        let (off, len) = dl
                            .layout()
                            .packet_range(PacketId::Hash(b))
                            .expect("block in range");
                        let mut hp = vec![0u8; len];
                        let ok = part.read_exact_at(&mut hp, off).is_ok();
                        if !(ok && dl.restore_hash(b, hp)) {
                            tracing::warn!(
                                block = b,
                                "hash packet on disk no longer verifies: fetching it again"
                            );
                        }
                        verdict = dl.on_packet(id, payload);
                    }
                    // Only verified packets may move the NAK engine (and prove the channel works):
                    // a forged position must not mark a loop's worth of units missing.
                    match verdict {
                        Verdict::Write { .. } => {
                            heard = true;
                            last_heard = Instant::now();
                            nak.on_packet(Instant::now(), id, hdr.repair, |u| dl.has_or_parked(u));
                        }
                        Verdict::Parked => {
                            if let PacketId::Data(s) = id {
                                nak.on_parked(Instant::now(), s, |u| dl.has_or_parked(u));
                            }
                        }
                        // Genuine duplicates still tell the loop position (a loss at the end of a
                        // loop is only seen from the next loop's packets, which are duplicates).
                        Verdict::Duplicate if dl.duplicate_is_genuine(id, payload) => {
                            heard = true;
                            last_heard = Instant::now();
                            nak.on_packet(Instant::now(), id, hdr.repair, |u| dl.has_or_parked(u));
                        }
                        Verdict::Duplicate => {}
                        Verdict::NoHashYet | Verdict::Rejected | Verdict::NeedHash(_) => {}
                    }
                    // A parked packet that failed its check loses its unit, unless a genuine
                    // copy was parked or written meanwhile (forgeries must not cause NAKs).
                    for unit in dl.take_unpark_rejects() {
                        if !dl.has_or_parked(unit) {
                            nak.on_lost(Instant::now(), unit);
                        }
                    }
                    for (offset, bytes) in dl.take_released() {
                        disk.write(offset, &bytes)?;
                        dirty = true;
                    }
                    if let Verdict::Write { offset } = verdict {
                        last_write = Instant::now();
                        disk.write(offset, payload)?;
                        dirty = true;
                        if dl.is_complete() {
                            complete = true;
                            break;
                        }
                    }
                }
                // No checkpoint on a write failure: queued units are marked held in memory but
                // not on disk; the last checkpoint (taken behind its writes) is the consistent
                // one to resume from.
                if complete || got < rx.capacity() {
                    break;
                }
            }
        }
    }

    // Complete: say so (lets the channel close), make it durable, verify, rename.
    let _ = ctl.sock.set_nonblocking(false);
    let _ = ctl.request(
        Control::Complete { archive_id },
        3,
        Duration::from_millis(300),
    );
    checkpoint(&mut disk, &dl, &mut state, &part)?;
    drop(part);
    let a = ArchiveFile::open(&part_path)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    // Every unit was verified before it was written (or re-verified from disk at resume),
    // so the file needs only its structure and signature checked, not a second full pass.
    a.verify_signature(&trusted)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    drop(a);
    std::fs::rename(&part_path, &final_path)
        .map_err(|e| RecvError::io("cannot rename", &part_path, e))?;
    let _ = mcast_io::fsutil::sync_dir(&opts.out_dir);
    let _ = std::fs::remove_file(&state_path);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let c = &dl.counters;
    Ok(GetReport {
        event: "done",
        title: opts.title.clone(),
        path: final_path,
        archive_bytes: head_len + head.loop_bytes() + archive::PREAMBLE_LEN + archive::TAIL_LEN,
        loop_units: dl.units(),
        loop_bytes: head.loop_bytes(),
        units_at_start,
        units_failed_recheck,
        received_bytes,
        received_packets,
        missing_bytes_at_start,
        written: c.written,
        duplicates: c.duplicates,
        no_hash_yet: c.no_hash_yet,
        rejected: c.rejected,
        foreign,
        malformed,
        unicast: unicast_ok,
        naks_sent: nak.counters.naks_sent,
        units_naked: nak.counters.units_naked,
        units_suppressed: nak.counters.units_suppressed,
        repairs_received,
        seconds: started.elapsed().as_secs_f64(),
        receive_seconds: first_packet
            .map(|f| last_write.saturating_duration_since(f).as_secs_f64())
            .unwrap_or(0.0),
        tier: tiering.tier().unwrap_or(0),
        settled_tier: tiering.settled_tier(Instant::now()),
        tier_changes: tiering.changes,
    })
}

fn missing_bytes(dl: &Download) -> u64 {
    (0..dl.units())
        .filter(|&u| !dl.has(u))
        .map(|u| {
            dl.layout()
                .packet_range(dl.shape().unit_packet(u))
                .map(|r| r.1 as u64)
                .unwrap_or(0)
        })
        .sum()
}

/// What a join reply says.
struct Joined {
    archive_id: [u8; 16],
    group: SocketAddrV4,
    lease: Duration,
    tier: u8,
    tiers_bps: Vec<u64>,
}

fn join(
    ctl: &mut ControlClient,
    title: &str,
    start: Option<u64>,
    stop: &AtomicBool,
) -> Result<Joined, RecvError> {
    let mut backoff = Duration::from_millis(200);
    let msg = match start {
        Some(block) => Control::JoinAt {
            title: title.to_string(),
            block,
        },
        None => Control::Join {
            title: title.to_string(),
        },
    };
    for _ in 0..10 {
        match ctl.request(msg.clone(), 5, Duration::from_millis(400))? {
            Control::JoinOk {
                archive_id,
                group,
                lease_ms,
                tier,
                tiers_bps,
                ..
            } => {
                return Ok(Joined {
                    archive_id,
                    group,
                    lease: Duration::from_millis(lease_ms as u64),
                    tier,
                    tiers_bps,
                })
            }
            Control::NotHere { redirect, .. } => {
                let hint = redirect
                    .map(|r| format!(" (try --server {r})"))
                    .unwrap_or_default();
                return Err(RecvError::new(
                    Failure::NotFound,
                    format!("server {} does not have title {title:?}{hint}; `mcast-recv catalog` lists what it has", ctl.server),
                ));
            }
            Control::Error {
                code: ErrorCode::Draining,
                ..
            } => {
                return Err(RecvError::new(
                    Failure::Unreachable,
                    format!(
                        "server {} is draining (finishing its receivers, taking no new ones): \
                         use --director, or another --server",
                        ctl.server
                    ),
                ));
            }
            Control::Error {
                code: ErrorCode::Busy,
                message,
            } => {
                tracing::warn!(%message, "server busy; retrying");
                // Busy can last (all slots in use, a scheduled title between windows): a
                // stop request must not wait for the retries.
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return Err(RecvError::new(
                            Failure::Interrupted,
                            "interrupted; run the same command again to resume",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => {
                return Err(RecvError::new(
                    Failure::Other,
                    format!("unexpected reply to join: {other:?}"),
                ));
            }
        }
    }
    Err(RecvError::new(
        Failure::Other,
        "server stayed busy; try again later",
    ))
}

/// Fetch the head in chunks, with up to 32 requests in flight.
fn fetch_head(ctl: &mut ControlClient, archive_id: [u8; 16]) -> Result<(Head, Vec<u8>), RecvError> {
    let first = ctl.request(
        Control::HeadRequest {
            archive_id,
            offset: 0,
        },
        5,
        Duration::from_millis(400),
    )?;
    let Control::HeadChunk { total, bytes, .. } = first else {
        return Err(RecvError::new(
            Failure::Other,
            format!("unexpected reply to head request: {first:?}"),
        ));
    };
    let total = total as usize;
    if total > archive::MAX_HEAD_LEN as usize {
        return Err(RecvError::new(
            Failure::Integrity,
            "server announced an oversized head",
        ));
    }
    let mut head = vec![0u8; total];
    let chunks = total.div_ceil(HEAD_CHUNK).max(1);
    let mut got = vec![false; chunks];
    let n = bytes.len().min(total);
    head[..n].copy_from_slice(&bytes[..n]);
    got[0] = true;
    let mut buf = vec![0u8; MAX_CONTROL_LEN + 1];
    let deadline = Instant::now() + Duration::from_secs(30);
    // A window of requests in flight: each chunk that arrives frees a slot for the next one,
    // and requests unanswered for RETRY are sent again (lost datagrams).
    const WINDOW: usize = 32;
    const RETRY: Duration = Duration::from_millis(200);
    let mut sent_at: Vec<Option<Instant>> = vec![None; chunks];
    let mut missing = got.iter().filter(|g| !**g).count();
    let mut in_flight = 0usize;
    let mut cursor = 0usize;
    let mut last_scan = Instant::now();
    ctl.sock
        .set_read_timeout(Some(Duration::from_millis(10)))
        .ok();
    while missing > 0 {
        let now = Instant::now();
        if now > deadline {
            return Err(RecvError::new(
                Failure::Unreachable,
                "timed out fetching the archive head",
            ));
        }
        if now.duration_since(last_scan) >= RETRY {
            // Re-request what went unanswered; count what is still in flight.
            in_flight = 0;
            for i in 0..cursor {
                if got[i] {
                    continue;
                }
                match sent_at[i] {
                    Some(t) if now.duration_since(t) < RETRY => in_flight += 1,
                    _ if in_flight < WINDOW => {
                        ctl.send(Control::HeadRequest {
                            archive_id,
                            offset: (i * HEAD_CHUNK) as u32,
                        });
                        sent_at[i] = Some(now);
                        in_flight += 1;
                    }
                    _ => {}
                }
            }
            last_scan = now;
        }
        while in_flight < WINDOW && cursor < chunks {
            if !got[cursor] {
                ctl.send(Control::HeadRequest {
                    archive_id,
                    offset: (cursor * HEAD_CHUNK) as u32,
                });
                sent_at[cursor] = Some(now);
                in_flight += 1;
            }
            cursor += 1;
        }
        let Ok((n, from)) = ctl.sock.recv_from(&mut buf) else {
            continue;
        };
        if from != ctl.server {
            continue;
        }
        if let Ok(Envelope {
            msg:
                Control::HeadChunk {
                    archive_id: a,
                    offset,
                    bytes,
                    ..
                },
            ..
        }) = Envelope::decode(&buf[..n])
        {
            let off = offset as usize;
            if a != archive_id || off % HEAD_CHUNK != 0 || off >= total.max(1) {
                continue;
            }
            let i = off / HEAD_CHUNK;
            if got[i] {
                continue;
            }
            let end = (off + bytes.len()).min(total);
            head[off..end].copy_from_slice(&bytes[..end - off]);
            got[i] = true;
            missing -= 1;
            if sent_at[i].is_some() {
                in_flight = in_flight.saturating_sub(1);
            }
        }
    }
    ctl.sock.set_read_timeout(None).ok();
    let h = Head::decode(&head).map_err(|e| {
        RecvError::new(
            Failure::Integrity,
            format!("bad archive head from server: {e}"),
        )
    })?;
    if h.archive_id != archive_id {
        return Err(RecvError::new(
            Failure::Integrity,
            "head is for another archive",
        ));
    }
    Ok((h, head))
}

/// Create or reopen the part file, preallocated to the archive's size, with preamble, head
/// and tail already in place (they are known from the verified head).
fn open_part(
    path: &Path,
    head: &Arc<Head>,
    head_bytes: &[u8],
    prior: Option<&State>,
) -> Result<(File, Download), RecvError> {
    let head_len = head_bytes.len() as u64;
    let layout = archive::Layout::of(head, head_len);
    let resumable = prior.is_some()
        && std::fs::metadata(path)
            .map(|m| m.len() == layout.file_len())
            .unwrap_or(false);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!resumable)
        .open(path)
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
    let have = if resumable {
        prior.map(|s| s.have.clone())
    } else {
        None
    };
    Ok((file, Download::new(head.clone(), head_len, have)))
}

/// Multicast data socket: several receivers on one host can bind the same group and port.
fn multicast_socket(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    recv_buffer: usize,
) -> Result<UdpSocket, RecvError> {
    let err = |what: &str, e: std::io::Error| {
        RecvError::new(
            Failure::Other,
            format!("multicast {group} on {iface}: {what}: {e}"),
        )
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    s.set_reuse_address(true)
        .map_err(|e| err("SO_REUSEADDR", e))?;
    set_recv_buffer(&s, recv_buffer);
    tracing::info!(
        requested = recv_buffer,
        granted = s.recv_buffer_size().unwrap_or(0),
        gro = mcast_io::fastio::enable_gro(&s),
        "multicast receive buffer (granted is capped by net.core.rmem_max)"
    );
    s.bind(&SocketAddr::V4(group).into())
        .map_err(|e| err("bind", e))?;
    s.join_multicast_v4(group.ip(), &iface)
        .map_err(|e| err("join", e))?;
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
/// host.
fn nak_socket(iface: Ipv4Addr) -> Result<UdpSocket, RecvError> {
    let err = |what: &str, e: std::io::Error| {
        RecvError::new(
            Failure::Other,
            format!("NAK socket on {iface}: {what}: {e}"),
        )
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    s.set_multicast_if_v4(&iface)
        .map_err(|e| err("IP_MULTICAST_IF", e))?;
    s.set_multicast_loop_v4(true)
        .map_err(|e| err("IP_MULTICAST_LOOP", e))?;
    s.set_multicast_ttl_v4(1)
        .map_err(|e| err("IP_MULTICAST_TTL", e))?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())
        .map_err(|e| err("bind", e))?;
    Ok(s.into())
}

/// Ask for unicast from `sock` and prove we receive there (cookie round trip).
fn unicast_handshake(
    ctl: &mut ControlClient,
    sock: &UdpSocket,
    archive_id: [u8; 16],
) -> Result<(), RecvError> {
    sock.set_nonblocking(false).ok();
    let reply = ctl.request_on(
        sock,
        Control::UnicastRequest { archive_id },
        3,
        Duration::from_millis(300),
    );
    let cookie = match reply? {
        Control::Cookie { cookie, .. } => cookie,
        other => {
            return Err(RecvError::new(
                Failure::Other,
                format!("unexpected reply to unicast request: {other:?}"),
            ))
        }
    };
    match ctl.request_on(
        sock,
        Control::UnicastConfirm { archive_id, cookie },
        3,
        Duration::from_millis(300),
    )? {
        Control::UnicastOk { .. } => Ok(()),
        other => Err(RecvError::new(
            Failure::Other,
            format!("unicast refused: {other:?}"),
        )),
    }
}
