//! Recovery and membership changes of a kvtierd cluster: real kvtierd processes on 127.0.0.1, each
//! with its own data dir and config. Every wait polls with a deadline;
//! every run is bounded.

use kvtier_testkit as common;

use common::{Daemon, cluster_stats, content, data, eventually, free_ports, key, keys, liveness};
use kvtier::replication::placement::{self, Member, NodeId};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, SlotTable, moves};
use kvtier::{BlockKey, NamespaceId};
use kvtier_client::Client;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

const BLOCK: usize = common::CLUSTER_BLOCK;

/// One node: its id, port, data dir and config, and the process while it
/// runs.
struct Node {
    id: String,
    port: u16,
    dir: PathBuf,
    config: PathBuf,
    daemon: Option<Daemon>,
}

/// Nodes of one cluster, each started from its own config file.
struct Nodes {
    root: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Lines added to every node's `[cluster]` table.
    extra: String,
}

impl Nodes {
    /// `ids.len()` nodes on free ports, each listing all of them, with
    /// `extra` lines in `[cluster]`, started.
    fn start(ids: &[&str], extra: &str) -> Nodes {
        let root = tempfile::tempdir().unwrap();
        let ports = free_ports(ids.len());
        let mut n = Nodes {
            root,
            nodes: Vec::new(),
            extra: extra.into(),
        };
        let members: Vec<Member> = ids
            .iter()
            .zip(&ports)
            .map(|(id, p)| Member::new(*id, format!("127.0.0.1:{p}")))
            .collect();
        for (id, p) in ids.iter().zip(&ports) {
            n.add(id, *p, &members);
        }
        for i in 0..ids.len() {
            n.start_node(i);
        }
        n
    }

    /// Adds node `id` on `port` whose config lists `members`; not started.
    fn add(&mut self, id: &str, port: u16, members: &[Member]) {
        let dir = self.root.path().join(id);
        let config = self.root.path().join(format!("{id}.toml"));
        let list: Vec<String> = members
            .iter()
            .map(|m| format!("  {{ id = \"{}\", addr = \"{}\" }},", m.id, m.addr))
            .collect();
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnode_id = \"{id}\"\nheartbeat_interval_ms = 100\nsuspect_after = 1\ndown_after = 3\npeer_timeout_ms = 1000\n{}members = [\n{}\n]\n",
                self.extra,
                list.join("\n")
            ),
        )
        .unwrap();
        self.nodes.push(Node {
            id: id.into(),
            port,
            dir,
            config,
            daemon: None,
        });
    }

    /// Starts (or restarts, on the same data dir and port) node `i`.
    fn start_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let listen = format!("127.0.0.1:{}", n.port);
        let shm = self.root.path().join("shm");
        std::fs::create_dir_all(&shm).unwrap();
        let env = [
            ("KVTIER_SHM_DIR", shm.to_str().unwrap()),
            ("KVTIER_CONFIG", n.config.to_str().unwrap()),
            ("KVTIER_LISTEN", listen.as_str()),
        ];
        let d = Daemon::start(&n.dir, &env);
        assert_eq!(d.grpc, listen);
        self.nodes[i].daemon = Some(d);
    }

    /// kill -9 of node `i`.
    fn kill(&mut self, i: usize) {
        let mut d = self.nodes[i].daemon.take().expect("running");
        d.signal_and_wait(libc::SIGKILL);
    }

    /// SIGTERM to node `i`: answers how long it took to exit, and asserts
    /// it exited 0.
    fn stop(&mut self, i: usize) -> Duration {
        let mut d = self.nodes[i].daemon.take().expect("running");
        let t = Instant::now();
        let status = d.signal_and_wait(libc::SIGTERM);
        assert!(status.success(), "{} exited with {status}", self.nodes[i].id);
        t.elapsed()
    }

    fn endpoint(&self, i: usize) -> String {
        self.nodes[i].daemon.as_ref().expect("running").endpoint()
    }

    async fn client(&self, i: usize) -> Client {
        self.nodes[i].daemon.as_ref().expect("running").client().await
    }

    /// Clients of the running nodes.
    async fn clients(&self) -> Vec<Client> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.daemon.is_some() {
                out.push(self.client(i).await);
            }
        }
        out
    }

    fn members(&self) -> Vec<Member> {
        self.nodes
            .iter()
            .map(|n| Member::new(n.id.as_str(), format!("127.0.0.1:{}", n.port)))
            .collect()
    }

    /// Waits until every running node sees every member it knows up.
    async fn all_up(&self) {
        let clients = self.clients().await;
        eventually("every node sees every member up", 20, || async {
            for c in &clients {
                if cluster_stats(c).await.members.iter().any(|m| m.liveness != "up") {
                    return false;
                }
            }
            true
        })
        .await;
    }
}

