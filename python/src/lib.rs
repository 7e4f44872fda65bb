//! Python bindings of kvtier (the extension module `kvtier._kvtier`).
//!
//! # Layout
//!
//! - [`Store`]: the block manager in this process, from a dict or TOML;
//!   `save_blocks` / `load_blocks` move blocks between an engine's KV
//!   tensors and the tiers in one call and one copy.
//! - [`Client`]: a client of a local kvtierd: KV blocks, and checkpoints
//!   (named sets of files, from memory or a directory).
//! - Free functions: block keys from engine hashes (one or a request's
//!   worth) and from token ids.
//!
//! # Why
//!
//! - **Buffers, not copies**: `put` and `get` take any C-contiguous buffer
//!   (numpy arrays of any dtype, bytes, memoryviews, CPU tensors through
//!   `.numpy()`) and read or fill its bytes where they lie.
//! - **The interpreter is released around all I/O**, so Python threads (an
//!   engine's scheduler) keep running while blocks move.
//! - **Straight between tensors and tiers**: `save_blocks` copies each block
//!   from the KV tensors into space reserved in the host tier and commits
//!   it; `load_blocks` copies verified blocks from the tier into the
//!   tensors. One copy each way, where staging plus `put`/`get` take two.

use kvtier::block::dynamo_seed;
use kvtier::checkpoint::Checkpoints;
use kvtier::checkpoint::manifest::Manifest;
use kvtier::manager::StoreOutcome;
use kvtier::transfer::{BlockPlan, Copier, LayerBlocks};
use kvtier::{BlockKey, BlockManager, ErrorKind, ManagerConfig, Namespace, NamespaceId, SequenceHasher};
use kvtier_client::RemoteChunks;
use kvtier_client::{Client as RpcClient, ClientConfig};
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyInt, PyMapping, PyMemoryView};
use std::sync::Arc;

mod l2;

pyo3::create_exception!(
    _kvtier,
    KvTierError,
    PyException,
    "Any kvtier failure; subclasses name the kind."
);
pyo3::create_exception!(
    _kvtier,
    InvalidArgumentError,
    KvTierError,
    "A malformed request; nothing changed."
);
pyo3::create_exception!(
    _kvtier,
    BlockSizeError,
    InvalidArgumentError,
    "A buffer does not hold whole blocks."
);
pyo3::create_exception!(
    _kvtier,
    UnknownNamespaceError,
    KvTierError,
    "The namespace was never registered."
);
pyo3::create_exception!(
    _kvtier,
    NoSpaceError,
    KvTierError,
    "No room for the blocks; nothing stored."
);
pyo3::create_exception!(
    _kvtier,
    TooLargeError,
    InvalidArgumentError,
    "A request is over a size limit (the daemon's max_request_bytes): split it; nothing stored."
);
pyo3::create_exception!(
    _kvtier,
    PermissionDeniedError,
    KvTierError,
    "The daemon refused the caller: a missing or wrong token, or a region outside its directory."
);
pyo3::create_exception!(
    _kvtier,
    ThrottledError,
    KvTierError,
    "A bounded queue is full: retry later; the connection is fine."
);
pyo3::create_exception!(_kvtier, ChecksumError, KvTierError, "Stored bytes failed verification.");
pyo3::create_exception!(_kvtier, UnavailableError, KvTierError, "The daemon cannot be reached.");
pyo3::create_exception!(
    _kvtier,
    NotFoundError,
    KvTierError,
    "A named thing does not exist: a checkpoint, or a chunk of one that no tier holds."
);
pyo3::create_exception!(
    _kvtier,
    AlreadyExistsError,
    KvTierError,
    "A checkpoint of that name exists; names are immutable, so nothing changed."
);

/// The one map from an error's kind to its Python exception: the same
/// mistake raises the same class embedded and through the daemon, since a
/// daemon's errors arrive with their kind (`kvtier_proto::error`).
fn err(e: kvtier::Error) -> PyErr {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::BlockSize => BlockSizeError::new_err(msg),
        ErrorKind::TooLarge => TooLargeError::new_err(msg),
        ErrorKind::InvalidArgument | ErrorKind::Config => InvalidArgumentError::new_err(msg),
        ErrorKind::UnknownNamespace => UnknownNamespaceError::new_err(msg),
        ErrorKind::NoSpace => NoSpaceError::new_err(msg),
        ErrorKind::Throttled => ThrottledError::new_err(msg),
        ErrorKind::Unavailable | ErrorKind::Closed => UnavailableError::new_err(msg),
        ErrorKind::ChecksumMismatch => ChecksumError::new_err(msg),
        ErrorKind::NotFound => NotFoundError::new_err(msg),
        ErrorKind::AlreadyExists => AlreadyExistsError::new_err(msg),
        ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => PermissionDeniedError::new_err(msg),
        ErrorKind::Io | ErrorKind::Internal => KvTierError::new_err(msg),
        _ => KvTierError::new_err(msg),
    }
}

/// A status this module parsed itself (a request it checked locally with
/// the protocol's codecs), read back into the crate's error.
fn status(s: tonic::Status) -> PyErr {
    err(kvtier_proto::error::from_status(s))
}

/// A Python buffer held for the length of a call: its bytes as they lie.
struct Buffer {
    view: Box<pyo3::ffi::Py_buffer>,
}

