//! Datagrams of the traffic directors (DESIGN §2 "Traffic director and heartbeat").
//!
//! * [`Heartbeat`] — `mcastd` → every director, every `heartbeat_ms`: state, titles held,
//!   channels, receivers, measured throughput and capacity. Authenticated with a keyed BLAKE3
//!   MAC under a key shared by the servers and the directors (`key_file`), and carrying a
//!   boot id, a sequence number and the sender's wall clock, so a director can refuse forged
//!   and replayed heartbeats (see [`crate::director`]).
//! * [`DirectorMsg`] — `mcast-recv` ↔ director: "which server should I fetch TITLE from
//!   (not these)?" and the answer.
//!
//! ```text
//! heartbeat:   version:u8 0x90 server:v4 boot_id:u64 seq:u64 unix_ms:u64 interval_ms:u32
//!              state:u8 channels:u32 channel_slots:u32 receivers:u32 throughput_bps:u64
//!              capacity_bps:u64 max_tier_bps:u64 n:u16 (looping:u8 title:str16)*n mac:[32]
//! route req:   version:u8 0x91 req_id:u32 title:str16 rx_bps:u64 n:u8 exclude:v4*n
//! route ok:    version:u8 0x92 req_id:u32 title:str16 server:v4
//! route none:  version:u8 0x93 req_id:u32 title:str16 reason:u8 message:str16
//! site route req: version:u8 0x94 req_id:u32 title:str16 rx_bps:u64 n:u8 exclude:v4*n
//!              pad:u16 zero*pad                       (1,200 bytes in all)
//! site route ok: version:u8 0x95 req_id:u32 title:str16 server:v4 site:str16
//!              no_multicast:u8 (1 stream, 2 http, 3 both) n:u8 http:str16*n
//! placement req: version:u8 0x96 req_id:u32 site:str16 has_token:u8 [token:16]
//!              pad:u16 zero*pad                       (at least 160 bytes)
//! placement retry: version:u8 0x97 req_id:u32 token:16
//! placement:   version:u8 0x98 req_id:u32 site:str16 n:u16 title:str16*n   (<= 8,192 bytes)
//! placement refused: version:u8 0x99 req_id:u32 message:str16
//! ```
//! The site route pair (0x94/0x95) came with sites (step 16): a receiver sends 0x94 and learns
//! its site's policy without multicast and its HTTP mirrors; a director still answers the old
//! 0x91 with 0x92 (older receivers keep working). Directors must be upgraded before
//! receivers: an older director drops 0x94 as malformed (the receiver reports that no director
//! answered). The wire version byte is unchanged (2): the new types are new messages, and no
//! old message changed.
//! The type bytes (0x90..) do not collide with control datagrams (1..127) or NAKs (0x80), so
//! a director port can also answer plain control requests (stats, join → redirect).

use std::net::SocketAddr;

use crate::address_token::{AddressToken, TOKEN_LEN};
use crate::codec::{Reader, Writer};

use super::{check_version, get_addr, get_str, put_addr, WireError, WIRE_VERSION};

/// Largest heartbeat sent or accepted (one UDP datagram; ~450 titles of 128 bytes).
pub const MAX_HEARTBEAT_LEN: usize = 60_000;
/// Length of the heartbeat MAC (keyed BLAKE3).
pub const MAC_LEN: usize = 32;
/// Servers a route request may exclude.
pub const MAX_EXCLUDE: usize = 32;
/// Longest title (as in the control protocol).
pub const MAX_TITLE: usize = 128;

mod t {
    pub const HEARTBEAT: u8 = 0x90;
    pub const ROUTE_REQ: u8 = 0x91;
    pub const ROUTE_OK: u8 = 0x92;
    pub const ROUTE_NONE: u8 = 0x93;
    pub const SITE_ROUTE_REQ: u8 = 0x94;
    pub const SITE_ROUTE_OK: u8 = 0x95;
    pub const PLACEMENT_REQ: u8 = 0x96;
    pub const PLACEMENT_RETRY: u8 = 0x97;
    pub const PLACEMENT: u8 = 0x98;
    pub const PLACEMENT_REFUSED: u8 = 0x99;
}

/// What a server says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes new receivers.
    Online = 1,
    /// Finishes its receivers, takes no new ones (operator: SIGUSR1).
    Draining = 2,
    /// At its limit (channel slots or send capacity): no new receivers for now.
    Overloaded = 3,
    /// Shutting down: the last heartbeat it sends.
    Stopping = 4,
}

