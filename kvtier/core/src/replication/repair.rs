//! Read repair and scrub: which holder a read of one key asks next, which
//! copies are rewritten once a good one is found, what a read that found
//! none says, and how much a scrub verifies per tick.
//!
//! A copy that fails verification is a miss on that copy only (DESIGN.md,
//! "Reads"). A read of a key asks its holders in order (this node's own
//! tiers, the replicas in read order, then blob) and records each answer in
//! a [`CopyRead`]; [`CopyRead::next`] names the holder to ask next, and
//! stops at the first good copy. [`CopyRead::outcome`] then names the copies
//! to rewrite from that good one (those that failed verification), or, when
//! no holder had one, says so precisely ([`NoGoodCopy`]). The driver (the
//! server) does the reads and the rewrites.
//!
//! # Why only corrupt copies are rewritten
//!
//! A holder that answers "missing" may rightly lack the key: a cache evicts,
//! a new replica waits for rebalancing, a replica that missed a write has a
//! hint waiting for it. Pushing a copy on every such read would fight
//! eviction and duplicate the work of hints and resync. A copy that fails
//! verification is different: its holder believed it had the key, so
//! nothing else will ever replace it.
//!
//! # Why blob is never rewritten
//!
//! A blob object is created once (conditional create) by the key's one
//! uploader, and the blob tier refuses one that does not verify (a miss,
//! counted). Replacing it would race that uploader; a corrupt object is
//! left to the operator, and reads go on to the next holder.

use std::fmt;
use std::time::Duration;

use super::placement::NodeId;
use crate::block::BlockKey;
use crate::error::{Error, ErrorKind};

/// Where a copy of a key is read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// This node's own tiers (host, disk).
    Here,
    /// A peer's own tiers.
    Peer(NodeId),
    /// The blob tier.
    Blob,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Here => f.write_str("here"),
            Self::Peer(n) => write!(f, "{n}"),
            Self::Blob => f.write_str("blob"),
        }
    }
}

/// What one holder answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// A copy that verified: served.
    Good,
    /// A copy that failed verification: never served, rewritten once a good
    /// copy is found.
    Corrupt,
    /// No copy.
    Missing,
    /// No answer (unreachable, timed out) or another failure: a good copy
    /// may be there.
    Failed(ErrorKind),
}

impl Answer {
    /// The answer a read that failed with `kind` stands for: a checksum
    /// mismatch is a corrupt copy, a missing thing no copy, anything else
    /// a holder that did not answer.
    pub fn of_error(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::ChecksumMismatch => Self::Corrupt,
            ErrorKind::NotFound => Self::Missing,
            k => Self::Failed(k),
        }
    }
}

/// The read of one key across its holders: where to ask next, and what
/// each holder answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRead {
    key: BlockKey,
    order: Vec<Holder>,
    answers: Vec<(Holder, Answer)>,
}

/// Where a [`CopyRead`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadOutcome {
    /// Holders are left to ask ([`CopyRead::next`]).
    Pending,
    /// `from` had a good copy: serve it, and rewrite the copies of `repair`
    /// from it (holders that failed verification, blob never), in the
    /// order they were asked.
    Served {
        /// The holder whose copy verified.
        from: Holder,
        /// Holders whose copy failed verification.
        repair: Vec<Holder>,
    },
    /// No holder had a copy and none failed verification: a miss, not an
    /// error.
    Miss,
    /// A copy failed verification and no holder had a good one.
    NoGoodCopy(NoGoodCopy),
}

impl CopyRead {
    /// The read of `key`, asking `order` (this node, replicas in read
    /// order, blob) front to back; a holder named twice is asked once.
    pub fn new(key: BlockKey, order: impl IntoIterator<Item = Holder>) -> Self {
        let mut o: Vec<Holder> = Vec::new();
        for h in order {
            if !o.contains(&h) {
                o.push(h);
            }
        }
        Self {
            key,
            order: o,
            answers: Vec::new(),
        }
    }

