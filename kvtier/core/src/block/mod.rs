//! Block identity: what makes two KV blocks the same, and their storage keys.
//!
//! - [`Namespace`] fingerprints everything that makes KV incompatible (model,
//!   dtype, layout, tensor-parallel position, salt, LoRA); its
//!   [`NamespaceId`] is the root of every key made in it, so a block of one
//!   model can never be found under another.
//! - [`SequenceHasher`] chains token blocks into 128-bit [`BlockKey`]s (each
//!   key names its whole prefix) and, alongside, the 64-bit block and
//!   sequence hashes that NVIDIA Dynamo's KV router computes, for interop.
//! - [`BlockKey::from_opaque`] wraps hashes an engine brings itself (vLLM's
//!   block hashes) inside a namespace.

mod hash;
mod namespace;

pub use hash::{BlockHashes, DYNAMO_BASE_SEED, SequenceHasher, dynamo_seed};
pub use namespace::{Dtype, KvKind, KvLayout, Namespace, NamespaceId};

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// The 128-bit key under which kvtier stores a block.
///
/// Keys are outputs of xxh3-128 seeded by the namespace, so they are already
/// uniformly distributed; 64-bit keys would collide at cluster scale (a
/// billion blocks give a 2.7% chance of a collision at 64 bits).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct BlockKey(pub u128);

impl BlockKey {
    /// The key of an engine-provided block hash (any bytes, e.g. vLLM's
    /// 32-byte block hash) inside a namespace. Engines' hashes already chain
    /// their prefix; the namespace keeps other models' blocks apart.
    pub fn from_opaque(ns: NamespaceId, engine_hash: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(1 + 16 + engine_hash.len());
        buf.push(b'O');
        buf.extend_from_slice(&ns.0.to_le_bytes());
        buf.extend_from_slice(engine_hash);
        Self(xxhash_rust::xxh3::xxh3_128(&buf))
    }

    /// Little-endian bytes, as stored on disk and on the wire.
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// Inverse of [`BlockKey::to_le_bytes`].
    pub fn from_le_bytes(b: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(b))
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({:032x})", self.0)
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Hash for BlockKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The key is already a hash: fold it instead of hashing it again.
        state.write_u64((self.0 as u64) ^ ((self.0 >> 64) as u64));
    }
}

/// A hasher for maps keyed by [`BlockKey`]: it passes the folded key through.
#[derive(Default, Debug, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for types other than BlockKey; stay correct for them.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// `HashMap` with the pass-through hasher, for maps keyed by [`BlockKey`].
pub type KeyMap<V> = std::collections::HashMap<BlockKey, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_keys_depend_on_namespace_and_bytes() {
        let a = NamespaceId(1);
        let b = NamespaceId(2);
        assert_ne!(BlockKey::from_opaque(a, b"h"), BlockKey::from_opaque(b, b"h"));
        assert_ne!(BlockKey::from_opaque(a, b"h"), BlockKey::from_opaque(a, b"i"));
        assert_eq!(BlockKey::from_opaque(a, b"h"), BlockKey::from_opaque(a, b"h"));
    }

    #[test]
    fn opaque_key_vector_is_pinned() {
        // Computed independently with the Python `xxhash` package. Changing
        // it orphans every stored block: bump the record format version instead.
        let k = BlockKey::from_opaque(NamespaceId(0x0123_4567_89ab_cdef), &[0xaa; 32]);
        assert_eq!(k.to_string(), "48e5d9e5f99b01cf98b21e7be88032df");
    }

    #[test]
    fn key_bytes_round_trip() {
        let k = BlockKey(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);
        assert_eq!(BlockKey::from_le_bytes(k.to_le_bytes()), k);
    }
}
