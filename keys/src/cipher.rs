/// The AEAD a title's frames are sealed with. Stored as one byte in archive headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// No encryption: advertisement archives (FIG. 3: "advertisements are not encrypted").
    None,
    /// AES-256-GCM, the default; fast wherever AES-NI / ARMv8-AES exist.
    Aes256Gcm,
    /// ChaCha20-Poly1305, for hosts without AES hardware.
    ChaCha20Poly1305,
}

impl Cipher {
    /// Authentication tag bytes appended to every sealed payload.
    pub fn tag_len(self) -> usize {
        match self {
            Cipher::None => 0,
            Cipher::Aes256Gcm | Cipher::ChaCha20Poly1305 => 16,
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Cipher::None => 0,
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<Cipher> {
        match b {
            0 => Some(Cipher::None),
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Name used on the command line, in configs and in the catalogue.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::None => "none",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    pub fn from_name(s: &str) -> Option<Cipher> {
        match s {
            "none" => Some(Cipher::None),
            "aes-256-gcm" | "aes256gcm" | "aes" => Some(Cipher::Aes256Gcm),
            "chacha20-poly1305" | "chacha20poly1305" | "chacha" => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
