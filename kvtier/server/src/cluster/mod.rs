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
//! how a write's keys are grouped and when it is acknowledged, which failed
//! copies are kept for their replica, where a read goes during a move, what
//! a stand-in drops after handing a hint back) are the core's pure
//! functions in [`kvtier::replication`]; this module only carries them out.
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
//! - **A member's client exists before a view names it.** A membership
//!   change registers the clients of the members it names, then publishes
//!   the view (see `rebalance`), so a write, a read or a heartbeat that
//!   finds a member in the view finds its client. Should one still be
//!   missing, the copy or read to it fails like an unreachable node would:
//!   counted, and for a write hinted.

pub mod hints;
pub mod peers;
pub mod rebalance;
pub mod resync;

use bytes::{Bytes, BytesMut};
use kvtier::replication::hints::{HintAction, hint_action, settle_delivery};
use kvtier::replication::membership::{Change, Liveness, Membership};
use kvtier::replication::placement::NodeId;
use kvtier::replication::read::read_order_moving;
use kvtier::replication::write::{CopyOutcome, Verdict, WriteTally};
use kvtier::replication::{Replication, plan_write};
use kvtier::{BlockKey, BlockManager, ErrorKind, NamespaceId};
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
        let (mut tally, down) = {
            let v = self.view.read();
            let plans: Vec<_> = keys.iter().map(|k| plan_write(k, &v, rep)).collect();
            let down: Vec<NodeId> = v
                .members()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| !v.is_writable(id))
                .collect();
            (WriteTally::new(self.me.clone(), &plans), down)
        };
        let spec = self.spec(ns);
        let mut set = JoinSet::new();
        // What each peer group carried, to keep for a member whose copy fails.
        let mut sent: BTreeMap<usize, (Vec<BlockKey>, Bytes)> = BTreeMap::new();
        for (gi, g) in tally.groups().iter().enumerate() {
            let gkeys: Vec<BlockKey> = g.keys.iter().map(|&i| keys[i]).collect();
            let gdata = if g.keys.len() == keys.len() {
                data.clone()
            } else {
                let mut b = BytesMut::with_capacity(g.keys.len() * block);
                for &i in &g.keys {
                    b.extend_from_slice(&data[i * block..(i + 1) * block]);
                }
                b.freeze()
            };
            let (node, hint_for) = (g.target.node.clone(), g.target.hint_for.clone());
            if node != self.me {
                sent.insert(gi, (gkeys.clone(), gdata.clone()));
            }
            let this = self.clone();
            let spec = spec.clone();
            set.spawn(async move {
                let r = if node == this.me {
                    this.store_local(ns, gkeys, gdata, hint_for)
                        .await
                        .map_err(kvtier_proto::error::from_status)
                } else {
                    this.counters.replica_writes_sent.fetch_add(1, Relaxed);
                    let r = match this.peers.get(&node) {
                        None => Err(kvtier::Error::new(
                            ErrorKind::Unavailable,
                            format!("member {node} has no client yet"),
                        )),
                        Some(c) => {
                            let t = this.timeout_for(gdata.len());
                            let hint = hint_for.as_ref().map(|h| h.0.clone());
                            let put = c.replica_put(ns, &gkeys, gdata, spec, hint, chunk_len);
                            match tokio::time::timeout(t, put).await {
                                Ok(r) => r,
                                Err(_) => Err(kvtier::Error::new(
                                    ErrorKind::Unavailable,
                                    format!("no answer within {t:?}"),
                                )),
                            }
                        }
                    };
                    if r.is_err() {
                        this.counters.replica_writes_failed.fetch_add(1, Relaxed);
                    }
                    r
                };
                (gi, r)
            });
        }
        let mut failed = BTreeMap::new();
        let mut missed = Vec::new();
        while let Some(j) = set.join_next().await {
            let (gi, r) = j.map_err(|e| status_of(ErrorKind::Internal, format!("replica write task: {e}")))?;
            let g = &tally.groups()[gi];
            let (node, n) = (g.target.node.clone(), g.keys.len());
            let outcome = match r {
                Ok(p) => {
                    if p.not_admitted > 0 {
                        failed.insert(
                            node,
                            format!(
                                "its disk admission filter kept out {} of {n} blocks (replicated namespaces need disk_admission_min_seen = 1)",
                                p.not_admitted,
                            ),
                        );
                    }
                    CopyOutcome::Stored {
                        present: p.present as usize,
                        not_admitted: p.not_admitted as usize,
                    }
                }
                Err(e) => {
                    tracing::warn!(member = %node, kind = e.kind().name(), "replica write failed: {}", e.message());
                    failed.insert(node, e.to_string());
                    CopyOutcome::Failed(e.kind())
                }
            };
            if let Some(home) = tally.record(gi, outcome)
                && let Some((gkeys, gdata)) = sent.remove(&gi)
            {
                missed.push((home, gkeys, gdata));
            }
        }
        for (node, gkeys, gdata) in missed {
            self.mark_out_of_sync(ns, node, gkeys, gdata).await;
        }
        match tally.verdict() {
            Verdict::Acknowledged(ack) => Ok(proto::PutResponse {
                stored: ack.stored as u32,
                present: ack.present as u32,
                not_admitted: ack.not_admitted as u32,
            }),
            Verdict::Failed(short) => {
                let mut why: Vec<String> = failed.iter().map(|(n, e)| format!("{n} failed ({e})")).collect();
                if !down.is_empty() {
                    let d: Vec<&str> = down.iter().map(|n| n.0.as_str()).collect();
                    why.push(format!("down: {}", d.join(", ")));
                }
                let msg = format!(
                    "{} of {} blocks got fewer than write_quorum {} of replicas {} copies: {}",
                    short.short_keys,
                    keys.len(),
                    rep.w(),
                    rep.replicas,
                    why.join("; ")
                );
                Err(status(&kvtier::Error::new(short.kind, msg)))
            }
            other => Err(status_of(
                ErrorKind::Internal,
                format!("a write verdict this build does not know: {other:?}"),
            )),
        }
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
    /// lack it (out of sync) last; while keys move, the old replicas and
    /// every other member after them (see `rebalance`).
    fn read_peers(&self, ns: NamespaceId, key: &BlockKey, rep: Replication) -> Vec<NodeId> {
        let moving = self.rebalance.movement();
        let v = self.view.read();
        read_order_moving(key, &v, rep, moving.as_ref(), |n| self.hints.contains(n, ns, *key))
            .into_iter()
            .filter(|n| *n != self.me)
            .collect()
    }

    /// The client of `peer` for a read; a member without one (a departed
    /// member this process never knew) counts as a failed read.
    fn read_client(&self, peer: &NodeId) -> Option<&'static Client> {
        let c = self.peers.get(peer);
        if c.is_none() {
            tracing::debug!(member = %peer, "no client for a member a read asks");
            self.counters.peer_read_failures.fetch_add(1, Relaxed);
        }
        c
    }

    /// Loads `keys` of `ns` from peers into `out` (`block` bytes per key),
    /// as far as they hold a leading run; answers the blocks loaded.
    pub async fn fetch(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8], block: usize) -> usize {
        let rep = self.registry.replication(ns);
        let mut at = 0;
        'keys: while at < keys.len() {
            for peer in self.read_peers(ns, &keys[at], rep) {
                let Some(c) = self.read_client(&peer) else { continue };
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
                let Some(c) = self.read_client(&peer) else { continue };
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

    /// The client of member `id`, if it is a peer.
    pub fn peer(&self, id: &NodeId) -> Option<&'static Client> {
        self.peers.get(id)
    }

    /// Loads one variable-length block (a checkpoint chunk) from the peers
    /// that may hold it, in read order.
    pub async fn fetch_chunk(&self, ns: NamespaceId, key: BlockKey) -> Option<Vec<u8>> {
        let rep = self.registry.replication(ns);
        for peer in self.read_peers(ns, &key, rep) {
            let Some(c) = self.read_client(&peer) else { continue };
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
        let mut failed = Vec::new();
        for node in targets {
            let Some(c) = self.peers.get(&node) else {
                failed.push(format!("{node}: no client yet"));
                continue;
            };
            let c = c.clone();
            let keys = keys.to_vec();
            let t = self.timeout_for(0);
            set.spawn(async move { (node, tokio::time::timeout(t, c.replica_delete(ns, &keys)).await) });
        }
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
            match hint_action(liveness) {
                HintAction::Deliver => {}
                HintAction::GiveUp => {
                    for (ns, keys) in self.hints.for_node(&node) {
                        if self.hints.done(&node, ns, &keys).is_ok() {
                            self.counters.hints_dropped.fetch_add(keys.len() as u64, Relaxed);
                        }
                    }
                    tracing::info!(member = %node, "hints for a member that left dropped");
                    continue;
                }
                // Waiting, or an action this build does not know: the
                // hints stay for a later heartbeat.
                _ => continue,
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
        let handed_back = if present.is_empty() {
            Ok(())
        } else {
            let t = self.timeout_for(data.len());
            let chunk_len = (present.len() == 1 && data.len() < block).then_some(data.len() as u64);
            match tokio::time::timeout(t, c.replica_put(ns, &present, data, self.spec(ns), None, chunk_len)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {t:?}")),
            }
        };
        let rep = self.registry.replication(ns);
        let settled = settle_delivery(&present, &missing, handed_back.is_ok(), &self.view.read(), rep.replicas);
        // Unconfirmed, the settlement is empty: every hint and copy stays.
        handed_back?;
        self.hints
            .done(node, ns, &settled.done)
            .map_err(|e| format!("hint log: {e}"))?;
        self.counters
            .hints_delivered
            .fetch_add(settled.delivered as u64, Relaxed);
        self.counters.hints_dropped.fetch_add(settled.given_up as u64, Relaxed);
        if !settled.drop.is_empty() {
            let m = self.manager.clone();
            let drop = settled.drop;
            let _ = tokio::task::spawn_blocking(move || m.remove(ns, &drop)).await;
        }
        tracing::info!(member = %node, namespace = %ns, delivered = settled.delivered, dropped = settled.given_up, "hints delivered");
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
                    liveness: v.liveness(&m.id).map_or("unknown", Liveness::name).into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier::ManagerConfig;
    use kvtier::replication::placement::Member;
    use kvtier::replication::write::copy_may_recover;
    use kvtier::tier::host::HostConfig;

    #[test]
    fn a_failed_copy_is_kept_for_its_replica_unless_the_peer_refused_it() {
        use kvtier_proto::error::{from_status, status_of};
        // What a peer call fails with, read back as the driver reads it.
        let keep = [
            // A connection that broke mid-call: no kvtier kind on it.
            tonic::Status::unknown("transport error"),
            tonic::Status::deadline_exceeded("late"),
            status_of(ErrorKind::Throttled, "queue full"),
            status_of(ErrorKind::NoSpace, "disk full"),
            status_of(ErrorKind::Closed, "stopping"),
        ];
        let drop = [
            status_of(ErrorKind::InvalidArgument, "bad"),
            status_of(ErrorKind::UnknownNamespace, "who"),
            status_of(ErrorKind::Unauthenticated, "token"),
            status_of(ErrorKind::TooLarge, "split it"),
        ];
        for s in keep {
            let k = from_status(s).kind();
            assert!(copy_may_recover(k), "{k:?} keeps the copy");
        }
        for s in drop {
            let k = from_status(s).kind();
            assert!(!copy_may_recover(k), "{k:?} drops the copy");
        }
    }

    fn namespace() -> kvtier::Namespace {
        kvtier::Namespace::new(
            "m",
            kvtier::block::KvLayout {
                num_layers: 1,
                kv_heads: 1,
                head_dim: 16,
                block_tokens: 64,
                kind: kvtier::block::KvKind::Kv,
                dtype: kvtier::block::Dtype::F16,
            },
        )
    }

    /// A member in the view without a client, which a membership change
    /// never publishes, is put there directly: writes, reads and deletes
    /// must treat it as a member that does not answer.
    #[tokio::test]
    async fn a_member_without_a_client_is_a_failed_copy_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostConfig {
            pin_memory: false,
            ..HostConfig::with_capacity(16 << 20)
        };
        let manager = Arc::new(ManagerConfig::host_only(host).build().unwrap());
        let registry = Arc::new(Registry::open(dir.path().join("namespaces.json"), manager.clone()).unwrap());
        let cfg: ClusterConfig =
            serde_json::from_str(r#"{"node_id": "a", "members": [{"id": "a", "addr": "127.0.0.1:1"}]}"#).unwrap();
        let cluster = Arc::new(
            Cluster::new(
                &cfg,
                false,
                None,
                manager.clone(),
                registry.clone(),
                dir.path(),
                64 << 20,
            )
            .unwrap(),
        );
        let b: NodeId = "b".into();
        cluster.view.write().join(Member::new("b", "127.0.0.1:1"));
        assert!(cluster.peer(&b).is_none());
        let ns = registry
            .register(&namespace(), Some(Replication::strong(2)), false)
            .unwrap()
            .id;
        let block = manager.block_bytes(ns).unwrap() as usize;
        let key = BlockKey(1);

        let e = cluster
            .write(ns, &[key], Bytes::from(vec![7u8; block]), block)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("b failed"), "{e:?}");
        let c = &cluster.counters;
        assert_eq!(c.replica_writes_sent.load(Relaxed), 1);
        assert_eq!(c.replica_writes_failed.load(Relaxed), 1);
        assert_eq!(c.out_of_sync_marked.load(Relaxed), 1, "a copy kept here for b");
        assert!(cluster.hints.contains(&b, ns, key), "and a hint");

        let mut out = vec![0u8; block];
        assert_eq!(cluster.fetch(ns, &[BlockKey(2)], &mut out, block).await, 0);
        assert_eq!(c.peer_read_failures.load(Relaxed), 1, "the read to b failed");
        let e = cluster.delete_everywhere(ns, &[key]).await.unwrap_err();
        assert!(e.message().contains("b: no client"), "{e:?}");
    }
}
