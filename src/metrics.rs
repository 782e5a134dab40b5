//! Prometheus metrics of `mcastd` and `mcast-director` (text exposition format 0.0.4, served
//! at `GET /metrics` by [`crate::http`]).
//!
//! Every counter the state machines keep ([`crate::channel::Counters`],
//! [`crate::director::Counters`]) is exported under a name of the tables here; gauges give
//! channels, members and rates per title and tier; histograms are kept with `hdrhistogram`
//! (fixed relative error at any magnitude) from the plain numbers the channel manager
//! samples ([`Sample`]) and exported as Prometheus histograms with fixed bucket bounds.
//!
//! The tables are the one list of names: the exporter writes from them and
//! [`server_metric_names`] / [`director_metric_names`] (used by the dashboard test) read them.
//!
//! Label cardinality is bounded: the first [`MAX_TITLE_LABELS`] titles (and
//! [`MAX_SERVER_LABELS`] servers at a director) keep their name, later ones are folded into
//! `other`; tiers are at most [`crate::wire::control::MAX_TIERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::channel::{ChannelManager, ChannelStats, Counters, Sample};
use crate::wire::director::ServerState;

/// Distinct titles labelled by name; the rest are `other`.
pub const MAX_TITLE_LABELS: usize = 64;
/// Distinct servers labelled by address at a director; the rest are `other`.
pub const MAX_SERVER_LABELS: usize = 64;
/// The label value of everything past a cap.
pub const OTHER: &str = "other";

/// How often the server loop publishes its figures for `/metrics`.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A counter of a state machine's counters struct: its serde field, metric name and help.
pub struct CounterDef {
    pub field: &'static str,
    pub name: &'static str,
    pub help: &'static str,
}

const fn c(field: &'static str, name: &'static str, help: &'static str) -> CounterDef {
    CounterDef { field, name, help }
}

