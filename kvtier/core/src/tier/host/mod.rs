//! The host tier (G2): a byte-budgeted pool of CPU memory.
//!
//! One arena is mapped, touched and (with a CUDA driver) pinned at startup;
//! blocks take extents of it and give them back, so no block ever allocates.
//! A put reserves an extent, copies into it outside the lock and publishes
//! it after the copy, so readers never see a partial block. The same steps
//! are open to callers that fill a block in place ([`HostTier::reserve`],
//! [`HostSlot`]): a block copied straight from an engine's KV tensors into
//! the pool takes one copy, not two. When the pool is full the
//! eviction policy picks unpinned victims; a [`Demoter`] (the block manager's
//! cascade to disk) sees each victim's bytes before its extent is reused.

mod arena;
mod extent;

pub use arena::Backing;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use self::arena::Arena;
use self::extent::Extents;
use super::{Pin, PinnedBlock, Stored, Tier, TierCounters, TierKind, Usage};
use crate::block::{BlockKey, KeyMap, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Change, EventLog};
use crate::eviction::{EvictionKind, EvictionPolicy};

/// Configuration of the host tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Bytes of CPU memory the pool holds, mapped and touched at startup.
    pub capacity_bytes: u64,
    /// Which blocks go first when the pool is full.
    #[serde(default)]
    pub eviction: EvictionKind,
    /// Pin the pool through the CUDA driver when one is present.
    #[serde(default = "yes")]
    pub pin_memory: bool,
}

fn yes() -> bool {
    true
}

impl HostConfig {
    /// A pool of `capacity_bytes` with LRU eviction.
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            eviction: EvictionKind::Lru,
            pin_memory: true,
        }
    }

    /// Maps the pool and returns the running tier.
    pub fn build(&self, demoter: Option<Demoter>) -> Result<HostTier> {
        HostTier::open(self, demoter)
    }
}

/// Called with each victim's bytes before its memory is reused; it runs on
/// the evicting thread, outside the tier's lock, with the victim pinned.
pub type Demoter = Arc<dyn Fn(NamespaceId, BlockKey, &[u8]) + Send + Sync>;

/// The host tier. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct HostTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HostTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTier").field("usage", &self.usage()).finish()
    }
}

struct Inner {
    arena: Arena,
    capacity_bytes: u64,
    state: Mutex<State>,
    counters: TierCounters,
    demoter: Option<Demoter>,
    events: OnceLock<Arc<EventLog>>,
}

struct State {
    map: KeyMap<Entry>,
    /// Extents of removed or evicted blocks still pinned: offset → (len, pins).
    orphans: HashMap<u64, (u64, u32)>,
    extents: Extents,
    policy: Box<dyn EvictionPolicy>,
    ready_blocks: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    ns: NamespaceId,
    off: u64,
    len: u64,
    pins: u32,
    ready: bool,
    /// When the copy was stored or last put again (Unix ms).
    written_ms: u64,
}

impl HostTier {
    /// Maps and touches the pool.
    pub fn open(cfg: &HostConfig, demoter: Option<Demoter>) -> Result<Self> {
        if cfg.capacity_bytes == 0 {
            return Err(Error::config("host.capacity_bytes must be > 0"));
        }
        let arena = Arena::new(cfg.capacity_bytes as usize, cfg.pin_memory)?;
        let capacity_bytes = cfg.capacity_bytes;
        Ok(Self {
            inner: Arc::new(Inner {
                arena,
                capacity_bytes,
                state: Mutex::new(State {
                    map: KeyMap::default(),
                    orphans: HashMap::new(),
                    extents: Extents::new(capacity_bytes),
                    policy: cfg.eviction.build(),
                    ready_blocks: 0,
                }),
                counters: TierCounters::default(),
                demoter,
                events: OnceLock::new(),
            }),
        })
    }

    /// From now on every block published or dropped is recorded in `log`
    /// (see [`crate::events`]). Set once.
    pub fn set_events(&self, log: Arc<EventLog>) -> Result<()> {
        self.inner
            .events
            .set(log)
            .map_err(|_| Error::config("the host tier's event log is already set"))
    }

