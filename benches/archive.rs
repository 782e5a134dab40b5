//! Archive throughput: `pack` and `unpack` of a 64 MiB random file (end to end, including
//! the fsyncs of the atomic writes), and the two inner loops on 1 MiB: manifest leaf hashing
//! and frame sealing.
//!
//! `cargo bench --bench archive` (about a minute and a half).

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use mcast::archive::frame::{frame_aad, FrameHeader};
use mcast::archive::manifest::{LeafHash, TreeBuilder};
use mcast::archive::{unpack, ArchiveFile, CompressMode};
use mcast_keys::frame::{self as aead, random_frame_key};
use mcast_keys::{Cipher, MasterKey};

const BIG: usize = 64 << 20;
const MIB: usize = 1 << 20;

mod common;

use common::Site;

/// Restore `archive` to `out` with the site's keys.
fn unpack_to(site: &Site, archive: &ArchiveFile, out: &Path) {
    let key = site
        .ks
        .title_key(&archive.head.title, &archive.head.archive_id)
        .unwrap();
    let trusted = site.ks.identity().unwrap().public();
    unpack(archive, &trusted, Some(&key), out, &mut |_| {}).unwrap();
}

const CIPHERS: [(Cipher, &str); 2] = [
    (Cipher::Aes256Gcm, "aes-256-gcm"),
    (Cipher::ChaCha20Poly1305, "chacha20-poly1305"),
];

fn bench_pack_unpack(c: &mut Criterion) {
    let site = Site::new("mcast-bench-", BIG, 0x6d63_6173_7462_656e_u64);

    let mut g = c.benchmark_group("pack_64MiB");
    g.throughput(Throughput::Bytes(BIG as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (cipher, name) in CIPHERS {
        g.bench_function(format!("{name}/none"), |b| {
            b.iter(|| site.pack("bench-pack", cipher, CompressMode::None))
        });
    }
    g.bench_function("aes-256-gcm/auto", |b| {
        b.iter(|| site.pack("bench-pack", Cipher::Aes256Gcm, CompressMode::Auto))
    });
    g.finish();

    let mut g = c.benchmark_group("unpack_64MiB");
    g.throughput(Throughput::Bytes(BIG as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let out = site.dir.path().join("restored.raw");
    for (cipher, name) in CIPHERS {
        let path = site.pack(&format!("bench-{name}"), cipher, CompressMode::None);
        let archive = ArchiveFile::open(&path).unwrap();
        // Sanity: the unpacked file is the input.
        unpack_to(&site, &archive, &out);
        assert_eq!(
            fs::metadata(&out).unwrap().len(),
            fs::metadata(&site.input).unwrap().len()
        );
        g.bench_function(format!("{name}/none"), |b| {
            b.iter(|| unpack_to(&site, &archive, &out))
        });
    }
    g.finish();
}

fn bench_primitives(c: &mut Criterion) {
    let mut data = vec![0u8; MIB];
    common::fill_random(&mut data, &mut 0x1234_5678_9abc_def1);
    let archive_id = [7u8; 16];

    let mut g = c.benchmark_group("manifest_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for symbol_size in [1280u32, 8192] {
        for leaf in [LeafHash::Blake3, LeafHash::Sha256] {
            g.bench_function(format!("tree_update/symbol_{symbol_size}/{leaf:?}"), |b| {
                b.iter(|| {
                    let mut t = TreeBuilder::new(&archive_id, symbol_size, leaf);
                    t.update(black_box(&data));
                    t
                })
            });
        }
    }
    g.bench_function("tree_update_finish/symbol_1280", |b| {
        b.iter(|| {
            let mut t = TreeBuilder::new(&archive_id, 1280, LeafHash::auto(1280));
            t.update(black_box(&data));
            t.finish()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("frame_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let master = MasterKey::generate();
    let frame_key = random_frame_key();
    let header = FrameHeader {
        zstd: false,
        index: 3,
        plain_len: MIB as u32,
        stored_len: MIB as u32 + 16,
        frame_key,
    }
    .encode();
    let aad = frame_aad(&archive_id, "bench-title", &header);
    for (cipher, name) in CIPHERS {
        g.bench_function(format!("seal/{name}"), |b| {
            b.iter_batched_ref(
                || {
                    let mut v = Vec::with_capacity(MIB + 16);
                    v.extend_from_slice(&data);
                    v
                },
                |buf| aead::seal(cipher, &master, &frame_key, &aad, buf),
                BatchSize::LargeInput,
            )
        });
        let mut sealed = data.clone();
        aead::seal(cipher, &master, &frame_key, &aad, &mut sealed);
        g.bench_function(format!("open/{name}"), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |buf| aead::open(cipher, &master, &frame_key, &aad, buf).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_primitives, bench_pack_unpack);
criterion_main!(benches);
