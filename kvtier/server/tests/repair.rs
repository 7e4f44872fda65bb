//! Read repair and the scrub with real kvtierd processes on 127.0.0.1:
//! bytes flipped in the segment files of stopped nodes, as bit rot would
//! flip them; then every block and checkpoint reads back whole through
//! every node, the bad copies are rewritten from good ones, and a read
//! with no good copy anywhere fails saying so, serving no corrupt byte.
//! Every wait polls with a deadline; every run is bounded.

use kvtier_testkit as common;

use common::cluster::{Nodes, corrupt_records};
use common::{content, data, eventually, key, keys, kvtier};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, SlotTable};
use kvtier::{BlockKey, ErrorKind, Namespace, NamespaceId};
use kvtier_client::Client;
use kvtier_proto::proto::RepairStats;
use std::collections::BTreeSet;
use std::path::Path;

const BLOCK: usize = common::CLUSTER_BLOCK;
/// KV blocks written per namespace.
const N: u64 = 48;
const CHUNK_MIB: &str = "1";

async fn repair_stats(c: &Client) -> RepairStats {
    c.stats_reply()
        .await
        .unwrap()
        .repair
        .expect("every node reports repair")
}

/// Polls `c`'s repair counters every 20 ms until `done` holds, for at most
/// 60 s; a timeout shows the last ones.
async fn until(what: &str, c: &Client, done: impl Fn(&RepairStats) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = repair_stats(c).await;
        if done(&r) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}: {r:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Registers namespace `name` (blocks of BLOCK) with 3 replicas, through `a`.
async fn replicated(a: &Client, name: &str) -> NamespaceId {
    let reg = a
        .register_replicated(&common::namespace(name, BLOCK), Some(3), None)
        .await
        .unwrap();
    assert_eq!(reg.replicas, 3);
    kvtier_proto::convert::namespace_id(&reg.namespace_id).unwrap()
}

/// A checkpoint's files under `root`: a small one and two that span
/// several 1 MiB chunks.
fn write_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), b"{\"step\": 3}".to_vec()),
        (
            "model/shard-0.bin".into(),
            (0..(5 << 19)).map(|i: u32| (i * 7 % 253) as u8).collect(),
        ),
        (
            "model/shard-1.bin".into(),
            (0..(3 << 19)).map(|i: u32| (i * 13 % 251) as u8).collect(),
        ),
    ];
    for (p, b) in &files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b).unwrap();
    }
    files
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `kvtier checkpoint get NAME` of group `group` through `endpoint` into
/// `dest`, expecting exit `code`.
fn checkpoint_get(endpoint: &str, group: &str, name: &str, dest: &Path, code: i32) -> common::Run {
    kvtier(
        endpoint,
        &[],
        &[
            "checkpoint",
            "get",
            name,
            s(dest),
            "--group",
            group,
            "--chunk-mib",
            CHUNK_MIB,
        ],
    )
    .expect(code)
}

fn assert_restored(dest: &Path, files: &[(String, Vec<u8>)]) {
    for (p, b) in files {
        assert!(std::fs::read(dest.join(p)).unwrap() == *b, "{p} restored whole");
    }
}

/// Every block of `0..N` of `ns` through `c` (its tiers, then peers), whole.
async fn read_all(c: &Client, ns: NamespaceId, through: &str) {
    let g = c.get(ns, &keys(ns, 0..N)).await.unwrap();
    assert_eq!(
        (g.loaded, g.failed_index),
        (N as usize, None),
        "through {through}: {}",
        g.failed_reason
    );
    assert!(g.data == data(ns, 0..N), "through {through}: the bytes are the blocks'");
}

/// Whether node `c`'s own tiers hold every block of `0..N` of `ns`,
/// whole (a ReplicaGet asks no peer).
async fn holds_all(c: &Client, ns: NamespaceId) -> bool {
    let g = c.replica_get(ns, &keys(ns, 0..N)).await.unwrap();
    let n = g.loaded;
    assert!(
        g.data[..n * BLOCK] == data(ns, 0..n as u64)[..],
        "a node serves only whole blocks"
    );
    n == N as usize
}

