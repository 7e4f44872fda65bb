//! `kvtier-bench blob`: the Azure Blob tier against Azurite, the real Azure
//! Storage emulator, on 127.0.0.1.
//!
//! A writer node (SSD-only, blob in writeback mode) stores a fixed workload
//! of requests, each a prefix of blocks, and waits for every upload. Then
//! one seeded, Zipf-skewed sequence of repeated requests is read three ways,
//! each request a lookup and a load of its whole prefix, as an engine does:
//!
//! - `local_tiers`: a fresh node whose SSD is smaller than the data set, in
//!   front of the blob tier in cache-only mode;
//! - `local_tiers_with_host`: the same with a host RAM tier in front;
//! - `blob_only`: the blob tier with nothing local (`present_prefix`, then
//!   `fetch_prefix`). It is the reference every ratio is taken against,
//!   measured in the same run against the same Azurite.
//!
//! An unbounded local cache would serve locally every load of a request
//! that was loaded before; that throughput reduction is printed as the bound
//! for the finite tiers.
//!
//! Every loaded byte is compared with what was stored: a short load or a
//! mismatch is a failure exit, not a number. `wall_s` times the lookups and
//! loads only, not the checks.

use kvtier::manager::{Cascade, ManagerConfig};
use kvtier::tier::blob::azurite::{self, Azurite};
use kvtier::tier::blob::{BlobMode, BlobStats, BlobTier};
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use kvtier::{AlignedBuf, BlockKey, BlockManager, ErrorKind, NamespaceId, Result, TierKind};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{Invariants, XorShift, fill, fresh_dir, gbps, key, namespace, ratio, report, round3};

/// The container every node of a run shares.
const CONTAINER: &str = "kvtier-bench";
/// Bytes an object adds to its block (the record header).
const OBJECT_OVERHEAD_BYTES: usize = 64;
/// A disk record's header page: a block takes this much more on the SSD.
const PAGE: u64 = 4096;
/// Segments per reader SSD: reclaim frees one eighth of it at a time.
const READER_SEGMENTS: u64 = 8;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Requests stored; each is one prefix of `--blocks` blocks.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Blocks per request.
    #[arg(long, default_value_t = 8)]
    blocks: usize,
    /// Block size in KiB (a multiple of 4).
    #[arg(long, default_value_t = 256)]
    block_kib: usize,
    /// Requests read back by each configuration, each a lookup and a load
    /// of the whole prefix.
    #[arg(long, default_value_t = 512)]
    loads: usize,
    /// Zipf exponent of the read sequence over the requests (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seed of the read sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The readers' SSD capacity, in percent of the data set.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    ssd_percent: u64,
    /// The host tier of `local_tiers_with_host`, in percent of the data set.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=1000))]
    host_percent: u64,
    /// Directory for the nodes' SSD tiers (made if missing, removed after).
    #[arg(long, default_value = "target/bench-blob")]
    dir: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with small sizes, for CI: figures are not goals.
    #[arg(long)]
    smoke: bool,
}

use crate::fail;

/// The workload's sizes, after `--smoke` and validation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Workload {
    requests: usize,
    blocks: usize,
    block: usize,
    loads: usize,
}

impl Workload {
    fn of(a: &Args) -> Result<Self> {
        let w = if a.smoke {
            Self {
                requests: 16,
                blocks: 4,
                block: 64 << 10,
                loads: 96,
            }
        } else {
            Self {
                requests: a.requests,
                blocks: a.blocks,
                block: a.block_kib << 10,
                loads: a.loads,
            }
        };
        if w.block == 0 || !w.block.is_multiple_of(4096) {
            return Err(fail(
                ErrorKind::InvalidArgument,
                "--block-kib must be a non-zero multiple of 4",
            ));
        }
        if w.requests == 0 || w.blocks == 0 || w.loads == 0 {
            return Err(fail(
                ErrorKind::InvalidArgument,
                "--requests, --blocks and --loads must be > 0",
            ));
        }
        if !(a.zipf.is_finite() && a.zipf >= 0.0) {
            return Err(fail(ErrorKind::InvalidArgument, "--zipf must be finite and >= 0"));
        }
        Ok(w)
    }

