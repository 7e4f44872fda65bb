//! `kvtier-bench lmcache`: kvtier as LMCache's L2 against LMCache's own
//! local disk storage, in one run, on the same directory, with the same
//! chunks, next to raw O_DIRECT I/O of the same bytes in that directory.
//!
//! Both sides are driven through LMCache 0.5.6's own L2 machinery, the
//! adapters its multiprocess server builds from `--l2-adapter JSON`: kvtier
//! is the `native_plugin` `kvtier.lmcache.KvTierL2` against an SSD-only
//! kvtierd on 127.0.0.1 (no host cache: its host memory is only staging);
//! LMCache's disk is its `fs` adapter (Python, aiofiles) and, for the same
//! price, its `fs_native` adapter (C++ workers, wrapped in the same
//! `NativeConnectorL2Adapter` as kvtier's plugin), each with and without
//! its `use_odirect` option. The headline `lmcache_disk_*` figures are of
//! the first `--lmcache` variant (default `fs` as a user writes it:
//! `{"type":"fs","base_path":...}`); every variant is reported, and the
//! goals are also judged against each of them.
//!
//! The LMCache half is `bench/lmcache_bench.py`, run in the LMCache venv
//! (scripts/lmcache-env.sh) once per side and round: it puts the working
//! set, flushes and drops the page cache, gets it back in a shuffled order
//! with the same tasks in flight, and checks what came back. This side
//! starts a fresh kvtierd per round, measures raw O_DIRECT writes and reads
//! at the same depth at the start of each round (and buffered reads of the
//! same chunks as a file each, as LMCache's buffered adapters read),
//! removes each side's files before the next, and turns the seconds into
//! figures: GB/s are medians over the rounds, latencies percentiles of
//! every task of every round. kvtier embedded in LMCache's process (no
//! kvtierd) is measured too, as a diagnostic of what the daemon hop costs.
//!
//! Why the page cache is dropped rather than outgrown: a working set that
//! outgrew this machine's RAM (and so the page cache LMCache's buffered
//! files live in) would not fit its disk twice over; dropping the clean
//! pages before each get phase makes every get read the device all the same.
//! The put figure of a buffered side is what LMCache acknowledges (its bytes
//! in the page cache); `put_incl_sync_gbps` adds the flush that followed.

use serde_json::{Map, Value, json};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::connector::run_bounded;
use crate::daemon::start_daemon;
use crate::util::{
    Invariants, direct_io_works, fill, fresh_dir, gbps, io_err as err, is_filled, median, percentile, ratio, report,
    round3,
};
use kvtier::AlignedBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Lmcache {
    /// `{"type":"fs"}`: Python, aiofiles, buffered writes.
    Fs,
    /// `{"type":"fs","use_odirect":true}`.
    FsOdirect,
    /// `{"type":"fs_native"}`: C++ workers, buffered writes.
    FsNative,
    /// `{"type":"fs_native","use_odirect":true}`.
    FsNativeOdirect,
}

impl Lmcache {
    fn name(self) -> &'static str {
        match self {
            Lmcache::Fs => "fs",
            Lmcache::FsOdirect => "fs_odirect",
            Lmcache::FsNative => "fs_native",
            Lmcache::FsNativeOdirect => "fs_native_odirect",
        }
    }

    /// The driver's `--side`.
    fn adapter(self) -> &'static str {
        match self {
            Lmcache::Fs | Lmcache::FsOdirect => "fs",
            Lmcache::FsNative | Lmcache::FsNativeOdirect => "fs_native",
        }
    }

    fn odirect(self) -> bool {
        matches!(self, Lmcache::FsOdirect | Lmcache::FsNativeOdirect)
    }

    /// What an acknowledged put has done with the bytes (read in LMCache
    /// 0.5.6: connectors/lmcache/NOTES.md section 3).
    fn durability(self) -> &'static str {
        match self {
            Lmcache::Fs => {
                "page cache: each chunk is written to <key>.tmp through aiofiles (buffered), then os.replace'd \
                 to <key>.data; no fsync anywhere, so an acknowledged chunk may be only in RAM until the \
                 kernel writes it back; files are found again after a restart"
            }
            Lmcache::FsOdirect => {
                "O_DIRECT: each chunk is os.write'n to <key>.tmp opened O_DIRECT, then os.replace'd; no \
                 fsync (the file's metadata and the rename are in the page cache, the device's volatile \
                 cache is not flushed)"
            }
            Lmcache::FsNative => "page cache: C++ workers write a temp file (buffered) and rename it; no fsync",
            Lmcache::FsNativeOdirect => {
                "O_DIRECT: C++ workers write a temp file opened O_DIRECT (buffers padded to the L1 \
                 alignment) and rename it; no fsync"
            }
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Python with lmcache 0.5.6 and the kvtier wheel (default: the venv
    /// scripts/lmcache-env.sh makes, or $KVTIER_LMCACHE_VENV).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Directory on the disk under test: kvtierd's data, LMCache's files
    /// and the raw reference's files all go under it.
    #[arg(long, default_value = "target/bench-lmcache")]
    dir: PathBuf,
    /// Bytes put and got by each side per round, in GB (1e9 bytes); whole
    /// chunks.
    #[arg(long, default_value_t = 8.0)]
    working_set_gb: f64,
    /// LMCache chunk in MiB: 256 tokens of Llama-3-8B KV in fp16 (32 layers,
    /// K and V, 8 KV heads of 128) is 32 MiB.
    #[arg(long, default_value_t = 32)]
    chunk_mib: usize,
    /// Tasks outstanding at once, on every side and in the raw reference.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Chunks per store or load task.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Every Nth chunk got back is compared byte for byte with what was
    /// put (every chunk's headers are checked).
    #[arg(long, default_value_t = 8)]
    verify_every: usize,
    /// Rounds of every side and the raw reference (at most 10).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure kvtier embedded in LMCache's process (`disk_dir`: the
    /// same SSD-only store without kvtierd), to show what the daemon hop
    /// costs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    embedded: bool,
    /// LMCache's disk adapters measured, in order; the first one's figures
    /// are the `lmcache_disk_*` ones.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fs,fs-odirect,fs-native,fs-native-odirect"
    )]
    lmcache: Vec<Lmcache>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A short run with a few 1 MiB chunks, for CI: checks invariants, not
    /// goals.
    #[arg(long)]
    smoke: bool,
}

