//! `kvtier-bench connector`: the vLLM connector through vLLM's real
//! scheduler on CPU, embedded and against a real kvtierd, each figure next
//! to a memcpy of the same bytes timed right before it.
//!
//! The engine half is `bench/connector_bench.py`, run with the project
//! venv's interpreter (vLLM and the kvtier wheel installed): it drives the
//! test harness's scheduler and fake model runner, verifies every loaded
//! block against the KV the saving engine wrote (a wrong byte fails the
//! run), and prints raw seconds and bytes; this side starts the daemon,
//! turns them into figures and checks them against the goals.

use serde_json::{Value, json};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::daemon::start_daemon;
use crate::python::default_python;
use crate::util::{Invariants, fresh_dir, io_err as err, median, report, round3};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Python with vLLM and the kvtier package (default: the project venv
    /// made by scripts/python-env.sh).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Directory for the daemon's data.
    #[arg(long, default_value = "target/bench-connector")]
    dir: PathBuf,
    /// Model layers (with the heads and head size, sets the block size).
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head size.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Requests per round, each with its own prompt.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Full blocks of 16 tokens per prompt (and per lookup).
    #[arg(long, default_value_t = 64)]
    prefix_blocks: usize,
    /// Rounds (the saving engine, then the loading one); figures are
    /// medians over the rounds after the first, which warms the engines.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Scheduler lookups timed for the percentiles (at most 10 s of them).
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run with a small model, for CI: checks invariants,
    /// not goals.
    #[arg(long)]
    smoke: bool,
}

/// Tokens per vLLM block in the bench's engine.
const BLOCK_TOKENS: usize = 16;
/// The step's save stall, per byte, against a memcpy of the same bytes.
const SAVE_STALL_RATIO_MAX: f64 = 1.5;
/// Embedded load and save GB/s against memcpy.
const VS_MEMCPY_MIN: f64 = 0.8;
const MODES: [&str; 2] = ["embedded", "daemon"];

struct Shape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    requests: usize,
    prefix_blocks: usize,
    rounds: usize,
    lookups: usize,
}

impl Shape {
    fn of(a: &Args) -> Self {
        if a.smoke {
            // 16 KiB blocks: the whole run moves a few MiB.
            return Self {
                layers: 2,
                kv_heads: 2,
                head_dim: 64,
                requests: 2,
                prefix_blocks: 64,
                rounds: 1,
                lookups: 200,
            };
        }
        Self {
            layers: a.layers.max(1),
            kv_heads: a.kv_heads.max(1),
            head_dim: a.head_dim.max(1),
            requests: a.requests.max(1),
            prefix_blocks: a.prefix_blocks.max(1),
            rounds: a.rounds.max(1),
            lookups: a.lookups.max(1),
        }
    }

    /// One vLLM block across all layers, K and V, f16.
    fn block_bytes(&self) -> u64 {
        (self.layers * BLOCK_TOKENS * self.kv_heads * 2 * self.head_dim * 2) as u64
    }

