//! Play tickets on the server (DESIGN §2 "Play ticket", FIG. 10).
//!
//! This module is the pure part and the vocabulary: [`check`] judges a presented ticket
//! (signature, issuer, title, expiry) and [`why_refused`] explains a database row that could
//! not give a play, both clock-free; [`TicketStore`] is what the server and `mcastd ticket …`
//! need from the validation database, with its rows and errors.
//!
//! * [`sqlite`] — the SQLite file (`[tickets] database = "sqlite"`, one server; the default).
//! * [`postgres`] — a PostgreSQL server shared by several (`database = "postgres"`).
//! * [`service`] — [`service::open_store`], the one constructor that picks a backend from
//!   `[tickets]`, and [`service::TicketService`], the server's ticket desk.
//! * [`worker`] — the desk on its own thread behind a bounded queue (off the send thread).
//!
//! Dependencies point one way: the backends and the service use this module, never the
//! reverse.

use std::path::{Path, PathBuf};

use mcast_keys::ticket::{Ticket, TicketError, TicketId};
use mcast_keys::PublicIdentity;

pub mod postgres;
pub mod service;
pub mod sqlite;
pub mod worker;

/// Why a ticket is refused. `Display` is the message the receiver shows its user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("ticket is malformed: {0}")]
    Malformed(String),
    #[error("bad signature: ticket was forged or tampered with")]
    BadSignature,
    #[error("ticket was issued by another server (key {found}); this server is {ours}")]
    OtherServer { found: String, ours: String },
    #[error("this server is an edge: titles of origin server {origin} are played at the origin (it holds their tickets): play at the origin")]
    AtOrigin { origin: String },
    #[error("ticket is not for this title: it is for {ticket_title:?}, not {requested:?}")]
    WrongTitle {
        ticket_title: String,
        requested: String,
    },
    #[error("ticket expired (at unix time {at})")]
    Expired { at: u64 },
    #[error("ticket has been revoked")]
    Revoked,
    #[error("ticket already used ({plays} of {plays} plays)")]
    AlreadyUsed { plays: u32 },
    #[error("unknown ticket: this server has no record of it")]
    Unknown,
    #[error("ticket does not match the archive it was issued for")]
    ArchiveMismatch,
    #[error("the request does not prove it holds the ticket's key part (the signed ticket was copied or overheard without its ticket file, or the request was altered)")]
    NoPossession,
}

/// What a valid ticket grants (no key part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub ticket_id: TicketId,
    pub title: String,
    pub archive_id: [u8; 16],
    pub holder: String,
    pub plays: u32,
    pub expires_unix: u64,
    /// The ticket's commitment to part A (the server checks the A it derives against it).
    pub part_a_commit: [u8; 32],
}

/// Judge a presented ticket for `requested_title` at `now_unix`: it must decode, come from
/// `trusted` with an intact signature, name the requested title and not be expired. Plays
/// left and revocation are the database's part.
pub fn check(
    requested_title: &str,
    ticket_bytes: &[u8],
    now_unix: u64,
    trusted: &PublicIdentity,
) -> Result<Claims, Refusal> {
    let t = Ticket::decode(ticket_bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
    match t.verify(trusted) {
        Ok(()) => {}
        Err(TicketError::ForeignServer { found, trusted }) => {
            return Err(Refusal::OtherServer {
                found,
                ours: trusted,
            })
        }
        Err(_) => return Err(Refusal::BadSignature),
    }
    if t.title != requested_title {
        return Err(Refusal::WrongTitle {
            ticket_title: t.title.clone(),
            requested: requested_title.to_string(),
        });
    }
    if t.expires_unix != 0 && now_unix >= t.expires_unix {
        return Err(Refusal::Expired { at: t.expires_unix });
    }
    Ok(Claims {
        ticket_id: t.ticket_id,
        title: t.title.clone(),
        archive_id: t.archive_id,
        holder: t.holder.clone(),
        plays: t.plays,
        expires_unix: t.expires_unix,
        part_a_commit: t.part_a_commit,
    })
}

/// The database's view of a ticket's validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TicketStatus {
    pub revoked: bool,
    /// 0 = never.
    pub expires_unix: u64,
    pub plays: u32,
    pub plays_left: u32,
}

/// What `mcastd ticket list` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Valid,
    Used,
    Expired,
    Revoked,
}

impl TicketStatus {
    pub fn at(&self, now_unix: u64) -> State {
        match why_refused(self, now_unix) {
            Refusal::Revoked => State::Revoked,
            Refusal::Expired { .. } => State::Expired,
            Refusal::AlreadyUsed { .. } => State::Used,
            _ => State::Valid,
        }
    }
}

