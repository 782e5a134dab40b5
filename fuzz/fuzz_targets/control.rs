//! Control datagrams (`Envelope`, both directions of the control port): decoding never panics,
//! and whatever decodes re-encodes to a datagram that decodes to the same message. The input
//! is also offered as an edge's delegation certificate (carried in `JoinOk`, and read from
//! `[server] delegations` files): it decodes only to what re-encodes to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcast::delegation::Delegation;
use mcast::wire::control::{is_play_request, Control, Envelope, FLAG_MAC, FLAG_PADDED};

fuzz_target!(|input: &[u8]| {
    if let Ok(d) = Delegation::decode(input) {
        assert_eq!(d.encode(), input, "delegation re-encoding differs");
        let _ = d.check(&d.origin.clone(), d.not_after);
    }
    let _ = is_play_request(input);
    let Ok(env) = Envelope::decode(input) else {
        return;
    };
    let bytes = env.encode();
    assert_eq!(Envelope::decode(&bytes).as_ref(), Ok(&env), "round trip");
    // Padding and a session MAC are not part of the message: a padded request re-encodes
    // exactly at its own length, a sealed one (its MAC is checked by the key's holder, not
    // by decode) without its trailer.
    let flags = input.get(2).copied().unwrap_or(0);
    if flags & FLAG_MAC != 0 {
        return;
    }
    let bytes = if flags & FLAG_PADDED != 0 {
        env.encode_padded(input.len())
    } else {
        bytes
    };
    // Booleans are the only other non-canonical fields: an exact re-encoding otherwise.
    if !matches!(env.msg, Control::CatalogReply { .. }) {
        assert_eq!(bytes, input, "re-encoding differs");
    }
});