/// The placement of `members`, as the nodes compute it (default slots).
fn placement(members: &[Member]) -> SlotTable {
    SlotTable::new(members, DEFAULT_SLOTS, MAX_R).unwrap()
}

/// Which of blocks `range` node `c` holds in its own tiers, those it holds
/// checked for the right bytes (two calls: one RPC per block is slow).
async fn held(c: &Client, ns: NamespaceId, range: std::ops::Range<u64>) -> Vec<bool> {
    let has = c.replica_has(ns, &keys(ns, range.clone())).await.unwrap();
    let present: Vec<u64> = range.zip(&has).filter(|(_, h)| **h).map(|(i, _)| i).collect();
    let ks: Vec<BlockKey> = present.iter().map(|i| key(ns, *i)).collect();
    if ks.is_empty() {
        return has;
    }
    let g = c.replica_get(ns, &ks).await.unwrap();
    assert_eq!(g.loaded, ks.len(), "the blocks ReplicaHas named load");
    for (x, i) in present.iter().enumerate() {
        assert_eq!(
            &g.data[x * BLOCK..(x + 1) * BLOCK],
            &content(ns, *i, BLOCK)[..],
            "block {i}"
        );
    }
    has
}

/// Registers namespace `name` (blocks of BLOCK) with `r` replicas and
/// strong writes, through `a`.
async fn replicated(a: &Client, name: &str, r: u32) -> NamespaceId {
    let reg = a
        .register_replicated(&common::namespace(name, BLOCK), Some(r), None)
        .await
        .unwrap();
    kvtier_proto::convert::namespace_id(&reg.namespace_id).unwrap()
}

/// With R = 3 on 3 nodes there is no stand-in, so writes acknowledged at
/// W = 2 while a node is down leave no hint: only resync brings them to
/// the node when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_gets_the_writes_it_missed_by_resync() {
    let mut cl = Nodes::start(&["a", "b", "c"], "");
    cl.all_up().await;
    let a = cl.client(0).await;
    let r = a
        .register_replicated(&common::namespace("resync", BLOCK), Some(3), Some(2))
        .await
        .unwrap();
    assert_eq!((r.replicas, r.write_quorum), (3, 2));
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    let (before, after) = (100u64, 300u64);
    a.put(ns, &keys(ns, 0..before), data(ns, 0..before)).await.unwrap();

    cl.kill(2);
    let b = cl.client(1).await;
    for c in [&a, &b] {
        eventually("c is seen down", 20, || async { liveness(c, "c").await == "down" }).await;
    }
    let put = a
        .put(ns, &keys(ns, before..after), data(ns, before..after))
        .await
        .unwrap();
    assert_eq!(put.stored as u64, after - before, "acknowledged at W = 2");
    assert!(
        !held(&b, ns, before..after).await.contains(&false),
        "b holds every write"
    );

    cl.start_node(2);
    let c = cl.client(2).await;
    eventually("resync gives c every key", 60, || async {
        !held(&c, ns, 0..after).await.contains(&false)
    })
    .await;
    for (i, n) in [&a, &b, &c].into_iter().enumerate() {
        assert!(
            !held(n, ns, 0..after).await.contains(&false),
            "node {i} holds all {after} keys: 3 replicas each"
        );
    }
    let (sa, sb) = (cluster_stats(&a).await, cluster_stats(&b).await);
    assert_eq!(sa.hints_delivered + sb.hints_delivered, 0, "no stand-in, no hint");
    assert!(
        sa.resync_blocks_sent + sb.resync_blocks_sent >= after - before,
        "the missed writes came by resync: {sa:?} {sb:?}"
    );
    assert!(
        sa.resync_keys_offered + sb.resync_keys_offered >= after,
        "every key of c was offered once c was back: {sa:?} {sb:?}"
    );
    let run = common::kvtier(&cl.nodes[0].daemon.as_ref().unwrap().endpoint(), &[], &["cluster"]).expect(0);
    let j = run.json();
    assert!(j["resync_keys_offered"].as_u64().is_some(), "{j}");
}

