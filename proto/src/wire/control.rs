//! Control datagrams between `mcast-recv` and `mcastd` (UDP, one request → one reply; the
//! receiver retries on timeout, and every request is idempotent).
//!
//! ```text
//! version:u8 (=6) type:u8 flags:u8 receiver_id:u64 req_id:u32 [token:16] body [pad:u16 zeros]
//! ```
//! `receiver_id` is random per download session; `req_id` matches replies to requests.
//! Flag [`FLAG_TOKEN`]: an address token ([`crate::address_token`]) follows the header; a
//! request that needs a proven address and has none is answered by [`Control::Retry`].
//! Flag [`FLAG_PADDED`]: a pad length and that many zero bytes follow the body, so a first
//! request without a token is at least as large as the Retry it may get
//! ([`MIN_TOKENLESS_LEN`]): a server never answers an unproven address with more bytes than
//! it received.
//! Strings are u16-length-prefixed UTF-8; addresses are IPv4 (4 bytes) + port (u16).
//!
//! Play tickets: [`Control::PlayRequest`] carries the signed ticket and the receiver's
//! ephemeral X25519 key; the answer is [`Control::PlayGrant`] (the server's key part sealed to
//! that key, see `mcast_keys::seal`) or [`Control::Error`] with [`ErrorCode::TicketRefused`]
//! and a message saying why. Repeating a request with the same key gets the same grant again
//! without using another play, so the request is idempotent like the others.

use std::net::{IpAddr, SocketAddr};

use crate::codec::{Reader, Writer};

use super::{get_addr, get_ip, get_str, put_addr, put_ip, WireError};
pub use crate::address_token::AddressToken;

/// Version of the control envelope (2: flags, address token and padding; 3: session MACs;
/// 4: [`Control::Complete`] reports the receiver's elapsed time and loops; 5: catalogue
/// items carry kind, associations and watermark; 6: [`Control::JoinOk`] may carry an edge's
/// delegation from the title's origin).
pub const CONTROL_VERSION: u8 = 6;
/// An address token follows the header.
pub const FLAG_TOKEN: u8 = 1;
/// Padding follows the body.
pub const FLAG_PADDED: u8 = 2;
/// A request sent without a token is padded to at least this: more than a Retry takes.
pub const MIN_TOKENLESS_LEN: usize = 48;
/// A session MAC ends the datagram: keyed BLAKE3 under the session key of
/// [`Control::JoinOk`] over every byte before it. Every message of a joined session carries
/// one; the server drops those whose MAC does not verify under the member's key.
pub const FLAG_MAC: u8 = 4;
pub const MAC_LEN: usize = 16;
/// A session's key (from [`Control::JoinOk`]).
pub type SessionKey = [u8; 32];

/// The MAC of `covered` under `key` (shared with NAKs, `wire::nak`).
pub(crate) fn session_mac(key: &SessionKey, covered: &[u8]) -> [u8; MAC_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"mcast session mac v1");
    h.update(covered);
    h.finalize().as_bytes()[..MAC_LEN]
        .try_into()
        .expect("16 bytes")
}

/// `buf` without its MAC trailer when `flagged` (the part a decoder reads: the MAC is checked
/// by whoever holds the key), refusing a datagram too short to hold one after `header` bytes.
pub(crate) fn without_mac(buf: &[u8], flagged: bool, header: usize) -> Result<&[u8], WireError> {
    if !flagged {
        Ok(buf)
    } else if buf.len() >= header + MAC_LEN {
        Ok(&buf[..buf.len() - MAC_LEN])
    } else {
        Err(WireError::Field("mac"))
    }
}

/// Whether `datagram` ends with a valid MAC under `key` (compared in constant time).
/// `flagged`: the datagram says it carries one.
pub(crate) fn mac_trailer_ok(datagram: &[u8], flagged: bool, key: &SessionKey) -> bool {
    use subtle::ConstantTimeEq;
    if !flagged || datagram.len() < MAC_LEN {
        return false;
    }
    let (covered, mac) = datagram.split_at(datagram.len() - MAC_LEN);
    session_mac(key, covered).ct_eq(mac).into()
}

/// Largest head chunk carried in one reply (keeps datagrams under a 1500-byte MTU).
pub const HEAD_CHUNK: usize = 1024;
/// Most throughput tiers a title can loop on.
pub const MAX_TIERS: usize = 16;
/// Largest control datagram we send or accept.
pub const MAX_CONTROL_LEN: usize = 16 * 1024;
/// Largest ticket a [`Control::PlayRequest`] carries (a ticket is at most ~450 bytes).
pub const MAX_PLAY_TICKET: usize = 1024;
/// Largest sealed key part a [`Control::PlayGrant`] carries.
pub const MAX_SEALED_PART: usize = 256;
/// Longest JSON a [`Control::StatsReply`] carries (encoder and decoder agree on it, so what
/// decodes re-encodes unchanged).
pub const MAX_STATS_JSON: usize = MAX_CONTROL_LEN - 64;
/// Longest message of a [`Control::Error`].
pub const MAX_ERROR_MESSAGE: usize = 512;

