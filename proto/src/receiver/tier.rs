//! The receiver's tier engine (throughput tiers, DESIGN.md §2; reference col. 5–6): which of a
//! title's channels — looping at different rates — this receiver should be on. Sans-I/O: the
//! driver reports what arrived, what was lost, its socket's overruns and one-way delay
//! samples; the engine answers with tier moves and a capacity report. Receiver-driven, like
//! layered multicast (RLM), but judged by [`Judge`]: random loss is repaired, not obeyed.
//!
//! * **Discovery.** After one calm interval on its start tier the receiver tries the *top*
//!   tier at once (one join experiment, not a climb: a clean fast receiver is at full speed
//!   within a second). If its path cannot carry it, what got through is the path's capacity,
//!   and the receiver goes straight to the highest tier whose band reaches that capacity.
//! * **Held tier, congested.** Each tier's rate follows its congested members' capacity
//!   within the tier's band (above the next tier down, `channel::tiers`), so when the
//!   capacity is inside the band the receiver reports it and waits `follow_wait` for the
//!   server to follow; otherwise (or if the server does not follow) `down_after` congested
//!   intervals move it down — straight to the tier that fits its capacity.
//! * **Held tier, calm.** After `probe_after` calm, probe one tier up. A failed probe falls
//!   back at once; that tier (and every tier whose band lies above the measured capacity)
//!   waits `probe_max` before the next try, so a rate-limited receiver makes one or two
//!   probes per transfer, each of bounded cost. A probe that holds halves the next one's wait.
//!
//! What it reports to the server (throughput, loss, capacity) comes only from judged
//! intervals on a tier it holds: a probe's losses are the experimenter's, and must not pull
//! down the rate of the receivers that already fit the probed tier.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::judge::{Cause, Judge, Scope};

/// A receiver whose probe overran lands on a tier whose full rate is at most this share of what
/// it processed during the probe's flood: sharing a CPU, it processes in bursts (while the sender is
/// descheduled), so a flood's processed rate overstates what it sustains — on one core at
/// 4 Gbit/s it processed 3.3 Gbit/s in a probe and could keep up with 0.4. Landing a tier
/// too low costs a probe back up (it gets an early one); landing too high costs every
/// overrun's holes again.
const OVERRUN_MARGIN: u64 = 2;

/// A probe is judged over at least this long: a few SYNCs' delay samples.
pub const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// No probe when what is missing takes less than this at the current tier's rate: a probe
/// is judged over up to two intervals (and its tier's channel may need opening), so it
/// cannot pay for itself, and it costs the server a lingering channel
/// ([`crate::channel::TIER_LINGER`]). Small titles and the tail of a download stay put.
pub const PROBE_WORTH: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct TierParams {
    /// Channel rates of the title's tiers, ascending (bit/s).
    pub tiers_bps: Vec<u64>,
    /// Tier to start on (index into `tiers_bps`).
    pub start: usize,
    pub interval: Duration,
    /// Loss above the random-loss floor that counts as congestion.
    pub loss_down: f64,
    /// Queueing-delay rise that counts as congestion.
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
    /// How long a congested receiver whose capacity lies inside its tier's band waits for
    /// the server to bring the tier's rate down to it before moving down itself.
    pub follow_wait: Duration,
    /// A capacity found is reported this long after congestion last showed it (the server
    /// then lets the rate climb back towards the tier's ceiling).
    pub capacity_hold: Duration,
    /// A join experiment whose socket overruns is judged this soon into its interval instead
    /// of at its end. An overrun is unambiguous (the receiver is short of CPU for the rate),
    /// and every further moment at the probed rate scatters holes over the whole loop — the
    /// receiver processes a fraction of what arrives — which the fitting tier's loop must
    /// then fill, arriving again as duplicates: on one core at 4 Gbit/s a full 0.5 s
    /// interval cost 0.8× the archive of a 64 MiB title.
    pub overrun_cut: Duration,
    /// Discover with a unicast burst (`channel::burst`) rather than by joining the top
    /// tier's group; off, or when a burst gets no answer, the group is probed.
    pub bursts: bool,
    /// Bytes of one loop of the title (0: unknown). A probe is judged over at most an eighth
    /// of a loop at the probed tier's rate ([`Self::probe_interval`]): on a small title at a
    /// high rate a whole interval would run through the loop, so a failed probe left holes
    /// everywhere and its fall-back tier had to send the whole loop again to fill them.
    pub loop_bytes: u64,
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
            settle: Duration::from_millis(3000),
            follow_wait: Duration::from_secs(3),
            capacity_hold: Duration::from_secs(5),
            overrun_cut: Duration::from_millis(50),
            bursts: true,
            loop_bytes: 0,
        }
    }

    /// The lowest rate tier `i`'s channel may run at (the server's band,
    /// [`crate::channel::band`]).
    pub fn floor(&self, i: usize) -> u64 {
        crate::channel::band(&self.tiers_bps, i).0
    }

    /// How long a probe of `tier` is judged over: an eighth of a loop at its rate, within
    /// [`PROBE_INTERVAL_MIN`] and `interval`.
    pub fn probe_interval(&self, tier: usize) -> Duration {
        let rate = self.tiers_bps[tier.min(self.tiers_bps.len() - 1)];
        if self.loop_bytes == 0 || rate == 0 {
            return self.interval;
        }
        let eighth = Duration::from_secs_f64(self.loop_bytes as f64 / rate as f64);
        eighth.clamp(PROBE_INTERVAL_MIN.min(self.interval), self.interval)
    }

    /// The highest tier whose full (nominal) rate fits `capacity` with a 5 % margin.
    pub fn nominal_fit(&self, capacity: u64) -> usize {
        (0..self.tiers_bps.len())
            .rev()
            .find(|&i| self.tiers_bps[i] as f64 <= capacity as f64 * 0.95)
            .unwrap_or(0)
    }

    /// The highest tier whose band reaches `capacity` with a 10 % margin.
    pub fn best_fit(&self, capacity: u64) -> usize {
        (0..self.tiers_bps.len())
            .rev()
            .find(|&i| (self.floor(i) as f64) < capacity as f64 * 0.9)
            .unwrap_or(0)
    }
}

