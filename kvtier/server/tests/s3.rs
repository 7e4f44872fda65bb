//! kvtierd's S3 listener as a process: what no S3 client library lets a
//! test do. Killed mid-upload it serves nothing or the whole object after
//! a restart; an acknowledged PUT survives `kill -9`; a body that is
//! shorter than announced, too large, or malformed is refused precisely
//! and stores nothing. Requests are raw HTTP/1.1 to a bucket open to
//! unsigned requests (the real clients, signing included, are tested in
//! `connectors/s3/tests`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use kvtier_testkit::Daemon;

const CONFIG: &str = r#"
[s3]
listen = "127.0.0.1:0"
max_block_object_bytes = 1048576
chunk_bytes = 65536
[[s3.credentials]]
access_key_id = "test"
secret_access_key = "test-secret"
[[s3.buckets]]
name = "open-objects"
kind = "objects"
anonymous = true
[[s3.buckets]]
name = "open-blocks"
kind = "blocks"
anonymous = true
[[s3.buckets]]
name = "closed"
kind = "objects"
"#;

fn start(dir: &Path) -> Daemon {
    start_with(dir, &[])
}

fn start_with(dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let cfg = dir.join("kvtierd.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, CONFIG).unwrap();
    }
    let data = dir.join("data");
    let cfg = cfg.to_str().unwrap().to_string();
    let mut all = vec![("KVTIER_CONFIG", cfg.as_str())];
    all.extend_from_slice(env);
    let d = Daemon::start(&data, &all);
    assert!(d.s3.is_some(), "kvtierd printed its S3 address");
    d
}

/// One response: status, headers (lower-cased names), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn read_resp(s: &mut TcpStream, head_request: bool) -> Resp {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 65536];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut b).expect("read the response head");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    if !head_request {
        while body.len() < len {
            let n = s.read(&mut b).expect("read the body");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&b[..n]);
        }
    }
    Resp { status, headers, body }
}

/// Sends one request on a new connection and reads the answer.
fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    let has_len = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    if !has_len && (method == "PUT" || method == "POST") {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_resp(&mut s, method == "HEAD")
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn put_get_head_delete_round_trip_through_both_bucket_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let s3 = d.s3.clone().unwrap();
    for (bucket, len) in [("open-objects", 300_000usize), ("open-blocks", 70_000)] {
        let data = content(len as u64, len);
        let path = format!("/{bucket}/dir/a:b/obj");
        let r = request(&s3, "PUT", &path, &[("content-type", "application/x-test")], &data);
        assert_eq!(r.status, 200, "{}", r.text());
        let etag = r.header("etag").unwrap().to_string();
        let r = request(&s3, "GET", &path, &[], &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, data, "{bucket}: bytes back as put");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert_eq!(r.header("content-type"), Some("application/x-test"));
        let r = request(&s3, "GET", &path, &[("range", "bytes=65530-65545")], &[]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body, data[65530..=65545], "a range across a chunk boundary");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes 65530-65545/{len}").as_str())
        );
        let r = request(&s3, "HEAD", &path, &[], &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
        let r = request(&s3, "DELETE", &path, &[], &[]);
        assert_eq!(r.status, 204);
        let r = request(&s3, "GET", &path, &[], &[]);
        assert_eq!(r.status, 404);
        assert!(r.text().contains("<Code>NoSuchKey</Code>"), "{}", r.text());
    }
    // Unsigned requests to a bucket that is not open are refused.
    let r = request(&s3, "PUT", "/closed/x", &[], b"data");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("<Code>AccessDenied</Code>"), "{}", r.text());
    // The metrics endpoint counts them.
    let (code, body) = kvtier_testkit::http_get(d.metrics.as_ref().unwrap(), "/metrics");
    assert_eq!(code, 200);
    let put_ok = kvtier_testkit::sample(&body, "kvtier_s3_requests_total{op=\"PutObject\",status=\"200\"}");
    assert_eq!(put_ok, 2.0, "two PUTs answered 200");
    let denied = kvtier_testkit::sample(&body, "kvtier_s3_requests_total{op=\"PutObject\",status=\"403\"}");
    assert_eq!(denied, 1.0);
    let received = kvtier_testkit::sample(&body, "kvtier_s3_received_bytes_total");
    assert_eq!(received, 370_000.0, "both objects' bytes");
}

