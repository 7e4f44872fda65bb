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
    pub(super) async fn deliver(
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
}
