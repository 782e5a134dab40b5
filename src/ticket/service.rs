//! The server's ticket desk, and the one place that knows both database backends.
//!
//! [`open_store`] opens the validation database `[tickets]` names (SQLite or a shared
//! PostgreSQL) as a [`TicketStore`]. [`TicketService`] is the thin part with the database and
//! the key store: the server driver hands it every `PlayRequest` datagram together with the
//! time, and sends back what it returns.
//!
//! A granted play: check → unwrap part B with the database key → derive part A from the
//! title's master key and B, and check the request's proof that its sender holds A (the
//! signed ticket alone is not enough) → seal B to the receiver's ephemeral key (HPKE) → use
//! one play in the database (atomic, see [`TicketStore::consume`]) → `PlayGrant`, signed by
//! the server identity. Parts A and B exist in the clear only in memory, for the length of
//! one request.

use std::net::SocketAddr;
use std::path::Path;

use mcast_keys::seal::{seal_part, DbKey};
use mcast_keys::ticket::{
    check_possession, commit_part, grant_signed_bytes, part_a_from, TicketId,
};
use mcast_keys::{Identity, KeyStore, PublicIdentity};

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{check, AuditEntry, Refusal, TicketDbError, TicketStore};
use crate::config::{Database, TicketsConfig};
use crate::wire::control::{Control, Envelope, ErrorCode};

/// Open the validation database `[tickets]` names: the SQLite file `db`, or the PostgreSQL
/// server at `postgres_url` (over verified TLS unless `postgres_tls = "disable"`).
pub fn open_store(cfg: &TicketsConfig) -> Result<Box<dyn TicketStore>, TicketDbError> {
    Ok(match cfg.database {
        Database::Sqlite => Box::new(SqliteStore::open(&cfg.db)?),
        Database::Postgres => Box::new(PgStore::open(cfg)?),
    })
}

/// The server's ticket desk: validates `PlayRequest`s and answers them.
pub struct TicketService {
    db: Box<dyn TicketStore>,
    db_key: DbKey,
    /// Title master keys (part A = master XOR B) and the identity that signs grants.
    keys: KeyStore,
    identity: Identity,
    trusted: PublicIdentity,
    /// An edge's origin servers: tickets they signed are refused with "play at the origin"
    /// (their titles' keys and tickets stay there).
    origins: Vec<PublicIdentity>,
    retry_secs: u64,
    refusals: RefusalLog,
    /// Audit rows for requests that use no play (refusals of genuine tickets, repeated
    /// grants, errors): at most [`AUDIT_PER_MINUTE`], so retries cannot grow the database
    /// without bound. Grants that use a play are always recorded.
    audit_budget: (u64, u32),
}

/// Audit rows a minute for requests that use no play (see `TicketService::audit_budget`).
pub const AUDIT_PER_MINUTE: u32 = 600;

/// Refusals are logged at most [`RefusalLog::PER_MINUTE`] a minute, then summed up: each one
/// is a request from a proven address, but a client retrying a used-up ticket, or a
/// flood, must not fill the log (24k lines in 3 s before this).
#[derive(Default)]
struct RefusalLog {
    minute: u64,
    logged: u32,
    quiet: u64,
}

impl RefusalLog {
    const PER_MINUTE: u32 = 20;

    /// Whether to log this refusal (`now_unix`: seconds); says how many went unlogged.
    fn admit(&mut self, now_unix: u64) -> bool {
        let minute = now_unix / 60;
        if minute != self.minute {
            if self.quiet > 0 {
                tracing::info!(
                    refused = self.quiet,
                    "further play refusals in the last minute were not logged one by one"
                );
            }
            *self = RefusalLog {
                minute,
                ..RefusalLog::default()
            };
        }
        if self.logged < Self::PER_MINUTE {
            self.logged += 1;
            true
        } else {
            self.quiet += 1;
            false
        }
    }
}

