//! The first frame a server reads from a client (version, direction, volume, lanes, options)
//! must decode or fail cleanly, and re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::net::open::Open;

fuzz_target!(|data: &[u8]| {
    if let Ok(open) = Open::decode(data) {
        let again = Open::decode(&open.encode()[4..]).expect("re-decode");
        assert_eq!(again, open);
    }
});
