//! A unicast member's own stream. A receiver whose network drops multicast gets the loop by
//! unicast (`unicast`: cookie handshake first); sent at the group's rate with the group's
//! packets, a copy behind a slower path than the group's loses most of it and waits for
//! loop after loop to fill the gaps. So each unicast member gets a stream of its own:
//!
//! * its own pacer, at the rate *its* path carries, set by a TCP-friendly controller driven
//!   by the receiver's capacity reports (`receiver::judge`): a report of a limit puts the
//!   rate a little under it ([`MARGIN`]); with no limit reported the rate grows, fast until
//!   the first limit (slow start, ×[`SLOW_START`] a second: far gentler than TCP's doubling
//!   per RTT, since a limit shows only in the receiver's next judged half-second) and slowly
//!   after that (+[`CLIMB`] of the rate a second) — never above the title's rate, never while the
//!   receiver has gone quiet (growth needs fresh reports, as TCP's needs ACKs);
//! * its own position in the loop, so it starts at once (at the block the group's loop is
//!   at: where a receiver that lost multicast mid-way stopped hearing it);
//! * its own repair queue: its NAKs are repaired to it alone, and nobody else's reach it;
//! * its own SYNCs, carrying the stream's rate and send time, so the receiver's judge sees
//!   this stream's delay and rate, not the group's.
//!
//! Only an address that passed the cookie check gets a stream; the reports and NAKs that
//! steer it can change what it carries and how fast (within the title's rate), never where
//! it goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::emit::{next_datagram, EmitCtx, LoopParts, Sent};
use super::repair::RepairQueue;
use super::Counters;
use crate::carousel::{Carousel, LoopShape};
use crate::pacer::Pacer;
use crate::wire::data::DATA_HEADER_LEN;

use super::TransmitPayload;

/// A stream starts at this rate (or the title's, if lower): modest, as TCP's first window is,
/// since nothing is known about the path yet.
pub const START_BPS: u64 = 20_000_000;
/// A reported capacity sets the rate this far under it, so the path's queue drains.
pub const MARGIN: f64 = 0.9;
/// Slow start: with no limit found yet, the rate grows by this factor a second.
pub const SLOW_START: f64 = 2.0;
/// After the first limit, with none reported now, the rate grows by this fraction of itself
/// a second (about a tenth of the way back to a 0.9× cut every two seconds).
pub const CLIMB: f64 = 0.05;
/// The stream never runs slower than this (a pacer rate of 0 would mean unlimited).
const MIN_BPS: u64 = 64_000;
/// A discovery burst sends a SYNC at least this often.
const BURST_SYNCS: Duration = Duration::from_millis(8);
/// Share of the stream's packets that may be repairs. Every repair is for its one receiver,
/// so most of the stream may be repairs; the rest keeps the loop moving whatever NAKs come.
const REPAIR_SHARE: f64 = 0.9;

pub(super) struct UnicastStream {
    /// The receiver's confirmed unicast address (as `dests` for [`super::Transmit`]).
    pub(super) to: SocketAddr,
    dests: Arc<[SocketAddr]>,
    pacer: Pacer,
    carousel: Carousel,
    pub(super) repair: RepairQueue,
    next_sync: Instant,
    /// The title's rate (its top tier, under any schedule cap): the stream's ceiling.
    ceiling: u64,
    /// No limit reported yet: grow fast.
    slow_start: bool,
    /// The receiver's last capacity report (0: no limit found on its path now).
    capacity: u64,
    /// When the receiver last reported (or confirmed the stream).
    last_report: Instant,
    /// Consent (RFC 7675's idea): when an authenticated keepalive last came from the stream's
    /// own address. A stream without it for a lease ends, whoever else keeps the session's
    /// lease alive: a stream goes only where its receiver still asks for it.
    consent_at: Instant,
    /// Growth is applied up to here.
    last_adapt: Instant,
    pub(super) packets_sent: u64,
    /// A discovery burst (`channel::burst`): a fixed rate that never adapts, and an end.
    until: Option<Instant>,
    /// The burst's closing SYNC went out.
    final_sync: bool,
}

