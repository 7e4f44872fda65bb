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
//!
//! A [`BlockPlan`] moves blocks between the tensors and a separate buffer
//! per block instead of one staging buffer: the slots a
//! [`crate::manager::Reservation`] holds in the host tier for a save, the
//! pinned bytes a [`crate::BlockManager::load_with`] hands out for a load.
//! That is how a block travels between the KV tensors and the tier in one
//! copy.

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

/// One copy by address: `len` bytes between tensor memory at `device` and
/// host memory at `host`. What a [`Copier`] carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Address on the tensor side.
    pub device: u64,
    /// Address on the host side.
    pub host: *mut u8,
    /// Bytes.
    pub len: usize,
}

/// Carries out copies. Implementations own their streams and synchronise
/// before returning: the bytes are final then.
pub trait Copier: Send + Sync {
    /// Carries out every move in the given direction: tensor → host for
    /// [`Direction::ToStaging`], host → tensor for
    /// [`Direction::FromStaging`].
    ///
    /// # Safety
    /// Every move's `device..device+len` must be memory the copier can
    /// reach (a live tensor's storage), and `host..host+len` live host
    /// memory (writable for a save). For the length of the call nobody
    /// else may write either side, nor read the side being written, and no
    /// two moves may write overlapping bytes.
    unsafe fn copy_moves(&self, dir: Direction, moves: &[Move]) -> Result<()>;

    /// A short name for logs and benchmarks.
    fn name(&self) -> &'static str;

    /// Copies every segment, in the given direction, to or from `staging`
    /// (block-major, as [`plan`] lays it out). A staging buffer too small
    /// for the segments is refused before anything is copied.
    ///
    /// # Safety
    /// Every segment's `device..device+len` must be memory the copier can
    /// reach (a live tensor's storage), not written concurrently by anyone
    /// else for a load, nor read concurrently for a save.
    unsafe fn copy(&self, dir: Direction, segments: &[Segment], staging: &mut [u8]) -> Result<()> {
        check_staging(segments, staging)?;
        let base = staging.as_mut_ptr();
        let moves: Vec<Move> = segments
            .iter()
            .map(|s| Move {
                device: s.device,
                // SAFETY: check_staging proved s.staging + s.len is within
                // the buffer.
                host: unsafe { base.add(s.staging) },
                len: s.len,
            })
            .collect();
        // SAFETY: the tensor side is the caller's contract; the host side
        // is `staging`, borrowed uniquely for the call.
        unsafe { self.copy_moves(dir, &moves) }
    }
}

/// [`plan`]'s copies for whole blocks, each copy within one block, so
/// that every block can have a buffer of its own (a host-tier slot, a
/// pinned block) rather than a place in one staging buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPlan {
    /// Segments whose `staging` offset is `block index × block_bytes + offset
    /// in the block`, none crossing a block's end.
    segments: Vec<Segment>,
    block_bytes: usize,
    blocks: usize,
}

impl BlockPlan {
    /// Plans `block_ids` (in request order) as [`plan`] does, with the same
    /// checks; a block is every layer's `layer_block_bytes`, in layer
    /// order.
    pub fn new(layers: &[LayerBlocks], layer_block_bytes: usize, block_ids: &[u64]) -> Result<Self> {
        let planned = plan(layers, layer_block_bytes, block_ids)?;
        let block_bytes = layers.len() * layer_block_bytes;
        let mut segments = Vec::with_capacity(planned.len());
        for s in planned {
            // plan merges runs across blocks (one layer, consecutive ids):
            // split them again at each block's end.
            let (mut device, mut staging, mut len) = (s.device, s.staging, s.len);
            while len > 0 {
                let take = len.min(block_bytes - staging % block_bytes);
                segments.push(Segment {
                    device,
                    staging,
                    len: take,
                });
                device += take as u64;
                staging += take;
                len -= take;
            }
        }
        Ok(Self {
            segments,
            block_bytes,
            blocks: block_ids.len(),
        })
    }

    /// Bytes of one block: the layers' bytes together.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Blocks planned.
    pub fn len(&self) -> usize {
        self.blocks
    }

