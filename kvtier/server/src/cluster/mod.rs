//! kvtierd in a cluster: the I/O around the replication core.
//!
//! - This module: [`Cluster`], this node's view of the member list:
//!   heartbeats that feed [`Membership`], the fan-out of writes and
//!   namespace registrations, reads from peers, hint delivery, and the
//!   background tasks, which [`Cluster::shutdown`] stops.
//! - [`hints`]: the durable log of blocks held for a replica that lacks
//!   them (down, or a write to it failed): the per-member out-of-sync view.
//! - [`peer`]: the `Peer` gRPC service the other nodes call.
//! - [`resync`]: what a member back from down gets from the others.
//! - [`rebalance`]: members joining and leaving at run time, and the keys
//!   that move after.
//! - [`peers`]: the clients of the members, a set that grows.
//!
//! The decisions (which nodes hold a key, which stand in for a down one,
//! where a read goes) are the core's pure functions in
//! [`kvtier::replication`]; this module only carries them out.
//!
//! # Why
//!
//! - **Peers are clients.** A node reaches another through the same
//!   listener, token and TLS as any client, with [`Client`]: one port to
//!   open, one secret to manage.
//! - **A write waits for its quorum, per key.** Keys are grouped by target
//!   node, each group sent in parallel; the Put succeeds when every key has
//!   `write_quorum` acknowledged copies. Copies already written stay when
//!   it fails (a cache may hold more, never wrong data).
//! - **A stand-in keeps the hint, not the coordinator.** The node that holds
//!   the copy logs the hint durably next to it, and hands it back when its
//!   heartbeats see the original up: a coordinator that dies loses nothing.
//! - **A failed copy is marked out of sync by the coordinator.** A replica
//!   write that fails on a member that is not down (a timeout, a suspect
//!   node, an error) while the write still reaches its quorum would leave
//!   that replica without the key for good. The coordinator keeps a copy
//!   and a hint for it, exactly as a stand-in would, and delivers it once
//!   the member answers heartbeats again. Reads ask a member marked out of
//!   sync for a key last. So a member going suspect and back up needs no
//!   resync (see [`resync`]): every copy it missed has a hint somewhere.

pub mod hints;
pub mod peer;
pub mod peers;
pub mod rebalance;
pub mod resync;

use bytes::{Bytes, BytesMut};
use kvtier::replication::membership::{Change, Liveness, Membership};
use kvtier::replication::placement::{self, NodeId};
use kvtier::replication::{Replication, plan_write, read_order_with};
use kvtier::{BlockKey, BlockManager, NamespaceId};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::task::JoinSet;
use tonic::Status;

use self::hints::HintLog;
use crate::config::ClusterConfig;
use crate::convert;
use crate::proto;
use crate::registry::Registry;
use crate::{status, status_of};
use kvtier::ErrorKind;
use kvtier_client::{Client, ClientConfig};

/// Blocks one hint delivery sends at most.
const HINT_BATCH_BLOCKS: usize = 256;

/// The cluster's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Hinted blocks handed back to their replica.
    pub hints_delivered: AtomicU64,
    /// Hints given up: the block was gone here before delivery.
    pub hints_dropped: AtomicU64,
    /// Replica writes sent to peers (one per target node per Put).
    pub replica_writes_sent: AtomicU64,
    /// Those that failed.
    pub replica_writes_failed: AtomicU64,
    /// Blocks loads here brought from peers.
    pub peer_read_blocks: AtomicU64,
    /// Peer reads (and lookups) that failed.
    pub peer_read_failures: AtomicU64,
    /// Blocks peers stored here.
    pub replica_blocks_received: AtomicU64,
    /// Blocks peers loaded from here.
    pub replica_blocks_served: AtomicU64,
    /// Replica copies that failed on a member that was not down, marked
    /// out of sync (a copy and a hint kept here).
    pub out_of_sync_marked: AtomicU64,
    /// Member lists adopted from a peer with a newer one.
    pub member_lists_adopted: AtomicU64,
    /// Keys this node offered to members back from down.
    pub resync_keys_offered: AtomicU64,
    /// Those they lacked, sent.
    pub resync_blocks_sent: AtomicU64,
}

