//! `mcastd`'s side of the traffic directors: the heartbeat [`Emitter`] (sans-I/O: takes a
//! snapshot of the channel manager and `now`, returns the datagram and its next deadline) and
//! the small [`HeartbeatDriver`] the server loop calls once per turn, which sends heartbeats
//! to every configured director, keeps the HTTP health status current and turns SIGUSR1 /
//! SIGUSR2 into draining on / off.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::channel::ChannelManager;
use crate::config::Config;
use crate::health::HealthStatus;
use crate::process::unix_ms;
use crate::wire::director::{Heartbeat, HeldTitle, ServerState};

/// Fixed facts of one server's heartbeats.
#[derive(Clone, Debug)]
pub struct EmitterParams {
    pub server: SocketAddrV4,
    pub interval: Duration,
    pub key: [u8; 32],
    pub capacity_bps: u64,
    pub max_tier_bps: u64,
    /// Overloaded at or above this share of capacity (measured send rate).
    pub overload_share: f64,
    pub channel_slots: u32,
}

/// What the server is doing now (from the channel manager).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub titles: Vec<HeldTitle>,
    pub channels: u32,
    pub receivers: u32,
    /// Payload bytes sent since start (a counter: the emitter turns it into a rate).
    pub payload_bytes_sent: u64,
}

impl Snapshot {
    pub fn of(mgr: &ChannelManager) -> Snapshot {
        let st = mgr.stats();
        let looping: std::collections::BTreeSet<&str> =
            st.channels.iter().map(|c| c.title.as_str()).collect();
        Snapshot {
            titles: mgr
                .title_names()
                .map(|t| HeldTitle {
                    looping: looping.contains(t),
                    title: t.to_string(),
                })
                .collect(),
            channels: st.channels.len() as u32,
            receivers: st.channels.iter().map(|c| c.members as u32).sum(),
            payload_bytes_sent: st.counters.payload_bytes_sent,
        }
    }
}

/// Heartbeat state machine: sequence numbers, the measured send rate and the server state.
pub struct Emitter {
    p: EmitterParams,
    boot_id: u64,
    seq: u64,
    next_due: Instant,
    last: Option<(Instant, u64)>,
    throughput_bps: u64,
}

impl Emitter {
    pub fn new(p: EmitterParams, boot_id: u64, now: Instant) -> Emitter {
        Emitter {
            p,
            boot_id,
            seq: 0,
            next_due: now,
            last: None,
            throughput_bps: 0,
        }
    }

    /// When the next heartbeat is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_due
    }

    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    /// The state the server reports.
    pub fn state(&self, snap: &Snapshot, draining: bool, stopping: bool) -> ServerState {
        if stopping {
            ServerState::Stopping
        } else if draining {
            ServerState::Draining
        } else if (self.p.channel_slots > 0 && snap.channels >= self.p.channel_slots)
            || (self.p.capacity_bps > 0
                && self.throughput_bps as f64 >= self.p.overload_share * self.p.capacity_bps as f64)
        {
            ServerState::Overloaded
        } else {
            ServerState::Online
        }
    }

    /// Build the next heartbeat (and schedule the one after).
    pub fn emit(
        &mut self,
        now: Instant,
        unix_ms: u64,
        snap: Snapshot,
        draining: bool,
        stopping: bool,
    ) -> Heartbeat {
        if let Some((at, bytes)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                self.throughput_bps =
                    (snap.payload_bytes_sent.saturating_sub(bytes) as f64 * 8.0 / dt) as u64;
            }
        }
        self.last = Some((now, snap.payload_bytes_sent));
        self.seq += 1;
        // On the interval grid, but never a burst to catch up after a stall.
        self.next_due = (self.next_due + self.p.interval).max(now + self.p.interval / 2);
        let state = self.state(&snap, draining, stopping);
        Heartbeat {
            server: self.p.server,
            boot_id: self.boot_id,
            seq: self.seq,
            unix_ms,
            interval_ms: self.p.interval.as_millis().clamp(1, u32::MAX as u128) as u32,
            state,
            channels: snap.channels,
            channel_slots: self.p.channel_slots,
            receivers: snap.receivers,
            throughput_bps: self.throughput_bps,
            capacity_bps: self.p.capacity_bps,
            max_tier_bps: self.p.max_tier_bps,
            titles: snap.titles,
        }
    }

    pub fn key(&self) -> &[u8; 32] {
        &self.p.key
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }
}

