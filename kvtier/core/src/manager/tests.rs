use super::store::{OFFLOAD_BATCH_BYTES, OFFLOAD_BATCH_JOBS, next_jobs, put_disk_batch};
use super::*;
use crate::block::{Dtype, KvKind, KvLayout, SequenceHasher};
use crate::tier::conformance::content;
use crate::tier::disk::DiskConfig;
use crate::tier::host::HostConfig;
use crate::tier::{Stored, Tier, TierKind};
use std::collections::HashMap;
use std::path::Path;

const BLOCK: u64 = 64 * 1024;

/// A namespace whose blocks are 64 KiB.
fn ns(model: &str) -> Namespace {
    Namespace::new(
        model,
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

fn keys(n: &Namespace, blocks: usize, seed: u32) -> Vec<BlockKey> {
    let tokens: Vec<u32> = (0..blocks as u32 * 32).map(|t| t.wrapping_mul(31) ^ seed).collect();
    SequenceHasher::for_namespace(n)
        .hash_all(&tokens)
        .iter()
        .map(|h| h.key)
        .collect()
}

fn data(keys: &[BlockKey]) -> Vec<u8> {
    keys.iter().flat_map(|k| content(*k, BLOCK as usize)).collect()
}

fn disk_cfg(dir: &Path) -> DiskConfig {
    DiskConfig {
        segment_bytes: 1 << 20,
        ..DiskConfig::new(dir, 16 << 20)
    }
}

fn load_all(m: &BlockManager, id: NamespaceId, ks: &[BlockKey]) -> (LoadOutcome, Vec<u8>) {
    let mut out = vec![0u8; ks.len() * BLOCK as usize];
    let r = m.load(id, ks, &mut out).unwrap();
    (r, out)
}

#[test]
fn host_round_trip_and_prefix_lookup() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 8, 1);
    let out = m.store(id, &ks[..5], &data(&ks[..5])).unwrap();
    assert_eq!(out.stored, 5);
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.hit_blocks(), 5);
    assert!(l.tiers.iter().all(|t| *t == TierKind::Host));
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 5);
    assert!(r.failed.is_none());
    assert!(bytes[..5 * BLOCK as usize] == data(&ks[..5])[..]);
    let s = m.stats();
    assert_eq!((s.stored_blocks, s.loaded_blocks, s.missed_blocks), (5, 5, 3));
    // Storing again writes nothing.
    assert_eq!(m.store(id, &ks[..5], &data(&ks[..5])).unwrap().present, 5);
}

#[test]
fn bad_requests_change_nothing() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let ks = keys(&n, 2, 1);
    // Not registered yet.
    let e = m.store(n.id(), &ks, &data(&ks)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace, "{e}");
    assert_eq!(m.lookup(n.id(), &ks).unwrap_err().kind(), ErrorKind::UnknownNamespace);
    let id = m.register_namespace(&n).unwrap();
    let mut d = data(&ks);
    d.pop();
    let e = m.store(id, &ks, &d).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BlockSize);
    assert!(
        e.to_string().contains("needs a buffer of 131072 bytes, got 131071"),
        "{e}"
    );
    let mut out = vec![0u8; 3];
    assert_eq!(m.load(id, &ks, &mut out).unwrap_err().kind(), ErrorKind::BlockSize);
    let s = m.stats();
    assert_eq!(s.stored_blocks, 0);
    assert_eq!(s.host.unwrap().usage.blocks, 0);
    // An invalid namespace is refused at registration.
    let mut bad = n.clone();
    bad.tp_size = 0;
    assert_eq!(
        m.register_namespace(&bad).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn namespaces_never_share_blocks() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let a = m.register_namespace(&ns("model-a")).unwrap();
    let b = m.register_namespace(&ns("model-b")).unwrap();
    // The same engine-provided hashes in two namespaces.
    let ka: Vec<_> = (0..3u8).map(|i| BlockKey::from_opaque(a, &[i; 32])).collect();
    let kb: Vec<_> = (0..3u8).map(|i| BlockKey::from_opaque(b, &[i; 32])).collect();
    m.store(a, &ka, &data(&ka)).unwrap();
    assert_eq!(m.lookup(b, &kb).unwrap().hit_blocks(), 0);
    assert_eq!(m.lookup(a, &ka).unwrap().hit_blocks(), 3);
}

