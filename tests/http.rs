//! HTTP fetch and repair of archives (`mcast-recv get --http`) from a stock nginx (Debian's
//! `nginx` package, started here with its own config in a temp dir) and from `mcastd`'s own
//! `[server] archive_http_listen`: HTTP only, a corrupt mirror dropped for another, a receiver
//! that got most of a title by multicast fetching only the rest, the mixed mode in one `get`
//! (`--repair-after`, and a server killed mid-way), and what `mcastd` serves and refuses.
//! Outside CI a missing nginx skips the nginx tests with the reason; under `CI=true` it fails.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MB: usize = 1_000_000;

/// A free TCP port on loopback (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nginx` on PATH (or in /usr/sbin), or skip (fail under CI).
fn nginx_bin() -> Option<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Some(p.into());
        }
    }
    if missing_tool(&["nginx"]).is_none() {
        return Some("nginx".into());
    }
    skip_or_fail("`nginx` is not installed (apt-get install nginx)");
    None
}

/// A stock nginx on 127.0.0.1, its config, pid file, logs and temp paths in a temp dir;
/// `locations` maps URL prefixes (`/good/`) to directories.
struct Nginx {
    _guard: Guard,
    port: u16,
    dir: tempfile::TempDir,
    tls: bool,
}

impl Nginx {
    fn start(bin: &Path, locations: &[(&str, &Path)]) -> Nginx {
        Nginx::start_with(bin, locations, None)
    }

