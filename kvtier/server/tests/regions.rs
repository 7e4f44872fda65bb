//! The same-host data path through shared-memory regions, against a real
//! kvtierd process.

use kvtier_testkit as common;

use common::{Daemon, content, key, namespace};
use kvtier::ErrorKind;
use kvtier_client::SharedRegion;

const BLOCK: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_go_through_a_region_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir().unwrap();
    let shm_env = shm.path().to_str().unwrap().to_string();
    let mut d = Daemon::start(data.path(), &[("KVTIER_SHM_DIR", &shm_env)]);
    let c = d.client().await;
    let (ns, _) = c.register(&namespace("regions", BLOCK)).await.unwrap();
    let mut r = SharedRegion::create(shm.path(), 16 * BLOCK).unwrap();
    let id = c.register_region(&r).await.unwrap();
    for i in 0..8u64 {
        r.as_mut_slice()[i as usize * BLOCK..(i as usize + 1) * BLOCK].copy_from_slice(&content(ns, i, BLOCK));
    }
    let keys: Vec<_> = (0..8).map(|i| key(ns, i)).collect();
    assert_eq!(c.put_region(ns, &keys, id, 0).await.unwrap().stored, 8);
    // Back into the second half of the region.
    let h = c.get_region(ns, &keys, id, 8 * BLOCK as u64).await.unwrap();
    assert_eq!((h.loaded, h.failed_index), (8, None));
    assert!(r.as_slice()[8 * BLOCK..16 * BLOCK] == r.as_slice()[..8 * BLOCK]);
    // The streamed path sees the same blocks.
    let g = c.get(ns, &keys[3..4]).await.unwrap();
    assert!(g.data[..] == content(ns, 3, BLOCK)[..]);

    // Bad requests are precise and change nothing.
    let e = c.get_region(ns, &keys, id, 9 * BLOCK as u64).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("outside region"), "{}", e.message());
    assert_eq!(
        c.put_region(ns, &keys, 999, 0).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let outside = tempfile::tempdir().unwrap();
    let foreign = SharedRegion::create(outside.path(), BLOCK).unwrap();
    assert_eq!(
        c.register_region(&foreign).await.unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    c.unregister_region(id).await.unwrap();
    assert_eq!(
        c.get_region(ns, &keys, id, 0).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    drop(c);
    assert!(d.signal_and_wait(libc::SIGTERM).success());

    // After a restart the blocks come back through a new region.
    let d = Daemon::start(data.path(), &[("KVTIER_SHM_DIR", &shm_env)]);
    let c = d.client().await;
    let r2 = SharedRegion::create(shm.path(), 8 * BLOCK).unwrap();
    let id2 = c.register_region(&r2).await.unwrap();
    let h = c.get_region(ns, &keys, id2, 0).await.unwrap();
    assert_eq!(h.loaded, 8);
    for i in 0..8usize {
        assert!(
            r2.as_slice()[i * BLOCK..(i + 1) * BLOCK] == content(ns, i as u64, BLOCK)[..],
            "block {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_can_be_turned_off() {
    let data = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir().unwrap();
    let d = Daemon::start(data.path(), &[("KVTIER_SHM_DIR", "")]);
    let c = d.client().await;
    let r = SharedRegion::create(shm.path(), BLOCK).unwrap();
    let e = c.register_region(&r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("disabled"), "{}", e.message());
}
