//! The channel manager's NAK handling, driven directly (sans-I/O, simulated clock): repairs go
//! out ahead of the loop, and hostile NAKs — absurd ranges, units that do not exist, floods from
//! one address, garbage — are bounded and counted and cannot stall the loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast::archive::PacketId;
use mcast::carousel::LoopShape;
use mcast::channel::{ChannelManager, Params, TitleInfo};
use mcast::wire::control::{Control, Envelope};
use mcast::wire::data::{archive_tag, DataHeader, DataKind};
use mcast::wire::nak::Nak;

const RATE: u64 = 100_000_000;

fn setup() -> (ChannelManager, Instant, LoopShape, [u8; 8]) {
    let head = mcast::sim::sim_head(4000, 1280);
    let shape = LoopShape::of(&head);
    let tag = archive_tag(&head.archive_id);
    let t0 = Instant::now();
    let info = TitleInfo {
        head: Arc::new(head),
        head_bytes: Arc::new(Vec::new()),
        archive_len: 0,
    };
    let mut m = ChannelManager::new(Params::for_tests(RATE), vec![info], t0);
    let from: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    m.handle_control(
        t0,
        from,
        &Envelope::new(
            1,
            1,
            Control::Join {
                title: "sim".into(),
            },
        )
        .encode(),
    );
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
        receiver_id: 1,
        ranges: vec![(unit, 1)],
    }
    .encode();
    let t1 = t0 + Duration::from_millis(150);
    m.handle_control(t1, "10.0.0.1:5000".parse().unwrap(), &nak);
    let after = run(&mut m, t1, t1 + Duration::from_millis(100), |_, _| {});
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
    // A second NAK for it right away is coalesced (repaired less than a GRTT ago).
    let t2 = t1 + Duration::from_millis(100);
    let _ = run(&mut m, t2, t2 + Duration::from_micros(100), |m, now| {
        m.handle_control(now, "10.0.0.1:5000".parse().unwrap(), &nak);
    });
}

#[test]
fn hostile_naks_are_bounded_and_cannot_stall_the_loop() {
    let (mut m, t0, shape, tag) = setup();
    let attacker: SocketAddr = "10.9.9.9:666".parse().unwrap();
    let units = shape.loop_packets();
    let absurd = Nak {
        archive_tag: tag,
        receiver_id: 666,
        // The whole loop, and far beyond it, in every NAK.
        ranges: vec![(0, units as u32), (units + 10, u32::MAX), (u64::MAX - 5, 5)],
    }
    .encode();
    let other_channel = Nak {
        archive_tag: [0xee; 8],
        receiver_id: 666,
        ranges: vec![(0, 1)],
    }
    .encode();
    let sent = run(&mut m, t0, t0 + Duration::from_secs(1), |m, now| {
        for _ in 0..50 {
            m.handle_control(now, attacker, &absurd); // 50 000 NAKs/s
        }
        m.handle_control(now, attacker, &other_channel);
        m.handle_control(now, attacker, &[1, 0x80, 0, 0, 1, 2]); // truncated NAK
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
}
