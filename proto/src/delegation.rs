//! Delegation certificates: an origin server lets an edge server sign SYNCs for the origin's
//! titles without holding the origin's private key.
//!
//! An edge loops archives signed by the origin (their heads name the origin's key), but signs
//! the channel's SYNCs with its own identity. Receivers take a SYNC signed by the head's key,
//! or by a key a [`Delegation`] from the head's key names, while the delegation has not
//! expired. The edge hands the delegation to receivers in its join answer
//! (`wire::control::Control::JoinOk`); `mcastd delegate` on the origin issues it.
//!
//! ```text
//! magic "MCDG" | version:u8 (=1) | origin public key:32 | edge public key:32 |
//! not_after:u64 (unix seconds, little-endian) | Ed25519 signature by the origin over all before it:64
//! ```
//! 141 bytes; decoding checks the length, magic and version and never panics; the signature
//! is checked by [`Delegation::verify`] / [`Delegation::check`].

use mcast_keys::identity::PUBLIC_KEY_LEN;
use mcast_keys::{Identity, PublicIdentity, SIGNATURE_LEN};

use crate::codec::{Reader, Writer};

pub const DELEGATION_MAGIC: [u8; 4] = *b"MCDG";
pub const DELEGATION_VERSION: u8 = 1;
/// Bytes the signature covers.
const SIGNED_LEN: usize = 4 + 1 + PUBLIC_KEY_LEN + PUBLIC_KEY_LEN + 8;
/// Encoded length.
pub const DELEGATION_LEN: usize = SIGNED_LEN + SIGNATURE_LEN;

/// The origin `origin` lets `edge` sign SYNCs for its titles until `not_after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    pub origin: PublicIdentity,
    pub edge: PublicIdentity,
    /// Last unix second the delegation is valid.
    pub not_after: u64,
    pub signature: [u8; SIGNATURE_LEN],
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    #[error("not a delegation: {0} bytes (a delegation is {DELEGATION_LEN})")]
    Length(usize),
    #[error("not a delegation (bad magic)")]
    Magic,
    #[error("delegation version {0} is not supported (this build reads {DELEGATION_VERSION})")]
    Version(u8),
    #[error("delegation signature does not verify under origin key {origin}")]
    BadSignature { origin: String },
    #[error("delegation is from origin key {found}, not {expected}")]
    WrongOrigin { found: String, expected: String },
    #[error("delegation is for edge key {found}, not {expected}")]
    WrongEdge { found: String, expected: String },
    #[error("delegation expired at unix time {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
}

impl Delegation {
    /// `origin` delegates to `edge` until `not_after` (unix seconds).
    pub fn issue(origin: &Identity, edge: PublicIdentity, not_after: u64) -> Delegation {
        let mut d = Delegation {
            origin: origin.public(),
            edge,
            not_after,
            signature: [0; SIGNATURE_LEN],
        };
        d.signature = origin.sign(&d.signed_bytes());
        d
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DELEGATION_LEN);
        b.extend_from_slice(&DELEGATION_MAGIC);
        b.put_u8(DELEGATION_VERSION);
        b.extend_from_slice(&self.origin.0);
        b.extend_from_slice(&self.edge.0);
        b.put_u64(self.not_after);
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed_bytes();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decode exactly [`DELEGATION_LEN`] bytes (the signature is not checked here).
    pub fn decode(buf: &[u8]) -> Result<Delegation, DelegationError> {
        if buf.len() != DELEGATION_LEN {
            return Err(DelegationError::Length(buf.len()));
        }
        let mut r = Reader::new(buf);
        let short = |_| DelegationError::Length(buf.len());
        let magic: [u8; 4] = r.array("magic").map_err(short)?;
        if magic != DELEGATION_MAGIC {
            return Err(DelegationError::Magic);
        }
        let v = r.u8("version").map_err(short)?;
        if v != DELEGATION_VERSION {
            return Err(DelegationError::Version(v));
        }
        Ok(Delegation {
            origin: PublicIdentity(r.array("origin").map_err(short)?),
            edge: PublicIdentity(r.array("edge").map_err(short)?),
            not_after: r.u64("not_after").map_err(short)?,
            signature: r.array("signature").map_err(short)?,
        })
    }

