//! Any bytes a peer sends as a frame body must decode to a message or an error, never panic,
//! and a decoded message must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::manifest::Limits;
use replicator::protocol::message::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode_body(data, &Limits::default()) {
        let again =
            Message::decode_body(&msg.encode_body(), &Limits::default()).expect("re-decode");
        assert_eq!(again, msg);
    }
});
