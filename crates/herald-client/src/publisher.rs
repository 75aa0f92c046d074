//! Ordered pipelined publishing over one WebSocket, safe across reconnects.
//!
//! The task owns the connection and the batches sent and not yet answered, in send order.
//! The server appends a connection's batches in the order they came and answers them in that
//! order. When the connection is lost, the unanswered batches are sent again, in order, on a
//! new connection: each carries the idempotency key it was first sent with, so one the server
//! had already appended is answered `replayed` and not appended twice.
//!
//! After a batch fails, the server answers the batches sent after it `aborted` until one
//! comes with `restart`; the publisher reports those as [`Error::Aborted`] and sends the next
//! new batch with `restart`, so nothing sent after a failure is appended before the
//! application has heard of it. A batch that would have been aborted is never re-sent on a
//! new connection either: it is answered `Aborted` there and then.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};
use herald_proto::json::EventJson;
use herald_proto::ws::{ClientFrame, ServerFrame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::connection::{Attempts, Ws};
use crate::{Config, Error};

/// A batch's answer: once durable, its watermarks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// One watermark per event, in order.
    pub watermarks: Vec<u64>,
    /// A retry of a batch the server had already appended: nothing new was appended.
    pub replayed: bool,
}

/// Publishes batches in order with many in flight; see the [crate docs](crate). Cloning
/// shares the connection and its order.
#[derive(Clone, Debug)]
pub struct Publisher {
    batches: mpsc::Sender<Outgoing>,
    window: Arc<Semaphore>,
    size: usize,
}

/// The answer to one sent batch, to await when convenient.
#[derive(Debug)]
pub struct Pending {
    answer: oneshot::Receiver<Result<Published, Error>>,
}

impl Future for Pending {
    type Output = Result<Published, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

#[derive(Debug)]
struct Outgoing {
    events: Vec<EventJson>,
    key: Option<String>,
    answer: oneshot::Sender<Result<Published, Error>>,
    permit: OwnedSemaphorePermit,
}

impl Publisher {
    pub(crate) fn start(config: Arc<Config>) -> Publisher {
        let size = config.window;
        let (batches, incoming) = mpsc::channel(size);
        tokio::spawn(run(config, incoming));
        Publisher {
            batches,
            window: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Sends a batch after every batch sent before it; waits only while the window of
    /// batches in flight is full. The returned [`Pending`] resolves once the batch is
    /// durable (or failed).
    pub async fn send(&self, events: Vec<EventJson>) -> Result<Pending, Error> {
        self.send_keyed(events, None).await
    }

    /// As [`send`](Self::send), with the application's own idempotency key instead of a
    /// generated one: a batch sent again with the same key, even by another process, is
    /// appended once (the server remembers keys for `retention.idempotency_ttl`).
    pub async fn send_with_key(
        &self,
        events: Vec<EventJson>,
        idempotency_key: impl Into<String>,
    ) -> Result<Pending, Error> {
        self.send_keyed(events, Some(idempotency_key.into())).await
    }

    async fn send_keyed(
        &self,
        events: Vec<EventJson>,
        key: Option<String>,
    ) -> Result<Pending, Error> {
        let permit = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let (answer, pending) = oneshot::channel();
        self.batches
            .send(Outgoing {
                events,
                key,
                answer,
                permit,
            })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Pending { answer: pending })
    }

    /// Sends a batch and waits for its answer.
    pub async fn publish(&self, events: Vec<EventJson>) -> Result<Published, Error> {
        self.send(events).await?.await
    }

    /// Waits until every batch sent so far is answered.
    pub async fn flush(&self) -> Result<(), Error> {
        let all = u32::try_from(self.size).unwrap_or(u32::MAX);
        let permits = self
            .window
            .acquire_many(all)
            .await
            .map_err(|_| Error::Closed)?;
        drop(permits);
        Ok(())
    }
}

/// A batch sent and not answered.
struct InFlight {
    id: u64,
    idempotency_key: String,
    events: Vec<EventJson>,
    answer: oneshot::Sender<Result<Published, Error>>,
    /// Sent after a batch that failed and before the restart: the server aborts it.
    doomed: bool,
    _permit: OwnedSemaphorePermit,
}

impl InFlight {
    fn frame(&mut self, restart: bool) -> String {
        let frame = ClientFrame::Publish {
            id: self.id.to_string(),
            events: std::mem::take(&mut self.events),
            idempotency_key: Some(self.idempotency_key.clone()),
            restart,
        };
        let text = serde_json::to_string(&frame).unwrap_or_default();
        if let ClientFrame::Publish { events, .. } = frame {
            self.events = events;
        }
        text
    }
}

struct State {
    config: Arc<Config>,
    /// Sent and unanswered, in send order.
    queue: VecDeque<InFlight>,
    next_id: u64,
    prefix: String,
    /// A batch failed: the next batch sent must restart the sequence.
    restart_next: bool,
}

impl State {
    fn admit(&mut self, b: Outgoing) -> &mut InFlight {
        self.next_id += 1;
        self.queue.push_back(InFlight {
            id: self.next_id,
            idempotency_key: b
                .key
                .unwrap_or_else(|| format!("{}-{}", self.prefix, self.next_id)),
            events: b.events,
            answer: b.answer,
            doomed: false,
            _permit: b.permit,
        });
        self.queue.back_mut().expect("just pushed")
    }

