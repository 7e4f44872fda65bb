//! kvtier's test kit, shared by the server's process tests and the
//! benchmarks: real kvtierd processes on 127.0.0.1 with free ports and
//! temporary directories, the `kvtier` CLI as a process, namespaces, keys
//! and deterministic block contents, and polling helpers; [`cluster`]: a
//! cluster of them, and faults on a stopped node's segment files.
//!
//! The binaries are found next to the running executable (a test binary in
//! `target/<profile>/deps/`, or the bench in `target/<profile>/`), so build
//! them first: `cargo test -p kvtier-server` does, and the bench's docs say
//! `cargo build --release -p kvtier-server`. `KVTIER_BIN_DIR` overrides the
//! directory.
#![allow(missing_docs, clippy::missing_panics_doc)]

pub mod cluster;
pub mod netns;

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::{BlockKey, Namespace, NamespaceId};
use kvtier_client::{Client, ClientConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The path of the workspace binary `name`: `KVTIER_BIN_DIR/name`, or the
/// one beside the running executable (or beside its `deps/` directory).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KVTIER_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("the running executable's path");
    let mut dir = exe.parent().expect("the executable's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p kvtier-server, --release for the bench)",
        p.display()
    );
    p
}

/// A running kvtierd; killed when dropped, or stopped gracefully (SIGTERM,
/// then up to 30 s) after [`Daemon::terminate_on_drop`].
#[derive(Debug)]
pub struct Daemon {
    pub child: Option<Child>,
    pub grpc: String,
    pub metrics: Option<String>,
    /// The S3 listener's address, when the configuration turns it on.
    pub s3: Option<String>,
    pub data_dir: PathBuf,
    terminate_on_drop: bool,
}

impl Daemon {
    /// kvtierd on free loopback ports with `data_dir`, then `env`.
    fn command(data_dir: &Path, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(binary("kvtierd"));
        cmd.env("KVTIER_LISTEN", "127.0.0.1:0")
            .env("KVTIER_METRICS_LISTEN", "127.0.0.1:0")
            .env("KVTIER_DATA_DIR", data_dir)
            .env("KVTIER_DISK_CAPACITY_BYTES", (256u64 << 20).to_string())
            .env("KVTIER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts kvtierd with `data_dir` and extra environment, and waits (up to
    /// 60 s) until it prints its addresses; panics if it does not serve.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::try_start(data_dir, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::start`], answering why kvtierd did not serve instead of
    /// panicking (for the bench, which reports it).
    pub fn try_start(data_dir: &Path, env: &[(&str, &str)]) -> Result<Daemon, String> {
        let mut cmd = Self::command(data_dir, env);
        let mut child = cmd.spawn().map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut grpc, mut metrics, mut s3) = (None, None, None);
        // Metrics are on unless the caller turned them off.
        let want_metrics = !env.iter().any(|(k, v)| *k == "KVTIER_METRICS_LISTEN" && v.is_empty());
        while grpc.is_none() || (want_metrics && metrics.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(a) = l.strip_prefix("kvtierd s3 listening on ") {
                        s3 = Some(a.to_string());
                    } else if let Some(a) = l.strip_prefix("kvtierd listening on ") {
                        grpc = Some(a.to_string());
                    } else if let Some(a) = l.strip_prefix("kvtierd metrics on ") {
                        metrics = Some(a.to_string());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().map_err(|e| format!("wait for kvtierd: {e}"))?;
                    return Err(format!("kvtierd exited before serving: {status}"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("kvtierd did not start within 60 s".into());
                }
            }
        }
        Ok(Daemon {
            child: Some(child),
            grpc: grpc.expect("set above"),
            metrics,
            s3,
            data_dir: data_dir.to_path_buf(),
            terminate_on_drop: false,
        })
    }

    /// Makes dropping the daemon a graceful stop: SIGTERM, then up to 30 s
    /// for it to drain, then SIGKILL.
    pub fn terminate_on_drop(mut self) -> Self {
        self.terminate_on_drop = true;
        self
    }

    /// Starts kvtierd expecting it to fail at startup: waits (up to 60 s)
    /// for it to exit, and panics if it serves instead.
    pub fn start_fails(data_dir: &Path, env: &[(&str, &str)]) -> Exited {
        let mut cmd = Self::command(data_dir, env);
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kvtierd");
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = read(Box::new(child.stdout.take().expect("piped stdout")));
        let err = read(Box::new(child.stderr.take().expect("piped stderr")));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kvtierd did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let e = Exited {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        };
        assert!(!e.stdout.contains("kvtierd listening on"), "kvtierd served: {e:?}");
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGSTOP, then waits until every thread of the process is stopped:
    /// kill(2) returns before a thread running on another core has
    /// stopped, and such a thread could still answer one more call.
    pub fn freeze(&self) {
        freeze_pid(self.pid());
    }

    pub fn thaw(&self) {
        // SAFETY: a plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    pub async fn client(&self) -> Client {
        Client::connect(&ClientConfig {
            endpoint: self.endpoint(),
            ..Default::default()
        })
        .await
        .expect("connect")
    }

    /// A client sending `token` as its bearer token.
    pub async fn client_with_token(&self, token: &str) -> Client {
        Client::connect(&ClientConfig {
            endpoint: self.endpoint(),
            token: Some(token.to_string()),
            ..Default::default()
        })
        .await
        .expect("connect")
    }

    /// Sends `sig` and waits (up to 30 s) for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: a plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kvtierd did not exit within 30 s of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        if self.terminate_on_drop {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// How a kvtierd that failed at startup exited.
#[derive(Debug)]
pub struct Exited {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A namespace whose blocks are `block_bytes` long (a multiple of 64).
pub fn namespace(model: &str, block_bytes: usize) -> Namespace {
    Namespace::new(
        model,
        KvLayout {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 16,
            block_tokens: (block_bytes / 64) as u32,
            kind: KvKind::Kv,
            dtype: Dtype::F16,
        },
    )
}

/// The key of block `i` in `ns`.
pub fn key(ns: NamespaceId, i: u64) -> BlockKey {
    BlockKey::from_opaque(ns, &i.to_le_bytes())
}

/// Deterministic content of block `i`.
pub fn content(ns: NamespaceId, i: u64, len: usize) -> Vec<u8> {
    kvtier::tier::conformance::content(key(ns, i), len)
}

/// What one run of `kvtier` did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    pub fn expect(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code: {self:?}");
        self
    }
}

/// Runs `kvtier` with `args` against `endpoint` (and `env`), for at most 30 s.
pub fn kvtier(endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(binary("kvtier"));
    cmd.arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("KVTIER_ENDPOINT")
        .env_remove("KVTIER_TOKEN")
        .env_remove("KVTIER_CA_FILE")
        .env_remove("KVTIER_TLS_DOMAIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn kvtier");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for kvtier") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvtier {args:?} ran for more than 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code().expect("kvtier exited, not killed by a signal"),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `GET path` on `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response to its end");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header and a body");
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a Content-Length: {head:?}"));
    assert_eq!(body.len(), len, "the body is as long as announced");
    (status, body.to_string())
}

/// The value of the sample named exactly `series` (name and labels).
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// `n` distinct free TCP ports on 127.0.0.1, for daemons that must know
/// each other's addresses before they start (a cluster's member list).
/// The ports are free when this returns; a daemon binds them soon after.
pub fn free_ports(n: usize) -> Vec<u16> {
    // Below the kernel's ephemeral range (32768 and up on Linux), so no
    // daemon or client binding port 0 can take one between this pick and
    // the bind that uses it; a process-wide cursor keeps concurrent tests
    // from picking the same one, and the start differs per process.
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut out = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if out.len() == n {
            break;
        }
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        // Bindable now: nothing else on this machine holds it.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            out.push(port);
        }
    }
    assert_eq!(out.len(), n, "no {n} free ports in {FIRST}..{}", FIRST + SPAN);
    out
}

