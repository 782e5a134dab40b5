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

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mcast_keys::ticket::{Ticket, TicketId};
use postgres::{Client, NoTls};

use super::{
    revoke_outcome, to_i64, to_u64, why_refused, Consumed, Refusal, Revoked, TicketDbError,
    TicketRow, TicketStatus, TicketStore,
};

const SCHEMA_VERSION: i64 = 1;
/// Advisory lock key serialising schema creation by servers starting at once.
const SCHEMA_LOCK: i64 = 0x6d63_6173_7430_0001;

pub struct PgStore {
    client: Mutex<Client>,
    url: String,
    /// The connection string with any password removed (for messages and logs).
    label: PathBuf,
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
    /// Connect to `url` and create the tables if they are missing.
    pub fn open(url: &str) -> Result<PgStore, TicketDbError> {
        let label = PathBuf::from(format!("postgres[{}]", redact(url)));
        let mut client = Self::connect(url, &label)?;
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
             INSERT INTO mcast_meta (key, value) VALUES ('schema', 1) ON CONFLICT DO NOTHING;",
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
            url: url.to_string(),
            label,
        })
    }

    fn connect(url: &str, label: &Path) -> Result<Client, TicketDbError> {
        Client::connect(url, NoTls).map_err(|source| TicketDbError::Pg {
            path: label.to_path_buf(),
            what: "cannot connect (is PostgreSQL running, and is tickets.postgres_url right?)",
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
            *c = Self::connect(&self.url, &self.label)?;
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

    /// `MCAST_TEST_PG_URL`, or `None` after saying why (a failure under `CI=true`).
    fn pg_url() -> Option<String> {
        match std::env::var("MCAST_TEST_PG_URL") {
            Ok(u) => Some(u),
            Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!(
                    "CI=true: MCAST_TEST_PG_URL must name a PostgreSQL server (.ci/run starts one)"
                )
            }
            Err(_) => {
                eprintln!("SKIPPED: MCAST_TEST_PG_URL is not set (no PostgreSQL server)");
                None
            }
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
        let Some(url) = pg_url() else { return };
        let mut db = PgStore::open(&url).unwrap();
        let t = ticket(2);
        db.insert(&t, b"wrapped").unwrap();
        // 16 connections (as from 16 servers) race for 2 plays.
        let winners: Vec<u8> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16u8)
                .map(|i| {
                    let (url, t) = (&url, &t);
                    s.spawn(move || {
                        let mut db = PgStore::open(url).unwrap();
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
