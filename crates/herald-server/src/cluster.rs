//! Herald nodes sharing one JetStream log: each follows the durable subscriptions the others
//! change, delivers a webhook only while it holds that webhook's lease, beats its heart, and
//! speaks for a node that went silent (its connections go offline). The shared state itself
//! is [`herald_jetstream::Cluster`]; this module is what the server does with it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use herald_core::{Key, Notification, Watermark};
use herald_delivery::{node_of, offline_event, presence_change};
use herald_jetstream::{Cluster, Lease, Liveness, NodeEntry, NodeRecord, SubscriptionChange};
use herald_log::{AppendOptions, EventLog, LogError, ReadError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Log;
use crate::subscriptions::{DurableRef, Durables, WebhookWorker, WorkerFuture};

/// Applies the changes other nodes make to durable subscriptions, until the stream ends.
pub(crate) async fn follow_subscriptions(
    durables: Durables,
    changes: impl Stream<Item = Result<SubscriptionChange, LogError>>,
) {
    let mut changes = std::pin::pin!(changes);
    while let Some(change) = changes.next().await {
        match change {
            Ok(SubscriptionChange::Put(record)) => durables.apply_remote(record),
            Ok(SubscriptionChange::Deleted(id)) => durables.forget_remote(&id),
            Err(e) => tracing::warn!(error = %e, "a subscription change could not be read"),
        }
    }
    tracing::error!(
        "the cluster's subscription changes stopped: other nodes' changes are no longer seen here"
    );
}

/// How a turn of holding a lease ended.
enum Turn {
    /// The subscription stopped (deleted, or the server is stopping).
    Stopped,
    /// The worker returned (it does when its subscription stops).
    Ended,
    /// The lease could not be renewed in time: another node may hold it now.
    Lost,
}

/// Runs push work `name` whenever this node holds its lease, until `stop`: waits for the
/// lease, lets `take_over` catch up with what the previous holder stored (it returns the
/// work, or `None` when the subscription is gone), runs the work, renews the lease a third
/// of the way through, and drops the work before the lease could run out. Released when the
/// work ends or `stop` fires. One holder for every kind of push (webhooks, EWS push).
/// `first` is a lease already taken (by the node that made the subscription).
pub(crate) async fn hold<F, T>(
    cluster: Cluster,
    name: String,
    stop: CancellationToken,
    mut first: Option<Lease>,
    mut take_over: F,
) where
    F: FnMut() -> T,
    T: Future<Output = Option<WorkerFuture>>,
{
    let every = cluster.lease_time() / 3;
    loop {
        let mut lease = match first.take() {
            Some(lease) => lease,
            None => loop {
                match cluster.try_lease(&name).await {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%name, error = %e, "lease not taken"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            },
        };
        tracing::info!(%name, node = %cluster.node(), "delivering here (lease taken)");
        let Some(work) = take_over().await else {
            cluster.release(lease).await;
            return;
        };
        let mut work = std::pin::pin!(work);
        let mut retry_at: Option<Instant> = None;
        let turn = loop {
            let renew_at = retry_at.unwrap_or_else(|| cluster.renew_at(&lease));
            tokio::select! {
                () = &mut work => break Turn::Ended,
                () = stop.cancelled() => break Turn::Stopped,
                () = tokio::time::sleep_until(renew_at) => {
                    match cluster.renew(&mut lease).await {
                        Ok(true) => retry_at = None,
                        Ok(false) => break Turn::Lost,
                        Err(e) => {
                            tracing::warn!(%name, error = %e, "lease not renewed; retrying");
                            retry_at = Some(Instant::now() + Duration::from_millis(250));
                        }
                    }
                    if !cluster.valid(&lease) {
                        break Turn::Lost;
                    }
                }
            }
        };
        match turn {
            Turn::Stopped | Turn::Ended => {
                cluster.release(lease).await;
                return;
            }
            Turn::Lost => {
                tracing::warn!(%name, "lease lost: delivery stops here until it is taken again");
            }
        }
    }
}

/// Delivers webhook `sub` whenever this node holds its lease (see [`hold`]): a taker first
/// reads what the previous holder stored (acknowledged, in flight, state) and attaches the
/// webhook's presence here.
pub(crate) async fn hold_webhook(
    cluster: Cluster,
    durables: Durables,
    sub: DurableRef,
    worker: WebhookWorker,
) {
    let name = format!("webhook.{}", sub.id());
    let stop = sub.stop().clone();
    let records = cluster.subscriptions().clone();
    hold(cluster, name, stop, None, || {
        let (records, durables, sub, worker) = (
            records.clone(),
            durables.clone(),
            sub.clone(),
            worker.clone(),
        );
        async move {
            match records.get(sub.id()).await {
                Ok(Some(record)) => durables.refresh(&sub, &record),
                Ok(None) => return None,
                Err(e) => tracing::warn!(id = %sub.id(), error = %e, "webhook state not re-read"),
            }
            durables.attach_here(&sub);
            Some((worker.run)(durables, sub))
        }
    })
    .await;
}

/// This node in the cluster: its heartbeat, and what it does for nodes that went silent.
pub(crate) struct Node {
    cluster: Cluster,
    log: Log,
    record: NodeRecord,
}

impl Node {
    /// This node's name in the cluster.
    pub(crate) fn name(&self) -> &str {
        &self.record.name
    }

    /// Joins: speaks for this node's previous run if it ended without leaving (its
    /// connections never went offline), then beats.
    pub(crate) async fn join(cluster: Cluster, log: Log) -> Result<Node, LogError> {
        let record = NodeRecord {
            name: cluster.node().to_owned(),
            run: uuid::Uuid::new_v4().simple().to_string(),
            started_after: log.bounds()?.last.0,
            claimed_by: None,
        };
        if let Some(previous) = cluster.node_entry(cluster.node()).await? {
            tracing::info!(node = %cluster.node(), "the previous run of this node did not leave: its connections go offline");
            speak_for(&log, &previous.record).await?;
        }
        cluster.heartbeat(&record).await?;
        Ok(Node {
            cluster,
            log,
            record,
        })
    }

    /// Beats every third of a lease and looks for silent nodes, until `stop`; then leaves
    /// (its own connections went offline as the server stopped).
    pub(crate) async fn run(&self, stop: tokio_util::sync::CancellationToken) {
        let every = self.cluster.lease_time() / 3;
        let mut liveness = Liveness::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.cluster.heartbeat(&self.record).await {
                tracing::warn!(error = %e, "heartbeat not written");
            }
            let entries = match self.cluster.node_entries().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "nodes not read");
                    continue;
                }
            };
            let silent = liveness.observe(&entries, self.cluster.node(), self.cluster.lease_time());
            for dead in silent {
                if let Err(e) = self.bury(&dead).await {
                    tracing::warn!(node = %dead.record.name, error = %e, "could not speak for a silent node; trying again");
                }
            }
        }
    }

    /// Claims a silent node; the one survivor that does says its connections are offline,
    /// then removes its entry.
    async fn bury(&self, dead: &NodeEntry) -> Result<(), LogError> {
        let Some(claimed) = self.cluster.claim(dead).await? else {
            return Ok(());
        };
        tracing::warn!(node = %dead.record.name, by = %self.cluster.node(), "node silent for a lease: its connections go offline");
        speak_for(&self.log, &claimed.record).await?;
        self.cluster.forget(&claimed).await
    }

    /// Removes this node's entry: it left cleanly.
    pub(crate) async fn leave(&self) {
        if let Ok(Some(me)) = self.cluster.node_entry(self.cluster.node()).await {
            if me.record.run == self.record.run {
                let _ = self.cluster.forget(&me).await;
            }
        }
    }
}

