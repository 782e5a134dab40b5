//! Per-frame payload keys and AEAD sealing (FIG. 3).
//!
//! Every frame carries a fresh random 32-byte *frame key* in its header. The payload key and
//! nonce are derived with HKDF-SHA256:
//!
//! ```text
//! okm = HKDF-Expand(HKDF-Extract(salt = frame_key, ikm = master_key),
//!                   info = "mcast frame v1" || cipher byte, 44 bytes)
//! key = okm[0..32], nonce = okm[32..44]
//! ```
//!
//! A key is used for exactly one frame, so the derived nonce is never reused. The caller binds
//! the frame header (and with it the archive id, title and frame index) as associated data, so
//! a frame moved, swapped or re-labelled fails to open.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{Cipher, KeyError, MasterKey};

/// Length of the random frame key stored in each frame header.
pub const FRAME_KEY_LEN: usize = 32;

/// A fresh random frame key.
#[cfg(feature = "os")]
pub fn random_frame_key() -> [u8; FRAME_KEY_LEN] {
    let mut k = [0u8; FRAME_KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    k
}

/// Payload key + nonce for one frame; wiped on drop.
struct FrameSecret {
    okm: Zeroizing<[u8; 44]>,
}

impl FrameSecret {
    fn derive(master: &MasterKey, frame_key: &[u8; FRAME_KEY_LEN], cipher: Cipher) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(frame_key), master.as_bytes());
        let mut okm = Zeroizing::new([0u8; 44]);
        hk.expand_multi_info(&[b"mcast frame v1", &[cipher.to_byte()]], &mut okm[..])
            .expect("44 bytes is a valid HKDF-SHA256 output length");
        FrameSecret { okm }
    }

    fn key(&self) -> &[u8] {
        &self.okm[..32]
    }

    fn nonce(&self) -> &[u8] {
        &self.okm[32..44]
    }
}

/// Seal `buf` in place (ciphertext, then the tag appended). `Cipher::None` leaves it as is.
pub fn seal(
    cipher: Cipher,
    master: &MasterKey,
    frame_key: &[u8; FRAME_KEY_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) {
    let s = FrameSecret::derive(master, frame_key, cipher);
    let res = match cipher {
        Cipher::None => Ok(()),
        Cipher::Aes256Gcm => Aes256Gcm::new_from_slice(s.key())
            .expect("32-byte key")
            .encrypt_in_place(s.nonce().into(), aad, buf),
        Cipher::ChaCha20Poly1305 => ChaCha20Poly1305::new_from_slice(s.key())
            .expect("32-byte key")
            .encrypt_in_place(s.nonce().into(), aad, buf),
    };
    res.expect("sealing into a Vec cannot fail");
}

/// Open `buf` in place: verifies the tag, decrypts, and truncates the tag off.
/// On failure `buf` must be treated as garbage (the caller discards it).
pub fn open(
    cipher: Cipher,
    master: &MasterKey,
    frame_key: &[u8; FRAME_KEY_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), KeyError> {
    let s = FrameSecret::derive(master, frame_key, cipher);
    let res = match cipher {
        Cipher::None => Ok(()),
        Cipher::Aes256Gcm => Aes256Gcm::new_from_slice(s.key())
            .expect("32-byte key")
            .decrypt_in_place(s.nonce().into(), aad, buf),
        Cipher::ChaCha20Poly1305 => ChaCha20Poly1305::new_from_slice(s.key())
            .expect("32-byte key")
            .decrypt_in_place(s.nonce().into(), aad, buf),
    };
    res.map_err(|_| {
        // Do not leave partially decrypted bytes behind.
        buf.iter_mut().for_each(|b| *b = 0);
        KeyError::Open
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let m = MasterKey::generate();
            let fk = random_frame_key();
            let mut buf = b"hello frame".to_vec();
            seal(cipher, &m, &fk, b"hdr", &mut buf);
            assert_ne!(&buf[..11], b"hello frame");
            assert_eq!(buf.len(), 11 + cipher.tag_len());

            let mut ok = buf.clone();
            open(cipher, &m, &fk, b"hdr", &mut ok).unwrap();
            assert_eq!(ok, b"hello frame");

            let mut wrong_aad = buf.clone();
            assert!(open(cipher, &m, &fk, b"hdR", &mut wrong_aad).is_err());
            let mut wrong_master = buf.clone();
            assert!(open(
                cipher,
                &MasterKey::generate(),
                &fk,
                b"hdr",
                &mut wrong_master
            )
            .is_err());
            let mut wrong_fk = buf.clone();
            assert!(open(cipher, &m, &random_frame_key(), b"hdr", &mut wrong_fk).is_err());
            let mut flipped = buf.clone();
            flipped[3] ^= 1;
            assert!(open(cipher, &m, &fk, b"hdr", &mut flipped).is_err());
        }
    }

    #[test]
    fn ciphers_derive_distinct_keys() {
        let m = MasterKey::generate();
        let fk = random_frame_key();
        let a = FrameSecret::derive(&m, &fk, Cipher::Aes256Gcm);
        let c = FrameSecret::derive(&m, &fk, Cipher::ChaCha20Poly1305);
        assert_ne!(a.key(), c.key());
    }
}
