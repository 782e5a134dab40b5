//! The per-datagram step a group channel and a unicast stream share: a SYNC when one is due,
//! else a repair the queue releases, else the next loop packet — header encoded, pacer
//! charged, counted. One function, so the two senders cannot drift apart.

use std::time::{Duration, Instant};

use super::repair::RepairQueue;
use super::stats::{Sample, Samples};
use super::{Counters, TransmitPayload};
use crate::carousel::Carousel;
use crate::pacer::Pacer;
use crate::wire::data::{
    sync_signed_bytes, DataHeader, DataKind, SyncInfo, DATA_HEADER_LEN, SIGNED_SYNC_LEN, SYNC_LEN,
};

/// A looping sender's state: what it loops, what it owes, how fast, when it next says SYNC.
pub(super) struct LoopParts<'a> {
    pub(super) carousel: &'a mut Carousel,
    pub(super) repair: &'a mut RepairQueue,
    pub(super) pacer: &'a mut Pacer,
    pub(super) next_sync: &'a mut Instant,
}

/// What the sender's owner supplies for a datagram.
pub(super) struct EmitCtx<'a> {
    pub(super) tag: [u8; 8],
    /// Signs SYNCs (the server identity; `None` only in channel-only tests).
    pub(super) signer: Option<&'a mcast_keys::Identity>,
    pub(super) symbol_size: usize,
    pub(super) sync_interval: Duration,
    /// Share of the loop's packets that repairs may take.
    pub(super) repair_share: f64,
    /// `send_us` of a SYNC sent now.
    pub(super) send_us: u64,
    /// A discovery burst's datagram (the PROBE header flag).
    pub(super) probe: bool,
    /// Extra FEC symbols to send unasked after each FEC block's repair segment, as a share
    /// of the block's data packets ([`super::Params::tier_fec_extra`]).
    pub(super) fec_extra: f64,
}

/// What [`next_datagram`] sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    Sync,
    Repair,
    Loop,
}

/// The sender's next datagram (call when its pacer allows). `group` gives a SYNC's round-trip
/// estimate and group size (asked only when a SYNC is due: it may walk the members). Counts
/// `sync_sent`, `repairs_sent`, `packets_sent` and `payload_bytes_sent`, and samples a
/// repair's NAK-to-repair time; the owner counts the rest.
pub(super) fn next_datagram(
    now: Instant,
    l: LoopParts<'_>,
    ctx: &EmitCtx<'_>,
    group: impl FnOnce() -> (Duration, u32),
    counters: &mut Counters,
    samples: &mut Samples,
) -> ([u8; DATA_HEADER_LEN], TransmitPayload, Sent) {
    let mut header = [0u8; DATA_HEADER_LEN];
    if *l.next_sync <= now {
        *l.next_sync = now + ctx.sync_interval;
        let (grtt, group_size) = group();
        let info = SyncInfo {
            loop_packets: l.carousel.shape().loop_packets(),
            rate_bps: l.pacer.rate_bps(),
            grtt_us: grtt.as_micros().min(u32::MAX as u128) as u32,
            group_size,
            send_us: ctx.send_us,
        };
        DataHeader {
            kind: DataKind::Sync,
            repair: false,
            probe: ctx.probe,
            archive_tag: ctx.tag,
            loop_no: l.carousel.loops(),
        }
        .encode_into(&mut header);
        let info = info.encode();
        let mut payload = [0u8; SIGNED_SYNC_LEN];
        payload[..SYNC_LEN].copy_from_slice(&info);
        if let Some(k) = ctx.signer {
            payload[SYNC_LEN..].copy_from_slice(&k.sign(&sync_signed_bytes(&header, &info)));
        }
        l.pacer.on_send(now, DATA_HEADER_LEN + SIGNED_SYNC_LEN);
        counters.sync_sent += 1;
        return (header, TransmitPayload::Sync(payload), Sent::Sync);
    }
    let loop_no = l.carousel.loops();
    let shape = *l.carousel.shape();
    let (pkt, sent) = match l.repair.take(now, &shape) {
        Some(pkt) => {
            counters.repairs_sent += 1;
            if let Some(waited) = l.repair.last_wait.take() {
                samples.push(Sample::NakToRepair(waited));
            }
            counters.extras_sent += matches!(pkt, crate::archive::PacketId::Extra(_)) as u64;
            (pkt, Sent::Repair)
        }
        None => {
            let pkt = l.carousel.next_packet().expect("non-empty loop");
            l.repair.looped(&shape, pkt, ctx.repair_share);
            if ctx.fec_extra > 0.0 {
                if let Some(g) = shape.ends_repair_segment(pkt) {
                    let n = (ctx.fec_extra * shape.fec_source_count(g) as f64).ceil() as u32;
                    l.repair.owe_now(now, &shape, g, n);
                }
            }
            (pkt, Sent::Loop)
        }
    };
    DataHeader {
        kind: DataKind::Packet(pkt),
        repair: sent == Sent::Repair,
        probe: ctx.probe,
        archive_tag: ctx.tag,
        loop_no,
    }
    .encode_into(&mut header);
    l.pacer.on_send(now, DATA_HEADER_LEN + ctx.symbol_size);
    counters.packets_sent += 1;
    counters.payload_bytes_sent += ctx.symbol_size as u64;
    (header, TransmitPayload::Packet(pkt), sent)
}
