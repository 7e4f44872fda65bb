//! Model-based crash tests: random sequences of put, remove, crash and
//! reopen, clean reopen, and segment reclaim, with write and fsync faults
//! injected at the file I/O boundary, checked against an in-memory oracle.
//! For the disk tier, and for the block manager in SSD-only and host + disk
//! configurations.
//!
//! A crash is a copy of the directory taken while the tier is open (what a
//! killed process leaves: every completed `pwrite` is in the page cache, no
//! seal is written on the way out), reopened in place of the original.
//!
//! The invariant, after every step and every reopen:
//! - a block is served with exactly its bytes or not at all, never wrong;
//! - a block whose store was acknowledged (and that the tier still held
//!   before the crash: reclaim may drop blocks, the host tier is volatile)
//!   is served after reopen;
//! - a block whose removal was acknowledged (the tier answered that it was
//!   present and wrote its tombstone) never comes back.
//!
//! Each run is seeded; a failure names its seed, and
//! `KVTIER_MODEL_SEED=<seed>` reruns only that one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::fsio::{Faults, FileIo, FileOp};
use kvtier::manager::{Cascade, ManagerConfig};
use kvtier::tier::conformance::content;
use kvtier::tier::disk::{DiskConfig, DiskTier};
use kvtier::tier::host::HostConfig;
use kvtier::tier::{Fetched, Stored, Tier, TierExt};
use kvtier::{BlockKey, BlockManager, Namespace, NamespaceId};

const PAGE: u64 = 4096;
/// Small segments, so that a few dozen blocks fill the tier and reclaim runs.
const SEGMENT_BYTES: u64 = 16 * PAGE;
const CAPACITY_BYTES: u64 = 5 * SEGMENT_BYTES;
/// The largest block: a namespace of 1 layer, 1 head of 64, 64 tokens, F16.
const MAX_BLOCK_BYTES: usize = 16 << 10;
/// Keys the operations pick from, so that puts repeat and removes hit.
const KEYS: u64 = 48;
/// Keys only the reclaim step writes.
const FILLER_KEYS: std::ops::Range<u64> = 1000..1064;
const STEPS: usize = 120;
const SEEDS: u64 = 6;

/// SplitMix64: a seeded generator with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the oracle knows about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Acknowledged and held: must be served, with exactly its bytes.
    Held,
    /// May be served (with exactly its bytes) or missed: a failed store, a
    /// reclaimed block, a block only the host tier held before a crash.
    Either,
    /// Its removal was acknowledged: must be missed.
    Removed,
}

/// The namespace every block is stored in.
const NS: NamespaceId = NamespaceId(0x000c_0a5e);

fn key(ns: NamespaceId, i: u64) -> BlockKey {
    BlockKey::from_opaque(ns, &i.to_le_bytes())
}

/// Each key's length and content are functions of the key, so a wrong
/// block is wrong bytes, whatever the tier did.
fn len_of(i: u64) -> usize {
    let x = i.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
    1 + (x as usize) % MAX_BLOCK_BYTES
}

fn bytes_of(ns: NamespaceId, i: u64) -> Vec<u8> {
    content(key(ns, i), len_of(i))
}

/// Runs `run(seed)` for every seed (or the one in `KVTIER_MODEL_SEED`),
/// naming the seed of a failure.
fn for_each_seed(what: &str, run: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let seeds: Vec<u64> = match std::env::var("KVTIER_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("KVTIER_MODEL_SEED is a number")],
        Err(_) => {
            // A different base every run would cover more, but a failure in
            // CI must be reproducible from the log alone: the seed is printed.
            let base = 0x6b76_7469_6572u64;
            (0..SEEDS).map(|i| base + i).collect()
        }
    };
    for seed in seeds {
        if let Err(e) = std::panic::catch_unwind(|| run(seed)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: failed with seed {seed} (rerun with KVTIER_MODEL_SEED={seed}): {msg}");
        }
    }
}