    fn round_bytes(&self) -> u64 {
        (self.requests * self.prefix_blocks) as u64 * self.block_bytes()
    }
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    let s = Shape::of(a);
    // Every round's blocks stay in the daemon's host RAM until loaded.
    let host_bytes = s.rounds as u64 * s.round_bytes() + (64 << 20);
    fresh_dir(&a.dir)?;
    let daemon = start_daemon(
        &a.dir.join("kvtierd"),
        &[
            ("KVTIER_MODE", "tiered".into()),
            ("KVTIER_HOST_CAPACITY_BYTES", host_bytes.to_string()),
            ("KVTIER_DISK_CAPACITY_BYTES", (2 * host_bytes).max(1 << 30).to_string()),
        ],
    )?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connector_bench.py");
    let python = a.python.clone().unwrap_or_else(default_python);
    let num = |n: usize| n.to_string();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["--endpoint", &daemon.endpoint()])
        .args(["--layers", &num(s.layers), "--kv-heads", &num(s.kv_heads)])
        .args(["--head-dim", &num(s.head_dim), "--requests", &num(s.requests)])
        .args(["--prefix-blocks", &num(s.prefix_blocks), "--rounds", &num(s.rounds)])
        .args(["--lookups", &num(s.lookups)]);
    let limit = Duration::from_secs(if a.smoke { 300 } else { 1800 });
    let (status, stdout, stderr) = run_bounded(cmd, limit)?;
    drop(daemon);
    if !status.success() {
        // The script's verdict (a broken invariant, a traceback) ends it.
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(err(format!(
            "{} {} failed ({status}):\n{tail}",
            python.display(),
            script.display(),
        )));
    }
    // The JSON is the last line; anything before it is the engine's chatter.
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let raw: Value = serde_json::from_str(last).map_err(|e| err(format!("connector_bench.py output: {e}")))?;
    let v = figures(&raw, a.smoke, &python)?;
    report(&v, a.json, a.smoke.then_some(check_smoke))
}

/// Runs `cmd` to completion, killed after `limit`; its status, stdout and
/// stderr (through files, so a chatty child never blocks on a full pipe).
pub(crate) fn run_bounded(mut cmd: Command, limit: Duration) -> kvtier::Result<(ExitStatus, String, String)> {
    let io = |what: &str, e: std::io::Error| err(format!("{what}: {e}"));
    let (mut out, mut errs) = (
        tempfile::tempfile().map_err(|e| io("stdout file", e))?,
        tempfile::tempfile().map_err(|e| io("stderr file", e))?,
    );
    let mut child = cmd
        .stdout(out.try_clone().map_err(|e| io("stdout file", e))?)
        .stderr(errs.try_clone().map_err(|e| io("stderr file", e))?)
        .spawn()
        .map_err(|e| io(&format!("run {:?}", cmd.get_program()), e))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| io("wait", e))? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!("{:?} ran past {} s", cmd.get_program(), limit.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |f: &mut std::fs::File, what: &str| -> kvtier::Result<String> {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).map_err(|e| io(what, e))?;
        f.read_to_string(&mut s).map_err(|e| io(what, e))?;
        Ok(s)
    };
    Ok((status, read(&mut out, "stdout")?, read(&mut errs, "stderr")?))
}

/// Seconds and bytes of the calls of one kind in one round, as the script
/// reports them, with both references for the same bytes.
struct Moved {
    bytes: f64,
    seconds: f64,
    memcpy_seconds: f64,
    gather_seconds: f64,
}

impl Moved {
    fn of(v: &Value) -> kvtier::Result<Self> {
        let f = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| err(format!("connector_bench.py output: {k} missing")))
        };
        Ok(Self {
            bytes: f("bytes")?,
            seconds: f("seconds")?,
            memcpy_seconds: f("memcpy_seconds")?,
            gather_seconds: f("gather_copy_seconds")?,
        })
    }

    fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }

    fn memcpy_gbps(&self) -> f64 {
        self.bytes / self.memcpy_seconds / 1e9
    }
}

/// Per-round values of one figure, and their median over the counted
/// rounds.
#[derive(Default)]
struct Series {
    all: Vec<f64>,
}

impl Series {
    fn push(&mut self, x: f64) {
        self.all.push(x);
    }

    /// The median over the rounds after the warm-up ones (all of them when
    /// there are no more).
    fn figure(&self, warmup: usize) -> f64 {
        let counted = if self.all.len() > warmup {
            &self.all[warmup..]
        } else {
            &self.all[..]
        };
        if counted.is_empty() {
            f64::NAN
        } else {
            round3(median(counted.to_vec()))
        }
    }

    fn rounded(&self) -> Vec<f64> {
        self.all.iter().map(|x| round3(*x)).collect()
    }
}

