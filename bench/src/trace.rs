//! Mooncake-format request traces (`../shared/traces/README.md`): one JSON
//! object a line, with `timestamp` (ms), `input_length` and
//! `output_length` (tokens) and `hash_ids`, one id per 512-token block of
//! the prompt, chained (a request can reuse block `i` only with blocks
//! `0..i`).
//!
//! Also the reference simulation the trace README's figures come from: a
//! request's hit is the leading run of its ids that are cached (times 512
//! tokens, capped at `input_length`), counted before the request inserts or
//! touches every one of its blocks, in order.

use serde::Deserialize;
use std::collections::{BinaryHeap, HashMap};
use std::io::BufRead;
use std::path::Path;

use kvtier::{ErrorKind, Result};

use crate::util::splitmix64;

/// Tokens per trace block.
pub(crate) const BLOCK_TOKENS: u64 = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Request {
    /// Arrival, ms from the trace's start.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    #[serde(default)]
    pub output_length: u64,
    /// Prefix block ids, one per 512-token block.
    pub hash_ids: Vec<u64>,
}

impl Request {
    /// A request at time 0 with no output, for tests.
    #[cfg(test)]
    pub(crate) fn new(ids: &[u64], input_length: u64) -> Self {
        Self {
            timestamp: 0,
            input_length,
            output_length: 0,
            hash_ids: ids.to_vec(),
        }
    }

    /// The tokens a hit of `blocks` leading blocks saves.
    pub(crate) fn hit_tokens(&self, blocks: usize) -> u64 {
        (blocks as u64 * BLOCK_TOKENS).min(self.input_length)
    }
}