/// 3 nodes, R = 3, KV blocks and a checkpoint written; all stopped; bytes
/// flipped in every record of c, in b's copies of the blocks b is asked
/// for before a, and in every copy of one namespace and one checkpoint
/// group; all restarted. Reads through every node serve every good block
/// and the checkpoint whole, the bad copies are rewritten (c serves
/// everything alone afterwards), and the namespace and group with no good
/// copy fail precisely, serving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_copies_are_read_from_good_replicas_and_rewritten() {
    // The scrub is off: this test is about reads finding the bad copies.
    let mut cl = Nodes::start(&["a", "b", "c"], "", &[("KVTIER_SCRUB_BYTES_PER_S", "0")]);
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "repair").await;
    let doomed = replicated(&a, "doomed").await;
    a.put(ns, &keys(ns, 0..N), data(ns, 0..N)).await.unwrap();
    a.put(doomed, &keys(doomed, 0..N), data(doomed, 0..N)).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    let files = write_tree(&src);
    let put = |group: &str| {
        let g = ["--group", group, "--chunk-mib", CHUNK_MIB];
        kvtier(
            &cl.endpoint(0),
            &[],
            &[&["checkpoint", "put", "step-3", s(&src)][..], &g[..]].concat(),
        )
        .expect(0)
        .json()
    };
    let chunks = put("job")["chunks"].as_u64().unwrap();
    assert!(chunks >= 4, "several chunks: {chunks}");
    put("gone");
    let gone = Namespace::checkpoints("gone", 1 << 20).id();

    // The blocks that c (and a) ask b for before a: b's copy of those goes bad too.
    // kvtierd's placement: the slot table of the member list.
    let table = SlotTable::new(&cl.members(), DEFAULT_SLOTS, MAX_R).unwrap();
    let b_first: BTreeSet<BlockKey> = keys(ns, 0..N)
        .into_iter()
        .filter(|k| {
            let order = table.replicas(k, 3).unwrap();
            let at = |id: &str| order.iter().position(|n| n.0 == id).unwrap();
            at("b") < at("a")
        })
        .collect();
    assert!(
        !b_first.is_empty() && b_first.len() < N as usize,
        "some blocks ask b first, some a: {}",
        b_first.len()
    );

    for i in 0..3 {
        cl.stop(i);
    }
    let on_c = corrupt_records(&cl.blocks_dir(2), |_| true);
    let c_blocks = on_c.iter().filter(|r| r.ns == ns).count();
    assert_eq!(c_blocks, N as usize, "every block of c flipped");
    let on_b = corrupt_records(&cl.blocks_dir(1), |r| {
        (r.ns == ns && b_first.contains(&r.key)) || r.ns == doomed || r.ns == gone
    });
    assert_eq!(
        on_b.iter().filter(|r| r.ns == ns).count(),
        b_first.len(),
        "b's copies of the blocks asked of b first"
    );
    let on_a = corrupt_records(&cl.blocks_dir(0), |r| r.ns == doomed || r.ns == gone);
    assert_eq!(on_a.iter().filter(|r| r.ns == doomed).count(), N as usize);
    assert!(on_a.iter().any(|r| r.ns == gone), "the lost checkpoint is bad on a too");
    for i in 0..3 {
        cl.start_node(i);
    }
    cl.all_up().await;
    let (a, b, c) = (cl.client(0).await, cl.client(1).await, cl.client(2).await);

    // Through c first: each of its copies fails, the blocks b is asked for
    // first fail on b too, a's copy is served. Then through b and a. The
    // first blocks as an operator would read them, with the CLI.
    let out = root.path().join("get-c");
    let first: Vec<String> = keys(ns, 0..4).iter().map(BlockKey::to_string).collect();
    kvtier(
        &cl.endpoint(2),
        &[],
        &[
            "get",
            "--ns",
            &ns.to_string(),
            "--key",
            &first.join(","),
            "--out",
            s(&out),
        ],
    )
    .expect(0);
    assert!(
        std::fs::read(&out).unwrap() == data(ns, 0..4),
        "whole blocks through the CLI"
    );
    read_all(&c, ns, "c").await;
    read_all(&b, ns, "b").await;
    read_all(&a, ns, "a").await;
    for (i, n) in ["c", "b", "a"].iter().enumerate() {
        let dest = root.path().join(format!("restore-{n}"));
        checkpoint_get(&cl.endpoint(2 - i), "job", "step-3", &dest, 0);
        assert_restored(&dest, &files);
    }

    // No good copy anywhere: the read says so, and serves nothing corrupt.
    let g = a.get(doomed, &keys(doomed, 0..N)).await.unwrap();
    assert_eq!((g.loaded, g.failed_index), (0, Some(0)), "{}", g.failed_reason);
    assert!(g.data.is_empty(), "no byte of a corrupt block is served");
    assert_eq!(g.failed_kind, Some(ErrorKind::ChecksumMismatch), "{}", g.failed_reason);
    let why = &g.failed_reason;
    assert!(why.contains(&key(doomed, 0).to_string()), "names the key: {why}");
    assert!(
        why.contains("no good copy: 3 copies tried, all corrupt or missing: 3 corrupt (here, "),
        "{why}"
    );
    let out = root.path().join("get-doomed");
    let run = kvtier(
        &cl.endpoint(1),
        &[],
        &[
            "get",
            "--ns",
            &doomed.to_string(),
            "--key",
            &key(doomed, 1).to_string(),
            "--out",
            s(&out),
        ],
    )
    .expect(7);
    assert!(run.stderr.contains("no good copy: 3 copies tried"), "{run:?}");
    assert!(
        std::fs::read(&out).unwrap_or_default().is_empty(),
        "no byte of a corrupt block is written"
    );
    let dest = root.path().join("restore-gone");
    let run = checkpoint_get(&cl.endpoint(1), "gone", "step-3", &dest, 7);
    assert!(run.stderr.contains("no good copy: 3 copies tried"), "{run:?}");
    let restored: Vec<_> = walk(&dest);
    assert!(
        restored.is_empty(),
        "nothing of the lost checkpoint written: {restored:?}"
    );

    // The bad copies are rewritten: each node's own tiers hold every block.
    let nodes = [&a, &b, &c];
    eventually("every node holds every block whole again", 30, || async {
        for n in nodes {
            if !holds_all(n, ns).await {
                return false;
            }
        }
        true
    })
    .await;
    let want_local = N + chunks;
    until("c's rewrites are counted", &c, |r| {
        r.repaired_local >= want_local && r.repaired_peer >= b_first.len() as u64
    })
    .await;
    let (ra, rb, rc) = (repair_stats(&a).await, repair_stats(&b).await, repair_stats(&c).await);
    for (n, r) in [("a", &ra), ("b", &rb), ("c", &rc)] {
        assert_eq!(r.repair_failures, 0, "{n}: {r:?}");
        assert!(!r.scrub_enabled && r.scrub_blocks == 0, "{n}: scrub off: {r:?}");
    }
    // c found each of its blocks and chunks bad, and b's bad copies of the
    // blocks it asked b for first; it rewrote them all (b's by a ReplicaPut).
    assert!(rc.corrupt_found_local_read >= want_local, "{rc:?}");
    assert_eq!(rc.corrupt_found_peer_read, b_first.len() as u64, "{rc:?}");
    assert_eq!(rc.repaired_peer, b_first.len() as u64, "{rc:?}");
    assert!(rb.corrupt_found_local_read >= b_first.len() as u64, "{rb:?}");
    // The doomed block and the lost checkpoint's manifest: no good copy.
    assert!(ra.no_good_copy >= 1 && rb.no_good_copy >= 1, "{ra:?} {rb:?}");
    let metrics = cl.nodes[2].daemon.as_ref().unwrap().metrics.clone().unwrap();
    let (_, body) = common::http_get(&metrics, "/metrics");
    assert_eq!(
        common::sample(&body, r#"kvtier_read_repairs_total{copy="peer"}"#),
        b_first.len() as f64
    );
    let stats = kvtier(&cl.endpoint(2), &[], &["stats"]).expect(0).json();
    assert_eq!(stats["repair"]["repaired_peer"], b_first.len() as u64, "{stats}");

    // c alone: every block and the checkpoint come from its own copies.
    cl.stop(0);
    cl.stop(1);
    read_all(&c, ns, "c alone").await;
    let dest = root.path().join("restore-c-alone");
    checkpoint_get(&cl.endpoint(2), "job", "step-3", &dest, 0);
    assert_restored(&dest, &files);
    // And b's rewritten copies: b alone.
    cl.stop(2);
    cl.start_node(1);
    let b = cl.client(1).await;
    assert!(holds_all(&b, ns).await, "b's rewritten copies survive its restart");
    assert_eq!(repair_stats(&b).await.corrupt_found_local_read, 0);
}

