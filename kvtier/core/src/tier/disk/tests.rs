use super::index::Loc;
use super::*;
use crate::error::ErrorKind;
use crate::fsio::{Faults, FileIo, FileOp};
use crate::tier::conformance::{self, content};
use crate::tier::{Fetched, TierExt};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
fn a_late_delete_survives_restart_and_recovered_copies_are_as_old_as_their_file() {
    let d = tempfile::tempdir().unwrap();
    {
        let t = cfg(d.path()).build().unwrap();
        fill(&t, 0..4);
        let t1 = crate::tier::now_ms() + 1;
        std::thread::sleep(Duration::from_millis(3));
        // Put again while held: renewed, so the late delete keeps it.
        assert_eq!(t.put(NS, key(1), &content(key(1), BLOCK)).unwrap(), Stored::Present);
        let r = t.put_batch(&[(NS, key(2), &content(key(2), BLOCK)[..])]);
        assert_eq!(r[0].as_ref().unwrap(), &Stored::Present);
        for i in 0..4 {
            let removed = t.remove_written_before(&key(i), t1).unwrap();
            assert_eq!(removed, i == 0 || i == 3, "block {i}");
        }
        fill(&t, 4..5);
    }
    // The tombstones hold after a restart; the renewed copies stay.
    let t = cfg(d.path()).build().unwrap();
    assert!(!t.contains(&key(0)) && !t.contains(&key(3)));
    assert_intact(&t, 1..3);
    assert_intact(&t, 4..5);
    // Recovered copies are dated by their file: a file last written an hour
    // ago holds nothing newer, whatever the index said before.
    drop(t);
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for f in segment_files(d.path()) {
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    let t = cfg(d.path()).build().unwrap();
    let half_hour_ago = crate::tier::now_ms() - 1_800_000;
    assert!(t.remove_written_before(&key(1), half_hour_ago).unwrap());
    // Written since: kept.
    fill(&t, 5..6);
    assert!(!t.remove_written_before(&key(5), half_hour_ago).unwrap());
    assert_intact(&t, 2..3);
    assert_intact(&t, 4..6);
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

/// Small (staged, not large) blocks of varying sizes.
fn small_len(i: u64) -> usize {
    1000 + (i as usize * 7919) % (15 * PAGE as usize - 1000)
}

fn assert_small_intact(t: &DiskTier, keys: impl IntoIterator<Item = u64>) {
    for i in keys {
        let len = small_len(i);
        let mut out = vec![0u8; len];
        assert_eq!(t.get(&key(i), &mut out).unwrap(), Fetched::Hit, "block {i} missing");
        assert!(out == content(key(i), len), "block {i} altered");
    }
}

/// Every key's record lies right after the previous one, in one segment.
fn assert_contiguous(t: &DiskTier, keys: impl IntoIterator<Item = u64>) {
    let st = t.inner.state.lock();
    let locs: Vec<Loc> = keys.into_iter().map(|i| *st.index.get(&key(i)).unwrap()).collect();
    for w in locs.windows(2) {
        assert_eq!(w[1].seg, w[0].seg, "{w:?}");
        assert_eq!(w[1].off, w[0].off + w[0].record_bytes(), "{w:?}");
    }
}

#[test]
fn put_batch_packs_small_blocks_into_one_write_and_recovery_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    // Something already in the segment: the group goes after it.
    t.put(NS, key(100), &content(key(100), 5000)).unwrap();
    assert_eq!(t.batched_writes(), 0);
    let data: Vec<Vec<u8>> = (0..8).map(|i| content(key(i), small_len(i))).collect();
    let items: Vec<_> = (0..8).map(|i| (NS, key(i), data[i as usize].as_slice())).collect();
    let before = t.counters().bytes_written.load(Relaxed);
    let r = t.put_batch(&items);
    assert!(r.iter().all(|r| matches!(r, Ok(Stored::Inserted))), "{r:?}");
    assert_eq!(t.batched_writes(), 1, "eight small blocks, one write");
    assert_eq!(
        t.counters().bytes_written.load(Relaxed) - before,
        data.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    assert_contiguous(&t, [100, 0, 1, 2, 3, 4, 5, 6, 7]);
    assert_small_intact(&t, 0..8);
    // A second batch of the same keys writes nothing.
    assert!(t.put_batch(&items).iter().all(|r| matches!(r, Ok(Stored::Present))));
    assert_eq!(t.batched_writes(), 1);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.blocks, r.skipped_records), (9, 0), "{r:?}");
    assert_small_intact(&t, 0..8);
    // The reopened tier appends after the packed records.
    fill(&t, 200..202);
    assert_intact(&t, 200..202);
}

