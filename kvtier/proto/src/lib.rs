//! kvtier's wire protocol, shared by the client and the daemon.
//!
//! # Layout
//!
//! - [`proto`]: the `KvTier` and `Peer` services, generated from
//!   `proto/kvtier/v1/kvtier.proto`.
//! - [`checkpoint_proto`]: the `Checkpoints` service, generated from
//!   `proto/kvtier/checkpoint/v1/checkpoint.proto`.
//! - [`error`]: the error kind on the wire: written in one place
//!   ([`error::status`]), read back in one place ([`error::from_status`]).
//! - [`convert`]: wire ↔ core types (namespaces, keys, tiers, stats).
//! - [`chunk`]: block bytes streamed as messages of at most [`CHUNK_BYTES`],
//!   and the presence bitmap.
//! - [`wire`]: gRPC messages framed by hand for the methods that carry
//!   block bytes, so that those bytes are not copied on the way.
//!
//! # Why
//!
//! - **A leaf crate.** The client and the server both depend on it and on
//!   nothing of each other's, so an engine links the client without the
//!   daemon, and the two sides cannot disagree on a codec.
//! - **The error kind travels beside the gRPC code.** gRPC's codes are
//!   coarser than [`kvtier::ErrorKind`] (throttled and unreachable are both
//!   `UNAVAILABLE`), so the kind rides in a metadata entry and the code is
//!   only what generic gRPC tools see.
//! - **Blocks are streamed in ≤ 4 MiB messages**, so any client with gRPC's
//!   default limits works and block size is never capped; the daemon bounds
//!   a request by its `max_request_bytes` instead.

pub mod chunk;
pub mod convert;
pub mod error;
pub mod wire;

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

/// Largest `data` message either side sends: under gRPC's 4 MiB default.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The message size limit both sides set on their gRPC stubs: one data
/// message plus its framing, with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 2 * CHUNK_BYTES;

/// The HTTP/2 settings both sides set, so that block bytes stream without
/// waiting for window updates or paying per-frame costs: a DATA frame of up
/// to 1 MiB (h2's default is 16 KiB), and a stream window that holds a
/// request of several data messages.
pub const H2_MAX_FRAME_BYTES: u32 = (1 << 20) - 1;
/// See [`H2_MAX_FRAME_BYTES`].
pub const H2_STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// See [`H2_MAX_FRAME_BYTES`].
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// The file-name prefix of a shared-memory region: the daemon registers
/// only files named so, directly in its region directory.
pub const REGION_PREFIX: &str = "kvtier-";
