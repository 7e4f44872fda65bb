//! A cluster of real kvtierd processes on 127.0.0.1: each node with its
//! own port, data dir and config file listing every member, started,
//! stopped (gracefully or with SIGKILL) and restarted on the same data dir
//! and port; and what a fault test does to a stopped node's segment files.

use kvtier::replication::placement::Member;
use kvtier::{BlockKey, NamespaceId};
use kvtier_client::Client;
use std::path::{Path, PathBuf};

use crate::{Daemon, cluster_stats, eventually, free_port_pairs, free_ports};

/// One node: its id, port, data dir and config, and the process while it
/// runs.
#[derive(Debug)]
pub struct Node {
    pub id: String,
    /// The loopback address it listens and connects from (127.0.0.1
    /// unless the cluster was started with [`Nodes::start_gossip_at`]).
    pub ip: String,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
    /// Environment this node gets after the cluster's (so a name in both
    /// takes this value): a token of its own, say. Set before
    /// [`Nodes::start_node`].
    pub env: Vec<(String, String)>,
}

/// The nodes of one cluster, each started from its own config file.
#[derive(Debug)]
pub struct Nodes {
    root: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// Environment every node gets.
    env: Vec<(String, String)>,
}

impl Nodes {
    /// `ids.len()` nodes on free ports, each listing all of them, with
    /// `extra` lines in `[cluster]` (after the tests' fast detector:
    /// heartbeats every 100 ms, down after 3 missed) and `env` set on
    /// every node; all started.
    pub fn start(ids: &[&str], extra: &str, env: &[(&str, &str)]) -> Nodes {
        Self::start_on(ids, &free_ports(ids.len()), extra, env)
    }

    /// As [`Nodes::start`], in gossip mode (`cluster.membership =
    /// "gossip"`): each node's gRPC port is followed by a free one, its
    /// default gossip port, and the seeds are the default (the other
    /// members' gossip addresses).
    pub fn start_gossip(ids: &[&str], extra: &str, env: &[(&str, &str)]) -> Nodes {
        let extra = format!("membership = \"gossip\"\n{extra}");
        Self::start_on(ids, &free_port_pairs(ids.len()), &extra, env)
    }

    /// As [`Nodes::start_gossip`], node `i` on loopback address `ips[i]`
    /// (127.0.0.x) and connecting to its peers from it
    /// (`cluster.source_ip`): what [`crate::netns::Partition`] needs to
    /// tell one node's traffic from another's. Inside a network namespace
    /// of the test's own ([`crate::netns::enter`]).
    pub fn start_gossip_at(ids: &[&str], ips: &[&str], extra: &str, env: &[(&str, &str)]) -> Nodes {
        let extra = format!("membership = \"gossip\"\n{extra}");
        Self::start_at(ids, ips, &free_port_pairs(ids.len()), &extra, env)
    }

    fn start_on(ids: &[&str], ports: &[u16], extra: &str, env: &[(&str, &str)]) -> Nodes {
        Self::start_at(ids, &vec!["127.0.0.1"; ids.len()], ports, extra, env)
    }

    fn start_at(ids: &[&str], ips: &[&str], ports: &[u16], extra: &str, env: &[(&str, &str)]) -> Nodes {
        let root = tempfile::tempdir().expect("a temporary directory");
        let members: Vec<Member> = ids
            .iter()
            .zip(ips.iter().zip(ports))
            .map(|(id, (ip, p))| Member::new(*id, format!("{ip}:{p}")))
            .collect();
        let mut n = Nodes {
            nodes: Vec::new(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            root,
        };
        for ((id, ip), port) in ids.iter().zip(ips).zip(ports) {
            n.add_at(id, ip, *port, extra, &members);
        }
        for i in 0..ids.len() {
            n.start_node(i);
        }
        n
    }

    /// Adds node `id` on `port` whose config lists `members`, with
    /// `extra` lines in `[cluster]`; not started. Answers its index.
    pub fn add(&mut self, id: &str, port: u16, extra: &str, members: &[Member]) -> usize {
        self.add_at(id, "127.0.0.1", port, extra, members)
    }

    /// As [`Nodes::add`], on loopback address `ip`, connecting to its
    /// peers from it when it is not 127.0.0.1.
    pub fn add_at(&mut self, id: &str, ip: &str, port: u16, extra: &str, members: &[Member]) -> usize {
        let source = if ip == "127.0.0.1" {
            String::new()
        } else {
            format!("source_ip = \"{ip}\"\n")
        };
        let list: Vec<String> = members
            .iter()
            .map(|m| format!("  {{ id = \"{}\", addr = \"{}\" }},", m.id, m.addr))
            .collect();
        let config = self.root.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnode_id = \"{id}\"\nheartbeat_interval_ms = 100\nsuspect_after = 1\ndown_after = 3\npeer_timeout_ms = 1000\n{source}{extra}members = [\n{}\n]\n",
                list.join("\n")
            ),
        )
        .expect("write a node's config");
        self.nodes.push(Node {
            id: id.to_string(),
            ip: ip.to_string(),
            port,
            dir: self.root.path().join(id),
            config,
            daemon: None,
            env: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Starts (or restarts, on the same data dir and port) node `i`.
    pub fn start_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let listen = format!("{}:{}", n.ip, n.port);
        let shm = self.root.path().join("shm");
        std::fs::create_dir_all(&shm).expect("the shared-memory directory");
        let mut env: Vec<(&str, &str)> = vec![
            ("KVTIER_SHM_DIR", shm.to_str().expect("a UTF-8 path")),
            ("KVTIER_CONFIG", n.config.to_str().expect("a UTF-8 path")),
            ("KVTIER_LISTEN", listen.as_str()),
        ];
        env.extend(self.env.iter().chain(&n.env).map(|(k, v)| (k.as_str(), v.as_str())));
        let d = Daemon::start(&n.dir, &env);
        assert_eq!(d.grpc, listen);
        self.nodes[i].daemon = Some(d);
    }

    /// SIGTERM to node `i`, and waits until it exited 0: its segments are
    /// sealed.
    pub fn stop(&mut self, i: usize) {
        let mut d = self.nodes[i].daemon.take().expect("running");
        let status = d.signal_and_wait(libc::SIGTERM);
        assert!(status.success(), "{} exited with {status}", self.nodes[i].id);
    }

    /// kill -9 of node `i`.
    pub fn kill(&mut self, i: usize) {
        let mut d = self.nodes[i].daemon.take().expect("running");
        d.signal_and_wait(libc::SIGKILL);
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.nodes[i].daemon.as_ref().expect("running").endpoint()
    }

    /// A client of node `i`, sending the bearer token it runs with.
    pub async fn client(&self, i: usize) -> Client {
        let d = self.nodes[i].daemon.as_ref().expect("running");
        match self.token(i) {
            Some(t) => d.client_with_token(t).await,
            None => d.client().await,
        }
    }

    /// The bearer token node `i` runs with (`KVTIER_AUTH_TOKEN` in its
    /// environment), if any.
    pub fn token(&self, i: usize) -> Option<&str> {
        self.env
            .iter()
            .chain(&self.nodes[i].env)
            .filter(|(k, _)| k == "KVTIER_AUTH_TOKEN")
            .map(|(_, v)| v.as_str())
            .next_back()
    }

    /// The members, in the order of the nodes.
    pub fn members(&self) -> Vec<Member> {
        self.nodes
            .iter()
            .map(|n| Member::new(n.id.as_str(), format!("{}:{}", n.ip, n.port)))
            .collect()
    }

    /// The directory of node `i`'s disk tier.
    pub fn blocks_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("blocks")
    }

