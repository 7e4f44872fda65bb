//! From an HTTP request head to the S3 operation it asks for ([`Op`]), with
//! the bucket and key decoded and every parameter checked; plus the helpers
//! for `Range` ([`range`]) and conditional headers ([`conditions`]).
//!
//! What kvtier does not implement (ACLs, tagging, versioning, copies,
//! encryption, object lock, ...) comes out as `NotImplemented`, never as a
//! plain GET or PUT that would ignore the part it did not understand.

pub mod conditions;
pub mod range;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, Method, Uri};

use crate::error::{Code, S3Error};
use crate::sigv4::percent_decode;

pub use conditions::{Conditions, EtagCondition};
pub use range::parse_range;

/// The longest key, in bytes of UTF-8, as in S3.
pub const MAX_KEY_BYTES: usize = 1024;
/// The highest part number of a multipart upload, as in S3.
pub const MAX_PART_NUMBER: u32 = 10_000;
/// The most keys (or uploads, or parts) one listing returns, as in S3.
pub const MAX_LIST_KEYS: u32 = 1000;
/// S3's size limits: one PutObject (`EntityTooLarge` above), one part (the
/// same), and every part but the last (`EntityTooSmall` below, checked at
/// CompleteMultipartUpload).
pub const MAX_PUT_OBJECT_BYTES: u64 = 5 << 30;
pub const MAX_PART_BYTES: u64 = 5 << 30;
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// The most bytes of user metadata (`x-amz-meta-*` names without the
/// prefix, and values), as in S3.
pub const MAX_USER_METADATA_BYTES: usize = 2048;

/// How buckets are addressed besides path style (`/{bucket}/{key}`): a
/// request whose `Host` (port stripped) is `{bucket}.{domain}` for one of
/// `domains` is virtual-host style. A `Host` equal to a domain, or matching
/// none, is path style.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addressing {
    pub domains: Vec<String>,
}

/// The parameters of ListObjects (V1) and ListObjectsV2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListObjectsParams {
    pub prefix: String,
    /// `None` when absent or empty.
    pub delimiter: Option<String>,
    /// 0..=1000 (S3 caps larger values at 1000); 1000 by default.
    pub max_keys: u32,
    /// `encoding-type=url`: keys in the answer are URL-encoded.
    pub encoding_url: bool,
    pub version: ListVersion,
}

/// What differs between the two ListObjects versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListVersion {
    /// ListObjects: list after `marker` (empty: from the start); the answer
    /// has the owner of each object.
    V1 { marker: String },
    /// ListObjectsV2 (`list-type=2`).
    V2 {
        /// As the client sent it; see [`decode_continuation_token`].
        continuation_token: Option<String>,
        start_after: Option<String>,
        fetch_owner: bool,
    },
}

impl ListObjectsParams {
    /// The key the listing starts after, whatever the version: V1's marker,
    /// V2's start-after; V2's continuation token (which wins over
    /// start-after) must be decoded by the caller with
    /// [`decode_continuation_token`].
    pub fn start_after(&self) -> Option<&str> {
        match &self.version {
            ListVersion::V1 { marker } => Some(marker.as_str()).filter(|m| !m.is_empty()),
            ListVersion::V2 { start_after, .. } => start_after.as_deref(),
        }
    }
}

/// The parameters of ListMultipartUploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListUploadsParams {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub key_marker: String,
    pub upload_id_marker: String,
    /// 1..=1000; 1000 by default.
    pub max_uploads: u32,
    pub encoding_url: bool,
}

impl Default for ListUploadsParams {
    fn default() -> Self {
        ListUploadsParams {
            prefix: String::new(),
            delimiter: None,
            key_marker: String::new(),
            upload_id_marker: String::new(),
            max_uploads: MAX_LIST_KEYS,
            encoding_url: false,
        }
    }
}

/// The parameters of ListParts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPartsParams {
    /// 1..=1000; 1000 by default.
    pub max_parts: u32,
    /// List parts above this number; 0 by default.
    pub part_number_marker: u32,
}

