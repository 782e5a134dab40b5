//! The `mcastd` driver: owns the sockets, the archive files and the clock, and feeds the
//! [`ChannelManager`] state machine. One thread; control datagrams, timers and paced sends are
//! interleaved in one loop that sleeps until the next deadline or datagram.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

use crate::archive::{ArchiveFile, ARCHIVE_EXT};
use crate::channel::{ChannelManager, Event, HeadBytes, HotAdd, TitleInfo, TransmitPayload};
use crate::config::Config;
use crate::delegation::Delegation;
use crate::fastio::{BatchSender, PacketBatch};
use crate::wire::control::{ArchiveId, MAX_CONTROL_LEN};
use crate::wire::data::DATA_HEADER_LEN;

/// Archives this server can loop, verified against its identity at start-up.
pub fn load_titles(
    dir: &Path,
    trusted: &mcast_keys::PublicIdentity,
) -> anyhow::Result<(Vec<TitleInfo>, HashMap<ArchiveId, ArchiveFile>)> {
    load_titles_counted(dir, trusted).map(|(t, f, _)| (t, f))
}

/// [`load_titles`], also returning how many archives were skipped (logged, and counted in
/// stats as `archives_skipped`, so an operator sees a bad file without reading logs).
pub fn load_titles_counted(
    dir: &Path,
    trusted: &mcast_keys::PublicIdentity,
) -> anyhow::Result<(Vec<TitleInfo>, HashMap<ArchiveId, ArchiveFile>, u64)> {
    let mut d = ArchiveDir::new(dir, vec![*trusted]);
    let (titles, skipped) = d.load()?;
    Ok((titles, d.files, skipped))
}

/// A file's identity and version as the directory shows it: a rename over it (a new
/// download) or a rewrite changes it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }
}

/// The archive directory as served: the open archive files, and what each `*.mca` file was
/// when last looked at, so a rescan opens only files that appeared or changed. Archives
/// load when signed by one of `trusted` (this server's identity, then its origins' keys).
pub struct ArchiveDir {
    dir: std::path::PathBuf,
    trusted: Vec<mcast_keys::PublicIdentity>,
    pub files: HashMap<ArchiveId, ArchiveFile>,
    seen: HashMap<std::path::PathBuf, Stamp>,
}

/// What a rescan did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rescan {
    pub added: usize,
    pub replaced: usize,
    pub skipped: u64,
    /// Changed archives of titles still looping: looked at again on a later scan.
    pub deferred: usize,
}

impl ArchiveDir {
    pub fn new(dir: &Path, trusted: Vec<mcast_keys::PublicIdentity>) -> ArchiveDir {
        ArchiveDir {
            dir: dir.to_path_buf(),
            trusted,
            files: HashMap::new(),
            seen: HashMap::new(),
        }
    }

    /// Open and verify an archive against the trusted key its head names.
    fn open(&self, path: &Path) -> Result<ArchiveFile, crate::archive::ArchiveError> {
        let a = ArchiveFile::open(path)?;
        let key = self
            .trusted
            .iter()
            .find(|k| **k == a.head.server_key)
            .unwrap_or(&self.trusted[0]);
        a.verify_signature(key)?;
        Ok(a)
    }

    /// `*.mca` files that are new or changed since the last look (`.part`/`.state` files of
    /// downloads in progress are not archives), opened and verified; each is looked at once
    /// per version, so a bad file is logged once, not at every scan.
    #[allow(clippy::type_complexity)]
    fn changed(
        &mut self,
    ) -> anyhow::Result<
        Vec<(
            std::path::PathBuf,
            Result<ArchiveFile, crate::archive::ArchiveError>,
        )>,
    > {
        let entries = std::fs::read_dir(&self.dir).with_context(|| {
            format!(
                "cannot read archive directory {} (set store.archive_dir, or pack a title first)",
                self.dir.display()
            )
        })?;
        let mut out = Vec::new();
        let mut present = std::collections::HashSet::new();
        for e in entries {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some(ARCHIVE_EXT) {
                continue;
            }
            // Anything named like an archive is opened (a directory so named is logged and
            // skipped like any unreadable archive).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            present.insert(path.clone());
            let stamp = Stamp::of(&meta);
            if self.seen.get(&path) == Some(&stamp) {
                continue;
            }
            self.seen.insert(path.clone(), stamp);
            let a = self.open(&path);
            out.push((path, a));
        }
        self.seen.retain(|p, _| present.contains(p));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The first scan: every archive of the directory.
    pub fn load(&mut self) -> anyhow::Result<(Vec<TitleInfo>, u64)> {
        let mut skipped = 0u64;
        let mut titles = Vec::new();
        for (path, a) in self.changed()? {
            match a {
                Ok(mut a) => {
                    titles.push(title_info(&mut a));
                    self.files.insert(a.head.archive_id, a);
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "archive skipped");
                    skipped += 1;
                }
            }
        }
        Ok((titles, skipped))
    }