    fn request_bytes(&self) -> usize {
        self.blocks * self.block
    }

    fn data_bytes(&self) -> usize {
        self.requests * self.request_bytes()
    }

    /// What one block takes on the SSD.
    fn record_bytes(&self) -> u64 {
        self.block as u64 + PAGE
    }
}

/// SSD sizes: one segment size for every node, so reclaim moves in the same
/// steps; the readers' capacity rounded to whole segments.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ssd {
    segment_bytes: u64,
    reader_capacity_bytes: u64,
    writer_capacity_bytes: u64,
}

impl Ssd {
    fn of(w: &Workload, ssd_percent: u64) -> Self {
        let target = w.data_bytes() as u64 * ssd_percent / 100;
        // A segment has a header page and a seal page, and holds two records
        // at least.
        let least = 2 * w.record_bytes() + 2 * PAGE;
        let segment_bytes = (target / READER_SEGMENTS / PAGE * PAGE).max(least);
        let segments = ((target + segment_bytes / 2) / segment_bytes).max(2);
        // The writer keeps every block until it is uploaded: room for all.
        let all = w.requests as u64 * w.blocks as u64 * w.record_bytes();
        Self {
            segment_bytes,
            reader_capacity_bytes: segments * segment_bytes,
            writer_capacity_bytes: (2 * all).next_multiple_of(segment_bytes) + 2 * segment_bytes,
        }
    }

    fn config(&self, dir: &Path, capacity_bytes: u64) -> DiskConfig {
        DiskConfig {
            segment_bytes: self.segment_bytes,
            ..DiskConfig::new(dir, capacity_bytes)
        }
    }
}

/// `loads` request indexes in `0..requests`, Zipf-distributed with exponent
/// `s` (request 0 the hottest), from a seeded xorshift: the same sequence
/// for every configuration and every run with the same seed.
fn load_order(requests: usize, loads: usize, s: f64, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=requests).map(|r| (r as f64).powf(-s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    // A multiplied seed spreads small seeds.
    let mut x = XorShift::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..loads)
        .map(|_| {
            let u = x.unit();
            cdf.partition_point(|c| *c <= u).min(requests - 1)
        })
        .collect()
}

/// The throughput reduction of an unbounded local cache: every load of a
/// request loaded before is served locally. Requests are all the same size.
fn unbounded_cache_reduction(order: &[usize]) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let repeats = order.iter().filter(|r| !seen.insert(**r)).count();
    repeats as f64 / order.len() as f64
}

/// What reads a request: a node (its local tiers, then blob), or the blob
/// tier alone.
#[derive(Debug)]
enum Reader<'a> {
    Node(&'a BlockManager, NamespaceId),
    BlobOnly(&'a BlobTier, NamespaceId, usize),
}

impl Reader<'_> {
    /// The tier of each block of the present prefix of `keys`.
    fn lookup(&self, keys: &[BlockKey]) -> Result<Vec<TierKind>> {
        match self {
            Self::Node(m, ns) => Ok(m.lookup(*ns, keys)?.tiers),
            Self::BlobOnly(b, ns, block) => Ok(vec![TierKind::Blob; b.present_prefix(*ns, keys, *block)]),
        }
    }

    /// Loads the leading present blocks of `keys` into `out`; answers how many.
    fn load(&self, keys: &[BlockKey], out: &mut [u8]) -> Result<usize> {
        match self {
            Self::Node(m, ns) => {
                let r = m.load(*ns, keys, out)?;
                if let Some(f) = r.failed {
                    return Err(fail(
                        f.kind,
                        format!("block {} of the request failed to load: {}", f.index, f.message),
                    ));
                }
                Ok(r.loaded)
            }
            Self::BlobOnly(b, ns, block) => {
                // Copied into the caller's buffer, as a node's load does.
                let got = b.fetch_prefix(*ns, keys, *block);
                for (g, chunk) in got.iter().zip(out.chunks_exact_mut(*block)) {
                    chunk.copy_from_slice(g.bytes());
                }
                Ok(got.len())
            }
        }
    }
}

