//! The disk tier's configuration: what users write in the `[disk]` table.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::DiskTier;
use super::record::PAGE;
use crate::error::Result;

/// Configuration of the disk tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Directory on the local SSD; made if missing, owned by one process.
    pub dir: PathBuf,
    /// Bytes of segment files the tier may hold.
    pub capacity_bytes: u64,
    /// Bytes per segment file; capacity holds at least two.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Use O_DIRECT where the filesystem supports it.
    #[serde(default = "yes")]
    pub direct_io: bool,
    /// `fdatasync` before acknowledging each put: survives power loss, not
    /// only a process crash, at the cost of a device flush per block.
    #[serde(default)]
    pub sync_writes: bool,
    /// Staging buffers for blocks that are not page-aligned.
    #[serde(default = "default_io_buffers")]
    pub io_buffers: usize,
    /// Bytes per staging buffer; larger unaligned blocks allocate one-off.
    #[serde(default = "default_io_buffer_bytes")]
    pub io_buffer_bytes: u64,
    /// How long a put waits for a staging buffer before it is throttled.
    #[serde(default = "default_staging_wait_ms")]
    pub staging_wait_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_segment_bytes() -> u64 {
    256 << 20
}
fn default_io_buffers() -> usize {
    4
}
fn default_io_buffer_bytes() -> u64 {
    (4 << 20) + 2 * PAGE
}
fn default_staging_wait_ms() -> u64 {
    1000
}

impl DiskConfig {
    /// A tier in `dir` holding `capacity_bytes`, other settings default.
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            capacity_bytes,
            segment_bytes: default_segment_bytes(),
            direct_io: true,
            sync_writes: false,
            io_buffers: default_io_buffers(),
            io_buffer_bytes: default_io_buffer_bytes(),
            staging_wait_ms: default_staging_wait_ms(),
        }
    }

    /// Opens the tier, rebuilding its index from the directory.
    pub fn build(&self) -> Result<DiskTier> {
        DiskTier::open(self)
    }
}
