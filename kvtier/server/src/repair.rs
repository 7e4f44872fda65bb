//! Read repair and the scrub: kvtierd's side of
//! [`kvtier::replication::repair`].
//!
//! A copy that fails verification is dropped from its tier's index by the
//! tier itself (never served, counted) before anything here runs. The read
//! then goes on to the next holder the core's [`CopyRead`] names (the
//! replicas in read order, then blob), serves the first good copy, and
//! rewrites the bad copies from it: this node's with a local store, a
//! peer's with a `ReplicaPut`, as hint delivery sends one. A read fails only
//! when no holder has a good copy, and the error names every holder and
//! what it answered.
//!
//! - [`Repair::read_chunk`]: one variable-length block (a checkpoint chunk,
//!   an S3 chunk or record).
//! - Block loads: [`crate::node::Node::load_across`] drives the same
//!   [`CopyRead`] across its local, peer and blob passes, and hands the
//!   rewrites to [`Repair::rewrite`].
//! - The scrub ([`Repair::start_scrub`]): walks the disk front to back at
//!   most `[scrub] bytes_per_s`, verifies every stored copy, and repairs
//!   the corrupt ones the same way a read would.
//!
//! # Why the rewrites run in the background
//!
//! A read has what it came for once a good copy verified; a rewrite to a
//! slow or failing peer must not hold it up. Rewrites are rare (a copy
//! found corrupt) and each is one block: a task per found copy, stopped
//! with [`Repair::shutdown`], with at most 256 MiB of good copies held for
//! them at once (past that a bad copy stays dropped, counted). A rewrite that
//! fails leaves the bad copy dropped from its holder's index all the
//! same; it is counted and logged, and found again (by a read or the
//! scrub) once its holder restarts and indexes the record again.

use bytes::Bytes;
use kvtier::replication::repair::{Answer, CopyRead, Holder, ReadOutcome, ScrubPace};
use kvtier::tier::Tier;
use kvtier::tier::disk::{DiskPlace, DiskTier, PlacedBlock};
use kvtier::{AlignedBuf, BlockKey, BlockManager, ErrorKind, NamespaceId};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::config::ScrubConfig;
use crate::proto;

/// Blocks the scrub takes from the disk's index at once; the ticks verify
/// them as their budget allows.
const SCRUB_BATCH: usize = 1024;
/// How often the scrub wakes: each tick verifies `bytes_per_s` × this.
const SCRUB_TICK: Duration = Duration::from_millis(100);
/// The longest wait before the first scrub pass.
const SCRUB_FIRST_PASS_MAX: Duration = Duration::from_secs(60);
/// Bytes of good copies held for rewrites in flight, at most.
const REWRITE_BUDGET_BYTES: usize = 256 << 20;
/// The unit of [`REWRITE_BUDGET_BYTES`].
const PAGE: usize = 4096;
/// The scrub's reused read buffer; a larger block gets one of its own.
const SCRUB_BUF_BYTES: usize = 8 << 20;
/// Scrub finds whose repair waits for a holder that did not answer, kept
/// to try again at the next pass, at most.
const SCRUB_RETRY_MAX: usize = 1024;

/// Reads and verifies each of `blocks` that `disk` still holds, through
/// `buf` (one of its own for a block larger); answers those that failed
/// verification, which the disk tier dropped.
fn verify(disk: &DiskTier, blocks: &[PlacedBlock], buf: &mut AlignedBuf) -> Vec<(NamespaceId, BlockKey)> {
    let mut corrupt = Vec::new();
    for p in blocks {
        // Gone since the batch was taken (evicted, removed), or stored
        // again elsewhere: then this reads the newer copy.
        let Some(pin) = disk.pin(&p.key) else { continue };
        let len = pin.len();
        let mut own;
        let out = if len <= buf.len() {
            &mut buf[..len]
        } else {
            own = AlignedBuf::new(len);
            &mut own[..]
        };
        match pin.read_into(out) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::ChecksumMismatch => corrupt.push((p.ns, p.key)),
            Err(e) => tracing::warn!(key = %p.key, "scrub: block not read: {e}"),
        }
    }
    corrupt
}

