//! `mcastd unpack` and `verify`: check the whole archive against its signed manifest, open
//! every frame, and restore the exact input. Output appears only when all of it checked out.
//!
//! [`decrypt_to`] is the same frame loop writing to any sink (`mcast-recv play` streams to a
//! file or a player). Every frame is authenticated (AEAD) before a byte of it reaches the sink,
//! and the plaintext hash from the signed head is checked at the end. The per-packet manifest
//! check ([`DecryptOptions::verify_packets`]) is optional there: it proves the file matches
//! the manifest, which the receiver already proved when the download completed, and it costs
//! a keyed BLAKE3 pass over every packet.

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use mcast_keys::{frame as aead, Cipher, MasterKey, PublicIdentity};

use super::frame::{frame_aad, FrameHeader, FRAME_HEADER_LEN};
use super::manifest::{PacketCheck, PacketVerifier};
use super::{io_err, ArchiveError, ArchiveFile, PacketId};
use crate::fsutil::AtomicFile;

#[derive(Clone, Debug)]
pub struct UnpackReport {
    pub plain_len: u64,
    pub frames: u64,
    pub elapsed: Duration,
}

/// Symbols read per disk read.
const CHUNK_SYMBOLS: u64 = 512;

/// Reads the frames region in order, yielding bytes only after their packet verified (or,
/// without `check`, straight from the file into the caller's buffer: one copy, no hashing).
struct VerifiedStream<'a> {
    a: &'a ArchiveFile,
    /// Check every packet against the manifest (else read the frames region as it is).
    check: bool,
    /// Read position in the frames region when not checking.
    raw: u64,
    verifier: PacketVerifier,
    chunk: Vec<u8>,
    pos: usize,
    next_serial: u64,
    hash_packet: Vec<u8>,
    hash_block: Option<u64>,
}

impl<'a> VerifiedStream<'a> {
    fn new(a: &'a ArchiveFile, check: bool) -> Self {
        VerifiedStream {
            a,
            check,
            raw: 0,
            verifier: PacketVerifier::new(&a.head),
            chunk: Vec::new(),
            pos: 0,
            next_serial: 0,
            hash_packet: Vec::new(),
            hash_block: None,
        }
    }

    fn remaining(&self) -> u64 {
        if !self.check {
            return self.a.head.data_len - self.raw;
        }
        let s = self.a.layout.symbol_size;
        (self.a.head.data_len - (self.next_serial * s).min(self.a.head.data_len))
            + (self.chunk.len() - self.pos) as u64
    }

    fn refill(&mut self) -> Result<(), ArchiveError> {
        let a = self.a;
        let s = a.layout.symbol_size;
        let start = self.next_serial * s;
        let len = (a.head.data_len - start).min(CHUNK_SYMBOLS * s) as usize;
        self.chunk.resize(len, 0);
        self.pos = 0;
        a.file
            .read_exact_at(&mut self.chunk, a.layout.data_offset() + start)
            .map_err(io_err(&a.path))?;
        let k = a.head.block_symbols as u64;
        for (i, payload) in self.chunk.chunks(s as usize).enumerate() {
            let serial = self.next_serial + i as u64;
            let block = serial / k;
            if self.hash_block != Some(block) {
                a.read_packet(PacketId::Hash(block), &mut self.hash_packet)?;
                self.verifier
                    .check_hash_packet(&a.head, block, &self.hash_packet)
                    .map_err(|_| ArchiveError::HashPacket {
                        path: a.path.clone(),
                        block,
                        offset: a.layout.packet_range(PacketId::Hash(block)).unwrap().0,
                    })?;
                self.hash_block = Some(block);
            }
            if let Err(PacketCheck::DataPacket(_) | PacketCheck::Length | PacketCheck::OutOfRange) =
                self.verifier
                    .check_data_packet(&self.hash_packet, serial, payload)
            {
                return Err(ArchiveError::Packet {
                    path: a.path.clone(),
                    serial,
                    block,
                    symbol: serial % k,
                    offset: a.layout.data_offset() + serial * s,
                });
            }
        }
        self.next_serial += len.div_ceil(s as usize) as u64;
        Ok(())
    }

