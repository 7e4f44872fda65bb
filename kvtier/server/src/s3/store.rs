//! Buckets over kvtier: each bucket is a namespace of variable-length
//! blocks plus a [`Catalog`] of names; an object is a list of chunks
//! committed by its catalog record.
//!
//! - **Writes** cut the body into chunks (one for a `blocks` bucket, up to
//!   `chunk_bytes` each for `objects`) stored as blocks under keys drawn
//!   from a random version, so a new write never touches the chunks a
//!   reader of the old version uses. The catalog record commits; the
//!   replaced version's chunks are removed after a grace period.
//! - **Reads** take chunks from the local tiers, then (in a cluster) the
//!   replicas, then blob; each chunk is checked against the length and
//!   xxh3-64 its record names, so a block that is not this chunk is never
//!   served.
//! - **Multipart uploads** keep their parts' chunks and a small durable
//!   record per upload; completing one commits a record made of the
//!   parts' chunks (no copy).

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvtier::fsio::replace_durably;
use kvtier::replication::Replication;
use kvtier::{AlignedBuf, BlockKey, BlockManager, Error, ErrorKind, Namespace, NamespaceId, Result};

use super::catalog::{Catalog, ChunkRef, ObjectMeta};
use super::config::{BucketConfig, BucketKind, CreateBuckets, S3Config, valid_bucket_name};
use crate::cluster::Cluster;
use crate::registry::Registry;
use crate::repair::Repair;

/// Chunks one writer has in flight to the store at once.
const CHUNKS_IN_FLIGHT: usize = 4;
/// How long replaced chunks stay readable for GETs that started before.
const REMOVE_GRACE: Duration = Duration::from_secs(30);
/// Parts of one multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// Smallest part other than the last one.
pub const MIN_PART_BYTES: u64 = 5 << 20;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    u128::from_le_bytes(b)
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Internal, format!("task: {e}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(join_err)?
}

fn parse_key(hex: &str) -> Result<BlockKey> {
    u128::from_str_radix(hex, 16)
        .map(BlockKey)
        .map_err(|_| Error::new(ErrorKind::Internal, format!("catalog chunk key {hex:?} is not hex")))
}

/// One bucket.
#[derive(Debug)]
pub struct Bucket {
    /// Its name.
    pub name: String,
    /// What it holds.
    pub kind: BucketKind,
    /// Whether unsigned requests may use it.
    pub anonymous: bool,
    /// When it was made (configured buckets: when first opened).
    pub created_ms: u64,
    ns: NamespaceId,
    /// Largest chunk (the namespace's block size).
    chunk_bytes: usize,
    /// Largest object.
    pub max_object_bytes: u64,
    catalog: Catalog,
    uploads: Mutex<BTreeMap<String, Upload>>,
    /// Serializes writes of upload records.
    upload_io: tokio::sync::Mutex<()>,
    uploads_dir: PathBuf,
}

impl Bucket {
    /// The object named `name`, per the catalog.
    pub fn head(&self, name: &str) -> Option<ObjectMeta> {
        self.catalog.get(name)
    }

    /// Up to `max` objects after `after` with `prefix`, and whether more
    /// follow.
    pub fn list(&self, prefix: &str, after: Option<&str>, max: usize) -> (Vec<(String, ObjectMeta)>, bool) {
        self.catalog.list(prefix, after, max)
    }

    /// Objects in this node's catalog.
    pub fn objects(&self) -> usize {
        self.catalog.len()
    }
}

/// A multipart upload in progress: what its durable record holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upload {
    /// The upload id.
    pub id: String,
    /// The object it makes.
    pub key: String,
    /// When it started, ms since the Unix epoch.
    pub created_ms: u64,
    /// Headers and metadata the object gets (chunks and sizes unset).
    pub template: ObjectMeta,
    /// The checksum algorithm announced at creation (`x-amz-checksum-algorithm`).
    #[serde(default)]
    pub checksum_algorithm: Option<String>,
    /// Parts uploaded, by number.
    pub parts: BTreeMap<u32, Part>,
}

/// One uploaded part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Its entity tag, without quotes.
    pub etag: String,
    /// Bytes.
    pub size: u64,
    /// When it was uploaded.
    pub modified_ms: u64,
    /// Verified checksums of the part (header name, base64).
    #[serde(default)]
    pub checksums: Vec<(String, String)>,
    /// Its chunks.
    pub chunks: Vec<ChunkRef>,
}

/// Every bucket of a daemon, and the block store under them.
#[derive(Debug)]
pub struct Store {
    manager: Arc<BlockManager>,
    registry: Arc<Registry>,
    cluster: Option<Arc<Cluster>>,
    repair: Arc<Repair>,
    dir: PathBuf,
    cfg: S3Config,
    buckets: RwLock<BTreeMap<String, Arc<Bucket>>>,
    /// Serializes bucket creation.
    creating: tokio::sync::Mutex<()>,
    /// Chunks to remove once no GET that began before can want them.
    graveyard: Mutex<Vec<(std::time::Instant, NamespaceId, Vec<BlockKey>)>>,
}