/// Why a ticket with `status` cannot give a play at `now_unix`, in the order a user needs to
/// hear it (revoked beats expired beats used up). For a ticket that can still play this
/// returns [`Refusal::Unknown`], which callers never see: they ask only after a refusal.
pub fn why_refused(status: &TicketStatus, now_unix: u64) -> Refusal {
    if status.revoked {
        Refusal::Revoked
    } else if status.expires_unix != 0 && now_unix >= status.expires_unix {
        Refusal::Expired {
            at: status.expires_unix,
        }
    } else if status.plays_left == 0 {
        Refusal::AlreadyUsed {
            plays: status.plays,
        }
    } else {
        Refusal::Unknown
    }
}

/// A database problem, naming the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TicketDbError {
    #[error("ticket database {path}: {what}: {source}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ticket database {path}: {what}: {source}")]
    Pg {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: ::postgres::Error,
    },
    /// No connection to PostgreSQL: `why` says what went wrong and what to set.
    #[error("ticket database {path}: {why}")]
    PgConnect {
        path: PathBuf,
        why: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error("ticket database {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// One ticket as the database knows it (no key part).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TicketRow {
    #[serde(serialize_with = "hex_ser")]
    pub ticket_id: TicketId,
    pub title: String,
    #[serde(serialize_with = "hex_ser")]
    pub archive_id: [u8; 16],
    pub holder: String,
    pub plays: u32,
    pub plays_left: u32,
    /// 0 = never.
    pub expires_unix: u64,
    pub issued_unix: u64,
    /// 0 = not revoked.
    pub revoked_unix: u64,
    /// Plays granted (distinct receiver keys).
    pub grants: u32,
}

fn hex_ser<S: serde::Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

impl TicketRow {
    /// Status at `now_unix` (for `mcastd ticket list`).
    pub fn state(&self, now_unix: u64) -> State {
        TicketStatus {
            revoked: self.revoked_unix != 0,
            expires_unix: self.expires_unix,
            plays: self.plays,
            plays_left: self.plays_left,
        }
        .at(now_unix)
    }
}

/// A play that was granted: part B (still wrapped) and what is left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    pub wrapped_part: Vec<u8>,
    pub plays_left: u32,
    /// True when this was a retry of a play already granted to the same receiver key (no
    /// play was used this time).
    pub repeated: bool,
}

/// One play request in the audit log (`mcastd ticket audit`): who asked, from where, for
/// what, and what came of it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub at_unix: u64,
    /// Hex ticket id; empty when the presented ticket did not decode.
    pub ticket_id: String,
    /// The ticket's holder (as the ticket says; see `outcome`/`reason` for whether it was
    /// genuine).
    pub holder: String,
    pub title: String,
    /// The receiver's address (proven by an address token).
    pub receiver: String,
    /// `granted` (a play used), `repeat` (a retry of a grant; no play used), `refused`,
    /// `error` (database or key store).
    pub outcome: String,
    /// Plays left after a grant.
    pub plays_left: Option<u32>,
    /// Why it was refused or failed (empty for grants).
    pub reason: String,
}

/// Result of `revoke`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    Now(TicketRow),
    Already(TicketRow),
}

/// The validation database: what the server's ticket desk and the operator's `mcastd ticket`
/// commands do with it. [`service::open_store`] opens the one `[tickets]` names.
pub trait TicketStore: Send {
    /// The SQLite file, or the PostgreSQL connection string without its password.
    fn path(&self) -> &Path;

    /// Record a newly issued ticket with its (wrapped) part B.
    fn insert(&self, t: &Ticket, wrapped_part: &[u8]) -> Result<(), TicketDbError>;

    /// Delete a ticket (an issue whose ticket file could not be written).
    fn remove(&self, ticket_id: &TicketId) -> Result<(), TicketDbError>;

    /// Every ticket, oldest first.
    fn list(&self) -> Result<Vec<TicketRow>, TicketDbError>;

    fn get(&self, ticket_id: &TicketId) -> Result<Option<TicketRow>, TicketDbError>;

    /// The wrapped part B of a ticket (`None` if there is no such ticket).
    fn wrapped_part(&self, ticket_id: &TicketId) -> Result<Option<Vec<u8>>, TicketDbError>;

    /// Revoke a ticket: it is refused from now on, including retries of earlier grants.
    fn revoke(&self, ticket_id: &TicketId, now_unix: u64) -> Result<Revoked, TicketDbError>;

    /// Use one play of `ticket_id` for the receiver key `receiver_pub`, atomically: any number
    /// of concurrent requests, from any number of processes, use exactly the plays there are.
    ///
    /// A request repeated with the same receiver key within `retry_secs` of its grant gets the
    /// grant again and uses nothing. The outer error is a database failure; the inner one the
    /// reason the ticket is refused.
    fn consume(
        &mut self,
        ticket_id: &TicketId,
        archive_id: &[u8; 16],
        receiver_pub: &[u8; 32],
        now_unix: u64,
        retry_secs: u64,
    ) -> Result<Result<Consumed, Refusal>, TicketDbError>;

