//! Fetching an archive's missing packets from plain web servers with HTTP range requests
//! (`mcast-recv get --http`), sans-I/O: what to ask which mirror for, how to cut an answer
//! into packets, and which mirrors to stop trusting. The driver (`client/src/http_fetch.rs`)
//! moves the bytes and feeds every packet to the same verifier the multicast path uses
//! ([`super::download::Download::on_packet`]), so a mirror is never trusted: it is judged by
//! what it serves.
//!
//! * [`needed_packets`]: the required units not held (data packets and data hash packets;
//!   FEC repair symbols are never fetched over HTTP: the finished file's repair region is
//!   re-encoded from the data).
//! * [`coalesce`]: packets adjacent in the file into byte ranges of at most
//!   [`RangeConfig::max_request`] bytes (hash packets and data never share a range).
//! * [`RangeFetch`]: hands out requests round-robin over the live mirrors, hash ranges
//!   before any data range (a data packet verifies only against its block's hash packet),
//!   checks each answer (status 206, `Content-Range` of the range asked for and of the
//!   archive's length, body of that length) and slices it into packets. A mirror that fails a
//!   check, serves a packet that does not verify, or cannot be reached is dropped; its ranges
//!   go to the others. When every mirror is dropped the fetch fails with each one's reason.

use std::collections::{HashMap, VecDeque};

use crate::archive::{Layout, PacketId, MAX_HEAD_LEN, TAIL_LEN, TAIL_MAGIC};
use crate::carousel::LoopShape;

/// How requests are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeConfig {
    /// Largest body one request asks for.
    pub max_request: u64,
    /// Two runs of needed packets at most this many bytes apart are fetched in one request
    /// (the gap's bytes are fetched and thrown away); 0: only adjacent packets are merged.
    pub merge_gap: u64,
}

impl Default for RangeConfig {
    fn default() -> RangeConfig {
        RangeConfig {
            max_request: 2 << 20,
            merge_gap: 0,
        }
    }
}

/// One byte range of the archive file and the packets in it, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte (file offset).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    pub packets: Vec<PacketId>,
    /// Hash packets (fetched before any data range).
    pub hash: bool,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The `Range` header value asking for it.
    pub fn header(&self) -> String {
        format!("bytes={}-{}", self.start, self.end - 1)
    }
}

/// Required units not held, as packets: every data hash packet first, then data packets.
pub fn needed_packets(shape: &LoopShape, has: impl Fn(u64) -> bool) -> Vec<PacketId> {
    let mut v: Vec<PacketId> = (0..shape.n_blocks)
        .map(PacketId::Hash)
        .filter(|id| !has(shape.unit_index(*id).expect("in range")))
        .collect();
    v.extend(
        (0..shape.data_packets)
            .filter(|&s| !has(s))
            .map(PacketId::Data),
    );
    v
}

/// Payload bytes of `packets`.
pub fn packet_bytes(layout: &Layout, packets: &[PacketId]) -> u64 {
    packets
        .iter()
        .filter_map(|id| layout.packet_range(*id))
        .map(|(_, l)| l as u64)
        .sum()
}

/// Cut `packets` into byte ranges: adjacent ones (or at most `merge_gap` apart) together, each
/// range at most `max_request` bytes (a packet is never split), hash and data apart. Ranges
/// come in file order with hash ranges first.
pub fn coalesce(layout: &Layout, packets: &[PacketId], cfg: RangeConfig) -> Vec<ByteRange> {
    let mut spans: Vec<(u64, u64, PacketId)> = packets
        .iter()
        .filter_map(|id| {
            layout
                .packet_range(*id)
                .map(|(o, l)| (o, o + l as u64, *id))
        })
        .filter(|(_, _, id)| matches!(id, PacketId::Data(_) | PacketId::Hash(_)))
        .collect();
    spans.sort_unstable_by_key(|s| s.0);
    spans.dedup_by_key(|s| s.0);
    let max = cfg.max_request.max(layout.symbol_size);
    let mut out: Vec<ByteRange> = Vec::new();
    for (start, end, id) in spans {
        let hash = matches!(id, PacketId::Hash(_));
        if let Some(r) = out.last_mut() {
            if r.hash == hash
                && start >= r.end
                && start - r.end <= cfg.merge_gap
                && end - r.start <= max
            {
                r.end = end;
                r.packets.push(id);
                continue;
            }
        }
        out.push(ByteRange {
            start,
            end,
            packets: vec![id],
            hash,
        });
    }
    // Stable: hash ranges first, each kind in file order.
    out.sort_by_key(|r| !r.hash);
    out
}

