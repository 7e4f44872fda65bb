//! A bucket's catalog: which object names exist and what each one is made
//! of, kept in a durable log in the data directory.
//!
//! - The catalog is the commit point of a PUT, a completed multipart upload
//!   and a DELETE: an object exists exactly when its record is in the log,
//!   and a record is written only after every chunk it names is stored. A
//!   daemon killed midway leaves either the old state or the new one,
//!   never a torn object.
//! - Records are framed (magic, length, CRC-32C) and appended; a commit
//!   returns once the log is synced. Concurrent commits share one
//!   `fdatasync` (group commit): the first waiter syncs for everyone that
//!   appended before it.
//! - On open the log is replayed into a sorted map (what ListObjectsV2
//!   pages through); a torn tail (a crash during an append) is cut off.
//!   When the log holds more than twice the live records it is rewritten.

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvtier::{Error, ErrorKind, Result};

const MAGIC: u32 = 0x4b56_5333; // "KVS3"
/// Header: magic, payload length, CRC-32C of the payload.
const HEADER_BYTES: usize = 12;
/// The largest record: an object of 10,000 parts of many chunks fits.
const MAX_RECORD_BYTES: usize = 64 << 20;
/// Compaction starts above this many bytes of dead records.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// One chunk of an object: a variable-length block of the bucket's
/// namespace, with the xxh3-64 of its bytes (checked on every read, so a
/// block that is not this chunk is never served).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The block key, as 32 hex digits.
    pub key: String,
    /// Bytes.
    pub len: u32,
    /// xxh3-64 of the bytes.
    pub xxh: u64,
}

/// What an object is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Random per write: names this version's chunks.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// The entity tag, without quotes.
    pub etag: String,
    /// Commit time, ms since the Unix epoch.
    pub modified_ms: u64,
    /// `Content-Type`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Other representation headers kept as given (`Content-Encoding`,
    /// `Content-Disposition`, `Cache-Control`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// `x-amz-meta-*` user metadata (names lower-cased, without the prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<(String, String)>,
    /// Verified checksums: header name (`x-amz-checksum-crc32`, ...) and
    /// base64 value, returned with `x-amz-checksum-mode: ENABLED`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<(String, String)>,
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// For a multipart object: each part's size, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Put { name: String, meta: Box<ObjectMeta> },
    Delete { name: String },
}

#[derive(Debug)]
struct State {
    objects: BTreeMap<String, ObjectMeta>,
    file: Arc<File>,
    /// Bytes in the log.
    log_bytes: u64,
    /// Bytes the live records would take.
    live_bytes: u64,
    /// Records appended so far (this process).
    appended: u64,
}

#[derive(Debug, Default)]
struct Sync {
    synced: u64,
    syncing: bool,
    failed: Option<String>,
}

/// One bucket's catalog.
#[derive(Debug)]
pub struct Catalog {
    path: PathBuf,
    compact_min_bytes: u64,
    state: Mutex<State>,
    sync: Mutex<Sync>,
    synced: Condvar,
}

