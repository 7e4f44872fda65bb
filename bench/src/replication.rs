//! `kvtier-bench replication`: a 3-node kvtierd cluster on 127.0.0.1, each
//! node writing back to one Azurite (the real Azure Storage emulator), and
//! the same checkpoint written the way training jobs do it today.
//!
//! In one run:
//!
//! - `loopback_tcp_gbps`, the reference: one plain TCP stream on loopback
//!   moving the same bytes in the same block size (as in `daemon`).
//! - Fan-out: for R = 1, 2, 3 a namespace of its own; the same logical
//!   bytes Put through node `a` in large blocks, one request after another.
//!   `fanout_gbps_rN` is logical bytes acknowledged (all R copies written)
//!   per second. The coordinator is not always a replica (placement is
//!   by slots, rendezvous over all members per slot), so the replica bytes
//!   moved over the network are computed from placement for every key and
//!   must equal the cluster's own `replica_blocks_received` counters.
//! - `bytes_to_blob_ratio` for every R: after each namespace's writeback
//!   drains on every node, the object bytes uploaded across the nodes, less
//!   the 64-byte object header of each PUT, over the logical bytes: 1.0
//!   when exactly one replica uploads each key.
//! - A checkpoint of a few files, the kvtier way (files written, then
//!   `Checkpoints::put_dir` through node `a`: acknowledged once 3 copies
//!   exist, so it survives the writer's loss) and restored on node `b`; and
//!   the baseline way (files written and fsynced locally, then uploaded to
//!   Azurite in blocks with a few in flight, as a background copy does; safe
//!   only once the upload completes) and restored by a download from blob.
//!   Every restored byte is compared with what was written.
//! - `blob_requests_per_node_per_s`: every blob request the nodes sent
//!   during the workload (the fan-outs, their drains, the checkpoint put and
//!   its drain, the restore), by kind, per node per second; the same per
//!   GiB of logical bytes written (`blob_requests_per_gib`), and
//!   `head_to_put_ratio`: HEADs come only from replicas that did not hear
//!   from a key's uploader within their bound (goal: at most 0.1).
//!
//! Everything shares one machine: the three nodes write to one disk (raw
//! O_DIRECT writes in the same directory are printed as a second
//! reference), and Azurite on loopback is a far faster "blob" than a
//! remote service, which flatters the baseline.
//!
//! A mismatch in any count or byte is a failure exit, not a number.

use bytes::Bytes;
use kvtier::checkpoint::Checkpoints;
use kvtier::replication::placement::{self, Member};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, SlotTable};
use kvtier::tier::blob::azurite::{self, Azurite};
use kvtier::tier::blob::container::{SharedKey, create_container};
use kvtier::{AlignedBuf, BlockKey, ErrorKind, Result};
use kvtier_client::{Client, ClientConfig};
use kvtier_proto::proto;
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::{ClientOptions, ObjectStoreExt, WriteMultipart};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, loopback_round, start_daemon};
use crate::tiers::raw_disk_round;
use crate::util::{Invariants, fill, gbps, key, median, namespace, ratio, report, round3};

/// The nodes' container for writeback.
const CONTAINER: &str = "kvtier-bench-replication";
/// The baseline's container (its own, so listings never mix).
const BASELINE_CONTAINER: &str = "kvtier-bench-baseline";
/// Node ids; the bench's client talks to the first, restores on the second.
const NODES: [&str; 3] = ["a", "b", "c"];
/// The replica counts measured.
const R_VALUES: [usize; 3] = [1, 2, 3];
/// What an object adds to its data in blob (the record header).
const OBJECT_OVERHEAD_BYTES: u64 = kvtier::tier::blob::object::OBJECT_OVERHEAD_BYTES as u64;
/// The checkpoint group.
const GROUP: &str = "bench";
/// Baseline upload blocks in flight per file (a background copy's
/// parallelism).
const UPLOAD_CONCURRENCY: usize = 4;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Logical bytes Put for each R, in MiB.
    #[arg(long, default_value_t = 256)]
    fanout_mib: usize,
    /// Block size of the fan-out namespaces, in KiB.
    #[arg(long, default_value_t = 2048)]
    block_kib: usize,
    /// Blocks per Put request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Checkpoint size in MiB, split evenly over `--checkpoint-files`.
    #[arg(long, default_value_t = 256)]
    checkpoint_mib: usize,
    /// Files in the checkpoint.
    #[arg(long, default_value_t = 4)]
    checkpoint_files: usize,
    /// Checkpoint chunk size in MiB (also the baseline's upload block).
    #[arg(long, default_value_t = 32)]
    chunk_mib: usize,
    /// Directory for the nodes' data and the checkpoint files (removed
    /// after).
    #[arg(long, default_value = "target/bench-replication")]
    dir: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with small sizes, for CI: figures are not goals.
    #[arg(long)]
    smoke: bool,
}

use crate::fail;

fn io(msg: impl Into<String>) -> kvtier::Error {
    fail(ErrorKind::Io, msg)
}

/// The sizes, after `--smoke` and validation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sizes {
    fanout_bytes: usize,
    block: usize,
    batch: usize,
    checkpoint_files: usize,
    file_bytes: usize,
    chunk_bytes: usize,
}

impl Sizes {
    fn of(a: &Args) -> Result<Self> {
        let (fanout_mib, block_kib, batch, ckpt_mib, files, chunk_mib) = if a.smoke {
            (16, 1024, 4, 12, 3, 1)
        } else {
            (
                a.fanout_mib,
                a.block_kib,
                a.batch,
                a.checkpoint_mib,
                a.checkpoint_files,
                a.chunk_mib,
            )
        };
        let bad = |m: &str| Err(fail(ErrorKind::InvalidArgument, m));
        if block_kib == 0 || !block_kib.is_multiple_of(4) || batch == 0 {
            return bad("--block-kib must be a non-zero multiple of 4, --batch > 0");
        }
        let (block, fanout_bytes) = (block_kib << 10, fanout_mib << 20);
        if fanout_bytes < block * batch {
            return bad("--fanout-mib must hold one request (--batch blocks)");
        }
        let chunk_bytes = chunk_mib << 20;
        if !(1..=256).contains(&chunk_mib) {
            return bad("--chunk-mib must be 1 to 256 (what a checkpoint group allows)");
        }
        if files == 0 || ckpt_mib == 0 || (ckpt_mib << 20) < files {
            return bad("--checkpoint-mib and --checkpoint-files must be > 0");
        }
        Ok(Self {
            fanout_bytes: fanout_bytes / (block * batch) * (block * batch),
            block,
            batch,
            checkpoint_files: files,
            file_bytes: (ckpt_mib << 20) / files,
            chunk_bytes,
        })
    }