/// kvtier against LMCache's disk: put and get GB/s above 1, p99 below 1.
const GOAL_VS_LMCACHE: f64 = 1.0;
/// kvtier against raw O_DIRECT, both ways.
const GOAL_VS_RAW: f64 = 0.85;
/// The longest one side may run in one round, full size and smoke.
const SIDE_LIMIT_S: u64 = 900;
const SMOKE_SIDE_LIMIT_S: u64 = 60;
const MAX_ROUNDS: usize = 10;
/// Seeds the raw reference's buffers.
const RAW_SEED: u64 = 0x5eed;

fn lmcache_python() -> PathBuf {
    if let Some(v) = std::env::var_os("KVTIER_LMCACHE_VENV") {
        return PathBuf::from(v).join("bin/python");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/kvtier/venv-lmcache-0.5.6/bin/python")
}

/// The run's sizes after `--smoke`.
struct Plan {
    chunk_bytes: usize,
    chunks: usize,
    in_flight: usize,
    batch: usize,
    verify_every: usize,
    rounds: usize,
    side_limit: Duration,
}

impl Plan {
    fn of(a: &Args) -> kvtier::Result<Self> {
        if a.smoke {
            return Ok(Self {
                chunk_bytes: 1 << 20,
                chunks: 16,
                in_flight: 2,
                batch: 2,
                verify_every: 1,
                rounds: 1,
                side_limit: Duration::from_secs(SMOKE_SIDE_LIMIT_S),
            });
        }
        let bad = |m: String| crate::fail(kvtier::ErrorKind::InvalidArgument, m);
        let chunk_bytes = a.chunk_mib << 20;
        if chunk_bytes == 0 {
            return Err(bad("--chunk-mib 0: at least 1".into()));
        }
        if !(a.working_set_gb.is_finite() && a.working_set_gb > 0.0) {
            return Err(bad(format!("--working-set-gb {}: above 0", a.working_set_gb)));
        }
        if !(1..=MAX_ROUNDS).contains(&a.rounds) {
            return Err(bad(format!("--rounds {}: 1 to {MAX_ROUNDS}", a.rounds)));
        }
        let chunks = (a.working_set_gb * 1e9 / chunk_bytes as f64) as usize;
        if chunks < a.in_flight.max(1) * a.batch.max(1) {
            return Err(bad(format!(
                "--working-set-gb {} holds {chunks} chunks of {} MiB: fewer than --in-flight x --batch",
                a.working_set_gb, a.chunk_mib
            )));
        }
        Ok(Self {
            chunk_bytes,
            chunks,
            in_flight: a.in_flight.max(1),
            batch: a.batch.max(1),
            verify_every: a.verify_every.max(1),
            rounds: a.rounds,
            side_limit: Duration::from_secs(SIDE_LIMIT_S),
        })
    }

    fn bytes(&self) -> u64 {
        (self.chunks * self.chunk_bytes) as u64
    }
}

/// kvtier's SSD budget: the working set and a quarter more.
fn disk_capacity_bytes(plan: &Plan) -> u64 {
    (plan.bytes() + plan.bytes() / 4 + (1 << 30)).max(2 << 30)
}

/// kvtierd's settings: SSD-only, room for the working set, requests and
/// in-flight bytes for the tasks the driver keeps outstanding.
fn daemon_env(plan: &Plan) -> Vec<(&'static str, String)> {
    // A chunk's record: the chunk and kvtier's header, padded to a page.
    let record = (plan.chunk_bytes + 4096) as u64;
    let requests = (plan.in_flight * plan.batch) as u64 * record;
    vec![
        ("KVTIER_MODE", "ssd-only".to_string()),
        ("KVTIER_DISK_CAPACITY_BYTES", disk_capacity_bytes(plan).to_string()),
        (
            "KVTIER_MAX_REQUEST_BYTES",
            (plan.batch as u64 * record).max(256 << 20).to_string(),
        ),
        ("KVTIER_MAX_INFLIGHT_BYTES", (2 * requests).max(1 << 30).to_string()),
    ]
}

/// GB/s of one raw round.
struct Raw {
    write: f64,
    read: f64,
    /// The same files read through the page cache.
    buffered_read: f64,
}

/// Drops the page cache, as the driver does before a get phase: sync, then
/// drop_caches when allowed (root), else POSIX_FADV_DONTNEED on `files`.
fn drop_page_cache(files: &[std::fs::File]) {
    // SAFETY: sync(2) takes no arguments and always succeeds.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "1").is_err() {
        for f in files {
            // SAFETY: fadvise on a descriptor `f` owns, for its whole length.
            unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// GB/s of `op` over a working set of `n` chunks of `size` moved by one
/// thread per buffer: thread t moves chunks t, t + depth, ...; `op` gets
/// the thread, the chunk, which of the thread's chunks it is, and the
/// thread's buffer.
fn timed(
    bufs: &mut [AlignedBuf],
    n: usize,
    size: usize,
    op: impl Fn(usize, usize, usize, &mut AlignedBuf) -> std::io::Result<()> + Sync,
) -> std::io::Result<f64> {
    let depth = bufs.len();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let op = &op;
        let threads: Vec<_> = (bufs.iter_mut().enumerate())
            .map(|(t, b)| s.spawn(move || (t..n).step_by(depth).enumerate().try_for_each(|(j, i)| op(t, i, j, b))))
            .collect();
        threads.into_iter().try_for_each(|h| h.join().expect("raw disk thread"))
    })?;
    Ok(gbps(n * size, t0.elapsed().as_secs_f64()))
}

/// Opens `p` for reading, and with `direct` creates it for O_DIRECT writes too.
fn open_raw(p: &Path, direct: bool) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.create(true).truncate(true).write(true).custom_flags(libc::O_DIRECT);
    }
    o.open(p)
}

