//! `kvtier-bench peers`: kvtier against foyer, the Rust hybrid memory + disk
//! cache (<https://github.com/foyer-rs/foyer>), in one run, with the same
//! workload, the same memory and disk budgets and the same directory.
//!
//! Both caches run write-through: kvtier with `Cascade::WriteThrough`, foyer
//! with `HybridCachePolicy::WriteOnInsertion`. A put is "done" when the
//! block's O_DIRECT write has completed (neither side calls fsync): kvtier's
//! `flush()` returns when its offload queue is empty, foyer's
//! `storage().wait()` when its flushers have written everything submitted.
//!
//! Neither side may run ahead of its disk by more than `queue_blocks`
//! blocks. kvtier bounds its offload queue and answers `Throttled` when it is
//! full; foyer never pushes back: its flushers drop an entry when their
//! buffer is full. The bench paces foyer's inserts to the same bound, on
//! foyer's own count of bytes written, and sizes its flush buffers to hold
//! that bound, so that it drops nothing; the drops it counts are reported
//! whatever they are.
//!
//! Three measurements, each on both caches:
//! - puts: `blocks` blocks written one at a time, timed until all are on disk;
//! - gets: each block read back once, in a seeded shuffled order, so reads
//!   come from memory and from disk; every byte is compared;
//! - hit rate: the conversation trace replayed with scaled-down blocks: per
//!   request, a get per id until the first miss, then an insert of every id
//!   not present.

use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder, HybridCachePolicy,
    PsyncIoEngineConfig, RecoverMode,
};
use kvtier::manager::{Cascade, ManagerConfig};
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use kvtier::{AlignedBuf as Aligned, BlockKey, BlockManager, ErrorKind, NamespaceId, Result};
use mixtrics::metrics::{
    BoxedCounter, BoxedCounterVec, BoxedGaugeVec, BoxedHistogramVec, CounterOps, CounterVecOps, RegistryOps,
};
use mixtrics::registry::noop::NoopMetricsRegistry;
use serde::Serialize;
use serde_json::json;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::trace::{self, Request};
use crate::util::{
    Invariants, XorShift, direct_io_works, fill, fresh_dir, gbps, key, namespace, percentile, ratio, report, round3,
    round4,
};

/// The foyer release measured; `Cargo.toml` pins the same.
const FOYER_VERSION: &str = "0.22.6";
/// foyer's entry header: lengths, hash, sequence, checksum, magic.
const FOYER_HEADER_BYTES: usize = 36;
/// The key (u64) and the value's length prefix, as foyer encodes them.
const FOYER_KEY_AND_LEN_BYTES: usize = 16;
const PAGE: usize = 4096;
/// How long a writer waits before it asks again whether its queue has room.
const BACKOFF: Duration = Duration::from_micros(100);

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory on the disk under test; each cache gets a subdirectory
    /// (made if missing, removed after).
    #[arg(long, default_value = "target/bench-peers")]
    dir: PathBuf,
    /// Block (value) size of the put/get measurement, in KiB.
    #[arg(long, default_value_t = 2048)]
    block_kib: usize,
    /// Blocks each cache writes and reads back.
    #[arg(long, default_value_t = 512)]
    blocks: usize,
    /// Memory budget of each cache, in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: usize,
    /// Disk budget of each cache, in MiB.
    #[arg(long, default_value_t = 2048)]
    disk_mib: usize,
    /// Blocks a writer may have stored but not yet on disk: kvtier's offload
    /// queue, and the bound foyer's inserts are paced to.
    #[arg(long, default_value_t = 32)]
    queue_blocks: usize,
    /// Disk writers on each side: foyer's flushers (write tasks), and the
    /// worker and blocking-I/O threads of its tokio runtime; kvtier's
    /// offload workers.
    #[arg(long, default_value_t = 2)]
    foyer_threads: usize,
    /// The trace replayed for the hit rates.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/traces/conversation_trace.jsonl"))]
    trace: PathBuf,
    /// Bytes per 512-token trace block in the replay, in KiB: scaled down
    /// from real KV blocks so the replay takes seconds, not hours.
    #[arg(long, default_value_t = 16)]
    trace_block_kib: usize,
    /// Memory budget of each cache in the replay, in trace blocks.
    #[arg(long, default_value_t = 1000)]
    trace_memory_blocks: usize,
    /// Disk budget of each cache in the replay, in trace blocks.
    #[arg(long, default_value_t = 8000)]
    trace_disk_blocks: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with small sizes, for CI: figures are not goals.
    #[arg(long)]
    smoke: bool,
}