/// An object's record as a block of its bucket's namespace (clusters):
/// the object, or a tombstone (`meta: None`) after a delete.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    meta: Option<ObjectMeta>,
    /// When it was written: the object's commit time, or the delete's.
    at_ms: u64,
}

/// A bucket made by `CreateBucket`, persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Created {
    name: String,
    kind: BucketKind,
    created_ms: u64,
}

/// What a chunk read found.
#[derive(Debug)]
pub enum ChunkRead {
    /// The chunk's bytes, checked.
    Data(Bytes),
    /// No tier, replica or blob holds it.
    Missing,
}

impl Store {
    /// Opens every configured bucket and every bucket `CreateBucket` made,
    /// under `data_dir/s3`.
    pub async fn open(
        cfg: S3Config,
        manager: Arc<BlockManager>,
        registry: Arc<Registry>,
        cluster: Option<Arc<Cluster>>,
        repair: Arc<Repair>,
        data_dir: &Path,
    ) -> Result<Arc<Self>> {
        let dir = data_dir.join("s3");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let store = Arc::new(Self {
            manager,
            registry,
            cluster,
            repair,
            dir,
            cfg,
            buckets: RwLock::new(BTreeMap::new()),
            creating: tokio::sync::Mutex::new(()),
            graveyard: Mutex::new(Vec::new()),
        });
        for b in store.cfg.buckets.clone() {
            store.open_bucket(&b, None).await?;
        }
        for c in store.read_created()? {
            if store.bucket(&c.name).is_some() {
                continue; // configured now: the configuration wins.
            }
            let b = BucketConfig {
                name: c.name.clone(),
                kind: c.kind,
                anonymous: false,
                replicas: None,
            };
            store.open_bucket(&b, Some(c.created_ms)).await?;
        }
        Ok(store)
    }

    fn created_path(&self) -> PathBuf {
        self.dir.join("buckets.json")
    }