/// Reads every key of `range` through `c` over and over until `stop`, at
/// most `max_reads` reads or 120 s; answers (reads, missed blocks).
fn reader(
    c: Client,
    ns: NamespaceId,
    range: std::ops::Range<u64>,
    stop: Arc<AtomicBool>,
    max_reads: u64,
) -> tokio::task::JoinHandle<(u64, Vec<u64>)> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut reads, mut misses) = (0u64, Vec::new());
        let mut i = range.start;
        while !stop.load(Relaxed) && reads < max_reads && Instant::now() < deadline {
            let g = c.get(ns, &[key(ns, i)]).await.unwrap();
            if g.loaded == 1 {
                assert_eq!(&g.data[..], &content(ns, i, BLOCK)[..], "block {i}");
            } else {
                misses.push(i);
            }
            // A lookup (what a connector asks first) finds it too.
            if i.is_multiple_of(4) && c.lookup(ns, &[key(ns, i)]).await.unwrap().hit_blocks != 1 {
                misses.push(i);
            }
            reads += 1;
            i = if i + 1 == range.end { range.start } else { i + 1 };
        }
        (reads, misses)
    })
}

/// Stops a [`reader`] and checks it read during the move and never
/// missed; answers how many reads it made.
async fn no_misses(stop: Arc<AtomicBool>, reader: tokio::task::JoinHandle<(u64, Vec<u64>)>) -> u64 {
    stop.store(true, Relaxed);
    let (reads, misses) = reader.await.unwrap();
    assert!(reads >= 20, "the reader read during the move: {reads} reads");
    assert!(
        misses.is_empty(),
        "{} of {reads} reads missed during the move: {misses:?}",
        misses.len()
    );
    reads
}

/// Waits until every running member sees `n` members, no rebalancing is
/// pending or running on any node, and each of `movers` finished a pass.
async fn settled(cl: &Nodes, n: usize, movers: &[usize]) {
    let clients = cl.clients().await;
    let mut movers_c = Vec::new();
    for &i in movers {
        movers_c.push(cl.client(i).await);
    }
    eventually("rebalancing finished everywhere", 90, || async {
        for c in &clients {
            let s = cluster_stats(c).await;
            let member = s.members.iter().any(|m| m.id == s.node_id);
            if s.rebalance_state != "idle" || (member && s.members.len() != n) {
                return false;
            }
        }
        for c in &movers_c {
            if cluster_stats(c).await.rebalances_done == 0 {
                return false;
            }
        }
        true
    })
    .await;
}

