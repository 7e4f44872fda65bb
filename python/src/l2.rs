//! kvtier as the second level (L2) of LMCache's multiprocess server: the
//! object LMCache's `native_plugin` L2 adapter loads (`kvtier.lmcache.KvTierL2`).
//!
//! LMCache's adapter calls `submit_batch_{set,get,exists,delete}(keys, bufs)`
//! under its lock and expects them not to block: each returns a future id at
//! once, the batch runs on this object's own threads (the interpreter not
//! held), and its completion is queued and signalled on an eventfd that the
//! adapter polls; `drain_completions()` resets the eventfd and hands over
//! `(future_id, ok, error, per_key)` tuples.
//!
//! Keys are LMCache's object keys, `model@{kv_rank:08x}@{group:x}@{hash}`
//! plus `@{salt}`. Model, KV rank, group and salt name the kvtier namespace
//! (so another model, rank, group or tenant never matches); the chunk hash is
//! the block key within it. An object is stored as one kvtier block of
//! `chunk_bytes` plus a 16-byte header (magic, version, the object's length):
//! LMCache's last, shorter chunk of a prompt is padded, and read back only
//! into a buffer of its own length.
//!
//! `remote` builds on this object for in-process LMCache's `RemoteConnector`
//! plugin: keys it can list back, and loads of objects of unknown length.

mod remote;

pub(crate) use remote::LmcacheRemote;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use kvtier::{BlockKey, BlockManager, ManagerConfig, Namespace, NamespaceId};
use kvtier_client::{Client as RpcClient, ClientConfig, SharedRegion};

use crate::{Buffer, InvalidArgumentError, KvTierError, err, to_json};

const MAGIC: &[u8; 4] = b"KVL2";
const VERSION: u32 = 1;
/// Magic, version, object length.
const HEADER_BYTES: usize = 16;
/// Bytes one store call carries at most: a batch of large chunks is stored
/// a few at a time, so a batch of hundreds never needs its whole size at once.
const MAX_CALL_BYTES: usize = 64 << 20;

/// Where the blocks go.
enum Backend {
    Embedded(BlockManager),
    /// A kvtierd, through a client on its own runtime.
    Daemon(Box<Daemon>),
}

struct Daemon {
    rt: tokio::runtime::Runtime,
    client: RpcClient,
    /// Shared-memory regions for the bytes, when kvtierd is on this host
    /// and takes them; None: the bytes go over the socket.
    regions: Option<RegionPool>,
}

/// Shared-memory regions registered with the local kvtierd, one in use per
/// batch running: block bytes move through their pages (one copy each way,
/// between LMCache's buffer and the region) and only keys cross the socket.
struct RegionPool {
    dir: std::path::PathBuf,
    slot_bytes: usize,
    max_slots: usize,
    state: Mutex<Slots>,
    freed: parking_lot::Condvar,
    /// The daemon refused a region (another host, another shm_dir, regions
    /// off): streams from then on.
    refused: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Slots {
    free: Vec<Slot>,
    made: usize,
}

struct Slot {
    mem: SharedRegion,
    /// Its id with the daemon, once registered. Region ids of a daemon
    /// start at a random number, so an id from before a daemon restart
    /// names no region of the new one (the request fails, and the region
    /// is registered again) rather than another client's.
    id: Option<u64>,
}

impl RegionPool {
    /// A free region of at least `len` bytes; None when regions are off or
    /// `len` does not fit one.
    fn take(&self, len: usize) -> Option<Slot> {
        if len > self.slot_bytes || self.refused.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = self.state.lock();
        loop {
            if let Some(s) = st.free.pop() {
                return Some(s);
            }
            if st.made < self.max_slots {
                st.made += 1;
                drop(st);
                match SharedRegion::create(&self.dir, self.slot_bytes) {
                    Ok(mem) => return Some(Slot { mem, id: None }),
                    Err(e) => {
                        self.refuse(format!("could not create a region in {}: {e}", self.dir.display()));
                        self.state.lock().made -= 1;
                        return None;
                    }
                }
            }
            self.freed.wait(&mut st);
        }
    }

    fn give(&self, slot: Slot) {
        self.state.lock().free.push(slot);
        self.freed.notify_one();
    }

    fn refuse(&self, why: String) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            py_warn(&format!(
                "kvtier L2: {why}; block bytes go over the socket instead of shared memory"
            ));
        }
    }
}

