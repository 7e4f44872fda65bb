//! The blob tier and writeback against the real Azure Storage emulator,
//! Azurite (installed by scripts/azurite.sh), on free 127.0.0.1 ports.

use std::time::{Duration, Instant};

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::manager::{LoadOutcome, ManagerConfig};
use kvtier::tier::blob::azurite::{self, Azurite};
use kvtier::tier::blob::{BlobConfig, BlobMode, Credential, Secret};
use kvtier::tier::conformance::content;
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::{Tier, TierKind};
use kvtier::{BlockKey, BlockManager, ErrorKind, Namespace, NamespaceId};
use object_store::ObjectStoreExt;

const BLOCK: usize = 64 << 10;

/// A namespace whose blocks are 64 KiB.
fn namespace() -> Namespace {
    Namespace::new(
        "blob-tests",
        KvLayout {
            num_layers: 2,
            kv_heads: 4,
            head_dim: 64,
            block_tokens: 32,
            kind: KvKind::Kv,
            dtype: Dtype::F16,
        },
    )
}

/// `n` keys of one request (`seed` tells requests apart).
fn keys(ns: &Namespace, n: usize, seed: u64) -> Vec<BlockKey> {
    (0..n as u64)
        .map(|i| BlockKey::from_opaque(ns.id(), &(seed << 32 | i).to_le_bytes()))
        .collect()
}

fn data(keys: &[BlockKey]) -> Vec<u8> {
    keys.iter().flat_map(|k| content(*k, BLOCK)).collect()
}

fn disk(dir: &std::path::Path) -> DiskConfig {
    let mut d = DiskConfig::new(dir, 8 << 20);
    d.segment_bytes = 1 << 20;
    d
}

fn ssd_with_blob(dir: &std::path::Path, blob: BlobConfig) -> BlockManager {
    let mut c = ManagerConfig::ssd_only(disk(dir));
    c.blob = Some(blob);
    c.build().unwrap()
}

fn register(m: &BlockManager) -> NamespaceId {
    let ns = namespace();
    assert_eq!(ns.block_bytes() as usize, BLOCK);
    m.register_namespace(&ns).unwrap()
}

