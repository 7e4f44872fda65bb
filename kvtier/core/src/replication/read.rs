//! Where a read goes while keys move between nodes.
//!
//! Outside a move a key's replicas (stand-ins included) hold it, and a
//! read asks them only ([`read_order_moving`] with no [`Move`]). After a
//! join or leave a key's new replica may not have it yet: it sits on its
//! old replicas until their rebalancing pass pushed it, and a member that
//! left serves its keys until it is stopped. So during a move a read asks
//! the new replicas, then the old ones, then the other writable members of
//! the key's stored order, then the members that left: wherever a live
//! copy is, the read reaches it, and where nothing moved yet, it reaches it
//! within the first two replica sets.
//!
//! The stored order is a slot's first [`MAX_R`](super::slots::MAX_R)
//! members (every member in a cluster of at most that many), not the whole
//! cluster: a read costs the same at 100,000 members. A join or leave
//! moves a member at most one place in a slot's order, so copies placed by
//! the few lists between the move's start and now sit within it, and the
//! old layout's replicas are asked by name.

use super::membership::Membership;
use super::placement::{Layout, NodeId};
use super::{Replication, read_order_with};
use crate::block::BlockKey;

/// Keys may be on their way between nodes.
#[derive(Debug, Clone, Default)]
pub struct Move {
    /// How keys were placed before the move, when known.
    pub before: Option<Layout>,
    /// Members that left recently: they serve reads until they stop.
    pub departed: Vec<NodeId>,
}

/// The nodes a read of `key` asks, in order, `view.me()` included (a
/// driver that read its own tiers first leaves it out).
///
/// Without a move: the key's first `replicas` in [`read_order_with`]
/// order, those `out_of_sync` names (known to lack the key) last. During
/// `moving`: the same first ones, then the key's replicas under the old
/// layout that are writable or departed and not out of sync, then the
/// other writable members of the key's stored order in read order, then
/// the departed members; no node twice.
pub fn read_order_moving(
    key: &BlockKey,
    view: &Membership,
    rep: Replication,
    moving: Option<&Move>,
    out_of_sync: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let order = read_order_with(key, view, rep, &out_of_sync);
    let r = rep.replicas.min(order.len());
    let Some(mv) = moving else {
        return order.into_iter().take(r).collect();
    };
    let mut out: Vec<NodeId> = order[..r].to_vec();
    let add = |n: &NodeId, out: &mut Vec<NodeId>| {
        if !out.contains(n) {
            out.push(n.clone());
        }
    };
    if let Some(before) = &mv.before {
        for n in before.replicas(key, rep.replicas) {
            let reachable = view.is_writable(&n) || (view.member(&n).is_none() && mv.departed.contains(&n));
            if reachable && !out_of_sync(&n) {
                add(&n, &mut out);
            }
        }
    }
    for n in &order[r..] {
        add(n, &mut out);
    }
    for n in mv.departed.iter().filter(|n| view.member(n).is_none()) {
        add(n, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{layout, members, node, set_liveness, view_of};
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Members `before` and `after` (subsets of n0..n7, n0 in `after`),
    /// liveness per node, replicas, and the key's holders.
    fn arb_move() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<u8>, usize, BTreeSet<usize>)> {
        (
            prop::collection::btree_set(0usize..8, 1..8),
            prop::collection::btree_set(1usize..8, 0..7),
            prop::collection::vec(0u8..3, 8),
            1usize..4,
            prop::collection::btree_set(0usize..8, 0..8),
        )
            .prop_map(|(before, after, live, r, holders)| {
                let mut after: BTreeSet<usize> = after;
                after.insert(0);
                (
                    before.into_iter().collect(),
                    after.into_iter().collect(),
                    live,
                    r,
                    holders,
                )
            })
    }

    fn view_after(after: &[usize], live: &[u8]) -> Membership {
        let mut v = view_of(node(0), &members(after.iter().copied()));
        for &i in after {
            set_liveness(&mut v, &node(i), live[i]);
        }
        v
    }

    #[test]
    fn outside_a_move_a_read_asks_the_replicas_only() {
        let v = view_after(&[0, 1, 2, 3, 4], &[0; 8]);
        let rep = Replication::strong(2);
        let key = BlockKey(11);
        let order = read_order_moving(&key, &v, rep, None, |_| false);
        assert_eq!(order, v.table().replicas(&key, 2).unwrap());
        let moving = read_order_moving(&key, &v, rep, Some(&Move::default()), |_| false);
        assert_eq!(moving.len(), 5, "during a move: every member");
        assert_eq!(moving[..2], order[..]);
    }

    proptest! {
        #[test]
        fn a_read_during_a_move_reaches_a_live_holder(
            (before, after, live, r, holders) in arb_move(),
            k in any::<u128>(),
            legacy in any::<bool>(),
        ) {
            let key = BlockKey(k);
            let view = view_after(&after, &live);
            let r = r.min(after.len());
            let rep = Replication::strong(r);
            let departed: Vec<NodeId> = before.iter().filter(|i| !after.contains(i)).map(|i| node(*i)).collect();
            // Keys placed by slots, or by per-key rendezvous (a node upgraded
            // from a build before slots).
            let old_members = members(before.iter().copied());
            let old_layout = if legacy { Layout::Rendezvous(old_members.into()) } else { layout(&old_members) };
            let mv = Move { before: Some(old_layout.clone()), departed: departed.clone() };
            // Out of sync: the members that do not hold the key, as a hint
            // log would say for some of them.
            let lacks = |n: &NodeId| after.iter().any(|i| node(*i) == *n && !holders.contains(i) && live[*i] == 1);
            let order = read_order_moving(&key, &view, rep, Some(&mv), lacks);
            let distinct: BTreeSet<&NodeId> = order.iter().collect();
            prop_assert_eq!(distinct.len(), order.len(), "no node twice: {:?}", order);
            for n in &order {
                prop_assert!(view.is_writable(n) || departed.contains(n), "{} cannot answer", n);
            }
            let live_holder = |i: &usize| {
                let n = node(*i);
                view.is_writable(&n) || (departed.contains(&n) && view.member(&n).is_none())
            };
            if holders.iter().any(live_holder) {
                prop_assert!(
                    order.iter().any(|n| holders.iter().any(|i| node(*i) == *n)),
                    "holders {:?}, order {:?}", holders, order
                );
            }
            // Nothing moved yet: a live old replica is asked within the
            // first two replica sets.
            let old = old_layout.replicas(&key, r);
            let first = order.iter().take(2 * r).collect::<Vec<_>>();
            for n in old.iter().filter(|n| view.is_writable(n) && !lacks(n)) {
                prop_assert!(first.contains(&n), "old replica {} not among {:?}", n, first);
            }
        }

        #[test]
        fn outside_a_move_a_read_asks_live_replicas_out_of_sync_last(
            (_, after, live, r, _) in arb_move(),
            k in any::<u128>(),
        ) {
            let key = BlockKey(k);
            let view = view_after(&after, &live);
            let rep = Replication::strong(r.min(after.len()));
            let stale = node(after[after.len() - 1]);
            let order = read_order_moving(&key, &view, rep, None, |n| *n == stale);
            prop_assert!(order.len() <= rep.replicas);
            for n in &order {
                prop_assert!(view.is_writable(n), "{} is not live", n);
            }
            if let Some(at) = order.iter().position(|n| *n == stale) {
                prop_assert_eq!(at, order.len() - 1, "out of sync last: {:?}", order);
            }
        }
    }
}