/// For each node of `cl` (by index), which of blocks `0..n` it holds.
async fn layout(cl: &Nodes, ns: NamespaceId, n: u64) -> Vec<Vec<bool>> {
    let mut out = Vec::new();
    for i in 0..cl.nodes.len() {
        out.push(held(&cl.client(i).await, ns, 0..n).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_from_3_to_4_moves_a_quarter_of_the_keys_and_reads_never_miss() {
    // 64 KiB/s: each node's share of the move (about 330 KiB) lasts
    // seconds, so the reader reads while keys are on their way.
    let mut cl = Nodes::start(&["a", "b", "c"], "rebalance_bytes_per_s = 65536\n");
    cl.all_up().await;
    let a = cl.client(0).await;
    let (ns, _) = a.register(&common::namespace("scale-out", BLOCK)).await.unwrap();
    let n = 1000u64;
    for lo in (0..n).step_by(250) {
        a.put(ns, &keys(ns, lo..lo + 250), data(ns, lo..lo + 250))
            .await
            .unwrap();
    }
    // And an R = 2 namespace, where the pusher and the node that drops a
    // copy may differ.
    let ns2 = replicated(&a, "scale-out-r2", 2).await;
    let n2 = 300u64;
    a.put(ns2, &keys(ns2, 0..n2), data(ns2, 0..n2)).await.unwrap();
    let before = cl.members();

    // d starts knowing only itself and b; the others learn of d by
    // `cluster join` sent to b, which forwards it, and d learns of them.
    let port = free_ports(1)[0];
    let seed = vec![before[1].clone(), Member::new("d", format!("127.0.0.1:{port}"))];
    cl.add("d", port, &seed);
    cl.start_node(3);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(a.clone(), ns, 0..n, stop.clone(), 200_000);
    let b_end = cl.nodes[1].daemon.as_ref().unwrap().endpoint();
    let addr = format!("127.0.0.1:{port}");
    let run = tokio::task::spawn_blocking(move || {
        common::kvtier(&b_end, &[], &["cluster", "join", "--id", "d", "--addr", &addr])
    })
    .await
    .unwrap()
    .expect(0);
    let j = run.json();
    assert_eq!(j["members"], 4, "{j}");
    settled(&cl, 4, &[0, 1, 2]).await;
    let reads = no_misses(stop, reads).await;

    // Each key is on exactly its new replica; a, which served the reads,
    // may also keep copies it promoted on the way.
    let after = cl.members();
    let (old_placement, new_placement) = (placement(&before), placement(&after));
    let held = layout(&cl, ns, n).await;
    let mut changed = 0;
    for i in 0..n {
        let k = key(ns, i);
        let old = old_placement.replicas(&k, 1).unwrap();
        let new = new_placement.replicas(&k, 1).unwrap();
        changed += u64::from(old != new);
        for (x, h) in held.iter().enumerate() {
            let replica = new.contains(&NodeId(cl.nodes[x].id.clone()));
            if replica || x != 0 {
                assert_eq!(
                    h[i as usize], replica,
                    "block {i} on {}: replica {replica}",
                    cl.nodes[x].id
                );
            }
        }
    }
    // R = 2: both new replicas hold each key, nobody else (but a).
    let held2 = layout(&cl, ns2, n2).await;
    let mut gained2 = 0;
    for i in 0..n2 {
        let k = key(ns2, i);
        let old = old_placement.replicas(&k, 2).unwrap();
        let new = new_placement.replicas(&k, 2).unwrap();
        gained2 += new.iter().filter(|x| !old.contains(x)).count() as u64;
        for (x, h) in held2.iter().enumerate() {
            let replica = new.contains(&NodeId(cl.nodes[x].id.clone()));
            if replica || x != 0 {
                assert_eq!(h[i as usize], replica, "R = 2 block {i} on {}", cl.nodes[x].id);
            }
        }
    }
    let mut moved = 0;
    for c in cl.clients().await {
        moved += cluster_stats(&c).await.rebalance_keys_moved;
    }
    assert_eq!(moved, changed + gained2, "every gained copy moved, once");
    let moved = changed;
    let frac = moved as f64 / n as f64;
    eprintln!(
        "scale-out 3 -> 4, R = 1: moved {moved} of {n} keys ({frac:.3}); {reads} reads during the move, 0 misses"
    );
    // The join moves a quarter of the slots (within 10%); the keys are a
    // sample of the slots, so their fraction is binomial around the slots'
    // (5 standard deviations: these keys are fixed, so this never flakes).
    let slots = moves(&old_placement, &new_placement, 1).unwrap().fraction();
    assert!((slots / 0.25 - 1.0).abs() <= 0.1, "moved slot fraction {slots}");
    let sd = (slots * (1.0 - slots) / n as f64).sqrt();
    assert!((frac - slots).abs() <= 5.0 * sd, "moved fraction {frac}, slots {slots}");
    let saved = std::fs::read_to_string(cl.nodes[2].dir.join("members.json")).unwrap();
    assert!(saved.contains("\"d\""), "c saved the new member list: {saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_hands_every_key_over_and_reads_never_miss() {
    let cl = Nodes::start(&["a", "b", "c", "d"], "rebalance_bytes_per_s = 65536\n");
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "leave", 2).await;
    let n = 400u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(a.clone(), ns, 0..n, stop.clone(), 200_000);
    let c_end = cl.nodes[2].daemon.as_ref().unwrap().endpoint();
    let run = tokio::task::spawn_blocking(move || common::kvtier(&c_end, &[], &["cluster", "leave", "--id", "b"]))
        .await
        .unwrap()
        .expect(0);
    assert_eq!(run.json()["members"], 3);
    settled(&cl, 3, &[1]).await;
    no_misses(stop, reads).await;

    // Every key is on both its new replicas and gone from the leaver; a,
    // which served the reads, may also keep promoted copies.
    let after: Vec<Member> = cl.members().into_iter().filter(|m| m.id.0 != "b").collect();
    let held = layout(&cl, ns, n).await;
    let after = placement(&after);
    for i in 0..n {
        let new = after.replicas(&key(ns, i), 2).unwrap();
        assert_eq!(new.len(), 2);
        for (x, h) in held.iter().enumerate() {
            let id = NodeId(cl.nodes[x].id.clone());
            if new.contains(&id) {
                assert!(h[i as usize], "block {i} on its new replica {id}");
            } else if x != 0 {
                assert!(!h[i as usize], "block {i} left {id}");
            }
        }
    }
    let b = cluster_stats(&cl.client(1).await).await;
    assert!(b.rebalance_keys_dropped > 0, "the leaver dropped its copies: {b:?}");
}

/// A leave while a client keeps writing new keys through another node:
/// every write acknowledged before, during or after the leave is readable
/// through every remaining node, byte for byte, and sits on both of its
/// replicas among the remaining members once the cluster settles (none is
/// left only on the leaver, nor under-replicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_during_writes_loses_no_acknowledged_write() {
    let cl = Nodes::start(
        &["a", "b", "c", "d"],
        "rebalance_bytes_per_s = 262144\nrebalance_push_waiting_after_ms = 2000\n",
    );
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "leave-writes", 2).await;
    let first = 200u64;
    a.put(ns, &keys(ns, 0..first), data(ns, 0..first)).await.unwrap();

    // The writer: one key per Put, at most 600 keys or 60 s, until told.
    let stop = Arc::new(AtomicBool::new(false));
    let (w, st) = (a.clone(), stop.clone());
    let writer = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut acked, mut failed) = (Vec::new(), 0u32);
        let mut i = first;
        while !st.load(Relaxed) && i < first + 600 && Instant::now() < deadline {
            match w.put(ns, &keys(ns, i..i + 1), data(ns, i..i + 1)).await {
                Ok(r) if r.stored == 1 => acked.push(i),
                Ok(r) => panic!("key {i}: stored {} of 1 without an error", r.stored),
                Err(_) => failed += 1,
            }
            i += 1;
        }
        (acked, failed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c_end = cl.nodes[2].daemon.as_ref().unwrap().endpoint();
    let run = tokio::task::spawn_blocking(move || common::kvtier(&c_end, &[], &["cluster", "leave", "--id", "b"]))
        .await
        .unwrap()
        .expect(0);
    assert_eq!(run.json()["members"], 3);
    // Writes go on for a while after the leave, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let (acked, failed) = writer.await.unwrap();
    assert!(
        acked.len() >= 20,
        "writes were acknowledged during the leave: {} ({failed} failed)",
        acked.len()
    );
    settled(&cl, 3, &[1]).await;

    let after: Vec<Member> = cl.members().into_iter().filter(|m| m.id.0 != "b").collect();
    let table = placement(&after);
    let all: Vec<u64> = (0..first).chain(acked.iter().copied()).collect();
    for x in [0usize, 2, 3] {
        let c = cl.client(x).await;
        for &i in &all {
            let g = c.get(ns, &[key(ns, i)]).await.unwrap();
            assert_eq!(g.loaded, 1, "block {i} readable through {}", cl.nodes[x].id);
            assert_eq!(
                &g.data[..],
                &content(ns, i, BLOCK)[..],
                "block {i} through {}",
                cl.nodes[x].id
            );
        }
    }
    for x in [2usize, 3] {
        let id = NodeId(cl.nodes[x].id.clone());
        let c = cl.client(x).await;
        for &i in &all {
            if table.replicas(&key(ns, i), 2).unwrap().contains(&id) {
                let g = c.replica_get(ns, &[key(ns, i)]).await.unwrap();
                assert_eq!(g.loaded, 1, "block {i} on its replica {id}");
            }
        }
    }
}

/// `kvtier` with `args` against node `i`, off the runtime's threads.
async fn cli(cl: &Nodes, i: usize, args: &[&str]) -> common::Run {
    let end = cl.endpoint(i);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::kvtier(&end, &[], &args)
    })
    .await
    .unwrap()
}

