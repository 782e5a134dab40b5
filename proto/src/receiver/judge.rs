//! Is this receiver's path congested, and what can it carry? The judge behind tier moves and
//! the capacity reports that set tier and unicast rates (DESIGN.md §5, step 11).
//!
//! Random loss is not congestion. A lossy Wi-Fi hop or a flaky cable loses a few percent
//! whatever the rate; a bottleneck loses more the faster it is fed, and before it loses it
//! queues. So an interval is *congested* only on evidence that tracks rate:
//!
//! * **delay** — the median one-way delay of the interval (SYNC `send_us` against local
//!   arrival, any two clocks) rose more than `delay_rise` above the path's base delay (the
//!   smallest seen in the last [`BASE_WINDOW`]): a queue is building;
//! * **excess loss** — loss above the *random-loss floor* (the smallest smoothed loss seen on
//!   any tier in calm intervals) by more than `loss_down` and three standard deviations:
//!   loss that grew with rate;
//! * **overrun** — the receiver's own socket dropped datagrams (`SO_RXQ_OVFL`): it is short
//!   of CPU for this rate, whatever the network does.
//!
//! A congested interval also yields the path's *capacity*: what got through, corrected for
//! the random-loss floor (a saturated bottleneck passes exactly its rate). Loss that is not
//! congestion is left to repairs; it never lowers a rate.

use std::time::{Duration, Instant};

/// How long the base (smallest) one-way delay is remembered: long enough to span a tier move
/// and its queue draining, short enough to follow clock drift and route changes.
const BASE_WINDOW: Duration = Duration::from_secs(30);
/// Smoothing of a tier's loss: the share of its tally an interval's decay takes.
const FLOOR_ALPHA: f64 = 0.3;

/// A tier's calm-interval loss, as packets lost of packets sent, older intervals decayed.
#[derive(Clone, Copy, Debug)]
struct LossTally {
    lost: f64,
    n: f64,
}

impl LossTally {
    /// An upper bound (two standard deviations) on the loss rate the tally estimates: a
    /// floor learned from a few hundred packets on a slow tier is noisy, and taking the
    /// smallest of several noisy floors would pick a lucky one — and then judge honest
    /// random loss on the next tier as congestion.
    fn upper(&self) -> f64 {
        let f = self.lost / self.n.max(1.0);
        (f + 2.0 * (f.max(0.001) * (1.0 - f).max(0.0) / self.n.max(1.0)).sqrt()).min(1.0)
    }
}
/// Socket overruns that count as "short of CPU" in one interval: at least this many and
/// at least [`OVERRUN_FRACTION`] of what arrived. The kernel counts dropped buffers, and
/// with GRO one buffer holds up to ~45 datagrams, so a small fraction of buffers can be a
/// large share of the packets (at 1 % a receiver holding a 4 Gbit/s probe lost a third of
/// it and received the archive three times).
const OVERRUN_MIN: u64 = 4;
pub(super) const OVERRUN_FRACTION: f64 = 0.002;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Cause {
    Calm,
    /// Queueing delay rose.
    Delay,
    /// Loss above the random-loss floor.
    Loss,
    /// The receiver's socket overflowed.
    Overrun,
}

/// Loss above the floor that a join's first interval must show to count (see
/// [`Scope::Joining`]).
const JOINING_LOSS: f64 = 0.25;

/// What an interval may be judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: delay, loss, overruns.
    All,
    /// A join's first interval: it carries the switch's own losses (a channel picked up
    /// mid-block, the old one's last packets), which weigh heavily in a probe's short
    /// interval, so loss counts only above [`JOINING_LOSS`] — a path that cannot carry the
    /// probed rate at all still shows at once (a 200 Mbit/s link loses ~80 % of 900).
    Joining,
    /// Only the receiver's own socket overruns: just after a move down the old channel's
    /// traffic still drains through the path (delay and loss say nothing about the new
    /// tier), but it no longer reaches the socket — the kernel drops a group it left — so an
    /// overrun is this tier's, and waiting out the settle would leave a receiver short of
    /// CPU overrunning for seconds.
    OverrunsOnly,
    /// Nothing (measured only).
    Nothing,
}

