//! Webhooks: the request of each delivery (signed per the Standard Webhooks specification),
//! the endpoint's verification, and the worker of a webhook subscription: one request in
//! flight, events in log order from the acknowledged watermark, status deliveries when idle.
//! Retries, back-off, pausing and presence are the delivery layer's [`Pusher`]; a paused or
//! disabled subscription resumes from its acknowledged watermark when enabled again.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::{Notification, Timestamp, Watermark};
use herald_delivery::{
    Attempt, Backoff, Delivery, FeedItem, GiveUp, PushStatus, Pushed, Pusher, RetryPolicy,
};
use herald_log::{EventLog, FollowError, ReadError};

use crate::Log;
use crate::config::WebhooksConfig;
use crate::frames::{EventCache, StateAdvise, told};
use crate::metrics::names;
use crate::subscriptions::{DurableRef, Durables, WebhookState, WebhookWorker};

/// The `webhook-signature` header: one `v1,<signature>` per secret still valid.
pub fn signature_header(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| standardwebhooks::Webhook::new(s).ok())
        .filter_map(|w| w.sign(id, timestamp, body).ok())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the workers need besides their subscription.
pub struct WebhookContext {
    /// Feeds, pushes, and the log operational events are published to.
    pub delivery: Delivery<Log>,
    /// Outbound client (SSRF-checked).
    pub client: reqwest::Client,
    /// Policy for URLs with literal addresses.
    pub egress: crate::egress::EgressPolicy,
    /// Settings.
    pub config: WebhooksConfig,
    /// Shared event JSON.
    pub frames: Arc<EventCache>,
}

/// Consecutive failed attempts after which a webhook endpoint counts as offline.
const OFFLINE_AFTER_FAILURES: u32 = 3;

/// The retry policy of webhooks: capped, jittered back-off (an endpoint's `Retry-After` is
/// honoured), paused once failing for `fail_after`.
pub fn policy(config: &WebhooksConfig) -> RetryPolicy {
    RetryPolicy {
        backoff: Backoff {
            base: config.retry_base,
            cap: config.retry_cap,
        },
        give_up: GiveUp::FailingFor(config.fail_after),
        honour_retry_after: true,
        offline_after: OFFLINE_AFTER_FAILURES,
    }
}

/// The worker of every webhook subscription, for [`Durables::set_webhook_worker`].
pub fn worker(ctx: WebhookContext) -> WebhookWorker {
    let policy = policy(&ctx.config);
    let ctx = Arc::new(ctx);
    WebhookWorker {
        policy,
        run: Arc::new(move |durables, sub| Box::pin(run(ctx.clone(), durables, sub))),
    }
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

/// Sends one signed request; on success, the answer's body.
async fn send(ctx: &WebhookContext, sub: &DurableRef, msg_id: &str, body: Bytes) -> Attempt<Bytes> {
    let Some(url) = sub.webhook_url() else {
        return Attempt::Gone("not a webhook subscription".into());
    };
    if let Err(e) = ctx.egress.check_url(&url) {
        return Attempt::Failed {
            error: e,
            retry_after: None,
        };
    }
    let ts = (Timestamp::now().0 / 1_000_000) as i64;
    let signature = signature_header(&sub.webhook_secrets(), msg_id, ts, &body);
    metrics::counter!(names::WEBHOOK_ATTEMPTS).increment(1);
    let outcome = crate::egress::attempt(
        ctx.client
            .post(&url)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body),
    )
    .await;
    if !matches!(outcome, Attempt::Delivered(_)) {
        metrics::counter!(names::WEBHOOK_FAILURES).increment(1);
    }
    outcome
}

