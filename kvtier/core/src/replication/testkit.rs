//! Views for the replication tests: members with random liveness.

use proptest::prelude::*;
use std::sync::Arc;

use super::Replication;
use super::membership::{Detector, Membership};
use super::placement::{Layout, Member, NodeId};
use super::slots::{MAX_R, SlotTable};

/// The slot count of the tests' views: enough for placement to spread,
/// few enough for a property test to build hundreds of views.
pub(crate) const SLOTS: u32 = 1024;

/// A view from `me` of `members`, all up, in [`SLOTS`] slots.
pub(crate) fn view_of(me: NodeId, members: &[Member]) -> Membership {
    Membership::with_members(me, members, SLOTS, Detector::default()).unwrap()
}

/// The slot layout of `members` in [`SLOTS`] slots.
pub(crate) fn layout(members: &[Member]) -> Layout {
    Layout::Slots(Arc::new(SlotTable::new(members, SLOTS, MAX_R).unwrap()))
}

/// Member `i`'s id.
pub(crate) fn node(i: usize) -> NodeId {
    NodeId(format!("n{i}"))
}

/// Members with the ids of `ids`, weight 1.
pub(crate) fn members(ids: impl IntoIterator<Item = usize>) -> Vec<Member> {
    ids.into_iter()
        .map(|i| Member::new(node(i).0, format!("h:{i}")))
        .collect()
}

/// Sets `id`'s liveness in `view` by missed heartbeats: 0 up, 1 suspect,
/// 2 down (the default detector).
pub(crate) fn set_liveness(view: &mut Membership, id: &NodeId, state: u8) {
    let misses = match state {
        0 => 0,
        1 => Detector::default().suspect_after,
        _ => Detector::default().down_after,
    };
    for _ in 0..misses {
        view.heartbeat_failed(id);
    }
}

/// A view from `n0` of 1 to 8 members, each other one up, suspect or
/// down, and a replication valid for that many members.
pub(crate) fn arb_view() -> impl Strategy<Value = (Membership, Replication)> {
    (1usize..=8)
        .prop_flat_map(|n| (prop::collection::vec(0u8..3, n), 1..=n))
        .prop_flat_map(|(live, r)| (Just(live), Just(r), 1..=r))
        .prop_map(|(live, r, w)| {
            let mut view = view_of(node(0), &members(0..live.len()));
            for (i, l) in live.iter().enumerate() {
                set_liveness(&mut view, &node(i), *l);
            }
            let rep = Replication {
                replicas: r,
                write_quorum: Some(w),
            };
            (view, rep)
        })
}
