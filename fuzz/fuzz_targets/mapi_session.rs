//! Sequences of MAPI/HTTP requests from two clients (Connect, Execute with ROP lists,
//! NotificationWait, Disconnect, PING, RegisterPushNotification, raw bodies, stale and
//! foreign cookies), interleaved with events published for their mailboxes, sent through the
//! router of a real server at `/mapi/emsmdb/`.
//!
//! What must hold for every answer: no panic anywhere (request handlers or session tasks), no
//! 5xx, an `X-ResponseCode` (save the 401 Basic challenge of bad credentials), the request
//! type echoed; a response code of 0 comes with a meta-tag stream that parses, and the
//! Connect, Execute and NotificationWait bodies in it are ones our own client decodes —
//! down to every ROP answer and RopNotify of an Execute. A NotificationWait ends within the
//! (tiny) notification timer; none of it waits on real time beyond that.
#![no_main]

use std::net::UdpSocket;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use herald_core::Key;
use herald_fuzz::Harness;
use herald_rop::mapihttp::{
    self, ConnectRequest, ConnectResponse, ExecuteRequest, ExecuteResponse,
    NotificationWaitResponse, RegisterPush, ResponseStream,
};
use herald_rop::{
    GlobalId, HEADER_LAST, HEADER_XOR_MAGIC, Logon, NotificationScope, OpenFolder,
    RegisterNotification, Release, RopBuffer, RopRequest, decode_responses,
};
use herald_server::mapi::map::{LOGON_FOLDERS, id_of};
use libfuzzer_sys::fuzz_target;

const USERS: [(&str, &str); 2] = [
    ("alice@example.test", "alice-pw"),
    ("bob@example.test", "bob-pw"),
];
const PRODUCER_KEY: &str = "producer-key-0123456789";
/// Most steps one input runs (a longer sequence adds little but time).
const MAX_STEPS: usize = 24;
/// Longer than any answer may take with the timers below.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

struct Fixture {
    harness: Harness,
    /// Where loopback UDP pushes go, so that none leaves the machine (it is never read).
    udp: UdpSocket,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let harness = Harness::new(|c| {
            c.auth.keys = vec![PRODUCER_KEY.to_owned()];
            // Stored as argon2 hashes (plain text is refused); a good password is verified
            // once and then remembered, so requests stay cheap.
            c.auth.users = USERS
                .iter()
                .map(|(u, p)| {
                    let hash = herald_server::auth::hash_password(p).expect("a password hash");
                    ((*u).to_owned(), hash)
                })
                .collect();
            c.mapi.notification_wait = Duration::from_millis(5);
            c.mapi.pending_period = Duration::from_millis(2);
            c.mapi.session_idle = Duration::from_millis(50);
            c.mapi.udp_repeat = Duration::from_millis(20);
            c.mapi.max_queue_bytes = 4096;
            c.mapi.max_registrations = 8;
            c.mapi.max_sessions_per_user = 3;
        });
        let udp = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        Fixture { harness, udp }
    })
}

/// Which of the two clients (Alice's, Bob's) acts.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    Alice,
    Bob,
}

/// The cookie a request carries.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cookie {
    Own,
    None,
    /// The other client's session.
    Other,
    /// A session id that never existed.
    Unknown,
}

/// The credentials a request carries (good three times in four).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Credentials {
    Good,
    Good2,
    Good3,
    /// A user Herald does not know: the Basic challenge, not a MAPI answer. (Not a known
    /// user's wrong password: each would cost an argon2 verification, tens of milliseconds.)
    Bad,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mailbox {
    Own,
    Other,
    Missing,
    Uppercase,
}

/// A folder id: a logon folder of either mailbox, or any id.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Folder {
    Logon(bool, u8),
    Raw(u16, u64),
}

impl Folder {
    fn mailbox(own: &str, other: bool) -> &'static str {
        let alice = USERS[0].0;
        let bob = USERS[1].0;
        match (own == alice, other) {
            (true, false) | (false, true) => alice,
            _ => bob,
        }
    }

    fn key(self, own: &str) -> Option<String> {
        match self {
            Folder::Logon(other, i) => {
                let mailbox = Folder::mailbox(own, other);
                let name = LOGON_FOLDERS[usize::from(i) % LOGON_FOLDERS.len()];
                Some(if name.is_empty() {
                    mailbox.to_owned()
                } else {
                    format!("{mailbox}/{name}")
                })
            }
            Folder::Raw(..) => None,
        }
    }

    fn id(self, own: &str) -> GlobalId {
        match self.key(own) {
            Some(k) => id_of(&Key::from(k.as_str())),
            None => {
                let Folder::Raw(replica, counter) = self else {
                    unreachable!()
                };
                GlobalId::new(replica, counter)
            }
        }
    }
}

