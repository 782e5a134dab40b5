//! `mcastd`: the media server and its operator tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use mcast::archive::{self, ArchiveError, ArchiveFile, CompressMode, PackOptions};
use mcast::config::Config;
use mcast_keys::{Cipher, KeyStore};

/// Exit codes (also in `--help`).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_INTEGRITY: u8 = 3;

#[derive(Parser)]
#[command(
    name = "mcastd",
    version,
    about = "mcast media server: packs media into pre-encrypted archives and loops them over multicast",
    after_help = "Exit status: 0 success; 1 failure (I/O, key store, ...); 2 bad usage or config; \
                  3 an archive failed an integrity or authentication check.\n\
                  Config: conf/mcastd.toml documents every field; without --config the built-in \
                  defaults are used (data under ./mcast-data)."
)]
struct Cli {
    /// Config file (TOML). Built-in defaults when absent.
    #[arg(long, short, global = true, env = "MCASTD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, overriding the config (e.g. "debug"). RUST_LOG overrides both.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the archive directory (the default when no command is given). The flags
    /// override the config file's [server] settings of the same meaning.
    Serve {
        /// Control endpoint receivers talk to (server.control), e.g. 0.0.0.0:7600.
        #[arg(long, value_name = "ADDR:PORT")]
        control: Option<std::net::SocketAddr>,
        /// Interface multicast leaves from, by name or address (server.multicast_iface).
        #[arg(long, value_name = "ADDR|NAME")]
        iface: Option<String>,
        /// First multicast group of the channel pool, IPv4 or IPv6 (server.group_base).
        #[arg(long, value_name = "GROUP")]
        group_base: Option<std::net::IpAddr>,
        /// Loop rate of each channel, Mbit/s of payload; 0 = unlimited (server.rate_mbps).
        #[arg(long, value_name = "MBIT")]
        rate: Option<f64>,
        /// Edge: also serve archives signed by this origin server's public key (64 hex
        /// digits, as `mcastd identity` prints on the origin); repeatable, added to
        /// server.origin_keys.
        #[arg(long = "origin-key", value_name = "HEX")]
        origin_keys: Vec<String>,
    },
    /// Print this server's public identity (64 hex digits): receivers pin it with
    /// `mcast-recv get --server-key`; an origin delegates to an edge with
    /// `mcastd delegate --edge-key` it.
    #[command(visible_alias = "key")]
    Identity {
        /// Only the hex key (the default output is the same line; kept for scripts that
        /// say what they want).
        #[arg(long)]
        public: bool,
    },
    /// On an origin server: let an edge server sign SYNCs for this server's titles. Writes a
    /// delegation certificate (signed by this server's identity) for the edge's
    /// `[server] delegations`.
    Delegate {
        /// The edge's public identity (64 hex digits: `mcastd identity` on the edge).
        #[arg(long, value_name = "HEX")]
        edge_key: String,
        /// Valid for this long from now: 365d, 12h, 3600s.
        #[arg(long, default_value = "365d", value_name = "DURATION")]
        valid: String,
        /// Delegation file to write (0644: it holds no secret).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Create the server identity (Ed25519) that signs every archive manifest.
    Keygen {
        /// Replace an existing identity (archives signed by the old one stop verifying).
        #[arg(long)]
        force: bool,
    },
    /// Pack a media file into an archive in the archive directory.
    Pack {
        /// The raw media file.
        input: PathBuf,
        /// Title id (A-Z a-z 0-9 . _ -): the name receivers ask for.
        #[arg(long)]
        title: String,
        /// aes-256-gcm | chacha20-poly1305 (default from config).
        #[arg(long)]
        cipher: Option<String>,
        /// auto | zstd | none (default from config).
        #[arg(long)]
        compress: Option<String>,
        /// Source/owner id carried in the signed archive head.
        #[arg(long)]
        watermark: Option<String>,
        /// Unencrypted advertisement archive.
        #[arg(long)]
        advert: bool,
        /// With --advert: the titles it plays with, comma-separated (signed into the head;
        /// receivers fetch and play it with them).
        #[arg(
            long = "for",
            value_delimiter = ',',
            requires = "advert",
            value_name = "TITLES"
        )]
        advert_for: Vec<String>,
        /// With --for: play after the titles (default: before them, as a leader).
        #[arg(long, requires = "advert_for")]
        trailer: bool,
        /// Plug-in/codec archive: neither encrypted nor watermarked; receivers unpack it with
        /// `mcast-recv play` and no ticket.
        #[arg(long, conflicts_with_all = ["advert", "watermark"])]
        plugin: bool,
        /// Plaintext bytes per frame (default from config).
        #[arg(long)]
        frame_size: Option<u32>,
        /// Packet payload bytes, multiple of 32 (default from config).
        #[arg(long)]
        symbol_size: Option<u32>,
        /// FEC repair symbols per data packet, 0 (none) ..= 1.0 (default from config
        /// `[pack] fec_overhead`): receivers that lose up to about this share finish in one
        /// loop without NAKs; the archive and the loop grow by it.
        #[arg(long)]
        fec_overhead: Option<f64>,
        /// Replace an existing archive of this title.
        #[arg(long)]
        force: bool,
    },
    /// Restore the original media file from an archive (uses the key store).
    Unpack {
        /// Archive path, or a title in the archive directory.
        archive: String,
        /// Output file (written atomically: nothing appears unless every check passes).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Check an archive's signature and every packet hash (no key needed).
    Verify {
        /// Archive path, or a title in the archive directory.
        archive: String,
    },
    /// List the archives in the archive directory.
    Catalog {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Play tickets: issue, revoke and list (the validation database is [tickets] db).
    #[command(subcommand)]
    Ticket(TicketCmd),
    /// Print the shell completion script for SHELL to stdout (reads no config).
    ///
    /// E.g. `mcastd completions bash > ~/.local/share/bash-completion/completions/mcastd`;
    /// the Debian package installs them for bash, zsh and fish.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: mcast::cli_docs::Shell,
    },
    /// Write the manual pages (mcastd.1 and one per subcommand) into DIR (packaging).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TicketCmd {
    /// Issue a play ticket for a title's current archive and write the ticket file (0600).
    Issue {
        /// Title id, as packed.
        title: String,
        /// Who the ticket is for (user or device id; recorded and listed).
        #[arg(long)]
        holder: String,
        /// Plays allowed.
        #[arg(long, default_value_t = 1)]
        plays: u32,
        /// Valid for this long from now: 30d, 12h, 90m, 3600s (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
        /// Ticket file ("-" for stdout). Default: <title>-<id>.ticket here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Revoke a ticket: refused from now on.
    Revoke {
        /// Ticket id (32 hex digits, or a unique prefix of 8 or more).
        ticket_id: String,
    },
    /// List every ticket with its plays left and state (valid, used, expired, revoked).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The audit log of play requests: time, ticket, holder, receiver address, title, outcome.
    Audit {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Only requests for this title.
        #[arg(long)]
        title: Option<String>,
        /// The last N requests.
        #[arg(long, default_value_t = 100)]
        limit: u32,
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
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcastd: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = mcast::process::init_logging(cli.log.as_deref().unwrap_or(&cfg.log.level)) {
        eprintln!("mcastd: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let cmd = cli.cmd.unwrap_or(Cmd::Serve {
        control: None,
        iface: None,
        group_base: None,
        rate: None,
        origin_keys: Vec::new(),
    });
    let cfg = match &cmd {
        Cmd::Serve {
            control,
            iface,
            group_base,
            rate,
            origin_keys,
        } => {
            let o = mcast::config::ServeOverrides {
                control: *control,
                iface: iface.clone(),
                group_base: *group_base,
                rate_mbps: *rate,
                origin_keys: origin_keys.clone(),
            };
            match cfg.with_serve_overrides(&o) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mcastd: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        _ => cfg,
    };
    match run(cmd, &cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcastd: error: {e:#}");
            let integrity = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<ArchiveError>(),
                    Some(
                        ArchiveError::Signature { .. }
                            | ArchiveError::ForeignServer { .. }
                            | ArchiveError::HashPacket { .. }
                            | ArchiveError::Packet { .. }
                            | ArchiveError::Repair { .. }
                            | ArchiveError::Frame { .. }
                            | ArchiveError::FrameOrder { .. }
                            | ArchiveError::FrameAuth { .. }
                            | ArchiveError::WrongKey { .. }
                            | ArchiveError::PlainHash { .. }
                            | ArchiveError::Head { .. }
                            | ArchiveError::NotArchive { .. }
                    )
                )
            });
            let usage = e.chain().any(|c| c.downcast_ref::<UsageError>().is_some());
            ExitCode::from(if integrity {
                EXIT_INTEGRITY
            } else if usage {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn run(cmd: Cmd, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve { .. } => mcast::server::serve(cfg, mcast::process::stop_flag()?),
        Cmd::Keygen { force } => {
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            let id = ks.create_identity(force)?;
            tracing::info!(key_dir = %cfg.store.key_dir.display(), fingerprint = %id.public().fingerprint(), "server identity created");
            println!(
                "server identity {} in {}",
                hex::encode(id.public().0),
                cfg.store.key_dir.display()
            );
            Ok(())
        }
        Cmd::Identity { public: _ } => {
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            println!("{}", hex::encode(ks.identity()?.public().0));
            Ok(())
        }
        Cmd::Delegate {
            edge_key,
            valid,
            output,
        } => {
            let edge = mcast::config::parse_public_key(&edge_key)
                .map_err(|e| UsageError(format!("--edge-key: {e}")))?;
            let valid = mcast::ticketadmin::parse_expiry(&valid)
                .map_err(|e| UsageError(e.replace("--expires", "--valid")))?;
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            let origin = ks.identity()?;
            if origin.public() == edge {
                return Err(UsageError(
                    "--edge-key is this server's own key: a server needs no delegation for its own titles".into(),
                )
                .into());
            }
            let not_after = mcast::process::unix_secs().saturating_add(valid.as_secs());
            let d = mcast::delegation::Delegation::issue(&origin, edge, not_after);
            let write = || -> std::io::Result<()> {
                let mut f = mcast::fsutil::AtomicFile::create(&output)?;
                std::io::Write::write_all(f.file(), &d.encode())?;
                f.commit()
            };
            write().with_context(|| format!("cannot write {}", output.display()))?;
            println!(
                "delegation from origin {} to edge {} until {} written to {}",
                hex::encode(origin.public().0),
                hex::encode(edge.0),
                mcast::ticketadmin::show_time(not_after),
                output.display()
            );
            Ok(())
        }
        Cmd::Pack {
            input,
            title,
            cipher,
            compress,
            watermark,
            advert,
            advert_for,
            trailer,
            plugin,
            frame_size,
            symbol_size,
            fec_overhead,
            force,
        } => {
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            let mut opts = PackOptions::new(&title);
            opts.cipher = match cipher {
                Some(c) => Cipher::from_name(&c)
                    .filter(|c| *c != Cipher::None)
                    .ok_or_else(|| {
                        UsageError(format!(
                            "--cipher {c:?}: use aes-256-gcm or chacha20-poly1305"
                        ))
                    })?,
                None => cfg.pack_cipher().map_err(UsageError)?,
            };
            opts.compress = match compress {
                Some(c) => CompressMode::from_name(&c).ok_or_else(|| {
                    UsageError(format!("--compress {c:?}: use auto, zstd or none"))
                })?,
                None => cfg.pack_compress().map_err(UsageError)?,
            };
            opts.zstd_level = cfg.pack.zstd_level;
            opts.frame_size = frame_size.unwrap_or(cfg.pack.frame_size);
            opts.symbol_size = symbol_size.unwrap_or(cfg.pack.symbol_size);
            opts.leaf_hash = cfg.pack_leaf_hash().map_err(UsageError)?;
            opts.fec_overhead = fec_overhead.unwrap_or(cfg.pack.fec_overhead);
            if !(0.0..=1.0).contains(&opts.fec_overhead) {
                return Err(UsageError(format!(
                    "--fec-overhead {}: use 0 (no FEC) ..= 1.0",
                    opts.fec_overhead
                ))
                .into());
            }
            opts.fec_block = cfg.pack.fec_block;
            opts.watermark = watermark;
            opts.advert = advert;
            opts.advert_for = advert_for
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            opts.placement = if trailer {
                archive::head::Placement::Trailer
            } else {
                archive::head::Placement::Leader
            };
            opts.plugin = plugin;
            opts.force = force;
            let total = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(0);
            let bar = progress_bar(total, "packing");
            let r = archive::pack(&input, &cfg.store.archive_dir, &ks, &opts, &mut |n| {
                bar.set_position(n)
            })?;
            bar.finish_and_clear();
            let h = &r.head;
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            tracing::info!(title = %h.title, path = %r.path.display(), plain = h.plain_len, archive = r.archive_len,
                frames = h.frame_count, compressed_frames = r.compressed_frames, cipher = %h.cipher,
                mb_per_s = format!("{:.0}", h.plain_len as f64 / secs / 1e6), "packed");
            println!(
                "packed {} -> {} ({} bytes -> {} bytes, {} frames, {}, {} loop packets)",
                input.display(),
                r.path.display(),
                h.plain_len,
                r.archive_len,
                h.frame_count,
                h.cipher,
                h.loop_packets()
            );
            Ok(())
        }
        Cmd::Unpack { archive, output } => {
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            let a = ArchiveFile::open(&resolve(&archive, &cfg.store.archive_dir))?;
            let id = ks.identity()?.public();
            // Trust nothing in the head (title, archive id) before its signature checks out.
            a.verify_signature(&id)?;
            let key = if a.head.cipher == Cipher::None {
                None
            } else {
                Some(ks.title_key(&a.head.title, &a.head.archive_id)?)
            };
            let bar = progress_bar(a.head.plain_len, "unpacking");
            let r = archive::unpack(&a, &id, key.as_ref(), &output, &mut |n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!(
                "unpacked {} -> {} ({} bytes, {} frames, verified)",
                a.path.display(),
                output.display(),
                r.plain_len,
                r.frames
            );
            Ok(())
        }
        Cmd::Verify { archive } => {
            let ks = KeyStore::open(&cfg.store.key_dir)?;
            let a = ArchiveFile::open(&resolve(&archive, &cfg.store.archive_dir))?;
            // An edge also verifies its origins' archives (`[server] origin_keys`).
            let own = ks.identity()?.public();
            let origins = cfg.server.origin_keys().map_err(UsageError)?;
            let key = origins
                .into_iter()
                .find(|k| *k == a.head.server_key)
                .unwrap_or(own);
            archive::verify(&a, &key)?;
            println!(
                "{}: signature and {} packets verified",
                a.path.display(),
                a.head.loop_packets()
            );
            Ok(())
        }
        Cmd::Ticket(t) => run_ticket(t, cfg),
        Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled in main before the config is loaded")
        }
        Cmd::Catalog { json } => {
            let dir = &cfg.store.archive_dir;
            let entries = mcast::catalog::scan(dir).with_context(|| {
                format!(
                    "cannot read archive directory {} (set store.archive_dir)",
                    dir.display()
                )
            })?;
            if json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e)?);
                }
                return Ok(());
            }
            println!(
                "{:<24} {:>14} {:>14} {:>7} {:<18} {:>6} {:<6} WATERMARK",
                "TITLE", "PLAIN", "ARCHIVE", "FRAMES", "CIPHER", "RATIO", "ADVERT"
            );
            for e in &entries {
                if let Some(err) = &e.error {
                    println!("{:<24} unreadable: {err}", e.title);
                    continue;
                }
                println!(
                    "{:<24} {:>14} {:>14} {:>7} {:<18} {:>6.2} {:<6} {}",
                    e.title,
                    e.plain_bytes,
                    e.archive_bytes,
                    e.frames,
                    e.cipher,
                    e.ratio,
                    kind_column(e),
                    e.watermark
                );
            }
            if entries.is_empty() {
                println!("(no archives in {})", dir.display());
            }
            Ok(())
        }
    }
}

