//! `aws-chunked`, the body encoding of streaming uploads: an incremental
//! decoder that checks the framing, the declared length and (when signed)
//! every chunk's signature and the trailers', and an encoder for clients.
//!
//! The body is a series of `hex-size[;chunk-signature=sig]\r\n` + data +
//! `\r\n`, a final chunk of size 0, then trailer lines (`name:value`) and an
//! empty line. The decoder is fed slices of any size and never buffers more
//! than one header or trailer line: a chunk's claimed size is only a count
//! of bytes still to come, so a huge size on a small body is an error when
//! the body ends, never an allocation.
//!
//! A chunk's data is handed out before its signature can be checked (the
//! signature covers all of it), so a server must not make a body visible
//! before [`ChunkedDecoder::finish`] returns `Ok`.

use bytes::Bytes;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::checksum::trailer_names;
use crate::error::{Code, S3Error};
use crate::sigv4::{ChunkSigner, Payload, STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER, is_signature};

/// The most trailers one body may declare and carry.
pub const MAX_TRAILERS: usize = 16;

/// Bounds on one body's framing.
#[derive(Debug, Clone, Copy)]
pub struct ChunkedLimits {
    /// The longest chunk-header or trailer line, its CRLF included.
    pub max_line_bytes: usize,
    /// The most bytes of trailer lines together.
    pub max_trailer_bytes: usize,
    /// The smallest signed chunk but the last, as S3 requires
    /// (`InvalidChunkSizeError` below). Unsigned chunks may be of any size:
    /// SDKs send them as their body frames come.
    pub min_signed_chunk_bytes: u64,
}

impl Default for ChunkedLimits {
    fn default() -> Self {
        ChunkedLimits {
            max_line_bytes: 4096,
            max_trailer_bytes: 16 << 10,
            min_signed_chunk_bytes: 8192,
        }
    }
}

/// The trailers of a body: lowercase names and trimmed values, in the order
/// sent, without `x-amz-trailer-signature`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trailers(Vec<(String, String)>);

impl Trailers {
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Trailers {
        Trailers(pairs)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a decoder is for one body.
#[derive(Debug, Clone)]
pub struct ChunkedConfig {
    /// `x-amz-decoded-content-length`: the data bytes the chunks must carry.
    pub decoded_length_bytes: u64,
    /// The signature chain, for signed streaming bodies.
    pub chain: Option<ChunkSigner>,
    /// Whether the trailers carry `x-amz-trailer-signature` (signed
    /// streaming with trailers).
    pub signed_trailer: bool,
    /// The lowercase trailer names of `x-amz-trailer`: each must come, and no
    /// other.
    pub trailer_names: Vec<String>,
    pub limits: ChunkedLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Data,
    DataCr,
    DataLf,
    Trailers,
    Done,
}

/// The incremental decoder.
#[derive(Debug)]
pub struct ChunkedDecoder {
    config: ChunkedConfig,
    state: State,
    line: Vec<u8>,
    decoded_bytes: u64,
    chunk_left_bytes: u64,
    chunk_bytes: u64,
    previous_chunk_bytes: Option<u64>,
    chunks_verified: u64,
    chunk_signature: Option<String>,
    chunk_hash: Sha256,
    trailers: Vec<(String, String)>,
    trailer_signature: Option<String>,
    trailer_bytes: usize,
    blank_skipped: bool,
    failed: Option<S3Error>,
}

impl ChunkedDecoder {
    pub fn new(config: ChunkedConfig) -> ChunkedDecoder {
        ChunkedDecoder {
            config,
            state: State::Header,
            line: Vec::new(),
            decoded_bytes: 0,
            chunk_left_bytes: 0,
            chunk_bytes: 0,
            previous_chunk_bytes: None,
            chunks_verified: 0,
            chunk_signature: None,
            chunk_hash: Sha256::new(),
            trailers: Vec::new(),
            trailer_signature: None,
            trailer_bytes: 0,
            blank_skipped: false,
            failed: None,
        }
    }

    /// The decoder a request needs, if its body is aws-chunked
    /// (`Content-Encoding: aws-chunked`, or an `x-amz-content-sha256` of
    /// `STREAMING-*`). `payload` is what the signature verification found;
    /// a signed streaming body without it (an anonymous or presigned
    /// request) is refused, since its chunks could not be checked.
    pub fn from_request(headers: &HeaderMap, payload: Option<&Payload>) -> Result<Option<ChunkedDecoder>, S3Error> {
        let content_sha256 = headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let encoded = has_aws_chunked(headers) || content_sha256.is_some_and(|v| v.starts_with("STREAMING-"));
        if !encoded {
            return Ok(None);
        }
        let decoded_length_bytes = match headers.get("x-amz-decoded-content-length") {
            None => {
                return Err(S3Error::new(
                    Code::MissingContentLength,
                    "You must provide the x-amz-decoded-content-length header with an aws-chunked body.",
                ));
            }
            Some(v) => v
                .to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    S3Error::new(
                        Code::InvalidArgument,
                        "x-amz-decoded-content-length must be a number of bytes.",
                    )
                })?,
        };
        let (chain, signed_trailer) = match (payload, content_sha256) {
            (Some(Payload::Streaming(chain)), _) => (Some(chain.clone()), false),
            (Some(Payload::StreamingTrailer(chain)), _) => (Some(chain.clone()), true),
            (_, Some(STREAMING_PAYLOAD | STREAMING_PAYLOAD_TRAILER)) => {
                return Err(S3Error::new(
                    Code::InvalidRequest,
                    "A signed aws-chunked body needs a request signed with the Authorization header.",
                ));
            }
            (Some(Payload::Sha256(_)), _) => {
                return Err(S3Error::new(
                    Code::InvalidRequest,
                    "An aws-chunked body needs a STREAMING-* or UNSIGNED-PAYLOAD x-amz-content-sha256.",
                ));
            }
            // STREAMING-UNSIGNED-PAYLOAD-TRAILER, UNSIGNED-PAYLOAD, or none.
            _ => (None, false),
        };
        Ok(Some(ChunkedDecoder::new(ChunkedConfig {
            decoded_length_bytes,
            chain,
            signed_trailer,
            trailer_names: trailer_names(headers)?,
            limits: ChunkedLimits::default(),
        })))
    }

