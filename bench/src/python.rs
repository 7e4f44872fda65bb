//! `kvtier-bench python`: the Python binding against Rust, same store
//! configuration, same work, same run. The Python half is
//! `bench/python_bench.py`, run with an interpreter that has kvtier installed.

use kvtier::manager::ManagerConfig;
use kvtier::tier::host::HostConfig;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;

use crate::util::{fill, io_err as err, median, namespace, round3};
use kvtier::AlignedBuf as Aligned;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Python with the kvtier package (default: the project venv made by
    /// scripts/python-env.sh).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Bytes moved per measurement, in MiB.
    #[arg(long, default_value_t = 512)]
    total_mib: usize,
    /// Block size in KiB.
    #[arg(long, default_value_t = 2048)]
    block_kib: usize,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run, for CI.
    #[arg(long)]
    smoke: bool,
}

/// `$KVTIER_VENV/bin/python`, else the project venv's, else `python3`.
pub(crate) fn default_python() -> PathBuf {
    if let Some(v) = std::env::var_os("KVTIER_VENV") {
        return PathBuf::from(v).join("bin/python");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv = home.join(".cache/kvtier/venv-vllm-0.34.0/bin/python");
    if venv.exists() { venv } else { PathBuf::from("python3") }
}

pub(crate) fn run(a: &Args) -> kvtier::Result<()> {
    let (total, rounds) = if a.smoke {
        (64usize << 20, 1)
    } else {
        (a.total_mib << 20, a.rounds.max(1))
    };
    let block = a.block_kib << 10;
    let total = total / block * block;
    // Rust: the same calls the binding makes, one block per call.
    let m = ManagerConfig::host_only(HostConfig::with_capacity(total as u64 + (4 << 20))).build()?;
    let ns = m.register_namespace(&namespace("python-bench", block))?;
    let mut src = Aligned::new(total);
    fill(&mut src, 5);
    let mut dst = Aligned::new(total);
    let (mut puts, mut gets) = (vec![], vec![]);
    for r in 0..rounds {
        let keys: Vec<kvtier::BlockKey> = (0..total / block)
            .map(|i| kvtier::BlockKey::from_opaque(ns, &[&[r as u8][..], &(i as u64).to_le_bytes()].concat()))
            .collect();
        let t = std::time::Instant::now();
        for (k, c) in keys.iter().zip(src.chunks_exact(block)) {
            m.store(ns, std::slice::from_ref(k), c)?;
        }
        puts.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = std::time::Instant::now();
        for (k, c) in keys.iter().zip(dst.chunks_exact_mut(block)) {
            if m.load(ns, std::slice::from_ref(k), c)?.loaded != 1 {
                return Err(err("a block did not come back"));
            }
        }
        gets.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
        if src[..] != dst[..] {
            return Err(err("blocks came back altered"));
        }
        m.remove(ns, &keys)?;
    }
    drop(m);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python_bench.py");
    let python = a.python.clone().unwrap_or_else(default_python);
    let out = Command::new(&python)
        .arg(&script)
        .args(["--total-bytes", &total.to_string(), "--block-bytes", &block.to_string()])
        .args(["--rounds", &rounds.to_string()])
        .output()
        .map_err(|e| err(format!("run {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} {}: {}",
            python.display(),
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let py: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| err(format!("python_bench.py output: {e}")))?;
    let (rp, rg) = (median(puts.clone()), median(gets.clone()));
    let (pp, pg) = (
        py["py_put_gbps"].as_f64().unwrap_or(0.0),
        py["py_get_gbps"].as_f64().unwrap_or(0.0),
    );
    let j = json!({
        "bench": "python",
        "smoke": a.smoke,
        "block_bytes": block,
        "total_bytes": total,
        "rounds": rounds,
        "store": "host tier holding the working set, one block per call",
        "python": python.display().to_string(),
        "rust_put_gbps": round3(rp),
        "rust_get_gbps": round3(rg),
        "py_put_gbps": round3(pp),
        "py_get_gbps": round3(pg),
        "py_put_ratio": round3(pp / rp),
        "py_get_ratio": round3(pg / rg),
        "goals": { "binding_cost_max": 0.10, "met": pp / rp >= 0.9 && pg / rg >= 0.9 },
        "per_round": { "rust_put_gbps": puts, "rust_get_gbps": gets },
    });
    crate::print_json(&j, a.json);
    Ok(())
}
