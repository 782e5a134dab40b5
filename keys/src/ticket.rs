//! Play tickets (FIG. 10): the title's master key split in two, one part in a signed ticket
//! the user holds, the other in the server's validation database.
//!
//! **Split.** Per ticket, part A is 32 fresh random bytes and part B = master XOR A. Either
//! part alone is a uniformly random string and says nothing about the key (a one-time pad);
//! together they give it back: master = A XOR B ([`combine`], into locked memory). A fresh
//! split per ticket means parts of different tickets never combine with each other.
//!
//! **Ticket encoding** (version 1, little-endian, strings u16-length-prefixed UTF-8):
//!
//! ```text
//! "MCTK" version:u8 ticket_id:[16] archive_id:[16] title:str16 holder:str16 plays:u32
//! expires_unix:u64 (0 = never) issued_unix:u64 part_a_commit:[32] server_key:[32]
//! signature:[64]
//! ```
//! The Ed25519 signature of the server identity covers `"mcast play ticket v1" || every byte
//! before it`, so no field can be changed, and no other signed object (an archive head) can be
//! passed off as a ticket. [`Ticket::decode`] takes untrusted bytes and never panics.
//!
//! The signed ticket holds only a commitment to part A (`part_a_commit`, BLAKE3 in key
//! derivation mode), not part A itself: the signed ticket is what the receiver presents to the
//! server, so part A never leaves the holder's machine, and someone who records the control
//! traffic learns neither part (part B travels sealed to the receiver's one-play key).
//!
//! **Ticket file** ([`TicketFile`]): the signed ticket followed by part A (32 bytes), in text
//! armor so it survives mail and copy-paste: a few `#` comment lines for people (not
//! trusted), then the base64 of those bytes between `-----BEGIN MCAST TICKET-----` and
//! `-----END MCAST TICKET-----`.

use base64::Engine;
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::identity::{PublicIdentity, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::{Identity, LockedKey, MasterKey};

pub const TICKET_MAGIC: &[u8; 4] = b"MCTK";
pub const TICKET_VERSION: u8 = 1;
const SIGN_CONTEXT: &[u8] = b"mcast play ticket v1";
const COMMIT_CONTEXT: &str = "mcast play ticket part A commitment v1";
/// Length of each key part.
pub const PART_LEN: usize = 32;
pub const TICKET_ID_LEN: usize = 16;
pub const MAX_TITLE_LEN: usize = 128;
pub const MAX_HOLDER_LEN: usize = 128;
/// Longest encoded (signed) ticket, title and holder at their maximum.
pub const MAX_TICKET_LEN: usize = 4
    + 1
    + TICKET_ID_LEN
    + 16
    + 2
    + MAX_TITLE_LEN
    + 2
    + MAX_HOLDER_LEN
    + 4
    + 8
    + 8
    + PART_LEN
    + PUBLIC_KEY_LEN
    + SIGNATURE_LEN;
/// Longest ticket file payload: the signed ticket and part A.
pub const MAX_TICKET_FILE_PAYLOAD: usize = MAX_TICKET_LEN + PART_LEN;
/// Largest ticket file accepted (armor, comments and line breaks included).
pub const MAX_TICKET_FILE_LEN: usize = 16 * 1024;

pub const ARMOR_BEGIN: &str = "-----BEGIN MCAST TICKET-----";
pub const ARMOR_END: &str = "-----END MCAST TICKET-----";

pub type TicketId = [u8; TICKET_ID_LEN];

/// One of the two halves of a split key. Wiped on drop; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct KeyPart([u8; PART_LEN]);

impl KeyPart {
    pub fn random() -> KeyPart {
        let mut p = [0u8; PART_LEN];
        rand::rngs::OsRng.fill_bytes(&mut p);
        KeyPart(p)
    }

    pub fn from_bytes(bytes: [u8; PART_LEN]) -> KeyPart {
        KeyPart(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; PART_LEN] {
        &self.0
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; PART_LEN] {
        &mut self.0
    }
}

impl std::fmt::Debug for KeyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPart(..)")
    }
}

