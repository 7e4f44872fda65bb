//! Copies between GPU tensors and staging through the CUDA driver (cudarc):
//! async copies on a dedicated stream, one event-backed synchronisation per
//! batch. Staging should be page-locked (the host pool is, when a driver is
//! present) for the copies to run at DMA speed.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, sys};

use super::{Copier, Direction, Move};
use crate::error::{Error, ErrorKind, Result};

/// Async driver copies on a stream of their own.
#[derive(Debug)]
pub struct CudaCopier {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl CudaCopier {
    /// A copier on device `ordinal`, or why there is none (no driver, no
    /// device): callers fall back to no GPU path, clearly.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the driver library loads.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::new(ErrorKind::Config, "no CUDA driver library on this machine"));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::new(ErrorKind::Config, format!("CUDA device {ordinal}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::new(ErrorKind::Io, format!("CUDA stream: {e}")))?;
        Ok(Self { _ctx: ctx, stream })
    }
}

impl Copier for CudaCopier {
    unsafe fn copy_moves(&self, dir: Direction, moves: &[Move]) -> Result<()> {
        let cu = self.stream.cu_stream();
        for m in moves {
            // SAFETY: the caller guarantees the device range is a live
            // allocation of this context and the host range live memory,
            // neither used by anyone else meanwhile; both outlive the copy
            // because we synchronise before returning.
            let r = unsafe {
                match dir {
                    Direction::ToStaging => sys::cuMemcpyDtoHAsync_v2(m.host.cast(), m.device, m.len, cu),
                    Direction::FromStaging => {
                        sys::cuMemcpyHtoDAsync_v2(m.device, m.host.cast_const().cast(), m.len, cu)
                    }
                }
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                // Drain what was queued before reporting.
                let _ = self.stream.synchronize();
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("CUDA copy of {} bytes: {r:?}", m.len),
                ));
            }
        }
        self.stream
            .synchronize()
            .map_err(|e| Error::new(ErrorKind::Io, format!("CUDA stream synchronise: {e}")))
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::{LayerBlocks, plan};

    /// Runs on a machine with a GPU (scripts/gpu-test.sh); here it proves the
    /// probe fails cleanly.
    #[test]
    fn gpu_round_trip_or_clean_absence() {
        let Ok(c) = CudaCopier::new(0) else {
            assert!(std::env::var_os("KVTIER_EXPECT_CUDA").is_none(), "a GPU was expected");
            return;
        };
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.default_stream();
        let host: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let dev = stream.clone_htod(&host).unwrap();
        let (ptr, _guard) = {
            use cudarc::driver::DevicePtr;
            dev.device_ptr(&stream)
        };
        let layers = [LayerBlocks {
            base: ptr,
            block_stride: 1024,
            num_blocks: 4,
        }];
        let segs = plan(&layers, 1024, &[3, 1]).unwrap();
        let mut staging = vec![0u8; 2048];
        // SAFETY: `dev` is live and used by no one else meanwhile.
        unsafe { c.copy(Direction::ToStaging, &segs, &mut staging).unwrap() };
        assert_eq!(&staging[..1024], &host[3072..]);
        assert_eq!(&staging[1024..], &host[1024..2048]);
    }
}
