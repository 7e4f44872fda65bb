//! The replication core, shared by the KV cluster and checkpoint fan-out.
//!
//! - [`placement`]: weighted rendezvous hashing: a key's ordered replica
//!   list from the member list alone, O(members) per key; and
//!   [`Layout`](placement::Layout), how a set of keys was placed.
//! - [`slots`]: the placement kvtier uses: keys hash into a fixed number of
//!   slots, each slot ordered by rendezvous once per member list; a key's
//!   replicas are a lookup, whatever the cluster size.
//! - [`membership`]: members (as their slot table), liveness from
//!   heartbeats, and an epoch.
//! - [`swim`]: gossip membership (SWIM, on foca): failure detection with
//!   suspicion and indirect probes, joins from seeds, graceful leaves; its
//!   changes feed [`membership`]. [`swim::sim`] runs thousands of members
//!   in one process on simulated time and network.
//! - [`rebalance`]: after a membership change or a node's return, which
//!   keys this node pushes where, and which it may drop once confirmed.
//! - [`write`]: a write's requests (its keys grouped by target), the tally
//!   of their answers into a verdict, and which failed copies are kept for
//!   their replica (out of sync).
//! - [`read`]: where a read goes while keys move after a membership change.
//! - [`hints`]: when a hint goes back to its replica, and which copies a
//!   stand-in drops after.
//! - [`repair`]: read repair and scrub: which holder a read asks after a
//!   copy fails verification, which copies are rewritten from a good one,
//!   what a read with no good copy says, and the scrub's pacing.
//! - [`landed`]: who hears that a key reached blob (batched per peer), who
//!   uploads a key its uploader gave up, and when a replica that heard
//!   nothing checks blob itself.
//! - This module: where a write goes, where a read goes, who uploads, as
//!   plain functions. None of these modules does I/O: kvtierd's cluster
//!   module drives them (DESIGN.md: "the replication logic does no I/O").

pub mod hints;
pub mod landed;
pub mod membership;
pub mod placement;
pub mod read;
pub mod rebalance;
pub mod repair;
pub mod slots;
pub mod swim;
#[cfg(test)]
mod testkit;
pub mod write;

use serde::{Deserialize, Serialize};

use self::membership::Membership;
use self::placement::NodeId;
use crate::block::BlockKey;

/// How many copies a write makes and waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    /// Copies of each key (KV blocks: 1; checkpoints: 3).
    pub replicas: usize,
    /// Copies that must be written before the write is acknowledged;
    /// `replicas` (strong) by default.
    #[serde(default)]
    pub write_quorum: Option<usize>,
}

impl Replication {
    /// `r` copies, all acknowledged.
    pub fn strong(r: usize) -> Self {
        Self {
            replicas: r,
            write_quorum: None,
        }
    }

    /// Copies a write waits for.
    pub fn w(&self) -> usize {
        self.write_quorum.unwrap_or(self.replicas)
    }

    /// Checks the numbers against a cluster of `members` nodes.
    pub fn validate(&self, members: usize) -> Result<(), String> {
        if self.replicas == 0 {
            return Err("replicas must be at least 1".into());
        }
        if self.w() == 0 || self.w() > self.replicas {
            return Err(format!(
                "write_quorum {} must be between 1 and replicas ({})",
                self.w(),
                self.replicas
            ));
        }
        if self.replicas > members {
            return Err(format!(
                "replicas {} exceeds the {members} members of the cluster",
                self.replicas
            ));
        }
        if self.replicas > slots::MAX_R {
            return Err(format!(
                "replicas {} exceeds {}, the most members placement keeps per key",
                self.replicas,
                slots::MAX_R
            ));
        }
        Ok(())
    }
}

/// One copy a write sends.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// The node written to.
    pub node: NodeId,
    /// When `node` stands in for a down replica: that replica, which gets
    /// the key back (a hint) when it returns.
    pub hint_for: Option<NodeId>,
}

/// Where a write goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// The copies to write, in replica order.
    pub targets: Vec<Target>,
    /// Copies to wait for before acknowledging.
    pub quorum: usize,
}