/// `s` cut to at most `max` bytes at a character boundary: a cut inside a character would
/// make the whole datagram undecodable (strings must be UTF-8).
fn clip(s: &str, max: usize) -> &[u8] {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

pub type ArchiveId = [u8; 16];
pub type Cookie = [u8; 16];

/// One catalogue line. Unauthenticated: receivers use it to find candidates (which adverts
/// may go with a title) and act only on what the signed head of the archive says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogItem {
    pub title: String,
    pub plain_len: u64,
    pub archive_len: u64,
    pub advert: bool,
    /// A plug-in/codec archive.
    pub plugin: bool,
    /// The advert plays after `advert_for` (else before).
    pub trailer: bool,
    /// Titles the advert is associated with (at most [`MAX_CATALOG_FOR`]).
    pub advert_for: Vec<String>,
    /// Owner label of the head (at most [`MAX_CATALOG_WATERMARK`] bytes).
    pub watermark: String,
}

/// Most associated titles one catalogue item carries.
pub const MAX_CATALOG_FOR: usize = 32;
/// Longest watermark a catalogue item carries.
pub const MAX_CATALOG_WATERMARK: usize = 256;
const ITEM_ADVERT: u8 = 1;
const ITEM_PLUGIN: u8 = 2;
const ITEM_TRAILER: u8 = 4;

impl CatalogItem {
    /// Bytes this item takes in a [`Control::CatalogReply`] (servers fill pages by it).
    pub fn encoded_len(&self) -> usize {
        let t = |s: &str| 2 + s.len().min(128);
        t(&self.title)
            + 17
            + 2
            + self.watermark.len().min(MAX_CATALOG_WATERMARK)
            + 1
            + self
                .advert_for
                .iter()
                .take(MAX_CATALOG_FOR)
                .map(|s| t(s))
                .sum::<usize>()
    }
}