/// Sizes of one comparison, the same for both caches.
#[derive(Debug, Clone, Copy, Serialize)]
struct Budget {
    block_bytes: usize,
    memory_bytes: usize,
    disk_bytes: usize,
    /// kvtier's segment and foyer's block: the unit each reclaims disk space
    /// in, equal so that neither evicts in coarser steps.
    disk_unit_bytes: usize,
    queue_blocks: usize,
}

impl Budget {
    fn new(block_bytes: usize, memory_bytes: usize, disk_bytes: usize, queue_blocks: usize) -> Self {
        // foyer's default block (16 MiB), smaller where the disk would hold
        // fewer than 16 of them.
        let unit = (disk_bytes / 16).min(16 << 20) / PAGE * PAGE;
        Self {
            block_bytes,
            memory_bytes,
            disk_bytes,
            disk_unit_bytes: unit,
            queue_blocks,
        }
    }

    /// Bytes one block takes in foyer's flush buffer and on its disk.
    fn foyer_entry_bytes(&self) -> usize {
        (FOYER_HEADER_BYTES + FOYER_KEY_AND_LEN_BYTES + self.block_bytes).next_multiple_of(PAGE)
    }

    fn check(&self) -> Result<()> {
        let invalid = |m: String| Err(kvtier::Error::new(ErrorKind::InvalidArgument, m));
        if self.block_bytes == 0 || !self.block_bytes.is_multiple_of(PAGE) {
            return invalid(format!(
                "block of {} bytes: a non-zero multiple of 4 KiB",
                self.block_bytes
            ));
        }
        // Both need room for a block and its headers in one unit: foyer
        // keeps a 4 KiB index per unit, kvtier three pages.
        if self.disk_unit_bytes < self.foyer_entry_bytes() + 3 * PAGE {
            return invalid(format!(
                "a disk of {} bytes has units of {} bytes, too small for blocks of {}",
                self.disk_bytes, self.disk_unit_bytes, self.block_bytes
            ));
        }
        if self.memory_bytes < self.block_bytes || self.queue_blocks == 0 {
            return invalid("memory must hold a block and the queue at least one".into());
        }
        Ok(())
    }
}

/// The knobs foyer runs with, printed in the JSON.
#[derive(Debug, Clone, Serialize)]
struct FoyerConfig {
    version: &'static str,
    policy: &'static str,
    memory_bytes: usize,
    memory_weighter: &'static str,
    memory_eviction: &'static str,
    memory_shards: usize,
    disk_bytes: usize,
    engine: &'static str,
    block_bytes: usize,
    flushers: usize,
    reclaimers: usize,
    buffer_pool_bytes: usize,
    /// Flush buffers allocated: two per flusher (one filling, one writing).
    io_buffer_bytes_allocated: usize,
    submit_queue_size_threshold_bytes: usize,
    /// Inserts not yet on disk, at most (kvtier's `offload_queue_blocks`).
    paced_window_entries: usize,
    paced_window_bytes: usize,
    io_engine: &'static str,
    direct_io: bool,
    compression: &'static str,
    recover_mode: &'static str,
    runtime_worker_threads: usize,
    runtime_max_blocking_threads: usize,
}

impl FoyerConfig {
    fn new(b: &Budget, threads: usize, direct_io: bool) -> Self {
        let window = b.queue_blocks * b.foyer_entry_bytes();
        // A flusher takes every entry queued for it into one buffer and drops
        // those that do not fit. The pacing keeps about `window` bytes
        // unwritten, and all of them may hash to one flusher: each buffer
        // holds the whole window, and two disk units: one being filled, one
        // for the pacing's drift while a full one is written.
        let per_flusher = window + 2 * b.disk_unit_bytes;
        Self {
            version: FOYER_VERSION,
            policy: "WriteOnInsertion",
            memory_bytes: b.memory_bytes,
            memory_weighter: "value bytes",
            memory_eviction: "foyer default: LRU, high-priority pool 0.9",
            memory_shards: 8,
            disk_bytes: b.disk_bytes,
            engine: "block",
            block_bytes: b.disk_unit_bytes,
            flushers: threads,
            reclaimers: 1,
            buffer_pool_bytes: per_flusher * threads,
            io_buffer_bytes_allocated: 2 * per_flusher * threads,
            submit_queue_size_threshold_bytes: 2 * per_flusher * threads,
            paced_window_entries: b.queue_blocks,
            paced_window_bytes: window,
            io_engine: "psync",
            direct_io,
            compression: "none",
            recover_mode: "none",
            runtime_worker_threads: threads,
            runtime_max_blocking_threads: threads,
        }
    }

