//! `kvtier-bench s3`: kvtierd's S3 listener against raw loopback TCP of the
//! same bytes, and against kvtierd's own gRPC shared-memory region path,
//! in one run, on one kind of daemon (SSD-only unless `--mode tiered`, a
//! fresh one each round).
//!
//! The S3 side is a client of its own ([`client`]): HTTP/1.1 keep-alive
//! over std TCP, every request signed with `kvtier_s3::Signer`, several
//! connections with one request in flight each. Each round, on a fresh
//! kvtierd whose data directory is removed after it:
//!
//! - the references: a plain loopback TCP stream of the block objects'
//!   bytes (the daemon bench's `loopback_round`), and raw O_DIRECT writes
//!   and reads of them in the same directory (what the disk allows);
//! - block objects (2 MiB, a `blocks` bucket): PUT all, GET all into a
//!   zeroed buffer, then every byte and every ETag compared; HEAD latency;
//!   a key never written and one deleted are 404 NoSuchKey;
//! - one large object (256 MiB, an `objects` bucket) twice: as one PUT and
//!   as a multipart upload with parts in flight on several connections (the
//!   order alternates between rounds), then each read back and compared;
//! - the same block bytes through the gRPC shared-region path (`put_region`
//!   and `get_region`, as the daemon bench does).
//!
//! GB/s are medians over the rounds; CPU seconds per GB of kvtierd and of
//! this process (the client) are summed over the rounds from
//! `/proc/<pid>/stat`; they say what the cores allow when a goal is unmet.

mod client;

use kvtier::AlignedBuf;
use kvtier_client::SharedRegion;
use kvtier_s3::Signer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, loopback_round, region_round, session, start_daemon};
use crate::lmcache::{load_avg_1m, remove_and_settle};
use crate::tiers::raw_disk_round;
use crate::util::{
    Invariants, cpu_seconds, fill, fresh_dir, io_err as err, median, minor_faults, percentile, ratio, report, round3,
};
use client::Conn;

/// S3 put and get of block objects, against loopback TCP of the same bytes.
const GOAL_VS_LOOPBACK: f64 = 0.5;
/// A multipart upload, against single PUTs of the same bytes.
const GOAL_MULTIPART_VS_SINGLE: f64 = 0.8;
const BLOCKS_BUCKET: &str = "kv-blocks";
const OBJECTS_BUCKET: &str = "objects";
const ACCESS_KEY: &str = "bench";
const SECRET_KEY: &str = "bench-secret";
/// Smallest part S3 (and kvtierd) takes, but for the last one.
const MIN_PART_BYTES: usize = 5 << 20;
/// Chunk size of the `objects` bucket (kvtierd's default `chunk_bytes`).
const OBJECT_CHUNK_BYTES: usize = 8 << 20;

/// Which kvtierd serves: the default SSD-only one, or host RAM holding the
/// working set in front of the SSD (a diagnostic: the request path without
/// the disk under it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    SsdOnly,
    Tiered,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::SsdOnly => "ssd-only",
            Mode::Tiered => "tiered",
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory for the daemons' data and the raw disk reference.
    #[arg(long, default_value = "target/bench-s3")]
    dir: PathBuf,
    /// MiB of block objects per round (the working set).
    #[arg(long, default_value_t = 1024)]
    total_mib: usize,
    /// Size of a block object, in KiB.
    #[arg(long, default_value_t = 2048)]
    object_kib: usize,
    /// Connections, one request in flight on each (block objects and parts).
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Size of the large object, uploaded once whole and once by parts, in MiB.
    #[arg(long, default_value_t = 256)]
    multipart_mib: usize,
    /// Part size of the multipart upload, in MiB (at least 5).
    #[arg(long, default_value_t = 8)]
    part_mib: usize,
    /// HeadObject requests timed per round.
    #[arg(long, default_value_t = 2000)]
    heads: usize,
    /// Blocks per request of the gRPC region reference (as the daemon bench).
    #[arg(long, default_value_t = 8)]
    region_batch: usize,
    /// Rounds; each figure is the median over rounds, references included.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// kvtierd's mode: ssd-only (the default: the goals are judged on it) or
    /// tiered (host RAM in front; S3 objects still go straight to the SSD,
    /// as kvtierd acknowledges them only durably: the gRPC region
    /// reference then runs from host RAM).
    #[arg(long, value_enum, default_value_t = Mode::SsdOnly)]
    mode: Mode,
    /// Longest a phase (all the requests of one measurement) may take, in s.
    #[arg(long, default_value_t = 300)]
    phase_timeout_s: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds, small sizes, one round: checks the invariants (every byte
    /// back as put, HEAD sizes, 404 NoSuchKey, finite figures); figures are
    /// not goals.
    #[arg(long)]
    smoke: bool,
}

/// What one run moves, from the arguments (or the smoke's sizes).
#[derive(Debug, Clone)]
struct Plan {
    object_bytes: usize,
    objects: usize,
    big_bytes: usize,
    part_bytes: usize,
    in_flight: usize,
    heads: usize,
    batch: usize,
    rounds: usize,
    phase_timeout: Duration,
    mode: Mode,
}

impl Plan {
    fn of(a: &Args) -> kvtier::Result<Plan> {
        let (total, big, heads, rounds) = if a.smoke {
            (32usize << 20, 24usize << 20, 200, 1)
        } else {
            (a.total_mib << 20, a.multipart_mib << 20, a.heads, a.rounds)
        };
        let object_bytes = a.object_kib << 10;
        let part_bytes = a.part_mib << 20;
        let bad = |m: String| crate::fail(kvtier::ErrorKind::InvalidArgument, m);
        if object_bytes == 0 || !object_bytes.is_multiple_of(4096) || total < object_bytes {
            return Err(bad(format!(
                "--object-kib {} must be a multiple of 4 and at most --total-mib",
                a.object_kib
            )));
        }
        if part_bytes < MIN_PART_BYTES || part_bytes > big {
            return Err(bad(format!(
                "--part-mib {} must be 5 MiB or more and at most --multipart-mib",
                a.part_mib
            )));
        }
        if !(1..=64).contains(&a.in_flight) || heads == 0 || rounds == 0 || a.region_batch == 0 {
            return Err(bad(
                "--in-flight is 1 to 64; --heads, --rounds, --region-batch at least 1".into(),
            ));
        }
        Ok(Plan {
            object_bytes,
            objects: total / object_bytes,
            big_bytes: big,
            part_bytes,
            in_flight: a.in_flight,
            heads,
            batch: a.region_batch,
            rounds,
            phase_timeout: Duration::from_secs(a.phase_timeout_s.max(1)),
            mode: a.mode,
        })
    }