    /// With `tls` (certificate and key PEM files): HTTPS with HTTP/2 offered by ALPN.
    fn start_with(bin: &Path, locations: &[(&str, &Path)], tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("mcast-nginx-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(d.join("tmp").join(t)).unwrap();
        }
        let port = free_port();
        let locs: String = locations
            .iter()
            .map(|(prefix, root)| {
                format!("    location {prefix} {{ alias {}/; }}\n", root.display())
            })
            .collect();
        // As root the workers would run as nobody, who cannot read the test's 0700 dirs.
        let user = if euid() == Some(0) {
            "user root root;\n"
        } else {
            ""
        };
        let listen = match tls {
            Some((cert, key)) => format!(
                "listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {};\n    \
                 ssl_certificate_key {};",
                cert.display(),
                key.display()
            ),
            None => format!("listen 127.0.0.1:{port};"),
        };
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  log_format p '$request $status $body_bytes_sent';\n\
             access_log {d}/access.log p;\n\
             client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
             scgi_temp_path {d}/tmp/scgi;\n  default_type application/octet-stream;\n\
             server {{\n    {listen}\n{locs}  }}\n}}\n",
            d = d.display()
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("stderr.log")).unwrap());
        let mut guard = Guard::spawn(&mut cmd, true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = guard.child.try_wait().unwrap() {
                panic!(
                    "nginx exited at start-up ({st}): {}{}",
                    fs::read_to_string(d.join("stderr.log")).unwrap_or_default(),
                    fs::read_to_string(d.join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            _guard: guard,
            port,
            dir,
            tls: tls.is_some(),
        }
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// The hex server key that signed an archive.
fn key_of(archive: &Path) -> String {
    let a = mcast::archive::ArchiveFile::open(archive).unwrap();
    a.head
        .server_key
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `mcast-recv get TITLE --dir OUT ARGS…` (JSON, no known-servers file, no adverts).
fn recv(title: &str, out: &Path, args: &[&str]) -> Receiver {
    recv_env(title, out, args, &[])
}

fn recv_env(title: &str, out: &Path, args: &[&str], env: &[(&str, &Path)]) -> Receiver {
    let mut cmd = Command::new(recv_bin());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("get")
        .arg(title)
        .arg("--dir")
        .arg(out)
        .args(["--json", "--known-servers", "none", "--no-adverts"])
        .args(args);
    Receiver::spawn(cmd, out, title, false)
}

/// The final JSON report as a value (for the HTTP fields the common `Report` lacks).
fn done(f: &Finished) -> Value {
    let line = f
        .lines
        .iter()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("no final JSON report: {f:#?}"));
    serde_json::from_str(line).unwrap()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn http_only_from_nginx_is_byte_identical() {
    let Some(bin) = nginx_bin() else { return };
    let site = Site::new(147, "");
    let archive = site.pack("film", 3 * MB, 147);
    let key = key_of(&archive);
    let ng = Nginx::start(&bin, &[("/a/", &site.archive_dir())]);
    let out = site.out_dir("out");
    let f = recv(
        "film",
        &out,
        &["--http", &ng.url("/a/"), "--server-key", &key],
    )
    .wait(Duration::from_secs(30));
    f.assert_complete(&archive);
    let r = done(&f);
    let len = fs::metadata(&archive).unwrap().len();
    // Everything but the preamble (rebuilt locally), once: tail + head + packets.
    assert!(n(&r, "http_bytes") < len, "{r}");
    assert!(
        n(&r, "http_bytes") >= n(&r, "missing_bytes_at_http_start"),
        "{r}"
    );
    assert!(n(&r, "http_requests") >= 3, "{r}");
    assert_eq!(n(&r, "mirrors_dropped"), 0, "{r}");
    assert_eq!(n(&r, "http_packets_rejected"), 0, "{r}");
    assert!(f.lines.iter().any(|l| l.contains("\"via\":\"http\"")));
    assert!(!out.join("film.mca.state").exists());

    // A FEC archive: its repair region is never fetched (re-encoded from the data), and the
    // copy is still byte-identical.
    let input = site.path("fec.media");
    fs::write(&input, random_bytes(2 * MB, 1470)).unwrap();
    let st = Command::new(mcastd_bin())
        .arg("--config")
        .arg(&site.cfg)
        .args([
            "pack",
            "--compress",
            "none",
            "--fec-overhead",
            "0.2",
            "--title",
            "fecfilm",
        ])
        .arg(&input)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let fec = site.archive_path("fecfilm");
    let f = recv(
        "fecfilm",
        &out,
        &["--http", &ng.url("/a/"), "--server-key", &key],
    )
    .wait(Duration::from_secs(30));
    f.assert_complete(&fec);
    let r = done(&f);
    let a = mcast::archive::ArchiveFile::open(&fec).unwrap();
    assert!(a.layout.repair_packets > 0);
    assert!(
        n(&r, "http_bytes") < fs::metadata(&fec).unwrap().len() - a.layout.repair_packets * 1280,
        "repair symbols fetched: {r}"
    );

    // A key that did not sign it: refused (exit 3), nothing put in place.
    let out2 = site.out_dir("out2");
    let f = recv(
        "film",
        &out2,
        &[
            "--http",
            &ng.url("/a/film.mca"),
            "--server-key",
            &"ab".repeat(32),
        ],
    )
    .wait(Duration::from_secs(30));
    f.assert_code(3);
    assert!(
        f.stderr.contains("not signed by the trusted server key"),
        "{}",
        f.stderr
    );
    assert!(!out2.join("film.mca").exists());
    // No such title on the mirror: unreachable (exit 4), says which URL.
    let f = recv("nope", &out2, &["--http", &ng.url("/a/")]).wait(Duration::from_secs(30));
    f.assert_code(4);
    assert!(
        f.stderr.contains("/a/nope.mca") && f.stderr.contains("404"),
        "{}",
        f.stderr
    );
}

/// HTTPS from nginx, with HTTP/2 negotiated by ALPN; the mirror's certificate is trusted
/// through the system store (`SSL_CERT_FILE`, as rustls-native-certs reads it).
#[test]
fn https_mirror_over_http2() {
    let Some(bin) = nginx_bin() else { return };
    let site = Site::new(144, "");
    let archive = site.pack("film", 2 * MB, 144);
    let key = key_of(&archive);
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, pkey) = (site.path("cert.pem"), site.path("key.pem"));
    fs::write(&cert, ck.cert.pem()).unwrap();
    fs::write(&pkey, ck.signing_key.serialize_pem()).unwrap();
    let ng = Nginx::start_with(&bin, &[("/a/", &site.archive_dir())], Some((&cert, &pkey)));
    let out = site.out_dir("out");
    // Not trusted: every mirror dropped, naming the certificate problem (exit 4).
    let f = recv_env(
        "film",
        &out,
        &["--http", &ng.url("/a/"), "--server-key", &key],
        &[("SSL_CERT_FILE", &site.path("none.pem"))],
    )
    .wait(Duration::from_secs(30));
    f.assert_code(4);
    assert!(
        f.stderr.to_lowercase().contains("certificate"),
        "{}",
        f.stderr
    );
    let f = recv_env(
        "film",
        &out,
        &["--http", &ng.url("/a/"), "--server-key", &key],
        &[("SSL_CERT_FILE", &cert)],
    )
    .wait(Duration::from_secs(30));
    f.assert_complete(&archive);
    let log = ng.access_log();
    assert!(log.contains("GET /a/film.mca HTTP/2.0 206"), "{log}");
}

/// A copy of `archive` in `dir` with bytes flipped: every 200 kB of the data region
/// (`data`), and one byte in the second hash packet (`hash`).
fn corrupt_copy(archive: &Path, dir: &Path, data: bool, hash: bool) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let a = mcast::archive::ArchiveFile::open(archive).unwrap();
    let l = a.layout;
    let mut b = fs::read(archive).unwrap();
    if data {
        let mut off = l.data_offset() + 1000;
        while off < l.data_offset() + l.data_len {
            b[off as usize] ^= 0x5a;
            off += 200_000;
        }
    }
    if hash {
        b[(l.hash_offset() + l.symbol_size + 77) as usize] ^= 0x01;
    }
    let p = dir.join(archive.file_name().unwrap());
    fs::write(&p, b).unwrap();
    p
}

#[test]
fn a_corrupt_mirror_is_dropped_and_the_other_completes() {
    let Some(bin) = nginx_bin() else { return };
    let site = Site::new(146, "");
    let archive = site.pack("film", 3 * MB, 146);
    let key = key_of(&archive);
    let bad_data = corrupt_copy(&archive, &site.path("bad-data"), true, false);
    corrupt_copy(&archive, &site.path("bad-hash"), false, true);
    corrupt_copy(&archive, &site.path("bad-both"), true, true);
    let ng = Nginx::start(
        &bin,
        &[
            ("/good/", &site.archive_dir()),
            ("/bad-data/", &site.path("bad-data")),
            ("/bad-hash/", &site.path("bad-hash")),
            ("/bad-both/", &site.path("bad-both")),
        ],
    );
    assert_ne!(fs::read(&bad_data).unwrap(), fs::read(&archive).unwrap());
    for bad in ["/bad-data/", "/bad-hash/", "/bad-both/"] {
        let out = site.out_dir(&format!("out{}", bad.trim_matches('/')));
        // The corrupt mirror first: it serves the tail, head and first ranges.
        let mirrors = format!("{},{}", ng.url(&format!("{bad}film.mca")), ng.url("/good/"));
        let f = recv("film", &out, &["--http", &mirrors, "--server-key", &key])
            .wait(Duration::from_secs(30));
        f.assert_complete(&archive);
        let r = done(&f);
        assert!(n(&r, "http_packets_rejected") > 0, "{bad}: {r}");
        assert_eq!(n(&r, "mirrors_dropped"), 1, "{bad}: {r}");
        assert!(
            f.stderr.contains("fail verification"),
            "{bad}: {}",
            f.stderr
        );
    }
    // Only corrupt mirrors: every one dropped, integrity failure (exit 3), state kept.
    let out = site.out_dir("out-bad-only");
    let mirrors = format!("{},{}", ng.url("/bad-data/"), ng.url("/bad-both/"));
    let f = recv("film", &out, &["--http", &mirrors, "--server-key", &key])
        .wait(Duration::from_secs(30));
    f.assert_code(3);
    assert!(
        f.stderr.contains("every HTTP mirror was dropped")
            && f.stderr.contains("/bad-data/film.mca"),
        "{}",
        f.stderr
    );
    assert!(out.join("film.mca.state").exists() && !out.join("film.mca").exists());
    // The good mirror then finishes what the bad ones left (resume), fetching no more.
    let f = recv(
        "film",
        &out,
        &["--http", &ng.url("/good/"), "--server-key", &key],
    )
    .wait(Duration::from_secs(30));
    f.assert_complete(&archive);
    let r = done(&f);
    assert!(n(&r, "units_at_start") > 0, "{r}");
    assert!(
        n(&r, "http_bytes") as f64 <= 1.05 * n(&r, "missing_bytes_at_http_start") as f64,
        "{r}"
    );
}

/// A receiver that got most of a title by multicast (stopped by --timeout) fetches only the
/// missing rest over HTTP.
#[test]
fn multicast_then_http_fetches_only_the_missing_rest() {
    let Some(bin) = nginx_bin() else { return };
    // 8 MB at 8 Mbit/s: a loop of ~8 s; the receiver stops after 7.
    let site = Site::new(148, "rate_mbps = 8.0\ntiers_mbps = [8.0]");
    let archive = site.pack("film", 8 * MB, 148);
    let key = key_of(&archive);
    let _srv = site.serve();
    let ng = Nginx::start(&bin, &[("/m/", &site.archive_dir())]);
    let out = site.out_dir("out");
    let f = site
        .get(
            "film",
            &out,
            &[
                "--timeout",
                "7s",
                "--server-key",
                &key,
                "--json",
                "--no-adverts",
            ],
        )
        .wait(Duration::from_secs(30));
    f.assert_code(7);
    assert!(out.join("film.mca.state").exists());
    let f = recv(
        "film",
        &out,
        &["--http", &ng.url("/m/"), "--server-key", &key],
    )
    .wait(Duration::from_secs(30));
    f.assert_complete(&archive);
    let r = done(&f);
    let missing = n(&r, "missing_bytes_at_http_start");
    let total = n(&r, "loop_bytes");
    println!(
        "multicast held {:.1} %; HTTP fetched {} bytes in {} requests for {missing} missing",
        100.0 * (1.0 - missing as f64 / total as f64),
        n(&r, "http_bytes"),
        n(&r, "http_requests")
    );
    assert!(missing > 0, "{r}");
    assert!(missing <= total / 2, "multicast held under 50 %: {r}");
    assert!(n(&r, "http_bytes") as f64 <= 1.05 * missing as f64, "{r}");
    assert!(n(&r, "units_at_start") > 0, "{r}");
}

/// One raw HTTP/1.0 request: (status, headers, body).
fn raw(addr: SocketAddr, req: &str) -> (u16, String, Vec<u8>) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&out[..at]).to_ascii_lowercase();
    let code = head[9..12].parse().unwrap();
    (code, head, out[at + 4..].to_vec())
}

