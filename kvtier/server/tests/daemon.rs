//! Process tests: real kvtierd processes on 127.0.0.1.

use kvtier_testkit as common;

use bytes::Bytes;
use common::{Daemon, content, key, namespace};
use kvtier::ErrorKind;
use kvtier::NamespaceId;
use kvtier_client::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

const BLOCK: usize = 256 * 1024;

async fn put(c: &Client, ns: NamespaceId, i: u64) -> kvtier::Result<()> {
    c.put(ns, &[key(ns, i)], Bytes::from(content(ns, i, BLOCK)))
        .await
        .map(drop)
}

async fn assert_block(c: &Client, ns: NamespaceId, i: u64) {
    let g = c.get(ns, &[key(ns, i)]).await.unwrap();
    assert_eq!(g.loaded, 1, "block {i} missing");
    assert!(g.data[..] == content(ns, i, BLOCK)[..], "block {i} altered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_serves_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    let (ns, bb) = c.register(&namespace("restart", BLOCK)).await.unwrap();
    assert_eq!(bb, BLOCK as u64);
    for i in 0..40 {
        put(&c, ns, i).await.unwrap();
    }
    // Many blocks in one request, too.
    let keys: Vec<_> = (40..48).map(|i| key(ns, i)).collect();
    let data: Vec<u8> = (40..48).flat_map(|i| content(ns, i, BLOCK)).collect();
    assert_eq!(c.put(ns, &keys, Bytes::from(data)).await.unwrap().stored, 8);
    drop(c);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "kvtierd exited with {status:?} on SIGTERM");

    let d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    // The namespace came back from the registry: no need to register again.
    let l = c
        .lookup(ns, &(0..48).map(|i| key(ns, i)).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(l.hit_blocks, 48);
    for i in 0..48 {
        assert_block(&c, ns, i).await;
    }
    let g = c.get(ns, &keys).await.unwrap();
    assert_eq!(g.loaded, 8);
    let stats: serde_json::Value = serde_json::from_str(&c.stats().await.unwrap()).unwrap();
    assert_eq!(stats["mode"], "ssd-only");
    assert_eq!(stats["disk"]["corrupt"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_puts_loses_no_acknowledged_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("crash", BLOCK)).await.unwrap();
    // Four writers stream puts; each records the blocks acknowledged to it.
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (c, acked, next) = (c.clone(), acked.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 5000 {
                    break;
                }
                match put(&c, ns, i).await {
                    Ok(()) => acked.lock().push(i),
                    // The daemon died under us: stop.
                    Err(_) => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().len() < 200 {
        assert!(Instant::now() < deadline, "writers made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Puts are in flight right now.
    let status = d.signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().clone();
    let tried = next.load(Ordering::Relaxed);
    drop(c);

    let d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    for &i in &acked {
        assert_block(&c, ns, i).await;
    }
    // Whatever else is there (puts cut short) is whole, never torn.
    let mut extra = 0;
    for i in 0..tried {
        if acked.contains(&i) {
            continue;
        }
        let g = c.get(ns, &[key(ns, i)]).await.unwrap();
        assert!(g.failed_index.is_none(), "block {i}: {}", g.failed_reason);
        if g.loaded == 1 {
            assert!(
                g.data[..] == content(ns, i, BLOCK)[..],
                "unacknowledged block {i} is torn"
            );
            extra += 1;
        }
    }
    eprintln!(
        "{} acknowledged blocks intact, {extra} in-flight blocks whole, {tried} tried",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_lose_nothing() {
    let clients: u64 = std::env::var("KVTIER_TEST_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let secs: u64 = std::env::var("KVTIER_TEST_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let capacity = 2u64 << 30;
    // Within the disk's capacity, so that nothing is evicted: a fast enough
    // daemon fills any capacity in time, and an evicted block is not lost.
    let per_client = (capacity * 3 / 4 / (clients * 64 * 1024)).min(2000);
    let d = Daemon::start(dir.path(), &[("KVTIER_DISK_CAPACITY_BYTES", &capacity.to_string())]);
    let first = d.client().await;
    let (ns, _) = first.register(&namespace("many", 64 * 1024)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..clients {
        // Each client its own connection, as separate engine workers are.
        let c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut stored = Vec::new();
            let mut i = 0u64;
            // Bounded in count as well as time.
            while Instant::now() < deadline && i < per_client {
                let id = w * 1_000_000 + i;
                let k = key(ns, id);
                let data = kvtier::tier::conformance::content(k, 64 * 1024);
                let mut tries = 0;
                loop {
                    match c.put(ns, &[k], Bytes::from(data.clone())).await {
                        Ok(_) => break,
                        // Both are "retry" in the error model: a throttled
                        // put (every staging buffer busy for longer than the
                        // tier waits, as on a loaded machine) stored nothing.
                        Err(s) if matches!(s.kind(), ErrorKind::Unavailable | ErrorKind::Throttled) && tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(s) => panic!("client {w}: put {i}: {s}"),
                    }
                }
                stored.push(id);
                // Read back something this client stored earlier.
                let back = stored[(i as usize * 7919) % stored.len()];
                let g = c
                    .get(ns, &[key(ns, back)])
                    .await
                    .unwrap_or_else(|s| panic!("client {w}: get: {s}"));
                assert_eq!(g.loaded, 1, "client {w}: block {back} lost");
                assert!(g.data[..] == kvtier::tier::conformance::content(key(ns, back), 64 * 1024)[..]);
                let l = c.lookup(ns, &[key(ns, back)]).await.unwrap();
                assert_eq!(l.hit_blocks, 1);
                i += 1;
            }
            stored
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    // At the end every block of every client is still there.
    let c = d.client().await;
    for chunk in all.chunks(512) {
        let keys: Vec<_> = chunk.iter().map(|i| key(ns, *i)).collect();
        let l = c.lookup(ns, &keys).await.unwrap();
        assert_eq!(l.hit_blocks as usize, keys.len(), "blocks lost");
    }
    let stats: serde_json::Value = serde_json::from_str(&c.stats().await.unwrap()).unwrap();
    assert_eq!(stats["stored_blocks"].as_u64().unwrap(), all.len() as u64);
    eprintln!("{clients} clients stored and verified {} blocks in {secs} s", all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[("KVTIER_MAX_REQUEST_BYTES", &(4 * BLOCK).to_string())]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("bad", BLOCK)).await.unwrap();
    put(&c, ns, 0).await.unwrap();
    let before = c.stats().await.unwrap();

    // A block of the wrong size.
    let e = c
        .put(ns, &[key(ns, 1)], Bytes::from(vec![1u8; BLOCK - 1]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BlockSize);
    assert!(
        e.message()
            .contains(&format!("put ended after {} of {BLOCK} bytes", BLOCK - 1)),
        "{}",
        e.message()
    );
    let e = c
        .put(ns, &[key(ns, 1)], Bytes::from(vec![1u8; BLOCK + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BlockSize);
    assert!(e.message().contains("carries more than 1 blocks"), "{}", e.message());
    // An unknown namespace.
    let other = NamespaceId(42);
    let e = c
        .put(other, &[key(other, 1)], Bytes::from(vec![0u8; BLOCK]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace);
    assert!(e.message().contains("is not registered"), "{}", e.message());
    assert_eq!(
        c.lookup(other, &[key(other, 1)]).await.unwrap_err().kind(),
        ErrorKind::UnknownNamespace
    );
    // An oversize request: more than max_request_bytes.
    let keys: Vec<_> = (10..15).map(|i| key(ns, i)).collect();
    let e = c.put(ns, &keys, Bytes::from(vec![0u8; 5 * BLOCK])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    assert!(e.message().contains("exceeds max_request_bytes"), "{}", e.message());
    assert_eq!(c.get(ns, &keys).await.unwrap_err().kind(), ErrorKind::TooLarge);
    // Malformed: keys of the wrong length, no keys, a bad layout.
    let mut raw = kvtier_proto::proto::kv_tier_client::KvTierClient::connect(d.endpoint())
        .await
        .unwrap();
    let e = raw
        .lookup(kvtier_proto::proto::LookupRequest {
            namespace_id: Bytes::copy_from_slice(&ns.0.to_le_bytes()),
            keys: vec![Bytes::from_static(b"short")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("key 0 must be 16 bytes, got 5"), "{}", e.message());
    let e = c.lookup(ns, &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = raw
        .put(tokio_stream::iter(vec![kvtier_proto::proto::PutRequest {
            msg: Some(kvtier_proto::proto::put_request::Msg::Data(Bytes::from_static(b"x"))),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("first Put message must be a header"),
        "{}",
        e.message()
    );
    let mut bad_ns = namespace("bad", BLOCK);
    bad_ns.layout.head_dim = 0;
    let e = c.register(&bad_ns).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("head_dim"), "{}", e.message());

    // Nothing was stored by any of them.
    let after = c.stats().await.unwrap();
    let (b, a): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    assert_eq!(a["stored_blocks"], b["stored_blocks"]);
    assert_eq!(a["disk"]["usage"], b["disk"]["usage"]);
    assert_block(&c, ns, 0).await;
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_is_resource_exhausted_and_keeps_stored_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("KVTIER_SKIP_MOUNT_TESTS").is_some() {
            eprintln!("skipped: mounting a tmpfs needs root (KVTIER_SKIP_MOUNT_TESTS is set)");
            return;
        }
        panic!("mount -t tmpfs failed: run as root, or set KVTIER_SKIP_MOUNT_TESTS=1 to skip");
    }
    let _m = Mount(dir.path().to_path_buf());
    let data = dir.path().join("data");
    let d = Daemon::start(&data, &[]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("full", BLOCK)).await.unwrap();
    // Fill most of the filesystem behind kvtierd's back, then store until
    // the disk is full.
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..64 {
        match put(&c, ns, i).await {
            Ok(()) => stored.push(i),
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
        if i == 3 {
            std::fs::write(dir.path().join("filler"), vec![0u8; 3 << 20]).ok();
        }
    }
    let s = refused.expect("a 4 MiB filesystem took 64 blocks of 256 KiB");
    assert_eq!(s.kind(), ErrorKind::NoSpace, "{s}");
    assert!(s.to_string().contains("no space"), "{s}");
    // Everything acknowledged is still served, intact.
    let l = c
        .lookup(ns, &stored.iter().map(|i| key(ns, *i)).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(l.hit_blocks >= 1);
    for &i in &stored {
        let g = c.get(ns, &[key(ns, i)]).await.unwrap();
        if g.loaded == 1 {
            assert!(g.data[..] == content(ns, i, BLOCK)[..], "block {i} altered");
        }
    }
    // Space back: stores work again.
    std::fs::remove_file(dir.path().join("filler")).unwrap();
    put(&c, ns, 100).await.unwrap();
    assert_block(&c, ns, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_answering_fails_calls_as_unavailable_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let c = Client::connect(&kvtier_client::ClientConfig {
        endpoint: d.endpoint(),
        request_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = c.register(&namespace("frozen", BLOCK)).await.unwrap().0;
    put(&c, ns, 0).await.unwrap();
    // Frozen: it accepts nothing and answers nothing, the connection stays.
    d.freeze();
    let t = Instant::now();
    let e = c.lookup(ns, &[key(ns, 0)]).await.unwrap_err();
    let waited = t.elapsed();
    d.thaw();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(waited < Duration::from_secs(5), "the call waited {waited:?}");
    // Thawed, the same client answers.
    assert_eq!(c.lookup(ns, &[key(ns, 0)]).await.unwrap().hit_blocks, 1);
}

/// Block bytes cross the streamed path byte for byte: blocks larger than
/// one data message (so blocks straddle messages), a request of many
/// messages, and every mix of this client (which frames the bytes by hand)
/// with tonic's generated one (a generic gRPC client) on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blocks_round_trip_byte_for_byte_with_any_grpc_client() {
    use kvtier_proto::proto::{self, kv_tier_client::KvTierClient};
    let block = 3 << 20;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            ("KVTIER_MODE", "tiered"),
            ("KVTIER_HOST_CAPACITY_BYTES", &(128u64 << 20).to_string()),
            ("KVTIER_MAX_REQUEST_BYTES", &(64u64 << 20).to_string()),
        ],
    );
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("large", block)).await.unwrap();
    let ns_id = bytes::Bytes::copy_from_slice(&ns.0.to_le_bytes());
    let key_bytes = |i: u64| bytes::Bytes::copy_from_slice(&key(ns, i).to_le_bytes());
    let mut generic = KvTierClient::connect(d.endpoint())
        .await
        .unwrap()
        .max_decoding_message_size(kvtier_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kvtier_proto::MAX_MESSAGE_BYTES);
    // 5 blocks of 3 MiB in one request: 15 MiB in 4 data messages.
    let first: Vec<u64> = (0..5).collect();
    let data: Vec<u8> = first.iter().flat_map(|i| content(ns, *i, block)).collect();
    let keys: Vec<_> = first.iter().map(|i| key(ns, *i)).collect();
    assert_eq!(c.put(ns, &keys, Bytes::from(data.clone())).await.unwrap().stored, 5);
    // The same blocks back through both clients.
    let g = c.get(ns, &keys).await.unwrap();
    assert_eq!(g.loaded, 5);
    assert!(g.data[..] == data[..], "this client's get altered the bytes");
    let mut out = vec![0u8; data.len()];
    assert_eq!(c.get_into(ns, &keys, &mut out).await.unwrap().loaded, 5);
    assert!(out == data, "get_into altered the bytes");
    let mut s = generic
        .get(proto::GetRequest {
            namespace_id: ns_id.clone(),
            keys: first.iter().map(|i| key_bytes(*i)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    let mut messages = 0;
    while let Some(m) = s.message().await.unwrap() {
        messages += 1;
        match m.msg {
            Some(proto::get_response::Msg::Header(h)) => assert_eq!((messages, h.loaded), (1, 5)),
            Some(proto::get_response::Msg::Data(d)) => back.extend_from_slice(&d),
            None => panic!("an empty message"),
        }
    }
    assert_eq!(messages, 1 + data.len().div_ceil(kvtier_proto::CHUNK_BYTES));
    assert!(back == data, "a generic client's get altered the bytes");
    // Blocks a generic client puts (in pieces of its own size, 1 MiB)
    // come back whole through this client.
    let second: Vec<u64> = (10..13).collect();
    let data: Vec<u8> = second.iter().flat_map(|i| content(ns, *i, block)).collect();
    let mut msgs = vec![proto::PutRequest {
        msg: Some(proto::put_request::Msg::Header(proto::PutHeader {
            namespace_id: ns_id.clone(),
            keys: second.iter().map(|i| key_bytes(*i)).collect(),
        })),
    }];
    msgs.extend(data.chunks(1 << 20).map(|d| proto::PutRequest {
        msg: Some(proto::put_request::Msg::Data(bytes::Bytes::copy_from_slice(d))),
    }));
    let r = generic.put(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    assert_eq!(r.stored, 3);
    let keys: Vec<_> = second.iter().map(|i| key(ns, *i)).collect();
    let g = c.get(ns, &keys).await.unwrap();
    assert_eq!(g.loaded, 3);
    assert!(g.data[..] == data[..], "blocks a generic client put came back altered");
    // A request whose bytes are one block short is refused and stores
    // nothing, whichever client sends it.
    let short = Bytes::from(data[..2 * block].to_vec());
    let fresh: Vec<_> = (20..23).map(|i| key(ns, i)).collect();
    let e = c.put(ns, &fresh, short).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BlockSize, "{e}");
    assert_eq!(c.lookup(ns, &fresh).await.unwrap().hit_blocks, 0);
}
