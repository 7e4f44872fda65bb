//! `kvtier-bench tiers`: host and disk tiers against memcpy and raw
//! O_DIRECT I/O of the same bytes in the same directory, and the prefix
//! lookup rate over an index of a million blocks.

use kvtier::manager::ManagerConfig;
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use kvtier::{BlockKey, BlockManager, NamespaceId, Result};
use serde_json::json;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::util::{XorShift, fill, gbps, key, median, memcpy_round, namespace, round3};
use kvtier::AlignedBuf as Aligned;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory on the disk under test (made if missing; files are removed after).
    #[arg(long, default_value = "target/bench-tiers")]
    dir: PathBuf,
    /// Bytes moved per measurement, in MiB.
    #[arg(long, default_value_t = 1024)]
    total_mib: usize,
    /// Block size in KiB.
    #[arg(long, default_value_t = 2048)]
    block_kib: usize,
    /// Blocks in the index the lookup rate is measured over.
    #[arg(long, default_value_t = 1_000_000)]
    lookup_blocks: usize,
    /// Rounds; each figure is the median over rounds, references included.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with small sizes, for CI: figures are not goals.
    #[arg(long)]
    smoke: bool,
}

pub(crate) struct Throughput {
    pub(crate) put: f64,
    pub(crate) get: f64,
}

