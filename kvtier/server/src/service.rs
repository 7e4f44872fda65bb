//! The `KvTier` gRPC service over a block manager.

use bytes::Bytes;
use kvtier::{AlignedBuf, BlockManager, Namespace, NamespaceId};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::CHUNK_BYTES;
use crate::convert::{self, status};
use crate::metrics::Metrics;
use crate::proto::{self, get_response, put_request};
use crate::region::Regions;

/// Keys one request may carry.
pub const MAX_KEYS: usize = 65_536;
/// Idle request buffers kept for reuse.
const POOLED_BUFFERS: usize = 16;
/// Permits of the in-flight semaphore are pages of request bytes.
const PERMIT_BYTES: u64 = 4096;

/// Page-aligned request buffers, reused: first touch of fresh memory costs
/// more than the copy into it.
#[derive(Debug)]
struct BufPool {
    idle: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    fn take(&self, len: usize) -> AlignedBuf {
        let mut idle = self.idle.lock();
        match idle.iter().position(|b| b.len() >= len) {
            Some(i) => idle.swap_remove(i),
            None => {
                drop(idle);
                AlignedBuf::new(len)
            }
        }
    }

    fn give(&self, b: AlignedBuf) {
        let mut idle = self.idle.lock();
        if idle.len() < POOLED_BUFFERS {
            idle.push(b);
        }
    }
}

/// A request buffer on loan, with its share of the in-flight budget; both
/// go back when the last `Bytes` made from it is dropped.
struct Loan {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().expect("present until drop")
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// The namespaces registered, persisted so a restarted daemon serves what
/// its SSD holds without clients registering again.
#[derive(Debug)]
struct Registry {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Registry {
    fn load(&self) -> Result<Vec<Namespace>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("namespace registry {}: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("read {}: {e}", self.path.display())),
        }
    }

    /// Writes the whole list: temporary file, fsync, rename.
    fn save(&self, all: &[Namespace]) -> std::io::Result<()> {
        use std::io::Write;
        let _g = self.lock.lock();
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(all).expect("namespaces serialize"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct KvTierService {
    manager: Arc<BlockManager>,
    metrics: Arc<Metrics>,
    pool: Arc<BufPool>,
    inflight: Arc<Semaphore>,
    registry: Arc<Registry>,
    regions: Arc<Regions>,
    max_request_bytes: u64,
    started: Instant,
}

impl std::fmt::Debug for KvTierService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTierService").finish_non_exhaustive()
    }
}

type Reply<T> = Result<Response<T>, Status>;

impl KvTierService {
    /// A service over `manager`; namespaces persist in `registry_path` and
    /// the ones already there are registered now.
    pub fn new(
        manager: Arc<BlockManager>,
        metrics: Arc<Metrics>,
        registry_path: PathBuf,
        regions: Regions,
        max_request_bytes: u64,
        max_inflight_bytes: u64,
    ) -> Result<Self, String> {
        let registry = Registry {
            path: registry_path,
            lock: Mutex::new(()),
        };
        for ns in registry.load()? {
            manager
                .register_namespace(&ns)
                .map_err(|e| format!("namespace {} from {}: {e}", ns.model_id, registry.path.display()))?;
        }
        let permits = (max_inflight_bytes / PERMIT_BYTES).min(u64::from(u32::MAX >> 3)) as usize;
        Ok(Self {
            manager,
            metrics,
            pool: Arc::new(BufPool {
                idle: Mutex::new(Vec::new()),
            }),
            inflight: Arc::new(Semaphore::new(permits)),
            registry: Arc::new(registry),
            regions: Arc::new(regions),
            max_request_bytes,
            started: Instant::now(),
        })
    }

    fn observe<T>(&self, rpc: &str, t: Instant, r: &Result<T, Status>) {
        self.metrics.rpc(rpc).observe(t.elapsed(), r.is_ok());
        if let Err(s) = r {
            if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) {
                self.metrics.bad_requests.fetch_add(1, Relaxed);
            }
            tracing::debug!(rpc, code = ?s.code(), "{}", s.message());
        }
    }

