//! mcast-io: the operating-system side that `mcastd` and `mcast-recv` share (as quinn-udp is
//! to quinn): batched UDP send and receive, large ordered writes, crash-safe files, archive
//! files on disk, signals and logging. No protocol decisions live here (`mcast-proto`).

pub mod archive;
pub mod cli_docs;
pub mod dscp;
pub mod fastio;
pub mod fsutil;
pub mod iface;
pub mod multicast;
pub mod process;
pub mod systemd;