/// Every field of [`crate::channel::Counters`] (a test checks none is missing).
pub const SERVER_COUNTERS: &[CounterDef] = &[
    c(
        "control_received",
        "mcast_control_datagrams_received_total",
        "Control datagrams received (NAKs not included).",
    ),
    c(
        "control_malformed",
        "mcast_control_datagrams_malformed_total",
        "Control datagrams that did not decode.",
    ),
    c(
        "retries_sent",
        "mcast_retries_sent_total",
        "Requests without a valid address token answered with a Retry.",
    ),
    c(
        "unvalidated_dropped",
        "mcast_unvalidated_dropped_total",
        "Requests from unproven addresses dropped (even a Retry would be larger).",
    ),
    c(
        "replies_withheld",
        "mcast_replies_withheld_total",
        "Replies to unproven addresses withheld for being larger than the request.",
    ),
    c(
        "stats_refused",
        "mcast_stats_refused_total",
        "Stats requests from outside [server] admin.",
    ),
    c(
        "session_forged",
        "mcast_session_forged_total",
        "Session messages without a valid MAC (dropped).",
    ),
    c(
        "refused_sessions_per_address",
        "mcast_refused_sessions_per_address_total",
        "Joins refused: max_sessions_per_address reached.",
    ),
    c(
        "joins",
        "mcast_joins_total",
        "Receivers that joined a title.",
    ),
    c(
        "tier_changes",
        "mcast_tier_changes_total",
        "Members moved between tiers of a title.",
    ),
    c(
        "not_here",
        "mcast_not_here_total",
        "Joins for titles this server does not hold.",
    ),
    c(
        "channels_opened",
        "mcast_channels_opened_total",
        "Channels opened.",
    ),
    c(
        "channels_closed",
        "mcast_channels_closed_total",
        "Channels closed.",
    ),
    c(
        "completions",
        "mcast_completions_total",
        "Receivers that reported a complete download.",
    ),
    c(
        "leases_expired",
        "mcast_leases_expired_total",
        "Members dropped because their lease ran out.",
    ),
    c(
        "unknown_session",
        "mcast_unknown_session_total",
        "Requests for sessions the server does not hold.",
    ),
    c(
        "cookies_sent",
        "mcast_cookies_sent_total",
        "Unicast fallback cookies sent.",
    ),
    c(
        "unicast_started",
        "mcast_unicast_started_total",
        "Unicast streams started.",
    ),
    c(
        "streams_consent_expired",
        "mcast_streams_consent_expired_total",
        "Unicast streams ended for want of keepalives from their address.",
    ),
    c(
        "streams_unreachable",
        "mcast_streams_unreachable_total",
        "Unicast streams and bursts ended by ICMP unreachable.",
    ),
    c(
        "bursts_started",
        "mcast_bursts_started_total",
        "Discovery bursts started.",
    ),
    c(
        "bursts_refused",
        "mcast_bursts_refused_total",
        "Discovery bursts refused (too soon, too many).",
    ),
    c(
        "burst_packets_sent",
        "mcast_burst_packets_sent_total",
        "Datagrams of discovery bursts.",
    ),
    c(
        "bad_cookies",
        "mcast_bad_cookies_total",
        "Unicast confirmations with a bad cookie.",
    ),
    c(
        "sync_sent",
        "mcast_syncs_sent_total",
        "SYNC datagrams sent.",
    ),
    c(
        "packets_sent",
        "mcast_data_packets_sent_total",
        "Data packets sent (loop and repairs, group and unicast).",
    ),
    c(
        "payload_bytes_sent",
        "mcast_payload_sent_bytes_total",
        "Payload bytes of the data packets sent.",
    ),
    c(
        "head_chunks_sent",
        "mcast_head_chunks_sent_total",
        "Archive head chunks sent.",
    ),
    c(
        "naks_received",
        "mcast_naks_received_total",
        "NAKs accepted.",
    ),
    c(
        "nak_units_received",
        "mcast_nak_units_received_total",
        "Units asked for by accepted NAKs.",
    ),
    c(
        "naks_malformed",
        "mcast_naks_malformed_total",
        "NAKs that did not decode.",
    ),
    c(
        "naks_unknown_channel",
        "mcast_naks_unknown_channel_total",
        "NAKs for no open channel.",
    ),
    c(
        "naks_rate_limited",
        "mcast_naks_rate_limited_total",
        "NAKs over the per-address rate.",
    ),
    c(
        "naks_unauthenticated",
        "mcast_naks_unauthenticated_total",
        "NAKs from no member or without a valid MAC.",
    ),
    c(
        "nak_units_over_budget",
        "mcast_nak_units_over_budget_total",
        "NAKed units over the member's budget.",
    ),
    c(
        "nak_units_ignored",
        "mcast_nak_units_ignored_total",
        "NAKed units out of range or over max_nak_units.",
    ),
    c(
        "nak_units_coalesced",
        "mcast_nak_units_coalesced_total",
        "NAKed units already queued or recently repaired.",
    ),
    c(
        "nak_symbols_received",
        "mcast_nak_symbols_received_total",
        "FEC symbols asked for by amount.",
    ),
    c(
        "nak_symbols_coalesced",
        "mcast_nak_symbols_coalesced_total",
        "FEC symbols asked for that were already owed or answered.",
    ),
    c(
        "nak_symbols_ignored",
        "mcast_nak_symbols_ignored_total",
        "FEC symbols asked for no FEC block.",
    ),
    c(
        "extras_sent",
        "mcast_extras_sent_total",
        "Extra FEC symbols made on demand and sent (of repairs).",
    ),
    c(
        "repairs_sent",
        "mcast_repairs_sent_total",
        "Repair packets sent.",
    ),
    c(
        "unicast_packets_sent",
        "mcast_unicast_packets_sent_total",
        "Data packets of unicast streams.",
    ),
    c(
        "unicast_repairs_sent",
        "mcast_unicast_repairs_sent_total",
        "Repairs of unicast streams.",
    ),
    c(
        "refused_draining",
        "mcast_refused_draining_total",
        "Joins refused while draining.",
    ),
    c(
        "archives_skipped",
        "mcast_archives_skipped_total",
        "Archives left out at start-up.",
    ),
    c(
        "archives_withdrawn",
        "mcast_archives_withdrawn_total",
        "Titles withdrawn because their archive could not be read.",
    ),
    c(
        "plays_granted",
        "mcast_plays_granted_total",
        "Play requests granted.",
    ),
    c(
        "plays_refused",
        "mcast_plays_refused_total",
        "Play requests refused.",
    ),
    c(
        "plays_shed",
        "mcast_plays_shed_total",
        "Play requests shed (ticket worker busy).",
    ),
    c(
        "scheduled_opened",
        "mcast_scheduled_opened_total",
        "Scheduled loops opened.",
    ),
    c(
        "scheduled_closed",
        "mcast_scheduled_closed_total",
        "Scheduled loops closed.",
    ),
    c(
        "scheduled_members_dropped",
        "mcast_scheduled_members_dropped_total",
        "Members dropped when a scheduled loop closed.",
    ),
    c(
        "refused_outside_window",
        "mcast_refused_outside_window_total",
        "Joins refused outside the title's scheduled window.",
    ),
    c(
        "samples_dropped",
        "mcast_metric_samples_dropped_total",
        "Histogram samples the server loop did not take in time.",
    ),
];

/// Every field of [`crate::director::Counters`].
pub const DIRECTOR_COUNTERS: &[CounterDef] = &[
    c(
        "heartbeats_accepted",
        "mcast_director_heartbeats_accepted_total",
        "Heartbeats accepted.",
    ),
    c(
        "heartbeats_malformed",
        "mcast_director_heartbeats_malformed_total",
        "Heartbeats that did not decode.",
    ),
    c(
        "heartbeats_forged",
        "mcast_director_heartbeats_forged_total",
        "Heartbeats whose MAC did not verify.",
    ),
    c(
        "heartbeats_replayed",
        "mcast_director_heartbeats_replayed_total",
        "Heartbeats with an old sequence number.",
    ),
    c(
        "heartbeats_stale",
        "mcast_director_heartbeats_stale_total",
        "Heartbeats stamped too far from the director's clock.",
    ),
    c(
        "heartbeats_wrong_source",
        "mcast_director_heartbeats_wrong_source_total",
        "Heartbeats under a server's own key from another address.",
    ),
    c(
        "routes_ok",
        "mcast_director_routes_ok_total",
        "Route requests answered with a server.",
    ),
    c(
        "routes_not_found",
        "mcast_director_routes_not_found_total",
        "Route requests for a title no server holds.",
    ),
    c(
        "routes_no_healthy",
        "mcast_director_routes_no_healthy_total",
        "Route requests with no healthy server for the title.",
    ),
    c(
        "routes_busy",
        "mcast_director_routes_busy_total",
        "Route requests refused: every server busy.",
    ),
    c(
        "joins_redirected",
        "mcast_director_joins_redirected_total",
        "Joins answered with a redirect.",
    ),
    c(
        "requests_malformed",
        "mcast_director_requests_malformed_total",
        "Requests that did not decode.",
    ),
    c(
        "retries_sent",
        "mcast_director_retries_sent_total",
        "Requests without a valid token answered with a Retry.",
    ),
    c(
        "unvalidated_dropped",
        "mcast_director_unvalidated_dropped_total",
        "Requests from unproven addresses dropped.",
    ),
    c(
        "stats_refused",
        "mcast_director_stats_refused_total",
        "Stats requests from outside [director] admin.",
    ),
    c(
        "servers_marked_down",
        "mcast_director_servers_marked_down_total",
        "Servers marked down for missing heartbeats.",
    ),
    c(
        "requests_unplaced",
        "mcast_director_requests_unplaced_total",
        "Route requests for a title no server of the receiver's site holds.",
    ),
    c(
        "unplaced_dropped",
        "mcast_director_unplaced_dropped_total",
        "Unplaced titles not recorded (their site's list was full).",
    ),
    c(
        "placements",
        "mcast_director_placements_total",
        "Placement requests answered.",
    ),
    c(
        "placements_refused",
        "mcast_director_placements_refused_total",
        "Placement requests refused (not from [director] admin, unknown site).",
    ),
];

