//! The channel manager's NAK handling, driven directly (sans-I/O, simulated clock): repairs go
//! out ahead of the loop, and hostile NAKs — absurd ranges, units that do not exist, floods from
//! one address, garbage — are bounded and counted and cannot stall the loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast::archive::PacketId;
use mcast::carousel::LoopShape;
use mcast::channel::{ChannelManager, Params, Sample, TitleInfo, TIER_LINGER};
use mcast::wire::control::{Control, Envelope};
use mcast::wire::data::{archive_tag, DataHeader, DataKind};
use mcast::wire::nak::Nak;

const RATE: u64 = 100_000_000;

/// `env` encoded with the address token the manager would give `from` by Retry (as
/// receivers send every request once their address is proven); a session's own messages
/// are sealed with its key, as its receiver seals them.
fn proven(m: &ChannelManager, now: Instant, from: SocketAddr, env: Envelope) -> Vec<u8> {
    let key = env
        .msg
        .session_archive()
        .map(|a| m.session_key(env.receiver_id, a, from.ip()));
    let env = env.with_token(Some(m.address_token(from.ip(), now)));
    match key {
        Some(k) => env.encode_sealed(&k),
        None => env.encode(),
    }
}

/// `nak` sealed with the key of receiver `rid`'s session on [`setup`]'s title from `from`.
fn sealed(m: &ChannelManager, nak: &Nak, rid: u64, from: &str) -> Vec<u8> {
    let id = mcast::sim::sim_head(4000, 1280).archive_id;
    let from: SocketAddr = from.parse().unwrap();
    nak.encode_sealed(&m.session_key(rid, &id, from.ip()))
}

fn setup() -> (ChannelManager, Instant, LoopShape, [u8; 8]) {
    let head = mcast::sim::sim_head(4000, 1280);
    let shape = LoopShape::of(&head);
    let tag = archive_tag(&head.archive_id);
    let t0 = Instant::now();
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: mcast::channel::HeadBytes::Memory(Arc::new(Vec::new())),
        archive_len: 0,
    };
    let mut m = ChannelManager::new(Params::for_tests(RATE), vec![info], t0);
    let from: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let join = proven(
        &m,
        t0,
        from,
        Envelope::new(
            1,
            1,
            Control::Join {
                title: "sim".into(),
            },
        ),
    );
    m.handle_control(t0, from, &join);
    assert_eq!(m.open_channels(), 1);
    (m, t0, shape, tag)
}

/// Everything sent in `[from, to)`, stepping the clock by 100 µs: (packet, repair?) pairs.
fn run(
    m: &mut ChannelManager,
    from: Instant,
    to: Instant,
    mut each_ms: impl FnMut(&mut ChannelManager, Instant),
) -> Vec<(PacketId, bool)> {
    let mut out = Vec::new();
    let mut now = from;
    let mut next_ms = from;
    while now < to {
        if now >= next_ms {
            each_ms(m, now);
            next_ms += Duration::from_millis(1);
        }
        m.handle_timeout(now);
        while let Some(t) = m.poll_transmit(now) {
            let (h, _) = DataHeader::decode(&t.header).unwrap();
            if let DataKind::Packet(id) = h.kind {
                out.push((id, h.repair));
            }
        }
        while m.poll_reply().is_some() {}
        now += Duration::from_micros(100);
    }
    out
}