    /// Checks a request's size and waits for its share of the budget.
    async fn admit(&self, what: &str, blocks: usize, block_bytes: u64) -> Result<Loan, Status> {
        let total = blocks as u64 * block_bytes;
        if total > self.max_request_bytes {
            return Err(Status::resource_exhausted(format!(
                "{what} of {blocks} blocks of {block_bytes} bytes ({total} bytes) exceeds max_request_bytes {}",
                self.max_request_bytes
            )));
        }
        let permits = total.div_ceil(PERMIT_BYTES).max(1) as u32;
        self.metrics.inflight_bytes.fetch_add(total, Relaxed);
        let permit = self.inflight.clone().acquire_many_owned(permits).await;
        self.metrics.inflight_bytes.fetch_sub(total, Relaxed);
        let permit = permit.map_err(|_| Status::unavailable("kvtierd is stopping"))?;
        Ok(Loan {
            buf: Some(self.pool.take(total as usize)),
            pool: self.pool.clone(),
            _permit: permit,
        })
    }

    fn block_bytes(&self, ns: NamespaceId) -> Result<u64, Status> {
        self.manager.block_bytes(ns).map_err(|e| status(&e))
    }

    async fn put_inner(&self, mut s: Streaming<proto::PutRequest>) -> Result<proto::PutResponse, Status> {
        let header = match s.message().await? {
            Some(proto::PutRequest {
                msg: Some(put_request::Msg::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first Put message must be a header")),
        };
        let ns = convert::namespace_id(&header.namespace_id)?;
        let block = self.block_bytes(ns)?;
        let keys = convert::keys(&header.keys, MAX_KEYS)?;
        let total = (keys.len() as u64 * block) as usize;
        let mut loan = self.admit("put", keys.len(), block).await?;
        let buf = loan.buf.as_mut().expect("fresh loan");
        let mut got = 0usize;
        while let Some(m) = s.message().await? {
            let Some(put_request::Msg::Data(d)) = m.msg else {
                return Err(Status::invalid_argument("only data messages may follow the Put header"));
            };
            if got + d.len() > total {
                return Err(Status::invalid_argument(format!(
                    "put carries more than {} blocks of {block} bytes ({total} bytes)",
                    keys.len()
                )));
            }
            buf[got..got + d.len()].copy_from_slice(&d);
            got += d.len();
        }
        if got != total {
            return Err(Status::invalid_argument(format!(
                "put ended after {got} of {total} bytes ({} blocks of {block} bytes)",
                keys.len()
            )));
        }
        let m = self.manager.clone();
        let (r, loan) = tokio::task::spawn_blocking(move || {
            let r = m.store(ns, &keys, &loan.as_ref()[..total]);
            (r, loan)
        })
        .await
        .map_err(|e| Status::internal(format!("store task: {e}")))?;
        drop(loan);
        let out = r.map_err(|e| status(&e))?;
        Ok(proto::PutResponse {
            stored: out.stored as u32,
            present: out.present as u32,
            not_admitted: out.not_admitted as u32,
        })
    }

    async fn get_inner(&self, req: proto::GetRequest) -> Result<GetStream, Status> {
        let ns = convert::namespace_id(&req.namespace_id)?;
        let block = self.block_bytes(ns)?;
        let keys = convert::keys(&req.keys, MAX_KEYS)?;
        let total = (keys.len() as u64 * block) as usize;
        let mut loan = self.admit("get", keys.len(), block).await?;
        let m = self.manager.clone();
        let (r, loan) = tokio::task::spawn_blocking(move || {
            let buf = loan.buf.as_mut().expect("fresh loan");
            let r = m.load(ns, &keys, &mut buf[..total]);
            (r, loan)
        })
        .await
        .map_err(|e| Status::internal(format!("load task: {e}")))?;
        let out = r.map_err(|e| status(&e))?;
        let header = proto::GetHeader {
            loaded: out.loaded as u32,
            block_bytes: block,
            failed_index: out.failed.as_ref().map(|f| f.index as u32),
            failed_reason: out.failed.map(|f| f.message).unwrap_or_default(),
        };
        let bytes = Bytes::from_owner(loan).slice(..out.loaded * block as usize);
        let mut msgs = Vec::with_capacity(1 + bytes.len() / CHUNK_BYTES + 1);
        msgs.push(Ok(proto::GetResponse {
            msg: Some(get_response::Msg::Header(header)),
        }));
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + CHUNK_BYTES).min(bytes.len());
            msgs.push(Ok(proto::GetResponse {
                msg: Some(get_response::Msg::Data(bytes.slice(at..end))),
            }));
            at = end;
        }
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }
}

impl KvTierService {
    /// Checks a region request: namespace, keys, and the byte range.
    fn region_request(&self, req: &proto::RegionRequest, exclusive: bool) -> Result<RegionJob, Status> {
        let ns = convert::namespace_id(&req.namespace_id)?;
        let block = self.block_bytes(ns)?;
        let keys = convert::keys(&req.keys, MAX_KEYS)?;
        let len = keys.len() as u64 * block;
        let borrow = self.regions.borrow(req.region_id, req.offset, len, exclusive)?;
        Ok(RegionJob {
            ns,
            keys,
            block,
            borrow,
        })
    }
}

struct RegionJob {
    ns: NamespaceId,
    keys: Vec<kvtier::BlockKey>,
    block: u64,
    borrow: crate::region::Borrow,
}

/// The stream a Get answers with.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<proto::GetResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::kv_tier_server::KvTier for KvTierService {
    async fn register_namespace(
        &self,
        req: Request<proto::RegisterNamespaceRequest>,
    ) -> Reply<proto::RegisterNamespaceResponse> {
        let t = Instant::now();
        let r = (|| {
            let p = req
                .into_inner()
                .namespace
                .ok_or_else(|| Status::invalid_argument("namespace is required"))?;
            let ns = convert::namespace(&p)?;
            let known = self.manager.block_bytes(ns.id()).is_ok();
            let id = self.manager.register_namespace(&ns).map_err(|e| status(&e))?;
            if !known {
                let all: Vec<Namespace> = self.manager.namespaces().into_iter().map(|(_, n)| n).collect();
                self.registry
                    .save(&all)
                    .map_err(|e| Status::internal(format!("persist the namespace registry: {e}")))?;
                tracing::info!(namespace = %id, model = %ns.model_id, block_bytes = ns.block_bytes(), "namespace registered");
            }
            Ok(proto::RegisterNamespaceResponse {
                namespace_id: Bytes::copy_from_slice(&id.0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
            })
        })();
        self.observe("RegisterNamespace", t, &r);
        r.map(Response::new)
    }

    async fn list_namespaces(
        &self,
        _req: Request<proto::ListNamespacesRequest>,
    ) -> Reply<proto::ListNamespacesResponse> {
        let t = Instant::now();
        let namespaces = self
            .manager
            .namespaces()
            .into_iter()
            .map(|(id, ns)| proto::NamespaceInfo {
                namespace_id: Bytes::copy_from_slice(&id.0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
                namespace: Some(convert::namespace_proto(&ns)),
            })
            .collect();
        let r = Ok(proto::ListNamespacesResponse { namespaces });
        self.observe("ListNamespaces", t, &r);
        r.map(Response::new)
    }

    async fn lookup(&self, req: Request<proto::LookupRequest>) -> Reply<proto::LookupResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            let l = if self.manager.blob().is_some() {
                // Blob lookups send HEAD requests: off the async workers.
                let m = self.manager.clone();
                tokio::task::spawn_blocking(move || m.lookup(ns, &keys))
                    .await
                    .map_err(|e| Status::internal(format!("lookup task: {e}")))?
            } else {
                // Local lookups take microseconds: inline.
                self.manager.lookup(ns, &keys)
            }
            .map_err(|e| status(&e))?;
            Ok(proto::LookupResponse {
                hit_blocks: l.hit_blocks() as u32,
                tiers: l.tiers.iter().map(|t| convert::tier(*t) as i32).collect(),
            })
        }
        .await;
        self.observe("Lookup", t, &r);
        r.map(Response::new)
    }

