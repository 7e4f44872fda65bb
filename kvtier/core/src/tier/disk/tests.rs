use super::*;
use crate::tier::conformance::{self, content};
use crate::tier::{Fetched, TierExt};

const NS: NamespaceId = NamespaceId(0xd15c);
const BLOCK: usize = 64 * 1024;

fn cfg(dir: &Path) -> DiskConfig {
    DiskConfig {
        segment_bytes: 1 << 20,
        ..DiskConfig::new(dir, 4 << 20)
    }
}

fn key(i: u64) -> BlockKey {
    BlockKey(u128::from(i) << 64 | u128::from(i) | 1)
}

fn fill(t: &DiskTier, range: std::ops::Range<u64>) {
    for i in range {
        t.put(NS, key(i), &content(key(i), BLOCK)).unwrap();
    }
}

fn assert_intact(t: &DiskTier, range: std::ops::Range<u64>) {
    let mut out = vec![0u8; BLOCK];
    for i in range {
        assert_eq!(t.get(&key(i), &mut out).unwrap(), Fetched::Hit, "block {i} missing");
        assert!(out == content(key(i), BLOCK), "block {i} altered");
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn conformance() {
    let dirs = Mutex::new(Vec::new());
    conformance::run(
        || {
            let d = tempfile::tempdir().unwrap();
            let t = cfg(d.path()).build().unwrap();
            dirs.lock().push(d);
            t
        },
        BLOCK,
    );
}

#[test]
fn conformance_buffered_io() {
    let dirs = Mutex::new(Vec::new());
    conformance::run(
        || {
            let d = tempfile::tempdir().unwrap();
            let t = DiskConfig {
                direct_io: false,
                ..cfg(d.path())
            }
            .build()
            .unwrap();
            assert!(!t.direct_io());
            dirs.lock().push(d);
            t
        },
        BLOCK,
    );
}

#[test]
fn contents_survive_restart() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..20);
    assert!(t.remove(&key(3)).unwrap());
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!(r.blocks, 19, "{r:?}");
    assert_eq!(r.skipped_records, 0, "{r:?}");
    // A clean close sealed every segment.
    assert_eq!(r.unsealed_segments, 0, "{r:?}");
    assert_intact(&t, 0..3);
    assert_intact(&t, 4..20);
    // The tombstone kept the removed block from coming back.
    assert!(!t.contains(&key(3)));
    assert_eq!(t.namespaces(), HashSet::from([NS]));
    // And the reopened tier takes new writes.
    fill(&t, 20..24);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_intact(&t, 20..24);
}

#[test]
fn aligned_blocks_go_direct_and_come_back() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    let mut src = AlignedBuf::new(BLOCK);
    src.as_mut_slice().copy_from_slice(&content(key(1), BLOCK));
    t.put(NS, key(1), src.as_slice()).unwrap();
    let loc = *t.inner.state.lock().index.get(&key(1)).unwrap();
    if t.direct_io() {
        assert_eq!(
            u64::from(loc.data_offset),
            PAGE,
            "an aligned block is written from the caller's buffer"
        );
    }
    let mut out = AlignedBuf::new(BLOCK);
    assert_eq!(t.get(&key(1), out.as_mut_slice()).unwrap(), Fetched::Hit);
    assert!(out.as_slice() == src.as_slice());
    // Unaligned reads of an aligned record go through staging.
    let mut v = vec![0u8; BLOCK + 1];
    assert_eq!(t.get(&key(1), &mut v[1..]).unwrap(), Fetched::Hit);
    assert!(v[1..] == *src.as_slice());
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.get(&key(1), out.as_mut_slice()).unwrap(), Fetched::Hit);
    assert!(out.as_slice() == src.as_slice());
}