#[test]
fn a_naked_packet_is_repaired_ahead_of_the_loop() {
    let (mut m, t0, shape, tag) = setup();
    // Let the loop run 50 ms, then NAK a unit far ahead in the loop.
    let start = run(&mut m, t0, t0 + Duration::from_millis(150), |_, _| {});
    assert!(!start.is_empty());
    let target = PacketId::Data(3000);
    let unit = shape.unit_index(target).unwrap();
    let nak = Nak {
        archive_tag: tag,
        session_tag: 0,
        ranges: vec![(unit, 1)],
        symbols: Vec::new(),
    };
    let nak = sealed(&m, &nak, 1, "10.0.0.1:5000");
    let t1 = t0 + Duration::from_millis(150);
    m.handle_control(t1, "10.0.0.1:5000".parse().unwrap(), &nak);
    // The same NAK again 5 ms later (another receiver, say): coalesced into the queued repair.
    let mut repeated = false;
    let after = run(&mut m, t1, t1 + Duration::from_millis(100), |m, now| {
        if !repeated && now >= t1 + Duration::from_millis(5) {
            m.handle_control(now, "10.0.0.2:5000".parse().unwrap(), &nak);
            repeated = true;
        }
    });
    let pos = after
        .iter()
        .position(|p| *p == (target, true))
        .expect("repair sent");
    // It went out after the one-GRTT aggregation window (20 ms before any RTT report: ~192
    // packets at this rate) plus a few packets, not when the loop got there (~2900 later).
    let window = (Params::for_tests(RATE).grtt_initial.as_secs_f64() * RATE as f64 / (1304.0 * 8.0))
        as usize;
    println!("repair went out {pos} packets after the NAK (aggregation window {window})");
    assert!(pos <= window + 10, "repair was packet {pos} after the NAK");
    assert!(!after[..pos].iter().any(|(id, _)| *id == target));
    assert_eq!(m.counters().repairs_sent, 1);
    assert_eq!(after.iter().filter(|p| **p == (target, true)).count(), 1);
    assert_eq!(m.counters().naks_received, 2);
    assert_eq!(m.counters().nak_units_coalesced, 1);
    // Samples for the histograms: the join answered before the loop's first data packet,
    // and one NAK-to-repair time (the coalesced NAK adds none), at least the aggregation
    // window and no more than the 100 ms run.
    let samples: Vec<Sample> = std::iter::from_fn(|| m.poll_sample()).collect();
    let joins = samples
        .iter()
        .filter(|s| matches!(s, Sample::JoinToFirstPacket(_)))
        .count();
    assert_eq!(joins, 1, "{samples:?}");
    let waits: Vec<Duration> = samples
        .iter()
        .filter_map(|s| match s {
            Sample::NakToRepair(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(waits.len(), 1, "{samples:?}");
    assert!(
        waits[0] >= Params::for_tests(RATE).grtt_initial,
        "{waits:?}"
    );
    assert!(waits[0] <= Duration::from_millis(100), "{waits:?}");
}

/// A completion is sampled once, from the member itself, with its figures clamped: a retried
/// `Complete`, one from a receiver that is no member, or one without the session's MAC adds
/// nothing.
#[test]
fn completions_are_sampled_once_from_members_only_and_clamped() {
    let (mut m, t0, id) = tiered(mcast::channel::RatePolicy::Lowest);
    assert!(matches!(join_sim(&mut m, t0, 1), Control::JoinOk { .. }));
    assert!(matches!(join_sim(&mut m, t0, 2), Control::JoinOk { .. }));
    while m.poll_sample().is_some() {}
    let complete = |elapsed_ms, milli_loops| Control::Complete {
        archive_id: id,
        elapsed_ms,
        milli_loops,
    };
    // Not a member: acknowledged (idempotent), not sampled.
    request(&mut m, t0, 7, complete(5_000, 1_000));
    assert_eq!(m.poll_sample(), None);
    // Receiver 2's Complete without its MAC: dropped as forged.
    let from: SocketAddr = "10.0.1.2:5000".parse().unwrap();
    let forged = Envelope::new(2, 9, complete(5_000, 1_000))
        .with_token(Some(m.address_token(from.ip(), t0)))
        .encode();
    m.handle_control(t0, from, &forged);
    assert_eq!(m.poll_sample(), None);
    assert_eq!(m.counters().session_forged, 1);
    // The member's own: sampled, absurd figures clamped; its retry adds nothing.
    request(&mut m, t0, 1, complete(u32::MAX, u32::MAX));
    request(&mut m, t0, 1, complete(u32::MAX, u32::MAX));
    assert_eq!(
        m.poll_sample(),
        Some(Sample::Completion {
            elapsed: mcast::channel::MAX_REPORTED_ELAPSED,
            milli_loops: mcast::channel::MAX_REPORTED_MILLI_LOOPS,
        })
    );
    request(&mut m, t0, 2, complete(61_500, 1_250));
    assert_eq!(
        m.poll_sample(),
        Some(Sample::Completion {
            elapsed: Duration::from_millis(61_500),
            milli_loops: 1_250,
        })
    );
    assert_eq!(m.poll_sample(), None);
    assert_eq!(m.counters().completions, 2);
}

#[test]
fn hostile_naks_are_bounded_and_cannot_stall_the_loop() {
    let (mut m, t0, shape, tag) = setup();
    let attacker: SocketAddr = "10.9.9.9:666".parse().unwrap();
    let units = shape.loop_packets();
    // A member gone rogue (receiver 1, joined in `setup`): its NAKs carry its MAC.
    let absurd = Nak {
        archive_tag: tag,
        session_tag: 0,
        // The whole loop, and far beyond it, in every NAK.
        ranges: vec![(0, units as u32), (units + 10, u32::MAX), (u64::MAX - 5, 5)],
        symbols: Vec::new(),
    };
    let absurd = sealed(&m, &absurd, 1, "10.0.0.1:5000");
    // Anyone else on the LAN: the session tag is in every NAK on the group, the key is not.
    let unsealed = Nak {
        archive_tag: tag,
        session_tag: Nak::decode(&absurd).unwrap().session_tag,
        ranges: vec![(0, units as u32)],
        symbols: Vec::new(),
    }
    .encode();
    let other_channel = Nak {
        archive_tag: [0xee; 8],
        session_tag: 666,
        ranges: vec![(0, 1)],
        symbols: Vec::new(),
    }
    .encode();
    let sent = run(&mut m, t0, t0 + Duration::from_secs(1), |m, now| {
        for _ in 0..50 {
            m.handle_control(now, attacker, &absurd); // 50 000 NAKs/s
            m.handle_control(now, "10.9.9.8:1".parse().unwrap(), &unsealed);
        }
        m.handle_control(now, attacker, &other_channel);
        m.handle_control(
            now,
            attacker,
            &[mcast::wire::WIRE_VERSION, 0x80, 0, 0, 1, 2],
        ); // truncated NAK
    });
    let c = m.counters();
    let repairs = sent.iter().filter(|(_, r)| *r).count();
    let loop_pkts = sent.len() - repairs;
    println!(
        "flood: {} packets sent ({} loop, {} repairs); NAKs accepted {}, rate-limited {}, units ignored {}, coalesced {}, malformed {}",
        sent.len(), loop_pkts, repairs, c.naks_received, c.naks_rate_limited, c.nak_units_ignored, c.nak_units_coalesced, c.naks_malformed
    );
    // The loop keeps at least its share (repair_share = 0.5) of the channel.
    assert!(
        loop_pkts * 2 >= sent.len() - 2,
        "loop starved: {loop_pkts} of {}",
        sent.len()
    );
    // The channel still runs at its rate: ~100 Mbit/s of 1304-byte packets for ~0.9 s.
    assert!(sent.len() > 8000, "channel stalled: {} packets", sent.len());
    assert!(c.naks_rate_limited > 0, "flood not rate-limited");
    assert!(c.nak_units_ignored > 0, "absurd ranges not clipped");
    assert!(c.naks_unknown_channel > 0);
    assert!(c.naks_malformed > 0);
    // One NAK can ask for at most max_nak_units.
    assert!(c.nak_units_received <= c.naks_received * Params::for_tests(RATE).max_nak_units);
    // The member may ask for no more than its channel sends in a second (and one NAK's worth
    // at once): ~9,600 packets/s here, where 1,000 NAKs of 8,192 units asked for 8 million.
    println!(
        "rogue member: {} units taken, {} over its budget; {} unsealed NAKs dropped",
        c.nak_units_received, c.nak_units_over_budget, c.naks_unauthenticated
    );
    let pps = RATE as f64 / (1304.0 * 8.0);
    assert!(c.nak_units_received as f64 <= 2.0 * pps + 8192.0, "{c:?}");
    assert!(c.nak_units_over_budget > 0);
    assert!(c.naks_unauthenticated >= 1000, "{c:?}");
}

fn tiered(policy: mcast::channel::RatePolicy) -> (ChannelManager, Instant, [u8; 16]) {
    let head = mcast::sim::sim_head(4000, 1280);
    let archive_id = head.archive_id;
    let t0 = Instant::now();
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: mcast::channel::HeadBytes::Memory(Arc::new(Vec::new())),
        archive_len: 0,
    };
    let mut p = Params::for_tests(RATE);
    p.tiers_bps = vec![4_000_000, 16_000_000, 64_000_000];
    p.rate_policy = policy;
    (ChannelManager::new(p, vec![info], t0), t0, archive_id)
}

fn request(m: &mut ChannelManager, now: Instant, rid: u64, msg: Control) -> Control {
    let from: SocketAddr = format!("10.0.1.{}:5000", rid % 250).parse().unwrap();
    let req = proven(m, now, from, Envelope::new(rid, 9, msg));
    m.handle_control(now, from, &req);
    let (_, bytes) = m.poll_reply().expect("a reply");
    while m.poll_reply().is_some() {}
    Envelope::decode(&bytes).unwrap().msg
}

/// Receiver `rid` joins the test title.
fn join_sim(m: &mut ChannelManager, now: Instant, rid: u64) -> Control {
    request(
        m,
        now,
        rid,
        Control::Join {
            title: "sim".into(),
        },
    )
}

/// The block a packet of the test title (40 symbols a block) belongs to.
fn block_of(id: PacketId) -> u64 {
    match id {
        PacketId::Hash(b) => b,
        PacketId::Data(s) => s / 40,
        PacketId::Repair(_) | PacketId::Extra(_) => unreachable!("the test title has no FEC"),
    }
}

/// A keepalive with nothing to report.
fn keepalive(archive_id: [u8; 16]) -> Control {
    Control::Keepalive {
        archive_id,
        have: 0,
        total: 1,
        rtt_us: 0,
        rx_bps: 0,
        loss_ppm: 0,
        capacity_bps: 0,
    }
}

fn stats(m: &ChannelManager) -> serde_json::Value {
    serde_json::to_value(m.stats()).unwrap()
}

#[test]
fn tiers_one_channel_each_members_move_and_empty_tiers_close() {
    let (mut m, t0, id) = tiered(mcast::channel::RatePolicy::Lowest);
    let join = |m: &mut ChannelManager, rid| join_sim(m, t0, rid);
    // New receivers start on the conservative tier.
    let Control::JoinOk {
        tier,
        tiers_bps,
        rate_bps,
        group: g0,
        ..
    } = join(&mut m, 1)
    else {
        panic!()
    };
    assert_eq!((tier, rate_bps), (0, 4_000_000));
    assert_eq!(tiers_bps, vec![4_000_000, 16_000_000, 64_000_000]);
    // Moving up opens the tier's own channel and closes the one left empty.
    let Control::JoinOk {
        tier,
        rate_bps,
        group: g2,
        ..
    } = request(
        &mut m,
        t0,
        1,
        Control::ChangeTier {
            archive_id: id,
            tier: 2,
        },
    )
    else {
        panic!()
    };
    assert_eq!((tier, rate_bps), (2, 64_000_000));
    assert_ne!(g0, g2);
    // The tier left empty by a move up lingers a moment (a failed probe falls back to it),
    // then closes.
    assert_eq!(m.open_channels(), 2);
    m.handle_timeout(t0 + TIER_LINGER - Duration::from_millis(100));
    assert_eq!(m.open_channels(), 2);
    m.handle_timeout(t0 + TIER_LINGER + Duration::from_millis(100));
    assert_eq!(m.open_channels(), 1);
    assert_eq!(m.counters().channels_closed, 1);
    // Another receiver starts low: now two channels of one title, at different rates.
    let Control::JoinOk { tier, .. } = join(&mut m, 2) else {
        panic!()
    };
    assert_eq!(tier, 0);
    let s = stats(&m);
    let mut tiers: Vec<(u64, u64)> = s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["tier"].as_u64().unwrap(), c["rate_bps"].as_u64().unwrap()))
        .collect();
    tiers.sort();
    assert_eq!(tiers, vec![(0, 4_000_000), (2, 64_000_000)]);
    // A re-join keeps the receiver's tier; a tier that does not exist is refused.
    let Control::JoinOk { tier, .. } = join(&mut m, 1) else {
        panic!()
    };
    assert_eq!(tier, 2);
    assert!(matches!(
        request(
            &mut m,
            t0,
            1,
            Control::ChangeTier {
                archive_id: id,
                tier: 3
            }
        ),
        Control::Error { .. }
    ));
    // Keepalives and completion find the member on its tier.
    let ka = keepalive(id);
    assert!(matches!(
        request(&mut m, t0, 1, ka.clone()),
        Control::LeaseOk { .. }
    ));
    assert!(matches!(
        request(&mut m, t0, 2, ka),
        Control::LeaseOk { .. }
    ));
    request(
        &mut m,
        t0,
        1,
        Control::Complete {
            archive_id: id,
            elapsed_ms: 1000,
            milli_loops: 1000,
        },
    );
    assert_eq!(m.open_channels(), 1);
}

