//! mcast: the server package — `mcastd`'s drivers, configuration, ticket store and operator
//! commands, and `mcast-director`'s driver.
//!
//! The protocol itself (wire formats, archive layout, carousel, channel manager, receiver
//! engines, director routing, schedules, simulator) is the sans-I/O crate `mcast-proto`; the
//! operating-system side shared with the receiver (batched sockets, crash-safe files, archive
//! files) is `mcast-io`. Both are re-exported here under their old paths.
//!
//! * [`archive`] — packing (`mcastd pack`), plus the proto/io archive modules.
//! * [`config`] — `mcastd.toml`.
//! * [`server`] — the server driver: sockets, archive files and the clock around the
//!   channel manager.
//! * [`ticket`] — play-ticket validation and the [`ticket::TicketStore`] validation database
//!   (SQLite, or PostgreSQL shared by several servers), with the server's ticket desk.
//! * [`heartbeat`], [`health`] — the server's heartbeat driver and plain HTTP health checks.
//! * [`metrics`], [`http`] — Prometheus metrics (counters, gauges, hdr histograms) and the
//!   HTTP endpoint serving them with `/health`.

pub mod archive;
pub mod catalog;
pub mod config;
pub mod control_socket;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod metrics;
pub mod server;
pub mod ticket;
pub mod ticketadmin;
pub mod unreachable;

pub use mcast_io::{cli_docs, dscp, fastio, fsutil, iface, multicast, process, systemd};
pub mod sim;

pub use mcast_proto::{
    address_token, carousel, channel, codec, delegation, director, pacer, receiver, schedule, wire,
};