#[test]
fn eviction_cascades_to_disk_and_hits_promote() {
    let d = tempfile::tempdir().unwrap();
    let m = ManagerConfig::tiered(Some(HostConfig::with_capacity(4 * BLOCK)), Some(disk_cfg(d.path())))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 10, 2);
    m.store(id, &ks, &data(&ks)).unwrap();
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.hit_blocks(), 10);
    assert_eq!(l.tiers[0], TierKind::Disk, "the oldest blocks were demoted");
    assert_eq!(l.tiers[9], TierKind::Host);
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 10);
    assert!(bytes == data(&ks));
    // Every host block was leased by that load: nothing could be promoted.
    assert_eq!(m.stats().promotions, 0);
    assert_eq!(m.stats().offloaded, 6);
    // Loading the disk-resident head promotes it, demoting host blocks.
    let (r, bytes) = load_all(&m, id, &ks[..3]);
    assert_eq!(r.loaded, 3);
    assert!(bytes == data(&ks[..3]));
    let s = m.stats();
    assert_eq!(s.promotions, 3);
    assert!(s.host.unwrap().evictions >= 9);
    assert!(s.disk.unwrap().hits >= 9);
    assert!(m.host().unwrap().contains(&ks[0]));
    // Nothing was lost on the way: the whole prefix is still present.
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 10);
}

#[test]
fn write_through_reaches_disk_and_a_full_queue_throttles() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::tiered(Some(HostConfig::with_capacity(32 * BLOCK)), Some(disk_cfg(d.path())));
    cfg.cascade = Cascade::WriteThrough;
    cfg.offload_queue_blocks = 4;
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 6, 3);
    // Six new blocks cannot fit a queue of four: refused whole.
    let e = m.store(id, &ks, &data(&ks)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
    assert_eq!(
        m.lookup(id, &ks).unwrap().hit_blocks(),
        0,
        "a throttled store changed something"
    );
    assert_eq!(m.stats().throttled, 1);
    m.store(id, &ks[..4], &data(&ks[..4])).unwrap();
    m.flush();
    m.store(id, &ks[4..], &data(&ks[4..])).unwrap();
    m.flush();
    let disk = m.disk().unwrap();
    assert!(ks.iter().all(|k| disk.contains(k)));
    assert_eq!(m.stats().offload_queue_depth, 0);
    assert_eq!(m.stats().offloaded, 6);
}

#[test]
fn several_offload_workers_write_every_block_once_and_drain_on_drop() {
    let d = tempfile::tempdir().unwrap();
    let n = ns("m");
    let ks = keys(&n, 40, 5);
    for workers in [0, 65] {
        let mut cfg = ManagerConfig::tiered(Some(HostConfig::with_capacity(64 * BLOCK)), Some(disk_cfg(d.path())));
        cfg.offload_workers = workers;
        let e = cfg.build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{workers}: {e}");
    }
    {
        let mut cfg = ManagerConfig::tiered(Some(HostConfig::with_capacity(64 * BLOCK)), Some(disk_cfg(d.path())));
        cfg.cascade = Cascade::WriteThrough;
        cfg.offload_workers = 4;
        cfg.offload_queue_blocks = 64;
        let m = cfg.build().unwrap();
        let id = m.register_namespace(&n).unwrap();
        for c in ks.chunks(8) {
            m.store(id, c, &data(c)).unwrap();
        }
        // Dropped without a flush: the workers drain the queue first.
    }
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let id = m.register_namespace(&n).unwrap();
    let mut out = vec![0u8; ks.len() * BLOCK as usize];
    assert_eq!(m.load(id, &ks, &mut out).unwrap().loaded, ks.len());
    assert!(out == data(&ks), "every block reached the SSD intact");
}

#[test]
fn ssd_only_survives_restart() {
    let d = tempfile::tempdir().unwrap();
    let n = ns("m");
    let ks = keys(&n, 12, 4);
    {
        let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
        let id = m.register_namespace(&n).unwrap();
        assert!(m.host().is_none());
        assert_eq!(m.store(id, &ks, &data(&ks)).unwrap().stored, 12);
    }
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let id = m.register_namespace(&n).unwrap();
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.hit_blocks(), 12);
    assert!(l.tiers.iter().all(|t| *t == TierKind::Disk));
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 12);
    assert!(bytes == data(&ks));
    assert_eq!(m.stats().promotions, 0);
}