/// Error codes in [`Control::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The receiver's session is unknown (server restarted, lease expired): join again.
    UnknownSession = 1,
    /// Malformed or out-of-range request.
    BadRequest = 2,
    /// Unicast cookie did not verify (wrong, stale, or from another address).
    BadCookie = 3,
    /// The server is at its limit (channels or unicast streams).
    Busy = 4,
    /// A play ticket was refused; the message says why (expired, revoked, already used, ...).
    TicketRefused = 5,
    /// The server is draining (finishing its receivers, taking no new ones): ask a traffic
    /// director for another server.
    Draining = 6,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::UnknownSession,
            2 => ErrorCode::BadRequest,
            3 => ErrorCode::BadCookie,
            4 => ErrorCode::Busy,
            5 => ErrorCode::TicketRefused,
            6 => ErrorCode::Draining,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    // ---- receiver → server ----
    /// List titles, starting at index `start`.
    CatalogRequest {
        start: u16,
    },
    /// Ask for a title: the server answers with its channel ([`Control::JoinOk`]) or
    /// [`Control::NotHere`].
    Join {
        title: String,
    },
    /// A join that resumes a download (e.g. on another server after a fail-over): if a new
    /// channel has to be opened for it, its loop starts at `block` (where the receiver's
    /// missing packets begin) instead of block 0. Answered like [`Control::Join`].
    JoinAt {
        title: String,
        block: u64,
    },
    /// Fetch `HEAD_CHUNK` bytes of the archive head at `offset`.
    HeadRequest {
        archive_id: ArchiveId,
        offset: u32,
    },
    /// Renew the lease; `have`/`total` are loop units held, for the server's statistics;
    /// `rtt_us` is the receiver's last measured control round trip (0 = none yet), from which
    /// the server derives the group RTT that NAK timers scale with.
    Keepalive {
        archive_id: ArchiveId,
        have: u64,
        total: u64,
        rtt_us: u32,
        /// Throughput measured on the current channel (bit/s, 0 = not yet) and loss in parts
        /// per million: the server sets each tier's rate from its members' reports.
        rx_bps: u64,
        loss_ppm: u32,
        /// What the receiver's path can carry (bit/s), once it found the limit (queueing
        /// delay rising, loss growing with rate, its own socket overrun); 0 = no limit found
        /// at the current rate. Tier rates and unicast streams follow this, never `rx_bps`
        /// (goodput under random loss would spiral a rate down).
        capacity_bps: u64,
    },
    /// Move this receiver to another throughput tier of the title (answered with
    /// [`Control::JoinOk`] for that tier's channel).
    ChangeTier {
        archive_id: ArchiveId,
        tier: u8,
    },
    /// Every packet is present and verified: drop me from the channel. `elapsed_ms` (this
    /// session, from its first join) and `milli_loops` (bytes received over the loop's size,
    /// in thousandths) are the receiver's own figures, for the server's completion
    /// histograms only: untrusted, clamped there, and never acted on.
    Complete {
        archive_id: ArchiveId,
        elapsed_ms: u32,
        milli_loops: u32,
    },
    /// Multicast is not reaching me: sent from the socket that should get the unicast stream.
    UnicastRequest {
        archive_id: ArchiveId,
    },
    /// The cookie from [`Control::Cookie`], returned from the same address.
    UnicastConfirm {
        archive_id: ArchiveId,
        cookie: Cookie,
    },
    /// A discovery burst: send me `ms` milliseconds of the loop at tier `tier`'s rate, by
    /// unicast to this address (the cookie from [`Control::Cookie`] proves it is mine), so I
    /// can tell whether my path carries that tier without joining its group. Answered with
    /// [`Control::UnicastOk`]; the burst's datagrams carry the PROBE flag.
    ProbeBurst {
        archive_id: ArchiveId,
        cookie: Cookie,
        tier: u8,
        ms: u16,
    },
    /// Counters, as JSON (operators and tests).
    StatsRequest,
    /// Present a play ticket for `title` (the encoded ticket, not its armor) and ask for the
    /// server's key part, sealed to `receiver_pub` (fresh for every play).
    PlayRequest {
        title: String,
        ticket: Vec<u8>,
        receiver_pub: [u8; 32],
        /// Proof of holding part A (`mcast_keys::ticket::possession_proof`), bound to this
        /// request's address token: the signed ticket alone no longer spends a play.
        proof: [u8; 32],
    },

    // ---- server → receiver ----
    CatalogReply {
        items: Vec<CatalogItem>,
        more: bool,
    },
    JoinOk {
        archive_id: ArchiveId,
        group: SocketAddr,
        head_len: u32,
        loop_packets: u64,
        rate_bps: u64,
        lease_ms: u32,
        /// The tier this channel is, and the nominal rate of every tier of the title.
        tier: u8,
        tiers_bps: Vec<u64>,
        /// Key of this receiver's session: every later message of the session (keepalive,
        /// tier change, completion, unicast steps, NAKs) carries a MAC under it, so nobody
        /// else can speak for this receiver even knowing its id.
        session_key: SessionKey,
        /// Source-specific multicast (groups in 232.0.0.0/8 and ff3x::/32): the address the channel's
        /// packets come from. The receiver joins (source, group), so packets anyone else sends
        /// to the group never reach it. `None`: an any-source group.
        source: Option<IpAddr>,
        /// An edge serving a title signed by another server (its origin): the origin's
        /// certificate letting this server's key sign the channel's SYNCs
        /// ([`crate::delegation`]). `None` when the title's signer is this server.
        delegation: Option<crate::delegation::Delegation>,
    },
    /// This server lacks the title; `redirect` names one that has it, when known.
    NotHere {
        title: String,
        redirect: Option<SocketAddr>,
    },
    HeadChunk {
        archive_id: ArchiveId,
        offset: u32,
        total: u32,
        bytes: Vec<u8>,
    },
    LeaseOk {
        archive_id: ArchiveId,
        lease_ms: u32,
    },
    Cookie {
        archive_id: ArchiveId,
        cookie: Cookie,
    },
    UnicastOk {
        archive_id: ArchiveId,
    },
    CompleteOk {
        archive_id: ArchiveId,
    },
    StatsReply {
        json: String,
    },
    /// The ticket checked out and a play was used: the server's key part, sealed, and the
    /// server identity's signature over the ticket id, the receiver key and the sealed part
    /// (`mcast_keys::ticket::grant_signed_bytes`).
    PlayGrant {
        ticket_id: [u8; 16],
        sealed_part: Vec<u8>,
        signature: [u8; 64],
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The request needs a proven source address: repeat it with this token (valid for
    /// [`crate::address_token::TOKEN_LIFETIME`] from this address).
    Retry {
        token: AddressToken,
    },
}

impl Control {
    /// The title (archive) of a message that speaks for a joined session: these carry the
    /// session's MAC ([`FLAG_MAC`]).
    pub fn session_archive(&self) -> Option<&ArchiveId> {
        match self {
            Control::Keepalive { archive_id, .. }
            | Control::ChangeTier { archive_id, .. }
            | Control::Complete { archive_id, .. }
            | Control::UnicastRequest { archive_id }
            | Control::UnicastConfirm { archive_id, .. }
            | Control::ProbeBurst { archive_id, .. } => Some(archive_id),
            _ => None,
        }
    }

    /// Requests answered only to a proven address (a token), because their answer is larger
    /// than they are or they create state: everything but lease renewals, completions and the
    /// cookie-proven unicast steps, whose answers are no larger than they are.
    pub fn needs_token(&self) -> bool {
        matches!(
            self,
            Control::CatalogRequest { .. }
                | Control::Join { .. }
                | Control::JoinAt { .. }
                | Control::ChangeTier { .. }
                | Control::HeadRequest { .. }
                | Control::UnicastRequest { .. }
                | Control::StatsRequest
                | Control::PlayRequest { .. }
        )
    }
}

/// A control datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub receiver_id: u64,
    pub req_id: u32,
    /// The requester's address token, if it has one.
    pub token: Option<AddressToken>,
    pub msg: Control,
}

mod t {
    pub const CATALOG_REQ: u8 = 1;
    pub const JOIN: u8 = 2;
    pub const HEAD_REQ: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const COMPLETE: u8 = 5;
    pub const UNICAST_REQ: u8 = 6;
    pub const UNICAST_CONFIRM: u8 = 7;
    pub const STATS_REQ: u8 = 8;
    pub const PLAY_REQ: u8 = 9;
    pub const CHANGE_TIER: u8 = 10;
    pub const JOIN_AT: u8 = 11;
    pub const PROBE_BURST: u8 = 12;
    pub const CATALOG: u8 = 64;
    pub const JOIN_OK: u8 = 65;
    pub const NOT_HERE: u8 = 66;
    pub const HEAD_CHUNK: u8 = 67;
    pub const LEASE_OK: u8 = 68;
    pub const COOKIE: u8 = 69;
    pub const UNICAST_OK: u8 = 70;
    pub const COMPLETE_OK: u8 = 71;
    pub const STATS: u8 = 72;
    pub const PLAY_GRANT: u8 = 73;
    pub const RETRY: u8 = 74;
    pub const ERROR: u8 = 127;
}

