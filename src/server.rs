//! The `mcastd` driver: owns the sockets, the archive files and the clock, and feeds the
//! [`ChannelManager`] state machine. One thread; control datagrams, timers and paced sends are
//! interleaved in one loop that sleeps until the next deadline or datagram.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

use crate::archive::{ArchiveFile, ARCHIVE_EXT};
use crate::channel::{ChannelManager, Event, TitleInfo, TransmitPayload};
use crate::config::Config;
use crate::wire::control::{ArchiveId, MAX_CONTROL_LEN};
use crate::wire::data::DATA_HEADER_LEN;

/// Archives this server can loop, verified against its identity at start-up.
pub fn load_titles(
    dir: &Path,
    trusted: &mcast_keys::PublicIdentity,
) -> anyhow::Result<(Vec<TitleInfo>, HashMap<ArchiveId, ArchiveFile>)> {
    let mut titles = Vec::new();
    let mut files = HashMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read archive directory {} (set store.archive_dir, or pack a title first)",
            dir.display()
        )
    })?;
    for e in entries {
        let path = e?.path();
        if path.extension().and_then(|x| x.to_str()) != Some(ARCHIVE_EXT) {
            continue;
        }
        let a = match ArchiveFile::open(&path).and_then(|a| a.verify_signature(trusted).map(|_| a))
        {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(error = %err, "archive skipped");
                continue;
            }
        };
        titles.push(TitleInfo {
            head: Arc::new(a.head.clone()),
            head_bytes: Arc::new(a.head_bytes.clone()),
            archive_len: a.layout.file_len(),
        });
        files.insert(a.head.archive_id, a);
    }
    Ok((titles, files))
}

/// Data socket: multicast out of `iface` with `ttl`, loopback delivery on (receivers on this
/// host), and the requested send buffer.
pub fn data_socket(cfg: &Config) -> anyhow::Result<UdpSocket> {
    let sv = &cfg.server;
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_multicast_if_v4(&sv.multicast_iface)
        .with_context(|| {
            format!(
                "server.multicast_iface {}: cannot send multicast from it",
                sv.multicast_iface
            )
        })?;
    s.set_multicast_ttl_v4(sv.ttl)?;
    s.set_multicast_loop_v4(true)?;
    let _ = s.set_send_buffer_size(sv.send_buffer);
    let granted = s.send_buffer_size().unwrap_or(0);
    tracing::info!(
        requested = sv.send_buffer,
        granted,
        "data socket send buffer"
    );
    s.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)).into())?;
    Ok(s.into())
}

/// Run the server until `stop` is set.
pub fn serve(cfg: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let ks = mcast_keys::KeyStore::open(&cfg.store.key_dir)?;
    let trusted = ks.identity()?.public();
    let mut tickets = crate::ticket::TicketService::open(
        &cfg.tickets.db,
        &ks,
        trusted,
        cfg.tickets.retry_secs,
    )?;
    let (titles, files) = load_titles(&cfg.store.archive_dir, &trusted)?;
    if titles.is_empty() {
        tracing::warn!(dir = %cfg.store.archive_dir.display(), "no archives to serve; pack one with `mcastd pack`");
    }
    let ctrl = UdpSocket::bind(cfg.server.control).with_context(|| {
        format!(
            "cannot bind control endpoint {} (server.control): in use by another mcastd?",
            cfg.server.control
        )
    })?;
    ctrl.set_nonblocking(true)?;
    let data = data_socket(cfg)?;
    tracing::info!(control = %ctrl.local_addr()?, titles = titles.len(), identity = %trusted.fingerprint(),
        tickets = %tickets.db_path().display(), "mcastd serving");

    let mut mgr = ChannelManager::new(cfg.channel_params(), titles, Instant::now());
    let mut buf = vec![0u8; MAX_CONTROL_LEN + 1];
    let mut pkt = Vec::with_capacity(DATA_HEADER_LEN + 65_536);
    let mut send_errors = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for _ in 0..256 {
            match ctrl.recv_from(&mut buf) {
                Ok((n, from)) => {
                    // Play tickets go to the ticket service; everything else to the channels.
                    let unix = crate::ticket::unix_now();
                    match tickets.handle_datagram(&buf[..n], from, unix) {
                        Some(reply) => {
                            if let Err(e) = ctrl.send_to(&reply, from) {
                                tracing::debug!(to = %from, error = %e, "play reply not sent");
                            }
                        }
                        None => mgr.handle_control(now, from, &buf[..n]),
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
        mgr.handle_timeout(now);
        while let Some((to, bytes)) = mgr.poll_reply() {
            if let Err(e) = ctrl.send_to(&bytes, to) {
                tracing::debug!(%to, error = %e, "control reply not sent");
            }
        }
        // Paced sends; bounded per turn so control traffic is never starved.
        for _ in 0..1024 {
            let Some(t) = mgr.poll_transmit(now) else {
                break;
            };
            pkt.clear();
            pkt.extend_from_slice(&t.header);
            match &t.payload {
                TransmitPayload::Sync(s) => pkt.extend_from_slice(s),
                TransmitPayload::Packet(id) => {
                    let a = files
                        .get(&t.archive_id)
                        .expect("channels only loop loaded archives");
                    let (off, len) = a
                        .layout
                        .packet_range(*id)
                        .expect("carousel yields packets of the archive");
                    pkt.resize(DATA_HEADER_LEN + len, 0);
                    std::os::unix::fs::FileExt::read_exact_at(
                        &a.file,
                        &mut pkt[DATA_HEADER_LEN..],
                        off,
                    )
                    .with_context(|| format!("reading {}", a.path.display()))?;
                }
            }
            for dest in t.dests.iter() {
                if let Err(e) = data.send_to(&pkt, dest) {
                    send_errors += 1;
                    if send_errors.is_power_of_two() {
                        tracing::warn!(%dest, error = %e, send_errors, "data send failed");
                    }
                }
            }
        }
        while let Some(ev) = mgr.poll_event() {
            log_event(&ev);
        }
        let wait = mgr
            .poll_timeout()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        if wait > Duration::ZERO {
            let mut fds = [nix::poll::PollFd::new(
                ctrl.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = wait.as_millis().clamp(1, 200) as u16;
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll on control socket"),
            }
        }
    }
    tracing::info!(counters = ?mgr.counters(), "mcastd stopping");
    Ok(())
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
