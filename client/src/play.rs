//! `mcast-recv play`: present a play ticket, receive the server's key part, decrypt the
//! archive already on disk (DESIGN §2 "Play ticket", FIG. 10).
//!
//! 1. Local checks, before anything is asked of the server: the ticket file decodes, is for
//!    this title, is signed by the server that signed the archive on disk, and names that
//!    archive; the archive is complete and its head signature verifies; the output can be
//!    created. A ticket is never spent on a play that cannot happen.
//! 2. A fresh X25519 key pair for this play; `PlayRequest` with the ticket and its public half.
//!    Retries reuse the same key, so a lost reply costs no second play.
//! 3. The grant (part B, HPKE-sealed to that key) is opened, combined with the ticket's part
//!    A into locked memory, and checked against the archive's key id.
//! 4. Every frame is authenticated and decrypted straight into OUT (atomically: a new 0600 temp
//!    file, renamed into place only when the whole file and its plaintext hash checked out) or to
//!    stdout for a player. Then the key, both parts and the ephemeral secret are wiped; none
//!    of them was ever written anywhere.
//!
//! Adverts ([`crate::adverts`]): the leaders whose signed heads name the title are written
//! before it and the trailers after it, into the same output, on the one ticket use (adverts
//! are unencrypted). An advert or plug-in title itself plays without a ticket: its signature
//! and every packet are checked, and its plaintext is written.

use std::io::{BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_io::archive::{self, ArchiveFile, DecryptOptions};
use mcast_io::fsutil::AtomicFile;
use mcast_keys::seal::ReceiverKey;
use mcast_keys::ticket::{
    combine, grant_signed_bytes, possession_proof, TicketFile, MAX_TICKET_FILE_LEN,
};
use mcast_keys::{Cipher, PublicIdentity};
use mcast_proto::wire::control::{Control, ErrorCode};
use serde::Serialize;

use crate::control::ControlClient;
use crate::error::{Failure, RecvError};

/// Where the plaintext goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlayOutput {
    /// A file, written atomically.
    File(PathBuf),
    /// Standard output (a player reading a pipe).
    Stdout,
}

#[derive(Clone, Debug)]
pub struct PlayOptions {
    pub server: SocketAddr,
    pub title: String,
    /// Ticket file; needed only for encrypted titles (adverts and plug-ins play without).
    pub ticket: Option<PathBuf>,
    /// Directory holding `<title>.mca` (where `get` put it).
    pub dir: PathBuf,
    pub output: PlayOutput,
    /// Pinned server identity; default: the key the archive and the ticket are signed by.
    pub server_key: Option<PublicIdentity>,
    /// Also check every packet against the signed manifest while decrypting (the download
    /// already did; AEAD authenticates every frame either way).
    pub verify_packets: bool,
    pub tries: u32,
    pub per_try: Duration,
}

