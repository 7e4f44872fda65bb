//! Appending records: one block at a time, or small blocks packed into
//! one write; and the bounded staging buffers for blocks that are not
//! page-aligned.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Inner;
use super::file::{self, AlignedBuf};
use super::index::{Segment, State, apply};
use super::record::{self, HEADER_BYTES, PAGE, RecordHeader};
use super::segments::seal_if_done;
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::events::Change;
use crate::tier::{TierCounters, TierKind};

impl Inner {
    pub(super) fn staging_wait(&self) -> Duration {
        Duration::from_millis(self.cfg.staging_wait_ms)
    }

    /// Reserves `len` bytes in the active segment.
    pub(super) fn reserve(&self, len: u64) -> Result<(Arc<Segment>, u64)> {
        self.reserve_prefix(&[len]).map(|(seg, off, _)| (seg, off))
    }

    /// Reserves room for the longest prefix of `lens` (at least one) that
    /// fits the active segment, rolling to a new one when not even the
    /// first fits. Answers the segment, the offset and how many fit.
    pub(super) fn reserve_prefix(&self, lens: &[u64]) -> Result<(Arc<Segment>, u64, usize)> {
        self.reserve_locked(&mut self.state.lock(), lens)
    }

    /// [`Inner::reserve_prefix`] under the caller's lock.
    pub(super) fn reserve_locked(&self, st: &mut State, lens: &[u64]) -> Result<(Arc<Segment>, u64, usize)> {
        let seal_at = self.cfg.segment_bytes - PAGE;
        loop {
            if let Some(id) = st.active {
                let m = st.segments.get_mut(&id).expect("active segment is listed");
                let (mut n, mut total) = (0, 0);
                for &len in lens {
                    if m.next + total + len > seal_at {
                        break;
                    }
                    total += len;
                    n += 1;
                }
                if n > 0 {
                    let off = m.next;
                    m.next += total;
                    m.writers += 1;
                    return Ok((m.seg.clone(), off, n));
                }
            }
            self.roll(st)?;
        }
    }

    /// Ends a write of several records reserved with one
    /// [`Inner::reserve_prefix`]; publishes each when it was written whole.
    pub(super) fn finish_packed(&self, seg: &Segment, recs: &[(u64, RecordHeader)], written: &Result<()>) {
        let mut st = self.state.lock();
        let State {
            index,
            segments,
            active,
            used_bytes,
            stray,
            ..
        } = &mut *st;
        let m = segments
            .get_mut(&seg.id)
            .expect("a segment with a write in flight is never reclaimed");
        m.writers -= 1;
        m.records += recs.len() as u64;
        if written.is_ok() {
            let now = crate::tier::now_ms();
            for (off, h) in recs {
                stray.remove(&h.key);
                if let Some(change) = apply(index, used_bytes, m, *off, h, now)
                    && let Some(log) = self.events.get()
                {
                    log.record(h.ns, change, TierKind::Disk, &[h.key]);
                }
            }
        } else {
            // The region may be torn, or whole: a removal of these keys
            // must shadow it with a tombstone.
            for (_, h) in recs.iter().filter(|(_, h)| !h.is_tombstone()) {
                stray.insert(h.key, (seg.id, h.ns));
            }
            m.sealed = true;
            m.failed = true;
            if *active == Some(seg.id) {
                *active = None;
            }
        }
        seal_if_done(m, self.cfg.segment_bytes, self.cfg.sync_writes, &self.io);
    }

    /// Whether [`DiskTier::put_batch`] packs a block of `len` bytes: one
    /// `append` would stage (not large), that fits a staging buffer and a
    /// segment.
    pub(super) fn packable(&self, len: usize) -> bool {
        let rec = (HEADER_BYTES + len).next_multiple_of(PAGE as usize);
        len < 16 * PAGE as usize && rec <= self.staging.buf_bytes() && rec as u64 <= self.cfg.segment_bytes - 2 * PAGE
    }