#[test]
fn put_batch_packed_records_verify_in_an_unsealed_segment() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    let data: Vec<Vec<u8>> = (0..6).map(|i| content(key(i), small_len(i))).collect();
    let items: Vec<_> = (0..6).map(|i| (NS, key(i), data[i as usize].as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|r| r.is_ok()));
    drop(t);
    // Wipe the seal: the next open verifies every record's data.
    let seg = segment_files(d.path()).pop().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0u8; PAGE as usize], (1 << 20) - PAGE).unwrap();
    drop(f);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.blocks, r.unsealed_segments, r.skipped_records), (6, 1, 0), "{r:?}");
    assert_small_intact(&t, 0..6);
}

#[test]
fn put_batch_mixes_present_repeated_empty_and_large_blocks() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    t.put(NS, key(1), &content(key(1), small_len(1))).unwrap();
    let small: Vec<Vec<u8>> = (0..6).map(|i| content(key(i), small_len(i))).collect();
    let large = content(key(3), BLOCK + 10);
    let items = [
        (NS, key(1), small[1].as_slice()),
        (NS, key(2), small[2].as_slice()),
        (NS, key(2), small[2].as_slice()),
        (NS, key(3), large.as_slice()),
        (NS, key(4), small[4].as_slice()),
        (NS, key(5), &[][..]),
    ];
    let r = t.put_batch(&items);
    assert!(matches!(r[0], Ok(Stored::Present)), "{r:?}");
    assert!(matches!(r[1], Ok(Stored::Inserted)), "{r:?}");
    assert!(matches!(r[2], Ok(Stored::Present)), "{r:?}");
    assert!(matches!(r[3], Ok(Stored::Inserted)), "{r:?}");
    assert!(matches!(r[4], Ok(Stored::Inserted)), "{r:?}");
    assert_eq!(r[5].as_ref().unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(t.batched_writes(), 1, "keys 2 and 4 went together");
    assert!(!t.contains(&key(5)));
    let loc = *t.inner.state.lock().index.get(&key(3)).unwrap();
    assert_eq!(u64::from(loc.data_offset), PAGE, "a large block is written as by put");
    let check = |t: &DiskTier| {
        assert_small_intact(t, [1, 2, 4]);
        let mut out = vec![0u8; large.len()];
        assert_eq!(t.get(&key(3), &mut out).unwrap(), Fetched::Hit);
        assert!(out == large);
    };
    check(&t);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().blocks, 4);
    check(&t);
}

#[test]
fn put_batch_splits_at_the_staging_buffer() {
    let d = tempfile::tempdir().unwrap();
    let cfg = DiskConfig {
        io_buffer_bytes: 8 * PAGE,
        ..cfg(d.path())
    };
    let t = cfg.build().unwrap();
    // Records of two pages: four fill a buffer.
    let data: Vec<Vec<u8>> = (0..10).map(|i| content(key(i), 5000)).collect();
    let items: Vec<_> = (0..10).map(|i| (NS, key(i), data[i as usize].as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|r| matches!(r, Ok(Stored::Inserted))));
    // 4 + 4 + 2.
    assert_eq!(t.batched_writes(), 3);
    assert_eq!(t.oversize_staging(), 0);
    assert_contiguous(&t, 0..10);
    let check = |t: &DiskTier| {
        let mut out = vec![0u8; 5000];
        for i in 0..10 {
            assert_eq!(t.get(&key(i), &mut out).unwrap(), Fetched::Hit);
            assert!(out == data[i as usize]);
        }
    };
    check(&t);
    drop(t);
    let t = cfg.build().unwrap();
    assert_eq!(t.recovery().blocks, 10);
    check(&t);
}

#[test]
fn put_batch_splits_at_the_end_of_a_segment() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    // Records of 15 pages; a 1 MiB segment has 254 pages for records: 16
    // fit, so 40 go 16 + 16 + 8, each group in its own segment.
    let len = 15 * PAGE as usize - HEADER_BYTES;
    let data: Vec<Vec<u8>> = (0..40).map(|i| content(key(i), len)).collect();
    let items: Vec<_> = (0..40).map(|i| (NS, key(i), data[i as usize].as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|r| matches!(r, Ok(Stored::Inserted))));
    assert_eq!(t.batched_writes(), 3);
    assert_eq!(segment_files(d.path()).len(), 3);
    assert_contiguous(&t, 0..16);
    assert_contiguous(&t, 16..32);
    assert_contiguous(&t, 32..40);
    let check = |t: &DiskTier| {
        let mut out = vec![0u8; len];
        for i in 0..40 {
            assert_eq!(t.get(&key(i), &mut out).unwrap(), Fetched::Hit, "block {i}");
            assert!(out == data[i as usize], "block {i}");
        }
    };
    check(&t);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.blocks, r.skipped_records, r.unsealed_segments), (40, 0, 0), "{r:?}");
    check(&t);
}

