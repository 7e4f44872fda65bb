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
//!   The same plan moves keys placed by another [`Layout`] of the same
//!   members: another slot count, or per-key rendezvous (a node upgraded
//!   from a build before slots).
//! - **Resync** ([`plan_resync`]): a replica came back after missing writes;
//!   the keys it should hold are offered to it (it answers which it lacks).

use std::collections::{BTreeMap, BTreeSet};

use super::membership::Membership;
use super::placement::{Layout, NodeId};
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

/// This node's share of the moves from the layout `before` to `view`'s,
/// for `keys` it holds, each with `r` replicas.
///
/// After a change of the placement itself (`before` in another slot
/// count, or by per-key rendezvous), copies may also sit where the old
/// placement does not put them: a node's keys from before it was a
/// cluster member, a stand-in's copies. A holder that is a replica under
/// neither placement then pushes its copy itself, since no old replica may
/// hold it. (After a change of the member list alone, such a copy is a
/// read's or a stand-in's, and the old replicas push.)
pub fn plan_rebalance(
    keys: impl IntoIterator<Item = BlockKey>,
    before: &Layout,
    view: &Membership,
    r: usize,
) -> Vec<Transfer> {
    let me = view.me();
    let placement_changed = match before {
        Layout::Slots(t) => t.slots() != view.slots(),
        _ => true,
    };
    let mut out = Vec::new();
    for key in keys {
        let old = before.replicas(&key, r);
        let new = view
            .table()
            .rank_prefix(&key)
            .take(r)
            .map(|m| m.id.clone())
            .collect::<Vec<_>>();
        let stray = placement_changed && !old.contains(me) && !new.contains(me);
        if old == new && !stray {
            continue;
        }
        // A stray copy's holder asks every new replica: none may hold it.
        let gained: Vec<NodeId> = new.iter().filter(|n| stray || !old.contains(n)).cloned().collect();
        // Old replicas push; if none is left (all gone), any holder does.
        let pusher = if stray {
            Some(me)
        } else {
            first_writable(&old, view).or_else(|| (!new.contains(me)).then_some(me))
        };
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
    let me = view.me();
    keys.into_iter()
        .filter(|key| {
            let order: Vec<&NodeId> = view.table().rank_prefix(key).take(r).map(|m| &m.id).collect();
            order.contains(&returned) && order.iter().find(|n| **n != returned && view.is_writable(n)) == Some(&me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::membership::Detector;
    use super::super::placement::Member;
    use super::super::slots::{DEFAULT_SLOTS, MAX_R, SlotTable};
    use super::super::testkit;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("n{i}"), format!("h:{i}"))).collect()
    }

    /// The slot layout of `ms`, with enough slots that a moved fraction is
    /// close to its expectation.
    fn layout(ms: &[Member]) -> Layout {
        Layout::Slots(Arc::new(SlotTable::new(ms, DEFAULT_SLOTS, MAX_R).unwrap()))
    }

    fn view_in(l: &Layout, me: &NodeId) -> Membership {
        let Layout::Slots(t) = l else {
            unreachable!("a slot layout")
        };
        Membership::new(me.clone(), t.clone(), Detector::default())
    }

    fn key(i: u64) -> BlockKey {
        BlockKey(u128::from(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())) << 64 | u128::from(i))
    }

    /// Runs every node's plan over a placement where each node holds its
    /// replicas (by `before`) of `n` keys, then checks that the pushes give
    /// every key exactly its new replicas, each copy pushed once. Answers
    /// the fraction of keys whose replicas changed.
    fn check_scale(before: &Layout, after_n: usize, r: usize) -> f64 {
        let after_members = members(after_n);
        let after = layout(&after_members);
        let n = 4000;
        let mut pushes: HashMap<(BlockKey, NodeId), usize> = HashMap::new();
        let mut moved = 0;
        for me in before.members().iter().filter(|m| after_members.contains(m)) {
            let view = view_in(&after, &me.id);
            let held = (0..n).map(key).filter(|k| before.replicas(k, r).contains(&me.id));
            for t in plan_rebalance(held, before, &view, r) {
                for to in &t.push_to {
                    *pushes.entry((t.key, to.clone())).or_default() += 1;
                }
            }
        }
        for i in 0..n {
            let k = key(i);
            let old = before.replicas(&k, r);
            let new = after.replicas(&k, r);
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
        let frac = check_scale(&layout(&members(3)), 4, 1);
        assert!((frac - 0.25).abs() < 0.025, "moved {frac}");
        check_scale(&layout(&members(3)), 4, 3);
        check_scale(&layout(&members(4)), 5, 2);
    }

    #[test]
    fn keys_placed_by_another_layout_of_the_same_members_move_to_their_slots() {
        // Per-key rendezvous (a build before slots), and another slot
        // count: nearly every key moves, each copy pushed once.
        for r in [1, 2, 3] {
            let frac = check_scale(&Layout::Rendezvous(members(4).into()), 4, r);
            assert!(frac > 0.5, "r {r}: moved {frac}");
            let other = Layout::Slots(Arc::new(SlotTable::new(&members(4), 4096, MAX_R).unwrap()));
            check_scale(&other, 4, r);
        }
    }

    #[test]
    fn after_a_placement_change_a_copy_outside_both_placements_is_pushed_by_its_holder() {
        let ms = members(4);
        let now = layout(&ms);
        for before in [
            Layout::Rendezvous(ms.clone().into()),
            Layout::Slots(Arc::new(SlotTable::new(&ms, 4096, MAX_R).unwrap())),
            layout(&ms[..3]),
        ] {
            let changed = !matches!(&before, Layout::Slots(t) if t.slots() == DEFAULT_SLOTS);
            for me in &ms {
                let view = view_in(&now, &me.id);
                // Keys this node holds that neither placement puts here.
                let strays: Vec<BlockKey> = (0..400)
                    .map(key)
                    .filter(|k| !before.replicas(k, 1).contains(&me.id) && !now.replicas(k, 1).contains(&me.id))
                    .collect();
                assert!(!strays.is_empty());
                let plan = plan_rebalance(strays.clone(), &before, &view, 1);
                // After a member-list change, a stray copy of a key whose
                // replicas did not change is left alone.
                let moved = strays
                    .iter()
                    .filter(|k| changed || before.replicas(k, 1) != now.replicas(k, 1));
                assert_eq!(plan.len(), moved.count());
                for t in &plan {
                    let new = now.replicas(&t.key, 1);
                    assert_eq!(t.drop_after_confirm, new);
                    let want = if changed { new } else { Vec::new() };
                    assert_eq!(t.push_to, want, "placement changed: {changed}");
                }
            }
        }
    }

    #[test]
    fn a_leaver_hands_its_keys_over_and_drops_them_after() {
        let before_members = members(4);
        let before = layout(&before_members);
        let after = layout(&before_members[..3]);
        // n3 is leaving: it still runs the plan, as a non-member of `after`.
        let mut view = view_in(&before, &"n3".into());
        view.leave(&"n3".into()).unwrap();
        assert!(view.table().members() == after.members());
        let held: Vec<BlockKey> = (0..500)
            .map(key)
            .filter(|k| before.replicas(k, 2).contains(&"n3".into()))
            .collect();
        let plan = plan_rebalance(held.clone(), &before, &view, 2);
        assert_eq!(plan.len(), held.len());
        assert!(
            plan.iter().all(|t| !t.drop_after_confirm.is_empty()),
            "every key leaves n3"
        );
        for t in &plan {
            assert_eq!(t.drop_after_confirm, after.replicas(&t.key, 2));
            assert!(!t.push_to.contains(&"n3".into()));
        }
        // With R = 2 another old replica pushes; with R = 1 the leaver is
        // the only holder and pushes every key itself.
        assert!(plan.iter().all(|t| t.push_to.is_empty()));
        let only: Vec<BlockKey> = (0..500)
            .map(key)
            .filter(|k| before.replicas(k, 1)[0].0 == "n3")
            .collect();
        let plan = plan_rebalance(only.clone(), &before, &view, 1);
        assert_eq!(plan.len(), only.len());
        for t in &plan {
            assert_eq!(t.push_to, after.replicas(&t.key, 1));
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
            let before = testkit::layout(&members(before_n));
            let r = r.min(before_n - 1);
            let me = before.members()[gone].id.clone();
            let Layout::Slots(t) = &before else { unreachable!() };
            let mut view = Membership::new(me.clone(), t.clone(), Detector::default());
            view.leave(&me).unwrap();
            let held: Vec<BlockKey> = (0..200).map(key).filter(|k| before.replicas(k, r).contains(&me)).collect();
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
                for n in view.table().replicas(k, r).unwrap() {
                    prop_assert!(said.contains(&(n.clone(), *k)), "{:?} dropped before {} confirmed", k, n);
                }
            }
        }
    }

    #[test]
    fn resync_offers_each_missed_key_from_exactly_one_node() {
        let ms = members(4);
        let l = layout(&ms);
        let r = 3;
        let returned: NodeId = "n2".into();
        let mut offered: HashMap<BlockKey, usize> = HashMap::new();
        for me in [0, 1, 3] {
            let view = view_in(&l, &ms[me].id);
            let held = (0..2000).map(key).filter(|k| l.replicas(k, r).contains(&ms[me].id));
            for k in plan_resync(held, &returned, &view, r) {
                *offered.entry(k).or_default() += 1;
            }
        }
        for i in 0..2000 {
            let k = key(i);
            let expect = usize::from(l.replicas(&k, r).contains(&returned));
            assert_eq!(offered.get(&k).copied().unwrap_or(0), expect, "key {i}");
        }
    }
}
