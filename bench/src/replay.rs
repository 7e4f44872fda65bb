//! `kvtier-bench replay`: a Mooncake request trace through the real
//! [`BlockManager`], with real bytes.
//!
//! Each trace block id becomes a key of one namespace and a block whose
//! bytes are derived from the id, so every load is checked against what was
//! stored. Per request, in order: the leading run of cached blocks is looked
//! up and counted (before anything changes), the hit prefix is loaded (which
//! touches it), and the rest of the request is stored (which inserts missing
//! blocks and touches present ones). Every block of the request is thus
//! inserted or touched in order, as in the reference simulation of
//! [`crate::trace`], so with LRU and no disk the replay reproduces
//! `reference_lru`. Each run also computes the LRU reference and the offline
//! optimum (Belady) for the same capacity, so a policy's figure comes with
//! the gap it closes.
//!
//! `--sweep` replays every eviction policy at a list of capacities and
//! draws the curves; it also runs a tiering study: a GPU prefix cache (an
//! LRU simulated in front, as vLLM's own), then kvtier's host tier behind it,
//! then its disk tier, at sizes scaled from a real model and machine.

use kvtier::eviction::EvictionKind;
use kvtier::manager::ManagerConfig;
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use kvtier::{AlignedBuf, BlockKey, BlockManager, ErrorKind, NamespaceId, Result, TierKind};
use serde::Serialize;
use serde_json::json;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use crate::trace::{self, Request};
use crate::util::{Invariants, fill, is_filled, memcpy_round, namespace, round3, splitmix64};

/// Capacities (blocks) the sweep replays at.
const SWEEP_CAPACITIES: &[usize] = &[1_000, 2_000, 4_000, 6_000, 10_000, 20_000, 40_000];
/// Block size of the sweep and the tiering study: the hit rates do not
/// depend on it, and small blocks keep a sweep to seconds.
const SWEEP_BLOCK_KIB: usize = 4;

/// The tiering study's model and machine: Llama-3-8B in fp16 on one H100.
/// KV bytes per token: 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes.
const STUDY_KV_BYTES_PER_TOKEN: u64 = 32 * 2 * 8 * 128 * 2;
/// GPU memory left for KV blocks on an 80 GB H100 after 16 GB of weights,
/// activations and the runtime.
const STUDY_GPU_KV_BYTES: u64 = 40 << 30;
/// Host memory given to kvtier's host tier.
const STUDY_HOST_BYTES: u64 = 512 << 30;
/// SSD given to kvtier's disk tier.
const STUDY_SSD_BYTES: u64 = 4 << 40;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Mooncake-format trace (JSON lines).
    #[arg(long)]
    trace: PathBuf,
    /// Host tier capacity in blocks (not with --sweep).
    #[arg(long)]
    capacity_blocks: Option<usize>,
    /// Host tier eviction policy (`lru`, ...).
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Disk tier behind the host tier, in blocks (0: none).
    #[arg(long, default_value_t = 0)]
    disk_blocks: usize,
    /// Block size in KiB (default 32; the sweep's default is 4).
    #[arg(long)]
    block_kib: Option<usize>,
    /// Replay only the first R requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Every policy at several capacities, the references and the tiering
    /// study.
    #[arg(long)]
    sweep: bool,
    /// With --sweep: capacities in blocks, comma-separated.
    #[arg(long, value_delimiter = ',')]
    capacities: Option<Vec<usize>>,
    /// With --sweep: write the hit-rate curves to this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    /// After the run, check the invariants CI relies on (LRU reproduces the
    /// reference, the oracle lies between LRU and the optimum, the PNG is
    /// drawn, ...); a broken one is a failure exit that names it.
    #[arg(long)]
    check: bool,
    /// Directory the disk tier's temporary directories go in.
    #[arg(long, default_value = "target/bench-replay")]
    dir: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn invalid(msg: impl Into<String>) -> kvtier::Error {
    kvtier::Error::new(ErrorKind::InvalidArgument, msg)
}

/// What one replay is run on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setup {
    /// Host tier capacity in blocks (> 0).
    pub(crate) host_blocks: usize,
    /// Disk tier behind it in blocks (0: none).
    pub(crate) disk_blocks: usize,
    /// An LRU of this many blocks simulated in front of kvtier, as a GPU's
    /// prefix cache (0: none).
    pub(crate) gpu_blocks: usize,
    pub(crate) policy: EvictionKind,
    pub(crate) block_bytes: usize,
}

/// What a replay measured.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Outcome {
    pub(crate) requests: u64,
    pub(crate) input_tokens: u64,
    pub(crate) hit_tokens: u64,
    pub(crate) gpu_hit_blocks: u64,
    pub(crate) gpu_hit_tokens: u64,
    pub(crate) host_hit_blocks: u64,
    pub(crate) host_hit_tokens: u64,
    pub(crate) disk_hit_blocks: u64,
    pub(crate) disk_hit_tokens: u64,
    /// Blocks written into kvtier by stores (not those found present).
    pub(crate) blocks_stored: u64,
    /// Blocks loaded from kvtier, every one checked against its id.
    pub(crate) blocks_loaded: u64,
    pub(crate) bytes_loaded: u64,
    pub(crate) bytes_stored: u64,
    /// Seconds inside the manager's lookup, load and store calls.
    pub(crate) manager_s: f64,
    /// Seconds of the whole replay, making and checking block bytes included.
    pub(crate) wall_s: f64,
}

