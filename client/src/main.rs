//! `mcast-recv`: fetch archives from an mcast server to disk.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};

use mcast_io::iface::Iface;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mcast_keys::PublicIdentity;
use mcast_proto::wire::control::Control;
use mcast_recv::control::ControlClient;
use mcast_recv::error::{Failure, RecvError};
use mcast_recv::get::{get, GetOptions};
use mcast_recv::{args, human};

#[derive(Parser)]
#[command(
    name = "mcast-recv",
    version,
    about = "mcast receiver: fetches archives from an mcast server's carousel to disk, and plays them with a ticket",
    after_help = "Exit status: 0 done; 1 failure; 2 bad usage; 3 integrity failure; 4 server unreachable; \
                  5 title not found (play: archive not downloaded); 6 disk full; 7 timed out; \
                  8 play ticket refused (expired, revoked, already used, forged or modified, not for \
                  this title or archive); 9 batch: some titles left for the next window (partial \
                  or not started; run the batch again); 10 batch: some titles failed (see its \
                  report); 130 interrupted. After 1, 4, 6, 7, 9 or 130 \
                  the same command resumes where it stopped."
)]
struct Cli {
    /// Log filter (e.g. "info", "debug"). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a title into DIR as DIR/<title>.mca (resumes an interrupted download).
    Get {
        /// Title to fetch.
        title: String,
        /// Server control endpoint [default: 127.0.0.1:7600, unless --http is given alone].
        #[arg(long, short)]
        server: Option<String>,
        /// Traffic directors, comma-separated HOST:PORT (instead of --server): a director
        /// picks a healthy server holding the title; when one director does not answer the
        /// next is asked, and when the server goes silent the download resumes on another.
        #[arg(long, value_delimiter = ',', conflicts_with = "server")]
        director: Vec<String>,
        /// With --director: a server that sends nothing verifiable for this long is given up
        /// and the download resumes on another server. With --http (and --server or
        /// --director): then what is missing is fetched over HTTP.
        #[arg(long, default_value = "3s", value_name = "DURATION", alias = "silence-timeout-ms",
              value_parser = args::duration_or_ms)]
        silence_timeout: Duration,
        /// Directory the archive is written to (DIR/<title>.mca).
        #[arg(long, short, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Deprecated spelling of --dir.
        #[arg(long, short, value_name = "DIR", hide = true, conflicts_with = "dir")]
        output: Option<PathBuf>,
        /// Interface to join multicast on: its name (eth0), an address of it (198.18.0.2,
        /// fe80::2%eth0; of the groups' family), or "auto" (the
        /// interface the route to the server, or first director, leaves from).
        #[arg(long, default_value = "auto", value_name = "ADDR|NAME|auto")]
        iface: String,
        /// Server identity (64 hex chars, from `mcastd keygen`). Without it the key the
        /// known-servers file holds for this server is required, or, for a server never seen,
        /// the first key seen is trusted and remembered there.
        #[arg(long)]
        server_key: Option<String>,
        /// Server keys remembered across downloads (like SSH's known_hosts): once a server's
        /// key is seen, a head signed by another key is refused. Default: $MCAST_KNOWN_SERVERS,
        /// else $XDG_DATA_HOME/mcast/known_servers, else ~/.local/share/mcast/known_servers;
        /// "none" remembers nothing (trust on first use per title).
        #[arg(long, value_name = "FILE")]
        known_servers: Option<PathBuf>,
        /// Ask for unicast if nothing arrives by multicast within this long.
        #[arg(long, default_value = "1500ms", value_name = "DURATION", alias = "sync-timeout-ms",
              value_parser = args::duration_or_ms)]
        sync_timeout: Duration,
        /// Receive buffer to ask for on the data sockets, bytes (the kernel caps it at
        /// net.core.rmem_max unless the process may force it: CAP_NET_ADMIN). Granted size is logged.
        #[arg(long, default_value_t = 4 << 20)]
        recv_buffer: usize,
        /// Write the archive with O_DIRECT, bypassing the page cache (for hosts short of
        /// memory; on virtual disks it costs more CPU than the default, which writes through
        /// the page cache and drops what is already on disk from it as it goes).
        #[arg(long)]
        direct_io: bool,
        /// Give up after this long, e.g. 30s, 10m (state kept; run again to resume).
        #[arg(long, value_name = "DURATION", value_parser = args::duration_or_secs)]
        timeout: Option<Duration>,
        /// Progress as JSON lines on stdout (default when stdout is not a terminal): units
        /// held (`have`), and made durable by the last checkpoint (`saved`: a restart after a
        /// crash resumes with at least these), payload bytes held (`bytes` of `total_bytes`),
        /// the receive rate (`rate_mbps`), `eta_s` and the `tier`; then a `done` report.
        #[arg(long)]
        json: bool,
        /// On a resume, ask for the loop to start right after the longest run already held
        /// (takes effect when this join opens the title's loop), so what is missing comes first.
        #[arg(long)]
        resume_at_gap: bool,
        /// DSCP of what this receiver sends (requests, NAKs): a name (CS1, AF11, AF41, EF, …)
        /// or a number 0..=63.
        #[arg(long, default_value = "default", value_parser = mcast_io::dscp::Dscp::parse)]
        dscp: mcast_io::dscp::Dscp,
        /// TTL of the NAKs multicast to the group, 1..=255 (1: this subnet only).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
        nak_ttl: u32,
        /// Do not fetch the adverts the server lists for the title (`batch` fetches them itself).
        #[arg(long)]
        no_adverts: bool,
        /// HTTP mirrors of the archive, comma-separated URLs: one ending in / is a directory
        /// holding <title>.mca, any other is the archive file itself (any web server with
        /// range requests: nginx, a CDN, mcastd's archive_http_listen). Every packet is
        /// verified against the signed head; a mirror serving a bad one is dropped. Alone
        /// (no --server/--director), the archive is fetched over HTTP only; with them,
        /// multicast first and what is still missing after --repair-after (or when the
        /// server is unreachable or goes silent) over HTTP.
        #[arg(long, value_delimiter = ',', value_name = "URL")]
        http: Vec<String>,
        /// Fetch over HTTP only (--http), no multicast even when --server or --director is
        /// given. The head must be signed by --server-key, else by the key a resumed download
        /// was pinned to, else the first key seen is trusted (with a warning).
        #[arg(long, requires = "http")]
        http_only: bool,
        /// With --http and --server/--director: receive by multicast for at most this long,
        /// then stop the session (state saved, as a --timeout would) and fetch only what is
        /// missing over HTTP.
        #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = args::duration_or_secs)]
        repair_after: Duration,
        /// HTTP range requests in flight at once, 1..=64 (spread round-robin over the
        /// mirrors; each asks for at most 2 MiB).
        #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        http_parallel: u16,
    },
    /// Fetch a list of titles unattended (overnight pre-load): skips titles already complete,
    /// resumes partial ones, runs up to --concurrency `get`s at once, stops at the window's end
    /// and when the disk is full, and writes a JSON report.
    #[command(
        after_help = "List file: one title per line; blank lines and # comments are \
                  ignored.\n\
                  Window: START-END as HH:MM or HH:MM:SS (an end at or before the start crosses \
                  midnight) in --tz (default UTC, or a fixed offset like +02:00). Before it opens \
                  the batch waits; at its end every running fetch is stopped (resumable).\n\
                  Exit status: 0 every title done; 9 some titles left for the next window \
                  (partial or not started: window ended, disk full, server unreachable); \
                  10 some titles failed for good (not on the server, integrity; see the report); \
                  2 bad usage; 130 interrupted. Run the same command again to carry on."
    )]
    Batch {
        /// File listing the titles to fetch (one a line, `#` comments). Needed unless
        /// --placement-from gives the titles; with both, the list's come first.
        #[arg(long, required_unless_present = "placement_from")]
        list: Option<PathBuf>,
        /// Traffic directors, comma-separated HOST:PORT, to ask for the titles to pre-load at
        /// --site (`mcast-recv placement`): the edge server's archive directory is filled
        /// from --server (the origin). Needs an admin address of the directors.
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "HOST:PORT",
            requires = "site"
        )]
        placement_from: Vec<String>,
        /// With --placement-from: the site ([[director.sites]] name) whose titles to fetch.
        #[arg(long, requires = "placement_from")]
        site: Option<String>,
        /// Fetch only inside this daily window, e.g. 01:00-05:00 (default: until all are done).
        #[arg(long)]
        window: Option<String>,
        /// Time zone of --window: UTC or a fixed offset such as +02:00.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Server control endpoint.
        #[arg(long, short, default_value = "127.0.0.1:7600")]
        server: String,
        /// Traffic directors, comma-separated HOST:PORT (instead of --server), as for `get`.
        #[arg(long, value_delimiter = ',', conflicts_with = "server")]
        director: Vec<String>,
        /// Directory the archives are written to (DIR/<title>.mca).
        #[arg(long, short, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Deprecated spelling of --dir.
        #[arg(long, short, value_name = "DIR", hide = true, conflicts_with = "dir")]
        output: Option<PathBuf>,
        /// Titles fetched at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Write the JSON report here too (atomically); it always goes to stdout.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Interface to join multicast on: its name (eth0), an address of it (198.18.0.2,
        /// fe80::2%eth0; of the groups' family), or "auto" (the
        /// interface the route to the server, or first director, leaves from).
        #[arg(long, default_value = "auto", value_name = "ADDR|NAME|auto")]
        iface: String,
        /// Server identity (64 hex chars), passed to every `get` and used to check titles
        /// already on disk.
        #[arg(long)]
        server_key: Option<String>,
        /// The known-servers file every `get` uses (see `mcast-recv get --help`); the systemd
        /// unit keeps it in its state directory.
        #[arg(long, value_name = "FILE")]
        known_servers: Option<PathBuf>,
        /// At the window's end a fetch gets SIGINT (it checkpoints and stops); one still running
        /// after this long is killed (its state file still resumes it).
        #[arg(long, default_value = "3s", value_name = "DURATION", alias = "grace-ms",
              value_parser = args::duration_or_ms)]
        grace: Duration,
        /// DSCP of what every `get` sends (see `mcast-recv get --help`; CS1 or LE suit an
        /// overnight pre-load that must yield to other traffic).
        #[arg(long, default_value = "default", value_parser = mcast_io::dscp::Dscp::parse)]
        dscp: mcast_io::dscp::Dscp,
        /// TTL of every `get`'s NAKs (see `mcast-recv get --help`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
        nak_ttl: u32,
    },
    /// Print the titles a director says to pre-load at a site: the site's `preload` titles
    /// none of its servers holds, then titles its receivers asked for that it does not hold,
    /// most requested first (one per line; a JSON document with --json). Answered only to the
    /// directors' admin addresses. Feed it to `batch --placement-from` to pre-load them.
    Placement {
        /// Traffic directors, comma-separated HOST:PORT: the first that answers is used.
        #[arg(long, value_delimiter = ',', required = true, value_name = "HOST:PORT")]
        director: Vec<String>,
        /// The site ([[director.sites]] name in the directors' config).
        #[arg(long)]
        site: String,
        /// `{"site": ..., "director": ..., "titles": [...]}` instead of one title per line.
        #[arg(long)]
        json: bool,
    },
    /// List the titles a server has (a table on a terminal, JSON lines otherwise).
    Catalog {
        /// Server control endpoint.
        #[arg(long, short, default_value = "127.0.0.1:7600")]
        server: String,
        /// Traffic directors, comma-separated HOST:PORT (instead of --server): the catalogue
        /// of a healthy server a director picks.
        #[arg(long, value_delimiter = ',', conflicts_with = "server")]
        director: Vec<String>,
        /// One JSON object per line (the default when stdout is not a terminal).
        #[arg(long)]
        json: bool,
    },
    /// List the titles held in a download directory: complete or partial (with percent),
    /// and whether they verify (a table on a terminal, JSON lines otherwise).
    List {
        /// Download directory (as given to `get --dir`).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Check every packet of complete archives, not only their signed head (reads them).
        #[arg(long)]
        verify: bool,
        /// One JSON object per line (the default when stdout is not a terminal).
        #[arg(long)]
        json: bool,
    },
    /// Play a downloaded title with a play ticket: the server checks the ticket and releases
    /// its half of the key; the plaintext goes to OUT (written atomically) or stdout.
    /// No key part is ever written to disk.
    Play {
        /// Title to play (DIR/<title>.mca must be complete: see `get`).
        title: String,
        /// Ticket file from `mcastd ticket issue` (encrypted titles only: adverts and plug-ins
        /// play without one).
        #[arg(long)]
        ticket: Option<PathBuf>,
        /// Directory holding <title>.mca.
        #[arg(long, short, default_value = ".")]
        dir: PathBuf,
        /// Output file, or "-" for stdout (e.g. `| mpv -`).
        #[arg(long, short, default_value = "-")]
        output: PathBuf,
        /// Server control endpoint (the server that issued the ticket).
        #[arg(long, short, default_value = "127.0.0.1:7600")]
        server: String,
        /// Server identity (64 hex chars). Default: the key that signed the archive on disk.
        #[arg(long)]
        server_key: Option<String>,
        /// Also check every packet against the signed manifest while decrypting (the download
        /// already did; every frame is authenticated either way).
        #[arg(long)]
        verify_packets: bool,
        /// Print the final report as JSON (on stderr when the plaintext goes to stdout).
        #[arg(long)]
        json: bool,
    },
    /// Print a server's counters and open channels, or a director's view of its servers
    /// (`key=value` lines and tables on a terminal, JSON otherwise). Answered only to the
    /// server's or director's admin addresses.
    Stats {
        /// Server control endpoint.
        #[arg(long, short, default_value = "127.0.0.1:7600")]
        server: String,
        /// Traffic directors, comma-separated HOST:PORT (instead of --server): the first that
        /// answers gives its own stats (its servers, their health, its routing counters).
        #[arg(long, value_delimiter = ',', conflicts_with = "server")]
        director: Vec<String>,
        /// The JSON document (the default when stdout is not a terminal).
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for SHELL to stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: mcast_io::cli_docs::Shell,
    },
    /// Write the manual pages into DIR (packaging).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `--iface`: an address, an interface name, or "auto" (the interface of the route toward
