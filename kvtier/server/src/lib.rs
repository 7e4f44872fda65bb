//! kvtierd, the kvtier daemon, and its client.
//!
//! # Layout
//!
//! - [`node`]: the local node: the block manager, the namespace registry,
//!   admission limits and the request buffers; the services are adapters
//!   over it.
//! - [`service`]: the client-facing `KvTier` gRPC service.
//! - [`peer`]: the `Peer` gRPC service other kvtierd nodes call.
//! - `bulk`: the methods of both that carry block bytes, framed by hand
//!   in front of the generated services (no copy in the gRPC stack).
//! - [`checkpoints`]: the `Checkpoints` service (chunks and the catalog of
//!   names).
//! - [`cluster`]: kvtierd nodes together: membership, replica fan-out,
//!   peer reads, hints and rebalancing (the decisions are the core's
//!   `kvtier::replication`; this module carries them out).
//! - [`repair`]: read repair (a copy that fails verification is read from
//!   another holder and rewritten from it) and the background scrub.
//! - [`config`]: the daemon's TOML configuration with `KVTIER_*` overrides.
//! - [`registry`]: the namespaces and their replication, persisted.
//! - [`metrics`]: Prometheus text on an HTTP port.
//! - [`region`]: shared-memory regions, the same-host data path.
//! - [`stats`]: the Stats reply from the manager's counters.
//! - [`s3`]: the S3-compatible listener (buckets over namespaces, a
//!   durable catalog of names per bucket).
//! - [`daemon`]: binds, serves, and stops gracefully on SIGTERM/SIGINT.
//!
//! The wire types and codecs live in `kvtier-proto`, the client in
//! `kvtier-client`; the server uses both and neither uses the server.
//!
//! # Why
//!
//! - **Request buffers are page-aligned and pooled**: first-touching fresh
//!   memory costs more than the copy, and aligned buffers go to the SSD
//!   without a staging copy.
//! - **Same-host clients skip the socket for bytes**: a shared-memory
//!   region registered once carries blocks both ways (one copy, nothing
//!   serialized); gRPC streaming is for remote clients and simple tools.
//! - **The manager runs on the blocking pool**: its tiers are synchronous
//!   (memcpy and O_DIRECT); async tasks never wait on them.
//! - **Every failure is a [`kvtier::Error`] until the wire**: handlers turn
//!   it into a status in one place (`kvtier_proto::error::status`), so its
//!   kind reaches the client unchanged.

mod bulk;
pub mod checkpoints;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod region;
pub mod registry;
pub mod repair;
pub mod s3;
pub mod service;
pub mod stats;
mod tasks;

pub use kvtier_client::{install_crypto_provider, keep_large_buffers};
pub(crate) use kvtier_proto::error::{invalid, status, status_of};
pub use kvtier_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES, checkpoint_proto, convert, proto};
