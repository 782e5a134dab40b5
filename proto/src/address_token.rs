//! Address validation before any state or any reply larger than the request (QUIC's Retry,
//! RFC 9000 §8.1): a requester proves it receives at its source address by echoing a
//! stateless token the server sent there.
//!
//! A UDP source address is free to forge, so until it is proven a request may get nothing
//! bigger than itself back (no amplification) and may create nothing (no join floods from
//! spoofed sources). A request that needs more — a join, a head chunk, the catalogue, a play —
//! and carries no valid token is answered with [`crate::wire::control::Control::Retry`], which
//! is smaller than any request allowed to ask for it; the requester repeats the request with
//! the token. The token is a keyed BLAKE3 MAC over the source IP and the time it was issued,
//! so the server keeps nothing per address, and a token seen from another address, or older
//! than [`TOKEN_LIFETIME`], fails.
//!
//! The token is bound to the IP only (not the port): a receiver's control and unicast sockets
//! share it, and a NAT rebinding its port does not cost a round trip. Proving a *port* (where
//! a unicast stream goes) is the unicast cookie's job (`channel::unicast`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Bytes of a token on the wire.
pub const TOKEN_LEN: usize = 16;
/// A token older than this no longer validates; the requester gets a fresh one by Retry.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(600);

pub type AddressToken = [u8; TOKEN_LEN];

/// `ip` as 16 bytes (IPv4 as its IPv6-mapped form: one address, one encoding).
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Issues and checks tokens; the secret is random per process (the driver draws it).
pub struct AddressTokens {
    key: [u8; 32],
    origin: Instant,
}

impl AddressTokens {
    /// `secret`: random per server or director start (tokens die with the process).
    pub fn new(secret: &[u8; 32], now: Instant) -> AddressTokens {
        AddressTokens {
            key: blake3::derive_key("mcast address token v1", secret),
            origin: now,
        }
    }

    fn mac(&self, ip: IpAddr, issued: u32) -> [u8; TOKEN_LEN - 4] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&ip_bytes(ip));
        h.update(&issued.to_le_bytes());
        h.finalize().as_bytes()[..TOKEN_LEN - 4]
            .try_into()
            .expect("12 bytes")
    }

    fn secs(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin)
            .as_secs()
            .min(u32::MAX as u64) as u32
    }

    /// A token for `ip`, valid from `now` for [`TOKEN_LIFETIME`].
    pub fn issue(&self, ip: IpAddr, now: Instant) -> AddressToken {
        let issued = self.secs(now);
        let mut t = [0u8; TOKEN_LEN];
        t[..4].copy_from_slice(&issued.to_le_bytes());
        t[4..].copy_from_slice(&self.mac(ip, issued));
        t
    }

    /// Whether `token` was issued by us to `ip` within the lifetime (compared in constant
    /// time: a timing oracle would let a spoofer forge one byte at a time).
    pub fn check(&self, ip: IpAddr, token: &AddressToken, now: Instant) -> bool {
        let issued = u32::from_le_bytes(token[..4].try_into().expect("4 bytes"));
        let age = self.secs(now).checked_sub(issued);
        let fresh = age.is_some_and(|a| (a as u64) < TOKEN_LIFETIME.as_secs());
        let mac_ok: bool = self.mac(ip, issued).ct_eq(&token[4..]).into();
        fresh & mac_ok
    }
}

/// An address range (`198.18.0.0/24`, `::1/128`, or one address), for admin lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// The loopback ranges: the default admin list (stats from the host itself).
    pub fn loopback() -> Vec<IpPrefix> {
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    }

    fn bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// The range as (network bits in the IPv6-mapped space, prefix length there): two
    /// prefixes naming the same range (`10.1.0.0/16`, `10.1.2.3/16`) are equal in it.
    pub fn network(&self) -> (u128, u32) {
        let len = match self.addr {
            IpAddr::V4(_) => 96 + self.len as u32,
            IpAddr::V6(_) => self.len as u32,
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        (Self::bits(self.addr) & mask, len)
    }

    /// Whether `ip` lies in the range (an IPv4 address and its IPv6-mapped form alike).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let len = match self.addr {
            IpAddr::V4(_) => 96 + self.len as u32,
            IpAddr::V6(_) => self.len as u32,
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        Self::bits(ip) & mask == Self::bits(self.addr) & mask
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<IpPrefix, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix-length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(IpPrefix { addr, len })
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_validates_only_for_its_address_and_lifetime() {
        let t0 = Instant::now();
        let v = AddressTokens::new(&[9; 32], t0);
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        let tok = v.issue(a, t0 + Duration::from_secs(5));
        assert!(v.check(a, &tok, t0 + Duration::from_secs(5)));
        assert!(v.check(a, &tok, t0 + Duration::from_secs(600)));
        assert!(
            !v.check(b, &tok, t0 + Duration::from_secs(5)),
            "other address"
        );
        assert!(!v.check(a, &tok, t0 + Duration::from_secs(605)), "expired");
        let mut forged = tok;
        forged[15] ^= 1;
        assert!(!v.check(a, &forged, t0 + Duration::from_secs(6)));
        // Issued "in the future" (a forged time field) never validates.
        let mut future = tok;
        future[..4].copy_from_slice(&100u32.to_le_bytes());
        assert!(!v.check(a, &future, t0 + Duration::from_secs(6)));
        // Another process (another secret) does not accept it.
        let other = AddressTokens::new(&[8; 32], t0);
        assert!(!other.check(a, &tok, t0 + Duration::from_secs(6)));
        // IPv4 and its mapped IPv6 form are one address.
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert!(v.check(mapped, &tok, t0 + Duration::from_secs(6)));
    }

    #[test]
    fn prefixes_parse_and_match() {
        let p: IpPrefix = "198.18.0.0/24".parse().unwrap();
        assert!(p.contains("198.18.0.77".parse().unwrap()));
        assert!(!p.contains("198.18.1.1".parse().unwrap()));
        assert!(p.contains("::ffff:198.18.0.5".parse().unwrap()));
        let one: IpPrefix = "10.1.2.3".parse().unwrap();
        assert!(one.contains("10.1.2.3".parse().unwrap()));
        assert!(!one.contains("10.1.2.4".parse().unwrap()));
        let lo = IpPrefix::loopback();
        assert!(lo.iter().any(|p| p.contains("127.0.0.1".parse().unwrap())));
        assert!(lo.iter().any(|p| p.contains("::1".parse().unwrap())));
        assert!(!lo.iter().any(|p| p.contains("10.0.0.1".parse().unwrap())));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("nope".parse::<IpPrefix>().is_err());
        assert_eq!(p.to_string(), "198.18.0.0/24");
    }
}
