//! Writes the seed corpus (`fuzz/corpus/<target>/`) from the real encoders: a handful of
//! genuine encodings per target. Run from `fuzz/`: `cargo run -p mcast-fuzz-common --bin seeds`.
//! Seeds that hold random ids or keys (tickets, packed archives) differ from run to run; the
//! committed ones are one such run.

use std::fs;
use std::path::{Path, PathBuf};

use mcast::archive::{pack, CompressMode, PackOptions, PacketId};
use mcast::delegation::Delegation;
use mcast::wire::control::{CatalogItem, Control, Envelope, ErrorCode};
use mcast::wire::data::{archive_tag, DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN};
use mcast::wire::director::{DirectorMsg, Heartbeat, HeldTitle, NoRoute, ServerState};
use mcast::wire::nak::{to_ranges, Nak};
use mcast_fuzz_common::{
    bytes, identity, join_records, world, DB_KEY, DIRECTOR_UNIX_MS, HEARTBEAT_KEY,
};
use mcast_keys::seal::{seal_part, DbKey, ReceiverKey};
use mcast_keys::ticket::{Ticket, TicketSpec};
use mcast_keys::{Cipher, KeyStore};
use mcast_recv::state::State;

struct Out {
    root: PathBuf,
}

impl Out {
    fn put(&self, target: &str, name: &str, b: impl AsRef<[u8]>) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), b).unwrap();
    }
}

fn data_packet(kind: DataKind, repair: bool, loop_no: u32, payload: &[u8]) -> Vec<u8> {
    let h = DataHeader {
        kind,
        repair,
        probe: false,
        archive_tag: archive_tag(&mcast_fuzz_common::WORLD_ARCHIVE_ID),
        loop_no,
    };
    let mut b = [0u8; DATA_HEADER_LEN];
    h.encode_into(&mut b);
    let mut v = b.to_vec();
    v.extend_from_slice(payload);
    v
}

fn data_seeds(o: &Out) {
    let w = world();
    let sync = |grtt_us, group_size| {
        let info = SyncInfo {
            loop_packets: w.shape.loop_packets(),
            rate_bps: 100_000_000,
            grtt_us,
            group_size,
            send_us: 12345,
        };
        data_packet(DataKind::Sync, false, 0, &info.encode())
    };
    let pkt = |id: PacketId, repair: bool| {
        data_packet(DataKind::Packet(id), repair, 0, w.packet(id).unwrap())
    };
    let order = w.loop_packets();
    // A whole loop in order, after a SYNC: completes the download.
    let mut recs = vec![sync(2000, 3)];
    recs.extend(order.iter().map(|&id| pkt(id, false)));
    o.put("data", "loop-in-order", join_records(&recs));
    // The loop backwards: data packets park until their hash packet comes.
    let mut recs = vec![sync(50_000, 1000)];
    recs.extend(order.iter().rev().map(|&id| pkt(id, false)));
    o.put("data", "loop-reversed", join_records(&recs));
    // Losses, a forged packet, another receiver's NAK, repairs and duplicates.
    let mut forged = w.packet(PacketId::Data(3)).unwrap().to_vec();
    forged[0] ^= 1;
    let mut recs = vec![
        sync(1000, 2),
        pkt(PacketId::Data(1), false),
        data_packet(DataKind::Packet(PacketId::Data(3)), false, 0, &forged),
        pkt(PacketId::Hash(0), false),
        pkt(PacketId::Data(5), false),
        pkt(PacketId::Hash(2), false),
        pkt(PacketId::Data(20), false),
        Nak {
            archive_tag: archive_tag(&w.head.archive_id),
            session_tag: 9,
            ranges: to_ranges([2, 4, 6, 7]),
            symbols: Vec::new(),
        }
        .encode(),
        pkt(PacketId::Data(3), true),
        pkt(PacketId::Data(3), true),
        pkt(PacketId::Hash(3), false),
        pkt(PacketId::Data(24), false),
    ];
    recs.extend(order.iter().take(12).map(|&id| pkt(id, false)));
    o.put("data", "losses-forgery-nak", join_records(&recs));
}