/// Stores every block of `src` one request at a time, then loads each into
/// `dst`, checking each came back.
fn manager_round(
    m: &BlockManager,
    ns: NamespaceId,
    round: usize,
    src: &[u8],
    dst: &mut [u8],
    block: usize,
) -> Result<Throughput> {
    let n = src.len() / block;
    let keys: Vec<BlockKey> = (0..n).map(|i| key(ns, round, i)).collect();
    let t = Instant::now();
    for (k, chunk) in keys.iter().zip(src.chunks_exact(block)) {
        m.store(ns, std::slice::from_ref(k), chunk)?;
    }
    let put = gbps(src.len(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    for (k, chunk) in keys.iter().zip(dst.chunks_exact_mut(block)) {
        let r = m.load(ns, std::slice::from_ref(k), chunk)?;
        assert_eq!(r.loaded, 1, "block {k} did not come back");
    }
    let get = gbps(src.len(), t.elapsed().as_secs_f64());
    assert!(src == dst, "blocks came back altered");
    m.remove(ns, &keys)?;
    Ok(Throughput { put, get })
}

/// Plain O_DIRECT sequential write and read of the same bytes, in blocks.
pub(crate) fn raw_disk_round(dir: &Path, src: &[u8], dst: &mut [u8], block: usize) -> Result<Throughput> {
    let path = dir.join("raw-odirect.dat");
    let _ = std::fs::remove_file(&path);
    let io = |e| kvtier::Error::io(format!("raw disk {}", path.display()), e);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(io)?;
    let t = Instant::now();
    for (i, c) in src.chunks_exact(block).enumerate() {
        f.write_all_at(c, (i * block) as u64).map_err(io)?;
    }
    let put = gbps(src.len(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    for (i, c) in dst.chunks_exact_mut(block).enumerate() {
        f.read_exact_at(c, (i * block) as u64).map_err(io)?;
    }
    let get = gbps(src.len(), t.elapsed().as_secs_f64());
    drop(f);
    std::fs::remove_file(&path).map_err(io)?;
    Ok(Throughput { put, get })
}

/// Prefix lookups of 64 keys over an index of `blocks` blocks.
fn lookup_rate(blocks: usize, min_secs: f64) -> Result<(f64, usize)> {
    const CHAIN: usize = 64;
    const BLOCK: usize = 64;
    let m = ManagerConfig::host_only(HostConfig::with_capacity((blocks * BLOCK) as u64 + (1 << 20))).build()?;
    let ns = m.register_namespace(&namespace("lookup-bench", BLOCK))?;
    // Chains of 64 keys with a stored prefix of pseudo-random length, so the
    // walks stop at every depth; about `blocks` stored in all.
    let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
    let mut next = || rng.next_u64();
    let mut chains: Vec<(Vec<BlockKey>, usize)> = Vec::new();
    let data = vec![7u8; CHAIN * BLOCK];
    let mut stored = 0;
    while stored < blocks {
        let c = chains.len();
        let keys: Vec<BlockKey> = (0..CHAIN).map(|i| key(ns, c, i)).collect();
        let len = ((next() % (CHAIN as u64 + 1)) as usize).min(blocks - stored);
        m.store(ns, &keys[..len], &data[..len * BLOCK])?;
        stored += len;
        chains.push((keys, len));
    }
    let mut probes = 0usize;
    let mut lookups = 0usize;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < min_secs {
        for _ in 0..1000 {
            let (keys, len) = &chains[(next() % chains.len() as u64) as usize];
            let l = m.lookup(ns, keys)?;
            assert_eq!(l.hit_blocks(), *len, "lookup found a wrong prefix");
            probes += len + usize::from(*len < CHAIN);
            lookups += 1;
        }
    }
    Ok((probes as f64 / t.elapsed().as_secs_f64(), lookups))
}

pub(crate) fn run(a: &Args) -> Result<()> {
    let (total, lookup_blocks, rounds, lookup_secs) = if a.smoke {
        (64 << 20, 50_000, 1, 0.2)
    } else {
        (a.total_mib << 20, a.lookup_blocks, a.rounds.max(1), 2.0)
    };
    let block = a.block_kib << 10;
    if block == 0 || !block.is_multiple_of(4096) || total < block {
        return Err(kvtier::Error::new(
            kvtier::ErrorKind::InvalidArgument,
            "block must be a non-zero multiple of 4 KiB and no larger than the total",
        ));
    }
    let total = total / block * block;
    std::fs::create_dir_all(&a.dir).map_err(|e| kvtier::Error::io(format!("create {}", a.dir.display()), e))?;
    let ssd_dir = a.dir.join("kvtier-ssd");
    let _ = std::fs::remove_dir_all(&ssd_dir);

    let mut src = Aligned::new(total);
    let mut dst = Aligned::new(total);
    let host = ManagerConfig::host_only(HostConfig::with_capacity(total as u64 + (4 << 20))).build()?;
    let host_ns = host.register_namespace(&namespace("tiers-bench", block))?;
    let segment = (256u64 << 20).max((block as u64 + 3 * 4096).next_multiple_of(4096) * 4);
    let disk_cfg = DiskConfig {
        segment_bytes: segment,
        ..DiskConfig::new(&ssd_dir, (total as u64 * 2).next_multiple_of(segment) + 2 * segment)
    };
    let ssd = ManagerConfig::ssd_only(disk_cfg).build()?;
    let ssd_ns = ssd.register_namespace(&namespace("tiers-bench", block))?;
    let direct = ssd.disk().is_some_and(|d| d.direct_io());

    let (mut memcpy, mut hput, mut hget, mut rput, mut rget, mut dput, mut dget) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        fill(&mut src, r as u64 + 1);
        memcpy.push(memcpy_round(&src, &mut dst, block));
        let h = manager_round(&host, host_ns, r, &src, &mut dst, block)?;
        hput.push(h.put);
        hget.push(h.get);
        let raw = raw_disk_round(&a.dir, &src, &mut dst, block)?;
        rput.push(raw.put);
        rget.push(raw.get);
        let d = manager_round(&ssd, ssd_ns, r, &src, &mut dst, block)?;
        dput.push(d.put);
        dget.push(d.get);
    }
    let ssd_stats = ssd.stats();
    let host_backing = host.host().map(|h| h.backing());
    drop((host, ssd));
    let _ = std::fs::remove_dir_all(&ssd_dir);
    let (probes_per_s, lookups) = lookup_rate(lookup_blocks, lookup_secs)?;

    let memcpy_gbps = median(memcpy.clone());
    let (host_put, host_get) = (median(hput.clone()), median(hget.clone()));
    let (raw_w, raw_r) = (median(rput.clone()), median(rget.clone()));
    let (disk_put, disk_get) = (median(dput.clone()), median(dget.clone()));
    let out = json!({
        "bench": "tiers",
        "smoke": a.smoke,
        "block_bytes": block,
        "total_bytes": total,
        "rounds": rounds,
        "dir": a.dir.display().to_string(),
        "direct_io": direct,
        "host_backing": host_backing,
        "memcpy_gbps": round3(memcpy_gbps),
        "host_put_gbps": round3(host_put),
        "host_get_gbps": round3(host_get),
        "host_put_ratio": round3(host_put / memcpy_gbps),
        "host_get_ratio": round3(host_get / memcpy_gbps),
        "raw_disk_write_gbps": round3(raw_w),
        "raw_disk_read_gbps": round3(raw_r),
        "disk_put_gbps": round3(disk_put),
        "disk_get_gbps": round3(disk_get),
        "disk_put_ratio": round3(disk_put / raw_w),
        "disk_get_ratio": round3(disk_get / raw_r),
        "lookup_index_blocks": lookup_blocks,
        "lookup_keys_per_request": 64,
        "lookups": lookups,
        "lookup_probes_per_s": probes_per_s.round(),
        "goals": {
            "host_ratio_min": 0.8,
            "disk_ratio_min": 0.85,
            "lookup_probes_per_s_min": 5_000_000,
            "met": host_put / memcpy_gbps >= 0.8 && host_get / memcpy_gbps >= 0.8
                && disk_put / raw_w >= 0.85 && disk_get / raw_r >= 0.85
                && probes_per_s >= 5e6,
        },
        "per_round": {
            "memcpy_gbps": memcpy, "host_put_gbps": hput, "host_get_gbps": hget,
            "raw_disk_write_gbps": rput, "raw_disk_read_gbps": rget,
            "disk_put_gbps": dput, "disk_get_gbps": dget,
        },
        "ssd_corrupt_blocks": ssd_stats.disk.map(|d| d.corrupt),
    });
    crate::print_json(&out, a.json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_round_moves_and_checks_every_block() {
        let block = 64 * 1024;
        let m = ManagerConfig::host_only(HostConfig::with_capacity(8 * block as u64))
            .build()
            .unwrap();
        let ns = m.register_namespace(&namespace("t", block)).unwrap();
        let mut src = Aligned::new(4 * block);
        fill(&mut src, 9);
        let mut dst = Aligned::new(4 * block);
        let t = manager_round(&m, ns, 0, &src, &mut dst, block).unwrap();
        assert!(t.put > 0.0 && t.get > 0.0);
        assert!(src[..] == dst[..]);
        // The round removes what it stored.
        assert_eq!(m.stats().host.unwrap().usage.blocks, 0);
    }
}