/// One interval's judgement.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    pub cause: Cause,
    /// Datagram bits per second that arrived.
    pub throughput_bps: u64,
    /// Fraction of the channel's packets lost this interval.
    pub loss: f64,
    /// The random-loss floor it was judged against.
    pub floor: f64,
    /// Median delay rise above base, µs.
    pub rise_us: i64,
    /// What the path carries, when congestion showed it.
    pub capacity_bps: Option<u64>,
}

impl Verdict {
    pub fn congested(&self) -> bool {
        self.cause != Cause::Calm
    }
}

pub struct Judge {
    delay_rise: Duration,
    loss_down: f64,
    bytes: u64,
    received: u64,
    lost: u64,
    overruns: u64,
    /// This interval's delay samples (`arrival − send`, µs).
    delays: Vec<i64>,
    /// Smallest delay per 5-second bucket over [`BASE_WINDOW`]: (bucket start, min).
    base: Vec<(Instant, i64)>,
    /// Smoothed calm-interval loss per tier.
    floor_by_tier: Vec<Option<LossTally>>,
}

impl Judge {
    pub fn new(tiers: usize, delay_rise: Duration, loss_down: f64) -> Judge {
        Judge {
            delay_rise,
            loss_down,
            bytes: 0,
            received: 0,
            lost: 0,
            overruns: 0,
            delays: Vec::with_capacity(16),
            base: Vec::new(),
            floor_by_tier: vec![None; tiers.max(1)],
        }
    }

    /// A datagram of the channel arrived (`bytes` as on the wire, headers included).
    pub fn on_packet(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        self.received += 1;
    }

    /// Packets of the channel found missing (gap detection).
    pub fn on_lost(&mut self, n: u64) {
        self.lost += n;
    }

    /// Datagrams the receiver's socket dropped (its buffer overflowed).
    pub fn on_overrun(&mut self, n: u64) {
        self.overruns += n;
    }

    /// The socket overran in this interval so far (the interval will be judged
    /// [`Cause::Overrun`] whatever else happens in it).
    pub fn overrunning(&self) -> bool {
        self.overruns >= OVERRUN_MIN
            && self.overruns as f64 >= OVERRUN_FRACTION * (self.received + self.overruns) as f64
    }

    /// Forget this interval's counts (not the base delay or the loss floors): a new
    /// interval starts now.
    pub fn restart(&mut self) {
        self.bytes = 0;
        self.received = 0;
        self.lost = 0;
        self.overruns = 0;
        self.delays.clear();
    }

