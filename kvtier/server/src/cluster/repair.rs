//! Reads from peers that tell a corrupt copy from a missing one, and the
//! rewrite of a peer's corrupt copy: the peer side of read repair (see
//! [`crate::repair`] and [`kvtier::replication::repair`]).

use kvtier::replication::repair::{Answer, CopyRead, Holder, ReadOutcome};

use super::*;

/// What [`Cluster::fetch`] brought.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Leading keys loaded into the buffer, verified by the peer that sent
    /// them.
    pub loaded: usize,
    /// Keys served from a good copy after others failed verification: the
    /// key's index and the holders whose copy to rewrite.
    pub repairs: Vec<(usize, Vec<Holder>)>,
    /// Peers' answers that said their copy failed verification.
    pub corrupt_answers: u64,
    /// The read of the key at `loaded` that no peer had a good copy of
    /// (`None` when every key was loaded).
    pub stopped: Option<CopyRead>,
}

impl Cluster {
    /// The peers a read of `key` of `ns` asks, in order (see
    /// `read_peers`).
    pub fn read_holders(&self, ns: NamespaceId, key: &BlockKey) -> Vec<NodeId> {
        self.read_peers(ns, key, self.registry.replication(ns))
    }

    /// Whether keys may be moving between members (a rebalancing pass
    /// pending or running, or a recent change of the member list).
    pub fn moving(&self) -> bool {
        self.rebalance.moving()
    }

    /// What `peer` holds of `key` of `ns` (a variable-length block, or a
    /// whole one): its bytes when they verified there.
    pub async fn chunk_from(&self, peer: &NodeId, ns: NamespaceId, key: BlockKey) -> (Answer, Option<Bytes>) {
        let Some(c) = self.read_client(peer) else {
            return (Answer::Failed(ErrorKind::Unavailable), None);
        };
        let t = self.timeout_for(self.manager.block_bytes(ns).unwrap_or(0) as usize);
        match tokio::time::timeout(t, c.replica_get_chunk(ns, key)).await {
            Ok(Ok(Some(d))) => {
                self.counters.peer_read_blocks.fetch_add(1, Relaxed);
                (Answer::Good, Some(Bytes::from(d)))
            }
            Ok(Ok(None)) => (Answer::Missing, None),
            Ok(Err(e)) => {
                tracing::debug!(member = %peer, kind = e.kind().name(), "peer chunk read failed: {}", e.message());
                self.counters.peer_read_failures.fetch_add(1, Relaxed);
                (Answer::of_error(e.kind()), None)
            }
            Err(_) => {
                tracing::debug!(member = %peer, "peer chunk read: no answer within {t:?}");
                self.counters.peer_read_failures.fetch_add(1, Relaxed);
                (Answer::Failed(ErrorKind::Unavailable), None)
            }
        }
    }

    /// Loads `keys` of `ns` from peers into `out` (`block` bytes per key),
    /// as far as they hold a leading run of good copies.
    ///
    /// Each key is read as the core's [`CopyRead`] says: the peers in read
    /// order, the next one after a copy that failed verification (a peer
    /// whose run stopped on a corrupt copy is not asked for that key
    /// again). `known` holds what other holders already answered for the
    /// first key (this node's corrupt copy). The copies to rewrite are in
    /// [`Fetched::repairs`]; the driver rewrites them.
    pub async fn fetch(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        out: &mut [u8],
        block: usize,
        known: &[(Holder, Answer)],
    ) -> Fetched {
        let rep = self.registry.replication(ns);
        let mut f = Fetched::default();
        let mut carry: Vec<(Holder, Answer)> = known.to_vec();
        let mut at = 0;
        let mut asked_again = false;
        'keys: while at < keys.len() {
            let peers = self.read_peers(ns, &keys[at], rep);
            let mut read = CopyRead::new(keys[at], peers.into_iter().map(Holder::Peer));
            for (h, a) in carry.drain(..) {
                read.record(h, a);
            }
            while let Some(Holder::Peer(peer)) = read.next().cloned() {
                let answer = match self.read_client(&peer) {
                    None => Answer::Failed(ErrorKind::Unavailable),
                    Some(c) => {
                        let t = self.timeout_for((keys.len() - at) * block);
                        match tokio::time::timeout(t, c.replica_get(ns, &keys[at..])).await {
                            Ok(Ok(g)) if g.block_bytes as usize != block || g.data.len() < g.loaded * block => {
                                tracing::debug!(member = %peer, "peer read answered {} blocks of {} bytes in {} bytes", g.loaded, g.block_bytes, g.data.len());
                                self.counters.peer_read_failures.fetch_add(1, Relaxed);
                                Answer::Failed(ErrorKind::Internal)
                            }
                            Ok(Ok(g)) => {
                                let n = g.loaded.min(keys.len() - at);
                                // The block its run stopped on, when it had
                                // one that failed.
                                let stop = g.failed_index.filter(|i| *i == g.loaded).map(|_| {
                                    g.failed_kind
                                        .map_or(Answer::Failed(ErrorKind::Internal), Answer::of_error)
                                });
                                if stop == Some(Answer::Corrupt) {
                                    f.corrupt_answers += 1;
                                }
                                if n == 0 {
                                    stop.unwrap_or(Answer::Missing)
                                } else {
                                    out[at * block..(at + n) * block].copy_from_slice(&g.data[..n * block]);
                                    self.counters.peer_read_blocks.fetch_add(n as u64, Relaxed);
                                    read.record(Holder::Peer(peer.clone()), Answer::Good);
                                    if let ReadOutcome::Served { repair, .. } = read.outcome()
                                        && !repair.is_empty()
                                    {
                                        f.repairs.push((at, repair));
                                    }
                                    at += n;
                                    asked_again = false;
                                    if let Some(a) = stop
                                        && at < keys.len()
                                    {
                                        carry.push((Holder::Peer(peer), a));
                                    }
                                    continue 'keys;
                                }
                            }
                            r => {
                                tracing::debug!(member = %peer, ?r, "peer read failed");
                                self.counters.peer_read_failures.fetch_add(1, Relaxed);
                                match r {
                                    Ok(Err(e)) => Answer::of_error(e.kind()),
                                    _ => Answer::Failed(ErrorKind::Unavailable),
                                }
                            }
                        }
                    }
                };
                read.record(Holder::Peer(peer), answer);
            }
            if !asked_again && read.outcome() == ReadOutcome::Miss && self.moving() {
                // While keys move, a copy can leave its old holder (which
                // drops it once the new replica confirmed it) after this
                // read asked the new replica and before it asked the old
                // one: asked again, the new replica has it.
                asked_again = true;
                continue 'keys;
            }
            f.stopped = Some(read);
            break;
        }
        f.loaded = at;
        f
    }

    /// Sends `data`, a copy of `key` of `ns` that verified, to `peer`,
    /// whose own copy failed verification (and was dropped there): a
    /// replica write, as a hint delivery sends one.
    pub async fn rewrite_copy(&self, peer: &NodeId, ns: NamespaceId, key: BlockKey, data: Bytes) -> Result<(), String> {
        let c = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("member {peer} has no client"))?;
        let block = self.manager.block_bytes(ns).map_err(|e| e.to_string())? as usize;
        let chunk_len = (data.len() < block).then_some(data.len() as u64);
        let t = self.timeout_for(data.len());
        match tokio::time::timeout(t, c.replica_put(ns, &[key], data, self.spec(ns), None, chunk_len)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {t:?}")),
        }
    }
}