#[test]
fn list_keys_pages_in_key_order_across_tiers_and_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let n = ns("m");
    let ks = keys(&n, 12, 7);
    let mut sorted = ks.clone();
    sorted.sort();
    let pages = |m: &BlockManager, id: NamespaceId| {
        let (mut all, mut after, mut sizes) = (Vec::new(), None, Vec::new());
        loop {
            let (page, more) = m.list_keys(id, after, 5).unwrap();
            sizes.push(page.len());
            after = page.last().copied();
            all.extend(page);
            if !more {
                return (all, sizes);
            }
        }
    };
    let on_disk = {
        // Host and disk: blocks in either tier are listed once.
        let m = ManagerConfig::tiered(Some(HostConfig::with_capacity(4 * BLOCK)), Some(disk_cfg(d.path())))
            .build()
            .unwrap();
        let id = m.register_namespace(&n).unwrap();
        assert_eq!(m.list_keys(id, None, 5).unwrap(), (vec![], false));
        m.store(id, &ks, &data(&ks)).unwrap();
        let other = m.register_namespace(&ns("other")).unwrap();
        assert_eq!(m.list_keys(other, None, 5).unwrap(), (vec![], false));
        let (all, sizes) = pages(&m, id);
        assert_eq!(all, sorted);
        assert_eq!(sizes, [5, 5, 2]);
        // Bad requests: precise errors.
        for max in [0, MAX_LIST_KEYS + 1] {
            let e = m.list_keys(id, None, max).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains("1 to 65536 keys"), "{e}");
        }
        let e = m.list_keys(ns("never").id(), None, 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownNamespace, "{e}");
        assert_eq!(m.list_keys(id, sorted.last().copied(), 5).unwrap(), (vec![], false));
        m.locate(id, &sorted)
            .unwrap()
            .iter()
            .zip(&sorted)
            .filter(|(t, _)| t.contains(TierKind::Disk))
            .map(|(_, k)| *k)
            .collect::<Vec<_>>()
    };
    assert!(on_disk.len() >= 8, "the host tier holds 4 of the 12 blocks");
    // Reopened, the disk's index lists what it kept.
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let id = m.register_namespace(&n).unwrap();
    assert_eq!(pages(&m, id).0, on_disk);
}

#[test]
fn admission_keeps_one_off_blocks_off_disk() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::ssd_only(disk_cfg(d.path()));
    cfg.disk_admission_min_seen = 2;
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 3, 5);
    let first = m.store(id, &ks, &data(&ks)).unwrap();
    assert_eq!((first.stored, first.not_admitted), (0, 3));
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 0);
    let second = m.store(id, &ks, &data(&ks)).unwrap();
    assert_eq!(second.stored, 3);
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 3);
}

#[test]
fn a_lease_keeps_blocks_from_eviction() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(2 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 4, 6);
    m.store(id, &ks[..1], &data(&ks[..1])).unwrap();
    let lease = m.lease(id, &ks[..1]).unwrap();
    assert_eq!(lease.len(), 1);
    // Two more blocks in a pool of two: the leased one must stay.
    m.store(id, &ks[1..3], &data(&ks[1..3])).unwrap();
    assert!(m.host().unwrap().contains(&ks[0]));
    assert!(!m.host().unwrap().contains(&ks[1]));
    let mut out = vec![0u8; BLOCK as usize];
    assert_eq!(m.load_leased(&lease, &mut out).unwrap().loaded, 1);
    assert!(out == data(&ks[..1]));
    // With every block leased, a store is throttled and changes nothing.
    let lease2 = m.lease(id, &ks[2..3]).unwrap();
    let e = m.store(id, &ks[3..4], &data(&ks[3..4])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
    drop((lease, lease2));
    m.store(id, &ks[3..4], &data(&ks[3..4])).unwrap();
}

#[test]
fn corrupt_block_stops_the_load_and_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 4, 7);
    m.store(id, &ks, &data(&ks)).unwrap();
    // Corrupt block 2's bytes on disk, behind the tier's back.
    let seg = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let raw = std::fs::read(&seg).unwrap();
    let needle = &content(ks[2], BLOCK as usize)[..64];
    let at = raw.windows(64).position(|w| w == needle).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[raw[at] ^ 1], at as u64).unwrap();
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 2);
    let f = r.failed.unwrap();
    assert_eq!((f.index, f.kind), (2, ErrorKind::ChecksumMismatch));
    assert!(bytes[..2 * BLOCK as usize] == data(&ks[..2])[..]);
    let s = m.stats();
    assert_eq!(s.load_failures, 1);
    assert_eq!(s.disk.unwrap().corrupt, 1);
    // Never served again: the prefix now ends before it.
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 2);
}