/// The raw references, at the sides' depth (`plan.in_flight` threads, each
/// with its own page-aligned chunk buffer), each read after the page cache
/// was dropped as the sides' gets are:
/// - O_DIRECT writes, then reads, of `plan.chunks` chunks, each thread
///   through a new file of its own (one file for all would serialize the
///   writes that extend it): the streams a log-structured store writes;
/// - buffered reads of the same chunks as a file each (written with
///   O_DIRECT, untimed), in the same order: the way LMCache's buffered
///   adapters read, with the kernel's readahead.
fn raw_round(dir: &Path, plan: &Plan) -> kvtier::Result<Raw> {
    let (size, n, depth) = (plan.chunk_bytes, plan.chunks, plan.in_flight);
    let io = |p: &Path, e| kvtier::Error::io(format!("raw disk {}", p.display()), e);
    let paths: Vec<PathBuf> = (0..depth).map(|t| dir.join(format!("raw-odirect-{t}.dat"))).collect();
    let files = paths
        .iter()
        .map(|p| open_raw(p, true).map_err(|e| io(p, e)))
        .collect::<kvtier::Result<Vec<_>>>()?;
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|t| {
            let mut b = AlignedBuf::new(size);
            fill(&mut b, RAW_SEED + t as u64);
            b
        })
        .collect();
    let at = |j: usize| (j * size) as u64;
    let write = timed(&mut bufs, n, size, |t, _, j, b| files[t].write_all_at(b, at(j))).map_err(|e| io(dir, e))?;
    drop_page_cache(&files);
    let read = timed(&mut bufs, n, size, |t, _, j, b| files[t].read_exact_at(b, at(j))).map_err(|e| io(dir, e))?;
    drop(files);
    for p in &paths {
        std::fs::remove_file(p).map_err(|e| io(p, e))?;
    }
    let chunk = |i: usize| dir.join(format!("raw-chunk-{i}.dat"));
    timed(&mut bufs, n, size, |_, i, _, b| {
        open_raw(&chunk(i), true)?.write_all_at(b, 0)
    })
    .map_err(|e| io(dir, e))?;
    drop_page_cache(&[]);
    let buffered_read = timed(&mut bufs, n, size, |_, i, _, b| {
        open_raw(&chunk(i), false)?.read_exact_at(b, 0)
    })
    .map_err(|e| io(dir, e))?;
    // The last chunk each thread read back holds what it wrote.
    for (t, b) in bufs.iter().enumerate() {
        if !is_filled(b, RAW_SEED + t as u64) {
            return Err(err(format!("raw disk: thread {t}'s chunks came back altered")));
        }
    }
    for i in 0..n {
        std::fs::remove_file(chunk(i)).map_err(|e| io(&chunk(i), e))?;
    }
    // SAFETY: sync(2) takes no arguments and always succeeds.
    unsafe { libc::sync() };
    Ok(Raw {
        write,
        read,
        buffered_read,
    })
}

/// Runs the driver for one side and round; its JSON object.
fn run_side(python: &Path, plan: &Plan, side: &str, round: usize, extra: &[String]) -> kvtier::Result<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lmcache_bench.py");
    let num = |n: usize| n.to_string();
    let mut cmd = Command::new(python);
    cmd.env("LMCACHE_TRACK_USAGE", "false")
        .arg(&script)
        .args(["--side", side, "--seed", &num(round + 1)])
        .args(["--chunk-bytes", &num(plan.chunk_bytes), "--chunks", &num(plan.chunks)])
        .args(["--in-flight", &num(plan.in_flight), "--batch", &num(plan.batch)])
        .args(["--verify-every", &num(plan.verify_every)])
        .args(["--deadline-s", &plan.side_limit.as_secs().to_string()])
        .args(extra);
    // Python and LMCache start within the margin.
    let (status, stdout, stderr) = run_bounded(cmd, plan.side_limit + Duration::from_secs(60))?;
    if !status.success() {
        let lines: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(err(format!(
            "{} {} --side {side} {} failed ({status}):\n{tail}",
            python.display(),
            script.display(),
            extra.join(" ")
        )));
    }
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(last).map_err(|e| err(format!("lmcache_bench.py --side {side} output: {e}")))
}

