//! `mcast-recv get --director A,B`: ask a traffic director which server to fetch from, fail
//! over to the next director when one does not answer, and when the server goes silent (or
//! refuses: draining), ask again — excluding it — and resume on the new server from the state
//! file (`<title>.mca.state` + `.part` are keyed by the archive, which every server of a site
//! holds identically), so nothing already received is fetched again.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_io::archive::ArchiveFile;
use mcast_proto::carousel::LoopShape;
use mcast_proto::receiver::resume;
use mcast_proto::wire::director::{DirectorMsg, NoRoute, SitePolicy};
use serde::Serialize;

use crate::error::{Failure, RecvError};
use crate::get::{file_names, get, GetOptions, GetReport};
use crate::state::State;

/// How long a director gets to answer one try, and tries per director.
const DIRECTOR_TRY: Duration = Duration::from_millis(300);
const DIRECTOR_TRIES: u32 = 2;
/// How long "no server holds the title" is retried before it is final.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(3);

/// The final report: the last run's figures plus the fail-over story.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    #[serde(flatten)]
    pub last: GetReport,
    /// Servers fetched from, in order (one entry per run).
    pub servers: Vec<String>,
    /// Server changes after a server went silent or refused.
    pub switches: u32,
    /// Directors that did not answer a request (the next one was asked).
    pub director_failovers: u32,
    /// At the first switch: payload bytes of the units still missing, and the payload bytes
    /// received (incl. duplicates) from then on. Both 0 without a switch.
    pub missing_bytes_at_switch: u64,
    pub received_bytes_after_switch: u64,
}

/// Asks directors for a route, in turn.
pub struct DirectorClient {
    directors: Vec<SocketAddr>,
    sock: UdpSocket,
    /// For IPv6 directors (`None` when every director is IPv4).
    sock6: Option<UdpSocket>,
    /// The director that answered last is asked first.
    first: usize,
    req_id: u32,
    pub failovers: u32,
    /// Throughput measured on the last server (bit/s, 0 = not known yet), stated in route
    /// requests.
    pub rx_bps: u64,
    /// The receiver's site and its policy without multicast, from the last route answer
    /// (default: no site, unicast stream).
    pub policy: SitePolicy,
}

impl DirectorClient {
    pub fn new(directors: Vec<SocketAddr>) -> Result<DirectorClient, RecvError> {
        let bind = |a: &str| {
            UdpSocket::bind(a)
                .map_err(|e| RecvError::new(Failure::Other, format!("director socket {a}: {e}")))
        };
        let sock = bind("0.0.0.0:0")?;
        let sock6 = match directors.iter().any(|d| d.is_ipv6()) {
            true => Some(bind("[::]:0")?),
            false => None,
        };
        Ok(DirectorClient {
            directors,
            sock,
            sock6,
            first: 0,
            req_id: rand::random(),
            failovers: 0,
            rx_bps: 0,
            policy: SitePolicy::default(),
        })
    }

