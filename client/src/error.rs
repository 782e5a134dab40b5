//! Receiver failures and their exit codes.

/// What kind of failure ended the run; each has its own exit code (see `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Other = 1,
    Usage = 2,
    Integrity = 3,
    Unreachable = 4,
    NotFound = 5,
    DiskFull = 6,
    Timeout = 7,
    /// A play ticket was refused (expired, revoked, used up, forged, not for this title ...).
    TicketRefused = 8,
    /// `batch`: some titles left for the next window (partial or not started).
    Left = 9,
    /// `batch`: some titles failed for good (see the report).
    Failed = 10,
    Interrupted = 130,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RecvError {
    pub kind: Failure,
    pub message: String,
    /// The server went silent mid-download (see `GetOptions::silence_timeout`): another
    /// server can resume it. `received_bytes` is what this run received before that.
    pub silent: bool,
    pub received_bytes: u64,
    /// What the session held when it ended (for a resume elsewhere), if it got that far.
    pub resume: Option<mcast_proto::receiver::ResumeInfo>,
    /// The run ended to hand over to HTTP by its site's policy: no multicast arrived and the
    /// policy is `http`, or the unicast stream ran `repair_after` and the policy is `both`.
    pub http_handover: bool,
    /// The HTTP mirrors of the receiver's site (from its director), for that hand-over
    /// (boxed: errors stay small).
    pub http_mirrors: Option<Box<Vec<String>>>,
}

impl RecvError {
    pub fn new(kind: Failure, message: impl Into<String>) -> RecvError {
        RecvError {
            kind,
            message: message.into(),
            silent: false,
            received_bytes: 0,
            resume: None,
            http_handover: false,
            http_mirrors: None,
        }
    }

    /// Map an I/O error on the output, telling a full disk apart.
    pub fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> RecvError {
        let full = e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull;
        if full {
            RecvError::new(
                Failure::DiskFull,
                format!(
                    "{what} {}: no space left on device; free space and run the same command again to resume",
                    path.display()
                ),
            )
        } else {
            RecvError::new(Failure::Other, format!("{what} {}: {e}", path.display()))
        }
    }
}