/// `toward`, for groups of either family).
fn resolve_iface(spec: &str, toward: SocketAddr) -> Result<Iface, RecvError> {
    let r = if spec.trim().eq_ignore_ascii_case("auto") {
        mcast_io::iface::toward(toward)
    } else {
        mcast_io::iface::resolve(spec)
    };
    r.map_err(|e| RecvError::new(Failure::Usage, format!("--iface: {e}")))
}

/// HOST:PORT (`[::1]:7600` for IPv6): its first IPv4 address, else its first IPv6 one.
fn resolve(s: &str) -> Result<SocketAddr, RecvError> {
    let all: Vec<SocketAddr> = s.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| {
            RecvError::new(
                Failure::Usage,
                format!("--server {s:?}: not a HOST:PORT that resolves (an IPv6 address goes in brackets: [::1]:7600)"),
            )
        })
}

/// The final line of a fetch that ended over HTTP.
fn print_http_report(r: &mcast_recv::get::GetReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap());
    } else {
        println!(
            "{}: complete and verified ({} bytes) in {:.1}s; over HTTP {} bytes in {} requests for {} missing{}",
            r.path.display(),
            r.archive_bytes,
            r.seconds,
            r.http_bytes,
            r.http_requests,
            r.missing_bytes_at_http_start,
            if r.mirrors_dropped > 0 {
                format!("; {} mirror(s) dropped", r.mirrors_dropped)
            } else {
                String::new()
            }
        );
    }
}

