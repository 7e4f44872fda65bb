//! Body integrity: the checksum algorithms S3 clients send
//! (`x-amz-checksum-*`, up front or as trailers), `Content-MD5`, the
//! `x-amz-content-sha256` hash, and the MD5 behind every ETag.
//!
//! [`BodyChecks`] is built from a request's headers, fed the decoded body,
//! and finished with the trailers: it answers the digests to store or the
//! precise error S3 gives.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use md5::Digest as _;

use crate::chunked::Trailers;
use crate::error::{Code, S3Error};
use crate::sigv4::{hex, parse_hex32};

/// The `x-amz-checksum-*` algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChecksumAlgorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl ChecksumAlgorithm {
    pub const ALL: [ChecksumAlgorithm; 5] = [
        ChecksumAlgorithm::Crc32,
        ChecksumAlgorithm::Crc32c,
        ChecksumAlgorithm::Crc64Nvme,
        ChecksumAlgorithm::Sha1,
        ChecksumAlgorithm::Sha256,
    ];

    /// The name as in `x-amz-sdk-checksum-algorithm`: `CRC32`, `CRC64NVME`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "CRC32",
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Crc64Nvme => "CRC64NVME",
            ChecksumAlgorithm::Sha1 => "SHA1",
            ChecksumAlgorithm::Sha256 => "SHA256",
        }
    }

    /// Reads a name in any case.
    pub fn parse(name: &str) -> Option<ChecksumAlgorithm> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(name.trim()))
    }

    /// The header (and trailer) that carries the value: `x-amz-checksum-crc32`.
    pub fn header_name(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "x-amz-checksum-crc32",
            ChecksumAlgorithm::Crc32c => "x-amz-checksum-crc32c",
            ChecksumAlgorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            ChecksumAlgorithm::Sha1 => "x-amz-checksum-sha1",
            ChecksumAlgorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    pub fn from_header_name(name: &str) -> Option<ChecksumAlgorithm> {
        Self::ALL
            .into_iter()
            .find(|a| a.header_name().eq_ignore_ascii_case(name))
    }

    /// The element in XML bodies: `ChecksumCRC32`.
    pub fn xml_element(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "ChecksumCRC32",
            ChecksumAlgorithm::Crc32c => "ChecksumCRC32C",
            ChecksumAlgorithm::Crc64Nvme => "ChecksumCRC64NVME",
            ChecksumAlgorithm::Sha1 => "ChecksumSHA1",
            ChecksumAlgorithm::Sha256 => "ChecksumSHA256",
        }
    }

    pub fn from_xml_element(name: &str) -> Option<ChecksumAlgorithm> {
        Self::ALL.into_iter().find(|a| a.xml_element() == name)
    }

    /// The length of a value in bytes.
    pub fn digest_bytes(self) -> usize {
        match self {
            ChecksumAlgorithm::Crc32 | ChecksumAlgorithm::Crc32c => 4,
            ChecksumAlgorithm::Crc64Nvme => 8,
            ChecksumAlgorithm::Sha1 => 20,
            ChecksumAlgorithm::Sha256 => 32,
        }
    }
}

/// A checksum value, raw; S3 sends it base64.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    pub algorithm: ChecksumAlgorithm,
    pub value: Vec<u8>,
}

impl Checksum {
    /// Reads a base64 value; `None` if it is not base64 of the algorithm's
    /// length.
    pub fn from_base64(algorithm: ChecksumAlgorithm, text: &str) -> Option<Checksum> {
        let value = B64.decode(text.trim()).ok()?;
        (value.len() == algorithm.digest_bytes()).then_some(Checksum { algorithm, value })
    }

    pub fn to_base64(&self) -> String {
        B64.encode(&self.value)
    }

    /// Computes the checksum of `data` in one go.
    pub fn of(algorithm: ChecksumAlgorithm, data: &[u8]) -> Checksum {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }
}

/// A streaming hasher for one algorithm.
#[derive(Clone)]
pub struct Hasher(State);

#[derive(Clone)]
enum State {
    Crc32(crc32fast::Hasher),
    Crc32c(u32),
    Crc64Nvme(crc64fast_nvme::Digest),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hasher").field(&self.algorithm()).finish()
    }
}

