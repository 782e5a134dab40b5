//! The unicast data socket, and what ICMP says about the addresses it sends to.
//!
//! Unicast streams (the UDP-unicast fallback and discovery bursts) leave from a socket of their
//! own with `IP_RECVERR` on: an ICMP destination or port unreachable for one of its packets is
//! queued on the socket's error queue, naming the address the packet went to. The driver
//! hands those addresses to [`crate::channel::ChannelManager::on_unreachable`], which ends
//! every stream to them at once (RFC 7675: consent is gone) instead of after a lease of
//! packets to a closed socket. Multicast stays on the other socket: with `IP_RECVERR` a
//! pending ICMP error also fails the socket's next send, whatever its destination.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::Context;
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};

/// ICMP "destination unreachable" and its "fragmentation needed" code (path MTU discovery:
/// the address is reachable, the packet too big — not an end of consent).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 "destination unreachable" (RFC 4443; "packet too big" is a type of its own).
const ICMP6_DST_UNREACH: u8 = 1;

/// A socket for unicast data to IPv4 (`v6`: IPv6) receivers: `send_buffer` as for the
/// multicast one, `IP_RECVERR` (`IPV6_RECVERR`) on.
pub fn unicast_socket(send_buffer: usize, v6: bool) -> anyhow::Result<UdpSocket> {
    let (domain, any) = if v6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
    }
    let _ = s.set_send_buffer_size(send_buffer);
    s.bind(&any.into())?;
    s.set_nonblocking(true)?;
    let s: UdpSocket = s.into();
    if v6 {
        setsockopt(&s, sockopt::Ipv6RecvErr, &true).context("unicast data socket: IPV6_RECVERR")?;
    } else {
        setsockopt(&s, sockopt::Ipv4RecvErr, &true).context("unicast data socket: IP_RECVERR")?;
    }
    Ok(s)
}

/// Read the socket's error queue to the end; call `unreachable` with the destination of every
/// packet ICMP reported unreachable. Other errors (local ones, "fragmentation needed") are
/// dropped. Returns how many entries were read.
pub fn drain(sock: &UdpSocket, mut unreachable: impl FnMut(SocketAddr)) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return n, // EAGAIN: the queue is empty
        };
        n += 1;
        let dest = msg.address.and_then(|a| match a.family() {
            Some(nix::sys::socket::AddressFamily::Inet) => a
                .as_sockaddr_in()
                .map(|v| SocketAddr::V4(std::net::SocketAddrV4::new(v.ip(), v.port()))),
            Some(nix::sys::socket::AddressFamily::Inet6) => a
                .as_sockaddr_in6()
                .map(|v| SocketAddr::V6(std::net::SocketAddrV6::new(v.ip(), v.port(), 0, 0))),
            _ => None,
        });
        let Ok(cmsgs) = msg.cmsgs() else {
            continue;
        };
        for c in cmsgs {
            let gone = match c {
                ControlMessageOwned::Ipv4RecvErr(e, _) => {
                    e.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        && e.ee_type == ICMP_DEST_UNREACH
                        && e.ee_code != ICMP_FRAG_NEEDED
                }
                ControlMessageOwned::Ipv6RecvErr(e, _) => {
                    e.ee_origin == libc::SO_EE_ORIGIN_ICMP6 && e.ee_type == ICMP6_DST_UNREACH
                }
                _ => false,
            };
            if let (true, Some(d)) = (gone, dest) {
                unreachable(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A packet from `s` to a closed port on `loopback` draws an ICMP(v6) port unreachable:
    /// the error queue names that destination, and an open one is never named.
    fn a_closed_port_is_named(s: UdpSocket, loopback: &str) {
        let open = UdpSocket::bind(loopback).unwrap();
        let closed = {
            let t = UdpSocket::bind(loopback).unwrap();
            t.local_addr().unwrap()
        };
        s.send_to(b"x", open.local_addr().unwrap()).unwrap();
        let _ = s.send_to(b"x", closed);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen.is_empty() && Instant::now() < deadline {
            drain(&s, |a| seen.push(a));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen, vec![closed]);
    }

    #[test]
    fn a_closed_port_is_reported_unreachable() {
        a_closed_port_is_named(unicast_socket(1 << 20, false).unwrap(), "127.0.0.1:0");
    }

    /// The same over IPv6 loopback (skipped where the host has none, except under CI).
    #[test]
    fn a_closed_ipv6_port_is_reported_unreachable() {
        if UdpSocket::bind("[::1]:0").is_err() {
            assert!(
                std::env::var("CI").ok().as_deref() != Some("true"),
                "no IPv6 loopback on this CI machine"
            );
            eprintln!("SKIPPED: no IPv6 loopback here");
            return;
        }
        a_closed_port_is_named(unicast_socket(1 << 20, true).unwrap(), "[::1]:0");
    }
}
