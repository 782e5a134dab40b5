//! `mcastd.toml` and `director.toml`: any text is a config or an error naming the file, never
//! a panic, and a config that validates yields the values `mcastd` derives from it (channel
//! parameters, pack options, addresses) without a panic either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mcast::config::{Config, DirectorConfig};

fuzz_target!(|input: &[u8]| {
    // `load` reads the file with `read_to_string`: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    if let Ok(cfg) = Config::parse(text, path) {
        let p = cfg.channel_params();
        assert_eq!(p.groups.len(), cfg.server.channels as usize);
        assert!(p.groups.iter().all(|g| g.ip().is_multicast()));
        cfg.pack_cipher().expect("validated");
        cfg.pack_compress().expect("validated");
        cfg.pack_leaf_hash().expect("validated");
        cfg.health_listen().expect("validated");
        cfg.advertised_control().expect("validated");
    }
    if let Ok(d) = DirectorConfig::parse(text, path) {
        assert!((1..=100).contains(&d.director.down_after));
    }
});
