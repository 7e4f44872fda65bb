//! kvtierd with the Azure Blob tier, against the real Azure Storage
//! emulator, Azurite (installed by scripts/azurite.sh): startup failures,
//! writeback through the daemon, a cache-only node reading what another
//! uploaded, an outage, and a restart with uploads pending.

use kvtier_testkit as common;

use bytes::Bytes;
use common::{Daemon, content, http_get, key, kvtier, namespace, sample};
use kvtier::NamespaceId;
use kvtier::tier::blob::azurite::{self, Azurite};
use kvtier::tier::blob::{BlobConfig, BlobMode};
use kvtier_client::Client;
use kvtier_proto::proto::{self, Tier};
use kvtier_server::config::DaemonConfig;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: usize = 64 << 10;
/// Bytes of an object: the block and its 64-byte record header.
const OBJECT: u64 = BLOCK as u64 + 64;
/// How long one RPC may take.
const RPC: Duration = Duration::from_secs(20);

/// A kvtierd config file holding `blob` (Azurite's key, quick retries).
fn config_file(dir: &Path, blob: BlobConfig) -> PathBuf {
    let cfg = DaemonConfig {
        blob: Some(blob),
        ..DaemonConfig::default()
    };
    let f = dir.join("kvtierd.toml");
    std::fs::write(&f, toml::to_string(&cfg).unwrap()).unwrap();
    f
}

/// A cache-only node configured from the environment alone, as an operator
/// would: `KVTIER_BLOB_*` and the key in `AZURE_STORAGE_ACCOUNT_KEY`.
fn cache_only_env<'a>(az_endpoint: &'a str, container: &'a str) -> [(&'a str, &'a str); 5] {
    [
        ("KVTIER_BLOB_ACCOUNT", azurite::ACCOUNT),
        ("KVTIER_BLOB_CONTAINER", container),
        ("KVTIER_BLOB_ENDPOINT", az_endpoint),
        ("KVTIER_BLOB_MODE", "cache-only"),
        ("AZURE_STORAGE_ACCOUNT_KEY", azurite::KEY),
    ]
}

fn keys(ns: NamespaceId, range: std::ops::Range<u64>) -> Vec<kvtier::BlockKey> {
    range.map(|i| key(ns, i)).collect()
}

fn data(ns: NamespaceId, range: std::ops::Range<u64>) -> Vec<u8> {
    range.flat_map(|i| content(ns, i, BLOCK)).collect()
}