/// A metric family the exporter writes besides the counters tables.
pub struct FamilyDef {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn f(name: &'static str, kind: Kind, help: &'static str) -> FamilyDef {
    FamilyDef { name, kind, help }
}

const SEND_ERRORS: FamilyDef = f(
    "mcast_data_send_errors_total",
    Kind::Counter,
    "Data datagrams the kernel refused to send.",
);
const UNVALIDATED_UNSENT: FamilyDef = f(
    "mcast_unvalidated_replies_unsent_total",
    Kind::Counter,
    "Replies to unproven addresses the kernel did not send.",
);
const STATE: FamilyDef = f(
    "mcast_server_state",
    Kind::Gauge,
    "1 for the server's current state (online, draining, overloaded, stopping).",
);
const CHANNELS: FamilyDef = f("mcast_channels", Kind::Gauge, "Open channels.");
const SLOTS: FamilyDef = f(
    "mcast_channel_slots",
    Kind::Gauge,
    "Channel slots configured ([server] channels).",
);
const RECEIVERS: FamilyDef = f("mcast_receivers", Kind::Gauge, "Members of all channels.");
const CH_MEMBERS: FamilyDef = f(
    "mcast_channel_members",
    Kind::Gauge,
    "Members by title and tier.",
);
const CH_UNICAST: FamilyDef = f(
    "mcast_channel_unicast_members",
    Kind::Gauge,
    "Members with a unicast stream, by title and tier.",
);
const CH_RATE: FamilyDef = f(
    "mcast_channel_rate_bytes_per_second",
    Kind::Gauge,
    "Send rate of the group loop by title and tier.",
);
const CH_RX: FamilyDef = f(
    "mcast_channel_reported_receive_bytes_per_second",
    Kind::Gauge,
    "Mean throughput members report, by title and tier.",
);
const CH_LOSS: FamilyDef = f(
    "mcast_channel_reported_loss_ratio",
    Kind::Gauge,
    "Mean loss members report (0..1), by title and tier.",
);
const CH_SENT: FamilyDef = f(
    "mcast_channel_sent_bytes_total",
    Kind::Counter,
    "Payload bytes the group loops sent, by title and tier (published each second).",
);

const SERVER_FAMILIES: &[&FamilyDef] = &[
    &SEND_ERRORS,
    &UNVALIDATED_UNSENT,
    &STATE,
    &CHANNELS,
    &SLOTS,
    &RECEIVERS,
    &CH_MEMBERS,
    &CH_UNICAST,
    &CH_RATE,
    &CH_RX,
    &CH_LOSS,
    &CH_SENT,
];

const D_SERVERS: FamilyDef = f(
    "mcast_director_servers",
    Kind::Gauge,
    "Servers known, by state and whether they are up.",
);
const D_UP: FamilyDef = f(
    "mcast_director_server_up",
    Kind::Gauge,
    "1 while a server's heartbeats arrive, by server.",
);
const D_RECEIVERS: FamilyDef = f(
    "mcast_director_server_receivers",
    Kind::Gauge,
    "Receivers a server reports, by server.",
);
const D_CHANNELS: FamilyDef = f(
    "mcast_director_server_channels",
    Kind::Gauge,
    "Channels a server reports, by server.",
);
const D_THROUGHPUT: FamilyDef = f(
    "mcast_director_server_throughput_bytes_per_second",
    Kind::Gauge,
    "Send throughput a server reports, by server.",
);
const D_ROUTED: FamilyDef = f(
    "mcast_director_server_routed_total",
    Kind::Counter,
    "Receivers routed to a server, by server.",
);

const D_SITE_UNPLACED_TITLES: FamilyDef = f(
    "mcast_director_site_unplaced_titles",
    Kind::Gauge,
    "Titles a site's receivers asked for that no server of the site holds, by site.",
);
const D_SITE_UNPLACED_REQUESTS: FamilyDef = f(
    "mcast_director_site_unplaced_requests",
    Kind::Gauge,
    "Requests for those titles, by site.",
);

const DIRECTOR_FAMILIES: &[&FamilyDef] = &[
    &D_SITE_UNPLACED_TITLES,
    &D_SITE_UNPLACED_REQUESTS,
    &D_SERVERS,
    &D_UP,
    &D_RECEIVERS,
    &D_CHANNELS,
    &D_THROUGHPUT,
    &D_ROUTED,
];

/// A histogram: name, help, what one recorded unit is in the exported unit, the largest
/// value recorded (more is clamped) and the fixed bucket bounds (exported unit).
pub struct HistDef {
    pub name: &'static str,
    pub help: &'static str,
    /// Recorded units per exported unit (1e6: microseconds recorded, seconds exported).
    scale: f64,
    high: u64,
    bounds: &'static [f64],
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub const NAK_REPAIR: HistDef = HistDef {
    name: "mcast_nak_repair_seconds",
    help: "From the NAK that first asked for a unit (or a FEC block's amount) to its repair handed to the send path.",
    scale: 1e6,
    high: 3_600_000_000,
    bounds: LATENCY_BOUNDS,
};
pub const JOIN_FIRST_PACKET: HistDef = HistDef {
    name: "mcast_join_first_packet_seconds",
    help: "From a new member's join answered to the next data packet its channel sent (the server's part of a receiver's start).",
    scale: 1e6,
    high: 3_600_000_000,
    bounds: LATENCY_BOUNDS,
};
pub const COMPLETION_TIME: HistDef = HistDef {
    name: "mcast_receiver_completion_seconds",
    help: "Download time receivers report on completion (their figure, clamped to a week).",
    scale: 1e3,
    high: 7 * 24 * 3_600_000,
    bounds: &[
        1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
        14400.0, 43200.0, 86400.0, 604800.0,
    ],
};
pub const COMPLETION_LOOPS: HistDef = HistDef {
    name: "mcast_receiver_completion_loops",
    help: "Loops' worth of data receivers report having received on completion (clamped to 1000).",
    scale: 1e3,
    high: 1_000_000,
    bounds: &[0.5, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0],
};

const SERVER_HISTOGRAMS: &[&HistDef] = &[
    &NAK_REPAIR,
    &JOIN_FIRST_PACKET,
    &COMPLETION_TIME,
    &COMPLETION_LOOPS,
];

/// Names `mcastd` exports (histograms with their `_bucket`, `_sum`, `_count` series).
pub fn server_metric_names() -> Vec<String> {
    let mut v: Vec<String> = SERVER_COUNTERS.iter().map(|d| d.name.to_string()).collect();
    v.extend(SERVER_FAMILIES.iter().map(|d| d.name.to_string()));
    for h in SERVER_HISTOGRAMS {
        for s in ["_bucket", "_sum", "_count"] {
            v.push(format!("{}{s}", h.name));
        }
    }
    v
}

/// Names `mcast-director` exports.
pub fn director_metric_names() -> Vec<String> {
    let mut v: Vec<String> = DIRECTOR_COUNTERS
        .iter()
        .map(|d| d.name.to_string())
        .collect();
    v.extend(DIRECTOR_FAMILIES.iter().map(|d| d.name.to_string()));
    v
}

/// One hdr histogram and the exact sum of what it holds (hdr keeps none).
#[derive(Clone)]
pub struct Hist {
    h: Histogram<u64>,
    sum: u128,
    high: u64,
}

impl Hist {
    pub fn new(def: &HistDef) -> Hist {
        Hist {
            h: Histogram::new_with_bounds(1, def.high, 3).expect("static bounds are valid"),
            sum: 0,
            high: def.high,
        }
    }

