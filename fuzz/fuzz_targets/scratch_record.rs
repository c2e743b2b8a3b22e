//! The receiver's scratch files (the walk and the planned entries) are read back from the
//! state directory: a damaged record must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replicator::apply::decode_scratch_records(data);
});
