//! The archive head: everything a receiver must trust before it writes a byte.
//!
//! The head is signed by the server identity (Ed25519) and carries the top of the integrity
//! tree: one BLAKE3 hash per *block*, where a block's hash packet lists the leaf hash of each of
//! its data packets (see [`super::manifest`]). It also names the title, cipher, sizes, the
//! plaintext hash and the key id that lets a wrong key be told apart from tampering.
//!
//! Encoding (little-endian; version 1 without FEC, version 3 with it, version 4 for
//! plug-ins and adverts associated with titles):
//!
//! ```text
//! "MCHD" version:u8 flags:u8 cipher:u8 compression:u8
//! archive_id:[16] key_id:[16] title:str16 watermark:str16 created_unix:u64
//! plain_len:u64 plain_hash:[32] frame_size:u32 frame_count:u64 data_len:u64
//! symbol_size:u32 block_symbols:u32 repair_symbols:u32 [fec_source:u32 — v3, v4 (0: no FEC)]
//! [placement:u8 n_for:u8 for_titles:str16*n_for — v4 only]
//! n_blocks:u64 server_key:[32] block_hashes:[32; n_blocks] signature:[64]
//! ```
//! Version 4 is written only when needed (a plug-in, or an advert with associations), so
//! ordinary titles stay readable by older receivers; older builds refuse v4 by its version.
//! `n_blocks` counts every hash packet: the data blocks', then the repair symbols' (see
//! [`super::fec`]). Version 2 (one development release) hashed only the stored repair
//! symbols; version 3 hashes every symbol of the code, extras too, and 2 is refused. The signature covers `"mcast head v1" || every byte before it`.

use mcast_keys::{Cipher, PublicIdentity, SIGNATURE_LEN};

use crate::codec::{Reader, Short, Writer};

pub const HEAD_MAGIC: &[u8; 4] = b"MCHD";
/// Newest head version this build writes and reads (3: FEC fields, extras hashed); 1 is still read and
/// written for archives without repair symbols, so older receivers keep loading them.
pub const HEAD_VERSION: u8 = 3;
pub const HEAD_VERSION_NO_FEC: u8 = 1;
/// Head version of plug-ins and of adverts associated with titles (FIG. 3 association rules).
pub const HEAD_VERSION_ASSOC: u8 = 4;
const SIGN_CONTEXT: &[u8] = b"mcast head v1";

/// Flag bit: an unencrypted advertisement archive.
pub const FLAG_ADVERT: u8 = 1;
/// Flag bit: data-packet leaves are SHA-256, not BLAKE3 ([`super::manifest::LeafHash`]).
pub const FLAG_LEAF_SHA256: u8 = 2;
/// Flag bit: `plain_hash` is keyed from the title's master key
/// ([`mcast_keys::MasterKey::plain_hasher`]), so it confirms nothing to those without it.
/// Encrypted archives packed before this flag hash the plaintext unkeyed.
pub const FLAG_KEYED_PLAIN_HASH: u8 = 4;
/// Flag bit (v4 only): a plug-in/codec archive, neither encrypted nor watermarked.
pub const FLAG_PLUGIN: u8 = 8;
/// Most titles one advert may be associated with.
pub const MAX_ADVERT_FOR: usize = 32;

/// Smallest and largest packet payloads ("symbols") an archive may use.
pub const MIN_SYMBOL_SIZE: u32 = 256;
pub const MAX_SYMBOL_SIZE: u32 = 65_504; // fits one UDP datagram with our header
/// Symbol sizes are whole multiples of this (a block's hash packet, one symbol, holds its
/// 32-byte leaf hashes).
pub const SYMBOL_SIZE_STEP: u32 = 32;
pub const MAX_TITLE_LEN: usize = 128;
pub const MAX_WATERMARK_LEN: usize = 256;
/// Largest frame (plaintext) size: frames are handled whole in memory.
pub const MAX_FRAME_SIZE: u32 = 64 << 20;

/// The frame-size rule, for head decode, `mcastd pack` and `[pack] frame_size`:
/// 1 ..= [`MAX_FRAME_SIZE`].
pub fn frame_size_ok(frame_size: u32) -> bool {
    (1..=MAX_FRAME_SIZE).contains(&frame_size)
}

