//! AWS Signature Version 4 as S3 uses it: the server's verification
//! ([`verify`]), the client's signing ([`sign`]), and the chunk-signature
//! chain of streaming uploads ([`ChunkSigner`]) both sides share.
//!
//! S3's flavour of SigV4: the canonical URI is the path URI-encoded once
//! (not twice, and not normalized: `a//b/../c` stays), the service is `s3`,
//! and the payload hash line is the `x-amz-content-sha256` value, which may
//! be a marker (`UNSIGNED-PAYLOAD`, `STREAMING-...`) instead of a hash.

pub mod sign;
pub mod verify;

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub use sign::Signer;
pub use verify::{Credentials, Payload, Verified, Verifier};

/// The only algorithm of SigV4 with HMAC.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
pub const STREAMING_PAYLOAD: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
pub const STREAMING_PAYLOAD_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";
pub const STREAMING_UNSIGNED_PAYLOAD_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// The SHA-256 of nothing, hex: the payload hash of a body-less request.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The service name in S3's credential scopes.
pub const SERVICE: &str = "s3";
const TERMINATOR: &str = "aws4_request";

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Reads 64 hex digits (either case) into 32 bytes.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let b = text.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Whether `text` is 64 lowercase hex digits, the form of a signature.
pub(crate) fn is_signature(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Equality that takes the same time wherever the inputs differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SigV4's URI encoding: every byte but `A-Z a-z 0-9 - . _ ~` as `%XX`
/// (uppercase hex); `/` is encoded only with `encode_slash` (query names and
/// values), not in paths.
pub fn uri_encode(text: &str, encode_slash: bool) -> String {
    uri_encode_bytes(text.as_bytes(), encode_slash)
}

pub(crate) fn uri_encode_bytes(bytes: &[u8], encode_slash: bool) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() + bytes.len() / 2);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (b == b'/' && !encode_slash) {
            s.push(b as char);
        } else {
            s.push('%');
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 15)] as char);
        }
    }
    s
}

/// Percent-decodes once; `+` stays `+` (paths and signing do not know the
/// form encoding). `None` on a `%` not followed by two hex digits.
pub(crate) fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length, so new_from_slice cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The key of one day, region and service: `HMAC` chained over them from
/// `AWS4` + the secret.
pub fn signing_key(secret_key: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_secret = format!("AWS4{secret_key}");
    let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, TERMINATOR.as_bytes())
}

/// A credential scope: `20130524/us-east-1/s3/aws4_request`.
pub(crate) fn scope(date: &str, region: &str, service: &str) -> String {
    format!("{date}/{region}/{service}/{TERMINATOR}")
}

/// The canonical request and the string to sign of one request.
pub(crate) struct Canonical {
    pub(crate) request: String,
    pub(crate) string_to_sign: String,
}

pub(crate) struct CanonicalInput<'a> {
    pub(crate) method: &'a str,
    pub(crate) uri: &'a str,
    pub(crate) query: &'a str,
    /// `name:value` lines in signed-header order, each without its newline.
    pub(crate) header_lines: &'a [String],
    pub(crate) signed_headers: &'a str,
    pub(crate) payload_hash: &'a str,
    pub(crate) datetime: &'a str,
    pub(crate) scope: &'a str,
}

pub(crate) fn canonicalize(input: &CanonicalInput<'_>) -> Canonical {
    let mut request = String::with_capacity(256);
    for part in [input.method, input.uri, input.query] {
        request.push_str(part);
        request.push('\n');
    }
    for line in input.header_lines {
        request.push_str(line);
        request.push('\n');
    }
    request.push('\n');
    request.push_str(input.signed_headers);
    request.push('\n');
    request.push_str(input.payload_hash);
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{}\n{}",
        input.datetime,
        input.scope,
        sha256_hex(request.as_bytes())
    );
    Canonical {
        request,
        string_to_sign,
    }
}

/// The canonical form of a header value: trimmed, runs of spaces and tabs
/// folded into one space.
pub(crate) fn canonical_header_value(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len());
    for word in text.split([' ', '\t']).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// The canonical query of a raw query string: names and values decoded once
/// and re-encoded, sorted by name then value, `skip` left out (the
/// signature itself, for presigned URLs). With `raw`, the pieces are kept as
/// sent and only sorted.
pub(crate) fn canonical_query(query: &str, skip: Option<&str>, raw: bool) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let encode = |s: &str| match (raw, percent_decode(s)) {
            (false, Some(bytes)) => uri_encode_bytes(&bytes, true),
            _ => s.to_owned(),
        };
        let name = encode(name);
        if skip.is_some_and(|skip| name == skip) {
            continue;
        }
        pairs.push((name, encode(value)));
    }
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 8);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// The canonical URI of a raw path: decoded once and re-encoded, `/` kept.
/// A path that does not decode is taken as sent.
pub(crate) fn canonical_uri(path: &str) -> String {
    let path = if path.is_empty() { "/" } else { path };
    match percent_decode(path) {
        Some(bytes) => uri_encode_bytes(&bytes, false),
        None => path.to_owned(),
    }
}

/// The chain of signatures of a streaming upload: each chunk's signature
/// covers its data and the signature before it, starting from the seed (the
/// request's own signature); the trailer's covers the trailers and the last
/// chunk's. The verifier and the signer hold the same chain.
#[derive(Clone)]
pub struct ChunkSigner {
    key: [u8; 32],
    datetime: String,
    scope: String,
    previous: String,
}

impl fmt::Debug for ChunkSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkSigner")
            .field("datetime", &self.datetime)
            .field("scope", &self.scope)
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

