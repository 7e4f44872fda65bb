//! Storage tiers behind the GPU: the [`Tier`] contract and its implementations.
//!
//! - [`host::HostTier`]: a byte-budgeted pool of CPU memory (G2).
//! - [`disk::DiskTier`]: log-structured segment files on a local SSD (G3).
//! - [`blob`]: Azure Blob (G4), behind the SSD: read on a local miss,
//!   written lazily in writeback mode.
//!
//! Every local tier passes the same conformance suite ([`conformance`]).
//!
//! [`Tier`] is that suite's contract, not the seam the manager dispatches
//! through: the [`crate::BlockManager`] holds the host, disk and blob tiers
//! as a fixed set of concrete types, because it uses what only each one
//! has (host pins for write-through, the demotion hook, packed disk
//! writes, the retain hook, windowed blob fetches); see its docs. Faults
//! are injected below the tiers, at the file I/O boundary
//! ([`crate::fsio::FileIo`], given to [`disk::DiskTier::open_with`] and
//! [`crate::BlockManager::open_with`]), and the blob tier runs over any
//! `object_store` ([`blob::BlobTier::with_store`]).

pub mod blob;
pub mod disk;
pub mod host;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::block::{BlockKey, NamespaceId};
use crate::error::Result;

/// Which tier a block lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TierKind {
    /// CPU memory.
    Host,
    /// Local SSD.
    Disk,
    /// Azure Blob (see [`blob`]; not a [`Tier`]).
    Blob,
}

impl TierKind {
    /// The tier's name, as Stats, lookups and the Python package print it
    /// (serde's spelling too).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Disk => "disk",
            Self::Blob => "blob",
        }
    }
}

/// What a [`Tier::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The block was written.
    Inserted,
    /// The key was already present; keys name their content, so nothing was written.
    Present,
}

/// A block held readable: its bytes stay valid until the pin is dropped,
/// even if the tier evicts or removes the key meanwhile.
pub trait PinnedBlock: Send + Sync + std::fmt::Debug {
    /// The namespace the block was stored in.
    fn namespace(&self) -> NamespaceId;

    /// Length of the block in bytes.
    fn len(&self) -> usize;

    /// Whether the block is empty (never true for stored KV).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the block into `out`, which must be exactly [`PinnedBlock::len`]
    /// bytes, without verifying it: [`PinnedBlock::verify`] must pass before
    /// the bytes are used. Split so that a caller can verify one block while
    /// the next is read. On error the content of `out` is unspecified.
    fn read_unverified(&self, out: &mut [u8]) -> Result<()>;

    /// Verifies bytes that [`PinnedBlock::read_unverified`] put in `out`,
    /// where the tier keeps checksums. A mismatch is
    /// [`crate::ErrorKind::ChecksumMismatch`], counted by the tier, and the
    /// key is dropped from the tier.
    fn verify(&self, out: &[u8]) -> Result<()> {
        let _ = out;
        Ok(())
    }

    /// Reads and verifies: the bytes in `out` are the block's, or an error.
    fn read_into(&self, out: &mut [u8]) -> Result<()> {
        self.read_unverified(out)?;
        self.verify(out)
    }

    /// The block's bytes where they lie, when the tier holds them in
    /// memory (the host pool, a downloaded blob): a caller copies them
    /// straight to their destination instead of reading them into a buffer
    /// first. Unverified, like [`PinnedBlock::read_unverified`]: pass them
    /// to [`PinnedBlock::verify`] before use. The tier counts the read.
    /// `None` (the default) for blocks that must be read, like a disk's.
    fn in_memory(&self) -> Option<&[u8]> {
        None
    }
}

/// A pinned block, boxed.
pub type Pin = Box<dyn PinnedBlock>;

/// A place that stores blocks by key.
///
/// Contract, for every implementation:
/// - **Atomic puts**: a block is visible to `contains`/`pin` only once all of
///   its bytes are stored; a failed put leaves no trace and changes nothing
///   already stored.
/// - **Content-addressed**: a key names its content, so a put of a present key
///   writes nothing and answers [`Stored::Present`].
/// - **Pins outlive eviction**: a [`Pin`] reads the bytes it pinned even if the
///   key is evicted or removed after pinning.
/// - **Bounded**: `usage().used_bytes <= usage().capacity_bytes` at all times;
///   a tier makes room by evicting unpinned blocks, and answers
///   [`crate::ErrorKind::NoSpace`] only when it cannot.
/// - `contains` may be stale by the time the caller acts on it; `pin` is the
///   way to hold a block.
///
/// Methods may block on I/O; async callers run them on a blocking pool.
pub trait Tier: Send + Sync {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// Whether the tier holds `key` now.
    fn contains(&self, key: &BlockKey) -> bool;