impl TicketService {
    /// Whether another audit row for a request that used no play fits this minute.
    fn audit_admit(&mut self, now_unix: u64) -> bool {
        let minute = now_unix / 60;
        if self.audit_budget.0 != minute {
            self.audit_budget = (minute, 0);
        }
        self.audit_budget.1 = self.audit_budget.1.saturating_add(1);
        if self.audit_budget.1 == AUDIT_PER_MINUTE + 1 {
            tracing::warn!(
                limit = AUDIT_PER_MINUTE,
                "play requests that use no play beyond this a minute are not recorded in the audit log"
            );
        }
        self.audit_budget.1 <= AUDIT_PER_MINUTE
    }

    /// Open the ticket database at `db_path`, with the database key from `keys`.
    pub fn open(
        db_path: &Path,
        keys: &KeyStore,
        trusted: PublicIdentity,
        retry_secs: u64,
    ) -> anyhow::Result<TicketService> {
        let db = Box::new(SqliteStore::open(db_path)?);
        let db_key = keys.tickets_key()?;
        Ok(TicketService {
            db,
            db_key,
            identity: keys.identity()?,
            keys: keys.clone(),
            trusted,
            origins: Vec::new(),
            retry_secs,
            refusals: RefusalLog::default(),
            audit_budget: (0, 0),
        })
    }

    /// An edge's origin keys (`[server] origin_keys`): plays of their titles are refused
    /// with [`Refusal::AtOrigin`].
    pub fn set_origins(&mut self, origins: Vec<PublicIdentity>) {
        self.origins = origins;
    }

    /// Open the validation database `[tickets]` names (SQLite or a shared PostgreSQL).
    pub fn open_config(
        cfg: &TicketsConfig,
        keys: &KeyStore,
        trusted: PublicIdentity,
    ) -> anyhow::Result<TicketService> {
        let db = open_store(cfg)?;
        let db_key = keys.tickets_key()?;
        Ok(TicketService {
            db,
            db_key,
            identity: keys.identity()?,
            keys: keys.clone(),
            trusted,
            origins: Vec::new(),
            retry_secs: cfg.retry_secs,
            refusals: RefusalLog::default(),
            audit_budget: (0, 0),
        })
    }