#[test]
fn config_from_toml() {
    let c = ManagerConfig::from_toml(
        r#"
        mode = "ssd-only"
        disk_admission_min_seen = 2
        [disk]
        dir = "/var/lib/kvtier"
        capacity_bytes = 1073741824
        "#,
    )
    .unwrap();
    assert_eq!(c.mode, Mode::SsdOnly);
    assert_eq!(c.disk.as_ref().unwrap().segment_bytes, 256 << 20);
    let e = ManagerConfig::from_toml("mode = \"tiered\"\ncapacity = 3\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("unknown field"), "{e}");
    let mut bad = c.clone();
    bad.host = Some(HostConfig::with_capacity(1 << 20));
    let e = bad.build().unwrap_err();
    assert!(e.to_string().contains("ssd-only mode takes no [host] tier"), "{e}");
    let e = ManagerConfig::tiered(None, None).build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[test]
fn example_config_in_deploy_parses() {
    let text = include_str!("../../../../deploy/kvtier.toml");
    let c = ManagerConfig::from_toml(text).unwrap();
    assert!(c.disk.is_some());
}

#[test]
fn a_worker_takes_the_jobs_already_queued_together() {
    let host = HostConfig::with_capacity(256 << 20).build(None).unwrap();
    let nsid = NamespaceId(9);
    let job = |i: u128, len: usize| {
        let key = BlockKey(i + 1);
        host.put(nsid, key, &content(key, len)).unwrap();
        Job {
            ns: nsid,
            key,
            pin: host.pin_host(&key).unwrap(),
        }
    };
    let (tx, rx) = sync_channel::<Job>(128);
    let rx = Mutex::new(rx);
    // Capped by count.
    for i in 0..70 {
        tx.send(job(i, 4096)).unwrap();
    }
    assert_eq!(next_jobs(&rx).unwrap().len(), OFFLOAD_BATCH_JOBS);
    assert_eq!(next_jobs(&rx).unwrap().len(), 70 - OFFLOAD_BATCH_JOBS);
    // Capped by bytes: the job that reaches the cap is the last taken.
    for i in 100..106 {
        tx.send(job(i, 1 << 20)).unwrap();
    }
    let first = next_jobs(&rx).unwrap();
    assert_eq!(first.len(), OFFLOAD_BATCH_BYTES >> 20);
    assert_eq!(first[0].key, BlockKey(101), "in queue order");
    assert_eq!(next_jobs(&rx).unwrap().len(), 6 - (OFFLOAD_BATCH_BYTES >> 20));
    drop(tx);
    assert!(next_jobs(&rx).is_none(), "closed and empty");
}

#[test]
fn batched_disk_writes_keep_writeback_per_block() {
    let d = tempfile::tempdir().unwrap();
    let disk = disk_cfg(&d.path().join("disk")).build().unwrap();
    let wb = Writeback::open(d.path(), false, |k| disk.contains(k)).unwrap();
    let nsid = NamespaceId(9);
    let k = |i: u128| BlockKey(i);
    let small = |i: u128| content(k(i), 6000);
    disk.put(nsid, k(1), &small(1)).unwrap();
    let (b2, b3, b4) = (small(2), small(3), small(4));
    let items = [
        (nsid, k(1), small(1).as_slice().to_vec()),
        (nsid, k(2), b2.clone()),
        (nsid, k(2), b2.clone()),
        (nsid, k(3), b3.clone()),
        (nsid, k(5), Vec::new()),
        (nsid, k(4), b4.clone()),
    ];
    let items: Vec<_> = items.iter().map(|(n, k, v)| (*n, *k, v.as_slice())).collect();
    let r = put_disk_batch(&disk, Some(&wb), &items);
    let got: Vec<_> = r.iter().map(|r| r.as_ref().map_err(|e| e.kind()).copied()).collect();
    assert_eq!(
        got,
        [
            Ok(Stored::Present),
            Ok(Stored::Inserted),
            Ok(Stored::Present),
            Ok(Stored::Inserted),
            Err(ErrorKind::InvalidArgument),
            Ok(Stored::Inserted),
        ]
    );
    assert_eq!(disk.batched_writes(), 1, "blocks 2, 3 and 4 in one write");
    // Written blocks are pending upload; the present one and the failed
    // one are not.
    assert!(!wb.retains(&k(1)));
    assert!(wb.retains(&k(2)) && wb.retains(&k(3)) && wb.retains(&k(4)));
    assert!(!wb.retains(&k(5)));
    assert_eq!(wb.stats().pending_blocks, 3);
    // Without writeback, the same batch goes straight to disk.
    let r = put_disk_batch(&disk, None, &items);
    assert!(r.iter().filter(|r| r.is_ok()).all(|r| matches!(r, Ok(Stored::Present))));
}

#[test]
fn a_lease_says_how_many_leading_blocks_are_whole() {
    // A checkpoint namespace: whole chunks, then a short last chunk.
    let chunk = 1 << 20;
    let m = ManagerConfig::host_only(HostConfig {
        pin_memory: false,
        ..HostConfig::with_capacity(8 << 20)
    })
    .build()
    .unwrap();
    let id = m
        .register_namespace(&Namespace::checkpoints("g", chunk as u32))
        .unwrap();
    let ks = [BlockKey(1), BlockKey(2), BlockKey(3)];
    m.store_one(id, ks[0], &vec![1u8; chunk]).unwrap();
    m.store_one(id, ks[1], &vec![2u8; chunk]).unwrap();
    m.store_one(id, ks[2], &[3u8; 100]).unwrap();
    let mut lease = m.lease(id, &ks).unwrap();
    assert_eq!(lease.len(), 3);
    assert_eq!(lease.whole_blocks(chunk), 2);
    // The whole run loads into whole-block slots without a failed load;
    // the short chunk is read on its own.
    lease.truncate(2);
    let mut out = vec![0u8; 2 * chunk];
    assert_eq!(m.load_leased(&lease, &mut out).unwrap().loaded, 2);
    assert_eq!(m.load_one(id, ks[2]).unwrap().unwrap(), vec![3u8; 100]);
    assert_eq!(m.stats().load_failures, 0);
}

/// Fills every slot of a reservation with its key's content.
fn fill(r: &mut Reservation<'_>) {
    let keys = r.keys().to_vec();
    for (slot, k) in r.slots_mut().into_iter().zip(keys) {
        if let Some(b) = slot {
            b.copy_from_slice(&content(k, BLOCK as usize));
        }
    }
}

/// Reserves, fills and commits `ks` a reservation at a time, as an engine
/// saving straight from its tensors does; answers the coverage of each.
fn reserve_all(m: &BlockManager, id: NamespaceId, ks: &[BlockKey]) -> (StoreOutcome, Vec<usize>) {
    let (mut total, mut runs, mut done) = (StoreOutcome::default(), Vec::new(), 0);
    while done < ks.len() {
        let mut r = m.reserve(id, &ks[done..]).unwrap();
        assert!(!r.is_empty(), "a reservation covers at least one key");
        runs.push(r.len());
        done += r.len();
        fill(&mut r);
        let o = r.commit().unwrap();
        total.stored += o.stored;
        total.present += o.present;
        total.not_admitted += o.not_admitted;
    }
    (total, runs)
}

/// Loads through `load_with`, collecting the runs the sink saw.
fn load_runs(m: &BlockManager, id: NamespaceId, ks: &[BlockKey]) -> (LoadOutcome, Vec<(usize, usize)>, Vec<u8>) {
    let (mut runs, mut bytes) = (Vec::new(), Vec::new());
    let r = m
        .load_with(id, ks, |first, blocks| {
            assert_eq!(first, bytes.len() / BLOCK as usize, "runs come in order");
            runs.push((first, blocks.len()));
            for b in blocks {
                bytes.extend_from_slice(b);
            }
            Ok(())
        })
        .unwrap();
    (r, runs, bytes)
}

#[test]
fn a_reservation_is_invisible_until_commit() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 4, 11);
    let mut r = m.reserve(id, &ks[..3]).unwrap();
    assert_eq!((r.len(), r.block_bytes()), (3, BLOCK as usize));
    fill(&mut r);
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 0);
    assert_eq!(load_all(&m, id, &ks[..3]).0.loaded, 0);
    assert_eq!(
        m.remove(id, &ks[..3]).unwrap(),
        0,
        "a removal does not see reserved blocks"
    );
    assert_eq!(m.host().unwrap().usage().blocks, 0);
    let out = r.commit().unwrap();
    assert_eq!(
        out,
        StoreOutcome {
            stored: 3,
            present: 0,
            not_admitted: 0
        }
    );
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 3);
    let (r, bytes) = load_all(&m, id, &ks[..3]);
    assert_eq!((r.loaded, r.failed), (3, None));
    assert!(bytes == data(&ks[..3]));
    let s = m.stats();
    assert_eq!((s.stores, s.stored_blocks), (1, 3));
    // The same blocks again: present, nothing to fill.
    let mut again = m.reserve(id, &ks[..3]).unwrap();
    assert!(again.slots_mut().iter().all(Option::is_none));
    assert_eq!(again.commit().unwrap().present, 3);
}

