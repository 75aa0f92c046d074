//! What several Herald nodes on one stream agree on besides the log: who delivers a push
//! subscription (a lease), which nodes are alive (a heartbeat), and what changed in the
//! durable subscriptions (a watch). All of it lives in JetStream key-value buckets next to
//! the stream, replicated like it.
//!
//! - `<stream>_LEASES` keeps entries for at most the lease time (the bucket's `max_age`): a
//!   lease is held by whoever wrote its key last, renewed by a compare-and-set on its own
//!   revision, and free again when its holder stops renewing. The holder stops acting on it
//!   before the server could let it go (see [`Cluster::valid`]).
//! - `<stream>_NODES` holds one entry per node, rewritten at every heartbeat. A node whose
//!   entry's revision did not move for a lease time, as one observer measures it on its own
//!   clock, is dead; one survivor claims it (a compare-and-set) and speaks for it.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::TryStreamExt;
use herald_log::LogError;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::subscriptions::Records;
use crate::{bucket_key, bucket_name, js_err};

/// A cluster's shared state, as one node sees it; cheap to clone.
#[derive(Clone, Debug)]
pub struct Cluster {
    node: String,
    lease: Duration,
    leases: kv::Store,
    nodes: kv::Store,
    subscriptions: Records,
    ews_push: Records,
}

/// A lease this node holds.
#[derive(Debug)]
pub struct Lease {
    key: String,
    revision: u64,
    /// When the last successful write was sent: the server counts the lease's time from a
    /// moment after it.
    sent: Instant,
}

/// What a node says of itself at every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its name.
    pub name: String,
    /// Its run: a fresh id at every start.
    pub run: String,
    /// The log's last watermark when this run started: everything it published is after.
    pub started_after: u64,
    /// Set by the survivor that speaks for it once it is dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

/// A node's entry as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// What it said.
    pub record: NodeRecord,
    /// The entry's revision (moves at every heartbeat).
    pub revision: u64,
}

