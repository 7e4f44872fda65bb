//! `kvtier-bench routing`: does NVIDIA Dynamo's KV-aware router route
//! better when it sees kvtier's tiers?
//!
//! A Mooncake-format trace is replayed over N simulated engines, each with
//! a GPU prefix cache and its own kvtier host and SSD tiers (the real
//! embedded store; sizes as in `replay --sweep`'s tiering study), routed by
//! Dynamo's real `KvRouter` from the ai-dynamo-runtime wheel, twice in one
//! run: the router seeing GPU events only, then kvtier's tier events too.
//! The engine half is `bench/routing_bench.py`, run in the Dynamo venv
//! (scripts/dynamo-env.sh) inside a network namespace with only `lo` up
//! (`unshare --net`): Dynamo's event plane binds the machine's address.
//!
//! Beside the two hit rates this side computes the reference no routing can
//! beat, in the same run: one cache holding every block ever seen (every
//! engine's caches only hold blocks seen before), and so the largest ratio
//! any router could show over the GPU-only run.

use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::connector::run_bounded;
use crate::trace::{self, Request};
use crate::util::{Invariants, io_err as err, report, round3};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Mooncake-format trace (JSON lines).
    #[arg(long, default_value = "bench/traces/conversation_trace.jsonl")]
    trace: PathBuf,
    /// Simulated engines.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Requests replayed (from the start of the trace).
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// Requests counted as running at once (the router balances load over
    /// them, as in production).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The router's weight of a host-tier hit (Dynamo's
    /// --router-host-cache-hit-weight; its default).
    #[arg(long, default_value_t = 0.75)]
    host_weight: f64,
    /// The router's weight of a disk-tier hit (Dynamo's
    /// --router-disk-cache-hit-weight; its default).
    #[arg(long, default_value_t = 0.25)]
    disk_weight: f64,
    /// Python with vLLM 0.31.0, ai-dynamo-runtime 1.6.1 and kvtier
    /// (default: the venv scripts/dynamo-env.sh makes).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A short run with small caches, for CI: checks invariants, not goals.
    #[arg(long)]
    smoke: bool,
}

/// Tier-aware against GPU-only token hit rate.
const GOAL_RATIO: f64 = 2.0;
/// Trace block size (the Mooncake traces' 512 tokens).
const BLOCK_TOKENS: u64 = 512;
/// Per engine, as the tiering study: 40 GiB of GPU KV, 512 GiB of host RAM
/// and 4 TiB of SSD for Llama-3-8B in fp16 (64 MiB per 512-token block).
const GPU_BLOCKS: usize = 640;
const HOST_BLOCKS: usize = 8192;
const DISK_BLOCKS: usize = 65536;

fn dynamo_python() -> PathBuf {
    if let Some(v) = std::env::var_os("KVTIER_DYNAMO_VENV") {
        return PathBuf::from(v).join("bin/python");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/kvtier/venv-vllm-0.31.0/bin/python")
}

/// The token hit rate of one cache holding every block seen before: the
/// most any routing over any engines' caches reaches.
fn oracle_hit_rate(reqs: &[Request]) -> f64 {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    for r in reqs {
        let full = ((r.input_length / BLOCK_TOKENS) as usize).min(r.hash_ids.len());
        let ids = &r.hash_ids[..full];
        let g = ids.iter().take_while(|id| seen.contains(*id)).count();
        hit += r.hit_tokens(g);
        total += r.input_length;
        seen.extend(ids.iter().copied());
    }
    hit as f64 / total.max(1) as f64
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    for (name, w) in [("--host-weight", a.host_weight), ("--disk-weight", a.disk_weight)] {
        if !(w.is_finite() && (0.0..=1.0).contains(&w)) {
            return Err(crate::fail(
                kvtier::ErrorKind::InvalidArgument,
                format!("{name} {w}: a weight between 0 and 1"),
            ));
        }
    }
    if a.workers < 2 {
        return Err(crate::fail(
            kvtier::ErrorKind::InvalidArgument,
            format!("--workers {}: routing needs at least 2 engines", a.workers),
        ));
    }
    let (requests, gpu, host, disk) = if a.smoke {
        (300, 64, 256, 1024)
    } else {
        (a.requests, GPU_BLOCKS, HOST_BLOCKS, DISK_BLOCKS)
    };
    let reqs = trace::load(&a.trace)?;
    let reqs = &reqs[..requests.min(reqs.len())];
    let python = a.python.clone().unwrap_or_else(dynamo_python);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("routing_bench.py");
    let num = |n: usize| n.to_string();
    let mut cmd = Command::new("unshare");
    cmd.arg("--net")
        .arg(&python)
        .arg(&script)
        .arg("--netns")
        .arg("--trace")
        .arg(&a.trace)
        .args(["--workers", &num(a.workers), "--requests", &num(reqs.len())])
        .args([
            "--gpu-blocks",
            &num(gpu),
            "--host-blocks",
            &num(host),
            "--disk-blocks",
            &num(disk),
        ])
        .args(["--concurrency", &num(a.concurrency.max(1))])
        .args(["--block-tokens", &BLOCK_TOKENS.to_string()])
        .args([
            "--host-weight",
            &a.host_weight.to_string(),
            "--disk-weight",
            &a.disk_weight.to_string(),
        ]);
    let (status, stdout, stderr) = run_bounded(cmd, Duration::from_secs(if a.smoke { 600 } else { 3600 }))?;
    if !status.success() {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("\u{1b}[")).collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(err(format!(
            "unshare --net {} {} failed ({status}):\n{tail}",
            python.display(),
            script.display()
        )));
    }
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    let raw: Value = serde_json::from_str(last).map_err(|e| err(format!("routing_bench.py output: {e}")))?;
    let v = figures(&raw, oracle_hit_rate(reqs), &a.trace, &python)?;
    report(&v, a.json, a.smoke.then_some(check_smoke))
}

