//! The heartbeat [`Emitter`] of an `mcastd` (FIG. 2): sans-I/O. It takes a [`Snapshot`] of the
//! channel manager, `now` and the wall-clock time, and returns the heartbeat to send and its
//! next deadline; the server's driver (`mcast::heartbeat`) sends it to every director.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::channel::ChannelManager;
use crate::wire::director::{Heartbeat, HeldTitle, ServerState};

/// Fixed facts of one server's heartbeats.
#[derive(Clone, Debug)]
pub struct EmitterParams {
    pub server: SocketAddr,
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

    /// Send the next heartbeat at once (a state change the directors should hear now).
    pub fn beat_now(&mut self, now: Instant) {
        self.next_due = now;
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
