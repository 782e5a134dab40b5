//! Metrics: the Grafana dashboard names only metrics the programs export; a real `mcastd`
//! serves `/metrics` in the text format with every listed family after a real delivery; and a
//! real Prometheus (Debian's `prometheus` package) scrapes `mcastd` and `mcast-director` and
//! answers queries over what they sent. Outside CI a missing `prometheus` skips that test with
//! the reason; under `CI=true` it fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MB: usize = 1_000_000;

/// Every metric name (`mcast_…`) in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        if word(b[i]) && (i == 0 || !word(b[i - 1])) {
            let start = i;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            let w = &expr[start..i];
            if w.starts_with("mcast_") {
                out.insert(w.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every PromQL string of a dashboard: panel targets' `expr` and template variables' `query`.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_is_json_and_names_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/mcast.json");
    let text = std::fs::read_to_string(path).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("conf/grafana/mcast.json is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let exported: BTreeSet<String> = mcast::metrics::server_metric_names()
        .into_iter()
        .chain(mcast::metrics::director_metric_names())
        .collect();
    let mut used = BTreeSet::new();
    for e in &all {
        let names = metric_names(e);
        assert!(
            !names.is_empty(),
            "an expression naming no mcast metric: {e}"
        );
        for n in names {
            assert!(exported.contains(&n), "{n} (in `{e}`) is not exported");
            used.insert(n);
        }
    }
    // What the dashboard is for: sent bytes, NAKs, repairs, members, histogram quantiles.
    for want in [
        "mcast_channel_sent_bytes_total",
        "mcast_naks_received_total",
        "mcast_repairs_sent_total",
        "mcast_channel_members",
        "mcast_nak_repair_seconds_bucket",
        "mcast_receiver_completion_seconds_bucket",
    ] {
        assert!(used.contains(want), "the dashboard does not show {want}");
    }
    assert!(all.iter().any(|e| e.contains("histogram_quantile(")));
    // The check itself can fail: a name the programs do not export is caught.
    let bad = metric_names("rate(mcast_nope_total{x=\"y\"}[5m]) / mcast_receivers");
    assert_eq!(
        bad,
        BTreeSet::from(["mcast_nope_total".into(), "mcast_receivers".into()])
    );
    assert!(!exported.contains("mcast_nope_total"));
}

/// A free TCP port on loopback (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    let code = out.get(9..12)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// The text format, checked line by line: `# HELP`/`# TYPE` before a family's samples, each
/// family once, every sample `name{labels} value` of a declared family with a float value.
/// Returns series → value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "{name} twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "stray line {line:?}"
        );
        let (key, value) = line.rsplit_once(' ').expect("sample value");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} before its # TYPE");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        assert!(series.insert(key.to_string(), v).is_none(), "{key} twice");
    }
    series
}

