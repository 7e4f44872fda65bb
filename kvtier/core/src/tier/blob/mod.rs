//! The Azure Blob tier (G4), on `object_store`'s Azure client.
//!
//! - [`object`]: object names (hash-spread) and contents (a verified record).
//! - [`container`]: creating a container with one Shared Key-signed call,
//!   which `object_store` cannot do.
//! - `limit`: the upload rate limit.
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

pub mod container;
mod limit;
pub mod object;

use bytes::Bytes;
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use self::limit::RateLimit;
use self::object::{Expect, OBJECT_OVERHEAD_BYTES, object_path};
use super::{PinnedBlock, Stored, TierCounters, TierKind, TierStats, Usage};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};

/// Whether kvtier writes to the blob tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobMode {
    /// Blocks are read from blob (and promoted) but never written: the
    /// container is filled by someone else, e.g. a node in writeback mode.
    #[default]
    CacheOnly,
    /// Blocks that reach the SSD are uploaded lazily from a durable dirty
    /// log; a restart resumes pending uploads.
    Writeback,
}

/// How kvtier authenticates to the storage account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    /// Whatever the `AZURE_*` environment provides, in `object_store`'s
    /// order (bearer token, access key, workload identity, client secret,
    /// SAS, Azure CLI), else the VM's managed identity.
    #[default]
    Auto,
    /// Shared Key: `access_key`, or `AZURE_STORAGE_ACCOUNT_KEY`.
    AccessKey,
    /// A SAS token: `sas_token`, or `AZURE_STORAGE_SAS_TOKEN`.
    Sas,
    /// The managed identity of the VM or node (IMDS); `client_id` picks a
    /// user-assigned one.
    ManagedIdentity,
    /// AKS workload identity: `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE`, as the AKS webhook sets them.
    WorkloadIdentity,
}

/// A secret string: serialized as is, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Configuration of the blob tier: the `[blob]` table users write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobConfig {
    /// Storage account name.
    pub account: String,
    /// Container (3 to 63 lowercase letters, digits and hyphens).
    pub container: String,
    /// Prefix for every object name (e.g. `kv/prod/`); empty for none.
    #[serde(default)]
    pub prefix: String,
    /// Blob service URL; default `https://{account}.blob.core.windows.net`.
    /// Azurite: `http://127.0.0.1:10000/devstoreaccount1`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `cache-only` (default) or `writeback`.
    #[serde(default)]
    pub mode: BlobMode,
    /// How to authenticate.
    #[serde(default)]
    pub credential: Credential,
    /// Shared Key (prefer `AZURE_STORAGE_ACCOUNT_KEY` to a file).
    #[serde(default)]
    pub access_key: Option<Secret>,
    /// SAS token (prefer `AZURE_STORAGE_SAS_TOKEN` to a file).
    #[serde(default)]
    pub sas_token: Option<Secret>,
    /// Client id of a user-assigned managed identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Create the container at startup if missing (needs a Shared Key).
    #[serde(default)]
    pub create_container: bool,
    /// Uploads in flight at most.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// Downloads and HEADs in flight at most.
    #[serde(default = "default_download_concurrency")]
    pub download_concurrency: usize,
    /// Upload requests per second at most; 0 for no limit.
    #[serde(default)]
    pub max_uploads_per_s: u32,
    /// Upload bytes per second at most; 0 for no limit.
    #[serde(default)]
    pub max_upload_bytes_per_s: u64,
    /// Retries of one request inside the HTTP client (transient errors).
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Time limit of one request, retries included.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time limit to connect.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First wait before a failed writeback upload is tried again; doubles
    /// per failure up to `retry_max_backoff_ms`.
    #[serde(default = "default_retry_min_backoff_ms")]
    pub retry_min_backoff_ms: u64,
    /// Longest wait between tries of a failed writeback upload.
    #[serde(default = "default_retry_max_backoff_ms")]
    pub retry_max_backoff_ms: u64,
    /// After a read fails for a reason other than a missing object, reads
    /// skip the blob tier (answer miss) for this long.
    #[serde(default = "default_unavailable_backoff_ms")]
    pub unavailable_backoff_ms: u64,
    /// Keys remembered as present in blob, sparing a HEAD on lookup.
    #[serde(default = "default_known_keys")]
    pub known_keys: usize,
}

