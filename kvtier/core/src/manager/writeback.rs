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
//! others keep the key pending until they hear that it landed
//! ([`crate::replication::landed`]): the uploader reports each key it
//! settles ([`Writeback::take_notices`]), the server tells the other
//! replicas, and theirs drop the key without a request
//! ([`Writeback::landed_by_peer`]). A replica that hears nothing within a
//! bound (`check_after`) checks blob itself, once (one HEAD), and again
//! only after twice as long each time: present means the uploader did its
//! job; absent, it asks the filter again, which answers yes once the
//! uploader is down ([`Writeback::reconsider`] asks at once when a member
//! goes down). An uploader that gives up a key (its copy is gone) says so,
//! and the next replica uploads it ([`Writeback::take_over`]). A key is
//! dropped here only once it is known to be in blob, so it goes to blob
//! once whatever R is, and is not lost with its uploader.

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, Result};
use crate::events::{Change, EventLog};
use crate::fsio::FileIo;
use crate::replication::landed::{Notice, Outcome, Waits};
use crate::tier::blob::BlobClient;
use crate::tier::blob::object::OBJECT_OVERHEAD_BYTES;
use crate::tier::disk::DiskTier;
use crate::tier::{Tier, TierKind};

/// Whether this node uploads `key` of a namespace (false: another replica
/// does).
pub type UploadFilter = Arc<dyn Fn(NamespaceId, &BlockKey) -> bool + Send + Sync>;

/// How long a replica that does not upload a key waits to hear that it
/// landed before it checks blob, unless set otherwise.
pub const DEFAULT_CHECK_AFTER: Duration = Duration::from_secs(10);

/// Notices kept for the server at most; more are dropped (and counted):
/// the other replicas then check blob after their bound.
const MAX_NOTICES: usize = 1 << 16;

/// Checks of blob for peers' keys in flight at most.
const CHECKS_IN_FLIGHT: usize = 16;

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
    /// Pending blocks another replica uploaded, found in blob by a check.
    pub uploaded_by_peers: u64,
    /// Checks of blob (HEADs) for blocks another replica uploads: made only
    /// when no notice came within the bound.
    pub peer_checks: u64,
    /// Pending blocks dropped because their uploader said they landed in
    /// blob: no request made.
    pub confirmed_by_peers: u64,
    /// Blocks this node uploads because their uploader gave them up.
    pub taken_over: u64,
    /// Notices for other replicas dropped because too many were waiting
    /// for the server (those replicas check blob after their bound).
    pub notices_dropped: u64,
}

#[derive(Debug)]
struct Entry {
    ns: NamespaceId,
    /// On disk and queued (or uploading, or waiting for its uploader).
    ready: bool,
    failures: u32,
    /// Checks of blob that found it absent, while another replica uploads.
    checks: u32,
    /// Its uploader said it landed before it was on disk here.
    landed: bool,
    /// Its uploader gave it up: this node uploads it whatever the filter.
    take_over: bool,
}

