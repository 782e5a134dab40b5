//! The hostile-input suite (issue 10): one test per hostile input, each asserting the refusal
//! (a reply, no reply, or an exit code with its message) *and* the counter that rose. Network
//! inputs go to the real processes (`mcastd`, `mcast-recv`, `mcast-director`) on loopback:
//! datagrams are built with the crate's own encoders, then mangled.
//!
//! | hostile input | test |
//! | --- | --- |
//! | truncated / oversized / wrong-version datagrams to the control port | [`control_port_garbage`] |
//! | the same on a receiver's data group | [`data_group_garbage`] |
//! | packets of another title on a receiver's group | [`other_titles_packets`] |
//! | forged archive signatures (server and receiver side) | [`forged_archive_signatures`] |
//! | forged data packets (hash mismatch, posing as repairs) | [`forged_data_packets`] |
//! | a replayed single-use play ticket | [`replayed_ticket`] |
//! | replayed and forged heartbeats to a director | [`replayed_heartbeats`] |
//! | a spoofed unicast request | [`spoofed_unicast_request`] |
//! | a NAK flood | [`nak_flood`] |
//! | a receiver with a full disk | [`full_disk`] |
//! | unreadable archives | [`unreadable_archives`] |
//! | an archive truncated while it is served | [`archive_truncated_while_served`] |
//! | config errors | [`config_errors`] |
//! | a join rewritten on the way to another title's archive | [`a_join_answered_with_another_titles_archive_is_refused`] |
//! | requests from unproven (spoofable) addresses: amplification, stats | [`no_reply_to_an_unproven_address_is_larger_than_its_request`] |
//! | forged and replayed SYNCs on a receiver's group | [`forged_and_replayed_syncs`] |
//! | another receiver's session spoken for; a join flood from one address | [`sessions_cannot_be_spoken_for_or_flooded`] |
//! | a server at a known address signing with another key | [`a_known_servers_key_is_required_for_every_later_title`] |
//! | a server's heartbeats in another server's name | [`a_server_cannot_speak_for_another_at_the_director`] |
//!
//! Sites use numbers 83..=101 (control ports 18430.., groups 239.255.183.., data ports 35300..);
//! directors listen on 18595 and 18596.

mod common;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mcast::archive::{ArchiveFile, PacketId};
use mcast::receiver::download::{Download, Verdict};
use mcast::wire::control::{Control, Envelope, MAX_CONTROL_LEN};
use mcast::wire::data::{archive_tag, DataHeader, DataKind, DATA_HEADER_LEN};
use mcast::wire::director::{Heartbeat, HeldTitle, ServerState};
use mcast::wire::nak::{Nak, NAK_KIND};
use serde_json::Value;

const MB: usize = 1_000_000;
const RECV_LIMIT: Duration = Duration::from_secs(40);

/// Sets the flag when dropped (also when a test panics), so sender threads stop.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A socket that sends to loopback multicast groups (TTL 0: this host only).
fn group_sender() -> UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.into()
}

/// Send `make(i)` (a batch of datagrams) to `group` about every millisecond until stopped.
/// Returns how many datagrams went out.
fn blast(
    group: SocketAddrV4,
    stop: Arc<AtomicBool>,
    make: impl Fn(u64) -> Vec<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let s = group_sender();
        let mut sent = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            for p in make(i) {
                if s.send_to(&p, SocketAddr::V4(group)).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    })
}

fn data_packet(kind: DataKind, tag: [u8; 8], repair: bool, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; DATA_HEADER_LEN];
    DataHeader {
        kind,
        repair,
        probe: false,
        archive_tag: tag,
        loop_no: 0,
    }
    .encode_into(&mut h);
    let mut p = h.to_vec();
    p.extend_from_slice(payload);
    p
}