impl Buffer {
    fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        // SAFETY: a zeroed Py_buffer is the documented initial state for
        // PyObject_GetBuffer, which fills it or fails.
        let mut view: Box<pyo3::ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let flags = pyo3::ffi::PyBUF_C_CONTIGUOUS | if writable { pyo3::ffi::PyBUF_WRITABLE } else { 0 };
        // SAFETY: obj is a live object (we hold a Bound); view is writable.
        if unsafe { pyo3::ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(Self { view })
    }

    fn ptr_len(&self) -> (usize, usize) {
        (self.view.buf as usize, self.view.len as usize)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer. Buffers live in
        // a method's scope, so the interpreter is attached here.
        Python::attach(|_| unsafe { pyo3::ffi::PyBuffer_Release(&mut *self.view) });
    }
}

/// Bytes of a buffer as a slice, for use while the interpreter is released.
///
/// # Safety
/// The buffer must stay held for the life of the slice, and Python code must
/// not change it meanwhile (the caller's contract, as with any C extension
/// that releases the interpreter around a buffer).
unsafe fn slice<'a>(p: usize, len: usize) -> &'a [u8] {
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(p as *const u8, len) }
}

/// # Safety
/// As [`slice`], and the buffer was acquired writable.
unsafe fn slice_mut<'a>(p: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) }
}

fn ns_id(b: &[u8]) -> PyResult<NamespaceId> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| InvalidArgumentError::new_err(format!("a namespace id is 16 bytes, got {}", b.len())))?;
    Ok(NamespaceId(u128::from_le_bytes(a)))
}

/// Parses keys as the daemon does: none at all is a mistake, refused the
/// same way embedded and through kvtierd.
fn keys(raw: Vec<Vec<u8>>) -> PyResult<Vec<BlockKey>> {
    if raw.is_empty() {
        return Err(InvalidArgumentError::new_err(
            "invalid argument: keys must not be empty",
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, k)| {
            let a: [u8; 16] = k[..]
                .try_into()
                .map_err(|_| InvalidArgumentError::new_err(format!("key {i} is {} bytes, keys are 16", k.len())))?;
            Ok(BlockKey::from_le_bytes(a))
        })
        .collect()
}

/// The arguments of `list_keys`, checked the same way embedded and
/// through kvtierd: a 16-byte cursor key or none, and a page size (its
/// range is the manager's to check, so the error reads the same).
fn list_args(ns: &[u8], after: Option<Vec<u8>>, max: i64) -> PyResult<(NamespaceId, Option<BlockKey>, u32)> {
    let after = match after {
        None => None,
        Some(k) => Some(BlockKey::from_le_bytes(k[..].try_into().map_err(|_| {
            InvalidArgumentError::new_err(format!("after is {} bytes, keys are 16", k.len()))
        })?)),
    };
    let max = u32::try_from(max)
        .map_err(|_| InvalidArgumentError::new_err(format!("list_keys takes 1 to 65536 keys a page, got {max}")))?;
    Ok((ns_id(ns)?, after, max))
}

fn key_list<'py>(py: Python<'py>, keys: &[BlockKey]) -> Vec<Bound<'py, PyBytes>> {
    keys.iter().map(|k| PyBytes::new(py, &k.to_le_bytes())).collect()
}

/// A Python object to JSON text, through the json module.
fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.py().import("json")?.call_method1("dumps", (obj,))?.extract()
}

fn from_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

fn namespace(obj: &Bound<'_, PyAny>) -> PyResult<Namespace> {
    let ns: Namespace =
        serde_json::from_str(&to_json(obj)?).map_err(|e| InvalidArgumentError::new_err(format!("namespace: {e}")))?;
    ns.validate().map_err(err)?;
    Ok(ns)
}

/// What a put did, as the dict both Store and Client return.
/// A page of tier events as Python sees it: {"epoch", "cursor", "resync",
/// "events": [(seq, "stored"|"removed", tier name, key bytes)]}.
fn event_page<'py>(py: Python<'py>, p: &kvtier::events::EventPage) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("epoch", p.epoch)?;
    d.set_item("cursor", p.cursor)?;
    d.set_item("resync", p.resync)?;
    let events = p
        .events
        .iter()
        .map(|e| {
            (
                e.seq,
                e.change.name(),
                e.tier.name(),
                PyBytes::new(py, &e.key.0.to_le_bytes()),
            )
        })
        .collect::<Vec<_>>();
    d.set_item("events", events)?;
    Ok(d)
}

/// Checks an event read's `max` before it reaches the store.
fn event_max(max: i64) -> PyResult<usize> {
    usize::try_from(max)
        .ok()
        .filter(|m| (1..=kvtier::events::MAX_READ).contains(m))
        .ok_or_else(|| {
            InvalidArgumentError::new_err(format!(
                "max {max}: an event read takes 1 to {} events",
                kvtier::events::MAX_READ
            ))
        })
}

/// The tiers of each located key, by name.
fn located(sets: Vec<kvtier::events::TierSet>) -> Vec<Vec<&'static str>> {
    sets.into_iter().map(|s| s.iter().map(|t| t.name()).collect()).collect()
}

fn put_result(py: Python<'_>, stored: u64, present: u64, not_admitted: u64) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("stored", stored)?;
    d.set_item("present", present)?;
    d.set_item("not_admitted", not_admitted)?;
    Ok(d)
}

