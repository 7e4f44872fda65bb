//! Checkpoints over gRPC: the daemon's `Checkpoints` service and the
//! client's [`RemoteChunks`](kvtier_client::RemoteChunks).
//!
//! The client runs `kvtier::checkpoint::Checkpoints` (chunking, manifests,
//! verification) over [`RemoteChunks`](kvtier_client::RemoteChunks); the daemon stores each chunk as one
//! variable-length block of the group's namespace
//! (`Namespace::checkpoints`) and keeps the group's catalog of names in its
//! data directory. Chunks cross the wire in pieces of at most
//! [`kvtier_proto::CHUNK_BYTES`].
//!
//! In a cluster, a group's namespace is replicated on min(3, members)
//! nodes (strong writes): chunks and manifests go to their replicas
//! through the cluster's write path (stand-ins with hints for replicas
//! that are down), reads try this node, then the replicas, then blob (a
//! copy that fails verification is skipped and rewritten from the good
//! one: [`crate::repair`]), and a delete
//! reaches every member. The catalog of names is kept on every member (a
//! name is added everywhere that answers) and listed as the union of the
//! members that answer.
//!
//! **Abandoned puts.** A put whose writer dies leaves chunks that no
//! manifest names. Each node collects its own copies of such chunks
//! ([`CheckpointService::start_collection`], `[checkpoints]` in the
//! config): a pass lists the chunks this node holds in each group it has a
//! catalog of, and the chunks the group's committed checkpoints use (their
//! manifests, read as a restore reads them); a chunk seen unused by every
//! pass for `collect_after_s` is removed here. A pass that cannot see the
//! whole picture changes nothing: in a cluster it needs every member up and
//! answering (a name may be known to one member only) and no hints pending
//! here (a hinted copy is not yet where it belongs), and every manifest
//! read. Chunks only blob holds are not collected.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvtier::checkpoint::{ChunkStore, LocalChunks, validate_name};
use kvtier::{BlockKey, BlockManager, ErrorKind, NamespaceId, Recycler};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint_proto as pb;
use crate::cluster::Cluster;
use crate::registry::Registry;
use crate::repair::Repair;
use crate::{invalid, status, status_of};
use kvtier::replication::Replication;

use kvtier_proto::chunk::pieces_at_least_one;
pub use kvtier_proto::convert::{CHUNK_BYTES_RANGE, group_namespace};

fn key(b: &[u8]) -> Result<BlockKey, Status> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| invalid(format!("a chunk key is 16 bytes, got {}", b.len())))?;
    Ok(BlockKey::from_le_bytes(a))
}

/// The daemon side.
#[derive(Debug)]
pub struct CheckpointService {
    manager: Arc<BlockManager>,
    registry: Arc<Registry>,
    cluster: Option<Arc<Cluster>>,
    repair: Arc<Repair>,
    dir: PathBuf,
    groups: Mutex<HashMap<(String, u32), Arc<LocalChunks>>>,
    /// Aligned buffers for incoming chunks, by chunk size.
    buffers: Mutex<HashMap<usize, Recycler>>,
    /// The collection of abandoned chunks.
    collect: Collect,
}

/// What the collection of abandoned chunks knows between passes.
#[derive(Debug, Default)]
struct Collect {
    /// Chunks held here that no committed checkpoint used, with the pass
    /// that first saw them so (cleared for a chunk any pass sees in use).
    unused_since: Mutex<HashMap<(NamespaceId, BlockKey), Instant>>,
    passes: AtomicU64,
    /// Passes that changed nothing because they could not see everything.
    passes_skipped: AtomicU64,
    chunks_collected: AtomicU64,
}

/// The collection's counters, for stats and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectStats {
    /// Passes run.
    pub passes: u64,
    /// Passes that changed nothing (a member down, a manifest unread, hints pending).
    pub passes_skipped: u64,
    /// Abandoned chunks removed here.
    pub chunks_collected: u64,
    /// Chunks held here now seen unused, not yet old enough.
    pub chunks_unused: u64,
}

