//! Membership: who is in the cluster, who is up, where keys go, and an
//! epoch that changes with every change. A pure state machine: the server
//! feeds it heartbeat results and member-list changes; it does no I/O.
//!
//! Placement ranks every member that has not left, up or down: a node that
//! is down for a while keeps its place, so a transient failure moves no
//! keys; writes skip it (see [`super::plan_write`]) and leave it hints.
//! Joining and leaving change the placement set; those are the changes that
//! move keys.
//!
//! # The member list and its slot table
//!
//! A view holds the member list as a [`SlotTable`] (keys hash into a fixed
//! number of slots, each slot's replica order computed once per list; see
//! [`super::slots`]), so placing a key costs the same at 3 members or
//! 100,000. The table *is* the list: a view's members are its table's, so
//! the two never disagree. Liveness changes leave the table alone.
//!
//! A list change comes in three steps, so that a driver can keep serving on
//! the old table while the new one is computed (seconds at 100,000
//! members):
//!
//! 1. [`Membership::propose_join`], [`Membership::propose_leave`] or
//!    [`Membership::propose_adopt`] answers a [`ListChange`], the list
//!    after; the view does not change;
//! 2. [`ListChange::table`] computes the new table from the current one (a
//!    pure function: incremental for a join or a leave, a rebuild for larger
//!    changes), anywhere;
//! 3. [`Membership::commit`] installs it. It refuses a change computed from
//!    a list that has changed since, or a table of another list, so one list
//!    change at a time reaches the view whole.
//!
//! [`Membership::join`], [`Membership::leave`] and [`Membership::adopt`] do
//! all three at once, for tests and small lists.
//!
//! The slot count is part of the placement: nodes of one cluster must use
//! the same, and [`Membership::digest`] covers it, so two views with the
//! same digest place every key alike.
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
//! ([`Membership::propose_adopt`]), so a node that was down during a join
//! or leave learns it once back. Only a strictly larger epoch is adopted,
//! so two lists never replace each other back and forth; two changes
//! applied at once on different nodes both reach every node, each bumping
//! the clock.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::sync::Arc;

use super::placement::{Member, NodeId};
use super::slots::{MAX_R, SlotError, SlotTable};
use crate::error::{Error, ErrorKind};

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
    /// A member joined the placement set (or changed its address or weight).
    Joined(NodeId),
    /// A member left it.
    Left(NodeId),
}

/// A hash of a member list given in id order (ids, addresses, weights) and
/// the slot count keys are placed in: what [`Membership::digest`] answers
/// for that list. Equal digests mean equal placements.
pub fn digest<'a>(members: impl IntoIterator<Item = &'a Member>, slots: u32) -> u64 {
    let mut b = Vec::new();
    for m in members {
        for part in [m.id.0.as_bytes(), m.addr.as_bytes()] {
            b.extend_from_slice(&(part.len() as u64).to_le_bytes());
            b.extend_from_slice(part);
        }
        b.extend_from_slice(&m.weight.to_bits().to_le_bytes());
    }
    b.extend_from_slice(b"slots");
    b.extend_from_slice(&slots.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&b)
}

#[derive(Debug, Clone, Copy)]
struct State {
    liveness: Liveness,
    misses: u32,
}

impl State {
    const UP: Self = Self {
        liveness: Liveness::Up,
        misses: 0,
    };
}

/// The member list (as its slot table) with liveness and an epoch.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    epoch: u64,
    /// The member list's clock: see "Catching up on the member list".
    list_epoch: u64,
    detector: Detector,
    /// Liveness per member, beside `table`'s members (same index): placing
    /// a key reads its replicas' liveness without a search.
    states: Vec<State>,
    /// This node's index in `table`'s members, while it is one.
    me_at: Option<usize>,
    table: Arc<SlotTable>,
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

/// How a list change moves the list epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListClock {
    /// One per join or leave applied here.
    Bump,
    /// A peer's list adopted: its epoch (never lowering this one).
    Take(u64),
}

/// What a list change does to the table.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Join(Member),
    Leave(NodeId),
    /// Any other list: joins, leaves, addresses and weights at once.
    Replace,
}

/// A change of the member list, computed from a view and not applied yet:
/// [`ListChange::table`] gives the table of its list, which
/// [`Membership::commit`] installs.
#[derive(Debug, Clone, PartialEq)]
pub struct ListChange {
    /// The list after the change, in id order.
    members: Vec<Member>,
    /// The digest of the list it was computed from.
    from: u64,
    clock: ListClock,
    step: Step,
}