impl Outcome {
    pub(crate) fn token_hit_rate(&self) -> f64 {
        self.hit_tokens as f64 / self.input_tokens.max(1) as f64
    }
}

/// The bytes of trace block `id`: a xorshift stream seeded by a hash of
/// the id, so neighbouring ids give unrelated streams.
fn fill_block(id: u64, out: &mut [u8]) {
    fill(out, splitmix64(id));
}

fn block_is(id: u64, got: &[u8]) -> bool {
    is_filled(got, splitmix64(id))
}

fn key(ns: NamespaceId, id: u64) -> BlockKey {
    BlockKey::from_opaque(ns, &id.to_le_bytes())
}

/// An LRU of block ids: the GPU's prefix cache in front of kvtier. Recency
/// stamps plus a min-heap with stale entries skipped, like `reference_lru`.
#[derive(Debug)]
struct LruSim {
    capacity: usize,
    stamp: HashMap<u64, u64>,
    heap: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    now: u64,
}

impl LruSim {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            stamp: HashMap::new(),
            heap: BinaryHeap::new(),
            now: 0,
        }
    }

    fn leading_run(&self, ids: &[u64]) -> usize {
        ids.iter().take_while(|b| self.stamp.contains_key(b)).count()
    }

    fn access(&mut self, id: u64) {
        self.now += 1;
        self.stamp.insert(id, self.now);
        self.heap.push(std::cmp::Reverse((self.now, id)));
        while self.stamp.len() > self.capacity {
            let std::cmp::Reverse((s, k)) = self.heap.pop().expect("entries for every key");
            if self.stamp.get(&k) == Some(&s) {
                self.stamp.remove(&k);
            }
        }
    }
}

/// A replay in progress: the manager, its namespace and the counts so far.
#[derive(Debug)]
pub(crate) struct Replayer {
    m: BlockManager,
    ns: NamespaceId,
    block: usize,
    gpu: Option<LruSim>,
    buf: AlignedBuf,
    out: Outcome,
    // Dropped after the manager (fields drop in order): the disk tier's files.
    _dir: Option<tempfile::TempDir>,
}

/// The disk tier of about `blocks` blocks: 32 segments or more, so that
/// FIFO reclaim (a whole segment at a time) keeps between `blocks` and
/// `blocks` plus one segment's worth.
fn disk_config(dir: &Path, blocks: usize, block: usize) -> DiskConfig {
    const PAGE: u64 = 4096;
    // A record: a 64-byte header (a page for blocks of 64 KiB or more), the
    // data, padded to a page.
    let header = if block as u64 >= 16 * PAGE { PAGE } else { 64 };
    let record = (header + block as u64).next_multiple_of(PAGE);
    let per_segment = blocks.div_ceil(32).max(1) as u64;
    let segment_bytes = per_segment * record + 2 * PAGE;
    let segments = (blocks as u64).div_ceil(per_segment) + 1;
    DiskConfig {
        segment_bytes,
        ..DiskConfig::new(dir, segments.max(2) * segment_bytes)
    }
}

impl Replayer {
    pub(crate) fn new(s: &Setup, max_request_blocks: usize, tmp_in: &Path) -> Result<Self> {
        if s.host_blocks == 0 {
            return Err(invalid("--capacity-blocks must be > 0"));
        }
        if s.block_bytes == 0 || !s.block_bytes.is_multiple_of(4096) {
            return Err(invalid(format!(
                "block size {} bytes: must be a non-zero multiple of 4 KiB",
                s.block_bytes
            )));
        }
        // Page-multiple blocks take exactly their size in the host pool.
        let host = HostConfig {
            capacity_bytes: (s.host_blocks * s.block_bytes) as u64,
            eviction: s.policy,
            pin_memory: false,
        };
        let (disk, dir) = if s.disk_blocks > 0 {
            std::fs::create_dir_all(tmp_in)
                .map_err(|e| kvtier::Error::io(format!("create {}", tmp_in.display()), e))?;
            let d = tempfile::tempdir_in(tmp_in)
                .map_err(|e| kvtier::Error::io(format!("temp dir in {}", tmp_in.display()), e))?;
            (Some(disk_config(d.path(), s.disk_blocks, s.block_bytes)), Some(d))
        } else {
            (None, None)
        };
        let m = ManagerConfig::tiered(Some(host), disk).build()?;
        let ns = m.register_namespace(&namespace("trace-replay", s.block_bytes))?;
        Ok(Self {
            m,
            ns,
            block: s.block_bytes,
            gpu: (s.gpu_blocks > 0).then(|| LruSim::new(s.gpu_blocks)),
            buf: AlignedBuf::new(max_request_blocks.max(1) * s.block_bytes),
            out: Outcome::default(),
            _dir: dir,
        })
    }