    /// Bytes of block objects per round.
    fn total(&self) -> usize {
        self.objects * self.object_bytes
    }

    fn parts(&self) -> usize {
        self.big_bytes.div_ceil(self.part_bytes)
    }

    /// The disk kvtierd gets: one round's S3 objects and region blocks, with
    /// room for the log's overhead.
    fn disk_capacity_bytes(&self) -> u64 {
        let round = 2 * self.total() + 2 * self.big_bytes;
        ((round as u64) * 3 / 2 + (256 << 20)).max(1 << 30)
    }
}

/// One timed measurement: bytes, seconds, CPU seconds of kvtierd and of
/// this process (the client) over it, and kvtierd's minor page faults.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    bytes: usize,
    secs: f64,
    daemon_cpu_s: f64,
    client_cpu_s: f64,
    daemon_faults: u64,
}

impl Phase {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
}

/// Runs `f` as one phase moving `bytes`, with kvtierd's (`pid`) and this
/// process's CPU time around it.
fn timed<T>(pid: Option<i32>, bytes: usize, f: impl FnOnce() -> kvtier::Result<T>) -> kvtier::Result<(T, Phase)> {
    let cpu = |p| cpu_seconds(p).unwrap_or(f64::NAN);
    let faults = || pid.and_then(|p| minor_faults(Some(p))).unwrap_or(0);
    let (d0, c0, f0) = (pid.map_or(0.0, |p| cpu(Some(p))), cpu(None), faults());
    let t = Instant::now();
    let v = f()?;
    let secs = t.elapsed().as_secs_f64();
    let (d1, c1, f1) = (pid.map_or(0.0, |p| cpu(Some(p))), cpu(None), faults());
    Ok((
        v,
        Phase {
            bytes,
            secs,
            daemon_cpu_s: d1 - d0,
            client_cpu_s: c1 - c0,
            daemon_faults: f1.saturating_sub(f0),
        },
    ))
}

/// The checks of one round: what came back, against what was put.
#[derive(Debug, Default)]
struct Checks {
    /// Objects compared byte for byte with what was put (all of them).
    verified_objects: usize,
    verified_bytes: usize,
    /// Keys whose bytes or ETag came back different.
    mismatched: Vec<String>,
    heads: usize,
    head_size_mismatches: Vec<String>,
    /// Status and S3 code of a GET and a HEAD of a key never written, of
    /// the DELETE of an object and a GET after it.
    missing_get: (u16, String),
    missing_head: u16,
    delete: u16,
    deleted_get: (u16, String),
}

/// What one round measured.
#[derive(Debug, Default)]
struct Round {
    loopback: Phase,
    raw_write: f64,
    raw_read: f64,
    put: Phase,
    get: Phase,
    single_put: Phase,
    multipart_put: Phase,
    single_get: Phase,
    multipart_get: Phase,
    /// The region path's put and get GB/s, and its CPU over both.
    region_put: f64,
    region_get: f64,
    region: Phase,
    head_us: Vec<f64>,
    part_ms: Vec<f64>,
    create_ms: f64,
    complete_ms: f64,
    multipart_first: bool,
    checks: Checks,
}

fn block_path(round: usize, i: usize) -> String {
    format!("/{BLOCKS_BUCKET}/r{round}/b{i:06}")
}

/// Deals `items` round-robin onto `n` lists: one per connection.
fn deal<T>(items: impl Iterator<Item = T>, n: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for (i, it) in items.enumerate() {
        out[i % n].push(it);
    }
    out
}

