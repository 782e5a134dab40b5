//! Every decoder of bytes from the network or disk returns an error on bad input and never
//! panics: random bytes, and random mutations of valid encodings.

use mcast::archive::Head;
use mcast::wire::control::{Control, Envelope};
use mcast::wire::data::{DataHeader, SyncInfo};
use mcast::wire::director::{DirectorMsg, Heartbeat, HeldTitle, ServerState};
use mcast::wire::nak::Nak;
use proptest::prelude::*;

fn decode_all(b: &[u8]) {
    let _ = Envelope::decode(b);
    let _ = DataHeader::decode(b);
    let _ = SyncInfo::decode(b);
    let _ = Nak::decode(b);
    let _ = Head::decode(b);
    let _ = Heartbeat::decode_unverified(b);
    let _ = Heartbeat::open(b, &[7; 32]);
    let _ = DirectorMsg::decode(b);
    // An edge's delegation certificate: from a JoinOk, or an operator's file.
    if let Ok(d) = mcast::delegation::Delegation::decode(b) {
        assert_eq!(d.encode(), b);
    }
    // Ticket files come from wherever the viewer got them.
    let _ = mcast_keys::ticket::Ticket::decode(b);
    let _ = mcast_keys::ticket::TicketFile::decode(b);
    let _ = mcast_keys::ticket::TicketFile::from_file_bytes(b);
}

fn valid_samples() -> Vec<Vec<u8>> {
    let id = [3u8; 16];
    vec![
        Envelope::new(
            1,
            2,
            Control::Join {
                title: "film".into(),
            },
        )
        .encode(),
        Envelope::new(
            1,
            2,
            Control::Keepalive {
                archive_id: id,
                have: 1,
                total: 2,
                rtt_us: 3,
                rx_bps: 0,
                loss_ppm: 0,
                capacity_bps: 0,
            },
        )
        .encode(),
        Envelope::new(
            1,
            2,
            Control::HeadChunk {
                archive_id: id,
                offset: 0,
                total: 9,
                bytes: vec![1; 9],
            },
        )
        .encode(),
        Nak {
            archive_tag: [1; 8],
            session_tag: 5,
            ranges: vec![(1, 2), (9, 1)],
            symbols: Vec::new(),
        }
        .encode(),
        mcast::sim::sim_head(100, 1280).encode(),
        Heartbeat {
            server: "127.0.0.1:7600".parse().unwrap(),
            boot_id: 1,
            seq: 2,
            unix_ms: 3,
            interval_ms: 500,
            state: ServerState::Online,
            channels: 1,
            channel_slots: 32,
            receivers: 4,
            throughput_bps: 5,
            capacity_bps: 6,
            max_tier_bps: 7,
            titles: vec![HeldTitle {
                title: "film".into(),
                looping: true,
            }],
        }
        .encode(&[7; 32]),
        DirectorMsg::RouteRequest {
            req_id: 1,
            title: "film".into(),
            rx_bps: 0,
            exclude: vec!["127.0.0.2:7600".parse().unwrap()],
        }
        .encode(),
        mcast::delegation::Delegation::issue(
            &mcast_keys::Identity::from_secret(&[1; 32]),
            mcast_keys::Identity::from_secret(&[2; 32]).public(),
            1_900_000_000,
        )
        .encode(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&b);
    }

    #[test]
    fn version_one_prefixed_bytes_never_panic(kind in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = vec![1u8, kind];
        b.extend(rest);
        decode_all(&b);
    }

    #[test]
    fn mutated_valid_messages_never_panic(which in any::<usize>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut samples = valid_samples();
        let n = samples.len();
        let mut b = samples.swap_remove(which % n);
        for (i, x) in flips {
            let n = b.len();
            b[i % n] ^= x;
        }
        let n = b.len();
        b.truncate(cut % (n + 1));
        decode_all(&b);
    }
}