    /// Record `v` recorded units (clamped to the histogram's range).
    pub fn record(&mut self, v: u64) {
        let v = v.clamp(1, self.high);
        self.h.saturating_record(v);
        self.sum += v as u128;
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    fn merge(&mut self, o: &Hist) {
        // Same bounds on both sides: `add` cannot fail.
        let _ = self.h.add(&o.h);
        self.sum += o.sum;
    }

    fn reset(&mut self) {
        self.h.reset();
        self.sum = 0;
    }

    /// `_bucket` (cumulative, at the fixed bounds; a bound's count includes values in its
    /// hdr bucket, within 0.1 %), `_sum` and `_count`.
    fn write(&self, out: &mut String, def: &HistDef) {
        header(out, def.name, def.help, Kind::Histogram);
        for b in def.bounds {
            let upto = (b * def.scale) as u64;
            let n = if upto == 0 {
                0
            } else {
                self.h.count_between(0, upto)
            };
            let _ = writeln!(out, "{}_bucket{{le=\"{}\"}} {n}", def.name, fmt_f64(*b));
        }
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {}", def.name, self.h.len());
        let _ = writeln!(
            out,
            "{}_sum {}",
            def.name,
            fmt_f64(self.sum as f64 / def.scale)
        );
        let _ = writeln!(out, "{}_count {}", def.name, self.h.len());
    }
}

/// The server's histograms.
#[derive(Clone)]
pub struct ServerHistograms {
    pub nak_repair: Hist,
    pub join_first_packet: Hist,
    pub completion_time: Hist,
    pub completion_loops: Hist,
}

impl Default for ServerHistograms {
    fn default() -> Self {
        ServerHistograms {
            nak_repair: Hist::new(&NAK_REPAIR),
            join_first_packet: Hist::new(&JOIN_FIRST_PACKET),
            completion_time: Hist::new(&COMPLETION_TIME),
            completion_loops: Hist::new(&COMPLETION_LOOPS),
        }
    }
}

impl ServerHistograms {
    pub fn record(&mut self, s: Sample) {
        match s {
            Sample::NakToRepair(d) => self.nak_repair.record(micros(d)),
            Sample::JoinToFirstPacket(d) => self.join_first_packet.record(micros(d)),
            Sample::Completion {
                elapsed,
                milli_loops,
            } => {
                self.completion_time
                    .record(elapsed.as_millis().min(u64::MAX as u128) as u64);
                self.completion_loops.record(milli_loops as u64);
            }
        }
    }