fn load(m: &BlockManager, ns: NamespaceId, keys: &[BlockKey]) -> (LoadOutcome, Vec<u8>) {
    let mut out = vec![0u8; keys.len() * BLOCK];
    let r = m.load(ns, keys, &mut out).unwrap();
    (r, out)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn writeback_uploads_and_a_fresh_node_reads_through_blob() {
    let az = Azurite::start();
    let d1 = tempfile::tempdir().unwrap();
    let m = ssd_with_blob(d1.path(), az.config("kvtier-wb", BlobMode::Writeback));
    let ns = register(&m);
    let ks = keys(&namespace(), 12, 1);
    let bytes = data(&ks);
    assert_eq!(m.store(ns, &ks, &bytes).unwrap().stored, 12);
    assert!(m.flush_writeback(Duration::from_secs(30)));
    let s = m.stats();
    let b = s.blob.unwrap();
    assert_eq!(b.put_requests, 12, "{b:?}");
    assert_eq!(s.writeback.unwrap().uploaded_blocks, 12);
    assert_eq!(s.writeback.unwrap().pending_blocks, 0);
    // Storing again writes nothing anywhere.
    assert_eq!(m.store(ns, &ks, &bytes).unwrap().present, 12);
    assert!(m.flush_writeback(Duration::from_secs(5)));
    assert_eq!(m.stats().blob.unwrap().put_requests, 12);
    drop(m);

    // Another node, empty SSD, cache-only on the same container.
    let d2 = tempfile::tempdir().unwrap();
    let m2 = ssd_with_blob(d2.path(), az.config("kvtier-wb", BlobMode::CacheOnly));
    let ns2 = register(&m2);
    assert_eq!(ns2, ns);
    let l = m2.lookup(ns, &ks).unwrap();
    assert_eq!(l.tiers, vec![TierKind::Blob; 12]);
    let (r, out) = load(&m2, ns, &ks);
    assert_eq!(r.loaded, 12, "{r:?}");
    assert!(out == bytes, "blob bytes differ");
    // Promoted on the way: the SSD serves the second load.
    assert_eq!(m2.lookup(ns, &ks).unwrap().tiers, vec![TierKind::Disk; 12]);
    let (r, out) = load(&m2, ns, &ks);
    assert_eq!(r.loaded, 12);
    assert!(out == bytes);
    let s = m2.stats();
    assert_eq!(s.blob_promotions, 12);
    assert_eq!(s.served_blob_bytes, (12 * BLOCK) as u64);
    assert_eq!(s.served_local_bytes, (12 * BLOCK) as u64);
    assert!(
        (s.throughput_reduction - 0.5).abs() < 1e-9,
        "{}",
        s.throughput_reduction
    );
    let b = s.blob.unwrap();
    assert_eq!(b.put_requests, 0, "cache-only never writes: {b:?}");
    assert_eq!(b.get_requests, 12);
    assert_eq!(b.tier.bytes_read, (12 * (BLOCK + 64)) as u64);
    // A cache-only node's own stores never reach blob.
    let more = keys(&namespace(), 3, 2);
    m2.store(ns, &more, &data(&more)).unwrap();
    assert!(m2.flush_writeback(Duration::from_secs(1)));
    assert_eq!(m2.stats().blob.unwrap().put_requests, 0);
    assert!(m2.stats().writeback.is_none());
}

#[test]
fn a_blob_altered_behind_kvtiers_back_is_a_counted_miss() {
    let az = Azurite::start();
    let d1 = tempfile::tempdir().unwrap();
    let m = ssd_with_blob(d1.path(), az.config("kvtier-alter", BlobMode::Writeback));
    let ns = register(&m);
    let ks = keys(&namespace(), 4, 3);
    m.store(ns, &ks, &data(&ks)).unwrap();
    assert!(m.flush_writeback(Duration::from_secs(30)));
    let victim = m.blob().unwrap().object_name(ns, ks[2]);
    drop(m);

    // Flip one byte of block 2's data with a plain Azure client.
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(azurite::ACCOUNT)
        .with_access_key(azurite::KEY)
        .with_container_name("kvtier-alter")
        .with_endpoint(az.endpoint())
        .with_allow_http(true)
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let path = object_store::path::Path::from(victim.as_str());
    let mut obj = rt
        .block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() })
        .to_vec();
    obj[64 + 1000] ^= 0x40;
    rt.block_on(store.put(&path, obj.into())).unwrap();

    let d2 = tempfile::tempdir().unwrap();
    let m2 = ssd_with_blob(d2.path(), az.config("kvtier-alter", BlobMode::CacheOnly));
    register(&m2);
    let (r, out) = load(&m2, ns, &ks);
    assert_eq!(r.loaded, 2, "the load stops before the altered block: {r:?}");
    assert!(out[..2 * BLOCK] == data(&ks[..2])[..]);
    assert!(out[2 * BLOCK..].iter().all(|b| *b == 0), "altered bytes were served");
    let b = m2.stats().blob.unwrap();
    assert_eq!(b.tier.corrupt, 1, "{b:?}");
    // A truncated object is refused by its size at lookup.
    let short = m2.blob().unwrap().object_name(ns, ks[1]);
    let path = object_store::path::Path::from(short.as_str());
    rt.block_on(store.put(&path, vec![0u8; 100].into())).unwrap();
    let d3 = tempfile::tempdir().unwrap();
    drop(m2);
    let m3 = ssd_with_blob(d3.path(), az.config("kvtier-alter", BlobMode::CacheOnly));
    register(&m3);
    assert_eq!(m3.lookup(ns, &ks).unwrap().hit_blocks(), 1);
    assert_eq!(m3.stats().blob.unwrap().tier.corrupt, 1);
}