/// Copies the files of `from` into a fresh directory: the state a crash
/// of the process holding `from` open leaves behind.
fn crash_copy(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    // The copy is not instantaneous: reclaimed segments are unlinked in the
    // background meanwhile, strictly oldest first. Copying newest first
    // gives a state a real crash could leave: a file unlinked before its
    // turn came takes every older one with it. (Oldest first could copy a
    // record and then miss the newer segment holding its tombstone.)
    let mut files: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name())
        .collect();
    // Segment names are zero-padded hex ids: the byte order is the age.
    files.sort_unstable_by(|a, b| b.cmp(a));
    for name in files {
        // A segment unlinked between listing and copying is gone: as if
        // the crash came after the unlink.
        let _ = std::fs::copy(from.join(&name), to.path().join(&name));
    }
    to
}

fn disk_cfg(dir: &Path, sync_writes: bool) -> DiskConfig {
    DiskConfig {
        segment_bytes: SEGMENT_BYTES,
        sync_writes,
        io_buffer_bytes: 2 * SEGMENT_BYTES,
        ..DiskConfig::new(dir, CAPACITY_BYTES)
    }
}

/// Plans one write or fsync fault in the next operation, sometimes;
/// answers whether it did.
fn maybe_fault(rng: &mut Rng, faults: &Faults, sync: bool) -> bool {
    if !rng.chance(12) {
        return false;
    }
    let op = if sync && rng.chance(40) {
        FileOp::Fsync
    } else {
        FileOp::Write
    };
    faults.fail_nth(op, 1 + rng.below(2));
    true
}

/// The oracle's verdict on one key of a reopened or live store:
/// `served` is `Some(bytes)` on a hit.
fn check_key(oracle: &mut BTreeMap<u64, Known>, i: u64, served: Option<Vec<u8>>, ns: NamespaceId, when: &str) {
    let known = oracle.get(&i).copied();
    match (&served, known) {
        (Some(b), _) => assert!(*b == bytes_of(ns, i), "{when}: block {i} served wrong bytes"),
        (None, Some(Known::Held)) => panic!("{when}: acknowledged block {i} is missing"),
        (None, _) => {}
    }
    match (served.is_some(), known) {
        (true, Some(Known::Removed)) => panic!("{when}: block {i} came back after its removal was acknowledged"),
        // Served now: it is in the index, and a later crash keeps it.
        (true, _) => {
            oracle.insert(i, Known::Held);
        }
        (false, Some(Known::Either)) => {
            oracle.remove(&i);
        }
        (false, _) => {}
    }
}

// ---------------------------------------------------------------------------
// The disk tier.

struct DiskModel {
    dir: tempfile::TempDir,
    tier: Option<DiskTier>,
    io: FileIo,
    faults: Arc<Faults>,
    sync: bool,
    oracle: BTreeMap<u64, Known>,
    /// The tier's evictions when the oracle last looked.
    evictions: u64,
}

impl DiskModel {
    fn tier(&self) -> &DiskTier {
        self.tier.as_ref().expect("open between steps")
    }

    fn open(&mut self) {
        let t = DiskTier::open_with(&disk_cfg(self.dir.path(), self.sync), self.io.clone()).expect("reopen");
        self.evictions = 0;
        self.tier = Some(t);
    }

