//! NAK datagrams (FIG. 4D). A receiver sends the same NAK to the server's control port (which
//! repairs) and to its channel's multicast group (where other receivers hear it and suppress
//! their own NAKs for the same packets).
//!
//! ```text
//! version:u8 kind:u8(=0x80) flags:u16 archive_tag:[8] session_tag:u64 count:u16
//! count × (first_unit:u64 len:u32)
//! [flags & SYMBOLS: count2:u16 count2 × (fec_block:u64 symbols:u32)]
//! [flags & MAC: mac:[16]]
//! ```
//! The MAC (keyed BLAKE3 under the receiver's session key, over every byte before it) lets
//! the server repair only for its members: a NAK without one, or for no member, costs it
//! nothing. `session_tag` ([`session_tag`]) is derived from the session key, not the receiver
//! id: the server finds the session (and the key to check) by it, the group never learns a
//! receiver's id (with which it could, for one, join in that receiver's name first), and a
//! new session shows a new tag. Receivers overhearing NAKs on the group cannot check it (they do not hold the
//! key) and act on what they hear only to hold their own NAKs back.
//! Units are the loop's dense unit indices ([`crate::carousel::LoopShape::unit_index`]).
//! The symbols section asks for *amounts* (FEC archives): "block `f`: `n` more symbols, any";
//! the server answers with extra symbols nobody has yet ([`crate::archive::extras`]), and a
//! receiver that overhears a request for at least what it is short of suppresses its own.
//! `kind` 0x80 never collides with a data-packet kind (0..=2) or a control type (1..=127), so
//! both ports tell a NAK apart by its second byte.

use crate::codec::{Reader, Writer};

use super::control::{mac_trailer_ok, session_mac, without_mac, SessionKey};
use super::{check_version, WireError, WIRE_VERSION};

pub const NAK_KIND: u8 = 0x80;
/// Most ranges one NAK carries (keeps it under ~1.2 KB), symbol requests included.
pub const MAX_NAK_RANGES: usize = 96;
/// Header flag: a symbols section follows the ranges.
const FLAG_SYMBOLS: u16 = 1;
/// Header flag: the session MAC ends the datagram.
const FLAG_MAC: u16 = 2;
/// Most units a receiver takes from a NAK it overhears (the server repairs at most its
/// `max_nak_units`, 8192 by default, per NAK anyway).
pub const MAX_HEARD_UNITS: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nak {
    pub archive_tag: [u8; 8],
    /// The sender's [`session_tag`]; [`Nak::encode_sealed`] writes it from the key.
    pub session_tag: u64,
    /// (first unit, count), ascending and non-overlapping when built by [`to_ranges`].
    pub ranges: Vec<(u64, u32)>,
    /// (FEC source block, symbols wanted): amounts, answered with fresh symbols.
    pub symbols: Vec<(u64, u32)>,
}

