//! Rate pacing for one channel: a token bucket expressed as "the next send time".
//! Packets go out evenly at `rate_bps`, with at most `burst` of catch-up after a stall.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Pacer {
    rate_bps: u64,
    burst: Duration,
    next: Instant,
}

impl Pacer {
    /// `rate_bps == 0` means unlimited.
    pub fn new(rate_bps: u64, burst: Duration, now: Instant) -> Pacer {
        Pacer {
            rate_bps,
            burst,
            next: now,
        }
    }

    pub fn rate_bps(&self) -> u64 {
        self.rate_bps
    }

    pub fn set_rate(&mut self, rate_bps: u64) {
        self.rate_bps = rate_bps;
    }

    /// Earliest time the next packet may go.
    pub fn next_send(&self) -> Instant {
        self.next
    }

    pub fn ready(&self, now: Instant) -> bool {
        self.next <= now
    }

    /// Account for `bytes` sent at `now`.
    pub fn on_send(&mut self, now: Instant, bytes: usize) {
        if self.rate_bps == 0 {
            self.next = now;
            return;
        }
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        let base = self.next.max(floor);
        let nanos = (bytes as u128 * 8 * 1_000_000_000) / self.rate_bps as u128;
        self.next = base + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_at_rate_with_bounded_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(8_000_000, Duration::from_millis(2), t0); // 1 MB/s
        let mut now = t0;
        let mut sent = 0;
        // Send whenever allowed for one simulated second in 100 µs steps.
        while now < t0 + Duration::from_secs(1) {
            while p.ready(now) {
                p.on_send(now, 1000);
                sent += 1000;
            }
            now += Duration::from_micros(100);
        }
        assert!((990_000..=1_010_000).contains(&sent), "{sent}");
        // After a long stall only `burst` worth is sent at once.
        now += Duration::from_secs(5);
        let mut burst = 0;
        while p.ready(now) {
            p.on_send(now, 1000);
            burst += 1000;
        }
        assert!(burst <= 3000, "{burst}");
    }
}
