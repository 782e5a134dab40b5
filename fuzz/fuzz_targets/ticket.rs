//! Play tickets and key parts: the signed ticket a receiver presents (`Ticket`), the ticket
//! file a viewer holds (`TicketFile`, armored or raw), the server's judgement of a presented
//! ticket (`mcast::ticket::check`), a grant's sealed part and a database row's wrapped part.
//!
//! The whole input is offered to every decoder. Oracles: no panic; what decodes re-encodes to
//! exactly its bytes (armor: to the same ticket file); a ticket the server accepts verifies
//! under the fixture identity and names the title asked for.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mcast_fuzz_common::{identity, DB_KEY};
use mcast_keys::seal::{DbKey, ReceiverKey};
use mcast_keys::ticket::{Ticket, TicketFile};
use zeroize::Zeroizing;

fn receiver_key() -> &'static ReceiverKey {
    static K: OnceLock<ReceiverKey> = OnceLock::new();
    K.get_or_init(ReceiverKey::generate)
}

fuzz_target!(|input: &[u8]| {
    let trusted = identity().public();
    if let Ok(t) = Ticket::decode(input) {
        assert_eq!(t.encode(), input, "ticket re-encoding differs");
        let _ = t.verify(&trusted);
        for now in [0, t.issued_unix, t.expires_unix, u64::MAX] {
            if let Ok(c) = mcast::ticket::check(&t.title, input, now, &trusted) {
                assert!(t.verify(&trusted).is_ok());
                assert_eq!(c.title, t.title);
                assert!(t.expires_unix == 0 || now < t.expires_unix);
            }
        }
    }
    let _ = mcast::ticket::check("fuzz", input, 1, &trusted);
    if let Ok(f) = TicketFile::decode(input) {
        assert_eq!(&*f.encode(), input, "ticket file re-encoding differs");
        let _ = f.verify(&trusted);
        let armored = f.to_armor();
        let back = TicketFile::from_file_bytes(armored.as_bytes()).expect("own armor decodes");
        assert_eq!(back, f);
    }
    if let Ok(f) = TicketFile::from_file_bytes(input) {
        let _ = f.verify(&trusted);
    }
    let _ = TicketFile::dearmor(input);
    // Sealed and wrapped key parts: any bytes, any ids.
    let id: [u8; 16] = input.get(..16).map_or([0; 16], |s| s.try_into().unwrap());
    let _ = receiver_key().open_part(&id, input);
    let _ = DbKey::from_bytes(Zeroizing::new(DB_KEY)).unwrap(&id, &[0; 16], input);
});
