//! The client's side: signs requests and presigns URLs the way the AWS SDKs
//! do, so that benchmarks and tests need no SDK. It signs with the same
//! canonical forms the verifier checks against.

use std::time::{Duration, SystemTime};

use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};

use super::verify::MAX_PRESIGNED_EXPIRES_SECS;
use super::{
    ALGORITHM, CanonicalInput, ChunkSigner, SERVICE, UNSIGNED_PAYLOAD, canonical_header_value, canonical_query,
    canonical_uri, canonicalize, hex, hmac_sha256, scope, signing_key, uri_encode,
};
use crate::error::{Code, S3Error};
use crate::time::amz_datetime;

/// Headers a signer leaves unsigned: they are changed by proxies and
/// transports, as the AWS SDKs leave them.
const UNSIGNED_HEADERS: [&str; 6] = [
    "authorization",
    "user-agent",
    "expect",
    "transfer-encoding",
    "connection",
    "x-amzn-trace-id",
];

/// Signs requests with one access key, for one region.
#[derive(Clone)]
pub struct Signer {
    access_key: String,
    secret_key: String,
    region: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key", &self.access_key)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// What signing a request produced.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The request's signature: the seed of a streaming upload's chain.
    pub signature: String,
    /// The chain to sign aws-chunked chunks and trailers with
    /// ([`crate::chunked::encode`]).
    pub chunk_signer: ChunkSigner,
}

impl Signer {
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>, region: impl Into<String>) -> Signer {
        Signer {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            region: region.into(),
        }
    }

    /// Signs a request in place: sets `Host` (from the URI, if absent),
    /// `x-amz-date`, `x-amz-content-sha256` (`payload_hash`: a hex SHA-256 or
    /// one of the markers) and `Authorization`, signing every header present
    /// but the transport's own.
    pub fn sign(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &mut HeaderMap,
        payload_hash: &str,
        now: SystemTime,
    ) -> Result<Signed, S3Error> {
        let datetime = amz_datetime(now);
        if !headers.contains_key(HOST) {
            let authority = uri.authority().ok_or_else(|| {
                S3Error::new(
                    Code::InvalidArgument,
                    "a request to sign needs a Host header or an absolute URI",
                )
            })?;
            headers.insert(HOST, header_value(authority.as_str())?);
        }
        headers.insert("x-amz-date", header_value(&datetime)?);
        headers.insert("x-amz-content-sha256", header_value(payload_hash)?);
        headers.remove(http::header::AUTHORIZATION);

        let mut names: Vec<&str> = headers
            .keys()
            .map(HeaderName::as_str)
            .filter(|n| !UNSIGNED_HEADERS.contains(n))
            .collect();
        names.sort_unstable();
        names.dedup();
        let signed_headers = names.join(";");
        let lines: Vec<String> = names
            .iter()
            .map(|name| {
                let values: Vec<String> = headers
                    .get_all(*name)
                    .iter()
                    .map(|v| canonical_header_value(v.as_bytes()))
                    .collect();
                format!("{name}:{}", values.join(","))
            })
            .collect();
        let date = &datetime[..8];
        let scope = scope(date, &self.region, SERVICE);
        let canonical = canonicalize(&CanonicalInput {
            method: method.as_str(),
            uri: &canonical_uri(uri.path()),
            query: &canonical_query(uri.query().unwrap_or(""), None, false),
            header_lines: &lines,
            signed_headers: &signed_headers,
            payload_hash,
            datetime: &datetime,
            scope: &scope,
        });
        let key = signing_key(&self.secret_key, date, &self.region, SERVICE);
        let signature = hex(&hmac_sha256(&key, canonical.string_to_sign.as_bytes()));
        let authorization = format!(
            "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key
        );
        headers.insert(http::header::AUTHORIZATION, header_value(&authorization)?);
        let chunk_signer = ChunkSigner::new(key, &datetime, &scope, &signature);
        Ok(Signed {
            signature,
            chunk_signer,
        })
    }

    /// A presigned URL for `method` on `uri` (absolute, or relative with a
    /// `host` given): valid `expires` from `now`, signing only the host, with
    /// an unsigned payload, as SDKs presign.
    pub fn presign(
        &self,
        method: &Method,
        uri: &Uri,
        host: Option<&str>,
        expires: Duration,
        now: SystemTime,
    ) -> Result<Uri, S3Error> {
        let expires_secs = expires.as_secs();
        if expires_secs == 0 || expires_secs > MAX_PRESIGNED_EXPIRES_SECS {
            return Err(S3Error::new(
                Code::InvalidArgument,
                "a presigned URL lives 1 to 604800 seconds",
            ));
        }
        let host = host
            .map(str::to_owned)
            .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
            .ok_or_else(|| S3Error::new(Code::InvalidArgument, "a URL to presign needs a host"))?;
        let datetime = amz_datetime(now);
        let date = &datetime[..8];
        let scope = scope(date, &self.region, SERVICE);
        let credential = format!("{}/{scope}", self.access_key);
        let mut query = uri.query().unwrap_or("").to_owned();
        for (name, value) in [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", credential.as_str()),
            ("X-Amz-Date", datetime.as_str()),
            ("X-Amz-Expires", &expires_secs.to_string()),
            ("X-Amz-SignedHeaders", "host"),
        ] {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(name);
            query.push('=');
            query.push_str(&uri_encode(value, true));
        }
        let canonical = canonicalize(&CanonicalInput {
            method: method.as_str(),
            uri: &canonical_uri(uri.path()),
            query: &canonical_query(&query, None, false),
            header_lines: &[format!("host:{host}")],
            signed_headers: "host",
            payload_hash: UNSIGNED_PAYLOAD,
            datetime: &datetime,
            scope: &scope,
        });
        let key = signing_key(&self.secret_key, date, &self.region, SERVICE);
        let signature = hex(&hmac_sha256(&key, canonical.string_to_sign.as_bytes()));
        let path = if uri.path().is_empty() { "/" } else { uri.path() };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(
            format!("{path}?{query}&X-Amz-Signature={signature}")
                .parse()
                .map_err(|_| S3Error::new(Code::InvalidArgument, "the presigned URL does not parse"))?,
        );
        Uri::from_parts(parts).map_err(|_| S3Error::new(Code::InvalidArgument, "the presigned URL does not parse"))
    }
}

