//! FEC repair symbols in archive files: checking them (`mcastd verify`, `unpack`) and
//! rebuilding them from the data (a receiver that finished by decoding holds only some of
//! them; it re-encodes the rest so its copy is byte-identical to the server's archive).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use mcast_proto::archive::fec::{encode_hashed, FecShape};
use mcast_proto::archive::manifest::{repair_hash_packets, TreeKeys};
use mcast_proto::archive::{Head, Layout, PacketId, PacketVerifier};

use super::{io_err, ArchiveError, ArchiveFile};

/// Check every repair symbol and repair hash packet against the signed head.
pub fn verify_repairs(a: &ArchiveFile) -> Result<(), ArchiveError> {
    let h = &a.head;
    let verifier = PacketVerifier::new(h);
    let shape = mcast_proto::carousel::LoopShape::of(h);
    let mut hp = Vec::new();
    let mut sym = Vec::new();
    for b in h.n_blocks()..h.hash_blocks() {
        a.read_packet(PacketId::Hash(b), &mut hp)?;
        verifier
            .check_hash_packet(h, b, &hp)
            .map_err(|_| ArchiveError::HashPacket {
                path: a.path.clone(),
                block: b,
                offset: a.layout.packet_range(PacketId::Hash(b)).map_or(0, |r| r.0),
            })?;
        for id in shape.leaves_of(b) {
            let PacketId::Repair(r) = id else { continue };
            a.read_packet(id, &mut sym)?;
            if verifier.check_repair_packet(&hp, r, &sym).is_err() {
                return Err(ArchiveError::Repair {
                    path: a.path.clone(),
                    index: r,
                    offset: a
                        .layout
                        .packet_range(PacketId::Repair(r))
                        .map_or(0, |x| x.0),
                });
            }
        }
    }
    Ok(())
}

/// Encode every repair symbol from the data region of `file` (which must hold all data) and
/// write them and their hash packets, checked against the signed head before anything is
/// written. No-op without FEC.
pub fn fill_repairs(
    file: &File,
    path: &Path,
    head: &Head,
    layout: &Layout,
) -> Result<(), ArchiveError> {
    let Some(shape) = FecShape::of(head) else {
        return Ok(());
    };
    let s = layout.symbol_size;
    let keys = TreeKeys::new(&head.archive_id, head.leaf_hash);
    let mut leaves = Vec::with_capacity(shape.blocks as usize * shape.repair as usize);
    let mut region = Vec::with_capacity(head.repair_region_len() as usize);
    let mut buf = Vec::new();
    for f in 0..shape.blocks {
        let r = shape.data_range(f);
        let (a, b) = (r.start * s, (r.end * s).min(layout.data_len));
        buf.resize((b - a) as usize, 0);
        file.read_exact_at(&mut buf, layout.data_offset() + a)
            .map_err(io_err(path))?;
        let refs: Vec<&[u8]> = buf.chunks(s as usize).collect();
        let symbols = encode_hashed(&refs, s as usize, shape.repair as usize).map_err(|e| {
            ArchiveError::Input {
                path: path.to_path_buf(),
                why: e.to_string(),
            }
        })?;
        for (j, sym) in symbols.iter().enumerate() {
            leaves.push(keys.leaf(sym));
            if (j as u64) < shape.repair {
                region.extend_from_slice(sym);
            }
        }
    }
    let (hashes, block_hashes) =
        repair_hash_packets(&keys, &leaves, shape.hashed() as usize, s as usize);
    let n = head.n_blocks() as usize;
    if head.block_hashes.get(n..) != Some(&block_hashes[..]) {
        return Err(ArchiveError::HashPacket {
            path: path.to_path_buf(),
            block: n as u64,
            offset: layout.hash_offset() + n as u64 * s,
        });
    }
    file.write_all_at(&region, layout.repair_offset())
        .map_err(io_err(path))?;
    file.write_all_at(&hashes, layout.hash_offset() + n as u64 * s)
        .map_err(io_err(path))?;
    Ok(())
}

/// Extra FEC symbol `e` of `a`, made from its data region on demand (what `mcastd` sends in
/// answer to amount NAKs, see [`mcast_proto::archive::extras`]); `None` if `e` is out of
/// range, the archive has no FEC, or its data could not be read.
pub fn extra_symbol(
    cache: &mut mcast_proto::archive::extras::ExtraCache,
    a: &ArchiveFile,
    e: u64,
) -> Option<Vec<u8>> {
    let shape = FecShape::of(&a.head)?;
    let ss = a.layout.symbol_size;
    cache.symbol(
        &a.head.archive_id,
        &shape,
        ss as usize,
        e,
        |serials, buf| {
            let (x, y) = (
                serials.start * ss,
                (serials.end * ss).min(a.layout.data_len),
            );
            buf.resize((y - x) as usize, 0);
            a.file
                .read_exact_at(buf, a.layout.data_offset() + x)
                .is_ok()
        },
    )
}