fn control_seeds(o: &Out) {
    let id = [3u8; 16];
    let msgs = vec![
        Control::CatalogRequest { start: 2 },
        Control::Join {
            title: "film".into(),
        },
        Control::JoinAt {
            title: "film".into(),
            block: 7,
        },
        Control::HeadRequest {
            archive_id: id,
            offset: 1024,
        },
        Control::Keepalive {
            archive_id: id,
            have: 10,
            total: 20,
            rtt_us: 300,
            rx_bps: 1_000_000,
            loss_ppm: 5,
            capacity_bps: 900_000,
        },
        Control::ChangeTier {
            archive_id: id,
            tier: 1,
        },
        Control::Complete {
            archive_id: id,
            elapsed_ms: 1000,
            milli_loops: 1000,
        },
        Control::UnicastRequest { archive_id: id },
        Control::UnicastConfirm {
            archive_id: id,
            cookie: [4; 16],
        },
        Control::StatsRequest,
        Control::PlayRequest {
            title: "film".into(),
            ticket: vec![5; 200],
            receiver_pub: [6; 32],
            proof: [7; 32],
        },
        Control::CatalogReply {
            items: vec![
                CatalogItem {
                    title: "film".into(),
                    plain_len: 1000,
                    archive_len: 1200,
                    advert: false,
                    watermark: "owner".into(),
                    ..Default::default()
                },
                CatalogItem {
                    title: "trailer".into(),
                    plain_len: 10,
                    archive_len: 20,
                    advert: true,
                    trailer: true,
                    advert_for: vec!["film".into()],
                    ..Default::default()
                },
            ],
            more: true,
        },
        Control::JoinOk {
            archive_id: id,
            group: "239.255.77.1:7700".parse().unwrap(),
            head_len: 900,
            loop_packets: 1000,
            rate_bps: 200_000_000,
            lease_ms: 5000,
            tier: 0,
            tiers_bps: vec![10_000_000, 100_000_000],
            session_key: [3; 32],
            source: None,
            delegation: None,
        },
        Control::JoinOk {
            archive_id: id,
            group: "232.1.2.3:7700".parse().unwrap(),
            head_len: 900,
            loop_packets: 1000,
            rate_bps: 200_000_000,
            lease_ms: 5000,
            tier: 1,
            tiers_bps: vec![10_000_000, 100_000_000],
            session_key: [4; 32],
            source: Some("198.18.0.1".parse().unwrap()),
            delegation: None,
        },
        // An edge's answer: the origin's delegation to its key.
        Control::JoinOk {
            archive_id: id,
            group: "239.255.88.1:7700".parse().unwrap(),
            head_len: 900,
            loop_packets: 1000,
            rate_bps: 8_000_000,
            lease_ms: 3000,
            tier: 0,
            tiers_bps: vec![8_000_000],
            session_key: [5; 32],
            source: None,
            delegation: Some(delegation()),
        },
        Control::NotHere {
            title: "film".into(),
            redirect: Some("127.0.0.2:7600".parse().unwrap()),
        },
        Control::HeadChunk {
            archive_id: id,
            offset: 0,
            total: 100,
            bytes: bytes(100, 1),
        },
        Control::LeaseOk {
            archive_id: id,
            lease_ms: 5000,
        },
        Control::Cookie {
            archive_id: id,
            cookie: [7; 16],
        },
        Control::UnicastOk { archive_id: id },
        Control::CompleteOk { archive_id: id },
        Control::StatsReply {
            json: r#"{"channels":1}"#.into(),
        },
        Control::PlayGrant {
            ticket_id: [8; 16],
            sealed_part: vec![9; 80],
            signature: [1; 64],
        },
        Control::Retry { token: [2; 16] },
        Control::Error {
            code: ErrorCode::TicketRefused,
            message: "ticket expired".into(),
        },
    ];
    for (i, m) in msgs.into_iter().enumerate() {
        o.put(
            "control",
            &format!("msg-{i:02}"),
            Envelope::new(0x1122_3344, i as u32, m).encode(),
        );
    }    // Delegation certificates are offered the same input (`fuzz_targets/control.rs`).
    o.put("control", "delegation", delegation().encode());
}