/// A checkpoint's manifest as the dict the checkpoint methods return.
fn manifest_dict<'py>(py: Python<'py>, m: &Manifest) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &m.name)?;
    d.set_item("files", m.files.len())?;
    d.set_item("bytes", m.bytes())?;
    d.set_item("chunks", m.chunks())?;
    Ok(d)
}

/// The chunk size of a checkpoint group, checked as kvtierd checks it, so
/// that bad input fails here, before anything is sent.
fn checkpoint_chunk_bytes(group: &str, chunk_mib: i64) -> PyResult<u32> {
    let range = kvtier_proto::convert::CHUNK_BYTES_RANGE;
    let (lo, hi) = (i64::from(*range.start() >> 20), i64::from(*range.end() >> 20));
    if !(lo..=hi).contains(&chunk_mib) {
        return Err(InvalidArgumentError::new_err(format!(
            "chunk_mib {chunk_mib} must be between {lo} and {hi}"
        )));
    }
    let chunk_bytes = (chunk_mib as u32) << 20;
    let g = kvtier_proto::checkpoint_proto::Group {
        group: group.to_string(),
        chunk_bytes,
        ..Default::default()
    };
    kvtier_proto::convert::group_namespace(&g).map_err(status)?;
    Ok(chunk_bytes)
}

/// The block manager in this process.
#[pyclass(module = "kvtier._kvtier", frozen)]
struct Store {
    inner: BlockManager,
}

/// A request to move blocks between an engine's KV tensors and the tiers,
/// checked whole before anything moves.
struct Transfer {
    ns: NamespaceId,
    keys: Vec<BlockKey>,
    plan: BlockPlan,
    copier: Arc<dyn Copier>,
}

impl Store {
    /// Checks a `save_blocks` / `load_blocks` request: the namespace, one
    /// key per block id, every block id inside every layer, and layers
    /// that make up exactly the namespace's block.
    fn transfer(
        &self,
        ns: &[u8],
        keys_: Vec<Vec<u8>>,
        layers: Vec<(u64, u64, u64)>,
        layer_block_bytes: usize,
        block_ids: &[u64],
        device: &str,
    ) -> PyResult<Transfer> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        if block_ids.len() != keys.len() {
            return Err(InvalidArgumentError::new_err(format!(
                "invalid argument: {} keys and {} block ids; one block id per key",
                keys.len(),
                block_ids.len()
            )));
        }
        let block_bytes = self.inner.block_bytes(ns).map_err(err)?;
        let layers = layer_blocks(layers);
        let plan = BlockPlan::new(&layers, layer_block_bytes, block_ids).map_err(err)?;
        if plan.block_bytes() as u64 != block_bytes {
            return Err(BlockSizeError::new_err(format!(
                "block size: {} layers of {layer_block_bytes} bytes make blocks of {} bytes; the namespace's blocks are {block_bytes} bytes",
                layers.len(),
                plan.block_bytes()
            )));
        }
        Ok(Transfer {
            ns,
            keys,
            plan,
            copier: copier(device)?,
        })
    }
}

