//! The disk tier (G3): log-structured segment files on a local SSD.
//!
//! Blocks are appended as self-describing records (see [`record`]) to the
//! active segment, a file of at most `segment_bytes` (not preallocated:
//! writes into preallocated, unwritten extents measured slower here). The
//! index lives in memory and is rebuilt on open by reading record headers, so
//! contents survive a restart. When every write into a full segment has
//! finished, a seal goes on its last page: on open, sealed segments are
//! indexed from their headers alone, while unsealed ones (the tail of a
//! crash) have every record's data verified, so torn records are skipped and
//! counted, never indexed. Every read verifies the data checksum too.
//!
//! Space is reclaimed a whole segment at a time, oldest first (FIFO). A
//! reclaimed file is unlinked, not reused: readers that pinned one of its
//! blocks hold the file open and keep reading correct bytes.
//!
//! I/O is O_DIRECT where the filesystem allows it (one log line says when it
//! does not). Page-aligned blocks are written from and read into the caller's
//! buffer directly; others go through a bounded pool of staging buffers.

//!
//! # Files
//!
//! - [`config`]: [`DiskConfig`], what users write.
//! - `index`: the in-memory index and the segment list it points into.
//! - `write`: appending records (one, or small ones packed) and staging.
//! - `segments`: rolling to a new segment, reclaiming the oldest, seals.
//! - `recovery`: rebuilding the index from the files on open.
//! - `pin`: reading a pinned block.
//! - `file`, `record`: aligned buffers and O_DIRECT files; the on-disk format.
//!
//! Segment writes, fsyncs and renames go through a [`FileIo`], so a test
//! can fail any one of them ([`DiskTier::open_with`]).

pub mod config;
mod file;
mod index;
mod pin;
pub(crate) mod record;
mod recovery;
mod segments;
mod unlink;
mod write;

use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use self::config::DiskConfig;
pub use self::recovery::Recovery;

use self::file::{AlignedBuf, BufPool};
use self::index::State;
use self::pin::DiskPin;
use self::record::{HEADER_BYTES, PAGE, RecordHeader};
use self::segments::seal_if_done;
use self::write::header;
use super::{Pin, Stored, Tier, TierCounters, TierKind, Usage};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, Result};
use crate::events::EventLog;
use crate::fsio::FileIo;

/// The disk tier. Cheap to clone: clones share the directory.
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.inner.cfg.dir)
            .field("direct", &self.inner.direct)
            .finish()
    }
}

struct Inner {
    cfg: DiskConfig,
    direct: bool,
    max_segments: usize,
    state: Mutex<State>,
    counters: TierCounters,
    staging: BufPool,
    oversize_staging: AtomicU64,
    oversize_idle: Mutex<Vec<AlignedBuf>>,
    /// Reclaimed segment files, unlinked oldest first.
    unlinks: Arc<unlink::Unlinker>,
    /// Every segment write, fsync and rename goes through it.
    io: FileIo,
    recycled: AtomicU64,
    /// Writes that carried more than one record (see [`DiskTier::put_batch`]).
    batched_writes: AtomicU64,
    recovery: Recovery,
    /// Blocks reclaim must keep (blocks not yet written back to blob).
    retain: std::sync::OnceLock<Retain>,
    /// Where stores and removals are recorded (see [`crate::events`]).
    events: std::sync::OnceLock<Arc<EventLog>>,
    _lock: File,
}

/// Says whether a block must stay on disk: reclaim never drops a segment
/// holding a live block it answers true for. Called under the tier's lock;
/// it must not call back into the tier.
pub type Retain = Arc<dyn Fn(&BlockKey) -> bool + Send + Sync>;

impl DiskTier {
    /// Opens (or makes) the tier in `cfg.dir` and rebuilds its index.
    pub fn open(cfg: &DiskConfig) -> Result<Self> {
        Self::open_with(cfg, FileIo::default())
    }

