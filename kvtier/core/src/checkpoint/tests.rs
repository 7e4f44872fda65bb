use super::*;
use crate::block::Namespace;
use crate::manager::ManagerConfig;
use crate::tier::disk::DiskConfig;

const CHUNK: u32 = 64 << 10;

fn setup(dir: &Path) -> Checkpoints<LocalChunks> {
    let mut d = DiskConfig::new(dir.join("ssd"), 64 << 20);
    d.segment_bytes = 4 << 20;
    let m = Arc::new(ManagerConfig::ssd_only(d).build().unwrap());
    let ns = m.register_namespace(&Namespace::checkpoints("test", CHUNK)).unwrap();
    Checkpoints::new(LocalChunks::new(m, ns, dir.join("catalog")), ns, CHUNK)
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (xxhash_rust::xxh3::xxh3_64(&(seed, i / 8).0.to_le_bytes()) >> (i % 8)) as u8 ^ i as u8)
        .collect()
}

/// A tree of files: empty, small, exactly two chunks, and one chunk and a bit.
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files = vec![
        ("config.json".to_string(), b"{\"step\": 100}".to_vec()),
        ("empty".to_string(), Vec::new()),
        ("model/shard-0.bin".to_string(), bytes(1, 2 * CHUNK as usize)),
        ("model/shard-1.bin".to_string(), bytes(2, CHUNK as usize + 17)),
        ("optim/state.bin".to_string(), bytes(3, 3 * CHUNK as usize / 2)),
    ];
    for (p, b) in &files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b).unwrap();
    }
    files
}

#[test]
fn put_get_list_delete_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let src = d.path().join("src");
    let files = tree(&src);
    let m = c.put_dir("step-100", &src).unwrap();
    assert_eq!(m.files.len(), 5);
    assert_eq!(m.bytes(), files.iter().map(|f| f.1.len() as u64).sum::<u64>());
    // config 1, empty 0, shard-0 2, shard-1 2, optim 2.
    assert_eq!(m.chunks(), 7);
    let out = d.path().join("restore");
    c.get("step-100", &out).unwrap();
    for (p, b) in &files {
        assert_eq!(&std::fs::read(out.join(p)).unwrap(), b, "{p}");
    }
    let l = c.list().unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].name.as_str(), l[0].files), ("step-100", 5));
    // Names are immutable.
    let e = c.put_dir("step-100", &src).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(c.delete("step-100").unwrap());
    assert!(!c.delete("step-100").unwrap());
    assert!(c.list().unwrap().is_empty());
    let e = c.get("step-100", &out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn shared_chunks_are_stored_once_and_survive_a_delete() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let src = d.path().join("src");
    tree(&src);
    c.put_dir("a", &src).unwrap();
    let stored = c.store().manager.stats().stored_blocks;
    // Same files again: only a new manifest is stored.
    c.put_dir("b", &src).unwrap();
    assert_eq!(c.store().manager.stats().stored_blocks, stored + 1);
    assert!(c.delete("a").unwrap());
    let out = d.path().join("restore");
    c.get("b", &out).unwrap();
    assert_eq!(
        std::fs::read(out.join("model/shard-0.bin")).unwrap(),
        bytes(1, 2 * CHUNK as usize)
    );
}

