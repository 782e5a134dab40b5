//! What the manager counts and reports: [`Counters`] (every decision that an operator may want
//! to see, from joins to NAKs dropped), and the per-channel [`ChannelStats`] of a
//! `StatsRequest` reply, heartbeats and logs.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use super::ChannelManager;

/// A measurement for the driver's histograms: plain numbers, taken where the state machine
/// decides (the histogram types and their export live in the driver, `src/metrics.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// A NAK first asked for a unit (or a FEC block's amount) and, this long after, its
    /// repair (the amount's first extra symbol) was handed to the driver to send. Units the
    /// loop brought first are not sampled.
    NakToRepair(Duration),
    /// A receiver's join was answered (`JoinOk`, a new member of the channel) and, this long
    /// after, the channel handed the driver its next data packet (loop or repair; SYNCs do
    /// not count): what the server adds to a receiver's start, not the network's part.
    JoinToFirstPacket(Duration),
    /// A member completed (a `Complete` under its session MAC): the time and loops' worth
    /// (thousandths) it reports, clamped to [`MAX_REPORTED_ELAPSED`] and
    /// [`MAX_REPORTED_MILLI_LOOPS`]. Untrusted figures, for a histogram only.
    Completion { elapsed: Duration, milli_loops: u32 },
}

/// Reported completion times are clamped to this (a week).
pub const MAX_REPORTED_ELAPSED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Reported loops are clamped to this many thousandths (1,000 loops).
pub const MAX_REPORTED_MILLI_LOOPS: u32 = 1_000_000;
/// Samples held until the driver takes them; beyond, new ones are counted and dropped.
pub const MAX_SAMPLES: usize = 65_536;

/// Samples waiting for the driver ([`ChannelManager::poll_sample`]).
#[derive(Default)]
pub(super) struct Samples {
    queue: VecDeque<Sample>,
    pub(super) dropped: u64,
}

impl Samples {
    pub(super) fn push(&mut self, s: Sample) {
        if self.queue.len() >= MAX_SAMPLES {
            self.dropped += 1;
        } else {
            self.queue.push_back(s);
        }
    }
}

/// Counters, reported by `StatsRequest` and in logs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub control_received: u64,
    pub control_malformed: u64,
    /// Requests that needed a proven address and had no valid token: answered with a Retry
    /// (a token), or dropped when even that would be larger than the request.
    pub retries_sent: u64,
    pub unvalidated_dropped: u64,
    /// Replies to unproven addresses withheld because they were larger than the request.
    pub replies_withheld: u64,
    /// Stats requests from addresses outside `[server] admin`.
    pub stats_refused: u64,
    /// Messages for a joined session without a valid MAC under its key (forged: dropped).
    pub session_forged: u64,
    /// Joins refused: the address already holds `max_sessions_per_address` sessions.
    pub refused_sessions_per_address: u64,
    /// Receivers that joined a title (a tier change is counted in `tier_changes`).
    pub joins: u64,
    /// Members moved from one tier's channel of a title to another's.
    pub tier_changes: u64,
    pub not_here: u64,
    pub channels_opened: u64,
    pub channels_closed: u64,
    pub completions: u64,
    pub leases_expired: u64,
    pub unknown_session: u64,
    pub cookies_sent: u64,
    pub unicast_started: u64,
    /// Unicast streams ended: no authenticated keepalive from their own address for a lease.
    pub streams_consent_expired: u64,
    /// Unicast streams and bursts ended because their address was reported unreachable
    /// (ICMP, [`super::ChannelManager::on_unreachable`]).
    pub streams_unreachable: u64,
    /// Discovery bursts started ([`crate::wire::control::Control::ProbeBurst`]), refused
    /// (too soon after the member's last one, or too many running), and their packets.
    pub bursts_started: u64,
    pub bursts_refused: u64,
    pub burst_packets_sent: u64,
    pub bad_cookies: u64,
    pub sync_sent: u64,
    pub packets_sent: u64,
    pub payload_bytes_sent: u64,
    pub head_chunks_sent: u64,
    /// NAK datagrams accepted, and the units they asked for.
    pub naks_received: u64,
    pub nak_units_received: u64,
    /// NAKs dropped: malformed, unknown channel, or over the per-address rate.
    pub naks_malformed: u64,
    pub naks_unknown_channel: u64,
    pub naks_rate_limited: u64,
    /// NAKs from no member of the channel, or without a valid session MAC: dropped.
    pub naks_unauthenticated: u64,
    /// Units over the NAKer's budget (its channel's packet rate): dropped.
    pub nak_units_over_budget: u64,
    /// Units out of range or beyond `max_nak_units` in one NAK.
    pub nak_units_ignored: u64,
    /// Units whose repair was already queued, or sent within the last GRTT.
    pub nak_units_coalesced: u64,
    /// FEC symbols asked for by amount (capped at a block's extras), those already owed or
    /// answered within the last GRTT, and those for no FEC block of the archive.
    pub nak_symbols_received: u64,
    pub nak_symbols_coalesced: u64,
    pub nak_symbols_ignored: u64,
    /// Of `repairs_sent`: extra FEC symbols made on demand.
    pub extras_sent: u64,
    pub repairs_sent: u64,
    /// Of `packets_sent` and `repairs_sent`: those of unicast members' own streams.
    pub unicast_packets_sent: u64,
    pub unicast_repairs_sent: u64,
    /// Joins refused while draining.
    pub refused_draining: u64,
    /// Archives left out at start-up: unreadable, truncated, or not signed by this server.
    pub archives_skipped: u64,
    /// Titles withdrawn while serving because their archive could no longer be read.
    pub archives_withdrawn: u64,
    /// Play requests answered with a grant, and refused (replayed, used up, forged, ...).
    pub plays_granted: u64,
    pub plays_refused: u64,
    /// Play requests shed because the ticket worker was busy (the receiver retries).
    pub plays_shed: u64,
    /// Scheduled loops opened at a window's start / closed at its end (`crate::schedule`).
    pub scheduled_opened: u64,
    pub scheduled_closed: u64,
    /// Members dropped when a scheduled loop closed at its window's end.
    pub scheduled_members_dropped: u64,
    /// Joins turned away because the title loops only in its scheduled window.
    pub refused_outside_window: u64,
    /// Histogram samples dropped because the driver did not take them ([`MAX_SAMPLES`]).
    pub samples_dropped: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChannelStats {
    pub channel: u32,
    pub tier: usize,
    /// Mean of the members' reported throughput (bit/s) and loss (ppm).
    pub reported_bps: u64,
    pub reported_loss_ppm: u32,
    pub payload_bytes_sent: u64,
    pub title: String,
    pub group: String,
    pub members: usize,
    pub unicast: usize,
    /// Rates of the unicast members' own streams (bit/s).
    pub unicast_rates_bps: Vec<u64>,
    pub loops: u32,
    pub packets_sent: u64,
    pub rate_bps: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub counters: Counters,
    pub channels: Vec<ChannelStats>,
}