/// What a read sequence did: its time and where lookups found the blocks.
#[derive(Debug, Default)]
struct Sequence {
    /// Seconds in lookups and loads.
    wall_s: f64,
    /// Blocks lookups found in each tier: host, disk, blob.
    found: [u64; 3],
}

/// Runs the read sequence through `reader`, checking every request came
/// back whole and byte-identical.
fn read_sequence(
    reader: &Reader<'_>,
    w: &Workload,
    keys: &[Vec<BlockKey>],
    order: &[usize],
    data: &[u8],
) -> Result<Sequence> {
    let bytes = w.request_bytes();
    let mut out = AlignedBuf::new(bytes);
    let mut seq = Sequence::default();
    for (i, &r) in order.iter().enumerate() {
        // Whatever the load does not write cannot pass for data.
        out.fill(0);
        let t = Instant::now();
        let tiers = reader.lookup(&keys[r])?;
        let loaded = reader.load(&keys[r], &mut out)?;
        seq.wall_s += t.elapsed().as_secs_f64();
        for tier in &tiers {
            match tier {
                TierKind::Host => seq.found[0] += 1,
                TierKind::Disk => seq.found[1] += 1,
                _ => seq.found[2] += 1,
            }
        }
        let hit = tiers.len();
        if hit != w.blocks || loaded != w.blocks {
            return Err(fail(
                ErrorKind::Io,
                format!(
                    "load {i} (request {r}): lookup found {hit} and load brought {loaded} of {} stored blocks",
                    w.blocks
                ),
            ));
        }
        let want = &data[r * bytes..(r + 1) * bytes];
        if out[..] != *want {
            let b = out
                .chunks_exact(w.block)
                .zip(want.chunks_exact(w.block))
                .position(|(g, e)| g != e)
                .expect("the request differs in some block");
            return Err(fail(
                ErrorKind::ChecksumMismatch,
                format!("load {i} (request {r}): block {b} ({}) came back altered", keys[r][b]),
            ));
        }
    }
    Ok(seq)
}

/// What one read configuration did.
#[derive(Debug)]
struct ReadRun {
    tiers: String,
    blob: BlobStats,
    served_local_bytes: u64,
    served_blob_bytes: u64,
    blob_promotions: Option<u64>,
    seq: Sequence,
}

impl ReadRun {
    fn bytes_served(&self) -> u64 {
        self.served_local_bytes + self.served_blob_bytes
    }

    /// Local bytes served over all bytes served, as `ManagerStats` has it.
    fn throughput_reduction(&self) -> f64 {
        match self.bytes_served() {
            0 => 0.0,
            all => self.served_local_bytes as f64 / all as f64,
        }
    }

    fn served_gbps(&self) -> f64 {
        gbps(self.bytes_served() as usize, self.seq.wall_s)
    }

    fn json(&self) -> Value {
        json!({
            "tiers": self.tiers,
            "blob_get_requests": self.blob.get_requests,
            "blob_head_requests": self.blob.head_requests,
            "blob_put_requests": self.blob.put_requests,
            "blob_request_errors": self.blob.request_errors,
            "blob_corrupt_objects": self.blob.tier.corrupt,
            "bytes_from_blob": self.blob.tier.bytes_read,
            "bytes_served": self.bytes_served(),
            "served_local_bytes": self.served_local_bytes,
            "served_blob_bytes": self.served_blob_bytes,
            "throughput_reduction": round3(self.throughput_reduction()),
            "blob_promotions": self.blob_promotions,
            "lookup_found_blocks": {
                "host": self.seq.found[0], "disk": self.seq.found[1], "blob": self.seq.found[2],
            },
            "wall_s": round3(self.seq.wall_s),
            "served_gbps": round3(self.served_gbps()),
        })
    }

