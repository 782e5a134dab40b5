//! Throughput tiers (DESIGN.md §2): a title may loop on one channel per tier, receivers move
//! between them, and each tier's rate follows its members' *capacity* (the lowest, or their
//! average) within the tier's band. Capacity is what a member's path carries, found by its
//! tier engine from rising delay, loss that grows with rate or its own socket overruns
//! (`receiver::judge`) — never the goodput it gets at the current rate, which random loss
//! lowers and which would spiral a rate down. A channel a member left for another tier
//! lingers a while, so a failed probe falls back to it at its loop position.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::loops::Channel;
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
/// A tier runs this far below its slowest congested member's capacity, so that member's
/// queue drains.
const RATE_MARGIN: f64 = 0.95;
/// With no member reporting a limit, a tier's rate climbs back towards its ceiling by this
/// fraction of the current rate per update (at least 1 % of the ceiling): gently, so a member
/// whose limit it was sees its queue grow before it loses much, yet back at the ceiling within
/// seconds when the limit is gone.
const RATE_CLIMB: f64 = 0.10;
/// Tiers of the adaptive ladder a server derives when none are configured, and the ratio
/// between neighbours (a decade over the four).
pub const LADDER_TIERS: usize = 4;
const LADDER_STEP: f64 = 2.154_434_690_031_884; // 10^(1/3)
/// How long a tier's channel keeps looping after its last member moved up to probe a faster
/// tier: long enough for a failed probe to come back to it (a probe is judged within two
/// intervals of at most 0.5 s), short enough that a probe that holds wastes little. A
/// channel emptied by a move *down* closes at once: its receiver will not be back soon, and
/// it is the dearest channel to keep looping.
pub const TIER_LINGER: Duration = Duration::from_millis(1500);

/// The rates tier `i`'s channel may run at, `(lowest, nominal)`: its members' capacity moves
/// it within this band. Never down into the tier below, and never below half its nominal
/// rate: a member that needs less belongs a tier down (pulling the tier further would hold
/// every other member to it, the very thing tiers exist to avoid). The bottom tier has no tier
/// below and may go down to a quarter. Receivers choose their tier by the same band
/// ([`TierParams::floor`](crate::receiver::tier::TierParams::floor)).
pub fn band(tiers: &[u64], i: usize) -> (u64, u64) {
    let hi = tiers[i];
    let lo = if i == 0 {
        hi / 4
    } else {
        (tiers[i - 1] + 1).max(hi / 2)
    };
    (lo.min(hi), hi)
}

/// The adaptive default: [`LADDER_TIERS`] geometric tiers whose top is `rate_bps`, so a
/// default install serves a receiver of a tenth of the rate (and, with the bottom tier's
/// band, a fortieth) without holding the others to it.
pub fn default_ladder(rate_bps: u64) -> Vec<u64> {
    (0..LADDER_TIERS)
        .rev()
        .map(|k| (rate_bps as f64 / LADDER_STEP.powi(k as i32)) as u64)
        .collect()
}

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

    /// Receiver `rid` moved from channel `old` to tier `to`'s. Called only once it is in the
    /// new channel, so the two never share a group; an `old` emptied by a move up lingers
    /// (and is closed by the idle check after [`TIER_LINGER`]).
    pub(super) fn leave_for_tier(&mut self, now: Instant, old: u32, rid: u64, to: usize) {
        let c = self
            .channels
            .get_mut(&old)
            .expect("member's channel exists");
        c.members.remove(rid);
        // Only an emptied channel lingers; one that still has members just carries on
        // (a stale linger on it would be "due" forever and spin the driver).
        if c.members.is_empty() && to > c.tier {
            c.linger_until = Some(now + TIER_LINGER);
        }
    }

    /// Set each tier's rate from its members' capacity reports (policy lowest/average)
    /// within the tier's band: above the next tier down (a quarter of its rate for the
    /// bottom tier), at most its nominal rate. With no member limited, climb back towards the
    /// ceiling.
    pub(super) fn adapt_rates(&mut self) {
        let tiers = self.params.tiers();
        let policy = self.params.rate_policy;
        for c in self.channels.values_mut() {
            let hi = tiers[c.tier];
            let now_rate = c.pacer.rate_bps() as f64;
            let climbed =
                ((now_rate + (now_rate * RATE_CLIMB).max(hi as f64 * 0.01)) as u64).min(hi);
            let target = asked_rate(c, &tiers, policy).map_or(climbed, |t| t.min(climbed));
            c.pacer.set_rate(capped(target, c.rate_cap));
        }
    }

    /// A member of channel `id` just reported a capacity: bring the rate down to it now, not
    /// at the next update — every interval of overload costs its members repairs.
    pub(super) fn follow_capacity(&mut self, id: u32) {
        if self.params.tiers_bps.is_empty() {
            return;
        }
        let tiers = self.params.tiers();
        let policy = self.params.rate_policy;
        if let Some(c) = self.channels.get_mut(&id) {
            if let Some(t) = asked_rate(c, &tiers, policy) {
                let t = capped(t, c.rate_cap);
                if t < c.pacer.rate_bps() {
                    c.pacer.set_rate(t);
                }
            }
        }
    }
}

/// The rate channel `c`'s members ask for, within its tier's band, when one of them found
/// its path's limit (`None`: nobody did — the rate may climb). A member with no limit asks
/// for the ceiling; one with a limit for a little under it.
fn asked_rate(c: &Channel, tiers: &[u64], policy: RatePolicy) -> Option<u64> {
    let (lo, hi) = band(tiers, c.tier);
    // Unicast members' reports steer their own streams, not the group.
    let asks: Vec<(u64, bool)> = c
        .members
        .multicast()
        .filter(|m| m.rx_bps > 0 || m.capacity_bps > 0)
        .map(|m| match m.capacity_bps {
            0 => (hi, false),
            cap => ((cap as f64 * RATE_MARGIN) as u64, true),
        })
        .collect();
    if !asks.iter().any(|a| a.1) {
        return None;
    }
    let t = match policy {
        RatePolicy::Lowest => asks.iter().map(|a| a.0).min().expect("non-empty"),
        RatePolicy::Average => asks.iter().map(|a| a.0).sum::<u64>() / asks.len() as u64,
    };
    Some(t.clamp(lo.min(hi), hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ladder_spans_a_decade_below_the_rate() {
        let l = default_ladder(900_000_000);
        assert_eq!(l.len(), LADDER_TIERS);
        assert_eq!(l[3], 900_000_000);
        assert!((89_000_000..91_000_000).contains(&l[0]), "{l:?}");
        assert!(l.windows(2).all(|w| w[0] < w[1]));
    }
}