impl ChannelManager {
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Payload bytes the group loops of closed channels sent, by (title, tier): added to the
    /// open channels' `payload_bytes_sent`, a per-title count that does not fall back when a
    /// channel closes (however short its life).
    pub fn closed_payload_bytes(&self) -> &std::collections::BTreeMap<(String, usize), u64> {
        &self.closed_sent
    }

    /// The next measurement for the driver's histograms.
    pub fn poll_sample(&mut self) -> Option<Sample> {
        let s = self.samples.queue.pop_front();
        self.counters.samples_dropped = self.samples.dropped;
        s
    }

    /// The driver left `n` archives out at start-up (see [`Counters::archives_skipped`]).
    pub fn count_archives_skipped(&mut self, n: u64) {
        self.counters.archives_skipped += n;
    }

    /// The ticket service (outside this state machine) answered a play request.
    /// A play request shed: the ticket worker's queue was full.
    pub fn count_play_shed(&mut self) {
        self.counters.plays_shed += 1;
    }

    pub fn count_play(&mut self, granted: bool) {
        if granted {
            self.counters.plays_granted += 1;
        } else {
            self.counters.plays_refused += 1;
        }
    }

    pub fn stats(&self) -> Stats {
        let mut counters = self.counters.clone();
        counters.samples_dropped = self.samples.dropped;
        Stats {
            counters,
            channels: self
                .channels
                .iter()
                .map(|(id, c)| {
                    let (reported_bps, reported_loss_ppm) = c.members.mean_report();
                    ChannelStats {
                        channel: *id,
                        tier: c.tier,
                        reported_bps,
                        reported_loss_ppm,
                        payload_bytes_sent: c.packets_sent * c.symbol_size as u64,
                        title: c.title.clone(),
                        group: c.group.to_string(),
                        members: c.members.len(),
                        unicast: c.members.unicast_count(),
                        unicast_rates_bps: c
                            .members
                            .streams
                            .values()
                            .map(|s| s.rate_bps())
                            .collect(),
                        loops: c.carousel.loops(),
                        packets_sent: c.packets_sent,
                        rate_bps: c.pacer.rate_bps(),
                    }
                })
                .collect(),
        }
    }
}
