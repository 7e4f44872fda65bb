//! The write path: stores (into the host tier, or straight to disk in
//! SSD-only mode), the write-through queue and its workers, the
//! on-eviction cascade, and removals.

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use super::admission::Admission;
use super::stats::Counters;
use super::writeback::Writeback;
use super::{BlockManager, add};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::events::Change;
use crate::tier::blob::BlobMode;
use crate::tier::disk::DiskTier;
use crate::tier::host::{Demoter, HostPin, HostTier};
use crate::tier::{Stored, Tier, TierKind};

/// What a store did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreOutcome {
    /// Blocks written.
    pub stored: usize,
    /// Blocks already present (keys name content: nothing to write).
    pub present: usize,
    /// Blocks the disk admission filter kept out of an SSD-only store.
    pub not_admitted: usize,
}

/// Write-through jobs queued for disk, bounded by `capacity`.
#[derive(Debug)]
pub(super) struct Queue {
    pub(super) capacity: usize,
    pub(super) queued: Mutex<usize>,
    pub(super) drained: Condvar,
    /// Keys with a write-through job queued or being written, and how many
    /// jobs each: a removal waits for them, so that a job queued before it
    /// cannot write the block to disk after it (the block would come back).
    pub(super) in_flight: Mutex<HashMap<BlockKey, u32>>,
    /// Notified when jobs leave `in_flight`.
    pub(super) written: Condvar,
}

impl Queue {
    /// Waits until no write-through job for `key` is queued or running.
    fn wait_written(&self, key: &BlockKey) {
        let mut f = self.in_flight.lock();
        while f.contains_key(key) {
            self.written.wait(&mut f);
        }
    }
}

pub(super) struct Job {
    pub(super) ns: NamespaceId,
    pub(super) key: BlockKey,
    pub(super) pin: HostPin,
}

impl BlockManager {
    /// Stores `keys.len()` blocks laid out back to back in `data`.
    ///
    /// Validation happens before anything is written: a wrong size or an
    /// unknown namespace changes nothing. Stores are idempotent; after an
    /// error other than a validation error, some leading blocks may be stored
    /// and the caller retries the whole request.
    pub fn store(&self, ns: NamespaceId, keys: &[BlockKey], data: &[u8]) -> Result<StoreOutcome> {
        let block = self.check(ns, keys, data.len(), "store")?;
        self.store_checked(ns, keys, data, block)
    }

