//! Reading a pinned block: the pin holds its segment file open, so a
//! reclaimed (unlinked) segment stays readable until the last reader is done.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::Inner;
use super::file;
use super::index::{Loc, Segment};
use super::record::{self, PAGE};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::events::Change;
use crate::tier::{PinnedBlock, TierCounters, TierKind};

/// A pinned disk block: holds its segment file open.
pub(super) struct DiskPin {
    pub(super) inner: Arc<Inner>,
    pub(super) seg: Arc<Segment>,
    pub(super) key: BlockKey,
    pub(super) loc: Loc,
}

impl std::fmt::Debug for DiskPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskPin")
            .field("key", &self.key)
            .field("loc", &self.loc)
            .finish()
    }
}

impl DiskPin {
    pub(super) fn read(&self, out: &mut [u8]) -> Result<()> {
        let loc = &self.loc;
        let data_at = loc.off + u64::from(loc.data_offset);
        let io = |e| Error::io(format!("read block {} from segment {}", self.key, self.seg.id), e);
        let page = PAGE as usize;
        if !self.inner.direct || (loc.data_offset as u64 == PAGE && file::is_page_aligned(out.as_ptr(), out.len())) {
            self.seg.file.read_exact_at(out, data_at).map_err(io)?;
        } else if loc.data_offset as u64 == PAGE && file::is_page_aligned(out.as_ptr(), page) && out.len() > page {
            // Whole pages straight into the caller's buffer, the last
            // partial page through a page of staging.
            let head = out.len() / page * page;
            self.seg.file.read_exact_at(&mut out[..head], data_at).map_err(io)?;
            let mut buf = self.inner.staging_or_own(page)?;
            self.seg
                .file
                .read_exact_at(&mut buf[..page], data_at + head as u64)
                .map_err(io)?;
            let tail = out.len() - head;
            out[head..].copy_from_slice(&buf[..tail]);
        } else {
            // Read whole pages into staging, then copy the block out.
            let first = data_at - data_at % PAGE;
            let span = (data_at + loc.len).next_multiple_of(PAGE) - first;
            let mut buf = self.inner.staging_or_own(span as usize)?;
            self.seg
                .file
                .read_exact_at(&mut buf[..span as usize], first)
                .map_err(io)?;
            let s = (data_at - first) as usize;
            out.copy_from_slice(&buf[s..s + loc.len as usize]);
        }
        TierCounters::add(&self.inner.counters.bytes_read, loc.len);
        Ok(())
    }

    pub(super) fn check(&self, out: &[u8]) -> Result<()> {
        let loc = &self.loc;
        if record::data_hash(self.key, loc.ns, out) != loc.hash {
            TierCounters::add(&self.inner.counters.corrupt, 1);
            let mut st = self.inner.state.lock();
            if st.index.get(&self.key).is_some_and(|l| l.position() == loc.position()) {
                st.index.remove(&self.key);
                st.used_bytes -= loc.record_bytes();
                if let Some(log) = self.inner.events.get() {
                    log.record(loc.ns, Change::Removed, TierKind::Disk, &[self.key]);
                }
            }
            tracing::warn!(key = %self.key, segment = self.seg.id, offset = loc.off, "checksum mismatch: block dropped");
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!("block {} in segment {} at {}", self.key, self.seg.id, loc.off),
            ));
        }
        Ok(())
    }
}

impl PinnedBlock for DiskPin {
    fn namespace(&self) -> NamespaceId {
        self.loc.ns
    }

    fn len(&self) -> usize {
        self.loc.len as usize
    }

    fn read_unverified(&self, out: &mut [u8]) -> Result<()> {
        if out.len() as u64 != self.loc.len {
            return Err(Error::invalid(format!(
                "block {} is {} bytes, the buffer {}",
                self.key,
                self.loc.len,
                out.len()
            )));
        }
        self.read(out)
    }

    fn verify(&self, out: &[u8]) -> Result<()> {
        self.check(out)
    }
}
