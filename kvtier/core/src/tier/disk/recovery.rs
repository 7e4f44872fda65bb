//! Opening: every segment is read in id order and the index rebuilt.
//! Sealed segments are indexed from their headers alone; unsealed ones
//! (the tail of a crash) have every record's data verified, so torn records
//! are skipped and counted, never indexed.

use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::Inner;
use super::file::{self, AlignedBuf};
use super::index::{SegMeta, Segment, State, apply, segment_path};
use super::record::{self, PAGE, RecordHeader, Seal};
use super::segments::{Reclaim, write_seal};
use crate::error::{Error, Result};

/// What opening found in the directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// Segment files read.
    pub segments: u64,
    /// Segments that had no seal (written when the process stopped) and
    /// whose records were all verified.
    pub unsealed_segments: u64,
    /// Blocks indexed.
    pub blocks: u64,
    /// Records skipped: a header that does not verify, data that does not
    /// match its checksum, or a record cut short by the end of the file.
    pub skipped_records: u64,
    /// Segment files whose own header did not verify (removed).
    pub bad_segments: u64,
}

impl Inner {
    /// Reads every segment in id order and rebuilds the index.
    pub(super) fn recover(&mut self) -> Result<()> {
        let dir = self.cfg.dir.clone();
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))? {
            let e = e.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".seg").and_then(|h| u64::from_str_radix(h, 16).ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut st = State::default();
        let mut rec = Recovery::default();
        for id in ids {
            let path = segment_path(&dir, id);
            self.recover_segment(&mut st, &mut rec, id, &path)?;
            st.next_id = id + 1;
        }
        // A smaller capacity than last time: drop the oldest segments. At
        // capacity, nothing goes now; the first new segment makes room.
        while st.segments.len() > self.max_segments {
            if self.reclaim_oldest(&mut st, Reclaim::UnlinkNow).is_err() {
                break;
            }
        }
        rec.blocks = st.index.len() as u64;
        self.recovery = rec;
        *self.state.get_mut() = st;
        Ok(())
    }

    pub(super) fn recover_segment(&self, st: &mut State, rec: &mut Recovery, id: u64, path: &Path) -> Result<()> {
        let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
        let file = file::open(path, false, self.direct).map_err(|e| io("open", e))?;
        let stat = file.metadata().map_err(|e| io("stat", e))?;
        let file_len = stat.len();
        // Every record in the file was written by its last modification
        // (one ms later, for the clock's rounding): the write time its
        // copies get (see `Tier::remove_written_before`). A time the
        // filesystem cannot tell counts as now.
        let written_ms = stat
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(crate::tier::now_ms, |d| d.as_millis() as u64 + 1);
        let mut page = AlignedBuf::new(PAGE as usize);
        let header_ok = file_len >= PAGE
            && read_full(&file, page.as_mut_slice(), 0).is_ok()
            && record::decode_segment_header(page.as_slice()) == Some((id, self.cfg.segment_bytes));
        if !header_ok {
            // Not ours, another format, or a segment of another size: we
            // cannot trust its offsets, so it goes.
            tracing::warn!(path = %path.display(), "segment header does not verify: removing the segment");
            rec.bad_segments += 1;
            drop(file);
            std::fs::remove_file(path).map_err(|e| io("remove", e))?;
            return Ok(());
        }
        rec.segments += 1;
        let seal_at = self.cfg.segment_bytes - PAGE;
        let seal = (file_len >= seal_at + PAGE && read_full(&file, page.as_mut_slice(), seal_at).is_ok())
            .then(|| Seal::decode(page.as_slice()))
            .flatten()
            .filter(|s| s.id == id && s.end <= seal_at);
        let (end, verify) = match seal {
            Some(s) => (s.end, false),
            None => {
                rec.unsealed_segments += 1;
                (file_len.min(seal_at), true)
            }
        };
        let seg = Arc::new(Segment { id, file });
        let mut meta = SegMeta {
            seg: seg.clone(),
            path: path.to_path_buf(),
            keys: Vec::new(),
            writers: 0,
            sealed: true,
            failed: false,
            seal_written: seal.is_some(),
            next: end,
            records: 0,
        };
        let mut scan = Scanner::new(&seg.file, id, end, verify);
        let mut last_end = PAGE;
        // A counted skip, and whether a whole record follows one.
        let (mut skipped, mut torn) = (false, false);
        let mut pos = PAGE;
        while pos < end {
            match scan.record_at(pos).map_err(|e| io("read", e))? {
                Scanned::Record(h) => {
                    torn |= skipped;
                    meta.records += 1;
                    last_end = pos + h.record_bytes();
                    apply(&mut st.index, &mut st.used_bytes, &mut meta, pos, &h, written_ms);
                    pos += h.record_bytes();
                }
                Scanned::Skip { counted, next } => {
                    rec.skipped_records += u64::from(counted);
                    skipped |= counted;
                    pos = next;
                }
            }
        }
        if torn {
            // A torn record lies before the end of the last whole one (a
            // record cut off at the end lies past the seal's end, and is
            // never read again). A seal would make the next open index the skipped records
            // from their (valid) headers without verifying their data, and
            // a torn record would then shadow an older whole copy of its
            // key: the segment stays unsealed and is verified every time.
            meta.next = last_end;
        } else if !meta.seal_written {
            // Everything in it is verified now: seal it so the next open trusts it.
            meta.next = last_end;
            if let Err(e) = write_seal(&meta, self.cfg.segment_bytes, self.cfg.sync_writes, &self.io) {
                tracing::warn!(path = %path.display(), "could not seal recovered segment: {e}");
            } else {
                meta.seal_written = true;
            }
        }
        st.segments.insert(id, meta);
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `off`, zero-filling past the end of the file.
pub(super) fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a segment in large windows while rebuilding the index.
struct Scanner<'a> {
    file: &'a File,
    segment: u32,
    end: u64,
    verify: bool,
    window: AlignedBuf,
    window_off: u64,
    window_len: u64,
}