    /// Stores one block of any length from 1 byte up to the namespace's
    /// block size: a checkpoint chunk or manifest (KV blocks use
    /// [`BlockManager::store`]). Same guarantees as `store`.
    pub fn store_one(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<StoreOutcome> {
        let max = self.block_bytes(ns)? as usize;
        if data.is_empty() || data.len() > max {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!(
                    "a block of {} bytes; namespace {ns} holds blocks of 1 to {max} bytes",
                    data.len()
                ),
            ));
        }
        self.store_checked(ns, &[key], data, data.len())
    }

    /// [`BlockManager::store_one`] straight into the disk tier when there
    /// is one (the host tier is skipped; reads promote as usual): a write
    /// its caller acknowledges as durable (kvtierd's S3 objects), which in
    /// `tiered` mode must not live in host RAM only. Without a disk tier,
    /// as `store_one`.
    pub fn store_one_durable(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<StoreOutcome> {
        let max = self.block_bytes(ns)? as usize;
        if data.is_empty() || data.len() > max {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!(
                    "a block of {} bytes; namespace {ns} holds blocks of 1 to {max} bytes",
                    data.len()
                ),
            ));
        }
        if self.shared.disk.is_none() {
            return self.store_checked(ns, &[key], data, data.len());
        }
        let sh = &self.shared;
        sh.admission.record(&[key]);
        add(&sh.counters.stores, 1);
        let mut out = StoreOutcome::default();
        let r = self.store_disk(ns, &[key], data, data.len(), &mut out);
        add(&sh.counters.stored_blocks, out.stored as u64);
        add(&sh.counters.present_blocks, out.present as u64);
        r.map(|()| out)
    }

    fn store_checked(&self, ns: NamespaceId, keys: &[BlockKey], data: &[u8], block: usize) -> Result<StoreOutcome> {
        let sh = &self.shared;
        sh.admission.record(keys);
        add(&sh.counters.stores, 1);
        let mut out = StoreOutcome::default();
        let r = match &sh.host {
            Some(host) => self.store_host(host, ns, keys, data, block, &mut out),
            None => self.store_disk(ns, keys, data, block, &mut out),
        };
        add(&sh.counters.stored_blocks, out.stored as u64);
        add(&sh.counters.present_blocks, out.present as u64);
        if let Err(e) = &r
            && e.kind() == ErrorKind::Throttled
        {
            add(&sh.counters.throttled, 1);
        }
        r.map(|()| out)
    }

    fn store_disk(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: &[u8],
        block: usize,
        out: &mut StoreOutcome,
    ) -> Result<()> {
        let disk = self.shared.disk.as_ref().expect("validated: a tier is configured");
        for (k, chunk) in keys.iter().zip(data.chunks_exact(block)) {
            if !self.shared.admission.admits(k) {
                out.not_admitted += 1;
                add(&self.shared.counters.not_admitted, 1);
                continue;
            }
            match put_disk(disk, self.shared.wb.as_deref(), ns, *k, chunk)? {
                Stored::Inserted => out.stored += 1,
                Stored::Present => out.present += 1,
            }
        }
        Ok(())
    }

    fn store_host(
        &self,
        host: &HostTier,
        ns: NamespaceId,
        keys: &[BlockKey],
        data: &[u8],
        block: usize,
        out: &mut StoreOutcome,
    ) -> Result<()> {
        let sh = &self.shared;
        // Write-through: reserve queue room for every block first, so a full
        // queue throttles the request before anything changes.
        let through = match (&self.tx, &sh.disk) {
            (Some(_), Some(disk)) => {
                let want: Vec<bool> = keys
                    .iter()
                    .map(|k| sh.admission.admits(k) && !host.contains(k) && !disk.contains(k))
                    .collect();
                let n = want.iter().filter(|w| **w).count();
                self.take_queue_room(n)?;
                Some((want, n))
            }
            _ => None,
        };
        let mut sent = 0;
        let mut result = Ok(());
        for (i, (k, chunk)) in keys.iter().zip(data.chunks_exact(block)).enumerate() {
            match host.put(ns, *k, chunk) {
                Ok(Stored::Inserted) => out.stored += 1,
                Ok(Stored::Present) => out.present += 1,
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    // Every host block is pinned by readers: transient.
                    result = Err(Error::throttled(format!("host tier: {}", e.message())));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Some((want, _)) = &through
                && want[i]
                && self.write_through(host, ns, *k)
            {
                sent += 1;
            }
        }
        if let Some((_, n)) = through {
            self.release_queue_room(n - sent);
        }
        result
    }

    /// Queues a write-through job for a host block, on room the caller
    /// took in the queue; false if the block is gone from the host tier
    /// already (evicted again), and then the room is the caller's to give
    /// back.
    pub(super) fn write_through(&self, host: &HostTier, ns: NamespaceId, key: BlockKey) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let Some(pin) = host.pin_host(&key) else {
            return false;
        };
        *self.shared.queue.in_flight.lock().entry(key).or_insert(0) += 1;
        tx.send(Job { ns, key, pin })
            .expect("the offload worker runs while the manager lives");
        true
    }

    /// Takes room for `n` jobs in the write-through queue, or answers
    /// throttled and takes none.
    pub(super) fn take_queue_room(&self, n: usize) -> Result<()> {
        let q = &self.shared.queue;
        let mut queued = q.queued.lock();
        if *queued + n > q.capacity {
            return Err(Error::throttled(format!(
                "write-through queue holds {} of {} blocks; {n} more do not fit",
                *queued, q.capacity
            )));
        }
        *queued += n;
        Ok(())
    }

    /// Gives back room for `n` jobs that will not be queued.
    pub(super) fn release_queue_room(&self, n: usize) {
        if n == 0 {
            return;
        }
        let q = &self.shared.queue;
        let mut queued = q.queued.lock();
        assert!(*queued >= n, "released more write-through room than was taken");
        *queued -= n;
        q.drained.notify_all();
    }

    /// Removes `keys` from every tier; answers how many were present. In
    /// writeback mode this includes blob (a cache-only blob tier is never
    /// written, so it keeps them).
    pub fn remove(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<usize> {
        self.block_bytes(ns)?;
        let mut n = 0;
        for k in keys {
            let mut any = false;
            if let Some(wb) = &self.shared.wb {
                wb.cancel(*k);
            }
            self.shared.queue.wait_written(k);
            for t in self.tiers() {
                any |= t.remove(k)?;
            }
            if let Some(blob) = &self.shared.blob
                && blob.mode() == BlobMode::Writeback
                && blob.delete(ns, *k)?
            {
                self.shared.events.record(ns, Change::Removed, TierKind::Blob, &[*k]);
                any = true;
            }
            n += usize::from(any);
        }
        Ok(n)
    }

    /// Removes the copies of `keys` this node's own tiers (host, disk) last
    /// wrote before `before_ms` (Unix ms); answers how many keys lost a
    /// copy. A delete applied late: a copy put since (or put again while
    /// held) stays. Blob is not touched, since other nodes' puts land there;
    /// a pending upload of a removed copy finds it gone and is given up.
    pub fn remove_written_before(&self, ns: NamespaceId, keys: &[BlockKey], before_ms: u64) -> Result<usize> {
        self.block_bytes(ns)?;
        let mut n = 0;
        for k in keys {
            self.shared.queue.wait_written(k);
            let mut any = false;
            for t in self.tiers() {
                any |= t.remove_written_before(k, before_ms)?;
            }
            n += usize::from(any);
        }
        Ok(n)
    }

    /// Waits until every queued write-through block is on disk.
    pub fn flush(&self) {
        let q = &self.shared.queue;
        let mut n = q.queued.lock();
        while *n > 0 {
            q.drained.wait(&mut n);
        }
    }
}