/// One round of kvtier: a fresh SSD-only kvtierd in `dir/kvtierd`, removed after.
fn kvtier_round(python: &Path, plan: &Plan, dir: &Path, round: usize) -> kvtier::Result<Value> {
    let kv_dir = dir.join("kvtierd");
    let daemon = start_daemon(&kv_dir, &daemon_env(plan))?;
    let r = run_side(
        python,
        plan,
        "kvtier",
        round,
        &[
            "--endpoint".into(),
            daemon.endpoint(),
            "--daemon-pid".into(),
            daemon.pid().to_string(),
            "--drop-dirs".into(),
            kv_dir.display().to_string(),
        ],
    );
    drop(daemon);
    remove_and_settle(&kv_dir);
    r
}

/// One round of kvtier embedded in the driver's process, its SSD-only
/// store in `dir/kvtier-embedded`, removed after.
fn embedded_round(python: &Path, plan: &Plan, dir: &Path, round: usize) -> kvtier::Result<Value> {
    let d = dir.join("kvtier-embedded").display().to_string();
    let extra = [
        "--dir".into(),
        d.clone(),
        "--disk-capacity-bytes".into(),
        disk_capacity_bytes(plan).to_string(),
        "--drop-dirs".into(),
        d.clone(),
    ];
    let r = run_side(python, plan, "kvtier_embedded", round, &extra);
    remove_and_settle(Path::new(&d));
    r
}

/// One round of LMCache's adapter `v` in `dir/lmcache-<v>`, removed after.
fn lmcache_round(python: &Path, plan: &Plan, dir: &Path, v: Lmcache, round: usize) -> kvtier::Result<Value> {
    let d = dir.join(format!("lmcache-{}", v.name())).display().to_string();
    let mut extra = vec!["--dir".into(), d.clone(), "--drop-dirs".into(), d.clone()];
    if v.odirect() {
        extra.push("--odirect".into());
    }
    let r = run_side(python, plan, v.adapter(), round, &extra);
    remove_and_settle(Path::new(&d));
    r
}

/// Removes `dir` and waits for the removal to reach the disk: on a
/// `discard` mount each unlinked extent is trimmed when the journal commits,
/// and trimming gigabytes would slow the next side's measurement.
pub(crate) fn remove_and_settle(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    // SAFETY: sync(2) takes no arguments and always succeeds.
    unsafe { libc::sync() };
}

/// The 1-minute load average from /proc/loadavg; -1 when unreadable.
pub(crate) fn load_avg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// MemTotal from /proc/meminfo, in bytes; 0 when unreadable.
fn mem_total_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    let plan = Plan::of(a)?;
    if a.lmcache.is_empty() {
        return Err(crate::fail(
            kvtier::ErrorKind::InvalidArgument,
            "--lmcache names no adapter",
        ));
    }
    let python = a.python.clone().unwrap_or_else(lmcache_python);
    if !python.exists() {
        return Err(crate::fail(
            kvtier::ErrorKind::NotFound,
            format!(
                "no LMCache venv: {} is missing (scripts/lmcache-env.sh makes it; scripts/python-test.sh installs \
                 the kvtier wheel into it)",
                python.display()
            ),
        ));
    }
    fresh_dir(&a.dir)?;
    if !direct_io_works(&a.dir) {
        return Err(crate::fail(
            kvtier::ErrorKind::InvalidArgument,
            format!(
                "{} takes no O_DIRECT files (a tmpfs?): give --dir on a disk",
                a.dir.display()
            ),
        ));
    }
    let mut raws = vec![];
    let mut kv = vec![];
    let mut embedded = vec![];
    let mut lm: Vec<Vec<Value>> = vec![vec![]; a.lmcache.len()];
    // The machine's load before each step: other work on it skews figures.
    let mut loads = vec![];
    for round in 0..plan.rounds {
        loads.push(load_avg_1m());
        raws.push(raw_round(&a.dir, &plan)?);
        loads.push(load_avg_1m());
        kv.push(kvtier_round(&python, &plan, &a.dir, round)?);
        if a.embedded {
            loads.push(load_avg_1m());
            embedded.push(embedded_round(&python, &plan, &a.dir, round)?);
        }
        for (runs, v) in lm.iter_mut().zip(&a.lmcache) {
            loads.push(load_avg_1m());
            runs.push(lmcache_round(&python, &plan, &a.dir, *v, round)?);
        }
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    let kv = Side::of(&kv)?;
    let embedded = if a.embedded { Some(Side::of(&embedded)?) } else { None };
    let lm = a
        .lmcache
        .iter()
        .zip(&lm)
        .map(|(v, runs)| Ok((*v, Side::of(runs)?)))
        .collect::<kvtier::Result<Vec<_>>>()?;
    let mut v = figures(a, &plan, &python, &raws, (&kv, embedded.as_ref()), &lm);
    v["load_avg_1m_before_each_step"] = json!(loads);
    report(&v, a.json, a.smoke.then_some(check_smoke))
}