    /// Serve archives that appeared or changed since the last scan: new titles are added to
    /// `mgr` at once; a title whose archive changed is replaced when no channel loops it,
    /// else on a later scan.
    pub fn rescan(&mut self, mgr: &mut ChannelManager) -> anyhow::Result<Rescan> {
        let mut r = Rescan::default();
        for (path, a) in self.changed()? {
            let mut a = match a {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "archive skipped");
                    r.skipped += 1;
                    continue;
                }
            };
            let info = title_info(&mut a);
            let (title, id) = (a.head.title.clone(), a.head.archive_id);
            let signer = a.head.server_key.fingerprint();
            match mgr.hot_add_title(info) {
                HotAdd::Added => {
                    tracing::info!(%title, path = %path.display(), %signer, archive_len = a.layout.file_len(), "title added");
                    self.files.insert(id, a);
                    r.added += 1;
                }
                HotAdd::Replaced(old) => {
                    tracing::info!(%title, path = %path.display(), %signer, "title replaced (its archive changed)");
                    self.files.remove(&old);
                    self.files.insert(id, a);
                    r.replaced += 1;
                }
                HotAdd::Unchanged => {}
                HotAdd::Busy => {
                    // Looked at again next scan.
                    self.seen.remove(&path);
                    r.deferred += 1;
                    tracing::debug!(%title, path = %path.display(), "archive changed while its title loops: replaced once its channels close");
                }
            }
        }
        if r.skipped > 0 {
            mgr.count_archives_skipped(r.skipped);
        }
        Ok(r)
    }
}

/// The title as the channel manager keeps it. Memory must not grow with what is served: the
/// head is kept without its block hashes (the server never checks packets) and its bytes are
/// read from the file when a receiver asks for them (`read_head_chunks`).
fn title_info(a: &mut ArchiveFile) -> TitleInfo {
    a.head.block_hashes = Vec::new();
    a.head_bytes = Vec::new();
    TitleInfo {
        head: Arc::new(a.head.clone()),
        head_bytes: HeadBytes::External {
            len: a.layout.head_len as u32,
        },
        archive_len: a.layout.file_len(),
    }
}

/// An edge's delegations (`[server] delegations`): each must decode, name this server's
/// identity, come from one of `origins` with a valid signature, and not be expired at
/// `now_unix`.
pub fn load_delegations(
    paths: &[std::path::PathBuf],
    own: &mcast_keys::PublicIdentity,
    origins: &[mcast_keys::PublicIdentity],
    now_unix: u64,
) -> anyhow::Result<Vec<Delegation>> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| {
            format!(
                "server.delegations: cannot read {} (issue one on the origin: mcastd delegate --edge-key {} -o FILE)",
                p.display(),
                hex::encode(own.0)
            )
        })?;
        let d = Delegation::decode(&bytes)
            .map_err(|e| anyhow::anyhow!("server.delegations: {}: {e}", p.display()))?;
        let Some(origin) = origins.iter().find(|k| **k == d.origin) else {
            anyhow::bail!(
                "server.delegations: {} is from origin key {}, which is not in server.origin_keys: add it there (or pass --origin-key)",
                p.display(),
                hex::encode(d.origin.0)
            );
        };
        d.check_for(origin, own, now_unix).map_err(|e| {
            anyhow::anyhow!(
                "server.delegations: {}: {e}; issue a new one on the origin: mcastd delegate --edge-key {} -o FILE",
                p.display(),
                hex::encode(own.0)
            )
        })?;
        let days_left = (d.not_after - now_unix) / 86_400;
        tracing::info!(path = %p.display(), origin = %d.origin.fingerprint(), not_after = d.not_after, days_left, "delegation loaded: SYNCs of the origin's titles are signed by this server");
        if days_left < 14 {
            tracing::warn!(path = %p.display(), days_left, "delegation expires soon: receivers will refuse this server's SYNCs for the origin's titles after that; issue a new one");
        }
        out.push(d);
    }
    for o in origins {
        if !out.iter().any(|d| d.origin == *o) {
            tracing::warn!(origin = %hex::encode(o.0), "no delegation from this origin key (server.delegations): receivers drop the SYNCs of its titles (counted as syncs_forged)");
        }
    }
    Ok(out)
}

