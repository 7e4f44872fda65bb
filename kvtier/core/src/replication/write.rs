//! A write's decisions, after [`plan_write`](super::plan_write) chose each
//! key's targets: which node gets which keys of a batch, whether the write
//! is acknowledged once the copies answered, and which replicas are left
//! out of sync. The driver sends the groups and feeds each answer to a
//! [`WriteTally`]; it decides nothing itself.

use std::collections::BTreeMap;

use super::placement::NodeId;
use super::{Target, WritePlan};
use crate::error::ErrorKind;

/// The keys of a batch (indices into it, ascending) that one target gets:
/// one request to one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    /// Where the keys go, and for which down replica when a stand-in.
    pub target: Target,
    /// Indices into the batch.
    pub keys: Vec<usize>,
}

/// Groups a batch's plans (one per key, in batch order) by target: each
/// `(key, target)` pair of the plans lands in exactly one group. A node
/// that is a replica of some keys and a stand-in for others gets one group
/// for each role, since a stand-in's copies carry a hint. Groups come in
/// target order, so every run sends the same requests.
pub fn group_targets(plans: &[WritePlan]) -> Vec<TargetGroup> {
    let mut by: BTreeMap<&Target, Vec<usize>> = BTreeMap::new();
    for (i, p) in plans.iter().enumerate() {
        for t in &p.targets {
            by.entry(t).or_default().push(i);
        }
    }
    by.into_iter()
        .map(|(t, keys)| TargetGroup {
            target: t.clone(),
            keys,
        })
        .collect()
}

/// How one group's copy went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyOutcome {
    /// The target answered: `present` of the group's keys were there
    /// already, and its admission filter kept `not_admitted` out.
    Stored {
        /// Keys the target held before this write.
        present: usize,
        /// Keys the target's disk admission filter refused.
        not_admitted: usize,
    },
    /// No copy was made. A timeout, a broken connection or a member
    /// without a client yet is [`ErrorKind::Unavailable`].
    Failed(ErrorKind),
}

/// Whether a copy that failed on a replica with `kind` may succeed later,
/// so that the write's coordinator keeps a copy and a hint for it (the
/// replica is then out of sync until the hint is delivered). A refusal
/// that would repeat keeps nothing: the same copy would be refused again.
pub fn copy_may_recover(kind: ErrorKind) -> bool {
    match kind {
        // Busy, unreachable or restarting: the same copy goes through later.
        ErrorKind::Throttled | ErrorKind::Unavailable | ErrorKind::Closed => true,
        // The replica's store failed (a full or failing disk, bytes
        // damaged in flight): it may heal, and the hint resends the copy
        // from this node's own bytes.
        ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::ChecksumMismatch => true,
        // The request or the caller is refused, or the replica is broken:
        // sending it again later gets the same answer.
        ErrorKind::InvalidArgument
        | ErrorKind::TooLarge
        | ErrorKind::BlockSize
        | ErrorKind::UnknownNamespace
        | ErrorKind::Config
        | ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Unauthenticated
        | ErrorKind::PermissionDenied
        | ErrorKind::Internal => false,
    }
}

/// What the write answers its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Every key has at least its quorum of copies.
    Acknowledged(Ack),
    /// Some keys have fewer copies than their quorum. The copies made stay
    /// (a cache may hold more, never wrong data).
    Failed(Shortfall),
}

/// The counts of an acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Keys written somewhere for the first time.
    pub stored: usize,
    /// Keys every copy of which was there already.
    pub present: usize,
    /// Keys a target's admission filter refused (they count no copy there).
    pub not_admitted: usize,
}

/// Why a write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Keys with fewer copies than their quorum.
    pub short_keys: usize,
    /// What the caller should make of it: the one kind every missing copy
    /// failed with when they agree (then the same write fails the same way
    /// again, or waits on a busy replica), else
    /// [`ErrorKind::Unavailable`]. A member that is down or shutting down
    /// is an outage of the cluster, not of the node the caller talks to,
    /// so it is never [`ErrorKind::Closed`].
    pub kind: ErrorKind,
}

/// The answers of one write's copies, and the verdict they add up to.
#[derive(Debug, Clone)]
pub struct WriteTally {
    me: NodeId,
    groups: Vec<TargetGroup>,
    outcomes: Vec<Option<CopyOutcome>>,
    /// Per key: the copies its plan waits for, and the targets it has.
    quorum: Vec<usize>,
    planned: Vec<usize>,
}

