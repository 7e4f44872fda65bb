//! Chained sequence hashes: a block's key names its whole prefix.

use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128, xxh3_128_with_seed};

use super::{BlockKey, Namespace, NamespaceId};
use crate::error::{Error, Result};

/// Dynamo's salt hash: xxh3-64 of the salt bytes with seed 0.
pub fn dynamo_salt_hash(salt: &[u8]) -> u64 {
    xxh3_64_with_seed(salt, 0)
}

/// The hashes of one full token block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHashes {
    /// kvtier's 128-bit storage key (namespace-rooted chain).
    pub key: BlockKey,
    /// Dynamo's block hash: xxh3-64 of the tokens (u32 LE) seeded by the salt hash.
    pub dynamo_block_hash: u64,
    /// Dynamo's 64-bit sequence hash: the first block's block hash, then
    /// xxh3-64(parent sequence hash ‖ block hash) seeded by the salt hash.
    pub dynamo_sequence_hash: u64,
}

/// Hashes a token sequence block by block, carrying the chain.
///
/// The 128-bit chain starts at the namespace id:
/// `key_i = xxh3_128("T" ‖ parent ‖ xxh3_128_with_seed(tokens_i, salt_hash))`
/// with `parent = namespace id` for the first block, all little-endian.
#[derive(Debug, Clone)]
pub struct SequenceHasher {
    block_tokens: usize,
    salt_hash: u64,
    parent_key: u128,
    parent_dynamo: Option<u64>,
    token_bytes: Vec<u8>,
}

impl SequenceHasher {
    /// A hasher for blocks of `block_tokens` tokens in namespace `ns`, using
    /// Dynamo's `salt_hash` as the token-hash seed (0 when the engine has none).
    pub fn new(ns: NamespaceId, block_tokens: u32, salt_hash: u64) -> Self {
        Self {
            block_tokens: block_tokens as usize,
            salt_hash,
            parent_key: ns.0,
            parent_dynamo: None,
            token_bytes: Vec::with_capacity(block_tokens as usize * 4),
        }
    }

    /// A hasher for a namespace: its block size, and the salt hash of its
    /// cache salt (0 without one, as in Dynamo).
    pub fn for_namespace(ns: &Namespace) -> Self {
        let salt = ns.salt.as_deref().map_or(0, |s| dynamo_salt_hash(s.as_bytes()));
        Self::new(ns.id(), ns.layout.block_tokens, salt)
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
        let block_hash = xxh3_64_with_seed(&self.token_bytes, self.salt_hash);
        let sequence_hash = match self.parent_dynamo {
            None => block_hash,
            Some(parent) => {
                let mut pair = [0u8; 16];
                pair[..8].copy_from_slice(&parent.to_le_bytes());
                pair[8..].copy_from_slice(&block_hash.to_le_bytes());
                xxh3_64_with_seed(&pair, self.salt_hash)
            }
        };
        let tokens128 = xxh3_128_with_seed(&self.token_bytes, self.salt_hash);
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

    // Values computed independently with the Python `xxhash` package
    // (xxh3_64_intdigest over the same bytes and seeds): these pin Dynamo
    // compatibility and must never change.
    #[test]
    fn dynamo_vectors() {
        let mut h = SequenceHasher::new(NamespaceId(0), 4, 0);
        let got = h.hash_all(&tokens(12));
        let block: Vec<u64> = got.iter().map(|b| b.dynamo_block_hash).collect();
        let seq: Vec<u64> = got.iter().map(|b| b.dynamo_sequence_hash).collect();
        assert_eq!(block, [18414637226795477365, 5361389662557563725, 6888205730394553963]);
        assert_eq!(seq, [18414637226795477365, 6652732055289831734, 4108837212747906328]);
        assert_eq!(dynamo_salt_hash(b"my-salt"), 7922928657092271722);
        let mut h = SequenceHasher::new(NamespaceId(0), 4, dynamo_salt_hash(b"my-salt"));
        let got = h.hash_all(&tokens(8));
        assert_eq!(got[0].dynamo_sequence_hash, 9484029815580628277);
        assert_eq!(got[1].dynamo_block_hash, 2465221144996524693);
        assert_eq!(got[1].dynamo_sequence_hash, 6945155522460523141);
    }

    #[test]
    fn kvtier_key_vectors() {
        let mut h = SequenceHasher::new(NamespaceId(0x1234), 4, 0);
        let keys: Vec<String> = h.hash_all(&tokens(8)).iter().map(|b| b.key.to_string()).collect();
        assert_eq!(
            keys,
            ["0b27bb986ffb2a28f1397208411bd7ec", "e8351b867b6691f93a1130e803d22507"]
        );
    }

    #[test]
    fn wrong_block_length_is_refused() {
        let mut h = SequenceHasher::new(NamespaceId(1), 4, 0);
        let e = h.push_block(&[1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("holds 4 tokens, got 3"), "{e}");
        // The chain did not advance.
        let mut fresh = SequenceHasher::new(NamespaceId(1), 4, 0);
        assert_eq!(
            h.push_block(&[1, 2, 3, 4]).unwrap(),
            fresh.push_block(&[1, 2, 3, 4]).unwrap()
        );
    }

    proptest! {
        // A key names its whole prefix: equal prefixes give equal keys, and
        // the first differing block changes that key and every later one.
        #[test]
        fn keys_name_their_prefix(a in prop::collection::vec(0u32..50, 0..64),
                                  b in prop::collection::vec(0u32..50, 0..64)) {
            let ka = SequenceHasher::new(NamespaceId(9), 4, 0).hash_all(&a);
            let kb = SequenceHasher::new(NamespaceId(9), 4, 0).hash_all(&b);
            let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count() / 4;
            for i in 0..ka.len().min(kb.len()) {
                prop_assert_eq!(ka[i].key == kb[i].key, i < common);
                prop_assert_eq!(ka[i].dynamo_sequence_hash == kb[i].dynamo_sequence_hash, i < common);
            }
        }

        #[test]
        fn namespaces_never_share_keys(t in prop::collection::vec(any::<u32>(), 4..32)) {
            let ka = SequenceHasher::new(NamespaceId(1), 4, 0).hash_all(&t);
            let kb = SequenceHasher::new(NamespaceId(2), 4, 0).hash_all(&t);
            for (x, y) in ka.iter().zip(&kb) {
                prop_assert_ne!(x.key, y.key);
                // Dynamo's form has no namespace: it is the same.
                prop_assert_eq!(x.dynamo_sequence_hash, y.dynamo_sequence_hash);
            }
        }
    }
}