#[pymethods]
impl Store {
    /// A store from a config dict (the keys of deploy/kvtier.toml), or TOML text.
    #[new]
    #[pyo3(signature = (config = None, *, toml = None))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>, toml: Option<&str>) -> PyResult<Self> {
        let cfg = match (config, toml) {
            (Some(c), None) => serde_json::from_str::<ManagerConfig>(&to_json(c)?)
                .map_err(|e| InvalidArgumentError::new_err(format!("store config: {e}")))?,
            (None, Some(t)) => ManagerConfig::from_toml(t).map_err(err)?,
            _ => {
                return Err(PyValueError::new_err(
                    "pass exactly one of config (a dict) or toml (text)",
                ));
            }
        };
        let inner = py.detach(|| cfg.build()).map_err(err)?;
        Ok(Self { inner })
    }

    /// Registers a namespace (a dict); returns its 16-byte id.
    fn register_namespace<'py>(
        &self,
        py: Python<'py>,
        namespace_: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let ns = namespace(namespace_)?;
        let id = self.inner.register_namespace(&ns).map_err(err)?;
        Ok(PyBytes::new(py, &id.0.to_le_bytes()))
    }

    /// Bytes per block of a registered namespace.
    fn block_bytes(&self, ns: &[u8]) -> PyResult<u64> {
        self.inner.block_bytes(ns_id(ns)?).map_err(err)
    }

    /// The longest present prefix of `keys`: (blocks, tier of each).
    fn lookup(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<(usize, Vec<&'static str>)> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let l = py.detach(|| self.inner.lookup(ns, &keys)).map_err(err)?;
        Ok((l.hit_blocks(), l.tiers.iter().map(|t| t.name()).collect()))
    }

    /// The tier events of namespace `ns` after cursor `after` (at most
    /// `max`), for a reader whose last page had `epoch` (0 at first). A
    /// first read, a reader that fell behind and one from another epoch get
    /// "resync": True and the cursor to go on from; they re-read the keys
    /// they care about with `locate`.
    #[pyo3(signature = (ns, epoch = 0, after = 0, max = 4096))]
    fn events<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        epoch: u64,
        after: u64,
        max: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ns, max) = (ns_id(ns)?, event_max(max)?);
        let p = py.detach(|| self.inner.events(ns, epoch, after, max)).map_err(err)?;
        event_page(py, &p)
    }

    /// The tiers holding each of `keys` (each on its own, not a prefix):
    /// a list of tier names per key, empty when none holds it.
    fn locate(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<Vec<Vec<&'static str>>> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        py.detach(|| self.inner.locate(ns, &keys)).map(located).map_err(err)
    }

    /// A page of the keys of `ns` that a tier of this store holds, in
    /// ascending order of their 128-bit value: those after `after` (a key;
    /// None: from the start), at most `max` (1 to 65536). Returns
    /// `(keys, more)`; pass the last key as `after` for the next page.
    #[pyo3(signature = (ns, after = None, max = 4096))]
    fn list_keys<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        after: Option<Vec<u8>>,
        max: i64,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, bool)> {
        let (ns, after, max) = list_args(ns, after, max)?;
        let (keys, more) = py
            .detach(|| self.inner.list_keys(ns, after, max as usize))
            .map_err(err)?;
        Ok((key_list(py, &keys), more))
    }

    /// Stores `len(keys)` blocks laid out back to back in `data` (any
    /// contiguous buffer). Returns {"stored", "present", "not_admitted"}.
    fn put<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        keys_: Vec<Vec<u8>>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let buf = Buffer::get(data, false)?;
        let (p, len) = buf.ptr_len();
        // SAFETY: `buf` holds the buffer until after detach returns.
        let out = py
            .detach(|| self.inner.store(ns, &keys, unsafe { slice(p, len) }))
            .map_err(err)?;
        drop(buf);
        put_result(py, out.stored as u64, out.present as u64, out.not_admitted as u64)
    }

    /// Loads the leading present blocks of `keys` into `out` (a writable
    /// buffer of len(keys) blocks). Returns (loaded, failed_index or None):
    /// a failed block is never served; recompute it and what follows.
    fn get(
        &self,
        py: Python<'_>,
        ns: &[u8],
        keys_: Vec<Vec<u8>>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, Option<usize>)> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let buf = Buffer::get(out, true)?;
        let (p, len) = buf.ptr_len();
        // SAFETY: `buf` holds the writable buffer until after detach returns.
        let r = py
            .detach(|| self.inner.load(ns, &keys, unsafe { slice_mut(p, len) }))
            .map_err(err)?;
        drop(buf);
        Ok((r.loaded, r.failed.map(|f| f.index)))
    }

    /// Removes blocks; returns how many were present.
    fn delete(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<usize> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        py.detach(|| self.inner.remove(ns, &keys)).map_err(err)
    }

    /// Whether the store has a host tier: saves then copy each block from
    /// the tensors straight into it. Without one (SSD-only) they go
    /// through a reused staging buffer to the disk.
    fn has_host_tier(&self) -> bool {
        self.inner.host().is_some()
    }

    /// Saves blocks straight from an engine's KV tensors: block `i` is read
    /// from block id `block_ids[i]` of every layer and stored under
    /// `keys[i]`. `layers`: (address of block 0, bytes between blocks,
    /// number of blocks), one per layer, as `_copy_blocks` takes them; a
    /// block is every layer's `layer_block_bytes`, in layer order, and must
    /// make up the namespace's block. Each block is copied once, into space
    /// reserved in the host tier, and becomes visible when its copy is
    /// done. Present keys are not copied. Returns {"stored", "present",
    /// "not_admitted"}, as `put` does; bad input raises before anything is
    /// stored. Low level: the addresses must be live tensor storage on
    /// `device`, not written during the call.
    #[pyo3(signature = (ns, keys, layers, layer_block_bytes, block_ids, device = "cpu"))]
    #[allow(clippy::too_many_arguments)]
    fn save_blocks<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        keys: Vec<Vec<u8>>,
        layers: Vec<(u64, u64, u64)>,
        layer_block_bytes: usize,
        block_ids: Vec<u64>,
        device: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = self.transfer(ns, keys, layers, layer_block_bytes, &block_ids, device)?;
        let m = &self.inner;
        let out = py
            .detach(|| {
                let mut total = StoreOutcome::default();
                let mut done = 0;
                // A reservation may cover fewer blocks than asked (a full
                // pool, a full write-through queue, a staging buffer's
                // worth): commit it and reserve the rest.
                while done < t.keys.len() {
                    let mut r = m.reserve(t.ns, &t.keys[done..])?;
                    // SAFETY: the tensor addresses are the caller's
                    // contract (live storage on `device`, not written
                    // during the call), as for `_copy_blocks`; a failed
                    // copy drops the reservation, committing nothing of it.
                    unsafe { t.plan.save(&*t.copier, done, &mut r.slots_mut())? };
                    done += r.len();
                    let o = r.commit()?;
                    total.stored += o.stored;
                    total.present += o.present;
                    total.not_admitted += o.not_admitted;
                }
                Ok(total)
            })
            .map_err(err)?;
        put_result(py, out.stored as u64, out.present as u64, out.not_admitted as u64)
    }

    /// Loads the leading present blocks of `keys` straight into an
    /// engine's KV tensors: block `i` into block id `block_ids[i]` of every
    /// layer (`layers` as for `save_blocks`). Host-tier blocks are copied
    /// from the tier's memory, disk blocks through a reused buffer, each
    /// verified first. Returns (loaded, failed_index or None), as `get`
    /// does: loading stops at the first missing block, and a block that
    /// fails verification is never written into the tensors; recompute it
    /// and what follows. Low level: the addresses must be live tensor
    /// storage on `device`, not used during the call.
    #[pyo3(signature = (ns, keys, layers, layer_block_bytes, block_ids, device = "cpu"))]
    #[allow(clippy::too_many_arguments)]
    fn load_blocks(
        &self,
        py: Python<'_>,
        ns: &[u8],
        keys: Vec<Vec<u8>>,
        layers: Vec<(u64, u64, u64)>,
        layer_block_bytes: usize,
        block_ids: Vec<u64>,
        device: &str,
    ) -> PyResult<(usize, Option<usize>)> {
        let t = self.transfer(ns, keys, layers, layer_block_bytes, &block_ids, device)?;
        let r = py
            .detach(|| {
                self.inner.load_with(t.ns, &t.keys, |first, blocks| {
                    // SAFETY: the tensor addresses are the caller's
                    // contract (live storage on `device`, not used during
                    // the call), as for `_copy_blocks`.
                    unsafe { t.plan.load(&*t.copier, first, blocks) }
                })
            })
            .map_err(err)?;
        Ok((r.loaded, r.failed.map(|f| f.index)))
    }

    /// Waits until queued write-through blocks are on disk.
    fn flush(&self, py: Python<'_>) {
        py.detach(|| self.inner.flush());
    }

    /// Counters of the manager and its tiers, as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json::to_string(&self.inner.stats()).map_err(|e| KvTierError::new_err(e.to_string()))?;
        from_json(py, &text)
    }
}

