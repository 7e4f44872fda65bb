//! What moves after a membership change, and who moves it.
//!
//! Each node walks its own keys and decides, from the member lists alone,
//! what to push and what it may drop; no coordinator. For every key exactly
//! one node pushes each missing copy: the first replica in the key's old
//! order that is writable now (the pusher). A node drops its copy only once
//! every new replica has confirmed it holds the key.
//!
//! - **Scale-out or scale-in** ([`plan_rebalance`]): the placement set
//!   changed; keys whose replica set changed get copied to the gainers.
//! - **Resync** ([`plan_resync`]): a replica came back after missing writes;
//!   the keys it should hold are offered to it (it answers which it lacks).

use std::collections::{BTreeMap, BTreeSet};

use super::membership::Membership;
use super::placement::{Member, NodeId, rank, replicas};
use crate::block::BlockKey;

/// One key's transfer work on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The key.
    pub key: BlockKey,
    /// Nodes this node copies it to (they may hold it already: ask first).
    pub push_to: Vec<NodeId>,
    /// When this node stops being a replica: the new replicas that must
    /// confirm they hold the key before the local copy is dropped. Empty
    /// when this node stays a replica.
    pub drop_after_confirm: Vec<NodeId>,
}

/// The first node of `order` that `view` can write to.
fn first_writable<'a>(order: &'a [NodeId], view: &Membership) -> Option<&'a NodeId> {
    order.iter().find(|n| view.is_writable(n))
}

/// This node's share of the moves from `before` to the members of `view`,
/// for `keys` it holds, each with `r` replicas.
pub fn plan_rebalance(
    keys: impl IntoIterator<Item = BlockKey>,
    before: &[Member],
    view: &Membership,
    r: usize,
) -> Vec<Transfer> {
    let after = view.members();
    let me = view.me();
    let mut out = Vec::new();
    for key in keys {
        let old = replicas(&key, before, r);
        let new = replicas(&key, &after, r);
        if old == new {
            continue;
        }
        let gained: Vec<NodeId> = new.iter().filter(|n| !old.contains(n)).cloned().collect();
        // Old replicas push; if none is left (all gone), any holder does.
        let pusher = first_writable(&old, view).or_else(|| (!new.contains(me)).then_some(me));
        let push_to = if pusher == Some(me) { gained } else { Vec::new() };
        let drop_after_confirm = if new.contains(me) { Vec::new() } else { new };
        if !push_to.is_empty() || !drop_after_confirm.is_empty() {
            out.push(Transfer {
                key,
                push_to,
                drop_after_confirm,
            });
        }
    }
    out
}

/// The pushes of `plan` by receiving node: each `(key, node)` pair of the
/// plan once, keys in plan order, nodes in id order.
pub fn pushes_by_node(plan: &[Transfer]) -> BTreeMap<NodeId, Vec<BlockKey>> {
    let mut out: BTreeMap<NodeId, Vec<BlockKey>> = BTreeMap::new();
    for t in plan {
        for n in &t.push_to {
            out.entry(n.clone()).or_default().push(t.key);
        }
    }
    out
}

/// The keys of a plan this node stops holding, and the confirmations they
/// wait for: a key is dropped only once every one of its new replicas
/// (this node aside) said it holds it.
#[derive(Debug, Clone)]
pub struct DropTally {
    me: NodeId,
    /// Per key, the nodes that must confirm it.
    waiting: Vec<(BlockKey, Vec<NodeId>)>,
    confirmed: BTreeSet<(NodeId, BlockKey)>,
}

/// Which keys a [`DropTally`] lets go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops {
    /// Keys every new replica confirmed: remove the local copy.
    pub drop: Vec<BlockKey>,
    /// Keys still waiting for some confirmation: kept, asked again on the
    /// next pass.
    pub unconfirmed: usize,
}

impl DropTally {
    /// The drops of `plan` made on `me`.
    pub fn new(me: &NodeId, plan: &[Transfer]) -> Self {
        let waiting = plan
            .iter()
            .filter(|t| !t.drop_after_confirm.is_empty())
            .map(|t| {
                let nodes = t.drop_after_confirm.iter().filter(|n| *n != me).cloned().collect();
                (t.key, nodes)
            })
            .collect();
        Self {
            me: me.clone(),
            waiting,
            confirmed: BTreeSet::new(),
        }
    }

