//! Throughput tiers (DESIGN.md §2): a title may loop on one channel per tier, receivers move
//! between them, and each tier's rate follows its members' reported throughput (their
//! average, or the lowest) within the tier's bounds. A channel a member left for another tier
//! lingers a while, so a failed probe falls back to it at its loop position.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::ChannelManager;
use crate::wire::control::ArchiveId;

/// Rate policy of a tier's channel (DESIGN.md §2: "their average, or the lowest").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all(deserialize = "lowercase"))]
pub enum RatePolicy {
    /// Follow the slowest member: nobody on the tier is overrun.
    Lowest,
    /// Follow the average: the tier favours its typical member.
    Average,
}

/// Tier rates follow member reports this often.
const RATE_UPDATE: Duration = Duration::from_secs(1);
/// A tier runs this much above what its members report, so they can show they keep up with
/// more (the rate then creeps up to the tier's ceiling) or fall behind (it comes down).
const RATE_HEADROOM: f64 = 1.05;
/// How long a tier's channel keeps looping after its last member moved to another tier.
const TIER_LINGER: Duration = Duration::from_secs(3);
/// Reported loss at which a member counts as limited by its tier's rate (1%).
const CONGESTED_PPM: u32 = 10_000;

/// `rate` (0 = unlimited) under an optional cap.
pub(super) fn capped(rate: u64, cap: Option<u64>) -> u64 {
    match cap {
        Some(c) if rate == 0 => c,
        Some(c) => rate.min(c),
        None => rate,
    }
}

/// When tier rates next follow the members' reports.
pub(super) struct RateClock {
    next_update: Instant,
}

impl RateClock {
    pub(super) fn new(now: Instant) -> RateClock {
        RateClock {
            next_update: now + RATE_UPDATE,
        }
    }

    /// True (and the next update scheduled) when an update is due.
    pub(super) fn due(&mut self, now: Instant) -> bool {
        if now < self.next_update {
            return false;
        }
        self.next_update = now + RATE_UPDATE;
        true
    }
}

impl ChannelManager {
    /// The channel looping `archive_id` at `tier`, if open.
    pub(super) fn tier_channel(&self, archive_id: &ArchiveId, tier: usize) -> Option<u32> {
        self.channels
            .iter()
            .find(|(_, c)| &c.archive_id == archive_id && c.tier == tier)
            .map(|(id, _)| *id)
    }

    /// Receiver `rid` moved from channel `old` to another tier's. Called only once it is in
    /// the new channel, so the two never share a group; an emptied `old` lingers (and is
    /// closed by the idle check after [`TIER_LINGER`]).
    pub(super) fn leave_for_tier(&mut self, now: Instant, old: u32, rid: u64) {
        let c = self
            .channels
            .get_mut(&old)
            .expect("member's channel exists");
        c.members.remove(rid);
        c.rebuild_dests();
        // Only an emptied channel lingers; one that still has members just carries on
        // (a stale linger on it would be "due" forever and spin the driver).
        if c.members.is_empty() {
            c.linger_until = Some(now + TIER_LINGER);
        }
    }

    /// Set each tier's rate from its members' reports (policy lowest/average), within the
    /// tier's bounds: above the next tier down, at most its nominal rate.
    pub(super) fn adapt_rates(&mut self) {
        let tiers = self.params.tiers();
        for c in self.channels.values_mut() {
            let hi = tiers[c.tier];
            // A member that is not losing packets is not limited by this rate: it asks for
            // the ceiling. Only congested members (loss above CONGESTED_PPM) pull a tier down.
            let reports: Vec<u64> = c
                .members
                .iter()
                .filter(|m| m.rx_bps > 0)
                .map(|m| {
                    if m.loss_ppm >= CONGESTED_PPM {
                        m.rx_bps
                    } else {
                        hi
                    }
                })
                .collect();
            if reports.is_empty() {
                continue;
            }
            let target = match self.params.rate_policy {
                RatePolicy::Lowest => *reports.iter().min().expect("non-empty"),
                RatePolicy::Average => reports.iter().sum::<u64>() / reports.len() as u64,
            };
            let lo = if c.tier == 0 {
                hi / 4
            } else {
                tiers[c.tier - 1] + 1
            };
            let rate = ((target as f64 * RATE_HEADROOM) as u64).clamp(lo.min(hi), hi);
            c.pacer.set_rate(capped(rate, c.rate_cap));
        }
    }
}