    fn evictions_now(&self) -> u64 {
        self.tier()
            .counters()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every key against the oracle; held blocks that the tier no longer
    /// holds must have been reclaimed (the eviction counter moved).
    fn check_all(&mut self, when: &str) {
        let ev = self.evictions_now();
        let keys: Vec<u64> = (0..KEYS).chain(FILLER_KEYS).collect();
        for i in keys {
            let k = key(NS, i);
            let mut out = vec![0u8; len_of(i)];
            let served = match self.tier().get(&k, &mut out) {
                Ok(Fetched::Hit) => Some(out),
                Ok(Fetched::Miss) => None,
                Err(e) => panic!("{when}: block {i}: read failed: {e}"),
            };
            if served.is_none() && self.oracle.get(&i) == Some(&Known::Held) {
                assert!(
                    ev > self.evictions,
                    "{when}: acknowledged block {i} is missing and nothing was reclaimed"
                );
                self.oracle.insert(i, Known::Either);
            }
            check_key(&mut self.oracle, i, served, NS, when);
        }
        self.evictions = ev;
    }

    fn put(&mut self, i: u64, rng: &mut Rng) {
        let _ = maybe_fault(rng, &self.faults, self.sync);
        let r = self.tier().put(NS, key(NS, i), &bytes_of(NS, i));
        self.faults.clear();
        match r {
            Ok(Stored::Inserted | Stored::Present) => {
                self.oracle.insert(i, Known::Held);
            }
            Err(_) => {
                // Not acknowledged: the bytes may be whole on disk (a
                // failed fsync after a complete write).
                if self.oracle.get(&i) != Some(&Known::Held) {
                    self.oracle.insert(i, Known::Either);
                }
            }
        }
    }

    fn put_batch(&mut self, idx: &[u64], rng: &mut Rng) {
        let _ = maybe_fault(rng, &self.faults, self.sync);
        let data: Vec<Vec<u8>> = idx.iter().map(|&i| bytes_of(NS, i)).collect();
        let items: Vec<_> = idx
            .iter()
            .zip(&data)
            .map(|(&i, d)| (NS, key(NS, i), d.as_slice()))
            .collect();
        let results = self.tier().put_batch(&items);
        self.faults.clear();
        for (&i, r) in idx.iter().zip(results) {
            match r {
                Ok(_) => {
                    self.oracle.insert(i, Known::Held);
                }
                Err(_) if self.oracle.get(&i) != Some(&Known::Held) => {
                    self.oracle.insert(i, Known::Either);
                }
                Err(_) => {}
            }
        }
    }

    fn remove(&mut self, i: u64, rng: &mut Rng) {
        let _ = maybe_fault(rng, &self.faults, self.sync);
        let r = self.tier().remove(&key(NS, i));
        self.faults.clear();
        match r {
            Ok(true) => {
                self.oracle.insert(i, Known::Removed);
            }
            Ok(false) => {
                if self.oracle.get(&i) == Some(&Known::Held) {
                    assert!(
                        self.evictions_now() > self.evictions,
                        "block {i}: remove found nothing though it was held and nothing was reclaimed"
                    );
                }
                self.oracle.remove(&i);
            }
            Err(_) => {
                // The tombstone may or may not have reached the file.
                if self.oracle.contains_key(&i) {
                    self.oracle.insert(i, Known::Either);
                }
            }
        }
    }

    fn crash(&mut self) {
        self.check_all("before the crash");
        let copy = crash_copy(self.dir.path());
        self.tier = None;
        self.dir = copy;
        self.open();
        self.check_all("after a crash");
    }

    fn reopen(&mut self) {
        self.check_all("before a clean reopen");
        self.tier = None;
        self.open();
        self.check_all("after a clean reopen");
    }
}

fn run_disk_model(seed: u64) {
    let mut rng = Rng(seed);
    let faults = Faults::new();
    let mut m = DiskModel {
        dir: tempfile::tempdir().unwrap(),
        tier: None,
        io: FileIo::with_faults(faults.clone()),
        faults,
        sync: rng.chance(50),
        oracle: BTreeMap::new(),
        evictions: 0,
    };
    m.open();
    for _ in 0..STEPS {
        match rng.below(100) {
            0..40 => {
                let i = rng.below(KEYS);
                m.put(i, &mut rng);
            }
            40..52 => {
                let n = 2 + rng.below(5);
                let idx: Vec<u64> = (0..n).map(|_| rng.below(KEYS)).collect();
                m.put_batch(&idx, &mut rng);
            }
            52..70 => {
                let i = rng.below(KEYS);
                m.remove(i, &mut rng);
            }
            70..78 => m.crash(),
            78..82 => m.reopen(),
            82..90 => {
                // Reclaim: enough filler to roll past a segment or two.
                for _ in 0..6 {
                    let i = FILLER_KEYS.start + rng.below(FILLER_KEYS.end - FILLER_KEYS.start);
                    m.put(i, &mut rng);
                }
            }
            _ => m.check_all("between steps"),
        }
    }
    m.crash();
}

#[test]
fn disk_tier_survives_random_crashes_faults_and_reclaim() {
    for_each_seed("disk tier model", run_disk_model);
}

// ---------------------------------------------------------------------------
// The block manager.

#[derive(Debug, Clone, Copy)]
enum Setup {
    SsdOnly,
    /// Host in front of disk, demoting on eviction.
    HostOnEviction,
    /// Host in front of disk, every block written through in the background.
    HostWriteThrough,
}

fn namespace() -> Namespace {
    Namespace::new(
        "crash-model",
        KvLayout {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 64,
            block_tokens: 64,
            kind: KvKind::Kv,
            dtype: Dtype::F16,
        },
    )
}

fn manager_cfg(setup: Setup, dir: &Path, sync: bool) -> ManagerConfig {
    let disk = disk_cfg(dir, sync);
    let host = HostConfig {
        pin_memory: false,
        ..HostConfig::with_capacity(8 * MAX_BLOCK_BYTES as u64)
    };
    match setup {
        Setup::SsdOnly => ManagerConfig::ssd_only(disk),
        Setup::HostOnEviction => ManagerConfig::tiered(Some(host), Some(disk)),
        Setup::HostWriteThrough => ManagerConfig {
            cascade: Cascade::WriteThrough,
            ..ManagerConfig::tiered(Some(host), Some(disk))
        },
    }
}

struct ManagerModel {
    setup: Setup,
    dir: tempfile::TempDir,
    m: Option<BlockManager>,
    ns: NamespaceId,
    io: FileIo,
    faults: Arc<Faults>,
    sync: bool,
    oracle: BTreeMap<u64, Known>,
    /// Disk evictions plus failed demotions when the oracle last looked.
    losses: u64,
}

impl ManagerModel {
    fn m(&self) -> &BlockManager {
        self.m.as_ref().expect("open between steps")
    }

