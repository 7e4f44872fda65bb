//! The block manager: one owner for a node's tiers, their index and policy.
//!
//! - `lookup` walks keys in order and answers the longest present prefix and
//!   the tier of each block; a miss is not an error.
//! - `store` validates everything first (namespace, sizes), then writes to the
//!   host tier, cascading to disk per [`Cascade`]; in [`Mode::SsdOnly`] it
//!   writes straight to disk through the disk tier's bounded staging.
//! - `lease` pins the leading present blocks so they cannot be evicted before
//!   `load_leased` copies them out; `load` does both at once and promotes disk
//!   hits into the host tier.
//! - With a blob tier, `lookup` and `lease` go to blob for the part of a
//!   prefix the local tiers miss, and loads promote what they read into the
//!   first local tier. In writeback mode every block that reaches the disk
//!   is uploaded lazily (see [`writeback`]).
//! - Every queue is bounded: when full, the manager answers
//!   [`ErrorKind::Throttled`] before changing anything, and counts it.

mod admission;
pub mod writeback;

use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use self::admission::Admission;
use self::writeback::{Writeback, WritebackStats};
use crate::block::{BlockKey, Namespace, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::fsio::FileIo;
use crate::tier::blob::object::Expect;
use crate::tier::blob::{BlobConfig, BlobMode, BlobStats, BlobTier};
use crate::tier::disk::{DiskConfig, DiskTier};
use crate::tier::host::{Demoter, HostConfig, HostPin, HostTier};
use crate::tier::{Pin, Stored, Tier, TierCounters, TierKind, TierStats, stats_of};

/// How the tiers are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Host memory caches blocks; the disk tier (if any) sits behind it.
    #[default]
    Tiered,
    /// Only the SSD holds blocks; host memory is the disk tier's bounded
    /// staging, nothing more.
    SsdOnly,
}

/// When blocks go from host to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cascade {
    /// Written to disk in the background as soon as they are stored.
    WriteThrough,
    /// Written to disk when the host tier evicts them.
    #[default]
    OnEviction,
}

/// Configuration of a [`BlockManager`]: what users write in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// Tiered (host + disk) or SSD-only.
    #[serde(default)]
    pub mode: Mode,
    /// When host blocks go to disk.
    #[serde(default)]
    pub cascade: Cascade,
    /// The host tier; none in SSD-only mode.
    #[serde(default)]
    pub host: Option<HostConfig>,
    /// The disk tier.
    #[serde(default)]
    pub disk: Option<DiskConfig>,
    /// A block goes to disk once stored this many times (1: always).
    #[serde(default = "one")]
    pub disk_admission_min_seen: u8,
    /// Counters per row of the admission sketch.
    #[serde(default = "default_admission_counters")]
    pub admission_counters: usize,
    /// Copy disk hits into the host tier.
    #[serde(default = "yes")]
    pub promote_on_hit: bool,
    /// Write-through blocks queued for disk at most; more are throttled.
    #[serde(default = "default_offload_queue")]
    pub offload_queue_blocks: usize,
    /// Threads writing the write-through queue to disk: with O_DIRECT each
    /// write waits for the device, so two keep it busy where one leaves
    /// gaps.
    #[serde(default = "default_offload_workers")]
    pub offload_workers: usize,
    /// The Azure Blob tier behind the disk, if any.
    #[serde(default)]
    pub blob: Option<BlobConfig>,
}

fn one() -> u8 {
    1
}
fn yes() -> bool {
    true
}
fn default_admission_counters() -> usize {
    1 << 20
}
fn default_offload_queue() -> usize {
    64
}
fn default_offload_workers() -> usize {
    2
}

impl ManagerConfig {
    /// Host tier only.
    pub fn host_only(host: HostConfig) -> Self {
        Self::tiered(Some(host), None)
    }

    /// SSD-only mode on `disk`.
    pub fn ssd_only(disk: DiskConfig) -> Self {
        Self {
            mode: Mode::SsdOnly,
            ..Self::tiered(None, Some(disk))
        }
    }

    /// Host in front of disk, cascading on eviction.
    pub fn tiered(host: Option<HostConfig>, disk: Option<DiskConfig>) -> Self {
        Self {
            mode: Mode::Tiered,
            cascade: Cascade::OnEviction,
            host,
            disk,
            disk_admission_min_seen: 1,
            admission_counters: default_admission_counters(),
            promote_on_hit: true,
            offload_queue_blocks: default_offload_queue(),
            offload_workers: default_offload_workers(),
            blob: None,
        }
    }

