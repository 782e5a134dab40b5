//! The simulator (`mcast_proto::sim`), started from the current instant: the protocol crate
//! reads no clock, so the virtual clock's origin comes from here.

use std::time::Instant;

pub use mcast_proto::sim::*;

/// [`mcast_proto::sim::run`] from now.
pub fn run(cfg: &SimConfig) -> SimReport {
    mcast_proto::sim::run(cfg, Instant::now())
}

/// The throughput-tier simulation, from now.
pub mod tiers {
    pub use mcast_proto::sim::tiers::*;

    /// [`mcast_proto::sim::tiers::run`] from now.
    pub fn run(cfg: &TierSimConfig) -> TierSimReport {
        mcast_proto::sim::tiers::run(cfg, std::time::Instant::now())
    }
}

/// The mixed-audience simulation, from now.
pub mod mixed {
    pub use mcast_proto::sim::mixed::*;

    /// [`mcast_proto::sim::mixed::run`] from now.
    pub fn run(cfg: &MixedConfig) -> MixedReport {
        mcast_proto::sim::mixed::run(cfg, std::time::Instant::now())
    }
}

/// The unicast-fallback simulation (a no-multicast receiver's own stream), from now.
pub mod unicast {
    pub use mcast_proto::sim::unicast::*;

    /// [`mcast_proto::sim::unicast::run`] from now.
    pub fn run(cfg: &UnicastConfig) -> UnicastReport {
        mcast_proto::sim::unicast::run(cfg, std::time::Instant::now())
    }
}
