//! A cursor: where one subscription stands. What its subscriber acknowledged (every transport
//! that resumes keeps it: durable subscriptions store it, EWS subscriptions hold it in
//! memory), and, for subscriptions a watcher follows, the newest matching watermark seen and
//! whether that position fell behind retention. Long-polls wait on it; the UDP nudger
//! follows whether something is pending.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::Watermark;
use herald_log::{EventLog, FollowError, ReadError};
use tokio::sync::{Notify, watch};

use crate::feed::{Feed, FeedItem};

/// One subscription's position; share it (it is `Sync`).
#[derive(Debug)]
pub struct Cursor {
    acked: AtomicU64,
    latest: AtomicU64,
    expired_at: AtomicU64,
    /// Woken when `latest` moves or the position expires.
    changed: Notify,
    /// Whether events wait after the acknowledged watermark.
    pending: watch::Sender<bool>,
}

impl Cursor {
    /// A cursor at `acked`, nothing pending.
    pub fn new(acked: Watermark) -> Cursor {
        Cursor {
            acked: AtomicU64::new(acked.0),
            latest: AtomicU64::new(acked.0),
            expired_at: AtomicU64::new(0),
            changed: Notify::new(),
            pending: watch::Sender::new(false),
        }
    }

    /// The acknowledged watermark.
    pub fn acked(&self) -> Watermark {
        Watermark(self.acked.load(Ordering::Acquire))
    }

    /// The newest matching watermark seen.
    pub fn latest(&self) -> Watermark {
        Watermark(self.latest.load(Ordering::Acquire))
    }

    /// Whether matching events wait after the acknowledged watermark.
    pub fn pending(&self) -> bool {
        self.latest.load(Ordering::Acquire) > self.acked.load(Ordering::Acquire)
    }

    /// Follows [`Cursor::pending`].
    pub fn pending_signal(&self) -> watch::Receiver<bool> {
        self.pending.subscribe()
    }

    /// Where the watched position expired (it fell behind retention), if it did.
    pub fn expired(&self) -> Option<Watermark> {
        match self.expired_at.load(Ordering::Acquire) {
            0 => None,
            w => Some(Watermark(w)),
        }
    }

    /// Moves the acknowledged watermark forward to `w` (never back); whether it moved. The
    /// caller stores it where the subscription is durable.
    pub fn advance(&self, w: Watermark) -> bool {
        let moved = self.acked.fetch_max(w.0, Ordering::AcqRel) < w.0;
        if moved {
            self.pending.send_replace(self.pending());
        }
        moved
    }

    /// A matching event at `w` exists.
    pub fn saw(&self, w: Watermark) {
        self.latest.fetch_max(w.0, Ordering::AcqRel);
        self.pending.send_replace(self.pending());
        self.changed.notify_waiters();
    }

    /// Waits up to `timeout` for something pending; returns whether something is.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.pending() || self.expired().is_some() {
                return self.pending();
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return self.pending(),
            }
        }
    }

    /// Follows `feed`, recording what it sees, until it fails: an expired position is
    /// recorded (waiters wake and see it); other failures are logged.
    pub async fn watch<L: EventLog + Clone>(&self, mut feed: Feed<L>) {
        loop {
            match feed.next().await {
                Ok(FeedItem::Events { batch, .. }) => {
                    if let Some(w) = batch.last_watermark() {
                        self.saw(w);
                    }
                }
                Ok(FeedItem::KeepAlive { .. }) => {}
                Err(FollowError::Position(ReadError::Expired {
                    oldest_available, ..
                })) => {
                    self.expired_at
                        .store(oldest_available.0.max(1), Ordering::Release);
                    self.changed.notify_waiters();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a subscription's watcher stopped");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_something_is_seen_or_at_its_timeout() {
        let c = std::sync::Arc::new(Cursor::new(Watermark(5)));
        assert!(
            !c.wait(Duration::from_secs(30)).await,
            "nothing seen: the timeout"
        );
        let seen = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            seen.saw(Watermark(7));
        });
        let started = tokio::time::Instant::now();
        assert!(c.wait(Duration::from_secs(30)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(*c.pending_signal().borrow());
        assert!(c.advance(Watermark(7)));
        assert!(!c.advance(Watermark(6)), "never back");
        assert!(!c.pending());
        assert!(!*c.pending_signal().borrow());
    }
}