impl WriteTally {
    /// A tally for the batch whose per-key plans are `plans`, coordinated
    /// by `me` (whose own copy is never marked out of sync: it would hold
    /// a hint for itself).
    pub fn new(me: NodeId, plans: &[WritePlan]) -> Self {
        let groups = group_targets(plans);
        Self {
            me,
            outcomes: vec![None; groups.len()],
            groups,
            quorum: plans.iter().map(|p| p.quorum).collect(),
            planned: plans.iter().map(|p| p.targets.len()).collect(),
        }
    }

    /// The requests to send, one per group; [`WriteTally::record`] takes
    /// an answer by its index here.
    pub fn groups(&self) -> &[TargetGroup] {
        &self.groups
    }

    /// Records how group `group` went. Answers the replica to mark out of
    /// sync, when the copy failed on a peer in a way that may recover:
    /// the coordinator keeps the group's copy and a hint for that replica
    /// (the down replica a stand-in stood for, or the target itself).
    ///
    /// # Panics
    ///
    /// When `group` was recorded already: the driver answers each request
    /// once.
    pub fn record(&mut self, group: usize, outcome: CopyOutcome) -> Option<NodeId> {
        assert!(self.outcomes[group].is_none(), "write group {group} answered twice");
        self.outcomes[group] = Some(outcome);
        let t = &self.groups[group].target;
        match outcome {
            CopyOutcome::Failed(kind) if t.node != self.me && copy_may_recover(kind) => {
                Some(t.hint_for.clone().unwrap_or_else(|| t.node.clone()))
            }
            CopyOutcome::Failed(_) | CopyOutcome::Stored { .. } => None,
        }
    }

    /// Copies made per key so far: groups that stored every key. A group
    /// whose target's admission filter refused any key counts no copy,
    /// since which keys it kept out is not known.
    pub fn copies(&self) -> Vec<usize> {
        let mut copies = vec![0; self.quorum.len()];
        for (g, o) in self.groups.iter().zip(&self.outcomes) {
            if let Some(CopyOutcome::Stored { not_admitted: 0, .. }) = o {
                for &i in &g.keys {
                    copies[i] += 1;
                }
            }
        }
        copies
    }

