//! Block transfers between an engine's paged KV tensors and a staging
//! buffer in kvtier's block format.
//!
//! An engine registers one tensor per layer; block `b` of a layer is
//! `layer_block_bytes` contiguous bytes at `base + b * block_stride` (true of
//! vLLM's layouts: the per-block view may be permuted, the block's bytes are
//! contiguous). kvtier stores a block as every layer's bytes in layer order,
//! so staging holds blocks back to back, each `layers × layer_block_bytes`.
//!
//! [`plan`] turns a list of block ids into copy segments, merging neighbours
//! that are contiguous on both sides; a [`Copier`] carries them out:
//! [`host::HostCopier`] for CPU tensors (how the connector runs without a
//! GPU), `cuda::CudaCopier` (feature `cuda`) with async copies on a
//! dedicated stream and one synchronisation per batch.

pub mod host;

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{Error, Result};

/// Where one layer's blocks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlocks {
    /// Address of block 0 (a device pointer for GPU tensors).
    pub base: u64,
    /// Bytes from one block to the next.
    pub block_stride: u64,
    /// Blocks the layer holds: block ids must be below this.
    pub num_blocks: u64,
}

/// One copy: `len` bytes between `device` and staging offset `staging`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Address on the tensor side.
    pub device: u64,
    /// Offset in the staging buffer.
    pub staging: usize,
    /// Bytes.
    pub len: usize,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Tensors → staging (a save).
    ToStaging,
    /// Staging → tensors (a load).
    FromStaging,
}

/// The copies that move `block_ids` (in request order) between the layers
/// and a block-major staging buffer. Checks every id against its layer.
pub fn plan(layers: &[LayerBlocks], layer_block_bytes: usize, block_ids: &[u64]) -> Result<Vec<Segment>> {
    if layers.is_empty() || layer_block_bytes == 0 {
        return Err(Error::invalid(
            "a transfer needs at least one layer of non-empty blocks",
        ));
    }
    for (l, layer) in layers.iter().enumerate() {
        if layer.block_stride < layer_block_bytes as u64 {
            return Err(Error::invalid(format!(
                "layer {l}: block stride {} is smaller than a block's {layer_block_bytes} bytes",
                layer.block_stride
            )));
        }
    }
    let block_bytes = layers.len() * layer_block_bytes;
    let mut out: Vec<Segment> = Vec::with_capacity(layers.len() * block_ids.len());
    for (l, layer) in layers.iter().enumerate() {
        for (i, &b) in block_ids.iter().enumerate() {
            if b >= layer.num_blocks {
                return Err(Error::invalid(format!(
                    "block id {b} is outside layer {l} of {} blocks",
                    layer.num_blocks
                )));
            }
            let seg = Segment {
                device: layer.base + b * layer.block_stride,
                staging: i * block_bytes + l * layer_block_bytes,
                len: layer_block_bytes,
            };
            // Merge with the previous copy when both sides continue it.
            if let Some(last) = out.last_mut()
                && last.device + last.len as u64 == seg.device
                && last.staging + last.len == seg.staging
            {
                last.len += seg.len;
                continue;
            }
            out.push(seg);
        }
    }
    Ok(out)
}

/// Carries out planned copies. Implementations own their streams and
/// synchronise before `copy` returns: the staging bytes are final then.
pub trait Copier: Send + Sync {
    /// Copies every segment, in the given direction, to or from `staging`.
    ///
    /// # Safety
    /// Every segment's `device..device+len` must be memory the copier can
    /// reach (a live tensor's storage), not written concurrently by anyone
    /// else for a load, nor read concurrently for a save.
    unsafe fn copy(&self, dir: Direction, segments: &[Segment], staging: &mut [u8]) -> Result<()>;

    /// A short name for logs and benchmarks.
    fn name(&self) -> &'static str;
}

fn check_staging(segments: &[Segment], staging: &[u8]) -> Result<()> {
    let end = segments.iter().map(|s| s.staging + s.len).max().unwrap_or(0);
    if end > staging.len() {
        return Err(Error::new(
            crate::ErrorKind::BlockSize,
            format!(
                "the transfer needs {end} bytes of staging, the buffer has {}",
                staging.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_block_major_staging_and_merges_contiguous_runs() {
        // Two layers of 4 blocks of 8 bytes, blocks packed (stride = size).
        let layers = [
            LayerBlocks {
                base: 1000,
                block_stride: 8,
                num_blocks: 4,
            },
            LayerBlocks {
                base: 5000,
                block_stride: 8,
                num_blocks: 4,
            },
        ];
        let segs = plan(&layers, 8, &[2, 0]).unwrap();
        assert_eq!(
            segs,
            vec![
                Segment {
                    device: 1016,
                    staging: 0,
                    len: 8
                },
                Segment {
                    device: 1000,
                    staging: 16,
                    len: 8
                },
                Segment {
                    device: 5016,
                    staging: 8,
                    len: 8
                },
                Segment {
                    device: 5000,
                    staging: 24,
                    len: 8
                },
            ]
        );
        // One layer: consecutive blocks are one copy.
        let one = plan(&layers[..1], 8, &[1, 2, 3]).unwrap();
        assert_eq!(
            one,
            vec![Segment {
                device: 1008,
                staging: 0,
                len: 24
            }]
        );
    }

    #[test]
    fn bad_plans_are_refused() {
        let l = [LayerBlocks {
            base: 0,
            block_stride: 8,
            num_blocks: 2,
        }];
        assert!(plan(&l, 8, &[2]).unwrap_err().to_string().contains("outside layer 0"));
        assert!(plan(&l, 16, &[0]).unwrap_err().to_string().contains("stride"));
        assert!(plan(&[], 8, &[0]).is_err());
    }
}
