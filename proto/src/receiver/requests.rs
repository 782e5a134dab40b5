//! The session's control requests in flight: each is resent until answered or out of tries,
//! and answers are matched by request id. Nothing here blocks: the data path keeps draining
//! while a tier change, a completion or a unicast handshake waits for its reply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::control::{AddressToken, Control, Envelope, SessionKey};

/// Which socket a datagram leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The control socket (requests, keepalives, NAKs to the server).
    Control,
    /// The unicast data socket: the unicast handshake is made from it, so the server proves
    /// the very address it will stream to.
    Unicast,
    /// The NAK socket, multicast to the channel's group (other receivers suppress theirs).
    Group,
}

/// A datagram for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub via: Via,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// What a request was for (its answer is handled accordingly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Join,
    HeadFirst,
    ChangeTier(u8),
    Complete,
    UnicastRequest,
    UnicastConfirm,
    /// The cookie for a discovery burst of (tier, ms).
    BurstCookie(u8, u16),
    /// The discovery burst itself.
    Burst,
}

struct Pending {
    req_id: u32,
    purpose: Purpose,
    via: Via,
    msg: Control,
    tries_left: u32,
    per_try: Duration,
    next_at: Instant,
}

/// Outstanding requests of one session.
pub struct Requests {
    server: SocketAddr,
    receiver_id: u64,
    next_req: u32,
    pending: Vec<Pending>,
    /// The server's address token for us (from a Retry): every request carries it, so the
    /// server may answer with more than we sent (`crate::address_token`).
    token: Option<AddressToken>,
    /// The session's key (from JoinOk): the session's own messages carry a MAC under it.
    session_key: Option<SessionKey>,
    /// Its tag, as our NAKs carry it ([`crate::wire::nak::session_tag`]).
    session_tag: Option<u64>,
}

impl Requests {
    pub fn new(server: SocketAddr, receiver_id: u64) -> Requests {
        Requests {
            server,
            receiver_id,
            next_req: 1,
            pending: Vec::new(),
            token: None,
            session_key: None,
            session_tag: None,
        }
    }

    pub fn set_session_key(&mut self, key: SessionKey) {
        self.session_tag = Some(crate::wire::nak::session_tag(&key));
        self.session_key = Some(key);
    }

    /// The tag our NAKs carry (none before the join): a heard NAK with it is our own.
    pub fn session_tag(&self) -> Option<u64> {
        self.session_tag
    }

    pub fn session_key(&self) -> Option<&SessionKey> {
        self.session_key.as_ref()
    }

    fn encode(&self, req_id: u32, msg: &Control) -> Vec<u8> {
        let env = Envelope::new(self.receiver_id, req_id, msg.clone()).with_token(self.token);
        match &self.session_key {
            Some(k) if msg.session_archive().is_some() => env.encode_sealed(k),
            _ => env.encode_request(),
        }
    }

    /// A [`Control::Retry`] for us: keep its token and send the request it answers again at
    /// once, now with the token. `false` when `env` is not a Retry for this session.
    pub fn on_retry(&mut self, now: Instant, env: &Envelope, out: &mut Vec<Transmit>) -> bool {
        let Control::Retry { token } = env.msg else {
            return false;
        };
        if env.receiver_id != self.receiver_id {
            return false;
        }
        self.token = Some(token);
        let server = self.server;
        if let Some(i) = self.pending.iter().position(|p| p.req_id == env.req_id) {
            let bytes = self.encode(env.req_id, &self.pending[i].msg);
            let p = &mut self.pending[i];
            p.next_at = now + p.per_try;
            out.push(Transmit {
                via: p.via,
                to: server,
                bytes,
            });
        }
        true
    }

    fn next_id(&mut self) -> u32 {
        self.next_req = self.next_req.wrapping_add(1);
        self.next_req
    }

    /// A datagram with no answer awaited (keepalive, head chunk request): its request id.
    pub fn send(&mut self, msg: Control, out: &mut Vec<Transmit>) -> u32 {
        let id = self.next_id();
        out.push(Transmit {
            via: Via::Control,
            to: self.server,
            bytes: self.encode(id, &msg),
        });
        id
    }

    /// Send `msg` now and again every `per_try` until answered, `tries` times in all. A new
    /// request for the same purpose replaces the old one.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        now: Instant,
        purpose: Purpose,
        via: Via,
        msg: Control,
        tries: u32,
        per_try: Duration,
        out: &mut Vec<Transmit>,
    ) {
        self.cancel(purpose);
        let req_id = self.next_id();
        out.push(Transmit {
            via,
            to: self.server,
            bytes: self.encode(req_id, &msg),
        });
        self.pending.push(Pending {
            req_id,
            purpose,
            via,
            msg,
            tries_left: tries.saturating_sub(1),
            per_try,
            next_at: now + per_try,
        });
    }

    pub fn cancel(&mut self, purpose: Purpose) {
        self.pending.retain(|p| p.purpose != purpose);
    }

    pub fn in_flight(&self, purpose: Purpose) -> bool {
        self.pending.iter().any(|p| p.purpose == purpose)
    }

    /// The answer to a request of ours, taken off the table: `None` when `env` answers none.
    pub fn answer(&mut self, env: &Envelope) -> Option<Purpose> {
        if env.receiver_id != self.receiver_id {
            return None;
        }
        let i = self.pending.iter().position(|p| p.req_id == env.req_id)?;
        Some(self.pending.swap_remove(i).purpose)
    }

    /// Resend what is due; returns the requests that ran out of tries unanswered.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Transmit>) -> Vec<Purpose> {
        let mut failed = Vec::new();
        let mut due = Vec::new();
        self.pending.retain_mut(|p| {
            if now < p.next_at {
                return true;
            }
            if p.tries_left == 0 {
                failed.push(p.purpose);
                return false;
            }
            p.tries_left -= 1;
            p.next_at = now + p.per_try;
            due.push((p.via, p.req_id, p.msg.clone()));
            true
        });
        for (via, req_id, msg) in due {
            out.push(Transmit {
                via,
                to: self.server,
                bytes: self.encode(req_id, &msg),
            });
        }
        failed
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.next_at).min()
    }
}
