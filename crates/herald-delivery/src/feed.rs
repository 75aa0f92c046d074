//! A feed: what one subscription receives, from a watermark on, in order, behind the
//! server's gate, with keep-alives that count the silence of this subscription.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use herald_core::{Batch, Notification, Watermark};
use herald_log::{EventLog, FollowError, Follower};
use tokio::time::Instant;

/// What a transport may additionally refuse of the events its filter selects (an EWS
/// subscription's folders and event types, say).
pub type Select = Arc<dyn Fn(&Notification) -> bool + Send + Sync>;

/// What a feed yields.
#[derive(Clone, Debug)]
pub enum FeedItem {
    /// The next events for this subscription, in order, never empty; `cursor` is the
    /// position after them (past events the subscription skipped too).
    Events {
        /// The events.
        batch: Batch,
        /// Where the feed stands after them.
        cursor: Watermark,
    },
    /// Nothing was sent for the keep-alive period: time to tell the client it is alive.
    KeepAlive {
        /// Where the feed stands.
        cursor: Watermark,
    },
}

/// One subscription's events after a watermark: caught up from the log, then live from the
/// hub, held while the server is offline, without gap or duplicate. A batch the filter
/// passes but [`Feed::select`] empties yields nothing (and does not count as sent).
pub struct Feed<L> {
    follower: Follower<L>,
    select: Option<Select>,
    keepalive: Option<Duration>,
    /// When the last item was taken by the transport (or the feed started).
    quiet_since: Instant,
    /// An item was handed out and the transport has not come back for the next yet.
    handed_out: bool,
}

impl<L> std::fmt::Debug for Feed<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("follower", &self.follower)
            .field("keepalive", &self.keepalive)
            .finish_non_exhaustive()
    }
}

impl<L: EventLog + Clone> Feed<L> {
    /// A feed over a (gated) follower.
    pub(crate) fn new(follower: Follower<L>) -> Feed<L> {
        Feed {
            follower,
            select: None,
            keepalive: None,
            quiet_since: Instant::now(),
            handed_out: false,
        }
    }

    /// Yields only the events `select` keeps.
    pub fn select(mut self, select: Select) -> Self {
        self.select = Some(select);
        self
    }

    /// Yields [`FeedItem::KeepAlive`] after `every` without an item.
    pub fn keepalive(mut self, every: Duration) -> Self {
        self.keepalive = Some(every);
        self
    }

    /// The position reached: the last event read, handed out or skipped.
    pub fn cursor(&self) -> Watermark {
        self.follower.cursor()
    }

    /// The next item. Cancel-safe: a batch taken while waiting (for the gate, say) is kept
    /// for the next call. The keep-alive period restarts when the transport comes back for
    /// the next item after taking one, so it counts what this subscription sent.
    pub async fn next(&mut self) -> Result<FeedItem, FollowError> {
        if std::mem::take(&mut self.handed_out) {
            self.quiet_since = Instant::now();
        }
        let deadline = self.keepalive.map(|k| self.quiet_since + k);
        let item = loop {
            let next = match deadline {
                Some(at) => tokio::select! {
                    n = self.follower.next() => Some(n),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(self.follower.next().await),
            };
            match next {
                None => {
                    break FeedItem::KeepAlive {
                        cursor: self.cursor(),
                    };
                }
                Some(batch) => {
                    if let Some(batch) = self.selected(batch?) {
                        break FeedItem::Events {
                            batch,
                            cursor: self.cursor(),
                        };
                    }
                }
            }
        };
        self.handed_out = true;
        Ok(item)
    }

    fn selected(&self, batch: Batch) -> Option<Batch> {
        let Some(select) = &self.select else {
            return Some(batch);
        };
        if batch.iter().all(|n| select(n)) {
            return Some(batch);
        }
        let kept: Vec<Notification> = batch.iter().filter(|n| select(n)).cloned().collect();
        (!kept.is_empty()).then(|| Batch::from(kept))
    }

    /// The feed as a stream, to merge several on one connection (a `StreamMap` of them
    /// needs no task per subscription). It ends after its first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<FeedItem, FollowError>> + Send + 'static
    where
        L: Send + Sync,
    {
        futures_util::stream::unfold(Some(self), |feed| async move {
            let mut feed = feed?;
            match feed.next().await {
                Ok(item) => Some((Ok(item), Some(feed))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}
