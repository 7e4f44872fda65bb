//! kvtierd clusters in gossip mode (`cluster.membership = "gossip"`): real
//! kvtierd processes on 127.0.0.1, each gossiping on the port after its
//! gRPC port, seeds from the member list. Faults (SIGKILL, SIGSTOP), a
//! join through a seed and a graceful leave; after each, the member lists
//! converge (every node shows the same list digest, everyone up) and no
//! acknowledged write is lost. Every wait polls with a deadline.

use kvtier_testkit as common;

use common::cluster::Nodes;
use common::{cluster_stats, content, data, eventually, free_port_pairs, key, keys, liveness, namespace};
use kvtier::NamespaceId;
use kvtier::replication::placement::{Member, NodeId};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, SlotTable, moves};
use kvtier_client::Client;
use kvtier_proto::proto;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = common::CLUSTER_BLOCK;

/// SWIM fast enough for tests: a probe every 250 ms, a suspect down after
/// 1.5 s (time to refute on a loaded machine), syncs every second.
const FAST: &str = "swim = { probe_period_ms = 250, probe_rtt_ms = 100, suspect_timeout_ms = 1500, gossip_interval_ms = 50, sync_interval_ms = 1000, join_retry_ms = 300, announce_interval_ms = 1000 }\n";

/// Clients of the running nodes.
async fn clients(cl: &Nodes) -> Vec<Client> {
    let mut out = Vec::new();
    for (i, n) in cl.nodes.iter().enumerate() {
        if n.daemon.is_some() {
            out.push(cl.client(i).await);
        }
    }
    out
}

/// Clients of the nodes named `ids`, in that order.
async fn clients_of(cl: &Nodes, ids: &[&str]) -> Vec<Client> {
    let mut out = Vec::new();
    for id in ids {
        let i = cl
            .nodes
            .iter()
            .position(|n| n.id == *id)
            .expect("a node of the cluster");
        out.push(cl.client(i).await);
    }
    out
}

/// Waits until the nodes `ids` each list exactly `ids`, all up and each
/// reported by gossip (a generation known: not only the configured or
/// saved list), with one list digest between them; answers their stats.
async fn converged(cl: &Nodes, ids: &[&str]) -> Vec<proto::ClusterStats> {
    let cs = clients_of(cl, ids).await;
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    let last_seen = Mutex::new(Vec::new());
    eventually(&format!("every node lists {ids:?}, all up, alike"), 30, || async {
        let mut last = Vec::new();
        for c in &cs {
            last.push(cluster_stats(c).await);
        }
        let ok = last.iter().all(|s| {
            let mut have: Vec<String> = s.members.iter().map(|m| m.id.clone()).collect();
            have.sort();
            s.membership == "gossip"
                && s.gossip_messages_in > 0
                && have == want
                && s.members.iter().all(|m| m.liveness == "up" && m.gossip_generation > 0)
                && s.members_digest == last[0].members_digest
        });
        *last_seen.lock().unwrap() = last;
        ok
    })
    .await;
    let last = last_seen.into_inner().unwrap();
    for s in &last {
        assert!(s.gossip_generation > 0, "{s:?}");
        assert!(!s.gossip_addr.is_empty(), "{s:?}");
    }
    last
}

/// Every block `0..n` of `ns` reads back whole through each node of
/// `ids`.
async fn reads_back(cl: &Nodes, ids: &[&str], ns: NamespaceId, n: u64) {
    for (i, c) in ids.iter().zip(clients_of(cl, ids).await) {
        let g = c.get(ns, &keys(ns, 0..n)).await.unwrap();
        assert_eq!(g.loaded, n as usize, "through node {i}");
        for b in 0..n {
            let at = b as usize * BLOCK;
            assert!(
                g.data[at..at + BLOCK] == content(ns, b, BLOCK)[..],
                "block {b} through node {i}"
            );
        }
    }
}

/// Waits until node `i` holds every block of `ns` in `0..n` that it is a
/// replica of at R = `r`: what it missed came back.
async fn holds_its_own(cl: &Nodes, i: usize, ns: NamespaceId, n: u64, r: usize) {
    let placement = table(&cl.members());
    let me = NodeId(cl.nodes[i].id.clone());
    let own: Vec<_> = (0..n)
        .map(|b| key(ns, b))
        .filter(|k| placement.replicas(k, r).unwrap().contains(&me))
        .collect();
    assert!(!own.is_empty(), "{me} is a replica of some keys");
    let c = cl.client(i).await;
    eventually(&format!("{me} holds its {} blocks again", own.len()), 30, || async {
        c.replica_has(ns, &own).await.unwrap().iter().all(|h| *h)
    })
    .await;
}

