//! A MAPI/HTTP client for tests, built on `herald-rop`: a cookie jar of one and the handle
//! table it carries between calls, speaking to a running `herald serve` over real sockets.

use herald_rop::mapihttp::{
    CONTEXT_COOKIE, ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse,
    NotificationWaitResponse, ResponseStream, SEQUENCE_COOKIE, cookie_header, parse_set_cookie,
};
use herald_rop::{
    Fid, Logon, NotificationScope, NotificationType, RegisterNotification, RopBuffer, RopNotify,
    RopRequest, RopResponse, decode_responses,
};

use super::{PRODUCER_KEY, Server, client};

pub const ALICE: &str = "alice@example.test";

/// A MAPI/HTTP client: a cookie jar of one, and the handle table it carries between calls.
pub struct Client {
    pub url: String,
    pub user: &'static str,
    pub cookie: Option<String>,
    /// The `MapiSequence` value the server set last (sent back on every request).
    pub sequence: Option<String>,
    pub handles: Vec<u32>,
    pub counter: u32,
}

pub struct Answer {
    pub response_code: u32,
    pub stream: Option<ResponseStream>,
    pub raw: Vec<u8>,
    /// The cookie names the response set.
    pub set_cookies: Vec<String>,
    /// X-ExpirationInfo.
    pub expiration: Option<String>,
}

impl Client {
    pub fn new(server: &Server, user: &'static str) -> Client {
        Client {
            url: server.url(&format!("/mapi/emsmdb/?MailboxId={user}")),
            user,
            cookie: None,
            sequence: None,
            handles: Vec::new(),
            counter: 0,
        }
    }

