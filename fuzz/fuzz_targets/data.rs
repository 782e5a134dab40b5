//! Data-channel datagrams (SYNC, hash and data packets, NAKs heard on the group) through the
//! receiver's path: `DataHeader`/`SyncInfo`/`Nak` decoding, then the download engine and the
//! NAK engine, as `mcast-recv get` drives them, over a small genuine archive.
//!
//! The input is a sequence of datagrams (see `mcast_fuzz_common::records`). Oracles: decoding
//! never panics and re-encodes to what it decoded; every byte the engine says to write is the
//! genuine archive's byte at that offset (a forged packet never reaches the file).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mcast::archive::PacketId;
use mcast::receiver::download::{Download, Verdict};
use mcast::receiver::nak::NakEngine;
use mcast::wire::data::{archive_tag, DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN};
use mcast::wire::nak::{is_nak, Nak};
use mcast_fuzz_common::{records, world, World, WORLD_SYMBOL};

fn the_world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(world)
}

fn check_write(w: &World, offset: u64, bytes: &[u8]) {
    let o = offset as usize;
    assert_eq!(
        &w.file[o..o + bytes.len()],
        bytes,
        "engine wrote bytes that are not the archive's at offset {offset}"
    );
}

fuzz_target!(|input: &[u8]| {
    let w = the_world();
    let tag = archive_tag(&w.head.archive_id);
    let mut dl = Download::new(w.head.clone(), w.head_len, None);
    // A small cache so eviction and NeedHash are reachable with a handful of packets.
    dl.set_hash_cache_max(1);
    let mut nak = NakEngine::new(*dl.shape(), 1);
    // The receiver's file: only what the engine said to write.
    let mut disk = vec![0u8; w.file.len()];
    let t0 = Instant::now();
    for (i, dg) in records(input).enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        if is_nak(dg) {
            if let Ok(n) = Nak::decode(dg) {
                assert_eq!(Nak::decode(&n.encode()).as_ref(), Ok(&n));
                if n.archive_tag == tag {
                    nak.on_nak_heard(now, n.units_in(dl.units()));
                }
            }
            continue;
        }
        let Ok((hdr, payload)) = DataHeader::decode(dg) else {
            continue;
        };
        let mut re = [0u8; DATA_HEADER_LEN];
        hdr.encode_into(&mut re);
        assert_eq!(DataHeader::decode(&re), Ok((hdr, &[][..])));
        if hdr.archive_tag != tag {
            continue;
        }
        let id = match hdr.kind {
            DataKind::Sync => {
                if let Ok(info) = SyncInfo::decode(payload) {
                    assert_eq!(SyncInfo::decode(&info.encode()), Ok(info));
                    nak.on_sync(&info, DATA_HEADER_LEN + WORLD_SYMBOL as usize);
                }
                continue;
            }
            DataKind::Packet(id) => id,
        };
        let mut verdict = dl.on_packet(id, payload);
        if let Verdict::NeedHash(b) = verdict {
            let (off, len) = dl
                .layout()
                .packet_range(PacketId::Hash(b))
                .expect("block in range");
            let hp = disk[off as usize..off as usize + len].to_vec();
            assert!(dl.restore_hash(b, hp), "a written hash packet must verify");
            verdict = dl.on_packet(id, payload);
        }
        match verdict {
            Verdict::Write { .. } => {
                nak.on_packet(now, id, hdr.repair, |u| dl.has_or_parked(u));
            }
            Verdict::Parked => {
                if let PacketId::Data(s) = id {
                    nak.on_parked(now, s, |u| dl.has_or_parked(u));
                }
            }
            Verdict::Duplicate if dl.duplicate_is_genuine(id, payload) => {
                assert_eq!(Some(payload), w.packet(id), "a forged duplicate passed");
                nak.on_packet(now, id, hdr.repair, |u| dl.has_or_parked(u));
            }
            _ => {}
        }
        for unit in dl.take_unpark_rejects() {
            nak.on_lost(now, unit);
        }
        for (offset, bytes) in dl.take_released() {
            check_write(w, offset, &bytes);
            disk[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        }
        if let Verdict::Write { offset } = verdict {
            check_write(w, offset, payload);
            disk[offset as usize..offset as usize + payload.len()].copy_from_slice(payload);
        }
        nak.handle_timeout(now, |u| dl.has_or_parked(u));
        while let Some(ranges) = nak.poll_nak(now) {
            for (first, len) in ranges {
                assert!(first + len as u64 <= dl.units(), "NAK beyond the loop");
            }
        }
    }
    assert!(dl.have_count() <= dl.units());
    if dl.is_complete() {
        let d0 = dl.layout().data_offset() as usize;
        let end = dl.layout().head_offset() as usize;
        assert_eq!(
            &disk[d0..end],
            &w.file[d0..end],
            "complete but file differs"
        );
    }
});
