//! The `KvTier` gRPC service over a block manager.

use bytes::Bytes;
use kvtier::{AlignedBuf, BlockManager, NamespaceId};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::Status;

use crate::cluster::Cluster;
use crate::convert;
use crate::metrics::Metrics;
use crate::proto::{self, get_response, put_request};
use crate::region::Regions;
use crate::registry::Registry;
use crate::repair::Repair;
use crate::{invalid, status, status_of};
use kvtier::ErrorKind;
use kvtier::manager::LoadFailure;
use kvtier::replication::repair::{Answer, CopyRead, Holder, ReadOutcome};
use kvtier_proto::chunk::{piece_count, pieces};
use kvtier_proto::wire::{self, Message, MessageReader};

/// Keys one request may carry.
pub const MAX_KEYS: usize = 65_536;
/// Blocks a load asks the local tiers for at once after a copy here
/// failed verification (see [`Node::load_across`]).
const REPAIR_WINDOW: usize = 256;
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

/// The local node: what both gRPC services serve from. Shared behind an
/// `Arc`.
pub struct Node {
    pub(crate) manager: Arc<BlockManager>,
    pub(crate) metrics: Arc<Metrics>,
    pool: Arc<BufPool>,
    inflight: Arc<Semaphore>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) regions: Arc<Regions>,
    max_request_bytes: u64,
    pub(crate) started: Instant,
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Read repair and the scrub, over the same tiers and cluster.
    pub(crate) repair: Arc<Repair>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    /// A node over `manager`; namespaces persist in `registry_path` and
    /// the ones already there are registered now.
    pub fn new(
        manager: Arc<BlockManager>,
        metrics: Arc<Metrics>,
        registry_path: PathBuf,
        regions: Regions,
        max_request_bytes: u64,
        max_inflight_bytes: u64,
    ) -> kvtier::Result<Self> {
        let registry = Registry::open(registry_path, manager.clone())?;
        let permits = (max_inflight_bytes / PERMIT_BYTES).min(u64::from(u32::MAX >> 3)) as usize;
        Ok(Self {
            repair: Arc::new(Repair::new(manager.clone(), None)),
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
            cluster: None,
        })
    }

    /// The same node in `cluster`: Puts fan out to replicas, reads that
    /// miss here ask peers, and registrations reach every member.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.repair = Arc::new(Repair::new(self.manager.clone(), Some(cluster.clone())));
        self.cluster = Some(cluster);
        self
    }

    /// Read repair and the scrub of this node.
    pub fn repair(&self) -> &Arc<Repair> {
        &self.repair
    }

    /// The namespaces and their replication.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Records one request of `rpc` (one of [`crate::metrics::RPCS`]).
    pub(crate) fn observe<T>(&self, rpc: &str, t: Instant, r: &Result<T, Status>) {
        self.metrics.rpc(rpc).observe(t.elapsed(), r.is_ok());
        if let Err(s) = r {
            let kind = kvtier_proto::error::carried_kind(s);
            if kind.is_some_and(is_bad_request) {
                self.metrics.bad_requests.fetch_add(1, Relaxed);
            }
            tracing::debug!(rpc, kind = kind.map(ErrorKind::name), "{}", s.message());
        }
    }

    /// Checks a request's size and waits for its share of the budget.
    async fn admit(&self, what: &str, blocks: usize, block_bytes: u64) -> Result<Loan, Status> {
        let total = blocks as u64 * block_bytes;
        if total > self.max_request_bytes {
            return Err(status_of(
                ErrorKind::TooLarge,
                format!(
                    "{what} of {blocks} blocks of {block_bytes} bytes ({total} bytes) exceeds max_request_bytes {}",
                    self.max_request_bytes
                ),
            ));
        }
        let permits = total.div_ceil(PERMIT_BYTES).max(1) as u32;
        self.metrics.inflight_bytes.fetch_add(total, Relaxed);
        let permit = self.inflight.clone().acquire_many_owned(permits).await;
        self.metrics.inflight_bytes.fetch_sub(total, Relaxed);
        let permit = permit.map_err(|_| status_of(ErrorKind::Closed, "kvtierd is stopping"))?;
        Ok(Loan {
            buf: Some(self.pool.take(total as usize)),
            pool: self.pool.clone(),
            _permit: permit,
        })
    }

    pub(crate) fn block_bytes(&self, ns: NamespaceId) -> Result<u64, Status> {
        self.manager.block_bytes(ns).map_err(|e| status(&e))
    }

    /// Receives the data messages of a `what` of `blocks` blocks into a
    /// pooled buffer, each payload copied once, from the frames it arrived
    /// in; a message of another shape is decoded as `M` and `data` picks
    /// its bytes out (`None`: not a data message).
    pub(crate) async fn receive<M: prost::Message + Default>(
        &self,
        s: &mut MessageReader,
        what: &str,
        blocks: usize,
        block: u64,
        data: impl Fn(M) -> Option<Bytes>,
    ) -> Result<Bytes, Status> {
        let total = (blocks as u64 * block) as usize;
        let mut loan = self.admit(what, blocks, block).await?;
        let buf = loan.buf.as_mut().expect("fresh loan");
        let mut got = 0usize;
        let too_much = || {
            status_of(
                ErrorKind::BlockSize,
                format!("{what} carries more than {blocks} blocks of {block} bytes ({total} bytes)"),
            )
        };
        while let Some(m) = s.next(wire::DATA_FIELD).await? {
            match m {
                Message::Bytes(n) => {
                    if got + n > total {
                        return Err(too_much());
                    }
                    s.payload(|d| {
                        buf[got..got + d.len()].copy_from_slice(&d);
                        got += d.len();
                        Ok(())
                    })
                    .await?;
                }
                Message::Whole(b) => {
                    let m = M::decode(b).map_err(|e| invalid(format!("a {what} message that does not decode: {e}")))?;
                    let Some(d) = data(m) else {
                        return Err(invalid(format!("only data messages may follow the {what} header")));
                    };
                    if got + d.len() > total {
                        return Err(too_much());
                    }
                    buf[got..got + d.len()].copy_from_slice(&d);
                    got += d.len();
                }
            }
        }
        if got != total {
            // The same kind as a wrong buffer size in the embedded store.
            return Err(status_of(
                ErrorKind::BlockSize,
                format!("{what} ended after {got} of {total} bytes ({blocks} blocks of {block} bytes)"),
            ));
        }
        Ok(Bytes::from_owner(loan).slice(..total))
    }

    pub(crate) async fn put_inner(&self, mut s: MessageReader) -> Result<proto::PutResponse, Status> {
        let header = match s.decode::<proto::PutRequest>().await? {
            Some(proto::PutRequest {
                msg: Some(put_request::Msg::Header(h)),
            }) => h,
            _ => return Err(invalid("the first Put message must be a header")),
        };
        let ns = convert::namespace_id(&header.namespace_id)?;
        let block = self.block_bytes(ns)?;
        let keys = convert::keys(&header.keys, MAX_KEYS)?;
        let data = self
            .receive(&mut s, "put", keys.len(), block, |m: proto::PutRequest| match m.msg {
                Some(put_request::Msg::Data(d)) => Some(d),
                _ => None,
            })
            .await?;
        if let Some(c) = &self.cluster {
            return c.write(ns, &keys, data, block as usize).await;
        }
        let m = self.manager.clone();
        // The buffer (and its share of the in-flight budget) goes back to
        // the pool when `data` drops, after the store.
        let r = tokio::task::spawn_blocking(move || m.store(ns, &keys, &data))
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("store task: {e}")))?;
        let out = r.map_err(|e| status(&e))?;
        Ok(proto::PutResponse {
            stored: out.stored as u32,
            present: out.present as u32,
            not_admitted: out.not_admitted as u32,
        })
    }

    /// Loads the leading present `keys` of `ns` (`b` bytes each) into the
    /// buffer `owner` holds (`buf` gives it: exactly `keys.len()` blocks):
    /// local tiers, then (with `peers`, in a cluster) peers for the run that
    /// misses here, then local again, since with R < N consecutive blocks
    /// live on different nodes. In a cluster blob comes last, after every
    /// replica missed. Blocks from peers are promoted into the local tiers.
    ///
    /// A copy that fails verification here is a miss on that copy only
    /// (read repair, see [`crate::repair`]): its tier drops it, the load
    /// goes on to the peers (unless `peers` is off: a peer's read of this
    /// node's own copy reports it instead) and blob, serves the first good
    /// copy, and rewrites the bad ones from it. A block fails the load
    /// only when no holder has a good copy, and its failure says so.
    pub(crate) async fn load_across<B: Send + 'static>(
        &self,
        ns: NamespaceId,
        keys: Arc<Vec<kvtier::BlockKey>>,
        b: usize,
        mut owner: B,
        buf: fn(&mut B) -> &mut [u8],
        peers: bool,
    ) -> Result<(kvtier::manager::LoadOutcome, B), Status> {
        let (mut loaded, mut failed) = (0usize, None);
        let in_cluster = self.cluster.is_some();
        let has_blob = self.manager.blob().is_some();
        let mut blob_pass = false;
        // The read of keys[loaded] across its holders, once a copy of it
        // failed verification (here, or on every peer asked).
        let mut pending: Option<CopyRead> = None;
        // Blocks one local load asks for: all of them, until a copy here
        // fails verification; then a window, so that a run of bad copies
        // costs each load a window of pins, not the whole rest again.
        let mut window = keys.len();
        loop {
            let (m, ks, at) = (self.manager.clone(), keys.clone(), loaded);
            let local_only = in_cluster && !blob_pass;
            // While a block's read is pending, this load asks for that one
            // block: a blob (or peer) run past it would hide the copies
            // here after it, bad ones included, which must be read to be
            // found and rewritten.
            let end = if pending.is_some() {
                at + 1
            } else {
                keys.len().min(at + window)
            };
            let (r, o) = tokio::task::spawn_blocking(move || {
                let out = &mut buf(&mut owner)[at * b..end * b];
                let r = if local_only {
                    m.load_local(ns, &ks[at..end], out)
                } else {
                    m.load(ns, &ks[at..end], out)
                };
                (r, owner)
            })
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("load task: {e}")))?;
            owner = o;
            let out = r.map_err(|e| status(&e))?;
            if out.loaded > 0
                && let Some(mut read) = pending.take()
            {
                // Its copy here was dropped: this load found it in blob
                // (or a store put a good copy here meanwhile).
                let from = if local_only { Holder::Here } else { Holder::Blob };
                read.record(from, Answer::Good);
                if let ReadOutcome::Served { repair, .. } = read.outcome() {
                    let good = Bytes::copy_from_slice(&buf(&mut owner)[at * b..(at + 1) * b]);
                    self.repair.rewrite(ns, keys[at], good, repair);
                }
                // The blocks after it: here first again, then peers.
                blob_pass = false;
            }
            loaded += out.loaded;
            if let Some(mut f) = out.failed {
                f.index += at;
                let corrupt = Answer::of_error(f.kind) == Answer::Corrupt;
                if corrupt {
                    self.repair.found_corrupt(&Holder::Here, false);
                    window = REPAIR_WINDOW;
                }
                if corrupt && pending.is_none() && (peers || !in_cluster) {
                    // Its tier dropped the copy: the next load misses it
                    // here and the read goes on to the other holders.
                    let mut read = self.repair.read_of(ns, keys[loaded], true, peers);
                    read.record(Holder::Here, Answer::Corrupt);
                    if read.next().is_some() {
                        pending = Some(read);
                        // Peers before blob, for this key too.
                        blob_pass = false;
                        continue;
                    }
                    pending = Some(read);
                } else {
                    failed = Some(f);
                    break;
                }
            }
            if loaded == keys.len() {
                break;
            }
            if end < keys.len() && out.loaded > 0 {
                // The one block is in: the next ones are asked here first.
                continue;
            }
            let peer_pass = in_cluster && peers && !blob_pass;
            let Some(c) = self.cluster.as_ref().filter(|_| peer_pass) else {
                // Nothing more anywhere for keys[loaded]: blob (if any)
                // was asked by this load.
                if let Some(mut read) = pending.take() {
                    if !local_only && has_blob {
                        read.record(Holder::Blob, Answer::Missing);
                    }
                    failed = self.no_good_copy(&read, loaded);
                }
                break;
            };
            let known: Vec<(Holder, Answer)> = pending.take().map(|r| r.answers().to_vec()).unwrap_or_default();
            // After a copy here failed verification, the peers are asked
            // for that one block: the blocks after it may be here, and a
            // copy here that is bad too must be found (and rewritten) by
            // reading it, not hidden behind a peer's run.
            let end = if known.is_empty() { keys.len() } else { loaded + 1 };
            let bytes = buf(&mut owner);
            let got = c
                .fetch(ns, &keys[loaded..end], &mut bytes[loaded * b..end * b], b, &known)
                .await;
            self.repair
                .counters
                .corrupt_found_peer_read
                .fetch_add(got.corrupt_answers, Relaxed);
            for (i, holders) in got.repairs {
                let at = loaded + i;
                let good = Bytes::copy_from_slice(&bytes[at * b..(at + 1) * b]);
                self.repair.rewrite(ns, keys[at], good, holders);
            }
            let n = got.loaded;
            // A read with a corrupt copy and no good one among the peers:
            // the next pass asks this node, or blob, for it.
            pending = got.stopped.filter(CopyRead::found_corrupt);
            if n == 0
                && let Some(read) = &mut pending
            {
                // It stopped at keys[loaded], which the load before missed
                // here (unless its copy here failed: that answer stands).
                read.record(Holder::Here, Answer::Missing);
            }
            if n == 0 {
                // Every replica missed: blob, if this node has one.
                if has_blob {
                    blob_pass = true;
                    continue;
                }
                if let Some(read) = pending.take() {
                    failed = self.no_good_copy(&read, loaded);
                }
                break;
            }
            // Promote: the next load of these blocks is local.
            let promoted = Bytes::copy_from_slice(&bytes[loaded * b..(loaded + n) * b]);
            let got = keys[loaded..loaded + n].to_vec();
            let m = self.manager.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = m.store(ns, &got, &promoted) {
                    tracing::debug!("promote peer blocks: {e}");
                }
            });
            loaded += n;
        }
        Ok((kvtier::manager::LoadOutcome { loaded, failed }, owner))
    }

    /// The failure of block `index`, whose read found a corrupt copy and
    /// no good one; `None` for a plain miss.
    fn no_good_copy(&self, read: &CopyRead, index: usize) -> Option<LoadFailure> {
        let e = self.repair.no_good_copy(read, "block")?;
        Some(LoadFailure {
            index,
            kind: e.kind(),
            message: e.to_string(),
        })
    }

    /// Loads the leading present blocks: from the local tiers, then (with
    /// `peers`, in a cluster) from peers, promoting what they send into the
    /// local tiers. Answers the frames of the Get's answer (a header, then
    /// the bytes in data messages of at most `CHUNK_BYTES`, each a slice of
    /// the buffer they were loaded into) and the blocks they carry.
    pub(crate) async fn get_inner(&self, mut s: MessageReader, peers: bool) -> Result<(Vec<Bytes>, usize), Status> {
        let req = s
            .decode::<proto::GetRequest>()
            .await?
            .ok_or_else(|| invalid("a Get without a request message"))?;
        if s.next(wire::DATA_FIELD).await?.is_some() {
            return Err(invalid("a Get takes one request message"));
        }
        let ns = convert::namespace_id(&req.namespace_id)?;
        let block = self.block_bytes(ns)?;
        let keys = convert::keys(&req.keys, MAX_KEYS)?;
        let loan = self.admit("get", keys.len(), block).await?;
        let keys = Arc::new(keys);
        let (out, loan) = self
            .load_across(
                ns,
                keys,
                block as usize,
                loan,
                |l| l.buf.as_mut().expect("fresh loan"),
                peers,
            )
            .await?;
        let header = get_header(&out, block);
        let bytes = Bytes::from_owner(loan).slice(..out.loaded * block as usize);
        let mut frames = Vec::with_capacity(1 + 2 * piece_count(bytes.len()));
        frames.push(wire::message(&proto::GetResponse {
            msg: Some(get_response::Msg::Header(header)),
        }));
        for d in pieces(&bytes) {
            frames.extend(wire::bytes_message(wire::DATA_FIELD, d));
        }
        Ok((frames, out.loaded))
    }

    /// The longest present prefix: local tiers, then (with `peers`, in a
    /// cluster) peers, whose blocks are reported as `TIER_PEER`.
    pub(crate) async fn lookup_inner(
        &self,
        req: proto::LookupRequest,
        peers: bool,
    ) -> Result<proto::LookupResponse, Status> {
        let ns = convert::namespace_id(&req.namespace_id)?;
        let keys = convert::keys(&req.keys, MAX_KEYS)?;
        let keys = Arc::new(keys);
        let mut tiers: Vec<i32> = Vec::new();
        // Local tiers, then peers for the run that misses here, and again;
        // in a cluster, blob last, after every replica missed.
        let in_cluster = self.cluster.is_some();
        let mut blob_pass = false;
        loop {
            let at = tiers.len();
            let with_blob = self.manager.blob().is_some() && (!in_cluster || blob_pass);
            let l = if with_blob {
                // Blob lookups send HEAD requests: off the async workers.
                let (m, ks) = (self.manager.clone(), keys.clone());
                tokio::task::spawn_blocking(move || m.lookup(ns, &ks[at..]))
                    .await
                    .map_err(|e| status_of(ErrorKind::Internal, format!("lookup task: {e}")))?
            } else {
                // Local lookups take microseconds: inline.
                self.manager.lookup_local(ns, &keys[at..])
            }
            .map_err(|e| status(&e))?;
            tiers.extend(l.tiers.iter().map(|t| convert::tier(*t) as i32));
            if blob_pass || tiers.len() == keys.len() {
                break;
            }
            let Some(c) = self.cluster.as_ref().filter(|_| peers) else {
                break;
            };
            let n = c.lookup(ns, &keys[tiers.len()..]).await;
            if n == 0 {
                if self.manager.blob().is_none() {
                    break;
                }
                blob_pass = true;
                continue;
            }
            tiers.extend(std::iter::repeat_n(proto::Tier::Peer as i32, n));
        }
        Ok(proto::LookupResponse {
            hit_blocks: tiers.len() as u32,
            tiers,
        })
    }
}

