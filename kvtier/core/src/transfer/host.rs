//! Copies between CPU tensors and staging: plain memcpy. This is the path
//! the connector takes without a GPU, and the one its tests exercise.

use super::{Copier, Direction, Segment, check_staging};
use crate::error::Result;

/// memcpy between host memory and staging.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostCopier;

impl Copier for HostCopier {
    unsafe fn copy(&self, dir: Direction, segments: &[Segment], staging: &mut [u8]) -> Result<()> {
        check_staging(segments, staging)?;
        for s in segments {
            let host = s.device as usize as *mut u8;
            let st = &mut staging[s.staging..s.staging + s.len];
            // SAFETY: the caller guarantees `host..host+len` is live memory
            // nobody else touches during the copy; `st` is our own slice and
            // cannot overlap a tensor's storage.
            unsafe {
                match dir {
                    Direction::ToStaging => std::ptr::copy_nonoverlapping(host, st.as_mut_ptr(), s.len),
                    Direction::FromStaging => std::ptr::copy_nonoverlapping(st.as_ptr(), host, s.len),
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
}
