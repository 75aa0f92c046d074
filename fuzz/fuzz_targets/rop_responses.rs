//! Any bytes as a response RopsList (RopNotify with every NotificationData variant,
//! RopPending, ROP answers): no panic; what decodes re-encodes and decodes the same.
#![no_main]

use herald_rop::decode_responses;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(responses) = decode_responses(data) else {
        return;
    };
    let mut out = Vec::new();
    for r in &responses {
        r.encode(&mut out).expect("a decoded response encodes");
    }
    assert_eq!(
        decode_responses(&out).expect("our own bytes decode"),
        responses
    );
});
