//! The one error type of the crate: an S3 error code, its HTTP status and the
//! `<Error>` body S3 clients parse.

use std::fmt;

use crate::xml::escape;

/// The S3 error codes kvtier answers with. Each maps to the HTTP status in
/// AWS's error-code table ([`Code::status`]) and to the string S3 clients
/// match on ([`Code::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    BadDigest,
    BucketAlreadyExists,
    BucketAlreadyOwnedByYou,
    BucketNotEmpty,
    /// A conditional write raced another write to the same key (409).
    ConditionalRequestConflict,
    EntityTooLarge,
    EntityTooSmall,
    IncompleteBody,
    InternalError,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidBucketName,
    InvalidChunkSizeError,
    InvalidDigest,
    InvalidPart,
    InvalidPartOrder,
    InvalidRange,
    InvalidRequest,
    InvalidStorageClass,
    InvalidURI,
    KeyTooLongError,
    MalformedTrailerError,
    MalformedXML,
    MaxMessageLengthExceeded,
    MetadataTooLarge,
    MethodNotAllowed,
    MissingContentLength,
    MissingSecurityHeader,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    NotImplemented,
    /// A conditional read whose object did not change: 304 and no body.
    NotModified,
    PreconditionFailed,
    RequestTimeout,
    RequestTimeTooSkewed,
    ServiceUnavailable,
    SignatureDoesNotMatch,
    SlowDown,
    TooManyBuckets,
    XAmzContentSHA256Mismatch,
}

impl Code {
    /// Every code, for tables and for reading codes back.
    pub const ALL: [Code; 44] = [
        Code::AccessDenied,
        Code::AuthorizationHeaderMalformed,
        Code::AuthorizationQueryParametersError,
        Code::BadDigest,
        Code::BucketAlreadyExists,
        Code::BucketAlreadyOwnedByYou,
        Code::BucketNotEmpty,
        Code::ConditionalRequestConflict,
        Code::EntityTooLarge,
        Code::EntityTooSmall,
        Code::IncompleteBody,
        Code::InternalError,
        Code::InvalidAccessKeyId,
        Code::InvalidArgument,
        Code::InvalidBucketName,
        Code::InvalidChunkSizeError,
        Code::InvalidDigest,
        Code::InvalidPart,
        Code::InvalidPartOrder,
        Code::InvalidRange,
        Code::InvalidRequest,
        Code::InvalidStorageClass,
        Code::InvalidURI,
        Code::KeyTooLongError,
        Code::MalformedTrailerError,
        Code::MalformedXML,
        Code::MaxMessageLengthExceeded,
        Code::MetadataTooLarge,
        Code::MethodNotAllowed,
        Code::MissingContentLength,
        Code::MissingSecurityHeader,
        Code::NoSuchBucket,
        Code::NoSuchKey,
        Code::NoSuchUpload,
        Code::NotImplemented,
        Code::NotModified,
        Code::PreconditionFailed,
        Code::RequestTimeout,
        Code::RequestTimeTooSkewed,
        Code::ServiceUnavailable,
        Code::SignatureDoesNotMatch,
        Code::SlowDown,
        Code::TooManyBuckets,
        Code::XAmzContentSHA256Mismatch,
    ];

