//! Members and their leases: joining a title (the start tier, the receiver's current tier,
//! or another tier), keepalives that renew a lease and carry the member's reports, completion,
//! and lease expiry. A receiver is a member of one channel of a title at a time.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::unicast_stream::UnicastStream;
use super::{
    ChannelManager, Event, Params, Sample, MAX_REPORTED_ELAPSED, MAX_REPORTED_MILLI_LOOPS,
};
use crate::wire::control::{ArchiveId, Control, Envelope, ErrorCode, SessionKey};
use crate::wire::nak::session_tag;

pub(super) struct Member {
    pub(super) lease_until: Instant,
    /// The session's key (sent in its JoinOk): its messages and NAKs carry a MAC under it.
    pub(super) key: SessionKey,
    /// The (token-proven) address it joined from.
    pub(super) ip: IpAddr,
    /// NAK units it may still ask for (a bucket refilled at its channel's packet rate: no
    /// member can ask for more repairs than the channel can send), and when last refilled.
    nak_units: f64,
    nak_at: Instant,
    /// Last control RTT the receiver reported (0 = none yet).
    rtt_us: u32,
    /// Last throughput (bit/s) and loss (ppm) the receiver reported (0 = none yet).
    pub(super) rx_bps: u64,
    pub(super) loss_ppm: u32,
    /// What the receiver's path carries, when it found the limit (0 = none found): tier
    /// and unicast rates follow this.
    pub(super) capacity_bps: u64,
    /// When this member's last discovery burst was granted.
    pub(super) burst_at: Option<Instant>,
}

impl Member {
    /// NAK units this member may ask for now, its channel sending `pps` packets a second: a
    /// whole loop of holes at once (`loop_units`, or one NAK's `max_units` if more), refilled
    /// at the channel's packet rate — no member asks for more than the channel can send.
    pub(super) fn nak_allowance(
        &mut self,
        now: Instant,
        pps: f64,
        loop_units: u64,
        max_units: u64,
    ) -> u64 {
        let cap = pps.max(loop_units.max(max_units) as f64);
        let dt = now.saturating_duration_since(self.nak_at).as_secs_f64();
        self.nak_units = (self.nak_units + dt * pps).min(cap);
        self.nak_at = now;
        self.nak_units as u64
    }

    pub(super) fn spend_nak_units(&mut self, n: u64) {
        self.nak_units = (self.nak_units - n as f64).max(0.0);
    }

    /// This member's RTT within bounds (`grtt_initial` before it reported one).
    pub(super) fn rtt(&self, p: &Params) -> Duration {
        rtt_within(self.rtt_us, p)
    }
}

fn rtt_within(rtt_us: u32, p: &Params) -> Duration {
    if rtt_us == 0 {
        p.grtt_initial
    } else {
        Duration::from_micros(rtt_us as u64).clamp(p.grtt_min, p.grtt_max)
    }
}

/// The members of one channel, by receiver id, and the unicast streams of those that
/// receive by unicast (kept here so a member that goes takes its stream with it).
#[derive(Default)]
pub(super) struct Members {
    all: HashMap<u64, Member>,
    /// Receiver id by session tag ([`crate::wire::nak::session_tag`] of the member's key):
    /// NAKs name their session by tag, never by receiver id.
    by_tag: HashMap<u64, u64>,
    /// Unicast streams by receiver id (ordered: a stable order to serve them in).
    pub(super) streams: BTreeMap<u64, UnicastStream>,
    /// Discovery bursts running, by receiver id (`burst`): a member with one still
    /// receives the group.
    pub(super) bursts: BTreeMap<u64, UnicastStream>,
}

