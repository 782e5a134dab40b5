//! The ticket validation database on a PostgreSQL server (`[tickets] database = "postgres"`),
//! shared by every `mcastd` of a site: a ticket issued through any server plays through any
//! server, and single use holds across servers.
//!
//! Same rows and rules as the SQLite backend ([`super::sqlite`]), in tables prefixed
//! `mcast_` (so a shared database stays tidy). A play is decided by one transaction: the
//! ticket row is locked (`SELECT ... FOR UPDATE`), then one conditional `UPDATE ... SET
//! plays_left = plays_left - 1 WHERE ... plays_left > 0 ... RETURNING` uses the play and the
//! grant is recorded, so any number of concurrent requests on any number of servers use
//! exactly the plays there are. Commits are synchronous (PostgreSQL's default), so a grant
//! that left a server is durable.
//!
//! Part B is stored wrapped, as in SQLite: the database never holds a key part in the clear.
//!
//! Schema 2 adds `mcast_audit` (every play request); a schema-1 database gains it on open.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mcast_keys::ticket::{Ticket, TicketId};
use postgres::config::{Host, SslMode};
use postgres::error::SqlState;
use postgres::{Client, Config as PgConfig, NoTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    revoke_outcome, to_i64, to_u64, why_refused, AuditEntry, Consumed, Refusal, Revoked,
    TicketDbError, TicketRow, TicketStatus, TicketStore,
};
use crate::config::{PgTls, TicketsConfig};

/// 2: the `mcast_audit` table (a version-1 database is migrated on open).
const SCHEMA_VERSION: i64 = 2;
/// Advisory lock key serialising schema creation by servers starting at once.
const SCHEMA_LOCK: i64 = 0x6d63_6173_7430_0001;

pub struct PgStore {
    client: Mutex<Client>,
    /// How to connect again (after a restart or failover of the server).
    plan: Plan,
    /// The TLS connector (roots loaded once); `None` when [`Plan::tls`] is false.
    tls: Option<MakeRustlsConnect>,
    /// What the server's certificate is checked against, for messages.
    roots: String,
    /// The connection string with any password removed (for messages and logs).
    label: PathBuf,
}

/// `tickets.postgres_url` read and checked against `tickets.postgres_tls` (see [`plan`]).
#[derive(Clone)]
pub struct Plan {
    /// The parsed connection string, its TLS mode set from `postgres_tls`.
    pub config: PgConfig,
    /// Whether the connection uses TLS: toward every TCP host under "verify-full"; never over
    /// a Unix socket, where PostgreSQL offers none.
    pub tls: bool,
    /// "host:port" (comma-separated when several), for messages.
    pub target: String,
}

const URL_FIELD: &str = "tickets.postgres_url";
const TLS_FIELD: &str = "tickets.postgres_tls";
const SSLMODE_WHY: &str = "sslmode is not read from postgres_url: remove it and set \
     tickets.postgres_tls = \"verify-full\" (the default: TLS, the certificate chain and host \
     name checked) or \"disable\" (plaintext, toward this host only)";

