//! Webhook delivery: one worker per webhook subscription, one request in flight, events in log
//! order, signed per the Standard Webhooks specification, retried with a capped, jittered
//! back-off, paused after failing too long, disabled by `410 Gone`, and resumed from the
//! acknowledged watermark so an endpoint that was away gets everything it missed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::{Notification, Timestamp, Watermark};
use herald_log::{EmbeddedLog, FollowError, FollowOptions, Follower, ReadError};
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::WebhooksConfig;
use crate::frames::EventCache;
use crate::metrics::names;
use crate::subscriptions::{Durable, Durables};

/// Capped exponential back-off with jitter: retry `n` waits between half and all of
/// `base · 2^(n-1)`, never more than `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first retry's delay (before jitter).
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry `attempt` (1 for the first retry); `unit` in `[0, 1)` picks
    /// where in the jitter range it falls.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.cap)
            .min(self.cap);
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a random jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::rng().random::<f64>())
    }
}

/// A new random signing secret, `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The `webhook-signature` header: one `v1,<signature>` per secret still valid.
pub fn signature_header(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| standardwebhooks::Webhook::new(s).ok())
        .filter_map(|w| w.sign(id, timestamp, body).ok())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a webhook subscription stands, as `GET /v1/subscriptions/{id}` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryState {
    /// `verifying`, `active`, `retrying`, `paused` (failing too long), `disabled` (410).
    pub status: String,
    /// When the last delivery succeeded, microseconds since the Unix epoch.
    pub last_success_at: Option<u64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Attempts made for the delivery in progress.
    pub attempts: u32,
    /// When the next attempt is due, microseconds since the Unix epoch.
    pub next_attempt_at: Option<u64>,
    /// Since when deliveries have been failing, microseconds since the Unix epoch.
    pub failing_since: Option<u64>,
}

/// What a worker needs besides its subscription.
pub struct WebhookContext {
    /// The log, to follow and to publish operational events to.
    pub log: EmbeddedLog,
    /// Outbound client (SSRF-checked).
    pub client: reqwest::Client,
    /// Policy for URLs with literal addresses.
    pub egress: crate::egress::EgressPolicy,
    /// Settings.
    pub config: WebhooksConfig,
    /// Shared event JSON.
    pub frames: Arc<EventCache>,
    /// Queue capacity for followers.
    pub queue_capacity: usize,
    /// The server's state: offline holds deliveries.
    pub server_state: crate::server_state::ServerState,
}

/// The key operational events about webhook subscriptions are published on:
/// `herald/webhooks/<id>`.
pub fn ops_key(id: &str) -> String {
    format!("herald/webhooks/{id}")
}

/// Extended event codes on [`ops_key`].
pub mod ops {
    /// The subscription kept failing and was paused.
    pub const PAUSED: u32 = 1;
    /// The endpoint answered 410 Gone; the subscription was disabled.
    pub const DISABLED: u32 = 2;
    /// The subscription was enabled again and resumes from its watermark.
    pub const RESUMED: u32 = 3;
    /// Deliveries succeed again after failures.
    pub const RECOVERED: u32 = 4;
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    Gone,
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// An outbound error with its root cause (refused address, connection refused, timeout).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut source: &dyn std::error::Error = e;
    while let Some(s) = source.source() {
        source = s;
    }
    format!("{e}: {source}")
}

/// Sends one signed request.
async fn send(
    ctx: &WebhookContext,
    sub: &Durable,
    url: &str,
    msg_id: &str,
    body: Bytes,
) -> Attempt {
    if let Err(e) = ctx.egress.check_url(url) {
        return Attempt::Failed {
            error: e,
            retry_after: None,
        };
    }
    let ts = (Timestamp::now().0 / 1_000_000) as i64;
    let secrets = sub.webhook_secrets();
    let signature = signature_header(&secrets, msg_id, ts, &body);
    metrics::counter!(names::WEBHOOK_ATTEMPTS).increment(1);
    let result = ctx
        .client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let outcome = match result {
        Ok(r) if r.status().is_success() => Attempt::Delivered,
        Ok(r) if r.status() == reqwest::StatusCode::GONE => Attempt::Gone,
        Ok(r) => {
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Attempt::Failed {
                error: format!("the endpoint answered {}", r.status()),
                retry_after,
            }
        }
        Err(e) => {
            let why = if e.is_timeout() {
                "timed out".to_owned()
            } else {
                // The root cause says what happened (refused address, connection refused, …).
                let mut source: &dyn std::error::Error = &e;
                while let Some(s) = source.source() {
                    source = s;
                }
                format!("{e}: {source}")
            };
            Attempt::Failed {
                error: why,
                retry_after: None,
            }
        }
    };
    if !matches!(outcome, Attempt::Delivered) {
        metrics::counter!(names::WEBHOOK_FAILURES).increment(1);
    }
    outcome
}