    fn read_created(&self) -> Result<Vec<Created>> {
        let p = self.created_path();
        match std::fs::read(&p) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| Error::new(ErrorKind::Config, format!("{}: {e}", p.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
        }
    }

    /// The namespace of bucket `name`: variable-length blocks of up to
    /// `chunk_bytes`, apart from every model's and checkpoint group's.
    fn namespace(name: &str, kind: BucketKind, chunk_bytes: u32) -> Namespace {
        let mut ns = Namespace::checkpoints(&format!("s3:{}:{name}", kind.name()), chunk_bytes);
        ns.model_id = format!("kvtier:s3:{}:{name}", kind.name());
        ns
    }

    async fn open_bucket(&self, b: &BucketConfig, created_ms: Option<u64>) -> Result<Arc<Bucket>> {
        let (chunk_bytes, max_object_bytes) = match b.kind {
            BucketKind::Blocks => (self.cfg.max_block_object_bytes as u32, self.cfg.max_block_object_bytes),
            BucketKind::Objects => (self.cfg.chunk_bytes, self.cfg.max_object_bytes),
        };
        let ns = Self::namespace(&b.name, b.kind, chunk_bytes);
        let rep = self.cluster.as_ref().map(|c| {
            let r = match (b.kind, b.replicas) {
                (_, Some(r)) => r,
                (BucketKind::Blocks, None) => 1,
                (BucketKind::Objects, None) => 3,
            };
            Replication::strong(r.min(c.size()))
        });
        let reg = self
            .registry
            .register(&ns, rep, true)
            .map_err(|s| kvtier_proto::error::from_status(s).context(format!("bucket {}", b.name)))?;
        if reg.new
            && let Some(c) = &self.cluster
        {
            c.register_everywhere(reg.id).await;
        }
        let bdir = self.dir.join("buckets").join(&b.name);
        let catalog_path = bdir.join("catalog.log");
        let uploads_dir = bdir.join("uploads");
        let (catalog, uploads) = blocking(move || {
            let c = Catalog::open(&catalog_path)?;
            let u = read_uploads(&uploads_dir)?;
            Ok((c, u))
        })
        .await?;
        let created_ms = match created_ms {
            Some(t) => t,
            None => bucket_birth(&bdir),
        };
        let bucket = Arc::new(Bucket {
            name: b.name.clone(),
            kind: b.kind,
            anonymous: b.anonymous,
            created_ms,
            ns: reg.id,
            chunk_bytes: chunk_bytes as usize,
            max_object_bytes,
            catalog,
            uploads: Mutex::new(uploads),
            upload_io: tokio::sync::Mutex::new(()),
            uploads_dir: bdir.join("uploads"),
        });
        self.buckets.write().insert(b.name.clone(), bucket.clone());
        Ok(bucket)
    }

    /// The bucket named `name`.
    pub fn bucket(&self, name: &str) -> Option<Arc<Bucket>> {
        self.buckets.read().get(name).cloned()
    }

    /// Every bucket, by name.
    pub fn buckets(&self) -> Vec<Arc<Bucket>> {
        self.buckets.read().values().cloned().collect()
    }

    /// `CreateBucket`: answers the bucket and whether this call made it.
    pub async fn create_bucket(&self, name: &str) -> Result<(Arc<Bucket>, bool)> {
        let kind = match self.cfg.create_buckets {
            CreateBuckets::Off => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "CreateBucket is off on this kvtierd (s3.create_buckets = \"off\"): declare buckets in [[s3.buckets]]",
                ));
            }
            CreateBuckets::Blocks => BucketKind::Blocks,
            CreateBuckets::Objects => BucketKind::Objects,
        };
        if !valid_bucket_name(name) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("bucket name {name:?}: 3 to 63 lower-case letters, digits, '-' and '.'"),
            ));
        }
        let _g = self.creating.lock().await;
        if let Some(b) = self.bucket(name) {
            return Ok((b, false));
        }
        let created_ms = now_ms();
        let mut all = self.read_created()?;
        all.push(Created {
            name: name.to_string(),
            kind,
            created_ms,
        });
        let text = serde_json::to_vec_pretty(&all).expect("serializes");
        let p = self.created_path();
        blocking(move || replace_durably(&p, &text)).await?;
        let b = BucketConfig {
            name: name.to_string(),
            kind,
            anonymous: false,
            replicas: None,
        };
        Ok((self.open_bucket(&b, Some(created_ms)).await?, true))
    }

    /// A writer of a new version of an object (or part) of `bucket`;
    /// `expected_bytes` sizes its buffers when the length is known.
    pub fn writer(self: &Arc<Self>, bucket: &Arc<Bucket>, expected_bytes: Option<u64>) -> ObjectWriter {
        ObjectWriter {
            store: self.clone(),
            bucket: bucket.clone(),
            version: random_u128(),
            remaining_hint: expected_bytes,
            buf: None,
            filled: 0,
            chunks: Vec::new(),
            size: 0,
            inflight: tokio::task::JoinSet::new(),
            done: Vec::new(),
        }
    }

    /// Stores one chunk: through the cluster's write path in a cluster,
    /// else into the local tiers.
    async fn put_chunk(&self, ns: NamespaceId, key: BlockKey, data: Bytes, max: usize) -> Result<()> {
        match &self.cluster {
            Some(c) => c
                .write(ns, &[key], data, max)
                .await
                .map(|_| ())
                .map_err(kvtier_proto::error::from_status),
            None => {
                let m = self.manager.clone();
                blocking(move || {
                    // Straight to the disk tier (also in `tiered` mode), so a
                    // killed daemon keeps every acknowledged object.
                    let out = m.store_one_durable(ns, key, &data)?;
                    if out.not_admitted > 0 {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            "the disk tier's admission filter kept an S3 chunk out (disk_admission_min_seen > 1)",
                        ));
                    }
                    Ok(())
                })
                .await
            }
        }
    }

    /// The key of an object's record as a block: how a member of a cluster
    /// finds an object written through another member.
    fn meta_key(bucket: &Bucket, name: &str) -> BlockKey {
        BlockKey::from_opaque(bucket.ns, &[b"s3meta\0".as_slice(), name.as_bytes()].concat())
    }

    /// In a cluster, replaces the record block of `name` with `meta`, or
    /// with a tombstone after a delete (so a member whose own catalog still
    /// names the object learns it is gone). Best effort: the catalog of the
    /// member that took the write is its commit point.
    async fn publish(&self, bucket: &Bucket, name: &str, meta: Option<&ObjectMeta>) {
        let Some(c) = &self.cluster else { return };
        let key = Self::meta_key(bucket, name);
        let record = Record {
            name: name.to_string(),
            meta: meta.cloned(),
            at_ms: meta.map_or_else(now_ms, |m| m.modified_ms),
        };
        let body = serde_json::to_vec(&record).expect("serializes");
        if body.len() > bucket.chunk_bytes {
            tracing::warn!(bucket = %bucket.name, name, bytes = body.len(), "S3: an object record too large for one block: other members will not find it");
            return;
        }
        if let Err(e) = c.delete_everywhere(bucket.ns, &[key]).await {
            tracing::debug!(bucket = %bucket.name, name, "S3: an old record block not removed everywhere: {}", e.message());
        }
        if let Err(e) = c.write(bucket.ns, &[key], Bytes::from(body), bucket.chunk_bytes).await {
            tracing::warn!(bucket = %bucket.name, name, "S3: record block not replicated: {}", e.message());
        }
    }

    /// The record block of `name` the cluster holds, if any.
    async fn remote_record(&self, bucket: &Bucket, name: &str) -> Result<Option<Record>> {
        let (ns, key) = (bucket.ns, Self::meta_key(bucket, name));
        // Records are not asked of blob: a missing one is the common case
        // (a name never written), and each would cost a request.
        let Some(body) = self.repair.read_chunk(ns, key, true, false).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Record>(&body) {
            Ok(r) if r.name == name => Ok(Some(r)),
            Ok(r) => Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "bucket {}: the record block of {name:?} names {:?}",
                    bucket.name, r.name
                ),
            )),
            Err(e) => Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "bucket {}: the record block of {name:?} does not parse: {e}",
                    bucket.name
                ),
            )),
        }
    }

    /// The object named `name`: this member's catalog; in a cluster also
    /// the record block its replicas hold, the newer of the two winning (a
    /// tombstone newer than the catalog's object means it was deleted
    /// through another member).
    pub async fn find(&self, bucket: &Arc<Bucket>, name: &str) -> Result<Option<ObjectMeta>> {
        let local = bucket.head(name);
        if self.cluster.is_none() {
            return Ok(local);
        }
        let remote = self.remote_record(bucket, name).await?;
        Ok(match (local, remote) {
            (l, None) => l,
            (None, Some(r)) => r.meta,
            (Some(l), Some(Record { meta: Some(r), .. })) => Some(if r.modified_ms > l.modified_ms { r } else { l }),
            (Some(l), Some(Record { meta: None, at_ms, .. })) => {
                if at_ms >= l.modified_ms {
                    let (b, n, v) = (bucket.clone(), name.to_string(), l.version.clone());
                    let _ = blocking(move || {
                        b.catalog.delete_if(&n, |cur| {
                            if cur.version == v {
                                Ok(())
                            } else {
                                Err(Error::new(ErrorKind::AlreadyExists, "replaced meanwhile"))
                            }
                        })
                    })
                    .await;
                    None
                } else {
                    Some(l)
                }
            }
        })
    }

    /// Reads one chunk of an object, checked against its record.
    pub async fn read_chunk(&self, bucket: &Bucket, c: &ChunkRef) -> Result<ChunkRead> {
        let key = parse_key(&c.key)?;
        // This node, the replicas, blob; a copy that fails verification is
        // skipped and rewritten from the good one (read repair).
        let got = self.repair.read_chunk(bucket.ns, key, true, true).await?;
        let Some(d) = got else {
            return Ok(ChunkRead::Missing);
        };
        if d.len() != c.len as usize || xxhash_rust::xxh3::xxh3_64(&d) != c.xxh {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "bucket {}: chunk {} holds {} bytes that are not the {} bytes its object names",
                    bucket.name,
                    c.key,
                    d.len(),
                    c.len
                ),
            ));
        }
        Ok(ChunkRead::Data(d))
    }

    /// Whether every chunk of `meta` is held somewhere (local tiers, then
    /// the replicas, then blob): what HEAD answers for a cache bucket.
    pub async fn present(&self, bucket: &Bucket, meta: &ObjectMeta) -> Result<bool> {
        let keys: Vec<BlockKey> = meta.chunks.iter().map(|c| parse_key(&c.key)).collect::<Result<_>>()?;
        if keys.is_empty() {
            return Ok(true);
        }
        let ns = bucket.ns;
        let local = self.manager.lookup_local(ns, &keys)?.hit_blocks();
        if local == keys.len() {
            return Ok(true);
        }
        let mut at = local;
        if let Some(c) = &self.cluster {
            // Peers for what misses here, one key at a time (chunks of one
            // object live on different replicas).
            while at < keys.len() {
                if self.manager.lookup_local(ns, &keys[at..at + 1])?.hit_blocks() == 1
                    || c.lookup(ns, &keys[at..at + 1]).await == 1
                {
                    at += 1;
                } else {
                    break;
                }
            }
            if at == keys.len() {
                return Ok(true);
            }
        }
        if self.manager.blob().is_some() {
            let (m, rest) = (self.manager.clone(), keys[at..].to_vec());
            let n = blocking(move || m.lookup(ns, &rest).map(|l| l.hit_blocks())).await?;
            return Ok(at + n == keys.len());
        }
        Ok(false)
    }

    /// Commits `name` as `meta` when `check` accepts the object it
    /// replaces; the replaced version's chunks are removed after a grace
    /// period. On a refusal the new chunks are removed and the catalog is
    /// untouched.
    pub async fn commit(
        &self,
        bucket: &Arc<Bucket>,
        name: &str,
        meta: ObjectMeta,
        check: impl FnOnce(Option<&ObjectMeta>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let (b, n, m) = (bucket.clone(), name.to_string(), meta.clone());
        let r = blocking(move || b.catalog.put_if(&n, m, check)).await;
        match r {
            Ok(old) => {
                self.publish(bucket, name, Some(&meta)).await;
                if let Some(old) = old {
                    self.bury(bucket, &old.chunks, Some(&meta.chunks));
                }
                Ok(())
            }
            Err(e) => {
                self.discard(bucket, &meta.chunks).await;
                Err(e)
            }
        }
    }

    /// Deletes `name` when `check` accepts it; answers whether there was
    /// one.
    pub async fn delete(
        &self,
        bucket: &Arc<Bucket>,
        name: &str,
        check: impl FnOnce(&ObjectMeta) -> Result<()> + Send + 'static,
    ) -> Result<bool> {
        let (b, n) = (bucket.clone(), name.to_string());
        // In a cluster the object may have been written through another
        // member: its record block says so.
        let remote = match &self.cluster {
            Some(_) if bucket.head(name).is_none() => self
                .remote_record(bucket, name)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.meta),
            _ => None,
        };
        let old = blocking(move || b.catalog.delete_if(&n, check)).await?;
        let old = old.or(remote);
        if self.cluster.is_some() {
            // A tombstone, so members whose catalogs name it learn it is gone.
            self.publish(bucket, name, None).await;
        }
        match old {
            Some(old) => {
                self.bury(bucket, &old.chunks, None);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Forgets `name` if it is still `version` (its chunks are gone: an
    /// evicted cache block).
    pub async fn forget(&self, bucket: &Arc<Bucket>, name: &str, version: &str) {
        let v = version.to_string();
        let r = self
            .delete(bucket, name, move |cur| {
                if cur.version == v {
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::AlreadyExists, "replaced meanwhile"))
                }
            })
            .await;
        if let Err(e) = r
            && e.kind() != ErrorKind::AlreadyExists
        {
            tracing::debug!(bucket = %bucket.name, name, "S3: a lost object not forgotten: {e}");
        }
    }

    /// Queues `chunks` (less any in `keep`) for removal after the grace
    /// period.
    fn bury(&self, bucket: &Bucket, chunks: &[ChunkRef], keep: Option<&[ChunkRef]>) {
        let keys: Vec<BlockKey> = chunks
            .iter()
            .filter(|c| keep.is_none_or(|k| !k.iter().any(|x| x.key == c.key)))
            .filter_map(|c| parse_key(&c.key).ok())
            .collect();
        if !keys.is_empty() {
            self.graveyard
                .lock()
                .push((std::time::Instant::now() + REMOVE_GRACE, bucket.ns, keys));
        }
    }

    /// Removes chunks no record names (a refused or failed write).
    async fn discard(&self, bucket: &Bucket, chunks: &[ChunkRef]) {
        let keys: Vec<BlockKey> = chunks.iter().filter_map(|c| parse_key(&c.key).ok()).collect();
        self.remove_keys(bucket.ns, keys).await;
    }

    async fn remove_keys(&self, ns: NamespaceId, keys: Vec<BlockKey>) {
        if keys.is_empty() {
            return;
        }
        let r = match &self.cluster {
            Some(c) => c
                .delete_everywhere(ns, &keys)
                .await
                .map(|_| ())
                .map_err(kvtier_proto::error::from_status),
            None => {
                let m = self.manager.clone();
                blocking(move || m.remove(ns, &keys).map(|_| ())).await
            }
        };
        if let Err(e) = r {
            tracing::warn!("S3: chunks of a replaced or failed write not removed: {e}");
        }
    }

    /// Removes the chunks whose grace period is over, and aborts uploads
    /// older than `multipart_expiry_s`. Called periodically.
    pub async fn sweep(&self) {
        let now = std::time::Instant::now();
        let due: Vec<_> = {
            let mut g = self.graveyard.lock();
            let (due, keep): (Vec<_>, Vec<_>) = g.drain(..).partition(|(t, _, _)| *t <= now);
            *g = keep;
            due
        };
        for (_, ns, keys) in due {
            self.remove_keys(ns, keys).await;
        }
        let expiry_ms = self.cfg.multipart_expiry_s.saturating_mul(1000);
        let cutoff = now_ms().saturating_sub(expiry_ms);
        for b in self.buckets() {
            let old: Vec<String> = b
                .uploads
                .lock()
                .values()
                .filter(|u| u.created_ms < cutoff)
                .map(|u| u.id.clone())
                .collect();
            for id in old {
                tracing::info!(bucket = %b.name, upload = %id, "S3: an abandoned multipart upload expired");
                if let Err(e) = self.abort_upload(&b, &id).await {
                    tracing::warn!(bucket = %b.name, upload = %id, "S3: expired upload not aborted: {e}");
                }
            }
        }
    }

    /// Removes every buried chunk now (a draining daemon).
    pub async fn flush_graveyard(&self) {
        let all: Vec<_> = self.graveyard.lock().drain(..).collect();
        for (_, ns, keys) in all {
            self.remove_keys(ns, keys).await;
        }
    }
}

/// When a configured bucket's directory was made (its birth, as far as
/// the file system says), else now.
fn bucket_birth(dir: &Path) -> u64 {
    std::fs::metadata(dir)
        .and_then(|m| m.created().or_else(|_| m.modified()))
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_ms, |d| d.as_millis() as u64)
}

