//! Per-packet costs of the data path: header encode/decode, NAK encode/decode, the receiver's
//! NAK engine fed an in-order loop (0, 1 and 20 % loss), and the server's batch read.
//!
//! `cargo bench --bench wire`

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mcast::archive::PacketId;
use mcast::carousel::LoopShape;
use mcast::fastio::PacketBatch;
use mcast::receiver::nak::NakEngine;
use mcast::wire::data::{DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN};
use mcast::wire::nak::{to_ranges, Nak};

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_header");
    g.throughput(Throughput::Elements(1));
    let h = DataHeader {
        kind: DataKind::Packet(PacketId::Data(123_456)),
        repair: false,
        probe: false,
        archive_tag: *b"abcdefgh",
        loop_no: 7,
    };
    g.bench_function("encode", |b| {
        let mut out = [0u8; DATA_HEADER_LEN];
        b.iter(|| {
            black_box(&h).encode_into(&mut out);
            black_box(out[0])
        })
    });
    let mut pkt = vec![0u8; DATA_HEADER_LEN + 1280];
    h.encode_into((&mut pkt[..DATA_HEADER_LEN]).try_into().unwrap());
    g.bench_function("decode", |b| {
        b.iter(|| {
            let (h, p) = DataHeader::decode(black_box(&pkt)).unwrap();
            black_box((h.loop_no, p.len()))
        })
    });
    g.finish();
}

fn naks(c: &mut Criterion) {
    let mut g = c.benchmark_group("nak_wire");
    // 100 ranges: every 10th unit of 1000 lost.
    let ranges = to_ranges((0..1000u64).filter(|u| u % 10 == 0));
    let nak = Nak {
        archive_tag: *b"abcdefgh",
        session_tag: 42,
        ranges,
        symbols: Vec::new(),
    };
    let bytes = nak.encode();
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_100_ranges", |b| b.iter(|| black_box(&nak).encode()));
    g.bench_function("decode_100_ranges", |b| {
        b.iter(|| Nak::decode(black_box(&bytes)).unwrap())
    });
    g.finish();
}

fn engine(c: &mut Criterion) {
    let shape = LoopShape::data_only(64_000, 64);
    let loop_len = shape.loop_packets();
    let mut g = c.benchmark_group("nak_engine");
    g.throughput(Throughput::Elements(loop_len));
    g.sample_size(20);
    for loss_pct in [0u64, 1, 20] {
        // Deterministic loss pattern: positions whose hash falls under the rate.
        let lost: HashSet<u64> = (0..loop_len)
            .filter(|j| {
                loss_pct > 0 && (j.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100 < loss_pct
            })
            .collect();
        g.bench_function(format!("one_loop_{loss_pct}pct_loss"), |b| {
            b.iter(|| {
                let mut e = NakEngine::new(shape, 7);
                e.on_sync(
                    &SyncInfo {
                        loop_packets: 0,
                        rate_bps: 0,
                        grtt_us: 1000,
                        group_size: 1,
                        send_us: 0,
                    },
                    0,
                );
                let mut have = vec![false; loop_len as usize];
                let t0 = Instant::now();
                let mut naks = 0;
                for j in 0..loop_len {
                    if lost.contains(&j) {
                        continue;
                    }
                    let id = shape.packet_at(j);
                    let u = shape.unit_index(id).unwrap();
                    have[u as usize] = true;
                    // 1 us per packet of simulated time.
                    let now = t0 + Duration::from_micros(j);
                    e.on_packet(now, id, false, |u| have[u as usize]);
                    if j % 64 == 0 {
                        e.handle_timeout(now, |u| have[u as usize]);
                        while let Some(r) = e.poll_nak(now) {
                            naks += r.len();
                        }
                    }
                }
                black_box(naks)
            })
        });
    }
    g.finish();
}

fn batch_read(c: &mut Criterion) {
    // 128 packets of 1280 bytes from a (page-cached) file, as the server reads a batch.
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, &vec![7u8; 128 * 1280 + 4096]).unwrap();
    let mut batch = PacketBatch::with_capacity(128, DATA_HEADER_LEN + 1280);
    let hdr = [0u8; DATA_HEADER_LEN];
    let mut g = c.benchmark_group("server_batch");
    g.throughput(Throughput::Bytes(128 * 1280));
    g.bench_function("fill_128_contiguous", |b| {
        b.iter(|| {
            batch.clear();
            for i in 0..128u64 {
                batch.push_file(&hdr, i * 1280, 1280);
            }
            batch.fill(&f).unwrap();
            black_box(batch.len())
        })
    });
    g.bench_function("fill_128_scattered", |b| {
        b.iter(|| {
            batch.clear();
            for i in 0..128u64 {
                batch.push_file(&hdr, ((i * 37) % 128) * 1280, 1280);
            }
            batch.fill(&f).unwrap();
            black_box(batch.len())
        })
    });
    g.finish();
}

criterion_group!(benches, headers, naks, engine, batch_read);
criterion_main!(benches);
