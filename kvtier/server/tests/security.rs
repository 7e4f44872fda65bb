//! Bearer-token auth, the unauthenticated grpc.health.v1 service, and TLS,
//! against real kvtierd processes.

use kvtier_testkit as common;

use bytes::Bytes;
use common::{Daemon, content, key, namespace};
use kvtier::NamespaceId;
use kvtier_client::{Client, ClientConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BLOCK: usize = 4096;
const REFUSED: &str = "missing or invalid bearer token";

/// Bounds every network step of these tests.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than 20 s"))
}

async fn connect(endpoint: &str, token: Option<&str>) -> Client {
    within(
        "connect",
        Client::connect(&ClientConfig {
            endpoint: endpoint.to_string(),
            token: token.map(String::from),
            ..Default::default()
        }),
    )
    .await
    .expect("connect")
}

fn assert_refused<T: std::fmt::Debug>(what: &str, r: kvtier::Result<T>) {
    let s = r.expect_err(what);
    assert_eq!(s.kind(), kvtier::ErrorKind::Unauthenticated, "{what}: {s:?}");
    assert_eq!(s.message(), REFUSED, "{what}");
}

fn blocks(ns: NamespaceId, range: std::ops::Range<u64>) -> (Vec<kvtier::BlockKey>, Bytes) {
    let keys = range.clone().map(|i| key(ns, i)).collect();
    let data: Vec<u8> = range.flat_map(|i| content(ns, i, BLOCK)).collect();
    (keys, Bytes::from(data))
}

/// Registers, stores blocks 0..n and reads them back.
async fn round_trip(c: &Client, model: &str, n: u64) -> NamespaceId {
    let (ns, block_bytes) = within("register", c.register(&namespace(model, BLOCK)))
        .await
        .expect("register");
    assert_eq!(block_bytes, BLOCK as u64);
    let (keys, data) = blocks(ns, 0..n);
    let put = within("put", c.put(ns, &keys, data.clone())).await.expect("put");
    assert_eq!(put.stored as u64, n);
    let got = within("get", c.get(ns, &keys)).await.expect("get");
    assert_eq!(got.loaded as u64, n);
    assert!(got.data == data, "the blocks read back differ from those stored");
    ns
}

async fn stored_blocks(c: &Client) -> u64 {
    let json = within("stats", c.stats()).await.expect("stats");
    let v: serde_json::Value = serde_json::from_str(&json).expect("stats is JSON");
    v["stored_blocks"].as_u64().expect("stored_blocks")
}

/// Every kind of call a client without the right token makes is refused.
async fn refused_everywhere(c: &Client, ns: NamespaceId) {
    assert_refused("health", within("health", c.health()).await);
    assert_refused(
        "register",
        within("register", c.register(&namespace("other", BLOCK))).await,
    );
    let (keys, data) = blocks(ns, 10..12);
    assert_refused("put", within("put", c.put(ns, &keys, data)).await);
    assert_refused("lookup", within("lookup", c.lookup(ns, &keys)).await);
    assert_refused("get", within("get", c.get(ns, &keys)).await);
    assert_refused("stats", within("stats", c.stats()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[("KVTIER_AUTH_TOKEN", "s3cret")]);
    let good = connect(&d.endpoint(), Some("s3cret")).await;
    let ns = round_trip(&good, "auth", 2).await;

    refused_everywhere(&connect(&d.endpoint(), None).await, ns).await;
    refused_everywhere(&connect(&d.endpoint(), Some("wrong")).await, ns).await;
    // A token that differs only in its last byte, or is a prefix, is wrong too.
    refused_everywhere(&connect(&d.endpoint(), Some("s3crex")).await, ns).await;
    refused_everywhere(&connect(&d.endpoint(), Some("s3cre")).await, ns).await;

    // The refused puts stored nothing.
    assert_eq!(stored_blocks(&good).await, 2);
    let (keys, _) = blocks(ns, 10..12);
    let l = within("lookup", good.lookup(ns, &keys)).await.expect("lookup");
    assert_eq!(l.hit_blocks, 0);
    let h = within("health", good.health()).await.expect("health");
    assert_eq!(h.status, "serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // As a Kubernetes secret mounts it: a trailing newline is ignored.
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let d = Daemon::start(
        &dir.path().join("data"),
        &[("KVTIER_AUTH_TOKEN_FILE", token_file.to_str().unwrap())],
    );
    let good = connect(&d.endpoint(), Some("from-a-file")).await;
    let ns = round_trip(&good, "auth-file", 3).await;
    refused_everywhere(&connect(&d.endpoint(), None).await, ns).await;
    refused_everywhere(&connect(&d.endpoint(), Some("from-a-fil")).await, ns).await;
    // The daemon trims the file, not what callers send.
    refused_everywhere(&connect(&d.endpoint(), Some("from-a-file ")).await, ns).await;
    assert_eq!(stored_blocks(&good).await, 3);
}

async fn health_client(endpoint: &str) -> HealthClient<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string()).expect("endpoint");
    HealthClient::new(
        within("connect", ep.connect())
            .await
            .expect("connect for grpc.health.v1"),
    )
}

