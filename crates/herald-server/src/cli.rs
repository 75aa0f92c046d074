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
use crate::progress::{ProgressMode, Replay};

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

    /// A WebSocket client for the same server and credentials: resumable subscriptions and
    /// ordered publishing.
    fn herald_client(
        &self,
        give_up_after: Option<Duration>,
    ) -> anyhow::Result<herald_client::Client> {
        let mut b = herald_client::Client::builder()
            .server(&self.server)
            .give_up_after(give_up_after);
        if let Some(t) = &self.token {
            b = b.token(t.clone());
        }
        Ok(b.build()?)
    }

    /// Streams events to `out` until interrupted, reconnecting after errors and resuming after
    /// the last watermark printed. Returns an error when the server says the position expired
    /// or is ahead of its log.
    ///
    /// With `progress` not off and a position to resume from, the replay up to the log's head
    /// when it started (from `GET /v1/status`) is shown on standard error, then "caught up".
    pub async fn tail(
        &self,
        query: &TailQuery,
        json: bool,
        progress: ProgressMode,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let client = self.herald_client(None)?;
        let mut spec = if query.subtree {
            herald_client::Subscribe::subtree(&query.key)
        } else if query.children {
            herald_client::Subscribe::children(&query.key)
        } else {
            herald_client::Subscribe::key(&query.key)
        };
        if let Some(k) = &query.kinds {
            spec = spec.kinds(k.clone());
        }
        if let Some(w) = query.after {
            spec = spec.after(w);
        }
        // The head is read before subscribing: everything up to it is history to replay.
        let head = match (progress, query.after) {
            (ProgressMode::Off, _) | (_, None) => None,
            (_, Some(_)) => match self.status().await {
                Ok(s) => Some(s.log_last),
                Err(e) => {
                    tracing::debug!(error = %e, "no progress: the log's head is unknown");
                    None
                }
            },
        };
        let subscriber = client.subscriber();
        let mut events = subscriber.subscribe(spec).await?;
        let mut replay = head.map(|head| Replay::start(progress, events.started_after(), head));
        loop {
            let replaying = replay.as_ref().is_some_and(|r| !r.caught_up());
            let event = tokio::select! {
                event = events.next() => event,
                () = tokio::time::sleep(REPLAY_QUIET), if replaying => {
                    if let Some(r) = &mut replay {
                        r.quiet();
                    }
                    continue;
                }
            };
            let Some(event) = event else { break };
            let event = match event {
                Ok(e) => e,
                Err(
                    e @ (herald_client::Error::Expired { .. } | herald_client::Error::Reset { .. }),
                ) => {
                    bail!("the position can no longer be resumed: {e}")
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&event.json)?)?;
            } else {
                writeln!(out, "{}", human(&event.json))?;
            }
            out.flush()?;
            if let Some(r) = &mut replay {
                r.seen(event.watermark);
            }
        }
        Ok(())
    }
}

/// How long a replay may go without a matching event before the rest of it up to the head
/// is taken as not matching.
const REPLAY_QUIET: Duration = Duration::from_secs(2);

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
        use futures_util::stream::FuturesOrdered;
        use tokio::io::AsyncBufReadExt;

        let publisher = self
            .herald_client(Some(Duration::from_secs(60)))?
            .publisher();
        let mut lines = input.lines();
        let mut line_no = 0u64;
        let mut answers = FuturesOrdered::new();
        let mut published = 0u64;
        let mut reading = true;
        // The first failure: its line and why. Nothing after it is sent or counted.
        let mut failure: Option<(u64, String)> = None;
        loop {
            tokio::select! {
                line = lines.next_line(), if reading && failure.is_none() => {
                    let Some(line) = line.context("reading standard input")? else {
                        reading = false;
                        continue;
                    };
                    line_no += 1;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let events = match batch_of_line(&line) {
                        Ok(events) => events,
                        Err(why) => {
                            failure = Some((line_no, why));
                            continue;
                        }
                    };
                    let pending = match idempotency_prefix {
                        Some(p) => publisher.send_with_key(events, format!("{p}-{line_no}")).await?,
                        None => publisher.send(events).await?,
                    };
                    let n = line_no;
                    answers.push_back(async move { (n, pending.await) });
                }
                Some((n, answer)) = answers.next(), if !answers.is_empty() => match answer {
                    Ok(p) => {
                        published += 1;
                        if json {
                            writeln!(out, "{}", serde_json::json!({"line": n, "watermarks": p.watermarks, "replayed": p.replayed}))?;
                        } else {
                            let first = p.watermarks.first().copied().unwrap_or(0);
                            let last = p.watermarks.last().copied().unwrap_or(first);
                            let range = if first == last { first.to_string() } else { format!("{first}-{last}") };
                            writeln!(out, "line {n}: watermark {range}{}", if p.replayed { " (replayed)" } else { "" })?;
                        }
                    }
                    Err(e) => {
                        // The earliest failure is the one to start again from; the later
                        // lines were aborted because of it.
                        if failure.as_ref().is_none_or(|(f, _)| n < *f) {
                            failure = Some((n, e.to_string()));
                        }
                    }
                },
                else => break,
            }
        }
        if let Some((n, why)) = failure {
            bail!(
                "line {n} was not published ({why}); {published} lines before it were, none after it: start again from line {n}"
            );
        }
        Ok(published)
    }
}

/// One input line of `herald publish --stdin`: an event, or an array of events.
fn batch_of_line(line: &str) -> Result<Vec<EventJson>, String> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Array(events)) => events
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid_field: {e}")),
        Ok(event @ serde_json::Value::Object(_)) => serde_json::from_value(event)
            .map(|e| vec![e])
            .map_err(|e| format!("invalid_field: {e}")),
        Ok(_) => Err("not an event object or an array of events".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}
