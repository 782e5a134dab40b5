//! Forward error correction, pre-encoded at pack time (FLUTE/ALC-style carousel FEC).
//!
//! Data packets are grouped into **FEC source blocks** of `fec_source` packets (`K_f`; the
//! last block may be shorter), each with `repair_symbols` (`R`) repair symbols of a
//! systematic Reed–Solomon code over GF(2^16) (`reed-solomon-simd`, O(n log n), SIMD on x86
//! and ARM): any `K_f` of a block's `K_f + R` symbols restore its data. The packer writes the
//! repair symbols into the archive and hashes them into the manifest like data packets, so
//! the server only reads and sends them, and a receiver verifies every symbol before use.
//!
//! Source blocks are not the 40-packet hash blocks: the same overhead covers random loss far
//! better over ~1,000 symbols (5 % loss at 10 % overhead fails ~7 % of 40-symbol blocks and
//! practically none of 1,000-symbol ones). The packer balances block sizes
//! ([`FecShape::choose`]) so the last block is not a short, weak one, and makes each a whole
//! number of hash blocks. A block's repair symbols get hash packets of their own
//! (`ceil(R / leaves per hash packet)` per block), so every source block is self-contained:
//! its data, data hash packets, repair symbols and repair hash packets.
//!
//! A data packet shorter than a symbol (the archive's last) is coded as if zero-padded.
//!
//! **Extra symbols.** The code of a block is RS(`K_f`, [`code_size`]`(R)`), of which the
//! archive stores the first `R`. The other `code_size − R` ("extras") are never stored, but
//! their leaf hashes are: each block's repair hash packets list all `code_size` symbols
//! (head version 3). A server answers a NAK for "`n` more symbols of block `f`" with extras
//! it encodes on demand ([`SymbolCache`]); they are new to every receiver, so one answer
//! fills different losses at different receivers, and each is verified before use like any
//! stored symbol.

use std::ops::Range;

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use super::Head;

/// Default target source-block size, in data packets (1.3 MB at 1280-byte symbols).
pub const DEFAULT_SOURCE_BLOCK: u32 = 1024;
/// Largest source block and largest repair count per block the code allows here.
pub const MAX_SOURCE_BLOCK: u32 = 32_768;
pub const MAX_REPAIR: u32 = 32_768;

/// Whether `k` source and `r` repair symbols per block form a supported code.
pub fn supported(k: u32, r: u32) -> bool {
    (1..=MAX_SOURCE_BLOCK).contains(&k)
        && (1..=MAX_REPAIR.min(k.max(1))).contains(&r)
        && ReedSolomonEncoder::supports(k as usize, code_size(r as usize))
}

/// Recovery symbols of the code of a block of `k` data packets whose archive stores `r`:
/// the code is RS(k, code_size), of which the archive holds the first `r`, and a server can
/// make more of the *same* code (indices `r..code_size`, the extras) to answer NAKs with
/// symbols that are new to every receiver. Four times the next power of two of `r`: at 20 %
/// loss and 10 % overhead a block's receivers are short by up to ~1.5 `r` after a loop, and
/// answers must not wrap round to extras they already hold for two or three NAK rounds (at
/// twice, the second round re-sent what most receivers had). Part of the archive format
/// (head version 3).
pub fn code_size(r: usize) -> usize {
    (4 * r.max(1).next_power_of_two()).min(MAX_REPAIR as usize)
}

/// Symbols of a block's code whose leaves the manifest lists (stored and extra): part of the
/// archive format of head version 3.
pub fn hashed_symbols(r: usize) -> usize {
    code_size(r).max(r)
}

/// Why a block could not be coded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    #[error("FEC block {block}: {held} symbols held, {need} needed")]
    TooFew {
        block: u64,
        held: usize,
        need: usize,
    },
    #[error("FEC code error: {0}")]
    Code(String),
}

/// The FEC geometry of one archive: which packets form which source block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FecShape {
    /// Data packets per source block (`K_f`).
    pub source: u64,
    /// Repair symbols per source block (`R`).
    pub repair: u64,
    pub data_packets: u64,
    pub blocks: u64,
}

impl FecShape {
    /// The archive's FEC shape, or `None` when it has no repair symbols.
    pub fn of(head: &Head) -> Option<FecShape> {
        if head.fec_source == 0 || head.repair_symbols == 0 {
            return None;
        }
        Some(FecShape {
            source: head.fec_source as u64,
            repair: head.repair_symbols as u64,
            data_packets: head.data_packets(),
            blocks: head.fec_blocks(),
        })
    }