    /// Whether no key waits to be dropped.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The questions to ask: per node, the keys it must confirm.
    pub fn asks(&self) -> BTreeMap<NodeId, Vec<BlockKey>> {
        let mut out: BTreeMap<NodeId, Vec<BlockKey>> = BTreeMap::new();
        for (k, nodes) in &self.waiting {
            for n in nodes {
                out.entry(n.clone()).or_default().push(*k);
            }
        }
        out
    }

    /// `node` answered that it holds `key`. Answers from nodes that were
    /// not asked, or about other keys, count for nothing.
    pub fn confirm(&mut self, node: &NodeId, key: BlockKey) {
        if *node != self.me {
            self.confirmed.insert((node.clone(), key));
        }
    }

    /// The keys to drop, and how many stay unconfirmed.
    pub fn finish(self) -> Drops {
        let mut out = Drops::default();
        for (k, nodes) in self.waiting {
            if nodes.iter().all(|n| self.confirmed.contains(&(n.clone(), k))) {
                out.drop.push(k);
            } else {
                out.unconfirmed += 1;
            }
        }
        out
    }
}

/// Keys of `keys` that this node should offer to `returned` (a replica that
/// came back): those `returned` is a replica of, for which this node is the
/// first other writable replica.
pub fn plan_resync(
    keys: impl IntoIterator<Item = BlockKey>,
    returned: &NodeId,
    view: &Membership,
    r: usize,
) -> Vec<BlockKey> {
    let members = view.members();
    let me = view.me();
    keys.into_iter()
        .filter(|key| {
            let order: Vec<NodeId> = rank(key, &members)
                .into_iter()
                .take(r)
                .map(|i| members[i].id.clone())
                .collect();
            order.contains(returned) && order.iter().find(|n| *n != returned && view.is_writable(n)) == Some(me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::membership::Detector;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("n{i}"), format!("h:{i}"))).collect()
    }

    fn view_of(ms: &[Member], me: usize) -> Membership {
        Membership::new(ms[me].id.clone(), ms.to_vec(), Detector::default())
    }

    fn key(i: u64) -> BlockKey {
        BlockKey(u128::from(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())) << 64 | u128::from(i))
    }

    /// Runs every node's plan over a placement where each node holds its
    /// replicas of `n` keys, then checks that the pushes give every key
    /// exactly its new replicas, each copy pushed once.
    fn check_scale(before_n: usize, after_n: usize, r: usize) -> f64 {
        let before = members(before_n);
        let after = members(after_n);
        let n = 4000;
        let mut pushes: HashMap<(BlockKey, NodeId), usize> = HashMap::new();
        let mut moved = 0;
        for me in 0..before_n.min(after_n) {
            let view = view_of(&after, me);
            let held = (0..n)
                .map(key)
                .filter(|k| replicas(k, &before, r).contains(&after[me].id));
            for t in plan_rebalance(held, &before, &view, r) {
                for to in &t.push_to {
                    *pushes.entry((t.key, to.clone())).or_default() += 1;
                }
            }
        }
        for i in 0..n {
            let k = key(i);
            let old = replicas(&k, &before, r);
            let new = replicas(&k, &after, r);
            let gained: Vec<_> = new.iter().filter(|x| !old.contains(x)).collect();
            moved += usize::from(!gained.is_empty());
            for g in gained {
                assert_eq!(pushes.get(&(k, g.clone())), Some(&1), "key {i} to {g}: pushed once");
            }
        }
        moved as f64 / n as f64
    }

    #[test]
    fn scale_out_pushes_each_new_copy_once_and_moves_about_one_in_n() {
        let frac = check_scale(3, 4, 1);
        assert!((frac - 0.25).abs() < 0.025, "moved {frac}");
        check_scale(3, 4, 3);
        check_scale(4, 5, 2);
    }

    #[test]
    fn a_leaver_hands_its_keys_over_and_drops_them_after() {
        let before = members(4);
        let mut after = before.clone();
        after.remove(3);
        // n3 is leaving: it still runs the plan, as a non-member of `after`.
        let mut view = view_of(&before, 3);
        view.leave(&"n3".into());
        let held: Vec<BlockKey> = (0..500)
            .map(key)
            .filter(|k| replicas(k, &before, 2).contains(&before[3].id))
            .collect();
        let plan = plan_rebalance(held.clone(), &before, &view, 2);
        assert_eq!(plan.len(), held.len());
        assert!(
            plan.iter().all(|t| !t.drop_after_confirm.is_empty()),
            "every key leaves n3"
        );
        for t in &plan {
            assert_eq!(t.drop_after_confirm, replicas(&t.key, &after, 2));
            assert!(!t.push_to.contains(&"n3".into()));
        }
        // With R = 2 another old replica pushes; with R = 1 the leaver is
        // the only holder and pushes every key itself.
        assert!(plan.iter().all(|t| t.push_to.is_empty()));
        let only: Vec<BlockKey> = (0..500)
            .map(key)
            .filter(|k| replicas(k, &before, 1)[0].0 == "n3")
            .collect();
        let plan = plan_rebalance(only.clone(), &before, &view, 1);
        assert_eq!(plan.len(), only.len());
        for t in &plan {
            assert_eq!(t.push_to, replicas(&t.key, &after, 1));
        }
    }

    proptest! {
        #[test]
        fn a_leaver_drops_a_key_only_once_every_new_replica_confirmed_it(
            before_n in 2usize..7,
            gone in 0usize..7,
            r in 1usize..4,
            answers in prop::collection::vec(any::<bool>(), 64),
        ) {
            let gone = gone % before_n;
            let before = members(before_n);
            let r = r.min(before_n - 1);
            let mut view = view_of(&before, gone);
            let me = before[gone].id.clone();
            view.leave(&me);
            let held: Vec<BlockKey> = (0..200).map(key).filter(|k| replicas(k, &before, r).contains(&me)).collect();
            let plan = plan_rebalance(held.clone(), &before, &view, r);
            let pushes = pushes_by_node(&plan);
            let pairs: usize = pushes.values().map(Vec::len).sum();
            prop_assert_eq!(pairs, plan.iter().map(|t| t.push_to.len()).sum::<usize>(), "each push once");
            let mut tally = DropTally::new(&me, &plan);
            // Each asked node answers for each key at random; a stray
            // answer from this node itself counts for nothing.
            let mut said: BTreeSet<(NodeId, BlockKey)> = BTreeSet::new();
            let mut i = 0;
            for (node, keys) in tally.asks() {
                prop_assert_ne!(&node, &me, "never asks itself");
                for k in keys {
                    if answers[i % answers.len()] {
                        said.insert((node.clone(), k));
                        tally.confirm(&node, k);
                    }
                    i += 1;
                }
            }
            tally.confirm(&me, held.first().copied().unwrap_or(BlockKey(0)));
            let drops = tally.finish();
            prop_assert_eq!(drops.drop.len() + drops.unconfirmed, held.len(), "a leaver stops holding every key");
            for k in &drops.drop {
                for n in replicas(k, &view.members(), r) {
                    prop_assert!(said.contains(&(n.clone(), *k)), "{:?} dropped before {} confirmed", k, n);
                }
            }
        }
    }

    #[test]
    fn resync_offers_each_missed_key_from_exactly_one_node() {
        let ms = members(4);
        let r = 3;
        let returned: NodeId = "n2".into();
        let mut offered: HashMap<BlockKey, usize> = HashMap::new();
        for me in [0, 1, 3] {
            let view = view_of(&ms, me);
            let held = (0..2000).map(key).filter(|k| replicas(k, &ms, r).contains(&ms[me].id));
            for k in plan_resync(held, &returned, &view, r) {
                *offered.entry(k).or_default() += 1;
            }
        }
        for i in 0..2000 {
            let k = key(i);
            let expect = usize::from(replicas(&k, &ms, r).contains(&returned));
            assert_eq!(offered.get(&k).copied().unwrap_or(0), expect, "key {i}");
        }
    }
}