    /// [`DiskTier::open`] with its segment writes, fsyncs and renames going
    /// through `io`: how tests inject I/O faults.
    pub fn open_with(cfg: &DiskConfig, io: FileIo) -> Result<Self> {
        let seg = cfg.segment_bytes;
        if seg < 4 * PAGE || !seg.is_multiple_of(PAGE) {
            return Err(Error::config(format!(
                "disk.segment_bytes {seg} must be a multiple of {PAGE} and at least {}",
                4 * PAGE
            )));
        }
        let max_segments = (cfg.capacity_bytes / seg) as usize;
        if max_segments < 2 {
            return Err(Error::config(format!(
                "disk.capacity_bytes {} must hold at least two segments of {seg} bytes",
                cfg.capacity_bytes
            )));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(|e| Error::io(format!("create {}", cfg.dir.display()), e))?;
        let lock = lock_dir(&cfg.dir)?;
        let direct = cfg.direct_io
            && match file::probe_direct(&cfg.dir) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(dir = %cfg.dir.display(), "direct I/O unavailable ({e}): disk tier falls back to buffered I/O");
                    false
                }
            };
        let mut inner = Inner {
            cfg: cfg.clone(),
            direct,
            max_segments,
            state: Mutex::new(State::default()),
            counters: TierCounters::default(),
            staging: BufPool::new(cfg.io_buffers.max(1), cfg.io_buffer_bytes as usize),
            oversize_staging: AtomicU64::new(0),
            oversize_idle: Mutex::new(Vec::new()),
            unlinks: Arc::default(),
            io,
            recycled: AtomicU64::new(0),
            batched_writes: AtomicU64::new(0),
            recovery: Recovery::default(),
            retain: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
            _lock: lock,
        };
        inner.recover()?;
        let r = inner.recovery;
        tracing::info!(
            dir = %cfg.dir.display(), direct, segments = r.segments, blocks = r.blocks,
            skipped = r.skipped_records, unsealed = r.unsealed_segments, "disk tier open"
        );
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Installs the hook that keeps blocks from reclaim (once per tier):
    /// when the oldest segment holds a retained block, puts that need room
    /// are throttled instead of dropping it.
    pub fn set_retain(&self, retain: Retain) -> Result<()> {
        self.inner
            .retain
            .set(retain)
            .map_err(|_| Error::config("the disk tier's retain hook is already set"))
    }

    /// From now on every block indexed or dropped is recorded in `log`
    /// (see [`crate::events`]); what recovery found is not. Set once.
    pub fn set_events(&self, log: Arc<EventLog>) -> Result<()> {
        self.inner
            .events
            .set(log)
            .map_err(|_| Error::config("the disk tier's event log is already set"))
    }