/// `n` ports `p` where `p` and `p + 1` are both free (TCP, and UDP for
/// `p + 1`): a gRPC port and the gossip port that follows it by default.
pub fn free_port_pairs(n: usize) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::with_capacity(n);
    for _ in 0..1000 {
        if out.len() == n {
            break;
        }
        // The cursor in `free_ports` hands out increasing ports: two picks
        // in a row are usually neighbours (another test may take one
        // between them: then try again).
        let p = free_ports(1)[0];
        let q = free_ports(1)[0];
        if q == p + 1 && std::net::UdpSocket::bind(("127.0.0.1", q)).is_ok() {
            out.push(p);
        }
    }
    assert_eq!(out.len(), n, "no {n} pairs of free ports");
    out
}

/// Block size of the cluster tests' namespaces.
pub const CLUSTER_BLOCK: usize = 4096;

/// Polls `check` every 20 ms until it answers true, for at most `secs`.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cluster member's view, from its Stats.
pub async fn cluster_stats(c: &Client) -> kvtier_proto::proto::ClusterStats {
    c.stats_reply().await.unwrap().cluster.expect("a cluster member")
}

/// How member `c` sees member `id`.
pub async fn liveness(c: &Client, id: &str) -> String {
    let s = cluster_stats(c).await;
    s.members.into_iter().find(|m| m.id == id).unwrap().liveness
}

/// Keys `range` of `ns`.
pub fn keys(ns: NamespaceId, range: std::ops::Range<u64>) -> Vec<BlockKey> {
    range.map(|i| key(ns, i)).collect()
}

/// The contents of blocks `range` of `ns`, [`CLUSTER_BLOCK`] bytes each.
pub fn data(ns: NamespaceId, range: std::ops::Range<u64>) -> bytes::Bytes {
    let mut b = Vec::new();
    for i in range {
        b.extend_from_slice(&content(ns, i, CLUSTER_BLOCK));
    }
    bytes::Bytes::from(b)
}

/// SIGSTOPs `pid` and waits (up to 10 s) until /proc shows every one of its
/// threads stopped.
pub fn freeze_pid(pid: i32) {
    // SAFETY: a plain kill(2) on a pid the caller owns.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if all_threads_stopped(pid) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not stop within 10 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            // The state follows the parenthesised command name.
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
            .unwrap_or(true)
    })
}
