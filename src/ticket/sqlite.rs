//! The ticket validation database in one SQLite file (`[tickets] db`, the default backend of
//! [`TicketStore`]), shared by `mcastd` serving and the `mcastd ticket` commands.
//!
//! Crash safety: WAL journal with `synchronous = FULL`, so a play that was granted is on disk
//! before its grant leaves the server, and a crash or `kill -9` leaves every used ticket used.
//! Several processes may use the file at once (`busy_timeout` waits for the writer).
//!
//! Part B is stored wrapped ([`mcast_keys::seal::DbKey`], key in the key store), never in the
//! clear: neither this file nor its `-wal`/`-shm` ever holds a key part.
//!
//! ```sql
//! tickets(ticket_id PK, title, archive_id, holder, plays, plays_left, expires_unix,
//!         issued_unix, revoked_unix, part_b)        -- part_b: wrapped
//! grants(ticket_id, receiver_pub, granted_unix)     -- one row per play granted
//! audit(id, at_unix, ticket_id, holder, title, receiver, outcome, plays_left, reason)
//!                                                   -- every play request (schema 2)
//! ```
//! A schema-1 file gains the `audit` table when opened (its rows stay as they are).
//!
//! A play is used by one conditional `UPDATE` (`plays_left > 0`, not revoked, not expired)
//! inside an immediate transaction that also records the receiver's ephemeral key, so that
//! any number of concurrent requests, from any number of processes, use exactly the plays
//! there are; a retry with the same ephemeral key finds its grant instead of using a second.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mcast_keys::ticket::{Ticket, TicketId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    revoke_outcome, to_i64, to_u64, why_refused, AuditEntry, Consumed, Refusal, Revoked,
    TicketDbError, TicketRow, TicketStatus, TicketStore,
};

/// 2: the `audit` table (a version-1 file is migrated on open).
const SCHEMA_VERSION: i64 = 2;

/// The SQLite backend (one server; the default).
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Open (creating if missing) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, TicketDbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TicketDbError::Invalid {
                path: path.to_path_buf(),
                why: format!("cannot create directory {}: {e}", dir.display()),
            })?;
        }
        let sql = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| TicketDbError::Sql { path, what, source }
        };
        let conn = Connection::open(path).map_err(sql("cannot open"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("busy_timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql("cannot switch to WAL (is it a SQLite database?)"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(TicketDbError::Invalid {
                path: path.to_path_buf(),
                why: format!("journal mode is {mode}, WAL is required"),
            });
        }
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA secure_delete = ON;
             CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tickets (
                 ticket_id BLOB PRIMARY KEY CHECK (length(ticket_id) = 16),
                 title TEXT NOT NULL,
                 archive_id BLOB NOT NULL CHECK (length(archive_id) = 16),
                 holder TEXT NOT NULL,
                 plays INTEGER NOT NULL CHECK (plays >= 1),
                 plays_left INTEGER NOT NULL CHECK (plays_left >= 0 AND plays_left <= plays),
                 expires_unix INTEGER NOT NULL,
                 issued_unix INTEGER NOT NULL,
                 revoked_unix INTEGER NOT NULL DEFAULT 0,
                 part_b BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS grants (
                 ticket_id BLOB NOT NULL REFERENCES tickets (ticket_id) ON DELETE CASCADE,
                 receiver_pub BLOB NOT NULL,
                 granted_unix INTEGER NOT NULL,
                 PRIMARY KEY (ticket_id, receiver_pub));
             CREATE TABLE IF NOT EXISTS audit (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at_unix INTEGER NOT NULL,
                 ticket_id TEXT NOT NULL,
                 holder TEXT NOT NULL,
                 title TEXT NOT NULL,
                 receiver TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 plays_left INTEGER,
                 reason TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS audit_title ON audit (title, id);
             INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 2);
             UPDATE meta SET value = 2 WHERE key = 'schema' AND value = 1;",
        )
        .map_err(sql("cannot create the schema"))?;
        let version: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .map_err(sql("cannot read the schema version"))?;
        if version != SCHEMA_VERSION {
            return Err(TicketDbError::Invalid {
                path: path.to_path_buf(),
                why: format!("schema version {version}; this build reads version {SCHEMA_VERSION}"),
            });
        }
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> TicketDbError + '_ {
        move |source| TicketDbError::Sql {
            path: self.path.clone(),
            what,
            source,
        }
    }

    const ROW_SQL: &'static str = "SELECT t.ticket_id, t.title, t.archive_id, t.holder, t.plays,
             t.plays_left, t.expires_unix, t.issued_unix, t.revoked_unix,
             (SELECT count(*) FROM grants g WHERE g.ticket_id = t.ticket_id)
         FROM tickets t";

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TicketRow> {
        let blob16 = |i: usize| -> rusqlite::Result<[u8; 16]> {
            let v: Vec<u8> = r.get(i)?;
            v.try_into().map_err(|v: Vec<u8>| {
                rusqlite::Error::FromSqlConversionFailure(
                    i,
                    rusqlite::types::Type::Blob,
                    format!("{} bytes where 16 expected", v.len()).into(),
                )
            })
        };
        Ok(TicketRow {
            ticket_id: blob16(0)?,
            title: r.get(1)?,
            archive_id: blob16(2)?,
            holder: r.get(3)?,
            plays: r.get(4)?,
            plays_left: r.get(5)?,
            expires_unix: to_u64(r.get(6)?),
            issued_unix: to_u64(r.get(7)?),
            revoked_unix: to_u64(r.get(8)?),
            grants: r.get(9)?,
        })
    }
}