    fn blocks(&self) -> usize {
        self.fanout_bytes / self.block
    }

    fn checkpoint_bytes(&self) -> usize {
        self.file_bytes * self.checkpoint_files
    }
}

/// Free 127.0.0.1 ports: bound, read, released (a race another process
/// could win, as in the server's cluster tests).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let ls = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| io(format!("bind: {e}")))?;
    ls.iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| io(format!("addr: {e}"))))
        .collect()
}

/// Three kvtierd processes sharing one config file; each sets its own id,
/// listener and data dir in the environment, and writes back to Azurite.
struct Cluster {
    members: Vec<Member>,
    daemons: Vec<Daemon>,
}

impl Cluster {
    fn start(dir: &Path, az: &Azurite, disk_capacity_bytes: u64, max_request_bytes: u64) -> Result<Self> {
        let ports = free_ports(NODES.len())?;
        let members: Vec<Member> = NODES
            .iter()
            .zip(&ports)
            .map(|(id, p)| Member::new(*id, format!("127.0.0.1:{p}")))
            .collect();
        let list: Vec<String> = members
            .iter()
            .map(|m| format!("  {{ id = \"{}\", addr = \"{}\" }},", m.id, m.addr))
            .collect();
        // Heartbeats tolerant of a 2-core machine under load: a node is down
        // after 3 s without an answer, not after a busy moment.
        let config = dir.join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnode_id = \"a\"\nheartbeat_interval_ms = 200\nsuspect_after = 5\ndown_after = 15\npeer_timeout_ms = 10000\nmembers = [\n{}\n]\n",
                list.join("\n")
            ),
        )
        .map_err(|e| io(format!("write {}: {e}", config.display())))?;
        let endpoint = az.endpoint();
        let mut daemons = Vec::new();
        for (id, port) in NODES.iter().zip(&ports) {
            let env = [
                ("KVTIER_CONFIG", config.display().to_string()),
                ("KVTIER_CLUSTER_NODE_ID", id.to_string()),
                ("KVTIER_LISTEN", format!("127.0.0.1:{port}")),
                ("KVTIER_MODE", "ssd-only".into()),
                ("KVTIER_DISK_CAPACITY_BYTES", disk_capacity_bytes.to_string()),
                ("KVTIER_MAX_REQUEST_BYTES", max_request_bytes.to_string()),
                ("KVTIER_BLOB_ACCOUNT", azurite::ACCOUNT.into()),
                ("KVTIER_BLOB_CONTAINER", CONTAINER.into()),
                ("KVTIER_BLOB_ENDPOINT", endpoint.clone()),
                ("KVTIER_BLOB_MODE", "writeback".into()),
                ("AZURE_STORAGE_ACCOUNT_KEY", azurite::KEY.into()),
            ];
            daemons.push(start_daemon(&dir.join(id), &env)?);
        }
        Ok(Self { members, daemons })
    }

    async fn clients(&self) -> Result<Vec<Client>> {
        let mut out = Vec::new();
        for d in &self.daemons {
            out.push(
                Client::connect(&ClientConfig {
                    endpoint: d.endpoint(),
                    ..Default::default()
                })
                .await?,
            );
        }
        Ok(out)
    }
}

