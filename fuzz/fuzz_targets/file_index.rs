//! The index file is read back from the state directory: a corrupt one must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::index::FileIndex;

fuzz_target!(|data: &[u8]| {
    let _ = FileIndex::decode(data);
});
