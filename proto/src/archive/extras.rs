//! Extra FEC symbols made on demand (see [`super::fec`]): what a server sends in answer to
//! "`n` more symbols of block `f`". Making them costs reading the block's data packets and
//! coding them (about a millisecond at 1,024 packets), so the last few blocks' extras are
//! kept, keyed by archive and block: a NAK round for one block asks for dozens of them.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use super::fec::{encode_range, hashed_symbols, FecShape};

/// Blocks whose extras a server keeps (a few MB at the default block size).
pub const EXTRA_CACHE_BLOCKS: usize = 8;

/// One block's extras: archive id, FEC block, its extra symbols in code order.
type Entry = ([u8; 16], u64, Arc<Vec<Vec<u8>>>);

/// The extras of the last [`EXTRA_CACHE_BLOCKS`] blocks asked for.
#[derive(Default)]
pub struct ExtraCache {
    entries: VecDeque<Entry>,
    /// Blocks encoded, and symbols served from the cache (for counters and tests).
    pub blocks_made: u64,
    pub hits: u64,
}

impl ExtraCache {
    /// Extra symbol `e` of the archive `archive_id` of FEC shape `shape`, or `None` if `e`
    /// is out of range or the block could not be read. `read_block(serials, buf)` fills
    /// `buf` with the block's data packets (serials `serials`, the last perhaps short) as
    /// they are stored, and says whether it could.
    pub fn symbol(
        &mut self,
        archive_id: &[u8; 16],
        shape: &FecShape,
        symbol_size: usize,
        e: u64,
        read_block: impl FnOnce(Range<u64>, &mut Vec<u8>) -> bool,
    ) -> Option<Vec<u8>> {
        let (f, j) = shape.extra_of(e)?;
        let i = (j - shape.repair) as usize;
        if let Some(at) = self
            .entries
            .iter()
            .position(|(a, b, _)| a == archive_id && *b == f)
        {
            self.hits += 1;
            let entry = self.entries.remove(at).expect("found");
            let sym = entry.2.get(i).cloned();
            self.entries.push_back(entry);
            return sym;
        }
        let serials = shape.data_range(f);
        let mut buf = Vec::new();
        if !read_block(serials, &mut buf) {
            return None;
        }
        let refs: Vec<&[u8]> = buf.chunks(symbol_size).collect();
        let r = shape.repair as usize;
        let extras = encode_range(&refs, symbol_size, r, r..hashed_symbols(r)).ok()?;
        self.blocks_made += 1;
        let sym = extras.get(i).cloned();
        if self.entries.len() >= EXTRA_CACHE_BLOCKS {
            self.entries.pop_front();
        }
        self.entries.push_back((*archive_id, f, Arc::new(extras)));
        sym
    }
}
