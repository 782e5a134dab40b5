//! Frames (FIG. 3): a header with the frame's random frame key, then the sealed payload.
//!
//! ```text
//! "MF" version:u8 flags:u8 index:u64 plain_len:u32 stored_len:u32 frame_key:[32]   (52 bytes)
//! payload: stored_len bytes = AEAD(payload key, (compressed) plaintext) || tag
//! ```
//! The associated data binds the header and the archive: `"mcast frame v1" || archive_id ||
//! title || header`, so a frame that is flipped, swapped, or moved to another archive or title
//! does not open.

use mcast_keys::frame::FRAME_KEY_LEN;

use crate::codec::{Reader, Short, Writer};

pub const FRAME_MAGIC: &[u8; 2] = b"MF";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 52;
/// Flag bit: the payload is zstd-compressed.
pub const FRAME_ZSTD: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub zstd: bool,
    pub index: u64,
    pub plain_len: u32,
    pub stored_len: u32,
    pub frame_key: [u8; FRAME_KEY_LEN],
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut v = Vec::with_capacity(FRAME_HEADER_LEN);
        v.extend_from_slice(FRAME_MAGIC);
        v.put_u8(FRAME_VERSION);
        v.put_u8(if self.zstd { FRAME_ZSTD } else { 0 });
        v.put_u64(self.index);
        v.put_u32(self.plain_len);
        v.put_u32(self.stored_len);
        v.extend_from_slice(&self.frame_key);
        v.try_into().expect("header is FRAME_HEADER_LEN bytes")
    }

    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, String> {
        let mut r = Reader::new(b);
        let map = |e: Short| e.to_string();
        if r.bytes(2, "magic").map_err(map)? != FRAME_MAGIC {
            return Err("bad frame magic".into());
        }
        let v = r.u8("version").map_err(map)?;
        if v != FRAME_VERSION {
            return Err(format!("unsupported frame version {v}"));
        }
        let flags = r.u8("flags").map_err(map)?;
        if flags & !FRAME_ZSTD != 0 {
            return Err(format!("unknown frame flags {flags:#x}"));
        }
        Ok(FrameHeader {
            zstd: flags & FRAME_ZSTD != 0,
            index: r.u64("index").map_err(map)?,
            plain_len: r.u32("plain_len").map_err(map)?,
            stored_len: r.u32("stored_len").map_err(map)?,
            frame_key: r.array("frame_key").map_err(map)?,
        })
    }
}

/// Associated data for a frame's AEAD.
pub fn frame_aad(archive_id: &[u8; 16], title: &str, header: &[u8; FRAME_HEADER_LEN]) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + 2 + title.len() + FRAME_HEADER_LEN + 16);
    a.extend_from_slice(b"mcast frame v1");
    a.extend_from_slice(archive_id);
    a.put_short_bytes(title.as_bytes());
    a.extend_from_slice(header);
    a
}
