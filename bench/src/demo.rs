//! The embedded default: a block manager with host RAM in front of a local
//! SSD, fed the KV blocks of a few prompts, reloaded, restarted and reloaded
//! again from the SSD. Every byte is checked on the way back.

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::manager::{Cascade, ManagerConfig};
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use kvtier::{BlockKey, BlockManager, Namespace, NamespaceId, Result, SequenceHasher, TierKind};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

use crate::util::fill;
use kvtier::AlignedBuf as Aligned;

const PROMPTS: usize = 4;
const BLOCKS_PER_PROMPT: usize = 48;

/// Llama-3.1-8B's KV shape: 16 tokens × 32 layers × K,V × 8 heads × 128 × bf16 = 2 MiB.
fn llama() -> Namespace {
    Namespace {
        model_id: "meta-llama/Llama-3.1-8B-Instruct".into(),
        revision: "demo".into(),
        layout: KvLayout {
            num_layers: 32,
            kv_heads: 8,
            head_dim: 128,
            block_tokens: 16,
            kind: KvKind::Kv,
            dtype: Dtype::Bf16,
        },
        tp_rank: 0,
        tp_size: 1,
        salt: None,
        lora: None,
    }
}

fn config(dir: &Path) -> ManagerConfig {
    let mut c = ManagerConfig::tiered(
        Some(HostConfig::with_capacity(128 << 20)),
        Some(DiskConfig {
            segment_bytes: 64 << 20,
            ..DiskConfig::new(dir, 2 << 30)
        }),
    );
    c.cascade = Cascade::WriteThrough;
    c
}

/// Reloads every prompt and checks every byte; returns (blocks from host, from disk).
fn reload(m: &BlockManager, ns: NamespaceId, prompts: &[Vec<BlockKey>], block: usize) -> Result<(usize, usize, f64)> {
    let mut out = Aligned::new(BLOCKS_PER_PROMPT * block);
    let mut want = Aligned::new(block);
    let (mut host, mut disk) = (0, 0);
    let t = Instant::now();
    // Most recent first: the host tier holds the newest blocks.
    for keys in prompts.iter().rev() {
        let l = m.lookup(ns, keys)?;
        host += l.tiers.iter().filter(|t| **t == TierKind::Host).count();
        disk += l.tiers.iter().filter(|t| **t == TierKind::Disk).count();
        let r = m.load(ns, keys, &mut out)?;
        if r.loaded != keys.len() || r.failed.is_some() {
            let failed = r
                .failed
                .as_ref()
                .map_or("none".to_string(), |e| format!("block {}: {}", e.index, e.message));
            let offload_errors = m.stats().offload_errors;
            return Err(kvtier::Error::new(
                kvtier::ErrorKind::Io,
                format!(
                    "prompt reloaded {} of {} blocks (load error: {failed}); {offload_errors} \
                     write-throughs to the SSD failed, so those blocks were only in host memory: \
                     the warnings above name the cause (a full filesystem?)",
                    r.loaded,
                    keys.len()
                ),
            ));
        }
        for (k, got) in keys.iter().zip(out.chunks_exact(block)) {
            fill(&mut want, k.0 as u64);
            assert!(got == &want[..], "block {k} came back altered");
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((
        host,
        disk,
        (prompts.len() * BLOCKS_PER_PROMPT * block) as f64 / secs / 1e9,
    ))
}

/// A client's answer to `Throttled`: wait for the queue to move, then retry
/// the whole (idempotent) request. Bounded, like every loop here.
fn store_with_backoff(m: &BlockManager, ns: NamespaceId, keys: &[BlockKey], data: &[u8]) -> Result<()> {
    for _ in 0..1000 {
        match m.store(ns, keys, data) {
            Err(e) if e.kind() == kvtier::ErrorKind::Throttled => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            other => return other.map(drop),
        }
    }
    Err(kvtier::Error::new(
        kvtier::ErrorKind::Throttled,
        "store still throttled after 1000 retries",
    ))
}

pub(crate) fn run(dir: &Path, json_out: bool) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let ns_def = llama();
    let block = ns_def.block_bytes() as usize;
    // Token ids of a few prompts, hashed into chained keys as Dynamo does.
    let prompts: Vec<Vec<BlockKey>> = (0..PROMPTS)
        .map(|p| {
            let tokens: Vec<u32> = (0..(BLOCKS_PER_PROMPT * 16) as u32)
                .map(|t| t * 7919 + p as u32)
                .collect();
            SequenceHasher::for_namespace(&ns_def)
                .hash_all(&tokens)
                .iter()
                .map(|h| h.key)
                .collect()
        })
        .collect();

    let m = config(dir).build()?;
    let ns = m.register_namespace(&ns_def)?;
    let mut batch = Aligned::new(BLOCKS_PER_PROMPT * block);
    let t = Instant::now();
    for keys in &prompts {
        for (k, c) in keys.iter().zip(batch.chunks_exact_mut(block)) {
            fill(c, k.0 as u64);
        }
        store_with_backoff(&m, ns, keys, &batch)?;
    }
    m.flush();
    let store_gbps = (PROMPTS * BLOCKS_PER_PROMPT * block) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let (host1, disk1, reload_gbps) = reload(&m, ns, &prompts, block)?;
    let before = m.stats();
    drop(m);

    // Restart: host memory is gone, the SSD serves everything.
    let m = config(dir).build()?;
    let ns2 = m.register_namespace(&ns_def)?;
    let recovery = m.disk().map(|d| d.recovery());
    let (host2, disk2, restart_gbps) = reload(&m, ns2, &prompts, block)?;
    let after = m.stats();
    let summary = json!({
        "demo": "store, reload, restart, reload",
        "dir": dir.display().to_string(),
        "block_bytes": block,
        "prompts": PROMPTS,
        "blocks": PROMPTS * BLOCKS_PER_PROMPT,
        "store_gbps": (store_gbps * 100.0).round() / 100.0,
        "reload": { "from_host": host1, "from_disk": disk1, "gbps": (reload_gbps * 100.0).round() / 100.0 },
        "after_restart": {
            "recovered": recovery,
            "from_host": host2, "from_disk": disk2, "gbps": (restart_gbps * 100.0).round() / 100.0
        },
        "verified": "every block byte-identical",
        "stats_before_restart": before,
        "stats_after_restart": after,
    });
    crate::print_json(&summary, json_out);
    Ok(())
}
