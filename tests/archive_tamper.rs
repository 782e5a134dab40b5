//! Tampered archives are refused, each by the layer that should catch it, with an error that
//! names what failed, and without leaving anything at (or beside) the output path.
//!
//! Layers, outermost first:
//! 1. file structure (preamble, tail, head decoding)          → `NotArchive`, `Head`
//! 2. head signature and server identity                       → `Signature`, `ForeignServer`
//! 3. manifest tree: hash packets, then data packets           → `HashPacket`, `Packet`
//! 4. key commitment                                           → `WrongKey`
//! 5. frames: order, header sanity, AEAD                       → `FrameOrder`, `Frame`, `FrameAuth`
//! 6. plaintext hash                                           → `PlainHash`
//!
//! To reach the inner layers the tests forge archives that the outer layers accept: the frames
//! region is tampered, then the manifest is rebuilt and the head re-signed with the server's own
//! identity (as an attacker holding the signing key, or a buggy packer, would).

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use mcast::archive::frame::{FrameHeader, FRAME_HEADER_LEN};
use mcast::archive::manifest::{TreeBuilder, TreeKeys};
use mcast::archive::{
    self, pack, preamble_bytes, tail_bytes, unpack, ArchiveError, ArchiveFile, CompressMode, Head,
    PackOptions, PackReport,
};
use mcast_keys::{Cipher, Identity, KeyStore, MasterKey, PublicIdentity};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

const FS: usize = 4096;
const SYM: u32 = 256;

mod common;
use common::random_bytes;

struct Env {
    dir: TempDir,
    ks: KeyStore,
    identity: Identity,
    trusted: PublicIdentity,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("mcast-tamper-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let ks = KeyStore::open(dir.path().join("keys")).unwrap();
        let identity = ks.create_identity(false).unwrap();
        let trusted = identity.public();
        for d in ["in", "out", "forged"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Env {
            dir,
            ks,
            identity,
            trusted,
        }
    }

    fn out_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn out(&self) -> PathBuf {
        self.out_dir().join("restored.bin")
    }

    fn pack(&self, data: &[u8], o: &PackOptions) -> PackReport {
        let input = self.dir.path().join("in").join(&o.title);
        fs::write(&input, data).unwrap();
        pack(
            &input,
            &self.dir.path().join("archives"),
            &self.ks,
            o,
            &mut |_| {},
        )
        .unwrap()
    }

    fn key(&self, r: &PackReport) -> Option<MasterKey> {
        (!r.head.advert).then(|| {
            self.ks
                .title_key(&r.head.title, &r.head.archive_id)
                .unwrap()
        })
    }

    fn forged_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("forged").join(format!("{name}.mca"))
    }

    /// Open and unpack `path` to [`Env::out`]; on failure check nothing was left behind.
    fn try_unpack(&self, path: &Path, key: Option<&MasterKey>) -> Result<(), ArchiveError> {
        let res = ArchiveFile::open(path)
            .and_then(|a| unpack(&a, &self.trusted, key, &self.out(), &mut |_| {}).map(|_| ()));
        if res.is_err() {
            self.assert_out_clean();
        }
        res
    }

    /// Unpack must fail; returns the error after checking the output dir is empty.
    fn refused(&self, path: &Path, key: Option<&MasterKey>) -> ArchiveError {
        match self.try_unpack(path, key) {
            Ok(()) => panic!("{} was accepted", path.display()),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(path.to_str().unwrap()),
                    "error does not name the archive: {msg}"
                );
                e
            }
        }
    }

    fn assert_out_clean(&self) {
        assert!(!self.out().exists(), "output file left behind");
        let left: Vec<_> = fs::read_dir(self.out_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "stray files in the output dir: {left:?}");
    }
}

fn opts(title: &str, cipher: Cipher, compress: CompressMode) -> PackOptions {
    let mut o = PackOptions::new(title);
    o.cipher = cipher;
    o.compress = compress;
    o.frame_size = FS as u32;
    o.symbol_size = SYM;
    // The sweeps below take the regions of a FEC-less archive apart; FEC archives have
    // their own test at the end.
    o.fec_overhead = 0.0;
    o
}

/// A pristine archive split into its regions.
struct Parts {
    head: Head,
    frames: Vec<u8>,
    hashes: Vec<u8>,
    head_bytes: Vec<u8>,
    /// (offset in the frames region, total length) of each frame.
    frame_spans: Vec<Range<usize>>,
}

