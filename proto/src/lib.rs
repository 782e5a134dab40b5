//! mcast-proto: the protocol of the carousel media distribution system, without I/O.
//!
//! Every engine here is a state machine that takes events and a `now: Instant` from its
//! driver and returns what to send and when it next needs to be woken (quinn-proto's shape):
//! no sockets, no files, no clock, no OS randomness (seeds come in). The drivers — `mcastd`
//! (`mcast` crate), `mcast-recv` (`mcast-recv` crate) and the simulator ([`sim`]) — move
//! bytes, files and time, and run the very same engines.
//!
//! * [`address_token`] — stateless proof of a source address before any large reply.
//! * [`wire`] — every datagram format (`encode`/`decode`, versioned; decode never panics).
//! * [`archive`] — archive layout, signed head, manifest verification.
//! * [`carousel`], [`pacer`] — loop order and rate pacing.
//! * [`channel`] — the server's channel manager (joins, leases, unicast, NAKs, repairs, tiers).
//! * [`receiver`] — the receiver's engines: download, NAK, tier, composed by one session.
//! * [`delegation`] — an origin's certificate letting an edge sign SYNCs for its titles.
//! * [`director`], [`heartbeat`] — traffic director routing and the server's heartbeat emitter.
//! * [`schedule`] — time windows for scheduled loops and overnight batches.
//! * [`sim`] — deterministic simulation of many receivers against one server.

pub mod address_token;
pub mod archive;
pub mod carousel;
pub mod channel;
pub mod codec;
pub mod delegation;
pub mod director;
pub mod heartbeat;
pub mod pacer;
pub mod receiver;
pub mod schedule;
pub mod sim;
pub mod wire;
