//! Any bytes as a producer's JSON event: no panic; an event the API accepts converts back to
//! JSON that is accepted as the same event.
#![no_main]

use herald_core::Timestamp;
use herald_server::json::{EventJson, EventOut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<EventJson>(data) else {
        return;
    };
    if let Ok(n) = event.to_notification(Timestamp(1), 1024) {
        let text = serde_json::to_string(&EventOut(&n)).expect("events serialize");
        let back: EventJson = serde_json::from_str(&text).expect("the server's own JSON parses");
        let again = back
            .to_notification(Timestamp(2), 1024)
            .expect("the server's own JSON is accepted");
        assert_eq!(again, n);
    }
});