impl Cluster {
    pub(crate) fn new(
        node: String,
        lease: Duration,
        leases: kv::Store,
        nodes: kv::Store,
        subscriptions: Records,
        ews_push: Records,
    ) -> Cluster {
        Cluster {
            node,
            lease,
            leases,
            nodes,
            subscriptions,
            ews_push,
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How long a lease lasts unrenewed, and how long a silent node is given.
    pub fn lease_time(&self) -> Duration {
        self.lease
    }

    /// The durable subscriptions (the log's registry), as every node sees them.
    pub fn subscriptions(&self) -> &Records {
        &self.subscriptions
    }

    /// The EWS push subscriptions: EWS keeps its subscriptions in memory on one server, but
    /// in a cluster a push subscription must outlive its node, so another can take it over.
    pub fn ews_push(&self) -> &Records {
        &self.ews_push
    }

    /// Takes the lease `name` if nobody holds it; `None` if somebody does.
    pub async fn try_lease(&self, name: &str) -> Result<Option<Lease>, LogError> {
        let k = bucket_key(name);
        let sent = Instant::now();
        match self.leases.create(&k, self.node.clone().into()).await {
            Ok(revision) => Ok(Some(Lease {
                key: k,
                revision,
                sent,
            })),
            Err(e) if crate::already_exists(&e) => Ok(None),
            Err(e) => Err(js_err(e)),
        }
    }

    /// Renews `lease`; `false` if it was lost (it ran out, and somebody may have taken it).
    pub async fn renew(&self, lease: &mut Lease) -> Result<bool, LogError> {
        let sent = Instant::now();
        match self
            .leases
            .update(&lease.key, self.node.clone().into(), lease.revision)
            .await
        {
            Ok(revision) => {
                lease.revision = revision;
                lease.sent = sent;
                Ok(true)
            }
            Err(e) if crate::lost_race(&e) => Ok(false),
            Err(e) => Err(js_err(e)),
        }
    }

    /// Gives `lease` up, so that another node may take it at once.
    pub async fn release(&self, lease: Lease) {
        if let Err(e) = self
            .leases
            .delete_expect_revision(&lease.key, Some(lease.revision))
            .await
        {
            tracing::debug!(error = %e, "lease not released; it runs out instead");
        }
    }

    /// Whether `lease` may still be acted on: until a margin before the server could let it
    /// go (a fifth of the lease, for clocks that run at slightly different rates and for the
    /// time a request takes to arrive).
    pub fn valid(&self, lease: &Lease) -> bool {
        lease.sent.elapsed() < self.lease - self.lease / 5
    }

    /// When `lease` should be renewed: a third of the way through.
    pub fn renew_at(&self, lease: &Lease) -> Instant {
        lease.sent + self.lease / 3
    }

    /// Writes this node's heartbeat.
    pub async fn heartbeat(&self, record: &NodeRecord) -> Result<(), LogError> {
        let value = serde_json::to_vec(record).map_err(js_err)?;
        self.nodes
            .put(bucket_key(&record.name), value.into())
            .await
            .map_err(js_err)?;
        Ok(())
    }

    /// This node's entry, as it was left by its previous run (if it did not end cleanly).
    pub async fn node_entry(&self, name: &str) -> Result<Option<NodeEntry>, LogError> {
        let Some(e) = self.nodes.entry(bucket_key(name)).await.map_err(js_err)? else {
            return Ok(None);
        };
        if e.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&e.value).map_err(js_err)?;
        Ok(Some(NodeEntry {
            record,
            revision: e.revision,
        }))
    }

    /// Every node's entry.
    pub async fn node_entries(&self) -> Result<Vec<NodeEntry>, LogError> {
        let keys: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(js_err)?
            .try_collect()
            .await
            .map_err(js_err)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(name) = bucket_name(&k) else {
                continue;
            };
            if let Some(e) = self.node_entry(&name).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Claims the dead node of `entry` for this one (it will speak for it); `false` if
    /// another node claimed it first or it came back.
    pub async fn claim(&self, entry: &NodeEntry) -> Result<Option<NodeEntry>, LogError> {
        let mut record = entry.record.clone();
        record.claimed_by = Some(self.node.clone());
        let value = serde_json::to_vec(&record).map_err(js_err)?;
        match self
            .nodes
            .update(bucket_key(&record.name), value.into(), entry.revision)
            .await
        {
            Ok(revision) => Ok(Some(NodeEntry { record, revision })),
            Err(e) if crate::lost_race(&e) => Ok(None),
            Err(e) => Err(js_err(e)),
        }
    }

    /// Removes a node's entry once it was spoken for (or it stopped cleanly), unless it
    /// changed since.
    pub async fn forget(&self, entry: &NodeEntry) -> Result<(), LogError> {
        self.nodes
            .delete_expect_revision(bucket_key(&entry.record.name), Some(entry.revision))
            .await
            .map_err(js_err)
    }
}

/// Which nodes went silent, as one observer sees it: it remembers each node's last revision
/// and, on its own clock, when that revision last moved.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<String, (u64, Instant)>,
}

impl Liveness {
    /// Takes a fresh read of every entry; returns those silent for longer than `silent`
    /// (never this node's own, never one already claimed by a live node within `silent`).
    pub fn observe(&mut self, entries: &[NodeEntry], me: &str, silent: Duration) -> Vec<NodeEntry> {
        let now = Instant::now();
        let mut dead = Vec::new();
        let names: std::collections::HashSet<&str> =
            entries.iter().map(|e| e.record.name.as_str()).collect();
        self.seen.retain(|n, _| names.contains(n.as_str()));
        for e in entries {
            if e.record.name == me {
                continue;
            }
            let since = match self.seen.get(&e.record.name) {
                Some((rev, since)) if *rev == e.revision => *since,
                _ => {
                    self.seen.insert(e.record.name.clone(), (e.revision, now));
                    now
                }
            };
            if now.duration_since(since) > silent {
                dead.push(e.clone());
            }
        }
        dead
    }
}