    /// Stores (inserts or touches) `ids` in order.
    fn store(&mut self, ids: &[u64], keys: &[BlockKey]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let bytes = ids.len() * self.block;
        if self.buf.len() < bytes {
            self.buf = AlignedBuf::new(bytes);
        }
        let data = &mut self.buf[..bytes];
        for (id, chunk) in ids.iter().zip(data.chunks_exact_mut(self.block)) {
            fill_block(*id, chunk);
        }
        let t = Instant::now();
        let r = self.m.store(self.ns, keys, data)?;
        self.out.manager_s += t.elapsed().as_secs_f64();
        self.out.blocks_stored += r.stored as u64;
        self.out.bytes_stored += (r.stored * self.block) as u64;
        Ok(())
    }

    /// Replays one request; a loaded block whose bytes are not its id's is
    /// an error.
    pub(crate) fn step(&mut self, r: &Request) -> Result<()> {
        let ids = &r.hash_ids;
        let keys: Vec<BlockKey> = ids.iter().map(|id| key(self.ns, *id)).collect();
        let g = self.gpu.as_ref().map_or(0, |gpu| gpu.leading_run(ids));
        let t = Instant::now();
        let found = self.m.lookup(self.ns, &keys[g..])?;
        self.out.manager_s += t.elapsed().as_secs_f64();
        let k = found.hit_blocks();
        let o = &mut self.out;
        o.requests += 1;
        o.input_tokens += r.input_length;
        o.hit_tokens += r.hit_tokens(g + k);
        o.gpu_hit_blocks += g as u64;
        o.gpu_hit_tokens += r.hit_tokens(g);
        for (i, tier) in found.tiers.iter().enumerate() {
            let tokens = r.hit_tokens(g + i + 1) - r.hit_tokens(g + i);
            match tier {
                TierKind::Host => {
                    o.host_hit_blocks += 1;
                    o.host_hit_tokens += tokens;
                }
                TierKind::Disk => {
                    o.disk_hit_blocks += 1;
                    o.disk_hit_tokens += tokens;
                }
                other => unreachable!("a hit in tier {other:?}, which the replay does not configure"),
            }
        }
        // Insert or touch every block, in order: the GPU's hits (stored
        // through, as an offload connector does), the hit run (loads touch),
        // then the rest (stores insert, or touch what is present).
        self.store(&ids[..g], &keys[..g])?;
        if k > 0 {
            let bytes = k * self.block;
            if self.buf.len() < bytes {
                self.buf = AlignedBuf::new(bytes);
            }
            let t = Instant::now();
            let l = self.m.load(self.ns, &keys[g..g + k], &mut self.buf[..bytes])?;
            self.out.manager_s += t.elapsed().as_secs_f64();
            if let Some(f) = &l.failed {
                return Err(kvtier::Error::new(
                    f.kind,
                    format!(
                        "request {}: block id {} failed to load: {}",
                        self.out.requests,
                        ids[g + f.index],
                        f.message
                    ),
                ));
            }
            if l.loaded != k {
                return Err(kvtier::Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "request {}: looked up {k} blocks, loaded {}",
                        self.out.requests, l.loaded
                    ),
                ));
            }
            for (i, chunk) in self.buf[..bytes].chunks_exact(self.block).enumerate() {
                let id = ids[g + i];
                if !block_is(id, chunk) {
                    return Err(kvtier::Error::new(
                        ErrorKind::ChecksumMismatch,
                        format!(
                            "request {}: block id {id} came back with other bytes",
                            self.out.requests
                        ),
                    ));
                }
            }
            self.out.blocks_loaded += k as u64;
            self.out.bytes_loaded += bytes as u64;
        }
        self.store(&ids[g + k..], &keys[g + k..])?;
        if let Some(gpu) = &mut self.gpu {
            for id in ids {
                gpu.access(*id);
            }
        }
        Ok(())
    }
}

/// Replays `reqs` on `s`.
pub(crate) fn replay(reqs: &[Request], s: &Setup, tmp_in: &Path) -> Result<Outcome> {
    let max = reqs.iter().map(|r| r.hash_ids.len()).max().unwrap_or(1);
    let mut r = Replayer::new(s, max, tmp_in)?;
    let t = Instant::now();
    for q in reqs {
        r.step(q)?;
    }
    r.out.wall_s = t.elapsed().as_secs_f64();
    Ok(r.out)
}

/// (policy − LRU) / (optimum − LRU); `None` where the optimum is LRU's.
fn gap_closed(policy: f64, lru: f64, optimum: f64) -> Option<f64> {
    (optimum - lru > 1e-9).then(|| (policy - lru) / (optimum - lru))
}

/// Memcpy of `block`-byte chunks over 256 MiB: the reference for the
/// replay's byte rate.
fn memcpy_gbps(block: usize) -> f64 {
    let total = (256 << 20) / block * block;
    let src = AlignedBuf::new(total);
    let mut dst = AlignedBuf::new(total);
    memcpy_round(&src, &mut dst, block)
}

fn load_trace(a: &Args) -> Result<Vec<Request>> {
    if a.requests == Some(0) {
        return Err(invalid("--requests must be > 0"));
    }
    let mut reqs = trace::load(&a.trace)?;
    if let Some(n) = a.requests {
        reqs.truncate(n);
    }
    Ok(reqs)
}

