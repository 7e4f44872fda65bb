//! The whole protocol path a server takes, driven by the crate's own client
//! signer: parse the head, verify the signature, decode the body, check it,
//! answer. `receive` is the order the daemon follows.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri};
use kvtier_s3::checksum::{Checksum, ChecksumAlgorithm, multipart_etag};
use kvtier_s3::chunked::encode;
use kvtier_s3::request::{Addressing, Conditions, parse, parse_range};
use kvtier_s3::sigv4::{
    EMPTY_SHA256, STREAMING_PAYLOAD_TRAILER, STREAMING_UNSIGNED_PAYLOAD_TRAILER, UNSIGNED_PAYLOAD, hex,
};
use kvtier_s3::xml::{self, DeleteResult};
use kvtier_s3::{BodyChecks, BodyDigests, ChunkedDecoder, Code, Op, S3Error, Signer, Verifier};

const AKID: &str = "kvtier-test";
const SECRET: &str = "kvtier-secret/with+odd=chars";
const ENDPOINT: &str = "http://127.0.0.1:9000";

fn now() -> SystemTime {
    kvtier_s3::time::parse_amz_datetime("20250101T120000Z").unwrap()
}

fn lookup(access_key: &str) -> Option<String> {
    (access_key == AKID).then(|| SECRET.to_owned())
}

struct Received {
    op: Op,
    body: Vec<u8>,
    digests: BodyDigests,
}

/// A server's handling of one request, in the order the crate expects.
fn receive(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    raw_body: &[u8],
    piece_bytes: usize,
) -> Result<Received, S3Error> {
    let op = parse(method, uri, headers, &Addressing::default())?;
    let verified = Verifier::default().verify(method, uri, headers, &lookup, now())?;
    let Some(verified) = verified else {
        return Err(S3Error::from_code(Code::AccessDenied));
    };
    let mut decoder = ChunkedDecoder::from_request(headers, Some(&verified.payload))?;
    let mut checks = BodyChecks::from_headers(headers)?;
    let mut body = Vec::new();
    for piece in raw_body.chunks(piece_bytes.max(1)) {
        match &mut decoder {
            Some(d) => {
                let start = body.len();
                d.feed(piece, &mut body)?;
                checks.update(&body[start..]);
            }
            None => {
                body.extend_from_slice(piece);
                checks.update(piece);
            }
        }
    }
    let trailers = match decoder {
        Some(d) => Some(d.finish()?),
        None => None,
    };
    let digests = checks.finish(trailers.as_ref())?;
    Ok(Received { op, body, digests })
}

fn signed(method: Method, path: &str, extra: &[(&'static str, &str)], payload: &str) -> (Uri, HeaderMap, Signer) {
    let uri: Uri = format!("{ENDPOINT}{path}").parse().unwrap();
    let mut headers = HeaderMap::new();
    for (n, v) in extra {
        headers.insert(*n, HeaderValue::from_str(v).unwrap());
    }
    let signer = Signer::new(AKID, SECRET, "kvtier");
    signer.sign(&method, &uri, &mut headers, payload, now()).unwrap();
    (uri, headers, signer)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 251) as u8).collect()
}

