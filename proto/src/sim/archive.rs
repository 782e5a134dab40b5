//! A real archive in memory for the simulator: seeded random data packets, the manifest's
//! hash packets and a head signed with a fixed Ed25519 key, so the simulated receivers'
//! sessions verify every packet exactly as `mcast-recv` does.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::archive::manifest::{LeafHash, TreeBuilder};
use crate::archive::{Compression, Head, Layout, PacketId, PREAMBLE_LEN};

/// The identity that signs simulated archives (a fixed seed: runs are reproducible).
pub fn sim_identity() -> mcast_keys::Identity {
    mcast_keys::Identity::from_secret(&[0x51; 32])
}

/// Data packets are generated from their serial when asked for (a multi-GB simulated title
/// costs no memory); the hash region and head are kept.
pub struct SimArchive {
    pub head: Arc<Head>,
    pub head_bytes: Arc<Vec<u8>>,
    pub layout: Layout,
    seed: u64,
    symbol_size: usize,
    data_len: u64,
    /// FEC repair region (empty without FEC).
    repairs: Vec<u8>,
    hashes: Vec<u8>,
    /// Extra FEC symbols made on demand, as `mcastd` makes them.
    extras: std::cell::RefCell<crate::archive::extras::ExtraCache>,
}

/// Data packet `serial`'s bytes.
fn fill_packet(seed: u64, serial: u64, buf: &mut [u8]) {
    SmallRng::seed_from_u64(seed ^ serial.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill_bytes(buf);
}

impl SimArchive {
    /// `data_packets` packets of `symbol_size` bytes of seeded random data.
    pub fn new(data_packets: u64, symbol_size: u32, seed: u64) -> SimArchive {
        SimArchive::with_fec(data_packets, symbol_size, seed, 0.0)
    }

    /// As [`SimArchive::new`], with `fec_overhead` repair symbols per data packet in source
    /// blocks of [`crate::archive::fec::DEFAULT_SOURCE_BLOCK`] (0: no FEC), encoded as
    /// `mcastd pack` does.
    pub fn with_fec(
        data_packets: u64,
        symbol_size: u32,
        seed: u64,
        fec_overhead: f64,
    ) -> SimArchive {
        let archive_id = {
            let mut id = [0x5a; 16];
            id[..8].copy_from_slice(&seed.to_le_bytes());
            id
        };
        let data_len = data_packets * symbol_size as u64;
        let leaf_hash = LeafHash::auto(symbol_size);
        let mut tree = TreeBuilder::new(&archive_id, symbol_size, leaf_hash);
        let mut buf = vec![0u8; symbol_size as usize];
        for serial in 0..data_packets {
            fill_packet(seed, serial, &mut buf);
            tree.update(&buf);
        }
        let fec = crate::archive::fec::FecShape::choose(
            data_packets,
            crate::archive::fec::DEFAULT_SOURCE_BLOCK,
            fec_overhead,
            symbol_size / 32,
        );
        let mut repairs = Vec::new();
        if let Some((k, r)) = fec {
            let (k, ss) = (k as u64, symbol_size as usize);
            for f in 0..data_packets.div_ceil(k) {
                let block: Vec<Vec<u8>> = (f * k..((f + 1) * k).min(data_packets))
                    .map(|serial| {
                        let mut b = vec![0u8; ss];
                        fill_packet(seed, serial, &mut b);
                        b
                    })
                    .collect();
                let refs: Vec<&[u8]> = block.iter().map(|b| b.as_slice()).collect();
                let symbols = crate::archive::fec::encode_hashed(&refs, ss, r as usize)
                    .expect("supported code");
                for (j, sym) in symbols.iter().enumerate() {
                    tree.push_repair(sym, symbols.len());
                    if j < r as usize {
                        repairs.extend_from_slice(sym);
                    }
                }
            }
        }
        let (hashes, block_hashes) = tree.finish();
        let id = sim_identity();
        let mut head = Head {
            advert: false,
            plugin: false,
            advert_for: Vec::new(),
            placement: Default::default(),
            leaf_hash,
            cipher: mcast_keys::Cipher::Aes256Gcm,
            compression: Compression::None,
            archive_id,
            key_id: [0; 16],
            title: "sim".into(),
            watermark: String::new(),
            created_unix: 0,
            plain_len: data_len,
            plain_hash: [0; 32],
            plain_hash_keyed: false,
            frame_size: 1 << 20,
            frame_count: data_len.div_ceil(1 << 20),
            data_len,
            symbol_size,
            block_symbols: symbol_size / 32,
            repair_symbols: fec.map_or(0, |f| f.1),
            fec_source: fec.map_or(0, |f| f.0),
            server_key: id.public(),
            block_hashes,
            signature: [0; 64],
        };
        head.sign(&id);
        let head_bytes = head.encode();
        let layout = Layout::of(&head, head_bytes.len() as u64);
        SimArchive {
            head: Arc::new(head),
            head_bytes: Arc::new(head_bytes),
            layout,
            seed,
            symbol_size: symbol_size as usize,
            data_len,
            repairs,
            hashes,
            extras: Default::default(),
        }
    }

    /// A packet's payload.
    pub fn payload(&self, id: PacketId) -> Vec<u8> {
        if let PacketId::Extra(e) = id {
            let shape = crate::archive::fec::FecShape::of(&self.head).expect("extras of FEC");
            return self
                .extras
                .borrow_mut()
                .symbol(
                    &self.head.archive_id,
                    &shape,
                    self.symbol_size,
                    e,
                    |serials, buf| {
                        let s = self.symbol_size as u64;
                        let (a, b) = (serials.start * s, (serials.end * s).min(self.data_len));
                        buf.resize((b - a) as usize, 0);
                        self.read(PREAMBLE_LEN + a, buf)
                    },
                )
                .expect("extra symbol in range");
        }
        let (off, len) = self.layout.packet_range(id).expect("packet in range");
        let mut v = vec![0u8; len];
        assert!(self.read(off, &mut v));
        v
    }

    /// Bytes of the regions after the data (repairs, then hashes), from `at` on.
    fn after_data(&self, at: usize, buf: &mut [u8]) {
        let r = self.repairs.len();
        for (i, b) in buf.iter_mut().enumerate() {
            let p = at + i;
            *b = if p < r {
                self.repairs[p]
            } else {
                self.hashes[p - r]
            };
        }
    }

    /// Read as a receiver's intact part file would (data, repair and hash regions).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        if offset < PREAMBLE_LEN || end > self.layout.head_offset() {
            return false;
        }
        let off = offset - PREAMBLE_LEN;
        if off >= self.data_len {
            self.after_data((off - self.data_len) as usize, buf);
            return true;
        }
        // Whole or partial data packets.
        let s = self.symbol_size as u64;
        let mut pkt = vec![0u8; self.symbol_size];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            if pos >= self.data_len {
                self.after_data((pos - self.data_len) as usize, &mut buf[done..]);
                break;
            }
            fill_packet(self.seed, pos / s, &mut pkt);
            let within = (pos % s) as usize;
            let n = (self.symbol_size - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&pkt[within..within + n]);
            done += n;
        }
        true
    }
}
