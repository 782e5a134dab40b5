//! Play throughput: decrypting and authenticating a 256 MiB archive (the part of
//! `mcast-recv play` that scales with the title), and the server's cost of one grant.
//!
//! * `play_256MiB/<cipher>/aead` — what `play` does by default: read every frame, open it
//!   (AEAD), hash the plaintext for the signed plaintext hash, write it to a sink.
//! * `play_256MiB/<cipher>/aead+manifest` — the same plus the per-packet manifest check
//!   (`play --verify-packets`, and what `unpack` does).
//! * `grant/...` — one ticket check + atomic play in SQLite (fsync'ed) + unwrap + HPKE seal.
//!
//! Decryption is single-threaded, and the `play_256MiB` figures are measured in CPU time of
//! that thread (`/proc/thread-self/schedstat`: user + system time, including the reads from
//! the page cache), so they are per-core figures even on a busy machine. The archive is read
//! from the page cache (it was just written), as a play right after a download would.
//!
//! `cargo bench --bench play` (about a minute).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use mcast::archive::{decrypt_to, ArchiveFile, CompressMode, DecryptOptions};
use mcast::ticket::service::TicketService;
use mcast::ticket::TicketStore;
use mcast_keys::seal::ReceiverKey;
use mcast_keys::ticket::{Ticket, TicketSpec};
use mcast_keys::{Cipher, KeyStore};

const BIG: usize = 256 << 20;

mod common;

use common::{thread_cpu, Site};

fn bench_decrypt(c: &mut Criterion) {
    let site = Site::new("mcast-bench-play-", BIG, 0x706c_6179_6265_6e63_u64);
    let trusted = site.ks.identity().unwrap().public();
    let mut g = c.benchmark_group("play_256MiB");
    g.throughput(Throughput::Bytes(BIG as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for (cipher, name) in [
        (Cipher::Aes256Gcm, "aes-256-gcm"),
        (Cipher::ChaCha20Poly1305, "chacha20-poly1305"),
    ] {
        let path = site.pack(&format!("bench-{name}"), cipher, CompressMode::None);
        let a = ArchiveFile::open(&path).unwrap();
        let key = site
            .ks
            .title_key(&a.head.title, &a.head.archive_id)
            .unwrap();
        for (verify_packets, what) in [(false, "aead"), (true, "aead+manifest")] {
            let opts = DecryptOptions { verify_packets };
            let run = || {
                decrypt_to(
                    &a,
                    &trusted,
                    Some(&key),
                    opts,
                    &mut std::io::sink(),
                    std::path::Path::new("sink"),
                    &mut |_| {},
                )
                .unwrap()
            };
            // Sanity: the whole file comes out.
            assert_eq!(run().plain_len, BIG as u64);
            g.bench_function(format!("{name}/{what}"), |b| {
                b.iter_custom(|iters| {
                    let start = thread_cpu();
                    for _ in 0..iters {
                        run();
                    }
                    thread_cpu() - start
                })
            });
        }
    }
    g.finish();
}

fn bench_grant(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("mcast-bench-grant-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let ks = KeyStore::open(dir.path().join("keys")).unwrap();
    let id = ks.create_identity(false).unwrap();
    let master = mcast_keys::MasterKey::generate();
    let spec = TicketSpec {
        title: "film".into(),
        archive_id: [1; 16],
        holder: "bench".into(),
        plays: u32::MAX,
        expires_unix: 0,
        issued_unix: 1,
    };
    let (file, part_b) = Ticket::issue(&id, &master, &spec).unwrap();
    let db_path = dir.path().join("tickets.sqlite");
    {
        let db = mcast::ticket::sqlite::SqliteStore::open(&db_path).unwrap();
        let wrapped = ks.tickets_key().unwrap().wrap(
            &file.ticket().ticket_id,
            &file.ticket().archive_id,
            &part_b,
        );
        db.insert(file.ticket(), &wrapped).unwrap();
    }
    ks.put_title_key("film", &[1; 16], &master).unwrap();
    let mut svc = TicketService::open(&db_path, &ks, id.public(), 60).unwrap();
    let bytes = file.ticket().encode();
    // A request as `mcast-recv play` makes it: proof of part A bound to its address token.
    let tid = file.ticket().ticket_id;
    let proofs = |r: &ReceiverKey| {
        mcast_keys::ticket::possession_proof(file.part_a(), &tid, &r.public(), "film", b"token")
    };
    let grant = move |svc: &mut TicketService, r: &ReceiverKey| {
        let (pubk, proof) = (r.public(), proofs(r));
        let req = mcast::ticket::service::PlayRequest {
            title: "film",
            ticket: &bytes,
            receiver_pub: &pubk,
            proof: &proof,
            nonce: b"token",
        };
        svc.play(&req, 10).unwrap()
    };
    let mut g = c.benchmark_group("grant");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("new_play_fsynced", |b| {
        b.iter(|| {
            let r = ReceiverKey::generate();
            grant(&mut svc, &r)
        })
    });
    let r = ReceiverKey::generate();
    grant(&mut svc, &r);
    g.bench_function("retry_same_key", |b| b.iter(|| grant(&mut svc, &r)));
    g.finish();
}

criterion_group!(benches, bench_decrypt, bench_grant);
criterion_main!(benches);