    /// Data bytes decoded so far.
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded_bytes
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes the next slice of the raw body, appending data to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), S3Error> {
        self.run(input, &mut |start, end| out.extend_from_slice(&input[start..end]))
    }

    /// Decodes the next slice of the raw body, pushing the data as slices of
    /// `input` (no copy).
    pub fn feed_bytes(&mut self, input: &Bytes, out: &mut Vec<Bytes>) -> Result<(), S3Error> {
        self.run(input, &mut |start, end| out.push(input.slice(start..end)))
    }

    /// Ends the body: it must have been complete. Returns the trailers.
    pub fn finish(mut self) -> Result<Trailers, S3Error> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        // Some clients end the trailers without the final empty line.
        if self.state == State::Trailers
            && self.line.is_empty()
            && (!self.trailers.is_empty() || self.trailer_signature.is_some())
        {
            self.end_trailers()?;
        }
        if self.state != State::Done {
            return Err(S3Error::new(
                Code::IncompleteBody,
                format!(
                    "The aws-chunked body ended early, after {} of its {} data bytes.",
                    self.decoded_bytes, self.config.decoded_length_bytes
                ),
            ));
        }
        Ok(Trailers(self.trailers))
    }

    fn run(&mut self, input: &[u8], emit: &mut dyn FnMut(usize, usize)) -> Result<(), S3Error> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.step(input, emit);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    fn step(&mut self, input: &[u8], emit: &mut dyn FnMut(usize, usize)) -> Result<(), S3Error> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Header | State::Trailers => {
                    let rest = &input[pos..];
                    let room = self.config.limits.max_line_bytes - self.line.len();
                    match rest.iter().take(room).position(|&b| b == b'\n') {
                        Some(at) => {
                            self.line.extend_from_slice(&rest[..=at]);
                            pos += at + 1;
                            let line = std::mem::take(&mut self.line);
                            if self.state == State::Header {
                                self.header_line(&line)?;
                            } else {
                                self.trailer_line(&line)?;
                            }
                        }
                        None if rest.len() < room => {
                            self.line.extend_from_slice(rest);
                            pos = input.len();
                        }
                        None => {
                            return Err(malformed(format!(
                                "a chunk header or trailer line is over {} bytes",
                                self.config.limits.max_line_bytes
                            )));
                        }
                    }
                }
                State::Data => {
                    let take = (input.len() - pos).min(usize::try_from(self.chunk_left_bytes).unwrap_or(usize::MAX));
                    let data = &input[pos..pos + take];
                    if self.config.chain.is_some() {
                        self.chunk_hash.update(data);
                    }
                    emit(pos, pos + take);
                    pos += take;
                    self.chunk_left_bytes -= take as u64;
                    self.decoded_bytes += take as u64;
                    if self.chunk_left_bytes == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr | State::DataLf => {
                    let want = if self.state == State::DataCr { b'\r' } else { b'\n' };
                    if input[pos] != want {
                        return Err(malformed("a chunk's data is not followed by CRLF"));
                    }
                    pos += 1;
                    if self.state == State::DataCr {
                        self.state = State::DataLf;
                    } else {
                        self.verify_chunk()?;
                        self.state = State::Header;
                    }
                }
                State::Done => {
                    return Err(malformed("data after the end of the aws-chunked body"));
                }
            }
        }
        Ok(())
    }

    fn header_line(&mut self, line: &[u8]) -> Result<(), S3Error> {
        let line = line
            .strip_suffix(b"\r\n")
            .ok_or_else(|| malformed("a chunk header does not end with CRLF"))?;
        let line = std::str::from_utf8(line).map_err(|_| malformed("a chunk header is not ASCII"))?;
        let mut parts = line.split(';');
        let size_text = parts.next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 16 || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(format!("the chunk size '{size_text}' is not hex")));
        }
        let size = u64::from_str_radix(size_text, 16).map_err(|_| malformed("the chunk size is not hex"))?;
        let mut signature = None;
        for ext in parts {
            let (name, value) = ext.split_once('=').unwrap_or((ext, ""));
            if name.trim() == "chunk-signature" && signature.replace(value.trim().to_owned()).is_some() {
                return Err(malformed("a chunk header has two signatures"));
            }
        }
        if self.config.chain.is_some() {
            match &signature {
                Some(s) if is_signature(s) => {}
                Some(_) => return Err(signature_mismatch("a chunk signature is not 64 lowercase hex digits")),
                None => return Err(signature_mismatch("a chunk of a signed body has no chunk-signature")),
            }
            if size > 0
                && let Some(previous) = self.previous_chunk_bytes
                && previous < self.config.limits.min_signed_chunk_bytes
            {
                return Err(S3Error::from_code(Code::InvalidChunkSizeError)
                    .with_detail("Chunk", self.chunks_verified.to_string())
                    .with_detail("BadChunkSize", previous.to_string()));
            }
        }
        let left = self.config.decoded_length_bytes - self.decoded_bytes;
        if size > left {
            return Err(malformed(format!(
                "the chunks carry more than the {} bytes of x-amz-decoded-content-length",
                self.config.decoded_length_bytes
            )));
        }
        self.chunk_signature = signature;
        self.chunk_bytes = size;
        self.chunk_left_bytes = size;
        self.chunk_hash = Sha256::new();
        if size > 0 {
            self.state = State::Data;
            return Ok(());
        }
        // The final chunk: no data, its signature covers the empty string.
        self.verify_chunk()?;
        if self.decoded_bytes != self.config.decoded_length_bytes {
            return Err(S3Error::new(
                Code::IncompleteBody,
                format!(
                    "The chunks carry {} bytes but x-amz-decoded-content-length is {}.",
                    self.decoded_bytes, self.config.decoded_length_bytes
                ),
            ));
        }
        self.state = State::Trailers;
        Ok(())
    }

    fn verify_chunk(&mut self) -> Result<(), S3Error> {
        let hash: [u8; 32] = std::mem::take(&mut self.chunk_hash).finalize().into();
        if let Some(chain) = &mut self.config.chain {
            let claimed = self.chunk_signature.take().unwrap_or_default();
            if !chain.verify_chunk(&hash, &claimed) {
                return Err(signature_mismatch("a chunk's signature does not match its data"));
            }
        }
        self.previous_chunk_bytes = Some(self.chunk_bytes);
        self.chunks_verified += 1;
        Ok(())
    }

    fn trailer_line(&mut self, line: &[u8]) -> Result<(), S3Error> {
        self.trailer_bytes += line.len();
        if self.trailer_bytes > self.config.limits.max_trailer_bytes {
            return Err(bad_trailer(format!(
                "the trailers are over {} bytes",
                self.config.limits.max_trailer_bytes
            )));
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // One empty line may stand between the final chunk and the
            // trailers (some clients end the final chunk with CRLF first).
            let nothing_yet = self.trailers.is_empty() && self.trailer_signature.is_none();
            let expecting = !self.config.trailer_names.is_empty() || self.config.signed_trailer;
            if nothing_yet && expecting && !self.blank_skipped {
                self.blank_skipped = true;
                return Ok(());
            }
            return self.end_trailers();
        }
        let line = std::str::from_utf8(line).map_err(|_| bad_trailer("a trailer is not UTF-8"))?;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad_trailer("a trailer is not of the form name:value"))?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_owned();
        if name == "x-amz-trailer-signature" {
            if !self.config.signed_trailer {
                return Err(bad_trailer(
                    "x-amz-trailer-signature in a body whose trailers are not signed",
                ));
            }
            if self.trailer_signature.replace(value).is_some() {
                return Err(bad_trailer("x-amz-trailer-signature given twice"));
            }
            return Ok(());
        }
        if self.trailer_signature.is_some() {
            return Err(bad_trailer("a trailer after x-amz-trailer-signature"));
        }
        if !self.config.trailer_names.contains(&name) {
            return Err(bad_trailer(format!(
                "the trailer {name} was not declared in x-amz-trailer"
            )));
        }
        if self.trailers.iter().any(|(n, _)| *n == name) {
            return Err(bad_trailer(format!("the trailer {name} is given twice")));
        }
        self.trailers.push((name, value));
        Ok(())
    }

    fn end_trailers(&mut self) -> Result<(), S3Error> {
        for name in &self.config.trailer_names {
            if !self.trailers.iter().any(|(n, _)| n == name) {
                return Err(bad_trailer(format!(
                    "the trailer {name} declared in x-amz-trailer was not sent"
                )));
            }
        }
        if self.config.signed_trailer {
            let claimed = self
                .trailer_signature
                .take()
                .ok_or_else(|| signature_mismatch("the trailers of a signed body have no x-amz-trailer-signature"))?;
            let chain = self
                .config
                .chain
                .as_mut()
                .ok_or_else(|| signature_mismatch("signed trailers need a signed body"))?;
            if !chain.verify_trailer(&self.trailers, &claimed) {
                return Err(signature_mismatch("the trailer signature does not match the trailers"));
            }
        }
        self.state = State::Done;
        Ok(())
    }
}