    /// Append a play request to the audit log.
    fn audit(&self, e: &AuditEntry) -> Result<(), TicketDbError>;

    /// The last `limit` audit entries (of `title`, if given), oldest first.
    fn audit_list(&self, title: Option<&str>, limit: u32)
        -> Result<Vec<AuditEntry>, TicketDbError>;

    /// The ticket whose id is, or starts with, `hex_prefix` (at least 8 hex digits; must be
    /// unambiguous).
    fn find(&self, hex_prefix: &str) -> Result<TicketRow, TicketDbError> {
        find_in(self.list()?, hex_prefix, self.path())
    }
}

fn find_in(
    rows: Vec<TicketRow>,
    hex_prefix: &str,
    path: &Path,
) -> Result<TicketRow, TicketDbError> {
    let p = hex_prefix.trim().to_ascii_lowercase();
    let invalid = |why: String| TicketDbError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    if p.len() < 8 || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!(
            "{hex_prefix:?} is not a ticket id (32 hex digits, or a unique prefix of 8 or more)"
        )));
    }
    let matches: Vec<TicketRow> = rows
        .into_iter()
        .filter(|r| hex::encode(r.ticket_id).starts_with(&p))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap()),
        0 => Err(invalid(format!("no ticket with id {hex_prefix}"))),
        n => Err(invalid(format!(
            "{n} tickets have ids starting with {hex_prefix}; give more digits"
        ))),
    }
}

/// What a revoke did, from whether its conditional UPDATE changed a row and the row after
/// it (both backends).
pub(crate) fn revoke_outcome(
    changed: bool,
    row: Option<TicketRow>,
    db: &Path,
    ticket_id: &TicketId,
) -> Result<Revoked, TicketDbError> {
    let row = row.ok_or_else(|| TicketDbError::Invalid {
        path: db.to_path_buf(),
        why: format!("no ticket with id {}", hex::encode(ticket_id)),
    })?;
    Ok(if changed {
        Revoked::Now(row)
    } else {
        Revoked::Already(row)
    })
}

/// SQL integers are signed: counts and times saturate rather than wrap (both backends).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcast_keys::ticket::TicketSpec;
    use mcast_keys::{Identity, MasterKey};

    fn spec(expires_unix: u64) -> TicketSpec {
        TicketSpec {
            title: "film".into(),
            archive_id: [4; 16],
            holder: "carol".into(),
            plays: 1,
            expires_unix,
            issued_unix: 100,
        }
    }

    #[test]
    fn check_judges_issuer_signature_title_and_expiry() {
        let id = Identity::generate();
        let m = MasterKey::generate();
        let (tf, _) = Ticket::issue(&id, &m, &spec(500)).unwrap();
        let t = tf.ticket();
        let bytes = t.encode();
        let trusted = id.public();
        let c = check("film", &bytes, 499, &trusted).unwrap();
        assert_eq!((c.ticket_id, c.archive_id), (t.ticket_id, [4; 16]));
        assert_eq!(
            check("film", &bytes, 500, &trusted),
            Err(Refusal::Expired { at: 500 })
        );
        let e = check("other", &bytes, 1, &trusted).unwrap_err();
        assert!(e.to_string().contains("not for this title"), "{e}");
        assert!(matches!(
            check("film", &bytes, 1, &Identity::generate().public()),
            Err(Refusal::OtherServer { .. })
        ));
        let mut tampered = bytes.to_vec();
        let n = tampered.len();
        tampered[n - 100] ^= 1; // inside the commitment to part A
        assert_eq!(
            check("film", &tampered, 1, &trusted),
            Err(Refusal::BadSignature)
        );
        assert!(matches!(
            check("film", b"garbage", 1, &trusted),
            Err(Refusal::Malformed(_))
        ));
        // Never expires.
        let (forever, _) = Ticket::issue(&id, &m, &spec(0)).unwrap();
        check("film", &forever.ticket().encode(), u64::MAX, &trusted).unwrap();
    }

    #[test]
    fn refusal_reasons_in_order() {
        let st = |revoked, expires_unix, plays_left| TicketStatus {
            revoked,
            expires_unix,
            plays: 1,
            plays_left,
        };
        assert_eq!(why_refused(&st(true, 5, 0), 10), Refusal::Revoked);
        assert_eq!(
            why_refused(&st(false, 5, 0), 10),
            Refusal::Expired { at: 5 }
        );
        assert_eq!(
            why_refused(&st(false, 0, 0), 10),
            Refusal::AlreadyUsed { plays: 1 }
        );
        assert_eq!(st(false, 11, 1).at(10), State::Valid);
        assert_eq!(st(false, 0, 0).at(10), State::Used);
        assert!(Refusal::AlreadyUsed { plays: 1 }
            .to_string()
            .contains("already used"));
    }
}
