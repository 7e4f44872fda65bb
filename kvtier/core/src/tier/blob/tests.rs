//! The blob tier's logic on an in-memory object store: uploads, the
//! conditional create, verification on read, prefix walks, deletes. The
//! Azure client itself is tested against Azurite (`tests/blob.rs`).

use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

use super::*;
use crate::tier::PinnedBlock;
use crate::tier::conformance::content;

const NS: NamespaceId = NamespaceId(0xb10b);
const BLOCK: usize = 4096;

fn key(i: u64) -> BlockKey {
    BlockKey(u128::from(i) << 64 | 0xb10b)
}

fn tier(mode: BlobMode) -> (BlobTier, Arc<InMemory>) {
    let store = Arc::new(InMemory::new());
    let cfg = BlobConfig {
        prefix: "kv/test".into(),
        mode,
        ..BlobConfig::new("acct", "cont")
    };
    let t = BlobTier::with_store(&cfg, store.clone() as Arc<dyn ObjectStore>).unwrap();
    (t, store)
}

fn block(i: u64) -> Vec<u8> {
    content(key(i), BLOCK)
}

/// The object's bytes as the store holds them.
fn object_bytes(t: &BlobTier, store: &InMemory, i: u64) -> Vec<u8> {
    let path = object_path(&t.inner.prefix, NS, key(i));
    t.handle()
        .block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() })
        .to_vec()
}

/// Replaces the object of block `i` behind the tier's back.
fn overwrite(t: &BlobTier, store: &InMemory, i: u64, bytes: Vec<u8>) {
    let path = object_path(&t.inner.prefix, NS, key(i));
    t.handle()
        .block_on(async { store.put(&path, PutPayload::from(bytes)).await.unwrap() });
}

#[test]
fn an_upload_is_a_conditional_create_and_reads_back_verified() {
    let (t, store) = tier(BlobMode::Writeback);
    assert_eq!(t.put(NS, key(1), &block(1)).unwrap(), Stored::Inserted);
    assert_eq!(t.put(NS, key(1), &block(1)).unwrap(), Stored::Present);
    let s = t.stats();
    assert_eq!((s.put_requests, s.already_present, s.request_errors), (2, 1, 0));
    assert_eq!(s.tier.bytes_written, (BLOCK + OBJECT_OVERHEAD_BYTES) as u64);
    // The object carries its header in front of the block, under the prefix.
    let obj = object_bytes(&t, &store, 1);
    assert_eq!(obj.len(), BLOCK + OBJECT_OVERHEAD_BYTES);
    assert!(obj[OBJECT_OVERHEAD_BYTES..] == block(1)[..]);
    assert!(
        t.object_name(NS, key(1)).starts_with("kv/test/"),
        "{}",
        t.object_name(NS, key(1))
    );
    let got = t.fetch_prefix(NS, &[key(1)], BLOCK);
    assert_eq!(got.len(), 1);
    assert!(got[0].bytes() == &block(1)[..]);
    assert_eq!(got[0].namespace(), NS);
}

#[test]
fn a_prefix_walk_stops_at_the_first_missing_block() {
    let (t, _store) = tier(BlobMode::Writeback);
    for i in [0, 1, 2, 4] {
        t.put(NS, key(i), &block(i)).unwrap();
    }
    let keys: Vec<_> = (0..6).map(key).collect();
    assert_eq!(t.present_prefix(NS, &keys, BLOCK), 3);
    let got = t.fetch_prefix(NS, &keys, BLOCK);
    assert_eq!(got.len(), 3);
    for (i, b) in got.iter().enumerate() {
        assert!(b.bytes() == &block(i as u64)[..], "block {i}");
    }
    assert_eq!(t.present_prefix(NS, &[], BLOCK), 0);
    assert!(t.fetch_prefix(NS, &[key(9)], BLOCK).is_empty());
}

#[test]
fn a_corrupt_object_is_a_counted_miss_never_data() {
    let (t, store) = tier(BlobMode::Writeback);
    t.put(NS, key(1), &block(1)).unwrap();
    t.put(NS, key(2), &block(2)).unwrap();
    let mut obj = object_bytes(&t, &store, 1);
    let last = obj.len() - 1;
    obj[last] ^= 1;
    overwrite(&t, &store, 1, obj);
    let got = t.fetch_prefix(NS, &[key(1), key(2)], BLOCK);
    assert!(got.is_empty(), "a flipped byte is never served, nor what follows it");
    assert_eq!(t.counters().corrupt.load(Relaxed), 1);
    // A key this tier never uploaded is looked up with a HEAD, and an
    // object of the wrong size is refused by its length.
    overwrite(&t, &store, 5, vec![0u8; 100]);
    assert_eq!(t.present_prefix(NS, &[key(5)], BLOCK), 0);
    assert_eq!(t.counters().corrupt.load(Relaxed), 2);
    assert!(t.fetch_prefix(NS, &[key(5)], BLOCK).is_empty());
    assert_eq!(t.counters().corrupt.load(Relaxed), 3);
    // Another key's valid object under this key's name is refused too.
    t.put(NS, key(3), &block(3)).unwrap();
    let foreign = object_bytes(&t, &store, 3);
    overwrite(&t, &store, 4, foreign);
    assert!(t.fetch_prefix(NS, &[key(4)], BLOCK).is_empty());
}

#[test]
fn a_size_range_admits_any_block_up_to_its_limit() {
    let (t, _store) = tier(BlobMode::Writeback);
    let short = content(key(7), 100);
    t.put(NS, key(7), &short).unwrap();
    assert_eq!(t.present_prefix(NS, &[key(7)], Expect::AtMost(BLOCK)), 1);
    let got = t.fetch_prefix(NS, &[key(7)], Expect::AtMost(BLOCK));
    assert!(got[0].bytes() == &short[..]);
    assert!(t.fetch_prefix(NS, &[key(7)], Expect::AtMost(99)).is_empty());
}

#[test]
fn delete_forgets_the_key_and_a_second_delete_is_not_an_error() {
    let (t, _store) = tier(BlobMode::Writeback);
    t.put(NS, key(1), &block(1)).unwrap();
    assert_eq!(t.present_prefix(NS, &[key(1)], BLOCK), 1);
    assert!(t.delete(NS, key(1)).unwrap());
    // Known keys spare a HEAD; a deleted key must not stay known.
    assert_eq!(t.present_prefix(NS, &[key(1)], BLOCK), 0);
    assert!(t.fetch_prefix(NS, &[key(1)], BLOCK).is_empty());
    // A delete of a missing object is not an error. (Azure answers 404,
    // which is `false`; the in-memory store answers success.)
    t.delete(NS, key(1)).unwrap();
    assert_eq!(t.stats().delete_requests, 2);
    // And it can be uploaded again.
    assert_eq!(t.put(NS, key(1), &block(1)).unwrap(), Stored::Inserted);
}

#[test]
fn a_bad_config_is_refused_before_any_request() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cfg = BlobConfig {
        upload_concurrency: 0,
        ..BlobConfig::new("acct", "cont")
    };
    let e = BlobTier::with_store(&cfg, store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
}