fn parts(path: &Path) -> Parts {
    let a = ArchiveFile::open(path).unwrap();
    let raw = fs::read(path).unwrap();
    let l = a.layout;
    let frames = raw[l.data_offset() as usize..l.hash_offset() as usize].to_vec();
    let hashes = raw[l.hash_offset() as usize..l.head_offset() as usize].to_vec();
    let head_bytes =
        raw[l.head_offset() as usize..(l.head_offset() + l.head_len) as usize].to_vec();
    assert_eq!(head_bytes, a.head_bytes);
    let mut frame_spans = Vec::new();
    let mut off = 0;
    while off < frames.len() {
        let fh = decode_header(&frames, off);
        assert_eq!(fh.index, frame_spans.len() as u64);
        let end = off + FRAME_HEADER_LEN + fh.stored_len as usize;
        frame_spans.push(off..end);
        off = end;
    }
    Parts {
        head: a.head,
        frames,
        hashes,
        head_bytes,
        frame_spans,
    }
}

fn decode_header(frames: &[u8], off: usize) -> FrameHeader {
    FrameHeader::decode(&frames[off..off + FRAME_HEADER_LEN].try_into().unwrap()).unwrap()
}

fn write_archive(path: &Path, frames: &[u8], hashes: &[u8], head_bytes: &[u8]) {
    let mut f = Vec::new();
    f.extend_from_slice(&preamble_bytes());
    f.extend_from_slice(frames);
    f.extend_from_slice(hashes);
    f.extend_from_slice(head_bytes);
    f.extend_from_slice(&tail_bytes(head_bytes.len() as u64));
    fs::write(path, f).unwrap();
}

/// Rebuild the manifest over `frames`, let `edit` change the head, sign with `id`, write.
fn forge(
    path: &Path,
    head: &Head,
    frames: &[u8],
    id: &Identity,
    edit: impl FnOnce(&mut Head, &mut Vec<u8>),
) {
    let mut tree = TreeBuilder::new(&head.archive_id, head.symbol_size, head.leaf_hash);
    tree.update(frames);
    let (mut hashes, block_hashes) = tree.finish();
    let mut h = head.clone();
    h.block_hashes = block_hashes;
    h.data_len = frames.len() as u64;
    edit(&mut h, &mut hashes);
    h.sign(id);
    write_archive(path, frames, &hashes, &h.encode());
}

fn swap_ranges(buf: &mut [u8], a: Range<usize>, b: Range<usize>) {
    assert_eq!(a.len(), b.len());
    assert!(a.end <= b.start);
    let (lo, hi) = buf.split_at_mut(b.start);
    lo[a].swap_with_slice(&mut hi[..b.len()]);
}

/// First serial whose data packet differs between two frames regions.
fn first_diff_serial(a: &[u8], b: &[u8]) -> u64 {
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
    (i / SYM as usize) as u64
}

