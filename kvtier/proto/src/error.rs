//! The error kind on the wire.
//!
//! Every error a kvtier service answers is a [`kvtier::Error`] turned into a
//! gRPC status by [`status`]: the kind travels by name in the
//! [`KIND_HEADER`] metadata entry, the message as the status message, and
//! the gRPC code is derived from the kind for generic gRPC tools. Every
//! status a client receives becomes a [`kvtier::Error`] again in
//! [`from_status`], with the same kind and message, so the same mistake is
//! the same error embedded, through the daemon and through a peer.
//!
//! A status without the entry did not come from a kvtier handler: the
//! transport failed (a refused or broken connection, a deadline), or the
//! gRPC framework refused the call (an oversize message, a missing token).
//! Those are classified by code, and a broken connection is
//! [`ErrorKind::Unavailable`], never an I/O error.

use kvtier::{Error, ErrorKind};
use tonic::{Code, Status};

/// The metadata entry that carries the kind's name ([`ErrorKind::name`]).
pub const KIND_HEADER: &str = "kvtier-error-kind";

/// The gRPC code generic tools see for `kind`.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::BlockSize => Code::InvalidArgument,
        ErrorKind::UnknownNamespace | ErrorKind::NotFound => Code::NotFound,
        // gRPC's own code for a message over the limit.
        ErrorKind::NoSpace | ErrorKind::TooLarge => Code::ResourceExhausted,
        // Retryable: a generic client backs off and sends the request again.
        ErrorKind::Throttled | ErrorKind::Closed | ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::ChecksumMismatch => Code::DataLoss,
        ErrorKind::Config => Code::FailedPrecondition,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Io | ErrorKind::Internal => Code::Internal,
        // A kind added later: the safest generic reading.
        _ => Code::Internal,
    }
}

/// A core error as a status: the one place the kind is written.
pub fn status(e: &Error) -> Status {
    status_of(e.kind(), e.message())
}

/// A status of `kind` with `message`, for failures found while reading a
/// request (before any core call made an [`Error`]).
pub fn status_of(kind: ErrorKind, message: impl Into<String>) -> Status {
    let mut s = Status::new(code(kind), message);
    s.metadata_mut()
        .insert(KIND_HEADER, tonic::metadata::MetadataValue::from_static(kind.name()));
    s
}

/// Shorthand for a request the server refuses as malformed.
pub fn invalid(message: impl Into<String>) -> Status {
    status_of(ErrorKind::InvalidArgument, message)
}

/// The kind a status carries, if a kvtier handler wrote it.
pub fn carried_kind(s: &Status) -> Option<ErrorKind> {
    s.metadata()
        .get(KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::from_name)
}

/// The kind of a status no kvtier handler wrote (or one naming a kind
/// this build does not know), from its code alone.
fn kind_of_code(s: &Status) -> ErrorKind {
    match s.code() {
        // The transport: a refused, reset or timed-out connection, a
        // cancelled stream. The service is unreachable now, not broken.
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted => {
            ErrorKind::Unavailable
        }
        // An h2 protocol failure tonic reports locally comes with its
        // source; an Internal from the far side without our entry is a bug.
        Code::Internal if std::error::Error::source(s).is_some() => ErrorKind::Unavailable,
        Code::Internal | Code::Unimplemented | Code::Ok => ErrorKind::Internal,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        // The framework's own refusals: a message over the size limit, an
        // out-of-range field.
        Code::ResourceExhausted => ErrorKind::TooLarge,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::DataLoss => ErrorKind::ChecksumMismatch,
    }
}

/// A status as a core error: the one place the kind is read back.
pub fn from_status(s: Status) -> Error {
    match carried_kind(&s) {
        Some(kind) => Error::new(kind, s.message()),
        None => {
            let kind = kind_of_code(&s);
            let mut msg = format!("{} ({:?})", s.message(), s.code());
            let mut src = std::error::Error::source(&s);
            while let Some(e) = src {
                let t = e.to_string();
                if !msg.contains(&t) {
                    msg.push_str(": ");
                    msg.push_str(&t);
                }
                src = e.source();
            }
            Error::with_source(kind, msg, s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire_with_its_message() {
        for kind in ErrorKind::ALL {
            let e = Error::new(kind, format!("what {} looks like", kind.name()));
            let s = status(&e);
            assert_eq!(s.code(), code(kind), "{kind:?}");
            let back = from_status(s);
            assert_eq!(back.kind(), kind);
            assert_eq!(back.message(), e.message());
            assert_eq!(back.to_string(), e.to_string());
        }
    }

    #[test]
    fn throttled_and_unreachable_share_a_code_but_not_a_kind() {
        let t = status_of(ErrorKind::Throttled, "queue full");
        let u = status_of(ErrorKind::Unavailable, "no replicas");
        assert_eq!(t.code(), u.code());
        assert_eq!(from_status(t).kind(), ErrorKind::Throttled);
        assert_eq!(from_status(u).kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn statuses_no_handler_wrote_are_classified_by_code() {
        // What tonic reports for a connection that broke mid-request.
        let broken = Status::new(Code::Unknown, "transport error");
        let e = from_status(broken);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("transport error"), "{e}");
        assert_eq!(
            from_status(Status::unauthenticated("missing token")).kind(),
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            from_status(Status::resource_exhausted("message length too large")).kind(),
            ErrorKind::TooLarge
        );
        assert_eq!(from_status(Status::internal("a bug")).kind(), ErrorKind::Internal);
        assert_eq!(
            from_status(Status::deadline_exceeded("late")).kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn an_unknown_kind_name_falls_back_to_the_code() {
        let mut s = Status::not_found("a newer peer's kind");
        s.metadata_mut().insert(
            KIND_HEADER,
            tonic::metadata::MetadataValue::from_static("from_the_future"),
        );
        assert_eq!(from_status(s).kind(), ErrorKind::NotFound);
    }
}
