//! What every bench shares: deterministic data, the bench namespace and
//! keys, figures (GB/s, medians, percentiles, rounding, ratios), scratch
//! directories, and the invariants a `--smoke` run checks on its own output.
//!
//! Data buffers are `kvtier::AlignedBuf`: page-aligned and touched, like an
//! engine's pinned staging buffers.

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::{BlockKey, ErrorKind, Namespace, NamespaceId, Result};
use serde_json::{Value, json};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

/// A xorshift64 stream: the benches' one source of deterministic data,
/// orders and shuffles. The same seed gives the same stream in every run.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// xorshift64 never leaves 0: the seed's low bit is set.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A uniform draw in [0, 1) from the top 53 bits of the next word.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

impl Iterator for XorShift {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        Some(self.next_u64())
    }
}

/// A well-mixed 64-bit hash (splitmix64's finaliser): neighbouring inputs
/// give unrelated outputs, so it turns ids into seeds.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `b` with the stream of `seed`, 8 bytes a word (a tail shorter
/// than 8 bytes is left as it is): bytes that differ per block and per round.
pub(crate) fn fill(b: &mut [u8], seed: u64) {
    for (c, w) in b.chunks_exact_mut(8).zip(XorShift::new(seed)) {
        c.copy_from_slice(&w.to_le_bytes());
    }
}

/// Whether `b` holds what `fill(b, seed)` writes.
pub(crate) fn is_filled(b: &[u8], seed: u64) -> bool {
    b.chunks_exact(8)
        .zip(XorShift::new(seed))
        .all(|(c, w)| c == w.to_le_bytes())
}

/// A namespace whose blocks are `bytes` long (bytes a multiple of 64).
pub(crate) fn namespace(model: &str, bytes: usize) -> Namespace {
    // 1 layer, K and V, 1 head, f16: 4 bytes per token-dim.
    let head_dim = 16u32;
    Namespace::new(
        model,
        KvLayout {
            num_layers: 1,
            kv_heads: 1,
            head_dim,
            block_tokens: (bytes / (4 * head_dim as usize)) as u32,
            kind: KvKind::Kv,
            dtype: Dtype::F16,
        },
    )
}

/// Block `i` of request (or round) `round`.
pub(crate) fn key(ns: NamespaceId, round: usize, i: usize) -> BlockKey {
    BlockKey::from_opaque(ns, &[(round as u64).to_le_bytes(), (i as u64).to_le_bytes()].concat())
}

/// An `Io` error: what a bench answers for a failed step of its own.
pub(crate) fn io_err(msg: impl Into<String>) -> kvtier::Error {
    kvtier::Error::new(ErrorKind::Io, msg)
}

pub(crate) fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

/// The `p`th percentile (nearest rank) of `v`; 0 when empty.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// `value / reference` to 3 places, or null when the reference is not
/// above 0 (nothing measured to compare with).
pub(crate) fn ratio(value: f64, reference: f64) -> Value {
    if reference > 0.0 {
        json!(round3(value / reference))
    } else {
        Value::Null
    }
}

