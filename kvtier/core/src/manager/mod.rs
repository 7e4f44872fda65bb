//! The block manager: one owner for a node's tiers, their index and policy.
//!
//! - `lookup` walks keys in order and answers the longest present prefix and
//!   the tier of each block; a miss is not an error.
//! - `store` validates everything first (namespace, sizes), then writes to the
//!   host tier, cascading to disk per [`Cascade`]; in [`Mode::SsdOnly`] it
//!   writes straight to disk through the disk tier's bounded staging.
//! - `reserve` hands out writable space for new blocks (slots in the host
//!   pool, or staging bound for the disk in SSD-only mode); the caller
//!   fills it in place and `commit`s it, with the guarantees of `store` (see
//!   [`Reservation`]).
//! - `lease` pins the leading present blocks so they cannot be evicted before
//!   `load_leased` copies them out; `load` does both at once and promotes disk
//!   hits into the host tier. `load_with` hands a caller the verified bytes
//!   where they lie (host blocks in the pool, disk blocks read into a
//!   reused buffer) to copy them to their destination itself.
//! - With a blob tier, `lookup` and `lease` go to blob for the part of a
//!   prefix the local tiers miss, and loads promote what they read into the
//!   first local tier. In writeback mode every block that reaches the disk
//!   is uploaded lazily (see [`writeback`]).
//! - Every queue is bounded: when full, the manager answers
//!   [`ErrorKind::Throttled`] before changing anything, and counts it.

mod admission;
pub mod config;
mod lookup;
mod reserve;
mod stats;
mod store;
pub mod writeback;

use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{SyncSender, sync_channel};

pub use self::config::{Cascade, ManagerConfig, Mode};
pub use self::lookup::{Lease, LoadFailure, LoadOutcome, Lookup};
pub use self::reserve::Reservation;
pub use self::stats::ManagerStats;
pub use self::store::StoreOutcome;

use self::admission::Admission;
use self::stats::Counters;
use self::store::{Job, Queue, demoter, offload_worker};
use self::writeback::Writeback;
use crate::block::{BlockKey, Namespace, NamespaceId};
use crate::buf::{AlignedBuf, Recycled, Recycler};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{EventLog, EventPage, TierSet};
use crate::fsio::FileIo;
use crate::tier::blob::{BlobConfig, BlobMode, BlobTier};
use crate::tier::disk::DiskTier;
use crate::tier::host::HostTier;
use crate::tier::{Tier, TierKind};

/// The most keys one [`BlockManager::list_keys`] page holds.
pub const MAX_LIST_KEYS: usize = 1 << 16;

#[derive(Debug)]
struct NsInfo {
    block_bytes: u64,
    ns: Namespace,
}

struct Shared {
    cfg: ManagerConfig,
    host: Option<HostTier>,
    disk: Option<DiskTier>,
    blob: Option<BlobTier>,
    wb: Option<Arc<Writeback>>,
    namespaces: RwLock<HashMap<NamespaceId, NsInfo>>,
    /// What the tiers stored and dropped, per namespace (see [`crate::events`]).
    events: Arc<EventLog>,
    admission: Arc<Admission>,
    counters: Arc<Counters>,
    queue: Arc<Queue>,
    /// Buffers for blocks that pass through host memory outside the host
    /// tier: disk blocks on their way to a `load_with` caller, and blocks
    /// an SSD-only reservation stages for the disk.
    scratch: Recycler,
}

/// Bytes of one scratch buffer: blocks at most this large share pooled
/// buffers; a larger block gets one of its own per request.
const SCRATCH_BYTES: usize = 8 << 20;
/// Idle scratch buffers kept for reuse (a load and a save per engine
/// thread at once, typically).
const SCRATCH_KEEP: usize = 4;

/// A scratch buffer: pooled, or one of its own for a block larger than
/// the pool's buffers.
#[derive(Debug)]
enum Scratch {
    Pooled(Recycled),
    Own(AlignedBuf),
}

impl std::ops::Deref for Scratch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Pooled(b) => b,
            Self::Own(b) => b,
        }
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Pooled(b) => b,
            Self::Own(b) => b,
        }
    }
}

