//! mcast: the server side of the carousel media distribution system.
//!
//! * [`archive`] — the pre-encrypted archive format: frames, signed manifest, pack/unpack.
//! * [`config`] — `mcastd.toml`.
//! * [`codec`] — bounds-checked byte reading shared by every format.
//! * [`fsutil`] — crash-safe file writing.

pub mod archive;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod fsutil;
