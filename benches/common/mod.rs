//! Fixture shared by the benches: a temp directory with a key store (identity created) and an
//! incompressible input file.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use mcast_keys::KeyStore;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// xorshift64* bytes: incompressible, and fast to make.
pub fn fill_random(buf: &mut [u8], state: &mut u64) {
    for c in buf.chunks_mut(8) {
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// A temp dir (`prefix…`), its key store, and `input.raw` of `len` random bytes from `seed`.
pub fn bench_site(prefix: &str, len: usize, seed: u64) -> (TempDir, KeyStore, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let ks = KeyStore::open(dir.path().join("keys")).unwrap();
    ks.create_identity(false).unwrap();
    let input = dir.path().join("input.raw");
    let mut w = BufWriter::new(fs::File::create(&input).unwrap());
    let mut buf = vec![0u8; MIB];
    let mut state = seed;
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        fill_random(&mut buf[..n], &mut state);
        w.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    w.flush().unwrap();
    (dir, ks, input)
}
