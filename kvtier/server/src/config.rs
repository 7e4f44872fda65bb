//! kvtierd's configuration: a TOML file, then `KVTIER_*` environment
//! overrides, over an embedded default that needs nothing: SSD-only mode,
//! data under `./kvtierd-data`, gRPC on 127.0.0.1:50051, metrics on
//! 127.0.0.1:9464.
//!
//! The Azure Blob tier is a `[blob]` table (or `[manager.blob]` with a full
//! `[manager]`). Its secrets are never `KVTIER_*` variables: they stay in
//! the `AZURE_*` variables the Azure client reads.

use kvtier::manager::{ManagerConfig, Mode};
use kvtier::replication::membership::Detector;
use kvtier::replication::placement::Member;
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_SLOTS, MAX_WEIGHT};
use kvtier::replication::swim::SwimConfig;
use kvtier::tier::blob::{BlobConfig, BlobMode};
use kvtier::tier::disk::DiskConfig;
use kvtier::tier::host::HostConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Paths to a PEM certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the daemon presents.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
}

/// Everything kvtierd reads at startup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// gRPC address; port 0 picks a free one (printed at startup).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Prometheus address; empty disables the metrics endpoint.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// Where blocks and the namespace registry live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `ssd-only` (the default) or `tiered` (host RAM in front of the SSD).
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Bytes of SSD the block store may use.
    #[serde(default = "default_disk_capacity")]
    pub disk_capacity_bytes: u64,
    /// Bytes of host RAM in `tiered` mode.
    #[serde(default = "default_host_capacity")]
    pub host_capacity_bytes: u64,
    /// Bearer token clients must send; none disables auth.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// File holding the bearer token (Kubernetes secrets mount this way).
    #[serde(default)]
    pub auth_token_file: Option<PathBuf>,
    /// Serve TLS with this certificate; none serves plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest Put or Get, in bytes of blocks.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    /// Bytes of request buffers in flight at once; more requests wait.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: u64,
    /// Directory (a tmpfs) whose `kvtier-*` files clients may register as
    /// shared-memory regions; empty disables regions.
    #[serde(default = "default_shm_dir")]
    pub shm_dir: String,
    /// Regions registered at once, at most.
    #[serde(default = "default_max_regions")]
    pub max_regions: usize,
    /// Seconds a stop waits for in-flight requests before it exits.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Full block manager configuration; overrides `mode` and the capacities.
    #[serde(default)]
    pub manager: Option<ManagerConfig>,
    /// The Azure Blob tier behind the SSD, in the manager built from `mode`
    /// and the capacities. With `[manager]`, write `[manager.blob]` instead:
    /// both at once is an error.
    #[serde(default)]
    pub blob: Option<BlobConfig>,
    /// A static cluster of kvtierd nodes; none runs this node alone.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// The S3-compatible listener; none (the default) serves no S3.
    #[serde(default)]
    pub s3: Option<crate::s3::config::S3Config>,
    /// The background scrub of the disk tier: on by default, slowly.
    #[serde(default)]
    pub scrub: ScrubConfig,
    /// Checkpoint groups: collection of the chunks abandoned puts left.
    #[serde(default)]
    pub checkpoints: CheckpointsConfig,
}

/// The `[checkpoints]` table: the collection of chunks that no committed
/// checkpoint uses, which a put whose writer died (killed, its host lost)
/// leaves behind. A put that fails with an error collects its own chunks;
/// a dead writer cannot, so each node looks for its own such copies and
/// removes those unused for `collect_after_s`. A put must commit within
/// that time: a longer one may find chunks of its own removed, and then
/// its restore fails whole (never with wrong bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointsConfig {
    /// Seconds a chunk must stay unused by any committed checkpoint, seen
    /// so by this node's passes, before it is removed; 0 turns the
    /// collection off.
    #[serde(default = "default_collect_after_s")]
    pub collect_after_s: u64,
    /// Seconds between two passes.
    #[serde(default = "default_collect_interval_s")]
    pub collect_interval_s: u64,
}

fn default_collect_after_s() -> u64 {
    24 * 3600
}
fn default_collect_interval_s() -> u64 {
    600
}

impl Default for CheckpointsConfig {
    fn default() -> Self {
        Self {
            collect_after_s: default_collect_after_s(),
            collect_interval_s: default_collect_interval_s(),
        }
    }
}

impl CheckpointsConfig {
    /// Whether abandoned chunks are collected.
    pub fn collects(&self) -> bool {
        self.collect_after_s > 0
    }