/// A warning on Python's `logging` (logger `kvtier.lmcache`), where an
/// LMCache operator looks.
fn py_warn(msg: &str) {
    Python::attach(|py| {
        let r = py
            .import("logging")
            .and_then(|l| l.call_method1("getLogger", ("kvtier.lmcache",)))
            .and_then(|l| l.call_method1("warning", (msg,)));
        if r.is_err() {
            eprintln!("{msg}");
        }
    });
}

/// A failure to register or use a region that streams would not have:
/// the daemon cannot see or will not take the region. Transient faults
/// (the daemon down, throttled) are the request's own error.
fn region_refused(e: &kvtier::Error) -> bool {
    !matches!(
        e.kind(),
        kvtier::ErrorKind::Unavailable | kvtier::ErrorKind::Throttled | kvtier::ErrorKind::Internal
    )
}

impl Drop for Daemon {
    /// Lets kvtierd unmap the regions (their files go with the `SharedRegion`s).
    fn drop(&mut self) {
        let Some(pool) = &self.regions else { return };
        let ids: Vec<u64> = pool.state.lock().free.iter().filter_map(|s| s.id).collect();
        if ids.is_empty() {
            return;
        }
        let client = &self.client;
        let all = async {
            for id in ids {
                let _ = client.unregister_region(id).await;
            }
        };
        // Best effort, bounded: a daemon that is gone has dropped them.
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(2), all).await });
    }
}

impl Daemon {
    fn region_id(&self, slot: &mut Slot) -> kvtier::Result<u64> {
        if let Some(id) = slot.id {
            return Ok(id);
        }
        let id = self.rt.block_on(self.client.register_region(&slot.mem))?;
        slot.id = Some(id);
        Ok(id)
    }