#[test]
fn a_signed_streaming_put_with_a_checksum_trailer() {
    let body = data(300_000);
    let crc = Checksum::of(ChecksumAlgorithm::Crc64Nvme, &body);
    let uri: Uri = format!("{ENDPOINT}/bucket/dir/object%20one").parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("content-encoding", HeaderValue::from_static("aws-chunked"));
    headers.insert(
        "x-amz-decoded-content-length",
        HeaderValue::from_str(&body.len().to_string()).unwrap(),
    );
    headers.insert("x-amz-trailer", HeaderValue::from_static("x-amz-checksum-crc64nvme"));
    let mut signed = Signer::new(AKID, SECRET, "kvtier")
        .sign(&Method::PUT, &uri, &mut headers, STREAMING_PAYLOAD_TRAILER, now())
        .unwrap();
    let raw = encode(
        &body,
        65_536,
        Some(&mut signed.chunk_signer),
        &[("x-amz-checksum-crc64nvme".into(), crc.to_base64())],
    );
    for piece in [1000, 65_536, raw.len()] {
        let got = receive(&Method::PUT, &uri, &headers, &raw, piece).unwrap();
        assert_eq!(
            got.op,
            Op::PutObject {
                bucket: "bucket".into(),
                key: "dir/object one".into()
            }
        );
        assert_eq!(got.body, body);
        assert_eq!(got.digests.checksum.as_ref(), Some(&crc));
        assert_eq!(got.digests.size_bytes, 300_000);
    }
    // One flipped data byte: the chunk signature catches it.
    let mut flipped = raw.clone();
    flipped[70_000] ^= 1;
    assert_eq!(
        receive(&Method::PUT, &uri, &headers, &flipped, 4096)
            .err()
            .map(|e| e.code),
        Some(Code::SignatureDoesNotMatch)
    );
    // A truncated body is incomplete.
    assert_eq!(
        receive(&Method::PUT, &uri, &headers, &raw[..raw.len() - 10], 4096)
            .err()
            .map(|e| e.code),
        Some(Code::IncompleteBody)
    );
}

#[test]
fn an_unsigned_trailer_put_checks_its_checksum() {
    let body = data(50_000);
    let crc = Checksum::of(ChecksumAlgorithm::Crc32, &body).to_base64();
    let length = body.len().to_string();
    let pairs = [
        ("content-encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", length.as_str()),
        ("x-amz-trailer", "x-amz-checksum-crc32"),
        ("x-amz-sdk-checksum-algorithm", "CRC32"),
    ];
    let (uri, headers, _) = signed(Method::PUT, "/bucket/k", &pairs, STREAMING_UNSIGNED_PAYLOAD_TRAILER);
    let raw = encode(&body, 8000, None, &[("x-amz-checksum-crc32".into(), crc.clone())]);
    assert_eq!(receive(&Method::PUT, &uri, &headers, &raw, 777).unwrap().body, body);
    let wrong = encode(&body, 8000, None, &[("x-amz-checksum-crc32".into(), "AAAAAA==".into())]);
    let err = receive(&Method::PUT, &uri, &headers, &wrong, 777).err().unwrap();
    assert_eq!(err.code, Code::BadDigest);
}

#[test]
fn a_single_chunk_put_is_bound_to_its_hash() {
    let body = b"hello, kvtier".to_vec();
    let hash = hex(&<sha2::Sha256 as sha2::Digest>::digest(&body));
    let (uri, headers, _) = signed(Method::PUT, "/bucket/k", &[("content-type", "text/plain")], &hash);
    let got = receive(&Method::PUT, &uri, &headers, &body, 4).unwrap();
    assert_eq!(got.digests.etag(), Some(hex(&<md5::Md5 as md5::Digest>::digest(&body))));
    let err = receive(&Method::PUT, &uri, &headers, b"hello, kvtieR", 4)
        .err()
        .unwrap();
    assert_eq!(err.code, Code::XAmzContentSHA256Mismatch);
    // Unsigned payloads are taken as they come.
    let (uri, headers, _) = signed(Method::PUT, "/bucket/k", &[], UNSIGNED_PAYLOAD);
    assert!(receive(&Method::PUT, &uri, &headers, b"anything", 3).is_ok());
}

#[test]
fn a_presigned_get_with_range_and_conditions() {
    let signer = Signer::new(AKID, SECRET, "kvtier");
    let uri: Uri = format!("{ENDPOINT}/bucket/k").parse().unwrap();
    let url = signer
        .presign(&Method::GET, &uri, None, Duration::from_secs(3600), now())
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("range", HeaderValue::from_static("bytes=-5"));
    headers.insert("if-none-match", HeaderValue::from_static("\"other\""));
    let op = parse(&Method::GET, &url, &headers, &Addressing::default()).unwrap();
    assert!(matches!(op, Op::GetObject { ref key, .. } if key == "k"));
    let v = Verifier::default()
        .verify(&Method::GET, &url, &headers, &lookup, now())
        .unwrap()
        .unwrap();
    assert!(v.presigned);
    assert_eq!(
        parse_range(headers.get("range").and_then(|r| r.to_str().ok()), 100).unwrap(),
        Some((95, 99))
    );
    assert!(Conditions::from_headers(&headers).check_read("\"etag\"", now()).is_ok());
    let later = now() + Duration::from_secs(3601);
    let err = Verifier::default()
        .verify(&Method::GET, &url, &headers, &lookup, later)
        .unwrap_err();
    assert_eq!(err.code, Code::AccessDenied);
}