/// A kvtierd client on a runtime of its own (one worker thread): what the
/// Python `Client` and the LMCache L2 call kvtierd through.
fn connect(py: Python<'_>, cfg: &ClientConfig) -> PyResult<(tokio::runtime::Runtime, RpcClient)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| KvTierError::new_err(format!("start the runtime: {e}")))?;
    let client = py.detach(|| rt.block_on(RpcClient::connect(cfg))).map_err(err)?;
    Ok((rt, client))
}

/// A client of kvtierd.
#[pyclass(module = "kvtier._kvtier", frozen)]
struct Client {
    rt: tokio::runtime::Runtime,
    inner: RpcClient,
}

impl Client {
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl std::future::Future<Output = kvtier::Result<T>> + Send,
    ) -> PyResult<T> {
        py.detach(|| self.rt.block_on(f)).map_err(err)
    }

    /// Checkpoints of `group` on the daemon; checks the group and chunk
    /// size first. Its calls block on this client's runtime, so make them
    /// from a thread that is not one of its workers (the caller's, detached).
    fn checkpoints(&self, group: &str, chunk_mib: i64) -> PyResult<Checkpoints<RemoteChunks>> {
        let chunk_bytes = checkpoint_chunk_bytes(group, chunk_mib)?;
        let store = self
            .inner
            .checkpoint_chunks(group, chunk_bytes, self.rt.handle().clone());
        let ns = Namespace::checkpoints(group, chunk_bytes).id();
        Ok(Checkpoints::new(store, ns, chunk_bytes))
    }
}

#[pymethods]
impl Client {
    /// Connects to kvtierd at `endpoint` (http://host:port, https:// for TLS).
    #[new]
    /// `timeout_s` bounds each call: a daemon that does not answer in time
    /// (stopped, wedged) raises UnavailableError instead of holding the
    /// caller; None waits as long as the call takes.
    #[pyo3(signature = (endpoint = "http://127.0.0.1:50051", *, token = None, ca_file = None, tls_domain = None, timeout_s = None))]
    fn new(
        py: Python<'_>,
        endpoint: &str,
        token: Option<String>,
        ca_file: Option<String>,
        tls_domain: Option<String>,
        timeout_s: Option<f64>,
    ) -> PyResult<Self> {
        let request_timeout = match timeout_s {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(std::time::Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(InvalidArgumentError::new_err(format!(
                    "timeout_s {t}: a positive number of seconds, or None"
                )));
            }
        };
        let cfg = ClientConfig {
            endpoint: endpoint.to_string(),
            token,
            ca_file: ca_file.map(Into::into),
            tls_domain,
            request_timeout,
        };
        let (rt, inner) = connect(py, &cfg)?;
        Ok(Self { rt, inner })
    }