fn malformed(why: impl std::fmt::Display) -> S3Error {
    S3Error::new(
        Code::InvalidRequest,
        format!("The aws-chunked body is malformed: {why}."),
    )
}

fn bad_trailer(why: impl std::fmt::Display) -> S3Error {
    S3Error::new(
        Code::MalformedTrailerError,
        format!(
            "The request contained trailing data that was not well-formed or did not conform to our published schema: {why}."
        ),
    )
}

fn signature_mismatch(why: &str) -> S3Error {
    S3Error::new(
        Code::SignatureDoesNotMatch,
        format!("The request signature we calculated does not match the signature you provided: {why}."),
    )
}

fn has_aws_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("aws-chunked"))
}

/// The `Content-Encoding` to store with an object: the request's, without
/// `aws-chunked` (which described the upload, not the object); `None` if
/// nothing is left.
pub fn stored_content_encoding(headers: &HeaderMap) -> Option<String> {
    let kept: Vec<&str> = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("aws-chunked"))
        .collect();
    (!kept.is_empty()).then(|| kept.join(","))
}

/// Encodes `body` as aws-chunked, `chunk_bytes` of data a chunk, with the
/// trailers after the final chunk: signed chunk by chunk (and the trailers
/// too) when `chain` is given, as an SDK streams a signed upload.
pub fn encode(
    body: &[u8],
    chunk_bytes: usize,
    mut chain: Option<&mut ChunkSigner>,
    trailers: &[(String, String)],
) -> Vec<u8> {
    let chunk_bytes = chunk_bytes.max(1);
    let mut out = Vec::with_capacity(body.len() + (body.len() / chunk_bytes + 2) * 100);
    let header = |out: &mut Vec<u8>, data: &[u8], chain: &mut Option<&mut ChunkSigner>| {
        out.extend_from_slice(format!("{:x}", data.len()).as_bytes());
        if let Some(chain) = chain {
            out.extend_from_slice(b";chunk-signature=");
            out.extend_from_slice(chain.sign_chunk(data).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    };
    for data in body.chunks(chunk_bytes) {
        header(&mut out, data, &mut chain);
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    header(&mut out, &[], &mut chain);
    for (name, value) in trailers {
        out.extend_from_slice(format!("{name}:{value}\r\n").as_bytes());
    }
    if !trailers.is_empty()
        && let Some(chain) = chain
    {
        out.extend_from_slice(format!("x-amz-trailer-signature:{}\r\n", chain.sign_trailer(trailers)).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::checksum::{BodyChecks, Checksum, ChecksumAlgorithm};
    use crate::sigv4::{STREAMING_UNSIGNED_PAYLOAD_TRAILER, Signer, Verifier, signing_key};
    use crate::time::parse_amz_datetime;

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const DATETIME: &str = "20130524T000000Z";
    const SCOPE: &str = "20130524/us-east-1/s3/aws4_request";

    fn chain(seed: &str) -> ChunkSigner {
        ChunkSigner::new(
            signing_key(SECRET, "20130524", "us-east-1", "s3"),
            DATETIME,
            SCOPE,
            seed,
        )
    }

    const SEED: &str = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9";
    const SIGNATURES: [&str; 3] = [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
    ];
    const TRAILER_SEED: &str = "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e";
    const TRAILER_SIGNATURES: [&str; 3] = [
        "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
        "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
        "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
    ];
    const TRAILER_SIGNATURE: &str = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435";

    /// The body of S3's chunked-upload examples: 65,536 + 1,024 bytes of 'a'.
    fn documented_body(signatures: [&str; 3], tail: &str) -> Vec<u8> {
        let mut body = format!("10000;chunk-signature={}\r\n", signatures[0]).into_bytes();
        body.extend_from_slice(&[b'a'; 65_536]);
        body.extend_from_slice(format!("\r\n400;chunk-signature={}\r\n", signatures[1]).as_bytes());
        body.extend_from_slice(&[b'a'; 1024]);
        body.extend_from_slice(format!("\r\n0;chunk-signature={}\r\n", signatures[2]).as_bytes());
        body.extend_from_slice(tail.as_bytes());
        body
    }

    fn config(chain: Option<ChunkSigner>, signed_trailer: bool, trailer_names: &[&str], length: u64) -> ChunkedConfig {
        ChunkedConfig {
            decoded_length_bytes: length,
            chain,
            signed_trailer,
            trailer_names: trailer_names.iter().map(|s| s.to_string()).collect(),
            limits: ChunkedLimits::default(),
        }
    }

    fn decode(config: ChunkedConfig, body: &[u8], split: usize) -> Result<(Vec<u8>, Trailers), S3Error> {
        let mut decoder = ChunkedDecoder::new(config);
        let mut out = Vec::new();
        for piece in body.chunks(split) {
            decoder.feed(piece, &mut out)?;
        }
        Ok((out, decoder.finish()?))
    }

    #[test]
    fn the_documented_signed_body_decodes_in_any_split() {
        // The seed and the three chunk signatures are the published ones.
        let body = documented_body(SIGNATURES, "\r\n");
        assert_eq!(body.len(), 66_824, "the documented Content-Length");
        for split in [1, 2, 7, 100, 4096, 65_536, body.len()] {
            let (data, trailers) = decode(config(Some(chain(SEED)), false, &[], 66_560), &body, split).unwrap();
            assert_eq!(data, vec![b'a'; 66_560]);
            assert!(trailers.is_empty());
        }
    }

    #[test]
    fn the_encoder_reproduces_the_documented_chunk_signatures() {
        let mut c = chain(SEED);
        assert_eq!(
            encode(&[b'a'; 66_560], 65_536, Some(&mut c), &[]),
            documented_body(SIGNATURES, "\r\n")
        );
    }

    #[test]
    fn the_documented_signed_trailer_body_decodes() {
        let trailers = [("x-amz-checksum-crc32c".to_owned(), "sOO8/Q==".to_owned())];
        let mut c = chain(TRAILER_SEED);
        let encoded = encode(&[b'a'; 66_560], 65_536, Some(&mut c), &trailers);
        let tail = format!("x-amz-checksum-crc32c:sOO8/Q==\r\nx-amz-trailer-signature:{TRAILER_SIGNATURE}\r\n");
        assert_eq!(encoded, documented_body(TRAILER_SIGNATURES, &(tail.clone() + "\r\n")));
        // With and without the final empty line, and with an empty line
        // before the trailers.
        for body in [
            documented_body(TRAILER_SIGNATURES, &(tail.clone() + "\r\n")),
            documented_body(TRAILER_SIGNATURES, &tail),
            documented_body(TRAILER_SIGNATURES, &format!("\r\n{tail}\r\n")),
        ] {
            for split in [1, 13, 65_536] {
                let cfg = config(Some(chain(TRAILER_SEED)), true, &["x-amz-checksum-crc32c"], 66_560);
                let (data, trailers) = decode(cfg, &body, split).unwrap();
                assert_eq!(data.len(), 66_560);
                assert_eq!(trailers.get("x-amz-checksum-crc32c"), Some("sOO8/Q=="));
                assert_eq!(Checksum::of(ChecksumAlgorithm::Crc32c, &data).to_base64(), "sOO8/Q==");
            }
        }
    }

    #[test]
    fn signatures_are_checked_chunk_by_chunk() {
        let code = |body: Vec<u8>| {
            decode(config(Some(chain(SEED)), false, &[], 66_560), &body, 4096)
                .unwrap_err()
                .code
        };
        let mut corrupt = documented_body(SIGNATURES, "\r\n");
        corrupt[100] = b'b';
        assert_eq!(code(corrupt), Code::SignatureDoesNotMatch);
        let mut swapped = SIGNATURES;
        swapped.swap(0, 1);
        assert_eq!(code(documented_body(swapped, "\r\n")), Code::SignatureDoesNotMatch);
        let mut wrong_final = SIGNATURES;
        wrong_final[2] = SIGNATURES[1];
        assert_eq!(code(documented_body(wrong_final, "\r\n")), Code::SignatureDoesNotMatch);
        let mut missing = b"10000\r\n".to_vec();
        missing.extend_from_slice(&[b'a'; 65_536]);
        assert_eq!(code(missing), Code::SignatureDoesNotMatch);
        // The wrong seed (another request's signature) fails the first chunk.
        let err = decode(
            config(Some(chain(TRAILER_SEED)), false, &[], 66_560),
            &documented_body(SIGNATURES, "\r\n"),
            70_000,
        );
        assert_eq!(err.unwrap_err().code, Code::SignatureDoesNotMatch);
    }

    #[test]
    fn trailer_signatures_are_checked() {
        let cfg = || config(Some(chain(TRAILER_SEED)), true, &["x-amz-checksum-crc32c"], 66_560);
        let forged = format!("x-amz-checksum-crc32c:AAAAAA==\r\nx-amz-trailer-signature:{TRAILER_SIGNATURE}\r\n\r\n");
        let err = decode(cfg(), &documented_body(TRAILER_SIGNATURES, &forged), 999).unwrap_err();
        assert_eq!(err.code, Code::SignatureDoesNotMatch);
        let unsigned = "x-amz-checksum-crc32c:sOO8/Q==\r\n\r\n";
        let err = decode(cfg(), &documented_body(TRAILER_SIGNATURES, unsigned), 999).unwrap_err();
        assert_eq!(err.code, Code::SignatureDoesNotMatch);
    }

    fn unsigned_body(data: &[u8], chunk: usize, trailers: &[(String, String)]) -> Vec<u8> {
        encode(data, chunk, None, trailers)
    }

    #[test]
    fn unsigned_bodies_with_trailers_decode_into_checked_checksums() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let crc = Checksum::of(ChecksumAlgorithm::Crc64Nvme, &data);
        let trailers = [("x-amz-checksum-crc64nvme".to_owned(), crc.to_base64())];
        let body = unsigned_body(&data, 1000, &trailers);
        let mut headers = HeaderMap::new();
        headers.insert("content-encoding", HeaderValue::from_static("aws-chunked"));
        headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_static(STREAMING_UNSIGNED_PAYLOAD_TRAILER),
        );
        headers.insert("x-amz-decoded-content-length", HeaderValue::from_static("100000"));
        headers.insert("x-amz-trailer", HeaderValue::from_static("x-amz-checksum-crc64nvme"));
        let mut decoder = ChunkedDecoder::from_request(&headers, Some(&Payload::StreamingUnsignedTrailer))
            .unwrap()
            .unwrap();
        let mut checks = BodyChecks::from_headers(&headers).unwrap();
        let raw = Bytes::from(body);
        let mut out = Vec::new();
        for start in (0..raw.len()).step_by(3333) {
            let piece = raw.slice(start..(start + 3333).min(raw.len()));
            decoder.feed_bytes(&piece, &mut out).unwrap();
        }
        for piece in &out {
            checks.update(piece);
        }
        assert!(decoder.is_done());
        assert_eq!(decoder.decoded_bytes(), 100_000);
        let trailers = decoder.finish().unwrap();
        assert_eq!(checks.finish(Some(&trailers)).unwrap().checksum, Some(crc));
        assert_eq!(out.concat(), data);
    }

    #[test]
    fn framing_errors_are_precise() {
        let cfg = |len| config(None, false, &[], len);
        let code = |body: &[u8], len| decode(cfg(len), body, 5).unwrap_err().code;
        assert_eq!(code(b"3\r\nabc\r\n0\r\n\r\nX", 3), Code::InvalidRequest);
        assert_eq!(code(b"3\r\nabc\r\n", 3), Code::IncompleteBody);
        assert_eq!(code(b"3\r\nab", 3), Code::IncompleteBody);
        assert_eq!(code(b"", 3), Code::IncompleteBody);
        assert_eq!(code(b"3\r\nabc\r\n0\r\n\r\n", 4), Code::IncompleteBody);
        assert_eq!(code(b"4\r\nabcd\r\n0\r\n\r\n", 3), Code::InvalidRequest);
        assert_eq!(code(b"3\r\nabcX\n0\r\n\r\n", 3), Code::InvalidRequest);
        assert_eq!(code(b"zz\r\nabc\r\n", 3), Code::InvalidRequest);
        assert_eq!(code(b"3\nabc\r\n", 3), Code::InvalidRequest);
        assert_eq!(code(b"\r\n", 3), Code::InvalidRequest);
        assert_eq!(code(b"11111111111111111\r\n", 3), Code::InvalidRequest);
        // A huge claimed size on a tiny body: refused at once, nothing held.
        assert_eq!(code(b"ffffffffffffffff\r\nab", 3), Code::InvalidRequest);
        let mut long = vec![b'1'; 5000];
        long.extend_from_slice(b"\r\n");
        assert_eq!(code(&long, 3), Code::InvalidRequest);
        // After an error the decoder stays failed.
        let mut d = ChunkedDecoder::new(cfg(3));
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        assert!(d.feed(b"3\r\nabc\r\n0\r\n\r\n", &mut Vec::new()).is_err());
        assert!(d.finish().is_err());
        // A huge declared length with a small body ends as IncompleteBody,
        // with nothing allocated for it.
        let mut d = ChunkedDecoder::new(cfg(u64::MAX));
        let mut out = Vec::new();
        d.feed(b"fffffffffffffff\r\nabc", &mut out).unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(d.finish().unwrap_err().code, Code::IncompleteBody);
        // Extensions of unsigned chunks are ignored; an empty body is fine.
        assert_eq!(decode(cfg(3), b"3;x=y\r\nabc\r\n0\r\n\r\n", 2).unwrap().0, b"abc");
        assert_eq!(decode(cfg(0), b"0\r\n\r\n", 1).unwrap().0, b"");
    }

    #[test]
    fn trailer_errors_are_precise() {
        let names = ["x-amz-checksum-crc32"];
        let code = |tail: &str| {
            let body = format!("1\r\na\r\n0\r\n{tail}");
            decode(config(None, false, &names, 1), body.as_bytes(), 3)
                .unwrap_err()
                .code
        };
        assert_eq!(code("x-amz-checksum-sha1:AAAA\r\n\r\n"), Code::MalformedTrailerError);
        assert_eq!(code("\r\n"), Code::IncompleteBody);
        assert_eq!(code("\r\n\r\n"), Code::MalformedTrailerError);
        assert_eq!(code("x-amz-checksum-crc32\r\n\r\n"), Code::MalformedTrailerError);
        assert_eq!(
            code("x-amz-checksum-crc32:a\r\nx-amz-checksum-crc32:b\r\n\r\n"),
            Code::MalformedTrailerError
        );
        assert_eq!(
            code("x-amz-checksum-crc32:a\r\nx-amz-trailer-signature:x\r\n\r\n"),
            Code::MalformedTrailerError
        );
        let mut small = config(None, false, &names, 1);
        small.limits.max_trailer_bytes = 64;
        let big = format!("1\r\na\r\n0\r\nx-amz-checksum-crc32:{}\r\n\r\n", "A".repeat(100));
        assert_eq!(
            decode(small, big.as_bytes(), 7).unwrap_err().code,
            Code::MalformedTrailerError
        );
        let ok = decode(
            config(None, false, &names, 1),
            b"1\r\na\r\n0\r\nX-Amz-Checksum-CRC32 : 6Kg8Ug==\n\r\n",
            3,
        )
        .unwrap();
        assert_eq!(ok.1.get("x-amz-checksum-crc32"), Some("6Kg8Ug=="));
    }

    #[test]
    fn small_signed_chunks_but_the_last_are_refused() {
        let mut c = chain(SEED);
        let body = encode(&[b'x'; 9000], 4000, Some(&mut c), &[]);
        let err = decode(config(Some(chain(SEED)), false, &[], 9000), &body, 100).unwrap_err();
        assert_eq!(err.code, Code::InvalidChunkSizeError);
        let mut c = chain(SEED);
        let body = encode(&[b'x'; 9000], 8192, Some(&mut c), &[]);
        assert!(decode(config(Some(chain(SEED)), false, &[], 9000), &body, 100).is_ok());
    }

    #[test]
    fn from_request_picks_the_mode() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.insert(*n, HeaderValue::from_static(v));
            }
            h
        };
        assert!(ChunkedDecoder::from_request(&headers(&[]), None).unwrap().is_none());
        let signed = headers(&[
            ("x-amz-content-sha256", STREAMING_PAYLOAD),
            ("x-amz-decoded-content-length", "5"),
        ]);
        assert_eq!(
            ChunkedDecoder::from_request(&signed, None).unwrap_err().code,
            Code::InvalidRequest
        );
        let no_length = headers(&[("content-encoding", "gzip, aws-chunked")]);
        assert_eq!(
            ChunkedDecoder::from_request(&no_length, None).unwrap_err().code,
            Code::MissingContentLength
        );
        let bad_length = headers(&[
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "-1"),
        ]);
        assert_eq!(
            ChunkedDecoder::from_request(&bad_length, None).unwrap_err().code,
            Code::InvalidArgument
        );
        let hashed = headers(&[
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "1"),
        ]);
        assert_eq!(
            ChunkedDecoder::from_request(&hashed, Some(&Payload::Sha256([0; 32])))
                .unwrap_err()
                .code,
            Code::InvalidRequest
        );
        assert!(
            ChunkedDecoder::from_request(&hashed, Some(&Payload::Unsigned))
                .unwrap()
                .is_some()
        );
        assert_eq!(stored_content_encoding(&no_length).as_deref(), Some("gzip"));
        assert_eq!(stored_content_encoding(&hashed), None);
    }

    #[test]
    fn a_signed_streaming_upload_round_trips_from_signer_to_decoder() {
        let now = parse_amz_datetime("20240301T120000Z").unwrap();
        let signer = Signer::new(AKID, SECRET, "us-west-2");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let crc = Checksum::of(ChecksumAlgorithm::Crc32, &data).to_base64();
        let uri: http::Uri = "http://127.0.0.1:9000/b/obj".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("content-encoding", HeaderValue::from_static("aws-chunked"));
        headers.insert("x-amz-decoded-content-length", HeaderValue::from_static("50000"));
        headers.insert("x-amz-trailer", HeaderValue::from_static("x-amz-checksum-crc32"));
        let mut signed = signer
            .sign(&http::Method::PUT, &uri, &mut headers, STREAMING_PAYLOAD_TRAILER, now)
            .unwrap();
        let body = encode(
            &data,
            16_384,
            Some(&mut signed.chunk_signer),
            &[("x-amz-checksum-crc32".into(), crc.clone())],
        );
        let lookup = |k: &str| (k == AKID).then(|| SECRET.to_owned());
        let verified = Verifier::default()
            .verify(&http::Method::PUT, &uri, &headers, &lookup, now)
            .unwrap()
            .unwrap();
        let mut decoder = ChunkedDecoder::from_request(&headers, Some(&verified.payload))
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        for piece in body.chunks(1500) {
            decoder.feed(piece, &mut out).unwrap();
        }
        let trailers = decoder.finish().unwrap();
        assert_eq!(out, data);
        assert_eq!(trailers.get("x-amz-checksum-crc32"), Some(crc.as_str()));
    }
}
