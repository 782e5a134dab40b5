//! The session's side of throughput tiers: feeds the [`TierEngine`] from what the session
//! sees (SYNC delay samples and rates, datagrams, losses the NAK engine found, the socket's
//! overruns), says when to move to another tier's channel and keeps the time spent on each.
//! A title with one tier still has an engine (it never moves): its judgement is the capacity
//! report that a unicast stream's rate follows. The move itself (a `ChangeTier`
//! request, then the new group) is the session's; the download state does not depend on the
//! channel, so nothing already written is fetched again.

use std::time::Instant;

use super::tier::{TierEngine, TierMove, TierParams};
use crate::wire::data::SyncInfo;

pub struct Tiering {
    engine: TierEngine,
    /// More than one tier: moves are possible.
    tiered: bool,
    /// Seconds spent on each tier, and since when on the current one.
    time_on: Vec<f64>,
    since: Instant,
    clock0: Instant,
    last_missed: u64,
    pub changes: u32,
    /// The last judged interval, until taken.
    sample: Option<TierSample>,
    /// Receiving by unicast since on this tier: the engine judges the stream, never moves.
    unicast_from: Option<usize>,
}

/// One judged tier interval: where the receiver was and what it had tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierSample {
    pub tier: usize,
    pub probing: bool,
    /// Join experiments so far.
    pub probes: u32,
}

impl Tiering {
    /// `tier`/`tiers_bps` from the join reply, `loop_bytes` the title's loop; a title with
    /// one tier needs no engine.
    pub fn new(tier: u8, tiers_bps: Vec<u64>, loop_bytes: u64, now: Instant) -> Tiering {
        let tiered = tiers_bps.len() > 1;
        // One tier: an engine on a ladder of one judges the path without ever moving.
        let tiers_bps = if tiers_bps.is_empty() {
            vec![u64::MAX]
        } else {
            tiers_bps
        };
        let mut p = TierParams::new(tiers_bps);
        p.start = tier as usize;
        p.loop_bytes = loop_bytes;
        Tiering {
            time_on: vec![0.0; if tiered { 16 } else { 1 }],
            since: now,
            engine: TierEngine::new(p, now),
            tiered,
            clock0: now,
            last_missed: 0,
            changes: 0,
            sample: None,
            unicast_from: None,
        }
    }

    /// The session now receives by unicast, on a stream of its own whose rate follows this
    /// engine's capacity reports (`channel::unicast_stream`): from now on it judges that
    /// stream as a title of one tier — it never moves, since no group's rate is its to pick —
    /// and starts afresh, since the group's delay base and loss floor say nothing about it.
    pub fn hold_for_unicast(&mut self, now: Instant) {
        if self.unicast_from.is_some() {
            return;
        }
        self.unicast_from = Some(self.engine.tier());
        self.engine = TierEngine::new(TierParams::new(vec![u64::MAX]), now);
    }

    /// The interval judged by the last [`Self::poll`], once.
    pub fn take_sample(&mut self) -> Option<TierSample> {
        self.sample.take()
    }

    /// The engine's counters (probes, moves down, the last measurement).
    pub fn counters(&self) -> Option<&super::tier::TierCounters> {
        self.tiered.then_some(&self.engine.counters)
    }

    pub fn enabled(&self) -> bool {
        self.tiered
    }

    pub fn on_sync(&mut self, info: &SyncInfo, now: Instant) {
        let local = now.saturating_duration_since(self.clock0).as_micros() as i64;
        self.engine
            .on_sync(now, local - info.send_us as i64, info.rate_bps);
    }

    /// A datagram of the channel (`bytes` on the wire, header included).
    pub fn on_data(&mut self, bytes: usize) {
        self.engine.on_packet(bytes);
    }

    /// Datagrams the receiver's socket dropped since the last call (it is short of CPU).
    pub fn on_overrun(&mut self, n: u64) {
        self.engine.on_overrun(n);
    }

    /// `missed_total`: the NAK engine's running count of units found missing.
    pub fn on_missed_total(&mut self, missed_total: u64) {
        self.engine
            .on_lost(missed_total.saturating_sub(self.last_missed));
        self.last_missed = missed_total;
    }

