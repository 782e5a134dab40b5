//! The HTTP endpoint of `mcastd` (`[server] health_listen`) and `mcast-director`
//! (`[director] metrics_listen`): `GET /health` (JSON, 200 or 503) and `GET /metrics`
//! (Prometheus text format 0.0.4). hyper 1.x on a current-thread tokio runtime in a thread of
//! its own, so a slow or hostile client never touches the sending loop: HTTP/1 only, headers
//! within [`HEADER_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once (more are closed on accept).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The Prometheus text format's content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/health`: the HTTP status and JSON body.
pub type HealthFn = dyn Fn() -> (u16, String) + Send + Sync;
/// `/metrics`: the exposition text.
pub type MetricsFn = dyn Fn() -> String + Send + Sync;

/// What the endpoint answers.
#[derive(Clone)]
pub struct Routes {
    pub health: Arc<HealthFn>,
    pub metrics: Arc<MetricsFn>,
}

/// The response to `method path` (query ignored).
pub fn respond(routes: &Routes, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let json = HeaderValue::from_static("application/json");
    let (code, ctype, body) = if method != Method::GET && method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            json,
            "{\"error\":\"GET only\"}\n".to_string(),
        )
    } else if path == "/health" || path == "/" {
        let (code, body) = (routes.health)();
        (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            json,
            body,
        )
    } else if path == "/metrics" {
        (
            StatusCode::OK,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
            (routes.metrics)(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            json,
            "{\"error\":\"try /health or /metrics\"}\n".to_string(),
        )
    };
    // HEAD: hyper sends the headers (Content-Length of the GET body) and no body.
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(CONTENT_TYPE, ctype);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Listen on `addr` (bound before this returns, so a bad address is an error at start-up)
/// and answer from a thread named `name`. Returns the bound address.
pub fn spawn(addr: SocketAddr, routes: Routes, name: &str) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    l.set_nonblocking(true)?;
    let bound = l.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("HTTP runtime")?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(serve(l, routes)))?;
    Ok(bound)
}

async fn serve(l: std::net::TcpListener, routes: Routes) {
    let l = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "HTTP listener unusable");
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = match l.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue; // dropped: closed
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (routes, open) = (routes.clone(), open.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&routes, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A whole connection (keep-alive included) within a bound, so idle clients
            // cannot hold the slots.
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                tracing::debug!(error = %e, "HTTP connection");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn routes() -> Routes {
        Routes {
            health: Arc::new(|| (503, "{\"state\":\"draining\"}\n".into())),
            metrics: Arc::new(|| "# TYPE mcast_x counter\nmcast_x 1\n".into()),
        }
    }

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn health_metrics_and_errors_over_tcp() {
        let addr = spawn("127.0.0.1:0".parse().unwrap(), routes(), "http-test").unwrap();
        let r = get(addr, "GET /health HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 503 "), "{r}");
        assert!(r.ends_with("{\"state\":\"draining\"}\n"), "{r}");
        let r = get(
            addr,
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{r}"
        );
        assert!(r.ends_with("mcast_x 1\n"), "{r}");
        let r = get(addr, "HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.0 200 ") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        assert!(get(addr, "GET /x HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(get(addr, "POST /health HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));
        // Garbage gets an error or a closed connection, and the server answers on.
        let _ = get(addr, "\x00\x01 nonsense\r\n\r\n");
        assert!(get(addr, "GET /health HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 503"));
    }
}