/// The fixture identity delegating to an edge key.
fn delegation() -> Delegation {
    Delegation::issue(
        &identity(),
        mcast_keys::Identity::from_secret(&[0xed; 32]).public(),
        1_900_000_000,
    )
}

fn nak_seeds(o: &Out) {
    let tag = archive_tag(&mcast_fuzz_common::WORLD_ARCHIVE_ID);
    let naks = [
        Nak {
            archive_tag: tag,
            session_tag: 1,
            ranges: vec![(0, 1)],
            symbols: Vec::new(),
        },
        Nak {
            archive_tag: tag,
            session_tag: 2,
            ranges: to_ranges([1, 2, 3, 7, 9, 10, 28]),
            symbols: Vec::new(),
        },
        Nak {
            archive_tag: [1; 8],
            session_tag: 3,
            ranges: (0..96).map(|i| (i * 10, 3)).collect(),
            symbols: Vec::new(),
        },
        // FEC amounts ("block f: n more symbols"), alone and with ranges.
        Nak {
            archive_tag: tag,
            session_tag: 4,
            ranges: Vec::new(),
            symbols: vec![(0, 12), (1, 400)],
        },
        Nak {
            archive_tag: tag,
            session_tag: 5,
            ranges: vec![(3, 2)],
            symbols: vec![(u64::MAX, u32::MAX)],
        },
    ];
    for (i, n) in naks.iter().enumerate() {
        o.put("nak", &format!("nak-{i}"), n.encode());
    }
}

fn heartbeat(server: &str, seq: u64, state: ServerState, titles: &[(&str, bool)]) -> Vec<u8> {
    Heartbeat {
        server: server.parse().unwrap(),
        boot_id: 77,
        seq,
        unix_ms: DIRECTOR_UNIX_MS,
        interval_ms: 500,
        state,
        channels: 2,
        channel_slots: 32,
        receivers: 4,
        throughput_bps: 50_000_000,
        capacity_bps: 1_000_000_000,
        max_tier_bps: 200_000_000,
        titles: titles
            .iter()
            .map(|&(t, looping)| HeldTitle {
                title: t.into(),
                looping,
            })
            .collect(),
    }
    .encode(&HEARTBEAT_KEY)
}

fn director_seeds(o: &Out) {
    let op = |op: u8, dg: Vec<u8>| {
        let mut v = vec![op];
        v.extend(dg);
        v
    };
    let route = |req_id, exclude: Vec<&str>| {
        DirectorMsg::RouteRequest {
            req_id,
            title: "film".into(),
            rx_bps: 300_000_000,
            exclude: exclude.into_iter().map(|a| a.parse().unwrap()).collect(),
        }
        .encode()
    };
    let recs = vec![
        op(
            0,
            heartbeat("127.0.0.1:7600", 1, ServerState::Online, &[("film", true)]),
        ),
        op(
            0,
            heartbeat(
                "127.0.0.2:7600",
                1,
                ServerState::Online,
                &[("film", false), ("other", true)],
            ),
        ),
        op(0, route(1, vec![])),
        op(0, route(2, vec!["127.0.0.1:7600"])),
        op(
            2,
            Envelope::new(
                5,
                6,
                Control::Join {
                    title: "film".into(),
                },
            )
            .encode(),
        ),
        op(0, Envelope::new(5, 7, Control::StatsRequest).encode()),
        op(
            20,
            heartbeat(
                "127.0.0.1:7600",
                2,
                ServerState::Draining,
                &[("film", true)],
            ),
        ),
        op(0, heartbeat("127.0.0.1:7600", 2, ServerState::Online, &[])),
        op(40, route(3, vec![])),
        op(
            0,
            DirectorMsg::SiteRouteRequest {
                req_id: 6,
                title: "other".into(),
                rx_bps: 0,
                exclude: vec![],
            }
            .encode(),
        ),
        op(
            0,
            DirectorMsg::PlacementRequest {
                req_id: 7,
                site: "a".into(),
                token: None,
            }
            .encode(),
        ),
    ];
    o.put("director", "heartbeats-and-routes", join_records(&recs));
    let recs = vec![
        op(
            0,
            heartbeat(
                "127.0.0.3:7600",
                9,
                ServerState::Overloaded,
                &[("film", true)],
            ),
        ),
        op(0, route(4, vec![])),
        op(
            0,
            heartbeat(
                "127.0.0.3:7600",
                10,
                ServerState::Stopping,
                &[("film", true)],
            ),
        ),
        op(0, route(5, vec![])),
        op(
            0,
            DirectorMsg::RouteOk {
                req_id: 1,
                title: "film".into(),
                server: "127.0.0.1:7600".parse().unwrap(),
            }
            .encode(),
        ),
        op(
            0,
            DirectorMsg::RouteNone {
                req_id: 2,
                title: "film".into(),
                reason: NoRoute::Busy,
                message: "retry later".into(),
            }
            .encode(),
        ),
    ];
    o.put("director", "overload-stop-replies", join_records(&recs));
}

