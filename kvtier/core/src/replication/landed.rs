//! Telling the other replicas that a key reached blob, so they do not poll
//! for it.
//!
//! In writeback mode every replica of a key logs it as dirty, and one, the
//! uploader ([`super::uploader`]), uploads it. The others must not drop
//! their dirty entry before the key is in blob, or a lost uploader would
//! lose acknowledged data. So the uploader tells them:
//!
//! - **landed**: the key is in blob (uploaded, or found there); a replica
//!   that hears it drops its dirty entry without asking blob;
//! - **gave up**: the uploader cannot upload it (its copy is gone or
//!   unreadable); the next writable replica in order uploads it instead
//!   ([`takes_over`]).
//!
//! Notices go to the key's other writable replicas ([`recipients`]),
//! batched: one message per peer per interval, many keys each ([`route`]).
//! A notice may be lost (a peer down, a timeout): a replica that hears
//! nothing about a key within a bound checks blob itself, once, and again
//! only after twice as long each time it finds the key absent
//! ([`check_delay`], [`Waits`]). So blob sees about one PUT per key and a
//! HEAD only where a notice went missing, and a key whose uploader died
//! before uploading is found absent and uploaded by the next replica,
//! whose uploader filter then says it is its turn.
//!
//! Nothing here does I/O: the writeback keeps a [`Waits`] and the server
//! carries the messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::placement::NodeId;
use crate::block::{BlockKey, NamespaceId};

/// What an uploader says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The key is in blob.
    Landed,
    /// The uploader will not upload it: its copy is gone or unreadable.
    GaveUp,
}

/// One key's outcome, as the writeback reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Notice {
    /// The key's namespace.
    pub ns: NamespaceId,
    /// The key.
    pub key: BlockKey,
    /// What happened to it.
    pub outcome: Outcome,
}

/// The keys of one namespace in a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    /// Keys now in blob.
    pub landed: Vec<BlockKey>,
    /// Keys the sender gave up on.
    pub gave_up: Vec<BlockKey>,
}

/// One message to one peer: keys by namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Keys by namespace.
    pub namespaces: BTreeMap<NamespaceId, Keys>,
    /// Keys in all namespaces.
    pub keys: usize,
}

impl Batch {
    fn push(&mut self, n: &Notice) {
        let k = self.namespaces.entry(n.ns).or_default();
        match n.outcome {
            Outcome::Landed => k.landed.push(n.key),
            Outcome::GaveUp => k.gave_up.push(n.key),
        }
        self.keys += 1;
    }
}

/// The peers that hear about a key whose replicas, in placement order, are
/// `replicas`: every writable one but `me`. A replica that is down misses
/// the notice and checks blob after its bound once it is back.
pub fn recipients(replicas: &[NodeId], me: &NodeId, writable: impl Fn(&NodeId) -> bool) -> Vec<NodeId> {
    replicas.iter().filter(|n| *n != me && writable(n)).cloned().collect()
}

/// Groups `notices` into messages: for each peer that `recipients_of` names
/// for some notice, its notices in order, at most `max_keys` per message
/// (one message per peer unless it has more). A notice named for no peer
/// (no other replica) is dropped. Peers in id order.
pub fn route(
    notices: &[Notice],
    mut recipients_of: impl FnMut(&Notice) -> Vec<NodeId>,
    max_keys: usize,
) -> Vec<(NodeId, Batch)> {
    assert!(max_keys > 0, "a message holds at least one key");
    let mut by_peer: BTreeMap<NodeId, Vec<Batch>> = BTreeMap::new();
    for n in notices {
        for peer in recipients_of(n) {
            let batches = by_peer.entry(peer).or_default();
            if batches.last().is_none_or(|b| b.keys >= max_keys) {
                batches.push(Batch::default());
            }
            batches.last_mut().expect("pushed above").push(n);
        }
    }
    by_peer
        .into_iter()
        .flat_map(|(peer, bs)| bs.into_iter().map(move |b| (peer.clone(), b)))
        .collect()
}

/// Whether `me` uploads a key whose uploader `gave_up` on it: the first
/// writable replica in `replicas` (placement order) other than that one.
pub fn takes_over(replicas: &[NodeId], gave_up: &NodeId, me: &NodeId, writable: impl Fn(&NodeId) -> bool) -> bool {
    replicas.iter().find(|n| *n != gave_up && writable(n)) == Some(me)
}