/// This node's part in a static cluster.
pub struct Cluster {
    me: NodeId,
    heartbeat: Duration,
    peer_timeout: Duration,
    view: RwLock<Membership>,
    peers: peers::Peers,
    manager: Arc<BlockManager>,
    registry: Arc<Registry>,
    hints: HintLog,
    /// Counters, for Stats and the metrics.
    pub counters: Counters,
    /// Peers that may lack a namespace registered here: each gets all of
    /// them at its next answered heartbeat (every peer at startup).
    unsynced: Mutex<BTreeSet<NodeId>>,
    delivering: AtomicBool,
    max_request_bytes: u64,
    resync: resync::Resync,
    rebalance: rebalance::Rebalance,
    /// The background tasks (heartbeats, deliveries, resync, rebalancing,
    /// fetches), and whether [`Cluster::shutdown`] stopped them.
    tasks: Mutex<(bool, Vec<tokio::task::JoinHandle<()>>)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("epoch", &self.view.read().epoch())
            .finish_non_exhaustive()
    }
}

/// One group of a write: the keys (indices into the request) that go to
/// one node, as replicas or as a stand-in for one down replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Group {
    node: NodeId,
    hint_for: Option<NodeId>,
}

impl Cluster {
    /// This node's view of the cluster in `cfg`; peers are reached at their
    /// `addr` with `token`, over TLS when `tls`. Hints live in `data_dir`.
    pub fn new(
        cfg: &ClusterConfig,
        tls: bool,
        token: Option<String>,
        manager: Arc<BlockManager>,
        registry: Arc<Registry>,
        data_dir: &Path,
        max_request_bytes: u64,
    ) -> kvtier::Result<Self> {
        Self::open(cfg, tls, token, manager, registry, data_dir, max_request_bytes)
            .map_err(|m| kvtier::Error::new(ErrorKind::Config, format!("cluster: {m}")))
    }

    fn open(
        cfg: &ClusterConfig,
        tls: bool,
        token: Option<String>,
        manager: Arc<BlockManager>,
        registry: Arc<Registry>,
        data_dir: &Path,
        max_request_bytes: u64,
    ) -> Result<Self, String> {
        let me = NodeId(cfg.node_id.clone());
        let peer_timeout = Duration::from_millis(cfg.peer_timeout_ms);
        let template = ClientConfig {
            endpoint: String::new(),
            token,
            ca_file: cfg.ca_file.clone(),
            tls_domain: cfg.tls_domain.clone(),
        };
        let peers = peers::Peers::new(template, tls, peer_timeout);
        // The members saved at the last change win over the config's list,
        // which is only the first one.
        let members_file = data_dir.join("members.json");
        let (members, list_epoch) =
            rebalance::Rebalance::saved_members(&members_file)?.unwrap_or_else(|| (cfg.members.clone(), 0));
        for m in members.iter().filter(|m| m.id != me) {
            peers.insert(m)?;
        }
        let hints = HintLog::open(&data_dir.join("hints.log"))?;
        Ok(Self {
            unsynced: Mutex::new(peers.keys().cloned().collect()),
            me: me.clone(),
            heartbeat: Duration::from_millis(cfg.heartbeat_interval_ms),
            peer_timeout,
            view: RwLock::new(Membership::new(me, members, cfg.detector()).with_list_epoch(list_epoch)),
            peers,
            manager,
            registry,
            hints,
            counters: Counters::default(),
            delivering: AtomicBool::new(false),
            max_request_bytes,
            resync: resync::Resync::new(cfg.rebalance_bytes_per_s),
            rebalance: rebalance::Rebalance::new(cfg.rebalance_bytes_per_s, members_file),
            tasks: Mutex::new((false, Vec::new())),
        })
    }

    /// Starts the heartbeats, which start every other background task.
    pub fn start(self: &Arc<Self>) {
        self.spawn(self.clone().heartbeats());
    }