/// A decision for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierMove {
    /// Leave the current channel and join this tier's channel (progress is kept: the download
    /// state does not depend on the channel).
    To(usize),
    /// Ask the server for a discovery burst of this tier's rate, `ms` long, by unicast
    /// (`channel::burst`), and report it: [`TierEngine::on_burst_granted`],
    /// [`TierEngine::on_burst_packet`], [`TierEngine::on_burst_refused`].
    Burst { tier: usize, ms: u16 },
}

/// How long a discovery burst runs: enough for a bottleneck to show its rate in the
/// arrivals (a queue that absorbs the excess stretches them; one that overflows drops it),
/// little enough that the burst's bytes cost little. A receiver that then joins a loop
/// already running hears them again: at most a 32nd of the loop, down to [`BURST_MIN`].
pub const BURST_LEN: Duration = Duration::from_millis(50);
pub const BURST_MIN: Duration = Duration::from_millis(10);
/// After a burst's end, how long its last datagrams may still be queued on the path.
const BURST_GRACE: Duration = Duration::from_millis(100);
/// A burst not granted within this is given up (the group probe is made instead).
const BURST_ASK: Duration = Duration::from_secs(1);
/// A path carries the burst's tier when at most this share of the burst's positions went
/// missing, over and above the random-loss floor (and its SYNCs saw no queue build up): a
/// bottleneck below the rate drops the excess, or queues it.
const BURST_LOSS: f64 = 0.15;
/// ... and its SYNCs' delay rose by less than this share of the time they were sent over
/// (the path took the burst at least two-thirds as fast as it was sent), or by less than
/// the jitter of a busy host. A receiver sharing a core with others processes a burst in
/// spurts, which looks like a queue a third as long as the burst; a bottleneck at a fifth
/// of the rate queues it for four times as long.
const BURST_QUEUE: f64 = 0.5;
const BURST_JITTER: Duration = Duration::from_millis(5);

/// A discovery burst asked for, or running.
struct Burst {
    tier: usize,
    from: usize,
    from_bps: u64,
    rate: u64,
    len: Duration,
    asked_at: Instant,
    /// When it is judged (`None` until granted).
    judge_at: Option<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
    bytes: u64,
    packets: u64,
    overruns: u64,
    /// Loop position of the first datagram, and the run of positions seen since.
    first_pos: Option<u64>,
    span: u64,
    /// Send times and one-way delays of its SYNCs: a queue filling shows as a rise, and a
    /// rise that is a good part of the time they were sent over means the path takes the
    /// burst more slowly than the server sent it, whatever rate that was.
    sent_first: u64,
    sent_last: u64,
    delay_min: i64,
    delay_max: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TierCounters {
    pub moves_down: u32,
    pub probes: u32,
    pub probes_failed: u32,
    /// Discovery bursts judged, and those whose rate the path did not carry.
    pub bursts: u32,
    pub bursts_failed: u32,
    /// Throughput of the last judged interval on a held tier, bit/s (reported to the server;
    /// 0: nothing to report yet since the last move).
    pub measured_bps: u64,
    /// Loss of that interval, parts per million.
    pub loss_ppm: u32,
    /// What the path carries, when congestion showed it within `capacity_hold` (0: no limit
    /// found at the current rate). The server sets tier and unicast rates from this.
    pub capacity_bps: u64,
    /// Intervals judged congested, by cause.
    pub congested_delay: u32,
    pub congested_loss: u32,
    pub congested_overrun: u32,
}

struct Probe {
    from: usize,
    until: Instant,
    /// The first experiment, straight to the top tier: on failure, go where the measured
    /// capacity fits rather than back.
    discovery: bool,
    /// The rate of the tier it came from (its channel drains for a while after the leave).
    from_bps: u64,
}

pub struct TierEngine {
    p: TierParams,
    tier: usize,
    interval_start: Instant,
    judge: Judge,
    /// The channel's current rate (SYNC), bit/s.
    channel_bps: Option<u64>,
    congested_run: u32,
    congested_since: Option<Instant>,
    stable_since: Instant,
    /// Probe timer per tier: how long to stay calm below it before trying it.
    probe_timer: Vec<Duration>,
    probe: Option<Probe>,
    settle_until: Instant,
    /// When the receiver last changed tier.
    moved_at: Instant,
    /// The settle holds NAKs back: not after a move for overruns, whose holes are the
    /// receiver's own (the path is not draining into them) and cheaper to repair than to
    /// wait a loop for.
    settle_naks: bool,
    /// No congestion seen yet: the discovery probe comes after one calm interval.
    slow_start: bool,
    capacity: Option<(u64, Instant)>,
    /// A congested interval's capacity, waiting for a second one to confirm it.
    pending_capacity: Option<u64>,
    last: (u64, u32, i64),
    /// The probe's interval was restarted at its first overruns ([`TierParams::overrun_cut`]).
    overrun_window: bool,
    /// Intervals judged (or measured) so far.
    intervals: u64,
    /// Bytes still missing (`None`: unknown, treated as plenty).
    missing_bytes: Option<u64>,
    burst: Option<Burst>,
    /// A burst got no answer or nothing through: probe the group from now on.
    bursts_ok: bool,
    /// A burst was refused: the group probe it stood for is due now (the rate of the tier
    /// it leaves).
    group_probe_now: Option<u64>,
    pub counters: TierCounters,
}

impl TierEngine {
    pub fn new(p: TierParams, now: Instant) -> TierEngine {
        assert!(!p.tiers_bps.is_empty(), "at least one tier");
        let tier = p.start.min(p.tiers_bps.len() - 1);
        TierEngine {
            probe_timer: vec![p.probe_after; p.tiers_bps.len()],
            judge: Judge::new(p.tiers_bps.len(), p.delay_rise, p.loss_down),
            p,
            tier,
            interval_start: now,
            channel_bps: None,
            congested_run: 0,
            congested_since: None,
            stable_since: now,
            probe: None,
            settle_until: now,
            moved_at: now,
            settle_naks: true,
            slow_start: true,
            capacity: None,
            pending_capacity: None,
            last: (0, 0, 0),
            overrun_window: false,
            intervals: 0,
            missing_bytes: None,
            burst: None,
            bursts_ok: true,
            group_probe_now: None,
            counters: TierCounters::default(),
        }
    }

