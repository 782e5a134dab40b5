//! `mcastd`'s side of the traffic directors: the heartbeat [`Emitter`] (sans-I/O, in
//! `mcast_proto::heartbeat`: takes a snapshot of the channel manager and `now`, returns the
//! datagram and its next deadline) and the small [`HeartbeatDriver`] the server loop calls once per turn, which sends heartbeats
//! to every configured director, keeps the HTTP health status current and turns SIGUSR1 /
//! SIGUSR2 into draining on / off.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::channel::ChannelManager;
use crate::config::Config;
use crate::health::HealthStatus;
use crate::metrics::ServerMetrics;
use crate::process::unix_ms;
use crate::wire::director::ServerState;
pub use mcast_proto::heartbeat::{Emitter, EmitterParams, Snapshot};

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
    /// What `/metrics` shows (served beside `/health`).
    metrics: Option<Arc<Mutex<ServerMetrics>>>,
    /// The state the last heartbeat announced.
    state: Option<ServerState>,
    drain: Arc<AtomicBool>,
    undrain: Arc<AtomicBool>,
    draining: bool,
    sent: u64,
    send_errors: u64,
}

impl HeartbeatDriver {
    /// Set up from `[directors]` and `[server] health_listen` (starts the HTTP thread: health
    /// checks and metrics).
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
        let (health, metrics) = match cfg.health_listen()? {
            Some(addr) => {
                let metrics = Arc::new(Mutex::new(ServerMetrics::default()));
                (
                    Some(crate::health::spawn(addr, metrics.clone())?),
                    Some(metrics),
                )
            }
            None => (None, None),
        };
        if !d.addrs.is_empty() {
            tracing::info!(directors = ?d.addrs, advertise = %server, interval_ms = d.heartbeat_ms,
                capacity_bps, "heartbeats to traffic directors");
        }
        Ok(HeartbeatDriver {
            emitter: Emitter::new(p, rand::random(), Instant::now()),
            directors: d.addrs.clone(),
            health,
            metrics,
            state: None,
            drain,
            undrain,
            draining: false,
            sent: 0,
            send_errors: 0,
        })
    }

    /// What `/metrics` shows, when `[server] health_listen` serves it.
    pub fn metrics(&self) -> Option<Arc<Mutex<ServerMetrics>>> {
        self.metrics.clone()
    }

    /// The state the last heartbeat announced (`None` before the first).
    pub fn state(&self) -> Option<ServerState> {
        self.state
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
            self.emitter.beat_now(now); // tell the directors at once
        }
        if self.undrain.swap(false, Ordering::Relaxed) && self.draining {
            self.draining = false;
            tracing::info!("online again (SIGUSR2): taking new receivers");
            self.emitter.beat_now(now);
        }
        mgr.set_draining(self.draining);
        if self.emitter.is_due(now) {
            self.beat(now, mgr, sock, false);
        }
    }

    /// The titles held changed (an archive appeared): tell the directors at the next turn
    /// rather than at the next interval.
    pub fn titles_changed(&mut self, now: Instant) {
        self.emitter.beat_now(now);
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
        self.state = Some(hb.state);
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
