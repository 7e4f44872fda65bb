//! Reads and deletes across members: the peers to ask, in the core's read
//! order, for blocks, lookups and checkpoint chunks (the reads themselves
//! are in `repair`, which tells a corrupt copy from a missing one).

use super::*;

impl Cluster {
    /// The peers a read of `key` of `ns` asks, in order: the key's writable
    /// replicas (stand-ins included), this node left out, those known to
    /// lack it (out of sync) last; while keys move, the old replicas and
    /// the rest of the key's slot order after them (see `rebalance`).
    pub(super) fn read_peers(&self, ns: NamespaceId, key: &BlockKey, rep: Replication) -> Vec<NodeId> {
        let moving = self.rebalance.movement();
        let v = self.view.read();
        read_order_moving(key, &v, rep, moving.as_ref(), |n| self.hints.contains(n, ns, *key))
            .into_iter()
            .filter(|n| *n != self.me)
            .collect()
    }

    /// The client of `peer` for a read; a member without one (a departed
    /// member this process never knew) counts as a failed read.
    pub(super) fn read_client(&self, peer: &NodeId) -> Option<&'static Client> {
        let c = self.peers.get(peer);
        if c.is_none() {
            tracing::debug!(member = %peer, "no client for a member a read asks");
            self.counters.peer_read_failures.fetch_add(1, Relaxed);
        }
        c
    }

    /// How many leading `keys` of `ns` peers hold.
    pub async fn lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        let rep = self.registry.replication(ns);
        let mut at = 0;
        let mut asked_again = false;
        'keys: while at < keys.len() {
            for peer in self.read_peers(ns, &keys[at], rep) {
                let Some(c) = self.read_client(&peer) else { continue };
                match tokio::time::timeout(self.peer_timeout, c.replica_lookup(ns, &keys[at..])).await {
                    Ok(Ok(l)) if l.hit_blocks > 0 => {
                        at += (l.hit_blocks as usize).min(keys.len() - at);
                        asked_again = false;
                        continue 'keys;
                    }
                    Ok(Ok(_)) => {}
                    r => {
                        tracing::debug!(member = %peer, ?r, "peer lookup failed");
                        self.counters.peer_read_failures.fetch_add(1, Relaxed);
                    }
                }
            }
            if !asked_again && self.moving() {
                // As a read does (see `fetch`): the key may have left its
                // old holder between the asks.
                asked_again = true;
                continue;
            }
            break;
        }
        at
    }

    /// Removes `keys` of `ns` here and on every writable member; answers
    /// how many this node held. Each member the delete cannot reach (down,
    /// or its call failed) gets a tombstone, kept here and on every member
    /// reached, and delivered once it is up (see [`super::tombstones`]);
    /// the delete fails only when a tombstone could not be kept.
    pub async fn delete_everywhere(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<usize, Status> {
        let at = kvtier::tier::now_ms();
        let m = self.manager.clone();
        let local_keys = keys.to_vec();
        let n = tokio::task::spawn_blocking(move || m.remove(ns, &local_keys))
            .await
            .map_err(|e| status_of(ErrorKind::Internal, format!("delete task: {e}")))?
            .map_err(|e| status(&e))?;
        let (targets, mut missed): (Vec<NodeId>, Vec<NodeId>) = {
            let v = self.view.read();
            v.members()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| *id != self.me)
                .partition(|id| v.is_writable(id))
        };
        let told: Vec<String> = missed.iter().map(|n| n.0.clone()).collect();
        let mut set = JoinSet::new();
        for node in targets {
            let Some(c) = self.peers.get(&node) else {
                tracing::debug!(member = %node, "no client yet: the delete waits in a tombstone");
                missed.push(node);
                continue;
            };
            let c = c.clone();
            let keys = keys.to_vec();
            let told = told.clone();
            let t = self.timeout_for(0);
            set.spawn(async move {
                (
                    node,
                    tokio::time::timeout(t, c.replica_delete(ns, &keys, &told, at)).await,
                )
            });
        }
        while let Some(j) = set.join_next().await {
            match j {
                Ok((_, Ok(Ok(_)))) => {}
                Ok((node, r)) => {
                    tracing::info!(member = %node, ?r, "delete not applied: it waits in a tombstone");
                    missed.push(node);
                }
                Err(e) => return Err(status_of(ErrorKind::Internal, format!("delete task: {e}"))),
            }
        }
        self.keep_tombstones(&missed, ns, keys, at).map_err(|e| {
            status_of(
                ErrorKind::Unavailable,
                format!(
                    "deleted on the members that answered, but the tombstones for {} were not kept: {e}",
                    missed.iter().map(|n| n.0.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        Ok(n)
    }
}