    /// Runs `call` with the slot's region id; a region the daemon no longer
    /// knows (it restarted) is registered again and the call retried once.
    fn with_region<T>(
        &self,
        pool: &RegionPool,
        slot: &mut Slot,
        call: impl Fn(&Self, u64) -> kvtier::Result<T>,
    ) -> kvtier::Result<Option<T>> {
        for attempt in 0..2 {
            let id = match self.region_id(slot) {
                Ok(id) => id,
                Err(e) if region_refused(&e) => {
                    pool.refuse(format!("kvtierd refused a region: {e}"));
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            match call(self, id) {
                Err(e) if e.kind() == kvtier::ErrorKind::NotFound && attempt == 0 => slot.id = None,
                r => return r.map(Some),
            }
        }
        unreachable!("the second attempt returns")
    }

    fn store(&self, ns: NamespaceId, keys: &[BlockKey], total: usize, fill: &dyn Fn(&mut [u8])) -> kvtier::Result<()> {
        if let Some(pool) = &self.regions
            && let Some(mut slot) = pool.take(total)
        {
            fill(&mut slot.mem.as_mut_slice()[..total]);
            let r = self.with_region(pool, &mut slot, |d, id| {
                d.rt.block_on(d.client.put_region(ns, keys, id, 0)).map(drop)
            });
            let bytes = match r {
                Ok(Some(())) => None,
                // Refused: the bytes are in the region already.
                Ok(None) => Some(bytes::Bytes::copy_from_slice(&slot.mem.as_slice()[..total])),
                Err(e) => {
                    pool.give(slot);
                    return Err(e);
                }
            };
            pool.give(slot);
            return match bytes {
                None => Ok(()),
                Some(b) => self.rt.block_on(self.client.put(ns, keys, b)).map(drop),
            };
        }
        let mut data = vec![0u8; total];
        fill(&mut data);
        self.rt.block_on(self.client.put(ns, keys, data.into())).map(drop)
    }

    fn load(&self, ns: NamespaceId, key: BlockKey, block: usize, take: &mut dyn FnMut(&[u8])) -> kvtier::Result<bool> {
        if let Some(pool) = &self.regions
            && let Some(mut slot) = pool.take(block)
        {
            let r = self.with_region(pool, &mut slot, |d, id| {
                d.rt.block_on(d.client.get_region(ns, &[key], id, 0))
            });
            let out = match r {
                Ok(Some(h)) if h.loaded == 1 && h.block_bytes as usize == block => {
                    take(&slot.mem.as_slice()[..block]);
                    Ok(true)
                }
                Ok(Some(_)) => Ok(false),
                Ok(None) => {
                    pool.give(slot);
                    return self.load_stream(ns, key, block, take);
                }
                Err(e) => Err(e),
            };
            pool.give(slot);
            return out;
        }
        self.load_stream(ns, key, block, take)
    }

    fn load_stream(
        &self,
        ns: NamespaceId,
        key: BlockKey,
        block: usize,
        take: &mut dyn FnMut(&[u8]),
    ) -> kvtier::Result<bool> {
        let g = self.rt.block_on(self.client.get(ns, &[key]))?;
        if g.loaded == 1 && g.data.len() == block {
            take(&g.data);
            return Ok(true);
        }
        Ok(false)
    }
}

impl Backend {
    fn register(&self, ns: &Namespace) -> kvtier::Result<NamespaceId> {
        match self {
            Self::Embedded(m) => m.register_namespace(ns),
            Self::Daemon(d) => d.rt.block_on(d.client.register(ns)).map(|(id, _)| id),
        }
    }

    /// Stores `keys.len()` blocks, `total` bytes that `fill` lays out.
    fn store(&self, ns: NamespaceId, keys: &[BlockKey], total: usize, fill: &dyn Fn(&mut [u8])) -> kvtier::Result<()> {
        match self {
            Self::Embedded(m) => {
                let mut data = vec![0u8; total];
                fill(&mut data);
                m.store(ns, keys, &data).map(drop)
            }
            Self::Daemon(d) => d.store(ns, keys, total, fill),
        }
    }

    /// Hands the block of `key` to `take` if it is present and whole;
    /// answers whether it did.
    fn load(&self, ns: NamespaceId, key: BlockKey, block: usize, take: &mut dyn FnMut(&[u8])) -> kvtier::Result<bool> {
        match self {
            Self::Embedded(m) => {
                let mut out = vec![0u8; block];
                let r = m.load(ns, &[key], &mut out)?;
                if r.loaded == 1 {
                    take(&out);
                }
                Ok(r.loaded == 1)
            }
            Self::Daemon(d) => d.load(ns, key, block, take),
        }
    }

    fn exists(&self, ns: NamespaceId, keys: &[BlockKey]) -> kvtier::Result<Vec<bool>> {
        let located = match self {
            Self::Embedded(m) => m.locate(ns, keys)?,
            Self::Daemon(d) => d.rt.block_on(d.client.locate(ns, keys))?,
        };
        Ok(located.into_iter().map(|s| !s.is_empty()).collect())
    }

    fn delete(&self, ns: NamespaceId, key: BlockKey) -> kvtier::Result<bool> {
        match self {
            Self::Embedded(m) => m.remove(ns, &[key]).map(|n| n > 0),
            Self::Daemon(d) => d.rt.block_on(d.client.delete(ns, &[key])).map(|n| n > 0),
        }
    }
}

/// An LMCache object key, split.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectKey {
    /// `model@rank@group[@salt]`: the namespace.
    scope: String,
    model: String,
    rank: u32,
    group: u64,
    salt: Option<String>,
    hash: Vec<u8>,
    /// The hash is a chunk hash of in-process LMCache (see `remote`), and
    /// the block key is derived from it reversibly.
    listable: bool,
}

impl ObjectKey {
    /// The block key of this object in namespace `ns`.
    fn block_key(&self, ns: NamespaceId) -> BlockKey {
        if self.listable {
            remote::listable_key(ns, &self.hash)
        } else {
            BlockKey::from_opaque(ns, &self.hash)
        }
    }
}

fn parse_key(key: &str) -> Result<ObjectKey, String> {
    let parts: Vec<&str> = key.split('@').collect();
    if !(4..=5).contains(&parts.len()) {
        return Err(format!(
            "LMCache key {key:?}: expected model@kv_rank@group@hash[@salt], got {} fields",
            parts.len()
        ));
    }
    let model = parts[0];
    if model.is_empty() {
        return Err(format!("LMCache key {key:?}: empty model name"));
    }
    let rank = (parts[1].len() == 8)
        .then(|| u32::from_str_radix(parts[1], 16).ok())
        .flatten()
        .ok_or_else(|| format!("LMCache key {key:?}: kv_rank {:?} is not 8 hex digits", parts[1]))?;
    let group = u64::from_str_radix(parts[2], 16)
        .map_err(|_| format!("LMCache key {key:?}: group {:?} is not hex", parts[2]))?;
    let h = parts[3];
    if h.is_empty() || !h.len().is_multiple_of(2) || h.len() > 128 {
        return Err(format!(
            "LMCache key {key:?}: chunk hash {h:?} is not 1 to 64 hex bytes"
        ));
    }
    let hash = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("LMCache key {key:?}: chunk hash {h:?} is not hex"))?;
    let salt = parts.get(4).map(|s| s.to_string());
    if salt.as_deref() == Some("") {
        return Err(format!("LMCache key {key:?}: empty salt"));
    }
    let scope = parts[..3].join("@") + &salt.as_deref().map(|s| format!("@{s}")).unwrap_or_default();
    Ok(ObjectKey {
        scope,
        model: model.to_string(),
        rank,
        group,
        salt,
        hash,
        listable: false,
    })
}