fn block_bytes(a: &Args, default_kib: usize) -> Result<usize> {
    let kib = a.block_kib.unwrap_or(default_kib);
    if kib == 0 || !kib.is_multiple_of(4) {
        return Err(invalid(format!("--block-kib {kib}: must be a non-zero multiple of 4")));
    }
    Ok(kib << 10)
}

pub(crate) fn run(a: &Args) -> Result<()> {
    let policy = EvictionKind::from_str(&a.policy)?;
    if a.sweep {
        if a.capacity_blocks.is_some() {
            return Err(invalid(
                "--sweep replays its own capacities: give --capacities, not --capacity-blocks",
            ));
        }
        return sweep(a, policy);
    }
    if a.png.is_some() || a.capacities.is_some() {
        return Err(invalid("--png and --capacities go with --sweep"));
    }
    let capacity = a
        .capacity_blocks
        .ok_or_else(|| invalid("give --capacity-blocks N (or --sweep)"))?;
    if capacity == 0 {
        return Err(invalid("--capacity-blocks must be > 0"));
    }
    let block = block_bytes(a, 32)?;
    let reqs = load_trace(a)?;
    let s = Setup {
        host_blocks: capacity,
        disk_blocks: a.disk_blocks,
        gpu_blocks: 0,
        policy,
        block_bytes: block,
    };
    let o = replay(&reqs, &s, &a.dir)?;
    let lru = trace::reference_lru(&reqs, Some(capacity));
    let opt = trace::reference_belady(&reqs, capacity);
    // The policy alone, without tiers or bytes: where the manager's replay
    // differs from it, the tier (not the policy) made the difference.
    let sim = trace::simulate(&reqs, capacity, policy);
    let memcpy = memcpy_gbps(block);
    let hit = o.token_hit_rate();
    let moved = (o.bytes_loaded + o.bytes_stored) as f64;
    let out = json!({
        "bench": "replay",
        "trace": a.trace.display().to_string(),
        "requests": o.requests,
        "policy": policy.name(),
        "capacity_blocks": capacity,
        "disk_blocks": a.disk_blocks,
        "block_bytes": block,
        "token_hit_rate": hit,
        "input_tokens": o.input_tokens,
        "hit_tokens": o.hit_tokens,
        "hits": {
            "host_blocks": o.host_hit_blocks,
            "host_tokens": o.host_hit_tokens,
            "disk_blocks": o.disk_hit_blocks,
            "disk_tokens": o.disk_hit_tokens,
        },
        "blocks_stored": o.blocks_stored,
        "blocks_loaded_verified": o.blocks_loaded,
        "bytes_loaded": o.bytes_loaded,
        "bytes_stored": o.bytes_stored,
        "wall_s": round3(o.wall_s),
        "manager_s": round3(o.manager_s),
        "bytes_moved_per_s": moved / o.wall_s,
        "gbps": moved / o.wall_s / 1e9,
        "manager_gbps": moved / o.manager_s.max(1e-9) / 1e9,
        "memcpy_gbps": memcpy,
        "manager_gbps_vs_memcpy": moved / o.manager_s.max(1e-9) / 1e9 / memcpy,
        "lru_reference_token_hit_rate": lru,
        "optimum_token_hit_rate": opt,
        "vs_lru_reference": hit - lru,
        "policy_simulation_token_hit_rate": sim,
        "vs_policy_simulation": hit - sim,
        "gap_closed": gap_closed(hit, lru, opt),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!(
            "replay {} requests, {} at {capacity} blocks{}: token hit rate {hit:.4} (LRU reference {lru:.4}, optimum {opt:.4}); host hits {} blocks, disk hits {} blocks",
            o.requests,
            policy.name(),
            if a.disk_blocks > 0 {
                format!(" + disk {}", a.disk_blocks)
            } else {
                String::new()
            },
            o.host_hit_blocks,
            o.disk_hit_blocks,
        );
        println!(
            "moved {:.2} GB in {:.2} s: {:.2} GB/s over the replay, {:.2} GB/s in the manager (memcpy {memcpy:.2} GB/s)",
            moved / 1e9,
            o.wall_s,
            moved / o.wall_s / 1e9,
            moved / o.manager_s.max(1e-9) / 1e9,
        );
    }
    if a.check {
        // --requests, where given, is what CI asked for.
        check_replay(&out, a.requests.unwrap_or(reqs.len()) as u64)?;
    }
    Ok(())
}

/// What CI holds a replay to: every request asked replayed; hits; the
/// manager's LRU reproduces the reference simulation (within half a point)
/// and the optimum is at least LRU's; every block loaded was checked.
fn check_replay(v: &serde_json::Value, requests: u64) -> Result<()> {
    let c = Invariants::of("replay --check", v);
    let replayed = c.u("/requests")?;
    c.ensure(replayed == requests, || {
        format!("requests {replayed} == {requests} asked")
    })?;
    let hit = c.f("/token_hit_rate")?;
    c.ensure(hit > 0.0, || format!("token_hit_rate {hit} > 0"))?;
    let lru = c.f("/lru_reference_token_hit_rate")?;
    c.ensure((hit - lru).abs() <= 0.005, || {
        format!("|token_hit_rate {hit} - lru_reference_token_hit_rate {lru}| <= 0.005")
    })?;
    let opt = c.f("/optimum_token_hit_rate")?;
    c.ensure(opt >= lru, || {
        format!("optimum_token_hit_rate {opt} >= lru_reference_token_hit_rate {lru}")
    })?;
    let (loaded, host) = (c.u("/blocks_loaded_verified")?, c.u("/hits/host_blocks")?);
    c.ensure(loaded == host && host > 0, || {
        format!("blocks_loaded_verified {loaded} == hits/host_blocks {host} > 0")
    })?;
    Ok(())
}

/// What CI holds a sweep to: optimum hit rates are rates; both policies
/// swept; the tiering study's last row hits; LRU behind an admission oracle
/// lies between LRU and the optimum, with a share of last uses in [0, 1]
/// (or none); the PNG, if asked for, is a PNG of some size.
fn check_sweep(v: &serde_json::Value, png: Option<&Path>) -> Result<()> {
    let c = Invariants::of("replay --sweep --check", v);
    let rates = |at: &str| -> Result<Vec<f64>> {
        let a = c.get(at)?;
        let items = a.as_array().ok_or_else(|| c.broken(format!("{at} is not an array")))?;
        (0..items.len()).map(|i| c.f(&format!("{at}/{i}"))).collect()
    };
    let optimum = rates("/optimum")?;
    c.ensure(optimum.iter().all(|r| (0.0..=1.0).contains(r)), || {
        format!("every optimum rate in [0, 1]: {optimum:?}")
    })?;
    let policies: std::collections::BTreeSet<&str> = c
        .get("/policies")?
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    c.ensure(policies == ["frecency", "lru"].into(), || {
        format!("policies {policies:?} == {{lru, frecency}}")
    })?;
    let last = c
        .get("/tiering_study/rows")?
        .as_array()
        .map_or(0, |rows| rows.len())
        .checked_sub(1)
        .ok_or_else(|| c.broken("tiering_study/rows is empty".into()))?;
    let study = c.f(&format!("/tiering_study/rows/{last}/token_hit_rate"))?;
    c.ensure(study > 0.0, || {
        format!("tiering_study/rows/-1/token_hit_rate {study} > 0")
    })?;
    // LRU behind an admission oracle lies between LRU and the optimum.
    let lru = rates("/lru_reference")?;
    let oracle_rows = c.get("/lru_with_admission_oracle")?.as_array().map_or(0, Vec::len);
    for (i, (lru, opt)) in lru.iter().zip(&optimum).enumerate().take(oracle_rows) {
        let o = c.f(&format!("/lru_with_admission_oracle/{i}/token_hit_rate"))?;
        c.ensure(*lru <= o && o <= opt + 1e-9, || {
            format!("capacity {i}: lru_reference {lru} <= lru_with_admission_oracle {o} <= optimum {opt} + 1e-9")
        })?;
        let at = format!("/lru_with_admission_oracle/{i}/last_uses_to_refuse_for_a_third_of_the_gap");
        let need = c.get(&at)?;
        c.ensure(
            need.is_null() || need.as_f64().is_some_and(|n| (0.0..=1.0).contains(&n)),
            || format!("{at} {need} is null or in [0, 1]"),
        )?;
    }
    if let Some(png) = png {
        let bytes = std::fs::read(png).map_err(|e| kvtier::Error::io(format!("read {}", png.display()), e))?;
        c.ensure(bytes.starts_with(b"\x89PNG") && bytes.len() > 1000, || {
            format!(
                "{} starts with \\x89PNG and is over 1000 bytes ({} bytes)",
                png.display(),
                bytes.len()
            )
        })?;
    }
    Ok(())
}

/// Blocks of `bytes` at the study's KV size per 512-token block.
fn study_blocks(bytes: u64) -> usize {
    (bytes / (STUDY_KV_BYTES_PER_TOKEN * trace::BLOCK_TOKENS)) as usize
}

fn sweep(a: &Args, policy: EvictionKind) -> Result<()> {
    if a.disk_blocks > 0 {
        return Err(invalid(
            "--disk-blocks does not go with --sweep (the tiering study sizes its own disk)",
        ));
    }
    let caps = a.capacities.clone().unwrap_or_else(|| SWEEP_CAPACITIES.to_vec());
    if caps.is_empty() || caps.contains(&0) {
        return Err(invalid("--capacities: one or more capacities, each > 0"));
    }
    let block = block_bytes(a, SWEEP_BLOCK_KIB)?;
    let reqs = load_trace(a)?;
    let t = Instant::now();
    let lru: Vec<f64> = caps.iter().map(|c| trace::reference_lru(&reqs, Some(*c))).collect();
    let opt: Vec<f64> = caps.iter().map(|c| trace::reference_belady(&reqs, *c)).collect();
    let mut curves = serde_json::Map::new();
    let mut lines: Vec<(String, Vec<f64>)> = Vec::new();
    for p in EvictionKind::ALL {
        let mut rates = Vec::new();
        let mut points = Vec::new();
        for (i, c) in caps.iter().enumerate() {
            let s = Setup {
                host_blocks: *c,
                disk_blocks: 0,
                gpu_blocks: 0,
                policy: *p,
                block_bytes: block,
            };
            let o = replay(&reqs, &s, &a.dir)?;
            let h = o.token_hit_rate();
            rates.push(h);
            points.push(json!({
                "capacity_blocks": c,
                "token_hit_rate": h,
                "gap_closed": gap_closed(h, lru[i], opt[i]),
                "policy_simulation_token_hit_rate": trace::simulate(&reqs, *c, *p),
                "wall_s": round3(o.wall_s),
            }));
        }
        curves.insert(p.name().into(), points.into());
        lines.push((p.name().into(), rates));
    }
    lines.push(("optimum".into(), opt.clone()));
    // How much an admission filter would have to know to close a third of
    // LRU's gap: the share of blocks' last uses it must refuse, never
    // refusing a block that is used again.
    let oracle: Vec<serde_json::Value> = caps
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let third = lru[i] + (opt[i] - lru[i]) / 3.0;
            json!({
                "capacity_blocks": c,
                "token_hit_rate": trace::reference_lru_admission_oracle(&reqs, *c, 1.0),
                "last_uses_to_refuse_for_a_third_of_the_gap": trace::admission_needed(&reqs, *c, third),
            })
        })
        .collect();
    let study = tiering_study(&reqs, policy, block, &a.dir)?;
    if let Some(png) = &a.png {
        plot(png, &caps, &lines, reqs.len())?;
    }
    let out = json!({
        "bench": "replay-sweep",
        "trace": a.trace.display().to_string(),
        "requests": reqs.len(),
        "block_bytes": block,
        "note": format!(
            "replayed through the real BlockManager with {} KiB blocks for speed: hit rates do not depend on the block size",
            block >> 10
        ),
        "capacities_blocks": caps,
        "lru_reference": lru,
        "optimum": opt,
        "policies": curves,
        "lru_with_admission_oracle": oracle,
        "tiering_study": study,
        "png": a.png.as_ref().map(|p| p.display().to_string()),
        "wall_s": round3(t.elapsed().as_secs_f64()),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!(
            "capacity  {}  optimum",
            EvictionKind::ALL
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join("  ")
        );
        for (i, c) in caps.iter().enumerate() {
            let cols: Vec<String> = lines.iter().map(|(_, r)| format!("{:.4}", r[i])).collect();
            println!("{c:>8}  {}", cols.join("  "));
        }
        println!(
            "tiering study: {}",
            serde_json::to_string_pretty(&out["tiering_study"]).expect("json")
        );
    }
    if a.check {
        check_sweep(&out, a.png.as_deref())?;
    }
    Ok(())
}