/// The groups with a catalog in `dir`: `(group, chunk_bytes)` from file
/// names `{group}-{chunk_bytes}.names`.
fn catalogs(dir: &Path) -> Vec<(String, u32)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".names")?;
            let (group, bytes) = stem.rsplit_once('-')?;
            Some((group.to_string(), bytes.parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

impl CheckpointService {
    /// Chunks in `manager` (namespaces registered through `registry`),
    /// catalogs under `data_dir/checkpoints`, replicated over `cluster`,
    /// read through `repair`.
    pub fn new(
        manager: Arc<BlockManager>,
        registry: Arc<Registry>,
        cluster: Option<Arc<Cluster>>,
        repair: Arc<Repair>,
        data_dir: &std::path::Path,
    ) -> Self {
        Self {
            manager,
            registry,
            cluster,
            repair,
            dir: data_dir.join("checkpoints"),
            groups: Mutex::new(HashMap::new()),
            buffers: Mutex::new(HashMap::new()),
            collect: Collect::default(),
        }
    }

    /// Starts the collection of abandoned chunks (a pass every
    /// `collect_interval_s`), unless the config turns it off.
    pub fn start_collection(self: &Arc<Self>, cfg: &crate::config::CheckpointsConfig) {
        if !cfg.collects() {
            return;
        }
        let (after, every) = (
            Duration::from_secs(cfg.collect_after_s),
            Duration::from_secs(cfg.collect_interval_s),
        );
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = me.upgrade() else { return };
                match s.collect_pass(after).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(chunks = n, "checkpoints: chunks of abandoned puts collected"),
                    Err(why) => {
                        s.collect.passes_skipped.fetch_add(1, Relaxed);
                        tracing::debug!("checkpoints: collection pass skipped: {why}");
                    }
                }
            }
        });
    }

    /// The collection's counters.
    pub fn collect_stats(&self) -> CollectStats {
        let c = &self.collect;
        CollectStats {
            passes: c.passes.load(Relaxed),
            passes_skipped: c.passes_skipped.load(Relaxed),
            chunks_collected: c.chunks_collected.load(Relaxed),
            chunks_unused: c.unused_since.lock().len() as u64,
        }
    }

    /// One pass over every group with a catalog here: chunks held here
    /// that no committed checkpoint uses are noted, and removed once
    /// unused for `after`. Answers the chunks removed, or why the pass
    /// changed nothing.
    async fn collect_pass(&self, after: Duration) -> Result<usize, String> {
        self.collect.passes.fetch_add(1, Relaxed);
        let mut held = Vec::new();
        for (group, chunk_bytes) in catalogs(&self.dir) {
            let g = pb::Group {
                group: group.clone(),
                chunk_bytes,
                local: false,
            };
            let (ns, store) = self.group(Some(&g)).await.map_err(|e| e.message().to_string())?;
            let used = self.chunks_in_use(&g, ns, store).await?;
            held.extend(
                self.manager
                    .local_keys(ns)
                    .into_iter()
                    .filter(|k| !used.contains(k))
                    .map(|k| (ns, k)),
            );
        }
        let now = Instant::now();
        let old: Vec<(NamespaceId, BlockKey)> = {
            let mut since = self.collect.unused_since.lock();
            let held: HashSet<_> = held.into_iter().collect();
            since.retain(|k, _| held.contains(k));
            for k in held {
                since.entry(k).or_insert(now);
            }
            since
                .iter()
                .filter(|(_, t)| now.duration_since(**t) >= after)
                .map(|(k, _)| *k)
                .collect()
        };
        let mut removed = 0;
        for (ns, k) in old {
            let m = self.manager.clone();
            match Self::blocking(move || m.remove(ns, &[k])).await {
                Ok(n) => {
                    removed += n;
                    self.collect.unused_since.lock().remove(&(ns, k));
                }
                Err(e) => tracing::warn!(%k, "checkpoints: an abandoned chunk was not removed: {}", e.message()),
            }
        }
        self.collect.chunks_collected.fetch_add(removed as u64, Relaxed);
        Ok(removed)
    }

    /// Every key a committed checkpoint of group `g` uses (manifests and
    /// chunks), from every member's catalog; an error unless every member
    /// answered and every manifest was read.
    async fn chunks_in_use(
        &self,
        g: &pb::Group,
        ns: NamespaceId,
        store: Arc<LocalChunks>,
    ) -> Result<HashSet<BlockKey>, String> {
        let mut names = Self::blocking(move || store.names())
            .await
            .map_err(|e| e.message().to_string())?;
        if let Some(c) = &self.cluster {
            if c.hints_pending() > 0 {
                return Err(format!("{} hints pending here", c.hints_pending()));
            }
            let writable: HashSet<_> = c.writable_peers().into_iter().collect();
            let local = pb::Group {
                local: true,
                ..g.clone()
            };
            for peer in c.all_peers() {
                if !writable.contains(&peer) {
                    return Err(format!("member {peer} is not up"));
                }
                let pc = c.peer(&peer).ok_or_else(|| format!("no client of member {peer} yet"))?;
                let r = pc.checkpoints().names(local.clone()).await;
                names.extend(
                    r.map_err(|e| format!("member {peer} did not list its names: {}", e.message()))?
                        .into_inner()
                        .names,
                );
            }
        }
        names.sort();
        names.dedup();
        let mut used = HashSet::new();
        for name in names {
            let mk = kvtier::checkpoint::manifest_key(ns, &name);
            used.insert(mk);
            let bytes = self
                .repair
                .read_chunk(ns, mk, self.cluster.is_some(), true)
                .await
                .map_err(|e| format!("manifest of {name:?}: {e}"))?
                .ok_or_else(|| format!("manifest of {name:?}: not found"))?;
            let m = kvtier::checkpoint::manifest::Manifest::decode(&bytes)
                .map_err(|e| format!("manifest of {name:?}: {e}"))?;
            used.extend(m.files.iter().flat_map(|f| f.chunks.iter().map(|c| BlockKey(c.key))));
        }
        Ok(used)
    }

    /// Buffers for chunks of at most `chunk_bytes`: as many kept idle as a
    /// client has chunks in flight.
    fn recycler(&self, chunk_bytes: usize) -> Recycler {
        self.buffers
            .lock()
            .entry(chunk_bytes)
            .or_insert_with(|| Recycler::new(chunk_bytes, kvtier::checkpoint::CHUNKS_IN_FLIGHT))
            .clone()
    }

    /// The cluster, unless the request is a member's local-only call.
    fn fan_out(&self, g: Option<&pb::Group>) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref().filter(|_| !g.is_some_and(|g| g.local))
    }

    /// The group's store, registering its namespace on first use.
    async fn group(&self, g: Option<&pb::Group>) -> Result<(NamespaceId, Arc<LocalChunks>), Status> {
        let g = g.ok_or_else(|| invalid("the request names no checkpoint group"))?;
        let ns = group_namespace(g)?;
        let rep = self.cluster.as_ref().map(|c| Replication::strong(c.size().min(3)));
        let reg = self.registry.register(&ns, rep, true)?;
        if reg.new
            && let Some(c) = &self.cluster
        {
            c.register_everywhere(reg.id).await;
        }
        let id = reg.id;
        let mut groups = self.groups.lock();
        if let Some(s) = groups.get(&(g.group.clone(), g.chunk_bytes)) {
            return Ok((id, s.clone()));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| status_of(ErrorKind::Internal, format!("create {}: {e}", self.dir.display())))?;
        let catalog = self.dir.join(format!("{}-{}.names", g.group, g.chunk_bytes));
        let s = Arc::new(LocalChunks::new(self.manager.clone(), id, catalog));
        groups.insert((g.group.clone(), g.chunk_bytes), s.clone());
        Ok((id, s))
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> kvtier::Result<T> + Send + 'static) -> Result<T, Status> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("task: {e}")))?
            .map_err(|e| status(&e))
    }
}