#[test]
fn bad_bodies_are_refused_precisely_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let s3 = d.s3.clone().unwrap();

    // A huge Content-Length on a small body: the client stops sending.
    let mut s = TcpStream::connect(&s3).unwrap();
    s.write_all(b"PUT /open-objects/short HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\nonly a few bytes")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.is_empty() || text.contains("IncompleteBody") || text.starts_with("HTTP/1.1 400"),
        "a short body is refused: {text}"
    );
    assert_eq!(
        request(&s3, "HEAD", "/open-objects/short", &[], &[]).status,
        404,
        "nothing stored"
    );

    // Over the blocks bucket's largest object: refused before the body.
    let r = request(&s3, "PUT", "/open-blocks/big", &[("content-length", "2000000")], &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("<Code>EntityTooLarge</Code>"), "{}", r.text());
    assert_eq!(request(&s3, "HEAD", "/open-blocks/big", &[], &[]).status, 404);

    // A Content-MD5 that does not match.
    let r = request(
        &s3,
        "PUT",
        "/open-objects/md5",
        &[("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")],
        b"not empty",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("<Code>BadDigest</Code>"), "{}", r.text());
    assert_eq!(request(&s3, "HEAD", "/open-objects/md5", &[], &[]).status, 404);

    // A key over 1,024 bytes.
    let long = format!("/open-objects/{}", "k".repeat(1025));
    let r = request(&s3, "PUT", &long, &[], b"x");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("<Code>KeyTooLongError</Code>"), "{}", r.text());

    // Malformed aws-chunked framing.
    let r = request(
        &s3,
        "PUT",
        "/open-objects/chunked",
        &[
            ("content-encoding", "aws-chunked"),
            ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            ("x-amz-decoded-content-length", "5"),
        ],
        b"zz\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(request(&s3, "HEAD", "/open-objects/chunked", &[], &[]).status, 404);

    // Malformed XML in a multipart completion.
    let r = request(&s3, "POST", "/open-objects/mp?uploads", &[], &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let id = text
        .split("<UploadId>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let r = request(
        &s3,
        "POST",
        &format!("/open-objects/mp?uploadId={id}"),
        &[],
        b"<CompleteMultipartUpload><Part><PartNumber>1</Part>",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("<Code>MalformedXML</Code>"), "{}", r.text());
    // A completion naming a part never uploaded.
    let r = request(
        &s3,
        "POST",
        &format!("/open-objects/mp?uploadId={id}"),
        &[],
        b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"00\"</ETag></Part></CompleteMultipartUpload>",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("<Code>InvalidPart</Code>"), "{}", r.text());
    assert_eq!(request(&s3, "HEAD", "/open-objects/mp", &[], &[]).status, 404);
    // A range past the end.
    let r = request(&s3, "PUT", "/open-objects/small", &[], b"0123456789");
    assert_eq!(r.status, 200);
    let r = request(&s3, "GET", "/open-objects/small", &[("range", "bytes=10-20")], &[]);
    assert_eq!(r.status, 416, "{}", r.text());
    assert!(r.text().contains("<Code>InvalidRange</Code>"), "{}", r.text());
}

#[test]
fn a_kill_mid_upload_serves_nothing_or_the_whole_object_and_acknowledged_puts_survive() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let s3 = d.s3.clone().unwrap();
    // Acknowledged objects, one of them replaced.
    let a = content(1, 500_000);
    assert_eq!(
        request(&s3, "PUT", "/open-objects/a", &[], &content(9, 1000)).status,
        200
    );
    assert_eq!(request(&s3, "PUT", "/open-objects/a", &[], &a).status, 200);
    let b = content(2, 50_000);
    assert_eq!(request(&s3, "PUT", "/open-blocks/b", &[], &b).status, 200);
    // A multipart upload with two parts, not completed.
    let r = request(&s3, "POST", "/open-objects/mp?uploads", &[], &[]);
    let text = r.text();
    let id = text
        .split("<UploadId>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let p1 = content(3, 5 << 20);
    let r = request(
        &s3,
        "PUT",
        &format!("/open-objects/mp?partNumber=1&uploadId={id}"),
        &[],
        &p1,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e1 = r.header("etag").unwrap().to_string();
    // An upload in progress when kvtierd dies: half its body sent.
    let whole = content(4, 3 << 20);
    let mut s = TcpStream::connect(&s3).unwrap();
    s.write_all(
        format!(
            "PUT /open-objects/torn HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            whole.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&whole[..whole.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.signal_and_wait(libc::SIGKILL);
    drop(s);

    let d = start(dir.path());
    let s3 = d.s3.clone().unwrap();
    let r = request(&s3, "GET", "/open-objects/a", &[], &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, a, "the acknowledged replacement survived kill -9");
    let r = request(&s3, "GET", "/open-blocks/b", &[], &[]);
    assert_eq!(r.body, b);
    let r = request(&s3, "GET", "/open-objects/torn", &[], &[]);
    assert_eq!(r.status, 404, "the torn upload is not an object");
    // The multipart upload goes on after the restart.
    let p2 = content(5, 1000);
    let r = request(
        &s3,
        "PUT",
        &format!("/open-objects/mp?partNumber=2&uploadId={id}"),
        &[],
        &p2,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e2 = r.header("etag").unwrap().to_string();
    let xml = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{e1}</ETag></Part><Part><PartNumber>2</PartNumber><ETag>{e2}</ETag></Part></CompleteMultipartUpload>"
    );
    let r = request(
        &s3,
        "POST",
        &format!("/open-objects/mp?uploadId={id}"),
        &[],
        xml.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(&s3, "GET", "/open-objects/mp", &[], &[]);
    assert_eq!(r.body.len(), p1.len() + p2.len());
    assert!(
        r.body[..p1.len()] == p1[..] && r.body[p1.len()..] == p2[..],
        "parts in order"
    );
    assert!(r.header("etag").unwrap().ends_with("-2\""), "{:?}", r.header("etag"));
}

/// Three members, each with its S3 listener: an object written through one
/// is read through the others (its chunks and record are replicated), a
/// delete through another member removes it everywhere, and with the
/// writer killed its objects are still served by the survivors.
#[test]
fn a_cluster_serves_objects_written_through_any_member() {
    let root = tempfile::tempdir().unwrap();
    let ports = kvtier_testkit::free_ports(3);
    let ids = ["a", "b", "c"];
    let members: Vec<String> = ids
        .iter()
        .zip(&ports)
        .map(|(id, p)| format!("  {{ id = \"{id}\", addr = \"127.0.0.1:{p}\" }},"))
        .collect();
    let mut nodes = Vec::new();
    for (id, p) in ids.iter().zip(&ports) {
        let cfg = root.path().join(format!("{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "{CONFIG}\n[cluster]\nnode_id = \"{id}\"\nheartbeat_interval_ms = 100\npeer_timeout_ms = 1000\nmembers = [\n{}\n]\n",
                members.join("\n")
            ),
        )
        .unwrap();
        let listen = format!("127.0.0.1:{p}");
        let d = Daemon::start(
            &root.path().join(id),
            &[("KVTIER_CONFIG", cfg.to_str().unwrap()), ("KVTIER_LISTEN", &listen)],
        );
        nodes.push(Some(d));
    }
    let s3 = |i: usize, n: &[Option<Daemon>]| n[i].as_ref().unwrap().s3.clone().unwrap();
    // Every member sees the others up before the writes (R = 3 needs them).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let objs: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("/open-objects/o{i}"), content(100 + i, 200_000)))
        .collect();
    loop {
        let r = request(&s3(0, &nodes), "PUT", &objs[0].0, &[], &objs[0].1);
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster took no write: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (p, d) in &objs[1..] {
        let r = request(&s3(0, &nodes), "PUT", p, &[], d);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for i in 1..3 {
        for (p, d) in &objs {
            let r = request(&s3(i, &nodes), "GET", p, &[], &[]);
            assert_eq!(r.status, 200, "{} through member {i}: {}", p, r.text());
            assert_eq!(&r.body, d, "{p} through member {i}");
        }
    }
    // A delete through b: gone through every member.
    let r = request(&s3(1, &nodes), "DELETE", &objs[5].0, &[], &[]);
    assert_eq!(r.status, 204);
    for i in 0..3 {
        let r = request(&s3(i, &nodes), "GET", &objs[5].0, &[], &[]);
        assert_eq!(r.status, 404, "deleted through b, asked member {i}: {}", r.text());
    }
    // The writer dies: the survivors still serve its objects.
    nodes[0].take().unwrap().signal_and_wait(libc::SIGKILL);
    for i in 1..3 {
        for (p, d) in &objs[..5] {
            let r = request(&s3(i, &nodes), "GET", p, &[], &[]);
            assert_eq!(r.status, 200, "{p} through member {i} with a dead: {}", r.text());
            assert_eq!(&r.body, d);
        }
    }
}

/// An upload nobody completes is aborted once `multipart_expiry_s` has
/// passed: its parts go, and the upload id is unknown afterwards.
#[test]
fn abandoned_multipart_uploads_expire() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kvtierd.toml"),
        CONFIG.replace("chunk_bytes = 65536", "chunk_bytes = 65536\nmultipart_expiry_s = 1"),
    )
    .unwrap();
    let d = start(dir.path());
    let s3 = d.s3.clone().unwrap();
    let r = request(&s3, "POST", "/open-objects/gone?uploads", &[], &[]);
    let text = r.text();
    let id = text
        .split("<UploadId>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let r = request(
        &s3,
        "PUT",
        &format!("/open-objects/gone?partNumber=1&uploadId={id}"),
        &[],
        &content(7, 1000),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(&s3, "GET", &format!("/open-objects/gone?uploadId={id}"), &[], &[]);
    assert_eq!(r.status, 200, "listed while fresh: {}", r.text());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(&s3, "GET", &format!("/open-objects/gone?uploadId={id}"), &[], &[]);
        if r.status == 404 {
            assert!(r.text().contains("<Code>NoSuchUpload</Code>"), "{}", r.text());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upload did not expire within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = request(&s3, "GET", "/open-objects?uploads", &[], &[]);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(&id), "no longer listed: {}", r.text());
}

/// With `[tls]`, the S3 port speaks TLS with the daemon's certificate: a
/// client that trusts it puts and gets; a plaintext request gets no answer.
#[test]
fn the_s3_port_serves_tls_with_the_daemons_certificate() {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    kvtier_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("kvtierd.toml"), CONFIG).unwrap();
    let cfg = dir.path().join("kvtierd.toml");
    let d = Daemon::start(
        &dir.path().join("data"),
        &[
            ("KVTIER_CONFIG", cfg.to_str().unwrap()),
            ("KVTIER_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("KVTIER_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    let s3 = d.s3.clone().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&cert).unwrap()).unwrap();
    let client = std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let tls_request = |method: &str, path: &str, body: &[u8]| -> (u16, Vec<u8>) {
        let conn = rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(&s3).unwrap());
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
        let status = String::from_utf8_lossy(&out[..end])
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        (status, out[end + 4..].to_vec())
    };
    let data = content(11, 100_000);
    assert_eq!(tls_request("PUT", "/open-objects/tls", &data).0, 200);
    let (status, body) = tls_request("GET", "/open-objects/tls", &[]);
    assert_eq!(status, 200);
    assert_eq!(body, data, "bytes back over TLS");
    // Plaintext on the TLS port: no HTTP answer.
    let mut s = TcpStream::connect(&s3).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /open-objects/tls HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!out.starts_with(b"HTTP/1.1 200"), "plaintext served on the TLS port");
}

/// In `tiered` mode (host RAM in front of the SSD, blocks cascading to the
/// SSD only on eviction) an acknowledged object is on the SSD already: it
/// survives `kill -9`.
#[test]
fn tiered_mode_acknowledges_objects_only_once_they_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let tiered = [("KVTIER_MODE", "tiered"), ("KVTIER_HOST_CAPACITY_BYTES", "268435456")];
    let mut d = start_with(dir.path(), &tiered);
    let s3 = d.s3.clone().unwrap();
    let (a, b) = (content(21, 300_000), content(22, 70_000));
    assert_eq!(request(&s3, "PUT", "/open-objects/a", &[], &a).status, 200);
    assert_eq!(request(&s3, "PUT", "/open-blocks/b", &[], &b).status, 200);
    d.signal_and_wait(libc::SIGKILL);
    let d = start_with(dir.path(), &tiered);
    let s3 = d.s3.clone().unwrap();
    let r = request(&s3, "GET", "/open-objects/a", &[], &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, a);
    let r = request(&s3, "GET", "/open-blocks/b", &[], &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b);
}
