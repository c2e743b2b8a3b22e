//! Authorized-clients and known-peers files are read from disk: any text must parse or be
//! rejected with a message, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::net::identity::TrustList;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TrustList::parse(text);
    }
});