/// A tier emptied by a move down closes at once: its receiver found it too fast, and it is the
/// dearest channel to keep looping for nobody.
#[test]
fn a_tier_emptied_by_a_move_down_closes_at_once() {
    let (mut m, t0, id) = tiered(mcast::channel::RatePolicy::Lowest);
    let change = |m: &mut ChannelManager, tier| {
        request(
            m,
            t0,
            1,
            Control::ChangeTier {
                archive_id: id,
                tier,
            },
        )
    };
    let Control::JoinOk { tier: 0, .. } = join_sim(&mut m, t0, 1) else {
        panic!("joins on tier 0")
    };
    let Control::JoinOk { tier: 2, .. } = change(&mut m, 2) else {
        panic!("moves up")
    };
    let Control::JoinOk { tier: 1, .. } = change(&mut m, 1) else {
        panic!("moves down")
    };
    // Tier 0 (left by the move up) still lingers; tier 2 (left by the move down) is gone.
    m.handle_timeout(t0 + Duration::from_millis(1));
    let s = stats(&m);
    let mut tiers: Vec<u64> = s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tier"].as_u64().unwrap())
        .collect();
    tiers.sort();
    assert_eq!(tiers, vec![0, 1]);
    assert_eq!(m.counters().channels_closed, 1);
}