#[test]
fn conditional_create_uploads_a_block_once() {
    let az = Azurite::start();
    let blob = az.config("kvtier-once", BlobMode::Writeback).build().unwrap();
    let ns = NamespaceId(77);
    let k = BlockKey(0xabc);
    let d = content(k, 4096);
    assert_eq!(blob.put(ns, k, &d).unwrap(), kvtier::tier::Stored::Inserted);
    assert_eq!(blob.put(ns, k, &d).unwrap(), kvtier::tier::Stored::Present);
    let s = blob.stats();
    assert_eq!((s.put_requests, s.already_present), (2, 1));
    assert_eq!(s.tier.bytes_written, 4096 + 64);
    let got = blob.fetch_prefix(ns, &[k], 4096);
    assert_eq!(got.len(), 1);
    assert!(got[0].bytes() == &d[..]);
    assert!(blob.delete(ns, k).unwrap());
    assert!(!blob.delete(ns, k).unwrap());
    assert_eq!(blob.present_prefix(ns, &[k], 4096), 0);
}

#[test]
fn wrong_credentials_missing_container_and_no_service_fail_at_startup() {
    let az = Azurite::start();
    // Wrong key.
    let mut c = az.config("kvtier-creds", BlobMode::CacheOnly);
    c.create_container = false;
    c.access_key = Some(Secret("d3Jvbmcga2V5IHdyb25nIGtleQ==".into()));
    let e = c.build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("credentials were refused"), "{e}");
    // Through the manager too, which then changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut mc = ManagerConfig::ssd_only(disk(dir.path()));
    mc.blob = Some(c.clone());
    let e = mc.build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    // A container that does not exist, without create_container.
    let mut c = az.config("kvtier-absent", BlobMode::CacheOnly);
    c.create_container = false;
    let e = c.build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    // Access-key credential with no key anywhere.
    let mut c = az.config("kvtier-creds", BlobMode::CacheOnly);
    c.access_key = None;
    c.credential = Credential::AccessKey;
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_KEY").is_none() {
        let e = c.build().unwrap_err();
        assert!(e.to_string().contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    }
    // Nothing listening: unavailable (retryable), quickly.
    let mut c = az.config("kvtier-creds", BlobMode::CacheOnly);
    c.endpoint = Some("http://127.0.0.1:1/devstoreaccount1".into());
    c.create_container = false;
    let t = Instant::now();
    let e = c.build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    // The same over https (real Azure's scheme): TLS is set up, no panic.
    c.endpoint = Some("https://127.0.0.1:1/devstoreaccount1".into());
    let e = c.build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Writeback without a disk tier is refused before any request.
    let mut mc = ManagerConfig::host_only(kvtier::tier::host::HostConfig::with_capacity(1 << 20));
    mc.blob = Some(az.config("kvtier-creds", BlobMode::Writeback));
    let e = mc.build().unwrap_err();
    assert!(e.to_string().contains("[disk]"), "{e}");
}

#[test]
fn azurite_down_mid_writeback_loses_nothing_and_uploads_resume() {
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let m = ssd_with_blob(dir.path(), az.config("kvtier-outage", BlobMode::Writeback));
    let ns = register(&m);
    let first = keys(&namespace(), 4, 10);
    m.store(ns, &first, &data(&first)).unwrap();
    assert!(m.flush_writeback(Duration::from_secs(30)));
    az.stop();
    // Stores are acknowledged and served from the SSD while blob is down.
    let second = keys(&namespace(), 8, 11);
    assert_eq!(m.store(ns, &second, &data(&second)).unwrap().stored, 8);
    let (r, out) = load(&m, ns, &second);
    assert_eq!(r.loaded, 8);
    assert!(out == data(&second));
    wait_for("failed upload attempts", Duration::from_secs(20), || {
        m.stats().writeback.unwrap().upload_failures > 0
    });
    assert_eq!(m.stats().writeback.unwrap().pending_blocks, 8);
    assert!(!m.flush_writeback(Duration::from_millis(300)));
    // Lookups beyond the local prefix answer promptly with the local part.
    let mut all = second.clone();
    all.extend(keys(&namespace(), 2, 12));
    assert_eq!(m.lookup(ns, &all).unwrap().hit_blocks(), 8);
    az.start_again();
    assert!(m.flush_writeback(Duration::from_secs(30)), "{:?}", m.stats().writeback);
    let w = m.stats().writeback.unwrap();
    assert_eq!((w.pending_blocks, w.uploaded_blocks), (0, 12), "{w:?}");
    drop(m);
    // Everything is in blob, byte for byte.
    let d2 = tempfile::tempdir().unwrap();
    let m2 = ssd_with_blob(d2.path(), az.config("kvtier-outage", BlobMode::CacheOnly));
    register(&m2);
    let mut every = first.clone();
    every.extend(&second);
    // Not one prefix: load each stored request.
    for ks in [&first, &second] {
        let (r, out) = load(&m2, ns, ks);
        assert_eq!(r.loaded, ks.len());
        assert!(out == data(ks));
    }
}