    /// The code as S3 writes it in `<Code>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::AccessDenied => "AccessDenied",
            Code::AuthorizationHeaderMalformed => "AuthorizationHeaderMalformed",
            Code::AuthorizationQueryParametersError => "AuthorizationQueryParametersError",
            Code::BadDigest => "BadDigest",
            Code::BucketAlreadyExists => "BucketAlreadyExists",
            Code::BucketAlreadyOwnedByYou => "BucketAlreadyOwnedByYou",
            Code::BucketNotEmpty => "BucketNotEmpty",
            Code::ConditionalRequestConflict => "ConditionalRequestConflict",
            Code::EntityTooLarge => "EntityTooLarge",
            Code::EntityTooSmall => "EntityTooSmall",
            Code::IncompleteBody => "IncompleteBody",
            Code::InternalError => "InternalError",
            Code::InvalidAccessKeyId => "InvalidAccessKeyId",
            Code::InvalidArgument => "InvalidArgument",
            Code::InvalidBucketName => "InvalidBucketName",
            Code::InvalidChunkSizeError => "InvalidChunkSizeError",
            Code::InvalidDigest => "InvalidDigest",
            Code::InvalidPart => "InvalidPart",
            Code::InvalidPartOrder => "InvalidPartOrder",
            Code::InvalidRange => "InvalidRange",
            Code::InvalidRequest => "InvalidRequest",
            Code::InvalidStorageClass => "InvalidStorageClass",
            Code::InvalidURI => "InvalidURI",
            Code::KeyTooLongError => "KeyTooLongError",
            Code::MalformedTrailerError => "MalformedTrailerError",
            Code::MalformedXML => "MalformedXML",
            Code::MaxMessageLengthExceeded => "MaxMessageLengthExceeded",
            Code::MetadataTooLarge => "MetadataTooLarge",
            Code::MethodNotAllowed => "MethodNotAllowed",
            Code::MissingContentLength => "MissingContentLength",
            Code::MissingSecurityHeader => "MissingSecurityHeader",
            Code::NoSuchBucket => "NoSuchBucket",
            Code::NoSuchKey => "NoSuchKey",
            Code::NoSuchUpload => "NoSuchUpload",
            Code::NotImplemented => "NotImplemented",
            Code::NotModified => "NotModified",
            Code::PreconditionFailed => "PreconditionFailed",
            Code::RequestTimeout => "RequestTimeout",
            Code::RequestTimeTooSkewed => "RequestTimeTooSkewed",
            Code::ServiceUnavailable => "ServiceUnavailable",
            Code::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            Code::SlowDown => "SlowDown",
            Code::TooManyBuckets => "TooManyBuckets",
            Code::XAmzContentSHA256Mismatch => "XAmzContentSHA256Mismatch",
        }
    }

    /// Reads a code as S3 writes it; `None` for codes kvtier does not know.
    pub fn parse(text: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// The HTTP status S3 answers the code with.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Code::AccessDenied
            | Code::InvalidAccessKeyId
            | Code::RequestTimeTooSkewed
            | Code::SignatureDoesNotMatch => S::FORBIDDEN,
            Code::BucketAlreadyExists
            | Code::BucketAlreadyOwnedByYou
            | Code::BucketNotEmpty
            | Code::ConditionalRequestConflict => S::CONFLICT,
            Code::InternalError => S::INTERNAL_SERVER_ERROR,
            Code::InvalidRange => S::RANGE_NOT_SATISFIABLE,
            Code::MethodNotAllowed => S::METHOD_NOT_ALLOWED,
            Code::MissingContentLength => S::LENGTH_REQUIRED,
            Code::NoSuchBucket | Code::NoSuchKey | Code::NoSuchUpload => S::NOT_FOUND,
            Code::NotImplemented => S::NOT_IMPLEMENTED,
            Code::NotModified => S::NOT_MODIFIED,
            Code::PreconditionFailed => S::PRECONDITION_FAILED,
            Code::ServiceUnavailable | Code::SlowDown => S::SERVICE_UNAVAILABLE,
            Code::AuthorizationHeaderMalformed
            | Code::AuthorizationQueryParametersError
            | Code::BadDigest
            | Code::EntityTooLarge
            | Code::EntityTooSmall
            | Code::IncompleteBody
            | Code::InvalidArgument
            | Code::InvalidBucketName
            | Code::InvalidChunkSizeError
            | Code::InvalidDigest
            | Code::InvalidPart
            | Code::InvalidPartOrder
            | Code::InvalidRequest
            | Code::InvalidStorageClass
            | Code::InvalidURI
            | Code::KeyTooLongError
            | Code::MalformedTrailerError
            | Code::MalformedXML
            | Code::MaxMessageLengthExceeded
            | Code::MetadataTooLarge
            | Code::MissingSecurityHeader
            | Code::RequestTimeout
            | Code::TooManyBuckets
            | Code::XAmzContentSHA256Mismatch => S::BAD_REQUEST,
        }
    }

    /// S3's stock message for the code, used where nothing more precise is
    /// known.
    pub fn default_message(self) -> &'static str {
        match self {
            Code::AccessDenied => "Access Denied",
            Code::BucketNotEmpty => "The bucket you tried to delete is not empty",
            Code::BucketAlreadyOwnedByYou => {
                "Your previous request to create the named bucket succeeded and you already own it."
            }
            Code::BucketAlreadyExists => "The requested bucket name is not available.",
            Code::InternalError => "We encountered an internal error. Please try again.",
            Code::InvalidRange => "The requested range is not satisfiable",
            Code::MalformedXML => {
                "The XML you provided was not well-formed or did not validate against our published schema"
            }
            Code::MethodNotAllowed => "The specified method is not allowed against this resource.",
            Code::MissingContentLength => "You must provide the Content-Length HTTP header.",
            Code::NoSuchBucket => "The specified bucket does not exist",
            Code::NoSuchKey => "The specified key does not exist.",
            Code::NoSuchUpload => {
                "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."
            }
            Code::NotImplemented => "A header you provided implies functionality that is not implemented",
            Code::NotModified => "Not Modified",
            Code::PreconditionFailed => "At least one of the pre-conditions you specified did not hold",
            Code::ServiceUnavailable => "Please reduce your request rate.",
            Code::SlowDown => "Please reduce your request rate.",
            Code::SignatureDoesNotMatch => {
                "The request signature we calculated does not match the signature you provided. Check your key and signing method."
            }
            Code::InvalidAccessKeyId => "The AWS Access Key Id you provided does not exist in our records.",
            Code::RequestTimeTooSkewed => "The difference between the request time and the current time is too large.",
            Code::InvalidPart => {
                "One or more of the specified parts could not be found. The part may not have been uploaded, or the specified entity tag may not match the part's entity tag."
            }
            Code::InvalidPartOrder => {
                "The list of parts was not in ascending order. Parts must be ordered by part number."
            }
            Code::EntityTooSmall => "Your proposed upload is smaller than the minimum allowed object size.",
            Code::EntityTooLarge => "Your proposed upload exceeds the maximum allowed object size.",
            Code::IncompleteBody => {
                "You did not provide the number of bytes specified by the Content-Length HTTP header"
            }
            Code::KeyTooLongError => "Your key is too long",
            Code::InvalidBucketName => "The specified bucket is not valid.",
            Code::XAmzContentSHA256Mismatch => {
                "The provided 'x-amz-content-sha256' header does not match what was computed."
            }
            Code::InvalidChunkSizeError => "Only the last chunk is allowed to have a size less than 8192 bytes",
            _ => "The request could not be served.",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An S3 error: what the client is told, as S3 tells it.
///
/// `details` are extra elements of the `<Error>` body that AWS adds for some
/// codes (`RequestTime` and `ServerTime` for `RequestTimeTooSkewed`,
/// `StringToSign` and `CanonicalRequest` for `SignatureDoesNotMatch`,
/// `ExpectedDigest` for `BadDigest`, `Key` for `NoSuchKey`, ...), written in
/// order after `<Message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct S3Error {
    pub code: Code,
    pub message: String,
    pub resource: Option<String>,
    pub details: Vec<(&'static str, String)>,
}

impl S3Error {
    /// An error with a precise message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        S3Error {
            code,
            message: message.into(),
            resource: None,
            details: Vec::new(),
        }
    }

    /// An error with S3's stock message for `code`.
    pub fn from_code(code: Code) -> Self {
        S3Error::new(code, code.default_message())
    }

    /// Sets the `<Resource>` (the request path, as AWS writes it).
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Adds an element to the body after `<Message>`.
    pub fn with_detail(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.details.push((name, value.into()));
        self
    }

    /// The value of a detail element, if set.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.details.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> http::StatusCode {
        self.code.status()
    }

    /// Whether the answer carries the XML body: a 304 carries none (and no
    /// answer to a HEAD request carries one either).
    pub fn has_body(&self) -> bool {
        self.code != Code::NotModified
    }

    /// The `<Error>` body, XML-escaped, with the request id the server put in
    /// `x-amz-request-id`.
    pub fn to_xml(&self, request_id: &str) -> String {
        let mut out = String::with_capacity(256 + self.message.len());
        out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>");
        out.push_str(self.code.as_str());
        out.push_str("</Code><Message>");
        escape(&self.message, &mut out);
        out.push_str("</Message>");
        for (name, value) in &self.details {
            out.push('<');
            out.push_str(name);
            out.push('>');
            escape(value, &mut out);
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
        if let Some(resource) = &self.resource {
            out.push_str("<Resource>");
            escape(resource, &mut out);
            out.push_str("</Resource>");
        }
        out.push_str("<RequestId>");
        escape(request_id, &mut out);
        out.push_str("</RequestId></Error>");
        out
    }
}