    /// Answer a `PlayRequest` datagram; `None` for any other datagram, and for one that does
    /// not decode: those belong to the channel manager, which counts malformed datagrams and
    /// never answers them.
    pub fn handle_datagram(
        &mut self,
        buf: &[u8],
        from: SocketAddr,
        now_unix: u64,
    ) -> Option<Vec<u8>> {
        if !crate::wire::control::is_play_request(buf) {
            return None;
        }
        let env = Envelope::decode(buf).ok()?;
        let Control::PlayRequest {
            title,
            ticket,
            receiver_pub,
            proof,
        } = &env.msg
        else {
            return None;
        };
        // The nonce the proof is bound to: the address token this request came with (the
        // channel manager checked it before handing the request on).
        let nonce = env.token.unwrap_or_default();
        let request = PlayRequest {
            title,
            ticket,
            receiver_pub,
            proof,
            nonce: &nonce,
        };
        // The presented ticket as it claims to be (for the audit log: who and which ticket;
        // the outcome says whether it was genuine).
        let claimed = mcast_keys::ticket::Ticket::decode(ticket).ok();
        let mut entry = AuditEntry {
            at_unix: now_unix,
            ticket_id: claimed
                .as_ref()
                .map(|t| hex::encode(t.ticket_id))
                .unwrap_or_default(),
            holder: claimed
                .as_ref()
                .map(|t| t.holder.clone())
                .unwrap_or_default(),
            title: title.clone(),
            receiver: from.to_string(),
            outcome: String::new(),
            plays_left: None,
            reason: String::new(),
        };
        let (reply, record) = match self.play_detailed(&request, now_unix) {
            Ok(g) => {
                entry.outcome = if g.repeated { "repeat" } else { "granted" }.into();
                entry.plays_left = Some(g.plays_left);
                tracing::info!(at_unix = now_unix, ticket = %entry.ticket_id, holder = %entry.holder,
                    title = %entry.title, receiver = %from, outcome = %entry.outcome,
                    plays_left = g.plays_left, "play granted");
                let reply = Control::PlayGrant {
                    ticket_id: g.ticket_id,
                    sealed_part: g.sealed,
                    signature: g.signature,
                };
                (reply, !g.repeated || self.audit_admit(now_unix))
            }
            Err(PlayError::Refused(r)) => {
                entry.outcome = "refused".into();
                entry.reason = r.to_string();
                // Tickets we signed are recorded up to the audit budget; forged or undecodable
                // ones (anyone can send those) only as often as they are logged, so a flood
                // cannot fill the database.
                let ours = !matches!(
                    r,
                    Refusal::Malformed(_)
                        | Refusal::BadSignature
                        | Refusal::OtherServer { .. }
                        | Refusal::AtOrigin { .. }
                );
                let logged = self.refusals.admit(now_unix);
                if logged {
                    tracing::info!(at_unix = now_unix, ticket = %entry.ticket_id, holder = %entry.holder,
                        title = %entry.title, receiver = %from, outcome = "refused", reason = %r,
                        "play ticket refused");
                }
                let reply = Control::Error {
                    code: ErrorCode::TicketRefused,
                    message: r.to_string(),
                };
                (
                    reply,
                    if ours {
                        self.audit_admit(now_unix)
                    } else {
                        logged
                    },
                )
            }
            Err(PlayError::Internal(e)) => {
                tracing::error!(%from, title, error = %format!("{e:#}"), "play request failed");
                entry.outcome = "error".into();
                entry.reason = format!("{e:#}");
                let reply = Control::Error {
                    code: ErrorCode::Busy,
                    message: "the server's ticket database is unavailable; try again later".into(),
                };
                (reply, self.audit_admit(now_unix))
            }
        };
        if record {
            if let Err(e) = self.db.audit(&entry) {
                tracing::error!(error = %e, ticket = %entry.ticket_id, "play not recorded in the audit log");
            }
        }
        Some(Envelope::new(env.receiver_id, env.req_id, reply).encode())
    }

    /// Validate a ticket and the proof that the request holds its part A, use one play, and
    /// seal part B to `receiver_pub`; the grant's signature.
    ///
    /// The grant is sealed before the play is used, so a failure to unwrap or seal (a broken
    /// database key, an unusable receiver key) never costs the holder a play; neither does a
    /// request without a valid proof.
    pub fn play(
        &mut self,
        req: &PlayRequest<'_>,
        now_unix: u64,
    ) -> Result<(TicketId, Vec<u8>, [u8; 64]), PlayError> {
        self.play_detailed(req, now_unix)
            .map(|g| (g.ticket_id, g.sealed, g.signature))
    }

