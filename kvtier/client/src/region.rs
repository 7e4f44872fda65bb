//! Shared-memory regions on the client side: the same-host data path.
//!
//! A client creates a file in the daemon's region directory, maps it and
//! registers it once ([`crate::Client::register_region`]); block bytes then
//! move through its pages in both directions, and only keys cross the
//! socket.

use std::path::PathBuf;

/// A shared-memory region this process created and mapped: block bytes go
/// to and from kvtierd through it without crossing the socket. The file is
/// removed when the region is dropped.
#[derive(Debug)]
pub struct SharedRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    path: PathBuf,
}

// SAFETY: plain shared memory owned by this value.
unsafe impl Send for SharedRegion {}
// SAFETY: shared access hands out `&[u8]` only.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates `dir/kvtier-<pid>-<n>` of `len` bytes (mode 0600), maps it and
    /// touches every page. `dir` must be the daemon's `shm_dir`.
    pub fn create(dir: &std::path::Path, len: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{}{}-{n}", kvtier_proto::REGION_PREFIX, std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let len = len.max(1).next_multiple_of(4096);
        f.set_len(len as u64)?;
        // SAFETY: a shared mapping of the file just sized; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).expect("mmap never returns null on success");
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping just made.
            unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        }
        Ok(Self { ptr, len, path })
    }

    /// Path to register with the daemon.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. Do not change a range while a request on it is in flight.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: our mapping, valid for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, to fill before a put.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: our mapping; &mut self makes this view unique here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in create().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        let _ = std::fs::remove_file(&self.path);
    }
}
