//! Repairs: NAKs arriving on the control port, the per-source NAK budget that keeps one
//! address from flooding the server, and each channel's repair queue, which sends NAKed
//! packets ahead of the loop after a one-GRTT aggregation window, bounded so that repairs
//! never take more than `repair_share` of the channel and no NAK pattern can stall the loop.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{ChannelManager, Counters};
use crate::archive::PacketId;
use crate::carousel::LoopShape;
use crate::wire::nak::Nak;

/// Most repairs queued per channel (positions, ~40 bytes each): bounds server memory under a
/// NAK storm whatever the archive size; units beyond it come round with the loop.
pub const MAX_REPAIR_QUEUE: usize = 65_536;

/// NAK-rate bucket of one source address.
struct NakBucket {
    tokens: f64,
    at: Instant,
}

/// NAKs accepted per source address (token buckets).
#[derive(Default)]
pub(super) struct NakLimiter {
    buckets: HashMap<IpAddr, NakBucket>,
}

impl NakLimiter {
    /// Spend one of `ip`'s tokens (`rate` per second, burst of one second's worth); false if
    /// it has none left.
    fn admit(&mut self, now: Instant, ip: IpAddr, rate: f64) -> bool {
        let b = self.buckets.entry(ip).or_insert(NakBucket {
            tokens: rate,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        if self.buckets.len() > 4096 {
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(2));
        }
        true
    }
}

/// One channel's repairs.
#[derive(Default)]
pub(super) struct RepairQueue {
    /// Loop positions to repair (ordered, so a block's hash packet precedes its data).
    pending: BTreeSet<u64>,
    /// When the current NAK aggregation window ends.
    due: Option<Instant>,
    /// Repair credit: grows with loop packets, spent by repairs.
    tokens: f64,
    /// Unit → when it was last repaired (NAKs for it within a GRTT are stale).
    repaired_at: HashMap<u64, Instant>,
}

impl RepairQueue {
    fn ready(&self, now: Instant) -> bool {
        self.tokens >= 1.0 && self.due.is_some_and(|t| t <= now) && !self.pending.is_empty()
    }

    /// The repair to send now in place of a loop packet, if one is due and within credit.
    pub(super) fn take(&mut self, now: Instant, shape: &LoopShape) -> Option<PacketId> {
        if !self.ready(now) {
            return None;
        }
        let pos = self.pending.pop_first().expect("ready checked");
        if self.pending.is_empty() {
            self.due = None;
        }
        self.tokens -= 1.0;
        let pkt = shape.packet_at(pos);
        self.repaired_at
            .insert(shape.unit_index(pkt).expect("in range"), now);
        Some(pkt)
    }

    /// `pkt` went out in the loop: a queued repair of it is moot, and repair credit grows.
    pub(super) fn looped(&mut self, shape: &LoopShape, pkt: PacketId, repair_share: f64) {
        self.pending.remove(&shape.loop_pos(pkt));
        let share = repair_share.clamp(0.0, 0.95);
        self.tokens = (self.tokens + share / (1.0 - share)).min(64.0);
    }

    /// Queue the units `nak` asks for (at most `max_units` of them), counting what is
    /// ignored or coalesced.
    pub(super) fn add(
        &mut self,
        now: Instant,
        nak: &Nak,
        shape: &LoopShape,
        grtt: Duration,
        max_units: u64,
        counters: &mut Counters,
    ) {
        let units = shape.loop_packets();
        let mut budget = max_units;
        for &(first, len) in &nak.ranges {
            let end = first.saturating_add(len as u64);
            let in_range = first.min(units)..end.min(units);
            counters.nak_units_ignored += (end - first) - (in_range.end - in_range.start);
            for u in in_range.clone() {
                if budget == 0 || self.pending.len() >= MAX_REPAIR_QUEUE {
                    // Over this NAK's budget or the channel's queue: the loop brings them.
                    counters.nak_units_ignored += in_range.end - u;
                    break;
                }
                budget -= 1;
                counters.nak_units_received += 1;
                let recent = self
                    .repaired_at
                    .get(&u)
                    .is_some_and(|t| now.saturating_duration_since(*t) < grtt);
                let pos = shape.loop_pos(shape.unit_packet(u));
                if recent || !self.pending.insert(pos) {
                    counters.nak_units_coalesced += 1;
                }
            }
        }
        if !self.pending.is_empty() && self.due.is_none() {
            // Aggregate NAKs for one GRTT before repairing.
            self.due = Some(now + grtt);
        }
        if self.repaired_at.len() > 65_536 {
            self.repaired_at
                .retain(|_, t| now.saturating_duration_since(*t) < grtt);
        }
    }
}

impl ChannelManager {
    /// A NAK arrived on the control port: queue repairs, within bounds. Floods from one
    /// address are rate-limited, absurd ranges clipped, and units already queued, or repaired
    /// within the last GRTT, coalesced, so no NAK pattern can stall the loop.
    pub(super) fn handle_nak(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let nak = match Nak::decode(datagram) {
            Ok(n) => n,
            Err(_) => {
                self.counters.naks_malformed += 1;
                return;
            }
        };
        if !self
            .naks
            .admit(now, from.ip(), self.params.nak_rate.max(1.0))
        {
            self.counters.naks_rate_limited += 1;
            return;
        }
        // The NAKer's own tier channel (a title may loop on several), else any of the title's.
        let id = self
            .channels
            .iter()
            .find(|(_, c)| c.tag == nak.archive_tag && c.members.contains(nak.receiver_id))
            .or_else(|| self.channels.iter().find(|(_, c)| c.tag == nak.archive_tag))
            .map(|(id, _)| *id);
        let Some(c) = id.and_then(|id| self.channels.get_mut(&id)) else {
            self.counters.naks_unknown_channel += 1;
            return;
        };
        self.counters.naks_received += 1;
        let shape = *c.carousel.shape();
        // A unicast member's NAK is repaired on its own stream, to it alone.
        let rid = nak.receiver_id;
        let rtt = c
            .members
            .get(rid)
            .map_or(self.params.grtt_initial, |m| m.rtt(&self.params));
        if let Some(s) = c.members.streams.get_mut(&rid) {
            s.repair.add(
                now,
                &nak,
                &shape,
                rtt,
                self.params.max_nak_units,
                &mut self.counters,
            );
            return;
        }
        let grtt = c.members.grtt(&self.params);
        c.repair.add(
            now,
            &nak,
            &shape,
            grtt,
            self.params.max_nak_units,
            &mut self.counters,
        );
    }
}