    /// [`TicketService::play`], saying also what the play left (for the audit log).
    pub fn play_detailed(
        &mut self,
        req: &PlayRequest<'_>,
        now_unix: u64,
    ) -> Result<Grant, PlayError> {
        let (title, receiver_pub) = (req.title, req.receiver_pub);
        let claims = match check(title, req.ticket, now_unix, &self.trusted) {
            Err(Refusal::OtherServer { found, .. })
                if self.origins.iter().any(|o| o.fingerprint() == found) =>
            {
                return Err(Refusal::AtOrigin { origin: found }.into())
            }
            r => r?,
        };
        let wrapped = self
            .db
            .wrapped_part(&claims.ticket_id)?
            .ok_or(Refusal::Unknown)?;
        let part_b = self
            .db_key
            .unwrap(&claims.ticket_id, &claims.archive_id, &wrapped)
            .map_err(|e| PlayError::Internal(e.into()))?;
        let master = self
            .keys
            .title_key(&claims.title, &claims.archive_id)
            .map_err(|e| PlayError::Internal(e.into()))?;
        let part_a = part_a_from(&master, &part_b);
        drop(master);
        if commit_part(&part_a) != claims.part_a_commit {
            return Err(PlayError::Internal(anyhow::anyhow!(
                "ticket {}: the key store's master key and the database's part B do not make the ticket's part A",
                hex::encode(claims.ticket_id)
            )));
        }
        if !check_possession(
            &part_a,
            &claims.ticket_id,
            receiver_pub,
            title,
            req.nonce,
            req.proof,
        ) {
            return Err(Refusal::NoPossession.into());
        }
        drop(part_a);
        let sealed = seal_part(receiver_pub, &claims.ticket_id, &part_b).map_err(|_| {
            PlayError::Refused(Refusal::Malformed(
                "the receiver key is not a usable X25519 key".into(),
            ))
        })?;
        drop(part_b);
        let used = self.db.consume(
            &claims.ticket_id,
            &claims.archive_id,
            receiver_pub,
            now_unix,
            self.retry_secs,
        )??;
        let signature = self.identity.sign(&grant_signed_bytes(
            &claims.ticket_id,
            receiver_pub,
            &sealed,
        ));
        Ok(Grant {
            ticket_id: claims.ticket_id,
            sealed,
            signature,
            plays_left: used.plays_left,
            repeated: used.repeated,
        })
    }

    /// The audit log, newest `limit` entries (of `title`), oldest first.
    pub fn audit_list(
        &self,
        title: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, TicketDbError> {
        self.db.audit_list(title, limit)
    }

    pub fn db_path(&self) -> &Path {
        self.db.path()
    }
}

/// A granted play: the sealed part B and its signature, and what the play left.
pub struct Grant {
    pub ticket_id: TicketId,
    pub sealed: Vec<u8>,
    pub signature: [u8; 64],
    pub plays_left: u32,
    /// A retry of an earlier grant to the same receiver key: no play used.
    pub repeated: bool,
}

/// A play request's fields, and the nonce its proof is bound to.
pub struct PlayRequest<'a> {
    pub title: &'a str,
    pub ticket: &'a [u8],
    pub receiver_pub: &'a [u8; 32],
    pub proof: &'a [u8; 32],
    pub nonce: &'a [u8],
}

/// Why [`TicketService::play`] gave no grant.
#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