    /// The signature is the origin's.
    pub fn verify(&self) -> Result<(), DelegationError> {
        self.origin
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| DelegationError::BadSignature {
                origin: hex::encode(self.origin.0),
            })
    }

    /// Valid at `now_unix` for SYNCs of titles signed by `origin`: from it, signed by it,
    /// not expired.
    pub fn check(&self, origin: &PublicIdentity, now_unix: u64) -> Result<(), DelegationError> {
        if self.origin != *origin {
            return Err(DelegationError::WrongOrigin {
                found: hex::encode(self.origin.0),
                expected: hex::encode(origin.0),
            });
        }
        self.verify()?;
        if now_unix > self.not_after {
            return Err(DelegationError::Expired {
                not_after: self.not_after,
                now: now_unix,
            });
        }
        Ok(())
    }

    /// [`Delegation::check`], and it names `edge`.
    pub fn check_for(
        &self,
        origin: &PublicIdentity,
        edge: &PublicIdentity,
        now_unix: u64,
    ) -> Result<(), DelegationError> {
        if self.edge != *edge {
            return Err(DelegationError::WrongEdge {
                found: hex::encode(self.edge.0),
                expected: hex::encode(edge.0),
            });
        }
        self.check(origin, now_unix)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn id(n: u8) -> Identity {
        Identity::from_secret(&[n; 32])
    }

    #[test]
    fn round_trip_and_checks() {
        let (origin, edge, other) = (id(1), id(2), id(3));
        let d = Delegation::issue(&origin, edge.public(), 1_000);
        let bytes = d.encode();
        assert_eq!(bytes.len(), DELEGATION_LEN);
        assert_eq!(Delegation::decode(&bytes).unwrap(), d);
        d.check_for(&origin.public(), &edge.public(), 1_000)
            .unwrap();
        assert!(matches!(
            d.check(&origin.public(), 1_001),
            Err(DelegationError::Expired {
                not_after: 1_000,
                now: 1_001
            })
        ));
        assert!(matches!(
            d.check(&other.public(), 10),
            Err(DelegationError::WrongOrigin { .. })
        ));
        assert!(matches!(
            d.check_for(&origin.public(), &other.public(), 10),
            Err(DelegationError::WrongEdge { .. })
        ));
        // Claiming the origin without its signature: refused.
        let mut forged = Delegation::issue(&other, edge.public(), 1_000);
        forged.origin = origin.public();
        assert!(matches!(
            forged.check(&origin.public(), 10),
            Err(DelegationError::BadSignature { .. })
        ));
        // Any altered byte breaks the signature (or the framing).
        for i in 0..DELEGATION_LEN {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            if let Ok(x) = Delegation::decode(&b) {
                assert!(x.check(&origin.public(), 10).is_err(), "byte {i}");
            }
        }
    }

    #[test]
    fn decode_never_panics() {
        let d = Delegation::issue(&id(1), id(2).public(), 7).encode();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(16);
        for _ in 0..20_000 {
            let mut b = if rng.gen_bool(0.5) {
                d.clone()
            } else {
                let n = rng.gen_range(0..200);
                (0..n).map(|_| rng.gen()).collect()
            };
            if !b.is_empty() {
                for _ in 0..rng.gen_range(0..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
                if rng.gen_bool(0.2) {
                    b.truncate(rng.gen_range(0..b.len()));
                }
            }
            if let Ok(x) = Delegation::decode(&b) {
                assert_eq!(x.encode(), b);
                let _ = x.check(&id(1).public(), 0);
            }
        }
        assert_eq!(Delegation::decode(&[]), Err(DelegationError::Length(0)));
    }
}
