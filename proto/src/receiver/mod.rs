//! Receiver protocol engines (sans-I/O): [`download`] decides what is verified and written,
//! [`nak`] decides when to ask for repairs. The `mcast-recv` driver and the simulation
//! harness both drive them.

pub mod download;
pub mod nak;
pub mod tier;
