//! Manifest headers and entries from a file or a peer: decode or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::codec::Reader;
use replicator::manifest::{Limits, decode_entry, decode_header, encode_entry};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(&mut Reader::new(data));
    let mut r = Reader::new(data);
    while let Ok(e) = decode_entry(&mut r, &Limits::default()) {
        let bytes = encode_entry(&e);
        let back = decode_entry(&mut Reader::new(&bytes), &Limits::default()).expect("re-decode");
        assert_eq!(back, e);
    }
});
