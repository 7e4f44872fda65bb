//! The tier-event feed, Locate and ListKeys through a real kvtierd on
//! 127.0.0.1.

use kvtier_testkit as common;

use common::{Daemon, data, keys, namespace};
use kvtier::ErrorKind;
use kvtier::TierKind;
use kvtier::events::Change;
use kvtier::{BlockKey, NamespaceId};
use kvtier_client::Client;

const BLOCK: usize = common::CLUSTER_BLOCK;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_the_wire_and_a_restart_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("events", BLOCK)).await.unwrap();
    let first = c.events(ns, 0, 0, 100).await.unwrap();
    assert!(first.resync, "a first read resyncs");
    assert_eq!(first.cursor, 0);
    c.put(ns, &keys(ns, 0..3), data(ns, 0..3)).await.unwrap();
    c.delete(ns, &keys(ns, 1..2)).await.unwrap();
    let p = c.events(ns, first.epoch, first.cursor, 100).await.unwrap();
    assert!(!p.resync);
    let got: Vec<_> = p.events.iter().map(|e| (e.seq, e.change, e.tier, e.key)).collect();
    let k = keys(ns, 0..3);
    assert_eq!(
        got,
        [
            (1, Change::Stored, TierKind::Disk, k[0]),
            (2, Change::Stored, TierKind::Disk, k[1]),
            (3, Change::Stored, TierKind::Disk, k[2]),
            (4, Change::Removed, TierKind::Disk, k[1]),
        ]
    );
    let located = c.locate(ns, &k).await.unwrap();
    let on_disk: Vec<bool> = located.iter().map(|s| s.contains(TierKind::Disk)).collect();
    assert_eq!(on_disk, [true, false, true]);

    // Malformed reads: precise errors, and the feed is as it was.
    let e = c.events(ns, p.epoch, p.cursor, 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("1 to 65536 events"), "{e}");
    let e = c.events(ns, p.epoch, p.cursor + 1, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("past the last event"), "{e}");
    let e = c.events(kvtier::NamespaceId(42), 0, 0, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace, "{e}");
    let e = c.locate(ns, &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let again = c.events(ns, first.epoch, first.cursor, 100).await.unwrap();
    assert_eq!(again.events, p.events);

    // Restarted, the daemon has another epoch: the reader is told to
    // resync, and Locate shows what the SSD kept.
    drop(c);
    d.signal_and_wait(libc::SIGTERM);
    let d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    let r = c.events(ns, p.epoch, p.cursor, 100).await.unwrap();
    assert!(r.resync, "another epoch resyncs");
    assert_ne!(r.epoch, p.epoch);
    assert!(r.events.is_empty());
    let located = c.locate(ns, &k).await.unwrap();
    let on_disk: Vec<bool> = located.iter().map(|s| s.contains(TierKind::Disk)).collect();
    assert_eq!(on_disk, [true, false, true]);
    c.put(ns, &keys(ns, 3..4), data(ns, 3..4)).await.unwrap();
    let n = c.events(ns, r.epoch, r.cursor, 100).await.unwrap();
    assert!(!n.resync);
    assert_eq!(n.events.len(), 1);
    assert_eq!(n.events[0].key, keys(ns, 3..4)[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_a_bounded_feed_is_told_to_resync() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kvtierd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[manager]\nmode = \"ssd-only\"\nevent_capacity = 4\n[manager.disk]\ndir = \"{}\"\ncapacity_bytes = {}\nsegment_bytes = {}\n",
            dir.path().join("blocks").display(),
            64u64 << 20,
            16u64 << 20
        ),
    )
    .unwrap();
    let d = Daemon::start(&dir.path().join("data"), &[("KVTIER_CONFIG", cfg.to_str().unwrap())]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("behind", BLOCK)).await.unwrap();
    let p = c.events(ns, 0, 0, 100).await.unwrap();
    c.put(ns, &keys(ns, 0..10), data(ns, 0..10)).await.unwrap();
    let r = c.events(ns, p.epoch, p.cursor, 100).await.unwrap();
    assert!(r.resync, "ten events through a feed of four");
    assert_eq!(r.cursor, 10);
    assert!(r.events.is_empty());
    // From the new cursor the feed goes on.
    c.delete(ns, &keys(ns, 0..1)).await.unwrap();
    let n = c.events(ns, r.epoch, r.cursor, 100).await.unwrap();
    assert!(!n.resync);
    assert_eq!(n.events.len(), 1);
    assert_eq!(n.events[0].change, Change::Removed);
}

/// Every key of `ns` through ListKeys, `page` at a time, and the page sizes.
async fn list_all(c: &Client, ns: NamespaceId, page: u32) -> (Vec<BlockKey>, Vec<usize>) {
    let (mut all, mut after, mut sizes) = (Vec::new(), None, Vec::new());
    loop {
        let (keys, more) = c.list_keys(ns, after, page).await.unwrap();
        sizes.push(keys.len());
        after = keys.last().copied();
        all.extend(keys);
        if !more {
            return (all, sizes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_what_the_tiers_hold_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("listed", BLOCK)).await.unwrap();
    let (other, _) = c.register(&namespace("listed-other", BLOCK)).await.unwrap();
    assert_eq!(c.list_keys(ns, None, 10).await.unwrap(), (vec![], false));
    c.put(ns, &keys(ns, 0..7), data(ns, 0..7)).await.unwrap();
    c.put(other, &keys(other, 0..2), data(other, 0..2)).await.unwrap();
    c.delete(ns, &keys(ns, 3..4)).await.unwrap();
    let mut want: Vec<BlockKey> = keys(ns, 0..7).into_iter().filter(|k| *k != keys(ns, 3..4)[0]).collect();
    want.sort();
    assert_eq!(list_all(&c, ns, 4).await, (want.clone(), vec![4, 2]));
    assert_eq!(list_all(&c, ns, 6).await, (want.clone(), vec![6]));
    assert_eq!(list_all(&c, other, 100).await.0.len(), 2);

    // Malformed reads: precise errors.
    for max in [0, 65537] {
        let e = c.list_keys(ns, None, max).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("1 to 65536 keys"), "{e}");
    }
    let e = c.list_keys(NamespaceId(42), None, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace, "{e}");

    // Restarted, the daemon lists what its SSD kept.
    drop(c);
    d.signal_and_wait(libc::SIGTERM);
    let d = Daemon::start(dir.path(), &[]);
    let c = d.client().await;
    assert_eq!(list_all(&c, ns, 100).await.0, want);
}