    fn validate(&self) -> Result<(), String> {
        if self.collects() && self.collect_interval_s == 0 {
            return Err(
                "checkpoints.collect_interval_s must be > 0 (set checkpoints.collect_after_s = 0 to turn the collection off)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The `[scrub]` table: a background walk over the disk tier that verifies
/// every stored copy, including those nobody reads (checkpoint replicas),
/// and repairs a corrupt one from another replica or blob, as a read does.
///
/// On by default, at a rate that costs little: the scrub reads with the
/// disk tier's O_DIRECT path (no page cache) and verifies with the same
/// xxh3 as every read (tens of GB/s), so 8 MiB/s is a fraction of a
/// percent of an NVMe drive and of one core. Off, a corrupt replica of a
/// checkpoint is found only when the checkpoint is restored, possibly
/// after the other replicas are gone too; the point of the scrub is to
/// restore redundancy before a second fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubConfig {
    /// Bytes of blocks the scrub verifies per second, at most; 0 turns it
    /// off.
    #[serde(default = "default_scrub_bytes_per_s")]
    pub bytes_per_s: u64,
    /// Seconds from the start of one pass over the disk to the start of
    /// the next (a pass that takes longer is followed at once). The first
    /// pass starts this long after startup, or after a minute if that is
    /// sooner.
    #[serde(default = "default_scrub_interval_s")]
    pub interval_s: u64,
}

fn default_scrub_bytes_per_s() -> u64 {
    8 << 20
}
fn default_scrub_interval_s() -> u64 {
    24 * 3600
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self {
            bytes_per_s: default_scrub_bytes_per_s(),
            interval_s: default_scrub_interval_s(),
        }
    }
}

impl ScrubConfig {
    /// Whether the scrub runs.
    pub fn enabled(&self) -> bool {
        self.bytes_per_s > 0
    }

    fn validate(&self) -> Result<(), String> {
        if self.enabled() && self.interval_s == 0 {
            return Err("scrub.interval_s must be > 0 (set scrub.bytes_per_s = 0 to turn the scrub off)".into());
        }
        Ok(())
    }
}

/// The `[cluster]` table: this node's id and the static member list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id; must be one of `members`.
    pub node_id: String,
    /// Every node of the cluster, this one included: `{ id, addr, weight }`,
    /// `addr` being the node's gRPC `host:port` (the client listener). In
    /// gossip mode it may hold only this node (the others are learned),
    /// or nothing when `KVTIER_CLUSTER_ADDR` gives this node's `addr`.
    #[serde(default)]
    pub members: Vec<Member>,
    /// Milliseconds between heartbeats to each peer.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats in a row before a peer is suspect (still written).
    #[serde(default = "default_suspect_after")]
    pub suspect_after: u32,
    /// Missed heartbeats in a row before a peer is down (writes go to a
    /// stand-in with a hint).
    #[serde(default = "default_down_after")]
    pub down_after: u32,
    /// Milliseconds a peer call may take (a heartbeat, a replica write or
    /// read) before it counts as failed.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// PEM CA certificate that signs the peers' certificates, when the
    /// daemon serves TLS; the system roots otherwise.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name to verify in the peers' certificates, if not their host.
    #[serde(default)]
    pub tls_domain: Option<String>,
    /// Bytes per second one resync (a member back from down) sends at
    /// most; 0 for no limit.
    #[serde(default = "default_rebalance_bytes_per_s")]
    pub rebalance_bytes_per_s: u64,
    /// Milliseconds a rebalancing pass keeps failing on copies whose new
    /// replicas have not confirmed them before this node pushes those
    /// copies itself (normally the key's first old replica pushes; a write
    /// that reached the old replicas after their passes, from a
    /// coordinator that had not seen the change yet, has no other pusher).
    #[serde(default = "default_rebalance_push_waiting_after_ms")]
    pub rebalance_push_waiting_after_ms: u64,
    /// Seconds a tombstone (a delete some member missed while it was down
    /// or did not answer, kept by the members that saw it) waits for that
    /// member to come back; after that, it is dropped and the member keeps
    /// its copies until its tiers evict them. 7 days by default.
    #[serde(default = "default_tombstone_ttl_s")]
    pub tombstone_ttl_s: u64,
    /// Tombstones this node keeps at most; past it the oldest go first.
    #[serde(default = "default_max_tombstones")]
    pub max_tombstones: usize,
    /// How far apart the members' clocks may be, in milliseconds. A
    /// tombstone removes a copy only if that copy was written this long
    /// before the delete by the deleting node's clock, so a put made after
    /// the delete is never taken by it; a copy written within this margin
    /// before the delete stays (a KV block is only ever its own content).
    #[serde(default = "default_clock_margin_ms")]
    pub clock_margin_ms: u64,
    /// The slots keys hash into (placement: each slot's replicas are
    /// computed once per member list). The same on every member: a node
    /// with another count is refused by the others. Changing it moves
    /// nearly every key once (see the README's upgrade notes). 65,536 by
    /// default, which balances keys within about ±12% per member up to
    /// 1,000 members at R = 1; larger clusters choose more when they are
    /// set up (see `kvtier::replication::slots`).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// In blob writeback mode: milliseconds between the messages that tell
    /// the other replicas which keys this node's uploads landed in blob
    /// (one message per peer per interval, many keys each); 0 sends none,
    /// and the other replicas check blob themselves after
    /// `blob_check_after_ms`.
    #[serde(default = "default_blob_notice_interval_ms")]
    pub blob_notice_interval_ms: u64,
    /// In blob writeback mode: how long a replica that does not upload a
    /// key waits to hear that it landed before it checks blob itself (one
    /// HEAD); twice as long after each check that finds it absent.
    #[serde(default = "default_blob_check_after_ms")]
    pub blob_check_after_ms: u64,
    /// How members learn who is in the cluster and who is up:
    /// `"heartbeat"` (every node pings every other one; joins and leaves
    /// by `kvtier cluster join/leave`) or `"gossip"` (SWIM over UDP and
    /// TCP on `gossip_port`; a node joins by starting with `seeds`, leaves
    /// by `kvtier cluster leave`).
    #[serde(default)]
    pub membership: MembershipMode,
    /// Gossip mode: the UDP and TCP port of this node's gossip listener,
    /// on the host of its `members` entry's `addr` (which must resolve to
    /// an address of this machine); 0 (the default) is the port of that
    /// `addr` plus 1. When set, every member is taken to gossip on this
    /// same port (one port per pod, as in Kubernetes).
    #[serde(default)]
    pub gossip_port: u16,
    /// Gossip mode: where a starting node asks to join, each `host:port`
    /// (a gossip port); a name resolves to every address it has (a
    /// Kubernetes headless service). Empty (the default): the gossip
    /// addresses of the other `members`.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Gossip mode: SWIM's timing (`[cluster.swim]`), the core's
    /// defaults unless set (see `kvtier::replication::swim::SwimConfig`).
    #[serde(default)]
    pub swim: SwimConfig,
    /// The address this node's connections to its peers leave from, on a
    /// host with more than one: one of this machine's, on the network the
    /// members' `addr`s are on. Unset (the default): the kernel picks by
    /// route. Gossip needs none: it leaves from its listener's address.
    #[serde(default)]
    pub source_ip: Option<std::net::IpAddr>,
}

/// How cluster members learn who is in the cluster and who is up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipMode {
    /// All-to-all heartbeats, and member-list changes forwarded by the
    /// node that was asked.
    #[default]
    Heartbeat,
    /// SWIM gossip: failure detection by probes with suspicion,
    /// dissemination piggybacked on them, joins through seeds.
    Gossip,
}

impl MembershipMode {
    /// `"heartbeat"` or `"gossip"`, as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::Gossip => "gossip",
        }
    }
}

/// The port of `addr` (`host:port`), if it has one.
fn port_of(addr: &str) -> Option<(&str, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    let p = p.parse::<u16>().ok()?;
    (!h.is_empty()).then_some((h, p))
}

fn default_slots() -> u32 {
    DEFAULT_SLOTS
}

fn default_blob_notice_interval_ms() -> u64 {
    100
}
fn default_blob_check_after_ms() -> u64 {
    kvtier::manager::writeback::DEFAULT_CHECK_AFTER.as_millis() as u64
}

fn default_rebalance_push_waiting_after_ms() -> u64 {
    30_000
}
fn default_tombstone_ttl_s() -> u64 {
    7 * 24 * 3600
}
fn default_max_tombstones() -> usize {
    1_000_000
}
fn default_clock_margin_ms() -> u64 {
    10_000
}
fn default_rebalance_bytes_per_s() -> u64 {
    256 << 20
}
fn default_heartbeat_interval_ms() -> u64 {
    500
}
fn default_suspect_after() -> u32 {
    1
}
fn default_down_after() -> u32 {
    3
}
fn default_peer_timeout_ms() -> u64 {
    2000
}

impl ClusterConfig {
    /// Where member `m` gossips (`host:port`): `gossip_port` on its host,
    /// or its gRPC port plus 1. `None` when its `addr` has no port or the
    /// next port does not exist.
    pub fn gossip_addr_of(&self, m: &Member) -> Option<String> {
        let (host, port) = port_of(&m.addr)?;
        let port = if self.gossip_port != 0 {
            self.gossip_port
        } else {
            port.checked_add(1)?
        };
        Some(format!("{host}:{port}"))
    }

    /// This node's gossip address (`host:port`, resolved at start).
    pub fn gossip_addr(&self) -> Option<String> {
        let me = self.members.iter().find(|m| m.id.0 == self.node_id)?;
        self.gossip_addr_of(me)
    }

