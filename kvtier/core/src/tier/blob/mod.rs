//! The Azure Blob tier (G4), on `object_store`'s Azure client.
//!
//! - [`config`]: [`BlobConfig`], what users write, and the Azure client it builds.
//! - [`object`]: object names (hash-spread) and contents (a verified record).
//! - `io`: the requests: conditional uploads, deletes, verified reads in
//!   windows, the startup check.
//! - `error`: `object_store` errors mapped to kinds, in one place.
//! - [`container`]: creating a container with one Shared Key-signed call,
//!   which `object_store` cannot do.
//! - `limit`: the upload rate limit.
//!
//! The tier's logic runs over any [`ObjectStore`] ([`BlobTier::with_store`]):
//! Azure in production, `object_store::memory::InMemory` in unit tests.
//!
//! The blob tier is not a [`crate::Tier`]: it has no capacity to manage and
//! nothing to evict, and every call is a network request that needs the
//! block's namespace to name its object. The [`crate::BlockManager`] asks
//! it for the part of a prefix the local tiers miss, in windows of
//! concurrent requests, and promotes what it reads into a local tier.
//!
//! Calls are synchronous for the manager's callers and run on the tier's own
//! small tokio runtime, so they work from any thread, async runtime or not.
//!
//! Integrity: uploads are conditional creates (`If-None-Match: *`), so a
//! block is written once however often it is offered; reads check the
//! object's size, header and checksum, and a mismatch is a counted miss.

pub mod config;
pub mod container;
mod error;
mod io;
mod limit;
pub mod object;

use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use serde::Serialize;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub use self::config::{BlobConfig, BlobMode, Credential, Secret};
pub use self::io::BlobBlock;

use self::error::map_err;
use self::limit::RateLimit;
use self::object::{Expect, OBJECT_OVERHEAD_BYTES, object_path};
use super::{Stored, TierCounters, TierKind, TierStats, Usage};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};

/// Request counters of the blob tier.
#[derive(Debug, Default)]
struct Requests {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
    errors: AtomicU64,
    already_present: AtomicU64,
    skipped_unavailable: AtomicU64,
}

/// A snapshot of the blob tier's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BlobStats {
    /// Hits, misses, bytes up (`bytes_written`) and down (`bytes_read`),
    /// corrupt objects refused.
    pub tier: TierStats,
    /// The mode running.
    pub mode: BlobMode,
    /// PUT requests (uploads).
    pub put_requests: u64,
    /// GET requests (downloads).
    pub get_requests: u64,
    /// HEAD requests (lookups of blocks not known to be present).
    pub head_requests: u64,
    /// DELETE requests.
    pub delete_requests: u64,
    /// LIST requests (the startup check).
    pub list_requests: u64,
    /// Requests that failed (other than a missing object or one present).
    pub request_errors: u64,
    /// Uploads the service refused because the object existed: the block
    /// was uploaded once already.
    pub already_present: u64,
    /// Reads answered as misses without a request, while the service was
    /// failing.
    pub skipped_unavailable: u64,
    /// Seconds since the tier opened (to turn counts into rates).
    pub uptime_s: f64,
}

struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        // Dropping a runtime blocks; this may run inside another runtime.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Inner {
    cfg: BlobConfig,
    prefix: String,
    store: Arc<dyn ObjectStore>,
    counters: TierCounters,
    req: Requests,
    known: Mutex<lru::LruCache<BlockKey, ()>>,
    down_until: Mutex<Option<Instant>>,
    upload_limit: RateLimit,
    uploads: Semaphore,
    downloads: Semaphore,
    uploaded_bytes: AtomicU64,
    opened: Instant,
}

