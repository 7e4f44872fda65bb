//! The `Peer` gRPC service: what the nodes of a cluster ask each other.
//! Every call acts on this node's own tiers; nothing is forwarded.

use kvtier::replication::Replication;
use kvtier::replication::placement::NodeId;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use super::Cluster;
use crate::convert;
use crate::proto::{self, replica_put_request};
use crate::service::{GetStream, KvTierService, MAX_KEYS};

/// The service, over the same block manager as the client API.
#[derive(Debug, Clone)]
pub struct PeerService {
    svc: KvTierService,
    cluster: Arc<Cluster>,
}

type Reply<T> = Result<Response<T>, Status>;

impl PeerService {
    /// Serves `cluster`'s peers from `svc`'s manager.
    pub fn new(svc: KvTierService, cluster: Arc<Cluster>) -> Self {
        Self { svc, cluster }
    }

    /// Registers a namespace a peer sent, keeping the replication already
    /// registered here if there is one.
    fn register(&self, req: &proto::ReplicaRegisterRequest) -> Result<(), Status> {
        let p = req
            .namespace
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("namespace is required"))?;
        let ns = convert::namespace(p)?;
        let rep = Replication {
            replicas: (req.replicas as usize).max(1),
            write_quorum: (req.write_quorum > 0).then_some(req.write_quorum as usize),
        };
        let r = self.svc.registry().register(&ns, Some(rep), true)?;
        if r.new {
            tracing::info!(namespace = %r.id, model = %ns.model_id, replicas = rep.replicas, "namespace registered by a peer");
        } else if r.replication != rep {
            tracing::warn!(
                namespace = %r.id,
                here = r.replication.replicas,
                peer = rep.replicas,
                "a peer registered this namespace with other replication: this node keeps its own"
            );
        }
        Ok(())
    }

    async fn replica_put_inner(
        &self,
        mut s: Streaming<proto::ReplicaPutRequest>,
    ) -> Result<proto::PutResponse, Status> {
        let header = match s.message().await? {
            Some(proto::ReplicaPutRequest {
                msg: Some(replica_put_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first ReplicaPut message must be a header",
                ));
            }
        };
        if let Some(spec) = &header.namespace {
            self.register(spec)?;
        }
        let ns = convert::namespace_id(&header.namespace_id)?;
        let block = self.svc.block_bytes(ns)?;
        let keys = convert::keys(&header.keys, MAX_KEYS)?;
        let data = self
            .svc
            .receive(&mut s, "replica put", keys.len(), block, |m| match m.msg {
                Some(replica_put_request::Msg::Data(d)) => Some(d),
                _ => None,
            })
            .await?;
        let n = keys.len() as u64;
        let out = self
            .cluster
            .store_local(ns, keys, data, header.hint_for.map(NodeId))
            .await?;
        self.cluster.counters.replica_blocks_received.fetch_add(n, Relaxed);
        Ok(out)
    }
}

#[tonic::async_trait]
impl proto::peer_server::Peer for PeerService {
    async fn ping(&self, req: Request<proto::PingRequest>) -> Reply<proto::PingResponse> {
        let t = Instant::now();
        self.cluster.heard_from(&req.into_inner().from);
        let r = Ok(proto::PingResponse {
            node_id: self.cluster.me().0.clone(),
            epoch: self.cluster.epoch(),
        });
        self.svc.observe("Ping", t, &r);
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
            let rep = self.svc.registry().replication(ns.id());
            Ok(proto::RegisterNamespaceResponse {
                namespace_id: bytes::Bytes::copy_from_slice(&ns.id().0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
                replicas: rep.replicas as u32,
                write_quorum: rep.w() as u32,
            })
        });
        self.svc.observe("ReplicaRegister", t, &r);
        r.map(Response::new)
    }

    async fn replica_put(&self, req: Request<Streaming<proto::ReplicaPutRequest>>) -> Reply<proto::PutResponse> {
        let t = Instant::now();
        let r = self.replica_put_inner(req.into_inner()).await;
        self.svc.observe("ReplicaPut", t, &r);
        r.map(Response::new)
    }

    type ReplicaGetStream = GetStream;

    async fn replica_get(&self, req: Request<proto::GetRequest>) -> Reply<GetStream> {
        let t = Instant::now();
        let r = self.svc.get_inner(req.into_inner(), false).await;
        if let Ok((_, n)) = &r {
            self.cluster
                .counters
                .replica_blocks_served
                .fetch_add(*n as u64, Relaxed);
        }
        let r = r.map(|(s, _)| s);
        self.svc.observe("ReplicaGet", t, &r);
        r.map(Response::new)
    }

    async fn replica_lookup(&self, req: Request<proto::LookupRequest>) -> Reply<proto::LookupResponse> {
        let t = Instant::now();
        let r = self.svc.lookup_inner(req.into_inner(), false).await;
        self.svc.observe("ReplicaLookup", t, &r);
        r.map(Response::new)
    }
}