/// The figures of one mode from the script's rounds: each the median over
/// the counted rounds of the round's value, ratios taken within a round.
/// Returns them and the counted rounds' memcpy GB/s.
fn mode_figures(m: &Value, block_bytes: u64, warmup: usize) -> kvtier::Result<(Value, Vec<f64>)> {
    let rounds = m["rounds"]
        .as_array()
        .ok_or_else(|| err("connector_bench.py output: no rounds"))?;
    let mut f: std::collections::BTreeMap<&str, Series> = Default::default();
    // The counted rounds' memcpy samples, for the run's reference figure.
    let mut memcpy = vec![];
    let (mut saved, mut loaded, mut verified, mut stored_blocks, mut skipped) = (0.0, 0.0, 0, 0, 0);
    for (i, r) in rounds.iter().enumerate() {
        let (s, l) = (Moved::of(&r["save"])?, Moved::of(&r["load"])?);
        let mut put = |k, x| f.entry(k).or_default().push(x);
        // Per byte against per byte: the same bytes on both sides.
        put("save_stall_ratio", s.seconds / s.memcpy_seconds);
        put("save_gbps", s.gbps());
        put("save_vs_memcpy", s.memcpy_seconds / s.seconds);
        put("load_gbps", l.gbps());
        put("load_vs_memcpy", l.memcpy_seconds / l.seconds);
        put("memcpy_gbps", median(vec![s.memcpy_gbps(), l.memcpy_gbps()]));
        // Apart too: a step's bytes decide the memcpy (glibc streams the
        // stores of a copy larger than its non-temporal threshold).
        put("memcpy_save_gbps", s.memcpy_gbps());
        put("memcpy_load_gbps", l.memcpy_gbps());
        put("save_vs_gather_copy", s.gather_seconds / s.seconds);
        put("load_vs_gather_copy", l.gather_seconds / l.seconds);
        put("gather_copy_save_vs_memcpy", s.memcpy_seconds / s.gather_seconds);
        put("gather_copy_load_vs_memcpy", l.memcpy_seconds / l.gather_seconds);
        put("steps_s", r["save"]["steps_seconds"].as_f64().unwrap_or(f64::NAN));
        put(
            "store_behind_steps_s",
            r["save"]["flush_seconds"].as_f64().unwrap_or(f64::NAN),
        );
        if i >= warmup || rounds.len() <= warmup {
            memcpy.extend([s.memcpy_gbps(), l.memcpy_gbps()]);
        }
        saved += s.bytes;
        loaded += l.bytes;
        verified += r["load"]["verified_blocks"].as_u64().unwrap_or(0);
        stored_blocks += r["save"]["saved_blocks"].as_u64().unwrap_or(0);
        skipped += r["save"]["skipped_in_flight_blocks"].as_u64().unwrap_or(0)
            + r["save"]["skipped_store_blocks"].as_u64().unwrap_or(0);
    }
    let lk = &m["lookup"];
    let us = |k: &str| round3(lk[k].as_f64().unwrap_or(f64::NAN));
    let mut v = json!({
        "scheduler_lookup_us_p99": us("p99_us"),
        "scheduler_lookup_us_p50": us("p50_us"),
        "store_lookup_us_p99": us("store_p99_us"),
        "store_lookup_us_p50": us("store_p50_us"),
        "lookup_prefix_blocks": lk["prefix_blocks"],
        "lookups": lk["count"],
        "bytes_saved": saved as u64,
        "bytes_loaded": loaded as u64,
        "blocks_stored": stored_blocks,
        "blocks_skipped": skipped,
        "blocks_verified": verified,
        "bytes_verified": verified * block_bytes,
    });
    let mut per_round = json!({
        "save_calls_s_memcpy_s_bytes_gather_s": rounds.iter().map(|r| r["save"]["calls"].clone()).collect::<Vec<_>>(),
        "load_calls_s_memcpy_s_bytes_gather_s": rounds.iter().map(|r| r["load"]["calls"].clone()).collect::<Vec<_>>(),
    });
    for (k, series) in &f {
        v[*k] = json!(series.figure(warmup));
        per_round[*k] = json!(series.rounded());
    }
    v["per_round"] = per_round;
    Ok((v, memcpy))
}