impl Entry {
    fn new(ns: NamespaceId, ready: bool) -> Self {
        Self {
            ns,
            ready,
            failures: 0,
            checks: 0,
            landed: false,
            take_over: false,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<BlockKey, Entry>,
    queue: VecDeque<BlockKey>,
    /// Ready keys another replica uploads, until they are heard of.
    waits: Waits,
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
    /// Milliseconds a replica waits to hear of a key before checking blob.
    check_after_ms: AtomicU64,
    /// Wakes the check loop when a check falls due earlier.
    check_wake: tokio::sync::Notify,
    /// What this node's uploads settled, for the server to tell the other
    /// replicas (collected only once the server asks for them).
    notices: Mutex<Vec<Notice>>,
    collect_notices: AtomicBool,
    notices_dropped: AtomicU64,
    confirmed: AtomicU64,
    taken_over: AtomicU64,
    events: std::sync::OnceLock<Arc<EventLog>>,
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
                state.pending.insert(key, Entry::new(ns, true));
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
            check_after_ms: AtomicU64::new(DEFAULT_CHECK_AFTER.as_millis() as u64),
            check_wake: tokio::sync::Notify::new(),
            notices: Mutex::new(Vec::new()),
            collect_notices: AtomicBool::new(false),
            notices_dropped: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
            events: std::sync::OnceLock::new(),
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
        st.pending.insert(key, Entry::new(ns, false));
        Ok(())
    }

    /// The block is on disk: queue its upload. Logs it first if it is not
    /// pending (a concurrent store of the same key gave up on it).
    pub(crate) fn ready(&self, ns: NamespaceId, key: BlockKey) -> Result<()> {
        let mut st = self.state.lock();
        match st.pending.get(&key).map(|e| (e.ready, e.landed)) {
            Some((true, _)) => return Ok(()),
            Some((false, true)) => {
                // Its uploader said it landed while it was on its way here.
                drop(st);
                self.settled_by_peer(ns, key);
                return Ok(());
            }
            Some((false, false)) => st.pending.get_mut(&key).expect("present").ready = true,
            None => {
                self.append(&mut self.log.lock(), &encode(OP_DIRTY, ns, key))?;
                st.pending.insert(key, Entry::new(ns, true));
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
        self.finish_counted(key, None)
    }

    /// [`Writeback::finish`], adding one to `counter` if `key` was pending,
    /// before anyone waiting for the pending set to drain is woken (so
    /// they see it counted).
    fn finish_counted(&self, key: BlockKey, counter: Option<&AtomicU64>) -> bool {
        let mut st = self.state.lock();
        let Some(e) = st.pending.remove(&key) else {
            return false;
        };
        if let Some(c) = counter {
            c.fetch_add(1, Relaxed);
        }
        st.waits.remove(&key);
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

    /// The next key to upload: its namespace, failed uploads, and whether
    /// this node took it over from an uploader that gave it up.
    fn pop(&self) -> Option<(BlockKey, NamespaceId, u32, bool)> {
        let mut st = self.state.lock();
        while let Some(k) = st.queue.pop_front() {
            if let Some(e) = st.pending.get(&k)
                && !st.waits.contains(&k)
            {
                return Some((k, e.ns, e.failures, e.take_over));
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
            st.waits.remove(&key);
            st.queue.push_back(key);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Waits for another replica to upload `key`: its check of blob falls
    /// due `check_after` from now, doubled per check made (`checks`).
    fn wait_for_peer(&self, key: BlockKey, checks: Option<u32>) {
        let first = self.check_after();
        let mut st = self.state.lock();
        let Some(e) = st.pending.get_mut(&key) else { return };
        if let Some(c) = checks {
            e.checks = c;
        }
        let c = e.checks;
        st.waits.wait(key, Instant::now(), first, c);
        drop(st);
        // The check loop sleeps until the earliest due time, which this
        // wait may precede (the others may be long-delayed ones).
        self.check_wake.notify_one();
    }

    /// Up to `max` keys whose check of blob is due, with their namespace
    /// and the checks made so far.
    fn take_due(&self, max: usize) -> Vec<(BlockKey, NamespaceId, u32)> {
        let mut st = self.state.lock();
        let due = st.waits.take_due(Instant::now(), max);
        due.into_iter()
            .filter_map(|(k, c)| st.pending.get(&k).map(|e| (k, e.ns, c)))
            .collect()
    }

    fn next_due(&self) -> Option<Instant> {
        self.state.lock().waits.next_due()
    }

    fn taken_over(&self, key: &BlockKey) -> bool {
        self.state.lock().pending.get(key).is_some_and(|e| e.take_over)
    }

    /// `key` is in blob (uploaded or found): takes it off the pending set,
    /// records the event, and reports it for the other replicas. Answers
    /// whether it was pending.
    fn landed(&self, ns: NamespaceId, key: BlockKey, counter: Option<&AtomicU64>) -> bool {
        let was = self.finish_counted(key, counter);
        if was && let Some(ev) = self.events.get() {
            ev.record(ns, Change::Stored, TierKind::Blob, &[key]);
        }
        self.notice(ns, key, Outcome::Landed);
        was
    }

    /// Takes a key that another replica said landed off the pending set.
    fn settled_by_peer(&self, ns: NamespaceId, key: BlockKey) -> bool {
        let was = self.finish_counted(key, Some(&self.confirmed));
        if was && let Some(ev) = self.events.get() {
            ev.record(ns, Change::Stored, TierKind::Blob, &[key]);
        }
        was
    }

    /// Reports `key`'s outcome for the other replicas, if the server
    /// collects them.
    fn notice(&self, ns: NamespaceId, key: BlockKey, outcome: Outcome) {
        if !self.collect_notices.load(Relaxed) {
            return;
        }
        let mut n = self.notices.lock();
        if n.len() >= MAX_NOTICES {
            self.notices_dropped.fetch_add(1, Relaxed);
            return;
        }
        n.push(Notice { ns, key, outcome });
    }

    /// Starts collecting notices of what this node's uploads settled, for
    /// [`Writeback::take_notices`]. Without it none are kept.
    pub(crate) fn collect_notices(&self) {
        self.collect_notices.store(true, Relaxed);
    }

    /// Takes up to `max` notices, oldest first.
    pub(crate) fn take_notices(&self, max: usize) -> Vec<Notice> {
        let mut n = self.notices.lock();
        let k = n.len().min(max);
        n.drain(..k).collect()
    }

    /// Another replica says `keys` of `ns` landed in blob: each pending here
    /// is dropped (once on disk: one still being written is dropped when
    /// it gets there). Answers how many were dropped now.
    pub(crate) fn landed_by_peer(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        let mut n = 0;
        for &key in keys {
            let ready = {
                let mut st = self.state.lock();
                match st.pending.get_mut(&key) {
                    Some(e) if e.ns == ns && !e.ready => {
                        e.landed = true;
                        false
                    }
                    Some(e) => e.ns == ns,
                    None => false,
                }
            };
            if ready && self.settled_by_peer(ns, key) {
                n += 1;
            }
        }
        n
    }

    /// Their uploader gave up `keys` of `ns`, and this node uploads them
    /// (the server decided, [`crate::replication::landed::takes_over`]):
    /// they go to the upload queue whatever the filter says. Answers how
    /// many were pending here.
    pub(crate) fn take_over(&self, ns: NamespaceId, keys: &[BlockKey]) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        for &key in keys {
            let Some(e) = st.pending.get_mut(&key) else { continue };
            if e.ns != ns || e.take_over {
                continue;
            }
            e.take_over = true;
            n += 1;
            if st.waits.remove(&key).is_some() {
                st.queue.push_back(key);
            }
        }
        drop(st);
        self.taken_over.fetch_add(n as u64, Relaxed);
        if n > 0 {
            self.wake.notify_one();
        }
        n
    }

    /// Asks the filter again for every key waiting for another replica:
    /// those this node uploads now (their uploader went down) are checked
    /// at once rather than at their due time. Answers how many.
    pub(crate) fn reconsider(&self) -> usize {
        let waiting: Vec<(BlockKey, NamespaceId)> = {
            let st = self.state.lock();
            st.waits
                .keys()
                .filter_map(|k| st.pending.get(k).map(|e| (*k, e.ns)))
                .collect()
        };
        // The filter takes the cluster's locks: not under the state lock.
        let mine: Vec<BlockKey> = waiting
            .into_iter()
            .filter(|(k, ns)| self.mine(*ns, k))
            .map(|(k, _)| k)
            .collect();
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut n = 0;
        for k in mine {
            let Some(checks) = st.pending.get(&k).map(|e| e.checks) else {
                continue;
            };
            if st.waits.contains(&k) {
                st.waits.due_at(k, now, checks);
                n += 1;
            }
        }
        drop(st);
        if n > 0 {
            self.check_wake.notify_one();
        }
        n
    }

    /// Sets how long a replica waits to hear of a key before checking blob.
    pub(crate) fn set_check_after(&self, d: Duration) {
        self.check_after_ms.store(d.as_millis().max(1) as u64, Relaxed);
    }

    fn check_after(&self) -> Duration {
        Duration::from_millis(self.check_after_ms.load(Relaxed))
    }

    /// Where landings found here (not through [`Writeback::landed_by_peer`]'s
    /// caller) are recorded.
    pub(crate) fn set_events(&self, events: Arc<EventLog>) {
        let _ = self.events.set(events);
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
            confirmed_by_peers: self.confirmed.load(Relaxed),
            taken_over: self.taken_over.load(Relaxed),
            notices_dropped: self.notices_dropped.load(Relaxed),
        }
    }

    /// Sets (or replaces) the uploader filter.
    pub(crate) fn set_filter(&self, f: UploadFilter) {
        *self.filter.write() = Some(f);
    }

    fn mine(&self, ns: NamespaceId, key: &BlockKey) -> bool {
        self.filter.read().as_ref().is_none_or(|f| f(ns, key))
    }

    /// Stops the uploader and the checks (pending blocks stay in the log).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Relaxed);
        self.wake.notify_waiters();
        self.wake.notify_one();
        self.check_wake.notify_waiters();
        self.check_wake.notify_one();
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

/// Uploads pending blocks until [`Writeback::stop`]. Keys another replica
/// uploads wait for [`check_loop`] (or a notice) instead.
pub(crate) async fn upload_loop(wb: Arc<Writeback>, disk: DiskTier, blob: BlobClient) {
    let slots = Arc::new(tokio::sync::Semaphore::new(blob.upload_concurrency()));
    let (min_backoff, max_backoff) = blob.backoff();
    loop {
        let notified = wb.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if wb.stopped.load(Relaxed) {
            return;
        }
        let Some((key, ns, failures, taken_over)) = wb.pop() else {
            notified.await;
            continue;
        };
        if blob.known_present(&key) {
            // Read from blob earlier (a promoted block demoted again): no
            // request needed.
            wb.uploaded.fetch_add(1, Relaxed);
            wb.landed(ns, key, None);
            continue;
        }
        if !taken_over && !wb.mine(ns, &key) {
            // Another replica uploads it: wait to hear that it landed.
            wb.wait_for_peer(key, None);
            continue;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (wb, disk, blob) = (wb.clone(), disk.clone(), blob.clone());
        tokio::spawn(async move {
            let backoff = |failures: u32| min_backoff.saturating_mul(1u32 << failures.min(16)).min(max_backoff);
            let read = tokio::task::spawn_blocking(move || read_block(&disk, ns, key)).await;
            let body = match read {
                Ok(Ok(b)) => b,
                Ok(Err(why)) => {
                    tracing::warn!(%key, "pending blob upload dropped: {why}");
                    if wb.cancel(key) {
                        // The other replicas still hold it: the next one
                        // uploads it.
                        wb.notice(ns, key, Outcome::GaveUp);
                    }
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
                    wb.landed(ns, key, None);
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

/// Checks blob for keys another replica uploads once no notice came within
/// their bound, until [`Writeback::stop`]. Present: the key is done here
/// (and the others hear of it). Absent: this node uploads it if the filter
/// says so now (its uploader is down), else it waits twice as long.
pub(crate) async fn check_loop(wb: Arc<Writeback>, blob: BlobClient) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CHECKS_IN_FLIGHT));
    loop {
        let notified = wb.check_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if wb.stopped.load(Relaxed) {
            return;
        }
        let due = wb.take_due(CHECKS_IN_FLIGHT);
        if due.is_empty() {
            match wb.next_due() {
                Some(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t.into()) => {}
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
            continue;
        }
        for (key, ns, checks) in due {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let (wb, blob) = (wb.clone(), blob.clone());
            tokio::spawn(async move {
                wb.peer_checks.fetch_add(1, Relaxed);
                let found = blob.exists(ns, key).await;
                drop(permit);
                match found {
                    Ok(true) => {
                        wb.landed(ns, key, Some(&wb.by_peers));
                    }
                    Ok(false) | Err(_) => {
                        if wb.taken_over(&key) || wb.mine(ns, &key) {
                            // Its uploader is gone (or gave it up): upload
                            // it (a conditional create, harmless if it
                            // landed meanwhile).
                            wb.requeue(key);
                        } else {
                            wb.wait_for_peer(key, Some(checks.saturating_add(1)));
                        }
                    }
                }
            });
        }
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
        while let Some((k, n, _, _)) = wb.pop() {
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

    /// A writeback whose filter gives this node no key (another replica
    /// uploads every one), with keys 1..=n ready and waiting for it as the
    /// upload loop leaves them.
    fn waiting(dir: &Path, n: u128, mine: Arc<AtomicBool>) -> Writeback {
        let wb = Writeback::open(dir, false, |_| true).unwrap();
        wb.set_filter(Arc::new(move |_, _| mine.load(Relaxed)));
        wb.collect_notices();
        for k in 1..=n {
            wb.begin(NS, BlockKey(k)).unwrap();
            wb.ready(NS, BlockKey(k)).unwrap();
        }
        while let Some((k, ns, _, taken)) = wb.pop() {
            assert!(!taken && !wb.mine(ns, &k));
            wb.wait_for_peer(k, None);
        }
        wb
    }

    const NS: NamespaceId = NamespaceId(5);

    #[test]
    fn a_key_another_replica_uploads_waits_until_a_notice_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let wb = waiting(dir.path(), 3, Arc::new(AtomicBool::new(false)));
        assert_eq!(wb.stats().pending_blocks, 3);
        assert!(wb.next_due().unwrap() > Instant::now() + DEFAULT_CHECK_AFTER / 2);
        assert!(wb.take_due(10).is_empty(), "no check of blob before the bound");
        // A notice for another namespace changes nothing.
        assert_eq!(wb.landed_by_peer(NamespaceId(6), &[BlockKey(1)]), 0);
        assert_eq!(wb.landed_by_peer(NS, &[BlockKey(1), BlockKey(2), BlockKey(9)]), 2);
        assert_eq!(wb.landed_by_peer(NS, &[BlockKey(1)]), 0, "once");
        let s = wb.stats();
        assert_eq!((s.pending_blocks, s.confirmed_by_peers, s.peer_checks), (1, 2, 0));
        assert!(!wb.retains(&BlockKey(1)) && wb.retains(&BlockKey(3)));
        // Only the unheard-of key comes due, and only after the bound.
        wb.set_check_after(Duration::from_millis(1));
        wb.wait_for_peer(BlockKey(3), None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(wb.take_due(10), vec![(BlockKey(3), NS, 0)]);
        // A non-uploader reports nothing: only landings it finds itself.
        assert!(wb.take_notices(10).is_empty());
        assert!(wb.landed(NS, BlockKey(3), None));
        assert_eq!(
            wb.take_notices(10),
            vec![Notice {
                ns: NS,
                key: BlockKey(3),
                outcome: Outcome::Landed
            }]
        );
        assert!(wb.wait_idle(Duration::from_millis(1)));
        // The dirty log replays nothing.
        drop(wb);
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        assert_eq!(wb.stats().resumed_blocks, 0);
    }

    #[test]
    fn a_notice_that_beats_the_disk_write_drops_the_key_once_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        wb.begin(NS, BlockKey(1)).unwrap();
        assert_eq!(wb.landed_by_peer(NS, &[BlockKey(1)]), 0, "not on disk yet");
        assert!(wb.retains(&BlockKey(1)), "still pending: its write may fail");
        wb.ready(NS, BlockKey(1)).unwrap();
        assert!(!wb.retains(&BlockKey(1)));
        assert_eq!(wb.pop(), None, "never queued");
        assert_eq!(wb.stats().confirmed_by_peers, 1);
        // A notice for a key never logged here is ignored.
        assert_eq!(wb.landed_by_peer(NS, &[BlockKey(2)]), 0);
        wb.begin(NS, BlockKey(2)).unwrap();
        wb.ready(NS, BlockKey(2)).unwrap();
        assert_eq!(wb.pop().map(|p| p.0), Some(BlockKey(2)));
    }

    #[test]
    fn a_key_its_uploader_gave_up_is_uploaded_here_whatever_the_filter() {
        let dir = tempfile::tempdir().unwrap();
        let wb = waiting(dir.path(), 2, Arc::new(AtomicBool::new(false)));
        assert_eq!(wb.take_over(NamespaceId(6), &[BlockKey(1)]), 0, "other namespace");
        assert_eq!(wb.take_over(NS, &[BlockKey(1), BlockKey(7)]), 1);
        assert_eq!(wb.take_over(NS, &[BlockKey(1)]), 0, "once");
        assert_eq!(wb.pop(), Some((BlockKey(1), NS, 0, true)));
        assert_eq!(wb.pop(), None, "key 2 still waits");
        assert!(wb.taken_over(&BlockKey(1)));
        // Giving up a key this node uploads reports it for the others.
        assert!(wb.cancel(BlockKey(1)));
        wb.notice(NS, BlockKey(1), Outcome::GaveUp);
        assert_eq!(wb.take_notices(10)[0].outcome, Outcome::GaveUp);
        assert_eq!(wb.stats().taken_over, 1);
    }

    #[test]
    fn keys_whose_uploader_went_down_are_checked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Arc::new(AtomicBool::new(false));
        let wb = waiting(dir.path(), 3, mine.clone());
        assert_eq!(wb.reconsider(), 0, "the uploader is up");
        assert!(wb.take_due(10).is_empty());
        mine.store(true, Relaxed);
        assert_eq!(wb.reconsider(), 3);
        let mut due = wb.take_due(10);
        due.sort_by_key(|d| d.0.0);
        assert_eq!(due.len(), 3, "checked now, not at the bound");
        assert_eq!(due[0], (BlockKey(1), NS, 0));
    }

    #[test]
    fn notices_are_kept_only_when_collected_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let wb = Writeback::open(dir.path(), false, |_| true).unwrap();
        wb.notice(NS, BlockKey(1), Outcome::Landed);
        assert!(wb.take_notices(10).is_empty(), "not collected");
        wb.collect_notices();
        for k in 0..MAX_NOTICES as u128 + 5 {
            wb.notice(NS, BlockKey(k), Outcome::Landed);
        }
        assert_eq!(wb.stats().notices_dropped, 5);
        assert_eq!(
            wb.take_notices(3).iter().map(|n| n.key.0).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(wb.take_notices(usize::MAX).len(), MAX_NOTICES - 3);
    }
}
