//! A small S3 client for the bench, without an SDK: one HTTP/1.1 keep-alive
//! connection over a std `TcpStream`, every request signed with
//! `kvtier_s3::Signer` and an `UNSIGNED-PAYLOAD` payload hash (what SDKs
//! send over TLS, where the transport protects the body), no pipelining (one
//! request in flight per connection: the bench opens several connections).
//!
//! A GET's body is read straight into the caller's buffer, and a PUT's body
//! is written from the caller's slice with the request head in one
//! `writev`, so the client copies no object bytes of its own.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri};
use kvtier_s3::{S3Error, Signer};

use crate::util::io_err as err;

/// The longest response head read (S3 heads are a few hundred bytes).
const MAX_HEAD_BYTES: usize = 64 << 10;
/// The largest body collected into memory (XML answers and errors).
const MAX_COLLECT_BYTES: usize = 1 << 20;
/// What one `read` asks for while looking for the end of a head: small, so
/// the body bytes read with the head (and copied once) stay few.
const HEAD_READ_BYTES: usize = 16 << 10;

/// One answer: status, headers (names lower-cased) and, unless it went
/// into the caller's buffer, the body.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The S3 error the body carries, if it is an `<Error>` document.
    pub(crate) fn s3_error(&self) -> Option<S3Error> {
        S3Error::from_xml(&self.body)
    }

    fn success(&self) -> bool {
        (200..300).contains(&self.status) && self.s3_error().is_none()
    }

    /// `self` if it is a success, else an error naming `what` and the S3
    /// error (a 200 with an `<Error>` body, as CompleteMultipartUpload may
    /// answer, is an error too).
    fn ok(self, what: &str) -> kvtier::Result<Resp> {
        if self.success() {
            return Ok(self);
        }
        let why = match self.s3_error() {
            Some(e) => e.to_string(),
            None => String::from_utf8_lossy(&self.body[..self.body.len().min(512)]).into_owned(),
        };
        Err(err(format!("{what}: HTTP {}: {why}", self.status)))
    }

    /// The unquoted `ETag`.
    pub(crate) fn etag(&self) -> Option<String> {
        self.header("etag").map(|e| e.trim_matches('"').to_string())
    }
}

/// Where a successful answer's body goes.
enum Sink<'a> {
    /// Into memory (at most `MAX_COLLECT_BYTES`).
    Collect,
    /// Into this buffer, which it must fill exactly.
    Into(&'a mut [u8]),
    /// Nowhere: the answer to a HEAD has none, whatever its length says.
    Head,
}

/// One keep-alive connection to an S3 endpoint on 127.0.0.1.
#[derive(Debug)]
pub(crate) struct Conn {
    /// `host:port`, the `Host` header and the address dialled.
    host: String,
    signer: Signer,
    stream: Option<TcpStream>,
    timeout: Duration,
    /// Bytes read past a response head: the start of its body.
    head: Vec<u8>,
}

impl Conn {
    /// A connection to `host` (`127.0.0.1:port`), signing as `signer`;
    /// every read and write gives up after `timeout`.
    pub(crate) fn open(host: &str, signer: &Signer, timeout: Duration) -> kvtier::Result<Conn> {
        let mut c = Conn {
            host: host.to_string(),
            signer: signer.clone(),
            stream: None,
            timeout,
            head: Vec::with_capacity(MAX_HEAD_BYTES),
        };
        c.connect()?;
        Ok(c)
    }