    /// The key read.
    pub fn key(&self) -> BlockKey {
        self.key
    }

    /// Every answer recorded, in the order recorded.
    pub fn answers(&self) -> &[(Holder, Answer)] {
        &self.answers
    }

    /// What `holder` answered, if it was asked.
    pub fn answer(&self, holder: &Holder) -> Option<Answer> {
        self.answers.iter().find(|(h, _)| h == holder).map(|(_, a)| *a)
    }

    /// The holder to ask next: the first in order without an answer;
    /// `None` once a good copy is in, or every holder answered.
    pub fn next(&self) -> Option<&Holder> {
        if self.good().is_some() {
            return None;
        }
        self.order.iter().find(|h| self.answer(h).is_none())
    }

    /// Records what `holder` answered. A holder's first answer stands: one
    /// that failed verification drops its copy, so asked again it would say
    /// "missing", which must not hide the corrupt copy to rewrite. A holder
    /// outside the order (an answer learned on the side, such as a peer
    /// whose run stopped at this key) counts all the same.
    pub fn record(&mut self, holder: Holder, answer: Answer) {
        if self.answer(&holder).is_none() {
            self.answers.push((holder, answer));
        }
    }

    fn good(&self) -> Option<&Holder> {
        self.answers.iter().find(|(_, a)| *a == Answer::Good).map(|(h, _)| h)
    }

    fn with(&self, want: impl Fn(&Answer) -> bool) -> Vec<Holder> {
        self.answers
            .iter()
            .filter(|(_, a)| want(a))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Whether some holder's copy failed verification.
    pub fn found_corrupt(&self) -> bool {
        self.answers.iter().any(|(_, a)| *a == Answer::Corrupt)
    }

    /// Where the read stands: see [`ReadOutcome`].
    pub fn outcome(&self) -> ReadOutcome {
        if let Some(from) = self.good() {
            let repair = self.with(|a| *a == Answer::Corrupt);
            let repair = repair.into_iter().filter(|h| *h != Holder::Blob).collect();
            return ReadOutcome::Served {
                from: from.clone(),
                repair,
            };
        }
        if self.next().is_some() {
            return ReadOutcome::Pending;
        }
        if !self.found_corrupt() {
            return ReadOutcome::Miss;
        }
        ReadOutcome::NoGoodCopy(NoGoodCopy {
            key: self.key,
            corrupt: self.with(|a| *a == Answer::Corrupt),
            missing: self.with(|a| *a == Answer::Missing),
            failed: self
                .answers
                .iter()
                .filter_map(|(h, a)| match a {
                    Answer::Failed(k) => Some((h.clone(), *k)),
                    _ => None,
                })
                .collect(),
        })
    }
}

/// A read that found a corrupt copy and no good one: which holders said
/// what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoGoodCopy {
    /// The key read.
    pub key: BlockKey,
    /// Holders whose copy failed verification.
    pub corrupt: Vec<Holder>,
    /// Holders without a copy.
    pub missing: Vec<Holder>,
    /// Holders that did not answer, and why.
    pub failed: Vec<(Holder, ErrorKind)>,
}

impl NoGoodCopy {
    /// Holders asked.
    pub fn tried(&self) -> usize {
        self.corrupt.len() + self.missing.len() + self.failed.len()
    }

    /// [`ErrorKind::ChecksumMismatch`] when every holder answered (no good
    /// copy exists anywhere); [`ErrorKind::Unavailable`] when some did not,
    /// since a good copy may be on one of them: a retry may succeed.
    pub fn kind(&self) -> ErrorKind {
        if self.failed.is_empty() {
            ErrorKind::ChecksumMismatch
        } else {
            ErrorKind::Unavailable
        }
    }

    /// The error a read of `what` (a block, a chunk) fails with.
    pub fn to_error(&self, what: &str) -> Error {
        Error::new(self.kind(), format!("{what} {self}"))
    }
}