/// Runs `work` on every item, each connection on a thread of its own with
/// its own items, one request at a time; the first failure (or the
/// deadline) stops every thread and is the answer.
fn on_connections<I: Send, R: Send>(
    conns: &mut [Conn],
    items: Vec<Vec<I>>,
    deadline: Instant,
    work: impl Fn(&mut Conn, I) -> kvtier::Result<R> + Sync,
) -> kvtier::Result<Vec<R>> {
    let stop = AtomicBool::new(false);
    let (work, stop) = (&work, &stop);
    let results: Vec<kvtier::Result<Vec<R>>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .zip(items)
            .map(|(c, mine)| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(mine.len());
                    for it in mine {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if Instant::now() > deadline {
                            stop.store(true, Ordering::Relaxed);
                            return Err(err("a phase ran past --phase-timeout-s"));
                        }
                        match work(c, it) {
                            Ok(r) => out.push(r),
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(err("a client thread panicked"))))
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// The S3 endpoint of a daemon, its signer and the phases' time limit.
struct Endpoint {
    host: String,
    signer: Signer,
    pid: Option<i32>,
    timeout: Duration,
}

impl Endpoint {
    fn conns(&self, n: usize) -> kvtier::Result<Vec<Conn>> {
        (0..n)
            .map(|_| Conn::open(&self.host, &self.signer, Duration::from_secs(60)))
            .collect()
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }
}

/// Compares `got` with `want` and the ETags; a difference is recorded
/// under `key`.
fn verify(checks: &mut Checks, key: &str, got: &[u8], want: &[u8], etags: (&str, &str)) {
    checks.verified_objects += 1;
    checks.verified_bytes += got.len();
    if got != want {
        checks.mismatched.push(format!("{key}: bytes"));
    }
    if etags.0 != etags.1 {
        checks
            .mismatched
            .push(format!("{key}: ETag {} on GET, {} on PUT", etags.0, etags.1));
    }
}

/// Block objects: PUT all, GET all back into zeroed memory, compare; then
/// HEAD latency and the 404s.
fn blocks_phases(e: &Endpoint, p: &Plan, r: usize, src: &[u8], dst: &mut [u8], out: &mut Round) -> kvtier::Result<()> {
    let (ob, total) = (p.object_bytes, p.total());
    let mut conns = e.conns(p.in_flight)?;
    let items = deal(src[..total].chunks(ob).enumerate(), p.in_flight);
    let (mut put_etags, put) = timed(e.pid, total, || {
        on_connections(&mut conns, items, e.deadline(), |c, (i, data)| {
            Ok((i, c.put(&block_path(r, i), data)?))
        })
    })?;
    out.put = put;
    put_etags.sort();
    dst[..total].fill(0);
    let items = deal(dst[..total].chunks_mut(ob).enumerate(), p.in_flight);
    let (mut get_etags, get) = timed(e.pid, total, || {
        on_connections(&mut conns, items, e.deadline(), |c, (i, into)| {
            Ok((i, c.get_into(&block_path(r, i), into)?))
        })
    })?;
    out.get = get;
    get_etags.sort();
    for (i, ((_, put_etag), (_, get_etag))) in put_etags.iter().zip(&get_etags).enumerate() {
        let at = i * ob;
        verify(
            &mut out.checks,
            &block_path(r, i),
            &dst[at..at + ob],
            &src[at..at + ob],
            (get_etag, put_etag),
        );
    }

    // HeadObject latency, one request at a time over stored objects.
    let c = &mut conns[0];
    let deadline = e.deadline();
    for k in 0..p.heads {
        if Instant::now() > deadline {
            return Err(err("the HEAD requests ran past --phase-timeout-s"));
        }
        let key = block_path(r, k % p.objects);
        let t = Instant::now();
        let (status, len) = c.head(&key)?;
        out.head_us.push(t.elapsed().as_secs_f64() * 1e6);
        out.checks.heads += 1;
        if status != 200 || len != Some(ob as u64) {
            out.checks
                .head_size_mismatches
                .push(format!("{key}: HTTP {status}, Content-Length {len:?}, not {ob}"));
        }
    }

    // A key never written, and one deleted: 404 NoSuchKey.
    let code = |r: &client::Resp| r.s3_error().map_or_else(String::new, |e| e.code.as_str().to_string());
    let missing = format!("/{BLOCKS_BUCKET}/r{r}/never-written");
    let g = c.get(&missing)?;
    out.checks.missing_get = (g.status, code(&g));
    out.checks.missing_head = c.head(&missing)?.0;
    out.checks.delete = c.delete(&block_path(r, 0))?;
    let g = c.get(&block_path(r, 0))?;
    out.checks.deleted_get = (g.status, code(&g));
    Ok(())
}

/// The large object as one PUT and as a multipart upload (alternating
/// which goes first), each read back with one GET and compared.
fn big_object_phases(
    e: &Endpoint,
    p: &Plan,
    r: usize,
    src: &[u8],
    dst: &mut [u8],
    out: &mut Round,
) -> kvtier::Result<()> {
    let big = p.big_bytes;
    let single = format!("/{OBJECTS_BUCKET}/r{r}/single");
    let multi = format!("/{OBJECTS_BUCKET}/r{r}/multipart");
    out.multipart_first = r % 2 == 1;
    let mut single_etag = String::new();
    let mut multi_etag = String::new();
    for step in 0..2 {
        if (step == 0) != out.multipart_first {
            let mut c = e.conns(1)?;
            let (etag, ph) = timed(e.pid, big, || c[0].put(&single, &src[..big]))?;
            single_etag = etag;
            out.single_put = ph;
            continue;
        }
        // One more connection carries the create and the complete.
        let mut conns = e.conns(p.in_flight + 1)?;
        let (ctl, workers) = conns.split_last_mut().expect("at least two");
        let items = deal(src[..big].chunks(p.part_bytes).enumerate(), p.in_flight);
        let ((etag, part_ms, create_ms, complete_ms), ph) = timed(e.pid, big, || {
            let t = Instant::now();
            let id = ctl.create_upload(&multi)?;
            let create_ms = t.elapsed().as_secs_f64() * 1e3;
            let mut parts = on_connections(workers, items, e.deadline(), |c, (i, data)| {
                let t = Instant::now();
                let etag = c.upload_part(&multi, &id, i + 1, data)?;
                Ok((i + 1, etag, t.elapsed().as_secs_f64() * 1e3))
            })?;
            parts.sort_by_key(|x| x.0);
            let t = Instant::now();
            let listed: Vec<(usize, String)> = parts.iter().map(|(n, e, _)| (*n, e.clone())).collect();
            let etag = ctl.complete(&multi, &id, &listed)?;
            let complete_ms = t.elapsed().as_secs_f64() * 1e3;
            Ok((
                etag,
                parts.iter().map(|x| x.2).collect::<Vec<_>>(),
                create_ms,
                complete_ms,
            ))
        })?;
        multi_etag = etag;
        out.multipart_put = ph;
        out.part_ms = part_ms;
        out.create_ms = create_ms;
        out.complete_ms = complete_ms;
    }
    let mut c = e.conns(1)?;
    for (path, put_etag, which) in [(&single, &single_etag, 0), (&multi, &multi_etag, 1)] {
        dst[..big].fill(0);
        let (etag, ph) = timed(e.pid, big, || c[0].get_into(path, &mut dst[..big]))?;
        if which == 0 {
            out.single_get = ph;
        } else {
            out.multipart_get = ph;
        }
        verify(&mut out.checks, path, &dst[..big], &src[..big], (&etag, put_etag));
    }
    Ok(())
}

/// The kvtierd configuration: both buckets, one key.
fn config_toml(p: &Plan) -> String {
    format!(
        r#"[s3]
listen = "127.0.0.1:0"
max_block_object_bytes = {}
chunk_bytes = {OBJECT_CHUNK_BYTES}
[[s3.credentials]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
[[s3.buckets]]
name = "{BLOCKS_BUCKET}"
kind = "blocks"
[[s3.buckets]]
name = "{OBJECTS_BUCKET}"
kind = "objects"
"#,
        p.object_bytes.max(4 << 20)
    )
}

/// Buffers and regions every round uses: the same bytes feed every path.
struct Memory {
    src: AlignedBuf,
    dst: AlignedBuf,
    src_region: SharedRegion,
    dst_region: SharedRegion,
    shm_dir: PathBuf,
}

/// One round on a fresh SSD-only kvtierd in `dir/round-<r>`, removed after.
fn round(dir: &Path, p: &Plan, r: usize, m: &mut Memory, rt: &tokio::runtime::Runtime) -> kvtier::Result<Round> {
    let total = p.total();
    let mut out = Round::default();
    let (lb, ph) = timed(None, total, || loopback_round(&m.src[..total], p.object_bytes))?;
    out.loopback = Phase {
        secs: total as f64 / lb / 1e9,
        ..ph
    };
    let raw = raw_disk_round(dir, &m.src[..total], &mut m.dst[..total], p.object_bytes)?;
    (out.raw_write, out.raw_read) = (raw.put, raw.get);

    let cfg = dir.join("kvtierd.toml");
    std::fs::write(&cfg, config_toml(p)).map_err(|e| err(format!("write {}: {e}", cfg.display())))?;
    let data = dir.join(format!("round-{r}"));
    let mut env = vec![
        ("KVTIER_CONFIG", cfg.display().to_string()),
        ("KVTIER_MODE", p.mode.name().into()),
        ("KVTIER_DISK_CAPACITY_BYTES", p.disk_capacity_bytes().to_string()),
        (
            "KVTIER_MAX_REQUEST_BYTES",
            ((p.batch * p.object_bytes) as u64).max(64 << 20).to_string(),
        ),
        ("KVTIER_SHM_DIR", m.shm_dir.display().to_string()),
    ];
    if p.mode == Mode::Tiered {
        env.push(("KVTIER_HOST_CAPACITY_BYTES", p.disk_capacity_bytes().to_string()));
    }
    let d: Daemon = start_daemon(&data, &env)?;
    let host = d.s3.clone().ok_or_else(|| err("kvtierd printed no S3 address"))?;
    let e = Endpoint {
        host,
        signer: Signer::new(ACCESS_KEY, SECRET_KEY, "us-east-1"),
        pid: Some(d.pid()),
        timeout: p.phase_timeout,
    };
    blocks_phases(&e, p, r, &m.src, &mut m.dst, &mut out)?;
    big_object_phases(&e, p, r, &m.src, &mut m.dst, &mut out)?;

    // The same block bytes through the gRPC shared-region path.
    let endpoint = d.endpoint();
    let (src_region, dst_region) = (&m.src_region, &m.dst_region);
    let (rr, ph) = timed(e.pid, 2 * total, || {
        rt.block_on(async {
            let (c, ns, src_id, dst_id) = session(&endpoint, p.object_bytes, src_region, dst_region).await?;
            region_round(
                &c,
                ns,
                r,
                (src_region, src_id),
                (dst_region, dst_id),
                total,
                p.object_bytes,
                p.batch,
            )
            .await
        })
    })?;
    (out.region_put, out.region_get, out.region) = (rr.put, rr.get, ph);
    drop(d);
    remove_and_settle(&data);
    Ok(out)
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    let p = Plan::of(a)?;
    fresh_dir(&a.dir)?;
    let total = p.total();
    let len = total.max(p.big_bytes);
    let mut src = AlignedBuf::new(len);
    fill(&mut src, 0x5353);
    // Regions live on a tmpfs when there is one, as they would in production.
    let shm_dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        a.dir.clone()
    };
    let region = |n| SharedRegion::create(&shm_dir, n).map_err(|e| err(format!("region: {e}")));
    let mut src_region = region(total)?;
    src_region.as_mut_slice()[..total].copy_from_slice(&src[..total]);
    let mut m = Memory {
        src,
        dst: AlignedBuf::new(len),
        src_region,
        dst_region: region(total)?,
        shm_dir: shm_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err(format!("runtime: {e}")))?;
    let mut rounds = Vec::with_capacity(p.rounds);
    let mut loads = Vec::with_capacity(p.rounds);
    for r in 0..p.rounds {
        loads.push(load_avg_1m());
        match round(&a.dir, &p, r, &mut m, &rt) {
            Ok(x) => rounds.push(x),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&a.dir);
                return Err(e);
            }
        }
    }
    drop(m);
    let _ = std::fs::remove_dir_all(&a.dir);
    let mut v = figures(a, &p, &rounds);
    v["load_avg_1m_before_each_round"] = json!(loads);
    // The checks hold in every run, not only the smoke: a bench that got
    // other bytes back has measured nothing.
    report(&v, a.json, Some(check))
}