/// The block manager. See the module docs.
///
/// It holds its tiers as a fixed set of concrete types (host, disk, blob),
/// not as [`Tier`] trait objects: the set is closed (the
/// cascade, SSD-only mode and writeback are written for exactly these
/// three), and the manager needs what only each tier has: host pins it
/// can hand to the write-through workers, the host tier's demotion hook,
/// the disk tier's packed batch writes and its retain hook for writeback,
/// the blob tier's windowed prefix fetch. [`Tier`] stays the contract the
/// local tiers pass in the conformance suite. Faults are injected below
/// the tiers, at the file I/O boundary ([`BlockManager::open_with`] and
/// [`crate::fsio`]), which is where the failures worth testing (a torn
/// write, a failed fsync or rename) happen.
pub struct BlockManager {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for BlockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManager")
            .field("mode", &self.shared.cfg.mode)
            .finish()
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl BlockManager {
    /// Opens the configured tiers (rebuilding the disk index) and starts the
    /// write-through worker when one is needed.
    pub fn open(cfg: &ManagerConfig) -> Result<Self> {
        Self::open_with(cfg, FileIo::default())
    }

    /// [`BlockManager::open`] with the disk tier's and the dirty log's
    /// file operations going through `io`: how tests inject I/O faults.
    pub fn open_with(cfg: &ManagerConfig, io: FileIo) -> Result<Self> {
        cfg.validate()?;
        let counters = Arc::new(Counters::default());
        let admission = Arc::new(Admission::new(cfg.disk_admission_min_seen, cfg.admission_counters));
        let disk = cfg
            .disk
            .as_ref()
            .map(|d| DiskTier::open_with(d, io.clone()))
            .transpose()?;
        let events = Arc::new(EventLog::new(cfg.event_capacity));
        if let Some(d) = &disk {
            d.set_events(events.clone())?;
        }
        let blob = cfg.blob.as_ref().map(BlobConfig::build).transpose()?;
        let wb = match (&blob, &disk) {
            (Some(b), Some(d)) if b.mode() == BlobMode::Writeback => {
                let dcfg = cfg.disk.as_ref().expect("a disk tier was built");
                let wb = Arc::new(Writeback::open_with(&dcfg.dir, dcfg.sync_writes, io.clone(), |k| {
                    d.contains(k)
                })?);
                let keep = wb.clone();
                d.set_retain(Arc::new(move |k| keep.retains(k)))?;
                wb.set_events(events.clone());
                b.handle()
                    .spawn(writeback::upload_loop(wb.clone(), d.clone(), b.client()));
                b.handle().spawn(writeback::check_loop(wb.clone(), b.client()));
                Some(wb)
            }
            _ => None,
        };
        let demoter = match (&disk, cfg.cascade) {
            (Some(disk), Cascade::OnEviction) => {
                Some(demoter(disk.clone(), wb.clone(), admission.clone(), counters.clone()))
            }
            _ => None,
        };
        let host = cfg.host.as_ref().map(|h| h.build(demoter)).transpose()?;
        if let Some(h) = &host {
            h.set_events(events.clone())?;
        }
        let queue = Arc::new(Queue {
            capacity: cfg.offload_queue_blocks,
            queued: Mutex::new(0),
            drained: Condvar::new(),
            in_flight: Mutex::new(HashMap::new()),
            written: Condvar::new(),
        });
        let (tx, workers) = match (&host, &disk, cfg.cascade) {
            (Some(_), Some(disk), Cascade::WriteThrough) => {
                let (tx, rx) = sync_channel::<Job>(cfg.offload_queue_blocks);
                let rx = Arc::new(Mutex::new(rx));
                let mut workers = Vec::with_capacity(cfg.offload_workers);
                for i in 0..cfg.offload_workers {
                    let (disk, queue, counters) = (disk.clone(), queue.clone(), counters.clone());
                    let (wb, rx) = (wb.clone(), rx.clone());
                    let worker = std::thread::Builder::new()
                        .name(format!("kvtier-offload-{i}"))
                        .spawn(move || offload_worker(&rx, &disk, wb.as_deref(), &queue, &counters))
                        .map_err(|e| Error::io("start an offload worker", e))?;
                    workers.push(worker);
                }
                (Some(tx), workers)
            }
            _ => (None, Vec::new()),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                host,
                disk,
                blob,
                wb,
                namespaces: RwLock::new(HashMap::new()),
                events,
                admission,
                counters,
                queue,
                scratch: Recycler::new(SCRATCH_BYTES, SCRATCH_KEEP),
            }),
            tx,
            workers,
        })
    }

    /// How many `block`-byte blocks one scratch buffer holds (at least one).
    fn scratch_blocks(&self, block: usize) -> usize {
        (self.shared.scratch.buf_bytes() / block.max(1)).max(1)
    }

    /// A scratch buffer for [`BlockManager::scratch_blocks`] blocks.
    fn scratch(&self, block: usize) -> Scratch {
        if block <= self.shared.scratch.buf_bytes() {
            Scratch::Pooled(self.shared.scratch.take())
        } else {
            Scratch::Own(AlignedBuf::new(block))
        }
    }

    /// Registers a namespace; registering the same one again is a no-op.
    pub fn register_namespace(&self, ns: &Namespace) -> Result<NamespaceId> {
        ns.validate()?;
        let block_bytes = ns.block_bytes();
        let max = self.max_block_bytes();
        if block_bytes > max {
            return Err(Error::invalid(format!(
                "namespace blocks of {block_bytes} bytes exceed the largest block the tiers hold ({max} bytes)"
            )));
        }
        let id = ns.id();
        self.shared.namespaces.write().entry(id).or_insert(NsInfo {
            block_bytes,
            ns: ns.clone(),
        });
        Ok(id)
    }

    /// Every registered namespace with its id, in id order.
    pub fn namespaces(&self) -> Vec<(NamespaceId, Namespace)> {
        let mut v: Vec<_> = self
            .shared
            .namespaces
            .read()
            .iter()
            .map(|(id, i)| (*id, i.ns.clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// Whether namespace `ns` is registered and holds files (see
    /// [`Namespace::holds_files`]).
    pub fn holds_files(&self, ns: NamespaceId) -> bool {
        self.shared
            .namespaces
            .read()
            .get(&ns)
            .is_some_and(|i| i.ns.holds_files())
    }

    /// The mode running.
    pub fn mode(&self) -> Mode {
        self.shared.cfg.mode
    }

    fn max_block_bytes(&self) -> u64 {
        let host = self.shared.host.as_ref().map_or(u64::MAX, |h| h.usage().capacity_bytes);
        let disk = self.shared.disk.as_ref().map_or(u64::MAX, DiskTier::max_block_bytes);
        host.min(disk)
    }

    /// Bytes per block of a registered namespace.
    pub fn block_bytes(&self, ns: NamespaceId) -> Result<u64> {
        self.shared
            .namespaces
            .read()
            .get(&ns)
            .map(|i| i.block_bytes)
            .ok_or_else(|| Error::new(ErrorKind::UnknownNamespace, format!("namespace {ns} is not registered")))
    }

    /// Checks a request's namespace and that `bytes` holds `keys` blocks.
    fn check(&self, ns: NamespaceId, keys: &[BlockKey], bytes: usize, what: &str) -> Result<usize> {
        let block = self.block_bytes(ns)? as usize;
        if bytes != keys.len() * block {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!(
                    "{what} of {} blocks of {block} bytes needs a buffer of {} bytes, got {bytes}",
                    keys.len(),
                    keys.len() * block
                ),
            ));
        }
        Ok(block)
    }

    fn tiers(&self) -> impl Iterator<Item = &dyn Tier> {
        let h = self.shared.host.as_ref().map(|t| t as &dyn Tier);
        let d = self.shared.disk.as_ref().map(|t| t as &dyn Tier);
        h.into_iter().chain(d)
    }

    /// Every key of namespace `ns` held in a local tier (host or disk), in
    /// no particular order: what resync and rebalancing walk.
    pub fn local_keys(&self, ns: NamespaceId) -> Vec<BlockKey> {
        let mut keys = self.shared.disk.as_ref().map(|d| d.keys(ns)).unwrap_or_default();
        if let Some(h) = &self.shared.host {
            let on_disk: std::collections::HashSet<BlockKey> = keys.iter().copied().collect();
            keys.extend(h.keys(ns).into_iter().filter(|k| !on_disk.contains(k)));
        }
        keys
    }

    /// A page of the keys of namespace `ns` that a local tier holds: those
    /// after `after` (all when `None`) in ascending order of their 128-bit
    /// value, at most `max` (1 to [`MAX_LIST_KEYS`]), and whether more
    /// follow. What a client that names its keys reversibly lists them by.
    ///
    /// Each page walks the whole index of the namespace (and sorts what is
    /// after the cursor), so listing is for occasional reads, not a hot path.
    /// Blocks stored or dropped while a listing pages along may or may not
    /// show.
    pub fn list_keys(&self, ns: NamespaceId, after: Option<BlockKey>, max: usize) -> Result<(Vec<BlockKey>, bool)> {
        self.block_bytes(ns)?;
        if !(1..=MAX_LIST_KEYS).contains(&max) {
            return Err(Error::invalid(format!(
                "list_keys takes 1 to {MAX_LIST_KEYS} keys a page, got {max}"
            )));
        }
        let mut keys = self.local_keys(ns);
        if let Some(a) = after {
            keys.retain(|k| *k > a);
        }
        keys.sort_unstable();
        let more = keys.len() > max;
        keys.truncate(max);
        Ok((keys, more))
    }

    /// The tier events of namespace `ns` after sequence number `after` (at
    /// most `max`), for a reader whose last page had `epoch` (0 at first).
    /// See [`crate::events`]: a first read, a reader that fell behind and
    /// one from before a restart get a resync signal instead of a gap.
    pub fn events(&self, ns: NamespaceId, epoch: u64, after: u64, max: usize) -> Result<EventPage> {
        self.block_bytes(ns)?;
        self.shared.events.read(ns, epoch, after, max)
    }

    /// Which tiers hold each of `keys` (of namespace `ns`), each key on its
    /// own: not a prefix walk. Blob counts when this node knows the block is
    /// there (it uploaded or read it) without asking blob. What a reader
    /// re-reads after a resync signal.
    pub fn locate(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Vec<TierSet>> {
        self.block_bytes(ns)?;
        if keys.len() > crate::events::MAX_READ {
            return Err(Error::invalid(format!(
                "locate takes at most {} keys, got {}",
                crate::events::MAX_READ,
                keys.len()
            )));
        }
        let blob = self.shared.blob.as_ref().map(BlobTier::client);
        Ok(keys
            .iter()
            .map(|k| {
                let mut s: TierSet = self.tiers().filter(|t| t.contains(k)).map(|t| t.kind()).collect();
                if blob.as_ref().is_some_and(|b| b.known_present(k)) {
                    s.insert(TierKind::Blob);
                }
                s
            })
            .collect())
    }

    /// Waits until every block logged for writeback is uploaded; false if
    /// `timeout` passed first (or there is no writeback: true).
    pub fn flush_writeback(&self, timeout: std::time::Duration) -> bool {
        self.shared.wb.as_ref().is_none_or(|wb| wb.wait_idle(timeout))
    }

    /// In a cluster: says which keys this node uploads to blob (see
    /// [`writeback`]); the others are left to the key's uploader and
    /// checked for. Without a filter this node uploads everything. No-op
    /// without writeback.
    pub fn set_upload_filter(&self, filter: writeback::UploadFilter) {
        if let Some(wb) = &self.shared.wb {
            wb.set_filter(filter);
        }
    }

    /// In a cluster: how long a key another replica uploads stays pending
    /// here, unheard of, before this node checks blob for it (one HEAD);
    /// each check that finds it absent doubles the wait (see
    /// [`crate::replication::landed`]). Default
    /// [`writeback::DEFAULT_CHECK_AFTER`]. No-op without writeback.
    pub fn set_peer_check_after(&self, after: std::time::Duration) {
        if let Some(wb) = &self.shared.wb {
            wb.set_check_after(after);
        }
    }

    /// In a cluster: keeps what this node's uploads settle (landed in blob,
    /// or given up) for [`BlockManager::take_blob_notices`], which the
    /// server sends to the keys' other replicas. No-op without writeback.
    pub fn collect_blob_notices(&self) {
        if let Some(wb) = &self.shared.wb {
            wb.collect_notices();
        }
    }

    /// Up to `max` notices of what this node's uploads settled, oldest
    /// first (none unless [`BlockManager::collect_blob_notices`]).
    pub fn take_blob_notices(&self, max: usize) -> Vec<crate::replication::landed::Notice> {
        self.shared.wb.as_ref().map_or_else(Vec::new, |wb| wb.take_notices(max))
    }

    /// Another replica uploaded `keys` of `ns` to blob: they are no longer
    /// pending here (no request made). Answers how many were dropped now.
    pub fn blob_landed(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        self.shared.wb.as_ref().map_or(0, |wb| wb.landed_by_peer(ns, keys))
    }

    /// Their uploader gave up `keys` of `ns` and this node uploads them
    /// instead (the caller decided: [`crate::replication::landed::takes_over`]).
    /// Answers how many were pending here.
    pub fn take_over_uploads(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        self.shared.wb.as_ref().map_or(0, |wb| wb.take_over(ns, keys))
    }

    /// The membership changed: keys waiting for another replica's upload
    /// that the filter now gives this node (their uploader went down) are
    /// checked for at once. Answers how many.
    pub fn reconsider_uploads(&self) -> usize {
        self.shared.wb.as_ref().map_or(0, |wb| wb.reconsider())
    }

    /// The blob tier, if configured.
    pub fn blob(&self) -> Option<&BlobTier> {
        self.shared.blob.as_ref()
    }

    /// The disk tier, if configured.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.shared.disk.as_ref()
    }

    /// The host tier, if configured.
    pub fn host(&self) -> Option<&HostTier> {
        self.shared.host.as_ref()
    }
}

impl Drop for BlockManager {
    fn drop(&mut self) {
        // Pending uploads stay in the dirty log for the next open.
        if let Some(wb) = &self.shared.wb {
            wb.stop();
        }
        // Drain the write-through queue: every queued block reaches disk.
        self.tx.take();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("an offload worker panicked");
            }
        }
        // Seal now: the uploader holds the disk tier until its runtime
        // winds down in the background, which a process exiting after
        // this drop does not wait for. An unsealed segment loses nothing
        // (the next open verifies it in full), but skips a bad record
        // there instead of indexing it for read repair to find.
        if let Some(d) = &self.shared.disk {
            d.seal_active();
        }
    }
}

#[cfg(test)]
mod tests;
