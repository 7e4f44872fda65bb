//! The `KvTier` gRPC service: a thin adapter over the local [`Node`].

use bytes::Bytes;
use kvtier::replication::Replication;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::node::{GetStream, MAX_KEYS, Node};
use crate::proto;
use crate::{invalid, status, status_of};
use kvtier::ErrorKind;
use kvtier_proto::wire::MessageReader;

/// The service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KvTierService {
    node: Arc<Node>,
}

impl KvTierService {
    /// The service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The methods that carry block bytes, served by `crate::bulk`.
impl KvTierService {
    pub(crate) async fn put_bulk(&self, s: MessageReader) -> Result<proto::PutResponse, Status> {
        let t = Instant::now();
        let r = self.node.put_inner(s).await;
        self.node.observe("Put", t, &r);
        r
    }

    pub(crate) async fn get_bulk(&self, s: MessageReader) -> Result<Vec<Bytes>, Status> {
        let t = Instant::now();
        let r = self.node.get_inner(s, true).await.map(|(frames, _)| frames);
        self.node.observe("Get", t, &r);
        r
    }
}

#[tonic::async_trait]
impl proto::kv_tier_server::KvTier for KvTierService {
    async fn register_namespace(
        &self,
        req: Request<proto::RegisterNamespaceRequest>,
    ) -> Reply<proto::RegisterNamespaceResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let p = req
                .namespace
                .ok_or_else(|| invalid("namespace is required"))?;
            let ns = convert::namespace(&p)?;
            let rep = match (req.replicas, req.write_quorum) {
                (None, None) => None,
                (r, w) => Some(Replication {
                    replicas: r.unwrap_or(1) as usize,
                    write_quorum: w.map(|w| w as usize),
                }),
            };
            if let Some(rep) = rep {
                let members = self.node.cluster.as_ref().map_or(1, |c| c.size());
                rep.validate(members).map_err(|e| {
                    invalid(if self.node.cluster.is_none() {
                        format!("{e} (kvtierd runs without a [cluster] table)")
                    } else {
                        e
                    })
                })?;
            }
            let reg = self.node.registry.register(&ns, rep, false)?;
            if reg.new {
                tracing::info!(namespace = %reg.id, model = %ns.model_id, block_bytes = ns.block_bytes(), replicas = reg.replication.replicas, "namespace registered");
                if let Some(c) = &self.node.cluster {
                    c.register_everywhere(reg.id).await;
                }
            }
            Ok(proto::RegisterNamespaceResponse {
                namespace_id: Bytes::copy_from_slice(&reg.id.0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
                replicas: reg.replication.replicas as u32,
                write_quorum: reg.replication.w() as u32,
            })
        }
        .await;
        self.node.observe("RegisterNamespace", t, &r);
        r.map(Response::new)
    }

    async fn list_namespaces(
        &self,
        _req: Request<proto::ListNamespacesRequest>,
    ) -> Reply<proto::ListNamespacesResponse> {
        let t = Instant::now();
        let namespaces = self
            .node
            .registry
            .all()
            .into_iter()
            .map(|(id, ns, rep)| proto::NamespaceInfo {
                namespace_id: Bytes::copy_from_slice(&id.0.to_le_bytes()),
                block_bytes: ns.block_bytes(),
                namespace: Some(convert::namespace_proto(&ns)),
                replicas: rep.replicas as u32,
                write_quorum: rep.w() as u32,
            })
            .collect();
        let r = Ok(proto::ListNamespacesResponse { namespaces });
        self.node.observe("ListNamespaces", t, &r);
        r.map(Response::new)
    }

    async fn lookup(&self, req: Request<proto::LookupRequest>) -> Reply<proto::LookupResponse> {
        let t = Instant::now();
        let r = self.node.lookup_inner(req.into_inner(), true).await;
        self.node.observe("Lookup", t, &r);
        r.map(Response::new)
    }

    async fn events(&self, req: Request<proto::EventsRequest>) -> Reply<proto::EventsResponse> {
        let t = Instant::now();
        let r = (|| {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let page = self
                .node
                .manager
                .events(ns, req.epoch, req.after, req.max_events as usize)
                .map_err(|e| status(&e))?;
            Ok(convert::event_page(&page))
        })();
        self.node.observe("Events", t, &r);
        r.map(Response::new)
    }

