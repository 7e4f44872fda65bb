//! `kvtier-bench`: end-to-end benchmarks and the embedded demo.
//!
//! Every figure is printed next to a reference measured in the same run on
//! the same machine and directory (memcpy, raw O_DIRECT I/O), because these
//! machines are noisy: the ratios are what carry over.

mod blob;
mod cluster_sim;
mod connector;
mod daemon;
mod demo;
mod lmcache;
mod peers;
mod placement;
mod python;
mod replay;
mod replication;
mod routing;
mod s3;
mod tiers;
// Used by the replay and peers benches.
mod trace;
mod transfer;
mod util;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "kvtier-bench", about = "kvtier benchmarks and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Gossip membership (SWIM) at 1,000-10,000 members on simulated time
    /// and network: messages per node per second against all-to-all
    /// heartbeats, crash detection time, false suspicions under loss, and
    /// convergence after a join and a leave.
    ClusterSim(cluster_sim::Args),
    /// Host and disk tier throughput against memcpy and raw O_DIRECT I/O,
    /// and prefix-lookup rate over a large index.
    Tiers(tiers::Args),
    /// kvtierd's request path against raw loopback TCP, SSD-only mode
    /// against raw O_DIRECT I/O, and lookup latency.
    Daemon(daemon::Args),
    /// The Azure Blob tier on Azurite: blob requests and bytes for a fixed
    /// workload, and the throughput reduction with local tiers in front
    /// against blob alone, in the same run.
    Blob(blob::Args),
    /// A 3-node kvtierd cluster writing back to Azurite: fan-out Put
    /// throughput for R = 1, 2, 3 against raw loopback TCP, bytes to blob
    /// per logical byte, a checkpoint's time to safety and restore against
    /// local files copied to blob, and blob requests per node per second.
    Replication(replication::Args),
    /// Placement by slots at 10,000 and 100,000 members: nanoseconds per
    /// key against hashing the key (and against per-key rendezvous, the
    /// placement before slots), the table's build, and the share of keys a
    /// join moves against 1 / N.
    Placement(placement::Args),
    /// A request trace through the real BlockManager with real bytes: token
    /// hit rate of an eviction policy against LRU and the offline optimum
    /// computed in the same run; `--sweep` draws the curves and runs the
    /// GPU / host / SSD tiering study.
    Replay(replay::Args),
    /// kvtier against foyer (hybrid memory + disk cache) in one run: put/get
    /// GB/s and latency of 2 MiB blocks, and the hit rate over a trace.
    Peers(peers::Args),
    /// The Python binding against Rust: put/get GB/s, same store, same run.
    Python(python::Args),
    /// The vLLM connector through vLLM's real scheduler on CPU, embedded and
    /// against kvtierd: the step's save stall and load/save GB/s against
    /// memcpy of the same bytes, and the scheduler's prefix lookup latency.
    Connector(connector::Args),
    /// kvtierd's S3 listener (SigV4-signed HTTP/1.1, several connections):
    /// put/get GB/s of 2 MiB block objects against raw loopback TCP of the
    /// same bytes and against the gRPC shared-region path, multipart against
    /// single PUTs of a 256 MiB object, HeadObject latency.
    S3(s3::Args),
    /// NVIDIA Dynamo's real KV router over simulated engines with kvtier's
    /// host and SSD tiers, a trace replayed twice: the router seeing GPU
    /// events only, then kvtier's tier events too (token hit rates, their
    /// ratio, events per request; runs in a network namespace).
    Routing(routing::Args),
    /// kvtier as LMCache's L2 (SSD-only kvtierd) against LMCache's own disk
    /// L2 adapters, through LMCache's own adapter machinery, same chunks,
    /// same directory: put/get GB/s and p99 get latency, against raw
    /// O_DIRECT I/O in the same run (needs the LMCache venv).
    Lmcache(lmcache::Args),
    /// GPU <-> pinned host block copies through kvtier's transfer path
    /// (needs an NVIDIA GPU; says so when there is none).
    Transfer(transfer::Args),
    /// Stores prompts' KV blocks through the host and SSD tiers, reloads and
    /// verifies them, restarts, and serves them again from the SSD.
    Demo {
        /// Directory for the SSD tier.
        #[arg(long, default_value = "kvtier-data")]
        dir: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// An error of `kind`: what a bench answers for bad arguments or a failed check.
fn fail(kind: kvtier::ErrorKind, msg: impl Into<String>) -> kvtier::Error {
    kvtier::Error::new(kind, msg)
}

/// Prints a bench's result: one line of JSON with `--json`, else indented.
fn print_json(v: &serde_json::Value, one_line: bool) {
    if one_line {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
    }
}

fn main() {
    // The client side of the daemon bench moves the same transient buffers.
    kvtier_client::keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::ClusterSim(a) => cluster_sim::run(&a),
        Cmd::Tiers(a) => tiers::run(&a),
        Cmd::Daemon(a) => daemon::run(&a),
        Cmd::Blob(a) => blob::run(&a),
        Cmd::Replication(a) => replication::run(&a),
        Cmd::Placement(a) => placement::run(&a),
        Cmd::Replay(a) => replay::run(&a),
        Cmd::Peers(a) => peers::run(&a),
        Cmd::Python(a) => python::run(&a),
        Cmd::Connector(a) => connector::run(&a),
        Cmd::Routing(a) => routing::run(&a),
        Cmd::S3(a) => s3::run(&a),
        Cmd::Lmcache(a) => lmcache::run(&a),
        Cmd::Transfer(a) => transfer::run(&a),
        Cmd::Demo { dir, json } => demo::run(&dir, json),
    };
    if let Err(e) = r {
        eprintln!("kvtier-bench: {e}");
        std::process::exit(1);
    }
}
