//! Tier events: what entered and left each tier, per namespace, in order.
//!
//! An engine that tells a router where its KV lives (NVIDIA Dynamo's
//! KV-aware router learns it from `BlockStored` / `BlockRemoved` events)
//! needs to hear when kvtier stores a block in a tier and when a tier
//! evicts or loses it. The tiers record each change here, under their own
//! lock, so a key's events are in the order its states were.
//!
//! - **Per namespace, bounded.** Each namespace someone reads has a ring
//!   of at most `capacity` events; older ones are dropped. A namespace
//!   nobody reads costs nothing: its ring is made by the first read.
//! - **Sequence numbers and an epoch.** Events are numbered from 1 within
//!   a namespace's ring; the log's epoch is drawn at random when it is
//!   made (a process start). A reader passes the epoch and the last
//!   sequence number it saw and gets what followed.
//! - **Resync, never a silent gap.** A reader that fell behind the ring,
//!   comes from another epoch (the daemon restarted) or reads for the first
//!   time gets [`EventPage::resync`] with the current cursor and no events:
//!   it must re-read the state of the keys it cares about
//!   ([`crate::BlockManager::locate`]) and go on from that cursor. Events
//!   after the cursor may repeat what the re-read saw; applied in order
//!   they converge on the tiers' state.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};

use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, Result};
use crate::tier::TierKind;

/// Events kept per namespace by default.
pub const DEFAULT_CAPACITY: usize = 1 << 16;
/// The most events one read returns.
pub const MAX_READ: usize = 1 << 16;

/// What happened to a block in a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Change {
    /// The tier holds the block now.
    Stored,
    /// The tier no longer holds it (evicted, deleted, or dropped as corrupt).
    Removed,
}

impl Change {
    /// "stored" or "removed".
    pub const fn name(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Removed => "removed",
        }
    }
}

/// The tiers holding a block (see [`crate::BlockManager::locate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TierSet(u8);

impl TierSet {
    const ALL: [TierKind; 3] = [TierKind::Host, TierKind::Disk, TierKind::Blob];

    fn bit(t: TierKind) -> u8 {
        match t {
            TierKind::Host => 1,
            TierKind::Disk => 2,
            TierKind::Blob => 4,
        }
    }

    pub fn insert(&mut self, t: TierKind) {
        self.0 |= Self::bit(t);
    }

    pub fn contains(self, t: TierKind) -> bool {
        self.0 & Self::bit(t) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The tiers in order: host, disk, blob.
    pub fn iter(self) -> impl Iterator<Item = TierKind> {
        Self::ALL.into_iter().filter(move |t| self.contains(*t))
    }
}

impl FromIterator<TierKind> for TierSet {
    fn from_iter<I: IntoIterator<Item = TierKind>>(iter: I) -> Self {
        let mut s = Self::default();
        for t in iter {
            s.insert(t);
        }
        s
    }
}

/// One change of one block in one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierEvent {
    /// Its number within the namespace, from 1.
    pub seq: u64,
    pub change: Change,
    pub tier: TierKind,
    pub key: BlockKey,
}

/// The answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// The log's epoch: a reader passes it back.
    pub epoch: u64,
    /// The sequence number of the last event in `events`, or the reader's
    /// own cursor when there are none: what the next read passes as `after`.
    /// After a resync: the current end of the ring.
    pub cursor: u64,
    /// True when events were missed (or the reader is new): re-read the
    /// state of the keys of interest, then go on from `cursor`.
    pub resync: bool,
    pub events: Vec<TierEvent>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Sequence number of `events[0]`; the last one is `first + len - 1`.
    first: u64,
    events: VecDeque<(Change, TierKind, BlockKey)>,
}

impl Ring {
    fn last(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }
}

/// Every namespace's ring. See the module docs.
#[derive(Debug)]
pub struct EventLog {
    epoch: u64,
    capacity: usize,
    rings: Mutex<HashMap<NamespaceId, Ring>>,
}

