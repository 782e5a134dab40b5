//! Round trips through the archive library: `pack` then `unpack` must restore the input byte
//! for byte, for every cipher, compression mode, frame/symbol geometry and edge size, and keys
//! of one title must never open another's frames.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use mcast::archive::frame::{frame_aad, FrameHeader, FRAME_HEADER_LEN};
use mcast::archive::{
    self, pack, unpack, ArchiveError, ArchiveFile, CompressMode, PackOptions, PackReport,
};
use mcast_keys::{frame as aead, Cipher, KeyError, KeyStore, MasterKey, PublicIdentity};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// xorshift64*: a fast deterministic byte stream (not for cryptography, only test data).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Highly compressible text-like bytes.
fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"carousel ",
        b"multicast ",
        b"frame ",
        b"archive ",
        b"manifest ",
        b"the ",
        b"packet ",
        b"title\n",
    ];
    let mut rng = XorShift::new(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[(rng.next_u64() % 8) as usize]);
    }
    v.truncate(len);
    v
}

#[derive(Clone, Copy, Debug)]
enum Content {
    Random,
    Text,
    Zeros,
}

fn content(kind: Content, len: usize, seed: u64) -> Vec<u8> {
    match kind {
        Content::Random => random_bytes(len, seed),
        Content::Text => text_bytes(len, seed),
        Content::Zeros => vec![0u8; len],
    }
}

/// A temp dir with a key store (with a server identity), an archive dir and an output dir.
struct Env {
    dir: TempDir,
    ks: KeyStore,
    trusted: PublicIdentity,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("mcast-rt-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let ks = KeyStore::open(dir.path().join("keys")).unwrap();
        let trusted = ks.create_identity(false).unwrap().public();
        fs::create_dir_all(dir.path().join("in")).unwrap();
        fs::create_dir_all(dir.path().join("out")).unwrap();
        Env { dir, ks, trusted }
    }

    fn archives(&self) -> PathBuf {
        self.dir.path().join("archives")
    }

    fn out_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn write_input(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join("in").join(name);
        fs::write(&p, data).unwrap();
        p
    }

    fn pack_bytes(&self, data: &[u8], opts: &PackOptions) -> PackReport {
        let input = self.write_input(&format!("{}.raw", opts.title), data);
        let mut last = 0u64;
        let r = pack(&input, &self.archives(), &self.ks, opts, &mut |n| {
            assert!(n >= last, "progress went backwards");
            last = n;
        })
        .unwrap_or_else(|e| panic!("pack {opts:?}: {e}"));
        assert_eq!(
            last,
            data.len() as u64,
            "progress must end at the input size"
        );
        r
    }

    fn key_of(&self, r: &PackReport) -> Option<MasterKey> {
        if r.head.advert {
            None
        } else {
            Some(
                self.ks
                    .title_key(&r.head.title, &r.head.archive_id)
                    .unwrap(),
            )
        }
    }

    fn unpack_to(
        &self,
        r: &PackReport,
        key: Option<&MasterKey>,
        name: &str,
    ) -> Result<Vec<u8>, ArchiveError> {
        let a = ArchiveFile::open(&r.path)?;
        let out = self.out_dir().join(name);
        unpack(&a, &self.trusted, key, &out, &mut |_| {})?;
        let bytes = fs::read(&out).unwrap();
        fs::remove_file(&out).unwrap();
        Ok(bytes)
    }
}

fn opts(title: &str, cipher: Cipher, compress: CompressMode, frame: u32, sym: u32) -> PackOptions {
    let mut o = PackOptions::new(title);
    o.cipher = cipher;
    o.compress = compress;
    o.frame_size = frame;
    o.symbol_size = sym;
    o
}