impl Members {
    pub(super) fn len(&self) -> usize {
        self.all.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub(super) fn contains(&self, rid: u64) -> bool {
        self.all.contains_key(&rid)
    }

    pub(super) fn get(&self, rid: u64) -> Option<&Member> {
        self.all.get(&rid)
    }

    pub(super) fn get_mut(&mut self, rid: u64) -> Option<&mut Member> {
        self.all.get_mut(&rid)
    }

    /// The member whose session NAKs carry `tag`, and its receiver id.
    pub(super) fn by_session_tag(&self, tag: u64) -> Option<(u64, &Member)> {
        let rid = *self.by_tag.get(&tag)?;
        self.all.get(&rid).map(|m| (rid, m))
    }

    /// Add or replace a member; a replaced member's unicast stream ends (a re-join: the
    /// receiver asks again if it still needs one).
    fn insert(&mut self, rid: u64, m: Member) {
        self.remove(rid);
        self.by_tag.insert(session_tag(&m.key), rid);
        self.all.insert(rid, m);
    }

    pub(super) fn remove(&mut self, rid: u64) -> Option<Member> {
        self.streams.remove(&rid);
        self.bursts.remove(&rid);
        let m = self.all.remove(&rid)?;
        self.by_tag.remove(&session_tag(&m.key));
        Some(m)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.all.values()
    }

    /// Members that receive the group (not by a unicast stream of their own): the group's
    /// rate and GRTT follow only them.
    pub(super) fn multicast(&self) -> impl Iterator<Item = &Member> {
        self.all
            .iter()
            .filter(|(rid, _)| !self.streams.contains_key(rid))
            .map(|(_, m)| m)
    }

    /// Whether the group's loop has anyone to serve: a member that is not on a stream of its
    /// own, or no member at all (a lingering or scheduled channel loops empty).
    pub(super) fn group_wanted(&self) -> bool {
        self.all.len() > self.streams.len() || self.all.is_empty()
    }

    /// Group RTT: the largest RTT a multicast member reported, within bounds (`grtt_initial`
    /// before any).
    pub(super) fn grtt(&self, p: &Params) -> Duration {
        rtt_within(self.multicast().map(|m| m.rtt_us).max().unwrap_or(0), p)
    }

    /// Mean reported (throughput, loss) over members that reported.
    pub(super) fn mean_report(&self) -> (u64, u32) {
        let r: Vec<&Member> = self.iter().filter(|m| m.rx_bps > 0).collect();
        if r.is_empty() {
            return (0, 0);
        }
        let n = r.len() as u64;
        (
            r.iter().map(|m| m.rx_bps).sum::<u64>() / n,
            (r.iter().map(|m| m.loss_ppm as u64).sum::<u64>() / n) as u32,
        )
    }

    /// Drop members whose lease ended by `now`; their ids.
    fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        self.all.retain(|rid, m| {
            let keep = m.lease_until > now;
            if !keep {
                expired.push(*rid);
            }
            keep
        });
        for rid in &expired {
            self.streams.remove(rid);
            self.bursts.remove(rid);
        }
        if !expired.is_empty() {
            let all = &self.all;
            self.by_tag.retain(|_, rid| all.contains_key(rid));
        }
        expired
    }
}

/// What a message that speaks for a session proved.
pub(super) enum SessionCheck {
    /// No session to speak for (a join, a forgotten session) or a join retried from the
    /// session's own address: handled, its sender proved nothing more.
    Open,
    /// A valid MAC under the session's key: the sender holds the session.
    Sealed,
    /// Claims a session it cannot prove: dropped unanswered (counted).
    Forged,
}

impl ChannelManager {
    /// The channel of `archive_id` that receiver `rid` is a member of.
    pub(super) fn member_channel(&self, archive_id: &ArchiveId, rid: u64) -> Option<u32> {
        self.channels
            .iter()
            .find(|(_, c)| &c.archive_id == archive_id && c.members.contains(rid))
            .map(|(id, _)| *id)
    }

    /// Receiver `rid`'s session on `archive_id`, if it is a member.
    pub(super) fn member(&self, archive_id: &ArchiveId, rid: u64) -> Option<&Member> {
        let id = self.member_channel(archive_id, rid)?;
        self.channels[&id].members.get(rid)
    }

    /// The key of receiver `rid`'s session on `archive_id` from `ip`: derived, not drawn,
    /// so a join retried (its JoinOk lost) or a tier change gets the same key, and nothing
    /// is kept for a session before it exists. Dies with the server's secret.
    pub fn session_key(&self, rid: u64, archive_id: &ArchiveId, ip: IpAddr) -> SessionKey {
        let mut m = Vec::with_capacity(32 + 8 + 16 + 16);
        m.extend_from_slice(&self.params.cookie_secret);
        m.extend_from_slice(&rid.to_le_bytes());
        m.extend_from_slice(archive_id);
        m.extend_from_slice(&crate::address_token::ip_bytes(ip));
        blake3::derive_key("mcast session key v1", &m)
    }

    /// Whether a message that speaks for a session may: no session yet (a join, or a server
    /// that forgot it: answered as before), a valid MAC under the session's key, or a join
    /// retried from the address the session joined from. Anything else is forged (counted,
    /// dropped unanswered): knowing a receiver's id is not enough to speak for it.
    pub(super) fn session_check(
        &mut self,
        from: SocketAddr,
        env: &Envelope,
        datagram: &[u8],
    ) -> SessionCheck {
        let (archive_id, join) = match &env.msg {
            Control::Join { title } | Control::JoinAt { title, .. } => {
                match self.catalog.get(title) {
                    Some(i) => (i.head.archive_id, true),
                    None => return SessionCheck::Open,
                }
            }
            m => match m.session_archive() {
                Some(a) => (*a, false),
                None => return SessionCheck::Open,
            },
        };
        let Some(m) = self.member(&archive_id, env.receiver_id) else {
            return SessionCheck::Open;
        };
        if Envelope::mac_ok(datagram, &m.key) {
            return SessionCheck::Sealed;
        }
        if join && m.ip == from.ip() {
            return SessionCheck::Open;
        }
        self.counters.session_forged += 1;
        SessionCheck::Forged
    }