/// Data socket: multicast out of `iface` with `ttl` (IPv4 or IPv6, as the groups are),
/// loopback delivery on (receivers on this host), and the requested send buffer. For
/// source-specific groups it is bound to the source address receivers are told.
pub fn data_socket(cfg: &Config) -> anyhow::Result<UdpSocket> {
    let sv = &cfg.server;
    let iface = sv
        .multicast_iface()
        .map_err(|e| anyhow::anyhow!("server.multicast_iface: {e}"))?;
    let s = Socket::new(
        Domain::for_address(SocketAddr::new(sv.group_base, 0)),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    crate::multicast::set_sending(&s, sv.group_base, &iface, &sv.multicast_iface, sv.ttl).map_err(
        |(what, e)| {
            anyhow::anyhow!(
                "server.multicast_iface {:?}: cannot send multicast from it ({what}: {e})",
                sv.multicast_iface
            )
        },
    )?;
    if sv.group_base.is_ipv6() && iface.name == "lo" {
        tracing::warn!(
            group_base = %sv.group_base,
            "Linux does not loop IPv6 multicast through lo: receivers get nothing from these \
             channels (only the unicast fallback); set server.multicast_iface to an interface \
             with IPv6 (eth0, or a veth on one machine)"
        );
    }
    let _ = s.set_send_buffer_size(sv.send_buffer);
    let granted = s.send_buffer_size().unwrap_or(0);
    tracing::info!(
        requested = sv.send_buffer,
        granted,
        iface = %iface.name,
        "data socket send buffer"
    );
    let bind = match (sv.group_base, cfg.server.ssm_source()) {
        (_, Some(src)) if sv.source_specific() => SocketAddr::new(src, 0),
        (std::net::IpAddr::V4(_), _) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        (std::net::IpAddr::V6(_), _) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let bind = match bind {
        // A link-local source is only an address with its interface.
        SocketAddr::V6(mut a) if a.ip().segments()[0] & 0xffc0 == 0xfe80 => {
            a.set_scope_id(iface.index);
            SocketAddr::V6(a)
        }
        a => a,
    };
    s.bind(&bind.into())
        .with_context(|| format!("data socket: cannot bind {bind}"))?;
    Ok(s.into())
}

/// Packets per send batch (a few GSO messages of up to 64 segments).
const BATCH: usize = 128;
/// Packets sent per loop turn at most, so control datagrams are never starved.
const MAX_PER_TURN: usize = 1024;

/// Read the head chunks receivers asked for from the archive files, and hand them back to
/// `mgr` (which queues the replies; a failed read becomes its error reply).
fn read_head_chunks(files: &HashMap<ArchiveId, ArchiveFile>, mgr: &mut ChannelManager) {
    while let Some(r) = mgr.poll_head_read() {
        let bytes = files.get(&r.archive_id).and_then(|a| {
            let mut v = vec![0u8; r.len as usize];
            let at = a.layout.head_offset() + r.offset as u64;
            std::os::unix::fs::FileExt::read_exact_at(&a.file, &mut v, at).ok()?;
            Some(v)
        });
        mgr.head_read_done(r, bytes);
    }
}

/// The data sockets: multicast channels, and unicast streams to IPv4 and IPv6 receivers
/// (whose ICMP errors are read). No IPv6 socket on a host without IPv6.
struct DataSockets {
    multicast: UdpSocket,
    unicast: UdpSocket,
    unicast6: Option<UdpSocket>,
}

impl DataSockets {
    /// The socket for `dest`, if this host can send there.
    fn for_dest(&self, dest: &SocketAddr) -> Option<&UdpSocket> {
        match dest {
            d if d.ip().is_multicast() => Some(&self.multicast),
            SocketAddr::V4(_) => Some(&self.unicast),
            SocketAddr::V6(_) => self.unicast6.as_ref(),
        }
    }
}

/// Read the batch's archive payloads and send it to each of `dests`; empties the batch.
/// An archive that can no longer be read (truncated or removed under the server) is
/// withdrawn from `mgr` rather than stopping the server: the other titles keep looping.
fn flush(
    batch: &mut PacketBatch,
    cur: &Option<(ArchiveId, Arc<[SocketAddr]>)>,
    files: &HashMap<ArchiveId, ArchiveFile>,
    data: &DataSockets,
    sender: &mut BatchSender,
    send_errors: &mut u64,
    mgr: &mut ChannelManager,
) -> anyhow::Result<()> {
    let Some((id, dests)) = cur else {
        batch.clear();
        return Ok(());
    };
    if batch.is_empty() {
        return Ok(());
    }
    let a = files.get(id).expect("channels only loop loaded archives");
    if let Err(e) = batch.fill(&a.file) {
        batch.clear();
        if mgr.withdraw_title(id) {
            tracing::error!(path = %a.path.display(), error = %e,
                "archive unreadable while serving: title withdrawn, its channels closed");
        }
        return Ok(());
    }
    for dest in dests.iter() {
        let Some(sock) = data.for_dest(dest) else {
            *send_errors += batch.len() as u64;
            continue;
        };
        let out = sender.send(sock.as_raw_fd(), batch, &(*dest).into());
        if out
            .last_error
            .as_ref()
            .is_some_and(|e| e.kind() == ErrorKind::ConnectionRefused)
        {
            // An ICMP error is pending on the unicast socket: read which address it names.
            read_unreachable(sock, mgr);
        }
        if out.failed > 0 {
            let before = *send_errors;
            *send_errors += out.failed as u64;
            if (before + 1..=*send_errors).any(|n| n.is_power_of_two()) {
                if let Some(e) = &out.last_error {
                    tracing::warn!(%dest, error = %e, send_errors = *send_errors, "data send failed");
                }
            }
        }
    }
    batch.clear();
    Ok(())
}

/// Hand the addresses ICMP reported unreachable to the manager (their streams end).
fn read_unreachable(sock: &UdpSocket, mgr: &mut ChannelManager) {
    crate::unreachable::drain(sock, |to| {
        let ended = mgr.on_unreachable(to);
        if ended > 0 {
            tracing::info!(%to, ended, "unicast destination unreachable (ICMP): its streams end");
        }
    });
}

/// Run the server until `stop` is set.
pub fn serve(cfg: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let ks = mcast_keys::KeyStore::open(&cfg.store.key_dir)?;
    let identity = Arc::new(ks.identity()?);
    let trusted = identity.public();
    // An edge also serves archives its origins signed, and signs their SYNCs under the
    // origins' delegations.
    let origins = cfg
        .server
        .origin_keys()
        .map_err(|e| anyhow::anyhow!("server.origin_keys: {e}"))?;
    let delegations = load_delegations(
        &cfg.server.delegations,
        &trusted,
        &origins,
        crate::process::unix_secs(),
    )?;
    let mut tickets =
        crate::ticket::service::TicketService::open_config(&cfg.tickets, &ks, trusted)?;
    tickets.set_origins(origins.clone());
    let mut archives = ArchiveDir::new(
        &cfg.store.archive_dir,
        std::iter::once(trusted)
            .chain(origins.iter().copied())
            .collect(),
    );
    let (titles, skipped) = archives.load()?;
    if titles.is_empty() {
        tracing::warn!(dir = %cfg.store.archive_dir.display(), "no archives to serve; pack one with `mcastd pack`");
    }
    let control = crate::control_socket::bind(cfg.server.control)?;
    if let Some(addr) = cfg.archive_http_listen()? {
        let bound = crate::http::spawn_archives(addr, cfg.store.archive_dir.clone())
            .context("server.archive_http_listen")?;
        tracing::info!(listen = %bound, dir = %cfg.store.archive_dir.display(), "archives over HTTP: GET/HEAD /archives/<title>.mca with byte ranges");
    }
    let ctrl = control.main;
    let unvalidated = control.unvalidated;
    let data = DataSockets {
        multicast: data_socket(cfg)?,
        unicast: crate::unreachable::unicast_socket(cfg.server.send_buffer, false)?,
        unicast6: match crate::unreachable::unicast_socket(cfg.server.send_buffer, true) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no IPv6 unicast data socket: unicast fallback to IPv6 receivers is off");
                None
            }
        },
    };
    let dscp = cfg.server.dscp();
    for (what, sock) in [
        ("control", Some(&ctrl)),
        ("control (unvalidated replies)", Some(&unvalidated)),
        ("multicast data", Some(&data.multicast)),
        ("unicast data", Some(&data.unicast)),
        ("IPv6 unicast data", data.unicast6.as_ref()),
    ] {
        if let Some(sock) = sock {
            dscp.apply(sock).with_context(|| {
                format!("server.dscp {dscp}: cannot set it on the {what} socket")
            })?;
        }
    }
    // Wake from ppoll within ~1 us of a pacing deadline (default slack is 50 us).
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    tracing::info!(control = %ctrl.local_addr()?, titles = titles.len(), identity = %trusted.fingerprint(), %dscp,
        tickets = %tickets.db_path().display(), origins = origins.len(), "mcastd serving");

    // Ticket checks run on their own thread; replies leave from the control socket.
    let tickets = crate::ticket::worker::TicketWorker::start(tickets, ctrl.try_clone()?)?;
    let mut params = cfg.channel_params();
    params.sync_signer = Some(identity);
    let mut mgr = ChannelManager::new(params, titles, Instant::now());
    mgr.count_archives_skipped(skipped);
    mgr.set_delegations(delegations);
    // Hot-add: rescan the archive directory every `archive_rescan_ms` and on SIGHUP.
    let rescan_every = (cfg.server.archive_rescan_ms > 0)
        .then(|| Duration::from_millis(cfg.server.archive_rescan_ms));
    let mut next_rescan = rescan_every.map(|d| Instant::now() + d);
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("cannot handle SIGHUP")?;
    // Scheduled loops (overnight pre-load): opened at their window's start, closed at its end.
    let mut schedule = crate::schedule::Scheduler::new(
        cfg.schedule_plans()
            .map_err(|e| anyhow::anyhow!("config: {e}"))?,
    );
    let known: Vec<String> = mgr.title_names().map(str::to_string).collect();
    for t in schedule.titles() {
        if !known.contains(&t) {
            tracing::warn!(title = %t, "scheduled title is not in the archive directory; its window will be skipped");
        }
    }
    for t in schedule.refused_outside() {
        mgr.set_window_closed(&t, true);
    }
    // Heartbeats to traffic directors, HTTP health status, SIGUSR1/SIGUSR2 draining.
    let mut beats = crate::heartbeat::HeartbeatDriver::start(cfg)?;
    let mut buf = vec![0u8; MAX_CONTROL_LEN + 1];
    let mut batch = PacketBatch::with_capacity(BATCH, DATA_HEADER_LEN + 65_536);
    let mut sender = BatchSender::new(&data.multicast, true);
    tracing::info!(gso = sender.gso(), batch = BATCH, "data send path");
    let mut cur: Option<(ArchiveId, Arc<[SocketAddr]>)> = None;
    let mut extras = crate::archive::extras::ExtraCache::default();
    let mut send_errors = 0u64;
    let mut unvalidated_unsent = 0u64;
    // systemd (Type=notify): ready now that every socket is bound; watchdog pings from the loop.
    let mut notify = crate::systemd::Notifier::from_env();
    notify.ready(Instant::now(), &status(&mgr));
    let mut metrics = crate::metrics::MetricsDriver::new(beats.metrics(), Instant::now());
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        notify.tick(now, || status(&mgr));
        for _ in 0..256 {
            match ctrl.recv_from(&mut buf) {
                Ok((n, from)) => {
                    mgr.handle_control(now, from, &buf[..n]);
                    // Play tickets (from proven addresses only) go to the ticket worker.
                    while let Some((from, dg)) = mgr.poll_play() {
                        if !tickets.submit(from, dg) {
                            mgr.count_play_shed();
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "control recv error");
                    break;
                }
            }
        }
        while let Some(o) = tickets.poll_outcome() {
            mgr.count_play(o == crate::ticket::worker::Outcome::Granted);
        }
        run_schedule(&mut schedule, &mut mgr, now);
        let hup_now = hup.swap(false, Ordering::Relaxed);
        if hup_now || next_rescan.is_some_and(|t| now >= t) {
            next_rescan = rescan_every.map(|d| now + d);
            match archives.rescan(&mut mgr) {
                Ok(r) => {
                    if r.added + r.replaced > 0 {
                        beats.titles_changed(now);
                    }
                    if hup_now {
                        tracing::info!(
                            added = r.added,
                            replaced = r.replaced,
                            skipped = r.skipped,
                            deferred = r.deferred,
                            titles = mgr.title_names().count(),
                            "archive directory rescanned (SIGHUP)"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "archive directory rescan failed")
                }
            }
        }
        mgr.handle_timeout(now);
        beats.poll(now, &mut mgr, &ctrl);
        read_head_chunks(&archives.files, &mut mgr);
        while let Some((to, bytes)) = mgr.poll_unvalidated_reply() {
            if let Err(e) = unvalidated.send_to(&bytes, to) {
                unvalidated_unsent += 1;
                tracing::trace!(%to, error = %e, "reply to an unvalidated address not sent");
            }
        }
        while let Some((to, bytes)) = mgr.poll_reply() {
            if let Err(e) = ctrl.send_to(&bytes, to) {
                tracing::debug!(%to, error = %e, "control reply not sent");
            }
        }
        // Paced sends; bounded per turn so control traffic is never starved. Due packets with
        // the same destinations and archive are batched: one sendmmsg (GSO) per destination.
        for _ in 0..MAX_PER_TURN {
            let Some(t) = mgr.poll_transmit(now) else {
                break;
            };
            let same = cur.as_ref().is_some_and(|(id, d)| {
                *id == t.archive_id && (Arc::ptr_eq(d, &t.dests) || **d == *t.dests)
            });
            if !same || batch.len() >= BATCH {
                flush(
                    &mut batch,
                    &cur,
                    &archives.files,
                    &data,
                    &mut sender,
                    &mut send_errors,
                    &mut mgr,
                )?;
                cur = Some((t.archive_id, t.dests.clone()));
            }
            match &t.payload {
                TransmitPayload::Sync(s) => batch.push(&t.header, s),
                TransmitPayload::Packet(crate::archive::PacketId::Extra(e)) => {
                    let a = archives
                        .files
                        .get(&t.archive_id)
                        .expect("channels only loop loaded archives");
                    match crate::archive::fec_file::extra_symbol(&mut extras, a, *e) {
                        Some(sym) => batch.push(&t.header, &sym),
                        None => tracing::warn!(
                            archive = %a.path.display(),
                            extra = e,
                            "extra FEC symbol not made: the archive's data could not be read"
                        ),
                    }
                }
                TransmitPayload::Packet(id) => {
                    let a = archives
                        .files
                        .get(&t.archive_id)
                        .expect("channels only loop loaded archives");
                    let (off, len) = a
                        .layout
                        .packet_range(*id)
                        .expect("carousel yields packets of the archive");
                    batch.push_file(&t.header, off, len);
                }
            }
        }
        flush(
            &mut batch,
            &cur,
            &archives.files,
            &data,
            &mut sender,
            &mut send_errors,
            &mut mgr,
        )?;
        while let Some(ev) = mgr.poll_event() {
            log_event(&ev);
        }
        let extra = crate::metrics::ServerExtras {
            send_errors,
            unvalidated_unsent,
            state: beats.state(),
            channel_slots: cfg.server.channels as u32,
        };
        metrics.poll(Instant::now(), &mut mgr, extra);
        let wait = mgr
            .poll_timeout()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200))
            .min(
                beats
                    .poll_timeout()
                    .saturating_duration_since(Instant::now()),
            )
            .min(notify.poll_timeout().map_or(Duration::MAX, |t| {
                t.saturating_duration_since(Instant::now())
            }))
            .min(next_rescan.map_or(Duration::MAX, |t| {
                t.saturating_duration_since(Instant::now())
            }));
        if wait > Duration::ZERO {
            // ppoll takes a nanosecond timeout: paced sends at high rates wake on time rather
            // than on poll's millisecond grid (timer slack is set low at start-up).
            // The unicast data socket wakes us with POLLERR when ICMP reports an address
            // unreachable (reported whatever the requested events).
            // Without an IPv6 socket the IPv4 one stands in its slot (polled, not read twice).
            let unicast6 = data.unicast6.as_ref().unwrap_or(&data.unicast);
            let mut fds = [
                nix::poll::PollFd::new(ctrl.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(data.unicast.as_fd(), nix::poll::PollFlags::empty()),
                nix::poll::PollFd::new(unicast6.as_fd(), nix::poll::PollFlags::empty()),
            ];
            let ts = nix::sys::time::TimeSpec::from_duration(wait);
            match nix::poll::ppoll(&mut fds, Some(ts), None) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll on control socket"),
            }
            let err = |f: &nix::poll::PollFd| {
                f.revents()
                    .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLERR))
            };
            if err(&fds[1]) {
                read_unreachable(&data.unicast, &mut mgr);
            }
            if data.unicast6.is_some() && err(&fds[2]) {
                read_unreachable(unicast6, &mut mgr);
            }
        }
    }
    notify.stopping(&format!("stopping; {}", status(&mgr)));
    beats.stopping(&mgr, &ctrl);
    let counters = serde_json::to_string(mgr.counters()).unwrap_or_default();
    tracing::info!(%counters, unvalidated_unsent, "mcastd stopping");
    Ok(())
}