/// CPU seconds per GB over every round's `phase`: (kvtierd, client).
fn cpu_per_gb(rounds: &[Round], phase: fn(&Round) -> Phase) -> (f64, f64) {
    let gb: f64 = rounds.iter().map(|r| phase(r).bytes as f64 / 1e9).sum();
    let d: f64 = rounds.iter().map(|r| phase(r).daemon_cpu_s).sum();
    let c: f64 = rounds.iter().map(|r| phase(r).client_cpu_s).sum();
    (d / gb, c / gb)
}

/// kvtierd's minor page faults per GB over every round's `phase`.
fn faults_per_gb(rounds: &[Round], phase: fn(&Round) -> Phase) -> f64 {
    let gb: f64 = rounds.iter().map(|r| phase(r).bytes as f64 / 1e9).sum();
    rounds.iter().map(|r| phase(r).daemon_faults as f64).sum::<f64>() / gb
}

fn gbps_median(rounds: &[Round], phase: fn(&Round) -> Phase) -> f64 {
    median(rounds.iter().map(|r| phase(r).gbps()).collect())
}

/// The figures a goal is judged with.
#[derive(Debug, Clone, Default)]
struct Judged {
    cores: usize,
    loopback: f64,
    /// Loopback TCP's CPU s/GB, both ends (both are this process).
    loopback_cpu: f64,
    raw_write: f64,
    raw_read: f64,
    put: f64,
    get: f64,
    put_cpu: (f64, f64),
    get_cpu: (f64, f64),
    /// kvtierd's minor page faults per GB of put and of get.
    put_faults: f64,
    get_faults: f64,
    region_put: f64,
    region_get: f64,
    single_put: f64,
    multipart_put: f64,
    single_cpu: (f64, f64),
    multipart_cpu: (f64, f64),
    parts: usize,
    part_bytes: usize,
    in_flight: usize,
    part_ms: (f64, f64),
    single_put_s: f64,
    complete_ms: f64,
}