#[test]
fn a_restart_with_pending_uploads_completes_them() {
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = az.config("kvtier-restart", BlobMode::Writeback);
    let ks = keys(&namespace(), 10, 20);
    let ns;
    {
        let m = ssd_with_blob(dir.path(), cfg.clone());
        ns = register(&m);
        az.stop();
        m.store(ns, &ks, &data(&ks)).unwrap();
        assert_eq!(m.stats().writeback.unwrap().pending_blocks, 10);
    }
    az.start_again();
    let m = ssd_with_blob(dir.path(), cfg);
    register(&m);
    assert_eq!(m.stats().writeback.unwrap().resumed_blocks, 10);
    assert!(m.flush_writeback(Duration::from_secs(30)), "{:?}", m.stats().writeback);
    assert_eq!(m.stats().writeback.unwrap().uploaded_blocks, 10);
    drop(m);
    let d2 = tempfile::tempdir().unwrap();
    let m2 = ssd_with_blob(d2.path(), az.config("kvtier-restart", BlobMode::CacheOnly));
    register(&m2);
    let (r, out) = load(&m2, ns, &ks);
    assert_eq!(r.loaded, 10);
    assert!(out == data(&ks));
}

#[test]
fn a_backlog_throttles_stores_instead_of_evicting_unuploaded_blocks() {
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let m = ssd_with_blob(dir.path(), az.config("kvtier-backlog", BlobMode::Writeback));
    let ns = register(&m);
    az.stop();
    // 8 MiB of 1 MiB segments holds about 120 blocks of 64 KiB: store far
    // more, one request per block, until the disk refuses.
    let ks = keys(&namespace(), 400, 30);
    let mut stored = Vec::new();
    let mut throttled = None;
    for k in &ks {
        match m.store(ns, std::slice::from_ref(k), &data(std::slice::from_ref(k))) {
            Ok(_) => stored.push(*k),
            Err(e) => {
                throttled = Some(e);
                break;
            }
        }
    }
    let e = throttled.expect("the backlog must throttle stores");
    assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
    assert!(e.to_string().contains("written back"), "{e}");
    assert!(stored.len() > 50, "only {} stored", stored.len());
    // Every acknowledged block is still on the SSD.
    for k in &stored {
        let (r, out) = load(&m, ns, std::slice::from_ref(k));
        assert_eq!(r.loaded, 1, "acknowledged block {k} was lost");
        assert!(out == content(*k, BLOCK));
    }
    az.start_again();
    assert!(m.flush_writeback(Duration::from_secs(60)), "{:?}", m.stats().writeback);
    // Uploaded blocks may be reclaimed now: stores go on.
    let more = keys(&namespace(), 40, 31);
    for k in &more {
        m.store(ns, std::slice::from_ref(k), &data(std::slice::from_ref(k)))
            .unwrap();
    }
}

