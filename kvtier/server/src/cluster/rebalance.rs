//! Members joining and leaving at run time, and the keys that move after.
//!
//! # Propagation
//!
//! `Join(member)` and `Leave(id)` go to any node (`kvtier cluster join`,
//! `kvtier cluster leave`). It applies the change to its [`Membership`],
//! persists the member list in `members.json` in its data dir (the config's
//! list is only the first one: a restart keeps what the cluster became),
//! and forwards the change, marked `forwarded`, to every member and, for a
//! leave, to the leaver; a joiner is also offered the whole list
//! (`Members` with an offer), so one started knowing only itself learns
//! the rest. Applying is idempotent (joining a member already
//! there at the same address, or removing one that is gone, changes
//! nothing), so a change sent twice, or by two operators, converges. A
//! member that was up but did not answer the forward is named in the
//! reply's `not_reached`; the operator sends the change again (to it, or to
//! any node). One that is down here is named in `down` instead: it catches
//! up by itself once back (below). Removing a dead member is how an
//! operator gives up on a lost node: the surviving replicas re-replicate
//! its keys by the pass below (the first old replica still up pushes).
//!
//! # Catching up
//!
//! The member list has its own clock, the list epoch (see
//! [`Membership`]): applying a change bumps it, so nodes that applied the
//! same changes agree on it and on the list's digest. Every Ping answer
//! carries both; a node that sees a peer with a larger list epoch and
//! another digest fetches that peer's list (`Members`) and adopts it as if
//! the changes had been forwarded to it: it persists the list, schedules a
//! rebalancing pass and, when the list lacks it, leaves. So a node that
//! was down (or unreachable) during a join or leave learns it within a
//! heartbeat of coming back, and a forward that failed needs no resend.
//! A change forwarded to a node that had missed an earlier one leaves its
//! epoch behind the others', so that it still fetches the whole list.
//!
//! # Rebalancing
//!
//! After a change, each node runs the core's [`plan_rebalance`] over its
//! own keys of every namespace, from the member list before the change to
//! the current one, in a background task paced at `rebalance_bytes_per_s`:
//!
//! 1. for each gained copy it is the pusher of, ask the new replica
//!    whether it holds the key (`ReplicaHas`) and send it with
//!    `ReplicaPut` if not;
//! 2. for each key it no longer is a replica of, ask every new replica;
//!    when all confirm, drop the local copy. Otherwise the pass fails and
//!    runs again at the next heartbeat.
//!
//! A leaver runs the same plan as a non-member: it pushes every key it is
//! the only (or first) holder of, and drops each once confirmed.
//!
//! # Reads during a move
//!
//! A key's new replica may not have it yet. While a move may be under way
//! (this node's pass pending or running, or less than [`SETTLE`] since the
//! last change it saw, which covers the other nodes' passes), reads ask,
//! after the key's replicas, its replicas under the layout before the move,
//! the other writable members of its slot order (its first 16 members,
//! where stand-ins and copies placed by the last few member lists sit) and
//! the members that left recently (they serve until they are stopped): a
//! key is found wherever a copy is (the core's [`read_order_moving`]).
//! Outside a move, reads ask the replicas only.
//!
//! # Clients before the view, the table off the runtime
//!
//! A change is computed from the view (the core's [`ListChange`]); the
//! clients of the members it names are registered; the slot table of the
//! new list is computed on a blocking thread (a join or leave takes
//! milliseconds, a larger change a rebuild of seconds at 100,000 members),
//! while the view keeps serving on the current table; only then are list
//! and table published together. So no task ever finds a member in the view
//! without its client, keys are always placed by the table of the list the
//! view shows, and a change naming an address no client can be built for,
//! or a list no table can be made of, changes nothing. One list change runs
//! at a time; liveness changes go on meanwhile and are kept.
//!
//! # Changing the placement
//!
//! A key's replicas depend on the slot count, and builds before slots
//! placed keys by per-key rendezvous: a node whose keys may follow another
//! placement moves them once. `placement.json` in the data dir records the
//! slot count this node's keys are placed by. At startup, when it names
//! another count, or is missing while the node holds data (namespaces or
//! hints from an earlier run), the node schedules a rebalancing pass from
//! that placement ([`Layout`]) over the member list, exactly as after a
//! membership change: each key is pushed to its new replicas and dropped
//! here only once they confirm it, and reads during the move also ask the
//! key's replicas under the old placement. A copy the old placement does
//! not explain (kept from before the node was a cluster member, or a
//! stand-in's) is pushed by the node that holds it. `placement.json` is written
//! once a pass has succeeded (at once on a node without data), so a node
//! stopped halfway resumes the move at its next start. Nodes of one cluster
//! must place keys alike: the others refuse a node whose slot count differs
//! (see the cluster module), so the placement changes for a whole cluster
//! at once: stop every node, change `cluster.slots` or the version, start
//! them (the README's upgrade notes).