/// GB/s of copying `src` into `dst` in `block`-byte chunks: the memcpy
/// reference.
pub(crate) fn memcpy_round(src: &[u8], dst: &mut [u8], block: usize) -> f64 {
    let t = Instant::now();
    for (s, d) in src.chunks_exact(block).zip(dst.chunks_exact_mut(block)) {
        d.copy_from_slice(s);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    gbps(src.len(), secs)
}

/// The fields of `/proc/<pid>/stat` (or `/proc/self/stat` with `None`)
/// from field 3 (state) on; `None` when it cannot be read.
fn proc_stat(pid: Option<i32>) -> Option<Vec<String>> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // from the last ')', which ends it.
    Some(
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// Field `n` (1-based, as proc(5) numbers them, 3 or more) of a process's stat.
fn stat_field(fields: &[String], n: usize) -> Option<u64> {
    fields.get(n - 3)?.parse().ok()
}

/// CPU seconds (user and system, every thread) process `pid` has used so
/// far, or this process with `None`; `None` when it cannot be read.
pub(crate) fn cpu_seconds(pid: Option<i32>) -> Option<f64> {
    let f = proc_stat(pid)?;
    let (utime, stime) = (stat_field(&f, 14)?, stat_field(&f, 15)?);
    // SAFETY: sysconf(3) only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) as f64 / hz as f64)
}

/// Minor page faults (every thread) process `pid` has taken so far, or
/// this process with `None`: each is a page touched for the first time
/// (fresh memory), so their count shows buffers that are not reused.
pub(crate) fn minor_faults(pid: Option<i32>) -> Option<u64> {
    stat_field(&proc_stat(pid)?, 10)
}

/// `dir`, emptied (or made).
pub(crate) fn fresh_dir(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| kvtier::Error::io(format!("create {}", dir.display()), e))
}

/// Whether `dir` takes O_DIRECT files (tmpfs does not).
pub(crate) fn direct_io_works(dir: &Path) -> bool {
    let p = dir.join("direct-io-probe");
    let ok = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// Prints a bench's result, then checks it with `check` (a smoke run's
/// invariants), if given: a broken one fails the run after the JSON is out.
pub(crate) fn report(out: &Value, one_line: bool, check: Option<fn(&Value) -> Result<()>>) -> Result<()> {
    crate::print_json(out, one_line);
    check.map_or(Ok(()), |check| check(out))
}

/// The invariants a bench's `--smoke` run (or `replay --check`) checks on
/// the JSON it printed, as CI relies on them: the first broken one is an
/// `Internal` error that names it and shows the values.
pub(crate) struct Invariants<'a> {
    run: &'static str,
    v: &'a Value,
}

impl<'a> Invariants<'a> {
    pub(crate) fn of(run: &'static str, v: &'a Value) -> Self {
        Self { run, v }
    }

    /// The value at JSON pointer `at` (`/fanout/r1/blob_put_requests`).
    pub(crate) fn get(&self, at: &str) -> Result<&'a Value> {
        self.v
            .pointer(at)
            .ok_or_else(|| self.broken(format!("{at} is missing")))
    }

    /// An unsigned integer at `at`.
    pub(crate) fn u(&self, at: &str) -> Result<u64> {
        let v = self.get(at)?;
        v.as_u64()
            .ok_or_else(|| self.broken(format!("{at} is {v}, not an unsigned integer")))
    }

    /// A number at `at`.
    pub(crate) fn f(&self, at: &str) -> Result<f64> {
        let v = self.get(at)?;
        v.as_f64()
            .ok_or_else(|| self.broken(format!("{at} is {v}, not a number")))
    }

    /// `Ok` when `holds`; else the error naming `invariant` (say what must
    /// hold, with the values seen).
    pub(crate) fn ensure(&self, holds: bool, invariant: impl FnOnce() -> String) -> Result<()> {
        if holds { Ok(()) } else { Err(self.broken(invariant())) }
    }

    /// The error of a broken invariant, `what` saying which.
    pub(crate) fn broken(&self, what: String) -> kvtier::Error {
        kvtier::Error::new(ErrorKind::Internal, format!("{}: broken invariant: {what}", self.run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_xorshift64_and_fill_writes_it() {
        let mut x = XorShift::new(0);
        // 1 << 13 ^ 1 = 8193; >> 7 adds 64; << 17 adds 8257 << 17.
        let first = x.next_u64();
        assert_eq!(first, 1082269761);
        let mut b = vec![0u8; 20];
        fill(&mut b, 0);
        assert_eq!(b[..8], first.to_le_bytes());
        assert_eq!(b[16..], [0; 4], "a tail shorter than a word is left alone");
        assert!(is_filled(&b, 0));
        assert!(!is_filled(&b, 2));
        let u = XorShift::new(5).unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn cpu_seconds_grow_with_work() {
        let before = cpu_seconds(None).expect("/proc/self/stat");
        // Spin until the count moves: a loaded machine only delays it.
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        let mut now = before;
        while now < before + 0.02 && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            now = cpu_seconds(None).unwrap();
        }
        assert!(now >= before + 0.02, "{before} -> {now}");
        assert!(cpu_seconds(Some(std::process::id() as i32)).unwrap() >= now);
        assert_eq!(cpu_seconds(Some(i32::MAX)), None);
    }

    #[test]
    fn minor_faults_count_fresh_pages() {
        let before = minor_faults(None).expect("/proc/self/stat");
        // 64 MiB of fresh pages, each touched once: a fault per page at
        // least (fewer with huge pages, so only some are asked for).
        let len = 64 << 20;
        // SAFETY: an anonymous private mapping, checked before use and
        // unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len, inside the mapping.
            unsafe { p.cast::<u8>().add(off).write_volatile(1) };
        }
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
        let after = minor_faults(None).unwrap();
        assert!(after >= before + 16, "{before} -> {after}");
        assert_eq!(minor_faults(Some(i32::MAX)), None);
    }

    #[test]
    fn median_takes_the_middle_of_the_rounds() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
        assert_eq!(percentile(&mut [], 99.0), 0.0);
    }

    #[test]
    fn bench_namespace_has_the_block_size_asked_for() {
        for bytes in [64, 4096, 2 << 20] {
            let ns = namespace("x", bytes);
            ns.validate().unwrap();
            assert_eq!(ns.block_bytes(), bytes as u64);
        }
    }

    #[test]
    fn a_broken_invariant_is_an_internal_error_that_names_it() {
        let v = json!({"a": {"b": 3}, "c": 1.5});
        let c = Invariants::of("x --smoke", &v);
        assert_eq!(c.u("/a/b").unwrap(), 3);
        assert_eq!(c.f("/c").unwrap(), 1.5);
        assert!(c.ensure(true, || unreachable!()).is_ok());
        let e = c.ensure(false, || "b is 4: b 3".into()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(
            e.to_string().contains("x --smoke: broken invariant: b is 4: b 3"),
            "{e}"
        );
        assert!(
            c.u("/c")
                .unwrap_err()
                .to_string()
                .contains("/c is 1.5, not an unsigned integer")
        );
        assert!(c.u("/d").unwrap_err().to_string().contains("/d is missing"));
    }
}