impl PlayOptions {
    pub fn new(server: SocketAddr, title: &str, ticket: Option<&Path>, output: PlayOutput) -> Self {
        PlayOptions {
            server,
            title: title.to_string(),
            ticket: ticket.map(Path::to_path_buf),
            dir: PathBuf::from("."),
            output,
            server_key: None,
            verify_packets: false,
            tries: 6,
            per_try: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlayReport {
    pub event: &'static str,
    pub title: String,
    /// `title` (encrypted, played with a ticket), `advert` or `plugin` (no ticket).
    pub kind: &'static str,
    /// Empty when no ticket was needed.
    pub ticket_id: String,
    /// The owner label of the title's signed head (empty: none).
    pub watermark: String,
    /// Adverts written before and after the title (their signed heads name it).
    pub leaders: Vec<String>,
    pub trailers: Vec<String>,
    /// Adverts the server lists for the title that are not on disk (played without them).
    pub missing_adverts: Vec<String>,
    pub output: String,
    /// Plaintext bytes written in all (adverts included).
    pub bytes: u64,
    pub frames: u64,
    /// Whether the key page could be locked against swapping.
    pub key_locked: bool,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl PlayReport {
    /// The line `mcast-recv play` prints.
    pub fn summary(&self) -> String {
        let mut s = if self.ticket_id.is_empty() {
            format!(
                "{}: {} played without a ticket -> {} ({} bytes, {} frames verified)",
                self.title, self.kind, self.output, self.bytes, self.frames
            )
        } else {
            format!(
                "{}: played with ticket {} -> {} ({} bytes, {} frames authenticated, {:.0} MB/s)",
                self.title, self.ticket_id, self.output, self.bytes, self.frames, self.mb_per_s
            )
        };
        if !self.leaders.is_empty() || !self.trailers.is_empty() {
            s += &format!(
                "; leader adverts [{}], trailer adverts [{}]",
                self.leaders.join(", "),
                self.trailers.join(", ")
            );
        }
        if !self.watermark.is_empty() {
            let clean: String = self.watermark.chars().filter(|c| !c.is_control()).collect();
            s += &format!("; owner (signed): {clean}");
        }
        s
    }
}

fn refused(msg: impl Into<String>) -> RecvError {
    RecvError::new(Failure::TicketRefused, msg)
}

/// A sink that fails once `stop` is set (Ctrl-C), so an interrupted play leaves no output.
struct Stoppable<W> {
    inner: W,
    stop: Arc<AtomicBool>,
}

impl<W: Write> Write for Stoppable<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted",
            ));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Read and decode the ticket file (size-bounded; it is untrusted input).
fn read_ticket(path: &Path) -> Result<TicketFile, RecvError> {
    let f = std::fs::File::open(path).map_err(|e| {
        RecvError::new(
            Failure::Usage,
            format!("cannot read ticket file {}: {e}", path.display()),
        )
    })?;
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX_TICKET_FILE_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| RecvError::io("cannot read ticket file", path, e))?;
    TicketFile::from_file_bytes(&buf).map_err(|e| {
        refused(format!(
            "{} is not a valid play ticket: {e}",
            path.display()
        ))
    })
}

/// Run one play.
pub fn play(opts: &PlayOptions, stop: Arc<AtomicBool>) -> Result<PlayReport, RecvError> {
    let started = Instant::now();
    mcast_keys::store::validate_title(&opts.title)
        .map_err(|e| RecvError::new(Failure::Usage, e.to_string()))?;
    // A ticket given is read (and matched to the title) first, as before adverts existed.
    let file = opts.ticket.as_deref().map(read_ticket).transpose()?;
    if let Some(f) = &file {
        let ticket = f.ticket();
        if ticket.title != opts.title {
            return Err(refused(format!(
                "ticket {} is not for this title: it is for {:?}, not {:?}",
                ticket.id_hex(),
                ticket.title,
                opts.title
            )));
        }
    }

    // The archive on disk: present and complete.
    let path = archive::archive_path(&opts.dir, &opts.title);
    if !path.exists() {
        let part = opts
            .dir
            .join(format!("{}.{}.part", opts.title, archive::ARCHIVE_EXT));
        let why = if part.exists() {
            "its download is not complete"
        } else {
            "it has not been downloaded"
        };
        return Err(RecvError::new(
            Failure::NotFound,
            format!(
                "no archive {} ({why}): run `mcast-recv get {} -o {}` first",
                path.display(),
                opts.title,
                opts.dir.display()
            ),
        ));
    }
    let a =
        ArchiveFile::open(&path).map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    if a.head.cipher == Cipher::None {
        if file.is_some() {
            tracing::info!(title = %opts.title, "unencrypted title: the ticket is not needed and was not used");
        }
        return play_unencrypted(opts, a, stop, started);
    }
    let Some(file) = file else {
        return Err(RecvError::new(
            Failure::Usage,
            format!(
                "{} is encrypted: give --ticket FILE (from `mcastd ticket issue {}`)",
                opts.title, opts.title
            ),
        ));
    };
    let ticket = file.ticket().clone();
    let ticket_path = opts.ticket.as_deref().unwrap_or(Path::new("-"));
    // ... and from the ticket's server.
    let trusted = opts.server_key.unwrap_or(a.head.server_key);
    if ticket.server_key != trusted || a.head.server_key != trusted {
        return Err(refused(format!(
            "ticket {} was issued by server {}, but {} is signed by server {}{}",
            ticket.id_hex(),
            ticket.server_key.fingerprint(),
            path.display(),
            a.head.server_key.fingerprint(),
            match opts.server_key {
                Some(k) => format!(" (and --server-key is {})", k.fingerprint()),
                None => String::new(),
            }
        )));
    }
    file.verify(&trusted)
        .map_err(|e| refused(format!("ticket {} refused: {e}", ticket_path.display())))?;
    a.verify_signature(&trusted)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    if ticket.archive_id != a.head.archive_id {
        return Err(refused(format!(
            "ticket does not unlock this archive: it is for archive {} of {:?}, and {} is archive {} (fetch the current one with `mcast-recv get`)",
            hex::encode(ticket.archive_id),
            opts.title,
            path.display(),
            hex::encode(a.head.archive_id)
        )));
    }

    // Adverts: only those on disk whose signed heads name this title; the catalogue is asked
    // only to warn about ones not fetched.
    let (leaders, trailers) = crate::adverts::local_adverts(&opts.dir, &opts.title, &trusted);
    let missing_adverts = missing_adverts(opts, &trusted, &leaders, &trailers);

    // Make sure the output can be written before a play is spent on it. Plaintext: the temp
    // file is a new 0600 file (never through a link planted at its path), renamed into place.
    let mut file_out = match &opts.output {
        PlayOutput::File(p) => Some(
            AtomicFile::create_private(p)
                .map_err(|e| RecvError::io("cannot create output", p, e))?,
        ),
        PlayOutput::Stdout => None,
    };

    // Ask for the server's part, sealed to a key that lives only for this play.
    let receiver = ReceiverKey::generate();
    let mut ctl = ControlClient::new(opts.server, rand::random())?;
    let sock = ctl
        .sock
        .try_clone()
        .map_err(|e| RecvError::new(Failure::Other, e.to_string()))?;
    let receiver_pub = receiver.public();
    let reply = ctl.request_built(
        &sock,
        |token| Control::PlayRequest {
            title: opts.title.clone(),
            // The signed ticket, and proof of holding part A bound to this request's address
            // token: part A itself stays here.
            ticket: ticket.encode(),
            receiver_pub,
            proof: possession_proof(
                file.part_a(),
                &ticket.ticket_id,
                &receiver_pub,
                &opts.title,
                token.map_or(&[][..], |t| &t[..]),
            ),
        },
        opts.tries,
        opts.per_try,
    )?;
    let sealed = match reply {
        Control::PlayGrant {
            ticket_id,
            sealed_part,
            signature,
        } if ticket_id == ticket.ticket_id => {
            // Signed by the server that issued the ticket (its key is in the verified
            // ticket): a man in the middle cannot hand us another sealed part.
            let signed = grant_signed_bytes(&ticket_id, &receiver_pub, &sealed_part);
            if ticket.server_key.verify(&signed, &signature).is_err() {
                return Err(RecvError::new(
                    Failure::Integrity,
                    "the play grant is not signed by the server that issued the ticket: refused",
                ));
            }
            sealed_part
        }
        Control::Error {
            code: ErrorCode::TicketRefused,
            message,
        } => return Err(refused(format!("server refused the ticket: {message}"))),
        Control::Error { message, .. } => {
            return Err(RecvError::new(
                Failure::Other,
                format!("server could not answer the play request: {message}"),
            ))
        }
        other => {
            return Err(RecvError::new(
                Failure::Other,
                format!("unexpected reply to the play request: {other:?}"),
            ))
        }
    };
    let part_b = receiver
        .open_part(&ticket.ticket_id, &sealed)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    drop(receiver);
    let key = combine(file.part_a(), &part_b);
    drop(part_b);
    drop(file); // wipes part A
    if key.key().key_id(&a.head.archive_id) != a.head.key_id {
        return Err(refused(format!(
            "ticket does not unlock this archive: the combined key is not the key {} was sealed with",
            path.display()
        )));
    }
    if !key.is_locked() {
        tracing::debug!("key page not locked (RLIMIT_MEMLOCK); it could reach swap");
    }

    let opts_d = DecryptOptions {
        verify_packets: opts.verify_packets,
    };
    let integrity = |e: archive::ArchiveError| decrypt_error(&stop, e);
    // Decrypt into `inner` (buffered; stops on Ctrl-C); `decrypt_to` flushes it.
    let decrypt = |inner: &mut dyn Write, name: &Path| {
        let mut w = Stoppable {
            inner: BufWriter::with_capacity(1 << 20, inner),
            stop: stop.clone(),
        };
        let mut total = (0u64, 0u64);
        let advert_opts = DecryptOptions {
            verify_packets: true,
        };
        for ad in &leaders {
            let r =
                archive::decrypt_to(ad, &trusted, None, advert_opts, &mut w, name, &mut |_| {})?;
            total = (total.0 + r.plain_len, total.1 + r.frames);
        }
        let film = archive::decrypt_to(
            &a,
            &trusted,
            Some(key.key()),
            opts_d,
            &mut w,
            name,
            &mut |_| {},
        )?;
        for ad in &trailers {
            let r =
                archive::decrypt_to(ad, &trusted, None, advert_opts, &mut w, name, &mut |_| {})?;
            total = (total.0 + r.plain_len, total.1 + r.frames);
        }
        Ok::<_, archive::ArchiveError>((film, total))
    };
    let (report, output) = match &mut file_out {
        Some(f) => {
            let tmp = f.tmp_path().to_path_buf();
            let r = decrypt(f.file(), &tmp).map_err(integrity)?;
            let PlayOutput::File(p) = &opts.output else {
                unreachable!("file_out only for PlayOutput::File")
            };
            let f = file_out.take().expect("present");
            f.commit()
                .map_err(|e| RecvError::io("cannot write output", p, e))?;
            (r, p.display().to_string())
        }
        None => {
            let r =
                decrypt(&mut std::io::stdout().lock(), Path::new("<stdout>")).map_err(
                    |e| match e {
                        archive::ArchiveError::Io { source, .. }
                            if source.kind() == std::io::ErrorKind::BrokenPipe =>
                        {
                            RecvError::new(Failure::Other, "stdout was closed (the player quit?)")
                        }
                        e => integrity(e),
                    },
                )?;
            (r, "-".to_string())
        }
    };
    let ((report, ads), output) = (report, output);
    let key_locked = key.is_locked();
    drop(key);
    let secs = started.elapsed().as_secs_f64();
    let names = |v: &[ArchiveFile]| v.iter().map(|a| a.head.title.clone()).collect::<Vec<_>>();
    tracing::info!(title = %opts.title, ticket = %ticket.id_hex(), bytes = report.plain_len,
        watermark = %a.head.watermark, adverts = leaders.len() + trailers.len(),
        decrypt_mb_per_s = format!("{:.0}", report.plain_len as f64 / report.elapsed.as_secs_f64().max(1e-9) / 1e6),
        "played");
    let bytes = report.plain_len + ads.0;
    Ok(PlayReport {
        event: "played",
        title: opts.title.clone(),
        kind: "title",
        ticket_id: ticket.id_hex(),
        watermark: a.head.watermark.clone(),
        leaders: names(&leaders),
        trailers: names(&trailers),
        missing_adverts,
        output,
        bytes,
        frames: report.frames + ads.1,
        key_locked,
        seconds: secs,
        mb_per_s: bytes as f64 / secs.max(1e-9) / 1e6,
    })
}

/// Adverts the server's catalogue names for the title that are not among those on disk
/// (best effort: the catalogue is unauthenticated, so this only warns).
fn missing_adverts(
    opts: &PlayOptions,
    trusted: &PublicIdentity,
    leaders: &[ArchiveFile],
    trailers: &[ArchiveFile],
) -> Vec<String> {
    let items = match crate::adverts::catalog(
        opts.server,
        mcast_io::dscp::Dscp::DEFAULT,
        2,
        Duration::from_millis(300),
    ) {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(error = %e.message, "catalogue not read: cannot tell whether adverts are missing");
            return Vec::new();
        }
    };
    let have: Vec<&str> = leaders
        .iter()
        .chain(trailers)
        .map(|a| a.head.title.as_str())
        .collect();
    let missing: Vec<String> = crate::adverts::candidates(&items, &opts.title)
        .into_iter()
        .filter(|c| !have.contains(&c.as_str()))
        .collect();
    for m in &missing {
        let why = crate::adverts::verified_advert(&opts.dir, m, &opts.title, trusted)
            .err()
            .unwrap_or_default();
        tracing::warn!(advert = %m, title = %opts.title, %why,
            "advert not on disk or not associated by its signed head: playing without it (`mcast-recv get {}` fetches it)", opts.title);
    }
    missing
}