fn frame(r: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(r).expect("records serialize");
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn record_bytes(name: &str, meta: &ObjectMeta) -> u64 {
    frame(&Record::Put {
        name: name.to_string(),
        meta: Box::new(meta.clone()),
    })
    .len() as u64
}

/// Parses the whole records at the front of `b`; answers them and the
/// length they take (the rest is a torn tail).
fn parse(b: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while b.len() - at >= HEADER_BYTES {
        let h = &b[at..at + HEADER_BYTES];
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if magic != MAGIC || len > MAX_RECORD_BYTES || b.len() - at - HEADER_BYTES < len {
            break;
        }
        let payload = &b[at + HEADER_BYTES..at + HEADER_BYTES + len];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Ok(r) = serde_json::from_slice::<Record>(payload) else {
            break;
        };
        out.push(r);
        at += HEADER_BYTES + len;
    }
    (out, at)
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync directory", dir, e))
}

impl Catalog {
    /// Opens (or creates) the catalog at `path`, replaying its log.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, COMPACT_MIN_BYTES)
    }

    /// [`Catalog::open`], compacting only above `compact_min_bytes` of log.
    pub fn open_with(path: &Path, compact_min_bytes: u64) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("open", path, e))?;
        if !existed {
            sync_dir(path)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("read", path, e))?;
        let (records, good) = parse(&bytes);
        if good < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept_bytes = good,
                cut_bytes = bytes.len() - good,
                "S3 catalog: a torn record at the end of the log was cut off"
            );
            file.set_len(good as u64).map_err(|e| io("truncate", path, e))?;
            file.sync_all().map_err(|e| io("sync", path, e))?;
        }
        let mut objects = BTreeMap::new();
        for r in records {
            match r {
                Record::Put { name, meta } => {
                    objects.insert(name, *meta);
                }
                Record::Delete { name } => {
                    objects.remove(&name);
                }
            }
        }
        let live_bytes = objects.iter().map(|(n, m)| record_bytes(n, m)).sum();
        Ok(Self {
            path: path.to_path_buf(),
            compact_min_bytes,
            state: Mutex::new(State {
                objects,
                file: Arc::new(file),
                log_bytes: good as u64,
                live_bytes,
                appended: 0,
            }),
            sync: Mutex::new(Sync::default()),
            synced: Condvar::new(),
        })
    }

    /// The object named `name`.
    pub fn get(&self, name: &str) -> Option<ObjectMeta> {
        self.state.lock().objects.get(name).cloned()
    }

    /// Objects in the catalog.
    pub fn len(&self) -> usize {
        self.state.lock().objects.len()
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` names after `after` (exclusive) that start with
    /// `prefix`, in order, with their objects; and whether more follow.
    pub fn list(&self, prefix: &str, after: Option<&str>, max: usize) -> (Vec<(String, ObjectMeta)>, bool) {
        let s = self.state.lock();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut out = Vec::new();
        for (name, meta) in s.objects.range((start, Bound::Unbounded)) {
            if !name.starts_with(prefix) {
                break;
            }
            if out.len() == max {
                return (out, true);
            }
            out.push((name.clone(), meta.clone()));
        }
        (out, false)
    }

    /// Commits `name` as `meta` when `check` accepts the object it replaces
    /// (checked and replaced under one lock: conditional writes race
    /// safely). Durable when it returns `Ok`. Answers the object replaced.
    pub fn put_if(
        &self,
        name: &str,
        meta: ObjectMeta,
        check: impl FnOnce(Option<&ObjectMeta>) -> Result<()>,
    ) -> Result<Option<ObjectMeta>> {
        let (seq, old) = {
            let mut s = self.state.lock();
            check(s.objects.get(name))?;
            let rec = Record::Put {
                name: name.to_string(),
                meta: Box::new(meta.clone()),
            };
            let seq = self.append(&mut s, &rec)?;
            s.live_bytes += record_bytes(name, &meta);
            let old = s.objects.insert(name.to_string(), meta);
            if let Some(o) = &old {
                s.live_bytes = s.live_bytes.saturating_sub(record_bytes(name, o));
            }
            (seq, old)
        };
        self.wait_synced(seq)?;
        self.maybe_compact();
        Ok(old)
    }

    /// Removes `name` when `check` accepts the object there; durable when
    /// it returns. Answers the object removed (`None`: there was none, and
    /// nothing was written).
    pub fn delete_if(&self, name: &str, check: impl FnOnce(&ObjectMeta) -> Result<()>) -> Result<Option<ObjectMeta>> {
        let (seq, old) = {
            let mut s = self.state.lock();
            let Some(cur) = s.objects.get(name) else {
                return Ok(None);
            };
            check(cur)?;
            let seq = self.append(&mut s, &Record::Delete { name: name.to_string() })?;
            let old = s.objects.remove(name).expect("present under the lock");
            s.live_bytes = s.live_bytes.saturating_sub(record_bytes(name, &old));
            (seq, old)
        };
        self.wait_synced(seq)?;
        self.maybe_compact();
        Ok(Some(old))
    }

    fn append(&self, s: &mut State, r: &Record) -> Result<u64> {
        let b = frame(r);
        if b.len() - HEADER_BYTES > MAX_RECORD_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("an object record of {} bytes exceeds {MAX_RECORD_BYTES}", b.len()),
            ));
        }
        let mut f: &File = &s.file;
        if let Err(e) = f.write_all(&b) {
            // A partial append would be cut off as a torn tail at the next
            // open; cut it now, so later records are not behind it.
            let _ = s.file.set_len(s.log_bytes);
            return Err(io("append to", &self.path, e));
        }
        s.log_bytes += b.len() as u64;
        s.appended += 1;
        Ok(s.appended)
    }

    /// Waits until record `seq` is synced, syncing for every waiter when
    /// no one else is.
    fn wait_synced(&self, seq: u64) -> Result<()> {
        let mut g = self.sync.lock();
        loop {
            if let Some(e) = &g.failed {
                return Err(Error::new(ErrorKind::Io, format!("sync {}: {e}", self.path.display())));
            }
            if g.synced >= seq {
                return Ok(());
            }
            if g.syncing {
                self.synced.wait(&mut g);
                continue;
            }
            g.syncing = true;
            drop(g);
            let (file, upto) = {
                let s = self.state.lock();
                (s.file.clone(), s.appended)
            };
            let r = file.sync_data();
            g = self.sync.lock();
            g.syncing = false;
            match r {
                Ok(()) => g.synced = g.synced.max(upto),
                // A failed sync leaves the page cache's state unknown: no
                // later commit may be acknowledged on this log.
                Err(e) => g.failed = Some(e.to_string()),
            }
            self.synced.notify_all();
        }
    }

    /// Rewrites the log with the live records when dead ones dominate.
    fn maybe_compact(&self) {
        let mut s = self.state.lock();
        if s.log_bytes < self.compact_min_bytes || s.log_bytes < 2 * s.live_bytes {
            return;
        }
        if let Err(e) = self.compact(&mut s) {
            tracing::warn!(path = %self.path.display(), "S3 catalog not compacted: {e}");
        }
    }

    fn compact(&self, s: &mut State) -> Result<()> {
        let tmp = self.path.with_extension("compact");
        let mut out = Vec::with_capacity(s.live_bytes as usize);
        for (name, meta) in &s.objects {
            out.extend_from_slice(&frame(&Record::Put {
                name: name.clone(),
                meta: Box::new(meta.clone()),
            }));
        }
        {
            let mut f = File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
            f.write_all(&out).map_err(|e| io("write", &tmp, e))?;
            f.sync_all().map_err(|e| io("sync", &tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io("rename to", &self.path, e))?;
        sync_dir(&self.path)?;
        let f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io("open", &self.path, e))?;
        s.file = Arc::new(f);
        s.log_bytes = out.len() as u64;
        s.live_bytes = out.len() as u64;
        // Everything appended so far is in the synced new file.
        let mut g = self.sync.lock();
        g.synced = g.synced.max(s.appended);
        self.synced.notify_all();
        Ok(())
    }

    /// Bytes in the log (for tests and metrics).
    pub fn log_bytes(&self) -> u64 {
        self.state.lock().log_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            version: version.to_string(),
            size,
            etag: format!("etag-{version}"),
            modified_ms: 1,
            content_type: None,
            headers: Vec::new(),
            user: vec![("k".into(), "v".into())],
            checksums: Vec::new(),
            chunks: vec![ChunkRef {
                key: format!("{:032x}", size),
                len: size as u32,
                xxh: 7,
            }],
            parts: Vec::new(),
        }
    }

    fn ok(_: Option<&ObjectMeta>) -> Result<()> {
        Ok(())
    }

    #[test]
    fn commits_survive_a_reopen_and_deletes_stay_deleted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b/catalog.log");
        {
            let c = Catalog::open(&p).unwrap();
            c.put_if("a/1", meta("v1", 10), ok).unwrap();
            c.put_if("a/2", meta("v2", 20), ok).unwrap();
            c.put_if("a/1", meta("v3", 30), ok).unwrap();
            c.put_if("b", meta("v4", 40), ok).unwrap();
            assert!(c.delete_if("b", |_| Ok(())).unwrap().is_some());
            assert!(
                c.delete_if("b", |_| Ok(())).unwrap().is_none(),
                "second delete finds nothing"
            );
        }
        let c = Catalog::open(&p).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a/1").unwrap().version, "v3");
        assert_eq!(c.get("a/2").unwrap().size, 20);
        assert!(c.get("b").is_none());
    }

    #[test]
    fn a_torn_tail_is_cut_and_later_records_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.log");
        {
            let c = Catalog::open(&p).unwrap();
            c.put_if("x", meta("v1", 1), ok).unwrap();
            c.put_if("y", meta("v2", 2), ok).unwrap();
        }
        let full = std::fs::read(&p).unwrap();
        // A crash in the middle of the second record's append.
        std::fs::write(&p, &full[..full.len() - 5]).unwrap();
        {
            let c = Catalog::open(&p).unwrap();
            assert!(c.get("x").is_some());
            assert!(c.get("y").is_none(), "the torn record is not an object");
            c.put_if("z", meta("v3", 3), ok).unwrap();
        }
        let c = Catalog::open(&p).unwrap();
        assert!(c.get("z").is_some(), "a record after the cut is read back");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_flipped_byte_ends_the_replay_there() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.log");
        {
            let c = Catalog::open(&p).unwrap();
            c.put_if("x", meta("v1", 1), ok).unwrap();
            c.put_if("y", meta("v2", 2), ok).unwrap();
        }
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 3] ^= 0x40;
        std::fs::write(&p, &b).unwrap();
        let c = Catalog::open(&p).unwrap();
        assert!(c.get("x").is_some());
        assert!(c.get("y").is_none(), "a record failing its CRC is never an object");
    }

    #[test]
    fn a_refused_check_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.log");
        let c = Catalog::open(&p).unwrap();
        c.put_if("k", meta("v1", 1), ok).unwrap();
        let before = c.log_bytes();
        let e = c
            .put_if("k", meta("v2", 2), |old| match old {
                Some(_) => Err(Error::new(ErrorKind::AlreadyExists, "exists")),
                None => Ok(()),
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(c.get("k").unwrap().version, "v1");
        assert_eq!(c.log_bytes(), before, "nothing appended");
        let e = c
            .delete_if("k", |_| Err(Error::new(ErrorKind::AlreadyExists, "no")))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(c.get("k").is_some());
    }

    #[test]
    fn list_pages_by_prefix_in_order() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("catalog.log")).unwrap();
        for n in ["a", "b/1", "b/2", "b/3", "c"] {
            c.put_if(n, meta(n, 1), ok).unwrap();
        }
        let (p, more) = c.list("b/", None, 2);
        assert_eq!(p.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b/1", "b/2"]);
        assert!(more);
        let (p, more) = c.list("b/", Some("b/2"), 2);
        assert_eq!(p.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b/3"]);
        assert!(!more);
        let (p, _) = c.list("", Some("a"), 10);
        assert_eq!(p.len(), 4);
        let (p, more) = c.list("b/", Some("a"), 10);
        assert_eq!(p.len(), 3, "an `after` before the prefix starts at the prefix");
        assert!(!more);
        let (p, more) = c.list("", None, 0);
        assert!(p.is_empty());
        assert!(more, "max 0 with objects present: more follow");
    }

    #[test]
    fn concurrent_commits_share_syncs_and_all_land() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.log");
        let c = Arc::new(Catalog::open(&p).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        c.put_if(&format!("t{t}/{i:03}"), meta("v", i), ok).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(c);
        assert_eq!(Catalog::open(&p).unwrap().len(), 400);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_objects() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.log");
        let min = 16 << 10;
        let c = Catalog::open_with(&p, min).unwrap();
        // Overwrite a few names until the dead records pass the threshold.
        let mut i = 0u64;
        let mut last = 0;
        while i < 2_000 {
            c.put_if(&format!("k{}", i % 5), meta(&format!("v{i}"), i), ok).unwrap();
            i += 1;
            if c.log_bytes() < last {
                // Compaction has run: the log shrank to the live records.
                assert!(last > min / 2, "not long before {min} bytes (was {last})");
                break;
            }
            last = c.log_bytes();
        }
        assert!(i < 2_000, "the log was compacted (log {} bytes)", c.log_bytes());
        let want: Vec<_> = (0..5).map(|n| c.get(&format!("k{n}")).unwrap()).collect();
        c.put_if("after", meta("va", 1), ok).unwrap();
        drop(c);
        let c = Catalog::open(&p).unwrap();
        assert_eq!(c.len(), 6);
        for (n, w) in want.iter().enumerate() {
            assert_eq!(&c.get(&format!("k{n}")).unwrap(), w);
        }
        assert!(
            c.get("after").is_some(),
            "a commit after compaction lands in the new log"
        );
    }
}