/// Consecutive failed attempts after which a webhook endpoint counts as offline.
const OFFLINE_AFTER_FAILURES: u32 = 3;

/// Sends `body` until it is delivered, the endpoint is gone, the subscription pauses (failing
/// longer than `fail_after`) or stops. Returns whether it was delivered.
async fn deliver(
    ctx: &WebhookContext,
    durables: &Durables,
    sub: &Arc<Durable>,
    msg_id: &str,
    body: Bytes,
) -> bool {
    let backoff = Backoff {
        base: ctx.config.retry_base,
        cap: ctx.config.retry_cap,
    };
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let Some(url) = sub.webhook_url() else {
            return false;
        };
        sub.set_delivery(|d| {
            d.attempts = attempt;
            d.next_attempt_at = None;
        });
        // Offline, the attempt waits here; going offline waits for this one to finish.
        let push = tokio::select! {
            p = ctx.server_state.push() => p,
            () = sub.stopped() => return false,
        };
        let outcome = send(ctx, sub, &url, msg_id, body.clone()).await;
        drop(push);
        // Presence: online at the first success, offline once it keeps failing (a single
        // failed attempt that the next retry fixes is not worth telling).
        if matches!(outcome, Attempt::Delivered) {
            sub.set_online(true);
        } else if attempt >= OFFLINE_AFTER_FAILURES {
            sub.set_online(false);
        }
        match outcome {
            Attempt::Delivered => {
                let was_failing = sub.delivery().failing_since.is_some();
                sub.set_delivery(|d| {
                    d.status = "active".into();
                    d.last_success_at = Some(Timestamp::now().0);
                    d.last_error = None;
                    d.attempts = 0;
                    d.failing_since = None;
                });
                if was_failing {
                    publish_ops(ctx, &sub.id, ops::RECOVERED, "deliveries succeed again").await;
                }
                return true;
            }
            Attempt::Gone => {
                sub.set_online(false);
                let reason = "the endpoint answered 410 Gone";
                tracing::warn!(id = %sub.id, %url, "webhook disabled: {reason}");
                durables
                    .set_webhook_state(&sub.id, "disabled", Some(reason))
                    .await;
                sub.set_delivery(|d| {
                    d.status = "disabled".into();
                    d.last_error = Some(reason.into());
                });
                publish_ops(ctx, &sub.id, ops::DISABLED, reason).await;
                return false;
            }
            Attempt::Failed { error, retry_after } => {
                let now = Timestamp::now().0;
                let failing_since = sub.delivery().failing_since.unwrap_or(now);
                let failing_for = Duration::from_micros(now.saturating_sub(failing_since));
                tracing::debug!(id = %sub.id, %url, %error, attempt, "webhook delivery failed");
                if failing_for >= ctx.config.fail_after {
                    let reason = format!(
                        "failing for {} (last error: {error})",
                        humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
                    );
                    tracing::warn!(id = %sub.id, %url, "webhook paused: {reason}");
                    sub.set_online(false);
                    durables
                        .set_webhook_state(&sub.id, "paused", Some(&reason))
                        .await;
                    sub.set_delivery(|d| {
                        d.status = "paused".into();
                        d.last_error = Some(error.clone());
                    });
                    publish_ops(ctx, &sub.id, ops::PAUSED, &reason).await;
                    return false;
                }
                // Retry-After is honoured (beyond the back-off cap), up to the time after which
                // the subscription would pause anyway.
                let wait = retry_after
                    .map(|r| r.min(ctx.config.fail_after))
                    .unwrap_or_else(|| backoff.delay_random(attempt));
                sub.set_delivery(|d| {
                    d.status = "retrying".into();
                    d.last_error = Some(error.clone());
                    d.failing_since = Some(failing_since);
                    d.next_attempt_at = Some(now + wait.as_micros() as u64);
                });
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = sub.stopped() => return false,
                }
            }
        }
    }
}