    /// `(fec_source, repair_symbols)` for `data_packets` packets, blocks of about `target`
    /// packets and `overhead` repair symbols per source symbol. Blocks are whole hash blocks
    /// (`align` = data packets per hash packet) so a decoded block can be checked against
    /// hash packets of its own, and balanced so the last is not a short, weak one; every
    /// block gets at least one repair symbol. `None` when there is nothing to protect or the
    /// overhead is zero.
    pub fn choose(data_packets: u64, target: u32, overhead: f64, align: u32) -> Option<(u32, u32)> {
        if data_packets == 0 || overhead <= 0.0 || !overhead.is_finite() || align == 0 {
            return None;
        }
        let align = align as u64;
        let target = (target.clamp(1, MAX_SOURCE_BLOCK) as u64).max(align);
        let n = data_packets.div_ceil(target);
        let k = data_packets.div_ceil(n).div_ceil(align) * align;
        let k = u32::try_from(k)
            .ok()?
            .min(MAX_SOURCE_BLOCK / align as u32 * align as u32);
        let r = ((k as f64 * overhead).ceil() as u32).clamp(1, k.min(MAX_REPAIR));
        supported(k, r).then_some((k, r))
    }

    pub fn block_of_data(&self, serial: u64) -> u64 {
        serial / self.source
    }

    pub fn block_of_repair(&self, r: u64) -> u64 {
        r / self.repair
    }

    /// Data serials of source block `f`.
    pub fn data_range(&self, f: u64) -> Range<u64> {
        let a = (f * self.source).min(self.data_packets);
        a..((f + 1) * self.source).min(self.data_packets)
    }

    /// Repair indices of source block `f`.
    pub fn repair_range(&self, f: u64) -> Range<u64> {
        f * self.repair..(f + 1) * self.repair
    }

    /// Symbols of each block's code that the manifest lists (see [`hashed_symbols`]).
    pub fn hashed(&self) -> u64 {
        hashed_symbols(self.repair as usize) as u64
    }

    /// Extra symbols per block (made on demand, never stored).
    pub fn extras(&self) -> u64 {
        self.hashed() - self.repair
    }

    /// Block and code index (`R..hashed`) of extra symbol `e` (`e = f · extras + i`).
    pub fn extra_of(&self, e: u64) -> Option<(u64, u64)> {
        let x = self.extras();
        if x == 0 || e / x >= self.blocks {
            return None;
        }
        Some((e / x, self.repair + e % x))
    }

    /// Extra symbol index of code index `j` (`R <= j < hashed`) of block `f`.
    pub fn extra_index(&self, f: u64, j: u64) -> u64 {
        f * self.extras() + (j - self.repair)
    }

    /// Data packets in block `f` (symbols needed to decode it).
    pub fn source_count(&self, f: u64) -> u64 {
        let r = self.data_range(f);
        r.end - r.start
    }
}

/// The repair symbols an archive stores for one source block (the first `repair` of its
/// code), each `symbol_size` bytes. `data` holds the block's data packets in order; a short
/// one is zero-padded.
pub fn encode_block(
    data: &[&[u8]],
    symbol_size: usize,
    repair: usize,
) -> Result<Vec<Vec<u8>>, FecError> {
    encode_range(data, symbol_size, repair, 0..repair)
}

/// Every symbol of a block's code whose leaf the manifest lists: the `repair` the archive
/// stores, then the extras (see the module doc).
pub fn encode_hashed(
    data: &[&[u8]],
    symbol_size: usize,
    repair: usize,
) -> Result<Vec<Vec<u8>>, FecError> {
    encode_range(data, symbol_size, repair, 0..hashed_symbols(repair))
}

/// Recovery symbols `range` of the code of a block whose archive stores `repair` (see
/// [`code_size`]); `range.end` at most `code_size`.
pub fn encode_range(
    data: &[&[u8]],
    symbol_size: usize,
    repair: usize,
    range: Range<usize>,
) -> Result<Vec<Vec<u8>>, FecError> {
    let code = |e: reed_solomon_simd::Error| FecError::Code(e.to_string());
    let n = code_size(repair);
    if range.end > n {
        return Err(FecError::Code(format!(
            "recovery index {} past the code's {n}",
            range.end
        )));
    }
    let mut enc = ReedSolomonEncoder::new(data.len(), n, symbol_size).map_err(code)?;
    let mut pad = Vec::new();
    for d in data {
        if d.len() == symbol_size {
            enc.add_original_shard(d).map_err(code)?;
        } else {
            pad.clear();
            pad.extend_from_slice(d);
            pad.resize(symbol_size, 0);
            enc.add_original_shard(&pad).map_err(code)?;
        }
    }
    let out = enc.encode().map_err(code)?;
    Ok(out
        .recovery_iter()
        .skip(range.start)
        .take(range.len())
        .map(|s| s.to_vec())
        .collect())
}

