//! Subscription records in key-value buckets: the durable subscriptions in `<stream>_SUBS`
//! (so that a poll subscription made on one node is read and acknowledged on another), and,
//! in a cluster, the EWS push subscriptions in `<stream>_EWS` (so that another node takes
//! one over). Every change is a compare-and-set on the entry's revision, retried when
//! another node changed it first: an acknowledgement never goes back, and a concurrent
//! change is never lost.

use async_nats::jetstream::kv;
use futures_util::{Stream, StreamExt, TryStreamExt};
use herald_core::Watermark;
use herald_log::{LogError, SubscriptionRecord};
use serde::{Deserialize, Serialize};

use crate::{bucket_key, bucket_name, js_err};

/// Attempts of one compare-and-set before giving up (each loses only to another change).
const CAS_TRIES: usize = 100;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    id: String,
    spec: Vec<u8>,
    acked: u64,
    inflight: u64,
}

async fn get(store: &kv::Store, id: &str) -> Result<Option<(Stored, u64)>, LogError> {
    let Some(entry) = store.entry(bucket_key(id)).await.map_err(js_err)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let s: Stored = postcard::from_bytes(&entry.value)
        .map_err(|e| js_err(format!("subscription {id}: {e}")))?;
    Ok(Some((s, entry.revision)))
}

/// Writes `s` if the entry is still at `revision` (`None`: absent); whether it was.
async fn cas(store: &kv::Store, s: &Stored, revision: Option<u64>) -> Result<bool, LogError> {
    let value: bytes::Bytes = postcard::to_allocvec(s).map_err(js_err)?.into();
    let key = bucket_key(&s.id);
    let r = match revision {
        Some(rev) => store
            .update(&key, value, rev)
            .await
            .map(|_| ())
            .map_err(|e| (crate::lost_race(&e), e.to_string())),
        None => store
            .create(&key, value)
            .await
            .map(|_| ())
            .map_err(|e| (crate::already_exists(&e), e.to_string())),
    };
    match r {
        Ok(()) => Ok(true),
        Err((true, _)) => Ok(false),
        Err((false, e)) => Err(js_err(e)),
    }
}

/// Changes the subscription `id` with `f` (given `None` when absent; returning `None` leaves
/// it as it is); whether it existed.
async fn modify(
    store: &kv::Store,
    id: &str,
    mut f: impl FnMut(Option<Stored>) -> Option<Stored>,
) -> Result<bool, LogError> {
    for _ in 0..CAS_TRIES {
        let current = get(store, id).await?;
        let existed = current.is_some();
        let revision = current.as_ref().map(|(_, r)| *r);
        let Some(next) = f(current.as_ref().map(|(s, _)| s.clone())) else {
            return Ok(existed);
        };
        if current.as_ref().is_some_and(|(s, _)| *s == next) {
            return Ok(existed);
        }
        if cas(store, &next, revision).await? {
            return Ok(existed);
        }
    }
    Err(js_err(format!(
        "subscription {id}: changed by others {CAS_TRIES} times in a row"
    )))
}

async fn put(store: &kv::Store, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
    modify(store, id, |cur| {
        let (acked, inflight) = cur.map_or((0, 0), |s| (s.acked, s.inflight));
        Some(Stored {
            id: id.to_owned(),
            spec: spec.clone(),
            acked,
            inflight,
        })
    })
    .await
    .map(|_| ())
}

async fn delete(store: &kv::Store, id: &str) -> Result<bool, LogError> {
    let existed = get(store, id).await?.is_some();
    if existed {
        store.purge(bucket_key(id)).await.map_err(js_err)?;
    }
    Ok(existed)
}

async fn ack(store: &kv::Store, id: &str, w: Watermark) -> Result<bool, LogError> {
    modify(store, id, |cur| {
        let mut s = cur?;
        if w.0 > s.acked {
            s.acked = w.0;
        }
        Some(s)
    })
    .await
}

async fn set_inflight(store: &kv::Store, id: &str, through: Watermark) -> Result<bool, LogError> {
    modify(store, id, |cur| {
        let mut s = cur?;
        s.inflight = through.0;
        Some(s)
    })
    .await
}

async fn list(store: &kv::Store) -> Result<Vec<SubscriptionRecord>, LogError> {
    let keys: Vec<String> = match store.keys().await {
        Ok(k) => k.try_collect().await.map_err(js_err)?,
        Err(e) => return Err(js_err(e)),
    };
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(entry) = store.entry(key).await.map_err(js_err)? else {
            continue;
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        out.push(decode(&entry.value)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// A stored value as the record the server reads.
fn decode(value: &[u8]) -> Result<SubscriptionRecord, LogError> {
    let s: Stored = postcard::from_bytes(value).map_err(js_err)?;
    Ok(SubscriptionRecord {
        id: s.id,
        spec: s.spec,
        acked: Watermark(s.acked),
        inflight: Watermark(s.inflight),
    })
}

/// The subscription `id` as stored now.
async fn record(store: &kv::Store, id: &str) -> Result<Option<SubscriptionRecord>, LogError> {
    let Some(entry) = store.entry(bucket_key(id)).await.map_err(js_err)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    decode(&entry.value).map(Some)
}

/// A change to a bucket of subscription records, made by any node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionChange {
    /// Created or changed (acknowledged further, paused, given a new secret…).
    Put(SubscriptionRecord),
    /// Deleted.
    Deleted(String),
}

/// A bucket of subscription records (description, acknowledged and in-flight watermarks),
/// shared by every node on the stream; cheap to clone.
#[derive(Clone, Debug)]
pub struct Records {
    store: kv::Store,
}

impl Records {
    pub(crate) fn new(store: kv::Store) -> Records {
        Records { store }
    }

    /// Stores subscription `id`'s description (its watermarks stay as they are).
    pub async fn put(&self, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
        put(&self.store, id, spec).await
    }

    /// Deletes subscription `id`; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, LogError> {
        delete(&self.store, id).await
    }

    /// Records that `id`'s subscriber has everything up to `w` (never going back); whether
    /// it exists.
    pub async fn ack(&self, id: &str, w: Watermark) -> Result<bool, LogError> {
        ack(&self.store, id, w).await
    }

    /// Records that a push of `id` up to `through` is being attempted; whether it exists.
    pub async fn set_inflight(&self, id: &str, through: Watermark) -> Result<bool, LogError> {
        set_inflight(&self.store, id, through).await
    }

    /// Subscription `id` as stored now.
    pub async fn get(&self, id: &str) -> Result<Option<SubscriptionRecord>, LogError> {
        record(&self.store, id).await
    }

    /// Every stored subscription, by id.
    pub async fn list(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        list(&self.store).await
    }

    /// Every change from now on, by any node, in the order they were made. Start it before
    /// [`Records::list`], so that none is missed.
    pub async fn changes(
        &self,
    ) -> Result<impl Stream<Item = Result<SubscriptionChange, LogError>> + use<>, LogError> {
        let watch = self.store.watch_all().await.map_err(js_err)?;
        Ok(watch.map(|entry| {
            let entry = entry.map_err(js_err)?;
            match entry.operation {
                kv::Operation::Put => decode(&entry.value).map(SubscriptionChange::Put),
                kv::Operation::Delete | kv::Operation::Purge => {
                    let id = bucket_name(&entry.key)
                        .ok_or_else(|| js_err(format!("subscription key {:?}", entry.key)))?;
                    Ok(SubscriptionChange::Deleted(id))
                }
            }
        }))
    }
}
