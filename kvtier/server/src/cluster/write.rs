//! Replicated writes: the fan-out to the targets the core's placement
//! picks, the tally the core keeps, and the copies kept here (with hints)
//! for replicas that missed them.
//!
//! The copies go to every target at once, and each peer's copy is
//! pipelined: sent as pieces of at most one data message, several in
//! flight per peer (bounded across all writes), so the peer stores the
//! first piece while the next ones are on the wire.

use super::*;
use tokio::sync::Semaphore;

/// The most bytes one ReplicaPut of a fan-out carries: a write of more is
/// sent as several, pipelined (see `Cluster::replicate`). One data message.
pub(super) const REPLICA_PIECE_BYTES: usize = kvtier_proto::CHUNK_BYTES;

/// What every ReplicaPut of one copy carries besides its blocks.
#[derive(Debug, Clone)]
struct ReplicaCopy {
    ns: NamespaceId,
    spec: Option<proto::ReplicaRegisterRequest>,
    hint_for: Option<String>,
    chunk_len: Option<u64>,
}

impl Cluster {
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
            let out = if keys.len() == 1 && this.registry.holds_files(ns) {
                // A checkpoint chunk or an S3 object's: on disk before it
                // counts as a copy.
                this.manager.store_one_durable(ns, keys[0], &data)
            } else if keys.len() == 1 && !whole {
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
        let mut tally = {
            let v = self.view.read();
            let plans: Vec<_> = keys.iter().map(|k| plan_write(k, &v, rep)).collect();
            WriteTally::new(self.me.clone(), &plans)
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
                    let r = match this.peers.with_slots(&node) {
                        None => Err(kvtier::Error::new(
                            ErrorKind::Unavailable,
                            format!("member {node} has no client yet"),
                        )),
                        Some(peer) => {
                            let copy = ReplicaCopy {
                                ns,
                                spec,
                                hint_for: hint_for.as_ref().map(|h| h.0.clone()),
                                chunk_len,
                            };
                            this.replicate(peer, copy, gkeys, gdata, block).await
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
                // Looked up on failure only: it walks the whole member list.
                let down: Vec<NodeId> = {
                    let v = self.view.read();
                    let ids = v.table().members().iter().map(|m| &m.id);
                    ids.filter(|id| !v.is_writable(id)).cloned().collect()
                };
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

    /// Copies `keys` (`block` bytes each, back to back in `data`) to one
    /// peer as ReplicaPuts of at most [`REPLICA_PIECE_BYTES`], sent at once
    /// but holding one of the peer's slots each (so at most
    /// [`super::peers::REPLICA_WRITES_IN_FLIGHT`] to that peer across all
    /// writes): the peer
    /// stores the first pieces while the next are on the wire. Each piece
    /// has its own time bound, counted once it holds a slot. Answers the
    /// counts summed, or the first failure (the other pieces are dropped;
    /// the caller keeps the whole group's copy for the peer).
    async fn replicate(
        &self,
        (c, slots): (&'static Client, &'static Semaphore),
        copy: ReplicaCopy,
        keys: Vec<BlockKey>,
        data: Bytes,
        block: usize,
    ) -> kvtier::Result<proto::PutResponse> {
        let per = (REPLICA_PIECE_BYTES / block).max(1);
        let mut set = JoinSet::new();
        for (i, ks) in keys.chunks(per).enumerate() {
            // A chunk (one key, shorter than a block) is one piece.
            let d = if keys.len() <= per {
                data.clone()
            } else {
                data.slice(i * per * block..(i * per + ks.len()) * block)
            };
            let (ks, copy, t) = (ks.to_vec(), copy.clone(), self.timeout_for(d.len()));
            set.spawn(async move {
                let _slot = slots.acquire().await.expect("the slots are never closed");
                let put = c.replica_put(copy.ns, &ks, d, copy.spec, copy.hint_for, copy.chunk_len);
                tokio::time::timeout(t, put).await.unwrap_or_else(|_| {
                    Err(kvtier::Error::new(
                        ErrorKind::Unavailable,
                        format!("no answer within {t:?}"),
                    ))
                })
            });
        }
        let mut sum = proto::PutResponse::default();
        while let Some(j) = set.join_next().await {
            let p = j.map_err(|e| kvtier::Error::new(ErrorKind::Internal, format!("replica piece task: {e}")))??;
            sum.stored += p.stored;
            sum.present += p.present;
            sum.not_admitted += p.not_admitted;
        }
        Ok(sum)
    }

    /// Marks the copies of `keys` of `ns` (bytes `data`) that a write
    /// failed to make on `node` out of sync: this node keeps a copy and a
    /// durable hint, delivered once `node` answers heartbeats. When even
    /// that fails, `node` is resynced once it is up.
    pub(super) async fn mark_out_of_sync(
        self: &Arc<Self>,
        ns: NamespaceId,
        node: NodeId,
        keys: Vec<BlockKey>,
        data: Bytes,
    ) {
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
}
