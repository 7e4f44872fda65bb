//! `kvtier-bench daemon`: a real kvtierd process measured against raw
//! loopback TCP (its own plain socket copy of the same bytes) and, in
//! SSD-only mode, against raw O_DIRECT I/O in the same directory; plus the
//! latency of a 64-block prefix lookup, and of a one-block put and get of
//! 128 KiB over the streamed gRPC path on a warm connection (what a remote
//! client or a peer waits for one block).

use bytes::Bytes;
use kvtier::{AlignedBuf, BlockKey, NamespaceId};
use kvtier_client::{Client, ClientConfig, SharedRegion};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use std::time::Instant;

use crate::tiers::raw_disk_round;
use crate::util::{cpu_seconds, fill, gbps, io_err as err, key, median, namespace, percentile, ratio, round3};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory for the daemons' data and the raw disk reference.
    #[arg(long, default_value = "target/bench-daemon")]
    dir: PathBuf,
    /// Bytes moved per measurement, in MiB (the working set).
    #[arg(long, default_value_t = 512)]
    total_mib: usize,
    /// Block size in KiB.
    #[arg(long, default_value_t = 2048)]
    block_kib: usize,
    /// Blocks per Put or Get request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Rounds; each figure is the median over rounds, references included.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Lookups timed for the latency percentiles; also the number of
    /// one-block puts and gets timed.
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with small sizes, for CI: figures are not goals.
    #[arg(long)]
    smoke: bool,
}

pub(crate) use kvtier_testkit::Daemon;

/// A kvtierd from the test kit, found beside this binary, without metrics,
/// stopped gracefully (SIGTERM, drain) when dropped.
pub(crate) fn start_daemon(data_dir: &Path, env: &[(&str, String)]) -> kvtier::Result<Daemon> {
    let mut all: Vec<(&str, &str)> = vec![("KVTIER_METRICS_LISTEN", "")];
    all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    Daemon::try_start(data_dir, &all)
        .map(Daemon::terminate_on_drop)
        .map_err(|e| kvtier::Error::new(kvtier::ErrorKind::Unavailable, e))
}

/// One plain TCP stream on loopback moving `src` in `block`-sized writes.
pub(crate) fn loopback_round(src: &[u8], block: usize) -> kvtier::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("bind: {e}")))?;
    let addr = l.local_addr().map_err(|e| err(format!("addr: {e}")))?;
    let total = src.len();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = AlignedBuf::new(block);
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        s.write_all(&[1])
    });
    let mut c = TcpStream::connect(addr).map_err(|e| err(format!("connect: {e}")))?;
    c.set_nodelay(true).map_err(|e| err(format!("nodelay: {e}")))?;
    let t = Instant::now();
    for chunk in src.chunks(block) {
        c.write_all(chunk).map_err(|e| err(format!("write: {e}")))?;
    }
    let mut ack = [0u8];
    c.read_exact(&mut ack).map_err(|e| err(format!("ack: {e}")))?;
    let secs = t.elapsed().as_secs_f64();
    server
        .join()
        .expect("server thread")
        .map_err(|e| err(format!("server: {e}")))?;
    Ok(gbps(total, secs))
}

pub(crate) struct Round {
    pub(crate) put: f64,
    pub(crate) get: f64,
}

/// CPU seconds this process and kvtierd `pid` have used so far (NaN when
/// /proc cannot tell): with the bytes moved, CPU seconds per GB, a figure a
/// machine shared with other work does not skew the way it skews GB/s.
fn cpu_now(pid: i32) -> f64 {
    cpu_seconds(None).unwrap_or(f64::NAN) + cpu_seconds(Some(pid)).unwrap_or(f64::NAN)
}

/// A streamed round's GB/s and CPU seconds per GB (both processes).
struct StreamRound {
    gbps: Round,
    put_cpu_s_per_gb: f64,
    get_cpu_s_per_gb: f64,
}

