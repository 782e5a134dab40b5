//! The archive: a media file compressed, framed, sealed with per-frame keys and covered by a
//! signed manifest, ready to be looped by the carousel with no crypto on the send path.
//!
//! File layout (everything a receiver writes is at a fixed offset known from the head):
//!
//! ```text
//! preamble   16 bytes  "MCASTARC" version:u8 0*7
//! frames     data_len bytes; data packet i is bytes [i*S, (i+1)*S) of this region
//! hashes     n_blocks * S bytes; hash packet b is bytes [b*S, (b+1)*S) of this region
//! head       head_len bytes (see [`head`]), signed
//! tail       16 bytes  head_len:u64 "MCASTEND"
//! ```
//!
//! Packets are addressed by [`PacketId`]: a data packet by its serial (`block = serial / K`,
//! `symbol = serial % K`, with `K = S / 32` source symbols per block) and a hash packet by its
//! block. An erasure code (RaptorQ) would add repair symbols `K..K+R` to each block: the head
//! already carries `repair_symbols` (0 today) and the hash packet has room to list their
//! hashes, so the format takes it without a new version of the data layout.

pub mod frame;
pub mod head;
pub mod manifest;
pub mod pack;
pub mod unpack;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use head::{Compression, Head, HeadError};
pub use manifest::{PacketCheck, PacketVerifier};
pub use pack::{pack, CompressMode, PackOptions, PackReport};
pub use unpack::{decrypt_to, unpack, verify, DecryptOptions, UnpackReport};

pub const PREAMBLE: &[u8; 8] = b"MCASTARC";
pub const PREAMBLE_LEN: u64 = 16;
pub const TAIL_MAGIC: &[u8; 8] = b"MCASTEND";
pub const TAIL_LEN: u64 = 16;
/// File name extension of archives in the archive directory.
pub const ARCHIVE_EXT: &str = "mca";
/// Largest head we will read (bounds memory on hostile files): 64 MiB is ~2 million blocks,
/// i.e. archives up to ~100 GiB at the default symbol size.
pub const MAX_HEAD_LEN: u64 = 64 << 20;

/// A packet of the carousel, as addressed in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketId {
    /// Data packet by serial (block = serial / K, symbol = serial % K).
    Data(u64),
    /// The hash packet of a block.
    Hash(u64),
}

/// Byte offsets of the regions of one archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub symbol_size: u64,
    pub data_len: u64,
    pub n_blocks: u64,
    pub head_len: u64,
}

impl Layout {
    pub fn of(head: &Head, head_len: u64) -> Layout {
        Layout {
            symbol_size: head.symbol_size as u64,
            data_len: head.data_len,
            n_blocks: head.n_blocks(),
            head_len,
        }
    }

    pub fn data_offset(&self) -> u64 {
        PREAMBLE_LEN
    }

    pub fn hash_offset(&self) -> u64 {
        PREAMBLE_LEN + self.data_len
    }

    pub fn head_offset(&self) -> u64 {
        self.hash_offset() + self.n_blocks * self.symbol_size
    }

    pub fn file_len(&self) -> u64 {
        self.head_offset() + self.head_len + TAIL_LEN
    }

    /// File offset and length of a packet's payload, or `None` if it does not exist.
    pub fn packet_range(&self, id: PacketId) -> Option<(u64, usize)> {
        match id {
            PacketId::Data(serial) => {
                let start = serial.checked_mul(self.symbol_size)?;
                if start >= self.data_len {
                    return None;
                }
                let len = (self.data_len - start).min(self.symbol_size);
                Some((self.data_offset() + start, len as usize))
            }
            PacketId::Hash(block) => {
                if block >= self.n_blocks {
                    return None;
                }
                Some((
                    self.hash_offset() + block * self.symbol_size,
                    self.symbol_size as usize,
                ))
            }
        }
    }
}

pub fn preamble_bytes() -> [u8; PREAMBLE_LEN as usize] {
    let mut p = [0u8; PREAMBLE_LEN as usize];
    p[..8].copy_from_slice(PREAMBLE);
    p[8] = head::HEAD_VERSION;
    p
}

pub fn tail_bytes(head_len: u64) -> [u8; TAIL_LEN as usize] {
    let mut t = [0u8; TAIL_LEN as usize];
    t[..8].copy_from_slice(&head_len.to_le_bytes());
    t[8..].copy_from_slice(TAIL_MAGIC);
    t
}

