//! Handing hints back: a node holding copies for a replica that lacks them
//! (a stand-in, or a write's coordinator after a failed copy) gives them
//! to that replica, its *home*, once the home answers again, and then
//! drops the copies it held only for the home.
//!
//! A copy is dropped only after the home confirmed it stored it: until
//! then the copy here may be the only one, and a delivery that failed is
//! tried again at the next heartbeat.

use super::membership::{Liveness, Membership};
use crate::block::BlockKey;

/// What to do with the hints for one home now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintAction {
    /// The home answers heartbeats: hand the copies back.
    Deliver,
    /// The home is suspect or down: keep the hints for later.
    Wait,
    /// The home left the cluster: cancel the hints. Its keys went to
    /// their new replicas by rebalancing, which moves this node's copies
    /// too.
    GiveUp,
}

/// What to do with the hints for a home whose liveness here is `home`
/// (`None`: no longer a member).
pub fn hint_action(home: Option<Liveness>) -> HintAction {
    match home {
        Some(Liveness::Up) => HintAction::Deliver,
        // A suspect home may be slow or half up; delivering to it would
        // only time out and send the batch again.
        Some(Liveness::Suspect | Liveness::Down) => HintAction::Wait,
        None => HintAction::GiveUp,
    }
}

/// The outcome of one delivery of hints to their home.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Hints to cancel: those delivered and those whose copy was gone
    /// here (nothing left to deliver).
    pub done: Vec<BlockKey>,
    /// Local copies to remove: delivered keys this node is no replica of.
    pub drop: Vec<BlockKey>,
    /// Copies the home confirmed.
    pub delivered: usize,
    /// Hints given up: their copy was gone here.
    pub given_up: usize,
}

/// Settles a delivery to a home in `view` of the copies `present` here
/// (sent), with the hints of `missing` keys whose copy was gone here.
/// `confirmed`: whether the home answered that it stored every key of
/// `present` (true when `present` is empty, as nothing was sent). The
/// keys have `r` replicas.
///
/// Unconfirmed, nothing changes: every hint stays for the next try, and
/// every copy stays, since the home may lack it.
pub fn settle_delivery(
    present: &[BlockKey],
    missing: &[BlockKey],
    confirmed: bool,
    view: &Membership,
    r: usize,
) -> Settlement {
    if !confirmed {
        return Settlement::default();
    }
    let drop = present
        .iter()
        .filter(|k| !view.table().rank_prefix(k).take(r).any(|m| m.id == *view.me()))
        .copied()
        .collect();
    Settlement {
        done: present.iter().chain(missing).copied().collect(),
        drop,
        delivered: present.len(),
        given_up: missing.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::arb_view;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hints_wait_for_an_up_home_and_are_given_up_for_a_departed_one() {
        assert_eq!(hint_action(Some(Liveness::Up)), HintAction::Deliver);
        assert_eq!(hint_action(Some(Liveness::Suspect)), HintAction::Wait);
        assert_eq!(hint_action(Some(Liveness::Down)), HintAction::Wait);
        assert_eq!(hint_action(None), HintAction::GiveUp);
    }

    proptest! {
        #[test]
        fn a_stand_in_drops_its_copy_only_after_the_home_confirmed_and_only_where_no_replica(
            (view, rep) in arb_view(),
            keys in prop::collection::btree_set(any::<u128>(), 0..32),
            split in any::<prop::sample::Index>(),
            confirmed in any::<bool>(),
        ) {
            let keys: Vec<BlockKey> = keys.into_iter().map(BlockKey).collect();
            let at = if keys.is_empty() { 0 } else { split.index(keys.len() + 1) };
            let (present, missing) = keys.split_at(at);
            let s = settle_delivery(present, missing, confirmed, &view, rep.replicas);
            if !confirmed {
                prop_assert_eq!(s, Settlement::default(), "unconfirmed: nothing dropped, nothing cancelled");
                return Ok(());
            }
            prop_assert_eq!(&s.done, &keys, "every hint of the batch is settled");
            prop_assert_eq!(s.delivered, present.len());
            prop_assert_eq!(s.given_up, missing.len());
            for k in present {
                let mine = view.table().replicas(k, rep.replicas).unwrap().contains(view.me());
                prop_assert_eq!(s.drop.contains(k), !mine, "key {:?}: a replica here keeps it", k);
            }
            for k in &s.drop {
                prop_assert!(present.contains(k), "{:?} was not delivered", k);
            }
        }
    }
}