/// One side over the rounds, from its driver's outputs.
struct Side {
    put: Vec<f64>,
    get: Vec<f64>,
    put_incl_sync: Vec<f64>,
    sync_s: Vec<f64>,
    put_cpu_s_per_gb: Vec<f64>,
    get_cpu_s_per_gb: Vec<f64>,
    /// Every task's latency, every round.
    put_us: Vec<f64>,
    get_us: Vec<f64>,
    verified_headers: u64,
    verified_full: u64,
    dropped: bool,
    drop_method: Value,
    adapter: Value,
    lmcache: Value,
    /// KvTierL2's transport in each round (null for LMCache's adapters).
    transport: Vec<Value>,
}

impl Side {
    fn of(runs: &[Value]) -> kvtier::Result<Self> {
        let mut s = Side {
            put: vec![],
            get: vec![],
            put_incl_sync: vec![],
            sync_s: vec![],
            put_cpu_s_per_gb: vec![],
            get_cpu_s_per_gb: vec![],
            put_us: vec![],
            get_us: vec![],
            verified_headers: 0,
            verified_full: 0,
            dropped: true,
            drop_method: runs[0]["drop_method"].clone(),
            adapter: runs[0]["adapter"].clone(),
            lmcache: runs[0]["lmcache"].clone(),
            transport: vec![],
        };
        for raw in runs {
            let f = |k: &str| {
                raw[k]
                    .as_f64()
                    .ok_or_else(|| err(format!("lmcache_bench.py output: {k} missing")))
            };
            let list = |k: &str| -> kvtier::Result<Vec<f64>> {
                raw[k]
                    .as_array()
                    .map(|v| v.iter().filter_map(Value::as_f64).collect())
                    .ok_or_else(|| err(format!("lmcache_bench.py output: {k} missing")))
            };
            let gb = f("bytes")? / 1e9;
            s.put.push(gb / f("put_s")?);
            s.get.push(gb / f("get_s")?);
            s.put_incl_sync.push(gb / (f("put_s")? + f("sync_s")?));
            s.sync_s.push(f("sync_s")?);
            s.put_cpu_s_per_gb.push(f("put_cpu_s")? / gb);
            s.get_cpu_s_per_gb.push(f("get_cpu_s")? / gb);
            s.put_us.extend(list("put_latency_us")?);
            s.get_us.extend(list("get_latency_us")?);
            s.verified_headers += raw["verified_header_chunks"].as_u64().unwrap_or(0);
            s.verified_full += raw["verified_full_chunks"].as_u64().unwrap_or(0);
            s.dropped &= raw["page_cache_dropped"] == json!(true);
            s.transport.push(raw["kvtier_transport"].clone());
        }
        Ok(s)
    }

    fn put_gbps(&self) -> f64 {
        median(self.put.clone())
    }

    fn get_gbps(&self) -> f64 {
        median(self.get.clone())
    }

    fn get_p99_us(&self) -> f64 {
        percentile(&mut self.get_us.clone(), 99.0)
    }

    /// The side's figures, with ratios against the raw reference.
    fn json(&self, r: &Raw) -> Value {
        let pct = |v: &[f64], p| round3(percentile(&mut v.to_vec(), p));
        let rounds = |v: &[f64]| v.iter().map(|x| round3(*x)).collect::<Vec<_>>();
        json!({
            "put_gbps": round3(self.put_gbps()),
            "get_gbps": round3(self.get_gbps()),
            "get_p99_us": pct(&self.get_us, 99.0),
            "get_p50_us": pct(&self.get_us, 50.0),
            "get_max_us": pct(&self.get_us, 100.0),
            "put_p99_us": pct(&self.put_us, 99.0),
            "put_p50_us": pct(&self.put_us, 50.0),
            "put_vs_raw": ratio(self.put_gbps(), r.write),
            "get_vs_raw": ratio(self.get_gbps(), r.read),
            "sync_after_put_s": round3(median(self.sync_s.clone())),
            "put_incl_sync_gbps": round3(median(self.put_incl_sync.clone())),
            "put_cpu_s_per_gb": round3(median(self.put_cpu_s_per_gb.clone())),
            "get_cpu_s_per_gb": round3(median(self.get_cpu_s_per_gb.clone())),
            "page_cache_dropped": self.dropped,
            "drop_method": self.drop_method,
            "verified_header_chunks": self.verified_headers,
            "verified_full_chunks": self.verified_full,
            "tasks": self.get_us.len(),
            "adapter": self.adapter,
            "kvtier_transport_per_round": self.transport,
            "per_round": {
                "put_gbps": rounds(&self.put),
                "get_gbps": rounds(&self.get),
                "put_cpu_s_per_gb": rounds(&self.put_cpu_s_per_gb),
                "get_cpu_s_per_gb": rounds(&self.get_cpu_s_per_gb),
            },
        })
    }
}

/// Adds `line` (the measurement that shows why) to `unmet` unless `holds`.
fn verdict(unmet: &mut Vec<String>, holds: bool, line: String) {
    if !holds {
        unmet.push(line);
    }
}