    /// One route request, trying each director in turn. `Err` only when no director answered.
    pub fn ask(
        &mut self,
        title: &str,
        exclude: &[SocketAddr],
    ) -> Result<Result<SocketAddr, (NoRoute, String)>, RecvError> {
        for k in 0..self.directors.len() {
            let i = (self.first + k) % self.directors.len();
            let d = self.directors[i];
            self.req_id = self.req_id.wrapping_add(1);
            // The site route request: its answer carries our site's policy without multicast
            // (directors from before sites drop it: upgrade directors first).
            let req = DirectorMsg::SiteRouteRequest {
                req_id: self.req_id,
                title: title.to_string(),
                rx_bps: self.rx_bps,
                exclude: exclude.to_vec(),
            }
            .encode();
            let req_id = self.req_id;
            let sock = match (d.is_ipv6(), &self.sock6) {
                (true, Some(s)) => s,
                _ => &self.sock,
            };
            let answer = crate::control::exchange(
                sock,
                d,
                &req,
                DIRECTOR_TRIES,
                DIRECTOR_TRY,
                Duration::from_millis(50),
                |b| match DirectorMsg::decode(b) {
                    Ok(DirectorMsg::SiteRouteOk {
                        req_id: r,
                        server,
                        policy,
                        ..
                    }) if r == req_id => Some(Ok((server, policy))),
                    Ok(DirectorMsg::RouteOk {
                        req_id: r, server, ..
                    }) if r == req_id => Some(Ok((server, SitePolicy::default()))),
                    Ok(DirectorMsg::RouteNone {
                        req_id: r,
                        reason,
                        message,
                        ..
                    }) if r == req_id => Some(Err((reason, message))),
                    _ => None,
                },
            );
            if let Ok(Some(route)) = answer {
                self.first = i;
                return Ok(route.map(|(server, policy)| {
                    self.policy = policy;
                    server
                }));
            }
            self.failovers += 1;
            tracing::warn!(director = %d, "director did not answer; asking the next one");
        }
        Err(RecvError::new(
            Failure::Unreachable,
            format!(
                "no director answered ({}): are they running, and is --director right?",
                self.directors
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// A server for `title`, retrying while directors say "none yet" (servers starting,
    /// all busy) until `deadline`; "not found" is believed after [`NOT_FOUND_GRACE`] (a
    /// director that just started may not have heard every server yet).
    pub fn route(
        &mut self,
        title: &str,
        exclude: &mut Vec<SocketAddr>,
        deadline: Instant,
        stop: &AtomicBool,
    ) -> Result<SocketAddr, RecvError> {
        let mut backoff = Duration::from_millis(200);
        let mut first_not_found: Option<Instant> = None;
        loop {
            let why = match self.ask(title, exclude)? {
                Ok(s) => return Ok(s),
                Err(why) => why,
            };
            let deadline = if why.0 == NoRoute::NotFound {
                deadline.min(*first_not_found.get_or_insert_with(Instant::now) + NOT_FOUND_GRACE)
            } else {
                deadline
            };
            // Every holder excluded: the silence may have been ours; start afresh.
            if why.0 == NoRoute::NoHealthyServer && !exclude.is_empty() {
                exclude.clear();
            }
            if Instant::now() + backoff > deadline || stop.load(Ordering::Relaxed) {
                return Err(RecvError::new(
                    if why.0 == NoRoute::NotFound {
                        Failure::NotFound
                    } else {
                        Failure::Unreachable
                    },
                    format!("director: {}", why.1),
                ));
            }
            tracing::info!(reason = ?why.0, message = %why.1, "no server yet; asking again");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// The block a resumed loop should start at: right after the longest run of blocks already
/// complete (cyclically), so the loop passes every missing packet as soon as it can. `None`
/// without a usable state + part file (a fresh download starts anywhere).
pub fn resume_block(out_dir: &Path, title: &str) -> Option<u64> {
    let (st, _, shape) = load_resume(out_dir, title)?;
    resume::start_block(&shape, |u| st.has(u))
}

/// Kept under its old path for the `state` fuzz target.
pub use resume::best_start;

/// Run a download through directors: route, fetch, and on silence route again and resume.
pub fn get_via_directors(
    opts: &GetOptions,
    directors: Vec<SocketAddr>,
    silence: Duration,
    stop: Arc<AtomicBool>,
) -> Result<FailoverReport, RecvError> {
    let started = Instant::now();
    // Checked before any director is asked: a title the wire format would cut is a usage
    // error here, not a request the directors drop as malformed ("no director answered").
    mcast_keys::store::validate_title(&opts.title)
        .map_err(|e| RecvError::new(Failure::Usage, e.to_string()))?;
    let mut dc = DirectorClient::new(directors)?;
    let mut exclude: Vec<SocketAddr> = Vec::new();
    let mut servers: Vec<String> = Vec::new();
    let mut switches = 0u32;
    let mut missing_at_switch: Option<u64> = None;
    // Where the next server's loop should start: from the state file at first, then from
    // what the lost session itself held.
    let mut start_block = resume_block(&opts.out_dir, &opts.title);
    let mut after_switch = 0u64;
    let deadline = |t: Option<Duration>| {
        t.map(|t| started + t)
            .unwrap_or(started + Duration::from_secs(86_400 * 365))
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(RecvError::new(
                Failure::Interrupted,
                "interrupted; run the same command again to resume",
            ));
        }
        let route_deadline = deadline(opts.timeout).min(Instant::now() + Duration::from_secs(30));
        let server = match dc.route(&opts.title, &mut exclude, route_deadline, &stop) {
            Ok(s) => s,
            Err(mut e) => {
                e.http_mirrors = Some(Box::new(dc.policy.http.clone()));
                return Err(e);
            }
        };
        let mut o = opts.clone();
        o.server = server;
        // The site's policy without multicast travels with the download (the HTTP fetch
        // reads it from the options).
        o.no_multicast = dc.policy.no_multicast;
        o.http_mirrors = dc.policy.http.clone();
        o.repair_after = opts.repair_after;
        o.silence_timeout = Some(silence);
        o.start_block = start_block;
        if let Some(t) = opts.timeout {
            let left = t.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(RecvError::new(
                    Failure::Timeout,
                    format!("gave up after {t:?}; run again to resume"),
                ));
            }
            o.timeout = Some(left);
        }
        tracing::info!(
            %server,
            start_block = ?o.start_block,
            site = %dc.policy.site,
            no_multicast = %dc.policy.no_multicast.name(),
            http_mirrors = %dc.policy.http.join(","),
            "director routed us"
        );
        servers.push(server.to_string());
        let attempt = Instant::now();
        match get(&o, stop.clone()) {
            Ok(r) => {
                if missing_at_switch.is_some() {
                    after_switch += r.received_bytes;
                }
                return Ok(FailoverReport {
                    missing_bytes_at_switch: missing_at_switch.unwrap_or(0),
                    received_bytes_after_switch: after_switch,
                    last: r,
                    servers,
                    switches,
                    director_failovers: dc.failovers,
                });
            }
            Err(e) if e.kind == Failure::Unreachable && !e.http_handover => {
                if missing_at_switch.is_some() {
                    after_switch += e.received_bytes;
                }
                // What the lost server delivered, over the time it was not silent: stated in
                // the next route request, so a director avoids servers too slow for us.
                let active = attempt.elapsed().saturating_sub(silence).as_secs_f64();
                let measured = e.resume.as_ref().map_or(0, |r| r.measured_bps);
                if measured > 0 {
                    dc.rx_bps = measured;
                } else if e.received_bytes > 0 && active > 0.1 {
                    dc.rx_bps = (e.received_bytes as f64 * 8.0 / active) as u64;
                }
                if let Some(r) = &e.resume {
                    start_block = r.start_block;
                }
                tracing::warn!(%server, error = %e.message, rx_bps = dc.rx_bps, "server lost: asking a director for another");
                if !exclude.contains(&server) {
                    exclude.push(server);
                }
                switches += 1;
                if missing_at_switch.is_none() {
                    missing_at_switch = Some(e.resume.as_ref().map_or(0, |r| r.missing_bytes));
                }
            }
            Err(mut e) => {
                // The site's mirrors go with the error: `get` hands over to them (policy
                // `http`/`both`, or every server lost).
                e.http_mirrors = Some(Box::new(dc.policy.http.clone()));
                return Err(e);
            }
        }
    }
}

/// A resumable download's state, part file and loop shape, if they belong together.
pub(crate) fn load_resume(out_dir: &Path, title: &str) -> Option<(State, ArchiveFile, LoopShape)> {
    let (_, part, state) = file_names(out_dir, title);
    let st = State::load(&state)?;
    let a = ArchiveFile::open(&part).ok()?;
    let shape = LoopShape::of(&a.head);
    (a.head.archive_id == st.archive_id && shape.loop_packets() == st.units)
        .then_some((st, a, shape))
}

/// How long a director gets to answer one placement try, and tries per director.
const PLACEMENT_TRY: Duration = Duration::from_millis(400);
const PLACEMENT_TRIES: u32 = 3;

/// `mcast-recv placement`: the titles `directors` say to pre-load at `site` (the first
/// director that answers; each is proven our address by a token first, as stats are). A
/// refusal (not an admin address, unknown site) is final: every director has the same
/// config.
pub fn placement(directors: &[SocketAddr], site: &str) -> Result<Vec<String>, RecvError> {
    if site.is_empty() || site.len() > mcast_proto::wire::director::MAX_SITE_NAME {
        return Err(RecvError::new(
            Failure::Usage,
            format!(
                "--site: give a site name of 1 ..= {} bytes, as in the directors' [[director.sites]]",
                mcast_proto::wire::director::MAX_SITE_NAME
            ),
        ));
    }
    if directors.is_empty() {
        return Err(RecvError::new(Failure::Usage, "no director given"));
    }
    let mut req_id: u32 = rand::random();
    let mut last = None;
    for &d in directors {
        let bind = if d.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let sock = UdpSocket::bind(bind)
            .map_err(|e| RecvError::new(Failure::Other, format!("director socket {bind}: {e}")))?;
        let mut token = None;
        // A Retry with a token, then the answer: two rounds at most (a third if the token
        // expired in between).
        let answer = 'rounds: {
            for _ in 0..3 {
                req_id = req_id.wrapping_add(1);
                let rid = req_id;
                let req = DirectorMsg::PlacementRequest {
                    req_id: rid,
                    site: site.to_string(),
                    token,
                }
                .encode();
                let got = crate::control::exchange(
                    &sock,
                    d,
                    &req,
                    PLACEMENT_TRIES,
                    PLACEMENT_TRY,
                    Duration::from_millis(50),
                    |b| match DirectorMsg::decode(b) {
                        Ok(m) if m.req_id() == rid => match m {
                            DirectorMsg::PlacementRetry { .. }
                            | DirectorMsg::Placement { .. }
                            | DirectorMsg::PlacementRefused { .. } => Some(m),
                            _ => None,
                        },
                        _ => None,
                    },
                );
                match got {
                    Ok(Some(DirectorMsg::PlacementRetry { token: t, .. })) => token = Some(t),
                    Ok(Some(m)) => break 'rounds Some(m),
                    _ => break 'rounds None,
                }
            }
            None
        };
        match answer {
            Some(DirectorMsg::Placement { titles, .. }) => {
                tracing::info!(director = %d, site, titles = titles.len(), "placement");
                return Ok(titles);
            }
            Some(DirectorMsg::PlacementRefused { message, .. }) => {
                return Err(RecvError::new(
                    Failure::Other,
                    format!("director {d} refused the placement request: {message}"),
                ));
            }
            _ => {
                tracing::warn!(director = %d, "director did not answer the placement request; asking the next one");
                last = Some(d);
            }
        }
    }
    Err(RecvError::new(
        Failure::Unreachable,
        format!(
            "no director answered the placement request (last tried {}): are they running \
             (a director from before sites does not know it), and is --director right?",
            last.map(|d| d.to_string()).unwrap_or_default()
        ),
    ))
}