impl S3Error {
    /// Reads an `<Error>` body back, as a client does: `None` if it is not
    /// one, or its code is not one kvtier knows. The request id is dropped,
    /// every element other than `Code`, `Message`, `Resource` and `RequestId`
    /// becomes a detail (those kvtier writes; others are skipped).
    pub fn from_xml(body: &[u8]) -> Option<S3Error> {
        let limits = crate::xml::reader::Limits {
            max_bytes: 1 << 20,
            max_depth: 2,
            max_nodes: 64,
        };
        let root = crate::xml::reader::parse(body, limits).ok()?;
        if root.name != "Error" {
            return None;
        }
        let text = |name: &str| root.children.iter().find(|c| c.name == name).map(|c| c.text.clone());
        let mut err = S3Error::new(Code::parse(text("Code")?.trim())?, text("Message").unwrap_or_default());
        err.resource = text("Resource");
        for child in &root.children {
            if let Some(name) = KNOWN_DETAILS.iter().find(|n| **n == child.name) {
                err.details.push((name, child.text.clone()));
            }
        }
        Some(err)
    }
}

/// The detail elements kvtier writes, which [`S3Error::from_xml`] reads back.
const KNOWN_DETAILS: &[&str] = &[
    "AWSAccessKeyId",
    "ActualObjectSize",
    "ArgumentName",
    "ArgumentValue",
    "BadChunkSize",
    "BucketName",
    "CalculatedDigest",
    "CanonicalRequest",
    "Chunk",
    "ClientComputedContentSHA256",
    "Condition",
    "ExpectedDigest",
    "Expires",
    "Key",
    "MaxAllowedSkewMilliseconds",
    "MaxSizeAllowed",
    "RangeRequested",
    "RequestTime",
    "S3ComputedContentSHA256",
    "ServerTime",
    "SignatureProvided",
    "Size",
    "StringToSign",
    "UploadId",
    "X-Amz-Date",
    "X-Amz-Expires",
];

