//! The conformance suite every [`Tier`] passes.
//!
//! Each tier's tests call [`run`] with a factory for fresh, empty tiers that
//! can hold at least [`MIN_BLOCKS`] blocks of `block_bytes`. The checks are
//! the contract written on [`Tier`].

use std::sync::Arc;

use super::{Fetched, Stored, Tier, TierExt};
use crate::block::{BlockKey, NamespaceId};
use crate::error::ErrorKind;

/// Blocks a tier under test must hold without evicting.
pub const MIN_BLOCKS: usize = 16;

const NS: NamespaceId = NamespaceId(0x5eed);

/// Deterministic block content for `key`: any mix-up of blocks shows.
pub fn content(key: BlockKey, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = (key.0 as u64) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn key(i: u64) -> BlockKey {
    BlockKey(u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1)
}

/// Runs every check, each on a fresh tier from `make`.
pub fn run<T: Tier + 'static>(make: impl Fn() -> T, block_bytes: usize) {
    round_trip(&make(), block_bytes);
    miss_is_not_an_error(&make(), block_bytes);
    put_is_idempotent(&make(), block_bytes);
    remove(&make(), block_bytes);
    remove_written_before(&make(), block_bytes);
    pin_outlives_remove(&make(), block_bytes);
    wrong_output_length(&make(), block_bytes);
    fills_past_capacity(&make(), block_bytes);
    concurrent(Arc::new(make()), block_bytes);
}

fn round_trip(t: &dyn Tier, n: usize) {
    for i in 0..MIN_BLOCKS as u64 {
        assert_eq!(t.put(NS, key(i), &content(key(i), n)).unwrap(), Stored::Inserted);
    }
    let mut out = vec![0u8; n];
    for i in 0..MIN_BLOCKS as u64 {
        assert!(t.contains(&key(i)), "block {i} missing after put");
        assert_eq!(t.get(&key(i), &mut out).unwrap(), Fetched::Hit);
        assert!(out == content(key(i), n), "block {i} came back altered");
        let p = t.pin(&key(i)).unwrap();
        assert_eq!(p.namespace(), NS);
        assert_eq!(p.len(), n);
    }
    let u = t.usage();
    assert_eq!(u.blocks, MIN_BLOCKS as u64);
    assert!(u.used_bytes >= (MIN_BLOCKS * n) as u64, "{u:?}");
    assert!(u.used_bytes <= u.capacity_bytes, "{u:?}");
    assert!(t.counters().bytes_written.load(std::sync::atomic::Ordering::Relaxed) >= (MIN_BLOCKS * n) as u64);
}

fn miss_is_not_an_error(t: &dyn Tier, n: usize) {
    let mut out = vec![0u8; n];
    assert!(!t.contains(&key(99)));
    assert_eq!(t.get(&key(99), &mut out).unwrap(), Fetched::Miss);
    assert!(t.pin(&key(99)).is_none());
    assert!(!t.remove(&key(99)).unwrap());
}

fn put_is_idempotent(t: &dyn Tier, n: usize) {
    let data = content(key(1), n);
    assert_eq!(t.put(NS, key(1), &data).unwrap(), Stored::Inserted);
    let before = t.usage();
    assert_eq!(t.put(NS, key(1), &data).unwrap(), Stored::Present);
    assert_eq!(t.usage(), before);
}

fn remove(t: &dyn Tier, n: usize) {
    t.put(NS, key(1), &content(key(1), n)).unwrap();
    t.put(NS, key(2), &content(key(2), n)).unwrap();
    assert!(t.remove(&key(1)).unwrap());
    assert!(!t.remove(&key(1)).unwrap());
    assert!(!t.contains(&key(1)));
    let mut out = vec![0u8; n];
    assert_eq!(t.get(&key(1), &mut out).unwrap(), Fetched::Miss);
    // The neighbour is untouched.
    assert_eq!(t.get(&key(2), &mut out).unwrap(), Fetched::Hit);
    assert!(out == content(key(2), n));
    assert_eq!(t.usage().blocks, 1);
    // A removed key can be stored again.
    assert_eq!(t.put(NS, key(1), &content(key(1), n)).unwrap(), Stored::Inserted);
}

