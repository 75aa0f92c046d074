//! Subscriptions over one WebSocket that survive reconnects without a gap or a duplicate.
//!
//! The task owns the connection and, per subscription, the last watermark it handed to the
//! application. When the connection is lost (the server restarts, a node dies, the network
//! breaks), it reconnects with back-off, trying the servers in turn, and subscribes each
//! subscription again `after` that watermark; an event at or below it is dropped, so the
//! application sees every event once, in order. A durable subscription resumes the same way
//! within the process; its acknowledgements, stored by the server, cover a process restart.
//!
//! Each subscription buffers a bounded number of events; when the application does not keep
//! up, the task waits, the connection stops being read, and the server keeps the rest in its
//! log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use herald_core::Notification;
use herald_proto::json::EventJson;
use herald_proto::ws::{ClientFrame, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::connection::{Attempts, Ws};
use crate::{Config, Error};

/// What to subscribe to, and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    target: Target,
    kinds: Option<String>,
    after: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Key(String),
    Subtree(String),
    Children(String),
    Durable(String),
}

impl Subscribe {
    /// Exactly this key.
    pub fn key(key: impl Into<String>) -> Self {
        Subscribe::to(Target::Key(key.into()))
    }

    /// This key and everything below it.
    pub fn subtree(key: impl Into<String>) -> Self {
        Subscribe::to(Target::Subtree(key.into()))
    }

    /// What is directly in this folder.
    pub fn children(key: impl Into<String>) -> Self {
        Subscribe::to(Target::Children(key.into()))
    }

    /// A durable subscription created on the server (`POST /v1/subscriptions`): its filter,
    /// and by default its acknowledged watermark as the start.
    pub fn durable(name: impl Into<String>) -> Self {
        Subscribe::to(Target::Durable(name.into()))
    }

    fn to(target: Target) -> Self {
        Subscribe {
            target,
            kinds: None,
            after: None,
        }
    }

    /// Only these kinds (comma-separated, e.g. `new_mail,object_moved`).
    pub fn kinds(mut self, kinds: impl Into<String>) -> Self {
        self.kinds = Some(kinds.into());
        self
    }

    /// Start after this watermark (default: the next event, or a durable subscription's
    /// acknowledged watermark).
    pub fn after(mut self, watermark: u64) -> Self {
        self.after = Some(watermark);
        self
    }

    /// The body that creates a durable subscription with this filter and start.
    pub(crate) fn create_body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({"transport": "poll"});
        match &self.target {
            Target::Key(k) => body["key"] = k.as_str().into(),
            Target::Subtree(k) => body["subtree"] = k.as_str().into(),
            Target::Children(k) => body["children"] = k.as_str().into(),
            Target::Durable(_) => {}
        }
        if let Some(k) = &self.kinds {
            body["kinds"] = k.as_str().into();
        }
        if let Some(a) = self.after {
            body["after"] = a.into();
        }
        body
    }

    fn frame(&self, id: &str, after: Option<u64>) -> ClientFrame {
        let (mut key, mut subtree, mut children, mut subscription) = (None, None, None, None);
        match &self.target {
            Target::Key(k) => key = Some(k.clone()),
            Target::Subtree(k) => subtree = Some(k.clone()),
            Target::Children(k) => children = Some(k.clone()),
            Target::Durable(name) => subscription = Some(name.clone()),
        }
        ClientFrame::Subscribe {
            id: id.to_owned(),
            key,
            subtree,
            children,
            kinds: self.kinds.clone(),
            state_token: None,
            state_mask: None,
            after,
            subscription,
        }
    }
}

/// One event, as the engine's model and as the JSON it came in.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its place in the log.
    pub watermark: u64,
    /// The event in the engine's model.
    pub notification: Notification,
    /// The event as the server sent it.
    pub json: EventJson,
}

/// Opens subscriptions on one WebSocket; see the [crate docs](crate). Dropping it ends the
/// connection once every [`Subscription`] made from it is dropped too.
#[derive(Clone, Debug)]
pub struct Subscriber {
    commands: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    buffer: usize,
}

/// A live subscription: its events in order. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    id: String,
    after: u64,
    events: mpsc::Receiver<Result<Event, Error>>,
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Debug)]
enum Command {
    Subscribe {
        id: String,
        spec: Subscribe,
        events: mpsc::Sender<Result<Event, Error>>,
        confirmed: oneshot::Sender<Result<u64, Error>>,
    },
    Unsubscribe {
        id: String,
    },
    Ack {
        id: String,
        watermark: u64,
        stored: Option<oneshot::Sender<()>>,
    },
}

impl Subscriber {
    pub(crate) fn start(config: Arc<Config>) -> Subscriber {
        let (commands, incoming) = mpsc::unbounded_channel();
        let buffer = config.buffer;
        tokio::spawn(run(config, incoming));
        Subscriber {
            commands,
            next_id: Arc::new(AtomicU64::new(0)),
            buffer,
        }
    }

