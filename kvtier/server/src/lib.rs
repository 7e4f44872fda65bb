//! kvtierd, the kvtier daemon, and its client.
//!
//! # Layout
//!
//! - [`proto`]: the gRPC API generated from `proto/kvtier/v1/kvtier.proto`.
//! - [`checkpoints`]: the `Checkpoints` service (chunks and the catalog of
//!   names) and its client-side chunk store.
//! - [`config`]: the daemon's TOML configuration with `KVTIER_*` overrides.
//! - [`convert`]: wire ↔ core types, and core errors → gRPC statuses.
//! - [`service`]: the `KvTier` service over a [`kvtier::BlockManager`].
//! - [`registry`]: the namespaces and their replication, persisted.
//! - [`cluster`]: a static cluster of kvtierd nodes: heartbeats, replica
//!   fan-out, peer reads, hints, and the `Peer` service.
//! - [`metrics`]: Prometheus text on an HTTP port.
//! - [`region`]: shared-memory regions, the same-host data path.
//! - [`daemon`]: binds, serves, and stops gracefully on SIGTERM/SIGINT.
//! - [`client`]: the Rust client the CLI, the bench and the tests use.
//!
//! # Why
//!
//! - **Blocks are streamed in ≤ 4 MiB messages**, so any client with gRPC's
//!   default limits works and block size is never capped; the daemon bounds
//!   a request by `max_request_bytes` instead.
//! - **Request buffers are page-aligned and pooled**: first-touching fresh
//!   memory costs more than the copy, and aligned buffers go to the SSD
//!   without a staging copy.
//! - **Same-host clients skip the socket for bytes**: a shared-memory
//!   region registered once carries blocks both ways (one copy, nothing
//!   serialized); gRPC streaming is for remote clients and simple tools.
//! - **The manager runs on the blocking pool**: its tiers are synchronous
//!   (memcpy and O_DIRECT); async tasks never wait on them.

pub mod checkpoints;
pub mod client;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod metrics;
pub mod region;
pub mod registry;
pub mod service;

/// Generated from `proto/kvtier/v1/kvtier.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("kvtier.v1");
}

/// The `Checkpoints` service, generated from
/// `proto/kvtier/checkpoint/v1/checkpoint.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod checkpoint_proto {
    tonic::include_proto!("kvtier.checkpoint.v1");
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

/// Installs ring as rustls's process-wide crypto provider, unless one is
/// installed already (by an earlier call, or by the embedding process).
///
/// tonic builds its TLS configs with rustls's default provider. The blob
/// tier's HTTP client (object_store) compiles in rustls's aws-lc-rs backend
/// next to tonic's ring, and with both rustls cannot pick a default: it
/// would panic on the first TLS server or client config. Called by
/// [`daemon::run`] and [`client::Client::connect`].
pub fn install_crypto_provider() {
    // An Err means a provider is installed already: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Largest `data` message either side sends: under gRPC's 4 MiB default.
pub const CHUNK_BYTES: usize = 4 << 20;
