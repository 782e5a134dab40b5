//! Sealing key parts, in flight and at rest.
//!
//! **In flight** (server → receiver): part B travels sealed to the receiver's ephemeral X25519
//! key with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 +
//! ChaCha20-Poly1305). The receiver makes a fresh key pair for each play and forgets it after,
//! so a recorded grant can never be opened later. Info = `"mcast play grant v1"`, associated
//! data = `ticket_id || receiver_pub`, so a grant opens only for the ticket and request it
//! answers.
//!
//! ```text
//! sealed part = encapped key:[32] || ciphertext:[32] || tag:[16]
//! ```
//!
//! **At rest** (the server's ticket database): part B is wrapped with XChaCha20-Poly1305 under
//! the database key (`tickets.key` in the key store, never in the database), random 24-byte
//! nonce, associated data = `"mcast ticket db v1" || ticket_id || archive_id`, so neither the
//! database file nor its journal ever holds a key part, and a wrapped part cannot be moved to
//! another ticket's row.
//!
//! ```text
//! wrapped part = nonce:[24] || ciphertext:[32] || tag:[16]
//! ```

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use hpke::aead::{AeadTag, ChaCha20Poly1305 as HpkeChaCha};
use hpke::inout::InOutBuf;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::ticket::{KeyPart, TicketId, PART_LEN};
use crate::KeyError;

type Kem = X25519HkdfSha256;

/// Length of a receiver's ephemeral public key.
pub const RECEIVER_PUB_LEN: usize = 32;
/// Length of a part sealed to a receiver.
pub const SEALED_PART_LEN: usize = 32 + PART_LEN + 16;
/// Length of a part wrapped for the ticket database.
pub const WRAPPED_PART_LEN: usize = 24 + PART_LEN + 16;
pub const DB_KEY_LEN: usize = 32;

const GRANT_INFO: &[u8] = b"mcast play grant v1";
const DB_AAD: &[u8] = b"mcast ticket db v1";

fn grant_aad(ticket_id: &TicketId, receiver_pub: &[u8; RECEIVER_PUB_LEN]) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..16].copy_from_slice(ticket_id);
    aad[16..].copy_from_slice(receiver_pub);
    aad
}

/// A receiver's ephemeral key pair for one play. The secret is wiped on drop.
pub struct ReceiverKey {
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: [u8; RECEIVER_PUB_LEN],
}

impl ReceiverKey {
    pub fn generate() -> ReceiverKey {
        let (sk, pk) = Kem::gen_keypair();
        let mut p = [0u8; RECEIVER_PUB_LEN];
        p.copy_from_slice(&pk.to_bytes());
        ReceiverKey { sk, pk: p }
    }

    pub fn public(&self) -> [u8; RECEIVER_PUB_LEN] {
        self.pk
    }

    /// Open a part the server sealed to this key for `ticket_id`.
    pub fn open_part(&self, ticket_id: &TicketId, sealed: &[u8]) -> Result<KeyPart, KeyError> {
        if sealed.len() != SEALED_PART_LEN {
            return Err(KeyError::GrantOpen);
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed[..32])
            .map_err(|_| KeyError::GrantOpen)?;
        let tag = AeadTag::<HpkeChaCha>::from_bytes(&sealed[32 + PART_LEN..])
            .map_err(|_| KeyError::GrantOpen)?;
        let mut part = KeyPart::from_bytes([0u8; PART_LEN]);
        part.bytes_mut().copy_from_slice(&sealed[32..32 + PART_LEN]);
        let res = hpke::single_shot_open_inout_detached::<HpkeChaCha, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.sk,
            &enc,
            GRANT_INFO,
            InOutBuf::from(&mut part.bytes_mut()[..]),
            &grant_aad(ticket_id, &self.pk),
            &tag,
        );
        match res {
            Ok(()) => Ok(part),
            Err(_) => Err(KeyError::GrantOpen), // `part` is wiped on drop
        }
    }
}

impl std::fmt::Debug for ReceiverKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReceiverKey(pub {})", hex::encode(self.pk))
    }
}

/// Seal `part` to a receiver's ephemeral public key, for `ticket_id`.
pub fn seal_part(
    receiver_pub: &[u8; RECEIVER_PUB_LEN],
    ticket_id: &TicketId,
    part: &KeyPart,
) -> Result<Vec<u8>, KeyError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(receiver_pub)
        .map_err(|_| KeyError::BadReceiverKey)?;
    let mut buf = Zeroizing::new(*part.as_bytes());
    let (enc, tag) = hpke::single_shot_seal_inout_detached::<HpkeChaCha, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        GRANT_INFO,
        InOutBuf::from(&mut buf[..]),
        &grant_aad(ticket_id, receiver_pub),
    )
    // X25519 encapsulation fails only for a low-order public key (all-zero shared secret).
    .map_err(|_| KeyError::BadReceiverKey)?;
    let mut out = Vec::with_capacity(SEALED_PART_LEN);
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&buf[..]);
    out.extend_from_slice(&tag.to_bytes());
    Ok(out)
}

