//! The Rust half of in-process LMCache's `RemoteConnector` plugin
//! (`kvtier.lmcache.KvTierConnector`, in `connectors/lmcache/kvtier/`):
//! [`LmcacheRemote`], an [`LmcacheL2`] underneath (the same batches on the
//! same threads, completions on the same eventfd, the same namespaces and
//! block header) with two additions the connector needs.
//!
//! - **Keys it can list back.** LMCache asks a remote connector to `list()`
//!   its chunks, also after both sides restarted, and kvtier's opaque keys
//!   (xxh3 of namespace and hash) cannot be read back. A chunk hash of
//!   in-process LMCache 0.5.6 is a Python int in [-2^63, 2^64): the builtin
//!   `hash` (signed 64-bit) or a digest folded to its first 8 bytes
//!   (unsigned). It travels in the object key as 9 bytes, big-endian two's
//!   complement, and its block key is a permutation of those 72 bits with
//!   56 zero bits above them, keyed by the namespace: a 4-round Feistel
//!   network over the two 64-bit halves with xxh3 as the round function and
//!   round keys from the namespace id. So a key decodes to its hash; keys
//!   stay uniformly distributed, as placement and the tiers' maps expect;
//!   and a key of another namespace, or an opaque one, decodes to nonzero
//!   check bits but with chance 2^-56 and is skipped. Keys are listed a
//!   page at a time (`BlockManager::list_keys`, kvtierd's `ListKeys`), the
//!   namespaces from the manager or `ListNamespaces`.
//! - **Loads of unknown length.** The connector's `get` allocates a full
//!   chunk before it knows whether the object is the shorter last chunk of
//!   a prompt: `submit_batch_get` fills the front of each buffer (which may
//!   be longer than the object, never shorter) and writes each object's
//!   length into one more buffer.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use kvtier::manager::MAX_LIST_KEYS;
use kvtier::{BlockKey, Namespace, NamespaceId};

use super::{Backend, HEADER_BYTES, Held, Inner, LmcacheL2, NS_PREFIX, ObjectKey, Op, check_header};
use crate::{Buffer, InvalidArgumentError, KvTierError, err};

/// LMCache 0.5.6's chunk hashes: Python's builtin `hash` (signed 64-bit)
/// or a digest's first 8 bytes read big-endian (unsigned 64-bit).
const HASH_MIN: i128 = -(1 << 63);
const HASH_MAX: i128 = (1 << 64) - 1;
/// A chunk hash in an object key: 72-bit big-endian two's complement.
const HASH_BYTES: usize = 9;
const HASH_BITS: u32 = 72;
const ROUNDS: usize = 4;
/// Seeds the round keys. Changing it (or the rounds) orphans every chunk
/// stored: a test pins a key.
const DOMAIN: u64 = 0x6b76_7469_6572_2d72; // "kvtier-r"

/// The chunk hash of 9 key bytes, if they are one LMCache makes.
fn decode_hash(b: &[u8]) -> Result<i128, String> {
    if b.len() != HASH_BYTES {
        return Err(format!(
            "chunk hash is {} bytes; in-process LMCache keys carry {HASH_BYTES} (big-endian two's complement)",
            b.len()
        ));
    }
    let mut w = [if b[0] & 0x80 != 0 { 0xff } else { 0 }; 16];
    w[16 - HASH_BYTES..].copy_from_slice(b);
    let h = i128::from_be_bytes(w);
    if !(HASH_MIN..=HASH_MAX).contains(&h) {
        return Err(format!("chunk hash {h} is outside [-2^63, 2^64)"));
    }
    Ok(h)
}

fn encode_hash(h: i128) -> [u8; HASH_BYTES] {
    h.to_be_bytes()[16 - HASH_BYTES..].try_into().expect("9 bytes")
}

fn round_keys(ns: NamespaceId) -> [u64; ROUNDS] {
    let id = ns.0.to_le_bytes();
    std::array::from_fn(|i| xxh3_64_with_seed(&id, DOMAIN.wrapping_add(i as u64)))
}

