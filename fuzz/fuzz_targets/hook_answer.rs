//! Any bytes as an external hook's answer: no panic; an answer that parses serializes back to
//! JSON that parses as the same answer.
#![no_main]

use herald_server::hooks::HookAnswer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<HookAnswer>(data) else {
        return;
    };
    let json = serde_json::to_vec(&answer).expect("an answer serializes");
    let again: HookAnswer = serde_json::from_slice(&json).expect("its own JSON parses");
    assert_eq!(again, answer);
});