#[test]
fn bad_names_and_paths_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let f = d.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    for name in ["", "a/b", "..", "x y", &"n".repeat(201)] {
        let e = c.put(name, &[("f".into(), f.clone())]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{name:?}: {e}");
    }
    for path in ["/etc/passwd", "../x", "a/../b", "./a", "a/./b", "a/.", "a//b", "", "a/"] {
        let e = c
            .put("ok", &[("f".into(), f.clone()), (path.into(), f.clone())])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{path:?}: {e}");
    }
    let e = c
        .put("ok", &[("f".into(), f.clone()), ("f".into(), f.clone())])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(c.store().manager.stats().stored_blocks, 0, "nothing was stored");
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn a_lost_chunk_fails_the_restore_and_leaves_no_partial_file() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let src = d.path().join("src");
    tree(&src);
    let m = c.put_dir("s", &src).unwrap();
    let f = m.files.iter().find(|f| f.path == "model/shard-1.bin").unwrap();
    c.store().remove_chunk(BlockKey(f.chunks[1].key)).unwrap();
    let out = d.path().join("restore");
    let e = c.get("s", &out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("model/shard-1.bin"), "{e}");
    assert!(!out.join("model/shard-1.bin").exists());
    let partials: Vec<_> = std::fs::read_dir(out.join("model"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

#[test]
fn a_writer_that_dies_before_its_manifest_leaves_no_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let src = d.path().join("src");
    tree(&src);
    // Chunks stored, manifest never written: what a crash midway leaves.
    c.put_file("model/shard-0.bin", &src.join("model/shard-0.bin")).unwrap();
    assert!(c.list().unwrap().is_empty());
    assert!(c.manifest("s").unwrap().is_none());
    // The name is free: the real put goes through.
    c.put_dir("s", &src).unwrap();
}

/// A real store with faults to turn on: chunk puts refused after the first
/// `ok`; manifest puts that store the manifest and then fail (a replica died
/// as it went out); removes that fail (a member is down).
struct Faulty {
    inner: LocalChunks,
    ok: std::sync::atomic::AtomicUsize,
    fail_commits: std::sync::atomic::AtomicBool,
    refuse_removes: std::sync::atomic::AtomicBool,
}

impl Faulty {
    fn new(inner: LocalChunks) -> Self {
        Self {
            inner,
            ok: usize::MAX.into(),
            fail_commits: false.into(),
            refuse_removes: false.into(),
        }
    }
}

impl ChunkStore for Faulty {
    fn put_chunk(&self, key: BlockKey, data: bytes::Bytes) -> Result<bool> {
        use std::sync::atomic::Ordering::SeqCst;
        let left = self.ok.load(SeqCst);
        if left == 0 {
            return Err(Error::new(ErrorKind::NoSpace, "injected: the store is full"));
        }
        self.ok.store(left - 1, SeqCst);
        let is_manifest = Manifest::decode(&data).is_ok();
        let r = self.inner.put_chunk(key, data);
        if is_manifest && self.fail_commits.load(SeqCst) {
            return Err(Error::new(ErrorKind::Throttled, "injected: a replica died"));
        }
        r
    }
    fn get_chunk(&self, key: BlockKey) -> Result<Option<bytes::Bytes>> {
        self.inner.get_chunk(key)
    }
    fn remove_chunk(&self, key: BlockKey) -> Result<()> {
        if self.refuse_removes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Throttled, "injected: a member is down"));
        }
        self.inner.remove_chunk(key)
    }
    fn names(&self) -> Result<Vec<String>> {
        self.inner.names()
    }
    fn add_name(&self, name: &str) -> Result<()> {
        self.inner.add_name(name)
    }
    fn remove_name(&self, name: &str) -> Result<()> {
        self.inner.remove_name(name)
    }
}

/// The chunk keys of `data` as a put cuts it.
fn keys_of(ns: NamespaceId, data: &[u8]) -> Vec<BlockKey> {
    data.chunks(CHUNK as usize).map(|c| chunk_key(ns, c)).collect()
}

/// Whether the store holds chunk `k`.
fn holds<S: ChunkStore>(c: &Checkpoints<S>, k: BlockKey) -> bool {
    c.store().get_chunk(k).unwrap().is_some()
}

#[test]
fn a_chunk_that_cannot_be_stored_fails_the_put_and_commits_nothing() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = tempfile::tempdir().unwrap();
    let Checkpoints { store, ns, chunk_bytes } = setup(d.path());
    let c = Checkpoints::new(Faulty::new(store), ns, chunk_bytes);
    let src = d.path().join("src");
    let files = tree(&src);
    // A committed checkpoint shares shard-0's chunks with the failing put.
    let shard0 = &files.iter().find(|f| f.0 == "model/shard-0.bin").unwrap().1;
    c.put_bytes("kept", &[("w.bin".to_string(), &shard0[..])]).unwrap();
    // Five chunk puts go through (config, shard-0's two, already there,
    // shard-1's two), the next fails.
    c.store().ok.store(5, SeqCst);
    let e = c.put_dir("s", &src).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(c.manifest("s").unwrap().is_none());
    assert_eq!(c.list().unwrap().len(), 1);
    c.store().ok.store(usize::MAX, SeqCst);
    // Collected: every chunk the failed put stored; kept: the shared ones.
    for (p, b) in &files {
        for k in keys_of(ns, b) {
            let shared = p == "model/shard-0.bin";
            assert_eq!(holds(&c, k), shared, "{p}: chunk {k} kept only if committed elsewhere");
        }
    }
    let out = d.path().join("kept");
    c.get("kept", &out).unwrap();
    assert!(std::fs::read(out.join("w.bin")).unwrap() == *shard0);
    // A source that fails midway (a read error) is collected the same way.
    let good = bytes(9, 3 * CHUNK as usize);
    let open = |i: usize| -> Result<(Box<dyn Read>, String)> {
        if i == 0 {
            Ok((Box::new(std::io::Cursor::new(good.clone())), "good".into()))
        } else {
            Err(Error::io("open broken", std::io::Error::other("injected: unreadable")))
        }
    };
    let e = c.put_sources("u", &["a", "b"], open).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    for k in keys_of(ns, &good) {
        assert!(!holds(&c, k), "chunk {k} of the failed put collected");
    }
}