    /// Whether no block is planned.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Copies planned blocks `first..first + blocks.len()` out of the
    /// tensors into their buffers, in one batch; a `None` block is skipped.
    ///
    /// # Safety
    /// As [`Copier::copy_moves`] for the tensor side: the planned tensor
    /// memory is live and nobody writes it during the call.
    pub unsafe fn save(&self, copier: &dyn Copier, first: usize, blocks: &mut [Option<&mut [u8]>]) -> Result<()> {
        self.check(first, blocks.len(), blocks.iter().flatten().map(|b| b.len()))?;
        let ptrs: Vec<Option<*mut u8>> = blocks.iter_mut().map(|b| b.as_mut().map(|b| b.as_mut_ptr())).collect();
        let moves = self.moves(first, &ptrs);
        // SAFETY: the tensor side is the caller's contract; each host side
        // lies in a distinct block buffer borrowed uniquely for the call,
        // of block_bytes (checked), and segments never cross a block's end.
        unsafe { copier.copy_moves(Direction::ToStaging, &moves) }
    }

    /// Copies `blocks` into the tensors as planned blocks `first..first +
    /// blocks.len()`, in one batch.
    ///
    /// # Safety
    /// As [`Copier::copy_moves`] for the tensor side: the planned tensor
    /// memory is live and nobody reads or writes it during the call.
    pub unsafe fn load(&self, copier: &dyn Copier, first: usize, blocks: &[&[u8]]) -> Result<()> {
        self.check(first, blocks.len(), blocks.iter().map(|b| b.len()))?;
        // The host side is only read in this direction.
        let ptrs: Vec<Option<*mut u8>> = blocks.iter().map(|b| Some(b.as_ptr().cast_mut())).collect();
        let moves = self.moves(first, &ptrs);
        // SAFETY: the tensor side is the caller's contract; the host side
        // is `blocks`, each of block_bytes (checked), only read.
        unsafe { copier.copy_moves(Direction::FromStaging, &moves) }
    }

    fn check(&self, first: usize, count: usize, lens: impl Iterator<Item = usize>) -> Result<()> {
        if first + count > self.blocks {
            return Err(Error::invalid(format!(
                "blocks {first}..{} of a plan of {} blocks",
                first + count,
                self.blocks
            )));
        }
        for len in lens {
            if len != self.block_bytes {
                return Err(Error::new(
                    crate::ErrorKind::BlockSize,
                    format!(
                        "a block buffer of {len} bytes; planned blocks are {} bytes",
                        self.block_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The moves of planned blocks `first..first + hosts.len()`, block `i`
    /// to or from `hosts[i - first]` (none for a `None`).
    fn moves(&self, first: usize, hosts: &[Option<*mut u8>]) -> Vec<Move> {
        let range = first * self.block_bytes..(first + hosts.len()) * self.block_bytes;
        self.segments
            .iter()
            .filter(|s| range.contains(&s.staging))
            .filter_map(|s| {
                let host = hosts[s.staging / self.block_bytes - first]?;
                Some(Move {
                    device: s.device,
                    // SAFETY: the offset is within the block (segments never
                    // cross a block's end) and the buffer is block_bytes long.
                    host: unsafe { host.add(s.staging % self.block_bytes) },
                    len: s.len,
                })
            })
            .collect()
    }
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
    fn a_block_plan_keeps_every_copy_within_one_block() {
        // One layer, consecutive ids: plan merges them into one copy, the
        // block plan splits it again per block.
        let layers = [LayerBlocks {
            base: 1000,
            block_stride: 8,
            num_blocks: 4,
        }];
        let p = BlockPlan::new(&layers, 8, &[1, 2, 3]).unwrap();
        assert_eq!((p.len(), p.block_bytes()), (3, 8));
        assert_eq!(
            p.segments
                .iter()
                .map(|s| (s.device, s.staging, s.len))
                .collect::<Vec<_>>(),
            vec![(1008, 0, 8), (1016, 8, 8), (1024, 16, 8)]
        );
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let moves = p.moves(1, &[Some(a.as_mut_ptr()), None]);
        assert_eq!(moves.len(), 1, "block 2 only; block 3 is outside, the None skipped");
        assert_eq!(
            (moves[0].device, moves[0].host, moves[0].len),
            (1016, a.as_mut_ptr(), 8)
        );
        let e = p.check(2, 2, [8, 8].into_iter()).unwrap_err();
        assert!(e.to_string().contains("blocks 2..4 of a plan of 3"), "{e}");
        let e = p.check(0, 1, [b.as_mut_slice().len() - 1].into_iter()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::BlockSize);
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