/// Restore the missing data packets of source block `f` from any `source_count(f)` held
/// symbols: `data` as (index in block, payload), `repairs` as (index in block, payload).
/// Returns (index in block, full symbol) for each data packet that was missing; the caller
/// cuts a short last packet to its length.
pub fn decode_block(
    shape: &FecShape,
    f: u64,
    symbol_size: usize,
    data: &[(u64, &[u8])],
    repairs: &[(u64, &[u8])],
) -> Result<Vec<(u64, Vec<u8>)>, FecError> {
    let k = shape.source_count(f) as usize;
    let held = data.len() + repairs.len();
    if held < k {
        return Err(FecError::TooFew {
            block: f,
            held,
            need: k,
        });
    }
    if data.len() >= k {
        return Ok(Vec::new());
    }
    let code = |e: reed_solomon_simd::Error| FecError::Code(e.to_string());
    let n = code_size(shape.repair as usize);
    if repairs.iter().any(|(i, _)| *i as usize >= n) {
        return Err(FecError::Code(format!(
            "recovery index past the code's {n}"
        )));
    }
    let mut dec = ReedSolomonDecoder::new(k, n, symbol_size).map_err(code)?;
    let mut pad = Vec::new();
    for (i, d) in data {
        if d.len() == symbol_size {
            dec.add_original_shard(*i as usize, d).map_err(code)?;
        } else {
            pad.clear();
            pad.extend_from_slice(d);
            pad.resize(symbol_size, 0);
            dec.add_original_shard(*i as usize, &pad).map_err(code)?;
        }
    }
    // Only as many repairs as needed: the decoder's work grows with what it is given.
    for (i, r) in repairs.iter().take(k - data.len()) {
        dec.add_recovery_shard(*i as usize, r).map_err(code)?;
    }
    let out = dec.decode().map_err(code)?;
    Ok(out
        .restored_original_iter()
        .map(|(i, s)| (i as u64, s.to_vec()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn blocks_are_balanced_and_cover_every_packet() {
        for (d, t, a) in [
            (1u64, 1024u32, 40u32),
            (1000, 1024, 40),
            (1025, 1024, 40),
            (5000, 1024, 40),
            (7, 2, 1),
            (100_000, 4096, 256),
        ] {
            let (k, r) = FecShape::choose(d, t, 0.1, a).unwrap();
            assert_eq!(k % a, 0, "blocks are whole hash blocks");
            let shape = FecShape {
                source: k as u64,
                repair: r as u64,
                data_packets: d,
                blocks: d.div_ceil(k as u64),
            };
            let covered: u64 = (0..shape.blocks).map(|f| shape.source_count(f)).sum();
            assert_eq!(covered, d);
            assert!(shape.source_count(shape.blocks - 1) > 0);
            assert!(k as u64 <= (t + a) as u64);
            assert!(r >= 1);
        }
        assert_eq!(FecShape::choose(0, 1024, 0.1, 40), None);
        assert_eq!(FecShape::choose(10, 1024, 0.0, 40), None);
    }

    #[test]
    fn any_k_symbols_restore_the_block_including_a_short_last_packet() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let s = 256usize;
        let shape = FecShape {
            source: 20,
            repair: 4,
            data_packets: 20,
            blocks: 1,
        };
        let mut data: Vec<Vec<u8>> = (0..20)
            .map(|_| (0..s).map(|_| rng.gen()).collect())
            .collect();
        data[19].truncate(100);
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let rep = encode_block(&refs, s, 4).unwrap();
        assert_eq!(rep.len(), 4);
        // Lose data 3, 7, 19 and repair 1: three repairs remain for three losses.
        let held: Vec<(u64, &[u8])> = (0..20u64)
            .filter(|i| ![3, 7, 19].contains(i))
            .map(|i| (i, data[i as usize].as_slice()))
            .collect();
        let reps: Vec<(u64, &[u8])> = [0u64, 2, 3]
            .iter()
            .map(|&i| (i, rep[i as usize].as_slice()))
            .collect();
        let out = decode_block(&shape, 0, s, &held, &reps).unwrap();
        let mut got: Vec<u64> = out.iter().map(|(i, _)| *i).collect();
        got.sort();
        assert_eq!(got, vec![3, 7, 19]);
        for (i, sym) in out {
            let want = &data[i as usize];
            assert_eq!(&sym[..want.len()], &want[..]);
        }
        assert!(matches!(
            decode_block(&shape, 0, s, &held, &reps[..2]),
            Err(FecError::TooFew { .. })
        ));
    }

    #[test]
    fn the_stored_repairs_are_the_first_of_the_code() {
        // The code is RS(k, code_size(r)): more symbols of the same code (for answers to NAKs)
        // extend what the archive stores.
        let s = 64usize;
        let data: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; s]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let stored = encode_block(&refs, s, 10).unwrap();
        let more = encode_range(&refs, s, 10, 10..code_size(10)).unwrap();
        assert_eq!(stored.len(), 10);
        assert_eq!(more.len(), code_size(10) - 10);
        let shape = FecShape {
            source: 100,
            repair: 10,
            data_packets: 100,
            blocks: 1,
        };
        // Lose 12 data packets: two stored repairs are not enough, any 12 of the code are.
        let held: Vec<(u64, &[u8])> = (12..100u64)
            .map(|i| (i, data[i as usize].as_slice()))
            .collect();
        let mut reps: Vec<(u64, &[u8])> = (0..2u64)
            .map(|i| (i, stored[i as usize].as_slice()))
            .collect();
        reps.extend((0..10u64).map(|i| (10 + i, more[i as usize].as_slice())));
        let out = decode_block(&shape, 0, s, &held, &reps).unwrap();
        assert_eq!(out.len(), 12);
        for (i, sym) in out {
            assert_eq!(sym, data[i as usize]);
        }
    }
}
