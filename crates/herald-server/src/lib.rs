//! The `herald` server: the producer API, the subscriber transports (SSE, WebSocket,
//! long-poll), operations endpoints, and the command-line client.
//!
//! [`app`] builds the router over an [`AppState`]; [`run`] serves it on a listener until the
//! shutdown token is cancelled, then closes streams with a final status and flushes the log.

pub mod api;
pub mod auth;
pub mod cli;
mod cluster;
pub mod config;
pub mod doctor;
pub mod egress;
pub mod error;
pub mod ews;
pub mod frames;
pub mod hooks;
/// The JSON form of events lives in `herald-proto`, shared with the clients.
pub use herald_proto::json;
pub mod keys;
pub mod mapi;
pub mod metrics;
pub mod progress;
pub mod publisher;
pub mod serve;
pub mod stats;
pub mod subscriptions;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::{Hub, HubOptions};
use herald_delivery::{Delivery, ServerState};
use herald_log::{EmbeddedLog, EventLog, SharedLog};
use tokio_util::sync::CancellationToken;

pub use api::{ApiDoc, app};
pub use config::Config;

/// The log every part of the server goes through: any backend behind one handle. Which
/// backend is decided in [`AppState::open`] and nowhere else.
pub type Log = SharedLog;

/// Everything a request handler can reach: wiring only, each part owns its own job.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    config: Config,
    delivery: Delivery<Log>,
    durables: subscriptions::Durables,
    metrics: metrics::Metrics,
    frames: Arc<frames::EventCache>,
    auth: Arc<auth::Auth>,
    egress: egress::EgressPolicy,
    ews: ews::Ews,
    mapi: mapi::Mapi,
    /// This node in a cluster (the JetStream backend).
    node: Option<Arc<cluster::Node>>,
    /// The last hour of figures, for the console.
    stats: stats::History,
    started: Instant,
}