/// A window's rate cap holds for the whole title: joins are told of one tier (the scheduled
/// loop's, at the capped rate), and a receiver asking for a faster tier stays on that loop
/// instead of opening an uncapped channel. After the window the ladder is back.
#[test]
fn a_capped_window_holds_every_receiver_on_its_one_loop() {
    let (mut m, t0, id) = tiered(mcast::channel::RatePolicy::Lowest);
    let ch = m
        .open_scheduled(t0, "sim", Some(2_000_000))
        .expect("opened");
    let join = |m: &mut ChannelManager, rid| join_sim(m, t0, rid);
    let Control::JoinOk {
        tier,
        tiers_bps,
        rate_bps,
        ..
    } = join(&mut m, 1)
    else {
        panic!()
    };
    assert_eq!((tier, rate_bps, tiers_bps), (0, 2_000_000, vec![2_000_000]));
    let Control::JoinOk { rate_bps, .. } = request(
        &mut m,
        t0,
        1,
        Control::ChangeTier {
            archive_id: id,
            tier: 2,
        },
    ) else {
        panic!()
    };
    assert_eq!(rate_bps, 2_000_000);
    assert_eq!(m.open_channels(), 1);
    let s = stats(&m);
    let c = &s["channels"][0];
    assert_eq!(
        (c["channel"].as_u64(), c["members"].as_u64()),
        (Some(ch as u64), Some(1))
    );
    // The window ends; the next join sees the whole ladder again.
    m.close_scheduled("sim", false);
    let Control::JoinOk { tiers_bps, .. } = join(&mut m, 2) else {
        panic!()
    };
    assert_eq!(tiers_bps.len(), 3);
}

