//! mcast-recv: the receiver driver. The protocol logic (what to write, when to NAK) lives in
//! `mcast_proto::receiver`; [`get`] owns the sockets and files; [`state`] is the crash-safe
//! progress record; [`play`] exchanges a play ticket for the key and decrypts.

pub mod adverts;
pub mod args;
pub mod batch;
pub mod control;
pub mod disk;
pub mod error;
pub mod failover;
pub mod get;
pub mod http_fetch;
pub mod human;
pub mod known_servers;
pub mod list;
pub mod play;
pub mod state;
