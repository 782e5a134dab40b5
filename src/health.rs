//! Plain HTTP health checks (`[server] health_listen`), so a stock load balancer (HAProxy,
//! nginx, a cloud LB) can stand in for a traffic director: `GET /health` answers `200` with a
//! JSON status while the server takes new receivers and `503` while it is draining, overloaded
//! or stopping (same JSON). See `conf/haproxy.cfg.example`.
//!
//! Served by [`crate::http`] with `/metrics` beside it; the server loop refreshes the status
//! with every heartbeat tick.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Serialize;

use crate::http::Routes;
use crate::metrics::ServerMetrics;
use crate::wire::director::{Heartbeat, ServerState};

/// The JSON body of `GET /health`.
#[derive(Clone, Debug, Serialize)]
pub struct HealthStatus {
    pub state: ServerState,
    pub server: String,
    pub boot_id: String,
    pub seq: u64,
    pub titles: Vec<String>,
    pub channels: u32,
    pub channel_slots: u32,
    pub receivers: u32,
    pub throughput_bps: u64,
    pub capacity_bps: u64,
}

impl HealthStatus {
    pub fn of(hb: &Heartbeat, boot_id: u64) -> HealthStatus {
        HealthStatus {
            state: hb.state,
            server: hb.server.to_string(),
            boot_id: format!("{boot_id:016x}"),
            seq: hb.seq,
            titles: hb.titles.iter().map(|t| t.title.clone()).collect(),
            channels: hb.channels,
            channel_slots: hb.channel_slots,
            receivers: hb.receivers,
            throughput_bps: hb.throughput_bps,
            capacity_bps: hb.capacity_bps,
        }
    }

    fn starting() -> HealthStatus {
        HealthStatus {
            state: ServerState::Stopping,
            server: String::new(),
            boot_id: String::new(),
            seq: 0,
            titles: Vec::new(),
            channels: 0,
            channel_slots: 0,
            receivers: 0,
            throughput_bps: 0,
            capacity_bps: 0,
        }
    }

    /// HTTP status: 200 only when new receivers are welcome.
    pub fn http_code(&self) -> u16 {
        if self.state == ServerState::Online {
            200
        } else {
            503
        }
    }

    /// The JSON body of `GET /health`.
    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default() + "\n"
    }
}

/// Serve `/health` (from the returned status, 503 until the server's first tick fills it in)
/// and `/metrics` (from `metrics`) on `addr`.
pub fn spawn(
    addr: SocketAddr,
    metrics: Arc<Mutex<ServerMetrics>>,
) -> anyhow::Result<Arc<Mutex<HealthStatus>>> {
    let status = Arc::new(Mutex::new(HealthStatus::starting()));
    let st = status.clone();
    let routes = Routes {
        health: Arc::new(move || {
            let s = st.lock().unwrap_or_else(|p| p.into_inner());
            (s.http_code(), s.body())
        }),
        metrics: Arc::new(move || metrics.lock().unwrap_or_else(|p| p.into_inner()).render()),
    };
    let bound = crate::http::spawn(addr, routes, "health")
        .context("server.health_listen (health checks and metrics)")?;
    tracing::info!(listen = %bound, "HTTP health checks on GET /health, Prometheus metrics on GET /metrics");
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn codes_and_bodies() {
        let mut st = HealthStatus::starting();
        assert_eq!(st.http_code(), 503);
        st.state = ServerState::Online;
        st.titles = vec!["film".into()];
        assert_eq!(st.http_code(), 200);
        let v: serde_json::Value = serde_json::from_str(&st.body()).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["titles"][0], "film");
        for s in [
            ServerState::Draining,
            ServerState::Overloaded,
            ServerState::Stopping,
        ] {
            st.state = s;
            assert_eq!(st.http_code(), 503);
        }
    }

    #[test]
    fn answers_over_tcp() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let st = spawn(addr, Arc::new(Mutex::new(ServerMetrics::default()))).unwrap();
        let get = |path: &str| {
            let mut c = TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        assert!(get("/health").starts_with("HTTP/1.0 503 "));
        st.lock().unwrap().state = ServerState::Online;
        let out = get("/health");
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["state"], "online");
        let m = get("/metrics");
        assert!(m.contains("\nmcast_data_packets_sent_total 0\n"), "{m}");
        assert!(m.contains("\nmcast_nak_repair_seconds_count 0\n"), "{m}");
    }
}