fn wait_for_metrics(
    addr: SocketAddr,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(addr, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        let m = parse_exposition(&body);
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never got there:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A real server after a real delivery: `/metrics` parses, carries every family the exporter
/// lists (so the list the dashboard test trusts is the exporter's), counts the packets and
/// records the join and the receiver's reported completion; `/health` still answers.
#[test]
fn a_real_server_exports_its_delivery() {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let site = Site::new(
        130,
        &format!("rate_mbps = 40.0\ntiers_mbps = [40.0]\nhealth_listen = \"{http}\""),
    );
    let archive = site.pack("film", 3 * MB, 130);
    let mut srv = site.serve();
    let done = site
        .get("film", &site.out_dir("r"), &[])
        .wait(Duration::from_secs(70));
    done.assert_complete(&archive);
    let m = wait_for_metrics(http, |m| {
        m.get("mcast_receiver_completion_seconds_count").copied() >= Some(1.0)
            && m.get("mcast_channels").copied() == Some(0.0)
    });
    for name in mcast::metrics::server_metric_names() {
        assert!(
            m.keys()
                .any(|k| k == &name || k.starts_with(&format!("{name}{{"))),
            "{name} is listed but not exported"
        );
    }
    // The channel closed when its one receiver completed: its series stay, at zero members.
    assert_eq!(m["mcast_channel_members{title=\"film\",tier=\"0\"}"], 0.0);
    assert_eq!(m["mcast_channels"], 0.0);
    assert!(m["mcast_data_packets_sent_total"] > 0.0);
    assert!(m["mcast_payload_sent_bytes_total"] >= 3e6);
    assert_eq!(m["mcast_completions_total"], 1.0);
    assert_eq!(m["mcast_receiver_completion_loops_count"], 1.0);
    assert!(m["mcast_receiver_completion_loops_sum"] > 0.5, "{m:?}");
    assert!(m["mcast_join_first_packet_seconds_count"] >= 1.0);
    // The whole loop went out at least once, and the count outlives the closed channel (a
    // 3 MB loop at 40 Mbit/s lives well under one publish interval).
    let film = m["mcast_channel_sent_bytes_total{title=\"film\",tier=\"0\"}"];
    assert!(film >= 3e6, "{film}");
    assert_eq!(m["mcast_channel_slots"], 4.0);
    let (code, body) = http_get(http, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "online");
    srv.assert_running();
}

/// `prometheus` on PATH, or why the test cannot run.
fn prometheus() -> Option<String> {
    let ok = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some("prometheus".into());
    }
    skip_or_fail("`prometheus` is not installed (apt-get install prometheus)");
    None
}

/// Percent-encoding of a query string value.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's single value, if it has one yet.
fn query(prom: SocketAddr, q: &str) -> Option<f64> {
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q)))?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// A real Prometheus scrapes `mcastd` (after a delivery) and `mcast-director` (hearing the
/// server's heartbeats) every second: both targets are up (the scrape parsed) and queries
/// over what they export answer.
#[test]
fn prometheus_scrapes_the_server_and_the_director() {
    let Some(prom_bin) = prometheus() else {
        return;
    };
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir_http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir_udp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let site = Site::new(
        131,
        &format!("rate_mbps = 40.0\ntiers_mbps = [40.0]\nhealth_listen = \"{http}\""),
    );
    let key = site.path("heartbeat.key");
    let director = env!("CARGO_BIN_EXE_mcast-director");
    let out = Command::new(director)
        .args(["genkey", "-o"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The server's heartbeats go to the director.
    let mut cfg = std::fs::read_to_string(&site.cfg).unwrap();
    cfg.push_str(&format!(
        "\n[directors]\naddrs = [\"{dir_udp}\"]\nkey_file = '{}'\nheartbeat_ms = 200\n",
        key.display()
    ));
    std::fs::write(&site.cfg, cfg).unwrap();
    let dcfg = site.path("director.toml");
    std::fs::write(
        &dcfg,
        format!(
            "[director]\nlisten = \"{dir_udp}\"\nkey_file = '{}'\nmetrics_listen = \"{dir_http}\"\n",
            key.display()
        ),
    )
    .unwrap();
    let dlog = std::fs::File::create(site.path("director.log")).unwrap();
    let _director = Guard::spawn(
        Command::new(director)
            .arg("--config")
            .arg(&dcfg)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(dlog),
        false,
    );
    let archive = site.pack("film", 3 * MB, 131);
    let _srv = site.serve();
    site.get("film", &site.out_dir("r"), &[])
        .wait(Duration::from_secs(70))
        .assert_complete(&archive);

    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let pcfg = site.path("prometheus.yml");
    std::fs::write(
        &pcfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: mcastd\n    static_configs:\n      - targets: ['{http}']\n\
             \x20 - job_name: director\n    static_configs:\n      - targets: ['{dir_http}']\n"
        ),
    )
    .unwrap();
    let plog = site.path("prometheus.log");
    let _prom = Guard::spawn(
        Command::new(prom_bin)
            .arg(format!("--config.file={}", pcfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                site.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&plog).unwrap()),
        false,
    );
    let checks = [
        "up{job=\"mcastd\"}",
        "up{job=\"director\"}",
        "mcast_data_packets_sent_total",
        "mcast_receiver_completion_seconds_count",
        "mcast_receiver_completion_loops_count",
        "sum(mcast_channel_sent_bytes_total)",
        "mcast_director_heartbeats_accepted_total",
        "sum(mcast_director_server_up)",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: Vec<Option<f64>>;
    loop {
        got = checks.iter().map(|q| query(prom, q)).collect();
        if got.iter().all(|v| v.is_some_and(|v| v >= 1.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus answers {:?} for {checks:?}\nprometheus log:\n{}",
            got,
            std::fs::read_to_string(&plog).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "Prometheus: {:?}",
        checks.iter().zip(&got).collect::<Vec<_>>()
    );
    assert_eq!(got[0], Some(1.0));
    assert_eq!(got[1], Some(1.0));
    assert!(got[2].unwrap() > 0.0);
    assert!(got[3].unwrap() >= 1.0);
    // A histogram quantile over the scraped buckets answers (a number, not an error).
    let q = query(
        prom,
        "histogram_quantile(0.5, sum by (le) (mcast_receiver_completion_seconds_bucket))",
    );
    assert!(q.is_some_and(|v| v > 0.0), "{q:?}");
}
