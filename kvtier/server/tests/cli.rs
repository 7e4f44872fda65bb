//! The `kvtier` CLI against a real kvtierd: its JSON output and the exit
//! codes documented at the top of `src/bin/kvtier.rs`.

use kvtier_testkit as common;

use common::{Daemon, kvtier};
use std::path::Path;

/// `ns register` of a namespace with 4096-byte blocks; its id.
fn register(endpoint: &str, env: &[(&str, &str)], model: &str) -> String {
    let r = kvtier(
        endpoint,
        env,
        &[
            "ns",
            "register",
            "--model",
            model,
            "--layers",
            "1",
            "--kv-heads",
            "1",
            "--head-dim",
            "16",
            "--block-tokens",
            "64",
            "--dtype",
            "f16",
        ],
    )
    .expect(0);
    let v = r.json();
    assert_eq!(v["block_bytes"], 4096, "{r:?}");
    let id = v["namespace_id"].as_str().expect("namespace_id").to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    id
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

#[test]
fn commands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let ep = d.endpoint();
    let ep = ep.as_str();

    let h = kvtier(ep, &[], &["health"]).expect(0).json();
    assert_eq!(h["status"], "serving");
    assert_eq!(h["mode"], "ssd-only");

    let ns = register(ep, &[], "cli-model");
    // Registering again answers the same id.
    assert_eq!(register(ep, &[], "cli-model"), ns);

    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let f = dir.path().join("a.bin");
    std::fs::write(&f, &block).unwrap();
    let put = kvtier(ep, &[], &["put", "--ns", &ns, "--name", "a", "--file", path(&f)])
        .expect(0)
        .json();
    assert_eq!(put["stored"], 1);
    assert_eq!(put["present"], 0);
    // The same block again is present, not stored.
    let put = kvtier(ep, &[], &["put", "--ns", &ns, "--name", "a", "--file", path(&f)])
        .expect(0)
        .json();
    assert_eq!((put["stored"].as_u64(), put["present"].as_u64()), (Some(0), Some(1)));

    let g = dir.path().join("a.out");
    kvtier(ep, &[], &["get", "--ns", &ns, "--name", "a", "--out", path(&g)]).expect(0);
    assert!(std::fs::read(&g).unwrap() == block, "get returned other bytes");

    // Missing blocks: exit 3, and what was present is still written.
    let missing = dir.path().join("missing.out");
    let r = kvtier(
        ep,
        &[],
        &["get", "--ns", &ns, "--name", "nope", "--out", path(&missing)],
    )
    .expect(3);
    assert!(r.stderr.contains("0 of 1 blocks present"), "{r:?}");
    let partial = dir.path().join("partial.out");
    let r = kvtier(
        ep,
        &[],
        &["get", "--ns", &ns, "--name", "a,nope", "--out", path(&partial)],
    )
    .expect(3);
    assert!(r.stderr.contains("1 of 2 blocks present"), "{r:?}");
    assert!(std::fs::read(&partial).unwrap() == block);

    let l = kvtier(ep, &[], &["lookup", "--ns", &ns, "--name", "a,nope"])
        .expect(0)
        .json();
    assert_eq!(l["hit_blocks"], 1);
    assert_eq!(l["tiers"], serde_json::json!(["disk"]));
    let l = kvtier(ep, &[], &["lookup", "--ns", &ns, "--name", "nope"])
        .expect(0)
        .json();
    assert_eq!(l["hit_blocks"], 0);

    // A file shorter than the blocks: the daemon refuses it, exit 2.
    let short = dir.path().join("short.bin");
    std::fs::write(&short, &block[..1000]).unwrap();
    let r = kvtier(ep, &[], &["put", "--ns", &ns, "--name", "b", "--file", path(&short)]).expect(2);
    assert!(
        r.stderr.contains("1000") && r.stderr.contains("4096"),
        "the message names the byte counts: {r:?}"
    );
    // A longer one likewise.
    let long = dir.path().join("long.bin");
    std::fs::write(&long, [&block[..], &block[..10]].concat()).unwrap();
    let r = kvtier(ep, &[], &["put", "--ns", &ns, "--name", "b", "--file", path(&long)]).expect(2);
    assert!(r.stderr.contains("4096"), "{r:?}");
    // Neither stored anything.
    let l = kvtier(ep, &[], &["lookup", "--ns", &ns, "--name", "b"])
        .expect(0)
        .json();
    assert_eq!(l["hit_blocks"], 0);

    // A namespace id that is not hex, or not 32 digits: exit 2.
    let bad = "zz".repeat(16);
    let r = kvtier(ep, &[], &["get", "--ns", &bad, "--name", "a", "--out", path(&g)]).expect(2);
    assert!(r.stderr.contains("not hex"), "{r:?}");
    kvtier(ep, &[], &["lookup", "--ns", "1234", "--name", "a"]).expect(2);
    // Valid hex, never registered: exit 3.
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_ne!(unknown, ns);
    kvtier(ep, &[], &["get", "--ns", unknown, "--name", "a", "--out", path(&g)]).expect(3);
    kvtier(ep, &[], &["put", "--ns", unknown, "--name", "a", "--file", path(&f)]).expect(3);
    kvtier(ep, &[], &["lookup", "--ns", unknown, "--name", "a"]).expect(3);

    let list = kvtier(ep, &[], &["ns", "list"]).expect(0);
    let lines: Vec<serde_json::Value> = list
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 1, "{list:?}");
    assert_eq!(lines[0]["namespace_id"], ns.as_str());
    assert_eq!(lines[0]["block_bytes"], 4096);
    assert_eq!(lines[0]["namespace"]["model_id"], "cli-model");

    let del = kvtier(ep, &[], &["delete", "--ns", &ns, "--name", "a"])
        .expect(0)
        .json();
    assert_eq!(del["removed"], 1);
    kvtier(ep, &[], &["get", "--ns", &ns, "--name", "a", "--out", path(&g)]).expect(3);
    let del = kvtier(ep, &[], &["delete", "--ns", &ns, "--name", "a"])
        .expect(0)
        .json();
    assert_eq!(del["removed"], 0);

    let stats = kvtier(ep, &[], &["stats"]).expect(0).json();
    assert_eq!(stats["stored_blocks"], 1);
}