/// The symbol-size rule, for head decode, `mcastd pack` and `[pack] symbol_size`: a multiple
/// of [`SYMBOL_SIZE_STEP`] in [`MIN_SYMBOL_SIZE`] ..= [`MAX_SYMBOL_SIZE`].
pub fn symbol_size_ok(symbol_size: u32) -> bool {
    (MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE).contains(&symbol_size)
        && symbol_size % SYMBOL_SIZE_STEP == 0
}

/// How the frames' payloads were compressed at pack time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn to_byte(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

/// Where an associated advert plays around its title.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// Before the title.
    #[default]
    Leader,
    /// After the title.
    Trailer,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Leader => "leader",
            Placement::Trailer => "trailer",
        }
    }
}

/// Decoded, signature-checked-or-not head. Fields are public: it is plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub advert: bool,
    /// A plug-in/codec archive (unencrypted, no watermark).
    pub plugin: bool,
    /// Titles this advert plays with (signed: the only source receivers act on).
    pub advert_for: Vec<String>,
    /// Leader or trailer of those titles.
    pub placement: Placement,
    /// How data packets are hashed into the manifest's leaves.
    pub leaf_hash: super::manifest::LeafHash,
    pub cipher: Cipher,
    pub compression: Compression,
    /// Random per archive: binds frames and packets to this one archive.
    pub archive_id: [u8; 16],
    /// Commitment to the master key ([`mcast_keys::MasterKey::key_id`]); zero for adverts.
    pub key_id: [u8; 16],
    pub title: String,
    /// Source/owner id (FIG. 3 watermark); empty when none.
    pub watermark: String,
    pub created_unix: u64,
    pub plain_len: u64,
    /// BLAKE3 of the plaintext; keyed when `plain_hash_keyed` (encrypted titles).
    pub plain_hash: [u8; 32],
    /// See [`FLAG_KEYED_PLAIN_HASH`].
    pub plain_hash_keyed: bool,
    pub frame_size: u32,
    pub frame_count: u64,
    /// Bytes of the frames region, i.e. of all data packets together.
    pub data_len: u64,
    /// Payload bytes of one packet (the last data packet may be shorter).
    pub symbol_size: u32,
    /// Data packets ("source symbols") per block: `symbol_size / 32`, so that one hash packet
    /// holds the leaf hashes of a whole block.
    pub block_symbols: u32,
    /// Repair symbols per FEC source block (0: no FEC; see [`super::fec`]).
    pub repair_symbols: u32,
    /// Data packets per FEC source block (0: no FEC). The last block may hold fewer; every
    /// block has `repair_symbols` repair symbols.
    pub fec_source: u32,
    pub server_key: PublicIdentity,
    /// BLAKE3 of each block's hash packet.
    pub block_hashes: Vec<[u8; 32]>,
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why a head could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("not an mcast archive head (bad magic)")]
    Magic,
    #[error("archive head version {0} is not supported by this build (it reads {HEAD_VERSION_NO_FEC}, {HEAD_VERSION} and {HEAD_VERSION_ASSOC}): repack the title with this build's `mcastd pack`")]
    Version(u8),
    #[error("archive head is truncated: {0}")]
    Short(#[from] Short),
    #[error("archive head field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
}

fn bad(field: &'static str, why: impl Into<String>) -> HeadError {
    HeadError::Field {
        field,
        why: why.into(),
    }
}

impl Head {
    /// Head version this head encodes as (4 with a plug-in flag or associations, else 1
    /// unless it carries FEC).
    pub fn version(&self) -> u8 {
        if self.plugin || !self.advert_for.is_empty() {
            HEAD_VERSION_ASSOC
        } else if self.fec_source == 0 {
            HEAD_VERSION_NO_FEC
        } else {
            HEAD_VERSION
        }
    }

    /// FEC source blocks (0 without FEC).
    pub fn fec_blocks(&self) -> u64 {
        if self.fec_source == 0 {
            return 0;
        }
        self.data_packets().div_ceil(self.fec_source as u64)
    }

    /// Repair symbols in all (each a full symbol).
    pub fn repair_packets(&self) -> u64 {
        self.fec_blocks() * self.repair_symbols as u64
    }

    /// Hash packets that cover repair symbols (after the data blocks' hash packets): each
    /// FEC block's symbols, stored and extra ([`super::fec::hashed_symbols`]), start a hash
    /// packet of their own.
    pub fn repair_hash_blocks(&self) -> u64 {
        self.fec_blocks()
            * (super::fec::hashed_symbols(self.repair_symbols as usize) as u64)
                .div_ceil((self.block_symbols as u64).max(1))
    }