/// Checks longer apart than this many times the first wait are not made.
const MAX_DELAY_FACTOR: u32 = 64;

/// How long a replica that does not upload a key waits before checking
/// blob for it, after `checks` checks that found it absent: `first`, then
/// twice as long after each, at most 64 times `first`. An uploader with a
/// backlog (or a blob outage) costs a few HEADs per key, not one per
/// interval.
pub fn check_delay(first: Duration, checks: u32) -> Duration {
    first.saturating_mul((1u32 << checks.min(MAX_DELAY_FACTOR.ilog2())).min(MAX_DELAY_FACTOR))
}

/// The keys a replica waits to hear about, each with the time its check of
/// blob is due and the checks made so far. Time is passed in, so it runs
/// in tests without clocks.
#[derive(Debug, Default)]
pub struct Waits {
    due: BTreeSet<(Instant, BlockKey)>,
    at: HashMap<BlockKey, (Instant, u32)>,
}

impl Waits {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for `key`, whose checks so far are `checks`: its check is due
    /// [`check_delay`] after `now`. Replaces an earlier wait.
    pub fn wait(&mut self, key: BlockKey, now: Instant, first: Duration, checks: u32) {
        self.due_at(key, now + check_delay(first, checks), checks);
    }

    /// Makes `key`'s check due at `at` (`now`: at once), keeping its count
    /// of checks. A key not waited for is added with none.
    pub fn due_at(&mut self, key: BlockKey, at: Instant, checks: u32) {
        if let Some((old, _)) = self.at.insert(key, (at, checks)) {
            self.due.remove(&(old, key));
        }
        self.due.insert((at, key));
    }

    /// Stops waiting for `key` (it landed, or this node uploads it now);
    /// answers the checks made, if it was waited for.
    pub fn remove(&mut self, key: &BlockKey) -> Option<u32> {
        let (at, checks) = self.at.remove(key)?;
        self.due.remove(&(at, *key));
        Some(checks)
    }