impl Node {
    /// Checks a region request: namespace, keys, and the byte range.
    pub(crate) fn region_request(&self, req: &proto::RegionRequest, exclusive: bool) -> Result<RegionJob, Status> {
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

/// A checked region request: what PutRegion and GetRegion act on.
pub(crate) struct RegionJob {
    pub(crate) ns: NamespaceId,
    pub(crate) keys: Vec<kvtier::BlockKey>,
    pub(crate) block: u64,
    pub(crate) borrow: crate::region::Borrow,
}

/// The header of a Get (or GetRegion) that did `out` with blocks of
/// `block` bytes: the failure's kind travels by name.
pub(crate) fn get_header(out: &kvtier::manager::LoadOutcome, block: u64) -> proto::GetHeader {
    proto::GetHeader {
        loaded: out.loaded as u32,
        block_bytes: block,
        failed_index: out.failed.as_ref().map(|f| f.index as u32),
        failed_reason: out.failed.as_ref().map(|f| f.message.clone()).unwrap_or_default(),
        failed_kind: out
            .failed
            .as_ref()
            .map(|f| f.kind.name().to_string())
            .unwrap_or_default(),
    }
}

/// The stream a Get answers with.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<proto::GetResponse, Status>> + Send>>;

/// Whether a request failed through the client's own fault (malformed, a
/// namespace or name that does not exist): what the `bad_requests` counter
/// counts. An oversize request is counted apart, as refused by a limit.
fn is_bad_request(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidArgument | ErrorKind::BlockSize | ErrorKind::UnknownNamespace | ErrorKind::NotFound
    )
}