/// Puts every block of `src` in requests of `batch` blocks, gets them back
/// into `dst`, checks them, and deletes them; `pid` is kvtierd's.
#[allow(clippy::too_many_arguments)]
async fn daemon_round(
    c: &Client,
    pid: i32,
    ns: NamespaceId,
    round: usize,
    src: &Bytes,
    dst: &mut [u8],
    block: usize,
    batch: usize,
) -> kvtier::Result<StreamRound> {
    let n = src.len() / block;
    let keys: Vec<BlockKey> = (0..n).map(|i| key(ns, 1000 + round, i)).collect();
    let step = batch * block;
    let gb = src.len() as f64 / 1e9;
    let (cpu, t) = (cpu_now(pid), Instant::now());
    for (i, ks) in keys.chunks(batch).enumerate() {
        let data = src.slice(i * step..i * step + ks.len() * block);
        c.put(ns, ks, data).await.map_err(|s| err(format!("put: {s}")))?;
    }
    let put = gbps(src.len(), t.elapsed().as_secs_f64());
    let put_cpu_s_per_gb = (cpu_now(pid) - cpu) / gb;
    let (cpu, t) = (cpu_now(pid), Instant::now());
    for (i, (ks, out)) in keys.chunks(batch).zip(dst.chunks_mut(step)).enumerate() {
        let h = c.get_into(ns, ks, out).await.map_err(|s| err(format!("get: {s}")))?;
        if h.loaded as usize != ks.len() {
            return Err(err(format!("get {i}: {} of {} blocks came back", h.loaded, ks.len())));
        }
    }
    let get = gbps(src.len(), t.elapsed().as_secs_f64());
    let get_cpu_s_per_gb = (cpu_now(pid) - cpu) / gb;
    if src[..] != dst[..src.len()] {
        return Err(err("blocks came back altered"));
    }
    for ks in keys.chunks(4096) {
        c.delete(ns, ks).await.map_err(|s| err(format!("delete: {s}")))?;
    }
    Ok(StreamRound {
        gbps: Round { put, get },
        put_cpu_s_per_gb,
        get_cpu_s_per_gb,
    })
}

/// The same-host path: blocks go from one shared region and come back into
/// another; only keys cross the socket.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn region_round(
    c: &Client,
    ns: NamespaceId,
    round: usize,
    src: (&SharedRegion, u64),
    dst: (&SharedRegion, u64),
    total: usize,
    block: usize,
    batch: usize,
) -> kvtier::Result<Round> {
    let n = total / block;
    let keys: Vec<BlockKey> = (0..n).map(|i| key(ns, 2000 + round, i)).collect();
    let step = (batch * block) as u64;
    let t = Instant::now();
    for (i, ks) in keys.chunks(batch).enumerate() {
        c.put_region(ns, ks, src.1, i as u64 * step)
            .await
            .map_err(|s| err(format!("put_region: {s}")))?;
    }
    let put = gbps(total, t.elapsed().as_secs_f64());
    let t = Instant::now();
    for (i, ks) in keys.chunks(batch).enumerate() {
        let h = c
            .get_region(ns, ks, dst.1, i as u64 * step)
            .await
            .map_err(|s| err(format!("get_region: {s}")))?;
        if h.loaded as usize != ks.len() {
            return Err(err(format!(
                "get_region {i}: {} of {} blocks came back",
                h.loaded,
                ks.len()
            )));
        }
    }
    let get = gbps(total, t.elapsed().as_secs_f64());
    if src.0.as_slice()[..total] != dst.0.as_slice()[..total] {
        return Err(err("blocks came back altered through the region"));
    }
    for ks in keys.chunks(4096) {
        c.delete(ns, ks).await.map_err(|s| err(format!("delete: {s}")))?;
    }
    Ok(Round { put, get })
}

/// A client of `endpoint` with the bench namespace and both regions registered.
pub(crate) async fn session(
    endpoint: &str,
    block: usize,
    src: &SharedRegion,
    dst: &SharedRegion,
) -> kvtier::Result<(Client, NamespaceId, u64, u64)> {
    let c = Client::connect(&ClientConfig {
        endpoint: endpoint.to_string(),
        ..Default::default()
    })
    .await?;
    let (ns, _) = c
        .register(&namespace("bench-daemon", block))
        .await
        .map_err(|s| err(s.to_string()))?;
    let src_id = c.register_region(src).await.map_err(|s| err(s.to_string()))?;
    let dst_id = c.register_region(dst).await.map_err(|s| err(s.to_string()))?;
    Ok((c, ns, src_id, dst_id))
}

