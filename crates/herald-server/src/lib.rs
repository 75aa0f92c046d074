//! The `herald` server: the producer API, the subscriber transports (SSE, WebSocket,
//! long-poll), operations endpoints, and the command-line client.
//!
//! [`app`] builds the router over an [`AppState`]; [`run`] serves it on a listener until the
//! shutdown token is cancelled, then closes streams with a final status and flushes the log.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connections;
pub mod egress;
pub mod error;
pub mod ews;
pub mod frames;
pub mod hooks;
pub mod json;
pub mod mapi;
pub mod metrics;
pub mod serve;
pub mod server_state;
pub mod subscriptions;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::{Hub, HubOptions};
use herald_log::EmbeddedLog;
use tokio_util::sync::CancellationToken;

pub use api::{ApiDoc, app};
pub use config::Config;

/// Everything a request handler can reach.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    config: Config,
    log: EmbeddedLog,
    durables: subscriptions::Durables,
    metrics: metrics::Metrics,
    frames: Arc<frames::EventCache>,
    auth: Arc<auth::Auth>,
    egress: egress::EgressPolicy,
    ews: Arc<ews::Ews>,
    mapi: Arc<mapi::Mapi>,
    connections: connections::Connections,
    server_state: server_state::ServerState,
    hooks: Arc<herald_core::hooks::Hooks>,
    /// Cancel hooks running in the background, waited for at shutdown.
    hook_tasks: tokio_util::task::TaskTracker,
    push_client: reqwest::Client,
    shutdown: CancellationToken,
    started: Instant,
}