/// Pack a small file with the real packer; returns (archive bytes, master key, if any).
fn packed(
    dir: &Path,
    title: &str,
    cipher: Cipher,
    compress: CompressMode,
    advert: bool,
) -> (Vec<u8>, [u8; 32]) {
    let keys = KeyStore::open(dir.join(format!("keys-{title}"))).unwrap();
    keys.create_identity(false).unwrap();
    let input = dir.join(format!("{title}.in"));
    // Half text (compresses), half noise (does not): both frame kinds.
    let mut plain = b"mcast fuzz seed ".repeat(100);
    plain.extend(bytes(1400, 3));
    fs::write(&input, &plain).unwrap();
    let archives = dir.join(format!("archives-{title}"));
    fs::create_dir_all(&archives).unwrap();
    let mut opts = PackOptions::new(title);
    opts.cipher = cipher;
    opts.compress = compress;
    opts.advert = advert;
    // Version-4 heads: an advert associated with titles, a plug-in.
    if title == "advert-assoc" {
        opts.advert_for = vec!["film".into(), "film-2".into()];
        opts.placement = mcast::archive::head::Placement::Trailer;
    }
    if title == "plugin" {
        opts.plugin = true;
    }
    opts.frame_size = 1024;
    opts.symbol_size = 256;
    let r = pack(&input, &archives, &keys, &opts, &mut |_| {}).unwrap();
    let key = if advert || opts.plugin {
        [0; 32]
    } else {
        *keys
            .title_key(title, &r.head.archive_id)
            .unwrap()
            .as_bytes()
    };
    (fs::read(&r.path).unwrap(), key)
}

fn archive_and_head_seeds(o: &Out, tmp: &Path) {
    let cases = [
        (
            "aes-zstd",
            Cipher::Aes256Gcm,
            CompressMode::Auto,
            false,
            0u8,
        ),
        (
            "chacha-plain",
            Cipher::ChaCha20Poly1305,
            CompressMode::None,
            false,
            4,
        ),
        ("advert", Cipher::None, CompressMode::Auto, true, 2),
        ("advert-assoc", Cipher::None, CompressMode::Auto, true, 2),
        ("plugin", Cipher::None, CompressMode::None, false, 2),
    ];
    for (name, cipher, compress, advert, flags) in cases {
        let (file, key) = packed(tmp, name, cipher, compress, advert);
        let mut input = vec![flags];
        input.extend_from_slice(&key);
        input.extend_from_slice(&file);
        o.put("archive", name, &input);
        // The same archive, re-signed by the target (flag 1).
        if name == "aes-zstd" {
            input[0] = 1;
            o.put("archive", "aes-zstd-resigned", &input);
        }
        // Its head (the archive's last bytes before the tail) for the head target.
        let t = file.len() - 16;
        let head_len = u64::from_le_bytes(file[t..t + 8].try_into().unwrap()) as usize;
        let head = &file[t - head_len..t];
        o.put("head", name, join_records(&[head]));
    }
    let w = world();
    let head = w.head.encode();
    let ids = [0u64.to_le_bytes(), 3u64.to_le_bytes()].concat();
    o.put(
        "head",
        "world-with-packets",
        join_records(&[
            &head[..],
            w.packet(PacketId::Hash(0)).unwrap(),
            w.packet(PacketId::Data(3)).unwrap(),
            &ids[..],
        ]),
    );
}

