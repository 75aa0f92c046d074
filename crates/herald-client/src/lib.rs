//! A client for Herald that keeps the server's promises all the way into the application.
//!
//! * [`Publisher`]: ordered pipelined publishing over one WebSocket. Many batches are in
//!   flight; they are appended in the order they were sent and answered in that order. Every
//!   batch carries an idempotency key, so after a lost connection the unanswered ones are sent
//!   again on a new connection (to the next server in the list) and appended once.
//! * [`Subscriber`]: any number of subscriptions over one WebSocket. Each resumes after the
//!   last watermark it handed to the application when the connection is lost, the server
//!   restarts or another node takes over, so the application sees every event once, in order
//!   (checked by watermark). Durable subscriptions take acknowledgements.
//! * [`Client::publish`]: the one-shot HTTP `POST /v1/events`, retried safely.
//!
//! ```no_run
//! # async fn run() -> Result<(), herald_client::Error> {
//! use herald_client::{Client, EventJson, Subscribe};
//!
//! let client = Client::new("http://127.0.0.1:8470")?;
//! let subscriber = client.subscriber();
//! let mut inbox = subscriber.subscribe(Subscribe::subtree("alice@example.test/inbox")).await?;
//!
//! let publisher = client.publisher();
//! let event = EventJson {
//!     key: "alice@example.test/inbox/m1".into(),
//!     kind: "new_mail".into(),
//!     ..Default::default()
//! };
//! let answer = publisher.send(vec![event]).await?; // in flight; send more without waiting
//! println!("appended at {:?}", answer.await?.watermarks);
//!
//! while let Some(event) = inbox.next().await {
//!     let event = event?; // an `Expired` or `Reset` position ends the subscription
//!     println!("{} {:?}", event.watermark, event.notification.event);
//! }
//! # Ok(()) }
//! ```

mod backoff;
mod connection;
mod publisher;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

pub use backoff::Backoff;
pub use herald_core::Notification;
pub use herald_proto::json::EventJson;
pub use herald_proto::ws::{ClientFrame, ServerFrame};
pub use publisher::{Pending, Published, Publisher};
pub use subscriber::{Event, Subscribe, Subscriber, Subscription};

/// What went wrong, typed so that an application can tell what to do next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server URL is not `http://` or `https://`.
    #[error("{0:?} is not a server URL: it must start with http:// or https://")]
    Url(String),
    /// No server could be reached within the reconnect limit.
    #[error("no server could be reached for {waited:?}; last error: {last}")]
    Unreachable {
        /// How long the client kept trying.
        waited: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The server refused the credentials or the request for good (an HTTP 4xx on connect,
    /// or an error answer); retrying would not help.
    #[error("the server refused ({code}): {message}")]
    Refused {
        /// The server's stable error code (`invalid_field`, `unauthorized`, …).
        code: String,
        /// What the server said.
        message: String,
    },
    /// A published batch was not appended because an earlier batch of the same publisher
    /// failed; it may be sent again.
    #[error("not appended: an earlier batch failed ({message})")]
    Aborted {
        /// What the server said.
        message: String,
    },
    /// The subscription's position is older than the server's log holds; it has ended.
    /// Resume from `oldest_available - 1` (accepting the gap) or rebuild state.
    #[error("the position is older than the log holds (oldest available: {oldest_available})")]
    Expired {
        /// The oldest watermark the log holds.
        oldest_available: u64,
    },
    /// The subscription's position is ahead of the server's log (the log was replaced); it
    /// has ended. Rebuild state from the server's data and subscribe again.
    #[error("the position is ahead of the server's log: {message}")]
    Reset {
        /// What the server said.
        message: String,
    },
    /// The server ended the subscription for another reason.
    #[error("the server ended the subscription ({code}): {message}")]
    Ended {
        /// The server's code.
        code: String,
        /// What the server said.
        message: String,
    },
    /// A frame or event from the server could not be read.
    #[error("unreadable answer from the server: {0}")]
    Protocol(String),
    /// The publisher or subscriber is closed (its task ended).
    #[error("the client is closed")]
    Closed,
}

/// Where the servers are and how to reach them: cheap to clone, shared by publishers and
/// subscribers made from it.
#[derive(Clone, Debug)]
pub struct Client {
    config: Arc<Config>,
}

#[derive(Debug)]
pub(crate) struct Config {
    /// Base URLs without a trailing slash, tried in turn.
    pub(crate) servers: Vec<String>,
    pub(crate) token: Option<String>,
    pub(crate) backoff: Backoff,
    /// How long to keep trying without reaching any server; `None`: forever.
    pub(crate) give_up_after: Option<Duration>,
    /// Publish batches in flight at most.
    pub(crate) window: usize,
    /// Events buffered per subscription before the connection stops reading.
    pub(crate) buffer: usize,
    pub(crate) http: reqwest::Client,
}

impl Config {
    /// A `POST` of `path` on `server`, with the token when there is one.
    fn post(&self, server: &str, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{server}{path}"));
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }
}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    servers: Vec<String>,
    token: Option<String>,
    backoff: Backoff,
    give_up_after: Option<Duration>,
    window: usize,
    buffer: usize,
}

