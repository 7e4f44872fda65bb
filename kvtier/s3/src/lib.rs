//! kvtier's S3 protocol: everything `kvtierd`'s S3 endpoint needs to read
//! and answer S3 requests, without storage and without I/O. The server
//! feeds it request heads and body bytes; it returns operations, verdicts,
//! decoded bytes and response bodies.
//!
//! # Layout
//!
//! - [`error`]: [`S3Error`], the one error type: an S3 [`Code`] with its
//!   HTTP status, a message, and the `<Error>` body S3 clients parse.
//! - [`request`]: a request head to an [`Op`] (path and virtual-host
//!   addressing, keys decoded once, parameters checked, unimplemented
//!   features refused); `Range` ([`request::parse_range`]) and conditional
//!   headers ([`request::Conditions`]).
//! - [`sigv4`]: AWS Signature Version 4. [`Verifier`] checks the
//!   `Authorization` header and presigned URLs and says how the body is
//!   bound ([`Payload`]); [`Signer`] signs and presigns as a client;
//!   [`ChunkSigner`] is the signature chain of streaming uploads.
//! - [`chunked`]: the `aws-chunked` body encoding: an incremental
//!   [`ChunkedDecoder`] that checks chunk signatures and yields the
//!   trailers, and an encoder for clients.
//! - [`checksum`]: the `x-amz-checksum-*` algorithms, `Content-MD5`, and
//!   [`BodyChecks`], which checks a body against what its headers and
//!   trailers promise and yields the digests to store (the MD5 ETag, the
//!   checksum).
//! - [`xml`]: the response documents (listings, multipart results, delete
//!   results) and strict, bounded readers of the request documents.
//! - [`time`]: the three time formats S3 uses.
//!
//! A server handles a request in this order: [`request::parse`] the head,
//! [`Verifier::verify`] it, check [`request::Conditions`], build
//! [`ChunkedDecoder::from_request`] and [`BodyChecks::from_headers`], feed
//! the body through both, finish both (the decoder's trailers go to the
//! checks), and only then make the object visible.
//!
//! # Why
//!
//! - **No storage, no I/O, no async.** The protocol is pure functions and
//!   state machines over bytes, so every error case is a unit test, and the
//!   daemon's serving code stays about storage (the raft-rs `RawNode` way:
//!   the driver executes, the core decides).
//! - **Refuse what is not implemented.** S3 has many sub-resources and
//!   headers that change what a plain GET or PUT means (`?acl`,
//!   `x-amz-copy-source`, SSE, object lock, tagging, versions). Each comes
//!   out as `NotImplemented`: serving such a request as the plain operation
//!   would be a wrong success, which is worse than an error.
//! - **A client signer in the protocol crate.** Benchmarks and tests need
//!   an S3 client without an SDK; signing with the same canonical forms the
//!   verifier checks, and reproducing AWS's published signatures, keeps the
//!   two honest with each other and with AWS.
//! - **Decode incrementally, allocate nothing on a claim.** A chunk size or
//!   a declared length is a count of bytes still to come, never a buffer
//!   size, so a lying client gets an error, not an out-of-memory.
//! - **Our own small XML reader.** S3's request documents use a sliver of
//!   XML; a strict reader of that sliver, with size, depth and node bounds
//!   and no DTDs, is shorter to audit than a general parser's configuration.

pub mod checksum;
pub mod chunked;
pub mod error;
pub mod request;
pub mod sigv4;
pub mod time;
pub mod xml;

pub use checksum::{BodyChecks, BodyDigests, Checksum, ChecksumAlgorithm};
pub use chunked::{ChunkedDecoder, Trailers};
pub use error::{Code, S3Error};
pub use request::{Addressing, Conditions, Op, parse_range};
pub use sigv4::{ChunkSigner, Credentials, Payload, Signer, Verified, Verifier};
