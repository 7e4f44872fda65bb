//! kvtierd's S3-compatible listener: any S3 client (Dynamo KVBM's object
//! tier, NIXL's OBJ plugin, LMCache's `s3://`, `s3torchconnector`) uses
//! kvtier as a node-local, replicated cache in front of Azure Blob.
//!
//! # Layout
//!
//! - [`config`]: the `[s3]` table: listener, access keys, buckets.
//! - [`catalog`]: a bucket's durable catalog of object names (the commit
//!   point of every write).
//! - [`store`]: buckets over namespaces: chunked writes, checked reads,
//!   multipart uploads, removal of replaced versions.
//! - [`http`]: the operations: parse, authenticate (SigV4), serve from the
//!   store; S3 XML errors with request ids.
//! - [`listen`]: connections (HTTP/1.1, TLS with the daemon's
//!   certificate), a bound on them, a graceful stop.
//!
//! The protocol itself (SigV4, aws-chunked, checksums, XML, request
//! parsing) is the `kvtier-s3` crate: no storage, no I/O.
//!
//! # Why
//!
//! - **A catalog record commits an object**: chunks are stored first under
//!   keys drawn from a random version, then one synced log record names
//!   them. A daemon killed mid-upload serves the old object or the new
//!   one, never a torn one, and readers of the old version keep their
//!   chunks while a new one is written.
//! - **Chunks are kvtier blocks**: they take the namespace's replication,
//!   tiers and blob writeback like any block; reads check each chunk
//!   against the length and hash its record names.

pub mod catalog;
pub mod config;
pub mod http;
pub mod listen;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvtier::{BlockManager, Error, ErrorKind, Result};
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::config::TlsConfig;
use crate::registry::Registry;

/// How often replaced chunks and expired uploads are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A running S3 listener.
#[derive(Debug)]
pub struct Running {
    /// The address it bound.
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    sweep: tokio::task::JoinHandle<()>,
    store: Arc<store::Store>,
}

/// What the daemon provides the S3 listener.
#[derive(Debug)]
pub struct Context<'a> {
    /// The daemon's certificate, if it serves TLS.
    pub tls: Option<&'a TlsConfig>,
    /// The block manager.
    pub manager: Arc<BlockManager>,
    /// The namespaces (each bucket registers one).
    pub registry: Arc<Registry>,
    /// The cluster, if this node is a member.
    pub cluster: Option<Arc<Cluster>>,
    /// Read repair: chunks are read through it.
    pub repair: Arc<crate::repair::Repair>,
    /// The daemon's data directory (catalogs go under `s3/`).
    pub data_dir: &'a Path,
    /// How long a stop waits for requests in flight.
    pub drain: Duration,
    /// Counters for the metrics endpoint.
    pub metrics: Arc<S3Metrics>,
}

/// Opens the buckets and binds the listener.
pub async fn start(cfg: config::S3Config, ctx: Context<'_>) -> Result<Running> {
    let Context {
        tls,
        manager,
        registry,
        cluster,
        repair,
        data_dir,
        drain,
        metrics,
    } = ctx;
    let acceptor = tls.map(listen::tls_acceptor).transpose()?;
    let st = store::Store::open(cfg.clone(), manager, registry, cluster, repair, data_dir).await?;
    let _ = metrics.buckets.set(Arc::downgrade(&st));
    let svc = Arc::new(http::S3Service::new(st.clone(), &cfg, metrics).map_err(|e| Error::new(ErrorKind::Config, e))?);
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| Error::io(format!("bind s3 {}", cfg.listen), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("local address", e))?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let serve = tokio::spawn(listen::serve(listener, acceptor, svc, cfg.max_connections, rx, drain));
    let sweeper = st.clone();
    let sweep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sweeper.sweep().await;
        }
    });
    tracing::info!(%addr, buckets = st.buckets().len(), tls = tls.is_some(), "S3 listener serving");
    Ok(Running {
        addr,
        stop,
        serve,
        sweep,
        store: st,
    })
}

impl Running {
    /// Stops accepting, lets requests in flight finish (bounded by the
    /// drain), removes the chunks replaced versions left behind.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.serve.await {
            tracing::warn!("S3 listener task: {e}");
        }
        self.sweep.abort();
        let _ = self.sweep.await;
        self.store.flush_graveyard().await;
    }
}

/// The S3 listener's counters, on the metrics endpoint.
#[derive(Debug, Default)]
pub struct S3Metrics {
    /// Answers by operation and HTTP status.
    requests: parking_lot::Mutex<std::collections::BTreeMap<(&'static str, u16), u64>>,
    /// Object bytes received (PUT, UploadPart).
    pub received_bytes: std::sync::atomic::AtomicU64,
    /// Object bytes sent (GET).
    pub sent_bytes: std::sync::atomic::AtomicU64,
    buckets: std::sync::OnceLock<std::sync::Weak<store::Store>>,
}

impl S3Metrics {
    /// Counts one answer.
    pub fn answered(&self, op: &'static str, status: u16) {
        *self.requests.lock().entry((op, status)).or_insert(0) += 1;
    }

    /// Appends the exposition text.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            o,
            "# HELP kvtier_s3_requests_total S3 requests answered, by operation and HTTP status.\n# TYPE kvtier_s3_requests_total counter"
        );
        for ((op, status), n) in self.requests.lock().iter() {
            let _ = writeln!(o, "kvtier_s3_requests_total{{op=\"{op}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP kvtier_s3_received_bytes_total Object bytes received through S3.\n# TYPE kvtier_s3_received_bytes_total counter\nkvtier_s3_received_bytes_total {}",
            self.received_bytes.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP kvtier_s3_sent_bytes_total Object bytes sent through S3.\n# TYPE kvtier_s3_sent_bytes_total counter\nkvtier_s3_sent_bytes_total {}",
            self.sent_bytes.load(Relaxed)
        );
        if let Some(st) = self.buckets.get().and_then(std::sync::Weak::upgrade) {
            let _ = writeln!(
                o,
                "# HELP kvtier_s3_objects Objects in a bucket's catalog on this node.\n# TYPE kvtier_s3_objects gauge"
            );
            for b in st.buckets() {
                let _ = writeln!(o, "kvtier_s3_objects{{bucket=\"{}\"}} {}", b.name, b.objects());
            }
        }
    }
}