#[test]
fn tiered_writeback_uploads_what_the_host_tier_demotes_and_remove_reaches_blob() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let host = kvtier::tier::host::HostConfig::with_capacity((4 * BLOCK) as u64);
    let mut c = ManagerConfig::tiered(Some(host), Some(disk(dir.path())));
    c.blob = Some(az.config("kvtier-tiered", BlobMode::Writeback));
    let m = c.build().unwrap();
    let ns = register(&m);
    // 10 blocks through a 4-block host pool: at least 6 are demoted to the
    // SSD, and every demoted block is uploaded.
    let ks = keys(&namespace(), 10, 40);
    for k in &ks {
        m.store(ns, std::slice::from_ref(k), &data(std::slice::from_ref(k)))
            .unwrap();
    }
    assert!(m.flush_writeback(Duration::from_secs(30)));
    let s = m.stats();
    let on_disk = s.disk.unwrap().usage.blocks;
    assert!(on_disk >= 6, "{on_disk} blocks on disk");
    assert_eq!(s.writeback.unwrap().uploaded_blocks, on_disk);
    assert_eq!(s.blob.unwrap().put_requests, on_disk);
    // Remove deletes everywhere, blob included, in writeback mode.
    let demoted: Vec<BlockKey> = ks.iter().copied().filter(|k| m.disk().unwrap().contains(k)).collect();
    assert_eq!(m.remove(ns, &demoted[..1]).unwrap(), 1);
    assert_eq!(m.stats().blob.unwrap().delete_requests, 1);
    assert_eq!(m.blob().unwrap().present_prefix(ns, &demoted[..1], BLOCK), 0);
    assert_eq!(m.blob().unwrap().present_prefix(ns, &demoted[1..2], BLOCK), 1);
}

#[test]
fn a_promoted_blob_block_is_not_uploaded_again() {
    let az = Azurite::start();
    let d1 = tempfile::tempdir().unwrap();
    let m = ssd_with_blob(d1.path(), az.config("kvtier-promote", BlobMode::Writeback));
    let ns = register(&m);
    let ks = keys(&namespace(), 6, 50);
    m.store(ns, &ks, &data(&ks)).unwrap();
    assert!(m.flush_writeback(Duration::from_secs(30)));
    drop(m);
    // A second writeback node reads them (promoting into its host tier,
    // which demotes to its SSD when full): no PUT for any of them.
    let d2 = tempfile::tempdir().unwrap();
    let host = kvtier::tier::host::HostConfig::with_capacity((2 * BLOCK) as u64);
    let mut c = ManagerConfig::tiered(Some(host), Some(disk(d2.path())));
    c.blob = Some(az.config("kvtier-promote", BlobMode::Writeback));
    let m2 = c.build().unwrap();
    register(&m2);
    let (r, out) = load(&m2, ns, &ks);
    assert_eq!(r.loaded, 6);
    assert!(out == data(&ks));
    assert!(m2.flush_writeback(Duration::from_secs(30)));
    let s = m2.stats();
    assert!(s.disk.unwrap().usage.blocks >= 4, "demotions reached the SSD");
    assert_eq!(s.blob.unwrap().put_requests, 0, "{:?}", s.blob);
}

