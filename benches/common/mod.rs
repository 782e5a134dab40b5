//! Fixture shared by the benches: a temp directory with a key store (identity created) and an
//! incompressible input file; the calling thread's CPU time.
#![allow(dead_code)] // each bench uses part of it

use std::fs;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use mcast::archive::{pack, CompressMode, PackOptions};
use mcast_keys::Cipher;

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

/// A temp dir (`prefix…`) with a key store (identity created) and `input.raw` of `len`
/// random bytes from `seed`.
pub struct Site {
    pub dir: TempDir,
    pub ks: KeyStore,
    pub input: PathBuf,
}

impl Site {
    pub fn new(prefix: &str, len: usize, seed: u64) -> Site {
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
        Site { dir, ks, input }
    }

    pub fn archives(&self) -> PathBuf {
        self.dir.path().join("archives")
    }

    /// Pack the input as `title` (replacing an earlier pack); returns the archive path.
    pub fn pack(&self, title: &str, cipher: Cipher, compress: CompressMode) -> PathBuf {
        let mut o = PackOptions::new(title);
        o.cipher = cipher;
        o.compress = compress;
        o.force = true;
        pack(&self.input, &self.archives(), &self.ks, &o, &mut |_| {})
            .unwrap()
            .path
    }
}

/// CPU time the calling thread has used (a figure that holds on a busy machine).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