    /// Parses TOML; unknown keys are errors, not silently ignored.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config(format!("manager config: {e}")))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<()> {
        match (self.mode, &self.host, &self.disk) {
            (Mode::SsdOnly, Some(_), _) => Err(Error::config("ssd-only mode takes no [host] tier")),
            (Mode::SsdOnly, None, None) => Err(Error::config("ssd-only mode needs a [disk] tier")),
            (Mode::Tiered, None, None) => Err(Error::config("configure a [host] tier, a [disk] tier, or both")),
            _ if self.offload_queue_blocks == 0 => Err(Error::config("offload_queue_blocks must be > 0")),
            _ if !(1..=64).contains(&self.offload_workers) => {
                Err(Error::config("offload_workers must be between 1 and 64"))
            }
            _ => match &self.blob {
                Some(b) if b.mode == BlobMode::Writeback && self.disk.is_none() => Err(Error::config(
                    "blob mode writeback keeps its dirty log on the SSD: configure a [disk] tier",
                )),
                Some(b) => b.validate(),
                None => Ok(()),
            },
        }
    }

    /// Opens the tiers and starts the manager.
    pub fn build(&self) -> Result<BlockManager> {
        BlockManager::open(self)
    }
}

/// Where each block of a lookup's present prefix lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lookup {
    /// The tier of each block of the longest present prefix, in key order.
    pub tiers: Vec<TierKind>,
}

impl Lookup {
    /// Length of the longest present prefix, in blocks.
    pub fn hit_blocks(&self) -> usize {
        self.tiers.len()
    }
}

/// What a store did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreOutcome {
    /// Blocks written.
    pub stored: usize,
    /// Blocks already present (keys name content: nothing to write).
    pub present: usize,
    /// Blocks the disk admission filter kept out of an SSD-only store.
    pub not_admitted: usize,
}

/// Why a leased block failed to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadFailure {
    /// Position of the block in the request.
    pub index: usize,
    /// What went wrong ([`ErrorKind::ChecksumMismatch`] for corrupt bytes).
    #[serde(skip)]
    pub kind: ErrorKind,
    /// The error's text.
    pub message: String,
}

/// What a load did: the leading `loaded` blocks are in the buffer, verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadOutcome {
    /// Leading blocks copied out.
    pub loaded: usize,
    /// The block that stopped the load, if one was present but unreadable;
    /// the engine must recompute it and everything after it.
    pub failed: Option<LoadFailure>,
}

/// Pins on the leading present blocks of a request.
#[derive(Debug)]
pub struct Lease {
    ns: NamespaceId,
    blocks: Vec<(BlockKey, TierKind, Pin)>,
}

impl Lease {
    /// Blocks pinned: the present prefix at the time of the lease.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether nothing was pinned.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The tier each pinned block was found in.
    pub fn tiers(&self) -> Vec<TierKind> {
        self.blocks.iter().map(|b| b.1).collect()
    }
}

#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    lookup_hit_blocks: AtomicU64,
    stores: AtomicU64,
    stored_blocks: AtomicU64,
    present_blocks: AtomicU64,
    loads: AtomicU64,
    loaded_blocks: AtomicU64,
    missed_blocks: AtomicU64,
    load_failures: AtomicU64,
    promotions: AtomicU64,
    throttled: AtomicU64,
    not_admitted: AtomicU64,
    offloaded: AtomicU64,
    offload_errors: AtomicU64,
    served_local_bytes: AtomicU64,
    served_blob_bytes: AtomicU64,
    blob_promotions: AtomicU64,
}

