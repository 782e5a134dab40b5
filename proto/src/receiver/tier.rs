//! The receiver's tier engine (throughput tiers, DESIGN.md §2; reference col. 5–6): which of a
//! title's channels — looping at different rates — this receiver should be on. Sans-I/O: the
//! driver reports what arrived, what was lost and one-way delay samples; the engine answers
//! with tier moves. Receiver-driven, like layered multicast (RLM):
//!
//! * start on a conservative tier;
//! * every `interval`, judge the interval *congested* if loss exceeds `loss_down` or the
//!   one-way delay rose more than `delay_rise` above its minimum (a queue is building);
//!   `down_after` congested intervals in a row move one tier down;
//! * until the first congestion, probe up after one calm interval (a slow start, as in
//!   TCP: a new receiver knows nothing of its link, and its first tiers are the cheap ones);
//! * after `probe_after` on a tier without congestion, *probe* one tier up (a join
//!   experiment); a probe that sees congestion within `probe_hold` falls back at once and
//!   quadruples that tier's probe timer (up to `probe_max`), so a receiver whose link cannot carry
//!   the next tier stops trying often; a probe that holds succeeds, resets that tier's timer
//!   and halves the next one's (the link changed, so trying higher is worth it sooner).
//!
//! What it reports to the server (throughput and loss, which set the tier's rate) comes only
//! from judged intervals on a tier it holds: a probe's losses are the experimenter's, and must
//! not pull down the rate of the receivers that already fit the probed tier.
//!
//! Delay samples need no synchronised clocks: only the rise above the smallest
//! `arrival − send time` difference seen on the current tier matters.

use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Clone, Debug)]
pub struct TierParams {
    /// Channel rates of the title's tiers, ascending (bit/s).
    pub tiers_bps: Vec<u64>,
    /// Tier to start on (index into `tiers_bps`).
    pub start: usize,
    pub interval: Duration,
    pub loss_down: f64,
    pub delay_rise: Duration,
    pub down_after: u32,
    pub probe_after: Duration,
    pub probe_hold: Duration,
    pub probe_max: Duration,
    /// After a move down, intervals are measured but not judged for this long: the old
    /// channel's traffic takes a while to stop (a switch forwards a group until its IGMP
    /// last-member queries go unanswered, 2 s by default), and that loss must not push the
    /// receiver further down. A probe is judged from its first interval: its loss is the
    /// answer to the experiment.
    pub settle: Duration,
}

impl TierParams {
    pub fn new(tiers_bps: Vec<u64>) -> TierParams {
        TierParams {
            tiers_bps,
            start: 0,
            interval: Duration::from_millis(500),
            loss_down: 0.02,
            delay_rise: Duration::from_millis(25),
            down_after: 2,
            probe_after: Duration::from_secs(1),
            probe_hold: Duration::from_secs(1),
            probe_max: Duration::from_secs(60),
            settle: Duration::from_millis(2500),
        }
    }
}

/// A decision for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierMove {
    /// Leave the current channel and join this tier's channel (progress is kept: the download
    /// state does not depend on the channel).
    To(usize),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TierCounters {
    pub moves_down: u32,
    pub probes: u32,
    pub probes_failed: u32,
    /// Throughput of the last judged interval on a held tier, bit/s (reported to the server;
    /// 0: nothing to report yet since the last move).
    pub measured_bps: u64,
    /// Loss of that interval, parts per million.
    pub loss_ppm: u32,
}

struct Probe {
    from: usize,
    until: Instant,
}

pub struct TierEngine {
    p: TierParams,
    tier: usize,
    interval_start: Instant,
    bytes: u64,
    received: u64,
    lost: u64,
    min_delay: Option<i64>,
    max_rise: i64,
    congested_run: u32,
    stable_since: Instant,
    /// Probe timer per tier: how long to stay calm below it before trying it.
    probe_timer: Vec<Duration>,
    probe: Option<Probe>,
    settle_until: Instant,
    /// No congestion seen yet: probe after one calm interval instead of `probe_after`.
    slow_start: bool,
    last: (u64, u32, i64),
    pub counters: TierCounters,
}

impl TierEngine {
    pub fn new(p: TierParams, now: Instant) -> TierEngine {
        assert!(!p.tiers_bps.is_empty(), "at least one tier");
        let tier = p.start.min(p.tiers_bps.len() - 1);
        TierEngine {
            probe_timer: vec![p.probe_after; p.tiers_bps.len()],
            p,
            tier,
            interval_start: now,
            bytes: 0,
            received: 0,
            lost: 0,
            min_delay: None,
            max_rise: 0,
            congested_run: 0,
            stable_since: now,
            probe: None,
            settle_until: now,
            slow_start: true,
            last: (0, 0, 0),
            counters: TierCounters::default(),
        }
    }

