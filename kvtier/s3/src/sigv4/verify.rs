//! The server's side: checks a request's SigV4 signature, from the
//! `Authorization` header or from a presigned URL's query, and says what the
//! body must then be checked against ([`Payload`]).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Uri};

use super::{
    ALGORITHM, CanonicalInput, ChunkSigner, SERVICE, STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER,
    STREAMING_UNSIGNED_PAYLOAD_TRAILER, TERMINATOR, UNSIGNED_PAYLOAD, canonical_header_value, canonical_query,
    canonical_uri, canonicalize, ct_eq, hex, hmac_sha256, is_signature, parse_hex32, percent_decode, scope,
    signing_key,
};
use crate::error::{Code, S3Error};
use crate::time::{amz_datetime, iso8601_ms, parse_amz_datetime, parse_http_date, unix_secs};

/// Where the verifier finds secret keys. Any `Fn(&str) -> Option<String>`
/// is one.
pub trait Credentials {
    /// The secret key of `access_key`, `None` if there is no such key.
    fn secret_key(&self, access_key: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Credentials for F {
    fn secret_key(&self, access_key: &str) -> Option<String> {
        self(access_key)
    }
}

/// How the request's body is bound to its signature.
#[derive(Debug, Clone)]
pub enum Payload {
    /// `x-amz-content-sha256` was this hash: the body must hash to it
    /// ([`crate::checksum::BodyChecks`] checks it, else
    /// `XAmzContentSHA256Mismatch`).
    Sha256([u8; 32]),
    /// `UNSIGNED-PAYLOAD`, and every presigned URL without a hash.
    Unsigned,
    /// `STREAMING-AWS4-HMAC-SHA256-PAYLOAD`: aws-chunked, each chunk signed
    /// in a chain from the request's signature.
    Streaming(ChunkSigner),
    /// `STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER`: as `Streaming`, and the
    /// trailers are signed too.
    StreamingTrailer(ChunkSigner),
    /// `STREAMING-UNSIGNED-PAYLOAD-TRAILER`: aws-chunked, unsigned chunks,
    /// trailers (checksums) unsigned.
    StreamingUnsignedTrailer,
}

/// A request whose signature holds.
#[derive(Debug, Clone)]
pub struct Verified {
    pub access_key: String,
    /// The region of the credential scope, as the client gave it.
    pub region: String,
    /// The time the request was signed at.
    pub signed_at: SystemTime,
    pub presigned: bool,
    pub payload: Payload,
}

/// Checks SigV4 signatures.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// How far a request's time may be from the server's
    /// (`RequestTimeTooSkewed` beyond); also how far ahead of the server a
    /// presigned URL may be dated.
    pub max_skew: Duration,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            max_skew: Duration::from_secs(15 * 60),
        }
    }
}

/// The longest a presigned URL may live, as in S3: seven days.
pub const MAX_PRESIGNED_EXPIRES_SECS: u64 = 604_800;

const PRESIGN_PARAMS: [&str; 6] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
];

struct Scope<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
}

/// The parts that differ between the two forms.
struct Claim<'a> {
    scope: Scope<'a>,
    signed_headers: &'a str,
    signature: &'a str,
    datetime: String,
    signed_at: SystemTime,
    payload_hash: String,
    skip_query: Option<&'static str>,
    presigned: bool,
}