/// The blob tier. Cheap to clone: clones share the client and runtime.
#[derive(Clone)]
pub struct BlobTier {
    inner: Arc<Inner>,
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for BlobTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobTier")
            .field("account", &self.inner.cfg.account)
            .field("container", &self.inner.cfg.container)
            .field("prefix", &self.inner.prefix)
            .field("mode", &self.inner.cfg.mode)
            .finish()
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl BlobTier {
    /// Opens the tier: see [`BlobConfig::build`].
    pub fn open(cfg: &BlobConfig) -> Result<Self> {
        cfg.validate()?;
        let store = cfg.store()?;
        Self::start(cfg, Arc::new(store))
    }

    /// A tier over any object store, for the parts of `cfg` that are not
    /// about Azure: the prefix, the mode, concurrency, rate limits,
    /// backoffs and the known-keys cache. The account and container name
    /// only the log lines; `create_container` is not done (the store is
    /// what it is). Runs the startup check (one List) like
    /// [`BlobTier::open`].
    pub fn with_store(cfg: &BlobConfig, store: Arc<dyn ObjectStore>) -> Result<Self> {
        cfg.validate()?;
        let cfg = BlobConfig {
            create_container: false,
            ..cfg.clone()
        };
        Self::start(&cfg, store)
    }

    fn start(cfg: &BlobConfig, store: Arc<dyn ObjectStore>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvtier-blob")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the blob runtime", e))?;
        let known = NonZeroUsize::new(cfg.known_keys).expect("validated: known_keys > 0");
        let tier = Self {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                prefix: cfg.prefix(),
                store,
                counters: TierCounters::default(),
                req: Requests::default(),
                known: Mutex::new(lru::LruCache::new(known)),
                down_until: Mutex::new(None),
                upload_limit: RateLimit::new(cfg.max_uploads_per_s, cfg.max_upload_bytes_per_s),
                uploads: Semaphore::new(cfg.upload_concurrency),
                downloads: Semaphore::new(cfg.download_concurrency),
                uploaded_bytes: AtomicU64::new(0),
                opened: Instant::now(),
            }),
            rt: Arc::new(Runtime(Some(rt))),
        };
        let inner = tier.inner.clone();
        tier.run(async move { inner.check().await })?;
        tracing::info!(
            account = %cfg.account, container = %cfg.container, prefix = %tier.inner.prefix,
            endpoint = %cfg.endpoint_url(), mode = ?cfg.mode, "blob tier open"
        );
        Ok(tier)
    }

    /// Runs `f` on the tier's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.rt.0.as_ref().expect("the runtime lives until the tier drops");
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv()
            .map_err(|_| Error::new(ErrorKind::Closed, "the blob tier is shutting down"))?
    }

    /// A handle to the tier's runtime, for background work (writeback).
    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.rt.0.as_ref().expect("the runtime lives").handle().clone()
    }

    /// The mode configured.
    pub fn mode(&self) -> BlobMode {
        self.inner.cfg.mode
    }

    /// The object name of a block (see [`object`]).
    pub fn object_name(&self, ns: NamespaceId, key: BlockKey) -> String {
        object::object_name(&self.inner.prefix, ns, key)
    }

    /// The tier's counters (hits are counted by the manager).
    pub fn counters(&self) -> &TierCounters {
        &self.inner.counters
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> BlobStats {
        let i = &self.inner;
        let l = |a: &AtomicU64| a.load(Relaxed);
        BlobStats {
            tier: i.counters.snapshot(
                TierKind::Blob,
                Usage {
                    used_bytes: l(&i.uploaded_bytes),
                    capacity_bytes: u64::MAX,
                    blocks: l(&i.req.put) - l(&i.req.already_present).min(l(&i.req.put)),
                },
            ),
            mode: i.cfg.mode,
            put_requests: l(&i.req.put),
            get_requests: l(&i.req.get),
            head_requests: l(&i.req.head),
            delete_requests: l(&i.req.delete),
            list_requests: l(&i.req.list),
            request_errors: l(&i.req.errors),
            already_present: l(&i.req.already_present),
            skipped_unavailable: l(&i.req.skipped_unavailable),
            uptime_s: i.opened.elapsed().as_secs_f64(),
        }
    }

    /// How many leading `keys` are in blob as blocks of `block_bytes`:
    /// HEAD requests in growing windows (1, 4, 16, ... up to
    /// `download_concurrency`), stopping at the first window with a miss.
    /// Keys known to be present take no request. Never an error: a failing
    /// service is a miss.
    pub fn present_prefix(&self, ns: NamespaceId, keys: &[BlockKey], block_bytes: impl Into<Expect>) -> usize {
        let block_bytes = block_bytes.into();
        if keys.is_empty() {
            return 0;
        }
        let inner = self.inner.clone();
        let keys = keys.to_vec();
        self.run(async move { Ok(inner.present_prefix(ns, keys, block_bytes).await) })
            .unwrap_or(0)
    }

    /// Downloads and verifies the leading present `keys`, in windows of
    /// `download_concurrency`, stopping at the first miss or corrupt object.
    pub fn fetch_prefix(&self, ns: NamespaceId, keys: &[BlockKey], block_bytes: impl Into<Expect>) -> Vec<BlobBlock> {
        let block_bytes = block_bytes.into();
        if keys.is_empty() {
            return Vec::new();
        }
        let inner = self.inner.clone();
        let keys = keys.to_vec();
        self.run(async move { Ok(inner.fetch_prefix(ns, keys, block_bytes).await) })
            .unwrap_or_default()
    }

    /// Uploads one block unless its object exists (conditional create).
    pub fn put(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<Stored> {
        let mut body = vec![0u8; OBJECT_OVERHEAD_BYTES + data.len()];
        body[OBJECT_OVERHEAD_BYTES..].copy_from_slice(data);
        let inner = self.inner.clone();
        self.run(async move { inner.put(ns, key, body).await })
    }

    /// Deletes a block's object; answers whether it existed.
    pub fn delete(&self, ns: NamespaceId, key: BlockKey) -> Result<bool> {
        let inner = self.inner.clone();
        self.run(async move { inner.delete(ns, key).await })
    }

    /// The async side, for background work on [`BlobTier::handle`]'s
    /// runtime; it does not keep the runtime alive.
    pub(crate) fn client(&self) -> BlobClient {
        BlobClient(self.inner.clone())
    }
}

/// The blob tier's async calls, for tasks on its runtime.
#[derive(Clone)]
pub(crate) struct BlobClient(Arc<Inner>);

impl BlobClient {
    /// Uploads `body`: [`OBJECT_OVERHEAD_BYTES`] of room, then the block.
    pub(crate) async fn put(&self, ns: NamespaceId, key: BlockKey, body: Vec<u8>) -> Result<Stored> {
        self.0.put(ns, key, body).await
    }

    /// Whether a block's object exists (one HEAD, or none if known).
    pub(crate) async fn exists(&self, ns: NamespaceId, key: BlockKey) -> Result<bool> {
        if self.known_present(&key) {
            return Ok(true);
        }
        add(&self.0.req.head, 1);
        match self.0.store.head(&object_path(&self.0.prefix, ns, key)).await {
            Ok(_) => {
                self.0.known.lock().put(key, ());
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => {
                add(&self.0.req.errors, 1);
                Err(map_err(&self.0.cfg, &format!("HEAD of {key}"), e))
            }
        }
    }

    /// First and longest wait between tries of a failed upload.
    pub(crate) fn backoff(&self) -> (Duration, Duration) {
        let c = &self.0.cfg;
        (
            Duration::from_millis(c.retry_min_backoff_ms),
            Duration::from_millis(c.retry_max_backoff_ms),
        )
    }

    /// Whether `key` is known to be in blob (uploaded or read earlier).
    pub(crate) fn known_present(&self, key: &BlockKey) -> bool {
        self.0.known.lock().contains(key)
    }

    /// Uploads in flight at most.
    pub(crate) fn upload_concurrency(&self) -> usize {
        self.0.cfg.upload_concurrency
    }
}

#[cfg(feature = "azurite")]
pub mod azurite;

#[cfg(test)]
mod tests;