impl Envelope {
    pub fn new(receiver_id: u64, req_id: u32, msg: Control) -> Self {
        Envelope {
            receiver_id,
            req_id,
            token: None,
            msg,
        }
    }

    /// The same envelope carrying `token`.
    pub fn with_token(mut self, token: Option<AddressToken>) -> Self {
        self.token = token;
        self
    }

    /// Encoded, padded with zeros to at least `min_len` bytes.
    pub fn encode_padded(&self, min_len: usize) -> Vec<u8> {
        let mut b = self.encode();
        if b.len() < min_len {
            b[2] |= FLAG_PADDED;
            let n = min_len.saturating_sub(b.len() + 2);
            b.put_u16(n as u16);
            b.resize(b.len() + n, 0);
        }
        b
    }

    /// Encoded as a request: with the token if there is one, else padded so that the Retry
    /// it may get is no larger.
    pub fn encode_request(&self) -> Vec<u8> {
        if self.token.is_some() {
            self.encode()
        } else {
            self.encode_padded(MIN_TOKENLESS_LEN)
        }
    }

    /// Encoded with the session's MAC under `key` (a joined session's messages).
    pub fn encode_sealed(&self, key: &SessionKey) -> Vec<u8> {
        let mut b = self.encode();
        b[2] |= FLAG_MAC;
        let mac = session_mac(key, &b);
        b.extend_from_slice(&mac);
        b
    }