fn assert_msg(e: &ArchiveError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not contain {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bit-flip sweep
// ---------------------------------------------------------------------------------------------

fn sweep(env: &Env, r: &PackReport) {
    let raw = fs::read(&r.path).unwrap();
    let a = ArchiveFile::open(&r.path).unwrap();
    let l = a.layout;
    let len = raw.len() as u64;
    let (data, hash, head, tail) = (
        l.data_offset(),
        l.hash_offset(),
        l.head_offset(),
        l.head_offset() + l.head_len,
    );
    assert_eq!(tail + archive::TAIL_LEN, len);
    let s = l.symbol_size;
    let k = r.head.block_symbols as u64;
    let n = r.head.n_blocks();
    let sig_start = tail - 64;
    let hashes_start = sig_start - 32 * n;
    let key_start = hashes_start - 32;
    let key = env.key(r);

    // Every byte of the small regions, every 97th elsewhere, and every region boundary.
    let mut offsets: Vec<u64> = (0..data).chain(head..len).collect();
    offsets.extend((0..len).step_by(97));
    for b in [data, hash, head, tail, key_start, hashes_start, sig_start] {
        offsets.extend([b.saturating_sub(1), b, b + 1]);
    }
    for span in parts(&r.path).frame_spans {
        offsets.extend([data + span.start as u64, data + span.end as u64 - 1]);
    }
    offsets.sort_unstable();
    offsets.dedup();
    offsets.retain(|&o| o < len);
    assert!(offsets.len() > 300, "{}", offsets.len());

    let path = env.forged_path(&format!("flip-{}", r.head.title));
    let mut accepted = Vec::new();
    for &off in &offsets {
        let mut t = raw.clone();
        t[off as usize] ^= 1 << (off % 8);
        fs::write(&path, &t).unwrap();
        let e = match env.try_unpack(&path, key.as_ref()) {
            Ok(()) => {
                fs::remove_file(env.out()).unwrap();
                accepted.push(off);
                continue;
            }
            Err(e) => e,
        };
        // `verify` (no key) must refuse it as well.
        let v = ArchiveFile::open(&path).and_then(|a| archive::verify(&a, &env.trusted));
        assert!(v.is_err(), "verify accepted a flip at {off}");

        let ctx = format!("flip at offset {off}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{ctx}");
        if off < 8 {
            assert!(matches!(e, ArchiveError::NotArchive { .. }), "{ctx}");
            assert!(msg.contains("bad magic"), "{ctx}");
        } else if off < data {
            // Known unchecked bytes; if they are refused some day, any structural error is fine.
            assert!(
                matches!(
                    e,
                    ArchiveError::NotArchive { .. } | ArchiveError::Head { .. }
                ),
                "{ctx}"
            );
        } else if off < hash {
            let serial = (off - data) / s;
            match e {
                ArchiveError::Packet {
                    serial: got,
                    block,
                    symbol,
                    offset,
                    ..
                } => {
                    assert_eq!(
                        (got, block, symbol),
                        (serial, serial / k, serial % k),
                        "{ctx}"
                    );
                    assert_eq!(offset, data + serial * s, "{ctx}");
                }
                _ => panic!("expected Packet: {ctx}"),
            }
            assert!(msg.contains(&format!("data packet {serial} ")), "{ctx}");
            assert!(msg.contains(&format!("block {}", serial / k)), "{ctx}");
        } else if off < head {
            let block = (off - hash) / s;
            match e {
                ArchiveError::HashPacket {
                    block: got, offset, ..
                } => assert_eq!((got, offset), (block, hash + block * s), "{ctx}"),
                _ => panic!("expected HashPacket: {ctx}"),
            }
            assert!(
                msg.contains(&format!("hash packet of block {block} ")),
                "{ctx}"
            );
        } else if off >= sig_start && off < tail {
            assert!(matches!(e, ArchiveError::Signature { .. }), "{ctx}");
            assert!(msg.contains("signature does not verify"), "{ctx}");
        } else if off >= hashes_start && off < sig_start {
            // A block hash in the signed head.
            assert!(matches!(e, ArchiveError::Signature { .. }), "{ctx}");
            assert!(msg.contains("signature"), "{ctx}");
        } else if off >= key_start && off < hashes_start {
            assert!(matches!(e, ArchiveError::ForeignServer { .. }), "{ctx}");
            assert!(msg.contains("signed by server key"), "{ctx}");
        } else if off < tail {
            // Other head fields: undecodable, inconsistent with the file, or unsigned.
            match e {
                ArchiveError::Head { .. } => assert!(msg.contains("bad archive head"), "{ctx}"),
                ArchiveError::NotArchive { .. } => {
                    assert!(msg.contains("not an mcast archive"), "{ctx}")
                }
                ArchiveError::Signature { .. } => assert!(msg.contains("signature"), "{ctx}"),
                _ => panic!("unexpected error for a head flip: {ctx}"),
            }
        } else if off < len - 8 {
            // Tail: head length.
            assert!(
                matches!(
                    e,
                    ArchiveError::NotArchive { .. } | ArchiveError::Head { .. }
                ),
                "{ctx}"
            );
        } else {
            assert!(matches!(e, ArchiveError::NotArchive { .. }), "{ctx}");
            assert!(msg.contains("bad tail magic"), "{ctx}");
        }
    }
    assert!(
        accepted.is_empty(),
        "bit flips accepted at offsets {accepted:?}"
    );
    // The pristine archive still unpacks.
    env.try_unpack(&r.path, key.as_ref()).unwrap();
    fs::remove_file(env.out()).unwrap();
}

#[test]
fn bit_flips_anywhere_are_refused() {
    let env = Env::new();
    let data = random_bytes(5 * FS + 1000, 1);
    let mut o = opts("sweep-aes", Cipher::Aes256Gcm, CompressMode::None);
    o.watermark = Some("owner-7".into());
    sweep(&env, &env.pack(&data, &o));

    // An advert has no AEAD: the manifest alone must catch every flip in its frames.
    let mut text = Vec::new();
    while text.len() < 3 * FS + 77 {
        text.extend_from_slice(b"advert text, compressible. ");
    }
    let mut o = opts("sweep-advert", Cipher::ChaCha20Poly1305, CompressMode::Zstd);
    o.advert = true;
    sweep(&env, &env.pack(&text, &o));
}

#[test]
fn preamble_version_and_padding_are_checked() {
    let env = Env::new();
    let r = env.pack(
        &random_bytes(FS, 2),
        &opts("pre", Cipher::Aes256Gcm, CompressMode::None),
    );
    let raw = fs::read(&r.path).unwrap();
    let key = env.key(&r);
    let path = env.forged_path("pre");
    let mut accepted = Vec::new();
    for off in 8..16u64 {
        let mut t = raw.clone();
        t[off as usize] ^= 0x80;
        fs::write(&path, &t).unwrap();
        if env.try_unpack(&path, key.as_ref()).is_ok() {
            fs::remove_file(env.out()).unwrap();
            accepted.push(off);
        }
    }
    assert!(
        accepted.is_empty(),
        "preamble bytes {accepted:?} can be changed and the archive still unpacks"
    );
}

#[test]
fn truncated_extended_and_foreign_files_are_not_archives() {
    let env = Env::new();
    let r = env.pack(
        &random_bytes(2 * FS, 3),
        &opts("trunc", Cipher::Aes256Gcm, CompressMode::None),
    );
    let raw = fs::read(&r.path).unwrap();
    let key = env.key(&r);
    let path = env.forged_path("trunc");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "too short"),
        ("short", raw[..20].to_vec(), "too short"),
        ("cut-1", raw[..raw.len() - 1].to_vec(), "tail magic"),
        ("cut-half", raw[..raw.len() / 2].to_vec(), "tail magic"),
        (
            "extended",
            [raw.as_slice(), b"x".as_slice()].concat(),
            "tail magic",
        ),
        (
            "extended-tail",
            [raw.as_slice(), &tail_bytes(1 << 40)].concat(),
            "head length out of range",
        ),
        (
            "text",
            b"just some text file that is long enough".to_vec(),
            "bad magic",
        ),
    ];
    for (name, bytes, why) in cases {
        fs::write(&path, &bytes).unwrap();
        let e = env.refused(&path, key.as_ref());
        assert!(
            matches!(e, ArchiveError::NotArchive { .. }),
            "{name}: {e:?}"
        );
        assert_msg(&e, &["not an mcast archive", why]);
    }
    // A tail that claims an empty head: the head does not decode.
    fs::write(&path, [raw.as_slice(), &tail_bytes(0)].concat()).unwrap();
    let e = env.refused(&path, key.as_ref());
    assert!(matches!(e, ArchiveError::Head { .. }), "{e:?}");
    assert_msg(&e, &["bad archive head", "truncated"]);

    // A gap in the middle (a block's worth of bytes cut out, tail intact).
    let mut gap = raw.clone();
    gap.drain(100..100 + SYM as usize);
    fs::write(&path, &gap).unwrap();
    let e = env.refused(&path, key.as_ref());
    assert!(matches!(e, ArchiveError::NotArchive { .. }), "{e:?}");
    assert_msg(&e, &["head describes"]);
}