#[test]
fn replicas_upload_each_key_once_and_take_over_from_a_lost_uploader() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let az = Azurite::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = az.config("kvtier-replicas", BlobMode::Writeback);
    let a = ssd_with_blob(da.path(), cfg.clone());
    let b = ssd_with_blob(db.path(), cfg.clone());
    let ns = register(&a);
    register(&b);
    // Two replicas of every key: a uploads the even keys, b the odd ones.
    // No notices pass between them here: each checks blob for the other's
    // keys after a short bound.
    let even = |k: &BlockKey| k.0.is_multiple_of(2);
    a.set_upload_filter(Arc::new(move |_, k| even(k)));
    b.set_upload_filter(Arc::new(move |_, k| !even(k)));
    for m in [&a, &b] {
        m.set_peer_check_after(Duration::from_millis(200));
    }
    let ks = keys(&namespace(), 16, 60);
    let n_even = ks.iter().filter(|k| even(k)).count() as u64;
    assert!(n_even > 0 && n_even < 16, "the keys split");
    a.store(ns, &ks, &data(&ks)).unwrap();
    b.store(ns, &ks, &data(&ks)).unwrap();
    assert!(a.flush_writeback(Duration::from_secs(30)), "{:?}", a.stats().writeback);
    assert!(b.flush_writeback(Duration::from_secs(30)), "{:?}", b.stats().writeback);
    let (sa, sb) = (a.stats(), b.stats());
    // One PUT per distinct key, not two.
    assert_eq!(sa.blob.unwrap().put_requests + sb.blob.unwrap().put_requests, 16);
    assert_eq!(sa.blob.unwrap().put_requests, n_even);
    assert_eq!(sa.writeback.unwrap().uploaded_by_peers, 16 - n_even);
    assert_eq!(sb.writeback.unwrap().uploaded_by_peers, n_even);
    drop(b);

    // b is lost before uploading its share: a waits, finds the odd keys
    // missing, and takes over once its filter says b is down.
    let b_down = Arc::new(AtomicBool::new(false));
    let flag = b_down.clone();
    a.set_upload_filter(Arc::new(move |_, k| even(k) || flag.load(Ordering::Relaxed)));
    let more = keys(&namespace(), 8, 61);
    a.store(ns, &more, &data(&more)).unwrap();
    let odd = more.iter().filter(|k| !even(k)).count() as u64;
    let checks = a.stats().writeback.unwrap().peer_checks;
    wait_for(
        "a to upload its share and look for b's",
        Duration::from_secs(20),
        || {
            let w = a.stats().writeback.unwrap();
            w.pending_blocks == odd && w.peer_checks >= checks + odd
        },
    );
    b_down.store(true, Ordering::Relaxed);
    // Told the membership changed, a checks b's keys at once (a key whose
    // check is in flight now is uploaded when the check answers absent).
    assert!(a.reconsider_uploads() as u64 <= odd);
    assert!(a.flush_writeback(Duration::from_secs(30)), "{:?}", a.stats().writeback);
    assert_eq!(a.stats().blob.unwrap().put_requests, n_even + 8);
    // Every key of both requests reads back from blob on a fresh node.
    let dc = tempfile::tempdir().unwrap();
    let c = ssd_with_blob(dc.path(), az.config("kvtier-replicas", BlobMode::CacheOnly));
    register(&c);
    for k in [&ks, &more] {
        let (r, out) = load(&c, ns, k);
        assert_eq!(r.loaded, k.len());
        assert!(out == data(k));
    }
}

/// Carries the blob notices of `from` to `to` (what kvtierd's cluster does
/// over gRPC); answers how many.
fn carry_notices(from: &BlockManager, to: &BlockManager) -> usize {
    use kvtier::replication::landed::Outcome;
    let n = from.take_blob_notices(usize::MAX);
    for x in &n {
        assert_eq!(x.outcome, Outcome::Landed);
        to.blob_landed(x.ns, &[x.key]);
    }
    n.len()
}