    /// Whether `datagram` (an encoded envelope) carries a valid session MAC under `key`.
    pub fn mac_ok(datagram: &[u8], key: &SessionKey) -> bool {
        let flagged = datagram.get(2).is_some_and(|f| f & FLAG_MAC != 0);
        mac_trailer_ok(datagram, flagged, key)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.put_u8(CONTROL_VERSION);
        b.put_u8(0); // type, patched below
        b.put_u8(if self.token.is_some() { FLAG_TOKEN } else { 0 });
        b.put_u64(self.receiver_id);
        b.put_u32(self.req_id);
        if let Some(t) = &self.token {
            b.extend_from_slice(t);
        }
        let ty = match &self.msg {
            Control::CatalogRequest { start } => {
                b.put_u16(*start);
                t::CATALOG_REQ
            }
            Control::Join { title } => {
                b.put_short_bytes(title.as_bytes());
                t::JOIN
            }
            Control::JoinAt { title, block } => {
                b.put_short_bytes(title.as_bytes());
                b.put_u64(*block);
                t::JOIN_AT
            }
            Control::HeadRequest { archive_id, offset } => {
                b.extend_from_slice(archive_id);
                b.put_u32(*offset);
                t::HEAD_REQ
            }
            Control::Keepalive {
                archive_id,
                have,
                total,
                rtt_us,
                rx_bps,
                loss_ppm,
                capacity_bps,
            } => {
                b.extend_from_slice(archive_id);
                b.put_u64(*have);
                b.put_u64(*total);
                b.put_u32(*rtt_us);
                b.put_u64(*rx_bps);
                b.put_u32(*loss_ppm);
                b.put_u64(*capacity_bps);
                t::KEEPALIVE
            }
            Control::Complete {
                archive_id,
                elapsed_ms,
                milli_loops,
            } => {
                b.extend_from_slice(archive_id);
                b.put_u32(*elapsed_ms);
                b.put_u32(*milli_loops);
                t::COMPLETE
            }
            Control::UnicastRequest { archive_id } => {
                b.extend_from_slice(archive_id);
                t::UNICAST_REQ
            }
            Control::UnicastConfirm { archive_id, cookie } => {
                b.extend_from_slice(archive_id);
                b.extend_from_slice(cookie);
                t::UNICAST_CONFIRM
            }
            Control::ProbeBurst {
                archive_id,
                cookie,
                tier,
                ms,
            } => {
                b.extend_from_slice(archive_id);
                b.extend_from_slice(cookie);
                b.put_u8(*tier);
                b.put_u16(*ms);
                t::PROBE_BURST
            }
            Control::ChangeTier { archive_id, tier } => {
                b.extend_from_slice(archive_id);
                b.put_u8(*tier);
                t::CHANGE_TIER
            }
            Control::StatsRequest => t::STATS_REQ,
            Control::PlayRequest {
                title,
                ticket,
                receiver_pub,
                proof,
            } => {
                b.put_short_bytes(title.as_bytes());
                b.put_short_bytes(&ticket[..ticket.len().min(MAX_PLAY_TICKET)]);
                b.extend_from_slice(receiver_pub);
                b.extend_from_slice(proof);
                t::PLAY_REQ
            }
            Control::PlayGrant {
                ticket_id,
                sealed_part,
                signature,
            } => {
                b.extend_from_slice(ticket_id);
                b.put_short_bytes(&sealed_part[..sealed_part.len().min(MAX_SEALED_PART)]);
                b.extend_from_slice(signature);
                t::PLAY_GRANT
            }
            Control::CatalogReply { items, more } => {
                b.put_u8(*more as u8);
                b.put_u16(items.len() as u16);
                for it in items {
                    b.put_short_bytes(clip(&it.title, 128));
                    b.put_u64(it.plain_len);
                    b.put_u64(it.archive_len);
                    b.put_u8(
                        if it.advert { ITEM_ADVERT } else { 0 }
                            | if it.plugin { ITEM_PLUGIN } else { 0 }
                            | if it.trailer { ITEM_TRAILER } else { 0 },
                    );
                    b.put_short_bytes(clip(&it.watermark, MAX_CATALOG_WATERMARK));
                    let n = it.advert_for.len().min(MAX_CATALOG_FOR);
                    b.put_u8(n as u8);
                    for f in &it.advert_for[..n] {
                        b.put_short_bytes(clip(f, 128));
                    }
                }
                t::CATALOG
            }
            Control::JoinOk {
                archive_id,
                group,
                head_len,
                loop_packets,
                rate_bps,
                lease_ms,
                tier,
                tiers_bps,
                session_key,
                source,
                delegation,
            } => {
                b.extend_from_slice(archive_id);
                put_addr(&mut b, group);
                b.put_u32(*head_len);
                b.put_u64(*loop_packets);
                b.put_u64(*rate_bps);
                b.put_u32(*lease_ms);
                b.put_u8(*tier);
                let n = tiers_bps.len().min(MAX_TIERS);
                b.put_u8(n as u8);
                for r in &tiers_bps[..n] {
                    b.put_u64(*r);
                }
                b.extend_from_slice(session_key);
                match source {
                    Some(a) => {
                        b.put_u8(1);
                        put_ip(&mut b, a);
                    }
                    None => b.put_u8(0),
                }
                match delegation {
                    Some(d) => {
                        b.put_u8(1);
                        b.extend_from_slice(&d.encode());
                    }
                    None => b.put_u8(0),
                }
                t::JOIN_OK
            }
            Control::NotHere { title, redirect } => {
                b.put_short_bytes(title.as_bytes());
                match redirect {
                    Some(a) => {
                        b.put_u8(1);
                        put_addr(&mut b, a);
                    }
                    None => b.put_u8(0),
                }
                t::NOT_HERE
            }
            Control::HeadChunk {
                archive_id,
                offset,
                total,
                bytes,
            } => {
                b.extend_from_slice(archive_id);
                b.put_u32(*offset);
                b.put_u32(*total);
                b.put_short_bytes(bytes);
                t::HEAD_CHUNK
            }
            Control::LeaseOk {
                archive_id,
                lease_ms,
            } => {
                b.extend_from_slice(archive_id);
                b.put_u32(*lease_ms);
                t::LEASE_OK
            }
            Control::Cookie { archive_id, cookie } => {
                b.extend_from_slice(archive_id);
                b.extend_from_slice(cookie);
                t::COOKIE
            }
            Control::UnicastOk { archive_id } => {
                b.extend_from_slice(archive_id);
                t::UNICAST_OK
            }
            Control::CompleteOk { archive_id } => {
                b.extend_from_slice(archive_id);
                t::COMPLETE_OK
            }
            Control::StatsReply { json } => {
                b.put_short_bytes(clip(json, MAX_STATS_JSON));
                t::STATS
            }
            Control::Error { code, message } => {
                b.put_u16(*code as u16);
                b.put_short_bytes(clip(message, MAX_ERROR_MESSAGE));
                t::ERROR
            }
            Control::Retry { token } => {
                b.extend_from_slice(token);
                t::RETRY
            }
        };
        b[1] = ty;
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Envelope, WireError> {
        match buf.first() {
            None => return Err(WireError::Empty),
            Some(&CONTROL_VERSION) => {}
            Some(&v) => return Err(WireError::Version(v)),
        }
        if buf.len() > MAX_CONTROL_LEN {
            return Err(WireError::Field("length"));
        }
        let flags = *buf.get(2).ok_or(WireError::Field("flags"))?;
        if flags & !(FLAG_TOKEN | FLAG_PADDED | FLAG_MAC) != 0 {
            return Err(WireError::Field("flags"));
        }
        let buf = without_mac(buf, flags & FLAG_MAC != 0, 3)?;
        let mut r = Reader::new(buf);
        r.u8("version")?;
        let ty = r.u8("type")?;
        r.u8("flags")?;
        let receiver_id = r.u64("receiver_id")?;
        let req_id = r.u32("req_id")?;
        let token = if flags & FLAG_TOKEN != 0 {
            Some(r.array("token")?)
        } else {
            None
        };
        let msg = match ty {
            t::CATALOG_REQ => Control::CatalogRequest {
                start: r.u16("start")?,
            },
            t::JOIN => Control::Join {
                title: get_str(&mut r, 128, "title")?,
            },
            t::JOIN_AT => Control::JoinAt {
                title: get_str(&mut r, 128, "title")?,
                block: r.u64("block")?,
            },
            t::HEAD_REQ => Control::HeadRequest {
                archive_id: r.array("archive_id")?,
                offset: r.u32("offset")?,
            },
            t::KEEPALIVE => Control::Keepalive {
                archive_id: r.array("archive_id")?,
                have: r.u64("have")?,
                total: r.u64("total")?,
                rtt_us: r.u32("rtt_us")?,
                rx_bps: r.u64("rx_bps")?,
                loss_ppm: r.u32("loss_ppm")?,
                capacity_bps: r.u64("capacity_bps")?,
            },
            t::CHANGE_TIER => Control::ChangeTier {
                archive_id: r.array("archive_id")?,
                tier: r.u8("tier")?,
            },
            t::COMPLETE => Control::Complete {
                archive_id: r.array("archive_id")?,
                elapsed_ms: r.u32("elapsed_ms")?,
                milli_loops: r.u32("milli_loops")?,
            },
            t::UNICAST_REQ => Control::UnicastRequest {
                archive_id: r.array("archive_id")?,
            },
            t::UNICAST_CONFIRM => Control::UnicastConfirm {
                archive_id: r.array("archive_id")?,
                cookie: r.array("cookie")?,
            },
            t::PROBE_BURST => Control::ProbeBurst {
                archive_id: r.array("archive_id")?,
                cookie: r.array("cookie")?,
                tier: r.u8("tier")?,
                ms: r.u16("ms")?,
            },
            t::STATS_REQ => Control::StatsRequest,
            t::PLAY_REQ => Control::PlayRequest {
                title: get_str(&mut r, 128, "title")?,
                ticket: r.short_bytes(MAX_PLAY_TICKET, "ticket")?.to_vec(),
                receiver_pub: r.array("receiver_pub")?,
                proof: r.array("proof")?,
            },
            t::PLAY_GRANT => Control::PlayGrant {
                ticket_id: r.array("ticket_id")?,
                sealed_part: r.short_bytes(MAX_SEALED_PART, "sealed_part")?.to_vec(),
                signature: r.array("signature")?,
            },
            t::CATALOG => {
                let more = r.u8("more")? != 0;
                let n = r.u16("count")? as usize;
                let mut items = Vec::with_capacity(n.min(r.remaining() / 22));
                for _ in 0..n {
                    let title = get_str(&mut r, 128, "title")?;
                    let plain_len = r.u64("plain_len")?;
                    let archive_len = r.u64("archive_len")?;
                    let kind = r.u8("kind")?;
                    if kind & !(ITEM_ADVERT | ITEM_PLUGIN | ITEM_TRAILER) != 0 {
                        return Err(WireError::Field("kind"));
                    }
                    let watermark = get_str(&mut r, MAX_CATALOG_WATERMARK, "watermark")?;
                    let n_for = r.u8("n_for")? as usize;
                    if n_for > MAX_CATALOG_FOR {
                        return Err(WireError::Field("n_for"));
                    }
                    let mut advert_for = Vec::with_capacity(n_for);
                    for _ in 0..n_for {
                        advert_for.push(get_str(&mut r, 128, "advert_for")?);
                    }
                    items.push(CatalogItem {
                        title,
                        plain_len,
                        archive_len,
                        advert: kind & ITEM_ADVERT != 0,
                        plugin: kind & ITEM_PLUGIN != 0,
                        trailer: kind & ITEM_TRAILER != 0,
                        advert_for,
                        watermark,
                    });
                }
                Control::CatalogReply { items, more }
            }
            t::JOIN_OK => Control::JoinOk {
                archive_id: r.array("archive_id")?,
                group: get_addr(&mut r, "group")?,
                head_len: r.u32("head_len")?,
                loop_packets: r.u64("loop_packets")?,
                rate_bps: r.u64("rate_bps")?,
                lease_ms: r.u32("lease_ms")?,
                tier: r.u8("tier")?,
                tiers_bps: {
                    let n = r.u8("tiers")? as usize;
                    if n > MAX_TIERS {
                        return Err(WireError::Field("tiers"));
                    }
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(r.u64("tiers")?);
                    }
                    v
                },
                session_key: r.array("session_key")?,
                source: match r.u8("source")? {
                    0 => None,
                    1 => Some(get_ip(&mut r, "source")?),
                    _ => return Err(WireError::Field("source")),
                },
                delegation: match r.u8("delegation")? {
                    0 => None,
                    1 => Some(
                        crate::delegation::Delegation::decode(
                            r.bytes(crate::delegation::DELEGATION_LEN, "delegation")?,
                        )
                        .map_err(|_| WireError::Field("delegation"))?,
                    ),
                    _ => return Err(WireError::Field("delegation")),
                },
            },
            t::NOT_HERE => Control::NotHere {
                title: get_str(&mut r, 128, "title")?,
                redirect: match r.u8("redirect")? {
                    0 => None,
                    1 => Some(get_addr(&mut r, "redirect")?),
                    _ => return Err(WireError::Field("redirect")),
                },
            },
            t::HEAD_CHUNK => Control::HeadChunk {
                archive_id: r.array("archive_id")?,
                offset: r.u32("offset")?,
                total: r.u32("total")?,
                bytes: r.short_bytes(HEAD_CHUNK, "bytes")?.to_vec(),
            },
            t::LEASE_OK => Control::LeaseOk {
                archive_id: r.array("archive_id")?,
                lease_ms: r.u32("lease_ms")?,
            },
            t::COOKIE => Control::Cookie {
                archive_id: r.array("archive_id")?,
                cookie: r.array("cookie")?,
            },
            t::UNICAST_OK => Control::UnicastOk {
                archive_id: r.array("archive_id")?,
            },
            t::COMPLETE_OK => Control::CompleteOk {
                archive_id: r.array("archive_id")?,
            },
            t::STATS => Control::StatsReply {
                json: get_str(&mut r, MAX_STATS_JSON, "json")?,
            },
            t::ERROR => Control::Error {
                code: ErrorCode::from_u16(r.u16("code")?).ok_or(WireError::Field("code"))?,
                message: get_str(&mut r, MAX_ERROR_MESSAGE, "message")?,
            },
            t::RETRY => Control::Retry {
                token: r.array("token")?,
            },
            k => return Err(WireError::Kind(k)),
        };
        if flags & FLAG_PADDED != 0 {
            let n = r.u16("pad")? as usize;
            if r.remaining() != n || r.bytes(n, "pad")?.iter().any(|&z| z != 0) {
                return Err(WireError::Field("pad"));
            }
        }
        if r.remaining() != 0 {
            return Err(WireError::Field("trailing bytes"));
        }
        Ok(Envelope {
            receiver_id,
            req_id,
            token,
            msg,
        })
    }
}