    /// Stores `data` under `key`, in namespace `ns`.
    fn put(&self, ns: NamespaceId, key: BlockKey, data: &[u8]) -> Result<Stored>;

    /// Pins `key` for reading; `None` on a miss.
    fn pin(&self, key: &BlockKey) -> Option<Pin>;

    /// Removes `key`; answers whether it was present. Pins keep reading.
    fn remove(&self, key: &BlockKey) -> Result<bool>;

    /// Removes `key` only if this tier's copy was last written before
    /// `before_ms` (Unix time, milliseconds); answers whether it removed
    /// one. A copy counts as written when it was stored and again each time
    /// a put finds it held (that put is acknowledged by this copy), so a
    /// delete applied late (one a cluster member missed while it was down)
    /// never takes a copy put after it. Atomic against puts of `key`. A
    /// tier that keeps no write times keeps the copy.
    fn remove_written_before(&self, key: &BlockKey, before_ms: u64) -> Result<bool> {
        let _ = (key, before_ms);
        Ok(false)
    }

    /// Bytes and blocks held now.
    fn usage(&self) -> Usage;

    /// The tier's counters.
    fn counters(&self) -> &TierCounters;
}

/// The wall clock in Unix milliseconds: the write times tiers keep (see
/// [`Tier::remove_written_before`]). A clock before 1970 reads as 0.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a [`TierExt::get`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The block was copied out and verified.
    Hit,
    /// The tier does not hold the key. A miss is not an error.
    Miss,
}

/// Conveniences over [`Tier`].
pub trait TierExt: Tier {
    /// Copies the block under `key` into `out` (exactly its length).
    fn get(&self, key: &BlockKey, out: &mut [u8]) -> Result<Fetched> {
        match self.pin(key) {
            None => Ok(Fetched::Miss),
            Some(p) => p.read_into(out).map(|()| Fetched::Hit),
        }
    }
}

impl<T: Tier + ?Sized> TierExt for T {}

/// Space held by a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// Bytes of blocks held (disk: whole records, with headers and padding).
    pub used_bytes: u64,
    /// The tier's budget.
    pub capacity_bytes: u64,
    /// Blocks held.
    pub blocks: u64,
}

/// Counters of one tier, shared by the tier and the manager.
#[derive(Debug, Default)]
pub struct TierCounters {
    /// Blocks a lookup or load found in this tier.
    pub hits: AtomicU64,
    /// Blocks a load looked for in this tier and did not find.
    pub misses: AtomicU64,
    /// Bytes written into the tier.
    pub bytes_written: AtomicU64,
    /// Bytes read out of the tier.
    pub bytes_read: AtomicU64,
    /// Blocks dropped to make room.
    pub evictions: AtomicU64,
    /// Blocks whose bytes failed verification (never served).
    pub corrupt: AtomicU64,
    /// Puts refused for lack of space or buffers.
    pub rejected: AtomicU64,
}

/// A snapshot of [`TierCounters`] and [`Usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TierStats {
    /// Which tier.
    pub tier: Option<TierKind>,
    /// See [`TierCounters::hits`].
    pub hits: u64,
    /// See [`TierCounters::misses`].
    pub misses: u64,
    /// See [`TierCounters::bytes_written`].
    pub bytes_written: u64,
    /// See [`TierCounters::bytes_read`].
    pub bytes_read: u64,
    /// See [`TierCounters::evictions`].
    pub evictions: u64,
    /// See [`TierCounters::corrupt`].
    pub corrupt: u64,
    /// See [`TierCounters::rejected`].
    pub rejected: u64,
    /// Space held now.
    pub usage: Usage,
}

impl TierCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// A snapshot for a tier of `kind` holding `usage`.
    pub fn snapshot(&self, kind: TierKind, usage: Usage) -> TierStats {
        TierStats {
            tier: Some(kind),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            corrupt: self.corrupt.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            usage,
        }
    }
}

/// A tier's stats snapshot.
pub fn stats_of(t: &dyn Tier) -> TierStats {
    t.counters().snapshot(t.kind(), t.usage())
}