impl From<TicketDbError> for PlayError {
    fn from(e: TicketDbError) -> Self {
        PlayError::Internal(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcast_keys::seal::ReceiverKey;
    use mcast_keys::ticket::{combine, possession_proof, Ticket, TicketFile, TicketSpec};
    use mcast_keys::MasterKey;

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

    /// An edge asked to play a title of its origin (a ticket the origin signed): a clean
    /// refusal that says to play at the origin, answered on the wire and audited.
    #[test]
    fn an_edge_refuses_plays_of_origin_titles() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(d.path().join("keys")).unwrap();
        let edge = ks.create_identity(false).unwrap();
        let origin = Identity::from_secret(&[0x0a; 32]);
        let (tf, _) = Ticket::issue(&origin, &MasterKey::generate(), &spec(0)).unwrap();
        let mut svc =
            TicketService::open(&d.path().join("t.sqlite"), &ks, edge.public(), 60).unwrap();
        svc.set_origins(vec![origin.public()]);
        let r = ReceiverKey::generate();
        let dg = Envelope::new(
            7,
            9,
            Control::PlayRequest {
                title: "film".into(),
                ticket: tf.ticket().encode().to_vec(),
                receiver_pub: r.public(),
                proof: [0; 32],
            },
        )
        .with_token(Some([5; 16]))
        .encode();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let reply = Envelope::decode(&svc.handle_datagram(&dg, from, 1_000).unwrap()).unwrap();
        match reply.msg {
            Control::Error {
                code: ErrorCode::TicketRefused,
                message,
            } => assert!(
                message.contains("play at the origin")
                    && message.contains(&origin.public().fingerprint()),
                "{message}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let audit = svc.audit_list(None, 10).unwrap();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert!(audit[0].reason.contains("play at the origin"), "{audit:?}");
        // Not an origin: the plain refusal, as before.
        svc.set_origins(Vec::new());
        let reply = Envelope::decode(&svc.handle_datagram(&dg, from, 1_000).unwrap()).unwrap();
        assert!(
            matches!(&reply.msg, Control::Error { message, .. } if message.contains("issued by another server")),
            "{reply:?}"
        );
    }

    #[test]
    fn service_grants_once_and_the_parts_combine() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(d.path().join("keys")).unwrap();
        let id = ks.create_identity(false).unwrap();
        let m = MasterKey::generate();
        let (tf, b) = Ticket::issue(&id, &m, &spec(0)).unwrap();
        let t = tf.ticket();
        ks.put_title_key("film", &t.archive_id, &m).unwrap();
        let mut svc =
            TicketService::open(&d.path().join("t.sqlite"), &ks, id.public(), 60).unwrap();
        svc.db
            .insert(
                t,
                &ks.tickets_key()
                    .unwrap()
                    .wrap(&t.ticket_id, &t.archive_id, &b),
            )
            .unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();

        let r = ReceiverKey::generate();
        // As `mcast-recv play` sends it: proof of part A, bound to the request's token.
        let token = [5u8; 16];
        let proof = |tf: &TicketFile, r: &ReceiverKey, title: &str| {
            possession_proof(
                tf.part_a(),
                &tf.ticket().ticket_id,
                &r.public(),
                title,
                &token,
            )
        };
        let req = |r: &ReceiverKey, title: &str| {
            Envelope::new(
                7,
                9,
                Control::PlayRequest {
                    title: title.into(),
                    ticket: t.encode().to_vec(),
                    receiver_pub: r.public(),
                    proof: proof(&tf, r, title),
                },
            )
            .with_token(Some(token))
            .encode()
        };
        let reply =
            Envelope::decode(&svc.handle_datagram(&req(&r, "film"), from, 200).unwrap()).unwrap();
        assert_eq!((reply.receiver_id, reply.req_id), (7, 9));
        let Control::PlayGrant {
            ticket_id,
            sealed_part,
            signature,
        } = reply.msg
        else {
            panic!("{reply:?}")
        };
        assert_eq!(ticket_id, t.ticket_id);
        id.public()
            .verify(
                &grant_signed_bytes(&ticket_id, &r.public(), &sealed_part),
                &signature,
            )
            .unwrap();
        let part_b = r.open_part(&ticket_id, &sealed_part).unwrap();
        assert_eq!(combine(tf.part_a(), &part_b).key(), &m);

        // The same request again (a lost reply): granted again.
        let again =
            Envelope::decode(&svc.handle_datagram(&req(&r, "film"), from, 201).unwrap()).unwrap();
        assert!(matches!(again.msg, Control::PlayGrant { .. }), "{again:?}");
        // The signed ticket without part A (copied or overheard), or a proof for another
        // token (a replay from elsewhere): refused, no play used.
        let r2 = ReceiverKey::generate();
        let copied = Envelope::new(
            7,
            10,
            Control::PlayRequest {
                title: "film".into(),
                ticket: t.encode().to_vec(),
                receiver_pub: r2.public(),
                proof: [1; 32],
            },
        )
        .with_token(Some(token))
        .encode();
        let elsewhere = Envelope::new(
            7,
            11,
            Control::PlayRequest {
                title: "film".into(),
                ticket: t.encode().to_vec(),
                receiver_pub: r2.public(),
                proof: proof(&tf, &r2, "film"),
            },
        )
        .with_token(Some([6; 16]))
        .encode();
        for bad in [copied, elsewhere] {
            let e = Envelope::decode(&svc.handle_datagram(&bad, from, 201).unwrap()).unwrap();
            assert!(
                matches!(&e.msg, Control::Error { code: ErrorCode::TicketRefused, message } if message.contains("key part")),
                "{e:?}"
            );
        }
        // Another receiver key: the single play is gone.
        let other = Envelope::decode(
            &svc.handle_datagram(&req(&ReceiverKey::generate(), "film"), from, 202)
                .unwrap(),
        )
        .unwrap();
        assert!(
            matches!(&other.msg, Control::Error { code: ErrorCode::TicketRefused, message } if message.contains("already used")),
            "{other:?}"
        );
        let wrong =
            Envelope::decode(&svc.handle_datagram(&req(&r, "other"), from, 203).unwrap()).unwrap();
        assert!(
            matches!(&wrong.msg, Control::Error { code: ErrorCode::TicketRefused, message } if message.contains("not for this title")),
            "{wrong:?}"
        );
        // Not a play request: not ours.
        let join = Envelope::new(
            1,
            1,
            Control::Join {
                title: "film".into(),
            },
        )
        .encode();
        assert!(svc.handle_datagram(&join, from, 204).is_none());
        // A truncated play request is left to the channel manager (counted, never answered).
        let bad = req(&r, "film");
        assert!(svc
            .handle_datagram(&bad[..bad.len() - 3], from, 205)
            .is_none());
        // An unusable receiver key, or a part that does not unwrap, costs no play.
        let (tf2, b2) = Ticket::issue(&id, &m, &spec(0)).unwrap();
        let t2 = tf2.ticket();
        svc.db
            .insert(
                t2,
                &ks.tickets_key()
                    .unwrap()
                    .wrap(&t2.ticket_id, &t2.archive_id, &b2),
            )
            .unwrap();
        let t2_bytes = t2.encode();
        let play2 = |svc: &mut TicketService, receiver_pub: &[u8; 32], now: u64| {
            let proof = possession_proof(
                tf2.part_a(),
                &tf2.ticket().ticket_id,
                receiver_pub,
                "film",
                b"n",
            );
            let req = PlayRequest {
                title: "film",
                ticket: &t2_bytes,
                receiver_pub,
                proof: &proof,
                nonce: b"n",
            };
            svc.play(&req, now)
        };
        let e = play2(&mut svc, &[0u8; 32], 206).unwrap_err();
        assert!(
            matches!(e, PlayError::Refused(Refusal::Malformed(_))),
            "{e:?}"
        );
        let mut broken =
            TicketService::open(&d.path().join("t.sqlite"), &ks, id.public(), 60).unwrap();
        broken.db_key = DbKey::from_bytes(zeroize::Zeroizing::new([0u8; 32]));
        let e = play2(&mut broken, &r.public(), 207).unwrap_err();
        assert!(matches!(e, PlayError::Internal(_)), "{e:?}");
        assert_eq!(svc.db.get(&t2.ticket_id).unwrap().unwrap().plays_left, 1);
        play2(&mut svc, &r.public(), 208).unwrap();
        // Every request that went through the datagram path is in the audit log, with the
        // holder and the receiver's address.
        let log = svc.audit_list(None, 100).unwrap();
        let outcomes: Vec<&str> = log.iter().map(|e| e.outcome.as_str()).collect();
        assert_eq!(
            outcomes,
            ["granted", "repeat", "refused", "refused", "refused", "refused"]
        );
        assert!(log.iter().all(|e| e.holder == "carol"
            && e.receiver == "127.0.0.1:9"
            && e.ticket_id == hex::encode(t.ticket_id)));
        assert_eq!((log[0].plays_left, log[0].at_unix), (Some(0), 200));
        assert!(log[4].reason.contains("already used"), "{:?}", log[4]);
        assert_eq!(svc.audit_list(Some("other"), 100).unwrap().len(), 1);
    }

    #[test]
    fn refusals_are_logged_at_most_twenty_a_minute() {
        let mut l = RefusalLog::default();
        let logged = (0..1000).filter(|_| l.admit(60)).count();
        assert_eq!(logged, RefusalLog::PER_MINUTE as usize);
        assert_eq!(l.quiet, 1000 - 20);
        assert!(l.admit(125), "a new minute logs again");
        assert_eq!(l.quiet, 0);
    }
}