/// Files under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Copies nobody reads: bytes flipped in every block of a stopped node;
/// restarted, with no read through it, its scrub finds every bad copy and
/// rewrites it from a replica, so it serves every block alone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_and_repairs_copies_nobody_reads() {
    let scrub = [
        ("KVTIER_SCRUB_BYTES_PER_S", "67108864"),
        ("KVTIER_SCRUB_INTERVAL_S", "1"),
    ];
    let mut cl = Nodes::start(&["a", "b", "c"], "", &scrub);
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "scrubbed").await;
    a.put(ns, &keys(ns, 0..N), data(ns, 0..N)).await.unwrap();

    cl.stop(2);
    let flipped = corrupt_records(&cl.blocks_dir(2), |r| r.ns == ns);
    assert_eq!(flipped.len(), N as usize);
    cl.start_node(2);
    let c = cl.client(2).await;

    until("c's scrub finds and rewrites every bad copy", &c, |r| {
        r.corrupt_found_scrub >= N && r.repaired_local >= N
    })
    .await;
    let r = repair_stats(&c).await;
    assert!(
        r.scrub_enabled && r.scrub_blocks >= N && r.scrub_bytes >= N * BLOCK as u64,
        "{r:?}"
    );
    assert_eq!(r.corrupt_found_local_read, 0, "no read found them: {r:?}");
    assert_eq!((r.repair_failures, r.no_good_copy), (0, 0), "{r:?}");

    cl.stop(0);
    cl.stop(1);
    assert!(holds_all(&c, ns).await, "c holds every block whole, alone");
    let g = c.get(ns, &[key(ns, 0)]).await.unwrap();
    assert!(g.data[..] == content(ns, 0, BLOCK)[..]);
}