async fn publish_ops(ctx: &WebhookContext, id: &str, code: u32, reason: &str) {
    use herald_log::EventLog;
    let data = serde_json::json!({"subscription": id, "reason": reason}).to_string();
    let n = Notification::new(
        ops_key(id),
        herald_core::Event::Extended(herald_core::Extended {
            event: code,
            data: Bytes::from(data),
        }),
    );
    if let Err(e) = ctx.log.append(vec![n], Default::default()).await {
        tracing::warn!(error = %e, "could not publish a webhook operational event");
    }
}

/// Verifies the endpoint: it must echo a random challenge (as the body, or as the JSON
/// field `challenge`). Nothing else is sent to a URL before it passes.
async fn verify(ctx: &WebhookContext, durables: &Durables, sub: &Arc<Durable>) -> bool {
    let challenge: u128 = rand::rng().random();
    let challenge = format!("{challenge:032x}");
    let body =
        serde_json::json!({"type": "verification", "subscription": sub.id, "challenge": challenge})
            .to_string();
    let msg_id = format!("{}-verify-{}", sub.id, &challenge[..8]);
    let backoff = Backoff {
        base: ctx.config.retry_base,
        cap: ctx.config.retry_cap,
    };
    let started = Timestamp::now().0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(url) = sub.webhook_url() else {
            return false;
        };
        sub.set_delivery(|d| {
            d.status = "verifying".into();
            d.attempts = attempt;
        });
        let error = match ctx.egress.check_url(&url) {
            Err(e) => e,
            Ok(_) => {
                let ts = (Timestamp::now().0 / 1_000_000) as i64;
                let sig = signature_header(&sub.webhook_secrets(), &msg_id, ts, body.as_bytes());
                let r = ctx
                    .client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &msg_id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", sig)
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let text = r.text().await.unwrap_or_default();
                        let echoed = text.trim() == challenge
                            || serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|v| {
                                    v.get("challenge")
                                        .and_then(|c| c.as_str())
                                        .map(|c| c == challenge)
                                })
                                .unwrap_or(false);
                        if echoed {
                            durables.set_webhook_verified(&sub.id).await;
                            sub.set_delivery(|d| {
                                d.status = "active".into();
                                d.attempts = 0;
                                d.last_error = None;
                            });
                            return true;
                        }
                        "the endpoint did not echo the verification challenge".to_owned()
                    }
                    Ok(r) => format!("verification answered {}", r.status()),
                    Err(e) => format!("verification failed: {}", describe(&e)),
                }
            }
        };
        let failing_for = Duration::from_micros(Timestamp::now().0.saturating_sub(started));
        if failing_for >= ctx.config.fail_after {
            durables
                .set_webhook_state(&sub.id, "paused", Some(&error))
                .await;
            sub.set_delivery(|d| {
                d.status = "paused".into();
                d.last_error = Some(error.clone());
            });
            publish_ops(ctx, &sub.id, ops::PAUSED, &error).await;
            return false;
        }
        let wait = backoff.delay_random(attempt);
        sub.set_delivery(|d| {
            d.last_error = Some(error.clone());
            d.next_attempt_at = Some(Timestamp::now().0 + wait.as_micros() as u64);
        });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = sub.stopped() => return false,
        }
    }
}

fn events_body(frames: &EventCache, id: &str, events: &[Notification]) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + events.len() * 256);
    out.put_slice(br#"{"type":"events","subscription":"#);
    out.put_slice(serde_json::to_string(id).unwrap_or_default().as_bytes());
    out.put_slice(br#","events":["#);
    for (i, n) in events.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&frames.json(n));
    }
    out.put_slice(b"]}");
    out.freeze()
}

