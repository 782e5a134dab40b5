//! Data-channel packets.
//!
//! ```text
//! version:u8 kind:u8 flags:u16 archive_tag:[8] index:u64 loop_no:u32   (24-byte header)
//! payload
//! ```
//! `kind` is SYNC (payload: [`SyncInfo`]), HASH (`index` = block, payload = the block's hash
//! packet), DATA (`index` = serial, payload = one symbol of the frames region), REPAIR
//! (`index` = repair symbol, payload = one stored FEC repair symbol) or EXTRA (`index` =
//! extra symbol, payload = an FEC symbol the server made on demand, always flagged a repair).
//! Receivers older than a kind drop it as malformed, which costs them nothing.
//! `archive_tag` is the first 8 bytes of the archive id: a receiver drops packets of any other
//! archive before hashing them.

use crate::archive::PacketId;
use crate::codec::{Reader, Writer};

use super::{check_version, WireError, WIRE_VERSION};

pub const DATA_HEADER_LEN: usize = 24;

const KIND_SYNC: u8 = 0;
/// Header flag: this packet is a repair.
const FLAG_REPAIR: u16 = 1;
/// Header flag: this datagram belongs to a discovery burst to one receiver
/// ([`crate::wire::control::Control::ProbeBurst`]). Older receivers ignore it.
const FLAG_PROBE: u16 = 2;
const KIND_HASH: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_REPAIR: u8 = 3;
const KIND_EXTRA: u8 = 4;

/// What a data-channel packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    Sync,
    Packet(PacketId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub kind: DataKind,
    /// A repair sent ahead of the loop in answer to NAKs (not part of the loop order).
    pub repair: bool,
    /// Part of a discovery burst: judged apart from the channel, and (like a repair) not
    /// part of the loop order the receiver tracks.
    pub probe: bool,
    pub archive_tag: [u8; 8],
    /// Number of completed loops when this packet was sent (receivers use it for statistics).
    pub loop_no: u32,
}

/// SYNC payload: announces a channel, and tells receivers what their NAK timers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncInfo {
    pub loop_packets: u64,
    pub rate_bps: u64,
    /// Group round-trip time estimate (the largest RTT members report), microseconds.
    pub grtt_us: u32,
    /// Members of the channel (the group size estimate for NAK back-off).
    pub group_size: u32,
    /// Server clock at send time, microseconds since an arbitrary origin: receivers track the
    /// rise of `arrival − send_us` (queueing delay) without synchronised clocks.
    pub send_us: u64,
}

pub const SYNC_LEN: usize = 32;
/// A SYNC's payload on the wire: [`SyncInfo`], then the server identity's Ed25519 signature
/// over the header and the info ([`sync_signed_bytes`]). Receivers drop a SYNC whose
/// signature does not verify under the key that signed the archive head: a forged SYNC
/// could otherwise stretch everyone's NAK timers (GRTT, group size) or fake a queue (send
/// time) and push receivers down a tier.
pub const SIGNED_SYNC_LEN: usize = SYNC_LEN + 64;

/// What a SYNC's signature covers: a context string, the datagram header (kind, flags,
/// archive tag, loop number) and the info.
pub fn sync_signed_bytes(header: &[u8], info: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + header.len() + info.len());
    m.extend_from_slice(b"mcast sync v1");
    m.extend_from_slice(header);
    m.extend_from_slice(info);
    m
}

/// A SYNC payload split into its info and its signature; `None` if it is not that long.
pub fn split_signed_sync(payload: &[u8]) -> Option<(&[u8], [u8; 64])> {
    if payload.len() != SIGNED_SYNC_LEN {
        return None;
    }
    let (info, sig) = payload.split_at(SYNC_LEN);
    Some((info, sig.try_into().expect("64 bytes")))
}

pub fn archive_tag(archive_id: &[u8; 16]) -> [u8; 8] {
    archive_id[..8].try_into().expect("16 >= 8")
}

