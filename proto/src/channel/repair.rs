//! Repairs: NAKs arriving on the control port, the per-source NAK budget that keeps one
//! address from flooding the server, and each channel's repair queue, which sends NAKed
//! packets ahead of the loop after a one-GRTT aggregation window, bounded so that repairs
//! never take more than `repair_share` of the channel and no NAK pattern can stall the loop.
//!
//! A FEC archive's receivers ask for *amounts* ("block `f`: `n` more symbols"). The queue
//! owes each block the largest amount asked in the window and pays it in extra symbols
//! ([`PacketId::Extra`]), taken in turn from the block's extras: each one is new to every
//! receiver short in that block, so one answer serves them all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{ChannelManager, Counters};
use crate::archive::PacketId;
use crate::carousel::LoopShape;
use crate::wire::data::DATA_HEADER_LEN;
use crate::wire::nak::Nak;

/// Most repairs queued per channel (positions, ~40 bytes each): bounds server memory under a
/// NAK storm whatever the archive size; units beyond it come round with the loop.
pub const MAX_REPAIR_QUEUE: usize = 65_536;

/// NAK-rate bucket of one source address.
struct NakBucket {
    tokens: f64,
    at: Instant,
}

/// Source addresses with a bucket above which idle ones are pruned (at most once a second).
const NAK_SOURCES_PRUNE_AT: usize = 4096;
/// Most source addresses with a bucket: past it, new sources are refused until the next
/// prune (a flood from spoofed addresses must not grow the table without bound).
pub const MAX_NAK_SOURCES: usize = 65_536;

/// NAKs accepted per source address (token buckets).
#[derive(Default)]
pub(super) struct NakLimiter {
    buckets: HashMap<IpAddr, NakBucket>,
    /// No prune before this (pruning walks the whole table: doing it on every NAK once
    /// there were 4,096 sources made each NAK cost ~46 µs at 15,000 sources).
    next_prune: Option<Instant>,
    /// Prunes done (tests).
    pub(super) prunes: u64,
}

impl NakLimiter {
    /// Spend one of `ip`'s tokens (`rate` per second, burst of one second's worth); false if
    /// it has none left, or it is new and the table is full.
    fn admit(&mut self, now: Instant, ip: IpAddr, rate: f64) -> bool {
        if self.buckets.len() > NAK_SOURCES_PRUNE_AT && self.next_prune.is_none_or(|t| now >= t) {
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(2));
            self.next_prune = Some(now + Duration::from_secs(1));
            self.prunes += 1;
        }
        if self.buckets.len() >= MAX_NAK_SOURCES && !self.buckets.contains_key(&ip) {
            return false;
        }
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
    /// FEC block → (extra symbols still owed, the amount being answered: the largest asked
    /// since the answer began).
    owed: BTreeMap<u64, (u32, u32)>,
    /// FEC block → its next extra symbol (they are sent in turn, wrapping).
    cursor: HashMap<u64, u64>,
    /// FEC block → when its last answer went out, and how many symbols it had.
    answered: HashMap<u64, (Instant, u32)>,
    /// The block the last extra symbol was of, and the budget for starting on another
    /// (see [`EXTRA_BLOCKS_PER_SEC`]).
    last_extra_block: Option<u64>,
    block_budget: Option<(f64, Instant)>,
    /// Pending position, or FEC block owed symbols, → when a NAK first asked for it (bounded
    /// by the queue and [`MAX_OWED_BLOCKS`]; owed symbols nobody asked for are not here).
    asked_at: HashMap<Asked, Instant>,
    /// How long the repair [`Self::take`] last returned waited since its NAK, if one asked.
    pub(super) last_wait: Option<Duration>,
}

/// What a NAK asked for, for [`RepairQueue::asked_at`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Asked {
    Unit(u64),
    Block(u64),
}

/// FEC blocks per second a channel starts answering with extra symbols (burst: 16). Each
/// new block costs the server reading and coding it (about a millisecond at 1,024 packets),
/// so amounts for many blocks at once — a forged NAK naming thousands — must not become a
/// CPU flood: at most ~0.2 s of coding per second, while a 1 Gbit/s loop passes ~90 blocks
/// a second. Owed blocks past the budget wait, they are not dropped.
pub const EXTRA_BLOCKS_PER_SEC: f64 = 200.0;

/// Most FEC blocks owed symbols at once per channel (bounds memory like
/// [`MAX_REPAIR_QUEUE`]).
pub const MAX_OWED_BLOCKS: usize = 4096;