fn ticket_seeds(o: &Out) {
    let id = identity();
    let master = mcast_keys::MasterKey::from_bytes([0x44; 32]);
    let specs = [
        ("film", "alice@example", 1, 0),
        ("film-2", "device 42", 3, 1_900_000_000),
    ];
    for (i, (title, holder, plays, expires)) in specs.into_iter().enumerate() {
        let (file, part_b) = Ticket::issue(
            &id,
            &master,
            &TicketSpec {
                title: title.into(),
                archive_id: [i as u8; 16],
                holder: holder.into(),
                plays,
                expires_unix: expires,
                issued_unix: 1_700_000_000,
            },
        )
        .unwrap();
        o.put("ticket", &format!("ticket-{i}"), file.ticket.encode());
        o.put("ticket", &format!("ticket-file-{i}"), &*file.encode());
        o.put(
            "ticket",
            &format!("ticket-armor-{i}"),
            file.to_armor().as_bytes(),
        );
        let tid = file.ticket.ticket_id;
        let wrapped =
            DbKey::from_bytes(zeroize::Zeroizing::new(DB_KEY)).wrap(&tid, &[i as u8; 16], &part_b);
        o.put("ticket", &format!("wrapped-part-{i}"), wrapped);
        let sealed = seal_part(&ReceiverKey::generate().public(), &tid, &part_b).unwrap();
        o.put("ticket", &format!("sealed-part-{i}"), sealed);
    }
}

fn state_seeds(o: &Out) {
    let w = world();
    let units = w.shape.loop_packets();
    let words = units.div_ceil(64) as usize;
    let full_last = if units.is_multiple_of(64) {
        u64::MAX
    } else {
        (1 << (units % 64)) - 1
    };
    let states = [
        ("empty", vec![0; words]),
        ("half", vec![0x5555_5555_5555_5555 & full_last; words]),
        ("first-block", vec![0x1ff; words]),
        ("full", vec![full_last; words]),
    ];
    for (name, have) in states {
        let st = State {
            archive_id: w.head.archive_id,
            server_key: w.head.server_key.0,
            units,
            have,
        };
        o.put("state", name, st.encode());
    }
    let other = State {
        archive_id: [1; 16],
        server_key: [2; 32],
        units: 130,
        have: vec![u64::MAX, 5, 1],
    };
    o.put("state", "other-archive", other.encode());
}

fn config_seeds(o: &Out, repo: &Path) {
    o.put(
        "config",
        "mcastd.toml",
        fs::read(repo.join("conf/mcastd.toml")).unwrap(),
    );
    o.put(
        "config",
        "director.toml",
        fs::read(repo.join("conf/director.toml")).unwrap(),
    );
    o.put(
        "config",
        "tiers.toml",
        "[server]\nchannels = 4\ntiers_mbps = [10.0, 100.0]\nrate_policy = \"average\"\n\
         grtt_min_us = 500\ngrtt_max_ms = 1000\n[directors]\naddrs = [\"127.0.0.1:7650\"]\n\
         advertise = \"127.0.0.1:7600\"\n",
    );
    o.put(
        "config",
        "director-small.toml",
        "[director]\nlisten = \"0.0.0.0:7650\"\ndown_after = 5\nmax_skew_ms = 1000\n",
    );
}

fn main() {
    let fuzz_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Out {
        root: fuzz_dir.join("corpus"),
    };
    let tmp = std::env::temp_dir().join(format!("mcast-fuzz-seeds-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    data_seeds(&o);
    control_seeds(&o);
    nak_seeds(&o);
    director_seeds(&o);
    archive_and_head_seeds(&o, &tmp);
    ticket_seeds(&o);
    state_seeds(&o);
    config_seeds(&o, &fuzz_dir.join(".."));
    fs::remove_dir_all(&tmp).unwrap();
    println!("seeds written to {}", o.root.display());
}
