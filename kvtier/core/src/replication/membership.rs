//! Membership: who is in the cluster, who is up, and an epoch that changes
//! with every change. A pure state machine: the server feeds it heartbeat
//! results and join/leave requests; it does no I/O.
//!
//! Placement ranks every member that has not left, up or down: a node that
//! is down for a while keeps its place, so a transient failure moves no
//! keys; writes skip it (see [`super::plan_write`]) and leave it hints.
//! Joining and leaving change the placement set; those are the changes that
//! move keys.
//!
//! # Catching up on the member list
//!
//! The epoch counts every change this node saw, liveness included, so it
//! differs between nodes. The member list has its own clock, the *list
//! epoch*, comparable across nodes: every join or leave applied here, sent
//! by an operator or forwarded by a peer, bumps it by one. Nodes that
//! applied the same changes then have the same list epoch and the same
//! [`Membership::digest`]; a node that missed one stays behind, even after
//! applying later ones. Heartbeats carry both: a node that sees a peer with
//! a larger list epoch and another digest ([`Membership::catch_up`])
//! fetches the peer's list and adopts it, epoch included
//! ([`Membership::adopt`]), so a node that was down during a join or leave
//! learns it once back. Only a strictly larger epoch is adopted, so two
//! lists never replace each other back and forth; two changes applied at
//! once on different nodes both reach every node, each bumping the clock.

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

impl Liveness {
    /// The name Stats and logs use (serde's spelling too).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
        }
    }
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