/// A tier left by one of its two members keeps its other member and must not leave a
/// stale "linger" deadline behind: that deadline would be due forever and spin the driver.
#[test]
fn a_tier_left_by_one_of_two_members_sets_no_deadline_in_the_past() {
    let (mut m, t0, id) = tiered(mcast::channel::RatePolicy::Lowest);
    for rid in [1, 2] {
        let reply = request(
            &mut m,
            t0,
            rid,
            Control::Join {
                title: "sim".into(),
            },
        );
        assert!(matches!(reply, Control::JoinOk { tier: 0, .. }));
    }
    let reply = request(
        &mut m,
        t0,
        1,
        Control::ChangeTier {
            archive_id: id,
            tier: 1,
        },
    );
    assert!(matches!(reply, Control::JoinOk { tier: 1, .. }));
    // Drive the manager as a driver would, well past the linger time, with both members
    // keeping their leases: every deadline it gives must lie ahead of the clock.
    let mut now = t0;
    let end = t0 + Duration::from_secs(6);
    let mut wakes = 0u32;
    while now < end {
        m.handle_timeout(now);
        while m.poll_transmit(now).is_some() {}
        if wakes % 200 == 0 {
            for rid in [1, 2] {
                assert!(matches!(
                    request(&mut m, now, rid, keepalive(id)),
                    Control::LeaseOk { .. }
                ));
            }
        }
        let next = m.poll_timeout().expect("two channels are open");
        assert!(
            next > now,
            "deadline {:?} is not ahead of now {:?}",
            next - t0,
            now - t0
        );
        now = next.max(now + Duration::from_micros(1));
        wakes += 1;
        assert!(wakes < 1_000_000, "the manager never let the clock move");
    }
    assert_eq!(m.open_channels(), 2, "both tiers still have a member");
}

