//! kvtierd's Prometheus endpoint, read with a plain HTTP/1.0 request.

use kvtier_testkit as common;

use bytes::Bytes;
use common::{Daemon, content, http_get, key, namespace, sample};
use kvtier::ErrorKind;
use std::time::Duration;

const BLOCK: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let m = d.metrics.clone().expect("metrics enabled");
    let c = d.client().await;
    let step = Duration::from_secs(20);
    let (ns, _) = tokio::time::timeout(step, c.register(&namespace("metrics", BLOCK)))
        .await
        .unwrap()
        .unwrap();
    for i in 0..3u64 {
        let keys = [key(ns, i)];
        let data = Bytes::from(content(ns, i, BLOCK));
        let r = tokio::time::timeout(step, c.put(ns, &keys, data))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.stored, 1);
    }
    for i in 0..2u64 {
        let g = tokio::time::timeout(step, c.get(ns, &[key(ns, i)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.loaded, 1);
    }
    // One failed Put (unknown namespace) and one Lookup.
    let e = tokio::time::timeout(step, c.put(kvtier::NamespaceId(7), &[key(ns, 9)], Bytes::new()))
        .await
        .unwrap()
        .expect_err("unknown namespace");
    assert_eq!(e.kind(), ErrorKind::UnknownNamespace);
    let l = tokio::time::timeout(step, c.lookup(ns, &[key(ns, 0), key(ns, 1), key(ns, 5)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.hit_blocks, 2);

    let (status, body) = tokio::task::spawn_blocking(move || http_get(&m, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE kvtier_request_duration_seconds histogram"),
        "{body}"
    );
    assert!(body.contains("# TYPE kvtier_requests_total counter"), "{body}");
    assert_eq!(sample(&body, r#"kvtier_requests_total{rpc="Put",outcome="ok"}"#), 3.0);
    assert_eq!(
        sample(&body, r#"kvtier_requests_total{rpc="Put",outcome="error"}"#),
        1.0
    );
    assert_eq!(sample(&body, r#"kvtier_requests_total{rpc="Get",outcome="ok"}"#), 2.0);
    assert_eq!(
        sample(&body, r#"kvtier_requests_total{rpc="Lookup",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"kvtier_requests_total{rpc="RegisterNamespace",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"kvtier_request_duration_seconds_bucket{rpc="Get",le="+Inf"}"#),
        2.0
    );
    assert_eq!(
        sample(&body, r#"kvtier_request_duration_seconds_count{rpc="Put"}"#),
        4.0
    );
    assert!(sample(&body, r#"kvtier_request_duration_seconds_sum{rpc="Put"}"#) > 0.0);
    // SSD-only: every block served came from the disk tier.
    assert_eq!(sample(&body, r#"kvtier_tier_hits_total{tier="disk"}"#), 2.0);
    assert!(!body.contains(r#"tier="host""#), "no host tier in SSD-only mode");
    assert_eq!(sample(&body, "kvtier_stored_blocks_total"), 3.0);
    assert_eq!(sample(&body, "kvtier_loaded_blocks_total"), 2.0);
    assert_eq!(sample(&body, "kvtier_bad_requests_total"), 1.0);
    assert_eq!(sample(&body, "kvtier_inflight_request_bytes"), 0.0);
    assert!(
        sample(&body, r#"kvtier_tier_used_bytes{tier="disk"}"#) > 0.0,
        "three blocks are held"
    );
}

#[test]
fn histogram_buckets_are_cumulative() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let (status, body) = http_get(d.metrics.as_deref().unwrap(), "/metrics");
    assert_eq!(status, 200);
    for rpc in kvtier_server::metrics::RPCS {
        let prefix = format!("kvtier_request_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"");
        let counts: Vec<f64> = body
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(counts.len() > 2, "{rpc} has buckets");
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{rpc}: {counts:?}");
        assert_eq!(*counts.last().unwrap(), 0.0, "no {rpc} requests yet");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_unknown_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[("KVTIER_AUTH_TOKEN", "s3cret")]);
    let m = d.metrics.as_deref().unwrap();
    // The HTTP port needs no token: Prometheus and probes scrape it as is.
    assert_eq!(http_get(m, "/healthz"), (200, "ok\n".to_string()));
    let (status, _) = http_get(m, "/nope");
    assert_eq!(status, 404);
    let (status, body) = http_get(m, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&body, "kvtier_unauthenticated_total"), 0.0);
    // A call without the token is counted, and not as a request served.
    let e = tokio::time::timeout(Duration::from_secs(20), d.client().await.health())
        .await
        .unwrap()
        .expect_err("no token");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated);
    let m = m.to_string();
    let (_, body) = tokio::task::spawn_blocking(move || http_get(&m, "/metrics"))
        .await
        .unwrap();
    assert_eq!(sample(&body, "kvtier_unauthenticated_total"), 1.0);
    assert_eq!(
        sample(&body, r#"kvtier_requests_total{rpc="Health",outcome="ok"}"#),
        0.0
    );
}