    /// The seeds a starting node asks to join: `seeds`, or the gossip
    /// addresses of the other configured members.
    pub fn seed_list(&self) -> Vec<String> {
        if !self.seeds.is_empty() {
            return self.seeds.clone();
        }
        self.members
            .iter()
            .filter(|m| m.id.0 != self.node_id)
            .filter_map(|m| self.gossip_addr_of(m))
            .collect()
    }

    /// The failure detector's thresholds.
    pub fn detector(&self) -> Detector {
        Detector {
            suspect_after: self.suspect_after,
            down_after: self.down_after,
        }
    }

    /// Checks everything that needs no network.
    pub fn validate(&self) -> kvtier::Result<()> {
        self.validate_text().map_err(config_error)
    }

    fn validate_text(&self) -> Result<(), String> {
        if self.node_id.is_empty() {
            return Err("cluster.node_id must not be empty".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.id.0.is_empty() {
                return Err(format!("cluster.members[{i}].id must not be empty"));
            }
            if !seen.insert(&m.id) {
                return Err(format!("cluster.members: duplicate id {:?}", m.id.0));
            }
            if !(m.weight.is_finite() && m.weight > 0.0 && m.weight <= MAX_WEIGHT) {
                return Err(format!(
                    "cluster.members[{i}] ({}): weight {} must be a positive number, at most {MAX_WEIGHT:e}",
                    m.id, m.weight
                ));
            }
            if m.addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!(
                    "cluster.members[{i}] ({}): addr {:?} must be host:port",
                    m.id, m.addr
                ));
            }
        }
        if !self.members.iter().any(|m| m.id.0 == self.node_id) {
            let ids: Vec<&str> = self.members.iter().map(|m| m.id.0.as_str()).collect();
            return Err(format!(
                "cluster.node_id {:?} is not among cluster.members ({})",
                self.node_id,
                ids.join(", ")
            ));
        }
        if self.heartbeat_interval_ms == 0 || self.peer_timeout_ms == 0 {
            return Err("cluster.heartbeat_interval_ms and cluster.peer_timeout_ms must be > 0".into());
        }
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return Err(format!(
                "cluster.slots {} must be between 1 and {MAX_SLOTS}",
                self.slots
            ));
        }
        if self.suspect_after == 0 || self.down_after < self.suspect_after {
            return Err(format!(
                "cluster.down_after ({}) must be at least cluster.suspect_after ({}), which must be > 0",
                self.down_after, self.suspect_after
            ));
        }
        if self.membership == MembershipMode::Gossip {
            self.validate_gossip()?;
        }
        if let Some(ip) = self.source_ip {
            // An address this machine does not have would fail every
            // connection to a peer, one by one, at run time.
            std::net::UdpSocket::bind((ip, 0))
                .map_err(|e| format!("cluster.source_ip {ip} is not an address of this machine: {e}"))?;
        }
        if self.tombstone_ttl_s == 0 || self.max_tombstones == 0 {
            return Err(format!(
                "cluster.tombstone_ttl_s ({}) and cluster.max_tombstones ({}) must be > 0: a delete a member missed would be forgotten at once",
                self.tombstone_ttl_s, self.max_tombstones
            ));
        }
        if self.blob_check_after_ms <= self.blob_notice_interval_ms {
            return Err(format!(
                "cluster.blob_check_after_ms ({}) must exceed cluster.blob_notice_interval_ms ({}): replicas would check blob before the notices could come",
                self.blob_check_after_ms, self.blob_notice_interval_ms
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    fn validate_gossip(&self) -> Result<(), String> {
        let me = self
            .members
            .iter()
            .find(|m| m.id.0 == self.node_id)
            .ok_or("cluster.node_id is not among cluster.members")?;
        let Some(at) = self.gossip_addr() else {
            return Err(format!(
                "cluster.gossip_port: 0 takes the port after this node's addr {:?}, which has none: set cluster.gossip_port",
                me.addr
            ));
        };
        if port_of(&me.addr).map(|(_, p)| p) == port_of(&at).map(|(_, p)| p) {
            return Err(format!(
                "cluster.gossip_port {} is this node's gRPC port (addr {:?}): gossip needs a port of its own",
                self.gossip_port, me.addr
            ));
        }
        for (i, m) in self.members.iter().enumerate() {
            let Some(g) = self.gossip_addr_of(m) else { continue };
            if let Some(other) = self.members.iter().find(|o| o.addr == g) {
                return Err(format!(
                    "cluster.members[{i}] ({}): its gossip address {g} is the gRPC addr of member {}: space the gRPC ports by two, or set cluster.gossip_port",
                    m.id, other.id
                ));
            }
        }
        for (i, s) in self.seeds.iter().enumerate() {
            if port_of(s).is_none_or(|(_, p)| p == 0) {
                return Err(format!(
                    "cluster.seeds[{i}] {s:?} must be host:port (a member's gossip port; a name may resolve to many addresses)"
                ));
            }
        }
        self.swim.validate().map_err(|e| format!("cluster.swim.{e}"))
    }
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_data_dir() -> PathBuf {
    "kvtierd-data".into()
}
fn default_mode() -> Mode {
    Mode::SsdOnly
}
fn default_disk_capacity() -> u64 {
    8 << 30
}
fn default_host_capacity() -> u64 {
    1 << 30
}
fn default_max_request_bytes() -> u64 {
    256 << 20
}
fn default_max_inflight_bytes() -> u64 {
    1 << 30
}
fn default_shm_dir() -> String {
    "/dev/shm".into()
}
fn default_max_regions() -> usize {
    64
}
fn default_drain_timeout_s() -> u64 {
    10
}

impl Default for DaemonConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// The environment variables kvtierd reads, with the setting each overrides.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("KVTIER_LISTEN", "listen"),
    ("KVTIER_METRICS_LISTEN", "metrics_listen"),
    ("KVTIER_DATA_DIR", "data_dir"),
    ("KVTIER_MODE", "mode"),
    ("KVTIER_DISK_CAPACITY_BYTES", "disk_capacity_bytes"),
    ("KVTIER_HOST_CAPACITY_BYTES", "host_capacity_bytes"),
    ("KVTIER_AUTH_TOKEN", "auth_token"),
    ("KVTIER_AUTH_TOKEN_FILE", "auth_token_file"),
    ("KVTIER_TLS_CERT_FILE", "tls.cert_file"),
    ("KVTIER_TLS_KEY_FILE", "tls.key_file"),
    ("KVTIER_MAX_REQUEST_BYTES", "max_request_bytes"),
    ("KVTIER_MAX_INFLIGHT_BYTES", "max_inflight_bytes"),
    ("KVTIER_DRAIN_TIMEOUT_S", "drain_timeout_s"),
    ("KVTIER_SHM_DIR", "shm_dir"),
    ("KVTIER_MAX_REGIONS", "max_regions"),
    ("KVTIER_BLOB_ACCOUNT", "blob.account"),
    ("KVTIER_BLOB_CONTAINER", "blob.container"),
    ("KVTIER_BLOB_ENDPOINT", "blob.endpoint"),
    ("KVTIER_BLOB_PREFIX", "blob.prefix"),
    ("KVTIER_BLOB_MODE", "blob.mode"),
    ("KVTIER_CLUSTER_NODE_ID", "cluster.node_id"),
    ("KVTIER_CLUSTER_ADDR", "cluster.members (this node's addr)"),
    ("KVTIER_S3_LISTEN", "s3.listen"),
    ("KVTIER_SCRUB_BYTES_PER_S", "scrub.bytes_per_s"),
    ("KVTIER_SCRUB_INTERVAL_S", "scrub.interval_s"),
    ("KVTIER_CHECKPOINTS_COLLECT_AFTER_S", "checkpoints.collect_after_s"),
    (
        "KVTIER_CHECKPOINTS_COLLECT_INTERVAL_S",
        "checkpoints.collect_interval_s",
    ),
];

/// The `KVTIER_BLOB_*` overrides found in the environment.
#[derive(Debug, Default)]
struct BlobEnv {
    account: Option<String>,
    container: Option<String>,
    endpoint: Option<String>,
    prefix: Option<String>,
    mode: Option<BlobMode>,
    /// The variables set, in the order read, for error messages.
    set: Vec<&'static str>,
}

impl BlobEnv {
    /// Applies the overrides to the blob table in effect (`[manager.blob]`
    /// when `[manager]` is given, else `[blob]`); makes that table when it
    /// is missing and both the account and the container are given.
    fn apply(self, c: &mut DaemonConfig) -> Result<(), String> {
        if self.set.is_empty() {
            return Ok(());
        }
        let (slot, table) = match &mut c.manager {
            Some(m) => (&mut m.blob, "[manager.blob]"),
            None => (&mut c.blob, "[blob]"),
        };
        let blob = match (slot.as_mut(), &self.account, &self.container) {
            (Some(b), _, _) => b,
            // The account and the container are set below.
            (None, Some(_), Some(_)) => slot.insert(BlobConfig::new("", "")),
            (None, _, _) => {
                let missing: Vec<&str> = [
                    ("KVTIER_BLOB_ACCOUNT", self.account.is_none()),
                    ("KVTIER_BLOB_CONTAINER", self.container.is_none()),
                ]
                .into_iter()
                .filter_map(|(v, m)| m.then_some(v))
                .collect();
                return Err(format!(
                    "{} set, but the configuration has no {table} table: set {} too to turn the blob tier on",
                    self.set.join(", "),
                    missing.join(" and ")
                ));
            }
        };
        if let Some(v) = self.account {
            blob.account = v;
        }
        if let Some(v) = self.container {
            blob.container = v;
        }
        if let Some(v) = self.endpoint {
            // Empty: the account's public endpoint.
            blob.endpoint = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = self.prefix {
            blob.prefix = v;
        }
        if let Some(v) = self.mode {
            blob.mode = v;
        }
        Ok(())
    }
}

/// A configuration mistake as the crate's error: the kind callers (and
/// kvtierd's exit code) decide on.
fn config_error(message: String) -> kvtier::Error {
    kvtier::Error::new(kvtier::ErrorKind::Config, message)
}

fn parse<T: std::str::FromStr>(var: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{var}={v:?} is not a valid number"))
}

impl DaemonConfig {
    /// The file's settings (or the defaults), then the environment's. Any
    /// failure is [`kvtier::ErrorKind::Config`], naming the setting.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> kvtier::Result<Self> {
        Self::load_text(path, env).map_err(config_error)
    }

    fn load_text(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("read config {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => Self::default(),
        };
        // Checked before the environment, which applies to [manager.blob]
        // when [manager] is given.
        if c.blob.is_some() && c.manager.is_some() {
            return Err(
                "[blob] goes with mode and the capacities; with a [manager] table, configure the blob tier as [manager.blob]"
                    .into(),
            );
        }
        let (mut cert, mut key) = (None, None);
        let mut blob = BlobEnv::default();
        let mut node_id = None;
        let mut node_addr: Option<String> = None;
        let mut s3_listen = None;
        for (k, v) in env {
            match k.as_str() {
                "KVTIER_LISTEN" => c.listen = v,
                "KVTIER_METRICS_LISTEN" => c.metrics_listen = v,
                "KVTIER_DATA_DIR" => c.data_dir = v.into(),
                "KVTIER_MODE" => {
                    c.mode = match v.as_str() {
                        "ssd-only" => Mode::SsdOnly,
                        "tiered" => Mode::Tiered,
                        _ => return Err(format!("KVTIER_MODE={v:?}: expected \"ssd-only\" or \"tiered\"")),
                    }
                }
                "KVTIER_DISK_CAPACITY_BYTES" => c.disk_capacity_bytes = parse(&k, &v)?,
                "KVTIER_HOST_CAPACITY_BYTES" => c.host_capacity_bytes = parse(&k, &v)?,
                "KVTIER_AUTH_TOKEN" => c.auth_token = Some(v),
                "KVTIER_AUTH_TOKEN_FILE" => c.auth_token_file = Some(v.into()),
                "KVTIER_TLS_CERT_FILE" => cert = Some(PathBuf::from(v)),
                "KVTIER_TLS_KEY_FILE" => key = Some(PathBuf::from(v)),
                "KVTIER_MAX_REQUEST_BYTES" => c.max_request_bytes = parse(&k, &v)?,
                "KVTIER_MAX_INFLIGHT_BYTES" => c.max_inflight_bytes = parse(&k, &v)?,
                "KVTIER_DRAIN_TIMEOUT_S" => c.drain_timeout_s = parse(&k, &v)?,
                "KVTIER_SHM_DIR" => c.shm_dir = v,
                "KVTIER_MAX_REGIONS" => c.max_regions = parse(&k, &v)?,
                "KVTIER_BLOB_ACCOUNT" => {
                    blob.account = Some(v);
                    blob.set.push("KVTIER_BLOB_ACCOUNT");
                }
                "KVTIER_BLOB_CONTAINER" => {
                    blob.container = Some(v);
                    blob.set.push("KVTIER_BLOB_CONTAINER");
                }
                "KVTIER_BLOB_ENDPOINT" => {
                    blob.endpoint = Some(v);
                    blob.set.push("KVTIER_BLOB_ENDPOINT");
                }
                "KVTIER_BLOB_PREFIX" => {
                    blob.prefix = Some(v);
                    blob.set.push("KVTIER_BLOB_PREFIX");
                }
                "KVTIER_BLOB_MODE" => {
                    blob.mode = Some(match v.as_str() {
                        "cache-only" => BlobMode::CacheOnly,
                        "writeback" => BlobMode::Writeback,
                        _ => {
                            return Err(format!(
                                "KVTIER_BLOB_MODE={v:?}: expected \"cache-only\" or \"writeback\""
                            ));
                        }
                    });
                    blob.set.push("KVTIER_BLOB_MODE");
                }
                "KVTIER_CLUSTER_NODE_ID" => node_id = Some(v),
                "KVTIER_CLUSTER_ADDR" => node_addr = Some(v),
                "KVTIER_S3_LISTEN" => s3_listen = Some(v),
                "KVTIER_SCRUB_BYTES_PER_S" => c.scrub.bytes_per_s = parse(&k, &v)?,
                "KVTIER_SCRUB_INTERVAL_S" => c.scrub.interval_s = parse(&k, &v)?,
                "KVTIER_CHECKPOINTS_COLLECT_AFTER_S" => c.checkpoints.collect_after_s = parse(&k, &v)?,
                "KVTIER_CHECKPOINTS_COLLECT_INTERVAL_S" => c.checkpoints.collect_interval_s = parse(&k, &v)?,
                _ => {}
            }
        }
        blob.apply(&mut c)?;
        if let Some(id) = node_id {
            // One cluster file for every node: each sets its own id.
            match &mut c.cluster {
                Some(cl) => cl.node_id = id,
                None => return Err("KVTIER_CLUSTER_NODE_ID set, but the configuration has no [cluster] table".into()),
            }
        }
        if let Some(addr) = node_addr {
            // A pod's address is known when it starts (status.podIP), not
            // when the shared config file is written: this node's entry
            // comes from the environment.
            let Some(cl) = &mut c.cluster else {
                return Err("KVTIER_CLUSTER_ADDR set, but the configuration has no [cluster] table".into());
            };
            match cl.members.iter_mut().find(|m| m.id.0 == cl.node_id) {
                Some(m) => m.addr = addr,
                None => cl.members.push(Member::new(cl.node_id.as_str(), addr)),
            }
        }
        if let Some(l) = s3_listen {
            // Empty turns the listener off; an address turns it on (with
            // the [s3] table's buckets, or none).
            if l.is_empty() {
                c.s3 = None;
            } else {
                c.s3.get_or_insert_with(Default::default).listen = l;
            }
        }
        match (cert, key) {
            (Some(cert_file), Some(key_file)) => c.tls = Some(TlsConfig { cert_file, key_file }),
            (None, None) => {}
            _ => return Err("set both KVTIER_TLS_CERT_FILE and KVTIER_TLS_KEY_FILE, or neither".into()),
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 || self.max_inflight_bytes < self.max_request_bytes {
            return Err(format!(
                "max_inflight_bytes ({}) must be at least max_request_bytes ({}), which must be > 0",
                self.max_inflight_bytes, self.max_request_bytes
            ));
        }
        if self.auth_token.as_deref() == Some("") {
            return Err("auth_token must not be empty (leave it unset to disable auth)".into());
        }
        // Everything that needs no network is checked here, so that a bad
        // value is a configuration error (exit 2) and --print-config sees it.
        if let Some(b) = self.blob_config() {
            b.validate().map_err(|e| e.message().to_string())?;
        }
        if let Some(c) = &self.cluster {
            c.validate_text()?;
        }
        if let Some(s3) = &self.s3 {
            s3.validate()?;
        }
        self.scrub.validate()?;
        self.checkpoints.validate()?;
        Ok(())
    }

    /// The bearer token, read from `auth_token_file` when that is set.
    pub fn token(&self) -> kvtier::Result<Option<String>> {
        self.token_text().map_err(config_error)
    }

    fn token_text(&self) -> Result<Option<String>, String> {
        if let Some(f) = &self.auth_token_file {
            let t = std::fs::read_to_string(f).map_err(|e| format!("read auth_token_file {}: {e}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                return Err(format!("auth_token_file {} is empty", f.display()));
            }
            return Ok(Some(t));
        }
        Ok(self.auth_token.clone())
    }

    /// The block manager's configuration: `manager` if given, else the
    /// `mode` with blocks under `data_dir/blocks` and the `blob` tier.
    pub fn manager_config(&self) -> ManagerConfig {
        if let Some(m) = &self.manager {
            return m.clone();
        }
        // Eight segments or more, so that reclaiming one gives back at most
        // an eighth of the cache; 16 MiB to 256 MiB each.
        let segment_bytes = (self.disk_capacity_bytes / 8).clamp(16 << 20, 256 << 20) / 4096 * 4096;
        let disk = DiskConfig {
            segment_bytes,
            ..DiskConfig::new(self.data_dir.join("blocks"), self.disk_capacity_bytes)
        };
        let mut m = match self.mode {
            Mode::SsdOnly => ManagerConfig::ssd_only(disk),
            _ => ManagerConfig::tiered(Some(HostConfig::with_capacity(self.host_capacity_bytes)), Some(disk)),
        };
        m.blob = self.blob.clone();
        m
    }

    /// The blob tier configured, from `[blob]` or `[manager.blob]`.
    pub fn blob_config(&self) -> Option<&BlobConfig> {
        match &self.manager {
            Some(m) => m.blob.as_ref(),
            None => self.blob.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn embedded_default_is_ssd_only_on_loopback() {
        let c = DaemonConfig::load(None, env(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:50051");
        assert_eq!(c.mode, Mode::SsdOnly);
        let m = c.manager_config();
        assert_eq!(m.mode, Mode::SsdOnly);
        assert!(m.host.is_none());
        let disk = m.disk.unwrap();
        assert_eq!(disk.dir, PathBuf::from("kvtierd-data/blocks"));
        assert_eq!(disk.segment_bytes, 256 << 20);
        let small = DaemonConfig::load(None, env(&[("KVTIER_DISK_CAPACITY_BYTES", "268435456")])).unwrap();
        assert_eq!(small.manager_config().disk.unwrap().segment_bytes, 32 << 20);
        assert!(c.auth_token.is_none() && c.tls.is_none());
    }

    #[test]
    fn environment_overrides_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:1\"\ndisk_capacity_bytes = 5\n").unwrap();
        let c = DaemonConfig::load(
            Some(&f),
            env(&[
                ("KVTIER_LISTEN", "127.0.0.1:2"),
                ("KVTIER_MODE", "tiered"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.disk_capacity_bytes, 5);
        assert_eq!(c.manager_config().mode, Mode::Tiered);
    }

    #[test]
    fn bad_settings_are_precise() {
        let e = DaemonConfig::load(None, env(&[("KVTIER_MODE", "fast")])).unwrap_err();
        assert_eq!(e.kind(), kvtier::ErrorKind::Config);
        let e = e.to_string();
        assert!(e.contains("KVTIER_MODE=\"fast\""), "{e}");
        let e = DaemonConfig::load(None, env(&[("KVTIER_DISK_CAPACITY_BYTES", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid number"), "{e}");
        let e = DaemonConfig::load(None, env(&[("KVTIER_TLS_CERT_FILE", "c.pem")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("both"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.toml");
        std::fs::write(&f, "listen_addr = \"x\"\n").unwrap();
        let e = DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn scrub_is_on_slowly_by_default_and_configurable() {
        let c = DaemonConfig::load(None, env(&[])).unwrap();
        assert!(c.scrub.enabled());
        assert_eq!(c.scrub, ScrubConfig::default());
        assert_eq!((c.scrub.bytes_per_s, c.scrub.interval_s), (8 << 20, 86_400));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.toml");
        std::fs::write(&f, "[scrub]\nbytes_per_s = 1048576\ninterval_s = 60\n").unwrap();
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_SCRUB_INTERVAL_S", "5")])).unwrap();
        assert_eq!((c.scrub.bytes_per_s, c.scrub.interval_s), (1 << 20, 5));
        let off = DaemonConfig::load(None, env(&[("KVTIER_SCRUB_BYTES_PER_S", "0")])).unwrap();
        assert!(!off.scrub.enabled());
        let e = DaemonConfig::load(None, env(&[("KVTIER_SCRUB_INTERVAL_S", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scrub.interval_s must be > 0"), "{e}");
        std::fs::write(&f, "[scrub]\nrate = 1\n").unwrap();
        let e = DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn abandoned_chunks_are_collected_after_a_day_by_default() {
        let c = DaemonConfig::load(None, env(&[])).unwrap();
        assert!(c.checkpoints.collects());
        assert_eq!(
            (c.checkpoints.collect_after_s, c.checkpoints.collect_interval_s),
            (86_400, 600)
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.toml");
        std::fs::write(&f, "[checkpoints]\ncollect_after_s = 60\n").unwrap();
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_CHECKPOINTS_COLLECT_INTERVAL_S", "5")])).unwrap();
        assert_eq!(
            (c.checkpoints.collect_after_s, c.checkpoints.collect_interval_s),
            (60, 5)
        );
        let off = DaemonConfig::load(None, env(&[("KVTIER_CHECKPOINTS_COLLECT_AFTER_S", "0")])).unwrap();
        assert!(!off.checkpoints.collects());
        let e = DaemonConfig::load(None, env(&[("KVTIER_CHECKPOINTS_COLLECT_INTERVAL_S", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoints.collect_interval_s must be > 0"), "{e}");
        std::fs::write(&f, "[checkpoints]\nafter = 1\n").unwrap();
        let e = DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn example_config_parses() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kvtierd.toml");
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        assert_eq!(c.mode, Mode::SsdOnly);
        assert!(c.blob.is_none(), "the [blob] example is commented out");
    }

    /// The commented-out `[blob]` example of a deploy file, uncommented:
    /// from its `# [blob]` line to the first line that is not a comment.
    fn blob_example(file: &str) -> String {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(file)).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "# [blob]")
            .map_while(|l| l.strip_prefix("# "))
            .collect();
        assert!(lines.len() > 2, "deploy/{file} has a commented [blob] example");
        lines.join("\n")
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let f = dir.join("k.toml");
        std::fs::write(&f, text).unwrap();
        f
    }

    #[test]
    fn the_blob_examples_parse() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), &blob_example("kvtierd.toml"));
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        let b = c.manager_config().blob.expect("[blob] reaches the manager");
        assert_eq!(b.mode, BlobMode::Writeback);
        assert!(!b.account.is_empty() && !b.container.is_empty());
        // The manager example's [blob] is a ManagerConfig table.
        let m = ManagerConfig::from_toml(&format!(
            "mode = \"ssd-only\"\n[disk]\ndir = \"/d\"\ncapacity_bytes = 1073741824\n{}",
            blob_example("kvtier.toml")
        ))
        .unwrap();
        assert_eq!(m.blob.unwrap().mode, BlobMode::Writeback);
    }

    #[test]
    fn blob_table_goes_into_the_manager_built_from_mode() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "mode = \"tiered\"\n[blob]\naccount = \"acct1\"\ncontainer = \"kv-cache\"\nmode = \"writeback\"\nprefix = \"prod/\"\n",
        );
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        let m = c.manager_config();
        assert_eq!(m.mode, Mode::Tiered);
        assert!(m.host.is_some() && m.disk.is_some());
        let b = m.blob.unwrap();
        assert_eq!((b.account.as_str(), b.container.as_str()), ("acct1", "kv-cache"));
        assert_eq!((b.mode, b.prefix.as_str()), (BlobMode::Writeback, "prod/"));
        // Every other key keeps the core's default.
        let mut want = BlobConfig::new("acct1", "kv-cache");
        want.mode = BlobMode::Writeback;
        want.prefix = "prod/".into();
        assert_eq!(b, want);
        assert_eq!(c.blob_config(), Some(&want));
        // --print-config output reads back the same.
        let printed = toml::to_string_pretty(&c).unwrap();
        let again: DaemonConfig = toml::from_str(&printed).unwrap();
        assert_eq!(again, c, "{printed}");
        // Without a table there is no blob tier.
        assert!(
            DaemonConfig::load(None, env(&[]))
                .unwrap()
                .manager_config()
                .blob
                .is_none()
        );
    }

    #[test]
    fn blob_environment_makes_and_overrides_the_table() {
        let c = DaemonConfig::load(
            None,
            env(&[("KVTIER_BLOB_ACCOUNT", "acct2"), ("KVTIER_BLOB_CONTAINER", "kv-cache")]),
        )
        .unwrap();
        assert_eq!(c.blob, Some(BlobConfig::new("acct2", "kv-cache")));
        assert_eq!(c.manager_config().blob.unwrap().mode, BlobMode::CacheOnly);

        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "[blob]\naccount = \"acct1\"\ncontainer = \"kv-cache\"\nendpoint = \"http://127.0.0.1:10000/acct1\"\nupload_concurrency = 4\n",
        );
        let c = DaemonConfig::load(
            Some(&f),
            env(&[
                ("KVTIER_BLOB_MODE", "writeback"),
                ("KVTIER_BLOB_PREFIX", "a/b/"),
                ("KVTIER_BLOB_CONTAINER", "other"),
            ]),
        )
        .unwrap();
        let b = c.blob.unwrap();
        assert_eq!((b.account.as_str(), b.container.as_str()), ("acct1", "other"));
        assert_eq!((b.mode, b.prefix.as_str()), (BlobMode::Writeback, "a/b/"));
        assert_eq!(b.endpoint.as_deref(), Some("http://127.0.0.1:10000/acct1"));
        assert_eq!(b.upload_concurrency, 4, "keys the environment does not name stay");
        // An empty endpoint is the account's public one.
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_BLOB_ENDPOINT", "")])).unwrap();
        assert_eq!(c.blob.unwrap().endpoint_url(), "https://acct1.blob.core.windows.net");
        let c = DaemonConfig::load(
            Some(&f),
            env(&[("KVTIER_BLOB_ENDPOINT", "http://10.0.0.1:10000/acct1")]),
        )
        .unwrap();
        assert_eq!(c.blob.unwrap().endpoint_url(), "http://10.0.0.1:10000/acct1");
    }

    #[test]
    fn bad_blob_settings_are_precise() {
        let e = DaemonConfig::load(None, env(&[("KVTIER_BLOB_ACCOUNT", "acct")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KVTIER_BLOB_ACCOUNT set"), "{e}");
        assert!(e.contains("no [blob] table: set KVTIER_BLOB_CONTAINER too"), "{e}");
        let e = DaemonConfig::load(
            None,
            env(&[("KVTIER_BLOB_PREFIX", "p/"), ("KVTIER_BLOB_MODE", "writeback")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("KVTIER_BLOB_PREFIX, KVTIER_BLOB_MODE set"), "{e}");
        assert!(e.contains("KVTIER_BLOB_ACCOUNT and KVTIER_BLOB_CONTAINER"), "{e}");
        let e = DaemonConfig::load(None, env(&[("KVTIER_BLOB_MODE", "write-back")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KVTIER_BLOB_MODE=\"write-back\""), "{e}");
        // The core's checks that need no network run at load.
        let e = DaemonConfig::load(
            None,
            env(&[
                ("KVTIER_BLOB_ACCOUNT", "MyAccount"),
                ("KVTIER_BLOB_CONTAINER", "kv-cache"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("blob.account \"MyAccount\""), "{e}");
        let e = DaemonConfig::load(
            None,
            env(&[
                ("KVTIER_BLOB_ACCOUNT", "acct"),
                ("KVTIER_BLOB_CONTAINER", "kv-cache"),
                ("KVTIER_BLOB_ENDPOINT", "acct.blob.core.windows.net"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("blob.endpoint"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "[blob]\naccount = \"acct\"\ncontainer = \"kv-cache\"\nkey = \"x\"\n",
        );
        let e = DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown field `key`"), "{e}");
        let f = write(d.path(), "[blob]\naccount = \"acct\"\n");
        let e = DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("missing field `container`"), "{e}");
    }

    #[test]
    fn blob_with_a_manager_table_goes_under_it() {
        let d = tempfile::tempdir().unwrap();
        let manager = "[manager]\nmode = \"ssd-only\"\n[manager.disk]\ndir = \"/d\"\ncapacity_bytes = 1073741824\n";
        let blob = "[blob]\naccount = \"acct\"\ncontainer = \"kv-cache\"\n";
        let f = write(d.path(), &format!("{blob}{manager}"));
        for vars in [&[][..], &[("KVTIER_BLOB_MODE", "writeback")][..]] {
            let e = DaemonConfig::load(Some(&f), env(vars)).unwrap_err().to_string();
            assert!(e.contains("configure the blob tier as [manager.blob]"), "{e}");
        }
        // [manager.blob] applies, and the environment overrides it.
        let f = write(
            d.path(),
            &format!("{manager}{}", blob.replace("[blob]", "[manager.blob]")),
        );
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_BLOB_MODE", "writeback")])).unwrap();
        assert!(c.blob.is_none());
        let b = c.manager_config().blob.unwrap();
        assert_eq!((b.account.as_str(), b.mode), ("acct", BlobMode::Writeback));
        // Without [manager.blob], the environment makes it, or says so.
        let f = write(d.path(), manager);
        let e = DaemonConfig::load(Some(&f), env(&[("KVTIER_BLOB_CONTAINER", "kv-cache")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no [manager.blob] table: set KVTIER_BLOB_ACCOUNT too"),
            "{e}"
        );
        let c = DaemonConfig::load(
            Some(&f),
            env(&[("KVTIER_BLOB_CONTAINER", "kv-cache"), ("KVTIER_BLOB_ACCOUNT", "acct")]),
        )
        .unwrap();
        assert_eq!(c.manager_config().blob, Some(BlobConfig::new("acct", "kv-cache")));
    }

    #[test]
    fn cluster_table_parses_with_defaults_and_the_node_id_override() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "[cluster]\nnode_id = \"a\"\nmembers = [\n  { id = \"a\", addr = \"127.0.0.1:7001\" },\n  { id = \"b\", addr = \"127.0.0.1:7002\", weight = 2.0 },\n]\n",
        );
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        let cl = c.cluster.clone().unwrap();
        assert_eq!(cl.node_id, "a");
        assert_eq!(cl.members.len(), 2);
        assert_eq!((cl.members[0].weight, cl.members[1].weight), (1.0, 2.0));
        assert_eq!((cl.heartbeat_interval_ms, cl.suspect_after, cl.down_after), (500, 1, 3));
        assert_eq!(cl.slots, 65_536);
        assert_eq!((cl.blob_notice_interval_ms, cl.blob_check_after_ms), (100, 10_000));
        let printed = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<DaemonConfig>(&printed).unwrap(), c, "{printed}");
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_CLUSTER_NODE_ID", "b")])).unwrap();
        assert_eq!(c.cluster.unwrap().node_id, "b");
        let e = DaemonConfig::load(None, env(&[("KVTIER_CLUSTER_NODE_ID", "b")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [cluster] table"), "{e}");
        assert!(DaemonConfig::load(None, env(&[])).unwrap().cluster.is_none());

        // This node's addr from the environment: replaced when listed...
        let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_CLUSTER_ADDR", "10.0.0.7:50051")])).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(
            (cl.members[0].id.0.as_str(), cl.members[0].addr.as_str()),
            ("a", "10.0.0.7:50051")
        );
        assert_eq!(cl.members.len(), 2);
        // ...added when not (a pod of a gossip cluster: no list at all).
        let g = write(
            d.path(),
            "[cluster]\nnode_id = \"x\"\nmembership = \"gossip\"\ngossip_port = 7946\nseeds = [\"kvtierd.kvtier.svc:7946\"]\n",
        );
        let pod = env(&[
            ("KVTIER_CLUSTER_NODE_ID", "aks-gpu-0"),
            ("KVTIER_CLUSTER_ADDR", "10.0.0.9:50051"),
        ]);
        let cl = DaemonConfig::load(Some(&g), pod).unwrap().cluster.unwrap();
        assert_eq!(cl.members, vec![Member::new("aks-gpu-0", "10.0.0.9:50051")]);
        assert_eq!(cl.gossip_addr().as_deref(), Some("10.0.0.9:7946"));
        let e = DaemonConfig::load(Some(&g), env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("cluster.node_id \"x\" is not among cluster.members ()"),
            "{e}"
        );
        let e = DaemonConfig::load(Some(&g), env(&[("KVTIER_CLUSTER_ADDR", "nohost")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be host:port"), "{e}");
        let e = DaemonConfig::load(None, env(&[("KVTIER_CLUSTER_ADDR", "h:1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KVTIER_CLUSTER_ADDR set, but the configuration has no [cluster] table"),
            "{e}"
        );
    }

    #[test]
    fn the_cluster_example_parses_for_each_node() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/cluster/cluster.toml");
        for id in ["a", "b", "c"] {
            let c = DaemonConfig::load(Some(&f), env(&[("KVTIER_CLUSTER_NODE_ID", id)])).unwrap();
            let cl = c.cluster.unwrap();
            assert_eq!(cl.node_id, id);
            assert_eq!(cl.members.len(), 3);
        }
        let e = DaemonConfig::load(Some(&f), env(&[("KVTIER_CLUSTER_NODE_ID", "d")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"d\" is not among cluster.members (a, b, c)"), "{e}");
    }

    #[test]
    fn bad_cluster_settings_are_precise() {
        let d = tempfile::tempdir().unwrap();
        let load = |body: &str| {
            let f = write(d.path(), &format!("[cluster]\n{body}"));
            DaemonConfig::load(Some(&f), env(&[])).unwrap_err().to_string()
        };
        let two = "members = [{ id = \"a\", addr = \"h:1\" }, { id = \"b\", addr = \"h:2\" }]\n";
        let e = load(&format!("node_id = \"c\"\n{two}"));
        assert!(
            e.contains("cluster.node_id \"c\" is not among cluster.members (a, b)"),
            "{e}"
        );
        let e = load("node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"h:1\" }, { id = \"a\", addr = \"h:2\" }]\n");
        assert!(e.contains("duplicate id \"a\""), "{e}");
        let e = load("node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"h:1\", weight = 0.0 }]\n");
        assert!(e.contains("weight 0 must be a positive number"), "{e}");
        let e = load("node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"h\" }]\n");
        assert!(e.contains("must be host:port"), "{e}");
        let e = load(&format!("node_id = \"a\"\ndown_after = 0\n{two}"));
        assert!(e.contains("cluster.down_after (0)"), "{e}");
        for slots in [0, MAX_SLOTS + 1] {
            let e = load(&format!("node_id = \"a\"\nslots = {slots}\n{two}"));
            assert!(
                e.contains(&format!("cluster.slots {slots} must be between 1 and")),
                "{e}"
            );
        }
        let e = load("node_id = \"a\"\nmembers = [{ id = \"a\", addr = \"h:1\", weight = 2e12 }]\n");
        assert!(
            e.contains("weight 2000000000000 must be a positive number, at most 1e12"),
            "{e}"
        );
        let e = load(&format!("node_id = \"a\"\nblob_check_after_ms = 100\n{two}"));
        assert!(
            e.contains("cluster.blob_check_after_ms (100) must exceed cluster.blob_notice_interval_ms (100)"),
            "{e}"
        );
        for bad in ["tombstone_ttl_s = 0", "max_tombstones = 0"] {
            let e = load(&format!("node_id = \"a\"\n{bad}\n{two}"));
            assert!(
                e.contains("a delete a member missed would be forgotten at once"),
                "{bad}: {e}"
            );
        }
        let e = load(&format!("node_id = \"a\"\nport = 1\n{two}"));
        assert!(e.contains("unknown field `port`"), "{e}");
        // TEST-NET-1: no machine has it.
        let e = load(&format!("node_id = \"a\"\nsource_ip = \"192.0.2.1\"\n{two}"));
        assert!(
            e.contains("cluster.source_ip 192.0.2.1 is not an address of this machine"),
            "{e}"
        );
        let e = load(&format!("node_id = \"a\"\nsource_ip = \"h\"\n{two}"));
        assert!(e.contains("invalid IP address syntax"), "{e}");
        let f = write(
            d.path(),
            &format!("[cluster]\nnode_id = \"a\"\nsource_ip = \"127.0.0.1\"\n{two}"),
        );
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        assert_eq!(c.cluster.unwrap().source_ip, Some([127, 0, 0, 1].into()));
    }

    #[test]
    fn gossip_settings_default_to_the_members_and_bad_ones_are_precise() {
        let d = tempfile::tempdir().unwrap();
        let two = "members = [{ id = \"a\", addr = \"h:7001\" }, { id = \"b\", addr = \"g:7003\" }]\n";
        let f = write(d.path(), &format!("[cluster]\nnode_id = \"a\"\n{two}"));
        let cl = DaemonConfig::load(Some(&f), env(&[])).unwrap().cluster.unwrap();
        assert_eq!(cl.membership, MembershipMode::Heartbeat, "heartbeats stay the default");
        assert_eq!(cl.swim, SwimConfig::default());
        let f = write(
            d.path(),
            &format!(
                "[cluster]\nnode_id = \"a\"\nmembership = \"gossip\"\n{two}[cluster.swim]\nprobe_period_ms = 500\nprobe_rtt_ms = 200\n"
            ),
        );
        let c = DaemonConfig::load(Some(&f), env(&[])).unwrap();
        let cl = c.cluster.clone().unwrap();
        assert_eq!(cl.membership, MembershipMode::Gossip);
        assert_eq!(cl.gossip_addr().as_deref(), Some("h:7002"), "the gRPC port plus 1");
        assert_eq!(cl.seed_list(), vec!["g:7004".to_string()], "the other members'");
        assert_eq!((cl.swim.probe_period_ms, cl.swim.probe_rtt_ms), (500, 200));
        assert_eq!(cl.swim.sync_interval_ms, SwimConfig::default().sync_interval_ms);
        let printed = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<DaemonConfig>(&printed).unwrap(), c, "{printed}");
        let f = write(
            d.path(),
            &format!(
                "[cluster]\nnode_id = \"a\"\nmembership = \"gossip\"\ngossip_port = 7946\nseeds = [\"kvtier.svc:7946\"]\n{two}"
            ),
        );
        let cl = DaemonConfig::load(Some(&f), env(&[])).unwrap().cluster.unwrap();
        assert_eq!(cl.gossip_addr().as_deref(), Some("h:7946"));
        assert_eq!(cl.seed_list(), vec!["kvtier.svc:7946".to_string()]);

        let load = |body: &str| {
            let f = write(d.path(), &format!("[cluster]\nnode_id = \"a\"\n{body}"));
            DaemonConfig::load(Some(&f), env(&[])).unwrap_err()
        };
        let e = load(&format!("membership = \"swim\"\n{two}"));
        assert_eq!(e.kind(), kvtier::ErrorKind::Config);
        assert!(e.to_string().contains("unknown variant `swim`"), "{e}");
        let gossip = "membership = \"gossip\"\n";
        let e = load(&format!("{gossip}seeds = [\"h\"]\n{two}")).to_string();
        assert!(e.contains("cluster.seeds[0] \"h\" must be host:port"), "{e}");
        let e = load(&format!(
            "{gossip}members = [{{ id = \"a\", addr = \"h:7001\" }}, {{ id = \"b\", addr = \"h:7002\" }}]\n"
        ))
        .to_string();
        assert!(
            e.contains("cluster.members[0] (a): its gossip address h:7002 is the gRPC addr of member b"),
            "{e}"
        );
        let e = load(&format!("{gossip}gossip_port = 7001\n{two}")).to_string();
        assert!(e.contains("cluster.gossip_port 7001 is this node's gRPC port"), "{e}");
        let e = load(&format!("{gossip}members = [{{ id = \"a\", addr = \"h:65535\" }}]\n")).to_string();
        assert!(e.contains("set cluster.gossip_port"), "{e}");
        let e = load(&format!("{gossip}{two}[cluster.swim]\nprobe_rtt_ms = 1000\n")).to_string();
        assert!(
            e.contains("cluster.swim.probe_rtt_ms (1000) must be above 0 and below probe_period_ms (1000)"),
            "{e}"
        );
        let e = load(&format!("{gossip}{two}[cluster.swim]\nprobe_every = 1\n")).to_string();
        assert!(e.contains("unknown field `probe_every`"), "{e}");
        // Heartbeat mode ignores the gossip settings.
        let f = write(
            d.path(),
            &format!("[cluster]\nnode_id = \"a\"\ngossip_port = 7001\n{two}"),
        );
        assert!(DaemonConfig::load(Some(&f), env(&[])).is_ok());
    }
}
