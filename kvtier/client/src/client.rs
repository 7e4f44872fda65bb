//! [`Client`]: one connection to a kvtierd, for the KvTier and Peer services.

use bytes::{Bytes, BytesMut};
use kvtier::events::{EventPage, TierSet};
use kvtier::{BlockKey, Namespace, NamespaceId};
use prost::Message as _;
use std::path::PathBuf;
use std::time::Duration;
use tonic::codegen::Service;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use kvtier::{Error, ErrorKind, Result};
use kvtier_proto::chunk::{from_bitmap, piece_count, pieces};
use kvtier_proto::convert::{self, key_bytes};
use kvtier_proto::error::from_status;
use kvtier_proto::proto::kv_tier_client::KvTierClient;
use kvtier_proto::proto::peer_client::PeerClient;
use kvtier_proto::proto::{self, get_response, put_request, replica_put_request};
use kvtier_proto::wire::{self, Message, MessageReader};
use kvtier_proto::{H2_CONNECTION_WINDOW_BYTES, H2_MAX_FRAME_BYTES, H2_STREAM_WINDOW_BYTES, MAX_MESSAGE_BYTES};

use crate::SharedRegion;

/// Reads a gRPC result into a core one: the status's kind comes back
/// through the protocol's one reader.
trait Wire<T> {
    fn wire(self) -> Result<T>;
}

impl<T> Wire<T> for std::result::Result<T, Status> {
    fn wire(self) -> Result<T> {
        self.map_err(from_status)
    }
}

/// How long [`Client::connect`] waits for the daemon at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://...` for TLS.
    pub endpoint: String,
    /// Bearer token, when the daemon requires one.
    pub token: Option<String>,
    /// PEM CA certificate to trust for TLS (the system roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// Name to verify in the server's certificate, if not the endpoint's host.
    pub tls_domain: Option<String>,
    /// Bound on each call, answer included: a daemon that accepts but does
    /// not answer (stopped, wedged) fails the call as Unavailable instead of
    /// holding the caller. None: no bound.
    pub request_timeout: Option<Duration>,
}

/// Adds the bearer token to every request.
#[derive(Clone, Debug)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to kvtierd. Cheap to clone: clones share the channel.
#[derive(Clone, Debug)]
pub struct Client {
    inner: KvTierClient<InterceptedService<Channel, Auth>>,
    peer: PeerClient<InterceptedService<Channel, Auth>>,
    /// For checkpoint chunk stores over the same connection.
    channel: (Channel, Auth),
}

/// What a Get brought back: the leading `loaded` blocks, verified.
#[derive(Debug, Clone)]
pub struct Got {
    /// Blocks in `data`.
    pub loaded: usize,
    /// Bytes per block.
    pub block_bytes: u64,
    /// The block that failed verification, if one did (never served).
    pub failed_index: Option<usize>,
    /// Why it failed.
    pub failed_reason: String,
    /// The kind of that failure ([`ErrorKind::ChecksumMismatch`] for a
    /// block with no good copy); `None` when none failed, or for a kind
    /// this build does not know.
    pub failed_kind: Option<ErrorKind>,
    /// The loaded blocks back to back.
    pub data: Bytes,
}

fn ns_bytes(ns: NamespaceId) -> Bytes {
    Bytes::copy_from_slice(&ns.0.to_le_bytes())
}