impl TicketStore for SqliteStore {
    fn path(&self) -> &Path {
        &self.path
    }

    fn audit(&self, e: &AuditEntry) -> Result<(), TicketDbError> {
        self.conn
            .execute(
                "INSERT INTO audit (at_unix, ticket_id, holder, title, receiver, outcome,
                     plays_left, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    to_i64(e.at_unix),
                    e.ticket_id,
                    e.holder,
                    e.title,
                    e.receiver,
                    e.outcome,
                    e.plays_left,
                    e.reason
                ],
            )
            .map_err(self.sql("cannot record the play in the audit log"))?;
        Ok(())
    }

    fn audit_list(
        &self,
        title: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, TicketDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT at_unix, ticket_id, holder, title, receiver, outcome, plays_left, reason
                 FROM audit WHERE ?1 IS NULL OR title = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.sql("cannot read the audit log"))?;
        let rows = st
            .query_map(params![title, limit], |r| {
                Ok(AuditEntry {
                    at_unix: to_u64(r.get(0)?),
                    ticket_id: r.get(1)?,
                    holder: r.get(2)?,
                    title: r.get(3)?,
                    receiver: r.get(4)?,
                    outcome: r.get(5)?,
                    plays_left: r.get(6)?,
                    reason: r.get(7)?,
                })
            })
            .map_err(self.sql("cannot read the audit log"))?;
        let mut v = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("cannot read an audit row"))?;
        v.reverse();
        Ok(v)
    }

    /// Record a newly issued ticket with its (wrapped) part B.
    fn insert(&self, t: &Ticket, wrapped_part: &[u8]) -> Result<(), TicketDbError> {
        self.conn
            .execute(
                "INSERT INTO tickets (ticket_id, title, archive_id, holder, plays, plays_left,
                     expires_unix, issued_unix, part_b)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8)",
                params![
                    &t.ticket_id[..],
                    t.title,
                    &t.archive_id[..],
                    t.holder,
                    t.plays,
                    to_i64(t.expires_unix),
                    to_i64(t.issued_unix),
                    wrapped_part
                ],
            )
            .map_err(self.sql("cannot record the ticket"))?;
        Ok(())
    }

    /// Delete a ticket (an issue whose ticket file could not be written).
    fn remove(&self, ticket_id: &TicketId) -> Result<(), TicketDbError> {
        self.conn
            .execute(
                "DELETE FROM tickets WHERE ticket_id = ?1",
                params![&ticket_id[..]],
            )
            .map_err(self.sql("cannot delete the ticket"))?;
        Ok(())
    }

    /// Every ticket, oldest first.
    fn list(&self) -> Result<Vec<TicketRow>, TicketDbError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "{} ORDER BY t.issued_unix, t.ticket_id",
                Self::ROW_SQL
            ))
            .map_err(self.sql("cannot list tickets"))?;
        let rows = st
            .query_map([], Self::row)
            .map_err(self.sql("cannot list tickets"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("cannot read a ticket row"))
    }

    fn get(&self, ticket_id: &TicketId) -> Result<Option<TicketRow>, TicketDbError> {
        self.conn
            .query_row(
                &format!("{} WHERE t.ticket_id = ?1", Self::ROW_SQL),
                params![&ticket_id[..]],
                Self::row,
            )
            .optional()
            .map_err(self.sql("cannot read the ticket"))
    }

    /// The wrapped part B of a ticket (`None` if there is no such ticket).
    fn wrapped_part(&self, ticket_id: &TicketId) -> Result<Option<Vec<u8>>, TicketDbError> {
        self.conn
            .query_row(
                "SELECT part_b FROM tickets WHERE ticket_id = ?1",
                params![&ticket_id[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("cannot read the ticket"))
    }

    /// Revoke a ticket: it is refused from now on, including retries of earlier grants.
    fn revoke(&self, ticket_id: &TicketId, now_unix: u64) -> Result<Revoked, TicketDbError> {
        let n = self
            .conn
            .execute(
                "UPDATE tickets SET revoked_unix = ?2 WHERE ticket_id = ?1 AND revoked_unix = 0",
                params![&ticket_id[..], to_i64(now_unix.max(1))],
            )
            .map_err(self.sql("cannot revoke the ticket"))?;
        revoke_outcome(n == 1, self.get(ticket_id)?, &self.path, ticket_id)
    }

    /// Use one play of `ticket_id` for the receiver key `receiver_pub`, atomically.
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
    ) -> Result<Result<Consumed, Refusal>, TicketDbError> {
        let path = self.path.clone();
        let sql = |what: &'static str| {
            let path = path.clone();
            move |source| TicketDbError::Sql { path, what, source }
        };
        let now = to_i64(now_unix);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("cannot start a transaction"))?;

        // A retry of a play already granted to this receiver key?
        let earlier: Option<i64> = tx
            .query_row(
                "SELECT g.granted_unix FROM grants g JOIN tickets t USING (ticket_id)
                 WHERE g.ticket_id = ?1 AND g.receiver_pub = ?2 AND t.archive_id = ?3
                   AND t.revoked_unix = 0",
                params![&ticket_id[..], &receiver_pub[..], &archive_id[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("cannot look up earlier grants"))?;
        if let Some(at) = earlier {
            if now.saturating_sub(at) <= to_i64(retry_secs) {
                let (wrapped_part, plays_left): (Vec<u8>, u32) = tx
                    .query_row(
                        "SELECT part_b, plays_left FROM tickets WHERE ticket_id = ?1",
                        params![&ticket_id[..]],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(sql("cannot read the ticket"))?;
                tx.commit().map_err(sql("cannot commit"))?;
                return Ok(Ok(Consumed {
                    wrapped_part,
                    plays_left,
                    repeated: true,
                }));
            }
        }

        // The one conditional update that uses a play.
        let used: Option<(Vec<u8>, u32)> = tx
            .query_row(
                "UPDATE tickets SET plays_left = plays_left - 1
                 WHERE ticket_id = ?1 AND archive_id = ?2 AND plays_left > 0
                   AND revoked_unix = 0 AND (expires_unix = 0 OR expires_unix > ?3)
                 RETURNING part_b, plays_left",
                params![&ticket_id[..], &archive_id[..], now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("cannot use a play"))?;
        let Some((wrapped_part, plays_left)) = used else {
            let row = tx
                .query_row(
                    "SELECT revoked_unix, expires_unix, plays, plays_left, archive_id
                     FROM tickets WHERE ticket_id = ?1",
                    params![&ticket_id[..]],
                    |r| {
                        Ok((
                            TicketStatus {
                                revoked: r.get::<_, i64>(0)? != 0,
                                expires_unix: to_u64(r.get(1)?),
                                plays: r.get(2)?,
                                plays_left: r.get(3)?,
                            },
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql("cannot read the ticket"))?;
            drop(tx); // rolls back: nothing changed
            return Ok(Err(match row {
                None => Refusal::Unknown,
                Some((_, aid)) if aid != archive_id[..] => Refusal::ArchiveMismatch,
                Some((st, _)) => why_refused(&st, now_unix),
            }));
        };
        tx.execute(
            "INSERT OR REPLACE INTO grants (ticket_id, receiver_pub, granted_unix)
             VALUES (?1, ?2, ?3)",
            params![&ticket_id[..], &receiver_pub[..], now],
        )
        .map_err(sql("cannot record the grant"))?;
        tx.commit().map_err(sql("cannot commit the play"))?;
        Ok(Ok(Consumed {
            wrapped_part,
            plays_left,
            repeated: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcast_keys::ticket::TicketSpec;
    use mcast_keys::{Identity, MasterKey};

    fn ticket(plays: u32, expires_unix: u64) -> Ticket {
        let spec = TicketSpec {
            title: "film".into(),
            archive_id: [4; 16],
            holder: "bob".into(),
            plays,
            expires_unix,
            issued_unix: 1000,
        };
        Ticket::issue(&Identity::generate(), &MasterKey::generate(), &spec)
            .unwrap()
            .0
            .ticket
    }

    fn db() -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let db = SqliteStore::open(&d.path().join("sub/t.sqlite")).unwrap();
        (d, db)
    }

    #[test]
    fn plays_are_counted_and_retries_are_free() {
        let (_d, mut db) = db();
        let t = ticket(2, 0);
        db.insert(&t, b"wrapped").unwrap();
        let (k1, k2, k3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let c = db
            .consume(&t.ticket_id, &t.archive_id, &k1, 2000, 60)
            .unwrap();
        assert_eq!(
            c,
            Ok(Consumed {
                wrapped_part: b"wrapped".to_vec(),
                plays_left: 1,
                repeated: false
            })
        );
        // Retry with the same key: same grant, no play used.
        let c = db
            .consume(&t.ticket_id, &t.archive_id, &k1, 2010, 60)
            .unwrap()
            .unwrap();
        assert!(c.repeated && c.plays_left == 1);
        let c = db
            .consume(&t.ticket_id, &t.archive_id, &k2, 2020, 60)
            .unwrap()
            .unwrap();
        assert!(!c.repeated && c.plays_left == 0);
        assert_eq!(
            db.consume(&t.ticket_id, &t.archive_id, &k3, 2030, 60)
                .unwrap(),
            Err(Refusal::AlreadyUsed { plays: 2 })
        );
        // A retry after the window is a new play, and there is none left.
        assert_eq!(
            db.consume(&t.ticket_id, &t.archive_id, &k1, 2000 + 61, 60)
                .unwrap(),
            Err(Refusal::AlreadyUsed { plays: 2 })
        );
        let row = db.get(&t.ticket_id).unwrap().unwrap();
        assert_eq!((row.plays, row.plays_left, row.grants), (2, 0, 2));
    }

    #[test]
    fn refusals_say_why() {
        let (_d, mut db) = db();
        let k = [1u8; 32];
        let unknown = ticket(1, 0);
        assert_eq!(
            db.consume(&unknown.ticket_id, &unknown.archive_id, &k, 5, 60)
                .unwrap(),
            Err(Refusal::Unknown)
        );
        let exp = ticket(1, 3000);
        db.insert(&exp, b"w").unwrap();
        assert_eq!(
            db.consume(&exp.ticket_id, &exp.archive_id, &k, 3000, 60)
                .unwrap(),
            Err(Refusal::Expired { at: 3000 })
        );
        assert_eq!(db.get(&exp.ticket_id).unwrap().unwrap().plays_left, 1);
        let rev = ticket(3, 0);
        db.insert(&rev, b"w").unwrap();
        db.consume(&rev.ticket_id, &rev.archive_id, &k, 5, 60)
            .unwrap()
            .unwrap();
        assert!(matches!(
            db.revoke(&rev.ticket_id, 6).unwrap(),
            Revoked::Now(_)
        ));
        assert!(matches!(
            db.revoke(&rev.ticket_id, 7).unwrap(),
            Revoked::Already(_)
        ));
        assert_eq!(
            db.consume(&rev.ticket_id, &rev.archive_id, &[9; 32], 8, 60)
                .unwrap(),
            Err(Refusal::Revoked)
        );
        // Even a retry of the grant made before the revocation.
        assert_eq!(
            db.consume(&rev.ticket_id, &rev.archive_id, &k, 8, 60)
                .unwrap(),
            Err(Refusal::Revoked)
        );
        assert_eq!(
            db.consume(&rev.ticket_id, &[0; 16], &[9; 32], 8, 60)
                .unwrap(),
            Err(Refusal::ArchiveMismatch)
        );
        assert!(db.revoke(&[0; 16], 9).is_err());
    }

    #[test]
    fn concurrent_connections_use_exactly_the_plays_there_are() {
        let (d, db) = db();
        let path = d.path().join("sub/t.sqlite");
        let t = ticket(1, 0);
        db.insert(&t, b"w").unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..20u8)
                .map(|i| {
                    let path = path.clone();
                    let t = &t;
                    s.spawn(move || {
                        let mut db = SqliteStore::open(&path).unwrap();
                        db.consume(&t.ticket_id, &t.archive_id, &[i; 32], 50, 60)
                            .unwrap()
                            .is_ok() as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        let row = db.get(&t.ticket_id).unwrap().unwrap();
        assert_eq!((row.plays_left, row.grants), (0, 1));
    }

    #[test]
    fn survives_reopen_and_finds_by_prefix() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.sqlite");
        let (used, fresh) = (ticket(1, 0), ticket(1, 0));
        {
            let mut db = SqliteStore::open(&path).unwrap();
            db.insert(&used, b"w").unwrap();
            db.insert(&fresh, b"w").unwrap();
            db.consume(&used.ticket_id, &used.archive_id, &[1; 32], 5, 60)
                .unwrap()
                .unwrap();
        }
        let mut db = SqliteStore::open(&path).unwrap();
        assert_eq!(
            db.consume(&used.ticket_id, &used.archive_id, &[2; 32], 6, 60)
                .unwrap(),
            Err(Refusal::AlreadyUsed { plays: 1 })
        );
        db.consume(&fresh.ticket_id, &fresh.archive_id, &[2; 32], 6, 60)
            .unwrap()
            .unwrap();
        let id = hex::encode(fresh.ticket_id);
        assert_eq!(db.find(&id[..8]).unwrap().ticket_id, fresh.ticket_id);
        assert_eq!(
            db.find(&id.to_uppercase()).unwrap().ticket_id,
            fresh.ticket_id
        );
        assert!(db.find("abc").is_err());
        assert!(db.find("zzzzzzzz").is_err());
        assert_eq!(db.list().unwrap().len(), 2);
        db.remove(&fresh.ticket_id).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
    }

    #[test]
    fn not_a_database_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.sqlite");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let e = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("t.sqlite"), "{e}");
    }

    #[test]
    fn schema_1_is_migrated_and_the_audit_log_lists_plays() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("old.sqlite");
        {
            // A file as the schema-1 build left it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE tickets (ticket_id BLOB PRIMARY KEY, title TEXT NOT NULL,
                     archive_id BLOB NOT NULL, holder TEXT NOT NULL, plays INTEGER NOT NULL,
                     plays_left INTEGER NOT NULL, expires_unix INTEGER NOT NULL,
                     issued_unix INTEGER NOT NULL, revoked_unix INTEGER NOT NULL DEFAULT 0,
                     part_b BLOB NOT NULL);
                 CREATE TABLE grants (ticket_id BLOB NOT NULL, receiver_pub BLOB NOT NULL,
                     granted_unix INTEGER NOT NULL, PRIMARY KEY (ticket_id, receiver_pub));
                 INSERT INTO meta (key, value) VALUES ('schema', 1);",
            )
            .unwrap();
        }
        let db = SqliteStore::open(&path).unwrap();
        let e = |title: &str, outcome: &str, at| AuditEntry {
            at_unix: at,
            ticket_id: "ab".repeat(16),
            holder: "box-17".into(),
            title: title.into(),
            receiver: "127.0.0.1:5000".into(),
            outcome: outcome.into(),
            plays_left: (outcome == "granted").then_some(0),
            reason: String::new(),
        };
        db.audit(&e("film", "granted", 1)).unwrap();
        db.audit(&e("other", "refused", 2)).unwrap();
        db.audit(&e("film", "refused", 3)).unwrap();
        let all = db.audit_list(None, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], e("film", "granted", 1));
        let film = db.audit_list(Some("film"), 10).unwrap();
        assert_eq!(film.iter().map(|e| e.at_unix).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(db.audit_list(None, 1).unwrap()[0].at_unix, 3);
        drop(db);
        // Opened again: already version 2.
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(v, 2);
        assert_eq!(
            SqliteStore::open(&path)
                .unwrap()
                .audit_list(None, 10)
                .unwrap()
                .len(),
            3
        );
    }
}