    fn merge(&mut self, o: &ServerHistograms) {
        self.nak_repair.merge(&o.nak_repair);
        self.join_first_packet.merge(&o.join_first_packet);
        self.completion_time.merge(&o.completion_time);
        self.completion_loops.merge(&o.completion_loops);
    }

    fn reset(&mut self) {
        self.nak_repair.reset();
        self.join_first_packet.reset();
        self.completion_time.reset();
        self.completion_loops.reset();
    }

    fn write(&self, out: &mut String) {
        self.nak_repair.write(out, &NAK_REPAIR);
        self.join_first_packet.write(out, &JOIN_FIRST_PACKET);
        self.completion_time.write(out, &COMPLETION_TIME);
        self.completion_loops.write(out, &COMPLETION_LOOPS);
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Label values kept by name up to a cap, first come first kept; the rest are `other`.
/// Kept for the process's life, so a name never moves between its own series and `other`.
pub struct LabelCap {
    cap: usize,
    kept: BTreeSet<String>,
}

impl LabelCap {
    pub fn new(cap: usize) -> LabelCap {
        LabelCap {
            cap,
            kept: BTreeSet::new(),
        }
    }

    pub fn label(&mut self, v: &str) -> String {
        if self.kept.contains(v) {
            return v.to_string();
        }
        if self.kept.len() < self.cap && v != OTHER {
            self.kept.insert(v.to_string());
            return v.to_string();
        }
        OTHER.to_string()
    }
}

/// What `/metrics` of `mcastd` shows: the server loop publishes into it every
/// [`PUBLISH_EVERY`]; the HTTP thread renders it.
pub struct ServerMetrics {
    counters: Counters,
    extra: ServerExtras,
    state: Option<ServerState>,
    channel_slots: u32,
    /// (title label, tier) → figures of the channels published last (zero for those with
    /// no channel now).
    channels: BTreeMap<(String, usize), ChannelFigures>,
    /// (title label, tier) → payload bytes the group loops sent: closed channels' and open
    /// ones', recomputed at each publish.
    sent: BTreeMap<(String, usize), u64>,
    titles: LabelCap,
    hist: ServerHistograms,
}

/// What the server driver knows itself (outside the channel manager).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerExtras {
    pub send_errors: u64,
    pub unvalidated_unsent: u64,
    /// The state the last heartbeat announced (`None` before the first).
    pub state: Option<ServerState>,
    /// `[server] channels`.
    pub channel_slots: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct ChannelFigures {
    members: u64,
    unicast: u64,
    rate_bps: u64,
    reported_bps: u64,
    reported_loss_ppm: u64,
    /// Channels summed (a title's tier has one, but a schedule's may overlap briefly).
    n: u64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            counters: Counters::default(),
            extra: ServerExtras::default(),
            state: None,
            channel_slots: 0,
            channels: BTreeMap::new(),
            sent: BTreeMap::new(),
            titles: LabelCap::new(MAX_TITLE_LABELS),
            hist: ServerHistograms::default(),
        }
    }
}

impl ServerMetrics {
    /// Take the server loop's figures (`hist` is merged in; the caller resets its own).
    pub fn publish(
        &mut self,
        counters: &Counters,
        channels: &[ChannelStats],
        closed_sent: &BTreeMap<(String, usize), u64>,
        extra: ServerExtras,
        hist: &ServerHistograms,
    ) {
        self.counters = counters.clone();
        self.extra = extra;
        self.state = extra.state.or(self.state);
        self.channel_slots = extra.channel_slots;
        self.hist.merge(hist);
        // A title and tier seen once keeps its series (at zero while no channel loops it), so
        // members falling to none show as 0, not as a gap (bounded by the label caps).
        for f in self.channels.values_mut() {
            *f = ChannelFigures::default();
        }
        for v in self.sent.values_mut() {
            *v = 0;
        }
        for ((title, tier), bytes) in closed_sent {
            let key = (self.titles.label(title), *tier);
            *self.sent.entry(key.clone()).or_default() += bytes;
            // A channel that opened and closed between two publishes has its series too.
            self.channels.entry(key).or_default();
        }
        for c in channels {
            let key = (self.titles.label(&c.title), c.tier);
            *self.sent.entry(key.clone()).or_default() += c.payload_bytes_sent;
            let f = self.channels.entry(key).or_default();
            f.members += c.members as u64;
            f.unicast += c.unicast as u64;
            f.rate_bps += c.rate_bps;
            f.reported_bps += c.reported_bps;
            f.reported_loss_ppm += c.reported_loss_ppm as u64;
            f.n += 1;
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let json = serde_json::to_value(&self.counters).unwrap_or_default();
        write_counters(&mut out, SERVER_COUNTERS, &json);
        simple(&mut out, &SEND_ERRORS, self.extra.send_errors);
        simple(&mut out, &UNVALIDATED_UNSENT, self.extra.unvalidated_unsent);
        header(&mut out, STATE.name, STATE.help, STATE.kind);
        for s in [
            ServerState::Online,
            ServerState::Draining,
            ServerState::Overloaded,
            ServerState::Stopping,
        ] {
            let on = (self.state == Some(s)) as u8;
            let _ = writeln!(out, "{}{{state=\"{}\"}} {on}", STATE.name, s.name());
        }
        let n: u64 = self.channels.values().map(|f| f.n).sum();
        simple(&mut out, &CHANNELS, n);
        simple(&mut out, &SLOTS, self.channel_slots as u64);
        let members: u64 = self.channels.values().map(|f| f.members).sum();
        simple(&mut out, &RECEIVERS, members);
        let per = |out: &mut String, def: &FamilyDef, v: &dyn Fn(&ChannelFigures) -> String| {
            header(out, def.name, def.help, def.kind);
            for ((title, tier), fig) in &self.channels {
                let _ = writeln!(
                    out,
                    "{}{{title=\"{}\",tier=\"{tier}\"}} {}",
                    def.name,
                    escape(title),
                    v(fig)
                );
            }
        };
        per(&mut out, &CH_MEMBERS, &|f| f.members.to_string());
        per(&mut out, &CH_UNICAST, &|f| f.unicast.to_string());
        per(&mut out, &CH_RATE, &|f| (f.rate_bps / 8).to_string());
        per(&mut out, &CH_RX, &|f| {
            (f.reported_bps / f.n.max(1) / 8).to_string()
        });
        per(&mut out, &CH_LOSS, &|f| {
            fmt_f64(f.reported_loss_ppm as f64 / f.n.max(1) as f64 / 1e6)
        });
        header(&mut out, CH_SENT.name, CH_SENT.help, CH_SENT.kind);
        for ((title, tier), v) in &self.sent {
            let _ = writeln!(
                out,
                "{}{{title=\"{}\",tier=\"{tier}\"}} {v}",
                CH_SENT.name,
                escape(title)
            );
        }
        self.hist.write(&mut out);
        out
    }
}

/// The server loop's side: takes the manager's samples every turn into its own histograms
/// and publishes them with the counters every [`PUBLISH_EVERY`] (one short lock a second).
pub struct MetricsDriver {
    shared: Option<Arc<Mutex<ServerMetrics>>>,
    local: ServerHistograms,
    next_publish: Instant,
}

impl MetricsDriver {
    /// `shared`: `None` when nothing serves `/metrics` (samples are then dropped).
    pub fn new(shared: Option<Arc<Mutex<ServerMetrics>>>, now: Instant) -> MetricsDriver {
        MetricsDriver {
            shared,
            local: ServerHistograms::default(),
            next_publish: now,
        }
    }

