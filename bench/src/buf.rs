//! Benchmark data. Buffers are `kvtier::AlignedBuf`: page-aligned and
//! touched, like an engine's pinned staging buffers.

/// Fills `b` with bytes that differ per block and per round.
pub(crate) fn fill(b: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}
