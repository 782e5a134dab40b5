//! flute-peer: a FLUTE (RFC 6726 / ALC, RFC 5775) carousel sender and receiver on the
//! `flute` crate, for benches/fec_peers.sh. Unidirectional: no feedback, the sender loops
//! the file until it is stopped; each receiver keeps what it has across passes and is done
//! when the object decodes (and its MD5 from the FDT matches).
//!
//!   flute-peer send FILE GROUP:PORT IFACE_IP RATE_MBPS FEC_PCT [K]
//!       RATE_MBPS: pacing of the UDP payload (0 = as fast as the socket takes it).
//!       FEC_PCT: 0 = no code (Compact No-Code, RFC 5445); else Reed-Solomon over GF(2^8)
//!       (RFC 5510, the under-specified scheme, FEC Encoding ID 129: the fully-specified ID 5
//!       numbers blocks in 8 bits, so at most 255 blocks = 21.4 MB at K = 60) with K source
//!       symbols per block (default 60) and round(K * FEC_PCT / 100) repair symbols
//!       (K + repair <= 255). 1400-byte symbols; 4 blocks interleaved.
//!       Logs its packet count to stderr once a second; runs until killed.
//!   flute-peer recv OUT GROUP:PORT IFACE_IP TIMEOUT_S
//!       Joins GROUP on IFACE_IP, writes the first object it completes to OUT and prints one
//!       JSON line: {"event":"done","epoch":..,"seconds":..,"bytes":..,"packets":..}
//!       (seconds from its first packet; epoch = wall-clock time of completion). Exit 1 on
//!       timeout or a reception error.
use flute::core::{Oti, UDPEndpoint};
use flute::receiver::writer::{ObjectWriterBufferBuilder, ObjectWriterBuilder};
use flute::receiver::{Config as RxConfig, MultiReceiver};
use flute::sender::{
    CarouselRepeatMode, Config as TxConfig, CreateFromFile, PriorityQueue, Sender, TransferConfig,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SYMBOL: u16 = 1400;
const BUF: usize = 4 << 20;

fn usage() -> ! {
    eprintln!(
        "usage: flute-peer send FILE GROUP:PORT IFACE_IP RATE_MBPS FEC_PCT [K]\n       \
         flute-peer recv OUT GROUP:PORT IFACE_IP TIMEOUT_S"
    );
    std::process::exit(2)
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("send") if a.len() >= 7 => send(&a[2..]),
        Some("recv") if a.len() == 6 => recv(&a[2..]),
        _ => usage(),
    }
}

fn parse_group(s: &str) -> SocketAddrV4 {
    s.parse().unwrap_or_else(|_| usage())
}