/// Losing a node for good: `cluster leave` of a member that is dead (down)
/// succeeds, and the surviving replicas copy its keys to their new replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_can_be_removed_and_its_keys_are_re_replicated() {
    let mut cl = Nodes::start(&["a", "b", "c", "d"], "");
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "dead-leave", 2).await;
    let n = 300u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    let before = cl.members();
    let old_placement = placement(&before);
    let lost = (0..n)
        .filter(|i| old_placement.replicas(&key(ns, *i), 2).unwrap().contains(&"d".into()))
        .count() as u64;
    assert!(lost > 0, "d held some of {n} keys");

    cl.kill(3);
    for i in 0..3 {
        let c = cl.client(i).await;
        eventually("d is seen down", 20, || async { liveness(&c, "d").await == "down" }).await;
    }
    let run = cli(&cl, 0, &["cluster", "leave", "--id", "d"]).await.expect(0);
    let j = run.json();
    assert_eq!(j["members"], 3, "{j}");
    assert_eq!(j["not_reached"], serde_json::json!([]), "{j}");
    assert_eq!(
        j["down"],
        serde_json::json!(["d"]),
        "the dead leaver is named apart: {j}"
    );
    settled(&cl, 3, &[0, 1, 2]).await;

    // Every key is back to 2 copies, on its replicas among a, b and c.
    let after: Vec<Member> = before.iter().filter(|m| m.id.0 != "d").cloned().collect();
    let mut held_by = Vec::new();
    for i in 0..3 {
        held_by.push(held(&cl.client(i).await, ns, 0..n).await);
    }
    let after = placement(&after);
    for i in 0..n {
        for id in after.replicas(&key(ns, i), 2).unwrap() {
            let x = cl.nodes.iter().position(|nd| nd.id == id.0).unwrap();
            assert!(held_by[x][i as usize], "block {i} on its new replica {id}");
        }
    }
    let mut moved = 0;
    for c in cl.clients().await {
        let s = cluster_stats(&c).await;
        assert_eq!(s.members.len(), 3, "{s:?}");
        moved += s.rebalance_keys_moved;
    }
    assert_eq!(moved, lost, "each copy d held was made again, once");
}