impl fmt::Display for NoGoodCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |hs: &[Holder]| hs.iter().map(Holder::to_string).collect::<Vec<_>>().join(", ");
        let all = if self.failed.is_empty() {
            "all corrupt or missing"
        } else {
            "some did not answer"
        };
        let tried = self.tried();
        let copies = if tried == 1 { "copy" } else { "copies" };
        write!(
            f,
            "{}: no good copy: {tried} {copies} tried, {all}: {} corrupt ({})",
            self.key,
            self.corrupt.len(),
            list(&self.corrupt)
        )?;
        if !self.missing.is_empty() {
            write!(f, ", {} missing ({})", self.missing.len(), list(&self.missing))?;
        }
        if !self.failed.is_empty() {
            let why: Vec<String> = self.failed.iter().map(|(h, k)| format!("{h}: {k}")).collect();
            write!(f, ", {} unanswered ({})", self.failed.len(), why.join(", "))?;
        }
        Ok(())
    }
}

/// How much a scrub verifies per tick: `bytes_per_s × tick` bytes of
/// blocks, in order. A tick that has budget left always takes the next
/// block, even one larger than the budget; the ticks after pay for the
/// overdraft (they take nothing until it is paid). So over `n` ticks a
/// scrub reads at most `n × budget` bytes plus one block, and a block of
/// any size is verified within `len / budget + 1` ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubPace {
    per_tick: u64,
    debt: u64,
}

impl ScrubPace {
    /// Pacing to `bytes_per_s` (at least 1) in ticks of `tick`.
    pub fn new(bytes_per_s: u64, tick: Duration) -> Self {
        let per_tick = (bytes_per_s as f64 * tick.as_secs_f64()) as u64;
        Self {
            per_tick: per_tick.max(1),
            debt: 0,
        }
    }

    /// Bytes one tick may read.
    pub fn per_tick(&self) -> u64 {
        self.per_tick
    }

