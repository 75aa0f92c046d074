//! Per-owner limits on what clients hold at once (a token's streams, an account's EWS
//! streaming connections): a permit counts against its owner until dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What each owner holds; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Quota {
    held: Arc<Mutex<HashMap<String, u32>>>,
}

impl Quota {
    /// One more for `owner`, unless it already holds `max`; `None` means no limit.
    pub fn acquire(&self, owner: &str, max: Option<u32>) -> Option<QuotaPermit> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(owner.to_owned()).or_default();
        if max.is_some_and(|max| *n >= max) {
            return None;
        }
        *n += 1;
        Some(QuotaPermit {
            quota: self.clone(),
            owner: owner.to_owned(),
        })
    }

    /// How many `owner` holds.
    pub fn held(&self, owner: &str) -> u32 {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(owner)
            .copied()
            .unwrap_or(0)
    }
}

/// One place held by its owner until dropped.
#[derive(Debug)]
pub struct QuotaPermit {
    quota: Quota,
    owner: String,
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut held = self.quota.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_holds_at_most_its_limit_and_dropping_gives_a_place_back() {
        let q = Quota::default();
        let a = q.acquire("alice", Some(2)).unwrap();
        let _b = q.acquire("alice", Some(2)).unwrap();
        assert!(q.acquire("alice", Some(2)).is_none());
        assert!(
            q.acquire("bob", Some(2)).is_some(),
            "owners are counted apart"
        );
        drop(a);
        assert_eq!(q.held("alice"), 1);
        assert!(q.acquire("alice", Some(2)).is_some());
        assert!(q.acquire("carol", None).is_some());
    }
}