/// GB/s the cores could move at `cpu_s_per_gb` CPU seconds per GB, if
/// nothing else ran.
fn cpu_ceiling_gbps(cores: usize, cpu_s_per_gb: f64) -> f64 {
    cores as f64 / cpu_s_per_gb
}

/// The goals not met, each with the measurements that show why.
fn unmet(j: &Judged) -> Vec<String> {
    let mut out = vec![];
    for (what, x, cpu, faults, raw, raw_what, region) in [
        (
            "put",
            j.put,
            j.put_cpu,
            j.put_faults,
            j.raw_write,
            "write",
            j.region_put,
        ),
        ("get", j.get, j.get_cpu, j.get_faults, j.raw_read, "read", j.region_get),
    ] {
        if x >= GOAL_VS_LOOPBACK * j.loopback {
            continue;
        }
        let both = cpu.0 + cpu.1;
        out.push(format!(
            "{what}: S3 {x:.3} GB/s is {:.3} of loopback TCP {:.3} GB/s (goal {GOAL_VS_LOOPBACK}); CPU s/GB kvtierd \
             {:.3} + client {:.3} = {both:.3} against {:.3} for loopback TCP (both ends), kvtierd taking {faults:.0} page \
             faults per GB (pages it touched for the first time): at that cost the {} cores allow at most {:.2} GB/s (loopback TCP {:.2}); the disk's raw O_DIRECT {raw_what} is {raw:.3} GB/s ({:.3} \
             of loopback TCP); the gRPC shared-region {what} of the same bytes {region:.3} GB/s",
            x / j.loopback,
            j.loopback,
            cpu.0,
            cpu.1,
            j.loopback_cpu,
            j.cores,
            cpu_ceiling_gbps(j.cores, both),
            cpu_ceiling_gbps(j.cores, j.loopback_cpu),
            raw / j.loopback,
        ));
    }
    if j.multipart_put < GOAL_MULTIPART_VS_SINGLE * j.single_put {
        out.push(format!(
            "multipart: {:.3} GB/s is {:.3} of single PUTs of the same bytes {:.3} GB/s (goal \
             {GOAL_MULTIPART_VS_SINGLE}); {} parts of {} MiB, {} in flight: a part takes {:.1} ms at the median, \
             {:.1} ms at p99, the completion {:.1} ms, the single PUT {:.1} ms in all; CPU s/GB kvtierd {:.3} against \
             {:.3}, client {:.3} against {:.3}",
            j.multipart_put,
            j.multipart_put / j.single_put,
            j.single_put,
            j.parts,
            j.part_bytes >> 20,
            j.in_flight,
            j.part_ms.0,
            j.part_ms.1,
            j.complete_ms,
            j.single_put_s * 1e3,
            j.multipart_cpu.0,
            j.single_cpu.0,
            j.multipart_cpu.1,
            j.single_cpu.1,
        ));
    }
    out
}

