//! Prometheus metrics: request counts and latency histograms per RPC, and
//! the block manager's counters, rendered in the text exposition format on
//! `GET /metrics`.

use kvtier::BlockManager;
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
    "RegisterRegion",
    "UnregisterRegion",
    "PutRegion",
    "GetRegion",
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
}

impl Metrics {
    /// The counters of RPC `name` (one of [`RPCS`]).
    pub fn rpc(&self, name: &str) -> &RpcMetrics {
        let i = RPCS.iter().position(|r| *r == name).expect("a known RPC name");
        &self.rpcs[i]
    }

    /// The exposition text, with the manager's counters read now.
    pub fn render(&self, m: &BlockManager) -> String {
        let mut o = String::with_capacity(8192);
        let s = m.stats();
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
        o
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
