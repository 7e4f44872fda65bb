//! The S3 operations: a request is parsed (`kvtier_s3::request`),
//! authenticated (`kvtier_s3::sigv4`), then served from the [`Store`].

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvtier::{Error, ErrorKind};
use kvtier_s3::request::{self, Addressing, ListVersion, Op};
use kvtier_s3::{BodyChecks, ChunkedDecoder, Code, Conditions, S3Error, Verified, Verifier, xml};

use super::catalog::ObjectMeta;
use super::config::{BucketKind, S3Config};
use super::store::{Bucket, ChunkRead, MAX_PARTS, Part, RequestIds, Store, chunks_in_range, now_ms};

/// The body type of every answer.
pub type Body = BoxBody<Bytes, std::io::Error>;
type Reply = hyper::Response<Body>;

/// Bytes of XML request bodies accepted (CompleteMultipartUpload of
/// 10,000 parts, DeleteObjects of 1,000 keys).
const MAX_XML_BYTES: usize = 2 << 20;
/// Chunks a GET reads ahead of the socket (in flight at once).
const READ_AHEAD: usize = 4;
/// Headers kept with an object and answered on GET and HEAD.
const KEPT_HEADERS: [&str; 5] = [
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
];

/// The S3 front of one daemon.
#[derive(Debug)]
pub struct S3Service {
    store: Arc<Store>,
    keys: HashMap<String, String>,
    addressing: Addressing,
    verifier: Verifier,
    ids: RequestIds,
    metrics: Arc<super::S3Metrics>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// The S3 error for a store failure.
fn s3_err(e: &Error) -> S3Error {
    let code = match e.kind() {
        ErrorKind::TooLarge => Code::EntityTooLarge,
        ErrorKind::Throttled => Code::SlowDown,
        ErrorKind::Unavailable | ErrorKind::NoSpace | ErrorKind::Closed => Code::ServiceUnavailable,
        ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => Code::AccessDenied,
        ErrorKind::InvalidArgument | ErrorKind::BlockSize => Code::InvalidArgument,
        ErrorKind::AlreadyExists => Code::PreconditionFailed,
        _ => Code::InternalError,
    };
    S3Error::new(code, e.message().to_string())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t);
        t == "*" || t.trim_matches('"') == etag
    })
}

fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The checks of a conditional write (`If-None-Match: *`, `If-Match`),
/// run against the object a write would replace, under the catalog lock.
fn write_check(
    h: &HeaderMap,
) -> Result<impl FnOnce(Option<&ObjectMeta>) -> kvtier::Result<()> + Send + 'static, S3Error> {
    let c = Conditions::from_headers(h);
    c.check_write_supported()?;
    Ok(move |cur: Option<&ObjectMeta>| {
        c.check_write(cur.map(|m| m.etag.as_str())).map_err(|e| {
            let kind = if e.code == Code::NoSuchKey {
                ErrorKind::NotFound
            } else {
                ErrorKind::AlreadyExists
            };
            Error::new(kind, e.message)
        })
    })
}

/// The store's answer to a conditional write, as S3 says it.
fn commit_err(e: &Error) -> S3Error {
    match e.kind() {
        ErrorKind::AlreadyExists => S3Error::new(Code::PreconditionFailed, e.message().to_string()),
        ErrorKind::NotFound => S3Error::new(Code::NoSuchKey, e.message().to_string()),
        _ => s3_err(e),
    }
}

/// The object's headers from a write's request: content type, kept
/// representation headers (`Content-Encoding` without `aws-chunked`,
/// which described the upload) and user metadata.
fn template(h: &HeaderMap) -> Result<ObjectMeta, S3Error> {
    let mut user = request::user_metadata(h)?;
    user.sort();
    let mut headers: Vec<(String, String)> = KEPT_HEADERS
        .iter()
        .filter(|n| **n != "content-encoding")
        .filter_map(|n| header(h, n).map(|v| (n.to_string(), v.to_string())))
        .collect();
    if let Some(e) = kvtier_s3::chunked::stored_content_encoding(h) {
        headers.push(("content-encoding".into(), e));
    }
    Ok(ObjectMeta {
        version: String::new(),
        size: 0,
        etag: String::new(),
        modified_ms: 0,
        content_type: header(h, "content-type").map(str::to_string),
        headers,
        user,
        checksums: Vec::new(),
        chunks: Vec::new(),
        parts: Vec::new(),
    })
}

/// A body received as a new version's chunks.
struct Received {
    version: String,
    /// The MD5 (with `Content-MD5`) or [`etag_of`] the chunks.
    etag: String,
    /// Verified checksums: header name, base64.
    sums: Vec<(String, String)>,
    chunks: Vec<super::catalog::ChunkRef>,
    size: u64,
}

