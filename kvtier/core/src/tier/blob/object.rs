//! Blob object names and contents.
//!
//! **Names** spread load over Azure Storage's range partitions: a three-hex
//! hash of the namespace and key goes first, so consecutive blocks of one
//! prompt (and blocks of one model) land on unrelated name ranges:
//!
//! ```text
//! {prefix}{hhh}/{namespace:032x}/{key:032x}
//! ```
//!
//! **Contents** are one disk-tier record with its data packed right after
//! the 64-byte header (see `tier::disk::record`): magic, version, key,
//! namespace, length, and an xxh3-64 of the data seeded by key and
//! namespace. A read checks the object's size, every header field and the
//! data checksum, so a truncated, altered or foreign object is never served.

use object_store::path::Path;

use crate::block::{BlockKey, NamespaceId};
use crate::tier::disk::record::{HEADER_BYTES, RecordHeader, data_hash};

/// Bytes an object takes beyond its block: the record header.
pub const OBJECT_OVERHEAD_BYTES: usize = HEADER_BYTES;

/// The object name of `key` in `ns` under `prefix` (empty, or ending in `/`).
pub fn object_name(prefix: &str, ns: NamespaceId, key: BlockKey) -> String {
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&ns.0.to_le_bytes());
    id[16..].copy_from_slice(&key.to_le_bytes());
    let spread = xxhash_rust::xxh3::xxh3_64(&id) >> 52;
    format!("{prefix}{spread:03x}/{ns}/{key}")
}

/// [`object_name`] as an `object_store` path.
pub(crate) fn object_path(prefix: &str, ns: NamespaceId, key: BlockKey) -> Path {
    Path::from(object_name(prefix, ns, key))
}

/// Writes the header of `data` (stored as `key` in `ns`) into `out`, which
/// is [`OBJECT_OVERHEAD_BYTES`] long.
pub(crate) fn encode_header(ns: NamespaceId, key: BlockKey, data: &[u8], out: &mut [u8]) {
    RecordHeader {
        flags: 0,
        data_offset: HEADER_BYTES as u32,
        key,
        ns,
        data_len: data.len() as u64,
        data_hash: data_hash(key, ns, data),
        segment: 0,
    }
    .encode(out);
}

/// The block length a read expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this many bytes (KV blocks).
    Exact(usize),
    /// Any length up to this (checkpoint chunks, manifests).
    AtMost(usize),
}

impl From<usize> for Expect {
    fn from(n: usize) -> Self {
        Expect::Exact(n)
    }
}

impl Expect {
    /// Whether a block of `len` bytes is acceptable.
    pub fn fits(self, len: usize) -> bool {
        match self {
            Expect::Exact(n) => len == n,
            Expect::AtMost(n) => len <= n,
        }
    }
}

/// Why an object's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The object's length does not fit what was expected (the wanted
    /// length, or the most for a variable block).
    Size { got: usize, want: usize },
    /// The header does not parse or names another block.
    Header,
    /// The data does not match its checksum.
    Checksum,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Size { got, want } => write!(f, "object is {got} bytes, expected {want}"),
            Refused::Header => f.write_str("object header is invalid or names another block"),
            Refused::Checksum => f.write_str("object data does not match its checksum"),
        }
    }
}

/// Checks a whole object's bytes as block `key` of `ns` of the `expect`ed
/// length; answers the offset of the data.
pub(crate) fn verify(ns: NamespaceId, key: BlockKey, expect: Expect, obj: &[u8]) -> Result<usize, Refused> {
    let data_len = obj.len().saturating_sub(OBJECT_OVERHEAD_BYTES);
    if obj.len() < OBJECT_OVERHEAD_BYTES || !expect.fits(data_len) {
        let (Expect::Exact(n) | Expect::AtMost(n)) = expect;
        return Err(Refused::Size {
            got: obj.len(),
            want: OBJECT_OVERHEAD_BYTES + n,
        });
    }
    let block_bytes = data_len;
    let h = RecordHeader::decode(obj).ok_or(Refused::Header)?;
    let fields_match = h.key == key
        && h.ns == ns
        && h.flags == 0
        && h.segment == 0
        && h.data_offset as usize == HEADER_BYTES
        && h.data_len == block_bytes as u64;
    if !fields_match {
        return Err(Refused::Header);
    }
    if data_hash(key, ns, &obj[HEADER_BYTES..]) != h.data_hash {
        return Err(Refused::Checksum);
    }
    Ok(HEADER_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ns: NamespaceId, key: BlockKey, data: &[u8]) -> Vec<u8> {
        let mut o = vec![0u8; OBJECT_OVERHEAD_BYTES + data.len()];
        encode_header(ns, key, data, &mut o[..OBJECT_OVERHEAD_BYTES]);
        o[OBJECT_OVERHEAD_BYTES..].copy_from_slice(data);
        o
    }

    #[test]
    fn names_spread_and_are_stable() {
        let ns = NamespaceId(7);
        let n = object_name("kv/", ns, BlockKey(42));
        assert_eq!(n, object_name("kv/", ns, BlockKey(42)));
        assert!(n.starts_with("kv/"), "{n}");
        assert!(n.ends_with(&format!("/{ns}/{}", BlockKey(42))), "{n}");
        // 256 consecutive keys of one namespace use many of the 4096 spreads.
        let spreads: std::collections::HashSet<String> = (0..256u128)
            .map(|k| object_name("", ns, BlockKey(k))[..3].to_string())
            .collect();
        assert!(spreads.len() > 200, "only {} distinct spreads", spreads.len());
    }

    #[test]
    fn verify_accepts_its_own_objects_only() {
        let (ns, key) = (NamespaceId(3), BlockKey(9));
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let o = object(ns, key, &data);
        assert_eq!(verify(ns, key, data.len().into(), &o), Ok(OBJECT_OVERHEAD_BYTES));
        assert_eq!(verify(NamespaceId(4), key, data.len().into(), &o), Err(Refused::Header));
        assert_eq!(verify(ns, BlockKey(10), data.len().into(), &o), Err(Refused::Header));
        assert!(matches!(
            verify(ns, key, data.len().into(), &o[..o.len() - 1]),
            Err(Refused::Size { .. })
        ));
        let mut bad = o.clone();
        bad[OBJECT_OVERHEAD_BYTES + 100] ^= 1;
        assert_eq!(verify(ns, key, data.len().into(), &bad), Err(Refused::Checksum));
        // A variable block: any length up to the most, the header's exactly.
        assert_eq!(
            verify(ns, key, Expect::AtMost(data.len() + 1), &o),
            Ok(OBJECT_OVERHEAD_BYTES)
        );
        assert!(matches!(
            verify(ns, key, Expect::AtMost(data.len() - 1), &o),
            Err(Refused::Size { .. })
        ));
        assert_eq!(
            verify(ns, key, Expect::AtMost(data.len()), &o[..o.len() - 1]),
            Err(Refused::Header),
            "a cut object's header names a longer block"
        );
        let mut bad = o;
        bad[20] ^= 1;
        assert_eq!(verify(ns, key, data.len().into(), &bad), Err(Refused::Header));
    }
}
