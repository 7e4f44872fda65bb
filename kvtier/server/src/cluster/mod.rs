//! kvtierd in a cluster: the I/O around the replication core.
//!
//! - This module: [`Cluster`], this node's view of the member list, its
//!   counters and Stats, and the background tasks, which
//!   [`Cluster::shutdown`] stops.
//! - `heartbeat`: heartbeats that feed [`Membership`], and namespace
//!   registrations on every member.
//! - `write`: the fan-out of replicated writes and the copies kept for
//!   replicas that missed one.
//! - `read`: reads, lookups and deletes across members.
//! - `repair`: peer reads that tell a corrupt copy from a missing one, and
//!   the rewrite of a peer's corrupt copy (read repair, see
//!   [`crate::repair`]).
//! - `deliver`: hint delivery to members that answer again.
//! - [`tombstones`]: deletes a member missed, kept by the members that saw
//!   them and applied late, to copies written before them only.
//! - `landed`: blob notices, telling a key's other replicas that this
//!   node's upload of it landed in blob (writeback mode), and acting on
//!   theirs.
//! - [`hints`]: the durable log of blocks held for a replica that lacks
//!   them (down, or a write to it failed): the per-member out-of-sync view.
//! - The `Peer` gRPC service the other nodes call is [`crate::peer`].
//! - [`resync`]: what a member back from down gets from the others.
//! - [`rebalance`]: members joining and leaving at run time, and the keys
//!   that move after.
//! - [`peers`]: the clients of the members, a set that grows.
//! - [`gossip`]: the SWIM gossip driver over UDP and TCP, and in gossip
//!   mode (`cluster.membership = "gossip"`) what feeds the view in place
//!   of the heartbeats.
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
//! - **Placement by slots, one table per member list.** The view holds the
//!   member list as its slot table ([`kvtier::replication::slots`]): a
//!   key's replicas are a lookup, whatever the cluster size. A change of
//!   the list computes the next table on a blocking thread (seconds at
//!   100,000 members) while the view keeps serving on the current one, and
//!   publishes list and table together (see `rebalance`); liveness changes
//!   never touch the table.
//! - **One slot count per cluster, checked on every heartbeat.** A ping
//!   carries the sender's slot count; a node refuses pings from a node that
//!   places keys otherwise (another `cluster.slots`, or a build before
//!   slots, which sends none) and counts such a node's answers as missed,
//!   so the two see each other down: no write or read goes between them,
//!   writes meant for it wait in hints, and the mismatch is logged as an
//!   error once per peer and counted (`placement_mismatches`). In gossip
//!   mode every gossip message carries the count instead, and such a node
//!   never enters the member list (see [`gossip`]).

