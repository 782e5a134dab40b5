//! The HTTP endpoints of `mcastd` and `mcast-director`: `GET /health` (JSON, 200 or 503) and
//! `GET /metrics` (Prometheus text format 0.0.4) on `[server] health_listen` /
//! `[director] metrics_listen`, and the archive directory on `[server] archive_http_listen`
//! (`GET`/`HEAD /archives/<title>.mca` with single byte ranges: any receiver can fetch or
//! repair an archive from it with `mcast-recv get --http`, trusting nothing but the signed
//! head). hyper 1.x on a current-thread tokio runtime in a thread of its own per listener, so
//! a slow or hostile client never touches the sending loop: HTTP/1 only, headers within
//! [`HEADER_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once (more are closed on accept), each
//! connection within a lifetime ([`ConnLimits`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    RANGE,
};
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

/// The body every endpoint answers with.
pub type HttpBody = BoxBody<Bytes, std::io::Error>;
/// Answers one request (its headers; request bodies are not read).
pub type Handler = dyn Fn(&Request<Incoming>) -> Response<HttpBody> + Send + Sync;

/// How long one connection may live: after `lifetime` it is shut down gracefully (the
/// response in progress finishes, keep-alive ends), and closed after `grace` more.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub lifetime: Duration,
    pub grace: Duration,
}

/// `/health` and `/metrics`: small answers, so a connection is short.
pub const SMALL_LIMITS: ConnLimits = ConnLimits {
    lifetime: Duration::from_secs(25),
    grace: Duration::from_secs(5),
};

/// Archives: keep-alive for a minute, and a response in progress (a whole multi-GB archive
/// in one GET, at a slow client's pace) up to an hour more.
pub const ARCHIVE_LIMITS: ConnLimits = ConnLimits {
    lifetime: Duration::from_secs(60),
    grace: Duration::from_secs(3600),
};

fn full(r: Response<Full<Bytes>>) -> Response<HttpBody> {
    r.map(|b| b.map_err(|never: Infallible| match never {}).boxed())
}

/// Listen on `addr` (bound before this returns, so a bad address is an error at start-up)
/// and answer `/health` and `/metrics` from a thread named `name`. Returns the bound address.
pub fn spawn(addr: SocketAddr, routes: Routes, name: &str) -> anyhow::Result<SocketAddr> {
    let handler: Arc<Handler> =
        Arc::new(move |req| full(respond(&routes, req.method(), req.uri().path())));
    spawn_handler(addr, handler, name, SMALL_LIMITS)
}

/// Serve the archives of `dir` on `addr` (`[server] archive_http_listen`).
pub fn spawn_archives(addr: SocketAddr, dir: PathBuf) -> anyhow::Result<SocketAddr> {
    let handler: Arc<Handler> = Arc::new(move |req| {
        let range = req.headers().get(RANGE).and_then(|v| v.to_str().ok());
        respond_archive(&dir, req.method(), req.uri().path(), range)
    });
    spawn_handler(addr, handler, "archive-http", ARCHIVE_LIMITS)
}

/// Listen on `addr` and answer with `handler` from a thread named `name`.
pub fn spawn_handler(
    addr: SocketAddr,
    handler: Arc<Handler>,
    name: &str,
    limits: ConnLimits,
) -> anyhow::Result<SocketAddr> {
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
        .spawn(move || rt.block_on(serve(l, handler, limits)))?;
    Ok(bound)
}