/// The worker of one webhook subscription; runs until the subscription is deleted.
pub async fn run(ctx: Arc<WebhookContext>, durables: Durables, sub: Arc<Durable>) {
    loop {
        if sub.is_stopped() {
            return;
        }
        if sub.webhook_state() != "active" {
            sub.set_delivery(|d| d.status = sub.webhook_state());
            tokio::select! {
                () = sub.enabled() => continue,
                () = sub.stopped() => return,
            }
        }
        if !sub.webhook_verified() && !verify(&ctx, &durables, &sub).await {
            continue;
        }
        // Follow from the acknowledged watermark: after a pause, a restart or a failure,
        // everything not yet delivered comes again, in order.
        let options = FollowOptions {
            queue_capacity: ctx.queue_capacity,
            ..Default::default()
        };
        let mut follower =
            match Follower::start(&ctx.log, sub.filter().clone(), sub.acked(), options) {
                Ok(f) => f.gated(ctx.server_state.gate()),
                Err(e) => {
                    let reason = match &e {
                        FollowError::Position(ReadError::Expired { .. }) => {
                            format!("its position expired: {e}")
                        }
                        other => other.to_string(),
                    };
                    durables
                        .set_webhook_state(&sub.id, "paused", Some(&reason))
                        .await;
                    continue;
                }
            };
        let mut status_seq = 0u64;
        loop {
            let next = tokio::select! {
                n = follower.next() => Some(n),
                () = tokio::time::sleep(ctx.config.status_interval) => None,
                () = sub.stopped() => return,
            };
            match next {
                None => {
                    // Idle: a status delivery, like EWS's StatusFrequency keep-alive.
                    status_seq += 1;
                    let body = serde_json::json!({"type": "status", "subscription": sub.id, "watermark": sub.acked().0}).to_string();
                    let id = format!("{}-status-{}-{status_seq}", sub.id, sub.acked().0);
                    if !deliver(&ctx, &durables, &sub, &id, Bytes::from(body)).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(id = %sub.id, error = %e, "webhook follower stopped");
                    let reason = e.to_string();
                    durables
                        .set_webhook_state(&sub.id, "paused", Some(&reason))
                        .await;
                    break;
                }
                Some(Ok(batch)) => {
                    let mut delivered_all = true;
                    for chunk in batch.chunks(ctx.config.max_batch.max(1)) {
                        let first = chunk
                            .first()
                            .and_then(|n| n.watermark)
                            .unwrap_or(Watermark(0));
                        let last = chunk
                            .last()
                            .and_then(|n| n.watermark)
                            .unwrap_or(Watermark(0));
                        // Stable across retries: receivers dedupe on it.
                        let msg_id = format!("{}-{}-{}", sub.id, first.0, last.0);
                        let body = events_body(&ctx.frames, &sub.id, chunk);
                        if !deliver(&ctx, &durables, &sub, &msg_id, body).await {
                            delivered_all = false;
                            break;
                        }
                        for n in chunk {
                            crate::metrics::delivered("webhook", n);
                        }
                        if let Err(e) = durables.ack(&sub.id, last).await {
                            tracing::warn!(id = %sub.id, error = %e, "could not store a webhook acknowledgement");
                        }
                    }
                    if !delivered_all {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let b = Backoff {
            base: Duration::from_secs(5),
            cap: Duration::from_secs(3600),
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(2500));
        assert_eq!(b.delay(1, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(2, 1.0), Duration::from_secs(10));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(15_000));
        for attempt in 1..200 {
            for u in [0.0, 0.3, 0.999] {
                let d = b.delay(attempt, u);
                assert!(d <= b.cap, "attempt {attempt} waits {d:?}");
                assert!(d >= b.delay(attempt.min(11), 0.0).min(b.cap / 2));
            }
        }
        // The first retry does not wait an hour (the shipped `1 << n.max(6)` bug).
        assert!(b.delay(1, 1.0) < Duration::from_secs(60));
        assert_eq!(b.delay(100, 1.0), b.cap);
        assert!(b.delay(0, 1.0) <= b.base);
    }

    #[test]
    fn signatures_verify_with_every_live_secret() {
        let old = new_secret();
        let new = new_secret();
        assert!(new.starts_with("whsec_"));
        let body = br#"{"type":"events"}"#;
        let header = signature_header(&[new.clone(), old.clone()], "msg_1", 1_700_000_000, body);
        assert_eq!(header.split(' ').count(), 2);
        for secret in [&new, &old] {
            let expected = standardwebhooks::Webhook::new(secret)
                .unwrap()
                .sign("msg_1", 1_700_000_000, body)
                .unwrap();
            assert!(header.split(' ').any(|s| s == expected));
        }
    }
}