/// A snapshot of the manager's counters and its tiers'.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerStats {
    /// The mode running.
    pub mode: Mode,
    /// The host tier, if configured.
    pub host: Option<TierStats>,
    /// The disk tier, if configured.
    pub disk: Option<TierStats>,
    /// Lookup requests.
    pub lookups: u64,
    /// Blocks found by lookups (sum of present prefixes).
    pub lookup_hit_blocks: u64,
    /// Store requests.
    pub stores: u64,
    /// Blocks written by stores.
    pub stored_blocks: u64,
    /// Blocks stores found already present.
    pub present_blocks: u64,
    /// Load requests.
    pub loads: u64,
    /// Blocks loaded.
    pub loaded_blocks: u64,
    /// Blocks a load asked for beyond the present prefix.
    pub missed_blocks: u64,
    /// Present blocks that failed to load (corrupt or unreadable).
    pub load_failures: u64,
    /// Disk hits copied into the host tier.
    pub promotions: u64,
    /// Requests answered with `Throttled`.
    pub throttled: u64,
    /// Blocks the admission filter kept off disk.
    pub not_admitted: u64,
    /// Blocks written to disk by the cascade.
    pub offloaded: u64,
    /// Cascade writes that failed (the block stays in host memory).
    pub offload_errors: u64,
    /// Write-through blocks queued now.
    pub offload_queue_depth: u64,
    /// The blob tier, if configured.
    pub blob: Option<BlobStats>,
    /// The writeback to blob, in writeback mode.
    pub writeback: Option<WritebackStats>,
    /// Bytes loads served from host and disk.
    pub served_local_bytes: u64,
    /// Bytes loads served from blob.
    pub served_blob_bytes: u64,
    /// Blob hits copied into a local tier.
    pub blob_promotions: u64,
    /// The throughput reduction to blob: bytes served from local tiers over
    /// all bytes served (0 before anything is served).
    pub throughput_reduction: f64,
}

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
    admission: Arc<Admission>,
    counters: Arc<Counters>,
    queue: Arc<Queue>,
}

/// Write-through jobs queued for disk, bounded by `capacity`.
#[derive(Debug)]
struct Queue {
    capacity: usize,
    queued: Mutex<usize>,
    drained: Condvar,
    /// Keys with a write-through job queued or being written, and how many
    /// jobs each: a removal waits for them, so that a job queued before it
    /// cannot write the block to disk after it (the block would come back).
    in_flight: Mutex<HashMap<BlockKey, u32>>,
    /// Notified when jobs leave `in_flight`.
    written: Condvar,
}

impl Queue {
    /// Waits until no write-through job for `key` is queued or running.
    fn wait_written(&self, key: &BlockKey) {
        let mut f = self.in_flight.lock();
        while f.contains_key(key) {
            self.written.wait(&mut f);
        }
    }
}

struct Job {
    ns: NamespaceId,
    key: BlockKey,
    pin: HostPin,
}