#[test]
fn a_dropped_reservation_frees_its_space_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::tiered(Some(HostConfig::with_capacity(8 * BLOCK)), Some(disk_cfg(d.path())));
    cfg.cascade = Cascade::WriteThrough;
    cfg.offload_queue_blocks = 4;
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 3, 12);
    let mut r = m.reserve(id, &ks).unwrap();
    fill(&mut r);
    assert_eq!(m.stats().offload_queue_depth, 3, "write-through room is held");
    assert!(m.host().unwrap().usage().used_bytes > 0);
    drop(r);
    m.flush();
    assert_eq!(m.stats().offload_queue_depth, 0);
    assert_eq!(m.host().unwrap().usage().used_bytes, 0);
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 0);
    assert!(ks.iter().all(|k| !m.disk().unwrap().contains(k)));
    assert_eq!(m.stats().stored_blocks, 0);
    // The space is free for the next store.
    assert_eq!(m.store(id, &ks, &data(&ks)).unwrap().stored, 3);
}

#[test]
fn a_reservation_reports_present_keys_and_keeps_their_bytes() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 4, 13);
    m.store(id, &ks[0..1], &data(&ks[0..1])).unwrap();
    m.store(id, &ks[2..3], &data(&ks[2..3])).unwrap();
    let mut r = m.reserve(id, &ks).unwrap();
    let free: Vec<bool> = r.slots_mut().iter().map(Option::is_some).collect();
    assert_eq!(free, [false, true, false, true]);
    // Scribble on the free slots only; a present block is never touched.
    for b in r.slots_mut().into_iter().flatten() {
        b.fill(0xee);
    }
    fill(&mut r);
    let out = r.commit().unwrap();
    assert_eq!((out.stored, out.present), (2, 2));
    let (l, bytes) = load_all(&m, id, &ks);
    assert_eq!(l.loaded, 4);
    assert!(bytes == data(&ks));
}