    /// Registers a namespace (a dict); returns its 16-byte id.
    fn register_namespace<'py>(
        &self,
        py: Python<'py>,
        namespace_: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let ns = namespace(namespace_)?;
        let (id, _) = self.run(py, self.inner.register(&ns))?;
        Ok(PyBytes::new(py, &id.0.to_le_bytes()))
    }

    /// The longest present prefix of `keys`: (blocks, tier of each).
    fn lookup(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<(usize, Vec<&'static str>)> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let l = self.run(py, self.inner.lookup(ns, &keys))?;
        let tiers = l.tiers().map(kvtier_proto::convert::tier_name).collect();
        Ok((l.hit_blocks as usize, tiers))
    }

    /// The daemon's tier events of `ns`; see `Store.events`.
    #[pyo3(signature = (ns, epoch = 0, after = 0, max = 4096))]
    fn events<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        epoch: u64,
        after: u64,
        max: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ns, max) = (ns_id(ns)?, event_max(max)?);
        let p = self.run(py, self.inner.events(ns, epoch, after, max as u32))?;
        event_page(py, &p)
    }

    /// Which of the daemon's tiers hold each of `keys`; see `Store.locate`.
    fn locate(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<Vec<Vec<&'static str>>> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        self.run(py, self.inner.locate(ns, &keys)).map(located)
    }

    /// A page of the keys of `ns` the daemon's own tiers hold; see
    /// `Store.list_keys`.
    #[pyo3(signature = (ns, after = None, max = 4096))]
    fn list_keys<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        after: Option<Vec<u8>>,
        max: i64,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, bool)> {
        let (ns, after, max) = list_args(ns, after, max)?;
        let (keys, more) = self.run(py, self.inner.list_keys(ns, after, max))?;
        Ok((key_list(py, &keys), more))
    }

    /// Stores `len(keys)` blocks laid out back to back in `data`.
    fn put<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        keys_: Vec<Vec<u8>>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let buf = Buffer::get(data, false)?;
        let (p, len) = buf.ptr_len();
        // The request streams the bytes; tonic needs them owned for the call.
        // Copied without the GIL: a put on a saver thread must not hold up
        // the engine's step for the copy.
        // SAFETY: `buf` holds the buffer while they are copied.
        let bytes = py.detach(|| bytes::Bytes::copy_from_slice(unsafe { slice(p, len) }));
        drop(buf);
        let r = self.run(py, self.inner.put(ns, &keys, bytes))?;
        put_result(py, r.stored.into(), r.present.into(), r.not_admitted.into())
    }

    /// Loads the leading present blocks into `out`; returns (loaded, failed_index or None).
    fn get(
        &self,
        py: Python<'_>,
        ns: &[u8],
        keys_: Vec<Vec<u8>>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, Option<usize>)> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        let buf = Buffer::get(out, true)?;
        let (p, len) = buf.ptr_len();
        // SAFETY: `buf` holds the writable buffer until after the call.
        let h = self.run(py, self.inner.get_into(ns, &keys, unsafe { slice_mut(p, len) }))?;
        drop(buf);
        Ok((h.loaded as usize, h.failed_index.map(|i| i as usize)))
    }

    /// Removes blocks; returns how many were present.
    fn delete(&self, py: Python<'_>, ns: &[u8], keys_: Vec<Vec<u8>>) -> PyResult<u32> {
        let (ns, keys) = (ns_id(ns)?, keys(keys_)?);
        self.run(py, self.inner.delete(ns, &keys))
    }

    /// The daemon's counters, as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = self.run(py, self.inner.stats())?;
        from_json(py, &text)
    }

    /// {"status", "version", "mode", "uptime_s"}.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.run(py, self.inner.health())?;
        let d = PyDict::new(py);
        d.set_item("status", h.status)?;
        d.set_item("version", h.version)?;
        d.set_item("mode", h.mode)?;
        d.set_item("uptime_s", h.uptime_s)?;
        Ok(d)
    }

    /// Writes checkpoint `name` from `files`: a mapping {path in the
    /// checkpoint: buffer}, each buffer read where it lies (no local file
    /// first), or a directory (every regular file under it). The checkpoint
    /// exists once every chunk is stored; names are immutable
    /// (AlreadyExistsError). Returns {"name", "files", "bytes", "chunks"}.
    #[pyo3(signature = (name, files, *, group = "default", chunk_mib = 32))]
    fn checkpoint_put<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        files: &Bound<'py, PyAny>,
        group: &str,
        chunk_mib: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let c = self.checkpoints(group, chunk_mib)?;
        let m = if let Ok(map) = files.cast::<PyMapping>() {
            let items = map.items()?;
            let mut held = Vec::with_capacity(items.len());
            let mut parts = Vec::with_capacity(items.len());
            for item in items.iter() {
                let (path, data): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item.extract()?;
                let path: String = path
                    .extract()
                    .map_err(|_| InvalidArgumentError::new_err(format!("checkpoint file path {path:?}: not a str")))?;
                let buf = Buffer::get(&data, false)?;
                let (p, len) = buf.ptr_len();
                held.push(buf);
                parts.push((path, p, len));
            }
            let m = py.detach(|| {
                let files: Vec<(String, &[u8])> = parts
                    .into_iter()
                    // SAFETY: `held` holds every buffer until after detach returns.
                    .map(|(path, p, len)| (path, unsafe { slice(p, len) }))
                    .collect();
                c.put_bytes(name, &files)
            });
            drop(held);
            m
        } else {
            let dir: std::path::PathBuf = files.extract().map_err(|_| {
                InvalidArgumentError::new_err("files: a mapping {path: buffer} or a directory (str or os.PathLike)")
            })?;
            if !dir.is_dir() {
                return Err(InvalidArgumentError::new_err(format!(
                    "files: {} is not a directory",
                    dir.display()
                )));
            }
            py.detach(|| c.put_dir(name, &dir))
        }
        .map_err(err)?;
        manifest_dict(py, &m)
    }

    /// Restores checkpoint `name` under `dest` (made if missing): files
    /// appear whole and verified, or not at all. NotFoundError if there is
    /// no such checkpoint or a chunk is in no tier. Returns {"name",
    /// "files", "bytes", "chunks"}.
    #[pyo3(signature = (name, dest, *, group = "default", chunk_mib = 32))]
    fn checkpoint_get<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        dest: std::path::PathBuf,
        group: &str,
        chunk_mib: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let c = self.checkpoints(group, chunk_mib)?;
        let m = py.detach(|| c.get(name, &dest)).map_err(err)?;
        manifest_dict(py, &m)
    }

    /// The checkpoints of a group, by name: [{"name", "files", "bytes",
    /// "chunks", "created_unix_ms"}].
    #[pyo3(signature = (*, group = "default", chunk_mib = 32))]
    fn checkpoint_list<'py>(&self, py: Python<'py>, group: &str, chunk_mib: i64) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let c = self.checkpoints(group, chunk_mib)?;
        let list = py.detach(|| c.list()).map_err(err)?;
        list.iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("name", &s.name)?;
                d.set_item("files", s.files)?;
                d.set_item("bytes", s.bytes)?;
                d.set_item("chunks", s.chunks)?;
                d.set_item("created_unix_ms", s.created_unix_ms)?;
                Ok(d)
            })
            .collect()
    }

    /// Deletes checkpoint `name` (chunks other checkpoints share stay);
    /// answers whether it existed.
    #[pyo3(signature = (name, *, group = "default", chunk_mib = 32))]
    fn checkpoint_delete(&self, py: Python<'_>, name: &str, group: &str, chunk_mib: i64) -> PyResult<bool> {
        let c = self.checkpoints(group, chunk_mib)?;
        py.detach(|| c.delete(name)).map_err(err)
    }
}

