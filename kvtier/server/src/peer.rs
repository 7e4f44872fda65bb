//! The `Peer` gRPC service: what the nodes of a cluster ask each other.
//! Every call acts on this node's own tiers; nothing is forwarded.

use kvtier::replication::Replication;
use kvtier::replication::placement::NodeId;
use kvtier::replication::repair::Holder;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::Cluster;
use crate::convert;
use crate::node::{GetStream, MAX_KEYS, Node};
use crate::proto::{self, replica_put_request};
use crate::{invalid, status, status_of};
use kvtier::ErrorKind;
use kvtier_proto::wire::MessageReader;

/// The service, over the same block manager as the client API.
#[derive(Debug, Clone)]
pub struct PeerService {
    node: Arc<Node>,
    cluster: Arc<Cluster>,
}

type Reply<T> = Result<Response<T>, Status>;

impl PeerService {
    /// Serves `cluster`'s peers from `node`.
    pub fn new(node: Arc<Node>, cluster: Arc<Cluster>) -> Self {
        Self { node, cluster }
    }

    /// Registers a namespace a peer sent, keeping the replication already
    /// registered here if there is one.
    fn register(&self, req: &proto::ReplicaRegisterRequest) -> Result<(), Status> {
        let p = req.namespace.as_ref().ok_or_else(|| invalid("namespace is required"))?;
        let ns = convert::namespace(p)?;
        let rep = Replication {
            replicas: (req.replicas as usize).max(1),
            write_quorum: (req.write_quorum > 0).then_some(req.write_quorum as usize),
        };
        let r = self.node.registry().register(&ns, Some(rep), true)?;
        if r.new {
            tracing::info!(namespace = %r.id, model = %ns.model_id, replicas = rep.replicas, "namespace registered by a peer");
        } else if (r.replication.replicas, r.replication.w()) != (rep.replicas, rep.w()) {
            tracing::warn!(
                namespace = %r.id,
                here = r.replication.replicas,
                peer = rep.replicas,
                "a peer registered this namespace with other replication: this node keeps its own"
            );
        }
        Ok(())
    }