impl ListChange {
    /// The member list after the change, in id order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The table of the list after the change, from `current`, the table
    /// of the list it was computed from. Pure, and the expensive part of a
    /// change (a join or leave costs milliseconds at 100,000 members, a
    /// larger change a rebuild of seconds): a driver runs it off its event
    /// loop. Refuses a list no table can be made of (empty, a bad weight).
    pub fn table(&self, current: &SlotTable) -> Result<SlotTable, SlotError> {
        let mut t = current.clone();
        match &self.step {
            Step::Join(m) if t.member(&m.id).is_none() => t.join(m.clone())?,
            Step::Leave(id) => {
                t.leave(id)?;
            }
            _ => t.update(&self.members)?,
        }
        Ok(t)
    }
}

/// Why [`Membership::commit`] refused a change. Nothing changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    /// No table can be made of the list after the change.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The view's list changed after the change was computed.
    #[error("the member list changed since this change was computed: compute it again")]
    Stale,
    /// The table given is not of the change's list (or has another slot
    /// count than the view).
    #[error(
        "a table of {table_members} members in {table_slots} slots does not place the change's {members} members in the view's {slots} slots"
    )]
    WrongTable {
        /// Members of the table given.
        table_members: usize,
        /// Its slots.
        table_slots: u32,
        /// Members of the list after the change.
        members: usize,
        /// The view's slots.
        slots: u32,
    },
}

impl ListError {
    /// The crate error kind: the slot table's for a bad list,
    /// [`ErrorKind::Unavailable`] for a stale change (compute it again),
    /// [`ErrorKind::Internal`] for a table of another list (a driver bug).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Slots(e) => e.kind(),
            Self::Stale => ErrorKind::Unavailable,
            Self::WrongTable { .. } => ErrorKind::Internal,
        }
    }

    /// The crate error of this one.
    pub fn into_error(self) -> Error {
        Error::new(self.kind(), self.to_string())
    }
}

impl Membership {
    /// A view from `me` of the members of `table` (which include `me`,
    /// unless it left), all up, epoch 1. Tables of [`MAX_R`] members per
    /// slot leave writes the most stand-ins.
    pub fn new(me: NodeId, table: Arc<SlotTable>, detector: Detector) -> Self {
        let states = vec![State::UP; table.members().len()];
        let me_at = table.index_of(&me);
        Self {
            me,
            epoch: 1,
            list_epoch: 0,
            detector,
            states,
            me_at,
            table,
        }
    }