fn copier(device: &str) -> PyResult<Arc<dyn Copier>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static COPIERS: OnceLock<Mutex<HashMap<String, Arc<dyn Copier>>>> = OnceLock::new();
    let mut m = COPIERS.get_or_init(Default::default).lock().expect("copier cache");
    if let Some(c) = m.get(device) {
        return Ok(c.clone());
    }
    let c: Arc<dyn Copier> = match device {
        "cpu" => Arc::new(kvtier::transfer::host::HostCopier),
        d if d.starts_with("cuda") => {
            let ordinal = d
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .map_err(|_| InvalidArgumentError::new_err(format!("device {d:?}: expected cpu, cuda or cuda:N")))?;
            #[cfg(feature = "cuda")]
            {
                Arc::new(kvtier::transfer::cuda::CudaCopier::new(ordinal).map_err(err)?)
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = ordinal;
                return Err(KvTierError::new_err("built without the cuda feature"));
            }
        }
        d => {
            return Err(InvalidArgumentError::new_err(format!(
                "device {d:?}: expected cpu, cuda or cuda:N"
            )));
        }
    };
    m.insert(device.to_string(), c.clone());
    Ok(c)
}

/// The engine's layers as the copier plans them: (address of block 0,
/// bytes between blocks, number of blocks), one per layer.
fn layer_blocks(layers: Vec<(u64, u64, u64)>) -> Vec<LayerBlocks> {
    layers
        .into_iter()
        .map(|(base, block_stride, num_blocks)| LayerBlocks {
            base,
            block_stride,
            num_blocks,
        })
        .collect()
}

/// Copies blocks between an engine's KV tensors and a block-major staging
/// buffer (each block: every layer's `layer_block_bytes`, in layer order).
/// `layers`: (address of block 0, bytes between blocks, number of blocks),
/// one per layer. `direction`: "save" (tensors → staging) or "load".
/// Low level: the addresses must be live tensor storage on `device`; the
/// connector passes its registered tensors' `data_ptr()`s.
#[pyfunction]
#[pyo3(signature = (direction, layers, layer_block_bytes, block_ids, staging, device = "cpu"))]
fn _copy_blocks(
    py: Python<'_>,
    direction: &str,
    layers: Vec<(u64, u64, u64)>,
    layer_block_bytes: usize,
    block_ids: Vec<u64>,
    staging: &Bound<'_, PyAny>,
    device: &str,
) -> PyResult<()> {
    use kvtier::transfer::{Direction, plan};
    let dir = match direction {
        "save" => Direction::ToStaging,
        "load" => Direction::FromStaging,
        d => {
            return Err(InvalidArgumentError::new_err(format!(
                "direction {d:?}: expected save or load"
            )));
        }
    };
    let layers = layer_blocks(layers);
    let segments = plan(&layers, layer_block_bytes, &block_ids).map_err(err)?;
    let copier = copier(device)?;
    let buf = Buffer::get(staging, true)?;
    let (p, len) = buf.ptr_len();
    // SAFETY: `buf` holds the staging buffer (writable for a save) until
    // after detach returns; the tensor addresses are the caller's contract.
    py.detach(|| unsafe { copier.copy(dir, &segments, slice_mut(p, len)) })
        .map_err(err)?;
    drop(buf);
    Ok(())
}

/// The 16-byte key of an engine-provided block hash (e.g. vLLM's) in a namespace.
#[pyfunction]
fn key_from_hash<'py>(py: Python<'py>, ns: &[u8], engine_hash: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let k = BlockKey::from_opaque(ns_id(ns)?, engine_hash);
    Ok(PyBytes::new(py, &k.to_le_bytes()))
}