impl From<Code> for S3Error {
    fn from(code: Code) -> Self {
        S3Error::from_code(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_aws_table() {
        let table = [
            (Code::AccessDenied, 403),
            (Code::AuthorizationHeaderMalformed, 400),
            (Code::BadDigest, 400),
            (Code::BucketAlreadyOwnedByYou, 409),
            (Code::BucketNotEmpty, 409),
            (Code::InvalidRange, 416),
            (Code::MethodNotAllowed, 405),
            (Code::MissingContentLength, 411),
            (Code::NoSuchKey, 404),
            (Code::NoSuchUpload, 404),
            (Code::NotImplemented, 501),
            (Code::NotModified, 304),
            (Code::PreconditionFailed, 412),
            (Code::RequestTimeTooSkewed, 403),
            (Code::SignatureDoesNotMatch, 403),
            (Code::SlowDown, 503),
            (Code::InternalError, 500),
            (Code::XAmzContentSHA256Mismatch, 400),
        ];
        for (code, status) in table {
            assert_eq!(code.status().as_u16(), status, "{code}");
        }
    }

    #[test]
    fn the_body_is_escaped_and_ordered() {
        let err = S3Error::new(Code::NoSuchKey, "no <key> & \"such\"")
            .with_detail("Key", "a&b")
            .with_resource("/bucket/a&b");
        let xml = err.to_xml("req<1>");
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>\
             <Message>no &lt;key&gt; &amp; &quot;such&quot;</Message><Key>a&amp;b</Key>\
             <Resource>/bucket/a&amp;b</Resource><RequestId>req&lt;1&gt;</RequestId></Error>"
        );
        assert_eq!(err.detail("Key"), Some("a&b"));
        assert!(err.has_body());
        assert!(!S3Error::from_code(Code::NotModified).has_body());
    }

    #[test]
    fn every_code_reads_back_and_has_an_error_status() {
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
            let status = code.status().as_u16();
            assert!(status == 304 || (400..600).contains(&status), "{code}");
        }
        assert_eq!(Code::parse("NoSuchThing"), None);
    }

    #[test]
    fn bodies_read_back() {
        let err = S3Error::new(Code::SignatureDoesNotMatch, "a <b>")
            .with_detail("StringToSign", "x\ny")
            .with_detail("Unknown", "dropped")
            .with_resource("/b/k");
        let back = S3Error::from_xml(err.to_xml("r1").as_bytes()).unwrap();
        assert_eq!(back.code, Code::SignatureDoesNotMatch);
        assert_eq!(back.message, "a <b>");
        assert_eq!(back.resource.as_deref(), Some("/b/k"));
        assert_eq!(back.details, vec![("StringToSign", "x\ny".to_owned())]);
        assert!(S3Error::from_xml(b"<Other/>").is_none());
        assert!(S3Error::from_xml(b"<Error><Code>Nope</Code></Error>").is_none());
        assert!(S3Error::from_xml(b"not xml").is_none());
    }

    #[test]
    fn display_names_code_and_message() {
        let err = S3Error::from(Code::SlowDown);
        assert_eq!(err.to_string(), "SlowDown: Please reduce your request rate.");
    }
}
