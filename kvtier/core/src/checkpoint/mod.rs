//! Checkpoints: named sets of files, cut into chunks, committed by a
//! manifest.
//!
//! - A file is cut into chunks of at most `chunk_bytes` (default 32 MiB).
//!   A chunk's key comes from its content (xxh3-128), so a chunk shared by
//!   two checkpoints, or two files, is stored once, and a chunk read back
//!   is checked against its own key.
//! - The [`manifest::Manifest`] lists the files, their sizes, hashes and
//!   chunks. It is written after every chunk is stored, under a key derived
//!   from the name: a checkpoint exists exactly when its manifest does, so
//!   a writer that dies midway leaves no partial checkpoint. Names are
//!   immutable.
//! - A restore writes each file to a temporary name, checks its size and
//!   hash, syncs it and renames it into place.
//!
//! Chunks live in a [`ChunkStore`]: [`LocalChunks`] over a
//! [`BlockManager`] (its tiers, blob writeback included), or a cluster
//! client that fans chunks out to their replicas.

pub mod manifest;

use bytes::Bytes;
use parking_lot::Mutex;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, sync_channel};

use self::manifest::{ChunkRef, FileEntry, Manifest};
use crate::block::{BlockKey, NamespaceId};
use crate::buf::{Recycler, page_aligned};
use crate::error::{Error, ErrorKind, Result};
use crate::fsio::{FileIo, replace_durably};
use crate::manager::BlockManager;

/// Default largest chunk: 32 MiB.
pub const DEFAULT_CHUNK_BYTES: u32 = 32 << 20;

/// Chunks a put or a restore has in flight at most.
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// Where chunks and manifests are kept, and which checkpoint names exist.
pub trait ChunkStore: Send + Sync {
    /// Stores a chunk (any length up to the store's largest); answers
    /// false if the key was present already.
    /// `data` is shared, not copied: a store may pass it on as it is.
    fn put_chunk(&self, key: BlockKey, data: Bytes) -> Result<bool>;
    /// A chunk's bytes, or `None` if no tier holds it. Page-aligned bytes
    /// let a restore write them with O_DIRECT, without a copy.
    fn get_chunk(&self, key: BlockKey) -> Result<Option<Bytes>>;
    /// Removes a chunk.
    fn remove_chunk(&self, key: BlockKey) -> Result<()>;
    /// The checkpoint names recorded.
    fn names(&self) -> Result<Vec<String>>;
    /// Records a name (after its manifest is stored).
    fn add_name(&self, name: &str) -> Result<()>;
    /// Forgets a name (after its manifest is removed).
    fn remove_name(&self, name: &str) -> Result<()>;
}

/// A checkpoint at a glance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Its name.
    pub name: String,
    /// Files.
    pub files: usize,
    /// Bytes of all files.
    pub bytes: u64,
    /// Chunks.
    pub chunks: usize,
    /// Commit time, ms since the Unix epoch.
    pub created_unix_ms: u64,
}

/// Put, get, list and delete checkpoints over a [`ChunkStore`].
#[derive(Debug)]
pub struct Checkpoints<S> {
    store: S,
    ns: NamespaceId,
    chunk_bytes: u32,
}

/// Checks a checkpoint name: 1 to 200 letters, digits, `.`, `_`, `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=200).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "checkpoint name {name:?}: 1 to 200 letters, digits, '.', '_' and '-'"
        )))
    }
}

/// Checks a file's path inside a checkpoint: relative, no `.` or `..`.
pub fn validate_path(path: &str) -> Result<()> {
    // Part by part: `Path::components` would drop an inner ".", letting
    // "a/./b" and "a/b" name one file twice.
    let ok =
        path.len() <= 4096 && !path.contains('\\') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "checkpoint file path {path:?}: a relative path without '.', '..' or empty parts"
        )))
    }
}

/// The key checkpoint `name`'s manifest is stored under in group `ns`.
pub fn manifest_key(ns: NamespaceId, name: &str) -> BlockKey {
    BlockKey::from_opaque(ns, &[b"manifest\0".as_slice(), name.as_bytes()].concat())
}