/// An advert or plug-in: no ticket, no key; signature, every packet and the plaintext hash
/// are checked while it is written.
fn play_unencrypted(
    opts: &PlayOptions,
    a: ArchiveFile,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> Result<PlayReport, RecvError> {
    let trusted = opts.server_key.unwrap_or(a.head.server_key);
    a.verify_signature(&trusted)
        .map_err(|e| RecvError::new(Failure::Integrity, e.to_string()))?;
    let d = DecryptOptions {
        verify_packets: true,
    };
    let integrity = |e: archive::ArchiveError| decrypt_error(&stop, e);
    let write = |inner: &mut dyn Write, name: &Path| {
        let mut w = Stoppable {
            inner: BufWriter::with_capacity(1 << 20, inner),
            stop: stop.clone(),
        };
        archive::decrypt_to(&a, &trusted, None, d, &mut w, name, &mut |_| {})
    };
    let (report, output) = match &opts.output {
        PlayOutput::File(p) => {
            let mut f = AtomicFile::create_private(p)
                .map_err(|e| RecvError::io("cannot create output", p, e))?;
            let tmp = f.tmp_path().to_path_buf();
            let r = write(f.file(), &tmp).map_err(integrity)?;
            f.commit()
                .map_err(|e| RecvError::io("cannot write output", p, e))?;
            (r, p.display().to_string())
        }
        PlayOutput::Stdout => {
            let r =
                write(&mut std::io::stdout().lock(), Path::new("<stdout>")).map_err(integrity)?;
            (r, "-".to_string())
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let kind = if a.head.plugin { "plugin" } else { "advert" };
    tracing::info!(title = %opts.title, kind, bytes = report.plain_len, watermark = %a.head.watermark, "played without a ticket");
    Ok(PlayReport {
        event: "played",
        title: opts.title.clone(),
        kind,
        ticket_id: String::new(),
        watermark: a.head.watermark.clone(),
        leaders: Vec::new(),
        trailers: Vec::new(),
        missing_adverts: Vec::new(),
        output,
        bytes: report.plain_len,
        frames: report.frames,
        key_locked: false,
        seconds: secs,
        mb_per_s: report.plain_len as f64 / secs.max(1e-9) / 1e6,
    })
}

/// A decryption that stopped: interrupted (Ctrl-C), the output could not be written, or the
/// archive failed a check.
fn decrypt_error(stop: &AtomicBool, e: archive::ArchiveError) -> RecvError {
    if stop.load(Ordering::Relaxed) {
        return RecvError::new(Failure::Interrupted, "interrupted; no output was left");
    }
    match e {
        archive::ArchiveError::Io { path, source } => {
            RecvError::io("cannot write output", &path, source)
        }
        e => RecvError::new(Failure::Integrity, e.to_string()),
    }
}
