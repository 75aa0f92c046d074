//! The command-line client: `herald publish`, `tail`, `subs`, `status`. Human-readable output
//! by default, one JSON object per line with `--json`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::api::ConnectionView;
use crate::api::{
    PublishRequest, PublishResponse, SetState, StateNotification, StateView, StatusResponse,
    SubscriptionView,
};
use crate::json::EventJson;

/// Where the server is and how to authenticate.
#[derive(Clone, Debug)]
pub struct Client {
    /// Base URL, e.g. `http://127.0.0.1:8470`.
    pub server: String,
    /// API key, if the server requires one.
    pub token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `server`.
    pub fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Client {
            server: server.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.server));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn json<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let body = self.send(r).await?.bytes().await?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Sends `r`; a non-2xx answer is an error carrying the server's message.
    async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = r
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.server))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await?;
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                let field = e.get("field").and_then(|f| f.as_str());
                let message = e.get("message")?.as_str()?;
                Some(match field {
                    Some(f) => format!("{f}: {message}"),
                    None => message.to_owned(),
                })
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("the server answered {status}: {msg}");
    }

    /// Publishes one event; returns its watermark.
    pub async fn publish(
        &self,
        event: EventJson,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<PublishResponse> {
        let mut r = self
            .request(reqwest::Method::POST, "/v1/events")
            .json(&PublishRequest {
                events: vec![event],
            });
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        self.json(r).await
    }

    /// The server's status.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        self.json(self.request(reqwest::Method::GET, "/v1/status"))
            .await
    }

    /// The server's state.
    pub async fn state(&self) -> anyhow::Result<StateView> {
        self.json(self.request(reqwest::Method::GET, "/v1/state"))
            .await
    }

    /// Takes the server online or offline; with `block`, answers when the transition is done.
    pub async fn set_state(&self, online: bool, block: bool) -> anyhow::Result<StateView> {
        let body = SetState {
            state: if online { "online" } else { "offline" }.into(),
            block,
        };
        self.json(self.request(reqwest::Method::PUT, "/v1/state").json(&body))
            .await
    }

    /// Prints the server's state transitions (`start`, `change`, `done`) until interrupted.
    pub async fn watch_state(
        &self,
        token: u32,
        json: bool,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let resp = self
            .send(
                self.request(reqwest::Method::GET, "/v1/state/advise")
                    .query(&[("token", token)]),
            )
            .await?;
        let mut events = eventsource_stream::EventStream::new(resp.bytes_stream());
        while let Some(item) = events.next().await {
            let ev = item.context("the advise stream broke")?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"event": ev.event, "data": serde_json::from_str::<serde_json::Value>(&ev.data).unwrap_or_default()})
                )?;
            } else if let Ok(n) = serde_json::from_str::<StateNotification>(&ev.data) {
                // Only online/offline changes are understood; anything else is ignored, as
                // Outlook's clients must (MAPIOFFLINE_NOTIFY filter).
                if !(1..=3).contains(&n.notify_type) || n.mask != herald_core::STATE_OFFLINE_MASK {
                    continue;
                }
                writeln!(
                    out,
                    "{:<7} {} -> {}  (token {})",
                    ev.event, n.old, n.new, n.client_token
                )?;
            } else if ev.event == "advised" {
                writeln!(out, "advised: {}", ev.data)?;
            }
            out.flush()?;
            if ev.event == "shutdown" {
                break;
            }
        }
        Ok(())
    }

    /// Client connections.
    pub async fn connections(&self) -> anyhow::Result<Vec<ConnectionView>> {
        self.json(self.request(reqwest::Method::GET, "/v1/connections"))
            .await
    }

    /// Closes connection `id`.
    pub async fn kick(&self, id: &str) -> anyhow::Result<()> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/v1/connections/{id}")))
            .await?;
        Ok(())
    }

    /// Durable subscriptions.
    pub async fn subs(&self) -> anyhow::Result<Vec<SubscriptionView>> {
        self.json(self.request(reqwest::Method::GET, "/v1/subscriptions"))
            .await
    }

    /// Streams events to `out` until interrupted, reconnecting after errors and resuming after
    /// the last watermark printed. Returns when the server says the position expired.
    pub async fn tail(
        &self,
        query: &TailQuery,
        json: bool,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let mut last = query.after;
        let mut backoff = Duration::from_millis(250);
        loop {
            let mut params: Vec<(&str, String)> = Vec::new();
            if query.subtree {
                params.push(("subtree", query.key.clone()));
            } else if query.children {
                params.push(("children", query.key.clone()));
            } else {
                params.push(("key", query.key.clone()));
            }
            if let Some(k) = &query.kinds {
                params.push(("kinds", k.clone()));
            }
            let mut r = self
                .request(reqwest::Method::GET, "/v1/stream")
                .query(&params);
            if let Some(w) = last {
                r = r.header("Last-Event-ID", w.to_string());
            }
            let resp = match r.send().await {
                Ok(resp) if resp.status().is_success() => resp,
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    bail!("the server answered {status}: {text}");
                }
                Err(e) => {
                    eprintln!("herald tail: {e}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(250);
            let mut events = eventsource_stream::EventStream::new(resp.bytes_stream());
            while let Some(item) = events.next().await {
                let ev = match item {
                    Ok(ev) => ev,
                    Err(e) => {
                        eprintln!("herald tail: stream broke ({e}); resuming");
                        break;
                    }
                };
                match ev.event.as_str() {
                    "expired" | "reset" => {
                        bail!("the position can no longer be resumed: {}", ev.data);
                    }
                    "shutdown" | "error" => {
                        eprintln!(
                            "herald tail: server said {}: {}; resuming",
                            ev.event, ev.data
                        );
                        break;
                    }
                    _ => {}
                }
                let event: EventJson = match serde_json::from_str(&ev.data) {
                    Ok(e) => e,
                    Err(_) => continue,
                };
                last = event.watermark.or(last);
                if json {
                    writeln!(out, "{}", ev.data)?;
                } else {
                    writeln!(out, "{}", human(&event))?;
                }
                out.flush()?;
            }
            tokio::time::sleep(backoff).await;
        }
    }
}

/// What `herald tail` follows.
#[derive(Clone, Debug)]
pub struct TailQuery {
    /// The key.
    pub key: String,
    /// Whether to follow everything below it too.
    pub subtree: bool,
    /// Whether to follow only what is directly in it (a folder's children).
    pub children: bool,
    /// Comma-separated kinds.
    pub kinds: Option<String>,
    /// Resume after this watermark.
    pub after: Option<u64>,
}

/// One line describing an event, for people.
pub fn human(e: &EventJson) -> String {
    let mut s = format!("{:>8}  {:<22} {}", e.watermark.unwrap_or(0), e.kind, e.key);
    if let Some(old) = &e.old_key {
        s.push_str(&format!("  (from {old})"));
    }
    if let Some(c) = &e.message_class {
        s.push_str(&format!("  {c}"));
    }
    if let Some(c) = &e.connection_state {
        let name = |v: u32| match v {
            herald_core::STATE_ONLINE => "online",
            herald_core::STATE_OFFLINE => "offline",
            _ => "?",
        };
        s.push_str(&format!("  {} -> {}", name(c.old_state), name(c.new_state)));
    }
    s
}

/// Builds an event from `key`, `kind` and `name=value` fields (values are JSON when they
/// parse as JSON, strings otherwise).
pub fn event_from_fields(key: &str, kind: &str, fields: &[String]) -> anyhow::Result<EventJson> {
    let mut obj = serde_json::Map::new();
    obj.insert("key".into(), key.into());
    obj.insert("kind".into(), kind.into());
    for f in fields {
        let (name, value) = f
            .split_once('=')
            .with_context(|| format!("field {f:?} is not name=value"))?;
        let value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        obj.insert(name.to_owned(), value);
    }
    serde_json::from_value(serde_json::Value::Object(obj))
        .context("the fields do not make an event")
}

/// How many batches `herald publish --stdin` keeps in flight.
const PUBLISH_WINDOW: usize = 64;

impl Client {
    /// Publishes one batch per input line (an event object, or an array of events) over one
    /// WebSocket with many in flight: appended in line order, answered per line. Stops at
    /// the first line that fails (unreadable, refused, or not appended): the lines after it
    /// are not appended, and the error names the line to start again from. With
    /// `idempotency_prefix`, line `n` carries key `<prefix>-<n>`, so feeding the same input
    /// again after a failure appends only what is missing. Returns how many lines were
    /// published.
    pub async fn publish_lines(
        &self,
        input: impl tokio::io::AsyncBufRead + Unpin,
        idempotency_prefix: Option<&str>,
        json: bool,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<u64> {
        use futures_util::SinkExt;
        use tokio::io::AsyncBufReadExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;

        let url = match self.server.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}/v1/ws"),
            Some(("https", rest)) => format!("wss://{rest}/v1/ws"),
            _ => bail!("the server URL must start with http:// or https://"),
        };
        let mut request = url.as_str().into_client_request()?;
        if let Some(t) = &self.token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {t}").parse()?);
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("cannot open a WebSocket to {url}"))?;
        let mut lines = input.lines();
        let mut line_no = 0u64;
        let mut in_flight = 0usize;
        let mut published = 0u64;
        let mut reading = true;
        // The first failure: its line and why. Nothing after it is sent or counted.
        let mut failure: Option<(u64, String)> = None;
        while (reading && failure.is_none()) || in_flight > 0 {
            tokio::select! {
                line = lines.next_line(), if reading && failure.is_none() && in_flight < PUBLISH_WINDOW => {
                    let Some(line) = line.context("reading standard input")? else {
                        reading = false;
                        continue;
                    };
                    line_no += 1;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let events = match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(serde_json::Value::Array(events)) => events,
                        Ok(event @ serde_json::Value::Object(_)) => vec![event],
                        Ok(_) => {
                            failure = Some((line_no, "not an event object or an array of events".into()));
                            continue;
                        }
                        Err(e) => {
                            failure = Some((line_no, format!("not JSON: {e}")));
                            continue;
                        }
                    };
                    let mut frame = serde_json::json!({
                        "op": "publish",
                        "id": line_no.to_string(),
                        "events": events,
                    });
                    if let Some(p) = idempotency_prefix {
                        frame["idempotency_key"] = format!("{p}-{line_no}").into();
                    }
                    ws.send(Message::Text(frame.to_string().into())).await?;
                    in_flight += 1;
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | None => bail!(
                            "the server closed the connection with {in_flight} lines unanswered (they may or may not be appended)"
                        ),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.into()),
                    };
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    let Some(n) = v["id"].as_str().and_then(|s| s.parse::<u64>().ok()) else {
                        if v["type"] == "error" {
                            bail!("the server refused: {}", v["message"]);
                        }
                        continue;
                    };
                    in_flight -= 1;
                    if v["type"] == "published" {
                        published += 1;
                        if json {
                            writeln!(out, "{}", serde_json::json!({"line": n, "watermarks": v["watermarks"], "replayed": v["replayed"]}))?;
                        } else {
                            let w = &v["watermarks"];
                            let first = w[0].as_u64().unwrap_or(0);
                            let last = w.as_array().and_then(|a| a.last()).and_then(|l| l.as_u64()).unwrap_or(first);
                            let range = if first == last { first.to_string() } else { format!("{first}-{last}") };
                            writeln!(out, "line {n}: watermark {range}{}", if v["replayed"] == true { " (replayed)" } else { "" })?;
                        }
                    } else if failure.as_ref().is_none_or(|(f, _)| n < *f) {
                        // The earliest failure is the one to start again from; the later
                        // lines were aborted because of it.
                        failure = Some((n, format!("{}: {}", v["code"].as_str().unwrap_or("error"), v["message"].as_str().unwrap_or(""))));
                    }
                }
            }
        }
        let _ = ws.close(None).await;
        if let Some((n, why)) = failure {
            bail!(
                "line {n} was not published ({why}); {published} lines before it were, none after it: start again from line {n}"
            );
        }
        Ok(published)
    }
}
