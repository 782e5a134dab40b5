//! The receiver's download state machine on a real packed archive: every packet verified
//! before it is written, a bounded hash-packet cache that falls back to the file, parking,
//! and the resume re-check that forgets what no longer verifies on disk; with FEC, decoding
//! from any k symbols, rebuilding lost hash packets, resume of partial blocks, forgeries.

use std::collections::HashMap;
use std::sync::Arc;

use mcast::archive::{pack, ArchiveFile, CompressMode, PackOptions, PacketId};
use mcast::carousel::LoopShape;
use mcast::receiver::download::{Download, Verdict};
use mcast_keys::KeyStore;

/// A packed archive without FEC (symbol 256 bytes: 8 data packets per block).
fn fixture(len: usize) -> (tempfile::TempDir, ArchiveFile) {
    packed(len, 0.0, 0)
}

/// `len` bytes packed with 256-byte symbols, `fec_overhead` and `fec_block`.
fn packed(len: usize, fec_overhead: f64, fec_block: u32) -> (tempfile::TempDir, ArchiveFile) {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::open(dir.path().join("keys")).unwrap();
    ks.create_identity(false).unwrap();
    let input = dir.path().join("in.raw");
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&input, data).unwrap();
    let mut o = PackOptions::new("dl");
    o.compress = CompressMode::None;
    o.symbol_size = 256;
    o.frame_size = 4096;
    o.fec_overhead = fec_overhead;
    if fec_block > 0 {
        o.fec_block = fec_block;
    }
    let r = pack(&input, &dir.path().join("a"), &ks, &o, &mut |_| {}).unwrap();
    let a = ArchiveFile::open(&r.path).unwrap();
    (dir, a)
}

/// Reads of the "part file" (what was written, zeros elsewhere, as a preallocated file reads)
/// for [`Download::recheck_held`].
fn part_file(file: &HashMap<u64, Vec<u8>>, sym: usize) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
    move |off, buf| {
        let mut at = 0;
        while at < buf.len() {
            match file.get(&(off + at as u64)) {
                Some(p) => {
                    buf[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                None => {
                    let n = sym.min(buf.len() - at);
                    buf[at..at + n].fill(0);
                    at += n;
                }
            }
        }
        true
    }
}

fn payload(a: &ArchiveFile, id: PacketId) -> Vec<u8> {
    let (off, len) = a.layout.packet_range(id).unwrap();
    let mut b = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&a.file, &mut b, off).unwrap();
    b
}

/// Feed every loop packet in carousel order into `dl`, writing into `file` (a map standing in
/// for the part file), answering `NeedHash` from it as the driver does.
fn run_loop(
    a: &ArchiveFile,
    dl: &mut Download,
    file: &mut HashMap<u64, Vec<u8>>,
    skip: impl Fn(u64) -> bool,
) -> u64 {
    let shape = LoopShape::of(&a.head);
    let mut reloads = 0;
    for q in 0..shape.loop_packets() {
        if skip(q) {
            continue;
        }
        let id = shape.packet_at(q);
        let p = payload(a, id);
        let mut v = dl.on_packet(id, &p);
        if let Verdict::NeedHash(b) = v {
            reloads += 1;
            let (off, _) = dl.layout().packet_range(PacketId::Hash(b)).unwrap();
            assert!(dl.restore_hash(b, file[&off].clone()));
            v = dl.on_packet(id, &p);
            assert!(
                !matches!(v, Verdict::NeedHash(_)),
                "still no hash after restore"
            );
        }
        if let Verdict::Write { offset } = v {
            file.insert(offset, p);
        }
        for (off, bytes) in dl.take_released() {
            file.insert(off, bytes);
        }
    }
    reloads
}