    /// Subscribes; returns once the server has confirmed it (connecting first if needed).
    pub async fn subscribe(&self, spec: Subscribe) -> Result<Subscription, Error> {
        let id = format!("s{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let (events, receiver) = mpsc::channel(self.buffer);
        let (confirmed, confirmation) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                id: id.clone(),
                spec,
                events,
                confirmed,
            })
            .map_err(|_| Error::Closed)?;
        let after = confirmation.await.map_err(|_| Error::Closed)??;
        Ok(Subscription {
            id,
            after,
            events: receiver,
            commands: self.commands.clone(),
        })
    }
}

impl Subscription {
    /// The next event; an error ends the subscription ([`Error::Expired`], [`Error::Reset`],
    /// [`Error::Ended`], or [`Error::Unreachable`] when no server came back in time).
    /// `None` after that.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        self.events.recv().await
    }

    /// Acknowledges everything up to `watermark`: stored by the server for a durable
    /// subscription, so a new process resumes after it. Sent again after a reconnect.
    pub fn ack(&self, watermark: u64) -> Result<(), Error> {
        self.commands
            .send(Command::Ack {
                id: self.id.clone(),
                watermark,
                stored: None,
            })
            .map_err(|_| Error::Closed)
    }

    /// As [`ack`](Self::ack), and waits until the server has confirmed it (stored, for a
    /// durable subscription): what a worker does before it exits.
    pub async fn ack_stored(&self, watermark: u64) -> Result<(), Error> {
        let (stored, confirmed) = oneshot::channel();
        self.commands
            .send(Command::Ack {
                id: self.id.clone(),
                watermark,
                stored: Some(stored),
            })
            .map_err(|_| Error::Closed)?;
        confirmed.await.map_err(|_| Error::Closed)
    }

    /// The watermark the subscription started after, as the server confirmed it.
    pub fn started_after(&self) -> u64 {
        self.after
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe {
            id: std::mem::take(&mut self.id),
        });
    }
}

/// A subscription as the task keeps it.
struct Sub {
    spec: Subscribe,
    events: mpsc::Sender<Result<Event, Error>>,
    /// Until the server first confirms it.
    confirmed: Option<oneshot::Sender<Result<u64, Error>>>,
    /// The last watermark handed to the application.
    last: Option<u64>,
    /// The highest acknowledgement asked for, and the highest the server confirmed.
    acked: Option<u64>,
    ack_confirmed: Option<u64>,
    /// Callers of `ack_stored`, until the server confirms their watermark.
    ack_waiters: Vec<(u64, oneshot::Sender<()>)>,
}

impl Sub {
    /// Where to resume: after the last event handed out, else where the application asked.
    fn resume_after(&self) -> Option<u64> {
        self.last.or(self.spec.after)
    }

    /// Ends the subscription with `e`: the waiting `subscribe` call or the stream gets it.
    fn end(self, e: Error) {
        match self.confirmed {
            Some(c) => {
                let _ = c.send(Err(e));
            }
            None => {
                // After what is buffered, without blocking the connection on a slow reader.
                let events = self.events;
                tokio::spawn(async move {
                    let _ = events.send(Err(e)).await;
                });
            }
        }
    }
}

async fn send(ws: &mut Ws, frame: &ClientFrame) -> bool {
    let text = serde_json::to_string(frame).unwrap_or_default();
    ws.send(Message::Text(text.into())).await.is_ok()
}

async fn run(config: Arc<Config>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut server = 0usize;
    let mut open = true;
    loop {
        if subs.is_empty() {
            if !open {
                return;
            }
            // Connect only when there is something to subscribe to.
            match commands.recv().await {
                Some(c) => {
                    command(&mut subs, None, c).await;
                }
                None => return,
            }
            continue;
        }
        let mut attempts = Attempts::starting_at(&config, server);
        let (index, mut ws) = match attempts.connect().await {
            Ok(c) => c,
            Err(e) => {
                for (_, sub) in subs.drain() {
                    sub.end(e.clone());
                }
                continue;
            }
        };
        server = index;
        let mut up = true;
        for (id, sub) in &subs {
            up = up && send(&mut ws, &sub.spec.frame(id, sub.resume_after())).await;
            if let Some(w) = sub.acked.filter(|a| Some(*a) > sub.ack_confirmed) {
                up = up
                    && send(
                        &mut ws,
                        &ClientFrame::Ack {
                            id: id.clone(),
                            watermark: w,
                        },
                    )
                    .await;
            }
        }
        while up {
            if !open && subs.is_empty() {
                let _ = ws.close(None).await;
                return;
            }
            tokio::select! {
                c = commands.recv(), if open => match c {
                    Some(c) => up = command(&mut subs, Some(&mut ws), c).await,
                    None => open = false,
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                        Ok(frame) => up = frame_in(&mut subs, &mut ws, frame).await,
                        Err(e) => tracing::warn!(error = %e, "an unreadable frame from the server"),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => up = false,
                    Some(Ok(_)) => {}
                },
            }
        }
        if !open && subs.is_empty() {
            return;
        }
    }
}