fn run_out(cmd: &mut Command) -> Output {
    cmd.env_remove("RUST_LOG")
        .env_remove("MCASTD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn mcastd(site: &Site, args: &[&str]) -> Output {
    run_out(
        Command::new(mcastd_bin())
            .arg("--config")
            .arg(&site.cfg)
            .args(args),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Titles the server lists in its catalog.
fn catalog(site: &Site) -> Vec<String> {
    let mut ctl = Ctl::new(site.control, rand::random());
    match ctl.request(Control::CatalogRequest { start: 0 }) {
        Control::CatalogReply { items, .. } => items.into_iter().map(|i| i.title).collect(),
        other => panic!("catalog: {other:?}"),
    }
}

/// 1. Truncated, oversized and wrong-version datagrams to the server's control port (control
///    messages and NAKs): never answered, each counted (`control_malformed`,
///    `naks_malformed`), and the server still answers a genuine join.
#[test]
fn control_port_garbage() {
    let site = Site::new(83, "rate_mbps = 20.0");
    site.pack("clip", MB, 83);
    let mut srv = site.serve();
    let join = Envelope::new(
        9,
        1,
        Control::Join {
            title: "clip".into(),
        },
    )
    .encode();
    let nak = Nak {
        archive_tag: [1; 8],
        session_tag: 9,
        ranges: vec![(0, 4), (10, 1)],
        symbols: Vec::new(),
    }
    .encode();
    let (mut ctl_garbage, mut nak_garbage) = (Vec::new(), Vec::new());
    for n in 0..join.len() {
        ctl_garbage.push(join[..n].to_vec()); // truncated (n = 0: empty)
    }
    for v in [0u8, mcast::wire::control::CONTROL_VERSION + 1, 0x7f, 0xff] {
        let mut b = join.clone();
        b[0] = v; // wrong version
        ctl_garbage.push(b);
        let mut b = nak.clone();
        b[0] = v; // a NAK of another version is no NAK: counted as a malformed control datagram
        ctl_garbage.push(b);
    }
    let mut big = join.clone();
    big.resize(MAX_CONTROL_LEN + 1000, 0x41); // oversized
    ctl_garbage.push(big);
    let mut big = join.clone();
    big.resize(60_000, 0);
    ctl_garbage.push(big);
    for n in 2..nak.len() {
        nak_garbage.push(nak[..n].to_vec()); // truncated NAKs
    }
    let mut over = nak.clone();
    over[20] = 0x7f; // range count far beyond the ranges present (and MAX_NAK_RANGES)
    nak_garbage.push(over);
    let mut big = nak.clone();
    big.resize(MAX_CONTROL_LEN + 500, 0xff); // oversized NAK
    nak_garbage.push(big);
    for g in &ctl_garbage {
        assert!(Envelope::decode(g).is_err(), "test bug: {g:?} decodes");
        assert!(!mcast::wire::nak::is_nak(g) || g.len() < 2);
    }
    for g in &nak_garbage {
        assert!(
            mcast::wire::nak::is_nak(g) && Nak::decode(g).is_err(),
            "test bug: {g:?}"
        );
        assert_eq!(g[1], NAK_KIND);
    }

    let before = site.stats();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for g in ctl_garbage.iter().chain(&nak_garbage) {
        sock.send_to(g, site.control).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    let (data, replies) = count_arrivals(&sock, Duration::from_millis(500));
    assert_eq!((data, replies), (0, 0), "garbage was answered");
    srv.assert_running();
    let s = site.stats();
    let delta = |k: &str| counter(&s, k) - counter(&before, k);
    println!(
        "control garbage: {} control datagrams -> control_malformed +{}; {} NAKs -> naks_malformed +{}",
        ctl_garbage.len(),
        delta("control_malformed"),
        nak_garbage.len(),
        delta("naks_malformed")
    );
    assert_eq!(delta("control_malformed"), ctl_garbage.len() as u64, "{s}");
    assert_eq!(delta("naks_malformed"), nak_garbage.len() as u64, "{s}");
    assert_eq!(delta("naks_received"), 0, "{s}");
    // Still serving.
    let mut ctl = Ctl::new(site.control, 77);
    assert!(matches!(
        ctl.request(Control::Join {
            title: "clip".into()
        }),
        Control::JoinOk { .. }
    ));
}

/// Start a receiver of `title` and return it with the group its channel loops on.
fn receiver_on_group(site: &Site, title: &str, out: &str) -> (Receiver, SocketAddrV4) {
    let rx = site.get(title, &site.out_dir(out), &[]);
    let group = site.wait_channel_group(title, Duration::from_secs(10));
    (rx, group)
}

/// 2. Truncated, oversized and wrong-version datagrams on a receiver's data group: dropped and
///    counted in its JSON report (`malformed`, `rejected`); the file is still byte-identical.
#[test]
fn data_group_garbage() {
    let site = Site::new(84, "rate_mbps = 25.0\nlease_ms = 5000");
    let archive = site.pack("film", 3 * MB, 84);
    let head = ArchiveFile::open(&archive).unwrap().head;
    let (tag, symbol, data_packets) = (
        archive_tag(&head.archive_id),
        head.symbol_size as usize,
        head.data_packets(),
    );
    let mut srv = site.serve();
    let (rx, group) = receiver_on_group(&site, "film", "out");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sender = blast(group, stop.0.clone(), move |i| {
        let serial = (i * 7919) % data_packets;
        let genuine_shape = data_packet(DataKind::Packet(PacketId::Data(serial)), tag, false, &[]);
        let mut wrong_version = data_packet(
            DataKind::Packet(PacketId::Data(serial)),
            tag,
            false,
            &random_bytes(symbol, i),
        );
        wrong_version[0] = 2 + (i % 200) as u8;
        let truncated_nak = Nak {
            archive_tag: tag,
            session_tag: i,
            ranges: vec![(serial, 1)],
            symbols: Vec::new(),
        }
        .encode()[..12]
            .to_vec();
        vec![
            // Truncated headers (1 ..= header length - 1 bytes).
            genuine_shape[..1 + (i as usize % (DATA_HEADER_LEN - 1))].to_vec(),
            wrong_version,
            truncated_nak,
            // Right tag, payload oversized and truncated.
            data_packet(
                DataKind::Packet(PacketId::Data(serial)),
                tag,
                false,
                &random_bytes(2 * symbol + 7, !i),
            ),
            data_packet(
                DataKind::Packet(PacketId::Data(serial)),
                tag,
                false,
                &random_bytes(symbol / 2, i ^ 5),
            ),
        ]
    });
    let done = rx.wait(RECV_LIMIT);
    drop(stop);
    let sent = sender.join().unwrap();
    srv.assert_running();
    let r = done.assert_complete(&archive);
    println!(
        "data-group garbage: sent {sent}; receiver malformed {}, rejected {}, foreign {}, {:.2} s",
        r.malformed, r.rejected, r.foreign, r.seconds
    );
    assert!(sent > 100, "sent only {sent}");
    assert!(
        r.malformed > 0,
        "truncated/wrong-version not counted: {r:?}"
    );
    assert!(r.rejected > 0, "wrong-size payloads not counted: {r:?}");
    assert_eq!(
        r.written - r.fec_repairs_written,
        r.needed_units,
        "only genuine packets written: {r:?}"
    );
}

/// 3. Genuine packets of another title (its own tag and payloads, and its SYNCs) injected on a
///    receiver's group: counted as `foreign`, never written; the file is byte-identical.
#[test]
fn other_titles_packets() {
    let site = Site::new(85, "rate_mbps = 25.0\nlease_ms = 5000");
    let archive = site.pack("film", 3 * MB, 85);
    let other = site.pack("other", 3 * MB, 86);
    let oa = ArchiveFile::open(&other).unwrap();
    let (otag, odata) = (archive_tag(&oa.head.archive_id), fs::read(&other).unwrap());
    let layout = oa.layout;
    let n = oa.head.data_packets();
    let mut srv = site.serve();
    let (rx, group) = receiver_on_group(&site, "film", "out");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sender = blast(group, stop.0.clone(), move |i| {
        (0..4)
            .map(|k| {
                let id = if k == 3 {
                    PacketId::Hash(i % layout.n_blocks)
                } else {
                    PacketId::Data((i * 4 + k) % n)
                };
                let (off, len) = layout.packet_range(id).unwrap();
                let body = &odata[off as usize..off as usize + len];
                data_packet(DataKind::Packet(id), otag, k == 2, body)
            })
            .chain([data_packet(DataKind::Sync, otag, false, &[0u8; 40])])
            .collect()
    });
    let done = rx.wait(RECV_LIMIT);
    drop(stop);
    let sent = sender.join().unwrap();
    srv.assert_running();
    let r = done.assert_complete(&archive);
    println!(
        "other title's packets: sent {sent}; receiver foreign {}, rejected {}, {:.2} s",
        r.foreign, r.rejected, r.seconds
    );
    assert!(sent > 100);
    assert!(r.foreign > 0, "other title's packets not counted: {r:?}");
    assert_eq!(r.written - r.fec_repairs_written, r.needed_units, "{r:?}");
}

/// 4. Forged signatures on archives. Server side: an archive signed by another identity and
///    one whose signed head was altered are skipped at start-up (`archives_skipped`), not in
///    the catalog, and a join for them is refused (`not_here`); `mcastd verify` exits 3 on
///    both. Receiver side: a head that does not verify under the pinned key exits 3, no file.
#[test]
fn forged_archive_signatures() {
    let site = Site::new(86, "rate_mbps = 40.0");
    let good = site.pack("clip", MB, 1);
    // Signed by someone else's identity.
    let rogue = Site::new(87, "");
    let rogue_archive = rogue.pack("rogue", MB, 2);
    fs::copy(&rogue_archive, site.archive_path("rogue")).unwrap();
    // Ours, with one byte of the signed head changed (the title length's neighbour: the id).
    let altered = site.pack("altered", MB, 3);
    let mut b = fs::read(&altered).unwrap();
    let n = b.len();
    let head_len = u64::from_le_bytes(b[n - 16..n - 8].try_into().unwrap()) as usize;
    b[n - 16 - head_len + 8] ^= 0x01; // first byte of the archive id
    fs::write(&altered, &b).unwrap();

    for t in ["rogue", "altered"] {
        let o = mcastd(&site, &["verify", t]);
        assert_eq!(o.status.code(), Some(3), "verify {t}: {o:?}");
        assert!(stderr(&o).contains("sign"), "verify {t}: {}", stderr(&o));
    }
    let mut srv = site.serve();
    let s = site.stats();
    println!(
        "forged signatures: archives_skipped {}",
        counter(&s, "archives_skipped")
    );
    assert_eq!(counter(&s, "archives_skipped"), 2, "{s}");
    assert_eq!(catalog(&site), vec!["clip".to_string()]);
    let log = srv.log_text();
    assert!(
        log.contains("rogue.mca") && log.contains("altered.mca") && log.contains("archive skipped"),
        "{log}"
    );
    let mut ctl = Ctl::new(site.control, 5);
    for t in ["rogue", "altered"] {
        assert!(matches!(
            ctl.request(Control::Join { title: t.into() }),
            Control::NotHere { .. }
        ));
    }
    assert_eq!(counter(&site.stats(), "not_here"), 2);

    // A receiver pinned to another key refuses the genuine server's head: exit 3.
    let ks = mcast_keys::KeyStore::open(rogue.path("keys")).unwrap();
    let other_key = hex::encode(ks.identity().unwrap().public().0);
    let f = site
        .get(
            "clip",
            &site.out_dir("pinned"),
            &["--server-key", &other_key],
        )
        .wait(Duration::from_secs(20));
    println!(
        "receiver pinned to another key: exit {:?}: {}",
        f.code,
        f.stderr.lines().last().unwrap_or("")
    );
    f.assert_code(3);
    assert!(
        f.stderr.contains("not signed by the trusted server key"),
        "{f:#?}"
    );
    assert!(!mcast::archive::archive_path(&site.out_dir("pinned"), "clip").exists());
    // The genuine archive is still served.
    site.get("clip", &site.out_dir("ok"), &[])
        .wait(RECV_LIMIT)
        .assert_complete(&good);
    srv.assert_running();
}

/// 5. Forged data packets (right tag, real serials, garbage payloads, half of them flagged as
///    repairs). Sans-I/O: the download engine rejects one for a missing unit, counts it, and
///    the unit stays missing (so its NAK is not cleared). Live: the receiver counts them as
///    `rejected`, writes only genuine packets, and its NAKs stay bounded.
#[test]
fn forged_data_packets() {
    let site = Site::new(88, "rate_mbps = 25.0\nlease_ms = 5000");
    let archive = site.pack("film", 3 * MB, 88);
    let a = ArchiveFile::open(&archive).unwrap();
    let raw = fs::read(&archive).unwrap();
    let packet = |id: PacketId| {
        let (off, len) = a.layout.packet_range(id).unwrap();
        raw[off as usize..off as usize + len].to_vec()
    };
    let head = Arc::new(a.head.clone());
    let mut dl = Download::new(head.clone(), a.layout.head_len, None);
    let hash0 = dl.on_packet(PacketId::Hash(0), &packet(PacketId::Hash(0)));
    assert_ne!(hash0, Verdict::Rejected, "genuine hash packet refused");
    let id = PacketId::Data(3);
    let unit = dl.shape().unit_index(id).unwrap();
    let mut forged = packet(id);
    forged[10] ^= 0x20;
    assert_eq!(dl.on_packet(id, &forged), Verdict::Rejected);
    assert_eq!(dl.counters.rejected, 1);
    assert!(
        !dl.has_or_parked(unit),
        "a forged packet counted as received"
    );
    assert!(matches!(
        dl.on_packet(id, &packet(id)),
        Verdict::Write { .. }
    ));
    assert!(dl.has_or_parked(unit));

    let (tag, symbol, n) = (
        archive_tag(&a.head.archive_id),
        a.head.symbol_size as usize,
        a.head.data_packets(),
    );
    let mut srv = site.serve();
    let (rx, group) = receiver_on_group(&site, "film", "out");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sender = blast(group, stop.0.clone(), move |i| {
        vec![
            data_packet(
                DataKind::Packet(PacketId::Data((i * 7919) % n)),
                tag,
                i % 2 == 0,
                &random_bytes(symbol, i),
            ),
            data_packet(
                DataKind::Packet(PacketId::Hash(i % head.n_blocks())),
                tag,
                i % 2 == 1,
                &random_bytes(symbol, !i),
            ),
        ]
    });
    let done = rx.wait(RECV_LIMIT);
    drop(stop);
    let sent = sender.join().unwrap();
    srv.assert_running();
    let r = done.assert_complete(&archive);
    println!(
        "forged data: sent {sent}; receiver rejected {}, written {} of {}, units NAKed {}, {:.2} s",
        r.rejected, r.written, r.loop_units, r.units_naked, r.seconds
    );
    assert!(r.rejected > 0, "{r:?}");
    assert_eq!(r.written - r.fec_repairs_written, r.needed_units, "{r:?}");
    // Forged packets for blocks whose hash packet has not arrived are parked unverified;
    // each one that then fails costs a NAK (its unit, and the block's hash packet). That is
    // bounded by the parking space, not by the flood: ~10 % of the units here.
    assert!(
        r.units_naked <= r.loop_units / 4,
        "forgeries drove NAKs: {r:?}"
    );
}

/// 6. A single-use play ticket played twice: the second play is refused (exit 8, "used"),
///    the database row is unchanged by it, and the server counts one grant, one refusal.
#[test]
fn replayed_ticket() {
    let site = Site::new(89, "rate_mbps = 40.0");
    let db = site.path("tickets.sqlite");
    let mut cfg = fs::read_to_string(&site.cfg).unwrap();
    cfg.push_str(&format!("\n[tickets]\ndb = '{}'\n", db.display()));
    fs::write(&site.cfg, cfg).unwrap();
    let archive = site.pack("film", MB / 2, 89);
    let ticket = site.path("box.ticket");
    let o = mcastd(
        &site,
        &[
            "ticket",
            "issue",
            "film",
            "--holder",
            "box-1",
            "-o",
            ticket.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "issue: {o:?}");
    let wallet = site.path("wallet");
    fs::create_dir_all(&wallet).unwrap();
    fs::copy(&archive, wallet.join("film.mca")).unwrap();
    let _srv = site.serve();
    let row = || {
        let o = mcastd(&site, &["ticket", "list", "--json"]);
        assert!(o.status.success(), "{o:?}");
        let v: Value = serde_json::from_str(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .expect("one ticket"),
        )
        .unwrap();
        (
            v["plays_left"].as_u64(),
            v["grants"].as_u64(),
            v["state"].clone(),
        )
    };
    let play = |out: &str| {
        run_out(
            Command::new(recv_bin())
                .args(["play", "film", "--ticket"])
                .arg(&ticket)
                .arg("--dir")
                .arg(&wallet)
                .arg("-o")
                .arg(site.path(out))
                .arg("--server")
                .arg(site.control.to_string()),
        )
    };
    let first = play("one.out");
    assert!(first.status.success(), "first play: {first:?}");
    let after_first = row();
    assert_eq!(
        (after_first.0, after_first.1),
        (Some(0), Some(1)),
        "{after_first:?}"
    );
    let second = play("two.out");
    println!(
        "replayed ticket: second play exit {:?}: {}",
        second.status.code(),
        stderr(&second).lines().last().unwrap_or("")
    );
    assert_eq!(second.status.code(), Some(8), "{second:?}");
    assert!(stderr(&second).contains("used"), "{}", stderr(&second));
    assert!(!site.path("two.out").exists());
    assert_eq!(row(), after_first, "a refused play changed the database");
    let s = site.stats();
    assert_eq!(
        (counter(&s, "plays_granted"), counter(&s, "plays_refused")),
        (1, 1),
        "{s}"
    );
}

/// `mcast-director --config CFG`, once it answers stats on `addr`.
fn start_director(cfg: &Path, addr: SocketAddr) -> Guard {
    let mut cmd = Command::new(director_bin());
    cmd.arg("--config")
        .arg(cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let d = Guard::spawn(&mut cmd, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while try_stats(addr).is_none() {
        assert!(Instant::now() < deadline, "director did not start");
        std::thread::sleep(Duration::from_millis(30));
    }
    d
}

/// A heartbeat of `server` holding "film", stamped `unix_ms + seq`.
fn heartbeat(server: SocketAddr, seq: u64, unix_ms: u64, state: ServerState) -> Heartbeat {
    Heartbeat {
        server,
        boot_id: 42,
        seq,
        unix_ms: unix_ms + seq,
        interval_ms: 10_000,
        state,
        channels: 0,
        channel_slots: 4,
        receivers: 0,
        throughput_bps: 0,
        capacity_bps: 1_000_000_000,
        max_tier_bps: 40_000_000,
        titles: vec![HeldTitle {
            title: "film".into(),
            looping: false,
        }],
    }
}

/// 7. Heartbeats to a real director: a replay of a genuine one and an older one
///    (`heartbeats_replayed`), a forged one under another key (`heartbeats_forged`) and a
///    truncated one (`heartbeats_malformed`) change nothing: the server stays at its last
///    genuine sequence, online.
#[test]
fn replayed_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hb.key");
    let o = run_out(
        Command::new(director_bin())
            .args(["genkey", "-o"])
            .arg(&key_file),
    );
    assert!(o.status.success(), "{o:?}");
    let key = mcast::heartbeat::read_key(&key_file).unwrap();
    let addr: SocketAddr = "127.0.0.1:18445".parse().unwrap();
    let cfg = dir.path().join("director.toml");
    fs::write(
        &cfg,
        format!(
            "[director]\nlisten = \"{addr}\"\nkey_file = '{}'\n",
            key_file.display()
        ),
    )
    .unwrap();
    let mut d = start_director(&cfg, addr);
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hb = |seq: u64| {
        heartbeat(
            "127.0.0.1:18449".parse().unwrap(),
            seq,
            unix_ms,
            ServerState::Online,
        )
    };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let genuine = hb(5).encode(&key);
    sock.send_to(&genuine, addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = stats(addr);
    sock.send_to(&genuine, addr).unwrap(); // replayed
    sock.send_to(&hb(4).encode(&key), addr).unwrap(); // older: replayed
    let mut forged = hb(6);
    forged.state = ServerState::Stopping;
    sock.send_to(&forged.encode(&[0x55; 32]), addr).unwrap(); // forged
    sock.send_to(&genuine[..8], addr).unwrap(); // truncated
    std::thread::sleep(Duration::from_millis(300));
    let s = stats(addr);
    let delta =
        |k: &str| s["counters"][k].as_u64().unwrap() - before["counters"][k].as_u64().unwrap();
    println!(
        "heartbeats: replayed +{}, forged +{}, malformed +{}, accepted +{}",
        delta("heartbeats_replayed"),
        delta("heartbeats_forged"),
        delta("heartbeats_malformed"),
        delta("heartbeats_accepted")
    );
    assert_eq!(delta("heartbeats_replayed"), 2, "{s}");
    assert_eq!(delta("heartbeats_forged"), 1, "{s}");
    assert_eq!(delta("heartbeats_malformed"), 1, "{s}");
    assert_eq!(delta("heartbeats_accepted"), 0, "{s}");
    let e = &s["servers"][0];
    assert_eq!(
        (e["seq"].as_u64(), e["up"].as_bool(), e["state"].as_str()),
        (Some(5), Some(true), Some("online")),
        "{s}"
    );
    d.kill();
}

/// Send `payload` to `to` with UDP source port `src_port` on 127.0.0.1 (a spoofed source),
/// through a raw socket. `false` when raw sockets are not permitted here.
fn send_spoofed(src_port: u16, to: SocketAddr, payload: &[u8]) -> bool {
    let Ok(s) = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    ) else {
        return false;
    };
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    p.extend_from_slice(payload);
    let dest = SocketAddr::new(to.ip(), 0);
    s.send_to(&p, &dest.into()).is_ok()
}

/// 8. A spoofed unicast request: an attacker asks, in a member's name, for unicast to a
///    victim address (source port forged through a raw socket as root; elsewhere sent from
///    the victim's own socket, which the server cannot tell apart). The victim's address is
///    unproven: it gets at most one datagram no larger than the request (a Retry carrying an
///    address token) and no data; no cookie is made (`cookies_sent` stays), and a guessed
///    confirmation without the member's session MAC is dropped unanswered (`session_forged`).
#[test]
fn spoofed_unicast_request() {
    let site = Site::new(90, "rate_mbps = 20.0\nlease_ms = 5000");
    site.pack("clip", 2 * MB, 90);
    let mut srv = site.serve();
    let rid: u64 = rand::random();
    let mut member = Ctl::new(site.control, rid);
    let Control::JoinOk { archive_id, .. } = member.request(Control::Join {
        title: "clip".into(),
    }) else {
        panic!("join refused")
    };
    let victim = UdpSocket::bind("127.0.0.1:0").unwrap();
    let vport = victim.local_addr().unwrap().port();
    let before = site.stats();
    let request = Envelope::new(rid, 1, Control::UnicastRequest { archive_id }).encode();
    let spoofed = send_spoofed(vport, site.control, &request);
    if !spoofed {
        victim.send_to(&request, site.control).unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Some(b) = recv_until(&victim, deadline) {
        got.push(b);
    }
    let amplification = got.iter().map(Vec::len).sum::<usize>() as f64 / request.len() as f64;
    println!(
        "spoofed unicast request (raw socket: {spoofed}): victim got {} datagrams, {:?} bytes; \
         request {} bytes; amplification {amplification:.2}",
        got.len(),
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        request.len()
    );
    assert!(got.len() <= 1, "victim got more than one datagram");
    for g in &got {
        assert!(matches!(
            Envelope::decode(g).map(|e| e.msg),
            Ok(Control::Retry { .. })
        ));
        assert!(g.len() <= request.len(), "the reply amplifies");
    }
    // A guessed confirmation in the victim's name.
    let confirm = Envelope::new(
        rid,
        2,
        Control::UnicastConfirm {
            archive_id,
            cookie: [0x42; 16],
        },
    )
    .encode();
    if !(spoofed && send_spoofed(vport, site.control, &confirm)) {
        victim.send_to(&confirm, site.control).unwrap();
    }
    let (data, other) = count_arrivals(&victim, Duration::from_secs(1));
    assert_eq!(data, 0, "data sent to an unverified address");
    assert_eq!(other, 0, "a forged confirmation was answered");
    let s = site.stats();
    let delta = |k: &str| counter(&s, k) - counter(&before, k);
    println!(
        "spoofed unicast request: cookies_sent +{}, session_forged +{}, unicast_started +{}",
        delta("cookies_sent"),
        delta("session_forged"),
        delta("unicast_started")
    );
    assert_eq!(delta("cookies_sent"), 0, "{s}");
    assert_eq!(delta("session_forged"), 1, "{s}");
    assert_eq!(delta("unicast_started"), 0, "{s}");
    assert_eq!(channels(&s)[0]["unicast"], 0, "{s}");
    srv.assert_running();
}

/// 9. A NAK flood from one address (valid NAKs for real units, huge ranges, units that do not
///    exist, random receiver ids) while a normal receiver downloads: the receiver finishes
///    byte-identical in about a loop; repairs stay within `repair_share` of the channel; the
///    server counts rate-limited NAKs and ignored units.
#[test]
fn nak_flood() {
    // 4 MB at 20 Mbit/s: a ~1.7 s loop. repair_share 0.2: at most 1 repair per 4 loop packets.
    let site = Site::new(
        91,
        "rate_mbps = 20.0\nlease_ms = 5000\nrepair_share = 0.2\nnak_rate = 500.0",
    );
    let archive = site.pack("film", 4 * MB, 91);
    let head = ArchiveFile::open(&archive).unwrap().head;
    let (tag, units) = (archive_tag(&head.archive_id), head.loop_packets());
    let mut srv = site.serve();
    let (rx, _group) = receiver_on_group(&site, "film", "out");
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let control = site.control;
    let flood_stop = stop.0.clone();
    let flooder = std::thread::spawn(move || {
        // Another loopback address: the flood has its own rate bucket, as from another host.
        let s = UdpSocket::bind("127.0.0.66:0").unwrap();
        let mut sent = 0u64;
        let mut i = 0u64;
        while !flood_stop.load(Ordering::Relaxed) {
            i += 1;
            let ranges = match i % 3 {
                0 => (0..40).map(|k| ((i * 131 + k * 97) % units, 8)).collect(),
                1 => vec![(0, u32::MAX), (units / 2, u32::MAX)],
                _ => vec![(units + i, 1000), (u64::MAX - 5, u32::MAX)],
            };
            let b = Nak {
                archive_tag: tag,
                session_tag: i,
                ranges,
                symbols: Vec::new(),
            }
            .encode();
            if s.send_to(&b, control).is_ok() {
                sent += 1;
            }
            if i % 8 == 0 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        sent
    });
    let done = rx.wait(RECV_LIMIT);
    let s = site.stats();
    drop(stop);
    let sent = flooder.join().unwrap();
    srv.assert_running();
    let r = done.assert_complete(&archive);
    let c = |k: &str| counter(&s, k);
    let loop_secs = (r.loop_bytes * 8) as f64 / 20e6;
    println!(
        "NAK flood: {sent} NAKs sent; server naks_received {}, naks_rate_limited {}, \
         nak_units_ignored {}, nak_units_coalesced {}, repairs_sent {} of packets_sent {} \
         ({:.3}); receiver {:.2} s for a {loop_secs:.2} s loop",
        c("naks_received"),
        c("naks_rate_limited"),
        c("nak_units_ignored"),
        c("nak_units_coalesced"),
        c("repairs_sent"),
        c("packets_sent"),
        c("repairs_sent") as f64 / c("packets_sent") as f64,
        r.seconds
    );
    assert!(sent > 1000, "flood too small: {sent}");
    assert!(c("naks_rate_limited") > 0, "{s}");
    // NAKs in no member's name (without its session MAC) cost no repair at all.
    assert!(c("naks_unauthenticated") > 0, "{s}");
    // Repairs: at most share/(1 - share) per loop packet, plus the token cap (64).
    let loop_pkts = c("packets_sent") - c("repairs_sent");
    assert!(
        c("repairs_sent") as f64 <= loop_pkts as f64 * 0.25 + 64.0,
        "repairs over the repair share: {s}"
    );
    assert!(
        r.seconds < loop_secs / 0.8 * 1.5 + 2.0,
        "receiver slowed by the flood: {r:?}"
    );
}

const NS_DISK_FULL: &str = r#"
get() { "$RECV" get "$TITLE" --server "$SERVER" -o "$OUT" --timeout 30; }
# (a) Too small from the start: refused up front.
mount -t tmpfs -o size=3m tmpfs "$OUT" || exit 90
get
echo "{\"event\":\"upfront_exit\",\"code\":$?}"
ls -a "$OUT" >"$KEEP/listing-upfront"
# (b) The disk fills mid-download: another writer takes the space at 30 %.
mount -o remount,size=12m "$OUT" || exit 91
get >"$KEEP/mid.out" 2>"$KEEP/mid.err" &
pid=$!
i=0
# At 30 % (the receiver checkpoints every 250 ms): some progress is on disk.
until grep -Eq '"percent":([3-9][0-9]|100)' "$KEEP/mid.out"; do
  i=$((i+1)); [ $i -ge 2000 ] && break; sleep 0.005
done
dd if=/dev/zero of="$OUT/filler" bs=64k 2>/dev/null
wait $pid
echo "{\"event\":\"mid_exit\",\"code\":$?}"
ls -a "$OUT" >"$KEEP/listing-mid"
# Space freed: the same command resumes.
rm -f "$OUT/filler"
get
rc=$?
cp "$OUT/$TITLE.mca" "$KEEP/" 2>/dev/null
exit $rc
"#;

/// 10. A receiver with a full disk, in a private mount namespace on a small tmpfs. (a) Too
///     small for the archive: exit 6 "no space" at once, nothing left behind. (b) The space
///     runs out mid-download (another writer fills the disk): exit 6 "no space", the part
///     and state files kept; once the space is freed the same command resumes from them
///     (units kept, none failing re-verification) and finishes byte-identical.
#[test]
fn full_disk() {
    let Some(prefix) = namespace_or_skip("full_disk", "--mount", &["mount", "dd"]) else {
        return;
    };
    // 6 MB at 16 Mbit/s: a ~3 s loop, so the disk fills well before the end.
    let site = Site::new(92, "rate_mbps = 16.0\nlease_ms = 2000");
    let archive = site.pack("film", 6 * MB, 92);
    let _srv = site.serve();
    let (out, keep) = (site.out_dir("small"), site.out_dir("keep"));
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&keep).unwrap();
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .args(["sh", "-c", NS_DISK_FULL])
        .env("RECV", recv_bin())
        .env("SERVER", site.control.to_string())
        .env("TITLE", "film")
        .env("OUT", &out)
        .env("KEEP", &keep);
    let f = Receiver::spawn(cmd, &keep, "film", true).wait(Duration::from_secs(60));
    let code = |event: &str| {
        f.lines
            .iter()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == event)
            })
            .unwrap_or_else(|| panic!("no {event}: {f:#?}"))["code"]
            .clone()
    };
    let read = |name: &str| fs::read_to_string(keep.join(name)).unwrap_or_default();
    let (upfront, mid) = (read("listing-upfront"), read("listing-mid"));
    let mid_err = read("mid.err");
    println!(
        "full disk (a) up front: exit {}, files left: {:?}; stderr: {}",
        code("upfront_exit"),
        upfront.split_whitespace().collect::<Vec<_>>(),
        f.stderr
            .lines()
            .find(|l| l.contains("no space"))
            .unwrap_or("")
    );
    println!(
        "full disk (b) mid-download: exit {}, files left: {:?}; stderr: {}",
        code("mid_exit"),
        mid.split_whitespace().collect::<Vec<_>>(),
        mid_err.lines().last().unwrap_or("")
    );
    assert_eq!(code("upfront_exit"), 6, "{f:#?}");
    assert!(f.stderr.to_lowercase().contains("no space"), "{f:#?}");
    assert!(
        !upfront.contains("film"),
        "files left by the refused run: {upfront}"
    );
    assert_eq!(code("mid_exit"), 6, "{f:#?}\n{mid_err}");
    assert!(mid_err.to_lowercase().contains("no space"), "{mid_err}");
    assert!(
        mid.contains("film.mca.part") && mid.contains("film.mca.state"),
        "{mid}"
    );
    let r = f.assert_complete(&archive);
    println!(
        "full disk: resumed with {} of {} units, {} failed re-verification, {:.2} s",
        r.units_at_start, r.loop_units, r.units_failed_recheck, r.seconds
    );
    assert!(
        r.units_at_start > 0,
        "nothing kept from the interrupted run: {r:?}"
    );
    assert_eq!(r.units_failed_recheck, 0, "part file inconsistent: {r:?}");
}

/// 11. Unreadable archives in the archive directory (truncated, empty, garbage, a directory
///     named like an archive): each is logged and skipped (`archives_skipped`), the good one
///     is still served; `mcastd verify` exits 3 on the truncated one and on one with a
///     corrupted data packet.
#[test]
fn unreadable_archives() {
    let site = Site::new(93, "rate_mbps = 40.0");
    let good = site.pack("clip", MB, 93);
    let t = site.pack("trunc", MB, 94);
    let b = fs::read(&t).unwrap();
    fs::write(&t, &b[..b.len() / 2]).unwrap();
    fs::write(site.archive_path("empty"), b"").unwrap();
    fs::write(site.archive_path("garbage"), random_bytes(100_000, 95)).unwrap();
    fs::create_dir_all(site.archive_path("folder")).unwrap();
    let bad = site.pack("bitrot", MB, 96);
    let mut b = fs::read(&bad).unwrap();
    b[16 + 1280 * 5 + 3] ^= 0x10;
    fs::write(&bad, &b).unwrap();

    for (title, says) in [
        ("trunc", "not an mcast archive"),
        ("bitrot", "data packet 5 "),
    ] {
        let o = mcastd(&site, &["verify", title]);
        println!(
            "verify {title}: exit {:?}: {}",
            o.status.code(),
            stderr(&o).trim()
        );
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    }
    fs::remove_file(&bad).unwrap(); // served as is (packets are checked by receivers)
    let mut srv = site.serve();
    let s = site.stats();
    println!(
        "unreadable archives: archives_skipped {}",
        counter(&s, "archives_skipped")
    );
    assert_eq!(counter(&s, "archives_skipped"), 4, "{s}");
    let log = srv.log_text();
    for name in ["trunc.mca", "empty.mca", "garbage.mca", "folder.mca"] {
        assert!(log.contains(name), "{name} not named in the log:\n{log}");
    }
    assert_eq!(catalog(&site), vec!["clip".to_string()]);
    site.get("clip", &site.out_dir("out"), &[])
        .wait(RECV_LIMIT)
        .assert_complete(&good);
    srv.assert_running();
}

/// 11b. An archive truncated under the running server (while a receiver downloads it): the
///     server withdraws that title (`archives_withdrawn`, its channel closed, the path
///     logged) instead of exiting; its receiver stops with "not found" (exit 5) rather than
///     waiting forever, and other titles are still served.
#[test]
fn archive_truncated_while_served() {
    // 4 MB at 16 Mbit/s: a ~2 s loop.
    let site = Site::new(95, "rate_mbps = 16.0\nlease_ms = 2000");
    let film = site.pack("film", 4 * MB, 97);
    let clip = site.pack("clip", MB, 98);
    let mut srv = site.serve();
    let mut rx = site.get("film", &site.out_dir("film"), &["--timeout", "30"]);
    rx.wait_progress(|p| p >= 10.0, Duration::from_secs(20));
    fs::OpenOptions::new()
        .write(true)
        .open(&film)
        .unwrap()
        .set_len(MB as u64)
        .unwrap();
    let f = rx.wait(Duration::from_secs(40));
    println!(
        "archive truncated while served: receiver exit {:?}: {}",
        f.code,
        f.stderr.lines().last().unwrap_or("")
    );
    srv.assert_running();
    let s = site.stats();
    println!(
        "archive truncated while served: archives_withdrawn {}, channels_closed {}",
        counter(&s, "archives_withdrawn"),
        counter(&s, "channels_closed")
    );
    assert_eq!(counter(&s, "archives_withdrawn"), 1, "{s}");
    assert!(
        srv.log_text().contains("film.mca") && srv.log_text().contains("withdrawn"),
        "{}",
        srv.log_text()
    );
    f.assert_code(5);
    assert_eq!(catalog(&site), vec!["clip".to_string()]);
    site.get("clip", &site.out_dir("clip"), &[])
        .wait(RECV_LIMIT)
        .assert_complete(&clip);
    srv.assert_running();
}

/// Run `bin --config FILE [args]` on `text`; exit status 2 and stderr naming the file, the
/// line and every string in `want`.
fn assert_config_refused(
    bin: &Path,
    args: &[&str],
    dir: &Path,
    text: &str,
    line: usize,
    want: &[&str],
) {
    let cfg = dir.join(format!("c{}.toml", rand::random::<u32>()));
    fs::write(&cfg, text).unwrap();
    let o = run_out(Command::new(bin).arg("--config").arg(&cfg).args(args));
    let err = stderr(&o);
    println!(
        "{}: {}",
        bin.file_name().unwrap().to_string_lossy(),
        err.lines().next().unwrap_or("")
    );
    assert_eq!(o.status.code(), Some(2), "{text:?}: {o:?}");
    assert!(err.contains(cfg.to_str().unwrap()), "file not named: {err}");
    assert!(
        err.contains(&format!("line {line}")),
        "line {line} not named: {err}"
    );
    for w in want {
        assert!(err.contains(w), "{w:?} not named: {err}");
    }
}

/// 12. Config errors (bad type, unknown field, bad value) in `mcastd.toml` and
///     `director.toml`: exit 2, and stderr names the file, the line and the field.
#[test]
fn config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = mcastd_bin();
    let head = "# mcastd\n[store]\narchive_dir = \"a\"\n\n[server]\n";
    let cases: &[(&str, usize, &[&str])] = &[
        ("rate_mbps = \"fast\"\n", 6, &["rate_mbps", "invalid type"]),
        ("rate_mbpz = 5.0\n", 6, &["rate_mbpz", "unknown field"]),
        (
            "ttl = 1\nrepair_share = 2.0\n",
            7,
            &["server.repair_share", "0.95"],
        ),
        ("channels = 4\nnak_rate = -1.0\n", 7, &["server.nak_rate"]),
    ];
    for (tail, line, want) in cases {
        assert_config_refused(&m, &["serve"], d, &format!("{head}{tail}"), *line, want);
    }
    let db = director_bin();
    let head = "[director]\nlisten = \"127.0.0.1:0\"\n";
    let cases: &[(&str, usize, &[&str])] = &[
        ("down_after = \"x\"\n", 3, &["down_after", "invalid type"]),
        ("down_aftr = 3\n", 3, &["down_aftr", "unknown field"]),
        (
            "\ndown_after = 0\n",
            4,
            &["director.down_after", "1 ..= 100"],
        ),
        ("max_skew_ms = 5\n", 3, &["director.max_skew_ms"]),
    ];
    for (tail, line, want) in cases {
        assert_config_refused(&db, &[], d, &format!("{head}{tail}"), *line, want);
    }
}

/// 14. A join rewritten on the way (issue 20's table: "`get` does not check that the signed
///     head's title is the one asked for"). A man in the middle of the control path turns a
///     join for `film-1` into one for `film-2` (same length, so nothing else changes): the
///     server answers with film-2's validly signed archive. The receiver must refuse it —
///     exit 3 naming both titles, no `film-1.mca` — instead of saving it under the name asked
///     for. (Authenticated control messages, issue 20 item 2, will stop the rewrite itself.)
#[test]
fn a_join_answered_with_another_titles_archive_is_refused() {
    let site = Site::new(96, "rate_mbps = 40.0");
    site.pack("film-1", MB, 11);
    site.pack("film-2", MB, 12);
    let mut srv = site.serve();
    // The man in the middle: one socket between the receiver and the server.
    let mitm = UdpSocket::bind("127.0.0.1:0").unwrap();
    mitm.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let proxy = mitm.local_addr().unwrap();
    let server = site.control;
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stopped = stop.0.clone();
    let rewritten = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = rewritten.clone();
    let relay = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut client: Option<SocketAddr> = None;
        while !stopped.load(Ordering::Relaxed) {
            let Ok((n, from)) = mitm.recv_from(&mut buf) else {
                continue;
            };
            let msg = &mut buf[..n];
            if from == server {
                if let Some(c) = client {
                    let _ = mitm.send_to(msg, c);
                }
                continue;
            }
            client = Some(from);
            if let Some(at) = msg.windows(6).position(|w| w == b"film-1") {
                msg[at..at + 6].copy_from_slice(b"film-2");
                count.fetch_add(1, Ordering::Relaxed);
            }
            let _ = mitm.send_to(msg, server);
        }
    });
    let out = site.out_dir("mitm");
    let mut cmd = Command::new(recv_bin());
    cmd.arg("get")
        .arg("film-1")
        .arg("--server")
        .arg(proxy.to_string())
        .arg("-o")
        .arg(&out)
        .args(["--timeout", "30"]);
    let f = Receiver::spawn(cmd, &out, "film-1", false).wait(Duration::from_secs(40));
    drop(stop);
    relay.join().unwrap();
    println!(
        "join rewritten {} time(s) on the way: exit {:?}: {}",
        rewritten.load(Ordering::Relaxed),
        f.code,
        f.stderr.lines().last().unwrap_or("")
    );
    assert!(rewritten.load(Ordering::Relaxed) >= 1);
    f.assert_code(3);
    assert!(
        f.stderr.contains("\"film-1\"") && f.stderr.contains("\"film-2\""),
        "{f:#?}"
    );
    assert!(!mcast::archive::archive_path(&out, "film-1").exists());
    srv.assert_running();
}

/// Send `req` from `sock` (an unproven address) to `to` and assert that no reply within 60 ms
/// is larger than it; the replies' lengths.
fn replies_no_larger(sock: &UdpSocket, to: SocketAddr, req: &[u8], what: &str) -> Vec<usize> {
    sock.send_to(req, to).unwrap();
    let deadline = Instant::now() + Duration::from_millis(60);
    let mut lens = Vec::new();
    while let Some(b) = recv_until(sock, deadline) {
        assert!(
            b.len() <= req.len(),
            "{}-byte reply to a {}-byte {what} from an unproven address",
            b.len(),
            req.len()
        );
        lens.push(b.len());
    }
    lens
}

/// 14. Amplification: no reply to an unproven source address is larger than its request, for
///     every request type, at the server and at a director, whatever token it carries (none,
///     padded, forged, or another address's); stats go to admin addresses only. On the main
///     of step 12 a 14-byte stats request drew 1,325 bytes with one channel open, a head
///     request 1 KB, a catalogue request the whole list.
#[test]
fn no_reply_to_an_unproven_address_is_larger_than_its_request() {
    // Loopback is 127/8: the operator's host is 127.0.0.1, the attacker 127.0.0.2.
    let site = Site::new(98, "rate_mbps = 20.0\nadmin = [\"127.0.0.1\"]");
    for i in 0..40 {
        site.pack(&format!("title-with-a-long-name-{i:02}"), 20_000, 980 + i);
    }
    let mut srv = site.serve();
    // An operator's session from 127.0.0.1: a channel open, its stats big.
    let mut op = Ctl::new(site.control, 77);
    let Control::JoinOk { archive_id, .. } = op.request(Control::Join {
        title: "title-with-a-long-name-00".into(),
    }) else {
        panic!("join refused")
    };
    let other_addresss_token = op.token.expect("the operator's address was proven");
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    let requests = [
        Control::CatalogRequest { start: 0 },
        Control::Join { title: "t".into() },
        Control::JoinAt {
            title: "title-with-a-long-name-01".into(),
            block: 0,
        },
        Control::HeadRequest {
            archive_id,
            offset: 0,
        },
        Control::Keepalive {
            archive_id,
            have: 0,
            total: 1,
            rtt_us: 2_000_000,
            rx_bps: 0,
            loss_ppm: 0,
            capacity_bps: 0,
        },
        Control::ChangeTier {
            archive_id,
            tier: 0,
        },
        Control::UnicastRequest { archive_id },
        Control::UnicastConfirm {
            archive_id,
            cookie: [1; 16],
        },
        Control::ProbeBurst {
            archive_id,
            cookie: [1; 16],
            tier: 0,
            ms: 50,
        },
        Control::StatsRequest,
        Control::PlayRequest {
            title: "title-with-a-long-name-00".into(),
            ticket: vec![0; 300],
            receiver_pub: [2; 32],
            proof: [0; 32],
        },
        Control::Complete {
            archive_id,
            elapsed_ms: 1000,
            milli_loops: 1000,
        },
    ];
    let mut worst = 0f64;
    let mut answered = 0;
    for msg in &requests {
        for rid in [77, 5] {
            let env = Envelope::new(rid, 1, msg.clone());
            let forms = [
                env.encode(),
                env.encode_request(),
                env.clone().with_token(Some([0x5a; 16])).encode(),
                env.clone().with_token(Some(other_addresss_token)).encode(),
            ];
            for req in forms {
                let what = format!("{msg:?}");
                for len in replies_no_larger(&attacker, site.control, &req, &what) {
                    answered += 1;
                    worst = worst.max(len as f64 / req.len() as f64);
                }
            }
        }
    }
    println!(
        "amplification at the server: {} request forms, {answered} replies, largest reply/request {worst:.2}",
        requests.len() * 8
    );
    // The attacker's own address, once proven, gets full answers — but no stats.
    let mut att = Ctl::on(attacker, site.control, 5);
    assert!(matches!(
        att.request(Control::CatalogRequest { start: 0 }),
        Control::CatalogReply { ref items, .. } if !items.is_empty()
    ));
    let refused = att.request(Control::StatsRequest);
    assert!(
        matches!(&refused, Control::Error { message, .. } if message.contains("admin")),
        "{refused:?}"
    );
    let s = site.stats();
    println!(
        "server: retries_sent {}, unvalidated_dropped {}, replies_withheld {}, stats_refused {}",
        counter(&s, "retries_sent"),
        counter(&s, "unvalidated_dropped"),
        counter(&s, "replies_withheld"),
        counter(&s, "stats_refused")
    );
    assert!(counter(&s, "retries_sent") > 0, "{s}");
    assert!(counter(&s, "unvalidated_dropped") > 0, "{s}");
    assert_eq!(counter(&s, "stats_refused"), 1, "{s}");
    // Nothing the attacker sent made a member: only the operator's session holds the channel.
    assert_eq!(counter(&s, "joins"), 1, "{s}");
    srv.assert_running();

    // A director: route requests and plain control requests from the attacker.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hb.key");
    let o = run_out(
        Command::new(director_bin())
            .args(["genkey", "-o"])
            .arg(&key_file),
    );
    assert!(o.status.success(), "{o:?}");
    let addr: SocketAddr = "127.0.0.1:18595".parse().unwrap();
    let cfg = dir.path().join("director.toml");
    fs::write(
        &cfg,
        format!(
            "[director]\nlisten = \"{addr}\"\nkey_file = '{}'\nadmin = [\"127.0.0.1\"]\n\
             [[director.sites]]\nname = \"A\"\nprefixes = [\"127.0.0.0/24\"]\nno_multicast = \"http\"\n\
             http = [\"http://{}/\"]\n",
            key_file.display(),
            "m".repeat(190)
        ),
    )
    .unwrap();
    let mut d = start_director(&cfg, addr);
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    let route = mcast::wire::director::DirectorMsg::RouteRequest {
        req_id: 1,
        title: "x".into(),
        rx_bps: 0,
        exclude: Vec::new(),
    }
    .encode();
    let mut forms = vec![route];
    // Sites: the site route request (its answer carries the site's mirrors) and placement
    // requests without a token, with a forged one.
    use mcast::wire::director::DirectorMsg;
    forms.push(
        DirectorMsg::SiteRouteRequest {
            req_id: 2,
            title: "x".into(),
            rx_bps: 0,
            exclude: Vec::new(),
        }
        .encode(),
    );
    for token in [None, Some([0x5a; 16])] {
        forms.push(
            DirectorMsg::PlacementRequest {
                req_id: 3,
                site: "A".into(),
                token,
            }
            .encode(),
        );
    }
    for msg in [Control::StatsRequest, Control::Join { title: "x".into() }] {
        let env = Envelope::new(5, 1, msg);
        forms.push(env.encode());
        forms.push(env.encode_request());
        forms.push(env.with_token(Some([0x5a; 16])).encode());
    }
    let mut answered = 0;
    for req in &forms {
        answered += replies_no_larger(&attacker, addr, req, "director request").len();
    }
    println!(
        "amplification at the director: {} requests, {answered} replies",
        forms.len()
    );
    assert!(
        answered >= 2,
        "the route refusal and the padded Retries are answered"
    );
    // A placement request from a proven address outside `admin`: refused.
    let ask = |token| {
        let req = DirectorMsg::PlacementRequest {
            req_id: 9,
            site: "A".into(),
            token,
        }
        .encode();
        attacker.send_to(&req, addr).unwrap();
        let b = recv_until(&attacker, Instant::now() + Duration::from_secs(2)).expect("answer");
        DirectorMsg::decode(&b).unwrap()
    };
    let DirectorMsg::PlacementRetry { token, .. } = ask(None) else {
        panic!("no retry")
    };
    assert!(matches!(
        ask(Some(token)),
        DirectorMsg::PlacementRefused { ref message, .. } if message.contains("admin")
    ));
    let mut att = Ctl::on(attacker, addr, 5);
    assert!(matches!(
        att.request(Control::StatsRequest),
        Control::Error { ref message, .. } if message.contains("admin")
    ));
    let s = stats(addr);
    assert_eq!(s["counters"]["stats_refused"], 1, "{s}");
    assert_eq!(s["counters"]["placements_refused"], 1, "{s}");
    d.kill();
}

/// 15. SYNCs on a receiver's group that its server did not sign (an attacker on the LAN
///     announcing a 2 s group RTT and a crowd, which would stretch every NAK timer, and a
///     queue out of nothing) and genuine SYNCs replayed later: dropped and counted
///     (`syncs_forged`, `syncs_stale`); the file is byte-identical. Before signed SYNCs the
///     receiver took every one (a download under 3 % loss: 4.7 s alone, 13.3 s with them).
#[test]
fn forged_and_replayed_syncs() {
    let site = Site::new(99, "rate_mbps = 25.0\nlease_ms = 5000");
    let archive = site.pack("film", 3 * MB, 99);
    let head = ArchiveFile::open(&archive).unwrap().head;
    let tag = archive_tag(&head.archive_id);
    let loop_packets = head.loop_packets();
    let mut srv = site.serve();
    let (rx, group) = receiver_on_group(&site, "film", "out");
    // Capture one genuine SYNC off the group, to replay.
    let listen = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    listen.set_reuse_address(true).unwrap();
    listen
        .bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())
        .unwrap();
    listen
        .join_multicast_v4(group.ip(), &Ipv4Addr::LOCALHOST)
        .unwrap();
    let listen: UdpSocket = listen.into();
    let deadline = Instant::now() + Duration::from_secs(10);
    let genuine = loop {
        let b = recv_until(&listen, deadline).expect("a SYNC on the group");
        if b.len() > 1 && b[1] == 0 && b[4..12] == tag {
            break b;
        }
    };
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sender = blast(group, stop.0.clone(), move |i| {
        let info = mcast::wire::data::SyncInfo {
            loop_packets,
            rate_bps: 1_000,
            grtt_us: 2_000_000,
            group_size: 100_000,
            send_us: u64::MAX / 2 + i,
        };
        let mut forged = info.encode().to_vec();
        forged.extend_from_slice(&random_bytes(64, i)); // no valid signature
        vec![
            data_packet(DataKind::Sync, tag, false, &forged),
            data_packet(DataKind::Sync, tag, false, &info.encode()), // unsigned, old size
            genuine.clone(),
        ]
    });
    let done = rx.wait(RECV_LIMIT);
    drop(stop);
    let sent = sender.join().unwrap();
    srv.assert_running();
    let r = done.assert_complete(&archive);
    println!(
        "forged SYNCs: sent {sent}; receiver syncs_forged {}, syncs_stale {}, {:.2} s",
        r.syncs_forged, r.syncs_stale, r.seconds
    );
    assert!(sent > 100, "sent only {sent}");
    assert!(r.syncs_forged > 0, "forged SYNCs not counted: {r:?}");
    assert!(r.syncs_stale > 0, "replayed SYNCs not counted: {r:?}");
}