/// An ETag (32 hex digits) from the chunks' lengths and xxh3-64s: a
/// function of the bytes, made without another pass over them.
fn etag_of(chunks: &[super::catalog::ChunkRef]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::default();
    for c in chunks {
        h.update(&c.len.to_le_bytes());
        h.update(&c.xxh.to_le_bytes());
    }
    format!("{:032x}", h.digest128())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A request body as the object's bytes: aws-chunked decoded, the payload
/// hash and checksums verified, the length held to what was announced.
struct BodyReader {
    body: Incoming,
    chunked: Option<ChunkedDecoder>,
    checks: BodyChecks,
    expected: u64,
    got: u64,
    out: Vec<Bytes>,
}

impl BodyReader {
    fn new(h: &HeaderMap, body: Incoming, v: Option<&Verified>) -> Result<Self, S3Error> {
        let chunked = ChunkedDecoder::from_request(h, v.map(|v| &v.payload))?;
        let md5 = h.contains_key("content-md5");
        let checks = BodyChecks::from_headers(h)?;
        let checks = if md5 { checks } else { checks.without_md5() };
        let expected = if chunked.is_some() {
            header(h, "x-amz-decoded-content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| S3Error::from_code(Code::MissingContentLength))?
        } else {
            header(h, "content-length")
                .ok_or_else(|| S3Error::from_code(Code::MissingContentLength))?
                .parse::<u64>()
                .map_err(|_| S3Error::new(Code::InvalidArgument, "Content-Length is not a number"))?
        };
        Ok(Self {
            body,
            chunked,
            checks,
            expected,
            got: 0,
            out: Vec::new(),
        })
    }

    /// The object's length as announced.
    fn expected(&self) -> u64 {
        self.expected
    }

    /// The next piece of the object, or `None` at its end.
    async fn next(&mut self) -> Result<Option<Bytes>, S3Error> {
        loop {
            if !self.out.is_empty() {
                let data = self.out.remove(0);
                self.got += data.len() as u64;
                if self.got > self.expected {
                    return Err(S3Error::new(
                        Code::IncompleteBody,
                        format!("the body carries more than the {} bytes announced", self.expected),
                    ));
                }
                self.checks.update(&data);
                return Ok(Some(data));
            }
            let frame = match self.body.frame().await {
                None => return Ok(None),
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    return Err(S3Error::new(
                        Code::IncompleteBody,
                        format!("the request body ended early: {e}"),
                    ));
                }
            };
            let Ok(raw) = frame.into_data() else { continue };
            match &mut self.chunked {
                Some(d) => d.feed_bytes(&raw, &mut self.out)?,
                None => self.out.push(raw),
            }
            self.out.retain(|b| !b.is_empty());
        }
    }

    /// Checks the end: length, payload hash, trailers and checksums.
    /// Answers the MD5 ETag (empty without `Content-MD5`) and the verified
    /// checksums (header name, base64).
    fn finish(self) -> Result<(String, Vec<(String, String)>), S3Error> {
        if self.got != self.expected {
            return Err(S3Error::new(
                Code::IncompleteBody,
                format!(
                    "the body ended after {} of the {} bytes announced",
                    self.got, self.expected
                ),
            ));
        }
        let trailers = match self.chunked {
            Some(d) => Some(d.finish()?),
            None => None,
        };
        let digests = self.checks.finish(trailers.as_ref())?;
        // Without Content-MD5 the ETag comes from the chunks' hashes
        // (`etag_of`): MD5 is the slowest hash here, and S3 ETags are opaque.
        let etag = digests.etag().unwrap_or_default();
        let sums = digests
            .checksum
            .map(|c| vec![(c.algorithm.header_name().to_string(), c.to_base64())])
            .unwrap_or_default();
        Ok((etag, sums))
    }
}

impl S3Service {
    /// The service over `store`.
    pub fn new(store: Arc<Store>, cfg: &S3Config, metrics: Arc<super::S3Metrics>) -> Result<Self, String> {
        let keys = cfg
            .load_credentials()?
            .into_iter()
            .map(|c| (c.access_key_id, c.secret_access_key))
            .collect();
        Ok(Self {
            store,
            keys,
            addressing: Addressing {
                domains: cfg.domains.clone(),
            },
            verifier: Verifier {
                max_skew: Duration::from_secs(cfg.max_clock_skew_s),
            },
            ids: RequestIds::default(),
            metrics,
        })
    }

    /// Answers one request; never fails (errors are S3 error bodies).
    pub async fn handle(&self, req: hyper::Request<Incoming>) -> Reply {
        let id = self.ids.next();
        let head_request = req.method() == Method::HEAD;
        let path = req.uri().path().to_string();
        // A request that carries a body the answer may not have read.
        let has_body = req.headers().contains_key(http::header::TRANSFER_ENCODING)
            || header(req.headers(), "content-length").is_some_and(|v| v.trim() != "0");
        let op =
            request::parse(req.method(), req.uri(), req.headers(), &self.addressing).map_or("Invalid", |o| o.name());
        let mut reply = match self.serve(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(request_id = %id, code = e.code.as_str(), "S3: {}", e.message);
                let e = if e.resource.is_none() { e.with_resource(path) } else { e };
                let mut r = hyper::Response::new(if head_request || !e.has_body() {
                    empty()
                } else {
                    full(e.to_xml(&id))
                });
                *r.status_mut() = e.status();
                if e.has_body() && !head_request {
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/xml"));
                }
                if e.code == Code::InvalidRange
                    && let Some(size) = e.detail("ActualObjectSize")
                    && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
                {
                    r.headers_mut().insert("content-range", v);
                }
                // An error may be answered before the body was read (a
                // failed condition, a bad signature). hyper then closes the
                // connection after the answer; saying so keeps a client
                // from sending its next request on a closing connection
                // (a reset, which a client without retries reports as a
                // failure).
                if has_body {
                    r.headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
        };
        self.metrics.answered(op, reply.status().as_u16());
        let h = reply.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("x-amz-request-id", v.clone());
            h.insert("x-amz-id-2", v);
        }
        h.insert("server", HeaderValue::from_static("kvtier"));
        reply
    }

    fn bucket(&self, name: &str) -> Result<Arc<Bucket>, S3Error> {
        self.store.bucket(name).ok_or_else(|| {
            S3Error::new(Code::NoSuchBucket, "The specified bucket does not exist").with_detail("BucketName", name)
        })
    }

    async fn serve(&self, req: hyper::Request<Incoming>) -> Result<Reply, S3Error> {
        let (parts, body) = req.into_parts();
        let op = request::parse_parts(&parts, &self.addressing)?;
        let keys = |k: &str| self.keys.get(k).cloned();
        let verified = self.verifier.verify_parts(&parts, &keys, SystemTime::now())?;
        if verified.is_none() {
            // Unsigned: only a bucket open to anonymous access.
            let open = op
                .bucket()
                .and_then(|b| self.store.bucket(b))
                .is_some_and(|b| b.anonymous);
            if !open {
                return Err(S3Error::new(
                    Code::AccessDenied,
                    "Access Denied: the request is not signed",
                ));
            }
        }
        let h = &parts.headers;
        match op {
            Op::ListBuckets => self.list_buckets(),
            Op::GetBucketLocation { bucket } => {
                self.bucket(&bucket)?;
                Ok(xml_reply(StatusCode::OK, xml::location_constraint("us-east-1")))
            }
            Op::CreateBucket { bucket } => self.create_bucket(&bucket, &parts, body).await,
            Op::HeadBucket { bucket } => {
                self.bucket(&bucket)?;
                Ok(status_only(StatusCode::OK))
            }
            Op::ListObjects { bucket, params } => {
                let b = self.bucket(&bucket)?;
                self.list_objects(&b, &params)
            }
            Op::PutObject { bucket, key } => self.put_object(&self.bucket(&bucket)?, &key, h, body, verified).await,
            Op::GetObject {
                bucket,
                key,
                response_headers,
            } => {
                self.get_object(&self.bucket(&bucket)?, &key, h, &response_headers, false)
                    .await
            }
            Op::HeadObject {
                bucket,
                key,
                response_headers,
            } => {
                self.get_object(&self.bucket(&bucket)?, &key, h, &response_headers, true)
                    .await
            }
            Op::CopyObject {
                bucket,
                key,
                source_bucket,
                source_key,
                replace_metadata,
            } => {
                let (dst, src) = (self.bucket(&bucket)?, self.bucket(&source_bucket)?);
                if verified.is_none() && !src.anonymous {
                    return Err(S3Error::new(
                        Code::AccessDenied,
                        "Access Denied: the request is not signed",
                    ));
                }
                self.copy_object(&dst, &key, &src, &source_key, replace_metadata, h)
                    .await
            }
            Op::DeleteObject { bucket, key } => self.delete_object(&self.bucket(&bucket)?, &key, h).await,
            Op::DeleteObjects { bucket } => self.delete_objects(&self.bucket(&bucket)?, h, body, verified).await,
            Op::CreateMultipartUpload { bucket, key } => {
                let b = self.bucket(&bucket)?;
                let t = template(h)?;
                let alg = header(h, "x-amz-checksum-algorithm").map(|a| a.to_ascii_uppercase());
                let id = self
                    .store
                    .create_upload(&b, &key, t, alg)
                    .await
                    .map_err(|e| s3_err(&e))?;
                Ok(xml_reply(
                    StatusCode::OK,
                    xml::initiate_multipart_upload(&bucket, &key, &id),
                ))
            }
            Op::UploadPart {
                bucket,
                key,
                upload_id,
                part_number,
            } => {
                self.upload_part(&self.bucket(&bucket)?, &key, &upload_id, part_number, h, body, verified)
                    .await
            }
            Op::CompleteMultipartUpload { bucket, key, upload_id } => {
                self.complete(&self.bucket(&bucket)?, &key, &upload_id, &parts, body, verified)
                    .await
            }
            Op::AbortMultipartUpload { bucket, key, upload_id } => {
                let b = self.bucket(&bucket)?;
                self.store
                    .upload(&b, &upload_id, &key)
                    .map_err(|_| no_upload(&upload_id))?;
                self.store
                    .abort_upload(&b, &upload_id)
                    .await
                    .map_err(|_| no_upload(&upload_id))?;
                Ok(status_only(StatusCode::NO_CONTENT))
            }
            Op::ListParts {
                bucket,
                key,
                upload_id,
                params,
            } => {
                let b = self.bucket(&bucket)?;
                self.list_parts(&b, &key, &upload_id, &params)
            }
            Op::ListMultipartUploads { bucket, params } => {
                let b = self.bucket(&bucket)?;
                self.list_uploads(&b, &params)
            }
            other => Err(S3Error::new(
                Code::NotImplemented,
                format!("{} is not implemented by kvtier", other.name()),
            )),
        }
    }

    fn owner(&self) -> xml::Owner {
        xml::Owner {
            id: "kvtier".into(),
            display_name: "kvtier".into(),
        }
    }

    fn list_buckets(&self) -> Result<Reply, S3Error> {
        let buckets: Vec<xml::BucketEntry> = self
            .store
            .buckets()
            .iter()
            .map(|b| xml::BucketEntry {
                name: b.name.clone(),
                creation_date: system_time(b.created_ms),
            })
            .collect();
        Ok(xml_reply(StatusCode::OK, xml::list_buckets(&self.owner(), &buckets)))
    }

    async fn create_bucket(&self, name: &str, parts: &http::request::Parts, body: Incoming) -> Result<Reply, S3Error> {
        // The optional CreateBucketConfiguration is read and checked, its
        // location ignored (kvtier has one).
        let text = read_small(body, MAX_XML_BYTES).await?;
        xml::parse_create_bucket_configuration(&text)?;
        let _ = parts;
        match self.store.create_bucket(name).await {
            Ok((_, true)) => {
                let mut r = status_only(StatusCode::OK);
                if let Ok(v) = HeaderValue::from_str(&format!("/{name}")) {
                    r.headers_mut().insert("location", v);
                }
                Ok(r)
            }
            Ok((_, false)) => Err(S3Error::new(
                Code::BucketAlreadyOwnedByYou,
                "Your previous request to create the named bucket succeeded and you already own it.",
            )),
            Err(e) if e.kind() == ErrorKind::InvalidArgument => {
                Err(S3Error::new(Code::InvalidBucketName, e.message().to_string()))
            }
            Err(e) => Err(s3_err(&e)),
        }
    }

    fn list_objects(&self, b: &Bucket, p: &request::ListObjectsParams) -> Result<Reply, S3Error> {
        let after = match &p.version {
            ListVersion::V2 {
                continuation_token: Some(t),
                ..
            } => Some(request::decode_continuation_token(t)?),
            _ => p.start_after().map(str::to_string),
        };
        let max_keys = p.max_keys as usize;
        let mut page = xml::ListPage::default();
        let mut cursor = after;
        let mut count = 0usize;
        let mut last_emitted: Option<String> = None;
        'outer: loop {
            let (batch, more) = b.list(&p.prefix, cursor.as_deref(), 1000);
            if batch.is_empty() {
                break;
            }
            for (name, meta) in batch {
                cursor = Some(name.clone());
                let rest = &name[p.prefix.len()..];
                if let Some(d) = p.delimiter.as_deref().filter(|d| !d.is_empty())
                    && let Some(i) = rest.find(d)
                {
                    let cp = format!("{}{}", p.prefix, &rest[..i + d.len()]);
                    if count == max_keys {
                        page.is_truncated = true;
                        break 'outer;
                    }
                    count += 1;
                    // Skip every other name under this prefix.
                    cursor = Some(format!("{cp}\u{10FFFF}"));
                    last_emitted = cursor.clone();
                    page.common_prefixes.push(cp);
                    continue 'outer;
                }
                if count == max_keys {
                    page.is_truncated = true;
                    break 'outer;
                }
                count += 1;
                last_emitted = Some(name.clone());
                page.objects.push(xml::ObjectEntry {
                    key: name,
                    last_modified: system_time(meta.modified_ms),
                    etag: meta.etag,
                    size_bytes: meta.size,
                });
            }
            if !more {
                break;
            }
        }
        if page.is_truncated {
            page.next = last_emitted.map(|k| match p.version {
                ListVersion::V1 { .. } => k.trim_end_matches('\u{10FFFF}').to_string(),
                ListVersion::V2 { .. } => request::continuation_token(&k),
            });
        }
        Ok(xml_reply(
            StatusCode::OK,
            xml::list_objects(&b.name, p, &page, &self.owner()),
        ))
    }

    /// Receives a request body as a new version of `b`'s object (or part):
    /// its chunks stored, its checksums verified. On any failure what was
    /// stored goes again.
    async fn receive(
        &self,
        b: &Arc<Bucket>,
        h: &HeaderMap,
        body: Incoming,
        v: Option<&Verified>,
    ) -> Result<Received, S3Error> {
        let mut r = BodyReader::new(h, body, v)?;
        Self::check_size(b, r.expected())?;
        let mut w = self.store.writer(b, Some(r.expected()));
        let stored = async {
            while let Some(d) = r.next().await? {
                self.metrics
                    .received_bytes
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                w.write(&d).await.map_err(|e| s3_err(&e))?;
            }
            let (etag, sums) = r.finish()?;
            let (chunks, size) = w.finish().await.map_err(|e| s3_err(&e))?;
            Ok::<_, S3Error>((etag, sums, chunks, size))
        }
        .await;
        match stored {
            Ok((etag, sums, chunks, size)) => Ok(Received {
                version: w.version(),
                etag: if etag.is_empty() { etag_of(&chunks) } else { etag },
                sums,
                chunks,
                size,
            }),
            Err(e) => {
                w.abort().await;
                Err(e)
            }
        }
    }

    fn check_size(b: &Bucket, size: u64) -> Result<(), S3Error> {
        if size > b.max_object_bytes {
            let what = match b.kind {
                BucketKind::Blocks => "an object of a blocks bucket",
                BucketKind::Objects => "an object",
            };
            return Err(S3Error::new(
                Code::EntityTooLarge,
                format!("{what} holds at most {} bytes; this one has {size}", b.max_object_bytes),
            )
            .with_detail("MaxSizeAllowed", b.max_object_bytes.to_string()));
        }
        Ok(())
    }

    async fn put_object(
        &self,
        b: &Arc<Bucket>,
        key: &str,
        h: &HeaderMap,
        body: Incoming,
        v: Option<Verified>,
    ) -> Result<Reply, S3Error> {
        if h.contains_key("x-amz-copy-source") {
            return Err(S3Error::new(
                Code::NotImplemented,
                "CopyObject is not implemented by kvtier",
            ));
        }
        let check = write_check(h)?;
        // Fail before the upload when the condition already fails (in a
        // cluster, against the record other members published too).
        let conditional = h.contains_key("if-none-match") || h.contains_key("if-match");
        let cur = if conditional {
            self.store.find(b, key).await.map_err(|e| s3_err(&e))?
        } else {
            None
        };
        if header(h, "if-none-match").is_some() && cur.is_some() {
            return Err(S3Error::new(
                Code::PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold",
            )
            .with_detail("Condition", "If-None-Match"));
        }
        if let Some(m) = header(h, "if-match") {
            match &cur {
                None => return Err(S3Error::new(Code::NoSuchKey, "The specified key does not exist.")),
                Some(c) if !etag_matches(m, &c.etag) => {
                    return Err(S3Error::new(
                        Code::PreconditionFailed,
                        "At least one of the pre-conditions you specified did not hold",
                    )
                    .with_detail("Condition", "If-Match"));
                }
                Some(_) => {}
            }
        }
        let mut meta = template(h)?;
        let Received {
            version,
            etag,
            sums,
            chunks,
            size,
        } = self.receive(b, h, body, v.as_ref()).await?;
        meta.version = version;
        meta.size = size;
        meta.etag = etag.clone();
        meta.modified_ms = now_ms();
        meta.checksums = sums.clone();
        meta.chunks = chunks;
        self.store
            .commit(b, key, meta, check)
            .await
            .map_err(|e| commit_err(&e))?;
        let mut reply = status_only(StatusCode::OK);
        let rh = reply.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&xml::quote_etag(&etag)) {
            rh.insert("etag", v);
        }
        for (n, val) in sums {
            if let (Ok(n), Ok(val)) = (http::HeaderName::try_from(n), HeaderValue::from_str(&val)) {
                rh.insert(n, val);
            }
        }
        Ok(reply)
    }

    /// A copy of a whole object: its bytes read chunk by chunk (checked)
    /// into a new version of the destination, committed like a PUT.
    async fn copy_object(
        &self,
        dst: &Arc<Bucket>,
        key: &str,
        src: &Arc<Bucket>,
        src_key: &str,
        replace_metadata: bool,
        h: &HeaderMap,
    ) -> Result<Reply, S3Error> {
        let check = write_check(h)?;
        let no_key = || S3Error::new(Code::NoSuchKey, "The specified key does not exist.").with_detail("Key", src_key);
        let Some(source) = self.store.find(src, src_key).await.map_err(|e| s3_err(&e))? else {
            return Err(no_key());
        };
        Self::check_size(dst, source.size)?;
        let mut meta = if replace_metadata {
            template(h)?
        } else {
            let mut m = source.clone();
            m.parts.clear();
            m
        };
        let mut w = self.store.writer(dst, Some(source.size));
        for c in &source.chunks {
            let d = match self.store.read_chunk(src, c).await {
                Ok(ChunkRead::Data(d)) => d,
                Ok(ChunkRead::Missing) => {
                    w.abort().await;
                    self.store.forget(src, src_key, &source.version).await;
                    return Err(no_key());
                }
                Err(e) => {
                    w.abort().await;
                    return Err(s3_err(&e));
                }
            };
            if let Err(e) = w.write(&d).await {
                w.abort().await;
                return Err(s3_err(&e));
            }
        }
        let (chunks, size) = match w.finish().await {
            Ok(x) => x,
            Err(e) => {
                w.abort().await;
                return Err(s3_err(&e));
            }
        };
        meta.version = w.version();
        meta.size = size;
        // The source's ETag when it is a plain one (same bytes, same tag);
        // a multipart source's copy is one part: a fresh tag.
        meta.etag = if source.etag.contains('-') {
            etag_of(&chunks)
        } else {
            source.etag.clone()
        };
        // The bytes are the source's: so are their checksums, unless the
        // source's were per part (a multipart object's composite).
        meta.checksums = if source.parts.is_empty() {
            source.checksums.clone()
        } else {
            Vec::new()
        };
        meta.modified_ms = now_ms();
        meta.chunks = chunks;
        let (etag, at) = (meta.etag.clone(), meta.modified_ms);
        self.store
            .commit(dst, key, meta, check)
            .await
            .map_err(|e| commit_err(&e))?;
        Ok(xml_reply(
            StatusCode::OK,
            xml::copy_object_result(&etag, system_time(at)),
        ))
    }

    async fn get_object(
        &self,
        b: &Arc<Bucket>,
        key: &str,
        h: &HeaderMap,
        overrides: &[(&'static str, String)],
        head: bool,
    ) -> Result<Reply, S3Error> {
        let no_key = || S3Error::new(Code::NoSuchKey, "The specified key does not exist.").with_detail("Key", key);
        let Some(meta) = self.store.find(b, key).await.map_err(|e| s3_err(&e))? else {
            return Err(no_key());
        };
        Conditions::from_headers(h).check_read(&meta.etag, system_time(meta.modified_ms))?;
        let range = request::parse_range(header(h, "range"), meta.size)?;
        let (start, end) = range.unwrap_or((0, meta.size.saturating_sub(1)));
        let len = if meta.size == 0 { 0 } else { end - start + 1 };
        // HEAD of a cache bucket checks the blocks are still held; a GET
        // finds out from its first chunk.
        if head && !self.store.present(b, &meta).await.map_err(|e| s3_err(&e))? {
            self.store.forget(b, key, &meta.version).await;
            return Err(no_key());
        }
        let mut reply = hyper::Response::new(empty());
        *reply.status_mut() = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let rh = reply.headers_mut();
        let mut set = |n: &str, v: &str| {
            if let (Ok(n), Ok(v)) = (http::HeaderName::try_from(n), HeaderValue::from_str(v)) {
                rh.insert(n, v);
            }
        };
        set("content-length", &len.to_string());
        set("etag", &xml::quote_etag(&meta.etag));
        set(
            "last-modified",
            &kvtier_s3::time::http_date(system_time(meta.modified_ms)),
        );
        set("accept-ranges", "bytes");
        set(
            "content-type",
            meta.content_type.as_deref().unwrap_or("binary/octet-stream"),
        );
        for (n, v) in &meta.headers {
            set(n, v);
        }
        for (n, v) in &meta.user {
            set(&format!("x-amz-meta-{n}"), v);
        }
        if range.is_some() {
            set("content-range", &format!("bytes {start}-{end}/{}", meta.size));
        }
        if !meta.parts.is_empty() {
            set("x-amz-mp-parts-count", &meta.parts.len().to_string());
        }
        for (n, v) in overrides {
            set(n, v);
        }
        if header(h, "x-amz-checksum-mode").is_some_and(|m| m.eq_ignore_ascii_case("enabled")) && range.is_none() {
            for (n, v) in &meta.checksums {
                set(n, v);
            }
        }
        if head || len == 0 {
            return Ok(reply);
        }
        self.metrics
            .sent_bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        let pieces = chunks_in_range(&meta, start, end);
        // The first chunk is read before answering: a block evicted from a
        // cache bucket is then a clean 404.
        let first = match self.store.read_chunk(b, &pieces[0].0).await.map_err(|e| s3_err(&e))? {
            ChunkRead::Data(d) => d,
            ChunkRead::Missing => {
                self.store.forget(b, key, &meta.version).await;
                return Err(no_key());
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(READ_AHEAD);
        let (store, bucket) = (self.store.clone(), b.clone());
        let name = key.to_string();
        tokio::spawn(async move {
            let (_, a, z) = &pieces[0];
            if tx.send(Ok(Frame::data(first.slice(*a..*z)))).await.is_err() {
                return;
            }
            // Up to READ_AHEAD chunk reads in flight, sent in order.
            let mut reads = std::collections::VecDeque::new();
            let mut next = pieces.iter().skip(1);
            loop {
                while reads.len() < READ_AHEAD {
                    let Some((c, a, z)) = next.next() else { break };
                    let (st, b, c) = (store.clone(), bucket.clone(), c.clone());
                    let read = tokio::spawn(async move { st.read_chunk(&b, &c).await.map(|r| (r, c)) });
                    reads.push_back((read, *a, *z));
                }
                let Some((read, a, z)) = reads.pop_front() else { break };
                let item = match read.await {
                    Ok(Ok((ChunkRead::Data(d), _))) => Ok(Frame::data(d.slice(a..z))),
                    Ok(Ok((ChunkRead::Missing, c))) => {
                        tracing::warn!(bucket = %bucket.name, key = %name, chunk = %c.key, "S3 GET: a chunk is gone mid-object: the connection is cut");
                        Err(std::io::Error::other("a chunk of the object is gone"))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(bucket = %bucket.name, key = %name, "S3 GET: {e}: the connection is cut");
                        Err(std::io::Error::other(e.to_string()))
                    }
                    Err(e) => Err(std::io::Error::other(format!("read task: {e}"))),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    for (r, _, _) in reads {
                        r.abort();
                    }
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        *reply.body_mut() = StreamBody::new(stream).boxed();
        Ok(reply)
    }

    async fn delete_object(&self, b: &Arc<Bucket>, key: &str, h: &HeaderMap) -> Result<Reply, S3Error> {
        let if_match = header(h, "if-match").map(str::to_string);
        let r = self
            .store
            .delete(b, key, move |cur| match &if_match {
                Some(m) if !etag_matches(m, &cur.etag) => Err(Error::new(
                    ErrorKind::AlreadyExists,
                    "At least one of the pre-conditions you specified did not hold (If-Match)",
                )),
                _ => Ok(()),
            })
            .await;
        match r {
            Ok(_) => Ok(status_only(StatusCode::NO_CONTENT)),
            Err(e) => Err(commit_err(&e)),
        }
    }

    async fn delete_objects(
        &self,
        b: &Arc<Bucket>,
        h: &HeaderMap,
        body: Incoming,
        v: Option<Verified>,
    ) -> Result<Reply, S3Error> {
        let text = read_body_checked(h, body, v.as_ref(), MAX_XML_BYTES).await?;
        let req = xml::parse_delete(&text)?;
        let mut out = xml::DeleteResult::default();
        for k in req.keys {
            if k.len() > request::MAX_KEY_BYTES {
                out.errors.push(xml::DeleteError {
                    key: k,
                    code: Code::KeyTooLongError,
                    message: "Your key is too long".into(),
                });
                continue;
            }
            match self.store.delete(b, &k, |_| Ok(())).await {
                Ok(_) => out.deleted.push(k),
                Err(e) => {
                    let e = s3_err(&e);
                    out.errors.push(xml::DeleteError {
                        key: k,
                        code: e.code,
                        message: e.message,
                    });
                }
            }
        }
        Ok(xml_reply(StatusCode::OK, xml::delete_result(&out, req.quiet)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_part(
        &self,
        b: &Arc<Bucket>,
        key: &str,
        upload_id: &str,
        number: u32,
        h: &HeaderMap,
        body: Incoming,
        v: Option<Verified>,
    ) -> Result<Reply, S3Error> {
        if h.contains_key("x-amz-copy-source") {
            return Err(S3Error::new(
                Code::NotImplemented,
                "UploadPartCopy is not implemented by kvtier",
            ));
        }
        if !(1..=MAX_PARTS).contains(&number) {
            return Err(S3Error::new(
                Code::InvalidArgument,
                format!("Part number must be an integer between 1 and {MAX_PARTS}, inclusive"),
            ));
        }
        self.store.upload(b, upload_id, key).map_err(|_| no_upload(upload_id))?;
        let Received {
            etag,
            sums,
            chunks,
            size,
            ..
        } = self.receive(b, h, body, v.as_ref()).await?;
        let part = Part {
            etag: etag.clone(),
            size,
            modified_ms: now_ms(),
            checksums: sums.clone(),
            chunks,
        };
        self.store
            .add_part(b, upload_id, key, number, part)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => no_upload(upload_id),
                _ => s3_err(&e),
            })?;
        let mut reply = status_only(StatusCode::OK);
        let rh = reply.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&xml::quote_etag(&etag)) {
            rh.insert("etag", v);
        }
        for (n, val) in sums {
            if let (Ok(n), Ok(val)) = (http::HeaderName::try_from(n), HeaderValue::from_str(&val)) {
                rh.insert(n, val);
            }
        }
        Ok(reply)
    }

    async fn complete(
        &self,
        b: &Arc<Bucket>,
        key: &str,
        upload_id: &str,
        parts: &http::request::Parts,
        body: Incoming,
        v: Option<Verified>,
    ) -> Result<Reply, S3Error> {
        let h = &parts.headers;
        let check = write_check(h)?;
        self.store.upload(b, upload_id, key).map_err(|_| no_upload(upload_id))?;
        let text = read_body_checked(h, body, v.as_ref(), MAX_XML_BYTES).await?;
        let listed = xml::parse_complete_multipart_upload(&text)?;
        let chosen: Vec<(u32, String)> = listed
            .iter()
            .map(|p| (p.part_number, p.etag.trim_matches('"').to_string()))
            .collect();
        let r = self
            .store
            .complete_upload(
                b,
                upload_id,
                key,
                &chosen,
                |u, ps| {
                    let mut m = u.template.clone();
                    m.version = format!("{}-mp", u.id);
                    m.etag = multipart_etag(ps.iter().map(|p| p.etag.as_str()));
                    m.modified_ms = now_ms();
                    Ok(m)
                },
                check,
            )
            .await;
        let meta = match r {
            Ok(m) => m,
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::NotFound if e.message().starts_with("part ") => {
                        S3Error::new(Code::InvalidPart, e.message().to_string())
                    }
                    ErrorKind::NotFound if e.message().starts_with("no upload") => no_upload(upload_id),
                    ErrorKind::TooLarge if e.message().starts_with("part ") => {
                        S3Error::new(Code::EntityTooSmall, e.message().to_string())
                    }
                    _ => commit_err(&e),
                });
            }
        };
        let result = xml::CompleteResult {
            location: format!("/{}/{}", b.name, key),
            bucket: b.name.clone(),
            key: key.to_string(),
            etag: meta.etag.clone(),
            checksum: None,
        };
        Ok(xml_reply(StatusCode::OK, xml::complete_multipart_upload(&result)))
    }

    fn list_parts(
        &self,
        b: &Bucket,
        key: &str,
        upload_id: &str,
        p: &request::ListPartsParams,
    ) -> Result<Reply, S3Error> {
        let u = self.store.upload(b, upload_id, key).map_err(|_| no_upload(upload_id))?;
        let mut page = xml::ListPartsPage::default();
        for (n, part) in u.parts.range(p.part_number_marker + 1..) {
            if page.parts.len() == p.max_parts as usize {
                page.is_truncated = true;
                break;
            }
            page.parts.push(xml::PartEntry {
                part_number: *n,
                last_modified: system_time(part.modified_ms),
                etag: part.etag.clone(),
                size_bytes: part.size,
                checksum: None,
            });
        }
        Ok(xml_reply(
            StatusCode::OK,
            xml::list_parts(&b.name, key, upload_id, p, &page, &self.owner()),
        ))
    }

    fn list_uploads(&self, b: &Bucket, p: &request::ListUploadsParams) -> Result<Reply, S3Error> {
        let mut page = xml::ListUploadsPage::default();
        for u in self.store.uploads(b) {
            if !u.key.starts_with(&p.prefix)
                || (u.key.as_str(), u.id.as_str()) <= (p.key_marker.as_str(), p.upload_id_marker.as_str())
                    && !p.key_marker.is_empty()
            {
                continue;
            }
            if page.uploads.len() == p.max_uploads as usize {
                page.is_truncated = true;
                break;
            }
            page.uploads.push(xml::UploadEntry {
                key: u.key.clone(),
                upload_id: u.id.clone(),
                initiated: system_time(u.created_ms),
            });
        }
        Ok(xml_reply(
            StatusCode::OK,
            xml::list_multipart_uploads(&b.name, p, &page, &self.owner()),
        ))
    }
}

/// S3's multipart ETag: the MD5 of the parts' binary ETags, then `-N`.
fn multipart_etag<'a>(etags: impl Iterator<Item = &'a str>) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    let mut n = 0;
    for e in etags {
        n += 1;
        let raw: Vec<u8> = (0..e.len() / 2)
            .filter_map(|i| u8::from_str_radix(&e[2 * i..2 * i + 2], 16).ok())
            .collect();
        h.update(&raw);
    }
    format!("{}-{n}", hex(&h.finalize()))
}

fn no_upload(id: &str) -> S3Error {
    S3Error::new(
        Code::NoSuchUpload,
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
    )
    .with_detail("UploadId", id)
}

fn status_only(s: StatusCode) -> Reply {
    let mut r = hyper::Response::new(empty());
    *r.status_mut() = s;
    r
}

fn xml_reply(s: StatusCode, body: String) -> Reply {
    let mut r = hyper::Response::new(full(body));
    *r.status_mut() = s;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/xml"));
    r
}

/// A small body (XML), at most `max` bytes.
async fn read_small(mut body: Incoming, max: usize) -> Result<Vec<u8>, S3Error> {
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| S3Error::new(Code::IncompleteBody, format!("the request body ended early: {e}")))?;
        if let Ok(d) = f.into_data() {
            if out.len() + d.len() > max {
                return Err(S3Error::new(
                    Code::MaxMessageLengthExceeded,
                    format!("the request body exceeds {max} bytes"),
                ));
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

/// A small body with the same checks as an object's (length, payload
/// hash, Content-MD5, checksums).
async fn read_body_checked(
    h: &HeaderMap,
    body: Incoming,
    v: Option<&Verified>,
    max: usize,
) -> Result<Vec<u8>, S3Error> {
    let mut r = BodyReader::new(h, body, v)?;
    if r.expected() > max as u64 {
        return Err(S3Error::new(
            Code::MaxMessageLengthExceeded,
            format!("the request body of {} bytes exceeds {max}", r.expected()),
        ));
    }
    let mut out = Vec::new();
    while let Some(d) = r.next().await? {
        out.extend_from_slice(&d);
    }
    r.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_lists_match_quoted_weak_and_star() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("\"x\", \"abc\"", "abc"));
        assert!(etag_matches("W/\"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }

    #[test]
    fn the_multipart_etag_is_the_md5_of_the_part_digests() {
        // Two parts whose MD5s are those of "a" and "b".
        let a = "0cc175b9c0f1b6a831c399e269772661";
        let b = "92eb5ffee6ae2fec3ad71c777531578f";
        let e = multipart_etag([a, b].into_iter());
        assert!(e.ends_with("-2"), "{e}");
        assert_eq!(e.len(), 34);
        assert_ne!(e, multipart_etag([b, a].into_iter()), "order matters");
    }
}
