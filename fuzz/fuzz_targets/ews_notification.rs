//! Any bytes as a SendNotification body and as a SendNotificationResult: no panic; what parses
//! as notifications writes back to XML that parses to the same notifications.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = herald_ews::parse_send_notification_result(text);
    if let Ok(notifications) = herald_ews::parse_notification(text) {
        for n in notifications {
            let written = herald_ews::send_notification(&n);
            let again = herald_ews::parse_notification(&written).expect("our own output parses");
            assert_eq!(again, vec![n]);
        }
    }
});