    /// Runs `f` in the background until it ends or [`Cluster::shutdown`];
    /// after a shutdown, drops it instead.
    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let mut t = self.tasks.lock();
        if t.0 {
            return;
        }
        t.1.retain(|h| !h.is_finished());
        t.1.push(tokio::spawn(f));
    }

    /// Stops every background task and waits until each has ended, so none
    /// holds this cluster (and its block manager) any more. Work cut short
    /// is redone after a restart: hints are durable, and a returning or
    /// rejoining member is resynced or rebalanced again.
    pub async fn shutdown(&self) {
        let tasks = {
            let mut t = self.tasks.lock();
            t.0 = true;
            std::mem::take(&mut t.1)
        };
        for h in &tasks {
            h.abort();
        }
        for h in tasks {
            let _ = h.await;
        }
    }

    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Members, this node included.
    pub fn size(&self) -> usize {
        self.view.read().members().len()
    }

    /// The membership epoch.
    pub fn epoch(&self) -> u64 {
        self.view.read().epoch()
    }

    /// Time a call moving `bytes` may take: the peer timeout plus a second
    /// per 64 MiB.
    fn timeout_for(&self, bytes: usize) -> Duration {
        self.peer_timeout + Duration::from_millis((bytes >> 16) as u64)
    }

    /// The registration a peer needs to store blocks of `ns`.
    fn spec(&self, ns: NamespaceId) -> Option<proto::ReplicaRegisterRequest> {
        let (_, n, rep) = self.registry.all().into_iter().find(|(id, _, _)| *id == ns)?;
        Some(proto::ReplicaRegisterRequest {
            namespace: Some(convert::namespace_proto(&n)),
            replicas: rep.replicas as u32,
            write_quorum: rep.w() as u32,
        })
    }

    /// Peer `from` sent a heartbeat: it is up.
    pub fn heard_from(&self, from: &str) {
        let id = NodeId(from.to_string());
        if id == self.me || !self.peers.contains_key(&id) {
            return;
        }
        let change = self.view.write().heartbeat_ok(&id);
        self.log_change(change);
    }

    fn log_change(&self, change: Option<Change>) {
        let Some(c) = change else { return };
        let epoch = self.epoch();
        match c {
            Change::Liveness { id, from, to } => {
                if to == Liveness::Down {
                    // It may miss registrations: send them when it is back.
                    self.unsynced.lock().insert(id.clone());
                }
                if from == Liveness::Down && to == Liveness::Up {
                    // It may have missed writes that no hint covers.
                    self.resync.returned(id.clone());
                }
                match to {
                    Liveness::Up => tracing::info!(member = %id, ?from, ?to, epoch, "cluster member up"),
                    // One missed heartbeat is common (a peer starting later).
                    Liveness::Suspect => tracing::info!(member = %id, ?from, ?to, epoch, "cluster member suspect"),
                    Liveness::Down => tracing::warn!(member = %id, ?from, ?to, epoch, "cluster member down"),
                }
            }
            other => tracing::info!(change = ?other, epoch, "cluster membership changed"),
        }
    }

    /// Registers `ns` on every peer, in parallel; a peer that does not
    /// answer gets it at its next answered heartbeat.
    pub async fn register_everywhere(&self, ns: NamespaceId) {
        let Some(spec) = self.spec(ns) else { return };
        let mut set = JoinSet::new();
        for (id, c) in &self.peers {
            if !self.view.read().is_writable(id) {
                // Down: it gets the namespace when it answers again.
                self.unsynced.lock().insert(id.clone());
                continue;
            }
            let (id, c, spec, t) = (id.clone(), c.clone(), spec.clone(), self.peer_timeout);
            set.spawn(async move {
                let r = tokio::time::timeout(t, c.replica_register(spec)).await;
                (id, matches!(r, Ok(Ok(()))))
            });
        }
        while let Some(Ok((id, ok))) = set.join_next().await {
            if !ok {
                tracing::warn!(member = %id, namespace = %ns, "namespace not registered on a member: sent again when it answers");
                self.unsynced.lock().insert(id);
            }
        }
    }

    /// Sends every namespace to `id`; marks it unsynced again on failure.
    async fn sync_namespaces(self: Arc<Self>, id: NodeId) {
        let Some(c) = self.peers.get(&id) else { return };
        for (ns, _, _) in self.registry.all() {
            let Some(spec) = self.spec(ns) else { continue };
            match tokio::time::timeout(self.peer_timeout, c.replica_register(spec)).await {
                Ok(Ok(())) => {}
                r => {
                    tracing::debug!(member = %id, ?r, "namespace sync failed");
                    self.unsynced.lock().insert(id);
                    return;
                }
            }
        }
    }

    /// Pings every peer each heartbeat interval, feeds the membership,
    /// fetches a newer member list from a peer that has one, sends
    /// namespaces to peers that may lack them and hands hints back to
    /// replicas that are up. Runs until aborted.
    pub async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let epoch = self.epoch();
            let mut set = JoinSet::new();
            for (id, c) in &self.peers {
                let (id, c, me, t) = (id.clone(), c.clone(), self.me.0.clone(), self.peer_timeout);
                set.spawn(async move {
                    let r = tokio::time::timeout(t, c.ping(&me, epoch)).await;
                    (id, r.ok().and_then(Result::ok))
                });
            }
            while let Some(Ok((id, answer))) = set.join_next().await {
                let ok = answer.is_some();
                if let Some(p) = answer {
                    self.maybe_catch_up(&id, p.members_epoch, p.members_digest);
                }
                let change = {
                    let mut v = self.view.write();
                    if ok {
                        v.heartbeat_ok(&id)
                    } else {
                        v.heartbeat_failed(&id)
                    }
                };
                self.log_change(change);
                if ok && self.unsynced.lock().remove(&id) {
                    self.spawn(self.clone().sync_namespaces(id));
                }
            }
            if self.hints.pending() > 0 && !self.delivering.swap(true, Relaxed) {
                let this = self.clone();
                self.spawn(async move {
                    this.deliver_hints().await;
                    this.delivering.store(false, Relaxed);
                });
            }
            self.start_resync();
            self.start_rebalance();
        }
    }

    /// Stores a copy here: `keys` of `ns`, back to back in `data`; with
    /// `hint_for`, also logs that this node holds them for that replica.
    pub async fn store_local(
        self: &Arc<Self>,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        data: Bytes,
        hint_for: Option<NodeId>,
    ) -> Result<proto::PutResponse, Status> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let whole = this
                .manager
                .block_bytes(ns)
                .is_ok_and(|b| b as usize * keys.len() == data.len());
            let out = if keys.len() == 1 && !whole {
                // One variable-length block: a checkpoint chunk.
                this.manager.store_one(ns, keys[0], &data)
            } else {
                this.manager.store(ns, &keys, &data)
            }
            .map_err(|e| status(&e))?;
            if let Some(h) = &hint_for {
                this.hints.add(h, ns, &keys).map_err(|e| {
                    status_of(
                        ErrorKind::Internal,
                        format!("log hints in {}: {e}", this.hints.path().display()),
                    )
                })?;
            }
            Ok(proto::PutResponse {
                stored: out.stored as u32,
                present: out.present as u32,
                not_admitted: out.not_admitted as u32,
            })
        })
        .await
        .map_err(|e| status_of(ErrorKind::Internal, format!("store task: {e}")))?
    }

    /// Writes `keys` of `ns` (`block` bytes each, back to back in `data`)
    /// to their replicas: here and on peers in parallel, stand-ins with
    /// hints for replicas that are down. Answers the counts of the first
    /// copies once every key has `write_quorum` copies; else Unavailable,
    /// naming the nodes that failed or are down.
    pub async fn write(
        self: &Arc<Self>,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: Bytes,
        block: usize,
    ) -> Result<proto::PutResponse, Status> {
        let chunk = keys.len() == 1 && data.len() < block;
        assert!(
            chunk || data.len() == keys.len() * block,
            "a write carries whole blocks, or one shorter chunk"
        );
        let chunk_len = chunk.then_some(data.len() as u64);
        let rep = self.registry.replication(ns);
        let (plans, down) = {
            let v = self.view.read();
            let plans: Vec<_> = keys.iter().map(|k| plan_write(k, &v, rep)).collect();
            let down: Vec<NodeId> = v
                .members()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| !v.is_writable(id))
                .collect();
            (plans, down)
        };
        let mut groups: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
        for (i, p) in plans.iter().enumerate() {
            for t in &p.targets {
                let g = Group {
                    node: t.node.clone(),
                    hint_for: t.hint_for.clone(),
                };
                groups.entry(g).or_default().push(i);
            }
        }
        let spec = self.spec(ns);
        let mut set = JoinSet::new();
        // What each peer group carried, to keep for a member whose copy fails.
        let mut sent: BTreeMap<Group, (Vec<BlockKey>, Bytes)> = BTreeMap::new();
        for (g, idx) in groups {
            let gkeys: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
            let gdata = if idx.len() == keys.len() {
                data.clone()
            } else {
                let mut b = BytesMut::with_capacity(idx.len() * block);
                for &i in &idx {
                    b.extend_from_slice(&data[i * block..(i + 1) * block]);
                }
                b.freeze()
            };
            if g.node != self.me {
                sent.insert(g.clone(), (gkeys.clone(), gdata.clone()));
            }
            let this = self.clone();
            let spec = spec.clone();
            set.spawn(async move {
                let r = if g.node == this.me {
                    this.store_local(ns, gkeys, gdata, g.hint_for.clone())
                        .await
                        .map_err(kvtier_proto::error::from_status)
                } else {
                    this.counters.replica_writes_sent.fetch_add(1, Relaxed);
                    let c = this.peers.get(&g.node).expect("targets are members");
                    let t = this.timeout_for(gdata.len());
                    let hint = g.hint_for.as_ref().map(|h| h.0.clone());
                    let r = match tokio::time::timeout(t, c.replica_put(ns, &gkeys, gdata, spec, hint, chunk_len)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(kvtier::Error::new(
                            ErrorKind::Unavailable,
                            format!("no answer within {t:?}"),
                        )),
                    };
                    if r.is_err() {
                        this.counters.replica_writes_failed.fetch_add(1, Relaxed);
                    }
                    r
                };
                (g, idx, r)
            });
        }
        let mut copies = vec![0usize; keys.len()];
        // Whether every copy of a key was there already: then it is
        // "present", else "stored".
        let mut everywhere = vec![true; keys.len()];
        let mut refused = vec![false; keys.len()];
        let mut failed = BTreeMap::new();
        let mut missed = Vec::new();
        while let Some(j) = set.join_next().await {
            let (g, idx, r) = j.map_err(|e| status_of(ErrorKind::Internal, format!("replica write task: {e}")))?;
            match r {
                // Which keys a node's admission filter kept out is not
                // known: none of the group counts as a copy.
                Ok(p) if p.not_admitted > 0 => {
                    for &i in &idx {
                        refused[i] = true;
                    }
                    failed.insert(
                        g.node,
                        format!(
                            "its disk admission filter kept out {} of {} blocks (replicated namespaces need disk_admission_min_seen = 1)",
                            p.not_admitted,
                            idx.len()
                        ),
                    );
                }
                Ok(p) => {
                    let all_present = p.present as usize == idx.len();
                    for i in idx {
                        copies[i] += 1;
                        everywhere[i] &= all_present;
                    }
                }
                Err(e) => {
                    tracing::warn!(member = %g.node, kind = e.kind().name(), "replica write failed: {}", e.message());
                    if may_recover(e.kind())
                        && let Some((gkeys, gdata)) = sent.remove(&g)
                    {
                        missed.push((g.hint_for.clone().unwrap_or_else(|| g.node.clone()), gkeys, gdata));
                    }
                    failed.insert(g.node, e.to_string());
                }
            }
        }
        for (node, gkeys, gdata) in missed {
            self.mark_out_of_sync(ns, node, gkeys, gdata).await;
        }
        let short = copies.iter().zip(&plans).filter(|(c, p)| **c < p.quorum).count();
        if short > 0 {
            let mut why: Vec<String> = failed.iter().map(|(n, e)| format!("{n} failed ({e})")).collect();
            if !down.is_empty() {
                let d: Vec<&str> = down.iter().map(|n| n.0.as_str()).collect();
                why.push(format!("down: {}", d.join(", ")));
            }
            return Err(status_of(
                ErrorKind::Unavailable,
                format!(
                    "{short} of {} blocks got fewer than write_quorum {} of replicas {} copies: {}",
                    keys.len(),
                    rep.w(),
                    rep.replicas,
                    why.join("; ")
                ),
            ));
        }
        let present = everywhere.iter().filter(|p| **p).count();
        Ok(proto::PutResponse {
            stored: (keys.len() - present) as u32,
            present: present as u32,
            not_admitted: refused.iter().filter(|r| **r).count() as u32,
        })
    }

    /// Marks the copies of `keys` of `ns` (bytes `data`) that a write
    /// failed to make on `node` out of sync: this node keeps a copy and a
    /// durable hint, delivered once `node` answers heartbeats. When even
    /// that fails, `node` is resynced once it is up.
    async fn mark_out_of_sync(self: &Arc<Self>, ns: NamespaceId, node: NodeId, keys: Vec<BlockKey>, data: Bytes) {
        let n = keys.len() as u64;
        match self.store_local(ns, keys, data, Some(node.clone())).await {
            Ok(_) => {
                self.counters.out_of_sync_marked.fetch_add(n, Relaxed);
                tracing::info!(member = %node, namespace = %ns, keys = n, "replica copies marked out of sync: delivered once it answers");
            }
            Err(e) => {
                tracing::warn!(member = %node, namespace = %ns, keys = n, "out-of-sync copies not kept here ({}): the member is resynced once up", e.message());
                self.resync.returned(node);
            }
        }
    }

    /// The peers a read of `key` of `ns` asks, in order: the key's writable
    /// replicas (stand-ins included), this node left out, those known to
    /// lack it (out of sync) last.
    fn read_peers(&self, ns: NamespaceId, key: &BlockKey, rep: Replication) -> Vec<NodeId> {
        let v = self.view.read();
        // While keys move, a key may still be only on an old replica: ask
        // every member, then those that left (see `rebalance`).
        let moving = self.rebalance.moving();
        let mut order: Vec<NodeId> = read_order_with(key, &v, rep, |n| self.hints.contains(n, ns, *key))
            .into_iter()
            .take(if moving { usize::MAX } else { rep.replicas })
            .filter(|n| *n != self.me)
            .collect();
        if moving {
            order.extend(
                self.rebalance
                    .departed()
                    .into_iter()
                    .filter(|n| *n != self.me && self.peers.contains_key(n)),
            );
        }
        order
    }

    /// Loads `keys` of `ns` from peers into `out` (`block` bytes per key),
    /// as far as they hold a leading run; answers the blocks loaded.
    pub async fn fetch(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8], block: usize) -> usize {
        let rep = self.registry.replication(ns);
        let mut at = 0;
        'keys: while at < keys.len() {
            for peer in self.read_peers(ns, &keys[at], rep) {
                let c = &self.peers[&peer];
                let t = self.timeout_for((keys.len() - at) * block);
                match tokio::time::timeout(t, c.replica_get(ns, &keys[at..])).await {
                    Ok(Ok(g)) if g.loaded > 0 && g.block_bytes as usize == block => {
                        let n = g.loaded.min(keys.len() - at);
                        out[at * block..(at + n) * block].copy_from_slice(&g.data[..n * block]);
                        self.counters.peer_read_blocks.fetch_add(n as u64, Relaxed);
                        at += n;
                        continue 'keys;
                    }
                    Ok(Ok(_)) => {}
                    r => {
                        tracing::debug!(member = %peer, ?r, "peer read failed");
                        self.counters.peer_read_failures.fetch_add(1, Relaxed);
                    }
                }
            }
            break;
        }
        at
    }

    /// How many leading `keys` of `ns` peers hold.
    pub async fn lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        let rep = self.registry.replication(ns);
        let mut at = 0;
        'keys: while at < keys.len() {
            for peer in self.read_peers(ns, &keys[at], rep) {
                let c = &self.peers[&peer];
                match tokio::time::timeout(self.peer_timeout, c.replica_lookup(ns, &keys[at..])).await {
                    Ok(Ok(l)) if l.hit_blocks > 0 => {
                        at += (l.hit_blocks as usize).min(keys.len() - at);
                        continue 'keys;
                    }
                    Ok(Ok(_)) => {}
                    r => {
                        tracing::debug!(member = %peer, ?r, "peer lookup failed");
                        self.counters.peer_read_failures.fetch_add(1, Relaxed);
                    }
                }
            }
            break;
        }
        at
    }

    /// Whether this node uploads `key` of `ns` to blob: the first writable
    /// replica does (`kvtier::replication::uploader`), so a key goes to blob
    /// once whatever R is.
    pub fn uploads(&self, ns: NamespaceId, key: &BlockKey) -> bool {
        let rep = self.registry.replication(ns);
        kvtier::replication::uploader(key, &self.view.read(), rep).as_ref() == Some(&self.me)
    }

    /// The members other than this node that writes go to now.
    pub fn writable_peers(&self) -> Vec<NodeId> {
        let v = self.view.read();
        self.peers.keys().filter(|id| v.is_writable(id)).cloned().collect()
    }

    /// The client of member `id` (which must be a peer).
    pub fn peer(&self, id: &NodeId) -> &Client {
        &self.peers[id]
    }

    /// Loads one variable-length block (a checkpoint chunk) from the peers
    /// that may hold it, in read order.
    pub async fn fetch_chunk(&self, ns: NamespaceId, key: BlockKey) -> Option<Vec<u8>> {
        let rep = self.registry.replication(ns);
        for peer in self.read_peers(ns, &key, rep) {
            let c = &self.peers[&peer];
            let t = self.timeout_for(self.manager.block_bytes(ns).unwrap_or(0) as usize);
            match tokio::time::timeout(t, c.replica_get_chunk(ns, key)).await {
                Ok(Ok(Some(d))) => {
                    self.counters.peer_read_blocks.fetch_add(1, Relaxed);
                    return Some(d);
                }
                Ok(Ok(None)) => {}
                r => {
                    tracing::debug!(member = %peer, ?r, "peer chunk read failed");
                    self.counters.peer_read_failures.fetch_add(1, Relaxed);
                }
            }
        }
        None
    }

    /// Removes `keys` of `ns` here and on every writable member; answers
    /// how many this node held, or the first member's failure.
    pub async fn delete_everywhere(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<usize, Status> {
        let m = self.manager.clone();
        let local_keys = keys.to_vec();
        let n = tokio::task::spawn_blocking(move || m.remove(ns, &local_keys))
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("delete task: {e}")))?
            .map_err(|e| status(&e))?;
        let targets: Vec<NodeId> = {
            let v = self.view.read();
            v.members()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| *id != self.me && v.is_writable(id))
                .collect()
        };
        let mut set = JoinSet::new();
        for node in targets {
            let c = self.peers[&node].clone();
            let keys = keys.to_vec();
            let t = self.timeout_for(0);
            set.spawn(async move { (node, tokio::time::timeout(t, c.replica_delete(ns, &keys)).await) });
        }
        let mut failed = Vec::new();
        while let Some(j) = set.join_next().await {
            match j {
                Ok((_, Ok(Ok(_)))) => {}
                Ok((node, r)) => failed.push(format!("{node}: {r:?}")),
                Err(e) => failed.push(format!("task: {e}")),
            }
        }
        if failed.is_empty() {
            Ok(n)
        } else {
            Err(status_of(
                ErrorKind::Unavailable,
                format!("deleted here, but not on every member: {}", failed.join("; ")),
            ))
        }
    }

    /// Hands hinted blocks back to their replicas that are up; drops the
    /// copies here that this node does not hold as a replica itself.
    async fn deliver_hints(self: &Arc<Self>) {
        for node in self.hints.nodes() {
            let liveness = self.view.read().liveness(&node);
            if liveness.is_none() {
                // No longer a member: nothing to hand back. Its keys moved
                // to their new replicas by rebalancing.
                for (ns, keys) in self.hints.for_node(&node) {
                    if self.hints.done(&node, ns, &keys).is_ok() {
                        self.counters.hints_dropped.fetch_add(keys.len() as u64, Relaxed);
                    }
                }
                tracing::info!(member = %node, "hints for a member that left dropped");
                continue;
            }
            if liveness != Some(Liveness::Up) {
                continue;
            }
            let Some(c) = self.peers.get(&node) else { continue };
            for (ns, keys) in self.hints.for_node(&node) {
                let Ok(block) = self.manager.block_bytes(ns) else {
                    // Not registered here any more: nothing to hand back.
                    let _ = self.hints.done(&node, ns, &keys);
                    self.counters.hints_dropped.fetch_add(keys.len() as u64, Relaxed);
                    continue;
                };
                let block = block as usize;
                let per = (self.max_request_bytes as usize / block.max(1)).clamp(1, HINT_BATCH_BLOCKS);
                for chunk in keys.chunks(per) {
                    if let Err(e) = self.deliver(c, &node, ns, chunk.to_vec(), block).await {
                        tracing::info!(member = %node, "hint delivery stopped, retried next heartbeat: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Delivers one batch of hints to `node`.
    async fn deliver(
        self: &Arc<Self>,
        c: &Client,
        node: &NodeId,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        block: usize,
    ) -> Result<(), String> {
        let m = self.manager.clone();
        let (present, missing, data) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; keys.len() * block];
            let (mut present, mut missing, mut at) = (Vec::new(), Vec::new(), 0);
            while at < keys.len() {
                let filled = present.len() * block;
                let rest = &keys[at..];
                let loaded = match m.load(ns, rest, &mut buf[filled..filled + rest.len() * block]) {
                    Ok(o) => o.loaded,
                    Err(_) => 0,
                };
                if loaded == 0
                    && present.is_empty()
                    && let Ok(Some(c)) = m.load_one(ns, rest[0])
                    && c.len() < block
                {
                    // A variable-length chunk: delivered on its own.
                    return (vec![rest[0]], Vec::new(), Bytes::from(c));
                }
                present.extend_from_slice(&rest[..loaded]);
                at += loaded;
                if at < keys.len() {
                    missing.push(keys[at]);
                    at += 1;
                }
            }
            buf.truncate(present.len() * block);
            (present, missing, Bytes::from(buf))
        })
        .await
        .map_err(|e| format!("load task: {e}"))?;
        if !present.is_empty() {
            let t = self.timeout_for(data.len());
            let chunk_len = (present.len() == 1 && data.len() < block).then_some(data.len() as u64);
            match tokio::time::timeout(t, c.replica_put(ns, &present, data, self.spec(ns), None, chunk_len)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {t:?}")),
            }
        }
        let log = |keys: &[BlockKey]| self.hints.done(node, ns, keys).map_err(|e| format!("hint log: {e}"));
        log(&present)?;
        log(&missing)?;
        self.counters.hints_delivered.fetch_add(present.len() as u64, Relaxed);
        self.counters.hints_dropped.fetch_add(missing.len() as u64, Relaxed);
        // The stand-in's copy was for the replica; keep it only where this
        // node is a replica too.
        let rep = self.registry.replication(ns);
        let members = self.view.read().members();
        let extra: Vec<BlockKey> = present
            .iter()
            .filter(|k| !placement::replicas(k, &members, rep.replicas).contains(&self.me))
            .copied()
            .collect();
        if !extra.is_empty() {
            let m = self.manager.clone();
            let _ = tokio::task::spawn_blocking(move || m.remove(ns, &extra)).await;
        }
        tracing::info!(member = %node, namespace = %ns, delivered = present.len(), dropped = missing.len(), "hints delivered");
        Ok(())
    }

    /// Stats for the Stats reply.
    pub fn stats(&self) -> proto::ClusterStats {
        let out_of_sync = self.hints.counts();
        let v = self.view.read();
        let c = &self.counters;
        let mut s = proto::ClusterStats {
            node_id: self.me.0.clone(),
            epoch: v.epoch(),
            members: v
                .members()
                .into_iter()
                .map(|m| proto::MemberStatus {
                    liveness: liveness_name(v.liveness(&m.id)).into(),
                    out_of_sync_keys: out_of_sync.get(&m.id).copied().unwrap_or(0) as u64,
                    id: m.id.0,
                    addr: m.addr,
                    weight: m.weight,
                })
                .collect(),
            hints_pending: self.hints.pending() as u64,
            hints_delivered: c.hints_delivered.load(Relaxed),
            hints_dropped: c.hints_dropped.load(Relaxed),
            replica_writes_sent: c.replica_writes_sent.load(Relaxed),
            replica_writes_failed: c.replica_writes_failed.load(Relaxed),
            peer_read_blocks: c.peer_read_blocks.load(Relaxed),
            peer_read_failures: c.peer_read_failures.load(Relaxed),
            replica_blocks_received: c.replica_blocks_received.load(Relaxed),
            replica_blocks_served: c.replica_blocks_served.load(Relaxed),
            resync_keys_offered: c.resync_keys_offered.load(Relaxed),
            resync_blocks_sent: c.resync_blocks_sent.load(Relaxed),
            resync_running: self.resync.running(),
            members_epoch: v.list_epoch(),
            out_of_sync_marked: c.out_of_sync_marked.load(Relaxed),
            member_lists_adopted: c.member_lists_adopted.load(Relaxed),
            ..Default::default()
        };
        self.rebalance_stats(&mut s);
        s
    }
}

/// Whether a replica write that failed with `kind` may succeed later (a
/// timeout, an unreachable, busy or full node, a torn copy): then the copy
/// is kept for the replica. A refusal that would repeat (bad input, no
/// permission) is not.
fn may_recover(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::InvalidArgument
            | ErrorKind::TooLarge
            | ErrorKind::BlockSize
            | ErrorKind::UnknownNamespace
            | ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::PermissionDenied
            | ErrorKind::Unauthenticated
            | ErrorKind::Config
    )
}

/// The name of a liveness, as in Stats.
pub fn liveness_name(l: Option<Liveness>) -> &'static str {
    match l {
        Some(Liveness::Up) => "up",
        Some(Liveness::Suspect) => "suspect",
        Some(Liveness::Down) => "down",
        None => "unknown",
    }
}