    pub fn tier(&self) -> usize {
        self.tier
    }

    /// (throughput bit/s, loss ppm, delay rise µs) of the last interval, judged or not (logs).
    pub fn last_interval(&self) -> (u64, u32, i64) {
        self.last
    }

    pub fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// A packet of the current channel arrived; `delay_us` is `arrival − send time` in
    /// microseconds on any pair of clocks (only its changes are used), when known.
    pub fn on_packet(&mut self, bytes: usize, delay_us: Option<i64>) {
        self.bytes += bytes as u64;
        self.received += 1;
        if let Some(d) = delay_us {
            self.on_delay(d);
        }
    }

    /// A one-way delay sample (`arrival − send time`, any clocks) without a data packet,
    /// e.g. from a SYNC.
    pub fn on_delay(&mut self, delay_us: i64) {
        let min = *self.min_delay.get_or_insert(delay_us);
        if delay_us < min {
            self.min_delay = Some(delay_us);
        }
        self.max_rise = self
            .max_rise
            .max(delay_us - self.min_delay.unwrap_or(delay_us));
    }

    /// Packets of the current channel found lost (gap detection).
    pub fn on_lost(&mut self, n: u64) {
        self.lost += n;
    }

    /// When the engine next wants [`Self::poll`].
    pub fn next_deadline(&self) -> Instant {
        self.interval_start + self.p.interval
    }

    /// The end of a settle after a move down (`None` during a probe: that ends when an
    /// interval is judged).
    pub fn settle_end(&self) -> Option<Instant> {
        self.probe.is_none().then_some(self.settle_until)
    }

    /// Just moved: losses now are the old channel's tail, not this one's (NAKs can wait).
    pub fn settling(&self, now: Instant) -> bool {
        self.probe.is_some() || now < self.settle_until
    }

    fn switch(&mut self, to: usize, now: Instant) -> TierMove {
        if to < self.tier {
            self.settle_until = now + self.p.settle;
        }
        self.tier = to;
        self.min_delay = None; // a new channel, a new queue
        self.congested_run = 0;
        self.stable_since = now;
        self.counters.measured_bps = 0;
        self.counters.loss_ppm = 0;
        TierMove::To(to)
    }