fn round(half: u64, key: u64) -> u64 {
    xxh3_64_with_seed(&half.to_le_bytes(), key)
}

/// The block key of a chunk hash (9 bytes `parse_key` checked) in `ns`.
pub(super) fn listable_key(ns: NamespaceId, hash: &[u8]) -> BlockKey {
    let h = decode_hash(hash).expect("parse_key checked the chunk hash");
    let v = (h as u128) & ((1 << HASH_BITS) - 1);
    let (mut l, mut r) = ((v >> 64) as u64, v as u64);
    for k in round_keys(ns) {
        (l, r) = (r, l ^ round(r, k));
    }
    BlockKey((u128::from(l) << 64) | u128::from(r))
}

/// The chunk hash a block key of `ns` was made from, or None when the key
/// is not a listable key of `ns`.
fn listed_hash(ns: NamespaceId, key: BlockKey) -> Option<i128> {
    let (mut l, mut r) = ((key.0 >> 64) as u64, key.0 as u64);
    for k in round_keys(ns).into_iter().rev() {
        (l, r) = (r ^ round(l, k), l);
    }
    let v = (u128::from(l) << 64) | u128::from(r);
    if v >> HASH_BITS != 0 {
        return None;
    }
    // Sign-extend the 72 bits.
    let h = ((v << (128 - HASH_BITS)) as i128) >> (128 - HASH_BITS);
    (HASH_MIN..=HASH_MAX).contains(&h).then_some(h)
}

/// An object key of the connector: LMCache's L2 form with a 9-byte hash.
fn parse_key(key: &str) -> Result<ObjectKey, String> {
    let mut k = super::parse_key(key)?;
    decode_hash(&k.hash).map_err(|e| format!("LMCache key {key:?}: {e}"))?;
    k.listable = true;
    Ok(k)
}

fn parse_all(keys: &[String]) -> Vec<Result<ObjectKey, String>> {
    keys.iter().map(|k| parse_key(k)).collect()
}

/// The length of the object in `block`, if it is a whole object block of
/// at most `cap` bytes.
fn object_len(block: &[u8], cap: usize) -> Result<usize, String> {
    let stored = block
        .get(8..HEADER_BYTES)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or("not an LMCache object block (short)")?;
    let stored = usize::try_from(stored).unwrap_or(usize::MAX).min(block.len());
    check_header(block, stored)?;
    if stored == 0 || stored > cap {
        return Err(format!("object is {stored} bytes, the buffer {cap}"));
    }
    Ok(stored)
}

/// A chunk listed: its namespace's scope (`model@rank@group`), salt, and
/// chunk hash.
type Listed = (String, Option<String>, [u8; HASH_BYTES]);

impl Backend {
    /// Every namespace the store knows, with its block size.
    fn namespaces(&self) -> kvtier::Result<Vec<(NamespaceId, Namespace)>> {
        match self {
            Self::Embedded(m) => Ok(m.namespaces()),
            Self::Daemon(d) => {
                let infos = d.rt.block_on(d.client.namespaces())?;
                // An entry that does not convert is not one of ours.
                Ok(infos
                    .iter()
                    .filter_map(|i| {
                        let id = kvtier_proto::convert::namespace_id(&i.namespace_id).ok()?;
                        let ns = kvtier_proto::convert::namespace(i.namespace.as_ref()?).ok()?;
                        Some((id, ns))
                    })
                    .collect())
            }
        }
    }

    fn list_keys(&self, ns: NamespaceId, after: Option<BlockKey>, max: usize) -> kvtier::Result<(Vec<BlockKey>, bool)> {
        match self {
            Self::Embedded(m) => m.list_keys(ns, after, max),
            Self::Daemon(d) => d.rt.block_on(d.client.list_keys(ns, after, max as u32)),
        }
    }
}

