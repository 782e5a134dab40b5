//! NAK datagrams (heard on the control port and on every channel's group): decoding never
//! panics, round-trips, and a decoded NAK's units can be walked in bounded time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcast::wire::nak::{is_nak, to_ranges, Nak};

fuzz_target!(|input: &[u8]| {
    let _ = is_nak(input);
    let Ok(n) = Nak::decode(input) else {
        return;
    };
    assert_eq!(Nak::decode(&n.encode()).as_ref(), Ok(&n), "round trip");
    // Each range ends inside u64 (decode refuses overflow), so its units are well defined.
    for &(first, len) in &n.ranges {
        assert!(first.checked_add(len as u64).is_some());
    }
    // The first few units compress back into ranges covering them.
    let units: Vec<u64> = n.units().take(1024).collect();
    let mut sorted = units.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let r = to_ranges(sorted.iter().copied());
    assert_eq!(
        r.iter().map(|&(_, l)| l as usize).sum::<usize>(),
        sorted.len()
    );
});
