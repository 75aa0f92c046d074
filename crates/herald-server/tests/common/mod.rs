//! A real `herald serve` process on a free loopback port, and small clients for it.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

pub mod mapi;

pub const WAIT: Duration = Duration::from_secs(15);

/// A running server, killed on drop.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

impl Server {
    /// Starts a server on a fresh data directory.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, &[], &[]);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `data_dir` with extra flags and environment.
    pub fn start_in(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_on(herald_testkit::free_port().unwrap(), data_dir, args, env)
    }

    /// Starts a server on a given port (to bring one back where clients expect it).
    pub fn start_on(port: u16, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = herald();
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("HERALD_LOG", "warn")
            // Most tests count watermarks from 1; presence events would take some. The
            // connection tests turn it on.
            .env("HERALD_CONNECTIONS__PRESENCE", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let s = Server {
            child: Some(child),
            port,
            data_dir: data_dir.to_owned(),
            _tmp: None,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        // A node on a JetStream cluster that is starting waits for the cluster's leaders.
        let deadline = Instant::now() + WAIT * 3;
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::blocking_get(&self.url("/readyz")) {
                if r {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tiny blocking probe that needs no runtime.
mod reqwest {
    pub fn blocking_get(url: &str) -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf.starts_with("HTTP/1.1 200"))
    }
}

pub fn client() -> ::reqwest::Client {
    herald_testkit::init_tls();
    ::reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

/// `GET url` as JSON (panics on a transport error or a body that is not JSON).
pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET url` as text (panics on a transport error), e.g. `/metrics`.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Publishes events (given as JSON values) and returns the response.
pub async fn publish(server: &Server, events: serde_json::Value) -> ::reqwest::Response {
    client()
        .post(server.url("/v1/events"))
        .json(&serde_json::json!({ "events": events }))
        .send()
        .await
        .unwrap()
}

/// Publishes and returns the watermarks.
pub async fn publish_ok(server: &Server, events: serde_json::Value) -> Vec<u64> {
    let r = publish(server, events).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    v["watermarks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap())
        .collect()
}

pub fn created(key: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "kind": "object_created", "object_type": "message"})
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: String,
    pub event: String,
    pub data: String,
}

/// An SSE connection.
pub struct SseClient {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = Sse> + Send>>,
}

impl SseClient {
    pub async fn connect(server: &Server, query: &str, last_event_id: Option<u64>) -> SseClient {
        let mut r = client_no_timeout().get(server.url(&format!("/v1/stream?{query}")));
        if let Some(id) = last_event_id {
            r = r.header("Last-Event-ID", id.to_string());
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let stream =
            eventsource_stream::EventStream::new(resp.bytes_stream()).filter_map(|e| async move {
                e.ok().map(|e| Sse {
                    id: e.id,
                    event: e.event,
                    data: e.data,
                })
            });
        SseClient {
            stream: Box::pin(stream),
        }
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Sse> {
        tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("no SSE event in time")
    }

    /// Whether nothing arrives within `d`.
    pub async fn quiet_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.stream.next()).await.is_err()
    }
}

pub fn client_no_timeout() -> ::reqwest::Client {
    herald_testkit::init_tls();
    ::reqwest::Client::builder().build().unwrap()
}

/// How the test's webhook receiver answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// 200 (and the challenge echoed for verifications).
    Ok,
    /// This status, with an optional Retry-After (seconds).
    Status(u16, Option<u64>),
    /// Answer 200 after this long (longer than Herald's request timeout = a timeout).
    Slow(Duration),
    /// Take the request at once (recorded, as a receiver that processed it) and answer 200
    /// only after this long: a crash of the sender meanwhile leaves it unacknowledged.
    Hold(Duration),
    /// 200 without echoing verification challenges.
    NoEcho,
    /// 302 to this URL.
    Redirect(String),
}

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
    pub status: u16,
    pub at: Instant,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

struct RecvState {
    mode: std::sync::Mutex<Mode>,
    requests: std::sync::Mutex<Vec<Recorded>>,
}

/// A real HTTP server receiving webhooks on a loopback port; it can fail, time out, answer
/// 410, go away and come back on the same port.
pub struct Receiver {
    pub port: u16,
    pub ip: std::net::IpAddr,
    state: std::sync::Arc<RecvState>,
    stop: Option<tokio_util::sync::CancellationToken>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::start_at("127.0.0.1".parse().unwrap(), 0).await
    }

    pub async fn start_at(ip: std::net::IpAddr, port: u16) -> Receiver {
        let mut r = Receiver {
            port,
            ip,
            state: std::sync::Arc::new(RecvState {
                mode: std::sync::Mutex::new(Mode::Ok),
                requests: std::sync::Mutex::new(Vec::new()),
            }),
            stop: None,
        };
        r.up().await;
        r
    }

    /// (Re)starts listening on the receiver's port.
    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind((self.ip, self.port))
            .await
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let state = self.state.clone();
        let app =
            axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
                let state = state.clone();
                async move { answer(state, headers, body).await }
            });
        let stop = tokio_util::sync::CancellationToken::new();
        self.stop = Some(stop.clone());
        tokio::spawn(herald_server::serve::serve_http1(
            listener,
            app,
            stop,
            Duration::from_millis(10),
            None,
        ));
    }

    /// Stops listening and closes every connection: deliveries now fail to connect.
    pub async fn down(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pub fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}/hook", self.ip, self.port)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Keys of events in successful deliveries, each webhook-id counted once, in order;
    /// asserts their watermarks increase.
    pub fn delivered_keys(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut last = 0;
        for r in self.requests() {
            if !(200..300).contains(&r.status) {
                continue;
            }
            let v = r.json();
            if v["type"] != "events" || !seen.insert(r.headers["webhook-id"].clone()) {
                continue;
            }
            for e in v["events"].as_array().unwrap() {
                let w = e["watermark"].as_u64().unwrap();
                assert!(
                    w > last,
                    "watermark {w} after {last}: out of order or repeated"
                );
                last = w;
                out.push(e["key"].as_str().unwrap().to_owned());
            }
        }
        out
    }

    /// Waits until `n` event keys were delivered.
    pub async fn wait_for_keys(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.delivered_keys();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Watermarks of events in successful deliveries, each webhook-id counted once, in order.
    pub fn delivered_watermarks(&self) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in self.requests() {
            if !(200..300).contains(&r.status) {
                continue;
            }
            let v = r.json();
            if v["type"] != "events" || !seen.insert(r.headers["webhook-id"].clone()) {
                continue;
            }
            out.extend(
                v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["watermark"].as_u64().unwrap()),
            );
        }
        out
    }

    /// Waits until `n` event watermarks were delivered.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<u64> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.delivered_watermarks();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn answer(
    state: std::sync::Arc<RecvState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mode = state.mode.lock().unwrap().clone();
    let record = |status: u16| {
        state.requests.lock().unwrap().push(Recorded {
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
            status,
            at: Instant::now(),
        });
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match mode {
        Mode::Ok => {
            record(200);
            if v["type"] == "verification" {
                return v["challenge"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    .into_response();
            }
            axum::http::StatusCode::NO_CONTENT.into_response()
        }
        Mode::NoEcho => {
            record(200);
            "thanks".into_response()
        }
        Mode::Status(code, retry_after) => {
            record(code);
            let mut r = axum::http::StatusCode::from_u16(code)
                .unwrap()
                .into_response();
            if let Some(s) = retry_after {
                r.headers_mut().insert("retry-after", s.into());
            }
            r
        }
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            record(200);
            if v["type"] == "verification" {
                return v["challenge"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    .into_response();
            }
            axum::http::StatusCode::NO_CONTENT.into_response()
        }
        Mode::Hold(d) => {
            record(200);
            tokio::time::sleep(d).await;
            if v["type"] == "verification" {
                return v["challenge"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    .into_response();
            }
            axum::http::StatusCode::NO_CONTENT.into_response()
        }
        Mode::Redirect(to) => {
            record(302);
            (axum::http::StatusCode::FOUND, [("location", to)]).into_response()
        }
    }
}

/// The Python in the repository's virtual environment (scripts/test makes it).
pub fn python() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let py = root.join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/test (it creates .venv with standardwebhooks and exchangelib)",
        py.display()
    );
    py
}

/// The producer key of [`EXCHANGE_USERS`].
pub const PRODUCER_KEY: &str = "producer-key-0123456789";

/// Authentication for the Exchange endpoints' tests: a producer key and two users,
/// Alice (`alice-pw`) and Bob (`bob-pw`), their passwords stored as `herald users add` hashes
/// them.
pub const EXCHANGE_USERS: &str = "[auth]\nkeys = [\"producer-key-0123456789\"]\n[auth.users]\n\"alice@example.test\" = \"$argon2id$v=19$m=19456,t=2,p=1$NiCSfojN0fumSgcBcWWceQ$Zo150co3jiVydGoPKVOTDyOjC4rJU6M9i5WM+k/b3Kg\"\n\"bob@example.test\" = \"$argon2id$v=19$m=19456,t=2,p=1$nSIM1b+Dcdm4Asx40UPrwA$JDKuI3+ptqBut0QM2AUVzYnSKBb9SHSf2UvWuBdoCaU\"\n";

/// Starts a server with this TOML configuration file, on a fresh data directory.
pub fn start_with_config(toml: &str) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, toml).unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    (server, tmp)
}

const ENVELOPE_HEAD: &str = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:m=\"http://schemas.microsoft.com/exchange/services/2006/messages\" xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\"><s:Body>";

/// A SOAP envelope around an EWS request body.
#[allow(dead_code)]
pub fn envelope(body: &str) -> String {
    format!("{ENVELOPE_HEAD}{body}</s:Body></s:Envelope>")
}

/// Runs sections of the exchangelib suite (`tests/py/ews_conformance.py`) against `base`,
/// with `env` set, bounded to 180 s (a hang fails with what the client printed); asserts that
/// it passed and that every section ran.
#[allow(dead_code)]
pub fn exchangelib(
    base: &str,
    producer_key: &str,
    minute: &str,
    sections: &[&str],
    env: &[(&str, &str)],
) {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ews_conformance.py");
    let out = Command::new("timeout")
        .arg("180")
        .arg(python())
        .arg(script)
        .arg(base)
        .arg(producer_key)
        .arg(minute)
        .args(sections)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "exchangelib conformance failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in sections {
        assert!(
            stdout.contains(&format!("ews {s}: ok")),
            "section {s} did not run"
        );
    }
}

/// A client of `/v1/ws` that speaks JSON frames.
pub struct WsClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl WsClient {
    /// Connects to the server's `/v1/ws`.
    pub async fn connect(server: &Server) -> WsClient {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/ws", server.port))
                .await
                .unwrap();
        WsClient { ws }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: serde_json::Value) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                frame.to_string().into(),
            ))
            .await
            .unwrap();
    }

    /// The next JSON frame (pings and other control frames skipped).
    pub async fn frame(&mut self) -> serde_json::Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame in time")
                .expect("the connection ended")
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// Sends `frame` (a `subscribe`) and waits for its `subscribed`; an `error` frame fails.
    pub async fn subscribe(&mut self, frame: serde_json::Value) -> serde_json::Value {
        self.send(frame).await;
        loop {
            let v = self.frame().await;
            assert_ne!(v["type"], "error", "{v}");
            if v["type"] == "subscribed" {
                return v;
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