impl AppState {
    /// Opens the log in the configured data directory and restores durable subscriptions.
    /// Must be called inside a tokio runtime (subscription watchers are tasks).
    pub fn open(config: Config, shutdown: CancellationToken) -> anyhow::Result<AppState> {
        // First, so that what the parts below record at start is kept.
        let metrics = metrics::Metrics::install();
        let hub = Hub::new(HubOptions {
            queue_capacity: config.limits.queue_capacity,
            ..Default::default()
        });
        config.check_exposure().map_err(anyhow::Error::msg)?;
        config.check_timers().map_err(anyhow::Error::msg)?;
        // Outbound HTTPS (webhooks, EWS push) uses rustls with the ring provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let egress = config.egress().map_err(anyhow::Error::msg)?;
        let auth = Arc::new(auth::Auth::new(&config.auth, &config.data_dir)?);
        let log = EmbeddedLog::open(&config.data_dir, config.log_options(), hub)?;
        let frames = Arc::new(frames::EventCache::default());
        let server_state =
            server_state::ServerState::new(config.state.start_offline, config.state.drain_timeout);
        let connections = connections::Connections::new(
            log.clone(),
            config.connections.lease,
            config.connections.presence,
        );
        let hooks = Arc::new(hooks::from_config(&config.hooks)?);
        let durables = subscriptions::Durables::new(
            log.clone(),
            connections.clone(),
            server_state.clone(),
            hooks.clone(),
            config.subscriptions.idle_timeout,
            config.limits.max_key_bytes,
            config.limits.queue_capacity,
            config.mapi.udp_repeat,
        );
        durables.set_webhooks(Arc::new(webhook::WebhookContext {
            log: log.clone(),
            client: egress.client(config.webhooks.request_timeout),
            egress: egress.clone(),
            config: config.webhooks.clone(),
            frames: frames.clone(),
            queue_capacity: config.limits.queue_capacity,
            server_state: server_state.clone(),
        }));
        let restored = durables.restore()?;
        if restored > 0 {
            tracing::info!(restored, "durable subscriptions restored");
        }
        let push_client = egress.client(config.webhooks.request_timeout);
        Ok(AppState {
            inner: Arc::new(StateInner {
                config,
                log,
                durables,
                metrics,
                frames,
                auth,
                push_client,
                egress,
                ews: Arc::default(),
                mapi: Arc::default(),
                connections,
                server_state,
                hooks,
                hook_tasks: tokio_util::task::TaskTracker::new(),
                shutdown,
                started: Instant::now(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The event log.
    pub fn log(&self) -> &EmbeddedLog {
        &self.inner.log
    }

    /// Durable subscriptions.
    pub fn durables(&self) -> &subscriptions::Durables {
        &self.inner.durables
    }

    /// Metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// The shared serialization of recent events.
    pub fn frames(&self) -> &frames::EventCache {
        &self.inner.frames
    }

    /// The authenticator.
    pub fn auth(&self) -> &Arc<auth::Auth> {
        &self.inner.auth
    }

    /// The outbound policy for pushes.
    pub fn egress(&self) -> &egress::EgressPolicy {
        &self.inner.egress
    }

    /// EWS subscriptions.
    pub fn ews(&self) -> &ews::Ews {
        &self.inner.ews
    }

    /// MAPI/HTTP sessions.
    pub fn mapi(&self) -> &mapi::Mapi {
        &self.inner.mapi
    }

    /// Client connections and their presence.
    pub fn connections(&self) -> &connections::Connections {
        &self.inner.connections
    }

    /// The server's own online/offline state.
    pub fn server_state(&self) -> &server_state::ServerState {
        &self.inner.server_state
    }

    /// The connection hooks.
    pub fn hooks(&self) -> &Arc<herald_core::hooks::Hooks> {
        &self.inner.hooks
    }

    /// Runs the hooks around a cancel that has already happened (a stream closed, a lease
    /// expired): in the background, and it cannot be refused. Shutdown waits for them.
    pub fn cancelled(&self, req: herald_core::hooks::HookRequest) {
        if self.inner.hooks.is_empty() {
            return;
        }
        let hooks = self.inner.hooks.clone();
        self.inner.hook_tasks.spawn(async move {
            let _ = hooks
                .run(&req, || async { Ok::<(), std::convert::Infallible>(()) })
                .await;
        });
    }

    /// Follows `filter` after `after`, holding deliveries while the server is offline.
    pub fn follow(
        &self,
        filter: herald_core::Filter,
        after: herald_core::Watermark,
    ) -> Result<herald_log::Follower<EmbeddedLog>, herald_log::FollowError> {
        let options = herald_log::FollowOptions {
            queue_capacity: self.inner.config.limits.queue_capacity,
            ..Default::default()
        };
        herald_log::Follower::start(&self.inner.log, filter, after, options)
            .map(|f| f.gated(self.inner.server_state.gate()))
    }

    /// The outbound client for EWS push notifications (egress policy applied).
    pub fn push_client(&self) -> &reqwest::Client {
        &self.inner.push_client
    }

    /// Cancelled when the server starts shutting down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The log's last watermark (0 if it cannot be read).
    pub fn log_last(&self) -> u64 {
        use herald_log::EventLog;
        self.inner.log.bounds().map_or(0, |b| b.last.0)
    }

    /// How long the server has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

/// Serves `state` on `listener` until `state.shutdown()` is cancelled; then stops accepting,
/// lets streams send their final status, waits for open requests up to the configured
/// timeout, and makes the log durable.
pub async fn run(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    let shutdown = state.shutdown().clone();
    let addr = listener.local_addr()?;
    let sweeper = tokio::spawn(sweep_idle(state.clone()));
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "herald ready");
    let timeout = state.config().shutdown_timeout;
    let serving = tokio::spawn(serve::serve_http1(
        listener,
        app(state.clone()),
        shutdown.clone(),
        timeout,
        Some(state.config().connections.lease),
    ));
    shutdown.cancelled().await;
    tracing::info!("shutting down: closing streams and draining requests");
    if !serving.await? {
        tracing::warn!(
            ?timeout,
            "connections still open after the shutdown timeout"
        );
    }
    sweeper.abort();
    state.durables().stop_all();
    // EWS subscriptions and MAPI sessions live in memory: they end here, and hooks hear it.
    // (Durable subscriptions are restored at start without a connect, so they get no cancel.)
    for sub in state.ews().stop_all() {
        state.cancelled(sub.cancel_request("shutdown", true));
    }
    for session in state.mapi().stop_all() {
        state.cancelled(session.cancel_request("shutdown", true));
    }
    state.inner.hook_tasks.close();
    if tokio::time::timeout(timeout, state.inner.hook_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("cancel hooks still running after the shutdown timeout");
    }
    // Every connection is offline now; write those presence events before the log closes.
    state.connections().all_offline();
    state.connections().flush().await;
    let log = state.log().clone();
    tokio::task::spawn_blocking(move || log.close()).await??;
    tracing::info!("herald stopped; the log is flushed");
    Ok(())
}

/// Removes idle durable subscriptions periodically.
async fn sweep_idle(state: AppState) {
    let every = (state.config().subscriptions.idle_timeout / 4)
        .min(state.config().ews.minute / 4)
        .min(state.config().mapi.session_idle / 4)
        .min(state.config().connections.lease / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        state.durables().expire_idle().await;
        state.connections().expire_leases();
        let expired = state.ews().expire(state.config().ews.minute);
        if !expired.is_empty() {
            tracing::debug!(expired = expired.len(), "EWS subscriptions expired");
        }
        for sub in expired {
            state.cancelled(sub.cancel_request("expiry", true));
        }
        let ended = state.mapi().expire(state.config().mapi.session_idle);
        if !ended.is_empty() {
            tracing::debug!(ended = ended.len(), "idle MAPI sessions destroyed");
        }
        for session in ended {
            state.cancelled(session.cancel_request("expiry", true));
        }
    }
}