#[test]
fn a_failed_packed_write_publishes_nothing_and_retires_its_segment() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    t.put(NS, key(0), &content(key(0), small_len(0))).unwrap();
    let data: Vec<Vec<u8>> = (1..3).map(|i| content(key(i), 5000)).collect();
    let (seg, off, n) = t.inner.reserve_prefix(&[2 * PAGE, 2 * PAGE]).unwrap();
    assert_eq!(n, 2);
    let recs = [
        (off, header(NS, key(1), &data[0], HEADER_BYTES as u32)),
        (off + 2 * PAGE, header(NS, key(2), &data[1], HEADER_BYTES as u32)),
    ];
    assert_eq!(
        t.inner.state.lock().segments[&seg.id].writers,
        1,
        "one reservation, one writer"
    );
    let failed = Err(Error::io("test", std::io::Error::from_raw_os_error(libc::EIO)));
    t.inner.finish_packed(&seg, &recs, &failed);
    {
        let st = t.inner.state.lock();
        let m = &st.segments[&seg.id];
        assert_eq!(m.writers, 0);
        assert!(m.failed && m.sealed && !m.seal_written);
        assert_ne!(st.active, Some(seg.id));
        assert!(!st.index.contains_key(&key(1)) && !st.index.contains_key(&key(2)));
    }
    // The next write goes to a new segment, and the failed one is verified
    // in full on the next open.
    let items: Vec<_> = (1..3).map(|i| (NS, key(i), data[i as usize - 1].as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|r| matches!(r, Ok(Stored::Inserted))));
    assert_ne!(t.inner.state.lock().index[&key(1)].seg, seg.id);
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.blocks, r.unsealed_segments, r.skipped_records), (3, 1, 0), "{r:?}");
}

#[test]
fn a_throttled_batch_fails_every_block_and_counts_each() {
    let d = tempfile::tempdir().unwrap();
    let t = DiskConfig {
        io_buffers: 1,
        staging_wait_ms: 10,
        ..cfg(d.path())
    }
    .build()
    .unwrap();
    let data: Vec<Vec<u8>> = (0..3).map(|i| content(key(i), 5000)).collect();
    let items: Vec<_> = (0..3).map(|i| (NS, key(i), data[i as usize].as_slice())).collect();
    let held = t.inner.staging.acquire(Duration::ZERO).unwrap();
    let r = t.put_batch(&items);
    assert!(
        r.iter().all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::Throttled),
        "{r:?}"
    );
    assert_eq!(t.counters().rejected.load(Relaxed), 3);
    assert_eq!(
        t.inner.state.lock().segments.values().map(|m| m.writers).sum::<u32>(),
        0
    );
    drop(held);
    assert!(t.put_batch(&items).iter().all(|r| matches!(r, Ok(Stored::Inserted))));
    assert_holds(&t, &data);
}

fn assert_holds(t: &DiskTier, data: &[Vec<u8>]) {
    for (i, d) in data.iter().enumerate() {
        let mut out = vec![0u8; d.len()];
        assert_eq!(t.get(&key(i as u64), &mut out).unwrap(), Fetched::Hit);
        assert!(&out == d);
    }
}

#[test]
fn a_segment_with_a_torn_record_stays_unsealed_so_every_open_verifies_it() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..6);
    let loc = *t.inner.state.lock().index.get(&key(2)).unwrap();
    drop(t);
    let path = segment_files(d.path())[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; 8192], loc.off + u64::from(loc.data_offset) + 4096)
        .unwrap();
    f.write_all_at(&vec![0u8; 4096], (1 << 20) - PAGE).unwrap();
    drop(f);
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().skipped_records, 1);
    drop(t);
    // Sealing it on the first open would make this one index record 2 from
    // its header and answer a checksum error instead of a miss.
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.unsealed_segments, r.skipped_records, r.blocks), (1, 1, 5), "{r:?}");
    let mut out = vec![0u8; BLOCK];
    assert_eq!(t.get(&key(2), &mut out).unwrap(), Fetched::Miss);
    assert_intact(&t, 0..2);
    assert_intact(&t, 3..6);
}