/// Reads a trace; a malformed line is an error naming it.
pub(crate) fn load(path: &Path) -> Result<Vec<Request>> {
    let f = std::fs::File::open(path).map_err(|e| kvtier::Error::io(format!("open {}", path.display()), e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| kvtier::Error::io(format!("read {}", path.display()), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Request = serde_json::from_str(&line).map_err(|e| {
            kvtier::Error::new(
                ErrorKind::InvalidArgument,
                format!("{} line {}: not a trace request: {e}", path.display(), i + 1),
            )
        })?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(kvtier::Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: no requests", path.display()),
        ));
    }
    Ok(out)
}

/// Token hit rate of the reference simulation with an LRU of `capacity`
/// blocks (`None`: unbounded).
pub(crate) fn reference_lru(reqs: &[Request], capacity: Option<usize>) -> f64 {
    lru_refusing(reqs, capacity, 0.0)
}

/// Token hit rate of the offline optimum (Belady: evict the block used
/// farthest in the future) with `capacity` blocks.
pub(crate) fn reference_belady(reqs: &[Request], capacity: usize) -> f64 {
    let accesses: Vec<u64> = reqs.iter().flat_map(|r| r.hash_ids.iter().copied()).collect();
    let mut next = vec![u64::MAX; accesses.len()];
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for (i, b) in accesses.iter().enumerate().rev() {
        next[i] = seen.get(b).copied().unwrap_or(u64::MAX);
        seen.insert(*b, i as u64);
    }
    // The cache: id -> its next use; a max-heap of (next use, id), stale
    // entries skipped.
    let mut cached: HashMap<u64, u64> = HashMap::new();
    let mut heap = BinaryHeap::new();
    let (mut i, mut hit, mut total) = (0usize, 0u64, 0u64);
    for r in reqs {
        let n = r.hash_ids.iter().take_while(|b| cached.contains_key(b)).count();
        hit += r.hit_tokens(n);
        total += r.input_length;
        for b in &r.hash_ids {
            cached.insert(*b, next[i]);
            heap.push((next[i], *b));
            i += 1;
            while cached.len() > capacity {
                let (nx, k) = heap.pop().expect("entries for every key");
                if cached.get(&k) == Some(&nx) {
                    cached.remove(&k);
                }
            }
        }
    }
    hit as f64 / total.max(1) as f64
}

/// Token hit rate of LRU behind an admission oracle: at a block's last use
/// in the trace, a `refuse` fraction of those uses (chosen by a hash of the
/// access, so the same ones every run) neither inserts the block nor keeps
/// it. `refuse = 1` knows every block's future exactly and comes close to
/// the optimum; smaller fractions say how much of the optimum's advantage a
/// filter that never refuses a block used again would have to find.
pub(crate) fn reference_lru_admission_oracle(reqs: &[Request], capacity: usize, refuse: f64) -> f64 {
    lru_refusing(reqs, Some(capacity), refuse)
}

/// LRU of `capacity` blocks (`None`: unbounded) that refuses a `refuse`
/// fraction of blocks' last uses: [`reference_lru`] at 0.
fn lru_refusing(reqs: &[Request], capacity: Option<usize>, refuse: f64) -> f64 {
    // Whether each access is its block's last one (only when refusing).
    let mut last_use = Vec::new();
    if refuse > 0.0 {
        let accesses: Vec<u64> = reqs.iter().flat_map(|r| r.hash_ids.iter().copied()).collect();
        let mut seen = std::collections::HashSet::new();
        last_use = vec![false; accesses.len()];
        for (i, b) in accesses.iter().enumerate().rev() {
            last_use[i] = seen.insert(*b);
        }
    }
    let cut = (refuse.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let mut stamp: HashMap<u64, u64> = HashMap::new();
    let mut heap = BinaryHeap::new();
    let (mut i, mut now, mut hit, mut total) = (0usize, 0u64, 0u64, 0u64);
    for r in reqs {
        let n = r.hash_ids.iter().take_while(|b| stamp.contains_key(b)).count();
        hit += r.hit_tokens(n);
        total += r.input_length;
        for b in &r.hash_ids {
            let refused = refuse > 0.0 && last_use[i] && (refuse >= 1.0 || splitmix64(i as u64) < cut);
            i += 1;
            if refused {
                stamp.remove(b);
                continue;
            }
            now += 1;
            stamp.insert(*b, now);
            heap.push(std::cmp::Reverse((now, *b)));
            while capacity.is_some_and(|c| stamp.len() > c) {
                let std::cmp::Reverse((s, k)) = heap.pop().expect("entries for every key");
                if stamp.get(&k) == Some(&s) {
                    stamp.remove(&k);
                }
            }
        }
    }
    hit as f64 / total.max(1) as f64
}

/// The smallest fraction of last uses an admission oracle must refuse for
/// LRU to reach `target`, to 0.01 (0 when LRU reaches it alone); `None`
/// when refusing all of them does not reach it.
pub(crate) fn admission_needed(reqs: &[Request], capacity: usize, target: f64) -> Option<f64> {
    if reference_lru_admission_oracle(reqs, capacity, 1.0) < target {
        return None;
    }
    if reference_lru_admission_oracle(reqs, capacity, 0.0) >= target {
        return Some(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while hi - lo > 0.01 {
        let mid = (lo + hi) / 2.0;
        if reference_lru_admission_oracle(reqs, capacity, mid) >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some((hi * 100.0).ceil() / 100.0)
}

/// Token hit rate of an eviction policy holding `capacity` blocks, by the
/// reference's rules, on the policy alone (no tiers, no bytes): the quick
/// way to compare policies over many capacities.
pub(crate) fn simulate(reqs: &[Request], capacity: usize, kind: kvtier::eviction::EvictionKind) -> f64 {
    let mut policy = kind.build();
    let mut held = std::collections::HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    for r in reqs {
        let n = r.hash_ids.iter().take_while(|b| held.contains(*b)).count();
        hit += r.hit_tokens(n);
        total += r.input_length;
        for b in &r.hash_ids {
            let key = kvtier::BlockKey(u128::from(*b));
            if held.contains(b) {
                policy.touch(&key);
                continue;
            }
            policy.insert(key);
            held.insert(*b);
            while held.len() > capacity {
                let v = policy.victim(&|_| false).expect("a key to evict");
                policy.remove(&v);
                held.remove(&(v.0 as u64));
            }
        }
    }
    hit as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64], input: u64) -> Request {
        Request::new(ids, input)
    }

    #[test]
    fn hits_are_leading_runs_capped_at_the_prompt() {
        // 1: nothing cached. 2: [0, 1] hit, 9 misses (a leading run only).
        // 3: the whole prompt, capped at its 700 tokens.
        let reqs = [req(&[0, 1, 2], 1500), req(&[0, 1, 9, 2], 2000), req(&[0, 1], 700)];
        let total = (1500 + 2000 + 700) as f64;
        assert!((reference_lru(&reqs, None) - (1024.0 + 700.0) / total).abs() < 1e-12);
        // Capacity 2: request 1 leaves [1, 2], so request 2's block 0
        // misses; it leaves [9, 2], so request 3 misses too.
        assert_eq!(reference_lru(&reqs, Some(2)), 0.0);
        // Capacity 3 keeps request 1 whole: request 2 hits [0, 1].
        assert!((reference_lru(&reqs, Some(3)) - 1024.0 / total).abs() < 1e-12);
    }

    #[test]
    fn belady_is_never_below_lru_and_reaches_unbounded() {
        let reqs: Vec<Request> = (0..200u64)
            .map(|i| req(&[0, 1 + i % 7, 100 + i % 13, 1000 + i], 4 * 512))
            .collect();
        for c in [2, 4, 8, 16] {
            assert!(
                reference_belady(&reqs, c) + 1e-12 >= reference_lru(&reqs, Some(c)),
                "{c}"
            );
        }
        let all = reference_lru(&reqs, None);
        assert!((reference_belady(&reqs, 10_000) - all).abs() < 1e-12);
    }

    /// The shipped trace reproduces its README's figures.
    #[test]
    fn the_admission_oracle_sits_between_lru_and_the_optimum() {
        // Block 9 is used once, between two uses of 1: an LRU of one block
        // loses 1 to it; the oracle refuses it and keeps 1.
        let reqs = vec![req(&[1], 512), req(&[9], 512), req(&[1], 512)];
        assert_eq!(reference_lru(&reqs, Some(1)), 0.0);
        assert_eq!(reference_lru_admission_oracle(&reqs, 1, 0.0), 0.0);
        assert!((reference_lru_admission_oracle(&reqs, 1, 1.0) - 1.0 / 3.0).abs() < 1e-9);
        let needed = admission_needed(&reqs, 1, 0.3).expect("the whole oracle reaches 1/3");
        assert!(needed > 0.0 && needed <= 1.0, "{needed}");
        assert!(reference_lru_admission_oracle(&reqs, 1, needed) > 0.3);
        assert_eq!(admission_needed(&reqs, 1, 0.5), None);
        assert_eq!(admission_needed(&reqs, 1, 0.0), Some(0.0));
        let caps = [50, 400];
        let shipped = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/conversation_trace.jsonl")).unwrap();
        let some = &shipped[..1500];
        for cap in caps {
            let (lru, opt) = (reference_lru(some, Some(cap)), reference_belady(some, cap));
            let (half, all) = (
                reference_lru_admission_oracle(some, cap, 0.5),
                reference_lru_admission_oracle(some, cap, 1.0),
            );
            assert!(
                lru <= half && half <= all && all <= opt + 1e-12,
                "{cap}: {lru} {half} {all} {opt}"
            );
            assert!(all > lru, "{cap}: the oracle gains");
        }
    }

    #[test]
    fn the_shipped_trace_gives_its_reference_figures() {
        let reqs = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/conversation_trace.jsonl")).unwrap();
        assert_eq!(reqs.len(), 12_031);
        for (cap, lru, opt) in [(2_000, 0.055, 0.260), (10_000, 0.215, 0.374)] {
            let l = reference_lru(&reqs, Some(cap));
            let o = reference_belady(&reqs, cap);
            assert!((l - lru).abs() <= 0.0005, "LRU at {cap}: {l}");
            assert!((o - opt).abs() <= 0.0005, "Belady at {cap}: {o}");
        }
        assert!((reference_lru(&reqs, None) - 0.374).abs() <= 0.0005);
    }

    /// The LRU policy object, simulated, is the reference LRU.
    #[test]
    fn the_lru_policy_simulates_the_reference() {
        let reqs = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/conversation_trace.jsonl")).unwrap();
        let reqs = &reqs[..3000];
        for cap in [500, 2_000] {
            let sim = simulate(reqs, cap, kvtier::eviction::EvictionKind::Lru);
            assert!((sim - reference_lru(reqs, Some(cap))).abs() < 1e-12, "{cap}: {sim}");
        }
    }

    #[test]
    #[ignore = "prints figures: cargo test --release -p kvtier-bench policies -- --ignored --nocapture"]
    fn policies_on_the_shipped_trace() {
        let reqs = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/conversation_trace.jsonl")).unwrap();
        for cap in [1_000, 2_000, 6_000, 10_000, 20_000, 40_000, 80_000] {
            let lru = reference_lru(&reqs, Some(cap));
            let opt = reference_belady(&reqs, cap);
            println!(
                "{cap} LRU with an admission oracle: {:.4}; last uses to refuse for a third of the gap: {:?}",
                reference_lru_admission_oracle(&reqs, cap, 1.0),
                admission_needed(&reqs, cap, lru + (opt - lru) / 3.0)
            );
            for k in kvtier::eviction::EvictionKind::ALL {
                let h = simulate(&reqs, cap, *k);
                println!(
                    "{cap} {k}: {h:.4} (LRU {lru:.4}, optimum {opt:.4}, gap closed {:.3})",
                    (h - lru) / (opt - lru)
                );
            }
        }
        // Another workload: the same requests, last first.
        let rev: Vec<Request> = reqs.iter().rev().cloned().collect();
        for cap in [2_000, 10_000, 40_000] {
            let lru = reference_lru(&rev, Some(cap));
            for k in kvtier::eviction::EvictionKind::ALL {
                println!("reversed {cap} {k}: {:.4} (LRU {lru:.4})", simulate(&rev, cap, *k));
            }
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"timestamp\": 0, \"input_length\": 5, \"hash_ids\": [1]}\nnot json\n",
        )
        .unwrap();
        let e = load(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
