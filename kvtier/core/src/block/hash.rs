//! Chained sequence hashes: a block's key names its whole prefix.
//!
//! One pass over a block's tokens yields two forms:
//!
//! - kvtier's 128-bit key, chained from the namespace fingerprint (the
//!   storage key; see [`SequenceHasher`]).
//! - The Dynamo form: the 64-bit block and sequence hashes that NVIDIA
//!   Dynamo's KV router (1.6.1, `compute_block_hash_for_seq`) computes for a
//!   request, so that kvtier and the router name the same blocks alike.
//!   A block hash is `xxh3_64_with_seed(tokens as u32 LE, seed)` with the
//!   seed of [`dynamo_seed`]; the first block's sequence hash is its block
//!   hash, each later one is `xxh3_64_with_seed(parent ‖ block hash,`
//!   [`DYNAMO_BASE_SEED`]`)` (both u64 LE). The sequence chain always uses
//!   the base seed: the LoRA adapter and cache namespace reach it only
//!   through the block hashes.

use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128, xxh3_128_with_seed};

use super::{BlockKey, Namespace, NamespaceId};
use crate::error::{Error, Result};

/// The seed of Dynamo's block hashes without a LoRA adapter or cache
/// namespace, and always the seed of its sequence-hash chain.
pub const DYNAMO_BASE_SEED: u64 = 1337;

/// The seed Dynamo's router hashes a request's token blocks with.
///
/// [`DYNAMO_BASE_SEED`], plus (wrapping) `xxh3_64_with_seed(lora_name, 0)`
/// with a LoRA adapter, plus `xxh3_64_with_seed(cache_namespace, 1)` with a
/// cache namespace. An empty name counts as none, as in Dynamo.
pub fn dynamo_seed(lora_name: Option<&str>, cache_namespace: Option<&str>) -> u64 {
    let mut seed = DYNAMO_BASE_SEED;
    if let Some(lora) = lora_name.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(lora.as_bytes(), 0));
    }
    if let Some(ns) = cache_namespace.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(ns.as_bytes(), 1));
    }
    seed
}

/// The seed of the 128-bit token hash inside a kvtier key: xxh3-64 of the
/// salt with seed 0, and 0 without a salt (an empty salt is a salt here).
///
/// This was Dynamo's seed in an older KVBM scheme. It stays the key's seed,
/// unrelated to [`dynamo_seed`], so that keys already stored keep their names.
fn key_token_seed(salt: Option<&str>) -> u64 {
    salt.map_or(0, |s| xxh3_64_with_seed(s.as_bytes(), 0))
}

/// The hashes of one full token block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHashes {
    /// kvtier's 128-bit storage key (namespace-rooted chain).
    pub key: BlockKey,
    /// Dynamo's block hash: xxh3-64 of the tokens (u32 LE) seeded by the
    /// [`dynamo_seed`] the hasher was made with.
    pub dynamo_block_hash: u64,
    /// Dynamo's 64-bit sequence hash: the first block's block hash, then
    /// xxh3-64(parent sequence hash ‖ block hash) seeded by [`DYNAMO_BASE_SEED`].
    pub dynamo_sequence_hash: u64,
}

/// Hashes a token sequence block by block, carrying both chains.
///
/// The 128-bit chain starts at the namespace id:
/// `key_i = xxh3_128("T" ‖ parent ‖ xxh3_128_with_seed(tokens_i, s))`
/// with `parent = namespace id` for the first block, all little-endian, and
/// `s` = xxh3-64 of the namespace salt with seed 0 (0 without a salt).
#[derive(Debug, Clone)]
pub struct SequenceHasher {
    block_tokens: usize,
    key_seed: u64,
    dynamo_seed: u64,
    parent_key: u128,
    parent_dynamo: Option<u64>,
    token_bytes: Vec<u8>,
}