    /// How the pool's memory is backed.
    pub fn backing(&self) -> Backing {
        self.inner.arena.backing()
    }

    /// Every key held for namespace `ns` (a snapshot).
    pub fn keys(&self, ns: NamespaceId) -> Vec<BlockKey> {
        let st = self.inner.state.lock();
        st.map
            .iter()
            .filter(|(_, e)| e.ns == ns && e.ready)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Pins `key`, with direct access to its bytes.
    pub fn pin_host(&self, key: &BlockKey) -> Option<HostPin> {
        let mut st = self.inner.state.lock();
        let e = st.map.get_mut(key).filter(|e| e.ready)?;
        e.pins += 1;
        let e = *e;
        st.policy.touch(key);
        Some(HostPin {
            inner: self.inner.clone(),
            key: *key,
            ns: e.ns,
            off: e.off,
            len: e.len,
        })
    }

    /// Reserves room for a new block of `len` bytes under `key`, evicting
    /// as a put does; `Ok(None)` when the key is present or being written
    /// (keys name their content: nothing to write).
    ///
    /// The block is invisible (to `contains`, `pin`, `remove`, `keys` and
    /// eviction) until [`HostSlot::commit`]; a slot dropped uncommitted
    /// frees its extent and leaves no trace. [`ErrorKind::NoSpace`] when
    /// every block is pinned or reserved; a block larger than the pool is
    /// invalid.
    pub fn reserve(&self, ns: NamespaceId, key: BlockKey, len: usize) -> Result<Option<HostSlot>> {
        let len = len as u64;
        if len == 0 || extent::footprint(len) > self.inner.capacity_bytes {
            return Err(Error::invalid(format!(
                "host tier: a block of {len} bytes does not fit a pool of {} bytes",
                self.inner.capacity_bytes
            )));
        }
        let mut st = self.inner.state.lock();
        if let Some(e) = st.map.get_mut(&key) {
            if e.ready {
                // This put is acknowledged by the copy held: it counts as
                // written now (see `Tier::remove_written_before`).
                e.written_ms = super::now_ms();
                st.policy.touch(&key);
            }
            return Ok(None);
        }
        Ok(self.allocate(st, key, ns, len)?.map(|off| HostSlot {
            inner: self.inner.clone(),
            key,
            off,
            len,
            committed: false,
        }))
    }

    /// Frees room for `len` bytes by evicting; the lock is released around
    /// each demotion. Returns the allocated offset, or `None` if another
    /// writer took `key` while the lock was released.
    fn allocate<'a>(
        &'a self,
        mut st: parking_lot::MutexGuard<'a, State>,
        key: BlockKey,
        ns: NamespaceId,
        len: u64,
    ) -> Result<Option<u64>> {
        loop {
            if st.map.contains_key(&key) {
                return Ok(None);
            }
            if let Some(off) = st.extents.alloc(len) {
                st.map.insert(
                    key,
                    Entry {
                        ns,
                        off,
                        len,
                        pins: 0,
                        ready: false,
                        written_ms: 0,
                    },
                );
                return Ok(Some(off));
            }
            let State { map, policy, .. } = &mut *st;
            let Some(victim) = policy.victim(&|k| map.get(k).is_some_and(|e| e.pins > 0)) else {
                TierCounters::add(&self.inner.counters.rejected, 1);
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "host tier: no room for {len} bytes; {} blocks held, all pinned",
                        st.map.len()
                    ),
                ));
            };
            st.policy.remove(&victim);
            let e = *st.map.get(&victim).expect("policy keys are in the map");
            if let Some(demote) = &self.inner.demoter {
                // Keep the victim readable while the demoter copies it out.
                st.map.get_mut(&victim).expect("present").pins += 1;
                drop(st);
                // SAFETY: the extent is pinned (pins > 0), so it is neither
                // freed nor rewritten until the unpin below.
                let bytes = unsafe { self.inner.slice(e.off, e.len) };
                demote(e.ns, victim, bytes);
                st = self.inner.state.lock();
                self.inner.unpin_locked(&mut st, &victim, e.off);
            }
            if st.map.get(&victim).is_some_and(|x| x.off == e.off) {
                self.inner.drop_entry(&mut st, &victim);
                TierCounters::add(&self.inner.counters.evictions, 1);
            }
        }
    }
}