/// Pack, check the report against the head on disk, verify, unpack, compare.
fn assert_round_trip(env: &Env, data: &[u8], o: &PackOptions) -> PackReport {
    let r = env.pack_bytes(data, o);
    let h = &r.head;
    assert_eq!(h.title, o.title);
    assert_eq!(h.plain_len, data.len() as u64);
    match env.key_of(&r) {
        // Encrypted: keyed, so the public head confirms nothing to those without the key.
        Some(k) => {
            assert!(h.plain_hash_keyed);
            assert_ne!(h.plain_hash, *blake3::hash(data).as_bytes());
            let mut want = k.plain_hasher(&h.archive_id);
            want.update(data);
            assert_eq!(h.plain_hash, *want.finalize().as_bytes());
        }
        None => {
            assert!(!h.plain_hash_keyed);
            assert_eq!(h.plain_hash, *blake3::hash(data).as_bytes());
        }
    }
    assert_eq!(h.frame_size, o.frame_size);
    assert_eq!(h.symbol_size, o.symbol_size);
    assert_eq!(h.block_symbols, o.symbol_size / 32);
    assert_eq!(
        h.frame_count,
        (data.len() as u64).div_ceil(o.frame_size as u64)
    );
    assert_eq!(h.advert, o.advert);
    assert_eq!(
        h.cipher,
        if o.advert { Cipher::None } else { o.cipher },
        "cipher in head"
    );
    assert_eq!(h.watermark, o.watermark.clone().unwrap_or_default());
    assert_eq!(h.server_key, env.trusted);
    if o.advert {
        assert_eq!(h.key_id, [0; 16]);
    }

    let a = ArchiveFile::open(&r.path).unwrap();
    assert_eq!(&a.head, h, "head on disk differs from the pack report");
    assert_eq!(a.layout.file_len(), r.archive_len);
    assert_eq!(fs::metadata(&r.path).unwrap().len(), r.archive_len);
    archive::verify(&a, &env.trusted).unwrap();

    let key = env.key_of(&r);
    assert_eq!(key.is_some(), !o.advert, "adverts have no key");
    let out = env.unpack_to(&r, key.as_ref(), "restored").unwrap();
    assert!(
        out == data,
        "round trip differs for {o:?} len {}",
        data.len()
    );
    assert_no_stray_files(&env.out_dir());
    assert_no_stray_files(&env.archives());
    r
}

