//! A kvtierd cluster: 3 or 4 real kvtierd processes on 127.0.0.1, each with
//! its own data dir, sharing one static member list. Every wait polls with a
//! deadline; every run is bounded.

use kvtier_testkit as common;

use common::{Daemon, cluster_stats, content, data, eventually, free_ports, key, keys, liveness, namespace};
use kvtier::ErrorKind;
use kvtier::replication::placement::{Member, NodeId};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, SlotTable};
use kvtier::{BlockKey, NamespaceId};
use kvtier_client::{Client, SharedRegion};
use kvtier_proto::proto;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const BLOCK: usize = common::CLUSTER_BLOCK;
const IDS: [&str; 4] = ["a", "b", "c", "d"];

/// One node: its id, port and data dir, and the process while it runs.
struct Node {
    id: &'static str,
    port: u16,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

/// A cluster of real kvtierd processes started from one config file, each
/// node setting its own id, listener and data dir in the environment.
struct Cluster {
    _root: tempfile::TempDir,
    config: PathBuf,
    nodes: Vec<Node>,
    /// The placement of the member list, as the nodes compute it.
    placement: SlotTable,
    /// Environment every node gets, and per node (by index) on top.
    env: Vec<(usize, String, String)>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// `n` nodes; `env` entries `(node, var, value)` set `var` on that node.
    fn start_with(n: usize, env: &[(usize, &str, &str)]) -> Cluster {
        Self::start_full(tempfile::tempdir().unwrap(), n, env, "")
    }