impl Inner {
    /// # Safety
    /// The extent must be allocated and pinned or being written by the caller.
    unsafe fn slice(&self, off: u64, len: u64) -> &[u8] {
        debug_assert!(off + len <= self.arena.len() as u64);
        // SAFETY: in bounds of the arena (allocator invariant); the caller
        // guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.arena.base().add(off as usize), len as usize) }
    }

    /// # Safety
    /// The extent must be allocated to a reservation the caller holds
    /// uniquely (not ready, so nobody else reads or writes it).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, off: u64, len: u64) -> &mut [u8] {
        debug_assert!(off + len <= self.arena.len() as u64);
        // SAFETY: in bounds of the arena (allocator invariant); the caller
        // guarantees the extent is its own.
        unsafe { std::slice::from_raw_parts_mut(self.arena.base().add(off as usize), len as usize) }
    }

    /// Removes a ready entry; its extent is freed now or at its last unpin.
    fn drop_entry(&self, st: &mut State, key: &BlockKey) {
        let e = st.map.remove(key).expect("caller checked presence");
        debug_assert!(e.ready);
        if let Some(log) = self.events.get() {
            log.record(e.ns, Change::Removed, TierKind::Host, &[*key]);
        }
        st.policy.remove(key);
        st.ready_blocks -= 1;
        if e.pins == 0 {
            st.extents.free(e.off, e.len);
        } else {
            st.orphans.insert(e.off, (e.len, e.pins));
        }
    }

    fn unpin_locked(&self, st: &mut State, key: &BlockKey, off: u64) {
        if let Some(e) = st.map.get_mut(key).filter(|e| e.off == off) {
            assert!(e.pins > 0, "unpin of an unpinned block");
            e.pins -= 1;
            return;
        }
        let (len, pins) = st
            .orphans
            .get_mut(&off)
            .expect("a pinned extent is in the map or orphaned");
        assert!(*pins > 0, "unpin of an unpinned orphan");
        *pins -= 1;
        if *pins == 0 {
            let len = *len;
            st.orphans.remove(&off);
            st.extents.free(off, len);
        }
    }
}

impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.inner.state.lock().map.get(key).is_some_and(|e| e.ready)
    }

    fn put(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<Stored> {
        let Some(mut slot) = self.reserve(ns, key, data.len())? else {
            return Ok(Stored::Present);
        };
        slot.as_mut_slice().copy_from_slice(data);
        slot.commit();
        Ok(Stored::Inserted)
    }

    fn pin(&self, key: &BlockKey) -> Option<Pin> {
        self.pin_host(key).map(|p| Box::new(p) as Pin)
    }

    fn remove(&self, key: &BlockKey) -> Result<bool> {
        let mut st = self.inner.state.lock();
        // A block still being written is not present yet.
        if !st.map.get(key).is_some_and(|e| e.ready) {
            return Ok(false);
        }
        self.inner.drop_entry(&mut st, key);
        Ok(true)
    }

    fn remove_written_before(&self, key: &BlockKey, before_ms: u64) -> Result<bool> {
        let mut st = self.inner.state.lock();
        if !st.map.get(key).is_some_and(|e| e.ready && e.written_ms < before_ms) {
            return Ok(false);
        }
        self.inner.drop_entry(&mut st, key);
        Ok(true)
    }

    fn usage(&self) -> Usage {
        let st = self.inner.state.lock();
        Usage {
            used_bytes: st.extents.used_bytes(),
            capacity_bytes: self.inner.capacity_bytes,
            blocks: st.ready_blocks,
        }
    }

    fn counters(&self) -> &TierCounters {
        &self.inner.counters
    }
}