    /// Checks the counters against each other and the workload.
    fn check(&self, name: &str, w: &Workload) -> Result<()> {
        let want = (w.loads * w.request_bytes()) as u64;
        if self.bytes_served() != want {
            return Err(fail(
                ErrorKind::Io,
                format!("{name}: {} bytes served, the loads asked {want}", self.bytes_served()),
            ));
        }
        let per_get = (w.block + OBJECT_OVERHEAD_BYTES) as u64;
        if self.blob.tier.bytes_read != self.blob.get_requests * per_get {
            return Err(fail(
                ErrorKind::Io,
                format!(
                    "{name}: {} bytes down in {} GETs of {per_get}-byte objects",
                    self.blob.tier.bytes_read, self.blob.get_requests
                ),
            ));
        }
        if self.blob.put_requests != 0 {
            return Err(fail(
                ErrorKind::Io,
                format!("{name}: a cache-only reader sent {} PUTs", self.blob.put_requests),
            ));
        }
        Ok(())
    }
}

/// The inputs every reader shares.
struct Reads<'a> {
    az: &'a Azurite,
    w: Workload,
    keys: &'a [Vec<BlockKey>],
    order: &'a [usize],
    data: &'a [u8],
}

impl Reads<'_> {
    /// A fresh node of `cfg` plus the blob tier in cache-only mode.
    fn node(&self, tiers: String, mut cfg: ManagerConfig) -> Result<ReadRun> {
        cfg.blob = Some(self.az.config(CONTAINER, BlobMode::CacheOnly));
        let m = cfg.build()?;
        let ns = m.register_namespace(&namespace("blob-bench", self.w.block))?;
        let seq = read_sequence(&Reader::Node(&m, ns), &self.w, self.keys, self.order, self.data)?;
        let s = m.stats();
        Ok(ReadRun {
            tiers,
            blob: s.blob.expect("the node has a blob tier"),
            served_local_bytes: s.served_local_bytes,
            served_blob_bytes: s.served_blob_bytes,
            blob_promotions: Some(s.blob_promotions),
            seq,
        })
    }

    /// The blob tier alone.
    fn blob_only(&self, ns: NamespaceId) -> Result<ReadRun> {
        let b = self.az.config(CONTAINER, BlobMode::CacheOnly).build()?;
        let seq = read_sequence(
            &Reader::BlobOnly(&b, ns, self.w.block),
            &self.w,
            self.keys,
            self.order,
            self.data,
        )?;
        Ok(ReadRun {
            tiers: "blob (cache-only), nothing local".into(),
            blob: b.stats(),
            served_local_bytes: 0,
            served_blob_bytes: (self.w.loads * self.w.request_bytes()) as u64,
            blob_promotions: None,
            seq,
        })
    }
}

fn ratios(run: &ReadRun, reference: &ReadRun, unbounded: f64) -> Value {
    json!({
        "blob_get_requests": ratio(run.blob.get_requests as f64, reference.blob.get_requests as f64),
        "bytes_from_blob": ratio(run.blob.tier.bytes_read as f64, reference.blob.tier.bytes_read as f64),
        "served_gbps": ratio(run.served_gbps(), reference.served_gbps()),
        "throughput_reduction_of_unbounded_cache": ratio(run.throughput_reduction(), unbounded),
    })
}