impl Verifier {
    /// Verifies the request head. `Ok(None)` when the request carries no
    /// authentication at all: whether anonymous access is allowed is the
    /// server's decision.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        credentials: &dyn Credentials,
        now: SystemTime,
    ) -> Result<Option<Verified>, S3Error> {
        let query = uri.query().unwrap_or("");
        let params = query_params(query);
        let presigned = params.iter().any(|(n, _)| n == "X-Amz-Algorithm");
        let sigv2_query =
            params.iter().any(|(n, _)| n == "AWSAccessKeyId") && params.iter().any(|(n, _)| n == "Signature");
        let authorization = headers.get(http::header::AUTHORIZATION);
        let claim_header;
        let claim = match (authorization, presigned) {
            (Some(_), true) => {
                return Err(S3Error::new(
                    Code::InvalidArgument,
                    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified",
                ));
            }
            (None, false) if sigv2_query => return Err(unsupported_mechanism()),
            (None, false) => return Ok(None),
            (Some(value), false) => {
                claim_header = value
                    .to_str()
                    .map_err(|_| header_malformed("The authorization header is not ASCII."))?
                    .to_owned();
                self.header_claim(&claim_header, headers, now)?
            }
            (None, true) => self.query_claim(&params, headers, now)?,
        };
        let secret = credentials.secret_key(claim.scope.access_key).ok_or_else(|| {
            S3Error::from_code(Code::InvalidAccessKeyId).with_detail("AWSAccessKeyId", claim.scope.access_key)
        })?;
        let key = signing_key(&secret, claim.scope.date, claim.scope.region, SERVICE);
        let scope = scope(claim.scope.date, claim.scope.region, SERVICE);
        let header_lines = header_lines(claim.signed_headers, headers, uri);
        let path = uri.path();
        let attempt = |uri_form: &str, query_form: &str| {
            let canonical = canonicalize(&CanonicalInput {
                method: method.as_str(),
                uri: uri_form,
                query: query_form,
                header_lines: &header_lines,
                signed_headers: claim.signed_headers,
                payload_hash: &claim.payload_hash,
                datetime: &claim.datetime,
                scope: &scope,
            });
            let signature = hex(&hmac_sha256(&key, canonical.string_to_sign.as_bytes()));
            (ct_eq(signature.as_bytes(), claim.signature.as_bytes()), canonical)
        };
        let (uri_form, query_form) = (canonical_uri(path), canonical_query(query, claim.skip_query, false));
        let (mut ok, canonical) = attempt(&uri_form, &query_form);
        // Clients that sign the path and query exactly as they send them
        // (without SigV4's re-encoding) get a second chance.
        let raw_query = canonical_query(query, claim.skip_query, true);
        if !ok && (uri_form != path || raw_query != query_form) {
            ok = attempt(if path.is_empty() { "/" } else { path }, &raw_query).0;
        }
        if !ok {
            return Err(S3Error::from_code(Code::SignatureDoesNotMatch)
                .with_detail("AWSAccessKeyId", claim.scope.access_key)
                .with_detail("StringToSign", canonical.string_to_sign)
                .with_detail("SignatureProvided", claim.signature)
                .with_detail("CanonicalRequest", canonical.request));
        }
        let chain = || ChunkSigner::new(key, &claim.datetime, &scope, claim.signature);
        let payload = match claim.payload_hash.as_str() {
            UNSIGNED_PAYLOAD => Payload::Unsigned,
            STREAMING_PAYLOAD => Payload::Streaming(chain()),
            STREAMING_PAYLOAD_TRAILER => Payload::StreamingTrailer(chain()),
            STREAMING_UNSIGNED_PAYLOAD_TRAILER => Payload::StreamingUnsignedTrailer,
            hash => Payload::Sha256(parse_hex32(hash).ok_or_else(|| bad_content_sha256(hash))?),
        };
        Ok(Some(Verified {
            access_key: claim.scope.access_key.to_owned(),
            region: claim.scope.region.to_owned(),
            signed_at: claim.signed_at,
            presigned: claim.presigned,
            payload,
        }))
    }

    /// [`Verifier::verify`] on a request head.
    pub fn verify_parts(
        &self,
        parts: &http::request::Parts,
        credentials: &dyn Credentials,
        now: SystemTime,
    ) -> Result<Option<Verified>, S3Error> {
        self.verify(&parts.method, &parts.uri, &parts.headers, credentials, now)
    }

    fn header_claim<'a>(&self, value: &'a str, headers: &HeaderMap, now: SystemTime) -> Result<Claim<'a>, S3Error> {
        if value.starts_with("AWS ") {
            return Err(unsupported_mechanism());
        }
        let rest = value
            .strip_prefix(ALGORITHM)
            .filter(|r| r.starts_with([' ', '\t']))
            .ok_or_else(|| header_malformed("The authorization header is malformed; the authorization header requires AWS4-HMAC-SHA256 authentication."))?;
        let (mut credential, mut signed_headers, mut signature) = (None, None, None);
        for component in rest.split(',').map(str::trim) {
            let (name, val) = component.split_once('=').ok_or_else(|| {
                header_malformed(format!(
                    "The authorization header is malformed; the component '{component}' is not of the form name=value."
                ))
            })?;
            let slot = match name.trim() {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                other => {
                    return Err(header_malformed(format!(
                        "The authorization header is malformed; unknown component '{other}'."
                    )));
                }
            };
            if slot.replace(val.trim()).is_some() {
                return Err(header_malformed(format!(
                    "The authorization header is malformed; '{name}' is given twice."
                )));
            }
        }
        let missing =
            |what: &str| header_malformed(format!("The authorization header is malformed; it has no {what}."));
        let credential = credential.ok_or_else(|| missing("Credential"))?;
        let signed_headers = signed_headers.ok_or_else(|| missing("SignedHeaders"))?;
        let signature = signature.ok_or_else(|| missing("Signature"))?;
        let scope = parse_credential(credential)
            .map_err(|why| header_malformed(format!("The authorization header is malformed; {why}")))?;
        check_signed_headers(signed_headers)
            .map_err(|why| header_malformed(format!("The authorization header is malformed; {why}")))?;
        if !is_signature(signature) {
            return Err(header_malformed(
                "The authorization header is malformed; the Signature is not 64 lowercase hex digits.",
            ));
        }

        let (datetime, signed_at) = match header(headers, "x-amz-date") {
            Some(text) => (text.to_owned(), parse_amz_datetime(text)),
            None => match header(headers, "date").and_then(parse_http_date) {
                Some(t) => (amz_datetime(t), Some(t)),
                None => (String::new(), None),
            },
        };
        let signed_at = signed_at.ok_or_else(|| {
            S3Error::new(
                Code::AccessDenied,
                "AWS authentication requires a valid Date or x-amz-date header",
            )
        })?;
        if !datetime.starts_with(scope.date) {
            return Err(header_malformed(
                "The authorization header is malformed; Invalid credential date. Date is not the same as X-Amz-Date.",
            ));
        }
        let skew_secs = unix_secs(now).abs_diff(unix_secs(signed_at));
        if skew_secs > self.max_skew.as_secs() {
            return Err(S3Error::from_code(Code::RequestTimeTooSkewed)
                .with_detail("RequestTime", datetime)
                .with_detail("ServerTime", iso8601_ms(now))
                .with_detail("MaxAllowedSkewMilliseconds", (self.max_skew.as_millis()).to_string()));
        }
        let payload_hash = header(headers, "x-amz-content-sha256").ok_or_else(|| {
            S3Error::new(
                Code::InvalidRequest,
                "Missing required header for this request: x-amz-content-sha256",
            )
        })?;
        check_payload_hash(payload_hash)?;
        Ok(Claim {
            scope,
            signed_headers,
            signature,
            datetime,
            signed_at,
            payload_hash: payload_hash.to_owned(),
            skip_query: None,
            presigned: false,
        })
    }

    fn query_claim<'a>(
        &self,
        params: &'a [(String, String)],
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Claim<'a>, S3Error> {
        let mut found: [Option<&str>; 6] = [None; 6];
        for (name, value) in params {
            if let Some(i) = PRESIGN_PARAMS.iter().position(|p| p == name)
                && found[i].replace(value.as_str()).is_some()
            {
                return Err(query_malformed(format!("{name} is given twice.")));
            }
        }
        let [
            Some(algorithm),
            Some(credential),
            Some(date),
            Some(expires),
            Some(signed_headers),
            Some(signature),
        ] = found
        else {
            return Err(query_malformed(
                "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters.",
            ));
        };
        if algorithm != ALGORITHM {
            return Err(query_malformed("X-Amz-Algorithm only supports \"AWS4-HMAC-SHA256\""));
        }
        let scope = parse_credential(credential)
            .map_err(|why| query_malformed(format!("Error parsing the X-Amz-Credential parameter; {why}")))?;
        check_signed_headers(signed_headers)
            .map_err(|why| query_malformed(format!("X-Amz-SignedHeaders is malformed; {why}")))?;
        if !is_signature(signature) {
            return Err(query_malformed("X-Amz-Signature is not 64 lowercase hex digits."));
        }
        let signed_at = parse_amz_datetime(date)
            .ok_or_else(|| query_malformed("X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""))?;
        if !date.starts_with(scope.date) {
            return Err(query_malformed(
                "Invalid credential date. Date is not the same as X-Amz-Date.",
            ));
        }
        let expires_secs: u64 = match expires.parse::<i64>() {
            Ok(n) if n < 0 => return Err(query_malformed("X-Amz-Expires must be non-negative")),
            Ok(n) if n.unsigned_abs() > MAX_PRESIGNED_EXPIRES_SECS => {
                return Err(query_malformed(
                    "X-Amz-Expires must be less than a week (in seconds) that is; 604800",
                ));
            }
            Ok(0) => return Err(query_malformed("X-Amz-Expires must be positive")),
            Ok(n) => n.unsigned_abs(),
            Err(_) => return Err(query_malformed("X-Amz-Expires should be a number")),
        };
        let (now_secs, at_secs) = (unix_secs(now), unix_secs(signed_at));
        if now_secs > at_secs.saturating_add(expires_secs as i64) {
            return Err(S3Error::new(Code::AccessDenied, "Request has expired")
                .with_detail("X-Amz-Expires", expires)
                .with_detail("Expires", iso8601_ms(signed_at + Duration::from_secs(expires_secs)))
                .with_detail("ServerTime", iso8601_ms(now)));
        }
        if at_secs > now_secs.saturating_add(self.max_skew.as_secs() as i64) {
            return Err(S3Error::new(Code::AccessDenied, "Request is not valid yet")
                .with_detail("X-Amz-Date", date)
                .with_detail("ServerTime", iso8601_ms(now)));
        }
        // A presigned URL signs no body unless it names a hash itself.
        let payload_hash = params
            .iter()
            .find(|(n, _)| n == "X-Amz-Content-Sha256")
            .map(|(_, v)| v.as_str())
            .unwrap_or(UNSIGNED_PAYLOAD);
        check_payload_hash(payload_hash)?;
        let _ = headers;
        Ok(Claim {
            scope,
            signed_headers,
            signature,
            datetime: date.to_owned(),
            signed_at,
            payload_hash: payload_hash.to_owned(),
            skip_query: Some("X-Amz-Signature"),
            presigned: true,
        })
    }
}