    /// Once per server loop turn.
    pub fn poll(&mut self, now: Instant, mgr: &mut ChannelManager, extra: ServerExtras) {
        while let Some(s) = mgr.poll_sample() {
            if self.shared.is_some() {
                self.local.record(s);
            }
        }
        let Some(shared) = &self.shared else {
            return;
        };
        if now < self.next_publish {
            return;
        }
        self.next_publish = now + PUBLISH_EVERY;
        let stats = mgr.stats();
        let mut m = shared.lock().unwrap_or_else(|p| p.into_inner());
        m.publish(
            &stats.counters,
            &stats.channels,
            mgr.closed_payload_bytes(),
            extra,
            &self.local,
        );
        drop(m);
        self.local.reset();
    }
}

/// `/metrics` of the director, from its stats.
pub fn render_director(stats: &crate::director::Stats, servers: &mut LabelCap) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let json = serde_json::to_value(&stats.counters).unwrap_or_default();
    write_counters(&mut out, DIRECTOR_COUNTERS, &json);
    header(&mut out, D_SERVERS.name, D_SERVERS.help, D_SERVERS.kind);
    let mut by: BTreeMap<(&str, bool), u64> = BTreeMap::new();
    for st in [
        ServerState::Online,
        ServerState::Draining,
        ServerState::Overloaded,
        ServerState::Stopping,
    ] {
        by.insert((st.name(), true), 0);
        by.insert((st.name(), false), 0);
    }
    for s in &stats.servers {
        *by.entry((s.state.name(), s.up)).or_default() += 1;
    }
    for ((state, up), n) in by {
        let _ = writeln!(
            out,
            "{}{{state=\"{state}\",up=\"{up}\"}} {n}",
            D_SERVERS.name
        );
    }
    // Per server, capped (a shared key lets any number of servers speak).
    #[derive(Default)]
    struct Per {
        up: u64,
        receivers: u64,
        channels: u64,
        bps: u64,
        routed: u64,
    }
    let mut per: BTreeMap<String, Per> = BTreeMap::new();
    for s in &stats.servers {
        let p = per.entry(servers.label(&s.server)).or_default();
        p.up += s.up as u64;
        p.receivers += s.receivers as u64;
        p.channels += s.channels as u64;
        p.bps += s.throughput_bps;
        p.routed += s.routed;
    }
    type Of = fn(&Per) -> u64;
    let fams: [(&FamilyDef, Of); 5] = [
        (&D_UP, |p| p.up),
        (&D_RECEIVERS, |p| p.receivers),
        (&D_CHANNELS, |p| p.channels),
        (&D_THROUGHPUT, |p| p.bps / 8),
        (&D_ROUTED, |p| p.routed),
    ];
    for (def, v) in fams {
        header(&mut out, def.name, def.help, def.kind);
        for (server, p) in &per {
            let _ = writeln!(
                out,
                "{}{{server=\"{}\"}} {}",
                def.name,
                escape(server),
                v(p)
            );
        }
    }
    // Per site: the configured sites only (bounded by the config, not by requests).
    type OfSite = fn(&crate::director::SiteStats) -> u64;
    let site_fams: [(&FamilyDef, OfSite); 2] = [
        (&D_SITE_UNPLACED_TITLES, |s| s.unplaced_titles),
        (&D_SITE_UNPLACED_REQUESTS, |s| s.unplaced_requests),
    ];
    for (def, v) in site_fams {
        header(&mut out, def.name, def.help, def.kind);
        for s in &stats.sites {
            let _ = writeln!(out, "{}{{site=\"{}\"}} {}", def.name, escape(&s.site), v(s));
        }
    }
    out
}

/// The director's `/metrics`: its loop publishes a snapshot of its stats every
/// [`PUBLISH_EVERY`]; the HTTP thread renders the last one.
pub struct DirectorMetrics {
    shared: Arc<Mutex<Option<crate::director::Stats>>>,
    next_publish: Instant,
}

impl DirectorMetrics {
    /// Serve `/metrics` and `/health` (200 while the director runs) on `addr`.
    pub fn spawn(addr: std::net::SocketAddr) -> anyhow::Result<DirectorMetrics> {
        let shared: Arc<Mutex<Option<crate::director::Stats>>> = Arc::new(Mutex::new(None));
        let labels = Arc::new(Mutex::new(LabelCap::new(MAX_SERVER_LABELS)));
        let snap = shared.clone();
        let routes = crate::http::Routes {
            health: Arc::new(|| (200, "{\"state\":\"online\"}\n".to_string())),
            metrics: Arc::new(move || {
                let stats = snap.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut labels = labels.lock().unwrap_or_else(|p| p.into_inner());
                match stats {
                    Some(s) => render_director(&s, &mut labels),
                    None => render_director(&Default::default(), &mut labels),
                }
            }),
        };
        let bound = crate::http::spawn(addr, routes, "metrics")
            .map_err(|e| anyhow::anyhow!("director.metrics_listen: {e:#}"))?;
        tracing::info!(listen = %bound, "Prometheus metrics on GET /metrics");
        Ok(DirectorMetrics {
            shared,
            next_publish: Instant::now(),
        })
    }

