//! Any bytes as a ROP request buffer and as a RopsList, in both readings of
//! RopRegisterNotification: no panic; what decodes re-encodes to bytes that decode the same.
#![no_main]

use herald_rop::{RopBuffer, RopRequest, TypesWidth, decode_requests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(buf) = RopBuffer::decode(data) {
        let again = RopBuffer::decode(&buf.encode().expect("a decoded buffer fits")).unwrap();
        assert_eq!(again, buf);
    }
    for width in [TypesWidth::U16, TypesWidth::U8Reserved] {
        let Ok(reqs) = decode_requests(data, width) else {
            continue;
        };
        let mut out = Vec::new();
        for r in &reqs {
            if matches!(r, RopRequest::Unsupported { .. }) {
                break;
            }
            r.encode(&mut out).expect("decoded requests encode");
        }
        let known: Vec<_> = reqs
            .into_iter()
            .filter(|r| !matches!(r, RopRequest::Unsupported { .. }))
            .collect();
        let back = decode_requests(&out, TypesWidth::U16).expect("our own bytes decode");
        if width == TypesWidth::U16 {
            assert_eq!(back, known);
        }
    }
});