/// A host name that means this machine.
fn is_loopback_name(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// Read `url` and check it against `tls`; `Err((field, why))` names the `[tickets]` field to
/// change and says how. "disable" is refused unless every host is a loopback address (or
/// `localhost`) or a Unix socket directory; "verify-full" needs a host name to check the
/// certificate against (`hostaddr=` alone has none); `sslmode` in the URL is refused (TLS is
/// set in one place, `postgres_tls`).
pub fn plan(url: &str, tls: PgTls) -> Result<Plan, (&'static str, String)> {
    let mut config: PgConfig = url.parse().map_err(|e: postgres::Error| {
        let msg = chain(&e);
        if msg.contains("sslmode") {
            (URL_FIELD, SSLMODE_WHY.to_string())
        } else {
            (URL_FIELD, format!("cannot be read: {msg}"))
        }
    })?;
    // Prefer is the parser's default: anything else was written in the URL.
    if config.get_ssl_mode() != SslMode::Prefer {
        return Err((URL_FIELD, SSLMODE_WHY.to_string()));
    }
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    let n = hosts.len().max(addrs.len());
    if n == 0 {
        return Err((
            URL_FIELD,
            "names no server: add host=NAME (the name in the server's certificate) or a Unix \
             socket directory"
                .into(),
        ));
    }
    let mut targets = Vec::new();
    let mut all_unix = true;
    for i in 0..n {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let (shown, local, unix) = match (hosts.get(i), addrs.get(i)) {
            (host, Some(a)) => {
                if tls == PgTls::VerifyFull && !matches!(host, Some(Host::Tcp(_))) {
                    return Err((
                        URL_FIELD,
                        format!(
                            "hostaddr={a} without host=NAME: with postgres_tls = \"verify-full\" \
                             the server's certificate is checked against host=, so add the name \
                             or address it was issued for"
                        ),
                    ));
                }
                (
                    SocketAddr::new(*a, port).to_string(),
                    a.is_loopback(),
                    false,
                )
            }
            (Some(Host::Tcp(h)), None) => {
                let shown = if h.contains(':') && !h.starts_with('[') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                };
                (shown, is_loopback_name(h), false)
            }
            (Some(Host::Unix(d)), None) => (format!("{}/.s.PGSQL.{port}", d.display()), true, true),
            (None, None) => unreachable!("i < max(hosts, hostaddrs)"),
        };
        all_unix &= unix;
        if tls == PgTls::Disable && !local {
            return Err((
                TLS_FIELD,
                format!(
                    "\"disable\" would send tickets and plays in plaintext to {shown}, which is \
                     not this host; it is allowed only toward a loopback address or a Unix \
                     socket directory. Keep postgres_tls = \"verify-full\" (the default) and set \
                     tickets.postgres_ca_file to the CA that signed the server's certificate"
                ),
            ));
        }
        targets.push(shown);
    }
    let use_tls = tls == PgTls::VerifyFull && !all_unix;
    config.ssl_mode(if use_tls {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    Ok(Plan {
        config,
        tls: use_tls,
        target: targets.join(","),
    })
}

/// The TLS connector: rustls on the ring provider, roots from `ca_file` (PEM), or the
/// system's when it is empty.
fn tls_connector(ca_file: &Path) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    if ca_file.as_os_str().is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let mut why = "no CA certificate in the system store".to_string();
            if let Some(e) = found.errors.first() {
                let _ = write!(why, " ({e})");
            }
            why.push_str(
                ": install ca-certificates, or set tickets.postgres_ca_file to the CA that signed \
                 the server's certificate",
            );
            return Err(why);
        }
    } else {
        let file = ca_file.display();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
            .and_then(|it| it.collect())
            .map_err(|e| format!("tickets.postgres_ca_file {file}: cannot read it: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "tickets.postgres_ca_file {file}: no PEM certificate (-----BEGIN CERTIFICATE-----) \
                 in it"
            ));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                format!("tickets.postgres_ca_file {file}: not a usable CA certificate: {e}")
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// An error and its causes: "a: b: c".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// The rustls error behind a failed handshake (tokio-rustls wraps it in an `io::Error`).
fn rustls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = c.source();
    }
    None
}

/// What went wrong connecting, and what to do about it.
fn explain(e: &postgres::Error, plan: &Plan, roots: &str) -> String {
    use rustls::CertificateError as C;
    let detail = chain(e);
    let what = if let Some(r) = rustls_cause(e) {
        match r {
            rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
                "certificate not trusted by {roots} (set tickets.postgres_ca_file to the CA that \
                 signed the server's certificate)"
            ),
            rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            ) => "certificate is not valid for the host name in tickets.postgres_url (use a \
                  name or address its subjectAltName lists, or reissue it for this one)"
                .to_string(),
            rustls::Error::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => "certificate expired or not yet valid (renew it, or check this host's clock)"
                .to_string(),
            rustls::Error::InvalidCertificate(_) => format!(
                "certificate refused (it must be a server certificate for this host name, \
                 signed by a CA in {roots})"
            ),
            _ => "TLS handshake failed".to_string(),
        }
    } else if detail.contains("server does not support TLS") {
        "does not offer TLS (ssl = off in its postgresql.conf?): turn ssl on there with a \
         certificate, or, for a server on this host only, set tickets.postgres_tls = \"disable\""
            .to_string()
    } else if e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && db.message().contains("no encryption")
    }) {
        "refuses a plaintext connection (its pg_hba.conf allows this role only over TLS: \
         hostssl): set tickets.postgres_tls = \"verify-full\" and tickets.postgres_ca_file"
            .to_string()
    } else {
        "cannot connect (is PostgreSQL running, and is tickets.postgres_url right?)".to_string()
    };
    format!("PostgreSQL at {}: {what} [{detail}]", plan.target)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// A connection string without its password (`password=...` or `user:pass@`).
