//! Any bytes as an EWS request: parsing ends in a value or a typed error, never a panic, and
//! stays within the size and depth limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herald_ews::parse_request(text);
    }
});