/// The 16-byte keys of a request's engine-provided block hashes in a
/// namespace, in one call: the same keys as `[key_from_hash(ns, h) for h in
/// hashes]`. vLLM's block hashes are bytes; a hash must be bytes-like
/// (bytes, bytearray, a C-contiguous memoryview). Anything else raises
/// TypeError naming its index and type: it is never turned into a key
/// through its repr. Each key is one hash of a few dozen bytes, far less
/// than releasing the interpreter costs, so it stays held.
#[pyfunction]
fn keys_from_hashes<'py>(py: Python<'py>, ns: &[u8], hashes: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let ns = ns_id(ns)?;
    let type_name = |o: &Bound<'py, PyAny>| o.get_type().name().map(|n| n.to_string());
    let items = hashes.try_iter().map_err(|_| {
        let t = type_name(hashes).unwrap_or_default();
        PyTypeError::new_err(format!("hashes: an iterable of bytes-like block hashes, got {t}"))
    })?;
    let mut out = Vec::with_capacity(hashes.len().unwrap_or(0));
    for (i, h) in items.enumerate() {
        let h = h?;
        let key = if let Ok(b) = h.cast::<PyBytes>() {
            BlockKey::from_opaque(ns, b.as_bytes())
        } else if let Ok(b) = h.cast::<PyByteArray>() {
            BlockKey::from_opaque(ns, &b.to_vec())
        } else if h.cast::<PyMemoryView>().is_ok() {
            let buf = Buffer::get(&h, false).map_err(|e| PyTypeError::new_err(format!("hashes[{i}]: {e}")))?;
            let (p, len) = buf.ptr_len();
            // SAFETY: `buf` holds the buffer for the hash, and the
            // interpreter stays attached, so no Python code changes it.
            BlockKey::from_opaque(ns, unsafe { slice(p, len) })
        } else {
            return Err(PyTypeError::new_err(format!(
                "hashes[{i}]: a block hash is bytes-like (bytes, bytearray, memoryview), got {}",
                type_name(&h)?
            )));
        };
        out.push(PyBytes::new(py, &key.to_le_bytes()));
    }
    Ok(out)
}

/// Chained 16-byte keys of every full block of `tokens` in a namespace (a dict).
#[pyfunction]
fn keys_from_tokens<'py>(
    py: Python<'py>,
    namespace_: &Bound<'py, PyAny>,
    tokens: Vec<u32>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let ns = namespace(namespace_)?;
    let hashes = SequenceHasher::for_namespace(&ns).hash_all(&tokens);
    Ok(hashes.iter().map(|h| PyBytes::new(py, &h.key.to_le_bytes())).collect())
}

/// `what` as a u32: an int out of range is a `ValueError` naming it, a
/// value that is not an int a `TypeError`.
fn u32_arg(v: &Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<u32> {
    if let Ok(x) = v.extract::<u32>() {
        return Ok(x);
    }
    // numpy integers are not `int` subclasses but convert to i64.
    if v.cast::<PyInt>().is_ok() || v.extract::<i64>().is_ok() {
        return Err(PyValueError::new_err(format!(
            "{} is {v}, not in 0..={}",
            what(),
            u32::MAX
        )));
    }
    let t = v.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    Err(PyTypeError::new_err(format!("{} must be an int, got {t}", what())))
}

/// NVIDIA Dynamo's KV-router hashes of every full block of `tokens`: the
/// block hashes and the chained sequence hashes (`kvtier::block` documents
/// the scheme). A partial tail is not a block.
#[pyfunction]
#[pyo3(signature = (tokens, block_size, lora_name = None, cache_namespace = None))]
fn dynamo_hashes(
    tokens: &Bound<'_, PyAny>,
    block_size: &Bound<'_, PyAny>,
    lora_name: Option<&str>,
    cache_namespace: Option<&str>,
) -> PyResult<(Vec<u64>, Vec<u64>)> {
    let block = u32_arg(block_size, &|| "block_size".to_string())?;
    if block == 0 {
        return Err(PyValueError::new_err(
            "block_size is 0, a block holds at least one token",
        ));
    }
    let items = tokens.try_iter().map_err(|_| {
        let t = tokens.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        PyTypeError::new_err(format!("tokens: an iterable of token ids, got {t}"))
    })?;
    let mut ids = Vec::with_capacity(tokens.len().unwrap_or(0));
    for (i, t) in items.enumerate() {
        ids.push(u32_arg(&t?, &|| format!("tokens[{i}]"))?);
    }
    let seed = dynamo_seed(lora_name, cache_namespace);
    // The Dynamo form does not depend on the namespace or salt: only the
    // kvtier keys, which this function does not return, do.
    let hashes = SequenceHasher::new(NamespaceId(0), block, None, seed).hash_all(&ids);
    Ok(hashes
        .iter()
        .map(|h| (h.dynamo_block_hash, h.dynamo_sequence_hash))
        .unzip())
}

#[pymodule]
fn _kvtier(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Store>()?;
    m.add_class::<Client>()?;
    m.add_class::<l2::LmcacheL2>()?;
    m.add_class::<l2::LmcacheRemote>()?;
    m.add_function(wrap_pyfunction!(key_from_hash, m)?)?;
    m.add_function(wrap_pyfunction!(keys_from_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(keys_from_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(dynamo_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(_copy_blocks, m)?)?;
    m.add("KvTierError", py.get_type::<KvTierError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("BlockSizeError", py.get_type::<BlockSizeError>())?;
    m.add("UnknownNamespaceError", py.get_type::<UnknownNamespaceError>())?;
    m.add("NoSpaceError", py.get_type::<NoSpaceError>())?;
    m.add("ThrottledError", py.get_type::<ThrottledError>())?;
    m.add("TooLargeError", py.get_type::<TooLargeError>())?;
    m.add("PermissionDeniedError", py.get_type::<PermissionDeniedError>())?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("UnavailableError", py.get_type::<UnavailableError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("AlreadyExistsError", py.get_type::<AlreadyExistsError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
