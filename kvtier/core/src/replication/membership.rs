//! Membership: who is in the cluster, who is up, and an epoch that changes
//! with every change. A pure state machine: the server feeds it heartbeat
//! results and join/leave requests; it does no I/O.
//!
//! Placement ranks every member that has not left, up or down: a node that
//! is down for a while keeps its place, so a transient failure moves no
//! keys; writes skip it (see [`super::plan_write`]) and leave it hints.
//! Joining and leaving change the placement set; those are the changes that
//! move keys.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::placement::{Member, NodeId};

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// Answering heartbeats.
    Up,
    /// Missed `suspect_after` heartbeats in a row: still written to.
    Suspect,
    /// Missed `down_after` heartbeats in a row: skipped by writes, hinted.
    Down,
}

/// How many missed heartbeats make a member suspect, then down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detector {
    /// Misses in a row before a member is suspect.
    pub suspect_after: u32,
    /// Misses in a row before a member is down.
    pub down_after: u32,
}

impl Default for Detector {
    fn default() -> Self {
        Self {
            suspect_after: 1,
            down_after: 3,
        }
    }
}

/// What a call changed; each change bumped the epoch once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A member's liveness changed.
    Liveness {
        /// Which member.
        id: NodeId,
        /// Before.
        from: Liveness,
        /// After.
        to: Liveness,
    },
    /// A member joined the placement set.
    Joined(NodeId),
    /// A member left it.
    Left(NodeId),
}

#[derive(Debug, Clone)]
struct State {
    member: Member,
    liveness: Liveness,
    misses: u32,
}

/// The member list with liveness and an epoch.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    epoch: u64,
    detector: Detector,
    members: BTreeMap<NodeId, State>,
}

impl Membership {
    /// A view from `me` of `members` (which include `me`), all up, epoch 1.
    pub fn new(me: NodeId, members: Vec<Member>, detector: Detector) -> Self {
        let members = members
            .into_iter()
            .map(|m| {
                (
                    m.id.clone(),
                    State {
                        member: m,
                        liveness: Liveness::Up,
                        misses: 0,
                    },
                )
            })
            .collect();
        Self {
            me,
            epoch: 1,
            detector,
            members,
        }
    }

    /// This node.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Bumped by every change.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The placement set: every member, in id order.
    pub fn members(&self) -> Vec<Member> {
        self.members.values().map(|s| s.member.clone()).collect()
    }

    /// A member, if in the cluster.
    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id).map(|s| &s.member)
    }

    /// A member's liveness (`None`: not a member).
    pub fn liveness(&self, id: &NodeId) -> Option<Liveness> {
        if *id == self.me {
            return self.members.get(id).map(|_| Liveness::Up);
        }
        self.members.get(id).map(|s| s.liveness)
    }

    /// Whether writes go to `id` (up or suspect).
    pub fn is_writable(&self, id: &NodeId) -> bool {
        matches!(self.liveness(id), Some(Liveness::Up | Liveness::Suspect))
    }

    fn set(&mut self, id: &NodeId, to: Liveness, misses: u32) -> Option<Change> {
        let s = self.members.get_mut(id)?;
        s.misses = misses;
        if s.liveness == to {
            return None;
        }
        let from = std::mem::replace(&mut s.liveness, to);
        self.epoch += 1;
        Some(Change::Liveness {
            id: id.clone(),
            from,
            to,
        })
    }

    /// A heartbeat to `id` was answered.
    pub fn heartbeat_ok(&mut self, id: &NodeId) -> Option<Change> {
        self.set(id, Liveness::Up, 0)
    }

    /// A heartbeat to `id` failed.
    pub fn heartbeat_failed(&mut self, id: &NodeId) -> Option<Change> {
        if *id == self.me {
            return None;
        }
        let misses = self.members.get(id)?.misses.saturating_add(1);
        let to = if misses >= self.detector.down_after {
            Liveness::Down
        } else if misses >= self.detector.suspect_after {
            Liveness::Suspect
        } else {
            Liveness::Up
        };
        self.set(id, to, misses)
    }

    /// Adds (or re-addresses) a member.
    pub fn join(&mut self, m: Member) -> Option<Change> {
        let id = m.id.clone();
        match self.members.get_mut(&id) {
            Some(s) if s.member == m => None,
            Some(s) => {
                s.member = m;
                self.epoch += 1;
                Some(Change::Joined(id))
            }
            None => {
                self.members.insert(
                    id.clone(),
                    State {
                        member: m,
                        liveness: Liveness::Up,
                        misses: 0,
                    },
                );
                self.epoch += 1;
                Some(Change::Joined(id))
            }
        }
    }

    /// Removes a member (a graceful leave, or an operator's decision that a
    /// failed node is gone for good).
    pub fn leave(&mut self, id: &NodeId) -> Option<Change> {
        self.members.remove(id)?;
        self.epoch += 1;
        Some(Change::Left(id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Membership {
        let ms = ["a", "b", "c"]
            .iter()
            .map(|n| Member::new(*n, format!("{n}:1")))
            .collect();
        Membership::new("a".into(), ms, Detector::default())
    }

    #[test]
    fn misses_make_suspect_then_down_and_one_answer_brings_it_back() {
        let mut m = three();
        let b: NodeId = "b".into();
        let e0 = m.epoch();
        assert!(matches!(
            m.heartbeat_failed(&b),
            Some(Change::Liveness {
                to: Liveness::Suspect,
                ..
            })
        ));
        assert!(m.is_writable(&b));
        assert_eq!(m.heartbeat_failed(&b), None);
        assert!(matches!(
            m.heartbeat_failed(&b),
            Some(Change::Liveness { to: Liveness::Down, .. })
        ));
        assert!(!m.is_writable(&b));
        assert_eq!(m.epoch(), e0 + 2);
        // Down members keep their place: no key moves on a failure.
        assert_eq!(m.members().len(), 3);
        assert!(matches!(
            m.heartbeat_ok(&b),
            Some(Change::Liveness {
                from: Liveness::Down,
                to: Liveness::Up,
                ..
            })
        ));
        assert_eq!(m.epoch(), e0 + 3);
        assert_eq!(m.heartbeat_ok(&b), None);
        assert_eq!(m.epoch(), e0 + 3);
    }

    #[test]
    fn join_and_leave_change_the_placement_set_and_the_epoch() {
        let mut m = three();
        let e0 = m.epoch();
        assert_eq!(m.join(Member::new("d", "d:1")), Some(Change::Joined("d".into())));
        assert_eq!(m.join(Member::new("d", "d:1")), None, "joining twice is a no-op");
        assert_eq!(m.members().len(), 4);
        assert_eq!(m.leave(&"b".into()), Some(Change::Left("b".into())));
        assert_eq!(m.leave(&"b".into()), None);
        assert_eq!(m.members().len(), 3);
        assert_eq!(m.epoch(), e0 + 2);
        assert_eq!(m.liveness(&"b".into()), None);
        // This node never marks itself down.
        assert_eq!(m.heartbeat_failed(&"a".into()), None);
        assert!(m.is_writable(&"a".into()));
    }
}
