//! The control endpoint's two sockets: one receives every request and answers validated
//! addresses; the other only sends replies to addresses that proved nothing (Retry, cut
//! errors).
//!
//! Why two: a reply to an address that does not exist on the local subnet waits in the
//! kernel for address resolution (ARP, ~3 s) and holds its socket's send buffer meanwhile.
//! A flood of requests from spoofed on-link sources would fill that buffer with Retries, and
//! every genuine reply sent from the same socket would fail with `EAGAIN`. On its own socket
//! that flood can only crowd out other unvalidated replies, which are cheap to repeat.
//!
//! Both sockets share the port with `SO_REUSEPORT` (so replies leave from the address
//! receivers talk to) and a one-instruction classic BPF program steers every incoming
//! datagram to the group's first socket: the sending one never receives anything. A second
//! `mcastd` on the same port is still refused: the port is probed with a plain bind first.

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Send buffer of the unvalidated-reply socket: a few hundred Retries; beyond that they are
/// dropped (the requester repeats its request).
const UNVALIDATED_SNDBUF: usize = 256 * 1024;

pub struct ControlSockets {
    /// Receives every request; sends replies to validated addresses.
    pub main: UdpSocket,
    /// Sends replies to unvalidated addresses only; nonblocking, never receives.
    pub unvalidated: UdpSocket,
}

/// Bind the control endpoint `addr` (port 0: an ephemeral port, as for tests).
pub fn bind(addr: SocketAddr) -> anyhow::Result<ControlSockets> {
    let in_use = || {
        format!("cannot bind control endpoint {addr} (server.control): in use by another mcastd?")
    };
    // A plain bind fails while anyone holds the port, with or without SO_REUSEPORT; the pair
    // below would not (for the same user), so probe first and keep the port it got.
    let port = {
        let probe = UdpSocket::bind(addr).with_context(in_use)?;
        probe.local_addr()?.port()
    };
    let addr = SocketAddr::new(addr.ip(), port);
    let main = reuseport_socket(addr).with_context(in_use)?;
    steer_to_first(&main).context("control socket: attaching the SO_REUSEPORT steering program")?;
    let unvalidated = reuseport_socket(addr).with_context(in_use)?;
    let _ = unvalidated.set_send_buffer_size(UNVALIDATED_SNDBUF);
    let main: UdpSocket = main.into();
    let unvalidated: UdpSocket = unvalidated.into();
    main.set_nonblocking(true)?;
    unvalidated.set_nonblocking(true)?;
    Ok(ControlSockets { main, unvalidated })
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Attach `SO_ATTACH_REUSEPORT_CBPF` with the program `ret #0`: every datagram for the port
/// goes to the first socket bound in the group (the main one).
fn steer_to_first(s: &Socket) -> std::io::Result<()> {
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `code`, which outlives the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every datagram reaches the main socket; replies from either leave from the same port;
    /// a second bind of the port is refused.
    #[test]
    fn requests_reach_main_and_both_reply_from_the_port() {
        let cs = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = cs.main.local_addr().unwrap();
        assert_eq!(cs.unvalidated.local_addr().unwrap(), addr);
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Many source ports: the default SO_REUSEPORT hash would spread them over both.
        let mut senders = Vec::new();
        for i in 0..64u8 {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(&[i], addr).unwrap();
            senders.push(s);
        }
        let mut buf = [0u8; 16];
        cs.main.set_nonblocking(false).unwrap();
        cs.main
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..64 {
            let (n, _) = cs.main.recv_from(&mut buf).unwrap();
            got.push(buf[..n][0]);
        }
        got.sort_unstable();
        assert_eq!(got, (0..64u8).collect::<Vec<_>>());
        assert_eq!(
            cs.unvalidated.recv_from(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the unvalidated-reply socket must never receive"
        );
        cs.unvalidated
            .send_to(b"retry", peer.local_addr().unwrap())
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"retry"[..], addr));
        let e = bind(addr).err().expect("the port is taken");
        assert!(
            format!("{e:#}").contains("in use by another mcastd"),
            "{e:#}"
        );
    }
}