/// Runs the whole benchmark; answers the summary.
fn measure(a: &Args) -> Result<Value> {
    let w = Workload::of(a)?;
    let bin = azurite::binary();
    if !bin.exists() {
        return Err(fail(
            ErrorKind::Config,
            format!("{} is missing: run scripts/azurite.sh", bin.display()),
        ));
    }
    let ssd = Ssd::of(&w, a.ssd_percent);
    let host_capacity_bytes = (w.data_bytes() as u64 * a.host_percent / 100).max(2 * w.block as u64);
    fresh_dir(&a.dir)?;

    let ns_def = namespace("blob-bench", w.block);
    let ns = ns_def.id();
    let keys: Vec<Vec<BlockKey>> = (0..w.requests)
        .map(|r| (0..w.blocks).map(|i| key(ns, r, i)).collect())
        .collect();
    let mut data = AlignedBuf::new(w.data_bytes());
    for (k, chunk) in keys.iter().flatten().zip(data.chunks_exact_mut(w.block)) {
        fill(chunk, k.0 as u64);
    }
    let order = load_order(w.requests, w.loads, a.zipf, a.seed);
    let distinct = order.iter().collect::<std::collections::HashSet<_>>().len();
    let unbounded = unbounded_cache_reduction(&order);

    let az = Azurite::start();

    // The writer: every block through its SSD, uploaded by the writeback.
    let mut wc = ManagerConfig::ssd_only(ssd.config(&a.dir.join("writer"), ssd.writer_capacity_bytes));
    wc.blob = Some(az.config(CONTAINER, BlobMode::Writeback));
    let writer = wc.build()?;
    if writer.register_namespace(&ns_def)? != ns {
        return Err(fail(ErrorKind::Io, "the namespace id differs from its definition's"));
    }
    let t = Instant::now();
    for (r, ks) in keys.iter().enumerate() {
        let o = writer.store(ns, ks, &data[r * w.request_bytes()..(r + 1) * w.request_bytes()])?;
        if o.stored != w.blocks {
            return Err(fail(
                ErrorKind::Io,
                format!("request {r}: stored {} of {} blocks: {o:?}", o.stored, w.blocks),
            ));
        }
    }
    let store_s = t.elapsed().as_secs_f64();
    if !writer.flush_writeback(Duration::from_secs(300)) {
        return Err(fail(
            ErrorKind::Io,
            format!("uploads unfinished after 300 s: {:?}", writer.stats().writeback),
        ));
    }
    let write_s = t.elapsed().as_secs_f64();
    let ws = writer.stats();
    drop(writer);
    let wblob = ws.blob.expect("the writer has a blob tier");
    let wb = ws.writeback.expect("the writer writes back");

    // The readers, local tiers first: warm-up costs, if any, fall on them,
    // so the ratios against blob-only are not flattered.
    let reads = Reads {
        az: &az,
        w,
        keys: &keys,
        order: &order,
        data: &data,
    };
    let local = reads.node(
        format!("ssd ({} bytes) + blob (cache-only)", ssd.reader_capacity_bytes),
        ManagerConfig::ssd_only(ssd.config(&a.dir.join("local"), ssd.reader_capacity_bytes)),
    )?;
    let mut hc = ManagerConfig::tiered(
        Some(HostConfig::with_capacity(host_capacity_bytes)),
        Some(ssd.config(&a.dir.join("host"), ssd.reader_capacity_bytes)),
    );
    hc.cascade = Cascade::OnEviction;
    let host = reads.node(
        format!(
            "host ({host_capacity_bytes} bytes) + ssd ({} bytes) + blob (cache-only)",
            ssd.reader_capacity_bytes
        ),
        hc,
    )?;
    let blob_only = reads.blob_only(ns)?;
    drop(az);
    let _ = std::fs::remove_dir_all(&a.dir);
    for (name, run) in [
        ("local_tiers", &local),
        ("local_tiers_with_host", &host),
        ("blob_only", &blob_only),
    ] {
        run.check(name, &w)?;
    }

    let stored_blocks = (w.requests * w.blocks) as u64;
    let uploaded_once = wblob.put_requests == stored_blocks && wblob.already_present == 0;
    let met = uploaded_once
        && local.throughput_reduction() > 0.0
        && host.throughput_reduction() > 0.0
        && local.blob.get_requests < blob_only.blob.get_requests
        && host.blob.get_requests < blob_only.blob.get_requests;
    Ok(json!({
        "bench": "blob",
        "smoke": a.smoke,
        "service": "Azurite (azurite-blob) on 127.0.0.1",
        "block_bytes": w.block,
        "requests": w.requests,
        "blocks_per_request": w.blocks,
        "stored_blocks": stored_blocks,
        "data_bytes": w.data_bytes(),
        "loads": w.loads,
        "load_order": "zipf over requests, seeded",
        "zipf_s": a.zipf,
        "seed": a.seed,
        "distinct_requests_loaded": distinct,
        "ssd_capacity_bytes": ssd.reader_capacity_bytes,
        "host_capacity_bytes": host_capacity_bytes,
        "segment_bytes": ssd.segment_bytes,
        "blob_put_requests": wblob.put_requests,
        "bytes_to_blob": wblob.tier.bytes_written,
        "writer": {
            "tiers": format!("ssd ({} bytes) + blob (writeback)", ssd.writer_capacity_bytes),
            "uploaded_blocks": wb.uploaded_blocks,
            "already_present": wblob.already_present,
            "blob_request_errors": wblob.request_errors,
            "store_s": round3(store_s),
            "store_and_upload_s": round3(write_s),
            "upload_gbps": round3(gbps(wblob.tier.bytes_written as usize, write_s)),
        },
        "throughput_reduction_unbounded_cache": round3(unbounded),
        "local_tiers": local.json(),
        "local_tiers_with_host": host.json(),
        "blob_only": blob_only.json(),
        "ratios_to_blob_only": {
            "local_tiers": ratios(&local, &blob_only, unbounded),
            "local_tiers_with_host": ratios(&host, &blob_only, unbounded),
        },
        "goals": {
            "blob_puts_per_stored_block": 1,
            "local_throughput_reduction_above": 0,
            "local_blob_get_ratio_below": 1,
            "met": met,
        },
        "verified": "every load whole and byte-identical to what was stored",
    }))
}