    async fn open(&self, dir: &Path, metrics: FoyerCounters) -> foyer::Result<HybridCache<u64, Vec<u8>>> {
        let device = FsDeviceBuilder::new(dir)
            .with_capacity(self.disk_bytes)
            .with_direct(self.direct_io)
            .build()?;
        HybridCacheBuilder::new()
            .with_name("peers")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_metrics_registry(Box::new(metrics))
            .memory(self.memory_bytes)
            .with_shards(self.memory_shards)
            .with_weighter(|_: &u64, v: &Vec<u8>| v.len())
            .storage()
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(
                BlockEngineConfig::new(device)
                    .with_block_size(self.block_bytes)
                    .with_flushers(self.flushers)
                    .with_reclaimers(self.reclaimers)
                    .with_buffer_pool_size(self.buffer_pool_bytes)
                    .with_submit_queue_size_threshold(self.submit_queue_size_threshold_bytes),
            )
            .with_recover_mode(RecoverMode::None)
            .build()
            .await
    }

    fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.runtime_worker_threads)
            .max_blocking_threads(self.runtime_max_blocking_threads)
            .enable_all()
            .build()
            .map_err(|e| kvtier::Error::io("start foyer's runtime", e))
    }
}

fn foyer_err(what: &str) -> impl FnOnce(foyer::Error) -> kvtier::Error + '_ {
    move |e| kvtier::Error::new(ErrorKind::Io, format!("foyer {what}: {e}"))
}

fn kvtier_config(b: &Budget, dir: &Path, writers: usize) -> ManagerConfig {
    let disk = DiskConfig {
        segment_bytes: b.disk_unit_bytes as u64,
        ..DiskConfig::new(dir, b.disk_bytes as u64)
    };
    ManagerConfig {
        cascade: Cascade::WriteThrough,
        offload_queue_blocks: b.queue_blocks,
        offload_workers: writers,
        ..ManagerConfig::tiered(Some(HostConfig::with_capacity(b.memory_bytes as u64)), Some(disk))
    }
}

/// A metrics registry for foyer that keeps its counters in memory, so the
/// bench reads what foyer counts (drops, hits) without a metrics backend.
/// Gauges and histograms are discarded.
#[derive(Debug, Clone, Default)]
struct FoyerCounters(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl FoyerCounters {
    /// The counter `metric` with the label `op` (the cache name dropped).
    fn get(&self, metric: &str, op: &str) -> u64 {
        let m = self.0.lock().expect("no panics while held");
        m.get(&format!("{metric}/{op}")).map_or(0, |c| c.load(Relaxed))
    }

    /// Entries foyer dropped instead of writing: its flush buffer was full
    /// (`buffer_overflow`) or its submit queue was (`channel_overflow`).
    fn dropped(&self) -> u64 {
        self.get("foyer_storage_inner_op_total", "buffer_overflow")
            + self.get("foyer_storage_inner_op_total", "channel_overflow")
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "dropped_entries": self.dropped(),
            "buffer_overflow": self.get("foyer_storage_inner_op_total", "buffer_overflow"),
            "channel_overflow": self.get("foyer_storage_inner_op_total", "channel_overflow"),
            "storage_enqueue": self.get("foyer_storage_op_total", "enqueue"),
            "memory_hits": self.get("foyer_memory_op_total", "hit"),
            "storage_hits": self.get("foyer_storage_op_total", "hit"),
            "storage_misses": self.get("foyer_storage_op_total", "miss"),
            "storage_errors": self.get("foyer_storage_op_total", "error"),
            "disk_write_bytes": self.get("foyer_storage_disk_io_bytes_total", "write"),
            "disk_read_bytes": self.get("foyer_storage_disk_io_bytes_total", "read"),
        })
    }
}

#[derive(Debug)]
struct Counter(Arc<AtomicU64>);

impl CounterOps for Counter {
    fn increase(&self, val: u64) {
        self.0.fetch_add(val, Relaxed);
    }
}

#[derive(Debug)]
struct CounterVec {
    name: Cow<'static, str>,
    all: FoyerCounters,
}

