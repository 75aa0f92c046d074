//! The metrics the delivery layer records (Prometheus names; the server renders them).

/// Metric names recorded here; the server describes and renders them.
pub mod names {
    /// Counter: events delivered to subscribers, by transport.
    pub const DELIVERIES: &str = "herald_deliveries_total";
    /// Histogram: seconds from an event's timestamp to its delivery, by transport.
    pub const DELIVERY_LAG_SECONDS: &str = "herald_delivery_lag_seconds";
    /// Counter: connections going online or offline, by new state.
    pub const PRESENCE_CHANGES: &str = "herald_presence_changes_total";
    /// Gauge: the server's state (1 online, 0 offline).
    pub const SERVER_ONLINE: &str = "herald_server_online";
    /// Counter: presence events refused because the presence queue was full.
    pub const PRESENCE_OVERFLOWS: &str = "herald_presence_overflows_total";
    /// Counter: push attempts (webhooks, EWS push), by transport.
    pub const PUSH_ATTEMPTS: &str = "herald_push_attempts_total";
    /// Counter: failed push attempts, by transport.
    pub const PUSH_FAILURES: &str = "herald_push_failures_total";
}

/// Records the delivery of `n` over `transport` (its label).
pub fn delivered(transport: &'static str, n: &herald_core::Notification) {
    metrics::counter!(names::DELIVERIES, "transport" => transport).increment(1);
    let lag = herald_core::Timestamp::now()
        .0
        .saturating_sub(n.timestamp.0) as f64
        / 1e6;
    metrics::histogram!(names::DELIVERY_LAG_SECONDS, "transport" => transport).record(lag);
}

/// Records `n` deliveries over `transport` whose events are no longer at hand.
pub fn delivered_count(transport: &'static str, n: usize) {
    metrics::counter!(names::DELIVERIES, "transport" => transport).increment(n as u64);
}