#[test]
fn tier_rates_follow_member_reports_within_bounds() {
    use mcast::channel::RatePolicy;
    // (policy, [(throughput, capacity); 2], expected rate): members whose path showed its
    // limit (capacity > 0) pull the tier's rate to 95 % of it; members without one — however
    // much they lose at random — ask for the ceiling, so the rate never spirals down.
    for (policy, reports, want) in [
        (
            RatePolicy::Lowest,
            [(10_000_000u64, 10_000_000u64), (14_000_000, 14_000_000)],
            9_500_000u64,
        ),
        (
            RatePolicy::Average,
            [(10_000_000, 10_000_000), (14_000_000, 14_000_000)],
            11_400_000,
        ),
        (
            RatePolicy::Lowest,
            [(10_000_000, 10_000_000), (14_000_000, 0)],
            9_500_000,
        ),
        (
            RatePolicy::Average,
            [(10_000_000, 10_000_000), (14_000_000, 0)],
            12_750_000,
        ),
        // Goodput below the rate (random loss) with no limit found: the ceiling.
        (
            RatePolicy::Lowest,
            [(9_000_000, 0), (12_000_000, 0)],
            16_000_000,
        ),
        // Never above the tier's rate, never down into the tier below nor under half its
        // rate (a member that needs less belongs a tier down).
        (
            RatePolicy::Lowest,
            [(40_000_000, 40_000_000), (50_000_000, 50_000_000)],
            16_000_000,
        ),
        (
            RatePolicy::Lowest,
            [(1_000_000, 1_000_000), (15_000_000, 15_000_000)],
            8_000_000,
        ),
    ] {
        let (mut m, t0, id) = tiered(policy);
        for rid in [1u64, 2] {
            request(
                &mut m,
                t0,
                rid,
                Control::Join {
                    title: "sim".into(),
                },
            );
            request(
                &mut m,
                t0,
                rid,
                Control::ChangeTier {
                    archive_id: id,
                    tier: 1,
                },
            );
        }
        // Reports every second for 20 s: a rate lowered at once climbs back (3 % of the
        // ceiling a second) to what the policy asks for.
        for k in 0..20u64 {
            let now = t0 + Duration::from_secs(k);
            for (rid, (rx, cap)) in [(1u64, reports[0]), (2, reports[1])] {
                let ka = Control::Keepalive {
                    archive_id: id,
                    have: 0,
                    total: 1,
                    rtt_us: 500,
                    rx_bps: rx,
                    loss_ppm: 0,
                    capacity_bps: cap,
                };
                request(&mut m, now, rid, ka);
            }
            m.handle_timeout(now + Duration::from_millis(1100));
        }
        let s = stats(&m);
        // The tier-0 channel both started on may still linger; look at tier 1's.
        let c = s["channels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["tier"] == 1)
            .expect("tier 1 channel");
        let rate = c["rate_bps"].as_u64().unwrap();
        assert!(
            rate.abs_diff(want) <= want / 1000,
            "{policy:?} {reports:?}: rate {rate}, want {want}"
        );
        assert_eq!(c["members"], 2);
        assert_eq!(
            c["reported_bps"].as_u64().unwrap(),
            (reports[0].0 + reports[1].0) / 2
        );
        assert_eq!(c["reported_loss_ppm"].as_u64().unwrap(), 0);
    }
}

/// Draining: members keep their channel (keepalives, tier moves, re-joins), new receivers are
/// refused with `Draining`; a resuming join opens its loop at the block it asks for.
#[test]
fn draining_refuses_new_receivers_and_a_resume_starts_where_asked() {
    use mcast::wire::control::ErrorCode;
    let (mut m, t0, archive_id) = tiered(mcast::channel::RatePolicy::Lowest);
    let join = || Control::Join {
        title: "sim".into(),
    };
    assert!(matches!(
        request(&mut m, t0, 1, join()),
        Control::JoinOk { .. }
    ));
    m.set_draining(true);
    assert!(m.is_draining());
    assert!(matches!(
        request(&mut m, t0, 2, join()),
        Control::Error {
            code: ErrorCode::Draining,
            ..
        }
    ));
    // The member stays: re-join, keepalive and tier change are answered.
    assert!(matches!(
        request(&mut m, t0, 1, join()),
        Control::JoinOk { .. }
    ));
    let ka = Control::Keepalive {
        archive_id,
        have: 1,
        total: 2,
        rtt_us: 0,
        rx_bps: 0,
        loss_ppm: 0,
        capacity_bps: 0,
    };
    assert!(matches!(
        request(&mut m, t0, 1, ka),
        Control::LeaseOk { .. }
    ));
    assert!(matches!(
        request(
            &mut m,
            t0,
            1,
            Control::ChangeTier {
                archive_id,
                tier: 1
            }
        ),
        Control::JoinOk { tier: 1, .. }
    ));
    assert_eq!(stats(&m)["counters"]["refused_draining"], 1);
    m.set_draining(false);
    assert!(matches!(
        request(&mut m, t0, 2, join()),
        Control::JoinOk { .. }
    ));

    // A resume on a fresh server: the loop starts at the block asked for.
    let head = mcast::sim::sim_head(4000, 1280);
    let shape = LoopShape::of(&head);
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: mcast::channel::HeadBytes::Memory(Arc::new(Vec::new())),
        archive_len: 0,
    };
    let mut m = ChannelManager::new(Params::for_tests(RATE), vec![info], t0);
    let r = request(
        &mut m,
        t0,
        7,
        Control::JoinAt {
            title: "sim".into(),
            block: 5,
        },
    );
    assert!(matches!(r, Control::JoinOk { .. }), "{r:?}");
    let sent = run(&mut m, t0, t0 + Duration::from_millis(300), |_, _| {});
    let first = sent
        .iter()
        .find(|(_, repair)| !repair)
        .expect("loop packets");
    assert_eq!(first.0, PacketId::Hash(5), "{:?}", &sent[..3]);
    assert!(shape.n_blocks > 5);
}

