//! `kvtier checkpoint put|get|list|delete` against a real kvtierd.

use kvtier_testkit as common;

use common::{Daemon, kvtier};
use std::path::Path;

fn write_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), b"{\"step\": 7}".to_vec()),
        (
            "model/shard-0.bin".into(),
            (0..(5 << 19)).map(|i: u32| (i * 7 % 253) as u8).collect(),
        ),
        (
            "model/shard-1.bin".into(),
            (0..(1 << 20)).map(|i: u32| (i * 13 % 251) as u8).collect(),
        ),
        ("empty".into(), Vec::new()),
    ];
    for (p, b) in &files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b).unwrap();
    }
    files
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn checkpoint_put_get_list_delete_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let ep = d.endpoint();
    let src = dir.path().join("src");
    let files = write_tree(&src);
    let g = ["--group", "job-1", "--chunk-mib", "1"];

    let put = kvtier(
        &ep,
        &[],
        &[&["checkpoint", "put", "step-7", s(&src)][..], &g[..]].concat(),
    )
    .expect(0);
    let v = put.json();
    assert_eq!(v["files"], 4, "{put:?}");
    assert_eq!(v["bytes"], files.iter().map(|f| f.1.len()).sum::<usize>() as u64);
    // config 1, shard-0 (2.5 MiB) 3, shard-1 (1 MiB) 1, empty 0.
    assert_eq!(v["chunks"], 5);

    let list = kvtier(&ep, &[], &[&["checkpoint", "list"][..], &g[..]].concat()).expect(0);
    let l = list.json();
    assert_eq!(l.as_array().map(Vec::len), Some(1), "{list:?}");
    assert_eq!(l[0]["name"], "step-7");

    let out = dir.path().join("restore");
    kvtier(
        &ep,
        &[],
        &[&["checkpoint", "get", "step-7", s(&out)][..], &g[..]].concat(),
    )
    .expect(0);
    for (p, b) in &files {
        assert_eq!(&std::fs::read(out.join(p)).unwrap(), b, "{p}");
    }

    // Immutable names, bad names, missing checkpoints: precise exit codes.
    let again = kvtier(
        &ep,
        &[],
        &[&["checkpoint", "put", "step-7", s(&src)][..], &g[..]].concat(),
    )
    .expect(2);
    assert!(again.stderr.contains("exists"), "{again:?}");
    kvtier(
        &ep,
        &[],
        &[&["checkpoint", "put", "bad/name", s(&src)][..], &g[..]].concat(),
    )
    .expect(2);
    kvtier(&ep, &[], &["checkpoint", "list", "--group", "no/such"]).expect(2);
    kvtier(
        &ep,
        &[],
        &[&["checkpoint", "get", "nope", s(&out)][..], &g[..]].concat(),
    )
    .expect(3);

    // A restart keeps it.
    let mut d = d;
    d.signal_and_wait(libc::SIGTERM);
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let ep = d.endpoint();
    let out2 = dir.path().join("restore2");
    kvtier(
        &ep,
        &[],
        &[&["checkpoint", "get", "step-7", s(&out2)][..], &g[..]].concat(),
    )
    .expect(0);
    assert_eq!(std::fs::read(out2.join("model/shard-0.bin")).unwrap(), files[1].1);

    kvtier(&ep, &[], &[&["checkpoint", "delete", "step-7"][..], &g[..]].concat()).expect(0);
    kvtier(&ep, &[], &[&["checkpoint", "delete", "step-7"][..], &g[..]].concat()).expect(3);
    let list = kvtier(&ep, &[], &[&["checkpoint", "list"][..], &g[..]].concat()).expect(0);
    assert_eq!(list.json().as_array().map(Vec::len), Some(0), "{list:?}");
}