/// The S3 operations kvtier serves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    ListBuckets,
    CreateBucket {
        bucket: String,
    },
    HeadBucket {
        bucket: String,
    },
    DeleteBucket {
        bucket: String,
    },
    GetBucketLocation {
        bucket: String,
    },
    ListObjects {
        bucket: String,
        params: ListObjectsParams,
    },
    ListMultipartUploads {
        bucket: String,
        params: ListUploadsParams,
    },
    DeleteObjects {
        bucket: String,
    },
    PutObject {
        bucket: String,
        key: String,
    },
    /// `response_headers`: the `response-*` overrides, as the header to set
    /// and its value (S3 honours them on signed requests only).
    GetObject {
        bucket: String,
        key: String,
        response_headers: Vec<(&'static str, String)>,
    },
    HeadObject {
        bucket: String,
        key: String,
        response_headers: Vec<(&'static str, String)>,
    },
    DeleteObject {
        bucket: String,
        key: String,
    },
    CreateMultipartUpload {
        bucket: String,
        key: String,
    },
    UploadPart {
        bucket: String,
        key: String,
        upload_id: String,
        part_number: u32,
    },
    /// `PUT` with `x-amz-copy-source`: a copy of a whole object (in this
    /// bucket or another); `replace_metadata` for
    /// `x-amz-metadata-directive: REPLACE`.
    CopyObject {
        bucket: String,
        key: String,
        source_bucket: String,
        source_key: String,
        replace_metadata: bool,
    },
    CompleteMultipartUpload {
        bucket: String,
        key: String,
        upload_id: String,
    },
    AbortMultipartUpload {
        bucket: String,
        key: String,
        upload_id: String,
    },
    ListParts {
        bucket: String,
        key: String,
        upload_id: String,
        params: ListPartsParams,
    },
}

impl Op {
    /// The operation's name in S3's API, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::ListBuckets => "ListBuckets",
            Op::CreateBucket { .. } => "CreateBucket",
            Op::HeadBucket { .. } => "HeadBucket",
            Op::DeleteBucket { .. } => "DeleteBucket",
            Op::GetBucketLocation { .. } => "GetBucketLocation",
            Op::ListObjects { params, .. } => match params.version {
                ListVersion::V1 { .. } => "ListObjects",
                ListVersion::V2 { .. } => "ListObjectsV2",
            },
            Op::ListMultipartUploads { .. } => "ListMultipartUploads",
            Op::DeleteObjects { .. } => "DeleteObjects",
            Op::PutObject { .. } => "PutObject",
            Op::GetObject { .. } => "GetObject",
            Op::HeadObject { .. } => "HeadObject",
            Op::DeleteObject { .. } => "DeleteObject",
            Op::CreateMultipartUpload { .. } => "CreateMultipartUpload",
            Op::UploadPart { .. } => "UploadPart",
            Op::CopyObject { .. } => "CopyObject",
            Op::CompleteMultipartUpload { .. } => "CompleteMultipartUpload",
            Op::AbortMultipartUpload { .. } => "AbortMultipartUpload",
            Op::ListParts { .. } => "ListParts",
        }
    }

    pub fn bucket(&self) -> Option<&str> {
        match self {
            Op::ListBuckets => None,
            Op::CreateBucket { bucket }
            | Op::HeadBucket { bucket }
            | Op::DeleteBucket { bucket }
            | Op::GetBucketLocation { bucket }
            | Op::ListObjects { bucket, .. }
            | Op::ListMultipartUploads { bucket, .. }
            | Op::DeleteObjects { bucket }
            | Op::PutObject { bucket, .. }
            | Op::GetObject { bucket, .. }
            | Op::HeadObject { bucket, .. }
            | Op::DeleteObject { bucket, .. }
            | Op::CreateMultipartUpload { bucket, .. }
            | Op::UploadPart { bucket, .. }
            | Op::CopyObject { bucket, .. }
            | Op::CompleteMultipartUpload { bucket, .. }
            | Op::AbortMultipartUpload { bucket, .. }
            | Op::ListParts { bucket, .. } => Some(bucket),
        }
    }

    pub fn key(&self) -> Option<&str> {
        match self {
            Op::PutObject { key, .. }
            | Op::CopyObject { key, .. }
            | Op::GetObject { key, .. }
            | Op::HeadObject { key, .. }
            | Op::DeleteObject { key, .. }
            | Op::CreateMultipartUpload { key, .. }
            | Op::UploadPart { key, .. }
            | Op::CompleteMultipartUpload { key, .. }
            | Op::AbortMultipartUpload { key, .. }
            | Op::ListParts { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Query parameters that name S3 features kvtier does not implement: a
/// request carrying one is `NotImplemented`, whatever else it looks like.
const UNSUPPORTED_SUBRESOURCES: &[&str] = &[
    "abac",
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "cors",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "legal-hold",
    "lifecycle",
    "logging",
    "metadataConfiguration",
    "metadataInventoryTable",
    "metadataJournalTable",
    "metadataTable",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "renameObject",
    "replication",
    "requestPayment",
    "restore",
    "retention",
    "select",
    "select-type",
    "session",
    "tagging",
    "torrent",
    "versioning",
    "versions",
    "website",
];

/// The `response-*` parameters of GetObject and HeadObject and the headers
/// they set.
const RESPONSE_OVERRIDES: [(&str, &str); 6] = [
    ("response-cache-control", "cache-control"),
    ("response-content-disposition", "content-disposition"),
    ("response-content-encoding", "content-encoding"),
    ("response-content-language", "content-language"),
    ("response-content-type", "content-type"),
    ("response-expires", "expires"),
];

/// Reads the operation of a request head.
pub fn parse(method: &Method, uri: &Uri, headers: &HeaderMap, addressing: &Addressing) -> Result<Op, S3Error> {
    parse_inner(method, uri, headers, addressing).map_err(|e| {
        if e.resource.is_some() {
            e
        } else {
            let path = uri.path().to_owned();
            e.with_resource(path)
        }
    })
}

/// [`parse`] on a request head.
pub fn parse_parts(parts: &http::request::Parts, addressing: &Addressing) -> Result<Op, S3Error> {
    parse(&parts.method, &parts.uri, &parts.headers, addressing)
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Result<Query, S3Error> {
        let mut pairs = Vec::new();
        for piece in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            pairs.push((decode_query(name)?, decode_query(value)?));
        }
        Ok(Query(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }
}

/// Query names and values are form-encoded: `+` is a space, as S3 reads it.
fn decode_query(text: &str) -> Result<String, S3Error> {
    let bytes = percent_decode(&text.replace('+', "%20")).ok_or_else(bad_uri)?;
    String::from_utf8(bytes).map_err(|_| bad_uri())
}

fn bad_uri() -> S3Error {
    S3Error::new(Code::InvalidURI, "Couldn't parse the specified URI.")
}

fn parse_inner(method: &Method, uri: &Uri, headers: &HeaderMap, addressing: &Addressing) -> Result<Op, S3Error> {
    let query = Query::parse(uri.query().unwrap_or(""))?;
    if let Some((name, _)) = query
        .0
        .iter()
        .find(|(n, _)| UNSUPPORTED_SUBRESOURCES.contains(&n.as_str()))
    {
        return Err(not_implemented(format!("The ?{name} subresource is not implemented.")));
    }
    let (bucket, key) = target(uri, headers, addressing)?;
    let Some(bucket) = bucket else {
        return match *method {
            Method::GET => {
                if let Some(param) = ["prefix", "continuation-token", "max-buckets", "bucket-region"]
                    .iter()
                    .find(|p| query.has(p))
                {
                    return Err(not_implemented(format!("ListBuckets with {param} is not implemented.")));
                }
                Ok(Op::ListBuckets)
            }
            _ => Err(method_not_allowed()),
        };
    };
    match key {
        None => bucket_op(method, bucket, &query, headers),
        Some(key) => object_op(method, bucket, key, &query, headers),
    }
}

/// The bucket and key a request addresses, each decoded once.
fn target(
    uri: &Uri,
    headers: &HeaderMap,
    addressing: &Addressing,
) -> Result<(Option<String>, Option<String>), S3Error> {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let host = strip_port(host.trim()).to_ascii_lowercase();
    let virtual_bucket = addressing.domains.iter().find_map(|domain| {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        host.strip_suffix(domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
    });
    let path = uri.path();
    let path = path.strip_prefix('/').unwrap_or(path);
    let (bucket, raw_key) = match virtual_bucket {
        Some(bucket) => (Some(bucket), Some(path)),
        None => match path.split_once('/') {
            Some((bucket, key)) => (Some(decode_path(bucket)?), Some(key)),
            None if path.is_empty() => (None, None),
            None => (Some(decode_path(path)?), None),
        },
    };
    let Some(bucket) = bucket else { return Ok((None, None)) };
    check_bucket_name(&bucket)?;
    let key = match raw_key {
        Some(raw) if !raw.is_empty() => Some(decode_key(raw)?),
        _ => None,
    };
    Ok((Some(bucket), key))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: the port, if any, follows the bracket.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `x-amz-copy-source`: `[/]bucket/key`, percent-encoded, with an optional
/// `?versionId=null` (other versions are not implemented).
fn parse_copy_source(v: &http::HeaderValue) -> Result<(String, String), S3Error> {
    let bad = || {
        S3Error::new(
            Code::InvalidArgument,
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey.",
        )
        .with_detail("ArgumentName", "x-amz-copy-source")
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    if let Some(q) = query {
        match q.strip_prefix("versionId=") {
            Some("null") => {}
            _ => return Err(not_implemented("Copying an object version is not implemented.")),
        }
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    let (bucket, key) = path.split_once('/').ok_or_else(bad)?;
    let bucket = decode_path(bucket)?;
    check_bucket_name(&bucket)?;
    let key = decode_key(key)?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok((bucket, key))
}

fn decode_path(raw: &str) -> Result<String, S3Error> {
    let bytes = percent_decode(raw).ok_or_else(bad_uri)?;
    String::from_utf8(bytes).map_err(|_| bad_uri())
}

/// A key from its raw path form: percent-decoded exactly once (`+` is a
/// plus in paths), valid UTF-8, at most 1024 bytes.
fn decode_key(raw: &str) -> Result<String, S3Error> {
    let key = decode_path(raw)?;
    if key.len() > MAX_KEY_BYTES {
        return Err(S3Error::from_code(Code::KeyTooLongError)
            .with_detail("Size", key.len().to_string())
            .with_detail("MaxSizeAllowed", MAX_KEY_BYTES.to_string()));
    }
    Ok(key)
}

/// S3's rules for bucket names: 3 to 63 characters of lowercase letters,
/// digits, dots and hyphens, starting and ending with a letter or digit, no
/// two dots in a row, not an IPv4 address, none of the reserved prefixes
/// and suffixes.
pub fn check_bucket_name(name: &str) -> Result<(), S3Error> {
    let bad = |why: &str| {
        S3Error::new(
            Code::InvalidBucketName,
            format!("The specified bucket is not valid: {why}."),
        )
        .with_detail("BucketName", name)
    };
    if !(3..=63).contains(&name.len()) {
        return Err(bad("a name has 3 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(bad("only lowercase letters, digits, dots and hyphens are allowed"));
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return Err(bad("a name starts and ends with a letter or digit"));
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return Err(bad("dots may not be adjacent to dots or hyphens"));
    }
    if name.split('.').count() == 4
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad("a name may not be an IP address"));
    }
    for prefix in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(prefix) {
            return Err(bad("the prefix is reserved"));
        }
    }
    for suffix in ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"] {
        if name.ends_with(suffix) {
            return Err(bad("the suffix is reserved"));
        }
    }
    Ok(())
}

fn not_implemented(message: impl Into<String>) -> S3Error {
    S3Error::new(Code::NotImplemented, message)
}

fn method_not_allowed() -> S3Error {
    S3Error::from_code(Code::MethodNotAllowed)
}

/// A sub-resource used with a method it has no operation for.
fn check_subresource_methods(method: &Method, query: &Query, allowed: &[(&str, Method)]) -> Result<(), S3Error> {
    for (name, only) in allowed {
        if query.has(name) && method != only {
            return Err(S3Error::new(
                Code::MethodNotAllowed,
                format!("?{name} does not take {method}."),
            ));
        }
    }
    Ok(())
}

fn bucket_op(method: &Method, bucket: String, query: &Query, headers: &HeaderMap) -> Result<Op, S3Error> {
    check_subresource_methods(
        method,
        query,
        &[
            ("delete", Method::POST),
            ("location", Method::GET),
            ("uploads", Method::GET),
        ],
    )?;
    match *method {
        Method::PUT => {
            check_acl(headers)?;
            if header(headers, "x-amz-bucket-object-lock-enabled").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                return Err(not_implemented("Object lock is not implemented."));
            }
            Ok(Op::CreateBucket { bucket })
        }
        Method::HEAD => Ok(Op::HeadBucket { bucket }),
        Method::DELETE => Ok(Op::DeleteBucket { bucket }),
        Method::POST if query.has("delete") => Ok(Op::DeleteObjects { bucket }),
        Method::POST => Err(not_implemented("POST uploads (browser forms) are not implemented.")),
        Method::GET if query.has("location") => Ok(Op::GetBucketLocation { bucket }),
        Method::GET if query.has("uploads") => Ok(Op::ListMultipartUploads {
            params: list_uploads_params(query)?,
            bucket,
        }),
        Method::GET => Ok(Op::ListObjects {
            params: list_objects_params(query)?,
            bucket,
        }),
        _ => Err(method_not_allowed()),
    }
}

fn object_op(method: &Method, bucket: String, key: String, query: &Query, headers: &HeaderMap) -> Result<Op, S3Error> {
    if let Some(version) = query.get("versionId")
        && version != "null"
    {
        return Err(not_implemented("Object versions are not implemented."));
    }
    check_sse(headers)?;
    check_subresource_methods(method, query, &[("uploads", Method::POST), ("delete", Method::POST)])?;
    if *method == Method::POST && query.has("delete") {
        return Err(S3Error::new(Code::MethodNotAllowed, "?delete is a bucket operation."));
    }
    let upload_id = match query.get("uploadId") {
        Some("") => return Err(S3Error::from_code(Code::NoSuchUpload).with_detail("UploadId", "")),
        other => other.map(str::to_owned),
    };
    match *method {
        Method::PUT => {
            if let Some(source) = headers.get("x-amz-copy-source") {
                if upload_id.is_some() || query.has("partNumber") {
                    return Err(not_implemented("UploadPartCopy is not implemented."));
                }
                let (source_bucket, source_key) = parse_copy_source(source)?;
                let replace_metadata = match headers.get("x-amz-metadata-directive").map(|v| v.to_str()) {
                    None => false,
                    Some(Ok(d)) if d.eq_ignore_ascii_case("COPY") => false,
                    Some(Ok(d)) if d.eq_ignore_ascii_case("REPLACE") => true,
                    Some(_) => {
                        return Err(S3Error::new(Code::InvalidArgument, "Unknown metadata directive.")
                            .with_detail("ArgumentName", "x-amz-metadata-directive"));
                    }
                };
                for h in [
                    "x-amz-copy-source-if-match",
                    "x-amz-copy-source-if-none-match",
                    "x-amz-copy-source-if-modified-since",
                    "x-amz-copy-source-if-unmodified-since",
                    "x-amz-copy-source-range",
                    "x-amz-tagging-directive",
                ] {
                    if headers.contains_key(h) {
                        return Err(not_implemented(format!("CopyObject with {h} is not implemented.")));
                    }
                }
                return Ok(Op::CopyObject {
                    bucket,
                    key,
                    source_bucket,
                    source_key,
                    replace_metadata,
                });
            }
            match (upload_id, query.get("partNumber")) {
                (Some(upload_id), Some(n)) => Ok(Op::UploadPart {
                    part_number: parse_part_number(n)?,
                    bucket,
                    key,
                    upload_id,
                }),
                (Some(_), None) => Err(invalid_argument("partNumber", "", "UploadPart requires partNumber.")),
                (None, Some(n)) => Err(invalid_argument("uploadId", n, "UploadPart requires uploadId.")),
                (None, None) => {
                    check_object_write_headers(headers)?;
                    Ok(Op::PutObject { bucket, key })
                }
            }
        }
        Method::GET | Method::HEAD => {
            if let Some(upload_id) = upload_id {
                if *method == Method::HEAD {
                    return Err(method_not_allowed());
                }
                return Ok(Op::ListParts {
                    params: list_parts_params(query)?,
                    bucket,
                    key,
                    upload_id,
                });
            }
            if query.has("partNumber") {
                return Err(not_implemented(
                    "GetObject and HeadObject by partNumber are not implemented.",
                ));
            }
            let response_headers = RESPONSE_OVERRIDES
                .iter()
                .filter_map(|(param, header)| query.get(param).map(|v| (*header, v.to_owned())))
                .collect();
            if *method == Method::GET {
                Ok(Op::GetObject {
                    bucket,
                    key,
                    response_headers,
                })
            } else {
                Ok(Op::HeadObject {
                    bucket,
                    key,
                    response_headers,
                })
            }
        }
        Method::DELETE => match upload_id {
            Some(upload_id) => Ok(Op::AbortMultipartUpload { bucket, key, upload_id }),
            None => {
                for h in ["if-match", "x-amz-if-match-last-modified-time", "x-amz-if-match-size"] {
                    if headers.contains_key(h) {
                        return Err(not_implemented(format!("DeleteObject with {h} is not implemented.")));
                    }
                }
                Ok(Op::DeleteObject { bucket, key })
            }
        },
        Method::POST => match upload_id {
            Some(upload_id) => Ok(Op::CompleteMultipartUpload { bucket, key, upload_id }),
            None if query.has("uploads") => {
                check_object_write_headers(headers)?;
                Ok(Op::CreateMultipartUpload { bucket, key })
            }
            None => Err(method_not_allowed()),
        },
        _ => Err(method_not_allowed()),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
}

fn check_sse(headers: &HeaderMap) -> Result<(), S3Error> {
    for (name, _) in headers {
        if name.as_str().starts_with("x-amz-server-side-encryption") {
            return Err(not_implemented(format!(
                "Server-side encryption ({name}) is not implemented."
            )));
        }
    }
    Ok(())
}

fn check_acl(headers: &HeaderMap) -> Result<(), S3Error> {
    if let Some(acl) = header(headers, "x-amz-acl")
        && acl != "private"
        && acl != "bucket-owner-full-control"
    {
        return Err(not_implemented(format!(
            "The canned ACL {acl} is not implemented; only private is."
        )));
    }
    for (name, _) in headers {
        if name.as_str().starts_with("x-amz-grant-") {
            return Err(not_implemented(format!("ACL grants ({name}) are not implemented.")));
        }
    }
    Ok(())
}

/// The headers of PutObject and CreateMultipartUpload that ask for features
/// kvtier does not have.
fn check_object_write_headers(headers: &HeaderMap) -> Result<(), S3Error> {
    check_acl(headers)?;
    for name in [
        "x-amz-tagging",
        "x-amz-website-redirect-location",
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
        "x-amz-object-lock-legal-hold",
        "x-amz-write-offset-bytes",
    ] {
        if headers.contains_key(name) {
            return Err(not_implemented(format!("The {name} header is not implemented.")));
        }
    }
    if let Some(class) = header(headers, "x-amz-storage-class")
        && class != "STANDARD"
    {
        return Err(not_implemented(format!(
            "The storage class {class} is not implemented; only STANDARD is."
        )));
    }
    Ok(())
}

fn invalid_argument(name: &str, value: &str, message: &str) -> S3Error {
    S3Error::new(Code::InvalidArgument, message)
        .with_detail("ArgumentName", name)
        .with_detail("ArgumentValue", value)
}

/// A part number: an integer in 1..=10000, else `InvalidArgument`.
pub fn parse_part_number(text: &str) -> Result<u32, S3Error> {
    match parse_digits(text) {
        Some(n) if (1..=u64::from(MAX_PART_NUMBER)).contains(&n) => Ok(n as u32),
        _ => Err(invalid_argument(
            "partNumber",
            text,
            "Part number must be an integer between 1 and 10000, inclusive",
        )),
    }
}

/// Plain decimal digits (no sign, no spaces), saturating far above any
/// limit here.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_max(query: &Query, name: &str, default: u32, allow_zero: bool) -> Result<u32, S3Error> {
    let Some(text) = query.get(name) else {
        return Ok(default);
    };
    let message = format!("Provided {name} not an integer or within integer range");
    let n = if text.starts_with('-') && text.len() > 1 && text[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid_argument(name, text, &message));
    } else {
        parse_digits(text).ok_or_else(|| invalid_argument(name, text, &message))?
    };
    if n == 0 && !allow_zero {
        return Err(invalid_argument(
            name,
            text,
            &format!("Argument {name} must be an integer between 1 and 2147483647"),
        ));
    }
    // S3 caps larger values rather than refusing them.
    Ok(n.min(u64::from(MAX_LIST_KEYS)) as u32)
}

fn encoding_url(query: &Query) -> Result<bool, S3Error> {
    match query.get("encoding-type") {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("url") => Ok(true),
        Some(v) => Err(invalid_argument(
            "encoding-type",
            v,
            "Invalid Encoding Method specified in Request",
        )),
    }
}

fn list_objects_params(query: &Query) -> Result<ListObjectsParams, S3Error> {
    let version = match query.get("list-type") {
        None => ListVersion::V1 {
            marker: query.get("marker").unwrap_or("").to_owned(),
        },
        Some("2") => {
            let continuation_token = match query.get("continuation-token") {
                Some("") => {
                    return Err(invalid_argument(
                        "continuation-token",
                        "",
                        "The continuation token provided is incorrect",
                    ));
                }
                other => other.map(str::to_owned),
            };
            let fetch_owner = match query.get("fetch-owner") {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => return Err(invalid_argument("fetch-owner", v, "Invalid Argument")),
            };
            ListVersion::V2 {
                continuation_token,
                start_after: query.get("start-after").filter(|s| !s.is_empty()).map(str::to_owned),
                fetch_owner,
            }
        }
        Some(v) => {
            return Err(invalid_argument(
                "list-type",
                v,
                "Invalid List Type specified in Request",
            ));
        }
    };
    Ok(ListObjectsParams {
        prefix: query.get("prefix").unwrap_or("").to_owned(),
        delimiter: query.get("delimiter").filter(|d| !d.is_empty()).map(str::to_owned),
        max_keys: parse_max(query, "max-keys", MAX_LIST_KEYS, true)?,
        encoding_url: encoding_url(query)?,
        version,
    })
}

fn list_uploads_params(query: &Query) -> Result<ListUploadsParams, S3Error> {
    Ok(ListUploadsParams {
        prefix: query.get("prefix").unwrap_or("").to_owned(),
        delimiter: query.get("delimiter").filter(|d| !d.is_empty()).map(str::to_owned),
        key_marker: query.get("key-marker").unwrap_or("").to_owned(),
        upload_id_marker: query.get("upload-id-marker").unwrap_or("").to_owned(),
        max_uploads: parse_max(query, "max-uploads", MAX_LIST_KEYS, false)?,
        encoding_url: encoding_url(query)?,
    })
}

fn list_parts_params(query: &Query) -> Result<ListPartsParams, S3Error> {
    let part_number_marker = match query.get("part-number-marker") {
        None => 0,
        Some(text) => match parse_digits(text) {
            Some(n) if n <= u64::from(MAX_PART_NUMBER) => n as u32,
            _ => {
                return Err(invalid_argument(
                    "part-number-marker",
                    text,
                    "Argument part-number-marker must be an integer between 0 and 10000",
                ));
            }
        },
    };
    Ok(ListPartsParams {
        max_parts: parse_max(query, "max-parts", MAX_LIST_KEYS, false)?,
        part_number_marker,
    })
}

/// The user metadata of a PutObject or CreateMultipartUpload: the
/// `x-amz-meta-*` headers, names without the prefix (lowercase, as HTTP
/// carries them), in header order; `MetadataTooLarge` over 2 KB in all.
pub fn user_metadata(headers: &HeaderMap) -> Result<Vec<(String, String)>, S3Error> {
    let mut metadata = Vec::new();
    let mut total_bytes = 0;
    for (name, value) in headers {
        let Some(short) = name.as_str().strip_prefix("x-amz-meta-") else {
            continue;
        };
        let value = value
            .to_str()
            .map_err(|_| S3Error::new(Code::InvalidArgument, format!("The value of {name} is not ASCII.")))?;
        total_bytes += short.len() + value.len();
        if total_bytes > MAX_USER_METADATA_BYTES {
            return Err(S3Error::new(
                Code::MetadataTooLarge,
                "Your metadata headers exceed the maximum allowed metadata size",
            )
            .with_detail("MaxSizeAllowed", MAX_USER_METADATA_BYTES.to_string()));
        }
        metadata.push((short.to_owned(), value.to_owned()));
    }
    Ok(metadata)
}

/// The V2 continuation token that resumes a listing after `key`: opaque to
/// clients (base64url of the key).
pub fn continuation_token(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// The key a continuation token resumes after; `InvalidArgument` if the
/// token is not one of [`continuation_token`]'s.
pub fn decode_continuation_token(token: &str) -> Result<String, S3Error> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|key| key.len() <= MAX_KEY_BYTES)
        .ok_or_else(|| {
            invalid_argument(
                "continuation-token",
                token,
                "The continuation token provided is incorrect",
            )
        })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn addressing() -> Addressing {
        Addressing {
            domains: vec!["s3.example.com".into()],
        }
    }

    fn op_with(method: &str, uri: &str, pairs: &[(&'static str, &str)]) -> Result<Op, S3Error> {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:9000"));
        for (n, v) in pairs {
            headers.insert(*n, HeaderValue::from_str(v).unwrap());
        }
        parse(&method.parse().unwrap(), &uri.parse().unwrap(), &headers, &addressing())
    }

    fn op(method: &str, uri: &str) -> Op {
        op_with(method, uri, &[]).unwrap()
    }

    fn code(method: &str, uri: &str, pairs: &[(&'static str, &str)]) -> Code {
        op_with(method, uri, pairs).unwrap_err().code
    }

    fn obj(bucket: &str, key: &str) -> (String, String) {
        (bucket.to_owned(), key.to_owned())
    }

    #[test]
    fn path_style_keys_are_decoded_once() {
        let cases = [
            ("/bkt/a/b/c.txt", "a/b/c.txt"),
            ("/bkt/a%2Fb", "a/b"),
            ("/bkt/a%252F", "a%2F"),
            ("/bkt/a+b%20c", "a+b c"),
            ("/bkt/dir//x/../y:z", "dir//x/../y:z"),
            ("/bkt/%E2%9C%93", "\u{2713}"),
            ("/bkt/trailing/", "trailing/"),
        ];
        for (uri, key) in cases {
            match op("GET", uri) {
                Op::GetObject { bucket, key: got, .. } => assert_eq!(obj(&bucket, &got), obj("bkt", key), "{uri}"),
                other => panic!("{uri}: {other:?}"),
            }
        }
        assert_eq!(code("GET", "/bkt/%ff", &[]), Code::InvalidURI);
        assert_eq!(code("GET", "/bkt/%zz", &[]), Code::InvalidURI);
    }

    #[test]
    fn keys_are_bounded() {
        let long = format!("/bkt/{}", "k".repeat(1024));
        assert!(matches!(op("PUT", &long), Op::PutObject { .. }));
        let too_long = format!("/bkt/{}", "k".repeat(1025));
        assert_eq!(code("PUT", &too_long, &[]), Code::KeyTooLongError);
        // Bytes count, not characters: 342 three-byte characters are 1026 bytes.
        let wide = format!("/bkt/{}", "%E2%9C%93".repeat(342));
        assert_eq!(code("PUT", &wide, &[]), Code::KeyTooLongError);
    }

    #[test]
    fn virtual_host_style() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("my.bucket.S3.example.com:9000"));
        let got = parse(
            &Method::GET,
            &"/a/b?x-id=GetObject".parse().unwrap(),
            &headers,
            &addressing(),
        )
        .unwrap();
        assert!(matches!(got, Op::GetObject { ref bucket, ref key, .. } if bucket == "my.bucket" && key == "a/b"));
        let got = parse(&Method::GET, &"/?list-type=2".parse().unwrap(), &headers, &addressing()).unwrap();
        assert!(matches!(got, Op::ListObjects { ref bucket, .. } if bucket == "my.bucket"));
        // The domain itself, and other hosts, are path style.
        headers.insert("host", HeaderValue::from_static("s3.example.com"));
        let got = parse(&Method::GET, &"/b1t/k".parse().unwrap(), &headers, &addressing()).unwrap();
        assert!(matches!(got, Op::GetObject { ref bucket, .. } if bucket == "b1t"));
        headers.insert("host", HeaderValue::from_static("[::1]:9000"));
        assert_eq!(
            parse(&Method::GET, &"/".parse().unwrap(), &headers, &addressing()).unwrap(),
            Op::ListBuckets
        );
        // HTTP/2: the authority instead of Host.
        let got = parse(
            &Method::HEAD,
            &"http://bkt.s3.example.com/".parse().unwrap(),
            &HeaderMap::new(),
            &addressing(),
        );
        assert_eq!(got.unwrap(), Op::HeadBucket { bucket: "bkt".into() });
    }

    #[test]
    fn bucket_names_are_checked() {
        for good in ["abc", "a-b.c1", "1bucket", &"a".repeat(63)] {
            assert!(check_bucket_name(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Abc",
            "a_b",
            "-ab",
            "ab-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "xn--ab",
            "ab-s3alias",
            "a b",
        ] {
            assert_eq!(
                check_bucket_name(bad).unwrap_err().code,
                Code::InvalidBucketName,
                "{bad}"
            );
        }
        assert_eq!(code("GET", "/Bad_Bucket/k", &[]), Code::InvalidBucketName);
    }

    #[test]
    fn bucket_operations() {
        assert_eq!(op("GET", "/"), Op::ListBuckets);
        assert_eq!(op("PUT", "/bkt"), Op::CreateBucket { bucket: "bkt".into() });
        assert_eq!(op("PUT", "/bkt/"), Op::CreateBucket { bucket: "bkt".into() });
        assert_eq!(op("HEAD", "/bkt"), Op::HeadBucket { bucket: "bkt".into() });
        assert_eq!(op("DELETE", "/bkt"), Op::DeleteBucket { bucket: "bkt".into() });
        assert_eq!(
            op("GET", "/bkt?location"),
            Op::GetBucketLocation { bucket: "bkt".into() }
        );
        assert_eq!(op("POST", "/bkt?delete"), Op::DeleteObjects { bucket: "bkt".into() });
        assert!(
            matches!(op("GET", "/bkt?uploads&max-uploads=5"), Op::ListMultipartUploads { params, .. } if params.max_uploads == 5)
        );
        assert_eq!(code("POST", "/bkt", &[]), Code::NotImplemented);
        assert_eq!(code("PATCH", "/bkt", &[]), Code::MethodNotAllowed);
        assert_eq!(code("PUT", "/", &[]), Code::MethodNotAllowed);
        assert_eq!(code("GET", "/?prefix=a", &[]), Code::NotImplemented);
        assert_eq!(
            code("PUT", "/bkt", &[("x-amz-bucket-object-lock-enabled", "true")]),
            Code::NotImplemented
        );
        assert_eq!(
            code("PUT", "/bkt", &[("x-amz-acl", "public-read")]),
            Code::NotImplemented
        );
    }

    #[test]
    fn list_objects_parameters() {
        let Op::ListObjects { params, .. } = op(
            "GET",
            "/bkt?list-type=2&prefix=a%2Fb+c&delimiter=%2F&max-keys=7&continuation-token=dG9r&start-after=x&encoding-type=url&fetch-owner=true",
        ) else {
            panic!()
        };
        assert_eq!(params.prefix, "a/b c");
        assert_eq!(params.delimiter.as_deref(), Some("/"));
        assert_eq!(params.max_keys, 7);
        assert!(params.encoding_url);
        assert_eq!(
            params.version,
            ListVersion::V2 {
                continuation_token: Some("dG9r".into()),
                start_after: Some("x".into()),
                fetch_owner: true
            }
        );
        assert_eq!(params.start_after(), Some("x"));
        let Op::ListObjects { params, .. } = op("GET", "/bkt?marker=m&max-keys=5000&delimiter=") else {
            panic!()
        };
        assert_eq!(params.version, ListVersion::V1 { marker: "m".into() });
        assert_eq!(params.max_keys, 1000);
        assert_eq!(params.delimiter, None);
        assert_eq!(params.start_after(), Some("m"));
        let Op::ListObjects { params, .. } = op("GET", "/bkt?list-type=2&max-keys=0") else {
            panic!()
        };
        assert_eq!(params.max_keys, 0);
        for bad in [
            "max-keys=-1",
            "max-keys=x",
            "max-keys=",
            "encoding-type=base64",
            "continuation-token=",
            "fetch-owner=yes",
        ] {
            assert_eq!(
                code("GET", &format!("/bkt?list-type=2&{bad}"), &[]),
                Code::InvalidArgument,
                "{bad}"
            );
        }
        assert_eq!(code("GET", "/bkt?list-type=3", &[]), Code::InvalidArgument);
    }

    #[test]
    fn object_operations() {
        assert!(matches!(op("PUT", "/bkt/k?x-id=PutObject"), Op::PutObject { .. }));
        assert!(matches!(op("HEAD", "/bkt/k?versionId=null"), Op::HeadObject { .. }));
        assert!(matches!(op("DELETE", "/bkt/k"), Op::DeleteObject { .. }));
        assert!(matches!(op("POST", "/bkt/k?uploads"), Op::CreateMultipartUpload { .. }));
        assert_eq!(
            op("PUT", "/bkt/k?partNumber=10000&uploadId=u%3D1"),
            Op::UploadPart {
                bucket: "bkt".into(),
                key: "k".into(),
                upload_id: "u=1".into(),
                part_number: 10_000
            }
        );
        assert!(matches!(
            op("POST", "/bkt/k?uploadId=u"),
            Op::CompleteMultipartUpload { .. }
        ));
        assert!(matches!(
            op("DELETE", "/bkt/k?uploadId=u"),
            Op::AbortMultipartUpload { .. }
        ));
        assert!(matches!(
            op("GET", "/bkt/k?uploadId=u&max-parts=2&part-number-marker=3"),
            Op::ListParts {
                params: ListPartsParams {
                    max_parts: 2,
                    part_number_marker: 3
                },
                ..
            }
        ));
        let Op::GetObject { response_headers, .. } = op("GET", "/bkt/k?response-content-type=text%2Fplain") else {
            panic!()
        };
        assert_eq!(response_headers, vec![("content-type", "text/plain".to_owned())]);
        for n in ["0", "10001", "-1", "1.5", "", "x"] {
            assert_eq!(
                code("PUT", &format!("/bkt/k?partNumber={n}&uploadId=u"), &[]),
                Code::InvalidArgument,
                "{n}"
            );
        }
        assert_eq!(code("PUT", "/bkt/k?uploadId=u", &[]), Code::InvalidArgument);
        assert_eq!(code("PUT", "/bkt/k?partNumber=1", &[]), Code::InvalidArgument);
        assert_eq!(code("PUT", "/bkt/k?partNumber=1&uploadId=", &[]), Code::NoSuchUpload);
        assert_eq!(
            code("GET", "/bkt/k?uploadId=u&part-number-marker=10001", &[]),
            Code::InvalidArgument
        );
        assert_eq!(code("POST", "/bkt/k", &[]), Code::MethodNotAllowed);
        assert_eq!(code("HEAD", "/bkt/k?uploadId=u", &[]), Code::MethodNotAllowed);
    }

    #[test]
    fn copy_object_names_its_source() {
        let op = |src: &str, extra: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            h.insert("x-amz-copy-source", http::HeaderValue::from_str(src).unwrap());
            for (k, v) in extra {
                h.insert(*k, http::HeaderValue::from_str(v).unwrap());
            }
            parse(&Method::PUT, &"/dst/a/b".parse().unwrap(), &h, &Addressing::default())
        };
        assert_eq!(
            op("/src/dir/step%201/.metadata.tmp", &[]).unwrap(),
            Op::CopyObject {
                bucket: "dst".into(),
                key: "a/b".into(),
                source_bucket: "src".into(),
                source_key: "dir/step 1/.metadata.tmp".into(),
                replace_metadata: false,
            }
        );
        assert!(matches!(
            op("src/k?versionId=null", &[("x-amz-metadata-directive", "REPLACE")]).unwrap(),
            Op::CopyObject { replace_metadata: true, ref source_key, .. } if source_key == "k"
        ));
        assert_eq!(op("/src", &[]).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(op("/src/", &[]).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(
            op("/src/k", &[("x-amz-metadata-directive", "MOVE")]).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(op("/Bad_Bucket/k", &[]).unwrap_err().code, Code::InvalidBucketName);
    }

    #[test]
    fn what_is_not_implemented_says_so() {
        type Case<'a> = (&'a str, &'a str, &'a [(&'static str, &'a str)]);
        let cases: &[Case<'_>] = &[
            ("PUT", "/bkt/k", &[("x-amz-copy-source", "/abc/b?versionId=3")]),
            (
                "PUT",
                "/bkt/k",
                &[
                    ("x-amz-copy-source", "/abc/b"),
                    ("x-amz-copy-source-range", "bytes=0-1"),
                ],
            ),
            (
                "PUT",
                "/bkt/k?partNumber=1&uploadId=u",
                &[("x-amz-copy-source", "/a/b")],
            ),
            ("GET", "/bkt/k?acl", &[]),
            ("PUT", "/bkt/k?tagging", &[]),
            ("GET", "/bkt?versioning", &[]),
            ("GET", "/bkt?versions", &[]),
            ("PUT", "/bkt?policy", &[]),
            ("GET", "/bkt?lifecycle", &[]),
            ("GET", "/bkt?cors", &[]),
            ("POST", "/bkt/k?restore", &[]),
            ("GET", "/bkt/k?partNumber=1", &[]),
            ("GET", "/bkt/k?versionId=3", &[]),
            ("PUT", "/bkt/k", &[("x-amz-server-side-encryption", "AES256")]),
            (
                "GET",
                "/bkt/k",
                &[("x-amz-server-side-encryption-customer-algorithm", "AES256")],
            ),
            ("PUT", "/bkt/k", &[("x-amz-tagging", "a=b")]),
            ("PUT", "/bkt/k", &[("x-amz-storage-class", "GLACIER")]),
            ("PUT", "/bkt/k", &[("x-amz-grant-read", "id=x")]),
            ("POST", "/bkt/k?uploads", &[("x-amz-object-lock-mode", "GOVERNANCE")]),
            ("DELETE", "/bkt/k", &[("if-match", "\"e\"")]),
        ];
        for (method, uri, headers) in cases {
            assert_eq!(
                code(method, uri, headers),
                Code::NotImplemented,
                "{method} {uri} {headers:?}"
            );
        }
        assert!(matches!(
            op_with(
                "PUT",
                "/bkt/k",
                &[("x-amz-acl", "private"), ("x-amz-storage-class", "STANDARD")]
            )
            .unwrap(),
            Op::PutObject { .. }
        ));
    }

    #[test]
    fn errors_name_the_resource() {
        let err = op_with("GET", "/bkt/k?acl", &[]).unwrap_err();
        assert_eq!(err.resource.as_deref(), Some("/bkt/k"));
    }

    #[test]
    fn op_accessors() {
        let o = op("PUT", "/bkt/k?partNumber=1&uploadId=u");
        assert_eq!((o.name(), o.bucket(), o.key()), ("UploadPart", Some("bkt"), Some("k")));
        assert_eq!(op("GET", "/bkt?list-type=2").name(), "ListObjectsV2");
        assert_eq!(op("GET", "/bkt").name(), "ListObjects");
        assert_eq!(Op::ListBuckets.bucket(), None);
    }

    #[test]
    fn subresources_take_their_methods_only() {
        for (method, uri) in [
            ("PUT", "/bkt?delete"),
            ("GET", "/bkt?delete"),
            ("PUT", "/bkt?location"),
            ("DELETE", "/bkt?uploads"),
            ("PUT", "/bkt/k?uploads"),
            ("GET", "/bkt/k?uploads"),
            ("POST", "/bkt/k?delete"),
        ] {
            assert_eq!(code(method, uri, &[]), Code::MethodNotAllowed, "{method} {uri}");
        }
    }

    #[test]
    fn user_metadata_is_collected_and_bounded() {
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-meta-color", HeaderValue::from_static("blue"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(
            user_metadata(&headers).unwrap(),
            vec![("color".to_owned(), "blue".to_owned())]
        );
        headers.insert("x-amz-meta-big", HeaderValue::from_str(&"x".repeat(2042)).unwrap());
        assert_eq!(user_metadata(&headers).unwrap_err().code, Code::MetadataTooLarge);
    }

    #[test]
    fn continuation_tokens_round_trip() {
        for key in ["", "a/b c", "\u{2713}+/="] {
            assert_eq!(decode_continuation_token(&continuation_token(key)).unwrap(), key);
        }
        assert_eq!(decode_continuation_token("!!").unwrap_err().code, Code::InvalidArgument);
        assert_eq!(
            decode_continuation_token(&URL_SAFE_NO_PAD.encode([0xff]))
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
    }
}