fn default_upload_concurrency() -> usize {
    16
}
fn default_download_concurrency() -> usize {
    32
}
fn default_max_retries() -> usize {
    3
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_retry_min_backoff_ms() -> u64 {
    200
}
fn default_retry_max_backoff_ms() -> u64 {
    30_000
}
fn default_unavailable_backoff_ms() -> u64 {
    1_000
}
fn default_known_keys() -> usize {
    1 << 20
}

impl BlobConfig {
    /// A cache-only tier of `container` in `account`, other settings default.
    pub fn new(account: impl Into<String>, container: impl Into<String>) -> Self {
        let mut c: Self = toml::from_str("account = \"\"\ncontainer = \"\"").expect("every other field has a default");
        c.account = account.into();
        c.container = container.into();
        c
    }

    /// The blob service URL.
    pub fn endpoint_url(&self) -> String {
        match &self.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://{}.blob.core.windows.net", self.account),
        }
    }

    /// `prefix`, ending in `/` unless empty.
    fn prefix(&self) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() { String::new() } else { format!("{p}/") }
    }

    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<()> {
        if self.account.is_empty()
            || !self
                .account
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Error::config(format!(
                "blob.account {:?}: lowercase letters and digits",
                self.account
            )));
        }
        if !(3..=63).contains(&self.container.len())
            || !self
                .container
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::config(format!(
                "blob.container {:?}: 3 to 63 lowercase letters, digits and hyphens",
                self.container
            )));
        }
        let p = self.prefix.trim_matches('/');
        if !p.is_empty()
            && (p.split('/').any(|s| s.is_empty() || s == "." || s == "..")
                || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
        {
            return Err(Error::config(format!(
                "blob.prefix {:?}: path segments of letters, digits, '-', '_' and '.'",
                self.prefix
            )));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err(Error::config(format!(
                "blob.endpoint {e:?}: an http:// or https:// URL"
            )));
        }
        let positive = [
            ("upload_concurrency", self.upload_concurrency as u64),
            ("download_concurrency", self.download_concurrency as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("retry_min_backoff_ms", self.retry_min_backoff_ms),
            ("known_keys", self.known_keys as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::config(format!("blob.{name} must be > 0")));
            }
        }
        if self.retry_max_backoff_ms < self.retry_min_backoff_ms {
            return Err(Error::config(
                "blob.retry_max_backoff_ms must be >= retry_min_backoff_ms",
            ));
        }
        Ok(())
    }

    /// The Shared Key, from the file or `AZURE_STORAGE_ACCOUNT_KEY`.
    fn access_key(&self) -> Option<String> {
        self.access_key
            .as_ref()
            .map(|s| s.0.clone())
            .or_else(|| std::env::var("AZURE_STORAGE_ACCOUNT_KEY").ok())
            .or_else(|| std::env::var("AZURE_STORAGE_ACCESS_KEY").ok())
    }

    fn store(&self) -> Result<MicrosoftAzure> {
        let endpoint = self.endpoint_url();
        let mut b = match self.credential {
            Credential::Auto => MicrosoftAzureBuilder::from_env(),
            _ => MicrosoftAzureBuilder::new(),
        };
        b = b
            .with_account(&self.account)
            .with_container_name(&self.container)
            .with_retry(RetryConfig {
                max_retries: self.max_retries,
                retry_timeout: Duration::from_millis(self.request_timeout_ms),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_millis(self.request_timeout_ms))
                    .with_connect_timeout(Duration::from_millis(self.connect_timeout_ms))
                    .with_allow_http(endpoint.starts_with("http://")),
            );
        if self.endpoint.is_some() {
            b = b.with_endpoint(endpoint.clone());
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let missing = |what: &str| Error::config(format!("blob.credential = {:?} needs {what}", self.credential));
        match self.credential {
            Credential::Auto => {
                if let Some(k) = &self.access_key {
                    b = b.with_access_key(&k.0);
                }
                if let Some(s) = &self.sas_token {
                    b = b.with_config(AzureConfigKey::SasKey, &s.0);
                }
                if let Some(c) = &self.client_id {
                    b = b.with_client_id(c);
                }
            }
            Credential::AccessKey => {
                let k = self
                    .access_key()
                    .ok_or_else(|| missing("access_key or AZURE_STORAGE_ACCOUNT_KEY"))?;
                b = b.with_access_key(k);
            }
            Credential::Sas => {
                let s = self
                    .sas_token
                    .as_ref()
                    .map(|s| s.0.clone())
                    .or_else(|| env("AZURE_STORAGE_SAS_TOKEN"))
                    .ok_or_else(|| missing("sas_token or AZURE_STORAGE_SAS_TOKEN"))?;
                b = b.with_config(AzureConfigKey::SasKey, s.trim_start_matches('?'));
            }
            Credential::ManagedIdentity => {
                if let Some(c) = &self.client_id {
                    b = b.with_client_id(c);
                }
                if let Some(e) = env("IDENTITY_ENDPOINT").or_else(|| env("MSI_ENDPOINT")) {
                    b = b.with_msi_endpoint(e);
                }
            }
            Credential::WorkloadIdentity => {
                let client = self
                    .client_id
                    .clone()
                    .or_else(|| env("AZURE_CLIENT_ID"))
                    .ok_or_else(|| missing("AZURE_CLIENT_ID (or client_id)"))?;
                let tenant = env("AZURE_TENANT_ID").ok_or_else(|| missing("AZURE_TENANT_ID"))?;
                let file = env("AZURE_FEDERATED_TOKEN_FILE").ok_or_else(|| missing("AZURE_FEDERATED_TOKEN_FILE"))?;
                b = b
                    .with_client_id(client)
                    .with_tenant_id(tenant)
                    .with_federated_token_file(file);
                if let Some(h) = env("AZURE_AUTHORITY_HOST") {
                    b = b.with_authority_host(h);
                }
            }
        }
        b.build()
            .map_err(|e| Error::config(format!("blob tier for account {}: {e}", self.account)))
    }

    /// Connects: creates the container if asked, then checks that it exists
    /// and that the credentials are accepted (one List request).
    pub fn build(&self) -> Result<BlobTier> {
        BlobTier::open(self)
    }
}

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

