//! Scheduled windows (DESIGN.md §2, "start time and overnight pre-load"): a schedule opens a
//! title's loop at its window's start — with no receivers needed, under a rate cap — and stops
//! it at the window's end, remembering where it stopped so the next window carries on from
//! there; outside its window a title may refuse joins. The calendar itself is
//! [`crate::schedule`]; this is what a window does to the channels.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::loops::Close;
use super::tiers::capped;
use super::ChannelManager;
use crate::wire::control::ArchiveId;

#[derive(Default)]
pub(super) struct Windows {
    /// Scheduled titles outside their window: joins are refused (`ErrorCode::Busy`).
    closed: HashSet<String>,
    /// Where a scheduled loop stopped (block), so the next window carries on from there and
    /// receivers that held the first part get the rest first.
    resume_block: HashMap<ArchiveId, u64>,
    /// Titles in a window with a rate cap: one loop, on the start tier, for every receiver.
    /// Tiers would run the title faster than the window allows (a receiver probing up
    /// opens an uncapped channel), so joins are told of that one tier only.
    capped: HashSet<String>,
}

impl Windows {
    /// True if `title` is outside its window and refuses joins.
    pub(super) fn refuses(&self, title: &str) -> bool {
        self.closed.contains(title)
    }

    /// True if `title` is in a window with a rate cap (one tier only).
    pub(super) fn capped(&self, title: &str) -> bool {
        self.capped.contains(title)
    }

    /// A scheduled loop of `archive_id` stopped before `block`.
    pub(super) fn stopped_at(&mut self, archive_id: ArchiveId, block: u64) {
        self.resume_block.insert(archive_id, block);
    }
}

impl ChannelManager {
    /// A schedule's window opened: loop `title` now (start tier), with no receivers needed,
    /// at most at `rate_cap` bit/s; an already running loop of it is kept and re-capped.
    /// `None` when the title is unknown or no channel slot is free.
    pub fn open_scheduled(
        &mut self,
        now: Instant,
        title: &str,
        rate_cap: Option<u64>,
    ) -> Option<u32> {
        let info = self.catalog.get(title).cloned()?;
        self.windows.closed.remove(title);
        let tier = self.params.start_tier.min(self.params.tiers().len() - 1);
        let id = match self.tier_channel(&info.head.archive_id, tier) {
            Some(id) => id,
            None => {
                let start = self
                    .windows
                    .resume_block
                    .get(&info.head.archive_id)
                    .copied()
                    .unwrap_or(0);
                self.open_channel(now, &info, tier, start)?
            }
        };
        if rate_cap.is_some() {
            self.windows.capped.insert(title.to_string());
        } else {
            self.windows.capped.remove(title);
        }
        let c = self.channels.get_mut(&id).expect("just found or opened");
        c.scheduled = true;
        c.rate_cap = rate_cap;
        let rate = capped(c.pacer.rate_bps(), rate_cap);
        c.pacer.set_rate(rate);
        self.counters.scheduled_opened += 1;
        Some(id)
    }

    /// A schedule's window closed: stop every loop of `title` now, whatever members remain
    /// (they hear nothing more; their state files keep what they have). `refuse`: turn joins
    /// away until the next window. Returns the members dropped.
    pub fn close_scheduled(&mut self, title: &str, refuse: bool) -> usize {
        if refuse {
            self.windows.closed.insert(title.to_string());
        }
        self.windows.capped.remove(title);
        let ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| c.title == title)
            .map(|(id, _)| *id)
            .collect();
        let mut dropped = 0;
        for id in ids {
            dropped += self.close_channel(id, Close::WindowEnd);
        }
        self.counters.scheduled_members_dropped += dropped as u64;
        dropped
    }

    /// Mark `title` as refusing joins (outside its scheduled window) or not.
    pub fn set_window_closed(&mut self, title: &str, closed: bool) {
        if closed {
            self.windows.closed.insert(title.to_string());
        } else {
            self.windows.closed.remove(title);
        }
    }
}