mod deliver;
pub mod gossip;
mod heartbeat;
pub mod hints;
mod landed;
pub mod tombstones;
pub use self::landed::MAX_NOTICE_KEYS;
pub mod peers;
mod read;
pub mod rebalance;
pub mod repair;
pub mod resync;
mod write;

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
use crate::config::{ClusterConfig, MembershipMode};
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
    /// Pings refused and answers counted as missed because the peer places
    /// keys in another slot count.
    pub placement_mismatches: AtomicU64,
    /// Keys this node offered to members back from down.
    pub resync_keys_offered: AtomicU64,
    /// Those they lacked, sent.
    pub resync_blocks_sent: AtomicU64,
    /// Blob notice messages delivered to peers.
    pub blob_notices_sent: AtomicU64,
    /// Keys they carried.
    pub blob_notice_keys_sent: AtomicU64,
    /// Blob notice messages that failed (or had no client).
    pub blob_notices_failed: AtomicU64,
    /// Keys peers' notices named.
    pub blob_notice_keys_received: AtomicU64,
    /// Tombstones delivered to the member that missed the delete.
    pub tombstones_delivered: AtomicU64,
    /// Tombstones dropped undelivered (too old, or too many).
    pub tombstones_expired: AtomicU64,
    /// Copies removed here by a delete this node missed, applied late.
    pub late_delete_copies_removed: AtomicU64,
    /// Copies peers stored here for keys this node is no replica of.
    pub stray_copies_noted: AtomicU64,
    /// Those dropped once their replicas confirmed them.
    pub stray_copies_dropped: AtomicU64,
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
    /// How long a tombstone waits for its member, how many are kept, and
    /// how far apart clocks may be (see `tombstones`).
    tombstone_ttl: Duration,
    max_tombstones: usize,
    clock_margin_ms: u64,
    /// Held while tombstones go out: the heartbeat's delivery and a
    /// resync's take turns, so each is sent (and counted) once.
    tombstone_delivery: tokio::sync::Mutex<()>,
    /// When tombstones were last expired (Unix ms).
    tombstones_expired_at: AtomicU64,
    /// Counters, for Stats and the metrics.
    pub counters: Counters,
    /// Peers that may lack a namespace registered here: each gets all of
    /// them at its next answered heartbeat (every peer at startup).
    unsynced: Mutex<BTreeSet<NodeId>>,
    /// Peers seen placing keys in another slot count (logged once each,
    /// until they agree again).
    mismatched: Mutex<BTreeSet<NodeId>>,
    delivering: AtomicBool,
    max_request_bytes: u64,
    /// Between two rounds of blob notices; zero sends none.
    notice_interval: Duration,
    resync: resync::Resync,
    rebalance: rebalance::Rebalance,
    /// The background tasks (heartbeats, deliveries, resync, rebalancing,
    /// fetches), and whether [`Cluster::shutdown`] stopped them.
    tasks: crate::tasks::Tasks,
    /// Heartbeats or gossip.
    mode: MembershipMode,
    /// Gossip mode: the settings, and the running member once started
    /// (gone after this node left).
    gossip: gossip::GossipState,
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
        let gossip = gossip::GossipState::new(cfg, data_dir, token.as_deref());
        let template = ClientConfig {
            endpoint: String::new(),
            token,
            ca_file: cfg.ca_file.clone(),
            tls_domain: cfg.tls_domain.clone(),
            // Each peer call has its own bound (`timeout_for`).
            request_timeout: None,
        };
        let peers = peers::Peers::new(template, tls, peer_timeout, cfg.source_ip);
        // The members saved at the last change win over the config's list,
        // which is only the first one.
        let members_file = data_dir.join("members.json");
        let (members, list_epoch) =
            rebalance::Rebalance::saved_members(&members_file)?.unwrap_or_else(|| (cfg.members.clone(), 0));
        for m in members.iter().filter(|m| m.id != me) {
            peers.insert(m)?;
        }
        let hints = HintLog::open(&data_dir.join("hints.log")).map_err(|e| e.to_string())?;
        let view = Membership::with_members(me.clone(), &members, cfg.slots, cfg.detector())
            .map_err(|e| format!("placement of the member list: {e}"))?
            .with_list_epoch(list_epoch);
        // Keys this node holds may follow another placement (a build
        // before slots, another slot count): they move once (see
        // `rebalance`, "Changing the placement").
        let placement_file = data_dir.join("placement.json");
        let has_data = !registry.all().is_empty() || hints.pending() > 0;
        let earlier = rebalance::Rebalance::earlier_layout(&placement_file, &members, cfg.slots, has_data)?;
        let mut rebalance =
            rebalance::Rebalance::new(cfg.rebalance_bytes_per_s, members_file, placement_file, cfg.slots);
        rebalance.push_waiting_after = Duration::from_millis(cfg.rebalance_push_waiting_after_ms);
        if let Some(layout) = earlier {
            rebalance.migrate_from(layout);
        }
        manager.set_peer_check_after(Duration::from_millis(cfg.blob_check_after_ms));
        Ok(Self {
            unsynced: Mutex::new(peers.keys().cloned().collect()),
            mismatched: Mutex::new(BTreeSet::new()),
            me: me.clone(),
            heartbeat: Duration::from_millis(cfg.heartbeat_interval_ms),
            peer_timeout,
            view: RwLock::new(view),
            peers,
            manager,
            registry,
            hints,
            tombstone_ttl: Duration::from_secs(cfg.tombstone_ttl_s),
            max_tombstones: cfg.max_tombstones,
            clock_margin_ms: cfg.clock_margin_ms,
            tombstone_delivery: tokio::sync::Mutex::new(()),
            tombstones_expired_at: AtomicU64::new(0),
            counters: Counters::default(),
            delivering: AtomicBool::new(false),
            max_request_bytes,
            notice_interval: Duration::from_millis(cfg.blob_notice_interval_ms),
            resync: resync::Resync::new(cfg.rebalance_bytes_per_s),
            rebalance,
            tasks: crate::tasks::Tasks::default(),
            mode: cfg.membership,
            gossip,
        })
    }

    /// Starts the heartbeats (in gossip mode, the same loop without the
    /// pings: see [`gossip`]), which start every other background task,
    /// and the blob notices. In gossip mode, [`Cluster::start_gossip`]
    /// comes first.
    pub fn start(self: &Arc<Self>) {
        self.spawn(self.clone().heartbeats());
        if !self.notice_interval.is_zero() {
            self.manager.collect_blob_notices();
            self.spawn(self.clone().blob_notices());
        }
    }

    /// Runs `f` in the background until it ends or [`Cluster::shutdown`];
    /// after a shutdown, drops it instead.
    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(f);
    }

    /// Stops every background task and waits until each has ended, so none
    /// holds this cluster (and its block manager) any more. Work cut short
    /// is redone after a restart: hints are durable, and a returning or
    /// rejoining member is resynced or rebalanced again.
    pub async fn shutdown(&self) {
        // Gossip stops answering probes: the others find this node down.
        drop(self.gossip.stop());
        self.tasks.stop().await;
    }

    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Members, this node included.
    pub fn size(&self) -> usize {
        self.view.read().len()
    }

    /// The slot count this node places keys in.
    pub fn slots(&self) -> u32 {
        self.view.read().slots()
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

    /// Peer `from` sent a heartbeat, placing keys in `slots` slots: it is
    /// up, unless it places keys otherwise than this node; then the ping is
    /// refused (a [`ErrorKind::Config`] error) and it stays as it was.
    pub fn heard_from(&self, from: &str, slots: u32) -> Result<(), Status> {
        if self.gossiping() {
            // Liveness here is gossip's: a node still on heartbeats is
            // misconfigured, and sees this one down until it gossips too.
            return Err(status_of(
                ErrorKind::Config,
                format!(
                    "node {} runs cluster.membership = \"gossip\": heartbeats from {from} refused",
                    self.me
                ),
            ));
        }
        let id = NodeId(from.to_string());
        if let Err(why) = self.placement_agrees(&id, slots) {
            return Err(status_of(ErrorKind::Config, why));
        }
        if id == self.me || !self.peers.contains_key(&id) {
            return Ok(());
        }
        let change = self.view.write().heartbeat_ok(&id);
        self.log_change(change);
        Ok(())
    }

    /// Whether `peer`, which places keys in `slots` slots (0: by per-key
    /// rendezvous, a build before slots), places them as this node does.
    /// A mismatch is counted, and logged as an error once until the peer
    /// agrees again.
    fn placement_agrees(&self, peer: &NodeId, slots: u32) -> Result<(), String> {
        let mine = self.slots();
        if slots == mine {
            if self.mismatched.lock().remove(peer) {
                tracing::info!(member = %peer, slots, "cluster member places keys as this node again");
            }
            return Ok(());
        }
        self.counters.placement_mismatches.fetch_add(1, Relaxed);
        let theirs = if slots == 0 {
            "by per-key rendezvous (a kvtierd before slot placement)".to_string()
        } else {
            format!("in {slots} slots")
        };
        let why = format!(
            "node {peer} places keys {theirs}, node {} in {mine} slots: they refuse each other until every node has the same cluster.slots and version",
            self.me
        );
        if self.mismatched.lock().insert(peer.clone()) {
            tracing::error!(member = %peer, slots, mine, "cluster member refused: {why}");
        }
        Err(why)
    }

    fn log_change(&self, change: Option<Change>) {
        let Some(c) = change else { return };
        let epoch = self.epoch();
        if !matches!(&c, Change::Liveness { to, .. } if *to != Liveness::Down) {
            // A member down, joining or leaving may make this node the
            // uploader of keys it waits for: check those at once.
            let n = self.manager.reconsider_uploads();
            if n > 0 {
                tracing::info!(keys = n, epoch, "uploads this node takes over, checked in blob now");
            }
        }
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

    /// Every member other than this node, up or not.
    pub fn all_peers(&self) -> Vec<NodeId> {
        self.peers.keys().cloned().collect()
    }

    /// Hints this node holds for members that lack a copy.
    pub fn hints_pending(&self) -> usize {
        self.hints.pending()
    }

    /// The client of member `id`, if it is a peer.
    pub fn peer(&self, id: &NodeId) -> Option<&'static Client> {
        self.peers.get(id)
    }

    /// Stats for the Stats reply.
    pub fn stats(&self) -> proto::ClusterStats {
        let out_of_sync = self.hints.counts();
        let v = self.view.read();
        let c = &self.counters;
        let placement_slots = v.slots();
        let mut s = proto::ClusterStats {
            node_id: self.me.0.clone(),
            epoch: v.epoch(),
            members: v
                .members()
                .into_iter()
                .map(|m| proto::MemberStatus {
                    liveness: v.liveness(&m.id).map_or("unknown", Liveness::name).into(),
                    gossip_generation: self.gossip.generation_of(&m.id),
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
            placement_slots,
            placement_mismatches: c.placement_mismatches.load(Relaxed),
            blob_notices_sent: c.blob_notices_sent.load(Relaxed),
            blob_notice_keys_sent: c.blob_notice_keys_sent.load(Relaxed),
            blob_notices_failed: c.blob_notices_failed.load(Relaxed),
            blob_notice_keys_received: c.blob_notice_keys_received.load(Relaxed),
            tombstones_pending: self.hints.tombstones() as u64,
            tombstones_delivered: c.tombstones_delivered.load(Relaxed),
            tombstones_expired: c.tombstones_expired.load(Relaxed),
            late_delete_copies_removed: c.late_delete_copies_removed.load(Relaxed),
            stray_copies_noted: c.stray_copies_noted.load(Relaxed),
            stray_copies_dropped: c.stray_copies_dropped.load(Relaxed),
            membership: self.mode.name().into(),
            members_digest: v.digest(),
            ..Default::default()
        };
        drop(v);
        self.gossip_stats(&mut s);
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
        let cfg: ClusterConfig = serde_json::from_str(
            r#"{"node_id": "a", "members": [{"id": "a", "addr": "127.0.0.1:1"}], "tombstone_ttl_s": 1}"#,
        )
        .unwrap();
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
        cluster.view.write().join(Member::new("b", "127.0.0.1:1")).unwrap();
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
        let got = cluster.fetch(ns, &[BlockKey(2)], &mut out, block, &[]).await;
        assert_eq!(got.loaded, 0);
        let stopped = got.stopped.expect("the read stopped at the first key");
        assert_eq!(
            stopped.answer(&kvtier::replication::repair::Holder::Peer(b.clone())),
            Some(kvtier::replication::repair::Answer::Failed(ErrorKind::Unavailable)),
            "b has no client: it did not answer"
        );
        assert_eq!(c.peer_read_failures.load(Relaxed), 1, "the read to b failed");
        // The delete cannot reach b: it waits for b in a tombstone, dated
        // by this node's clock.
        let before = kvtier::tier::now_ms();
        assert_eq!(cluster.delete_everywhere(ns, &[key]).await.unwrap(), 1);
        assert_eq!(cluster.hints.tombstones(), 1);
        let pending = cluster.hints.tombstones_for(&b);
        let ((tns, at), keys) = pending.into_iter().next().unwrap();
        assert_eq!((tns, keys), (ns, vec![key]));
        assert!(at >= before && at <= kvtier::tier::now_ms(), "{at}");
        assert_eq!(cluster.deleted_at(ns, &[key, BlockKey(2)]), vec![at, 0]);
        assert_eq!(cluster.stats().tombstones_pending, 1);
        // Past its age (1 s here), it is dropped undelivered.
        cluster.deliver_tombstones().await;
        assert_eq!(cluster.hints.tombstones(), 1, "not yet");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        cluster.tombstones_expired_at.store(0, Relaxed);
        cluster.deliver_tombstones().await;
        assert_eq!(cluster.hints.tombstones(), 0);
        assert_eq!(cluster.stats().tombstones_expired, 1);
    }
}
