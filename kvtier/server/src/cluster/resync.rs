//! Resync: a replica that was down gets back what it missed.
//!
//! Hints cover writes made while a replica was down *and* a stand-in was
//! free to hold them, and copies that failed on a replica that was up or
//! suspect (the write's coordinator keeps them, see [`super`]). They do not
//! cover a write that found no stand-in (R = members) or a stand-in that
//! died too. So when heartbeats see a member go from down to up, every
//! node walks its own keys of every namespace, keeps those the core's
//! [`plan_resync`] gives it (exactly one offering node per key), asks the
//! returned node which it lacks (the `ReplicaHas` call),
//! and sends those with `ReplicaPut`, at most `rebalance_bytes_per_s`.
//!
//! A resync that fails part way (the node went down again, a call timed
//! out) is queued again and restarts at the next heartbeat; asking first
//! makes a restart cheap.
//!
//! # Not on suspect → up
//!
//! A suspect member is still written to, so no write skips it: a copy it
//! missed is one whose write to it failed, and the coordinator marked that
//! copy out of sync with a hint (delivered when the member is up again).
//! Walking every key of every node on each suspect → up flap, which a
//! busy or slow node does often, would cost far more and find nothing
//! more. The one copy without a hint is one whose hint could not be kept
//! (the coordinator's own store failed): then the coordinator queues the
//! member for a resync here, run once it is up.

use bytes::{Bytes, BytesMut};
use kvtier::replication::membership::Liveness;
use kvtier::replication::placement::NodeId;
use kvtier::replication::rebalance::plan_resync;
use kvtier::tier::Tier;
use kvtier::{BlockKey, NamespaceId};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tonic::Status;

use super::Cluster;
use crate::status;
use kvtier_client::Client;

/// Keys one `ReplicaHas` asks about.
pub(super) const ASK_KEYS: usize = 1024;
/// Blocks one resync `ReplicaPut` carries at most.
const SEND_BLOCKS: usize = 256;

/// The resync queue and its one worker's flag.
#[derive(Debug)]
pub(super) struct Resync {
    /// Members back from down, not yet resynced.
    queue: Mutex<BTreeSet<NodeId>>,
    running: AtomicBool,
    /// The rate limit, 0 for none.
    bytes_per_s: u64,
}

impl Resync {
    pub(super) fn new(bytes_per_s: u64) -> Self {
        Self {
            queue: Mutex::new(BTreeSet::new()),
            running: AtomicBool::new(false),
            bytes_per_s,
        }
    }

    /// Whether a resync runs now.
    pub(super) fn running(&self) -> bool {
        self.running.load(Relaxed)
    }

    /// `id` came back from down: it is resynced from the next heartbeat.
    pub(super) fn returned(&self, id: NodeId) {
        self.queue.lock().insert(id);
    }
}

/// Paces sends to a byte rate: a send waits until the bytes sent so far,
/// its own included, took at least `bytes / bytes_per_s` seconds.
#[derive(Debug)]
pub(super) struct Pacer {
    bytes_per_s: u64,
    start: Instant,
    sent_bytes: u64,
}