    pub fn tier(&self) -> usize {
        self.tier
    }

    /// Bytes of one loop of the title (0: unknown).
    pub fn loop_bytes(&self) -> u64 {
        self.p.loop_bytes
    }

    /// (throughput bit/s, loss ppm, delay rise µs) of the last interval, judged or not (logs).
    pub fn last_interval(&self) -> (u64, u32, i64) {
        self.last
    }

    pub fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// Bytes the download still misses (for [`PROBE_WORTH`]).
    pub fn on_missing(&mut self, bytes: u64) {
        self.missing_bytes = Some(bytes);
    }

    /// Whether what is missing takes long enough at the current tier to be worth a probe.
    fn worth_probing(&self) -> bool {
        let rate = self
            .channel_bps
            .unwrap_or(self.p.tiers_bps[self.tier])
            .min(self.p.tiers_bps[self.tier])
            .max(1);
        self.missing_bytes
            .is_none_or(|b| b as f64 * 8.0 / rate as f64 > PROBE_WORTH.as_secs_f64())
    }

    /// A datagram of the current channel arrived (`bytes` on the wire).
    pub fn on_packet(&mut self, bytes: usize) {
        self.judge.on_packet(bytes);
    }

    /// A one-way delay sample (`arrival − send time`, µs, any clocks) and the channel's
    /// current rate, from a SYNC.
    pub fn on_sync(&mut self, now: Instant, delay_us: i64, rate_bps: u64) {
        self.judge.on_delay(now, delay_us);
        self.channel_bps = Some(rate_bps);
    }

    /// Packets of the current channel found lost (gap detection).
    pub fn on_lost(&mut self, n: u64) {
        self.judge.on_lost(n);
    }

    /// Datagrams the receiver's own socket dropped.
    pub fn on_overrun(&mut self, n: u64) {
        match self.burst.as_mut() {
            // During a burst the flood is the burst's: it is judged on its own.
            Some(b) => b.overruns += n,
            None => self.judge.on_overrun(n),
        }
    }

    /// When the engine next wants [`Self::poll`].
    ///
    /// A probe whose socket overruns wants a poll at once: its interval restarts there, so
    /// the capacity it measures (what was processed) covers only the probed channel's flood,
    /// not the request and join before it; it is judged `overrun_cut` later.
    pub fn next_deadline(&self) -> Instant {
        if self.group_probe_now.is_some() {
            return self.interval_start;
        }
        if let Some(b) = &self.burst {
            return b.judge_at.unwrap_or(b.asked_at + BURST_ASK);
        }
        if self.probe.is_some() {
            let full = self.interval_start + self.p.probe_interval(self.tier);
            if self.overrun_window {
                return full.min(self.interval_start + self.p.overrun_cut);
            }
            if self.judge.overrunning() {
                return self.interval_start;
            }
            return full;
        }
        self.interval_start + self.p.interval
    }

    /// Intervals judged (or measured while settling) so far.
    pub fn intervals(&self) -> u64 {
        self.intervals
    }

    /// The end of a settle after a move down (`None` during a probe: that ends when an
    /// interval is judged).
    pub fn settle_end(&self) -> Option<Instant> {
        self.probe.is_none().then_some(self.settle_until)
    }

    /// Just moved: losses now are the old channel's tail, not this one's (NAKs can wait).
    pub fn settling(&self, now: Instant) -> bool {
        self.probe.is_some() || (self.settle_naks && now < self.settle_until)
    }

    /// Move to tier `to`; `cause` is what made a move down (NAKs wait out its settle unless
    /// the receiver overran: those holes are its own).
    fn switch(&mut self, to: usize, now: Instant, cause: Cause) -> TierMove {
        if to < self.tier {
            self.settle_until = now + self.p.settle;
        }
        self.settle_naks = cause != Cause::Overrun;
        self.tier = to;
        self.moved_at = now;
        self.overrun_window = false;
        self.channel_bps = None;
        self.congested_run = 0;
        self.congested_since = None;
        self.stable_since = now;
        self.counters.measured_bps = 0;
        self.counters.loss_ppm = 0;
        TierMove::To(to)
    }

    /// The server granted the burst asked for: it runs from now.
    pub fn on_burst_granted(&mut self, now: Instant) {
        if let Some(b) = self.burst.as_mut().filter(|b| b.judge_at.is_none()) {
            b.judge_at = Some(now + b.len + BURST_GRACE);
        }
    }

    /// The server refused the burst (busy, or an older server) or never answered: probe the
    /// group instead, at once (the interval before the burst was calm).
    pub fn on_burst_refused(&mut self, now: Instant) {
        if let Some(b) = self.burst.take() {
            self.bursts_ok = false;
            self.restart_interval(now);
            self.group_probe_now = Some(b.from_bps);
        }
    }

    /// The burst was not asked for (the channel has not been heard yet, so the path is
    /// unknown either way): ask again after the next calm interval.
    pub fn on_burst_not_asked(&mut self) {
        self.burst = None;
    }

