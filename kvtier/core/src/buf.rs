//! Page-aligned buffers: what O_DIRECT and DMA want, and what clients
//! should hand the block manager so disk writes need no staging copy.

use std::ptr::NonNull;

const PAGE: usize = 4096;

/// A zeroed, page-aligned heap buffer whose length is a multiple of a
/// page, touched when made (first touch is the expensive part: reuse them).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes rounded up to a page.
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(PAGE);
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // Large zeroed allocations are fresh, untouched pages: fault them in
        // now rather than inside the first copy.
        for off in (0..len).step_by(PAGE) {
            // SAFETY: off < len, inside the allocation.
            unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        }
        Self { ptr, len }
    }

    /// Length in bytes (a multiple of a page).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: buffers hold at least a page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe our allocation, initialised by alloc_zeroed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, to write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE).expect("valid layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// Page-aligned buffers of one size, handed out and taken back: a buffer
/// is touched once, then reused, instead of a fresh (faulting, zeroing)
/// allocation per use. Cloning shares the pool.
#[derive(Clone)]
pub struct Recycler {
    inner: std::sync::Arc<RecyclerInner>,
}

struct RecyclerInner {
    buf_bytes: usize,
    keep: usize,
    free: parking_lot::Mutex<Vec<AlignedBuf>>,
}

impl Recycler {
    /// Buffers of `buf_bytes` (rounded up to a page); at most `keep` are
    /// kept idle, more are freed when they come back.
    pub fn new(buf_bytes: usize, keep: usize) -> Self {
        Self {
            inner: std::sync::Arc::new(RecyclerInner {
                buf_bytes: buf_bytes.max(1).next_multiple_of(PAGE),
                keep,
                free: parking_lot::Mutex::new(Vec::new()),
            }),
        }
    }

    /// The size of every buffer.
    pub fn buf_bytes(&self) -> usize {
        self.inner.buf_bytes
    }

    /// An idle buffer, or a new one; its length starts at the whole buffer.
    pub fn take(&self) -> Recycled {
        let buf = self
            .inner
            .free
            .lock()
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(self.inner.buf_bytes));
        Recycled {
            len: buf.len(),
            buf: Some(buf),
            pool: self.clone(),
        }
    }
}

impl std::fmt::Debug for Recycler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recycler")
            .field("buf_bytes", &self.inner.buf_bytes)
            .field("idle", &self.inner.free.lock().len())
            .finish()
    }
}

/// A buffer on loan from a [`Recycler`], seen as its first `len` bytes; it
/// goes back when dropped, also from inside a [`bytes::Bytes`]
/// ([`Recycled::into_bytes`]).
pub struct Recycled {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Recycler,
}

impl Recycled {
    /// Shortens the view to `len` bytes (at most the buffer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the view to `len` bytes of the buffer.
    ///
    /// # Panics
    /// If `len` exceeds the buffer.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.pool.buf_bytes(), "{len} bytes exceed the buffer");
        self.len = len;
    }

    /// The whole buffer, to fill (whatever the view's length).
    pub fn whole_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().expect("held until dropped")
    }

    /// Zero-copy `Bytes` over the view; the buffer returns to its pool when
    /// the last clone is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("held until dropped")[..self.len]
    }
}

impl std::ops::Deref for Recycled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl std::ops::DerefMut for Recycled {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut().expect("held until dropped")[..len]
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut free = self.pool.inner.free.lock();
            if free.len() < self.pool.inner.keep {
                free.push(b);
            }
        }
    }
}

impl std::fmt::Debug for Recycled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recycled").field("len", &self.len).finish()
    }
}

/// Whether `p` is page-aligned: what an O_DIRECT transfer needs of its
/// buffer.
pub fn page_aligned(p: *const u8) -> bool {
    (p as usize).is_multiple_of(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded_to_pages() {
        let b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert!(b.iter().all(|x| *x == 0));
    }

    #[test]
    fn recycled_buffers_come_back_and_are_reused() {
        let pool = Recycler::new(10_000, 1);
        assert_eq!(pool.buf_bytes(), 12_288);
        let mut a = pool.take();
        a.whole_mut()[0] = 7;
        a.truncate(5);
        let p = a.as_ptr();
        let bytes = a.into_bytes();
        assert_eq!(bytes.len(), 5);
        assert_eq!(bytes[0], 7);
        assert!(page_aligned(bytes.as_ptr()));
        let slice = bytes.slice(1..3);
        drop(bytes);
        // Still lent through the slice: a second take gets a new buffer.
        let b = pool.take();
        assert_ne!(b.as_ptr(), p);
        // The last clone gone, the first buffer is idle; the pool keeps one
        // idle buffer, so the second is freed.
        drop(slice);
        drop(b);
        let c = pool.take();
        assert_eq!(c.as_ptr(), p);
        assert_eq!(c.len(), 12_288, "a taken buffer's view is whole again");
    }
}