/// Split `master` for one ticket: `(A, B)` with A random and B = master XOR A.
pub fn split(master: &MasterKey) -> (KeyPart, KeyPart) {
    let a = KeyPart::random();
    let mut b = KeyPart([0u8; PART_LEN]);
    for ((o, m), x) in b.0.iter_mut().zip(master.as_bytes()).zip(&a.0) {
        *o = m ^ x;
    }
    (a, b)
}

/// Part A of a ticket from the title's master key and its part B (the server's side: it holds
/// both, and checks with A that a play request comes from a holder of the ticket file).
pub fn part_a_from(master: &MasterKey, b: &KeyPart) -> KeyPart {
    let mut a = KeyPart([0u8; PART_LEN]);
    for ((o, m), y) in a.0.iter_mut().zip(master.as_bytes()).zip(&b.0) {
        *o = m ^ y;
    }
    a
}

const PROOF_CONTEXT: &str = "mcast play request possession proof v1";

/// Proof that a play request comes from a holder of part A, not from someone who copied or
/// overheard the signed ticket: keyed BLAKE3 under a key derived from A, over the ticket id,
/// the one-play receiver key the grant is to be sealed to, the title, and a server nonce (the
/// address token the server sent the requester). A replay with another receiver key, or to
/// another address, needs A.
pub fn possession_proof(
    a: &KeyPart,
    ticket_id: &TicketId,
    receiver_pub: &[u8; 32],
    title: &str,
    nonce: &[u8],
) -> [u8; 32] {
    let key = Zeroizing::new(blake3::derive_key(PROOF_CONTEXT, a.as_bytes()));
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(ticket_id);
    h.update(receiver_pub);
    h.update(&(title.len() as u64).to_le_bytes());
    h.update(title.as_bytes());
    h.update(nonce);
    *h.finalize().as_bytes()
}

/// Whether `proof` is [`possession_proof`] for these inputs (compared in constant time).
pub fn check_possession(
    a: &KeyPart,
    ticket_id: &TicketId,
    receiver_pub: &[u8; 32],
    title: &str,
    nonce: &[u8],
    proof: &[u8; 32],
) -> bool {
    let want = blake3::Hash::from_bytes(possession_proof(a, ticket_id, receiver_pub, title, nonce));
    want == blake3::Hash::from_bytes(*proof)
}

const GRANT_CONTEXT: &[u8] = b"mcast play grant v1";

/// What the server's signature on a play grant covers: the ticket, the receiver key the part
/// is sealed to, and the sealed part (a man in the middle cannot swap either).
pub fn grant_signed_bytes(ticket_id: &TicketId, receiver_pub: &[u8; 32], sealed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(GRANT_CONTEXT.len() + 48 + sealed.len());
    m.extend_from_slice(GRANT_CONTEXT);
    m.extend_from_slice(ticket_id);
    m.extend_from_slice(receiver_pub);
    m.extend_from_slice(sealed);
    m
}

/// Put the key back together (A XOR B), straight into locked memory.
pub fn combine(a: &KeyPart, b: &KeyPart) -> LockedKey {
    LockedKey::fill(|out| {
        for ((o, x), y) in out.iter_mut().zip(&a.0).zip(&b.0) {
            *o = x ^ y;
        }
    })
}

/// Why a ticket (or ticket file) was refused. The messages are shown to users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("not an mcast play ticket (bad magic)")]
    Magic,
    #[error(
        "ticket format version {0} is not supported by this build (supports {TICKET_VERSION})"
    )]
    Version(u8),
    #[error("ticket is truncated: input ends inside field {0}")]
    Short(&'static str),
    #[error("ticket field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
    #[error("not a ticket file: {0}")]
    Armor(String),
    #[error("ticket signature does not verify: the ticket was forged or modified")]
    Signature,
    #[error("ticket was issued by server key {found}, not by the trusted server {trusted}")]
    ForeignServer { found: String, trusted: String },
    #[error(
        "the ticket's key part does not match its signed commitment: the ticket file was modified"
    )]
    PartMismatch,
    #[error("ticket spec: {0}")]
    Spec(String),
}

fn bad(field: &'static str, why: impl Into<String>) -> TicketError {
    TicketError::Field {
        field,
        why: why.into(),
    }
}