/// Publishes `offline` for every connection of `node`'s run that the log last saw online:
/// its presence events are read from where the run started.
async fn speak_for(log: &Log, node: &NodeRecord) -> Result<usize, LogError> {
    let bounds = log.bounds()?;
    let mut after = Watermark(node.started_after).max(Watermark(bounds.first.0.saturating_sub(1)));
    let end = bounds.last;
    let mut online: HashMap<Key, bool> = HashMap::new();
    while after < end {
        let batch = match log.read(after, 1000).await {
            Ok(b) => b,
            Err(ReadError::Expired {
                oldest_available, ..
            }) => {
                after = Watermark(oldest_available.0.saturating_sub(1));
                continue;
            }
            Err(e) => return Err(LogError::Storage(e.to_string())),
        };
        let Some(last) = batch.last().and_then(|n| n.watermark) else {
            break;
        };
        for n in &batch {
            if let Some((id, is_online)) = presence_change(n) {
                if node_of(id) == Some(node.name.as_str()) {
                    online.insert(n.key.clone(), is_online);
                }
            }
        }
        after = last;
    }
    let offline: Vec<Notification> = online
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(key, _)| offline_event(key))
        .collect();
    let n = offline.len();
    for chunk in offline.chunks(herald_jetstream::MAX_BATCH) {
        log.append(chunk.to_vec(), AppendOptions::default())
            .await
            .map_err(|e| LogError::Storage(e.to_string()))?;
    }
    tracing::info!(node = %node.name, offline = n, "connections of a gone node marked offline");
    Ok(n)
}