#[test]
fn large_unaligned_blocks_start_on_a_page_and_oversize_staging_is_reused() {
    let d = tempfile::tempdir().unwrap();
    // Staging buffers of one page: every large block stages oversize.
    let t = DiskConfig {
        io_buffer_bytes: PAGE,
        ..cfg(d.path())
    }
    .build()
    .unwrap();
    let len = BLOCK + 100;
    for i in 1..=3 {
        let mut v = vec![0u8; len + 1];
        v[1..].copy_from_slice(&content(key(i), len));
        t.put(NS, key(i), &v[1..]).unwrap();
    }
    assert_eq!(t.oversize_staging(), 3);
    // One oversize buffer served the three puts, and is kept idle.
    assert_eq!(t.inner.oversize_idle.lock().len(), 1);
    let loc = *t.inner.state.lock().index.get(&key(2)).unwrap();
    assert_eq!(u64::from(loc.data_offset), PAGE, "staged, and still on a page");
    // An aligned reader gets the whole pages straight and the tail through
    // a page of staging: no oversize buffer.
    let mut out = AlignedBuf::new(len);
    assert_eq!(t.get(&key(2), &mut out.as_mut_slice()[..len]).unwrap(), Fetched::Hit);
    assert!(out[..len] == content(key(2), len)[..]);
    if t.direct_io() {
        assert_eq!(t.oversize_staging(), 3);
    }
    // An unaligned reader still works.
    let mut v = vec![0u8; len + 1];
    assert_eq!(t.get(&key(3), &mut v[1..]).unwrap(), Fetched::Hit);
    assert!(v[1..] == content(key(3), len)[..]);
}

/// Flips one byte of the file at `off`.
fn flip(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, off).unwrap();
}

#[test]
fn corrupt_data_is_a_counted_miss_never_served() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..4);
    let loc = *t.inner.state.lock().index.get(&key(2)).unwrap();
    let path = segment_files(d.path())[0].clone();
    flip(&path, loc.off + u64::from(loc.data_offset) + 100);
    let mut out = vec![0u8; BLOCK];
    let e = t.get(&key(2), &mut out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert_eq!(t.counters().corrupt.load(Relaxed), 1);
    // Dropped from the index: now a plain miss.
    assert!(!t.contains(&key(2)));
    assert_eq!(t.get(&key(2), &mut out).unwrap(), Fetched::Miss);
    assert_intact(&t, 0..2);
    assert_intact(&t, 3..4);
    assert_eq!(t.usage().blocks, 3);
}

#[test]
fn corrupt_data_found_after_restart_is_not_served() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..4);
    let loc = *t.inner.state.lock().index.get(&key(1)).unwrap();
    drop(t);
    flip(&segment_files(d.path())[0], loc.off + u64::from(loc.data_offset) + 7);
    let t = cfg(d.path()).build().unwrap();
    // Sealed segments are indexed from headers; the read catches it.
    let mut out = vec![0u8; BLOCK];
    assert_eq!(
        t.get(&key(1), &mut out).unwrap_err().kind(),
        ErrorKind::ChecksumMismatch
    );
    assert_intact(&t, 0..1);
    assert_intact(&t, 2..4);
}

#[test]
fn corrupt_header_is_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..4);
    let loc = *t.inner.state.lock().index.get(&key(1)).unwrap();
    drop(t);
    // Byte 20 is inside the key field: the header checksum fails.
    flip(&segment_files(d.path())[0], loc.off + 20);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().skipped_records, 1, "{:?}", t.recovery());
    assert!(!t.contains(&key(1)));
    assert_intact(&t, 0..1);
    assert_intact(&t, 2..4);
}

#[test]
fn truncated_segment_keeps_every_whole_record() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..6);
    let loc = *t.inner.state.lock().index.get(&key(5)).unwrap();
    drop(t);
    // A crash cut the file in the middle of the last record (and with it
    // the seal on the last page).
    let path = segment_files(d.path())[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(loc.off + u64::from(loc.data_offset) + 1000).unwrap();
    drop(f);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!(r.unsealed_segments, 1, "{r:?}");
    assert_eq!(r.skipped_records, 1, "{r:?}");
    assert_eq!(r.blocks, 5, "{r:?}");
    assert!(!t.contains(&key(5)));
    assert_intact(&t, 0..5);
    // The block can be stored again, and the recovered segment was sealed.
    fill(&t, 5..6);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().unsealed_segments, 0);
    assert_intact(&t, 0..6);
}

#[test]
fn torn_data_in_an_unsealed_segment_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..6);
    let loc = *t.inner.state.lock().index.get(&key(2)).unwrap();
    drop(t);
    // The crash left record 2's data half-written: zero part of it and drop
    // the seal, as if the process died before sealing.
    let path = segment_files(d.path())[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; 8192], loc.off + u64::from(loc.data_offset) + 4096)
        .unwrap();
    f.write_all_at(&vec![0u8; 4096], (1 << 20) - PAGE).unwrap();
    drop(f);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.unsealed_segments, r.skipped_records, r.blocks), (1, 1, 5), "{r:?}");
    assert!(!t.contains(&key(2)));
    assert_intact(&t, 0..2);
    assert_intact(&t, 3..6);
}