/// Read repair's and the scrub's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Copies of this node found corrupt by a read.
    pub corrupt_found_local_read: AtomicU64,
    /// Peers' copies a read here found corrupt (their answer said so).
    pub corrupt_found_peer_read: AtomicU64,
    /// Copies of this node the scrub found corrupt.
    pub corrupt_found_scrub: AtomicU64,
    /// Corrupt copies here rewritten from a good one.
    pub repaired_local: AtomicU64,
    /// Corrupt copies on peers rewritten from a good one.
    pub repaired_peer: AtomicU64,
    /// Rewrites that failed.
    pub repair_failures: AtomicU64,
    /// Keys found corrupt with no good copy anywhere.
    pub no_good_copy: AtomicU64,
    /// Scrub passes over the whole disk finished.
    pub scrub_passes: AtomicU64,
    /// Blocks the scrub verified.
    pub scrub_blocks: AtomicU64,
    /// Bytes the scrub verified.
    pub scrub_bytes: AtomicU64,
}

/// Read repair and the scrub of one node.
pub struct Repair {
    manager: Arc<BlockManager>,
    cluster: Option<Arc<Cluster>>,
    /// The counters, for Stats and the metrics.
    pub counters: Counters,
    scrub_enabled: AtomicBool,
    /// Scrub finds not repaired because a holder did not answer: tried
    /// again at the next pass (the copy here is dropped, so the walk no
    /// longer sees it).
    scrub_retry: Mutex<Vec<(NamespaceId, BlockKey)>>,
    /// Room for the good copies that rewrites in flight hold.
    rewrite_room: Arc<tokio::sync::Semaphore>,
    /// Rewrites and the scrub, and whether [`Repair::shutdown`] stopped
    /// them.
    tasks: crate::tasks::Tasks,
}

impl std::fmt::Debug for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repair").finish_non_exhaustive()
    }
}

impl Repair {
    /// Repair over `manager`'s tiers, with the peers of `cluster`.
    pub fn new(manager: Arc<BlockManager>, cluster: Option<Arc<Cluster>>) -> Self {
        Self {
            manager,
            cluster,
            counters: Counters::default(),
            scrub_enabled: AtomicBool::new(false),
            scrub_retry: Mutex::new(Vec::new()),
            rewrite_room: Arc::new(tokio::sync::Semaphore::new(REWRITE_BUDGET_BYTES / PAGE)),
            tasks: crate::tasks::Tasks::default(),
        }
    }