fn unsupported_mechanism() -> S3Error {
    S3Error::new(
        Code::InvalidRequest,
        "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
    )
}

fn header_malformed(message: impl Into<String>) -> S3Error {
    S3Error::new(Code::AuthorizationHeaderMalformed, message)
}

fn query_malformed(message: impl Into<String>) -> S3Error {
    S3Error::new(Code::AuthorizationQueryParametersError, message)
}

fn bad_content_sha256(value: &str) -> S3Error {
    S3Error::new(
        Code::InvalidArgument,
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, \
         STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, or a valid sha256 value.",
    )
    .with_detail("ArgumentName", "x-amz-content-sha256")
    .with_detail("ArgumentValue", value)
}

fn check_payload_hash(value: &str) -> Result<(), S3Error> {
    match value {
        UNSIGNED_PAYLOAD | STREAMING_PAYLOAD | STREAMING_PAYLOAD_TRAILER | STREAMING_UNSIGNED_PAYLOAD_TRAILER => Ok(()),
        hash if parse_hex32(hash).is_some() => Ok(()),
        other => Err(bad_content_sha256(other)),
    }
}

/// Splits `AKID/yyyymmdd/region/s3/aws4_request`.
fn parse_credential(credential: &str) -> Result<Scope<'_>, String> {
    let expecting = "the Credential is mal-formed; expecting \"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request\".";
    let mut parts = credential.rsplitn(5, '/');
    let (Some(terminator), Some(service), Some(region), Some(date), Some(access_key)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(expecting.to_owned());
    };
    if access_key.is_empty() || region.is_empty() || date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expecting.to_owned());
    }
    if service != SERVICE {
        return Err(format!(
            "incorrect service \"{service}\". This endpoint belongs to \"s3\"."
        ));
    }
    if terminator != TERMINATOR {
        return Err(format!(
            "incorrect terminal \"{terminator}\". This endpoint uses \"aws4_request\"."
        ));
    }
    Ok(Scope {
        access_key,
        date,
        region,
    })
}

