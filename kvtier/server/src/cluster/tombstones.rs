//! Tombstones: deletes a member missed, applied when it is back.
//!
//! A delete reaches every member that answers. For each member it cannot
//! reach (down, or its call failed) the coordinator keeps a *tombstone* in
//! the hint log: the member, the namespace, the key, and the delete's time
//! by the coordinator's clock. Every member the delete reached keeps one
//! too for each member the coordinator already knew was down (the request
//! names them), so more than one node can deliver it, and answer for it.
//!
//! - **Delivered late, to old copies only.** Once the member is up, each
//!   node holding tombstones for it sends them as a late delete
//!   (`ReplicaLateDelete`, which a node of an older build answers
//!   UNIMPLEMENTED: its tombstones then wait for its upgrade): the member removes a copy
//!   only if its tiers last wrote it before the delete, less
//!   `cluster.clock_margin_ms`. A copy put after the delete (through the
//!   member's side of a partition, or a put that lands just before the
//!   delivery, or one that found the old copy held and so renewed it) stays:
//!   a late delete never takes an acknowledged write.
//! - **Never pushed back.** A member back from down, or moving keys after a
//!   change of the member list, asks the key's replicas which copies they
//!   lack before it sends any (resync and rebalancing). A replica that keeps
//!   a tombstone for a key answers the delete's time with its "lacks it";
//!   the asker then applies that delete to its own copy instead of sending
//!   it, so a deleted key does not come back through the member that missed
//!   the delete.
//! - **Bounded.** A tombstone goes once delivered, once its member has left
//!   the cluster, after `cluster.tombstone_ttl_s`, or when more than
//!   `cluster.max_tombstones` are kept (oldest first). A member back after
//!   that keeps its old copies until its tiers evict them.
//!
//! Clocks: the margin is how far apart the members' clocks may be. A copy
//! written within the margin before the delete stays (harmless for KV: a
//! key names its content); a clock behind by more than the margin could
//! take a copy put after the delete from that one member.

use super::*;
use kvtier::tier::now_ms;

/// How often tombstones past their age are looked for.
const EXPIRE_EVERY_MS: u64 = 60_000;

/// Members one `ReplicaDelete` may name as having missed it.
const MAX_MISSED: usize = 4096;

impl Cluster {
    /// Keeps, durably, a tombstone for each of `missed` (this node left
    /// out): the delete of `keys` of `ns` at `at_ms`.
    pub(super) fn keep_tombstones(
        &self,
        missed: &[NodeId],
        ns: NamespaceId,
        keys: &[BlockKey],
        at_ms: u64,
    ) -> std::io::Result<()> {
        let missed: Vec<NodeId> = missed.iter().filter(|n| **n != self.me).cloned().collect();
        if missed.is_empty() || keys.is_empty() {
            return Ok(());
        }
        self.hints.add_tombstones(&missed, ns, keys, at_ms)
    }

    /// Per key of `ns`, the time of its delete some member missed and this
    /// node keeps a tombstone for (Unix ms; 0 for none).
    pub fn deleted_at(&self, ns: NamespaceId, keys: &[BlockKey]) -> Vec<u64> {
        if self.hints.tombstones() == 0 {
            return vec![0; keys.len()];
        }
        self.hints.deleted_at(ns, keys)
    }

    /// The `ReplicaDelete` a peer sent: removes `keys` of `ns` here (only
    /// copies written before `written_before_ms`, when it is not 0) and
    /// keeps tombstones for the `missed` members. Answers how many keys
    /// lost a copy.
    pub async fn replica_delete(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        missed: Vec<String>,
        deleted_ms: u64,
        written_before_ms: u64,
    ) -> Result<usize, Status> {
        if missed.len() > MAX_MISSED {
            return Err(status_of(
                ErrorKind::InvalidArgument,
                format!("{} missed members; at most {MAX_MISSED}", missed.len()),
            ));
        }
        if let Some(bad) = missed.iter().find(|m| m.is_empty() || m.len() > 255) {
            return Err(status_of(
                ErrorKind::InvalidArgument,
                format!("missed member id {bad:?}: 1 to 255 bytes"),
            ));
        }
        if !missed.is_empty() && deleted_ms == 0 {
            return Err(status_of(
                ErrorKind::InvalidArgument,
                "missed members without the delete's time (deleted_ms)",
            ));
        }
        let m = self.manager.clone();
        let local = keys.clone();
        let n = tokio::task::spawn_blocking(move || {
            if written_before_ms > 0 {
                m.remove_written_before(ns, &local, written_before_ms)
            } else {
                m.remove(ns, &local)
            }
        })
        .await
        .map_err(|e| status_of(ErrorKind::Internal, format!("delete task: {e}")))?
        .map_err(|e| status(&e))?;
        if written_before_ms > 0 {
            self.counters.late_delete_copies_removed.fetch_add(n as u64, Relaxed);
        }
        let missed: Vec<NodeId> = missed.into_iter().map(NodeId).collect();
        self.keep_tombstones(&missed, ns, &keys, deleted_ms).map_err(|e| {
            status_of(
                ErrorKind::Io,
                format!("deleted here, but the tombstones for the members that missed it were not kept: {e}"),
            )
        })?;
        Ok(n)
    }