    /// Once per director loop turn.
    pub fn poll(&mut self, now: Instant, dir: &crate::director::Director) {
        if now < self.next_publish {
            return;
        }
        self.next_publish = now + PUBLISH_EVERY;
        let stats = dir.stats(now);
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: Kind) {
    let _ = writeln!(
        out,
        "# HELP {name} {}",
        help.replace('\\', "\\\\").replace('\n', "\\n")
    );
    let _ = writeln!(out, "# TYPE {name} {}", kind.name());
}

fn simple(out: &mut String, def: &FamilyDef, v: u64) {
    header(out, def.name, def.help, def.kind);
    let _ = writeln!(out, "{} {v}", def.name);
}

fn write_counters(out: &mut String, defs: &[CounterDef], json: &serde_json::Value) {
    for d in defs {
        header(out, d.name, d.help, Kind::Counter);
        let v = json.get(d.field).and_then(|v| v.as_u64()).unwrap_or(0);
        let _ = writeln!(out, "{} {v}", d.name);
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as Prometheus reads it (no exponent; whole numbers without a fraction).
fn fmt_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "0".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: serde_json::Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// A counter added to a state machine without a metric fails here.
    #[test]
    fn every_counter_is_exported_once() {
        let server: BTreeSet<String> = SERVER_COUNTERS.iter().map(|d| d.field.into()).collect();
        assert_eq!(server.len(), SERVER_COUNTERS.len());
        assert_eq!(
            server,
            fields(serde_json::to_value(Counters::default()).unwrap())
        );
        let director: BTreeSet<String> = DIRECTOR_COUNTERS.iter().map(|d| d.field.into()).collect();
        assert_eq!(director.len(), DIRECTOR_COUNTERS.len());
        assert_eq!(
            director,
            fields(serde_json::to_value(crate::director::Counters::default()).unwrap())
        );
        for names in [server_metric_names(), director_metric_names()] {
            let set: BTreeSet<&String> = names.iter().collect();
            assert_eq!(set.len(), names.len(), "duplicate metric names");
            for n in &names {
                assert!(n.starts_with("mcast_"), "{n}");
                assert!(
                    n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn histograms_export_cumulative_buckets_sum_and_count() {
        let mut h = ServerHistograms::default();
        for ms in [3u64, 40, 40, 2_000] {
            h.record(Sample::NakToRepair(Duration::from_millis(ms)));
        }
        h.record(Sample::Completion {
            elapsed: Duration::from_secs(90),
            milli_loops: 1_200,
        });
        let mut m = ServerMetrics::default();
        m.publish(
            &Counters::default(),
            &[],
            &BTreeMap::new(),
            ServerExtras {
                channel_slots: 4,
                ..Default::default()
            },
            &h,
        );
        m.publish(
            &Counters::default(),
            &[],
            &BTreeMap::new(),
            ServerExtras {
                channel_slots: 4,
                ..Default::default()
            },
            &h,
        );
        let text = m.render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
                .parse()
                .unwrap()
        };
        // Published twice: everything doubled.
        assert_eq!(value("mcast_nak_repair_seconds_bucket{le=\"0.001\"}"), 0.0);
        assert_eq!(value("mcast_nak_repair_seconds_bucket{le=\"0.005\"}"), 2.0);
        assert_eq!(value("mcast_nak_repair_seconds_bucket{le=\"0.05\"}"), 6.0);
        assert_eq!(value("mcast_nak_repair_seconds_bucket{le=\"2.5\"}"), 8.0);
        assert_eq!(value("mcast_nak_repair_seconds_bucket{le=\"+Inf\"}"), 8.0);
        assert_eq!(value("mcast_nak_repair_seconds_count"), 8.0);
        assert!((value("mcast_nak_repair_seconds_sum") - 2.0 * 2.083).abs() < 1e-9);
        assert_eq!(
            value("mcast_receiver_completion_seconds_bucket{le=\"60\"}"),
            0.0
        );
        assert_eq!(
            value("mcast_receiver_completion_seconds_bucket{le=\"120\"}"),
            2.0
        );
        assert_eq!(
            value("mcast_receiver_completion_loops_bucket{le=\"1.1\"}"),
            0.0
        );
        assert_eq!(
            value("mcast_receiver_completion_loops_bucket{le=\"1.25\"}"),
            2.0
        );
        assert_eq!(value("mcast_receiver_completion_loops_sum"), 2.4);
        assert_eq!(value("mcast_join_first_packet_seconds_count"), 0.0);
        assert_eq!(value("mcast_channel_slots"), 4.0);
        // Buckets never decrease.
        let mut last = 0.0;
        for l in text
            .lines()
            .filter(|l| l.starts_with("mcast_nak_repair_seconds_bucket"))
        {
            let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{l}");
            last = v;
        }
    }

    fn chan(channel: u32, title: &str, tier: usize, bytes: u64, members: usize) -> ChannelStats {
        ChannelStats {
            channel,
            tier,
            reported_bps: 8_000_000,
            reported_loss_ppm: 10_000,
            payload_bytes_sent: bytes,
            title: title.into(),
            group: "239.1.1.1:7000".into(),
            members,
            unicast: 0,
            unicast_rates_bps: vec![],
            loops: 0,
            packets_sent: 0,
            rate_bps: 80_000_000,
        }
    }

    #[test]
    fn titles_are_capped_and_sent_bytes_survive_channels_closing() {
        let mut m = ServerMetrics::default();
        let h = ServerHistograms::default();
        let e = ServerExtras {
            channel_slots: 200,
            ..Default::default()
        };
        let mut chans: Vec<ChannelStats> = (0..MAX_TITLE_LABELS as u32 + 5)
            .map(|i| chan(i, &format!("t\"{i}"), 0, 100, 1))
            .collect();
        let none = BTreeMap::new();
        m.publish(
            &Counters::default(),
            &chans,
            &none,
            ServerExtras {
                state: Some(ServerState::Online),
                ..e
            },
            &h,
        );
        // Channel 0 grows, then closes (its bytes move to the closed count); a new channel
        // of its title starts from zero.
        chans[0].payload_bytes_sent = 250;
        m.publish(&Counters::default(), &chans, &none, e, &h);
        let closed = BTreeMap::from([(("t\"0".to_string(), 0), 250)]);
        chans[0] = chan(999, "t\"0", 0, 40, 2);
        m.publish(&Counters::default(), &chans, &closed, e, &h);
        // A title and tier whose only channel closed between publishes has its series.
        let closed = BTreeMap::from([(("t\"0".to_string(), 0), 250), (("t\"1".to_string(), 2), 7)]);
        m.publish(&Counters::default(), &chans, &closed, e, &h);
        let text = m.render();
        assert!(
            text.contains("mcast_channel_sent_bytes_total{title=\"t\\\"0\",tier=\"0\"} 290\n"),
            "{text}"
        );
        assert!(
            text.contains("mcast_channel_members{title=\"other\",tier=\"0\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("mcast_channel_sent_bytes_total{title=\"other\",tier=\"0\"} 500\n"));
        assert!(text.contains("mcast_server_state{state=\"online\"} 1\n"));
        assert!(text.contains(
            "mcast_channel_rate_bytes_per_second{title=\"t\\\"1\",tier=\"0\"} 10000000\n"
        ));
        assert!(
            text.contains("mcast_channel_reported_loss_ratio{title=\"t\\\"1\",tier=\"0\"} 0.01\n")
        );
        assert!(text.contains("mcast_channel_members{title=\"t\\\"1\",tier=\"2\"} 0\n"));
        assert!(text.contains("mcast_channel_sent_bytes_total{title=\"t\\\"1\",tier=\"2\"} 7\n"));
        let series = text
            .lines()
            .filter(|l| l.starts_with("mcast_channel_members{"))
            .count();
        assert_eq!(series, MAX_TITLE_LABELS + 2);
        assert!(text.contains(&format!("mcast_receivers {}\n", MAX_TITLE_LABELS + 6)));
    }
}
