//! Hint delivery: copies kept for a replica that missed a write are handed
//! back once it answers, and settled as the core decides.

use super::*;

impl Cluster {
    /// Hands hinted blocks back to their replicas that are up; drops the
    /// copies here that this node does not hold as a replica itself.
    pub(super) async fn deliver_hints(self: &Arc<Self>) {
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
                // Each batch settles at least its first key, so this ends.
                let mut rest = keys;
                while !rest.is_empty() {
                    let batch: Vec<BlockKey> = rest.drain(..rest.len().min(per)).collect();
                    match self.deliver(c, &node, ns, batch, block).await {
                        Ok(mut left) => {
                            left.append(&mut rest);
                            rest = left;
                        }
                        Err(e) => {
                            tracing::info!(member = %node, "hint delivery stopped, retried next heartbeat: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Delivers one batch of hints to `node` and returns the keys it left
    /// for the next batch (those after a short checkpoint chunk, which
    /// travels on its own). It settles at least the batch's first key.
    pub(super) async fn deliver(
        self: &Arc<Self>,
        c: &Client,
        node: &NodeId,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        block: usize,
    ) -> Result<Vec<BlockKey>, String> {
        let m = self.manager.clone();
        let (present, missing, data, left) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; keys.len() * block];
            let (mut present, mut missing, mut at) = (Vec::new(), Vec::new(), 0);
            while at < keys.len() {
                let filled = present.len() * block;
                let rest = &keys[at..];
                // Pin first: a checkpoint chunk shorter than the block is
                // read on its own, never into a whole-block slot (which
                // would count as a failed load).
                let (loaded, short_next) = match m.lease(ns, rest) {
                    Ok(mut lease) => {
                        let whole = lease.whole_blocks(block);
                        let pinned = lease.len();
                        lease.truncate(whole);
                        let out = &mut buf[filled..filled + whole * block];
                        let loaded = m.load_leased(&lease, out).map_or(0, |o| o.loaded);
                        (loaded, loaded == whole && whole < pinned)
                    }
                    Err(_) => (0, false),
                };
                present.extend_from_slice(&rest[..loaded]);
                at += loaded;
                if short_next {
                    if !present.is_empty() {
                        // It goes on its own in the next batch.
                        let left = keys[at..].to_vec();
                        buf.truncate(present.len() * block);
                        return (present, missing, Bytes::from(buf), left);
                    }
                    if let Ok(Some(c)) = m.load_one(ns, keys[at])
                        && c.len() < block
                    {
                        // A variable-length chunk: delivered on its own.
                        return (vec![keys[at]], Vec::new(), Bytes::from(c), keys[at + 1..].to_vec());
                    }
                }
                if at < keys.len() {
                    missing.push(keys[at]);
                    at += 1;
                }
            }
            buf.truncate(present.len() * block);
            (present, missing, Bytes::from(buf), Vec::new())
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
        Ok(left)
    }
}
