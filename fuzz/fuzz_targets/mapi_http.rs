//! Any bytes as MAPI/HTTP bodies (Connect, Execute, NotificationWait, Disconnect,
//! RegisterPushNotification, and the meta-tag response stream): no panic, no allocation beyond
//! the input's size; requests that decode re-encode to bytes that decode the same.
#![no_main]

use herald_rop::mapihttp::{
    ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse, NotificationWaitResponse,
    RegisterPush, ResponseStream, decode_disconnect_request, decode_notification_wait_request,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = ConnectRequest::decode(data) {
        assert_eq!(ConnectRequest::decode(&c.encode().unwrap()).unwrap(), c);
    }
    if let Ok(e) = ExecuteRequest::decode(data) {
        assert_eq!(ExecuteRequest::decode(&e.encode()).unwrap(), e);
    }
    let _ = ConnectResponse::decode(data);
    let _ = ExecuteResponse::decode(data);
    let _ = NotificationWaitResponse::decode(data);
    let _ = decode_notification_wait_request(data);
    let _ = decode_disconnect_request(data);
    let _ = ResponseStream::parse(data);
    if let Ok(p) = RegisterPush::decode(data) {
        // AdviseBits is not kept: it is written as 0xFFFFFFFF whatever was read.
        assert_eq!(RegisterPush::decode(&p.encode()).unwrap(), p);
        let _ = p.target();
    }
});