#[test]
fn key_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let ep = d.endpoint();
    let ns = register(&ep, &[], "keys");
    let f = dir.path().join("two.bin");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    let k = "000000000000000000000000000000a1,000000000000000000000000000000a2";
    let put = kvtier(&ep, &[], &["put", "--ns", &ns, "--key", k, "--file", path(&f)])
        .expect(0)
        .json();
    assert_eq!(put["stored"], 2);
    let g = dir.path().join("two.out");
    kvtier(&ep, &[], &["get", "--ns", &ns, "--key", k, "--out", path(&g)]).expect(0);
    assert!(std::fs::read(&g).unwrap() == data);
    // A key that is not 32 hex digits: exit 2.
    kvtier(&ep, &[], &["lookup", "--ns", &ns, "--key", "a1"]).expect(2);
}

#[test]
fn auth_failures_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[("KVTIER_AUTH_TOKEN", "s3cret")]);
    let ep = d.endpoint();
    let r = kvtier(&ep, &[], &["health"]).expect(5);
    assert!(r.stderr.contains("missing or invalid bearer token"), "{r:?}");
    kvtier(&ep, &[], &["--token", "wrong", "health"]).expect(5);
    kvtier(&ep, &[("KVTIER_TOKEN", "wrong")], &["stats"]).expect(5);
    // The right token, by flag or environment.
    kvtier(&ep, &[], &["--token", "s3cret", "health"]).expect(0);
    let ns = register(&ep, &[("KVTIER_TOKEN", "s3cret")], "auth");
    kvtier(
        &ep,
        &[("KVTIER_TOKEN", "wrong")],
        &["lookup", "--ns", &ns, "--name", "a"],
    )
    .expect(5);
    kvtier(
        &ep,
        &[("KVTIER_TOKEN", "s3cret")],
        &["lookup", "--ns", &ns, "--name", "a"],
    )
    .expect(0);
}

#[test]
fn no_daemon_exits_4() {
    // A port that was free a moment ago and that nothing listens on now.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ep = format!("http://127.0.0.1:{port}");
    let r = kvtier(&ep, &[], &["health"]).expect(4);
    assert!(r.stderr.contains("connect to"), "{r:?}");
    kvtier(&ep, &[], &["ns", "list"]).expect(4);
}

#[test]
fn too_large_exits_6() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            ("KVTIER_MAX_REQUEST_BYTES", "4096"),
            ("KVTIER_MAX_INFLIGHT_BYTES", "8192"),
        ],
    );
    let ep = d.endpoint();
    let ns = register(&ep, &[], "big");
    let f = dir.path().join("two.bin");
    std::fs::write(&f, vec![7u8; 8192]).unwrap();
    let r = kvtier(&ep, &[], &["put", "--ns", &ns, "--name", "a,b", "--file", path(&f)]).expect(6);
    assert!(r.stderr.contains("exceeds max_request_bytes 4096"), "{r:?}");
    // One block fits.
    let one = dir.path().join("one.bin");
    std::fs::write(&one, vec![7u8; 4096]).unwrap();
    kvtier(&ep, &[], &["put", "--ns", &ns, "--name", "a", "--file", path(&one)]).expect(0);
}
