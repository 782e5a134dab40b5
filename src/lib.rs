//! mcast: the server side of the carousel media distribution system.
//!
//! * [`archive`] — the pre-encrypted archive format: frames, signed manifest, pack/unpack.
//! * [`config`] — `mcastd.toml`.
//! * [`codec`] — bounds-checked byte reading shared by every format.
//! * [`fsutil`] — crash-safe file writing.
//! * [`ticket`], [`ticketdb`] — play-ticket validation and the server's validation database
//!   (SQLite, or PostgreSQL shared by several servers: [`ticketdb_pg`]).
//! * [`director`], [`heartbeat`], [`health`] — traffic directors: routing and server health
//!   (sans-I/O), the server's heartbeat emitter, and plain HTTP health checks.

pub mod archive;
pub mod carousel;
pub mod catalog;
pub mod channel;
pub mod codec;
pub mod config;
pub mod director;
pub mod fastio;
pub mod fsutil;
pub mod health;
pub mod heartbeat;
pub mod pacer;
pub mod process;
pub mod receiver;
pub mod schedule;
pub mod server;
pub mod sim;
pub mod ticket;
pub mod ticketadmin;
pub mod ticketdb;
pub mod ticketdb_pg;
pub mod wire;