async fn register(c: &Client) -> NamespaceId {
    let (ns, bb) = tokio::time::timeout(RPC, c.register(&namespace("blob", BLOCK)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bb, BLOCK as u64);
    ns
}

async fn put(c: &Client, ns: NamespaceId, range: std::ops::Range<u64>) -> proto::PutResponse {
    tokio::time::timeout(RPC, c.put(ns, &keys(ns, range.clone()), Bytes::from(data(ns, range))))
        .await
        .unwrap()
        .unwrap()
}

/// Gets the blocks of `range` and checks every byte.
async fn assert_get(c: &Client, ns: NamespaceId, range: std::ops::Range<u64>) {
    let g = tokio::time::timeout(RPC, c.get(ns, &keys(ns, range.clone())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.loaded as u64, range.end - range.start, "blocks {range:?}");
    assert!(g.data[..] == data(ns, range.clone())[..], "blocks {range:?} differ");
}

async fn stats(c: &Client) -> proto::StatsResponse {
    tokio::time::timeout(RPC, c.stats_reply()).await.unwrap().unwrap()
}

/// Polls Stats until `done` holds, for at most `limit`.
async fn wait_for(
    c: &Client,
    what: &str,
    limit: Duration,
    done: impl Fn(&proto::StatsResponse) -> bool,
) -> proto::StatsResponse {
    let deadline = Instant::now() + limit;
    loop {
        let s = stats(c).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pending(s: &proto::StatsResponse) -> u64 {
    s.writeback.as_ref().expect("writeback mode").pending_blocks
}

async fn metrics(d: &Daemon) -> String {
    let addr = d.metrics.clone().expect("metrics enabled");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    body
}

#[test]
fn bad_credentials_a_missing_container_or_no_service_stop_kvtierd() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let ep = az.endpoint();

    // Wrong key: startup fails (exit 1, like any startup failure) and says why.
    let mut env = cache_only_env(&ep, "kvtierd-creds");
    assert_eq!(env[4].0, "AZURE_STORAGE_ACCOUNT_KEY");
    env[4].1 = "d3Jvbmcga2V5IHdyb25nIGtleQ==";
    let e = Daemon::start_fails(&dir.path().join("a"), &env);
    assert_eq!(e.status.code(), Some(1), "{e:?}");
    assert!(e.stderr.contains("the credentials were refused"), "{e:?}");
    assert!(e.stderr.contains("kvtierd: open the block manager"), "{e:?}");

    // A container that does not exist (create_container is off by default).
    let e = Daemon::start_fails(&dir.path().join("b"), &cache_only_env(&ep, "kvtierd-absent"));
    assert_eq!(e.status.code(), Some(1), "{e:?}");
    assert!(
        e.stderr.contains("blob container kvtierd-absent does not exist"),
        "{e:?}"
    );

    // Nothing listening at the endpoint.
    let e = Daemon::start_fails(
        &dir.path().join("c"),
        &cache_only_env("http://127.0.0.1:1/devstoreaccount1", "kvtierd-creds"),
    );
    assert_eq!(e.status.code(), Some(1), "{e:?}");
    assert!(e.stderr.contains("unreachable"), "{e:?}");

    // Half a blob tier in the environment is a configuration error: exit 2,
    // before anything is opened.
    let e = Daemon::start_fails(&dir.path().join("d"), &[("KVTIER_BLOB_ACCOUNT", azurite::ACCOUNT)]);
    assert_eq!(e.status.code(), Some(2), "{e:?}");
    assert!(e.stderr.contains("set KVTIER_BLOB_CONTAINER too"), "{e:?}");
    assert!(!dir.path().join("d").exists(), "a configuration error opens nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writeback_through_kvtierd_then_a_cache_only_node_serves_it() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), az.config("kvtierd-wb", BlobMode::Writeback));
    let cfg = cfg.to_str().unwrap();
    let mut d1 = Daemon::start(&dir.path().join("d1"), &[("KVTIER_CONFIG", cfg)]);
    let c = d1.client().await;
    let ns = register(&c).await;
    put(&c, ns, 0..8).await;
    put(&c, ns, 8..12).await;
    let s = wait_for(&c, "every upload", Duration::from_secs(60), |s| {
        pending(s) == 0 && s.writeback.unwrap().uploaded_blocks == 12
    })
    .await;
    let b = s.blob.as_ref().unwrap();
    assert_eq!(b.mode, "writeback");
    assert_eq!((b.put_requests, b.already_present), (12, 0), "{b:?}");
    assert_eq!(b.bytes_up, 12 * OBJECT);
    assert_eq!(b.list_requests, 1, "the startup check");
    assert_eq!((b.request_errors, b.corrupt), (0, 0), "{b:?}");
    let json: serde_json::Value = serde_json::from_str(&s.json).unwrap();
    assert_eq!(json["blob"]["put_requests"], 12);
    assert_eq!(json["writeback"]["uploaded_blocks"], 12);

    let m = metrics(&d1).await;
    assert_eq!(sample(&m, r#"kvtier_blob_requests_total{kind="put"}"#), 12.0);
    assert_eq!(sample(&m, r#"kvtier_blob_requests_total{kind="list"}"#), 1.0);
    assert_eq!(
        sample(&m, r#"kvtier_blob_bytes_total{direction="up"}"#),
        (12 * OBJECT) as f64
    );
    assert_eq!(sample(&m, r#"kvtier_blob_bytes_total{direction="down"}"#), 0.0);
    assert_eq!(sample(&m, "kvtier_blob_corrupt_total"), 0.0);
    assert_eq!(sample(&m, "kvtier_blob_request_errors_total"), 0.0);
    assert_eq!(sample(&m, "kvtier_writeback_pending_blocks"), 0.0);
    assert_eq!(sample(&m, "kvtier_writeback_uploaded_blocks_total"), 12.0);
    assert_eq!(sample(&m, "kvtier_writeback_upload_failures_total"), 0.0);
    assert_eq!(sample(&m, r#"kvtier_blob_info{mode="writeback"}"#), 1.0);

    // The CLI prints the same counters.
    let ep1 = d1.endpoint();
    let cli = tokio::task::spawn_blocking(move || kvtier(&ep1, &[], &["stats"]).expect(0).json())
        .await
        .unwrap();
    assert_eq!(cli["blob"]["put_requests"], 12, "{cli}");
    assert_eq!(cli["writeback"]["pending_blocks"], 0, "{cli}");
    drop(c);
    assert!(d1.signal_and_wait(libc::SIGTERM).success());

    // A second node, empty SSD, cache-only on the same container, set up
    // from the environment alone.
    let ep = az.endpoint();
    let d2 = Daemon::start(&dir.path().join("d2"), &cache_only_env(&ep, "kvtierd-wb"));
    let c = d2.client().await;
    assert_eq!(register(&c).await, ns);
    let all = keys(ns, 0..12);
    let l = tokio::time::timeout(RPC, c.lookup(ns, &all)).await.unwrap().unwrap();
    assert_eq!(l.hit_blocks, 12);
    assert!(l.tiers().all(|t| t == Tier::Blob), "{l:?}");
    let ep2 = d2.endpoint();
    let names: Vec<String> = (0..2).map(|i| format!("{:032x}", key(ns, i).0)).collect();
    let lookup = tokio::task::spawn_blocking(move || {
        let ns_hex = format!("{:032x}", ns.0);
        kvtier(&ep2, &[], &["lookup", "--ns", &ns_hex, "--key", &names.join(",")])
            .expect(0)
            .json()
    })
    .await
    .unwrap();
    assert_eq!(lookup["tiers"], serde_json::json!(["blob", "blob"]), "{lookup}");

    assert_get(&c, ns, 0..12).await;
    // Promoted into the SSD on the way: the second read is local.
    let l = tokio::time::timeout(RPC, c.lookup(ns, &all)).await.unwrap().unwrap();
    assert_eq!(l.hit_blocks, 12);
    assert!(l.tiers().all(|t| t == Tier::Disk), "{l:?}");
    assert_get(&c, ns, 0..12).await;

    let s = stats(&c).await;
    assert!(s.writeback.is_none(), "cache-only has no writeback");
    let b = s.blob.as_ref().unwrap();
    assert_eq!(b.mode, "cache-only");
    assert_eq!((b.put_requests, b.get_requests), (0, 12), "{b:?}");
    assert_eq!(b.bytes_down, 12 * OBJECT);
    assert_eq!(b.hits, 12);
    assert_eq!(s.blob_promotions, 12);
    assert_eq!(
        (s.served_blob_bytes, s.served_local_bytes),
        (12 * BLOCK as u64, 12 * BLOCK as u64)
    );
    assert!(
        (s.throughput_reduction - 0.5).abs() < 1e-9,
        "{}",
        s.throughput_reduction
    );
    let m = metrics(&d2).await;
    assert_eq!(
        sample(&m, r#"kvtier_served_bytes_total{from="blob"}"#),
        (12 * BLOCK) as f64
    );
    assert_eq!(
        sample(&m, r#"kvtier_served_bytes_total{from="local"}"#),
        (12 * BLOCK) as f64
    );
    assert_eq!(sample(&m, "kvtier_throughput_reduction"), 0.5);
    assert_eq!(sample(&m, "kvtier_blob_promotions_total"), 12.0);
    assert_eq!(
        sample(&m, r#"kvtier_blob_bytes_total{direction="down"}"#),
        (12 * OBJECT) as f64
    );
    assert!(!m.contains("kvtier_writeback_"), "cache-only: no writeback series");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_writeback_serves_from_the_ssd_and_uploads_resume() {
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), az.config("kvtierd-outage", BlobMode::Writeback));
    let d = Daemon::start(&dir.path().join("d"), &[("KVTIER_CONFIG", cfg.to_str().unwrap())]);
    let c = d.client().await;
    let ns = register(&c).await;
    put(&c, ns, 0..4).await;
    wait_for(&c, "the first uploads", Duration::from_secs(60), |s| pending(s) == 0).await;

    az.stop();
    // Stores are acknowledged and every block is served from the SSD.
    assert_eq!(put(&c, ns, 4..12).await.stored, 8);
    assert_get(&c, ns, 0..12).await;
    let s = wait_for(&c, "failed upload attempts", Duration::from_secs(60), |s| {
        s.writeback.unwrap().upload_failures > 0
    })
    .await;
    assert_eq!(pending(&s), 8, "{s:?}");
    assert_get(&c, ns, 4..12).await;
    // A lookup past the local blocks answers with the local prefix.
    let mut past = keys(ns, 0..12);
    past.extend(keys(ns, 100..102));
    let l = tokio::time::timeout(RPC, c.lookup(ns, &past)).await.unwrap().unwrap();
    assert_eq!(l.hit_blocks, 12);
    assert!(l.tiers().all(|t| t == Tier::Disk), "{l:?}");
    let m = metrics(&d).await;
    assert_eq!(sample(&m, "kvtier_writeback_pending_blocks"), 8.0);
    assert!(sample(&m, "kvtier_writeback_upload_failures_total") > 0.0);
    assert!(sample(&m, "kvtier_blob_request_errors_total") > 0.0);

    az.start_again();
    let s = wait_for(&c, "the pending uploads", Duration::from_secs(60), |s| pending(s) == 0).await;
    let w = s.writeback.unwrap();
    assert_eq!(w.uploaded_blocks, 12, "{w:?}");
    assert_eq!(w.dropped_blocks, 0, "{w:?}");
    assert_get(&c, ns, 0..12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_uploads_pending_completes_them() {
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), az.config("kvtierd-restart", BlobMode::Writeback));
    let cfg = cfg.to_str().unwrap();
    // A short drain: the stop waits that long for uploads that cannot happen.
    let env = [("KVTIER_CONFIG", cfg), ("KVTIER_DRAIN_TIMEOUT_S", "1")];
    let data = dir.path().join("d");
    let mut d = Daemon::start(&data, &env);
    let c = d.client().await;
    let ns = register(&c).await;
    az.stop();
    assert_eq!(put(&c, ns, 0..10).await.stored, 10);
    assert_eq!(pending(&stats(&c).await), 10);
    drop(c);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "kvtierd exited with {status:?} on SIGTERM");

    // While Azurite is down, kvtierd does not start; the dirty log is kept.
    let e = Daemon::start_fails(&data, &env);
    assert_eq!(e.status.code(), Some(1), "{e:?}");
    assert!(e.stderr.contains("unreachable"), "{e:?}");

    az.start_again();
    let d = Daemon::start(&data, &env);
    let c = d.client().await;
    let s = stats(&c).await;
    assert_eq!(s.writeback.unwrap().resumed_blocks, 10, "{s:?}");
    let s = wait_for(&c, "the resumed uploads", Duration::from_secs(60), |s| pending(s) == 0).await;
    assert_eq!(s.writeback.unwrap().uploaded_blocks, 10, "{s:?}");
    let m = metrics(&d).await;
    assert_eq!(sample(&m, "kvtier_writeback_resumed_blocks_total"), 10.0);
    assert_eq!(sample(&m, "kvtier_writeback_pending_blocks"), 0.0);

    // A cache-only node reads them, byte for byte.
    let ep = az.endpoint();
    let reader = Daemon::start(&dir.path().join("reader"), &cache_only_env(&ep, "kvtierd-restart"));
    let rc = reader.client().await;
    assert_eq!(register(&rc).await, ns);
    assert_get(&rc, ns, 0..10).await;
    assert_eq!(stats(&rc).await.served_blob_bytes, 10 * BLOCK as u64);
}
