//! The crate's file-system boundary: one way to replace a file durably, and
//! the one place a test injects a failed write, fsync or rename.
//!
//! Every metadata writer (the writeback dirty log, the checkpoint catalog,
//! restored checkpoint files) replaces its file with [`replace_durably`] or
//! [`FileIo::replace_durably`]: write a temporary file next to it, fsync it,
//! rename it over the old one, fsync the directory. A crash at any point
//! leaves either the old file or the new one, never a mix, and once the call
//! returns the new one survives a power loss.
//!
//! The disk tier's segment writes, fsyncs and renames go through a
//! [`FileIo`] as well, so a test that builds the tier (or a
//! [`crate::BlockManager`]) with [`FileIo::with_faults`] can fail the Nth
//! of them and check what the tier makes of it. Production code uses
//! [`FileIo::default`], which adds nothing but a branch on an `Option`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::error::{Error, Result};

/// Replaces `path` with `bytes` durably (see the module docs).
pub fn replace_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    FileIo::default().replace_durably(path, bytes)
}

/// A file operation a [`Faults`] plan can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileOp {
    /// A write of file data (a torn one: see [`FileIo::write_all_at`]).
    Write,
    /// An `fsync`/`fdatasync` of a file or a directory.
    Fsync,
    /// A rename.
    Rename,
}

impl FileOp {
    const ALL: [FileOp; 3] = [FileOp::Write, FileOp::Fsync, FileOp::Rename];

    fn index(self) -> usize {
        match self {
            Self::Write => 0,
            Self::Fsync => 1,
            Self::Rename => 2,
        }
    }
}

/// Failures a test plans: the Nth operation of a kind, counted from the
/// call that plans it, fails with `EIO`. Shared between the test and the
/// components it built, so the test can plan faults while they run.
#[derive(Debug, Default)]
pub struct Faults {
    /// Operations seen, per [`FileOp`].
    seen: [AtomicU64; 3],
    /// The count at which the next failure of each kind fires; 0 for none.
    fail_at: [AtomicU64; 3],
    injected: AtomicU64,
}

impl Faults {
    /// A plan that fails nothing yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The `n`th operation of kind `op` from now (1: the next one) fails,
    /// once. Replaces an earlier plan for the same kind.
    pub fn fail_nth(&self, op: FileOp, n: u64) {
        assert!(n >= 1, "the first operation is n = 1");
        let i = op.index();
        self.fail_at[i].store(self.seen[i].load(SeqCst) + n, SeqCst);
    }

    /// Cancels every planned failure.
    pub fn clear(&self) {
        for op in FileOp::ALL {
            self.fail_at[op.index()].store(0, SeqCst);
        }
    }

    /// Operations of kind `op` seen so far.
    pub fn seen(&self, op: FileOp) -> u64 {
        self.seen[op.index()].load(SeqCst)
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(SeqCst)
    }

