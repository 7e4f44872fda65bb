//! Prometheus metrics: request counts and latency histograms per RPC, and
//! the block manager's counters, rendered in the text exposition format on
//! `GET /metrics`.
//!
//! The `kvtier_blob_*`, `kvtier_served_bytes_total`,
//! `kvtier_blob_promotions_total` and `kvtier_throughput_reduction` series
//! exist only with a blob tier configured, and `kvtier_writeback_*` only in
//! its writeback mode: a node without one exports none of them (rather than
//! zeros that look like an idle tier).

use kvtier::BlockManager;
use kvtier::manager::ManagerStats;
use kvtier::tier::TierStats;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The RPCs measured, in the order of [`Metrics::rpcs`].
pub const RPCS: &[&str] = &[
    "RegisterNamespace",
    "ListNamespaces",
    "Lookup",
    "Put",
    "Get",
    "Delete",
    "Stats",
    "Health",
    "Events",
    "Locate",
    "ListKeys",
    "RegisterRegion",
    "UnregisterRegion",
    "PutRegion",
    "GetRegion",
    "Ping",
    "ReplicaRegister",
    "ReplicaPut",
    "ReplicaGet",
    "ReplicaLookup",
    "ReplicaGetChunk",
    "ReplicaDelete",
    "ReplicaLateDelete",
    "ReplicaHas",
    "Join",
    "Leave",
    "Members",
    "BlobNotices",
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS_S: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// One RPC's counters.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    ok: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS_S.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl RpcMetrics {
    /// Records one request.
    pub fn observe(&self, elapsed: Duration, ok: bool) {
        if ok { &self.ok } else { &self.errors }.fetch_add(1, Relaxed);
        let s = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_ns.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

/// The daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    rpcs: [RpcMetrics; RPCS.len()],
    /// Request bytes waiting for or holding a buffer now.
    pub inflight_bytes: AtomicU64,
    /// Requests refused for bad input (before any change).
    pub bad_requests: AtomicU64,
    /// Requests refused for a missing or wrong token.
    pub unauthenticated: AtomicU64,
    /// The cluster this node is a member of, once it is set up. Weak: the
    /// cluster holds the block manager, which a stop must get back.
    pub cluster: std::sync::OnceLock<std::sync::Weak<crate::cluster::Cluster>>,
    /// The S3 listener's counters, once it serves.
    pub s3: std::sync::OnceLock<Arc<crate::s3::S3Metrics>>,
    /// Read repair and the scrub, once the node is set up. Weak, as the
    /// cluster is.
    pub repair: std::sync::OnceLock<std::sync::Weak<crate::repair::Repair>>,
}

impl Metrics {
    /// The counters of RPC `name` (one of [`RPCS`]).
    pub fn rpc(&self, name: &str) -> &RpcMetrics {
        let i = RPCS.iter().position(|r| *r == name).expect("a known RPC name");
        &self.rpcs[i]
    }

    /// The exposition text, with the manager's counters read now.
    pub fn render(&self, m: &BlockManager) -> String {
        let mut o = self.render_stats(&m.stats());
        if let Some(c) = self.cluster.get().and_then(std::sync::Weak::upgrade) {
            render_cluster(&mut o, &c.stats());
        }
        if let Some(r) = self.repair.get().and_then(std::sync::Weak::upgrade) {
            render_repair(&mut o, &r.stats());
        }
        if let Some(s3) = self.s3.get() {
            s3.render(&mut o);
        }
        o
    }

    /// The exposition text for the manager's counters `s`.
    pub fn render_stats(&self, s: &ManagerStats) -> String {
        let mut o = String::with_capacity(8192);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} counter\nkvtier_{name} {v}"
            );
        };
        counter("lookups_total", "Lookup requests.", s.lookups);
        counter(
            "lookup_hit_blocks_total",
            "Blocks found by lookups.",
            s.lookup_hit_blocks,
        );
        counter("stored_blocks_total", "Blocks written by stores.", s.stored_blocks);
        counter(
            "present_blocks_total",
            "Blocks stores found already present.",
            s.present_blocks,
        );
        counter("loaded_blocks_total", "Blocks loaded.", s.loaded_blocks);
        counter(
            "missed_blocks_total",
            "Blocks asked for past the present prefix.",
            s.missed_blocks,
        );
        counter(
            "load_failures_total",
            "Present blocks that failed verification.",
            s.load_failures,
        );
        counter("promotions_total", "Disk hits copied into host memory.", s.promotions);
        counter("throttled_total", "Requests answered with throttled.", s.throttled);
        counter(
            "not_admitted_total",
            "Blocks the admission filter kept off disk.",
            s.not_admitted,
        );
        counter("offloaded_total", "Blocks the cascade wrote to disk.", s.offloaded);
        counter("offload_errors_total", "Cascade writes that failed.", s.offload_errors);
        counter(
            "bad_requests_total",
            "Requests refused for bad input.",
            self.bad_requests.load(Relaxed),
        );
        counter(
            "unauthenticated_total",
            "Requests refused for a bad token.",
            self.unauthenticated.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP kvtier_offload_queue_depth Write-through blocks queued for disk.\n# TYPE kvtier_offload_queue_depth gauge\nkvtier_offload_queue_depth {}",
            s.offload_queue_depth
        );
        let _ = writeln!(
            o,
            "# HELP kvtier_inflight_request_bytes Request bytes in flight.\n# TYPE kvtier_inflight_request_bytes gauge\nkvtier_inflight_request_bytes {}",
            self.inflight_bytes.load(Relaxed)
        );
        let tiers: Vec<(&str, &TierStats)> = [("host", s.host.as_ref()), ("disk", s.disk.as_ref())]
            .into_iter()
            .filter_map(|(n, t)| Some((n, t?)))
            .collect();
        type Field = fn(&TierStats) -> u64;
        let per_tier: [(&str, &str, &str, Field); 9] = [
            ("tier_hits_total", "counter", "Blocks served from the tier.", |t| t.hits),
            (
                "tier_misses_total",
                "counter",
                "Loads that did not find a block in the tier.",
                |t| t.misses,
            ),
            (
                "tier_bytes_written_total",
                "counter",
                "Bytes written into the tier.",
                |t| t.bytes_written,
            ),
            ("tier_bytes_read_total", "counter", "Bytes read out of the tier.", |t| {
                t.bytes_read
            }),
            ("tier_evictions_total", "counter", "Blocks evicted to make room.", |t| {
                t.evictions
            }),
            (
                "tier_corrupt_total",
                "counter",
                "Blocks that failed verification.",
                |t| t.corrupt,
            ),
            (
                "tier_rejected_total",
                "counter",
                "Puts refused for lack of space or buffers.",
                |t| t.rejected,
            ),
            ("tier_used_bytes", "gauge", "Bytes held.", |t| t.usage.used_bytes),
            ("tier_capacity_bytes", "gauge", "Bytes the tier may hold.", |t| {
                t.usage.capacity_bytes
            }),
        ];
        for (name, kind, help, f) in per_tier {
            let _ = writeln!(o, "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} {kind}");
            for (tier, t) in &tiers {
                let _ = writeln!(o, "kvtier_{name}{{tier=\"{tier}\"}} {}", f(t));
            }
        }
        let _ = writeln!(
            o,
            "# HELP kvtier_requests_total gRPC requests by outcome.\n# TYPE kvtier_requests_total counter"
        );
        for (name, r) in RPCS.iter().zip(&self.rpcs) {
            let _ = writeln!(
                o,
                "kvtier_requests_total{{rpc=\"{name}\",outcome=\"ok\"}} {}",
                r.ok.load(Relaxed)
            );
            let _ = writeln!(
                o,
                "kvtier_requests_total{{rpc=\"{name}\",outcome=\"error\"}} {}",
                r.errors.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP kvtier_request_duration_seconds gRPC request latency.\n# TYPE kvtier_request_duration_seconds histogram"
        );
        for (name, r) in RPCS.iter().zip(&self.rpcs) {
            let mut cum = 0;
            for (b, c) in BUCKETS_S.iter().zip(&r.buckets) {
                cum += c.load(Relaxed);
                let _ = writeln!(
                    o,
                    "kvtier_request_duration_seconds_bucket{{rpc=\"{name}\",le=\"{b}\"}} {cum}"
                );
            }
            let count = r.count.load(Relaxed);
            let _ = writeln!(
                o,
                "kvtier_request_duration_seconds_bucket{{rpc=\"{name}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "kvtier_request_duration_seconds_sum{{rpc=\"{name}\"}} {}",
                r.sum_ns.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(o, "kvtier_request_duration_seconds_count{{rpc=\"{name}\"}} {count}");
        }
        render_blob(&mut o, s);
        o
    }
}

/// The blob tier's and the writeback's series, when they exist.
fn render_blob(o: &mut String, s: &ManagerStats) {
    let Some(b) = &s.blob else { return };
    let mut one = |name: &str, kind: &str, help: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(
            o,
            "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} {kind}\nkvtier_{name} {v}"
        );
    };
    one(
        "blob_request_errors_total",
        "counter",
        "Blob requests that failed, other than a missing object or one present (blob tier only).",
        &b.request_errors,
    );
    one(
        "blob_already_present_total",
        "counter",
        "Uploads refused because the object existed: uploaded once already (blob tier only).",
        &b.already_present,
    );
    one(
        "blob_skipped_unavailable_total",
        "counter",
        "Blob reads answered as misses without a request while the service failed (blob tier only).",
        &b.skipped_unavailable,
    );
    one(
        "blob_corrupt_total",
        "counter",
        "Blob objects refused by verification, served as misses (blob tier only).",
        &b.tier.corrupt,
    );
    one(
        "blob_hits_total",
        "counter",
        "Blocks loads served from blob (blob tier only).",
        &b.tier.hits,
    );
    one(
        "blob_misses_total",
        "counter",
        "Loads that stopped short in blob (blob tier only).",
        &b.tier.misses,
    );
    one(
        "blob_promotions_total",
        "counter",
        "Blob hits copied into a local tier (blob tier only).",
        &s.blob_promotions,
    );
    one(
        "throughput_reduction",
        "gauge",
        "Bytes served from local tiers over all bytes served, 0 before any (blob tier only).",
        &s.throughput_reduction,
    );
    let mut labeled = |name: &str, help: &str, label: &str, values: &[(&str, u64)]| {
        let _ = writeln!(o, "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} counter");
        for (l, v) in values {
            let _ = writeln!(o, "kvtier_{name}{{{label}=\"{l}\"}} {v}");
        }
    };
    labeled(
        "blob_requests_total",
        "Blob requests sent, by kind (blob tier only).",
        "kind",
        &[
            ("put", b.put_requests),
            ("get", b.get_requests),
            ("head", b.head_requests),
            ("delete", b.delete_requests),
            ("list", b.list_requests),
        ],
    );
    labeled(
        "blob_bytes_total",
        "Object bytes moved to (up) and from (down) blob, headers included (blob tier only).",
        "direction",
        &[("up", b.tier.bytes_written), ("down", b.tier.bytes_read)],
    );
    labeled(
        "served_bytes_total",
        "Bytes loads served, from local tiers or from blob (blob tier only).",
        "from",
        &[("local", s.served_local_bytes), ("blob", s.served_blob_bytes)],
    );
    let _ = writeln!(
        o,
        "# HELP kvtier_blob_info The blob tier's mode (blob tier only).\n# TYPE kvtier_blob_info gauge\nkvtier_blob_info{{mode=\"{}\"}} 1",
        b.mode.name()
    );
    let Some(w) = &s.writeback else { return };
    let _ = writeln!(
        o,
        "# HELP kvtier_writeback_pending_blocks Blocks logged for upload and not yet in blob (writeback mode only).\n# TYPE kvtier_writeback_pending_blocks gauge\nkvtier_writeback_pending_blocks {}",
        w.pending_blocks
    );
    let counters: [(&str, &str, u64); 9] = [
        (
            "writeback_uploaded_blocks_total",
            "Blocks uploaded, or found in blob already (writeback mode only).",
            w.uploaded_blocks,
        ),
        (
            "writeback_upload_failures_total",
            "Upload attempts that failed; each is tried again (writeback mode only).",
            w.upload_failures,
        ),
        (
            "writeback_resumed_blocks_total",
            "Blocks pending at startup, resumed from the dirty log (writeback mode only).",
            w.resumed_blocks,
        ),
        (
            "writeback_dropped_blocks_total",
            "Logged blocks given up: never acknowledged, removed, or unreadable (writeback mode only).",
            w.dropped_blocks,
        ),
        (
            "writeback_log_errors_total",
            "Dirty-log appends that failed (writeback mode only).",
            w.log_errors,
        ),
        (
            "writeback_peer_confirmed_blocks_total",
            "Pending blocks dropped because their uploader said they landed in blob, without a request (writeback mode in a cluster).",
            w.confirmed_by_peers,
        ),
        (
            "writeback_peer_checks_total",
            "Checks of blob (HEADs) for blocks another replica uploads, made when no notice came within the bound (writeback mode in a cluster).",
            w.peer_checks,
        ),
        (
            "writeback_peer_found_blocks_total",
            "Pending blocks another replica uploaded, found in blob by a check (writeback mode in a cluster).",
            w.uploaded_by_peers,
        ),
        (
            "writeback_taken_over_blocks_total",
            "Blocks this node uploads because their uploader gave them up (writeback mode in a cluster).",
            w.taken_over,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            o,
            "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} counter\nkvtier_{name} {v}"
        );
    }
}

/// Serves `GET /metrics` (and `GET /healthz`) on `listener` until the task
/// is dropped. One request per connection, bounded header size and time.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, manager: Arc<BlockManager>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, manager) = (metrics.clone(), manager.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match (line.starts_with("GET "), path) {
                (true, "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    tokio::task::spawn_blocking(move || metrics.render(&manager))
                        .await
                        .unwrap_or_default(),
                ),
                (true, "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                _ => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Read repair's and the scrub's series.
fn render_repair(o: &mut String, r: &crate::proto::RepairStats) {
    let mut labeled = |name: &str, help: &str, label: &str, values: &[(&str, u64)]| {
        let _ = writeln!(o, "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} counter");
        for (l, v) in values {
            let _ = writeln!(o, "kvtier_{name}{{{label}=\"{l}\"}} {v}");
        }
    };
    labeled(
        "corrupt_copies_found_total",
        "Copies that failed verification (never served), by who found them: a read of this node's copy, a peer's answer to a read here, the scrub.",
        "found_by",
        &[
            ("local_read", r.corrupt_found_local_read),
            ("peer_read", r.corrupt_found_peer_read),
            ("scrub", r.corrupt_found_scrub),
        ],
    );
    labeled(
        "read_repairs_total",
        "Corrupt copies rewritten from a good one, here or on a peer.",
        "copy",
        &[("local", r.repaired_local), ("peer", r.repaired_peer)],
    );
    let counters: [(&str, &str, u64); 5] = [
        (
            "read_repair_failures_total",
            "Rewrites of a corrupt copy that failed (the copy stays dropped).",
            r.repair_failures,
        ),
        (
            "no_good_copy_total",
            "Keys found corrupt with no good copy on any holder: failed reads and scrub finds nothing could repair.",
            r.no_good_copy,
        ),
        (
            "scrub_passes_total",
            "Scrub passes over the whole disk finished.",
            r.scrub_passes,
        ),
        ("scrub_blocks_total", "Blocks the scrub verified.", r.scrub_blocks),
        ("scrub_bytes_total", "Bytes the scrub verified.", r.scrub_bytes),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            o,
            "# HELP kvtier_{name} {help}\n# TYPE kvtier_{name} counter\nkvtier_{name} {v}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP kvtier_scrub_enabled Whether the disk scrub runs.\n# TYPE kvtier_scrub_enabled gauge\nkvtier_scrub_enabled {}",
        u8::from(r.scrub_enabled)
    );
}

/// The `kvtier_cluster_*` series (cluster members only).
fn render_cluster(o: &mut String, c: &crate::proto::ClusterStats) {
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_epoch Membership epoch: bumped by every change this node saw (cluster only).\n# TYPE kvtier_cluster_epoch gauge\nkvtier_cluster_epoch {}",
        c.epoch
    );
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_member_up Whether a member answers heartbeats: 1 up, 0.5 suspect, 0 down (cluster only).\n# TYPE kvtier_cluster_member_up gauge"
    );
    for m in &c.members {
        let v = match m.liveness.as_str() {
            "up" => "1",
            "suspect" => "0.5",
            _ => "0",
        };
        let _ = writeln!(o, "kvtier_cluster_member_up{{member=\"{}\"}} {v}", m.id);
    }
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_hints_pending Hinted blocks held for a down replica (cluster only).\n# TYPE kvtier_cluster_hints_pending gauge\nkvtier_cluster_hints_pending {}",
        c.hints_pending
    );
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_tombstones_pending Deletes a member missed, kept here until it is up (cluster only).\n# TYPE kvtier_cluster_tombstones_pending gauge\nkvtier_cluster_tombstones_pending {}",
        c.tombstones_pending
    );
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_member_out_of_sync_keys Keys known missing on a member: copies held here for it (hints), from writes while it was down or that failed on it (cluster only).\n# TYPE kvtier_cluster_member_out_of_sync_keys gauge"
    );
    for m in &c.members {
        let _ = writeln!(
            o,
            "kvtier_cluster_member_out_of_sync_keys{{member=\"{}\"}} {}",
            m.id, m.out_of_sync_keys
        );
    }
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_members_epoch The member list's epoch: equal on nodes that saw the same joins and leaves (cluster only).\n# TYPE kvtier_cluster_members_epoch gauge\nkvtier_cluster_members_epoch {}",
        c.members_epoch
    );
    let _ = writeln!(
        o,
        "# HELP kvtier_cluster_placement_slots The slot count keys are placed in (cluster.slots; cluster only).\n# TYPE kvtier_cluster_placement_slots gauge\nkvtier_cluster_placement_slots {}",
        c.placement_slots
    );
    if c.membership == "gossip" {
        let _ = writeln!(
            o,
            "# HELP kvtier_cluster_gossip_generation This node's gossip generation: grows at each start, and when it refutes a false \"down\" (gossip mode only).\n# TYPE kvtier_cluster_gossip_generation gauge\nkvtier_cluster_gossip_generation {}",
            c.gossip_generation
        );
        let _ = writeln!(
            o,
            "# HELP kvtier_cluster_gossip_messages_total Gossip messages (datagrams and sync frames) handled, refused as malformed, oversized or unexpected, and rejected for a missing or wrong tag (another token, or none; gossip mode only).\n# TYPE kvtier_cluster_gossip_messages_total counter\nkvtier_cluster_gossip_messages_total{{outcome=\"handled\"}} {}\nkvtier_cluster_gossip_messages_total{{outcome=\"refused\"}} {}\nkvtier_cluster_gossip_messages_total{{outcome=\"rejected\"}} {}",
            c.gossip_messages_in, c.gossip_messages_refused, c.gossip_messages_rejected
        );
    }
    let counters: [(&str, &str, u64); 22] = [
        (
            "cluster_hints_delivered_total",
            "Hinted blocks handed back to their replica.",
            c.hints_delivered,
        ),
        (
            "cluster_hints_dropped_total",
            "Hints given up: the block was gone before delivery.",
            c.hints_dropped,
        ),
        (
            "cluster_replica_writes_total",
            "Replica writes sent to peers, one per node per Put.",
            c.replica_writes_sent,
        ),
        (
            "cluster_replica_write_failures_total",
            "Replica writes to peers that failed.",
            c.replica_writes_failed,
        ),
        (
            "cluster_peer_read_blocks_total",
            "Blocks loads here brought from peers.",
            c.peer_read_blocks,
        ),
        (
            "cluster_peer_read_failures_total",
            "Peer reads and lookups that failed.",
            c.peer_read_failures,
        ),
        (
            "cluster_replica_blocks_received_total",
            "Blocks peers stored here.",
            c.replica_blocks_received,
        ),
        (
            "cluster_replica_blocks_served_total",
            "Blocks peers loaded from here.",
            c.replica_blocks_served,
        ),
        (
            "cluster_resync_keys_offered_total",
            "Keys offered to members back from down.",
            c.resync_keys_offered,
        ),
        (
            "cluster_resync_blocks_sent_total",
            "Blocks members back from down lacked and got from here.",
            c.resync_blocks_sent,
        ),
        (
            "cluster_out_of_sync_marked_total",
            "Replica copies that failed on a member not down, kept here for it.",
            c.out_of_sync_marked,
        ),
        (
            "cluster_member_lists_adopted_total",
            "Newer member lists adopted from a peer.",
            c.member_lists_adopted,
        ),
        (
            "cluster_placement_mismatches_total",
            "Pings (and gossip) refused and answers counted as missed: the peer places keys in another slot count.",
            c.placement_mismatches,
        ),
        (
            "cluster_blob_notices_sent_total",
            "Messages telling peers which keys this node's uploads landed in blob.",
            c.blob_notices_sent,
        ),
        (
            "cluster_blob_notice_keys_sent_total",
            "Keys those messages carried.",
            c.blob_notice_keys_sent,
        ),
        (
            "cluster_blob_notices_failed_total",
            "Blob notice messages that failed; their keys cost the peer one check of blob.",
            c.blob_notices_failed,
        ),
        (
            "cluster_blob_notice_keys_received_total",
            "Keys peers said their uploads settled.",
            c.blob_notice_keys_received,
        ),
        (
            "cluster_tombstones_delivered_total",
            "Deletes a member missed, delivered to it once it was up.",
            c.tombstones_delivered,
        ),
        (
            "cluster_tombstones_expired_total",
            "Deletes a member missed, dropped undelivered (older than cluster.tombstone_ttl_s, or over cluster.max_tombstones).",
            c.tombstones_expired,
        ),
        (
            "cluster_late_delete_copies_removed_total",
            "Copies removed here by a delete this node missed, applied late to copies written before it.",
            c.late_delete_copies_removed,
        ),
        (
            "cluster_stray_copies_noted_total",
            "Copies peers stored here for keys this node is no replica of (a sender with an older member list).",
            c.stray_copies_noted,
        ),
        (
            "cluster_stray_copies_dropped_total",
            "Those dropped here once every replica confirmed it holds them.",
            c.stray_copies_dropped,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            o,
            "# HELP kvtier_{name} {help} (cluster only)\n# TYPE kvtier_{name} counter\nkvtier_{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::tests::{blob_stats, local_stats};
    use kvtier_testkit::sample;

    /// Every sample belongs to a family announced once, HELP then TYPE.
    fn assert_well_formed(body: &str) {
        let mut families = std::collections::HashSet::new();
        let mut last_type = String::new();
        for l in body.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(families.insert(name.clone()), "{name} announced twice");
                last_type = name;
            } else if let Some(rest) = l.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!families.contains(name), "HELP of {name} after its TYPE");
            } else {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(
                    name.starts_with(&last_type),
                    "sample {l:?} outside its family ({last_type})"
                );
            }
        }
    }

    #[test]
    fn repair_series_carry_the_counters() {
        let mut body = Metrics::default().render_stats(&local_stats());
        render_repair(
            &mut body,
            &crate::proto::RepairStats {
                corrupt_found_local_read: 1,
                corrupt_found_peer_read: 2,
                corrupt_found_scrub: 3,
                repaired_local: 4,
                repaired_peer: 5,
                repair_failures: 6,
                no_good_copy: 7,
                scrub_enabled: true,
                scrub_passes: 8,
                scrub_blocks: 9,
                scrub_bytes: 10,
            },
        );
        assert_well_formed(&body);
        let want = [
            (r#"kvtier_corrupt_copies_found_total{found_by="local_read"}"#, 1.0),
            (r#"kvtier_corrupt_copies_found_total{found_by="peer_read"}"#, 2.0),
            (r#"kvtier_corrupt_copies_found_total{found_by="scrub"}"#, 3.0),
            (r#"kvtier_read_repairs_total{copy="local"}"#, 4.0),
            (r#"kvtier_read_repairs_total{copy="peer"}"#, 5.0),
            ("kvtier_read_repair_failures_total", 6.0),
            ("kvtier_no_good_copy_total", 7.0),
            ("kvtier_scrub_passes_total", 8.0),
            ("kvtier_scrub_blocks_total", 9.0),
            ("kvtier_scrub_bytes_total", 10.0),
            ("kvtier_scrub_enabled", 1.0),
        ];
        for (series, v) in want {
            assert_eq!(sample(&body, series), v, "{series}");
        }
    }

    #[test]
    fn no_blob_series_without_a_blob_tier() {
        let body = Metrics::default().render_stats(&local_stats());
        assert_well_formed(&body);
        for absent in [
            "kvtier_blob_",
            "kvtier_writeback_",
            "kvtier_served_bytes_total",
            "kvtier_throughput_reduction",
        ] {
            assert!(!body.contains(absent), "{absent} without a blob tier:\n{body}");
        }
        assert_eq!(sample(&body, "kvtier_lookups_total"), 0.0);
    }

    #[test]
    fn blob_series_carry_the_counters() {
        let body = Metrics::default().render_stats(&blob_stats());
        assert_well_formed(&body);
        let want = [
            (r#"kvtier_blob_requests_total{kind="put"}"#, 1.0),
            (r#"kvtier_blob_requests_total{kind="get"}"#, 2.0),
            (r#"kvtier_blob_requests_total{kind="head"}"#, 3.0),
            (r#"kvtier_blob_requests_total{kind="delete"}"#, 4.0),
            (r#"kvtier_blob_requests_total{kind="list"}"#, 5.0),
            ("kvtier_blob_request_errors_total", 6.0),
            ("kvtier_blob_already_present_total", 7.0),
            ("kvtier_blob_skipped_unavailable_total", 8.0),
            ("kvtier_blob_hits_total", 11.0),
            ("kvtier_blob_misses_total", 12.0),
            (r#"kvtier_blob_bytes_total{direction="up"}"#, 13.0),
            (r#"kvtier_blob_bytes_total{direction="down"}"#, 14.0),
            ("kvtier_blob_corrupt_total", 15.0),
            ("kvtier_writeback_pending_blocks", 21.0),
            ("kvtier_writeback_uploaded_blocks_total", 22.0),
            ("kvtier_writeback_upload_failures_total", 23.0),
            ("kvtier_writeback_resumed_blocks_total", 24.0),
            ("kvtier_writeback_dropped_blocks_total", 25.0),
            ("kvtier_writeback_log_errors_total", 26.0),
            ("kvtier_writeback_peer_found_blocks_total", 27.0),
            ("kvtier_writeback_peer_checks_total", 28.0),
            ("kvtier_writeback_peer_confirmed_blocks_total", 29.0),
            ("kvtier_writeback_taken_over_blocks_total", 30.0),
            (r#"kvtier_served_bytes_total{from="local"}"#, 300.0),
            (r#"kvtier_served_bytes_total{from="blob"}"#, 100.0),
            ("kvtier_blob_promotions_total", 31.0),
            ("kvtier_throughput_reduction", 0.75),
            (r#"kvtier_blob_info{mode="writeback"}"#, 1.0),
        ];
        for (series, v) in want {
            assert_eq!(sample(&body, series), v, "{series}");
        }
        assert!(body.contains("# TYPE kvtier_writeback_pending_blocks gauge"));
        assert!(body.contains("# TYPE kvtier_throughput_reduction gauge"));
        assert!(body.contains("# TYPE kvtier_blob_requests_total counter"));

        // Cache-only: the blob series, none of the writeback's.
        let mut s = blob_stats();
        s.writeback = None;
        s.blob.as_mut().unwrap().mode = kvtier::tier::blob::BlobMode::CacheOnly;
        let body = Metrics::default().render_stats(&s);
        assert_well_formed(&body);
        assert!(!body.contains("kvtier_writeback_"), "{body}");
        assert_eq!(sample(&body, r#"kvtier_blob_info{mode="cache-only"}"#), 1.0);
    }
}