async fn serve(l: std::net::TcpListener, handler: Arc<Handler>, limits: ConnLimits) {
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
        let (handler, open) = (handler.clone(), open.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = handler(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            // A whole connection (keep-alive included) within a bound, so idle clients
            // cannot hold the slots: then the response in progress may finish.
            match tokio::time::timeout(limits.lifetime, conn.as_mut()).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                Ok(Ok(())) => {}
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.grace, conn.as_mut()).await;
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// What a `Range` header asks of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAsk {
    /// The whole file (200): no header, one that does not parse, or several ranges (the
    /// standard lets a server ignore them).
    Whole,
    /// Bytes `first..=last` (206), `last` clipped to the file.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// A `Range` header against a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeAsk {
    parse_range_inner(header, len)
        .map(|r| r.map_or(RangeAsk::Whole, |(a, b)| RangeAsk::Part(a, b)))
        .unwrap_or(RangeAsk::Unsatisfiable)
}

fn parse_range_inner(header: Option<&str>, len: u64) -> Option<Option<(u64, u64)>> {
    let Some(h) = header else {
        return Some(None);
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Some(None);
    };
    if spec.contains(',') {
        return Some(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Some(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-n: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                None
            } else {
                Some(Some((len.saturating_sub(n), len - 1)))
            }
        }
        // bytes=a- and bytes=a-b.
        (false, Some(first), last) if b.is_empty() || last.is_some() => {
            if last.is_some_and(|l| l < first) {
                return Some(None); // invalid: ignored
            }
            if first >= len {
                return None;
            }
            Some(Some((first, last.unwrap_or(u64::MAX).min(len - 1))))
        }
        _ => Some(None),
    }
}

/// The archive file `path` names (`/archives/<title>.mca`), if it is one: a valid title (no
/// `/`, no leading `.`, so no way out of the directory), the `.mca` suffix (never a `.part`).
pub fn archive_file(dir: &Path, path: &str) -> Option<PathBuf> {
    let name = path.strip_prefix("/archives/")?;
    let title = name.strip_suffix(".mca")?;
    mcast_keys::title::validate_title(title).ok()?;
    Some(crate::archive::archive_path(dir, title))
}

/// A file region streamed in bounded chunks (a multi-GB archive never sits in memory).
struct FileBody {
    file: std::fs::File,
    pos: u64,
    end: u64,
}

/// Bytes read per chunk.
const CHUNK: u64 = 256 << 10;

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let n = (this.end - this.pos).min(CHUNK) as usize;
        let mut b = vec![0u8; n];
        if let Err(e) = this.file.read_exact_at(&mut b, this.pos) {
            this.pos = this.end;
            return Poll::Ready(Some(Err(e)));
        }
        this.pos += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(b)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

fn plain(code: StatusCode, text: &str) -> Response<HttpBody> {
    let mut r = full(Response::new(Full::new(Bytes::from(format!("{text}\n")))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to `method path` with `Range` header `range`, from the archives in `dir`.
pub fn respond_archive(
    dir: &Path,
    method: &Method,
    path: &str,
    range: Option<&str>,
) -> Response<HttpBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let not_found = || {
        plain(
            StatusCode::NOT_FOUND,
            "no such archive: try /archives/<title>.mca",
        )
    };
    let Some(p) = archive_file(dir, path) else {
        return not_found();
    };
    // Never through a symbolic link; only regular files.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&p)
    {
        Ok(f) => f,
        Err(_) => return not_found(),
    };
    let len = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => return not_found(),
    };
    let (status, first, last) = match parse_range(range, len) {
        RangeAsk::Unsatisfiable => {
            let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            r.headers_mut()
                .insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            return r;
        }
        RangeAsk::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
        RangeAsk::Whole => (StatusCode::OK, 0, len.wrapping_sub(1)),
    };
    let body_len = if len == 0 { 0 } else { last - first + 1 };
    let body = FileBody {
        file,
        pos: first,
        end: first + body_len,
    };
    let mut r = Response::new(body.boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")).expect("ascii"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), RangeAsk::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), RangeAsk::Part(90, 99));
        assert_eq!(
            parse_range(Some("bytes=90-500"), 100),
            RangeAsk::Part(90, 99)
        );
        assert_eq!(parse_range(Some("bytes=-16"), 100), RangeAsk::Part(84, 99));
        assert_eq!(parse_range(Some("bytes=-500"), 100), RangeAsk::Part(0, 99));
        assert_eq!(
            parse_range(Some("bytes=100-"), 100),
            RangeAsk::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=-0"), 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeAsk::Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=x-1",
            "bytes=-",
            "bytes=+1-2",
        ] {
            assert_eq!(
                parse_range(Some(ignored), 100),
                RangeAsk::Whole,
                "{ignored}"
            );
        }
    }

    #[test]
    fn archive_names() {
        let d = Path::new("/srv/a");
        assert_eq!(
            archive_file(d, "/archives/film-1.mca"),
            Some(PathBuf::from("/srv/a/film-1.mca"))
        );
        for bad in [
            "/archives/../x.mca",
            "/archives/..mca",
            "/archives/film-1.mca.part",
            "/archives/film-1.mca.state",
            "/archives/a/b.mca",
            "/archives/%2e%2e.mca",
            "/archives/.hidden.mca",
            "/film-1.mca",
            "/archives/film-1",
        ] {
            assert_eq!(archive_file(d, bad), None, "{bad}");
        }
    }

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