    /// Counts one operation of kind `op`; an error if it is planned to fail.
    fn check(&self, op: FileOp) -> std::io::Result<()> {
        let i = op.index();
        let n = self.seen[i].fetch_add(1, SeqCst) + 1;
        if self.fail_at[i].compare_exchange(n, 0, SeqCst, SeqCst).is_ok() {
            self.injected.fetch_add(1, SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// File operations, with the faults of a test plan when there is one.
/// Cheap to clone: clones share the plan.
#[derive(Debug, Clone, Default)]
pub struct FileIo {
    faults: Option<Arc<Faults>>,
}

/// Bytes a failed write still writes are rounded down to this, so that a
/// torn write into an O_DIRECT file stays aligned.
const TORN_ALIGN_BYTES: usize = 4096;

impl FileIo {
    /// File operations that fail as `faults` plans.
    pub fn with_faults(faults: Arc<Faults>) -> Self {
        Self { faults: Some(faults) }
    }

    fn check(&self, op: FileOp) -> std::io::Result<()> {
        self.faults.as_ref().map_or(Ok(()), |f| f.check(op))
    }

    /// How much of `len` bytes a failed write leaves behind: about half,
    /// as a crash in the middle of the write would.
    fn torn(len: usize) -> usize {
        len / 2 / TORN_ALIGN_BYTES * TORN_ALIGN_BYTES
    }

    /// `pwrite`s all of `buf` at `off`. A planned failure writes the first
    /// half of it (rounded down to 4 KiB) and then fails: a torn write.
    pub fn write_all_at(&self, f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
        if let Err(e) = self.check(FileOp::Write) {
            f.write_all_at(&buf[..Self::torn(buf.len())], off)?;
            return Err(e);
        }
        f.write_all_at(buf, off)
    }

    /// Writes `parts` back to back at `off` with as few `pwritev` calls as
    /// the kernel allows; torn like [`FileIo::write_all_at`] on a planned
    /// failure.
    pub fn write_all_vectored_at(&self, f: &File, parts: &[&[u8]], off: u64) -> std::io::Result<()> {
        if let Err(e) = self.check(FileOp::Write) {
            let mut left = Self::torn(parts.iter().map(|p| p.len()).sum());
            let mut torn = Vec::with_capacity(parts.len());
            for p in parts {
                let n = p.len().min(left);
                torn.push(&p[..n]);
                left -= n;
            }
            pwritev_all(f, &torn, off)?;
            return Err(e);
        }
        pwritev_all(f, parts, off)
    }

    /// Appends `buf` to a file opened for appending; torn like
    /// [`FileIo::write_all_at`] on a planned failure.
    pub fn append(&self, f: &mut File, buf: &[u8]) -> std::io::Result<()> {
        if let Err(e) = self.check(FileOp::Write) {
            f.write_all(&buf[..Self::torn(buf.len())])?;
            return Err(e);
        }
        f.write_all(buf)
    }

    /// `fdatasync`.
    pub fn sync_data(&self, f: &File) -> std::io::Result<()> {
        self.check(FileOp::Fsync)?;
        f.sync_data()
    }

    /// `fsync`.
    pub fn sync_all(&self, f: &File) -> std::io::Result<()> {
        self.check(FileOp::Fsync)?;
        f.sync_all()
    }

    /// Renames `from` to `to`.
    pub fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.check(FileOp::Rename)?;
        std::fs::rename(from, to)
    }

    /// `fsync`s the directory holding `path`, so that a rename or a new
    /// file in it survives a power loss.
    pub fn sync_parent(&self, path: &Path) -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        self.sync_all(&File::open(dir)?)
    }

    /// Renames a fully written and synced `from` over `to`, then syncs the
    /// directory: the second half of [`FileIo::replace_durably`], for
    /// files written piece by piece (a restored checkpoint file).
    pub fn rename_durably(&self, from: &Path, to: &Path) -> Result<()> {
        self.rename(from, to)
            .map_err(|e| Error::io(format!("rename {} to {}", from.display(), to.display()), e))?;
        self.sync_parent(to)
            .map_err(|e| Error::io(format!("sync the directory of {}", to.display()), e))
    }

    /// Replaces `path` with `bytes`: writes `<path>.tmp`, fsyncs it,
    /// renames it over `path` and fsyncs the directory. On an error `path`
    /// is either untouched or already replaced (a failed directory sync),
    /// and the temporary file is removed.
    pub fn replace_durably(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = tmp_path(path);
        let written = (|| {
            let f = File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
            self.write_all_at(&f, bytes, 0)
                .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
            self.sync_all(&f)
                .map_err(|e| Error::io(format!("sync {}", tmp.display()), e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = self.rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("rename {} to {}", tmp.display(), path.display()), e));
        }
        self.sync_parent(path)
            .map_err(|e| Error::io(format!("sync the directory of {}", path.display()), e))
    }
}

/// `<path>.tmp`: next to `path`, so the rename stays in one filesystem.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `parts` back to back at `off` with as few `pwritev` calls as the
/// kernel allows (one, for regular files, unless the disk fills up).
fn pwritev_all(f: &File, parts: &[&[u8]], mut off: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let iov: Vec<libc::iovec> = parts[first..]
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice borrowed for this
        // call; pwritev only reads from them.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        off += n as u64;
        while n > 0 {
            let p = parts[first];
            if n >= p.len() {
                n -= p.len();
                first += 1;
            } else {
                parts[first] = &p[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn replace_durably_swaps_the_whole_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog");
        replace_durably(&p, b"first").unwrap();
        replace_durably(&p, b"second version").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second version");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("catalog")]);
    }

    #[test]
    fn a_failed_write_fsync_or_rename_keeps_the_old_file_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("members.json");
        let faults = Faults::new();
        let io = FileIo::with_faults(faults.clone());
        io.replace_durably(&p, b"old").unwrap();
        let new = vec![7u8; 3 * TORN_ALIGN_BYTES];
        for op in [FileOp::Write, FileOp::Fsync, FileOp::Rename] {
            faults.fail_nth(op, 1);
            let e = io.replace_durably(&p, &new).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{op:?}: {e}");
            assert_eq!(std::fs::read(&p).unwrap(), b"old", "{op:?} tore the file");
            assert!(!tmp_path(&p).exists(), "{op:?} left its temporary file");
        }
        assert_eq!(faults.injected(), 3);
        // The plan fired once per kind: the next replacement succeeds.
        io.replace_durably(&p, &new).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), new);
    }

    #[test]
    fn a_failed_directory_sync_is_reported_after_the_rename() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("registry");
        let faults = Faults::new();
        let io = FileIo::with_faults(faults.clone());
        // The second fsync of a replacement is the directory's.
        faults.fail_nth(FileOp::Fsync, 2);
        let e = io.replace_durably(&p, b"new").unwrap_err();
        assert!(e.message().contains("sync the directory"), "{e}");
        // The rename happened: readers see the new file whole.
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn the_nth_write_fails_torn_and_the_others_pass() {
        let d = tempfile::tempdir().unwrap();
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("f"))
            .unwrap();
        let faults = Faults::new();
        let io = FileIo::with_faults(faults.clone());
        faults.fail_nth(FileOp::Write, 2);
        let page = vec![1u8; 4 * TORN_ALIGN_BYTES];
        io.write_all_at(&f, &page, 0).unwrap();
        assert!(
            io.write_all_vectored_at(&f, &[&page, &page], page.len() as u64)
                .is_err()
        );
        io.write_all_at(&f, &page, 0).unwrap();
        assert_eq!(faults.seen(FileOp::Write), 3);
        assert_eq!(faults.injected(), 1);
        // The torn write left half of its 8 pages: 4 pages after the first 4.
        assert_eq!(f.metadata().unwrap().len(), 8 * TORN_ALIGN_BYTES as u64);
    }
}