    /// Waits (up to 20 s) until every running node sees every member up.
    pub async fn all_up(&self) {
        let mut clients = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.daemon.is_some() {
                clients.push(self.client(i).await);
            }
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
}

/// A block record found in a segment file: its namespace and key, and
/// where its data lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRecord {
    pub ns: NamespaceId,
    pub key: BlockKey,
    pub data_at: u64,
    pub data_len: u64,
}

/// Disk pages: records start on one.
const PAGE: u64 = 4096;

/// The block records of every segment file in `dir` (a stopped node's
/// disk tier), by file: a record header starts a page with `KVTR` and
/// names its key, namespace and data. Tombstones (no data) are left out.
pub fn segment_records(dir: &Path) -> Vec<(PathBuf, SegmentRecord)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list the disk tier's directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).expect("read a segment file");
        // Page 0 is the segment's header.
        let mut at = PAGE as usize;
        while at + 64 <= bytes.len() {
            let h = &bytes[at..at + 64];
            let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
            let u128_at = |i: usize| u128::from_le_bytes(h[i..i + 16].try_into().expect("16 bytes"));
            if &h[..4] == b"KVTR" {
                let (data_offset, data_len) = (u64::from(u32_at(8)), u64::from(u32_at(12)));
                let data_at = at as u64 + data_offset;
                if data_len > 0 && data_at + data_len <= bytes.len() as u64 {
                    out.push((
                        f.clone(),
                        SegmentRecord {
                            ns: NamespaceId(u128_at(32)),
                            key: BlockKey(u128_at(16)),
                            data_at,
                            data_len,
                        },
                    ));
                }
            }
            at += PAGE as usize;
        }
    }
    out
}

/// Flips bytes in the data of every block record of a stopped node's
/// disk tier (in `dir`) that `pick` selects, as bit rot would: the header
/// stays whole, so the record is still indexed and fails verification
/// when read. Answers the records flipped.
///
/// Each segment flipped must be sealed (the node stopped cleanly): an
/// unsealed one is verified in full on the next open, which skips a bad
/// record instead of indexing it.
pub fn corrupt_records(dir: &Path, pick: impl Fn(&SegmentRecord) -> bool) -> Vec<SegmentRecord> {
    use std::os::unix::fs::FileExt;
    let mut flipped = Vec::new();
    for (path, r) in segment_records(dir) {
        if !pick(&r) {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open a segment file");
        let len = f.metadata().expect("stat a segment file").len();
        let mut seal = [0u8; 8];
        let sealed = len.is_multiple_of(PAGE)
            && len >= PAGE
            && f.read_exact_at(&mut seal, len - PAGE).is_ok()
            && &seal == b"KVTSEAL1";
        assert!(
            sealed,
            "segment {} is not sealed: was its node stopped cleanly?",
            path.display()
        );
        for off in [r.data_at, r.data_at + r.data_len / 2, r.data_at + r.data_len - 1] {
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).expect("read a byte");
            b[0] ^= 0xa5;
            f.write_all_at(&b, off).expect("write a byte");
        }
        f.sync_all().expect("sync a segment file");
        flipped.push(r);
    }
    flipped
}