#[test]
fn foreign_segment_file_is_removed() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("0000000000000000.seg"), vec![7u8; 8192]).unwrap();
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().bad_segments, 1);
    assert_eq!(t.usage().blocks, 0);
    fill(&t, 0..2);
    assert_intact(&t, 0..2);
}

#[test]
fn one_process_per_directory() {
    let d = tempfile::tempdir().unwrap();
    let _t = cfg(d.path()).build().unwrap();
    let e = cfg(d.path()).build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

#[test]
fn bad_config_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = DiskConfig::new(d.path(), 1 << 20).build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("at least two segments"), "{e}");
    let e = DiskConfig {
        segment_bytes: 5000,
        ..cfg(d.path())
    }
    .build()
    .unwrap_err();
    assert!(e.to_string().contains("multiple of 4096"), "{e}");
}

#[test]
fn oversize_block_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..2);
    let before = t.usage();
    let e = t.put(NS, key(9), &vec![1u8; 1 << 20]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(t.usage(), before);
    assert_intact(&t, 0..2);
}

#[test]
fn reopen_at_capacity_keeps_everything() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..60);
    let held: Vec<u64> = (0..60).filter(|i| t.contains(&key(*i))).collect();
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().blocks, held.len() as u64);
    for i in held {
        assert!(t.contains(&key(i)), "block {i} lost by a restart");
    }
}

#[test]
fn smaller_capacity_on_reopen_drops_oldest_segments() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..50);
    drop(t);
    let t = DiskConfig {
        capacity_bytes: 2 << 20,
        ..cfg(d.path())
    }
    .build()
    .unwrap();
    assert!(t.usage().used_bytes <= t.usage().capacity_bytes);
    assert!(segment_files(d.path()).len() <= 2);
    // The newest blocks are the ones kept.
    assert!(t.contains(&key(49)));
    assert!(!t.contains(&key(0)));
}

#[test]
fn pinned_block_survives_segment_reclaim() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..1);
    let p = t.pin(&key(0)).unwrap();
    // Enough to cycle every segment: key 0's file is unlinked.
    fill(&t, 1..80);
    assert!(!t.contains(&key(0)));
    let mut out = vec![0u8; BLOCK];
    p.read_into(&mut out).unwrap();
    assert!(out == content(key(0), BLOCK));
}

#[test]
fn recycled_segments_never_resurrect_stale_records() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    // 4 segments of about 14 blocks: 120 blocks recycle every file twice.
    fill(&t, 0..120);
    assert!(t.recycled_segments() >= 4, "{}", t.recycled_segments());
    assert!(segment_files(d.path()).len() <= 4);
    let held: Vec<u64> = (0..120).filter(|i| t.contains(&key(*i))).collect();
    assert!(held.len() < 60 && held.contains(&119));
    // A crash now: copy the directory while the active segment (a recycled
    // file with older records past its write point) is unsealed.
    let crashed = tempfile::tempdir().unwrap();
    for f in segment_files(d.path()) {
        std::fs::copy(&f, crashed.path().join(f.file_name().unwrap())).unwrap();
    }
    let c = cfg(crashed.path()).build().unwrap();
    assert_eq!(c.recovery().unsealed_segments, 1, "{:?}", c.recovery());
    let recovered: Vec<u64> = (0..120).filter(|i| c.contains(&key(*i))).collect();
    assert_eq!(recovered, held, "stale records came back, or live ones were lost");
    assert_intact(&c, held[0]..120);
    // And a clean restart of the original keeps exactly the same set.
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    let again: Vec<u64> = (0..120).filter(|i| t.contains(&key(*i))).collect();
    assert_eq!(again, held);
}

#[test]
fn a_pinned_segment_is_not_recycled_under_its_reader() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..1);
    let p = t.pin(&key(0)).unwrap();
    fill(&t, 1..120);
    let mut out = vec![0u8; BLOCK];
    p.read_into(&mut out).unwrap();
    assert!(
        out == content(key(0), BLOCK),
        "a recycled file was rewritten under a reader"
    );
}