impl RepairQueue {
    fn ready(&self, now: Instant) -> bool {
        self.tokens >= 1.0
            && self.due.is_some_and(|t| t <= now)
            && !(self.pending.is_empty() && self.owed.is_empty())
    }

    /// Whether an extra symbol of `f` may go now: more of the block being answered always,
    /// a new block within [`EXTRA_BLOCKS_PER_SEC`].
    fn may_start(&mut self, now: Instant, f: u64) -> bool {
        if self.last_extra_block == Some(f) {
            return true;
        }
        let (tokens, at) = self.block_budget.get_or_insert((16.0, now));
        *tokens = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() * EXTRA_BLOCKS_PER_SEC)
            .min(16.0);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        self.last_extra_block = Some(f);
        true
    }

    /// The repair to send now in place of a loop packet, if one is due and within credit:
    /// NAKed units first (in loop order), then the symbols owed.
    pub(super) fn take(&mut self, now: Instant, shape: &LoopShape) -> Option<PacketId> {
        if !self.ready(now) {
            return None;
        }
        if self.pending.is_empty() {
            // Owed symbols only: the block under way first, else the lowest owed.
            let f = match self.last_extra_block.filter(|f| self.owed.contains_key(f)) {
                Some(f) => f,
                None => *self.owed.keys().next().expect("ready checked"),
            };
            if !self.may_start(now, f) {
                return None;
            }
        }
        self.tokens -= 1.0;
        let pkt = match self.pending.pop_first() {
            Some(pos) => {
                self.last_wait = self
                    .asked_at
                    .remove(&Asked::Unit(pos))
                    .map(|t| now.saturating_duration_since(t));
                let pkt = shape.packet_at(pos);
                self.repaired_at
                    .insert(shape.unit_index(pkt).expect("in range"), now);
                pkt
            }
            None => {
                let f = self.last_extra_block.expect("may_start set it");
                self.last_wait = self
                    .asked_at
                    .remove(&Asked::Block(f))
                    .map(|t| now.saturating_duration_since(t));
                let owed = self.owed.get_mut(&f).expect("owed");
                owed.0 -= 1;
                if owed.0 == 0 {
                    let (_, amount) = self.owed.remove(&f).expect("owed");
                    self.answered.insert(f, (now, amount));
                }
                let x = shape.fec_extras();
                let c = self.cursor.entry(f).or_insert(0);
                let e = f * x + *c;
                *c = (*c + 1) % x;
                PacketId::Extra(e)
            }
        };
        if self.pending.is_empty() && self.owed.is_empty() {
            self.due = None;
        }
        Some(pkt)
    }

    /// `pkt` went out in the loop: a queued repair of it is moot, and repair credit grows.
    pub(super) fn looped(&mut self, shape: &LoopShape, pkt: PacketId, repair_share: f64) {
        let pos = shape.loop_pos(pkt);
        if self.pending.remove(&pos) {
            self.asked_at.remove(&Asked::Unit(pos));
        }
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
                } else {
                    self.asked_at.insert(Asked::Unit(pos), now);
                }
            }
        }
        self.add_symbols(now, nak, shape, grtt, counters);
        if !(self.pending.is_empty() && self.owed.is_empty()) && self.due.is_none() {
            // Aggregate NAKs for one GRTT before repairing.
            self.due = Some(now + grtt);
        }
        if self.repaired_at.len() > 65_536 {
            self.repaired_at
                .retain(|_, t| now.saturating_duration_since(*t) < grtt);
        }
    }

    /// Owe FEC block `g` `n` extra symbols now, unasked (a tier's proactive extras,
    /// [`super::Params::tier_fec_extra`]): sent within repair credit like any answer, and
    /// an amount NAK for the block meanwhile is coalesced with it.
    pub(super) fn owe_now(&mut self, now: Instant, shape: &LoopShape, g: u64, n: u32) {
        let n = (n as u64).min(shape.fec_extras()) as u32;
        if n == 0 || g >= shape.fec_blocks() {
            return;
        }
        let full = self.owed.len() >= MAX_OWED_BLOCKS;
        match self.owed.get_mut(&g) {
            Some((left, amount)) if n > *amount => {
                *left += n - *amount;
                *amount = n;
            }
            Some(_) => {}
            None if full => return,
            None => {
                self.owed.insert(g, (n, n));
            }
        }
        if self.due.is_none_or(|t| t > now) {
            self.due = Some(now);
        }
    }

    /// Owe the symbol amounts `nak` asks for: per block the largest asked, at most the
    /// block's extras. An amount no larger than an answer sent within the last GRTT is
    /// stale (asked before that answer arrived) and coalesced.
    fn add_symbols(
        &mut self,
        now: Instant,
        nak: &Nak,
        shape: &LoopShape,
        grtt: Duration,
        counters: &mut Counters,
    ) {
        let x = shape.fec_extras();
        for &(f, n) in &nak.symbols {
            if x == 0 || f >= shape.fec_blocks() {
                counters.nak_symbols_ignored += n as u64;
                continue;
            }
            let n = (n as u64).min(x) as u32;
            counters.nak_symbols_received += n as u64;
            let recent = self
                .answered
                .get(&f)
                .is_some_and(|(t, m)| now.saturating_duration_since(*t) < grtt && *m >= n);
            let full = self.owed.len() >= MAX_OWED_BLOCKS;
            match self.owed.get_mut(&f) {
                // Being answered: raise the answer to the largest amount asked.
                Some((left, amount)) => {
                    counters.nak_symbols_coalesced += n.min(*amount) as u64;
                    if n > *amount {
                        *left += n - *amount;
                        *amount = n;
                    }
                }
                None if recent => counters.nak_symbols_coalesced += n as u64,
                None if full => {
                    counters.nak_symbols_ignored += n as u64;
                }
                None => {
                    self.owed.insert(f, (n, n));
                    self.asked_at.insert(Asked::Block(f), now);
                }
            }
        }
        if self.answered.len() > MAX_OWED_BLOCKS {
            self.answered
                .retain(|_, (t, _)| now.saturating_duration_since(*t) < grtt);
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
        if !self.channels.values().any(|c| c.tag == nak.archive_tag) {
            self.counters.naks_unknown_channel += 1;
            return;
        }
        // The NAKer's own channel (a title may loop on several tiers), and only if the NAK
        // carries its session's MAC: nobody else's NAK costs the server a repair.
        let Some((rid, c)) = self.channels.values_mut().find_map(|c| {
            let rid = c
                .members
                .by_session_tag(nak.session_tag)
                .filter(|(_, m)| c.tag == nak.archive_tag && Nak::mac_ok(datagram, &m.key))?
                .0;
            Some((rid, c))
        }) else {
            self.counters.naks_unauthenticated += 1;
            return;
        };
        self.counters.naks_received += 1;
        let shape = *c.carousel.shape();
        let pps = c.pacer.rate_bps() as f64 / ((c.symbol_size + DATA_HEADER_LEN) * 8) as f64;
        let params = &self.params;
        let m = c.members.get_mut(rid).expect("the NAKer is a member");
        let rtt = m.rtt(params);
        let allowance = m.nak_allowance(now, pps, shape.loop_packets(), params.max_nak_units);
        let asked: u64 = nak.ranges.iter().map(|r| r.1 as u64).sum();
        let max_units = params.max_nak_units.min(allowance);
        if asked > max_units && allowance < params.max_nak_units {
            self.counters.nak_units_over_budget += asked - max_units;
        }
        let before = self.counters.nak_units_received;
        // A unicast member's NAK is repaired on its own stream, to it alone.
        if let Some(s) = c.members.streams.get_mut(&rid) {
            s.repair
                .add(now, &nak, &shape, rtt, max_units, &mut self.counters);
        } else {
            let grtt = c.members.grtt(params);
            c.repair
                .add(now, &nak, &shape, grtt, max_units, &mut self.counters);
        }
        let taken = self.counters.nak_units_received - before;
        if let Some(m) = c.members.get_mut(rid) {
            m.spend_nak_units(taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nak(symbols: Vec<(u64, u32)>) -> Nak {
        Nak {
            archive_tag: [0; 8],
            session_tag: 1,
            ranges: Vec::new(),
            symbols,
        }
    }

    #[test]
    fn amounts_are_answered_once_with_the_largest_asked_in_fresh_extra_symbols() {
        // 3 FEC blocks of 1000 data packets, 100 stored repairs each, of RS(1000, 512):
        // 412 extras per block.
        let shape = LoopShape::with_fec(3000, 40, 1000, 100);
        assert_eq!(shape.fec_extras(), 412);
        let (t0, grtt) = (Instant::now(), Duration::from_millis(10));
        let mut q = RepairQueue {
            tokens: 64.0,
            ..Default::default()
        };
        let mut c = Counters::default();
        q.add(t0, &nak(vec![(1, 5)]), &shape, grtt, 8192, &mut c);
        q.add(t0, &nak(vec![(1, 3)]), &shape, grtt, 8192, &mut c);
        q.add(t0, &nak(vec![(1, 8), (7, 4)]), &shape, grtt, 8192, &mut c);
        assert_eq!(c.nak_symbols_received, 16);
        assert_eq!(
            c.nak_symbols_coalesced, 8,
            "3 and 5 of the 8 were asked already"
        );
        assert_eq!(c.nak_symbols_ignored, 4, "block 7 does not exist");
        // Nothing before the aggregation window ends; then 8 distinct extras of block 1.
        assert_eq!(q.take(t0, &shape), None);
        let t1 = t0 + grtt;
        let sent: Vec<PacketId> = std::iter::from_fn(|| q.take(t1, &shape)).collect();
        assert_eq!(sent, (412..420).map(PacketId::Extra).collect::<Vec<_>>());
        // The same amount again within a GRTT was asked before the answer arrived: stale.
        q.add(t1, &nak(vec![(1, 8)]), &shape, grtt, 8192, &mut c);
        assert_eq!(q.take(t1 + grtt, &shape), None);
        // Asked again later (the answer was lost too): the next extras, never the same ones.
        let t2 = t1 + 2 * grtt;
        q.add(t2, &nak(vec![(1, 2)]), &shape, grtt, 8192, &mut c);
        let sent: Vec<PacketId> = std::iter::from_fn(|| q.take(t2 + grtt, &shape)).collect();
        assert_eq!(sent, vec![PacketId::Extra(420), PacketId::Extra(421)]);
        // An amount beyond the block's extras is capped at them.
        q.add(t2, &nak(vec![(0, 100_000)]), &shape, grtt, 8192, &mut c);
        assert_eq!(q.owed.get(&0), Some(&(412, 412)));
    }

    #[test]
    fn the_nak_rate_table_is_pruned_at_most_once_a_second_and_bounded() {
        // 100,000 sources in half a second (a spoofed flood): one prune, not one per NAK,
        // and the table stops at its bound (new sources refused until the next prune).
        let t0 = Instant::now();
        let mut l = NakLimiter::default();
        let mut admitted = 0;
        for i in 0..100_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let now = t0 + Duration::from_micros(5 * i as u64);
            admitted += l.admit(now, ip, 100.0) as u32;
        }
        assert_eq!(l.prunes, 1);
        assert_eq!(l.buckets.len(), MAX_NAK_SOURCES);
        assert_eq!(admitted as usize, MAX_NAK_SOURCES);
        // Three seconds on, the idle ones are gone and a new source is admitted.
        let later = t0 + Duration::from_secs(3);
        assert!(l.admit(later, IpAddr::from([192, 0, 2, 1]), 100.0));
        assert_eq!(l.prunes, 2);
        assert_eq!(l.buckets.len(), 1);
    }

    #[test]
    fn amounts_for_many_blocks_are_answered_within_a_coding_budget() {
        // A forged NAK stream naming 2,000 blocks, one symbol each: every answer would cost
        // the server a block read and encode. At most EXTRA_BLOCKS_PER_SEC (+ the burst)
        // blocks a second are started; the rest wait, owed.
        let shape = LoopShape::with_fec(2_000_000, 40, 1000, 100);
        let (t0, grtt) = (Instant::now(), Duration::from_millis(1));
        let mut q = RepairQueue::default();
        let mut c = Counters::default();
        for chunk in (0..2000u64).collect::<Vec<_>>().chunks(96) {
            q.add(
                t0,
                &nak(chunk.iter().map(|&f| (f, 1)).collect()),
                &shape,
                grtt,
                8192,
                &mut c,
            );
        }
        let mut blocks = std::collections::HashSet::new();
        // One second of a channel sending 100,000 packets a second, half of them repairs.
        for i in 0..100_000u64 {
            q.tokens = 64.0;
            let now = t0 + grtt + Duration::from_micros(10 * i);
            if let Some(PacketId::Extra(e)) = q.take(now, &shape) {
                blocks.insert(e / shape.fec_extras());
            }
        }
        assert!(blocks.len() >= 200, "{}", blocks.len());
        assert!(
            blocks.len() <= 16 + EXTRA_BLOCKS_PER_SEC as usize + 1,
            "{}",
            blocks.len()
        );
        assert_eq!(q.owed.len(), 2000 - blocks.len(), "the rest still owed");
    }
}
