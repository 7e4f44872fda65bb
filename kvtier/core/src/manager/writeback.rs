//! Lazy writeback to blob: a durable dirty log on the SSD and an uploader.
//!
//! A block that reaches the disk tier in writeback mode is first recorded
//! in the dirty log (`blob-writeback.log` in the disk directory), then
//! written to disk, then queued for upload: so every acknowledged block is
//! either uploaded or named in the log, and a restart resumes what is left.
//! A logged block that never reached the disk (the process died in
//! between, or the write failed) was never acknowledged: replay drops it.
//!
//! The disk tier's reclaim keeps every pending block (its `Retain` hook), so
//! a backlog throttles new stores instead of dropping unuploaded blocks.
//!
//! Log records are 48 bytes: magic `KVWB`, an op (dirty or done), the key,
//! the namespace and a CRC32C. A torn tail is cut off on open; the log is
//! rewritten with only the pending blocks on open and whenever finished
//! records outnumber them.
//!
//! The uploader runs on the blob tier's runtime: at most
//! `upload_concurrency` uploads in flight (the blob tier also applies the
//! rate limit), each failed upload tried again after a backoff that doubles
//! from `retry_min_backoff_ms` to `retry_max_backoff_ms`, indefinitely: an
//! outage delays uploads, it does not lose them.
//!
//! In a cluster every replica of a key logs it, but only one uploads it: an
//! [`UploadFilter`] says whether this node is the key's uploader (the first
//! live replica in placement order, [`crate::replication::uploader`]). The
//! others keep the key pending and check blob (one HEAD) after a backoff:
//! present means the uploader did its job; absent, they ask the filter
//! again, which answers yes once the uploader is down. So a key goes to blob
//! once whatever R is, and is not lost with its uploader.

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, Result};
use crate::events::{Change, EventLog};
use crate::fsio::FileIo;
use crate::tier::blob::BlobClient;
use crate::tier::blob::object::OBJECT_OVERHEAD_BYTES;
use crate::tier::disk::DiskTier;
use crate::tier::{Tier, TierKind};

/// Whether this node uploads `key` of a namespace (false: another replica
/// does).
pub type UploadFilter = Arc<dyn Fn(NamespaceId, &BlockKey) -> bool + Send + Sync>;

/// The dirty log's file name in the disk directory.
pub const LOG_FILE: &str = "blob-writeback.log";

const RECORD_BYTES: usize = 48;
const MAGIC: &[u8; 4] = b"KVWB";
const OP_DIRTY: u8 = 1;
const OP_DONE: u8 = 2;

fn encode(op: u8, ns: NamespaceId, key: BlockKey) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[0..4].copy_from_slice(MAGIC);
    r[4] = op;
    r[8..24].copy_from_slice(&key.to_le_bytes());
    r[24..40].copy_from_slice(&ns.0.to_le_bytes());
    let crc = crc32c::crc32c(&r[..40]);
    r[40..44].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<(u8, NamespaceId, BlockKey)> {
    if &r[0..4] != MAGIC || !matches!(r[4], OP_DIRTY | OP_DONE) {
        return None;
    }
    let crc = u32::from_le_bytes(r[40..44].try_into().expect("4 bytes"));
    if crc32c::crc32c(&r[..40]) != crc {
        return None;
    }
    let key = BlockKey::from_le_bytes(r[8..24].try_into().expect("16 bytes"));
    let ns = NamespaceId(u128::from_le_bytes(r[24..40].try_into().expect("16 bytes")));
    Some((r[4], ns, key))
}

/// Counters of the writeback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WritebackStats {
    /// Blocks logged and not yet uploaded.
    pub pending_blocks: u64,
    /// Blocks uploaded (or found already in blob).
    pub uploaded_blocks: u64,
    /// Upload attempts that failed (each is tried again).
    pub upload_failures: u64,
    /// Blocks pending at the last open.
    pub resumed_blocks: u64,
    /// Logged blocks given up: not on disk at replay (never acknowledged),
    /// removed by a client, or unreadable on disk.
    pub dropped_blocks: u64,
    /// Log appends that failed (a store that hit one failed too).
    pub log_errors: u64,
    /// Pending blocks another replica uploaded (found in blob).
    pub uploaded_by_peers: u64,
    /// Checks of blob for blocks another replica uploads.
    pub peer_checks: u64,
}

