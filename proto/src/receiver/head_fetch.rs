//! Fetching the signed head over the control port in `HEAD_CHUNK` pieces, with a window of
//! requests in flight: each chunk that arrives frees a slot for the next, and requests left
//! unanswered for [`RETRY`] are sent again (lost datagrams). The first chunk (which tells the
//! head's length) is an ordinary request with retries, made by the session.

use std::time::{Duration, Instant};

use crate::archive::MAX_HEAD_LEN;
use crate::wire::control::{Control, HEAD_CHUNK};

/// Requests in flight at once.
pub const WINDOW: usize = 32;
/// A chunk request unanswered this long is sent again.
pub const RETRY: Duration = Duration::from_millis(200);
/// The whole head must arrive within this.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct HeadFetch {
    archive_id: [u8; 16],
    bytes: Vec<u8>,
    got: Vec<bool>,
    sent_at: Vec<Option<Instant>>,
    missing: usize,
    in_flight: usize,
    cursor: usize,
    last_scan: Instant,
    deadline: Instant,
}

/// Why a head could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadFetchError {
    Oversized(u64),
    TimedOut,
}

impl HeadFetch {
    /// Start from the first chunk's answer (`total` bytes in all, `first` at offset 0).
    pub fn new(
        now: Instant,
        archive_id: [u8; 16],
        total: u32,
        first: &[u8],
    ) -> Result<HeadFetch, HeadFetchError> {
        let total = total as usize;
        if total as u64 > MAX_HEAD_LEN {
            return Err(HeadFetchError::Oversized(total as u64));
        }
        let chunks = total.div_ceil(HEAD_CHUNK).max(1);
        let mut f = HeadFetch {
            archive_id,
            bytes: vec![0u8; total],
            got: vec![false; chunks],
            sent_at: vec![None; chunks],
            missing: chunks - 1,
            in_flight: 0,
            cursor: 0,
            last_scan: now,
            deadline: now + DEADLINE,
        };
        let n = first.len().min(total);
        f.bytes[..n].copy_from_slice(&first[..n]);
        f.got[0] = true;
        Ok(f)
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// A `HeadChunk` arrived (from the server; any request id).
    pub fn on_chunk(&mut self, archive_id: &[u8; 16], offset: u32, bytes: &[u8]) {
        let off = offset as usize;
        let total = self.bytes.len();
        if archive_id != &self.archive_id || off % HEAD_CHUNK != 0 || off >= total.max(1) {
            return;
        }
        let i = off / HEAD_CHUNK;
        if self.got[i] {
            return;
        }
        let end = (off + bytes.len()).min(total);
        self.bytes[off..end].copy_from_slice(&bytes[..end - off]);
        self.got[i] = true;
        self.missing -= 1;
        if self.sent_at[i].is_some() {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// Chunk requests to send now (`send` is given each one).
    pub fn poll(
        &mut self,
        now: Instant,
        mut send: impl FnMut(Control),
    ) -> Result<(), HeadFetchError> {
        if self.is_complete() {
            return Ok(());
        }
        if now > self.deadline {
            return Err(HeadFetchError::TimedOut);
        }
        let req = |i: usize| Control::HeadRequest {
            archive_id: self.archive_id,
            offset: (i * HEAD_CHUNK) as u32,
        };
        if now.saturating_duration_since(self.last_scan) >= RETRY {
            // Re-request what went unanswered; count what is still in flight.
            self.in_flight = 0;
            for i in 0..self.cursor {
                if self.got[i] {
                    continue;
                }
                match self.sent_at[i] {
                    Some(t) if now.saturating_duration_since(t) < RETRY => self.in_flight += 1,
                    _ if self.in_flight < WINDOW => {
                        send(req(i));
                        self.sent_at[i] = Some(now);
                        self.in_flight += 1;
                    }
                    _ => {}
                }
            }
            self.last_scan = now;
        }
        while self.in_flight < WINDOW && self.cursor < self.got.len() {
            if !self.got[self.cursor] {
                send(req(self.cursor));
                self.sent_at[self.cursor] = Some(now);
                self.in_flight += 1;
            }
            self.cursor += 1;
        }
        Ok(())
    }

    pub fn poll_timeout(&self) -> Instant {
        (self.last_scan + RETRY).min(self.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_in_a_window_and_retries_the_lost() {
        let t = Instant::now();
        let total = HEAD_CHUNK * 40 + 10;
        let mut f = HeadFetch::new(t, [1; 16], total as u32, &[7; HEAD_CHUNK]).unwrap();
        let mut sent = Vec::new();
        f.poll(t, |c| sent.push(c)).unwrap();
        assert_eq!(sent.len(), WINDOW);
        // Answer all but chunk 3.
        for c in sent.drain(..) {
            if let Control::HeadRequest { offset, .. } = c {
                if offset as usize != 3 * HEAD_CHUNK {
                    f.on_chunk(&[1; 16], offset, &[offset as u8; HEAD_CHUNK]);
                }
            }
        }
        f.poll(t, |c| sent.push(c)).unwrap();
        // The rest of the head (chunks 33..=40), not chunk 3 yet.
        assert_eq!(sent.len(), 40 - WINDOW);
        for c in sent.drain(..) {
            if let Control::HeadRequest { offset, .. } = c {
                f.on_chunk(&[1; 16], offset, &[0; HEAD_CHUNK]);
            }
        }
        assert!(!f.is_complete());
        f.poll(t + RETRY, |c| sent.push(c)).unwrap();
        assert_eq!(
            sent,
            vec![Control::HeadRequest {
                archive_id: [1; 16],
                offset: 3 * HEAD_CHUNK as u32
            }]
        );
        f.on_chunk(&[2; 16], 3 * HEAD_CHUNK as u32, &[0; HEAD_CHUNK]);
        assert!(!f.is_complete(), "a chunk of another archive is ignored");
        f.on_chunk(&[1; 16], 3 * HEAD_CHUNK as u32, &[0; HEAD_CHUNK]);
        assert!(f.is_complete());
        assert_eq!(f.into_bytes().len(), total);
        assert_eq!(
            HeadFetch::new(t, [1; 16], u32::MAX, &[]).err(),
            Some(HeadFetchError::Oversized(u32::MAX as u64))
        );
    }
}