/// Room for one new block in the pool, reserved by [`HostTier::reserve`]:
/// fill it in place, then [`HostSlot::commit`] it. Nobody else reads or
/// writes it meanwhile; dropped uncommitted, it frees its extent.
pub struct HostSlot {
    inner: Arc<Inner>,
    key: BlockKey,
    off: u64,
    len: u64,
    committed: bool,
}

impl std::fmt::Debug for HostSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSlot")
            .field("key", &self.key)
            .field("len", &self.len)
            .finish()
    }
}

impl HostSlot {
    /// The key the block will have.
    pub fn key(&self) -> BlockKey {
        self.key
    }

    /// The block's bytes, to fill (page-aligned when the block is at least
    /// a page). They start unspecified: the caller writes all of them.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the extent is allocated to this slot's entry, which is
        // not ready: no reader can pin it and no other writer holds it, and
        // `&mut self` makes this borrow the only one.
        unsafe { self.inner.slice_mut(self.off, self.len) }
    }

    /// Publishes the block: from now on lookups, pins and eviction see it,
    /// exactly as after a put.
    pub fn commit(mut self) {
        let mut st = self.inner.state.lock();
        let e = st.map.get_mut(&self.key).expect("a reserved entry is never removed");
        assert_eq!(e.off, self.off, "a reserved entry moved");
        assert!(!e.ready, "a reserved entry was published twice");
        e.ready = true;
        e.written_ms = super::now_ms();
        let ns = e.ns;
        if let Some(log) = self.inner.events.get() {
            log.record(ns, Change::Stored, TierKind::Host, &[self.key]);
        }
        st.policy.insert(self.key);
        st.ready_blocks += 1;
        assert!(
            st.extents.used_bytes() <= self.inner.capacity_bytes,
            "host used bytes exceed capacity"
        );
        drop(st);
        TierCounters::add(&self.inner.counters.bytes_written, self.len);
        self.committed = true;
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut st = self.inner.state.lock();
        let e = st.map.remove(&self.key).expect("a reserved entry is never removed");
        assert!(!e.ready, "a dropped reservation was published");
        assert_eq!(e.off, self.off, "a reserved entry moved");
        st.extents.free(e.off, e.len);
    }
}

/// A pinned host block: its bytes stay put until this is dropped.
pub struct HostPin {
    inner: Arc<Inner>,
    key: BlockKey,
    ns: NamespaceId,
    off: u64,
    len: u64,
}

impl std::fmt::Debug for HostPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPin")
            .field("key", &self.key)
            .field("len", &self.len)
            .finish()
    }
}

impl HostPin {
    /// The pinned bytes, page-aligned when the block is at least a page.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: pinned for the life of self: not freed, not rewritten.
        unsafe { self.inner.slice(self.off, self.len) }
    }
}