pub fn redact(url: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let scheme = &url[..url.len() - rest.len()];
        return match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}{user}@{host}")
            }
            None => url.to_string(),
        };
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.to_ascii_lowercase().starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl PgStore {
    /// Connect to the server `[tickets]` names (`postgres_url`, over TLS unless
    /// `postgres_tls = "disable"`) and create the tables if they are missing.
    pub fn open(cfg: &TicketsConfig) -> Result<PgStore, TicketDbError> {
        let url = &cfg.postgres_url;
        let label = PathBuf::from(format!("postgres[{}]", redact(url)));
        let invalid = |why: String| TicketDbError::Invalid {
            path: label.clone(),
            why,
        };
        let plan =
            plan(url, cfg.postgres_tls).map_err(|(f, why)| invalid(format!("{f}: {why}")))?;
        let tls = if plan.tls {
            Some(tls_connector(&cfg.postgres_ca_file).map_err(invalid)?)
        } else {
            None
        };
        let roots = if cfg.postgres_ca_file.as_os_str().is_empty() {
            "the system roots".to_string()
        } else {
            cfg.postgres_ca_file.display().to_string()
        };
        let mut client = Self::connect(&plan, tls.as_ref(), &roots, &label)?;
        let err = |what: &'static str| {
            let path = label.clone();
            move |source| TicketDbError::Pg { path, what, source }
        };
        let mut tx = client
            .transaction()
            .map_err(err("cannot start a transaction"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(err("cannot lock the schema"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS mcast_meta (
                 key TEXT PRIMARY KEY, value BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS mcast_tickets (
                 ticket_id BYTEA PRIMARY KEY CHECK (length(ticket_id) = 16),
                 title TEXT NOT NULL,
                 archive_id BYTEA NOT NULL CHECK (length(archive_id) = 16),
                 holder TEXT NOT NULL,
                 plays BIGINT NOT NULL CHECK (plays >= 1),
                 plays_left BIGINT NOT NULL CHECK (plays_left >= 0 AND plays_left <= plays),
                 expires_unix BIGINT NOT NULL,
                 issued_unix BIGINT NOT NULL,
                 revoked_unix BIGINT NOT NULL DEFAULT 0,
                 part_b BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS mcast_grants (
                 ticket_id BYTEA NOT NULL REFERENCES mcast_tickets (ticket_id) ON DELETE CASCADE,
                 receiver_pub BYTEA NOT NULL,
                 granted_unix BIGINT NOT NULL,
                 PRIMARY KEY (ticket_id, receiver_pub));
             CREATE TABLE IF NOT EXISTS mcast_audit (
                 id BIGSERIAL PRIMARY KEY,
                 at_unix BIGINT NOT NULL,
                 ticket_id TEXT NOT NULL,
                 holder TEXT NOT NULL,
                 title TEXT NOT NULL,
                 receiver TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 plays_left BIGINT,
                 reason TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS mcast_audit_title ON mcast_audit (title, id);
             INSERT INTO mcast_meta (key, value) VALUES ('schema', 2) ON CONFLICT DO NOTHING;
             UPDATE mcast_meta SET value = 2 WHERE key = 'schema' AND value = 1;",
        )
        .map_err(err("cannot create the schema"))?;
        let version: i64 = tx
            .query_one("SELECT value FROM mcast_meta WHERE key = 'schema'", &[])
            .map_err(err("cannot read the schema version"))?
            .get(0);
        tx.commit().map_err(err("cannot commit the schema"))?;
        if version != SCHEMA_VERSION {
            return Err(TicketDbError::Invalid {
                path: label,
                why: format!("schema version {version}; this build reads version {SCHEMA_VERSION}"),
            });
        }
        Ok(PgStore {
            client: Mutex::new(client),
            plan,
            tls,
            roots,
            label,
        })
    }

    fn connect(
        plan: &Plan,
        tls: Option<&MakeRustlsConnect>,
        roots: &str,
        label: &Path,
    ) -> Result<Client, TicketDbError> {
        let r = match tls {
            Some(tls) => plan.config.connect(tls.clone()),
            None => plan.config.connect(NoTls),
        };
        r.map_err(|source| TicketDbError::PgConnect {
            path: label.to_path_buf(),
            why: explain(&source, plan, roots),
            source,
        })
    }

    fn err(&self, what: &'static str) -> impl FnOnce(postgres::Error) -> TicketDbError + '_ {
        move |source| TicketDbError::Pg {
            path: self.label.clone(),
            what,
            source,
        }
    }

    /// The connection, re-established if the server closed it (restart, failover).
    fn client(&self) -> Result<std::sync::MutexGuard<'_, Client>, TicketDbError> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_closed() {
            tracing::warn!(db = %self.label.display(), "ticket database connection lost: reconnecting");
            *c = Self::connect(&self.plan, self.tls.as_ref(), &self.roots, &self.label)?;
        }
        Ok(c)
    }

    const ROW_SQL: &'static str = "SELECT t.ticket_id, t.title, t.archive_id, t.holder, t.plays,
             t.plays_left, t.expires_unix, t.issued_unix, t.revoked_unix,
             (SELECT count(*) FROM mcast_grants g WHERE g.ticket_id = t.ticket_id)
         FROM mcast_tickets t";

    fn row(&self, r: &postgres::Row) -> Result<TicketRow, TicketDbError> {
        let blob16 = |i: usize| -> Result<[u8; 16], TicketDbError> {
            let v: Vec<u8> = r.get(i);
            v.try_into().map_err(|v: Vec<u8>| TicketDbError::Invalid {
                path: self.label.clone(),
                why: format!("{} bytes where 16 expected", v.len()),
            })
        };
        Ok(TicketRow {
            ticket_id: blob16(0)?,
            title: r.get(1),
            archive_id: blob16(2)?,
            holder: r.get(3),
            plays: to_u32(r.get(4)),
            plays_left: to_u32(r.get(5)),
            expires_unix: to_u64(r.get(6)),
            issued_unix: to_u64(r.get(7)),
            revoked_unix: to_u64(r.get(8)),
            grants: to_u32(r.get(9)),
        })
    }
}

impl TicketStore for PgStore {
    fn path(&self) -> &Path {
        &self.label
    }

    fn audit(&self, e: &AuditEntry) -> Result<(), TicketDbError> {
        self.client()?
            .execute(
                "INSERT INTO mcast_audit (at_unix, ticket_id, holder, title, receiver, outcome,
                     plays_left, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &to_i64(e.at_unix),
                    &e.ticket_id,
                    &e.holder,
                    &e.title,
                    &e.receiver,
                    &e.outcome,
                    &e.plays_left.map(i64::from),
                    &e.reason,
                ],
            )
            .map_err(self.err("cannot record the play in the audit log"))?;
        Ok(())
    }

    fn audit_list(
        &self,
        title: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, TicketDbError> {
        let rows = self
            .client()?
            .query(
                "SELECT at_unix, ticket_id, holder, title, receiver, outcome, plays_left, reason
                 FROM mcast_audit WHERE $1::TEXT IS NULL OR title = $1
                 ORDER BY id DESC LIMIT $2",
                &[&title, &i64::from(limit)],
            )
            .map_err(self.err("cannot read the audit log"))?;
        let mut v: Vec<AuditEntry> = rows
            .iter()
            .map(|r| AuditEntry {
                at_unix: to_u64(r.get(0)),
                ticket_id: r.get(1),
                holder: r.get(2),
                title: r.get(3),
                receiver: r.get(4),
                outcome: r.get(5),
                plays_left: r.get::<_, Option<i64>>(6).map(to_u32),
                reason: r.get(7),
            })
            .collect();
        v.reverse();
        Ok(v)
    }

    fn insert(&self, t: &Ticket, wrapped_part: &[u8]) -> Result<(), TicketDbError> {
        self.client()?
            .execute(
                "INSERT INTO mcast_tickets (ticket_id, title, archive_id, holder, plays, plays_left,
                     expires_unix, issued_unix, part_b)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8)",
                &[
                    &&t.ticket_id[..],
                    &t.title,
                    &&t.archive_id[..],
                    &t.holder,
                    &(t.plays as i64),
                    &to_i64(t.expires_unix),
                    &to_i64(t.issued_unix),
                    &wrapped_part,
                ],
            )
            .map_err(self.err("cannot record the ticket"))?;
        Ok(())
    }

    fn remove(&self, ticket_id: &TicketId) -> Result<(), TicketDbError> {
        self.client()?
            .execute(
                "DELETE FROM mcast_tickets WHERE ticket_id = $1",
                &[&&ticket_id[..]],
            )
            .map_err(self.err("cannot delete the ticket"))?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<TicketRow>, TicketDbError> {
        let rows = self
            .client()?
            .query(
                &format!("{} ORDER BY t.issued_unix, t.ticket_id", Self::ROW_SQL),
                &[],
            )
            .map_err(self.err("cannot list tickets"))?;
        rows.iter().map(|r| self.row(r)).collect()
    }

    fn get(&self, ticket_id: &TicketId) -> Result<Option<TicketRow>, TicketDbError> {
        let r = self
            .client()?
            .query_opt(
                &format!("{} WHERE t.ticket_id = $1", Self::ROW_SQL),
                &[&&ticket_id[..]],
            )
            .map_err(self.err("cannot read the ticket"))?;
        r.map(|r| self.row(&r)).transpose()
    }

    fn wrapped_part(&self, ticket_id: &TicketId) -> Result<Option<Vec<u8>>, TicketDbError> {
        Ok(self
            .client()?
            .query_opt(
                "SELECT part_b FROM mcast_tickets WHERE ticket_id = $1",
                &[&&ticket_id[..]],
            )
            .map_err(self.err("cannot read the ticket"))?
            .map(|r| r.get(0)))
    }

    fn revoke(&self, ticket_id: &TicketId, now_unix: u64) -> Result<Revoked, TicketDbError> {
        let n = self
            .client()?
            .execute(
                "UPDATE mcast_tickets SET revoked_unix = $2 WHERE ticket_id = $1 AND revoked_unix = 0",
                &[&&ticket_id[..], &to_i64(now_unix.max(1))],
            )
            .map_err(self.err("cannot revoke the ticket"))?;
        revoke_outcome(n == 1, self.get(ticket_id)?, &self.label, ticket_id)
    }

    /// Use one play, atomically across every server sharing this database (see the module
    /// docs). Same contract as the SQLite backend.
    fn consume(
        &mut self,
        ticket_id: &TicketId,
        archive_id: &[u8; 16],
        receiver_pub: &[u8; 32],
        now_unix: u64,
        retry_secs: u64,
    ) -> Result<Result<Consumed, Refusal>, TicketDbError> {
        let mut client = self.client()?;
        let now = to_i64(now_unix);
        let mut tx = client
            .transaction()
            .map_err(self.err("cannot start a transaction"))?;
        // The row lock: concurrent plays of one ticket, from any server, queue here.
        let Some(row) = tx
            .query_opt(
                "SELECT revoked_unix, expires_unix, plays, plays_left, archive_id
                 FROM mcast_tickets WHERE ticket_id = $1 FOR UPDATE",
                &[&&ticket_id[..]],
            )
            .map_err(self.err("cannot read the ticket"))?
        else {
            return Ok(Err(Refusal::Unknown));
        };
        let status = TicketStatus {
            revoked: row.get::<_, i64>(0) != 0,
            expires_unix: to_u64(row.get(1)),
            plays: to_u32(row.get(2)),
            plays_left: to_u32(row.get(3)),
        };
        let aid: Vec<u8> = row.get(4);
        if aid != archive_id[..] {
            return Ok(Err(Refusal::ArchiveMismatch));
        }
        // A retry of a play already granted to this receiver key?
        if !status.revoked {
            let earlier = tx
                .query_opt(
                    "SELECT granted_unix FROM mcast_grants WHERE ticket_id = $1 AND receiver_pub = $2",
                    &[&&ticket_id[..], &&receiver_pub[..]],
                )
                .map_err(self.err("cannot look up earlier grants"))?;
            if let Some(at) = earlier.map(|r| r.get::<_, i64>(0)) {
                if now.saturating_sub(at) <= to_i64(retry_secs) {
                    let r = tx
                        .query_one(
                            "SELECT part_b, plays_left FROM mcast_tickets WHERE ticket_id = $1",
                            &[&&ticket_id[..]],
                        )
                        .map_err(self.err("cannot read the ticket"))?;
                    tx.commit().map_err(self.err("cannot commit"))?;
                    return Ok(Ok(Consumed {
                        wrapped_part: r.get(0),
                        plays_left: to_u32(r.get(1)),
                        repeated: true,
                    }));
                }
            }
        }
        // The one conditional update that uses a play.
        let used = tx
            .query_opt(
                "UPDATE mcast_tickets SET plays_left = plays_left - 1
                 WHERE ticket_id = $1 AND archive_id = $2 AND plays_left > 0
                   AND revoked_unix = 0 AND (expires_unix = 0 OR expires_unix > $3)
                 RETURNING part_b, plays_left",
                &[&&ticket_id[..], &&archive_id[..], &now],
            )
            .map_err(self.err("cannot use a play"))?;
        let Some(used) = used else {
            drop(tx); // rolls back: nothing changed
            return Ok(Err(why_refused(&status, now_unix)));
        };
        tx.execute(
            "INSERT INTO mcast_grants (ticket_id, receiver_pub, granted_unix)
             VALUES ($1, $2, $3)
             ON CONFLICT (ticket_id, receiver_pub) DO UPDATE SET granted_unix = EXCLUDED.granted_unix",
            &[&&ticket_id[..], &&receiver_pub[..], &now],
        )
        .map_err(self.err("cannot record the grant"))?;
        tx.commit().map_err(self.err("cannot commit the play"))?;
        Ok(Ok(Consumed {
            wrapped_part: used.get(0),
            plays_left: to_u32(used.get(1)),
            repeated: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcast_keys::ticket::TicketSpec;
    use mcast_keys::{Identity, MasterKey};

    use crate::config::Database;

    fn skip_or_fail(why: &str) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: {why} (.ci/run starts a PostgreSQL server with .ci/pg.sh)");
        }
        eprintln!("SKIPPED: {why}");
    }

    /// `MCAST_TEST_PG_URL`, or `None` after saying why (a failure under `CI=true`).
    fn pg_url() -> Option<String> {
        match std::env::var("MCAST_TEST_PG_URL") {
            Ok(u) => Some(u),
            Err(_) => {
                skip_or_fail("MCAST_TEST_PG_URL is not set (no PostgreSQL server)");
                None
            }
        }
    }

    fn tickets_cfg(url: &str, tls: PgTls, ca_file: &Path) -> TicketsConfig {
        TicketsConfig {
            database: Database::Postgres,
            postgres_url: url.to_string(),
            postgres_tls: tls,
            postgres_ca_file: ca_file.to_path_buf(),
            ..TicketsConfig::default()
        }
    }

    /// `[tickets]` for the test server: verified TLS against `MCAST_TEST_PG_CA` (the system
    /// roots when it is unset).
    fn pg_cfg() -> Option<TicketsConfig> {
        let ca = std::env::var_os("MCAST_TEST_PG_CA").unwrap_or_default();
        Some(tickets_cfg(&pg_url()?, PgTls::VerifyFull, Path::new(&ca)))
    }

    /// The `.ci/pg.sh` server (its CA in `MCAST_TEST_PG_CA`, TLS required over TCP), or
    /// `None` after saying why (a failure under `CI=true`).
    fn pg_sh_server() -> Option<(String, PathBuf)> {
        let url = pg_url()?;
        match std::env::var_os("MCAST_TEST_PG_CA") {
            Some(ca) => Some((url, PathBuf::from(ca))),
            None => {
                skip_or_fail("MCAST_TEST_PG_CA is not set (the CA of a .ci/pg.sh server)");
                None
            }
        }
    }

    fn open_err(cfg: &TicketsConfig) -> String {
        match PgStore::open(cfg) {
            Ok(_) => panic!("{} must be refused", cfg.postgres_url),
            Err(e) => e.to_string(),
        }
    }

    fn ticket(plays: u32) -> Ticket {
        let spec = TicketSpec {
            title: "film".into(),
            archive_id: [4; 16],
            holder: "pg-test".into(),
            plays,
            expires_unix: 0,
            issued_unix: 1000,
        };
        Ticket::issue(&Identity::generate(), &MasterKey::generate(), &spec)
            .unwrap()
            .0
            .ticket
    }

    #[test]
    fn concurrent_servers_use_exactly_the_plays_there_are() {
        let Some(cfg) = pg_cfg() else { return };
        let mut db = PgStore::open(&cfg).unwrap();
        let t = ticket(2);
        db.insert(&t, b"wrapped").unwrap();
        // 16 connections (as from 16 servers) race for 2 plays.
        let winners: Vec<u8> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16u8)
                .map(|i| {
                    let (cfg, t) = (&cfg, &t);
                    s.spawn(move || {
                        let mut db = PgStore::open(cfg).unwrap();
                        db.consume(&t.ticket_id, &t.archive_id, &[i; 32], 50, 60)
                            .unwrap()
                            .is_ok()
                            .then_some(i)
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        let wins = winners.len();
        assert_eq!(wins, 2);
        let row = db.get(&t.ticket_id).unwrap().unwrap();
        assert_eq!((row.plays_left, row.grants), (0, 2));
        // Same contract as SQLite: a retry with a granted key is free, others are refused.
        let retry = db
            .consume(&t.ticket_id, &t.archive_id, &[winners[0]; 32], 51, 60)
            .unwrap()
            .expect("a granted receiver key may fetch its key part again");
        assert!(retry.repeated, "{retry:?}");
        assert_eq!(retry.plays_left, 0);
        let again = db
            .consume(&t.ticket_id, &t.archive_id, &[99; 32], 51, 60)
            .unwrap();
        assert_eq!(again, Err(Refusal::AlreadyUsed { plays: 2 }));
        assert_eq!(
            db.consume(&t.ticket_id, &[0; 16], &[98; 32], 51, 60)
                .unwrap(),
            Err(Refusal::ArchiveMismatch)
        );
        assert!(matches!(
            db.revoke(&t.ticket_id, 60).unwrap(),
            Revoked::Now(_)
        ));
        let unknown = ticket(1);
        assert_eq!(
            db.consume(&unknown.ticket_id, &unknown.archive_id, &[1; 32], 5, 60)
                .unwrap(),
            Err(Refusal::Unknown)
        );
        db.remove(&t.ticket_id).unwrap();
        assert!(db.get(&t.ticket_id).unwrap().is_none());
        // The audit log (schema 2): rows come back oldest first, filtered by title.
        let title = format!("audit-{}", hex::encode(t.ticket_id));
        let e = |outcome: &str, at| AuditEntry {
            at_unix: at,
            ticket_id: hex::encode(t.ticket_id),
            holder: "pg-test".into(),
            title: title.clone(),
            receiver: "127.0.0.1:5000".into(),
            outcome: outcome.into(),
            plays_left: (outcome == "granted").then_some(1),
            reason: String::new(),
        };
        db.audit(&e("granted", 70)).unwrap();
        db.audit(&e("refused", 71)).unwrap();
        assert_eq!(
            db.audit_list(Some(&title), 10).unwrap(),
            vec![e("granted", 70), e("refused", 71)]
        );
        assert_eq!(
            db.audit_list(Some(&title), 1).unwrap(),
            vec![e("refused", 71)]
        );
    }

    /// A server whose certificate another CA signed is refused, and the message names the CA
    /// file and the key to set.
    #[test]
    fn a_certificate_from_another_ca_is_refused_naming_the_ca() {
        let Some((url, _)) = pg_sh_server() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let wrong = dir.path().join("other-ca.pem");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&wrong, other.cert.pem()).unwrap();
        let e = open_err(&tickets_cfg(&url, PgTls::VerifyFull, &wrong));
        println!("{e}");
        let expect = format!(
            "certificate not trusted by {} (set tickets.postgres_ca_file to the CA",
            wrong.display()
        );
        assert!(e.contains(&expect), "{e}");
        assert!(e.contains("PostgreSQL at 127.0.0.1:"), "{e}");
    }

    /// The right CA but another host name (connected by address): refused, saying so.
    #[test]
    fn a_certificate_for_another_name_is_refused() {
        let Some((url, ca)) = pg_sh_server() else {
            return;
        };
        let other = url.replace(
            "host=127.0.0.1",
            "host=mcast-other.invalid hostaddr=127.0.0.1",
        );
        assert_ne!(other, url, "{url}: expected host=127.0.0.1 (.ci/pg.sh)");
        let e = open_err(&tickets_cfg(&other, PgTls::VerifyFull, &ca));
        println!("{e}");
        assert!(
            e.contains("certificate is not valid for the host name"),
            "{e}"
        );
    }

    /// "disable" toward the loopback test server passes the config check, but the server
    /// (pg_hba.conf `hostssl`) refuses plaintext, and the message says what to set.
    #[test]
    fn plaintext_is_refused_by_a_server_that_requires_tls() {
        let Some((url, _)) = pg_sh_server() else {
            return;
        };
        let e = open_err(&tickets_cfg(&url, PgTls::Disable, Path::new("")));
        println!("{e}");
        assert!(
            e.contains("refuses a plaintext connection")
                && e.contains("tickets.postgres_tls = \"verify-full\""),
            "{e}"
        );
    }

    /// A server that answers the TLS request with "no" (ssl = off): a prompt, clear refusal,
    /// never a plaintext fallback nor a hang. A one-byte fake server, no PostgreSQL needed.
    #[test]
    fn a_server_without_tls_is_refused_promptly() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 8];
            s.read_exact(&mut request).unwrap();
            // SSLRequest: length 8, code 80877103.
            assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
            s.write_all(b"N").unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest
        });
        let url = format!("host=127.0.0.1 port={port} user=mcast dbname=mcast");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cfg = tickets_cfg(&url, PgTls::VerifyFull, Path::new(""));
            let _ = tx.send(PgStore::open(&cfg).map(|_| ()).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("connecting to a server without TLS must not hang");
        let e = r.expect_err("a server without TLS must be refused");
        println!("{e}");
        assert!(
            e.contains(&format!(
                "PostgreSQL at 127.0.0.1:{port}: does not offer TLS"
            )) && e.contains("tickets.postgres_tls = \"disable\""),
            "{e}"
        );
        assert!(
            server.join().unwrap().is_empty(),
            "nothing may be sent in plaintext after the refusal"
        );
    }

    #[test]
    fn tls_is_planned_from_the_config() {
        let ok = |url: &str, tls| plan(url, tls).map(|p| (p.tls, p.target));
        let v = PgTls::VerifyFull;
        let d = PgTls::Disable;
        assert_eq!(ok("host=db1 user=m", v), Ok((true, "db1:5432".to_string())));
        assert_eq!(
            ok("postgres://m@db1:6432/x", v),
            Ok((true, "db1:6432".to_string()))
        );
        assert_eq!(
            ok("host=db1 hostaddr=10.0.0.5 port=7", v),
            Ok((true, "10.0.0.5:7".to_string()))
        );
        // Unix sockets: this host, no TLS there (PostgreSQL offers none).
        assert_eq!(
            ok("host=/run/postgresql user=m", v),
            Ok((false, "/run/postgresql/.s.PGSQL.5432".to_string()))
        );
        for url in [
            "host=127.0.0.1",
            "host=localhost",
            "host=::1",
            "postgres://m@[::1]/x",
            "host=/run/postgresql",
            "host=db1 hostaddr=127.0.0.1",
        ] {
            assert_eq!(plan(url, d).map(|p| p.tls), Ok(false), "{url}");
        }
        for url in [
            "host=db1",
            "host=10.0.0.5",
            "host=127.0.0.1,db2",
            "host=localhost hostaddr=10.0.0.5",
        ] {
            let (field, why) = plan(url, d).err().unwrap();
            assert_eq!(field, "tickets.postgres_tls", "{url}");
            assert!(why.contains("not this host"), "{url}: {why}");
        }
        for url in [
            "host=db1 sslmode=require",
            "host=db1 sslmode=verify-full",
            "postgres://m@db1/x?sslmode=disable",
        ] {
            let (field, why) = plan(url, v).err().unwrap();
            assert_eq!(field, "tickets.postgres_url", "{url}");
            assert!(why.contains("postgres_tls"), "{url}: {why}");
        }
        let (field, why) = plan("hostaddr=10.0.0.5", v).err().unwrap();
        assert!(
            field == "tickets.postgres_url" && why.contains("without host="),
            "{why}"
        );
        let (field, why) = plan("user=m", v).err().unwrap();
        assert!(
            field == "tickets.postgres_url" && why.contains("names no server"),
            "{why}"
        );
    }

    /// A CA file that is missing or holds no certificate is named before any connection.
    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = open_err(&tickets_cfg("host=db.invalid", PgTls::VerifyFull, &missing));
        assert!(
            e.contains(&format!("tickets.postgres_ca_file {}", missing.display())),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = open_err(&tickets_cfg("host=db.invalid", PgTls::VerifyFull, &empty));
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("host=db user=m password=s3cret dbname=x"),
            "host=db user=m password=*** dbname=x"
        );
        assert_eq!(
            redact("postgres://m:s3cret@db:5432/x"),
            "postgres://m@db:5432/x"
        );
        assert_eq!(redact("postgresql://db/x"), "postgresql://db/x");
    }
}