    /// A one-way delay sample: `arrival − send time` in µs on any pair of clocks.
    pub fn on_delay(&mut self, now: Instant, delay_us: i64) {
        self.delays.push(delay_us);
        match self.base.last_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < BASE_WINDOW / 6 => {
                *min = (*min).min(delay_us)
            }
            _ => {
                self.base.push((now, delay_us));
                self.base
                    .retain(|(start, _)| now.saturating_duration_since(*start) < BASE_WINDOW);
            }
        }
    }

    fn base_delay(&self) -> Option<i64> {
        self.base.iter().map(|b| b.1).min()
    }

    /// The random-loss floor: the smallest smoothed calm loss on any tier, each taken at its
    /// upper bound (`None` before a calm interval was seen).
    pub fn floor(&self) -> Option<f64> {
        self.floor_by_tier
            .iter()
            .flatten()
            .map(LossTally::upper)
            .min_by(f64::total_cmp)
    }

    /// Close the interval of `secs` seconds spent on `tier`, judged within `scope` (less than
    /// [`Scope::All`] while a move's old channel still drains: it teaches nothing about this
    /// tier).
    pub fn judge(&mut self, tier: usize, secs: f64, scope: Scope) -> Verdict {
        let judged = matches!(scope, Scope::All | Scope::Joining);
        let secs = secs.max(1e-3);
        let n = self.received + self.lost;
        let loss = if n == 0 {
            0.0
        } else {
            self.lost as f64 / n as f64
        };
        let throughput_bps = (self.bytes as f64 * 8.0 / secs) as u64;
        let rise_us = match (self.base_delay(), self.delays.is_empty()) {
            (Some(base), false) => {
                self.delays.sort_unstable();
                self.delays[self.delays.len() / 2] - base
            }
            _ => 0,
        };
        let floor = self.floor().unwrap_or(0.0);
        let overrun = self.overrunning();
        let delayed = rise_us > self.delay_rise.as_micros() as i64;
        // Loss judged against the floor only once a floor exists; three standard deviations
        // of the floor's binomial noise keep a small sample from looking like congestion.
        let excess = self.floor().is_some_and(|f| {
            let sd = (f.max(0.001) * (1.0 - f) / n.max(1) as f64).sqrt();
            let margin = match scope {
                Scope::Joining => JOINING_LOSS,
                _ => self.loss_down,
            };
            n >= 50 && loss - f > margin.max(3.0 * sd)
        });
        let cause = if n == 0 || scope == Scope::Nothing {
            Cause::Calm
        } else if overrun {
            Cause::Overrun
        } else if !judged {
            Cause::Calm
        } else if delayed {
            Cause::Delay
        } else if excess {
            Cause::Loss
        } else {
            Cause::Calm
        };
        if scope == Scope::All && n >= 50 && !overrun && !delayed && !excess {
            let slot = tier.min(self.floor_by_tier.len() - 1);
            let t = self.floor_by_tier[slot].get_or_insert(LossTally { lost: 0.0, n: 0.0 });
            t.lost = t.lost * (1.0 - FLOOR_ALPHA) + self.lost as f64;
            t.n = t.n * (1.0 - FLOOR_ALPHA) + n as f64;
        }
        let capacity_bps = (cause != Cause::Calm).then(|| {
            if cause == Cause::Overrun {
                throughput_bps
            } else {
                (throughput_bps as f64 / (1.0 - floor).max(0.5)) as u64
            }
        });
        self.restart();
        Verdict {
            cause,
            throughput_bps,
            loss,
            floor,
            rise_us,
            capacity_bps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge() -> Judge {
        Judge::new(4, Duration::from_millis(25), 0.02)
    }

    fn interval(j: &mut Judge, t0: Instant, at_s: f64, recv: u64, lost: u64, delay_ms: i64) {
        let now = t0 + Duration::from_secs_f64(at_s);
        for _ in 0..recv {
            j.on_packet(1000);
        }
        j.on_lost(lost);
        for _ in 0..10 {
            j.on_delay(now, 5_000 + delay_ms * 1000);
        }
    }

    #[test]
    fn random_loss_that_does_not_track_rate_is_not_congestion() {
        let t0 = Instant::now();
        let mut j = judge();
        // 5 % loss on tier 0, then the same 5 % on tier 3 at ten times the packets.
        interval(&mut j, t0, 0.0, 950, 50, 0);
        assert!(!j.judge(0, 0.5, Scope::All).congested());
        interval(&mut j, t0, 0.5, 9500, 500, 0);
        let v = j.judge(3, 0.5, Scope::All);
        assert!(!v.congested(), "{v:?}");
        assert_eq!(v.capacity_bps, None);
    }

    #[test]
    fn loss_that_grows_with_rate_is_congestion_and_gives_capacity() {
        let t0 = Instant::now();
        let mut j = judge();
        interval(&mut j, t0, 0.0, 990, 10, 0);
        assert!(!j.judge(0, 0.5, Scope::All).congested());
        // A policer: 60 % lost on the faster tier, no queue.
        interval(&mut j, t0, 0.5, 4000, 6000, 0);
        let v = j.judge(2, 0.5, Scope::All);
        assert_eq!(v.cause, Cause::Loss);
        // 4000 × 1000 B in 0.5 s = 64 Mbit/s, over (1 − 1 % floor).
        let c = v.capacity_bps.unwrap();
        assert!((64_000_000..66_000_000).contains(&c), "{c}");
    }

    #[test]
    fn a_rising_queue_is_congestion_even_without_loss() {
        let t0 = Instant::now();
        let mut j = judge();
        interval(&mut j, t0, 0.0, 1000, 0, 0);
        assert!(!j.judge(0, 0.5, Scope::All).congested());
        interval(&mut j, t0, 0.5, 1000, 0, 40);
        let v = j.judge(1, 0.5, Scope::All);
        assert_eq!(v.cause, Cause::Delay);
        assert!(v.rise_us >= 39_000, "{v:?}");
    }

    #[test]
    fn one_delay_spike_is_not_a_queue() {
        let t0 = Instant::now();
        let mut j = judge();
        interval(&mut j, t0, 0.0, 1000, 0, 0);
        j.judge(0, 0.5, Scope::All);
        for _ in 0..1000 {
            j.on_packet(1000);
        }
        let now = t0 + Duration::from_secs(1);
        for d in [0, 0, 90, 0, 1, 0, 0, 80, 0, 0] {
            j.on_delay(now, 5_000 + d * 1000);
        }
        assert!(!j.judge(0, 0.5, Scope::All).congested());
    }

    #[test]
    fn socket_overruns_are_congestion_at_what_was_processed() {
        let t0 = Instant::now();
        let mut j = judge();
        interval(&mut j, t0, 0.0, 1000, 0, 0);
        j.on_overrun(300);
        let v = j.judge(0, 0.5, Scope::All);
        assert_eq!(v.cause, Cause::Overrun);
        assert_eq!(v.capacity_bps, Some(16_000_000));
    }

    #[test]
    fn an_unjudged_interval_neither_congests_nor_moves_the_floor() {
        let t0 = Instant::now();
        let mut j = judge();
        interval(&mut j, t0, 0.0, 500, 500, 60);
        let v = j.judge(0, 0.5, Scope::Nothing);
        assert!(!v.congested());
        assert_eq!(j.floor(), None);
        // While settling only overruns count: the old channel's loss and queue do not.
        interval(&mut j, t0, 0.5, 500, 500, 60);
        assert!(!j.judge(0, 0.5, Scope::OverrunsOnly).congested());
        interval(&mut j, t0, 1.0, 1000, 0, 0);
        j.on_overrun(300);
        assert_eq!(j.judge(0, 0.5, Scope::OverrunsOnly).cause, Cause::Overrun);
        assert_eq!(j.floor(), None);
    }

    /// A floor learned from a few hundred packets is taken at its upper bound: honest random
    /// loss a little above a lucky low estimate is not congestion.
    #[test]
    fn a_floor_from_a_small_sample_is_not_trusted_to_the_decimal() {
        let t0 = Instant::now();
        let mut j = judge();
        // 300 packets on a slow tier, 2 % lost (the path loses 5 %).
        interval(&mut j, t0, 0.0, 294, 6, 0);
        assert!(!j.judge(0, 0.5, Scope::All).congested());
        let f = j.floor().unwrap();
        assert!(f > 0.03, "floor {f}");
        // 8,000 packets on the top tier at the path's real 5 %.
        interval(&mut j, t0, 0.5, 7600, 400, 0);
        assert!(!j.judge(3, 0.5, Scope::All).congested());
        // A join's first interval counts only gross loss: not 12.5 %, but 80 %.
        interval(&mut j, t0, 1.0, 7000, 1000, 0);
        assert!(!j.judge(3, 0.5, Scope::Joining).congested());
        interval(&mut j, t0, 1.0, 2000, 8000, 0);
        assert_eq!(j.judge(3, 0.5, Scope::Joining).cause, Cause::Loss);
        interval(&mut j, t0, 1.5, 7000, 1000, 0);
        assert_eq!(j.judge(3, 0.5, Scope::All).cause, Cause::Loss);
    }
}