    fn open(&mut self) {
        let m = BlockManager::open_with(&manager_cfg(self.setup, self.dir.path(), self.sync), self.io.clone())
            .expect("reopen");
        self.ns = m.register_namespace(&namespace()).unwrap();
        self.m = Some(m);
        self.losses = 0;
    }

    /// Ways a held block may leave a live manager: disk reclaim, or a
    /// failed write of a block the host tier evicts (demoted on eviction,
    /// or written through in the background). With write-through, a host
    /// eviction drops the block too: its disk copy may have been reclaimed
    /// already, and nothing writes it again.
    fn losses_now(&self) -> u64 {
        let s = self.m().stats();
        let host = match self.setup {
            Setup::HostWriteThrough => s.host.map_or(0, |h| h.evictions),
            Setup::SsdOnly | Setup::HostOnEviction => 0,
        };
        s.disk.map_or(0, |d| d.evictions) + s.offload_errors + host
    }

    fn check_all(&mut self, when: &str) {
        // Loads promote into the host tier, whose evictions go to disk and
        // may reclaim there, also blocks this loop checked already: the
        // next check excuses a miss by any loss from here on.
        let start = self.losses_now();
        let keys: Vec<u64> = (0..KEYS).chain(FILLER_KEYS).collect();
        for i in keys {
            let served = match self.m().load_one(self.ns, key(self.ns, i)) {
                Ok(b) => b,
                Err(e) => panic!("{when}: block {i}: load failed: {e}"),
            };
            if served.is_none() && self.oracle.get(&i) == Some(&Known::Held) {
                assert!(
                    self.losses_now() > self.losses,
                    "{when}: acknowledged block {i} is missing and nothing was evicted"
                );
                self.oracle.insert(i, Known::Either);
            }
            check_key(&mut self.oracle, i, served, self.ns, when);
        }
        self.losses = start;
    }

    fn store(&mut self, i: u64, rng: &mut Rng) {
        let planned = maybe_fault(rng, &self.faults, self.sync);
        let r = self.m().store_one(self.ns, key(self.ns, i), &bytes_of(self.ns, i));
        if planned && matches!(self.setup, Setup::HostWriteThrough) {
            // The fault is meant for this block's background write.
            self.m().flush();
        }
        self.faults.clear();
        match r {
            Ok(_) => {
                self.oracle.insert(i, Known::Held);
            }
            Err(_) if self.oracle.get(&i) != Some(&Known::Held) => {
                self.oracle.insert(i, Known::Either);
            }
            Err(_) => {}
        }
    }