/// A resumed receiver that moves tier keeps its place in the loop: the tier's channel, opened
/// for it, starts where the receiver's channel was, not at block 0 (which it already holds).
#[test]
fn a_tier_opened_for_a_moving_receiver_starts_where_its_channel_was() {
    let (mut m, t0, archive_id) = tiered(mcast::channel::RatePolicy::Lowest);
    let r = request(
        &mut m,
        t0,
        7,
        Control::JoinAt {
            title: "sim".into(),
            block: 40,
        },
    );
    assert!(matches!(r, Control::JoinOk { tier: 0, .. }), "{r:?}");
    let sent = run(&mut m, t0, t0 + Duration::from_millis(200), |_, _| {});
    let last = sent
        .iter()
        .rev()
        .find(|(_, rep)| !rep)
        .expect("loop packets");
    let at = block_of(last.0);
    assert!(at >= 40, "the resume starts at block 40, got {at}");
    let t1 = t0 + Duration::from_millis(200);
    let r = request(
        &mut m,
        t1,
        7,
        Control::ChangeTier {
            archive_id,
            tier: 2,
        },
    );
    assert!(matches!(r, Control::JoinOk { tier: 2, .. }), "{r:?}");
    let sent = run(&mut m, t1, t1 + Duration::from_millis(50), |_, _| {});
    let first = sent.iter().find(|(_, rep)| !rep).expect("loop packets");
    let b = block_of(first.0);
    assert!(
        (at..at + 2).contains(&b),
        "tier 2 opened at block {b}, the receiver was at {at}"
    );
}