/// Waits until the wall clock has moved past `t` (Unix ms).
fn after(t: u64) -> u64 {
    while super::now_ms() <= t {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    super::now_ms()
}

fn remove_written_before(t: &dyn Tier, n: usize) {
    let t0 = super::now_ms();
    t.put(NS, key(1), &content(key(1), n)).unwrap();
    t.put(NS, key(2), &content(key(2), n)).unwrap();
    // A delete from before the copy was written leaves it.
    assert!(!t.remove_written_before(&key(1), t0).unwrap());
    assert!(t.contains(&key(1)));
    assert!(!t.remove_written_before(&key(99), u64::MAX).unwrap(), "a miss");
    // One from after removes it, and only it.
    let t1 = after(super::now_ms());
    assert!(t.remove_written_before(&key(1), t1).unwrap());
    assert!(!t.contains(&key(1)));
    assert!(t.contains(&key(2)));
    // A put that finds the copy held renews it: the put is acknowledged
    // by that copy, and a delete from before it must not take it.
    let t2 = after(t1);
    assert_eq!(t.put(NS, key(2), &content(key(2), n)).unwrap(), Stored::Present);
    assert!(!t.remove_written_before(&key(2), t2).unwrap());
    let mut out = vec![0u8; n];
    assert_eq!(t.get(&key(2), &mut out).unwrap(), Fetched::Hit);
    assert!(out == content(key(2), n));
    // A removed key can be stored again, and is new.
    assert_eq!(t.put(NS, key(1), &content(key(1), n)).unwrap(), Stored::Inserted);
    assert!(!t.remove_written_before(&key(1), t2).unwrap());
    assert_eq!(t.usage().blocks, 2);
}

fn pin_outlives_remove(t: &dyn Tier, n: usize) {
    t.put(NS, key(3), &content(key(3), n)).unwrap();
    let p = t.pin(&key(3)).unwrap();
    assert!(t.remove(&key(3)).unwrap());
    assert!(!t.contains(&key(3)));
    let mut out = vec![0u8; n];
    p.read_into(&mut out).unwrap();
    assert!(out == content(key(3), n), "pinned bytes changed after remove");
}

fn wrong_output_length(t: &dyn Tier, n: usize) {
    t.put(NS, key(4), &content(key(4), n)).unwrap();
    let p = t.pin(&key(4)).unwrap();
    let mut short = vec![0u8; n - 1];
    assert_eq!(p.read_into(&mut short).unwrap_err().kind(), ErrorKind::InvalidArgument);
    drop(p);
    // Nothing changed.
    let mut out = vec![0u8; n];
    assert_eq!(t.get(&key(4), &mut out).unwrap(), Fetched::Hit);
    assert!(out == content(key(4), n));
}

fn fills_past_capacity(t: &dyn Tier, n: usize) {
    let cap_blocks = (t.usage().capacity_bytes / n as u64) as usize;
    let total = cap_blocks * 2 + 8;
    for i in 0..total as u64 {
        let k = key(1000 + i);
        t.put(NS, k, &content(k, n))
            .unwrap_or_else(|e| panic!("put {i} of {total}: {e}"));
        let u = t.usage();
        assert!(u.used_bytes <= u.capacity_bytes, "over budget after put {i}: {u:?}");
    }
    // The newest block is always there, and whatever is there is intact.
    let last = key(1000 + total as u64 - 1);
    assert!(t.contains(&last));
    let mut out = vec![0u8; n];
    let mut present = 0;
    for i in 0..total as u64 {
        let k = key(1000 + i);
        if t.get(&k, &mut out).unwrap() == Fetched::Hit {
            assert!(out == content(k, n), "block {i} altered by eviction");
            present += 1;
        }
    }
    assert!(present < total, "a tier of {cap_blocks} blocks held all {total}");
    assert!(present >= 1);
    assert!(t.counters().evictions.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

fn concurrent(t: Arc<dyn Tier>, n: usize) {
    let threads: Vec<_> = (0..4u64)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut out = vec![0u8; n];
                for i in 0..4u64 {
                    let k = key(10_000 + w * 100 + i);
                    let data = content(k, n);
                    t.put(NS, k, &data).unwrap();
                    // Another thread's puts may evict ours only if the tier
                    // is full; it is not (4 x 4 <= MIN_BLOCKS).
                    assert_eq!(t.get(&k, &mut out).unwrap(), Fetched::Hit);
                    assert!(out == data);
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
    assert_eq!(t.usage().blocks, 16);
}
