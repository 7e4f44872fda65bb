//! Against the real Azure Storage emulator, Azurite (installed by
//! scripts/azurite.sh), on a free 127.0.0.1 port, in memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvtier::tier::blob::container::{SharedKey, create_container};
use object_store::ObjectStoreExt;

/// Azurite's well-known development account.
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azurite {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Azurite {
    #[allow(clippy::zombie_processes)] // waited for in Drop
    fn start() -> Azurite {
        let bin = std::env::var("KVTIER_AZURITE_BIN").unwrap_or_else(|_| {
            let home = std::env::var("HOME").expect("HOME");
            format!("{home}/.cache/kvtier/azurite/node_modules/.bin/azurite-blob")
        });
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: run scripts/azurite.sh (./scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence"])
            .args(["--skipApiVersionCheck", "--disableTelemetry"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start azurite-blob");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining: Azurite logs every request to stdout and dies of
        // EPIPE when nobody reads it.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("azurite did not start within 60 s");
            if let Some(url) = line.split("listens on ").nth(1) {
                return Azurite {
                    child,
                    endpoint: format!("{}/{ACCOUNT}", url.trim()),
                    _dir: dir,
                };
            }
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn container_creation_and_an_object_store_round_trip() {
    let az = Azurite::start();
    let cred = SharedKey {
        account: ACCOUNT.into(),
        key: KEY.into(),
    };
    assert!(create_container(&az.endpoint, &cred, "kvtier-test").await.unwrap());
    // Creating it again is not an error.
    assert!(!create_container(&az.endpoint, &cred, "kvtier-test").await.unwrap());
    // Wrong credentials are a clear configuration error.
    let bad = SharedKey {
        account: ACCOUNT.into(),
        key: "d3Jvbmcga2V5".into(),
    };
    let e = create_container(&az.endpoint, &bad, "kvtier-other").await.unwrap_err();
    assert_eq!(e.kind(), kvtier::ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("credentials were refused"), "{e}");
    // A bad name changes nothing remotely.
    assert!(create_container(&az.endpoint, &cred, "No").await.is_err());
    // The container serves object_store's Azure client.
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(ACCOUNT)
        .with_access_key(KEY)
        .with_container_name("kvtier-test")
        .with_endpoint(az.endpoint.clone())
        .with_allow_http(true)
        .build()
        .unwrap();
    let path = object_store::path::Path::from("ab/ns/key");
    store
        .put(&path, bytes::Bytes::from_static(b"kv block").into())
        .await
        .unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"kv block");
    // An unreachable endpoint is a retryable outage, not a hang.
    drop(az);
    let e = create_container("http://127.0.0.1:1/devstoreaccount1", &cred, "kvtier-test")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), kvtier::ErrorKind::Unavailable, "{e}");
}