/// kvtier against one LMCache adapter: what is not ahead.
fn against(kv: &Side, lm: &Side, name: &str, r: &Raw) -> Vec<String> {
    let mut unmet = vec![];
    let (kp, lp, kg, lg) = (kv.put_gbps(), lm.put_gbps(), kv.get_gbps(), lm.get_gbps());
    verdict(
        &mut unmet,
        kp > GOAL_VS_LMCACHE * lp,
        format!(
            "put: kvtier {kp:.3} GB/s, not ahead of LMCache {name} {lp:.3} GB/s (raw O_DIRECT write {:.3}; CPU s/GB \
             kvtier {:.2}, {name} {:.2})",
            r.write,
            median(kv.put_cpu_s_per_gb.clone()),
            median(lm.put_cpu_s_per_gb.clone())
        ),
    );
    verdict(
        &mut unmet,
        kg > GOAL_VS_LMCACHE * lg,
        format!(
            "get: kvtier {kg:.3} GB/s, not ahead of LMCache {name} {lg:.3} GB/s (raw O_DIRECT read {:.3}, raw \
             buffered read {:.3}; CPU s/GB kvtier {:.2}, {name} {:.2})",
            r.read,
            r.buffered_read,
            median(kv.get_cpu_s_per_gb.clone()),
            median(lm.get_cpu_s_per_gb.clone())
        ),
    );
    let (k99, l99) = (kv.get_p99_us(), lm.get_p99_us());
    verdict(
        &mut unmet,
        k99 < l99,
        format!(
            "get p99: kvtier {k99:.0} us, not below LMCache {name} {l99:.0} us (p50 {:.0} and {:.0} us)",
            percentile(&mut kv.get_us.clone(), 50.0),
            percentile(&mut lm.get_us.clone(), 50.0)
        ),
    );
    unmet
}

