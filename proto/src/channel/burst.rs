//! Discovery bursts: a receiver asks for a short unicast burst of the loop at a faster tier's
//! rate instead of joining that tier's group to find out whether its path carries it.
//!
//! Joining a group to probe it is dear when the answer is no: a switch forwards a group it
//! has been told to stop for as long as its IGMP/MLD last-member queries take (about 2 s),
//! and all that while the probed rate floods the receiver's link and starves the tier it fell
//! back to. A burst ends exactly when the server stops sending it. Its datagrams are loop
//! packets (useful to the receiver, starting where its channel is), flagged PROBE so the
//! receiver judges them apart from its channel.
//!
//! Bounded, since it is many datagrams for one request: only to an address that echoed a
//! cookie (the unicast fallback's, so no victim can be flooded), at most [`MAX_BURST`] long,
//! at most a tier's rate, one per member per [`BURST_EVERY`], and [`MAX_BURSTS`] at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::tiers::capped;
use super::unicast_stream::UnicastStream;
use super::ChannelManager;
use crate::wire::control::{ArchiveId, Control, Cookie, Envelope, ErrorCode};

/// Longest burst granted.
pub const MAX_BURST: Duration = Duration::from_millis(500);
/// Shortest burst granted (less tells little through a switch's queue).
const MIN_BURST: Duration = Duration::from_millis(10);
/// A member gets one burst per this long.
pub const BURST_EVERY: Duration = Duration::from_secs(10);
/// Bursts running at once, server-wide: few, so a burst measures the receiver's path and
/// not the share of the server's send path it got. Receivers that start together ask
/// together; the others are told busy and probe the group instead (a large audience would
/// wait too long in turn).
pub const MAX_BURSTS: usize = 4;
/// An ended burst is remembered this long: a tier channel opened for the move it leads to
/// starts where the burst ended, since the receiver holds what the burst brought.
pub(super) const BURST_KEEP: Duration = Duration::from_secs(2);

impl ChannelManager {
    /// A member asks for a discovery burst of tier `tier`, `ms` long, to `from` (which the
    /// cookie must prove).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn probe_burst(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        cookie: Cookie,
        tier: u8,
        ms: u16,
    ) {
        let rid = env.receiver_id;
        let Some(id) = self.proven_member(now, from, env, archive_id, cookie) else {
            return;
        };
        let tiers = self.params.tiers();
        let Some(&rate) = tiers.get(tier as usize) else {
            self.error(from, env, ErrorCode::BadRequest, "no such tier");
            return;
        };
        let running: usize = self
            .channels
            .values()
            .map(|c| c.members.bursts.values().filter(|b| b.live()).count())
            .sum();
        let burst = self.params.burst;
        let c = self.channels.get_mut(&id).expect("member's channel exists");
        let rate = capped(rate, c.rate_cap);
        let (shape, block) = (*c.carousel.shape(), c.carousel.block());
        let streaming = c.members.streams.contains_key(&rid);
        let m = c.members.get_mut(rid).expect("member of its channel");
        let too_soon = m
            .burst_at
            .is_some_and(|at| now.saturating_duration_since(at) < BURST_EVERY);
        if too_soon || running >= MAX_BURSTS || streaming {
            self.counters.bursts_refused += 1;
            self.error(
                from,
                env,
                ErrorCode::Busy,
                "no discovery burst now (one per member per 10 s, a few at a time)",
            );
            return;
        }
        m.burst_at = Some(now);
        let len = Duration::from_millis(ms as u64).clamp(MIN_BURST, MAX_BURST);
        let b = UnicastStream::burst(now, from, shape, block, rate, burst, now + len);
        c.members.bursts.insert(rid, b);
        self.counters.bursts_started += 1;
        self.reply(from, env, Control::UnicastOk { archive_id });
    }
}
