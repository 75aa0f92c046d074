//! Any bytes as a WebSocket client frame (`ClientFrame`, read with `serde_json::from_slice`
//! as the `/v1/ws` handler reads text frames): no panic; a frame that parses writes back to
//! JSON that parses as the same frame.
#![no_main]

use herald_server::api::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = serde_json::from_slice::<ClientFrame>(data) else {
        return;
    };
    let json = serde_json::to_vec(&frame).expect("a frame serializes");
    let again: ClientFrame = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "the server's own JSON for {frame:?} does not parse: {e}: {}",
            String::from_utf8_lossy(&json)
        )
    });
    // ClientFrame has no PartialEq: compare what each serializes to.
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&frame).unwrap(),
        "{}",
        String::from_utf8_lossy(&json)
    );
});