use kvtier::replication::membership::{self, CatchUp, Change, ListChange, Liveness, Membership};
use kvtier::replication::placement::{Layout, Member, NodeId};
use kvtier::replication::read::Move;
#[cfg(doc)]
use kvtier::replication::read::read_order_moving;
use kvtier::replication::rebalance::{DropTally, Drops, Transfer, plan_rebalance, pushes_by_node};
use kvtier::replication::slots::{MAX_R, SlotTable};
use kvtier::{BlockKey, NamespaceId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::Status;

use super::Cluster;
use super::resync::{ASK_KEYS, Pacer, call};
use crate::proto;
use crate::{invalid, status_of};
use kvtier::ErrorKind;

/// How long after a membership change reads keep asking every member.
pub const SETTLE: Duration = Duration::from_secs(60);

/// The rebalancer's state and counters.
/// Stray copies noted at most; past it, the newest notes are not kept
/// (their copies stay until evicted).
const MAX_STRAYS: usize = 1 << 20;

/// How often a rebalancing that keeps failing is logged at warn.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(super) struct Rebalance {
    /// How the keys were placed, when a pass is due.
    pending: Mutex<Option<Layout>>,
    running: AtomicBool,
    /// Since when passes have failed (none finished since): once
    /// `push_waiting_after` passed, a retry also pushes the copies it waits
    /// on (see `rebalance_pass`).
    failing_since: Mutex<Option<Instant>>,
    /// When a failing pass was last logged at warn.
    warned: Mutex<Option<Instant>>,
    /// Copies peers stored here for keys this node is no replica of (see
    /// `Cluster::note_strays`), and whether a stray pass runs.
    strays: Mutex<BTreeMap<NamespaceId, BTreeSet<BlockKey>>>,
    straying: AtomicBool,
    pub(super) push_waiting_after: Duration,
    /// Whether a member list is being fetched from a peer.
    fetching: AtomicBool,
    /// When the last change was seen, and the members that left recently.
    last_change: Mutex<Option<Instant>>,
    departed: Mutex<BTreeSet<NodeId>>,
    /// How keys were placed when the current move began: reads during the
    /// move ask those replicas early.
    placed_by: Mutex<Option<Layout>>,
    /// Held while a member-list change is computed and published: one at
    /// a time.
    changing: tokio::sync::Mutex<()>,
    bytes_per_s: u64,
    members_file: PathBuf,
    /// `placement.json`, and the slot count it is to record once every key
    /// here follows it; whether it records it already.
    placement_file: PathBuf,
    slots: u32,
    placement_saved: AtomicBool,
    done: AtomicU64,
    keys_moved: AtomicU64,
    bytes_moved: AtomicU64,
    keys_dropped: AtomicU64,
}

impl Rebalance {
    pub(super) fn new(bytes_per_s: u64, members_file: PathBuf, placement_file: PathBuf, slots: u32) -> Self {
        Self {
            pending: Mutex::new(None),
            running: AtomicBool::new(false),
            failing_since: Mutex::new(None),
            warned: Mutex::new(None),
            strays: Mutex::new(BTreeMap::new()),
            straying: AtomicBool::new(false),
            push_waiting_after: Duration::from_secs(30),
            fetching: AtomicBool::new(false),
            last_change: Mutex::new(None),
            departed: Mutex::new(BTreeSet::new()),
            placed_by: Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
            bytes_per_s,
            members_file,
            placement_file,
            slots,
            placement_saved: AtomicBool::new(true),
            done: AtomicU64::new(0),
            keys_moved: AtomicU64::new(0),
            bytes_moved: AtomicU64::new(0),
            keys_dropped: AtomicU64::new(0),
        }
    }

    /// Whether keys may be on their way: reads then ask every member.
    pub(super) fn moving(&self) -> bool {
        self.running.load(Relaxed)
            || self.pending.lock().is_some()
            || self.last_change.lock().is_some_and(|t| t.elapsed() < SETTLE)
    }

    /// What reads need to know of a move under way; `None` outside one.
    pub(super) fn movement(&self) -> Option<Move> {
        if !self.moving() {
            return None;
        }
        Some(Move {
            before: self.placed_by.lock().clone(),
            departed: self.departed.lock().iter().cloned().collect(),
        })
    }