#[test]
fn a_restore_writes_pages_directly_pads_the_tail_and_cuts_it() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    let page = PAGE;
    let mut want = Vec::new();
    let mut r = Restore::create(&p, 4 * page).unwrap();
    // From an aligned buffer, then from a Vec (a bounce copy if unaligned).
    let pool = Recycler::new(2 * page, 1);
    let mut a = pool.take();
    a.copy_from_slice(&bytes(1, 2 * page));
    want.extend_from_slice(&a);
    r.write(&a).unwrap();
    let b = bytes(2, page + 100);
    want.extend_from_slice(&b);
    r.write(&b).unwrap();
    let direct = r.direct;
    // Nothing may follow a partial last page.
    let e = r.write(&[1u8; 10]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    r.finish(want.len() as u64).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), want, "direct: {direct}");

    // A chunk larger than the bounce buffer goes through the page cache.
    let q = d.path().join("g");
    let mut r = Restore::create(&q, page).unwrap();
    let big = bytes(3, 3 * page + 5);
    r.write(&big).unwrap();
    assert!(!r.direct);
    r.finish(big.len() as u64).unwrap();
    assert_eq!(std::fs::read(&q).unwrap(), big);
}

#[test]
fn a_put_from_memory_stores_what_a_put_from_files_does() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path());
    let src = d.path().join("src");
    let files = tree(&src);
    let from_files = c.put_dir("files", &src).unwrap();
    let mem: Vec<(String, &[u8])> = files.iter().map(|(p, b)| (p.clone(), b.as_slice())).collect();
    let from_memory = c.put_bytes("memory", &mem).unwrap();
    assert_eq!(from_files.files, from_memory.files);
    let out = d.path().join("restore");
    c.get("memory", &out).unwrap();
    for (p, b) in &files {
        assert_eq!(&std::fs::read(out.join(p)).unwrap(), b, "{p}");
    }
    // The same checks as a put from files: nothing is stored on a bad path.
    let e = c
        .put_bytes("bad", &[("../x".to_string(), b"x".as_slice())])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(c.manifest("bad").unwrap().is_none());
}

#[test]
fn a_failed_commit_is_rolled_back_or_finished_by_the_next_put() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = tempfile::tempdir().unwrap();
    let Checkpoints { store, ns, chunk_bytes } = setup(d.path());
    let faulty = Faulty::new(store);
    faulty.fail_commits.store(true, SeqCst);
    let c = Checkpoints::new(faulty, ns, chunk_bytes);
    let src = d.path().join("src");
    let files = tree(&src);
    // Rolled back: no manifest is left, no chunk (none is committed
    // elsewhere), and a retry commits.
    assert_eq!(c.put_dir("s", &src).unwrap_err().kind(), ErrorKind::Throttled);
    assert!(c.manifest("s").unwrap().is_none());
    for (p, b) in &files {
        for k in keys_of(ns, b) {
            assert!(!holds(&c, k), "{p}: chunk {k} collected");
        }
    }
    // Not rolled back (a member was down): the manifest stays, unnamed.
    c.store().refuse_removes.store(true, SeqCst);
    assert_eq!(c.put_dir("t", &src).unwrap_err().kind(), ErrorKind::Throttled);
    assert!(c.manifest("t").unwrap().is_some());
    assert!(c.list().unwrap().is_empty());
    c.store().fail_commits.store(false, SeqCst);
    c.store().refuse_removes.store(false, SeqCst);
    // Other files under that name are refused, and change nothing.
    let other = d.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("x"), b"other").unwrap();
    let e = c.put_dir("t", &other).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(c.list().unwrap().is_empty());
    // The same files finish it: named, listed, restorable.
    c.put_dir("t", &src).unwrap();
    c.put_dir("s", &src).unwrap();
    let names: Vec<String> = c.list().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s", "t"]);
    let out = d.path().join("restore");
    c.get("t", &out).unwrap();
    for (p, b) in &files {
        assert_eq!(&std::fs::read(out.join(p)).unwrap(), b, "{p}");
    }
    // And a committed name stays immutable.
    assert_eq!(c.put_dir("t", &src).unwrap_err().kind(), ErrorKind::AlreadyExists);
}