    async fn locate(&self, req: Request<proto::LocateRequest>) -> Reply<proto::LocateResponse> {
        let t = Instant::now();
        let r = (|| {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, kvtier::events::MAX_READ)?;
            let located = self.node.manager.locate(ns, &keys).map_err(|e| status(&e))?;
            Ok(proto::LocateResponse {
                keys: located
                    .into_iter()
                    .map(|s| proto::KeyTiers {
                        tiers: s.iter().map(|t| convert::tier(t) as i32).collect(),
                    })
                    .collect(),
            })
        })();
        self.node.observe("Locate", t, &r);
        r.map(Response::new)
    }

    async fn list_keys(&self, req: Request<proto::ListKeysRequest>) -> Reply<proto::ListKeysResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let after = match &req.after[..] {
                [] => None,
                b => Some(kvtier::BlockKey::from_le_bytes(b.try_into().map_err(|_| {
                    invalid(format!("after must be empty or a 16-byte key, got {} bytes", b.len()))
                })?)),
            };
            let m = self.node.manager.clone();
            // The page walks the namespace's whole index: off the runtime.
            let (keys, more) = tokio::task::spawn_blocking(move || m.list_keys(ns, after, req.max_keys as usize))
                .await
                .map_err(|e| status_of(ErrorKind::Internal, format!("list task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::ListKeysResponse {
                keys: keys.iter().map(convert::key_bytes).collect(),
                more,
            })
        }
        .await;
        self.node.observe("ListKeys", t, &r);
        r.map(Response::new)
    }

    async fn put(&self, _req: Request<Streaming<proto::PutRequest>>) -> Reply<proto::PutResponse> {
        Err(crate::bulk::not_here("Put"))
    }

    type GetStream = GetStream;

    async fn get(&self, _req: Request<proto::GetRequest>) -> Reply<GetStream> {
        Err(crate::bulk::not_here("Get"))
    }

    async fn delete(&self, req: Request<proto::DeleteRequest>) -> Reply<proto::DeleteResponse> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let ns = convert::namespace_id(&req.namespace_id)?;
            let keys = convert::keys(&req.keys, MAX_KEYS)?;
            self.node.block_bytes(ns)?;
            if let Some(c) = &self.node.cluster {
                // Every member's copies, not only this node's.
                let n = c.delete_everywhere(ns, &keys).await?;
                return Ok(proto::DeleteResponse { removed: n as u32 });
            }
            let m = self.node.manager.clone();
            let n = tokio::task::spawn_blocking(move || m.remove(ns, &keys))
                .await
                .map_err(|e| status_of(ErrorKind::Internal, format!("delete task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::DeleteResponse { removed: n as u32 })
        }
        .await;
        self.node.observe("Delete", t, &r);
        r.map(Response::new)
    }

    async fn stats(&self, _req: Request<proto::StatsRequest>) -> Reply<proto::StatsResponse> {
        let t = Instant::now();
        let r = crate::stats::reply(&self.node.manager.stats())
            .and_then(|mut s| {
                s.cluster = self.node.cluster.as_ref().map(|c| c.stats());
                crate::stats::add_repair(&mut s, self.node.repair.stats())?;
                Ok(s)
            })
            .map_err(|e| status_of(ErrorKind::Internal, format!("stats: {e}")));
        self.node.observe("Stats", t, &r);
        r.map(Response::new)
    }

    async fn register_region(
        &self,
        req: Request<proto::RegisterRegionRequest>,
    ) -> Reply<proto::RegisterRegionResponse> {
        let t = Instant::now();
        let req = req.into_inner();
        let r = self
            .node
            .regions
            .register(&req.path, req.size)
            .map(|region_id| proto::RegisterRegionResponse { region_id });
        self.node.observe("RegisterRegion", t, &r);
        r.map(Response::new)
    }

    async fn unregister_region(
        &self,
        req: Request<proto::UnregisterRegionRequest>,
    ) -> Reply<proto::UnregisterRegionResponse> {
        let t = Instant::now();
        let r = self
            .node
            .regions
            .unregister(req.into_inner().region_id)
            .map(|()| proto::UnregisterRegionResponse {});
        self.node.observe("UnregisterRegion", t, &r);
        r.map(Response::new)
    }

    async fn put_region(&self, req: Request<proto::RegionRequest>) -> Reply<proto::PutResponse> {
        let t = Instant::now();
        let r = async {
            let job = self.node.region_request(&req.into_inner(), false)?;
            if let Some(c) = &self.node.cluster {
                // Peers need the bytes after the region may change: a copy.
                let data = Bytes::copy_from_slice(job.borrow.bytes());
                drop(job.borrow);
                return c.write(job.ns, &job.keys, data, job.block as usize).await;
            }
            let m = self.node.manager.clone();
            let out = tokio::task::spawn_blocking(move || m.store(job.ns, &job.keys, job.borrow.bytes()))
                .await
                .map_err(|e| status_of(ErrorKind::Internal, format!("store task: {e}")))?
                .map_err(|e| status(&e))?;
            Ok(proto::PutResponse {
                stored: out.stored as u32,
                present: out.present as u32,
                not_admitted: out.not_admitted as u32,
            })
        }
        .await;
        self.node.observe("PutRegion", t, &r);
        r.map(Response::new)
    }

    async fn get_region(&self, req: Request<proto::RegionRequest>) -> Reply<proto::GetHeader> {
        let t = Instant::now();
        let r = async {
            let mut job = self.node.region_request(&req.into_inner(), true)?;
            let block = job.block;
            let b = block as usize;
            let keys = Arc::new(std::mem::take(&mut job.keys));
            let (out, _job) = self
                .node
                .load_across(job.ns, keys, b, job, |j| j.borrow.bytes_mut(), true)
                .await?;
            Ok(crate::node::get_header(&out, block))
        }
        .await;
        self.node.observe("GetRegion", t, &r);
        r.map(Response::new)
    }

    async fn health(&self, _req: Request<proto::HealthRequest>) -> Reply<proto::HealthResponse> {
        let t = Instant::now();
        let mode = serde_json::to_value(self.node.manager.mode())
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let r = Ok(proto::HealthResponse {
            status: "serving".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mode,
            uptime_s: self.node.started.elapsed().as_secs(),
        });
        self.node.observe("Health", t, &r);
        r.map(Response::new)
    }
}
