//! Every decoder of bytes from the network or disk returns an error on bad input and never
//! panics: random bytes, and random mutations of valid encodings.

use mcast::archive::Head;
use mcast::wire::control::{Control, Envelope};
use mcast::wire::data::{DataHeader, SyncInfo};
use mcast::wire::nak::Nak;
use proptest::prelude::*;

fn decode_all(b: &[u8]) {
    let _ = Envelope::decode(b);
    let _ = DataHeader::decode(b);
    let _ = SyncInfo::decode(b);
    let _ = Nak::decode(b);
    let _ = Head::decode(b);
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
            receiver_id: 5,
            ranges: vec![(1, 2), (9, 1)],
        }
        .encode(),
        mcast::sim::sim_head(100, 1280).encode(),
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
    fn mutated_valid_messages_never_panic(which in 0usize..5, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut b = valid_samples().swap_remove(which);
        for (i, x) in flips {
            let n = b.len();
            b[i % n] ^= x;
        }
        let n = b.len();
        b.truncate(cut % (n + 1));
        decode_all(&b);
    }
}