    /// The verdict: acknowledged when every key has its quorum of copies.
    /// A group not recorded counts as a copy that failed unavailable.
    pub fn verdict(&self) -> Verdict {
        let n = self.quorum.len();
        let copies = self.copies();
        let mut everywhere = vec![true; n];
        let mut refused = vec![false; n];
        // Per key, the kind each missing copy failed with.
        let mut causes: Vec<Vec<ErrorKind>> = vec![Vec::new(); n];
        for (g, o) in self.groups.iter().zip(&self.outcomes) {
            for &i in &g.keys {
                match o {
                    Some(CopyOutcome::Stored {
                        not_admitted: 0,
                        present,
                    }) => {
                        everywhere[i] &= *present == g.keys.len();
                    }
                    Some(CopyOutcome::Stored { .. }) => {
                        refused[i] = true;
                        // The replica's configuration refuses it, and
                        // will again: replicated namespaces need every
                        // copy admitted.
                        causes[i].push(ErrorKind::Config);
                    }
                    Some(CopyOutcome::Failed(kind)) => causes[i].push(*kind),
                    None => causes[i].push(ErrorKind::Unavailable),
                }
            }
        }
        let short: Vec<usize> = (0..n).filter(|&i| copies[i] < self.quorum[i]).collect();
        if short.is_empty() {
            let present = everywhere.iter().filter(|p| **p).count();
            return Verdict::Acknowledged(Ack {
                stored: n - present,
                present,
                not_admitted: refused.iter().filter(|r| **r).count(),
            });
        }
        let mut all = Vec::new();
        for &i in &short {
            all.extend_from_slice(&causes[i]);
            if self.planned[i] < self.quorum[i] {
                // Too few members up to plan the quorum: an outage.
                all.push(ErrorKind::Unavailable);
            }
        }
        let kind = match all.split_first() {
            Some((first, rest)) if rest.iter().all(|k| k == first) && *first != ErrorKind::Closed => *first,
            _ => ErrorKind::Unavailable,
        };
        Verdict::Failed(Shortfall {
            short_keys: short.len(),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{arb_view, node};
    use super::super::{Replication, plan_write};
    use super::*;
    use crate::block::BlockKey;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn outcome() -> impl Strategy<Value = CopyOutcome> {
        prop_oneof![
            4 => (0usize..3, prop_oneof![4 => Just(0usize), 1 => 1usize..3])
                .prop_map(|(present, not_admitted)| CopyOutcome::Stored { present, not_admitted }),
            2 => (0..ErrorKind::ALL.len()).prop_map(|i| CopyOutcome::Failed(ErrorKind::ALL[i])),
        ]
    }

    fn plans(keys: &[u128], view: &super::super::membership::Membership, rep: Replication) -> Vec<WritePlan> {
        keys.iter().map(|k| plan_write(&BlockKey(*k), view, rep)).collect()
    }

    #[test]
    fn recoverable_copies_are_exactly_the_retryable_ones_plus_failed_stores() {
        for k in ErrorKind::ALL {
            let store_failed = matches!(k, ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::ChecksumMismatch);
            assert_eq!(copy_may_recover(k), k.is_retryable() || store_failed, "{k:?}");
        }
    }

    #[test]
    fn a_failed_stand_in_marks_the_replica_it_stood_for_and_a_failed_self_marks_nobody() {
        let me = node(0);
        let plans = vec![WritePlan {
            targets: vec![
                Target {
                    node: me.clone(),
                    hint_for: None,
                },
                Target {
                    node: node(2),
                    hint_for: Some(node(1)),
                },
                Target {
                    node: node(3),
                    hint_for: None,
                },
            ],
            quorum: 2,
        }];
        let mut t = WriteTally::new(me.clone(), &plans);
        let at = |t: &WriteTally, n: &NodeId| t.groups().iter().position(|g| g.target.node == *n).unwrap();
        let (g0, g2, g3) = (at(&t, &me), at(&t, &node(2)), at(&t, &node(3)));
        assert_eq!(t.record(g0, CopyOutcome::Failed(ErrorKind::Io)), None);
        assert_eq!(t.record(g2, CopyOutcome::Failed(ErrorKind::Unavailable)), Some(node(1)));
        assert_eq!(t.record(g3, CopyOutcome::Failed(ErrorKind::Throttled)), Some(node(3)));
        let v = t.verdict();
        assert_eq!(
            v,
            Verdict::Failed(Shortfall {
                short_keys: 1,
                kind: ErrorKind::Unavailable
            }),
            "mixed causes are an outage"
        );
    }

    #[test]
    fn causes_that_agree_name_the_failure() {
        let plans = vec![WritePlan {
            targets: vec![
                Target {
                    node: node(1),
                    hint_for: None,
                },
                Target {
                    node: node(2),
                    hint_for: None,
                },
            ],
            quorum: 2,
        }];
        let run = |a: CopyOutcome, b: CopyOutcome| {
            let mut t = WriteTally::new(node(0), &plans);
            t.record(0, a);
            t.record(1, b);
            t.verdict()
        };
        let failed = |kind| Verdict::Failed(Shortfall { short_keys: 1, kind });
        let f = CopyOutcome::Failed;
        assert_eq!(
            run(f(ErrorKind::Throttled), f(ErrorKind::Throttled)),
            failed(ErrorKind::Throttled)
        );
        assert_eq!(
            run(f(ErrorKind::PermissionDenied), f(ErrorKind::PermissionDenied)),
            failed(ErrorKind::PermissionDenied)
        );
        assert_eq!(
            run(f(ErrorKind::Closed), f(ErrorKind::Closed)),
            failed(ErrorKind::Unavailable)
        );
        let refused = CopyOutcome::Stored {
            present: 0,
            not_admitted: 1,
        };
        let ok = CopyOutcome::Stored {
            present: 1,
            not_admitted: 0,
        };
        assert_eq!(run(refused, ok), failed(ErrorKind::Config));
        assert_eq!(
            run(ok, ok),
            Verdict::Acknowledged(Ack {
                stored: 0,
                present: 1,
                not_admitted: 0
            })
        );
    }

    #[test]
    #[should_panic(expected = "answered twice")]
    fn a_group_answered_twice_is_a_driver_bug() {
        let plans = vec![WritePlan {
            targets: vec![Target {
                node: node(1),
                hint_for: None,
            }],
            quorum: 1,
        }];
        let mut t = WriteTally::new(node(0), &plans);
        t.record(0, CopyOutcome::Failed(ErrorKind::Io));
        t.record(0, CopyOutcome::Failed(ErrorKind::Io));
    }

    proptest! {
        #[test]
        fn grouping_covers_every_key_and_target_exactly_once(
            (view, rep) in arb_view(),
            keys in prop::collection::vec(any::<u128>(), 0..24),
        ) {
            let plans = plans(&keys, &view, rep);
            let groups = group_targets(&plans);
            let mut seen: BTreeMap<(usize, Target), usize> = BTreeMap::new();
            for g in &groups {
                prop_assert!(!g.keys.is_empty(), "no empty request");
                prop_assert!(g.keys.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats: {:?}", g.keys);
                for &i in &g.keys {
                    prop_assert!(i < keys.len());
                    *seen.entry((i, g.target.clone())).or_default() += 1;
                }
            }
            let want: usize = plans.iter().map(|p| p.targets.len()).sum();
            prop_assert_eq!(seen.len(), want, "every pair of the plans, nothing else");
            for (i, p) in plans.iter().enumerate() {
                for t in &p.targets {
                    prop_assert_eq!(seen.get(&(i, t.clone())), Some(&1), "key {} to {:?}", i, t);
                }
            }
            let targets: BTreeSet<&Target> = groups.iter().map(|g| &g.target).collect();
            prop_assert_eq!(targets.len(), groups.len(), "one group per target");
        }

        #[test]
        fn a_write_is_acknowledged_exactly_when_every_key_has_w_copies_on_distinct_live_nodes(
            (view, rep) in arb_view(),
            keys in prop::collection::vec(any::<u128>(), 1..16),
            outcomes in prop::collection::vec(outcome(), 128),
        ) {
            let plans = plans(&keys, &view, rep);
            let mut t = WriteTally::new(view.me().clone(), &plans);
            let groups = t.groups().to_vec();
            prop_assert!(groups.len() <= outcomes.len());
            let mut marked = Vec::new();
            for (g, o) in outcomes.iter().take(groups.len()).enumerate() {
                if let Some(n) = t.record(g, *o) {
                    marked.push((g, n));
                }
            }
            // The copies, counted here from the outcomes alone.
            let mut holders: Vec<Vec<&NodeId>> = vec![Vec::new(); keys.len()];
            for (g, o) in groups.iter().zip(&outcomes) {
                if let CopyOutcome::Stored { not_admitted: 0, .. } = o {
                    for &i in &g.keys {
                        holders[i].push(&g.target.node);
                    }
                }
            }
            let enough = holders.iter().all(|h| h.len() >= rep.w());
            match t.verdict() {
                Verdict::Acknowledged(ack) => {
                    prop_assert!(enough, "acknowledged with fewer than W = {} copies: {:?}", rep.w(), holders);
                    for h in &holders {
                        let distinct: BTreeSet<&&NodeId> = h.iter().collect();
                        prop_assert_eq!(distinct.len(), h.len(), "copies on distinct nodes: {:?}", h);
                        for n in h {
                            prop_assert!(view.is_writable(n), "{} is not live", n);
                        }
                    }
                    prop_assert_eq!(ack.stored + ack.present, keys.len());
                    prop_assert!(ack.not_admitted <= keys.len());
                }
                Verdict::Failed(s) => {
                    prop_assert!(!enough, "failed although every key has W copies: {:?}", holders);
                    let short = holders.iter().filter(|h| h.len() < rep.w()).count();
                    prop_assert_eq!(s.short_keys, short);
                    prop_assert_ne!(s.kind, ErrorKind::Closed);
                }
            }
            // Exactly the peers' recoverable failures are marked, each for
            // the replica the copy was meant for.
            let want: Vec<(usize, NodeId)> = groups
                .iter()
                .zip(&outcomes)
                .enumerate()
                .filter_map(|(i, (g, o))| match o {
                    CopyOutcome::Failed(k) if g.target.node != *view.me() && copy_may_recover(*k) => {
                        Some((i, g.target.hint_for.clone().unwrap_or_else(|| g.target.node.clone())))
                    }
                    _ => None,
                })
                .collect();
            prop_assert_eq!(&marked, &want);
            for (_, n) in &marked {
                prop_assert_ne!(n, view.me(), "never out of sync with itself");
            }
        }
    }
}
