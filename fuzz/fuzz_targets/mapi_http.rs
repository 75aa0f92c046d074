//! Any bytes as MAPI/HTTP bodies (Connect, Execute, NotificationWait, Disconnect, and the
//! meta-tag response stream): no panic, no allocation beyond the input's size.
#![no_main]

use herald_rop::mapihttp::{
    ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse, NotificationWaitResponse,
    ResponseStream, decode_disconnect_request, decode_notification_wait_request,
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
});