/// `Content-Range: bytes a-b/total` (`total` may be `*`, then `None`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.trim().split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((a, b, total))
}

/// The archive's 16-byte tail: the head's length, checked against the file's length.
pub fn parse_tail(tail: &[u8], file_len: u64) -> Result<u64, String> {
    if tail.len() as u64 != TAIL_LEN || &tail[8..] != TAIL_MAGIC {
        return Err("its last 16 bytes are not an archive tail (not an .mca file?)".into());
    }
    let head_len = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    if head_len == 0 || head_len > MAX_HEAD_LEN || head_len + TAIL_LEN + 16 > file_len {
        return Err(format!(
            "its tail gives a head of {head_len} bytes, impossible for a file of {file_len} bytes"
        ));
    }
    Ok(head_len)
}

/// One request to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub mirror: usize,
    pub range: ByteRange,
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Fetch(Request),
    /// Requests are in flight whose answers gate what comes next (hash before data).
    Wait,
    /// Nothing left to fetch.
    Done,
}

/// Every mirror was dropped; why each was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllMirrorsDropped {
    pub reasons: Vec<(usize, String)>,
}

#[derive(Clone, Debug, Default)]
struct Mirror {
    dropped: Option<String>,
}

/// Counters of one fetch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchCounters {
    pub requests: u64,
    /// Body bytes received (answers judged bad included).
    pub body_bytes: u64,
    /// Packets that failed verification.
    pub packets_rejected: u64,
    pub mirrors_dropped: u64,
}

/// The ranges still to fetch and the mirrors still trusted.
#[derive(Debug)]
pub struct RangeFetch {
    layout: Layout,
    cfg: RangeConfig,
    mirrors: Vec<Mirror>,
    pending: VecDeque<ByteRange>,
    in_flight: HashMap<u64, (usize, ByteRange)>,
    next_id: u64,
    cursor: usize,
    pub counters: FetchCounters,
}

impl RangeFetch {
    /// Fetch `packets` of the archive laid out as `layout` from `mirrors` mirrors.
    pub fn new(layout: Layout, packets: &[PacketId], mirrors: usize, cfg: RangeConfig) -> Self {
        RangeFetch {
            pending: coalesce(&layout, packets, cfg).into(),
            layout,
            cfg,
            mirrors: vec![Mirror::default(); mirrors],
            in_flight: HashMap::new(),
            next_id: 0,
            cursor: 0,
            counters: FetchCounters::default(),
        }
    }

    /// Bytes still to fetch (pending and in flight).
    pub fn remaining_bytes(&self) -> u64 {
        self.pending.iter().map(|r| r.len()).sum::<u64>()
            + self.in_flight.values().map(|(_, r)| r.len()).sum::<u64>()
    }

    pub fn is_live(&self, mirror: usize) -> bool {
        self.mirrors
            .get(mirror)
            .is_some_and(|m| m.dropped.is_none())
    }

    /// Why `mirror` was dropped (`None`: still trusted).
    pub fn dropped_reason(&self, mirror: usize) -> Option<&str> {
        self.mirrors.get(mirror).and_then(|m| m.dropped.as_deref())
    }

