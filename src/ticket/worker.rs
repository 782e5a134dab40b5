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
        TicketWorker::start_with(
            move |dg, from, unix| service.handle_datagram(dg, from, unix),
            sock,
        )
    }

    /// The worker around any play handler (`TicketService::handle_datagram`'s shape: the
    /// datagram, its sender, the time in Unix seconds; the reply, if any).
    fn start_with<F>(mut handle: F, sock: UdpSocket) -> std::io::Result<TicketWorker>
    where
        F: FnMut(&[u8], SocketAddr, u64) -> Option<Vec<u8>> + Send + 'static,
    {
        let (tx, rx) = sync_channel::<(SocketAddr, Vec<u8>)>(QUEUE);
        let (otx, outcomes) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mcastd-tickets".into())
            .spawn(move || {
                for (from, dg) in rx {
                    let unix = crate::process::unix_secs();
                    let Some(reply) = handle(&dg, from, unix) else {
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::channel::{ChannelManager, Params};
    use crate::wire::control::ErrorCode;

    /// A play request as the channel manager hands it on (the handler below only reads its
    /// request id).
    fn play_request(req_id: u32) -> Vec<u8> {
        Envelope::new(
            1,
            req_id,
            Control::PlayRequest {
                title: "film".into(),
                ticket: vec![0; 8],
                receiver_pub: [2; 32],
                proof: [3; 32],
            },
        )
        .encode()
    }

    /// A database that stalls: the worker takes one request and blocks on it, the queue
    /// fills to [`QUEUE`], and every request past that is shed at once (the send thread
    /// never waits) and counted in `plays_shed`. Once the database answers, every request
    /// that was queued gets its outcome: none is lost, none counted twice.
    #[test]
    fn a_full_queue_sheds_and_counts_and_loses_nothing() {
        let (started_tx, started) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let mut first = Some((started_tx, released));
        let handler = move |dg: &[u8], _from: SocketAddr, _unix: u64| {
            // The first request stalls until the test releases it (a database lock held).
            if let Some((started_tx, released)) = first.take() {
                started_tx.send(()).unwrap();
                released.recv().unwrap();
            }
            let env = Envelope::decode(dg).ok()?;
            let reply = if env.req_id % 2 == 0 {
                Control::PlayGrant {
                    ticket_id: [4; 16],
                    sealed_part: vec![5; 8],
                    signature: [6; 64],
                }
            } else {
                Control::Error {
                    code: ErrorCode::TicketRefused,
                    message: "no".into(),
                }
            };
            Some(Envelope::new(env.receiver_id, env.req_id, reply).encode())
        };
        // Replies go to a socket of the test's (the receiver's).
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let from = client.local_addr().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let worker = TicketWorker::start_with(handler, sock).unwrap();
        let mut mgr = ChannelManager::new(Params::for_tests(1_000_000), Vec::new(), Instant::now());

        // As the server's loop does: submit, count what is shed.
        let submit = |mgr: &mut ChannelManager, req_id: u32| {
            let ok = worker.submit(from, play_request(req_id));
            if !ok {
                mgr.count_play_shed();
            }
            ok
        };
        assert!(submit(&mut mgr, 0));
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        // The worker is stuck on request 0: QUEUE more fit, the rest are shed.
        let total = QUEUE as u32 + 1 + 100;
        let accepted: Vec<u32> = (1..total).filter(|&i| submit(&mut mgr, i)).collect();
        assert_eq!(accepted, (1..=QUEUE as u32).collect::<Vec<_>>());
        assert_eq!(mgr.counters().plays_shed, 100);
        assert_eq!(
            worker.poll_outcome(),
            None,
            "nothing answered while stalled"
        );

        // The database answers: every accepted request (request 0 and the queue) gets an
        // outcome and a reply; nothing more.
        release.send(()).unwrap();
        let answered = QUEUE + 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut outcomes = 0;
        while outcomes < answered && Instant::now() < deadline {
            match worker.poll_outcome() {
                Some(o) => {
                    mgr.count_play(o == Outcome::Granted);
                    outcomes += 1;
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        drop(worker); // closes the queue, joins the thread
        let mut buf = [0u8; 2048];
        let mut replies = Vec::new();
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while let Ok((n, _)) = client.recv_from(&mut buf) {
            replies.push(Envelope::decode(&buf[..n]).unwrap().req_id);
        }
        replies.sort_unstable();
        assert_eq!(replies, (0..=QUEUE as u32).collect::<Vec<_>>());
        let c = mgr.counters();
        assert_eq!(c.plays_granted, QUEUE as u64 / 2 + 1);
        assert_eq!(c.plays_refused, QUEUE as u64 / 2);
        // Every request is accounted for exactly once: answered or shed.
        assert_eq!(
            c.plays_granted + c.plays_refused + c.plays_shed,
            u64::from(total)
        );
    }
}