/// GPU only, then kvtier's host tier behind it, then its disk tier.
fn tiering_study(reqs: &[Request], policy: EvictionKind, block: usize, tmp_in: &Path) -> Result<serde_json::Value> {
    let gpu = study_blocks(STUDY_GPU_KV_BYTES);
    let host = study_blocks(STUDY_HOST_BYTES);
    let ssd = study_blocks(STUDY_SSD_BYTES);
    let mut rows = Vec::new();
    // The GPU alone: its LRU, nothing behind it.
    let mut sim = LruSim::new(gpu);
    let (mut hit, mut total) = (0u64, 0u64);
    for r in reqs {
        hit += r.hit_tokens(sim.leading_run(&r.hash_ids));
        total += r.input_length;
        for id in &r.hash_ids {
            sim.access(*id);
        }
    }
    let gpu_only = hit as f64 / total.max(1) as f64;
    rows.push(json!({
        "tiers": "GPU",
        "gpu_blocks": gpu, "host_blocks": 0, "disk_blocks": 0,
        "token_hit_rate": gpu_only,
        "gpu_token_share": gpu_only, "host_token_share": 0.0, "disk_token_share": 0.0,
    }));
    for (name, disk) in [("GPU + host", 0), ("GPU + host + SSD", ssd)] {
        let s = Setup {
            host_blocks: host,
            disk_blocks: disk,
            gpu_blocks: gpu,
            policy,
            block_bytes: block,
        };
        let o = replay(reqs, &s, tmp_in)?;
        let share = |t: u64| t as f64 / o.input_tokens.max(1) as f64;
        rows.push(json!({
            "tiers": name,
            "gpu_blocks": gpu, "host_blocks": host, "disk_blocks": disk,
            "token_hit_rate": o.token_hit_rate(),
            "gpu_token_share": share(o.gpu_hit_tokens),
            "host_token_share": share(o.host_hit_tokens),
            "disk_token_share": share(o.disk_hit_tokens),
            "wall_s": round3(o.wall_s),
        }));
    }
    Ok(json!({
        "assumptions": {
            "model": "Llama-3-8B, fp16 KV: 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes",
            "kv_bytes_per_token": STUDY_KV_BYTES_PER_TOKEN,
            "kv_bytes_per_512_token_block": STUDY_KV_BYTES_PER_TOKEN * trace::BLOCK_TOKENS,
            "gpu": "80 GB H100: 40 GiB left for KV after weights (16 GB), activations and the runtime",
            "gpu_kv_bytes": STUDY_GPU_KV_BYTES,
            "host_bytes": STUDY_HOST_BYTES,
            "ssd_bytes": STUDY_SSD_BYTES,
            "gpu_cache": "vLLM's prefix cache, simulated as an LRU in front of kvtier; every block of a request is stored through to kvtier, as an offload connector does",
            "host_policy": policy.name(),
            "ssd": "kvtier's disk tier, FIFO by segment, fed by host evictions; disk hits are promoted to host",
            "replayed_block_bytes": block,
        },
        "rows": rows,
    }))
}