/// Delivers one message until it is delivered (true), or the subscription pauses, is
/// disabled or stops (false).
async fn deliver(
    ctx: &WebhookContext,
    durables: &Durables,
    sub: &DurableRef,
    pusher: &Pusher,
    msg_id: &str,
    body: Bytes,
) -> bool {
    let was_failing = pusher.state().failing_since.is_some();
    let failures = std::sync::atomic::AtomicU32::new(0);
    let pushed = pusher
        .push(
            |online| sub.set_online(online),
            sub.stop(),
            || {
                let body = body.clone();
                let failures = &failures;
                async move {
                    let a = send(ctx, sub, msg_id, body).await;
                    if !matches!(a, Attempt::Delivered(_)) {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    a
                }
            },
        )
        .await;
    match pushed {
        Pushed::Delivered(_) => {
            if was_failing || failures.into_inner() > 0 {
                publish_ops(ctx, sub.id(), ops::RECOVERED, "deliveries succeed again").await;
            }
            true
        }
        Pushed::Gone(reason) => {
            tracing::warn!(id = %sub.id(), "webhook disabled: {reason}");
            durables
                .set_webhook_state(sub, WebhookState::Disabled, Some(&reason))
                .await;
            publish_ops(ctx, sub.id(), ops::DISABLED, &reason).await;
            false
        }
        Pushed::GaveUp(error) => {
            let failing_for = pusher
                .state()
                .failing_since
                .map_or(0, |t| Timestamp::now().0.saturating_sub(t));
            let reason = format!(
                "failing for {} (last error: {error})",
                humantime::format_duration(Duration::from_secs(failing_for / 1_000_000))
            );
            pause(ctx, durables, sub, &reason).await;
            false
        }
        Pushed::Stopped => false,
    }
}

async fn pause(ctx: &WebhookContext, durables: &Durables, sub: &DurableRef, reason: &str) {
    tracing::warn!(id = %sub.id(), "webhook paused: {reason}");
    sub.set_online(false);
    durables
        .set_webhook_state(sub, WebhookState::Paused, Some(reason))
        .await;
    if let Some(p) = sub.pusher() {
        p.set_status(PushStatus::Paused, None);
    }
    publish_ops(ctx, sub.id(), ops::PAUSED, reason).await;
}

async fn publish_ops(ctx: &WebhookContext, id: &str, code: u32, reason: &str) {
    let data = serde_json::json!({"subscription": id, "reason": reason}).to_string();
    let n = Notification::new(
        ops_key(id),
        herald_core::Event::Extended(herald_core::Extended {
            event: code,
            data: Bytes::from(data),
        }),
    );
    if let Err(e) = ctx.delivery.log().append(vec![n], Default::default()).await {
        tracing::warn!(error = %e, "could not publish a webhook operational event");
    }
}

/// Whether `answer` echoes `challenge` (as the body, or as the JSON field `challenge`).
fn echoes(answer: &[u8], challenge: &str) -> bool {
    let text = String::from_utf8_lossy(answer);
    text.trim() == challenge
        || serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.get("challenge")
                    .and_then(|c| c.as_str())
                    .map(|c| c == challenge)
            })
            .unwrap_or(false)
}

/// Verifies the endpoint: it must echo a random challenge. Nothing else is sent to a URL
/// before it passes.
async fn verify(
    ctx: &WebhookContext,
    durables: &Durables,
    sub: &DurableRef,
    pusher: &Pusher,
) -> bool {
    let challenge = format!("{:032x}", rand::random::<u128>());
    let body = Bytes::from(
        serde_json::json!({"type": "verification", "subscription": sub.id(), "challenge": challenge})
            .to_string(),
    );
    let msg_id = format!("{}-verify-{}", sub.id(), &challenge[..8]);
    pusher.set_status(PushStatus::Verifying, None);
    let pushed = pusher
        .push(
            |online| sub.set_online(online),
            sub.stop(),
            || {
                let body = body.clone();
                let (msg_id, challenge) = (&msg_id, &challenge);
                async move {
                    match send(ctx, sub, msg_id, body).await {
                        Attempt::Delivered(answer) if echoes(&answer, challenge) => {
                            Attempt::Delivered(())
                        }
                        Attempt::Delivered(_) => Attempt::Failed {
                            error: "the endpoint did not echo the verification challenge".into(),
                            retry_after: None,
                        },
                        Attempt::Gone(error) | Attempt::Failed { error, .. } => Attempt::Failed {
                            error: format!("verification failed: {error}"),
                            retry_after: None,
                        },
                    }
                }
            },
        )
        .await;
    match pushed {
        Pushed::Delivered(()) => {
            durables.set_webhook_verified(sub).await;
            pusher.set_status(PushStatus::Active, None);
            true
        }
        Pushed::GaveUp(error) | Pushed::Gone(error) => {
            pause(ctx, durables, sub, &error).await;
            false
        }
        Pushed::Stopped => false,
    }
}

