//! Wire formats. Every message starts with a version byte; every `decode` takes untrusted
//! bytes and returns an error, never panics (see `tests/wire_fuzz.rs`).
//!
//! * [`data`] — packets on a data channel (multicast group or unicast fallback): SYNC, hash
//!   packets and data packets of the carousel loop.
//! * [`control`] — request/response datagrams between `mcast-recv` and `mcastd`'s control
//!   port: join, head download, keepalive, completion, unicast fallback with cookie, stats.
//! * [`nak`] — repair requests, sent to the control port and to the channel's group.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::codec::{Reader, Writer};

pub mod control;
pub mod data;
pub mod director;
pub mod nak;

/// Protocol version carried in the first byte of every datagram.
pub const WIRE_VERSION: u8 = 1;

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

/// An IPv4 socket address: 4 address bytes, then the port.
pub(crate) fn put_v4(b: &mut Vec<u8>, a: &SocketAddrV4) {
    b.extend_from_slice(&a.ip().octets());
    b.put_u16(a.port());
}

pub(crate) fn get_v4(r: &mut Reader<'_>, f: &'static str) -> Result<SocketAddrV4, WireError> {
    let ip: [u8; 4] = r.array(f)?;
    Ok(SocketAddrV4::new(Ipv4Addr::from(ip), r.u16(f)?))
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

/// Whether `group` is in the source-specific multicast range (232.0.0.0/8, RFC 4607):
/// receivers join it for one source only.
pub fn is_ssm_group(group: std::net::Ipv4Addr) -> bool {
    group.octets()[0] == 232
}
