//! The manager's configuration: what users write in TOML.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::BlockManager;
use crate::error::{Error, Result};
use crate::tier::blob::{BlobConfig, BlobMode};
use crate::tier::disk::DiskConfig;
use crate::tier::host::HostConfig;

/// How the tiers are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Host memory caches blocks; the disk tier (if any) sits behind it.
    #[default]
    Tiered,
    /// Only the SSD holds blocks; host memory is the disk tier's bounded
    /// staging, nothing more.
    SsdOnly,
}

/// When blocks go from host to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cascade {
    /// Written to disk in the background as soon as they are stored.
    WriteThrough,
    /// Written to disk when the host tier evicts them.
    #[default]
    OnEviction,
}

/// Configuration of a [`BlockManager`]: what users write in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// Tiered (host + disk) or SSD-only.
    #[serde(default)]
    pub mode: Mode,
    /// When host blocks go to disk.
    #[serde(default)]
    pub cascade: Cascade,
    /// The host tier; none in SSD-only mode.
    #[serde(default)]
    pub host: Option<HostConfig>,
    /// The disk tier.
    #[serde(default)]
    pub disk: Option<DiskConfig>,
    /// A block goes to disk once stored this many times (1: always).
    #[serde(default = "one")]
    pub disk_admission_min_seen: u8,
    /// Counters per row of the admission sketch.
    #[serde(default = "default_admission_counters")]
    pub admission_counters: usize,
    /// Copy disk hits into the host tier.
    #[serde(default = "yes")]
    pub promote_on_hit: bool,
    /// Write-through blocks queued for disk at most; more are throttled.
    #[serde(default = "default_offload_queue")]
    pub offload_queue_blocks: usize,
    /// Threads writing the write-through queue to disk: with O_DIRECT each
    /// write waits for the device, so two keep it busy where one leaves
    /// gaps.
    #[serde(default = "default_offload_workers")]
    pub offload_workers: usize,
    /// The Azure Blob tier behind the disk, if any.
    #[serde(default)]
    pub blob: Option<BlobConfig>,
    /// Tier events kept per namespace that someone reads (see
    /// [`crate::events`]); a reader that falls further behind resyncs.
    #[serde(default = "default_event_capacity")]
    pub event_capacity: usize,
}

fn one() -> u8 {
    1
}
fn yes() -> bool {
    true
}
fn default_admission_counters() -> usize {
    1 << 20
}
fn default_offload_queue() -> usize {
    64
}
fn default_offload_workers() -> usize {
    2
}
fn default_event_capacity() -> usize {
    crate::events::DEFAULT_CAPACITY
}

impl ManagerConfig {
    /// Host tier only.
    pub fn host_only(host: HostConfig) -> Self {
        Self::tiered(Some(host), None)
    }

    /// SSD-only mode on `disk`.
    pub fn ssd_only(disk: DiskConfig) -> Self {
        Self {
            mode: Mode::SsdOnly,
            ..Self::tiered(None, Some(disk))
        }
    }

    /// Host in front of disk, cascading on eviction.
    pub fn tiered(host: Option<HostConfig>, disk: Option<DiskConfig>) -> Self {
        Self {
            mode: Mode::Tiered,
            cascade: Cascade::OnEviction,
            host,
            disk,
            disk_admission_min_seen: 1,
            admission_counters: default_admission_counters(),
            promote_on_hit: true,
            offload_queue_blocks: default_offload_queue(),
            offload_workers: default_offload_workers(),
            blob: None,
            event_capacity: default_event_capacity(),
        }
    }

    /// Parses TOML; unknown keys are errors, not silently ignored.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config(format!("manager config: {e}")))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Self::from_toml(&text)
    }

    pub(super) fn validate(&self) -> Result<()> {
        match (self.mode, &self.host, &self.disk) {
            (Mode::SsdOnly, Some(_), _) => Err(Error::config("ssd-only mode takes no [host] tier")),
            (Mode::SsdOnly, None, None) => Err(Error::config("ssd-only mode needs a [disk] tier")),
            (Mode::Tiered, None, None) => Err(Error::config("configure a [host] tier, a [disk] tier, or both")),
            _ if self.offload_queue_blocks == 0 => Err(Error::config("offload_queue_blocks must be > 0")),
            _ if !(1..=64).contains(&self.offload_workers) => {
                Err(Error::config("offload_workers must be between 1 and 64"))
            }
            _ if !(1..=1 << 24).contains(&self.event_capacity) => {
                Err(Error::config("event_capacity must be between 1 and 16777216"))
            }
            _ => match &self.blob {
                Some(b) if b.mode == BlobMode::Writeback && self.disk.is_none() => Err(Error::config(
                    "blob mode writeback keeps its dirty log on the SSD: configure a [disk] tier",
                )),
                Some(b) => b.validate(),
                None => Ok(()),
            },
        }
    }

    /// Opens the tiers and starts the manager.
    pub fn build(&self) -> Result<BlockManager> {
        BlockManager::open(self)
    }
}