    async fn put(&self, req: Request<Streaming<proto::PutRequest>>) -> Reply<proto::PutResponse> {
        let t = Instant::now();
        let r = self.put_inner(req.into_inner()).await;
        self.observe("Put", t, &r);
        r.map(Response::new)
    }

    type GetStream = GetStream;

    async fn get(&self, req: Request<proto::GetRequest>) -> Reply<GetStream> {
        let t = Instant::now();
        let r = self.get_inner(req.into_inner()).await;
        self.observe("Get", t, &r);
        r.map(Response::new)
    }

    async fn delete(&self, req: Request<proto::DeleteRequest>) -> Reply<proto::DeleteResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            let m = self.manager.clone();
            let n = tokio::task::spawn_blocking(move || m.remove(ns, &keys))
                .await
                .map_err(|e| Status::internal(format!("delete task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::DeleteResponse { removed: n as u32 })
        }
        .await;
        self.observe("Delete", t, &r);
        r.map(Response::new)
    }

    async fn stats(&self, _req: Request<proto::StatsRequest>) -> Reply<proto::StatsResponse> {
        let t = Instant::now();
        let r = convert::stats(&self.manager.stats()).map_err(|e| Status::internal(format!("stats: {e}")));
        self.observe("Stats", t, &r);
        r.map(Response::new)
    }

    async fn register_region(
        &self,
        req: Request<proto::RegisterRegionRequest>,
    ) -> Reply<proto::RegisterRegionResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = self
            .regions
            .register(&req.path, req.size)
            .map(|region_id| proto::RegisterRegionResponse { region_id });
        self.observe("RegisterRegion", t, &r);
        r.map(Response::new)
    }

