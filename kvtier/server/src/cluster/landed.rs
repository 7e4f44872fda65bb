//! Blob notices: telling the other replicas of a key that this node's
//! upload of it landed in blob (or was given up), so they drop their
//! pending upload without asking blob. The decisions (who hears of a key,
//! how notices are batched, who takes over a given-up key) are the core's
//! ([`kvtier::replication::landed`]); the writeback keeps the notices and
//! the timers. This module carries the messages: one `BlobNotices` call
//! per peer per interval, and the receiving side.

use super::*;
use kvtier::replication::landed::{self, Notice};
use kvtier_proto::convert::key_bytes;

/// Keys one message carries at most (the receiver's limit).
pub const MAX_NOTICE_KEYS: usize = 65_536;

/// Notices taken from the writeback per round at most.
const NOTICES_PER_ROUND: usize = 4 * MAX_NOTICE_KEYS;

impl Cluster {
    /// Sends the notices of this node's uploads every interval, until
    /// aborted.
    pub(super) async fn blob_notices(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.notice_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.send_blob_notices().await;
        }
    }

    /// The replica count of each namespace of `ns`, read before the view
    /// is locked.
    fn replica_counts(&self, ns: impl IntoIterator<Item = NamespaceId>) -> BTreeMap<NamespaceId, usize> {
        ns.into_iter()
            .map(|n| (n, self.registry.replication(n).replicas))
            .collect()
    }

    /// Sends what the writeback settled since the last round to the keys'
    /// other writable replicas, one message per peer (in parallel). A
    /// message that fails is not sent again: its keys cost the peer one
    /// check of blob after its bound. Answers the messages delivered.
    pub(super) async fn send_blob_notices(&self) -> usize {
        let notices = self.manager.take_blob_notices(NOTICES_PER_ROUND);
        if notices.is_empty() {
            return 0;
        }
        let r = self.replica_counts(notices.iter().map(|n| n.ns));
        let messages = {
            let v = self.view.read();
            let table = v.table();
            landed::route(
                &notices,
                |n: &Notice| {
                    // R is at most MAX_R (checked when the namespace was
                    // registered): no error to lose here.
                    let rs = table.replicas(&n.key, r[&n.ns]).unwrap_or_default();
                    landed::recipients(&rs, &self.me, |id| v.is_writable(id))
                },
                MAX_NOTICE_KEYS,
            )
        };
        let mut set = JoinSet::new();
        for (peer, batch) in messages {
            let Some(c) = self.peers.get(&peer) else {
                self.counters.blob_notices_failed.fetch_add(1, Relaxed);
                continue;
            };
            let keys = batch.keys as u64;
            let req = proto::BlobNoticesRequest {
                from: self.me.0.clone(),
                groups: batch
                    .namespaces
                    .into_iter()
                    .map(|(ns, k)| proto::BlobNoticeGroup {
                        namespace_id: Bytes::copy_from_slice(&ns.0.to_le_bytes()),
                        landed: k.landed.iter().map(key_bytes).collect(),
                        gave_up: k.gave_up.iter().map(key_bytes).collect(),
                    })
                    .collect(),
            };
            let t = self.timeout_for(batch.keys * 16);
            set.spawn(async move {
                let r = tokio::time::timeout(t, c.blob_notices(req)).await;
                (
                    peer,
                    keys,
                    r.map_err(|_| "timed out".to_string())
                        .and_then(|r| r.map_err(|e| e.to_string())),
                )
            });
        }
        let mut sent = 0;
        while let Some(Ok((peer, keys, r))) = set.join_next().await {
            match r {
                Ok(_) => {
                    sent += 1;
                    self.counters.blob_notices_sent.fetch_add(1, Relaxed);
                    self.counters.blob_notice_keys_sent.fetch_add(keys, Relaxed);
                }
                Err(e) => {
                    self.counters.blob_notices_failed.fetch_add(1, Relaxed);
                    tracing::debug!(member = %peer, keys, "blob notices not delivered (the member checks blob later): {e}");
                }
            }
        }
        sent
    }

    /// Peer `from` says its uploads settled these keys: landed ones are
    /// dropped from this node's pending uploads; given-up ones are uploaded
    /// here if this node is the next writable replica. Answers (settled,
    /// taken over).
    pub fn blob_notices_received(
        &self,
        from: &NodeId,
        groups: &[(NamespaceId, Vec<BlockKey>, Vec<BlockKey>)],
    ) -> (usize, usize) {
        let (mut settled, mut taken) = (0, 0);
        for (ns, landed_keys, gave_up) in groups {
            if !landed_keys.is_empty() {
                settled += self.manager.blob_landed(*ns, landed_keys);
            }
            if gave_up.is_empty() {
                continue;
            }
            let r = self.replica_counts([*ns])[ns];
            let mine: Vec<BlockKey> = {
                let v = self.view.read();
                let table = v.table();
                gave_up
                    .iter()
                    .filter(|k| {
                        let rs = table.replicas(k, r).unwrap_or_default();
                        landed::takes_over(&rs, from, &self.me, |id| v.is_writable(id))
                    })
                    .copied()
                    .collect()
            };
            if !mine.is_empty() {
                taken += self.manager.take_over_uploads(*ns, &mine);
            }
        }
        self.counters
            .blob_notice_keys_received
            .fetch_add(groups.iter().map(|(_, l, g)| (l.len() + g.len()) as u64).sum(), Relaxed);
        (settled, taken)
    }
}