// ---------------------------------------------------------------------------------------------
// Frames swapped, moved, relabelled
// ---------------------------------------------------------------------------------------------

fn five_frame_archive(env: &Env, title: &str, seed: u64) -> (PackReport, Vec<u8>) {
    let data = random_bytes(5 * FS, seed);
    let r = env.pack(&data, &opts(title, Cipher::Aes256Gcm, CompressMode::None));
    (r, data)
}

#[test]
fn swapped_frames_are_refused_by_the_manifest_and_by_frame_order() {
    let env = Env::new();
    let (r, data) = five_frame_archive(&env, "swap", 4);
    let key = env.key(&r);
    let p = parts(&r.path);
    assert_eq!(p.frame_spans.len(), 5);
    let (f1, f3) = (p.frame_spans[1].clone(), p.frame_spans[3].clone());
    assert_eq!(f1.len(), f3.len(), "frames must be the same size");
    let mut swapped = p.frames.clone();
    swap_ranges(&mut swapped, f1.clone(), f3.clone());

    // Layer 3: the data packets no longer match the signed manifest.
    let path = env.forged_path("swap");
    write_archive(&path, &swapped, &p.hashes, &p.head_bytes);
    let e = env.refused(&path, key.as_ref());
    let serial = first_diff_serial(&p.frames, &swapped);
    assert!((f1.start as u64 / SYM as u64..=f1.end as u64 / SYM as u64).contains(&serial));
    match e {
        ArchiveError::Packet { serial: got, .. } => assert_eq!(got, serial),
        ref other => panic!("expected Packet, got {other:?}"),
    }
    assert_msg(&e, &[&format!("data packet {serial} "), "manifest hash"]);
    // verify, which needs no key, catches it too.
    let a = ArchiveFile::open(&path).unwrap();
    assert!(matches!(
        archive::verify(&a, &env.trusted),
        Err(ArchiveError::Packet { .. })
    ));

    // Layer 5: with a manifest rebuilt for the swapped frames, the frame headers give it away.
    let path = env.forged_path("swap-resigned");
    forge(&path, &p.head, &swapped, &env.identity, |_, _| {});
    let a = ArchiveFile::open(&path).unwrap();
    archive::verify(&a, &env.trusted).expect("the forged manifest is consistent");
    let e = env.refused(&path, key.as_ref());
    match e {
        ArchiveError::FrameOrder {
            expected, found, ..
        } => assert_eq!((expected, found), (1, 3)),
        ref other => panic!("expected FrameOrder, got {other:?}"),
    }
    assert_msg(&e, &["frame 1: found frame 3", "swapped or moved"]);

    // ...and with the header indices patched to match their new places, the AEAD does.
    let mut relabelled = swapped.clone();
    relabelled[f1.start + 4..f1.start + 12].copy_from_slice(&1u64.to_le_bytes());
    relabelled[f3.start + 4..f3.start + 12].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(decode_header(&relabelled, f1.start).index, 1);
    let path = env.forged_path("swap-relabelled");
    forge(&path, &p.head, &relabelled, &env.identity, |_, _| {});
    let e = env.refused(&path, key.as_ref());
    assert!(
        matches!(e, ArchiveError::FrameAuth { index: 1, .. }),
        "{e:?}"
    );
    assert_msg(&e, &["frame 1: authentication failed"]);

    // Control: re-signing the untouched frames region gives a working archive, so the
    // refusals above are due to the tampering and not to the forging helper.
    let path = env.forged_path("control");
    forge(&path, &p.head, &p.frames, &env.identity, |_, _| {});
    env.try_unpack(&path, key.as_ref()).unwrap();
    assert_eq!(fs::read(env.out()).unwrap(), data);
    fs::remove_file(env.out()).unwrap();
}