    fn all_dropped(&self) -> AllMirrorsDropped {
        AllMirrorsDropped {
            reasons: self
                .mirrors
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m.dropped.clone().map(|r| (i, r)))
                .collect(),
        }
    }

    /// The next request, round-robin over live mirrors; data ranges only once no hash range
    /// is pending or in flight.
    pub fn next_request(&mut self) -> Result<Next, AllMirrorsDropped> {
        if self.pending.is_empty() {
            return Ok(if self.in_flight.is_empty() {
                Next::Done
            } else {
                Next::Wait
            });
        }
        let n = self.mirrors.len();
        let Some(mirror) = (0..n)
            .map(|i| (self.cursor + i) % n.max(1))
            .find(|&m| self.is_live(m))
        else {
            return Err(self.all_dropped());
        };
        let hash_busy = self.in_flight.values().any(|(_, r)| r.hash);
        if self.pending.front().is_some_and(|r| !r.hash) && hash_busy {
            return Ok(Next::Wait);
        }
        let range = self.pending.pop_front().expect("pending");
        self.cursor = (mirror + 1) % n;
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(id, (mirror, range.clone()));
        self.counters.requests += 1;
        Ok(Next::Fetch(Request { id, mirror, range }))
    }

    /// More packets to fetch (a later round: what is still missing after the first).
    pub fn add(&mut self, packets: &[PacketId]) {
        self.requeue(packets);
    }

    /// Drop `mirror` (once) with `why`.
    pub fn drop_mirror(&mut self, mirror: usize, why: String) {
        if let Some(m) = self.mirrors.get_mut(mirror) {
            if m.dropped.is_none() {
                m.dropped = Some(why);
                self.counters.mirrors_dropped += 1;
            }
        }
    }

    /// Put packets back to be fetched (from another mirror if theirs was dropped); hash
    /// packets go first.
    fn requeue(&mut self, packets: &[PacketId]) {
        for r in coalesce(&self.layout, packets, self.cfg).into_iter().rev() {
            if r.hash {
                self.pending.push_front(r);
            } else {
                // Before the data ranges still pending, after any hash ones.
                let at = self
                    .pending
                    .iter()
                    .position(|p| !p.hash)
                    .unwrap_or(self.pending.len());
                self.pending.insert(at, r);
            }
        }
    }

    /// The request could not be made or its answer not read (connection refused, reset,
    /// timed out): the mirror is dropped and the range goes to another.
    pub fn on_error(&mut self, id: u64, why: String) {
        if let Some((mirror, range)) = self.in_flight.remove(&id) {
            self.drop_mirror(mirror, why);
            self.requeue(&range.packets);
        }
    }

    /// An answer: `status`, its `Content-Range` header and its body. If it is the range
    /// asked for, returns the packets in it as (packet, byte range of `body`) for the driver
    /// to verify, then report with [`RangeFetch::on_verified`]. Otherwise the mirror is
    /// dropped, the range requeued, and `None` returned.
    pub fn on_response(
        &mut self,
        id: u64,
        status: u16,
        content_range: Option<&str>,
        body_len: u64,
    ) -> Option<Vec<(PacketId, std::ops::Range<usize>)>> {
        self.counters.body_bytes += body_len;
        let (mirror, range) = self.in_flight.get(&id)?.clone();
        let file_len = self.layout.file_len();
        let want = (range.start, range.end - 1, Some(file_len));
        let fault = if status == 200 {
            Some("answered a range request with the whole file (no range support)".to_string())
        } else if status != 206 {
            Some(format!("answered HTTP {status} to a range request"))
        } else {
            match content_range.and_then(parse_content_range) {
                None => Some(format!(
                    "answered 206 without a valid Content-Range ({content_range:?})"
                )),
                Some(got) if got.2 != Some(file_len) => Some(format!(
                    "serves a file of {:?} bytes where the archive has {file_len} (another version of the title?)",
                    got.2
                )),
                Some(got) if got != want => Some(format!(
                    "answered bytes {}-{} when asked for {}-{}",
                    got.0, got.1, want.0, want.1
                )),
                Some(_) if body_len != range.len() => Some(format!(
                    "sent {body_len} body bytes for a range of {}",
                    range.len()
                )),
                Some(_) => None,
            }
        };
        if let Some(why) = fault {
            self.in_flight.remove(&id);
            self.drop_mirror(mirror, why);
            self.requeue(&range.packets);
            return None;
        }
        Some(
            range
                .packets
                .iter()
                .map(|p| {
                    let (o, l) = self.layout.packet_range(*p).expect("planned packet");
                    let at = (o - range.start) as usize;
                    (*p, at..at + l)
                })
                .collect(),
        )
    }

    /// The verdicts on an answer's packets: `rejected` failed verification (the mirror is
    /// dropped and they are fetched again elsewhere); `retry` were not written for reasons
    /// that are not the mirror's fault (fetched again, from any mirror).
    pub fn on_verified(&mut self, id: u64, rejected: &[PacketId], retry: &[PacketId]) {
        let Some((mirror, _)) = self.in_flight.remove(&id) else {
            return;
        };
        if !rejected.is_empty() {
            self.counters.packets_rejected += rejected.len() as u64;
            self.drop_mirror(
                mirror,
                format!(
                    "served {} packet(s) that fail verification against the signed head (first: {:?})",
                    rejected.len(),
                    rejected[0]
                ),
            );
            self.requeue(rejected);
        }
        if !retry.is_empty() {
            self.requeue(retry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::download::{Download, Verdict};
    use crate::sim::archive::SimArchive;
    use std::sync::Arc;

    fn layout(a: &SimArchive) -> Layout {
        Layout::of(&a.head, a.head_bytes.len() as u64)
    }

    #[test]
    fn needed_is_hash_then_data_and_skips_held() {
        let a = SimArchive::new(100, 1280, 1);
        let shape = LoopShape::of(&a.head);
        let held = |u: u64| u < 50 || u == shape.unit_index(PacketId::Hash(0)).unwrap();
        let v = needed_packets(&shape, held);
        assert_eq!(v[0], PacketId::Hash(1));
        assert!(v.iter().all(|p| *p != PacketId::Hash(0)));
        assert_eq!(
            v.iter().filter(|p| matches!(p, PacketId::Data(_))).count(),
            50
        );
        assert_eq!(v.last(), Some(&PacketId::Data(99)));
    }

    #[test]
    fn coalesce_merges_adjacent_and_caps() {
        let a = SimArchive::new(100, 1280, 2);
        let l = layout(&a);
        let mut p: Vec<PacketId> = (10..20).chain(30..31).map(PacketId::Data).collect();
        p.push(PacketId::Hash(0));
        p.push(PacketId::Hash(1));
        let r = coalesce(&l, &p, RangeConfig::default());
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r[0].hash && r[0].packets == vec![PacketId::Hash(0), PacketId::Hash(1)]);
        assert_eq!(r[1].start, l.packet_range(PacketId::Data(10)).unwrap().0);
        assert_eq!(r[1].len(), 10 * 1280);
        assert_eq!(r[2].packets, vec![PacketId::Data(30)]);
        assert_eq!(
            r[1].header(),
            format!("bytes={}-{}", r[1].start, r[1].end - 1)
        );
        // The cap: 4 packets per request.
        let cfg = RangeConfig {
            max_request: 4 * 1280,
            merge_gap: 0,
        };
        let r = coalesce(&l, &p[..10], cfg);
        assert_eq!(
            r.iter().map(|r| r.packets.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        // A gap allowance joins runs 1 packet apart.
        let cfg = RangeConfig {
            max_request: 1 << 20,
            merge_gap: 1280,
        };
        let p: Vec<PacketId> = [1, 3, 5, 8].into_iter().map(PacketId::Data).collect();
        let r = coalesce(&l, &p, cfg);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].packets.len(), 3);
        // The last, short data packet ends the data region exactly.
        let last = PacketId::Data(a.head.data_packets() - 1);
        let r = coalesce(&l, &[last], RangeConfig::default());
        assert_eq!(r[0].end, l.repair_offset());
    }

    #[test]
    fn content_range_and_tail() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        for bad in [
            "bytes 9-5/100",
            "bytes 0-100/100",
            "items 0-1/2",
            "bytes x-1/2",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        let mut t = crate::archive::tail_bytes(300).to_vec();
        assert_eq!(parse_tail(&t, 10_000), Ok(300));
        assert!(parse_tail(&t, 310).is_err());
        t[15] = b'X';
        assert!(parse_tail(&t, 10_000).is_err());
        assert!(parse_tail(&t[..8], 10_000).is_err());
    }

    /// The file bytes of a sim archive.
    fn file_of(a: &SimArchive) -> Vec<u8> {
        let l = layout(a);
        let mut f = vec![0u8; l.file_len() as usize];
        let shape = LoopShape::of(&a.head);
        for u in 0..shape.loop_packets() {
            let id = shape.unit_packet(u);
            let (o, len) = l.packet_range(id).unwrap();
            f[o as usize..o as usize + len].copy_from_slice(&a.payload(id)[..len]);
        }
        f
    }

    /// A simulated mirror set: mirror `bad` flips a byte in every answer.
    fn run(
        a: &SimArchive,
        have: Option<Vec<u64>>,
        mirrors: usize,
        bad: &[usize],
    ) -> (Download, RangeFetch, Result<(), AllMirrorsDropped>) {
        let l = layout(a);
        let file = file_of(a);
        let mut dl = Download::new(a.head.clone(), a.head_bytes.len() as u64, have);
        let shape = *dl.shape();
        let need = needed_packets(&shape, |u| dl.has(u));
        let cfg = RangeConfig {
            max_request: 16 * 1280,
            merge_gap: 0,
        };
        let mut f = RangeFetch::new(l, &need, mirrors, cfg);
        let res = loop {
            let req = match f.next_request() {
                Ok(Next::Fetch(r)) => r,
                Ok(Next::Done) => break Ok(()),
                Ok(Next::Wait) => unreachable!("sequential: nothing in flight"),
                Err(e) => break Err(e),
            };
            let mut body = file[req.range.start as usize..req.range.end as usize].to_vec();
            if bad.contains(&req.mirror) {
                body[0] ^= 0x40;
            }
            let cr = format!(
                "bytes {}-{}/{}",
                req.range.start,
                req.range.end - 1,
                l.file_len()
            );
            let Some(packets) = f.on_response(req.id, 206, Some(&cr), body.len() as u64) else {
                continue;
            };
            let mut rejected = Vec::new();
            for (id, r) in packets {
                match dl.on_packet(id, &body[r]) {
                    Verdict::Write { .. } | Verdict::Duplicate => {}
                    Verdict::Rejected => rejected.push(id),
                    v => panic!("{id:?}: {v:?}"),
                }
            }
            f.on_verified(req.id, &rejected, &[]);
        };
        (dl, f, res)
    }

    #[test]
    fn a_corrupt_mirror_is_dropped_and_the_other_completes() {
        let a = SimArchive::new(300, 1280, 3);
        let (dl, f, res) = run(&a, None, 2, &[0]);
        assert_eq!(res, Ok(()));
        assert!(dl.is_complete());
        assert_eq!(f.counters.mirrors_dropped, 1);
        assert!(f.counters.packets_rejected >= 1);
        assert!(f.dropped_reason(0).unwrap().contains("fail verification"));
        assert!(f.is_live(1));
        // The first request went to the corrupt mirror: a hash range.
    }

    #[test]
    fn every_mirror_corrupt_fails_with_reasons() {
        let a = SimArchive::new(300, 1280, 4);
        let (dl, f, res) = run(&a, None, 2, &[0, 1]);
        let e = res.unwrap_err();
        assert_eq!(e.reasons.len(), 2);
        assert!(!dl.is_complete());
        assert_eq!(f.counters.mirrors_dropped, 2);
    }

    #[test]
    fn a_resume_fetches_only_what_is_missing() {
        let a = SimArchive::new(1000, 1280, 5);
        // Hold every unit but data 500..600 (and their hash packets' blocks stay held).
        let shape = LoopShape::of(&a.head);
        let mut have = vec![0u64; shape.loop_packets().div_ceil(64) as usize];
        for u in 0..shape.loop_packets() {
            if shape.required(u) && !(500..600).contains(&u) {
                have[(u / 64) as usize] |= 1 << (u % 64);
            }
        }
        // The held data verify against the hash packets read back: not needed here, the
        // verifier asks for them (NeedHash) only for blocks missing data, so give them.
        let l = layout(&a);
        let mut dl = Download::new(a.head.clone(), a.head_bytes.len() as u64, Some(have));
        let file = file_of(&a);
        let need = needed_packets(dl.shape(), |u| dl.has(u));
        assert_eq!(need.len(), 100);
        let missing = packet_bytes(&l, &need);
        let mut f = RangeFetch::new(l, &need, 1, RangeConfig::default());
        while let Ok(Next::Fetch(req)) = f.next_request() {
            let body = &file[req.range.start as usize..req.range.end as usize];
            let cr = format!(
                "bytes {}-{}/{}",
                req.range.start,
                req.range.end - 1,
                l.file_len()
            );
            let packets = f
                .on_response(req.id, 206, Some(&cr), body.len() as u64)
                .unwrap();
            for (id, r) in packets {
                let mut v = dl.on_packet(id, &body[r.clone()]);
                if let Verdict::NeedHash(b) = v {
                    let (o, len) = l.packet_range(PacketId::Hash(b)).unwrap();
                    assert!(dl.restore_hash(b, file[o as usize..o as usize + len].to_vec()));
                    v = dl.on_packet(id, &body[r]);
                }
                assert!(matches!(v, Verdict::Write { .. }), "{v:?}");
            }
            f.on_verified(req.id, &[], &[]);
        }
        assert!(dl.is_complete());
        assert_eq!(f.counters.body_bytes, missing);
        assert_eq!(f.counters.requests, 1);
        let _ = Arc::clone(&a.head);
    }

    #[test]
    fn bad_answers_drop_the_mirror_and_requeue() {
        let a = SimArchive::new(100, 1280, 6);
        let l = layout(&a);
        let need = needed_packets(&LoopShape::of(&a.head), |_| false);
        let mut f = RangeFetch::new(l, &need, 3, RangeConfig::default());
        let total = f.remaining_bytes();
        let Ok(Next::Fetch(r0)) = f.next_request() else {
            panic!()
        };
        assert!(r0.range.hash);
        assert_eq!(r0.mirror, 0);
        // Hash range in flight: data waits.
        assert_eq!(f.next_request(), Ok(Next::Wait));
        // 200: no range support.
        assert!(f.on_response(r0.id, 200, None, 10).is_none());
        assert!(f.dropped_reason(0).unwrap().contains("no range support"));
        let Ok(Next::Fetch(r1)) = f.next_request() else {
            panic!()
        };
        assert_eq!(r1.range, r0.range, "the same range again");
        assert_eq!(r1.mirror, 1);
        // Wrong total length.
        let cr = format!(
            "bytes {}-{}/{}",
            r1.range.start,
            r1.range.end - 1,
            l.file_len() + 1
        );
        assert!(f
            .on_response(r1.id, 206, Some(&cr), r1.range.len())
            .is_none());
        assert!(f.dropped_reason(1).unwrap().contains("another version"));
        let Ok(Next::Fetch(r2)) = f.next_request() else {
            panic!()
        };
        assert_eq!(r2.mirror, 2);
        // Short body.
        let cr = format!(
            "bytes {}-{}/{}",
            r2.range.start,
            r2.range.end - 1,
            l.file_len()
        );
        assert!(f
            .on_response(r2.id, 206, Some(&cr), r2.range.len() - 1)
            .is_none());
        assert_eq!(f.counters.mirrors_dropped, 3);
        assert_eq!(f.next_request().unwrap_err().reasons.len(), 3);
        assert_eq!(f.remaining_bytes(), total);
        // A transport error drops too.
        let mut f = RangeFetch::new(l, &need, 1, RangeConfig::default());
        let Ok(Next::Fetch(r)) = f.next_request() else {
            panic!()
        };
        f.on_error(r.id, "connection refused".into());
        assert_eq!(
            f.next_request().unwrap_err().reasons[0].1,
            "connection refused"
        );
    }
}