/// The one-line `STATUS=` systemd shows for the server (`systemctl status mcastd`).
fn status(mgr: &ChannelManager) -> String {
    let c = mgr.counters();
    format!(
        "titles: {}, open channels: {}, joins: {}, completed: {}{}",
        mgr.title_names().count(),
        mgr.open_channels(),
        c.joins,
        c.completions,
        if mgr.is_draining() { " (draining)" } else { "" }
    )
}

/// Apply the schedule's due open/close actions to the channels.
fn run_schedule(schedule: &mut crate::schedule::Scheduler, mgr: &mut ChannelManager, now: Instant) {
    if schedule.is_empty() {
        return;
    }
    let unix = crate::process::unix_secs() as i64;
    for a in schedule.poll(unix) {
        match a {
            crate::schedule::Action::Open {
                title,
                rate_cap_bps,
            } => match mgr.open_scheduled(now, &title, rate_cap_bps) {
                Some(channel) => {
                    tracing::info!(%title, channel, rate_cap_bps, "scheduled window open: looping")
                }
                None => {
                    tracing::warn!(%title, "scheduled window open, but the title is not here or no channel slot is free")
                }
            },
            crate::schedule::Action::Close { title, refuse } => {
                let dropped = mgr.close_scheduled(&title, refuse);
                tracing::info!(%title, receivers_dropped = dropped, refuse_joins = refuse, "scheduled window closed: loop stopped");
            }
        }
    }
}

fn log_event(ev: &Event) {
    match ev {
        Event::ChannelOpened {
            channel,
            title,
            group,
        } => {
            tracing::info!(channel, title, %group, "channel opened")
        }
        Event::ChannelClosed {
            channel,
            title,
            loops,
            packets,
        } => {
            tracing::info!(channel, title, loops, packets, "channel closed")
        }
        Event::Joined {
            channel,
            receiver,
            from,
        } => {
            tracing::debug!(channel, receiver = format!("{receiver:016x}"), %from, "receiver joined")
        }
        Event::Completed { channel, receiver } => {
            tracing::info!(
                channel,
                receiver = format!("{receiver:016x}"),
                "receiver completed"
            )
        }
        Event::LeaseExpired { channel, receiver } => {
            tracing::info!(
                channel,
                receiver = format!("{receiver:016x}"),
                "lease expired"
            )
        }
        Event::UnicastStarted {
            channel,
            receiver,
            to,
        } => {
            tracing::info!(channel, receiver = format!("{receiver:016x}"), %to, "unicast fallback started")
        }
        Event::NotHere { title, from } => tracing::info!(title, %from, "title not here"),
    }
}