fn check_signed_headers(signed_headers: &str) -> Result<(), String> {
    let mut has_host = false;
    for name in signed_headers.split(';') {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        {
            return Err(format!(
                "the signed header name '{name}' is not a lowercase header name."
            ));
        }
        has_host |= name == "host";
    }
    if has_host {
        Ok(())
    } else {
        Err("the host header must be signed.".to_owned())
    }
}

/// `name:value` for each signed header: values of repeated headers joined
/// by commas, each folded. The host comes from the URI's authority when
/// there is no `Host` header (HTTP/2).
fn header_lines(signed_headers: &str, headers: &HeaderMap, uri: &Uri) -> Vec<String> {
    signed_headers
        .split(';')
        .map(|name| {
            let mut values: Vec<String> = headers
                .get_all(name)
                .iter()
                .map(|v| canonical_header_value(v.as_bytes()))
                .collect();
            if values.is_empty()
                && name == "host"
                && let Some(authority) = uri.authority()
            {
                values.push(authority.as_str().to_owned());
            }
            format!("{name}:{}", values.join(","))
        })
        .collect()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The query's name and value pairs, each percent-decoded once (`+` kept).
fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            let decode =
                |s: &str| percent_decode(s).map_or_else(|| s.to_owned(), |b| String::from_utf8_lossy(&b).into_owned());
            (decode(name), decode(value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::sigv4::{EMPTY_SHA256, Signer};

    pub(crate) const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    pub(crate) const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn lookup(access_key: &str) -> Option<String> {
        (access_key == AKID).then(|| SECRET.to_owned())
    }

    fn at(s: &str) -> SystemTime {
        parse_amz_datetime(s).unwrap()
    }

    fn request(method: &str, uri: &str, pairs: &[(&'static str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).unwrap());
        }
        (method.parse().unwrap(), uri.parse().unwrap(), h)
    }

    fn verify_at(req: &(Method, Uri, HeaderMap), now: SystemTime) -> Result<Option<Verified>, S3Error> {
        Verifier::default().verify(&req.0, &req.1, &req.2, &lookup, now)
    }

    fn get_object_example(signature: &str) -> (Method, Uri, HeaderMap) {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature={signature}"
        );
        request(
            "GET",
            "/test.txt",
            &[
                ("host", "examplebucket.s3.amazonaws.com"),
                ("range", "bytes=0-9"),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("x-amz-date", "20130524T000000Z"),
                ("authorization", &auth),
            ],
        )
    }

    const GET_OBJECT_SIGNATURE: &str = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41";

    #[test]
    fn the_aws_get_object_example_verifies() {
        let v = verify_at(&get_object_example(GET_OBJECT_SIGNATURE), at("20130524T000500Z"))
            .unwrap()
            .unwrap();
        assert_eq!(v.access_key, AKID);
        assert_eq!(v.region, "us-east-1");
        assert!(!v.presigned);
        assert!(matches!(v.payload, Payload::Sha256(h) if hex(&h) == EMPTY_SHA256));
    }

    #[test]
    fn a_wrong_signature_is_refused_with_the_string_to_sign() {
        let mut wrong = GET_OBJECT_SIGNATURE.to_owned();
        wrong.replace_range(0..1, "e");
        let err = verify_at(&get_object_example(&wrong), at("20130524T000000Z")).unwrap_err();
        assert_eq!(err.code, Code::SignatureDoesNotMatch);
        assert_eq!(
            err.detail("StringToSign"),
            Some(
                "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n\
                 7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
            )
        );
        assert!(
            err.detail("CanonicalRequest")
                .unwrap()
                .starts_with("GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n")
        );
        // A changed signed header breaks the signature too.
        let (m, u, mut h) = get_object_example(GET_OBJECT_SIGNATURE);
        h.insert("range", HeaderValue::from_static("bytes=0-10"));
        assert_eq!(
            verify_at(&(m, u, h), at("20130524T000000Z")).unwrap_err().code,
            Code::SignatureDoesNotMatch
        );
    }

    #[test]
    fn the_aws_put_object_example_verifies() {
        // S3's "PUT Object" example: a Date header rather than x-amz-date, a
        // key with '$' that the canonical URI encodes.
        let auth = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
                    SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,\
                    Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd";
        let req = request(
            "PUT",
            "/test$file.text",
            &[
                ("host", "examplebucket.s3.amazonaws.com"),
                ("date", "Fri, 24 May 2013 00:00:00 GMT"),
                ("x-amz-date", "20130524T000000Z"),
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
                (
                    "x-amz-content-sha256",
                    "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
                ),
                ("authorization", auth),
            ],
        );
        let v = verify_at(&req, at("20130524T000000Z")).unwrap().unwrap();
        assert!(matches!(v.payload, Payload::Sha256(_)));
    }

    #[test]
    fn the_aws_list_objects_and_lifecycle_examples_verify() {
        let cases = [
            (
                "/?max-keys=2&prefix=J",
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            ),
            (
                "/?lifecycle",
                "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            ),
        ];
        for (uri, signature) in cases {
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature={signature}"
            );
            let req = request(
                "GET",
                uri,
                &[
                    ("host", "examplebucket.s3.amazonaws.com"),
                    ("x-amz-date", "20130524T000000Z"),
                    ("x-amz-content-sha256", EMPTY_SHA256),
                    ("authorization", &auth),
                ],
            );
            assert!(verify_at(&req, at("20130524T000000Z")).unwrap().is_some(), "{uri}");
        }
    }

    const PRESIGNED: &str = "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
        &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
        &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
        &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";

    #[test]
    fn the_aws_presigned_example_verifies_until_it_expires() {
        let req = request("GET", PRESIGNED, &[("host", "examplebucket.s3.amazonaws.com")]);
        let v = verify_at(&req, at("20130524T120000Z")).unwrap().unwrap();
        assert!(v.presigned);
        assert!(matches!(v.payload, Payload::Unsigned));
        // The host may come from the authority alone (HTTP/2).
        let h2 = request("GET", PRESIGNED, &[]);
        assert!(verify_at(&h2, at("20130524T120000Z")).unwrap().is_some());
        let err = verify_at(&req, at("20130525T000001Z")).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (Code::AccessDenied, "Request has expired")
        );
        assert_eq!(err.detail("X-Amz-Expires"), Some("86400"));
        assert!(verify_at(&req, at("20130525T000000Z")).is_ok());
        let err = verify_at(&req, at("20130523T230000Z")).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (Code::AccessDenied, "Request is not valid yet")
        );
        let tampered = request(
            "GET",
            &PRESIGNED.replace("test.txt", "test.txu"),
            &[("host", "examplebucket.s3.amazonaws.com")],
        );
        assert_eq!(
            verify_at(&tampered, at("20130524T000000Z")).unwrap_err().code,
            Code::SignatureDoesNotMatch
        );
    }

    #[test]
    fn presigned_parameters_are_checked() {
        let now = at("20130524T000000Z");
        let code = |uri: String| {
            verify_at(&request("GET", &uri, &[("host", "h")]), now)
                .unwrap_err()
                .code
        };
        assert_eq!(
            code(PRESIGNED.replace("X-Amz-Expires=86400", "X-Amz-Expires=604801")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("X-Amz-Expires=86400", "X-Amz-Expires=0")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("X-Amz-Expires=86400", "X-Amz-Expires=-1")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("X-Amz-Expires=86400", "X-Amz-Expires=soon")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("&X-Amz-Expires=86400", "")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("%2Fs3%2F", "%2Fs4%2F")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("20130524%2F", "20130523%2F")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=range")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(format!("{PRESIGNED}&X-Amz-Date=20130524T000000Z")),
            Code::AuthorizationQueryParametersError
        );
        assert_eq!(
            code(PRESIGNED.replace("AKIAIOSFODNN7EXAMPLE", "AKIDUNKNOWN")),
            Code::InvalidAccessKeyId
        );
        let both = request(
            "GET",
            PRESIGNED,
            &[("host", "h"), ("authorization", "AWS4-HMAC-SHA256 x")],
        );
        assert_eq!(verify_at(&both, now).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn no_authentication_is_none_and_sigv2_is_refused() {
        assert!(
            verify_at(&request("GET", "/b/k", &[("host", "h")]), SystemTime::now())
                .unwrap()
                .is_none()
        );
        let v2 = request("GET", "/b/k?AWSAccessKeyId=A&Expires=1&Signature=x", &[("host", "h")]);
        assert_eq!(
            verify_at(&v2, SystemTime::now()).unwrap_err().code,
            Code::InvalidRequest
        );
        let v2 = request("GET", "/b/k", &[("host", "h"), ("authorization", "AWS A:sig")]);
        assert_eq!(
            verify_at(&v2, SystemTime::now()).unwrap_err().code,
            Code::InvalidRequest
        );
    }

    #[test]
    fn malformed_headers_are_precise() {
        let now = at("20130524T000000Z");
        let with_auth = |auth: &str| {
            let (m, u, mut h) = get_object_example(GET_OBJECT_SIGNATURE);
            h.insert("authorization", HeaderValue::from_str(auth).unwrap());
            verify_at(&(m, u, h), now).unwrap_err()
        };
        let good = format!(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature={GET_OBJECT_SIGNATURE}"
        );
        for bad in [
            good.replace("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA512 "),
            good.replace("/s3/", "/s4/"),
            good.replace("aws4_request", "aws5_request"),
            good.replace("/20130524/", "/2013052/"),
            good.replace("Credential=AKIAIOSFODNN7EXAMPLE/", "Credential="),
            good.replace("/20130524/", "/20130525/"),
            good.replace("host;", ""),
            good.replace("host;range", "Host;range"),
            good.replace(", Signature=", ", Sig="),
            good.replace(", Signature=", ", Signature=0"),
            good.replace(", SignedHeaders=host;range;x-amz-content-sha256;x-amz-date", ""),
            format!("{good}, Signature={GET_OBJECT_SIGNATURE}"),
            good.replace("SignedHeaders=", "SignedHeaders"),
        ] {
            assert_eq!(with_auth(&bad).code, Code::AuthorizationHeaderMalformed, "{bad}");
        }
        assert_eq!(
            with_auth(&good.replace("AKIAIOSFODNN7EXAMPLE", "AKIDUNKNOWN")).code,
            Code::InvalidAccessKeyId
        );
        // The spaces after the commas are optional.
        let (m, u, mut h) = get_object_example(GET_OBJECT_SIGNATURE);
        h.insert("authorization", HeaderValue::from_str(&good).unwrap());
        assert!(verify_at(&(m, u, h), now).unwrap().is_some());
    }

    #[test]
    fn dates_and_payload_hashes_are_required_and_checked() {
        let (m, u, h) = get_object_example(GET_OBJECT_SIGNATURE);
        let without = |name: &str| {
            let mut h = h.clone();
            h.remove(name);
            verify_at(&(m.clone(), u.clone(), h), at("20130524T000000Z")).unwrap_err()
        };
        assert_eq!(without("x-amz-date").code, Code::AccessDenied);
        let err = without("x-amz-content-sha256");
        assert_eq!(
            (err.code, err.message.as_str()),
            (
                Code::InvalidRequest,
                "Missing required header for this request: x-amz-content-sha256"
            )
        );
        let mut bad = h.clone();
        bad.insert("x-amz-content-sha256", HeaderValue::from_static("STREAMING-NONSENSE"));
        assert_eq!(
            verify_at(&(m.clone(), u.clone(), bad), at("20130524T000000Z"))
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        let mut bad = h.clone();
        bad.insert("x-amz-date", HeaderValue::from_static("2013-05-24"));
        assert_eq!(
            verify_at(&(m.clone(), u.clone(), bad), at("20130524T000000Z"))
                .unwrap_err()
                .code,
            Code::AccessDenied
        );
    }

    #[test]
    fn clock_skew_is_bounded() {
        let req = get_object_example(GET_OBJECT_SIGNATURE);
        assert!(verify_at(&req, at("20130524T001500Z")).is_ok());
        assert!(verify_at(&req, at("20130523T234500Z")).is_ok());
        let err = verify_at(&req, at("20130524T001501Z")).unwrap_err();
        assert_eq!(err.code, Code::RequestTimeTooSkewed);
        assert_eq!(err.detail("RequestTime"), Some("20130524T000000Z"));
        assert_eq!(err.detail("ServerTime"), Some("2013-05-24T00:15:01.000Z"));
        assert_eq!(err.detail("MaxAllowedSkewMilliseconds"), Some("900000"));
        assert_eq!(
            verify_at(&req, at("20130523T234459Z")).unwrap_err().code,
            Code::RequestTimeTooSkewed
        );
        let strict = Verifier {
            max_skew: Duration::from_secs(60),
        };
        assert!(
            strict
                .verify(&req.0, &req.1, &req.2, &lookup, at("20130524T000200Z"))
                .is_err()
        );
    }

    #[test]
    fn any_region_is_accepted_and_used() {
        let signer = Signer::new(AKID, SECRET, "eu-central-1");
        let uri: Uri = "http://localhost:9000/bucket/some/key%20x?x-id=GetObject"
            .parse()
            .unwrap();
        let mut headers = HeaderMap::new();
        signer
            .sign(&Method::GET, &uri, &mut headers, EMPTY_SHA256, at("20240101T000000Z"))
            .unwrap();
        let v = verify_at(&(Method::GET, uri, headers), at("20240101T000000Z"))
            .unwrap()
            .unwrap();
        assert_eq!(v.region, "eu-central-1");
    }

    #[test]
    fn a_path_signed_as_sent_gets_a_second_chance() {
        // A client that keeps %2F in the path and signs the path as sent.
        let now = at("20240101T000000Z");
        let path = "/bucket/a%2Fb";
        let headers_at = |signature: &str| {
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential={AKID}/20240101/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
            );
            request(
                "GET",
                path,
                &[
                    ("host", "h"),
                    ("x-amz-date", "20240101T000000Z"),
                    ("x-amz-content-sha256", UNSIGNED_PAYLOAD),
                    ("authorization", &auth),
                ],
            )
        };
        let canonical = canonicalize(&CanonicalInput {
            method: "GET",
            uri: path,
            query: "",
            header_lines: &[
                "host:h".into(),
                format!("x-amz-content-sha256:{UNSIGNED_PAYLOAD}"),
                "x-amz-date:20240101T000000Z".into(),
            ],
            signed_headers: "host;x-amz-content-sha256;x-amz-date",
            payload_hash: UNSIGNED_PAYLOAD,
            datetime: "20240101T000000Z",
            scope: "20240101/us-east-1/s3/aws4_request",
        });
        let key = signing_key(SECRET, "20240101", "us-east-1", "s3");
        let signature = hex(&hmac_sha256(&key, canonical.string_to_sign.as_bytes()));
        assert!(verify_at(&headers_at(&signature), now).unwrap().is_some());
    }
}