pub(super) enum Scanned {
    Record(RecordHeader),
    /// Nothing valid at this position; `counted` when it looked like a
    /// record (a header that fails, data that fails, a record cut short).
    Skip {
        counted: bool,
        next: u64,
    },
}

/// Window size when every byte is read (unsealed segments).
const SCAN_WINDOW: usize = 4 << 20;

impl<'a> Scanner<'a> {
    pub(super) fn new(file: &'a File, segment: u64, end: u64, verify: bool) -> Self {
        Self {
            file,
            segment: segment as u32,
            end,
            verify,
            window: AlignedBuf::new(SCAN_WINDOW),
            window_off: 0,
            window_len: 0,
        }
    }

    /// The bytes `[off, off+len)`, read into the window if needed.
    pub(super) fn bytes(&mut self, off: u64, len: u64) -> std::io::Result<&[u8]> {
        if off < self.window_off || off + len > self.window_off + self.window_len {
            // Sealed segments hop from header to header; unsealed ones read on.
            let want = if self.verify { len.max(SCAN_WINDOW as u64) } else { len };
            let want = want.min(self.end - off).max(len).next_multiple_of(PAGE);
            if want as usize > self.window.len() {
                self.window = AlignedBuf::new(want as usize);
            }
            read_full(self.file, &mut self.window.as_mut_slice()[..want as usize], off)?;
            self.window_off = off;
            self.window_len = want;
        }
        let s = (off - self.window_off) as usize;
        Ok(&self.window.as_slice()[s..s + len as usize])
    }

    pub(super) fn record_at(&mut self, pos: u64) -> std::io::Result<Scanned> {
        let page = self.bytes(pos, PAGE)?;
        let Some(h) = RecordHeader::decode(page) else {
            let looked_like_one = page[..4] == *b"KVTR";
            return Ok(Scanned::Skip {
                counted: looked_like_one,
                next: pos + PAGE,
            });
        };
        if h.segment != self.segment {
            // Left from the file's previous life as another segment: not a
            // record of this one. Its extent may cover new records, so the
            // scan steps a page, not its length.
            return Ok(Scanned::Skip {
                counted: false,
                next: pos + PAGE,
            });
        }
        let rec = h.record_bytes();
        if pos + rec > self.end {
            return Ok(Scanned::Skip {
                counted: true,
                next: pos + PAGE,
            });
        }
        if self.verify && !h.is_tombstone() {
            let data = &self.bytes(pos, rec)?[h.data_offset as usize..][..h.data_len as usize];
            if record::data_hash(h.key, h.ns, data) != h.data_hash {
                // A torn or corrupt record: its length is trustworthy (the
                // header verified), so the scan continues after it.
                return Ok(Scanned::Skip {
                    counted: true,
                    next: pos + rec,
                });
            }
        }
        Ok(Scanned::Record(h))
    }
}