    fn state(&self) -> &'static str {
        if self.running.load(Relaxed) {
            "running"
        } else if self.pending.lock().is_some() {
            "pending"
        } else {
            "idle"
        }
    }

    /// The member list this node keeps across restarts, with its list
    /// epoch, if it saved one (a bare list, as older versions saved, has
    /// epoch 0).
    pub(super) fn saved_members(file: &std::path::Path) -> Result<Option<(Vec<Member>, u64)>, String> {
        match std::fs::read(file) {
            Ok(b) => serde_json::from_slice::<SavedMembers>(&b)
                .map(|s| {
                    Some(match s {
                        SavedMembers::Bare(m) => (m, 0),
                        SavedMembers::WithEpoch { epoch, members } => (members, epoch),
                    })
                })
                .map_err(|e| format!("{}: {e}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", file.display())),
        }
    }

    /// How the keys in this node's data dir were placed, when not by
    /// `slots` slots over `members`: by the slot count `placement.json`
    /// names, or, when it is missing on a node with data (`has_data`), by
    /// per-key rendezvous (a build before slots). A node without data
    /// records `slots` at once.
    pub(super) fn earlier_layout(
        file: &Path,
        members: &[Member],
        slots: u32,
        has_data: bool,
    ) -> Result<Option<Layout>, String> {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", file.display());
        match std::fs::read(file) {
            Ok(b) => {
                let p: Placed = serde_json::from_slice(&b).map_err(|e| at(&e))?;
                if p.slots == slots {
                    return Ok(None);
                }
                let t = SlotTable::new(members, p.slots, MAX_R).map_err(|e| at(&e))?;
                Ok(Some(Layout::Slots(Arc::new(t))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if has_data {
                    return Ok(Some(Layout::Rendezvous(members.into())));
                }
                save_placement(file, slots)?;
                Ok(None)
            }
            Err(e) => Err(at(&e)),
        }
    }

    /// Schedules the move of this node's keys from `earlier` to the
    /// configured placement; reads ask the earlier replicas meanwhile.
    pub(super) fn migrate_from(&self, earlier: Layout) {
        let from = match &earlier {
            Layout::Slots(t) => format!("{} slots", t.slots()),
            _ => "per-key rendezvous (a kvtierd before slot placement)".into(),
        };
        tracing::warn!(
            slots = self.slots,
            "keys here may be placed by {from}: moving them once to their replicas in {} slots",
            self.slots
        );
        *self.placed_by.lock() = Some(earlier.clone());
        *self.pending.lock() = Some(earlier);
        *self.last_change.lock() = Some(Instant::now());
        self.placement_saved.store(false, Relaxed);
    }

    /// A pass succeeded: every key here follows the configured placement.
    fn placement_settled(&self) {
        if self.placement_saved.load(Relaxed) {
            return;
        }
        match save_placement(&self.placement_file, self.slots) {
            Ok(()) => {
                self.placement_saved.store(true, Relaxed);
                tracing::info!(slots = self.slots, "every key here is placed by slots");
            }
            Err(e) => tracing::warn!("{e}: saved at the next pass"),
        }
    }

    fn save_members(&self, members: &[Member], epoch: u64) -> Result<(), String> {
        let saved = SavedMembers::WithEpoch {
            epoch,
            members: members.to_vec(),
        };
        let text = serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())?;
        // Durable: a member list that survives a crash half-written, or
        // unsynced, would bring the node back with the wrong view.
        kvtier::fsio::replace_durably(&self.members_file, &text).map_err(|e| e.to_string())
    }
}

/// `placement.json`: the slot count this node's keys are placed by.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Placed {
    slots: u32,
}

fn save_placement(file: &Path, slots: u32) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(&Placed { slots }).map_err(|e| e.to_string())?;
    kvtier::fsio::replace_durably(file, &text).map_err(|e| format!("{}: {e}", file.display()))
}

/// `members.json`: the list with its epoch, or (older versions) the bare
/// list.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum SavedMembers {
    WithEpoch { epoch: u64, members: Vec<Member> },
    Bare(Vec<Member>),
}