fn chunk_key(ns: NamespaceId, data: &[u8]) -> BlockKey {
    let h = xxhash_rust::xxh3::xxh3_128(data);
    BlockKey::from_opaque(ns, &[b"chunk\0".as_slice(), &h.to_le_bytes()].concat())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<S: ChunkStore> Checkpoints<S> {
    /// Checkpoints in namespace `ns` of `store`, cut into chunks of at most
    /// `chunk_bytes` (which the store must hold).
    pub fn new(store: S, ns: NamespaceId, chunk_bytes: u32) -> Self {
        Self { store, ns, chunk_bytes }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The manifest of `name`, or `None` if there is no such checkpoint.
    pub fn manifest(&self, name: &str) -> Result<Option<Manifest>> {
        validate_name(name)?;
        let Some(b) = self.store.get_chunk(manifest_key(self.ns, name))? else {
            return Ok(None);
        };
        let m = Manifest::decode(&b)?;
        if m.name != name {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!("the manifest stored for {name:?} names {:?}", m.name),
            ));
        }
        Ok(Some(m))
    }

    /// Writes checkpoint `name` from `files`: (path in the checkpoint, file
    /// to read). Every name and path is checked before anything is stored;
    /// an existing name is [`ErrorKind::AlreadyExists`].
    pub fn put(&self, name: &str, files: &[(String, PathBuf)]) -> Result<Manifest> {
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        self.put_sources(name, &paths, |i| {
            let src = &files[i].1;
            let f = File::open(src).map_err(|e| Error::io(format!("open {}", src.display()), e))?;
            Ok((Box::new(f), src.display().to_string()))
        })
    }

    /// Writes checkpoint `name` from memory: (path in the checkpoint, its
    /// bytes). What a training job that hands its state straight to the
    /// tier calls: no local file is written first, the node's own replica
    /// is its local copy. Checks as [`Checkpoints::put`].
    pub fn put_bytes(&self, name: &str, files: &[(String, &[u8])]) -> Result<Manifest> {
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        self.put_sources(name, &paths, |i| {
            Ok((Box::new(files[i].1), format!("memory for {:?}", files[i].0)))
        })
    }

    /// The put behind [`Checkpoints::put`] and [`Checkpoints::put_bytes`]:
    /// `open(i)` gives the reader of `paths[i]` and a name for its errors.
    fn put_sources<'s>(
        &self,
        name: &str,
        paths: &[&str],
        open: impl FnMut(usize) -> Result<(Box<dyn Read + 's>, String)>,
    ) -> Result<Manifest> {
        validate_name(name)?;
        let mut seen = std::collections::HashSet::new();
        for p in paths {
            validate_path(p)?;
            if !seen.insert(*p) {
                return Err(Error::invalid(format!("checkpoint file path {p:?} given twice")));
            }
        }
        // A manifest without its name is a put that failed at its commit
        // (a replica died as the manifest went out, and the rollback did
        // not reach every copy): this put finishes it if the files match.
        let half_committed = match self.manifest(name)? {
            None => None,
            Some(m) if !self.store.names()?.iter().any(|n| n == name) => Some(m),
            Some(_) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("checkpoint {name:?} exists; checkpoints are immutable (delete it first)"),
                ));
            }
        };
        // The chunks this put stored first: collected again if it fails.
        let stored = Mutex::new(Vec::new());
        let r = self.commit_sources(name, paths, open, half_committed, &stored);
        if r.is_err() {
            self.collect_unreferenced(name, stored.into_inner());
        }
        r
    }

    /// [`Self::put_sources`] once the name is checked: stores the chunks
    /// (recording in `stored` those no copy existed of) and commits.
    fn commit_sources<'s>(
        &self,
        name: &str,
        paths: &[&str],
        open: impl FnMut(usize) -> Result<(Box<dyn Read + 's>, String)>,
        half_committed: Option<Manifest>,
        stored: &Mutex<Vec<BlockKey>>,
    ) -> Result<Manifest> {
        let mut entries = self.put_files(paths, open, stored)?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let m = Manifest {
            name: name.to_string(),
            created_unix_ms: now_ms(),
            chunk_bytes: self.chunk_bytes,
            files: entries,
        };
        let bytes = m.encode();
        if bytes.len() > self.chunk_bytes as usize {
            return Err(Error::invalid(format!(
                "checkpoint {name:?}: its manifest ({} bytes) exceeds a chunk; use larger chunks",
                bytes.len()
            )));
        }
        let key = manifest_key(self.ns, name);
        if let Some(old) = half_committed {
            if old.files != m.files {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "checkpoint {name:?} was left half-committed by a failed put of other files; delete it first"
                    ),
                ));
            }
            // Its copies are put again (the replicas that lack one get it).
            self.store.put_chunk(key, Bytes::from(old.encode()))?;
            self.store.add_name(name)?;
            return Ok(old);
        }
        match self.store.put_chunk(key, Bytes::from(bytes)) {
            Ok(true) => {}
            // Someone committed the same name meanwhile.
            Ok(false) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("checkpoint {name:?} was committed by another writer"),
                ));
            }
            Err(e) => {
                // Not acknowledged: take back the copies that were made, so
                // the name does not appear later (best effort; a put of the
                // same files finishes what is left).
                if let Err(r) = self.store.remove_chunk(key) {
                    tracing::warn!("checkpoint {name:?}: the failed commit was not rolled back everywhere: {r}");
                }
                return Err(e);
            }
        }
        self.store.add_name(name)?;
        Ok(m)
    }

    /// Removes the chunks of `keys` (stored by a put of `name` that failed)
    /// that no committed checkpoint uses, so a failed put leaves no chunks
    /// behind. Best effort: a chunk that cannot be removed now (a member
    /// down) is logged and left. Answers the chunks removed.
    ///
    /// A chunk only this put stored may meanwhile be used by a concurrent
    /// put of another name into the same group that has not committed yet
    /// (content-addressed chunks are shared): that put's restore would then
    /// miss it and fail whole, never serving wrong bytes. Puts into one
    /// group are expected to come from one writer at a time.
    fn collect_unreferenced(&self, name: &str, keys: Vec<BlockKey>) -> usize {
        if keys.is_empty() {
            return 0;
        }
        let used = match self.chunks_in_use() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(
                    "checkpoint {name:?}: the failed put's {} chunks are left in place (the committed checkpoints could not be read: {e})",
                    keys.len()
                );
                return 0;
            }
        };
        let (mut removed, mut left) = (0, 0);
        for k in keys {
            if used.contains(&k.0) {
                continue;
            }
            match self.store.remove_chunk(k) {
                Ok(()) => removed += 1,
                Err(e) => {
                    left += 1;
                    tracing::debug!(key = %k, "checkpoint {name:?}: a chunk of the failed put was not removed: {e}");
                }
            }
        }
        if left > 0 {
            tracing::warn!("checkpoint {name:?}: {left} chunks of the failed put could not be removed (left in place)");
        }
        removed
    }

    /// Every chunk key a committed checkpoint uses.
    fn chunks_in_use(&self) -> Result<std::collections::HashSet<u128>> {
        let mut used = std::collections::HashSet::new();
        for other in self.store.names()? {
            if let Some(o) = self.manifest(&other)? {
                used.extend(o.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.key)));
            }
        }
        Ok(used)
    }

    /// Writes checkpoint `name` from every regular file under `dir`.
    pub fn put_dir(&self, name: &str, dir: &Path) -> Result<Manifest> {
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        files.sort();
        self.put(name, &files)
    }

    /// Stores one file's chunks (see [`Checkpoints::put_files`]).
    #[cfg(test)]
    fn put_file(&self, path: &str, src: &Path) -> Result<FileEntry> {
        let stored = Mutex::new(Vec::new());
        let mut e = self.put_files(
            &[path],
            |_| {
                let f = File::open(src).map_err(|e| Error::io(format!("open {}", src.display()), e))?;
                Ok((Box::new(f) as Box<dyn Read>, src.display().to_string()))
            },
            &stored,
        )?;
        Ok(e.remove(0))
    }

    /// Stores the chunks of `files`, in order, recording in `stored` each
    /// chunk this put may have made a copy of (stored first here, or
    /// failed); this thread reads and hashes, [`CHUNKS_IN_FLIGHT`] workers store, so reading, hashing and
    /// the store's round trips overlap, across files too. Read buffers are
    /// reused, and handed to the store without a copy.
    fn put_files<'s>(
        &self,
        paths: &[&str],
        mut open: impl FnMut(usize) -> Result<(Box<dyn Read + 's>, String)>,
        stored: &Mutex<Vec<BlockKey>>,
    ) -> Result<Vec<FileEntry>> {
        let chunk = self.chunk_bytes as usize;
        let pool = Recycler::new(chunk, 2 * CHUNKS_IN_FLIGHT + 2);
        let (tx, rx) = sync_channel::<(BlockKey, Bytes)>(CHUNKS_IN_FLIGHT);
        let rx = Mutex::new(rx);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let mut entries = Vec::with_capacity(paths.len());
        let read = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..CHUNKS_IN_FLIGHT)
                .map(|_| {
                    scope.spawn(|| {
                        loop {
                            let job = rx.lock().recv();
                            let Ok((key, data)) = job else { return };
                            if failure.lock().is_some() {
                                continue;
                            }
                            match self.store.put_chunk(key, data) {
                                Ok(true) => stored.lock().push(key),
                                Ok(false) => {}
                                Err(e) => {
                                    // Some copies may exist (a replica
                                    // took it, another did not).
                                    stored.lock().push(key);
                                    failure.lock().get_or_insert(e);
                                }
                            }
                        }
                    })
                })
                .collect();
            let read = (|| {
                for (i, path) in paths.iter().enumerate() {
                    let (mut f, src) = open(i)?;
                    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                    let mut chunks = Vec::new();
                    let mut size = 0u64;
                    loop {
                        let mut buf = pool.take();
                        let n =
                            read_full(&mut f, &mut buf[..chunk]).map_err(|e| Error::io(format!("read {src}"), e))?;
                        if n == 0 {
                            break;
                        }
                        buf.truncate(n);
                        hasher.update(&buf);
                        let key = chunk_key(self.ns, &buf);
                        chunks.push(ChunkRef {
                            key: key.0,
                            len: n as u32,
                        });
                        size += n as u64;
                        if failure.lock().is_some() || tx.send((key, buf.into_bytes())).is_err() {
                            return Ok(());
                        }
                        if n < chunk {
                            break;
                        }
                    }
                    entries.push(FileEntry {
                        path: path.to_string(),
                        size,
                        hash: hasher.digest(),
                        chunks,
                    });
                }
                Ok(())
            })();
            drop(tx);
            for w in workers {
                w.join().expect("a chunk worker panicked");
            }
            read
        });
        read?;
        failure.into_inner().map_or(Ok(()), Err)?;
        Ok(entries)
    }

    /// Restores checkpoint `name` under `dest` (made if missing); files
    /// appear whole and verified, or not at all.
    ///
    /// [`CHUNKS_IN_FLIGHT`] fetchers take the chunks of every file in turn
    /// (fetcher `w` the chunks `w`, `w + N`, ...), each handing its results
    /// over a channel of one, so this thread writes them in order and at
    /// most 2N chunks are held at once.
    pub fn get(&self, name: &str, dest: &Path) -> Result<Manifest> {
        let m = self
            .manifest(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no checkpoint {name:?}")))?;
        for f in &m.files {
            validate_path(&f.path)?;
        }
        let keys: Vec<BlockKey> = m
            .files
            .iter()
            .flat_map(|f| &f.chunks)
            .map(|c| BlockKey(c.key))
            .collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let mut fetched: Vec<Receiver<Result<Option<Bytes>>>> = Vec::new();
            for w in 0..CHUNKS_IN_FLIGHT.min(keys.len()) {
                let (tx, rx) = sync_channel(1);
                fetched.push(rx);
                let (keys, stop) = (&keys, &stop);
                scope.spawn(move || {
                    for k in keys.iter().skip(w).step_by(CHUNKS_IN_FLIGHT) {
                        if stop.load(Relaxed) || tx.send(self.store.get_chunk(*k)).is_err() {
                            return;
                        }
                    }
                });
            }
            let mut next = 0usize;
            let r = m.files.iter().try_for_each(|f| {
                self.get_file(name, f, dest, || {
                    let got = fetched[next % fetched.len()].recv().expect("a fetcher per chunk");
                    next += 1;
                    got
                })
            });
            stop.store(true, Relaxed);
            drop(fetched);
            r
        })?;
        Ok(m)
    }

    /// Writes file `f` under `dest` from its chunks, `next` giving each in
    /// order: to a temporary name, verified, synced, renamed.
    fn get_file(
        &self,
        name: &str,
        f: &FileEntry,
        dest: &Path,
        mut next: impl FnMut() -> Result<Option<Bytes>>,
    ) -> Result<()> {
        let path = dest.join(&f.path);
        let dir = path.parent().expect("a joined path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let tmp = path.with_file_name(format!(
            ".{}.kvtier-partial",
            path.file_name()
                .expect("validated: a normal last part")
                .to_string_lossy()
        ));
        let mut out = Restore::create(
            &tmp,
            self.chunk_bytes.max(f.chunks.first().map_or(0, |c| c.len)) as usize,
        )?;
        let result = (|| {
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            let mut size = 0u64;
            for (i, c) in f.chunks.iter().enumerate() {
                let key = BlockKey(c.key);
                let data = next()?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("checkpoint {name:?} file {:?}: chunk {i} ({key}) is in no tier", f.path),
                    )
                })?;
                if data.len() != c.len as usize || chunk_key(self.ns, &data) != key {
                    return Err(Error::new(
                        ErrorKind::ChecksumMismatch,
                        format!(
                            "checkpoint {name:?} file {:?}: chunk {i} ({key}) does not match its key",
                            f.path
                        ),
                    ));
                }
                hasher.update(&data);
                size += data.len() as u64;
                out.write(&data)?;
            }
            if size != f.size || hasher.digest() != f.hash {
                return Err(Error::new(
                    ErrorKind::ChecksumMismatch,
                    format!(
                        "checkpoint {name:?} file {:?}: restored bytes do not match the manifest",
                        f.path
                    ),
                ));
            }
            out.finish(size)?;
            // Synced by `finish`: only the rename and the directory are left.
            FileIo::default().rename_durably(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Every recorded checkpoint whose manifest is readable, by name.
    pub fn list(&self) -> Result<Vec<Summary>> {
        let mut out = Vec::new();
        for name in self.store.names()? {
            if let Some(m) = self.manifest(&name)? {
                out.push(Summary {
                    name,
                    files: m.files.len(),
                    bytes: m.bytes(),
                    chunks: m.chunks(),
                    created_unix_ms: m.created_unix_ms,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes checkpoint `name`: its manifest first (so it is gone at
    /// once), then every chunk no other checkpoint uses. Answers whether it
    /// existed.
    pub fn delete(&self, name: &str) -> Result<bool> {
        let Some(m) = self.manifest(name)? else {
            return Ok(false);
        };
        self.store.remove_chunk(manifest_key(self.ns, name))?;
        self.store.remove_name(name)?;
        let mut shared = self.chunks_in_use()?;
        for c in m.files.iter().flat_map(|f| &f.chunks) {
            if shared.insert(c.key) {
                self.store.remove_chunk(BlockKey(c.key))?;
            }
        }
        Ok(true)
    }
}

const PAGE: usize = 4096;

/// A restored file being written: with O_DIRECT while every write is whole
/// pages from an aligned buffer (the file's last chunk goes through a
/// padded copy, and the file is cut to size at the end), so a restore does
/// not fill the page cache only to flush it at the fsync. Filesystems
/// without O_DIRECT, and unaligned writes, use the page cache.
struct Restore {
    path: PathBuf,
    file: File,
    direct: bool,
    off: u64,
    /// Set once a padded last page was written: no write may follow.
    padded: bool,
    bounce: Option<Recycler>,
    bounce_bytes: usize,
}

impl Restore {
    fn create(path: &Path, chunk_bytes: usize) -> Result<Self> {
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open(false).map_err(|e| Error::io(format!("create {}", path.display()), e))?,
                false,
            ),
            Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            direct,
            off: 0,
            padded: false,
            bounce: None,
            bounce_bytes: chunk_bytes.next_multiple_of(PAGE),
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let io = |e| Error::io(format!("write {}", self.path.display()), e);
        if self.padded {
            return Err(Error::invalid(format!(
                "restore {}: a chunk after the file's partial last page",
                self.path.display()
            )));
        }
        if self.direct && self.off.is_multiple_of(PAGE as u64) && data.len() <= self.bounce_bytes {
            if page_aligned(data.as_ptr()) && data.len().is_multiple_of(PAGE) {
                self.file.write_all_at(data, self.off).map_err(io)?;
            } else {
                // A copy into an aligned buffer, zeros after the data to the
                // page: only a file's last chunk has a partial page.
                let pool = self.bounce.get_or_insert_with(|| Recycler::new(self.bounce_bytes, 1));
                let mut b = pool.take();
                let whole = data.len().next_multiple_of(PAGE);
                b[..data.len()].copy_from_slice(data);
                b[data.len()..whole].fill(0);
                self.file.write_all_at(&b[..whole], self.off).map_err(io)?;
                self.padded = whole != data.len();
            }
            self.off += data.len() as u64;
            return Ok(());
        }
        if self.direct {
            // From here on through the page cache, on a second descriptor.
            self.file = std::fs::OpenOptions::new().write(true).open(&self.path).map_err(io)?;
            self.direct = false;
        }
        self.file.write_all_at(data, self.off).map_err(io)?;
        self.off += data.len() as u64;
        Ok(())
    }

    /// Cuts the file to `size` (a padded last page) and syncs it.
    fn finish(mut self, size: u64) -> Result<()> {
        let io = |what: &str, e| Error::io(format!("{what} {}", self.path.display()), e);
        if self.padded {
            self.file.set_len(size).map_err(|e| io("truncate", e))?;
        }
        self.file.sync_all().map_err(|e| io("sync", e))?;
        self.bounce = None;
        Ok(())
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let path = e.path();
        let ft = e
            .file_type()
            .map_err(|e2| Error::io(format!("stat {}", path.display()), e2))?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path.strip_prefix(root).expect("under the root");
            let rel = rel
                .to_str()
                .ok_or_else(|| Error::invalid(format!("{}: not UTF-8", path.display())))?;
            out.push((rel.to_string(), path.clone()));
        }
    }
    Ok(())
}

/// Chunks in a local [`BlockManager`], names in a small catalog file.
#[derive(Debug)]
pub struct LocalChunks {
    manager: Arc<BlockManager>,
    ns: NamespaceId,
    catalog: PathBuf,
    lock: Mutex<()>,
}

impl LocalChunks {
    /// Chunks of namespace `ns` (registered in `manager`), names in
    /// `catalog` (a file, made on first use).
    pub fn new(manager: Arc<BlockManager>, ns: NamespaceId, catalog: PathBuf) -> Self {
        Self {
            manager,
            ns,
            catalog,
            lock: Mutex::new(()),
        }
    }

    fn read_names(&self) -> Result<Vec<String>> {
        match std::fs::read_to_string(&self.catalog) {
            Ok(t) => Ok(t.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io(format!("read {}", self.catalog.display()), e)),
        }
    }

    fn write_names(&self, names: &[String]) -> Result<()> {
        let mut text = names.join("\n");
        text.push('\n');
        replace_durably(&self.catalog, text.as_bytes())
    }
}

impl ChunkStore for LocalChunks {
    fn put_chunk(&self, key: BlockKey, data: Bytes) -> Result<bool> {
        // On disk before it counts as stored (host RAM alone is not durable).
        Ok(self.manager.store_one_durable(self.ns, key, &data)?.stored == 1)
    }

    fn get_chunk(&self, key: BlockKey) -> Result<Option<Bytes>> {
        self.manager.load_chunk(self.ns, key)
    }

    fn remove_chunk(&self, key: BlockKey) -> Result<()> {
        self.manager.remove(self.ns, &[key]).map(|_| ())
    }

    fn names(&self) -> Result<Vec<String>> {
        let _g = self.lock.lock();
        self.read_names()
    }

    fn add_name(&self, name: &str) -> Result<()> {
        let _g = self.lock.lock();
        let mut names = self.read_names()?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
            names.sort();
            self.write_names(&names)?;
        }
        Ok(())
    }

    fn remove_name(&self, name: &str) -> Result<()> {
        let _g = self.lock.lock();
        let mut names = self.read_names()?;
        let before = names.len();
        names.retain(|n| n != name);
        if names.len() != before {
            self.write_names(&names)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