    /// Fails every unanswered batch (no server could be reached).
    fn fail_all(&mut self, e: &Error) {
        for b in self.queue.drain(..) {
            let _ = b.answer.send(Err(e.clone()));
        }
    }

    /// Handles one answer; `false` if the connection should be dropped.
    fn answer(&mut self, frame: ServerFrame) -> bool {
        let (id, result) = match frame {
            ServerFrame::Published {
                id,
                watermarks,
                replayed,
            } => (
                id,
                Ok(Published {
                    watermarks,
                    replayed,
                }),
            ),
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } => {
                if code == "aborted" {
                    (id, Err(Error::Aborted { message }))
                } else {
                    // Everything sent so far after it is aborted by the server; the next
                    // batch starts a new sequence.
                    for b in self.queue.iter_mut() {
                        b.doomed = true;
                    }
                    self.restart_next = true;
                    (id, Err(Error::Refused { code, message }))
                }
            }
            ServerFrame::Error {
                id: None,
                code,
                message,
            } => {
                tracing::warn!(%code, %message, "the server refused a publish frame");
                return false;
            }
            ServerFrame::Shutdown => return false,
            _ => return true,
        };
        // Answers come in send order: the first unanswered batch is the one answered.
        match self.queue.iter().position(|b| b.id.to_string() == id) {
            Some(i) => {
                for skipped in self.queue.drain(..i) {
                    let _ = skipped.answer.send(Err(Error::Protocol(format!(
                        "the server answered batch {id} before batch {}",
                        skipped.id
                    ))));
                }
                if let Some(b) = self.queue.pop_front() {
                    let _ = b.answer.send(result);
                }
                true
            }
            None => {
                tracing::warn!(%id, "an answer to no batch in flight");
                true
            }
        }
    }

    /// Sends one batch on `ws`, with `restart` after a failure.
    async fn send(ws: &mut Ws, b: &mut InFlight, restart: bool) -> bool {
        ws.send(Message::Text(b.frame(restart).into()))
            .await
            .is_ok()
    }
}

async fn run(config: Arc<Config>, mut incoming: mpsc::Receiver<Outgoing>) {
    let mut s = State {
        config,
        queue: VecDeque::new(),
        next_id: 0,
        prefix: uuid::Uuid::new_v4().simple().to_string(),
        restart_next: false,
    };
    let mut open = true;
    let mut server = 0usize;
    loop {
        if s.queue.is_empty() {
            // Connect only when there is something to send.
            match incoming.recv().await {
                Some(b) => {
                    s.admit(b);
                }
                None => return,
            }
        }
        let config = s.config.clone();
        let mut attempts = Attempts::starting_at(&config, server);
        let (index, mut ws) = match attempts.connect().await {
            Ok(c) => c,
            Err(e) => {
                s.fail_all(&e);
                continue;
            }
        };
        server = index;
        // A new connection is a new sequence: what was doomed on the old one is answered
        // now, the rest is sent again in order.
        s.restart_next = false;
        let mut sent_all = true;
        let queue = std::mem::take(&mut s.queue);
        for mut b in queue {
            if b.doomed {
                let _ = b.answer.send(Err(Error::Aborted {
                    message: "an earlier batch failed before the connection was lost".into(),
                }));
                continue;
            }
            if sent_all {
                sent_all = State::send(&mut ws, &mut b, false).await;
            }
            s.queue.push_back(b);
        }
        if !sent_all {
            continue;
        }
        loop {
            if !open && s.queue.is_empty() {
                let _ = ws.close(None).await;
                return;
            }
            tokio::select! {
                b = incoming.recv(), if open => match b {
                    Some(b) => {
                        let restart = std::mem::take(&mut s.restart_next);
                        let b = s.admit(b);
                        if !State::send(&mut ws, b, restart).await {
                            break;
                        }
                    }
                    None => open = false,
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ServerFrame>(&text) {
                            Ok(frame) => {
                                if !s.answer(frame) {
                                    break;
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "an unreadable frame from the server"),
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        if !open && s.queue.is_empty() {
            return;
        }
    }
}
