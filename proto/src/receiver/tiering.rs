//! The session's side of throughput tiers: feeds the [`TierEngine`] from what the session
//! sees (SYNC delay samples, data bytes, losses the NAK engine found), says when to move to
//! another tier's channel and keeps the time spent on each. The move itself (a `ChangeTier`
//! request, then the new group) is the session's; the download state does not depend on the
//! channel, so nothing already written is fetched again.

use std::time::Instant;

use super::tier::{TierEngine, TierMove, TierParams};
use crate::wire::data::SyncInfo;

pub struct Tiering {
    engine: Option<TierEngine>,
    /// Seconds spent on each tier, and since when on the current one.
    time_on: Vec<f64>,
    since: Instant,
    clock0: Instant,
    last_missed: u64,
    pub changes: u32,
    /// The last judged interval, until taken.
    sample: Option<TierSample>,
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
    /// `tier`/`tiers_bps` from the join reply; a title with one tier needs no engine.
    pub fn new(tier: u8, tiers_bps: Vec<u64>, now: Instant) -> Tiering {
        let engine = (tiers_bps.len() > 1).then(|| {
            let mut p = TierParams::new(tiers_bps);
            p.start = tier as usize;
            TierEngine::new(p, now)
        });
        Tiering {
            time_on: vec![0.0; engine.as_ref().map_or(1, |_| 16)],
            since: now,
            engine,
            clock0: now,
            last_missed: 0,
            changes: 0,
            sample: None,
        }
    }

    /// The interval judged by the last [`Self::poll`], once.
    pub fn take_sample(&mut self) -> Option<TierSample> {
        self.sample.take()
    }

    /// The engine's counters (probes, moves down, the last measurement).
    pub fn counters(&self) -> Option<&super::tier::TierCounters> {
        self.engine.as_ref().map(|e| &e.counters)
    }

    pub fn enabled(&self) -> bool {
        self.engine.is_some()
    }

    pub fn on_sync(&mut self, info: &SyncInfo, now: Instant) {
        if let Some(e) = &mut self.engine {
            let local = now.saturating_duration_since(self.clock0).as_micros() as i64;
            e.on_delay(local - info.send_us as i64);
        }
    }

    pub fn on_data(&mut self, bytes: usize) {
        if let Some(e) = &mut self.engine {
            e.on_packet(bytes, None);
        }
    }

    /// `missed_total`: the NAK engine's running count of units found missing.
    pub fn on_missed_total(&mut self, missed_total: u64) {
        if let Some(e) = &mut self.engine {
            e.on_lost(missed_total.saturating_sub(self.last_missed));
        }
        self.last_missed = missed_total;
    }

    /// The tier to move to, if the engine decided on one.
    pub fn poll(&mut self, now: Instant) -> Option<u8> {
        let from = self.tier().unwrap_or(0);
        let e = self.engine.as_mut()?;
        let due = now >= e.next_deadline();
        let mv = e.poll(now);
        if due {
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
        let TierMove::To(t) = mv?;
        self.account(from, now);
        self.changes += 1;
        Some(t as u8)
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

    /// (measured throughput bit/s, loss ppm) of the last interval, for keepalives.
    pub fn report(&self) -> (u64, u32) {
        self.engine
            .as_ref()
            .map(|e| (e.counters.measured_bps, e.counters.loss_ppm))
            .unwrap_or((0, 0))
    }

    /// A join experiment is under way, or the receiver just moved: losses now are congestion
    /// (or the old channel's tail), not worth repair requests yet.
    pub fn settling(&self, now: Instant) -> bool {
        self.engine.as_ref().is_some_and(|e| e.settling(now))
    }

    /// When the engine next judges an interval (`None` for a title with one tier).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.engine.as_ref().map(|e| e.next_deadline())
    }

    /// When settling ends, if it ends on its own (a probe ends at an interval's judgement).
    pub fn settle_end(&self) -> Option<Instant> {
        self.engine.as_ref().and_then(|e| e.settle_end())
    }

    pub fn tier(&self) -> Option<usize> {
        self.engine.as_ref().map(|e| e.tier())
    }
}