    /// As [`Self::start_with`], in `root`, with `extra` lines in `[cluster]`
    /// (which replace the tests' detector settings they name).
    fn start_full(root: tempfile::TempDir, n: usize, env: &[(usize, &str, &str)], extra: &str) -> Cluster {
        let ports = free_ports(n);
        let members: Vec<Member> = IDS[..n]
            .iter()
            .zip(&ports)
            .map(|(id, p)| Member::new(*id, format!("127.0.0.1:{p}")))
            .collect();
        let list: Vec<String> = members
            .iter()
            .map(|m| format!("  {{ id = \"{}\", addr = \"{}\" }},", m.id, m.addr))
            .collect();
        let config = root.path().join("cluster.toml");
        let base: String = [
            "heartbeat_interval_ms = 100",
            "suspect_after = 1",
            "down_after = 3",
            "peer_timeout_ms = 1000",
        ]
        .iter()
        .filter(|l| {
            let name = |x: &str| x.split('=').next().unwrap_or("").trim().to_string();
            !extra.lines().any(|e| name(e) == name(l))
        })
        .map(|l| format!("{l}\n"))
        .collect();
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnode_id = \"a\"\n{base}{extra}members = [\n{}\n]\n",
                list.join("\n")
            ),
        )
        .unwrap();
        let nodes = IDS[..n]
            .iter()
            .zip(&ports)
            .map(|(id, port)| Node {
                id,
                port: *port,
                dir: root.path().join(id),
                daemon: None,
            })
            .collect();
        let mut c = Cluster {
            _root: root,
            config,
            nodes,
            placement: SlotTable::new(&members, DEFAULT_SLOTS, MAX_R).unwrap(),
            env: env.iter().map(|(i, k, v)| (*i, k.to_string(), v.to_string())).collect(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        c
    }

    /// Waits until every running node sees every member up (nodes started
    /// before the others saw them miss heartbeats).
    async fn all_up(&self) {
        let mut clients = Vec::new();
        for i in 0..self.nodes.len() {
            clients.push(self.client(i).await);
        }
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

    /// Starts (or restarts, on the same data dir and port) node `i`.
    fn start_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let listen = format!("127.0.0.1:{}", n.port);
        let shm = self.config.with_file_name("shm");
        std::fs::create_dir_all(&shm).unwrap();
        let env = [
            ("KVTIER_SHM_DIR", shm.to_str().unwrap()),
            ("KVTIER_CONFIG", self.config.to_str().unwrap()),
            ("KVTIER_CLUSTER_NODE_ID", n.id),
            ("KVTIER_LISTEN", listen.as_str()),
        ];
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.extend(
            self.env
                .iter()
                .filter(|(j, _, _)| *j == i)
                .map(|(_, k, v)| (k.as_str(), v.as_str())),
        );
        let d = Daemon::start(&n.dir, &env);
        assert_eq!(d.grpc, listen);
        self.nodes[i].daemon = Some(d);
    }

    /// kill -9 of node `i`.
    fn kill(&mut self, i: usize) {
        let mut d = self.nodes[i].daemon.take().expect("running");
        d.signal_and_wait(libc::SIGKILL);
    }

    async fn client(&self, i: usize) -> Client {
        self.nodes[i].daemon.as_ref().expect("running").client().await
    }

    /// The replicas of `k` by placement over the whole member list.
    fn replicas(&self, k: &BlockKey, r: usize) -> Vec<NodeId> {
        self.placement.replicas(k, r).unwrap()
    }

    fn index(&self, id: &NodeId) -> usize {
        IDS.iter().position(|n| *n == id.0).unwrap()
    }
}

/// Whether node `c` holds `k` in its own tiers, with the right bytes.
async fn holds(c: &Client, ns: NamespaceId, i: u64) -> bool {
    let g = c.replica_get(ns, &[key(ns, i)]).await.unwrap();
    if g.loaded == 1 {
        assert_eq!(&g.data[..], &content(ns, i, BLOCK)[..], "block {i}");
    }
    g.loaded == 1
}

fn dir_of(n: &Node) -> &Path {
    &n.dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_writes_reach_every_replica_and_reads_reach_peers() {
    let mut cl = Cluster::start(3);
    cl.all_up().await;
    let (a, b, c) = (cl.client(0).await, cl.client(1).await, cl.client(2).await);

    // R = 3 registered on a is on every node, with its replication.
    let r = a
        .register_replicated(&namespace("r3", BLOCK), Some(3), None)
        .await
        .unwrap();
    assert_eq!((r.replicas, r.write_quorum), (3, 3));
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    for n in [&b, &c] {
        let all = n.namespaces().await.unwrap();
        let info = all
            .iter()
            .find(|i| i.namespace_id == r.namespace_id)
            .expect("registered on every member");
        assert_eq!((info.replicas, info.write_quorum), (3, 3));
    }
    let e = a
        .register_replicated(&namespace("r4", BLOCK), Some(4), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e:?}");
    assert!(e.message().contains("exceeds the 3 members"), "{e:?}");

    // A Put through a lands on all three.
    let put = a.put(ns, &keys(ns, 0..12), data(ns, 0..12)).await.unwrap();
    assert_eq!(put.stored, 12);
    for n in [&a, &b, &c] {
        for i in 0..12 {
            assert!(holds(n, ns, i).await, "block {i} on every replica");
        }
    }
    assert_eq!(cluster_stats(&a).await.replica_writes_sent, 2, "one write per peer");
    let run = common::kvtier(&cl.nodes[1].daemon.as_ref().unwrap().endpoint(), &[], &["cluster"]).expect(0);
    let j = run.json();
    assert_eq!(j["node_id"], "b");
    let live: Vec<&str> = j["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["liveness"].as_str().unwrap())
        .collect();
    assert_eq!(live, ["up", "up", "up"]);
    let metrics = cl.nodes[0].daemon.as_ref().unwrap().metrics.clone().unwrap();
    let (_, body) = common::http_get(&metrics, "/metrics");
    assert_eq!(common::sample(&body, "kvtier_cluster_member_up{member=\"b\"}"), 1.0);
    assert_eq!(common::sample(&body, "kvtier_cluster_replica_writes_total"), 2.0);

    // R = 1 (the default): each block on exactly its one replica; a Get
    // through any node reads it from that replica, a Lookup says "peer".
    let (one, _) = b.register(&namespace("r1", BLOCK)).await.unwrap();
    assert_eq!(
        b.put(one, &keys(one, 0..16), data(one, 0..16)).await.unwrap().stored,
        16
    );
    let clients = [&a, &b, &c];
    let mut on_a = Vec::new();
    for i in 0..16 {
        let want = cl.replicas(&key(one, i), 1);
        for (j, n) in clients.iter().enumerate() {
            let expect = want[0].0 == IDS[j];
            assert_eq!(holds(n, one, i).await, expect, "block {i} on {} only", want[0]);
        }
        on_a.push(want[0].0 == "a");
    }
    let l = a.lookup(one, &keys(one, 0..16)).await.unwrap();
    assert_eq!(l.hit_blocks, 16);
    for (i, t) in l.tiers().enumerate() {
        assert_eq!(t == proto::Tier::Peer, !on_a[i], "block {i}: {t:?}");
    }
    let g = c.get(one, &keys(one, 0..16)).await.unwrap();
    assert_eq!(g.loaded, 16);
    assert_eq!(g.data, data(one, 0..16));
    let not_on_c = (0..16).filter(|i| cl.replicas(&key(one, *i), 1)[0].0 != "c").count() as u64;
    assert_eq!(cluster_stats(&c).await.peer_read_blocks, not_on_c);
    // Promoted: c now holds every block itself.
    for i in 0..16 {
        assert!(holds(&c, one, i).await, "block {i} promoted into c");
    }
    // Regions: PutRegion fans out like Put; GetRegion reads peers like Get.
    let mut region = SharedRegion::create(&cl.config.with_file_name("shm"), 32 * BLOCK).unwrap();
    let rid = a.register_region(&region).await.unwrap();
    region.as_mut_slice()[..4 * BLOCK].copy_from_slice(&data(ns, 200..204));
    assert_eq!(a.put_region(ns, &keys(ns, 200..204), rid, 0).await.unwrap().stored, 4);
    for n in [&a, &b, &c] {
        for i in 200..204 {
            assert!(holds(n, ns, i).await, "region block {i} on every replica");
        }
    }
    let h = a
        .get_region(one, &keys(one, 0..16), rid, 16 * BLOCK as u64)
        .await
        .unwrap();
    assert_eq!((h.loaded, h.failed_index), (16, None));
    assert!(region.as_slice()[16 * BLOCK..] == data(one, 0..16)[..]);

    // With c killed: strong R = 3 fails naming c; W = 2 of 3 succeeds.
    cl.kill(2);
    eventually("a sees c down", 20, || async { liveness(&a, "c").await == "down" }).await;
    let e = a.put(ns, &keys(ns, 100..104), data(ns, 100..104)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    assert!(e.message().contains("down: c"), "{e:?}");
    let w2 = a
        .register_replicated(&namespace("w2", BLOCK), Some(3), Some(2))
        .await
        .unwrap();
    let w2 = kvtier_proto::convert::namespace_id(&w2.namespace_id).unwrap();
    assert_eq!(a.put(w2, &keys(w2, 0..4), data(w2, 0..4)).await.unwrap().stored, 4);
    assert!(cluster_stats(&a).await.epoch > 1, "liveness changes bump the epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_gets_its_hints_back_when_it_restarts() {
    let mut cl = Cluster::start(4);
    cl.all_up().await;
    let a = cl.client(0).await;
    let r = a
        .register_replicated(&namespace("ckpt", BLOCK), Some(3), None)
        .await
        .unwrap();
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();

    cl.kill(3);
    eventually("a sees d down", 20, || async { liveness(&a, "d").await == "down" }).await;
    // Registered while d is down: d gets it when it is back.
    let late = a
        .register_replicated(&namespace("late", BLOCK), Some(2), None)
        .await
        .unwrap();
    let n = 32u64;
    let put = a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    assert_eq!(put.stored as u64, n, "R = 3 with d down: a stand-in takes d's copies");
    let hinted = (0..n)
        .filter(|i| cl.replicas(&key(ns, *i), 3).contains(&"d".into()))
        .count() as u64;
    assert!(hinted > 0, "some of {n} keys have d among their 3 replicas");
    let mut pending = 0;
    for i in 0..3 {
        pending += cluster_stats(&cl.client(i).await).await.hints_pending;
    }
    assert_eq!(pending, hinted, "one hint per copy d missed, held by its stand-in");

    // d comes back on the same data dir: the hints reach it, and every key
    // ends up on exactly its 3 replicas (the stand-ins drop their copies).
    cl.start_node(3);
    let clients = [
        cl.client(0).await,
        cl.client(1).await,
        cl.client(2).await,
        cl.client(3).await,
    ];
    eventually("every hint is delivered", 30, || async {
        let mut left = 0;
        for c in &clients[..3] {
            left += cluster_stats(c).await.hints_pending;
        }
        left == 0
    })
    .await;
    eventually("d has the namespace registered while it was down", 20, || async {
        let all = clients[3].namespaces().await.unwrap();
        all.iter()
            .any(|i| i.namespace_id == late.namespace_id && i.replicas == 2)
    })
    .await;
    let info = clients[3].namespaces().await.unwrap();
    let kept = info.iter().find(|i| i.namespace_id == r.namespace_id).unwrap();
    assert_eq!(kept.replicas, 3, "the replication persists across a restart");
    let mut delivered = 0;
    for c in &clients[..3] {
        delivered += cluster_stats(c).await.hints_delivered;
    }
    assert_eq!(delivered, hinted);
    for i in 0..n {
        let want: BTreeSet<usize> = cl.replicas(&key(ns, i), 3).iter().map(|id| cl.index(id)).collect();
        let mut have = BTreeSet::new();
        for (j, c) in clients.iter().enumerate() {
            if holds(c, ns, i).await {
                have.insert(j);
            }
        }
        assert_eq!(have, want, "block {i} on exactly its replicas");
    }
    assert!(dir_of(&cl.nodes[0]).join("hints.log").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_four_nodes_down_reads_succeed_and_strong_writes_fail() {
    let mut cl = Cluster::start(4);
    cl.all_up().await;
    let a = cl.client(0).await;
    let r = a
        .register_replicated(&namespace("r3", BLOCK), Some(3), None)
        .await
        .unwrap();
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    let n = 24u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();

    cl.kill(2);
    cl.kill(3);
    eventually("a sees c and d down", 20, || async {
        liveness(&a, "c").await == "down" && liveness(&a, "d").await == "down"
    })
    .await;
    let b = cl.client(1).await;
    for c in [&a, &b] {
        let g = c.get(ns, &keys(ns, 0..n)).await.unwrap();
        assert_eq!(g.loaded as u64, n, "every block is on a or b");
        assert_eq!(g.data, data(ns, 0..n));
    }
    let from_b = (0..n)
        .filter(|i| !cl.replicas(&key(ns, *i), 3).contains(&"a".into()))
        .count() as u64;
    let peer_reads = cluster_stats(&a).await.peer_read_blocks;
    assert!(from_b > 0, "some of {n} keys are on b, c and d only");
    assert!(
        (from_b..=n).contains(&peer_reads),
        "{peer_reads} blocks read from b: at least the {from_b} a lacks"
    );
    assert_eq!(b.lookup(ns, &keys(ns, 0..n)).await.unwrap().hit_blocks as u64, n);

    let e = a.put(ns, &keys(ns, 100..108), data(ns, 100..108)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    assert!(e.message().contains("down: c, d"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_authenticate_with_the_daemons_token() {
    // a and b share the token; c has another, so a's and b's calls to c
    // (and c's to them) are refused as any client's would be.
    let env = [
        (0, "KVTIER_AUTH_TOKEN", "s3cret"),
        (1, "KVTIER_AUTH_TOKEN", "s3cret"),
        (2, "KVTIER_AUTH_TOKEN", "other"),
    ];
    let cl = Cluster::start_with(3, &env);
    let client = |i: usize, token: &str| {
        let endpoint = cl.nodes[i].daemon.as_ref().unwrap().endpoint();
        let token = Some(token.to_string());
        async move {
            Client::connect(&kvtier_client::ClientConfig {
                endpoint,
                token,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let (a, b) = (client(0, "s3cret").await, client(1, "s3cret").await);
    eventually("a sees b up and c down", 20, || async {
        liveness(&a, "b").await == "up" && liveness(&a, "c").await == "down"
    })
    .await;
    let r = a
        .register_replicated(&namespace("auth", BLOCK), Some(2), None)
        .await
        .unwrap();
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    a.put(ns, &keys(ns, 0..8), data(ns, 0..8)).await.unwrap();
    // Every block on its two replicas; c's copies are with a stand-in.
    for i in 0..8 {
        let want = cl.replicas(&key(ns, i), 2);
        let on_c = want.contains(&"c".into());
        let holders = [holds(&a, ns, i).await, holds(&b, ns, i).await];
        assert_eq!(holders, [true, true], "block {i}: a and b hold it (c: {on_c})");
    }
    let e = Client::connect(&kvtier_client::ClientConfig {
        endpoint: cl.nodes[0].daemon.as_ref().unwrap().endpoint(),
        ..Default::default()
    })
    .await
    .unwrap()
    .replica_get(ns, &keys(ns, 0..1))
    .await
    .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Unauthenticated,
        "the Peer service needs the token too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_talk_tls_when_the_daemons_serve_it() {
    let root = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (root.path().join("tls.crt"), root.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (c, k) = (cert.to_str().unwrap().to_string(), key.to_str().unwrap().to_string());
    let env: Vec<(usize, &str, &str)> = (0..2)
        .flat_map(|i| {
            [
                (i, "KVTIER_TLS_CERT_FILE", c.as_str()),
                (i, "KVTIER_TLS_KEY_FILE", k.as_str()),
            ]
        })
        .collect();
    let extra = format!("ca_file = {:?}\n", c);
    let cl = Cluster::start_full(root, 2, &env, &extra);
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for n in &cl.nodes {
            let cfg = kvtier_client::ClientConfig {
                endpoint: format!("https://{}", n.daemon.as_ref().unwrap().grpc),
                ca_file: Some(cert.clone()),
                ..Default::default()
            };
            v.push(Client::connect(&cfg).await.unwrap());
        }
        v
    };
    eventually("both nodes see each other up over TLS", 20, || async {
        liveness(&clients[0], "b").await == "up" && liveness(&clients[1], "a").await == "up"
    })
    .await;
    let r = clients[0]
        .register_replicated(&namespace("tls", BLOCK), Some(2), None)
        .await
        .unwrap();
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    clients[0].put(ns, &keys(ns, 0..4), data(ns, 0..4)).await.unwrap();
    for c in &clients {
        for i in 0..4 {
            assert!(holds(c, ns, i).await, "block {i} on both nodes");
        }
    }
}

#[test]
fn bad_cluster_tables_exit_2_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        (
            "node_id = \"z\"\nmembers = [{ id = \"a\", addr = \"127.0.0.1:1\" }]\n",
            "cluster.node_id \"z\" is not among cluster.members (a)",
        ),
        (
            "node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"127.0.0.1:1\" }, { id = \"a\", addr = \"127.0.0.1:2\" }]\n",
            "duplicate id \"a\"",
        ),
        (
            "node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"127.0.0.1:1\", weight = -1.0 }]\n",
            "weight -1 must be a positive number",
        ),
    ];
    for (i, (table, why)) in cases.iter().enumerate() {
        let f = d.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, format!("[cluster]\n{table}")).unwrap();
        let e = Daemon::start_fails(&d.path().join("data"), &[("KVTIER_CONFIG", f.to_str().unwrap())]);
        assert_eq!(e.status.code(), Some(2), "{e:?}");
        assert!(e.stderr.contains(why), "{why}: {e:?}");
    }
}

/// Files for a checkpoint test: `mib` MiB in three files plus a small one.
fn checkpoint_tree(root: &Path, mib: usize) -> Vec<(String, Vec<u8>)> {
    let big = mib << 20;
    let files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), b"{\"step\": 1}".to_vec()),
        (
            "shard-0.bin".into(),
            (0..big / 2).map(|i| (i * 7 % 253) as u8).collect(),
        ),
        (
            "shard-1.bin".into(),
            (0..big / 4 + 5).map(|i| (i * 11 % 241) as u8).collect(),
        ),
        ("optim.bin".into(), (0..big / 4).map(|i| (i * 13 % 239) as u8).collect()),
    ];
    for (p, b) in &files {
        std::fs::write(root.join(p), b).unwrap();
    }
    files
}

fn same_tree(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (p, b) in files {
        assert!(std::fs::read(dir.join(p)).unwrap() == *b, "{p} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_replicated_restored_anywhere_and_survives_two_nodes_down() {
    let mut c = Cluster::start(3);
    c.all_up().await;
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = checkpoint_tree(&src, 4);
    let g = ["--group", "job", "--chunk-mib", "1"];
    let ep = |c: &Cluster, i: usize| c.nodes[i].daemon.as_ref().unwrap().endpoint();
    let run = |ep: String, args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        common::kvtier(&ep, &[], &a)
    };
    let args = |v: &[&str]| -> Vec<String> { v.iter().chain(g.iter()).map(|s| s.to_string()).collect() };

    let put = run(ep(&c, 0), args(&["checkpoint", "put", "step-1", src.to_str().unwrap()])).expect(0);
    let chunks = put.json()["chunks"].as_u64().unwrap();
    // Every node lists it, whichever took the write.
    for i in 0..3 {
        let l = run(ep(&c, i), args(&["checkpoint", "list"])).expect(0).json();
        assert_eq!(l[0]["name"], "step-1", "node {i}: {l}");
    }
    // R = min(3, members): every chunk and the manifest on every node.
    let s = cluster_stats(&c.client(1).await).await;
    assert!(s.replica_blocks_received > chunks, "{s:?}");

    // Two of three nodes down: the third restores it alone.
    c.kill(0);
    c.kill(1);
    let out = root.path().join("out-c");
    run(ep(&c, 2), args(&["checkpoint", "get", "step-1", out.to_str().unwrap()])).expect(0);
    same_tree(&out, &files);
    // A strong write cannot complete now, and says why.
    let fail = run(ep(&c, 2), args(&["checkpoint", "put", "step-2", src.to_str().unwrap()])).expect(4);
    assert!(
        fail.stderr.contains("fewer than write_quorum 3")
            && (fail.stderr.contains("down") || fail.stderr.contains("failed")),
        "{fail:?}"
    );

    c.start_node(0);
    c.start_node(1);
    c.all_up().await;
    let out = root.path().join("out-a");
    run(ep(&c, 0), args(&["checkpoint", "get", "step-1", out.to_str().unwrap()])).expect(0);
    same_tree(&out, &files);
    // A delete through one node reaches all of them.
    run(ep(&c, 1), args(&["checkpoint", "delete", "step-1"])).expect(0);
    for i in 0..3 {
        let l = run(ep(&c, i), args(&["checkpoint", "list"])).expect(0).json();
        assert_eq!(l.as_array().map(Vec::len), Some(0), "node {i}: {l}");
        let out = root.path().join(format!("gone-{i}"));
        run(ep(&c, i), args(&["checkpoint", "get", "step-1", out.to_str().unwrap()])).expect(3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_during_a_checkpoint_write_loses_no_acknowledged_chunk() {
    let mut c = Cluster::start(3);
    c.all_up().await;
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = checkpoint_tree(&src, 24);
    let ep0 = c.nodes[0].daemon.as_ref().unwrap().endpoint();
    let writer = std::process::Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["--endpoint", &ep0, "checkpoint", "put", "step-9", src.to_str().unwrap()])
        .args(["--group", "job", "--chunk-mib", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill node b once it has received some chunks.
    let b = c.client(1).await;
    eventually("node b receives chunks", 30, || async {
        cluster_stats(&b).await.replica_blocks_received > 2
    })
    .await;
    c.kill(1);
    let out = writer.wait_with_output().unwrap();
    let code = out.status.code().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Either it completed with 3 live copies, or it failed and said why.
    assert!(code == 0 || code == 4, "exit {code}: {stderr}");
    if code == 4 {
        assert!(stderr.contains("down") || stderr.contains("failed"), "{stderr}");
        assert!(!stderr.is_empty());
    }
    c.start_node(1);
    c.all_up().await;
    let g = ["--group", "job", "--chunk-mib", "1"];
    if code == 0 {
        // Acknowledged: every node restores it, b included after its restart.
        for i in 0..3 {
            let ep = c.nodes[i].daemon.as_ref().unwrap().endpoint();
            let dest = root.path().join(format!("out-{i}"));
            let mut a = vec!["checkpoint", "get", "step-9", dest.to_str().unwrap()];
            a.extend(g);
            common::kvtier(&ep, &[], &a).expect(0);
            same_tree(&dest, &files);
        }
    } else {
        // Not acknowledged: no checkpoint appears, and writing it again works.
        let mut a = vec!["checkpoint", "list"];
        a.extend(g);
        let l = common::kvtier(&ep0, &[], &a).expect(0).json();
        assert_eq!(l.as_array().map(Vec::len), Some(0), "{l}");
        let mut a = vec!["checkpoint", "put", "step-9", src.to_str().unwrap()];
        a.extend(g);
        common::kvtier(&ep0, &[], &a).expect(0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_chunk_hints_are_handed_back_without_a_failed_load() {
    // Four nodes, R = 3: with d down a stand-in takes d's chunks, short
    // ones included (a file's tail, the manifest).
    let mut c = Cluster::start(4);
    c.all_up().await;
    let a = c.client(0).await;
    c.kill(3);
    eventually("a sees d down", 20, || async { liveness(&a, "d").await == "down" }).await;
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = checkpoint_tree(&src, 4);
    let ep = |c: &Cluster, i: usize| c.nodes[i].daemon.as_ref().unwrap().endpoint();
    let g = ["--group", "job", "--chunk-mib", "1"];
    let mut put = vec!["checkpoint", "put", "step-1", src.to_str().unwrap()];
    put.extend(g);
    common::kvtier(&ep(&c, 0), &[], &put).expect(0);
    let mut hinted = 0;
    for i in 0..3 {
        hinted += cluster_stats(&c.client(i).await).await.hints_pending;
    }
    assert!(hinted > 0, "d missed some chunks");

    c.start_node(3);
    c.all_up().await;
    let clients = [c.client(0).await, c.client(1).await, c.client(2).await];
    eventually("every hint is delivered", 30, || async {
        let mut left = 0;
        for cl in &clients {
            left += cluster_stats(cl).await.hints_pending;
        }
        left == 0
    })
    .await;
    let mut delivered = 0;
    for (i, cl) in clients.iter().enumerate() {
        delivered += cluster_stats(cl).await.hints_delivered;
        let m = c.nodes[i].daemon.as_ref().unwrap().metrics.clone().unwrap();
        let (_, body) = tokio::task::spawn_blocking(move || common::http_get(&m, "/metrics"))
            .await
            .unwrap();
        assert_eq!(common::sample(&body, "kvtier_load_failures_total"), 0.0, "node {i}");
    }
    assert_eq!(delivered, hinted, "every chunk d missed, short ones too");
    // With a down, d and the others still restore every byte.
    c.kill(0);
    let out = root.path().join("out-d");
    let mut get = vec!["checkpoint", "get", "step-1", out.to_str().unwrap()];
    get.extend(g);
    common::kvtier(&ep(&c, 3), &[], &get).expect(0);
    same_tree(&out, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writeback_on_the_cluster_puts_each_chunk_once_whatever_r() {
    use kvtier::tier::blob::azurite::{self, Azurite};
    let az = Azurite::start();
    let cred = kvtier::tier::blob::container::SharedKey {
        account: azurite::ACCOUNT.into(),
        key: azurite::KEY.into(),
    };
    kvtier::tier::blob::container::create_container(&az.endpoint(), &cred, "kvtier-cluster")
        .await
        .unwrap();
    let endpoint = az.endpoint();
    let mut env = Vec::new();
    for i in 0..3 {
        env.push((i, "KVTIER_BLOB_ACCOUNT", azurite::ACCOUNT));
        env.push((i, "KVTIER_BLOB_CONTAINER", "kvtier-cluster"));
        env.push((i, "KVTIER_BLOB_ENDPOINT", endpoint.as_str()));
        env.push((i, "KVTIER_BLOB_MODE", "writeback"));
        env.push((i, "AZURE_STORAGE_ACCOUNT_KEY", azurite::KEY));
    }
    let c = Cluster::start_with(3, &env);
    c.all_up().await;
    let a = c.client(0).await;
    // Blocks with R = 3 and R = 2, and a checkpoint (R = 3).
    let (n3, n2) = (namespace("wb-r3", BLOCK), namespace("wb-r2", BLOCK));
    a.register_replicated(&n3, Some(3), None).await.unwrap();
    a.register_replicated(&n2, Some(2), None).await.unwrap();
    let (ns3, ns2) = (n3.id(), n2.id());
    a.put(ns3, &keys(ns3, 0..40), data(ns3, 0..40)).await.unwrap();
    a.put(ns2, &keys(ns2, 0..30), data(ns2, 0..30)).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    checkpoint_tree(&src, 3);
    let ep = c.nodes[1].daemon.as_ref().unwrap().endpoint();
    let put = common::kvtier(
        &ep,
        &[],
        &[
            "checkpoint",
            "put",
            "s",
            src.to_str().unwrap(),
            "--group",
            "g",
            "--chunk-mib",
            "1",
        ],
    )
    .expect(0);
    let chunks = put.json()["chunks"].as_u64().unwrap() + 1; // and the manifest
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.client(i).await);
    }
    eventually("every node's writeback drains", 60, || async {
        for cl in &clients {
            let s = cl.stats_reply().await.unwrap();
            if s.writeback.map_or(1, |w| w.pending_blocks) > 0 {
                return false;
            }
        }
        true
    })
    .await;
    let mut puts = 0;
    for cl in &clients {
        puts += cl.stats_reply().await.unwrap().blob.unwrap().put_requests;
    }
    // Distinct blocks, not R times them.
    assert_eq!(puts, 40 + 30 + chunks, "blob PUTs across the cluster");
    // Reads go local tiers, then replica peers, then blob: a's misses of
    // R = 2 blocks are served by peers, never by blob.
    let before = a.stats_reply().await.unwrap().blob.unwrap();
    let got = a.get(ns2, &keys(ns2, 0..30)).await.unwrap();
    assert_eq!(got.loaded, 30);
    assert!(got.data == data(ns2, 0..30));
    let after = a.stats_reply().await.unwrap().blob.unwrap();
    assert_eq!(
        (after.get_requests, after.head_requests),
        (before.get_requests, before.head_requests),
        "blob was asked before the replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_one_node_removes_every_replica() {
    let c = Cluster::start(3);
    c.all_up().await;
    let a = c.client(0).await;
    let ns = namespace("delete-r3", BLOCK);
    a.register_replicated(&ns, Some(3), None).await.unwrap();
    let ns = ns.id();
    a.put(ns, &keys(ns, 0..8), data(ns, 0..8)).await.unwrap();
    let b = c.client(1).await;
    assert_eq!(b.delete(ns, &keys(ns, 0..4)).await.unwrap(), 4);
    for i in 0..3 {
        let n = c.client(i).await;
        for k in 0..8 {
            assert_eq!(holds(&n, ns, k).await, k >= 4, "node {i} block {k}");
        }
    }
}

/// A delete that misses a killed replica waits in tombstones on the nodes
/// that saw it, reaches the replica when it is back, and takes only the
/// copies written before it: deleted keys do not come back (not through the
/// replica, nor through the resync that follows), and keys put again after
/// the delete stay everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_a_killed_replica_missed_reaches_it_when_it_is_back_and_nothing_deleted_returns() {
    let mut cl = Cluster::start_full(tempfile::tempdir().unwrap(), 3, &[], "clock_margin_ms = 100\n");
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = namespace("tombstones", BLOCK);
    a.register_replicated(&ns, Some(3), Some(2)).await.unwrap();
    let ns = ns.id();
    let n = 16u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    // The copies are older than the delete by more than the clock margin.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    cl.kill(2);
    eventually("a sees c down", 20, || async { liveness(&a, "c").await == "down" }).await;
    assert_eq!(
        a.delete(ns, &keys(ns, 0..8)).await.unwrap(),
        8,
        "c missed it: not an error"
    );
    let b = cl.client(1).await;
    for (name, c) in [("a", &a), ("b", &b)] {
        assert_eq!(
            cluster_stats(c).await.tombstones_pending,
            8,
            "{name} keeps one per key for c"
        );
    }
    // Put again after the delete, while c is still down.
    b.put(ns, &keys(ns, 4..6), data(ns, 4..6)).await.unwrap();

    cl.start_node(2);
    let c = cl.client(2).await;
    let clients = [&a, &b, &c];
    eventually("the tombstones reach c", 30, || async {
        cluster_stats(&a).await.tombstones_pending + cluster_stats(&b).await.tombstones_pending == 0
    })
    .await;
    eventually("c gets the keys put again from the resync", 30, || async {
        holds(&c, ns, 4).await && holds(&c, ns, 5).await
    })
    .await;
    let delivered = cluster_stats(&a).await.tombstones_delivered + cluster_stats(&b).await.tombstones_delivered;
    assert_eq!(delivered, 16, "each of a and b delivers its 8");
    assert_eq!(
        cluster_stats(&c).await.late_delete_copies_removed,
        8,
        "c's 8 copies predate the delete: the first delivery takes them, the second finds none"
    );
    // Every node holds exactly the keys not deleted, or put again since;
    // and still does after a few more heartbeats and resync passes.
    for round in 0..2 {
        for (j, node) in clients.iter().enumerate() {
            for i in 0..n {
                let want = !(0..8).contains(&i) || (4..6).contains(&i);
                assert_eq!(holds(node, ns, i).await, want, "round {round}: node {j}, block {i}");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    // A late delete without its time is refused and removes nothing.
    let e = a.replica_late_delete(ns, &keys(ns, 8..9), 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(holds(&a, ns, 8).await);
    // A late delete from before the copies were written keeps them.
    assert_eq!(a.replica_late_delete(ns, &keys(ns, 8..16), 1).await.unwrap(), 0);
    assert!(holds(&a, ns, 8).await);
}

/// A peer with an older member list (a resync or a push from a member
/// that had not yet seen a join) can store copies on a node that is no
/// replica of them, after that node's rebalancing passes ended. The node
/// notes them, hands each to its replica if that one lacks it, and drops
/// its own once the replica confirms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_copies_a_peer_puts_on_a_non_replica_go_to_their_replica() {
    let cl = Cluster::start(3);
    cl.all_up().await;
    let a = cl.client(0).await;
    let ns = namespace("strays", BLOCK);
    a.register_replicated(&ns, Some(1), Some(1)).await.unwrap();
    let ns = ns.id();
    // Keys whose one replica is b: one b already holds, one it lacks.
    let on_b: Vec<u64> = (0..64)
        .filter(|i| cl.replicas(&key(ns, *i), 1) == [NodeId::from("b")])
        .take(2)
        .collect();
    let (held, lacking) = (on_b[0], on_b[1]);
    a.put(ns, &keys(ns, held..held + 1), data(ns, held..held + 1))
        .await
        .unwrap();
    let (b, c) = (cl.client(1).await, cl.client(2).await);
    assert!(holds(&b, ns, held).await && !holds(&b, ns, lacking).await);
    // c, no replica of either, is sent both the way a stale peer would.
    for i in [held, lacking] {
        let r = c
            .replica_put(ns, &[key(ns, i)], data(ns, i..i + 1), None, None, None)
            .await
            .unwrap();
        assert_eq!(r.stored, 1);
    }
    eventually("c hands both to b and drops its copies", 20, || async {
        holds(&b, ns, held).await
            && holds(&b, ns, lacking).await
            && !holds(&c, ns, held).await
            && !holds(&c, ns, lacking).await
    })
    .await;
    let s = cluster_stats(&c).await;
    assert_eq!((s.stray_copies_noted, s.stray_copies_dropped), (2, 2));
    assert!(
        !holds(&a, ns, held).await && !holds(&a, ns, lacking).await,
        "a is no replica either"
    );
    // A copy a peer stores on its replica is no stray.
    assert_eq!(cluster_stats(&b).await.stray_copies_noted, 0);
}

/// A member's out-of-sync count as `c` sees it.
async fn out_of_sync(c: &Client, id: &str) -> u64 {
    let s = cluster_stats(c).await;
    s.members.into_iter().find(|m| m.id == id).unwrap().out_of_sync_keys
}

/// A replica that stops answering (SIGSTOP) is suspect, not down, so writes
/// still go to it and time out there, while W = 2 of R = 3 acknowledges
/// them. The coordinator marks those copies out of sync (a copy and a hint
/// of its own); the replica is then killed, so nothing it had buffered
/// survives, and restarted before it is ever seen down: no resync runs, and
/// it gets every key it missed from the coordinator's hints alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_that_fail_on_a_suspect_replica_are_marked_out_of_sync_and_repaired() {
    let mut cl = Cluster::start_full(
        tempfile::tempdir().unwrap(),
        3,
        &[],
        "peer_timeout_ms = 300\ndown_after = 100000\n",
    );
    cl.all_up().await;
    let a = cl.client(0).await;
    let r = a
        .register_replicated(&namespace("out-of-sync", BLOCK), Some(3), Some(2))
        .await
        .unwrap();
    let ns = kvtier_proto::convert::namespace_id(&r.namespace_id).unwrap();
    let (before, after) = (20u64, 60u64);
    a.put(ns, &keys(ns, 0..before), data(ns, 0..before)).await.unwrap();
    assert_eq!(out_of_sync(&a, "c").await, 0);

    let c_pid = cl.nodes[2].daemon.as_ref().unwrap().pid();
    kvtier_testkit::freeze_pid(c_pid);
    eventually("a sees c suspect", 20, || async {
        liveness(&a, "c").await == "suspect"
    })
    .await;
    for lo in (before..after).step_by(20) {
        let put = a.put(ns, &keys(ns, lo..lo + 20), data(ns, lo..lo + 20)).await.unwrap();
        assert_eq!(put.stored, 20, "acknowledged at W = 2 without c");
    }
    assert_eq!(liveness(&a, "c").await, "suspect", "c is never seen down");
    let s = cluster_stats(&a).await;
    assert_eq!(
        out_of_sync(&a, "c").await,
        after - before,
        "each copy c missed is marked: {s:?}"
    );
    assert_eq!(s.out_of_sync_marked, after - before);
    assert_eq!(out_of_sync(&a, "b").await, 0, "b took every copy");
    let end = cl.nodes[0].daemon.as_ref().unwrap().endpoint();
    let run = tokio::task::spawn_blocking(move || common::kvtier(&end, &[], &["cluster"]))
        .await
        .unwrap()
        .expect(0);
    let j = run.json();
    let cj = j["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "c")
        .unwrap()
        .clone();
    assert_eq!(cj["out_of_sync_keys"], after - before, "{j}");
    let metrics = cl.nodes[0].daemon.as_ref().unwrap().metrics.clone().unwrap();
    let (_, body) = common::http_get(&metrics, "/metrics");
    assert_eq!(
        common::sample(&body, "kvtier_cluster_member_out_of_sync_keys{member=\"c\"}"),
        (after - before) as f64
    );
    // Reads through b still find every key (b is a replica; c is skipped
    // for the keys it lacks).
    let b = cl.client(1).await;
    let g = b.get(ns, &keys(ns, 0..after)).await.unwrap();
    assert_eq!(g.loaded as u64, after);

    // kill -9 while stopped: whatever c had received is gone with it.
    cl.kill(2);
    cl.start_node(2);
    let c = cl.client(2).await;
    eventually("c holds every key in its own store", 30, || async {
        for i in 0..after {
            if !holds(&c, ns, i).await {
                return false;
            }
        }
        true
    })
    .await;
    eventually("a marks nothing out of sync any more", 20, || async {
        out_of_sync(&a, "c").await == 0
    })
    .await;
    let s = cluster_stats(&a).await;
    assert_eq!(s.hints_pending, 0, "{s:?}");
    assert!(
        s.hints_delivered >= after - before,
        "the missed copies came as hints: {s:?}"
    );
    let sb = cluster_stats(&b).await;
    assert_eq!(
        s.resync_keys_offered + sb.resync_keys_offered,
        0,
        "c was never down: no resync ran"
    );
    let (_, body) = common::http_get(&metrics, "/metrics");
    assert_eq!(
        common::sample(&body, "kvtier_cluster_member_out_of_sync_keys{member=\"c\"}"),
        0.0
    );
    // a is not a replica beyond R = 3 of 3 nodes: it is one of each key's
    // replicas, so its own copies stay; b and c hold every key too.
    for (i, n) in [&a, &b, &c].into_iter().enumerate() {
        for k in 0..after {
            assert!(holds(n, ns, k).await, "node {i} block {k}");
        }
    }
}

/// Azurite with `container` made, and the environment that puts nodes
/// `0..n` in blob writeback mode on it.
async fn writeback_azurite(
    container: &str,
    n: usize,
) -> (kvtier::tier::blob::azurite::Azurite, Vec<(usize, &'static str, String)>) {
    use kvtier::tier::blob::azurite::{self, Azurite};
    let az = Azurite::start();
    let cred = kvtier::tier::blob::container::SharedKey {
        account: azurite::ACCOUNT.into(),
        key: azurite::KEY.into(),
    };
    kvtier::tier::blob::container::create_container(&az.endpoint(), &cred, container)
        .await
        .unwrap();
    let mut env = Vec::new();
    for i in 0..n {
        env.push((i, "KVTIER_BLOB_ACCOUNT", azurite::ACCOUNT.to_string()));
        env.push((i, "KVTIER_BLOB_CONTAINER", container.to_string()));
        env.push((i, "KVTIER_BLOB_ENDPOINT", az.endpoint()));
        env.push((i, "KVTIER_BLOB_MODE", "writeback".to_string()));
        env.push((i, "AZURE_STORAGE_ACCOUNT_KEY", azurite::KEY.to_string()));
    }
    (az, env)
}

fn env_refs<'a>(env: &'a [(usize, &'static str, String)]) -> Vec<(usize, &'static str, &'a str)> {
    env.iter().map(|(i, k, v)| (*i, *k, v.as_str())).collect()
}

/// Blob requests of `kind` node `i` sent, from its metrics endpoint.
async fn blob_requests(c: &Cluster, i: usize, kind: &str) -> u64 {
    let addr = c.nodes[i].daemon.as_ref().unwrap().metrics.clone().expect("metrics on");
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    common::sample(&body, &format!("kvtier_blob_requests_total{{kind=\"{kind}\"}}")) as u64
}

/// Node `i`'s writeback counters, from Stats.
async fn writeback(c: &Cluster, i: usize) -> proto::WritebackStats {
    c.client(i)
        .await
        .stats_reply()
        .await
        .unwrap()
        .writeback
        .expect("writeback mode")
}

/// Waits (at most `secs`) until every key of `range` is in blob, read and
/// verified by a reader of its own (whose requests no node counts), and
/// the writeback of every node in `nodes` has nothing pending.
async fn wait_all_in_blob(
    c: &Cluster,
    az: &kvtier::tier::blob::azurite::Azurite,
    container: &str,
    ns: NamespaceId,
    range: std::ops::Range<u64>,
    nodes: &[usize],
    secs: u64,
) {
    use kvtier::tier::blob::BlobMode;
    let reader = az.config(container, BlobMode::CacheOnly).build().unwrap();
    let ks = keys(ns, range.clone());
    let want = data(ns, range.clone());
    eventually("every key in blob and nothing pending", secs, || async {
        for &i in nodes {
            if writeback(c, i).await.pending_blocks > 0 {
                return false;
            }
        }
        let (r, want_keys) = (reader.clone(), ks.clone());
        let got = tokio::task::spawn_blocking(move || r.fetch_prefix(ns, &want_keys, BLOCK))
            .await
            .unwrap();
        got.len() == ks.len() && got.iter().zip(want.chunks(BLOCK)).all(|(b, w)| b.bytes() == w)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writeback_replicas_hear_that_each_key_landed_instead_of_asking_blob() {
    const CONTAINER: &str = "kvtier-notices";
    const N: u64 = 240;
    let (az, env) = writeback_azurite(CONTAINER, 3).await;
    let c = Cluster::start_with(3, &env_refs(&env));
    c.all_up().await;
    let a = c.client(0).await;
    let n3 = namespace("notices", BLOCK);
    a.register_replicated(&n3, Some(3), None).await.unwrap();
    let ns = n3.id();
    for start in (0..N).step_by(60) {
        let r = start..start + 60;
        a.put(ns, &keys(ns, r.clone()), data(ns, r)).await.unwrap();
    }
    wait_all_in_blob(&c, &az, CONTAINER, ns, 0..N, &[0, 1, 2], 60).await;
    let (mut puts, mut heads, mut confirmed, mut found) = (0, 0, 0, 0);
    for i in 0..3 {
        puts += blob_requests(&c, i, "put").await;
        heads += blob_requests(&c, i, "head").await;
        let w = writeback(&c, i).await;
        confirmed += w.confirmed_by_peers;
        found += w.uploaded_by_peers;
        let s = c.client(i).await.stats_reply().await.unwrap().blob.unwrap();
        assert_eq!((s.already_present, s.request_errors), (0, 0), "node {i}: {s:?}");
    }
    // Each key PUT once, by one of its three replicas.
    assert_eq!(puts, N, "PUTs across the cluster");
    // The two others dropped it on the uploader's notice, not by asking
    // blob: a HEAD only where a notice was late (none expected here).
    assert_eq!(confirmed + found, 2 * N, "every other replica settled each key");
    assert!(heads * 10 <= puts, "{heads} HEADs for {puts} PUTs");
    assert!(
        confirmed >= 2 * N - N / 10,
        "{confirmed} of {} settled by a notice",
        2 * N
    );
    let notices = cluster_stats(&a).await;
    assert!(notices.blob_notices_sent > 0, "{notices:?}");
    assert_eq!(notices.blob_notices_failed, 0, "{notices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notices_replicas_check_blob_once_the_bound_passes() {
    const CONTAINER: &str = "kvtier-no-notices";
    const N: u64 = 60;
    let (az, env) = writeback_azurite(CONTAINER, 3).await;
    // Notices off: the lost-notice case for every key.
    let c = Cluster::start_full(
        tempfile::tempdir().unwrap(),
        3,
        &env_refs(&env),
        "blob_notice_interval_ms = 0\nblob_check_after_ms = 300\n",
    );
    c.all_up().await;
    let a = c.client(0).await;
    let n3 = namespace("no-notices", BLOCK);
    a.register_replicated(&n3, Some(3), None).await.unwrap();
    let ns = n3.id();
    a.put(ns, &keys(ns, 0..N), data(ns, 0..N)).await.unwrap();
    wait_all_in_blob(&c, &az, CONTAINER, ns, 0..N, &[0, 1, 2], 60).await;
    let (mut puts, mut heads, mut confirmed, mut found) = (0, 0, 0, 0);
    for i in 0..3 {
        puts += blob_requests(&c, i, "put").await;
        heads += blob_requests(&c, i, "head").await;
        let w = writeback(&c, i).await;
        confirmed += w.confirmed_by_peers;
        found += w.uploaded_by_peers;
    }
    assert_eq!(puts, N);
    assert_eq!(confirmed, 0, "no notice was sent");
    // Every other replica found each key by a check of its own.
    assert_eq!(found, 2 * N);
    assert!(heads >= 2 * N, "{heads} HEADs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_whose_uploader_is_killed_before_uploading_land_from_another_replica() {
    const CONTAINER: &str = "kvtier-takeover";
    const N: u64 = 90;
    let (mut az, env) = writeback_azurite(CONTAINER, 3).await;
    let mut c = Cluster::start_with(3, &env_refs(&env));
    c.all_up().await;
    let a = c.client(0).await;
    let n3 = namespace("takeover", BLOCK);
    a.register_replicated(&n3, Some(3), None).await.unwrap();
    let ns = n3.id();
    // Blob is down: every write is acknowledged (three copies on SSDs) and
    // no upload can finish.
    az.stop();
    a.put(ns, &keys(ns, 0..N), data(ns, 0..N)).await.unwrap();
    // The uploader of a key is its first replica; kill -9 the one (other
    // than a) that uploads the most.
    let uploader = |i: u64| c.replicas(&key(ns, i), 3)[0].clone();
    let victim = [1, 2]
        .into_iter()
        .max_by_key(|v| (0..N).filter(|i| c.index(&uploader(*i)) == *v).count())
        .unwrap();
    let share = (0..N).filter(|i| c.index(&uploader(*i)) == victim).count() as u64;
    assert!(share > 0, "the victim uploads some keys");
    assert!(writeback(&c, victim).await.pending_blocks == N, "nothing uploaded yet");
    c.kill(victim);
    let id = IDS[victim];
    eventually("a sees the victim down", 20, || async {
        liveness(&a, id).await == "down"
    })
    .await;
    az.start_again();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    wait_all_in_blob(&c, &az, CONTAINER, ns, 0..N, &survivors, 60).await;
    // The survivors uploaded all of it, the victim's share included: the
    // next replica of each of its keys took over.
    let mut taken = 0;
    for &i in &survivors {
        let w = writeback(&c, i).await;
        taken += w.uploaded_blocks;
    }
    assert_eq!(taken, N, "every key uploaded once by a survivor");
}

/// A Put larger than one replica piece reaches each peer as several
/// pipelined ReplicaPuts: every replica holds every block byte for byte,
/// with R = 3 (each peer's copy the whole request) and R = 2 (each peer's
/// copy the blocks placement gives it, gathered, then cut into pieces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_of_many_pieces_reaches_every_replica_byte_for_byte() {
    let block = 1 << 20;
    let cl = Cluster::start(3);
    cl.all_up().await;
    let clients = [cl.client(0).await, cl.client(1).await, cl.client(2).await];
    let a = &clients[0];
    for r in [3usize, 2] {
        let def = namespace(&format!("pieces-r{r}"), block);
        a.register_replicated(&def, Some(r as u32), None).await.unwrap();
        let ns = def.id();
        // 13 blocks of 1 MiB: pieces of 4 blocks and a last one of 1.
        let n = 13u64;
        let bytes: Vec<u8> = (0..n).flat_map(|i| content(ns, i, block)).collect();
        let before: Vec<u64> = {
            let mut v = Vec::new();
            for c in &clients {
                v.push(cluster_stats(c).await.replica_blocks_received);
            }
            v
        };
        let put = a.put(ns, &keys(ns, 0..n), bytes::Bytes::from(bytes)).await.unwrap();
        assert_eq!(put.stored, n as u32, "R = {r}");
        let mut expect = [0u64; 3];
        for i in 0..n {
            let on = cl.replicas(&key(ns, i), r);
            for (j, c) in clients.iter().enumerate() {
                let g = c.replica_get(ns, &[key(ns, i)]).await.unwrap();
                let holds = on.iter().any(|id| id.0 == IDS[j]);
                assert_eq!(g.loaded == 1, holds, "R = {r}: block {i} on {}", IDS[j]);
                if holds {
                    assert!(
                        g.data[..] == content(ns, i, block)[..],
                        "R = {r}: block {i} differs on {}",
                        IDS[j]
                    );
                    if j != 0 {
                        expect[j] += 1;
                    }
                }
            }
        }
        for j in 1..3 {
            let got = cluster_stats(&clients[j]).await.replica_blocks_received - before[j];
            assert_eq!(got, expect[j], "R = {r}: blocks {} received", IDS[j]);
        }
    }
}