    /// How many of the next blocks, of lengths `lens` in scrub order, this
    /// tick verifies.
    pub fn take(&mut self, lens: &[u64]) -> usize {
        if self.debt >= self.per_tick {
            self.debt -= self.per_tick;
            return 0;
        }
        let mut budget = self.per_tick - self.debt;
        self.debt = 0;
        let mut n = 0;
        for &len in lens {
            if len <= budget {
                budget -= len;
                n += 1;
            } else {
                if n == 0 {
                    // Read it now; the next ticks pay for what it took
                    // past this one's budget.
                    self.debt = len - budget;
                    n = 1;
                }
                break;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(s: &str) -> Holder {
        Holder::Peer(NodeId(s.into()))
    }

    fn order() -> Vec<Holder> {
        vec![Holder::Here, peer("b"), peer("c"), Holder::Blob]
    }

    #[test]
    fn after_a_corrupt_copy_the_read_asks_the_next_holder_and_repairs_the_bad_one() {
        let mut r = CopyRead::new(BlockKey(1), order());
        assert_eq!(r.next(), Some(&Holder::Here));
        assert_eq!(r.outcome(), ReadOutcome::Pending);
        r.record(Holder::Here, Answer::Corrupt);
        assert_eq!(r.next(), Some(&peer("b")));
        r.record(peer("b"), Answer::Corrupt);
        assert_eq!(r.next(), Some(&peer("c")));
        r.record(peer("c"), Answer::Good);
        assert_eq!(r.next(), None, "a good copy ends the read");
        assert_eq!(
            r.outcome(),
            ReadOutcome::Served {
                from: peer("c"),
                repair: vec![Holder::Here, peer("b")],
            }
        );
    }

    #[test]
    fn missing_and_unanswered_copies_are_not_rewritten() {
        let mut r = CopyRead::new(BlockKey(1), order());
        r.record(Holder::Here, Answer::Missing);
        r.record(peer("b"), Answer::Failed(ErrorKind::Unavailable));
        r.record(peer("c"), Answer::Good);
        assert_eq!(
            r.outcome(),
            ReadOutcome::Served {
                from: peer("c"),
                repair: vec![]
            }
        );
    }

    #[test]
    fn blob_is_asked_last_and_never_rewritten() {
        let mut r = CopyRead::new(BlockKey(1), order());
        r.record(Holder::Here, Answer::Corrupt);
        r.record(peer("b"), Answer::Missing);
        r.record(peer("c"), Answer::Corrupt);
        assert_eq!(r.next(), Some(&Holder::Blob));
        r.record(Holder::Blob, Answer::Good);
        assert_eq!(
            r.outcome(),
            ReadOutcome::Served {
                from: Holder::Blob,
                repair: vec![Holder::Here, peer("c")]
            }
        );
        // A corrupt blob object is skipped, not rewritten.
        let mut r = CopyRead::new(BlockKey(1), [Holder::Blob, peer("b")]);
        r.record(Holder::Blob, Answer::Corrupt);
        r.record(peer("b"), Answer::Good);
        assert_eq!(
            r.outcome(),
            ReadOutcome::Served {
                from: peer("b"),
                repair: vec![]
            }
        );
    }

    #[test]
    fn a_first_answer_stands_and_side_answers_count() {
        let mut r = CopyRead::new(BlockKey(1), [peer("b"), peer("c")]);
        // b's run stopped at this key on a corrupt copy: known before asking.
        r.record(peer("b"), Answer::Corrupt);
        assert_eq!(r.next(), Some(&peer("c")), "b is not asked again");
        r.record(peer("b"), Answer::Missing);
        assert_eq!(r.answer(&peer("b")), Some(Answer::Corrupt));
        // A holder outside the order.
        r.record(Holder::Here, Answer::Corrupt);
        r.record(peer("c"), Answer::Good);
        let ReadOutcome::Served { repair, .. } = r.outcome() else {
            panic!("served")
        };
        assert_eq!(repair, vec![peer("b"), Holder::Here]);
    }

    #[test]
    fn no_copy_anywhere_is_a_miss_not_an_error() {
        let mut r = CopyRead::new(BlockKey(1), order());
        for h in order() {
            r.record(h, Answer::Missing);
        }
        assert_eq!(r.outcome(), ReadOutcome::Miss);
        let mut r = CopyRead::new(BlockKey(1), [Holder::Here, peer("b")]);
        r.record(Holder::Here, Answer::Missing);
        r.record(peer("b"), Answer::Failed(ErrorKind::Unavailable));
        assert_eq!(r.outcome(), ReadOutcome::Miss, "as before read repair");
        assert_eq!(CopyRead::new(BlockKey(1), []).outcome(), ReadOutcome::Miss);
    }

    #[test]
    fn all_corrupt_says_so_precisely() {
        let mut r = CopyRead::new(BlockKey(0xab), order());
        r.record(Holder::Here, Answer::Corrupt);
        r.record(peer("b"), Answer::Corrupt);
        r.record(peer("c"), Answer::Corrupt);
        r.record(Holder::Blob, Answer::Missing);
        let ReadOutcome::NoGoodCopy(e) = r.outcome() else {
            panic!("{:?}", r.outcome())
        };
        assert_eq!(e.tried(), 4);
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);
        let err = e.to_error("chunk");
        assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
        assert_eq!(
            err.to_string(),
            format!(
                "checksum mismatch: chunk {}: no good copy: 4 copies tried, all corrupt or missing: 3 corrupt (here, b, c), 1 missing (blob)",
                BlockKey(0xab)
            )
        );
    }

    #[test]
    fn no_good_copy_with_a_holder_unanswered_is_retryable() {
        let mut r = CopyRead::new(BlockKey(2), [Holder::Here, peer("b"), peer("c")]);
        r.record(Holder::Here, Answer::Corrupt);
        r.record(peer("b"), Answer::Failed(ErrorKind::Unavailable));
        r.record(peer("c"), Answer::Missing);
        let ReadOutcome::NoGoodCopy(e) = r.outcome() else {
            panic!("{:?}", r.outcome())
        };
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.kind().is_retryable());
        let s = e.to_string();
        assert!(s.contains("3 copies tried, some did not answer"), "{s}");
        assert!(s.contains("1 unanswered (b: unavailable)"), "{s}");
    }

    #[test]
    fn one_corrupt_copy_and_nowhere_else_to_ask() {
        let mut r = CopyRead::new(BlockKey(3), [Holder::Here]);
        r.record(Holder::Here, Answer::Corrupt);
        assert_eq!(r.next(), None);
        let ReadOutcome::NoGoodCopy(e) = r.outcome() else {
            panic!("{:?}", r.outcome())
        };
        assert!(
            e.to_string()
                .ends_with("no good copy: 1 copy tried, all corrupt or missing: 1 corrupt (here)"),
            "{e}"
        );
        assert_eq!(r.answers(), &[(Holder::Here, Answer::Corrupt)]);
    }

    #[test]
    fn errors_map_to_answers() {
        assert_eq!(Answer::of_error(ErrorKind::ChecksumMismatch), Answer::Corrupt);
        assert_eq!(Answer::of_error(ErrorKind::NotFound), Answer::Missing);
        assert_eq!(
            Answer::of_error(ErrorKind::Unavailable),
            Answer::Failed(ErrorKind::Unavailable)
        );
        assert_eq!(Answer::of_error(ErrorKind::Io), Answer::Failed(ErrorKind::Io));
    }

    #[test]
    fn a_holder_named_twice_is_asked_once() {
        let r = CopyRead::new(BlockKey(1), [peer("b"), peer("b"), Holder::Blob]);
        let mut r2 = r.clone();
        r2.record(peer("b"), Answer::Missing);
        assert_eq!(r2.next(), Some(&Holder::Blob));
        assert_eq!(r.key(), BlockKey(1));
    }

    #[test]
    fn scrub_pace_takes_a_ticks_budget() {
        let mut p = ScrubPace::new(10_000, Duration::from_millis(100));
        assert_eq!(p.per_tick(), 1000);
        assert_eq!(p.take(&[400, 400, 400]), 2);
        assert_eq!(p.take(&[]), 0);
        // A block above the budget goes alone; the next ticks pay for it.
        assert_eq!(p.take(&[2500, 10]), 1);
        assert_eq!(p.take(&[10]), 0, "1500 owed");
        assert_eq!(p.take(&[10]), 1, "500 owed: 500 left");
        assert_eq!(ScrubPace::new(0, Duration::from_millis(1)).per_tick(), 1);
    }

    proptest! {
        /// Over any run of ticks the scrub reads at most the ticks' budget
        /// plus one block, and it always makes progress.
        #[test]
        fn scrub_pace_is_bounded_and_makes_progress(
            rate in 1u64..100_000,
            lens in prop::collection::vec(1u64..50_000, 1..200),
        ) {
            let mut p = ScrubPace::new(rate, Duration::from_millis(100));
            let budget = p.per_tick();
            let max = *lens.iter().max().unwrap();
            let (mut at, mut read, mut ticks) = (0usize, 0u64, 0u64);
            let mut idle = 0u64;
            while at < lens.len() {
                let n = p.take(&lens[at..]);
                ticks += 1;
                read += lens[at..at + n].iter().sum::<u64>();
                at += n;
                prop_assert!(read <= ticks * budget + max, "read {} in {} ticks of {}", read, ticks, budget);
                idle = if n == 0 { idle + 1 } else { 0 };
                prop_assert!(idle <= max / budget + 1, "stalled {} ticks", idle);
            }
        }
    }
}
