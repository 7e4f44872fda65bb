//! Least-recently-used order, on the `lru` crate's linked hash map.

use std::hash::BuildHasherDefault;

use super::EvictionPolicy;
use crate::block::{BlockKey, KeyHasher};

/// Evicts the least recently stored or read key.
#[derive(Debug)]
pub struct LruPolicy {
    order: lru::LruCache<BlockKey, (), BuildHasherDefault<KeyHasher>>,
}

impl LruPolicy {
    /// An empty policy. The cache is unbounded: the tier bounds bytes.
    pub fn new() -> Self {
        Self {
            order: lru::LruCache::unbounded_with_hasher(BuildHasherDefault::default()),
        }
    }
}

impl Default for LruPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl EvictionPolicy for LruPolicy {
    fn insert(&mut self, key: BlockKey) {
        self.order.put(key, ());
    }

    fn touch(&mut self, key: &BlockKey) {
        self.order.promote(key);
    }

    fn remove(&mut self, key: &BlockKey) {
        self.order.pop(key);
    }

    fn victim(&mut self, busy: &dyn Fn(&BlockKey) -> bool) -> Option<BlockKey> {
        // iter() runs from most to least recent.
        self.order.iter().rev().map(|(k, _)| *k).find(|k| !busy(k))
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_and_skips_busy() {
        let mut p = LruPolicy::new();
        for i in 1..=3 {
            p.insert(BlockKey(i));
        }
        p.touch(&BlockKey(1));
        // Order, least recent first: 2, 3, 1.
        assert_eq!(p.victim(&|_| false), Some(BlockKey(2)));
        assert_eq!(p.victim(&|k| *k == BlockKey(2)), Some(BlockKey(3)));
        p.remove(&BlockKey(2));
        assert_eq!(p.victim(&|_| false), Some(BlockKey(3)));
        assert_eq!(p.victim(&|_| true), None);
        assert_eq!(p.len(), 2);
    }
}