/// Holders are free text for operators (a user or device id), but one printable line.
pub fn validate_holder(holder: &str) -> Result<(), String> {
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
        return Err(format!("must be 1..={MAX_HOLDER_LEN} bytes"));
    }
    if holder.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// What a ticket grants, chosen by the operator at `mcastd ticket issue`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketSpec {
    pub title: String,
    pub archive_id: [u8; 16],
    pub holder: String,
    /// Plays allowed (at least 1).
    pub plays: u32,
    /// Unix time after which the ticket is refused; 0 = never.
    pub expires_unix: u64,
    pub issued_unix: u64,
}

/// Commitment to part A carried in the signed ticket.
pub fn commit_part(a: &KeyPart) -> [u8; 32] {
    blake3::derive_key(COMMIT_CONTEXT, a.as_bytes())
}

/// A decoded (signed) play ticket: what is presented to the server. Holds no key part. The
/// signature is checked by [`Ticket::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub ticket_id: TicketId,
    pub archive_id: [u8; 16],
    pub title: String,
    pub holder: String,
    pub plays: u32,
    pub expires_unix: u64,
    pub issued_unix: u64,
    pub part_a_commit: [u8; 32],
    pub server_key: PublicIdentity,
    pub signature: [u8; SIGNATURE_LEN],
}

/// What the holder keeps: the signed ticket and part A. Part A is wiped on drop and never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketFile {
    pub ticket: Ticket,
    part_a: KeyPart,
}

impl std::fmt::Debug for TicketFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketFile")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

/// Bounds-checked little-endian reader (decoding never panics).
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], TicketError> {
        if self.buf.len() < n {
            return Err(TicketError::Short(field));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TicketError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, TicketError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, TicketError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, max: usize, field: &'static str) -> Result<String, TicketError> {
        let n = u16::from_le_bytes(self.array(field)?) as usize;
        if n > max {
            return Err(bad(field, format!("longer than {max} bytes")));
        }
        String::from_utf8(self.take(n, field)?.to_vec()).map_err(|_| bad(field, "not UTF-8"))
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl Ticket {
    /// Issue a ticket for `spec`: split `master`, sign, and return the ticket file (holding
    /// A) and part B for the server's validation database.
    pub fn issue(
        identity: &Identity,
        master: &MasterKey,
        spec: &TicketSpec,
    ) -> Result<(TicketFile, KeyPart), TicketError> {
        crate::store::validate_title(&spec.title).map_err(|e| TicketError::Spec(e.to_string()))?;
        validate_holder(&spec.holder).map_err(|why| TicketError::Spec(format!("holder {why}")))?;
        if spec.plays == 0 {
            return Err(TicketError::Spec("plays must be at least 1".into()));
        }
        if spec.expires_unix != 0 && spec.expires_unix <= spec.issued_unix {
            return Err(TicketError::Spec(
                "expiry must be after the time of issue".into(),
            ));
        }
        let mut ticket_id = [0u8; TICKET_ID_LEN];
        rand::rngs::OsRng.fill_bytes(&mut ticket_id);
        let (a, b) = split(master);
        let mut t = Ticket {
            ticket_id,
            archive_id: spec.archive_id,
            title: spec.title.clone(),
            holder: spec.holder.clone(),
            plays: spec.plays,
            expires_unix: spec.expires_unix,
            issued_unix: spec.issued_unix,
            part_a_commit: commit_part(&a),
            server_key: identity.public(),
            signature: [0u8; SIGNATURE_LEN],
        };
        t.signature = identity.sign(&Self::signing_message(&t.signed_part()));
        Ok((
            TicketFile {
                ticket: t,
                part_a: a,
            },
            b,
        ))
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.ticket_id)
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_TICKET_LEN);
        b.extend_from_slice(TICKET_MAGIC);
        b.push(TICKET_VERSION);
        b.extend_from_slice(&self.ticket_id);
        b.extend_from_slice(&self.archive_id);
        put_str(&mut b, &self.title);
        put_str(&mut b, &self.holder);
        b.extend_from_slice(&self.plays.to_le_bytes());
        b.extend_from_slice(&self.expires_unix.to_le_bytes());
        b.extend_from_slice(&self.issued_unix.to_le_bytes());
        b.extend_from_slice(&self.part_a_commit);
        b.extend_from_slice(&self.server_key.0);
        b
    }

    fn signing_message(signed: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGN_CONTEXT.len() + signed.len());
        m.extend_from_slice(SIGN_CONTEXT);
        m.extend_from_slice(signed);
        m
    }

    /// The signed bytes: what a receiver presents (no key part in them).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed_part();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decode untrusted bytes. Checks structure only; call [`Ticket::verify`] before trusting
    /// any field.
    pub fn decode(buf: &[u8]) -> Result<Ticket, TicketError> {
        if buf.len() > MAX_TICKET_LEN {
            return Err(bad("length", format!("longer than {MAX_TICKET_LEN} bytes")));
        }
        let mut r = Reader { buf };
        if r.take(4, "magic")? != TICKET_MAGIC {
            return Err(TicketError::Magic);
        }
        let version = r.array::<1>("version")?[0];
        if version != TICKET_VERSION {
            return Err(TicketError::Version(version));
        }
        let ticket_id = r.array("ticket_id")?;
        let archive_id = r.array("archive_id")?;
        let title = r.string(MAX_TITLE_LEN, "title")?;
        crate::store::validate_title(&title).map_err(|e| bad("title", e.to_string()))?;
        let holder = r.string(MAX_HOLDER_LEN, "holder")?;
        validate_holder(&holder).map_err(|why| bad("holder", why))?;
        let plays = r.u32("plays")?;
        if plays == 0 {
            return Err(bad("plays", "must be at least 1"));
        }
        let expires_unix = r.u64("expires_unix")?;
        let issued_unix = r.u64("issued_unix")?;
        let part_a_commit = r.array("part_a_commit")?;
        let server_key = PublicIdentity(r.array("server_key")?);
        let signature = r.array("signature")?;
        if !r.buf.is_empty() {
            return Err(bad("length", format!("{} trailing bytes", r.buf.len())));
        }
        Ok(Ticket {
            ticket_id,
            archive_id,
            title,
            holder,
            plays,
            expires_unix,
            issued_unix,
            part_a_commit,
            server_key,
            signature,
        })
    }

    /// Check that the ticket was issued, unmodified, by `trusted`.
    pub fn verify(&self, trusted: &PublicIdentity) -> Result<(), TicketError> {
        if &self.server_key != trusted {
            return Err(TicketError::ForeignServer {
                found: self.server_key.fingerprint(),
                trusted: trusted.fingerprint(),
            });
        }
        trusted
            .verify(&Self::signing_message(&self.signed_part()), &self.signature)
            .map_err(|_| TicketError::Signature)
    }
}