/// True if a datagram is a [`Control::PlayRequest`] (cheap check before decoding), so the
/// driver can hand it to the ticket service instead of the channel manager.
pub fn is_play_request(buf: &[u8]) -> bool {
    buf.len() >= 2 && buf[0] == CONTROL_VERSION && buf[1] == t::PLAY_REQ
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `control` fuzz target's round-trip oracle: the decoder took stats JSON
    /// the encoder would cut, and the encoder cut strings inside a character.
    #[test]
    fn long_strings_are_clipped_to_what_decodes() {
        let long = Envelope::new(
            1,
            2,
            Control::StatsReply {
                json: "a".repeat(16_330),
            },
        );
        let d = Envelope::decode(&long.encode()).unwrap();
        assert_eq!(
            d.msg,
            Control::StatsReply {
                json: "a".repeat(MAX_STATS_JSON)
            }
        );
        assert_eq!(Envelope::decode(&d.encode()), Ok(d));
        // 16,330 bytes of JSON on the wire: refused, not re-encoded differently.
        let mut raw = long.encode()[..14].to_vec();
        raw.put_short_bytes("a".repeat(16_330).as_bytes());
        assert_eq!(
            Envelope::decode(&raw),
            Err(WireError::Short(crate::codec::Short("json")))
        );
        // 2-byte characters across the cut: the message keeps whole characters only.
        for msg in [
            Control::Error {
                code: ErrorCode::Busy,
                message: "é".repeat(300),
            },
            Control::StatsReply {
                json: format!("a{}", "é".repeat(9000)),
            },
        ] {
            let d = Envelope::decode(&Envelope::new(1, 2, msg).encode()).expect("decodes");
            match d.msg {
                Control::Error { message, .. } => assert_eq!(message, "é".repeat(256)),
                Control::StatsReply { json } => assert_eq!(json.len(), MAX_STATS_JSON - 1),
                m => panic!("{m:?}"),
            }
        }
    }

    fn all() -> Vec<Control> {
        let id = [9u8; 16];
        let g: SocketAddr = "239.1.2.3:7700".parse().unwrap();
        vec![
            Control::CatalogRequest { start: 3 },
            Control::Join {
                title: "film".into(),
            },
            Control::JoinAt {
                title: "film".into(),
                block: 17,
            },
            Control::HeadRequest {
                archive_id: id,
                offset: 1024,
            },
            Control::Keepalive {
                archive_id: id,
                have: 5,
                total: 9,
                rtt_us: 250,
                rx_bps: 1_000_000,
                loss_ppm: 12,
                capacity_bps: 900_000,
            },
            Control::Complete {
                archive_id: id,
                elapsed_ms: 61_500,
                milli_loops: 1_250,
            },
            Control::UnicastRequest { archive_id: id },
            Control::UnicastConfirm {
                archive_id: id,
                cookie: [4; 16],
            },
            Control::ProbeBurst {
                archive_id: id,
                cookie: [5; 16],
                tier: 3,
                ms: 250,
            },
            Control::StatsRequest,
            Control::CatalogReply {
                items: vec![
                    CatalogItem {
                        title: "a".into(),
                        plain_len: 1,
                        archive_len: 2,
                        advert: true,
                        trailer: true,
                        advert_for: vec!["film-1".into(), "film-2".into()],
                        watermark: "owner".into(),
                        ..Default::default()
                    },
                    CatalogItem {
                        title: "codec".into(),
                        plugin: true,
                        ..Default::default()
                    },
                ],
                more: false,
            },
            Control::JoinOk {
                archive_id: id,
                group: g,
                head_len: 5,
                loop_packets: 6,
                rate_bps: 7,
                lease_ms: 8,
                tier: 1,
                tiers_bps: vec![4_000_000, 16_000_000],
                session_key: [0x33; 32],
                source: Some("198.18.0.1".parse().unwrap()),
                delegation: None,
            },
            Control::JoinOk {
                archive_id: id,
                group: "[ff35::8000:1]:7700".parse().unwrap(),
                head_len: 5,
                loop_packets: 6,
                rate_bps: 7,
                lease_ms: 8,
                tier: 0,
                tiers_bps: vec![4_000_000],
                session_key: [0x34; 32],
                source: Some("2001:db8::1".parse().unwrap()),
                delegation: Some(crate::delegation::Delegation::issue(
                    &mcast_keys::Identity::from_secret(&[1; 32]),
                    mcast_keys::Identity::from_secret(&[2; 32]).public(),
                    1_900_000_000,
                )),
            },
            Control::ChangeTier {
                archive_id: id,
                tier: 2,
            },
            Control::NotHere {
                title: "x".into(),
                redirect: Some(g),
            },
            Control::NotHere {
                title: "x".into(),
                redirect: Some("[2001:db8::7]:7600".parse().unwrap()),
            },
            Control::NotHere {
                title: "x".into(),
                redirect: None,
            },
            Control::HeadChunk {
                archive_id: id,
                offset: 0,
                total: 3,
                bytes: vec![1, 2, 3],
            },
            Control::LeaseOk {
                archive_id: id,
                lease_ms: 5000,
            },
            Control::Cookie {
                archive_id: id,
                cookie: [1; 16],
            },
            Control::UnicastOk { archive_id: id },
            Control::CompleteOk { archive_id: id },
            Control::StatsReply { json: "{}".into() },
            Control::PlayRequest {
                title: "film".into(),
                ticket: vec![7; 300],
                receiver_pub: [5; 32],
                proof: [3; 32],
            },
            Control::PlayGrant {
                ticket_id: [6; 16],
                sealed_part: vec![8; 80],
                signature: [9; 64],
            },
            Control::Error {
                code: ErrorCode::TicketRefused,
                message: "ticket already used".into(),
            },
            Control::Error {
                code: ErrorCode::Busy,
                message: "full".into(),
            },
            Control::Error {
                code: ErrorCode::Draining,
                message: "draining".into(),
            },
            Control::Retry { token: [4; 16] },
        ]
    }

    #[test]
    fn play_requests_are_recognised_cheaply() {
        let req = Envelope::new(
            1,
            2,
            Control::PlayRequest {
                title: "film".into(),
                ticket: vec![1; 10],
                receiver_pub: [3; 32],
                proof: [0; 32],
            },
        )
        .encode();
        assert!(is_play_request(&req));
        for other in all()
            .into_iter()
            .filter(|m| !matches!(m, Control::PlayRequest { .. }))
        {
            assert!(!is_play_request(&Envelope::new(1, 2, other).encode()));
        }
        assert!(!is_play_request(&[]) && !is_play_request(&[CONTROL_VERSION]));
        // Oversized fields are refused, not truncated silently on decode.
        let mut big = Envelope::new(
            1,
            2,
            Control::PlayGrant {
                ticket_id: [0; 16],
                sealed_part: vec![],
                signature: [0; 64],
            },
        )
        .encode();
        big.truncate(big.len() - 2 - 64);
        big.extend_from_slice(&((MAX_SEALED_PART + 1) as u16).to_le_bytes());
        big.extend_from_slice(&vec![0; MAX_SEALED_PART + 1]);
        big.extend_from_slice(&[0; 64]);
        assert!(Envelope::decode(&big).is_err());
    }

    #[test]
    fn tokens_and_padding_round_trip_and_padding_is_checked() {
        for msg in all() {
            let e = Envelope::new(42, 7, msg.clone()).with_token(Some([0xAB; 16]));
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
            let e = Envelope::new(42, 7, msg);
            let p = e.encode_request();
            assert!(p.len() >= MIN_TOKENLESS_LEN);
            assert_eq!(Envelope::decode(&p).unwrap(), e);
            for n in 0..p.len() {
                assert!(Envelope::decode(&p[..n]).is_err(), "{e:?} truncated to {n}");
            }
            // Padding is zeros: anything else is not a padded request of ours.
            let mut bad = p.clone();
            if bad[2] & FLAG_PADDED != 0 {
                *bad.last_mut().unwrap() = 1;
                assert!(Envelope::decode(&bad).is_err());
            }
        }
        // Every request that needs a token, padded, is larger than the Retry it may get.
        let retry = Envelope::new(u64::MAX, u32::MAX, Control::Retry { token: [0; 16] })
            .encode()
            .len();
        assert!(retry <= MIN_TOKENLESS_LEN);
        // A sealed message decodes like any other, and its MAC verifies under its key only.
        for msg in all() {
            let e = Envelope::new(42, 7, msg).with_token(Some([1; 16]));
            let b = e.encode_sealed(&[9; 32]);
            assert_eq!(Envelope::decode(&b).unwrap(), e);
            assert!(Envelope::mac_ok(&b, &[9; 32]));
            assert!(!Envelope::mac_ok(&b, &[8; 32]));
            assert!(!Envelope::mac_ok(&e.encode(), &[9; 32]), "no MAC");
            let mut flipped = b.clone();
            flipped[5] ^= 1;
            assert!(!Envelope::mac_ok(&flipped, &[9; 32]));
            for n in 0..b.len() {
                assert!(!Envelope::mac_ok(&b[..n], &[9; 32]));
            }
        }
        // Unknown flags are refused.
        let mut b = Envelope::new(1, 2, Control::StatsRequest).encode();
        b[2] = 0x80;
        assert!(Envelope::decode(&b).is_err());
        b[2] = FLAG_MAC; // flagged, but too short to hold a MAC
        assert!(Envelope::decode(&b).is_err());
        // Version 1 envelopes (before address tokens) are refused by version, and so are
        // version 3 ones (a Complete without the receiver's figures).
        b[0] = 1;
        assert!(matches!(Envelope::decode(&b), Err(WireError::Version(1))));
        b[0] = 3;
        assert!(matches!(Envelope::decode(&b), Err(WireError::Version(3))));
    }

    #[test]
    fn round_trip_and_truncation() {
        for msg in all() {
            let e = Envelope::new(42, 7, msg);
            let b = e.encode();
            assert_eq!(Envelope::decode(&b).unwrap(), e);
            for n in 0..b.len() {
                assert!(Envelope::decode(&b[..n]).is_err(), "{e:?} truncated to {n}");
            }
        }
    }
}