fn figures(raw: &Value, smoke: bool, python: &std::path::Path) -> kvtier::Result<Value> {
    let block_bytes = raw["model"]["block_bytes"]
        .as_u64()
        .ok_or_else(|| err("connector_bench.py output: no block_bytes"))?;
    let rounds = raw["rounds"].as_u64().unwrap_or(1) as usize;
    // The first round warms the engines (staging first touched, caches).
    let warmup = usize::from(rounds > 1);
    let mut out = json!({
        "bench": "connector",
        "smoke": smoke,
        "python": python.display().to_string(),
        "vllm": raw["vllm"],
        "kvtier_vllm": raw["kvtier_vllm"],
        "engine": "vLLM's real Scheduler with the test harness's model runner on CPU (connectors/vllm/tests/vllm_harness.py); load_mode sync",
        "model": raw["model"],
        "requests_per_round": raw["requests"],
        "prefix_blocks": raw["prefix_blocks"],
        "rounds": raw["rounds"],
        "warmup_rounds": warmup,
        "daemon_store": "kvtierd on 127.0.0.1, tiered, every round's blocks in host RAM",
        "how": {
            "figures": "per mode, the median over the rounds after the warm-up ones of each round's value; per_round has every round",
            "save_stall_ratio": "time the step spends in wait_for_save, per saved byte, over one memcpy (np.copyto) of the same bytes timed right before the call",
            "save_gbps": "saved bytes / time in wait_for_save",
            "load_gbps": "loaded bytes / time in start_load_kv (sync loads, before the forward)",
            "x_vs_memcpy": "memcpy seconds / connector seconds for the same bytes",
            "x_vs_gather_copy": "the connector's own block copy (_copy_blocks, the same blocks between the KV tensors and a touched buffer, timed right after the call) over the call: what the store adds to the copy",
            "gather_copy_x_vs_memcpy": "memcpy over that block copy: what copying block by block costs against one memcpy",
            "scheduler_lookup_us": "get_num_new_matched_tokens for a present prefix of lookup_prefix_blocks blocks; store_lookup_us: the store's lookup of the same keys",
            "store_behind_steps_s": "time the background store took to finish after the round's last step",
        },
    });
    let mut all_memcpy = vec![];
    let mut unmet = vec![];
    for mode in MODES {
        let (v, memcpy) = mode_figures(&raw[mode], block_bytes, warmup)?;
        all_memcpy.extend(memcpy);
        let stall = v["save_stall_ratio"].as_f64().unwrap_or(f64::NAN);
        // False for a NaN too: a figure not measured is a goal not met.
        let stall_met = stall <= SAVE_STALL_RATIO_MAX;
        if !stall_met {
            unmet.push(format!("{mode} save_stall_ratio {stall} > {SAVE_STALL_RATIO_MAX}"));
        }
        if mode == "embedded" {
            for k in ["save_vs_memcpy", "load_vs_memcpy"] {
                let x = v[k].as_f64().unwrap_or(f64::NAN);
                let x_met = x >= VS_MEMCPY_MIN;
                if !x_met {
                    unmet.push(format!("{mode} {k} {x} < {VS_MEMCPY_MIN}"));
                }
            }
        }
        out[mode] = v;
    }
    out["memcpy_gbps"] = json!(round3(median(all_memcpy)));
    out["goals"] = json!({
        "save_stall_ratio_max": SAVE_STALL_RATIO_MAX,
        "load_save_vs_memcpy_min": VS_MEMCPY_MIN,
        "load_save_vs_memcpy_applies_to": "embedded",
        "met": unmet.is_empty(),
        "unmet": unmet,
    });
    Ok(out)
}