fn figures(raw: &Value, oracle: f64, trace: &Path, python: &Path) -> kvtier::Result<Value> {
    let get = |m: &str, k: &str| {
        raw[m][k]
            .as_f64()
            .ok_or_else(|| err(format!("routing_bench.py output: {m}/{k} missing")))
    };
    let rate = |m: &str| -> kvtier::Result<f64> { Ok(get(m, "hit_tokens")? / get(m, "input_tokens")?.max(1.0)) };
    let (gpu_only, tier_aware) = (rate("gpu_only")?, rate("tier_aware")?);
    let per_request = |m: &str| -> kvtier::Result<f64> { Ok(get(m, "events")? / get(m, "requests")?.max(1.0)) };
    let ratio = tier_aware / gpu_only.max(f64::MIN_POSITIVE);
    let mode = |m: &str| -> kvtier::Result<Value> {
        let input = get(m, "input_tokens")?.max(1.0);
        Ok(json!({
            "requests": raw[m]["requests"],
            "token_hit_rate": round3(rate(m)?),
            "gpu_token_share": round3(get(m, "gpu_hit_tokens")? / input),
            "kvtier_token_share": round3(get(m, "tier_hit_tokens")? / input),
            "events_per_request": round3(per_request(m)?),
            "requests_per_engine": raw[m]["requests_per_engine"],
            "unsynced_requests": raw[m]["unsynced_requests"],
            "warmup_resends": raw[m]["warmup_resends"],
            "wall_s": round3(get(m, "wall_s")?),
        }))
    };
    Ok(json!({
        "trace": trace.display().to_string(),
        "python": python.display().to_string(),
        "workers": raw["workers"],
        "gpu_blocks": raw["gpu_blocks"],
        "host_blocks": raw["host_blocks"],
        "disk_blocks": raw["disk_blocks"],
        "concurrency": raw["concurrency"],
        "host_cache_hit_weight": raw["host_weight"],
        "disk_cache_hit_weight": raw["disk_weight"],
        "gpu_only_token_hit_rate": round3(gpu_only),
        "tier_aware_token_hit_rate": round3(tier_aware),
        "tier_aware_vs_gpu_only": round3(ratio),
        "events_per_request": round3(per_request("tier_aware")?),
        "gpu_only_events_per_request": round3(per_request("gpu_only")?),
        "oracle_token_hit_rate": round3(oracle),
        "max_ratio_any_router": round3(oracle / gpu_only.max(f64::MIN_POSITIVE)),
        "goal": {"tier_aware_vs_gpu_only": GOAL_RATIO, "met": ratio >= GOAL_RATIO},
        "gpu_only": mode("gpu_only")?,
        "tier_aware": mode("tier_aware")?,
    }))
}

fn check_smoke(v: &Value) -> kvtier::Result<()> {
    let c = Invariants::of("routing --smoke", v);
    let oracle = c.f("/oracle_token_hit_rate")?;
    for m in ["gpu_only", "tier_aware"] {
        let r = c.f(&format!("/{m}/token_hit_rate"))?;
        c.ensure((0.0..=oracle + 1e-9).contains(&r), || {
            format!(
                "{m}/token_hit_rate {r} in 0..=oracle_token_hit_rate {oracle}: engines only hold blocks seen before"
            )
        })?;
        let engines = c.get(&format!("/{m}/requests_per_engine"))?;
        let all = engines
            .as_array()
            .map_or(0, |e| e.iter().filter(|n| n.as_u64() > Some(0)).count());
        let workers = c.u("/workers")? as usize;
        let (unsynced, served) = (
            c.u(&format!("/{m}/unsynced_requests"))?,
            c.u(&format!("/{m}/requests"))?,
        );
        c.ensure(unsynced * 100 <= served, || {
            format!("{m}/unsynced_requests {unsynced} <= 1% of {served}: the router applied the events before the next decision")
        })?;
        c.ensure(all == workers, || {
            format!("{m}: every engine served requests: {engines}")
        })?;
    }
    let share = c.f("/tier_aware/kvtier_token_share")?;
    c.ensure(share > 0.0, || {
        format!("tier_aware/kvtier_token_share {share} > 0: kvtier served hits")
    })?;
    let (tier_ev, gpu_ev) = (c.f("/events_per_request")?, c.f("/gpu_only_events_per_request")?);
    c.ensure(tier_ev > gpu_ev && gpu_ev > 0.0, || {
        format!(
            "events_per_request {tier_ev} > gpu_only_events_per_request {gpu_ev} > 0: tier events reached the router"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64], input: u64) -> Request {
        serde_json::from_value(json!({"timestamp": 0, "input_length": input, "hash_ids": ids})).unwrap()
    }

    #[test]
    fn the_oracle_counts_leading_runs_of_blocks_seen_before() {
        let reqs = [req(&[1, 2], 1024), req(&[1, 2, 3], 1536), req(&[1, 4], 1100)];
        // Hits: 0, then 1024 of 1536, then 512 of 1100 (block 4 unseen).
        let want = (1024 + 512) as f64 / (1024 + 1536 + 1100) as f64;
        assert!((oracle_hit_rate(&reqs) - want).abs() < 1e-12);
    }
}