/// `mcastd`'s archive_http_listen: ranges, HEAD, 416, refusals; `get --http` from it; and the
/// mixed mode in one `get`: multicast for --repair-after, then only the rest over HTTP.
#[test]
fn mcastd_serves_archives_and_mixed_mode_repairs_over_http() {
    let port = free_port();
    let site = Site::new(
        149,
        &format!("rate_mbps = 8.0\ntiers_mbps = [8.0]\narchive_http_listen = \"127.0.0.1:{port}\""),
    );
    let archive = site.pack("film", 8 * MB, 149);
    let key = key_of(&archive);
    let bytes = fs::read(&archive).unwrap();
    let len = bytes.len();
    // Things that must never be served.
    fs::write(site.archive_dir().join("film.mca.part"), b"partial").unwrap();
    fs::write(site.path("secret.mca"), b"outside").unwrap();
    std::os::unix::fs::symlink(site.path("secret.mca"), site.archive_dir().join("link.mca"))
        .unwrap();
    let _srv = site.serve();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let (code, h, body) = raw(
        addr,
        "GET /archives/film.mca HTTP/1.0\r\nRange: bytes=100-1123\r\n\r\n",
    );
    assert_eq!(code, 206, "{h}");
    assert!(
        h.contains(&format!("content-range: bytes 100-1123/{len}")),
        "{h}"
    );
    assert!(h.contains("accept-ranges: bytes"), "{h}");
    assert_eq!(body, bytes[100..1124]);
    let (code, h, body) = raw(
        addr,
        "GET /archives/film.mca HTTP/1.0\r\nRange: bytes=-16\r\n\r\n",
    );
    assert_eq!(code, 206, "{h}");
    assert_eq!(body, bytes[len - 16..]);
    assert_eq!(&body[8..], b"MCASTEND");
    let (code, _, body) = raw(
        addr,
        &format!(
            "GET /archives/film.mca HTTP/1.0\r\nRange: bytes={}-\r\n\r\n",
            len - 5
        ),
    );
    assert_eq!((code, body.as_slice()), (206, &bytes[len - 5..]));
    let (code, h, _) = raw(
        addr,
        &format!("GET /archives/film.mca HTTP/1.0\r\nRange: bytes={len}-\r\n\r\n"),
    );
    assert_eq!(code, 416, "{h}");
    assert!(h.contains(&format!("content-range: bytes */{len}")), "{h}");
    let (code, h, body) = raw(addr, "HEAD /archives/film.mca HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200, "{h}");
    assert!(h.contains(&format!("content-length: {len}")), "{h}");
    assert!(body.is_empty());
    let (code, _, body) = raw(addr, "GET /archives/film.mca HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    assert_eq!(body, bytes, "the whole file without a Range");
    for bad in [
        "/archives/../mcastd.toml",
        "/archives/..%2fmcastd.toml",
        "/archives/%2e%2e/secret.mca",
        "/archives/../secret.mca",
        "/archives/film.mca.part",
        "/archives/link.mca",
        "/secret.mca",
        "/archives/",
    ] {
        let (code, _, body) = raw(addr, &format!("GET {bad} HTTP/1.0\r\n\r\n"));
        assert_eq!(code, 404, "{bad}");
        assert!(
            !body.starts_with(b"partial") && !body.starts_with(b"outside"),
            "{bad}"
        );
    }
    let (code, h, _) = raw(addr, "POST /archives/film.mca HTTP/1.0\r\n\r\n");
    assert_eq!(code, 405, "{h}");

    // HTTP only from mcastd.
    let mirror = format!("http://{addr}/archives/");
    let out = site.out_dir("out-http");
    let f = recv("film", &out, &["--http", &mirror, "--server-key", &key])
        .wait(Duration::from_secs(30));
    f.assert_complete(&archive);

    // Mixed, in one get: 8 MB at 8 Mbit/s, multicast for 5 s, then the rest over HTTP.
    let out = site.out_dir("out-mixed");
    let f = recv(
        "film",
        &out,
        &[
            "--server",
            &site.control.to_string(),
            "--http",
            &mirror,
            "--repair-after",
            "5s",
            "--server-key",
            &key,
            "--timeout",
            "40s",
        ],
    )
    .wait(Duration::from_secs(45));
    f.assert_complete(&archive);
    let r = done(&f);
    let missing = n(&r, "missing_bytes_at_http_start");
    println!(
        "mixed: multicast received {} bytes; HTTP fetched {} bytes for {missing} missing of {}",
        n(&r, "received_bytes"),
        n(&r, "http_bytes"),
        n(&r, "loop_bytes")
    );
    assert!(n(&r, "received_bytes") > 0, "{r}");
    assert!(missing > 0 && missing < n(&r, "loop_bytes"), "{r}");
    assert!(n(&r, "http_bytes") as f64 <= 1.05 * missing as f64, "{r}");
    assert!(f.stderr.contains("multicast phase ended"), "{}", f.stderr);
    assert!(f.lines.iter().any(|l| l.contains("\"via\":\"multicast\"")));
    assert!(f.lines.iter().any(|l| l.contains("\"via\":\"http\"")));
}

/// Mixed mode when the server dies mid-download: silence hands over to HTTP at once.
#[test]
fn a_killed_server_falls_through_to_http() {
    let Some(bin) = nginx_bin() else { return };
    let site = Site::new(145, "rate_mbps = 8.0\ntiers_mbps = [8.0]");
    let archive = site.pack("film", 8 * MB, 145);
    let key = key_of(&archive);
    let mut srv = site.serve();
    let ng = Nginx::start(&bin, &[("/m/", &site.archive_dir())]);
    let out = site.out_dir("out");
    let mut rx = recv(
        "film",
        &out,
        &[
            "--server",
            &site.control.to_string(),
            "--http",
            &ng.url("/m/"),
            "--repair-after",
            "60s",
            "--silence-timeout",
            "1s",
            "--server-key",
            &key,
        ],
    );
    rx.wait_progress(|p| p >= 20.0, Duration::from_secs(20));
    srv.guard.kill();
    let started = Instant::now();
    let f = rx.wait(Duration::from_secs(30));
    f.assert_complete(&archive);
    assert!(started.elapsed() < Duration::from_secs(15));
    let r = done(&f);
    assert!(f.stderr.contains("went silent"), "{}", f.stderr);
    let missing = n(&r, "missing_bytes_at_http_start");
    assert!(missing > 0 && missing < n(&r, "loop_bytes"), "{r}");
    assert!(n(&r, "http_bytes") as f64 <= 1.05 * missing as f64, "{r}");
}