#[test]
fn a_multipart_upload_from_create_to_complete() {
    let (uri, headers, _) = signed(
        Method::POST,
        "/bucket/big?uploads",
        &[("x-amz-checksum-algorithm", "SHA256")],
        EMPTY_SHA256,
    );
    let got = receive(&Method::POST, &uri, &headers, b"", 1).unwrap();
    assert_eq!(
        got.op,
        Op::CreateMultipartUpload {
            bucket: "bucket".into(),
            key: "big".into()
        }
    );
    let reply = xml::initiate_multipart_upload("bucket", "big", "up-1");
    assert!(reply.contains("<UploadId>up-1</UploadId>"));

    let mut md5s = Vec::new();
    let mut complete = String::from("<CompleteMultipartUpload>");
    for n in 1..=3u32 {
        let part = data(10_000 + n as usize);
        let sha = Checksum::of(ChecksumAlgorithm::Sha256, &part).to_base64();
        let (uri, headers, _) = signed(
            Method::PUT,
            &format!("/bucket/big?partNumber={n}&uploadId=up-1"),
            &[("x-amz-checksum-sha256", &sha)],
            UNSIGNED_PAYLOAD,
        );
        let got = receive(&Method::PUT, &uri, &headers, &part, 999).unwrap();
        assert!(matches!(got.op, Op::UploadPart { part_number, .. } if part_number == n));
        md5s.push(got.digests.md5.unwrap());
        complete.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag><ChecksumSHA256>{sha}</ChecksumSHA256></Part>",
            got.digests.etag().unwrap()
        ));
    }
    complete.push_str("</CompleteMultipartUpload>");
    let (uri, headers, _) = signed(Method::POST, "/bucket/big?uploadId=up-1", &[], UNSIGNED_PAYLOAD);
    let got = receive(&Method::POST, &uri, &headers, complete.as_bytes(), 100).unwrap();
    assert!(matches!(got.op, Op::CompleteMultipartUpload { ref upload_id, .. } if upload_id == "up-1"));
    let parts = xml::parse_complete_multipart_upload(&got.body).unwrap();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().zip(&md5s).all(|(p, m)| p.etag == hex(m)));
    assert!(multipart_etag(&md5s).ends_with("-3"));
}

#[test]
fn delete_objects_round_trip() {
    let body = b"<Delete><Object><Key>a</Key></Object><Object><Key>b&amp;c</Key></Object></Delete>";
    let md5 = base64_md5(body);
    let (uri, headers, _) = signed(
        Method::POST,
        "/bucket?delete",
        &[("content-md5", &md5)],
        UNSIGNED_PAYLOAD,
    );
    let got = receive(&Method::POST, &uri, &headers, body, 10).unwrap();
    assert_eq!(
        got.op,
        Op::DeleteObjects {
            bucket: "bucket".into()
        }
    );
    let request = xml::parse_delete(&got.body).unwrap();
    let result = DeleteResult {
        deleted: request.keys,
        errors: vec![],
    };
    assert!(xml::delete_result(&result, request.quiet).contains("<Deleted><Key>b&amp;c</Key></Deleted>"));
    let err = receive(&Method::POST, &uri, &headers, b"<Delete/>", 10).err().unwrap();
    assert_eq!(err.code, Code::BadDigest);
}

fn base64_md5(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(<md5::Md5 as md5::Digest>::digest(data))
}
