//! kvtier: KV-cache offload tiers for LLM inference engines.
//!
//! # Layout
//!
//! - [`block`]: block identity: namespaces, chained sequence hashes, 128-bit keys.
//! - [`tier`]: the [`Tier`] contract and the tiers: [`tier::host`] (CPU
//!   memory pool) and [`tier::disk`] (log-structured segments on a local
//!   SSD); behind them [`tier::blob`] (Azure Blob, on `object_store`).
//! - [`eviction`]: eviction policies for the host tier (LRU first).
//! - [`manager`]: the [`BlockManager`]: prefix lookup across tiers, store and
//!   load with leases, in-place stores (reserve, fill, commit) and loads
//!   that hand out blocks where they lie, the host → disk → blob cascade,
//!   admission, SSD-only mode, and the lazy writeback to blob
//!   ([`manager::writeback`]).
//! - [`checkpoint`]: named checkpoints of files: content-addressed chunks
//!   committed by a manifest, over any [`checkpoint::ChunkStore`].
//! - [`replication`]: the replication core (placement by slots,
//!   membership with epochs, write plans with hinted stand-ins, the one
//!   uploader per key), as plain functions without I/O.
//! - [`events`]: tier events (a block stored in or removed from a tier),
//!   per namespace, bounded, with sequence numbers and a resync signal:
//!   what an engine tells a KV-aware router.
//! - [`error`]: the one error type, with kinds callers match on.
//! - [`fsio`]: the file-system boundary: one durable replace (write, fsync,
//!   rename, fsync the directory) for every metadata file, and the
//!   write/fsync/rename faults tests inject.
//! - [`buf`]: page-aligned buffers for clients and the disk tier.
//! - [`transfer`]: block copies between an engine's KV tensors and staging
//!   or per-block buffers such as host-tier slots (host memcpy, or CUDA
//!   async copies with the `cuda` feature).
//!
//! # Why
//!
//! - **Keys are 128-bit and rooted in a namespace.** A key chains the hashes
//!   of every block before it, starting from the namespace fingerprint (model,
//!   dtype, layout, TP rank, salt, LoRA), so a key names a whole prefix of one
//!   model and foreign KV can never match. 64-bit keys collide at cluster scale.
//! - **Tiers are synchronous.** Host copies are memcpy-bound and disk I/O is
//!   O_DIRECT on caller threads; an async wrapper would add a hop per block.
//!   Async servers call them on a blocking pool.
//! - **Pins, not copies, keep readers safe.** A pinned host extent is never
//!   reused, and a disk reader holds its segment file open, so eviction never
//!   tears a block under a reader.
//! - **Blob is written from a log, not from the store call.** A store is
//!   acknowledged once the block is on the SSD and named in a dirty log; the
//!   upload happens later, so an outage of the cloud never fails a store or
//!   loses an acknowledged block.
//! - **A miss is not an error.** Corrupt or torn bytes are counted and
//!   reported as misses; they are never served.

pub mod block;
pub mod buf;
pub mod checkpoint;
pub mod error;
pub mod events;
pub mod eviction;
pub mod fsio;
pub mod manager;
pub mod replication;
pub mod tier;
pub mod transfer;

pub use block::{BlockKey, Namespace, NamespaceId, SequenceHasher};
pub use buf::{AlignedBuf, Recycled, Recycler};
pub use error::{Error, ErrorKind, Result};
pub use manager::{BlockManager, ManagerConfig};
pub use tier::{Tier, TierKind};
