//! The manager's counters and the snapshot it reports.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::writeback::WritebackStats;
use super::{BlockManager, Mode};
use crate::tier::blob::{BlobStats, BlobTier};
use crate::tier::{TierStats, stats_of};

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) lookups: AtomicU64,
    pub(super) lookup_hit_blocks: AtomicU64,
    pub(super) stores: AtomicU64,
    pub(super) stored_blocks: AtomicU64,
    pub(super) present_blocks: AtomicU64,
    pub(super) loads: AtomicU64,
    pub(super) loaded_blocks: AtomicU64,
    pub(super) missed_blocks: AtomicU64,
    pub(super) load_failures: AtomicU64,
    pub(super) promotions: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) not_admitted: AtomicU64,
    pub(super) offloaded: AtomicU64,
    pub(super) offload_errors: AtomicU64,
    pub(super) served_local_bytes: AtomicU64,
    pub(super) served_blob_bytes: AtomicU64,
    pub(super) blob_promotions: AtomicU64,
}

/// A snapshot of the manager's counters and its tiers'.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerStats {
    /// The mode running.
    pub mode: Mode,
    /// The host tier, if configured.
    pub host: Option<TierStats>,
    /// The disk tier, if configured.
    pub disk: Option<TierStats>,
    /// Lookup requests.
    pub lookups: u64,
    /// Blocks found by lookups (sum of present prefixes).
    pub lookup_hit_blocks: u64,
    /// Store requests.
    pub stores: u64,
    /// Blocks written by stores.
    pub stored_blocks: u64,
    /// Blocks stores found already present.
    pub present_blocks: u64,
    /// Load requests.
    pub loads: u64,
    /// Blocks loaded.
    pub loaded_blocks: u64,
    /// Blocks a load asked for beyond the present prefix.
    pub missed_blocks: u64,
    /// Present blocks that failed to load (corrupt or unreadable).
    pub load_failures: u64,
    /// Disk hits copied into the host tier.
    pub promotions: u64,
    /// Requests answered with `Throttled`.
    pub throttled: u64,
    /// Blocks the admission filter kept off disk.
    pub not_admitted: u64,
    /// Blocks written to disk by the cascade.
    pub offloaded: u64,
    /// Cascade writes that failed (the block stays in host memory).
    pub offload_errors: u64,
    /// Write-through blocks queued now.
    pub offload_queue_depth: u64,
    /// The blob tier, if configured.
    pub blob: Option<BlobStats>,
    /// The writeback to blob, in writeback mode.
    pub writeback: Option<WritebackStats>,
    /// Bytes loads served from host and disk.
    pub served_local_bytes: u64,
    /// Bytes loads served from blob.
    pub served_blob_bytes: u64,
    /// Blob hits copied into a local tier.
    pub blob_promotions: u64,
    /// The throughput reduction to blob: bytes served from local tiers over
    /// all bytes served (0 before anything is served).
    pub throughput_reduction: f64,
}

impl BlockManager {
    /// A snapshot of every counter.
    pub fn stats(&self) -> ManagerStats {
        let sh = &self.shared;
        let c = &sh.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        ManagerStats {
            mode: sh.cfg.mode,
            host: sh.host.as_ref().map(|t| stats_of(t)),
            disk: sh.disk.as_ref().map(|t| stats_of(t)),
            lookups: l(&c.lookups),
            lookup_hit_blocks: l(&c.lookup_hit_blocks),
            stores: l(&c.stores),
            stored_blocks: l(&c.stored_blocks),
            present_blocks: l(&c.present_blocks),
            loads: l(&c.loads),
            loaded_blocks: l(&c.loaded_blocks),
            missed_blocks: l(&c.missed_blocks),
            load_failures: l(&c.load_failures),
            promotions: l(&c.promotions),
            throttled: l(&c.throttled),
            not_admitted: l(&c.not_admitted),
            offloaded: l(&c.offloaded),
            offload_errors: l(&c.offload_errors),
            offload_queue_depth: *sh.queue.queued.lock() as u64,
            blob: sh.blob.as_ref().map(BlobTier::stats),
            writeback: sh.wb.as_ref().map(|w| w.stats()),
            served_local_bytes: l(&c.served_local_bytes),
            served_blob_bytes: l(&c.served_blob_bytes),
            blob_promotions: l(&c.blob_promotions),
            throughput_reduction: {
                let (local, blob) = (l(&c.served_local_bytes), l(&c.served_blob_bytes));
                if local + blob == 0 {
                    0.0
                } else {
                    local as f64 / (local + blob) as f64
                }
            },
        }
    }
}
