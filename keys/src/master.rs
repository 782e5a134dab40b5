use zeroize::{Zeroize, ZeroizeOnDrop};

/// A title's random 256-bit master key. Wiped on drop; `Debug` never prints it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

/// A public commitment to a master key for one archive, stored in the archive head so that a
/// wrong key is reported as "wrong key" before any frame is tried.
pub type KeyId = [u8; 16];

impl MasterKey {
    #[cfg(feature = "os")]
    pub fn generate() -> MasterKey {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        MasterKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// For building a key in place (locked memory) without a copy on the stack.
    #[cfg(feature = "os")]
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; 32] {
        &mut self.0
    }

    /// Key id for this key bound to one archive (`archive_id`): reveals nothing about the key
    /// (keyed BLAKE3 is a PRF) and differs per archive, so ids cannot be linked across titles.
    pub fn key_id(&self, archive_id: &[u8; 16]) -> KeyId {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"mcast key-id v1");
        h.update(archive_id);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }
}

impl MasterKey {
    /// The hasher for an archive's plaintext hash: keyed by a key derived from this one and
    /// the archive, so the public head does not let anyone holding a candidate file confirm
    /// what an encrypted title contains; only a key holder can check it.
    pub fn plain_hasher(&self, archive_id: &[u8; 16]) -> blake3::Hasher {
        let mut m = [0u8; 48];
        m[..32].copy_from_slice(&self.0);
        m[32..].copy_from_slice(archive_id);
        let mut k = blake3::derive_key("mcast plain-hash v1", &m);
        m.zeroize();
        let h = blake3::Hasher::new_keyed(&k);
        k.zeroize();
        h
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}
