//! `mcast-director`: traffic director. Takes heartbeats from every `mcastd`, routes receivers'
//! requests to a healthy server that holds the title, and stops routing to a server whose
//! heartbeats stop. The logic is [`mcast::director::Director`] (sans-I/O); this driver owns
//! the socket and the clock.

use std::io::{ErrorKind, Write};
use std::net::UdpSocket;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use mcast::config::DirectorConfig;
use mcast::director::{Director, Event, Params};

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "mcast-director",
    version,
    about = "mcast traffic director: routes receivers to a healthy mcastd that holds the title, \
             from the servers' authenticated heartbeats",
    after_help = "Run two or more: all are active. Servers list every director in mcastd.toml \
                  [directors] addrs; receivers use `mcast-recv get TITLE --director A,B`.\n\
                  Counters and servers (JSON): `mcast-recv stats --server DIRECTOR`.\n\
                  Exit status: 0 stopped cleanly; 1 failure (socket, key file); 2 bad usage or config.\n\
                  Config: conf/director.toml documents every field; defaults without --config."
)]
struct Cli {
    /// Config file (TOML). Built-in defaults when absent.
    #[arg(long, short, global = true, env = "MCAST_DIRECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, overriding the config (e.g. "debug"). RUST_LOG overrides both.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the director (the default when no command is given).
    Serve,
    /// Write a new shared heartbeat key (64 hex characters) to a new file of mode 0600, for
    /// the servers' [directors] key_file and the directors' [director] key_file. The key is
    /// never printed: copy the file to each host (it must stay 0600 there).
    Genkey {
        /// Key file to create (a path; "-", stdout, is refused: the key is never printed).
        #[arg(short, long, value_parser = |s: &str| -> Result<PathBuf, String> {
            if s == "-" || s.is_empty() {
                Err("the key is never printed: give a file path (e.g. -o heartbeat.key)".into())
            } else {
                Ok(PathBuf::from(s))
            }
        })]
        output: PathBuf,
        /// Replace an existing file (written whole to a new 0600 temp file beside it, then
        /// renamed over it).
        #[arg(long)]
        force: bool,
    },
    /// Print the shell completion script for SHELL to stdout (reads no config).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: mcast::cli_docs::Shell,
    },
    /// Write the manual pages into DIR (packaging).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Completions and manual pages need no config (they are made at packaging time).
    let docs = match &cli.cmd {
        Some(Cmd::Completions { shell }) => Some(mcast::cli_docs::Docs::Completions(*shell)),
        Some(Cmd::Man { dir }) => Some(mcast::cli_docs::Docs::Man(dir.clone())),
        _ => None,
    };
    if let Some(d) = docs {
        return ExitCode::from(mcast::cli_docs::run(Cli::command(), &d));
    }
    let cfg = match DirectorConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcast-director: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let level = cli.log.clone().unwrap_or(cfg.log.level.clone());
    if let Err(e) = mcast::process::init_logging(&level) {
        eprintln!("mcast-director: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let r = match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve(&cfg),
        Cmd::Genkey { output, force } => genkey(&output, force),
        Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled before the config is loaded")
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcast-director: error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn genkey(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    // A secret shared by every server and director: it goes to a 0600 file only, never to a
    // terminal, a pipe or a log.
    if out.as_os_str() == "-" || out.as_os_str().is_empty() {
        anyhow::bail!(
            "genkey never prints the key: give a file path with -o (e.g. -o heartbeat.key)"
        );
    }
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key[..]);
    let mut text = zeroize::Zeroizing::new(vec![b'\n'; 65]);
    hex::encode_to_slice(&key[..], &mut text[..64]).expect("64 hex digits for 32 bytes");
    if force {
        // A new 0600 temp file (O_EXCL | O_NOFOLLOW) beside `out`, renamed over it: a link
        // at `out` is replaced, never followed, and no reader sees half a key.
        let mut f = mcast::fsutil::AtomicFile::create_private(out)
            .with_context(|| format!("cannot create a temp file beside {}", out.display()))?;
        f.file().write_all(&text)?;
        f.commit()
            .with_context(|| format!("cannot write {}", out.display()))?;
    } else {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(out)
            .with_context(|| {
                format!(
                    "cannot create {} (exists? use --force to replace it)",
                    out.display()
                )
            })?;
        if let Err(e) = f.write_all(&text).and_then(|()| f.sync_all()) {
            drop(f);
            let _ = std::fs::remove_file(out);
            return Err(e).with_context(|| format!("cannot write {}", out.display()));
        }
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        mcast::fsutil::sync_dir(dir)
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    }
    eprintln!("heartbeat key written to {} (mode 0600)", out.display());
    Ok(())
}

fn serve(cfg: &DirectorConfig) -> anyhow::Result<()> {
    let d = &cfg.director;
    let key = if d.key_file.as_os_str().is_empty() {
        None
    } else {
        Some(mcast::heartbeat::read_key(&d.key_file)?)
    };
    let mut server_keys = std::collections::BTreeMap::new();
    let mut any_source = std::collections::BTreeSet::new();
    for s in d
        .servers
        .iter()
        .filter(|s| !s.key_file.as_os_str().is_empty())
    {
        server_keys.insert(s.addr, mcast::heartbeat::read_key(&s.key_file)?);
        if s.any_source {
            any_source.insert(s.addr);
            tracing::info!(server = %s.addr, "heartbeats of this server are taken from any source address (any_source)");
        }
    }
    if key.is_some() {
        tracing::info!(
            own_keys = server_keys.len(),
            "servers not listed in [[director.servers]] share one heartbeat key: any of them can speak for the others"
        );
    }
    let sock = UdpSocket::bind(d.listen).with_context(|| {
        format!(
            "cannot bind {} (director.listen): in use by another director?",
            d.listen
        )
    })?;
    let stop = mcast::process::stop_flag()?;
    let admin = mcast::config::admin_prefixes(&d.admin).map_err(anyhow::Error::msg)?;
    let mut token_secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut token_secret);
    let (sites, server_sites) = d
        .site_params()
        .map_err(|(field, why)| anyhow::anyhow!("{field}: {why}"))?;
    for s in &sites {
        tracing::info!(
            site = %s.name,
            prefixes = %s.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            servers = server_sites.values().filter(|&&i| sites[i].name == s.name).count(),
            preload = s.preload.len(),
            no_multicast = s.policy.no_multicast.name(),
            mirrors = s.policy.http.len(),
            "site"
        );
    }
    let mut dir = Director::new(Params {
        key,
        server_keys,
        any_source,
        down_after: d.down_after,
        max_skew: Duration::from_millis(d.max_skew_ms),
        token_secret,
        admin,
        sites,
        server_sites,
    });
    let mut metrics = match d.metrics_listen()? {
        Some(addr) => Some(mcast::metrics::DirectorMetrics::spawn(addr)?),
        None => None,
    };
    tracing::info!(listen = %sock.local_addr()?, down_after = d.down_after, "mcast-director serving");
    let mut buf = vec![0u8; 65_536];
    let mut rejected_logged = 0u64;
    // systemd (Type=notify): ready once the socket is bound; watchdog pings from this loop.
    let mut notify = mcast::systemd::Notifier::from_env();
    notify.ready(Instant::now(), &status(&dir));
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        notify.tick(now, || status(&dir));
        dir.handle_timeout(now);
        if let Some(m) = &mut metrics {
            m.poll(now, &dir);
        }
        while let Some(ev) = dir.poll_event() {
            match ev {
                Event::ServerUp { server, state } => {
                    tracing::info!(%server, state = state.name(), "server up")
                }
                Event::ServerDown { server, why } => {
                    tracing::warn!(%server, why, "server down: no new requests go there")
                }
                Event::StateChanged { server, from, to } => {
                    tracing::info!(%server, from = from.name(), to = to.name(), "server state")
                }
                Event::Rejected { from, verdict } => {
                    let c = dir.counters();
                    let total = c.heartbeats_forged
                        + c.heartbeats_replayed
                        + c.heartbeats_stale
                        + c.heartbeats_malformed
                        + c.heartbeats_wrong_source;
                    // Rate-limited: the 1st, 2nd, 4th, 8th ... rejection.
                    if total.is_power_of_two() && total > rejected_logged {
                        rejected_logged = total;
                        if verdict == mcast::director::Verdict::WrongSource {
                            tracing::warn!(%from, rejected = total,
                                "heartbeat under a listed server's own key from another address than that server's: refused (a server behind NAT needs any_source = true in its [[director.servers]])");
                        } else {
                            tracing::warn!(%from, ?verdict, rejected = total, "heartbeat rejected");
                        }
                    }
                }
            }
        }
        let wait = dir
            .poll_timeout()
            .into_iter()
            .chain(notify.poll_timeout())
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .clamp(Duration::from_millis(1), Duration::from_millis(200));
        sock.set_read_timeout(Some(wait))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Some(reply) =
                    dir.handle_datagram(Instant::now(), mcast::process::unix_ms(), from, &buf[..n])
                {
                    if let Err(e) = sock.send_to(&reply, from) {
                        tracing::debug!(to = %from, error = %e, "reply not sent");
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // ICMP errors from earlier replies surface here; they are not ours to handle.
            Err(e) => tracing::debug!(error = %e, "recv"),
        }
    }
    notify.stopping(&format!("stopping; {}", status(&dir)));
    let counters = serde_json::to_string(dir.counters()).unwrap_or_default();
    tracing::info!(%counters, "mcast-director stopping");
    Ok(())
}

/// The one-line `STATUS=` systemd shows for the director.
fn status(dir: &Director) -> String {
    let c = dir.counters();
    format!(
        "servers up: {}, requests routed: {}, heartbeats accepted: {}",
        dir.up_servers().len(),
        c.routes_ok,
        c.heartbeats_accepted
    )
}