/// The text of an error and its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !msg.contains(&s_text) {
            msg.push_str(": ");
            msg.push_str(&s_text);
        }
        src = s.source();
    }
    msg
}

/// Whether an error's text says the service refused the credentials: a
/// 403 status (object_store writes "status code: 403 Forbidden") or
/// Azure's error codes for it. Never a bare "403", which a duration such
/// as `401.25403ms` in the same text contains.
fn refused_credentials(text: &str) -> bool {
    text.contains("status code: 403") || text.contains("AuthenticationFailed") || text.contains("AuthorizationFailure")
}

/// Maps an `object_store` error, in one place.
fn map_err(cfg: &BlobConfig, what: &str, e: object_store::Error) -> Error {
    let text = chain(&e);
    match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            Error::config(format!(
                "blob account {} container {}: the credentials were refused ({what}): {text}",
                cfg.account, cfg.container
            ))
        }
        _ => Error::new(ErrorKind::Io, format!("blob {what}: {text}")),
    }
}

impl BlobTier {
    /// Opens the tier: see [`BlobConfig::build`].
    pub fn open(cfg: &BlobConfig) -> Result<Self> {
        cfg.validate()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvtier-blob")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the blob runtime", e))?;
        let store = cfg.store()?;
        let known = NonZeroUsize::new(cfg.known_keys).expect("validated: known_keys > 0");
        let tier = Self {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                prefix: cfg.prefix(),
                store: Arc::new(store),
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

impl Inner {
    async fn put(&self, ns: NamespaceId, key: BlockKey, mut body: Vec<u8>) -> Result<Stored> {
        let (head, data) = body.split_at_mut(OBJECT_OVERHEAD_BYTES);
        object::encode_header(ns, key, data, head);
        let len = body.len() as u64;
        self.upload_limit.acquire(len).await;
        let _permit = self.uploads.acquire().await.expect("never closed");
        add(&self.req.put, 1);
        let path = object_path(&self.prefix, ns, key);
        match self
            .store
            .put_opts(&path, PutPayload::from(body), PutMode::Create.into())
            .await
        {
            Ok(_) => {
                TierCounters::add(&self.counters.bytes_written, len);
                add(&self.uploaded_bytes, len);
                self.known.lock().put(key, ());
                Ok(Stored::Inserted)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                add(&self.req.already_present, 1);
                self.known.lock().put(key, ());
                Ok(Stored::Present)
            }
            Err(e) => {
                add(&self.req.errors, 1);
                Err(map_err(&self.cfg, &format!("upload of {key}"), e))
            }
        }
    }

    async fn delete(&self, ns: NamespaceId, key: BlockKey) -> Result<bool> {
        self.known.lock().pop(&key);
        add(&self.req.delete, 1);
        let path = object_path(&self.prefix, ns, key);
        match self.store.delete(&path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => {
                add(&self.req.errors, 1);
                Err(map_err(&self.cfg, &format!("delete of {key}"), e))
            }
        }
    }
}

impl Inner {
    /// The startup check: create the container if asked, then one List.
    async fn check(&self) -> Result<()> {
        let cfg = &self.cfg;
        let limit = Duration::from_millis(cfg.connect_timeout_ms + cfg.request_timeout_ms);
        let endpoint = cfg.endpoint_url();
        if cfg.create_container {
            let key = cfg.access_key().ok_or_else(|| {
                Error::config("blob.create_container needs a Shared Key (access_key or AZURE_STORAGE_ACCOUNT_KEY)")
            })?;
            let cred = container::SharedKey {
                account: cfg.account.clone(),
                key,
            };
            let made = tokio::time::timeout(limit, container::create_container(&endpoint, &cred, &cfg.container))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Io,
                        format!("blob endpoint {endpoint} unreachable: no answer within {limit:?}"),
                    )
                })??;
            if made {
                tracing::info!(container = %cfg.container, "blob container created");
            }
        }
        add(&self.req.list, 1);
        let probe = object_store::path::Path::from(format!("{}kvtier-probe", self.prefix));
        let listed = tokio::time::timeout(limit, self.store.list_with_delimiter(Some(&probe)))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Io,
                    format!("blob endpoint {endpoint} unreachable: no answer within {limit:?}"),
                )
            })?;
        match listed {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::config(format!(
                "blob container {} does not exist in account {} at {endpoint} (create it, or set create_container = true)",
                cfg.container, cfg.account
            ))),
            Err(e @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. })) => {
                Err(map_err(cfg, "listing the container", e))
            }
            Err(e) => {
                let text = chain(&e);
                if text.contains("ContainerNotFound") {
                    Err(Error::config(format!(
                        "blob container {} does not exist in account {} at {endpoint} (create it, or set create_container = true)",
                        cfg.container, cfg.account
                    )))
                } else if refused_credentials(&text) {
                    Err(Error::config(format!(
                        "blob account {} container {}: the credentials were refused: {text}",
                        cfg.account, cfg.container
                    )))
                } else {
                    Err(Error::new(
                        ErrorKind::Io,
                        format!("blob endpoint {endpoint} unreachable or failing: {text}"),
                    ))
                }
            }
        }
    }

    fn is_down(&self) -> bool {
        let mut d = self.down_until.lock();
        match *d {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    fn mark_down(&self, what: &str, e: &object_store::Error) {
        add(&self.req.errors, 1);
        let wait = Duration::from_millis(self.cfg.unavailable_backoff_ms);
        let mut d = self.down_until.lock();
        if d.is_none() {
            tracing::warn!(
                "blob {what} failed; reads skip the blob tier for {wait:?}: {}",
                chain(e)
            );
        }
        *d = Some(Instant::now() + wait);
    }

    fn refuse(&self, key: BlockKey, why: impl std::fmt::Display) {
        TierCounters::add(&self.counters.corrupt, 1);
        self.known.lock().pop(&key);
        tracing::warn!(%key, "blob object refused, counted as a miss: {why}");
    }

    async fn head(self: Arc<Self>, ns: NamespaceId, key: BlockKey, expect: Expect) -> bool {
        let _permit = self.downloads.acquire().await.expect("never closed");
        add(&self.req.head, 1);
        match self.store.head(&object_path(&self.prefix, ns, key)).await {
            Ok(meta)
                if (meta.size as usize)
                    .checked_sub(OBJECT_OVERHEAD_BYTES)
                    .is_some_and(|n| expect.fits(n)) =>
            {
                self.known.lock().put(key, ());
                true
            }
            Ok(meta) => {
                self.refuse(
                    key,
                    format_args!("object is {} bytes, expected {expect:?} plus a header", meta.size),
                );
                false
            }
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => {
                self.mark_down("HEAD", &e);
                false
            }
        }
    }

    async fn present_prefix(self: Arc<Self>, ns: NamespaceId, keys: Vec<BlockKey>, block_bytes: Expect) -> usize {
        let mut n = 0;
        let mut window = 1;
        while n < keys.len() {
            if self.is_down() {
                add(&self.req.skipped_unavailable, 1);
                break;
            }
            let end = (n + window).min(keys.len());
            let mut tasks = Vec::with_capacity(end - n);
            for &k in &keys[n..end] {
                if self.known.lock().get(&k).is_some() {
                    tasks.push(None);
                } else {
                    tasks.push(Some(tokio::spawn(self.clone().head(ns, k, block_bytes))));
                }
            }
            let mut present = 0;
            let mut all = true;
            for t in tasks {
                let hit = match t {
                    None => true,
                    Some(t) => t.await.unwrap_or(false),
                };
                // Every task is awaited; only the leading hits count.
                if all && hit {
                    present += 1;
                } else {
                    all = false;
                }
            }
            n += present;
            if !all {
                break;
            }
            window = (window * 4).min(self.cfg.download_concurrency);
        }
        n
    }

    async fn get(self: Arc<Self>, ns: NamespaceId, key: BlockKey, block_bytes: Expect) -> Option<Bytes> {
        let _permit = self.downloads.acquire().await.expect("never closed");
        add(&self.req.get, 1);
        let path = object_path(&self.prefix, ns, key);
        let got = match self.store.get(&path).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                self.known.lock().pop(&key);
                return None;
            }
            Err(e) => {
                self.mark_down("GET", &e);
                return None;
            }
        };
        TierCounters::add(&self.counters.bytes_read, bytes.len() as u64);
        // Verifying 2 MiB takes about 70 µs: fine on a runtime worker.
        match object::verify(ns, key, block_bytes, &bytes) {
            Ok(off) => {
                self.known.lock().put(key, ());
                Some(bytes.slice(off..))
            }
            Err(why) => {
                self.refuse(key, why);
                None
            }
        }
    }

    async fn fetch_prefix(
        self: Arc<Self>,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        block_bytes: Expect,
    ) -> Vec<BlobBlock> {
        let mut out = Vec::new();
        for window in keys.chunks(self.cfg.download_concurrency) {
            if self.is_down() {
                add(&self.req.skipped_unavailable, 1);
                break;
            }
            let tasks: Vec<_> = window
                .iter()
                .map(|&k| tokio::spawn(self.clone().get(ns, k, block_bytes)))
                .collect();
            let mut all = true;
            for t in tasks {
                match t.await.ok().flatten() {
                    Some(data) if all => out.push(BlobBlock { ns, data }),
                    _ => all = false,
                }
            }
            if !all {
                break;
            }
        }
        let misses = u64::from(out.len() < keys.len());
        TierCounters::add(&self.counters.misses, misses);
        out
    }
}

