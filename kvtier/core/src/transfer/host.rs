//! Copies between CPU tensors and staging: plain memcpy. This is the path
//! the connector takes without a GPU, and the one its tests exercise.

use super::{Copier, Direction, Move};
use crate::error::Result;

/// memcpy between host memory and staging.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostCopier;

impl Copier for HostCopier {
    unsafe fn copy_moves(&self, dir: Direction, moves: &[Move]) -> Result<()> {
        for m in moves {
            let tensor = m.device as usize as *mut u8;
            // SAFETY: the caller guarantees both ranges are live memory that
            // nobody else touches during the copy, and that they do not
            // overlap (tensor storage is never host-tier or staging memory).
            unsafe {
                match dir {
                    Direction::ToStaging => std::ptr::copy_nonoverlapping(tensor, m.host, m.len),
                    Direction::FromStaging => std::ptr::copy_nonoverlapping(m.host, tensor, m.len),
                }
            }
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::{LayerBlocks, plan};

    #[test]
    fn round_trip_through_staging() {
        // Two layers, 3 blocks of 16 bytes, stride 32 (blocks not packed).
        let mut l0: Vec<u8> = (0..96).collect();
        let mut l1: Vec<u8> = (100..196).collect();
        let layers = [
            LayerBlocks {
                base: l0.as_mut_ptr() as u64,
                block_stride: 32,
                num_blocks: 3,
            },
            LayerBlocks {
                base: l1.as_mut_ptr() as u64,
                block_stride: 32,
                num_blocks: 3,
            },
        ];
        let segs = plan(&layers, 16, &[2, 0]).unwrap();
        let mut staging = vec![0u8; 64];
        // SAFETY: the layers point into l0/l1, alive and untouched meanwhile.
        unsafe { HostCopier.copy(Direction::ToStaging, &segs, &mut staging).unwrap() };
        assert_eq!(&staging[..16], &l0[64..80]);
        assert_eq!(&staging[16..32], &l1[64..80]);
        assert_eq!(&staging[32..48], &l0[0..16]);
        assert_eq!(&staging[48..64], &l1[0..16]);
        // Load them back into block 1 of a zeroed copy.
        let before = l0.clone();
        l0[32..48].fill(0);
        l1[32..48].fill(0);
        let back = plan(&layers, 16, &[1]).unwrap();
        let mut one = staging[..32].to_vec();
        // SAFETY: as above.
        unsafe { HostCopier.copy(Direction::FromStaging, &back, &mut one).unwrap() };
        assert_eq!(&l0[32..48], &before[64..80]);
        let short = &mut [0u8; 8][..];
        // SAFETY: refused before touching memory.
        let e = unsafe { HostCopier.copy(Direction::ToStaging, &segs, short) }.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::BlockSize);
    }

    #[test]
    fn round_trip_through_block_buffers() {
        // Two layers of 3 blocks of 16 bytes, stride 32; blocks 2 and 0
        // saved into separate buffers, block 0's skipped, then loaded back.
        let mut l0: Vec<u8> = (0..96).collect();
        let mut l1: Vec<u8> = (100..196).collect();
        let layers = [
            LayerBlocks {
                base: l0.as_mut_ptr() as u64,
                block_stride: 32,
                num_blocks: 3,
            },
            LayerBlocks {
                base: l1.as_mut_ptr() as u64,
                block_stride: 32,
                num_blocks: 3,
            },
        ];
        let p = crate::transfer::BlockPlan::new(&layers, 16, &[2, 0]).unwrap();
        let (mut a, mut b) = ([0u8; 32], [9u8; 32]);
        let mut blocks = [Some(&mut a[..]), None];
        // SAFETY: the layers point into l0/l1, alive and untouched meanwhile.
        unsafe { p.save(&HostCopier, 0, &mut blocks).unwrap() };
        assert_eq!(&a[..16], &l0[64..80]);
        assert_eq!(&a[16..], &l1[64..80]);
        // SAFETY: as above.
        unsafe { p.save(&HostCopier, 1, &mut [Some(&mut b[..])]).unwrap() };
        assert_eq!(&b[..16], &l0[0..16]);
        assert_eq!(&b[16..], &l1[0..16]);
        // Block 2's bytes into planned block 1 (block id 0) of the tensors.
        // SAFETY: as above.
        unsafe { p.load(&HostCopier, 1, &[&a[..]]).unwrap() };
        assert_eq!(&l0[0..16], &l0[64..80]);
        assert_eq!(&l1[0..16], &l1[64..80]);
        // A buffer of the wrong size is refused before anything is copied.
        let before = l0.clone();
        // SAFETY: refused before touching memory.
        let e = unsafe { p.load(&HostCopier, 0, &[&a[..31]]) }.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::BlockSize);
        assert_eq!(l0, before);
    }
}