fn figures(
    a: &Args,
    plan: &Plan,
    python: &Path,
    raws: &[Raw],
    (kv, embedded): (&Side, Option<&Side>),
    lm: &[(Lmcache, Side)],
) -> Value {
    let r = Raw {
        write: median(raws.iter().map(|x| x.write).collect()),
        read: median(raws.iter().map(|x| x.read).collect()),
        buffered_read: median(raws.iter().map(|x| x.buffered_read).collect()),
    };
    let (head, hs) = (&lm[0].0, &lm[0].1);
    let mut variants = Map::new();
    for (v, s) in lm {
        let mut j = s.json(&r);
        j["durability"] = json!(v.durability());
        j["kvtier_vs_put"] = ratio(kv.put_gbps(), s.put_gbps());
        j["kvtier_vs_get"] = ratio(kv.get_gbps(), s.get_gbps());
        j["kvtier_get_p99_vs"] = ratio(kv.get_p99_us(), s.get_p99_us());
        variants.insert(v.name().into(), j);
    }
    let mut unmet = against(kv, hs, head.name(), &r);
    let emb = |f: fn(&Side) -> f64, raw_x: f64| {
        embedded.map_or(String::new(), |e| {
            format!(
                "; kvtier embedded in LMCache's process, without kvtierd: {:.3} GB/s, {:.3} of raw",
                f(e),
                f(e) / raw_x
            )
        })
    };
    for (what, x, raw_x, f) in [
        ("put", kv.put_gbps(), r.write, Side::put_gbps as fn(&Side) -> f64),
        ("get", kv.get_gbps(), r.read, Side::get_gbps),
    ] {
        verdict(
            &mut unmet,
            x >= GOAL_VS_RAW * raw_x,
            format!(
                "{what}: kvtier {x:.3} GB/s is {:.3} of raw O_DIRECT {raw_x:.3} GB/s (goal {GOAL_VS_RAW}{})",
                x / raw_x,
                emb(f, raw_x)
            ),
        );
    }
    let unmet_others: Vec<String> = lm[1..].iter().flat_map(|(v, s)| against(kv, s, v.name(), &r)).collect();
    let best = |f: fn(&Side) -> f64| lm.iter().map(|(_, s)| f(s)).fold(f64::NAN, f64::max);
    let best_p99 = lm.iter().map(|(_, s)| s.get_p99_us()).fold(f64::NAN, f64::min);
    let mem = mem_total_bytes();
    let kv_j = kv.json(&r);
    let dropped = kv.dropped && lm.iter().all(|(_, s)| s.dropped);
    let mut out = json!({
        "bench": "lmcache",
        "smoke": a.smoke,
        "python": python.display().to_string(),
        "lmcache_version": kv.lmcache,
        "dir": a.dir.display().to_string(),
        "chunk_bytes": plan.chunk_bytes,
        "chunk_shape": if plan.chunk_bytes == 32 << 20 {
            "256 tokens of Llama-3-8B KV, fp16: 32 layers x K,V x 8 KV heads x 128 x 2 bytes"
        } else {
            "not the Llama-3-8B chunk (--chunk-mib, or --smoke)"
        },
        "chunks": plan.chunks,
        "rounds": plan.rounds,
        "working_set_bytes": plan.bytes(),
        "mem_total_bytes": mem,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "working_set_exceeds_memory": plan.bytes() > mem,
        "page_cache_dropped": dropped,
        "in_flight": plan.in_flight,
        "chunks_per_task": plan.batch,
        "verify_every": plan.verify_every,
        "raw_disk_write_gbps": round3(r.write),
        "raw_disk_read_gbps": round3(r.read),
        "raw_disk_buffered_read_gbps": round3(r.buffered_read),
        "kvtier_put_gbps": kv_j["put_gbps"],
        "kvtier_get_gbps": kv_j["get_gbps"],
        "kvtier_get_p99_us": kv_j["get_p99_us"],
        "lmcache_disk": head.name(),
        "lmcache_disk_put_gbps": round3(hs.put_gbps()),
        "lmcache_disk_get_gbps": round3(hs.get_gbps()),
        "lmcache_disk_get_p99_us": round3(hs.get_p99_us()),
        "kvtier_put_vs_raw": ratio(kv.put_gbps(), r.write),
        "kvtier_get_vs_raw": ratio(kv.get_gbps(), r.read),
        "lmcache_disk_put_vs_raw": ratio(hs.put_gbps(), r.write),
        "lmcache_disk_get_vs_raw": ratio(hs.get_gbps(), r.read),
        "kvtier_vs_lmcache_put": ratio(kv.put_gbps(), hs.put_gbps()),
        "kvtier_vs_lmcache_get": ratio(kv.get_gbps(), hs.get_gbps()),
        "kvtier_get_p99_vs_lmcache": ratio(kv.get_p99_us(), hs.get_p99_us()),
        "kvtier_vs_best_lmcache_put": ratio(kv.put_gbps(), best(Side::put_gbps)),
        "kvtier_vs_best_lmcache_get": ratio(kv.get_gbps(), best(Side::get_gbps)),
        "kvtier_get_p99_vs_best_lmcache": ratio(kv.get_p99_us(), best_p99),
    });
    let more = json!({
        "goals": {
            "kvtier_vs_lmcache_put_above": GOAL_VS_LMCACHE,
            "kvtier_vs_lmcache_get_above": GOAL_VS_LMCACHE,
            "kvtier_get_p99_vs_lmcache_below": 1.0,
            "kvtier_vs_raw_min": GOAL_VS_RAW,
            "met": unmet.is_empty(),
            "unmet": unmet,
            "met_against_every_lmcache_variant": unmet_others.is_empty(),
            "unmet_against_other_variants": unmet_others,
        },
        "durability": {
            "kvtier": "O_DIRECT: kvtierd SSD-only (no host cache) writes each chunk as a checksummed record into \
                       log-structured segment files opened O_DIRECT and acknowledges when the write returned; no \
                       fsync (disk.sync_writes = false, kvtierd's default: the device's volatile cache is not \
                       flushed); the index is rebuilt from the segments, so chunks survive a kvtierd restart",
            "lmcache_disk": head.durability(),
        },
        "kvtier": {
            "component": "kvtier.lmcache.KvTierL2 (native_plugin, io_threads 4, shm_dir /dev/shm) in LMCache's \
                          NativeConnectorL2Adapter, keys over gRPC to kvtierd on 127.0.0.1 (mode ssd-only), bytes \
                          through shared-memory regions when kvtier_transport_per_round says regions",
            "kvtierd_env": daemon_env(plan).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "figures": kv_j,
        },
        "lmcache_variants": variants,
        "kvtier_embedded": embedded.map(|e| json!({
            "component": "kvtier.lmcache.KvTierL2 with disk_dir (an SSD-only kvtier store in LMCache's process, \
                          O_DIRECT, no kvtierd): a diagnostic of what the daemon hop costs, not a goal figure",
            "figures": e.json(&r),
        })),
        "raw_disk": {
            "how": "in_flight threads (the sides' depth), whole chunks: write_gbps, read_gbps: O_DIRECT, each \
                    thread through a new file of its own in --dir, read after sync and a page-cache drop as the \
                    sides' gets are; buffered_read_gbps: the same chunks as a file each, read without O_DIRECT \
                    after the drop, as LMCache's buffered adapters read; medians over the rounds, one at the start \
                    of each",
            "write_gbps_per_round": raws.iter().map(|x| round3(x.write)).collect::<Vec<_>>(),
            "read_gbps_per_round": raws.iter().map(|x| round3(x.read)).collect::<Vec<_>>(),
            "buffered_read_gbps_per_round": raws.iter().map(|x| round3(x.buffered_read)).collect::<Vec<_>>(),
        },
        "how": {
            "driver": "bench/lmcache_bench.py in the LMCache venv, one process per side and round: the adapter as \
                       `lmcache server --l2-adapter JSON` builds it (parse_args_to_l2_adapters_config + \
                       create_l2_adapter), real TensorMemoryObj chunks in 4 KiB-aligned CPU memory",
            "put_gbps": "working set / time from the first store submit to the last completion, in_flight tasks of \
                         chunks_per_task chunks outstanding; median over the rounds",
            "get_gbps": "the same for loads, in a shuffled order, after sync and a page-cache drop",
            "get_p99_us": "per load task, submit to its completion seen on the adapter's event fd; nearest rank over \
                           every task of every round",
            "put_incl_sync_gbps": "working set / (put time + the sync that followed it): the bytes on the device",
            "cpu_s_per_gb": "CPU seconds of the driver process (the adapter's and the L2's threads) and, for kvtier, \
                             of kvtierd, per GB moved",
            "page_cache": "every side: sync, then the page cache dropped between its put and get phases \
                           (drop_method); raw and kvtierd use O_DIRECT",
        },
    });
    for (k, x) in more.as_object().expect("an object") {
        out[k] = x.clone();
    }
    if let Some(e) = embedded {
        out["kvtier_embedded_put_gbps"] = json!(round3(e.put_gbps()));
        out["kvtier_embedded_get_gbps"] = json!(round3(e.get_gbps()));
        out["kvtier_embedded_get_p99_us"] = json!(round3(e.get_p99_us()));
        out["kvtier_embedded_put_vs_raw"] = ratio(e.put_gbps(), r.write);
        out["kvtier_embedded_get_vs_raw"] = ratio(e.get_gbps(), r.read);
    }
    out
}

