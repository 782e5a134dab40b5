//! Archives on disk: opening and reading an archive file, verifying and decrypting it
//! ([`unpack`]). The layout, head and manifest themselves are `mcast_proto::archive`.

pub mod fec_file;
pub mod unpack;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use mcast_proto::archive::*;
pub use unpack::{decrypt_to, unpack, verify, DecryptOptions, UnpackReport};

/// File name extension of archives in the archive directory.
pub const ARCHIVE_EXT: &str = "mca";

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
    #[error("{path}: FEC repair symbol {index} (offset {offset}) does not match its manifest hash: archive modified")]
    Repair {
        path: PathBuf,
        index: u64,
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

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
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
