//! One contiguous, page-aligned region of host memory, touched once at
//! startup and pinned through the CUDA driver when one is present.
//!
//! First touch of fresh memory is far slower than a copy (about 0.45 GB/s on
//! our VMs against 13-20 GB/s for memcpy), so the arena is populated when it
//! is made and reused for every block after that.

use std::ptr::NonNull;

use crate::error::{Error, Result};

/// How the arena's memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Anonymous pages, populated at startup.
    Pageable,
    /// Anonymous pages registered with the CUDA driver (page-locked, DMA-able).
    CudaPinned,
}

/// A mapped region; unmapped (and unregistered) on drop.
#[derive(Debug)]
pub(crate) struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
    #[cfg(feature = "cuda")]
    _cuda: Option<std::sync::Arc<cudarc::driver::CudaContext>>,
}

// SAFETY: the arena is plain memory owned by this value; concurrent access to
// disjoint extents is coordinated by the host tier's allocator and pins.
unsafe impl Send for Arena {}
// SAFETY: as above; `Arena` itself hands out raw pointers only.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps and populates `len` bytes (rounded up to a page); pins them when
    /// `pin` is set and a CUDA driver with a device is present.
    pub(crate) fn new(len: usize, pin: bool) -> Result<Self> {
        let len = len.max(4096).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                format!("map {len} bytes for the host pool"),
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap never returns null on success");
        // MAP_POPULATE is best effort; write one byte per page so every page is
        // resident before the first block arrives.
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len, inside the mapping just made.
            unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        }
        let mut arena = Self {
            ptr,
            len,
            backing: Backing::Pageable,
            #[cfg(feature = "cuda")]
            _cuda: None,
        };
        if pin {
            arena.try_pin();
        }
        Ok(arena)
    }

    #[cfg(feature = "cuda")]
    fn try_pin(&mut self) {
        match cuda_pin(self.ptr.as_ptr(), self.len) {
            Ok(ctx) => {
                tracing::info!(bytes = self.len, "host pool pinned through the CUDA driver");
                self.backing = Backing::CudaPinned;
                self._cuda = Some(ctx);
            }
            Err(why) => tracing::info!("host pool is pageable memory: {why}"),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn try_pin(&mut self) {
        tracing::info!("host pool is pageable memory: built without the cuda feature");
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn backing(&self) -> Backing {
        self.backing
    }

    /// Start of the region.
    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if self._cuda.is_some() {
            // SAFETY: the region was registered by cuda_pin with this pointer,
            // and its context is still alive (held in self._cuda).
            unsafe {
                let _ = cudarc::driver::sys::cuMemHostUnregister(self.ptr.as_ptr().cast());
            }
        }
        // SAFETY: ptr/len are exactly the mapping made in new(); nothing
        // borrows it any more (the tier drops the arena last).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Registers `[ptr, ptr+len)` with the CUDA driver as portable page-locked
/// memory. Registration (not cuMemHostAlloc) keeps the pages cacheable: the
/// driver's write-combined allocations are slow for the CPU reads a cache does.
#[cfg(feature = "cuda")]
fn cuda_pin(ptr: *mut u8, len: usize) -> Result<std::sync::Arc<cudarc::driver::CudaContext>, String> {
    use cudarc::driver::sys;
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver library found".into());
    }
    let count = cudarc::driver::result::init()
        .and_then(|()| cudarc::driver::result::device::get_count())
        .map_err(|e| format!("CUDA driver present but unusable: {e}"))?;
    if count < 1 {
        return Err("CUDA driver present but no device".into());
    }
    let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| format!("CUDA context: {e}"))?;
    // SAFETY: ptr/len describe a live mapping owned by the caller, which
    // unregisters it before unmapping; the context is current (new() binds it).
    let r = unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuMemHostRegister failed: {r:?}"));
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_is_page_aligned_and_writable() {
        let a = Arena::new(10_000, true).unwrap();
        assert_eq!(a.len(), 12_288);
        assert_eq!(a.base() as usize % 4096, 0);
        // No GPU on the test machines: the probe must fall back cleanly.
        if std::env::var_os("KVTIER_EXPECT_CUDA").is_none() {
            assert_eq!(a.backing(), Backing::Pageable);
        }
        // SAFETY: inside the arena.
        unsafe { a.base().add(a.len() - 1).write(7) };
    }
}
