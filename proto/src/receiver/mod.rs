//! Receiver protocol engines (sans-I/O). [`session::Session`] is one download: it composes
//! [`download`] (what is verified and written, FEC decoding included), [`fec_gate`] (when a
//! FEC block is judged short), [`nak`] (when to ask for repairs), [`symbol_naks`] (FEC
//! amounts: "block f: n more symbols") and the
//! tier engine ([`tier`] judged by [`judge`], through [`tiering`]), and owns the join, head fetch
//! ([`head_fetch`]), control requests ([`requests`]), keepalives, unicast fallback and
//! re-join. `mcast-recv get` and the simulator both drive the same `Session`.

pub mod download;
pub mod fec_gate;
pub mod head_fetch;
pub mod judge;
pub mod nak;
pub mod range_fetch;
pub mod requests;
pub mod resume;
pub mod session;
pub mod symbol_naks;
pub mod tier;
pub mod tiering;

pub use requests::{Transmit, Via};
pub use session::{Event, Failure, Progress, ResumeInfo, Session, SessionConfig, SessionStats};
