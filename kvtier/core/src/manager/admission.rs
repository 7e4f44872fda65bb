//! Admission to the disk tier: a block goes to SSD only once it has been
//! seen `min_seen` times, so one-off prefixes do not wear the SSD or push
//! out blocks that are reused.
//!
//! Counts live in a count-min sketch of fixed size (4 rows of 4-bit
//! counters, as TinyLFU does): memory stays bounded whatever the key space,
//! and counts are halved every `window` increments so old popularity fades.

use parking_lot::Mutex;

use crate::block::BlockKey;

const ROWS: usize = 4;

/// Approximate per-key counts in fixed memory.
#[derive(Debug)]
pub(crate) struct Admission {
    min_seen: u8,
    state: Mutex<Sketch>,
}

#[derive(Debug)]
struct Sketch {
    counters: Vec<u8>,
    mask: usize,
    increments: u64,
    window: u64,
}

impl Admission {
    /// Admits keys seen at least `min_seen` times (1 admits everything);
    /// `counters` per row is rounded up to a power of two.
    pub(crate) fn new(min_seen: u8, counters: usize) -> Self {
        let width = counters.max(64).next_power_of_two();
        Self {
            min_seen: min_seen.clamp(1, 15),
            state: Mutex::new(Sketch {
                counters: vec![0; width * ROWS],
                mask: width - 1,
                increments: 0,
                window: width as u64 * 8,
            }),
        }
    }

    fn slots(key: &BlockKey, mask: usize) -> [usize; ROWS] {
        let lo = key.0 as u64;
        let hi = (key.0 >> 64) as u64;
        std::array::from_fn(|r| {
            let h = lo
                .wrapping_add((r as u64 + 1).wrapping_mul(hi | 1))
                .rotate_left(17 * r as u32);
            r * (mask + 1) + (h as usize & mask)
        })
    }

    /// Counts one sighting of each key.
    pub(crate) fn record(&self, keys: &[BlockKey]) {
        if self.min_seen <= 1 {
            return;
        }
        let mut s = self.state.lock();
        for k in keys {
            for i in Self::slots(k, s.mask) {
                s.counters[i] = (s.counters[i] + 1).min(15);
            }
            s.increments += 1;
        }
        if s.increments >= s.window {
            s.increments = 0;
            for c in &mut s.counters {
                *c /= 2;
            }
        }
    }

    /// Whether `key` may go to disk.
    pub(crate) fn admits(&self, key: &BlockKey) -> bool {
        if self.min_seen <= 1 {
            return true;
        }
        let s = self.state.lock();
        let est = Self::slots(key, s.mask)
            .iter()
            .map(|&i| s.counters[i])
            .min()
            .unwrap_or(0);
        est >= self.min_seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_after_min_seen() {
        let a = Admission::new(2, 1024);
        let k = BlockKey(0xfeed_beef_1234);
        a.record(&[k]);
        assert!(!a.admits(&k));
        a.record(&[k]);
        assert!(a.admits(&k));
        assert!(!a.admits(&BlockKey(77)));
        assert!(Admission::new(1, 0).admits(&BlockKey(5)));
    }

    #[test]
    fn counts_fade() {
        let a = Admission::new(2, 64);
        let k = BlockKey(42);
        a.record(&[k, k]);
        assert!(a.admits(&k));
        // 64 counters a row halve after 512 sightings: k's 2 become 1.
        a.record(&vec![BlockKey(7); 510]);
        assert!(!a.admits(&k));
        assert!(a.admits(&BlockKey(7)));
    }
}
