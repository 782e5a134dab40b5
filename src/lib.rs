//! mcast: the server side of the carousel media distribution system.
//!
//! * [`archive`] — the pre-encrypted archive format: frames, signed manifest, pack/unpack.
//! * [`config`] — `mcastd.toml`.
//! * [`codec`] — bounds-checked byte reading shared by every format.
//! * [`fsutil`] — crash-safe file writing.
//! * [`ticket`], [`ticketdb`] — play-ticket validation and the server's validation database.

pub mod archive;
pub mod carousel;
pub mod catalog;
pub mod channel;
pub mod codec;
pub mod config;
pub mod fastio;
pub mod fsutil;
pub mod pacer;
pub mod receiver;
pub mod server;
pub mod sim;
pub mod ticket;
pub mod ticketadmin;
pub mod ticketdb;
pub mod wire;