    /// Every hash packet: data blocks' and repair symbols'.
    pub fn hash_blocks(&self) -> u64 {
        self.n_blocks() + self.repair_hash_blocks()
    }

    /// Number of data blocks (computed, so a head kept without its block hashes, as the server
    /// keeps it, still describes the loop).
    pub fn n_blocks(&self) -> u64 {
        self.data_packets()
            .div_ceil((self.block_symbols as u64).max(1))
    }

    /// Number of data packets.
    pub fn data_packets(&self) -> u64 {
        self.data_len.div_ceil(self.symbol_size as u64)
    }

    /// Number of packets that travel in one loop: data and repair packets plus one hash
    /// packet per block of either.
    pub fn loop_packets(&self) -> u64 {
        self.data_packets() + self.repair_packets() + self.hash_blocks()
    }

    /// Bytes of the repair region (one full symbol per repair symbol).
    pub fn repair_region_len(&self) -> u64 {
        self.repair_packets() * self.symbol_size as u64
    }

    /// Bytes of the hash region (one full symbol per hash packet).
    pub fn hash_region_len(&self) -> u64 {
        self.hash_blocks() * self.symbol_size as u64
    }

    /// Payload bytes a complete download holds (data and data hash packets; a FEC
    /// archive's repair symbols only help get there).
    pub fn needed_bytes(&self) -> u64 {
        self.data_len + self.n_blocks() * self.symbol_size as u64
    }

    /// Bytes sent in one loop (payloads only).
    pub fn loop_bytes(&self) -> u64 {
        self.data_len + self.repair_region_len() + self.hash_region_len()
    }

