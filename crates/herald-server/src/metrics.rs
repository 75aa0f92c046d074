//! Prometheus metrics: one recorder per process, rendered at `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names, in one place (those the delivery layer records are its own).
pub mod names {
    pub use herald_delivery::metrics::names::*;

    /// Counter: events durably appended.
    pub const EVENTS_APPENDED: &str = "herald_events_appended_total";
    /// Counter: `POST /v1/events` requests, by outcome.
    pub const APPEND_REQUESTS: &str = "herald_append_requests_total";
    /// Histogram: seconds from receiving a batch to its durable acknowledgement.
    pub const APPEND_SECONDS: &str = "herald_append_duration_seconds";
    /// Gauge: open subscriber connections, by transport.
    pub const CONNECTIONS: &str = "herald_connections";
    /// Counter: per-subscriber queue overflows (each made the subscriber resync from the log).
    pub const QUEUE_OVERFLOWS: &str = "herald_queue_overflows_total";
    /// Gauge: durable subscriptions.
    pub const DURABLE_SUBSCRIPTIONS: &str = "herald_durable_subscriptions";
    /// Counter: webhook delivery attempts.
    pub const WEBHOOK_ATTEMPTS: &str = "herald_webhook_attempts_total";
    /// Counter: failed webhook delivery attempts.
    pub const WEBHOOK_FAILURES: &str = "herald_webhook_failures_total";
    /// Gauge: the log's last watermark.
    pub const LOG_LAST_WATERMARK: &str = "herald_log_last_watermark";
    /// Gauge: bytes the log holds (set when `/metrics` is rendered).
    pub const LOG_BYTES: &str = "herald_log_bytes";
    /// Counter: hook calls, by phase and decision.
    pub const HOOK_CALLS: &str = "herald_hook_calls_total";
    /// Gauge: tasks alive on the server's tokio runtime (set when `/metrics` is rendered).
    pub const TOKIO_TASKS: &str = "herald_tokio_tasks";
}

/// The process's metrics recorder and its renderer.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl Metrics {
    /// Installs the global recorder the first time; later calls share it.
    pub fn install() -> Metrics {
        let handle = HANDLE
            .get_or_init(|| {
                let buckets = [
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0,
                ];
                let recorder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                    .map(|b| b.build_recorder());
                match recorder {
                    Ok(recorder) => {
                        let handle = recorder.handle();
                        if metrics::set_global_recorder(recorder).is_err() {
                            tracing::warn!("a metrics recorder was already installed");
                        }
                        describe();
                        handle
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "metrics recorder setup failed");
                        PrometheusBuilder::new().build_recorder().handle()
                    }
                }
            })
            .clone();
        Metrics { handle }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn describe() {
    use names::*;
    metrics::describe_counter!(EVENTS_APPENDED, "Events durably appended to the log.");
    metrics::describe_counter!(APPEND_REQUESTS, "POST /v1/events requests, by outcome.");
    metrics::describe_histogram!(
        APPEND_SECONDS,
        metrics::Unit::Seconds,
        "From receiving a batch to its durable acknowledgement."
    );
    metrics::describe_counter!(DELIVERIES, "Events delivered to subscribers, by transport.");
    metrics::describe_histogram!(
        DELIVERY_LAG_SECONDS,
        metrics::Unit::Seconds,
        "From an event's timestamp to its delivery, by transport."
    );
    metrics::describe_gauge!(CONNECTIONS, "Open subscriber connections, by transport.");
    metrics::describe_counter!(
        QUEUE_OVERFLOWS,
        "Subscriber queue overflows (the subscriber resynced from the log)."
    );
    metrics::describe_gauge!(DURABLE_SUBSCRIPTIONS, "Durable subscriptions.");
    metrics::describe_counter!(WEBHOOK_ATTEMPTS, "Webhook delivery attempts.");
    metrics::describe_counter!(WEBHOOK_FAILURES, "Failed webhook delivery attempts.");
    metrics::describe_counter!(
        PRESENCE_CHANGES,
        "Connections going online or offline, by new state."
    );
    metrics::describe_gauge!(SERVER_ONLINE, "The server's state: 1 online, 0 offline.");
    metrics::describe_counter!(HOOK_CALLS, "Connection hook calls, by phase and decision.");
    metrics::describe_gauge!(LOG_LAST_WATERMARK, "The log's last watermark.");
    metrics::describe_gauge!(
        LOG_BYTES,
        metrics::Unit::Bytes,
        "Bytes of the events the log holds (what max_bytes retention counts)."
    );
    metrics::describe_counter!(
        PRESENCE_OVERFLOWS,
        "Connects refused because the presence backlog was full."
    );
    metrics::describe_counter!(
        PUSH_ATTEMPTS,
        "Push attempts (webhooks, EWS push), by transport."
    );
    metrics::describe_counter!(PUSH_FAILURES, "Failed push attempts, by transport.");
    metrics::describe_gauge!(
        TOKIO_TASKS,
        "Tasks alive on the server's tokio runtime (a steady rise under steady load is a leak)."
    );
}

/// Counts an open connection of a transport until dropped.
pub struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    /// Counts one more open connection on `transport`.
    pub fn open(transport: &'static str) -> Self {
        metrics::gauge!(names::CONNECTIONS, "transport" => transport).increment(1.0);
        ConnectionGauge(transport)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(names::CONNECTIONS, "transport" => self.0).decrement(1.0);
    }
}

pub use herald_delivery::metrics::{delivered_all, delivered_count};
