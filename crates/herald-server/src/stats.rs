//! The figures the server keeps in memory for its console: a sample of the main metrics every
//! `stats.sample_every`, for `stats.keep` (bounded: at most [`MAX_SAMPLES`]). Samples are read
//! from the same Prometheus registry `/metrics` renders, so the console and a scraper never
//! disagree, and an operator needs no Prometheus to see the last hour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::metrics::names;

/// The most samples kept, whatever the configuration.
pub const MAX_SAMPLES: usize = 3600;

/// One sample: rates over the interval before it, and levels at its time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// When it was taken, seconds since the Unix epoch.
    pub at: u64,
    /// Events appended per second over the interval.
    pub events_in_per_second: f64,
    /// Events delivered to subscribers per second over the interval (every transport).
    pub deliveries_per_second: f64,
    /// Median delivery latency over the interval, in milliseconds (from the event's
    /// timestamp to its delivery; bucket resolution); absent without deliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// Open subscriber connections, by transport.
    pub connections: BTreeMap<String, u64>,
    /// The log's last watermark.
    pub log_last: u64,
}

/// The totals a sample is computed from.
#[derive(Clone, Debug, Default)]
struct Totals {
    events_in: f64,
    deliveries: f64,
    /// Delivery latency histogram: cumulative counts by upper bound (seconds).
    latency: Vec<(f64, f64)>,
    connections: BTreeMap<String, u64>,
    log_last: u64,
}

/// Reads the totals from a Prometheus text exposition.
fn totals(text: &str) -> Totals {
    let mut t = Totals::default();
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_owned())
            })
        };
        match name {
            n if n == names::EVENTS_APPENDED => t.events_in += value,
            n if n == herald_delivery::metrics::names::DELIVERIES => t.deliveries += value,
            n if n == names::CONNECTIONS => {
                let transport = label("transport").unwrap_or_default();
                *t.connections.entry(transport).or_default() += value.max(0.0) as u64;
            }
            n if n == names::LOG_LAST_WATERMARK => t.log_last = value as u64,
            n if n.strip_suffix("_bucket")
                == Some(herald_delivery::metrics::names::DELIVERY_LAG_SECONDS) =>
            {
                if let Some(le) = label("le") {
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    *buckets.entry(bound.to_bits()).or_default() += value;
                }
            }
            _ => {}
        }
    }
    let mut latency: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(b, c)| (f64::from_bits(b), c))
        .collect();
    latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    t.latency = latency;
    t
}

/// The `q` quantile of the deliveries between two cumulative histograms, as the upper bound
/// of the bucket it falls in (milliseconds).
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, c)| {
            let was = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, (c - was).max(0.0))
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (bound, _) = counts.iter().find(|(_, c)| *c >= rank)?;
    Some(if bound.is_finite() {
        bound * 1000.0
    } else {
        10_000.0
    })
}

/// The kept samples; cheap to clone.
#[derive(Clone, Default)]
pub struct History {
    inner: Arc<Mutex<Kept>>,
}

#[derive(Default)]
struct Kept {
    samples: VecDeque<Sample>,
    capacity: usize,
    last: Option<(std::time::Instant, Totals)>,
}

impl History {
    /// An empty history keeping `keep / every` samples (at most [`MAX_SAMPLES`]).
    pub fn new(every: Duration, keep: Duration) -> History {
        let capacity = (keep.as_secs_f64() / every.as_secs_f64().max(0.001)).ceil() as usize;
        History {
            inner: Arc::new(Mutex::new(Kept {
                samples: VecDeque::new(),
                capacity: capacity.clamp(1, MAX_SAMPLES),
                last: None,
            })),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a sample from a Prometheus exposition `text` at `now`.
    pub fn sample(&self, text: &str, now: std::time::Instant, at: u64) {
        let t = totals(text);
        let mut k = self.kept();
        if let Some((then, before)) = &k.last {
            let secs = now.duration_since(*then).as_secs_f64().max(0.001);
            let s = Sample {
                at,
                events_in_per_second: (t.events_in - before.events_in).max(0.0) / secs,
                deliveries_per_second: (t.deliveries - before.deliveries).max(0.0) / secs,
                latency_p50_ms: quantile(&before.latency, &t.latency, 0.5),
                latency_p99_ms: quantile(&before.latency, &t.latency, 0.99),
                connections: t.connections.clone(),
                log_last: t.log_last,
            };
            if k.samples.len() == k.capacity {
                k.samples.pop_front();
            }
            k.samples.push_back(s);
        }
        k.last = Some((now, t));
    }

    /// The samples of the last `seconds` (all when `None`), oldest first.
    pub fn samples(&self, since: Option<u64>) -> Vec<Sample> {
        let k = self.kept();
        k.samples
            .iter()
            .filter(|s| since.is_none_or(|t| s.at >= t))
            .cloned()
            .collect()
    }

    /// Samples every `every` until `stop` is cancelled.
    pub async fn run(
        self,
        metrics: crate::metrics::Metrics,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.sample(&metrics.render(), std::time::Instant::now(), at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(events: u64, deliveries: u64, fast: u64, slow: u64, ws: u64) -> String {
        format!(
            "# TYPE herald_events_appended_total counter\n\
             herald_events_appended_total {events}\n\
             herald_deliveries_total{{transport=\"sse\"}} {deliveries}\n\
             herald_connections{{transport=\"websocket\"}} {ws}\n\
             herald_connections{{transport=\"sse\"}} 2\n\
             herald_log_last_watermark {events}\n\
             herald_delivery_lag_seconds_bucket{{transport=\"sse\",le=\"0.001\"}} {fast}\n\
             herald_delivery_lag_seconds_bucket{{transport=\"sse\",le=\"0.01\"}} {}\n\
             herald_delivery_lag_seconds_bucket{{transport=\"sse\",le=\"+Inf\"}} {}\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn rates_and_percentiles_come_from_the_interval_between_two_samples() {
        let h = History::new(Duration::from_secs(10), Duration::from_secs(3600));
        let t0 = std::time::Instant::now();
        h.sample(&exposition(100, 50, 10, 0, 1), t0, 1000);
        assert!(h.samples(None).is_empty(), "a rate needs two samples");
        // 10 s later: 1,000 more events in, 500 more delivered, 98 fast and 2 slow.
        h.sample(
            &exposition(1100, 550, 108, 2, 3),
            t0 + Duration::from_secs(10),
            1010,
        );
        let s = &h.samples(None)[0];
        assert_eq!(s.events_in_per_second, 100.0);
        assert_eq!(s.deliveries_per_second, 50.0);
        assert_eq!(s.latency_p50_ms, Some(1.0));
        assert_eq!(s.latency_p99_ms, Some(10.0));
        assert_eq!(s.connections["websocket"], 3);
        assert_eq!(s.connections["sse"], 2);
        assert_eq!(s.log_last, 1100);
    }

    #[test]
    fn the_history_keeps_its_bound_and_drops_the_oldest() {
        let h = History::new(Duration::from_secs(10), Duration::from_secs(30));
        let t0 = std::time::Instant::now();
        for i in 0..10u64 {
            h.sample(
                &exposition(i * 10, 0, 0, 0, 0),
                t0 + Duration::from_secs(10 * i),
                i,
            );
        }
        let s = h.samples(None);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(|s| s.at).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(h.samples(Some(9)).len(), 1);
        assert!(s.iter().all(|s| s.latency_p50_ms.is_none()));
        let huge = History::new(Duration::from_millis(1), Duration::from_secs(86_400));
        assert_eq!(huge.kept().capacity, MAX_SAMPLES);
    }
}
