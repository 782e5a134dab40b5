//! The traffic director (DESIGN §2 "Traffic director and heartbeat", FIG. 2): routing and
//! server health as a sans-I/O state machine.
//!
//! It takes heartbeats and route requests with `now` (and the wall clock, for the heartbeat
//! timestamp window), and returns verdicts, routes, events and its next deadline. The driver
//! (`src/bin/mcast-director.rs`) owns the socket and the clock; tests drive it directly.
//!
//! * **Authentication.** A heartbeat counts only if its keyed-BLAKE3 MAC verifies under the
//!   key of the server it names (its own, `server_keys`, or the shared one); a forged one
//!   changes nothing and is counted. A listed server's heartbeat must also come from the IP
//!   address it names (unless the operator allowed any source for it, `any_source`: a server
//!   behind NAT): its key proves who wrote it, the address that it was not captured and
//!   re-sent from elsewhere by someone who took the key.
//! * **Replay.** Per server, a heartbeat must be newer than the last accepted one: a higher
//!   `seq` within the same boot, or — a new `boot_id` (restart) — a later timestamp; and its
//!   timestamp must lie within `max_skew` of the director's clock. Replays are counted.
//! * **Down.** A server whose heartbeats stop is marked down after `down_after` of its own
//!   intervals, and one that says it is stopping at once; a down server gets no requests.
//! * **Routing.** Among servers that are up, online, hold the title and are not excluded by
//!   the receiver (servers it found silent), the cheapest wins: its utilisation (measured
//!   throughput / capacity, or channel slots in use, whichever is higher), plus the cost of a
//!   new channel when the title is not looping there yet (one more loop to send; a receiver
//!   joining a running loop costs a multicast server nothing, so receivers of one title
//!   gather on one loop), plus a little for each new channel routed there since its last
//!   heartbeat (load it does not report yet), plus a penalty when its fastest tier is slower
//!   than the receiver's measured throughput. Ties go to the server routed to least.
//! * **Sites.** With `[[director.sites]]`, a receiver belongs to the site whose prefix is the
//!   longest match of its source address, a server to the site it is listed with. Servers of
//!   the receiver's own site are preferred (cheapest among them, as above); servers of other
//!   sites (or of none) serve it only when no server of its site can. No sites: as before.
//! * **Demand and placement.** A receiver asking for a title no server of its site holds is
//!   recorded for that site (whether another site served it or none could), with a count;
//!   [`Director::placement`] turns that, after the site's configured `preload` titles, into
//!   the list of titles to pre-load at the site (answered to admin addresses only).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::address_token::{AddressTokens, IpPrefix};
use crate::wire::control::{Control, Envelope, ErrorCode};
use crate::wire::director::{
    is_director_msg, is_heartbeat, DirectorMsg, Heartbeat, HeartbeatError, NoRoute, ServerState,
    SitePolicy, MAX_TITLE,
};

/// Director parameters (from `conf/director.toml`).
#[derive(Clone, Debug)]
pub struct Params {
    /// The heartbeat key of servers not listed in `server_keys` (`None`: only listed
    /// servers are heard). Every server holding it can speak for every other such server.
    pub key: Option<[u8; 32]>,
    /// Each listed server's own heartbeat key, by the control address its heartbeats carry:
    /// a heartbeat naming that address verifies under that key only, so a server that is
    /// compromised cannot mark the others stopping or pull their receivers to itself.
    pub server_keys: BTreeMap<SocketAddr, [u8; 32]>,
    /// Listed servers (`server_keys`) whose heartbeats may come from any source address
    /// (behind NAT, or sending from another interface than the one they advertise). Every
    /// other listed server's heartbeats count only from the IP address they name.
    pub any_source: BTreeSet<SocketAddr>,
    /// A server is down after this many of its heartbeat intervals without one.
    pub down_after: u32,
    /// Heartbeats whose timestamp is further than this from the director's clock are refused.
    pub max_skew: Duration,
    /// Secret for address tokens (random per start, drawn by the driver).
    pub token_secret: [u8; 32],
    /// Source addresses whose stats requests are answered.
    pub admin: Vec<IpPrefix>,
    /// Sites (`[[director.sites]]`): empty, routing ignores where receivers are.
    pub sites: Vec<Site>,
    /// The site of each listed server (an index into `sites`); servers not here are of none.
    pub server_sites: BTreeMap<SocketAddr, usize>,
}

/// One site (`[[director.sites]]`): its receivers' address ranges, the titles to keep there,
/// and what its receivers do without multicast.
#[derive(Clone, Debug, Default)]
pub struct Site {
    pub name: String,
    pub prefixes: Vec<IpPrefix>,
    /// Titles its servers should hold whatever is asked for (placed first).
    pub preload: Vec<String>,
    /// Its policy without multicast and its HTTP mirrors (`policy.site` is `name`).
    pub policy: SitePolicy,
}

/// Titles recorded as wanted but unplaced, per site; more are counted as dropped.
pub const MAX_DEMAND_TITLES: usize = 1024;
/// Unplaced titles listed in stats (the most requested; `placement` gives the site's list).
const MAX_STATS_UNPLACED_PER_SITE: usize = 10;
const MAX_STATS_UNPLACED: usize = 50;

/// Load added per new channel routed to a server since its last heartbeat.
const ROUTED_COST: f64 = 0.02;
/// Cost of opening a channel (the title is not looping there yet).
const NEW_CHANNEL_COST: f64 = 0.1;
/// A title routed to a server counts as looping there for this many of its intervals (until
/// its heartbeats show the channel).
const ROUTED_LOOPING_INTERVALS: u32 = 3;
/// Cost of a server whose fastest tier is slower than the receiver can take.
const SLOW_TIER_COST: f64 = 0.5;

/// What became of a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Malformed,
    /// MAC does not verify: forged, or signed with another key.
    Forged,
    /// Not newer than the last accepted heartbeat of that server.
    Replayed,
    /// Timestamp outside the window.
    Stale,
    /// Authenticated under a listed server's own key, but sent from another IP address than
    /// the one that server is listed (and names itself) with.
    WrongSource,
}

/// Things an operator wants in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    ServerUp {
        server: SocketAddr,
        state: ServerState,
    },
    ServerDown {
        server: SocketAddr,
        why: &'static str,
    },
    StateChanged {
        server: SocketAddr,
        from: ServerState,
        to: ServerState,
    },
    Rejected {
        from: SocketAddr,
        verdict: Verdict,
    },
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub heartbeats_accepted: u64,
    pub heartbeats_malformed: u64,
    pub heartbeats_forged: u64,
    pub heartbeats_replayed: u64,
    pub heartbeats_stale: u64,
    /// Heartbeats under a listed server's own key from another source address (refused).
    pub heartbeats_wrong_source: u64,
    pub routes_ok: u64,
    pub routes_not_found: u64,
    pub routes_no_healthy: u64,
    pub routes_busy: u64,
    pub joins_redirected: u64,
    pub requests_malformed: u64,
    /// Requests needing a proven address without a valid token: answered with a Retry, or
    /// dropped when even that would be larger than the request.
    pub retries_sent: u64,
    pub unvalidated_dropped: u64,
    /// Stats requests from outside `[director] admin`.
    pub stats_refused: u64,
    pub servers_marked_down: u64,
    /// Requests for a title no server of the receiver's site holds (see `unplaced`).
    pub requests_unplaced: u64,
    /// Unplaced titles not recorded: their site's list was full.
    pub unplaced_dropped: u64,
    /// Placement requests answered, and refused (not from `[director] admin`, unknown site).
    pub placements: u64,
    pub placements_refused: u64,
}

struct Entry {
    hb: Heartbeat,
    last_seen: Instant,
    up: bool,
    /// New channels routed here since its last heartbeat (load it does not report yet).
    routed_since: u64,
    routed_total: u64,
    /// Titles routed here recently: looping there by the time a receiver joins.
    routed_titles: BTreeMap<String, Instant>,
}

impl Entry {
    fn down_at(&self, p: &Params) -> Instant {
        self.last_seen + Duration::from_millis(self.hb.interval_ms as u64) * p.down_after
    }

