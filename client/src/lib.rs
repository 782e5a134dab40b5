//! mcast-recv: the receiver. [`download`] is the sans-I/O state machine that decides what is
//! written; [`get`] is the driver with the sockets and files; [`state`] the crash-safe
//! progress record.

pub mod control;
pub mod download;
pub mod error;
pub mod get;
pub mod state;