/// Read a heartbeat key file: 64 hex characters (surrounding whitespace ignored).
pub fn read_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read heartbeat key file {}", path.display()))?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "heartbeat key file {}: expected 64 hex characters (make one with `mcast-director genkey -o FILE`)",
                path.display()
            )
        })
}

/// The server loop's hook: heartbeats, health status, drain signals.
pub struct HeartbeatDriver {
    emitter: Emitter,
    directors: Vec<SocketAddr>,
    health: Option<Arc<Mutex<HealthStatus>>>,
    drain: Arc<AtomicBool>,
    undrain: Arc<AtomicBool>,
    draining: bool,
    sent: u64,
    send_errors: u64,
}

impl HeartbeatDriver {
    /// Set up from `[directors]` and `[server] health_listen` (starts the health thread).
    pub fn start(cfg: &Config) -> anyhow::Result<HeartbeatDriver> {
        let d = &cfg.directors;
        let key = if d.addrs.is_empty() {
            [0u8; 32]
        } else {
            read_key(&d.key_file)?
        };
        let server = cfg.advertised_control()?;
        let tiers = cfg.channel_params().tiers();
        let max_tier_bps = tiers.iter().copied().max().unwrap_or(0);
        let capacity_bps = if d.capacity_mbps > 0.0 {
            (d.capacity_mbps * 1e6) as u64
        } else {
            max_tier_bps.saturating_mul(cfg.server.channels as u64)
        };
        let p = EmitterParams {
            server,
            interval: Duration::from_millis(d.heartbeat_ms),
            key,
            capacity_bps,
            max_tier_bps,
            overload_share: d.overload_share,
            channel_slots: cfg.server.channels as u32,
        };
        let drain = Arc::new(AtomicBool::new(false));
        let undrain = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, drain.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGUSR2, undrain.clone())?;
        let health = match cfg.health_listen()? {
            Some(addr) => Some(crate::health::spawn(addr)?),
            None => None,
        };
        if !d.addrs.is_empty() {
            tracing::info!(directors = ?d.addrs, advertise = %server, interval_ms = d.heartbeat_ms,
                capacity_bps, "heartbeats to traffic directors");
        }
        Ok(HeartbeatDriver {
            emitter: Emitter::new(p, rand::random(), Instant::now()),
            directors: d.addrs.clone(),
            health,
            drain,
            undrain,
            draining: false,
            sent: 0,
            send_errors: 0,
        })
    }

    /// When the driver next wants to run.
    pub fn poll_timeout(&self) -> Instant {
        self.emitter.poll_timeout()
    }

    /// Once per server loop turn: apply drain signals; when due, send a heartbeat and
    /// refresh the health status.
    pub fn poll(&mut self, now: Instant, mgr: &mut ChannelManager, sock: &UdpSocket) {
        if self.drain.swap(false, Ordering::Relaxed) && !self.draining {
            self.draining = true;
            tracing::info!("draining (SIGUSR1): current receivers finish, new joins are refused");
            self.emitter.next_due = now; // tell the directors at once
        }
        if self.undrain.swap(false, Ordering::Relaxed) && self.draining {
            self.draining = false;
            tracing::info!("online again (SIGUSR2): taking new receivers");
            self.emitter.next_due = now;
        }
        mgr.set_draining(self.draining);
        if self.emitter.is_due(now) {
            self.beat(now, mgr, sock, false);
        }
    }

    /// A last heartbeat saying the server stops, so directors stop routing to it at once.
    pub fn stopping(&mut self, mgr: &ChannelManager, sock: &UdpSocket) {
        self.beat(Instant::now(), mgr, sock, true);
    }

    fn beat(&mut self, now: Instant, mgr: &ChannelManager, sock: &UdpSocket, stopping: bool) {
        let snap = Snapshot::of(mgr);
        let hb = self
            .emitter
            .emit(now, unix_ms(), snap, self.draining, stopping);
        if let Some(h) = &self.health {
            if let Ok(mut s) = h.lock() {
                *s = HealthStatus::of(&hb, self.emitter.boot_id());
            }
        }
        if self.directors.is_empty() {
            return;
        }
        if hb.fits() < hb.titles.len() && hb.seq == 1 {
            tracing::warn!(
                titles = hb.titles.len(),
                announced = hb.fits(),
                "too many titles for one heartbeat: the rest are not announced to directors"
            );
        }
        let bytes = hb.encode(self.emitter.key());
        for d in &self.directors {
            match sock.send_to(&bytes, d) {
                Ok(_) => self.sent += 1,
                Err(e) => {
                    self.send_errors += 1;
                    if self.send_errors.is_power_of_two() {
                        tracing::warn!(director = %d, error = %e, errors = self.send_errors, "heartbeat not sent");
                    }
                }
            }
        }
        tracing::trace!(seq = hb.seq, state = hb.state.name(), "heartbeat sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> EmitterParams {
        EmitterParams {
            server: "127.0.0.1:7600".parse().unwrap(),
            interval: Duration::from_millis(500),
            key: [1; 32],
            capacity_bps: 100_000_000,
            max_tier_bps: 50_000_000,
            overload_share: 0.9,
            channel_slots: 4,
        }
    }

    fn snap(bytes: u64, channels: u32) -> Snapshot {
        Snapshot {
            titles: vec![HeldTitle {
                title: "film".into(),
                looping: channels > 0,
            }],
            channels,
            receivers: channels * 2,
            payload_bytes_sent: bytes,
        }
    }

    #[test]
    fn sequence_rate_state_and_schedule() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut e = Emitter::new(params(), 9, t);
        assert!(e.is_due(t));
        let h1 = e.emit(t, 1000, snap(0, 1), false, false);
        assert_eq!((h1.seq, h1.boot_id, h1.state), (1, 9, ServerState::Online));
        assert_eq!(e.poll_timeout(), t + ms(500));
        assert!(!e.is_due(t + ms(499)));
        // 5 MB in 0.5 s = 80 Mbit/s: below 90 % of 100 Mbit/s.
        let h2 = e.emit(t + ms(500), 1500, snap(5_000_000, 1), false, false);
        assert_eq!((h2.seq, h2.throughput_bps), (2, 80_000_000));
        assert_eq!(h2.state, ServerState::Online);
        // 6 MB more in 0.5 s = 96 Mbit/s: overloaded.
        let h3 = e.emit(t + ms(1000), 2000, snap(11_000_000, 1), false, false);
        assert_eq!(h3.state, ServerState::Overloaded);
        // All channel slots in use: overloaded too.
        let h4 = e.emit(t + ms(1500), 2500, snap(11_000_000, 4), false, false);
        assert_eq!((h4.throughput_bps, h4.state), (0, ServerState::Overloaded));
        let h5 = e.emit(t + ms(2000), 3000, snap(11_000_000, 1), true, false);
        assert_eq!(h5.state, ServerState::Draining);
        let h6 = e.emit(t + ms(2500), 3500, snap(11_000_000, 1), true, true);
        assert_eq!(h6.state, ServerState::Stopping);
        // After a stall the next one is due half an interval later, not in a burst.
        e.emit(t + ms(10_000), 4000, snap(0, 0), false, false);
        assert_eq!(e.poll_timeout(), t + ms(10_250));
        // What it emits verifies under its key.
        let b = h2.encode(e.key());
        assert_eq!(Heartbeat::open(&b, &[1; 32]).unwrap(), h2);
    }
}