impl Pacer {
    pub(super) fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s,
            start: Instant::now(),
            sent_bytes: 0,
        }
    }

    /// The wait before sending `bytes` more, `elapsed` after the start.
    fn delay(&mut self, bytes: u64, elapsed: Duration) -> Duration {
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        self.sent_bytes = self.sent_bytes.saturating_add(bytes);
        let due = Duration::from_secs_f64(self.sent_bytes as f64 / self.bytes_per_s as f64);
        due.saturating_sub(elapsed)
    }

    /// Waits until `bytes` more may go.
    pub(super) async fn admit(&mut self, bytes: u64) {
        let d = self.delay(bytes, self.start.elapsed());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

impl Cluster {
    /// Which of `keys` of `ns` this node's own tiers (host, disk) hold.
    pub fn has_local(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Vec<bool>, Status> {
        self.manager.block_bytes(ns).map_err(|e| status(&e))?;
        let host = self.manager.host();
        let disk = self.manager.disk();
        Ok(keys
            .iter()
            .map(|k| host.is_some_and(|h| h.contains(k)) || disk.is_some_and(|d| d.contains(k)))
            .collect())
    }

    /// Starts the resync worker when members wait for it and none runs.
    pub(super) fn start_resync(self: &Arc<Self>) {
        if self.resync.queue.lock().is_empty() || self.resync.running.swap(true, Relaxed) {
            return;
        }
        let this = self.clone();
        self.spawn(async move {
            loop {
                let next = this.resync.queue.lock().pop_first();
                let Some(node) = next else { break };
                if let Err(e) = this.resync_node(&node).await {
                    tracing::info!(member = %node, "resync stopped, retried next heartbeat: {e}");
                    this.resync.queue.lock().insert(node);
                    break;
                }
            }
            this.resync.running.store(false, Relaxed);
        });
    }

    /// Offers `node` every key this node should give it back, namespace by
    /// namespace, and sends those it lacks.
    async fn resync_node(self: &Arc<Self>, node: &NodeId) -> Result<(), String> {
        let c = self.peers.get(node).ok_or("not a peer")?.clone();
        self.deliver_tombstones_to(node).await?;
        let mut pacer = Pacer::new(self.resync.bytes_per_s);
        let (mut offered, mut sent) = (0, 0);
        for (ns, _, rep) in self.registry.all() {
            if self.view.read().liveness(node) != Some(Liveness::Up) {
                return Err("the member is not up".into());
            }
            let m = self.manager.clone();
            let keys = tokio::task::spawn_blocking(move || m.local_keys(ns))
                .await
                .map_err(|e| format!("key listing task: {e}"))?;
            let offer = plan_resync(keys, node, &self.view.read(), rep.replicas);
            if offer.is_empty() {
                continue;
            }
            self.counters.resync_keys_offered.fetch_add(offer.len() as u64, Relaxed);
            offered += offer.len();
            if let Some(spec) = self.spec(ns) {
                call(self.peer_timeout, c.replica_register(spec)).await?;
            }
            for ask in offer.chunks(ASK_KEYS) {
                let (has, deleted) = call(self.peer_timeout, c.replica_has_or_deleted(ns, ask)).await?;
                let (missing, _) = self.sort_out_deleted(ns, ask, &has, &deleted).await?;
                let (n, _) = self.push_copies(&c, ns, missing, &mut pacer).await?;
                self.counters.resync_blocks_sent.fetch_add(n as u64, Relaxed);
                sent += n;
            }
        }
        tracing::info!(member = %node, offered, sent, "resync done");
        Ok(())
    }

    /// Copies `keys` of `ns` that this node still holds to `c`, in batches
    /// paced by `pacer`; answers the blocks and bytes sent. A checkpoint chunk
    /// (shorter than the namespace's block) goes alone.
    pub(super) async fn push_copies(
        &self,
        c: &Client,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        pacer: &mut Pacer,
    ) -> Result<(usize, u64), String> {
        let Ok(block) = self.manager.block_bytes(ns) else {
            return Ok((0, 0));
        };
        let block = block as usize;
        let per = (self.max_request_bytes as usize / block.max(1)).clamp(1, SEND_BLOCKS);
        let (mut sent, mut bytes) = (0, 0);
        for batch in keys.chunks(per) {
            let m = self.manager.clone();
            let batch = batch.to_vec();
            let loaded = tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .filter_map(|k| m.load_one(ns, k).ok().flatten().map(|d| (k, d)))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| format!("load task: {e}"))?;
            let (mut whole_keys, mut whole) = (Vec::new(), BytesMut::new());
            for (k, d) in loaded {
                if d.len() == block {
                    whole_keys.push(k);
                    whole.extend_from_slice(&d);
                } else {
                    pacer.admit(d.len() as u64).await;
                    let len = d.len() as u64;
                    let t = self.timeout_for(d.len());
                    call(t, c.replica_put(ns, &[k], Bytes::from(d), None, None, Some(len))).await?;
                    sent += 1;
                    bytes += len;
                }
            }
            if !whole_keys.is_empty() {
                pacer.admit(whole.len() as u64).await;
                bytes += whole.len() as u64;
                let t = self.timeout_for(whole.len());
                call(t, c.replica_put(ns, &whole_keys, whole.freeze(), None, None, None)).await?;
                sent += whole_keys.len();
            }
        }
        Ok((sent, bytes))
    }
}

/// A peer call within `t`, its failure as text.
pub(super) async fn call<T>(t: Duration, f: impl Future<Output = kvtier::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {t:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_sends_to_the_rate() {
        let mut p = Pacer::new(1000);
        assert_eq!(
            p.delay(500, Duration::ZERO),
            Duration::from_millis(500),
            "a send pays for itself"
        );
        assert_eq!(p.delay(500, Duration::from_millis(600)), Duration::from_millis(400));
        assert_eq!(
            p.delay(500, Duration::from_secs(10)),
            Duration::ZERO,
            "no wait once behind"
        );
        let mut free = Pacer::new(0);
        assert_eq!(free.delay(u64::MAX / 2, Duration::ZERO), Duration::ZERO);
        assert_eq!(free.delay(u64::MAX / 2, Duration::ZERO), Duration::ZERO);
    }
}