    /// Judge the interval if it is over; maybe move.
    pub fn poll(&mut self, now: Instant) -> Option<TierMove> {
        if now < self.next_deadline() {
            return None;
        }
        let secs = now
            .saturating_duration_since(self.interval_start)
            .as_secs_f64()
            .max(1e-6);
        let total = self.received + self.lost;
        let loss = if total == 0 {
            0.0
        } else {
            self.lost as f64 / total as f64
        };
        self.last = (
            (self.bytes as f64 * 8.0 / secs) as u64,
            (loss * 1e6) as u32,
            self.max_rise,
        );
        let judged = now >= self.settle_until;
        if judged && self.probe.is_none() {
            self.counters.measured_bps = (self.bytes as f64 * 8.0 / secs) as u64;
            self.counters.loss_ppm = (loss * 1e6) as u32;
        }
        let congested = judged
            && (loss > self.p.loss_down || self.max_rise > self.p.delay_rise.as_micros() as i64);
        if congested {
            self.slow_start = false;
        }
        self.interval_start = now;
        self.bytes = 0;
        self.received = 0;
        self.lost = 0;
        self.max_rise = 0;

        if let Some(probe) = &self.probe {
            if congested {
                // The join experiment failed: back down, and wait four times as long next
                // time — or the longest, when what got through was not even half the tier's
                // rate (the link is far too slow for it; a failed probe floods it for as long
                // as the switch takes to honour the leave, so futile ones are costly).
                let (from, failed) = (probe.from, self.tier);
                self.probe = None;
                self.counters.probes_failed += 1;
                self.probe_timer[failed] = if self.last.0 < self.p.tiers_bps[failed] / 2 {
                    self.p.probe_max
                } else {
                    (self.probe_timer[failed] * 4).min(self.p.probe_max)
                };
                return Some(self.switch(from, now));
            }
            if now >= probe.until {
                // The link carries this tier: conditions changed, so the next tier up is
                // worth trying sooner than its backed-off timer says.
                let t = self.tier;
                self.probe = None;
                self.probe_timer[t] = self.p.probe_after;
                if let Some(next) = self.probe_timer.get_mut(t + 1) {
                    *next = (*next / 2).max(self.p.probe_after);
                }
            }
            return None;
        }
        if congested {
            self.congested_run += 1;
            self.stable_since = now;
            if self.congested_run >= self.p.down_after && self.tier > 0 {
                self.counters.moves_down += 1;
                return Some(self.switch(self.tier - 1, now));
            }
            return None;
        }
        self.congested_run = 0;
        let up = self.tier + 1;
        let wait = if self.slow_start {
            self.p.interval
        } else {
            self.probe_timer[up.min(self.probe_timer.len() - 1)]
        };
        if up < self.p.tiers_bps.len()
            && now >= self.settle_until
            && now.saturating_duration_since(self.stable_since) >= wait
        {
            self.counters.probes += 1;
            self.probe = Some(Probe {
                from: self.tier,
                until: now + self.p.probe_hold,
            });
            return Some(self.switch(up, now));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver behind a link of `cap(t)` bit/s: a channel faster than the link loses the
    /// excess and builds a queue (rising delay).
    fn run(tiers: &[u64], cap: impl Fn(f64) -> u64, secs: f64) -> (TierEngine, Vec<(f64, usize)>) {
        let t0 = Instant::now();
        let mut e = TierEngine::new(TierParams::new(tiers.to_vec()), t0);
        let mut moves = Vec::new();
        let step = 0.01;
        let mut t = 0.0;
        let mut queue_ms = 0.0f64;
        while t < secs {
            let now = t0 + Duration::from_secs_f64(t);
            let rate = tiers[e.tier()] as f64;
            let c = cap(t) as f64;
            let pkts = (rate * step / (1304.0 * 8.0)).round() as u64;
            let through = ((c.min(rate) * step) / (1304.0 * 8.0)).round() as u64;
            queue_ms = if rate > c {
                (queue_ms + 10.0).min(200.0)
            } else {
                (queue_ms - 10.0).max(0.0)
            };
            for _ in 0..through {
                e.on_packet(1280, Some((queue_ms * 1000.0) as i64));
            }
            if pkts > through && queue_ms >= 200.0 {
                e.on_lost(pkts - through);
            }
            if let Some(TierMove::To(x)) = e.poll(now) {
                moves.push((t, x));
            }
            t += step;
        }
        (e, moves)
    }

    const TIERS: [u64; 5] = [
        4_000_000,
        16_000_000,
        64_000_000,
        256_000_000,
        1_024_000_000,
    ];

    #[test]
    fn settles_on_the_fastest_tier_the_link_carries() {
        for (cap, want) in [
            (8_000_000u64, 0usize),
            (40_000_000, 1),
            (200_000_000, 2),
            (2_000_000_000, 4),
        ] {
            let (e, moves) = run(&TIERS, |_| cap, 120.0);
            assert_eq!(e.tier(), want, "link {cap}: moves {moves:?}");
            // Hysteresis: failed probes back off, so moves stay few over two minutes.
            assert!(
                moves.len() <= 16,
                "link {cap}: {} moves {moves:?}",
                moves.len()
            );
        }
    }

    #[test]
    fn follows_a_link_that_changes_mid_transfer() {
        // 200 Mbit/s, then 20 Mbit/s from t = 60 s, then 500 Mbit/s from t = 120 s.
        let cap = |t: f64| {
            if t < 60.0 {
                200_000_000
            } else if t < 120.0 {
                20_000_000
            } else {
                500_000_000
            }
        };
        let (e, moves) = run(&TIERS, cap, 200.0);
        let at = |t: f64| {
            moves
                .iter()
                .rev()
                .find(|(m, _)| *m <= t)
                .map(|m| m.1)
                .unwrap_or(0)
        };
        assert_eq!(at(59.0), 2, "{moves:?}");
        // Down within a few intervals of the drop.
        let first_down = moves
            .iter()
            .find(|(t, x)| *t >= 60.0 && *x <= 1)
            .expect("moved down");
        assert!(first_down.0 < 62.0, "{moves:?}");
        assert_eq!(at(119.0), 1, "{moves:?}");
        assert_eq!(e.tier(), 3, "{moves:?}");
        println!(
            "tier changes over 200 s: {} ({} probes, {} failed)",
            moves.len(),
            e.counters.probes,
            e.counters.probes_failed
        );
        assert!(moves.len() <= 30, "{moves:?}");
    }
}