/// Hit rate against capacity, one line per policy and the optimum.
fn plot(path: &Path, caps: &[usize], lines: &[(String, Vec<f64>)], requests: usize) -> Result<()> {
    use plotters::prelude::*;
    const W: u32 = 900;
    const H: u32 = 560;
    let err = |e: &dyn std::fmt::Display| kvtier::Error::new(ErrorKind::Io, format!("plot: {e}"));
    // ab_glyph renders only registered fonts: no system font is read.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| err(&"the embedded font does not parse"))?;
    let mut rgb = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let lo = *caps.iter().min().expect("capacities") as f64;
        let hi = *caps.iter().max().expect("capacities") as f64;
        let top = lines.iter().flat_map(|l| l.1.iter().copied()).fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Token hit rate vs host capacity ({requests} requests, Mooncake conversation trace)"),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (lo * 0.9..hi * 1.1)
                    .log_scale()
                    .with_key_points(caps.iter().map(|c| *c as f64).collect()),
                0.0..(top * 1.15).max(0.01),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("capacity (512-token blocks)")
            .y_desc("token hit rate")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, rates)) in lines.iter().enumerate() {
            let color = if name == "optimum" {
                BLACK.to_rgba()
            } else {
                Palette99::pick(i).to_rgba()
            };
            let pts: Vec<(f64, f64)> = caps.iter().map(|c| *c as f64).zip(rates.iter().copied()).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| kvtier::Error::io(format!("create {}", parent.display()), e))?;
    }
    let io = |e| kvtier::Error::io(format!("write {}", path.display()), e);
    let f = std::fs::File::create(path).map_err(io)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&rgb))
        .map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::XorShift;
    use kvtier::Tier;

    const BLOCK: usize = 4096;

    fn req(ids: &[u64], input: u64) -> Request {
        Request::new(ids, input)
    }

    fn setup(host: usize, disk: usize, gpu: usize) -> Setup {
        Setup {
            host_blocks: host,
            disk_blocks: disk,
            gpu_blocks: gpu,
            policy: EvictionKind::Lru,
            block_bytes: BLOCK,
        }
    }

    /// Chained requests that share prefixes, revisit old ones and repeat ids
    /// inside a request; prompts end mid-block.
    fn synthetic(n: u64) -> Vec<Request> {
        let mut x = XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut next = move || x.next_u64();
        (0..n)
            .map(|i| {
                let conv = next() % 12;
                let len = 1 + next() % 9;
                let mut ids: Vec<u64> = (0..len).map(|j| conv * 100 + j + u64::from(j > 5) * (i % 3)).collect();
                if i % 17 == 0 {
                    ids.push(ids[0]);
                }
                req(&ids, ids.len() as u64 * 512 - next() % 300)
            })
            .collect()
    }

    #[test]
    fn lru_replay_equals_the_reference_below_and_above_the_working_set() {
        let reqs = synthetic(400);
        let distinct: std::collections::HashSet<u64> = reqs.iter().flat_map(|r| r.hash_ids.clone()).collect();
        let d = tempfile::tempdir().unwrap();
        for cap in [1, 3, 8, 20, 40, distinct.len() / 2, distinct.len(), distinct.len() + 10] {
            let o = replay(&reqs, &setup(cap, 0, 0), d.path()).unwrap();
            let want = trace::reference_lru(&reqs, Some(cap));
            assert_eq!(o.token_hit_rate(), want, "capacity {cap}");
            assert_eq!(o.disk_hit_blocks, 0);
            assert_eq!(o.host_hit_tokens, o.hit_tokens, "capacity {cap}");
        }
        let o = replay(&reqs, &setup(distinct.len(), 0, 0), d.path()).unwrap();
        assert_eq!(o.token_hit_rate(), trace::reference_lru(&reqs, None));
        assert_eq!(
            o.blocks_stored,
            distinct.len() as u64,
            "each block stored once when all fit"
        );
    }

    #[test]
    fn the_host_tier_holds_exactly_n_blocks() {
        let d = tempfile::tempdir().unwrap();
        let n = 8;
        let mut r = Replayer::new(&setup(n, 0, 0), 16, d.path()).unwrap();
        let ids: Vec<u64> = (0..n as u64).collect();
        r.step(&req(&ids, n as u64 * 512)).unwrap();
        assert_eq!(r.m.host().unwrap().usage().blocks, n as u64, "N blocks fit");
        // Again: all N hit, nothing evicted.
        r.step(&req(&ids, n as u64 * 512)).unwrap();
        assert_eq!(r.out.hit_tokens, n as u64 * 512);
        // One more block evicts the least recent: N held, not N + 1.
        r.step(&req(&[100], 512)).unwrap();
        assert_eq!(r.m.host().unwrap().usage().blocks, n as u64);
        let l = r.m.lookup(r.ns, &[key(r.ns, 0)]).unwrap();
        assert_eq!(l.hit_blocks(), 0, "block 0 was the least recent");
        let l = r.m.lookup(r.ns, &[key(r.ns, 1)]).unwrap();
        assert_eq!(l.hit_blocks(), 1);
    }

    #[test]
    fn the_gpu_simulation_alone_is_the_reference_and_tiers_behind_it_add_hits() {
        let reqs = synthetic(400);
        let d = tempfile::tempdir().unwrap();
        let mut sim = LruSim::new(10);
        let (mut hit, mut total) = (0, 0);
        for r in &reqs {
            hit += r.hit_tokens(sim.leading_run(&r.hash_ids));
            total += r.input_length;
            r.hash_ids.iter().for_each(|id| sim.access(*id));
        }
        assert_eq!(hit as f64 / total as f64, trace::reference_lru(&reqs, Some(10)));
        // The host tier is larger than the GPU and sees every block, so the
        // GPU in front changes where hits come from, not how many.
        let with_gpu = replay(&reqs, &setup(30, 0, 10), d.path()).unwrap();
        assert_eq!(with_gpu.token_hit_rate(), trace::reference_lru(&reqs, Some(30)));
        assert!(
            with_gpu.gpu_hit_tokens > 0 && with_gpu.host_hit_tokens > 0,
            "{with_gpu:?}"
        );
        assert_eq!(
            with_gpu.gpu_hit_tokens + with_gpu.host_hit_tokens + with_gpu.disk_hit_tokens,
            with_gpu.hit_tokens
        );
    }

    #[test]
    fn a_disk_tier_behind_the_host_serves_verified_hits() {
        let reqs = synthetic(400);
        let d = tempfile::tempdir().unwrap();
        let host_only = replay(&reqs, &setup(5, 0, 0), d.path()).unwrap();
        let tiered = replay(&reqs, &setup(5, 200, 0), d.path()).unwrap();
        assert!(tiered.disk_hit_blocks > 0, "{tiered:?}");
        assert!(tiered.token_hit_rate() > host_only.token_hit_rate());
        // Every block fits host + disk: nothing is lost, as with an
        // unbounded LRU.
        assert_eq!(tiered.token_hit_rate(), trace::reference_lru(&reqs, None));
        assert!(tiered.blocks_loaded >= tiered.disk_hit_blocks + tiered.host_hit_blocks);
    }

    #[test]
    fn a_block_with_wrong_bytes_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Replayer::new(&setup(8, 0, 0), 4, d.path()).unwrap();
        // Block id 7 stored with block id 8's bytes, as a mix-up in a tier
        // would leave it.
        let mut wrong = vec![0u8; BLOCK];
        fill_block(8, &mut wrong);
        r.m.store(r.ns, &[key(r.ns, 7)], &wrong).unwrap();
        let e = r.step(&req(&[7, 9], 1024)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
        assert!(e.to_string().contains("block id 7"), "{e}");
        // The right bytes pass.
        let mut r = Replayer::new(&setup(8, 0, 0), 4, d.path()).unwrap();
        r.step(&req(&[7], 512)).unwrap();
        r.step(&req(&[7, 9], 1024)).unwrap();
        assert_eq!(r.out.blocks_loaded, 1);
    }

    fn args(extra: &[&str], trace: &Path) -> Args {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let dir = trace.parent().unwrap().join("tiers");
        let mut v = vec![
            "replay",
            "--trace",
            trace.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn bad_arguments_are_refused_with_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(&p, "{\"timestamp\": 0, \"input_length\": 600, \"hash_ids\": [1, 2]}\n").unwrap();
        let cases: &[(&[&str], &str)] = &[
            (&["--capacity-blocks", "0"], "--capacity-blocks must be > 0"),
            (&[], "--capacity-blocks"),
            (
                &["--capacity-blocks", "4", "--policy", "mru"],
                "eviction policy \"mru\"",
            ),
            (&["--capacity-blocks", "4", "--block-kib", "6"], "--block-kib 6"),
            (&["--capacity-blocks", "4", "--requests", "0"], "--requests"),
            (&["--sweep", "--capacities", "10,0"], "--capacities"),
        ];
        for (extra, want) in cases {
            let e = run(&args(extra, &p)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{extra:?}: {e}");
            assert!(e.to_string().contains(want), "{extra:?}: {e}");
        }
        let e = run(&args(&["--capacity-blocks", "4"], &d.path().join("missing.jsonl"))).unwrap_err();
        assert!(e.to_string().contains("missing.jsonl"), "{e}");
        run(&args(&["--capacity-blocks", "4", "--json"], &p)).unwrap();
    }

    #[test]
    fn a_sweep_writes_a_png() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        let lines: String = synthetic(60)
            .iter()
            .map(|r| {
                format!(
                    "{{\"timestamp\": 0, \"input_length\": {}, \"hash_ids\": {:?}}}\n",
                    r.input_length, r.hash_ids
                )
            })
            .collect();
        std::fs::write(&p, lines).unwrap();
        let png = d.path().join("out/curves.png");
        run(&args(
            &[
                "--sweep",
                "--capacities",
                "2,8,32",
                "--png",
                png.to_str().unwrap(),
                "--json",
            ],
            &p,
        ))
        .unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    }
}