/// How the model ids of this object's namespaces begin.
const NS_PREFIX: &str = "kvtier:lmcache:";

/// The kvtier namespace of LMCache objects of one model, KV rank, group and
/// salt, in blocks of `block_bytes`.
fn namespace(k: &ObjectKey, block_bytes: u32) -> Namespace {
    let mut ns = Namespace::checkpoints("", block_bytes);
    ns.model_id = format!("{NS_PREFIX}{}@{:08x}@{:x}", k.model, k.rank, k.group);
    ns.salt = k.salt.clone();
    ns
}

/// A Python buffer a batch holds while it runs on this object's threads.
struct Held(Buffer);

// SAFETY: the Py_buffer is only read through its pointer and length (the
// bytes LMCache keeps alive and unchanged until the batch completes), and
// it is released with the interpreter held (Buffer's Drop attaches).
unsafe impl Send for Held {}

impl Held {
    fn ptr_len(&self) -> (usize, usize) {
        self.0.ptr_len()
    }
}

struct Completion {
    id: u64,
    ok: bool,
    error: String,
    per_key: Option<Vec<bool>>,
    /// Released under the interpreter, in `drain_completions`.
    bufs: Vec<Held>,
}

enum Op {
    Set,
    Get,
    Exists,
    Delete,
    /// Get into buffers at least as long as the objects, the lengths into
    /// one more buffer (see `remote`).
    GetUpTo,
}

struct Job {
    id: u64,
    op: Op,
    keys: Vec<Result<ObjectKey, String>>,
    bufs: Vec<Held>,
}

struct Inner {
    /// None once closed: the store (and its SSD directory) is let go.
    backend: parking_lot::RwLock<Option<Backend>>,
    chunk_bytes: usize,
    namespaces: Mutex<HashMap<String, NamespaceId>>,
    done: Mutex<Vec<Completion>>,
    efd: OwnedFd,
    /// Stored/loaded/missed/failed objects, for tests and stats.
    counters: [AtomicU64; 4],
}

impl Inner {
    fn block_bytes(&self) -> usize {
        self.chunk_bytes + HEADER_BYTES
    }

    fn ns(&self, b: &Backend, k: &ObjectKey) -> kvtier::Result<NamespaceId> {
        if let Some(id) = self.namespaces.lock().get(&k.scope) {
            return Ok(*id);
        }
        let id = b.register(&namespace(k, self.block_bytes() as u32))?;
        self.namespaces.lock().insert(k.scope.clone(), id);
        Ok(id)
    }