    /// A datagram of the discovery burst arrived (`bytes` on the wire), at loop position
    /// `pos` of `loop_len`: the burst is a run of consecutive positions, so the run it
    /// spans says how many were sent.
    pub fn on_burst_packet(&mut self, now: Instant, bytes: usize, pos: u64, loop_len: u64) {
        if let Some(b) = self.burst.as_mut() {
            b.first.get_or_insert(now);
            b.last = Some(now);
            b.bytes += bytes as u64;
            b.packets += 1;
            let first = *b.first_pos.get_or_insert(pos);
            let ahead = (pos + loop_len - first) % loop_len.max(1);
            // Reordered ahead of the first one seen: not a run of a whole loop.
            if ahead < loop_len / 2 {
                b.span = b.span.max(ahead + 1);
            }
        }
    }

    /// A SYNC of the burst: its send time (µs, the server's clock) and one-way delay
    /// (`arrival − send time`, µs, any clocks).
    pub fn on_burst_sync(&mut self, send_us: u64, delay_us: i64) {
        if let Some(b) = self.burst.as_mut() {
            b.sent_first = b.sent_first.min(send_us);
            b.sent_last = b.sent_last.max(send_us);
            b.delay_min = b.delay_min.min(delay_us);
            b.delay_max = b.delay_max.max(delay_us);
        }
    }

    /// The interval a burst disturbed (its flood shares the path with the channel) is not
    /// judged: measuring starts afresh.
    fn restart_interval(&mut self, now: Instant) {
        self.judge.restart();
        self.interval_start = now;
    }

    /// Ask for a discovery burst of the top tier instead of joining its group.
    fn ask_burst(&mut self, now: Instant, from_bps: u64) -> TierMove {
        let tier = self.p.tiers_bps.len() - 1;
        let rate = self.p.tiers_bps[tier];
        let share = Duration::from_secs_f64(self.p.loop_bytes as f64 * 8.0 / 32.0 / rate as f64);
        let len = if self.p.loop_bytes == 0 {
            BURST_LEN
        } else {
            share.clamp(BURST_MIN, BURST_LEN)
        };
        self.burst = Some(Burst {
            tier,
            from: self.tier,
            from_bps,
            rate,
            len,
            asked_at: now,
            judge_at: None,
            first: None,
            last: None,
            bytes: 0,
            packets: 0,
            overruns: 0,
            first_pos: None,
            span: 0,
            sent_first: u64::MAX,
            sent_last: 0,
            delay_min: i64::MAX,
            delay_max: i64::MIN,
        });
        TierMove::Burst {
            tier,
            ms: len.as_millis().min(u16::MAX as u128) as u16,
        }
    }

    /// The burst is over (or was never granted): what got through says whether the path
    /// carries its tier. If so, join that tier (still judged as a probe); if not, go straight
    /// to the tier its capacity fits, without the probed group ever reaching the path.
    fn judge_burst(&mut self, now: Instant) -> Option<TierMove> {
        let b = self.burst.take().expect("a burst to judge");
        self.restart_interval(now);
        let (Some(first), Some(last)) = (b.first, b.last) else {
            // Nothing came (unicast filtered, or never granted): the group probe instead.
            self.bursts_ok = false;
            return None;
        };
        self.counters.bursts += 1;
        self.slow_start = false;
        // What got through, over the time it took to arrive: a bottleneck slower than the
        // burst drops the excess or queues it (stretching the arrivals), so this is its rate.
        let secs = last
            .saturating_duration_since(first)
            .max(b.len)
            .as_secs_f64();
        let got = b.bytes as f64 * 8.0 / secs;
        let floor = self.judge.floor().unwrap_or(0.0);
        let overran = b.overruns as f64 > b.packets as f64 * super::judge::OVERRUN_FRACTION;
        // Carried: few of the positions sent are missing (beyond random loss), and no queue
        // built up. Judged on what the server sent, not the tier's nominal rate: a sender
        // short of CPU sends fewer, and they all arrive.
        let lost = 1.0 - b.packets as f64 / b.span.max(1) as f64;
        let rise = b.delay_max.saturating_sub(b.delay_min).max(0);
        let window = b.sent_last.saturating_sub(b.sent_first) as i64;
        let queued = rise >= self.p.delay_rise.as_micros() as i64
            || (rise > BURST_JITTER.as_micros() as i64
                && rise as f64 > BURST_QUEUE * window as f64);
        let carried = lost <= BURST_LOSS + floor && !queued;
        let probe = |from: usize, discovery: bool| Probe {
            from,
            until: now + self.p.probe_hold,
            discovery,
            from_bps: b.from_bps,
        };
        // The channel's own traffic shared the bottleneck with the burst and lost in the same
        // proportion: the path carries what got through of both.
        let shared = got * (b.rate + b.from_bps) as f64 / b.rate as f64;
        let reaches = self.p.best_fit(shared as u64) >= b.tier;
        tracing::debug!(
            got_bps = got as u64,
            lost,
            rise_us = rise,
            window_us = window,
            packets = b.packets,
            overruns = b.overruns,
            carried,
            reaches,
            "discovery burst judged"
        );
        if !overran && (carried || reaches) {
            // It carries the tier, or at least the tier's band (the server brings the rate
            // down to what members report): join it, judged as a discovery probe.
            self.counters.probes += 1;
            self.probe = Some(probe(b.from, true));
            return Some(self.switch(b.tier, now, Cause::Calm));
        }
        self.counters.bursts_failed += 1;
        // A receiver that overran processed `got` in a burst it cannot keep up
        // ([`OVERRUN_MARGIN`]).
        let (capacity, to) = if overran {
            let c = got / OVERRUN_MARGIN as f64;
            (c, self.p.nominal_fit(c as u64))
        } else {
            (shared, self.p.best_fit(shared as u64))
        };
        for i in b.from + 1..self.p.tiers_bps.len() {
            if self.p.floor(i) as f64 >= capacity * 0.9 {
                self.probe_timer[i] = self.p.probe_max;
            }
        }
        // Where the capacity fits, as a failed discovery probe lands: held unless congestion
        // says otherwise.
        let to = to.clamp(b.from, b.tier - 1);
        if to == b.from {
            return None;
        }
        let mv = self.switch(to, now, Cause::Calm);
        // The group left still reaches the path until the switch honours the leave (~2 s):
        // the capacity is known from the burst, so that overlap is not judged.
        self.settle_until = now + self.p.settle;
        Some(mv)
    }