    async fn replica_put_inner(&self, mut s: MessageReader) -> Result<proto::PutResponse, Status> {
        let header = match s.decode::<proto::ReplicaPutRequest>().await? {
            Some(proto::ReplicaPutRequest {
                msg: Some(replica_put_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(invalid("the first ReplicaPut message must be a header"));
            }
        };
        if let Some(spec) = &header.namespace {
            self.register(spec)?;
        }
        let ns = convert::namespace_id(&header.namespace_id)?;
        let block = self.node.block_bytes(ns)?;
        let keys = convert::keys(&header.keys, MAX_KEYS)?;
        let block = match header.chunk_len {
            None => block,
            Some(n) if keys.len() == 1 && n > 0 && n <= block => n,
            Some(n) => {
                return Err(invalid(format!(
                    "a replica chunk of {n} bytes must be one key of 1 to {block} bytes"
                )));
            }
        };
        let data = self
            .node
            .receive(
                &mut s,
                "replica put",
                keys.len(),
                block,
                |m: proto::ReplicaPutRequest| match m.msg {
                    Some(replica_put_request::Msg::Data(d)) => Some(d),
                    _ => None,
                },
            )
            .await?;
        let n = keys.len() as u64;
        let stand_in = header.hint_for.is_some();
        let strays = (!stand_in).then(|| keys.clone());
        let out = self
            .cluster
            .store_local(ns, keys, data, header.hint_for.map(NodeId))
            .await?;
        if let Some(keys) = strays {
            self.cluster.note_strays(ns, &keys);
        }
        self.cluster.counters.replica_blocks_received.fetch_add(n, Relaxed);
        Ok(out)
    }
}

/// The methods that carry block bytes, served by `crate::bulk`.
impl PeerService {
    pub(crate) async fn replica_put_bulk(&self, s: MessageReader) -> Result<proto::PutResponse, Status> {
        let t = Instant::now();
        let r = self.replica_put_inner(s).await;
        self.node.observe("ReplicaPut", t, &r);
        r
    }

    pub(crate) async fn replica_get_bulk(&self, s: MessageReader) -> Result<Vec<bytes::Bytes>, Status> {
        let t = Instant::now();
        let r = self.node.get_inner(s, false).await;
        if let Ok((_, n)) = &r {
            self.cluster
                .counters
                .replica_blocks_served
                .fetch_add(*n as u64, Relaxed);
        }
        let r = r.map(|(frames, _)| frames);
        self.node.observe("ReplicaGet", t, &r);
        r
    }
}

#[tonic::async_trait]
impl proto::peer_server::Peer for PeerService {
    async fn ping(&self, req: Request<proto::PingRequest>) -> Reply<proto::PingResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = self.cluster.heard_from(&req.from, req.placement_slots).map(|()| {
            let (members_epoch, members_digest) = self.cluster.list_clock();
            proto::PingResponse {
                node_id: self.cluster.me().0.clone(),
                epoch: self.cluster.epoch(),
                members_epoch,
                members_digest,
                placement_slots: self.cluster.slots(),
            }
        });
        self.node.observe("Ping", t, &r);
        r.map(Response::new)
    }

    async fn replica_register(
        &self,
        req: Request<proto::ReplicaRegisterRequest>,
    ) -> Reply<proto::RegisterNamespaceResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = self.register(&req).and_then(|()| {
            let ns = convert::namespace(req.namespace.as_ref().expect("checked by register"))?;
            let rep = self.node.registry().replication(ns.id());
            Ok(proto::RegisterNamespaceResponse {
                namespace_id: bytes::Bytes::copy_from_slice(&ns.id().0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
                replicas: rep.replicas as u32,
                write_quorum: rep.w() as u32,
            })
        });
        self.node.observe("ReplicaRegister", t, &r);
        r.map(Response::new)
    }

    async fn replica_put(&self, _req: Request<Streaming<proto::ReplicaPutRequest>>) -> Reply<proto::PutResponse> {
        Err(crate::bulk::not_here("ReplicaPut"))
    }

    type ReplicaGetStream = GetStream;

    async fn replica_get(&self, _req: Request<proto::GetRequest>) -> Reply<GetStream> {
        Err(crate::bulk::not_here("ReplicaGet"))
    }

    type ReplicaGetChunkStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::ReplicaChunkPiece, Status>> + Send>>;

    async fn replica_get_chunk(&self, req: Request<proto::ReplicaChunkRequest>) -> Reply<Self::ReplicaGetChunkStream> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let key = convert::keys(std::slice::from_ref(&req.key), 1)?[0];
            let m = self.node.manager.clone();
            let got = tokio::task::spawn_blocking(move || m.load_one_local(ns, key))
                .await
                .map_err(|e| status_of(ErrorKind::Internal, format!("load task: {e}")))?
                .map_err(|e| {
                    // Dropped here; the reader rewrites it from a good copy.
                    if e.kind() == ErrorKind::ChecksumMismatch {
                        self.node.repair.found_corrupt(&Holder::Here, false);
                    }
                    status(&e)
                })?;
            let pieces: Vec<Result<proto::ReplicaChunkPiece, Status>> = match got {
                None => vec![Ok(proto::ReplicaChunkPiece {
                    found: false,
                    data: bytes::Bytes::new(),
                })],
                Some(d) => {
                    self.cluster.counters.replica_blocks_served.fetch_add(1, Relaxed);
                    let d = bytes::Bytes::from(d);
                    kvtier_proto::chunk::pieces(&d)
                        .map(|data| Ok(proto::ReplicaChunkPiece { found: true, data }))
                        .collect()
                }
            };
            Ok::<Self::ReplicaGetChunkStream, Status>(Box::pin(tokio_stream::iter(pieces)))
        }
        .await;
        self.node.observe("ReplicaGetChunk", t, &r);
        r.map(Response::new)
    }

    async fn replica_delete(&self, req: Request<proto::ReplicaDeleteRequest>) -> Reply<proto::DeleteResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            if req.written_before_ms != 0 {
                return Err(invalid(
                    "ReplicaDelete takes no written_before_ms: a late delete is ReplicaLateDelete",
                ));
            }
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            let n = self
                .cluster
                .replica_delete(ns, keys, req.missed, req.deleted_ms, 0)
                .await?;
            Ok(proto::DeleteResponse { removed: n as u32 })
        }
        .await;
        self.node.observe("ReplicaDelete", t, &r);
        r.map(Response::new)
    }

    async fn replica_late_delete(&self, req: Request<proto::ReplicaDeleteRequest>) -> Reply<proto::DeleteResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            if req.written_before_ms == 0 || !req.missed.is_empty() {
                return Err(invalid(
                    "ReplicaLateDelete needs written_before_ms > 0, and names no missed members",
                ));
            }
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            let n = self
                .cluster
                .replica_delete(ns, keys, Vec::new(), 0, req.written_before_ms)
                .await?;
            Ok(proto::DeleteResponse { removed: n as u32 })
        }
        .await;
        self.node.observe("ReplicaLateDelete", t, &r);
        r.map(Response::new)
    }

    async fn replica_lookup(&self, req: Request<proto::LookupRequest>) -> Reply<proto::LookupResponse> {
        let t = Instant::now();
        let r = self.node.lookup_inner(req.into_inner(), false).await;
        self.node.observe("ReplicaLookup", t, &r);
        r.map(Response::new)
    }

    async fn replica_has(&self, req: Request<proto::LookupRequest>) -> Reply<proto::ReplicaHasResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = convert::namespace_id(&req.namespace_id).and_then(|ns| {
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            let has = self.cluster.has_local(ns, &keys)?;
            let deleted = self.cluster.deleted_at(ns, &keys);
            Ok(proto::ReplicaHasResponse {
                present: kvtier_proto::chunk::bitmap(&has),
                // Only when some key has one: most answers carry none.
                deleted_ms: if deleted.iter().any(|d| *d > 0) {
                    deleted
                } else {
                    Vec::new()
                },
            })
        });
        self.node.observe("ReplicaHas", t, &r);
        r.map(Response::new)
    }

    async fn join(&self, req: Request<proto::JoinRequest>) -> Reply<proto::MembershipResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let weight = if req.weight == 0.0 { 1.0 } else { req.weight };
        let m = kvtier::replication::placement::Member {
            id: NodeId(req.id),
            addr: req.addr,
            weight,
        };
        let r = self.cluster.join(m, req.forwarded).await;
        self.node.observe("Join", t, &r);
        r.map(Response::new)
    }

    async fn leave(&self, req: Request<proto::LeaveRequest>) -> Reply<proto::MembershipResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = if req.id.is_empty() {
            Err(invalid("a leaving member needs an id"))
        } else {
            self.cluster.leave(NodeId(req.id), req.forwarded).await
        };
        self.node.observe("Leave", t, &r);
        r.map(Response::new)
    }

    async fn blob_notices(&self, req: Request<proto::BlobNoticesRequest>) -> Reply<proto::BlobNoticesResponse> {
        let t = Instant::now();
        let r = blob_notices(&req.into_inner()).map(|(from, groups)| {
            let (settled, taken_over) = self.cluster.blob_notices_received(&from, &groups);
            proto::BlobNoticesResponse {
                settled: settled as u32,
                taken_over: taken_over as u32,
            }
        });
        self.node.observe("BlobNotices", t, &r);
        r.map(Response::new)
    }

    async fn members(&self, req: Request<proto::MembersRequest>) -> Reply<proto::MemberList> {
        let t = Instant::now();
        let r = match req.into_inner().offer {
            Some(offer) => self.cluster.adopt_list(offer, "an offer").await.map(|_| ()),
            None => Ok(()),
        }
        .map(|()| self.cluster.member_list());
        self.node.observe("Members", t, &r);
        r.map(Response::new)
    }
}

