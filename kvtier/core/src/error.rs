//! The crate's one error type.
//!
//! Callers match on [`Error::kind`]; the message carries the context of the
//! place where the failure happened. Backend (`std::io`) errors are mapped in
//! one place, [`Error::io`], so that a full disk is always [`ErrorKind::NoSpace`].

use std::fmt;

/// What went wrong, for callers that decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A caller's argument is malformed (wrong sizes, an empty key list, ...).
    InvalidArgument,
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
    /// A service the call needs (kvtierd, enough replicas) cannot be
    /// reached now; retry later.
    Unavailable,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::InvalidArgument => "invalid argument",
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
        };
        f.write_str(s)
    }
}

/// An error with its kind, a message saying where it happened, and the
/// underlying I/O error when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<std::io::Error>,
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

    /// Maps an I/O error: `ENOSPC` and `EDQUOT` become [`ErrorKind::NoSpace`].
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            message: format!("{}: {err}", context.into()),
            source: Some(err),
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
    }
}
