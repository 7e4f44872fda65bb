//! The replication core, shared by the KV cluster and checkpoint fan-out.
//!
//! - [`placement`]: weighted rendezvous hashing: each key's ordered replica
//!   list, from the member list alone.
//! - [`membership`]: members, liveness, and an epoch.
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
//! - This module: where a write goes, where a read goes, who uploads, as
//!   plain functions. None of these modules does I/O: kvtierd's cluster
//!   module drives them (DESIGN.md: "the replication logic does no I/O").

pub mod hints;
pub mod membership;
pub mod placement;
pub mod read;
pub mod rebalance;
pub mod swim;
#[cfg(test)]
mod testkit;
pub mod write;

use serde::{Deserialize, Serialize};

use self::membership::Membership;
use self::placement::{NodeId, rank};
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

/// Plans a write of `key`: its first `r` replicas in rendezvous order, each
/// down one replaced by the next writable member past the first `r`, with a
/// hint. Fewer targets than `quorum` means the write must fail (not enough
/// nodes up).
pub fn plan_write(key: &BlockKey, view: &Membership, rep: Replication) -> WritePlan {
    let members = view.members();
    let order: Vec<NodeId> = rank(key, &members).into_iter().map(|i| members[i].id.clone()).collect();
    let r = rep.replicas.min(order.len());
    let mut spares = order[r..].iter().filter(|n| view.is_writable(n));
    let mut targets = Vec::with_capacity(r);
    for n in &order[..r] {
        if view.is_writable(n) {
            targets.push(Target {
                node: n.clone(),
                hint_for: None,
            });
        } else if let Some(s) = spares.next() {
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
/// of the writable members (a stand-in may hold a hinted copy).
pub fn read_order(key: &BlockKey, view: &Membership, rep: Replication) -> Vec<NodeId> {
    read_order_with(key, view, rep, |_| false)
}

/// [`read_order`], with the members `out_of_sync` names for `key` (a write
/// of it failed there and is not repaired yet) moved to the end, in the
/// same relative order: they are asked only when no other member has it.
pub fn read_order_with(
    key: &BlockKey,
    view: &Membership,
    rep: Replication,
    out_of_sync: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let members = view.members();
    let order: Vec<NodeId> = rank(key, &members).into_iter().map(|i| members[i].id.clone()).collect();
    let r = rep.replicas.min(order.len());
    let (first, rest) = order.split_at(r);
    let (fresh, stale): (Vec<NodeId>, Vec<NodeId>) = first
        .iter()
        .chain(rest)
        .filter(|n| view.is_writable(n))
        .cloned()
        .partition(|n| !out_of_sync(n));
    fresh.into_iter().chain(stale).collect()
}

/// The one node that uploads `key` to blob: the first writable replica in
/// rendezvous order. Every node computes the same answer, so a key is
/// uploaded once whatever R is; when that node is down, the next one takes
/// over.
pub fn uploader(key: &BlockKey, view: &Membership, rep: Replication) -> Option<NodeId> {
    let members = view.members();
    rank(key, &members)
        .into_iter()
        .take(rep.replicas)
        .map(|i| members[i].id.clone())
        .find(|n| view.is_writable(n))
}

#[cfg(test)]
mod tests {
    use super::membership::Detector;
    use super::placement::Member;
    use super::*;

    fn view(n: usize, me: usize) -> Membership {
        let ms = (0..n).map(|i| Member::new(format!("n{i}"), format!("h:{i}"))).collect();
        Membership::new(NodeId(format!("n{me}")), ms, Detector::default())
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
        assert!(placement::replicas(&k, &v.members(), 2).contains(&next));
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
    }
}