fn check_smoke(v: &Value) -> kvtier::Result<()> {
    let c = Invariants::of("lmcache --smoke", v);
    let chunks = c.u("/chunks")? * c.u("/rounds")?;
    for k in [
        "raw_disk_write_gbps",
        "raw_disk_read_gbps",
        "raw_disk_buffered_read_gbps",
    ] {
        let x = c.f(&format!("/{k}"))?;
        c.ensure(x > 0.0, || format!("{k} {x} > 0"))?;
    }
    let mut sides = vec!["/kvtier/figures".to_string()];
    if v["kvtier_embedded"].is_object() {
        sides.push("/kvtier_embedded/figures".into());
    }
    if let Some(m) = v["lmcache_variants"].as_object() {
        sides.extend(m.keys().map(|k| format!("/lmcache_variants/{k}")));
    }
    c.ensure(sides.len() > 1, || "lmcache_variants is not empty".into())?;
    for s in &sides {
        for k in ["verified_header_chunks", "verified_full_chunks"] {
            let n = c.u(&format!("{s}/{k}"))?;
            c.ensure(n == chunks, || {
                format!("{s}/{k} {n} == chunks x rounds {chunks}: every chunk came back as put")
            })?;
        }
        for k in ["put_gbps", "get_gbps", "get_p99_us"] {
            let x = c.f(&format!("{s}/{k}"))?;
            c.ensure(x > 0.0, || format!("{s}/{k} {x} > 0"))?;
        }
        let (p50, p99) = (c.f(&format!("{s}/get_p50_us"))?, c.f(&format!("{s}/get_p99_us"))?);
        c.ensure(p50 <= p99, || format!("{s}/get_p50_us {p50} <= get_p99_us {p99}"))?;
        let transport = c.get(&format!("{s}/kvtier_transport_per_round"))?;
        let want: &[&str] = match s.as_str() {
            "/kvtier/figures" => &["regions", "socket"],
            "/kvtier_embedded/figures" => &["embedded"],
            _ => &[],
        };
        let ok = transport.as_array().is_some_and(|t| {
            t.iter()
                .all(|x| x.as_str().map_or(want.is_empty(), |x| want.contains(&x)))
        });
        c.ensure(ok, || format!("{s}/kvtier_transport_per_round {transport} in {want:?}"))?;
        let dropped = c.get(&format!("{s}/page_cache_dropped"))?;
        c.ensure(dropped == &json!(true), || {
            format!("{s}/page_cache_dropped {dropped}: the get phase read the device")
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_of_llama_8b_is_32_mib() {
        // 256 tokens x 32 layers x K,V x 8 KV heads x 128 x fp16.
        assert_eq!(256 * 32 * 2 * 8 * 128 * 2, 32 << 20);
    }

    #[test]
    fn each_variant_names_its_adapter_and_durability() {
        for v in [
            Lmcache::Fs,
            Lmcache::FsOdirect,
            Lmcache::FsNative,
            Lmcache::FsNativeOdirect,
        ] {
            assert!(v.name().starts_with(v.adapter()));
            assert_eq!(v.odirect(), v.name().ends_with("odirect"));
            assert_eq!(v.durability().starts_with("O_DIRECT"), v.odirect());
        }
    }

    fn run(put_s: f64, get_s: f64, lat: &[f64]) -> Value {
        json!({
            "bytes": 2e9, "put_s": put_s, "get_s": get_s, "sync_s": 0.0, "put_cpu_s": 1.0, "get_cpu_s": 2.0,
            "put_latency_us": lat, "get_latency_us": lat, "verified_header_chunks": 2,
            "verified_full_chunks": 1, "page_cache_dropped": true,
        })
    }

    #[test]
    fn a_side_takes_medians_over_rounds_and_percentiles_over_every_task() {
        let s = Side::of(&[run(1.0, 2.0, &[1.0, 2.0]), run(2.0, 4.0, &[3.0]), run(4.0, 1.0, &[4.0])]).unwrap();
        assert_eq!(s.put_gbps(), 1.0);
        assert_eq!(s.get_gbps(), 1.0);
        assert_eq!(s.get_p99_us(), 4.0);
        assert_eq!(s.verified_headers, 6);
        assert_eq!(median(s.get_cpu_s_per_gb.clone()), 1.0);
    }

    #[test]
    fn an_unmet_goal_says_what_was_measured() {
        let r = Raw {
            write: 2.0,
            read: 2.0,
            buffered_read: 2.0,
        };
        let kv = Side::of(&[run(2.0, 2.0, &[10.0])]).unwrap();
        let fast = Side::of(&[run(1.0, 1.0, &[5.0])]).unwrap();
        let unmet = against(&kv, &fast, "fs", &r);
        assert_eq!(unmet.len(), 3, "{unmet:?}");
        assert!(
            unmet[0].starts_with("put: kvtier 1.000 GB/s, not ahead of LMCache fs 2.000 GB/s"),
            "{unmet:?}"
        );
        assert!(
            unmet[2].contains("kvtier 10 us, not below LMCache fs 5 us"),
            "{unmet:?}"
        );
        let slow = Side::of(&[run(4.0, 4.0, &[20.0])]).unwrap();
        assert!(against(&kv, &slow, "fs", &r).is_empty());
    }
}