/// A tier in `dir` whose file operations fail as `faults` plans.
fn faulty(dir: &Path, sync_writes: bool, faults: &Arc<Faults>) -> DiskTier {
    DiskTier::open_with(
        &DiskConfig {
            sync_writes,
            ..cfg(dir)
        },
        FileIo::with_faults(faults.clone()),
    )
    .unwrap()
}

/// The files of `dir` copied while a tier holds it open: what a killed
/// process leaves.
fn crash_copy(dir: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for f in segment_files(dir) {
        std::fs::copy(&f, to.path().join(f.file_name().unwrap())).unwrap();
    }
    to
}

#[test]
fn a_failed_write_is_not_acknowledged_and_leaves_the_tier_consistent() {
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), false, &faults);
    fill(&t, 0..3);
    faults.fail_nth(FileOp::Write, 1);
    let e = t.put(NS, key(3), &content(key(3), BLOCK)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(!t.contains(&key(3)), "a failed put is not visible");
    assert_eq!(t.counters().rejected.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The torn segment takes no more writes; the next put goes to a new one.
    t.put(NS, key(3), &content(key(3), BLOCK)).unwrap();
    fill(&t, 4..6);
    assert_intact(&t, 0..6);
    let crashed = crash_copy(d.path());
    drop(t);
    for dir in [crashed.path(), d.path()] {
        let t = cfg(dir).build().unwrap();
        let r = t.recovery();
        assert_eq!(r.skipped_records, 1, "the torn record is skipped: {r:?}");
        assert_intact(&t, 0..6);
    }
}

#[test]
fn a_failed_fsync_is_not_acknowledged_and_the_tier_reopens_whole() {
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), true, &faults);
    fill(&t, 0..3);
    faults.fail_nth(FileOp::Fsync, 1);
    assert!(t.put(NS, key(3), &content(key(3), BLOCK)).is_err());
    assert!(!t.contains(&key(3)));
    fill(&t, 4..6);
    let crashed = crash_copy(d.path());
    drop(t);
    let t = cfg(crashed.path()).build().unwrap();
    // The write itself completed: after a restart the block may be served,
    // but only whole.
    let mut out = vec![0u8; BLOCK];
    if t.get(&key(3), &mut out).unwrap() == Fetched::Hit {
        assert!(out == content(key(3), BLOCK));
    }
    assert_intact(&t, 0..3);
    assert_intact(&t, 4..6);
}

#[test]
fn a_failed_seal_leaves_a_segment_the_next_open_verifies() {
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), false, &faults);
    fill(&t, 0..4);
    // Dropping the tier seals the active segment: its one write fails.
    faults.fail_nth(FileOp::Write, 1);
    drop(t);
    assert_eq!(faults.injected(), 1);
    let t = cfg(d.path()).build().unwrap();
    let r = t.recovery();
    assert_eq!((r.unsealed_segments, r.skipped_records, r.blocks), (1, 0, 4), "{r:?}");
    assert_intact(&t, 0..4);
}

#[test]
fn a_failed_rename_while_recycling_makes_a_fresh_segment() {
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), false, &faults);
    // Fill the four segments exactly; the next block rolls into a recycled one.
    let per_segment = ((1u64 << 20) - 2 * PAGE) / (BLOCK as u64 + PAGE);
    fill(&t, 0..4 * per_segment);
    assert_eq!(t.recycled_segments(), 0);
    faults.fail_nth(FileOp::Rename, 1);
    let n = 4 * per_segment + 3;
    fill(&t, 4 * per_segment..n);
    assert_eq!(faults.injected(), 1, "a recycling rename was tried");
    assert_eq!(t.recycled_segments(), 0, "the failed rename recycled nothing");
    assert_eq!(segment_files(d.path()).len(), 4);
    // The blocks written after the failure are whole, here and after a restart.
    let recent = n - per_segment + 1..n;
    assert_intact(&t, recent.clone());
    drop(t);
    let t = cfg(d.path()).build().unwrap();
    assert_intact(&t, recent);
}

