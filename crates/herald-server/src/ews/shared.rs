//! EWS push subscriptions on a cluster. EWS keeps a subscription in memory on the server
//! that made it, which is right for pull and streaming (their client comes back to a node
//! and, after a node change, re-subscribes from its last watermark). A push subscription has
//! no client coming back: when its node dies, another must go on pushing. So in a cluster a
//! push subscription is also a record in the `<stream>_EWS` bucket (what it selects, where it
//! pushes, the watermark pushed through), every node follows the bucket, and the node holding
//! the subscription's lease pushes, exactly as for webhooks ([`crate::cluster::hold`]). A
//! taker resumes after the stored watermark: at least once, in order; a notification pushed
//! but not yet recorded is pushed again with the same watermarks, which is how an EWS client
//! recognises it. Alone (no cluster), none of this runs.

use std::time::Duration;

use futures_util::StreamExt;
use herald_core::{Key, Watermark};
use herald_delivery::{Connect, Cursor, Lease, Transport};
use herald_ews::EventType;
use herald_jetstream::{Records, SubscriptionChange};
use herald_log::{LogError, SubscriptionRecord};
use serde::{Deserialize, Serialize};

use super::{Ews, EwsSub, Kind, SubRef, push_worker};
use crate::subscriptions::{WorkerFuture, owner_name};

/// A push subscription as the nodes share it.
#[derive(Debug, Serialize, Deserialize)]
struct SharedPush {
    owner: Option<String>,
    mailbox: Vec<u8>,
    /// `None`: every folder of the mailbox.
    folders: Option<Vec<Vec<u8>>>,
    /// Element names (`NewMailEvent`, …).
    types: Vec<String>,
    url: String,
    frequency_ms: u64,
}