/// The block manager. See the module docs.
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
        let blob = cfg.blob.as_ref().map(BlobConfig::build).transpose()?;
        let wb = match (&blob, &disk) {
            (Some(b), Some(d)) if b.mode() == BlobMode::Writeback => {
                let dcfg = cfg.disk.as_ref().expect("a disk tier was built");
                let wb = Arc::new(Writeback::open_with(&dcfg.dir, dcfg.sync_writes, io.clone(), |k| {
                    d.contains(k)
                })?);
                let keep = wb.clone();
                d.set_retain(Arc::new(move |k| keep.retains(k)))?;
                b.handle()
                    .spawn(writeback::upload_loop(wb.clone(), d.clone(), b.client()));
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
                        .spawn(move || {
                            loop {
                                let Some(jobs) = next_jobs(&rx) else { return };
                                let items: Vec<_> = jobs.iter().map(|j| (j.ns, j.key, j.pin.as_slice())).collect();
                                let results = put_disk_batch(&disk, wb.as_deref(), &items);
                                for (job, r) in jobs.iter().zip(results) {
                                    match r {
                                        Ok(_) => add(&counters.offloaded, 1),
                                        Err(e) => {
                                            add(&counters.offload_errors, 1);
                                            tracing::warn!(key = %job.key, "write-through to disk failed: {e}");
                                        }
                                    }
                                }
                                // The pins go only once their bytes are on disk.
                                drop(items);
                                {
                                    let mut f = queue.in_flight.lock();
                                    for job in &jobs {
                                        if let Some(n) = f.get_mut(&job.key) {
                                            *n -= 1;
                                            if *n == 0 {
                                                f.remove(&job.key);
                                            }
                                        }
                                    }
                                    queue.written.notify_all();
                                }
                                let n = jobs.len();
                                drop(jobs);
                                let mut q = queue.queued.lock();
                                *q -= n;
                                queue.drained.notify_all();
                            }
                        })
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
                admission,
                counters,
                queue,
            }),
            tx,
            workers,
        })
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

    /// The longest present prefix of `keys` and the tier of each block.
    pub fn lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lookup> {
        self.lookup_with(ns, keys, true)
    }

    /// [`BlockManager::lookup`] in the host and disk tiers only (a cluster
    /// asks its peers before blob).
    pub fn lookup_local(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lookup> {
        self.lookup_with(ns, keys, false)
    }

    fn lookup_with(&self, ns: NamespaceId, keys: &[BlockKey], use_blob: bool) -> Result<Lookup> {
        let block = self.block_bytes(ns)? as usize;
        let mut tiers = Vec::new();
        'keys: for k in keys {
            for t in self.tiers() {
                if t.contains(k) {
                    tiers.push(t.kind());
                    continue 'keys;
                }
            }
            break;
        }
        if let Some(blob) = self.shared.blob.as_ref().filter(|_| use_blob)
            && tiers.len() < keys.len()
        {
            let n = blob.present_prefix(ns, &keys[tiers.len()..], block);
            tiers.extend(std::iter::repeat_n(TierKind::Blob, n));
        }
        add(&self.shared.counters.lookups, 1);
        add(&self.shared.counters.lookup_hit_blocks, tiers.len() as u64);
        Ok(Lookup { tiers })
    }

    /// Stores `keys.len()` blocks laid out back to back in `data`.
    ///
    /// Validation happens before anything is written: a wrong size or an
    /// unknown namespace changes nothing. Stores are idempotent; after an
    /// error other than a validation error, some leading blocks may be stored
    /// and the caller retries the whole request.
    pub fn store(&self, ns: NamespaceId, keys: &[BlockKey], data: &[u8]) -> Result<StoreOutcome> {
        let block = self.check(ns, keys, data.len(), "store")?;
        self.store_checked(ns, keys, data, block)
    }

    /// Stores one block of any length from 1 byte up to the namespace's
    /// block size: a checkpoint chunk or manifest (KV blocks use
    /// [`BlockManager::store`]). Same guarantees as `store`.
    pub fn store_one(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<StoreOutcome> {
        let max = self.block_bytes(ns)? as usize;
        if data.is_empty() || data.len() > max {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!(
                    "a block of {} bytes; namespace {ns} holds blocks of 1 to {max} bytes",
                    data.len()
                ),
            ));
        }
        self.store_checked(ns, &[key], data, data.len())
    }

    fn store_checked(&self, ns: NamespaceId, keys: &[BlockKey], data: &[u8], block: usize) -> Result<StoreOutcome> {
        let sh = &self.shared;
        sh.admission.record(keys);
        add(&sh.counters.stores, 1);
        let mut out = StoreOutcome::default();
        let r = match &sh.host {
            Some(host) => self.store_host(host, ns, keys, data, block, &mut out),
            None => self.store_disk(ns, keys, data, block, &mut out),
        };
        add(&sh.counters.stored_blocks, out.stored as u64);
        add(&sh.counters.present_blocks, out.present as u64);
        if let Err(e) = &r
            && e.kind() == ErrorKind::Throttled
        {
            add(&sh.counters.throttled, 1);
        }
        r.map(|()| out)
    }

    fn store_disk(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: &[u8],
        block: usize,
        out: &mut StoreOutcome,
    ) -> Result<()> {
        let disk = self.shared.disk.as_ref().expect("validated: a tier is configured");
        for (k, chunk) in keys.iter().zip(data.chunks_exact(block)) {
            if !self.shared.admission.admits(k) {
                out.not_admitted += 1;
                add(&self.shared.counters.not_admitted, 1);
                continue;
            }
            match put_disk(disk, self.shared.wb.as_deref(), ns, *k, chunk)? {
                Stored::Inserted => out.stored += 1,
                Stored::Present => out.present += 1,
            }
        }
        Ok(())
    }

    fn store_host(
        &self,
        host: &HostTier,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: &[u8],
        block: usize,
        out: &mut StoreOutcome,
    ) -> Result<()> {
        let sh = &self.shared;
        // Write-through: reserve queue room for every block first, so a full
        // queue throttles the request before anything changes.
        let through = match (&self.tx, &sh.disk) {
            (Some(tx), Some(disk)) => {
                let want: Vec<bool> = keys
                    .iter()
                    .map(|k| sh.admission.admits(k) && !host.contains(k) && !disk.contains(k))
                    .collect();
                let n = want.iter().filter(|w| **w).count();
                let mut q = sh.queue.queued.lock();
                if *q + n > sh.queue.capacity {
                    return Err(Error::throttled(format!(
                        "write-through queue holds {} of {} blocks; {n} more do not fit",
                        *q, sh.queue.capacity
                    )));
                }
                *q += n;
                Some((tx, want, n))
            }
            _ => None,
        };
        let mut sent = 0;
        let mut result = Ok(());
        for (i, (k, chunk)) in keys.iter().zip(data.chunks_exact(block)).enumerate() {
            match host.put(ns, *k, chunk) {
                Ok(Stored::Inserted) => out.stored += 1,
                Ok(Stored::Present) => out.present += 1,
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    // Every host block is pinned by readers: transient.
                    result = Err(Error::throttled(format!("host tier: {}", e.message())));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Some((tx, want, _)) = &through
                && want[i]
                && let Some(pin) = host.pin_host(k)
            {
                *sh.queue.in_flight.lock().entry(*k).or_insert(0) += 1;
                tx.send(Job { ns, key: *k, pin })
                    .expect("the offload worker runs while the manager lives");
                sent += 1;
            }
        }
        if let Some((_, _, n)) = through
            && sent < n
        {
            let mut q = sh.queue.queued.lock();
            *q -= n - sent;
            sh.queue.drained.notify_all();
        }
        result
    }

    /// Pins the leading present blocks of `keys`.
    ///
    /// Blocks the local tiers miss are fetched from blob (downloaded and
    /// verified) into the lease.
    pub fn lease(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lease> {
        let block = self.block_bytes(ns)? as usize;
        self.lease_sized(ns, keys, Expect::Exact(block), true)
    }

    fn lease_sized(&self, ns: NamespaceId, keys: &[BlockKey], block: Expect, use_blob: bool) -> Result<Lease> {
        let mut blocks = Vec::new();
        let mut foreign = false;
        'keys: for k in keys {
            for t in self.tiers() {
                if let Some(p) = t.pin(k) {
                    if p.namespace() != ns {
                        // Keys are rooted in their namespace, so this takes a
                        // 128-bit collision; refuse it all the same.
                        foreign = true;
                        break 'keys;
                    }
                    blocks.push((*k, t.kind(), p));
                    continue 'keys;
                }
            }
            break;
        }
        if let Some(blob) = self.shared.blob.as_ref().filter(|_| use_blob)
            && !foreign
            && blocks.len() < keys.len()
        {
            let rest = &keys[blocks.len()..];
            for (k, b) in rest.iter().zip(blob.fetch_prefix(ns, rest, block)) {
                blocks.push((*k, TierKind::Blob, Box::new(b) as Pin));
            }
        }
        Ok(Lease { ns, blocks })
    }

    /// Copies the leased blocks into `out` (back to back, exactly
    /// `lease.len()` blocks) and promotes disk hits into the host tier.
    pub fn load_leased(&self, lease: &Lease, out: &mut [u8]) -> Result<LoadOutcome> {
        let keys: Vec<BlockKey> = lease.blocks.iter().map(|b| b.0).collect();
        let block = self.check(lease.ns, &keys, out.len(), "load")?;
        let sh = &self.shared;
        add(&sh.counters.loads, 1);
        let mut res = LoadOutcome::default();
        let chunks: Vec<&mut [u8]> = out.chunks_exact_mut(block).collect();
        let disk_blocks = lease.blocks.iter().filter(|b| b.1 == TierKind::Disk).count();
        if disk_blocks >= 2 {
            // Verify block i while block i+1 is read: the device is busy
            // while the CPU hashes, instead of idle.
            std::thread::scope(|s| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, &mut [u8], Result<()>)>(1);
                let blocks = &lease.blocks;
                s.spawn(move || {
                    for (i, ((_, _, pin), chunk)) in blocks.iter().zip(chunks).enumerate() {
                        let r = pin.read_unverified(chunk);
                        let failed = r.is_err();
                        if tx.send((i, chunk, r)).is_err() || failed {
                            break;
                        }
                    }
                });
                for (i, chunk, r) in rx {
                    let (key, tier, pin) = &lease.blocks[i];
                    let r = r.and_then(|()| pin.verify(chunk));
                    if !self.finish_block(lease.ns, i, *key, *tier, chunk, r, &mut res) {
                        // Dropping the receiver stops the reader.
                        break;
                    }
                }
            });
        } else {
            for (i, ((key, tier, pin), chunk)) in lease.blocks.iter().zip(chunks).enumerate() {
                let r = pin.read_into(chunk);
                if !self.finish_block(lease.ns, i, *key, *tier, chunk, r, &mut res) {
                    break;
                }
            }
        }
        add(&sh.counters.loaded_blocks, res.loaded as u64);
        Ok(res)
    }

    /// Accounts one block of a load; false stops the load.
    #[allow(clippy::too_many_arguments)]
    fn finish_block(
        &self,
        ns: NamespaceId,
        i: usize,
        key: BlockKey,
        tier: TierKind,
        chunk: &[u8],
        r: Result<()>,
        res: &mut LoadOutcome,
    ) -> bool {
        let sh = &self.shared;
        if let Err(e) = r {
            add(&sh.counters.load_failures, 1);
            tracing::warn!(%key, "load failed, the engine recomputes: {e}");
            res.failed = Some(LoadFailure {
                index: i,
                kind: e.kind(),
                message: e.to_string(),
            });
            return false;
        }
        TierCounters::add(&self.counters_of(tier).hits, 1);
        res.loaded += 1;
        match tier {
            TierKind::Disk => {
                add(&sh.counters.served_local_bytes, chunk.len() as u64);
                if let Some(h) = &sh.host {
                    TierCounters::add(&h.counters().misses, 1);
                    if sh.cfg.promote_on_hit && h.put(ns, key, chunk).is_ok() {
                        add(&sh.counters.promotions, 1);
                    }
                }
            }
            TierKind::Blob => {
                add(&sh.counters.served_blob_bytes, chunk.len() as u64);
                if sh.cfg.promote_on_hit {
                    // Into the first local tier; a promoted block is in blob
                    // already, so it is not logged for writeback.
                    let put = match (&sh.host, &sh.disk) {
                        (Some(h), _) => Some(h.put(ns, key, chunk)),
                        (None, Some(d)) if sh.admission.admits(&key) => Some(d.put(ns, key, chunk)),
                        _ => None,
                    };
                    match put {
                        Some(Ok(_)) => add(&sh.counters.blob_promotions, 1),
                        Some(Err(e)) => tracing::debug!(%key, "blob hit not promoted: {e}"),
                        None => {}
                    }
                }
            }
            _ => add(&sh.counters.served_local_bytes, chunk.len() as u64),
        }
        true
    }

    fn counters_of(&self, tier: TierKind) -> &TierCounters {
        match tier {
            TierKind::Host => self
                .shared
                .host
                .as_ref()
                .expect("a host block came from the host tier")
                .counters(),
            TierKind::Disk => self
                .shared
                .disk
                .as_ref()
                .expect("a disk block came from the disk tier")
                .counters(),
            TierKind::Blob => self
                .shared
                .blob
                .as_ref()
                .expect("a blob block came from the blob tier")
                .counters(),
        }
    }

    /// Loads the leading present blocks of `keys` into `out`, laid out back
    /// to back (`keys.len()` blocks). Blocks past the present prefix are
    /// misses; a present block that fails verification stops the load and is
    /// reported in [`LoadOutcome::failed`], never served.
    pub fn load(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8]) -> Result<LoadOutcome> {
        self.load_with(ns, keys, out, true)
    }

    /// [`BlockManager::load`] from the host and disk tiers only (a cluster
    /// asks its peers before blob).
    pub fn load_local(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8]) -> Result<LoadOutcome> {
        self.load_with(ns, keys, out, false)
    }

    fn load_with(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8], use_blob: bool) -> Result<LoadOutcome> {
        let block = self.check(ns, keys, out.len(), "load")?;
        let lease = self.lease_sized(ns, keys, Expect::Exact(block), use_blob)?;
        let n = lease.len();
        let res = self.load_leased(&lease, &mut out[..n * block])?;
        let missed = (keys.len() - n) as u64;
        add(&self.shared.counters.missed_blocks, missed);
        if missed > 0 {
            for t in self.tiers() {
                TierCounters::add(&t.counters().misses, 1);
            }
        }
        Ok(res)
    }

    /// Loads one block of any length (see [`BlockManager::store_one`]):
    /// `None` on a miss. Corrupt bytes are an error
    /// ([`ErrorKind::ChecksumMismatch`]), never data.
    pub fn load_one(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<Vec<u8>>> {
        Ok(self.load_one_with(ns, key, true)?.map(|b| b.to_vec()))
    }

    /// [`BlockManager::load_one`] from the host and disk tiers only.
    pub fn load_one_local(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<Vec<u8>>> {
        Ok(self.load_one_with(ns, key, false)?.map(|b| b.to_vec()))
    }

    /// [`BlockManager::load_one`] into a page-aligned buffer, as `Bytes`:
    /// read from the SSD without staging, and ready for an O_DIRECT write
    /// or the network without a copy.
    pub fn load_chunk(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<bytes::Bytes>> {
        self.load_one_with(ns, key, true)
    }

    /// [`BlockManager::load_chunk`] from the host and disk tiers only.
    pub fn load_chunk_local(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<bytes::Bytes>> {
        self.load_one_with(ns, key, false)
    }

    fn load_one_with(&self, ns: NamespaceId, key: BlockKey, use_blob: bool) -> Result<Option<bytes::Bytes>> {
        let max = self.block_bytes(ns)? as usize;
        let lease = self.lease_sized(ns, &[key], Expect::AtMost(max), use_blob)?;
        let sh = &self.shared;
        add(&sh.counters.loads, 1);
        let Some((k, tier, pin)) = lease.blocks.first() else {
            add(&sh.counters.missed_blocks, 1);
            for t in self.tiers() {
                TierCounters::add(&t.counters().misses, 1);
            }
            return Ok(None);
        };
        let len = pin.len();
        let mut buf = crate::buf::AlignedBuf::new(len);
        let out = &mut buf[..len];
        let r = pin.read_into(out);
        let mut res = LoadOutcome::default();
        if self.finish_block(ns, 0, *k, *tier, out, r, &mut res) {
            add(&sh.counters.loaded_blocks, 1);
            return Ok(Some(bytes::Bytes::from_owner(buf).slice(..len)));
        }
        let f = res.failed.expect("a block that did not finish failed");
        Err(Error::new(f.kind, f.message))
    }

    /// Removes `keys` from every tier; answers how many were present. In
    /// writeback mode this includes blob (a cache-only blob tier is never
    /// written, so it keeps them).
    pub fn remove(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<usize> {
        self.block_bytes(ns)?;
        let mut n = 0;
        for k in keys {
            let mut any = false;
            if let Some(wb) = &self.shared.wb {
                wb.cancel(*k);
            }
            self.shared.queue.wait_written(k);
            for t in self.tiers() {
                any |= t.remove(k)?;
            }
            if let Some(blob) = &self.shared.blob
                && blob.mode() == BlobMode::Writeback
            {
                any |= blob.delete(ns, *k)?;
            }
            n += usize::from(any);
        }
        Ok(n)
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

    /// The blob tier, if configured.
    pub fn blob(&self) -> Option<&BlobTier> {
        self.shared.blob.as_ref()
    }

    /// Waits until every queued write-through block is on disk.
    pub fn flush(&self) {
        let q = &self.shared.queue;
        let mut n = q.queued.lock();
        while *n > 0 {
            q.drained.wait(&mut n);
        }
    }

    /// The disk tier, if configured.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.shared.disk.as_ref()
    }

    /// The host tier, if configured.
    pub fn host(&self) -> Option<&HostTier> {
        self.shared.host.as_ref()
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> ManagerStats {
        let sh = &self.shared;
        let c = &sh.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        ManagerStats {
            mode: sh.cfg.mode,
            host: sh.host.as_ref().map(|t| stats_of(t)),
            disk: sh.disk.as_ref().map(|t| stats_of(t)),
            lookups: l(&c.lookups),
            lookup_hit_blocks: l(&c.lookup_hit_blocks),
            stores: l(&c.stores),
            stored_blocks: l(&c.stored_blocks),
            present_blocks: l(&c.present_blocks),
            loads: l(&c.loads),
            loaded_blocks: l(&c.loaded_blocks),
            missed_blocks: l(&c.missed_blocks),
            load_failures: l(&c.load_failures),
            promotions: l(&c.promotions),
            throttled: l(&c.throttled),
            not_admitted: l(&c.not_admitted),
            offloaded: l(&c.offloaded),
            offload_errors: l(&c.offload_errors),
            offload_queue_depth: *sh.queue.queued.lock() as u64,
            blob: sh.blob.as_ref().map(BlobTier::stats),
            writeback: sh.wb.as_ref().map(|w| w.stats()),
            served_local_bytes: l(&c.served_local_bytes),
            served_blob_bytes: l(&c.served_blob_bytes),
            blob_promotions: l(&c.blob_promotions),
            throughput_reduction: {
                let (local, blob) = (l(&c.served_local_bytes), l(&c.served_blob_bytes));
                if local + blob == 0 {
                    0.0
                } else {
                    local as f64 / (local + blob) as f64
                }
            },
        }
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
    }
}

/// The on-eviction cascade: admitted victims not yet on disk are written
/// there before their host memory is reused.
fn demoter(disk: DiskTier, wb: Option<Arc<Writeback>>, admission: Arc<Admission>, counters: Arc<Counters>) -> Demoter {
    Arc::new(move |ns, key, bytes| {
        if disk.contains(&key) {
            return;
        }
        if !admission.admits(&key) {
            add(&counters.not_admitted, 1);
            return;
        }
        match put_disk(&disk, wb.as_deref(), ns, key, bytes) {
            Ok(_) => add(&counters.offloaded, 1),
            Err(e) => {
                add(&counters.offload_errors, 1);
                tracing::warn!(%key, "demotion to disk failed, block dropped from cache: {e}");
            }
        }
    })
}

/// Writes a block to disk; in writeback mode, logs it dirty first and
/// queues its upload once it is on disk.
fn put_disk(disk: &DiskTier, wb: Option<&Writeback>, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<Stored> {
    put_disk_batch(disk, wb, &[(ns, key, data)])
        .pop()
        .expect("one result per block")
}

/// Jobs a write-through worker takes at once, at most: those already
/// queued behind the one it waited for go to disk together (see
/// [`DiskTier::put_batch`]).
const OFFLOAD_BATCH_JOBS: usize = 64;
/// Bytes of blocks a worker takes at once; it stops taking more past this.
const OFFLOAD_BATCH_BYTES: usize = 4 << 20;

/// Waits for a write-through job, then takes those already queued behind
/// it without waiting, up to [`OFFLOAD_BATCH_JOBS`] or
/// [`OFFLOAD_BATCH_BYTES`]. `None` once the queue is closed and empty.
fn next_jobs(rx: &Mutex<Receiver<Job>>) -> Option<Vec<Job>> {
    let rx = rx.lock();
    let first = rx.recv().ok()?;
    let mut bytes = first.pin.as_slice().len();
    let mut jobs = vec![first];
    while jobs.len() < OFFLOAD_BATCH_JOBS && bytes < OFFLOAD_BATCH_BYTES {
        match rx.try_recv() {
            Ok(j) => {
                bytes += j.pin.as_slice().len();
                jobs.push(j);
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// [`put_disk`] for several blocks, packed into shared disk writes. In
/// writeback mode each block is logged dirty before the write and queued
/// for upload once it is on disk, as one by one.
fn put_disk_batch(
    disk: &DiskTier,
    wb: Option<&Writeback>,
    items: &[(NamespaceId, BlockKey, &[u8])],
) -> Vec<Result<Stored>> {
    let Some(wb) = wb else {
        return disk.put_batch(items);
    };
    let mut out: Vec<Option<Result<Stored>>> = items.iter().map(|_| None).collect();
    let mut todo = Vec::with_capacity(items.len());
    let mut seen = HashSet::with_capacity(items.len());
    for (i, &(ns, key, _)) in items.iter().enumerate() {
        // A repeat is answered here, so that a failed first write is never
        // marked ready through it.
        if disk.contains(&key) || !seen.insert(key) {
            out[i] = Some(Ok(Stored::Present));
            continue;
        }
        match wb.begin(ns, key) {
            Ok(()) => todo.push(i),
            Err(e) => out[i] = Some(Err(e)),
        }
    }
    let batch: Vec<_> = todo.iter().map(|&i| items[i]).collect();
    for (&i, r) in todo.iter().zip(disk.put_batch(&batch)) {
        let (ns, key, _) = items[i];
        out[i] = Some(match r {
            Ok(s) => wb.ready(ns, key).map(|()| s),
            Err(e) => {
                wb.abort(key);
                Err(e)
            }
        });
    }
    out.into_iter().map(|r| r.expect("every block is answered")).collect()
}

#[cfg(test)]
mod tests;