    /// Writes small records (`(item, header)`, data in `items`) packed back
    /// to back, one reservation and one write per group. Answers one result
    /// per record.
    pub(super) fn append_packed(
        &self,
        recs: &[(usize, RecordHeader)],
        items: &[(NamespaceId, BlockKey, &[u8])],
    ) -> Vec<(usize, Result<()>)> {
        let mut out = Vec::with_capacity(recs.len());
        let mut rest = recs;
        // Every record left fails: the tier is out of buffers or room now.
        let fail_rest =
            |out: &mut Vec<(usize, Result<()>)>, rest: &[(usize, RecordHeader)], e: &Error, counted: u64| {
                TierCounters::add(&self.counters.rejected, (rest.len() as u64).saturating_sub(counted));
                out.extend(rest.iter().map(|(i, _)| (*i, Err(copy_error(e)))));
            };
        while !rest.is_empty() {
            // Stage before reserving, so a throttled put reserves nothing.
            let mut staging = match self.staging_or_own(rest[0].1.record_bytes() as usize) {
                Ok(s) => s,
                Err(e) => {
                    // Refused staging counted one rejection already.
                    fail_rest(&mut out, rest, &e, 1);
                    return out;
                }
            };
            // The group the buffer holds; the segment may take fewer.
            let mut lens = Vec::new();
            let mut total = 0;
            for (_, h) in rest {
                let len = h.record_bytes();
                if total + len > staging.len() as u64 {
                    break;
                }
                total += len;
                lens.push(len);
            }
            let (seg, off, n) = match self.reserve_prefix(&lens) {
                Ok(r) => r,
                Err(e) => {
                    fail_rest(&mut out, rest, &e, 0);
                    return out;
                }
            };
            let group = &rest[..n];
            rest = &rest[n..];
            let mut placed = Vec::with_capacity(n);
            let mut at = 0usize;
            for (i, h) in group {
                let mut h = *h;
                h.segment = seg.id as u32;
                let data = items[*i].2;
                let len = h.record_bytes() as usize;
                let buf = &mut staging[at..at + len];
                h.encode(buf);
                let d = h.data_offset as usize;
                buf[HEADER_BYTES..d].fill(0);
                buf[d..d + data.len()].copy_from_slice(data);
                buf[d + data.len()..].fill(0);
                placed.push((off + at as u64, h));
                at += len;
            }
            let mut r = self.io.write_all_at(&seg.file, &staging[..at], off);
            if r.is_ok() && self.cfg.sync_writes {
                r = self.io.sync_data(&seg.file);
            }
            let r = r.map_err(|e| Error::io(format!("write {n} records in segment {}", seg.id), e));
            self.finish_packed(&seg, &placed, &r);
            drop(staging);
            if n > 1 {
                self.batched_writes.fetch_add(1, Relaxed);
            }
            match &r {
                Ok(()) => {
                    let bytes = group.iter().map(|(_, h)| h.data_len).sum();
                    TierCounters::add(&self.counters.bytes_written, bytes);
                    out.extend(group.iter().map(|(i, _)| (*i, Ok(()))));
                }
                Err(e) => {
                    if e.kind() == ErrorKind::NoSpace {
                        tracing::warn!(dir = %self.cfg.dir.display(), "filesystem full before disk.capacity_bytes was reached: lower it or free space ({e})");
                    }
                    TierCounters::add(&self.counters.rejected, n as u64);
                    out.extend(group.iter().map(|(i, _)| (*i, Err(copy_error(e)))));
                }
            }
        }
        out
    }

    /// Ends a write reserved with [`Inner::reserve`]; publishes the record
    /// when it was written whole.
    pub(super) fn finish(&self, seg: &Segment, off: u64, h: &RecordHeader, written: &Result<()>) {
        self.finish_packed(seg, &[(off, *h)], written);
    }