#[test]
fn bounded_hash_cache_reloads_from_file_and_completes() {
    let (_d, a) = fixture(200_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    dl.set_hash_cache_max(4);
    let mut file = HashMap::new();
    // Loop 1 loses one data packet in every block: every block stays incomplete, so the cache
    // would hold all of them; it is bounded to 4.
    let k = shape.block_symbols + 1;
    let r1 = run_loop(&a, &mut dl, &mut file, |q| q % k == 3);
    assert!(dl.hash_cache_len() <= 4, "cache {}", dl.hash_cache_len());
    assert_eq!(r1, 0);
    assert_eq!(dl.units() - dl.have_count(), shape.n_blocks);
    // Loop 2 brings the missing packets; their hash packets come back from the file.
    let r2 = run_loop(&a, &mut dl, &mut file, |_| false);
    assert!(dl.is_complete());
    assert!(r2 >= shape.n_blocks - 4, "reloads {r2}");
    // What was written is the archive's loop, byte for byte.
    for q in 0..shape.loop_packets() {
        let id = shape.packet_at(q);
        let (off, _) = a.layout.packet_range(id).unwrap();
        assert_eq!(file[&off], payload(&a, id), "{id:?}");
    }
}

#[test]
fn damaged_hash_packet_on_disk_is_fetched_again() {
    let (_d, a) = fixture(50_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    dl.set_hash_cache_max(1);
    let mut file = HashMap::new();
    let k = shape.block_symbols + 1;
    run_loop(&a, &mut dl, &mut file, |q| q % k == 3);
    // Block 0's hash packet is evicted; its copy "on disk" is damaged.
    let (off, _) = a.layout.packet_range(PacketId::Hash(0)).unwrap();
    let mut bad = file[&off].clone();
    bad[5] ^= 1;
    let held = dl.have_count();
    assert!(!dl.restore_hash(0, bad));
    assert_eq!(dl.have_count(), held - 1, "the hash unit is forgotten");
    // The missing data packet is now parked until the hash packet comes again.
    let s = 2; // position 3 of block 0
    assert_eq!(
        dl.on_packet(PacketId::Data(s), &payload(&a, PacketId::Data(s))),
        Verdict::Parked
    );
    let v = dl.on_packet(PacketId::Hash(0), &payload(&a, PacketId::Hash(0)));
    assert!(matches!(v, Verdict::Write { .. }));
    assert_eq!(dl.take_released().len(), 1);
}

#[test]
fn recheck_forgets_units_that_no_longer_verify() {
    let (_d, a) = fixture(100_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    run_loop(&a, &mut dl, &mut file, |q| q >= shape.loop_packets() / 2);
    let held = dl.have_count();
    let bits = dl.have_bits().to_vec();
    // Damage data packet 5 and the hash packet of block 2 in the "part file".
    let (o5, _) = a.layout.packet_range(PacketId::Data(5)).unwrap();
    file.get_mut(&o5).unwrap()[0] ^= 0xff;
    let (oh, _) = a.layout.packet_range(PacketId::Hash(2)).unwrap();
    file.get_mut(&oh).unwrap()[0] ^= 0xff;
    let mut resumed = Download::new(Arc::new(a.head.clone()), a.layout.head_len, Some(bits));
    assert_eq!(resumed.have_count(), held);
    // The "part file": what was written, zeros elsewhere (as a preallocated file reads).
    let sym = a.head.symbol_size as usize;
    let forgotten = resumed.recheck_held(part_file(&file, sym));
    // Data packet 5, plus block 2's hash packet and its 8 data packets.
    assert_eq!(forgotten, 1 + 1 + shape.block_symbols, "forgot {forgotten}");
    assert!(!resumed.has(5));
    assert!(!resumed.has(shape.unit_index(PacketId::Hash(2)).unwrap()));
    assert!(resumed.has(4) && resumed.has(6));
}

// ---- FEC archives: decoding from any k symbols, lost hash packets rebuilt, forgeries. ----

/// A FEC archive: 256-byte symbols (8 packets a hash block), source blocks of 32 packets
/// with 8 repair symbols each.
fn fec_fixture(len: usize) -> (tempfile::TempDir, ArchiveFile) {
    let (dir, a) = packed(len, 0.25, 32);
    assert_eq!((a.head.fec_source, a.head.repair_symbols), (32, 8));
    (dir, a)
}

/// Decode what became decodable, as the session and its driver do (symbols read back from
/// the "part file").
fn decode_ready(dl: &mut Download, file: &mut HashMap<u64, Vec<u8>>) -> usize {
    let mut writes = 0;
    for f in dl.take_decodable() {
        let symbols = dl
            .decode_reads(f)
            .into_iter()
            .map(|(id, off, _)| (id, file.get(&off).cloned()))
            .collect();
        for (off, bytes) in dl.decode(f, symbols) {
            file.insert(off, bytes);
            writes += 1;
        }
    }
    writes
}

/// Every required unit (data and data hash packets) in `file` equals the archive's.
fn assert_required_match(a: &ArchiveFile, file: &HashMap<u64, Vec<u8>>) {
    let shape = LoopShape::of(&a.head);
    for u in 0..shape.loop_packets() {
        if !shape.required(u) {
            continue;
        }
        let id = shape.unit_packet(u);
        let (off, _) = a.layout.packet_range(id).unwrap();
        assert_eq!(file.get(&off), Some(&payload(a, id)), "{id:?}");
    }
}

#[test]
fn fec_restores_lost_data_and_rebuilds_a_lost_hash_packet_in_one_loop() {
    let (_d, a) = fec_fixture(50_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    // Lose data 1 and 2 of source block 0, the hash packet of its second hash block (whose
    // 8 data packets then wait unverified), and one repair symbol of block 0.
    let lost = [
        PacketId::Data(1),
        PacketId::Data(2),
        PacketId::Hash(1),
        PacketId::Repair(3),
    ];
    let lost: Vec<u64> = lost.iter().map(|&id| shape.loop_pos(id)).collect();
    for q in 0..shape.loop_packets() {
        if lost.contains(&q) {
            continue;
        }
        let id = shape.packet_at(q);
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
        for (off, bytes) in dl.take_released() {
            file.insert(off, bytes);
        }
        decode_ready(&mut dl, &mut file);
    }
    assert!(dl.is_complete(), "{:?}", dl.counters);
    assert_eq!(dl.counters.fec_decodes, 1, "{:?}", dl.counters);
    // Two decoded data packets and the rebuilt hash packet.
    assert_eq!(dl.counters.fec_restored, 3, "{:?}", dl.counters);
    assert_required_match(&a, &file);
}

#[test]
fn fec_partial_blocks_survive_a_resume() {
    let (_d, a) = fec_fixture(50_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    // First run: everything up to block 0's third repair symbol, minus 3 of its data
    // packets: 29 data and 2 repair symbols held, one short of decoding. Then a crash.
    let stop = shape.loop_pos(PacketId::Repair(2));
    for q in 0..stop {
        let id = shape.packet_at(q);
        if matches!(id, PacketId::Data(4..=6)) {
            continue;
        }
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
    }
    assert!(dl.take_decodable().is_empty());
    assert_eq!(dl.fec().unwrap().deficit(0), 1);
    // The resumed download re-checks what it holds, repair symbols included, and needs
    // exactly one more symbol of block 0.
    let bits = dl.have_bits().to_vec();
    let mut resumed = Download::new(Arc::new(a.head.clone()), a.layout.head_len, Some(bits));
    let sym = a.head.symbol_size as usize;
    let forgotten = resumed.recheck_held(part_file(&file, sym));
    assert_eq!(forgotten, 0);
    assert_eq!(resumed.fec().unwrap().deficit(0), 1);
    let p = payload(&a, PacketId::Repair(2));
    if let Verdict::Write { offset } = resumed.on_packet(PacketId::Repair(2), &p) {
        file.insert(offset, p);
    }
    assert_eq!(
        decode_ready(&mut resumed, &mut file),
        3,
        "decoded after the resume"
    );
    for s in 4..=6 {
        assert!(resumed.has(s));
    }
}

#[test]
fn a_forged_repair_symbol_is_dropped_and_a_forged_parked_one_never_corrupts_a_block() {
    let (_d, a) = fec_fixture(50_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    let rhash = shape.hash_block_of(PacketId::Repair(0));
    let mut forged = payload(&a, PacketId::Repair(0));
    forged[7] ^= 0x40;
    // Block 0 loses data 1 and 2 and its repair hash packet: repair symbols are parked, a
    // forged one first.
    let skip: Vec<u64> = [PacketId::Data(1), PacketId::Data(2), PacketId::Hash(rhash)]
        .iter()
        .map(|&id| shape.loop_pos(id))
        .collect();
    let mut decoded_writes = 0;
    for q in 0..shape.loop_packets() {
        if skip.contains(&q) {
            continue;
        }
        let id = shape.packet_at(q);
        if id == PacketId::Repair(0) {
            assert_eq!(dl.on_packet(id, &forged), Verdict::Parked);
        }
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
        decoded_writes += decode_ready(&mut dl, &mut file);
    }
    // The first decode used the forged candidate (parked first), restored garbage, and the
    // check against the data hash packets refused all of it and dropped the suspect parked
    // symbols; the genuine repair symbols that followed decoded the block correctly.
    assert!(dl.counters.rejected >= 1, "{:?}", dl.counters);
    assert_eq!(decoded_writes, 2);
    assert!(dl.is_complete(), "{:?}", dl.counters);
    assert_required_match(&a, &file);

    // Again on a fresh download, with every genuine repair symbol of block 0 lost after the
    // forged one: nothing is accepted until genuine symbols arrive.
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    let mut decoded_writes = 0;
    for q in 0..shape.loop_packets() {
        let id = shape.packet_at(q);
        if skip.contains(&q) || matches!(id, PacketId::Repair(0..=7)) {
            if id == PacketId::Repair(0) {
                assert_eq!(dl.on_packet(id, &forged), Verdict::Parked);
            }
            if id == PacketId::Repair(1) {
                // The one genuine symbol that makes the block look decodable.
                let p = payload(&a, id);
                assert_eq!(dl.on_packet(id, &p), Verdict::Parked);
                decoded_writes += decode_ready(&mut dl, &mut file);
            }
            continue;
        }
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
        decoded_writes += decode_ready(&mut dl, &mut file);
    }
    assert_eq!(decoded_writes, 0);
    assert!(!dl.is_complete());
    assert!(dl.counters.rejected >= 1, "{:?}", dl.counters);
    for s in [1u64, 2] {
        assert!(!dl.has(s), "a forged decode was accepted for {s}");
    }
    // The next loop brings the genuine repair hash packet: now a forged repair symbol is
    // refused on arrival, and the block decodes from genuine symbols.
    let v = dl.on_packet(PacketId::Hash(rhash), &payload(&a, PacketId::Hash(rhash)));
    assert!(matches!(v, Verdict::Write { .. }));
    assert_eq!(
        dl.on_packet(PacketId::Repair(0), &forged),
        Verdict::Rejected
    );
    for r in 0..8 {
        let p = payload(&a, PacketId::Repair(r));
        if let Verdict::Write { offset } = dl.on_packet(PacketId::Repair(r), &p) {
            file.insert(offset, p);
        }
        decode_ready(&mut dl, &mut file);
    }
    assert!(dl.is_complete(), "{:?}", dl.counters);
    assert_required_match(&a, &file);
}

/// Extra symbol `e` of `a`, made from its data as `mcastd` makes it.
fn extra_payload(a: &ArchiveFile, e: u64) -> Vec<u8> {
    let mut cache = mcast::archive::extras::ExtraCache::default();
    mcast::archive::fec_file::extra_symbol(&mut cache, a, e).unwrap()
}

#[test]
fn extra_symbols_are_verified_kept_in_memory_and_fill_a_block_the_loop_left_short() {
    let (_d, a) = fec_fixture(50_000);
    let shape = LoopShape::of(&a.head);
    assert_eq!(shape.fec_extras(), 24, "RS(32, 32): 8 stored, 24 extras");
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    // Block 0 loses 12 data packets in its pass: its 8 repair symbols cannot cover that.
    for q in 0..shape.loop_packets() {
        let id = shape.packet_at(q);
        if matches!(id, PacketId::Data(0..=11)) {
            continue;
        }
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
        decode_ready(&mut dl, &mut file);
    }
    assert!(!dl.is_complete());
    assert_eq!(dl.fec().unwrap().deficit(0), 4);
    // It asks for an amount: the 4 it is short, inflated by the loss it saw (12 of 40).
    let n = dl.fec_amount(0).unwrap();
    assert!((5..=24).contains(&n), "{n}");
    // A forged extra symbol, one out of range, and one of a complete block are refused
    // before they count.
    let mut forged = extra_payload(&a, 0);
    forged[3] ^= 1;
    assert_eq!(dl.on_packet(PacketId::Extra(0), &forged), Verdict::Rejected);
    assert_eq!(
        dl.on_packet(PacketId::Extra(u64::MAX), &forged),
        Verdict::Rejected
    );
    assert_eq!(
        dl.on_packet(PacketId::Extra(24), &extra_payload(&a, 24)),
        Verdict::Duplicate,
        "block 1 is complete"
    );
    assert_eq!(dl.fec().unwrap().deficit(0), 4);
    // Genuine extras are kept (nothing to write: the archive does not store them) and the
    // fourth makes the block decodable.
    for e in 0..4 {
        assert_eq!(
            dl.on_packet(PacketId::Extra(e), &extra_payload(&a, e)),
            Verdict::Kept
        );
    }
    assert_eq!(
        dl.on_packet(PacketId::Extra(1), &extra_payload(&a, 1)),
        Verdict::Duplicate
    );
    assert_eq!(decode_ready(&mut dl, &mut file), 12);
    assert!(dl.is_complete(), "{:?}", dl.counters);
    assert_eq!(dl.counters.fec_extras_kept, 4);
    assert_required_match(&a, &file);
}

#[test]
fn an_extra_symbol_before_its_hash_packet_is_parked_and_checked_when_it_comes() {
    let (_d, a) = fec_fixture(50_000);
    let shape = LoopShape::of(&a.head);
    let mut dl = Download::new(Arc::new(a.head.clone()), a.layout.head_len, None);
    let mut file = HashMap::new();
    // Block 0 short by 4, and the hash packet listing extras 0.. lost too.
    let extra_hash = shape.hash_block_of(PacketId::Extra(0));
    for q in 0..shape.loop_packets() {
        let id = shape.packet_at(q);
        if matches!(id, PacketId::Data(0..=11)) || id == PacketId::Hash(extra_hash) {
            continue;
        }
        let p = payload(&a, id);
        if let Verdict::Write { offset } = dl.on_packet(id, &p) {
            file.insert(offset, p);
        }
        decode_ready(&mut dl, &mut file);
    }
    // Unverifiable yet: parked, a forgery among them. The four make the block look
    // decodable; the decode restores garbage, the check against the data hash packets
    // refuses all of it, and the suspect parked symbols are dropped.
    let mut forged = extra_payload(&a, 0);
    forged[0] ^= 1;
    assert_eq!(dl.on_packet(PacketId::Extra(0), &forged), Verdict::Parked);
    for e in 1..4 {
        assert_eq!(
            dl.on_packet(PacketId::Extra(e), &extra_payload(&a, e)),
            Verdict::Parked
        );
    }
    assert_eq!(decode_ready(&mut dl, &mut file), 0);
    assert!(dl.counters.rejected >= 1);
    assert_eq!(dl.fec().unwrap().deficit(0), 4);
    for s in 0..12u64 {
        assert!(!dl.has(s), "a forged decode was accepted for {s}");
    }
    // The hash packet comes round: now the forgery is refused on arrival, and genuine
    // extras (asked for again) decode the block.
    let p = payload(&a, PacketId::Hash(extra_hash));
    assert!(matches!(
        dl.on_packet(PacketId::Hash(extra_hash), &p),
        Verdict::Write { .. }
    ));
    assert_eq!(dl.on_packet(PacketId::Extra(0), &forged), Verdict::Rejected);
    for e in 1..5 {
        assert_eq!(
            dl.on_packet(PacketId::Extra(e), &extra_payload(&a, e)),
            Verdict::Kept
        );
    }
    assert_eq!(decode_ready(&mut dl, &mut file), 12);
    assert!(dl.is_complete(), "{:?}", dl.counters);
    assert_required_match(&a, &file);
}
