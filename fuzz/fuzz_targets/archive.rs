//! Archive files, end to end: `ArchiveFile::open` (preamble, tail, head), the manifest check of
//! every packet (`verify`), and frame decoding, decryption and decompression (`decrypt_to`).
//!
//! Input: `flags:u8 key:[32] file`. The file is written to a scratch file and opened as
//! `mcastd`/`mcast-recv play` open one. The trusted server key is the one the head names
//! (mutations of frames and hashes keep a seed's signature valid); with `flags & 1` the head is
//! first re-signed with the fixture identity, so the fuzzer also explores heads no signer would
//! make. `key` is the master key (`flags & 2`: none); `flags & 4` checks packets while
//! decrypting. Oracles: no panic; whatever decrypts is exactly `plain_len` bytes whose hash is
//! the head's.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mcast::archive::frame::{FrameHeader, FRAME_HEADER_LEN};
use mcast::archive::{
    decrypt_to, verify, ArchiveFile, DecryptOptions, Head, PacketId, PREAMBLE_LEN, TAIL_LEN,
};
use mcast_fuzz_common::identity;
use mcast_keys::MasterKey;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::path::Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("mcast-fuzz-archive-{}.mca", std::process::id()))
    })
}

/// Re-sign the head in place with the fixture identity, if the file has a decodable head.
fn resign(file: &mut [u8]) {
    let len = file.len();
    if len < (PREAMBLE_LEN + TAIL_LEN) as usize {
        return;
    }
    let t = len - TAIL_LEN as usize;
    let head_len = u64::from_le_bytes(file[t..t + 8].try_into().unwrap());
    let Some(start) = (t as u64).checked_sub(head_len) else {
        return;
    };
    let hb = &mut file[start as usize..t];
    if let Ok(mut h) = Head::decode(hb) {
        h.sign(&identity());
        hb.copy_from_slice(&h.encode());
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 33 {
        return;
    }
    let flags = input[0];
    let key = MasterKey::from_bytes(input[1..33].try_into().unwrap());
    let mut file = input[33..].to_vec();
    if flags & 1 != 0 {
        resign(&mut file);
    }
    let path = scratch();
    std::fs::write(path, &file).expect("scratch file");
    let Ok(a) = ArchiveFile::open(path) else {
        return;
    };
    let trusted = if flags & 1 != 0 {
        identity().public()
    } else {
        a.head.server_key
    };
    // The first frame header, as the frame loop reads it.
    if let Some(hb) = file.get(PREAMBLE_LEN as usize..PREAMBLE_LEN as usize + FRAME_HEADER_LEN) {
        let hb: &[u8; FRAME_HEADER_LEN] = hb.try_into().unwrap();
        if let Ok(fh) = FrameHeader::decode(hb) {
            assert_eq!(&fh.encode(), hb);
        }
    }
    let mut buf = Vec::new();
    for id in [
        PacketId::Data(0),
        PacketId::Hash(0),
        PacketId::Hash(u64::MAX),
    ] {
        let _ = a.read_packet(id, &mut buf);
    }
    let _ = verify(&a, &trusted);
    let opts = DecryptOptions {
        verify_packets: flags & 4 != 0,
    };
    let mut out = Vec::new();
    let key = (flags & 2 == 0).then_some(&key);
    if let Ok(r) = decrypt_to(&a, &trusted, key, opts, &mut out, path, &mut |_| {}) {
        assert_eq!(r.plain_len, a.head.plain_len);
        assert_eq!(out.len() as u64, a.head.plain_len);
        let want = match (a.head.plain_hash_keyed, key) {
            (true, Some(k)) => {
                let mut h = k.plain_hasher(&a.head.archive_id);
                h.update(&out);
                h.finalize()
            }
            _ => blake3::hash(&out),
        };
        assert_eq!(want.as_bytes(), &a.head.plain_hash);
    }
});