fn events_body(
    frames: &EventCache,
    id: &str,
    advise: Option<StateAdvise>,
    events: &[Notification],
) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + events.len() * 256);
    out.put_slice(br#"{"type":"events","subscription":"#);
    out.put_slice(serde_json::to_string(id).unwrap_or_default().as_bytes());
    out.put_slice(br#","events":["#);
    let mut first = true;
    for n in events {
        for m in told(n, advise).as_slice() {
            if !std::mem::take(&mut first) {
                out.put_u8(b',');
            }
            out.put_slice(&frames.json(m));
        }
    }
    out.put_slice(b"]}");
    out.freeze()
}

/// Delivers one chunk of events: its end is stored as in flight first, so that after a
/// restart the same chunk goes again with the same webhook-id (stable across retries and
/// restarts: receivers dedupe on it); acknowledged once delivered. Whether it was.
async fn deliver_chunk(
    ctx: &WebhookContext,
    durables: &Durables,
    sub: &DurableRef,
    pusher: &Pusher,
    chunk: &[Notification],
) -> bool {
    let (Some(first), Some(last)) = (
        chunk.first().and_then(|n| n.watermark),
        chunk.last().and_then(|n| n.watermark),
    ) else {
        return true;
    };
    if sub.inflight() != Some(last) {
        durables.set_inflight(sub, last).await;
    }
    let msg_id = format!("{}-{}-{}", sub.id(), first.0, last.0);
    let body = events_body(&ctx.frames, sub.id(), sub.advise(), chunk);
    if !deliver(ctx, durables, sub, pusher, &msg_id, body).await {
        return false;
    }
    crate::metrics::delivered_all("webhook", chunk);
    if let Err(e) = durables.ack(sub, last).await {
        tracing::warn!(id = %sub.id(), error = %e, "could not store a webhook acknowledgement");
    }
    true
}

/// Delivers again the chunk that was in flight when the server stopped: the matching events
/// after the acknowledged watermark up to `through`. Whether it was delivered; an error if
/// those events can no longer be read.
async fn redeliver(
    ctx: &WebhookContext,
    durables: &Durables,
    sub: &DurableRef,
    pusher: &Pusher,
    through: Watermark,
) -> Result<bool, String> {
    let page = ctx
        .delivery
        .page(
            herald_delivery::PageRequest {
                after: sub.acked(),
                limit: usize::MAX,
                scan_budget: usize::MAX,
                ceiling: through,
            },
            through,
            |n| sub.filter().matches(n),
        )
        .await
        .map_err(|e| format!("the delivery in flight at the last stop cannot be read: {e}"))?;
    if page.events.is_empty() {
        return Ok(true);
    }
    Ok(deliver_chunk(ctx, durables, sub, pusher, &page.events).await)
}

/// The worker of one webhook subscription; runs until the subscription is deleted.
async fn run(ctx: Arc<WebhookContext>, durables: Durables, sub: DurableRef) {
    let Some(pusher) = sub.pusher().cloned() else {
        return;
    };
    loop {
        if sub.is_stopped() {
            return;
        }
        match sub.webhook_state() {
            WebhookState::Active => {}
            held => {
                let status = match held {
                    WebhookState::Disabled => PushStatus::Disabled,
                    _ => PushStatus::Paused,
                };
                pusher.set_status(status, None);
                tokio::select! {
                    () = sub.enabled() => continue,
                    () = sub.stopped() => return,
                }
            }
        }
        if !sub.webhook_verified() && !verify(&ctx, &durables, &sub, &pusher).await {
            continue;
        }
        // A delivery attempted before a restart goes again first, exactly as it was (same
        // events, same webhook-id), so that receivers deduplicating on the id see it once.
        if let Some(through) = sub.inflight() {
            match redeliver(&ctx, &durables, &sub, &pusher, through).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(reason) => {
                    durables
                        .set_webhook_state(&sub, WebhookState::Paused, Some(&reason))
                        .await;
                    continue;
                }
            }
        }
        // Follow from the acknowledged watermark: after a pause, a restart or a failure,
        // everything not yet delivered comes again, in order.
        let feed = ctx.delivery.feed(sub.filter().clone(), sub.acked());
        let mut feed = match feed {
            Ok(f) => f.keepalive(ctx.config.status_interval),
            Err(e) => {
                let reason = match &e {
                    FollowError::Position(ReadError::Expired { .. }) => {
                        format!("its position expired: {e}")
                    }
                    other => other.to_string(),
                };
                durables
                    .set_webhook_state(&sub, WebhookState::Paused, Some(&reason))
                    .await;
                continue;
            }
        };
        let mut status_seq = 0u64;
        loop {
            let next = tokio::select! {
                n = feed.next() => n,
                () = sub.stopped() => return,
            };
            match next {
                Ok(FeedItem::KeepAlive { .. }) => {
                    // Idle: a status delivery, like EWS's StatusFrequency keep-alive.
                    status_seq += 1;
                    let acked = sub.acked().0;
                    let body = serde_json::json!({"type": "status", "subscription": sub.id(), "watermark": acked}).to_string();
                    let id = format!("{}-status-{acked}-{status_seq}", sub.id());
                    if !deliver(&ctx, &durables, &sub, &pusher, &id, Bytes::from(body)).await {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(id = %sub.id(), error = %e, "webhook feed stopped");
                    durables
                        .set_webhook_state(&sub, WebhookState::Paused, Some(&e.to_string()))
                        .await;
                    break;
                }
                Ok(FeedItem::Events { batch, .. }) => {
                    let mut delivered_all = true;
                    for chunk in batch.chunks(ctx.config.max_batch.max(1)) {
                        if !deliver_chunk(&ctx, &durables, &sub, &pusher, chunk).await {
                            delivered_all = false;
                            break;
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
    fn signatures_verify_with_every_live_secret() {
        let old = crate::subscriptions::new_secret();
        let new = crate::subscriptions::new_secret();
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

    #[test]
    fn a_challenge_is_echoed_as_the_body_or_a_json_field() {
        assert!(echoes(b"abc\n", "abc"));
        assert!(echoes(br#"{"challenge":"abc"}"#, "abc"));
        assert!(!echoes(b"abd", "abc"));
        assert!(!echoes(br#"{"challenge":1}"#, "abc"));
    }
}