    fn connect(&mut self) -> kvtier::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.host).map_err(|e| err(format!("connect {}: {e}", self.host)))?;
            s.set_nodelay(true).map_err(|e| err(format!("nodelay: {e}")))?;
            s.set_read_timeout(Some(self.timeout))
                .map_err(|e| err(format!("read timeout: {e}")))?;
            s.set_write_timeout(Some(self.timeout))
                .map_err(|e| err(format!("write timeout: {e}")))?;
            self.stream = Some(s);
        }
        Ok(self.stream.as_mut().expect("connected above"))
    }

    /// Sends one signed request for `path_query` (already URI-encoded) and
    /// reads its answer; a failed exchange closes the connection (the next
    /// request opens a new one).
    fn send(&mut self, method: Method, path_query: &str, body: &[u8], sink: Sink<'_>) -> kvtier::Result<Resp> {
        let r = self.exchange(&method, path_query, body, sink);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn exchange(&mut self, method: &Method, path_query: &str, body: &[u8], sink: Sink<'_>) -> kvtier::Result<Resp> {
        let uri: Uri = format!("http://{}{path_query}", self.host)
            .parse()
            .map_err(|e| err(format!("{path_query}: not a URI: {e}")))?;
        let mut h = HeaderMap::new();
        // Signed, as the SDKs sign it.
        h.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_str(&body.len().to_string()).expect("digits"),
        );
        self.signer
            .sign(method, &uri, &mut h, "UNSIGNED-PAYLOAD", SystemTime::now())
            .map_err(|e| err(format!("sign {method} {path_query}: {e}")))?;
        let mut head = format!("{method} {path_query} HTTP/1.1\r\n");
        for (k, v) in &h {
            head.push_str(k.as_str());
            head.push_str(": ");
            head.push_str(v.to_str().map_err(|_| err("a signed header is not ASCII"))?);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let s = self.connect()?;
        write_all_vectored(s, &mut [IoSlice::new(head.as_bytes()), IoSlice::new(body)])
            .map_err(|e| err(format!("{method} {path_query}: send: {e}")))?;
        let resp = self.read_response(method == Method::HEAD, sink)?;
        if resp
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            self.stream = None;
        }
        Ok(resp)
    }

    fn read_response(&mut self, head_request: bool, sink: Sink<'_>) -> kvtier::Result<Resp> {
        let s = self.stream.as_mut().expect("sent on it");
        self.head.clear();
        let mut scanned = 0;
        let end = loop {
            if let Some(i) = find_head_end(&self.head, scanned) {
                break i;
            }
            scanned = self.head.len().saturating_sub(3);
            if self.head.len() >= MAX_HEAD_BYTES {
                return Err(err(format!("a response head over {MAX_HEAD_BYTES} bytes")));
            }
            let at = self.head.len();
            self.head.resize(at + HEAD_READ_BYTES, 0);
            let n = s
                .read(&mut self.head[at..])
                .map_err(|e| err(format!("read a response: {e}")))?;
            self.head.truncate(at + n);
            if n == 0 {
                return Err(err("the connection closed before a response"));
            }
        };
        let text = std::str::from_utf8(&self.head[..end]).map_err(|_| err("a response head that is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| err(format!("a bad status line: {text:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        let early = &self.head[end + 4..];
        // Answers to HEAD, 204 and 304 have no body, whatever they announce.
        if head_request || matches!(sink, Sink::Head) || status == 204 || status == 304 {
            if !early.is_empty() {
                return Err(err(format!("bytes after the head of a bodiless answer: {text:?}")));
            }
            return Ok(resp);
        }
        if resp.header("transfer-encoding").is_some() {
            return Err(err("a chunked response: this client reads Content-Length bodies only"));
        }
        let len: usize = resp
            .header("content-length")
            .ok_or_else(|| err(format!("a response without Content-Length: {text:?}")))?
            .parse()
            .map_err(|_| err("a Content-Length that is not a number"))?;
        if early.len() > len {
            return Err(err("bytes after a response body (pipelining is not used)"));
        }
        match sink {
            Sink::Into(dst) if resp.success() => {
                if len != dst.len() {
                    return Err(err(format!("a body of {len} bytes where {} were expected", dst.len())));
                }
                dst[..early.len()].copy_from_slice(early);
                s.read_exact(&mut dst[early.len()..])
                    .map_err(|e| err(format!("read a body of {len} bytes: {e}")))?;
            }
            _ => {
                if len > MAX_COLLECT_BYTES {
                    return Err(err(format!("a body of {len} bytes to collect")));
                }
                resp.body = Vec::with_capacity(len);
                resp.body.extend_from_slice(early);
                resp.body.resize(len, 0);
                s.read_exact(&mut resp.body[early.len()..])
                    .map_err(|e| err(format!("read a body of {len} bytes: {e}")))?;
            }
        }
        Ok(resp)
    }

    /// PutObject (or UploadPart, with its query): answers the ETag.
    pub(crate) fn put(&mut self, path_query: &str, body: &[u8]) -> kvtier::Result<String> {
        let r = self
            .send(Method::PUT, path_query, body, Sink::Collect)?
            .ok(&format!("PUT {path_query}"))?;
        r.etag().ok_or_else(|| err(format!("PUT {path_query}: no ETag")))
    }

    /// GetObject into `dst`, which the object must fill exactly: answers
    /// the ETag.
    pub(crate) fn get_into(&mut self, path: &str, dst: &mut [u8]) -> kvtier::Result<String> {
        let r = self
            .send(Method::GET, path, &[], Sink::Into(dst))?
            .ok(&format!("GET {path}"))?;
        r.etag().ok_or_else(|| err(format!("GET {path}: no ETag")))
    }

    /// GetObject of a small object or an error: the answer as it came.
    pub(crate) fn get(&mut self, path: &str) -> kvtier::Result<Resp> {
        self.send(Method::GET, path, &[], Sink::Collect)
    }

    /// HeadObject: the answer's status and Content-Length.
    pub(crate) fn head(&mut self, path: &str) -> kvtier::Result<(u16, Option<u64>)> {
        let r = self.send(Method::HEAD, path, &[], Sink::Head)?;
        Ok((r.status, r.header("content-length").and_then(|l| l.parse().ok())))
    }

    /// DeleteObject: the answer's status.
    pub(crate) fn delete(&mut self, path: &str) -> kvtier::Result<u16> {
        let r = self.send(Method::DELETE, path, &[], Sink::Collect)?;
        Ok(r.status)
    }

    /// CreateMultipartUpload: the upload id.
    pub(crate) fn create_upload(&mut self, path: &str) -> kvtier::Result<String> {
        let what = format!("POST {path}?uploads");
        let r = self
            .send(Method::POST, &format!("{path}?uploads"), &[], Sink::Collect)?
            .ok(&what)?;
        let text = String::from_utf8_lossy(&r.body);
        element(&text, "UploadId").ok_or_else(|| err(format!("{what}: no UploadId in {text}")))
    }

    /// UploadPart `number` of upload `id`: the part's ETag.
    pub(crate) fn upload_part(&mut self, path: &str, id: &str, number: usize, body: &[u8]) -> kvtier::Result<String> {
        self.put(&format!("{path}?partNumber={number}&uploadId={id}"), body)
    }

    /// CompleteMultipartUpload with `parts` (number, ETag) in order: the
    /// object's ETag.
    pub(crate) fn complete(&mut self, path: &str, id: &str, parts: &[(usize, String)]) -> kvtier::Result<String> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>\"{etag}\"</ETag></Part>"
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let what = format!("POST {path}?uploadId={id}");
        let r = self
            .send(
                Method::POST,
                &format!("{path}?uploadId={id}"),
                xml.as_bytes(),
                Sink::Collect,
            )?
            .ok(&what)?;
        let text = String::from_utf8_lossy(&r.body);
        element(&text, "ETag")
            .map(|e| e.replace("&quot;", "").trim_matches('"').to_string())
            .ok_or_else(|| err(format!("{what}: no ETag in {text}")))
    }
}

/// Where the blank line ending a head starts, searching from `from`.
fn find_head_end(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i)
}