    /// What opening found.
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery
    }

    /// Whether O_DIRECT is in use.
    pub fn direct_io(&self) -> bool {
        self.inner.direct
    }

    /// Unaligned blocks too large for a staging buffer, which allocated one.
    pub fn oversize_staging(&self) -> u64 {
        self.inner.oversize_staging.load(Relaxed)
    }

    /// Segment files reused for new segments instead of unlinked.
    pub fn recycled_segments(&self) -> u64 {
        self.inner.recycled.load(Relaxed)
    }

    /// Writes that carried more than one record, packed by
    /// [`DiskTier::put_batch`].
    pub fn batched_writes(&self) -> u64 {
        self.inner.batched_writes.load(Relaxed)
    }

    /// Stores several blocks, packing small ones into shared writes.
    ///
    /// Answers one result per item, in order, each what [`Tier::put`] would
    /// answer for it: keys already held (or repeated earlier in `items`)
    /// are [`Stored::Present`], and an empty block is refused. Small blocks
    /// (those a put stages through a buffer) are laid out back to back in
    /// one staging buffer, exactly as one-by-one appends would place them,
    /// and go to the segment in a single write: under O_DIRECT that is one
    /// device round trip for many blocks. A group never exceeds a staging
    /// buffer or what the active segment still takes; a write that fails
    /// fails every block in it. Large blocks are written one by one.
    pub fn put_batch(&self, items: &[(NamespaceId, BlockKey, &[u8])]) -> Vec<Result<Stored>> {
        let mut out: Vec<Option<Result<Stored>>> = items.iter().map(|_| None).collect();
        let mut todo = Vec::with_capacity(items.len());
        {
            let mut st = self.inner.state.lock();
            let mut seen = HashSet::with_capacity(items.len());
            for (i, &(_, key, data)) in items.iter().enumerate() {
                if data.is_empty() {
                    out[i] = Some(Err(Error::invalid("disk tier: empty block")));
                } else if write::touch_locked(&mut st, &key) || !seen.insert(key) {
                    out[i] = Some(Ok(Stored::Present));
                } else {
                    todo.push(i);
                }
            }
        }
        let mut small = Vec::with_capacity(todo.len());
        for &i in &todo {
            let (ns, key, data) = items[i];
            if todo.len() > 1 && self.inner.packable(data.len()) {
                small.push((i, header(ns, key, data, HEADER_BYTES as u32)));
            } else {
                out[i] = Some(self.put(ns, key, data));
            }
        }
        if !small.is_empty() {
            for (i, r) in self.inner.append_packed(&small, items) {
                out[i] = Some(r.map(|()| Stored::Inserted));
            }
        }
        out.into_iter().map(|r| r.expect("every item is answered")).collect()
    }

    /// The largest block the tier stores.
    pub fn max_block_bytes(&self) -> u64 {
        self.inner.cfg.segment_bytes - 3 * PAGE
    }

    /// The namespace of every block held: for stats and for callers that
    /// check what a directory holds after a restart.
    pub fn namespaces(&self) -> HashSet<NamespaceId> {
        self.inner.state.lock().index.values().map(|l| l.ns).collect()
    }

    /// Every key held for namespace `ns` (a snapshot).
    pub fn keys(&self, ns: NamespaceId) -> Vec<BlockKey> {
        let st = self.inner.state.lock();
        st.index.iter().filter(|(_, l)| l.ns == ns).map(|(k, _)| *k).collect()
    }

    /// Seals the active segment now, as closing the tier does, so the next
    /// open indexes it from its headers: what a clean stop calls when
    /// clones of the tier (a background uploader) may outlive the stop and
    /// the process may exit before the last one drops. A later write
    /// starts a new segment.
    pub fn seal_active(&self) {
        let (segment_bytes, sync) = (self.inner.cfg.segment_bytes, self.inner.cfg.sync_writes);
        let mut guard = self.inner.state.lock();
        let st = &mut *guard;
        if let Some(m) = st.active.take().and_then(|id| st.segments.get_mut(&id)) {
            m.sealed = true;
            seal_if_done(m, segment_bytes, sync, &self.inner.io);
        }
    }

    /// At most `max` live blocks placed after `after` (all when `None`), in
    /// the order they lie on the disk (segment, then offset): the walk of a
    /// scrub, which reads the disk front to back and carries the last
    /// place it verified to its next batch. Each call looks at the
    /// segments from `after` on, not the whole index; blocks stored or
    /// dropped meanwhile may or may not show.
    pub fn blocks_after(&self, after: Option<DiskPlace>, max: usize) -> Vec<PlacedBlock> {
        let st = self.inner.state.lock();
        let from = after.map_or(0, |p| p.segment);
        let mut out = Vec::new();
        for (&id, meta) in st.segments.range(from..) {
            let mut here: Vec<PlacedBlock> = meta
                .keys
                .iter()
                .filter_map(|k| {
                    let l = st.index.get(k).filter(|l| l.seg == id)?;
                    Some(PlacedBlock {
                        ns: l.ns,
                        key: *k,
                        place: DiskPlace {
                            segment: id,
                            offset: l.off,
                        },
                        len: l.len,
                    })
                })
                .filter(|b| after.is_none_or(|a| b.place > a))
                .collect();
            here.sort_unstable_by_key(|b| b.place);
            here.dedup_by_key(|b| b.place);
            out.extend(here.into_iter().take(max - out.len()));
            if out.len() == max {
                break;
            }
        }
        out
    }
}

