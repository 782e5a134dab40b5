//! FEC coding speed (`archive::fec`, Reed–Solomon over GF(2^16) by `reed-solomon-simd`):
//! encoding a source block (what `mcastd pack` does per block) and decoding one that lost 5 %
//! of its data packets (what a receiver does), at 1280- and 8192-byte symbols and source
//! blocks of 256, 1024 and 4096 packets with 10 % repair symbols. Throughput is source bytes
//! per second on one core. The README's FEC section quotes these figures.
//!
//! `cargo bench --bench fec` (about a minute).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mcast::archive::fec::{decode_block, encode_block, FecShape};
use rand::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for symbol in [1280usize, 8192] {
        for k in [256u64, 1024, 4096] {
            let r = (k / 10) as usize;
            let data: Vec<Vec<u8>> = (0..k)
                .map(|_| (0..symbol).map(|_| rng.gen()).collect())
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let repairs = encode_block(&refs, symbol, r).unwrap();
            let shape = FecShape {
                source: k,
                repair: r as u64,
                data_packets: k,
                blocks: 1,
            };
            // 5 % of the data lost, replaced by as many repair symbols.
            let lost = (k / 20) as usize;
            let mut idx: Vec<u64> = (0..k).collect();
            for i in 0..lost {
                let j = rng.gen_range(i..idx.len());
                idx.swap(i, j);
            }
            let lost_set: std::collections::HashSet<u64> = idx[..lost].iter().copied().collect();
            let held: Vec<(u64, &[u8])> = (0..k)
                .filter(|i| !lost_set.contains(i))
                .map(|i| (i, data[i as usize].as_slice()))
                .collect();
            let reps: Vec<(u64, &[u8])> = (0..lost as u64)
                .map(|i| (i, repairs[i as usize].as_slice()))
                .collect();
            let mut g = c.benchmark_group(format!("fec_{symbol}B"));
            g.throughput(Throughput::Bytes(k * symbol as u64))
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            g.bench_function(format!("encode_k{k}_r{r}"), |b| {
                b.iter(|| black_box(encode_block(&refs, symbol, r).unwrap()))
            });
            g.bench_function(format!("decode_k{k}_lost{lost}"), |b| {
                b.iter(|| black_box(decode_block(&shape, 0, symbol, &held, &reps).unwrap()))
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