/// A block downloaded and verified, held in memory.
#[derive(Debug)]
pub struct BlobBlock {
    ns: NamespaceId,
    data: Bytes,
}

impl BlobBlock {
    /// The block's bytes (verified).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl PinnedBlock for BlobBlock {
    fn namespace(&self) -> NamespaceId {
        self.ns
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn read_unverified(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.data.len() {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!("blob block is {} bytes, the buffer {}", self.data.len(), out.len()),
            ));
        }
        out.copy_from_slice(&self.data);
        Ok(())
    }
}

#[cfg(feature = "azurite")]
pub mod azurite;

#[cfg(test)]
mod refusal_tests {
    use super::refused_credentials;

    #[test]
    fn a_refusal_is_read_from_the_status_not_from_any_digits() {
        // What a connection refused at startup printed once: its duration
        // holds "403", and it was taken for refused credentials.
        let unreachable = "Generic MicrosoftAzure error: Error performing GET http://127.0.0.1:1/devstoreaccount1/c?restype=container in 401.258403ms, after 3 retries, max_retries: 3, retry_timeout: 30s  - HTTP error: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)";
        assert!(!refused_credentials(unreachable));
        assert!(refused_credentials(
            "Error performing GET http://h/c in 2.1ms - Server returned non-2xx status code: 403 Forbidden: "
        ));
        assert!(refused_credentials(
            "Server returned error response: <Error><Code>AuthenticationFailed</Code></Error>"
        ));
        assert!(!refused_credentials(
            "Server returned non-2xx status code: 404 Not Found: ContainerNotFound"
        ));
    }
}