impl ServerState {
    fn from_u8(v: u8) -> Option<ServerState> {
        Some(match v {
            1 => ServerState::Online,
            2 => ServerState::Draining,
            3 => ServerState::Overloaded,
            4 => ServerState::Stopping,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ServerState::Online => "online",
            ServerState::Draining => "draining",
            ServerState::Overloaded => "overloaded",
            ServerState::Stopping => "stopping",
        }
    }
}

/// A title a server holds, and whether it is looping there now (joining a running loop costs
/// the server nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldTitle {
    pub title: String,
    pub looping: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The server's control endpoint as receivers reach it (also its name at the director).
    pub server: SocketAddr,
    /// Random per server start: a restart begins a new sequence.
    pub boot_id: u64,
    /// Increases by one per heartbeat within a boot.
    pub seq: u64,
    /// Sender's wall clock (ms since the Unix epoch): directors refuse stale heartbeats.
    pub unix_ms: u64,
    /// The sender's heartbeat period: directors mark it down after a number of these.
    pub interval_ms: u32,
    pub state: ServerState,
    pub channels: u32,
    pub channel_slots: u32,
    pub receivers: u32,
    /// Measured payload send rate over the last interval (bit/s).
    pub throughput_bps: u64,
    /// What it can send (bit/s).
    pub capacity_bps: u64,
    /// Its fastest throughput tier (bit/s).
    pub max_tier_bps: u64,
    pub titles: Vec<HeldTitle>,
}

/// Why a heartbeat was not accepted as genuine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error("malformed heartbeat: {0}")]
    Malformed(#[from] WireError),
    #[error("heartbeat MAC does not verify (wrong key or forged)")]
    BadMac,
}

/// The heartbeat MAC: keyed BLAKE3 over everything before it.
pub fn heartbeat_mac(key: &[u8; 32], signed: &[u8]) -> [u8; MAC_LEN] {
    *blake3::keyed_hash(key, signed).as_bytes()
}

/// The server address a heartbeat names (right after its type byte), unverified: it picks
/// the key the MAC is checked under. `None` if `buf` is no heartbeat.
pub fn heartbeat_server(buf: &[u8]) -> Option<SocketAddr> {
    if !is_heartbeat(buf) {
        return None;
    }
    let mut r = Reader::new(&buf[2..]);
    get_addr(&mut r, "server").ok()
}

/// True if a datagram is a heartbeat (cheap check before decoding).
pub fn is_heartbeat(buf: &[u8]) -> bool {
    buf.len() >= 2 && buf[0] == WIRE_VERSION && buf[1] == t::HEARTBEAT
}

/// True if a datagram is one of this module's director messages.
pub fn is_director_msg(buf: &[u8]) -> bool {
    buf.len() >= 2
        && buf[0] == WIRE_VERSION
        && (t::ROUTE_REQ..=t::PLACEMENT_REFUSED).contains(&buf[1])
}