/// `key`'s stored replica order in `view`, each member with whether writes
/// go to it: its first R replicas, then the members that stand in for them
/// (the slot's first [`slots::MAX_R`]).
fn order<'a>(key: &BlockKey, view: &'a Membership) -> impl Iterator<Item = (&'a NodeId, bool)> + 'a {
    view.table()
        .rank_prefix_indexed(key)
        .map(|(i, m)| (&m.id, view.is_writable_at(i)))
}

/// Plans a write of `key`: its first `r` replicas in placement order, each
/// down one replaced by the next writable member past the first `r` in the
/// key's stored order, with a hint. Fewer targets than `quorum` means the
/// write must fail (not enough nodes up).
pub fn plan_write(key: &BlockKey, view: &Membership, rep: Replication) -> WritePlan {
    let r = rep.replicas;
    let mut spares = order(key, view).skip(r).filter(|(_, up)| *up);
    let mut targets = Vec::with_capacity(r);
    for (n, up) in order(key, view).take(r) {
        if up {
            targets.push(Target {
                node: n.clone(),
                hint_for: None,
            });
        } else if let Some((s, _)) = spares.next() {
            targets.push(Target {
                node: s.clone(),
                hint_for: Some(n.clone()),
            });
        }
    }
    WritePlan {
        targets,
        quorum: rep.w(),
    }
}

/// Where a read tries, in order: the replicas that are up, then the rest
/// of the writable members of the key's stored order (a stand-in may hold
/// a hinted copy).
pub fn read_order(key: &BlockKey, view: &Membership, rep: Replication) -> Vec<NodeId> {
    read_order_with(key, view, rep, |_| false)
}

/// [`read_order`], with the members `out_of_sync` names for `key` (a write
/// of it failed there and is not repaired yet) moved to the end, in the
/// same relative order: they are asked only when no other member has it.
pub fn read_order_with(
    key: &BlockKey,
    view: &Membership,
    _rep: Replication,
    out_of_sync: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let (fresh, stale): (Vec<NodeId>, Vec<NodeId>) = order(key, view)
        .filter(|(_, up)| *up)
        .map(|(n, _)| n.clone())
        .partition(|n| !out_of_sync(n));
    fresh.into_iter().chain(stale).collect()
}

/// The one node that uploads `key` to blob: the first writable replica in
/// placement order. Every node computes the same answer, so a key is
/// uploaded once whatever R is; when that node is down, the next one takes
/// over.
pub fn uploader(key: &BlockKey, view: &Membership, rep: Replication) -> Option<NodeId> {
    order(key, view)
        .take(rep.replicas)
        .find(|(_, up)| *up)
        .map(|(n, _)| n.clone())
}

#[cfg(test)]
mod tests {
    use super::membership::Detector;
    use super::placement::Member;
    use super::*;

    fn view(n: usize, me: usize) -> Membership {
        let ms: Vec<Member> = (0..n).map(|i| Member::new(format!("n{i}"), format!("h:{i}"))).collect();
        Membership::with_members(NodeId(format!("n{me}")), &ms, 256, Detector::default()).unwrap()
    }

    fn down(v: &mut Membership, id: &NodeId) {
        for _ in 0..3 {
            v.heartbeat_failed(id);
        }
        assert!(!v.is_writable(id));
    }

    #[test]
    fn a_down_replica_is_replaced_by_the_next_member_with_a_hint() {
        let mut v = view(5, 0);
        let key = BlockKey(99);
        let rep = Replication::strong(3);
        let all = plan_write(&key, &v, rep);
        assert_eq!(all.targets.len(), 3);
        assert!(all.targets.iter().all(|t| t.hint_for.is_none()));
        let victim = all.targets[1].node.clone();
        if victim == *v.me() {
            return; // this node never goes down in its own view
        }
        down(&mut v, &victim);
        let p = plan_write(&key, &v, rep);
        assert_eq!(p.targets.len(), 3);
        assert_eq!(p.targets[0], all.targets[0]);
        assert_eq!(p.targets[1].hint_for, Some(victim.clone()));
        assert!(
            !all.targets.iter().any(|t| t.node == p.targets[1].node),
            "the stand-in is a 4th node"
        );
        // Reads skip the down replica and reach the stand-in.
        let reads = read_order(&key, &v, rep);
        assert!(!reads.contains(&victim));
        assert!(reads[..3].contains(&p.targets[1].node));
    }

    #[test]
    fn a_large_cluster_writes_and_reads_within_the_keys_stored_order() {
        let mut v = view(40, 0);
        let rep = Replication::strong(3);
        let prefix = |v: &Membership, key: &BlockKey| -> Vec<NodeId> {
            v.table().rank_prefix(key).map(|m| m.id.clone()).collect()
        };
        for k in 0..200u128 {
            let key = BlockKey(k);
            let p = prefix(&v, &key);
            assert_eq!(p.len(), slots::MAX_R);
            let plan: Vec<NodeId> = plan_write(&key, &v, rep).targets.into_iter().map(|t| t.node).collect();
            assert_eq!(plan, p[..3]);
            assert_eq!(read_order(&key, &v, rep), p, "the stored order, not all 40");
            assert_eq!(uploader(&key, &v, rep).as_ref(), Some(&p[0]));
        }
        // Stand-ins come from the stored order: with the first replica and
        // every stand-in but the last down, the last takes the copy; with
        // it down too, the plan is short of its quorum.
        let key = (0..1000u128)
            .map(BlockKey)
            .find(|k| !prefix(&v, k).contains(v.me()))
            .unwrap();
        let p = prefix(&v, &key);
        down(&mut v, &p[0]);
        for n in &p[3..slots::MAX_R - 1] {
            down(&mut v, n);
        }
        let plan = plan_write(&key, &v, rep);
        assert_eq!(plan.targets.len(), 3);
        assert_eq!(plan.targets[0].node, p[slots::MAX_R - 1]);
        assert_eq!(plan.targets[0].hint_for.as_ref(), Some(&p[0]));
        down(&mut v, &p[slots::MAX_R - 1]);
        assert!(plan_write(&key, &v, rep).targets.len() < rep.w());
    }

    #[test]
    fn out_of_sync_members_are_read_last() {
        let v = view(4, 0);
        let key = BlockKey(7);
        let rep = Replication::strong(3);
        let plain = read_order(&key, &v, rep);
        assert_eq!(plain.len(), 4);
        let stale = plain[0].clone();
        let order = read_order_with(&key, &v, rep, |n| *n == stale);
        assert_eq!(order[..3], plain[1..], "the others keep their order");
        assert_eq!(order[3], stale, "the out-of-sync member comes last");
        assert_eq!(read_order_with(&key, &v, rep, |_| true), plain, "all stale: unchanged");
    }

    #[test]
    fn too_few_nodes_up_leaves_the_plan_short_of_quorum() {
        let mut v = view(3, 0);
        let rep = Replication::strong(3);
        down(&mut v, &"n1".into());
        let p = plan_write(&BlockKey(5), &v, rep);
        assert_eq!(p.targets.len(), 2);
        assert!(p.targets.len() < p.quorum);
        let w2 = Replication {
            replicas: 3,
            write_quorum: Some(2),
        };
        assert!(plan_write(&BlockKey(5), &v, w2).targets.len() >= w2.w());
    }

    #[test]
    fn exactly_one_uploader_per_key_whatever_r() {
        let views: Vec<Membership> = (0..4).map(|me| view(4, me)).collect();
        for k in 0..500u128 {
            for r in 1..=3 {
                let rep = Replication::strong(r);
                let first = uploader(&BlockKey(k), &views[0], rep);
                assert!(first.is_some());
                assert!(views.iter().all(|v| uploader(&BlockKey(k), v, rep) == first));
            }
        }
        // The uploader going down hands the key to the next replica.
        let mut v = view(4, 0);
        let rep = Replication::strong(2);
        let k = (0..100u128)
            .map(BlockKey)
            .find(|k| uploader(k, &v, rep) != Some("n0".into()))
            .unwrap();
        let u = uploader(&k, &v, rep).unwrap();
        down(&mut v, &u);
        let next = uploader(&k, &v, rep).unwrap();
        assert_ne!(next, u);
        assert!(v.table().replicas(&k, 2).unwrap().contains(&next));
    }

    #[test]
    fn validation_is_precise() {
        assert!(Replication::strong(0).validate(3).is_err());
        assert!(Replication::strong(4).validate(3).unwrap_err().contains("exceeds"));
        let bad = Replication {
            replicas: 2,
            write_quorum: Some(3),
        };
        assert!(bad.validate(3).unwrap_err().contains("write_quorum"));
        assert!(Replication::strong(3).validate(3).is_ok());
        assert!(Replication::strong(17).validate(20).unwrap_err().contains("exceeds 16"));
        assert!(Replication::strong(16).validate(20).is_ok());
    }
}