/// The key that wraps part B in the ticket database. Wiped on drop.
pub struct DbKey(Zeroizing<[u8; DB_KEY_LEN]>);

impl DbKey {
    pub fn from_bytes(bytes: Zeroizing<[u8; DB_KEY_LEN]>) -> DbKey {
        DbKey(bytes)
    }

    fn aad(ticket_id: &TicketId, archive_id: &[u8; 16]) -> [u8; 18 + 32] {
        let mut a = [0u8; 18 + 32];
        a[..18].copy_from_slice(DB_AAD);
        a[18..34].copy_from_slice(ticket_id);
        a[34..].copy_from_slice(archive_id);
        a
    }

    /// Wrap `part` for the row of `ticket_id`.
    pub fn wrap(&self, ticket_id: &TicketId, archive_id: &[u8; 16], part: &KeyPart) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut buf = Zeroizing::new(*part.as_bytes());
        let tag = XChaCha20Poly1305::new_from_slice(&self.0[..])
            .expect("32-byte key")
            .encrypt_in_place_detached(
                (&nonce).into(),
                &Self::aad(ticket_id, archive_id),
                &mut buf[..],
            )
            .expect("a 32-byte message always seals");
        let mut out = Vec::with_capacity(WRAPPED_PART_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(&tag);
        out
    }

    /// Unwrap the part stored in the row of `ticket_id`.
    pub fn unwrap(
        &self,
        ticket_id: &TicketId,
        archive_id: &[u8; 16],
        wrapped: &[u8],
    ) -> Result<KeyPart, KeyError> {
        if wrapped.len() != WRAPPED_PART_LEN {
            return Err(KeyError::Unwrap);
        }
        let mut part = KeyPart::from_bytes([0u8; PART_LEN]);
        part.bytes_mut()
            .copy_from_slice(&wrapped[24..24 + PART_LEN]);
        XChaCha20Poly1305::new_from_slice(&self.0[..])
            .expect("32-byte key")
            .decrypt_in_place_detached(
                wrapped[..24].into(),
                &Self::aad(ticket_id, archive_id),
                &mut part.bytes_mut()[..],
                wrapped[24 + PART_LEN..].into(),
            )
            .map_err(|_| KeyError::Unwrap)?;
        Ok(part)
    }
}

impl std::fmt::Debug for DbKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn grant_round_trip_and_binding() {
        let r = ReceiverKey::generate();
        let part = KeyPart::random();
        let tid = [1u8; 16];
        let sealed = seal_part(&r.public(), &tid, &part).unwrap();
        assert_eq!(sealed.len(), SEALED_PART_LEN);
        assert!(!contains(&sealed, part.as_bytes()));
        assert_eq!(r.open_part(&tid, &sealed).unwrap(), part);
        // Fresh encapsulation each time.
        assert_ne!(seal_part(&r.public(), &tid, &part).unwrap(), sealed);

        // Another ticket id, another receiver, any flipped bit, a short grant: refused.
        assert!(matches!(
            r.open_part(&[2u8; 16], &sealed),
            Err(KeyError::GrantOpen)
        ));
        assert!(ReceiverKey::generate().open_part(&tid, &sealed).is_err());
        for i in 0..sealed.len() {
            let mut s = sealed.clone();
            s[i] ^= 4;
            assert!(r.open_part(&tid, &s).is_err(), "flip at {i} opened");
        }
        assert!(r.open_part(&tid, &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn db_wrap_round_trip_and_binding() {
        let k = DbKey::from_bytes(Zeroizing::new([9u8; 32]));
        let part = KeyPart::random();
        let (tid, aid) = ([1u8; 16], [2u8; 16]);
        let w = k.wrap(&tid, &aid, &part);
        assert_eq!(w.len(), WRAPPED_PART_LEN);
        assert!(!contains(&w, part.as_bytes()));
        assert_eq!(k.unwrap(&tid, &aid, &w).unwrap(), part);
        assert!(matches!(
            k.unwrap(&[3u8; 16], &aid, &w),
            Err(KeyError::Unwrap)
        ));
        assert!(k.unwrap(&tid, &[3u8; 16], &w).is_err());
        let other = DbKey::from_bytes(Zeroizing::new([8u8; 32]));
        assert!(other.unwrap(&tid, &aid, &w).is_err());
        let mut t = w.clone();
        t[30] ^= 1;
        assert!(k.unwrap(&tid, &aid, &t).is_err());
    }

    #[test]
    fn low_order_receiver_keys_are_refused() {
        // The all-zero point gives an all-zero shared secret: HPKE refuses to encapsulate.
        let e = seal_part(&[0u8; 32], &[1u8; 16], &KeyPart::random()).unwrap_err();
        assert!(matches!(e, KeyError::BadReceiverKey), "{e:?}");
    }
}
