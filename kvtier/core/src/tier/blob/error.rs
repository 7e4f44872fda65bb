//! `object_store` errors mapped into [`crate::Error`], in one place.
//!
//! The kind comes from what `object_store` exposes: its error variants
//! (`NotFound`, `AlreadyExists`, `Unauthenticated`, ...), and for the rest
//! the transport failure its `HttpError` carries in the source chain (a
//! refused connection, a timeout: [`ErrorKind::Unavailable`]). The HTTP
//! status of a failed response is not reachable as a value: it sits in a
//! private retry error whose text object_store writes as "status code: NNN".
//! That one phrase is read, never a bare number (a duration such as
//! `401.258403ms` holds "403"). 429 is [`ErrorKind::Throttled`]; 500, 502,
//! 503 and 504 are [`ErrorKind::Unavailable`], after object_store's own
//! retries. Every mapped error keeps the `object_store` error as its source.

use object_store::client::{HttpError, HttpErrorKind};

use super::config::BlobConfig;
use crate::error::{Error, ErrorKind};

/// The text of an error and its sources.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !msg.contains(&s_text) {
            msg.push_str(": ");
            msg.push_str(&s_text);
        }
        src = s.source();
    }
    msg
}

/// The HTTP status object_store wrote into an error's text, if any.
fn status_in(text: &str) -> Option<u16> {
    const PHRASE: &str = "status code: ";
    let at = text.find(PHRASE)? + PHRASE.len();
    let digits = text.get(at..at + 3)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether an error's text says the service refused the credentials: a
/// 401 or 403 status, or Azure's error codes for it (which come in a
/// response body). Never a bare "403", which a duration such as
/// `401.25403ms` in the same text contains.
pub(super) fn refused_credentials(text: &str) -> bool {
    matches!(status_in(text), Some(401 | 403))
        || text.contains("AuthenticationFailed")
        || text.contains("AuthorizationFailure")
}

/// The kind of an HTTP status that object_store did not map to a variant.
fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        401 => ErrorKind::Unauthenticated,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        409 | 412 => ErrorKind::AlreadyExists,
        429 => ErrorKind::Throttled,
        500 | 502 | 503 | 504 => ErrorKind::Unavailable,
        _ => ErrorKind::Io,
    }
}

/// What kind of failure an `object_store` error is (see the module docs).
pub(super) fn kind_of(e: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::AlreadyExists,
        E::Unauthenticated { .. } => ErrorKind::Unauthenticated,
        E::PermissionDenied { .. } => ErrorKind::PermissionDenied,
        E::NotSupported { .. } | E::NotImplemented { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::Config,
        // Paths are built by the tier and tasks are its own: a bug.
        E::InvalidPath { .. } | E::JoinError { .. } => ErrorKind::Internal,
        _ => {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(s) = src {
                if let Some(h) = s.downcast_ref::<HttpError>() {
                    return match h.kind() {
                        HttpErrorKind::Connect
                        | HttpErrorKind::Request
                        | HttpErrorKind::Timeout
                        | HttpErrorKind::Interrupted => ErrorKind::Unavailable,
                        _ => ErrorKind::Io,
                    };
                }
                src = s.source();
            }
            let text = chain(e);
            match status_in(&text) {
                Some(status) => kind_of_status(status),
                None if refused_credentials(&text) => ErrorKind::PermissionDenied,
                None => ErrorKind::Io,
            }
        }
    }
}

/// Maps an `object_store` error from request `what`, keeping it as the
/// source. A refusal of the credentials says so, naming the account.
pub(super) fn map_err(cfg: &BlobConfig, what: &str, e: object_store::Error) -> Error {
    let kind = kind_of(&e);
    let text = chain(&e);
    let message = match kind {
        ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => format!(
            "blob account {} container {}: the credentials were refused ({what}): {text}",
            cfg.account, cfg.container
        ),
        _ => format!("blob {what}: {text}"),
    };
    Error::with_source(kind, message, e)
}

#[cfg(test)]
mod refusal_tests {
    use super::refused_credentials;