impl Hasher {
    pub fn new(algorithm: ChecksumAlgorithm) -> Hasher {
        Hasher(match algorithm {
            ChecksumAlgorithm::Crc32 => State::Crc32(crc32fast::Hasher::new()),
            ChecksumAlgorithm::Crc32c => State::Crc32c(0),
            ChecksumAlgorithm::Crc64Nvme => State::Crc64Nvme(crc64fast_nvme::Digest::new()),
            ChecksumAlgorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
            ChecksumAlgorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
        })
    }

    pub fn algorithm(&self) -> ChecksumAlgorithm {
        match &self.0 {
            State::Crc32(_) => ChecksumAlgorithm::Crc32,
            State::Crc32c(_) => ChecksumAlgorithm::Crc32c,
            State::Crc64Nvme(_) => ChecksumAlgorithm::Crc64Nvme,
            State::Sha1(_) => ChecksumAlgorithm::Sha1,
            State::Sha256(_) => ChecksumAlgorithm::Sha256,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            State::Crc32(h) => h.update(data),
            State::Crc32c(state) => *state = crc32c::crc32c_append(*state, data),
            State::Crc64Nvme(h) => h.write(data),
            State::Sha1(h) => h.update(data),
            State::Sha256(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Checksum {
        let algorithm = self.algorithm();
        let value = match self.0 {
            State::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            State::Crc32c(state) => state.to_be_bytes().to_vec(),
            State::Crc64Nvme(h) => h.sum64().to_be_bytes().to_vec(),
            State::Sha1(h) => h.finalize().to_vec(),
            State::Sha256(h) => h.finalize().to_vec(),
        };
        Checksum { algorithm, value }
    }
}

/// Where the expected value of the request's checksum comes from.
#[derive(Debug, Clone)]
enum Expected {
    Header(Checksum),
    Trailer,
}

/// The checks one request body must pass, built from its headers.
#[derive(Debug, Clone)]
pub struct BodyChecks {
    md5: Option<md5::Md5>,
    size_bytes: u64,
    content_md5: Option<[u8; 16]>,
    content_sha256: Option<(sha2::Sha256, [u8; 32])>,
    checksum: Option<(Hasher, Expected)>,
}

/// What a body that passed its checks hashed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDigests {
    /// The MD5 of the body: the ETag of a PutObject, and of an UploadPart.
    /// `None` only after [`BodyChecks::without_md5`].
    pub md5: Option<[u8; 16]>,
    /// The verified checksum, if the request carried one: to store and to
    /// send back on GET/HEAD with `x-amz-checksum-mode: ENABLED`.
    pub checksum: Option<Checksum>,
    pub size_bytes: u64,
}

impl BodyDigests {
    /// The ETag, unquoted: the hex MD5, if it was computed.
    pub fn etag(&self) -> Option<String> {
        self.md5.as_ref().map(|m| hex(m))
    }
}

impl BodyChecks {
    /// Reads `Content-MD5`, `x-amz-content-sha256` (a hex hash is checked;
    /// the `UNSIGNED-PAYLOAD` and `STREAMING-*` markers are not hashes),
    /// `x-amz-checksum-<alg>`, `x-amz-sdk-checksum-algorithm` and the
    /// checksum named in `x-amz-trailer`.
    pub fn from_headers(headers: &HeaderMap) -> Result<BodyChecks, S3Error> {
        let content_md5 =
            match header_str(headers, "content-md5")? {
                None => None,
                Some(text) => {
                    let bytes = B64.decode(text.trim()).ok().and_then(|v| <[u8; 16]>::try_from(v).ok());
                    Some(bytes.ok_or_else(|| {
                        S3Error::new(Code::InvalidDigest, "The Content-MD5 you specified is not valid.")
                    })?)
                }
            };
        let content_sha256 = match header_str(headers, "x-amz-content-sha256")? {
            Some(text) if !text.starts_with("UNSIGNED-PAYLOAD") && !text.starts_with("STREAMING-") => {
                let want = parse_hex32(text).ok_or_else(|| {
                    S3Error::new(
                        Code::InvalidArgument,
                        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, \
                         STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, \
                         or a valid sha256 value.",
                    )
                    .with_detail("ArgumentName", "x-amz-content-sha256")
                    .with_detail("ArgumentValue", text)
                })?;
                Some((sha2::Sha256::new(), want))
            }
            _ => None,
        };

        let mut declared: Option<(ChecksumAlgorithm, Expected)> = None;
        let mut declare = |algorithm, expected| {
            if declared.is_some() {
                return Err(S3Error::new(
                    Code::InvalidRequest,
                    "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
                ));
            }
            declared = Some((algorithm, expected));
            Ok(())
        };
        for (name, value) in headers {
            let name = name.as_str();
            let Some(suffix) = name.strip_prefix("x-amz-checksum-") else {
                continue;
            };
            if matches!(suffix, "algorithm" | "type" | "mode") {
                continue;
            }
            let invalid = || S3Error::new(Code::InvalidRequest, format!("Value for {name} header is invalid."));
            let algorithm = ChecksumAlgorithm::from_header_name(name).ok_or_else(invalid)?;
            let text = value.to_str().map_err(|_| invalid())?;
            let checksum = Checksum::from_base64(algorithm, text).ok_or_else(invalid)?;
            declare(algorithm, Expected::Header(checksum))?;
        }
        for name in trailer_names(headers)? {
            if !name.starts_with("x-amz-checksum-") {
                continue;
            }
            let algorithm = ChecksumAlgorithm::from_header_name(&name).ok_or_else(|| {
                S3Error::new(
                    Code::InvalidRequest,
                    format!("The value specified in the x-amz-trailer header is not supported: {name}"),
                )
            })?;
            declare(algorithm, Expected::Trailer)?;
        }
        if let Some(text) = header_str(headers, "x-amz-sdk-checksum-algorithm")? {
            let invalid = || {
                S3Error::new(
                    Code::InvalidRequest,
                    "Value for x-amz-sdk-checksum-algorithm header is invalid.",
                )
            };
            let algorithm = ChecksumAlgorithm::parse(text).ok_or_else(invalid)?;
            match &declared {
                None => {
                    return Err(S3Error::new(
                        Code::InvalidRequest,
                        "x-amz-sdk-checksum-algorithm specified, but no corresponding x-amz-checksum-* or x-amz-trailer headers were found.",
                    ));
                }
                Some((a, _)) if *a != algorithm => return Err(invalid()),
                Some(_) => {}
            }
        }
        Ok(BodyChecks {
            md5: Some(md5::Md5::new()),
            size_bytes: 0,
            content_md5,
            content_sha256,
            checksum: declared.map(|(a, e)| (Hasher::new(a), e)),
        })
    }

    /// Skips the MD5 (unless `Content-MD5` asks for it): it is the slowest
    /// hash here (about 1.5 ns a byte), and only S3's ETag convention needs
    /// it; a server that makes its ETags otherwise can save it.
    pub fn without_md5(mut self) -> BodyChecks {
        if self.content_md5.is_none() {
            self.md5 = None;
        }
        self
    }

    /// The algorithm of the request's checksum, if it has one.
    pub fn algorithm(&self) -> Option<ChecksumAlgorithm> {
        self.checksum.as_ref().map(|(h, _)| h.algorithm())
    }

    /// Feeds the next bytes of the decoded body.
    pub fn update(&mut self, data: &[u8]) {
        self.size_bytes += data.len() as u64;
        if let Some(h) = &mut self.md5 {
            h.update(data);
        }
        if let Some((h, _)) = &mut self.content_sha256 {
            h.update(data);
        }
        if let Some((h, _)) = &mut self.checksum {
            h.update(data);
        }
    }

    /// Checks the whole body: `x-amz-content-sha256` (else
    /// `XAmzContentSHA256Mismatch`), `Content-MD5` (else `BadDigest`), and the
    /// checksum from the headers or `trailers` (else `BadDigest`; a trailer
    /// that is missing or unreadable is `InvalidRequest`).
    pub fn finish(self, trailers: Option<&Trailers>) -> Result<BodyDigests, S3Error> {
        let md5: Option<[u8; 16]> = self.md5.map(|h| h.finalize().into());
        if let Some((h, want)) = self.content_sha256 {
            let got: [u8; 32] = h.finalize().into();
            if got != want {
                return Err(S3Error::from_code(Code::XAmzContentSHA256Mismatch)
                    .with_detail("ClientComputedContentSHA256", hex(&want))
                    .with_detail("S3ComputedContentSHA256", hex(&got)));
            }
        }
        if let (Some(want), Some(md5)) = (self.content_md5, md5)
            && want != md5
        {
            return Err(S3Error::new(
                Code::BadDigest,
                "The Content-MD5 you specified did not match what we received.",
            )
            .with_detail("ExpectedDigest", B64.encode(want))
            .with_detail("CalculatedDigest", B64.encode(md5)));
        }
        let checksum = match self.checksum {
            None => None,
            Some((h, expected)) => {
                let algorithm = h.algorithm();
                let want = match expected {
                    Expected::Header(c) => c,
                    Expected::Trailer => {
                        let name = algorithm.header_name();
                        let text = trailers.and_then(|t| t.get(name)).ok_or_else(|| {
                            S3Error::new(
                                Code::InvalidRequest,
                                format!("The trailing header {name} was declared but not sent."),
                            )
                        })?;
                        Checksum::from_base64(algorithm, text).ok_or_else(|| {
                            S3Error::new(
                                Code::InvalidRequest,
                                format!("Value for {name} trailing header is invalid."),
                            )
                        })?
                    }
                };
                let got = h.finish();
                if got != want {
                    return Err(S3Error::new(
                        Code::BadDigest,
                        format!(
                            "The {} you specified did not match the calculated checksum.",
                            algorithm.as_str()
                        ),
                    ));
                }
                Some(got)
            }
        };
        Ok(BodyDigests {
            md5,
            checksum,
            size_bytes: self.size_bytes,
        })
    }
}

/// The lowercased names in `x-amz-trailer` (comma-separated, possibly
/// repeated).
pub(crate) fn trailer_names(headers: &HeaderMap) -> Result<Vec<String>, S3Error> {
    let mut names = Vec::new();
    for value in headers.get_all("x-amz-trailer") {
        let text = value
            .to_str()
            .map_err(|_| S3Error::new(Code::InvalidRequest, "The x-amz-trailer header is not ASCII."))?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            names.push(name.to_ascii_lowercase());
        }
    }
    if names.len() > crate::chunked::MAX_TRAILERS {
        return Err(S3Error::new(
            Code::InvalidRequest,
            "The x-amz-trailer header names too many trailers.",
        ));
    }
    Ok(names)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, S3Error> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| S3Error::new(Code::InvalidArgument, format!("The {name} header is not ASCII."))),
    }
}