    /// Runs `f` in the background until it ends or [`Repair::shutdown`];
    /// after a shutdown, drops it instead.
    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(f);
    }

    /// Stops the scrub and every rewrite in flight and waits until each
    /// has ended, so none holds the block manager any more.
    pub async fn shutdown(&self) {
        self.tasks.stop().await;
    }

    /// The read of `key` of `ns`: this node's tiers (with `here`), the
    /// peers in read order (with `peers`, in a cluster), then blob (when
    /// this node has a blob tier).
    pub fn read_of(&self, ns: NamespaceId, key: BlockKey, here: bool, peers: bool) -> CopyRead {
        self.read_from(ns, key, here, peers, true)
    }

    fn read_from(&self, ns: NamespaceId, key: BlockKey, here: bool, peers: bool, blob: bool) -> CopyRead {
        let peers = match (&self.cluster, peers) {
            (Some(c), true) => c.read_holders(ns, &key),
            _ => Vec::new(),
        };
        let order = here
            .then_some(Holder::Here)
            .into_iter()
            .chain(peers.into_iter().map(Holder::Peer))
            .chain((blob && self.manager.blob().is_some()).then_some(Holder::Blob));
        CopyRead::new(key, order)
    }

    /// Counts a copy found corrupt: here by a read, here by the scrub, or
    /// on a peer.
    pub fn found_corrupt(&self, at: &Holder, by_scrub: bool) {
        let c = &self.counters;
        match (at, by_scrub) {
            (Holder::Here, false) => &c.corrupt_found_local_read,
            (Holder::Here, true) => &c.corrupt_found_scrub,
            (Holder::Peer(_), _) => &c.corrupt_found_peer_read,
            // Blob's own counter (kvtier_blob_corrupt_total) has it.
            (Holder::Blob, _) => return,
        }
        .fetch_add(1, Relaxed);
    }

    /// A read that found a corrupt copy and no good one: counted, and the
    /// error that says so. `None` for a plain miss (nothing corrupt).
    pub fn no_good_copy(&self, read: &CopyRead, what: &str) -> Option<kvtier::Error> {
        match read.outcome() {
            ReadOutcome::NoGoodCopy(e) => {
                self.counters.no_good_copy.fetch_add(1, Relaxed);
                tracing::warn!(key = %read.key(), "{what} {e}");
                Some(e.to_error(what))
            }
            _ => None,
        }
    }

    /// One variable-length block of `ns` (a checkpoint chunk, an S3 chunk
    /// or record): this node's tiers, then (with `peers`) the replicas in
    /// read order, then (with `blob`) blob. A copy that fails verification is skipped
    /// and rewritten from the good one served; `None` when no holder has
    /// the key; [`ErrorKind::ChecksumMismatch`] (every holder answered) or
    /// [`ErrorKind::Unavailable`] (some did not) when copies exist but
    /// none is good.
    pub async fn read_chunk(
        self: &Arc<Self>,
        ns: NamespaceId,
        key: BlockKey,
        peers: bool,
        blob: bool,
    ) -> kvtier::Result<Option<Bytes>> {
        let mut read = self.read_from(ns, key, true, peers, blob);
        let mut got = None;
        let mut asked_again = false;
        loop {
            while let Some(h) = read.next().cloned() {
                let (answer, data) = self.ask(ns, key, &h).await?;
                if answer == Answer::Corrupt {
                    self.found_corrupt(&h, false);
                }
                read.record(h, answer);
                if data.is_some() {
                    got = data;
                }
            }
            // While keys move, a copy can leave its old holder after this
            // read asked the new replica (see `Cluster::fetch`): a miss is
            // asked again once.
            let moving = peers && self.cluster.as_ref().is_some_and(|c| c.moving());
            if asked_again || read.outcome() != ReadOutcome::Miss || !moving {
                break;
            }
            asked_again = true;
            read = self.read_from(ns, key, true, peers, blob);
        }
        match read.outcome() {
            ReadOutcome::Served { repair, from } => {
                let data = got.expect("a good answer carries the bytes");
                if !repair.is_empty() {
                    tracing::info!(%key, namespace = %ns, %from, "read repair: serving a good copy, rewriting {} bad ones", repair.len());
                    self.rewrite(ns, key, data.clone(), repair);
                }
                Ok(Some(data))
            }
            ReadOutcome::Miss => Ok(None),
            _ => Err(self.no_good_copy(&read, "chunk").unwrap_or_else(|| {
                kvtier::Error::new(
                    ErrorKind::Internal,
                    format!("chunk {key}: a read ended without an outcome"),
                )
            })),
        }
    }

    /// What `holder` has of `key` of `ns`, and its bytes when they verified.
    async fn ask(&self, ns: NamespaceId, key: BlockKey, holder: &Holder) -> kvtier::Result<(Answer, Option<Bytes>)> {
        let local = |blob: bool| {
            let m = self.manager.clone();
            async move {
                let r = tokio::task::spawn_blocking(move || {
                    if blob {
                        m.load_chunk(ns, key)
                    } else {
                        m.load_chunk_local(ns, key)
                    }
                })
                .await
                .map_err(|e| kvtier::Error::new(ErrorKind::Internal, format!("load task: {e}")))?;
                Ok::<_, kvtier::Error>(match r {
                    Ok(Some(d)) => (Answer::Good, Some(d)),
                    Ok(None) => (Answer::Missing, None),
                    // An unknown namespace is the caller's mistake, not a
                    // holder's answer.
                    Err(e) if e.kind() == ErrorKind::UnknownNamespace => return Err(e),
                    Err(e) => (Answer::of_error(e.kind()), None),
                })
            }
        };
        match holder {
            Holder::Here => local(false).await,
            // This node's copy was asked first: a corrupt one is dropped
            // from its tier, so this reaches blob.
            Holder::Blob => local(true).await,
            Holder::Peer(n) => Ok(match &self.cluster {
                Some(c) => c.chunk_from(n, ns, key).await,
                None => (Answer::Failed(ErrorKind::Unavailable), None),
            }),
        }
    }

    /// Rewrites the copies of `key` of `ns` at `holders` (which failed
    /// verification) from `data`, a copy that verified; in the background.
    pub fn rewrite(self: &Arc<Self>, ns: NamespaceId, key: BlockKey, data: Bytes, holders: Vec<Holder>) {
        let pages = data.len().div_ceil(PAGE).clamp(1, REWRITE_BUDGET_BYTES / PAGE) as u32;
        let Ok(room) = self.rewrite_room.clone().try_acquire_many_owned(pages) else {
            // A bound on the copies held for rewrites: past it, the bad
            // copies stay dropped (found again after their holder
            // restarts), and the read is served all the same.
            self.counters.repair_failures.fetch_add(holders.len() as u64, Relaxed);
            tracing::warn!(%key, namespace = %ns, "read repair: {REWRITE_BUDGET_BYTES} bytes of rewrites in flight; {} bad copies not rewritten", holders.len());
            return;
        };
        let this = self.clone();
        self.spawn(async move {
            let _room = room;
            for h in holders {
                let r = match &h {
                    Holder::Here => this.store_here(ns, key, data.clone()).await,
                    Holder::Peer(n) => match &this.cluster {
                        Some(c) => c.rewrite_copy(n, ns, key, data.clone()).await,
                        None => Err("no cluster".into()),
                    },
                    Holder::Blob => continue,
                };
                let c = &this.counters;
                match r {
                    Ok(()) => {
                        let n = if h == Holder::Here { &c.repaired_local } else { &c.repaired_peer };
                        n.fetch_add(1, Relaxed);
                        tracing::info!(%key, namespace = %ns, copy = %h, "read repair: corrupt copy rewritten");
                    }
                    Err(e) => {
                        c.repair_failures.fetch_add(1, Relaxed);
                        tracing::warn!(%key, namespace = %ns, copy = %h, "read repair: corrupt copy not rewritten (it stays dropped): {e}");
                    }
                }
            }
        });
    }

    /// Stores `data` as this node's copy of `key`, the way a replica write
    /// does: files (checkpoint chunks, S3 objects) straight to the SSD.
    async fn store_here(&self, ns: NamespaceId, key: BlockKey, data: Bytes) -> Result<(), String> {
        let m = self.manager.clone();
        let out = tokio::task::spawn_blocking(move || {
            let block = m.block_bytes(ns)? as usize;
            if m.holds_files(ns) {
                m.store_one_durable(ns, key, &data)
            } else if data.len() != block {
                m.store_one(ns, key, &data)
            } else {
                m.store(ns, &[key], &data)
            }
        })
        .await
        .map_err(|e| format!("store task: {e}"))?
        .map_err(|e| e.to_string())?;
        if out.not_admitted > 0 {
            return Err("the disk admission filter kept it out".into());
        }
        Ok(())
    }

    /// Read repair's and the scrub's counters for the Stats reply.
    pub fn stats(&self) -> proto::RepairStats {
        let c = &self.counters;
        proto::RepairStats {
            corrupt_found_local_read: c.corrupt_found_local_read.load(Relaxed),
            corrupt_found_peer_read: c.corrupt_found_peer_read.load(Relaxed),
            corrupt_found_scrub: c.corrupt_found_scrub.load(Relaxed),
            repaired_local: c.repaired_local.load(Relaxed),
            repaired_peer: c.repaired_peer.load(Relaxed),
            repair_failures: c.repair_failures.load(Relaxed),
            no_good_copy: c.no_good_copy.load(Relaxed),
            scrub_enabled: self.scrub_enabled.load(Relaxed),
            scrub_passes: c.scrub_passes.load(Relaxed),
            scrub_blocks: c.scrub_blocks.load(Relaxed),
            scrub_bytes: c.scrub_bytes.load(Relaxed),
        }
    }
}