    /// Writes one record, from the caller's buffer when it is page-aligned.
    pub(super) fn append(&self, h: &mut RecordHeader, data: &[u8]) -> Result<()> {
        // Large blocks start on a page, staged or not, so a reader with an
        // aligned buffer reads them without staging.
        let large = data.len() >= 16 * PAGE as usize;
        let direct_data = large && file::is_page_aligned(data.as_ptr(), data.len());
        h.data_offset = if large { PAGE as u32 } else { HEADER_BYTES as u32 };
        let at = h.data_offset as usize;
        let len = h.record_bytes();
        if len > self.cfg.segment_bytes - 2 * PAGE || data.len() as u64 > record::MAX_DATA_BYTES {
            return Err(Error::invalid(format!(
                "disk tier: a block of {} bytes does not fit a segment of {} bytes",
                data.len(),
                self.cfg.segment_bytes
            )));
        }
        // Stage before reserving, so a throttled put reserves nothing.
        let staged_len = if direct_data { PAGE } else { len } as usize;
        let mut staging = self.staging_or_own(staged_len)?;
        let buf = &mut staging[..staged_len];
        if direct_data {
            buf[HEADER_BYTES..].fill(0);
        } else {
            buf[HEADER_BYTES..at].fill(0);
            buf[at..at + data.len()].copy_from_slice(data);
            buf[at + data.len()..].fill(0);
        }
        let r = self.write_record(h, &mut *buf, data, direct_data, len);
        if let Err(e) = &r
            && e.kind() == ErrorKind::NoSpace
        {
            // The filesystem holds less than `capacity_bytes` promises. The
            // put fails and nothing held is evicted for it: a full disk is
            // the operator's to see, not something to hide by shrinking.
            tracing::warn!(dir = %self.cfg.dir.display(), "filesystem full before disk.capacity_bytes was reached: lower it or free space ({e})");
        }
        match &r {
            Ok(()) => TierCounters::add(&self.counters.bytes_written, data.len() as u64),
            Err(_) => TierCounters::add(&self.counters.rejected, 1),
        }
        r
    }

    pub(super) fn write_record(
        &self,
        h: &mut RecordHeader,
        buf: &mut [u8],
        data: &[u8],
        direct_data: bool,
        len: u64,
    ) -> Result<()> {
        let (seg, off) = self.reserve(len)?;
        h.segment = seg.id as u32;
        h.encode(buf);
        // One I/O for header and data: under O_DIRECT every write is a round
        // trip to the device, so a separate header write would cost one each.
        let mut r = if direct_data {
            self.io.write_all_vectored_at(&seg.file, &[buf, data], off)
        } else {
            self.io.write_all_at(&seg.file, buf, off)
        };
        if r.is_ok() && self.cfg.sync_writes {
            r = self.io.sync_data(&seg.file);
        }
        let r = r.map_err(|e| Error::io(format!("write record in segment {}", seg.id), e));
        self.finish(&seg, off, h, &r);
        r
    }

    /// Removes `key` if its copy was last written before `before_ms` (see
    /// [`crate::tier::Tier::remove_written_before`]).
    ///
    /// The tombstone's place is reserved under the lock that saw the old
    /// copy, and the copy leaves the index at once: a put of `key` from then
    /// on writes a record after the tombstone, which recovery replays in
    /// that order too. A tombstone that cannot be written puts the copy back.
    pub(super) fn remove_written_before(&self, key: &BlockKey, before_ms: u64) -> Result<bool> {
        let old = |st: &State| st.index.get(key).copied().filter(|l| l.written_ms < before_ms);
        // Most keys of a late delete are gone or newer: no buffer for those.
        if old(&self.state.lock()).is_none() {
            return Ok(false);
        }
        let mut staging = self.staging_or_own(PAGE as usize)?;
        let (seg, off, old) = {
            let mut st = self.state.lock();
            let Some(old) = old(&st) else {
                return Ok(false);
            };
            let (seg, off, _) = self.reserve_locked(&mut st, &[PAGE])?;
            st.index.remove(key);
            st.used_bytes -= old.record_bytes();
            if let Some(log) = self.events.get() {
                log.record(old.ns, Change::Removed, TierKind::Disk, &[*key]);
            }
            (seg, off, old)
        };
        let h = RecordHeader {
            flags: record::FLAG_TOMBSTONE,
            data_offset: HEADER_BYTES as u32,
            key: *key,
            ns: old.ns,
            data_len: 0,
            data_hash: record::data_hash(*key, old.ns, &[]),
            segment: seg.id as u32,
        };
        let buf = &mut staging[..PAGE as usize];
        buf.fill(0);
        h.encode(buf);
        let mut r = self.io.write_all_at(&seg.file, buf, off);
        if r.is_ok() && self.cfg.sync_writes {
            r = self.io.sync_data(&seg.file);
        }
        let r = r.map_err(|e| Error::io(format!("write a tombstone in segment {}", seg.id), e));
        self.finish(&seg, off, &h, &r);
        if r.is_err() {
            // The old record is still whole on disk: it stays held, unless
            // a put took the key since or its segment went.
            let mut st = self.state.lock();
            if !st.index.contains_key(key) && st.segments.contains_key(&old.seg) {
                st.index.insert(*key, old);
                st.used_bytes += old.record_bytes();
                if let Some(log) = self.events.get() {
                    log.record(old.ns, Change::Stored, TierKind::Disk, &[*key]);
                }
            }
        }
        r.map(|()| true)
    }