impl ChunkSigner {
    /// A chain from the request's signing key, its `x-amz-date`, credential
    /// scope and signature (the seed).
    pub fn new(signing_key: [u8; 32], datetime: &str, scope: &str, seed_signature: &str) -> ChunkSigner {
        ChunkSigner {
            key: signing_key,
            datetime: datetime.to_owned(),
            scope: scope.to_owned(),
            previous: seed_signature.to_owned(),
        }
    }

    /// The last signature of the chain (the seed before any chunk).
    pub fn previous_signature(&self) -> &str {
        &self.previous
    }

    /// The signature of the next chunk, from the SHA-256 of its data; the
    /// chain moves on to it.
    pub fn sign_chunk_hash(&mut self, chunk_sha256: &[u8; 32]) -> String {
        let signature = self.chunk_signature(chunk_sha256);
        self.previous.clone_from(&signature);
        signature
    }

    /// The signature of the next chunk, from its data.
    pub fn sign_chunk(&mut self, data: &[u8]) -> String {
        self.sign_chunk_hash(&Sha256::digest(data).into())
    }

    /// Whether `claimed` is the next chunk's signature; the chain moves on
    /// only if it is. Compared in constant time.
    pub fn verify_chunk(&mut self, chunk_sha256: &[u8; 32], claimed: &str) -> bool {
        let signature = self.chunk_signature(chunk_sha256);
        let ok = ct_eq(signature.as_bytes(), claimed.as_bytes());
        if ok {
            self.previous = signature;
        }
        ok
    }

    fn chunk_signature(&self, chunk_sha256: &[u8; 32]) -> String {
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{}\n{EMPTY_SHA256}\n{}",
            self.datetime,
            self.scope,
            self.previous,
            hex(chunk_sha256)
        );
        hex(&hmac_sha256(&self.key, string_to_sign.as_bytes()))
    }

    /// The signature of the trailers (name and value pairs, in the order
    /// sent, names lowercase, without `x-amz-trailer-signature`).
    pub fn sign_trailer(&mut self, trailers: &[(String, String)]) -> String {
        let signature = self.trailer_signature(trailers);
        self.previous.clone_from(&signature);
        signature
    }

    /// Whether `claimed` is the trailers' signature, in constant time.
    pub fn verify_trailer(&mut self, trailers: &[(String, String)], claimed: &str) -> bool {
        let signature = self.trailer_signature(trailers);
        let ok = ct_eq(signature.as_bytes(), claimed.as_bytes());
        if ok {
            self.previous = signature;
        }
        ok
    }

    fn trailer_signature(&self, trailers: &[(String, String)]) -> String {
        let mut canonical = String::new();
        for (name, value) in trailers {
            canonical.push_str(name);
            canonical.push(':');
            canonical.push_str(value);
            canonical.push('\n');
        }
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256-TRAILER\n{}\n{}\n{}\n{}",
            self.datetime,
            self.scope,
            self.previous,
            sha256_hex(canonical.as_bytes())
        );
        hex(&hmac_sha256(&self.key, string_to_sign.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..32).map(|i| i * 8).collect();
        let text = hex(&bytes);
        assert_eq!(parse_hex32(&text).unwrap().to_vec(), bytes);
        assert_eq!(parse_hex32(&text.to_uppercase()).unwrap().to_vec(), bytes);
        assert!(parse_hex32(&text[1..]).is_none());
        assert!(parse_hex32(&format!("g{}", &text[1..])).is_none());
        assert!(is_signature(&text));
        assert!(!is_signature(&text.to_uppercase()));
    }

    #[test]
    fn uri_encoding_is_sigv4s() {
        assert_eq!(uri_encode("a b/c~d$e+f", false), "a%20b/c~d%24e%2Bf");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(uri_encode("é", false), "%C3%A9");
        assert_eq!(percent_decode("a%2fb%20+").unwrap(), b"a/b +");
        assert!(percent_decode("a%2").is_none());
        assert!(percent_decode("%zz").is_none());
    }

    #[test]
    fn canonical_uri_decodes_once_and_keeps_the_path() {
        assert_eq!(canonical_uri("/test$file.text"), "/test%24file.text");
        assert_eq!(canonical_uri("/test%24file.text"), "/test%24file.text");
        assert_eq!(canonical_uri("/a%2520b"), "/a%2520b");
        assert_eq!(canonical_uri("/a//b/../c"), "/a//b/../c");
        assert_eq!(canonical_uri(""), "/");
    }

    #[test]
    fn canonical_query_sorts_encoded_pairs() {
        assert_eq!(
            canonical_query("prefix=J&max-keys=2", None, false),
            "max-keys=2&prefix=J"
        );
        assert_eq!(canonical_query("lifecycle", None, false), "lifecycle=");
        assert_eq!(
            canonical_query("b=2&a=%2f&a=1&X-Amz-Signature=s", Some("X-Amz-Signature"), false),
            "a=%2F&a=1&b=2"
        );
        assert_eq!(canonical_query("k=a b", None, false), "k=a%20b");
        assert_eq!(canonical_query("k=a%2fb", None, true), "k=a%2fb");
    }

    #[test]
    fn header_values_fold_whitespace() {
        assert_eq!(canonical_header_value(b"  a   b\t\tc  "), "a b c");
        assert_eq!(canonical_header_value(b""), "");
    }

    #[test]
    fn signing_key_matches_the_aws_example() {
        // The derived key of AWS's SigV4 documentation example
        // (secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20120215, us-east-1, iam).
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20120215",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex(&key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
