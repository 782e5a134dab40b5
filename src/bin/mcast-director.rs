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
use clap::{Parser, Subcommand};
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
    /// Write a new shared heartbeat key (64 hex characters, mode 0600) for the servers'
    /// [directors] key_file and the directors' [director] key_file.
    Genkey {
        /// Key file to write ("-" for stdout).
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match DirectorConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcast-director: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let level = cli.log.clone().unwrap_or(cfg.log.level.clone());
    mcast::process::init_logging(&level);
    let r = match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve(&cfg),
        Cmd::Genkey { output, force } => genkey(&output, force),
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
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let text = format!("{}\n", hex::encode(key));
    if out.as_os_str() == "-" {
        print!("{text}");
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(force)
        .create_new(!force)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "cannot create {} (exists? use --force to replace it)",
                out.display()
            )
        })?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    eprintln!("heartbeat key written to {}", out.display());
    Ok(())
}

fn serve(cfg: &DirectorConfig) -> anyhow::Result<()> {
    let d = &cfg.director;
    let key = mcast::heartbeat::read_key(&d.key_file)?;
    let sock = UdpSocket::bind(d.listen).with_context(|| {
        format!(
            "cannot bind {} (director.listen): in use by another director?",
            d.listen
        )
    })?;
    let stop = mcast::process::stop_flag()?;
    let mut dir = Director::new(Params {
        key,
        down_after: d.down_after,
        max_skew: Duration::from_millis(d.max_skew_ms),
    });
    tracing::info!(listen = %sock.local_addr()?, down_after = d.down_after, "mcast-director serving");
    let mut buf = vec![0u8; 65_536];
    let mut rejected_logged = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        dir.handle_timeout(now);
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
                        + c.heartbeats_malformed;
                    if total.is_power_of_two() && total > rejected_logged {
                        rejected_logged = total;
                        tracing::warn!(%from, ?verdict, rejected = total, "heartbeat rejected");
                    }
                }
            }
        }
        let wait = dir
            .poll_timeout()
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
    tracing::info!(counters = ?dir.counters(), "mcast-director stopping");
    Ok(())
}