/// Where a block's record lies: its segment and its offset in it, ordered
/// as the disk is (see [`DiskTier::blocks_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskPlace {
    /// The segment's id (segments are written in id order).
    pub segment: u64,
    /// The record's offset in the segment.
    pub offset: u64,
}

/// A live block and where it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedBlock {
    /// Its namespace.
    pub ns: NamespaceId,
    /// Its key.
    pub key: BlockKey,
    /// Where its record lies.
    pub place: DiskPlace,
    /// Its length in bytes.
    pub len: u64,
}

fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    // SAFETY: a plain syscall on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::config(format!(
            "disk directory {} is in use by another process",
            dir.display()
        )));
    }
    Ok(f)
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A clean close seals the active segment: the next open trusts it.
        let (segment_bytes, sync, io) = (self.cfg.segment_bytes, self.cfg.sync_writes, self.io.clone());
        let st = self.state.get_mut();
        if let Some(m) = st.active.take().and_then(|id| st.segments.get_mut(&id)) {
            m.sealed = true;
            seal_if_done(m, segment_bytes, sync, &io);
        }
        // Reclaimed files go before the directory lock does: a tier opened
        // next on this directory must not see them vanish under its scan.
        self.unlinks.wait_all();
    }
}

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.inner.state.lock().index.contains_key(key)
    }

    fn put(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<Stored> {
        if data.is_empty() {
            return Err(Error::invalid("disk tier: empty block"));
        }
        if self.inner.touch(&key) {
            return Ok(Stored::Present);
        }
        let mut h = header(ns, key, data, 0);
        self.inner.append(&mut h, data)?;
        Ok(Stored::Inserted)
    }

    fn pin(&self, key: &BlockKey) -> Option<Pin> {
        let st = self.inner.state.lock();
        let loc = *st.index.get(key)?;
        let seg = st
            .segments
            .get(&loc.seg)
            .expect("indexed segments are listed")
            .seg
            .clone();
        Some(Box::new(DiskPin {
            inner: self.inner.clone(),
            seg,
            key: *key,
            loc,
        }))
    }

    fn remove(&self, key: &BlockKey) -> Result<bool> {
        let (ns, present) = {
            let st = self.inner.state.lock();
            match (st.index.get(key), st.stray.get(key)) {
                (Some(loc), _) => (loc.ns, true),
                // Not held, but a failed write may have left its record
                // whole on the file: shadow it all the same.
                (None, Some(&(_, ns))) => (ns, false),
                (None, None) => return Ok(false),
            }
        };
        // The tombstone keeps the block from coming back on the next open.
        let mut h = RecordHeader {
            flags: record::FLAG_TOMBSTONE,
            data_offset: 0,
            key: *key,
            ns,
            data_len: 0,
            data_hash: record::data_hash(*key, ns, &[]),
            segment: 0,
        };
        self.inner.append(&mut h, &[])?;
        Ok(present)
    }

    fn remove_written_before(&self, key: &BlockKey, before_ms: u64) -> Result<bool> {
        self.inner.remove_written_before(key, before_ms)
    }

    fn usage(&self) -> Usage {
        let st = self.inner.state.lock();
        Usage {
            used_bytes: st.used_bytes,
            capacity_bytes: self.inner.max_segments as u64 * self.inner.cfg.segment_bytes,
            blocks: st.index.len() as u64,
        }
    }

    fn counters(&self) -> &TierCounters {
        &self.inner.counters
    }
}

#[cfg(test)]
mod tests;