/// A blob notice request, checked whole before any of it is acted on: the
/// sender, and per namespace the landed and given-up keys.
type Groups = Vec<(kvtier::NamespaceId, Vec<kvtier::BlockKey>, Vec<kvtier::BlockKey>)>;

fn blob_notices(req: &proto::BlobNoticesRequest) -> Result<(NodeId, Groups), Status> {
    if req.from.is_empty() {
        return Err(invalid("blob notices need the sender's id in `from`"));
    }
    let total: usize = req.groups.iter().map(|g| g.landed.len() + g.gave_up.len()).sum();
    if total > crate::cluster::MAX_NOTICE_KEYS {
        return Err(invalid(format!(
            "{total} keys in blob notices exceed the limit of {} per message",
            crate::cluster::MAX_NOTICE_KEYS
        )));
    }
    let keys = |raw: &[bytes::Bytes]| {
        if raw.is_empty() {
            Ok(Vec::new())
        } else {
            convert::keys(raw, crate::cluster::MAX_NOTICE_KEYS)
        }
    };
    let groups = req
        .groups
        .iter()
        .map(|g| {
            Ok((
                convert::namespace_id(&g.namespace_id)?,
                keys(&g.landed)?,
                keys(&g.gave_up)?,
            ))
        })
        .collect::<Result<Groups, Status>>()?;
    Ok((NodeId(req.from.clone()), groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_blob_notices_are_refused_whole_and_precisely() {
        let k = |b: u8| bytes::Bytes::from(vec![b; 16]);
        let group = |ns: bytes::Bytes, landed: Vec<bytes::Bytes>| proto::BlobNoticeGroup {
            namespace_id: ns,
            landed,
            gave_up: vec![k(9)],
        };
        let good = proto::BlobNoticesRequest {
            from: "a".into(),
            groups: vec![group(k(1), vec![k(2), k(3)]), group(k(4), vec![])],
        };
        let (from, groups) = blob_notices(&good).unwrap();
        assert_eq!(from, NodeId("a".into()));
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].1.len(), groups[0].2.len(), groups[1].1.len()), (2, 1, 0));
        let msg = |r: proto::BlobNoticesRequest| blob_notices(&r).unwrap_err().message().to_string();
        let mut bad = good.clone();
        bad.from.clear();
        assert!(msg(bad).contains("sender's id"));
        let mut bad = good.clone();
        bad.groups[1].landed.push(bytes::Bytes::from_static(b"short"));
        assert!(msg(bad).contains("key 0 must be 16 bytes, got 5"));
        let mut bad = good.clone();
        bad.groups[0].namespace_id = bytes::Bytes::new();
        assert!(msg(bad).contains("namespace_id must be 16 bytes"));
        let mut bad = good;
        bad.groups[0].landed = vec![k(2); crate::cluster::MAX_NOTICE_KEYS];
        assert!(msg(bad).contains("exceed the limit"));
    }
}