/// 16. Speaking for another receiver's session: with its id (say, learned from a log or a
///     guess) and its NAKs' session tag, but not its key, from another (proven) address, a `Complete`, a tier change, a
///     keepalive reporting a 2 s RTT and NAKs are dropped and counted (`session_forged`,
///     `naks_unauthenticated`); the session lives on. Before session keys, the `Complete`
///     alone ended it. And one address cannot hold more than `max_sessions_per_address`.
#[test]
fn sessions_cannot_be_spoken_for_or_flooded() {
    let site = Site::new(
        100,
        "rate_mbps = 20.0\nlease_ms = 5000\nmax_sessions_per_address = 20",
    );
    site.pack("film", MB, 100);
    let mut srv = site.serve();
    let mut victim = Ctl::new(site.control, 77);
    let Control::JoinOk { archive_id, .. } = victim.request(Control::Join {
        title: "film".into(),
    }) else {
        panic!("join refused")
    };
    let mut att = Ctl::on(UdpSocket::bind("127.0.0.2:0").unwrap(), site.control, 77);
    // The attacker's own address is proven (a catalogue request gets it a token).
    assert!(matches!(
        att.request(Control::CatalogRequest { start: 0 }),
        Control::CatalogReply { .. }
    ));
    let before = site.stats();
    for msg in [
        Control::Complete {
            archive_id,
            elapsed_ms: 1000,
            milli_loops: 1000,
        },
        Control::ChangeTier {
            archive_id,
            tier: 1,
        },
        Control::Keepalive {
            archive_id,
            have: 0,
            total: 1,
            rtt_us: 2_000_000,
            rx_bps: 1,
            loss_ppm: 900_000,
            capacity_bps: 1,
        },
        Control::UnicastRequest { archive_id },
        // A join under the victim's id from another address.
        Control::Join {
            title: "film".into(),
        },
    ] {
        att.send(msg);
    }
    let nak = Nak {
        archive_tag: archive_tag(&archive_id),
        // The victim's tag, as its NAKs show it on the group; not its key.
        session_tag: mcast::wire::nak::session_tag(&victim.session_key.expect("joined")),
        ranges: vec![(0, 8192)],
        symbols: Vec::new(),
    };
    for _ in 0..50 {
        att.sock.send_to(&nak.encode(), site.control).unwrap();
    }
    let (_, replies) = count_arrivals(&att.sock, Duration::from_millis(300));
    assert_eq!(replies, 0, "forged session messages were answered");
    // The victim's own (sealed) keepalive still renews its lease: the session lives.
    assert!(matches!(
        victim.request(Control::Keepalive {
            archive_id,
            have: 0,
            total: 1,
            rtt_us: 1000,
            rx_bps: 0,
            loss_ppm: 0,
            capacity_bps: 0,
        }),
        Control::LeaseOk { .. }
    ));
    let s = site.stats();
    let delta = |k: &str| counter(&s, k) - counter(&before, k);
    println!(
        "forged for another session: session_forged +{}, naks_unauthenticated +{}, completions +{}",
        delta("session_forged"),
        delta("naks_unauthenticated"),
        delta("completions")
    );
    assert_eq!(delta("session_forged"), 5, "{s}");
    assert!(delta("naks_unauthenticated") > 0, "{s}");
    assert_eq!(delta("completions"), 0, "{s}");
    assert_eq!(delta("tier_changes"), 0, "{s}");
    assert_eq!(delta("repairs_sent"), 0, "{s}");
    // A join flood from one address: members capped at max_sessions_per_address.
    for rid in 1000..1060 {
        let mut j = Ctl::on(att.sock.try_clone().unwrap(), site.control, rid);
        j.token = att.token;
        j.send(Control::Join {
            title: "film".into(),
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = site.stats();
    let members: u64 = channels(&s)
        .iter()
        .map(|c| c["members"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "join flood from one address: {members} members held, {} refused",
        counter(&s, "refused_sessions_per_address")
    );
    assert!(members <= 21, "{s}");
    assert!(counter(&s, "refused_sessions_per_address") >= 39, "{s}");
    srv.assert_running();
}

/// 17. Trust that lasts: a receiver remembers a server's key in its known-servers file, so a
///     later download of *another* title from a server at that address signed by another key
///     (a server impersonated or replaced) is refused — exit 3, naming the file and line to
///     edit — where before every new title was a first use and trusted. With `--server-key`
///     the operator's pin wins (and is recorded).
#[test]
fn a_known_servers_key_is_required_for_every_later_title() {
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_servers");
    let known_arg = known.to_str().unwrap();
    let first = Site::new(101, "rate_mbps = 40.0");
    let a = first.pack("film-a", MB, 21);
    let mut srv = first.serve();
    first
        .get(
            "film-a",
            &first.out_dir("a"),
            &["--known-servers", known_arg],
        )
        .wait(RECV_LIMIT)
        .assert_complete(&a);
    let text = fs::read_to_string(&known).unwrap();
    assert!(text.contains(&first.control.to_string()), "{text}");
    srv.guard.kill();
    // Another server at the same address, with its own identity.
    let second = Site::new(101, "rate_mbps = 40.0");
    let b = second.pack("film-b", MB, 22);
    let _srv = second.serve();
    let f = second
        .get(
            "film-b",
            &second.out_dir("b"),
            &["--known-servers", known_arg],
        )
        .wait(RECV_LIMIT);
    println!(
        "a changed server key: exit {:?}: {}",
        f.code,
        f.stderr.trim()
    );
    f.assert_code(3);
    assert!(
        f.stderr.contains(known_arg) && f.stderr.contains("line"),
        "{f:#?}"
    );
    assert!(!second.out_dir("b").join("film-b.mca").exists());
    // Without the store (first use per title) the same download was trusted.
    second
        .get("film-b", &second.out_dir("c"), &["--known-servers", "none"])
        .wait(RECV_LIMIT)
        .assert_complete(&b);
}

/// A director on `addr` listing servers `a` and `b`, each with its own key (made by
/// `mcast-director genkey` in `dir`), `b_extra` added to B's entry; the keys, the director,
/// and the time now in ms.
fn director_for_two_servers(
    dir: &Path,
    addr: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
    b_extra: &str,
) -> ([u8; 32], [u8; 32], Guard, u64) {
    fs::create_dir_all(dir).unwrap();
    let genkey = |name: &str| {
        let p = dir.join(name);
        let o = run_out(Command::new(director_bin()).args(["genkey", "-o"]).arg(&p));
        assert!(o.status.success(), "{o:?}");
        (mcast::heartbeat::read_key(&p).unwrap(), p)
    };
    let (ka, fa) = genkey("a.key");
    let (kb, fb) = genkey("b.key");
    let cfg = dir.join("director.toml");
    fs::write(
        &cfg,
        format!(
            "[director]\nlisten = \"{addr}\"\nkey_file = \"\"\n\
             [[director.servers]]\naddr = \"{a}\"\nkey_file = '{}'\n\
             [[director.servers]]\naddr = \"{b}\"\nkey_file = '{}'\n{b_extra}",
            fa.display(),
            fb.display()
        ),
    )
    .unwrap();
    let d = start_director(&cfg, addr);
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    (ka, kb, d, unix_ms)
}

/// 18. One heartbeat key for every server: a compromised server could mark the others stopping
///     or pull their receivers to itself. With `[[director.servers]]` each listed server has its
///     own key: a heartbeat naming server B under server A's key (or the old shared one) is
///     refused as forged and B stays online.
#[test]
fn a_server_cannot_speak_for_another_at_the_director() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:18601".parse().unwrap(),
        "127.0.0.1:18602".parse().unwrap(),
    );
    let addr: SocketAddr = "127.0.0.1:18596".parse().unwrap();
    let (ka, kb, mut d, unix_ms) = director_for_two_servers(dir.path(), addr, a, b, "");
    let hb = |server, seq, state| heartbeat(server, seq, unix_ms, state);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&hb(a, 1, ServerState::Online).encode(&ka), addr)
        .unwrap();
    sock.send_to(&hb(b, 1, ServerState::Online).encode(&kb), addr)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A, compromised, says B is stopping: under its own key, and under a guessed shared one.
    sock.send_to(&hb(b, 2, ServerState::Stopping).encode(&ka), addr)
        .unwrap();
    sock.send_to(&hb(b, 3, ServerState::Stopping).encode(&[0; 32]), addr)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s = stats(addr);
    println!(
        "per-server heartbeat keys: accepted {}, forged {}",
        s["counters"]["heartbeats_accepted"], s["counters"]["heartbeats_forged"]
    );
    assert_eq!(s["counters"]["heartbeats_accepted"], 2, "{s}");
    assert_eq!(s["counters"]["heartbeats_forged"], 2, "{s}");
    let servers = s["servers"].as_array().unwrap();
    let sb = servers
        .iter()
        .find(|e| e["server"] == b.to_string())
        .unwrap();
    assert_eq!(
        (sb["up"].as_bool(), sb["state"].as_str()),
        (Some(true), Some("online")),
        "{s}"
    );
    d.kill();
}

/// 18b. A listed server's heartbeat key proves who wrote a heartbeat, not where it came from:
///      one under server B's own key (taken from B, or B's genuine heartbeat captured and
///      re-sent) from another host is refused (`heartbeats_wrong_source`) and changes no
///      route; from B's own IP it is taken. (Loopback is 127/8: the test's sockets stand on
///      127.0.0.1, .2 and .3.)
#[test]
fn a_heartbeat_counts_only_from_its_servers_address() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:18611".parse().unwrap(),
        "127.0.0.3:18612".parse().unwrap(),
    );
    let addr: SocketAddr = "127.0.0.1:18597".parse().unwrap();
    let (ka, kb, mut d, unix_ms) = director_for_two_servers(dir.path(), addr, a, b, "");
    let hb = |server, seq, state| heartbeat(server, seq, unix_ms, state);
    let from_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from_b = UdpSocket::bind("127.0.0.3:0").unwrap();
    let elsewhere = UdpSocket::bind("127.0.0.2:0").unwrap();
    // Where the director sends a receiver asking for "film".
    let asker = UdpSocket::bind("127.0.0.1:0").unwrap();
    asker
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let route = || {
        std::thread::sleep(Duration::from_millis(200));
        let req = mcast::wire::director::DirectorMsg::RouteRequest {
            req_id: 1,
            title: "film".into(),
            rx_bps: 0,
            exclude: Vec::new(),
        };
        asker.send_to(&req.encode(), addr).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = asker.recv_from(&mut buf).expect("a route answer");
        match mcast::wire::director::DirectorMsg::decode(&buf[..n]).unwrap() {
            mcast::wire::director::DirectorMsg::RouteOk { server, .. } => Some(server),
            _ => None,
        }
    };
    from_a
        .send_to(&hb(a, 1, ServerState::Online).encode(&ka), addr)
        .unwrap();
    assert_eq!(route(), Some(a));

    // Under B's own key, from 127.0.0.2: "B is online" (it would share A's receivers), and
    // under A's key from there too: "A is stopping". Neither is taken.
    elsewhere
        .send_to(&hb(b, 1, ServerState::Online).encode(&kb), addr)
        .unwrap();
    elsewhere
        .send_to(&hb(a, 2, ServerState::Stopping).encode(&ka), addr)
        .unwrap();
    assert_eq!(route(), Some(a));
    let s = stats(addr);
    assert_eq!(counter(&s, "heartbeats_wrong_source"), 2, "{s}");
    assert_eq!(counter(&s, "heartbeats_accepted"), 1, "{s}");
    let servers = s["servers"].as_array().unwrap();
    assert!(
        servers.iter().all(|e| e["server"] != b.to_string()),
        "B became known from a heartbeat sent elsewhere: {s}"
    );

    // The same from the servers' own addresses: B comes up, A stops, receivers go to B.
    from_b
        .send_to(&hb(b, 1, ServerState::Online).encode(&kb), addr)
        .unwrap();
    from_a
        .send_to(&hb(a, 2, ServerState::Stopping).encode(&ka), addr)
        .unwrap();
    assert_eq!(route(), Some(b));
    let s = stats(addr);
    println!(
        "heartbeats bound to their server's address: accepted {}, wrong source {}",
        s["counters"]["heartbeats_accepted"], s["counters"]["heartbeats_wrong_source"]
    );
    assert_eq!(counter(&s, "heartbeats_accepted"), 3, "{s}");
    assert_eq!(counter(&s, "heartbeats_wrong_source"), 2, "{s}");
    d.kill();

    // B behind NAT: its entry says `any_source = true`, and its heartbeats count from
    // wherever they come (A's still only from A's address).
    let addr: SocketAddr = "127.0.0.1:18598".parse().unwrap();
    let (ka, kb, mut d, _) =
        director_for_two_servers(&dir.path().join("nat"), addr, a, b, "any_source = true\n");
    elsewhere
        .send_to(&hb(b, 1, ServerState::Online).encode(&kb), addr)
        .unwrap();
    elsewhere
        .send_to(&hb(a, 1, ServerState::Online).encode(&ka), addr)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s = stats(addr);
    assert_eq!(counter(&s, "heartbeats_accepted"), 1, "{s}");
    assert_eq!(counter(&s, "heartbeats_wrong_source"), 1, "{s}");
    let servers = s["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{s}");
    assert_eq!(servers[0]["server"], b.to_string(), "{s}");
    d.kill();
}