/// A node alone with a blob tier (writeback, Azurite): bytes flipped in
/// every block and chunk on its SSD while it was stopped; reads serve the
/// good copies from blob and rewrite the local ones, so with blob gone the
/// node serves everything from its SSD again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_serves_and_repairs_its_corrupt_copies_from_blob() {
    use kvtier::tier::blob::BlobMode;
    use kvtier::tier::blob::azurite::Azurite;
    let mut az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = kvtier_server::config::DaemonConfig {
        blob: Some(az.config("kvtierd-repair", BlobMode::Writeback)),
        ..Default::default()
    };
    let file = dir.path().join("kvtierd.toml");
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    let env = [("KVTIER_CONFIG", s(&file)), ("KVTIER_SCRUB_BYTES_PER_S", "0")];
    let data_dir = dir.path().join("data");
    let mut d = common::Daemon::start(&data_dir, &env);
    let c = d.client().await;
    let (ns, _) = c.register(&common::namespace("lone", BLOCK)).await.unwrap();
    c.put(ns, &keys(ns, 0..N), data(ns, 0..N)).await.unwrap();
    let src = dir.path().join("src");
    let files = write_tree(&src);
    let g = ["--group", "job", "--chunk-mib", CHUNK_MIB];
    let put = kvtier(
        &d.endpoint(),
        &[],
        &[&["checkpoint", "put", "step-3", s(&src)][..], &g[..]].concat(),
    )
    .expect(0)
    .json();
    let chunks = put["chunks"].as_u64().unwrap();
    eventually("every block and chunk is in blob", 60, || async {
        let w = c.stats_reply().await.unwrap().writeback.unwrap();
        w.pending_blocks == 0 && w.uploaded_blocks > N + chunks
    })
    .await;

    d.signal_and_wait(libc::SIGTERM);
    let flipped = corrupt_records(&data_dir.join("blocks"), |_| true);
    assert!(flipped.len() as u64 > N + chunks, "{}", flipped.len());
    let d = common::Daemon::start(&data_dir, &env);
    let c = d.client().await;
    read_all(&c, ns, "the lone node").await;
    let dest = dir.path().join("restore");
    checkpoint_get(&d.endpoint(), "job", "step-3", &dest, 0);
    assert_restored(&dest, &files);
    until("the local copies are rewritten", &c, |r| r.repaired_local > N + chunks).await;
    let r = repair_stats(&c).await;
    assert!(r.corrupt_found_local_read > N + chunks, "{r:?}");
    assert_eq!((r.repair_failures, r.no_good_copy, r.repaired_peer), (0, 0, 0), "{r:?}");

    // Blob gone: the SSD alone serves it all.
    az.stop();
    read_all(&c, ns, "the lone node without blob").await;
    let dest = dir.path().join("restore-ssd");
    checkpoint_get(&d.endpoint(), "job", "step-3", &dest, 0);
    assert_restored(&dest, &files);
    assert_eq!(
        repair_stats(&c).await.corrupt_found_local_read,
        r.corrupt_found_local_read
    );
}