/// A handle index: mostly one of the first few slots, now and then any.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Slot(u8);

impl Slot {
    fn get(self) -> u8 {
        if self.0 >= 0xF0 { self.0 } else { self.0 % 8 }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Scope {
    WholeStore,
    Folder(Folder),
    Message(Folder, u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Rop {
    Logon {
        logon_id: u8,
        out: Slot,
        private: bool,
        flags: u8,
        essdn: Option<String>,
    },
    OpenFolder {
        logon_id: u8,
        input: Slot,
        out: Slot,
        folder: Folder,
        mode: u8,
    },
    Register {
        logon_id: u8,
        input: Slot,
        out: Slot,
        types: u16,
        scope: Scope,
    },
    Release {
        logon_id: u8,
        input: Slot,
    },
    /// A RopId Herald does not serve (reading stops there).
    Unknown([u8; 3]),
    /// Bytes as they come.
    Raw(Vec<u8>),
}

impl Rop {
    fn encode(&self, own: &str, out: &mut Vec<u8>) {
        let small = |id: u8| id % 4;
        let rop = match self {
            Rop::Logon {
                logon_id,
                out: slot,
                private,
                flags,
                essdn,
            } => RopRequest::Logon(Logon {
                logon_id: small(*logon_id),
                output_handle_index: slot.get(),
                logon_flags: if *private { flags | 1 } else { flags & !1 },
                open_flags: 0x0100_0000,
                store_state: 0,
                essdn: essdn
                    .clone()
                    .unwrap_or_else(|| "/o=Herald/cn=Recipients/cn=x".to_owned()),
            }),
            Rop::OpenFolder {
                logon_id,
                input,
                out: slot,
                folder,
                mode,
            } => RopRequest::OpenFolder(OpenFolder {
                logon_id: small(*logon_id),
                input_handle_index: input.get(),
                output_handle_index: slot.get(),
                folder_id: folder.id(own),
                open_mode_flags: *mode,
            }),
            Rop::Register {
                logon_id,
                input,
                out: slot,
                types,
                scope,
            } => RopRequest::RegisterNotification(RegisterNotification {
                logon_id: small(*logon_id),
                input_handle_index: input.get(),
                output_handle_index: slot.get(),
                types: *types,
                scope: match *scope {
                    Scope::WholeStore => NotificationScope::WholeStore,
                    Scope::Folder(f) => NotificationScope::Folder(f.id(own)),
                    Scope::Message(f, m) => {
                        NotificationScope::Message(f.id(own), GlobalId::new(1, m.max(1)))
                    }
                },
            }),
            Rop::Release { logon_id, input } => RopRequest::Release(Release {
                logon_id: small(*logon_id),
                input_handle_index: input.get(),
            }),
            Rop::Unknown(b) => {
                out.extend_from_slice(b);
                return;
            }
            Rop::Raw(b) => {
                out.extend_from_slice(b);
                return;
            }
        };
        // A Logon whose DN is not ASCII does not encode: then it is left out.
        let _ = rop.encode(out);
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum MaxRopOut {
    Usual,
    Small(u8),
    Any(u32),
}

/// A request body: well formed from the fields, or bytes as they come.
#[derive(Arbitrary, Debug, Clone)]
enum Payload<T> {
    Valid(T),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone)]
struct ExecuteParts {
    rops: Vec<Rop>,
    /// Slots the client overwrites in the handle table it sends back.
    handle_overrides: Vec<(Slot, u32)>,
    xor: bool,
    bare_poll: bool,
    max_rop_out: MaxRopOut,
    flags: u32,
    aux: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PushTarget {
    /// The fixture's own socket.
    Loopback,
    /// A private address the egress policy refuses.
    Private,
    /// A family Herald does not take.
    BadFamily(u16),
    /// The right family with the wrong size.
    Truncated,
}

#[derive(Arbitrary, Debug, Clone)]
enum Req {
    Connect(Payload<(Option<String>, u32)>, Mailbox),
    Execute(Payload<ExecuteParts>),
    NotificationWait(Payload<()>),
    Disconnect(Payload<()>),
    Ping,
    RegisterPush(Payload<(Vec<u8>, PushTarget)>),
    /// Any request type, any body.
    Other(String, Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    NewMail,
    Created,
    Modified,
    Deleted,
    Moved,
    SearchComplete,
    FolderCreated,
}

#[derive(Arbitrary, Debug, Clone)]
enum Step {
    Send {
        who: Who,
        cookie: Cookie,
        credentials: Credentials,
        request: Req,
    },
    /// Two requests at once (a NotificationWait beside an Execute is what clients do).
    Both { a: (Who, Req), b: (Who, Req) },
    /// A producer publishes events for a mailbox.
    Publish {
        who: Who,
        folder: Folder,
        kinds: Vec<(Kind, u8)>,
    },
    /// The idle sweep runs.
    Expire,
    /// An operator kicks a client's session.
    Kick(Who),
    /// Time passes (a few milliseconds: past the timers).
    Pause(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    steps: Vec<Step>,
}

/// One client: its user, its session cookie, and the handle table it carries between calls.
#[derive(Default, Clone)]
struct Client {
    cookie: Option<String>,
    /// The `MapiSequence` value the server set last.
    sequence: Option<String>,
    handles: Vec<u32>,
}

struct Run<'a> {
    f: &'a Fixture,
    clients: [Client; 2],
    counter: u32,
}

fn user(who: Who) -> (&'static str, &'static str) {
    USERS[who as usize]
}

impl Run<'_> {
    /// Builds the HTTP request of a MAPI request.
    fn build(
        &mut self,
        who: Who,
        cookie: Cookie,
        credentials: Credentials,
        request: &Req,
    ) -> (String, Request<Body>) {
        let (name, password) = user(who);
        let own = self.clients[who as usize].clone();
        let mut mailbox = Some(name.to_owned());
        let (request_type, body): (String, Vec<u8>) = match request {
            Req::Connect(b, m) => {
                mailbox = match m {
                    Mailbox::Own => Some(name.to_owned()),
                    Mailbox::Other => Some(user(other(who)).0.to_owned()),
                    Mailbox::Missing => None,
                    Mailbox::Uppercase => Some(name.to_ascii_uppercase()),
                };
                let body = match b {
                    Payload::Valid((dn, flags)) => ConnectRequest {
                        user_dn: dn
                            .clone()
                            .unwrap_or_else(|| "/o=Herald/cn=Recipients/cn=x".to_owned()),
                        flags: *flags,
                        code_page: 1252,
                        lcid_sort: 0x409,
                        lcid_string: 0x409,
                        aux: vec![],
                    }
                    .encode()
                    .unwrap_or_default(),
                    Payload::Raw(raw) => raw.clone(),
                };
                ("Connect".into(), body)
            }
            Req::Execute(b) => ("Execute".into(), execute_body(b, name, &own.handles)),
            Req::NotificationWait(b) => (
                "NotificationWait".into(),
                match b {
                    Payload::Valid(()) => mapihttp::notification_wait_request(),
                    Payload::Raw(raw) => raw.clone(),
                },
            ),
            Req::Disconnect(b) => (
                "Disconnect".into(),
                match b {
                    Payload::Valid(()) => Vec::new(),
                    Payload::Raw(raw) => raw.clone(),
                },
            ),
            Req::Ping => ("PING".into(), Vec::new()),
            Req::RegisterPush(b) => (
                "RegisterPushNotification".into(),
                match b {
                    Payload::Valid((context, target)) => RegisterPush {
                        context: context.clone(),
                        advise_bits: herald_rop::mapihttp::ADVISE_BITS_ALL,
                        address: self.address(*target),
                    }
                    .encode(),
                    Payload::Raw(raw) => safe_push_body(self.f, raw),
                },
            ),
            Req::Other(t, raw) => {
                let body = if t.eq_ignore_ascii_case("registerpushnotification") {
                    safe_push_body(self.f, raw)
                } else {
                    raw.clone()
                };
                (t.clone(), body)
            }
        };
        self.counter += 1;
        let uri = match mailbox {
            Some(m) => format!("/mapi/emsmdb/?MailboxId={m}"),
            None => "/mapi/emsmdb/".to_owned(),
        };
        let mut req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/mapi-http")
            .header(
                "x-requestid",
                format!("{{E2EA6C1C-E61B-49E9-9CFB-38184F907552}}:{}", self.counter),
            )
            .header("x-clientinfo", "{2F94A2BF-A2E6-4CCC-BF98-B5F22C542226}:1");
        if let Ok(v) = header::HeaderValue::from_str(&request_type) {
            req = req.header("x-requesttype", v);
        }
        let (name, password) = match credentials {
            Credentials::Bad => ("mallory@example.test", "pw"),
            _ => (name, password),
        };
        req = req.header(
            header::AUTHORIZATION,
            format!("Basic {}", base64(&format!("{name}:{password}"))),
        );
        let cookie = match cookie {
            Cookie::Own => own.cookie.clone(),
            Cookie::None => None,
            Cookie::Other => self.clients[other(who) as usize].cookie.clone(),
            Cookie::Unknown => Some("0123456789abcdef0123456789abcdef".to_owned()),
        };
        // The session cookie, and the sequence value this client was given last (a foreign
        // session's Execute is then refused as out of sequence, as it would be).
        if let Some(h) = mapihttp::cookie_header(cookie.as_deref(), own.sequence.as_deref()) {
            req = req.header(header::COOKIE, h);
        }
        (request_type, req.body(Body::from(body)).unwrap())
    }

    /// A SOCKADDR for a push target; never a routable address.
    fn address(&self, target: PushTarget) -> Vec<u8> {
        match target {
            PushTarget::Loopback => {
                RegisterPush::sockaddr(self.f.udp.local_addr().expect("an address"))
            }
            PushTarget::Private => RegisterPush::sockaddr("10.0.0.1:9".parse().unwrap()),
            PushTarget::BadFamily(family) => {
                let mut a = RegisterPush::sockaddr("127.0.0.1:9".parse().unwrap());
                a[..2].copy_from_slice(&family.to_le_bytes());
                if matches!(family, mapihttp::AF_INET | mapihttp::AF_INET6) {
                    a.truncate(3);
                }
                a
            }
            PushTarget::Truncated => {
                let mut a = RegisterPush::sockaddr("127.0.0.1:9".parse().unwrap());
                a.pop();
                a
            }
        }
    }

    /// Checks one answer and keeps what the client would keep (cookie, handle table).
    fn answer(
        &mut self,
        who: Who,
        request_type: &str,
        status: StatusCode,
        headers: &header::HeaderMap,
        body: &[u8],
    ) {
        let what = format!("{request_type} by {who:?}");
        if trace() {
            eprintln!(
                "{what}: {status} X-ResponseCode {:?}, {} bytes",
                headers.get("x-responsecode"),
                body.len()
            );
        }
        assert!(!status.is_server_error(), "{what}: {status}");
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                headers.contains_key(header::WWW_AUTHENTICATE),
                "{what}: 401 without a challenge"
            );
            return;
        }
        assert_eq!(status, StatusCode::OK, "{what}");
        let code: u32 = headers
            .get("x-responsecode")
            .unwrap_or_else(|| panic!("{what}: no X-ResponseCode"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{what}: X-ResponseCode: {e}"));
        if let Ok(expected) = header::HeaderValue::from_str(request_type) {
            if !request_type.is_empty() {
                assert_eq!(headers.get("x-requesttype"), Some(&expected), "{what}");
            }
        }
        if code != 0 {
            return;
        }
        let stream = ResponseStream::parse(body).unwrap_or_else(|e| {
            panic!(
                "{what}: the response stream does not parse: {e}: {:?}",
                String::from_utf8_lossy(body)
            )
        });
        let client = &mut self.clients[who as usize];
        for set in headers.get_all(header::SET_COOKIE) {
            let v = set.to_str().expect("a cookie in ASCII");
            let (name, value) =
                mapihttp::parse_set_cookie(v).unwrap_or_else(|| panic!("{what}: Set-Cookie {v}"));
            let value = value.map(str::to_owned);
            match name {
                mapihttp::CONTEXT_COOKIE => {
                    client.cookie = value;
                    client.handles.clear();
                }
                mapihttp::SEQUENCE_COOKIE => client.sequence = value,
                _ => panic!("{what}: Set-Cookie {v}"),
            }
        }
        match request_type.to_ascii_lowercase().as_str() {
            "connect" => {
                let _ = ConnectResponse::decode(&stream.body)
                    .unwrap_or_else(|e| panic!("{what}: the Connect body does not decode: {e}"));
            }
            "execute" => {
                let Ok(resp) = ExecuteResponse::decode(&stream.body)
                    .unwrap_or_else(|e| panic!("{what}: the Execute body does not decode: {e}"))
                else {
                    return;
                };
                if resp.error_code != 0 {
                    assert!(
                        resp.rop_buffer.is_empty(),
                        "{what}: an error with a ROP buffer"
                    );
                    return;
                }
                let buf = RopBuffer::decode(&resp.rop_buffer)
                    .unwrap_or_else(|e| panic!("{what}: the ROP buffer does not decode: {e}"));
                let answers = decode_responses(&buf.rops).unwrap_or_else(|e| {
                    panic!(
                        "{what}: the ROP answers do not decode: {e}: {:02x?}",
                        buf.rops
                    )
                });
                if trace() {
                    eprintln!("  {answers:?}");
                }
                client.handles = buf.handles;
            }
            "notificationwait" => {
                let _ = NotificationWaitResponse::decode(&stream.body).unwrap_or_else(|e| {
                    panic!("{what}: the NotificationWait body does not decode: {e}")
                });
            }
            _ => {}
        }
    }

    async fn send(
        &self,
        request_type: String,
        req: Request<Body>,
    ) -> (String, StatusCode, header::HeaderMap, Vec<u8>) {
        let resp = self.f.harness.send(req).await;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(ANSWER_LIMIT, axum::body::to_bytes(body, 1 << 20))
            .await
            .unwrap_or_else(|_| panic!("the answer to {request_type} did not end"))
            .expect("the body reads");
        (request_type, parts.status, parts.headers, body.to_vec())
    }

    fn step(&mut self, step: &Step) {
        let f = self.f;
        match step {
            Step::Send {
                who,
                cookie,
                credentials,
                request,
            } => {
                let (t, req) = self.build(*who, *cookie, *credentials, request);
                let (t, status, headers, body) = f.harness.rt.block_on(self.send(t, req));
                self.answer(*who, &t, status, &headers, &body);
            }
            Step::Both { a, b } => {
                let (ta, ra) = self.build(a.0, Cookie::Own, Credentials::Good, &a.1);
                let (tb, rb) = self.build(b.0, Cookie::Own, Credentials::Good, &b.1);
                let (x, y) = f
                    .harness
                    .rt
                    .block_on(async { tokio::join!(self.send(ta, ra), self.send(tb, rb)) });
                self.answer(a.0, &x.0, x.1, &x.2, &x.3);
                self.answer(b.0, &y.0, y.1, &y.2, &y.3);
            }
            Step::Publish { who, folder, kinds } => {
                let (name, _) = user(*who);
                let parent = folder.key(name).unwrap_or_else(|| format!("{name}/inbox"));
                let events: Vec<serde_json::Value> = kinds
                    .iter()
                    .take(8)
                    .map(|(kind, n)| event(&parent, *kind, *n))
                    .collect();
                if events.is_empty() {
                    return;
                }
                let req = Request::post("/v1/events")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::AUTHORIZATION, format!("Bearer {PRODUCER_KEY}"))
                    .body(Body::from(
                        serde_json::json!({ "events": events }).to_string(),
                    ))
                    .unwrap();
                let (resp, body) = f.harness.call_read(req, ANSWER_LIMIT);
                assert!(
                    resp.status().is_success(),
                    "publishing: {} {}",
                    resp.status(),
                    String::from_utf8_lossy(&body)
                );
            }
            Step::Expire => {
                f.harness.state.mapi().expire();
            }
            Step::Kick(who) => {
                if let Some(c) = &self.clients[*who as usize].cookie {
                    f.harness.state.mapi().kick(&format!("mapi-{c}"));
                }
            }
            Step::Pause(ms) => {
                let d = Duration::from_millis(u64::from(ms % 8));
                f.harness.rt.block_on(async { tokio::time::sleep(d).await });
            }
        }
    }
}

/// `HERALD_FUZZ_TRACE=1`: every answer is printed (to see what an input does).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("HERALD_FUZZ_TRACE").is_some())
}

fn other(who: Who) -> Who {
    match who {
        Who::Alice => Who::Bob,
        Who::Bob => Who::Alice,
    }
}

/// A RegisterPushNotification body as it came, unless the server would send datagrams to the
/// address it names: then to the fixture's own socket instead. Fuzzing sends nothing anywhere
/// else, not even to another port of this machine.
fn safe_push_body(f: &Fixture, raw: &[u8]) -> Vec<u8> {
    let Ok(mut r) = RegisterPush::decode(raw) else {
        return raw.to_vec();
    };
    match r.target() {
        Ok(addr) if f.harness.state.egress().check(addr.ip()).is_ok() => {
            r.address = RegisterPush::sockaddr(f.udp.local_addr().expect("an address"));
            r.encode()
        }
        _ => raw.to_vec(),
    }
}

fn execute_body(b: &Payload<ExecuteParts>, own: &str, handles: &[u32]) -> Vec<u8> {
    let p = match b {
        Payload::Valid(p) => p,
        Payload::Raw(raw) => return raw.clone(),
    };
    let rop_buffer = if p.bare_poll {
        Vec::new()
    } else {
        let mut rops = Vec::new();
        for r in p.rops.iter().take(32) {
            r.encode(own, &mut rops);
        }
        let mut handles = handles.to_vec();
        handles.resize(handles.len().max(8), u32::MAX);
        for (slot, h) in p.handle_overrides.iter().take(4) {
            let i = usize::from(slot.get());
            if handles.len() <= i {
                handles.resize(i + 1, u32::MAX);
            }
            handles[i] = *h;
        }
        let Ok(mut buf) = (RopBuffer { rops, handles }).encode() else {
            return Vec::new();
        };
        if p.xor {
            buf[2..4].copy_from_slice(&(HEADER_LAST | HEADER_XOR_MAGIC).to_le_bytes());
            for b in &mut buf[8..] {
                *b ^= 0xA5;
            }
        }
        buf
    };
    ExecuteRequest {
        flags: p.flags,
        rop_buffer,
        max_rop_out: match p.max_rop_out {
            MaxRopOut::Usual => 0x10008,
            MaxRopOut::Small(n) => u32::from(n),
            MaxRopOut::Any(n) => n,
        },
        aux: p.aux.iter().copied().take(0x1010).collect(),
    }
    .encode()
}

fn event(parent: &str, kind: Kind, n: u8) -> serde_json::Value {
    let key = format!("{parent}/m-{}", n % 4);
    match kind {
        Kind::NewMail => {
            serde_json::json!({"key": key, "kind": "new_mail", "parent": parent, "message_class": "IPM.Note"})
        }
        Kind::Created => {
            serde_json::json!({"key": key, "kind": "object_created", "object_type": "message", "parent": parent})
        }
        Kind::Modified => {
            serde_json::json!({"key": key, "kind": "object_modified", "object_type": "message", "parent": parent, "changed_props": [0x0E070003u32]})
        }
        Kind::Deleted => {
            serde_json::json!({"key": key, "kind": "object_deleted", "object_type": "message", "parent": parent})
        }
        Kind::Moved => {
            serde_json::json!({"key": key, "kind": "object_moved", "object_type": "message", "parent": parent, "old_key": format!("{parent}/old-{n}"), "old_parent": parent})
        }
        Kind::SearchComplete => {
            serde_json::json!({"key": parent, "kind": "search_complete"})
        }
        Kind::FolderCreated => {
            serde_json::json!({"key": format!("{parent}/sub-{}", n % 4), "kind": "object_created", "object_type": "folder", "parent": parent, "total_count": n, "unread_count": 0})
        }
    }
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let mut run = Run {
        f,
        clients: Default::default(),
        counter: 0,
    };
    for step in input.steps.iter().take(MAX_STEPS) {
        run.step(step);
    }
    // The next input starts without sessions: end them, and let their tasks finish (their
    // quota permits go with them).
    f.harness.state.mapi().stop_all();
    f.harness
        .rt
        .block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
});