async fn grpc_health(endpoint: &str, service: &str) -> ServingStatus {
    let mut h = health_client(endpoint).await;
    let r = within(
        "health check",
        h.check(HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .expect("grpc.health.v1 Check answers without a token")
    .into_inner();
    r.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_health_service_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[("KVTIER_AUTH_TOKEN", "s3cret")]);
    // What a Kubernetes gRPC probe asks: the whole server, then the API.
    assert_eq!(grpc_health(&d.endpoint(), "").await, ServingStatus::Serving);
    assert_eq!(
        grpc_health(&d.endpoint(), "kvtier.v1.KvTier").await,
        ServingStatus::Serving
    );
    // An unknown service is NotFound, not a pass.
    let mut h = health_client(&d.endpoint()).await;
    let e = within(
        "health check",
        h.check(HealthCheckRequest {
            service: "no.such.Service".into(),
        }),
    )
    .await
    .expect_err("unknown service");
    assert_eq!(e.code(), Code::NotFound);
    // While the API itself still wants the token.
    assert_refused(
        "health",
        within("health", connect(&d.endpoint(), None).await.health()).await,
    );
}

/// A self-signed certificate for localhost and 127.0.0.1, as PEM files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("generate a certificate");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn tls_config(d: &Daemon, ca: &Path, token: Option<&str>) -> ClientConfig {
    ClientConfig {
        endpoint: format!("https://{}", d.grpc),
        token: token.map(String::from),
        ca_file: Some(ca.to_path_buf()),
        tls_domain: Some("localhost".into()),
        request_timeout: None,
    }
}

/// Connecting and calling fails one way or the other.
async fn fails(cfg: &ClientConfig) -> String {
    let r = within("a refused connection", async {
        let c = Client::connect(cfg).await.map_err(|e| e.to_string())?;
        c.health().await.map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(h) => panic!("{} answered {h:?}", cfg.endpoint),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let d = Daemon::start(
        &dir.path().join("data"),
        &[
            ("KVTIER_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("KVTIER_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    let cfg = tls_config(&d, &cert, None);
    let c = within("connect", Client::connect(&cfg)).await.expect("TLS connect");
    round_trip(&c, "tls", 2).await;
    // The certificate names 127.0.0.1 too: no domain override needed.
    let c = within(
        "connect",
        Client::connect(&ClientConfig {
            tls_domain: None,
            ..cfg.clone()
        }),
    )
    .await
    .expect("TLS connect by IP");
    assert_eq!(within("health", c.health()).await.unwrap().status, "serving");

    // Plaintext against the TLS port fails.
    fails(&ClientConfig {
        endpoint: d.endpoint(),
        ..Default::default()
    })
    .await;
    // TLS without trusting the self-signed certificate fails.
    fails(&ClientConfig {
        ca_file: None,
        ..cfg.clone()
    })
    .await;
    // TLS that expects another name fails.
    fails(&ClientConfig {
        tls_domain: Some("kvtier.example".into()),
        ..cfg.clone()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_auth() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let d = Daemon::start(
        &dir.path().join("data"),
        &[
            ("KVTIER_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("KVTIER_TLS_KEY_FILE", key.to_str().unwrap()),
            ("KVTIER_AUTH_TOKEN", "s3cret"),
        ],
    );
    let good = within("connect", Client::connect(&tls_config(&d, &cert, Some("s3cret"))))
        .await
        .expect("TLS connect");
    let ns = round_trip(&good, "tls-auth", 2).await;
    let anon = within("connect", Client::connect(&tls_config(&d, &cert, None)))
        .await
        .expect("TLS connect");
    refused_everywhere(&anon, ns).await;
    assert_eq!(stored_blocks(&good).await, 2);
    // The health service over TLS needs no token either.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", d.grpc))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&cert).unwrap()))
                .domain_name("localhost"),
        )
        .unwrap();
    let channel = within("connect", channel.connect()).await.expect("TLS channel");
    let r = within(
        "health check",
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }),
    )
    .await
    .expect("grpc.health.v1 over TLS")
    .into_inner();
    assert_eq!(r.status(), ServingStatus::Serving);
}