    /// Bytes covered by the signature.
    fn signed_part(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256 + self.block_hashes.len() * 32);
        b.extend_from_slice(HEAD_MAGIC);
        let version = self.version();
        b.put_u8(version);
        let leaf = match self.leaf_hash {
            super::manifest::LeafHash::Sha256 => FLAG_LEAF_SHA256,
            super::manifest::LeafHash::Blake3 => 0,
        };
        let keyed = if self.plain_hash_keyed {
            FLAG_KEYED_PLAIN_HASH
        } else {
            0
        };
        let plugin = if self.plugin { FLAG_PLUGIN } else { 0 };
        b.put_u8(if self.advert { FLAG_ADVERT } else { 0 } | leaf | keyed | plugin);
        b.put_u8(self.cipher.to_byte());
        b.put_u8(self.compression.to_byte());
        b.extend_from_slice(&self.archive_id);
        b.extend_from_slice(&self.key_id);
        b.put_short_bytes(self.title.as_bytes());
        b.put_short_bytes(self.watermark.as_bytes());
        b.put_u64(self.created_unix);
        b.put_u64(self.plain_len);
        b.extend_from_slice(&self.plain_hash);
        b.put_u32(self.frame_size);
        b.put_u64(self.frame_count);
        b.put_u64(self.data_len);
        b.put_u32(self.symbol_size);
        b.put_u32(self.block_symbols);
        b.put_u32(self.repair_symbols);
        if version != HEAD_VERSION_NO_FEC {
            b.put_u32(self.fec_source);
        }
        if version == HEAD_VERSION_ASSOC {
            b.put_u8(match self.placement {
                Placement::Leader => 0,
                Placement::Trailer => 1,
            });
            b.put_u8(self.advert_for.len().min(MAX_ADVERT_FOR) as u8);
            for t in self.advert_for.iter().take(MAX_ADVERT_FOR) {
                b.put_short_bytes(t.as_bytes());
            }
        }
        b.put_u64(self.block_hashes.len() as u64);
        b.extend_from_slice(&self.server_key.0);
        for h in &self.block_hashes {
            b.extend_from_slice(h);
        }
        b
    }

    fn signing_message(signed: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGN_CONTEXT.len() + signed.len());
        m.extend_from_slice(SIGN_CONTEXT);
        m.extend_from_slice(signed);
        m
    }

    /// Sign with the server identity (sets `server_key` and `signature`).
    pub fn sign(&mut self, id: &mcast_keys::Identity) {
        self.server_key = id.public();
        let msg = Self::signing_message(&self.signed_part());
        self.signature = id.sign(&msg);
    }

    /// Check the signature against the head's own server key. Callers must also check that
    /// key against the identity they trust ([`Head::verify_with`]).
    pub fn verify_with(&self, trusted: &PublicIdentity) -> Result<(), mcast_keys::KeyError> {
        if &self.server_key != trusted {
            return Err(mcast_keys::KeyError::BadSignature);
        }
        let msg = Self::signing_message(&self.signed_part());
        trusted.verify(&msg, &self.signature)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed_part();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decode and sanity-check a head. Never panics; does not check the signature.
    pub fn decode(buf: &[u8]) -> Result<Head, HeadError> {
        let mut r = Reader::new(buf);
        if r.bytes(4, "magic")? != HEAD_MAGIC {
            return Err(HeadError::Magic);
        }
        let version = r.u8("version")?;
        if ![HEAD_VERSION, HEAD_VERSION_NO_FEC, HEAD_VERSION_ASSOC].contains(&version) {
            return Err(HeadError::Version(version));
        }
        let flags = r.u8("flags")?;
        let known = FLAG_ADVERT
            | FLAG_LEAF_SHA256
            | FLAG_KEYED_PLAIN_HASH
            | if version == HEAD_VERSION_ASSOC {
                FLAG_PLUGIN
            } else {
                0
            };
        if flags & !known != 0 {
            return Err(bad("flags", format!("unknown bits {flags:#x}")));
        }
        let cipher_b = r.u8("cipher")?;
        let cipher = Cipher::from_byte(cipher_b)
            .ok_or_else(|| bad("cipher", format!("unknown {cipher_b}")))?;
        let comp_b = r.u8("compression")?;
        let compression = Compression::from_byte(comp_b)
            .ok_or_else(|| bad("compression", format!("unknown {comp_b}")))?;
        let archive_id = r.array("archive_id")?;
        let key_id = r.array("key_id")?;
        let title = String::from_utf8(r.short_bytes(MAX_TITLE_LEN, "title")?.to_vec())
            .map_err(|_| bad("title", "not UTF-8"))?;
        mcast_keys::title::validate_title(&title).map_err(|e| bad("title", e.to_string()))?;
        let watermark = String::from_utf8(r.short_bytes(MAX_WATERMARK_LEN, "watermark")?.to_vec())
            .map_err(|_| bad("watermark", "not UTF-8"))?;
        let created_unix = r.u64("created_unix")?;
        let plain_len = r.u64("plain_len")?;
        let plain_hash = r.array("plain_hash")?;
        let frame_size = r.u32("frame_size")?;
        if !frame_size_ok(frame_size) {
            return Err(bad("frame_size", format!("{frame_size} out of range")));
        }
        let frame_count = r.u64("frame_count")?;
        if frame_count != plain_len.div_ceil(frame_size as u64) {
            return Err(bad("frame_count", "does not match plain_len / frame_size"));
        }
        let data_len = r.u64("data_len")?;
        let symbol_size = r.u32("symbol_size")?;
        if !symbol_size_ok(symbol_size) {
            return Err(bad(
                "symbol_size",
                format!("{symbol_size} is not a multiple of {SYMBOL_SIZE_STEP} in {MIN_SYMBOL_SIZE}..={MAX_SYMBOL_SIZE}"),
            ));
        }
        let block_symbols = r.u32("block_symbols")?;
        if block_symbols != symbol_size / 32 {
            return Err(bad("block_symbols", "must equal symbol_size / 32"));
        }
        let repair_symbols = r.u32("repair_symbols")?;
        let fec_source = if version != HEAD_VERSION_NO_FEC {
            let k = r.u32("fec_source")?;
            if version == HEAD_VERSION_ASSOC && k == 0 {
                if repair_symbols != 0 {
                    return Err(bad("repair_symbols", "must be 0 without fec_source"));
                }
            } else if !super::fec::supported(k, repair_symbols) {
                return Err(bad(
                    "fec_source",
                    format!("{k} source and {repair_symbols} repair symbols per block are not a supported code"),
                ));
            }
            k
        } else {
            if repair_symbols != 0 {
                return Err(bad("repair_symbols", "must be 0 in a version 1 head"));
            }
            0
        };
        let (placement, advert_for) = if version == HEAD_VERSION_ASSOC {
            decode_associations(&mut r, flags, cipher, &watermark)?
        } else {
            (Placement::Leader, Vec::new())
        };
        let n_blocks = r.u64("n_blocks")?;
        let data_packets = data_len.div_ceil(symbol_size as u64);
        if fec_source % block_symbols != 0 {
            return Err(bad(
                "fec_source",
                "must be a whole number of hash blocks (block_symbols)",
            ));
        }
        let repair_hash_blocks = if fec_source == 0 {
            0
        } else {
            data_packets.div_ceil(fec_source as u64)
                * (super::fec::hashed_symbols(repair_symbols as usize) as u64)
                    .div_ceil(block_symbols as u64)
        };
        if n_blocks != data_packets.div_ceil(block_symbols as u64) + repair_hash_blocks {
            return Err(bad(
                "n_blocks",
                "does not match data_len and the FEC fields",
            ));
        }
        // Bound allocation by what is actually present.
        if n_blocks > (r.remaining() / 32) as u64 {
            return Err(HeadError::Short(Short("block_hashes")));
        }
        let server_key = PublicIdentity(r.array("server_key")?);
        let mut block_hashes = Vec::with_capacity(n_blocks as usize);
        for _ in 0..n_blocks {
            block_hashes.push(r.array("block_hashes")?);
        }
        let signature = r.array("signature")?;
        if r.remaining() != 0 {
            return Err(bad("length", format!("{} trailing bytes", r.remaining())));
        }
        Ok(Head {
            advert: flags & FLAG_ADVERT != 0,
            plugin: flags & FLAG_PLUGIN != 0,
            advert_for,
            placement,
            plain_hash_keyed: flags & FLAG_KEYED_PLAIN_HASH != 0,
            leaf_hash: if flags & FLAG_LEAF_SHA256 != 0 {
                super::manifest::LeafHash::Sha256
            } else {
                super::manifest::LeafHash::Blake3
            },
            cipher,
            compression,
            archive_id,
            key_id,
            title,
            watermark,
            created_unix,
            plain_len,
            plain_hash,
            frame_size,
            frame_count,
            data_len,
            symbol_size,
            block_symbols,
            repair_symbols,
            fec_source,
            server_key,
            block_hashes,
            signature,
        })
    }
}