impl SequenceHasher {
    /// A hasher for blocks of `block_tokens` tokens in namespace `ns`: its
    /// keys take the namespace's `salt` into the token hash, its Dynamo form
    /// uses `dynamo_seed` (see [`dynamo_seed`]).
    pub fn new(ns: NamespaceId, block_tokens: u32, salt: Option<&str>, dynamo_seed: u64) -> Self {
        Self {
            block_tokens: block_tokens as usize,
            key_seed: key_token_seed(salt),
            dynamo_seed,
            parent_key: ns.0,
            parent_dynamo: None,
            token_bytes: Vec::with_capacity(block_tokens as usize * 4),
        }
    }

    /// A hasher for a namespace: its block size and salt, and for the Dynamo
    /// form its LoRA adapter as Dynamo's `lora_name` and its salt (the
    /// engine's cache salt) as Dynamo's `cache_namespace`.
    pub fn for_namespace(ns: &Namespace) -> Self {
        let salt = ns.salt.as_deref();
        let seed = dynamo_seed(ns.lora.as_deref(), salt);
        Self::new(ns.id(), ns.layout.block_tokens, salt, seed)
    }

    /// Hashes the next full block of the sequence.
    pub fn push_block(&mut self, tokens: &[u32]) -> Result<BlockHashes> {
        if tokens.len() != self.block_tokens {
            return Err(Error::invalid(format!(
                "a block holds {} tokens, got {}",
                self.block_tokens,
                tokens.len()
            )));
        }
        self.token_bytes.clear();
        for t in tokens {
            self.token_bytes.extend_from_slice(&t.to_le_bytes());
        }
        let block_hash = xxh3_64_with_seed(&self.token_bytes, self.dynamo_seed);
        let sequence_hash = match self.parent_dynamo {
            None => block_hash,
            Some(parent) => {
                let mut pair = [0u8; 16];
                pair[..8].copy_from_slice(&parent.to_le_bytes());
                pair[8..].copy_from_slice(&block_hash.to_le_bytes());
                xxh3_64_with_seed(&pair, DYNAMO_BASE_SEED)
            }
        };
        let tokens128 = xxh3_128_with_seed(&self.token_bytes, self.key_seed);
        let mut link = [0u8; 33];
        link[0] = b'T';
        link[1..17].copy_from_slice(&self.parent_key.to_le_bytes());
        link[17..].copy_from_slice(&tokens128.to_le_bytes());
        let key = xxh3_128(&link);
        self.parent_key = key;
        self.parent_dynamo = Some(sequence_hash);
        Ok(BlockHashes {
            key: BlockKey(key),
            dynamo_block_hash: block_hash,
            dynamo_sequence_hash: sequence_hash,
        })
    }

