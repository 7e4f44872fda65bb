//! Page-aligned buffers, a bounded pool of them, and segment files opened
//! with O_DIRECT where the filesystem allows it.

use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::record::PAGE;
pub(crate) use crate::buf::AlignedBuf;

/// A bounded set of staging buffers, made once. Callers that find none free
/// wait up to a deadline and are then told to back off.
pub(crate) struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
    available: Condvar,
    buf_bytes: usize,
}

impl BufPool {
    pub(crate) fn new(count: usize, buf_bytes: usize) -> Self {
        Self {
            free: Mutex::new((0..count).map(|_| AlignedBuf::new(buf_bytes)).collect()),
            available: Condvar::new(),
            buf_bytes: buf_bytes.next_multiple_of(PAGE as usize),
        }
    }

    pub(crate) fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// A buffer, or `None` if none came free within `wait`.
    pub(crate) fn acquire(&self, wait: Duration) -> Option<PoolBuf<'_>> {
        let deadline = Instant::now() + wait;
        let mut free = self.free.lock();
        loop {
            if let Some(buf) = free.pop() {
                return Some(PoolBuf {
                    pool: self,
                    buf: Some(buf),
                });
            }
            if self.available.wait_until(&mut free, deadline).timed_out() && free.is_empty() {
                return None;
            }
        }
    }
}

/// A buffer on loan from a [`BufPool`]; it goes back when dropped.
pub(crate) struct PoolBuf<'a> {
    pool: &'a BufPool,
    buf: Option<AlignedBuf>,
}

impl std::ops::Deref for PoolBuf<'_> {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for PoolBuf<'_> {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Drop for PoolBuf<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.free.lock().push(b);
            self.pool.available.notify_one();
        }
    }
}

/// Opens `path` for reading and writing, with O_DIRECT when `direct`.
pub(crate) fn open(path: &Path, create: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true);
    }
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Whether O_DIRECT works in `dir`: open, write and read one page.
pub(crate) fn probe_direct(dir: &Path) -> Result<(), std::io::Error> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(".direct-probe");
    let _ = std::fs::remove_file(&path);
    let r = (|| {
        let f = open(&path, true, true)?;
        let mut b = AlignedBuf::new(PAGE as usize);
        f.write_all_at(b.as_slice(), 0)?;
        f.read_exact_at(b.as_mut_slice(), 0)?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    r
}

/// Whether `p` and `len` can go to an O_DIRECT file as they are.
pub(crate) fn is_page_aligned(p: *const u8, len: usize) -> bool {
    (p as usize).is_multiple_of(PAGE as usize) && len.is_multiple_of(PAGE as usize)
}
