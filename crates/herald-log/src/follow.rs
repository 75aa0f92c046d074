//! Resume after a watermark: catch up from the log, then follow the hub, with no gap and no
//! duplicate (see `docs/design/log.md`, "Resume into the hub").

use herald_core::{
    Batch, Filter, Notification, OwnedDelivery, Receiver, SubscribeError, SubscribeOptions,
    Watermark,
};

use crate::{EventLog, LogError, ReadError};

/// How a follower reads and queues.
#[derive(Clone, Copy, Debug)]
pub struct FollowOptions {
    /// Events read from the log per page while catching up.
    pub page: usize,
    /// Capacity, in events, of the live queue filled while catching up. When it overflows the
    /// follower reads the log again instead: it costs reads, never events.
    pub queue_capacity: usize,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions {
            page: 512,
            queue_capacity: herald_core::DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// Opens and closes a [`Gate`]: closed, followers hold their next batch until it opens
/// again (a server going offline pauses deliveries without losing a place in the log).
#[derive(Debug)]
pub struct GateSwitch(tokio::sync::watch::Sender<bool>);

impl GateSwitch {
    /// A switch, open or closed.
    pub fn new(open: bool) -> GateSwitch {
        GateSwitch(tokio::sync::watch::Sender::new(open))
    }

    /// Opens or closes every gate of this switch.
    pub fn set_open(&self, open: bool) {
        self.0.send_replace(open);
    }

    /// Whether the gates are open.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// A gate that follows this switch.
    pub fn gate(&self) -> Gate {
        Gate(self.0.subscribe())
    }
}

/// The receiving side of a [`GateSwitch`].
#[derive(Clone, Debug)]
pub struct Gate(tokio::sync::watch::Receiver<bool>);

impl Gate {
    /// Whether deliveries may go now.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the gate is open (at once if it is; forever never: a dropped switch counts
    /// as open). Cancel-safe.
    pub async fn opened(&mut self) {
        let _ = self.0.wait_for(|open| *open).await;
    }

    /// Waits until the gate opens or closes (forever, once the switch is dropped).
    /// Cancel-safe.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a follower stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// The position cannot be resumed from (expired, or ahead of the log).
    #[error(transparent)]
    Position(#[from] ReadError),
    /// The hub refused the live subscription.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The live subscription was closed (unsubscribed, or the hub shut down).
    #[error("the live subscription was closed")]
    Closed,
}

enum Phase {
    /// Reading the log after the cursor.
    CatchUp,
    /// Taking live batches from the hub.
    Live,
}

/// Every event selected by a filter after a watermark, exactly once and in order: first from
/// the log, then live from the hub.
pub struct Follower<L> {
    log: L,
    filter: Filter,
    cursor: Watermark,
    live: Receiver,
    phase: Phase,
    options: FollowOptions,
    gate: Option<Gate>,
    /// A batch taken while the gate was closed, handed out when it opens.
    held: Option<Batch>,
}

impl<L> std::fmt::Debug for Follower<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("filter", &self.filter)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl<L: EventLog + Clone> Follower<L> {
    /// Starts following `filter` after watermark `after` (0: from the start of the log).
    /// Fails at once if that position has expired or is ahead of the log.
    pub fn start(
        log: &L,
        filter: Filter,
        after: Watermark,
        options: FollowOptions,
    ) -> Result<Self, FollowError> {
        // Subscribe before reading: everything published from now on is queued.
        let live = log.hub().subscribe_receiver(
            filter.scope.clone(),
            filter.mask,
            SubscribeOptions::default().with_queue_capacity(options.queue_capacity),
        )?;
        log.bounds()?.check(after)?;
        Ok(Follower {
            log: log.clone(),
            filter,
            cursor: after,
            live,
            phase: Phase::CatchUp,
            options,
            gate: None,
            held: None,
        })
    }

    /// Holds every batch until `gate` is open.
    pub fn gated(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The watermark of the last event read (handed out or skipped by the filter).
    pub fn cursor(&self) -> Watermark {
        self.cursor
    }

    /// The next events, in order; waits for live ones once caught up, and for the gate to be
    /// open. Cancel-safe: a batch taken while waiting for the gate is kept for the next call.
    pub async fn next(&mut self) -> Result<Batch, FollowError> {
        if self.held.is_none() {
            self.held = Some(self.next_ungated().await?);
        }
        if let Some(gate) = &mut self.gate {
            gate.opened().await;
        }
        self.held.take().ok_or(FollowError::Closed)
    }

    async fn next_ungated(&mut self) -> Result<Batch, FollowError> {
        loop {
            match self.phase {
                Phase::CatchUp => {
                    let page = self.log.read(self.cursor, self.options.page).await?;
                    let Some(last) = page.last().and_then(|n| n.watermark) else {
                        self.phase = Phase::Live;
                        continue;
                    };
                    self.cursor = last;
                    let selected: Vec<Notification> = page
                        .into_iter()
                        .filter(|n| self.filter.matches(n))
                        .collect();
                    if !selected.is_empty() {
                        return Ok(Batch::from(selected));
                    }
                }
                Phase::Live => match self.live.recv().await {
                    None => return Err(FollowError::Closed),
                    Some(OwnedDelivery::Overflow(_)) => self.phase = Phase::CatchUp,
                    Some(OwnedDelivery::Events(batch)) => {
                        if let Some(out) = self.after_cursor(batch) {
                            return Ok(out);
                        }
                    }
                },
            }
        }
    }

    /// The part of a live batch after the cursor (events read from the log already may come
    /// again live), moving the cursor.
    fn after_cursor(&mut self, batch: Batch) -> Option<Batch> {
        let cursor = self.cursor;
        let fresh = |n: &Notification| n.watermark.is_some_and(|w| w > cursor);
        let out = if batch.iter().all(fresh) {
            batch
        } else {
            let kept: Vec<Notification> = batch.iter().filter(|n| fresh(n)).cloned().collect();
            if kept.is_empty() {
                return None;
            }
            Batch::from(kept)
        };
        if let Some(w) = out.last_watermark() {
            self.cursor = w;
        }
        Some(out)
    }
}