    /// Applies deletes this node missed, which a peer answered for keys it
    /// lacks (`deleted`, per key of `asked`, 0 for none): each local copy
    /// written before its delete (less the clock margin) is removed. Of the
    /// keys the peer lacks (`has` false), answers those still held here
    /// (to send) and those whose copy went.
    pub(super) async fn sort_out_deleted(
        &self,
        ns: NamespaceId,
        asked: &[BlockKey],
        has: &[bool],
        deleted: &[u64],
    ) -> Result<(Vec<BlockKey>, Vec<BlockKey>), String> {
        let mut send = Vec::new();
        let mut late: BTreeMap<u64, Vec<BlockKey>> = BTreeMap::new();
        for ((k, h), d) in asked.iter().zip(has).zip(deleted) {
            match (*h, *d) {
                (true, _) => {}
                (false, 0) => send.push(*k),
                (false, at) => late.entry(at).or_default().push(*k),
            }
        }
        if late.is_empty() {
            return Ok((send, Vec::new()));
        }
        let margin = self.clock_margin_ms;
        let m = self.manager.clone();
        let (kept, gone) = tokio::task::spawn_blocking(move || {
            let (mut kept, mut gone) = (Vec::new(), Vec::new());
            for (at, keys) in late {
                let before = at.saturating_sub(margin);
                for k in keys {
                    match m.remove_written_before(ns, &[k], before) {
                        Ok(1) => gone.push(k),
                        Ok(_) => kept.push(k),
                        Err(e) => return Err(format!("late delete: {e}")),
                    }
                }
            }
            Ok((kept, gone))
        })
        .await
        .map_err(|e| format!("late delete task: {e}"))??;
        if !gone.is_empty() {
            tracing::info!(%ns, removed = gone.len(), "copies deleted while this node was away removed, not sent");
            self.counters
                .late_delete_copies_removed
                .fetch_add(gone.len() as u64, Relaxed);
        }
        // A copy written since the delete is sent like any other.
        send.extend(kept);
        Ok((send, gone))
    }

    /// Drops tombstones past their age or count, and those of members
    /// that left; delivers the others to their members that are up.
    pub(super) async fn deliver_tombstones(self: &Arc<Self>) {
        // Expiry walks every tombstone: once a minute, or when over the cap.
        let now = now_ms();
        let last = self.tombstones_expired_at.load(Relaxed);
        if now.saturating_sub(last) >= EXPIRE_EVERY_MS || self.hints.tombstones() > self.max_tombstones {
            self.tombstones_expired_at.store(now, Relaxed);
            self.expire_tombstones(now);
        }
        for node in self.hints.tombstone_nodes() {
            let liveness = self.view.read().liveness(&node);
            match hint_action(liveness) {
                HintAction::Deliver => {}
                HintAction::GiveUp => {
                    let mut n = 0;
                    for ((ns, _), keys) in self.hints.tombstones_for(&node) {
                        if self.hints.tombstones_done(&node, ns, &keys).is_ok() {
                            n += keys.len();
                        }
                    }
                    self.counters.tombstones_expired.fetch_add(n as u64, Relaxed);
                    tracing::info!(member = %node, "tombstones for a member that left dropped");
                    continue;
                }
                _ => continue,
            }
            if let Err(e) = self.deliver_tombstones_to(&node).await {
                tracing::info!(member = %node, "tombstone delivery stopped, retried next heartbeat: {e}");
            }
        }
    }

    /// Drops the tombstones older than `tombstone_ttl_s` at `now` (Unix
    /// ms), then the oldest past `max_tombstones`.
    fn expire_tombstones(&self, now: u64) {
        let before = now.saturating_sub(self.tombstone_ttl.as_millis() as u64);
        match self.hints.expire_tombstones(before, self.max_tombstones) {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    expired = n,
                    "tombstones dropped undelivered (older than cluster.tombstone_ttl_s, or over cluster.max_tombstones): their members keep those copies until evicted"
                );
                self.counters.tombstones_expired.fetch_add(n as u64, Relaxed);
            }
            Err(e) => tracing::warn!("tombstones not expired: {e}"),
        }
    }

    /// Delivers the tombstones pending for `node` (which is up). Resync
    /// calls this first, so a copy it asks about is already past every
    /// delete this node knows it missed.
    pub(super) async fn deliver_tombstones_to(&self, node: &NodeId) -> Result<(), String> {
        let c = self.peers.get(node).ok_or("no client")?;
        let _turn = self.tombstone_delivery.lock().await;
        for ((ns, at), keys) in self.hints.tombstones_for(node) {
            let before = at.saturating_sub(self.clock_margin_ms);
            for batch in keys.chunks(crate::node::MAX_KEYS) {
                // Fails when it is down again, or has not had the namespace
                // registered yet (it does at its next answered heartbeat).
                resync::call(self.peer_timeout, c.replica_late_delete(ns, batch, before)).await?;
                if self.hints.tombstones_done(node, ns, batch).is_ok() {
                    self.counters
                        .tombstones_delivered
                        .fetch_add(batch.len() as u64, Relaxed);
                }
            }
        }
        Ok(())
    }
}
