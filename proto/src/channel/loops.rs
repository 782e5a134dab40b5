//! Open channels: the record of one looping channel, the pool of channel slots (group + port)
//! it holds, opening a loop, and the one path that closes a channel — whether it fell idle,
//! its archive was withdrawn, or its scheduled window ended — so counters, events, the slot
//! and the schedule's resume point are kept alike every time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::members::Members;
use super::repair::RepairQueue;
use super::{ChannelManager, Event, TitleInfo};
use crate::carousel::{Carousel, LoopShape};
use crate::pacer::Pacer;
use crate::wire::control::ArchiveId;
use crate::wire::data::archive_tag;

pub(super) struct Channel {
    /// Throughput tier (index into the tier list) this channel loops at.
    pub(super) tier: usize,
    /// A member left for another tier: keep looping (empty) until then, so a failed probe
    /// falls back to a running channel at its loop position instead of a fresh one.
    pub(super) linger_until: Option<Instant>,
    pub(super) title: String,
    pub(super) archive_id: ArchiveId,
    pub(super) tag: [u8; 8],
    slot: usize,
    pub(super) group: SocketAddr,
    pub(super) carousel: Carousel,
    pub(super) pacer: Pacer,
    pub(super) data_start: Instant,
    pub(super) next_sync: Instant,
    pub(super) members: Members,
    /// Where its loop goes: the group (unicast members have streams of their own).
    pub(super) dests: Arc<[SocketAddr]>,
    pub(super) symbol_size: usize,
    pub(super) packets_sent: u64,
    pub(super) repair: RepairQueue,
    /// Opened by a schedule: loops with no members until its window closes.
    pub(super) scheduled: bool,
    /// Rate ceiling from the schedule (bit/s), kept through tier rate adaption.
    pub(super) rate_cap: Option<u64>,
    /// When new members' joins were answered, until the channel's next data packet
    /// ([`super::Sample::JoinToFirstPacket`]; at most [`MAX_AWAITING_FIRST`]).
    pub(super) awaiting_first: Vec<Instant>,
}

/// Joins held for [`Channel::awaiting_first`] at most (more in one instant add nothing).
pub(super) const MAX_AWAITING_FIRST: usize = 1024;

impl Channel {
    /// When the group's loop next has something to send: SYNCs until `data_start`, then loop
    /// packets (with a SYNC in place of one every `sync_interval`), never before the pacer
    /// allows. `None` while every member has a unicast stream of its own: the group's loop
    /// would reach nobody, so it waits where it is.
    pub(super) fn group_due(&self) -> Option<Instant> {
        if !self.scheduled && !self.members.group_wanted() {
            return None;
        }
        let wanted = if self.carousel.shape().loop_packets() == 0 {
            self.next_sync
        } else {
            self.next_sync.min(self.data_start)
        };
        Some(wanted.max(self.pacer.next_send()))
    }

    /// The unicast stream or discovery burst due first, and when (`true`: a burst).
    pub(super) fn stream_due(&self) -> Option<(u64, Instant, bool)> {
        let streams = self.members.streams.iter().map(|(rid, s)| (rid, s, false));
        let bursts = self.members.bursts.iter().map(|(rid, s)| (rid, s, true));
        streams
            .chain(bursts)
            .filter(|(_, s, _)| s.live())
            .map(|(rid, s, burst)| (*rid, s.due(), burst))
            .min_by_key(|(_, due, _)| *due)
    }

    /// When this channel (its group loop or one of its unicast streams) next sends.
    pub(super) fn due(&self) -> Instant {
        match (self.group_due(), self.stream_due()) {
            (Some(g), Some((_, s, _))) => g.min(s),
            (Some(g), None) => g,
            (None, Some((_, s, _))) => s,
            // Not reached (no member means the group is wanted); a far deadline, never a spin.
            (None, None) => self.pacer.next_send().max(self.next_sync),
        }
    }
}

/// Channel slots (one per configured group) and the next channel id.
pub(super) struct Slots {
    slots: Vec<Option<u32>>,
    next_channel: u32,
}

impl Slots {
    pub(super) fn new(n: usize) -> Slots {
        Slots {
            slots: vec![None; n],
            next_channel: 1,
        }
    }
}

/// Why a channel closes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    /// No members left (and not scheduled, not lingering).
    Idle,
    /// Its archive can no longer be read.
    Withdrawn,
    /// Its title's scheduled window ended.
    WindowEnd,
}

impl ChannelManager {
    /// Open a channel looping `info` at `tier`, from block `start_block`. `None` when every
    /// slot is taken.
    pub(super) fn open_channel(
        &mut self,
        now: Instant,
        info: &TitleInfo,
        tier: usize,
        start_block: u64,
    ) -> Option<u32> {
        let s = &mut self.slots;
        let slot = s.slots.iter().position(|s| s.is_none())?;
        let id = s.next_channel;
        s.next_channel = s.next_channel.wrapping_add(1).max(1);
        s.slots[slot] = Some(id);
        let group = self.params.groups[slot];
        let rate = self.params.tiers()[tier];
        let c = Channel {
            tier,
            linger_until: None,
            title: info.head.title.clone(),
            archive_id: info.head.archive_id,
            tag: archive_tag(&info.head.archive_id),
            slot,
            group,
            carousel: Carousel::starting_at(LoopShape::of(&info.head), start_block),
            pacer: Pacer::new(rate, self.params.burst, now),
            data_start: now + self.params.sync_lead,
            next_sync: now,
            members: Members::default(),
            dests: Arc::from(vec![group]),
            symbol_size: info.head.symbol_size as usize,
            packets_sent: 0,
            repair: RepairQueue::default(),
            scheduled: false,
            rate_cap: None,
            awaiting_first: Vec::new(),
        };
        self.channels.insert(id, c);
        self.counters.channels_opened += 1;
        self.events.push_back(Event::ChannelOpened {
            channel: id,
            title: info.head.title.clone(),
            group,
        });
        Some(id)
    }

    /// Close channel `id` (it must be open): free its slot, count it, log it, and for a
    /// scheduled loop at its window's end remember where the loop stopped. Returns the members
    /// it still had (they hear nothing more).
    pub(super) fn close_channel(&mut self, id: u32, why: Close) -> usize {
        let c = self.channels.remove(&id).expect("closing an open channel");
        self.slots.slots[c.slot] = None;
        self.counters.channels_closed += 1;
        *self
            .closed_sent
            .entry((c.title.clone(), c.tier))
            .or_default() += c.packets_sent * c.symbol_size as u64;
        if why == Close::Idle && !c.scheduled {
            self.stopped_at
                .insert((c.archive_id, c.tier), c.carousel.block());
        }
        if why == Close::WindowEnd {
            if c.scheduled {
                self.windows.stopped_at(c.archive_id, c.carousel.block());
            }
            self.counters.scheduled_closed += 1;
        }
        self.events.push_back(Event::ChannelClosed {
            channel: id,
            title: c.title,
            loops: c.carousel.loops(),
            packets: c.packets_sent,
        });
        c.members.len()
    }

    /// Close every channel that is not scheduled, has no members and is not lingering.
    pub(super) fn close_idle(&mut self, now: Instant) {
        let idle: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                !c.scheduled && c.members.is_empty() && c.linger_until.is_none_or(|t| t <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close_channel(id, Close::Idle);
        }
    }
}