    pub async fn post(&mut self, request_type: &str, body: Vec<u8>) -> Answer {
        self.counter += 1;
        let mut req = client()
            .post(&self.url)
            .basic_auth(
                self.user,
                Some(if self.user == ALICE {
                    "alice-pw"
                } else {
                    "bob-pw"
                }),
            )
            .header("content-type", "application/mapi-http")
            .header("x-requesttype", request_type)
            .header(
                "x-requestid",
                format!("{{E2EA6C1C-E61B-49E9-9CFB-38184F907552}}:{}", self.counter),
            )
            .header("x-clientinfo", "{2F94A2BF-A2E6-4CCC-BF98-B5F22C542226}:1")
            .body(body);
        if let Some(h) = cookie_header(self.cookie.as_deref(), self.sequence.as_deref()) {
            req = req.header("cookie", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-requesttype"], request_type);
        let response_code: u32 = r.headers()["x-responsecode"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let expiration = r
            .headers()
            .get("x-expirationinfo")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut set_cookies = Vec::new();
        for set in r.headers().get_all("set-cookie") {
            let (name, value) = parse_set_cookie(set.to_str().unwrap()).unwrap();
            set_cookies.push(name.to_owned());
            let value = value.map(str::to_owned);
            match name {
                CONTEXT_COOKIE => self.cookie = value,
                SEQUENCE_COOKIE => self.sequence = value,
                other => panic!("an unexpected cookie {other}"),
            }
        }
        let raw = r.bytes().await.unwrap().to_vec();
        let stream = (response_code == 0).then(|| {
            assert!(
                raw.starts_with(b"PROCESSING\r\n"),
                "{:?}",
                String::from_utf8_lossy(&raw)
            );
            ResponseStream::parse(&raw).unwrap()
        });
        Answer {
            response_code,
            stream,
            raw,
            set_cookies,
            expiration,
        }
    }

    pub async fn connect(&mut self) -> ConnectResponse {
        let body = ConnectRequest {
            user_dn: "/o=Herald/cn=Recipients/cn=alice".into(),
            flags: 0,
            code_page: 1252,
            lcid_sort: 0x409,
            lcid_string: 0x409,
            aux: vec![],
        }
        .encode()
        .unwrap();
        let a = self.post("Connect", body).await;
        assert_eq!(a.response_code, 0);
        ConnectResponse::decode(&a.stream.unwrap().body)
            .unwrap()
            .unwrap()
    }

    /// Runs ROPs; returns the answers (and keeps the returned handle table).
    pub async fn execute_with(
        &mut self,
        rops: &[RopRequest],
        max_rop_out: u32,
    ) -> Vec<RopResponse> {
        let mut bytes = Vec::new();
        for r in rops {
            r.encode(&mut bytes).unwrap();
        }
        let mut handles = self.handles.clone();
        handles.resize(handles.len().max(8), u32::MAX);
        let rop_buffer = RopBuffer {
            rops: bytes,
            handles,
        }
        .encode()
        .unwrap();
        let a = self
            .post("Execute", execute_body(rop_buffer, max_rop_out))
            .await;
        assert_eq!(a.response_code, 0, "{}", String::from_utf8_lossy(&a.raw));
        let resp = ExecuteResponse::decode(&a.stream.unwrap().body)
            .unwrap()
            .unwrap();
        assert_eq!(resp.error_code, 0);
        let buf = RopBuffer::decode(&resp.rop_buffer).unwrap();
        self.handles = buf.handles;
        decode_responses(&buf.rops).unwrap()
    }

    /// Sends an Execute body and reads its answer (`Err(status)` for a failure body).
    pub async fn execute_raw(&mut self, body: Vec<u8>) -> Result<ExecuteResponse, u32> {
        let a = self.post("Execute", body).await;
        ExecuteResponse::decode(&a.stream.unwrap().body).unwrap()
    }

    pub async fn execute(&mut self, rops: &[RopRequest]) -> Vec<RopResponse> {
        self.execute_with(rops, 0x10008).await
    }

    pub async fn wait(&mut self) -> (NotificationWaitResponse, usize) {
        let a = self
            .post(
                "NotificationWait",
                herald_rop::mapihttp::notification_wait_request(),
            )
            .await;
        assert_eq!(a.response_code, 0);
        let s = a.stream.unwrap();
        (
            NotificationWaitResponse::decode(&s.body).unwrap().unwrap(),
            s.pendings,
        )
    }

    /// Logs on (logon 0 at slot 0) and returns the 13 logon folders.
    pub async fn logon(&mut self) -> [Fid; 13] {
        let answers = self
            .execute(&[RopRequest::Logon(Logon {
                logon_id: 0,
                output_handle_index: 0,
                logon_flags: 1,
                open_flags: 0x0100_0000,
                store_state: 0,
                essdn: "/o=Herald/cn=Recipients/cn=alice".into(),
            })])
            .await;
        let [RopResponse::Logon { success, .. }] = &answers[..] else {
            panic!("{answers:?}")
        };
        success.folder_ids
    }
}

/// An Execute request body (NoCompression, NoXorMagic, no auxiliary blocks).
pub fn execute_body(rop_buffer: Vec<u8>, max_rop_out: u32) -> Vec<u8> {
    ExecuteRequest {
        flags: 3,
        rop_buffer,
        max_rop_out,
        aux: vec![],
    }
    .encode()
}

pub async fn publish_to(base: &str, events: serde_json::Value) {
    let r = client()
        .post(format!("{base}/v1/events"))
        .bearer_auth(PRODUCER_KEY)
        .json(&serde_json::json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

pub fn created_in(folder: &str, name: &str) -> serde_json::Value {
    serde_json::json!({"key": format!("{folder}/{name}"), "kind": "object_created", "object_type": "message", "parent": folder})
}

pub fn notifies(answers: &[RopResponse]) -> Vec<&RopNotify> {
    answers
        .iter()
        .filter_map(|a| match a {
            RopResponse::Notify(n) => Some(&**n),
            _ => None,
        })
        .collect()
}

pub fn register(input: u8, output: u8, types: u16, scope: NotificationScope) -> RopRequest {
    RopRequest::RegisterNotification(RegisterNotification {
        logon_id: 0,
        input_handle_index: input,
        output_handle_index: output,
        types,
        scope,
    })
}

pub const CREATED: u16 = NotificationType::ObjectCreated as u16;