#[derive(Debug)]
struct Entry {
    ns: NamespaceId,
    /// On disk and queued (or uploading).
    ready: bool,
    failures: u32,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<BlockKey, Entry>,
    queue: VecDeque<BlockKey>,
}

#[derive(Debug)]
struct Log {
    file: File,
    records: u64,
}

/// The dirty log and the upload queue.
pub(crate) struct Writeback {
    path: PathBuf,
    sync: bool,
    /// The log's appends, fsyncs and rewrites go through it.
    io: FileIo,
    state: Mutex<State>,
    log: Mutex<Log>,
    idle: Condvar,
    wake: tokio::sync::Notify,
    stopped: AtomicBool,
    uploaded: AtomicU64,
    failures: AtomicU64,
    resumed: AtomicU64,
    dropped: AtomicU64,
    log_errors: AtomicU64,
    filter: parking_lot::RwLock<Option<UploadFilter>>,
    by_peers: AtomicU64,
    peer_checks: AtomicU64,
}

impl std::fmt::Debug for Writeback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writeback")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Writeback {
    /// Opens the log in `dir`, keeps the pending blocks that `on_disk`
    /// holds (queued for upload), drops the rest, and rewrites the log.
    #[cfg(test)]
    pub(crate) fn open(dir: &Path, sync: bool, on_disk: impl Fn(&BlockKey) -> bool) -> Result<Self> {
        Self::open_with(dir, sync, FileIo::default(), on_disk)
    }

    /// [`Writeback::open`] with the log's file operations going through `io`.
    pub(crate) fn open_with(dir: &Path, sync: bool, io: FileIo, on_disk: impl Fn(&BlockKey) -> bool) -> Result<Self> {
        let path = dir.join(LOG_FILE);
        let mut order = Vec::new();
        let mut pending: HashMap<BlockKey, NamespaceId> = HashMap::new();
        let mut torn = false;
        match File::open(&path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                for r in bytes.chunks(RECORD_BYTES) {
                    let Some((op, ns, key)) = (r.len() == RECORD_BYTES).then(|| decode(r)).flatten() else {
                        // A torn tail (the process died mid-append); nothing
                        // after it was acknowledged.
                        torn = true;
                        break;
                    };
                    match op {
                        OP_DIRTY => {
                            if pending.insert(key, ns).is_none() {
                                order.push(key);
                            }
                        }
                        _ => {
                            pending.remove(&key);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        }
        if torn {
            tracing::warn!(path = %path.display(), "dirty log ends in a torn record; cut off");
        }
        let mut state = State::default();
        let mut dropped = 0;
        for key in order {
            let Some(&ns) = pending.get(&key) else { continue };
            if on_disk(&key) {
                state.pending.insert(
                    key,
                    Entry {
                        ns,
                        ready: true,
                        failures: 0,
                    },
                );
                state.queue.push_back(key);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(
                dropped,
                "dirty log named blocks that never reached the disk (never acknowledged)"
            );
        }
        let file = rewrite(&io, &path, &state)?;
        let resumed = state.pending.len() as u64;
        if resumed > 0 {
            tracing::info!(resumed, "resuming blob uploads from the dirty log");
        }
        Ok(Self {
            path,
            sync,
            io,
            log: Mutex::new(Log { file, records: resumed }),
            state: Mutex::new(state),
            idle: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
            uploaded: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            resumed: AtomicU64::new(resumed),
            dropped: AtomicU64::new(dropped),
            log_errors: AtomicU64::new(0),
            filter: parking_lot::RwLock::new(None),
            by_peers: AtomicU64::new(0),
            peer_checks: AtomicU64::new(0),
        })
    }

    fn append(&self, log: &mut Log, records: &[u8]) -> Result<()> {
        let r = self.io.append(&mut log.file, records).and_then(|()| {
            if self.sync {
                self.io.sync_data(&log.file)
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {
                log.records += (records.len() / RECORD_BYTES) as u64;
                Ok(())
            }
            Err(e) => {
                self.log_errors.fetch_add(1, Relaxed);
                Err(Error::io(format!("append to {}", self.path.display()), e))
            }
        }
    }

    /// Records that `key` is about to be written to disk. Must succeed
    /// before the write is acknowledged.
    pub(crate) fn begin(&self, ns: NamespaceId, key: BlockKey) -> Result<()> {
        let mut st = self.state.lock();
        if st.pending.contains_key(&key) {
            return Ok(());
        }
        self.append(&mut self.log.lock(), &encode(OP_DIRTY, ns, key))?;
        st.pending.insert(
            key,
            Entry {
                ns,
                ready: false,
                failures: 0,
            },
        );
        Ok(())
    }

    /// The block is on disk: queue its upload. Logs it first if it is not
    /// pending (a concurrent store of the same key gave up on it).
    pub(crate) fn ready(&self, ns: NamespaceId, key: BlockKey) -> Result<()> {
        let mut st = self.state.lock();
        match st.pending.get_mut(&key) {
            Some(e) if e.ready => return Ok(()),
            Some(e) => e.ready = true,
            None => {
                self.append(&mut self.log.lock(), &encode(OP_DIRTY, ns, key))?;
                st.pending.insert(
                    key,
                    Entry {
                        ns,
                        ready: true,
                        failures: 0,
                    },
                );
            }
        }
        st.queue.push_back(key);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// The disk write of a block begun failed: it is not pending.
    pub(crate) fn abort(&self, key: BlockKey) {
        self.finish(key);
    }

    /// The block will not be uploaded (its disk write failed, or it was
    /// removed). Answers whether it was pending.
    pub(crate) fn cancel(&self, key: BlockKey) -> bool {
        let was = self.finish(key);
        if was {
            self.dropped.fetch_add(1, Relaxed);
        }
        was
    }

    /// Takes `key` off the pending set and logs it done.
    fn finish(&self, key: BlockKey) -> bool {
        let mut st = self.state.lock();
        let Some(e) = st.pending.remove(&key) else {
            return false;
        };
        // A failed append is harmless: the block is uploaded again after a
        // restart, and the conditional create finds it present.
        let mut log = self.log.lock();
        let _ = self.append(&mut log, &encode(OP_DONE, e.ns, key));
        if log.records > 4096 && log.records > 4 * st.pending.len() as u64 {
            match rewrite(&self.io, &self.path, &st) {
                Ok(f) => {
                    log.file = f;
                    log.records = st.pending.len() as u64;
                }
                Err(e) => tracing::warn!("could not compact the dirty log: {e}"),
            }
        }
        drop(log);
        if st.pending.is_empty() {
            self.idle.notify_all();
        }
        true
    }

    /// Whether the disk must keep `key` (it is pending).
    pub(crate) fn retains(&self, key: &BlockKey) -> bool {
        self.state.lock().pending.contains_key(key)
    }

    fn pop(&self) -> Option<(BlockKey, NamespaceId, u32)> {
        let mut st = self.state.lock();
        while let Some(k) = st.queue.pop_front() {
            if let Some(e) = st.pending.get(&k) {
                return Some((k, e.ns, e.failures));
            }
        }
        None
    }

    fn failed(&self, key: BlockKey) {
        self.failures.fetch_add(1, Relaxed);
        if let Some(e) = self.state.lock().pending.get_mut(&key) {
            e.failures = e.failures.saturating_add(1);
        }
    }

    fn requeue(&self, key: BlockKey) {
        let mut st = self.state.lock();
        if st.pending.contains_key(&key) {
            st.queue.push_back(key);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Waits until nothing is pending; false if `timeout` passed first.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.pending.is_empty() {
            if self.idle.wait_until(&mut st, deadline).timed_out() {
                return st.pending.is_empty();
            }
        }
        true
    }

    pub(crate) fn stats(&self) -> WritebackStats {
        WritebackStats {
            pending_blocks: self.state.lock().pending.len() as u64,
            uploaded_blocks: self.uploaded.load(Relaxed),
            upload_failures: self.failures.load(Relaxed),
            resumed_blocks: self.resumed.load(Relaxed),
            dropped_blocks: self.dropped.load(Relaxed),
            log_errors: self.log_errors.load(Relaxed),
            uploaded_by_peers: self.by_peers.load(Relaxed),
            peer_checks: self.peer_checks.load(Relaxed),
        }
    }

    /// Sets (or replaces) the uploader filter.
    pub(crate) fn set_filter(&self, f: UploadFilter) {
        *self.filter.write() = Some(f);
    }

    fn mine(&self, ns: NamespaceId, key: &BlockKey) -> bool {
        self.filter.read().as_ref().is_none_or(|f| f(ns, key))
    }

    /// Counts a check of blob for a key another replica uploads.
    fn checked(&self, key: BlockKey) {
        self.peer_checks.fetch_add(1, Relaxed);
        if let Some(e) = self.state.lock().pending.get_mut(&key) {
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// Stops the uploader (pending blocks stay in the log).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Relaxed);
        self.wake.notify_waiters();
        self.wake.notify_one();
    }
}

/// Writes the pending blocks as a new log and swaps it in durably.
fn rewrite(io: &FileIo, path: &Path, st: &State) -> Result<File> {
    let mut buf = Vec::with_capacity(st.pending.len() * RECORD_BYTES);
    // Queue order first, so uploads resume oldest first.
    let mut seen = std::collections::HashSet::new();
    for k in st.queue.iter().chain(st.pending.keys()) {
        if let Some(e) = st.pending.get(k)
            && seen.insert(*k)
        {
            buf.extend_from_slice(&encode(OP_DIRTY, e.ns, *k));
        }
    }
    io.replace_durably(path, &buf)?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// Uploads pending blocks until [`Writeback::stop`].
pub(crate) async fn upload_loop(wb: Arc<Writeback>, disk: DiskTier, blob: BlobClient, events: Arc<EventLog>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(blob.upload_concurrency()));
    let (min_backoff, max_backoff) = blob.backoff();
    loop {
        let notified = wb.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if wb.stopped.load(Relaxed) {
            return;
        }
        let Some((key, ns, failures)) = wb.pop() else {
            notified.await;
            continue;
        };
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        if blob.known_present(&key) {
            // Read from blob earlier (a promoted block demoted again): no
            // request needed.
            wb.uploaded.fetch_add(1, Relaxed);
            wb.finish(key);
            events.record(ns, Change::Stored, TierKind::Blob, &[key]);
            continue;
        }
        let (wb, disk, blob, events) = (wb.clone(), disk.clone(), blob.clone(), events.clone());
        tokio::spawn(async move {
            let backoff = |failures: u32| min_backoff.saturating_mul(1u32 << failures.min(16)).min(max_backoff);
            if !wb.mine(ns, &key) {
                // Another replica uploads it: wait, then look for it.
                drop(permit);
                tokio::time::sleep(backoff(failures)).await;
                match blob.exists(ns, key).await {
                    Ok(true) => {
                        wb.by_peers.fetch_add(1, Relaxed);
                        wb.finish(key);
                        events.record(ns, Change::Stored, TierKind::Blob, &[key]);
                    }
                    Ok(false) | Err(_) => {
                        wb.checked(key);
                        wb.requeue(key);
                    }
                }
                return;
            }
            let read = tokio::task::spawn_blocking(move || read_block(&disk, ns, key)).await;
            let body = match read {
                Ok(Ok(b)) => b,
                Ok(Err(why)) => {
                    tracing::warn!(%key, "pending blob upload dropped: {why}");
                    wb.cancel(key);
                    return;
                }
                Err(e) => {
                    tracing::error!(%key, "reading a pending block panicked: {e}");
                    wb.failed(key);
                    wb.requeue(key);
                    return;
                }
            };
            match blob.put(ns, key, body).await {
                Ok(_) => {
                    wb.uploaded.fetch_add(1, Relaxed);
                    wb.finish(key);
                    events.record(ns, Change::Stored, TierKind::Blob, &[key]);
                    drop(permit);
                }
                Err(e) => {
                    wb.failed(key);
                    drop(permit);
                    let wait = backoff(failures);
                    tracing::debug!(%key, "blob upload failed, next try in {wait:?}: {e}");
                    tokio::time::sleep(wait).await;
                    wb.requeue(key);
                }
            }
        });
    }
}

/// A pending block's bytes, with room for the object header in front.
fn read_block(disk: &DiskTier, ns: NamespaceId, key: BlockKey) -> std::result::Result<Vec<u8>, String> {
    let pin = disk.pin(&key).ok_or("not on disk (removed)")?;
    if pin.namespace() != ns {
        return Err(format!(
            "on disk under namespace {}, logged under {ns}",
            pin.namespace()
        ));
    }
    let mut body = vec![0u8; OBJECT_OVERHEAD_BYTES + pin.len()];
    pin.read_into(&mut body[OBJECT_OVERHEAD_BYTES..])
        .map_err(|e| format!("unreadable on disk: {e}"))?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn log_replays_pending_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceId(5);
        {
            let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
            for k in 1..=4u128 {
                wb.begin(ns, BlockKey(k)).unwrap();
                wb.ready(ns, BlockKey(k)).unwrap();
            }
            assert!(wb.finish(BlockKey(2)));
            assert!(wb.cancel(BlockKey(3)));
            assert!(wb.retains(&BlockKey(1)));
            assert!(!wb.retains(&BlockKey(2)));
        }
        // A torn record at the end: cut off, the rest replays.
        let mut f = OpenOptions::new().append(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.write_all(&encode(OP_DIRTY, ns, BlockKey(9))[..30]).unwrap();
        drop(f);
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        let mut got = Vec::new();
        while let Some((k, n, _)) = wb.pop() {
            assert_eq!(n, ns);
            got.push(k.0);
        }
        assert_eq!(got, vec![1, 4]);
        assert_eq!(wb.stats().resumed_blocks, 2);
        // Rewritten on open: exactly the pending records remain.
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert_eq!(len, 2 * RECORD_BYTES as u64);
    }

    #[test]
    fn a_failed_log_rewrite_keeps_the_old_log_and_a_failed_append_is_not_acknowledged() {
        use crate::fsio::{Faults, FileOp};
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceId(5);
        let faults = Faults::new();
        let io = FileIo::with_faults(faults.clone());
        {
            let wb = Writeback::open_with(dir.path(), true, io.clone(), |_| true).unwrap();
            wb.begin(ns, BlockKey(1)).unwrap();
            wb.ready(ns, BlockKey(1)).unwrap();
            // A dirty record whose append fails is not acknowledged.
            faults.fail_nth(FileOp::Write, 1);
            assert!(wb.begin(ns, BlockKey(2)).is_err());
            assert_eq!(wb.stats().log_errors, 1);
        }
        let before = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        // Opening rewrites the log: a failed rename or fsync fails the open
        // and leaves the old log whole, so nothing pending is lost.
        for op in [FileOp::Rename, FileOp::Fsync] {
            faults.fail_nth(op, 1);
            let e = Writeback::open_with(dir.path(), true, io.clone(), |_| true).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Io, "{op:?}: {e}");
            assert_eq!(std::fs::read(dir.path().join(LOG_FILE)).unwrap(), before, "{op:?}");
        }
        let wb = Writeback::open_with(dir.path(), true, io, |_| true).unwrap();
        assert_eq!(wb.pop().map(|p| p.0), Some(BlockKey(1)));
        assert_eq!(wb.pop(), None, "the refused block 2 is not pending");
    }

    #[test]
    fn replay_drops_blocks_that_never_reached_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceId(5);
        {
            let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
            wb.begin(ns, BlockKey(1)).unwrap();
            wb.begin(ns, BlockKey(2)).unwrap();
        }
        let wb = Writeback::open(dir.path(), false, |k| k.0 == 2).unwrap();
        assert_eq!(wb.pop().map(|p| p.0), Some(BlockKey(2)));
        assert_eq!(wb.pop(), None);
        assert_eq!(wb.stats().dropped_blocks, 1);
    }

    #[test]
    fn a_corrupt_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceId(5);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&encode(OP_DIRTY, ns, BlockKey(1)));
        let mut bad = encode(OP_DIRTY, ns, BlockKey(2));
        bad[10] ^= 1;
        bytes.extend_from_slice(&bad);
        bytes.extend_from_slice(&encode(OP_DIRTY, ns, BlockKey(3)));
        std::fs::write(dir.path().join(LOG_FILE), bytes).unwrap();
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        assert_eq!(wb.pop().map(|p| p.0), Some(BlockKey(1)));
        assert_eq!(wb.pop(), None);
    }

    #[test]
    fn compaction_keeps_only_pending() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceId(1);
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        for k in 0..5000u128 {
            wb.begin(ns, BlockKey(k)).unwrap();
            wb.ready(ns, BlockKey(k)).unwrap();
            if k % 100 != 0 {
                wb.finish(BlockKey(k));
            }
        }
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(len < 4096 * RECORD_BYTES as u64, "log not compacted: {len} bytes");
        drop(wb);
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        assert_eq!(wb.stats().pending_blocks, 50);
        assert!(!wb.wait_idle(Duration::from_millis(1)));
    }
}