impl DataHeader {
    pub fn encode_into(&self, out: &mut [u8; DATA_HEADER_LEN]) {
        let (kind, index) = match self.kind {
            DataKind::Sync => (KIND_SYNC, 0),
            DataKind::Packet(PacketId::Hash(b)) => (KIND_HASH, b),
            DataKind::Packet(PacketId::Data(s)) => (KIND_DATA, s),
            DataKind::Packet(PacketId::Repair(r)) => (KIND_REPAIR, r),
            DataKind::Packet(PacketId::Extra(e)) => (KIND_EXTRA, e),
        };
        out[0] = WIRE_VERSION;
        out[1] = kind;
        let flags =
            if self.repair { FLAG_REPAIR } else { 0 } | if self.probe { FLAG_PROBE } else { 0 };
        out[2..4].copy_from_slice(&flags.to_le_bytes());
        out[4..12].copy_from_slice(&self.archive_tag);
        out[12..20].copy_from_slice(&index.to_le_bytes());
        out[20..24].copy_from_slice(&self.loop_no.to_le_bytes());
    }

    /// Split a datagram into header and payload.
    pub fn decode(buf: &[u8]) -> Result<(DataHeader, &[u8]), WireError> {
        check_version(buf)?;
        let mut r = Reader::new(buf);
        r.u8("version")?;
        let kind = r.u8("kind")?;
        let flags = r.u16("flags")?;
        let archive_tag = r.array("archive_tag")?;
        let index = r.u64("index")?;
        let loop_no = r.u32("loop_no")?;
        let kind = match kind {
            KIND_SYNC => DataKind::Sync,
            KIND_HASH => DataKind::Packet(PacketId::Hash(index)),
            KIND_DATA => DataKind::Packet(PacketId::Data(index)),
            KIND_REPAIR => DataKind::Packet(PacketId::Repair(index)),
            KIND_EXTRA => DataKind::Packet(PacketId::Extra(index)),
            k => return Err(WireError::Kind(k)),
        };
        Ok((
            DataHeader {
                kind,
                repair: flags & FLAG_REPAIR != 0,
                probe: flags & FLAG_PROBE != 0,
                archive_tag,
                loop_no,
            },
            &buf[DATA_HEADER_LEN..],
        ))
    }
}

impl SyncInfo {
    pub fn encode(&self) -> [u8; SYNC_LEN] {
        let mut v = Vec::with_capacity(SYNC_LEN);
        v.put_u64(self.loop_packets);
        v.put_u64(self.rate_bps);
        v.put_u32(self.grtt_us);
        v.put_u32(self.group_size);
        v.put_u64(self.send_us);
        v.try_into().expect("SYNC_LEN bytes")
    }

    pub fn decode(buf: &[u8]) -> Result<SyncInfo, WireError> {
        let mut r = Reader::new(buf);
        Ok(SyncInfo {
            loop_packets: r.u64("loop_packets")?,
            rate_bps: r.u64("rate_bps")?,
            grtt_us: r.u32("grtt_us")?,
            group_size: r.u32("group_size")?,
            send_us: r.u64("send_us")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [
            DataKind::Sync,
            DataKind::Packet(PacketId::Hash(7)),
            DataKind::Packet(PacketId::Data(u64::MAX)),
            DataKind::Packet(PacketId::Repair(3)),
            DataKind::Packet(PacketId::Extra(11)),
        ] {
            for (repair, probe) in [(false, false), (true, false), (false, true), (true, true)] {
                let h = DataHeader {
                    kind,
                    repair,
                    probe,
                    archive_tag: [3; 8],
                    loop_no: 9,
                };
                let mut b = [0u8; DATA_HEADER_LEN];
                h.encode_into(&mut b);
                let mut pkt = b.to_vec();
                pkt.extend_from_slice(b"xyz");
                let (d, p) = DataHeader::decode(&pkt).unwrap();
                assert_eq!(d, h);
                assert_eq!(p, b"xyz");
            }
        }
        for n in 0..DATA_HEADER_LEN {
            assert!(DataHeader::decode(&[1u8; DATA_HEADER_LEN][..n]).is_err());
        }
    }
}
