//! Eviction policies for the host tier.
//!
//! A policy only orders keys; the tier owns the bytes and decides which keys
//! are busy (pinned) and may not go. LRU is the first policy; others plug in
//! behind [`EvictionPolicy`] and are named by [`EvictionKind`] in config.

mod lru;

pub use self::lru::LruPolicy;

use serde::{Deserialize, Serialize};

use crate::block::BlockKey;

/// Orders the keys of a tier for eviction.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// A key was stored. It is not in the policy yet.
    fn insert(&mut self, key: BlockKey);

    /// A key was read.
    fn touch(&mut self, key: &BlockKey);

    /// A key left the tier (removed or evicted). Unknown keys are ignored.
    fn remove(&mut self, key: &BlockKey);

    /// The key to evict next among those for which `busy` is false, or `None`
    /// when every key is busy. The key stays in the policy until `remove`.
    fn victim(&mut self, busy: &dyn Fn(&BlockKey) -> bool) -> Option<BlockKey>;

    /// Keys held.
    fn len(&self) -> usize;

    /// Whether no key is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policies a config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EvictionKind {
    /// Least recently used.
    #[default]
    Lru,
}

impl EvictionKind {
    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(LruPolicy::new()),
        }
    }
}