/// Latency of 64-key prefix lookups, all present. Block size does not enter
/// a lookup, so the prefix is stored in 4 KiB blocks of a namespace of its own.
async fn lookup_latency(c: &Client, n: usize) -> kvtier::Result<(f64, f64)> {
    let block = 4096;
    let (ns, _) = c
        .register(&namespace("bench-lookup", block))
        .await
        .map_err(|s| err(s.to_string()))?;
    let keys: Vec<BlockKey> = (0..64).map(|i| key(ns, 999, i)).collect();
    let data = Bytes::from(vec![5u8; 64 * block]);
    c.put(ns, &keys, data).await.map_err(|s| err(format!("put: {s}")))?;
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let l = c.lookup(ns, &keys).await.map_err(|s| err(format!("lookup: {s}")))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if l.hit_blocks != 64 {
            return Err(err(format!("lookup found {} of 64", l.hit_blocks)));
        }
    }
    c.delete(ns, &keys).await.map_err(|s| err(format!("delete: {s}")))?;
    us.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

/// The block size of the one-block latency figures.
const ONE_BLOCK_BYTES: usize = 128 << 10;

/// Latency percentiles (p50, p99) in µs of `n` one-block Puts, then `n`
/// one-block Gets of one 128 KiB block over the streamed gRPC path, on the
/// client's warm connection: the round trip a remote client (`kvtier get`)
/// or a peer waits for one block. Every Get is checked byte for byte.
async fn one_block_latency(c: &Client, n: usize) -> kvtier::Result<OneBlock> {
    let (ns, _) = c
        .register(&namespace("bench-one-block", ONE_BLOCK_BYTES))
        .await
        .map_err(|s| err(s.to_string()))?;
    let k = key(ns, 998, 0);
    let mut b = AlignedBuf::new(ONE_BLOCK_BYTES);
    fill(&mut b, 23);
    let data = Bytes::from_owner(b);
    let (mut put_us, mut get_us) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // A few untimed calls first: the connection and both sides' buffers warm.
    for i in 0..n + 8 {
        let t = Instant::now();
        c.put(ns, &[k], data.clone())
            .await
            .map_err(|s| err(format!("put: {s}")))?;
        if i >= 8 {
            put_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    for i in 0..n + 8 {
        let t = Instant::now();
        let g = c.get(ns, &[k]).await.map_err(|s| err(format!("get: {s}")))?;
        if i >= 8 {
            get_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if g.loaded != 1 || g.data != data {
            return Err(err(format!(
                "one-block get {i}: the block came back altered or missing"
            )));
        }
    }
    c.delete(ns, &[k]).await.map_err(|s| err(format!("delete: {s}")))?;
    Ok(OneBlock {
        put_p50_us: percentile(&mut put_us, 50.0),
        put_p99_us: percentile(&mut put_us, 99.0),
        get_p50_us: percentile(&mut get_us, 50.0),
        get_p99_us: percentile(&mut get_us, 99.0),
    })
}

/// [`one_block_latency`]'s percentiles.
struct OneBlock {
    put_p50_us: f64,
    put_p99_us: f64,
    get_p50_us: f64,
    get_p99_us: f64,
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    let (total, rounds, lookups) = if a.smoke {
        (32usize << 20, 1, 200)
    } else {
        (a.total_mib << 20, a.rounds.max(1), a.lookups.max(10))
    };
    let block = a.block_kib << 10;
    let batch = a.batch.max(1);
    if block == 0 || !block.is_multiple_of(4096) || total < block * batch {
        return Err(err(
            "block must be a multiple of 4 KiB, and the total at least one batch",
        ));
    }
    let total = total / (block * batch) * (block * batch);
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| err(format!("create {}: {e}", a.dir.display())))?;
    // The same bytes feed every measurement; keys differ per round.
    let mut src_buf = AlignedBuf::new(total);
    fill(&mut src_buf, 11);
    let src = Bytes::from_owner(src_buf);
    let mut dst = AlignedBuf::new(total);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err(format!("runtime: {e}")))?;

    // Regions live on a tmpfs when there is one, as they would in production.
    let shm_dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        a.dir.clone()
    };
    let mut src_region = SharedRegion::create(&shm_dir, total).map_err(|e| err(format!("region: {e}")))?;
    src_region.as_mut_slice()[..total].copy_from_slice(&src);
    let dst_region = SharedRegion::create(&shm_dir, total).map_err(|e| err(format!("region: {e}")))?;
    let shm_env = ("KVTIER_SHM_DIR", shm_dir.display().to_string());

    // The request path: host RAM holds the working set.
    let tiered = start_daemon(
        &a.dir.join("tiered"),
        &[
            ("KVTIER_MODE", "tiered".into()),
            ("KVTIER_HOST_CAPACITY_BYTES", (total as u64 + (64 << 20)).to_string()),
            ("KVTIER_DISK_CAPACITY_BYTES", (512u64 << 20).to_string()),
            (
                "KVTIER_MAX_REQUEST_BYTES",
                ((batch * block) as u64).max(64 << 20).to_string(),
            ),
            shm_env.clone(),
        ],
    )?;
    let (mut tcp, mut put, mut get, mut rput, mut rget, mut sput, mut sget) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut stream_put, mut stream_get, mut ssd_stream_put, mut ssd_stream_get) = (vec![], vec![], vec![], vec![]);
    let (mut tcp_cpu, mut stream_put_cpu, mut stream_get_cpu) = (vec![], vec![], vec![]);
    let pid = tiered.pid();
    let ((p50, p99), one) = rt.block_on(async {
        let (c, ns, src_id, dst_id) = session(&tiered.endpoint(), block, &src_region, &dst_region).await?;
        for r in 0..rounds {
            let cpu = cpu_seconds(None).unwrap_or(f64::NAN);
            tcp.push(loopback_round(&src, block)?);
            tcp_cpu.push((cpu_seconds(None).unwrap_or(f64::NAN) - cpu) / (src.len() as f64 / 1e9));
            let d = region_round(
                &c,
                ns,
                r,
                (&src_region, src_id),
                (&dst_region, dst_id),
                total,
                block,
                batch,
            )
            .await?;
            put.push(d.put);
            get.push(d.get);
            let d = daemon_round(&c, pid, ns, r, &src, &mut dst, block, batch).await?;
            stream_put.push(d.gbps.put);
            stream_get.push(d.gbps.get);
            stream_put_cpu.push(d.put_cpu_s_per_gb);
            stream_get_cpu.push(d.get_cpu_s_per_gb);
        }
        let l = lookup_latency(&c, lookups).await?;
        Ok::<_, kvtier::Error>((l, one_block_latency(&c, lookups).await?))
    })?;
    drop(tiered);

    // SSD-only, next to raw O_DIRECT in the same directory.
    let ssd = start_daemon(
        &a.dir.join("ssd-only"),
        &[
            ("KVTIER_MODE", "ssd-only".into()),
            (
                "KVTIER_DISK_CAPACITY_BYTES",
                (total as u64 * 4).max(1 << 30).to_string(),
            ),
            (
                "KVTIER_MAX_REQUEST_BYTES",
                ((batch * block) as u64).max(64 << 20).to_string(),
            ),
            shm_env.clone(),
        ],
    )?;
    let pid = ssd.pid();
    rt.block_on(async {
        let (c, ns, src_id, dst_id) = session(&ssd.endpoint(), block, &src_region, &dst_region).await?;
        for r in 0..rounds {
            let raw = raw_disk_round(&a.dir, &src, &mut dst, block)?;
            rput.push(raw.put);
            rget.push(raw.get);
            let d = region_round(
                &c,
                ns,
                r,
                (&src_region, src_id),
                (&dst_region, dst_id),
                total,
                block,
                batch,
            )
            .await?;
            sput.push(d.put);
            sget.push(d.get);
            let d = daemon_round(&c, pid, ns, r, &src, &mut dst, block, batch).await?;
            ssd_stream_put.push(d.gbps.put);
            ssd_stream_get.push(d.gbps.get);
        }
        Ok::<_, kvtier::Error>(())
    })?;
    drop(ssd);
    let _ = std::fs::remove_dir_all(&a.dir);

    let (tcp_m, put_m, get_m) = (median(tcp.clone()), median(put.clone()), median(get.clone()));
    let (rw, rr, sp, sg) = (
        median(rput.clone()),
        median(rget.clone()),
        median(sput.clone()),
        median(sget.clone()),
    );
    let (gsp, gsg) = (median(stream_put.clone()), median(stream_get.clone()));
    let stream_met = gsp / tcp_m >= 0.6 && gsg / tcp_m >= 0.6;
    let goals = json!({
        "request_path_ratio_min": 0.6,
        "ssd_only_ratio_min": 0.8,
        "lookup_p99_us_max": 500,
        "grpc_stream_ratio_min": 0.6,
        "grpc_stream_met": stream_met,
        "grpc_get_one_block_p99_us_max": 2000,
        "grpc_get_one_block_met": one.get_p99_us <= 2000.0,
        "met": put_m / tcp_m >= 0.6 && get_m / tcp_m >= 0.6 && sp / rw >= 0.8 && sg / rr >= 0.8 && p99 < 500.0
            && stream_met && one.get_p99_us <= 2000.0,
    });
    let out = json!({
        "bench": "daemon",
        "smoke": a.smoke,
        "block_bytes": block,
        "blocks_per_request": batch,
        "total_bytes": total,
        "rounds": rounds,
        "loopback_tcp_gbps": round3(tcp_m),
        "put_gbps": round3(put_m),
        "get_gbps": round3(get_m),
        "put_ratio": round3(put_m / tcp_m),
        "get_ratio": round3(get_m / tcp_m),
        "raw_disk_write_gbps": round3(rw),
        "raw_disk_read_gbps": round3(rr),
        "ssd_only_put_gbps": round3(sp),
        "ssd_only_get_gbps": round3(sg),
        "ssd_only_put_ratio": round3(sp / rw),
        "ssd_only_get_ratio": round3(sg / rr),
        "data_path": "shared-memory regions (same-host client); grpc_stream_* send the bytes over the socket",
        "grpc_stream_put_gbps": round3(gsp),
        "grpc_stream_get_gbps": round3(gsg),
        "grpc_stream_put_ratio": ratio(gsp, tcp_m),
        "grpc_stream_get_ratio": ratio(gsg, tcp_m),
        "ssd_only_grpc_stream_put_gbps": round3(median(ssd_stream_put.clone())),
        "ssd_only_grpc_stream_get_gbps": round3(median(ssd_stream_get.clone())),
        "lookup_keys": 64,
        "lookups": lookups,
        "lookup_p50_us": round3(p50),
        "lookup_p99_us": round3(p99),
        "goals": goals,
    });
    let (tcp_cpu_m, put_cpu_m, get_cpu_m) = (median(tcp_cpu), median(stream_put_cpu), median(stream_get_cpu));
    let more = json!({
        "cpu_s_per_gb": {
            "what": "CPU seconds (user and system) per GB moved: the loopback copy's two threads; the bench client and kvtierd together for the streamed gRPC path",
            "loopback_tcp": round3(tcp_cpu_m),
            "grpc_stream_put": round3(put_cpu_m),
            "grpc_stream_get": round3(get_cpu_m),
            "grpc_stream_put_ratio_to_loopback_tcp": ratio(put_cpu_m, tcp_cpu_m),
            "grpc_stream_get_ratio_to_loopback_tcp": ratio(get_cpu_m, tcp_cpu_m),
        },
        "one_block_bytes": ONE_BLOCK_BYTES,
        "one_block_calls": lookups,
        "grpc_put_one_block_p50_us": round3(one.put_p50_us),
        "grpc_put_one_block_p99_us": round3(one.put_p99_us),
        "grpc_get_one_block_p50_us": round3(one.get_p50_us),
        "grpc_get_one_block_p99_us": round3(one.get_p99_us),
        "per_round": {
            "loopback_tcp_gbps": tcp, "put_gbps": put, "get_gbps": get,
            "raw_disk_write_gbps": rput, "raw_disk_read_gbps": rget,
            "ssd_only_put_gbps": sput, "ssd_only_get_gbps": sget,
            "grpc_stream_put_gbps": stream_put, "grpc_stream_get_gbps": stream_get,
        },
    });
    let mut out = out;
    if let (Some(o), serde_json::Value::Object(m)) = (out.as_object_mut(), more) {
        o.extend(m);
    }
    crate::print_json(&out, a.json);
    Ok(())
}
