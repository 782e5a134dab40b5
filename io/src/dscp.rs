//! DSCP (RFC 2474): the traffic class a site's network gives our packets. Written as a name
//! operators know from their QoS policy (`CS1`, `AF11`, `AF41`, `EF`, …) or a number 0..=63,
//! and set on a socket as the IP TOS byte's upper six bits.

use std::os::fd::AsFd;

/// A DSCP value, 0..=63.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dscp(u8);

impl Dscp {
    /// Best effort (`CS0`, `default`): the kernel's own TOS of 0.
    pub const DEFAULT: Dscp = Dscp(0);

    pub fn value(self) -> u8 {
        self.0
    }

    /// Parse `CS0`..`CS7`, `AF11`..`AF43`, `EF`, `VA`, `LE`, `default`, or a number 0..=63
    /// (decimal, or hex as `0x..`). Case does not matter.
    pub fn parse(s: &str) -> Result<Dscp, String> {
        let t = s.trim().to_ascii_uppercase();
        let n = match t.as_str() {
            "DEFAULT" | "BE" => Some(0),
            "EF" => Some(46),
            "VA" => Some(44),
            "LE" => Some(1),
            _ => None,
        };
        let n = n.or_else(|| {
            let cs = t
                .strip_prefix("CS")?
                .parse::<u8>()
                .ok()
                .filter(|c| *c <= 7)?;
            Some(cs << 3)
        });
        let n = n.or_else(|| {
            let af = t.strip_prefix("AF")?.as_bytes();
            match af {
                [c @ b'1'..=b'4', d @ b'1'..=b'3'] => Some(((c - b'0') << 3) | ((d - b'0') << 1)),
                _ => None,
            }
        });
        let n = n.or_else(|| match t.strip_prefix("0X") {
            Some(h) => u8::from_str_radix(h, 16).ok(),
            None => t.parse::<u8>().ok(),
        });
        match n {
            Some(v) if v <= 63 => Ok(Dscp(v)),
            _ => Err(format!(
                "{s:?} is not a DSCP: use a name (CS0..CS7, AF11..AF43, EF, VA, LE, default) or a \
                 number 0..=63"
            )),
        }
    }

    /// Set it on a socket: IP_TOS for IPv4, IPV6_TCLASS for IPv6 (and IP_TOS too, for the
    /// IPv4-mapped traffic of a dual-stack socket); ECN bits left 0. DEFAULT leaves the
    /// socket alone.
    pub fn apply(self, sock: &impl AsFd) -> std::io::Result<()> {
        if self == Dscp::DEFAULT {
            return Ok(());
        }
        let s = socket2::SockRef::from(sock);
        let v = (self.0 as u32) << 2;
        if s.local_addr()?.is_ipv6() {
            s.set_tclass_v6(v)?;
            let _ = s.set_tos(v);
            Ok(())
        } else {
            s.set_tos(v)
        }
    }
}

impl std::fmt::Display for Dscp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Dscp {
    type Err = String;
    fn from_str(s: &str) -> Result<Dscp, String> {
        Dscp::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for (s, v) in [
            ("CS0", 0),
            ("default", 0),
            ("cs1", 8),
            ("AF11", 10),
            ("af41", 34),
            ("AF43", 38),
            ("EF", 46),
            ("CS7", 56),
            ("63", 63),
            ("0x22", 34),
        ] {
            assert_eq!(Dscp::parse(s), Ok(Dscp(v)), "{s}");
        }
        for bad in ["64", "AF14", "AF51", "CS8", "fast", "", "-1"] {
            let e = Dscp::parse(bad).unwrap_err();
            assert!(e.contains("not a DSCP"), "{bad}: {e}");
        }
    }

    #[test]
    fn applied_to_a_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        Dscp::parse("AF41").unwrap().apply(&s).unwrap();
        assert_eq!(socket2::SockRef::from(&s).tos().unwrap(), 34 << 2);
        if let Ok(s6) = std::net::UdpSocket::bind("[::1]:0") {
            Dscp::parse("EF").unwrap().apply(&s6).unwrap();
            assert_eq!(socket2::SockRef::from(&s6).tclass_v6().unwrap(), 46 << 2);
        }
    }
}