    /// `None` if it does not hold `title`, else whether a loop of it runs (or is about to).
    /// Every server "holds" the empty title: `mcast-recv catalog --director` asks for any
    /// healthy server that way (and opens no loop there).
    fn holds(&self, title: &str, now: Instant) -> Option<bool> {
        if title.is_empty() {
            return Some(true);
        }
        let routed = self.routed_titles.get(title).is_some_and(|t| {
            now < *t + Duration::from_millis(self.hb.interval_ms as u64) * ROUTED_LOOPING_INTERVALS
        });
        self.hb
            .titles
            .iter()
            .find(|t| t.title == title)
            .map(|t| t.looping || routed)
    }

    fn score(&self, looping: bool, rx_bps: u64) -> f64 {
        let h = &self.hb;
        let thr = if h.capacity_bps > 0 {
            h.throughput_bps as f64 / h.capacity_bps as f64
        } else {
            0.0
        };
        let slots = if h.channel_slots > 0 {
            h.channels as f64 / h.channel_slots as f64
        } else {
            1.0
        };
        let mut s = thr.max(slots) + ROUTED_COST * self.routed_since as f64;
        if !looping {
            s += NEW_CHANNEL_COST;
        }
        if rx_bps > 0 && h.max_tier_bps > 0 && h.max_tier_bps < rx_bps {
            s += SLOW_TIER_COST;
        }
        s
    }
}

/// One server as `stats` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ServerStats {
    pub server: String,
    pub up: bool,
    pub state: ServerState,
    pub boot_id: String,
    pub seq: u64,
    pub last_heard_ms: u64,
    pub titles: usize,
    pub channels: u32,
    pub channel_slots: u32,
    pub receivers: u32,
    pub throughput_bps: u64,
    pub capacity_bps: u64,
    pub routed: u64,
}

/// A title a site's receivers asked for that no server of the site holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unplaced {
    pub site: String,
    pub title: String,
    pub requests: u64,
}

/// One site as `stats` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteStats {
    pub site: String,
    /// Its listed servers that are up.
    pub servers_up: u32,
    /// Titles its receivers asked for that none of its servers holds, and their requests.
    pub unplaced_titles: u64,
    pub unplaced_requests: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub counters: Counters,
    pub servers: Vec<ServerStats>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteStats>,
    /// The most requested unplaced titles of each site (at most 10 per site, 50 in all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unplaced: Vec<Unplaced>,
}

pub struct Director {
    params: Params,
    servers: BTreeMap<SocketAddr, Entry>,
    counters: Counters,
    events: VecDeque<Event>,
    /// Made at the first datagram (its `now` is the tokens' clock origin).
    tokens: Option<AddressTokens>,
    /// Per site (index of `params.sites`): titles asked for there that no server of the site
    /// held, with request counts (at most [`MAX_DEMAND_TITLES`] per site).
    demand: Vec<BTreeMap<String, u64>>,
}

impl Director {
    pub fn new(params: Params) -> Director {
        Director {
            servers: BTreeMap::new(),
            counters: Counters::default(),
            events: VecDeque::new(),
            tokens: None,
            demand: vec![BTreeMap::new(); params.sites.len()],
            params,
        }
    }