    /// `missing` of the title's `units` are still to come (a probe must be worth its cost).
    pub fn on_missing(&mut self, missing: u64, units: u64) {
        let loop_bytes = self.engine.loop_bytes();
        if loop_bytes > 0 {
            let bytes = loop_bytes as u128 * missing as u128 / units.max(1) as u128;
            self.engine.on_missing(bytes as u64);
        }
    }

    /// The tier to move to (or a discovery burst to ask for), if the engine decided on one.
    pub fn poll(&mut self, now: Instant) -> Option<TierMove> {
        let from = self.tier().unwrap_or(0);
        let e = &mut self.engine;
        let judged_before = e.intervals();
        let mv = e.poll(now);
        let due = e.intervals() > judged_before;
        if due && self.tiered && self.unicast_from.is_none() {
            self.sample = Some(TierSample {
                tier: e.tier(),
                probing: e.probing(),
                probes: e.counters.probes,
            });
            tracing::debug!(
                tier = e.tier(),
                interval = ?e.last_interval(),
                probing = e.probing(),
                "tier interval"
            );
        }
        match mv? {
            TierMove::To(t) => {
                self.account(from, now);
                self.changes += 1;
                Some(TierMove::To(t))
            }
            burst @ TierMove::Burst { .. } => Some(burst),
        }
    }

    /// The discovery burst asked for was granted, refused, or one of its datagrams came.
    pub fn on_burst_granted(&mut self, now: Instant) {
        self.engine.on_burst_granted(now);
    }

    pub fn on_burst_refused(&mut self, now: Instant) {
        self.engine.on_burst_refused(now);
    }

    pub fn on_burst_not_asked(&mut self) {
        self.engine.on_burst_not_asked();
    }

    /// A burst datagram at loop position `pos` of a loop of `loop_len` packets.
    pub fn on_burst_packet(&mut self, now: Instant, bytes: usize, pos: u64, loop_len: u64) {
        self.engine.on_burst_packet(now, bytes, pos, loop_len);
    }

    pub fn on_burst_sync(&mut self, info: &SyncInfo, now: Instant) {
        let local = now.saturating_duration_since(self.clock0).as_micros() as i64;
        self.engine
            .on_burst_sync(info.send_us, local - info.send_us as i64);
    }

    fn account(&mut self, tier: usize, now: Instant) {
        if let Some(x) = self.time_on.get_mut(tier) {
            *x += now.saturating_duration_since(self.since).as_secs_f64();
        }
        self.since = now;
    }

    /// The tier this receiver spent the most time on so far (where it settled).
    pub fn settled_tier(&self, now: Instant) -> usize {
        let mut time_on = self.time_on.clone();
        if let Some(x) = time_on.get_mut(self.tier().unwrap_or(0)) {
            *x += now.saturating_duration_since(self.since).as_secs_f64();
        }
        time_on
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0)
    }

    /// (measured throughput bit/s, loss ppm, capacity bit/s) of the last judged interval,
    /// for keepalives.
    pub fn report(&self) -> (u64, u32, u64) {
        let c = &self.engine.counters;
        (c.measured_bps, c.loss_ppm, c.capacity_bps)
    }

    /// Loss of the last interval, judged or not (a fraction).
    pub fn last_loss(&self) -> f64 {
        self.engine.last_interval().1 as f64 / 1e6
    }

    /// A join experiment is under way, or the receiver just moved: losses now are congestion
    /// (or the old channel's tail), not worth repair requests yet.
    pub fn settling(&self, now: Instant) -> bool {
        self.tiered && self.engine.settling(now)
    }

    /// When the engine next judges an interval.
    pub fn next_deadline(&self) -> Option<Instant> {
        Some(self.engine.next_deadline())
    }

    /// When settling ends, if it ends on its own (a probe ends at an interval's judgement).
    pub fn settle_end(&self) -> Option<Instant> {
        if self.tiered {
            self.engine.settle_end()
        } else {
            None
        }
    }

    /// The tier held (`None` for a title with one tier); on unicast, the one left for it.
    pub fn tier(&self) -> Option<usize> {
        self.tiered
            .then(|| self.unicast_from.unwrap_or(self.engine.tier()))
    }
}