/// A node that was stopped while a member joined learns the join from its
/// peers' heartbeats once back (its list is older), saves it, and places
/// keys on the new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_a_join_catches_up_on_the_member_list() {
    let mut cl = Nodes::start(&["a", "b", "c"], "");
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = replicated(&a, "catch-up", 2).await;

    let took = cl.stop(2);
    assert!(took < Duration::from_secs(5), "c drained in {took:?}");
    eventually("a sees c down", 20, || async { liveness(&a, "c").await == "down" }).await;
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let seed = vec![cl.members()[0].clone(), Member::new("d", addr.clone())];
    cl.add("d", port, &seed);
    cl.start_node(3);
    let run = cli(&cl, 0, &["cluster", "join", "--id", "d", "--addr", &addr])
        .await
        .expect(0);
    let j = run.json();
    assert_eq!(j["members"], 4, "{j}");
    assert_eq!(j["down"], serde_json::json!(["c"]), "c did not take it: {j}");
    let sa = cluster_stats(&a).await;
    assert!(sa.members_epoch > 0, "{sa:?}");

    cl.start_node(2);
    eventually("`kvtier cluster` on c lists d", 30, || async {
        let j = cli(&cl, 2, &["cluster"]).await.expect(0).json();
        j["members"].as_array().unwrap().iter().any(|m| m["id"] == "d")
    })
    .await;
    let c = cl.client(2).await;
    let sc = cluster_stats(&c).await;
    assert_eq!(sc.members.len(), 4, "{sc:?}");
    assert_eq!(sc.members_epoch, cluster_stats(&a).await.members_epoch, "{sc:?}");
    assert_eq!(sc.member_lists_adopted, 1, "{sc:?}");
    let saved = std::fs::read_to_string(cl.nodes[2].dir.join("members.json")).unwrap();
    assert!(saved.contains("\"d\""), "c saved the list it adopted: {saved}");
    eventually("c sees d up", 20, || async { liveness(&c, "d").await == "up" }).await;

    // A write through c places copies on d.
    let n = 100u64;
    c.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    let d = cl.client(3).await;
    let on_d = held(&d, ns, 0..n).await;
    let all = placement(&cl.members());
    let mut want = 0;
    for i in 0..n {
        let replica = all.replicas(&key(ns, i), 2).unwrap().contains(&"d".into());
        want += u64::from(replica);
        if replica {
            assert!(on_d[i as usize], "block {i} on its replica d");
        }
    }
    assert!(want > 0, "d is a replica of some of {n} keys");
}