/// The text of the first `<name>` element of a small XML answer.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let from = xml.find(&open)? + open.len();
    let to = from + xml[from..].find(&format!("</{name}>"))?;
    Some(xml[from..to].to_string())
}

/// `write_all` over several buffers: one `writev` for a head and its body.
fn write_all_vectored(s: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_end_is_found_across_reads() {
        let b = b"HTTP/1.1 200 OK\r\nx: y\r\n\r\nbody";
        assert_eq!(find_head_end(b, 0), Some(21));
        assert_eq!(find_head_end(b, 19), Some(21));
        assert_eq!(&b[21 + 4..], b"body");
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n", 0), None);
        assert_eq!(find_head_end(b"ab", 5), None);
    }

    #[test]
    fn elements_are_read_from_s3_answers() {
        let x =
            "<InitiateMultipartUploadResult><Bucket>b</Bucket><UploadId>abc</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(element(x, "UploadId").as_deref(), Some("abc"));
        assert_eq!(element(x, "Key"), None);
    }

    #[test]
    fn vectored_writes_send_every_byte() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let body = vec![7u8; 3 << 20];
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let mut s = TcpStream::connect(addr).unwrap();
        write_all_vectored(&mut s, &mut [IoSlice::new(b"head"), IoSlice::new(&body)]).unwrap();
        drop(s);
        let got = t.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(got.len(), 4 + body.len());
    }
}
