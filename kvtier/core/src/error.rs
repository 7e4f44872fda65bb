//! The crate's one error type.
//!
//! Callers match on [`Error::kind`]; the message carries the context of the
//! place where the failure happened. Backend (`std::io`) errors are mapped in
//! one place, [`Error::io`], so that a full disk is always [`ErrorKind::NoSpace`].
//!
//! The kind is the part of an error that crosses every boundary: it travels
//! on the wire by [`ErrorKind::name`] and comes back through
//! [`ErrorKind::from_name`], and Python exceptions, CLI exit codes and retry
//! decisions are all functions of it.

use std::fmt;

/// What went wrong, for callers that decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A caller's argument is malformed (wrong sizes, an empty key list, ...).
    InvalidArgument,
    /// A request is over a size limit (a daemon's `max_request_bytes`, a
    /// message limit): split it. Nothing was stored.
    TooLarge,
    /// A block's length differs from its namespace's block size.
    BlockSize,
    /// The namespace was never registered with this manager.
    UnknownNamespace,
    /// The tier has no room for the block and cannot make any.
    NoSpace,
    /// A bounded queue or buffer pool is full; retry later. Nothing was stored.
    Throttled,
    /// Stored bytes do not match their checksum: the block is not served.
    ChecksumMismatch,
    /// A configuration value is invalid.
    Config,
    /// The component was shut down.
    Closed,
    /// Any other I/O failure.
    Io,
    /// A named thing (a checkpoint, a chunk of one) does not exist.
    NotFound,
    /// A named thing exists and is immutable (a checkpoint name).
    AlreadyExists,
    /// A service the call needs (kvtierd, a peer, blob, enough replicas)
    /// cannot be reached now; retry later.
    Unavailable,
    /// The caller did not prove who it is (no token, a wrong one, refused
    /// blob credentials).
    Unauthenticated,
    /// The caller is known but may not do this (a region outside the
    /// daemon's region directory, a read-only path).
    PermissionDenied,
    /// A broken invariant on the other side of a call: a bug, not the
    /// caller's mistake, and not worth retrying.
    Internal,
}

impl ErrorKind {
    /// Every kind, for exhaustive round-trip tests and tables.
    pub const ALL: [ErrorKind; 16] = [
        Self::InvalidArgument,
        Self::TooLarge,
        Self::BlockSize,
        Self::UnknownNamespace,
        Self::NoSpace,
        Self::Throttled,
        Self::ChecksumMismatch,
        Self::Config,
        Self::Closed,
        Self::Io,
        Self::NotFound,
        Self::AlreadyExists,
        Self::Unavailable,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::Internal,
    ];

    /// The kind's stable name: what travels on the wire and what tools print.
    pub const fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::TooLarge => "too_large",
            Self::BlockSize => "block_size",
            Self::UnknownNamespace => "unknown_namespace",
            Self::NoSpace => "no_space",
            Self::Throttled => "throttled",
            Self::ChecksumMismatch => "checksum_mismatch",
            Self::Config => "config",
            Self::Closed => "closed",
            Self::Io => "io",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::Unavailable => "unavailable",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::Internal => "internal",
        }
    }

    /// The kind named `name`, the inverse of [`ErrorKind::name`]; `None`
    /// for a name this build does not know (a newer peer's kind).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the same request may succeed if sent again later, unchanged:
    /// a full queue, an unreachable service or one shutting down. The one
    /// retry classification every caller uses.
    pub const fn is_retryable(self) -> bool {
        match self {
            Self::Throttled | Self::Unavailable | Self::Closed => true,
            Self::InvalidArgument
            | Self::TooLarge
            | Self::BlockSize
            | Self::UnknownNamespace
            | Self::NoSpace
            | Self::ChecksumMismatch
            | Self::Config
            | Self::Io
            | Self::NotFound
            | Self::AlreadyExists
            | Self::Unauthenticated
            | Self::PermissionDenied
            | Self::Internal => false,
        }
    }

    /// Whether the failure says the service (a daemon, a peer) is gone
    /// rather than busy: a client reconnects on these, never on
    /// [`ErrorKind::Throttled`].
    pub const fn is_outage(self) -> bool {
        matches!(self, Self::Unavailable | Self::Closed)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::InvalidArgument => "invalid argument",
            Self::TooLarge => "too large",
            Self::BlockSize => "wrong block size",
            Self::UnknownNamespace => "unknown namespace",
            Self::NoSpace => "no space",
            Self::Throttled => "throttled",
            Self::ChecksumMismatch => "checksum mismatch",
            Self::Config => "invalid configuration",
            Self::Closed => "closed",
            Self::Io => "i/o error",
            Self::NotFound => "not found",
            Self::AlreadyExists => "already exists",
            Self::Unavailable => "unavailable",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission denied",
            Self::Internal => "internal error",
        };
        f.write_str(s)
    }
}

/// The source of an error: any backend error (I/O, object_store, tonic).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with its kind, a message saying where it happened, and the
/// underlying backend error when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message giving its context.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` that keeps the backend error it came from.
    pub fn with_source(kind: ErrorKind, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Maps an I/O error: `ENOSPC` and `EDQUOT` become [`ErrorKind::NoSpace`].
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            message: format!("{}: {err}", context.into()),
            source: Some(Box::new(err)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `context` in front of its message; the kind and
    /// the source stay.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub(crate) fn throttled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Throttled, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space() {
        let e = Error::io("append", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.to_string().starts_with("no space: append"), "{e}");
        let e = Error::io("read", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(std::error::Error::source(&e).is_some(), "the I/O error is kept");
    }

    #[test]
    fn every_name_round_trips_and_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.name()), Some(k), "{k:?}");
            assert!(seen.insert(k.name()), "duplicate name {}", k.name());
        }
        assert_eq!(ErrorKind::from_name("no_such_kind"), None);
    }

    #[test]
    fn throttling_is_retryable_but_not_an_outage() {
        assert!(ErrorKind::Throttled.is_retryable());
        assert!(!ErrorKind::Throttled.is_outage());
        assert!(ErrorKind::Unavailable.is_outage());
        assert!(!ErrorKind::InvalidArgument.is_retryable());
    }

    #[test]
    fn context_keeps_kind_and_source() {
        let e = Error::io("read", std::io::Error::from_raw_os_error(libc::EIO)).context("segment 3");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().starts_with("segment 3: read"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