/// A hash of a member list given in id order (ids, addresses, weights):
/// what [`Membership::digest`] answers for that list.
pub fn digest<'a>(members: impl IntoIterator<Item = &'a Member>) -> u64 {
    let mut b = Vec::new();
    for m in members {
        for part in [m.id.0.as_bytes(), m.addr.as_bytes()] {
            b.extend_from_slice(&(part.len() as u64).to_le_bytes());
            b.extend_from_slice(part);
        }
        b.extend_from_slice(&m.weight.to_bits().to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&b)
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
    /// The member list's clock: see "Catching up on the member list".
    list_epoch: u64,
    detector: Detector,
    members: BTreeMap<NodeId, State>,
}

/// What a node does on seeing a peer's list epoch and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Nothing: the peer's list is not newer.
    Nothing,
    /// Same list, newer clock: take the peer's list epoch.
    Epoch(u64),
    /// The peer's list is newer and differs: fetch it and adopt it.
    Fetch,
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
            list_epoch: 0,
            detector,
            members,
        }
    }

    /// The same view with the member list's clock at `list_epoch` (the
    /// value saved with the list).
    pub fn with_list_epoch(mut self, list_epoch: u64) -> Self {
        self.list_epoch = list_epoch;
        self
    }

    /// The member list's clock: bumped by a join or leave applied here
    /// first, raised to the carried value by a forwarded one.
    pub fn list_epoch(&self) -> u64 {
        self.list_epoch
    }

    /// Raises the list epoch to `e` (a forwarded change's, or a peer's with
    /// the same list); never lowers it.
    pub fn observe_list_epoch(&mut self, e: u64) {
        self.list_epoch = self.list_epoch.max(e);
    }

    /// A hash of the member list (ids, addresses, weights, in id order):
    /// equal on nodes with the same list.
    pub fn digest(&self) -> u64 {
        digest(self.members.values().map(|s| &s.member))
    }

    /// What to do on seeing a peer at list epoch `epoch` with `digest`:
    /// only a strictly newer list is adopted, so two nodes never swap
    /// lists back and forth.
    pub fn catch_up(&self, epoch: u64, digest: u64) -> CatchUp {
        if epoch <= self.list_epoch {
            CatchUp::Nothing
        } else if digest == self.digest() {
            CatchUp::Epoch(epoch)
        } else {
            CatchUp::Fetch
        }
    }

    /// Takes `members` (a peer's newer list, at `list_epoch`) as the list:
    /// members missing from it leave, new or re-addressed ones join; the
    /// others keep their liveness. Answers the changes, in order (leaves
    /// first). A list without this node removes it, as a forwarded leave
    /// would.
    pub fn adopt(&mut self, members: Vec<Member>, list_epoch: u64) -> Vec<Change> {
        let was = self.list_epoch;
        let keep: std::collections::BTreeSet<NodeId> = members.iter().map(|m| m.id.clone()).collect();
        let gone: Vec<NodeId> = self.members.keys().filter(|id| !keep.contains(*id)).cloned().collect();
        let mut out: Vec<Change> = gone.iter().filter_map(|id| self.leave(id)).collect();
        out.extend(members.into_iter().filter_map(|m| self.join(m)));
        // The peer's clock, not the changes' own bumps: a node that adopts
        // a list must not look newer than the list's owner.
        self.list_epoch = was.max(list_epoch);
        out
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

    /// Sets `id`'s liveness as a failure detector that reports states (SWIM,
    /// see [`super::swim`]) rather than missed heartbeats saw it. This node
    /// is always up in its own view.
    pub fn set_liveness(&mut self, id: &NodeId, to: Liveness) -> Option<Change> {
        if *id == self.me {
            return None;
        }
        self.set(id, to, 0)
    }

    /// Adds (or re-addresses) a member.
    pub fn join(&mut self, m: Member) -> Option<Change> {
        let id = m.id.clone();
        match self.members.get_mut(&id) {
            Some(s) if s.member == m => None,
            Some(s) => {
                s.member = m;
                self.epoch += 1;
                self.list_epoch += 1;
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
                self.list_epoch += 1;
                Some(Change::Joined(id))
            }
        }
    }

    /// Removes a member (a graceful leave, or an operator's decision that a
    /// failed node is gone for good).
    pub fn leave(&mut self, id: &NodeId) -> Option<Change> {
        self.members.remove(id)?;
        self.epoch += 1;
        self.list_epoch += 1;
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

    #[test]
    fn a_node_that_missed_changes_adopts_a_newer_list_and_only_a_newer_one() {
        // a applies a join, then a leave, that c (down then) never got.
        let mut a = three();
        let mut c = three().with_list_epoch(0); // its view from "a" stands for c's
        assert_eq!(a.digest(), c.digest(), "same list, same digest");
        // Liveness changes move the epoch, not the list's clock.
        a.heartbeat_failed(&"c".into());
        assert_eq!(a.list_epoch(), 0);
        assert_eq!(a.catch_up(c.list_epoch(), c.digest()), CatchUp::Nothing);
        a.join(Member::new("d", "d:1"));
        a.leave(&"b".into());
        assert_eq!(a.list_epoch(), 2);
        // c is older: a ignores it, c fetches.
        assert_eq!(a.catch_up(c.list_epoch(), c.digest()), CatchUp::Nothing);
        assert_eq!(c.catch_up(a.list_epoch(), a.digest()), CatchUp::Fetch);
        c.heartbeat_failed(&"c".into());
        let changes = c.adopt(a.members(), a.list_epoch());
        assert_eq!(changes, vec![Change::Left("b".into()), Change::Joined("d".into())]);
        assert_eq!(c.digest(), a.digest());
        assert_eq!(digest(&a.members()), a.digest());
        assert_eq!(c.list_epoch(), 2);
        assert_eq!(
            c.liveness(&"c".into()),
            Some(Liveness::Suspect),
            "a kept member keeps its liveness"
        );
        assert_eq!(c.catch_up(a.list_epoch(), a.digest()), CatchUp::Nothing);
        // Same list at a newer clock: only the clock moves.
        c.observe_list_epoch(1);
        assert_eq!(c.list_epoch(), 2, "never lowered");
        assert_eq!(c.catch_up(5, a.digest()), CatchUp::Epoch(5));
        // A list without this node removes it.
        let mut b = three();
        let changes = b.adopt(vec![Member::new("a", "a:1"), Member::new("c", "c:1")], 9);
        assert_eq!(changes, vec![Change::Left("b".into())]);
        assert_eq!(b.liveness(&"b".into()), None);
        assert_eq!(b.list_epoch(), 9);
        // Adopting a list with several new members takes its epoch, not
        // one bump per member.
        let mut d = Membership::new("d".into(), vec![Member::new("d", "d:1")], Detector::default());
        d.adopt(a.members(), a.list_epoch());
        assert_eq!(d.list_epoch(), a.list_epoch());
        assert_eq!(d.digest(), a.digest());
    }
}