    /// Sessions held from `ip`, over every channel.
    fn sessions_from(&self, ip: IpAddr) -> usize {
        self.channels
            .values()
            .map(|c| c.members.iter().filter(|m| m.ip == ip).count())
            .sum()
    }

    /// Join `title` (`tier: None`: the receiver's current tier, or the start tier) or move to
    /// `tier`. A receiver is a member of one channel of a title at a time.
    pub(super) fn join(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        title: &str,
        tier: Option<usize>,
        start_block: Option<u64>,
    ) {
        let Some(info) = self.catalog.get(title).cloned() else {
            self.counters.not_here += 1;
            self.events.push_back(Event::NotHere {
                title: title.to_string(),
                from,
            });
            self.reply(
                from,
                env,
                Control::NotHere {
                    title: title.to_string(),
                    redirect: None,
                },
            );
            return;
        };
        let archive_id = info.head.archive_id;
        let tiers = self.params.tiers();
        let rid = env.receiver_id;
        let current = self.member_channel(&archive_id, rid);
        if current.is_none() && self.windows.refuses(title) {
            self.counters.refused_outside_window += 1;
            self.error(
                from,
                env,
                ErrorCode::Busy,
                "title loops only in its scheduled window; retry in the next one",
            );
            return;
        }
        if current.is_none()
            && self.sessions_from(from.ip()) >= self.params.max_sessions_per_address
        {
            self.counters.refused_sessions_per_address += 1;
            self.error(
                from,
                env,
                ErrorCode::Busy,
                "too many sessions from this address ([server] max_sessions_per_address)",
            );
            return;
        }
        if self.draining && current.is_none() {
            self.counters.refused_draining += 1;
            self.error(
                from,
                env,
                ErrorCode::Draining,
                "server is draining: ask a traffic director for another server",
            );
            return;
        }
        // A unicast member's rate is its own stream's: a tier change would only end that
        // stream, so it stays where it is (and keeps the stream).
        let streaming =
            current.is_some_and(|id| self.channels[&id].members.streams.contains_key(&rid));
        let change_tier = tier.is_some();
        // A window's rate cap holds for the whole title: one tier, the scheduled loop's.
        let capped = self.windows.capped(title);
        let tier = if capped {
            Some(self.params.start_tier.min(tiers.len() - 1))
        } else {
            tier
        };
        let tier = match (tier, current) {
            (Some(t), _) if t >= tiers.len() => {
                self.error(from, env, ErrorCode::BadRequest, "no such tier");
                return;
            }
            (Some(_), Some(id)) if streaming => self.channels[&id].tier,
            (Some(t), _) => t,
            (None, Some(id)) => self.channels[&id].tier,
            (None, None) => self.params.start_tier.min(tiers.len() - 1),
        };
        let id = match self.tier_channel(&archive_id, tier) {
            Some(id) => id,
            None => match self.open_channel(
                now,
                &info,
                tier,
                // A receiver moving tiers carries on where its channel is (it holds what
                // came before: a resumed receiver's start block, then the loop since), or
                // where its discovery burst ended, which ran ahead of its channel; a new
                // receiver starts where asked, else where the tier's loop last stopped.
                current
                    .map(|old| {
                        let c = &self.channels[&old];
                        c.members
                            .bursts
                            .get(&rid)
                            .map_or(c.carousel.block(), |b| b.block())
                    })
                    .or(start_block)
                    .or_else(|| self.stopped_at.get(&(archive_id, tier)).copied())
                    .unwrap_or(0),
            ) {
                Some(id) => id,
                None => {
                    self.error(
                        from,
                        env,
                        ErrorCode::Busy,
                        "all channel slots are in use; retry later",
                    );
                    return;
                }
            },
        };
        let lease = self.params.lease;
        let key = self.session_key(rid, &archive_id, from.ip());
        let c = self.channels.get_mut(&id).expect("channel exists");
        match c.members.get_mut(rid) {
            Some(m) if change_tier && streaming => m.lease_until = now + lease,
            _ => {
                c.members.insert(
                    rid,
                    Member {
                        lease_until: now + lease,
                        key,
                        ip: from.ip(),
                        nak_units: f64::INFINITY, // full: capped at its first NAK
                        nak_at: now,
                        rtt_us: 0,
                        rx_bps: 0,
                        loss_ppm: 0,
                        capacity_bps: 0,
                        burst_at: None,
                    },
                );
                if current.is_none() && c.awaiting_first.len() < super::loops::MAX_AWAITING_FIRST {
                    c.awaiting_first.push(now);
                }
            }
        }
        let (group, rate) = (c.group, c.pacer.rate_bps());
        if let Some(old) = current.filter(|old| *old != id) {
            self.leave_for_tier(now, old, rid, tier);
        }
        // A lingering channel that gets a member back stops lingering.
        if let Some(c) = self.channels.get_mut(&id) {
            c.linger_until = None;
        }
        if current.is_some_and(|old| old != id) {
            self.counters.tier_changes += 1;
        } else if current.is_none() {
            self.counters.joins += 1;
        }
        self.events.push_back(Event::Joined {
            channel: id,
            receiver: env.receiver_id,
            from,
        });
        self.reply(
            from,
            env,
            Control::JoinOk {
                archive_id,
                group,
                head_len: info.head_bytes.len() as u32,
                loop_packets: info.head.loop_packets(),
                rate_bps: rate,
                lease_ms: lease.as_millis() as u32,
                tier: if capped { 0 } else { tier as u8 },
                tiers_bps: if capped { vec![rate] } else { tiers },
                session_key: key,
                source: self.params.ssm_source.filter(|_| {
                    self.params.ssm_all_groups || crate::wire::is_ssm_group(group.ip())
                }),
                delegation: self.delegation_for(&info.head.server_key),
            },
        );
    }