impl EventLog {
    /// A log keeping `capacity` events per namespace, with a fresh epoch.
    pub fn new(capacity: usize) -> Self {
        Self {
            epoch: fresh_epoch(),
            capacity: capacity.max(1),
            rings: Mutex::new(HashMap::new()),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records a change of `keys` in `tier`, if anyone reads `ns`. Tiers
    /// call it under their own lock, so a key's events keep their order.
    pub fn record(&self, ns: NamespaceId, change: Change, tier: TierKind, keys: &[BlockKey]) {
        if keys.is_empty() {
            return;
        }
        let mut rings = self.rings.lock();
        let Some(ring) = rings.get_mut(&ns) else {
            return;
        };
        for &key in keys {
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
                ring.first += 1;
            }
            ring.events.push_back((change, tier, key));
        }
    }

    /// The events of `ns` after sequence number `after`, at most `max`
    /// (1..=[`MAX_READ`]). `epoch` is the one of the reader's last page (0
    /// on a first read). See [`EventPage`].
    pub fn read(&self, ns: NamespaceId, epoch: u64, after: u64, max: usize) -> Result<EventPage> {
        if max == 0 || max > MAX_READ {
            return Err(Error::invalid(format!(
                "an event read takes 1 to {MAX_READ} events, asked for {max}"
            )));
        }
        let mut rings = self.rings.lock();
        let ring = rings.entry(ns).or_insert(Ring {
            first: 1,
            events: VecDeque::new(),
        });
        let last = ring.last();
        let resync = |cursor| EventPage {
            epoch: self.epoch,
            cursor,
            resync: true,
            events: Vec::new(),
        };
        if epoch != self.epoch {
            return Ok(resync(last));
        }
        if after > last {
            return Err(Error::invalid(format!(
                "event cursor {after} is past the last event {last} of namespace {ns}"
            )));
        }
        if after + 1 < ring.first {
            return Ok(resync(last));
        }
        let skip = (after + 1 - ring.first) as usize;
        let events: Vec<TierEvent> = ring
            .events
            .iter()
            .skip(skip)
            .take(max)
            .enumerate()
            .map(|(i, &(change, tier, key))| TierEvent {
                seq: after + 1 + i as u64,
                change,
                tier,
                key,
            })
            .collect();
        Ok(EventPage {
            epoch: self.epoch,
            cursor: after + events.len() as u64,
            resync: false,
            events,
        })
    }

    /// Namespaces with a ring, and the events each holds: for stats.
    pub fn rings(&self) -> Vec<(NamespaceId, usize)> {
        self.rings.lock().iter().map(|(ns, r)| (*ns, r.events.len())).collect()
    }
}

/// Differs between logs and between process starts (never 0, which a
/// reader passes on its first read): the clock, the process and a counter.
fn fresh_epoch() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static MADE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut seed = [0u8; 24];
    seed[..8].copy_from_slice(&nanos.to_le_bytes());
    seed[8..16].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    seed[16..].copy_from_slice(&MADE.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&seed).max(1)
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: NamespaceId = NamespaceId(7);

    fn keys(r: std::ops::Range<u128>) -> Vec<BlockKey> {
        r.map(BlockKey).collect()
    }

