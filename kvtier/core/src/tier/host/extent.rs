//! First-fit-by-size extent allocator over the arena's offsets.
//!
//! Blocks of one namespace all have one size, so free extents are mostly
//! exact fits; mixed sizes are served by splitting and re-joined by
//! coalescing neighbours on free.

use std::collections::{BTreeMap, BTreeSet};

/// Alignment of extents of at least this size: O_DIRECT and DMA want pages.
const PAGE: u64 = 4096;
/// Alignment of smaller extents: a cache line.
const LINE: u64 = 64;
/// Candidates examined per allocation before giving up (the caller evicts).
const MAX_PROBES: usize = 64;

/// Free space of a region `[0, capacity)`.
#[derive(Debug)]
pub(crate) struct Extents {
    capacity: u64,
    free_bytes: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
}

/// Bytes an allocation of `len` takes: whole pages for page-sized blocks.
pub(crate) fn footprint(len: u64) -> u64 {
    if len >= PAGE {
        len.next_multiple_of(PAGE)
    } else {
        len.max(1).next_multiple_of(LINE)
    }
}

impl Extents {
    pub(crate) fn new(capacity: u64) -> Self {
        let mut e = Self {
            capacity,
            free_bytes: 0,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
        };
        e.insert(0, capacity);
        e
    }

    #[cfg(test)]
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    pub(crate) fn used_bytes(&self) -> u64 {
        self.capacity - self.free_bytes
    }

    fn insert(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.by_offset.insert(off, len);
        self.by_size.insert((len, off));
        self.free_bytes += len;
    }

    fn take(&mut self, off: u64, len: u64) {
        self.by_offset.remove(&off);
        self.by_size.remove(&(len, off));
        self.free_bytes -= len;
    }

    /// Allocates `footprint(len)` bytes, aligned; returns the offset, or
    /// `None` when no free extent fits (the caller evicts and retries).
    pub(crate) fn alloc(&mut self, len: u64) -> Option<u64> {
        let need = footprint(len);
        let align = if need >= PAGE { PAGE } else { LINE };
        let (off, ext, start) = self
            .by_size
            .range((need, 0)..)
            .take(MAX_PROBES)
            .find_map(|&(ext, off)| {
                let start = off.next_multiple_of(align);
                (start + need <= off + ext).then_some((off, ext, start))
            })?;
        self.take(off, ext);
        self.insert(off, start - off);
        self.insert(start + need, off + ext - (start + need));
        debug_assert_eq!(start % align, 0);
        Some(start)
    }

    /// Returns the extent allocated at `off` for `len`.
    pub(crate) fn free(&mut self, off: u64, len: u64) {
        let mut start = off;
        let mut len = footprint(len);
        assert!(start + len <= self.capacity, "free beyond the region");
        if let Some((&poff, &plen)) = self.by_offset.range(..start).next_back() {
            assert!(
                poff + plen <= start,
                "double free at {start}: overlaps free extent {poff}+{plen}"
            );
            if poff + plen == start {
                self.take(poff, plen);
                start = poff;
                len += plen;
            }
        }
        if let Some((&noff, &nlen)) = self.by_offset.range(start..).next() {
            assert!(start + len <= noff, "double free at {off}: overlaps free extent {noff}");
            if start + len == noff {
                self.take(noff, nlen);
                len += nlen;
            }
        }
        self.insert(start, len);
        assert!(self.free_bytes <= self.capacity, "free bytes exceed the region");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Allocations never overlap, accounting always balances, and freeing
        // everything gives back one extent of the whole region.
        #[test]
        fn accounting_holds(ops in prop::collection::vec((any::<bool>(), 1u64..20_000), 1..300)) {
            let cap = 256 * 1024;
            let mut e = Extents::new(cap);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (alloc, len) in ops {
                if alloc || live.is_empty() {
                    if let Some(off) = e.alloc(len) {
                        let fp = footprint(len);
                        for &(o, l) in &live {
                            let lf = footprint(l);
                            prop_assert!(off + fp <= o || o + lf <= off, "overlap");
                        }
                        if fp >= PAGE { prop_assert_eq!(off % PAGE, 0); }
                        prop_assert!(off + fp <= cap);
                        live.push((off, len));
                    }
                } else {
                    let (o, l) = live.swap_remove(len as usize % live.len());
                    e.free(o, l);
                }
                let used: u64 = live.iter().map(|&(_, l)| footprint(l)).sum();
                prop_assert_eq!(e.used_bytes(), used);
            }
            for (o, l) in live.drain(..) {
                e.free(o, l);
            }
            prop_assert_eq!(e.free_bytes(), cap);
            prop_assert_eq!(e.by_offset.len(), 1);
        }
    }

    #[test]
    fn uniform_blocks_fill_the_region_exactly() {
        let mut e = Extents::new(8 * 2 * 1024 * 1024);
        let offs: Vec<_> = (0..8).map(|_| e.alloc(2 * 1024 * 1024).unwrap()).collect();
        assert!(e.alloc(1).is_none());
        e.free(offs[3], 2 * 1024 * 1024);
        assert_eq!(e.alloc(2 * 1024 * 1024), Some(offs[3]));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut e = Extents::new(1 << 20);
        let a = e.alloc(8192).unwrap();
        let _b = e.alloc(8192).unwrap();
        e.free(a, 8192);
        e.free(a, 8192);
    }
}