    /// The site of a receiver at `ip`: the one with the longest prefix containing it.
    pub fn site_of(&self, ip: IpAddr) -> Option<usize> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.params
            .sites
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.prefixes.iter().map(move |p| (i, p)))
            .filter(|(_, p)| p.contains(ip))
            .max_by_key(|(_, p)| p.network().1)
            .map(|(i, _)| i)
    }

    /// The configured sites (for metrics).
    pub fn sites(&self) -> &[Site] {
        &self.params.sites
    }

    /// Whether a server of site `site` holds `title` (in its last heartbeat, up or not).
    fn site_holds(&self, site: usize, title: &str) -> bool {
        self.servers.iter().any(|(a, e)| {
            self.params.server_sites.get(a) == Some(&site)
                && e.hb.titles.iter().any(|t| t.title == title)
        })
    }

    /// Record a request of site `site` for `title`, which no server of the site holds.
    fn record_demand(&mut self, site: usize, title: &str) {
        self.counters.requests_unplaced += 1;
        if self.demand[site].len() >= MAX_DEMAND_TITLES && !self.demand[site].contains_key(title) {
            // Full: forget titles the site holds by now, then refuse the newcomer.
            let held: Vec<String> = self.demand[site]
                .keys()
                .filter(|t| self.site_holds(site, t))
                .cloned()
                .collect();
            for t in held {
                self.demand[site].remove(&t);
            }
            if self.demand[site].len() >= MAX_DEMAND_TITLES {
                self.counters.unplaced_dropped += 1;
                return;
            }
        }
        let title = crate::wire::director::cut(title, MAX_TITLE).to_string();
        *self.demand[site].entry(title).or_insert(0) += 1;
    }

    /// Unplaced titles of site `site` (not held there now), most requested first.
    pub fn unplaced(&self, site: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.demand[site]
            .iter()
            .filter(|(t, _)| !self.site_holds(site, t))
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The titles to pre-load at site `site`: its `preload` titles none of its servers holds,
    /// then its unplaced requested titles, most requested first; no title twice; cut to what
    /// one [`DirectorMsg::Placement`] carries.
    pub fn placement(&self, site: usize) -> Vec<String> {
        let s = &self.params.sites[site];
        let mut out: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        let preload = s
            .preload
            .iter()
            .filter(|t| !self.site_holds(site, t))
            .cloned();
        let asked = self.unplaced(site).into_iter().map(|(t, _)| t);
        for t in preload.chain(asked) {
            if seen.insert(t.clone()) {
                out.push(t);
            }
        }
        out.truncate(DirectorMsg::placement_fits(&s.name, &out));
        out
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Servers currently up (and their state).
    pub fn up_servers(&self) -> Vec<(SocketAddr, ServerState)> {
        self.servers
            .iter()
            .filter(|(_, e)| e.up)
            .map(|(a, e)| (*a, e.hb.state))
            .collect()
    }

    fn reject(&mut self, from: SocketAddr, verdict: Verdict) -> Verdict {
        match verdict {
            Verdict::Malformed => self.counters.heartbeats_malformed += 1,
            Verdict::Forged => self.counters.heartbeats_forged += 1,
            Verdict::Replayed => self.counters.heartbeats_replayed += 1,
            Verdict::Stale => self.counters.heartbeats_stale += 1,
            Verdict::WrongSource => self.counters.heartbeats_wrong_source += 1,
            Verdict::Accepted => unreachable!("not a rejection"),
        }
        self.events.push_back(Event::Rejected { from, verdict });
        verdict
    }

    /// A heartbeat datagram arrived from `from`; `unix_ms` is the director's wall clock.
    pub fn handle_heartbeat(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        buf: &[u8],
    ) -> Verdict {
        // The key of the server the heartbeat names (read before the MAC is checked: it only
        // chooses the key, and a heartbeat that lies about it fails that key's MAC).
        let named = crate::wire::director::heartbeat_server(buf);
        let own = named.and_then(|a| self.params.server_keys.get(&a).map(|k| (a, k)));
        let (key, bound) = match own {
            Some((a, k)) => (k, (!self.params.any_source.contains(&a)).then_some(a.ip())),
            None => match &self.params.key {
                Some(k) => (k, None),
                None if named.is_none() => return self.reject(from, Verdict::Malformed),
                None => return self.reject(from, Verdict::Forged),
            },
        };
        let hb = match Heartbeat::open(buf, key) {
            Ok(hb) => hb,
            Err(HeartbeatError::Malformed(_)) => return self.reject(from, Verdict::Malformed),
            Err(HeartbeatError::BadMac) => return self.reject(from, Verdict::Forged),
        };
        // Genuine, but is it from the server's own address? (Checked after the MAC, so this
        // counts only heartbeats its key wrote: a misconfiguration or a captured key.)
        if bound.is_some_and(|ip| plain_ip(from) != ip) {
            return self.reject(from, Verdict::WrongSource);
        }
        if hb.unix_ms.abs_diff(unix_ms) > self.params.max_skew.as_millis() as u64 {
            return self.reject(from, Verdict::Stale);
        }
        if let Some(e) = self.servers.get(&hb.server) {
            let newer = if hb.boot_id == e.hb.boot_id {
                hb.seq > e.hb.seq
            } else {
                hb.unix_ms > e.hb.unix_ms
            };
            if !newer {
                return self.reject(from, Verdict::Replayed);
            }
        }
        self.counters.heartbeats_accepted += 1;
        let addr = hb.server;
        let stopping = hb.state == ServerState::Stopping;
        match self.servers.get_mut(&addr) {
            Some(e) => {
                if e.hb.state != hb.state {
                    self.events.push_back(Event::StateChanged {
                        server: addr,
                        from: e.hb.state,
                        to: hb.state,
                    });
                }
                let was_up = e.up;
                e.hb = hb;
                e.last_seen = now;
                e.routed_since = 0;
                if stopping {
                    if was_up {
                        e.up = false;
                        self.counters.servers_marked_down += 1;
                        self.events.push_back(Event::ServerDown {
                            server: addr,
                            why: "stopping",
                        });
                    }
                } else if !was_up {
                    e.up = true;
                    self.events.push_back(Event::ServerUp {
                        server: addr,
                        state: e.hb.state,
                    });
                }
            }
            None => {
                let state = hb.state;
                self.servers.insert(
                    addr,
                    Entry {
                        hb,
                        last_seen: now,
                        up: !stopping,
                        routed_since: 0,
                        routed_total: 0,
                        routed_titles: BTreeMap::new(),
                    },
                );
                if !stopping {
                    self.events.push_back(Event::ServerUp {
                        server: addr,
                        state,
                    });
                }
            }
        }
        Verdict::Accepted
    }

    /// Mark servers down whose heartbeats stopped.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (addr, e) in self.servers.iter_mut() {
            if e.up && now >= e.down_at(&self.params) {
                e.up = false;
                self.counters.servers_marked_down += 1;
                self.events.push_back(Event::ServerDown {
                    server: *addr,
                    why: "heartbeats stopped",
                });
            }
        }
    }

    /// When a server that is up would next be marked down.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.servers
            .values()
            .filter(|e| e.up)
            .map(|e| e.down_at(&self.params))
            .min()
    }

    /// Pick a server for `title` for a receiver of no site (see the module docs).
    pub fn route(
        &mut self,
        now: Instant,
        title: &str,
        rx_bps: u64,
        exclude: &[SocketAddr],
    ) -> Result<SocketAddr, (NoRoute, String)> {
        self.route_from(now, None, title, rx_bps, exclude)
    }

    /// Pick a server for `title` for a receiver at `receiver` (its source address; `None`:
    /// of no site): one of its own site if any can serve, else any (see the module docs). A
    /// first request (`exclude` empty: not a fail-over) for a title its site holds nowhere is
    /// recorded.
    pub fn route_from(
        &mut self,
        now: Instant,
        receiver: Option<IpAddr>,
        title: &str,
        rx_bps: u64,
        exclude: &[SocketAddr],
    ) -> Result<SocketAddr, (NoRoute, String)> {
        self.handle_timeout(now);
        let site = receiver.and_then(|ip| self.site_of(ip));
        if let Some(s) = site {
            if !title.is_empty() && exclude.is_empty() && !self.site_holds(s, title) {
                self.record_demand(s, title);
            }
        }
        let server_sites = &self.params.server_sites;
        let holders: Vec<(&SocketAddr, &Entry, bool)> = self
            .servers
            .iter()
            .filter_map(|(a, e)| e.holds(title, now).map(|l| (a, e, l)))
            .collect();
        if holders.is_empty() {
            self.counters.routes_not_found += 1;
            return Err((
                NoRoute::NotFound,
                match title {
                    "" => "this director has heard no server yet".to_string(),
                    t => format!("no server known to this director holds {t:?}"),
                },
            ));
        }
        let usable: Vec<&(&SocketAddr, &Entry, bool)> = holders
            .iter()
            .filter(|(a, e, _)| e.up && !exclude.contains(a))
            .collect();
        let online: Vec<&&(&SocketAddr, &Entry, bool)> = usable
            .iter()
            .filter(|(_, e, _)| e.hb.state == ServerState::Online)
            .collect();
        // The receiver's own site first, when one of its servers can serve.
        let local = |a: &SocketAddr| site.is_some() && server_sites.get(a) == site.as_ref();
        let prefer_local = online.iter().any(|(a, _, _)| local(a));
        let best = online
            .iter()
            .filter(|(a, _, _)| !prefer_local || local(a))
            .map(|(a, e, l)| (e.score(*l, rx_bps), e.routed_total, **a, *l))
            .min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)))
            .map(|(_, _, a, looping)| (a, looping));
        match best {
            Some((addr, looping)) => {
                let e = self.servers.get_mut(&addr).expect("listed");
                if !looping {
                    e.routed_since += 1;
                }
                e.routed_total += 1;
                e.routed_titles
                    .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(60));
                if !title.is_empty() {
                    e.routed_titles.insert(title.to_string(), now);
                }
                self.counters.routes_ok += 1;
                Ok(addr)
            }
            None if usable
                .iter()
                .any(|(_, e, _)| e.hb.state == ServerState::Overloaded) =>
            {
                self.counters.routes_busy += 1;
                Err((
                    NoRoute::Busy,
                    format!("every server holding {title:?} is overloaded; retry later"),
                ))
            }
            None => {
                self.counters.routes_no_healthy += 1;
                let n = holders.len();
                Err((
                    NoRoute::NoHealthyServer,
                    format!(
                        "{n} server(s) hold {title:?}, but none is up and online (down, draining or excluded)"
                    ),
                ))
            }
        }
    }

    /// Any datagram on the director's port: a heartbeat (no reply), a route request, or a plain
    /// control request (stats; a join is answered with a redirect to the server it would be
    /// routed to). Returns the reply to send back to `from`, if any.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        buf: &[u8],
    ) -> Option<Vec<u8>> {
        if is_heartbeat(buf) {
            self.handle_heartbeat(now, unix_ms, from, buf);
            return None;
        }
        if is_director_msg(buf) {
            let site = self.site_of(from.ip());
            let reply = match DirectorMsg::decode(buf) {
                Ok(DirectorMsg::PlacementRequest {
                    req_id,
                    site: name,
                    token,
                }) => return self.placement_reply(now, from, buf.len(), req_id, &name, token),
                Ok(DirectorMsg::SiteRouteRequest {
                    req_id,
                    title,
                    rx_bps,
                    exclude,
                }) => match self.route_from(now, Some(from.ip()), &title, rx_bps, &exclude) {
                    Ok(server) => DirectorMsg::SiteRouteOk {
                        req_id,
                        title,
                        server,
                        policy: site
                            .map(|s| self.params.sites[s].policy.clone())
                            .unwrap_or_default(),
                    },
                    Err((reason, message)) => DirectorMsg::RouteNone {
                        req_id,
                        title,
                        reason,
                        message,
                    },
                },
                Ok(DirectorMsg::RouteRequest {
                    req_id,
                    title,
                    rx_bps,
                    exclude,
                }) => match self.route_from(now, Some(from.ip()), &title, rx_bps, &exclude) {
                    Ok(server) => DirectorMsg::RouteOk {
                        req_id,
                        title,
                        server,
                    },
                    Err((reason, message)) => DirectorMsg::RouteNone {
                        req_id,
                        title,
                        reason,
                        message,
                    },
                },
                _ => {
                    self.counters.requests_malformed += 1;
                    return None;
                }
            };
            // A route request proves no address: its answer is never larger than it is (an
            // answer is its title plus an address, or a reason whose text is cut to fit).
            let fitted = fit_route_reply(reply, buf.len());
            if fitted.is_none() {
                self.counters.unvalidated_dropped += 1;
            }
            return fitted;
        }
        let env = match Envelope::decode(buf) {
            Ok(e) => e,
            Err(_) => {
                self.counters.requests_malformed += 1;
                return None;
            }
        };
        let tokens = self
            .tokens
            .get_or_insert_with(|| AddressTokens::new(&self.params.token_secret, now));
        let proven = env.token.is_some_and(|t| tokens.check(from.ip(), &t, now));
        if !proven {
            let token = tokens.issue(from.ip(), now);
            let retry = Envelope::new(env.receiver_id, env.req_id, Control::Retry { token });
            let bytes = retry.encode();
            if !env.msg.needs_token() || bytes.len() > buf.len() {
                self.counters.unvalidated_dropped += 1;
                return None;
            }
            self.counters.retries_sent += 1;
            return Some(bytes);
        }
        let reply = match &env.msg {
            Control::StatsRequest if !self.params.admin.iter().any(|p| p.contains(from.ip())) => {
                self.counters.stats_refused += 1;
                Control::Error {
                    code: ErrorCode::BadRequest,
                    message: "stats are answered only to [director] admin addresses".into(),
                }
            }
            Control::StatsRequest => Control::StatsReply {
                json: serde_json::to_string(&self.stats(now)).unwrap_or_default(),
            },
            Control::Join { title } => {
                let redirect = self.route(now, title, 0, &[]).ok();
                if redirect.is_some() {
                    self.counters.joins_redirected += 1;
                }
                Control::NotHere {
                    title: title.clone(),
                    redirect,
                }
            }
            _ => {
                self.counters.requests_malformed += 1;
                return None;
            }
        };
        Some(Envelope::new(env.receiver_id, env.req_id, reply).encode())
    }

    /// A placement request: answered to proven admin addresses only (a Retry with a token
    /// first; the Retry and a refusal are smaller than the request, the list may be larger).
    fn placement_reply(
        &mut self,
        now: Instant,
        from: SocketAddr,
        len: usize,
        req_id: u32,
        name: &str,
        token: Option<crate::address_token::AddressToken>,
    ) -> Option<Vec<u8>> {
        let tokens = self
            .tokens
            .get_or_insert_with(|| AddressTokens::new(&self.params.token_secret, now));
        if !token.is_some_and(|t| tokens.check(from.ip(), &t, now)) {
            let token = tokens.issue(from.ip(), now);
            let retry = DirectorMsg::PlacementRetry { req_id, token }.encode();
            if retry.len() > len {
                self.counters.unvalidated_dropped += 1;
                return None;
            }
            self.counters.retries_sent += 1;
            return Some(retry);
        }
        let site = self.params.sites.iter().position(|s| s.name == name);
        let reply = if !self.params.admin.iter().any(|p| p.contains(from.ip())) {
            self.counters.placements_refused += 1;
            DirectorMsg::PlacementRefused {
                req_id,
                message: "placement is answered only to [director] admin addresses".into(),
            }
        } else if let Some(s) = site {
            self.counters.placements += 1;
            DirectorMsg::Placement {
                req_id,
                site: name.to_string(),
                titles: self.placement(s),
            }
        } else {
            self.counters.placements_refused += 1;
            let known: Vec<&str> = self.params.sites.iter().map(|s| s.name.as_str()).collect();
            DirectorMsg::PlacementRefused {
                req_id,
                message: match known.is_empty() {
                    true => "this director has no [[director.sites]]".to_string(),
                    false => format!(
                        "no site {:?} at this director (sites: {})",
                        crate::wire::director::cut(name, 64),
                        known.join(", ")
                    ),
                },
            }
        };
        Some(reply.encode())
    }

    pub fn stats(&self, now: Instant) -> Stats {
        let mut unplaced = Vec::new();
        let mut sites = Vec::new();
        for (i, s) in self.params.sites.iter().enumerate() {
            let all = self.unplaced(i);
            sites.push(SiteStats {
                site: s.name.clone(),
                servers_up: self
                    .servers
                    .iter()
                    .filter(|(a, e)| e.up && self.params.server_sites.get(a) == Some(&i))
                    .count() as u32,
                unplaced_titles: all.len() as u64,
                unplaced_requests: all.iter().map(|(_, n)| n).sum(),
            });
            for (title, requests) in all.into_iter().take(MAX_STATS_UNPLACED_PER_SITE) {
                if unplaced.len() < MAX_STATS_UNPLACED {
                    unplaced.push(Unplaced {
                        site: s.name.clone(),
                        title,
                        requests,
                    });
                }
            }
        }
        Stats {
            unplaced,
            sites,
            counters: self.counters.clone(),
            servers: self
                .servers
                .iter()
                .map(|(a, e)| ServerStats {
                    server: a.to_string(),
                    up: e.up,
                    state: e.hb.state,
                    boot_id: format!("{:016x}", e.hb.boot_id),
                    seq: e.hb.seq,
                    last_heard_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
                    titles: e.hb.titles.len(),
                    channels: e.hb.channels,
                    channel_slots: e.hb.channel_slots,
                    receivers: e.hb.receivers,
                    throughput_bps: e.hb.throughput_bps,
                    capacity_bps: e.hb.capacity_bps,
                    routed: e.routed_total,
                })
                .collect(),
        }
    }
}

