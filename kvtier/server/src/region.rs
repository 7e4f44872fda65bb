//! Shared-memory regions: the same-host data path.
//!
//! A client creates a file under the daemon's `shm_dir` (a tmpfs such as
//! /dev/shm), maps it, and registers it once; both processes then see the
//! same pages. A PutRegion hands the manager the block bytes where they lie
//! (one copy into host memory, or straight to the SSD with O_DIRECT), and a
//! GetRegion loads blocks straight into the client's pages. Nothing is
//! serialized and nothing crosses the socket but keys.
//!
//! Soundness inside the daemon: a request borrows a byte range of a region
//! (shared for a put, exclusive for a get), and overlapping borrows are
//! refused, so the daemon never holds `&[u8]` and `&mut [u8]` over the same
//! bytes. The client's own writes into a range during a request are outside
//! the daemon's control, like a device's DMA: they can only change the bytes
//! of the client's own blocks before they are checksummed.

use crate::{invalid, status_of};
use kvtier::ErrorKind;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tonic::Status;

/// The file-name prefix a region must have.
pub use kvtier_proto::REGION_PREFIX;

/// A mapped region file.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    path: PathBuf,
    /// Byte ranges borrowed by requests in flight: (start, end, exclusive).
    busy: Mutex<Vec<(usize, usize, bool)>>,
}

// SAFETY: the mapping is process-wide memory; access to it is coordinated
// by `busy` (no overlapping shared and exclusive borrows).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `map`; no borrow outlives
        // the Arc that owns this region.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A borrowed byte range of a region, released on drop.
pub struct Borrow {
    region: Arc<Region>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Borrow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Borrow({}..{} of {})",
            self.start,
            self.end,
            self.region.path.display()
        )
    }
}

impl Borrow {
    /// The bytes, for a put.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: in bounds (checked at borrow); no exclusive borrow of an
        // overlapping range exists while this one does.
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr().add(self.start), self.end - self.start) }
    }

    /// The bytes, for a get. Only for borrows taken exclusive.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: in bounds; taken exclusive, so no other borrow overlaps,
        // and `&mut self` makes this the only view through this borrow.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr.as_ptr().add(self.start), self.end - self.start) }
    }
}

impl Drop for Borrow {
    fn drop(&mut self) {
        let mut busy = self.region.busy.lock();
        if let Some(i) = busy.iter().position(|&(s, e, _)| s == self.start && e == self.end) {
            busy.swap_remove(i);
        }
    }
}

/// A random first region id (never 0), below 2^62 so ids never wrap.
fn random_base() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    (h.finish() >> 2) | 1
}

/// The regions registered with this daemon.
#[derive(Debug)]
pub struct Regions {
    dir: Option<PathBuf>,
    max_regions: usize,
    next_id: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Region>>>,
}

impl Regions {
    /// Regions allowed under `dir` (none when `None`), at most `max_regions`.
    pub fn new(dir: Option<PathBuf>, max_regions: usize) -> Self {
        Self {
            dir: dir.and_then(|d| d.canonicalize().ok()),
            max_regions,
            // Ids start at a random number, different on every start: a
            // client holding an id from before a restart gets "not
            // registered" (and registers again), never another client's
            // region.
            next_id: AtomicU64::new(random_base()),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Maps `path` (at least `size` bytes) and answers its id.
    pub fn register(&self, path: &str, size: u64) -> Result<u64, Status> {
        let Some(dir) = &self.dir else {
            return Err(status_of(
                ErrorKind::Config,
                "shared-memory regions are disabled (shm_dir is empty)",
            ));
        };
        let p = Path::new(path);
        let name_ok = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(REGION_PREFIX) && n.len() > REGION_PREFIX.len());
        let canon = p.canonicalize().map_err(|e| invalid(format!("region {path}: {e}")))?;
        if !name_ok || canon.parent() != Some(dir.as_path()) {
            return Err(status_of(
                ErrorKind::PermissionDenied,
                format!(
                    "region {path}: must be a file named {REGION_PREFIX}* directly in {}",
                    dir.display()
                ),
            ));
        }
        if size == 0 || size > (1 << 40) {
            return Err(invalid(format!("region size {size} must be between 1 byte and 1 TiB")));
        }
        if self.map.lock().len() >= self.max_regions {
            return Err(status_of(
                ErrorKind::NoSpace,
                format!("{} regions registered already (max_regions)", self.max_regions),
            ));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&canon)
            .map_err(|e| status_of(ErrorKind::PermissionDenied, format!("open region {path}: {e}")))?;
        let meta = f
            .metadata()
            .map_err(|e| status_of(ErrorKind::Internal, format!("stat region {path}: {e}")))?;
        if !meta.is_file() || meta.len() < size {
            return Err(invalid(format!(
                "region {path} is {} bytes, the request says {size}",
                meta.len()
            )));
        }
        let len = size as usize;
        // SAFETY: a shared mapping of a file we opened read-write, checked
        // against MAP_FAILED below.
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
            return Err(status_of(
                ErrorKind::Internal,
                format!("map region {path}: {}", std::io::Error::last_os_error()),
            ));
        }
        let region = Region {
            ptr: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
            path: canon,
            busy: Mutex::new(Vec::new()),
        };
        let id = self.next_id.fetch_add(1, Relaxed);
        self.map.lock().insert(id, Arc::new(region));
        tracing::info!(id, path, size, "region registered");
        Ok(id)
    }

