//! Director datagrams: heartbeats (MAC'ed), route requests/replies, and the control requests a
//! director answers, decoded and then fed as a sequence through the director's state machine.
//!
//! Each record of the input (see `mcast_fuzz_common::records`) is `op:u8` then a datagram:
//! `op & 1` re-MACs a heartbeat-shaped datagram with the shared key before delivery (a genuine
//! server saying odd things, so the fuzzer gets past the MAC check); `op >> 1` advances the
//! director's clock by that many 100 ms steps. Oracles: no panic; decoded messages round-trip;
//! a reply always decodes.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mcast::director::{Director, Params};
use mcast::wire::control::Envelope;
use mcast::wire::director::{
    heartbeat_mac, is_heartbeat, DirectorMsg, Heartbeat, HeartbeatError, MAC_LEN,
};
use mcast_fuzz_common::{records, DIRECTOR_UNIX_MS, HEARTBEAT_KEY};

fuzz_target!(|input: &[u8]| {
    let mut d = Director::new(Params {
        key: Some(HEARTBEAT_KEY),
        server_keys: Default::default(),
        any_source: Default::default(),
        down_after: 3,
        max_skew: Duration::from_secs(30),
        token_secret: [0; 32],
        admin: mcast::address_token::IpPrefix::loopback(),
        // The fuzzer's source (127.0.0.1) is of site "a", where server 127.0.0.1:7600 is:
        // site-first routing, demand recording and placement run on every request.
        sites: vec![mcast::director::Site {
            name: "a".into(),
            prefixes: vec!["127.0.0.0/30".parse().unwrap()],
            preload: vec!["film".into()],
            policy: mcast::wire::director::SitePolicy {
                site: "a".into(),
                no_multicast: mcast::wire::director::NoMulticastPolicy::Both,
                http: vec!["http://mirror/archives/".into()],
            },
        }],
        server_sites: [("127.0.0.1:7600".parse().unwrap(), 0)].into_iter().collect(),
    });
    let from: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let t0 = Instant::now();
    let mut elapsed = Duration::ZERO;
    for rec in records(input) {
        let Some((&op, dg)) = rec.split_first() else {
            continue;
        };
        elapsed += Duration::from_millis(100) * (op >> 1) as u32;
        let mut dg = dg.to_vec();
        if op & 1 == 1 && is_heartbeat(&dg) && dg.len() >= MAC_LEN {
            let n = dg.len() - MAC_LEN;
            let mac = heartbeat_mac(&HEARTBEAT_KEY, &dg[..n]);
            dg[n..].copy_from_slice(&mac);
        }
        if let Ok(hb) = Heartbeat::decode_unverified(&dg) {
            let re = hb.encode(&HEARTBEAT_KEY);
            assert_eq!(Heartbeat::open(&re, &HEARTBEAT_KEY), Ok(hb.clone()));
            assert_eq!(&re[..re.len() - MAC_LEN], &dg[..dg.len() - MAC_LEN]);
            if Heartbeat::open(&dg, &HEARTBEAT_KEY).is_ok() {
                assert_eq!(re, dg);
            }
        } else {
            assert!(matches!(
                Heartbeat::open(&dg, &HEARTBEAT_KEY),
                Err(HeartbeatError::BadMac | HeartbeatError::Malformed(_))
            ));
        }
        if let Ok(m) = DirectorMsg::decode(&dg) {
            assert_eq!(DirectorMsg::decode(&m.encode()).as_ref(), Ok(&m));
        }
        let now = t0 + elapsed;
        let wall = DIRECTOR_UNIX_MS + elapsed.as_millis() as u64;
        if let Some(reply) = d.handle_datagram(now, wall, from, &dg) {
            assert!(
                DirectorMsg::decode(&reply).is_ok() || Envelope::decode(&reply).is_ok(),
                "director sent a reply that does not decode"
            );
        }
        d.handle_timeout(now);
        while d.poll_event().is_some() {}
        let _ = d.poll_timeout();
    }
    let _ = d.up_servers();
    let _ = d.stats(t0 + elapsed);
    let _ = d.placement(0);
});