    fn read_exact(&mut self, mut out: &mut [u8]) -> Result<(), ArchiveError> {
        if !self.check {
            let a = self.a;
            if out.len() as u64 > self.remaining() {
                return Err(ArchiveError::Frame {
                    path: a.path.clone(),
                    index: u64::MAX,
                    why: "frames region ends inside a frame".into(),
                });
            }
            a.file
                .read_exact_at(out, a.layout.data_offset() + self.raw)
                .map_err(io_err(&a.path))?;
            self.raw += out.len() as u64;
            return Ok(());
        }
        while !out.is_empty() {
            if self.pos == self.chunk.len() {
                if self.next_serial * self.a.layout.symbol_size >= self.a.head.data_len {
                    return Err(ArchiveError::Frame {
                        path: self.a.path.clone(),
                        index: u64::MAX,
                        why: "frames region ends inside a frame".into(),
                    });
                }
                self.refill()?;
            }
            let n = out.len().min(self.chunk.len() - self.pos);
            out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
            self.pos += n;
            out = &mut out[n..];
        }
        Ok(())
    }

    /// Verify every remaining packet without returning data.
    fn drain(&mut self) -> Result<(), ArchiveError> {
        while self.next_serial * self.a.layout.symbol_size < self.a.head.data_len {
            self.refill()?;
        }
        self.pos = self.chunk.len();
        Ok(())
    }
}

/// Check the signature and every packet of the manifest (no key needed).
pub fn verify(a: &ArchiveFile, trusted: &PublicIdentity) -> Result<(), ArchiveError> {
    a.verify_signature(trusted)?;
    VerifiedStream::new(a, true).drain()?;
    super::fec_file::verify_repairs(a)
}

/// Options of [`decrypt_to`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecryptOptions {
    /// Check every packet against the signed manifest while reading (as `unpack` does).
    pub verify_packets: bool,
}

/// Restore the original file at `out`. Nothing appears at `out` unless every check passed.
pub fn unpack(
    a: &ArchiveFile,
    trusted: &PublicIdentity,
    key: Option<&MasterKey>,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<UnpackReport, ArchiveError> {
    let started = Instant::now();
    let key = check_key(a, trusted, key)?;
    // Plaintext: 0600 from the first byte.
    let mut dst = AtomicFile::create_private(out).map_err(io_err(out))?;
    let tmp = dst.tmp_path().to_path_buf();
    let mut w = BufWriter::with_capacity(1 << 20, dst.file());
    let (plain_len, frames) = decrypt_frames(a, key, true, &mut w, &tmp, progress)?;
    w.flush().map_err(io_err(&tmp))?;
    drop(w);
    dst.commit().map_err(io_err(out))?;
    Ok(UnpackReport {
        plain_len,
        frames,
        elapsed: started.elapsed(),
    })
}

/// Decrypt and authenticate every frame of `a` into `sink`, in order. `sink_name` names the
/// sink in errors. Bytes reach the sink only after their frame authenticated; on error the
/// sink holds a prefix of the plaintext, so callers writing a file write it atomically.
pub fn decrypt_to(
    a: &ArchiveFile,
    trusted: &PublicIdentity,
    key: Option<&MasterKey>,
    opts: DecryptOptions,
    sink: &mut dyn Write,
    sink_name: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<UnpackReport, ArchiveError> {
    let started = Instant::now();
    let key = check_key(a, trusted, key)?;
    let (plain_len, frames) =
        decrypt_frames(a, key, opts.verify_packets, sink, sink_name, progress)?;
    sink.flush().map_err(io_err(sink_name))?;
    Ok(UnpackReport {
        plain_len,
        frames,
        elapsed: started.elapsed(),
    })
}

/// Check the signature, then that `key` is the archive's key; the key to open frames with.
fn check_key<'k>(
    a: &ArchiveFile,
    trusted: &PublicIdentity,
    key: Option<&'k MasterKey>,
) -> Result<Option<&'k MasterKey>, ArchiveError> {
    a.verify_signature(trusted)?;
    let head = &a.head;
    match (head.cipher, key) {
        (Cipher::None, _) => Ok(None),
        (_, Some(k)) if k.key_id(&head.archive_id) == head.key_id => Ok(Some(k)),
        _ => Err(ArchiveError::WrongKey {
            path: a.path.clone(),
            title: head.title.clone(),
        }),
    }
}

