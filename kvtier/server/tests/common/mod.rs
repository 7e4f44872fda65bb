//! Starts real kvtierd processes on 127.0.0.1 with free ports and
//! temporary directories, for the process tests.
#![allow(dead_code, unreachable_pub)]

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::{BlockKey, Namespace, NamespaceId};
use kvtier_server::client::{Client, ClientConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running kvtierd; killed when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub grpc: String,
    pub metrics: Option<String>,
    pub data_dir: PathBuf,
}

impl Daemon {
    /// Starts kvtierd with `data_dir` and extra environment, and waits (up to
    /// 30 s) until it prints its addresses.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtierd"));
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
        let mut child = cmd.spawn().expect("spawn kvtierd");
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
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut grpc, mut metrics) = (None, None);
        while grpc.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(a) = l.strip_prefix("kvtierd listening on ") {
                        grpc = Some(a.to_string());
                    } else if let Some(a) = l.strip_prefix("kvtierd metrics on ") {
                        metrics = Some(a.to_string());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    panic!("kvtierd exited before serving: {status}");
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("kvtierd did not start within 30 s");
                }
            }
        }
        Daemon {
            child: Some(child),
            grpc: grpc.expect("set above"),
            metrics,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub async fn client(&self) -> Client {
        Client::connect(&ClientConfig {
            endpoint: self.endpoint(),
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A namespace whose blocks are `block_bytes` long (a multiple of 64).
pub fn namespace(model: &str, block_bytes: usize) -> Namespace {
    Namespace {
        model_id: model.into(),
        revision: String::new(),
        layout: KvLayout {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 16,
            block_tokens: (block_bytes / 64) as u32,
            kind: KvKind::Kv,
            dtype: Dtype::F16,
        },
        tp_rank: 0,
        tp_size: 1,
        salt: None,
        lora: None,
    }
}

/// The key of block `i` in `ns`.
pub fn key(ns: NamespaceId, i: u64) -> BlockKey {
    BlockKey::from_opaque(ns, &i.to_le_bytes())
}

/// Deterministic content of block `i`.
pub fn content(ns: NamespaceId, i: u64, len: usize) -> Vec<u8> {
    kvtier::tier::conformance::content(key(ns, i), len)
}