/// The algorithm a CreateMultipartUpload asks its parts to carry
/// (`x-amz-checksum-algorithm`), if any.
pub fn upload_checksum_algorithm(headers: &HeaderMap) -> Result<Option<ChecksumAlgorithm>, S3Error> {
    match header_str(headers, "x-amz-checksum-algorithm")? {
        None => Ok(None),
        Some(text) => ChecksumAlgorithm::parse(text)
            .map(Some)
            .ok_or_else(|| S3Error::new(Code::InvalidRequest, "Checksum algorithm provided is unsupported.")),
    }
}

/// Whether a GET or HEAD asks for the stored checksum
/// (`x-amz-checksum-mode: ENABLED`).
pub fn checksum_mode_enabled(headers: &HeaderMap) -> bool {
    headers
        .get("x-amz-checksum-mode")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("ENABLED"))
}

/// The ETag of a multipart object, unquoted: the MD5 of the parts' MD5s,
/// then `-` and the number of parts.
pub fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut h = md5::Md5::new();
    for m in part_md5s {
        h.update(m);
    }
    format!("{}-{}", hex(&h.finalize()), part_md5s.len())
}

/// The composite checksum of a multipart object as S3 writes it: the
/// checksum of the parts' raw checksums, base64, then `-` and the number of
/// parts. `None` if a part's checksum is of another algorithm.
pub fn composite_checksum(algorithm: ChecksumAlgorithm, parts: &[Checksum]) -> Option<String> {
    let mut h = Hasher::new(algorithm);
    for p in parts {
        if p.algorithm != algorithm {
            return None;
        }
        h.update(&p.value);
    }
    Some(format!("{}-{}", h.finish().to_base64(), parts.len()))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const CHECK: &[u8] = b"123456789";

    #[test]
    fn algorithms_match_their_check_values() {
        let hexed = |a| hex(&Checksum::of(a, CHECK).value);
        assert_eq!(hexed(ChecksumAlgorithm::Crc32), "cbf43926");
        assert_eq!(hexed(ChecksumAlgorithm::Crc32c), "e3069283");
        assert_eq!(hexed(ChecksumAlgorithm::Crc64Nvme), "ae8b14860a799888");
        assert_eq!(
            hexed(ChecksumAlgorithm::Sha1),
            "f7c3bc1d808e04732adf679965ccc34ca7ae3441"
        );
        assert_eq!(
            hexed(ChecksumAlgorithm::Sha256),
            "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for a in ChecksumAlgorithm::ALL {
            let mut h = Hasher::new(a);
            for piece in data.chunks(777) {
                h.update(piece);
            }
            assert_eq!(h.finish(), Checksum::of(a, &data), "{a:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for a in ChecksumAlgorithm::ALL {
            assert_eq!(ChecksumAlgorithm::parse(&a.as_str().to_lowercase()), Some(a));
            assert_eq!(ChecksumAlgorithm::from_header_name(a.header_name()), Some(a));
            assert_eq!(ChecksumAlgorithm::from_xml_element(a.xml_element()), Some(a));
        }
        assert_eq!(ChecksumAlgorithm::parse("MD5"), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn run(pairs: &[(&'static str, &str)], body: &[u8], trailers: Option<&Trailers>) -> Result<BodyDigests, S3Error> {
        let mut checks = BodyChecks::from_headers(&headers(pairs))?;
        for piece in body.chunks(3) {
            checks.update(piece);
        }
        checks.finish(trailers)
    }

    #[test]
    fn a_plain_body_gets_its_md5_etag() {
        let d = run(&[], b"hello", None).unwrap();
        assert_eq!(d.etag().as_deref(), Some("5d41402abc4b2a76b9719d911017c592"));
        let mut fast = BodyChecks::from_headers(&HeaderMap::new()).unwrap().without_md5();
        fast.update(b"hello");
        assert_eq!(fast.finish(None).unwrap().md5, None);
        // Content-MD5 keeps the MD5 on.
        let good = B64.encode(md5::Md5::digest(b"hello"));
        let mut kept = BodyChecks::from_headers(&headers(&[("content-md5", &good)]))
            .unwrap()
            .without_md5();
        kept.update(b"hellO");
        assert_eq!(kept.finish(None).unwrap_err().code, Code::BadDigest);
        assert_eq!(d.size_bytes, 5);
        assert_eq!(d.checksum, None);
    }

    #[test]
    fn content_md5_good_bad_and_invalid() {
        let good = B64.encode(md5::Md5::digest(b"hello"));
        assert!(run(&[("content-md5", &good)], b"hello", None).is_ok());
        let err = run(&[("content-md5", &good)], b"hellO", None).unwrap_err();
        assert_eq!(err.code, Code::BadDigest);
        assert_eq!(err.detail("ExpectedDigest"), Some(good.as_str()));
        assert_eq!(
            run(&[("content-md5", "AAAA")], b"", None).unwrap_err().code,
            Code::InvalidDigest
        );
        assert_eq!(
            run(&[("content-md5", "!!")], b"", None).unwrap_err().code,
            Code::InvalidDigest
        );
    }

    #[test]
    fn content_sha256_is_checked_when_it_is_a_hash() {
        let good = hex(&sha2::Sha256::digest(b"body"));
        assert!(run(&[("x-amz-content-sha256", &good)], b"body", None).is_ok());
        let err = run(&[("x-amz-content-sha256", &good)], b"bodY", None).unwrap_err();
        assert_eq!(err.code, Code::XAmzContentSHA256Mismatch);
        assert_eq!(err.detail("ClientComputedContentSHA256"), Some(good.as_str()));
        assert!(run(&[("x-amz-content-sha256", "UNSIGNED-PAYLOAD")], b"x", None).is_ok());
        assert!(
            run(
                &[("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")],
                b"x",
                None
            )
            .is_ok()
        );
        assert_eq!(
            run(&[("x-amz-content-sha256", "abc")], b"", None).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn header_checksums() {
        let crc = Checksum::of(ChecksumAlgorithm::Crc32, b"data").to_base64();
        let d = run(
            &[
                ("x-amz-checksum-crc32", &crc),
                ("x-amz-sdk-checksum-algorithm", "crc32"),
            ],
            b"data",
            None,
        )
        .unwrap();
        assert_eq!(d.checksum.unwrap().to_base64(), crc);
        let err = run(&[("x-amz-checksum-crc32", &crc)], b"date", None).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (
                Code::BadDigest,
                "The CRC32 you specified did not match the calculated checksum."
            )
        );
        let code = |pairs: &[(&'static str, &str)]| run(pairs, b"data", None).unwrap_err().code;
        assert_eq!(code(&[("x-amz-checksum-crc32", "notbase64!")]), Code::InvalidRequest);
        assert_eq!(code(&[("x-amz-checksum-crc32", "AAAAAAAA")]), Code::InvalidRequest);
        assert_eq!(code(&[("x-amz-checksum-md5", "AAAA")]), Code::InvalidRequest);
        let sha = Checksum::of(ChecksumAlgorithm::Sha1, b"data").to_base64();
        assert_eq!(
            code(&[("x-amz-checksum-crc32", &crc), ("x-amz-checksum-sha1", &sha)]),
            Code::InvalidRequest
        );
        assert_eq!(code(&[("x-amz-sdk-checksum-algorithm", "CRC32")]), Code::InvalidRequest);
        assert_eq!(
            code(&[("x-amz-checksum-crc32", &crc), ("x-amz-sdk-checksum-algorithm", "SHA1")]),
            Code::InvalidRequest
        );
        assert_eq!(
            code(&[("x-amz-checksum-crc32", &crc), ("x-amz-sdk-checksum-algorithm", "XX")]),
            Code::InvalidRequest
        );
        // Headers that are not values are ignored.
        assert!(
            run(
                &[("x-amz-checksum-mode", "ENABLED"), ("x-amz-checksum-type", "COMPOSITE")],
                b"",
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn trailer_checksums() {
        let crc = Checksum::of(ChecksumAlgorithm::Crc64Nvme, b"data");
        let declared = [("x-amz-trailer", "x-amz-checksum-crc64nvme")];
        let good = Trailers::from_pairs(vec![("x-amz-checksum-crc64nvme".into(), crc.to_base64())]);
        assert_eq!(run(&declared, b"data", Some(&good)).unwrap().checksum, Some(crc));
        let err = run(&declared, b"dat", Some(&good)).unwrap_err();
        assert_eq!(err.code, Code::BadDigest);
        assert!(err.message.contains("CRC64NVME"));
        assert_eq!(run(&declared, b"data", None).unwrap_err().code, Code::InvalidRequest);
        let garbled = Trailers::from_pairs(vec![("x-amz-checksum-crc64nvme".into(), "xx".into())]);
        assert_eq!(
            run(&declared, b"data", Some(&garbled)).unwrap_err().code,
            Code::InvalidRequest
        );
        let both = [
            ("x-amz-trailer", "x-amz-checksum-crc32"),
            ("x-amz-checksum-crc32", "AAAAAA=="),
        ];
        assert_eq!(run(&both, b"", None).unwrap_err().code, Code::InvalidRequest);
        let unknown = [("x-amz-trailer", "x-amz-checksum-md5")];
        assert_eq!(run(&unknown, b"", None).unwrap_err().code, Code::InvalidRequest);
    }

    #[test]
    fn multipart_etag_and_composite() {
        let a: [u8; 16] = md5::Md5::digest(b"a").into();
        let b: [u8; 16] = md5::Md5::digest(b"b").into();
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        assert_eq!(multipart_etag(&[a, b]), format!("{}-2", hex(&md5::Md5::digest(&cat))));
        let parts = [
            Checksum::of(ChecksumAlgorithm::Sha256, b"a"),
            Checksum::of(ChecksumAlgorithm::Sha256, b"b"),
        ];
        let mut cat = parts[0].value.clone();
        cat.extend_from_slice(&parts[1].value);
        assert_eq!(
            composite_checksum(ChecksumAlgorithm::Sha256, &parts).unwrap(),
            format!("{}-2", Checksum::of(ChecksumAlgorithm::Sha256, &cat).to_base64())
        );
        assert_eq!(composite_checksum(ChecksumAlgorithm::Crc32, &parts), None);
    }

    #[test]
    fn upload_algorithm_and_mode() {
        assert_eq!(
            upload_checksum_algorithm(&headers(&[("x-amz-checksum-algorithm", "CRC32C")])).unwrap(),
            Some(ChecksumAlgorithm::Crc32c)
        );
        assert_eq!(upload_checksum_algorithm(&headers(&[])).unwrap(), None);
        assert_eq!(
            upload_checksum_algorithm(&headers(&[("x-amz-checksum-algorithm", "MD5")]))
                .unwrap_err()
                .code,
            Code::InvalidRequest
        );
        assert!(checksum_mode_enabled(&headers(&[("x-amz-checksum-mode", "enabled")])));
        assert!(!checksum_mode_enabled(&headers(&[])));
    }
}