#[test]
fn frame_moved_from_another_title_fails_authentication() {
    let env = Env::new();
    let (ra, _) = five_frame_archive(&env, "title-a", 5);
    let (rb, _) = five_frame_archive(&env, "title-b", 6);
    let key_a = env.key(&ra);
    let pa = parts(&ra.path);
    let pb = parts(&rb.path);
    let span = pa.frame_spans[2].clone();
    assert_eq!(span, pb.frame_spans[2], "same geometry");
    let mut moved = pa.frames.clone();
    moved[span.clone()].copy_from_slice(&pb.frames[span.clone()]);
    // B's frame 2 has index 2 in its header, like the frame it replaces.
    assert_eq!(decode_header(&moved, span.start).index, 2);

    // Without re-signing: the manifest catches it.
    let path = env.forged_path("moved");
    write_archive(&path, &moved, &pa.hashes, &pa.head_bytes);
    let e = env.refused(&path, key_a.as_ref());
    assert!(matches!(e, ArchiveError::Packet { .. }), "{e:?}");
    assert_msg(&e, &["data packet"]);

    // Re-signed: the AEAD binds the frame to its archive and title.
    let path = env.forged_path("moved-resigned");
    forge(&path, &pa.head, &moved, &env.identity, |_, _| {});
    let e = env.refused(&path, key_a.as_ref());
    assert!(
        matches!(e, ArchiveError::FrameAuth { index: 2, .. }),
        "{e:?}"
    );
    assert_msg(
        &e,
        &["frame 2: authentication failed", "another archive or title"],
    );

    // Relabelling the whole of B's frames as title A (head re-signed) fails at frame 0.
    let path = env.forged_path("relabelled-title");
    forge(&path, &pb.head, &pb.frames, &env.identity, |h, _| {
        h.title = "title-a".into();
    });
    let e = env.refused(&path, env.key(&rb).as_ref());
    assert!(
        matches!(e, ArchiveError::FrameAuth { index: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn wrong_keys_are_refused_before_any_frame() {
    let env = Env::new();
    let (ra, data) = five_frame_archive(&env, "keyed-a", 7);
    let (rb, _) = five_frame_archive(&env, "keyed-b", 8);
    let ka = env.key(&ra).unwrap();
    let kb = env.key(&rb).unwrap();
    for (what, key) in [
        ("random", Some(MasterKey::generate())),
        ("other title's", Some(kb.clone())),
        ("no", None),
    ] {
        let e = env.refused(&ra.path, key.as_ref());
        match &e {
            ArchiveError::WrongKey { title, .. } => assert_eq!(title, "keyed-a", "{what}"),
            other => panic!("{what} key: expected WrongKey, got {other:?}"),
        }
        assert_msg(
            &e,
            &["\"keyed-a\"", "not the key this archive was sealed with"],
        );
    }
    // Via the key store: title A's key file now holds title B's key.
    env.ks
        .replace_title_key("keyed-a", &ra.head.archive_id, &kb)
        .unwrap();
    let e = env.refused(&ra.path, env.key(&ra).as_ref());
    assert!(matches!(e, ArchiveError::WrongKey { .. }), "{e:?}");

    // A pre-existing file at the output path survives a refused unpack untouched.
    fs::write(env.out(), b"previous contents").unwrap();
    let a = ArchiveFile::open(&ra.path).unwrap();
    let e = unpack(&a, &env.trusted, Some(&kb), &env.out(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, ArchiveError::WrongKey { .. }));
    assert_eq!(fs::read(env.out()).unwrap(), b"previous contents");
    fs::remove_file(env.out()).unwrap();

    // Once the key is back, it unpacks.
    env.ks
        .replace_title_key("keyed-a", &ra.head.archive_id, &MasterKey::generate())
        .unwrap();
    assert!(matches!(
        env.refused(&ra.path, env.key(&ra).as_ref()),
        ArchiveError::WrongKey { .. }
    ));
    env.ks
        .replace_title_key("keyed-a", &ra.head.archive_id, &ka)
        .unwrap();
    env.try_unpack(&ra.path, env.key(&ra).as_ref()).unwrap();
    assert_eq!(fs::read(env.out()).unwrap(), data);
}

// ---------------------------------------------------------------------------------------------
// Manifest and head
// ---------------------------------------------------------------------------------------------

#[test]
fn modified_manifest_is_refused() {
    let env = Env::new();
    let (r, _) = five_frame_archive(&env, "manifest", 9);
    let key = env.key(&r);
    let p = parts(&r.path);
    let n = p.head.n_blocks() as usize;
    assert!(n >= 3, "{n}");
    let sym = SYM as usize;

    // A byte of hash packet 2 (a leaf hash of its block).
    let mut hashes = p.hashes.clone();
    hashes[2 * sym + 40] ^= 0x04;
    let path = env.forged_path("hash-region");
    write_archive(&path, &p.frames, &hashes, &p.head_bytes);
    let e = env.refused(&path, key.as_ref());
    assert!(
        matches!(e, ArchiveError::HashPacket { block: 2, .. }),
        "{e:?}"
    );
    assert_msg(&e, &["manifest: hash packet of block 2", "signed head"]);

    // The zero padding of the last hash packet is covered as well.
    let mut hashes = p.hashes.clone();
    let last = hashes.len() - 1;
    assert_eq!(hashes[last], 0, "last hash packet is padded");
    hashes[last] = 1;
    write_archive(&path, &p.frames, &hashes, &p.head_bytes);
    let e = env.refused(&path, key.as_ref());
    assert!(
        matches!(e, ArchiveError::HashPacket { block, .. } if block == n as u64 - 1),
        "{e:?}"
    );

    // A block hash in the head: the signature no longer verifies.
    let mut head_bytes = p.head_bytes.clone();
    let at = head_bytes.len() - 64 - 32 * n + 32 + 5; // block_hashes[1][5]
    head_bytes[at] ^= 0x20;
    let path = env.forged_path("head-block-hash");
    write_archive(&path, &p.frames, &p.hashes, &head_bytes);
    let e = env.refused(&path, key.as_ref());
    assert!(matches!(e, ArchiveError::Signature { .. }), "{e:?}");
    assert_msg(&e, &["manifest signature does not verify"]);

    // Re-signed with a wrong block hash: the (genuine) hash packet no longer matches it.
    let path = env.forged_path("head-block-hash-resigned");
    forge(&path, &p.head, &p.frames, &env.identity, |h, _| {
        h.block_hashes[1][5] ^= 0x20;
    });
    let e = env.refused(&path, key.as_ref());
    assert!(
        matches!(e, ArchiveError::HashPacket { block: 1, .. }),
        "{e:?}"
    );
    assert_msg(&e, &["hash packet of block 1"]);

    // Re-signed with a consistently altered hash packet: the data packet it lists is refused.
    let path = env.forged_path("leaf-resigned");
    let tk = TreeKeys::new(&p.head.archive_id, p.head.leaf_hash);
    let k = p.head.block_symbols as usize;
    forge(&path, &p.head, &p.frames, &env.identity, |h, hashes| {
        hashes[sym + 3 * 32] ^= 1; // leaf of block 1, symbol 3
        h.block_hashes[1] = tk.block(&hashes[sym..2 * sym]);
    });
    let e = env.refused(&path, key.as_ref());
    let serial = (k + 3) as u64;
    assert!(
        matches!(e, ArchiveError::Packet { serial: s, block: 1, symbol: 3, .. } if s == serial),
        "{e:?}"
    );
    assert_msg(&e, &[&format!("data packet {serial} (block 1, symbol 3")]);
}

#[test]
fn archives_of_another_server_are_foreign() {
    let env = Env::new();
    let (r, _) = five_frame_archive(&env, "foreign", 10);
    let key = env.key(&r);
    let p = parts(&r.path);
    let other = Identity::generate();

    // Signed by another identity: refused before any packet is read.
    let path = env.forged_path("other-server");
    forge(&path, &p.head, &p.frames, &other, |_, _| {});
    let a = ArchiveFile::open(&path).unwrap();
    assert_eq!(a.head.server_key, other.public());
    let e = env.refused(&path, key.as_ref());
    assert!(matches!(e, ArchiveError::ForeignServer { .. }), "{e:?}");
    assert_msg(
        &e,
        &[
            "signed by server key",
            &other.public().fingerprint(),
            &env.trusted.fingerprint(),
        ],
    );
    assert!(matches!(
        archive::verify(&a, &env.trusted),
        Err(ArchiveError::ForeignServer { .. })
    ));

    // Claims our server key but is signed by another: bad signature.
    let path = env.forged_path("claims-ours");
    forge(&path, &p.head, &p.frames, &other, |_, _| {});
    let mut raw = fs::read(&path).unwrap();
    let a = ArchiveFile::open(&path).unwrap();
    let key_at = (a.layout.head_offset() + a.layout.head_len) as usize
        - 64
        - 32 * p.head.n_blocks() as usize
        - 32;
    raw[key_at..key_at + 32].copy_from_slice(&env.trusted.0);
    fs::write(&path, &raw).unwrap();
    let e = env.refused(&path, key.as_ref());
    assert!(matches!(e, ArchiveError::Signature { .. }), "{e:?}");

    // The genuine archive, checked against another trusted identity.
    let a = ArchiveFile::open(&r.path).unwrap();
    let e = unpack(&a, &other.public(), key.as_ref(), &env.out(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, ArchiveError::ForeignServer { .. }), "{e:?}");
    env.assert_out_clean();
}

// ---------------------------------------------------------------------------------------------
// Inner layers: frame headers and the plaintext hash (re-signed forgeries)
// ---------------------------------------------------------------------------------------------

#[test]
fn forged_frame_structure_and_plaintext_hash_are_refused() {
    let env = Env::new();
    let (r, _) = five_frame_archive(&env, "inner", 11);
    let key = env.key(&r);
    let p = parts(&r.path);
    let f2 = p.frame_spans[2].clone();

    let check = |name: &str, frames: &[u8], edit: &dyn Fn(&mut Head), want: &[&str]| {
        let path = env.forged_path(name);
        forge(&path, &p.head, frames, &env.identity, |h, _| edit(h));
        let e = env.refused(&path, key.as_ref());
        assert_msg(&e, want);
        e
    };

    // Plaintext hash in the head differs: every frame opens, the final check fails.
    let e = check(
        "plain-hash",
        &p.frames,
        &|h| h.plain_hash[0] ^= 1,
        &["plaintext does not match"],
    );
    assert!(matches!(e, ArchiveError::PlainHash { .. }), "{e:?}");

    // Frame 2 claims a different plaintext length.
    let mut f = p.frames.clone();
    f[f2.start + 12..f2.start + 16].copy_from_slice(&100u32.to_le_bytes());
    let e = check("plain-len", &f, &|_| {}, &["frame 2: plain length 100"]);
    assert!(matches!(e, ArchiveError::Frame { index: 2, .. }), "{e:?}");

    // Frame 2 has a bad magic / unknown flags.
    let mut f = p.frames.clone();
    f[f2.start] = b'X';
    let e = check("frame-magic", &f, &|_| {}, &["frame 2: bad frame magic"]);
    assert!(matches!(e, ArchiveError::Frame { index: 2, .. }), "{e:?}");
    let mut f = p.frames.clone();
    f[f2.start + 3] = 0x80;
    check(
        "frame-flags",
        &f,
        &|_| {},
        &["frame 2: unknown frame flags"],
    );

    // Frame 2 claims a stored length beyond the region.
    let mut f = p.frames.clone();
    f[f2.start + 16..f2.start + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    check("stored-len", &f, &|_| {}, &["frame 2: stored length"]);

    // Payload bit flipped in frame 2 (manifest rebuilt): the AEAD refuses it.
    let mut f = p.frames.clone();
    f[f2.start + FRAME_HEADER_LEN + 10] ^= 1;
    let e = check("payload", &f, &|_| {}, &["frame 2: authentication failed"]);
    assert!(
        matches!(e, ArchiveError::FrameAuth { index: 2, .. }),
        "{e:?}"
    );

    // Bytes after the last frame.
    let mut f = p.frames.clone();
    f.extend_from_slice(&[0u8; 40]);
    check(
        "trailing",
        &f,
        &|_| {},
        &["frame 5: bytes after the last frame"],
    );

    // Frames region ends inside the last frame's payload, or inside its header.
    let f = &p.frames[..p.frames.len() - 10];
    check("cut-payload", f, &|_| {}, &["frame 4: stored length"]);
    let f = &p.frames[..p.frame_spans[4].start + 20];
    let e = check(
        "cut-header",
        f,
        &|_| {},
        &["frame 4: frames region ends inside a frame"],
    );
    assert!(matches!(e, ArchiveError::Frame { index: 4, .. }), "{e:?}");

    // One frame dropped (plain_len and frame_count still claim five).
    let mut f = p.frames.clone();
    f.drain(p.frame_spans[4].clone());
    let e = check("dropped", &f, &|_| {}, &["frame 4"]);
    assert!(matches!(e, ArchiveError::Frame { index: 4, .. }), "{e:?}");
}

#[test]
fn fec_repair_symbols_and_their_hash_packets_are_verified() {
    let env = Env::new();
    let data = random_bytes(40 * FS + 123, 9);
    let mut o = opts("fec", Cipher::Aes256Gcm, CompressMode::None);
    o.fec_overhead = 0.1;
    o.fec_block = 64;
    let r = env.pack(&data, &o);
    assert_eq!(r.head.version(), 3);
    assert!(r.head.repair_packets() > 0);
    // A version-2 head (one development landing; its repair hash packets listed only the
    // stored symbols) is refused with what to do.
    let mut v2 = r.head.encode();
    v2[4] = 2;
    let e = mcast::archive::Head::decode(&v2).unwrap_err();
    assert!(e.to_string().contains("repack"), "{e}");
    let a = ArchiveFile::open(&r.path).unwrap();
    archive::verify(&a, &env.trusted).unwrap();
    let l = a.layout;
    let raw = fs::read(&r.path).unwrap();
    let path = env.forged_path("fec-flip");
    let s = l.symbol_size;
    // A flipped byte in repair symbol 0, 7 and the last: `verify` names the symbol.
    for idx in [0, 7, r.head.repair_packets() - 1] {
        let mut t = raw.clone();
        t[(l.repair_offset() + idx * s + 3) as usize] ^= 0x20;
        fs::write(&path, &t).unwrap();
        let e = archive::verify(&ArchiveFile::open(&path).unwrap(), &env.trusted).unwrap_err();
        assert!(
            matches!(e, ArchiveError::Repair { index, .. } if index == idx),
            "repair {idx}: {e}"
        );
        // The data does not depend on repair symbols: it still unpacks.
        env.try_unpack(&path, env.key(&r).as_ref()).unwrap();
        assert_eq!(fs::read(env.out()).unwrap(), data);
        fs::remove_file(env.out()).unwrap();
    }
    // A repair symbols' hash packet: refused against the signed head.
    let b = r.head.n_blocks();
    let mut t = raw.clone();
    t[(l.hash_offset() + b * s + 5) as usize] ^= 1;
    fs::write(&path, &t).unwrap();
    let e = archive::verify(&ArchiveFile::open(&path).unwrap(), &env.trusted).unwrap_err();
    assert!(
        matches!(e, ArchiveError::HashPacket { block, .. } if block == b),
        "{e}"
    );
}

#[test]
fn archives_without_fec_keep_the_version_1_head() {
    let env = Env::new();
    let data = random_bytes(3 * FS, 10);
    let mut o = opts("plain", Cipher::Aes256Gcm, CompressMode::None);
    o.fec_overhead = 0.0;
    let r = env.pack(&data, &o);
    assert_eq!(r.head.version(), 1);
    assert_eq!(r.head.repair_packets(), 0);
    let a = ArchiveFile::open(&r.path).unwrap();
    assert_eq!(a.head_bytes[4], 1, "head version byte");
    archive::verify(&a, &env.trusted).unwrap();
}