/// Errors about archives. Each names the file and what failed in it.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an mcast archive ({why})")]
    NotArchive { path: PathBuf, why: String },
    #[error("{path}: bad archive head: {source}")]
    Head {
        path: PathBuf,
        #[source]
        source: HeadError,
    },
    #[error("{path}: manifest signature does not verify: the archive head was modified")]
    Signature { path: PathBuf },
    #[error(
        "{path}: archive is signed by server key {found}, not by this server's identity {ours}"
    )]
    ForeignServer {
        path: PathBuf,
        found: String,
        ours: String,
    },
    #[error("{path}: manifest: hash packet of block {block} (offset {offset}) does not match the signed head: archive modified")]
    HashPacket {
        path: PathBuf,
        block: u64,
        offset: u64,
    },
    #[error("{path}: data packet {serial} (block {block}, symbol {symbol}, offset {offset}) does not match its manifest hash: archive modified")]
    Packet {
        path: PathBuf,
        serial: u64,
        block: u64,
        symbol: u64,
        offset: u64,
    },
    #[error("{path}: frame {index}: {why}")]
    Frame {
        path: PathBuf,
        index: u64,
        why: String,
    },
    #[error(
        "{path}: frame {expected}: found frame {found} in its place (frames swapped or moved)"
    )]
    FrameOrder {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: frame {index}: authentication failed (frame modified, or moved from another archive or title)")]
    FrameAuth { path: PathBuf, index: u64 },
    #[error("{path}: the key store's key for title {title:?} is not the key this archive was sealed with")]
    WrongKey { path: PathBuf, title: String },
    #[error("{path}: restored plaintext does not match the manifest's plaintext hash")]
    PlainHash { path: PathBuf },
    #[error(transparent)]
    Keys(#[from] mcast_keys::KeyError),
    #[error("{path}: {why}")]
    Input { path: PathBuf, why: String },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An archive on disk, opened and its head decoded (the signature is checked by
/// [`ArchiveFile::verify_signature`], which every consumer calls before trusting it).
pub struct ArchiveFile {
    pub path: PathBuf,
    pub file: File,
    pub head: Head,
    pub head_bytes: Vec<u8>,
    pub layout: Layout,
}

impl ArchiveFile {
    pub fn open(path: &Path) -> Result<ArchiveFile, ArchiveError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let not = |why: &str| ArchiveError::NotArchive {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        if len < PREAMBLE_LEN + TAIL_LEN {
            return Err(not("file too short"));
        }
        let mut pre = [0u8; PREAMBLE_LEN as usize];
        file.read_exact(&mut pre).map_err(io_err(path))?;
        if pre != preamble_bytes() {
            return Err(not(if &pre[..8] != PREAMBLE {
                "bad magic"
            } else {
                "unsupported format version or damaged preamble"
            }));
        }
        let mut tail = [0u8; TAIL_LEN as usize];
        file.seek(SeekFrom::End(-(TAIL_LEN as i64)))
            .map_err(io_err(path))?;
        file.read_exact(&mut tail).map_err(io_err(path))?;
        if &tail[8..] != TAIL_MAGIC {
            return Err(not("bad tail magic: truncated or still being written"));
        }
        let head_len = u64::from_le_bytes(tail[..8].try_into().unwrap());
        if head_len > MAX_HEAD_LEN || head_len > len - PREAMBLE_LEN - TAIL_LEN {
            return Err(not("head length out of range"));
        }
        let mut head_bytes = vec![0u8; head_len as usize];
        file.read_exact_at(&mut head_bytes, len - TAIL_LEN - head_len)
            .map_err(io_err(path))?;
        let head = Head::decode(&head_bytes).map_err(|source| ArchiveError::Head {
            path: path.to_path_buf(),
            source,
        })?;
        let layout = Layout::of(&head, head_len);
        if layout.file_len() != len {
            return Err(not(&format!(
                "file is {len} bytes but its head describes {} bytes",
                layout.file_len()
            )));
        }
        Ok(ArchiveFile {
            path: path.to_path_buf(),
            file,
            head,
            head_bytes,
            layout,
        })
    }

    /// Check the head's signature against the identity we trust.
    pub fn verify_signature(
        &self,
        trusted: &mcast_keys::PublicIdentity,
    ) -> Result<(), ArchiveError> {
        if &self.head.server_key != trusted {
            return Err(ArchiveError::ForeignServer {
                path: self.path.clone(),
                found: self.head.server_key.fingerprint(),
                ours: trusted.fingerprint(),
            });
        }
        self.head
            .verify_with(trusted)
            .map_err(|_| ArchiveError::Signature {
                path: self.path.clone(),
            })
    }

    /// Read one packet's payload into `buf` (resized to the packet's length).
    pub fn read_packet(&self, id: PacketId, buf: &mut Vec<u8>) -> Result<(), ArchiveError> {
        let (off, len) = self
            .layout
            .packet_range(id)
            .ok_or_else(|| ArchiveError::Input {
                path: self.path.clone(),
                why: format!("{id:?} does not exist"),
            })?;
        buf.resize(len, 0);
        self.file
            .read_exact_at(buf, off)
            .map_err(io_err(&self.path))
    }
}

/// Path of a title's archive in an archive directory.
pub fn archive_path(dir: &Path, title: &str) -> PathBuf {
    dir.join(format!("{title}.{ARCHIVE_EXT}"))
}