    #[test]
    fn a_refusal_is_read_from_the_status_not_from_any_digits() {
        // What a connection refused at startup printed once: its duration
        // holds "403", and it was taken for refused credentials.
        let unreachable = "Generic MicrosoftAzure error: Error performing GET http://127.0.0.1:1/devstoreaccount1/c?restype=container in 401.258403ms, after 3 retries, max_retries: 3, retry_timeout: 30s  - HTTP error: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)";
        assert!(!refused_credentials(unreachable));
        assert!(refused_credentials(
            "Error performing GET http://h/c in 2.1ms - Server returned non-2xx status code: 403 Forbidden: "
        ));
        assert!(refused_credentials(
            "Server returned error response: <Error><Code>AuthenticationFailed</Code></Error>"
        ));
        assert!(!refused_credentials(
            "Server returned non-2xx status code: 404 Not Found: ContainerNotFound"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(source: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
        object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: Box::new(source),
        }
    }

    /// An error whose text is what object_store's retry error prints for a
    /// failed response (the type itself is private to object_store).
    #[derive(Debug)]
    struct Status(&'static str);

    impl std::fmt::Display for Status {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "Error performing PUT http://h/c/o in 3.2ms, after 3 retries, max_retries: 3, retry_timeout: 30s  - Server returned non-2xx status code: {}: <Error/>",
                self.0
            )
        }
    }

    impl std::error::Error for Status {}

    fn cfg() -> BlobConfig {
        BlobConfig::new("acct", "cont")
    }

    #[test]
    fn statuses_map_to_kinds_callers_retry_on() {
        for (status, kind) in [
            ("429 Too Many Requests", ErrorKind::Throttled),
            ("503 Service Unavailable", ErrorKind::Unavailable),
            ("500 Internal Server Error", ErrorKind::Unavailable),
            ("401 Unauthorized", ErrorKind::Unauthenticated),
            ("403 Forbidden", ErrorKind::PermissionDenied),
            ("400 Bad Request", ErrorKind::Io),
        ] {
            let e = map_err(&cfg(), "upload of k", generic(Status(status)));
            assert_eq!(e.kind(), kind, "{status}: {e}");
            assert!(std::error::Error::source(&e).is_some(), "{status}: the source is kept");
        }
        assert!(ErrorKind::Throttled.is_retryable() && !ErrorKind::Throttled.is_outage());
    }

    #[test]
    fn an_unreachable_endpoint_is_unavailable_from_the_transport_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = map_err(
            &cfg(),
            "HEAD of k",
            generic(HttpError::new(HttpErrorKind::Connect, refused)),
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let e = map_err(&cfg(), "GET", generic(HttpError::new(HttpErrorKind::Timeout, timeout)));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        // A body that does not decode is not an outage.
        let bad = std::io::Error::from(std::io::ErrorKind::InvalidData);
        let e = map_err(&cfg(), "GET", generic(HttpError::new(HttpErrorKind::Decode, bad)));
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    }

    #[test]
    fn variants_map_without_reading_text_and_refusals_name_the_account() {
        let src = || -> Box<dyn std::error::Error + Send + Sync> { "x".into() };
        let path = || "p".to_string();
        let cases = [
            (
                object_store::Error::NotFound {
                    path: path(),
                    source: src(),
                },
                ErrorKind::NotFound,
            ),
            (
                object_store::Error::Precondition {
                    path: path(),
                    source: src(),
                },
                ErrorKind::AlreadyExists,
            ),
            (
                object_store::Error::Unauthenticated {
                    path: path(),
                    source: src(),
                },
                ErrorKind::Unauthenticated,
            ),
            (
                object_store::Error::PermissionDenied {
                    path: path(),
                    source: src(),
                },
                ErrorKind::PermissionDenied,
            ),
            (object_store::Error::NotSupported { source: src() }, ErrorKind::Config),
        ];
        for (e, kind) in cases {
            let e = map_err(&cfg(), "delete of k", e);
            assert_eq!(e.kind(), kind, "{e}");
        }
        let e = map_err(
            &cfg(),
            "delete of k",
            object_store::Error::PermissionDenied {
                path: path(),
                source: src(),
            },
        );
        assert!(
            e.message()
                .contains("blob account acct container cont: the credentials were refused"),
            "{e}"
        );
    }
}