    /// A keepalive renews the member's lease and records its reports: control RTT, and
    /// (throughput, loss) as `report`.
    pub(super) fn keepalive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        rtt_us: u32,
        (rx_bps, loss_ppm, capacity_bps): (u64, u32, u64),
    ) {
        let rid = env.receiver_id;
        let lease = self.params.lease;
        let id = self.member_channel(&archive_id, rid);
        let mut channel = id.and_then(|id| self.channels.get_mut(&id));
        // A unicast member's own stream follows its report.
        if let Some(s) = channel
            .as_deref_mut()
            .and_then(|c| c.members.streams.get_mut(&rid))
        {
            s.on_keepalive_from(now, from.ip());
            s.on_report(now, super::unicast::report_fresh(lease), capacity_bps);
        }
        match channel.and_then(|c| c.members.get_mut(rid)) {
            Some(m) => {
                m.lease_until = now + lease;
                if rtt_us > 0 {
                    m.rtt_us = rtt_us;
                }
                if rx_bps > 0 {
                    m.rx_bps = rx_bps;
                    m.loss_ppm = loss_ppm;
                }
                let new_limit = capacity_bps > 0 && capacity_bps != m.capacity_bps;
                m.capacity_bps = capacity_bps;
                if let (true, Some(id)) = (new_limit, id) {
                    self.follow_capacity(id);
                }
                self.reply(
                    from,
                    env,
                    Control::LeaseOk {
                        archive_id,
                        lease_ms: lease.as_millis() as u32,
                    },
                );
            }
            None => {
                self.unknown_session(from, env, "no such session: join again");
            }
        }
    }

    /// The receiver has the whole file: it leaves its channel (closed if it was the last).
    pub(super) fn complete(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        (elapsed_ms, milli_loops): (u32, u32),
    ) {
        let rid = env.receiver_id;
        if let Some(id) = self.member_channel(&archive_id, rid) {
            let c = self.channels.get_mut(&id).expect("channel exists");
            // Only a member (its MAC checked in `session_check`) is counted and sampled, once.
            if c.members.remove(rid).is_some() {
                self.counters.completions += 1;
                self.samples.push(Sample::Completion {
                    elapsed: Duration::from_millis(elapsed_ms as u64).min(MAX_REPORTED_ELAPSED),
                    milli_loops: milli_loops.min(MAX_REPORTED_MILLI_LOOPS),
                });
                self.events.push_back(Event::Completed {
                    channel: id,
                    receiver: rid,
                });
            }
        }
        // Idempotent: a retried Complete is acknowledged again.
        self.reply(from, env, Control::CompleteOk { archive_id });
        self.close_idle(now);
    }

    /// Drop members whose lease ran out (the caller then closes channels left idle).
    pub(super) fn expire_leases(&mut self, now: Instant) {
        for (id, c) in self.channels.iter_mut() {
            let expired = c.members.expire(now);
            for rid in expired {
                self.counters.leases_expired += 1;
                self.events.push_back(Event::LeaseExpired {
                    channel: *id,
                    receiver: rid,
                });
            }
        }
    }
}