impl Client {
    /// Connects (lazily retried by the channel afterwards).
    ///
    /// A daemon that cannot be reached is [`ErrorKind::Unavailable`]; a
    /// malformed endpoint, token or CA file is [`ErrorKind::Config`].
    pub async fn connect(cfg: &ClientConfig) -> Result<Self> {
        // A bounded call is bounded when connecting too.
        let connect = cfg.request_timeout.map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT));
        let ep = Self::endpoint(cfg, connect)?;
        let channel = ep.connect().await.map_err(|e| {
            Error::with_source(
                ErrorKind::Unavailable,
                format!("connect to {}: {}", cfg.endpoint, error_chain(&e)),
                e,
            )
        })?;
        Self::over(channel, cfg)
    }

    /// A client that connects on its first call (and again after a
    /// failure), each connection attempt bounded by `connect_timeout`:
    /// kvtierd's handle on a peer that may be down.
    pub fn lazy(cfg: &ClientConfig, connect_timeout: Duration) -> Result<Self> {
        Self::lazy_from(cfg, connect_timeout, None)
    }

    /// As [`Client::lazy`], each connection leaving from `local` (a
    /// multi-homed host's address on the peers' network) when set.
    pub fn lazy_from(cfg: &ClientConfig, connect_timeout: Duration, local: Option<std::net::IpAddr>) -> Result<Self> {
        let channel = Self::endpoint(cfg, connect_timeout)?
            .local_address(local)
            .connect_lazy();
        Self::over(channel, cfg)
    }

    fn endpoint(cfg: &ClientConfig, connect_timeout: Duration) -> Result<Endpoint> {
        let mut ep = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| Error::with_source(ErrorKind::Config, format!("endpoint {:?}: {e}", cfg.endpoint), e))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(H2_STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(H2_CONNECTION_WINDOW_BYTES))
            // What the daemon may send in one DATA frame: with h2's default
            // (16 KiB) a Get's bytes cost a third more CPU to receive.
            .max_frame_size(Some(H2_MAX_FRAME_BYTES))
            .connect_timeout(connect_timeout);
        if let Some(t) = cfg.request_timeout {
            ep = ep.timeout(t);
        }
        if cfg.endpoint.starts_with("https://") || cfg.ca_file.is_some() {
            crate::install_crypto_provider();
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| Error::with_source(ErrorKind::Config, format!("CA file {}: {e}", ca.display()), e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(d) = &cfg.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| Error::with_source(ErrorKind::Config, format!("TLS: {e}"), e))?;
        }
        Ok(ep)
    }

    /// The raw `Checkpoints` client over this connection.
    pub fn checkpoints(
        &self,
    ) -> kvtier_proto::checkpoint_proto::checkpoints_client::CheckpointsClient<InterceptedService<Channel, Auth>> {
        let (channel, auth) = self.channel.clone();
        kvtier_proto::checkpoint_proto::checkpoints_client::CheckpointsClient::with_interceptor(channel, auth)
    }

    /// A [`crate::RemoteChunks`] for checkpoint `group` over
    /// this connection; its calls block on `rt`.
    pub fn checkpoint_chunks(&self, group: &str, chunk_bytes: u32, rt: tokio::runtime::Handle) -> crate::RemoteChunks {
        let (channel, auth) = self.channel.clone();
        crate::RemoteChunks::new(channel, auth, group, chunk_bytes, rt)
    }

    fn over(channel: Channel, cfg: &ClientConfig) -> Result<Self> {
        let auth = match &cfg.token {
            None => Auth(None),
            Some(t) => Auth(Some(format!("Bearer {t}").parse().map_err(|_| {
                Error::new(ErrorKind::Config, "the token has characters a header cannot carry")
            })?)),
        };
        let inner = KvTierClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let peer = PeerClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            inner,
            peer,
            channel: (channel, auth),
        })
    }

    /// Registers `ns`; answers its id and block size.
    pub async fn register(&self, ns: &Namespace) -> Result<(NamespaceId, u64)> {
        let r = self.register_replicated(ns, None, None).await?;
        Ok((convert::namespace_id(&r.namespace_id).wire()?, r.block_bytes))
    }

    /// Registers `ns` with `replicas` copies of each block in a cluster,
    /// `write_quorum` of which a Put waits for (all by default).
    pub async fn register_replicated(
        &self,
        ns: &Namespace,
        replicas: Option<u32>,
        write_quorum: Option<u32>,
    ) -> Result<proto::RegisterNamespaceResponse> {
        Ok(self
            .inner
            .clone()
            .register_namespace(proto::RegisterNamespaceRequest {
                namespace: Some(convert::namespace_proto(ns)),
                replicas,
                write_quorum,
            })
            .await
            .wire()?
            .into_inner())
    }

    /// The daemon's namespaces.
    pub async fn namespaces(&self) -> Result<Vec<proto::NamespaceInfo>> {
        Ok(self
            .inner
            .clone()
            .list_namespaces(proto::ListNamespacesRequest {})
            .await
            .wire()?
            .into_inner()
            .namespaces)
    }

    /// The longest present prefix of `keys` and the tier of each block.
    pub async fn lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<proto::LookupResponse> {
        Ok(self
            .inner
            .clone()
            .lookup(proto::LookupRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await
            .wire()?
            .into_inner())
    }

    /// The tier events of `ns` after `after`, at most `max`; `epoch` is the
    /// one of the last answer (0 at first). See `kvtier::events`.
    pub async fn events(&self, ns: NamespaceId, epoch: u64, after: u64, max: u32) -> Result<EventPage> {
        let r = self
            .inner
            .clone()
            .events(proto::EventsRequest {
                namespace_id: ns_bytes(ns),
                epoch,
                after,
                max_events: max,
            })
            .await
            .wire()?
            .into_inner();
        convert::event_page_from_wire(r).wire()
    }

    /// Which of the daemon's tiers hold each of `keys`.
    pub async fn locate(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Vec<TierSet>> {
        let r = self
            .inner
            .clone()
            .locate(proto::LocateRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await
            .wire()?
            .into_inner();
        let located = convert::located_from_wire(r);
        if located.len() != keys.len() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("locate answered {} keys for {}", located.len(), keys.len()),
            ));
        }
        Ok(located)
    }

    /// A page of the keys of `ns` that the daemon's own tiers hold: those
    /// after `after` (from the start when `None`) in ascending order, at
    /// most `max` (1 to 65536), and whether more follow.
    pub async fn list_keys(&self, ns: NamespaceId, after: Option<BlockKey>, max: u32) -> Result<(Vec<BlockKey>, bool)> {
        let r = self
            .inner
            .clone()
            .list_keys(proto::ListKeysRequest {
                namespace_id: ns_bytes(ns),
                after: after.as_ref().map(key_bytes).unwrap_or_default(),
                max_keys: max,
            })
            .await
            .wire()?
            .into_inner();
        if r.keys.len() > max as usize {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("list_keys answered {} keys for at most {max}", r.keys.len()),
            ));
        }
        let keys = if r.keys.is_empty() {
            Vec::new()
        } else {
            convert::keys(&r.keys, max as usize).wire()?
        };
        Ok((keys, r.more))
    }

    /// Stores `keys.len()` blocks laid out back to back in `data`.
    pub async fn put(&self, ns: NamespaceId, keys: &[BlockKey], data: Bytes) -> Result<proto::PutResponse> {
        let header = proto::PutRequest {
            msg: Some(put_request::Msg::Header(proto::PutHeader {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })),
        };
        let frames = with_data(wire::message(&header), &data);
        self.unary(PUT, frames).await
    }

    /// Sends a call of `path` framed by hand (`kvtier_proto::wire`), the
    /// request body being `frames`; answers the reader of its answer.
    async fn call(&self, path: &'static str, frames: Vec<Bytes>) -> Result<MessageReader> {
        let mut svc = InterceptedService::new(self.channel.0.clone(), self.channel.1.clone());
        let transport = |e: tonic::codegen::StdError| from_status(Status::from_error(e));
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .map_err(|e| transport(e.into()))?;
        let mut req = http::Request::new(wire::body(frames, None));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(path);
        *req.version_mut() = http::Version::HTTP_2;
        let h = req.headers_mut();
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        let resp = svc.call(req).await.map_err(|e| transport(e.into()))?;
        // A status in the headers: an answer without messages (an error).
        if let Some(s) = Status::from_header_map(resp.headers())
            && s.code() != tonic::Code::Ok
        {
            return Err(from_status(s));
        }
        if resp.status() != http::StatusCode::OK {
            let kind = match resp.status().as_u16() {
                502..=504 => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            };
            return Err(Error::new(kind, format!("{path} answered HTTP {}", resp.status())));
        }
        let body = tonic::body::Body::new(resp.into_body());
        Ok(MessageReader::new(body, MAX_MESSAGE_BYTES, ErrorKind::Internal))
    }

    /// A call of `path` with one answer message `M`.
    async fn unary<M: prost::Message + Default>(&self, path: &'static str, frames: Vec<Bytes>) -> Result<M> {
        let mut r = self.call(path, frames).await?;
        let m = r.decode::<M>().await.wire()?;
        r.finish().await.wire()?;
        m.ok_or_else(|| Error::new(ErrorKind::Internal, format!("{path} answered no message")))
    }

    /// Starts a Get (or a ReplicaGet, by `path`): its header, and the
    /// reader of its data messages.
    async fn start_get(
        &self,
        path: &'static str,
        ns: NamespaceId,
        keys: &[BlockKey],
    ) -> Result<(proto::GetHeader, MessageReader)> {
        let req = proto::GetRequest {
            namespace_id: ns_bytes(ns),
            keys: keys.iter().map(key_bytes).collect(),
        };
        let mut r = self.call(path, vec![wire::message(&req)]).await?;
        match r.next(wire::DATA_FIELD).await.wire()? {
            Some(Message::Whole(b)) => match proto::GetResponse::decode(b) {
                Ok(proto::GetResponse {
                    msg: Some(get_response::Msg::Header(h)),
                }) => Ok((h, r)),
                _ => Err(Error::new(
                    ErrorKind::Internal,
                    "the Get stream did not start with a header",
                )),
            },
            // No message: the status says why.
            None => Err(r.finish().await.err().map_or_else(
                || Error::new(ErrorKind::Internal, "the Get stream did not start with a header"),
                from_status,
            )),
            Some(Message::Bytes(_)) => Err(Error::new(
                ErrorKind::Internal,
                "the Get stream did not start with a header",
            )),
        }
    }

    /// Hands the data of a Get, whose header announced `want` bytes, to
    /// `f` slice by slice (each at the offset it goes at), then checks the
    /// call's status.
    async fn receive_get(r: &mut MessageReader, want: usize, mut f: impl FnMut(usize, Bytes)) -> Result<()> {
        let mut at = 0;
        while let Some(m) = r.next(wire::DATA_FIELD).await.wire()? {
            let Message::Bytes(n) = m else {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "a Get header in the middle of the data",
                ));
            };
            if at + n > want {
                return Err(Error::new(
                    ErrorKind::ChecksumMismatch,
                    "the Get stream carried more bytes than its header said",
                ));
            }
            r.payload(|s| {
                let l = s.len();
                f(at, s);
                at += l;
                Ok(())
            })
            .await
            .wire()?;
        }
        r.finish().await.wire()?;
        if at != want {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!("the Get stream carried {at} of {want} bytes"),
            ));
        }
        Ok(())
    }

    /// Loads the leading present blocks of `keys`.
    pub async fn get(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Got> {
        let (h, r) = self.start_get(GET, ns, keys).await?;
        Self::gather(h, r).await
    }

    /// The data a Get's header announced, gathered: one slice is handed on
    /// as it is, more are copied into one buffer.
    async fn gather(h: proto::GetHeader, mut r: MessageReader) -> Result<Got> {
        let want = h.loaded as usize * h.block_bytes as usize;
        let mut parts = Vec::new();
        Self::receive_get(&mut r, want, |_, s| parts.push(s)).await?;
        let data = match parts.len() {
            0 => Bytes::new(),
            1 => parts.pop().expect("one part"),
            _ => {
                let mut buf = BytesMut::with_capacity(want);
                parts.iter().for_each(|p| buf.extend_from_slice(p));
                buf.freeze()
            }
        };
        Ok(Got {
            loaded: h.loaded as usize,
            block_bytes: h.block_bytes,
            failed_index: h.failed_index.map(|i| i as usize),
            failed_reason: h.failed_reason,
            failed_kind: ErrorKind::from_name(&h.failed_kind),
            data,
        })
    }

    /// Loads the leading present blocks of `keys` into `out` (at least
    /// `keys.len()` blocks long), with no allocation: engines and the bench
    /// reuse their (pinned, touched) buffers. Answers the header; the
    /// leading `loaded` blocks of `out` hold the data. The bytes are copied
    /// once, from the frames they arrived in.
    pub async fn get_into(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8]) -> Result<proto::GetHeader> {
        let (h, mut r) = self.start_get(GET, ns, keys).await?;
        let want = h.loaded as usize * h.block_bytes as usize;
        if want > out.len() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{} blocks of {} bytes do not fit a buffer of {}",
                    h.loaded,
                    h.block_bytes,
                    out.len()
                ),
            ));
        }
        Self::receive_get(&mut r, want, |at, s| out[at..at + s.len()].copy_from_slice(&s)).await?;
        Ok(h)
    }

    /// Removes blocks; answers how many were present.
    pub async fn delete(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<u32> {
        Ok(self
            .inner
            .clone()
            .delete(proto::DeleteRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await
            .wire()?
            .into_inner()
            .removed)
    }

    /// Registers a region; answers its id for put_region and get_region.
    pub async fn register_region(&self, r: &SharedRegion) -> Result<u64> {
        let path = r
            .path()
            .to_str()
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "region path is not UTF-8"))?
            .to_string();
        Ok(self
            .inner
            .clone()
            .register_region(proto::RegisterRegionRequest {
                path,
                size: r.len() as u64,
            })
            .await
            .wire()?
            .into_inner()
            .region_id)
    }

    /// Forgets a region.
    pub async fn unregister_region(&self, region_id: u64) -> Result<()> {
        self.inner
            .clone()
            .unregister_region(proto::UnregisterRegionRequest { region_id })
            .await
            .map(drop)
            .wire()
    }

    fn region_request(ns: NamespaceId, keys: &[BlockKey], region_id: u64, offset: u64) -> proto::RegionRequest {
        proto::RegionRequest {
            namespace_id: ns_bytes(ns),
            keys: keys.iter().map(key_bytes).collect(),
            region_id,
            offset,
        }
    }

    /// Stores the blocks lying at `offset` of a registered region.
    pub async fn put_region(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        region_id: u64,
        offset: u64,
    ) -> Result<proto::PutResponse> {
        let req = Self::region_request(ns, keys, region_id, offset);
        Ok(self.inner.clone().put_region(req).await.wire()?.into_inner())
    }

    /// Loads the leading present blocks into a registered region at `offset`.
    pub async fn get_region(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        region_id: u64,
        offset: u64,
    ) -> Result<proto::GetHeader> {
        let req = Self::region_request(ns, keys, region_id, offset);
        Ok(self.inner.clone().get_region(req).await.wire()?.into_inner())
    }

    /// The manager's counters as JSON.
    pub async fn stats(&self) -> Result<String> {
        Ok(self.stats_reply().await?.json)
    }

    /// The whole Stats reply: the JSON, and the blob tier's and the
    /// writeback's counters as typed fields.
    pub async fn stats_reply(&self) -> Result<proto::StatsResponse> {
        Ok(self
            .inner
            .clone()
            .stats(proto::StatsRequest {})
            .await
            .wire()?
            .into_inner())
    }

    /// Liveness and identity.
    pub async fn health(&self) -> Result<proto::HealthResponse> {
        Ok(self
            .inner
            .clone()
            .health(proto::HealthRequest {})
            .await
            .wire()?
            .into_inner())
    }

    // The Peer service: what kvtierd nodes ask each other. Tests and tools
    // use it to read one node's own tiers.

    /// A heartbeat from node `from` at membership `epoch`, placing keys in
    /// `placement_slots` slots (a node placing them otherwise refuses it
    /// with [`ErrorKind::Config`](kvtier::ErrorKind::Config)).
    pub async fn ping(&self, from: &str, epoch: u64, placement_slots: u32) -> Result<proto::PingResponse> {
        Ok(self
            .peer
            .clone()
            .ping(proto::PingRequest {
                from: from.into(),
                epoch,
                placement_slots,
            })
            .await
            .wire()?
            .into_inner())
    }

    /// Registers a namespace on this node only.
    pub async fn replica_register(&self, req: proto::ReplicaRegisterRequest) -> Result<()> {
        self.peer.clone().replica_register(req).await.map(drop).wire()
    }

    /// Stores copies of `keys` (back to back in `data`) on this node only;
    /// `spec` registers the namespace first where it is missing, and
    /// `hint_for` makes this node keep the blocks for that down replica.
    pub async fn replica_put(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: Bytes,
        spec: Option<proto::ReplicaRegisterRequest>,
        hint_for: Option<String>,
        chunk_len: Option<u64>,
    ) -> Result<proto::PutResponse> {
        let header = proto::ReplicaPutRequest {
            msg: Some(replica_put_request::Msg::Header(proto::ReplicaPutHeader {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
                namespace: spec,
                hint_for,
                chunk_len,
            })),
        };
        let frames = with_data(wire::message(&header), &data);
        self.unary(REPLICA_PUT, frames).await
    }

    /// One variable-length block from the peer's own tiers; `None` on a miss.
    pub async fn replica_get_chunk(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<Vec<u8>>> {
        let mut s = self
            .peer
            .clone()
            .replica_get_chunk(proto::ReplicaChunkRequest {
                namespace_id: ns_bytes(ns),
                key: key_bytes(&key),
            })
            .await
            .wire()?
            .into_inner();
        let mut out = Vec::new();
        while let Some(p) = s.message().await.wire()? {
            if !p.found {
                return Ok(None);
            }
            out.extend_from_slice(&p.data);
        }
        Ok(Some(out))
    }

    /// Removes `keys` from the peer's own tiers; answers how many it held.
    /// The peer keeps a tombstone, dated `deleted_ms` (Unix ms), for each of
    /// the `missed` members.
    pub async fn replica_delete(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        missed: &[String],
        deleted_ms: u64,
    ) -> Result<u32> {
        Ok(self
            .peer
            .clone()
            .replica_delete(proto::ReplicaDeleteRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
                missed: missed.to_vec(),
                deleted_ms,
                written_before_ms: 0,
            })
            .await
            .wire()?
            .into_inner()
            .removed)
    }

    /// Delivers a tombstone: removes the copies of `keys` in the peer's own
    /// tiers written before `written_before_ms` (Unix ms); answers how many
    /// it removed. A peer of a build without tombstones fails the call
    /// (UNIMPLEMENTED) instead of deleting more.
    pub async fn replica_late_delete(&self, ns: NamespaceId, keys: &[BlockKey], written_before_ms: u64) -> Result<u32> {
        Ok(self
            .peer
            .clone()
            .replica_late_delete(proto::ReplicaDeleteRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
                missed: Vec::new(),
                deleted_ms: 0,
                written_before_ms,
            })
            .await
            .wire()?
            .into_inner()
            .removed)
    }

    /// Loads the leading blocks of `keys` present in this node's own tiers.
    pub async fn replica_get(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Got> {
        let (h, r) = self.start_get(REPLICA_GET, ns, keys).await?;
        Self::gather(h, r).await
    }

    /// The longest prefix of `keys` present in this node's own tiers.
    pub async fn replica_lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<proto::LookupResponse> {
        Ok(self
            .peer
            .clone()
            .replica_lookup(proto::LookupRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await
            .wire()?
            .into_inner())
    }
}

/// Resync and rebalancing.
impl Client {
    /// Which of `keys` this node's own tiers (host, disk) hold.
    pub async fn replica_has(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Vec<bool>> {
        Ok(self.replica_has_or_deleted(ns, keys).await?.0)
    }

    /// [`Client::replica_has`], with the time of each key's delete this
    /// node keeps a tombstone for (Unix ms; 0 for none).
    pub async fn replica_has_or_deleted(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<(Vec<bool>, Vec<u64>)> {
        let r = self
            .peer
            .clone()
            .replica_has(proto::LookupRequest {
                namespace_id: ns_bytes(ns),
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await
            .wire()?
            .into_inner();
        let present = from_bitmap(&r.present, keys.len()).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("ReplicaHas answered {} bytes for {} keys", r.present.len(), keys.len()),
            )
        })?;
        let deleted = match r.deleted_ms.len() {
            0 => vec![0; keys.len()],
            n if n == keys.len() => r.deleted_ms,
            n => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("ReplicaHas answered {n} delete times for {} keys", keys.len()),
                ));
            }
        };
        Ok((present, deleted))
    }

    /// Tells this node what the caller's uploads to blob settled: keys
    /// landed, or given up (the `BlobNotices` peer call).
    pub async fn blob_notices(&self, req: proto::BlobNoticesRequest) -> Result<proto::BlobNoticesResponse> {
        Ok(self.peer.clone().blob_notices(req).await.wire()?.into_inner())
    }

    /// Adds a member to the cluster (sent to any node; it forwards it).
    pub async fn join(&self, req: proto::JoinRequest) -> Result<proto::MembershipResponse> {
        Ok(self.peer.clone().join(req).await.wire()?.into_inner())
    }

    /// Removes a member from the cluster; it hands its keys over first.
    pub async fn leave(&self, req: proto::LeaveRequest) -> Result<proto::MembershipResponse> {
        Ok(self.peer.clone().leave(req).await.wire()?.into_inner())
    }

    /// The member list of this node, with its epoch and digest; with
    /// `offer`, the node first adopts that list if it is newer.
    pub async fn members(&self, offer: Option<proto::MemberList>) -> Result<proto::MemberList> {
        Ok(self
            .peer
            .clone()
            .members(proto::MembersRequest { offer })
            .await
            .wire()?
            .into_inner())
    }
}

/// The methods this client frames by hand (`kvtier_proto::wire`): the
/// ones that carry block bytes.
const PUT: &str = "/kvtier.v1.KvTier/Put";
const GET: &str = "/kvtier.v1.KvTier/Get";
const REPLICA_PUT: &str = "/kvtier.v1.Peer/ReplicaPut";
const REPLICA_GET: &str = "/kvtier.v1.Peer/ReplicaGet";

/// The request frames of a Put or ReplicaPut: its `header` message, then
/// `data` in data messages of at most `CHUNK_BYTES`, each sent from where
/// it lies.
fn with_data(header: Bytes, data: &Bytes) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(1 + 2 * piece_count(data.len()));
    frames.push(header);
    for d in pieces(data) {
        frames.extend(wire::bytes_message(wire::DATA_FIELD, d));
    }
    frames
}

/// The text of an error and its sources, each said once: tonic's transport
/// errors keep the useful part ("connection refused") in a source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}
