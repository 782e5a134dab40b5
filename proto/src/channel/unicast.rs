//! Unicast fallback: a member that hears no multicast asks for the loop by unicast. The server
//! first sends a stateless cookie (keyed BLAKE3 over address, receiver, archive and a time
//! epoch) and adds the address as a destination of the same loop only once the requester
//! echoes it back, so the server can never be made to stream at a spoofed victim.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::loops::Channel;
use super::members::Members;
use super::{ChannelManager, Event, Params};
use crate::wire::control::{ArchiveId, Control, Cookie, Envelope, ErrorCode};

/// Cookie secret and epoch clock.
pub(super) struct Cookies {
    secret: [u8; 32],
    epoch: Duration,
    origin: Instant,
}

impl Cookies {
    pub(super) fn new(p: &Params, now: Instant) -> Cookies {
        Cookies {
            secret: p.cookie_secret,
            epoch: p.cookie_epoch,
            origin: now,
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let e = self.epoch.as_millis().max(1) as u64;
        now.saturating_duration_since(self.origin).as_millis() as u64 / e
    }

    fn cookie(&self, from: SocketAddr, rid: u64, archive_id: &ArchiveId, epoch: u64) -> Cookie {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(b"mcast unicast cookie v1");
        h.update(from.to_string().as_bytes());
        h.update(&rid.to_le_bytes());
        h.update(archive_id);
        h.update(&epoch.to_le_bytes());
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    /// A cookie of this epoch or the previous one.
    fn verify(&self, now: Instant, from: SocketAddr, rid: u64, id: &ArchiveId, c: Cookie) -> bool {
        let e = self.epoch(now);
        c == self.cookie(from, rid, id, e) || (e > 0 && c == self.cookie(from, rid, id, e - 1))
    }
}

impl Members {
    pub(super) fn unicast_count(&self) -> usize {
        self.iter().filter(|m| m.unicast.is_some()).count()
    }
}

impl Channel {
    /// Destinations: the group, then each member's unicast address.
    pub(super) fn rebuild_dests(&mut self) {
        let mut d: Vec<SocketAddr> = vec![SocketAddr::V4(self.group)];
        d.extend(self.members.iter().filter_map(|m| m.unicast));
        self.dests = d.into();
    }
}

impl ChannelManager {
    /// A member asks for unicast: send it a cookie for its address.
    pub(super) fn unicast_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
    ) {
        let rid = env.receiver_id;
        let known = self.member_channel(&archive_id, rid).is_some();
        if !known {
            self.unknown_session(from, env, "join before asking for unicast");
            return;
        }
        let cookie = self
            .cookies
            .cookie(from, rid, &archive_id, self.cookies.epoch(now));
        self.counters.cookies_sent += 1;
        self.reply(from, env, Control::Cookie { archive_id, cookie });
    }

    /// The cookie came back from `from`: stream the loop there too (within the channel's limit).
    pub(super) fn unicast_confirm(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        cookie: Cookie,
    ) {
        let rid = env.receiver_id;
        if !self.cookies.verify(now, from, rid, &archive_id, cookie) {
            self.counters.bad_cookies += 1;
            self.error(
                from,
                env,
                ErrorCode::BadCookie,
                "cookie does not verify for this address",
            );
            return;
        }
        let max = self.params.max_unicast_per_channel;
        let Some(id) = self.member_channel(&archive_id, rid) else {
            self.unknown_session(from, env, "no such session: join again");
            return;
        };
        let c = self.channels.get_mut(&id).expect("channel exists");
        let full = c.members.unicast_count() >= max;
        let Some(m) = c.members.get_mut(rid) else {
            self.unknown_session(from, env, "no such session: join again");
            return;
        };
        if m.unicast != Some(from) {
            if full {
                self.error(
                    from,
                    env,
                    ErrorCode::Busy,
                    "unicast stream limit reached on this channel",
                );
                return;
            }
            m.unicast = Some(from);
            m.lease_until = now + self.params.lease;
            c.rebuild_dests();
            self.counters.unicast_started += 1;
            self.events.push_back(Event::UnicastStarted {
                channel: id,
                receiver: rid,
                to: from,
            });
        }
        self.reply(from, env, Control::UnicastOk { archive_id });
    }
}