/// Polls `check` every 20 ms until it answers true, for at most `secs`.
async fn eventually<F, Fut>(what: &str, secs: u64, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await? {
        if Instant::now() > deadline {
            return Err(io(format!("timed out after {secs} s waiting until {what}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What the nodes' counters say, summed over nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counters {
    put: u64,
    get: u64,
    head: u64,
    delete: u64,
    list: u64,
    errors: u64,
    already_present: u64,
    bytes_up: u64,
    bytes_down: u64,
    replica_blocks_received: u64,
    replica_writes_sent: u64,
    replica_writes_failed: u64,
    /// Pending uploads dropped on an uploader's notice (no request).
    confirmed_by_peers: u64,
    /// Checks of blob (HEADs) for keys another replica uploads.
    peer_checks: u64,
}

impl Counters {
    async fn of(clients: &[Client]) -> Result<Self> {
        let mut c = Self::default();
        for cl in clients {
            let s = cl.stats_reply().await.map_err(|s| io(format!("stats: {s}")))?;
            let b = s.blob.ok_or_else(|| io("a node has no blob tier"))?;
            let k = s.cluster.ok_or_else(|| io("a node is not in a cluster"))?;
            c.put += b.put_requests;
            c.get += b.get_requests;
            c.head += b.head_requests;
            c.delete += b.delete_requests;
            c.list += b.list_requests;
            c.errors += b.request_errors;
            c.already_present += b.already_present;
            c.bytes_up += b.bytes_up;
            c.bytes_down += b.bytes_down;
            c.replica_blocks_received += k.replica_blocks_received;
            c.replica_writes_sent += k.replica_writes_sent;
            c.replica_writes_failed += k.replica_writes_failed;
            let w = s.writeback.ok_or_else(|| io("a node is not in writeback mode"))?;
            c.confirmed_by_peers += w.confirmed_by_peers;
            c.peer_checks += w.peer_checks;
        }
        Ok(c)
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            put: self.put - before.put,
            get: self.get - before.get,
            head: self.head - before.head,
            delete: self.delete - before.delete,
            list: self.list - before.list,
            errors: self.errors - before.errors,
            already_present: self.already_present - before.already_present,
            bytes_up: self.bytes_up - before.bytes_up,
            bytes_down: self.bytes_down - before.bytes_down,
            replica_blocks_received: self.replica_blocks_received - before.replica_blocks_received,
            replica_writes_sent: self.replica_writes_sent - before.replica_writes_sent,
            replica_writes_failed: self.replica_writes_failed - before.replica_writes_failed,
            confirmed_by_peers: self.confirmed_by_peers - before.confirmed_by_peers,
            peer_checks: self.peer_checks - before.peer_checks,
        }
    }

    /// Data bytes uploaded: object bytes less each PUT's header.
    fn data_bytes_up(&self) -> u64 {
        self.bytes_up - self.put * OBJECT_OVERHEAD_BYTES
    }
}

/// Waits until no node has blocks left to upload.
async fn drained(clients: &[Client]) -> Result<()> {
    eventually("every node's writeback drains", 300, || async {
        for c in clients {
            let s = c.stats_reply().await.map_err(|s| io(format!("stats: {s}")))?;
            if s.writeback.map_or(1, |w| w.pending_blocks) > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// Waits until every node sees every member up.
async fn all_up(clients: &[Client]) -> Result<()> {
    eventually("every node sees every member up", 30, || async {
        for c in clients {
            let s = c.stats_reply().await.map_err(|s| io(format!("stats: {s}")))?;
            let k: proto::ClusterStats = s.cluster.ok_or_else(|| io("a node is not in a cluster"))?;
            if k.members.len() != NODES.len() || k.members.iter().any(|m| m.liveness != "up") {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// The placement of `members` as the nodes compute it (default slots).
fn placed(members: &[Member]) -> SlotTable {
    SlotTable::new(members, DEFAULT_SLOTS, MAX_R).expect("a valid member list")
}

/// Copies of `keys` with `r` replicas that placement sends to a node other
/// than the coordinator `me`: the replica blocks that cross the network.
fn peer_blocks(keys: &[BlockKey], members: &[Member], r: usize, me: &placement::NodeId) -> u64 {
    let table = placed(members);
    keys.iter()
        .map(|k| table.rank_prefix(k).take(r).filter(|m| m.id != *me).count() as u64)
        .sum()
}

/// One replica count's fan-out.
#[derive(Debug)]
struct Fanout {
    r: usize,
    ack_s: f64,
    drain_s: f64,
    /// Blocks written to a node other than the coordinator, by placement.
    peer_blocks: u64,
    counters: Counters,
}

/// Puts every block of `src` through `clients[0]` in namespace with `r`
/// replicas, waits for the writeback to drain, and checks the counters.
async fn fanout(clients: &[Client], members: &[Member], s: &Sizes, r: usize, src: &Bytes) -> Result<Fanout> {
    let a = &clients[0];
    let def = namespace(&format!("bench-replication-r{r}"), s.block);
    a.register_replicated(&def, Some(r as u32), None)
        .await
        .map_err(|e| io(format!("register R={r}: {e}")))?;
    let ns = def.id();
    let keys: Vec<BlockKey> = (0..s.blocks()).map(|i| key(ns, r, i)).collect();
    let peer_blocks = peer_blocks(&keys, members, r, &members[0].id);
    let before = Counters::of(clients).await?;
    let step = s.batch * s.block;
    let t = Instant::now();
    // PUTS_IN_FLIGHT requests at a time, as an engine's connector keeps
    // several stores going.
    let mut set = tokio::task::JoinSet::new();
    let requests: Vec<Vec<BlockKey>> = keys.chunks(s.batch).map(<[BlockKey]>::to_vec).collect();
    for (i, ks) in requests.into_iter().enumerate() {
        if set.len() >= PUTS_IN_FLIGHT {
            put_done(&mut set, r).await?;
        }
        let (a, data) = (a.clone(), src.slice(i * step..i * step + ks.len() * s.block));
        set.spawn(async move {
            let p = a.put(ns, &ks, data).await;
            (i, ks.len(), p.map(|p| p.stored).map_err(|e| e.to_string()))
        });
    }
    while !set.is_empty() {
        put_done(&mut set, r).await?;
    }
    let ack_s = t.elapsed().as_secs_f64();
    drained(clients).await?;
    let drain_s = t.elapsed().as_secs_f64() - ack_s;
    let counters = Counters::of(clients).await?.since(&before);
    let blocks = keys.len() as u64;
    let checks = [
        (
            counters.replica_blocks_received == peer_blocks,
            format!(
                "peers received {} blocks, placement sends {peer_blocks}",
                counters.replica_blocks_received
            ),
        ),
        (
            counters.replica_writes_failed == 0,
            format!("{} replica writes failed", counters.replica_writes_failed),
        ),
        (
            counters.put == blocks && counters.already_present == 0,
            format!(
                "{} blob PUTs ({} refused as present) for {blocks} blocks",
                counters.put, counters.already_present
            ),
        ),
        (
            counters.bytes_up == blocks * (s.block as u64 + OBJECT_OVERHEAD_BYTES),
            format!("{} bytes uploaded for {blocks} blocks", counters.bytes_up),
        ),
        (counters.errors == 0, format!("{} blob request errors", counters.errors)),
    ];
    for (ok, why) in checks {
        if !ok {
            return Err(io(format!("R={r}: {why}")));
        }
    }
    Ok(Fanout {
        r,
        ack_s,
        drain_s,
        peer_blocks,
        counters,
    })
}

/// Fan-out Puts a bench client keeps in flight.
const PUTS_IN_FLIGHT: usize = 4;

/// A Put's request number, blocks, and blocks stored or its error.
type PutTask = (usize, usize, std::result::Result<u32, String>);

/// Waits for one Put of the fan-out; every block must be stored.
async fn put_done(set: &mut tokio::task::JoinSet<PutTask>, r: usize) -> Result<()> {
    let (i, n, p) = set
        .join_next()
        .await
        .expect("a Put in flight")
        .map_err(|e| io(format!("put task: {e}")))?;
    let p = p.map_err(|e| io(format!("put R={r} request {i}: {e}")))?;
    if p as usize != n {
        return Err(io(format!("put R={r} request {i}: {p} of {n} blocks stored")));
    }
    Ok(())
}

/// Checks that every replica of every key holds it, byte for byte, in its
/// own tiers (no peer or blob reads).
async fn verify_replicas(clients: &[Client], members: &[Member], s: &Sizes, r: usize, src: &[u8]) -> Result<u64> {
    let ns = namespace(&format!("bench-replication-r{r}"), s.block).id();
    let table = placed(members);
    let mut checked = 0;
    for i in 0..s.blocks() {
        let k = key(ns, r, i);
        for n in table.replicas(&k, r).map_err(|e| e.into_error())? {
            let at = NODES.iter().position(|id| *id == n.0).expect("a member");
            let g = clients[at]
                .replica_get(ns, &[k])
                .await
                .map_err(|e| io(format!("replica_get: {e}")))?;
            if g.loaded != 1 {
                return Err(io(format!("R={r}: block {i} is missing on its replica {n}")));
            }
            if g.data[..] != src[i * s.block..(i + 1) * s.block] {
                return Err(fail(
                    ErrorKind::ChecksumMismatch,
                    format!("R={r}: block {i} differs on its replica {n}"),
                ));
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// The checkpoint's files, in memory: `(name, bytes)`.
fn checkpoint_files(s: &Sizes, seed: u64) -> Vec<(String, AlignedBuf)> {
    (0..s.checkpoint_files)
        .map(|i| {
            let mut b = AlignedBuf::new(s.file_bytes);
            // Odd seeds: `fill` sets the low bit, and equal files would be
            // one set of chunks (chunks are keyed by content).
            fill(&mut b, seed + 2 * i as u64 + 1);
            (format!("rank-{i:02}.pt"), b)
        })
        .collect()
}

/// Writes `files` under `dir`; with `sync`, fsyncs each file and the dir.
fn write_files(dir: &Path, files: &[(String, AlignedBuf)], sync: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(format!("create {}: {e}", dir.display())))?;
    for (name, data) in files {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).map_err(|e| io(format!("create {}: {e}", p.display())))?;
        f.write_all(data)
            .map_err(|e| io(format!("write {}: {e}", p.display())))?;
        if sync {
            f.sync_all().map_err(|e| io(format!("sync {}: {e}", p.display())))?;
        }
    }
    if sync {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(format!("sync {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Compares every file under `dir` with what was written.
fn verify_files(what: &str, dir: &Path, files: &[(String, AlignedBuf)]) -> Result<u64> {
    let mut bytes = 0;
    for (name, data) in files {
        let p = dir.join(name);
        let got = std::fs::read(&p).map_err(|e| io(format!("{what}: read {}: {e}", p.display())))?;
        if got[..] != data[..] {
            return Err(fail(
                ErrorKind::ChecksumMismatch,
                format!("{what}: {} differs from what was written", p.display()),
            ));
        }
        bytes += got.len() as u64;
    }
    let extra = std::fs::read_dir(dir)
        .map_err(|e| io(format!("{what}: list {}: {e}", dir.display())))?
        .count();
    if extra != files.len() {
        return Err(io(format!(
            "{what}: {extra} entries in {}, {} written",
            dir.display(),
            files.len()
        )));
    }
    Ok(bytes)
}

/// The baseline's client: object_store's Azure client on Azurite.
fn baseline_store(az: &Azurite) -> Result<MicrosoftAzure> {
    MicrosoftAzureBuilder::new()
        .with_account(azurite::ACCOUNT)
        .with_access_key(azurite::KEY)
        .with_container_name(BASELINE_CONTAINER)
        .with_endpoint(az.endpoint())
        .with_client_options(ClientOptions::new().with_allow_http(true))
        .build()
        .map_err(|e| io(format!("object_store: {e}")))
}

/// Uploads each file of `dir` in blocks of `block` bytes, a few in flight,
/// as a background copy does; answers the requests sent.
async fn upload(store: &MicrosoftAzure, dir: &Path, files: &[(String, AlignedBuf)], block: usize) -> Result<u64> {
    let mut requests = 0;
    for (name, _) in files {
        let p = dir.join(name);
        let data = tokio::fs::read(&p)
            .await
            .map_err(|e| io(format!("read {}: {e}", p.display())))?;
        let up = store
            .put_multipart(&object_store::path::Path::from(format!("ckpt/{name}")))
            .await
            .map_err(|e| io(format!("upload {name}: {e}")))?;
        let mut w = WriteMultipart::new_with_chunk_size(up, block);
        let data = Bytes::from(data);
        for o in (0..data.len()).step_by(block) {
            w.wait_for_capacity(UPLOAD_CONCURRENCY)
                .await
                .map_err(|e| io(format!("upload {name}: {e}")))?;
            w.put(data.slice(o..(o + block).min(data.len())));
            requests += 1;
        }
        w.finish().await.map_err(|e| io(format!("upload {name}: {e}")))?;
        requests += 1;
    }
    Ok(requests)
}

/// Downloads each file into `dir`, fsynced; answers the requests sent.
async fn download(store: &MicrosoftAzure, dir: &Path, files: &[(String, AlignedBuf)]) -> Result<u64> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io(format!("create {}: {e}", dir.display())))?;
    for (name, _) in files {
        let b = store
            .get(&object_store::path::Path::from(format!("ckpt/{name}")))
            .await
            .map_err(|e| io(format!("download {name}: {e}")))?
            .bytes()
            .await
            .map_err(|e| io(format!("download {name}: {e}")))?;
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).map_err(|e| io(format!("create {}: {e}", p.display())))?;
        f.write_all(&b).map_err(|e| io(format!("write {}: {e}", p.display())))?;
        f.sync_all().map_err(|e| io(format!("sync {}: {e}", p.display())))?;
    }
    Ok(files.len() as u64)
}

/// Runs the whole benchmark; answers the summary.
fn measure(a: &Args) -> Result<Value> {
    let s = Sizes::of(a)?;
    let bin = azurite::binary();
    if !bin.exists() {
        return Err(fail(
            ErrorKind::Config,
            format!("{} is missing: run scripts/azurite.sh", bin.display()),
        ));
    }
    kvtier_client::install_crypto_provider();
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| io(format!("create {}: {e}", a.dir.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| io(format!("runtime: {e}")))?;

    let mut src_buf = AlignedBuf::new(s.fanout_bytes);
    fill(&mut src_buf, 17);
    let src = Bytes::from_owner(src_buf);
    let files = checkpoint_files(&s, 0xC0FFEE);
    // A second checkpoint of other bytes, for the files-first put (equal
    // bytes would be chunks the cluster holds already).
    let files_2 = checkpoint_files(&s, 0xBEEF00);
    let loopback: Vec<f64> = (0..3).map(|_| loopback_round(&src, s.block)).collect::<Result<_>>()?;
    let loopback_gbps = median(loopback.clone());
    // Every node of this cluster writes to the same disk: a Put with R
    // copies writes R times its bytes there, so raw O_DIRECT writes in the
    // same directory are the second reference.
    let mut scratch = AlignedBuf::new(s.fanout_bytes);
    let raw_disk: Vec<f64> = (0..3)
        .map(|_| raw_disk_round(&a.dir, &src, &mut scratch, s.block).map(|t| t.put))
        .collect::<Result<_>>()?;
    drop(scratch);
    let raw_disk_gbps = median(raw_disk.clone());

    let az = Azurite::start();
    let cred = SharedKey {
        account: azurite::ACCOUNT.into(),
        key: azurite::KEY.into(),
    };
    for c in [CONTAINER, BASELINE_CONTAINER] {
        rt.block_on(create_container(&az.endpoint(), &cred, c))?;
    }
    // Room on every node for every copy it may hold, twice over.
    let per_node = (s.fanout_bytes * R_VALUES.iter().sum::<usize>() + 3 * s.checkpoint_bytes()) as u64;
    let disk_capacity_bytes = (2 * per_node).max(1 << 30);
    let max_request_bytes = ((s.batch * s.block) as u64).max(64 << 20);
    let cluster = Cluster::start(&a.dir, &az, disk_capacity_bytes, max_request_bytes)?;
    let clients = rt.block_on(async {
        let c = cluster.clients().await?;
        all_up(&c).await?;
        Ok::<_, kvtier::Error>(c)
    })?;

    // The workload: the fan-outs, the checkpoint put and its restore; the
    // blob requests the nodes send during it are counted.
    let start = rt.block_on(Counters::of(&clients))?;
    let t_workload = Instant::now();
    let mut fanouts = Vec::new();
    for r in R_VALUES {
        fanouts.push(rt.block_on(fanout(&clients, &cluster.members, &s, r, &src))?);
    }

    // The checkpoint, the kvtier way: the job hands its state to the
    // kvtierd on its node from memory, and it is safe once the put is
    // acknowledged with 3 copies, the writer node's own being its local
    // copy. Its calls block on the runtime, so they run on this thread,
    // outside it.
    let chunk = s.chunk_bytes as u32;
    let before_ckpt = rt.block_on(Counters::of(&clients))?;
    let writer = Checkpoints::new(
        clients[0].checkpoint_chunks(GROUP, chunk, rt.handle().clone()),
        kvtier::Namespace::checkpoints(GROUP, chunk).id(),
        chunk,
    );
    let in_memory: Vec<(String, &[u8])> = files.iter().map(|(n, b)| (n.clone(), &b[..])).collect();
    let t = Instant::now();
    let manifest = writer.put_bytes("step-1", &in_memory)?;
    let time_to_safe_s = t.elapsed().as_secs_f64();
    // The same, files first: written (unsynced) to the local disk, then put
    // from there, as a job that keeps writing files would.
    let kv_src = a.dir.join("ckpt-src");
    let t = Instant::now();
    write_files(&kv_src, &files_2, false)?;
    let kv_write_s = t.elapsed().as_secs_f64();
    let manifest_2 = writer.put_dir("step-2", &kv_src)?;
    let files_first_s = t.elapsed().as_secs_f64();
    let reader_store = clients[1].checkpoint_chunks(GROUP, chunk, rt.handle().clone());
    let reader = Checkpoints::new(reader_store, kvtier::Namespace::checkpoints(GROUP, chunk).id(), chunk);
    // The restore starts once the chunks' uploads are done, as the
    // baseline's download starts on a quiet machine.
    rt.block_on(drained(&clients))?;
    let kv_dest = a.dir.join("ckpt-restore-kvtier");
    let t = Instant::now();
    reader.get("step-1", &kv_dest)?;
    let restore_s = t.elapsed().as_secs_f64();
    let workload_s = t_workload.elapsed().as_secs_f64();
    let end = rt.block_on(Counters::of(&clients))?;
    let kv_restored = verify_files("kvtier restore", &kv_dest, &files)?;
    let ckpt_blob = end.since(&before_ckpt);
    let all = end.since(&start);
    // Chunks and the manifests of both checkpoints, each uploaded once.
    let ckpt_objects = (manifest.chunks() + manifest_2.chunks()) as u64 + 2;
    let ckpt_logical = 2 * s.checkpoint_bytes() as u64 + (manifest.encode().len() + manifest_2.encode().len()) as u64;
    if ckpt_blob.put != ckpt_objects || ckpt_blob.data_bytes_up() != ckpt_logical {
        return Err(io(format!(
            "checkpoint: {} blob PUTs of {} data bytes for {ckpt_objects} objects of {ckpt_logical} bytes",
            ckpt_blob.put,
            ckpt_blob.data_bytes_up()
        )));
    }
    let mut replicas_checked = 0;
    for r in R_VALUES {
        replicas_checked += rt.block_on(verify_replicas(&clients, &cluster.members, &s, r, &src))?;
    }
    drop(clients);
    drop(cluster);

    // The same checkpoint, the baseline way: local files, then a copy to
    // blob; restored by a download.
    let store = baseline_store(&az)?;
    let base_src = a.dir.join("ckpt-baseline");
    let t = Instant::now();
    write_files(&base_src, &files, true)?;
    let base_write_s = t.elapsed().as_secs_f64();
    let upload_requests = rt.block_on(upload(&store, &base_src, &files, s.chunk_bytes))?;
    let baseline_time_to_safe_s = t.elapsed().as_secs_f64();
    let base_dest = a.dir.join("ckpt-restore-baseline");
    let t = Instant::now();
    let download_requests = rt.block_on(download(&store, &base_dest, &files))?;
    let baseline_restore_s = t.elapsed().as_secs_f64();
    let base_restored = verify_files("baseline restore", &base_dest, &files)?;
    drop(az);
    let _ = std::fs::remove_dir_all(&a.dir);

    let logical = s.fanout_bytes as u64;
    let mut fan = serde_json::Map::new();
    let mut out = serde_json::Map::new();
    let mut ratios_ok = true;
    for f in &fanouts {
        let g = gbps(s.fanout_bytes, f.ack_s);
        let blob_ratio = f.counters.data_bytes_up() as f64 / logical as f64;
        ratios_ok &= (blob_ratio - 1.0).abs() <= 0.01;
        out.insert(format!("fanout_gbps_r{}", f.r), json!(round3(g)));
        fan.insert(
            format!("r{}", f.r),
            json!({
                "logical_bytes": logical,
                "ack_s": round3(f.ack_s),
                "fanout_gbps": round3(g),
                "ratio_to_loopback_tcp": ratio(g, loopback_gbps),
                "disk_bytes_written": logical * f.r as u64,
                "disk_write_gbps": round3(g * f.r as f64),
                "disk_write_ratio_to_raw_disk": ratio(g * f.r as f64, raw_disk_gbps),
                "replica_bytes_moved": f.peer_blocks * s.block as u64,
                "replica_bytes_moved_per_logical_byte": round3(f.peer_blocks as f64 / s.blocks() as f64),
                "replica_bytes_moved_gbps": round3(gbps(f.peer_blocks as usize * s.block, f.ack_s)),
                "replica_blocks_received_counted": f.counters.replica_blocks_received,
                "replica_writes_sent": f.counters.replica_writes_sent,
                "drain_s": round3(f.drain_s),
                "blob_put_requests": f.counters.put,
                "blob_bytes_up": f.counters.bytes_up,
                "bytes_to_blob_ratio": round3(blob_ratio),
            }),
        );
    }
    // What fan-out at R = 3 could reach on this machine: two copies leave
    // the coordinator over loopback, and three land on this one disk.
    let bound_r3 = (loopback_gbps / 2.0).min(raw_disk_gbps / 3.0);
    let r3 = fanouts.iter().find(|f| f.r == 3).expect("R = 3 is measured");
    let fanout_r3 = gbps(s.fanout_bytes, r3.ack_s);
    let fanout_r3_met = fanout_r3 >= 0.6 * bound_r3;
    out.insert("fanout_bound_gbps_r3".into(), json!(round3(bound_r3)));
    out.insert("fanout_r3_ratio_to_bound".into(), ratio(fanout_r3, bound_r3));
    out.insert(
        "fanout_bound_r3".into(),
        json!("min(loopback_tcp_gbps / 2, raw_disk_write_gbps / 3): two copies leave the coordinator, three land on this one disk"),
    );
    let per = |n: u64| round3(n as f64 / NODES.len() as f64 / workload_s);
    // Placement at the cluster sizes the README extrapolates to (see
    // `kvtier-bench placement`, which measures only this).
    let sizes: &[(usize, usize)] = if a.smoke {
        &[(1_000, 10_000), (10_000, 10_000)]
    } else {
        &[(10_000, 1_000_000), (100_000, 1_000_000)]
    };
    let mut placement_json = serde_json::Map::new();
    for (m, k) in sizes {
        placement_json.insert(m.to_string(), crate::placement::figures(*m, DEFAULT_SLOTS, *k)?);
    }
    out.insert(
        "placement_by_members".into(),
        json!({
            "what": "slot placement per key (kvtier-bench placement): plan_write at R = 3, the table's build, the moved fraction on a join",
            "members": placement_json,
        }),
    );
    // Rates depend on this machine; requests per logical GiB written do not.
    let workload_logical = (logical * R_VALUES.len() as u64 + ckpt_logical) as f64;
    let per_gib = |n: u64| round3(n as f64 / (workload_logical / (1u64 << 30) as f64));
    let heads_ok = all.head as f64 <= 0.1 * all.put as f64;
    let safer = time_to_safe_s < baseline_time_to_safe_s;
    let faster_restore = restore_s < baseline_restore_s;
    let mut v = json!({
        "bench": "replication",
        "smoke": a.smoke,
        "nodes": NODES.len(),
        "r_values": R_VALUES,
        "service": "Azurite (azurite-blob) on 127.0.0.1; every node in blob writeback mode",
        "block_bytes": s.block,
        "blocks_per_request": s.batch,
        "fanout_logical_bytes_per_r": logical,
        "coordinator": "node a (every Put); placement may leave it out of a key's replicas",
        "loopback_tcp_gbps": round3(loopback_gbps),
        "loopback_tcp_gbps_per_round": loopback,
        "raw_disk_write_gbps": round3(raw_disk_gbps),
        "raw_disk_write_gbps_per_round": raw_disk,
        "one_machine": "the 3 nodes, Azurite and the client share this machine's cores and one disk",
        "fanout": fan,
        "bytes_to_blob_ratio": {
            "r1": round3(fanouts[0].counters.data_bytes_up() as f64 / logical as f64),
            "r2": round3(fanouts[1].counters.data_bytes_up() as f64 / logical as f64),
            "r3": round3(fanouts[2].counters.data_bytes_up() as f64 / logical as f64),
            "headers": "the 64-byte header of each object is left out",
        },
        "checkpoint": {
            "files": s.checkpoint_files,
            "file_bytes": s.file_bytes,
            "bytes": s.checkpoint_bytes(),
            "chunk_bytes": s.chunk_bytes,
            "chunks": manifest.chunks(),
            "replicas": 3,
            "kvtier": {
                "time_to_safe_s": round3(time_to_safe_s),
                "safe_when": "the put from memory is acknowledged with 3 copies on 3 nodes (the writer node's own replica is its local copy)",
                "files_first": {
                    "what": "another checkpoint of the same size, written unsynced to local files first, then put from them",
                    "write_files_s": round3(kv_write_s),
                    "put_s": round3(files_first_s - kv_write_s),
                    "time_to_safe_s": round3(files_first_s),
                    "ratio_to_baseline": ratio(files_first_s, baseline_time_to_safe_s),
                },
                "restore_node": NODES[1],
                "restore_from": "node b's own tiers: with 3 replicas on 3 nodes every node holds every chunk",
                "restore_s": round3(restore_s),
                "restored_bytes_verified": kv_restored,
                "blob_put_requests": ckpt_blob.put,
                "bytes_to_blob_ratio": round3(ckpt_blob.data_bytes_up() as f64 / ckpt_logical as f64),
            },
            "baseline": {
                "write_fsync_s": round3(base_write_s),
                "upload_s": round3(baseline_time_to_safe_s - base_write_s),
                "time_to_safe_s": round3(baseline_time_to_safe_s),
                "safe_when": "the files are written and fsynced locally and the upload to blob completes",
                "upload_block_bytes": s.chunk_bytes,
                "upload_blocks_in_flight": UPLOAD_CONCURRENCY,
                "upload_requests": upload_requests,
                "restore_s": round3(baseline_restore_s),
                "restore": "download from blob into another dir, fsynced",
                "download_requests": download_requests,
                "restored_bytes_verified": base_restored,
            },
        },
        "time_to_safe_s": round3(time_to_safe_s),
        "baseline_time_to_safe_s": round3(baseline_time_to_safe_s),
        "time_to_safe_ratio_to_baseline": ratio(time_to_safe_s, baseline_time_to_safe_s),
        "restore_s": round3(restore_s),
        "baseline_restore_s": round3(baseline_restore_s),
        "restore_ratio_to_baseline": ratio(restore_s, baseline_restore_s),
        "workload_s": round3(workload_s),
        "workload": "the three fan-outs with their writeback drains, the two checkpoint puts and their drain, a restore",
        "blob_requests_per_node_per_s": {
            "put": per(all.put),
            "get": per(all.get),
            "head": per(all.head),
            "delete": per(all.delete),
            "list": per(all.list),
            "total": per(all.put + all.get + all.head + all.delete + all.list),
        },
        "blob_requests": {
            "put": all.put, "get": all.get, "head": all.head, "delete": all.delete, "list": all.list,
            "errors": all.errors,
        },
        "workload_logical_bytes": workload_logical as u64,
        "blob_bytes_up_per_node_per_s": per(all.bytes_up),
        "blob_bytes_down_per_node_per_s": per(all.bytes_down),
        "replica_copies_verified": replicas_checked,
        "verified": "every replica of every fan-out block read back from its node's own tiers, and every restored checkpoint byte, equal to what was written; blob PUTs equal distinct blocks and chunks",
    });
    // Outside the object above: more entries there pass json!'s recursion
    // limit.
    out.insert(
        "goals".into(),
        json!({
            "bytes_to_blob_ratio": "1.0 ± 0.01 for every R",
            "bytes_to_blob_ratio_met": ratios_ok,
            "time_to_safe_s": "below baseline_time_to_safe_s",
            "time_to_safe_met": safer,
            "restore_s": "below baseline_restore_s",
            "restore_met": faster_restore,
            "head_to_put_ratio": "at most 0.1 (HEADs = 0.1 × PUTs)",
            "head_to_put_met": heads_ok,
            "fanout_r3_ratio_to_bound_min": 0.6,
            "fanout_r3_met": fanout_r3_met,
            "met": ratios_ok && safer && faster_restore && heads_ok && fanout_r3_met,
        }),
    );
    out.insert(
        "blob_requests_per_gib".into(),
        json!({
            "put": per_gib(all.put),
            "get": per_gib(all.get),
            "head": per_gib(all.head),
            "delete": per_gib(all.delete),
            "list": per_gib(all.list),
            "total": per_gib(all.put + all.get + all.head + all.delete + all.list),
            "per": "GiB of logical bytes written (workload_logical_bytes), requests of all nodes",
        }),
    );
    out.insert("head_to_put_ratio".into(), ratio(all.head as f64, all.put as f64));
    out.insert(
        "blob_notices".into(),
        json!({
            "what": "pending uploads the non-uploading replicas dropped on the uploader's notice (no request), and their checks of blob (a HEAD each) where no notice came within the bound",
            "confirmed_by_peers": all.confirmed_by_peers,
            "peer_checks": all.peer_checks,
        }),
    );
    out.insert("time_to_safe_files_first_s".into(), json!(round3(files_first_s)));
    out.insert(
        "time_to_safe_files_first_ratio_to_baseline".into(),
        ratio(files_first_s, baseline_time_to_safe_s),
    );
    out.insert(
        "blob_head_requests_from".into(),
        json!(
            "the replicas that do not upload a key, only where the uploader's notice that it landed did not come within the bound (cluster.blob_check_after_ms): one HEAD, then again after twice as long while absent"
        ),
    );
    v.as_object_mut().expect("an object").extend(out);
    Ok(v)
}

pub(crate) fn run(a: &Args) -> Result<()> {
    report(&measure(a)?, a.json, a.smoke.then_some(check_smoke))
}

/// What CI holds a smoke run to: for every R, one upload per logical block
/// (bytes to blob within 1% of the logical bytes), replica bytes as counted
/// by the receivers; two copies leave the coordinator at R = 3; both
/// checkpoints restored whole, each chunk and manifest uploaded once; every
/// replica copy verified; no blob request failed; HEADs at most a tenth of
/// the PUTs (the uploaders' notices spared the other replicas' checks).
fn check_smoke(v: &Value) -> Result<()> {
    let c = Invariants::of("replication --smoke", v);
    let logical = c.u("/fanout_logical_bytes_per_r")?;
    let block = c.u("/block_bytes")?;
    for r in [1, 2, 3] {
        let ratio = c.f(&format!("/bytes_to_blob_ratio/r{r}"))?;
        c.ensure((ratio - 1.0).abs() <= 0.01, || {
            format!("|bytes_to_blob_ratio/r{r} {ratio} - 1.0| <= 0.01")
        })?;
        let f = |k: &str| c.u(&format!("/fanout/r{r}/{k}"));
        let puts = f("blob_put_requests")?;
        c.ensure(puts == logical / block, || {
            format!(
                "fanout/r{r}/blob_put_requests {puts} == fanout_logical_bytes_per_r {logical} / block_bytes {block}"
            )
        })?;
        let (received, moved) = (f("replica_blocks_received_counted")?, f("replica_bytes_moved")?);
        c.ensure(received * block == moved, || {
            format!(
                "fanout/r{r}/replica_blocks_received_counted {received} * block_bytes {block} == replica_bytes_moved {moved}"
            )
        })?;
        let g = c.f(&format!("/fanout_gbps_r{r}"))?;
        c.ensure(g > 0.0, || format!("fanout_gbps_r{r} {g} > 0"))?;
    }
    let bound = c.f("/fanout_bound_gbps_r3")?;
    c.ensure(bound > 0.0, || format!("fanout_bound_gbps_r3 {bound} > 0"))?;
    // R = 3 on 3 nodes: two copies leave the coordinator whatever the placement.
    let moved = c.u("/fanout/r3/replica_bytes_moved")?;
    c.ensure(moved == 2 * logical, || {
        format!("fanout/r3/replica_bytes_moved {moved} == 2 * fanout_logical_bytes_per_r {logical}")
    })?;
    let bytes = c.u("/checkpoint/bytes")?;
    let restored = c.u("/checkpoint/kvtier/restored_bytes_verified")?;
    c.ensure(restored == bytes && bytes > 0, || {
        format!("checkpoint/kvtier/restored_bytes_verified {restored} == checkpoint/bytes {bytes} > 0")
    })?;
    let restored = c.u("/checkpoint/baseline/restored_bytes_verified")?;
    c.ensure(restored == bytes, || {
        format!("checkpoint/baseline/restored_bytes_verified {restored} == checkpoint/bytes {bytes}")
    })?;
    // Two checkpoints of equal size (from memory, then files first): each
    // chunk and manifest uploaded once.
    let (puts, chunks) = (c.u("/checkpoint/kvtier/blob_put_requests")?, c.u("/checkpoint/chunks")?);
    c.ensure(puts == 2 * (chunks + 1), || {
        format!("checkpoint/kvtier/blob_put_requests {puts} == 2 * (checkpoint/chunks {chunks} + 1)")
    })?;
    let safe_s = c.f("/time_to_safe_files_first_s")?;
    c.ensure(safe_s > 0.0, || format!("time_to_safe_files_first_s {safe_s} > 0"))?;
    let copies = c.u("/replica_copies_verified")?;
    c.ensure(copies == 6 * logical / block, || {
        format!("replica_copies_verified {copies} == 6 * fanout_logical_bytes_per_r {logical} / block_bytes {block}")
    })?;
    let errors = c.u("/blob_requests/errors")?;
    c.ensure(errors == 0, || format!("blob_requests/errors {errors} == 0"))?;
    // The replicas that do not upload a key hear that it landed: their
    // checks of blob are the exception.
    let (heads, puts) = (c.u("/blob_requests/head")?, c.u("/blob_requests/put")?);
    c.ensure(10 * heads <= puts && puts > 0, || {
        format!("blob_requests/head {heads} <= 0.1 * blob_requests/put {puts} > 0")
    })?;
    let confirmed = c.u("/blob_notices/confirmed_by_peers")?;
    c.ensure(confirmed > 0, || {
        format!("blob_notices/confirmed_by_peers {confirmed} > 0")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(smoke: bool) -> Args {
        Args {
            fanout_mib: 128,
            block_kib: 2048,
            batch: 8,
            checkpoint_mib: 256,
            checkpoint_files: 4,
            chunk_mib: 32,
            dir: PathBuf::from("unused"),
            json: true,
            smoke,
        }
    }

    #[test]
    fn sizes_round_to_whole_requests_and_files() {
        let mut a = args(false);
        a.fanout_mib = 100;
        let s = Sizes::of(&a).unwrap();
        // 100 MiB in 16 MiB requests: 6 requests.
        assert_eq!(s.fanout_bytes, 96 << 20);
        assert_eq!(s.blocks(), 48);
        assert_eq!(s.checkpoint_bytes(), 256 << 20);
        let smoke = Sizes::of(&args(true)).unwrap();
        assert!(smoke.fanout_bytes < s.fanout_bytes);
        assert_eq!(smoke.chunk_bytes, 1 << 20);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut a = args(false);
        a.block_kib = 6;
        assert_eq!(Sizes::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut a = args(false);
        a.chunk_mib = 512;
        assert_eq!(Sizes::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut a = args(false);
        a.fanout_mib = 1;
        assert_eq!(Sizes::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut a = args(false);
        a.checkpoint_files = 0;
        assert_eq!(Sizes::of(&a).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn replica_bytes_leave_the_coordinator_unless_it_is_a_replica() {
        let members: Vec<Member> = NODES
            .iter()
            .enumerate()
            .map(|(i, id)| Member::new(*id, format!("127.0.0.1:{}", 9000 + i)))
            .collect();
        let ns = namespace("t", 4096).id();
        let keys: Vec<BlockKey> = (0..3000).map(|i| key(ns, 0, i)).collect();
        let me = &members[0].id;
        // R = 3 of 3 nodes: the coordinator holds one copy, the others two.
        assert_eq!(peer_blocks(&keys, &members, 3, me), 2 * 3000);
        // R = 1 and 2: the coordinator is a replica of about R/3 of the keys.
        let r1 = peer_blocks(&keys, &members, 1, me);
        assert!((1800..2200).contains(&r1), "{r1}");
        let r2 = peer_blocks(&keys, &members, 2, me);
        assert!((3800..4200).contains(&r2), "{r2}");
    }

    #[test]
    fn counters_subtract_and_drop_headers() {
        let before = Counters {
            put: 2,
            bytes_up: 2 * (4096 + OBJECT_OVERHEAD_BYTES),
            ..Default::default()
        };
        let after = Counters {
            put: 5,
            bytes_up: 5 * (4096 + OBJECT_OVERHEAD_BYTES),
            ..Default::default()
        };
        let d = after.since(&before);
        assert_eq!(d.put, 3);
        assert_eq!(d.data_bytes_up(), 3 * 4096);
    }

    #[test]
    fn restored_files_are_compared_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let s = Sizes {
            fanout_bytes: 0,
            block: 4096,
            batch: 1,
            checkpoint_files: 2,
            file_bytes: 8192,
            chunk_bytes: 1 << 20,
        };
        let files = checkpoint_files(&s, 0xC0FFEE);
        write_files(d.path(), &files, true).unwrap();
        assert_eq!(verify_files("t", d.path(), &files).unwrap(), 2 * 8192);
        let p = d.path().join(&files[1].0);
        let mut b = std::fs::read(&p).unwrap();
        b[100] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert_eq!(
            verify_files("t", d.path(), &files).unwrap_err().kind(),
            ErrorKind::ChecksumMismatch
        );
    }
}
