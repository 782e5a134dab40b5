//! The server's send path on its own, on one core: packets read from an archive-sized file
//! into a reused batch (`PacketBatch::fill`, one `preadv` per contiguous range) and sent with
//! `sendmmsg` + UDP GSO (`BatchSender`), exactly as `mcastd` does, to a multicast group on
//! loopback with multicast loop-back off and nobody listening. Loopback still runs the
//! receive side of each datagram in the sender's context up to the drop, so this is a floor
//! on what one core sends to a NIC.
//!
//!   cargo bench --bench send            # SEND_SECONDS=3 SEND_FILE_MB=512 to change
//!
//! Prints, per symbol size: payload Gbit/s, datagrams/s and the thread's CPU seconds (the
//! Gbit/s per core figure divides by them, so it holds on a busy machine too).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use mcast::fastio::{BatchSender, PacketBatch};
use mcast::wire::data::DATA_HEADER_LEN;
use socket2::{Domain, Protocol, Socket, Type};

mod common;
use common::thread_cpu;

fn main() {
    let secs: f64 = std::env::var("SEND_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let file_mb: usize = std::env::var("SEND_FILE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let site = common::Site::new("mcast-send-", file_mb << 20, 7);
    let file = std::fs::File::open(&site.input).unwrap();
    let len = (file_mb << 20) as u64;

    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_loop_v4(false).unwrap();
    let _ = s.set_send_buffer_size(4 << 20);
    let sock: UdpSocket = s.into();
    let dest: SocketAddr = "239.255.99.1:9".parse().unwrap();
    let dest = dest.into();
    let header = [0u8; DATA_HEADER_LEN];

    println!("symbol  Gbit/s  Mpkt/s  cpu_s  Gbit/s_per_core  gso");
    for symbol in [1280usize, 8192] {
        let mut batch = PacketBatch::with_capacity(128, DATA_HEADER_LEN + 65_536);
        let mut sender = BatchSender::new(&sock, true);
        let (mut off, mut bytes, mut pkts, mut failed) = (0u64, 0u64, 0u64, 0usize);
        let (t0, c0) = (Instant::now(), thread_cpu());
        while t0.elapsed().as_secs_f64() < secs {
            for _ in 0..128 {
                if off + symbol as u64 > len {
                    off = 0;
                }
                batch.push_file(&header, off, symbol);
                off += symbol as u64;
            }
            batch.fill(&file).unwrap();
            let out = sender.send(sock.as_raw_fd(), &batch, &dest);
            failed += out.failed;
            pkts += out.sent as u64;
            bytes += out.sent as u64 * symbol as u64;
            batch.clear();
        }
        let (wall, cpu) = (
            t0.elapsed().as_secs_f64(),
            (thread_cpu() - c0).as_secs_f64(),
        );
        assert_eq!(failed, 0, "send errors");
        println!(
            "{symbol:>6}  {:>6.2}  {:>6.3}  {cpu:>5.2}  {:>15.2}  {}",
            bytes as f64 * 8.0 / wall / 1e9,
            pkts as f64 / wall / 1e6,
            bytes as f64 * 8.0 / cpu / 1e9,
            sender.gso()
        );
    }
}