/// The on-eviction cascade: admitted victims not yet on disk are written
/// there before their host memory is reused.
pub(super) fn demoter(
    disk: DiskTier,
    wb: Option<Arc<Writeback>>,
    admission: Arc<Admission>,
    counters: Arc<Counters>,
) -> Demoter {
    Arc::new(move |ns, key, bytes| {
        if disk.contains(&key) {
            return;
        }
        if !admission.admits(&key) {
            add(&counters.not_admitted, 1);
            return;
        }
        match put_disk(&disk, wb.as_deref(), ns, key, bytes) {
            Ok(_) => add(&counters.offloaded, 1),
            Err(e) => {
                add(&counters.offload_errors, 1);
                tracing::warn!(%key, "demotion to disk failed, block dropped from cache: {e}");
            }
        }
    })
}

/// Writes a block to disk; in writeback mode, logs it dirty first and
/// queues its upload once it is on disk.
pub(super) fn put_disk(
    disk: &DiskTier,
    wb: Option<&Writeback>,
    ns: NamespaceId,
    key: BlockKey,
    data: &[u8],
) -> Result<Stored> {
    put_disk_batch(disk, wb, &[(ns, key, data)])
        .pop()
        .expect("one result per block")
}

/// Jobs a write-through worker takes at once, at most: those already
/// queued behind the one it waited for go to disk together (see
/// [`DiskTier::put_batch`]).
pub(super) const OFFLOAD_BATCH_JOBS: usize = 64;
/// Bytes of blocks a worker takes at once; it stops taking more past this.
pub(super) const OFFLOAD_BATCH_BYTES: usize = 4 << 20;