/// SIGTERM while a rebalancing pass is running (slowed to 8 KiB/s, so it
/// lasts far longer than the test): the node stops its background tasks and
/// exits promptly, well within the drain timeout (10 s by default), which
/// it would wait out if a task still held the block manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_running_rebalance_promptly() {
    let mut cl = Nodes::start(&["a", "b"], "rebalance_bytes_per_s = 8192\n");
    cl.all_up().await;
    let a = cl.client(0).await;
    let (ns, _) = a.register(&common::namespace("stop", BLOCK)).await.unwrap();
    let n = 300u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let seed = vec![cl.members()[0].clone(), Member::new("c", addr.clone())];
    cl.add("c", port, &seed);
    cl.start_node(2);
    cli(&cl, 0, &["cluster", "join", "--id", "c", "--addr", &addr])
        .await
        .expect(0);
    eventually("a's rebalancing runs", 20, || async {
        cluster_stats(&a).await.rebalance_state == "running"
    })
    .await;
    let took = cl.stop(0);
    assert!(took < Duration::from_secs(5), "a took {took:?} to stop");
    // b still runs its own pass, and serves.
    let b = cl.client(1).await;
    assert_eq!(cluster_stats(&b).await.rebalance_state, "running");
}

/// Nodes `ids` that list all of them, with `slots` lines for some nodes in
/// their `[cluster]` table (`(index, count)`), started.
fn start_with_slots(ids: &[&str], extra: &str, slots: &[(usize, u32)]) -> Nodes {
    let ports = free_ports(ids.len());
    let mut n = Nodes {
        root: tempfile::tempdir().unwrap(),
        nodes: Vec::new(),
        extra: extra.into(),
    };
    let members: Vec<Member> = ids
        .iter()
        .zip(&ports)
        .map(|(id, p)| Member::new(*id, format!("127.0.0.1:{p}")))
        .collect();
    for (id, p) in ids.iter().zip(&ports) {
        n.add(id, *p, &members);
    }
    for (i, count) in slots {
        set_slots(&n, *i, Some(*count));
    }
    for i in 0..ids.len() {
        n.start_node(i);
    }
    n
}

/// Sets (or, with `None`, removes) `slots` in node `i`'s config.
fn set_slots(cl: &Nodes, i: usize, slots: Option<u32>) {
    let f = &cl.nodes[i].config;
    let text = std::fs::read_to_string(f).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("slots = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = match slots {
        Some(s) => kept.replacen("[cluster]\n", &format!("[cluster]\nslots = {s}\n"), 1),
        None => kept,
    };
    std::fs::write(f, text).unwrap();
}

/// A node configured with another slot count places keys elsewhere: the
/// others refuse its pings and count its answers as missed, and it does
/// the same, so no copy goes between them; writes meant for it wait in
/// hints. Once it places keys as they do, it is up again and gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_slot_count_is_refused_until_it_agrees() {
    let mut cl = start_with_slots(&["a", "b", "c"], "", &[(2, 4096)]);
    let (a, b, c) = (cl.client(0).await, cl.client(1).await, cl.client(2).await);
    for (x, who) in [(&a, "c"), (&b, "c"), (&c, "a"), (&c, "b")] {
        eventually(&format!("{who} is seen down"), 20, || async {
            liveness(x, who).await == "down"
        })
        .await;
    }
    eventually("a and b see each other up", 20, || async {
        liveness(&a, "b").await == "up" && liveness(&b, "a").await == "up"
    })
    .await;
    let (sa, sc) = (cluster_stats(&a).await, cluster_stats(&c).await);
    assert_eq!((sa.placement_slots, sc.placement_slots), (65_536, 4096));
    assert!(
        sa.placement_mismatches > 0 && sc.placement_mismatches > 0,
        "{sa:?} {sc:?}"
    );
    // Its member list is refused too: offered to a, and to c.
    let e = a.members(Some(c.members(None).await.unwrap())).await.unwrap_err();
    assert_eq!(e.kind(), kvtier::ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("places keys in 4096 slots"), "{e}");

    // Writes through a are acknowledged (c's copies go to a stand-in with
    // a hint); none reaches c.
    let ns = replicated(&a, "mismatch", 2).await;
    let n = 100u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    assert_eq!(cluster_stats(&c).await.replica_blocks_received, 0);
    let pending = cluster_stats(&a).await.hints_pending + cluster_stats(&b).await.hints_pending;
    let all = placement(&cl.members());
    let on_c: Vec<u64> = (0..n)
        .filter(|i| all.replicas(&key(ns, *i), 2).unwrap().contains(&"c".into()))
        .collect();
    assert!(!on_c.is_empty(), "c is a replica of some of {n} keys");
    assert_eq!(pending, on_c.len() as u64, "one hint per copy meant for c");

    // c back with the cluster's slot count: up everywhere, and it gets
    // every copy meant for it.
    cl.stop(2);
    set_slots(&cl, 2, None);
    cl.start_node(2);
    cl.all_up().await;
    let c = cl.client(2).await;
    eventually("hints delivered to c", 30, || async {
        cluster_stats(&a).await.hints_pending + cluster_stats(&b).await.hints_pending == 0
    })
    .await;
    let held_c = held(&c, ns, 0..n).await;
    for i in &on_c {
        assert!(held_c[*i as usize], "block {i} on its replica c");
    }
    assert_eq!(cluster_stats(&c).await.placement_slots, 65_536);
}