/// A discovery burst (`channel::burst`) goes only to an address that echoed its cookie, is
/// flagged PROBE, runs at the asked tier's rate for at most `MAX_BURST`, is granted once per
/// `BURST_EVERY`, and a tier channel the receiver then moves to starts where the burst ended
/// (the receiver holds what it brought).
#[test]
fn a_discovery_burst_is_bounded_flagged_and_goes_only_to_a_proven_address() {
    let (mut m, t0, archive_id) = tiered(mcast::channel::RatePolicy::Lowest);
    let r = join_sim(&mut m, t0, 7);
    assert!(matches!(r, Control::JoinOk { tier: 0, .. }), "{r:?}");
    let uni: SocketAddr = "10.0.1.7:6000".parse().unwrap();
    let ask = |m: &mut ChannelManager, now: Instant, msg: Control| {
        let req = proven(m, now, uni, Envelope::new(7, 3, msg));
        m.handle_control(now, uni, &req);
        let (to, bytes) = m.poll_reply().expect("a reply");
        assert_eq!(to, uni);
        Envelope::decode(&bytes).unwrap().msg
    };
    let burst = |cookie| Control::ProbeBurst {
        archive_id,
        cookie,
        tier: 2,
        ms: 60_000,
    };
    // No cookie, no burst.
    let r = ask(&mut m, t0, burst([9; 16]));
    assert!(matches!(r, Control::Error { .. }), "{r:?}");
    assert_eq!(m.counters().bursts_started, 0);
    let Control::Cookie { cookie, .. } = ask(&mut m, t0, Control::UnicastRequest { archive_id })
    else {
        panic!("no cookie")
    };
    let r = ask(&mut m, t0, burst(cookie));
    assert!(matches!(r, Control::UnicastOk { .. }), "{r:?}");
    // Once per BURST_EVERY.
    let r = ask(&mut m, t0, burst(cookie));
    assert!(matches!(r, Control::Error { .. }), "{r:?}");
    assert_eq!(m.counters().bursts_refused, 1);

    let (mut now, end) = (t0, t0 + Duration::from_millis(700));
    let (mut first, mut last, mut bytes, mut last_block) = (None, None, 0u64, 0u64);
    while now < end {
        m.handle_timeout(now);
        while let Some(t) = m.poll_transmit(now) {
            let (h, _) = DataHeader::decode(&t.header).unwrap();
            if t.dests[..] != [uni] {
                assert!(!h.probe, "only the burst is flagged");
                continue;
            }
            assert!(h.probe, "the burst's datagrams are flagged");
            first.get_or_insert(now);
            last = Some(now);
            if let DataKind::Packet(id) = h.kind {
                bytes += 1280;
                last_block = block_of(id);
            }
        }
        now += Duration::from_micros(100);
    }
    let took = last.unwrap() - first.unwrap();
    assert!(took <= mcast::channel::MAX_BURST, "burst ran {took:?}");
    // Tier 2's 64 Mbit/s for half a second: 4 MB, within the pacer's slack.
    assert!(bytes <= 64_000_000 / 8 / 2 + 64 * 1280, "{bytes} B");
    assert!(bytes >= 64_000_000 / 8 / 4, "{bytes} B");
    assert_eq!(m.counters().bursts_started, 1);

    // Moving to tier 2 opens its channel where the burst ended.
    let r = request(
        &mut m,
        now,
        7,
        Control::ChangeTier {
            archive_id,
            tier: 2,
        },
    );
    let Control::JoinOk {
        tier: 2, group: g2, ..
    } = r
    else {
        panic!("{r:?}")
    };
    let mut first_block = None;
    let end = now + Duration::from_millis(50);
    while now < end && first_block.is_none() {
        m.handle_timeout(now);
        while let Some(t) = m.poll_transmit(now) {
            let (h, _) = DataHeader::decode(&t.header).unwrap();
            match h.kind {
                DataKind::Packet(id) if t.dests[..] == [g2] && !h.repair => {
                    first_block.get_or_insert(block_of(id));
                }
                _ => {}
            }
        }
        now += Duration::from_micros(100);
    }
    let first_block = first_block.expect("tier 2 loop packets");
    assert!(
        (last_block..last_block + 2).contains(&first_block),
        "tier 2 opened at block {first_block}, the burst ended at {last_block}"
    );
}

/// Source-specific multicast in the join answer: a group in 232/8 or ff3x::/32 carries the
/// server's source address, an any-source group (239/8, ff15::) none, unless the operator
/// made every group source-specific (`ssm_all_groups`).
#[test]
fn the_join_answer_names_the_source_of_source_specific_groups_only() {
    let source: std::net::IpAddr = "2001:db8::5".parse().unwrap();
    for (group, all, told) in [
        ("232.1.2.1:7700", false, true),
        ("239.1.2.1:7700", false, false),
        ("239.1.2.1:7700", true, true),
        ("[ff35::7701]:7700", false, true),
        ("[ff15::7701]:7700", false, false),
    ] {
        let head = mcast::sim::sim_head(400, 1280);
        let info = TitleInfo {
            head: Arc::new(head),
            head_bytes: mcast::channel::HeadBytes::Memory(Arc::new(Vec::new())),
            archive_len: 0,
        };
        let mut p = Params::for_tests(RATE);
        p.groups = vec![group.parse().unwrap()];
        p.ssm_source = Some(source);
        p.ssm_all_groups = all;
        let t0 = Instant::now();
        let mut m = ChannelManager::new(p, vec![info], t0);
        let Control::JoinOk {
            group: g,
            source: s,
            ..
        } = join_sim(&mut m, t0, 1)
        else {
            panic!("no JoinOk for {group}")
        };
        assert_eq!(g.to_string(), group);
        assert_eq!(s, told.then_some(source), "{group} ssm_all_groups={all}");
    }
}
