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