/// No temp files (`.name.pid.tmp`) left behind in `dir`.
fn assert_no_stray_files(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.') && !name.ends_with(".tmp"),
            "stray file {name} in {}",
            dir.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

const FS: usize = 4096;

fn edge_sizes() -> [usize; 6] {
    [0, 1, FS - 1, FS, FS + 1, 9 * FS + 1234]
}

#[test]
fn round_trip_every_cipher_compression_and_edge_size() {
    let env = Env::new();
    let mut n = 0;
    for (ci, cipher) in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305]
        .into_iter()
        .enumerate()
    {
        for (mi, mode) in [CompressMode::Auto, CompressMode::Zstd, CompressMode::None]
            .into_iter()
            .enumerate()
        {
            for watermark in [None, Some("studio-42/owner".to_string())] {
                for (si, size) in edge_sizes().into_iter().enumerate() {
                    let kind = if si % 2 == 0 {
                        Content::Text
                    } else {
                        Content::Random
                    };
                    let data = content(kind, size, (ci * 100 + mi * 10 + si) as u64);
                    let sym = if (si + mi) % 2 == 0 { 256 } else { 1280 };
                    let mut o = opts(&format!("t{n}"), cipher, mode, FS as u32, sym);
                    o.watermark = watermark.clone();
                    let r = assert_round_trip(&env, &data, &o);
                    if mode == CompressMode::None {
                        assert_eq!(r.compressed_frames, 0);
                        assert_eq!(r.head.compression, archive::Compression::None);
                    }
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 2 * 3 * 2 * 6);
}

#[test]
fn round_trip_adverts_need_no_key() {
    let env = Env::new();
    for (i, size) in edge_sizes().into_iter().enumerate() {
        for mode in [CompressMode::Auto, CompressMode::Zstd, CompressMode::None] {
            let data = content(Content::Text, size, i as u64);
            let mut o = opts(
                &format!("ad-{i}-{mode:?}"),
                Cipher::ChaCha20Poly1305,
                mode,
                FS as u32,
                512,
            );
            o.advert = true;
            o.watermark = Some("sponsor".into());
            let r = assert_round_trip(&env, &data, &o);
            // No key was filed for an advert.
            assert!(matches!(
                env.ks.title_key(&r.head.title, &r.head.archive_id),
                Err(KeyError::NoTitleKey { .. })
            ));
            // Advert payloads are stored in the clear (uncompressed frames are visible).
            if mode == CompressMode::None && size > 0 {
                let raw = fs::read(&r.path).unwrap();
                let start = archive::PREAMBLE_LEN as usize + FRAME_HEADER_LEN;
                let n = size.min(FS);
                assert_eq!(&raw[start..start + n], &data[..n]);
            }
            // A key passed for an advert is ignored.
            let out = env
                .unpack_to(&r, Some(&MasterKey::generate()), "advert-with-key")
                .unwrap();
            assert_eq!(out, data);
        }
    }
}

#[test]
fn advert_flag_overrides_cipher_and_encrypted_archives_hide_plaintext() {
    let env = Env::new();
    let data = content(Content::Text, 3 * FS, 7);
    let o = opts(
        "secret",
        Cipher::Aes256Gcm,
        CompressMode::None,
        FS as u32,
        256,
    );
    let r = assert_round_trip(&env, &data, &o);
    let raw = fs::read(&r.path).unwrap();
    // The first 64 plaintext bytes must not appear anywhere in the archive.
    assert!(!raw.windows(64).any(|w| w == &data[..64]));
    // Unpacking an encrypted archive without a key is refused as a wrong key.
    let e = env.unpack_to(&r, None, "nokey").unwrap_err();
    assert!(matches!(e, ArchiveError::WrongKey { .. }), "{e}");
    assert!(!env.out_dir().join("nokey").exists());
}

#[test]
fn tiny_frames_and_large_symbols() {
    let env = Env::new();
    // One byte per frame: 700 frames of 52 + 1 + 16 bytes.
    let data = random_bytes(700, 1);
    assert_round_trip(
        &env,
        &data,
        &opts(
            "one-byte-frames",
            Cipher::Aes256Gcm,
            CompressMode::Auto,
            1,
            256,
        ),
    );
    // Symbols larger than the whole archive and the largest symbol size.
    let data = random_bytes(10_000, 2);
    assert_round_trip(
        &env,
        &data,
        &opts(
            "big-symbols",
            Cipher::ChaCha20Poly1305,
            CompressMode::None,
            4096,
            65_504,
        ),
    );
    // Frames larger than the input.
    assert_round_trip(
        &env,
        &data,
        &opts(
            "big-frame",
            Cipher::Aes256Gcm,
            CompressMode::Zstd,
            1 << 20,
            4096,
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Compression policy
// ---------------------------------------------------------------------------------------------

/// `zstd` flag of every frame header, read from the archive's frames region.
fn frame_flags(r: &PackReport) -> Vec<bool> {
    let raw = fs::read(&r.path).unwrap();
    let mut off = archive::PREAMBLE_LEN as usize;
    let end = off + r.head.data_len as usize;
    let mut flags = Vec::new();
    while off < end {
        let hb: [u8; FRAME_HEADER_LEN] = raw[off..off + FRAME_HEADER_LEN].try_into().unwrap();
        let fh = FrameHeader::decode(&hb).unwrap();
        assert_eq!(fh.index, flags.len() as u64);
        flags.push(fh.zstd);
        off += FRAME_HEADER_LEN + fh.stored_len as usize;
    }
    assert_eq!(off, end);
    flags
}

#[test]
fn compressible_input_is_compressed_and_random_input_is_stored_raw() {
    let env = Env::new();
    let frame = 256 << 10;
    let text = text_bytes(1 << 20, 3);
    for mode in [CompressMode::Auto, CompressMode::Zstd] {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let r = assert_round_trip(
                &env,
                &text,
                &opts(
                    &format!("text-{mode:?}-{cipher:?}"),
                    cipher,
                    mode,
                    frame,
                    1280,
                ),
            );
            assert_eq!(r.head.compression, archive::Compression::Zstd);
            assert!(
                r.head.data_len < r.head.plain_len / 3,
                "{mode:?}: text should shrink a lot: {} -> {}",
                r.head.plain_len,
                r.head.data_len
            );
            assert_eq!(r.compressed_frames, 4);
            assert_eq!(frame_flags(&r), vec![true; 4]);
        }
    }
    // `none` stores the same text raw.
    let r = assert_round_trip(
        &env,
        &text,
        &opts(
            "text-none",
            Cipher::Aes256Gcm,
            CompressMode::None,
            frame,
            1280,
        ),
    );
    assert_eq!(r.compressed_frames, 0);
    assert_eq!(
        r.head.data_len,
        r.head.plain_len + 4 * (FRAME_HEADER_LEN as u64 + 16)
    );

    // Random input: `auto` (and even `zstd`, which keeps a frame raw when it grows) stores raw.
    let random = random_bytes(1 << 20, 4);
    for mode in [CompressMode::Auto, CompressMode::Zstd] {
        let r = assert_round_trip(
            &env,
            &random,
            &opts(
                &format!("random-{mode:?}"),
                Cipher::Aes256Gcm,
                mode,
                frame,
                1280,
            ),
        );
        assert_eq!(r.compressed_frames, 0, "{mode:?}");
        assert_eq!(frame_flags(&r), vec![false; 4]);
        assert_eq!(
            r.head.data_len,
            r.head.plain_len + 4 * (FRAME_HEADER_LEN as u64 + 16),
            "{mode:?}: random frames are stored raw plus header and tag"
        );
    }

    // Mixed: frames alternate text / random; only the text frames are compressed.
    let mut mixed = Vec::new();
    for i in 0..4u64 {
        if i % 2 == 0 {
            mixed.extend_from_slice(&text_bytes(frame as usize, i));
        } else {
            mixed.extend_from_slice(&random_bytes(frame as usize, i));
        }
    }
    let r = assert_round_trip(
        &env,
        &mixed,
        &opts(
            "mixed",
            Cipher::ChaCha20Poly1305,
            CompressMode::Auto,
            frame,
            1280,
        ),
    );
    assert_eq!(frame_flags(&r), vec![true, false, true, false]);
    assert_eq!(r.compressed_frames, 2);
}

// ---------------------------------------------------------------------------------------------
// Property test
// ---------------------------------------------------------------------------------------------

fn cipher_strategy() -> impl Strategy<Value = Cipher> {
    prop_oneof![Just(Cipher::Aes256Gcm), Just(Cipher::ChaCha20Poly1305)]
}

fn mode_strategy() -> impl Strategy<Value = CompressMode> {
    prop_oneof![
        Just(CompressMode::Auto),
        Just(CompressMode::Zstd),
        Just(CompressMode::None)
    ]
}

fn content_strategy() -> impl Strategy<Value = Content> {
    prop_oneof![
        Just(Content::Random),
        Just(Content::Text),
        Just(Content::Zeros)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        rng_seed: RngSeed::Fixed(0x6d63_6173_7421),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_round_trip_is_exact(
        size in 0usize..300_000,
        frame_size in prop_oneof![1u32..=4096, 4096u32..=200_000],
        symbol_size in (8u32..=128).prop_map(|k| k * 32),
        cipher in cipher_strategy(),
        mode in mode_strategy(),
        kind in content_strategy(),
        advert in proptest::bool::weighted(0.15),
        seed in any::<u64>(),
    ) {
        // Keep the frame count bounded so a case stays fast.
        let frame_size = frame_size.max((size / 20_000) as u32).max(1);
        let env = Env::new();
        let data = content(kind, size, seed);
        let mut o = opts("prop", cipher, mode, frame_size, symbol_size);
        o.advert = advert;
        if seed % 3 == 0 {
            o.watermark = Some(format!("wm-{seed:x}"));
        }
        assert_round_trip(&env, &data, &o);
    }
}

// ---------------------------------------------------------------------------------------------
// 1 GiB
// ---------------------------------------------------------------------------------------------

fn blake3_file(path: &Path) -> blake3::Hash {
    let mut f = fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

#[test]
fn one_gib_round_trip() {
    const GIB: u64 = 1 << 30;
    let dir = tempfile::Builder::new()
        .prefix("mcast-1gib-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let ks = KeyStore::open(dir.path().join("keys")).unwrap();
    let trusted = ks.create_identity(false).unwrap().public();

    // Input: 1 GiB of xorshift output, with a few compressible MiB so `auto` has work to do.
    let input = dir.path().join("big.raw");
    let mut hasher = blake3::Hasher::new();
    {
        let mut w = BufWriter::new(fs::File::create(&input).unwrap());
        let mut rng = XorShift::new(0x1_0000_0000);
        let mut buf = vec![0u8; 1 << 20];
        let text = text_bytes(1 << 20, 9);
        for i in 0..(GIB >> 20) {
            let chunk: &[u8] = if i % 128 == 5 {
                &text
            } else {
                rng.fill(&mut buf);
                &buf
            };
            hasher.update(chunk);
            w.write_all(chunk).unwrap();
        }
        w.flush().unwrap();
    }
    let want = hasher.finalize();
    assert_eq!(fs::metadata(&input).unwrap().len(), GIB);

    let mut o = PackOptions::new("one-gib");
    o.compress = CompressMode::Auto;
    let r = pack(&input, &dir.path().join("archives"), &ks, &o, &mut |_| {}).unwrap();
    assert_eq!(r.head.plain_len, GIB);
    assert!(r.head.plain_hash_keyed);
    let key = ks.title_key("one-gib", &r.head.archive_id).unwrap();
    let mut keyed = key.plain_hasher(&r.head.archive_id);
    keyed
        .update_reader(fs::File::open(&input).unwrap())
        .unwrap();
    assert_eq!(r.head.plain_hash, *keyed.finalize().as_bytes());
    assert_eq!(r.head.frame_count, 1024);
    assert_eq!(r.compressed_frames, 8, "the 8 text MiB are compressed");
    fs::remove_file(&input).unwrap();

    let a = ArchiveFile::open(&r.path).unwrap();
    let key = ks.title_key("one-gib", &a.head.archive_id).unwrap();
    let out = dir.path().join("big.out");
    let rep = unpack(&a, &trusted, Some(&key), &out, &mut |_| {}).unwrap();
    assert_eq!(rep.plain_len, GIB);
    assert_eq!(rep.frames, 1024);
    assert_eq!(fs::metadata(&out).unwrap().len(), GIB);
    assert_eq!(blake3_file(&out), want);
    drop(a);
    dir.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Keys: one title's key never opens another title
// ---------------------------------------------------------------------------------------------

#[test]
fn titles_in_one_key_store_have_independent_keys() {
    let env = Env::new();
    let data_a = random_bytes(5 * FS, 10);
    let data_b = random_bytes(5 * FS, 11);
    let data_c = text_bytes(3 * FS + 5, 12);
    let ra = assert_round_trip(
        &env,
        &data_a,
        &opts(
            "title-a",
            Cipher::Aes256Gcm,
            CompressMode::None,
            FS as u32,
            256,
        ),
    );
    let rb = assert_round_trip(
        &env,
        &data_b,
        &opts(
            "title-b",
            Cipher::Aes256Gcm,
            CompressMode::None,
            FS as u32,
            256,
        ),
    );
    let rc = assert_round_trip(
        &env,
        &data_c,
        &opts(
            "title-c",
            Cipher::ChaCha20Poly1305,
            CompressMode::Auto,
            FS as u32,
            1280,
        ),
    );
    let ka = env.key_of(&ra).unwrap();
    let kb = env.key_of(&rb).unwrap();
    let kc = env.key_of(&rc).unwrap();
    assert!(ka != kb && kb != kc && ka != kc, "keys must be distinct");
    assert_ne!(ra.head.archive_id, rb.head.archive_id);
    assert_ne!(ra.head.key_id, rb.head.key_id);

    // Keys are filed by (title, archive id): the lookup with another title's id finds nothing.
    assert!(matches!(
        env.ks.title_key("title-a", &rb.head.archive_id),
        Err(KeyError::NoTitleKey { .. })
    ));

    // Passing B's key for A is refused as a wrong key before any frame is tried.
    for (r, k) in [(&ra, &kb), (&ra, &kc), (&rb, &ka), (&rc, &ka)] {
        let e = env.unpack_to(r, Some(k), "cross").unwrap_err();
        match &e {
            ArchiveError::WrongKey { title, .. } => assert_eq!(title, &r.head.title),
            other => panic!("expected WrongKey, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{:?}", r.head.title)) && msg.contains("not the key"),
            "{msg}"
        );
        assert!(!env.out_dir().join("cross").exists());
    }

    // Overwrite title A's key file with title B's key: A no longer opens, B still does.
    env.ks
        .replace_title_key("title-a", &ra.head.archive_id, &kb)
        .unwrap();
    let stored = env.ks.title_key("title-a", &ra.head.archive_id).unwrap();
    assert!(stored == kb);
    let e = env.unpack_to(&ra, Some(&stored), "a-with-b").unwrap_err();
    assert!(matches!(e, ArchiveError::WrongKey { .. }), "{e:?}");
    assert!(e.to_string().contains(ra.path.to_str().unwrap()), "{e}");
    assert!(!env.out_dir().join("a-with-b").exists());
    assert_no_stray_files(&env.out_dir());
    assert_eq!(
        env.unpack_to(&rb, env.key_of(&rb).as_ref(), "b").unwrap(),
        data_b
    );
    // Restoring A's real key repairs it.
    env.ks
        .replace_title_key("title-a", &ra.head.archive_id, &ka)
        .unwrap();
    assert_eq!(
        env.unpack_to(&ra, env.key_of(&ra).as_ref(), "a").unwrap(),
        data_a
    );
}

/// First frame of an archive: header bytes, decoded header, sealed payload.
fn first_frame(r: &PackReport) -> ([u8; FRAME_HEADER_LEN], FrameHeader, Vec<u8>) {
    let raw = fs::read(&r.path).unwrap();
    let off = archive::PREAMBLE_LEN as usize;
    let hb: [u8; FRAME_HEADER_LEN] = raw[off..off + FRAME_HEADER_LEN].try_into().unwrap();
    let fh = FrameHeader::decode(&hb).unwrap();
    let p = off + FRAME_HEADER_LEN;
    (hb, fh.clone(), raw[p..p + fh.stored_len as usize].to_vec())
}

#[test]
fn frame_layer_refuses_wrong_master_key_title_or_archive() {
    let env = Env::new();
    for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
        let data = random_bytes(FS, 20);
        let ra = env.pack_bytes(
            &data,
            &opts(
                &format!("fa-{cipher:?}"),
                cipher,
                CompressMode::None,
                FS as u32,
                256,
            ),
        );
        let rb = env.pack_bytes(
            &data,
            &opts(
                &format!("fb-{cipher:?}"),
                cipher,
                CompressMode::None,
                FS as u32,
                256,
            ),
        );
        let ka = env.key_of(&ra).unwrap();
        let kb = env.key_of(&rb).unwrap();
        let (hb, fh, sealed) = first_frame(&ra);
        assert_eq!(sealed.len(), FS + cipher.tag_len());
        let aad = frame_aad(&ra.head.archive_id, &ra.head.title, &hb);

        // The right key opens it.
        let mut buf = sealed.clone();
        aead::open(cipher, &ka, &fh.frame_key, &aad, &mut buf).unwrap();
        assert_eq!(buf, data);

        // Another title's master key does not, and the buffer is wiped.
        let mut buf = sealed.clone();
        let e = aead::open(cipher, &kb, &fh.frame_key, &aad, &mut buf).unwrap_err();
        assert!(matches!(e, KeyError::Open), "{e:?}");
        assert!(e.to_string().contains("authentication failed"));
        assert!(
            buf.iter().all(|&b| b == 0),
            "failed open must wipe the buffer"
        );

        // The right key, but the frame presented as another archive's or another title's.
        for bad_aad in [
            frame_aad(&rb.head.archive_id, &ra.head.title, &hb),
            frame_aad(&ra.head.archive_id, &rb.head.title, &hb),
        ] {
            let mut buf = sealed.clone();
            assert!(matches!(
                aead::open(cipher, &ka, &fh.frame_key, &bad_aad, &mut buf),
                Err(KeyError::Open)
            ));
        }
        // The other cipher with the right key.
        let other = if cipher == Cipher::Aes256Gcm {
            Cipher::ChaCha20Poly1305
        } else {
            Cipher::Aes256Gcm
        };
        let mut buf = sealed.clone();
        assert!(aead::open(other, &ka, &fh.frame_key, &aad, &mut buf).is_err());

        // Sealing is deterministic for a given (master, frame key, aad) and round-trips.
        let mut again = data.clone();
        aead::seal(cipher, &ka, &fh.frame_key, &aad, &mut again);
        assert_eq!(again, sealed);
    }
}

// ---------------------------------------------------------------------------------------------
// Pack refusals and --force
// ---------------------------------------------------------------------------------------------

#[test]
fn pack_refuses_bad_options_and_existing_titles() {
    let env = Env::new();
    let input = env.write_input("x.raw", &random_bytes(1000, 1));
    let run = |o: &PackOptions| pack(&input, &env.archives(), &env.ks, o, &mut |_| {});

    let mut o = PackOptions::new("ok");
    o.cipher = Cipher::None;
    let e = run(&o).unwrap_err().to_string();
    assert!(e.contains("--advert"), "{e}");
    for (f, s) in [
        (0, 1280),
        (4096, 1000),
        (4096, 224),
        (4096, 65_536),
        ((64 << 20) + 1, 1280),
    ] {
        let mut o = PackOptions::new("ok");
        o.frame_size = f;
        o.symbol_size = s;
        assert!(
            matches!(run(&o), Err(ArchiveError::Input { .. })),
            "frame {f} symbol {s}"
        );
    }
    let mut o = PackOptions::new("ok");
    o.watermark = Some("w".repeat(257));
    assert!(run(&o).unwrap_err().to_string().contains("watermark"));
    for bad in ["", "../evil", ".hidden", "a b", "a/b"] {
        let e = run(&PackOptions::new(bad)).unwrap_err();
        assert!(
            matches!(e, ArchiveError::Keys(KeyError::BadTitle(_))),
            "{bad:?}: {e:?}"
        );
    }
    // Missing input names the path.
    let missing = env.dir.path().join("in/missing.raw");
    let e = pack(
        &missing,
        &env.archives(),
        &env.ks,
        &PackOptions::new("m"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
    // A directory is not a media file.
    let e = pack(
        env.dir.path(),
        &env.archives(),
        &env.ks,
        &PackOptions::new("d"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    // Nothing was written by the refusals.
    assert!(!env.archives().exists() || fs::read_dir(env.archives()).unwrap().count() == 0);

    // No identity: refused with a hint.
    let bare = KeyStore::open(env.dir.path().join("bare-keys")).unwrap();
    let e = pack(
        &input,
        &env.archives(),
        &bare,
        &PackOptions::new("noid"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, ArchiveError::Keys(KeyError::NoIdentity { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("keygen"));
    assert!(!archive::archive_path(&env.archives(), "noid").exists());
}

#[test]
fn force_replaces_an_archive_and_its_key() {
    let env = Env::new();
    let v1 = random_bytes(3 * FS, 1);
    let v2 = text_bytes(2 * FS + 3, 2);
    let o = opts(
        "film",
        Cipher::Aes256Gcm,
        CompressMode::Auto,
        FS as u32,
        256,
    );
    let r1 = assert_round_trip(&env, &v1, &o);
    let k1 = env.key_of(&r1).unwrap();

    // Without --force: refused, archive and key untouched.
    let input = env.write_input("v2.raw", &v2);
    let e = pack(&input, &env.archives(), &env.ks, &o, &mut |_| {}).unwrap_err();
    assert!(matches!(e, ArchiveError::Input { .. }), "{e:?}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(e.to_string().contains("film"), "{e}");
    assert_eq!(ArchiveFile::open(&r1.path).unwrap().head, r1.head);
    assert!(env.ks.title_key("film", &r1.head.archive_id).unwrap() == k1);

    // With --force: replaced; the old key is pruned, the new one opens the new archive.
    let mut of = o.clone();
    of.force = true;
    let r2 = assert_round_trip(&env, &v2, &of);
    assert_eq!(r2.path, r1.path);
    assert_ne!(r2.head.archive_id, r1.head.archive_id);
    assert!(matches!(
        env.ks.title_key("film", &r1.head.archive_id),
        Err(KeyError::NoTitleKey { .. })
    ));
    let keys: Vec<_> = fs::read_dir(env.ks.dir().join("titles/film"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The old key does not open the new archive.
    let e = env.unpack_to(&r2, Some(&k1), "old-key").unwrap_err();
    assert!(matches!(e, ArchiveError::WrongKey { .. }));

    // Replacing an encrypted title by an advert removes its keys altogether.
    let mut oa = of.clone();
    oa.advert = true;
    let r3 = assert_round_trip(&env, &v1, &oa);
    assert!(r3.head.advert);
    assert_eq!(
        fs::read_dir(env.ks.dir().join("titles/film"))
            .unwrap()
            .count(),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// Failed commits leave nothing behind
// ---------------------------------------------------------------------------------------------

#[test]
fn unpack_onto_a_directory_fails_without_leaving_plaintext_behind() {
    let env = Env::new();
    let data = random_bytes(3 * FS, 30);
    let r = env.pack_bytes(
        &data,
        &opts(
            "dir-target",
            Cipher::Aes256Gcm,
            CompressMode::None,
            FS as u32,
            256,
        ),
    );
    let key = env.key_of(&r);
    // The output path is an existing directory: the final rename must fail.
    let target = env.out_dir().join("target");
    fs::create_dir_all(target.join("inside")).unwrap();
    let a = ArchiveFile::open(&r.path).unwrap();
    let e = unpack(&a, &env.trusted, key.as_ref(), &target, &mut |_| {}).unwrap_err();
    assert!(matches!(e, ArchiveError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains(target.to_str().unwrap()), "{e}");
    assert!(target.join("inside").is_dir(), "the directory is untouched");
    assert_no_stray_files(&env.out_dir());
}

#[test]
fn pack_force_onto_a_directory_fails_without_leaving_files_behind() {
    let env = Env::new();
    let target = archive::archive_path(&env.archives(), "dir-title");
    fs::create_dir_all(target.join("inside")).unwrap();
    let input = env.write_input("dir-title.raw", &random_bytes(2 * FS, 31));
    let mut o = opts(
        "dir-title",
        Cipher::Aes256Gcm,
        CompressMode::None,
        FS as u32,
        256,
    );
    o.force = true;
    let e = pack(&input, &env.archives(), &env.ks, &o, &mut |_| {}).unwrap_err();
    assert!(matches!(e, ArchiveError::Io { .. }), "{e:?}");
    assert!(target.join("inside").is_dir());
    assert_no_stray_files(&env.archives());
    let keys = env.ks.dir().join("titles/dir-title");
    let n = fs::read_dir(&keys).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "orphan key for an archive that was never committed");
}