/// Applies an application's command; sends its frame when connected. `false` if the
/// connection broke.
async fn command(subs: &mut HashMap<String, Sub>, ws: Option<&mut Ws>, c: Command) -> bool {
    let frame = match c {
        Command::Subscribe {
            id,
            spec,
            events,
            confirmed,
        } => {
            let frame = spec.frame(&id, spec.after);
            subs.insert(
                id,
                Sub {
                    spec,
                    events,
                    confirmed: Some(confirmed),
                    last: None,
                    acked: None,
                    ack_confirmed: None,
                    ack_waiters: Vec::new(),
                },
            );
            frame
        }
        Command::Unsubscribe { id } => {
            if subs.remove(&id).is_none() {
                return true;
            }
            ClientFrame::Unsubscribe { id }
        }
        Command::Ack {
            id,
            watermark,
            stored,
        } => {
            let Some(sub) = subs.get_mut(&id) else {
                return true;
            };
            sub.acked = sub.acked.max(Some(watermark));
            if let Some(s) = stored {
                sub.ack_waiters.push((watermark, s));
            }
            ClientFrame::Ack { id, watermark }
        }
    };
    match ws {
        Some(ws) => send(ws, &frame).await,
        None => true,
    }
}

/// Handles one frame from the server. `false` if the connection should be dropped.
async fn frame_in(subs: &mut HashMap<String, Sub>, ws: &mut Ws, frame: ServerFrame) -> bool {
    match frame {
        ServerFrame::Subscribed { id, after } => {
            if let Some(c) = subs.get_mut(&id).and_then(|s| s.confirmed.take()) {
                let _ = c.send(Ok(after));
            }
        }
        ServerFrame::Event { id, event } => {
            let Some(sub) = subs.get_mut(&id) else {
                return true;
            };
            let Some(watermark) = event.watermark else {
                tracing::warn!(subscription = %id, "an event without a watermark");
                return true;
            };
            if sub.last.is_some_and(|last| watermark <= last) {
                // Sent again after a resume: the application has it.
                return true;
            }
            let item = match event.to_delivered() {
                Ok(notification) => Ok(Event {
                    watermark,
                    notification,
                    json: *event,
                }),
                Err(e) => Err(Error::Protocol(format!("event {watermark}: {e}"))),
            };
            sub.last = Some(watermark);
            if sub.events.send(item).await.is_err() {
                // The application dropped the subscription; its unsubscribe is on the way.
                subs.remove(&id);
                return send(ws, &ClientFrame::Unsubscribe { id }).await;
            }
        }
        ServerFrame::Expired {
            id,
            oldest_available,
        } => {
            if let Some(sub) = subs.remove(&id) {
                sub.end(Error::Expired { oldest_available });
            }
        }
        ServerFrame::Acked { id, watermark } => {
            if let Some(sub) = subs.get_mut(&id) {
                sub.ack_confirmed = sub.ack_confirmed.max(Some(watermark));
                let (done, waiting) = std::mem::take(&mut sub.ack_waiters)
                    .into_iter()
                    .partition(|(w, _)| *w <= watermark);
                sub.ack_waiters = waiting;
                for (_, d) in done {
                    let _ = d.send(());
                }
            }
        }
        ServerFrame::Error {
            id: Some(id),
            code,
            message,
        } => {
            if code == "ack_failed" || code == "unknown_id" {
                tracing::warn!(subscription = %id, %code, %message, "an acknowledgement failed");
                return true;
            }
            if let Some(sub) = subs.remove(&id) {
                let e = match code.as_str() {
                    "invalid_position" => Error::Reset { message },
                    _ if sub.confirmed.is_some() => Error::Refused { code, message },
                    _ => Error::Ended { code, message },
                };
                sub.end(e);
            }
        }
        ServerFrame::Unsubscribed { id } => {
            // Not asked for (it was removed before the frame was sent): the server ended it.
            if let Some(sub) = subs.remove(&id) {
                sub.end(Error::Ended {
                    code: "unsubscribed".into(),
                    message: "the server removed the subscription".into(),
                });
            }
        }
        ServerFrame::Error {
            id: None,
            code,
            message,
        } => tracing::warn!(%code, %message, "the server refused a frame"),
        ServerFrame::Shutdown => return false,
        ServerFrame::Published { .. } => {}
    }
    true
}