impl Heartbeat {
    /// Encode and MAC under `key`. Titles that would push the datagram past
    /// [`MAX_HEARTBEAT_LEN`] are left out (logged by the caller from [`Heartbeat::fits`]).
    pub fn encode(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.titles.len() * 24);
        b.put_u8(WIRE_VERSION);
        b.put_u8(t::HEARTBEAT);
        put_addr(&mut b, &self.server);
        b.put_u64(self.boot_id);
        b.put_u64(self.seq);
        b.put_u64(self.unix_ms);
        b.put_u32(self.interval_ms);
        b.put_u8(self.state as u8);
        b.put_u32(self.channels);
        b.put_u32(self.channel_slots);
        b.put_u32(self.receivers);
        b.put_u64(self.throughput_bps);
        b.put_u64(self.capacity_bps);
        b.put_u64(self.max_tier_bps);
        let count_at = b.len();
        b.put_u16(0);
        let mut n = 0u16;
        for t in &self.titles {
            let title = &t.title.as_bytes()[..t.title.len().min(MAX_TITLE)];
            if b.len() + 3 + title.len() + MAC_LEN > MAX_HEARTBEAT_LEN || n == u16::MAX {
                break;
            }
            b.put_u8(t.looping as u8);
            b.put_short_bytes(title);
            n += 1;
        }
        b[count_at..count_at + 2].copy_from_slice(&n.to_le_bytes());
        let mac = heartbeat_mac(key, &b);
        b.extend_from_slice(&mac);
        b
    }

    /// Titles that fit in one heartbeat (the rest are not announced).
    pub fn fits(&self) -> usize {
        let mut len = 75 + MAC_LEN;
        self.titles
            .iter()
            .take_while(|t| {
                len += 3 + t.title.len().min(MAX_TITLE);
                len <= MAX_HEARTBEAT_LEN
            })
            .count()
    }

    /// Decode without checking the MAC (tests, diagnostics).
    pub fn decode_unverified(buf: &[u8]) -> Result<Heartbeat, WireError> {
        check_version(buf)?;
        if buf.len() > MAX_HEARTBEAT_LEN {
            return Err(WireError::Field("length"));
        }
        if buf.len() < 2 + MAC_LEN {
            return Err(WireError::Field("mac"));
        }
        let body = &buf[..buf.len() - MAC_LEN];
        let mut r = Reader::new(body);
        r.u8("version")?;
        let ty = r.u8("type")?;
        if ty != t::HEARTBEAT {
            return Err(WireError::Kind(ty));
        }
        let server = get_addr(&mut r, "server")?;
        let boot_id = r.u64("boot_id")?;
        let seq = r.u64("seq")?;
        let unix_ms = r.u64("unix_ms")?;
        let interval_ms = r.u32("interval_ms")?;
        let state = ServerState::from_u8(r.u8("state")?).ok_or(WireError::Field("state"))?;
        let channels = r.u32("channels")?;
        let channel_slots = r.u32("channel_slots")?;
        let receivers = r.u32("receivers")?;
        let throughput_bps = r.u64("throughput_bps")?;
        let capacity_bps = r.u64("capacity_bps")?;
        let max_tier_bps = r.u64("max_tier_bps")?;
        let n = r.u16("titles")? as usize;
        let mut titles = Vec::with_capacity(n.min(r.remaining() / 3));
        for _ in 0..n {
            let looping = match r.u8("looping")? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Field("looping")),
            };
            titles.push(HeldTitle {
                looping,
                title: get_str(&mut r, MAX_TITLE, "title")?,
            });
        }
        if r.remaining() != 0 {
            return Err(WireError::Field("trailing bytes"));
        }
        if interval_ms == 0 {
            return Err(WireError::Field("interval_ms"));
        }
        Ok(Heartbeat {
            server,
            boot_id,
            seq,
            unix_ms,
            interval_ms,
            state,
            channels,
            channel_slots,
            receivers,
            throughput_bps,
            capacity_bps,
            max_tier_bps,
            titles,
        })
    }

    /// Decode and check the MAC under `key`: a heartbeat that does not verify is
    /// [`HeartbeatError::BadMac`], never a heartbeat.
    pub fn open(buf: &[u8], key: &[u8; 32]) -> Result<Heartbeat, HeartbeatError> {
        // MAC first: a flood of forged heartbeats costs one hash each, not a decode.
        let body_len = buf
            .len()
            .checked_sub(MAC_LEN)
            .ok_or(WireError::Short(crate::codec::Short("mac")))?;
        let (body, mac) = buf.split_at(body_len);
        // blake3::Hash compares in constant time.
        let want = blake3::Hash::from_bytes(heartbeat_mac(key, body));
        let got = blake3::Hash::from_bytes(mac.try_into().expect("MAC_LEN bytes"));
        if want != got {
            return Err(HeartbeatError::BadMac);
        }
        Ok(Heartbeat::decode_unverified(buf)?)
    }
}

/// Why a director could not route a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoRoute {
    /// No known server holds the title.
    NotFound = 1,
    /// Servers hold it, but none is up (down, draining, stopping, or excluded).
    NoHealthyServer = 2,
    /// Servers that hold it are all overloaded: retry later.
    Busy = 3,
}

impl NoRoute {
    fn from_u8(v: u8) -> Option<NoRoute> {
        Some(match v {
            1 => NoRoute::NotFound,
            2 => NoRoute::NoHealthyServer,
            3 => NoRoute::Busy,
            _ => return None,
        })
    }
}

/// What a site's receivers do when multicast does not reach them (`[[director.sites]]
/// no_multicast`): the director states it in its answer to a [`DirectorMsg::SiteRouteRequest`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NoMulticastPolicy {
    /// Today's adaptive unicast stream from the server (the default).
    #[default]
    Stream = 1,
    /// Fetch the archive by HTTP range requests from the site's mirrors.
    Http = 2,
    /// Either: unicast stream and HTTP mirrors both.
    Both = 3,
}

impl NoMulticastPolicy {
    fn from_u8(v: u8) -> Option<NoMulticastPolicy> {
        Some(match v {
            1 => NoMulticastPolicy::Stream,
            2 => NoMulticastPolicy::Http,
            3 => NoMulticastPolicy::Both,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NoMulticastPolicy::Stream => "stream",
            NoMulticastPolicy::Http => "http",
            NoMulticastPolicy::Both => "both",
        }
    }
}

impl std::str::FromStr for NoMulticastPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stream" => Ok(NoMulticastPolicy::Stream),
            "http" => Ok(NoMulticastPolicy::Http),
            "both" => Ok(NoMulticastPolicy::Both),
            _ => Err(format!("{s:?} is not \"stream\", \"http\" or \"both\"")),
        }
    }
}