impl CheckpointService {
    /// Adds or removes a name on every writable member (best effort: a
    /// member that misses it is covered by the union at list time).
    async fn tell_members(&self, r: pb::NameRequest, add: bool) {
        let Some(c) = self.fan_out(r.group.as_ref()) else {
            return;
        };
        let req = pb::NameRequest {
            group: r.group.map(|g| pb::Group { local: true, ..g }),
            name: r.name,
        };
        for peer in c.writable_peers() {
            let Some(pc) = c.peer(&peer) else { continue };
            let mut cc = pc.checkpoints();
            let res = if add {
                cc.add_name(req.clone()).await
            } else {
                cc.remove_name(req.clone()).await
            };
            if let Err(e) = res {
                tracing::warn!(member = %peer, "checkpoint catalog not updated: {}", e.message());
            }
        }
    }
}

type PieceStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ChunkPiece, Status>> + Send>>;

#[tonic::async_trait]
impl pb::checkpoints_server::Checkpoints for CheckpointService {
    async fn put_chunk(&self, req: Request<Streaming<pb::ChunkWrite>>) -> Result<Response<pb::PutChunkReply>, Status> {
        let mut s = req.into_inner();
        let first = s.next().await.ok_or_else(|| invalid("an empty PutChunk stream"))??;
        let (ns, store) = self.group(first.group.as_ref()).await?;
        let max = first.group.as_ref().map_or(0, |g| g.chunk_bytes) as usize;
        let k = key(&first.key)?;
        if first.chunk_len > max as u64 {
            return Err(invalid(format!(
                "chunk {k}: {} bytes exceed the group's chunk_bytes ({max})",
                first.chunk_len
            )));
        }
        // Assembled in a page-aligned buffer: the SSD write then needs no
        // staging copy. Clients that do not say the length get a Vec.
        let mut buf = (first.chunk_len > 0).then(|| {
            let mut b = self.recycler(max).take();
            b.set_len(0);
            b
        });
        let mut vec = Vec::new();
        let limit = if buf.is_some() { first.chunk_len as usize } else { max };
        let mut len = 0usize;
        let mut next = Some(first.data);
        while let Some(d) = next {
            if len + d.len() > limit {
                return Err(invalid(format!(
                    "chunk {k} exceeds its announced length ({}) or the group's chunk_bytes ({max})",
                    first.chunk_len
                )));
            }
            match &mut buf {
                Some(b) => b.whole_mut()[len..len + d.len()].copy_from_slice(&d),
                None => vec.extend_from_slice(&d),
            }
            len += d.len();
            next = s.next().await.transpose()?.map(|p| p.data);
        }
        if len == 0 {
            return Err(invalid(format!("chunk {k} is empty")));
        }
        let data = match buf {
            Some(mut b) => {
                if len != first.chunk_len as usize {
                    return Err(invalid(format!(
                        "chunk {k}: {len} bytes arrived of the {} announced",
                        first.chunk_len
                    )));
                }
                b.set_len(len);
                b.into_bytes()
            }
            None => Bytes::from(vec),
        };
        let stored = match self.fan_out(first.group.as_ref()) {
            Some(c) => c.write(ns, &[k], data, max).await?.stored == 1,
            None => Self::blocking(move || store.put_chunk(k, data)).await?,
        };
        Ok(Response::new(pb::PutChunkReply { stored }))
    }

