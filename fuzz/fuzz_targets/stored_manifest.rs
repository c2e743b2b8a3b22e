//! A stored manifest is read back from the state directory as a delta base: a corrupt one
//! must end in an error, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::manifest::Limits;
use replicator::manifest::store::StoredEntries;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = StoredEntries::new(data, Limits::default()) {
        for entry in entries {
            if entry.is_err() {
                break;
            }
        }
    }
});