#[test]
fn reservations_evict_under_pressure_and_cascade() {
    let d = tempfile::tempdir().unwrap();
    let m = ManagerConfig::tiered(Some(HostConfig::with_capacity(4 * BLOCK)), Some(disk_cfg(d.path())))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 10, 14);
    // A pool of four blocks: a reservation covers what it holds, and the
    // next one evicts the committed blocks to disk, as stores do.
    let (out, runs) = reserve_all(&m, id, &ks);
    assert_eq!(out.stored, 10);
    assert_eq!(runs, [4, 4, 2]);
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.hit_blocks(), 10);
    assert_eq!(l.tiers[0], TierKind::Disk, "the oldest blocks were demoted");
    assert_eq!(l.tiers[9], TierKind::Host);
    assert_eq!(m.stats().offloaded, 6);
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 10);
    assert!(bytes == data(&ks));
    // Every host block leased: a reservation is throttled and changes nothing.
    let lease = m.lease(id, &ks[6..]).unwrap();
    assert_eq!(lease.tiers(), [TierKind::Host; 4]);
    let extra = keys(&n, 1, 15);
    let e = m.reserve(id, &extra).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
    assert_eq!(m.stats().throttled, 1);
    assert_eq!(m.lookup(id, &extra).unwrap().hit_blocks(), 0);
    assert_eq!(m.host().unwrap().usage().blocks, 4);
    drop(lease);
    assert_eq!(reserve_all(&m, id, &extra).0.stored, 1);
}

#[test]
fn write_through_reservations_hold_queue_room() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::tiered(Some(HostConfig::with_capacity(32 * BLOCK)), Some(disk_cfg(d.path())));
    cfg.cascade = Cascade::WriteThrough;
    cfg.offload_queue_blocks = 4;
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 6, 16);
    let mut r = m.reserve(id, &ks).unwrap();
    assert_eq!(r.len(), 4, "covers what the queue takes");
    let e = m.reserve(id, &ks[4..]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
    assert_eq!(m.lookup(id, &ks[4..]).unwrap().hit_blocks(), 0);
    fill(&mut r);
    assert_eq!(r.commit().unwrap().stored, 4);
    m.flush();
    assert_eq!(reserve_all(&m, id, &ks[4..]).0.stored, 2);
    m.flush();
    let disk = m.disk().unwrap();
    assert!(ks.iter().all(|k| disk.contains(k)));
    let s = m.stats();
    assert_eq!((s.offloaded, s.offload_queue_depth, s.throttled), (6, 0, 1));
}

#[test]
fn ssd_only_reservations_stage_for_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    // More blocks than one staging buffer holds (8 MiB of 64 KiB blocks).
    let ks = keys(&n, 130, 17);
    let (out, runs) = reserve_all(&m, id, &ks);
    assert_eq!(out.stored, 130);
    assert_eq!(runs, [128, 2]);
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.hit_blocks(), 130);
    assert!(l.tiers.iter().all(|t| *t == TierKind::Disk));
    // Disk blocks come out through scratch, a buffer's worth per run.
    let (r, runs, bytes) = load_runs(&m, id, &ks);
    assert_eq!((r.loaded, r.failed), (130, None));
    assert_eq!(runs, [(0, 128), (128, 2)]);
    assert!(bytes == data(&ks));
    // Present keys need no staging room: a full run of them is covered.
    let (out, runs) = reserve_all(&m, id, &ks);
    assert_eq!((out.stored, out.present), (0, 130));
    assert_eq!(runs, [130]);
}

