//! Reaching a server: WebSocket connects that rotate through the servers with back-off, and
//! reading the server's refusals.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Config, Error};

/// A WebSocket to a server.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Successive attempts to reach a server: which one to try, how long to wait after a
/// failure, and when to give up.
pub(crate) struct Attempts<'a> {
    config: &'a Config,
    failures: u32,
    since: Instant,
    next_server: usize,
}

impl<'a> Attempts<'a> {
    pub(crate) fn new(config: &'a Config) -> Self {
        Attempts {
            config,
            failures: 0,
            since: Instant::now(),
            next_server: 0,
        }
    }

    /// Attempts that try `server` first (the one a lost connection was to: a restarted
    /// server comes back there), then the others in turn.
    pub(crate) fn starting_at(config: &'a Config, server: usize) -> Self {
        let mut a = Attempts::new(config);
        a.next_server = server;
        a
    }

    /// The server to try now (its index and base URL).
    pub(crate) fn current(&self) -> (usize, &'a str) {
        let i = self.next_server % self.config.servers.len();
        (i, &self.config.servers[i])
    }

    pub(crate) fn server(&self) -> &'a str {
        self.current().1
    }

    /// The attempt failed: waits before the next one (on the next server), or gives up.
    pub(crate) async fn failed(&mut self, why: String) -> Result<(), Error> {
        let waited = self.since.elapsed();
        if self
            .config
            .give_up_after
            .is_some_and(|limit| waited >= limit)
        {
            return Err(Error::Unreachable { waited, last: why });
        }
        tracing::debug!(%why, attempt = self.failures, "cannot reach a Herald server; retrying");
        let delay = self.config.backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.next_server += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Opens a WebSocket to `/v1/ws` of the first server that answers. A refusal for good
    /// (a 4xx other than 408 and 429) is returned at once; anything else is retried.
    pub(crate) async fn connect(&mut self) -> Result<(usize, Ws), Error> {
        loop {
            let (index, server) = self.current();
            match open(self.config, server).await {
                Ok(ws) => return Ok((index, ws)),
                Err(Failure::Refused(e)) => return Err(e),
                Err(Failure::Retry(why)) => self.failed(why).await?,
            }
        }
    }
}

enum Failure {
    Refused(Error),
    Retry(String),
}

async fn open(config: &Config, server: &str) -> Result<Ws, Failure> {
    let url = ws_url(server).map_err(Failure::Refused)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::Refused(Error::Url(format!("{url}: {e}"))))?;
    if let Some(t) = &config.token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| Failure::Refused(Error::Url("the token is not a header value".into())))?;
        request.headers_mut().insert("authorization", value);
    }
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            if (400..500).contains(&status) && status != 408 && status != 429 {
                Err(Failure::Refused(refusal(status, &body)))
            } else {
                Err(Failure::Retry(format!("{server} answered {status}")))
            }
        }
        Ok(Err(e)) => Err(Failure::Retry(format!("{server}: {e}"))),
        Err(_) => Err(Failure::Retry(format!("{server}: connect timed out"))),
    }
}

/// The WebSocket URL of a server's base URL.
pub(crate) fn ws_url(server: &str) -> Result<String, Error> {
    match server.split_once("://") {
        Some(("http", rest)) => Ok(format!("ws://{rest}/v1/ws")),
        Some(("https", rest)) => Ok(format!("wss://{rest}/v1/ws")),
        _ => Err(Error::Url(server.to_owned())),
    }
}

/// Reads an HTTP error body (`{"error": {"code", "message"}}`) into [`Error::Refused`].
pub(crate) fn refusal(status: u16, body: &str) -> Error {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let detail = parsed.as_ref().map(|v| &v["error"]);
    let text = |field: &str| detail.and_then(|d| d[field].as_str()).map(str::to_owned);
    Error::Refused {
        code: text("code").unwrap_or_else(|| format!("http_{status}")),
        message: text("message").unwrap_or_else(|| body.chars().take(200).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_follow_the_scheme() {
        assert_eq!(ws_url("http://h:1").unwrap(), "ws://h:1/v1/ws");
        assert_eq!(ws_url("https://h").unwrap(), "wss://h/v1/ws");
        assert!(ws_url("h:1").is_err());
    }

    #[test]
    fn refusals_carry_the_servers_code_or_the_status() {
        let e = refusal(
            401,
            r#"{"error":{"code":"unauthorized","message":"no key"}}"#,
        );
        assert_eq!(
            e,
            Error::Refused {
                code: "unauthorized".into(),
                message: "no key".into()
            }
        );
        let e = refusal(403, "go away");
        assert_eq!(
            e,
            Error::Refused {
                code: "http_403".into(),
                message: "go away".into()
            }
        );
    }
}
