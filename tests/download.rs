//! The receiver's download state machine on a real packed archive: every packet verified
//! before it is written, a bounded hash-packet cache that falls back to the file, parking,
//! and the resume re-check that forgets what no longer verifies on disk.

use std::collections::HashMap;
use std::sync::Arc;

use mcast::archive::{pack, ArchiveFile, CompressMode, PackOptions, PacketId};
use mcast::carousel::LoopShape;
use mcast::receiver::download::{Download, Verdict};
use mcast_keys::KeyStore;

/// A packed archive (symbol 256 bytes: 8 data packets per block) and its packets by id.
fn fixture(len: usize) -> (tempfile::TempDir, ArchiveFile) {
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
    let r = pack(&input, &dir.path().join("a"), &ks, &o, &mut |_| {}).unwrap();
    let a = ArchiveFile::open(&r.path).unwrap();
    (dir, a)
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
    let forgotten = resumed.recheck_held(|off, buf| {
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
    });
    // Data packet 5, plus block 2's hash packet and its 8 data packets.
    assert_eq!(forgotten, 1 + 1 + shape.block_symbols, "forgot {forgotten}");
    assert!(!resumed.has(5));
    assert!(!resumed.has(shape.unit_index(PacketId::Hash(2)).unwrap()));
    assert!(resumed.has(4) && resumed.has(6));
}