    /// Forgets a region; requests in flight keep their mapping until done.
    pub fn unregister(&self, id: u64) -> Result<(), Status> {
        self.map
            .lock()
            .remove(&id)
            .map(drop)
            .ok_or_else(|| status_of(ErrorKind::NotFound, format!("region {id} is not registered")))
    }

    /// Borrows `[offset, offset+len)` of region `id`.
    pub fn borrow(&self, id: u64, offset: u64, len: u64, exclusive: bool) -> Result<Borrow, Status> {
        let region = self
            .map
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| status_of(ErrorKind::NotFound, format!("region {id} is not registered")))?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= region.len as u64)
            .ok_or_else(|| {
                invalid(format!(
                    "bytes {offset}..{} are outside region {id} of {} bytes",
                    offset.saturating_add(len),
                    region.len
                ))
            })?;
        let (start, end) = (offset as usize, end as usize);
        let mut busy = region.busy.lock();
        if busy.iter().any(|&(s, e, x)| s < end && start < e && (x || exclusive)) {
            return Err(status_of(
                ErrorKind::Throttled,
                format!("bytes {start}..{end} of region {id} overlap a request in flight"),
            ));
        }
        busy.push((start, end, exclusive));
        drop(busy);
        Ok(Borrow { region, start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region_file(dir: &Path, name: &str, len: u64) -> String {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn ids_of_a_restarted_daemon_do_not_repeat_the_old_ones() {
        let d = tempfile::tempdir().unwrap();
        let path = region_file(d.path(), "kvtier-a", 4096);
        let before = Regions::new(Some(d.path().into()), 2).register(&path, 4096).unwrap();
        let after = Regions::new(Some(d.path().into()), 2);
        let id = after.register(&path, 4096).unwrap();
        assert_ne!(before, id, "a restart handed out the same region id");
        // The old id names nothing in the new daemon.
        let e = after.borrow(before, 0, 1, false).unwrap_err();
        assert_eq!(kvtier_proto::error::carried_kind(&e), Some(ErrorKind::NotFound));
    }

    #[test]
    fn register_borrow_and_refuse_overlaps() {
        let d = tempfile::tempdir().unwrap();
        let r = Regions::new(Some(d.path().into()), 2);
        let path = region_file(d.path(), "kvtier-a", 1 << 20);
        let id = r.register(&path, 1 << 20).unwrap();
        let mut w = r.borrow(id, 0, 4096, true).unwrap();
        w.bytes_mut().fill(7);
        // An overlapping read must wait for the write: retry later.
        let e = r.borrow(id, 100, 10, false).unwrap_err();
        assert_eq!(
            kvtier_proto::error::carried_kind(&e),
            Some(ErrorKind::Throttled),
            "{e:?}"
        );
        let ro = r.borrow(id, 4096, 4096, false).unwrap();
        let ro2 = r.borrow(id, 4096, 4096, false).unwrap();
        drop(w);
        let back = r.borrow(id, 0, 4096, false).unwrap();
        assert!(back.bytes().iter().all(|b| *b == 7));
        // The bytes are the file's: another mapping sees them.
        assert_eq!(std::fs::read(&path).unwrap()[..4096], [7u8; 4096]);
        drop((ro, ro2, back));
        let e = r.borrow(id, (1 << 20) - 10, 11, false).unwrap_err();
        assert!(e.message().contains("outside region"), "{}", e.message());
        r.unregister(id).unwrap();
        assert_eq!(r.borrow(id, 0, 1, false).unwrap_err().code(), tonic::Code::NotFound);
    }

    #[test]
    fn only_prefixed_files_in_the_shm_dir() {
        let d = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let r = Regions::new(Some(d.path().into()), 8);
        let bad_name = region_file(d.path(), "secrets", 4096);
        assert_eq!(
            r.register(&bad_name, 4096).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let elsewhere = region_file(other.path(), "kvtier-x", 4096);
        assert_eq!(
            r.register(&elsewhere, 4096).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // A symlink in the shm dir pointing elsewhere resolves outside it.
        let link = d.path().join("kvtier-link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert_eq!(
            r.register(link.to_str().unwrap(), 4096).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let short = region_file(d.path(), "kvtier-s", 100);
        assert_eq!(
            r.register(&short, 4096).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let off = Regions::new(None, 8);
        assert_eq!(
            off.register(&short, 100).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }
}
