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

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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
        }
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