    /// Hashes every full block of `tokens`; a partial tail is not a block.
    pub fn hash_all(&mut self, tokens: &[u32]) -> Vec<BlockHashes> {
        tokens
            .chunks_exact(self.block_tokens)
            .map(|c| self.push_block(c).expect("chunks_exact yields full blocks"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tokens(n: u32) -> Vec<u32> {
        (0..n).map(|i| i * 7 + 1).collect()
    }

    fn dynamo_form(lora: Option<&str>, cache_namespace: Option<&str>, t: &[u32]) -> (Vec<u64>, Vec<u64>) {
        let seed = dynamo_seed(lora, cache_namespace);
        let got = SequenceHasher::new(NamespaceId(0), 4, None, seed).hash_all(t);
        (
            got.iter().map(|b| b.dynamo_block_hash).collect(),
            got.iter().map(|b| b.dynamo_sequence_hash).collect(),
        )
    }

    // Block hashes are what Dynamo 1.6.1's own
    // `dynamo._core.compute_block_hash_for_seq([1..=8], 4, lora_name=...,
    // cache_namespace=...)` returns (connectors/dynamo/tests/test_hashes.py
    // checks the binding against that wheel). Sequence hashes follow
    // Dynamo's chain rule, computed independently with the Python `xxhash`
    // package. These pin Dynamo compatibility and must never change.
    #[test]
    fn dynamo_vectors() {
        let t: Vec<u32> = (1..=8).collect();
        assert_eq!(
            dynamo_form(None, None, &t),
            (
                vec![14643705804678351452, 16777012769546811212],
                vec![14643705804678351452, 4945711292740353085]
            )
        );
        assert_eq!(
            dynamo_form(Some("a"), None, &t),
            (
                vec![17680866786467819158, 10751596618610180438],
                vec![17680866786467819158, 17623755234134148274]
            )
        );
        assert_eq!(
            dynamo_form(None, Some("ns"), &t),
            (
                vec![10036811808434060891, 1735356409867884788],
                vec![10036811808434060891, 16023685679671658249]
            )
        );
        assert_eq!(
            dynamo_form(Some("a"), Some("ns"), &t),
            (
                vec![3005469429571855825, 6995127330286721888],
                vec![3005469429571855825, 11567378840923356590]
            )
        );
        let t: Vec<u32> = (1..=12).collect();
        assert_eq!(dynamo_form(None, None, &t).1[2], 12583592247330656132);
        assert_eq!(dynamo_form(Some("a"), Some("ns"), &t).1[2], 4471627636977270613);
    }

    #[test]
    fn dynamo_seed_vectors() {
        assert_eq!(dynamo_seed(None, None), DYNAMO_BASE_SEED);
        assert_eq!(dynamo_seed(Some("a"), None), 16629034431890740056);
        assert_eq!(dynamo_seed(None, Some("ns")), 6982494792024450620);
        assert_eq!(dynamo_seed(Some("a"), Some("ns")), 5164785150205637723);
        // Empty names are no names.
        assert_eq!(dynamo_seed(Some(""), Some("")), DYNAMO_BASE_SEED);
    }

    #[test]
    fn for_namespace_maps_lora_and_salt() {
        let layout = crate::block::KvLayout {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 8,
            block_tokens: 4,
            kind: crate::block::KvKind::Kv,
            dtype: crate::block::Dtype::F16,
        };
        let mut ns = Namespace::new("m", layout);
        ns.lora = Some("a".into());
        ns.salt = Some("ns".into());
        let t: Vec<u32> = (1..=8).collect();
        let got = SequenceHasher::for_namespace(&ns).hash_all(&t);
        let want = SequenceHasher::new(ns.id(), 4, Some("ns"), dynamo_seed(Some("a"), Some("ns"))).hash_all(&t);
        assert_eq!(got, want);
        assert_eq!(got[0].dynamo_block_hash, 3005469429571855825);
    }

    #[test]
    fn kvtier_key_vectors() {
        let mut h = SequenceHasher::new(NamespaceId(0x1234), 4, None, DYNAMO_BASE_SEED);
        let keys: Vec<String> = h.hash_all(&tokens(8)).iter().map(|b| b.key.to_string()).collect();
        assert_eq!(
            keys,
            ["0b27bb986ffb2a28f1397208411bd7ec", "e8351b867b6691f93a1130e803d22507"]
        );
    }

    // Salted keys as the older scheme made them (the token hash seeded by
    // xxh3-64 of the salt), computed independently with the Python `xxhash`
    // package: stored keys keep their names whatever the Dynamo seed is.
    #[test]
    fn salted_key_vectors() {
        for dynamo in [DYNAMO_BASE_SEED, dynamo_seed(Some("a"), Some("my-salt"))] {
            let mut h = SequenceHasher::new(NamespaceId(0x1234), 4, Some("my-salt"), dynamo);
            let keys: Vec<String> = h.hash_all(&tokens(8)).iter().map(|b| b.key.to_string()).collect();
            assert_eq!(
                keys,
                ["0856bfb0e168c7e545dcc49567d5557d", "af687c163da635d4185882148c8bc11c"]
            );
        }
        let mut h = SequenceHasher::new(NamespaceId(0x1234), 4, Some(""), DYNAMO_BASE_SEED);
        assert_eq!(
            h.hash_all(&tokens(4))[0].key.to_string(),
            "b652b658530b198f7c7a727360515222"
        );
    }

    #[test]
    fn wrong_block_length_is_refused() {
        let mut h = SequenceHasher::new(NamespaceId(1), 4, None, DYNAMO_BASE_SEED);
        let e = h.push_block(&[1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("holds 4 tokens, got 3"), "{e}");
        // The chain did not advance.
        let mut fresh = SequenceHasher::new(NamespaceId(1), 4, None, DYNAMO_BASE_SEED);
        assert_eq!(
            h.push_block(&[1, 2, 3, 4]).unwrap(),
            fresh.push_block(&[1, 2, 3, 4]).unwrap()
        );
    }

    fn opt_name() -> impl Strategy<Value = Option<String>> {
        prop::option::of("[a-z0-9/_-]{0,12}")
    }

    proptest! {
        // A key names its whole prefix: equal prefixes give equal keys, and
        // the first differing block changes that key and every later one.
        #[test]
        fn keys_name_their_prefix(a in prop::collection::vec(0u32..50, 0..64),
                                  b in prop::collection::vec(0u32..50, 0..64)) {
            let ka = SequenceHasher::new(NamespaceId(9), 4, None, DYNAMO_BASE_SEED).hash_all(&a);
            let kb = SequenceHasher::new(NamespaceId(9), 4, None, DYNAMO_BASE_SEED).hash_all(&b);
            let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count() / 4;
            for i in 0..ka.len().min(kb.len()) {
                prop_assert_eq!(ka[i].key == kb[i].key, i < common);
                prop_assert_eq!(ka[i].dynamo_sequence_hash == kb[i].dynamo_sequence_hash, i < common);
            }
        }

        #[test]
        fn namespaces_never_share_keys(t in prop::collection::vec(any::<u32>(), 4..32)) {
            let ka = SequenceHasher::new(NamespaceId(1), 4, None, DYNAMO_BASE_SEED).hash_all(&t);
            let kb = SequenceHasher::new(NamespaceId(2), 4, None, DYNAMO_BASE_SEED).hash_all(&t);
            for (x, y) in ka.iter().zip(&kb) {
                prop_assert_ne!(x.key, y.key);
                // Dynamo's form has no namespace id: it is the same.
                prop_assert_eq!(x.dynamo_sequence_hash, y.dynamo_sequence_hash);
            }
        }

        // The Dynamo form equals a re-computation written from the rule
        // alone: the seed summed term by term, each block's tokens
        // serialized on their own, the chain folded over the block hashes.
        #[test]
        fn dynamo_form_matches_its_rule(t in prop::collection::vec(any::<u32>(), 0..200),
                                        block in 1u32..20,
                                        lora in opt_name(),
                                        cache_ns in opt_name()) {
            let mut seed = 1337u64;
            for (name, name_seed) in [(&lora, 0), (&cache_ns, 1)] {
                if let Some(n) = name.as_deref().filter(|n| !n.is_empty()) {
                    seed = seed.wrapping_add(xxh3_64_with_seed(n.as_bytes(), name_seed));
                }
            }
            prop_assert_eq!(dynamo_seed(lora.as_deref(), cache_ns.as_deref()), seed);
            let got = SequenceHasher::new(NamespaceId(3), block, None, seed).hash_all(&t);
            prop_assert_eq!(got.len(), t.len() / block as usize);
            let mut parent: Option<u64> = None;
            for (i, b) in got.iter().enumerate() {
                let chunk = &t[i * block as usize..(i + 1) * block as usize];
                let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                let block_hash = xxh3_64_with_seed(&bytes, seed);
                let seq = parent.map_or(block_hash, |p| {
                    let pair = [p.to_le_bytes(), block_hash.to_le_bytes()].concat();
                    xxh3_64_with_seed(&pair, 1337)
                });
                prop_assert_eq!(b.dynamo_block_hash, block_hash);
                prop_assert_eq!(b.dynamo_sequence_hash, seq);
                parent = Some(seq);
            }
        }
    }
}
