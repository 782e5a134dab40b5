//! The ticket desk on its own thread. A play costs an Ed25519 check, a database round trip
//! (SQLite may wait up to its busy timeout for a lock; PostgreSQL may reconnect) and an HPKE
//! seal: on the send thread, a slow database would stall every channel's pacing. The send
//! thread hands play requests (already from proven addresses, `address_token`) to this
//! worker through a bounded queue and never waits for it; when the queue is full the request
//! is shed and counted, and the receiver's retry comes back later.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use super::service::TicketService;
use crate::wire::control::{Control, Envelope};

/// Play requests waiting for the worker at most. A play takes ~1 ms with a local database,
/// so this is ~64 ms of work: a flood of requests (from proven addresses only) is shed here
/// instead of queueing seconds of stale work.
pub const QUEUE: usize = 64;

/// What became of one play request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Refused,
}

pub struct TicketWorker {
    tx: Option<SyncSender<(SocketAddr, Vec<u8>)>>,
    outcomes: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

impl TicketWorker {
    /// Start the worker; it answers on `sock` (a clone of the control socket, so replies come
    /// from the address receivers asked).
    pub fn start(mut service: TicketService, sock: UdpSocket) -> std::io::Result<TicketWorker> {
        let (tx, rx) = sync_channel::<(SocketAddr, Vec<u8>)>(QUEUE);
        let (otx, outcomes) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mcastd-tickets".into())
            .spawn(move || {
                for (from, dg) in rx {
                    let unix = crate::process::unix_secs();
                    let Some(reply) = service.handle_datagram(&dg, from, unix) else {
                        continue;
                    };
                    let granted = Envelope::decode(&reply)
                        .is_ok_and(|e| matches!(e.msg, Control::PlayGrant { .. }));
                    if let Err(e) = sock.send_to(&reply, from) {
                        tracing::debug!(to = %from, error = %e, "play reply not sent");
                    }
                    let o = if granted {
                        Outcome::Granted
                    } else {
                        Outcome::Refused
                    };
                    if otx.send(o).is_err() {
                        break;
                    }
                }
            })?;
        Ok(TicketWorker {
            tx: Some(tx),
            outcomes,
            thread: Some(thread),
        })
    }

    /// Queue a play request; `false` when the queue is full (shed: the receiver retries).
    pub fn submit(&self, from: SocketAddr, datagram: Vec<u8>) -> bool {
        match self.tx.as_ref().map(|t| t.try_send((from, datagram))) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => false,
        }
    }

    /// The next outcome the worker reported, if any (for the server's counters).
    pub fn poll_outcome(&self) -> Option<Outcome> {
        self.outcomes.try_recv().ok()
    }
}

impl Drop for TicketWorker {
    /// Close the queue and let the worker finish what it holds (plays in the middle of a
    /// database transaction complete).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
