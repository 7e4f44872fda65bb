//! Weighted rendezvous (highest random weight) placement.
//!
//! Every node scores every key: `score = -weight / ln(u)`, with `u` in
//! (0, 1) a hash of the node's id and the key. Ranking the nodes by score
//! gives the key's replica order; the first `r` hold it. Every node
//! computes the same order from the member list alone, so there is no
//! metadata service, and adding or removing a node moves only the keys
//! whose top `r` it enters or leaves (about `r / n` of them).
//!
//! Scoring every member costs O(n) per key, so kvtier places keys by
//! [slots](super::slots): a slot's order is this order of the slot's id,
//! computed once per member list. Per-key rendezvous is kept as the
//! definition of a slot's order, and as the [`Layout`] that builds before
//! slots placed keys by, which a node upgraded from one moves its keys
//! from.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::slots::SlotTable;
use crate::block::BlockKey;

/// A node's stable name (not its address, which may change).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// A cluster member: who, where, and its share of keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Stable name.
    pub id: NodeId,
    /// Peer gRPC address, `host:port`.
    pub addr: String,
    /// Relative share of keys (e.g. its SSD size in GiB); 1 by default.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Member {
    /// A member of weight 1.
    pub fn new(id: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            id: NodeId(id.into()),
            addr: addr.into(),
            weight: 1.0,
        }
    }
}

/// The score of `node` for `key`; higher wins.
fn score(node: &NodeId, weight: f64, key: &BlockKey) -> f64 {
    score_of_bits(weight, key_bits(node_seed(node), key))
}

/// The hash seed of `node`'s scores (a slot table computes it once per
/// member).
pub(super) fn node_seed(node: &NodeId) -> u64 {
    xxhash_rust::xxh3::xxh3_64(node.0.as_bytes())
}

/// The 53 random bits of the node with `seed` for `key`.
pub(super) fn key_bits(seed: u64, key: &BlockKey) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&key.to_le_bytes(), seed) >> 11
}

/// The score of a node of `weight` whose random bits for a key are `bits`
/// (below 2^53).
pub(super) fn score_of_bits(weight: f64, bits: u64) -> f64 {
    // 53 random bits mapped into (0, 1), never 0 or 1.
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
}

/// Every member in `key`'s rendezvous order (indices into `members`).
/// Ties (practically impossible) break by id, so the order is total.
pub fn rank(key: &BlockKey, members: &[Member]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (score(&m.id, m.weight, key), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| members[a.1].id.cmp(&members[b.1].id)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The ids of `key`'s first `r` replicas.
pub fn replicas(key: &BlockKey, members: &[Member], r: usize) -> Vec<NodeId> {
    rank(key, members)
        .into_iter()
        .take(r)
        .map(|i| members[i].id.clone())
        .collect()
}

/// How a set of keys was placed: what a move after a change of the member
/// list (or of the placement itself) starts from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Layout {
    /// By a slot table: kvtier's placement.
    Slots(Arc<SlotTable>),
    /// By per-key rendezvous over a member list, as kvtier placed keys
    /// before slots. Costs O(members) per key: it is only read while a
    /// node upgraded from such a build moves its keys once.
    Rendezvous(Arc<[Member]>),
}

impl Layout {
    /// `key`'s first `r` replicas under this layout (all members when
    /// fewer; for a slot table, at most its `max_r`).
    pub fn replicas(&self, key: &BlockKey, r: usize) -> Vec<NodeId> {
        match self {
            Self::Slots(t) => t.rank_prefix(key).take(r).map(|m| m.id.clone()).collect(),
            Self::Rendezvous(members) => replicas(key, members, r),
        }
    }

    /// The member list the keys were placed by, in id order for a table.
    pub fn members(&self) -> &[Member] {
        match self {
            Self::Slots(t) => t.members(),
            Self::Rendezvous(members) => members,
        }
    }
}

/// Which replicas a membership change gives and takes for `key`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Moves {
    /// Nodes that must now hold the key (copy to them).
    pub gained: Vec<NodeId>,
    /// Nodes that no longer need it (may drop it once the gainers hold it).
    pub lost: Vec<NodeId>,
}

/// The replica-set change of `key` from `before` to `after` members.
pub fn moves(key: &BlockKey, before: &[Member], after: &[Member], r: usize) -> Moves {
    let old = replicas(key, before, r);
    let new = replicas(key, after, r);
    Moves {
        gained: new.iter().filter(|n| !old.contains(n)).cloned().collect(),
        lost: old.iter().filter(|n| !new.contains(n)).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member::new(format!("node-{i}"), format!("127.0.0.1:{}", 7000 + i)))
            .collect()
    }

    fn key(i: u64) -> BlockKey {
        BlockKey(u128::from(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())) << 64 | u128::from(i))
    }

    #[test]
    fn spreads_keys_evenly_and_by_weight() {
        let m = members(4);
        let mut count = [0usize; 4];
        for i in 0..40_000 {
            count[rank(&key(i), &m)[0]] += 1;
        }
        for c in count {
            assert!((9_000..11_000).contains(&c), "{count:?}");
        }
        let mut w = members(2);
        w[1].weight = 3.0;
        let heavy = (0..40_000).filter(|i| rank(&key(*i), &w)[0] == 1).count();
        assert!((29_000..31_000).contains(&heavy), "{heavy} of 40000 for weight 3 of 4");
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_plus_one() {
        let (three, four) = (members(3), members(4));
        let n = 20_000;
        let moved = (0..n)
            .filter(|i| !moves(&key(*i), &three, &four, 1).gained.is_empty())
            .count();
        let frac = moved as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.025, "moved {frac}");
        // Every moved key moved to the new node, never between old ones.
        for i in 0..2_000 {
            let mv = moves(&key(i), &three, &four, 3);
            assert!(mv.gained.iter().all(|g| g.0 == "node-3"), "{mv:?}");
            assert!(mv.gained.len() == mv.lost.len());
        }
    }

    proptest! {
        #[test]
        fn order_is_a_permutation_independent_of_member_order(k in any::<u128>(), n in 1usize..9, rot in 0usize..9) {
            let m = members(n);
            let r = rank(&BlockKey(k), &m);
            let mut sorted = r.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            let mut shuffled = m.clone();
            shuffled.rotate_left(rot % n);
            prop_assert_eq!(replicas(&BlockKey(k), &m, n), replicas(&BlockKey(k), &shuffled, n));
        }

        #[test]
        fn removing_a_node_keeps_the_relative_order_of_the_rest(k in any::<u128>(), n in 2usize..9, gone in 0usize..9) {
            let m = members(n);
            let gone = gone % n;
            let full: Vec<NodeId> = replicas(&BlockKey(k), &m, n);
            let mut less = m.clone();
            let removed = less.remove(gone).id;
            let expect: Vec<NodeId> = full.into_iter().filter(|id| *id != removed).collect();
            prop_assert_eq!(replicas(&BlockKey(k), &less, n - 1), expect);
        }
    }
}
