//! Running kvtierd: open the block manager, bind, serve, stop gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::bulk::{Bulk, WithBulk};
use crate::cluster::Cluster;
use crate::config::DaemonConfig;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::peer::PeerService;
use crate::proto::kv_tier_server::KvTierServer;
use crate::proto::peer_server::PeerServer;
use crate::service::KvTierService;
use crate::status_of;
use kvtier::{Error, ErrorKind};

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Addresses the daemon bound, told to the caller once it serves.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The gRPC address.
    pub grpc: SocketAddr,
    /// The metrics address, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The S3 listener's address, if enabled.
    pub s3: Option<SocketAddr>,
}

/// Serves until `stop` completes, then drains: in-flight requests get
/// `drain_timeout_s` to finish, queued writes reach disk, pending blob
/// uploads get up to `drain_timeout_s` more (with the release of the block
/// manager), and the disk tier seals its segments. `on_bound` hears the
/// addresses once they are bound.
pub async fn run(
    cfg: DaemonConfig,
    stop: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(Bound),
) -> kvtier::Result<()> {
    crate::install_crypto_provider();
    let token = cfg.token()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| Error::io(format!("create {}", cfg.data_dir.display()), e))?;
    let mcfg = cfg.manager_config();
    let manager = tokio::task::spawn_blocking(move || mcfg.build())
        .await
        .map_err(|e| join_error("open the block manager", e))?
        // The inner kind is named in the text ("invalid configuration: ...")
        // and kept as the error's kind.
        .map_err(|e| Error::with_source(e.kind(), format!("open the block manager: {e}"), e))?;
    let manager = Arc::new(manager);
    if let Some(r) = manager.disk().map(|d| d.recovery()) {
        tracing::info!(
            blocks = r.blocks,
            segments = r.segments,
            skipped = r.skipped_records,
            "disk tier recovered"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let node = Node::new(
        manager.clone(),
        metrics.clone(),
        cfg.data_dir.join("namespaces.json"),
        crate::region::Regions::new(
            (!cfg.shm_dir.is_empty()).then(|| cfg.shm_dir.clone().into()),
            cfg.max_regions,
        ),
        cfg.max_request_bytes,
        cfg.max_inflight_bytes,
    )?;
    let cluster = match cfg.cluster.clone() {
        Some(cc) => {
            let (tls, token, manager, registry) = (
                cfg.tls.is_some(),
                token.clone(),
                manager.clone(),
                node.registry().clone(),
            );
            let (dir, max_request_bytes) = (cfg.data_dir.clone(), cfg.max_request_bytes);
            // The placement of a large member list takes seconds to compute:
            // off the runtime's threads.
            let open = move || Cluster::new(&cc, tls, token, manager, registry, &dir, max_request_bytes);
            let c = tokio::task::spawn_blocking(open)
                .await
                .map_err(|e| join_error("open the cluster", e))??;
            Some(Arc::new(c))
        }
        None => None,
    };
    let checkpoint_registry = node.registry().clone();
    if let Some(c) = &cluster {
        // Weak: the manager must not keep the cluster (and itself) alive.
        let weak = Arc::downgrade(c);
        manager.set_upload_filter(Arc::new(move |ns, key| {
            weak.upgrade().is_none_or(|c| c.uploads(ns, key))
        }));
    }
    let node = Arc::new(match &cluster {
        Some(c) => {
            let _ = metrics.cluster.set(Arc::downgrade(c));
            node.with_cluster(c.clone())
        }
        None => node,
    });
    let repair = node.repair().clone();
    let _ = metrics.repair.set(Arc::downgrade(&repair));
    let s3 = match &cfg.s3 {
        Some(s3cfg) => Some(
            crate::s3::start(
                s3cfg.clone(),
                crate::s3::Context {
                    tls: cfg.tls.as_ref(),
                    manager: manager.clone(),
                    registry: node.registry().clone(),
                    cluster: cluster.clone(),
                    repair: repair.clone(),
                    data_dir: &cfg.data_dir,
                    drain: Duration::from_secs(cfg.drain_timeout_s),
                    metrics: metrics.s3.get_or_init(Default::default).clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    let peer = cluster.as_ref().map(|c| PeerService::new(node.clone(), c.clone()));
    let svc = KvTierService::new(node);

    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| Error::io(format!("bind {}", cfg.listen), e))?;
    let grpc = listener.local_addr().map_err(|e| Error::io("local address", e))?;
    let metrics_task = if cfg.metrics_listen.is_empty() {
        None
    } else {
        let l = TcpListener::bind(&cfg.metrics_listen)
            .await
            .map_err(|e| Error::io(format!("bind metrics {}", cfg.metrics_listen), e))?;
        let addr = l.local_addr().map_err(|e| Error::io("local address", e))?;
        Some((
            addr,
            tokio::spawn(crate::metrics::serve(l, metrics.clone(), manager.clone())),
        ))
    };

    // TCP_NODELAY is set by `incoming`: tonic ignores `tcp_nodelay` here
    // for an incoming stream.
    let mut builder = Server::builder()
        .initial_stream_window_size(Some(kvtier_proto::H2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(kvtier_proto::H2_CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(kvtier_proto::H2_MAX_FRAME_BYTES));
    if let Some(tls) = &cfg.tls {
        let cert =
            std::fs::read(&tls.cert_file).map_err(|e| Error::io(format!("read {}", tls.cert_file.display()), e))?;
        let key = std::fs::read(&tls.key_file).map_err(|e| Error::io(format!("read {}", tls.key_file.display()), e))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| Error::with_source(ErrorKind::Config, format!("TLS: {e}"), e))?;
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<KvTierServer<KvTierService>>().await;
    let auth_metrics = metrics.clone();
    let expected = token.map(|t| format!("Bearer {t}"));
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        let Some(want) = &expected else { return Ok(req) };
        let got = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if same(got, want.as_bytes()) {
            Ok(req)
        } else {
            auth_metrics
                .unauthenticated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(status_of(ErrorKind::Unauthenticated, "missing or invalid bearer token"))
        }
    };
    let peer_api = peer.map(|p| {
        tonic::service::interceptor::InterceptedService::new(
            WithBulk::new(
                PeerServer::new(p.clone())
                    .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::MAX_MESSAGE_BYTES),
                Bulk::Peer(p),
            ),
            auth.clone(),
        )
    });
    let checkpoint_service = Arc::new(crate::checkpoints::CheckpointService::new(
        manager.clone(),
        checkpoint_registry,
        cluster.clone(),
        repair.clone(),
        &cfg.data_dir,
    ));
    let checkpoints = tonic::service::interceptor::InterceptedService::new(
        crate::checkpoint_proto::checkpoints_server::CheckpointsServer::from_arc(checkpoint_service.clone())
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let api = tonic::service::interceptor::InterceptedService::new(
        WithBulk::new(
            KvTierServer::new(svc.clone())
                .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::MAX_MESSAGE_BYTES),
            Bulk::KvTier(svc),
        ),
        auth,
    );

    if let Some(c) = &cluster {
        // Before the address is announced: a gossip port that cannot be
        // bound fails the start.
        c.start_gossip().await?;
    }
    tracing::info!(%grpc, metrics = ?metrics_task.as_ref().map(|m| m.0), mode = ?manager.mode(), blob = ?manager.blob(), tls = cfg.tls.is_some(), auth = cfg.auth_token.is_some() || cfg.auth_token_file.is_some(), "kvtierd serving");
    on_bound(Bound {
        grpc,
        metrics: metrics_task.as_ref().map(|m| m.0),
        s3: s3.as_ref().map(|s| s.addr),
    });
    if let Some(c) = &cluster {
        tracing::info!(node = %c.me(), members = c.size(), epoch = c.epoch(), "cluster member serving");
        c.start();
    }
    repair.start_scrub(&cfg.scrub);
    checkpoint_service.start_collection(&cfg.checkpoints);
    // The server holds the service from here; this reference would keep
    // the block manager from closing at shutdown.
    drop(checkpoint_service);

    // Stop accepting when told; give in-flight requests a bounded time.
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = Duration::from_secs(cfg.drain_timeout_s);
    let serve = builder
        .add_service(health)
        .add_service(api)
        .add_service(checkpoints)
        .add_optional_service(peer_api)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            stop.await;
            tracing::info!("stop requested: draining");
            let _ = stopped_tx.send(());
        });
    tokio::pin!(serve);
    let served = tokio::select! {
        r = &mut serve => r,
        _ = async { let _ = stopped_rx.await; tokio::time::sleep(drain).await } => {
            tracing::warn!(timeout_s = cfg.drain_timeout_s, "drain timed out: closing remaining connections");
            Ok(())
        }
    };
    if let Some((_, t)) = metrics_task {
        t.abort();
    }
    // The S3 listener stops with the gRPC one: requests in flight finish
    // (bounded by the drain), then its store lets the manager go.
    if let Some(s) = s3 {
        s.stop().await;
    }
    // The cluster's background tasks (heartbeats, hint delivery, resync,
    // rebalancing) hold the cluster and so the manager: stop them all,
    // then let it go.
    // The scrub and read repair's rewrites hold the cluster and the
    // manager too.
    repair.shutdown().await;
    drop(repair);
    if let Some(c) = &cluster {
        c.shutdown().await;
    }
    drop(cluster);
    served.map_err(|e| Error::with_source(ErrorKind::Io, format!("serve: {e}"), e))?;
    // Writes acknowledged to clients are on disk (SSD-only) or queued for
    // it (write-through): drain the queue, then close the tiers so the
    // disk tier seals its active segment.
    let deadline = tokio::time::Instant::now() + drain;
    // Writeback: pending uploads get the same bounded time. What is left
    // stays in the dirty log on the SSD and resumes at the next start.
    if let Some(pending) = manager.stats().writeback.map(|w| w.pending_blocks).filter(|n| *n > 0) {
        tracing::info!(
            pending,
            timeout_s = cfg.drain_timeout_s,
            "waiting for pending blob uploads"
        );
        let m = manager.clone();
        let done = tokio::task::spawn_blocking(move || m.flush_writeback(drain))
            .await
            .unwrap_or(false);
        if !done {
            let left = manager.stats().writeback.map_or(0, |w| w.pending_blocks);
            tracing::warn!(
                pending = left,
                "blob uploads still pending at stop: they resume at the next start"
            );
        }
    }
    let mut manager = manager;
    loop {
        match Arc::try_unwrap(manager) {
            Ok(m) => {
                tokio::task::spawn_blocking(move || drop(m))
                    .await
                    .map_err(|e| join_error("close", e))?;
                break;
            }
            Err(m) if tokio::time::Instant::now() < deadline => {
                manager = m;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(m) => {
                tracing::warn!("requests still hold the block manager: flushing without closing");
                tokio::task::spawn_blocking(move || m.flush())
                    .await
                    .map_err(|e| join_error("flush", e))?;
                break;
            }
        }
    }
    tracing::info!("kvtierd stopped");
    Ok(())
}

/// The connections `listener` accepts, with `TCP_NODELAY` set on each.
///
/// tonic applies its builder's `tcp_nodelay` only to listeners it binds
/// itself, not to an incoming stream it is handed; without it the small
/// writes that end a response (the last data frame, the trailers) wait for
/// the client's delayed ACK (Nagle), about 40 ms per one-block Get.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Completes on SIGTERM or SIGINT. The handlers are installed by this call,
/// not when the future is first polled, so a signal that arrives once the
/// daemon has announced its addresses drains it instead of killing it.
/// Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// A blocking task that panicked or was cancelled: a bug, not a setting.
fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::with_source(ErrorKind::Internal, format!("{what}: {e}"), e)
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut inc = super::incoming(l);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = inc.next().await.expect("a connection").unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted connection lacks TCP_NODELAY");
    }

    #[test]
    fn token_comparison() {
        assert!(super::same(b"Bearer a", b"Bearer a"));
        assert!(!super::same(b"Bearer a", b"Bearer b"));
        assert!(!super::same(b"Bearer", b"Bearer a"));
    }
}
