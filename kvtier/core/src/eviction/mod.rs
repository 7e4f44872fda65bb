//! Eviction policies for the host tier.
//!
//! A policy only orders keys; the tier owns the bytes and decides which keys
//! are busy (pinned) and may not go. LRU is the first policy; others plug in
//! behind [`EvictionPolicy`] and are named by [`EvictionKind`] in config.

mod frecency;
mod lru;

pub use self::frecency::FrecencyPolicy;
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
    /// Recency with a bonus of log2(uses) turnovers, uses remembered
    /// across evictions ([`FrecencyPolicy`]).
    Frecency,
}

impl EvictionKind {
    /// Every policy a config can name.
    pub const ALL: &'static [EvictionKind] = &[Self::Lru, Self::Frecency];

    /// The name a config uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Frecency => "frecency",
        }
    }

    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(LruPolicy::new()),
            Self::Frecency => Box::new(FrecencyPolicy::new()),
        }
    }
}

impl std::str::FromStr for EvictionKind {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            crate::Error::invalid(format!("eviction policy {s:?}: one of {}", names.join(", ")))
        })
    }
}

impl std::fmt::Display for EvictionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_bad_one_lists_them() {
        for k in EvictionKind::ALL {
            assert_eq!(k.name().parse::<EvictionKind>().unwrap(), *k);
            let toml: EvictionKind = serde_json::from_str(&format!("\"{k}\"")).unwrap();
            assert_eq!(toml, *k);
        }
        let e = "mru".parse::<EvictionKind>().unwrap_err();
        assert!(e.to_string().contains("lru"), "{e}");
    }
}