impl UnicastStream {
    /// A stream to `to` looping `shape` from `start_block`, at most `ceiling` bit/s.
    pub(super) fn new(
        now: Instant,
        to: SocketAddr,
        shape: LoopShape,
        start_block: u64,
        ceiling: u64,
        burst: Duration,
    ) -> UnicastStream {
        let ceiling = ceiling.max(MIN_BPS);
        UnicastStream {
            to,
            dests: Arc::from(vec![to]),
            pacer: Pacer::new(START_BPS.min(ceiling), burst, now),
            carousel: Carousel::starting_at(shape, start_block),
            repair: RepairQueue::default(),
            next_sync: now,
            ceiling,
            slow_start: true,
            capacity: 0,
            last_report: now,
            consent_at: now,
            last_adapt: now,
            packets_sent: 0,
            until: None,
            final_sync: false,
        }
    }

    /// A discovery burst to `to`: the loop from `start_block` at exactly `rate` bit/s until
    /// `until`, its datagrams flagged PROBE.
    pub(super) fn burst(
        now: Instant,
        to: SocketAddr,
        shape: LoopShape,
        start_block: u64,
        rate: u64,
        burst: Duration,
        until: Instant,
    ) -> UnicastStream {
        let mut s = UnicastStream::new(now, to, shape, start_block, rate, burst);
        s.slow_start = false;
        s.set_rate(rate as f64);
        s.until = Some(until);
        s
    }

    /// An authenticated keepalive came from `from`: consent, if that is the stream's address.
    pub(super) fn on_keepalive_from(&mut self, now: Instant, from: std::net::IpAddr) {
        if from == self.to.ip() {
            self.consent_at = now;
        }
    }

    /// Whether the receiver's consent is older than `limit`.
    pub(super) fn consent_expired(&self, now: Instant, limit: Duration) -> bool {
        now.saturating_duration_since(self.consent_at) > limit
    }

    /// Whether this burst still has time to send (always true for a stream).
    pub(super) fn live(&self) -> bool {
        self.until.is_none_or(|u| self.due() < u)
    }

    /// When this burst ends (`None` for a stream).
    pub(super) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// The block the stream's loop is at.
    pub(super) fn block(&self) -> u64 {
        self.carousel.block()
    }

    pub(super) fn rate_bps(&self) -> u64 {
        self.pacer.rate_bps()
    }

    /// When the stream next has something to send: its loop never waits, so whenever its
    /// pacer allows (an empty archive sends only SYNCs).
    pub(super) fn due(&self) -> Instant {
        if self.carousel.shape().loop_packets() == 0 {
            self.next_sync.max(self.pacer.next_send())
        } else {
            self.pacer.next_send()
        }
    }

    /// The receiver reported (keepalive): `capacity_bps` is what its path carries when its
    /// judge found the limit, else 0.
    pub(super) fn on_report(&mut self, now: Instant, fresh: Duration, capacity_bps: u64) {
        self.adapt(now, fresh);
        self.last_report = now;
        self.capacity = capacity_bps;
        if capacity_bps > 0 {
            self.slow_start = false;
            self.set_rate(capacity_bps as f64 * MARGIN);
        }
    }

    /// Grow the rate for the time since the last call, if no limit is reported and the
    /// receiver reported within `fresh`.
    pub(super) fn adapt(&mut self, now: Instant, fresh: Duration) {
        let dt = now.saturating_duration_since(self.last_adapt).as_secs_f64();
        self.last_adapt = now;
        if self.until.is_some()
            || self.capacity > 0
            || now.saturating_duration_since(self.last_report) > fresh
        {
            return;
        }
        let r = self.pacer.rate_bps() as f64;
        let grown = if self.slow_start {
            r * SLOW_START.powf(dt)
        } else {
            r * (1.0 + CLIMB * dt)
        };
        self.set_rate(grown);
    }

    fn set_rate(&mut self, bps: f64) {
        self.pacer
            .set_rate((bps as u64).clamp(MIN_BPS, self.ceiling));
    }