/// The tag a session's NAKs carry: a PRF of its key, so it names the session to the server,
/// which derived the key, and to nobody else.
pub fn session_tag(key: &SessionKey) -> u64 {
    let h = blake3::keyed_hash(key, b"mcast nak session tag v1");
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// True if a datagram is a NAK (cheap check before decoding).
pub fn is_nak(buf: &[u8]) -> bool {
    buf.len() >= 2 && buf[0] == WIRE_VERSION && buf[1] == NAK_KIND
}

impl Nak {
    pub fn encode(&self) -> Vec<u8> {
        let m = self.symbols.len().min(MAX_NAK_RANGES);
        let n = self.ranges.len().min(MAX_NAK_RANGES - m);
        let mut b = Vec::with_capacity(24 + (n + m) * 12);
        b.put_u8(WIRE_VERSION);
        b.put_u8(NAK_KIND);
        b.put_u16(if m > 0 { FLAG_SYMBOLS } else { 0 });
        b.extend_from_slice(&self.archive_tag);
        b.put_u64(self.session_tag);
        b.put_u16(n as u16);
        for &(first, len) in &self.ranges[..n] {
            b.put_u64(first);
            b.put_u32(len);
        }
        if m > 0 {
            b.put_u16(m as u16);
            for &(block, k) in &self.symbols[..m] {
                b.put_u64(block);
                b.put_u32(k);
            }
        }
        b
    }

    /// Encoded under the session's `key`: its [`session_tag`] in place of `self.session_tag`,
    /// and its MAC.
    pub fn encode_sealed(&self, key: &SessionKey) -> Vec<u8> {
        let mut b = Nak {
            session_tag: session_tag(key),
            ..self.clone()
        }
        .encode();
        b[2] |= FLAG_MAC as u8;
        let mac = session_mac(key, &b);
        b.extend_from_slice(&mac);
        b
    }

    /// Whether `datagram` (an encoded NAK) carries a valid session MAC under `key`.
    pub fn mac_ok(datagram: &[u8], key: &SessionKey) -> bool {
        let flagged = datagram.get(2).is_some_and(|f| *f as u16 & FLAG_MAC != 0);
        mac_trailer_ok(datagram, flagged, key)
    }

    pub fn decode(buf: &[u8]) -> Result<Nak, WireError> {
        check_version(buf)?;
        let flags = buf
            .get(2..4)
            .map_or(0, |f| u16::from_le_bytes([f[0], f[1]]));
        let buf = without_mac(buf, flags & FLAG_MAC != 0, 4)?;
        let mut r = Reader::new(buf);
        r.u8("version")?;
        let kind = r.u8("kind")?;
        if kind != NAK_KIND {
            return Err(WireError::Kind(kind));
        }
        let flags = r.u16("flags")?;
        if flags & !(FLAG_SYMBOLS | FLAG_MAC) != 0 {
            return Err(WireError::Field("flags"));
        }
        let archive_tag = r.array("archive_tag")?;
        let session_tag = r.u64("session_tag")?;
        let n = r.u16("count")? as usize;
        if n > MAX_NAK_RANGES {
            return Err(WireError::Field("count"));
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let first = r.u64("first")?;
            let len = r.u32("len")?;
            if len == 0 || first.checked_add(len as u64).is_none() {
                return Err(WireError::Field("range"));
            }
            ranges.push((first, len));
        }
        let mut symbols = Vec::new();
        if flags & FLAG_SYMBOLS != 0 {
            let m = r.u16("symbols count")? as usize;
            if m == 0 || n + m > MAX_NAK_RANGES {
                return Err(WireError::Field("symbols count"));
            }
            for _ in 0..m {
                let block = r.u64("fec_block")?;
                let k = r.u32("symbols")?;
                if k == 0 {
                    return Err(WireError::Field("symbols"));
                }
                symbols.push((block, k));
            }
        }
        if r.remaining() != 0 {
            return Err(WireError::Field("trailing bytes"));
        }
        Ok(Nak {
            archive_tag,
            session_tag,
            ranges,
            symbols,
        })
    }

    /// Every unit this NAK names.
    pub fn units(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(first, len)| first..first + len as u64)
    }

    /// The units this NAK names inside a loop of `loop_units`, at most [`MAX_HEARD_UNITS`]:
    /// what a receiver overhearing it may act on. Each range of a forged NAK can name 2^32
    /// units; walking them all (as [`Nak::units`] does) stalls a receiver for seconds per
    /// datagram (found by `fuzz/`, target `data`).
    pub fn units_in(&self, loop_units: u64) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(move |&(first, len)| {
                first.min(loop_units)..first.saturating_add(len as u64).min(loop_units)
            })
            .take(MAX_HEARD_UNITS)
    }
}