impl Inner {
    /// Loads each object into the front of its buffer, which is at least as
    /// long, and its length (0 for none) as a little-endian u64 into the
    /// last buffer, 8 bytes per key.
    pub(super) fn get_up_to(
        &self,
        b: &Backend,
        keys: &[Result<ObjectKey, String>],
        bufs: &[Held],
    ) -> (bool, String, Vec<bool>) {
        let (bufs, lengths) = bufs.split_at(keys.len());
        let (lp, ll) = lengths[0].ptr_len();
        assert_eq!(ll, 8 * keys.len(), "submit_batch_get checked the lengths buffer");
        // SAFETY: acquired writable and held by the job; the connector reads
        // it only after the completion.
        let lengths = unsafe { crate::slice_mut(lp, ll) };
        lengths.fill(0);
        let mut per_key = vec![false; keys.len()];
        let mut errors = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let (p, cap) = bufs[i].ptr_len();
            // The object's length once checked, before a byte reaches LMCache.
            let mut checked = Ok(0);
            let mut take = |block: &[u8]| {
                checked = object_len(block, cap);
                if let Ok(n) = checked {
                    // SAFETY: as `lengths`; n <= cap, the buffer's length.
                    unsafe { crate::slice_mut(p, n) }.copy_from_slice(&block[HEADER_BYTES..HEADER_BYTES + n]);
                }
            };
            let r = self
                .block_key(b, k)
                .and_then(|(ns, key)| b.load(ns, key, self.block_bytes(), &mut take));
            match (r, checked) {
                (Ok(true), Ok(n)) => {
                    lengths[8 * i..8 * i + 8].copy_from_slice(&(n as u64).to_le_bytes());
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

    /// The chunks in namespaces of this object's block size whose scope
    /// starts with `prefix`, at most `max`, and whether more were left out.
    fn list(&self, b: &Backend, prefix: &str, max: usize) -> kvtier::Result<(Vec<Listed>, bool)> {
        let block = self.block_bytes() as u64;
        let mut out: Vec<Listed> = Vec::new();
        for (id, ns) in b.namespaces()? {
            let Some(scope) = ns.model_id.strip_prefix(NS_PREFIX) else {
                continue;
            };
            if ns.block_bytes() != block || !scope.starts_with(prefix) {
                continue;
            }
            let mut after = None;
            loop {
                // One more than asked for says whether any were left out.
                let want = max.saturating_sub(out.len()).saturating_add(1).min(MAX_LIST_KEYS);
                let (keys, more) = b.list_keys(id, after, want)?;
                after = keys.last().copied();
                for k in keys {
                    if let Some(h) = listed_hash(id, k) {
                        if out.len() == max {
                            return Ok((out, true));
                        }
                        out.push((scope.to_string(), ns.salt.clone(), encode_hash(h)));
                    }
                }
                if !more {
                    break;
                }
            }
        }
        Ok((out, false))
    }
}

/// In-process LMCache's remote-storage plugin in Rust (see the module
/// docs); `kvtier.lmcache.KvTierConnector` drives it.
#[pyclass(module = "kvtier._kvtier", frozen)]
pub(crate) struct LmcacheRemote {
    l2: Py<LmcacheL2>,
}

impl LmcacheRemote {
    fn l2(&self) -> &LmcacheL2 {
        self.l2.get()
    }
}

#[pymethods]
impl LmcacheRemote {
    /// Takes the keywords of `KvTierL2`: `chunk_bytes`, and `endpoint`,
    /// `store` or `disk_dir` with their options.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let l2 = py.get_type::<LmcacheL2>().call((), kwargs)?;
        Ok(Self {
            l2: l2.cast_into::<LmcacheL2>()?.unbind(),
        })
    }

    /// The eventfd that is readable while completions are queued.
    fn event_fd(&self) -> i32 {
        self.l2().event_fd()
    }

    /// Stores each object (at most `chunk_bytes`); keys as `KvTierL2`'s,
    /// with 9-byte chunk hashes.
    fn submit_batch_set(&self, py: Python<'_>, keys: Vec<String>, bufs: &Bound<'_, PyList>) -> PyResult<u64> {
        self.l2().submit_parsed(py, Op::Set, parse_all(&keys), Some(bufs), None)
    }

    /// Loads each object into the front of its buffer (at least as long as
    /// the object) and its length, 0 for none, into `lengths` (8 bytes per
    /// key, little-endian u64).
    fn submit_batch_get(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        bufs: &Bound<'_, PyList>,
        lengths: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let lengths = Held(Buffer::get(lengths, true)?);
        let n = lengths.ptr_len().1;
        if n != 8 * keys.len() {
            return Err(InvalidArgumentError::new_err(format!(
                "lengths is {n} bytes; it takes 8 per key, {}",
                8 * keys.len()
            )));
        }
        self.l2()
            .submit_parsed(py, Op::GetUpTo, parse_all(&keys), Some(bufs), Some(lengths))
    }

    fn submit_batch_exists(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<u64> {
        self.l2().submit_parsed(py, Op::Exists, parse_all(&keys), None, None)
    }

    fn submit_batch_delete(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<u64> {
        self.l2().submit_parsed(py, Op::Delete, parse_all(&keys), None, None)
    }

    /// As `KvTierL2.drain_completions`.
    fn drain_completions(&self) -> Vec<(u64, bool, String, Option<Vec<bool>>)> {
        self.l2().drain_completions()
    }

    /// The chunks held in namespaces whose scope (`model@rank@group`)
    /// starts with `scope_prefix` and whose blocks are this object's size:
    /// `([(scope, salt, 9-byte hash)], truncated)`, at most `max`. The
    /// namespaces of `known` (object keys) are registered first: an embedded
    /// store knows only those registered since it opened, kvtierd keeps its
    /// own. Blocks, and the daemon's calls, without the interpreter.
    #[allow(clippy::type_complexity)]
    fn list_objects<'py>(
        &self,
        py: Python<'py>,
        scope_prefix: &str,
        max: usize,
        known: Vec<String>,
    ) -> PyResult<(Vec<(String, Option<String>, Bound<'py, PyBytes>)>, bool)> {
        let known = known
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(InvalidArgumentError::new_err)?;
        let inner = &self.l2().inner;
        let (listed, truncated) = py
            .detach(|| {
                let backend = inner.backend.read();
                let b = backend
                    .as_ref()
                    .ok_or_else(|| kvtier::Error::new(kvtier::ErrorKind::Closed, "kvtier L2 is closed"))?;
                for k in &known {
                    inner.ns(b, k)?;
                }
                inner.list(b, scope_prefix, max)
            })
            .map_err(|e| match e.kind() {
                kvtier::ErrorKind::Closed => KvTierError::new_err(e.to_string()),
                _ => err(e),
            })?;
        let listed = listed
            .into_iter()
            .map(|(scope, salt, h)| (scope, salt, PyBytes::new(py, &h)))
            .collect();
        Ok((listed, truncated))
    }

    /// Objects stored, loaded, missed and failed since start.
    fn stats(&self) -> (u64, u64, u64, u64) {
        self.l2().stats()
    }

    /// As `KvTierL2.close`. Idempotent.
    fn close(&self, py: Python<'_>) {
        self.l2().close(py)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [i128; 9] = [HASH_MIN, HASH_MIN + 1, -2, -1, 0, 1, (1 << 63) - 1, 1 << 63, HASH_MAX];

    fn key(ns: NamespaceId, h: i128) -> BlockKey {
        listable_key(ns, &encode_hash(h))
    }

    #[test]
    fn listable_keys_decode_to_their_hash_in_their_namespace_only() {
        let (a, b) = (NamespaceId(0x1234), NamespaceId(0x1235));
        let mut seen = std::collections::HashSet::new();
        let mut hashes: Vec<i128> = EDGES.to_vec();
        // A spread of others, the same every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            hashes.push(i128::from(x as i64));
            hashes.push(i128::from(x));
        }
        for &h in &hashes {
            let k = key(a, h);
            assert_eq!(listed_hash(a, k), Some(h), "{h}");
            assert_eq!(listed_hash(b, k), None, "{h}: a key of another namespace is refused");
            assert_ne!(key(b, h), k);
            seen.insert(k);
        }
        hashes.sort();
        hashes.dedup();
        assert_eq!(seen.len(), hashes.len(), "distinct hashes, distinct keys");
        // Keys made opaquely are refused.
        for i in 0..1000u32 {
            assert_eq!(listed_hash(a, BlockKey::from_opaque(a, &i.to_le_bytes())), None);
        }
    }

    #[test]
    fn listable_keys_spread_over_all_bits() {
        // Consecutive hashes (the common case of small ints) set each of the
        // 128 key bits about half the time.
        let ns = NamespaceId(7);
        let mut ones = [0u32; 128];
        for h in 0..4096 {
            let k = key(ns, h).0;
            for (bit, n) in ones.iter_mut().enumerate() {
                *n += ((k >> bit) & 1) as u32;
            }
        }
        for (bit, n) in ones.iter().enumerate() {
            assert!((1700..2400).contains(n), "bit {bit} set {n} times of 4096");
        }
    }

    #[test]
    fn listable_key_vector_is_pinned() {
        // Computed independently with the Python `xxhash` package. Changing
        // it orphans every chunk stored through the connector.
        let k = key(NamespaceId(0x0123_4567_89ab_cdef), -42);
        assert_eq!(k.to_string(), "c1786f2fb3e3d8b22b49183860811db5");
        assert_eq!(listed_hash(NamespaceId(0x0123_4567_89ab_cdef), k), Some(-42));
    }

    #[test]
    fn hashes_travel_as_nine_bytes_of_twos_complement() {
        assert_eq!(encode_hash(-1), [0xff; 9]);
        assert_eq!(
            encode_hash(HASH_MAX),
            [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(encode_hash(HASH_MIN), [0xff, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        for h in EDGES {
            assert_eq!(decode_hash(&encode_hash(h)), Ok(h));
        }
        for (bytes, why) in [
            (vec![0u8; 8], "is 8 bytes"),
            (vec![0u8; 10], "is 10 bytes"),
            (encode_hash(HASH_MAX + 1).to_vec(), "outside [-2^63, 2^64)"),
            (encode_hash(HASH_MIN - 1).to_vec(), "outside [-2^63, 2^64)"),
        ] {
            let e = decode_hash(&bytes).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let e = parse_key("m|1|half@00000000@0@00ff").unwrap_err();
        assert!(e.contains("is 2 bytes"), "{e}");
        let k = parse_key("m|1|half@00000000@0@ffffffffffffffffff@a=b").unwrap();
        assert!(k.listable);
        assert_eq!(k.salt.as_deref(), Some("a=b"));
    }

    #[test]
    fn objects_of_unknown_length_fit_their_buffer_or_miss() {
        let mut b = vec![0u8; HEADER_BYTES + 64];
        b[..4].copy_from_slice(super::super::MAGIC);
        b[4..8].copy_from_slice(&super::super::VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&40u64.to_le_bytes());
        assert_eq!(object_len(&b, 64), Ok(40));
        assert_eq!(object_len(&b, 40), Ok(40));
        assert!(object_len(&b, 39).unwrap_err().contains("40 bytes, the buffer 39"));
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(object_len(&b, 64).is_err(), "a length past the block");
        b[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert!(object_len(&b, 64).is_err(), "an empty object");
        b[0] = b'X';
        assert!(object_len(&b, 64).unwrap_err().contains("magic"));
        assert!(object_len(&b[..10], 64).is_err());
    }
}
