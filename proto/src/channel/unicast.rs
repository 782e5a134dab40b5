//! Unicast fallback: a member that hears no multicast asks for the loop by unicast. The server
//! first sends a stateless cookie (keyed BLAKE3 over address, receiver, archive and a time
//! epoch) and starts the member's own stream (`unicast_stream`) only once the requester
//! echoes it back, so the server can never be made to stream at a spoofed victim.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::members::Members;
use super::tiers::capped;
use super::unicast_stream::UnicastStream;
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

    /// A cookie of this epoch or the previous one (compared in constant time: a timing
    /// oracle would let a spoofer build a valid cookie byte by byte).
    fn verify(&self, now: Instant, from: SocketAddr, rid: u64, id: &ArchiveId, c: Cookie) -> bool {
        use subtle::ConstantTimeEq;
        let e = self.epoch(now);
        let this: bool = self.cookie(from, rid, id, e).ct_eq(&c).into();
        let last: bool = e > 0 && self.cookie(from, rid, id, e - 1).ct_eq(&c).into();
        this | last
    }
}

impl Members {
    pub(super) fn unicast_count(&self) -> usize {
        self.streams.len()
    }
}

/// A unicast stream grows only while its receiver's last report is at most this old: reports
/// come every lease/3, so a stream whose receiver went quiet stops growing after about one
/// missed report, long before its lease ends.
pub(super) fn report_fresh(lease: Duration) -> Duration {
    lease / 2
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

    /// The channel of the member whose cookie `from` echoed; `None` (answered, and counted)
    /// when the cookie does not verify for that address or there is no such member. Nothing
    /// is sent to an address that has not proven it receives there.
    pub(super) fn proven_member(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        cookie: Cookie,
    ) -> Option<u32> {
        let rid = env.receiver_id;
        if !self.cookies.verify(now, from, rid, &archive_id, cookie) {
            self.counters.bad_cookies += 1;
            self.error(
                from,
                env,
                ErrorCode::BadCookie,
                "cookie does not verify for this address",
            );
            return None;
        }
        let id = self.member_channel(&archive_id, rid);
        if id.is_none() {
            self.unknown_session(from, env, "no such session: join again");
        }
        id
    }

    /// The cookie came back from `from`: start the member's own stream there (within the
    /// channel's limit of streams). It loops from where the group's loop is, at a rate of
    /// its own, up to the title's rate (its top tier's: a unicast member makes no tier moves).
    pub(super) fn unicast_confirm(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        cookie: Cookie,
    ) {
        let rid = env.receiver_id;
        let Some(id) = self.proven_member(now, from, env, archive_id, cookie) else {
            return;
        };
        let max = self.params.max_unicast_per_channel;
        let ceiling = *self.params.tiers().last().expect("at least one tier");
        let (lease, burst) = (self.params.lease, self.params.burst);
        let c = self.channels.get_mut(&id).expect("channel exists");
        let ceiling = capped(ceiling, c.rate_cap);
        let current = c.members.streams.get(&rid).map(|s| s.to);
        let full = c.members.unicast_count() >= max;
        let Some(m) = c.members.get_mut(rid) else {
            self.unknown_session(from, env, "no such session: join again");
            return;
        };
        if current != Some(from) {
            if full && current.is_none() {
                self.error(
                    from,
                    env,
                    ErrorCode::Busy,
                    "unicast stream limit reached on this channel",
                );
                return;
            }
            m.lease_until = now + lease;
            let stream = UnicastStream::new(
                now,
                from,
                *c.carousel.shape(),
                c.carousel.block(),
                ceiling,
                burst,
            );
            c.members.streams.insert(rid, stream);
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::unicast_stream::{MARGIN, START_BPS};
    use super::super::{ChannelManager, Params, TitleInfo, Transmit, TransmitPayload};
    use crate::archive::PacketId;
    use crate::channel::HeadBytes;
    use crate::wire::control::{ArchiveId, Control, Envelope};
    use crate::wire::data::{DataHeader, DataKind, SyncInfo};
    use crate::wire::nak::Nak;

    const GROUP_RATE: u64 = 100_000_000;
    /// How late the lease check may notice an expiry, and then some.
    const LEASE_SLACK_MS: u64 = 200;

    struct Bed {
        m: ChannelManager,
        now: Instant,
        id: ArchiveId,
        tag: [u8; 8],
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    impl Bed {
        fn new() -> Bed {
            let head = crate::sim::sim_head(4000, 1280);
            let (id, title) = (head.archive_id, head.title.clone());
            let info = TitleInfo {
                head: Arc::new(head),
                head_bytes: HeadBytes::Memory(Arc::new(vec![0; 10])),
                archive_len: 0,
            };
            let t0 = Instant::now();
            let mut b = Bed {
                m: ChannelManager::new(Params::for_tests(GROUP_RATE), vec![info], t0),
                now: t0,
                id,
                tag: crate::wire::data::archive_tag(&id),
            };
            for (rid, from) in [(1, "10.0.0.1:5000"), (2, "10.0.0.2:5000")] {
                let r = b.ask(
                    rid,
                    from,
                    Control::Join {
                        title: title.clone(),
                    },
                );
                assert!(matches!(r, Some(Control::JoinOk { .. })), "{r:?}");
            }
            b
        }

        fn ask(&mut self, rid: u64, from: &str, msg: Control) -> Option<Control> {
            let token = self.m.address_token(addr(from).ip(), self.now);
            let key = msg
                .session_archive()
                .map(|a| self.m.session_key(rid, a, addr(from).ip()));
            let env = Envelope::new(rid, 7, msg).with_token(Some(token));
            let bytes = key.map_or_else(|| env.encode(), |k| env.encode_sealed(&k));
            self.m.handle_control(self.now, addr(from), &bytes);
            let mut last = None;
            while let Some((to, bytes)) = self.m.poll_reply() {
                assert_eq!(to, addr(from));
                last = Some(Envelope::decode(&bytes).unwrap().msg);
            }
            last
        }

        /// Receiver 2 asks for unicast at 10.0.0.2:6000 and echoes the cookie.
        fn go_unicast(&mut self) {
            let archive_id = self.id;
            let Some(Control::Cookie { cookie, .. }) =
                self.ask(2, "10.0.0.2:6000", Control::UnicastRequest { archive_id })
            else {
                panic!("no cookie");
            };
            let r = self.ask(
                2,
                "10.0.0.2:6000",
                Control::UnicastConfirm { archive_id, cookie },
            );
            assert!(matches!(r, Some(Control::UnicastOk { .. })), "{r:?}");
        }

        fn nak(&mut self, rid: u64, from: &str, first: u64, len: u32) {
            let nak = Nak {
                archive_tag: self.tag,
                session_tag: 0, // from the key, when sealed
                ranges: vec![(first, len)],
                symbols: Vec::new(),
            };
            let key = self.m.session_key(rid, &self.id, addr(from).ip());
            self.m
                .handle_control(self.now, addr(from), &nak.encode_sealed(&key));
        }

        /// Run the server for `ms` milliseconds; everything it sent.
        fn run(&mut self, ms: u64) -> Vec<Transmit> {
            let mut out = Vec::new();
            let end = self.now + Duration::from_millis(ms);
            while self.now < end {
                self.m.handle_timeout(self.now);
                while let Some(t) = self.m.poll_transmit(self.now) {
                    out.push(t);
                }
                self.now += Duration::from_micros(250);
            }
            out
        }
    }

    fn to(t: &Transmit) -> Vec<SocketAddr> {
        t.dests.to_vec()
    }

    fn header(t: &Transmit) -> DataHeader {
        DataHeader::decode(&t.header).unwrap().0
    }

    fn sync_rate(t: &Transmit) -> Option<u64> {
        match &t.payload {
            TransmitPayload::Sync(b) => Some(SyncInfo::decode(b).unwrap().rate_bps),
            TransmitPayload::Packet(_) => None,
        }
    }

    fn repaired(ts: &[Transmit], dest: SocketAddr) -> Vec<PacketId> {
        ts.iter()
            .filter(|t| header(t).repair && to(t) == [dest])
            .filter_map(|t| match header(t).kind {
                DataKind::Packet(id) => Some(id),
                DataKind::Sync => None,
            })
            .collect()
    }

    /// The unicast member gets a stream of its own: its own packets (never the group's,
    /// never with the group as a destination), its own SYNCs with its own rate, and its NAKs
    /// repaired to it alone; the multicast member's repairs go to the group only.
    #[test]
    fn a_unicast_members_repairs_and_loop_are_its_own() {
        let mut b = Bed::new();
        let group = addr("239.255.77.1:7700");
        let uni = addr("10.0.0.2:6000");
        b.run(200);
        b.go_unicast();
        let ts = b.run(100);
        assert!(ts.iter().all(|t| to(t) == [group] || to(t) == [uni]));
        let (g, u): (Vec<&Transmit>, Vec<&Transmit>) = ts.iter().partition(|t| to(t) == [group]);
        // Paced apart: ~100 Mbit/s on the group, the stream's 20 Mbit/s to the member.
        assert!(
            g.len() > 3 * u.len() && u.len() > 100,
            "{} {}",
            g.len(),
            u.len()
        );
        assert_eq!(g.iter().find_map(|t| sync_rate(t)), Some(GROUP_RATE));
        assert_eq!(u.iter().find_map(|t| sync_rate(t)), Some(START_BPS));

        // The unicast member NAKs units 100..110, the multicast one 300..305.
        b.nak(2, "10.0.0.2:5000", 100, 10);
        b.nak(1, "10.0.0.1:5000", 300, 5);
        let ts = b.run(200);
        let unit = |id: PacketId| {
            crate::carousel::LoopShape::of(&crate::sim::sim_head(4000, 1280))
                .unit_index(id)
                .unwrap()
        };
        let mut to_uni: Vec<u64> = repaired(&ts, uni).into_iter().map(unit).collect();
        let mut to_group: Vec<u64> = repaired(&ts, group).into_iter().map(unit).collect();
        to_uni.sort_unstable();
        to_group.sort_unstable();
        assert_eq!(to_uni, (100..110).collect::<Vec<_>>());
        assert_eq!(to_group, (300..305).collect::<Vec<_>>());
        let c = b.m.counters();
        assert_eq!(c.unicast_repairs_sent, 10);
        assert_eq!(c.repairs_sent, 15);

        // Its capacity report sets its stream's rate (a little under it), not the group's.
        let archive_id = b.id;
        b.ask(
            2,
            "10.0.0.2:5000",
            Control::Keepalive {
                archive_id,
                have: 0,
                total: 0,
                rtt_us: 4000,
                rx_bps: 9_000_000,
                loss_ppm: 0,
                capacity_bps: 10_000_000,
            },
        );
        let ts = b.run(100);
        let rate = |d: SocketAddr| {
            ts.iter()
                .filter(|t| to(t) == [d])
                .filter_map(sync_rate)
                .next_back()
        };
        assert_eq!(rate(uni), Some((10_000_000.0 * MARGIN) as u64));
        assert_eq!(rate(group), Some(GROUP_RATE));
        let st = b.m.stats();
        assert_eq!(st.channels[0].unicast_rates_bps, vec![9_000_000]);

        // A tier change asked for meanwhile (it was in flight) leaves the stream as it is.
        let r = b.ask(
            2,
            "10.0.0.2:5000",
            Control::ChangeTier {
                archive_id,
                tier: 0,
            },
        );
        assert!(matches!(r, Some(Control::JoinOk { .. })), "{r:?}");
        assert_eq!(b.m.stats().channels[0].unicast_rates_bps, vec![9_000_000]);
    }

    /// A keepalive of receiver `rid`, sealed with its session's key (the one its join from
    /// `session_ip` got), sent from `from` with an address token for `from`. The reply.
    fn keepalive_from(b: &mut Bed, rid: u64, session_ip: &str, from: &str) -> Option<Control> {
        let archive_id = b.id;
        let msg = Control::Keepalive {
            archive_id,
            have: 0,
            total: 0,
            rtt_us: 0,
            rx_bps: 0,
            loss_ppm: 0,
            capacity_bps: 0,
        };
        let key =
            b.m.session_key(rid, &archive_id, session_ip.parse().unwrap());
        let token = b.m.address_token(addr(from).ip(), b.now);
        let bytes = Envelope::new(rid, 9, msg)
            .with_token(Some(token))
            .encode_sealed(&key);
        b.m.handle_control(b.now, addr(from), &bytes);
        let mut last = None;
        while let Some((to, bytes)) = b.m.poll_reply() {
            assert_eq!(to, addr(from));
            last = Some(Envelope::decode(&bytes).unwrap().msg);
        }
        last
    }

    /// Advance the clock by `ms` in lease-check steps (nothing is sent: only timers run).
    fn tick(b: &mut Bed, ms: u64) {
        let end = b.now + Duration::from_millis(ms);
        while b.now < end {
            b.now += Duration::from_millis(50);
            b.m.handle_timeout(b.now);
        }
    }

    /// Consent for unicast (RFC 7675's idea): a stream lives on while keepalives MAC'd under
    /// its session's key come from the stream's own IP address, lease after lease. The same
    /// validly MAC'd keepalives from another address keep the *session* alive (the MAC
    /// proves the sender holds it) but are no consent: one lease after the last keepalive
    /// from its own address the stream ends, counted in `streams_consent_expired`, and
    /// nothing more goes to its address.
    #[test]
    fn a_unicast_stream_lives_only_on_keepalives_from_its_own_address() {
        let mut b = Bed::new();
        let uni = addr("10.0.0.2:6000");
        let lease = Params::for_tests(GROUP_RATE).lease;
        let lease_ms = lease.as_millis() as u64;
        b.run(50);
        b.go_unicast();
        assert_eq!(b.m.stats().channels[0].unicast, 1);

        // Four leases of keepalives every lease/3 from the stream's own IP (another port:
        // consent is by address, the receiver's control socket is not its data socket).
        let every = lease_ms / 3;
        for _ in 0..(4 * lease_ms / every) {
            tick(&mut b, every);
            let r = keepalive_from(&mut b, 2, "10.0.0.2", "10.0.0.2:5000");
            assert!(matches!(r, Some(Control::LeaseOk { .. })), "{r:?}");
            let r = keepalive_from(&mut b, 1, "10.0.0.1", "10.0.0.1:5000");
            assert!(matches!(r, Some(Control::LeaseOk { .. })), "{r:?}");
        }
        assert_eq!(b.m.counters().streams_consent_expired, 0);
        assert_eq!(b.m.stats().channels[0].unicast, 1);
        let ts = b.run(50);
        assert!(
            ts.iter().any(|t| to(t) == [uni]),
            "the stream stopped though its receiver consents"
        );

        // Now the keepalives come, with the same session's valid MAC, from another address
        // only. The session's lease is renewed (LeaseOk: the MAC was taken), the stream's
        // consent is not.
        let since_consent = b.now;
        let forged_before = b.m.counters().session_forged;
        while b.now < since_consent + lease + Duration::from_millis(2 * every) {
            tick(&mut b, every);
            let r = keepalive_from(&mut b, 2, "10.0.0.2", "10.0.0.66:5000");
            assert!(matches!(r, Some(Control::LeaseOk { .. })), "{r:?}");
            let r = keepalive_from(&mut b, 1, "10.0.0.1", "10.0.0.1:5000");
            assert!(matches!(r, Some(Control::LeaseOk { .. })), "{r:?}");
            if b.now + Duration::from_millis(LEASE_SLACK_MS) < since_consent + lease {
                // Within the lease the stream still has its consent.
                assert_eq!(b.m.stats().channels[0].unicast, 1, "ended early");
            }
        }
        let c = b.m.counters();
        assert_eq!(c.session_forged, forged_before, "the MAC was valid");
        assert_eq!(c.streams_consent_expired, 1);
        assert_eq!(c.leases_expired, 0, "the session itself lives on");
        let st = b.m.stats();
        assert_eq!(st.channels[0].unicast, 0);
        assert_eq!(st.channels[0].members, 2);
        let ts = b.run(100);
        assert!(
            ts.iter().all(|t| to(t) != [uni]),
            "sent after consent ended"
        );
    }

    /// With every member on a stream of its own the group's loop waits (it would reach
    /// nobody); it goes on when a multicast member joins.
    #[test]
    fn the_group_loop_waits_while_every_member_has_a_stream() {
        let mut b = Bed::new();
        let group = addr("239.255.77.1:7700");
        b.run(150);
        b.go_unicast();
        let archive_id = b.id;
        assert!(matches!(
            b.ask(
                1,
                "10.0.0.1:5000",
                Control::Complete {
                    archive_id,
                    elapsed_ms: 1000,
                    milli_loops: 1000,
                }
            ),
            Some(Control::CompleteOk { .. })
        ));
        let ts = b.run(100);
        assert!(!ts.is_empty() && ts.iter().all(|t| to(t) != [group]));
        let title = b.m.title_names().next().unwrap().to_string();
        b.ask(3, "10.0.0.3:5000", Control::Join { title });
        let ts = b.run(100);
        assert!(ts.iter().filter(|t| to(t) == [group]).count() > 100);
    }
}