    fn remove(&mut self, i: u64, rng: &mut Rng) {
        let _ = maybe_fault(rng, &self.faults, self.sync);
        let r = self.m().remove(self.ns, &[key(self.ns, i)]);
        self.faults.clear();
        match r {
            Ok(1) => {
                self.oracle.insert(i, Known::Removed);
            }
            Ok(_) => {
                if self.oracle.get(&i) == Some(&Known::Held) {
                    assert!(
                        self.losses_now() > self.losses,
                        "block {i}: remove found nothing though it was held and nothing was evicted"
                    );
                }
                self.oracle.remove(&i);
            }
            Err(_) => {
                if self.oracle.contains_key(&i) {
                    self.oracle.insert(i, Known::Either);
                }
            }
        }
    }

    fn crash(&mut self) {
        self.check_all("before the crash");
        let m = self.m();
        // Background writes would reclaim segments while the directory is
        // copied, and the oracle could not tell which blocks the copy holds:
        // the crash comes while the write-through queue is idle. Torn
        // writes come from the injected faults instead.
        m.flush();
        // What only the host tier holds dies with the process; what the
        // disk tier holds now is on its files.
        let on_disk: Vec<bool> = (0..KEYS)
            .chain(FILLER_KEYS)
            .map(|i| m.disk().expect("every setup has a disk").contains(&key(self.ns, i)))
            .collect();
        let copy = crash_copy(self.dir.path());
        for (i, on_disk) in (0..KEYS).chain(FILLER_KEYS).zip(on_disk) {
            if !on_disk && self.oracle.get(&i) == Some(&Known::Held) {
                self.oracle.insert(i, Known::Either);
            }
        }
        self.m = None;
        self.dir = copy;
        self.open();
        self.check_all("after a crash");
    }

    fn reopen(&mut self) {
        self.check_all("before a clean reopen");
        // A clean close drains the write-through queue, but the host
        // tier's blocks are not written out: they are lost all the same.
        let m = self.m.take().expect("open");
        m.flush();
        let on_disk: Vec<bool> = (0..KEYS)
            .chain(FILLER_KEYS)
            .map(|i| m.disk().expect("a disk").contains(&key(self.ns, i)))
            .collect();
        for (i, on_disk) in (0..KEYS).chain(FILLER_KEYS).zip(on_disk) {
            if !on_disk && self.oracle.get(&i) == Some(&Known::Held) {
                self.oracle.insert(i, Known::Either);
            }
        }
        drop(m);
        self.open();
        self.check_all("after a clean reopen");
    }
}

fn run_manager_model(setup: Setup, seed: u64) {
    let mut rng = Rng(seed ^ 0x006d_616e_6167_6572);
    let faults = Faults::new();
    let mut mm = ManagerModel {
        setup,
        dir: tempfile::tempdir().unwrap(),
        m: None,
        ns: NamespaceId(0),
        io: FileIo::with_faults(faults.clone()),
        faults,
        sync: rng.chance(50),
        oracle: BTreeMap::new(),
        losses: 0,
    };
    mm.open();
    for _ in 0..STEPS {
        let step = rng.below(100);
        match step {
            0..50 => {
                let i = rng.below(KEYS);
                mm.store(i, &mut rng);
            }
            50..68 => {
                let i = rng.below(KEYS);
                mm.remove(i, &mut rng);
            }
            68..76 => mm.crash(),
            76..80 => mm.reopen(),
            80..90 => {
                for _ in 0..6 {
                    let i = FILLER_KEYS.start + rng.below(FILLER_KEYS.end - FILLER_KEYS.start);
                    mm.store(i, &mut rng);
                }
            }
            _ => mm.check_all("between steps"),
        }
    }
    mm.crash();
}

#[test]
fn ssd_only_manager_survives_random_crashes_faults_and_reclaim() {
    for_each_seed("ssd-only manager model", |s| run_manager_model(Setup::SsdOnly, s));
}

#[test]
fn host_and_disk_manager_survives_random_crashes_faults_and_reclaim() {
    for_each_seed("host + disk manager model", |s| {
        run_manager_model(Setup::HostOnEviction, s)
    });
}

#[test]
fn write_through_manager_survives_random_crashes_faults_and_reclaim() {
    for_each_seed("write-through manager model", |s| {
        run_manager_model(Setup::HostWriteThrough, s)
    });
}