    /// Whether `key` is waited for.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.at.contains_key(key)
    }

    /// When the next check is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(t, _)| *t)
    }

    /// Takes up to `max` keys whose check is due at `now`, earliest first,
    /// with their checks so far: they are no longer waited for until the
    /// caller waits again (the check found the key absent).
    pub fn take_due(&mut self, now: Instant, max: usize) -> Vec<(BlockKey, u32)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(t, key)) = self.due.first() else { break };
            if t > now {
                break;
            }
            self.due.pop_first();
            let (_, checks) = self.at.remove(&key).expect("due and at hold the same keys");
            out.push((key, checks));
        }
        out
    }

    /// Keys waited for.
    pub fn len(&self) -> usize {
        debug_assert_eq!(self.due.len(), self.at.len());
        self.at.len()
    }

    /// Whether no key is waited for.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// The keys waited for, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &BlockKey> {
        self.at.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::membership::Membership;
    use crate::replication::testkit::{members, node, set_liveness};
    use crate::replication::{Replication, uploader};
    use proptest::prelude::*;

    const NS: NamespaceId = NamespaceId(7);

    fn landed(k: u128) -> Notice {
        Notice {
            ns: NS,
            key: BlockKey(k),
            outcome: Outcome::Landed,
        }
    }

    #[test]
    fn the_other_writable_replicas_hear_of_a_key() {
        let rs = [node(2), node(0), node(1)];
        assert_eq!(recipients(&rs, &node(0), |_| true), vec![node(2), node(1)]);
        assert_eq!(recipients(&rs, &node(0), |n| *n != node(1)), vec![node(2)]);
        assert!(recipients(&[node(0)], &node(0), |_| true).is_empty(), "R = 1: nobody");
    }

    #[test]
    fn one_message_per_peer_split_at_the_key_limit() {
        let ns2 = NamespaceId(8);
        let mut notices: Vec<Notice> = (0..5).map(landed).collect();
        notices.push(Notice {
            ns: ns2,
            key: BlockKey(9),
            outcome: Outcome::GaveUp,
        });
        // Even keys go to n1 and n2, odd ones to n2 only; key 9 to nobody.
        let to = |n: &Notice| match n.key.0 {
            9 => vec![],
            k if k % 2 == 0 => vec![node(2), node(1)],
            _ => vec![node(2)],
        };
        let msgs = route(&notices, to, 100);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[0].0, node(1));
        assert_eq!(msgs[0].1.keys, 3);
        assert_eq!(
            msgs[0].1.namespaces[&NS].landed,
            vec![BlockKey(0), BlockKey(2), BlockKey(4)]
        );
        assert_eq!(msgs[1].0, node(2));
        assert_eq!(msgs[1].1.keys, 5);
        // A gave-up key in another namespace travels in the same message.
        let mut notices2 = notices.clone();
        notices2[5].key = BlockKey(10);
        let msgs = route(&notices2, to, 100);
        let k2 = &msgs.iter().find(|(p, _)| *p == node(2)).unwrap().1.namespaces[&ns2];
        assert_eq!((k2.landed.len(), k2.gave_up.clone()), (0, vec![BlockKey(10)]));
        // At most 2 keys a message: n2's 5 keys in 3 messages, in order.
        let msgs = route(&notices, to, 2);
        let n2: Vec<usize> = msgs
            .iter()
            .filter(|(p, _)| *p == node(2))
            .map(|(_, b)| b.keys)
            .collect();
        assert_eq!(n2, vec![2, 2, 1]);
        let keys: Vec<u128> = msgs
            .iter()
            .filter(|(p, _)| *p == node(2))
            .flat_map(|(_, b)| b.namespaces[&NS].landed.iter().map(|k| k.0))
            .collect();
        assert_eq!(keys, vec![0, 1, 2, 3, 4]);
        assert!(route(&[], to, 2).is_empty());
    }

    #[test]
    fn the_next_writable_replica_takes_over_a_key_its_uploader_gave_up() {
        let rs = [node(0), node(1), node(2)];
        let up = |_: &NodeId| true;
        assert!(takes_over(&rs, &node(0), &node(1), up));
        assert!(!takes_over(&rs, &node(0), &node(2), up));
        assert!(!takes_over(&rs, &node(0), &node(0), up), "not the one that gave up");
        // The next one is down: the one after it.
        let n1_down = |n: &NodeId| *n != node(1);
        assert!(takes_over(&rs, &node(0), &node(2), n1_down));
        // A non-uploader giving up (it never uploads) names the uploader.
        assert!(takes_over(&rs, &node(2), &node(0), up));
        // Nobody else left.
        assert!(!takes_over(&rs[..1], &node(0), &node(1), up));
    }

    #[test]
    fn checks_back_off_doubling_up_to_64_times_the_first_wait() {
        let s = Duration::from_secs(1);
        let got: Vec<u64> = (0..9).map(|c| check_delay(s, c).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(check_delay(s, u32::MAX), 64 * s);
        assert_eq!(check_delay(Duration::MAX, 3), Duration::MAX, "saturates");
    }

    #[test]
    fn waits_fall_due_in_time_order_and_a_confirmation_cancels_one() {
        let t0 = Instant::now();
        let s = Duration::from_secs(10);
        let mut w = Waits::new();
        w.wait(BlockKey(1), t0, s, 0);
        w.wait(BlockKey(2), t0 + Duration::from_secs(1), s, 0);
        w.wait(BlockKey(3), t0, s, 2); // checked twice: due at 40 s
        assert_eq!(w.len(), 3);
        assert_eq!(w.next_due(), Some(t0 + s));
        // Nothing is due before the bound: no check of blob.
        assert!(w.take_due(t0 + Duration::from_secs(9), 10).is_empty());
        // Key 2 is confirmed (the uploader's notice came): never checked.
        assert_eq!(w.remove(&BlockKey(2)), Some(0));
        assert_eq!(w.remove(&BlockKey(2)), None);
        assert_eq!(w.take_due(t0 + Duration::from_secs(30), 10), vec![(BlockKey(1), 0)]);
        assert!(!w.contains(&BlockKey(1)), "taken: checked by the caller");
        // Found absent: wait again, twice as long.
        w.wait(BlockKey(1), t0 + Duration::from_secs(30), s, 1);
        assert_eq!(w.next_due(), Some(t0 + Duration::from_secs(40)));
        let due = w.take_due(t0 + Duration::from_secs(60), 1);
        assert_eq!(due.len(), 1, "at most max");
        assert_eq!(w.len(), 1);
        // Made due now (its uploader went down): taken at once.
        let left = *w.keys().next().unwrap();
        w.due_at(left, t0, 7);
        assert_eq!(w.take_due(t0, 10), vec![(left, 7)]);
        assert!(w.is_empty());
        assert_eq!(w.next_due(), None);
    }

    /// The scheme end to end over a view: the uploader lands each key and
    /// tells the others, which then hold nothing; the uploader going down
    /// hands its keys to the next replica, whose check finds them absent.
    #[test]
    fn every_replica_but_the_uploader_hears_of_each_key() {
        let all = members(0..5);
        let rep = Replication::strong(3);
        let views: Vec<Membership> = (0..5)
            .map(|i| Membership::with_members(node(i), &all, 256, Default::default()).unwrap())
            .collect();
        for k in 0..200u128 {
            let key = BlockKey(k);
            let rs = views[0].table().replicas(&key, 3).unwrap();
            let u = uploader(&key, &views[0], rep).unwrap();
            assert_eq!(u, rs[0]);
            let msgs = route(&[landed(k)], |_| recipients(&rs, &u, |n| views[0].is_writable(n)), 10);
            let heard: Vec<&NodeId> = msgs.iter().map(|(p, _)| p).collect();
            assert_eq!(heard.len(), 2);
            assert!(heard.iter().all(|p| rs.contains(p) && **p != u));
            // Gave up instead: exactly one other replica takes over, the
            // one the uploader filter names with the uploader out.
            let takers: Vec<&NodeId> = rs.iter().filter(|me| takes_over(&rs, &u, me, |_| true)).collect();
            assert_eq!(takers, vec![&rs[1]]);
            let mut v = views[0].clone();
            if u != *v.me() {
                set_liveness(&mut v, &u, 2);
                assert_eq!(uploader(&key, &v, rep).as_ref(), Some(&rs[1]), "key {k}");
            }
        }
    }

    proptest! {
        /// Whatever the notices and the limit, each peer gets exactly the
        /// notices meant for it, in order, in messages within the limit.
        #[test]
        fn routing_loses_and_duplicates_nothing(
            keys in proptest::collection::vec((0u128..50, 0u8..8, any::<bool>()), 0..200),
            max in 1usize..20,
        ) {
            let notices: Vec<Notice> = keys
                .iter()
                .map(|(k, _, gave)| Notice {
                    ns: NS,
                    key: BlockKey(*k),
                    outcome: if *gave { Outcome::GaveUp } else { Outcome::Landed },
                })
                .collect();
            let peers_of = |i: usize| -> Vec<NodeId> {
                (0..3).filter(|p| keys[i].1 & (1 << p) != 0).map(node).collect()
            };
            let mut i = 0;
            let msgs = route(&notices, |_| { i += 1; peers_of(i - 1) }, max);
            for p in 0..3 {
                let want: Vec<(BlockKey, Outcome)> = (0..notices.len())
                    .filter(|&i| peers_of(i).contains(&node(p)))
                    .map(|i| (notices[i].key, notices[i].outcome))
                    .collect();
                let mine: Vec<&Batch> = msgs.iter().filter(|(q, _)| *q == node(p)).map(|(_, b)| b).collect();
                prop_assert_eq!(mine.len(), want.len().div_ceil(max));
                let mut got_landed = Vec::new();
                let mut got_gave = Vec::new();
                for b in &mine {
                    prop_assert!(b.keys <= max && b.keys > 0);
                    let k = &b.namespaces[&NS];
                    prop_assert_eq!(k.landed.len() + k.gave_up.len(), b.keys);
                    got_landed.extend(k.landed.iter().copied());
                    got_gave.extend(k.gave_up.iter().copied());
                }
                let want_landed: Vec<BlockKey> =
                    want.iter().filter(|w| w.1 == Outcome::Landed).map(|w| w.0).collect();
                let want_gave: Vec<BlockKey> =
                    want.iter().filter(|w| w.1 == Outcome::GaveUp).map(|w| w.0).collect();
                prop_assert_eq!(got_landed, want_landed);
                prop_assert_eq!(got_gave, want_gave);
            }
        }
    }
}