/// The route answer's site part: the receiver's site and its policy without multicast.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SitePolicy {
    /// The receiver's site ("" = none: its address matched no site's prefixes).
    pub site: String,
    pub no_multicast: NoMulticastPolicy,
    /// HTTP mirrors of the site's archives (URL prefixes; `<title>.mca` is appended).
    pub http: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectorMsg {
    /// Receiver → director: a server for `title`, not one of `exclude` (servers that went
    /// silent or refused); `rx_bps` is the receiver's measured throughput (0 = unknown).
    RouteRequest {
        req_id: u32,
        title: String,
        rx_bps: u64,
        exclude: Vec<SocketAddr>,
    },
    /// Director → receiver: fetch `title` from `server`.
    RouteOk {
        req_id: u32,
        title: String,
        server: SocketAddr,
    },
    /// Director → receiver: no server for `title` now.
    RouteNone {
        req_id: u32,
        title: String,
        reason: NoRoute,
        message: String,
    },
    /// Receiver → director: as [`DirectorMsg::RouteRequest`], answered with a
    /// [`DirectorMsg::SiteRouteOk`] (the receiver's site policy too). Padded to
    /// [`SITE_ROUTE_REQ_LEN`], so the answer, mirrors and all, is never larger.
    SiteRouteRequest {
        req_id: u32,
        title: String,
        rx_bps: u64,
        exclude: Vec<SocketAddr>,
    },
    /// Director → receiver: fetch `title` from `server`; without multicast, do as `policy`.
    SiteRouteOk {
        req_id: u32,
        title: String,
        server: SocketAddr,
        policy: SitePolicy,
    },
    /// Admin → director: the titles to pre-load at `site`. Needs a proven source address:
    /// without a valid `token` it is answered with a [`DirectorMsg::PlacementRetry`].
    PlacementRequest {
        req_id: u32,
        site: String,
        token: Option<AddressToken>,
    },
    /// Director → admin: repeat the request with this token.
    PlacementRetry { req_id: u32, token: AddressToken },
    /// Director → admin: the site's titles to pre-load, most wanted first.
    Placement {
        req_id: u32,
        site: String,
        titles: Vec<String>,
    },
    /// Director → admin: no placement (not an admin address, unknown site).
    PlacementRefused { req_id: u32, message: String },
}

/// Route requests asking for the site policy are padded to this many bytes (the largest
/// [`DirectorMsg::SiteRouteOk`] is smaller).
pub const SITE_ROUTE_REQ_LEN: usize = 1200;
/// Placement requests are padded to at least this many bytes (larger than a
/// [`DirectorMsg::PlacementRetry`] and a refusal).
pub const PLACEMENT_REQ_LEN: usize = 160;
/// Largest placement answer (one datagram; ~60 titles of 128 bytes, more of shorter ones).
pub const MAX_PLACEMENT_LEN: usize = 8192;
/// Longest site name.
pub const MAX_SITE_NAME: usize = 64;
/// HTTP mirrors per site, and the longest mirror URL.
pub const MAX_MIRRORS: usize = 4;
pub const MAX_MIRROR_LEN: usize = 200;
/// Longest director message accepted.
pub const MAX_DIRECTOR_MSG: usize = MAX_PLACEMENT_LEN;
/// Longest refusal message.
const MAX_MESSAGE: usize = 512;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// Padding: a u16 count, then that many zero bytes, so the message is `total` bytes long.
fn pad_to(b: &mut Vec<u8>, total: usize) {
    let pad = total.saturating_sub(b.len() + 2).min(u16::MAX as usize);
    b.put_u16(pad as u16);
    b.resize(b.len() + pad, 0);
}

fn put_route_req(b: &mut Vec<u8>, req_id: u32, title: &str, rx_bps: u64, ex: &[SocketAddr]) {
    b.put_u32(req_id);
    b.put_short_bytes(cut(title, MAX_TITLE).as_bytes());
    b.put_u64(rx_bps);
    let n = ex.len().min(MAX_EXCLUDE);
    b.put_u8(n as u8);
    for a in &ex[..n] {
        put_addr(b, a);
    }
}

