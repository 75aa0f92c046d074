//! What the router-level fuzz targets share: a real [`AppState`] over a log on disk, opened
//! once per fuzzing process, and a way to send it one request at a time through `app()`
//! (`tower::ServiceExt::oneshot`), as `crates/herald-server/tests/router.rs` does.
//!
//! The data directory is a `tempfile` directory that is never removed (the harness lives in a
//! static); `scripts/fuzz` points `TMPDIR` at a scratch directory it deletes afterwards.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use herald_server::{AppState, Config, app};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A server in process, and the runtime its tasks run on.
pub struct Harness {
    /// Two workers: session tasks (MAPI log readers, the log's writer) make progress between
    /// inputs, not only while a request is being driven.
    pub rt: tokio::runtime::Runtime,
    /// The server's state.
    pub state: AppState,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Opens a server on a fresh data directory, on loopback, with presence events off (so
    /// connections do not write to the log), after `change` has adjusted the configuration.
    pub fn new(change: impl FnOnce(&mut Config)) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::Builder::new()
            .prefix("herald-fuzz-")
            .tempdir()
            .expect("a temporary directory");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("an address"),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.connections.presence = false;
        // The log stays small however long the run.
        config.retention.max_events = Some(10_000);
        change(&mut config);
        let state = rt
            .block_on(AppState::open(config, CancellationToken::new()))
            .expect("the server state opens");
        Harness {
            rt,
            router: app(state.clone()),
            state,
            _dir: dir,
        }
    }

    /// Sends one request through the router; the body of the answer is not read.
    pub fn call(&self, req: Request<Body>) -> Response<Body> {
        self.rt.block_on(self.send(req))
    }

    /// As [`Harness::call`], inside the runtime.
    pub async fn send(&self, req: Request<Body>) -> Response<Body> {
        match self.router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// Sends one request and reads the whole answer (for answers that end by themselves:
    /// not for SSE streams). A body that does not end within `limit` is a finding.
    pub fn call_read(&self, req: Request<Body>, limit: Duration) -> (Response<()>, Vec<u8>) {
        self.rt.block_on(async {
            let what = format!("{} {}", req.method(), req.uri());
            let resp = self.send(req).await;
            let (parts, body) = resp.into_parts();
            let bytes = tokio::time::timeout(limit, axum::body::to_bytes(body, 4 << 20))
                .await
                .unwrap_or_else(|_| panic!("the answer to {what} did not end within {limit:?}"))
                .expect("the answer's body reads");
            (Response::from_parts(parts, ()), bytes.to_vec())
        })
    }
}

/// Percent-encodes every byte a URI query may not hold as it is, so that any input becomes a
/// query the router receives (`%`, `&`, `=` and `+` pass through: they are what the parser
/// under test interprets).
pub fn query_of(data: &[u8]) -> String {
    let mut q = String::with_capacity(data.len());
    for &b in data {
        let plain = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
        if plain {
            q.push(char::from(b));
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q
}
