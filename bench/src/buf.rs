//! Page-aligned, pre-touched buffers: what an engine's pinned staging
//! buffers look like, and what O_DIRECT needs.

use std::ptr::NonNull;

/// A zeroed buffer aligned to 4 KiB, touched when made.
pub(crate) struct Aligned {
    ptr: NonNull<u8>,
    len: usize,
}

impl Aligned {
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut b = Self { ptr, len };
        // alloc_zeroed may hand out untouched pages: touch every one now, so
        // first-touch cost never lands inside a timed loop.
        for i in (0..len).step_by(4096) {
            b[i] = 1;
        }
        b
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: our allocation, initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: our allocation, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), 4096).expect("valid layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

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