fn read_uploads(dir: &Path) -> Result<BTreeMap<String, Upload>> {
    let mut out = BTreeMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(format!("read {}", p.display()), e));
    for e in rd {
        let e = e.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        let udir = e.path();
        let head = udir.join("upload.json");
        if !head.exists() {
            // Created but never recorded (a crash in between): nothing
            // was acknowledged for it.
            let _ = std::fs::remove_dir_all(&udir);
            continue;
        }
        let mut u = match serde_json::from_slice::<Upload>(&read(&head)?) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(path = %head.display(), "S3: an unreadable upload record is skipped: {e}");
                continue;
            }
        };
        for p in std::fs::read_dir(&udir).map_err(|e| Error::io(format!("read {}", udir.display()), e))? {
            let p = p.map_err(|e| Error::io(format!("read {}", udir.display()), e))?.path();
            let Some(n) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("part-")?.strip_suffix(".json"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue; // upload.json, or a temporary file of an interrupted replace
            };
            match serde_json::from_slice::<Part>(&read(&p)?) {
                Ok(part) => {
                    u.parts.insert(n, part);
                }
                Err(e) => tracing::warn!(path = %p.display(), "S3: an unreadable part record is skipped: {e}"),
            }
        }
        out.insert(u.id.clone(), u);
    }
    Ok(out)
}