fn figures(a: &Args, p: &Plan, rounds: &[Round]) -> Value {
    let per = |f: fn(&Round) -> f64| rounds.iter().map(|r| round3(f(r))).collect::<Vec<_>>();
    let med = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let mut head_us: Vec<f64> = rounds.iter().flat_map(|r| r.head_us.iter().copied()).collect();
    let mut part_ms: Vec<f64> = rounds.iter().flat_map(|r| r.part_ms.iter().copied()).collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loopback_cpu = cpu_per_gb(rounds, |r| r.loopback).1;
    let j = Judged {
        cores,
        loopback: gbps_median(rounds, |r| r.loopback),
        loopback_cpu,
        raw_write: med(|r| r.raw_write),
        raw_read: med(|r| r.raw_read),
        put: gbps_median(rounds, |r| r.put),
        get: gbps_median(rounds, |r| r.get),
        put_cpu: cpu_per_gb(rounds, |r| r.put),
        get_cpu: cpu_per_gb(rounds, |r| r.get),
        put_faults: faults_per_gb(rounds, |r| r.put),
        get_faults: faults_per_gb(rounds, |r| r.get),
        region_put: med(|r| r.region_put),
        region_get: med(|r| r.region_get),
        single_put: gbps_median(rounds, |r| r.single_put),
        multipart_put: gbps_median(rounds, |r| r.multipart_put),
        single_cpu: cpu_per_gb(rounds, |r| r.single_put),
        multipart_cpu: cpu_per_gb(rounds, |r| r.multipart_put),
        parts: p.parts(),
        part_bytes: p.part_bytes,
        in_flight: p.in_flight,
        part_ms: (percentile(&mut part_ms, 50.0), percentile(&mut part_ms, 99.0)),
        single_put_s: med(|r| r.single_put.secs),
        complete_ms: med(|r| r.complete_ms),
    };
    let unmet = unmet(&j);
    let (single_get, multipart_get) = (
        gbps_median(rounds, |r| r.single_get),
        gbps_median(rounds, |r| r.multipart_get),
    );
    let cpu = |(d, c): (f64, f64)| json!({"kvtierd": round3(d), "client": round3(c)});
    let checks: Vec<Value> = rounds
        .iter()
        .map(|r| {
            let c = &r.checks;
            json!({
                "verified_objects": c.verified_objects,
                "verified_bytes": c.verified_bytes,
                "mismatched": c.mismatched,
                "heads": c.heads,
                "head_size_mismatches": c.head_size_mismatches,
                "missing_key": {"get_status": c.missing_get.0, "get_code": c.missing_get.1, "head_status": c.missing_head},
                "deleted_key": {"delete_status": c.delete, "get_status": c.deleted_get.0, "get_code": c.deleted_get.1},
            })
        })
        .collect();
    let mut out = json!({
        "bench": "s3",
        "smoke": a.smoke,
        "mode": p.mode.name(),
        "rounds": p.rounds,
        "cores": cores,
        "object_bytes": p.object_bytes,
        "objects": p.objects,
        "total_bytes": p.total(),
        "in_flight": p.in_flight,
        "multipart_object_bytes": p.big_bytes,
        "part_bytes": p.part_bytes,
        "parts": p.parts(),
        "objects_chunk_bytes": OBJECT_CHUNK_BYTES,
        "loopback_tcp_gbps": round3(j.loopback),
        "put_gbps": round3(j.put),
        "get_gbps": round3(j.get),
        "put_vs_loopback": ratio(j.put, j.loopback),
        "get_vs_loopback": ratio(j.get, j.loopback),
        "multipart_put_gbps": round3(j.multipart_put),
        "multipart_get_gbps": round3(multipart_get),
        "single_put_gbps": round3(j.single_put),
        "single_get_gbps": round3(single_get),
        "multipart_vs_single": ratio(j.multipart_put, j.single_put),
        "multipart_part_p50_ms": round3(j.part_ms.0),
        "multipart_part_p99_ms": round3(j.part_ms.1),
        "multipart_create_ms": round3(med(|r| r.create_ms)),
        "multipart_complete_ms": round3(j.complete_ms),
        "head_p50_us": round3(percentile(&mut head_us, 50.0)),
        "head_p99_us": round3(percentile(&mut head_us, 99.0)),
        "heads": head_us.len(),
        "grpc_region_put_gbps": round3(j.region_put),
        "grpc_region_get_gbps": round3(j.region_get),
        "s3_vs_region_put": ratio(j.put, j.region_put),
        "s3_vs_region_get": ratio(j.get, j.region_get),
        "raw_disk_write_gbps": round3(j.raw_write),
        "raw_disk_read_gbps": round3(j.raw_read),
    });
    // In parts: one json! of everything passes the macro's recursion limit.
    let more = json!({
        "cpu_s_per_gb": {
            "put": cpu(j.put_cpu),
            "get": cpu(j.get_cpu),
            "single_put": cpu(j.single_cpu),
            "multipart_put": cpu(j.multipart_cpu),
            "single_get": cpu(cpu_per_gb(rounds, |r| r.single_get)),
            "multipart_get": cpu(cpu_per_gb(rounds, |r| r.multipart_get)),
            "grpc_region_put_and_get": cpu(cpu_per_gb(rounds, |r| r.region)),
            "loopback_tcp_both_ends": round3(loopback_cpu),
        },
        "kvtierd_minor_faults_per_gb": {
            "put": faults_per_gb(rounds, |r| r.put).round(),
            "get": faults_per_gb(rounds, |r| r.get).round(),
            "single_put": faults_per_gb(rounds, |r| r.single_put).round(),
            "multipart_put": faults_per_gb(rounds, |r| r.multipart_put).round(),
            "single_get": faults_per_gb(rounds, |r| r.single_get).round(),
            "multipart_get": faults_per_gb(rounds, |r| r.multipart_get).round(),
            "grpc_region_put_and_get": faults_per_gb(rounds, |r| r.region).round(),
        },
        "cpu_ceiling_gbps": {
            "put": round3(cpu_ceiling_gbps(cores, j.put_cpu.0 + j.put_cpu.1)),
            "get": round3(cpu_ceiling_gbps(cores, j.get_cpu.0 + j.get_cpu.1)),
            "loopback_tcp": round3(cpu_ceiling_gbps(cores, loopback_cpu)),
        },
        "goals": {
            "put_vs_loopback_min": GOAL_VS_LOOPBACK,
            "get_vs_loopback_min": GOAL_VS_LOOPBACK,
            "multipart_vs_single_min": GOAL_MULTIPART_VS_SINGLE,
            "met": unmet.is_empty(),
            "unmet": unmet,
        },
    });
    let detail = json!({
        "checks_per_round": checks,
        "per_round": {
            "loopback_tcp_gbps": per(|r| r.loopback.gbps()),
            "put_gbps": per(|r| r.put.gbps()),
            "get_gbps": per(|r| r.get.gbps()),
            "single_put_gbps": per(|r| r.single_put.gbps()),
            "multipart_put_gbps": per(|r| r.multipart_put.gbps()),
            "single_get_gbps": per(|r| r.single_get.gbps()),
            "multipart_get_gbps": per(|r| r.multipart_get.gbps()),
            "multipart_first": rounds.iter().map(|r| r.multipart_first).collect::<Vec<_>>(),
            "grpc_region_put_gbps": per(|r| r.region_put),
            "grpc_region_get_gbps": per(|r| r.region_get),
            "raw_disk_write_gbps": per(|r| r.raw_write),
            "raw_disk_read_gbps": per(|r| r.raw_read),
        },
        "how": {
            "daemon": "a fresh kvtierd per round in `mode`: ssd-only (O_DIRECT log-structured segments, no host \
                       cache; the goals are set for it) or tiered (host RAM in front; S3 objects still written to the SSD, \
                       acknowledged only durably), S3 on \
                       127.0.0.1 over plain HTTP/1.1: a blocks bucket (one block per object) and an objects bucket \
                       (chunks of objects_chunk_bytes); its data directory removed and synced after the round",
            "client": "this bench's own HTTP/1.1 keep-alive client over std TCP (no SDK), in_flight connections with \
                       one request in flight each, every request signed by kvtier_s3::Signer (SigV4) with \
                       x-amz-content-sha256 UNSIGNED-PAYLOAD, as SDKs send over TLS (no payload hash on either \
                       side); a head and its body go in one writev, a GET's body is read straight into the \
                       destination buffer",
            "put_gbps": "every block object PUT once (objects dealt round-robin to the connections), bytes / time \
                         from the first request to the last answer; median over the rounds",
            "get_gbps": "the same objects GET into a zeroed buffer the same way",
            "verification": "after each timed get phase, every object (block objects and both large objects) is \
                             compared byte for byte with what was put, and its GET ETag with the PUT's; HEAD sizes \
                             and 404 NoSuchKey for a key never written and for a deleted one (checks_per_round)",
            "multipart_put_gbps": "CreateMultipartUpload, parts of part_bytes dealt to in_flight connections, \
                                   CompleteMultipartUpload: object bytes / time from the create to the completion's \
                                   answer",
            "single_put_gbps": "the same bytes as one PUT of the whole object on one connection. A 256 MiB PUT \
                                exceeds no limit (the objects bucket takes up to max_object_bytes, 5 TiB; AWS's \
                                own single-PUT limit is 5 GiB), so the reference is the same object, as a client \
                                without multipart uploads sends it; kvtierd stores its chunks 4 at a time \
                                (store.rs CHUNKS_IN_FLIGHT). Which of the two goes first alternates between rounds",
            "multipart_get_gbps": "one GET of the completed multipart object; single_get_gbps the same of the single \
                                   PUT's object",
            "head_p99_us": "HeadObject of stored block objects, one at a time on one connection; nearest rank over \
                            every request of every round",
            "loopback_tcp_gbps": "one plain TCP stream on 127.0.0.1 of the block objects' bytes in object-sized \
                                  writes (the daemon bench's loopback_round), each round",
            "grpc_region_gbps": "the same block bytes through kvtierd's gRPC shared-memory region path (put_region \
                                 and get_region of region_batch blocks per request, one request at a time, as the \
                                 daemon bench), on the same daemon after the S3 phases",
            "raw_disk_gbps": "O_DIRECT sequential write and read of the block objects' bytes in --dir, \
                              object-sized, each round: what the disk allows (a diagnostic)",
            "cpu_s_per_gb": "CPU seconds (user + system, /proc/<pid>/stat) of kvtierd and of this process (the \
                             client's threads) over each phase, summed over the rounds, per GB moved; \
                             cpu_ceiling_gbps = cores / (kvtierd + client)",
            "kvtierd_minor_faults_per_gb": "kvtierd's minor page faults (/proc/<pid>/stat field 10) over each phase \
                                            per GB moved: pages kvtierd touched for the first time (fresh \
                                            anonymous memory, zeroed by the kernel, or a shared region's pages \
                                            mapped on first use); 1e9 / 4096 = 244,141 per GB means every byte \
                                            went through such a page",
        },
    });
    for part in [more, detail] {
        for (k, x) in part.as_object().expect("an object") {
            out[k] = x.clone();
        }
    }
    out
}

