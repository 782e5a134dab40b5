//! Request/response over the control port with retries (every request is idempotent).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mcast_proto::wire::control::{AddressToken, Control, Envelope, MAX_CONTROL_LEN};

use crate::error::{Failure, RecvError};

/// Send `bytes` to `to` from `sock` up to `tries` times, each time waiting `per_try` for a
/// datagram from `to` that `accept` takes; `Ok(None)` when none came. A refusal (ICMP port
/// unreachable: nothing listens there) waits `refused_pause` before the next try. `Err` when
/// the datagram cannot be sent at all.
pub fn exchange<T>(
    sock: &UdpSocket,
    to: SocketAddr,
    bytes: &[u8],
    tries: u32,
    per_try: Duration,
    refused_pause: Duration,
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> std::io::Result<Option<T>> {
    let mut buf = vec![0u8; MAX_CONTROL_LEN + 1];
    sock.set_nonblocking(false).ok();
    for _ in 0..tries {
        sock.send_to(bytes, to)?;
        let deadline = Instant::now() + per_try;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).ok();
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == to => {
                    if let Some(t) = accept(&buf[..n]) {
                        return Ok(Some(t));
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                // ICMP port unreachable surfaces as ConnectionRefused: next try, after a pause.
                Err(_) => {
                    std::thread::sleep(left.min(refused_pause));
                    break;
                }
            }
        }
    }
    Ok(None)
}

pub struct ControlClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub receiver_id: u64,
    next_req: u32,
    /// The server's address token for us, once a Retry gave one (`address_token`).
    token: Option<AddressToken>,
}

impl ControlClient {
    pub fn new(server: SocketAddr, receiver_id: u64) -> Result<ControlClient, RecvError> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind)
            .map_err(|e| RecvError::new(Failure::Other, format!("control socket: {e}")))?;
        Ok(ControlClient {
            sock,
            server,
            receiver_id,
            next_req: 1,
            token: None,
        })
    }

    pub fn next_req_id(&mut self) -> u32 {
        self.next_req = self.next_req.wrapping_add(1);
        self.next_req
    }

    /// Send `msg` from `sock` and wait for the reply with the same request id, retrying. A
    /// [`Control::Retry`] (the server wants our address proven) is answered by sending the
    /// request again with its token.
    pub fn request_on(
        &mut self,
        sock: &UdpSocket,
        msg: Control,
        tries: u32,
        per_try: Duration,
    ) -> Result<Control, RecvError> {
        self.request_built(sock, |_| msg.clone(), tries, per_try)
    }

    /// As [`Self::request_on`], the request made by `build` from the address token it will
    /// carry (a play request's proof is bound to it).
    pub fn request_built(
        &mut self,
        sock: &UdpSocket,
        build: impl Fn(Option<&AddressToken>) -> Control,
        tries: u32,
        per_try: Duration,
    ) -> Result<Control, RecvError> {
        for _ in 0..3 {
            let msg = build(self.token.as_ref());
            match self.request_once(sock, msg, tries, per_try)? {
                Control::Retry { token } => self.token = Some(token),
                reply => return Ok(reply),
            }
        }
        Err(RecvError::new(
            Failure::Unreachable,
            format!(
                "server {} kept refusing our address token: is something rewriting our source address?",
                self.server
            ),
        ))
    }

    fn request_once(
        &mut self,
        sock: &UdpSocket,
        msg: Control,
        tries: u32,
        per_try: Duration,
    ) -> Result<Control, RecvError> {
        let id = self.next_req_id();
        let bytes = Envelope::new(self.receiver_id, id, msg)
            .with_token(self.token)
            .encode_request();
        let rid = self.receiver_id;
        let answer = exchange(sock, self.server, &bytes, tries, per_try, per_try, |b| {
            Envelope::decode(b)
                .ok()
                .filter(|env| env.req_id == id && env.receiver_id == rid)
                .map(|env| env.msg)
        })
        .map_err(|e| {
            RecvError::new(
                Failure::Unreachable,
                format!("cannot send to {}: {e}", self.server),
            )
        })?;
        if let Some(msg) = answer {
            return Ok(msg);
        }
        Err(RecvError::new(
            Failure::Unreachable,
            format!(
                "server {} did not answer ({tries} tries): is mcastd running there, and is --server right?",
                self.server
            ),
        ))
    }

    pub fn request(
        &mut self,
        msg: Control,
        tries: u32,
        per_try: Duration,
    ) -> Result<Control, RecvError> {
        let sock = self
            .sock
            .try_clone()
            .map_err(|e| RecvError::new(Failure::Other, e.to_string()))?;
        self.request_on(&sock, msg, tries, per_try)
    }
}