/// A cluster whose keys were placed by a build before slots (per-key
/// rendezvous: no `placement.json` in the data dirs, which hold data)
/// moves each key once to its slot replicas when the new build starts,
/// and reads never miss during the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_placed_before_slots_move_once_and_reads_never_miss() {
    // 64 KiB/s: the move lasts seconds, so the reader reads during it.
    let mut cl = Nodes::start(&["a", "b", "c"], "rebalance_bytes_per_s = 65536\n");
    cl.all_up().await;
    let members = cl.members();
    let a = cl.client(0).await;
    let (ns, n) = (replicated(&a, "before-slots-r1", 1).await, 300u64);
    let (ns2, n2) = (replicated(&a, "before-slots-r2", 2).await, 150u64);
    // Every copy where per-key rendezvous put it, written to each node's
    // own tiers.
    let clients = cl.clients().await;
    for (ns, n, r) in [(ns, n, 1), (ns2, n2, 2)] {
        for (x, m) in members.iter().enumerate() {
            let mine: Vec<u64> = (0..n)
                .filter(|i| placement::replicas(&key(ns, *i), &members, r).contains(&m.id))
                .collect();
            for i in &mine {
                let k = key(ns, *i);
                let d = bytes::Bytes::from(content(ns, *i, BLOCK));
                clients[x].replica_put(ns, &[k], d, None, None, None).await.unwrap();
            }
        }
    }
    for i in 0..3 {
        cl.stop(i);
        let marker = cl.nodes[i].dir.join("placement.json");
        let saved = std::fs::read_to_string(&marker).unwrap();
        assert!(saved.contains("65536"), "{saved}");
        // As a build before slots left it.
        std::fs::remove_file(marker).unwrap();
    }
    for i in 0..3 {
        cl.start_node(i);
    }
    let a = cl.client(0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(a.clone(), ns, 0..n, stop.clone(), 200_000);
    settled(&cl, 3, &[0, 1, 2]).await;
    let reads = no_misses(stop, reads).await;

    let slots = placement(&members);
    let (mut gained, mut gained_by_a) = (0, 0);
    let mut moved_keys = 0;
    for (ns, n, r) in [(ns, n, 1), (ns2, n2, 2)] {
        let held = layout(&cl, ns, n).await;
        for i in 0..n {
            let k = key(ns, i);
            let old = placement::replicas(&k, &members, r);
            let new = slots.replicas(&k, r).unwrap();
            gained += new.iter().filter(|x| !old.contains(x)).count() as u64;
            gained_by_a += u64::from(r == 1 && new[0] == members[0].id && old != new);
            moved_keys += u64::from(r == 1 && old != new);
            for (x, h) in held.iter().enumerate() {
                let replica = new.contains(&members[x].id);
                // a, which served the reads, may keep copies it promoted.
                if replica || x != 0 {
                    assert_eq!(h[i as usize], replica, "R = {r} block {i} on {}", members[x].id);
                }
            }
        }
    }
    let mut moved = 0;
    for (i, c) in cl.clients().await.iter().enumerate() {
        moved += cluster_stats(c).await.rebalance_keys_moved;
        let saved = std::fs::read_to_string(cl.nodes[i].dir.join("placement.json")).unwrap();
        assert!(saved.contains("65536"), "the move is recorded as done: {saved}");
    }
    // Each gained copy was pushed once, unless a read through a had
    // already brought it to a, its new replica.
    assert!(
        moved <= gained && moved + gained_by_a >= gained,
        "moved {moved} copies, gained {gained}, {gained_by_a} of them by a"
    );
    eprintln!(
        "placement change: {moved_keys} of {n} R = 1 keys moved, {gained} copies in all; {reads} reads during the move, 0 misses"
    );
    assert!(moved_keys > n / 2, "about 2/3 of the keys move: {moved_keys} of {n}");
}