/// The invariants every run checks on its own output: every byte back as
/// put, HEAD sizes right, 404 NoSuchKey for missing keys, finite figures.
fn check(v: &Value) -> kvtier::Result<()> {
    let c = Invariants::of("s3", v);
    let (objects, rounds, heads) = (c.u("/objects")?, c.u("/rounds")?, c.u("/heads")?);
    let per = c.get("/checks_per_round")?;
    let per = per
        .as_array()
        .ok_or_else(|| c.broken("/checks_per_round is not a list".into()))?;
    c.ensure(per.len() as u64 == rounds, || {
        format!("checks_per_round has {} entries for {rounds} rounds", per.len())
    })?;
    for r in 0..per.len() {
        let at = |k: &str| format!("/checks_per_round/{r}/{k}");
        let n = c.u(&at("verified_objects"))?;
        c.ensure(n == objects + 2, || {
            format!("round {r}: {n} objects compared, not every block object ({objects}) and both large objects")
        })?;
        for k in ["mismatched", "head_size_mismatches"] {
            let x = c.get(&at(k))?;
            c.ensure(x.as_array().is_some_and(Vec::is_empty), || {
                format!("round {r}: {k} is {x}: every object comes back as put")
            })?;
        }
        for (k, want) in [
            ("missing_key/get_status", json!(404)),
            ("missing_key/get_code", json!("NoSuchKey")),
            ("missing_key/head_status", json!(404)),
            ("deleted_key/delete_status", json!(204)),
            ("deleted_key/get_status", json!(404)),
            ("deleted_key/get_code", json!("NoSuchKey")),
        ] {
            let x = c.get(&at(k))?;
            c.ensure(*x == want, || format!("round {r}: {k} is {x}, not {want}"))?;
        }
    }
    c.ensure(heads > 0, || "some HEAD requests were timed".into())?;
    for k in [
        "loopback_tcp_gbps",
        "put_gbps",
        "get_gbps",
        "multipart_put_gbps",
        "multipart_get_gbps",
        "single_put_gbps",
        "single_get_gbps",
        "grpc_region_put_gbps",
        "grpc_region_get_gbps",
        "head_p50_us",
        "head_p99_us",
        "raw_disk_write_gbps",
        "raw_disk_read_gbps",
        "put_vs_loopback",
        "get_vs_loopback",
        "multipart_vs_single",
        "s3_vs_region_put",
        "s3_vs_region_get",
    ] {
        let x = c.f(&format!("/{k}"))?;
        c.ensure(x.is_finite() && x > 0.0, || {
            format!("{k} is {x}: a finite figure above 0")
        })?;
    }
    // CPU time counts in clock ticks (10 ms): a short smoke phase may see none.
    for k in ["put", "get", "single_put", "multipart_put"] {
        for side in ["kvtierd", "client"] {
            let x = c.f(&format!("/cpu_s_per_gb/{k}/{side}"))?;
            c.ensure(x.is_finite() && x >= 0.0, || {
                format!("cpu_s_per_gb/{k}/{side} is {x}: /proc/<pid>/stat was read")
            })?;
        }
    }
    let (p50, p99) = (c.f("/head_p50_us")?, c.f("/head_p99_us")?);
    c.ensure(p50 <= p99, || format!("head_p50_us {p50} <= head_p99_us {p99}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_dealt_round_robin() {
        let d = deal(0..7, 3);
        assert_eq!(d, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
        assert_eq!(deal(0..2, 4).iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 0, 0]);
    }

    fn judged() -> Judged {
        Judged {
            cores: 2,
            loopback: 4.0,
            loopback_cpu: 0.5,
            raw_write: 2.0,
            raw_read: 2.0,
            put: 2.0,
            get: 2.0,
            put_cpu: (0.5, 0.3),
            get_cpu: (0.5, 0.3),
            put_faults: 10.0,
            get_faults: 244_000.0,
            region_put: 3.0,
            region_get: 3.0,
            single_put: 1.0,
            multipart_put: 0.9,
            single_cpu: (0.5, 0.1),
            multipart_cpu: (0.5, 0.1),
            parts: 32,
            part_bytes: 8 << 20,
            in_flight: 4,
            part_ms: (10.0, 20.0),
            single_put_s: 0.25,
            complete_ms: 3.0,
        }
    }

    #[test]
    fn goals_met_say_nothing_and_unmet_ones_say_why() {
        assert!(unmet(&judged()).is_empty());
        let j = Judged {
            get: 1.0,
            multipart_put: 0.7,
            ..judged()
        };
        let u = unmet(&j);
        assert_eq!(u.len(), 2, "{u:?}");
        assert!(
            u[0].starts_with("get: S3 1.000 GB/s is 0.250 of loopback TCP 4.000 GB/s"),
            "{u:?}"
        );
        assert!(
            u[0].contains("at that cost the 2 cores allow at most 2.50 GB/s"),
            "{u:?}"
        );
        assert!(
            u[0].contains("raw O_DIRECT read is 2.000 GB/s (0.500 of loopback TCP)"),
            "{u:?}"
        );
        assert!(
            u[1].starts_with("multipart: 0.700 GB/s is 0.700 of single PUTs"),
            "{u:?}"
        );
        assert!(u[1].contains("32 parts of 8 MiB, 4 in flight"), "{u:?}");
    }

    #[test]
    fn the_smoke_plan_is_small_and_parts_cover_the_object() {
        let a = Args {
            total_mib: 1024,
            multipart_mib: 256,
            smoke: true,
            ..args()
        };
        let p = Plan::of(&a).unwrap();
        assert_eq!((p.objects, p.rounds, p.parts()), (16, 1, 3));
        let p = Plan::of(&Args { smoke: false, ..a }).unwrap();
        assert_eq!((p.objects, p.parts(), p.total()), (512, 32, 1 << 30));
        assert!(p.disk_capacity_bytes() >= (2 * p.total() + 2 * p.big_bytes) as u64);
        let small_parts = Args { part_mib: 4, ..args() };
        assert!(Plan::of(&small_parts).is_err(), "parts under 5 MiB are refused");
        let odd = Args {
            object_kib: 3,
            ..args()
        };
        assert!(Plan::of(&odd).is_err(), "objects are whole 4 KiB pages");
    }

    fn args() -> Args {
        Args {
            dir: "x".into(),
            total_mib: 64,
            object_kib: 2048,
            in_flight: 4,
            multipart_mib: 32,
            part_mib: 8,
            heads: 10,
            region_batch: 8,
            rounds: 1,
            mode: Mode::SsdOnly,
            phase_timeout_s: 10,
            json: true,
            smoke: false,
        }
    }

    /// A round whose every phase moved 1 GB in 1 s and whose checks held.
    fn good_round(p: &Plan) -> Round {
        let ph = Phase {
            bytes: 1_000_000_000,
            secs: 1.0,
            daemon_cpu_s: 0.5,
            client_cpu_s: 0.2,
            daemon_faults: 100,
        };
        Round {
            loopback: ph,
            raw_write: 1.0,
            raw_read: 1.0,
            put: ph,
            get: ph,
            single_put: ph,
            multipart_put: ph,
            single_get: ph,
            multipart_get: ph,
            region_put: 1.0,
            region_get: 1.0,
            region: ph,
            head_us: vec![50.0, 80.0],
            part_ms: vec![10.0],
            create_ms: 1.0,
            complete_ms: 1.0,
            multipart_first: false,
            checks: Checks {
                verified_objects: p.objects + 2,
                verified_bytes: p.total() + 2 * p.big_bytes,
                heads: 2,
                missing_get: (404, "NoSuchKey".into()),
                missing_head: 404,
                delete: 204,
                deleted_get: (404, "NoSuchKey".into()),
                ..Checks::default()
            },
        }
    }

    #[test]
    fn the_checks_pass_a_good_run_and_name_what_broke() {
        let a = args();
        let p = Plan::of(&a).unwrap();
        assert!(check(&figures(&a, &p, &[good_round(&p)])).is_ok());
        let mut r = good_round(&p);
        r.checks.mismatched.push("/kv-blocks/r0/b000003: bytes".into());
        let e = check(&figures(&a, &p, &[r])).unwrap_err();
        assert!(
            e.to_string()
                .contains("round 0: mismatched is [\"/kv-blocks/r0/b000003: bytes\"]"),
            "{e}"
        );
        let mut r = good_round(&p);
        r.checks.deleted_get = (200, String::new());
        let e = check(&figures(&a, &p, &[r])).unwrap_err();
        assert!(e.to_string().contains("deleted_key/get_status is 200, not 404"), "{e}");
        let mut r = good_round(&p);
        r.checks.verified_objects -= 1;
        assert!(check(&figures(&a, &p, &[r])).is_err(), "an object not compared");
        let mut r = good_round(&p);
        r.get.secs = 0.0;
        let e = check(&figures(&a, &p, &[r])).unwrap_err();
        assert!(e.to_string().contains("get_gbps is"), "{e}");
    }

    #[test]
    fn the_config_declares_both_buckets_and_the_key() {
        let t = config_toml(&Plan::of(&args()).unwrap());
        for line in [
            "max_block_object_bytes = 4194304",
            "name = \"kv-blocks\"\nkind = \"blocks\"",
            "name = \"objects\"\nkind = \"objects\"",
            "access_key_id = \"bench\"",
        ] {
            assert!(t.contains(line), "{line:?} in {t}");
        }
    }
}