#[test]
fn ssd_only_reservations_respect_admission() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::ssd_only(disk_cfg(d.path()));
    cfg.disk_admission_min_seen = 2;
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 3, 18);
    let mut r = m.reserve(id, &ks).unwrap();
    assert!(r.slots_mut().iter().all(Option::is_none), "nothing admitted yet");
    let first = r.commit().unwrap();
    assert_eq!((first.stored, first.not_admitted), (0, 3));
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 0);
    let (second, _) = reserve_all(&m, id, &ks);
    assert_eq!(second.stored, 3);
    let (r, bytes) = load_all(&m, id, &ks);
    assert_eq!(r.loaded, 3);
    assert!(bytes == data(&ks));
    assert_eq!(m.stats().not_admitted, 3);
}

#[test]
fn a_direct_load_hands_out_verified_bytes_and_stops_at_a_corrupt_block() {
    let d = tempfile::tempdir().unwrap();
    let m = ManagerConfig::tiered(Some(HostConfig::with_capacity(2 * BLOCK)), Some(disk_cfg(d.path())))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let ks = keys(&n, 5, 19);
    m.store(id, &ks, &data(&ks)).unwrap();
    let l = m.lookup(id, &ks).unwrap();
    assert_eq!(l.tiers[..3], [TierKind::Disk; 3]);
    assert_eq!(l.tiers[3..], [TierKind::Host; 2]);
    // Host and disk blocks in one run; a miss ends it.
    let mut with_miss = ks.clone();
    with_miss.extend(keys(&n, 1, 20));
    let (r, runs, bytes) = load_runs(&m, id, &with_miss);
    assert_eq!((r.loaded, r.failed), (5, None));
    assert_eq!(runs, [(0, 5)]);
    assert!(bytes == data(&ks));
    assert_eq!(m.stats().missed_blocks, 1);
    // Corrupt block 1's bytes on disk, behind the tier's back.
    let seg = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let raw = std::fs::read(&seg).unwrap();
    let needle = &content(ks[1], BLOCK as usize)[..64];
    let at = raw.windows(64).position(|w| w == needle).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[raw[at] ^ 1], at as u64).unwrap();
    let (r, runs, bytes) = load_runs(&m, id, &ks);
    assert_eq!(r.loaded, 1);
    let f = r.failed.unwrap();
    assert_eq!((f.index, f.kind), (1, ErrorKind::ChecksumMismatch));
    assert_eq!(runs, [(0, 1)], "the corrupt block is never handed out");
    assert!(bytes == data(&ks[..1]));
    assert_eq!(m.stats().disk.unwrap().corrupt, 1);
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 1);
    // A sink that fails ends the load with its error.
    let e = m
        .load_with(id, &ks, |_, _| Err(Error::new(ErrorKind::Io, "copy failed")))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}

/// Applies a page of tier events to a reader's view of where blocks are.
fn apply_events(view: &mut HashMap<BlockKey, crate::events::TierSet>, page: &EventPage) {
    use crate::events::Change;
    for e in &page.events {
        let mut s = view.get(&e.key).copied().unwrap_or_default();
        match e.change {
            Change::Stored => s.insert(e.tier),
            Change::Removed => {
                s = s.iter().filter(|t| *t != e.tier).collect();
            }
        }
        if s.is_empty() {
            view.remove(&e.key);
        } else {
            view.insert(e.key, s);
        }
    }
}

/// Reads every event since `page`, applying them to `view`.
fn drain_events(
    m: &BlockManager,
    id: NamespaceId,
    page: &mut EventPage,
    view: &mut HashMap<BlockKey, crate::events::TierSet>,
) {
    loop {
        let next = m.events(id, page.epoch, page.cursor, 7).unwrap();
        assert!(!next.resync, "a reader that keeps up never resyncs");
        let done = next.events.is_empty();
        apply_events(view, &next);
        *page = next;
        if done {
            return;
        }
    }
}

fn assert_view_matches(
    m: &BlockManager,
    id: NamespaceId,
    all: &[BlockKey],
    view: &HashMap<BlockKey, crate::events::TierSet>,
) {
    let located = m.locate(id, all).unwrap();
    for (k, s) in all.iter().zip(located) {
        assert_eq!(view.get(k).copied().unwrap_or_default(), s, "block {k}");
    }
}