/// The frame loop; returns (plaintext bytes, frames).
fn decrypt_frames(
    a: &ArchiveFile,
    key: Option<&MasterKey>,
    verify_packets: bool,
    w: &mut dyn Write,
    sink_name: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, u64), ArchiveError> {
    let head = &a.head;
    let mut stream = VerifiedStream::new(a, verify_packets);
    let mut hasher = match (head.plain_hash_keyed, key) {
        (false, _) => blake3::Hasher::new(),
        (true, Some(k)) => k.plain_hasher(&head.archive_id),
        // A keyed hash without a key (an unencrypted archive claiming one): nothing can
        // check it, so it cannot pass.
        (true, None) => {
            return Err(ArchiveError::PlainHash {
                path: a.path.clone(),
            })
        }
    };
    let mut payload = Vec::new();
    let mut plain = Vec::new();
    let mut written = 0u64;
    let frame_err = |index: u64, why: String| ArchiveError::Frame {
        path: a.path.clone(),
        index,
        why,
    };
    let max_stored =
        zstd::zstd_safe::compress_bound(head.frame_size as usize) + head.cipher.tag_len();
    for index in 0..head.frame_count {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        stream.read_exact(&mut hb).map_err(|e| relabel(e, index))?;
        let fh = FrameHeader::decode(&hb).map_err(|why| frame_err(index, why))?;
        if fh.index != index {
            return Err(ArchiveError::FrameOrder {
                path: a.path.clone(),
                expected: index,
                found: fh.index,
            });
        }
        let expect_plain =
            (head.plain_len - index * head.frame_size as u64).min(head.frame_size as u64);
        if fh.plain_len as u64 != expect_plain {
            return Err(frame_err(
                index,
                format!(
                    "plain length {} where {expect_plain} expected",
                    fh.plain_len
                ),
            ));
        }
        if fh.stored_len as usize > max_stored || fh.stored_len as u64 > stream.remaining() {
            return Err(frame_err(
                index,
                format!("stored length {} out of range", fh.stored_len),
            ));
        }
        payload.resize(fh.stored_len as usize, 0);
        stream
            .read_exact(&mut payload)
            .map_err(|e| relabel(e, index))?;
        if let Some(k) = key {
            let aad = frame_aad(&head.archive_id, &head.title, &hb);
            aead::open(head.cipher, k, &fh.frame_key, &aad, &mut payload).map_err(|_| {
                ArchiveError::FrameAuth {
                    path: a.path.clone(),
                    index,
                }
            })?;
        }
        let data: &[u8] = if fh.zstd {
            plain.clear();
            plain.reserve(fh.plain_len as usize);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&payload, &mut plain))
                .map_err(|e| frame_err(index, format!("zstd: {e}")))?;
            &plain
        } else {
            &payload
        };
        if data.len() != fh.plain_len as usize {
            return Err(frame_err(
                index,
                "decompressed length differs from header".into(),
            ));
        }
        hasher.update(data);
        w.write_all(data).map_err(io_err(sink_name))?;
        written += data.len() as u64;
        progress(written);
    }
    if stream.remaining() != 0 {
        return Err(frame_err(
            head.frame_count,
            "bytes after the last frame".into(),
        ));
    }
    if hasher.finalize().as_bytes() != &head.plain_hash || written != head.plain_len {
        return Err(ArchiveError::PlainHash {
            path: a.path.clone(),
        });
    }
    Ok((written, head.frame_count))
}

/// Give "frames region ends inside a frame" the frame index it happened in.
fn relabel(e: ArchiveError, index: u64) -> ArchiveError {
    match e {
        ArchiveError::Frame {
            path,
            index: u64::MAX,
            why,
        } => ArchiveError::Frame { path, index, why },
        e => e,
    }
}
