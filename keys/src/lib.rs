//! mcast-keys: every secret the product handles, and nothing else.
//!
//! * [`MasterKey`] — the random per-title key (FIG. 3 "master key"); lives only in the
//!   [`KeyStore`], never in an archive.
//! * [`frame`] — per-frame key derivation (HKDF-SHA256 over master key + the frame's random
//!   frame key) and AEAD sealing with AES-256-GCM or ChaCha20-Poly1305.
//! * [`Identity`] — the server's Ed25519 signing key, which signs archive manifests.
//! * [`KeyStore`] — a directory of 0600 files written atomically.
//! * [`ticket`] — play tickets: the per-ticket key split (A in the signed ticket, B in the
//!   server's database) and the ticket format; [`seal`] — part B sealed to a receiver (HPKE)
//!   and wrapped at rest; [`LockedKey`] — the recombined key in locked memory.
//!
//! Secrets are wiped on drop (`zeroize`).

pub mod cipher;
pub mod error;
pub mod frame;
pub mod identity;
#[cfg(feature = "os")]
pub mod locked;
pub mod master;
#[cfg(feature = "os")]
pub mod seal;
#[cfg(feature = "os")]
pub mod store;
#[cfg(feature = "os")]
pub mod ticket;
pub mod title;

pub use cipher::Cipher;
pub use error::KeyError;
pub use identity::{Identity, PublicIdentity, SIGNATURE_LEN};
#[cfg(feature = "os")]
pub use locked::LockedKey;
pub use master::{KeyId, MasterKey};
#[cfg(feature = "os")]
pub use store::KeyStore;

/// The crypto crates are built with their `zeroize` features (keys/Cargo.toml): the types that
/// hold key material wipe it on drop. A compile-time check: without the features these types
/// do not implement `ZeroizeOnDrop` and this test does not build.
#[cfg(test)]
mod zeroize_features {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}

    #[test]
    fn key_holding_types_wipe_on_drop() {
        // Frames: AES-256 round keys (aes-gcm's own `zeroize` wipes its GHASH key), ChaCha20.
        wiped_on_drop::<aes::Aes256>();
        wiped_on_drop::<chacha20poly1305::ChaCha20Poly1305>();
        // Tickets (HPKE): ChaCha20-Poly1305 0.11, and the SHA-256 states its HKDF's HMAC holds.
        #[cfg(feature = "os")]
        {
            wiped_on_drop::<hpke_chacha20poly1305::ChaCha20Poly1305>();
            wiped_on_drop::<hpke_sha2::Sha256>();
            // HMAC (hmac 0.13, `zeroize` -> digest's) keeps its keyed inner and outer states
            // as these SHA-256 cores.
            wiped_on_drop::<hpke_sha2::block_api::Sha256VarCore>();
        }
    }
}