    /// The stream's next datagram (call when [`Self::due`]): a SYNC if one is due, else a
    /// repair if one is due, else the next loop packet. `ctx` is the channel's; the stream's
    /// SYNCs are for a group of one, with the receiver's round trip `rtt`, and most of the
    /// stream may be repairs (all of them are this receiver's).
    pub(super) fn transmit(
        &mut self,
        now: Instant,
        mut ctx: EmitCtx<'_>,
        rtt: Duration,
        counters: &mut Counters,
        samples: &mut super::stats::Samples,
    ) -> ([u8; DATA_HEADER_LEN], TransmitPayload, Arc<[SocketAddr]>) {
        ctx.repair_share = REPAIR_SHARE;
        ctx.probe = self.until.is_some();
        if ctx.probe {
            ctx.fec_extra = 0.0;
        }
        if let Some(until) = self.until {
            // A burst says SYNC a few times over its length, the last time just before it
            // ends: their delays show a queue building on the path.
            ctx.sync_interval = BURST_SYNCS;
            if !self.final_sync && until.saturating_duration_since(now) <= BURST_SYNCS / 4 {
                self.final_sync = true;
                self.next_sync = now;
            }
        }
        let parts = LoopParts {
            carousel: &mut self.carousel,
            repair: &mut self.repair,
            pacer: &mut self.pacer,
            next_sync: &mut self.next_sync,
        };
        let (header, payload, sent) =
            next_datagram(now, parts, &ctx, || (rtt, 1), counters, samples);
        match sent {
            Sent::Sync => {}
            Sent::Repair | Sent::Loop if ctx.probe => counters.burst_packets_sent += 1,
            Sent::Repair | Sent::Loop => {
                self.packets_sent += 1;
                counters.unicast_packets_sent += 1;
                if sent == Sent::Repair {
                    counters.unicast_repairs_sent += 1;
                }
            }
        }
        (header, payload, self.dests.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(now: Instant, ceiling: u64) -> UnicastStream {
        let shape = LoopShape::data_only(1000, 40);
        let to = "10.0.0.9:6000".parse().unwrap();
        UnicastStream::new(now, to, shape, 0, ceiling, Duration::from_millis(4))
    }

    const FRESH: Duration = Duration::from_secs(2);

    fn run(s: &mut UnicastStream, t0: Instant, from_s: f64, to_s: f64, cap: u64) {
        let mut t = from_s;
        while t < to_s {
            let now = t0 + Duration::from_secs_f64(t);
            s.adapt(now, FRESH);
            if ((t * 1000.0).round() as u64) % 500 == 0 {
                s.on_report(now, FRESH, cap);
            }
            t += 0.05;
        }
    }

    #[test]
    fn starts_modest_grows_fast_until_a_limit_then_sits_under_it() {
        let t0 = Instant::now();
        let mut s = stream(t0, 1_000_000_000);
        assert_eq!(s.rate_bps(), START_BPS);
        // Slow start: ×SLOW_START a second.
        run(&mut s, t0, 0.0, 2.0, 0);
        let r = s.rate_bps() as f64;
        let want = START_BPS as f64 * SLOW_START.powf(1.95);
        assert!((r / want - 1.0).abs() < 0.01, "{r} {want}");
        // A limit of 50 Mbit/s: 45.
        s.on_report(t0 + Duration::from_secs(2), FRESH, 50_000_000);
        assert_eq!(s.rate_bps(), 45_000_000);
        // Held while the limit is reported.
        run(&mut s, t0, 2.0, 4.0, 50_000_000);
        assert_eq!(s.rate_bps(), 45_000_000);
        // No limit any more: +5 % a second, not slow start.
        run(&mut s, t0, 4.0, 6.0, 0);
        let r = s.rate_bps() as f64;
        assert!((49e6..50.5e6).contains(&r), "{r}");
    }

    #[test]
    fn never_above_the_ceiling_and_never_without_reports() {
        let t0 = Instant::now();
        let mut s = stream(t0, 30_000_000);
        assert_eq!(s.rate_bps(), START_BPS);
        run(&mut s, t0, 0.0, 5.0, 0);
        assert_eq!(s.rate_bps(), 30_000_000);
        let mut s = stream(t0, 1_000_000_000);
        // Reports stop: no growth past `fresh`.
        for i in 0..200 {
            s.adapt(t0 + Duration::from_millis(50 * i), FRESH);
        }
        let r = s.rate_bps() as f64;
        assert!(r < START_BPS as f64 * SLOW_START.powf(2.1), "{r}");
        // A report of a tiny capacity never means "unlimited".
        s.on_report(t0 + Duration::from_secs(11), FRESH, 1);
        assert_eq!(s.rate_bps(), MIN_BPS);
    }
}
