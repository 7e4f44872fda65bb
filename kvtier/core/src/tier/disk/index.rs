//! The in-memory index: where each live block's record is, and the list of
//! segment files the records live in.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::{PAGE, RecordHeader};
use crate::block::{BlockKey, KeyMap, NamespaceId};
use crate::events::Change;

/// A segment file. Readers hold it through an `Arc`, so an unlinked file
/// stays readable until the last reader is done.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) id: u64,
    pub(super) file: File,
}

#[derive(Debug)]
pub(super) struct SegMeta {
    pub(super) seg: Arc<Segment>,
    pub(super) path: PathBuf,
    /// Keys whose live record is (or was) in this segment.
    pub(super) keys: Vec<BlockKey>,
    /// Writes reserved in this segment and not yet finished.
    pub(super) writers: u32,
    /// No more reservations go here.
    pub(super) sealed: bool,
    /// A write into it failed: never sealed, so the next open verifies it.
    pub(super) failed: bool,
    pub(super) seal_written: bool,
    /// Next free offset.
    pub(super) next: u64,
    pub(super) records: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) seg: u64,
    pub(super) off: u64,
    pub(super) data_offset: u32,
    pub(super) len: u64,
    pub(super) hash: u64,
    pub(super) ns: NamespaceId,
    /// An upper bound on when the copy was last written (Unix ms): when its
    /// write finished, or a later put found it held; after a restart, the
    /// segment file's modification time. Not on disk.
    pub(super) written_ms: u64,
}

impl Loc {
    pub(super) fn record_bytes(&self) -> u64 {
        (u64::from(self.data_offset) + self.len).next_multiple_of(PAGE)
    }

    /// Where the record is: later writes lie at greater positions, which is
    /// the order recovery replays them in.
    pub(super) fn position(&self) -> (u64, u64) {
        (self.seg, self.off)
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) index: KeyMap<Loc>,
    pub(super) segments: BTreeMap<u64, SegMeta>,
    pub(super) active: Option<u64>,
    pub(super) next_id: u64,
    pub(super) used_bytes: u64,
    /// Keys whose write failed, with the segment and namespace of the
    /// record: the bytes may have reached the file whole, and the next
    /// open would index them, so a removal writes a tombstone for these
    /// too. Dropped with their segment, or once a later record (a stored
    /// copy or a tombstone) of the key is written.
    pub(super) stray: KeyMap<(u64, NamespaceId)>,
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Puts a scanned or written record, written by `written_ms` at the
/// latest, into the index; says how the key's presence changed (`None`:
/// it did not).
///
/// A record that lies before the one the index holds for its key changes
/// nothing: writes finish out of order, and the live index must agree with
/// what recovery, which replays records in position order, rebuilds.
pub(super) fn apply(
    index: &mut KeyMap<Loc>,
    used_bytes: &mut u64,
    meta: &mut SegMeta,
    off: u64,
    h: &RecordHeader,
    written_ms: u64,
) -> Option<Change> {
    if index.get(&h.key).is_some_and(|l| l.position() > (meta.seg.id, off)) {
        return None;
    }
    let had = index
        .remove(&h.key)
        .inspect(|old| *used_bytes -= old.record_bytes())
        .is_some();
    if h.is_tombstone() {
        return had.then_some(Change::Removed);
    }
    let loc = Loc {
        seg: meta.seg.id,
        off,
        data_offset: h.data_offset,
        len: h.data_len,
        hash: h.data_hash,
        ns: h.ns,
        written_ms,
    };
    *used_bytes += loc.record_bytes();
    index.insert(h.key, loc);
    meta.keys.push(h.key);
    (!had).then_some(Change::Stored)
}