    /// Judge the interval if it is over; maybe move.
    pub fn poll(&mut self, now: Instant) -> Option<TierMove> {
        if now < self.next_deadline() {
            return None;
        }
        if let Some(b) = &self.burst {
            if b.judge_at.is_none() {
                self.on_burst_refused(now);
            } else {
                return self.judge_burst(now);
            }
        }
        if let Some(from_bps) = self.group_probe_now.take() {
            let top = self.p.tiers_bps.len() - 1;
            return Some(self.start_probe(now, top, from_bps, Cause::Calm));
        }
        if self.probe.is_some() && !self.overrun_window && self.judge.overrunning() {
            self.judge.restart();
            self.interval_start = now;
            self.overrun_window = true;
            return None;
        }
        self.overrun_window = false;
        self.intervals += 1;
        let secs = now
            .saturating_duration_since(self.interval_start)
            .as_secs_f64();
        let judged = now >= self.settle_until;
        // A probe's first interval is judged on delay, overruns and gross loss only (not the
        // switch's own); while a move down settles only overruns count, from its second
        // interval on (the first may still count datagrams dropped before the move).
        let scope = if judged && self.probe.is_some() && self.interval_start <= self.moved_at {
            Scope::Joining
        } else if judged {
            Scope::All
        } else if self.interval_start > self.moved_at {
            Scope::OverrunsOnly
        } else {
            Scope::Nothing
        };
        let v = self.judge.judge(self.tier, secs, scope);
        self.interval_start = now;
        self.last = (v.throughput_bps, (v.loss * 1e6) as u32, v.rise_us);
        match v.cause {
            Cause::Calm => {}
            Cause::Delay => self.counters.congested_delay += 1,
            Cause::Loss => self.counters.congested_loss += 1,
            Cause::Overrun => self.counters.congested_overrun += 1,
        }
        if judged && self.probe.is_none() {
            self.counters.measured_bps = v.throughput_bps;
            self.counters.loss_ppm = (v.loss * 1e6) as u32;
            match v.capacity_bps {
                // One congested interval may be a transient (a left group still draining into
                // the path, a burst of cross traffic): a capacity is reported once two in a
                // row show it, and then the smaller of the two.
                Some(c) => {
                    if let Some(before) = self.pending_capacity.replace(c) {
                        self.capacity = Some((c.min(before), now));
                    }
                }
                None => {
                    self.pending_capacity = None;
                    if self.capacity.is_some_and(|(_, at)| {
                        now.saturating_duration_since(at) >= self.p.capacity_hold
                    }) {
                        self.capacity = None;
                    }
                }
            }
        }
        self.counters.capacity_bps = self.capacity.map_or(0, |c| c.0);
        let congested = v.congested();
        if congested {
            self.slow_start = false;
        }
        let capacity = v.capacity_bps.unwrap_or(0);

        if let Some(probe) = &self.probe {
            if congested {
                // The join experiment failed: back down at once. The tiers whose band lies
                // above what got through wait the longest before another try (a failed probe
                // floods the path for as long as the switch takes to honour the leave); this
                // one waits four times as long as before.
                let (from, failed, discovery) = (probe.from, self.tier, probe.discovery);
                let from_bps = probe.from_bps;
                self.probe = None;
                // Until the switch honours the leave, the old tier's channel still fills the
                // path: what got through of the new one understates the path by up to the old
                // rate. (Not so for overruns: what the receiver processed is exact.)
                if v.cause != Cause::Overrun && self.p.best_fit(capacity + from_bps) >= failed {
                    // The probed tier's band reaches the path's capacity: it is this
                    // receiver's tier, at a rate the server brings down to what the path
                    // carries. Hold it; judge it afresh once the old channel has drained.
                    // (Overruns never: the receiver itself cannot take that tier's rate.)
                    self.settle_until = now + self.p.settle;
                    self.stable_since = now;
                    return None;
                }
                self.counters.probes_failed += 1;
                self.probe_timer[failed] = (self.probe_timer[failed] * 4).min(self.p.probe_max);
                for i in from + 1..self.p.tiers_bps.len() {
                    if self.p.floor(i) as f64 >= capacity as f64 * 0.9 {
                        self.probe_timer[i] = self.p.probe_max;
                    }
                }
                let to = if !discovery {
                    from
                } else if v.cause == Cause::Overrun {
                    // Short of CPU: land on a tier whose full rate it processes. A tier whose
                    // band merely reaches the capacity would overrun it until the server's
                    // rate came down (and again each time it climbs back), and every overrun
                    // scatters holes over the loop that only repairs or another loop fill.
                    self.p
                        .nominal_fit(capacity / OVERRUN_MARGIN)
                        .clamp(from, failed - 1)
                } else {
                    self.p.best_fit(capacity).clamp(from, failed - 1)
                };
                if discovery && to + 1 < failed && self.p.floor(to + 1) < capacity {
                    // A capacity read in one interval, with the join still settling, can be
                    // low: when only the margin kept the tier above the landing out, it gets
                    // one early try.
                    self.probe_timer[to + 1] = self.p.probe_after * 4;
                }
                return Some(self.switch(to, now, v.cause));
            }
            if now >= probe.until {
                // The path carries this tier: conditions changed, so the next tier up is
                // worth trying sooner than its backed-off timer says — and the path may have
                // grown by more than a tier: discover again, straight to the top.
                let t = self.tier;
                self.probe = None;
                self.probe_timer[t] = self.p.probe_after;
                if let Some(next) = self.probe_timer.get_mut(t + 1) {
                    *next = (*next / 2).max(self.p.probe_after);
                }
                self.slow_start = !discovery_done_here(&self.p, t);
            }
            return None;
        }
        if congested {
            self.stable_since = now;
            let since = *self.congested_since.get_or_insert(now);
            // Inside the band the server brings the tier's rate down to this capacity (the
            // SYNCs say when it did): wait for that rather than leave.
            let follow = capacity as f64 > self.p.floor(self.tier) as f64 * 1.05
                && self
                    .channel_bps
                    .is_none_or(|r| r as f64 > capacity as f64 * 1.02);
            if follow && now.saturating_duration_since(since) < self.p.follow_wait {
                return None;
            }
            self.congested_run += 1;
            if self.congested_run >= self.p.down_after && self.tier > 0 {
                // This tier could not be made to fit (or the server did not follow): it and
                // every tier whose band lies above the capacity wait the longest.
                self.counters.moves_down += 1;
                let left = self.tier;
                self.probe_timer[left] = self.p.probe_max;
                for i in left + 1..self.p.tiers_bps.len() {
                    if self.p.floor(i) as f64 >= capacity as f64 * 0.9 {
                        self.probe_timer[i] = self.p.probe_max;
                    }
                }
                let fit = if v.cause == Cause::Overrun {
                    // Overrunning steadily (not a probe's flood): what it processed over the
                    // interval is what it sustains.
                    self.p.nominal_fit(capacity)
                } else {
                    self.p.best_fit(capacity)
                };
                let to = fit.min(self.tier - 1);
                return Some(self.switch(to, now, v.cause));
            }
            return None;
        }
        self.congested_run = 0;
        self.congested_since = None;
        let up = self.tier + 1;
        if up >= self.p.tiers_bps.len() || now < self.settle_until {
            return None;
        }
        let calm = now.saturating_duration_since(self.stable_since);
        let (to, wait) = if self.slow_start {
            (self.p.tiers_bps.len() - 1, self.p.interval)
        } else {
            (up, self.probe_timer[up])
        };
        if calm >= wait && self.worth_probing() {
            let from_bps = self
                .channel_bps
                .unwrap_or(self.p.tiers_bps[self.tier])
                .min(self.p.tiers_bps[self.tier]);
            if self.slow_start && self.p.bursts && self.bursts_ok {
                return Some(self.ask_burst(now, from_bps));
            }
            return Some(self.start_probe(now, to, from_bps, v.cause));
        }
        None
    }