impl PinnedBlock for HostPin {
    fn namespace(&self) -> NamespaceId {
        self.ns
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn read_unverified(&self, out: &mut [u8]) -> Result<()> {
        if out.len() as u64 != self.len {
            return Err(Error::invalid(format!(
                "block {} is {} bytes, the buffer {}",
                self.key,
                self.len,
                out.len()
            )));
        }
        out.copy_from_slice(self.as_slice());
        TierCounters::add(&self.inner.counters.bytes_read, self.len);
        Ok(())
    }

    fn in_memory(&self) -> Option<&[u8]> {
        TierCounters::add(&self.inner.counters.bytes_read, self.len);
        Some(self.as_slice())
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        self.inner.unpin_locked(&mut st, &self.key, self.off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::TierExt;
    use crate::tier::conformance::{self, content};

    fn tier(blocks: u64, block: u64) -> HostTier {
        HostConfig::with_capacity(blocks * block.next_multiple_of(64))
            .build(None)
            .unwrap()
    }

    #[test]
    fn conformance_page_blocks() {
        conformance::run(|| tier(conformance::MIN_BLOCKS as u64, 64 * 1024), 64 * 1024);
    }

    #[test]
    fn conformance_small_blocks() {
        conformance::run(|| tier(conformance::MIN_BLOCKS as u64, 1000), 1000);
    }

    #[test]
    fn all_pinned_is_no_space_and_changes_nothing() {
        let t = tier(2, 4096);
        let ns = NamespaceId(1);
        t.put(ns, BlockKey(1), &content(BlockKey(1), 4096)).unwrap();
        t.put(ns, BlockKey(2), &content(BlockKey(2), 4096)).unwrap();
        let p1 = t.pin(&BlockKey(1)).unwrap();
        let p2 = t.pin(&BlockKey(2)).unwrap();
        let e = t.put(ns, BlockKey(3), &content(BlockKey(3), 4096)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        assert!(!t.contains(&BlockKey(3)));
        let mut out = vec![0; 4096];
        p1.read_into(&mut out).unwrap();
        assert!(out == content(BlockKey(1), 4096));
        drop((p1, p2));
        // Unpinned, the LRU block goes.
        t.put(ns, BlockKey(3), &content(BlockKey(3), 4096)).unwrap();
        assert!(!t.contains(&BlockKey(1)));
        assert!(t.contains(&BlockKey(2)));
    }

    #[test]
    fn demoter_sees_victims_intact() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let demote: Demoter = Arc::new(move |_ns, k, b| {
            assert!(b == content(k, b.len()).as_slice(), "victim bytes altered");
            s.lock().push(k);
        });
        let t = HostConfig::with_capacity(3 * 8192).build(Some(demote)).unwrap();
        for i in 1..=5 {
            t.put(NamespaceId(1), BlockKey(i), &content(BlockKey(i), 8192)).unwrap();
        }
        assert_eq!(*seen.lock(), vec![BlockKey(1), BlockKey(2)]);
        let mut out = vec![0; 8192];
        assert_eq!(t.get(&BlockKey(5), &mut out).unwrap(), crate::tier::Fetched::Hit);
    }

    #[test]
    fn a_reserved_block_is_invisible_until_committed_and_freed_when_dropped() {
        let t = tier(2, 4096);
        let ns = NamespaceId(1);
        let (k1, k2, k3) = (BlockKey(1), BlockKey(2), BlockKey(3));
        let mut slot = t.reserve(ns, k1, 4096).unwrap().unwrap();
        slot.as_mut_slice().copy_from_slice(&content(k1, 4096));
        assert!(!t.contains(&k1));
        assert!(t.pin(&k1).is_none());
        assert!(!t.remove(&k1).unwrap());
        assert!(t.keys(ns).is_empty());
        assert_eq!((t.usage().blocks, t.usage().used_bytes), (0, 4096));
        // Being written: a second writer has nothing to do.
        assert!(t.reserve(ns, k1, 4096).unwrap().is_none());
        assert_eq!(t.put(ns, k1, &content(k1, 4096)).unwrap(), Stored::Present);
        drop(slot);
        assert!(!t.contains(&k1));
        assert_eq!((t.usage().blocks, t.usage().used_bytes), (0, 0));
        // Reserved space is not evictable: two reservations fill the pool.
        let mut a = t.reserve(ns, k1, 4096).unwrap().unwrap();
        let b = t.reserve(ns, k2, 4096).unwrap().unwrap();
        let e = t.reserve(ns, k3, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        a.as_mut_slice().copy_from_slice(&content(k1, 4096));
        a.commit();
        drop(b);
        assert!(t.contains(&k1) && !t.contains(&k2));
        let mut out = vec![0; 4096];
        assert_eq!(t.get(&k1, &mut out).unwrap(), crate::tier::Fetched::Hit);
        assert!(out == content(k1, 4096));
        let p = t.pin_host(&k1).unwrap();
        assert!(PinnedBlock::in_memory(&p) == Some(&content(k1, 4096)[..]));
        assert_eq!((t.usage().blocks, t.usage().used_bytes), (1, 4096));
    }

    #[test]
    fn oversized_block_is_refused() {
        let t = tier(1, 4096);
        let e = t.put(NamespaceId(1), BlockKey(1), &[0; 8192]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(t.usage().used_bytes, 0);
    }
}