/// Compress ascending units into (first, len) ranges.
pub fn to_ranges(units: impl IntoIterator<Item = u64>) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for u in units {
        match out.last_mut() {
            Some((first, len)) if *first + *len as u64 == u && *len < u32::MAX => *len += 1,
            _ => out.push((u, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_ranges_and_truncation() {
        let n = Nak {
            archive_tag: [1; 8],
            session_tag: 77,
            ranges: to_ranges([1, 2, 3, 7, 9, 10]),
            symbols: Vec::new(),
        };
        assert_eq!(n.ranges, vec![(1, 3), (7, 1), (9, 2)]);
        let b = n.encode();
        assert!(is_nak(&b));
        assert_eq!(Nak::decode(&b).unwrap(), n);
        assert_eq!(n.units().collect::<Vec<_>>(), vec![1, 2, 3, 7, 9, 10]);
        for k in 0..b.len() {
            assert!(Nak::decode(&b[..k]).is_err());
        }
    }

    #[test]
    fn a_sealed_nak_decodes_alike_and_verifies_under_its_key_only() {
        let n = Nak {
            archive_tag: [1; 8],
            session_tag: 77,
            ranges: vec![(5, 3)],
            symbols: vec![(2, 9)],
        };
        let b = n.encode_sealed(&[4; 32]);
        assert!(is_nak(&b));
        let tagged = Nak {
            session_tag: session_tag(&[4; 32]),
            ..n.clone()
        };
        assert_eq!(Nak::decode(&b).unwrap(), tagged);
        assert_ne!(session_tag(&[4; 32]), session_tag(&[5; 32]));
        assert!(Nak::mac_ok(&b, &[4; 32]));
        assert!(!Nak::mac_ok(&b, &[5; 32]));
        assert!(!Nak::mac_ok(&n.encode(), &[4; 32]));
        let mut other = b.clone();
        other[12] ^= 1; // another session tag under the same MAC
        assert!(!Nak::mac_ok(&other, &[4; 32]));
        for k in 0..b.len() {
            assert!(!Nak::mac_ok(&b[..k], &[4; 32]));
        }
        let mut unknown = n.encode();
        unknown[2] |= 0x40;
        assert!(Nak::decode(&unknown).is_err(), "unknown flags");
    }

    #[test]
    fn round_trip_symbol_amounts() {
        let n = Nak {
            archive_tag: [2; 8],
            session_tag: 5,
            ranges: vec![(4, 2)],
            symbols: vec![(0, 17), (9, 130)],
        };
        let b = n.encode();
        assert_eq!(Nak::decode(&b).unwrap(), n);
        for k in 0..b.len() {
            assert!(Nak::decode(&b[..k]).is_err());
        }
        // Amounts only, and a zero amount refused.
        let only = Nak {
            ranges: Vec::new(),
            ..n.clone()
        };
        assert_eq!(Nak::decode(&only.encode()).unwrap(), only);
        let mut zero = only.encode();
        let at = zero.len() - 4;
        zero[at..].copy_from_slice(&0u32.to_le_bytes());
        assert!(Nak::decode(&zero).is_err());
        // Ranges and amounts together stay within one NAK's bound.
        let many = Nak {
            ranges: (0..200).map(|i| (i * 3, 1)).collect(),
            symbols: (0..10).map(|f| (f, 1)).collect(),
            ..n
        };
        let d = Nak::decode(&many.encode()).unwrap();
        assert_eq!(d.symbols.len(), 10);
        assert_eq!(d.ranges.len() + d.symbols.len(), MAX_NAK_RANGES);
    }

    #[test]
    fn overheard_units_are_bounded_by_the_loop_and_a_cap() {
        // A forged NAK: 96 ranges of 2^32 - 1 units each (~4e11 units in all).
        let huge = Nak {
            archive_tag: [1; 8],
            session_tag: 1,
            ranges: (0..MAX_NAK_RANGES as u64)
                .map(|i| (i * 7, u32::MAX))
                .collect(),
            symbols: Vec::new(),
        };
        let huge = Nak::decode(&huge.encode()).unwrap();
        let t = std::time::Instant::now();
        let units: Vec<u64> = huge.units_in(1_000_000).collect();
        assert_eq!(units.len(), MAX_HEARD_UNITS);
        assert!(units.iter().all(|&u| u < 1_000_000));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Units past the loop are dropped, those inside kept in order.
        let n = Nak {
            archive_tag: [1; 8],
            session_tag: 1,
            ranges: vec![(3, 2), (98, 5), (u64::MAX - 10, 10)],
            symbols: Vec::new(),
        };
        assert_eq!(n.units_in(100).collect::<Vec<_>>(), vec![3, 4, 98, 99]);
    }
}