#[test]
fn replicas_told_that_a_key_landed_never_ask_blob() {
    use std::sync::Arc;
    let az = Azurite::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = az.config("kvtier-notices", BlobMode::Writeback);
    let a = ssd_with_blob(da.path(), cfg.clone());
    let b = ssd_with_blob(db.path(), cfg);
    let ns = register(&a);
    register(&b);
    let even = |k: &BlockKey| k.0.is_multiple_of(2);
    a.set_upload_filter(Arc::new(move |_, k| even(k)));
    b.set_upload_filter(Arc::new(move |_, k| !even(k)));
    for m in [&a, &b] {
        // Far beyond this test: any check of blob would be a notice lost.
        m.set_peer_check_after(Duration::from_secs(600));
        m.collect_blob_notices();
    }
    let ks = keys(&namespace(), 24, 62);
    let n_even = ks.iter().filter(|k| even(k)).count() as u64;
    assert!(n_even > 0 && n_even < 24, "the keys split");
    a.store(ns, &ks, &data(&ks)).unwrap();
    b.store(ns, &ks, &data(&ks)).unwrap();
    let mut carried = 0;
    wait_for(
        "both writebacks to drain on notices alone",
        Duration::from_secs(30),
        || {
            carried += carry_notices(&a, &b) + carry_notices(&b, &a);
            a.stats().writeback.unwrap().pending_blocks == 0 && b.stats().writeback.unwrap().pending_blocks == 0
        },
    );
    assert_eq!(carried, 24, "one notice per key, from its uploader");
    let (sa, sb) = (a.stats(), b.stats());
    let (ba, bb) = (sa.blob.unwrap(), sb.blob.unwrap());
    assert_eq!((ba.put_requests, bb.put_requests), (n_even, 24 - n_even));
    assert_eq!((ba.head_requests, bb.head_requests), (0, 0), "no check of blob");
    let (wa, wb) = (sa.writeback.unwrap(), sb.writeback.unwrap());
    assert_eq!((wa.confirmed_by_peers, wb.confirmed_by_peers), (24 - n_even, n_even));
    assert_eq!((wa.peer_checks, wb.peer_checks), (0, 0));
    // And every key is in blob.
    let dc = tempfile::tempdir().unwrap();
    let c = ssd_with_blob(dc.path(), az.config("kvtier-notices", BlobMode::CacheOnly));
    register(&c);
    let (r, out) = load(&c, ns, &ks);
    assert_eq!(r.loaded, 24);
    assert!(out == data(&ks));
}

#[test]
fn a_checkpoint_restores_on_another_node_from_blob() {
    use kvtier::checkpoint::{Checkpoints, LocalChunks};
    use std::sync::Arc;
    const CHUNK: u32 = 256 << 10;
    let az = Azurite::start();
    let d1 = tempfile::tempdir().unwrap();
    let src = d1.path().join("src");
    std::fs::create_dir_all(src.join("model")).unwrap();
    let shard: Vec<u8> = (0..(CHUNK as usize * 5 / 2)).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(src.join("model/shard-0.bin"), &shard).unwrap();
    std::fs::write(src.join("config.json"), b"{}").unwrap();
    let ck_ns = Namespace::checkpoints("job-1", CHUNK);
    let cfg = az.config("kvtier-ckpt", BlobMode::Writeback);
    let m1 = Arc::new(ssd_with_blob(&d1.path().join("ssd"), cfg));
    let ns = m1.register_namespace(&ck_ns).unwrap();
    let c1 = Checkpoints::new(LocalChunks::new(m1.clone(), ns, d1.path().join("catalog")), ns, CHUNK);
    let man = c1.put_dir("step-7", &src).unwrap();
    assert!(m1.flush_writeback(Duration::from_secs(30)));
    // Every chunk plus the manifest went to blob once.
    assert_eq!(m1.stats().blob.unwrap().put_requests as usize, man.chunks() + 1);

    // Another node with an empty SSD restores it through blob.
    let d2 = tempfile::tempdir().unwrap();
    let m2 = Arc::new(ssd_with_blob(
        &d2.path().join("ssd"),
        az.config("kvtier-ckpt", BlobMode::CacheOnly),
    ));
    assert_eq!(m2.register_namespace(&ck_ns).unwrap(), ns);
    let c2 = Checkpoints::new(LocalChunks::new(m2.clone(), ns, d2.path().join("catalog")), ns, CHUNK);
    let out = d2.path().join("restore");
    c2.get("step-7", &out).unwrap();
    assert_eq!(std::fs::read(out.join("model/shard-0.bin")).unwrap(), shard);
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");
    assert_eq!(m2.stats().served_blob_bytes, man.bytes() + man_bytes(&man));
}

fn man_bytes(m: &kvtier::checkpoint::manifest::Manifest) -> u64 {
    m.encode().len() as u64
}