/// A route reply encoded no larger than `cap` (its request's length): a refusal's message is
/// cut to fit, at a character boundary; `None` if even that cannot fit.
fn fit_route_reply(reply: DirectorMsg, cap: usize) -> Option<Vec<u8>> {
    let bytes = reply.encode();
    if bytes.len() <= cap {
        return Some(bytes);
    }
    if let DirectorMsg::SiteRouteOk {
        req_id,
        title,
        server,
        mut policy,
    } = reply
    {
        // Never sent by a receiver of ours (its request is padded past any answer): mirrors
        // are left out until the answer fits.
        policy.http.pop()?;
        return fit_route_reply(
            DirectorMsg::SiteRouteOk {
                req_id,
                title,
                server,
                policy,
            },
            cap,
        );
    }
    let DirectorMsg::RouteNone {
        req_id,
        title,
        reason,
        message,
    } = reply
    else {
        return None;
    };
    let over = bytes.len() - cap;
    let mut keep = message.len().checked_sub(over)?;
    while !message.is_char_boundary(keep) {
        keep -= 1;
    }
    Some(
        DirectorMsg::RouteNone {
            req_id,
            title,
            reason,
            message: message[..keep].to_string(),
        }
        .encode(),
    )
}

/// The address a datagram came from, an IPv4-mapped IPv6 source as the IPv4 address it is
/// (a director listening on `[::]` hears IPv4 servers that way).
fn plain_ip(from: SocketAddr) -> IpAddr {
    match from.ip() {
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::director::HeldTitle;

    const KEY: [u8; 32] = [42; 32];
    const T0: u64 = 1_700_000_000_000;

    fn params() -> Params {
        Params {
            key: Some(KEY),
            server_keys: BTreeMap::new(),
            any_source: BTreeSet::new(),
            down_after: 3,
            max_skew: Duration::from_secs(30),
            token_secret: [3; 32],
            admin: IpPrefix::loopback(),
            sites: Vec::new(),
            server_sites: BTreeMap::new(),
        }
    }

    /// A control request as a receiver makes it: without a token first (padded), then again
    /// with the token the Retry carried.
    fn ask(d: &mut Director, t: Instant, msg: Control) -> Control {
        let first = Envelope::new(5, 6, msg.clone()).encode_request();
        let r = d.handle_datagram(t, T0, from(), &first).expect("a Retry");
        assert!(r.len() <= first.len(), "a reply larger than its request");
        let Control::Retry { token } = Envelope::decode(&r).unwrap().msg else {
            panic!("not a Retry")
        };
        let again = Envelope::new(5, 7, msg).with_token(Some(token)).encode();
        Envelope::decode(&d.handle_datagram(t, T0, from(), &again).expect("an answer"))
            .unwrap()
            .msg
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 7600))
    }

    fn from() -> SocketAddr {
        "127.0.0.9:5000".parse().unwrap()
    }

    fn hb(n: u8, seq: u64, titles: &[&str]) -> Heartbeat {
        Heartbeat {
            server: addr(n),
            boot_id: n as u64,
            seq,
            unix_ms: T0 + seq * 500,
            interval_ms: 500,
            state: ServerState::Online,
            channels: 0,
            channel_slots: 32,
            receivers: 0,
            throughput_bps: 0,
            capacity_bps: 1_000_000_000,
            max_tier_bps: 200_000_000,
            titles: titles
                .iter()
                .map(|t| HeldTitle {
                    title: t.to_string(),
                    looping: false,
                })
                .collect(),
        }
    }

    fn feed(d: &mut Director, now: Instant, h: &Heartbeat) -> Verdict {
        d.handle_heartbeat(now, h.unix_ms, from(), &h.encode(&KEY))
    }

    fn route(d: &mut Director, now: Instant, title: &str) -> Result<SocketAddr, NoRoute> {
        d.route(now, title, 0, &[]).map_err(|e| e.0)
    }

    /// The empty title asks for any up and online server (the receiver's `catalog
    /// --director`): it is answered while any server is, opens no loop, and skips a server
    /// that is draining.
    #[test]
    fn the_empty_title_routes_to_any_online_server() {
        let t = Instant::now();
        let mut d = Director::new(params());
        assert_eq!(route(&mut d, t, ""), Err(NoRoute::NotFound));
        let mut draining = hb(1, 1, &["a"]);
        draining.state = ServerState::Draining;
        feed(&mut d, t, &draining);
        assert_eq!(route(&mut d, t, ""), Err(NoRoute::NoHealthyServer));
        feed(&mut d, t, &hb(2, 1, &[]));
        assert_eq!(route(&mut d, t, ""), Ok(addr(2)));
        assert!(d.servers[&addr(2)].routed_titles.is_empty());
        assert_eq!(d.servers[&addr(2)].routed_since, 0);
    }

    #[test]
    fn a_server_with_its_own_key_cannot_be_spoken_for_with_another() {
        let t = Instant::now();
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let mut p = params();
        p.key = None;
        p.server_keys = [(addr(1), ka), (addr(2), kb)].into_iter().collect();
        let mut d = Director::new(p);
        // Sent from the IP of the server they name (listed servers' heartbeats must be).
        let feed_with = |d: &mut Director, h: &Heartbeat, k: &[u8; 32]| {
            let src = SocketAddr::new(h.server.ip(), 40000);
            d.handle_heartbeat(t, h.unix_ms, src, &h.encode(k))
        };
        assert_eq!(feed_with(&mut d, &hb(1, 1, &["a"]), &ka), Verdict::Accepted);
        assert_eq!(feed_with(&mut d, &hb(2, 1, &["a"]), &kb), Verdict::Accepted);
        // Server 1, compromised, marks server 2 stopping with its own key, or with the key
        // every server shared before: refused.
        let mut lie = hb(2, 2, &["a"]);
        lie.state = ServerState::Stopping;
        assert_eq!(feed_with(&mut d, &lie, &ka), Verdict::Forged);
        assert_eq!(feed_with(&mut d, &lie, &KEY), Verdict::Forged);
        // A server nobody listed, with no shared key configured: not heard.
        assert_eq!(feed_with(&mut d, &hb(3, 1, &["a"]), &ka), Verdict::Forged);
        assert_eq!(d.up_servers().len(), 2);
        assert_eq!(d.counters().heartbeats_forged, 3);
        // With a shared key as well, unlisted servers use it; listed ones still need theirs.
        let mut p = params();
        p.server_keys = [(addr(2), kb)].into_iter().collect();
        let mut d = Director::new(p);
        assert_eq!(
            feed_with(&mut d, &hb(1, 1, &["a"]), &KEY),
            Verdict::Accepted
        );
        assert_eq!(feed_with(&mut d, &hb(2, 1, &["a"]), &KEY), Verdict::Forged);
        assert_eq!(feed_with(&mut d, &hb(2, 1, &["a"]), &kb), Verdict::Accepted);
    }

    /// A listed server's heartbeat, even under its own key, counts only from the IP address
    /// it is listed with: one from elsewhere (a captured key, a replay re-sent from another
    /// host) is refused (`heartbeats_wrong_source`) and changes no route; the same from the
    /// right IP (any port, or IPv4-mapped on a `[::]` socket) does. `any_source` lifts the
    /// binding for a server behind NAT.
    #[test]
    fn a_listed_servers_heartbeat_counts_only_from_its_own_address() {
        let t = Instant::now();
        let kb = [2u8; 32];
        let mut p = params();
        p.key = None;
        p.server_keys = [(addr(1), [1u8; 32]), (addr(2), kb)].into_iter().collect();
        let at = |ip: &str| -> SocketAddr { format!("{ip}:40000").parse().unwrap() };
        let mut d = Director::new(p.clone());
        let send = |d: &mut Director, src: SocketAddr, h: &Heartbeat| {
            d.handle_heartbeat(t, h.unix_ms, src, &h.encode(&kb))
        };
        assert_eq!(
            send(&mut d, at("127.0.0.2"), &hb(2, 1, &["a"])),
            Verdict::Accepted
        );
        assert_eq!(route(&mut d, t, "b"), Err(NoRoute::NotFound));
        // From another host on the network, under server 2's own key: "I now hold b", then
        // "I am stopping". Neither is taken.
        let mut stopping = hb(2, 3, &["a", "b"]);
        stopping.state = ServerState::Stopping;
        for (seq, h) in [(2, hb(2, 2, &["a", "b"])), (3, stopping.clone())] {
            assert_eq!(
                send(&mut d, at("127.0.0.66"), &h),
                Verdict::WrongSource,
                "{seq}"
            );
        }
        assert_eq!(d.counters().heartbeats_wrong_source, 2);
        assert_eq!(d.counters().heartbeats_accepted, 1);
        assert!(matches!(
            d.events.back(),
            Some(Event::Rejected { from, verdict: Verdict::WrongSource }) if *from == at("127.0.0.66")
        ));
        assert_eq!(route(&mut d, t, "b"), Err(NoRoute::NotFound));
        assert_eq!(route(&mut d, t, "a"), Ok(addr(2)));
        assert_eq!(d.up_servers(), vec![(addr(2), ServerState::Online)]);
        // The same heartbeat from server 2's own IP (another port: any socket of the host)
        // is taken, and routes follow it; so is one from an IPv4-mapped source.
        let own_port = SocketAddr::new(addr(2).ip(), 51234);
        assert_eq!(
            send(&mut d, own_port, &hb(2, 2, &["a", "b"])),
            Verdict::Accepted
        );
        assert_eq!(route(&mut d, t, "b"), Ok(addr(2)));
        let mapped: SocketAddr = "[::ffff:127.0.0.2]:40000".parse().unwrap();
        assert_eq!(send(&mut d, mapped, &stopping), Verdict::Accepted);
        assert_eq!(route(&mut d, t, "a"), Err(NoRoute::NoHealthyServer));
        assert_eq!(d.counters().heartbeats_wrong_source, 2);

        // Server 2 behind NAT: the operator allowed any source for it (and only for it).
        p.any_source = [addr(2)].into_iter().collect();
        let mut d = Director::new(p);
        assert_eq!(
            send(&mut d, at("10.9.8.7"), &hb(2, 1, &["b"])),
            Verdict::Accepted
        );
        assert_eq!(route(&mut d, t, "b"), Ok(addr(2)));
        let h1 = hb(1, 1, &["a"]);
        assert_eq!(
            d.handle_heartbeat(t, h1.unix_ms, at("10.9.8.7"), &h1.encode(&[1u8; 32])),
            Verdict::WrongSource
        );
    }

    /// Servers and directors over IPv6: a heartbeat naming an IPv6 server counts from that
    /// server's address only, and routes name it.
    #[test]
    fn an_ipv6_server_is_heard_from_its_own_address_and_routed_to() {
        let t = Instant::now();
        let k6 = [6u8; 32];
        let v6: SocketAddr = "[2001:db8::5]:7600".parse().unwrap();
        let mut p = params();
        p.key = None;
        p.server_keys = [(v6, k6)].into_iter().collect();
        let mut d = Director::new(p);
        let mut h = hb(1, 1, &["a"]);
        h.server = v6;
        let send = |d: &mut Director, src: &str, h: &Heartbeat| {
            d.handle_heartbeat(t, h.unix_ms, src.parse().unwrap(), &h.encode(&k6))
        };
        assert_eq!(
            send(&mut d, "[2001:db8::66]:40000", &h),
            Verdict::WrongSource
        );
        assert_eq!(route(&mut d, t, "a"), Err(NoRoute::NotFound));
        assert_eq!(send(&mut d, "[2001:db8::5]:40000", &h), Verdict::Accepted);
        assert_eq!(route(&mut d, t, "a"), Ok(v6));
        assert_eq!(d.up_servers(), vec![(v6, ServerState::Online)]);
    }

    #[test]
    fn routes_only_to_servers_holding_the_title() {
        let t = Instant::now();
        let mut d = Director::new(params());
        assert_eq!(feed(&mut d, t, &hb(1, 1, &["a"])), Verdict::Accepted);
        assert_eq!(feed(&mut d, t, &hb(2, 1, &["a", "b"])), Verdict::Accepted);
        for _ in 0..5 {
            assert_eq!(route(&mut d, t, "b"), Ok(addr(2)));
        }
        assert_eq!(route(&mut d, t, "zzz"), Err(NoRoute::NotFound));
        assert_eq!(d.counters().routes_not_found, 1);
        // Redirect: a plain join at the director gets NotHere with the server to use.
        assert_eq!(
            ask(&mut d, t, Control::Join { title: "b".into() }),
            Control::NotHere {
                title: "b".into(),
                redirect: Some(addr(2))
            }
        );
    }

    #[test]
    fn silent_server_is_marked_down_after_n_intervals_and_gets_nothing() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Director::new(params());
        feed(&mut d, t, &hb(1, 1, &["a"]));
        feed(&mut d, t, &hb(2, 1, &["a"]));
        // Server 2 keeps beating, server 1 stops.
        for i in 2..=4u64 {
            feed(&mut d, t + ms(500 * (i - 1)), &hb(2, i, &["a"]));
        }
        assert_eq!(
            d.poll_timeout(),
            Some(t + ms(1500)),
            "server 1 is due first"
        );
        d.handle_timeout(t + ms(1499));
        assert_eq!(d.up_servers().len(), 2, "not down before 3 intervals");
        d.handle_timeout(t + ms(1500));
        assert_eq!(d.up_servers(), vec![(addr(2), ServerState::Online)]);
        assert_eq!(d.counters().servers_marked_down, 1);
        let ev: Vec<Event> = std::iter::from_fn(|| d.poll_event()).collect();
        assert!(ev.contains(&Event::ServerDown {
            server: addr(1),
            why: "heartbeats stopped"
        }));
        for _ in 0..10 {
            assert_eq!(route(&mut d, t + ms(1600), "a"), Ok(addr(2)));
        }
        // Only a down server holds "b": no healthy server, not "not found".
        let mut h = hb(1, 1, &["b"]);
        h.boot_id = 99;
        h.unix_ms = T0 + 10;
        let mut d2 = Director::new(params());
        feed(&mut d2, t, &h);
        assert_eq!(
            route(&mut d2, t + ms(1500), "b"),
            Err(NoRoute::NoHealthyServer)
        );
        // It comes back when its heartbeats do.
        h.seq = 2;
        feed(&mut d2, t + ms(2000), &h);
        assert_eq!(route(&mut d2, t + ms(2000), "b"), Ok(addr(1)));
    }

    #[test]
    fn draining_overloaded_and_stopping_servers_get_no_new_requests() {
        let t = Instant::now();
        let mut d = Director::new(params());
        let mut a = hb(1, 1, &["x"]);
        a.state = ServerState::Draining;
        feed(&mut d, t, &a);
        assert_eq!(route(&mut d, t, "x"), Err(NoRoute::NoHealthyServer));
        let mut b = hb(2, 1, &["x"]);
        b.state = ServerState::Overloaded;
        feed(&mut d, t, &b);
        assert_eq!(route(&mut d, t, "x"), Err(NoRoute::Busy));
        let c = hb(3, 1, &["x"]);
        feed(&mut d, t, &c);
        assert_eq!(route(&mut d, t, "x"), Ok(addr(3)));
        // Stopping: down at once, no waiting for missed intervals.
        let mut c2 = hb(3, 2, &["x"]);
        c2.state = ServerState::Stopping;
        feed(&mut d, t, &c2);
        assert_eq!(route(&mut d, t, "x"), Err(NoRoute::Busy));
        assert_eq!(d.counters().servers_marked_down, 1);
        // Draining back to online.
        a.seq = 2;
        a.unix_ms += 500;
        a.state = ServerState::Online;
        feed(&mut d, t, &a);
        assert_eq!(route(&mut d, t, "x"), Ok(addr(1)));
        let ev: Vec<Event> = std::iter::from_fn(|| d.poll_event()).collect();
        assert!(ev.contains(&Event::StateChanged {
            server: addr(1),
            from: ServerState::Draining,
            to: ServerState::Online
        }));
    }

    #[test]
    fn load_throughput_looping_and_tier_are_weighed() {
        let t = Instant::now();
        let mut d = Director::new(params());
        let mut busy = hb(1, 1, &["a"]);
        busy.throughput_bps = 800_000_000; // 80 % of capacity
        let mut idle = hb(2, 1, &["a"]);
        idle.throughput_bps = 100_000_000; // 10 %
        feed(&mut d, t, &busy);
        feed(&mut d, t, &idle);
        assert_eq!(route(&mut d, t, "a"), Ok(addr(2)));
        // Channel slots count as load too.
        let mut slots = hb(2, 2, &["a"]);
        slots.channels = 31;
        feed(&mut d, t, &slots);
        assert_eq!(route(&mut d, t, "a"), Ok(addr(1)));

        // Equal load: the server already looping the title is cheaper.
        let mut d = Director::new(params());
        let mut l = hb(1, 1, &[]);
        l.titles = vec![HeldTitle {
            title: "a".into(),
            looping: true,
        }];
        feed(&mut d, t, &hb(2, 1, &["a"]));
        feed(&mut d, t, &l);
        assert_eq!(route(&mut d, t, "a"), Ok(addr(1)));

        // A fast receiver avoids a server whose fastest tier is slower than it.
        let mut d = Director::new(params());
        let mut slow = hb(1, 1, &["a"]);
        slow.max_tier_bps = 10_000_000;
        let mut fast = hb(2, 1, &["a"]);
        fast.throughput_bps = 300_000_000;
        feed(&mut d, t, &slow);
        feed(&mut d, t, &fast);
        assert_eq!(d.route(t, "a", 100_000_000, &[]).unwrap(), addr(2));
        assert_eq!(d.route(t, "a", 0, &[]).unwrap(), addr(1));
    }

    #[test]
    fn new_channels_spread_over_equal_servers_and_one_title_gathers_on_one_loop() {
        let t = Instant::now();
        let mut d = Director::new(params());
        let titles: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = titles.iter().map(|s| s.as_str()).collect();
        for n in 1..=3 {
            feed(&mut d, t, &hb(n, 1, &refs));
        }
        let mut count = BTreeMap::new();
        for title in &titles {
            *count.entry(route(&mut d, t, title).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            count.values().copied().collect::<Vec<_>>(),
            vec![10, 10, 10]
        );
        // Receivers of one title all go where its loop runs (or was just routed to).
        let first = route(&mut d, t, "t0").unwrap();
        for _ in 0..10 {
            assert_eq!(
                route(&mut d, t + Duration::from_millis(100), "t0"),
                Ok(first)
            );
        }
        // ... unless that server is excluded.
        let other = d.route(t, "t0", 0, &[first]).unwrap();
        assert_ne!(other, first);
    }

    #[test]
    fn exclusions_are_honoured() {
        let t = Instant::now();
        let mut d = Director::new(params());
        feed(&mut d, t, &hb(1, 1, &["a"]));
        feed(&mut d, t, &hb(2, 1, &["a"]));
        for _ in 0..4 {
            assert_eq!(d.route(t, "a", 0, &[addr(1)]).unwrap(), addr(2));
        }
        assert_eq!(
            d.route(t, "a", 0, &[addr(1), addr(2)]).map_err(|e| e.0),
            Err(NoRoute::NoHealthyServer)
        );
    }

    #[test]
    fn forged_replayed_stale_and_malformed_heartbeats_change_nothing() {
        let t = Instant::now();
        let mut d = Director::new(params());
        let genuine = hb(1, 5, &["a"]);
        assert_eq!(feed(&mut d, t, &genuine), Verdict::Accepted);

        // Forged: another key, claiming the server stopped and holds another title.
        let mut forged = hb(1, 6, &["b"]);
        forged.state = ServerState::Stopping;
        let b = forged.encode(&[0u8; 32]);
        assert_eq!(
            d.handle_heartbeat(t, forged.unix_ms, from(), &b),
            Verdict::Forged
        );
        // Tampered genuine bytes.
        let mut tampered = hb(1, 6, &["a"]).encode(&KEY);
        let n = tampered.len();
        tampered[n - 40] ^= 1;
        assert_eq!(
            d.handle_heartbeat(t, T0, from(), &tampered),
            Verdict::Forged
        );

        // Replayed: the same heartbeat again, and an older one.
        assert_eq!(feed(&mut d, t, &genuine), Verdict::Replayed);
        assert_eq!(feed(&mut d, t, &hb(1, 4, &["a"])), Verdict::Replayed);
        // Stale: outside the clock window.
        let old = hb(1, 9, &["a"]);
        assert_eq!(
            d.handle_heartbeat(t, old.unix_ms + 31_000, from(), &old.encode(&KEY)),
            Verdict::Stale
        );
        // Replay across a restart: a new boot must also be newer in time.
        let mut reboot = hb(1, 1, &["a"]);
        reboot.boot_id = 1234;
        reboot.unix_ms = genuine.unix_ms - 1;
        assert_eq!(feed(&mut d, t, &reboot), Verdict::Replayed);
        reboot.unix_ms = genuine.unix_ms + 1;
        assert_eq!(feed(&mut d, t, &reboot), Verdict::Accepted);
        // ... after which the old boot's sequence is a replay.
        let mut late = hb(1, 50, &["a"]);
        late.unix_ms = genuine.unix_ms;
        assert_eq!(feed(&mut d, t, &late), Verdict::Replayed);

        assert_eq!(
            d.handle_heartbeat(t, T0, from(), &[1, 0x90, 0, 0]),
            Verdict::Malformed
        );
        let c = d.counters();
        assert_eq!(
            (
                c.heartbeats_accepted,
                c.heartbeats_forged,
                c.heartbeats_replayed,
                c.heartbeats_stale,
                c.heartbeats_malformed
            ),
            (2, 2, 4, 1, 1)
        );
        // Nothing of the forgeries took: still up, still holds "a" only.
        assert_eq!(route(&mut d, t, "a"), Ok(addr(1)));
        assert_eq!(route(&mut d, t, "b"), Err(NoRoute::NotFound));
    }

    #[test]
    fn datagrams_get_the_right_replies() {
        let t = Instant::now();
        let mut d = Director::new(params());
        assert!(d
            .handle_datagram(t, T0, from(), &hb(1, 1, &["a"]).encode(&KEY))
            .is_none());
        let req = DirectorMsg::RouteRequest {
            req_id: 9,
            title: "a".into(),
            rx_bps: 0,
            exclude: vec![],
        };
        let r = d.handle_datagram(t, T0, from(), &req.encode()).unwrap();
        assert_eq!(
            DirectorMsg::decode(&r).unwrap(),
            DirectorMsg::RouteOk {
                req_id: 9,
                title: "a".into(),
                server: addr(1)
            }
        );
        let Control::StatsReply { json } = ask(&mut d, t, Control::StatsRequest) else {
            panic!("not stats")
        };
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["counters"]["routes_ok"], 1);
        assert_eq!(v["servers"][0]["server"], "127.0.0.1:7600");
        assert!(d.handle_datagram(t, T0, from(), b"garbage").is_none());
        assert_eq!(d.counters().requests_malformed, 1);
    }

    /// Two sites: A (127.0.0.0/24, servers 1 and 2) and B (10.2.0.0/16 and 2001:db8:2::/48,
    /// server 3); server 4 is of no site.
    fn sited() -> Params {
        let site = |name: &str, prefixes: &[&str], preload: &[&str]| Site {
            name: name.into(),
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            preload: preload.iter().map(|t| t.to_string()).collect(),
            policy: SitePolicy {
                site: name.into(),
                ..SitePolicy::default()
            },
        };
        let mut p = params();
        p.sites = vec![
            site("A", &["127.0.0.0/24"], &["pre-1", "held", "pre-2"]),
            site("B", &["10.2.0.0/16", "2001:db8:2::/48"], &[]),
        ];
        p.server_sites = [(addr(1), 0), (addr(2), 0), (addr(3), 1)]
            .into_iter()
            .collect();
        p
    }

    fn at(ip: &str) -> Option<IpAddr> {
        Some(ip.parse().unwrap())
    }

    #[test]
    fn receivers_belong_to_the_site_of_their_longest_matching_prefix() {
        let mut p = sited();
        p.sites[1].prefixes.push("127.0.0.128/25".parse().unwrap());
        let d = Director::new(p);
        assert_eq!(d.site_of("127.0.0.9".parse().unwrap()), Some(0));
        assert_eq!(
            d.site_of("127.0.0.200".parse().unwrap()),
            Some(1),
            "/25 beats /24"
        );
        assert_eq!(d.site_of("::ffff:127.0.0.9".parse().unwrap()), Some(0));
        assert_eq!(d.site_of("10.2.9.9".parse().unwrap()), Some(1));
        assert_eq!(d.site_of("2001:db8:2::7".parse().unwrap()), Some(1));
        assert_eq!(d.site_of("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn routes_go_to_the_receivers_site_first_then_by_load_then_elsewhere() {
        let t = Instant::now();
        let mut d = Director::new(sited());
        // Site A's servers are busier than site B's and the site-less one, within the load
        // a server still takes (online): A's receivers still go to A, the idler of its two.
        let mut a1 = hb(1, 1, &["film", "held"]);
        a1.throughput_bps = 700_000_000;
        let mut a2 = hb(2, 1, &["film", "held"]);
        a2.throughput_bps = 500_000_000;
        feed(&mut d, t, &a1);
        feed(&mut d, t, &a2);
        feed(&mut d, t, &hb(3, 1, &["film", "only-b"]));
        feed(&mut d, t, &hb(4, 1, &["film"]));
        let a_rx = at("127.0.0.9");
        assert_eq!(d.route_from(t, a_rx, "film", 0, &[]).unwrap(), addr(2));
        // B's receivers go to B; receivers of no site by load (3 and 4 idle: either).
        assert_eq!(
            d.route_from(t, at("10.2.0.1"), "film", 0, &[]).unwrap(),
            addr(3)
        );
        let none = d.route_from(t, at("192.0.2.1"), "film", 0, &[]).unwrap();
        assert!(none == addr(3) || none == addr(4), "{none}");
        // Excluding A's servers (or A's servers down or draining): another site serves.
        let other = d
            .route_from(t, a_rx, "film", 0, &[addr(1), addr(2)])
            .unwrap();
        assert!(other == addr(3) || other == addr(4), "{other}");
        let mut drain = hb(2, 2, &["film"]);
        drain.state = ServerState::Draining;
        feed(&mut d, t, &drain);
        let mut over = hb(1, 2, &["film"]);
        over.state = ServerState::Overloaded;
        feed(&mut d, t, &over);
        let other = d.route_from(t, a_rx, "film", 0, &[]).unwrap();
        assert!(other == addr(3) || other == addr(4), "{other}");
        // A title only B holds: served from B.
        assert_eq!(d.route_from(t, a_rx, "only-b", 0, &[]).unwrap(), addr(3));
    }

    #[test]
    fn without_sites_routing_is_as_before() {
        let t = Instant::now();
        let mut d = Director::new(params());
        let mut busy = hb(1, 1, &["a"]);
        busy.throughput_bps = 800_000_000;
        feed(&mut d, t, &busy);
        feed(&mut d, t, &hb(2, 1, &["a"]));
        assert_eq!(
            d.route_from(t, at("127.0.0.1"), "a", 0, &[]).unwrap(),
            addr(2)
        );
        assert_eq!(d.route_from(t, None, "a", 0, &[]).unwrap(), addr(2));
        assert_eq!(d.counters().requests_unplaced, 0);
        assert!(d.stats(t).unplaced.is_empty());
    }

    #[test]
    fn unplaced_demand_is_recorded_per_site_and_bounded() {
        let t = Instant::now();
        let mut d = Director::new(sited());
        feed(&mut d, t, &hb(1, 1, &["held"]));
        feed(&mut d, t, &hb(3, 1, &["only-b"]));
        let a_rx = at("127.0.0.9");
        for _ in 0..3 {
            assert_eq!(d.route_from(t, a_rx, "only-b", 0, &[]).unwrap(), addr(3));
        }
        // Found nowhere: recorded too; held at A: not; a fail-over retry: not counted again.
        assert_eq!(
            d.route_from(t, a_rx, "nowhere", 0, &[]).map_err(|e| e.0),
            Err(NoRoute::NotFound)
        );
        d.route_from(t, a_rx, "held", 0, &[]).unwrap();
        d.route_from(t, a_rx, "only-b", 0, &[addr(9)]).unwrap();
        // B's receivers asking for what B holds: nothing recorded for B.
        d.route_from(t, at("10.2.0.1"), "only-b", 0, &[]).unwrap();
        assert_eq!(
            d.unplaced(0),
            vec![("only-b".to_string(), 3), ("nowhere".to_string(), 1)]
        );
        assert!(d.unplaced(1).is_empty());
        assert_eq!(d.counters().requests_unplaced, 4);
        let st = d.stats(t);
        assert_eq!(
            st.unplaced[0],
            Unplaced {
                site: "A".into(),
                title: "only-b".into(),
                requests: 3
            }
        );
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["unplaced"][1]["title"], "nowhere");
        assert_eq!(v["counters"]["requests_unplaced"], 4);

        // Bounded: at most MAX_DEMAND_TITLES titles per site, the rest counted as dropped.
        for i in 0..MAX_DEMAND_TITLES + 10 {
            let _ = d.route_from(t, a_rx, &format!("t{i}"), 0, &[]);
        }
        assert_eq!(d.demand[0].len(), MAX_DEMAND_TITLES);
        assert_eq!(d.counters().unplaced_dropped, 12);
        // A long title is kept cut to the wire's limit.
        assert!(d.demand[0].keys().all(|t| t.len() <= MAX_TITLE));
        // Stats stay small: the top ten per site.
        assert_eq!(d.stats(t).unplaced.len(), MAX_STATS_UNPLACED_PER_SITE);
    }

    #[test]
    fn placement_is_preload_then_requested_unheld_by_count_and_fits_a_datagram() {
        let t = Instant::now();
        let mut d = Director::new(sited());
        // Site A holds "held" (a preload title: left out) and "x".
        feed(&mut d, t, &hb(1, 1, &["held", "x"]));
        feed(&mut d, t, &hb(3, 1, &["b1", "b2", "pre-2"]));
        let a_rx = at("127.0.0.5");
        for (title, n) in [("b1", 1), ("b2", 4), ("pre-2", 2), ("x", 5), ("zz", 4)] {
            for _ in 0..n {
                let _ = d.route_from(t, a_rx, title, 0, &[]);
            }
        }
        assert_eq!(
            d.placement(0),
            vec!["pre-1", "pre-2", "b2", "zz", "b1"],
            "preload first (in its order, unheld), then by requests (ties by name), no repeats"
        );
        assert!(d.placement(1).is_empty());
        // Once A holds b2, it is no longer placed.
        feed(&mut d, t, &hb(2, 1, &["b2"]));
        assert_eq!(d.placement(0), vec!["pre-1", "pre-2", "zz", "b1"]);
        // Bounded: many long titles are cut to one datagram.
        for i in 0..500 {
            let _ = d.route_from(t, a_rx, &format!("{i:0>120}"), 0, &[]);
        }
        let list = d.placement(0);
        let bytes = DirectorMsg::Placement {
            req_id: 1,
            site: "A".into(),
            titles: list.clone(),
        }
        .encode();
        assert!(bytes.len() <= crate::wire::director::MAX_PLACEMENT_LEN);
        assert!(list.len() > 50 && list.len() < 504, "{}", list.len());
        assert_eq!(DirectorMsg::decode(&bytes).unwrap().req_id(), 1);
    }

    /// Placement: a Retry (no larger than the request) to an unproven address, the list to a
    /// proven admin one, a refusal to a proven address outside `admin` or for an unknown site.
    #[test]
    fn placement_is_answered_to_proven_admin_addresses_only() {
        let t = Instant::now();
        let mut p = sited();
        p.admin = vec!["127.0.0.9/32".parse().unwrap()];
        let mut d = Director::new(p);
        feed(&mut d, t, &hb(1, 1, &[]));
        let ask = |d: &mut Director, src: SocketAddr, site: &str| -> DirectorMsg {
            let req = DirectorMsg::PlacementRequest {
                req_id: 4,
                site: site.into(),
                token: None,
            }
            .encode();
            let r = d.handle_datagram(t, T0, src, &req).expect("a retry");
            assert!(r.len() <= req.len());
            let DirectorMsg::PlacementRetry { token, .. } = DirectorMsg::decode(&r).unwrap() else {
                panic!("not a retry")
            };
            let again = DirectorMsg::PlacementRequest {
                req_id: 5,
                site: site.into(),
                token: Some(token),
            }
            .encode();
            DirectorMsg::decode(&d.handle_datagram(t, T0, src, &again).unwrap()).unwrap()
        };
        assert_eq!(
            ask(&mut d, from(), "A"),
            DirectorMsg::Placement {
                req_id: 5,
                site: "A".into(),
                titles: vec!["pre-1".into(), "held".into(), "pre-2".into()]
            }
        );
        let other: SocketAddr = "127.0.0.10:5000".parse().unwrap();
        assert!(matches!(
            ask(&mut d, other, "A"),
            DirectorMsg::PlacementRefused { message, .. } if message.contains("admin")
        ));
        assert!(matches!(
            ask(&mut d, from(), "C"),
            DirectorMsg::PlacementRefused { message, .. } if message.contains("sites: A, B")
        ));
        // A token for another address does not prove this one.
        let req = DirectorMsg::PlacementRequest {
            req_id: 6,
            site: "A".into(),
            token: Some([0; 16]),
        }
        .encode();
        assert!(matches!(
            DirectorMsg::decode(&d.handle_datagram(t, T0, from(), &req).unwrap()).unwrap(),
            DirectorMsg::PlacementRetry { .. }
        ));
        assert_eq!(d.counters().placements, 1);
        assert_eq!(d.counters().placements_refused, 2);
    }

    /// A site route request gets the receiver's site policy; an old one the old answer.
    #[test]
    fn site_route_answers_carry_the_sites_policy() {
        let t = Instant::now();
        let mut p = sited();
        p.sites[0].policy.no_multicast = crate::wire::director::NoMulticastPolicy::Http;
        p.sites[0].policy.http = vec!["http://mirror-a/archives/".into()];
        let mut d = Director::new(p);
        feed(&mut d, t, &hb(1, 1, &["film"]));
        let req = DirectorMsg::SiteRouteRequest {
            req_id: 3,
            title: "film".into(),
            rx_bps: 0,
            exclude: vec![],
        }
        .encode();
        let r = d.handle_datagram(t, T0, from(), &req).unwrap();
        assert!(r.len() <= req.len());
        assert_eq!(
            DirectorMsg::decode(&r).unwrap(),
            DirectorMsg::SiteRouteOk {
                req_id: 3,
                title: "film".into(),
                server: addr(1),
                policy: SitePolicy {
                    site: "A".into(),
                    no_multicast: crate::wire::director::NoMulticastPolicy::Http,
                    http: vec!["http://mirror-a/archives/".into()],
                }
            }
        );
        // From outside every site: the default policy, no site.
        let r = d
            .handle_datagram(t, T0, "192.0.2.1:5000".parse().unwrap(), &req)
            .unwrap();
        let DirectorMsg::SiteRouteOk { policy, .. } = DirectorMsg::decode(&r).unwrap() else {
            panic!("not ok")
        };
        assert_eq!(policy, SitePolicy::default());
        // The old request: the old answer.
        let old = DirectorMsg::RouteRequest {
            req_id: 4,
            title: "film".into(),
            rx_bps: 0,
            exclude: vec![],
        }
        .encode();
        assert!(matches!(
            DirectorMsg::decode(&d.handle_datagram(t, T0, from(), &old).unwrap()).unwrap(),
            DirectorMsg::RouteOk { .. }
        ));
    }
}