/// `--known-servers`: the file given, "none" for no store, else the default path.
fn known_servers_path(arg: Option<PathBuf>) -> Option<PathBuf> {
    match arg {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => mcast_recv::known_servers::default_path(),
    }
}

fn parse_server_key(k: &str) -> Result<PublicIdentity, RecvError> {
    hex::decode(k)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(PublicIdentity)
        .ok_or_else(|| RecvError::new(Failure::Usage, "--server-key: expected 64 hex characters"))
}

fn run(cli: Cli) -> Result<(), RecvError> {
    match cli.cmd {
        Cmd::Play {
            title,
            ticket,
            dir,
            output,
            server,
            server_key,
            verify_packets,
            json,
        } => {
            use mcast_recv::play::{play, PlayOptions, PlayOutput};
            let out = if output.as_os_str() == "-" {
                PlayOutput::Stdout
            } else {
                PlayOutput::File(output)
            };
            let to_stdout = out == PlayOutput::Stdout;
            if to_stdout && std::io::stdout().is_terminal() {
                return Err(RecvError::new(
                    Failure::Usage,
                    "refusing to write media to a terminal: give -o FILE, or pipe into a player (| mpv -)",
                ));
            }
            let mut o = PlayOptions::new(resolve(&server)?, &title, ticket.as_deref(), out);
            o.dir = dir;
            o.server_key = server_key.as_deref().map(parse_server_key).transpose()?;
            o.verify_packets = verify_packets;
            // Without signal handlers Ctrl-C still ends the process; only the clean stop is lost.
            let stop =
                mcast_io::process::stop_flag().unwrap_or_else(|_| Arc::new(AtomicBool::new(false)));
            let r = play(&o, stop)?;
            let line = if json {
                serde_json::to_string(&r).unwrap()
            } else {
                r.summary()
            };
            if to_stdout {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Get {
            title,
            server,
            director,
            silence_timeout,
            dir,
            output,
            iface,
            server_key,
            known_servers,
            sync_timeout,
            recv_buffer,
            direct_io,
            timeout,
            json,
            resume_at_gap,
            dscp,
            nak_ttl,
            no_adverts,
            http,
            http_only,
            repair_after,
            http_parallel,
        } => {
            let output = old_dir_flag(dir, output);
            let http: Vec<String> = http
                .iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect();
            let only_http =
                !http.is_empty() && (http_only || (server.is_none() && director.is_empty()));
            if !http.is_empty() {
                mcast_recv::http_fetch::check_urls(&http)?;
            }
            let directors = resolve_directors(&director)?;
            let server = server.unwrap_or_else(|| "127.0.0.1:7600".to_string());
            let mut o = GetOptions::new(
                match directors.first() {
                    Some(d) => *d,
                    None if only_http => "127.0.0.1:7600".parse().expect("address"),
                    None => resolve(&server)?,
                },
                &title,
                &output,
            );
            if !only_http {
                o.iface = resolve_iface(&iface, o.server)?;
            }
            tracing::debug!(iface = %o.iface.name, index = o.iface.index, spec = %iface, "multicast interface");
            o.dscp = dscp;
            o.nak_ttl = nak_ttl;
            o.server_key = match server_key {
                Some(k) => {
                    let b = hex::decode(&k)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| {
                            RecvError::new(
                                Failure::Usage,
                                "--server-key: expected 64 hex characters",
                            )
                        })?;
                    Some(PublicIdentity(b))
                }
                None => None,
            };
            o.known_servers = known_servers_path(known_servers);
            o.sync_timeout = sync_timeout;
            o.recv_buffer = recv_buffer;
            o.direct_io = direct_io;
            o.timeout = timeout;
            o.repair_after = repair_after;
            if resume_at_gap && directors.is_empty() {
                o.start_block = mcast_recv::failover::resume_block(&output, &title);
            }
            let terminal = std::io::stdout().is_terminal();
            o.json = json || !terminal;
            o.progress_bar = !o.json && std::io::stderr().is_terminal();
            // Without signal handlers Ctrl-C still ends the process; only the clean stop is lost.
            let stop =
                mcast_io::process::stop_flag().unwrap_or_else(|_| Arc::new(AtomicBool::new(false)));
            // A stopped download says what it holds (JSON): `batch` reads it from there.
            let stopped = |e: RecvError| {
                if let (true, Some(r)) = (o.json, &e.resume) {
                    let line = serde_json::json!({
                        "event": "stopped",
                        "title": &o.title,
                        "reason": &e.message,
                        "exit_code": e.kind as u8,
                        "resume": r,
                    });
                    println!("{line}");
                }
                e
            };
            let mut ho =
                mcast_recv::http_fetch::HttpFetchOptions::new(&title, &output, http.clone());
            ho.server_key = o.server_key;
            ho.json = o.json;
            ho.progress_bar = o.progress_bar;
            ho.timeout = timeout;
            ho.parallel = http_parallel as usize;
            if only_http {
                let r = mcast_recv::http_fetch::fetch(&ho, stop).map_err(stopped)?;
                print_http_report(&r, o.json);
                return Ok(());
            }
            let started = std::time::Instant::now();
            if !http.is_empty() {
                // Multicast for at most --repair-after (within --timeout), then HTTP; a server
                // that goes silent hands over to HTTP too.
                o.timeout = Some(timeout.map_or(repair_after, |t| t.min(repair_after)));
                o.silence_timeout = Some(silence_timeout.max(Duration::from_millis(100)));
            }
            // The multicast phase ended without the archive: with --http, fetch the rest there.
            let handover = |e: RecvError, stop: Arc<AtomicBool>| -> Result<(), RecvError> {
                let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
                let handed = e.http_handover
                    || matches!(
                        e.kind,
                        Failure::Timeout | Failure::Unreachable | Failure::NotFound
                    );
                // --http, else the mirrors of this receiver's site (from its director).
                let mirrors = if http.is_empty() {
                    e.http_mirrors.as_deref().cloned().unwrap_or_default()
                } else {
                    http.clone()
                };
                if mirrors.is_empty() || !handed || left == Some(Duration::ZERO) {
                    return Err(stopped(e));
                }
                tracing::info!(reason = %e.message, mirrors = mirrors.len(), "multicast phase ended: fetching what is missing over HTTP");
                let mut ho = ho.clone();
                ho.mirrors = mirrors;
                ho.timeout = left;
                let mut r = mcast_recv::http_fetch::fetch(&ho, stop).map_err(stopped)?;
                r.received_bytes = e.received_bytes;
                print_http_report(&r, o.json);
                Ok(())
            };
            if !directors.is_empty() {
                let r = match mcast_recv::failover::get_via_directors(
                    &o,
                    directors,
                    silence_timeout.max(Duration::from_millis(100)),
                    stop.clone(),
                ) {
                    Ok(r) => r,
                    Err(e) => return handover(e, stop),
                };
                // The adverts come from the server that finished the title (its catalogue
                // names them; their heads must be signed by the title's server).
                let last = r.servers.last().and_then(|s| s.parse::<SocketAddr>().ok());
                if let (false, Some(server)) = (no_adverts, last) {
                    let mut ao = o.clone();
                    ao.server = server;
                    mcast_recv::adverts::fetch_for(&ao, stop);
                }
                if o.json {
                    println!("{}", serde_json::to_string(&r).unwrap());
                } else {
                    println!(
                        "{}: complete and verified ({} bytes) in {:.1}s via {}{}",
                        r.last.path.display(),
                        r.last.archive_bytes,
                        r.last.seconds,
                        r.servers.join(" -> "),
                        if r.switches > 0 {
                            format!(
                                "; after the switch received {} bytes for {} missing",
                                r.received_bytes_after_switch, r.missing_bytes_at_switch
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                return Ok(());
            }
            let r = match get(&o, stop.clone()) {
                Ok(r) => r,
                Err(e) => return handover(e, stop),
            };
            if !no_adverts {
                mcast_recv::adverts::fetch_for(&o, stop);
            }
            if o.json {
                println!("{}", serde_json::to_string(&r).unwrap());
            } else {
                println!(
                    "{}: complete and verified ({} bytes; received {:.2} loops' worth{}) in {:.1}s",
                    r.path.display(),
                    r.archive_bytes,
                    r.received_bytes as f64 / r.loop_bytes.max(1) as f64,
                    if r.unicast {
                        ", via unicast fallback"
                    } else {
                        ""
                    },
                    r.seconds
                );
            }
            Ok(())
        }
        Cmd::Placement {
            director,
            site,
            json,
        } => {
            let directors = resolve_directors(&director)?;
            let titles = mcast_recv::failover::placement(&directors, &site)?;
            if json {
                let doc = serde_json::json!({ "site": site, "titles": titles });
                println!("{doc}");
            } else {
                for t in &titles {
                    println!("{t}");
                }
            }
            Ok(())
        }
        Cmd::Batch {
            list,
            placement_from,
            site,
            window,
            tz,
            server,
            director,
            dir,
            output,
            concurrency,
            report,
            iface,
            server_key,
            known_servers,
            grace,
            dscp,
            nak_ttl,
        } => {
            use mcast_recv::batch;
            let output = old_dir_flag(dir, output);
            let mut titles = Vec::new();
            if let Some(list) = &list {
                let text = std::fs::read_to_string(list).map_err(|e| {
                    RecvError::new(Failure::Usage, format!("--list {}: {e}", list.display()))
                })?;
                titles = batch::parse_list(&text).map_err(|e| {
                    RecvError::new(Failure::Usage, format!("--list {}: {e}", list.display()))
                })?;
            }
            if let Some(site) = &site {
                let from = resolve_directors(&placement_from)?;
                let placed = mcast_recv::failover::placement(&from, site)?;
                eprintln!(
                    "batch: {} title(s) to pre-load at site {site} from the directors' placement",
                    placed.len()
                );
                titles = batch::merge_titles(titles, placed)
                    .map_err(|e| RecvError::new(Failure::Other, e))?;
            }
            let win = window
                .as_deref()
                .map(|w| mcast_proto::schedule::Window::parse(w, &tz, &[]))
                .transpose()
                .map_err(|e| RecvError::new(Failure::Usage, format!("--window/--tz: {e}")))?;
            let directors: Vec<String> = director
                .iter()
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect();
            let mut get_args: Vec<std::ffi::OsString> = Vec::new();
            let catalog_server = if directors.is_empty() {
                get_args.extend(["--server".into(), server.clone().into()]);
                Some(resolve(&server)?)
            } else {
                for d in &directors {
                    resolve(d)?;
                }
                get_args.extend(["--director".into(), directors.join(",").into()]);
                // Sizes and adverts from the catalogue of a server a director picks; without
                // one the batch still runs (sizes learnt from the downloads, no adverts).
                match server_or_routed(&server, &directors) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e.message, "no catalogue through the directors: adverts not pre-loaded");
                        None
                    }
                }
            };
            // Checked here so a bad name fails at once, not in every child ("auto" routes
            // toward each child's server).
            if !iface.trim().eq_ignore_ascii_case("auto") {
                mcast_io::iface::resolve(&iface)
                    .map_err(|e| RecvError::new(Failure::Usage, format!("--iface: {e}")))?;
            }
            get_args.extend(["--iface".into(), iface.clone().into()]);
            get_args.extend(["--dscp".into(), dscp.to_string().into()]);
            get_args.extend(["--nak-ttl".into(), nak_ttl.to_string().into()]);
            let key = server_key.as_deref().map(parse_server_key).transpose()?;
            if let Some(k) = &server_key {
                get_args.extend(["--server-key".into(), k.into()]);
            }
            if let Some(f) = &known_servers {
                get_args.extend(["--known-servers".into(), f.into()]);
            }
            let exe = std::env::current_exe().map_err(|e| {
                RecvError::new(Failure::Other, format!("cannot find own executable: {e}"))
            })?;
            let o = batch::BatchOptions {
                titles,
                out_dir: output,
                window: win,
                window_text: window.map(|w| format!("{w} {tz}")).unwrap_or_default(),
                concurrency: concurrency.max(1),
                report,
                exe,
                get_args,
                catalog_server,
                dscp,
                server_key: key,
                grace,
            };
            let stop =
                mcast_io::process::stop_flag().unwrap_or_else(|_| Arc::new(AtomicBool::new(false)));
            let r = batch::run(&o, stop)?;
            println!("{}", serde_json::to_string(&r).unwrap());
            eprintln!(
                "batch: {} done, {} partial, {} failed ({}); {} bytes fetched",
                r.done, r.partial, r.failed, r.stopped, r.bytes_this_run
            );
            match r.exit_code() {
                0 => Ok(()),
                code => Err(RecvError {
                    kind: if code == batch::EXIT_LEFT {
                        Failure::Left
                    } else {
                        Failure::Failed
                    },
                    message: format!(
                        "{} title(s) left for the next window, {} failed",
                        r.partial, r.failed
                    ),
                    ..RecvError::new(Failure::Failed, "")
                }),
            }
        }
        Cmd::Catalog {
            server,
            director,
            json,
        } => {
            let server = server_or_routed(&server, &director)?;
            let json = json || !std::io::stdout().is_terminal();
            let mut c = ControlClient::new(server, rand::random())?;
            let mut start = 0u16;
            if !json {
                println!("{}", mcast_recv::adverts::catalog_header());
            }
            loop {
                match c.request(
                    Control::CatalogRequest { start },
                    5,
                    Duration::from_millis(400),
                )? {
                    Control::CatalogReply { items, more } => {
                        for i in &items {
                            if json {
                                let line = serde_json::json!({
                                    "title": i.title,
                                    "plain_bytes": i.plain_len,
                                    "archive_bytes": i.archive_len,
                                    "advert": i.advert,
                                    "plugin": i.plugin,
                                    "trailer": i.trailer,
                                    "advert_for": i.advert_for,
                                    "watermark_unverified": i.watermark,
                                    "server": server.to_string(),
                                });
                                println!("{line}");
                            } else {
                                println!("{}", mcast_recv::adverts::catalog_line(i));
                            }
                        }
                        if !more || items.is_empty() {
                            return Ok(());
                        }
                        start = start.saturating_add(items.len() as u16);
                    }
                    other => {
                        return Err(RecvError::new(
                            Failure::Other,
                            format!("unexpected reply: {other:?}"),
                        ))
                    }
                }
            }
        }
        Cmd::List { dir, verify, json } => {
            let items = mcast_recv::list::scan(&dir, verify)
                .map_err(|e| RecvError::io("cannot list", &dir, e))?;
            if json || !std::io::stdout().is_terminal() {
                for h in &items {
                    println!("{}", serde_json::to_string(h).unwrap());
                }
            } else if items.is_empty() {
                println!("{}: no titles (complete or partial)", dir.display());
            } else {
                print!("{}", mcast_recv::list::table(&items));
            }
            match items.iter().any(|h| h.verified.starts_with("FAILED")) {
                true => Err(RecvError::new(
                    Failure::Integrity,
                    "an archive failed its check (see VERIFIED): fetch it again",
                )),
                false => Ok(()),
            }
        }
        Cmd::Stats {
            server,
            director,
            json,
        } => {
            // A director answers stats itself; the first one that answers is shown.
            let targets = match resolve_directors(&director)? {
                d if d.is_empty() => vec![resolve(&server)?],
                d => d,
            };
            let mut last = None;
            for t in targets {
                let reply = ControlClient::new(t, rand::random()).and_then(|mut c| {
                    c.request(Control::StatsRequest, 5, Duration::from_millis(400))
                });
                match reply {
                    Ok(Control::StatsReply { json: doc }) => {
                        if json || !std::io::stdout().is_terminal() {
                            println!("{doc}");
                        } else {
                            let v: serde_json::Value = serde_json::from_str(&doc).map_err(|e| {
                                RecvError::new(
                                    Failure::Other,
                                    format!("stats from {t} are not JSON: {e}"),
                                )
                            })?;
                            println!("# stats of {t}");
                            print!("{}", human::render(&v));
                        }
                        return Ok(());
                    }
                    Ok(Control::Error { message, .. }) => {
                        last = Some(RecvError::new(Failure::Other, format!("{t}: {message}")))
                    }
                    Ok(other) => {
                        last = Some(RecvError::new(
                            Failure::Other,
                            format!("{t}: unexpected reply: {other:?}"),
                        ))
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| RecvError::new(Failure::Usage, "no server or director given")))
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            mcast_io::cli_docs::completions(Cli::command(), shell, &mut std::io::stdout().lock());
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            mcast_io::cli_docs::man_command(Cli::command(), &dir)
                .map_err(|e| RecvError::new(Failure::Other, e))
        }
    }
}

/// `--dir`, or the deprecated `--output`/`-o` of `get` and `batch` (a directory there, a
/// file everywhere else).
fn old_dir_flag(dir: PathBuf, output: Option<PathBuf>) -> PathBuf {
    match output {
        Some(o) => {
            args::deprecated("`-o/--output DIR` for the download directory: use `-d/--dir DIR`");
            o
        }
        None => dir,
    }
}

/// `--director A,B` as addresses (empty entries skipped).
fn resolve_directors(director: &[String]) -> Result<Vec<SocketAddr>, RecvError> {
    director
        .iter()
        .filter(|d| !d.trim().is_empty())
        .map(|d| resolve(d.trim()))
        .collect()
}

/// `--server`, or with `--director` a healthy server a director picks (any title).
fn server_or_routed(server: &str, director: &[String]) -> Result<SocketAddr, RecvError> {
    let directors = resolve_directors(director)?;
    if directors.is_empty() {
        return resolve(server);
    }
    let mut dc = mcast_recv::failover::DirectorClient::new(directors)?;
    let stop = AtomicBool::new(false);
    let s = dc.route(
        "",
        &mut Vec::new(),
        std::time::Instant::now() + Duration::from_secs(5),
        &stop,
    )?;
    tracing::info!(server = %s, "director picked a server");
    Ok(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = mcast_io::process::init_logging(&cli.log) {
        eprintln!("mcast-recv: error: {e}");
        return ExitCode::from(Failure::Usage as u8);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A batch that left titles for the next window did its job: no "error".
        Err(e) if e.kind == Failure::Left => {
            eprintln!("mcast-recv: {}", e.message);
            ExitCode::from(e.kind as u8)
        }
        Err(e) => {
            eprintln!("mcast-recv: error: {}", e.message);
            ExitCode::from(e.kind as u8)
        }
    }
}
