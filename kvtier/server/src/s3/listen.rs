//! The S3 listener's connections: TCP (or TLS with the daemon's
//! certificate), HTTP/1.1 with keep-alive, a bound on connections served
//! at once, and a graceful stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use kvtier::{Error, ErrorKind, Result};

use super::http::S3Service;
use crate::config::TlsConfig;

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A TLS acceptor from the daemon's certificate and key.
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| Error::new(ErrorKind::Config, format!("S3 TLS: {}: {e}", tls.cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| Error::new(ErrorKind::Config, format!("S3 TLS: {}: {e}", tls.key_file.display())))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::new(ErrorKind::Config, format!("S3 TLS: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `listener` until `stop` turns true; then stops accepting, asks
/// every connection to finish its request in flight and close, and waits
/// for them up to `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    svc: Arc<S3Service>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            () = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("S3 listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let (svc, tls, stop) = (svc.clone(), tls.clone(), stop.clone());
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                Some(acc) => match tokio::time::timeout(HEADER_READ_TIMEOUT, acc.accept(tcp)).await {
                    Ok(Ok(s)) => connection(TokioIo::new(s), peer, svc, stop).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "S3 TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "S3 TLS handshake timed out"),
                },
                None => connection(TokioIo::new(tcp), peer, svc, stop).await,
            }
        });
        // Reap finished connections so the set stays small.
        while let Some(r) = conns.try_join_next() {
            if let Err(e) = r
                && e.is_panic()
            {
                tracing::error!("S3 connection task panicked: {e}");
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = conns.len(), "S3 connections still open after the drain: closed");
        conns.abort_all();
    }
}

async fn connection<I>(io: I, peer: SocketAddr, svc: Arc<S3Service>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let svc = svc.clone();
        async move { Ok::<_, std::convert::Infallible>(svc.handle(req).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(1 << 20)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = r {
        tracing::debug!(%peer, "S3 connection ended: {e}");
    }
}

/// Completes once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