    /// Join tier `to` as an experiment (a discovery probe while nothing is known yet).
    fn start_probe(&mut self, now: Instant, to: usize, from_bps: u64, cause: Cause) -> TierMove {
        self.counters.probes += 1;
        self.probe = Some(Probe {
            from_bps,
            from: self.tier,
            until: now + self.p.probe_hold,
            discovery: self.slow_start,
        });
        self.slow_start = false;
        self.switch(to, now, cause)
    }
}

/// At the top there is nothing left to discover.
fn discovery_done_here(p: &TierParams, tier: usize) -> bool {
    tier + 1 >= p.tiers_bps.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver behind a link of `cap(t)` bit/s with random loss `loss`: a channel faster
    /// than the link loses the excess and builds a queue (rising delay). `follow`: the server
    /// sets the tier's rate to 95 % of the reported capacity within the band, as
    /// `channel::tiers` does. Deterministic: loss is spread evenly, not drawn.
    struct Bed {
        e: TierEngine,
        moves: Vec<(f64, usize)>,
        /// When discovery bursts were asked for.
        bursts: Vec<f64>,
        rate: Vec<f64>,
    }

    fn run(tiers: &[u64], cap: impl Fn(f64) -> u64, loss: f64, follow: bool, secs: f64) -> Bed {
        let t0 = Instant::now();
        let p = TierParams::new(tiers.to_vec());
        let mut b = Bed {
            e: TierEngine::new(p.clone(), t0),
            moves: Vec::new(),
            bursts: Vec::new(),
            rate: tiers.iter().map(|&r| r as f64).collect(),
        };
        let step = 0.01;
        let mut t = 0.0;
        let mut queue_ms = 0.0f64;
        let mut lost_acc = 0.0;
        let mut since_sync = 0.0;
        // A discovery burst running: (until, rate); granted at once.
        let mut burst: Option<(f64, f64)> = None;
        let mut bpos = 0u64;
        while t < secs {
            let now = t0 + Duration::from_secs_f64(t);
            let tier = b.e.tier();
            let rate = b.rate[tier];
            let c = cap(t) as f64;
            let brate = burst.filter(|&(end, _)| t < end).map_or(0.0, |(_, r)| r);
            // Channel and burst share the path in proportion to what they offer.
            let offered = rate + brate;
            let share = (c / offered).min(1.0);
            let pkts = (rate * step / (1304.0 * 8.0)).round();
            let through = ((rate * share * step) / (1304.0 * 8.0)).round();
            let burst_sent = (brate * step / (1304.0 * 8.0)).round() as u64;
            let burst_through = ((brate * share * step) / (1304.0 * 8.0) * (1.0 - loss)).round();
            // Consecutive loop positions; what is lost is spread over the step's run.
            for k in 0..burst_through as u64 {
                let pos = bpos + k * burst_sent / (burst_through as u64).max(1);
                b.e.on_burst_packet(now, 1304, pos, 1 << 40);
            }
            bpos += burst_sent;
            if brate > 0.0 {
                b.e.on_burst_sync((t * 1e6) as u64, (queue_ms * 1000.0) as i64);
            }
            queue_ms = if offered > c {
                (queue_ms + 10.0).min(50.0)
            } else {
                (queue_ms - 10.0).max(0.0)
            };
            lost_acc += through * loss;
            let random_lost = lost_acc.floor();
            lost_acc -= random_lost;
            for _ in 0..(through - random_lost) as u64 {
                b.e.on_packet(1304);
            }
            let overflow = if queue_ms >= 50.0 {
                pkts - through
            } else {
                0.0
            };
            b.e.on_lost((overflow + random_lost) as u64);
            since_sync += step;
            if since_sync >= 0.05 {
                since_sync = 0.0;
                b.e.on_sync(now, (queue_ms * 1000.0) as i64, rate as u64);
            }
            match b.e.poll(now) {
                Some(TierMove::To(x)) => b.moves.push((t, x)),
                Some(TierMove::Burst { tier, ms }) => {
                    b.e.on_burst_granted(now);
                    // It arrives over the next `ms` of steps.
                    let end = t + step / 2.0 + ms as f64 / 1000.0;
                    burst = Some((end, tiers[tier] as f64));
                    b.bursts.push(t);
                }
                None => {}
            }
            if follow && b.e.probe.is_none() {
                let cap = b.e.counters.capacity_bps as f64;
                let nominal = tiers[tier] as f64;
                b.rate[tier] = if cap > 0.0 {
                    (cap * 0.95).clamp(p.floor(tier) as f64 + 1.0, nominal)
                } else {
                    (b.rate[tier] * (1.0 + 0.03 * step)).min(nominal)
                };
            }
            t += step;
        }
        b
    }

    const TIERS: [u64; 5] = [
        4_000_000,
        16_000_000,
        64_000_000,
        256_000_000,
        1_024_000_000,
    ];

    /// `step` seconds of the current tier's channel to a receiver that processes `cpu` bit/s
    /// on a clean network: its socket drops the rest.
    fn feed_short_of_cpu(e: &mut TierEngine, now: Instant, step: f64, cpu: f64) {
        let rate = TIERS[e.tier()] as f64;
        let pkts = (rate * step / (1304.0 * 8.0)).round();
        let taken = (rate.min(cpu) * step / (1304.0 * 8.0)).round();
        for _ in 0..taken as u64 {
            e.on_packet(1304);
        }
        e.on_overrun((pkts - taken) as u64);
        e.on_lost((pkts - taken) as u64);
        e.on_sync(now, 100, rate as u64);
    }

    /// A download whose missing bytes take less than [`PROBE_WORTH`] at its tier does not
    /// probe (a small title, or the tail of a download); with more missing it probes as usual.
    #[test]
    fn a_probe_is_made_only_when_enough_is_missing_to_pay_for_it() {
        let t0 = Instant::now();
        let calm = |e: &mut TierEngine, from: f64, to: f64| {
            let mut t = from;
            while t < to {
                let now = t0 + Duration::from_secs_f64(t);
                feed_short_of_cpu(e, now, 0.01, f64::MAX);
                if let Some(TierMove::To(x)) = e.poll(now) {
                    return Some(x);
                }
                t += 0.01;
            }
            None
        };
        let mut p = TierParams::new(TIERS.to_vec());
        p.bursts = false;
        let mut e = TierEngine::new(p, t0);
        // Tier 0 runs at 4 Mbit/s: 400 kB take 0.8 s.
        e.on_missing(400_000);
        assert_eq!(calm(&mut e, 0.0, 5.0), None);
        assert_eq!(e.counters.probes, 0);
        e.on_missing(4_000_000);
        assert_eq!(calm(&mut e, 5.0, 7.0), Some(TIERS.len() - 1));
        assert_eq!(e.counters.probes, 1);
    }

    /// A receiver short of CPU: a clean network, but its socket overruns whenever the channel
    /// is faster than `cpu` bit/s. The discovery probe to the top tier fails as soon as the
    /// overruns show — within `overrun_cut`, not a whole interval — and lands on the fastest
    /// tier whose full rate is at most half what it processed ([`OVERRUN_MARGIN`]).
    #[test]
    fn a_probe_that_overruns_the_socket_fails_within_the_cut() {
        let t0 = Instant::now();
        let mut p = TierParams::new(TIERS.to_vec());
        p.bursts = false; // the group probe's own cut (a burst is judged on its own)
        let mut e = TierEngine::new(p.clone(), t0);
        let cpu = 100_000_000.0;
        let mut probe_at = None;
        let step = 0.005;
        let mut t = 0.0;
        while t < 5.0 {
            let now = t0 + Duration::from_secs_f64(t);
            feed_short_of_cpu(&mut e, now, step, cpu);
            match e.poll(now) {
                Some(TierMove::To(x)) if e.probing() => {
                    assert_eq!(x, TIERS.len() - 1, "discovery goes to the top");
                    probe_at = Some(t);
                }
                Some(TierMove::To(x)) => {
                    let started = probe_at.expect("a probe came first");
                    // Half of 100 Mbit/s processed: 16 Mbit/s fits, 64 does not.
                    assert_eq!(x, 1, "landed on tier {x}");
                    assert!(
                        t - started <= p.overrun_cut.as_secs_f64() + 2.0 * step,
                        "the overrunning probe lasted {:.3} s",
                        t - started
                    );
                    assert_eq!(e.counters.congested_overrun, 1);
                    return;
                }
                Some(TierMove::Burst { .. }) => panic!("bursts are off"),
                None => {}
            }
            t += step;
        }
        panic!("never probed and fell back: {:?}", e.counters);
    }

    /// Held on a tier it cannot process (a busy host) and below that tier's band: the
    /// receiver moves down after two overrunning intervals, to the tier whose full rate fits
    /// what it processed, and repairs its holes at once (NAKs are not held: the holes are its
    /// own, not the path draining).
    #[test]
    fn a_held_receiver_that_overruns_moves_to_the_tier_it_processes() {
        let t0 = Instant::now();
        let mut p = TierParams::new(TIERS.to_vec());
        p.start = 4;
        let mut e = TierEngine::new(p, t0);
        e.slow_start = false;
        let cpu = 300_000_000.0;
        let step = 0.01;
        let mut t = 0.0;
        let mut moved = None;
        while t < 3.0 && moved.is_none() {
            let now = t0 + Duration::from_secs_f64(t);
            feed_short_of_cpu(&mut e, now, step, cpu);
            if let Some(TierMove::To(x)) = e.poll(now) {
                moved = Some((t, x));
            }
            t += step;
        }
        let (at, x) = moved.expect("moved down");
        // Two intervals, no follow wait.
        assert!(at <= 1.0 + 2.0 * step, "moved at {at}");
        // 300 Mbit/s processed: 256 fits.
        assert_eq!(x, 3);
        assert!(!e.settling(t0 + Duration::from_secs_f64(at + 0.1)));
        assert_eq!(e.counters.congested_overrun, 2);
    }

    /// Discovery is a unicast burst: a receiver behind a slow link goes straight to a tier
    /// its link carries and never joins the top tier's group (whose leave a switch would
    /// take seconds to honour); a fast one, clean or with random loss, joins the top.
    #[test]
    fn a_discovery_burst_never_joins_a_group_the_link_cannot_carry() {
        for (cap, loss, top) in [
            (40_000_000u64, 0.0, false),
            (200_000_000, 0.0, false),
            (200_000_000, 0.05, false),
            (2_000_000_000, 0.0, true),
            (2_000_000_000, 0.05, true),
            (2_000_000_000, 0.10, true),
        ] {
            let b = run(&TIERS, |_| cap, loss, false, 5.0);
            let what = format!(
                "link {cap}, loss {loss}: moves {:?}, {:?}",
                b.moves, b.e.counters
            );
            assert_eq!(b.bursts.len(), 1, "{what}");
            assert_eq!(b.e.counters.bursts, 1, "{what}");
            assert_eq!(b.e.counters.bursts_failed, u32::from(!top), "{what}");
            let first = b.moves.first().map(|m| m.1);
            if top {
                assert_eq!(first, Some(4), "{what}");
            } else {
                assert!(b.moves.iter().all(|m| m.1 < 4), "{what}");
                assert_eq!(
                    first,
                    Some(TierParams::new(TIERS.to_vec()).best_fit(cap)),
                    "{what}"
                );
            }
        }
    }

    /// A burst the server never grants (an older server, unicast filtered) is given up after
    /// [`BURST_ASK`], and the group is probed instead.
    #[test]
    fn a_burst_never_granted_falls_back_to_the_group_probe() {
        let t0 = Instant::now();
        let mut e = TierEngine::new(TierParams::new(TIERS.to_vec()), t0);
        let mut asked = None;
        let mut t = 0.0;
        while t < 4.0 {
            let now = t0 + Duration::from_secs_f64(t);
            feed_short_of_cpu(&mut e, now, 0.01, f64::MAX);
            match e.poll(now) {
                Some(TierMove::Burst { tier, ms }) => {
                    assert_eq!((tier, ms), (4, BURST_LEN.as_millis() as u16));
                    assert!(asked.replace(t).is_none(), "one burst asked for");
                }
                Some(TierMove::To(x)) => {
                    let asked = asked.expect("a burst was asked for first");
                    assert_eq!(x, 4);
                    assert!(e.probing());
                    assert!(t >= asked + BURST_ASK.as_secs_f64(), "{t} {asked}");
                    assert_eq!(e.counters.bursts, 0);
                    return;
                }
                None => {}
            }
            t += 0.01;
        }
        panic!(
            "no group probe after the burst went unanswered: {:?}",
            e.counters
        );
    }

    #[test]
    fn settles_on_the_fastest_tier_the_link_carries_within_two_probes() {
        for (cap, want) in [
            (8_000_000u64, 0usize),
            (40_000_000, 1),
            (200_000_000, 2),
            (2_000_000_000, 4),
        ] {
            let b = run(&TIERS, |_| cap, 0.0, false, 55.0);
            assert_eq!(b.e.tier(), want, "link {cap}: moves {:?}", b.moves);
            // The discovery probe, and at most one more, within the backed-off wait.
            assert!(b.e.counters.probes <= 2, "link {cap}: {:?}", b.e.counters);
            assert!(b.moves.len() <= 4, "link {cap}: moves {:?}", b.moves);
        }
    }

    #[test]
    fn with_the_server_following_a_rate_limited_receiver_keeps_its_tier_at_its_capacity() {
        let b = run(&TIERS, |_| 200_000_000, 0.0, true, 30.0);
        assert_eq!(b.e.tier(), 3, "moves {:?}", b.moves);
        let r = b.rate[3];
        assert!((170e6..=205e6).contains(&r), "tier 3 rate {r}");
        assert!(b.e.counters.probes <= 2, "{:?}", b.e.counters);
    }

    #[test]
    fn random_loss_climbs_to_the_top_and_never_lowers_a_rate() {
        for loss in [0.01, 0.05, 0.10] {
            let b = run(&TIERS, |_| 2_000_000_000, loss, true, 30.0);
            assert_eq!(b.e.tier(), 4, "loss {loss}: moves {:?}", b.moves);
            assert_eq!(b.e.counters.moves_down, 0, "loss {loss}");
            assert_eq!(b.e.counters.capacity_bps, 0, "loss {loss}");
            assert_eq!(
                b.rate[4], TIERS[4] as f64,
                "loss {loss}: the rate spiralled"
            );
        }
    }

    #[test]
    fn random_loss_behind_a_slow_link_still_finds_the_link() {
        let b = run(&TIERS, |_| 40_000_000, 0.05, false, 30.0);
        assert_eq!(b.e.tier(), 1, "moves {:?}", b.moves);
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
        let b = run(&TIERS, cap, 0.0, false, 200.0);
        let at = |t: f64| {
            b.moves
                .iter()
                .rev()
                .find(|(m, _)| *m <= t)
                .map(|m| m.1)
                .unwrap_or(0)
        };
        assert_eq!(at(59.0), 2, "{:?}", b.moves);
        // Down within a few seconds of the drop (following the server is tried first).
        let first_down = b
            .moves
            .iter()
            .find(|(t, x)| *t >= 60.0 && *x <= 1)
            .expect("moved down");
        assert!(first_down.0 < 65.0, "{:?}", b.moves);
        assert_eq!(at(119.0), 1, "{:?}", b.moves);
        assert_eq!(b.e.tier(), 3, "{:?}", b.moves);
        assert!(b.moves.len() <= 30, "{:?}", b.moves);
    }
}