impl CounterVecOps for CounterVec {
    fn counter(&self, labels: &[Cow<'static, str>]) -> BoxedCounter {
        // foyer's first label is the cache's name.
        let ops: Vec<&str> = labels.iter().skip(1).map(|l| l.as_ref()).collect();
        let mut m = self.all.0.lock().expect("no panics while held");
        let c = m.entry(format!("{}/{}", self.name, ops.join(","))).or_default();
        Box::new(Counter(c.clone()))
    }
}

impl RegistryOps for FoyerCounters {
    fn register_counter_vec(
        &self,
        name: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedCounterVec {
        Box::new(CounterVec {
            name,
            all: self.clone(),
        })
    }

    fn register_gauge_vec(
        &self,
        _: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedGaugeVec {
        Box::new(NoopMetricsRegistry)
    }

    fn register_histogram_vec(
        &self,
        _: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedHistogramVec {
        Box::new(NoopMetricsRegistry)
    }

    fn register_histogram_vec_with_buckets(
        &self,
        _: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
        _: Vec<f64>,
    ) -> BoxedHistogramVec {
        Box::new(NoopMetricsRegistry)
    }
}

/// What one cache did with the put/get workload.
#[derive(Debug, Default)]
struct Io {
    put_secs: f64,
    put_us: Vec<f64>,
    /// Sum of the get latencies (verification excluded).
    get_secs: f64,
    get_us: Vec<f64>,
    /// Times a writer found its queue full and waited.
    waits: u64,
    get_misses: u64,
    bytes_verified: u64,
}

impl Io {
    fn summary(&mut self, total_bytes: usize) -> serde_json::Value {
        let served = total_bytes - self.get_misses as usize * (total_bytes / self.put_us.len());
        json!({
            "put_gbps": round3(gbps(total_bytes, self.put_secs)),
            "get_gbps": round3(gbps(served, self.get_secs)),
            "put_p50_us": round3(percentile(&mut self.put_us, 50.0)),
            "put_p99_us": round3(percentile(&mut self.put_us, 99.0)),
            "get_p50_us": round3(percentile(&mut self.get_us, 50.0)),
            "get_p99_us": round3(percentile(&mut self.get_us, 99.0)),
            "put_secs": round3(self.put_secs),
            "queue_full_waits": self.waits,
            "get_misses": self.get_misses,
            "bytes_verified": self.bytes_verified,
        })
    }
}

fn micros(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// A seeded permutation of `0..n` (Fisher-Yates over xorshift).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut x = XorShift::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (x.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}

fn verify(who: &str, what: &str, got: &[u8], want: &[u8]) -> Result<u64> {
    if got != want {
        return Err(kvtier::Error::new(
            ErrorKind::ChecksumMismatch,
            format!("{who} returned altered bytes for {what}"),
        ));
    }
    Ok(got.len() as u64)
}

/// Stores one block, waiting while kvtier's offload queue is full.
fn kvtier_store(m: &BlockManager, ns: NamespaceId, k: BlockKey, data: &[u8], waits: &mut u64) -> Result<()> {
    loop {
        match m.store(ns, std::slice::from_ref(&k), data) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Throttled => {
                *waits += 1;
                std::thread::sleep(BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bytes of entries foyer has written, about: its device counts every
/// write, and its flushers write each blob part as data plus one index page
/// (`blob_index_size`, 4 KiB), so half the writes are taken as index pages.
/// The page foyer writes when it cleans a reclaimed block is counted as
/// data, so on a disk that wraps the pacing drifts ahead by half a page per
/// reclaim; the buffers get a unit of slack for it.
fn foyer_data_written(cache: &HybridCache<u64, Vec<u8>>) -> usize {
    let s = cache.statistics();
    s.disk_write_bytes() - s.disk_write_ios() / 2 * PAGE
}

/// Paces foyer's inserts: foyer never pushes back, so the caller does.
#[derive(Debug)]
struct FoyerPacer {
    base: usize,
    inserted: usize,
    /// Times the writer found the window full and waited.
    waits: u64,
}

impl FoyerPacer {
    fn new(cache: &HybridCache<u64, Vec<u8>>) -> Self {
        Self {
            base: foyer_data_written(cache),
            inserted: 0,
            waits: 0,
        }
    }

    /// Waits until at most `window` inserted bytes are unwritten.
    fn admit(&mut self, cache: &HybridCache<u64, Vec<u8>>, window: usize) {
        while self.inserted > foyer_data_written(cache) - self.base + window {
            self.waits += 1;
            std::thread::sleep(BACKOFF);
        }
    }

    fn inserted(&mut self, entry_bytes: usize) {
        self.inserted += entry_bytes;
    }
}

fn kvtier_io(b: &Budget, dir: &Path, writers: usize, src: &[u8], order: &[usize]) -> Result<(Io, serde_json::Value)> {
    let block = b.block_bytes;
    let cfg = kvtier_config(b, dir, writers);
    let m = cfg.build()?;
    let ns = m.register_namespace(&namespace("peers-bench", block))?;
    let keys: Vec<BlockKey> = (0..src.len() / block).map(|i| key(ns, 0, i)).collect();
    let mut io = Io::default();
    let t = Instant::now();
    for (k, chunk) in keys.iter().zip(src.chunks_exact(block)) {
        let t0 = Instant::now();
        kvtier_store(&m, ns, *k, chunk, &mut io.waits)?;
        io.put_us.push(micros(t0));
    }
    m.flush();
    io.put_secs = t.elapsed().as_secs_f64();
    let mut dst = Aligned::new(block);
    for &i in order {
        let t0 = Instant::now();
        let r = m.load(ns, &keys[i..=i], &mut dst)?;
        let secs = t0.elapsed().as_secs_f64();
        if r.loaded != 1 {
            io.get_misses += 1;
            continue;
        }
        io.get_secs += secs;
        io.get_us.push(secs * 1e6);
        io.bytes_verified += verify("kvtier", &format!("block {i}"), &dst, &src[i * block..(i + 1) * block])?;
    }
    let s = m.stats();
    let tiers = json!({
        "host_hits": s.host.as_ref().map(|h| h.hits),
        "disk_hits": s.disk.as_ref().map(|d| d.hits),
        "promotions": s.promotions,
        "offloaded": s.offloaded,
        "offload_errors": s.offload_errors,
        "throttled": s.throttled,
        "disk_corrupt": s.disk.as_ref().map(|d| d.corrupt),
        "direct_io": m.disk().is_some_and(|d| d.direct_io()),
    });
    Ok((io, tiers))
}

fn foyer_io(c: &FoyerConfig, b: &Budget, dir: &Path, src: &[u8], order: &[usize]) -> Result<(Io, serde_json::Value)> {
    let block = b.block_bytes;
    let rt = c.runtime()?;
    let counters = FoyerCounters::default();
    let cache = rt.block_on(c.open(dir, counters.clone())).map_err(foyer_err("open"))?;
    let mut pacer = FoyerPacer::new(&cache);
    let mut io = Io::default();
    let t = Instant::now();
    for (i, chunk) in src.chunks_exact(block).enumerate() {
        let t0 = Instant::now();
        pacer.admit(&cache, c.paced_window_bytes);
        // foyer owns its values: the copy out of the caller's buffer is the
        // counterpart of kvtier's copy into its host pool.
        drop(cache.insert(i as u64, chunk.to_vec()));
        pacer.inserted(b.foyer_entry_bytes());
        io.put_us.push(micros(t0));
    }
    rt.block_on(cache.storage().wait());
    io.put_secs = t.elapsed().as_secs_f64();
    io.waits = pacer.waits;
    let mut dst = Aligned::new(block);
    for &i in order {
        let t0 = Instant::now();
        let e = rt.block_on(cache.get(&(i as u64))).map_err(foyer_err("get"))?;
        let Some(e) = e else {
            io.get_misses += 1;
            continue;
        };
        // An engine needs the bytes in its own buffer, as kvtier's load
        // leaves them.
        dst.copy_from_slice(e.value());
        drop(e);
        let secs = t0.elapsed().as_secs_f64();
        io.get_secs += secs;
        io.get_us.push(secs * 1e6);
        io.bytes_verified += verify("foyer", &format!("block {i}"), &dst, &src[i * block..(i + 1) * block])?;
    }
    rt.block_on(cache.close()).map_err(foyer_err("close"))?;
    Ok((io, counters.summary()))
}

/// A replay's outcome.
#[derive(Debug, Default)]
struct Replay {
    hit_tokens: u64,
    input_tokens: u64,
    gets: u64,
    inserts: u64,
    waits: u64,
    bytes_verified: u64,
    secs: f64,
}

impl Replay {
    fn hit_rate(&self) -> f64 {
        self.hit_tokens as f64 / self.input_tokens.max(1) as f64
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "hit_rate": round4(self.hit_rate()),
            "hit_tokens": self.hit_tokens,
            "input_tokens": self.input_tokens,
            "gets": self.gets,
            "inserts": self.inserts,
            "queue_full_waits": self.waits,
            "bytes_verified": self.bytes_verified,
            "secs": round3(self.secs),
        })
    }
}

/// The bytes of trace block `id`: distinct per id.
fn trace_block(id: u64, out: &mut [u8]) {
    fill(out, 2 * id + 1);
}

fn kvtier_replay(b: &Budget, dir: &Path, writers: usize, reqs: &[Request]) -> Result<Replay> {
    let m = kvtier_config(b, dir, writers).build()?;
    let ns = m.register_namespace(&namespace("peers-trace", b.block_bytes))?;
    let (mut got, mut want) = (Aligned::new(b.block_bytes), Aligned::new(b.block_bytes));
    let mut r = Replay::default();
    let t = Instant::now();
    for req in reqs {
        let mut hit = 0;
        for &id in &req.hash_ids {
            r.gets += 1;
            if m.load(ns, &[key(ns, 0, id as usize)], &mut got)?.loaded == 0 {
                break;
            }
            trace_block(id, &mut want);
            r.bytes_verified += verify("kvtier", &format!("trace block {id}"), &got, &want)?;
            hit += 1;
        }
        r.hit_tokens += req.hit_tokens(hit);
        r.input_tokens += req.input_length;
        for &id in &req.hash_ids[hit..] {
            let k = key(ns, 0, id as usize);
            if m.lookup(ns, &[k])?.hit_blocks() == 0 {
                trace_block(id, &mut want);
                kvtier_store(&m, ns, k, &want, &mut r.waits)?;
                r.inserts += 1;
            }
        }
    }
    m.flush();
    r.secs = t.elapsed().as_secs_f64();
    Ok(r)
}

fn foyer_replay(c: &FoyerConfig, b: &Budget, dir: &Path, reqs: &[Request]) -> Result<(Replay, serde_json::Value)> {
    let rt = c.runtime()?;
    let counters = FoyerCounters::default();
    let cache = rt.block_on(c.open(dir, counters.clone())).map_err(foyer_err("open"))?;
    let mut pacer = FoyerPacer::new(&cache);
    let mut want = Aligned::new(b.block_bytes);
    let mut r = Replay::default();
    let t = Instant::now();
    for req in reqs {
        let mut hit = 0;
        for &id in &req.hash_ids {
            r.gets += 1;
            let Some(e) = rt.block_on(cache.get(&id)).map_err(foyer_err("get"))? else {
                break;
            };
            trace_block(id, &mut want);
            r.bytes_verified += verify("foyer", &format!("trace block {id}"), e.value(), &want)?;
            hit += 1;
        }
        r.hit_tokens += req.hit_tokens(hit);
        r.input_tokens += req.input_length;
        for &id in &req.hash_ids[hit..] {
            if !cache.contains(&id) {
                pacer.admit(&cache, c.paced_window_bytes);
                trace_block(id, &mut want);
                drop(cache.insert(id, want.to_vec()));
                pacer.inserted(b.foyer_entry_bytes());
                r.inserts += 1;
            }
        }
    }
    rt.block_on(cache.storage().wait());
    r.secs = t.elapsed().as_secs_f64();
    r.waits = pacer.waits;
    rt.block_on(cache.close()).map_err(foyer_err("close"))?;
    Ok((r, counters.summary()))
}

pub(crate) fn run(a: &Args) -> Result<()> {
    let (blocks, memory_mib, disk_mib, queue_blocks) = if a.smoke {
        (32, 16, 128, 8)
    } else {
        (a.blocks, a.memory_mib, a.disk_mib, a.queue_blocks)
    };
    let (trace_memory, trace_disk, trace_requests) = if a.smoke {
        (100, 800, 1500)
    } else {
        (a.trace_memory_blocks, a.trace_disk_blocks, usize::MAX)
    };
    let io_budget = Budget::new(a.block_kib << 10, memory_mib << 20, disk_mib << 20, queue_blocks);
    let tb = a.trace_block_kib << 10;
    let trace_budget = Budget::new(tb, trace_memory * tb, trace_disk * tb, queue_blocks);
    io_budget.check()?;
    trace_budget.check()?;
    if blocks == 0 || a.foyer_threads == 0 {
        return Err(kvtier::Error::new(
            ErrorKind::InvalidArgument,
            "blocks and foyer threads must be > 0",
        ));
    }
    let mut reqs = trace::load(&a.trace)?;
    reqs.truncate(trace_requests);

    std::fs::create_dir_all(&a.dir).map_err(|e| kvtier::Error::io(format!("create {}", a.dir.display()), e))?;
    let direct = direct_io_works(&a.dir);
    let (kv_dir, fy_dir) = (a.dir.join("kvtier"), a.dir.join("foyer"));
    let foyer_io_cfg = FoyerConfig::new(&io_budget, a.foyer_threads, direct);
    let foyer_trace_cfg = FoyerConfig::new(&trace_budget, a.foyer_threads, direct);

    let total = blocks * io_budget.block_bytes;
    let mut src = Aligned::new(total);
    fill(&mut src, 0x5eed);
    let order = shuffled(blocks, 0x9e37_79b9_7f4a_7c15);

    // kvtier first, then foyer, each on a fresh directory; the order is
    // swapped for the replay so that neither always runs on a warmer disk.
    fresh_dir(&kv_dir)?;
    let (mut kv, kv_tiers) = kvtier_io(&io_budget, &kv_dir, a.foyer_threads, &src, &order)?;
    fresh_dir(&fy_dir)?;
    let (mut fy, fy_counters) = foyer_io(&foyer_io_cfg, &io_budget, &fy_dir, &src, &order)?;
    drop(src);
    fresh_dir(&fy_dir)?;
    let (fy_replay, fy_replay_counters) = foyer_replay(&foyer_trace_cfg, &trace_budget, &fy_dir, &reqs)?;
    fresh_dir(&kv_dir)?;
    let kv_replay = kvtier_replay(&trace_budget, &kv_dir, a.foyer_threads, &reqs)?;
    let _ = std::fs::remove_dir_all(&kv_dir);
    let _ = std::fs::remove_dir_all(&fy_dir);

    let (kvs, fys) = (kv.summary(total), fy.summary(total));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut out = json!({
        "bench": "peers",
        "smoke": a.smoke,
        "dir": a.dir.display().to_string(),
        "direct_io": direct,
        "done_means": "every block's O_DIRECT write completed (no fsync on either side): kvtier flush(), foyer storage().wait()",
        "block_bytes": io_budget.block_bytes,
        "blocks": blocks,
        "total_bytes": total,
        "memory_bytes": io_budget.memory_bytes,
        "disk_bytes": io_budget.disk_bytes,
        "kvtier_put_gbps": kvs["put_gbps"],
        "foyer_put_gbps": fys["put_gbps"],
        "kvtier_get_gbps": kvs["get_gbps"],
        "foyer_get_gbps": fys["get_gbps"],
        "kvtier_put_p50_us": kvs["put_p50_us"],
        "foyer_put_p50_us": fys["put_p50_us"],
        "kvtier_put_p99_us": kvs["put_p99_us"],
        "foyer_put_p99_us": fys["put_p99_us"],
        "kvtier_get_p50_us": kvs["get_p50_us"],
        "foyer_get_p50_us": fys["get_p50_us"],
        "kvtier_get_p99_us": kvs["get_p99_us"],
        "foyer_get_p99_us": fys["get_p99_us"],
        "kvtier_hit_rate": round4(kv_replay.hit_rate()),
        "foyer_hit_rate": round4(fy_replay.hit_rate()),
        "put_ratio": ratio(f(&kvs, "put_gbps"), f(&fys, "put_gbps")),
        "get_ratio": ratio(f(&kvs, "get_gbps"), f(&fys, "get_gbps")),
        "p99_ratio": ratio(f(&fys, "get_p99_us"), f(&kvs, "get_p99_us")),
        "put_p99_ratio": ratio(f(&fys, "put_p99_us"), f(&kvs, "put_p99_us")),
        "hit_rate_ratio": ratio(kv_replay.hit_rate(), fy_replay.hit_rate()),
        "foyer_dropped_entries": fy_counters["dropped_entries"].as_u64().unwrap_or(0)
            + fy_replay_counters["dropped_entries"].as_u64().unwrap_or(0),
        "bytes_verified": kv.bytes_verified + fy.bytes_verified + kv_replay.bytes_verified + fy_replay.bytes_verified,
    });
    out["kvtier"] = json!({ "io": kvs, "tiers": kv_tiers, "replay": kv_replay.summary() });
    out["foyer"] = json!({
        "io": fys,
        "counters": fy_counters,
        "replay": fy_replay.summary(),
        "replay_counters": fy_replay_counters,
    });
    out["replay"] = json!({
        "trace": a.trace.display().to_string(),
        "requests": reqs.len(),
        "block_bytes_scaled": trace_budget.block_bytes,
        "block_tokens": trace::BLOCK_TOKENS,
        "note": "bytes per 512-token block scaled down so the replay runs in seconds; budgets are counted in blocks",
        "memory_blocks": trace_memory,
        "disk_blocks": trace_disk,
        // Write-through keeps every block on disk, so the disk bounds what
        // either cache holds.
        "reference_lru_hit_rate_disk_blocks": round4(trace::reference_lru(&reqs, Some(trace_disk))),
        "reference_lru_hit_rate_unbounded": round4(trace::reference_lru(&reqs, None)),
    });
    out["config"] = json!({
        "kvtier": {
            "io": kvtier_config(&io_budget, &kv_dir, a.foyer_threads),
            "replay": kvtier_config(&trace_budget, &kv_dir, a.foyer_threads),
        },
        "foyer": { "io": foyer_io_cfg, "replay": foyer_trace_cfg },
        "same_for_both": { "io": io_budget, "replay": trace_budget },
        "threads": format!(
            "kvtier: the caller and {t} offload writers; foyer: the caller plus a tokio runtime of {t} workers \
             and {t} blocking I/O threads, {t} flushers",
            t = a.foyer_threads
        ),
    });
    report(&out, a.json, a.smoke.then_some(check_smoke))
}

/// What CI holds a smoke run to: both caches measured (every figure above
/// 0), every block back and every byte compared, the replay verified bytes,
/// every ratio defined; paced to its buffers, foyer drops nothing in the
/// put/get part.
fn check_smoke(v: &serde_json::Value) -> Result<()> {
    let c = Invariants::of("peers --smoke", v);
    let total = c.u("/total_bytes")?;
    for side in ["kvtier", "foyer"] {
        for k in [
            "put_gbps",
            "get_gbps",
            "get_p50_us",
            "get_p99_us",
            "put_p99_us",
            "hit_rate",
        ] {
            let x = c.f(&format!("/{side}_{k}"))?;
            c.ensure(x > 0.0, || format!("{side}_{k} {x} > 0"))?;
        }
        // Every block came back and every byte was compared.
        let misses = c.u(&format!("/{side}/io/get_misses"))?;
        let verified = c.u(&format!("/{side}/io/bytes_verified"))?;
        c.ensure(misses == 0 && verified == total, || {
            format!("{side}/io/get_misses {misses} == 0 and {side}/io/bytes_verified {verified} == total_bytes {total}")
        })?;
        let replayed = c.u(&format!("/{side}/replay/bytes_verified"))?;
        c.ensure(replayed > 0, || format!("{side}/replay/bytes_verified {replayed} > 0"))?;
    }
    for k in ["put_ratio", "get_ratio", "p99_ratio", "hit_rate_ratio"] {
        let x = c.f(&format!("/{k}"))?;
        c.ensure(x > 0.0, || format!("{k} {x} > 0"))?;
    }
    let dropped = c.u("/foyer/counters/dropped_entries")?;
    c.ensure(dropped == 0, || {
        format!("foyer/counters/dropped_entries {dropped} == 0")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_is_a_permutation() {
        let mut v = shuffled(1000, 7);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn budgets_refuse_blocks_their_disk_units_cannot_hold() {
        assert!(Budget::new(2 << 20, 256 << 20, 2 << 30, 32).check().is_ok());
        // 16 units of 1 MiB cannot take 2 MiB blocks.
        assert!(Budget::new(2 << 20, 256 << 20, 16 << 20, 32).check().is_err());
        assert!(Budget::new(1000, 1 << 20, 64 << 20, 32).check().is_err());
    }

    #[test]
    fn foyer_counters_are_read_back_by_metric_and_op() {
        let c = FoyerCounters::default();
        let v = c.register_counter_vec("foyer_storage_inner_op_total".into(), "".into(), &["name", "op"]);
        v.counter(&["peers".into(), "buffer_overflow".into()]).increase(2);
        v.counter(&["peers".into(), "channel_overflow".into()]).increase(3);
        assert_eq!(c.dropped(), 5);
        assert_eq!(c.get("foyer_storage_inner_op_total", "queue_rotate"), 0);
    }

    /// Both caches move and verify every byte of a small workload, and foyer
    /// drops nothing with its buffers sized as the bench sizes them.
    #[test]
    fn both_caches_return_every_block_of_a_small_run() {
        let d = tempfile::tempdir().unwrap();
        let b = Budget::new(64 << 10, 512 << 10, 16 << 20, 4);
        b.check().unwrap();
        let n = 32;
        let mut src = Aligned::new(n * b.block_bytes);
        fill(&mut src, 3);
        let order = shuffled(n, 5);
        let (kv, _) = kvtier_io(&b, &d.path().join("kv"), 2, &src, &order).unwrap();
        assert_eq!(kv.get_misses, 0);
        assert_eq!(kv.bytes_verified, src.len() as u64);
        let c = FoyerConfig::new(&b, 1, direct_io_works(d.path()));
        let (fy, counters) = foyer_io(&c, &b, &d.path().join("fy"), &src, &order).unwrap();
        assert_eq!(counters["dropped_entries"], 0, "{counters}");
        assert_eq!(fy.get_misses, 0);
        assert_eq!(fy.bytes_verified, src.len() as u64);
    }
}