#[test]
fn removing_a_block_whose_write_failed_keeps_it_from_coming_back() {
    // An fsync fault fails the put after its bytes reached the file whole:
    // the next open would index them. A removal the caller saw succeed
    // elsewhere (the host tier held the block) must shadow that record.
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), true, &faults);
    fill(&t, 0..3);
    faults.fail_nth(FileOp::Fsync, 1);
    assert!(t.put(NS, key(3), &content(key(3), BLOCK)).is_err());
    assert!(!t.remove(&key(3)).unwrap(), "the tier did not hold it");
    // A key never written gets no tombstone and no error.
    assert!(!t.remove(&key(9)).unwrap());
    let crashed = crash_copy(d.path());
    drop(t);
    let t = cfg(crashed.path()).build().unwrap();
    let mut out = vec![0u8; BLOCK];
    assert_eq!(
        t.get(&key(3), &mut out).unwrap(),
        Fetched::Miss,
        "the removed block came back"
    );
    assert_intact(&t, 0..3);
}

#[test]
fn a_failed_write_stops_shadowing_once_its_segment_is_reclaimed() {
    let d = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let t = faulty(d.path(), true, &faults);
    // The first put makes the segment (and syncs it): fault the record.
    fill(&t, 0..1);
    faults.fail_nth(FileOp::Fsync, 1);
    assert!(t.put(NS, key(3), &content(key(3), BLOCK)).is_err());
    assert_eq!(t.inner.state.lock().stray.len(), 1);
    // Writing until the failed segment is reclaimed drops its entry.
    let mut i = 100;
    while t.inner.state.lock().stray.contains_key(&key(3)) {
        fill(&t, i..i + 1);
        i += 1;
        assert!(i < 10_000, "the failed segment was never reclaimed");
    }
    assert!(t.inner.state.lock().stray.is_empty());
}

#[test]
fn a_corrupt_copy_rewritten_is_served_and_wins_over_the_bad_record_on_reopen() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..4);
    let loc = *t.inner.state.lock().index.get(&key(1)).unwrap();
    flip(&segment_files(d.path())[0], loc.off + u64::from(loc.data_offset) + 9);
    let mut out = vec![0u8; BLOCK];
    assert_eq!(
        t.get(&key(1), &mut out).unwrap_err().kind(),
        ErrorKind::ChecksumMismatch
    );
    // Read repair: the good copy is written again, as a new record.
    assert_eq!(t.put(NS, key(1), &content(key(1), BLOCK)).unwrap(), Stored::Inserted);
    assert_intact(&t, 0..4);
    drop(t);
    // The bad record is still on the file, before the new one: the newer wins.
    let t = cfg(d.path()).build().unwrap();
    assert_intact(&t, 0..4);
    assert_eq!(t.counters().corrupt.load(Relaxed), 0);
}

#[test]
fn blocks_after_walks_the_disk_in_order_and_pages() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    // 64 KiB blocks, 1 MiB segments: several segments.
    fill(&t, 0..40);
    t.remove(&key(5)).unwrap();
    let all = t.blocks_after(None, usize::MAX);
    assert_eq!(all.len(), 39);
    assert!(all.windows(2).all(|w| w[0].place < w[1].place), "disk order");
    assert!(all.iter().all(|b| b.ns == NS && b.len == BLOCK as u64));
    assert!(!all.iter().any(|b| b.key == key(5)), "removed blocks are not walked");
    assert!(all.iter().map(|b| b.place.segment).collect::<HashSet<_>>().len() > 1);
    // Paging from the last place seen reaches every block once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = t.blocks_after(after, 7);
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = Some(last.place);
        seen.extend(page.iter().map(|b| b.key));
    }
    assert_eq!(seen, all.iter().map(|b| b.key).collect::<Vec<_>>());
    assert!(t.blocks_after(all.last().map(|b| b.place), 10).is_empty());
}

#[test]
fn seal_active_seals_while_a_clone_lives_and_later_writes_roll() {
    let d = tempfile::tempdir().unwrap();
    let t = cfg(d.path()).build().unwrap();
    fill(&t, 0..3);
    let keep = t.clone();
    t.seal_active();
    let path = segment_files(d.path())[0].clone();
    let f = std::fs::File::open(&path).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut page, (1u64 << 20) - PAGE).unwrap();
    let seal = record::Seal::decode(&page).expect("the active segment is sealed");
    assert_eq!(seal.records, 3);
    // A write after it goes to a new segment; everything reads back.
    fill(&keep, 3..4);
    assert_eq!(segment_files(d.path()).len(), 2);
    assert_intact(&keep, 0..4);
    drop((t, keep));
    let t = cfg(d.path()).build().unwrap();
    assert_eq!(t.recovery().unsealed_segments, 0, "{:?}", t.recovery());
    assert_intact(&t, 0..4);
}