    /// [`Membership::new`] with the table of `members` in `slots` slots,
    /// [`MAX_R`] members kept per slot (computed here: see
    /// [`SlotTable::new`] for its cost).
    pub fn with_members(me: NodeId, members: &[Member], slots: u32, detector: Detector) -> Result<Self, SlotError> {
        let table = SlotTable::new(members, slots, MAX_R)?;
        Ok(Self::new(me, Arc::new(table), detector))
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

    /// A hash of the member list (ids, addresses, weights, in id order) and
    /// the slot count: equal on nodes that place keys alike.
    pub fn digest(&self) -> u64 {
        digest(self.table.members(), self.table.slots())
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

    fn change(&self, members: Vec<Member>, clock: ListClock, step: Step) -> ListChange {
        ListChange {
            members,
            from: self.digest(),
            clock,
            step,
        }
    }

    /// The change that adds `m`, or re-addresses or re-weighs it; `None`
    /// when it is a member already, as given.
    pub fn propose_join(&self, m: Member) -> Option<ListChange> {
        let mut members = self.table.members().to_vec();
        match members.binary_search_by(|x| x.id.cmp(&m.id)) {
            Ok(i) if members[i] == m => return None,
            Ok(i) => members[i] = m.clone(),
            Err(i) => members.insert(i, m.clone()),
        }
        Some(self.change(members, ListClock::Bump, Step::Join(m)))
    }

    /// The change that removes `id` (a graceful leave, or an operator's
    /// decision that a failed node is gone for good); `None` when it is not
    /// a member.
    pub fn propose_leave(&self, id: &NodeId) -> Option<ListChange> {
        self.table.member(id)?;
        let members = self.table.members().iter().filter(|m| m.id != *id).cloned().collect();
        Some(self.change(members, ListClock::Bump, Step::Leave(id.clone())))
    }

    /// The change that takes `members` (a peer's newer list, at
    /// `list_epoch`) as the list: members missing from it leave, new or
    /// changed ones join, the others keep their liveness; the list epoch
    /// becomes the peer's. A list without this node removes it, as a
    /// forwarded leave would. `None` when the list is this one (take the
    /// epoch with [`Membership::observe_list_epoch`]).
    pub fn propose_adopt(&self, mut members: Vec<Member>, list_epoch: u64) -> Option<ListChange> {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if members == self.table.members() {
            return None;
        }
        Some(self.change(members, ListClock::Take(list_epoch), Step::Replace))
    }

    /// Installs `change` with `table`, the table of its list (from
    /// [`ListChange::table`]). Answers the changes, leaves first, then joins,
    /// each in id order; each bumps the epoch. Refuses a change computed
    /// from another list than the view's, and a table of another list or
    /// slot count; then nothing changes.
    pub fn commit(&mut self, change: ListChange, table: Arc<SlotTable>) -> Result<Vec<Change>, ListError> {
        if change.from != self.digest() {
            return Err(ListError::Stale);
        }
        if table.slots() != self.table.slots() || table.members() != change.members.as_slice() {
            return Err(ListError::WrongTable {
                table_members: table.members().len(),
                table_slots: table.slots(),
                members: change.members.len(),
                slots: self.table.slots(),
            });
        }
        let before = self.table.members();
        let find = |list: &[Member], id: &NodeId| list.binary_search_by(|x| x.id.cmp(id));
        let mut out: Vec<Change> = before
            .iter()
            .filter(|m| find(&change.members, &m.id).is_err())
            .map(|m| Change::Left(m.id.clone()))
            .collect();
        out.extend(
            change
                .members
                .iter()
                .filter(|m| find(before, &m.id).map_or(true, |i| before[i] != **m))
                .map(|m| Change::Joined(m.id.clone())),
        );
        // Both lists are in id order: one merge walk carries each kept
        // member's state over, new members start up.
        let mut states = Vec::with_capacity(table.members().len());
        let mut old = before.iter().zip(&self.states).peekable();
        for m in table.members() {
            while old.next_if(|(o, _)| o.id < m.id).is_some() {}
            states.push(match old.peek() {
                Some((o, s)) if o.id.cmp(&m.id) == Ordering::Equal => **s,
                _ => State::UP,
            });
        }
        self.states = states;
        self.me_at = table.index_of(&self.me);
        let n = out.len() as u64;
        self.epoch += n;
        self.list_epoch = match change.clock {
            ListClock::Bump => self.list_epoch + n,
            // The peer's clock, not the changes' own bumps: a node that
            // adopts a list must not look newer than the list's owner.
            ListClock::Take(e) => self.list_epoch.max(e),
        };
        self.table = table;
        debug_assert_eq!(self.states.len(), self.table.members().len());
        Ok(out)
    }

    /// Computes `change`'s table here and commits it.
    pub fn apply(&mut self, change: ListChange) -> Result<Vec<Change>, ListError> {
        let table = change.table(&self.table)?;
        self.commit(change, Arc::new(table))
    }

    /// [`Membership::propose_join`], applied here.
    pub fn join(&mut self, m: Member) -> Result<Option<Change>, ListError> {
        match self.propose_join(m) {
            Some(c) => Ok(self.apply(c)?.pop()),
            None => Ok(None),
        }
    }

    /// [`Membership::propose_leave`], applied here.
    pub fn leave(&mut self, id: &NodeId) -> Result<Option<Change>, ListError> {
        match self.propose_leave(id) {
            Some(c) => Ok(self.apply(c)?.pop()),
            None => Ok(None),
        }
    }

    /// [`Membership::propose_adopt`], applied here (the epoch only, when
    /// the list is this one).
    pub fn adopt(&mut self, members: Vec<Member>, list_epoch: u64) -> Result<Vec<Change>, ListError> {
        match self.propose_adopt(members, list_epoch) {
            Some(c) => self.apply(c),
            None => {
                self.observe_list_epoch(list_epoch);
                Ok(Vec::new())
            }
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

    /// The placement: the member list's slot table.
    pub fn table(&self) -> &Arc<SlotTable> {
        &self.table
    }

    /// The slot count keys are placed in.
    pub fn slots(&self) -> u32 {
        self.table.slots()
    }

    /// The placement set: every member, in id order.
    pub fn members(&self) -> Vec<Member> {
        self.table.members().to_vec()
    }

    /// How many members the placement set has.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// The liveness of the member at `index` in the table's members (this
    /// node is always up). Panics past the members.
    pub fn liveness_at(&self, index: usize) -> Liveness {
        if self.me_at == Some(index) {
            return Liveness::Up;
        }
        self.states[index].liveness
    }

    /// Whether writes go to the member at `index` in the table's members.
    pub fn is_writable_at(&self, index: usize) -> bool {
        matches!(self.liveness_at(index), Liveness::Up | Liveness::Suspect)
    }

    /// Whether the placement set is empty (never, for a view: a table has
    /// a member).
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// A member, if in the cluster.
    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.table.member(id)
    }

    /// A member's liveness (`None`: not a member).
    pub fn liveness(&self, id: &NodeId) -> Option<Liveness> {
        self.table.index_of(id).map(|i| self.liveness_at(i))
    }

    /// Whether writes go to `id` (up or suspect).
    pub fn is_writable(&self, id: &NodeId) -> bool {
        matches!(self.liveness(id), Some(Liveness::Up | Liveness::Suspect))
    }

    fn set(&mut self, id: &NodeId, to: Liveness, misses: u32) -> Option<Change> {
        let s = &mut self.states[self.table.index_of(id)?];
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
        let misses = self.states[self.table.index_of(id)?].misses.saturating_add(1);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Few slots: these tests look at the list, not the spread.
    const SLOTS: u32 = 64;

    fn view(me: &str, ids: &[&str]) -> Membership {
        let ms: Vec<Member> = ids.iter().map(|n| Member::new(*n, format!("{n}:1"))).collect();
        Membership::with_members(me.into(), &ms, SLOTS, Detector::default()).unwrap()
    }

    fn three() -> Membership {
        view("a", &["a", "b", "c"])
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
        let table = m.table().clone();
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
        assert!(Arc::ptr_eq(&table, m.table()), "liveness never touches the table");
    }

    #[test]
    fn join_and_leave_change_the_placement_set_and_the_epoch() {
        let mut m = three();
        let e0 = m.epoch();
        for _ in 0..3 {
            m.heartbeat_failed(&"c".into());
        }
        let e0 = e0 + 2;
        assert_eq!(m.join(Member::new("d", "d:1")), Ok(Some(Change::Joined("d".into()))));
        assert_eq!(m.join(Member::new("d", "d:1")), Ok(None), "joining twice is a no-op");
        assert_eq!(m.members().len(), 4);
        assert_eq!(m.len(), 4);
        assert_eq!(m.leave(&"b".into()), Ok(Some(Change::Left("b".into()))));
        assert_eq!(m.leave(&"b".into()), Ok(None));
        assert_eq!(m.members().len(), 3);
        assert_eq!(m.epoch(), e0 + 2);
        assert_eq!(m.liveness(&"b".into()), None);
        assert!(m.member(&"b".into()).is_none());
        // Members before and after the changed ones keep their liveness.
        assert_eq!(m.liveness(&"c".into()), Some(Liveness::Down));
        assert_eq!(m.liveness(&"d".into()), Some(Liveness::Up));
        assert_eq!(m.liveness(&"a".into()), Some(Liveness::Up));
        // The table is the list's, as a rebuild makes it.
        let want = SlotTable::new(&m.members(), SLOTS, MAX_R).unwrap();
        assert!(**m.table() == want);
        // A new address or weight is a change of the list too.
        let mut heavy = Member::new("c", "c:2");
        heavy.weight = 3.0;
        assert_eq!(m.join(heavy.clone()), Ok(Some(Change::Joined("c".into()))));
        assert_eq!(m.member(&"c".into()), Some(&heavy));
        assert!(**m.table() == SlotTable::new(&m.members(), SLOTS, MAX_R).unwrap());
        // This node never marks itself down.
        assert_eq!(m.heartbeat_failed(&"a".into()), None);
        assert!(m.is_writable(&"a".into()));
        // A bad weight or the last member leaving is refused, and changes
        // nothing.
        let mut bad = Member::new("e", "e:1");
        bad.weight = f64::NAN;
        let (e, d) = (m.epoch(), m.digest());
        assert!(matches!(
            m.join(bad),
            Err(ListError::Slots(SlotError::BadWeight { .. }))
        ));
        let mut one = view("a", &["a"]);
        assert_eq!(one.leave(&"a".into()), Err(ListError::Slots(SlotError::NoMembers)));
        assert_eq!((m.epoch(), m.digest()), (e, d));
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn a_change_commits_only_onto_the_list_it_was_computed_from() {
        let mut m = three();
        let join = m.propose_join(Member::new("d", "d:1")).unwrap();
        let leave = m.propose_leave(&"b".into()).unwrap();
        assert!(m.propose_leave(&"x".into()).is_none());
        // The table is computed away from the view, which keeps serving:
        // liveness changes meanwhile survive the commit.
        let table = Arc::new(join.table(m.table()).unwrap());
        m.heartbeat_failed(&"c".into());
        let (e, le) = (m.epoch(), m.list_epoch());
        // A table of another list is refused.
        let other = Arc::new(SlotTable::new(&m.members(), SLOTS, MAX_R).unwrap());
        assert!(matches!(
            m.commit(join.clone(), other),
            Err(ListError::WrongTable {
                members: 4,
                table_members: 3,
                ..
            })
        ));
        let other_slots = Arc::new(SlotTable::new(join.members(), SLOTS * 2, MAX_R).unwrap());
        assert!(matches!(
            m.commit(join.clone(), other_slots),
            Err(ListError::WrongTable { .. })
        ));
        assert_eq!(m.commit(join, table), Ok(vec![Change::Joined("d".into())]));
        assert_eq!((m.epoch(), m.list_epoch()), (e + 1, le + 1));
        assert_eq!(m.liveness(&"c".into()), Some(Liveness::Suspect));
        assert_eq!(m.liveness(&"d".into()), Some(Liveness::Up));
        // The leave was computed from the list before the join: stale.
        let t = Arc::new(leave.table(m.table()).unwrap());
        assert_eq!(m.commit(leave, t), Err(ListError::Stale));
        assert_eq!(m.len(), 4, "nothing changed");
        assert_eq!(ListError::Stale.into_error().kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn the_digest_covers_the_slot_count() {
        let ms = three().members();
        let a = Membership::with_members("a".into(), &ms, 64, Detector::default()).unwrap();
        let b = Membership::with_members("b".into(), &ms, 128, Detector::default()).unwrap();
        assert_ne!(a.digest(), b.digest(), "another slot count places keys elsewhere");
        assert_eq!(a.digest(), digest(&ms, 64));
        assert_eq!(a.catch_up(1, b.digest()), CatchUp::Fetch);
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
        a.join(Member::new("d", "d:1")).unwrap();
        a.leave(&"b".into()).unwrap();
        assert_eq!(a.list_epoch(), 2);
        // c is older: a ignores it, c fetches.
        assert_eq!(a.catch_up(c.list_epoch(), c.digest()), CatchUp::Nothing);
        assert_eq!(c.catch_up(a.list_epoch(), a.digest()), CatchUp::Fetch);
        c.heartbeat_failed(&"c".into());
        let changes = c.adopt(a.members(), a.list_epoch()).unwrap();
        assert_eq!(changes, vec![Change::Left("b".into()), Change::Joined("d".into())]);
        assert_eq!(c.digest(), a.digest());
        assert!(**c.table() == **a.table(), "the same list places alike");
        assert_eq!(digest(&a.members(), SLOTS), a.digest());
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
        assert_eq!(c.adopt(a.members(), 7), Ok(Vec::new()));
        assert_eq!(c.list_epoch(), 7);
        // A list without this node removes it.
        let mut b = three();
        let changes = b
            .adopt(vec![Member::new("c", "c:1"), Member::new("a", "a:1")], 9)
            .unwrap();
        assert_eq!(changes, vec![Change::Left("b".into())]);
        assert_eq!(b.liveness(&"b".into()), None);
        assert_eq!(b.list_epoch(), 9);
        // Adopting a list with several new members takes its epoch, not
        // one bump per member.
        let mut d = view("d", &["d"]);
        d.adopt(a.members(), a.list_epoch()).unwrap();
        assert_eq!(d.list_epoch(), a.list_epoch());
        assert_eq!(d.digest(), a.digest());
        // A list with a member twice is refused whole.
        let twice = vec![Member::new("a", "a:1"), Member::new("a", "a:2")];
        assert!(matches!(
            d.adopt(twice, 99),
            Err(ListError::Slots(SlotError::DuplicateMember(_)))
        ));
        assert_eq!(d.digest(), a.digest());
    }
}
