//! Archive heads (the signed manifest: sent in `HeadChunk`s, read from every archive file) and
//! the manifest's packet checks.
//!
//! Input records (see `mcast_fuzz_common::records`): head, then optionally a hash-packet
//! payload, a data-packet payload, and 16 bytes choosing the block and serial they claim.
//! Oracles: no panic; a decoded head re-encodes to exactly its bytes and, re-signed, verifies; a
//! the receiver's engines accept its shape.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mcast::archive::{Head, Layout, PacketId, PacketVerifier};
use mcast::carousel::{Carousel, LoopShape};
use mcast::receiver::download::Download;
use mcast::receiver::nak::NakEngine;
use mcast::wire::data::SyncInfo;
use mcast_fuzz_common::{identity, records};

fuzz_target!(|input: &[u8]| {
    let mut recs = records(input);
    let Some(head_bytes) = recs.next() else {
        return;
    };
    let Ok(head) = Head::decode(head_bytes) else {
        return;
    };
    assert_eq!(head.encode(), head_bytes, "re-encoding differs");
    let id = identity();
    // The signature check itself must not panic on any key or signature bytes.
    let _ = head.verify_with(&head.server_key);
    let mut head = head;
    head.sign(&id);
    head.verify_with(&id.public())
        .expect("freshly signed head verifies");
    let head_len = head_bytes.len() as u64;
    let layout = Layout::of(&head, head_len);
    assert!(layout.file_len() > head.loop_bytes());
    let shape = LoopShape::of(&head);
    assert_eq!(shape.loop_packets(), head.loop_packets());

    let hash_packet = recs.next().unwrap_or_default();
    let data_packet = recs.next().unwrap_or_default();
    let mut ids = [0u8; 16];
    if let Some(r) = recs.next() {
        let n = r.len().min(16);
        ids[..n].copy_from_slice(&r[..n]);
    }
    let block = u64::from_le_bytes(ids[..8].try_into().unwrap());
    let serial = u64::from_le_bytes(ids[8..].try_into().unwrap());
    for pid in [PacketId::Hash(block), PacketId::Data(serial)] {
        if let Some(u) = shape.unit_index(pid) {
            assert_eq!(shape.unit_packet(u), pid);
            let (off, len) = layout.packet_range(pid).expect("unit has a range");
            assert!(off + len as u64 <= layout.head_offset());
        }
    }
    let v = PacketVerifier::new(&head);
    let _ = v.data_packet_len(serial);
    if v.check_hash_packet(&head, block, hash_packet).is_ok() {
        let _ = v.check_data_packet(hash_packet, serial, data_packet);
    }
    let _ = v.check_data_packet(&vec![0; head.symbol_size as usize], serial, data_packet);

    // What a receiver builds from a head it accepted.
    let head = Arc::new(head);
    let mut dl = Download::new(head.clone(), head_len, None);
    let mut nak = NakEngine::new(shape, 0);
    let pid = PacketId::Hash(block % shape.n_blocks.max(1));
    let _ = dl.on_packet(pid, hash_packet);
    let _ = dl.on_packet(PacketId::Data(serial), data_packet);
    nak.on_sync(
        &SyncInfo {
            loop_packets: 0,
            rate_bps: 0,
            grtt_us: 1,
            group_size: 1,
            send_us: 0,
        },
        0,
    );
    let mut c = Carousel::starting_at(shape, block);
    for _ in 0..shape.loop_packets().min(64) {
        let _ = c.next_packet();
    }
});
