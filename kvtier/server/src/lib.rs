//! kvtierd, the kvtier daemon, and its client.
//!
//! # Layout
//!
//! - [`proto`]: the gRPC API generated from `proto/kvtier/v1/kvtier.proto`.
//! - [`config`]: the daemon's TOML configuration with `KVTIER_*` overrides.
//! - [`convert`]: wire ↔ core types, and core errors → gRPC statuses.
//! - [`service`]: the `KvTier` service over a [`kvtier::BlockManager`].
//! - [`metrics`]: Prometheus text on an HTTP port.
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
//! - **The manager runs on the blocking pool**: its tiers are synchronous
//!   (memcpy and O_DIRECT); async tasks never wait on them.

pub mod client;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod metrics;
pub mod service;

/// Generated from `proto/kvtier/v1/kvtier.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("kvtier.v1");
}

/// Largest `data` message either side sends: under gRPC's 4 MiB default.
pub const CHUNK_BYTES: usize = 4 << 20;