#[test]
fn tier_events_follow_every_store_demotion_eviction_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskConfig {
        segment_bytes: 1 << 20,
        ..DiskConfig::new(dir.path(), 4 << 20)
    };
    let m = ManagerConfig::tiered(Some(HostConfig::with_capacity(4 * BLOCK)), Some(disk))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let mut page = m.events(id, 0, 0, 10).unwrap();
    assert!(page.resync, "a first read resyncs");
    let mut view = HashMap::new();
    let ks = keys(&n, 120, 3);
    // Ten blocks into a host tier of four: six are demoted to disk.
    m.store(id, &ks[..10], &data(&ks[..10])).unwrap();
    drain_events(&m, id, &mut page, &mut view);
    assert_view_matches(&m, id, &ks, &view);
    let on = |t| view.values().filter(|s| s.contains(t)).count();
    assert_eq!((on(TierKind::Host), on(TierKind::Disk)), (4, 6));
    // Deletes leave every tier.
    m.remove(id, &ks[..3]).unwrap();
    drain_events(&m, id, &mut page, &mut view);
    assert_view_matches(&m, id, &ks, &view);
    // A disk of four 1 MiB segments overflows: its oldest segments go.
    for chunk in ks[10..].chunks(10) {
        m.store(id, chunk, &data(chunk)).unwrap();
        drain_events(&m, id, &mut page, &mut view);
    }
    assert_view_matches(&m, id, &ks, &view);
    assert!(
        m.disk()
            .unwrap()
            .counters()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(view.len() < ks.len() - 3, "evicted blocks left the view");
}

#[test]
fn a_reader_that_falls_behind_resyncs_and_locate_rebuilds_its_view() {
    let cfg = ManagerConfig {
        event_capacity: 4,
        ..ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
    };
    let m = cfg.build().unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    let page = m.events(id, 0, 0, 10).unwrap();
    let ks = keys(&n, 10, 4);
    m.store(id, &ks, &data(&ks)).unwrap();
    let behind = m.events(id, page.epoch, page.cursor, 100).unwrap();
    assert!(behind.resync, "ten events through a ring of four");
    assert_eq!(behind.cursor, 10);
    // Re-read the state, then go on from the cursor.
    let mut view: HashMap<_, _> = ks
        .iter()
        .zip(m.locate(id, &ks).unwrap())
        .filter(|(_, s)| !s.is_empty())
        .map(|(k, s)| (*k, s))
        .collect();
    assert_eq!(view.len(), 10);
    m.remove(id, &ks[..2]).unwrap();
    let mut page = behind;
    drain_events(&m, id, &mut page, &mut view);
    assert_view_matches(&m, id, &ks, &view);
    assert_eq!(view.len(), 8);
}

#[test]
fn event_reads_and_locates_check_their_input() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let e = m.events(NamespaceId(9), 0, 0, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace);
    let e = m.locate(NamespaceId(9), &[BlockKey(1)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace);
    let id = m.register_namespace(&ns("m")).unwrap();
    let e = m
        .locate(id, &vec![BlockKey(1); crate::events::MAX_READ + 1])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(m.events(id, 0, 0, 0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(m.locate(id, &[BlockKey(1)]).unwrap()[0].is_empty());
}

#[test]
fn a_namespace_nobody_reads_keeps_no_events() {
    let m = ManagerConfig::host_only(HostConfig::with_capacity(16 * BLOCK))
        .build()
        .unwrap();
    let n = ns("m");
    let id = m.register_namespace(&n).unwrap();
    for i in 0..20 {
        let ks = keys(&n, 8, 100 + i);
        m.store(id, &ks, &data(&ks)).unwrap();
    }
    assert!(m.shared.events.rings().is_empty());
}

#[test]
fn a_late_delete_takes_only_copies_written_before_it() {
    let d = tempfile::tempdir().unwrap();
    let n = ns("m");
    let ks = keys(&n, 4, 9);
    let m = ManagerConfig::ssd_only(disk_cfg(d.path())).build().unwrap();
    let id = m.register_namespace(&n).unwrap();
    assert_eq!(m.store(id, &ks, &data(&ks)).unwrap().stored, 4);
    let deleted_at = crate::tier::now_ms() + 1;
    std::thread::sleep(std::time::Duration::from_millis(3));
    // Put again after the delete: these copies acknowledge it.
    assert_eq!(m.store(id, &ks[..2], &data(&ks[..2])).unwrap().stored, 0);
    // A namespace this node never registered: refused, nothing removed.
    let e = m.remove_written_before(NamespaceId(7), &ks, deleted_at).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::UnknownNamespace, "{e}");
    assert_eq!(m.lookup(id, &ks).unwrap().hit_blocks(), 4);
    assert_eq!(m.remove_written_before(id, &ks, deleted_at).unwrap(), 2);
    let l = m.lookup(id, &ks[..2]).unwrap();
    assert_eq!(l.hit_blocks(), 2);
    assert_eq!(m.lookup(id, &ks[2..]).unwrap().hit_blocks(), 0);
    let (r, bytes) = load_all(&m, id, &ks[..2]);
    assert_eq!(r.loaded, 2);
    assert!(bytes == data(&ks[..2]));
}