    #[test]
    fn nothing_is_kept_for_a_namespace_nobody_reads() {
        let log = EventLog::new(4);
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..100));
        assert!(log.rings().is_empty());
    }

    #[test]
    fn a_first_read_resyncs_then_events_follow_in_order() {
        let log = EventLog::new(8);
        let p = log.read(NS, 0, 0, 10).unwrap();
        assert!(p.resync);
        assert_eq!((p.epoch, p.cursor), (log.epoch(), 0));
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..3));
        log.record(NS, Change::Removed, TierKind::Host, &keys(1..2));
        let p = log.read(NS, p.epoch, p.cursor, 10).unwrap();
        assert!(!p.resync);
        let got: Vec<_> = p.events.iter().map(|e| (e.seq, e.change, e.key.0)).collect();
        assert_eq!(
            got,
            [
                (1, Change::Stored, 0),
                (2, Change::Stored, 1),
                (3, Change::Stored, 2),
                (4, Change::Removed, 1)
            ]
        );
        assert_eq!(p.cursor, 4);
        // Nothing new: the same cursor back, no resync.
        let q = log.read(NS, p.epoch, p.cursor, 10).unwrap();
        assert!(!q.resync && q.events.is_empty() && q.cursor == 4);
    }

    #[test]
    fn reads_page_by_max() {
        let log = EventLog::new(64);
        let p = log.read(NS, 0, 0, 1).unwrap();
        log.record(NS, Change::Stored, TierKind::Disk, &keys(0..10));
        let a = log.read(NS, p.epoch, p.cursor, 4).unwrap();
        assert_eq!(a.events.len(), 4);
        assert_eq!(a.cursor, 4);
        let b = log.read(NS, a.epoch, a.cursor, 100).unwrap();
        assert_eq!(b.events.first().unwrap().seq, 5);
        assert_eq!(b.cursor, 10);
    }

    #[test]
    fn a_reader_that_falls_behind_the_ring_is_told_to_resync() {
        let log = EventLog::new(4);
        let p = log.read(NS, 0, 0, 1).unwrap();
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..10));
        assert_eq!(log.rings(), [(NS, 4)], "the ring stays bounded");
        let q = log.read(NS, p.epoch, p.cursor, 100).unwrap();
        assert!(q.resync);
        assert!(q.events.is_empty());
        assert_eq!(q.cursor, 10);
        // From the new cursor it reads on.
        log.record(NS, Change::Removed, TierKind::Host, &keys(9..10));
        let r = log.read(NS, q.epoch, q.cursor, 100).unwrap();
        assert!(!r.resync);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].seq, 11);
        // Exactly at the edge of the ring is no gap.
        let s = log.read(NS, q.epoch, 7, 100).unwrap();
        assert!(!s.resync, "events 8..=11 are all still held");
        assert_eq!(s.events.first().unwrap().seq, 8);
    }

    #[test]
    fn another_epoch_resyncs() {
        let log = EventLog::new(4);
        let p = log.read(NS, 0, 0, 1).unwrap();
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..2));
        let q = log.read(NS, p.epoch.wrapping_add(1), 1, 10).unwrap();
        assert!(q.resync);
        assert_eq!((q.epoch, q.cursor), (log.epoch(), 2));
    }

    #[test]
    fn bad_reads_are_refused_and_change_nothing() {
        let log = EventLog::new(4);
        let p = log.read(NS, 0, 0, 1).unwrap();
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..2));
        let e = log.read(NS, p.epoch, 3, 10).unwrap_err();
        assert!(e.to_string().contains("event cursor 3 is past the last event 2"), "{e}");
        let e = log.read(NS, p.epoch, 0, 0).unwrap_err();
        assert!(e.to_string().contains("1 to 65536 events, asked for 0"), "{e}");
        assert!(log.read(NS, p.epoch, 0, MAX_READ + 1).is_err());
        let q = log.read(NS, p.epoch, 0, 10).unwrap();
        assert_eq!(q.events.len(), 2);
    }

    #[test]
    fn namespaces_are_separate() {
        let log = EventLog::new(8);
        let other = NamespaceId(8);
        let p = log.read(NS, 0, 0, 1).unwrap();
        let o = log.read(other, 0, 0, 1).unwrap();
        log.record(NS, Change::Stored, TierKind::Host, &keys(0..2));
        log.record(other, Change::Stored, TierKind::Disk, &keys(5..6));
        assert_eq!(log.read(NS, p.epoch, 0, 10).unwrap().events.len(), 2);
        let o = log.read(other, o.epoch, 0, 10).unwrap();
        assert_eq!(o.events.len(), 1);
        assert_eq!(o.events[0].key, BlockKey(5));
        assert_eq!(o.events[0].tier, TierKind::Disk);
    }
}
