//! Azurite, the real Azure Storage emulator, as a child process: for tests
//! and the `kvtier-bench blob` benchmark (feature `azurite`).
//!
//! `scripts/azurite.sh` installs `azurite@3.35.0` (the last release that
//! runs on Node 20) under `~/.cache/kvtier/azurite`; `KVTIER_AZURITE_BIN`
//! overrides the path. Each instance listens on a free 127.0.0.1 port and
//! keeps its data in its own temporary directory, so [`Azurite::stop`] and
//! [`Azurite::start_again`] model an outage that loses nothing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BlobConfig, BlobMode, Credential, Secret};

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its well-known key (public, in Microsoft's documentation).
pub const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running (or stopped) Azurite blob service.
#[derive(Debug)]
pub struct Azurite {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// The `azurite-blob` executable.
pub fn binary() -> PathBuf {
    match std::env::var_os("KVTIER_AZURITE_BIN") {
        Some(b) => b.into(),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/kvtier/azurite/node_modules/.bin/azurite-blob")
        }
    }
}

impl Azurite {
    /// Starts Azurite on a free port. Panics with the fix when it is not
    /// installed or does not start within a minute.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for Azurite");
        let mut az = Self {
            child: None,
            port: 0,
            dir,
        };
        az.spawn();
        az
    }

    #[allow(clippy::zombie_processes)] // waited for in stop()
    fn spawn(&mut self) {
        let bin = binary();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/azurite.sh (./scripts/test.sh does)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &self.port.to_string()])
            .arg("--location")
            .arg(self.dir.path())
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining: Azurite dies of EPIPE when nobody reads its stdout.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("azurite-blob did not start within 60 s on port {}", self.port);
                }
            };
            if let Some(url) = line.split("listens on ").nth(1) {
                let port = url
                    .trim()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no port in Azurite's line {line:?}"));
                self.port = port;
                self.child = Some(child);
                return;
            }
        }
    }

    /// The blob endpoint, path-style with the account.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// The port it listens on (kept across [`Azurite::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A blob config for `container` on this Azurite: the well-known Shared
    /// Key, the container created at startup, quick retries.
    pub fn config(&self, container: &str, mode: BlobMode) -> BlobConfig {
        let mut c = BlobConfig::new(ACCOUNT, container);
        c.endpoint = Some(self.endpoint());
        c.mode = mode;
        c.credential = Credential::AccessKey;
        c.access_key = Some(Secret(KEY.into()));
        c.create_container = true;
        c.retry_min_backoff_ms = 50;
        c.retry_max_backoff_ms = 500;
        c.unavailable_backoff_ms = 200;
        c.max_retries = 1;
        c.request_timeout_ms = 10_000;
        c
    }

    /// Stops the process (SIGTERM, so Azurite saves its metadata; SIGKILL
    /// after 10 s): the service is down, its data kept on disk.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "Azurite is running");
        self.spawn();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
