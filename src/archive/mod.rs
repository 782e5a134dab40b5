//! Archives, as the server sees them: the layout, head and manifest (`mcast_proto::archive`),
//! archive files on disk and unpacking (`mcast_io::archive`), and packing ([`pack`]), which
//! only the server does.

pub mod pack;

pub use mcast_io::archive::*;
pub use pack::{pack, CompressMode, PackOptions, PackReport};