impl Cluster {
    /// Applies the list change `propose` answers for the view (none: no
    /// change), with its table computed off the runtime; then persists the
    /// member list and schedules a rebalancing pass from the layout before
    /// it. Every member the changed view names has a client before the view
    /// is published (see "Clients before the view, the table off the
    /// runtime"). One change at a time.
    pub(super) async fn change_members(
        self: &Arc<Self>,
        propose: impl FnOnce(&Membership) -> Option<ListChange>,
    ) -> Result<bool, Status> {
        let _one = self.rebalance.changing.lock().await;
        let (change, table) = {
            let v = self.view.read();
            match propose(&v) {
                Some(c) => (c, v.table().clone()),
                None => return Ok(false),
            }
        };
        for m in change.members().iter().filter(|m| m.id != self.me) {
            self.peers.insert(m).map_err(Status::invalid_argument)?;
        }
        let computing = change.clone();
        let next = tokio::task::spawn_blocking(move || computing.table(&table))
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("slot table task: {e}")))?
            .map_err(|e| status_of(e.kind(), format!("member list refused: {e}")))?;
        let was_moving = self.rebalance.moving();
        let (before, changes, after, epoch) = {
            let mut v = self.view.write();
            let before = Layout::Slots(v.table().clone());
            let changes = v
                .commit(change, Arc::new(next))
                .map_err(|e| status_of(e.kind(), format!("member list change: {e}")))?;
            // Before a read can see the new view: reads that find it must
            // also find the move (`moving`, and the layout keys come
            // from), or they would ask only the new replicas while the
            // old ones still hold the keys, or have just handed them on.
            {
                // A change during a move keeps the older layout: keys the
                // move has not reached yet still sit where it put them.
                let mut placed_by = self.rebalance.placed_by.lock();
                if !was_moving || placed_by.is_none() {
                    *placed_by = Some(before.clone());
                }
            }
            *self.rebalance.last_change.lock() = Some(Instant::now());
            (before, changes, v.members(), v.list_epoch())
        };
        for change in changes {
            if let Change::Joined(id) = &change {
                self.rebalance.departed.lock().remove(id);
                self.unsynced.lock().insert(id.clone());
            }
            if let Change::Left(id) = &change {
                self.rebalance.departed.lock().insert(id.clone());
            }
            self.log_change(Some(change));
        }
        if let Err(e) = self.rebalance.save_members(&after, epoch) {
            tracing::warn!("member list not saved: {e}");
        }
        self.rebalance.pending.lock().get_or_insert(before);
        self.start_rebalance();
        Ok(true)
    }

    /// Adds `m` (or re-addresses it) and, unless `forwarded`, sends the
    /// change to every member.
    pub async fn join(self: &Arc<Self>, m: Member, forwarded: bool) -> Result<proto::MembershipResponse, Status> {
        if m.id.0.is_empty() || m.addr.is_empty() {
            return Err(invalid("a joining member needs an id and an addr"));
        }
        if !(m.weight.is_finite() && m.weight > 0.0) {
            return Err(invalid(format!("member weight {} must be a positive number", m.weight)));
        }
        if self.gossiping() {
            return Err(status_of(
                ErrorKind::Config,
                format!(
                    "cluster.membership is \"gossip\": {} joins by starting with cluster.seeds naming a member's gossip address, not by a join request",
                    m.id
                ),
            ));
        }
        self.change_members(|v| v.propose_join(m.clone())).await?;
        let req = proto::JoinRequest {
            id: m.id.0.clone(),
            addr: m.addr.clone(),
            weight: m.weight,
            forwarded: true,
        };
        let (mut not_reached, down) = if forwarded {
            (Vec::new(), Vec::new())
        } else {
            self.forward(Vec::new(), BTreeSet::new(), move |c| {
                let req = req.clone();
                async move { c.join(req).await }
            })
            .await
        };
        if !forwarded && m.id != self.me && !not_reached.contains(&m.id.0) && !down.contains(&m.id.0) {
            // The joiner may have started knowing only some members: it is
            // offered the whole list at once.
            if let Err(e) = self.teach(&m.id).await {
                tracing::warn!(member = %m.id, "member list not sent to the joiner: {e}");
                not_reached.push(m.id.0.clone());
            }
        }
        Ok(self.membership_reply(not_reached, down))
    }

    /// Offers this node's member list to `joiner`, which adopts it when it
    /// is newer than its own. One call, so the joiner never holds a part
    /// of the list at a list epoch that others would take for newer.
    async fn teach(&self, joiner: &NodeId) -> Result<(), String> {
        let c = self.peers.get(joiner).ok_or("not a peer")?;
        call(self.peer_timeout, c.members(Some(self.member_list()))).await?;
        Ok(())
    }

    /// The member list's epoch and digest, as Ping answers them.
    pub fn list_clock(&self) -> (u64, u64) {
        let v = self.view.read();
        (v.list_epoch(), v.digest())
    }

    /// This node's member list, with its epoch, digest and slot count.
    pub fn member_list(&self) -> proto::MemberList {
        let v = self.view.read();
        proto::MemberList {
            members_epoch: v.list_epoch(),
            members_digest: v.digest(),
            placement_slots: v.slots(),
            members: v
                .members()
                .into_iter()
                .map(|m| proto::MemberStatus {
                    id: m.id.0,
                    addr: m.addr,
                    weight: m.weight,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Adopts `list` (a peer's, offered or fetched) when it is newer than
    /// this node's and differs; takes its epoch when only the epoch is
    /// newer. Answers whether the member list changed. A list from a node
    /// that places keys in another slot count is refused.
    pub async fn adopt_list(self: &Arc<Self>, list: proto::MemberList, from: &str) -> Result<bool, Status> {
        let slots = self.slots();
        if list.placement_slots != slots {
            return Err(status_of(
                ErrorKind::Config,
                format!(
                    "member list from {from} places keys in {} slots (0: a kvtierd before slot placement), this node in {slots}: refused",
                    list.placement_slots
                ),
            ));
        }
        let mut members = Vec::with_capacity(list.members.len());
        for m in list.members {
            if m.id.is_empty() || m.addr.is_empty() || !(m.weight.is_finite() && m.weight > 0.0) {
                return Err(invalid(format!(
                    "member list from {from}: bad member {:?} at {:?} weight {}",
                    m.id, m.addr, m.weight
                )));
            }
            members.push(Member {
                id: NodeId(m.id),
                addr: m.addr,
                weight: m.weight,
            });
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if members.windows(2).any(|w| w[0].id == w[1].id) {
            return Err(invalid(format!("member list from {from}: duplicate ids")));
        }
        if membership::digest(&members, slots) != list.members_digest {
            return Err(invalid(format!(
                "member list from {from}: its digest does not match its members"
            )));
        }
        let (epoch, digest) = (list.members_epoch, list.members_digest);
        let catch_up = self.view.read().catch_up(epoch, digest);
        match catch_up {
            CatchUp::Nothing => Ok(false),
            CatchUp::Epoch(e) => {
                let (after, e) = {
                    let mut v = self.view.write();
                    v.observe_list_epoch(e);
                    (v.members(), v.list_epoch())
                };
                if let Err(e) = self.rebalance.save_members(&after, e) {
                    tracing::warn!("member list not saved: {e}");
                }
                Ok(false)
            }
            CatchUp::Fetch => {
                let changed = self
                    .change_members(|v| {
                        // Checked again: a change may have come in since.
                        if v.catch_up(epoch, digest) == CatchUp::Fetch {
                            v.propose_adopt(members, epoch)
                        } else {
                            None
                        }
                    })
                    .await?;
                if changed {
                    self.counters.member_lists_adopted.fetch_add(1, Relaxed);
                    tracing::info!(from, members_epoch = epoch, "adopted a newer member list");
                }
                Ok(changed)
            }
        }
    }

    /// A peer answered a heartbeat with its list epoch and digest: fetch its
    /// list when it is newer (one fetch at a time).
    pub(super) fn maybe_catch_up(self: &Arc<Self>, peer: &NodeId, epoch: u64, digest: u64) {
        match self.view.read().catch_up(epoch, digest) {
            CatchUp::Nothing => return,
            CatchUp::Epoch(_) | CatchUp::Fetch => {}
        }
        if self.rebalance.fetching.swap(true, Relaxed) {
            return;
        }
        let Some(c) = self.peers.get(peer) else {
            self.rebalance.fetching.store(false, Relaxed);
            return;
        };
        let (this, peer) = (self.clone(), peer.clone());
        self.spawn(async move {
            match call(this.peer_timeout, c.members(None)).await {
                Ok(list) => {
                    if let Err(e) = this.adopt_list(list, &peer.0).await {
                        tracing::warn!(member = %peer, "member list not adopted: {}", e.message());
                    }
                }
                Err(e) => tracing::info!(member = %peer, "member list not fetched, tried again next heartbeat: {e}"),
            }
            this.rebalance.fetching.store(false, Relaxed);
        });
    }

    /// Removes `id` and, unless `forwarded`, sends the change to every
    /// member and to `id`, which hands its keys over.
    pub async fn leave(self: &Arc<Self>, id: NodeId, forwarded: bool) -> Result<proto::MembershipResponse, Status> {
        // A dead leaver cannot take the change (nor hand anything over):
        // its surviving replicas' keys move by rebalancing.
        let mut dead = BTreeSet::new();
        {
            let v = self.view.read();
            if v.liveness(&id) == Some(Liveness::Down) {
                dead.insert(id.clone());
            }
            if v.member(&id).is_some() {
                let left = v.len() - 1;
                if let Some((ns, _, rep)) = self.registry.all().into_iter().find(|(_, _, r)| r.replicas > left) {
                    return Err(status_of(
                        ErrorKind::Config,
                        format!(
                            "namespace {ns} keeps {} replicas: {left} members would be too few",
                            rep.replicas
                        ),
                    ));
                }
            }
        }
        if self.gossiping() {
            return self.leave_by_gossip(id, !dead.is_empty()).await;
        }
        self.change_members(|v| v.propose_leave(&id)).await?;
        let (not_reached, down) = if forwarded {
            (Vec::new(), Vec::new())
        } else {
            let req = proto::LeaveRequest {
                id: id.0.clone(),
                forwarded: true,
            };
            self.forward(vec![id], dead, move |c| {
                let req = req.clone();
                async move { c.leave(req).await }
            })
            .await
        };
        Ok(self.membership_reply(not_reached, down))
    }

    pub(super) fn membership_reply(&self, not_reached: Vec<String>, down: Vec<String>) -> proto::MembershipResponse {
        let v = self.view.read();
        proto::MembershipResponse {
            epoch: v.epoch(),
            members: v.len() as u32,
            not_reached,
            down,
        }
    }

    /// Sends a change to every member and `extra`, this node left out;
    /// answers those that did not take it: (up here or unknown, down here
    /// or in `dead`).
    async fn forward<F, Fut>(&self, extra: Vec<NodeId>, dead: BTreeSet<NodeId>, send: F) -> (Vec<String>, Vec<String>)
    where
        F: Fn(kvtier_client::Client) -> Fut,
        Fut: Future<Output = kvtier::Result<proto::MembershipResponse>> + Send + 'static,
    {
        let mut to: BTreeSet<NodeId> = self
            .view
            .read()
            .table()
            .members()
            .iter()
            .map(|m| m.id.clone())
            .collect();
        to.extend(extra);
        to.remove(&self.me);
        let mut set = JoinSet::new();
        for id in to {
            let Some(c) = self.peers.get(&id) else { continue };
            let f = send(c.clone());
            let t = self.peer_timeout;
            set.spawn(async move { (id, tokio::time::timeout(t, f).await) });
        }
        let (mut failed, mut down) = (Vec::new(), Vec::new());
        while let Some(Ok((id, r))) = set.join_next().await {
            if matches!(r, Ok(Ok(_))) {
                continue;
            }
            if dead.contains(&id) || self.view.read().liveness(&id) == Some(Liveness::Down) {
                tracing::info!(member = %id, "membership change not forwarded to a member that is down: it catches up once back");
                down.push(id.0);
            } else {
                tracing::warn!(member = %id, ?r, "membership change not forwarded");
                failed.push(id.0);
            }
        }
        (failed, down)
    }

    /// Starts a rebalancing pass when one is due and none runs.
    pub(super) fn start_rebalance(self: &Arc<Self>) {
        if self.rebalance.pending.lock().is_none() || self.rebalance.running.swap(true, Relaxed) {
            return;
        }
        let Some(before) = self.rebalance.pending.lock().take() else {
            self.rebalance.running.store(false, Relaxed);
            return;
        };
        let this = self.clone();
        self.spawn(async move {
            match this.rebalance_pass(&before).await {
                Ok(()) => {
                    this.rebalance.done.fetch_add(1, Relaxed);
                    *this.rebalance.failing_since.lock() = None;
                    this.rebalance.placement_settled();
                }
                Err(e) => {
                    let since = *this.rebalance.failing_since.lock().get_or_insert_with(Instant::now);
                    // Failing past the push bound is worth an operator's
                    // look: said once per WARN_EVERY, with the reasons.
                    let mut warned = this.rebalance.warned.lock();
                    if since.elapsed() >= this.rebalance.push_waiting_after
                        && warned.is_none_or(|t| t.elapsed() >= WARN_EVERY)
                    {
                        *warned = Some(Instant::now());
                        tracing::warn!(failing_s = since.elapsed().as_secs(), "rebalancing keeps failing: {e}");
                    } else {
                        tracing::info!("rebalancing stopped, retried next heartbeat: {e}");
                    }
                    drop(warned);
                    // An older layout than a change seen meanwhile wins:
                    // keys still sit where it put them.
                    *this.rebalance.pending.lock() = Some(before);
                }
            }
            this.rebalance.running.store(false, Relaxed);
        });
    }

    /// One pass over every namespace: push gained copies, drop confirmed
    /// ones.
    async fn rebalance_pass(self: &Arc<Self>, before: &Layout) -> Result<(), String> {
        let mut pacer = Pacer::new(self.rebalance.bytes_per_s);
        let mut unconfirmed = 0;
        // Why copies stay: which new replica lacks them, or did not answer.
        let mut why = Vec::new();
        let retry = self
            .rebalance
            .failing_since
            .lock()
            .is_some_and(|t| t.elapsed() >= self.rebalance.push_waiting_after);
        for (ns, _, rep) in self.registry.all() {
            let m = self.manager.clone();
            let keys = tokio::task::spawn_blocking(move || m.local_keys(ns))
                .await
                .map_err(|e| format!("key listing task: {e}"))?;
            let mut plan = plan_rebalance(keys, before, &self.view.read(), rep.replicas);
            if plan.is_empty() {
                continue;
            }
            if retry {
                // The copies still waiting for their new replicas: the old
                // replica that should push them may have taken them after
                // its own pass (a write from a coordinator that had not
                // seen the change yet), so this node pushes them itself.
                // The push asks first: a copy already there is not sent.
                for t in &mut plan {
                    if t.push_to.is_empty() && !t.drop_after_confirm.is_empty() {
                        t.push_to = t
                            .drop_after_confirm
                            .iter()
                            .filter(|n| **n != self.me)
                            .cloned()
                            .collect();
                    }
                }
            }
            let gone = self.deletes_missed(ns, &plan, rep.replicas).await?;
            if !gone.is_empty() {
                plan.retain(|t| !gone.contains(&t.key));
            }
            for (node, keys) in pushes_by_node(&plan) {
                self.push_missing(&node, ns, &keys, &mut pacer).await?;
            }
            unconfirmed += self
                .drop_confirmed(ns, DropTally::new(&self.me, &plan), &mut why)
                .await?;
        }
        if unconfirmed > 0 {
            why.truncate(8);
            return Err(format!(
                "{unconfirmed} keys not yet confirmed by their new replicas: {}",
                why.join("; ")
            ));
        }
        Ok(())
    }

    /// Notes the keys of `ns` a peer just stored here that this node is no
    /// replica of by its own member list. A sender with an older list (a
    /// resync or a push from a member that had not yet seen a join, or a
    /// write from a coordinator that had not) can put them here after this
    /// node's rebalancing passes ended, and no later pass would move them:
    /// the next stray pass hands each to its replicas and drops it here
    /// once they all confirm it (see `stray_pass`).
    pub fn note_strays(&self, ns: NamespaceId, keys: &[BlockKey]) {
        self.note(ns, keys, true);
    }

    /// [`Cluster::note_strays`]; `fresh` counts them (not a re-note).
    fn note(&self, ns: NamespaceId, keys: &[BlockKey], fresh: bool) {
        let r = self.registry.replication(ns).replicas;
        let stray: Vec<BlockKey> = {
            let v = self.view.read();
            keys.iter()
                .filter(|k| !v.table().rank_prefix(k).take(r).any(|m| m.id == self.me))
                .copied()
                .collect()
        };
        if stray.is_empty() {
            return;
        }
        let mut all = self.rebalance.strays.lock();
        let held: usize = all.values().map(BTreeSet::len).sum();
        if held + stray.len() > MAX_STRAYS {
            tracing::warn!(%ns, keys = stray.len(), "too many stray copies noted: these stay until evicted");
            return;
        }
        let set = all.entry(ns).or_default();
        let before = set.len();
        set.extend(stray);
        let added = set.len() - before;
        if fresh {
            tracing::debug!(%ns, added, "stray copies noted");
            self.counters.stray_copies_noted.fetch_add(added as u64, Relaxed);
        }
    }

    /// Starts a stray pass when copies wait for one and no rebalancing is
    /// due or running (a pass moves those copies itself).
    pub(super) fn start_strays(self: &Arc<Self>) {
        let r = &self.rebalance;
        if r.strays.lock().is_empty() || r.pending.lock().is_some() || r.running.load(Relaxed) {
            return;
        }
        if r.straying.swap(true, Relaxed) {
            return;
        }
        let this = self.clone();
        self.spawn(async move {
            if let Err(e) = this.stray_pass().await {
                tracing::info!("stray copies kept, retried next heartbeat: {e}");
            }
            this.rebalance.straying.store(false, Relaxed);
        });
    }

    /// Hands the noted stray copies to their replicas and drops those every
    /// replica confirms; the others are noted again for the next pass.
    /// Copies kept for a hint stay (their delivery settles them).
    async fn stray_pass(self: &Arc<Self>) -> Result<(), String> {
        let strays = std::mem::take(&mut *self.rebalance.strays.lock());
        let mut pacer = Pacer::new(self.rebalance.bytes_per_s);
        let mut result = Ok(());
        for (ns, keys) in strays {
            let r = self.registry.replication(ns).replicas;
            let mut plan: Vec<Transfer> = {
                let v = self.view.read();
                keys.iter()
                    .filter(|k| !self.hints.hinted(ns, **k))
                    .filter_map(|k| {
                        let new: Vec<NodeId> = v.table().rank_prefix(k).take(r).map(|m| m.id.clone()).collect();
                        (!new.contains(&self.me)).then(|| Transfer {
                            key: *k,
                            push_to: new.clone(),
                            drop_after_confirm: new,
                        })
                    })
                    .collect()
            };
            let step = async {
                let gone = self.deletes_missed(ns, &plan, r).await?;
                plan.retain(|t| !gone.contains(&t.key));
                for (node, keys) in pushes_by_node(&plan) {
                    self.push_missing(&node, ns, &keys, &mut pacer).await?;
                }
                let mut why = Vec::new();
                self.drop_confirmed(ns, DropTally::new(&self.me, &plan), &mut why).await
            };
            let res = step.await;
            if let Err(e) = &res {
                tracing::debug!(%ns, "stray pass: {e}");
            }
            // What is still held here and still no replica's: next time.
            let left: Vec<BlockKey> = plan.iter().map(|t| t.key).collect();
            let held: Vec<BlockKey> = match self.has_local(ns, &left) {
                Ok(has) => left.into_iter().zip(has).filter(|(_, h)| *h).map(|(k, _)| k).collect(),
                // The namespace went: so did its copies.
                Err(_) => Vec::new(),
            };
            let dropped = plan.len() - held.len();
            self.counters.stray_copies_dropped.fetch_add(dropped as u64, Relaxed);
            if !held.is_empty() {
                self.note(ns, &held, false);
            }
            if let Err(e) = res {
                result = Err(e);
            }
        }
        result
    }

    /// Before this node pushes keys, asks every new replica of each one
    /// (not only those it pushes to) whether it keeps a tombstone for it:
    /// a delete this node missed. Such copies written before the delete go
    /// here, and are not pushed: a member that joined after the delete, and
    /// so knows nothing of it, would otherwise take the deleted key back.
    /// Answers the keys whose copy went.
    async fn deletes_missed(&self, ns: NamespaceId, plan: &[Transfer], r: usize) -> Result<BTreeSet<BlockKey>, String> {
        let mut asks: BTreeMap<NodeId, Vec<BlockKey>> = BTreeMap::new();
        {
            let v = self.view.read();
            for t in plan.iter().filter(|t| !t.push_to.is_empty()) {
                for m in v.table().rank_prefix(&t.key).take(r) {
                    if m.id != self.me {
                        asks.entry(m.id.clone()).or_default().push(t.key);
                    }
                }
            }
        }
        let mut gone = BTreeSet::new();
        for (node, keys) in asks {
            let Some(c) = self.peers.get(&node) else { continue };
            for chunk in keys.chunks(ASK_KEYS) {
                let chunk: Vec<BlockKey> = chunk.iter().filter(|k| !gone.contains(*k)).copied().collect();
                // A replica that does not answer is asked by the push
                // itself, or on the next pass.
                let Ok((has, deleted)) = call(self.peer_timeout, c.replica_has_or_deleted(ns, &chunk)).await else {
                    continue;
                };
                if deleted.iter().all(|d| *d == 0) {
                    continue;
                }
                let (_, removed) = self.sort_out_deleted(ns, &chunk, &has, &deleted).await?;
                gone.extend(removed);
            }
        }
        Ok(gone)
    }

    /// Sends `node` the `keys` of `ns` it lacks.
    async fn push_missing(
        self: &Arc<Self>,
        node: &NodeId,
        ns: NamespaceId,
        keys: &[BlockKey],
        pacer: &mut Pacer,
    ) -> Result<(), String> {
        let c = self.peers.get(node).ok_or_else(|| format!("{node} is not a peer"))?;
        if let Some(spec) = self.spec(ns) {
            call(self.peer_timeout, c.replica_register(spec)).await?;
        }
        for ask in keys.chunks(ASK_KEYS) {
            let (has, deleted) = call(self.peer_timeout, c.replica_has_or_deleted(ns, ask)).await?;
            let (missing, _) = self.sort_out_deleted(ns, ask, &has, &deleted).await?;
            let (n, bytes) = self.push_copies(c, ns, missing, pacer).await?;
            self.rebalance.keys_moved.fetch_add(n as u64, Relaxed);
            self.rebalance.bytes_moved.fetch_add(bytes, Relaxed);
        }
        Ok(())
    }

    /// Asks the new replicas of the keys `tally` waits on whether they hold
    /// them, drops those every one confirmed; answers how many stay
    /// unconfirmed.
    async fn drop_confirmed(
        &self,
        ns: NamespaceId,
        mut tally: DropTally,
        why: &mut Vec<String>,
    ) -> Result<usize, String> {
        if tally.is_empty() {
            return Ok(0);
        }
        for (node, keys) in tally.asks() {
            // A member without a client confirms nothing: its keys stay
            // here until a later pass.
            let Some(c) = self.peers.get(&node) else {
                why.push(format!("{node} has no client here ({} keys)", keys.len()));
                continue;
            };
            let mut lacking = Vec::new();
            for chunk in keys.chunks(ASK_KEYS) {
                let (has, deleted) = match call(self.peer_timeout, c.replica_has_or_deleted(ns, chunk)).await {
                    Ok(r) => r,
                    Err(e) => {
                        why.push(format!("{node} not asked about {} keys: {e}", chunk.len()));
                        continue;
                    }
                };
                // A copy deleted while this node was away goes here, and
                // needs no confirmation.
                let (_, gone) = self.sort_out_deleted(ns, chunk, &has, &deleted).await?;
                for (k, h) in chunk.iter().zip(has) {
                    if h || gone.contains(k) {
                        tally.confirm(&node, *k);
                    } else {
                        lacking.push(*k);
                    }
                }
            }
            if let Some(k) = lacking.first() {
                why.push(format!("{node} lacks {} of {ns} (e.g. {k})", lacking.len()));
            }
        }
        let Drops {
            drop: gone,
            unconfirmed,
        } = tally.finish();
        if !gone.is_empty() {
            let m = self.manager.clone();
            let n = gone.len() as u64;
            tokio::task::spawn_blocking(move || m.remove(ns, &gone))
                .await
                .map_err(|e| format!("remove task: {e}"))?
                .map_err(|e| format!("remove: {e}"))?;
            self.rebalance.keys_dropped.fetch_add(n, Relaxed);
        }
        Ok(unconfirmed)
    }

    /// The rebalancing fields of Stats.
    pub(super) fn rebalance_stats(&self, s: &mut proto::ClusterStats) {
        let r = &self.rebalance;
        s.rebalance_state = r.state().into();
        s.rebalances_done = r.done.load(Relaxed);
        s.rebalance_keys_moved = r.keys_moved.load(Relaxed);
        s.rebalance_bytes_moved = r.bytes_moved.load(Relaxed);
        s.rebalance_keys_dropped = r.keys_dropped.load(Relaxed);
    }
}