impl TicketFile {
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// The key part the holder keeps.
    pub fn part_a(&self) -> &KeyPart {
        &self.part_a
    }

    /// The file payload: signed ticket, then part A (wiped on drop).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(self.ticket.encode());
        b.extend_from_slice(self.part_a.as_bytes());
        b
    }

    /// Decode a file payload (untrusted; never panics). Checks structure only.
    pub fn decode(buf: &[u8]) -> Result<TicketFile, TicketError> {
        if buf.len() > MAX_TICKET_FILE_PAYLOAD {
            return Err(bad(
                "length",
                format!("longer than {MAX_TICKET_FILE_PAYLOAD} bytes"),
            ));
        }
        let Some(split) = buf.len().checked_sub(PART_LEN) else {
            return Err(TicketError::Short("part_a"));
        };
        let ticket = Ticket::decode(&buf[..split])?;
        let mut part_a = KeyPart([0u8; PART_LEN]);
        part_a.0.copy_from_slice(&buf[split..]);
        Ok(TicketFile { ticket, part_a })
    }

    /// The ticket is from `trusted`, unmodified, and part A is the one it was issued with.
    pub fn verify(&self, trusted: &PublicIdentity) -> Result<(), TicketError> {
        self.ticket.verify(trusted)?;
        if commit_part(&self.part_a) != self.ticket.part_a_commit {
            return Err(TicketError::PartMismatch);
        }
        Ok(())
    }

    /// The ticket file: comment lines for people, then the armored encoding.
    pub fn to_armor(&self) -> Zeroizing<String> {
        let t = &self.ticket;
        let expires = if t.expires_unix == 0 {
            "never".to_string()
        } else {
            format!("{} (unix time)", t.expires_unix)
        };
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*self.encode()));
        let mut s = Zeroizing::new(String::with_capacity(b64.len() + 512));
        s.push_str(
            "# mcast play ticket. Keep it private: it is one half of the key to the title.\n",
        );
        s.push_str(&format!(
            "# title: {}  holder: {}  plays: {}  expires: {}\n# ticket id: {}  server: {}\n",
            t.title,
            t.holder,
            t.plays,
            expires,
            t.id_hex(),
            t.server_key.fingerprint()
        ));
        s.push_str(ARMOR_BEGIN);
        s.push('\n');
        for line in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            s.push('\n');
        }
        s.push_str(ARMOR_END);
        s.push('\n');
        s
    }

    /// The payload of a ticket file (armored, or the raw payload).
    pub fn dearmor(file: &[u8]) -> Result<Zeroizing<Vec<u8>>, TicketError> {
        if file.len() > MAX_TICKET_FILE_LEN {
            return Err(TicketError::Armor(format!(
                "larger than {MAX_TICKET_FILE_LEN} bytes"
            )));
        }
        if file.starts_with(TICKET_MAGIC) {
            return Ok(Zeroizing::new(file.to_vec()));
        }
        let text = std::str::from_utf8(file)
            .map_err(|_| TicketError::Armor("neither text armor nor a binary ticket".into()))?;
        let mut lines = text.lines().map(str::trim);
        if !lines.any(|l| l == ARMOR_BEGIN) {
            return Err(TicketError::Armor(format!("no {ARMOR_BEGIN} line")));
        }
        let mut b64 = Zeroizing::new(String::new());
        let mut ended = false;
        for l in lines {
            if l == ARMOR_END {
                ended = true;
                break;
            }
            b64.push_str(l);
        }
        if !ended {
            return Err(TicketError::Armor(format!("no {ARMOR_END} line")));
        }
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Zeroizing::new)
            .map_err(|e| TicketError::Armor(format!("bad base64: {e}")))
    }

    /// Decode a ticket file (does not check the signature: see [`TicketFile::verify`]).
    pub fn from_file_bytes(file: &[u8]) -> Result<TicketFile, TicketError> {
        Self::decode(&Self::dearmor(file)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> TicketSpec {
        TicketSpec {
            title: "film-1".into(),
            archive_id: [3; 16],
            holder: "alice@example".into(),
            plays: 1,
            expires_unix: 2_000_000_000,
            issued_unix: 1_700_000_000,
        }
    }

    #[test]
    fn split_combine_round_trip_and_parts_reveal_nothing_alone() {
        let m = MasterKey::generate();
        let (a, b) = split(&m);
        assert_eq!(combine(&a, &b).key(), &m);
        assert_ne!(a.as_bytes(), m.as_bytes());
        assert_ne!(b.as_bytes(), m.as_bytes());
        // A fresh split each time: parts of two tickets never match or combine.
        let (a2, b2) = split(&m);
        assert_ne!(a, a2);
        assert_ne!(b, b2);
        assert_ne!(combine(&a, &b2).key(), &m);
        assert_eq!(format!("{a:?}"), "KeyPart(..)");
    }

    #[test]
    fn issue_encode_decode_verify() {
        let id = Identity::generate();
        let m = MasterKey::generate();
        let (tf, b) = Ticket::issue(&id, &m, &spec()).unwrap();
        assert_eq!(combine(tf.part_a(), &b).key(), &m);
        let t = tf.ticket();
        let bytes = t.encode();
        assert!(bytes.len() <= MAX_TICKET_LEN);
        // The presented ticket carries no key part, only a commitment to part A.
        let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
        assert!(!contains(&bytes, tf.part_a().as_bytes()));
        assert!(!contains(&bytes, b.as_bytes()));
        let d = Ticket::decode(&bytes).unwrap();
        assert_eq!(&d, t);
        d.verify(&id.public()).unwrap();
        tf.verify(&id.public()).unwrap();
        // Never prints part A.
        let dbg = format!("{tf:?}");
        assert!(!dbg.contains(&hex::encode(tf.part_a().as_bytes())), "{dbg}");

        // Armor round trip, with comments, CRLF and indentation tolerated.
        let armor = tf.to_armor();
        let again = TicketFile::from_file_bytes(armor.as_bytes()).unwrap();
        assert_eq!(again, tf);
        let crlf = armor.replace('\n', "\r\n");
        assert_eq!(TicketFile::from_file_bytes(crlf.as_bytes()).unwrap(), tf);
        let indented = armor.replace('\n', "\n   ");
        assert_eq!(
            TicketFile::from_file_bytes(indented.as_bytes()).unwrap(),
            tf
        );
        assert_eq!(TicketFile::from_file_bytes(&tf.encode()).unwrap(), tf);
    }

    #[test]
    fn any_modification_is_refused() {
        let id = Identity::generate();
        let (tf, _) = Ticket::issue(&id, &MasterKey::generate(), &spec()).unwrap();
        let bytes = tf.encode();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.to_vec();
                b[i] ^= bit;
                if let Ok(x) = TicketFile::decode(&b) {
                    assert!(x.verify(&id.public()).is_err(), "flip at {i} accepted");
                }
            }
        }
        // Part A is covered through its commitment.
        let mut b = bytes.to_vec();
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(
            TicketFile::decode(&b).unwrap().verify(&id.public()),
            Err(TicketError::PartMismatch)
        );
        for n in 0..bytes.len() {
            assert!(TicketFile::decode(&bytes[..n]).is_err());
        }
        let signed = tf.ticket().encode();
        for n in 0..signed.len() {
            assert!(Ticket::decode(&signed[..n]).is_err());
        }
        let mut long = signed.clone();
        long.push(0);
        assert!(Ticket::decode(&long).is_err());
    }

    #[test]
    fn forged_tickets_are_refused() {
        let server = Identity::generate();
        let forger = Identity::generate();
        // Signed by another key, claiming to be from the server: signature fails.
        let (tf, _) = Ticket::issue(&forger, &MasterKey::generate(), &spec()).unwrap();
        let mut t = tf.ticket().clone();
        assert!(matches!(
            t.verify(&server.public()),
            Err(TicketError::ForeignServer { .. })
        ));
        t.server_key = server.public();
        assert_eq!(t.verify(&server.public()), Err(TicketError::Signature));
    }

    #[test]
    fn issue_validates_the_spec() {
        let id = Identity::generate();
        let m = MasterKey::generate();
        for s in [
            TicketSpec { plays: 0, ..spec() },
            TicketSpec {
                holder: String::new(),
                ..spec()
            },
            TicketSpec {
                holder: "a\nb".into(),
                ..spec()
            },
            TicketSpec {
                title: "../x".into(),
                ..spec()
            },
            TicketSpec {
                expires_unix: 5,
                issued_unix: 10,
                ..spec()
            },
        ] {
            assert!(
                matches!(Ticket::issue(&id, &m, &s), Err(TicketError::Spec(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn bad_armor_is_named() {
        for (text, want) in [
            ("", "no -----BEGIN"),
            ("hello", "no -----BEGIN"),
            ("-----BEGIN MCAST TICKET-----\nTUNUSw==\n", "no -----END"),
            (
                "-----BEGIN MCAST TICKET-----\n!!!\n-----END MCAST TICKET-----\n",
                "bad base64",
            ),
        ] {
            let e = TicketFile::from_file_bytes(text.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        let e = TicketFile::from_file_bytes(&[0xff, 0xfe]).unwrap_err();
        assert!(matches!(e, TicketError::Armor(_)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Ticket::decode(&bytes);
            let _ = TicketFile::decode(&bytes);
            let _ = TicketFile::from_file_bytes(&bytes);
        }

        #[test]
        fn decode_of_mutated_ticket_never_panics(i in 0usize..400, v in any::<u8>(), cut in 0usize..400) {
            let id = Identity::from_secret(&[5u8; 32]);
            let m = MasterKey::from_bytes([6u8; 32]);
            let (tf, _) = Ticket::issue(&id, &m, &spec()).unwrap();
            let mut b = tf.encode().to_vec();
            let n = b.len();
            b[i % n] = v;
            b.truncate(cut.min(n));
            let _ = TicketFile::decode(&b);
            let _ = Ticket::decode(&b);
        }
    }
}
