//! Wire formats. Every message starts with a version byte; every `decode` takes untrusted
//! bytes and returns an error, never panics (see `tests/wire_fuzz.rs`).
//!
//! * [`data`] — packets on a data channel (multicast group or unicast fallback): SYNC, hash
//!   packets and data packets of the carousel loop.
//! * [`control`] — request/response datagrams between `mcast-recv` and `mcastd`'s control
//!   port: join, head download, keepalive, completion, unicast fallback with cookie, stats.
//! * [`nak`] — repair requests, sent to the control port and to the channel's group.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::codec::{Reader, Writer};

pub mod control;
pub mod data;
pub mod director;
pub mod nak;

/// Protocol version carried in the first byte of every datagram.
pub const WIRE_VERSION: u8 = 2;

/// Why bytes from the network were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty datagram")]
    Empty,
    #[error("protocol version {0} not supported (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("unknown message type {0}")]
    Kind(u8),
    #[error("truncated: {0}")]
    Short(#[from] crate::codec::Short),
    #[error("bad field {0}")]
    Field(&'static str),
}

/// An IP address: its family (4 or 6), then its 4 or 16 bytes.
pub(crate) fn put_ip(b: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(a) => {
            b.put_u8(4);
            b.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            b.put_u8(6);
            b.extend_from_slice(&a.octets());
        }
    }
}

pub(crate) fn get_ip(r: &mut Reader<'_>, f: &'static str) -> Result<IpAddr, WireError> {
    match r.u8(f)? {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(r.array::<4>(f)?))),
        6 => Ok(IpAddr::V6(Ipv6Addr::from(r.array::<16>(f)?))),
        _ => Err(WireError::Field(f)),
    }
}

/// A socket address: the IP address ([`put_ip`]), then the port. No IPv6 scope: a receiver
/// reaches link-local groups on the interface it chose itself.
pub(crate) fn put_addr(b: &mut Vec<u8>, a: &SocketAddr) {
    put_ip(b, &a.ip());
    b.put_u16(a.port());
}

pub(crate) fn get_addr(r: &mut Reader<'_>, f: &'static str) -> Result<SocketAddr, WireError> {
    let ip = get_ip(r, f)?;
    Ok(SocketAddr::new(ip, r.u16(f)?))
}

/// A short (u16-length) UTF-8 string of at most `max` bytes.
pub(crate) fn get_str(
    r: &mut Reader<'_>,
    max: usize,
    f: &'static str,
) -> Result<String, WireError> {
    String::from_utf8(r.short_bytes(max, f)?.to_vec()).map_err(|_| WireError::Field(f))
}

pub(crate) fn check_version(buf: &[u8]) -> Result<(), WireError> {
    match buf.first() {
        None => Err(WireError::Empty),
        Some(&WIRE_VERSION) => Ok(()),
        Some(&v) => Err(WireError::Version(v)),
    }
}

/// Whether `group` is in a source-specific multicast range (RFC 4607: 232.0.0.0/8 and
/// ff3x::/32): receivers join it for one source only.
pub fn is_ssm_group(group: IpAddr) -> bool {
    match group {
        IpAddr::V4(g) => g.octets()[0] == 232,
        IpAddr::V6(g) => {
            let o = g.octets();
            o[0] == 0xff && o[1] >> 4 == 3 && o[2] == 0 && o[3] == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssm_ranges() {
        for (g, ssm) in [
            ("232.1.2.3", true),
            ("239.1.2.3", false),
            ("ff35::1", true),
            ("ff3e::8000:1", true),
            ("ff35:40:2001:db8::1", false),
            ("ff15::1", false),
            ("ff3e:0:0:0:1::1", true),
        ] {
            assert_eq!(is_ssm_group(g.parse().unwrap()), ssm, "{g}");
        }
    }

    #[test]
    fn addresses_round_trip_and_bad_families_are_refused() {
        for a in ["198.18.0.1:7700", "[ff15::1]:7700", "[2001:db8::2]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut b = Vec::new();
            put_addr(&mut b, &a);
            assert_eq!(get_addr(&mut Reader::new(&b), "a"), Ok(a));
            for cut in 0..b.len() {
                assert!(get_addr(&mut Reader::new(&b[..cut]), "a").is_err());
            }
        }
        assert_eq!(
            get_addr(&mut Reader::new(&[5, 0, 0, 0, 0, 0, 0]), "a"),
            Err(WireError::Field("a"))
        );
    }
}
