//! Multicast socket options for either family: which interface packets leave from, their
//! TTL / hop limit, and joins — any-source, or source-specific (IGMPv3 / MLDv2 INCLUDE).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use socket2::{SockAddr, Socket};

use crate::iface::Iface;

/// What a failed option was, for the error an operator reads.
pub type OptError = (&'static str, io::Error);

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

/// Point a socket that sends to `family_of` groups out of `iface`, with `ttl` hops, looped
/// back to receivers on this host.
pub fn set_sending(
    s: &Socket,
    family_of: IpAddr,
    iface: &Iface,
    spec: &str,
    ttl: u32,
) -> Result<(), OptError> {
    match family_of {
        IpAddr::V4(_) => {
            let a = iface
                .need_v4(spec)
                .map_err(|e| ("IP_MULTICAST_IF", invalid(e)))?;
            s.set_multicast_if_v4(&a)
                .map_err(|e| ("IP_MULTICAST_IF", e))?;
            s.set_multicast_ttl_v4(ttl)
                .map_err(|e| ("IP_MULTICAST_TTL", e))?;
            s.set_multicast_loop_v4(true)
                .map_err(|e| ("IP_MULTICAST_LOOP", e))
        }
        IpAddr::V6(_) => {
            let i = iface
                .need_v6(spec)
                .map_err(|e| ("IPV6_MULTICAST_IF", invalid(e)))?;
            s.set_multicast_if_v6(i)
                .map_err(|e| ("IPV6_MULTICAST_IF", e))?;
            s.set_multicast_hops_v6(ttl)
                .map_err(|e| ("IPV6_MULTICAST_HOPS", e))?;
            s.set_multicast_loop_v6(true)
                .map_err(|e| ("IPV6_MULTICAST_LOOP", e))
        }
    }
}

/// Join `group` on `iface`: from `source` only when given (the kernel then passes the socket
/// no other sender's packets, and the router asks upstream for that source only).
pub fn join(
    s: &Socket,
    group: IpAddr,
    source: Option<IpAddr>,
    iface: &Iface,
    spec: &str,
) -> Result<(), OptError> {
    match (group, source) {
        (IpAddr::V4(g), None) => {
            let a = iface.need_v4(spec).map_err(|e| ("join", invalid(e)))?;
            s.join_multicast_v4(&g, &a)
                .map_err(|e| ("IP_ADD_MEMBERSHIP", e))
        }
        (IpAddr::V4(g), Some(IpAddr::V4(src))) => {
            let a = iface.need_v4(spec).map_err(|e| ("join", invalid(e)))?;
            s.join_ssm_v4(&src, &g, &a)
                .map_err(|e| ("IP_ADD_SOURCE_MEMBERSHIP", e))
        }
        (IpAddr::V6(g), None) => {
            let i = iface.need_v6(spec).map_err(|e| ("join", invalid(e)))?;
            s.join_multicast_v6(&g, i)
                .map_err(|e| ("IPV6_ADD_MEMBERSHIP", e))
        }
        (IpAddr::V6(g), Some(IpAddr::V6(src))) => {
            let i = iface.need_v6(spec).map_err(|e| ("join", invalid(e)))?;
            join_source_group(s, i, g, src).map_err(|e| ("MCAST_JOIN_SOURCE_GROUP", e))
        }
        (g, Some(src)) => Err((
            "join",
            invalid(format!(
                "source {src} and group {g} are of different families"
            )),
        )),
    }
}

/// `MCAST_JOIN_SOURCE_GROUP` (RFC 3678), which socket2 does not wrap: an MLDv2 INCLUDE join.
/// (IPv4 uses socket2's `join_ssm_v4`.)
fn join_source_group(s: &Socket, index: u32, group: Ipv6Addr, source: Ipv6Addr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: group_source_req is plain data (an index and two sockaddr_storage); all-zero
    // is a valid value of it.
    let mut req: libc::group_source_req = unsafe { std::mem::zeroed() };
    req.gsr_interface = index;
    req.gsr_group = SockAddr::from(SocketAddr::from((group, 0))).as_storage();
    req.gsr_source = SockAddr::from(SocketAddr::from((source, 0))).as_storage();
    // SAFETY: `req` is a fully initialised group_source_req and the length given is its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::MCAST_JOIN_SOURCE_GROUP,
            (&req as *const libc::group_source_req).cast(),
            std::mem::size_of::<libc::group_source_req>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Type};

    #[test]
    fn loopback_joins_in_both_families_and_mismatches_are_refused() {
        let lo = crate::iface::resolve("lo").unwrap();
        let v4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        set_sending(&v4, "239.1.2.3".parse().unwrap(), &lo, "lo", 4).unwrap();
        assert_eq!(v4.multicast_ttl_v4().unwrap(), 4);
        let e = join(
            &v4,
            "232.1.2.3".parse().unwrap(),
            Some("::1".parse().unwrap()),
            &lo,
            "lo",
        )
        .unwrap_err();
        assert!(e.1.to_string().contains("different families"), "{e:?}");
        if lo.v6.is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: lo must have ::1 for this test"
            );
            eprintln!("SKIPPED IPv6 half: lo has no IPv6 address here");
            return;
        }
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        set_sending(&v6, "ff15::1".parse().unwrap(), &lo, "lo", 7).unwrap();
        assert_eq!(v6.multicast_hops_v6().unwrap(), 7);
        assert_eq!(v6.multicast_if_v6().unwrap(), lo.index);
        join(&v6, "ff15::1".parse().unwrap(), None, &lo, "lo").unwrap();
        join(
            &v6,
            "ff35::1".parse().unwrap(),
            Some("::1".parse().unwrap()),
            &lo,
            "lo",
        )
        .unwrap();
        let by_v4 = crate::iface::resolve("127.0.0.1").unwrap();
        let e = set_sending(&v6, "ff15::1".parse().unwrap(), &by_v4, "127.0.0.1", 1).unwrap_err();
        assert!(e.1.to_string().contains("is an IPv4 address"), "{e:?}");
    }
}
