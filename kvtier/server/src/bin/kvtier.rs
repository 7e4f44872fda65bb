//! kvtier: the command-line client and admin tool of kvtierd.
//!
//! Exit codes: 0 success; 2 bad usage or a request the daemon refused as
//! invalid; 3 not found (unknown namespace, or fewer blocks than asked);
//! 4 unavailable (cannot connect, throttled, stopping: retry); 5 bad or
//! missing token; 6 no space or request too large; 7 a block failed
//! verification; 1 anything else.

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::{BlockKey, Namespace, NamespaceId};
use kvtier_client::{Client, ClientConfig};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "kvtier", version, about = "kvtier client and admin tool")]
struct Cli {
    /// Daemon address.
    #[arg(
        long,
        env = "KVTIER_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    /// Bearer token, if the daemon requires one.
    #[arg(long, env = "KVTIER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate to trust for TLS.
    #[arg(long, env = "KVTIER_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Name to verify in the daemon's certificate.
    #[arg(long, env = "KVTIER_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Is the daemon serving? Prints its status as JSON.
    Health,
    /// The block manager's counters, as JSON: with a blob tier, also
    /// `blob` (requests by kind, bytes up and down, corrupt objects),
    /// `writeback` (pending, uploaded, failed, resumed blocks), the bytes
    /// served from local tiers and from blob, and `throughput_reduction`.
    Stats,
    /// The cluster as this node sees it, as JSON: its id, the membership
    /// epoch, each member's liveness and out-of-sync keys (copies held here
    /// for it), hints pending and delivered, replica writes and peer reads,
    /// resync and rebalancing. Exit 3 when the
    /// daemon runs without a cluster. `join` and `leave` change the members.
    Cluster {
        #[command(subcommand)]
        op: Option<ClusterCmd>,
    },
    /// Namespace admin.
    #[command(subcommand)]
    Ns(NsCmd),
    /// Checkpoints: named sets of files, chunked, committed by a manifest.
    #[command(subcommand)]
    Checkpoint(CkptCmd),
    /// Stores blocks read from a file (or stdin): keys.len() × block size bytes.
    Put {
        #[command(flatten)]
        blocks: BlockArgs,
        /// Input file; `-` or absent reads stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Loads blocks into a file (or stdout). Exit 3 unless all were present.
    Get {
        #[command(flatten)]
        blocks: BlockArgs,
        /// Output file; `-` or absent writes stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The longest present prefix of the keys, and their tiers, as JSON.
    Lookup {
        #[command(flatten)]
        blocks: BlockArgs,
    },
    /// Removes blocks; prints how many were present.
    Delete {
        #[command(flatten)]
        blocks: BlockArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CkptCmd {
    /// Writes checkpoint NAME from every file under DIR.
    Put {
        name: String,
        dir: PathBuf,
        #[command(flatten)]
        group: GroupArgs,
    },
    /// Restores checkpoint NAME into DEST (files appear whole and verified).
    Get {
        name: String,
        dest: PathBuf,
        #[command(flatten)]
        group: GroupArgs,
    },
    /// Lists the checkpoints of a group.
    List {
        #[command(flatten)]
        group: GroupArgs,
    },
    /// Deletes checkpoint NAME (chunks other checkpoints share stay).
    Delete {
        name: String,
        #[command(flatten)]
        group: GroupArgs,
    },
}

#[derive(Args, Debug)]
struct GroupArgs {
    /// Checkpoint group (e.g. the training job).
    #[arg(long, default_value = "default")]
    group: String,
    /// Largest chunk, in MiB (fixed per group).
    #[arg(long, default_value_t = 32)]
    chunk_mib: u32,
}

async fn checkpoint(client: &Client, cmd: CkptCmd) -> Result<(), Fail> {
    use kvtier::checkpoint::Checkpoints;
    let g = match &cmd {
        CkptCmd::Put { group, .. }
        | CkptCmd::Get { group, .. }
        | CkptCmd::List { group }
        | CkptCmd::Delete { group, .. } => group,
    };
    let chunk_bytes = g
        .chunk_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| Fail(2, format!("--chunk-mib {} is too large", g.chunk_mib)))?;
    let chunks = client.checkpoint_chunks(&g.group, chunk_bytes, tokio::runtime::Handle::current());
    let ns = chunks.namespace();
    let t = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let c = Checkpoints::new(chunks, ns, chunk_bytes);
        match cmd {
            CkptCmd::Put { name, dir, .. } => c.put_dir(&name, &dir).map(|m| {
                serde_json::json!({"name": m.name, "files": m.files.len(), "bytes": m.bytes(), "chunks": m.chunks()})
            }),
            CkptCmd::Get { name, dest, .. } => c.get(&name, &dest).map(|m| {
                serde_json::json!({"name": m.name, "files": m.files.len(), "bytes": m.bytes(), "dest": dest})
            }),
            CkptCmd::List { .. } => c.list().map(|l| serde_json::json!(l)),
            CkptCmd::Delete { name, .. } => c.delete(&name).and_then(|found| {
                if found {
                    Ok(serde_json::json!({"deleted": name}))
                } else {
                    Err(kvtier::Error::new(kvtier::ErrorKind::NotFound, format!("no checkpoint {name:?}")))
                }
            }),
        }
    })
    .await
    .map_err(|e| Fail(1, format!("checkpoint task: {e}")))??;
    let mut out = out;
    if let Some(o) = out.as_object_mut() {
        o.insert("seconds".into(), serde_json::json!(t.elapsed().as_secs_f64()));
    }
    println!("{out}");
    Ok(())
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Adds a member (a started kvtierd whose member list names itself);
    /// the node asked forwards it to every member. Keys move to it in the
    /// background. Prints the new epoch and member count as JSON.
    Join {
        /// The member's id.
        #[arg(long)]
        id: String,
        /// Its gRPC `host:port`.
        #[arg(long)]
        addr: String,
        /// Its relative share of keys.
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
    },
    /// Removes a member gracefully: it hands its keys over to their new
    /// replicas; stop it once `kvtier cluster` on it shows
    /// `rebalance_state` idle. A dead member (down) can be removed too: the
    /// surviving replicas re-replicate its keys, and it is named in `down`.
    Leave {
        /// The member's id.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NsCmd {
    /// Registers a namespace; prints its id and block size as JSON.
    Register(NsArgs),
    /// Lists the daemon's namespaces as JSON lines.
    List,
}

#[derive(Args, Debug)]
struct NsArgs {
    /// Model id.
    #[arg(long)]
    model: String,
    /// Model revision.
    #[arg(long, default_value = "")]
    revision: String,
    /// Attention layers.
    #[arg(long)]
    layers: u32,
    /// KV heads per rank (1 for MLA).
    #[arg(long)]
    kv_heads: u32,
    /// Elements per head.
    #[arg(long)]
    head_dim: u32,
    /// Tokens per block.
    #[arg(long)]
    block_tokens: u32,
    /// kv or mla.
    #[arg(long, default_value = "kv")]
    kind: String,
    /// f16, bf16, f32, fp8e4m3 or fp8e5m2.
    #[arg(long)]
    dtype: String,
    /// Tensor-parallel rank.
    #[arg(long, default_value_t = 0)]
    tp_rank: u32,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp_size: u32,
    /// Cache salt.
    #[arg(long)]
    salt: Option<String>,
    /// LoRA adapter.
    #[arg(long)]
    lora: Option<String>,
    /// Copies of each block in a cluster (1 by default).
    #[arg(long)]
    replicas: Option<u32>,
    /// Copies a Put waits for (all replicas by default).
    #[arg(long)]
    write_quorum: Option<u32>,
}

#[derive(Args, Debug)]
struct BlockArgs {
    /// Namespace id (32 hex digits, from `ns register`).
    #[arg(long)]
    ns: String,
    /// Block keys, 32 hex digits each, comma-separated, in prefix order.
    #[arg(long, value_delimiter = ',', required_unless_present = "name")]
    key: Vec<String>,
    /// Or names: each becomes the key BlockKey::from_opaque(ns, name).
    #[arg(long, value_delimiter = ',', conflicts_with = "key")]
    name: Vec<String>,
}

/// A failure with its exit code.
struct Fail(u8, String);

impl From<kvtier::Error> for Fail {
    /// The exit code is a function of the error's kind alone, whichever
    /// side of the wire the error came from.
    fn from(e: kvtier::Error) -> Self {
        Fail(exit_code(e.kind()), e.to_string())
    }
}

impl From<tonic::Status> for Fail {
    /// A reply the CLI parses itself: read back into the crate's error.
    fn from(s: tonic::Status) -> Self {
        kvtier_proto::error::from_status(s).into()
    }
}

/// The exit code of a failure of `kind`: the table in the crate docs.
fn exit_code(kind: kvtier::ErrorKind) -> u8 {
    use kvtier::ErrorKind as K;
    match kind {
        K::InvalidArgument | K::BlockSize | K::AlreadyExists | K::Config => 2,
        K::NotFound | K::UnknownNamespace => 3,
        K::Throttled | K::Closed | K::Unavailable => 4,
        K::Unauthenticated | K::PermissionDenied => 5,
        K::NoSpace | K::TooLarge => 6,
        K::ChecksumMismatch => 7,
        K::Io | K::Internal => 1,
        // A kind added after this build: "anything else".
        _ => 1,
    }
}

fn hex128(what: &str, s: &str) -> Result<u128, Fail> {
    if s.len() != 32 {
        return Err(Fail(2, format!("{what} {s:?} must be 32 hex digits")));
    }
    u128::from_str_radix(s, 16).map_err(|_| Fail(2, format!("{what} {s:?} is not hex")))
}

impl BlockArgs {
    fn parse(&self) -> Result<(NamespaceId, Vec<BlockKey>), Fail> {
        let ns = NamespaceId(hex128("namespace id", &self.ns)?);
        let keys = if self.name.is_empty() {
            self.key
                .iter()
                .map(|k| hex128("key", k).map(BlockKey))
                .collect::<Result<_, _>>()?
        } else {
            self.name
                .iter()
                .map(|n| BlockKey::from_opaque(ns, n.as_bytes()))
                .collect()
        };
        Ok((ns, keys))
    }
}

fn namespace(a: &NsArgs) -> Result<Namespace, Fail> {
    let dtype: Dtype = serde_json::from_value(serde_json::Value::String(a.dtype.clone())).map_err(|_| {
        Fail(
            2,
            format!("--dtype {:?}: expected f16, bf16, f32, fp8e4m3 or fp8e5m2", a.dtype),
        )
    })?;
    let kind: KvKind = serde_json::from_value(serde_json::Value::String(a.kind.clone()))
        .map_err(|_| Fail(2, format!("--kind {:?}: expected kv or mla", a.kind)))?;
    Ok(Namespace {
        model_id: a.model.clone(),
        revision: a.revision.clone(),
        layout: KvLayout {
            num_layers: a.layers,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            block_tokens: a.block_tokens,
            kind,
            dtype,
        },
        tp_rank: a.tp_rank,
        tp_size: a.tp_size,
        salt: a.salt.clone(),
        lora: a.lora.clone(),
    })
}

fn read_input(file: &Option<PathBuf>) -> Result<Vec<u8>, Fail> {
    let mut data = Vec::new();
    match file.as_deref() {
        None => std::io::stdin().read_to_end(&mut data).map(drop),
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_end(&mut data).map(drop),
        Some(p) => std::fs::read(p).map(|d| data = d),
    }
    .map_err(|e| Fail(1, format!("read input: {e}")))?;
    Ok(data)
}

fn write_output(out: &Option<PathBuf>, data: &[u8]) -> Result<(), Fail> {
    match out.as_deref() {
        Some(p) if p.as_os_str() != "-" => std::fs::write(p, data),
        _ => std::io::stdout().lock().write_all(data),
    }
    .map_err(|e| Fail(1, format!("write output: {e}")))
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let client = Client::connect(&ClientConfig {
        endpoint: cli.endpoint.clone(),
        token: cli.token.clone(),
        ca_file: cli.ca_file.clone(),
        tls_domain: cli.tls_domain.clone(),
        request_timeout: None,
    })
    .await?;
    match cli.cmd {
        Cmd::Health => {
            let h = client.health().await?;
            println!(
                "{}",
                serde_json::json!({"status": h.status, "version": h.version, "mode": h.mode, "uptime_s": h.uptime_s})
            );
        }
        Cmd::Stats => println!("{}", client.stats().await?),
        Cmd::Checkpoint(c) => checkpoint(&client, c).await?,
        Cmd::Cluster { op: Some(op) } => {
            let r = match op {
                ClusterCmd::Join { id, addr, weight } => {
                    client
                        .join(kvtier_proto::proto::JoinRequest {
                            id,
                            addr,
                            weight,
                            forwarded: false,
                        })
                        .await?
                }
                ClusterCmd::Leave { id } => {
                    client
                        .leave(kvtier_proto::proto::LeaveRequest { id, forwarded: false })
                        .await?
                }
            };
            println!(
                "{}",
                serde_json::json!({"epoch": r.epoch, "members": r.members, "not_reached": r.not_reached, "down": r.down})
            );
            if !r.not_reached.is_empty() {
                return Err(Fail(
                    4,
                    format!("not forwarded to {}: send it again", r.not_reached.join(", ")),
                ));
            }
        }
        Cmd::Cluster { op: None } => {
            let Some(c) = client.stats_reply().await?.cluster else {
                return Err(Fail(3, "kvtierd runs without a [cluster] table".into()));
            };
            let members: Vec<_> = c
                .members
                .iter()
                .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "weight": m.weight, "liveness": m.liveness, "out_of_sync_keys": m.out_of_sync_keys, "gossip_generation": m.gossip_generation}))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "node_id": c.node_id,
                    "epoch": c.epoch,
                    "members_epoch": c.members_epoch,
                    "placement_slots": c.placement_slots,
                    "placement_mismatches": c.placement_mismatches,
                    "membership": c.membership,
                    "members_digest": format!("{:016x}", c.members_digest),
                    "gossip_addr": c.gossip_addr,
                    "gossip_generation": c.gossip_generation,
                    "gossip_messages_in": c.gossip_messages_in,
                    "gossip_messages_refused": c.gossip_messages_refused,
                    "gossip_messages_rejected": c.gossip_messages_rejected,
                    "members": members,
                    "hints_pending": c.hints_pending,
                    "hints_delivered": c.hints_delivered,
                    "hints_dropped": c.hints_dropped,
                    "replica_writes_sent": c.replica_writes_sent,
                    "replica_writes_failed": c.replica_writes_failed,
                    "peer_read_blocks": c.peer_read_blocks,
                    "peer_read_failures": c.peer_read_failures,
                    "replica_blocks_received": c.replica_blocks_received,
                    "replica_blocks_served": c.replica_blocks_served,
                    "resync_keys_offered": c.resync_keys_offered,
                    "resync_blocks_sent": c.resync_blocks_sent,
                    "resync_running": c.resync_running,
                    "out_of_sync_marked": c.out_of_sync_marked,
                    "member_lists_adopted": c.member_lists_adopted,
                    "rebalance_state": c.rebalance_state,
                    "rebalances_done": c.rebalances_done,
                    "rebalance_keys_moved": c.rebalance_keys_moved,
                    "rebalance_bytes_moved": c.rebalance_bytes_moved,
                    "rebalance_keys_dropped": c.rebalance_keys_dropped,
                })
            );
        }
        Cmd::Ns(NsCmd::Register(a)) => {
            let ns = namespace(&a)?;
            let r = client.register_replicated(&ns, a.replicas, a.write_quorum).await?;
            let id = kvtier_proto::convert::namespace_id(&r.namespace_id)?;
            println!(
                "{}",
                serde_json::json!({"namespace_id": id.to_string(), "block_bytes": r.block_bytes, "replicas": r.replicas, "write_quorum": r.write_quorum})
            );
        }
        Cmd::Ns(NsCmd::List) => {
            for n in client.namespaces().await? {
                let id = kvtier_proto::convert::namespace_id(&n.namespace_id)?;
                let ns = n.namespace.as_ref().map(kvtier_proto::convert::namespace).transpose()?;
                println!(
                    "{}",
                    serde_json::json!({"namespace_id": id.to_string(), "block_bytes": n.block_bytes, "namespace": ns, "replicas": n.replicas, "write_quorum": n.write_quorum})
                );
            }
        }
        Cmd::Put { blocks, file } => {
            let (ns, keys) = blocks.parse()?;
            let data = read_input(&file)?;
            let r = client.put(ns, &keys, Bytes::from(data)).await?;
            println!(
                "{}",
                serde_json::json!({"stored": r.stored, "present": r.present, "not_admitted": r.not_admitted})
            );
        }
        Cmd::Get { blocks, out } => {
            let (ns, keys) = blocks.parse()?;
            let g = client.get(ns, &keys).await?;
            write_output(&out, &g.data)?;
            if let Some(i) = g.failed_index {
                // A block with no good copy anywhere is 7; one whose good
                // copy may be on a holder that did not answer is 4 (retry).
                let code = g.failed_kind.map_or(7, exit_code);
                return Err(Fail(code, format!("block {i} failed: {}", g.failed_reason)));
            }
            if g.loaded < keys.len() {
                return Err(Fail(3, format!("{} of {} blocks present", g.loaded, keys.len())));
            }
        }
        Cmd::Lookup { blocks } => {
            let (ns, keys) = blocks.parse()?;
            let l = client.lookup(ns, &keys).await?;
            let tiers: Vec<&str> = l.tiers().map(kvtier_proto::convert::tier_name).collect();
            println!("{}", serde_json::json!({"hit_blocks": l.hit_blocks, "tiers": tiers}));
        }
        Cmd::Delete { blocks } => {
            let (ns, keys) = blocks.parse()?;
            println!("{}", serde_json::json!({"removed": client.delete(ns, &keys).await?}));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two workers: checkpoint commands block in spawn_blocking threads
    // while the workers drive their requests.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start the runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("kvtier: {msg}");
            ExitCode::from(code)
        }
    }
}
