use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::KeyError;

pub const SIGNATURE_LEN: usize = 64;
pub const PUBLIC_KEY_LEN: usize = 32;

/// The server's Ed25519 identity: signs archive manifests (and, later, tickets).
pub struct Identity {
    key: SigningKey,
}

/// The public half, carried in archive heads and pinned by receivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicIdentity(pub [u8; PUBLIC_KEY_LEN]);

/// Shows the public half only: a secret never reaches a log.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public().fingerprint())
    }
}

impl Identity {
    #[cfg(feature = "os")]
    pub fn generate() -> Identity {
        Identity {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn from_secret(secret: &[u8; 32]) -> Identity {
        Identity {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The 32-byte secret seed; the caller stores it 0600 and drops the copy promptly.
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.key.to_bytes())
    }

    pub fn public(&self) -> PublicIdentity {
        PublicIdentity(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(msg).to_bytes()
    }
}

impl PublicIdentity {
    /// Verify with strict (non-malleable) Ed25519 checks.
    pub fn verify(&self, msg: &[u8], sig: &[u8; SIGNATURE_LEN]) -> Result<(), KeyError> {
        let vk = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        vk.verify_strict(msg, &sig)
            .map_err(|_| KeyError::BadSignature)
    }

    /// Short printable fingerprint (first 8 bytes, hex) for logs and `catalog`.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify() {
        let id = Identity::generate();
        let sig = id.sign(b"manifest");
        id.public().verify(b"manifest", &sig).unwrap();
        assert!(id.public().verify(b"manifesT", &sig).is_err());
        let other = Identity::generate();
        assert!(other.public().verify(b"manifest", &sig).is_err());
        let again = Identity::from_secret(&id.secret_bytes());
        assert_eq!(again.public(), id.public());
    }
}