impl SharedPush {
    fn of(sub: &EwsSub) -> Option<SharedPush> {
        let Kind::Push { url, frequency } = &sub.kind else {
            return None;
        };
        Some(SharedPush {
            owner: sub.owner.clone(),
            mailbox: sub.mailbox.as_bytes().to_vec(),
            folders: sub
                .folders
                .as_ref()
                .map(|fs| fs.iter().map(|f| f.as_bytes().to_vec()).collect()),
            types: sub.types.iter().map(|t| t.element().to_owned()).collect(),
            url: url.clone(),
            frequency_ms: u64::try_from(frequency.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The subscription it describes, starting after `acked`; `None` if a type is unknown.
    fn into_sub(self, acked: Watermark) -> Option<EwsSub> {
        let types = self
            .types
            .iter()
            .map(|name| EventType::ALL.into_iter().find(|t| t.element() == name))
            .collect::<Option<Vec<_>>>()?;
        Some(EwsSub {
            owner: self.owner,
            mailbox: Key::new(self.mailbox),
            folders: self
                .folders
                .map(|fs| fs.into_iter().map(Key::new).collect()),
            types,
            kind: Kind::Push {
                url: self.url,
                frequency: Duration::from_millis(self.frequency_ms),
            },
            cursor: Cursor::new(acked),
            stream: std::sync::Mutex::new(None),
        })
    }
}

impl Ews {
    fn shared(&self) -> Option<&Records> {
        self.inner.cluster.as_ref().map(|c| c.ews_push())
    }

    /// In a cluster, follows the push subscriptions every node made (from before the
    /// listing on, for as long as the server runs); each is pushed by the node holding its
    /// lease. Returns how many there were at start.
    pub async fn restore(&self) -> Result<usize, LogError> {
        let Some(records) = self.shared() else {
            return Ok(0);
        };
        let changes = records.changes().await?;
        let mut followed = 0;
        for record in records.list().await? {
            if self.apply_remote(record) {
                followed += 1;
            }
        }
        let this = self.clone();
        self.inner.delivery.spawn(async move {
            let stop = this.inner.delivery.shutdown().clone();
            let mut changes = std::pin::pin!(changes);
            loop {
                let change = tokio::select! {
                    c = changes.next() => c,
                    () = stop.cancelled() => return,
                };
                match change {
                    Some(Ok(SubscriptionChange::Put(record))) => {
                        this.apply_remote(record);
                    }
                    Some(Ok(SubscriptionChange::Deleted(id))) => {
                        // Ended where its hooks ran.
                        this.inner.subs.take(&id);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "an EWS push subscription change could not be read");
                    }
                    None => {
                        tracing::error!("the cluster's EWS push subscriptions are no longer followed");
                        return;
                    }
                }
            }
        });
        Ok(followed)
    }

    /// A push subscription made or changed on any node: followed here, pushed when this node
    /// takes its lease. Whether it is new here.
    fn apply_remote(&self, record: SubscriptionRecord) -> bool {
        if let Some(sub) = self.inner.subs.peek(&record.id) {
            sub.advance(record.acked);
            return false;
        }
        let spec = serde_json::from_slice::<SharedPush>(&record.spec)
            .ok()
            .and_then(|s| s.into_sub(record.acked));
        let Some(value) = spec else {
            tracing::error!(id = %record.id, "shared EWS push subscription does not parse; skipped");
            return false;
        };
        let sub = self.inner.subs.insert(record.id, value, None);
        hold(self, &sub, None);
        true
    }
}

/// Starts a push subscription just made here: alone, its worker runs; in a cluster, it is
/// shared first (its lease taken by this node, so it is pushed from here while this node
/// lives), then held.
pub(super) async fn start_push(ews: &Ews, sub: &SubRef) -> Result<(), LogError> {
    let (Some(records), Some(cluster)) = (ews.shared(), ews.inner.cluster.as_ref()) else {
        ews.inner
            .subs
            .spawn(sub, push_worker(ews.clone(), sub.clone()));
        return Ok(());
    };
    let lease = cluster
        .try_lease(&lease_name(sub))
        .await?
        .ok_or_else(|| LogError::Storage(format!("the lease of {} is held", sub.id())))?;
    let Some(spec) = SharedPush::of(sub) else {
        return Ok(());
    };
    let spec = serde_json::to_vec(&spec).map_err(|e| LogError::Storage(e.to_string()))?;
    records.put(sub.id(), spec).await?;
    records.ack(sub.id(), sub.cursor()).await?;
    hold(ews, sub, Some(lease));
    Ok(())
}

fn lease_name(sub: &SubRef) -> String {
    format!("ews.{}", sub.id())
}

/// Pushes `sub` whenever this node holds its lease: a taker reads the watermark the previous
/// holder stored and attaches the endpoint's presence here.
fn hold(ews: &Ews, sub: &SubRef, first: Option<herald_jetstream::Lease>) {
    let Some(cluster) = ews.inner.cluster.clone() else {
        return;
    };
    let (ews, sub) = (ews.clone(), sub.clone());
    let name = lease_name(&sub);
    let stop = sub.stop().clone();
    ews.inner.delivery.clone().spawn(async move {
        crate::cluster::hold(cluster, name, stop, first, || {
            let (ews, sub) = (ews.clone(), sub.clone());
            async move { take_over(ews, sub).await }
        })
        .await;
    });
}

async fn take_over(ews: Ews, sub: SubRef) -> Option<WorkerFuture> {
    let records = ews.shared()?;
    match records.get(sub.id()).await {
        Ok(Some(record)) => sub.advance(record.acked),
        Ok(None) => {
            ews.inner.subs.take(sub.id());
            return None;
        }
        Err(e) => tracing::warn!(id = %sub.id(), error = %e, "EWS push watermark not re-read"),
    }
    sub.attach_with(|| {
        ews.inner.delivery.lifecycle().attach(
            Connect {
                id: sub.id().to_owned(),
                owner: owner_name(sub.owner.as_deref()).to_owned(),
                transport: Transport::Ews,
                target: format!("{}/", sub.mailbox),
            },
            Lease::None,
        )
    });
    Some(Box::pin(push_worker(ews, sub)))
}

/// Records, in a cluster, the watermark `sub` was pushed through, so that a taker resumes
/// after it.
pub(super) async fn store_cursor(ews: &Ews, sub: &SubRef) {
    if let Some(records) = ews.shared() {
        if let Err(e) = records.ack(sub.id(), sub.cursor()).await {
            tracing::warn!(id = %sub.id(), error = %e, "EWS push watermark not stored; a taker pushes again from the last one stored");
        }
    }
}

/// A push subscription ended here (its hooks ran): every node forgets it.
pub(super) fn unshare(ews: &Ews, sub: &SubRef) {
    let Some(records) = ews.shared().cloned() else {
        return;
    };
    if !matches!(sub.kind, Kind::Push { .. }) {
        return;
    }
    let id = sub.id().to_owned();
    ews.inner.delivery.spawn(async move {
        if let Err(e) = records.delete(&id).await {
            tracing::warn!(%id, error = %e, "ended EWS push subscription not removed from the cluster");
        }
    });
}
