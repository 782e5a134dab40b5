//! `mcastd ticket issue|revoke|list`: the operator's side of play tickets.
//!
//! Issuing looks up the title's current archive in the archive directory, checks that the key
//! store's key is the one the archive was sealed with, splits it for the new ticket, records
//! part B (wrapped) in the ticket database, then writes the ticket file (0600). The database
//! row comes first: a ticket file that exists can always be played; if the file cannot be
//! written, the row is deleted again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use mcast_keys::ticket::{Ticket, TicketFile, TicketSpec};
use mcast_keys::KeyStore;

use crate::archive::{archive_path, ArchiveFile};
use crate::config::Config;
use crate::fsutil::AtomicFile;
use crate::ticket::service::open_store;
use crate::ticket::{Revoked, TicketRow};

/// What `ticket issue` did.
#[derive(Clone, Debug)]
pub struct Issued {
    pub ticket: TicketFile,
    /// Where the ticket file went (`None`: written to stdout).
    pub path: Option<PathBuf>,
}

/// A duration for `--expires`: `30d`, `12h`, `90m`, `3600s`, `2w` (or bare seconds).
pub fn parse_expiry(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string())
    } else {
        humantime::parse_duration(s).map_err(|e| e.to_string())
    }
    .map_err(|e| format!("--expires {s:?}: {e} (use e.g. 30d, 12h, 90m or 3600s)"))?;
    if d.as_secs() == 0 {
        return Err(format!("--expires {s:?}: must be at least one second"));
    }
    Ok(d)
}