fn send(a: &[String]) {
    let file = std::path::PathBuf::from(&a[0]);
    let group = parse_group(&a[1]);
    let iface: Ipv4Addr = a[2].parse().unwrap_or_else(|_| usage());
    let mbps: f64 = a[3].parse().unwrap_or_else(|_| usage());
    let pct: f64 = a[4].parse().unwrap_or_else(|_| usage());
    let k: u8 = a
        .get(5)
        .map_or(60, |s| s.parse().unwrap_or_else(|_| usage()));

    let oti = if pct <= 0.0 {
        Oti::new_no_code(SYMBOL, k as u16)
    } else {
        let r = ((k as f64) * pct / 100.0).round().max(1.0) as u8;
        Oti::new_reed_solomon_rs28_under_specified(SYMBOL, k as u16, r as u16)
            .expect("Reed-Solomon parameters (K + R <= 255)")
    };
    eprintln!(
        "flute-peer send: {} -> {} via {}, {} Mbit/s, FEC {:?} k={} r={}",
        file.display(),
        group,
        iface,
        mbps,
        oti.fec_encoding_id,
        oti.maximum_source_block_length,
        oti.max_number_of_parity_symbols
    );

    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    sock.set_multicast_if_v4(&iface).expect("IP_MULTICAST_IF");
    sock.set_multicast_ttl_v4(1).expect("IP_MULTICAST_TTL");
    sock.set_multicast_loop_v4(false)
        .expect("IP_MULTICAST_LOOP");
    let _ = sock.set_send_buffer_size(BUF);
    sock.bind(&SockAddr::from(SocketAddrV4::new(iface, 0)))
        .expect("bind");
    sock.connect(&SockAddr::from(group)).expect("connect");
    let sock: std::net::UdpSocket = sock.into();

    let endpoint = UDPEndpoint::new(None, group.ip().to_string(), group.port());
    let mut cfg = TxConfig::default();
    cfg.set_priority_queue(PriorityQueue::HIGHEST, PriorityQueue::new(1));
    let mut sender = Sender::new(endpoint, 1, &oti, &cfg);
    let transfer = TransferConfig {
        // A carousel: the object starts over as soon as a pass ends, until we are killed.
        max_transfer_count: 1,
        carousel_mode: Some(CarouselRepeatMode::DelayBetweenTransfers(Duration::ZERO)),
        ..Default::default()
    };
    let obj = CreateFromFile::builder()
        .path(file)
        .content_type("application/octet-stream".to_string())
        .cache_in_ram(true)
        .compute_md5(true)
        .config(transfer)
        .build()
        .create()
        .expect("object from file");
    sender.add_object(0, obj).expect("add object");
    sender.publish(SystemTime::now()).expect("publish FDT");
    let close = sender.read_close_session(SystemTime::now());
    let _ = sock.send(&close);

    let t0 = Instant::now();
    let (mut pkts, mut bytes, mut next_log) = (0u64, 0u64, 1u64);
    let bps = mbps * 1e6 / 8.0;
    loop {
        match sender.read(SystemTime::now()) {
            Some(pkt) => {
                // ENOBUFS and the like: the packet is lost, as on a wire.
                let _ = sock.send(&pkt);
                pkts += 1;
                bytes += pkt.len() as u64;
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
        let el = t0.elapsed();
        if bps > 0.0 {
            let due = Duration::from_secs_f64(bytes as f64 / bps);
            if due > el + Duration::from_millis(1) {
                std::thread::sleep(due - el);
            }
        }
        if el.as_secs() >= next_log {
            eprintln!(
                "flute-peer send: t={}s packets={} bytes={}",
                next_log, pkts, bytes
            );
            next_log += 1;
        }
    }
}

fn recv(a: &[String]) {
    let out = std::path::PathBuf::from(&a[0]);
    let group = parse_group(&a[1]);
    let iface: Ipv4Addr = a[2].parse().unwrap_or_else(|_| usage());
    let timeout = Duration::from_secs_f64(a[3].parse().unwrap_or_else(|_| usage()));

    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    let _ = sock.set_recv_buffer_size(BUF);
    sock.bind(&SockAddr::from(group)).expect("bind group:port");
    sock.join_multicast_v4(group.ip(), &iface).expect("join");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("SO_RCVTIMEO");
    let granted = sock.recv_buffer_size().unwrap_or(0);
    let sock: std::net::UdpSocket = sock.into();
    eprintln!(
        "flute-peer recv: {} on {}, SO_RCVBUF {}",
        group, iface, granted
    );

    let endpoint = UDPEndpoint::new(None, group.ip().to_string(), group.port());
    let writer = Rc::new(ObjectWriterBufferBuilder::new(true));
    let rx_cfg = RxConfig {
        // Blocks still short of symbols wait for the next pass: let them all stay.
        object_max_cache_size: Some(1 << 30),
        object_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let mut rx = MultiReceiver::new(
        writer.clone() as Rc<dyn ObjectWriterBuilder>,
        Some(rx_cfg),
        false,
    );

    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut pkts = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        if start.elapsed() > timeout {
            eprintln!("flute-peer recv: timeout after {} packets", pkts);
            std::process::exit(1);
        }
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => panic!("recv: {e}"),
        };
        first.get_or_insert_with(Instant::now);
        pkts += 1;
        let now = SystemTime::now();
        let _ = rx.push(&endpoint, &buf[..n], now);
        if pkts.is_multiple_of(1024) {
            rx.cleanup(now);
        }
        let objs = writer.objects.borrow();
        if let Some(o) = objs.iter().find(|o| {
            let o = o.borrow();
            o.complete || o.error
        }) {
            let o = o.borrow();
            if o.error {
                eprintln!("flute-peer recv: object received with error (MD5 or decode)");
                std::process::exit(1);
            }
            std::fs::write(&out, &o.data).expect("write output");
            println!(
                "{{\"event\":\"done\",\"epoch\":{:.3},\"seconds\":{:.3},\"bytes\":{},\"packets\":{}}}",
                epoch(),
                first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
                o.data.len(),
                pkts
            );
            return;
        }
    }
}