/// A PutChunk whose pieces do not add up to the length its first piece
/// announced is refused, and stores nothing.
#[test]
fn a_chunk_that_breaks_its_announced_length_is_refused() {
    use kvtier_proto::checkpoint_proto as pb;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("data"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = kvtier_client::ClientConfig {
            endpoint: d.endpoint(),
            ..Default::default()
        };
        let c = kvtier_client::Client::connect(&cfg).await.unwrap();
        let group = pb::Group {
            group: "job-1".into(),
            chunk_bytes: 1 << 20,
            local: false,
        };
        let key = bytes::Bytes::from_static(&[7u8; 16]);
        let piece = |first: bool, n: usize, announced: u64| pb::ChunkWrite {
            group: first.then(|| group.clone()),
            key: if first { key.clone() } else { bytes::Bytes::new() },
            data: bytes::Bytes::from(vec![1u8; n]),
            chunk_len: announced,
        };
        for (pieces, why) in [
            (vec![piece(true, 100, 150), piece(false, 100, 0)], "more than announced"),
            (vec![piece(true, 100, 300), piece(false, 100, 0)], "less than announced"),
            (vec![piece(true, 100, (1 << 20) + 1)], "more than a chunk"),
        ] {
            let e = c
                .checkpoints()
                .put_chunk(tokio_stream::iter(pieces))
                .await
                .expect_err(why);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}: {e:?}");
        }
        let got = c
            .checkpoints()
            .get_chunk(pb::ChunkRef {
                group: Some(group.clone()),
                key: key.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        assert!(!got.found, "nothing was stored");
        // The same pieces with the right length go through.
        let ok = c
            .checkpoints()
            .put_chunk(tokio_stream::iter(vec![piece(true, 100, 200), piece(false, 100, 0)]))
            .await
            .unwrap();
        assert!(ok.into_inner().stored);
    });
}

/// A writer that dies before its manifest leaves chunks no checkpoint
/// names: kvtierd collects them once they stayed unused for
/// `checkpoints.collect_after_s` (2 s here), and keeps every chunk of the
/// committed checkpoint, which restores whole afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_an_abandoned_put_are_collected_and_committed_ones_kept() {
    use kvtier::BlockKey;
    use kvtier::checkpoint::ChunkStore;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &dir.path().join("data"),
        &[
            ("KVTIER_CHECKPOINTS_COLLECT_AFTER_S", "2"),
            ("KVTIER_CHECKPOINTS_COLLECT_INTERVAL_S", "1"),
        ],
    );
    let ep = d.endpoint();
    let src = dir.path().join("src");
    let files = write_tree(&src);
    let g = ["--group", "job-2", "--chunk-mib", "1"];
    let put = |name: &'static str| {
        let (ep, src) = (ep.clone(), src.clone());
        tokio::task::spawn_blocking(move || {
            kvtier(&ep, &[], &[&["checkpoint", "put", name, s(&src)][..], &g[..]].concat()).expect(0)
        })
    };
    put("kept").await.unwrap();
    // What a writer killed midway leaves: chunks stored, no manifest.
    let client = d.client().await;
    let chunks = client.checkpoint_chunks("job-2", 1 << 20, tokio::runtime::Handle::current());
    let ns = chunks.namespace();
    let orphans: Vec<BlockKey> = (0..3u8).map(|i| BlockKey::from_opaque(ns, &[b'o', i])).collect();
    let chunks = std::sync::Arc::new(chunks);
    let c = chunks.clone();
    let o = orphans.clone();
    tokio::task::spawn_blocking(move || {
        for (i, k) in o.iter().enumerate() {
            assert!(c.put_chunk(*k, bytes::Bytes::from(vec![i as u8; 4096 + i])).unwrap());
        }
    })
    .await
    .unwrap();
    let present = |k: BlockKey| {
        let c = chunks.clone();
        async move {
            tokio::task::spawn_blocking(move || c.get_chunk(k).unwrap().is_some())
                .await
                .unwrap()
        }
    };
    assert!(present(orphans[0]).await, "stored before the collection's bound");
    common::eventually("the abandoned chunks collected", 30, || {
        let orphans = orphans.clone();
        let present = &present;
        async move {
            for k in orphans {
                if present(k).await {
                    return false;
                }
            }
            true
        }
    })
    .await;
    // The committed checkpoint lost nothing.
    let out = dir.path().join("restore");
    let (ep2, out2) = (ep.clone(), out.clone());
    tokio::task::spawn_blocking(move || {
        kvtier(
            &ep2,
            &[],
            &[&["checkpoint", "get", "kept", s(&out2)][..], &g[..]].concat(),
        )
        .expect(0)
    })
    .await
    .unwrap();
    for (p, b) in &files {
        assert_eq!(&std::fs::read(out.join(p)).unwrap(), b, "{p}");
    }
}