/// What CI holds a smoke run to: in both modes every saved byte loaded
/// back and verified, nothing skipped, and every figure finite and above 0.
fn check_smoke(v: &Value) -> kvtier::Result<()> {
    let c = Invariants::of("connector --smoke", v);
    let m = c.f("/memcpy_gbps")?;
    c.ensure(m.is_finite() && m > 0.0, || format!("memcpy_gbps {m} finite and > 0"))?;
    for mode in MODES {
        let (saved, loaded) = (
            c.u(&format!("/{mode}/bytes_saved"))?,
            c.u(&format!("/{mode}/bytes_loaded"))?,
        );
        c.ensure(saved > 0 && loaded == saved, || {
            format!("{mode}/bytes_loaded {loaded} == {mode}/bytes_saved {saved} > 0")
        })?;
        let verified = c.u(&format!("/{mode}/bytes_verified"))?;
        c.ensure(verified == loaded, || {
            format!("{mode}/bytes_verified {verified} == {mode}/bytes_loaded {loaded}")
        })?;
        let skipped = c.u(&format!("/{mode}/blocks_skipped"))?;
        c.ensure(skipped == 0, || format!("{mode}/blocks_skipped {skipped} == 0"))?;
        for k in [
            "save_stall_ratio",
            "save_gbps",
            "save_vs_memcpy",
            "load_gbps",
            "load_vs_memcpy",
            "memcpy_gbps",
            "scheduler_lookup_us_p99",
            "store_lookup_us_p99",
            "save_vs_gather_copy",
            "load_vs_gather_copy",
        ] {
            let x = c.f(&format!("/{mode}/{k}"))?;
            c.ensure(x.is_finite() && x > 0.0, || format!("{mode}/{k} {x} finite and > 0"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(load_bytes: u64) -> Value {
        let round = json!({
            "save": {"bytes": 1024, "seconds": 2e-6, "memcpy_seconds": 1e-6, "gather_copy_seconds": 1e-6, "calls": [],
                     "saved_blocks": 1, "skipped_in_flight_blocks": 0, "skipped_store_blocks": 0,
                     "flush_seconds": 0.0, "steps_seconds": 0.1},
            "load": {"bytes": load_bytes, "seconds": 1e-6, "memcpy_seconds": 1e-6, "gather_copy_seconds": 1e-6, "calls": [],
                     "verified_blocks": load_bytes / 1024},
        });
        let lookup = json!({"prefix_blocks": 64, "count": 10, "p50_us": 5.0, "p99_us": 9.0,
                            "store_p50_us": 2.0, "store_p99_us": 3.0});
        json!({
            "vllm": "x", "kvtier_vllm": "y", "requests": 1, "prefix_blocks": 1, "rounds": 1,
            "model": {"block_bytes": 1024},
            "embedded": {"rounds": [round.clone()], "lookup": lookup.clone()},
            "daemon": {"rounds": [round], "lookup": lookup},
        })
    }

    #[test]
    fn a_stall_of_two_copies_is_reported_unmet_and_the_run_is_whole() {
        let v = figures(&raw(1024), true, std::path::Path::new("python3")).unwrap();
        assert_eq!(v["embedded"]["save_stall_ratio"], 2.0);
        assert_eq!(v["embedded"]["save_vs_memcpy"], 0.5);
        assert_eq!(v["goals"]["met"], false);
        let unmet = v["goals"]["unmet"].as_array().unwrap();
        assert_eq!(unmet.len(), 3, "{unmet:?}: stall in both modes, embedded save GB/s");
        check_smoke(&v).unwrap();
    }

    #[test]
    fn bytes_loaded_short_of_bytes_saved_break_the_smoke_run() {
        let v = figures(&raw(0), true, std::path::Path::new("python3")).unwrap();
        let e = check_smoke(&v).unwrap_err();
        assert_eq!(e.kind(), kvtier::ErrorKind::Internal);
        assert!(
            e.to_string()
                .contains("embedded/bytes_loaded 0 == embedded/bytes_saved 1024"),
            "{e}"
        );
    }
}
