//! Plain HTTP health checks (`[server] health_listen`), so a stock load balancer (HAProxy,
//! nginx, a cloud LB) can stand in for a traffic director: `GET /health` answers `200` with a
//! JSON status while the server takes new receivers and `503` while it is draining, overloaded
//! or stopping (same JSON). See `conf/haproxy.cfg.example`.
//!
//! A tiny HTTP/1.0 responder on one std thread that blocks in `accept`: one request per
//! connection, a short read timeout, no keep-alive. The server loop refreshes the status with
//! every heartbeat tick.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

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
}

/// The whole response to one request line.
pub fn respond(request: &str, status: &HealthStatus) -> Vec<u8> {
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, reason, body) = if method != "GET" && method != "HEAD" {
        (
            405,
            "Method Not Allowed",
            "{\"error\":\"GET only\"}\n".to_string(),
        )
    } else if path == "/health" || path == "/" {
        let code = status.http_code();
        let body = serde_json::to_string(status).unwrap_or_default() + "\n";
        (
            code,
            if code == 200 {
                "OK"
            } else {
                "Service Unavailable"
            },
            body,
        )
    } else {
        (
            404,
            "Not Found",
            "{\"error\":\"try /health\"}\n".to_string(),
        )
    };
    let mut out = format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn serve_one(mut s: TcpStream, status: &Mutex<HealthStatus>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let mut n = 0;
    // Read up to the end of the request line (headers are not needed).
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(_) => return,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let line = line.lines().next().unwrap_or("");
    let snapshot = status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let _ = s.write_all(&respond(line, &snapshot));
}

/// Listen on `addr` and answer health checks from a thread; the returned status is what they
/// see (503 until the server's first tick fills it in).
pub fn spawn(addr: SocketAddr) -> anyhow::Result<Arc<Mutex<HealthStatus>>> {
    let l = TcpListener::bind(addr).with_context(|| {
        format!("cannot listen for health checks on {addr} (server.health_listen)")
    })?;
    tracing::info!(listen = %l.local_addr()?, "HTTP health checks on GET /health");
    let status = Arc::new(Mutex::new(HealthStatus::starting()));
    let st = status.clone();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(s) => serve_one(s, &st),
                    Err(e) => {
                        tracing::debug!(error = %e, "health accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_bodies() {
        let mut st = HealthStatus::starting();
        let r = String::from_utf8(respond("GET /health HTTP/1.0", &st)).unwrap();
        assert!(r.starts_with("HTTP/1.0 503 "), "{r}");
        st.state = ServerState::Online;
        st.titles = vec!["film".into()];
        let r = String::from_utf8(respond("GET /health HTTP/1.1", &st)).unwrap();
        assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["titles"][0], "film");
        assert!(r.contains(&format!("Content-Length: {}\r\n", body.len())));
        let head = String::from_utf8(respond("HEAD /health HTTP/1.0", &st)).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
        assert!(String::from_utf8(respond("GET /x HTTP/1.0", &st))
            .unwrap()
            .starts_with("HTTP/1.0 404"));
        assert!(String::from_utf8(respond("POST /health HTTP/1.0", &st))
            .unwrap()
            .starts_with("HTTP/1.0 405"));
        assert!(String::from_utf8(respond("", &st))
            .unwrap()
            .starts_with("HTTP/1.0 405"));
        st.state = ServerState::Draining;
        assert!(String::from_utf8(respond("GET /health?x=1 HTTP/1.0", &st))
            .unwrap()
            .starts_with("HTTP/1.0 503"));
    }

    #[test]
    fn answers_over_tcp() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let st = spawn(addr).unwrap();
        st.lock().unwrap().state = ServerState::Online;
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
    }
}