/// Waits for a write-through job, then takes those already queued behind
/// it without waiting, up to [`OFFLOAD_BATCH_JOBS`] or
/// [`OFFLOAD_BATCH_BYTES`]. `None` once the queue is closed and empty.
pub(super) fn next_jobs(rx: &Mutex<Receiver<Job>>) -> Option<Vec<Job>> {
    let rx = rx.lock();
    let first = rx.recv().ok()?;
    let mut bytes = first.pin.as_slice().len();
    let mut jobs = vec![first];
    while jobs.len() < OFFLOAD_BATCH_JOBS && bytes < OFFLOAD_BATCH_BYTES {
        match rx.try_recv() {
            Ok(j) => {
                bytes += j.pin.as_slice().len();
                jobs.push(j);
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// [`put_disk`] for several blocks, packed into shared disk writes. In
/// writeback mode each block is logged dirty before the write and queued
/// for upload once it is on disk, as one by one.
pub(super) fn put_disk_batch(
    disk: &DiskTier,
    wb: Option<&Writeback>,
    items: &[(NamespaceId, BlockKey, &[u8])],
) -> Vec<Result<Stored>> {
    let Some(wb) = wb else {
        return disk.put_batch(items);
    };
    let mut out: Vec<Option<Result<Stored>>> = items.iter().map(|_| None).collect();
    let mut todo = Vec::with_capacity(items.len());
    let mut seen = HashSet::with_capacity(items.len());
    for (i, &(ns, key, _)) in items.iter().enumerate() {
        // A repeat is answered here, so that a failed first write is never
        // marked ready through it.
        if disk.contains(&key) || !seen.insert(key) {
            out[i] = Some(Ok(Stored::Present));
            continue;
        }
        match wb.begin(ns, key) {
            Ok(()) => todo.push(i),
            Err(e) => out[i] = Some(Err(e)),
        }
    }
    let batch: Vec<_> = todo.iter().map(|&i| items[i]).collect();
    for (&i, r) in todo.iter().zip(disk.put_batch(&batch)) {
        let (ns, key, _) = items[i];
        out[i] = Some(match r {
            Ok(s) => wb.ready(ns, key).map(|()| s),
            Err(e) => {
                wb.abort(key);
                Err(e)
            }
        });
    }
    out.into_iter().map(|r| r.expect("every block is answered")).collect()
}

/// A write-through worker: takes queued jobs in batches and writes them to
/// disk until the queue closes. Each job's host pin is held until its
/// bytes are on disk; a removal of its key waits for it (see
/// [`Queue::in_flight`]).
pub(super) fn offload_worker(
    rx: &Mutex<Receiver<Job>>,
    disk: &DiskTier,
    wb: Option<&Writeback>,
    queue: &Queue,
    counters: &Counters,
) {
    while let Some(jobs) = next_jobs(rx) {
        let items: Vec<_> = jobs.iter().map(|j| (j.ns, j.key, j.pin.as_slice())).collect();
        let results = put_disk_batch(disk, wb, &items);
        for (job, r) in jobs.iter().zip(results) {
            match r {
                Ok(_) => add(&counters.offloaded, 1),
                Err(e) => {
                    add(&counters.offload_errors, 1);
                    tracing::warn!(key = %job.key, "write-through to disk failed: {e}");
                }
            }
        }
        // The pins go only once their bytes are on disk.
        drop(items);
        {
            let mut f = queue.in_flight.lock();
            for job in &jobs {
                if let Some(n) = f.get_mut(&job.key) {
                    *n -= 1;
                    if *n == 0 {
                        f.remove(&job.key);
                    }
                }
            }
            queue.written.notify_all();
        }
        let n = jobs.len();
        drop(jobs);
        let mut q = queue.queued.lock();
        *q -= n;
        queue.drained.notify_all();
    }
}