/// The v4 fields, with the rules that keep the encoding canonical (one head, one byte string):
/// a plug-in is unencrypted, unwatermarked and no advert; associations belong to adverts;
/// a v4 head is a plug-in or has associations.
fn decode_associations(
    r: &mut Reader<'_>,
    flags: u8,
    cipher: Cipher,
    watermark: &str,
) -> Result<(Placement, Vec<String>), HeadError> {
    let placement = match r.u8("placement")? {
        0 => Placement::Leader,
        1 => Placement::Trailer,
        p => return Err(bad("placement", format!("unknown {p}"))),
    };
    let n = r.u8("n_for")? as usize;
    if n > MAX_ADVERT_FOR {
        return Err(bad(
            "n_for",
            format!("{n} titles; at most {MAX_ADVERT_FOR}"),
        ));
    }
    let mut titles = Vec::with_capacity(n);
    for _ in 0..n {
        let t = String::from_utf8(r.short_bytes(MAX_TITLE_LEN, "for_titles")?.to_vec())
            .map_err(|_| bad("for_titles", "not UTF-8"))?;
        mcast_keys::title::validate_title(&t).map_err(|e| bad("for_titles", e.to_string()))?;
        titles.push(t);
    }
    let (advert, plugin) = (flags & FLAG_ADVERT != 0, flags & FLAG_PLUGIN != 0);
    if plugin && (advert || cipher != Cipher::None || !watermark.is_empty()) {
        return Err(bad(
            "flags",
            "a plug-in is neither an advert, encrypted nor watermarked",
        ));
    }
    if !titles.is_empty() && !advert {
        return Err(bad("n_for", "only adverts are associated with titles"));
    }
    if !plugin && titles.is_empty() {
        return Err(bad(
            "version",
            "a version 4 head without plug-in flag or associations",
        ));
    }
    if titles.is_empty() && placement != Placement::Leader {
        return Err(bad("placement", "a trailer of no title"));
    }
    Ok((placement, titles))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Head {
        Head {
            advert: false,
            plugin: false,
            advert_for: Vec::new(),
            placement: Placement::Leader,
            leaf_hash: Default::default(),
            cipher: Cipher::Aes256Gcm,
            compression: Compression::Zstd,
            archive_id: [7; 16],
            key_id: [8; 16],
            title: "film".into(),
            watermark: "owner".into(),
            created_unix: 1,
            plain_len: 10,
            plain_hash: [1; 32],
            plain_hash_keyed: true,
            frame_size: 4096,
            frame_count: 1,
            data_len: 3000,
            symbol_size: 1280,
            block_symbols: 40,
            repair_symbols: 0,
            fec_source: 0,
            server_key: PublicIdentity([0; 32]),
            block_hashes: vec![[2; 32]],
            signature: [0; 64],
        }
    }

    #[test]
    fn size_rules() {
        assert!(!frame_size_ok(0) && frame_size_ok(1) && frame_size_ok(MAX_FRAME_SIZE));
        assert!(!frame_size_ok(MAX_FRAME_SIZE + 1));
        assert!(symbol_size_ok(MIN_SYMBOL_SIZE) && symbol_size_ok(1280));
        assert!(symbol_size_ok(MAX_SYMBOL_SIZE) && !symbol_size_ok(MAX_SYMBOL_SIZE + 32));
        assert!(!symbol_size_ok(MIN_SYMBOL_SIZE - 32) && !symbol_size_ok(1000));
    }

    #[test]
    fn encode_decode_sign_verify() {
        let id = mcast_keys::Identity::from_secret(&[7; 32]);
        let mut h = sample();
        h.sign(&id);
        let bytes = h.encode();
        let d = Head::decode(&bytes).unwrap();
        assert_eq!(d, h);
        d.verify_with(&id.public()).unwrap();
        // Any flipped bit is either undecodable or fails the signature.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            if let Ok(x) = Head::decode(&b) {
                assert!(
                    x.verify_with(&id.public()).is_err(),
                    "bit flip at {i} accepted"
                );
            }
        }
        // Truncations never panic and never decode.
        for n in 0..bytes.len() {
            assert!(Head::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn associations_roundtrip_signed() {
        let id = mcast_keys::Identity::from_secret(&[7; 32]);
        let mut h = sample();
        h.advert = true;
        h.cipher = Cipher::None;
        h.key_id = [0; 16];
        h.advert_for = vec!["film-1".into(), "film-2".into()];
        h.placement = Placement::Trailer;
        h.sign(&id);
        assert_eq!(h.version(), HEAD_VERSION_ASSOC);
        let bytes = h.encode();
        let d = Head::decode(&bytes).unwrap();
        assert_eq!(d, h);
        d.verify_with(&id.public()).unwrap();
        // The association is signed: any change to it fails the signature or the decode.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(x) = Head::decode(&b) {
                assert!(x.verify_with(&id.public()).is_err(), "flip at {i} accepted");
            }
        }
        for n in 0..bytes.len() {
            assert!(Head::decode(&bytes[..n]).is_err());
        }
        // Swapping the title list for another film does not verify.
        let mut forged = d.clone();
        forged.advert_for = vec!["film-3".into()];
        assert!(Head::decode(&forged.encode())
            .unwrap()
            .verify_with(&id.public())
            .is_err());
        // Without associations an advert stays a version 1 head (older receivers read it).
        let mut plain = h.clone();
        plain.advert_for.clear();
        plain.placement = Placement::Leader;
        assert_eq!(plain.version(), HEAD_VERSION_NO_FEC);
        assert_eq!(Head::decode(&plain.encode()).unwrap(), plain);
    }

    #[test]
    fn plugin_roundtrip_and_rules() {
        let id = mcast_keys::Identity::from_secret(&[9; 32]);
        let mut h = sample();
        h.plugin = true;
        h.cipher = Cipher::None;
        h.key_id = [0; 16];
        h.watermark.clear();
        h.sign(&id);
        let d = Head::decode(&h.encode()).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.version(), HEAD_VERSION_ASSOC);
        // A watermarked or encrypted "plug-in" is refused at decode.
        let mut w = h.clone();
        w.watermark = "owner".into();
        assert!(matches!(
            Head::decode(&w.encode()),
            Err(HeadError::Field { field: "flags", .. })
        ));
        let mut e = h.clone();
        e.cipher = Cipher::Aes256Gcm;
        assert!(Head::decode(&e.encode()).is_err());
        // Associations on a non-advert are refused.
        let mut a = sample();
        a.advert_for = vec!["film-1".into()];
        assert!(Head::decode(&a.encode()).is_err());
        // The plug-in flag is unknown in older versions.
        let mut b = sample().encode();
        b[5] |= FLAG_PLUGIN;
        assert!(Head::decode(&b).is_err());
        // FEC with associations: fec_source is carried.
        let mut f = sample();
        f.advert = true;
        f.cipher = Cipher::None;
        f.advert_for = vec!["x".into()];
        f.repair_symbols = 0;
        assert_eq!(Head::decode(&f.encode()).unwrap(), f);
    }
}