    /// Whether `key` is held; if so, a put just found it, and its copy
    /// counts as written now.
    pub(super) fn touch(&self, key: &BlockKey) -> bool {
        touch_locked(&mut self.state.lock(), key)
    }

    /// A staging buffer of at least `len` bytes: from the pool, or one-off
    /// when `len` is larger than the pool's buffers.
    pub(super) fn staging_or_own(&self, len: usize) -> Result<Staging<'_>> {
        if len > self.staging.buf_bytes() {
            self.oversize_staging.fetch_add(1, Relaxed);
            let kept = {
                let mut idle = self.oversize_idle.lock();
                let i = idle.iter().position(|b| b.len() >= len);
                i.map(|i| idle.swap_remove(i))
            };
            return Ok(Staging::Own(Oversize {
                buf: Some(kept.unwrap_or_else(|| AlignedBuf::new(len))),
                idle: &self.oversize_idle,
            }));
        }
        match self.staging.acquire(self.staging_wait()) {
            Some(b) => Ok(Staging::Pool(b)),
            None => {
                TierCounters::add(&self.counters.rejected, 1);
                Err(Error::throttled("disk tier: every staging buffer is busy; retry"))
            }
        }
    }
}

/// [`Inner::touch`] under the caller's lock.
pub(super) fn touch_locked(st: &mut State, key: &BlockKey) -> bool {
    match st.index.get_mut(key) {
        Some(l) => {
            l.written_ms = crate::tier::now_ms();
            true
        }
        None => false,
    }
}

/// The header of a new record of `data`.
pub(super) fn header(ns: NamespaceId, key: BlockKey, data: &[u8], data_offset: u32) -> RecordHeader {
    RecordHeader {
        flags: 0,
        data_offset,
        key,
        ns,
        data_len: data.len() as u64,
        data_hash: record::data_hash(key, ns, data),
        segment: 0,
    }
}

/// The same error again, for each record of a failed group (errors are not
/// `Clone`; the message already names the I/O error).
pub(super) fn copy_error(e: &Error) -> Error {
    Error::new(e.kind(), e.message())
}

pub(super) enum Staging<'a> {
    Pool(file::PoolBuf<'a>),
    Own(Oversize<'a>),
}

/// Idle oversize staging buffers kept for reuse, in bytes at most: a
/// stream of large unaligned blocks (checkpoint chunks from the network)
/// then reuses touched memory instead of faulting in a fresh buffer each.
const OVERSIZE_IDLE_BYTES: usize = 128 << 20;

/// A staging buffer larger than the pool's, kept idle after use while
/// [`OVERSIZE_IDLE_BYTES`] allow.
pub(super) struct Oversize<'a> {
    buf: Option<AlignedBuf>,
    idle: &'a Mutex<Vec<AlignedBuf>>,
}

impl Drop for Oversize<'_> {
    fn drop(&mut self) {
        let Some(b) = self.buf.take() else { return };
        let mut idle = self.idle.lock();
        if idle.iter().map(|x| x.len()).sum::<usize>() + b.len() <= OVERSIZE_IDLE_BYTES {
            idle.push(b);
        }
    }
}

impl std::ops::Deref for Staging<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Pool(b) => b.as_slice(),
            Self::Own(b) => b.buf.as_ref().expect("held until dropped").as_slice(),
        }
    }
}

impl std::ops::DerefMut for Staging<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Pool(b) => b.as_mut_slice(),
            Self::Own(b) => b.buf.as_mut().expect("held until dropped").as_mut_slice(),
        }
    }
}