/// A unix time for people: RFC 3339 UTC, or "never" for 0.
pub fn show_time(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Issue a ticket for `title` and write it to `out` (`-` = stdout; default
/// `<title>-<id prefix>.ticket` in the current directory).
#[allow(clippy::too_many_arguments)]
pub fn issue(
    cfg: &Config,
    title: &str,
    holder: &str,
    plays: u32,
    expires: Option<Duration>,
    out: Option<&Path>,
    now_unix: u64,
) -> anyhow::Result<Issued> {
    mcast_keys::store::validate_title(title)?;
    let ks = KeyStore::open(&cfg.store.key_dir)?;
    let identity = ks.identity()?;
    let path = archive_path(&cfg.store.archive_dir, title);
    let a = ArchiveFile::open(&path).with_context(|| {
        format!(
            "no archive of title {title:?} in {} (pack it first)",
            cfg.store.archive_dir.display()
        )
    })?;
    a.verify_signature(&identity.public())?;
    if a.head.advert || a.head.plugin {
        let what = if a.head.plugin {
            "plug-in"
        } else {
            "advertisement"
        };
        bail!("title {title:?} is an unencrypted {what}: it plays without a ticket");
    }
    let master = ks.title_key(title, &a.head.archive_id)?;
    if master.key_id(&a.head.archive_id) != a.head.key_id {
        bail!(
            "the key store's key for title {title:?} is not the key {} was sealed with",
            path.display()
        );
    }
    let expires_unix = match expires {
        None => 0,
        Some(d) => now_unix
            .checked_add(d.as_secs())
            .context("--expires is too far in the future")?,
    };
    let spec = TicketSpec {
        title: title.to_string(),
        archive_id: a.head.archive_id,
        holder: holder.to_string(),
        plays,
        expires_unix,
        issued_unix: now_unix,
    };
    let (file, part_b) = Ticket::issue(&identity, &master, &spec)?;
    drop(master);
    let ticket = file.ticket();

    let target = match out {
        Some(p) if p == Path::new("-") => None,
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(format!(
            "{title}-{}.ticket",
            &ticket.id_hex()[..8]
        ))),
    };
    if let Some(p) = &target {
        if p.exists() {
            bail!(
                "{} already exists; choose another file with -o",
                p.display()
            );
        }
    }

    let db = open_store(&cfg.tickets)?;
    let wrapped = ks
        .tickets_key()?
        .wrap(&ticket.ticket_id, &ticket.archive_id, &part_b);
    drop(part_b);
    db.insert(ticket, &wrapped)?;

    let armor = file.to_armor();
    let written = match &target {
        None => {
            let mut so = std::io::stdout().lock();
            so.write_all(armor.as_bytes())
                .and_then(|()| so.flush())
                .context("writing the ticket to stdout")
        }
        Some(p) => write_private(p, armor.as_bytes())
            .with_context(|| format!("cannot write ticket file {}", p.display())),
    };
    if let Err(e) = written {
        if let Err(e2) = db.remove(&ticket.ticket_id) {
            tracing::warn!(error = %e2, ticket = %ticket.id_hex(), "could not delete the unissued ticket");
        }
        return Err(e);
    }
    tracing::info!(ticket = %ticket.id_hex(), title, holder, plays, expires = %show_time(expires_unix), "ticket issued");
    Ok(Issued {
        ticket: file,
        path: target,
    })
}

/// Write `bytes` atomically to `path` with mode 0600 from the first byte: the temp file is
/// created 0600 (`O_CREAT | O_EXCL | O_NOFOLLOW`), so there is no moment where it is readable
/// by others.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = AtomicFile::create_private(path)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// Revoke the ticket whose id is (or starts with) `id`.
pub fn revoke(cfg: &Config, id: &str, now_unix: u64) -> anyhow::Result<Revoked> {
    let db = open_store(&cfg.tickets)?;
    let row = db.find(id)?;
    let r = db.revoke(&row.ticket_id, now_unix)?;
    if let Revoked::Now(row) = &r {
        tracing::info!(ticket = %hex::encode(row.ticket_id), title = %row.title, holder = %row.holder, "ticket revoked");
    }
    Ok(r)
}

/// Every ticket in the database.
pub fn list(cfg: &Config) -> anyhow::Result<Vec<TicketRow>> {
    Ok(open_store(&cfg.tickets)?.list()?)
}

/// The last `limit` play requests in the audit log (of `title`), oldest first.
pub fn audit(
    cfg: &Config,
    title: Option<&str>,
    limit: u32,
) -> anyhow::Result<Vec<crate::ticket::AuditEntry>> {
    Ok(open_store(&cfg.tickets)?.audit_list(title, limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_forms() {
        assert_eq!(parse_expiry("30d").unwrap().as_secs(), 30 * 86400);
        assert_eq!(parse_expiry("12h").unwrap().as_secs(), 12 * 3600);
        assert_eq!(parse_expiry("90m").unwrap().as_secs(), 90 * 60);
        assert_eq!(parse_expiry("3600s").unwrap().as_secs(), 3600);
        assert_eq!(parse_expiry("3600").unwrap().as_secs(), 3600);
        assert_eq!(parse_expiry("1w").unwrap().as_secs(), 7 * 86400);
        for bad in ["", "soon", "0", "0s", "-5m"] {
            assert!(parse_expiry(bad).is_err(), "{bad:?}");
        }
        assert_eq!(show_time(0), "never");
        assert_eq!(show_time(86400), "1970-01-02T00:00:00Z");
    }

    /// The ticket file is 0600, whatever the umask: created so (not chmodded afterwards), and
    /// a file planted at the target is replaced, not written through.
    #[test]
    fn ticket_file_is_written_0600() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.ticket");
        write_private(&out, b"ticket bytes").unwrap();
        assert_eq!(mode(&out), 0o600);
        assert_eq!(std::fs::read(&out).unwrap(), b"ticket bytes");

        // A world-readable file already there: replaced by a new 0600 file.
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&out, b"again").unwrap();
        assert_eq!(mode(&out), 0o600);
        assert_eq!(std::fs::read(&out).unwrap(), b"again");
        // No temp file left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("t.ticket")]);
    }
}