/// A namespace with R = 3, acknowledged at W = 2.
async fn r3(a: &Client, name: &str) -> NamespaceId {
    let def = namespace(name, BLOCK);
    a.register_replicated(&def, Some(3), Some(2)).await.unwrap();
    def.id()
}

/// 4 nodes, R = 3 with strong writes: while c is down its copies go to
/// the stand-in with a hint, and come back to it when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_seen_down_writes_go_on_hinted_and_it_comes_back_with_all_of_them() {
    let all = ["a", "b", "c", "d"];
    let mut cl = Nodes::start_gossip(&all, FAST, &[]);
    let first = converged(&cl, &all).await;
    let a = cl.client(0).await;
    let def = namespace("gossip-kill", BLOCK);
    a.register_replicated(&def, Some(3), None).await.unwrap();
    let ns = def.id();
    a.put(ns, &keys(ns, 0..20), data(ns, 0..20)).await.unwrap();

    cl.kill(2);
    let (b, d) = (cl.client(1).await, cl.client(3).await);
    eventually("a, b and d see c down", 20, || async {
        liveness(&a, "c").await == "down" && liveness(&b, "c").await == "down" && liveness(&d, "c").await == "down"
    })
    .await;
    // Acknowledged by three copies each while c is down: c's copies went
    // to a stand-in, with hints.
    let n = 100;
    a.put(ns, &keys(ns, 20..n), data(ns, 20..n)).await.unwrap();
    let mut pending = 0;
    for c in [&a, &b, &d] {
        pending += cluster_stats(c).await.hints_pending;
    }
    assert!(pending > 0, "hints held for c");

    cl.start_node(2);
    let after = converged(&cl, &all).await;
    assert_eq!(
        after[0].members_digest, first[0].members_digest,
        "a restart moves no key"
    );
    assert!(
        after[2].gossip_generation > first[2].gossip_generation,
        "c restarted as a newer generation: {} then {}",
        first[2].gossip_generation,
        after[2].gossip_generation
    );
    holds_its_own(&cl, 2, ns, n, 3).await;
    let cs = clients(&cl).await;
    eventually("every hint delivered", 30, || async {
        let mut left = 0;
        for c in &cs {
            left += cluster_stats(c).await.hints_pending;
        }
        left == 0
    })
    .await;
    let mut delivered = 0;
    for c in &cs {
        delivered += cluster_stats(c).await.hints_delivered;
    }
    assert!(delivered > 0, "c got its copies back by hints");
    reads_back(&cl, &all, ns, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_suspected_then_refutes_and_loses_no_write() {
    let cl = Nodes::start_gossip(&["a", "b", "c"], FAST, &[]);
    let first = converged(&cl, &["a", "b", "c"]).await;
    let a = cl.client(0).await;
    let ns = r3(&a, "gossip-pause").await;
    a.put(ns, &keys(ns, 0..20), data(ns, 0..20)).await.unwrap();

    let c = cl.nodes[2].daemon.as_ref().unwrap();
    c.freeze();
    let seen = Mutex::new(Vec::new());
    eventually("a sees c down", 20, || async {
        let l = liveness(&a, "c").await;
        let mut seen = seen.lock().unwrap();
        if seen.last() != Some(&l) {
            seen.push(l.clone());
        }
        l == "down"
    })
    .await;
    let seen = seen.into_inner().unwrap();
    let n = 60;
    let put = a.put(ns, &keys(ns, 20..n), data(ns, 20..n)).await;
    c.thaw();
    put.unwrap();

    let after = converged(&cl, &["a", "b", "c"]).await;
    assert_eq!(after[0].members_digest, first[0].members_digest, "a pause moves no key");
    assert!(
        after[2].gossip_generation > first[2].gossip_generation,
        "c refuted its false \"down\" as a newer generation: {} then {}",
        first[2].gossip_generation,
        after[2].gossip_generation
    );
    eprintln!("a saw c: {seen:?}");
    holds_its_own(&cl, 2, ns, n, 3).await;
    reads_back(&cl, &["a", "b", "c"], ns, n).await;
}

/// Waits until no node rebalances and each of `movers` finished a pass.
async fn settled(cl: &Nodes, movers: &[usize]) {
    let cs = clients(cl).await;
    eventually("rebalancing finished everywhere", 60, || async {
        for (i, c) in cs.iter().enumerate() {
            let s = cluster_stats(c).await;
            if s.rebalance_state != "idle" || (movers.contains(&i) && s.rebalances_done == 0) {
                return false;
            }
        }
        true
    })
    .await;
}

/// Checks that each block `0..n` of `ns` is held by exactly its replicas
/// under `after` among the nodes of `cl` (by index); answers how many
/// blocks changed replicas from `before`.
async fn placed_by(cl: &Nodes, ns: NamespaceId, n: u64, before: &SlotTable, after: &SlotTable) -> u64 {
    let cs = clients(cl).await;
    let mut changed = 0;
    let mut held = Vec::new();
    for c in &cs {
        held.push(c.replica_has(ns, &keys(ns, 0..n)).await.unwrap());
    }
    for i in 0..n {
        let k = key(ns, i);
        let old = before.replicas(&k, 1).unwrap();
        let new = after.replicas(&k, 1).unwrap();
        changed += u64::from(old != new);
        for (x, h) in held.iter().enumerate() {
            let replica = new.contains(&NodeId(cl.nodes[x].id.clone()));
            assert_eq!(
                h[i as usize], replica,
                "block {i} on {}: replica {replica}",
                cl.nodes[x].id
            );
        }
    }
    changed
}

fn table(members: &[Member]) -> SlotTable {
    SlotTable::new(members, DEFAULT_SLOTS, MAX_R).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_through_a_seed_and_the_keys_move_as_the_slot_table_says() {
    let mut cl = Nodes::start_gossip(&["a", "b", "c"], FAST, &[]);
    converged(&cl, &["a", "b", "c"]).await;
    let a = cl.client(0).await;
    let (ns, _) = a.register(&namespace("gossip-join", BLOCK)).await.unwrap();
    let n = 400u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    let before = cl.members();

    // d knows only itself, and a's gossip port as its seed, by name (a
    // name resolves to all its addresses, as a headless service does).
    let port = free_port_pairs(1)[0];
    let d = Member::new("d", format!("127.0.0.1:{port}"));
    let seed = format!("seeds = [\"localhost:{}\"]\n", cl.nodes[0].port + 1);
    let i = cl.add("d", port, &format!("membership = \"gossip\"\n{FAST}{seed}"), &[d]);
    cl.start_node(i);
    converged(&cl, &["a", "b", "c", "d"]).await;
    settled(&cl, &[0, 1, 2]).await;
    let all = ["a", "b", "c", "d"];

    let (old, new) = (table(&before), table(&cl.members()));
    let changed = placed_by(&cl, ns, n, &old, &new).await;
    let slots = moves(&old, &new, 1).unwrap().fraction();
    assert!((slots / 0.25 - 1.0).abs() <= 0.1, "moved slot fraction {slots}");
    let frac = changed as f64 / n as f64;
    let sd = (slots * (1.0 - slots) / n as f64).sqrt();
    assert!((frac - slots).abs() <= 5.0 * sd, "moved fraction {frac}, slots {slots}");
    let mut moved = 0;
    for c in clients(&cl).await {
        moved += cluster_stats(&c).await.rebalance_keys_moved;
    }
    assert_eq!(moved, changed, "every gained copy moved, once");
    let saved = std::fs::read_to_string(cl.nodes[3].dir.join("members.json")).unwrap();
    assert!(
        saved.contains("\"a\"") && saved.contains("\"c\""),
        "d saved the list: {saved}"
    );
    reads_back(&cl, &all, ns, n).await;

    // The joiner's metrics show its gossip.
    let m = cl.nodes[3].daemon.as_ref().unwrap().metrics.clone().unwrap();
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(&m, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        common::sample(&body, "kvtier_cluster_gossip_generation") > 0.0,
        "{body}"
    );
    let handled = r#"kvtier_cluster_gossip_messages_total{outcome="handled"}"#;
    assert!(common::sample(&body, handled) > 0.0, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_during_writes_hands_every_key_over_and_loses_no_write() {
    let cl = Nodes::start_gossip(&["a", "b", "c", "d"], FAST, &[]);
    converged(&cl, &["a", "b", "c", "d"]).await;
    let a = cl.client(0).await;
    let (ns, _) = a.register(&namespace("gossip-leave", BLOCK)).await.unwrap();
    let n = 400u64;
    a.put(ns, &keys(ns, 0..n), data(ns, 0..n)).await.unwrap();
    let before = cl.members();
    // Writes go on through b during the leave: batches of 4 blocks, at
    // most 500 batches or 20 s, until told to stop.
    let (ns2, _) = a.register(&namespace("gossip-leave-writes", BLOCK)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (b, stop) = (cl.client(1).await, stop.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut acked = Vec::new();
            let mut lo = 0u64;
            while !stop.load(Relaxed) && lo < 2000 && Instant::now() < deadline {
                if b.put(ns2, &keys(ns2, lo..lo + 4), data(ns2, lo..lo + 4)).await.is_ok() {
                    acked.extend(lo..lo + 4);
                }
                lo += 4;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Asked of a, which asks d to leave: d gossips its leave and hands
    // its keys over.
    let r = a
        .leave(proto::LeaveRequest {
            id: "d".into(),
            forwarded: false,
        })
        .await
        .unwrap();
    assert!(r.not_reached.is_empty(), "{r:?}");
    let d = cl.client(3).await;
    eventually("d lists itself no more", 20, || async {
        cluster_stats(&d).await.members.iter().all(|m| m.id != "d")
    })
    .await;
    // d still runs (it serves until it is stopped) but is no member.
    let stats = converged(&cl, &["a", "b", "c"]).await;
    assert_eq!(
        cluster_stats(&d).await.members_digest,
        stats[0].members_digest,
        "d agrees"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() >= 8,
        "writes went on during the leave: {} blocks",
        acked.len()
    );
    settled(&cl, &[3]).await;

    let after: Vec<Member> = before.into_iter().filter(|m| m.id.0 != "d").collect();
    let (old, new) = (table(&cl.members()), table(&after));
    let changed = placed_by(&cl, ns, n, &old, &new).await;
    assert!(changed > 0, "d held keys");
    reads_back(&cl, &["a", "b", "c"], ns, n).await;
    // Every write acknowledged during the leave is on its replica among
    // a, b and c, and nowhere else (d kept none).
    let cs = clients(&cl).await;
    let ks: Vec<_> = acked.iter().map(|i| key(ns2, *i)).collect();
    let mut held = Vec::new();
    for c in &cs {
        held.push(c.replica_has(ns2, &ks).await.unwrap());
    }
    for (j, k) in ks.iter().enumerate() {
        let on = new.replicas(k, 1).unwrap();
        for (x, h) in held.iter().enumerate() {
            let replica = on.contains(&NodeId(cl.nodes[x].id.clone()));
            assert_eq!(h[j], replica, "written block {} on {}", acked[j], cl.nodes[x].id);
        }
    }
    let got = a.get(ns2, &ks).await.unwrap();
    assert_eq!(got.loaded, ks.len(), "every acknowledged write reads back");
    eprintln!("{} blocks written during the leave", acked.len());
}

/// The ids node `c` lists, sorted.
async fn listed(c: &Client) -> Vec<String> {
    let mut ids: Vec<String> = cluster_stats(c).await.members.into_iter().map(|m| m.id).collect();
    ids.sort();
    ids
}

/// The gossip addresses of nodes `of`, as a `seeds` line.
fn seeds_of(cl: &Nodes, of: &[usize]) -> String {
    let list: Vec<String> = of
        .iter()
        .map(|i| format!("\"127.0.0.1:{}\"", cl.nodes[*i].port + 1))
        .collect();
    format!("seeds = [{}]\n", list.join(", "))
}

/// A node that places keys in another slot count never enters the member
/// list: a refuses its gossip, answers its join's sync requests with a
/// refusal, and both count the mismatch; b's join keeps failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_slot_count_is_refused_and_never_listed() {
    let mut cl = Nodes::start_gossip(&["a"], FAST, &[]);
    let port = free_port_pairs(1)[0];
    let b = Member::new("b", format!("127.0.0.1:{port}"));
    let extra = format!("membership = \"gossip\"\nslots = 4096\n{FAST}{}", seeds_of(&cl, &[0]));
    let i = cl.add("b", port, &extra, &[b]);
    cl.start_node(i);
    let (a, b) = (cl.client(0).await, cl.client(1).await);
    // Each join round of b sends a an announce and a sync request, and
    // gets a refusal back: three rounds at least.
    eventually("a refused b's gossip, and b heard why", 20, || async {
        cluster_stats(&a).await.placement_mismatches >= 6 && cluster_stats(&b).await.placement_mismatches >= 3
    })
    .await;
    let (sa, sb) = (cluster_stats(&a).await, cluster_stats(&b).await);
    assert_eq!((sa.placement_slots, sb.placement_slots), (DEFAULT_SLOTS, 4096));
    assert_eq!(listed(&a).await, ["a"], "{sa:?}");
    assert_eq!(listed(&b).await, ["b"], "{sb:?}");
    assert_eq!(sa.gossip_messages_in, 0, "nothing of b's reached a's state machine");
    assert_eq!(sb.gossip_messages_in, 0, "b heard nothing but refusals");
    assert_eq!(sa.gossip_messages_rejected + sb.gossip_messages_rejected, 0);
}

/// With a bearer token, gossip is sealed with it: three nodes sharing one
/// converge; a fourth with another token, seeded with all three, is
/// never listed, and each of them rejects its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_is_sealed_with_the_token_and_a_node_with_another_one_is_never_listed() {
    let abc = ["a", "b", "c"];
    let mut cl = Nodes::start_gossip(&abc, FAST, &[("KVTIER_AUTH_TOKEN", "s3cret")]);
    converged(&cl, &abc).await;
    let port = free_port_pairs(1)[0];
    let d = Member::new("d", format!("127.0.0.1:{port}"));
    let extra = format!("membership = \"gossip\"\n{FAST}{}", seeds_of(&cl, &[0, 1, 2]));
    let i = cl.add("d", port, &extra, &[d]);
    cl.nodes[i].env.push(("KVTIER_AUTH_TOKEN".into(), "other".into()));
    cl.start_node(i);
    let cs = clients_of(&cl, &abc).await;
    eventually("a, b and c each rejected d's gossip", 20, || async {
        for c in &cs {
            if cluster_stats(c).await.gossip_messages_rejected < 2 {
                return false;
            }
        }
        true
    })
    .await;
    let stats = converged(&cl, &abc).await;
    for s in &stats {
        assert!(s.gossip_messages_rejected >= 2, "{s:?}");
        assert_eq!(s.placement_mismatches, 0, "{s:?}");
    }
    let d = cl.client(i).await;
    assert_eq!(listed(&d).await, ["d"]);
    assert_eq!(cluster_stats(&d).await.gossip_messages_in, 0, "d heard nothing");

    let m = cl.nodes[0].daemon.as_ref().unwrap().metrics.clone().unwrap();
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(&m, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let rejected = r#"kvtier_cluster_gossip_messages_total{outcome="rejected"}"#;
    assert!(common::sample(&body, rejected) >= 2.0, "{body}");
}

/// A bad gossip setting is a configuration error (exit 2) naming the key;
/// a gossip port that is taken fails the start before kvtierd serves.
#[test]
fn bad_gossip_settings_and_a_taken_gossip_port_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pairs(1)[0];
    let config = |extra: &str| {
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            format!(
                "[cluster]\nnode_id = \"a\"\nmembership = \"gossip\"\n{extra}members = [{{ id = \"a\", addr = \"127.0.0.1:{port}\" }}]\n"
            ),
        )
        .unwrap();
        f
    };
    let listen = format!("127.0.0.1:{port}");
    let start = |f: &std::path::Path| {
        common::Daemon::start_fails(
            &dir.path().join("data"),
            &[("KVTIER_CONFIG", f.to_str().unwrap()), ("KVTIER_LISTEN", &listen)],
        )
    };
    let e = start(&config("seeds = [\"no-port\"]\n"));
    assert_eq!(e.status.code(), Some(2), "{e:?}");
    assert!(
        e.stderr.contains("cluster.seeds[0] \"no-port\" must be host:port"),
        "{e:?}"
    );
    let e = start(&config("swim = { probe_period_ms = 100, probe_rtt_ms = 100 }\n"));
    assert_eq!(e.status.code(), Some(2), "{e:?}");
    assert!(e.stderr.contains("cluster.swim.probe_rtt_ms (100)"), "{e:?}");

    // Someone else holds the gossip port (the gRPC port plus 1).
    let _taken = std::net::UdpSocket::bind(("127.0.0.1", port + 1)).unwrap();
    let e = start(&config(""));
    assert_ne!(e.status.code(), Some(0), "{e:?}");
    assert!(e.stderr.contains("gossip UDP socket"), "{e:?}");
}

/// Waits until each node of `ids` lists exactly `members`, those in
/// `down` down and every other one up.
async fn lists(cl: &Nodes, ids: &[&str], members: &[&str], down: &[&str]) {
    let cs = clients_of(cl, ids).await;
    let mut want: Vec<String> = members.iter().map(|s| s.to_string()).collect();
    want.sort();
    let what = format!("{ids:?} each list {members:?}, with {down:?} down and the others up");
    eventually(&what, 30, || async {
        for c in &cs {
            let s = cluster_stats(c).await;
            let mut have: Vec<String> = s.members.iter().map(|m| m.id.clone()).collect();
            have.sort();
            let live = |m: &proto::MemberStatus| {
                let want = if down.contains(&m.id.as_str()) { "down" } else { "up" };
                m.liveness == want
            };
            if have != want || !s.members.iter().all(live) {
                return false;
            }
        }
        true
    })
    .await;
}

/// The blocks of `0..n` of `ns` that a replica under `placement` lacks,
/// and the copies held by a node that is none of their replicas (by index
/// of `cl`).
async fn misplaced(cl: &Nodes, ns: NamespaceId, n: u64, placement: &SlotTable, r: usize) -> (Vec<String>, Vec<String>) {
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    for (x, c) in clients(cl).await.iter().enumerate() {
        let held = c.replica_has(ns, &keys(ns, 0..n)).await.unwrap();
        let me = NodeId(cl.nodes[x].id.clone());
        for (b, h) in held.iter().enumerate() {
            let replica = placement.replicas(&key(ns, b as u64), r).unwrap().contains(&me);
            match (*h, replica) {
                (false, true) => missing.push(format!("block {b} missing on its replica {me}")),
                (true, false) => extra.push(format!("block {b} still on {me}, no replica of it")),
                _ => {}
            }
        }
    }
    (missing, extra)
}

const PARTITION_TEST: &str = "a_node_cut_off_and_a_join_during_the_cut_lose_no_write_and_converge_once_healed";

/// The kernel drops every packet between d and the other nodes (a network
/// namespace of the test's own, each node on a loopback address of its
/// own; see `kvtier_testkit::netns`) while d keeps running. Each side
/// finds the other down; the majority takes writes, hinted for d; d alone
/// acknowledges none at W = 2; e joins through a seed during the cut.
/// Healed: every node lists all five up with one digest, d gets its
/// copies, every acknowledged block reads back through every node, and
/// each block ends on exactly the replicas the five-member slot table
/// names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_and_a_join_during_the_cut_lose_no_write_and_converge_once_healed() {
    if !common::netns::enter(PARTITION_TEST) {
        return;
    }
    let ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15"];
    let four = ["a", "b", "c", "d"];
    let five = ["a", "b", "c", "d", "e"];
    // A copy whose pusher was cut off is pushed by its other holders
    // after 2 s of failing passes (30 s by default).
    // Tombstones take copies written 100 ms before their delete.
    let extra = format!("{FAST}rebalance_push_waiting_after_ms = 2000\nclock_margin_ms = 100\n");
    let mut cl = Nodes::start_gossip_at(&four, &ips[..4], &extra, &[]);
    let first = converged(&cl, &four).await;
    let (a, d) = (cl.client(0).await, cl.client(3).await);
    let ns = r3(&a, "gossip-cut").await;
    let alone = r3(&a, "gossip-cut-alone").await;
    let gone = r3(&a, "gossip-cut-deleted").await;
    a.put(ns, &keys(ns, 0..40), data(ns, 0..40)).await.unwrap();
    a.put(gone, &keys(gone, 0..24), data(gone, 0..24)).await.unwrap();

    // e's address too: e must not reach d around the cut.
    let cut = common::netns::Partition::cut(ips[3], &[ips[0], ips[1], ips[2], ips[4]]);
    lists(&cl, &["a", "b", "c"], &four, &["d"]).await;
    lists(&cl, &["d"], &four, &["a", "b", "c"]).await;

    a.put(ns, &keys(ns, 40..100), data(ns, 40..100)).await.unwrap();
    let mut hinted = 0;
    for c in clients_of(&cl, &["a", "b", "c"]).await {
        hinted += cluster_stats(&c).await.hints_pending;
    }
    assert!(hinted > 0, "d's copies wait as hints on the majority side");
    for at in (0..24).step_by(8) {
        let r = d.put(alone, &keys(alone, at..at + 8), data(alone, at..at + 8)).await;
        assert!(r.is_err(), "d, cut off, acknowledged blocks {at}..{} at W = 2", at + 8);
    }
    // A delete d misses: the majority keeps tombstones for it.
    a.delete(gone, &keys(gone, 0..16)).await.unwrap();
    assert!(cluster_stats(&a).await.tombstones_pending >= 16);

    // e joins through a while d is cut off: it learns d, down.
    let port = free_port_pairs(1)[0];
    let e = Member::new("e", format!("{}:{port}", ips[4]));
    let seed = format!("seeds = [\"{}:{}\"]\n", ips[0], cl.nodes[0].port + 1);
    let i = cl.add_at(
        "e",
        ips[4],
        port,
        &format!("membership = \"gossip\"\n{extra}{seed}"),
        &[e],
    );
    cl.start_node(i);
    lists(&cl, &["a", "b", "c", "e"], &five, &["d"]).await;
    let n = 160;
    let e_client = cl.client(4).await;
    // Listed is not yet registered: the members send their namespaces to
    // a joiner once they see it up.
    eventually("e knows the namespace", 30, || async {
        e_client.lookup(ns, &keys(ns, 0..1)).await.is_ok()
    })
    .await;
    e_client.put(ns, &keys(ns, 100..n), data(ns, 100..n)).await.unwrap();

    cut.heal();
    let after = converged(&cl, &five).await;
    assert_ne!(
        after[0].members_digest, first[0].members_digest,
        "the join changed the list"
    );
    assert!(
        after[3].gossip_generation >= first[3].gossip_generation,
        "d kept or refuted its generation: {} then {}",
        first[3].gossip_generation,
        after[3].gossip_generation
    );
    holds_its_own(&cl, 3, ns, n, 3).await;
    let placement = table(&cl.members());
    eventually("every block on each of its replicas of the five", 60, || async {
        misplaced(&cl, ns, n, &placement, 3).await.0.is_empty()
    })
    .await;
    // The old holders drop their copies once the new replicas confirm
    // them. A node back from the cut may resync a peer before it hears of
    // e's join, putting copies on old holders after their passes ended:
    // those are noted as strays and handed over too (most runs under CPU
    // load see some).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (missing, extra) = misplaced(&cl, ns, n, &placement, 3).await;
        assert!(missing.is_empty(), "a replica lost copies: {missing:?}");
        if extra.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} copies left on nodes no replica of them 30 s after the heal, e.g. {}",
            extra.len(),
            extra[0]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    reads_back(&cl, &five, ns, n).await;
    // Nothing deleted during the cut comes back: not on d, which missed
    // the delete, nor on e, which joined after it and may take keys from d.
    let all = clients(&cl).await;
    eventually("no node holds a block deleted during the cut", 30, || async {
        for c in &all {
            if c.replica_has(gone, &keys(gone, 0..16))
                .await
                .unwrap()
                .iter()
                .any(|h| *h)
            {
                return false;
            }
        }
        true
    })
    .await;
    let removed_late = cluster_stats(&all[3]).await.late_delete_copies_removed;
    assert!(removed_late > 0, "d removed its copies of the deleted blocks");
    for c in &all {
        assert!(
            c.replica_has(gone, &keys(gone, 0..16))
                .await
                .unwrap()
                .iter()
                .all(|h| !*h)
        );
        let g = c.get(gone, &keys(gone, 16..24)).await.unwrap();
        assert_eq!(g.loaded, 8, "the blocks not deleted read back");
        let g = c.get(gone, &keys(gone, 0..1)).await.unwrap();
        assert_eq!(g.loaded, 0, "a deleted block reads as a miss");
    }
}