    async fn unregister_region(
        &self,
        req: Request<proto::UnregisterRegionRequest>,
    ) -> Reply<proto::UnregisterRegionResponse> {
        let t = Instant::now();
        let r = self
            .regions
            .unregister(req.into_inner().region_id)
            .map(|()| proto::UnregisterRegionResponse {});
        self.observe("UnregisterRegion", t, &r);
        r.map(Response::new)
    }

    async fn put_region(&self, req: Request<proto::RegionRequest>) -> Reply<proto::PutResponse> {
        let t = Instant::now();
        let r = async {
            let job = self.region_request(&req.into_inner(), false)?;
            let m = self.manager.clone();
            let out = tokio::task::spawn_blocking(move || m.store(job.ns, &job.keys, job.borrow.bytes()))
                .await
                .map_err(|e| Status::internal(format!("store task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::PutResponse {
                stored: out.stored as u32,
                present: out.present as u32,
                not_admitted: out.not_admitted as u32,
            })
        }
        .await;
        self.observe("PutRegion", t, &r);
        r.map(Response::new)
    }

    async fn get_region(&self, req: Request<proto::RegionRequest>) -> Reply<proto::GetHeader> {
        let t = Instant::now();
        let r = async {
            let mut job = self.region_request(&req.into_inner(), true)?;
            let m = self.manager.clone();
            let block = job.block;
            let out = tokio::task::spawn_blocking(move || m.load(job.ns, &job.keys, job.borrow.bytes_mut()))
                .await
                .map_err(|e| Status::internal(format!("load task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::GetHeader {
                loaded: out.loaded as u32,
                block_bytes: block,
                failed_index: out.failed.as_ref().map(|f| f.index as u32),
                failed_reason: out.failed.map(|f| f.message).unwrap_or_default(),
            })
        }
        .await;
        self.observe("GetRegion", t, &r);
        r.map(Response::new)
    }

    async fn health(&self, _req: Request<proto::HealthRequest>) -> Reply<proto::HealthResponse> {
        let t = Instant::now();
        let mode = serde_json::to_value(self.manager.mode())
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let r = Ok(proto::HealthResponse {
            status: "serving".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mode,
            uptime_s: self.started.elapsed().as_secs(),
        });
        self.observe("Health", t, &r);
        r.map(Response::new)
    }
}
