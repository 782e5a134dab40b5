//! systemd service notifications (`sd_notify`, for `Type=notify` units): `READY=1` once the
//! sockets are bound and the main loop starts, `WATCHDOG=1` from the main loop at half of
//! `WATCHDOG_USEC` (so a loop that stops turning stops the pings and systemd restarts the
//! service), `STATUS=` with a one-line summary, `STOPPING=1` on the way out.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How often `STATUS=` is refreshed when no watchdog sets the pace.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The main loop's handle on the service manager.
pub struct Notifier {
    enabled: bool,
    /// Half the watchdog timeout: the ping interval.
    watchdog_every: Option<Duration>,
    next_ping: Instant,
    next_status: Instant,
    last_status: String,
    warned: bool,
}

impl Notifier {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, `WATCHDOG_USEC` (and
    /// `WATCHDOG_PID`, which must be this process when set).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog_every = sd_notify::watchdog_enabled()
            .filter(|d| enabled && !d.is_zero())
            .map(|d| d / 2);
        let now = Instant::now();
        Notifier {
            enabled,
            watchdog_every,
            next_ping: now,
            next_status: now,
            last_status: String::new(),
            warned: false,
        }
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` is set).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The ping interval (half of `WATCHDOG_USEC`), when systemd asked for a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Start-up is done: sockets bound, about to serve. Also the first watchdog ping.
    pub fn ready(&mut self, now: Instant, status: &str) {
        if !self.enabled {
            return;
        }
        let mut states = vec![NotifyState::Ready, NotifyState::Status(status)];
        if self.watchdog_every.is_some() {
            states.push(NotifyState::Watchdog);
        }
        self.send(&states);
        self.last_status = status.to_string();
        self.schedule(now);
    }

    /// Called on every turn of the main loop: pings the watchdog when due, with the status
    /// (made by `status` only then) when it changed.
    pub fn tick(&mut self, now: Instant, status: impl FnOnce() -> String) {
        if !self.enabled {
            return;
        }
        let ping = self.watchdog_every.is_some() && now >= self.next_ping;
        if !ping && now < self.next_status {
            return;
        }
        let status = status();
        let changed = status != self.last_status;
        let mut states = Vec::with_capacity(2);
        if ping {
            states.push(NotifyState::Watchdog);
        }
        if changed {
            states.push(NotifyState::Status(&status));
        }
        if !states.is_empty() {
            self.send(&states);
        }
        if changed {
            self.last_status = status;
        }
        self.schedule(now);
    }

    /// When the main loop must turn next for the watchdog (its sleep ends by then).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.watchdog_every.map(|_| self.next_ping)
    }

    /// Shutting down (`STOPPING=1`), with a last status.
    pub fn stopping(&mut self, status: &str) {
        if self.enabled {
            self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
        }
    }

    fn schedule(&mut self, now: Instant) {
        if let Some(every) = self.watchdog_every {
            self.next_ping = now + every;
        }
        self.next_status = now
            + self
                .watchdog_every
                .unwrap_or(STATUS_EVERY)
                .min(STATUS_EVERY);
    }

    fn send(&mut self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            // Logged once: a service manager that went away is not worth a log line a second.
            if !self.warned {
                self.warned = true;
                tracing::warn!(error = %e, socket = ?std::env::var_os("NOTIFY_SOCKET"),
                    "cannot notify the service manager (NOTIFY_SOCKET); with WatchdogSec= set it will restart this service");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_without_notify_socket() {
        // The test harness is not started by systemd (and nothing here sets the variable).
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return;
        }
        let mut n = Notifier::from_env();
        assert!(!n.enabled());
        assert_eq!(n.poll_timeout(), None);
        n.ready(Instant::now(), "x");
        n.tick(Instant::now(), || {
            unreachable!("no status is made when disabled")
        });
        n.stopping("y");
    }
}