    type GetChunkStream = PieceStream;

    async fn get_chunk(&self, req: Request<pb::ChunkRef>) -> Result<Response<PieceStream>, Status> {
        let r = req.into_inner();
        let (ns, _) = self.group(r.group.as_ref()).await?;
        let k = key(&r.key)?;
        // Local tiers, then (in a cluster) the replicas, then blob; a copy
        // that fails verification is skipped and rewritten (read repair).
        let peers = self.fan_out(r.group.as_ref()).is_some();
        let got = self
            .repair
            .read_chunk(ns, k, peers, true)
            .await
            .map_err(|e| status(&e))?;
        let pieces: Vec<Result<pb::ChunkPiece, Status>> = match got {
            None => vec![Ok(pb::ChunkPiece {
                found: false,
                data: Bytes::new(),
            })],
            Some(d) => pieces_at_least_one(&d)
                .map(|data| Ok(pb::ChunkPiece { found: true, data }))
                .collect(),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }

    async fn remove_chunk(&self, req: Request<pb::ChunkRef>) -> Result<Response<pb::RemoveChunkReply>, Status> {
        let r = req.into_inner();
        let (ns, _) = self.group(r.group.as_ref()).await?;
        let k = key(&r.key)?;
        let n = match self.fan_out(r.group.as_ref()) {
            Some(c) => c.delete_everywhere(ns, &[k]).await?,
            None => {
                let m = self.manager.clone();
                Self::blocking(move || m.remove(ns, &[k])).await?
            }
        };
        Ok(Response::new(pb::RemoveChunkReply { removed: n > 0 }))
    }

    async fn names(&self, req: Request<pb::Group>) -> Result<Response<pb::NamesReply>, Status> {
        let g = req.into_inner();
        let (_, store) = self.group(Some(&g)).await?;
        let mut names = Self::blocking(move || store.names()).await?;
        if let Some(c) = self.fan_out(Some(&g)) {
            let local = pb::Group { local: true, ..g };
            for peer in c.writable_peers() {
                let Some(pc) = c.peer(&peer) else { continue };
                let r = pc.checkpoints().names(local.clone()).await;
                match r {
                    Ok(r) => names.extend(r.into_inner().names),
                    Err(e) => tracing::debug!(member = %peer, "checkpoint names not listed: {}", e.message()),
                }
            }
            names.sort();
            names.dedup();
        }
        Ok(Response::new(pb::NamesReply { names }))
    }

    async fn add_name(&self, req: Request<pb::NameRequest>) -> Result<Response<pb::NameReply>, Status> {
        let r = req.into_inner();
        validate_name(&r.name).map_err(|e| status(&e))?;
        let (_, store) = self.group(r.group.as_ref()).await?;
        let name = r.name.clone();
        Self::blocking(move || store.add_name(&name)).await?;
        self.tell_members(r, true).await;
        Ok(Response::new(pb::NameReply {}))
    }

    async fn remove_name(&self, req: Request<pb::NameRequest>) -> Result<Response<pb::NameReply>, Status> {
        let r = req.into_inner();
        validate_name(&r.name).map_err(|e| status(&e))?;
        let (_, store) = self.group(r.group.as_ref()).await?;
        let name = r.name.clone();
        Self::blocking(move || store.remove_name(&name)).await?;
        self.tell_members(r, false).await;
        Ok(Response::new(pb::NameReply {}))
    }
}