/// Writes one version's chunks, a few in flight at once.
#[derive(Debug)]
pub struct ObjectWriter {
    store: Arc<Store>,
    bucket: Arc<Bucket>,
    version: u128,
    remaining_hint: Option<u64>,
    buf: Option<AlignedBuf>,
    filled: usize,
    chunks: Vec<ChunkRef>,
    size: u64,
    inflight: tokio::task::JoinSet<Result<()>>,
    /// Chunks whose store finished or failed: for `abort`.
    done: Vec<ChunkRef>,
}

impl ObjectWriter {
    /// The version this writer makes.
    pub fn version(&self) -> String {
        format!("{:032x}", self.version)
    }

    fn chunk_key(&self, index: usize) -> BlockKey {
        let mut id = Vec::with_capacity(24);
        id.extend_from_slice(b"s3\0");
        id.extend_from_slice(&self.version.to_le_bytes());
        id.extend_from_slice(&(index as u32).to_le_bytes());
        BlockKey::from_opaque(self.bucket.ns, &id)
    }

    /// Appends body bytes; full chunks go to the store.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let max = self.bucket.chunk_bytes;
        if self.size + data.len() as u64 > self.bucket.max_object_bytes {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "an object of bucket {} holds at most {} bytes",
                    self.bucket.name, self.bucket.max_object_bytes
                ),
            ));
        }
        while !data.is_empty() {
            if self.buf.is_none() {
                let want = match self.remaining_hint {
                    Some(r) => (r.saturating_sub(self.size) as usize).clamp(1, max),
                    None => max,
                };
                self.buf = Some(AlignedBuf::new(want));
                self.filled = 0;
            }
            let buf = self.buf.as_mut().expect("made above");
            let room = buf.len().min(max) - self.filled;
            let n = room.min(data.len());
            buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            self.size += n as u64;
            data = &data[n..];
            if self.filled == buf.len().min(max) {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        let len = self.filled;
        self.filled = 0;
        if len == 0 {
            return Ok(());
        }
        while self.inflight.len() >= CHUNKS_IN_FLIGHT {
            self.reap_one().await?;
        }
        let data = Bytes::from_owner(buf).slice(..len);
        let c = ChunkRef {
            key: format!("{:032x}", self.chunk_key(self.chunks.len()).0),
            len: len as u32,
            xxh: xxhash_rust::xxh3::xxh3_64(&data),
        };
        let key = self.chunk_key(self.chunks.len());
        self.chunks.push(c.clone());
        self.done.push(c);
        let (store, ns, max) = (self.store.clone(), self.bucket.ns, self.bucket.chunk_bytes);
        self.inflight
            .spawn(async move { store.put_chunk(ns, key, data, max).await });
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<()> {
        match self.inflight.join_next().await {
            Some(r) => r.map_err(join_err)?,
            None => Ok(()),
        }
    }

    /// Stores the last chunk and waits for every store: the chunks, in
    /// order, and the size.
    pub async fn finish(&mut self) -> Result<(Vec<ChunkRef>, u64)> {
        self.flush().await?;
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        Ok((std::mem::take(&mut self.chunks), self.size))
    }

    /// Drops what was written (a failed or refused write).
    pub async fn abort(mut self) {
        self.inflight.abort_all();
        while self.inflight.join_next().await.is_some() {}
        let done = std::mem::take(&mut self.done);
        self.store.discard(&self.bucket, &done).await;
    }
}

impl Store {
    /// Starts a multipart upload of `key` whose object gets `template`'s
    /// headers and metadata.
    pub async fn create_upload(
        &self,
        bucket: &Arc<Bucket>,
        key: &str,
        template: ObjectMeta,
        checksum_algorithm: Option<String>,
    ) -> Result<String> {
        let id = format!("{:032x}", random_u128());
        let u = Upload {
            id: id.clone(),
            key: key.to_string(),
            created_ms: now_ms(),
            template,
            checksum_algorithm,
            parts: BTreeMap::new(),
        };
        self.save_upload(bucket, &u).await?;
        bucket.uploads.lock().insert(id.clone(), u);
        Ok(id)
    }

    /// Records a new upload: `uploads/<id>/upload.json` (the upload
    /// without its parts; each part has a record of its own beside it, so
    /// recording a part writes that part only).
    async fn save_upload(&self, bucket: &Bucket, u: &Upload) -> Result<()> {
        let root = bucket.uploads_dir.clone();
        let dir = root.join(&u.id);
        let head = Upload {
            parts: BTreeMap::new(),
            ..u.clone()
        };
        let text = serde_json::to_vec(&head).expect("serializes");
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            // The new directory's entry, durably.
            std::fs::File::open(&root)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("sync {}", root.display()), e))?;
            replace_durably(&dir.join("upload.json"), &text)
        })
        .await
    }

    /// Records part `number` of upload `id`, durably.
    async fn save_part(&self, bucket: &Bucket, id: &str, number: u32, part: &Part) -> Result<()> {
        let p = bucket.uploads_dir.join(id).join(format!("part-{number:05}.json"));
        let text = serde_json::to_vec(part).expect("serializes");
        blocking(move || replace_durably(&p, &text)).await
    }

    /// The upload `id` of `key`.
    pub fn upload(&self, bucket: &Bucket, id: &str, key: &str) -> Result<Upload> {
        match bucket.uploads.lock().get(id) {
            Some(u) if u.key == key => Ok(u.clone()),
            _ => Err(no_upload(id)),
        }
    }

    /// The uploads in progress, by key then id.
    pub fn uploads(&self, bucket: &Bucket) -> Vec<Upload> {
        let mut v: Vec<Upload> = bucket.uploads.lock().values().cloned().collect();
        v.sort_by(|a, b| (&a.key, a.created_ms, &a.id).cmp(&(&b.key, b.created_ms, &b.id)));
        v
    }

    /// Records part `number` of upload `id`; a part uploaded again under
    /// the same number replaces the earlier one.
    pub async fn add_part(&self, bucket: &Arc<Bucket>, id: &str, key: &str, number: u32, part: Part) -> Result<()> {
        // One record write at a time per bucket: a record written later
        // always holds every part recorded before it.
        let _io = bucket.upload_io.lock().await;
        let found = {
            let mut g = bucket.uploads.lock();
            g.get_mut(id).filter(|u| u.key == key).map(|u| {
                let old = u.parts.insert(number, part.clone());
                (u.clone(), old)
            })
        };
        let Some((_, old)) = found else {
            self.discard(bucket, &part.chunks).await;
            return Err(no_upload(id));
        };
        if let Err(e) = self.save_part(bucket, id, number, &part).await {
            // Back to the state on disk.
            if let Some(cur) = bucket.uploads.lock().get_mut(id) {
                match &old {
                    Some(o) => cur.parts.insert(number, o.clone()),
                    None => cur.parts.remove(&number),
                };
            }
            self.discard(bucket, &part.chunks).await;
            return Err(e);
        }
        if let Some(o) = old {
            self.bury(bucket, &o.chunks, None);
        }
        Ok(())
    }

    /// Completes upload `id` with `parts` (number, etag) in ascending
    /// order: checks them, commits the object (when `check` accepts the
    /// one it replaces) and ends the upload. `meta` gets the chunks, the
    /// size and the part sizes here; the caller sets its etag and
    /// checksums from the answer's parts.
    pub async fn complete_upload(
        &self,
        bucket: &Arc<Bucket>,
        id: &str,
        key: &str,
        chosen: &[(u32, String)],
        finish: impl FnOnce(&Upload, &[&Part]) -> Result<ObjectMeta>,
        check: impl FnOnce(Option<&ObjectMeta>) -> Result<()> + Send + 'static,
    ) -> Result<ObjectMeta> {
        let u = self.upload(bucket, id, key)?;
        let mut parts = Vec::with_capacity(chosen.len());
        for (i, (n, etag)) in chosen.iter().enumerate() {
            let p = u.parts.get(n).filter(|p| p.etag == *etag).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("part {n} with ETag \"{etag}\" was not uploaded to upload {id}"),
                )
            })?;
            if i + 1 < chosen.len() && p.size < MIN_PART_BYTES {
                return Err(Error::new(
                    ErrorKind::TooLarge, // mapped to EntityTooSmall by the caller
                    format!(
                        "part {n} has {} bytes: every part but the last needs at least {MIN_PART_BYTES}",
                        p.size
                    ),
                ));
            }
            parts.push(p);
        }
        let mut meta = finish(&u, &parts)?;
        meta.chunks = parts.iter().flat_map(|p| p.chunks.iter().cloned()).collect();
        meta.size = parts.iter().map(|p| p.size).sum();
        meta.parts = parts.iter().map(|p| p.size).collect();
        if meta.size > bucket.max_object_bytes {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "an object of bucket {} holds at most {} bytes",
                    bucket.name, bucket.max_object_bytes
                ),
            ));
        }
        let (b, n, m) = (bucket.clone(), key.to_string(), meta.clone());
        let old = blocking(move || b.catalog.put_if(&n, m, check)).await?;
        self.publish(bucket, key, Some(&meta)).await;
        // Committed: the upload is over. Parts left out of the object go.
        let unused: Vec<ChunkRef> = u
            .parts
            .iter()
            .filter(|(n, _)| !chosen.iter().any(|(c, _)| c == *n))
            .flat_map(|(_, p)| p.chunks.iter().cloned())
            .collect();
        self.end_upload(bucket, id).await;
        self.bury(bucket, &unused, None);
        if let Some(old) = old {
            self.bury(bucket, &old.chunks, Some(&meta.chunks));
        }
        Ok(meta)
    }

    async fn end_upload(&self, bucket: &Bucket, id: &str) {
        let _io = bucket.upload_io.lock().await;
        bucket.uploads.lock().remove(id);
        let p = bucket.uploads_dir.join(id);
        let r = blocking(move || match std::fs::remove_dir_all(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
        })
        .await;
        if let Err(e) = r {
            tracing::warn!("S3: upload record not removed: {e}");
        }
    }

    /// Aborts upload `id`: its parts' chunks go.
    pub async fn abort_upload(&self, bucket: &Arc<Bucket>, id: &str) -> Result<()> {
        let u = bucket.uploads.lock().get(id).cloned().ok_or_else(|| no_upload(id))?;
        self.end_upload(bucket, id).await;
        let chunks: Vec<ChunkRef> = u.parts.values().flat_map(|p| p.chunks.iter().cloned()).collect();
        self.bury(bucket, &chunks, None);
        Ok(())
    }
}