fn header_value(text: &str) -> Result<HeaderValue, S3Error> {
    HeaderValue::from_str(text)
        .map_err(|_| S3Error::new(Code::InvalidArgument, format!("'{text}' is not a header value")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sigv4::{EMPTY_SHA256, Payload, Verifier, parse_hex32};
    use crate::time::parse_amz_datetime;

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn t() -> SystemTime {
        parse_amz_datetime("20130524T000000Z").unwrap()
    }

    fn lookup(access_key: &str) -> Option<String> {
        (access_key == AKID).then(|| SECRET.to_owned())
    }

    #[test]
    fn reproduces_the_aws_get_object_example() {
        let signer = Signer::new(AKID, SECRET, "us-east-1");
        let uri: Uri = "/test.txt".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("examplebucket.s3.amazonaws.com"));
        headers.insert("range", HeaderValue::from_static("bytes=0-9"));
        headers.insert("user-agent", HeaderValue::from_static("not signed"));
        let signed = signer
            .sign(&Method::GET, &uri, &mut headers, EMPTY_SHA256, t())
            .unwrap();
        assert_eq!(
            signed.signature,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn reproduces_the_aws_presigned_example() {
        let signer = Signer::new(AKID, SECRET, "us-east-1");
        let uri: Uri = "https://examplebucket.s3.amazonaws.com/test.txt".parse().unwrap();
        let url = signer
            .presign(&Method::GET, &uri, None, Duration::from_secs(86_400), t())
            .unwrap();
        assert!(
            url.query()
                .unwrap()
                .ends_with("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"),
            "{url}"
        );
        let v = Verifier::default()
            .verify(&Method::GET, &url, &HeaderMap::new(), &lookup, t())
            .unwrap()
            .unwrap();
        assert!(v.presigned);
        assert!(
            signer
                .presign(&Method::GET, &uri, None, Duration::from_secs(604_801), t())
                .is_err()
        );
        assert!(
            signer
                .presign(&Method::GET, &"/x".parse().unwrap(), None, Duration::from_secs(60), t())
                .is_err()
        );
    }

    #[test]
    fn reproduces_the_aws_streaming_seed_signature() {
        // S3's chunked-upload example: 66,560 bytes in chunks of 64 KiB.
        let signer = Signer::new(AKID, SECRET, "us-east-1");
        let uri: Uri = "/examplebucket/chunkObject.txt".parse().unwrap();
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("host", "s3.amazonaws.com"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "66560"),
            ("content-length", "66824"),
        ] {
            headers.insert(n, HeaderValue::from_static(v));
        }
        let signed = signer
            .sign(&Method::PUT, &uri, &mut headers, crate::sigv4::STREAMING_PAYLOAD, t())
            .unwrap();
        assert_eq!(
            signed.signature,
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
        );
        let v = Verifier::default()
            .verify(&Method::PUT, &uri, &headers, &lookup, t())
            .unwrap()
            .unwrap();
        let Payload::Streaming(chain) = v.payload else {
            panic!("a streaming payload was expected")
        };
        assert_eq!(chain.previous_signature(), signed.signature);
    }

    #[test]
    fn reproduces_the_aws_streaming_trailer_seed_signature() {
        // S3's trailing-header example: the same upload, a CRC32C trailer.
        let signer = Signer::new(AKID, SECRET, "us-east-1");
        let uri: Uri = "/examplebucket/chunkObject.txt".parse().unwrap();
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("host", "s3.amazonaws.com"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "66560"),
            ("x-amz-trailer", "x-amz-checksum-crc32c"),
        ] {
            headers.insert(n, HeaderValue::from_static(v));
        }
        let signed = signer
            .sign(
                &Method::PUT,
                &uri,
                &mut headers,
                crate::sigv4::STREAMING_PAYLOAD_TRAILER,
                t(),
            )
            .unwrap();
        assert_eq!(
            signed.signature,
            "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
        );
    }

    #[test]
    fn signed_requests_round_trip_through_the_verifier() {
        let signer = Signer::new(AKID, SECRET, "kvtier");
        for (method, uri, payload) in [
            (
                Method::PUT,
                "http://127.0.0.1:9000/bucket/dir/a%20key:%E2%9C%93",
                "UNSIGNED-PAYLOAD",
            ),
            (
                Method::GET,
                "http://127.0.0.1:9000/bucket?list-type=2&prefix=a%2Fb&max-keys=10",
                EMPTY_SHA256,
            ),
            (Method::POST, "http://127.0.0.1:9000/bucket/k?uploads", EMPTY_SHA256),
            (
                Method::DELETE,
                "http://127.0.0.1:9000/bucket/k~!*()'?uploadId=abc%3D%3D",
                EMPTY_SHA256,
            ),
        ] {
            let uri: Uri = uri.parse().unwrap();
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/octet-stream"));
            headers.insert("x-amz-meta-note", HeaderValue::from_static("  two   spaces "));
            signer.sign(&method, &uri, &mut headers, payload, t()).unwrap();
            let v = Verifier::default()
                .verify(&method, &uri, &headers, &lookup, t())
                .unwrap()
                .unwrap();
            assert_eq!(v.region, "kvtier");
            if let Some(hash) = parse_hex32(payload) {
                assert!(matches!(v.payload, Payload::Sha256(h) if h == hash));
            }
            // Any change to a signed header breaks it.
            headers.insert("x-amz-meta-note", HeaderValue::from_static("changed"));
            let err = Verifier::default()
                .verify(&method, &uri, &headers, &lookup, t())
                .unwrap_err();
            assert_eq!(err.code, Code::SignatureDoesNotMatch);
        }
    }
}
