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