/// 19. A unicast stream whose receiver's socket closed: before, packets flowed to it until the
///     consent lease ran out (3,738 packets over 8 s). Now the ICMP port unreachable they draw
///     ends the stream at once (`streams_unreachable`), long before the 5 s lease.
#[test]
fn a_unicast_stream_to_a_closed_socket_ends_on_icmp() {
    let site = Site::new(
        102,
        "rate_mbps = 10.0\ntiers_mbps = [10.0]\nlease_ms = 5000",
    );
    let archive = site.pack("clip", 2 * MB, 102);
    let tag = archive_tag(&ArchiveFile::open(&archive).unwrap().head.archive_id);
    let mut srv = site.serve();
    let rid: u64 = rand::random();
    let mut member = Ctl::new(site.control, rid);
    let Control::JoinOk { archive_id, .. } = member.request(Control::Join {
        title: "clip".into(),
    }) else {
        panic!("join refused")
    };
    // The stream goes to S, the member's data socket.
    let mut s = Ctl::new(site.control, rid);
    s.session_key = member.session_key;
    let cookie = match s.request(Control::UnicastRequest { archive_id }) {
        Control::Cookie { cookie, .. } => cookie,
        other => panic!("expected a cookie: {other:?}"),
    };
    match s.request(Control::UnicastConfirm { archive_id, cookie }) {
        Control::UnicastOk { .. } => {}
        other => panic!("right cookie refused: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut ours = 0u64;
    while let Some(b) = recv_until(&s.sock, deadline) {
        if DataHeader::decode(&b).is_ok_and(|(h, _)| h.archive_tag == tag) {
            ours += 1;
            if ours >= 20 {
                break;
            }
        }
    }
    assert!(ours >= 20, "no unicast data after a valid cookie");
    assert_eq!(channels(&site.stats())[0]["unicast"], 1);
    // The receiver's data socket closes; its session lives on (the member keeps its lease).
    let closed_at = Instant::now();
    drop(s);
    let mut ended = None;
    while closed_at.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
        let st = site.stats();
        if counter(&st, "streams_unreachable") >= 1 {
            ended = Some((closed_at.elapsed(), st));
            break;
        }
    }
    let (after, st) = ended.expect("the stream to a closed socket did not end on ICMP");
    println!(
        "stream to a closed socket ended after {:.2} s (lease 5 s): streams_unreachable {}, \
         streams_consent_expired {}",
        after.as_secs_f64(),
        counter(&st, "streams_unreachable"),
        counter(&st, "streams_consent_expired")
    );
    assert_eq!(channels(&st)[0]["unicast"], 0, "{st}");
    assert_eq!(
        counter(&st, "streams_consent_expired"),
        0,
        "ended by consent, not ICMP"
    );
    assert_eq!(channels(&st)[0]["members"], 1, "the session lives on");
    srv.assert_running();
}