impl AppState {
    /// Opens the log in the configured data directory and restores durable subscriptions.
    /// Must be called inside a tokio runtime (deliveries are tasks).
    pub async fn open(config: Config, shutdown: CancellationToken) -> anyhow::Result<AppState> {
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
        let mut shared = None;
        let log: Log = match config.log.backend {
            config::LogBackend::Embedded => SharedLog::new(EmbeddedLog::open(
                &config.data_dir,
                config.log_options(),
                hub,
            )?),
            config::LogBackend::Jetstream => {
                let options = config.jetstream_options();
                tracing::info!(
                    servers = ?options.servers,
                    stream = %options.stream,
                    node = %options.node,
                    "the log is on NATS JetStream"
                );
                let js = herald_jetstream::JetStreamLog::connect(options, hub).await?;
                shared = Some(js.cluster().clone());
                SharedLog::new(js)
            }
        };
        let frames = Arc::new(frames::EventCache::default());
        let server_state = ServerState::new(config.state.start_offline, config.state.drain_timeout);
        let hooks = Arc::new(hooks::from_config(&config.hooks)?);
        let delivery = Delivery::new(
            log,
            config.delivery_options(),
            server_state,
            hooks,
            shutdown,
        );
        let durables = subscriptions::Durables::new(
            delivery.clone(),
            config.subscriptions.idle_timeout,
            config.limits.max_key_bytes,
            config.mapi.udp_repeat,
        );
        durables.set_webhook_worker(webhook::worker(webhook::WebhookContext {
            delivery: delivery.clone(),
            client: egress.client(config.webhooks.request_timeout),
            egress: egress.clone(),
            config: config.webhooks.clone(),
            frames: frames.clone(),
        }));
        if let Some(cluster) = &shared {
            durables.set_cluster(cluster.clone());
        }
        let restored = durables.restore().await?;
        if restored > 0 {
            tracing::info!(restored, "durable subscriptions restored");
        }
        let ews = ews::Ews::new(
            delivery.clone(),
            config.ews.clone(),
            egress.clone(),
            egress.client(config.webhooks.request_timeout),
            shared.clone(),
        );
        let taken = ews.restore().await?;
        if taken > 0 {
            tracing::info!(taken, "EWS push subscriptions of the cluster followed");
        }
        let mapi = mapi::Mapi::new(delivery.clone(), config.mapi.clone(), egress.clone());
        let node = match shared {
            Some(cluster) => {
                let node = Arc::new(cluster::Node::join(cluster, delivery.log().clone()).await?);
                let (beating, stop) = (node.clone(), delivery.shutdown().clone());
                delivery.spawn(async move { beating.run(stop).await });
                Some(node)
            }
            None => None,
        };
        let stats = stats::History::new(config.stats.sample_every, config.stats.keep);
        {
            let (sampling, metrics, every, stop) = (
                stats.clone(),
                metrics.clone(),
                config.stats.sample_every,
                delivery.shutdown().clone(),
            );
            delivery.spawn(async move { sampling.run(metrics, every, stop).await });
        }
        Ok(AppState {
            inner: Arc::new(StateInner {
                config,
                delivery,
                durables,
                metrics,
                frames,
                auth,
                egress,
                ews,
                mapi,
                node,
                stats,
                started: Instant::now(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Deliveries: feeds, pages, connects, presence, the server's state.
    pub fn delivery(&self) -> &Delivery<Log> {
        &self.inner.delivery
    }

    /// The event log.
    pub fn log(&self) -> &Log {
        self.inner.delivery.log()
    }

    /// Durable subscriptions.
    pub fn durables(&self) -> &subscriptions::Durables {
        &self.inner.durables
    }

    /// Metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// This node's name, when it is one node of a cluster.
    pub fn node_name(&self) -> Option<String> {
        self.inner.node.as_ref().map(|n| n.name().to_owned())
    }

    /// The figures kept in memory for the console.
    pub fn stats(&self) -> &stats::History {
        &self.inner.stats
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

    /// The EWS endpoint's subscriptions.
    pub fn ews(&self) -> &ews::Ews {
        &self.inner.ews
    }

    /// MAPI/HTTP sessions.
    pub fn mapi(&self) -> &mapi::Mapi {
        &self.inner.mapi
    }

    /// Cancelled when the server starts shutting down.
    pub fn shutdown(&self) -> &CancellationToken {
        self.inner.delivery.shutdown()
    }

    /// The log's last watermark (0 if it cannot be read).
    pub fn log_last(&self) -> u64 {
        self.log().bounds().map_or(0, |b| b.last.0)
    }

    /// How long the server has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

impl axum::extract::FromRef<AppState> for ews::Ews {
    fn from_ref(state: &AppState) -> Self {
        state.inner.ews.clone()
    }
}

impl axum::extract::FromRef<AppState> for mapi::Mapi {
    fn from_ref(state: &AppState) -> Self {
        state.inner.mapi.clone()
    }
}

impl axum::extract::FromRef<AppState> for Arc<auth::Auth> {
    fn from_ref(state: &AppState) -> Self {
        state.inner.auth.clone()
    }
}

/// Serves `state` on `listener` until `state.shutdown()` is cancelled; then stops accepting,
/// lets streams send their final status, waits for open requests up to the configured
/// timeout, ends every session, and makes the log durable.
pub async fn run(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    let shutdown = state.shutdown().clone();
    let addr = listener.local_addr()?;
    state.delivery().spawn(sweep_idle(state.clone()));
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "herald ready");
    let timeout = state.config().shutdown_timeout;
    let serving = tokio::spawn(serve::serve_http1_with(
        listener,
        app(state.clone()),
        shutdown.clone(),
        timeout,
        Some(state.config().connections.lease),
        state.config().limits.header_timeout,
    ));
    shutdown.cancelled().await;
    tracing::info!("shutting down: closing streams and draining requests");
    if !serving.await? {
        tracing::warn!(
            ?timeout,
            "connections still open after the shutdown timeout"
        );
    }
    // Durable subscriptions are restored at start without a connect, so they end without a
    // cancel; EWS subscriptions and MAPI sessions live in memory and end here, hooks hearing it.
    state.durables().stop_all();
    state.ews().stop_all();
    state.mapi().stop_all();
    state.delivery().close(timeout).await?;
    // Its connections went offline above: in a cluster, nobody has to speak for it.
    if let Some(node) = &state.inner.node {
        node.leave().await;
    }
    tracing::info!("herald stopped; the log is flushed");
    Ok(())
}

/// Expires idle sessions and leases periodically.
async fn sweep_idle(state: AppState) {
    // Every second: idle timeouts and leases are checked to within a second, and
    // revocations reach open streams within a second or two.
    let every = Duration::from_secs(1);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        state.durables().expire_idle().await;
        state.delivery().connections().expire_leases();
        // Revocations reach open streams through this reread.
        state.auth().reload();
        let expired = state.ews().expire();
        if expired > 0 {
            tracing::debug!(expired, "EWS subscriptions expired");
        }
        let ended = state.mapi().expire();
        if ended > 0 {
            tracing::debug!(ended, "idle MAPI sessions destroyed");
        }
    }
}