/// The scrub.
impl Repair {
    /// Starts the scrub of the disk tier, unless `cfg` turns it off or
    /// there is no disk tier.
    pub fn start_scrub(self: &Arc<Self>, cfg: &ScrubConfig) {
        if !cfg.enabled() || self.manager.disk().is_none() {
            return;
        }
        self.scrub_enabled.store(true, Relaxed);
        tracing::info!(
            bytes_per_s = cfg.bytes_per_s,
            interval_s = cfg.interval_s,
            "disk scrub on"
        );
        self.spawn(self.clone().scrub(cfg.clone()));
    }

    /// Passes over the disk, one every `interval_s` at most, each at most
    /// `bytes_per_s`.
    async fn scrub(self: Arc<Self>, cfg: ScrubConfig) {
        let interval = Duration::from_secs(cfg.interval_s);
        tokio::time::sleep(interval.min(SCRUB_FIRST_PASS_MAX)).await;
        let mut pace = ScrubPace::new(cfg.bytes_per_s, SCRUB_TICK);
        loop {
            let start = Instant::now();
            let retry = std::mem::take(&mut *self.scrub_retry.lock());
            for (ns, key) in retry {
                self.repair_found(ns, key).await;
            }
            self.scrub_pass(&mut pace).await;
            self.counters.scrub_passes.fetch_add(1, Relaxed);
            tokio::time::sleep(interval.saturating_sub(start.elapsed())).await;
        }
    }