impl DirectorMsg {
    pub fn req_id(&self) -> u32 {
        match self {
            DirectorMsg::RouteRequest { req_id, .. }
            | DirectorMsg::RouteOk { req_id, .. }
            | DirectorMsg::RouteNone { req_id, .. }
            | DirectorMsg::SiteRouteRequest { req_id, .. }
            | DirectorMsg::SiteRouteOk { req_id, .. }
            | DirectorMsg::PlacementRequest { req_id, .. }
            | DirectorMsg::PlacementRetry { req_id, .. }
            | DirectorMsg::Placement { req_id, .. }
            | DirectorMsg::PlacementRefused { req_id, .. } => *req_id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.put_u8(WIRE_VERSION);
        let title_of = |s: &str| s.as_bytes()[..s.len().min(MAX_TITLE)].to_vec();
        match self {
            DirectorMsg::RouteRequest {
                req_id,
                title,
                rx_bps,
                exclude,
            } => {
                b.put_u8(t::ROUTE_REQ);
                b.put_u32(*req_id);
                b.put_short_bytes(&title_of(title));
                b.put_u64(*rx_bps);
                let n = exclude.len().min(MAX_EXCLUDE);
                b.put_u8(n as u8);
                for a in &exclude[..n] {
                    put_addr(&mut b, a);
                }
                // Padding, so the request is as large as its answer naming an IPv6 server:
                // a director never answers an unproven address with more than it sent.
                let answer = 2 + 4 + 2 + title_of(title).len() + 19;
                let pad = answer.saturating_sub(b.len() + 1);
                b.put_u8(pad as u8);
                b.resize(b.len() + pad, 0);
            }
            DirectorMsg::RouteOk {
                req_id,
                title,
                server,
            } => {
                b.put_u8(t::ROUTE_OK);
                b.put_u32(*req_id);
                b.put_short_bytes(&title_of(title));
                put_addr(&mut b, server);
            }
            DirectorMsg::RouteNone {
                req_id,
                title,
                reason,
                message,
            } => {
                b.put_u8(t::ROUTE_NONE);
                b.put_u32(*req_id);
                b.put_short_bytes(&title_of(title));
                b.put_u8(*reason as u8);
                b.put_short_bytes(&message.as_bytes()[..message.len().min(MAX_MESSAGE)]);
            }
            DirectorMsg::SiteRouteRequest {
                req_id,
                title,
                rx_bps,
                exclude,
            } => {
                b.put_u8(t::SITE_ROUTE_REQ);
                put_route_req(&mut b, *req_id, title, *rx_bps, exclude);
                pad_to(&mut b, SITE_ROUTE_REQ_LEN);
            }
            DirectorMsg::SiteRouteOk {
                req_id,
                title,
                server,
                policy,
            } => {
                b.put_u8(t::SITE_ROUTE_OK);
                b.put_u32(*req_id);
                b.put_short_bytes(cut(title, MAX_TITLE).as_bytes());
                put_addr(&mut b, server);
                b.put_short_bytes(cut(&policy.site, MAX_SITE_NAME).as_bytes());
                b.put_u8(policy.no_multicast as u8);
                let n = policy.http.len().min(MAX_MIRRORS);
                b.put_u8(n as u8);
                for m in &policy.http[..n] {
                    b.put_short_bytes(cut(m, MAX_MIRROR_LEN).as_bytes());
                }
            }
            DirectorMsg::PlacementRequest {
                req_id,
                site,
                token,
            } => {
                b.put_u8(t::PLACEMENT_REQ);
                b.put_u32(*req_id);
                b.put_short_bytes(cut(site, MAX_SITE_NAME).as_bytes());
                match token {
                    Some(tok) => {
                        b.put_u8(1);
                        b.extend_from_slice(tok);
                    }
                    None => b.put_u8(0),
                }
                pad_to(&mut b, PLACEMENT_REQ_LEN);
            }
            DirectorMsg::PlacementRetry { req_id, token } => {
                b.put_u8(t::PLACEMENT_RETRY);
                b.put_u32(*req_id);
                b.extend_from_slice(token);
            }
            DirectorMsg::Placement {
                req_id,
                site,
                titles,
            } => {
                b.put_u8(t::PLACEMENT);
                b.put_u32(*req_id);
                b.put_short_bytes(cut(site, MAX_SITE_NAME).as_bytes());
                let count_at = b.len();
                b.put_u16(0);
                let mut n = 0u16;
                for title in titles {
                    let title = cut(title, MAX_TITLE);
                    if b.len() + 2 + title.len() > MAX_PLACEMENT_LEN || n == u16::MAX {
                        break;
                    }
                    b.put_short_bytes(title.as_bytes());
                    n += 1;
                }
                b[count_at..count_at + 2].copy_from_slice(&n.to_le_bytes());
            }
            DirectorMsg::PlacementRefused { req_id, message } => {
                b.put_u8(t::PLACEMENT_REFUSED);
                b.put_u32(*req_id);
                b.put_short_bytes(cut(message, MAX_MESSAGE).as_bytes());
            }
        }
        b
    }

    /// Titles of `titles` that fit in one [`DirectorMsg::Placement`] for `site`.
    pub fn placement_fits(site: &str, titles: &[String]) -> usize {
        let mut len = 2 + 4 + 2 + cut(site, MAX_SITE_NAME).len() + 2;
        titles
            .iter()
            .take_while(|t| {
                len += 2 + cut(t, MAX_TITLE).len();
                len <= MAX_PLACEMENT_LEN
            })
            .count()
            .min(u16::MAX as usize)
    }

    pub fn decode(buf: &[u8]) -> Result<DirectorMsg, WireError> {
        check_version(buf)?;
        if buf.len() > MAX_DIRECTOR_MSG {
            return Err(WireError::Field("length"));
        }
        let mut r = Reader::new(buf);
        r.u8("version")?;
        let ty = r.u8("type")?;
        let req_id = r.u32("req_id")?;
        let route_req = |r: &mut Reader<'_>| -> Result<_, WireError> {
            let title = get_str(r, MAX_TITLE, "title")?;
            let rx_bps = r.u64("rx_bps")?;
            let n = r.u8("exclude")? as usize;
            if n > MAX_EXCLUDE {
                return Err(WireError::Field("exclude"));
            }
            let mut exclude = Vec::with_capacity(n);
            for _ in 0..n {
                exclude.push(get_addr(r, "exclude")?);
            }
            Ok((title, rx_bps, exclude))
        };
        let msg = match ty {
            t::ROUTE_REQ => {
                let (title, rx_bps, exclude) = route_req(&mut r)?;
                let pad = r.u8("padding")? as usize;
                r.bytes(pad, "padding")?;
                DirectorMsg::RouteRequest {
                    req_id,
                    title,
                    rx_bps,
                    exclude,
                }
            }
            t::ROUTE_OK => DirectorMsg::RouteOk {
                req_id,
                title: get_str(&mut r, MAX_TITLE, "title")?,
                server: get_addr(&mut r, "server")?,
            },
            t::ROUTE_NONE => DirectorMsg::RouteNone {
                req_id,
                title: get_str(&mut r, MAX_TITLE, "title")?,
                reason: NoRoute::from_u8(r.u8("reason")?).ok_or(WireError::Field("reason"))?,
                message: get_str(&mut r, MAX_MESSAGE, "message")?,
            },
            t::SITE_ROUTE_REQ => {
                let (title, rx_bps, exclude) = route_req(&mut r)?;
                let pad = r.u16("padding")? as usize;
                r.bytes(pad, "padding")?;
                DirectorMsg::SiteRouteRequest {
                    req_id,
                    title,
                    rx_bps,
                    exclude,
                }
            }
            t::SITE_ROUTE_OK => {
                let title = get_str(&mut r, MAX_TITLE, "title")?;
                let server = get_addr(&mut r, "server")?;
                let site = get_str(&mut r, MAX_SITE_NAME, "site")?;
                let no_multicast = NoMulticastPolicy::from_u8(r.u8("no_multicast")?)
                    .ok_or(WireError::Field("no_multicast"))?;
                let n = r.u8("http")? as usize;
                if n > MAX_MIRRORS {
                    return Err(WireError::Field("http"));
                }
                let mut http = Vec::with_capacity(n);
                for _ in 0..n {
                    http.push(get_str(&mut r, MAX_MIRROR_LEN, "http")?);
                }
                DirectorMsg::SiteRouteOk {
                    req_id,
                    title,
                    server,
                    policy: SitePolicy {
                        site,
                        no_multicast,
                        http,
                    },
                }
            }
            t::PLACEMENT_REQ => {
                let site = get_str(&mut r, MAX_SITE_NAME, "site")?;
                let token = match r.u8("token")? {
                    0 => None,
                    1 => Some(r.array::<TOKEN_LEN>("token")?),
                    _ => return Err(WireError::Field("token")),
                };
                let pad = r.u16("padding")? as usize;
                r.bytes(pad, "padding")?;
                DirectorMsg::PlacementRequest {
                    req_id,
                    site,
                    token,
                }
            }
            t::PLACEMENT_RETRY => DirectorMsg::PlacementRetry {
                req_id,
                token: r.array::<TOKEN_LEN>("token")?,
            },
            t::PLACEMENT => {
                let site = get_str(&mut r, MAX_SITE_NAME, "site")?;
                let n = r.u16("titles")? as usize;
                let mut titles = Vec::with_capacity(n.min(r.remaining() / 2));
                for _ in 0..n {
                    titles.push(get_str(&mut r, MAX_TITLE, "title")?);
                }
                DirectorMsg::Placement {
                    req_id,
                    site,
                    titles,
                }
            }
            t::PLACEMENT_REFUSED => DirectorMsg::PlacementRefused {
                req_id,
                message: get_str(&mut r, MAX_MESSAGE, "message")?,
            },
            k => return Err(WireError::Kind(k)),
        };
        if r.remaining() != 0 {
            return Err(WireError::Field("trailing bytes"));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Heartbeat {
        Heartbeat {
            server: "127.0.0.1:7600".parse().unwrap(),
            boot_id: 77,
            seq: 5,
            unix_ms: 1_700_000_000_000,
            interval_ms: 500,
            state: ServerState::Draining,
            channels: 2,
            channel_slots: 32,
            receivers: 9,
            throughput_bps: 123_456,
            capacity_bps: 200_000_000,
            max_tier_bps: 200_000_000,
            titles: vec![
                HeldTitle {
                    title: "film".into(),
                    looping: true,
                },
                HeldTitle {
                    title: "ad".into(),
                    looping: false,
                },
            ],
        }
    }

    #[test]
    fn heartbeat_round_trip_mac_and_truncation() {
        let key = [7u8; 32];
        let hb = sample();
        let b = hb.encode(&key);
        assert!(is_heartbeat(&b) && !is_director_msg(&b));
        assert_eq!(Heartbeat::open(&b, &key).unwrap(), hb);
        assert_eq!(Heartbeat::open(&b, &[8u8; 32]), Err(HeartbeatError::BadMac));
        // Every single-bit change is refused (malformed or bad MAC), never accepted.
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(Heartbeat::open(&d, &key).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(Heartbeat::open(&b[..n], &key).is_err(), "truncated to {n}");
        }
    }

    /// A route request is padded to the size of an answer naming an IPv6 server, so a
    /// director can answer an unproven address without sending more than it got.
    #[test]
    fn route_requests_are_as_large_as_their_ipv6_answers() {
        for title in ["", "film", &"x".repeat(MAX_TITLE + 10)] {
            let req = DirectorMsg::RouteRequest {
                req_id: 1,
                title: title.into(),
                rx_bps: 0,
                exclude: vec![],
            }
            .encode();
            let ok = DirectorMsg::RouteOk {
                req_id: 1,
                title: title.into(),
                server: "[2001:db8::5]:7600".parse().unwrap(),
            }
            .encode();
            assert_eq!(req.len(), ok.len(), "{title:?}");
            assert!(DirectorMsg::decode(&req).is_ok());
        }
    }

    /// A heartbeat of an IPv6 server names it, and that name picks its key.
    #[test]
    fn an_ipv6_servers_heartbeat_round_trips() {
        let mut hb = sample();
        hb.server = "[2001:db8::5]:7600".parse().unwrap();
        let b = hb.encode(&[1; 32]);
        assert_eq!(heartbeat_server(&b), Some(hb.server));
        assert_eq!(Heartbeat::open(&b, &[1; 32]).unwrap(), hb);
    }

    #[test]
    fn oversized_title_lists_are_cut_to_one_datagram() {
        let mut hb = sample();
        hb.titles = (0..1000)
            .map(|i| HeldTitle {
                title: format!("{i:0>120}"),
                looping: false,
            })
            .collect();
        let b = hb.encode(&[1; 32]);
        assert!(b.len() <= MAX_HEARTBEAT_LEN);
        let got = Heartbeat::open(&b, &[1; 32]).unwrap();
        assert_eq!(got.titles.len(), hb.fits());
        assert!(got.titles.len() > 400 && got.titles.len() < 1000);
    }

    #[test]
    fn director_messages_round_trip() {
        let a: SocketAddr = "127.0.0.2:7600".parse().unwrap();
        let b: SocketAddr = "[2001:db8::5]:7600".parse().unwrap();
        for m in [
            DirectorMsg::RouteRequest {
                req_id: 1,
                title: "film".into(),
                rx_bps: 9,
                exclude: vec![a, b],
            },
            DirectorMsg::RouteOk {
                req_id: 2,
                title: "film".into(),
                server: b,
            },
            DirectorMsg::RouteRequest {
                req_id: 1,
                title: "film".into(),
                rx_bps: 0,
                exclude: vec![],
            },
            DirectorMsg::RouteOk {
                req_id: 2,
                title: "film".into(),
                server: a,
            },
            DirectorMsg::RouteNone {
                req_id: 3,
                title: "x".into(),
                reason: NoRoute::Busy,
                message: "all busy".into(),
            },
        ] {
            let b = m.encode();
            assert!(is_director_msg(&b) && !is_heartbeat(&b));
            assert_eq!(DirectorMsg::decode(&b).unwrap(), m);
            assert_eq!(m.req_id(), DirectorMsg::decode(&b).unwrap().req_id());
            for n in 0..b.len() {
                assert!(DirectorMsg::decode(&b[..n]).is_err());
            }
        }
    }

    fn site_messages() -> Vec<DirectorMsg> {
        let b: SocketAddr = "[2001:db8::5]:7600".parse().unwrap();
        vec![
            DirectorMsg::SiteRouteRequest {
                req_id: 1,
                title: "film".into(),
                rx_bps: 9,
                exclude: vec![b],
            },
            DirectorMsg::SiteRouteOk {
                req_id: 2,
                title: "film".into(),
                server: b,
                policy: SitePolicy {
                    site: "paris".into(),
                    no_multicast: NoMulticastPolicy::Both,
                    http: vec!["http://mirror-a/archives/".into(), "https://b/x/".into()],
                },
            },
            DirectorMsg::SiteRouteOk {
                req_id: 2,
                title: "film".into(),
                server: b,
                policy: SitePolicy::default(),
            },
            DirectorMsg::PlacementRequest {
                req_id: 3,
                site: "paris".into(),
                token: None,
            },
            DirectorMsg::PlacementRequest {
                req_id: 3,
                site: "paris".into(),
                token: Some([7; TOKEN_LEN]),
            },
            DirectorMsg::PlacementRetry {
                req_id: 4,
                token: [9; TOKEN_LEN],
            },
            DirectorMsg::Placement {
                req_id: 5,
                site: "paris".into(),
                titles: vec!["film-1".into(), "film-2".into()],
            },
            DirectorMsg::Placement {
                req_id: 5,
                site: "".into(),
                titles: vec![],
            },
            DirectorMsg::PlacementRefused {
                req_id: 6,
                message: "no".into(),
            },
        ]
    }

    /// The site route and placement messages round-trip; every truncation and every
    /// single-byte change decodes to an error or to some message, never a panic.
    #[test]
    fn site_and_placement_messages_round_trip_and_never_panic() {
        for m in site_messages() {
            let b = m.encode();
            assert!(is_director_msg(&b) && !is_heartbeat(&b));
            assert_eq!(DirectorMsg::decode(&b).unwrap(), m);
            for n in 0..b.len() {
                assert!(DirectorMsg::decode(&b[..n]).is_err(), "{m:?} cut to {n}");
            }
            for i in 0..b.len().min(300) {
                for x in [0x01, 0x80, 0xff] {
                    let mut d = b.clone();
                    d[i] ^= x;
                    if let Ok(m2) = DirectorMsg::decode(&d) {
                        assert_eq!(DirectorMsg::decode(&m2.encode()), Ok(m2));
                    }
                }
            }
            let mut long = b.clone();
            long.push(0);
            assert!(DirectorMsg::decode(&long).is_err());
        }
        // A bad policy byte and too many mirrors are refused.
        let mut ok = site_messages()[1].encode();
        let at =
            ok.len() - 1 - 2 - "http://mirror-a/archives/".len() - 2 - "https://b/x/".len() - 1;
        ok[at] = 9;
        assert_eq!(
            DirectorMsg::decode(&ok),
            Err(WireError::Field("no_multicast"))
        );
    }

    /// Padding keeps every answer to an unproven address no larger than its request: a site
    /// route answer with the longest site name, title and mirrors fits in a site route
    /// request; a placement Retry and refusal fit in a placement request.
    #[test]
    fn site_answers_are_never_larger_than_their_requests() {
        let req = DirectorMsg::SiteRouteRequest {
            req_id: 1,
            title: "x".into(),
            rx_bps: 0,
            exclude: vec![],
        }
        .encode();
        assert_eq!(req.len(), SITE_ROUTE_REQ_LEN);
        let big = DirectorMsg::SiteRouteOk {
            req_id: 1,
            title: "t".repeat(MAX_TITLE + 5),
            server: "[2001:db8::5]:7600".parse().unwrap(),
            policy: SitePolicy {
                site: "s".repeat(MAX_SITE_NAME + 5),
                no_multicast: NoMulticastPolicy::Http,
                http: vec!["h".repeat(MAX_MIRROR_LEN + 5); MAX_MIRRORS + 3],
            },
        }
        .encode();
        assert!(big.len() <= SITE_ROUTE_REQ_LEN, "{}", big.len());
        let DirectorMsg::SiteRouteOk { policy, .. } = DirectorMsg::decode(&big).unwrap() else {
            panic!()
        };
        assert_eq!(policy.http.len(), MAX_MIRRORS);
        let preq = DirectorMsg::PlacementRequest {
            req_id: 1,
            site: "".into(),
            token: None,
        }
        .encode();
        assert_eq!(preq.len(), PLACEMENT_REQ_LEN);
        let retry = DirectorMsg::PlacementRetry {
            req_id: 1,
            token: [0; TOKEN_LEN],
        };
        assert!(retry.encode().len() < preq.len());
        // A placement list is cut to one datagram.
        let titles: Vec<String> = (0..200).map(|i| format!("{i:0>128}")).collect();
        let fits = DirectorMsg::placement_fits("site", &titles);
        let b = DirectorMsg::Placement {
            req_id: 1,
            site: "site".into(),
            titles: titles.clone(),
        }
        .encode();
        assert!(b.len() <= MAX_PLACEMENT_LEN);
        let DirectorMsg::Placement { titles: got, .. } = DirectorMsg::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(got.len(), fits);
        assert_eq!(got[..], titles[..fits]);
    }
}