/// The ADVERT column: no, yes, plugin, or the placement and titles of an associated advert.
fn kind_column(e: &mcast::catalog::CatalogEntry) -> String {
    if e.plugin {
        "plugin".into()
    } else if !e.advert {
        "no".into()
    } else if e.advert_for.is_empty() {
        "yes".into()
    } else {
        format!("{}:{}", e.placement, e.advert_for.join(","))
    }
}

fn run_ticket(cmd: TicketCmd, cfg: &Config) -> anyhow::Result<()> {
    use mcast::ticketadmin::{self, show_time};
    let now = mcast::process::unix_secs();
    match cmd {
        TicketCmd::Issue {
            title,
            holder,
            plays,
            expires,
            output,
        } => {
            if plays == 0 {
                return Err(UsageError("--plays must be at least 1".into()).into());
            }
            let expires = expires
                .map(|e| ticketadmin::parse_expiry(&e).map_err(UsageError))
                .transpose()?;
            let r =
                ticketadmin::issue(cfg, &title, &holder, plays, expires, output.as_deref(), now)?;
            let t = r.ticket.ticket();
            let msg = format!(
                "ticket {} for {:?} (holder {:?}, {} play{}, expires {})",
                t.id_hex(),
                t.title,
                t.holder,
                t.plays,
                if t.plays == 1 { "" } else { "s" },
                show_time(t.expires_unix)
            );
            match &r.path {
                Some(p) => println!("{msg} written to {}", p.display()),
                None => eprintln!("{msg} written to stdout"),
            }
            Ok(())
        }
        TicketCmd::Revoke { ticket_id } => {
            match ticketadmin::revoke(cfg, &ticket_id, now)? {
                mcast::ticket::Revoked::Now(r) => println!(
                    "ticket {} ({:?}, holder {:?}) revoked",
                    hex::encode(r.ticket_id),
                    r.title,
                    r.holder
                ),
                mcast::ticket::Revoked::Already(r) => println!(
                    "ticket {} was already revoked at {}",
                    hex::encode(r.ticket_id),
                    show_time(r.revoked_unix)
                ),
            }
            Ok(())
        }
        TicketCmd::List { json } => {
            let rows = ticketadmin::list(cfg)?;
            if json {
                for r in &rows {
                    let mut v = serde_json::to_value(r)?;
                    v["state"] = serde_json::to_value(r.state(now))?;
                    println!("{v}");
                }
                return Ok(());
            }
            println!(
                "{:<32} {:<20} {:<16} {:>7} {:<8} {:<20} ISSUED",
                "TICKET", "TITLE", "HOLDER", "PLAYS", "STATE", "EXPIRES"
            );
            for r in &rows {
                println!(
                    "{:<32} {:<20} {:<16} {:>7} {:<8} {:<20} {}",
                    hex::encode(r.ticket_id),
                    r.title,
                    r.holder,
                    format!("{}/{}", r.plays_left, r.plays),
                    serde_json::to_value(r.state(now))?.as_str().unwrap_or("?"),
                    show_time(r.expires_unix),
                    show_time(r.issued_unix)
                );
            }
            if rows.is_empty() {
                println!(
                    "(no tickets in {})",
                    if cfg.tickets.database == mcast::config::Database::Postgres {
                        mcast::ticket::postgres::redact(&cfg.tickets.postgres_url)
                    } else {
                        cfg.tickets.db.display().to_string()
                    }
                );
            }
            Ok(())
        }
        TicketCmd::Audit { json, title, limit } => {
            let rows = ticketadmin::audit(cfg, title.as_deref(), limit)?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            println!(
                "{:<20} {:<32} {:<16} {:<20} {:<22} {:<8} {:>5} REASON",
                "TIME", "TICKET", "HOLDER", "TITLE", "RECEIVER", "OUTCOME", "LEFT"
            );
            for r in &rows {
                println!(
                    "{:<20} {:<32} {:<16} {:<20} {:<22} {:<8} {:>5} {}",
                    show_time(r.at_unix),
                    r.ticket_id,
                    r.holder,
                    r.title,
                    r.receiver,
                    r.outcome,
                    r.plays_left.map_or("-".into(), |n| n.to_string()),
                    r.reason
                );
            }
            Ok(())
        }
    }
}

/// An existing path, or else a title in the archive directory.
fn resolve(arg: &str, dir: &Path) -> PathBuf {
    let p = PathBuf::from(arg);
    if p.exists() || mcast_keys::store::validate_title(arg).is_err() {
        p
    } else {
        archive::archive_path(dir, arg)
    }
}

fn progress_bar(total: u64, what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}