    /// One pass: every block on the disk, front to back, a tick's budget
    /// of them per tick.
    async fn scrub_pass(self: &Arc<Self>, pace: &mut ScrubPace) {
        let Some(disk) = self.manager.disk().cloned() else {
            return;
        };
        // The next blocks in disk order, taken a batch at a time: each
        // batch costs a look at a segment's index.
        let mut queue: VecDeque<PlacedBlock> = VecDeque::new();
        let mut after: Option<DiskPlace> = None;
        let mut buf = Some(AlignedBuf::new(SCRUB_BUF_BYTES));
        loop {
            if queue.is_empty() {
                let d = disk.clone();
                let Ok(batch) = tokio::task::spawn_blocking(move || d.blocks_after(after, SCRUB_BATCH)).await else {
                    return;
                };
                if batch.is_empty() {
                    return;
                }
                after = batch.last().map(|b| b.place);
                queue.extend(batch);
            }
            let lens: Vec<u64> = queue.iter().map(|b| b.len).collect();
            let n = pace.take(&lens);
            if n > 0 {
                let todo: Vec<PlacedBlock> = queue.drain(..n).collect();
                let bytes: u64 = lens[..n].iter().sum();
                let d = disk.clone();
                let mut b = buf.take().expect("the buffer is back after each tick");
                let Ok((b, corrupt)) = tokio::task::spawn_blocking(move || {
                    let corrupt = verify(&d, &todo, &mut b);
                    (b, corrupt)
                })
                .await
                else {
                    return;
                };
                buf = Some(b);
                let c = &self.counters;
                c.scrub_blocks.fetch_add(n as u64, Relaxed);
                c.scrub_bytes.fetch_add(bytes, Relaxed);
                for (ns, key) in corrupt {
                    self.found_corrupt(&Holder::Here, true);
                    tracing::warn!(%key, namespace = %ns, "scrub: corrupt copy found (dropped); repairing it");
                    self.repair_found(ns, key).await;
                }
            }
            tokio::time::sleep(SCRUB_TICK).await;
        }
    }

    /// This node's copy of `key` failed verification outside a read (its
    /// tier dropped it): fetch a good copy from the other holders and
    /// store it here.
    async fn repair_found(self: &Arc<Self>, ns: NamespaceId, key: BlockKey) {
        let mut read = self.read_of(ns, key, true, true);
        read.record(Holder::Here, Answer::Corrupt);
        let mut got = None;
        while let Some(h) = read.next().cloned() {
            let Ok((answer, data)) = self.ask(ns, key, &h).await else {
                // The namespace is gone: nothing to repair.
                return;
            };
            if answer == Answer::Corrupt {
                self.found_corrupt(&h, false);
            }
            read.record(h, answer);
            if data.is_some() {
                got = data;
            }
        }
        match (read.outcome(), got) {
            (ReadOutcome::Served { repair, .. }, Some(data)) => self.rewrite(ns, key, data, repair),
            (ReadOutcome::NoGoodCopy(e), _) if e.kind().is_retryable() => {
                // A good copy may be on a holder that did not answer.
                let mut retry = self.scrub_retry.lock();
                if retry.len() < SCRUB_RETRY_MAX {
                    retry.push((ns, key));
                }
                tracing::info!(%key, namespace = %ns, "scrub: {e}; tried again at the next pass");
            }
            _ => {
                let _ = self.no_good_copy(&read, "scrub: block");
            }
        }
    }
}