impl Client {
    /// A client for one server, e.g. `http://127.0.0.1:8470`, with default settings.
    pub fn new(server: &str) -> Result<Client, Error> {
        Client::builder().server(server).build()
    }

    /// A builder: several servers (nodes of a cluster), a token, reconnect settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            servers: Vec::new(),
            token: None,
            backoff: Backoff::default(),
            give_up_after: Some(Duration::from_secs(300)),
            window: 64,
            buffer: 4096,
        }
    }

    /// An ordered pipelined publisher. It connects in the background; batches sent before
    /// the connection is up wait for it.
    pub fn publisher(&self) -> Publisher {
        Publisher::start(self.config.clone())
    }

    /// A subscriber: one WebSocket carrying any number of [`Subscription`]s.
    pub fn subscriber(&self) -> Subscriber {
        Subscriber::start(self.config.clone())
    }

    /// Publishes one batch with `POST /v1/events` and waits until it is durable. The request
    /// carries a fresh idempotency key and is retried with it (to the next server) while the
    /// server cannot be reached or answers 503, so it is appended once.
    pub async fn publish(&self, events: Vec<EventJson>) -> Result<Published, Error> {
        let body = herald_proto::http::PublishRequest { events };
        let key = uuid::Uuid::new_v4().to_string();
        let mut attempt = connection::Attempts::new(&self.config);
        loop {
            let server = attempt.server().to_owned();
            let request = self
                .config
                .post(&server, "/v1/events")
                .header("Idempotency-Key", &key)
                .json(&body);
            let failure = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let answer: herald_proto::http::PublishResponse = response
                        .json()
                        .await
                        .map_err(|e| Error::Protocol(e.to_string()))?;
                    return Ok(Published {
                        watermarks: answer.watermarks,
                        replayed: answer.replayed,
                    });
                }
                Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    format!("{server} answered 503")
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    return Err(connection::refusal(status.as_u16(), &text));
                }
                Err(e) => format!("{server}: {e}"),
            };
            attempt.failed(failure).await?;
        }
    }
}

impl Client {
    /// Creates a durable subscription on the server (`POST /v1/subscriptions`, transport
    /// `poll`) with `spec`'s filter and start; returns its id for [`Subscribe::durable`].
    ///
    /// The servers are tried in turn while none can be reached (or one answers 503): a request
    /// that was never sent created nothing. A request sent whose answer was lost is not
    /// repeated — it may have created the subscription — and comes back as
    /// [`Error::Unreachable`].
    pub async fn create_subscription(&self, spec: &Subscribe) -> Result<String, Error> {
        let body = spec.create_body();
        let mut attempt = connection::Attempts::new(&self.config);
        loop {
            let server = attempt.server().to_owned();
            let request = self.config.post(&server, "/v1/subscriptions").json(&body);
            let failure = match request.send().await {
                Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    format!("{server} answered 503")
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if !status.is_success() {
                        return Err(connection::refusal(status.as_u16(), &text));
                    }
                    let view: serde_json::Value =
                        serde_json::from_str(&text).map_err(|e| Error::Protocol(e.to_string()))?;
                    return view["id"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Error::Protocol("the answer has no id".into()));
                }
                Err(e) if e.is_connect() => format!("{server}: {e}"),
                Err(e) => {
                    return Err(Error::Unreachable {
                        waited: Duration::ZERO,
                        last: format!("{server}: {e} (the subscription may have been created)"),
                    });
                }
            };
            attempt.failed(failure).await?;
        }
    }
}

impl ClientBuilder {
    /// Adds a server (a node of a cluster); they are tried in the order added.
    pub fn server(mut self, url: &str) -> Self {
        self.servers.push(url.trim_end_matches('/').to_owned());
        self
    }

    /// The API key or subscriber token sent as `Authorization: Bearer`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The reconnect schedule.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long to keep reconnecting without reaching a server before failing with
    /// [`Error::Unreachable`] (default 5 minutes); `None` keeps trying forever.
    pub fn give_up_after(mut self, limit: Option<Duration>) -> Self {
        self.give_up_after = limit;
        self
    }

    /// Publish batches in flight at most (default 64): [`Publisher::send`] waits beyond it.
    pub fn window(mut self, batches: usize) -> Self {
        self.window = batches.max(1);
        self
    }

    /// Events buffered per subscription (default 4096). When the application does not keep
    /// up, the subscriber stops reading the connection, and the server keeps the rest in its
    /// log until it does.
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }

    /// The client; an error if no server was given or one is not an HTTP URL.
    pub fn build(self) -> Result<Client, Error> {
        if self.servers.is_empty() {
            return Err(Error::Url(String::new()));
        }
        for s in &self.servers {
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                return Err(Error::Url(s.clone()));
            }
        }
        // HTTPS through rustls with the ring provider, unless the application chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Protocol(e.to_string()))?;
        Ok(Client {
            config: Arc::new(Config {
                servers: self.servers,
                token: self.token,
                backoff: self.backoff,
                give_up_after: self.give_up_after,
                window: self.window,
                buffer: self.buffer,
                http,
            }),
        })
    }
}