pub(crate) fn run(a: &Args) -> Result<()> {
    report(&measure(a)?, a.json, a.smoke.then_some(check_smoke))
}

/// What CI holds a smoke run to: each block uploaded once, with its record
/// header; blob-only reads every block from blob; the local tiers serve
/// every byte, spare blob GETs and never upload.
fn check_smoke(v: &Value) -> Result<()> {
    let c = Invariants::of("blob --smoke", v);
    let (puts, stored) = (c.u("/blob_put_requests")?, c.u("/stored_blocks")?);
    c.ensure(puts == stored && stored > 0, || {
        format!("each block uploaded once: blob_put_requests {puts} == stored_blocks {stored} > 0")
    })?;
    let (to_blob, block) = (c.u("/bytes_to_blob")?, c.u("/block_bytes")?);
    c.ensure(to_blob == stored * (block + 64), || {
        format!("bytes_to_blob {to_blob} == stored_blocks {stored} * (block_bytes {block} + 64)")
    })?;
    let (loads, per_request) = (c.u("/loads")?, c.u("/blocks_per_request")?);
    let served = loads * per_request * block;
    let bo_reduction = c.f("/blob_only/throughput_reduction")?;
    c.ensure(bo_reduction == 0.0, || {
        format!("blob_only/throughput_reduction {bo_reduction} == 0")
    })?;
    let bo_gets = c.u("/blob_only/blob_get_requests")?;
    c.ensure(bo_gets == loads * per_request, || {
        format!("blob_only/blob_get_requests {bo_gets} == loads {loads} * blocks_per_request {per_request}")
    })?;
    for run in ["local_tiers", "local_tiers_with_host"] {
        let bytes = c.u(&format!("/{run}/bytes_served"))?;
        c.ensure(bytes == served, || {
            format!("{run}/bytes_served {bytes} == loads * blocks_per_request * block_bytes {served}")
        })?;
        let reduction = c.f(&format!("/{run}/throughput_reduction"))?;
        c.ensure(reduction > 0.0, || {
            format!("{run}/throughput_reduction {reduction} > 0")
        })?;
        let gets = c.u(&format!("/{run}/blob_get_requests"))?;
        c.ensure(gets < bo_gets, || {
            format!("{run}/blob_get_requests {gets} < blob_only/blob_get_requests {bo_gets}")
        })?;
        let puts = c.u(&format!("/{run}/blob_put_requests"))?;
        c.ensure(puts == 0, || format!("{run}/blob_put_requests {puts} == 0"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> Args {
        Args {
            requests: 6,
            blocks: 3,
            block_kib: 64,
            loads: 40,
            zipf: 1.0,
            seed: 7,
            ssd_percent: 50,
            host_percent: 25,
            dir: dir.to_path_buf(),
            json: true,
            smoke: false,
        }
    }

    #[test]
    fn the_load_order_is_seeded_and_skewed() {
        let a = load_order(64, 10_000, 1.0, 3);
        assert_eq!(a, load_order(64, 10_000, 1.0, 3));
        assert_ne!(a, load_order(64, 10_000, 1.0, 4));
        assert!(a.iter().all(|r| *r < 64));
        let count = |r: usize| a.iter().filter(|x| **x == r).count();
        // Zipf s=1 over 64: request 0 draws about 21%, request 63 about 0.3%.
        assert!((1800..2400).contains(&count(0)), "{}", count(0));
        assert!(count(0) > 10 * count(63), "{} vs {}", count(0), count(63));
        // s = 0 is uniform.
        let u = load_order(4, 8000, 0.0, 3);
        for r in 0..4 {
            let n = u.iter().filter(|x| **x == r).count();
            assert!((1800..2200).contains(&n), "request {r}: {n}");
        }
    }

    #[test]
    fn an_unbounded_cache_serves_every_repeat() {
        assert_eq!(unbounded_cache_reduction(&[0, 1, 0, 0]), 0.5);
        assert_eq!(unbounded_cache_reduction(&[3, 2, 1]), 0.0);
    }

    #[test]
    fn reader_ssds_hold_about_the_share_asked_for() {
        let w = Workload {
            requests: 64,
            blocks: 8,
            block: 256 << 10,
            loads: 1,
        };
        let s = Ssd::of(&w, 50);
        assert_eq!(s.reader_capacity_bytes, w.data_bytes() as u64 / 2);
        assert_eq!(s.segment_bytes % PAGE, 0);
        assert!(s.writer_capacity_bytes >= 2 * 512 * w.record_bytes());
        // Tiny SSDs still get two segments of two blocks.
        let t = Ssd::of(&w, 1);
        assert!(t.segment_bytes >= 2 * w.record_bytes() + 2 * PAGE);
        assert!(t.reader_capacity_bytes >= 2 * t.segment_bytes);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut a = args(d.path());
        a.block_kib = 3;
        assert_eq!(Workload::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut a = args(d.path());
        a.loads = 0;
        assert_eq!(Workload::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut a = args(d.path());
        a.zipf = f64::NAN;
        assert_eq!(Workload::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    /// The whole benchmark at a small size against a real Azurite.
    #[test]
    fn a_small_run_against_azurite_uploads_once_and_local_tiers_spare_blob() {
        let d = tempfile::tempdir().unwrap();
        let a = args(&d.path().join("bench"));
        let v = measure(&a).unwrap();
        let block = 64 << 10;
        assert_eq!(v["stored_blocks"], 18);
        assert_eq!(v["blob_put_requests"], 18);
        assert_eq!(v["bytes_to_blob"], 18 * (block + 64));
        let bo = &v["blob_only"];
        // Blob-only reads every block of every load from blob.
        assert_eq!(bo["blob_get_requests"], 40 * 3);
        assert_eq!(bo["throughput_reduction"], 0.0);
        assert_eq!(bo["bytes_from_blob"], 40 * 3 * (block + 64));
        for c in ["local_tiers", "local_tiers_with_host"] {
            let r = &v[c];
            assert!(r["throughput_reduction"].as_f64().unwrap() > 0.0, "{c}: {r}");
            assert!(r["blob_get_requests"].as_u64().unwrap() < 40 * 3, "{c}: {r}");
            assert_eq!(r["bytes_served"], 40 * 3 * block, "{c}");
            assert_eq!(r["blob_put_requests"], 0, "{c}");
        }
        assert_eq!(v["goals"]["met"], true, "{v}");
        assert!(!d.path().join("bench").exists(), "the SSD directories are removed");
    }
}
