//! The Rust client of kvtierd: what engines, the CLI, the Python package and
//! the benchmarks link. It depends on the core and the protocol crate only,
//! never on the daemon.
//!
//! # Layout
//!
//! - [`client`]: [`Client`], one connection to a kvtierd: namespaces,
//!   lookups, puts and gets over gRPC streams or shared regions, stats, and
//!   the Peer calls tools use to read one node's own tiers.
//! - [`region`]: [`SharedRegion`], a mapped file the daemon reads and
//!   writes block bytes through (the same-host data path).
//! - [`chunks`]: [`RemoteChunks`], a checkpoint chunk store on a kvtierd.
//!
//! # Why
//!
//! - **Every call answers a [`kvtier::Error`].** The daemon's error kind
//!   comes back from the wire ([`kvtier_proto::error::from_status`]), and a
//!   connection that is refused or breaks mid-call is
//!   [`kvtier::ErrorKind::Unavailable`], so callers decide on the kind alone:
//!   throttled means back off and keep the connection, unavailable means
//!   reconnect or go elsewhere.

pub mod chunks;
pub mod client;
pub mod region;

pub use chunks::RemoteChunks;
pub use client::{Auth, Client, ClientConfig, Got};
pub use region::SharedRegion;

/// Installs ring as rustls's process-wide crypto provider, unless one is
/// installed already (by an earlier call, or by the embedding process).
///
/// tonic builds its TLS configs with rustls's default provider. The blob
/// tier's HTTP client (object_store) compiles in rustls's aws-lc-rs backend
/// next to tonic's ring, and with both rustls cannot pick a default: it
/// would panic on the first TLS server or client config. Called by kvtierd
/// at startup and by [`Client::connect`].
pub fn install_crypto_provider() {
    // An Err means a provider is installed already: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Keeps large buffers in the heap between requests.
///
/// Each request moves megabytes through transient buffers (tonic's encode
/// and decode buffers among them). glibc serves allocations above its mmap
/// threshold with fresh mappings and trims freed memory back to the kernel,
/// so every request would fault its buffers in again; first touch runs at
/// about 0.45 GB/s on our VMs against 13+ GB/s for a copy. Raising the
/// thresholds lets freed buffers be reused. Call once, before the runtime
/// starts; a no-op where glibc is not the allocator.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