fn no_upload(id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no upload {id:?}: it was completed, aborted, expired or never made"),
    )
}

/// Splits the chunks of `meta` that hold bytes `start..=end`: each with
/// the range inside it.
pub fn chunks_in_range(meta: &ObjectMeta, start: u64, end: u64) -> Vec<(ChunkRef, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for c in &meta.chunks {
        let (lo, hi) = (at, at + c.len as u64); // [lo, hi)
        at = hi;
        if hi <= start || lo > end {
            continue;
        }
        let from = start.max(lo) - lo;
        let to = (end + 1).min(hi) - lo;
        out.push((c.clone(), from as usize, to as usize));
    }
    out
}

/// A map from a request id to nothing: keeps request ids unique per
/// process (a counter, salted per start).
#[derive(Debug)]
pub struct RequestIds {
    salt: u64,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            salt: random_u128() as u64,
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// A fresh request id: 16 upper-case hex digits.
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:016X}", self.salt ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(lens: &[u32]) -> ObjectMeta {
        ObjectMeta {
            version: "v".into(),
            size: lens.iter().map(|l| *l as u64).sum(),
            etag: "e".into(),
            modified_ms: 0,
            content_type: None,
            headers: Vec::new(),
            user: Vec::new(),
            checksums: Vec::new(),
            chunks: lens
                .iter()
                .enumerate()
                .map(|(i, l)| ChunkRef {
                    key: format!("{i:032x}"),
                    len: *l,
                    xxh: 0,
                })
                .collect(),
            parts: Vec::new(),
        }
    }

    #[test]
    fn a_range_maps_onto_the_chunks_it_touches() {
        let m = meta_of(&[10, 10, 5]);
        let r = chunks_in_range(&m, 0, 24);
        assert_eq!(
            r.iter().map(|(_, a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 10), (0, 10), (0, 5)]
        );
        let r = chunks_in_range(&m, 9, 10);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].1, r[0].2, r[1].1, r[1].2), (9, 10, 0, 1));
        let r = chunks_in_range(&m, 20, 20);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].0.key.as_str(), r[0].1, r[0].2),
            (format!("{:032x}", 2).as_str(), 0, 1)
        );
        let total: usize = chunks_in_range(&m, 3, 22).iter().map(|(_, a, b)| b - a).sum();
        assert_eq!(total, 20);
    }

    #[test]
    fn request_ids_differ() {
        let ids = RequestIds::default();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }
}