    /// The namespace and block key of an object key (a key that did not
    /// parse is an invalid-argument error).
    fn block_key(&self, b: &Backend, k: &Result<ObjectKey, String>) -> kvtier::Result<(NamespaceId, BlockKey)> {
        let k = k
            .as_ref()
            .map_err(|e| kvtier::Error::new(kvtier::ErrorKind::InvalidArgument, e.clone()))?;
        let ns = self.ns(b, k)?;
        Ok((ns, k.block_key(ns)))
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: a plain write(2) of 8 bytes to our own eventfd.
        unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn run(&self, job: Job) {
        let backend = self.backend.read();
        let (ok, error, per_key) = match (backend.as_ref(), &job.op) {
            (None, _) => (false, "kvtier L2 is closed".to_string(), vec![false; job.keys.len()]),
            (Some(b), Op::Set) => self.set(b, &job.keys, &job.bufs),
            (Some(b), Op::Get) => self.get(b, &job.keys, &job.bufs),
            (Some(b), Op::Exists) => self.exists(b, &job.keys),
            (Some(b), Op::Delete) => self.delete(b, &job.keys),
            (Some(b), Op::GetUpTo) => self.get_up_to(b, &job.keys, &job.bufs),
        };
        drop(backend);
        self.done.lock().push(Completion {
            id: job.id,
            ok,
            error,
            per_key: Some(per_key),
            bufs: job.bufs,
        });
        self.signal();
    }

    fn count(&self, i: usize, n: usize) {
        self.counters[i].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Each object into a block with its header; groups of keys of one
    /// namespace go in calls of at most `MAX_CALL_BYTES`.
    fn set(&self, b: &Backend, keys: &[Result<ObjectKey, String>], bufs: &[Held]) -> (bool, String, Vec<bool>) {
        let mut per_key = vec![false; keys.len()];
        let mut errors = Vec::new();
        let block = self.block_bytes();
        let mut i = 0;
        while i < keys.len() {
            let k = match &keys[i] {
                Ok(k) => k,
                Err(e) => {
                    errors.push(e.clone());
                    i += 1;
                    continue;
                }
            };
            let ns = match self.ns(b, k) {
                Ok(ns) => ns,
                Err(e) => {
                    errors.push(e.to_string());
                    i += 1;
                    continue;
                }
            };
            // A run of keys of the same scope, up to the call size.
            let mut run: Vec<(usize, BlockKey, usize, usize)> = Vec::new();
            while i < keys.len() && (run.len() + 1) * block <= MAX_CALL_BYTES.max(block) {
                let Ok(k2) = &keys[i] else { break };
                if k2.scope != k.scope {
                    break;
                }
                let (p, len) = bufs[i].ptr_len();
                if len == 0 || len > self.chunk_bytes {
                    errors.push(format!(
                        "object {i} is {len} bytes; this L2 holds 1 to chunk_bytes = {} bytes",
                        self.chunk_bytes
                    ));
                    i += 1;
                    continue;
                }
                run.push((i, k2.block_key(ns), p, len));
                i += 1;
            }
            if run.is_empty() {
                continue;
            }
            let fill = |data: &mut [u8]| {
                for (j, (_, _, p, len)) in run.iter().enumerate() {
                    let b = &mut data[j * block..(j + 1) * block];
                    b[..4].copy_from_slice(MAGIC);
                    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
                    b[8..16].copy_from_slice(&(*len as u64).to_le_bytes());
                    // SAFETY: LMCache keeps the objects alive and unchanged
                    // until this batch completes; the buffer is held by the job.
                    b[HEADER_BYTES..HEADER_BYTES + len].copy_from_slice(unsafe { crate::slice(*p, *len) });
                    // The padding is zeros, whatever the memory held before.
                    b[HEADER_BYTES + len..].fill(0);
                }
            };
            let bkeys: Vec<BlockKey> = run.iter().map(|r| r.1).collect();
            match b.store(ns, &bkeys, run.len() * block, &fill) {
                Ok(()) => {
                    for (j, ..) in &run {
                        per_key[*j] = true;
                    }
                    self.count(0, run.len());
                }
                Err(e) => {
                    self.count(3, run.len());
                    errors.push(e.to_string());
                }
            }
        }
        (errors.is_empty(), errors.join("; "), per_key)
    }

    fn get(&self, b: &Backend, keys: &[Result<ObjectKey, String>], bufs: &[Held]) -> (bool, String, Vec<bool>) {
        let mut per_key = vec![false; keys.len()];
        let mut errors = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let (p, len) = bufs[i].ptr_len();
            // What the block held, checked before a byte reaches LMCache.
            let mut checked = Ok(());
            let mut take = |block: &[u8]| {
                checked = check_header(block, len);
                if checked.is_ok() {
                    // SAFETY: the buffer was acquired writable and is held
                    // by the job; LMCache reads it only after the completion.
                    unsafe { crate::slice_mut(p, len) }.copy_from_slice(&block[HEADER_BYTES..HEADER_BYTES + len]);
                }
            };
            let r = self
                .block_key(b, k)
                .and_then(|(ns, key)| b.load(ns, key, self.block_bytes(), &mut take));
            match (r, checked) {
                (Ok(true), Ok(())) => {
                    per_key[i] = true;
                    self.count(1, 1);
                }
                (Ok(true), Err(e)) => {
                    self.count(3, 1);
                    errors.push(format!("object {i}: {e}"));
                }
                (Ok(false), _) => self.count(2, 1),
                (Err(e), _) => {
                    self.count(3, 1);
                    errors.push(format!("object {i}: {e}"));
                }
            }
        }
        (errors.is_empty(), errors.join("; "), per_key)
    }

    fn exists(&self, b: &Backend, keys: &[Result<ObjectKey, String>]) -> (bool, String, Vec<bool>) {
        let mut per_key = vec![false; keys.len()];
        let mut errors = Vec::new();
        // Keys of one scope in one call.
        let mut groups: HashMap<NamespaceId, Vec<(usize, BlockKey)>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            match self.block_key(b, k) {
                Ok((ns, bk)) => groups.entry(ns).or_default().push((i, bk)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for (ns, members) in groups {
            for part in members.chunks(kvtier::events::MAX_READ) {
                let bkeys: Vec<BlockKey> = part.iter().map(|(_, k)| *k).collect();
                match b.exists(ns, &bkeys) {
                    Ok(found) => {
                        for ((i, _), f) in part.iter().zip(found) {
                            per_key[*i] = f;
                        }
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        (errors.is_empty(), errors.join("; "), per_key)
    }

    fn delete(&self, b: &Backend, keys: &[Result<ObjectKey, String>]) -> (bool, String, Vec<bool>) {
        let mut per_key = vec![false; keys.len()];
        let mut errors = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let r = self.block_key(b, k).and_then(|(ns, key)| b.delete(ns, key));
            match r {
                Ok(d) => per_key[i] = d,
                Err(e) => errors.push(format!("object {i}: {e}")),
            }
        }
        (errors.is_empty(), errors.join("; "), per_key)
    }
}

/// A block's header says it holds an object of exactly `len` bytes.
fn check_header(block: &[u8], len: usize) -> Result<(), String> {
    if block.len() < HEADER_BYTES || &block[..4] != MAGIC {
        return Err("not an LMCache object block (bad magic)".into());
    }
    let version = u32::from_le_bytes(block[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("object block version {version}, this kvtier reads {VERSION}"));
    }
    let stored = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes")) as usize;
    if stored != len || HEADER_BYTES + stored > block.len() {
        return Err(format!("object is {stored} bytes, the buffer {len}"));
    }
    Ok(())
}

/// kvtier as an L2 of LMCache's multiprocess server (see the module docs).
#[pyclass(module = "kvtier._kvtier", frozen)]
pub(crate) struct LmcacheL2 {
    inner: Arc<Inner>,
    next_id: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl LmcacheL2 {
    fn submit(&self, py: Python<'_>, op: Op, keys: Vec<String>, bufs: Option<&Bound<'_, PyList>>) -> PyResult<u64> {
        let keys = keys.iter().map(|k| parse_key(k)).collect();
        self.submit_parsed(py, op, keys, bufs, None)
    }

    /// [`LmcacheL2::submit`] of keys parsed already; `extra`, a buffer the
    /// op uses besides one per key, goes last in the job's buffers.
    fn submit_parsed(
        &self,
        py: Python<'_>,
        op: Op,
        keys: Vec<Result<ObjectKey, String>>,
        bufs: Option<&Bound<'_, PyList>>,
        extra: Option<Held>,
    ) -> PyResult<u64> {
        let writable = matches!(op, Op::Get | Op::GetUpTo);
        let mut held = match bufs {
            None => Vec::new(),
            Some(list) => {
                if list.len() != keys.len() {
                    return Err(InvalidArgumentError::new_err(format!(
                        "{} keys and {} buffers; one buffer per key",
                        keys.len(),
                        list.len()
                    )));
                }
                list.iter()
                    .map(|b| Buffer::get(&b, writable).map(Held))
                    .collect::<PyResult<Vec<_>>>()?
            }
        };
        held.extend(extra);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            op,
            keys,
            bufs: held,
        };
        let sent = match self.tx.lock().as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        // A job that was not sent is dropped here, its buffers released
        // with the interpreter held.
        let _ = py;
        if sent {
            Ok(id)
        } else {
            Err(KvTierError::new_err("kvtier L2 is closed"))
        }
    }
}

#[pymethods]
impl LmcacheL2 {
    /// `chunk_bytes`: LMCache's full chunk in bytes (chunk size x bytes per
    /// token of KV); shorter chunks are stored padded. Blocks go to an
    /// embedded store (`store`: a config dict, the keys of deploy/kvtier.toml;
    /// or `disk_dir` and `disk_capacity_bytes` for SSD only) or, with
    /// `endpoint`, to a kvtierd: through shared-memory regions in `shm_dir`
    /// (kvtierd's, /dev/shm by default) when it takes them, else over the
    /// socket (`shm_dir=None` or `""` forces the socket). `io_threads` run
    /// the batches.
    #[new]
    #[pyo3(signature = (*, chunk_bytes, endpoint = None, token = None, timeout_s = 30.0, shm_dir = Some("/dev/shm".to_string()), store = None, disk_dir = None, disk_capacity_bytes = 64u64 << 30, io_threads = 4))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        chunk_bytes: i64,
        endpoint: Option<String>,
        token: Option<String>,
        timeout_s: f64,
        shm_dir: Option<String>,
        store: Option<&Bound<'_, PyAny>>,
        disk_dir: Option<String>,
        disk_capacity_bytes: u64,
        io_threads: usize,
    ) -> PyResult<Self> {
        let chunk_bytes = usize::try_from(chunk_bytes)
            .ok()
            .filter(|c| (1..=(u32::MAX as usize - HEADER_BYTES)).contains(c))
            .ok_or_else(|| InvalidArgumentError::new_err(format!("chunk_bytes {chunk_bytes}: 1 to 4 GiB")))?;
        if !(1..=64).contains(&io_threads) {
            return Err(InvalidArgumentError::new_err(format!(
                "io_threads {io_threads}: 1 to 64"
            )));
        }
        let backend = match (endpoint, store, disk_dir) {
            (Some(endpoint), None, None) => {
                if !(timeout_s.is_finite() && timeout_s > 0.0) {
                    return Err(InvalidArgumentError::new_err(format!(
                        "timeout_s {timeout_s}: positive seconds"
                    )));
                }
                let cfg = ClientConfig {
                    endpoint,
                    token,
                    request_timeout: Some(std::time::Duration::from_secs_f64(timeout_s)),
                    ..Default::default()
                };
                let (rt, client) = crate::connect(py, &cfg)?;
                let regions = shm_dir.filter(|d| !d.is_empty()).map(|dir| RegionPool {
                    dir: dir.into(),
                    slot_bytes: MAX_CALL_BYTES.max(chunk_bytes + HEADER_BYTES).next_multiple_of(4096),
                    max_slots: io_threads,
                    state: Mutex::new(Slots::default()),
                    freed: parking_lot::Condvar::new(),
                    refused: std::sync::atomic::AtomicBool::new(false),
                });
                Backend::Daemon(Box::new(Daemon { rt, client, regions }))
            }
            (None, Some(c), None) => {
                let cfg = serde_json::from_str::<ManagerConfig>(&to_json(c)?)
                    .map_err(|e| InvalidArgumentError::new_err(format!("store config: {e}")))?;
                Backend::Embedded(py.detach(|| cfg.build()).map_err(err)?)
            }
            (None, None, Some(dir)) => {
                // Segments of a sixteenth of the SSD budget (256 MiB at most),
                // each holding at least two blocks.
                let block = (chunk_bytes + HEADER_BYTES) as u64;
                let seg = (disk_capacity_bytes / 16)
                    .min(256 << 20)
                    .max(2 * block + (64 << 10))
                    .next_multiple_of(4096);
                let cfg = ManagerConfig::ssd_only(kvtier::tier::disk::DiskConfig {
                    segment_bytes: seg,
                    ..kvtier::tier::disk::DiskConfig::new(dir, disk_capacity_bytes)
                });
                Backend::Embedded(py.detach(|| cfg.build()).map_err(err)?)
            }
            _ => {
                return Err(InvalidArgumentError::new_err(
                    "give exactly one of endpoint (a kvtierd), store (a config dict) or disk_dir",
                ));
            }
        };
        // SAFETY: a plain eventfd(2); the fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(KvTierError::new_err(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let inner = Arc::new(Inner {
            backend: parking_lot::RwLock::new(Some(backend)),
            chunk_bytes,
            namespaces: Mutex::new(HashMap::new()),
            done: Mutex::new(Vec::new()),
            efd,
            counters: Default::default(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(io_threads);
        for i in 0..io_threads {
            let (inner, rx) = (inner.clone(), rx.clone());
            let w = std::thread::Builder::new()
                .name(format!("kvtier-l2-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        match job {
                            Ok(job) => inner.run(job),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| KvTierError::new_err(format!("start an L2 thread: {e}")))?;
            workers.push(w);
        }
        Ok(Self {
            inner,
            next_id: AtomicU64::new(1),
            tx: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
        })
    }

    /// The eventfd LMCache polls: readable when completions are queued.
    fn event_fd(&self) -> i32 {
        self.inner.efd.as_raw_fd()
    }

    fn submit_batch_set(&self, py: Python<'_>, keys: Vec<String>, bufs: &Bound<'_, PyList>) -> PyResult<u64> {
        self.submit(py, Op::Set, keys, Some(bufs))
    }

    fn submit_batch_get(&self, py: Python<'_>, keys: Vec<String>, bufs: &Bound<'_, PyList>) -> PyResult<u64> {
        self.submit(py, Op::Get, keys, Some(bufs))
    }

    fn submit_batch_exists(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<u64> {
        self.submit(py, Op::Exists, keys, None)
    }

    fn submit_batch_delete(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<u64> {
        self.submit(py, Op::Delete, keys, None)
    }

    /// Completed batches: `(future_id, ok, error, per_key)`; resets the
    /// eventfd first, so a completion queued meanwhile signals it again.
    fn drain_completions(&self) -> Vec<(u64, bool, String, Option<Vec<bool>>)> {
        let mut word = [0u8; 8];
        // SAFETY: a non-blocking read(2) of 8 bytes from our own eventfd
        // into a local buffer; EAGAIN (nothing queued) is fine.
        unsafe { libc::read(self.inner.efd.as_raw_fd(), word.as_mut_ptr().cast(), 8) };
        let done = std::mem::take(&mut *self.inner.done.lock());
        // The buffers are released here, with the interpreter held.
        done.into_iter()
            .map(|c| {
                drop(c.bufs);
                (c.id, c.ok, c.error, c.per_key)
            })
            .collect()
    }

    /// How the bytes travel: "embedded", "regions" (shared memory with a
    /// local kvtierd), "socket" (kvtierd over gRPC), or "closed".
    fn transport(&self) -> &'static str {
        match self.inner.backend.read().as_ref() {
            None => "closed",
            Some(Backend::Embedded(_)) => "embedded",
            Some(Backend::Daemon(d)) => match &d.regions {
                Some(p) if !p.refused.load(Ordering::Relaxed) => "regions",
                _ => "socket",
            },
        }
    }

    /// Objects stored, loaded, missed and failed since start.
    fn stats(&self) -> (u64, u64, u64, u64) {
        let c = &self.inner.counters;
        let n = |i: usize| c[i].load(Ordering::Relaxed);
        (n(0), n(1), n(2), n(3))
    }

    /// Finishes the batches submitted and stops the threads. Idempotent.
    fn close(&self, py: Python<'_>) {
        self.tx.lock().take();
        let workers = std::mem::take(&mut *self.workers.lock());
        let inner = self.inner.clone();
        py.detach(move || {
            for w in workers {
                let _ = w.join();
            }
            // Every batch is done: close the store (flushes its SSD and lets
            // the directory go) or the daemon client.
            inner.backend.write().take();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_scope_and_hash() {
        let k = parse_key("org/model@00000003@1@0a0b@salt").unwrap();
        assert_eq!(k.scope, "org/model@00000003@1@salt");
        assert_eq!((k.rank, k.group, k.hash.clone()), (3, 1, vec![0x0a, 0x0b]));
        assert_eq!(k.salt.as_deref(), Some("salt"));
        let plain = parse_key("m@00000000@0@ff").unwrap();
        assert_eq!(plain.salt, None);
        assert_ne!(namespace(&k, 64).id(), namespace(&plain, 64).id());
        // Salt, rank and group each make another namespace.
        let other_salt = parse_key("org/model@00000003@1@0a0b@other").unwrap();
        let other_rank = parse_key("org/model@00000004@1@0a0b@salt").unwrap();
        let other_group = parse_key("org/model@00000003@2@0a0b@salt").unwrap();
        for o in [other_salt, other_rank, other_group] {
            assert_ne!(namespace(&k, 64).id(), namespace(&o, 64).id());
        }
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        for (key, why) in [
            ("m@00000000@0", "got 3 fields"),
            ("m@0000000@0@ff", "is not 8 hex digits"),
            ("m@00000000@x@ff", "group \"x\" is not hex"),
            ("m@00000000@0@f", "is not 1 to 64 hex bytes"),
            ("m@00000000@0@zz", "chunk hash \"zz\" is not hex"),
            ("@00000000@0@ff", "empty model"),
            ("m@00000000@0@ff@", "empty salt"),
        ] {
            let e = parse_key(key).unwrap_err();
            assert!(e.contains(why), "{key}: {e}");
        }
    }

    #[test]
    fn headers_check_magic_version_and_length() {
        let mut b = vec![0u8; HEADER_BYTES + 8];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&5u64.to_le_bytes());
        assert!(check_header(&b, 5).is_ok());
        assert!(check_header(&b, 6).unwrap_err().contains("5 bytes"));
        b[0] = b'X';
        assert!(check_header(&b, 5).unwrap_err().contains("magic"));
    }
}
