//! `kvtier-bench transfer`: block copies between GPU KV tensors and pinned
//! host staging through kvtier's transfer path (many (layer, block) copies
//! on one stream), next to one raw copy of the same bytes in the same run.
//! Needs an NVIDIA GPU; without one it says so and exits (code 2 with
//! `--require-gpu`).

use serde_json::json;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Layers of the fake KV cache.
    #[arg(long, default_value_t = 32)]
    layers: u64,
    /// Bytes of one layer's block (Llama-3.1-8B, 16 tokens, bf16: 64 KiB).
    #[arg(long, default_value_t = 64 * 1024)]
    layer_block_bytes: u64,
    /// Blocks per layer on the device.
    #[arg(long, default_value_t = 512)]
    blocks: u64,
    /// Blocks moved per batch.
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Fail when no GPU is found.
    #[arg(long)]
    require_gpu: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "cuda")]
pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    gpu::run(a)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    absent(a, "kvtier-bench was built without the cuda feature")
}

fn absent(a: &Args, why: &str) -> kvtier::Result<()> {
    let out = json!({"bench": "transfer", "gpu": false, "reason": why});
    println!("{out}");
    if a.require_gpu {
        std::process::exit(2);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{Args, absent};
    use crate::util::{median, round3};
    use cudarc::driver::{CudaContext, DevicePtr, sys};
    use kvtier::transfer::cuda::CudaCopier;
    use kvtier::transfer::{Copier, Direction, LayerBlocks, plan};
    use serde_json::json;
    use std::time::Instant;

    pub(super) fn run(a: &Args) -> kvtier::Result<()> {
        let copier = match CudaCopier::new(0) {
            Ok(c) => c,
            Err(e) => return absent(a, &e.to_string()),
        };
        let err = |e: cudarc::driver::DriverError| kvtier::Error::new(kvtier::ErrorKind::Io, e.to_string());
        let ctx = CudaContext::new(0).map_err(err)?;
        let stream = ctx.default_stream();
        let layer_bytes = a.blocks * a.layer_block_bytes;
        let dev = stream
            .alloc_zeros::<u8>((a.layers * layer_bytes) as usize)
            .map_err(err)?;
        let (base, _guard) = dev.device_ptr(&stream);
        let layers: Vec<LayerBlocks> = (0..a.layers)
            .map(|l| LayerBlocks {
                base: base + l * layer_bytes,
                block_stride: a.layer_block_bytes,
                num_blocks: a.blocks,
            })
            .collect();
        // Every other block: runs do not merge, as in a real batch.
        let ids: Vec<u64> = (0..a.batch).map(|i| (i * 2) % a.blocks).collect();
        let segs = plan(&layers, a.layer_block_bytes as usize, &ids)?;
        let total = (a.batch * a.layers * a.layer_block_bytes) as usize;
        let mut staging = kvtier::AlignedBuf::new(total);
        // Page-locked staging, registered (not write-combined): CPU reads of
        // saved blocks stay fast.
        // SAFETY: staging outlives the registration (unregistered below).
        let r =
            unsafe { sys::cuMemHostRegister_v2(staging.as_mut_ptr().cast(), total, sys::CU_MEMHOSTREGISTER_PORTABLE) };
        let pinned = r == sys::CUresult::CUDA_SUCCESS;
        let (mut d2h, mut h2d, mut raw_d2h, mut raw_h2d) = (vec![], vec![], vec![], vec![]);
        for _ in 0..a.rounds.max(1) {
            let t = Instant::now();
            // SAFETY: the segments lie in `dev`, which nobody else uses.
            unsafe { copier.copy(Direction::ToStaging, &segs, &mut staging)? };
            d2h.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { copier.copy(Direction::FromStaging, &segs, &mut staging)? };
            h2d.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
            // The reference: one copy of the same number of bytes.
            let one = [kvtier::transfer::Segment {
                device: base,
                staging: 0,
                len: total,
            }];
            let t = Instant::now();
            // SAFETY: `dev` holds at least `total` bytes.
            unsafe { copier.copy(Direction::ToStaging, &one, &mut staging)? };
            raw_d2h.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { copier.copy(Direction::FromStaging, &one, &mut staging)? };
            raw_h2d.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        if pinned {
            // SAFETY: registered above.
            unsafe { sys::cuMemHostUnregister(staging.as_mut_ptr().cast()) };
        }
        let (d, h, rd, rh) = (median(d2h), median(h2d), median(raw_d2h), median(raw_h2d));
        let out = json!({
            "bench": "transfer", "gpu": true, "pinned_staging": pinned,
            "layers": a.layers, "layer_block_bytes": a.layer_block_bytes, "batch_blocks": a.batch,
            "copies_per_batch": segs.len(), "bytes_per_batch": total,
            "d2h_gbps": round3(d), "h2d_gbps": round3(h),
            "raw_d2h_gbps": round3(rd), "raw_h2d_gbps": round3(rh),
            "d2h_ratio": round3(d / rd), "h2d_ratio": round3(h / rh),
        });
        crate::print_json(&out, a.json);
        Ok(())
    }
}
