//! Control datagrams (`Envelope`, both directions of the control port): decoding never panics,
//! and whatever decodes re-encodes to a datagram that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcast::wire::control::{is_play_request, Control, Envelope};

fuzz_target!(|input: &[u8]| {
    let _ = is_play_request(input);
    let Ok(env) = Envelope::decode(input) else {
        return;
    };
    let bytes = env.encode();
    assert_eq!(Envelope::decode(&bytes).as_ref(), Ok(&env), "round trip");
    // Flags and booleans are the only non-canonical fields: an exact re-encoding otherwise.
    // A keepalive from before capacity reports (8 bytes shorter) re-encodes with a zero one.
    let old_keepalive = matches!(
        env.msg,
        Control::Keepalive {
            capacity_bps: 0,
            ..
        }
    ) && bytes.len() == input.len() + 8
        && bytes.starts_with(input);
    let loose = matches!(env.msg, Control::CatalogReply { .. }) || old_keepalive;
    if !loose {
        assert_eq!(bytes, input, "re-encoding differs");
    }
});
