//! `kvtier-bench cluster-sim`: gossip membership (the core's SWIM layer)
//! at 1,000 to 10,000 members in one process, on simulated time and a
//! simulated network: per-node message rate against all-to-all heartbeats
//! of the same cluster, the time until every member holds a crashed one
//! down, false suspicions under datagram loss, and the time until a
//! joiner and the cluster know each other. No sockets, no sleeps; the run
//! is deterministic for a seed.
//!
//! The script is the core's [`kvtier::replication::swim::sim::Scenario`]:
//! a formed cluster in steady state, a crash, a join, a graceful leave.
//! Placement figures (`placement_ns_per_key`, `moved_fraction`) belong in
//! this report too; they join it with slot placement, measured over the
//! member lists the same run converged on.

use kvtier::replication::swim::SwimConfig;
use kvtier::replication::swim::sim::{Net, Report, Scenario};
use kvtier::{ErrorKind, Result};
use serde_json::json;
use std::time::Instant;

use crate::util::round3;
use crate::{fail, print_json};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Members of the formed cluster.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Share of datagrams lost, throughout the run.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Seeds every random choice (the run is deterministic for a seed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads that build the formed cluster (foca fills each node's
    /// table in O(n²)); the run itself is one thread.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Keep every node's member list and check they all agree at the end
    /// (memory grows with members²; on by default up to 2,000 members).
    #[arg(long)]
    views: Option<bool>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A seconds-long run at 200 members that checks the invariants and
    /// exits non-zero naming a broken one, for CI.
    #[arg(long)]
    smoke: bool,
}

/// Peak resident memory of this process, MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds this process has used (user and system, all threads).
fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The invariants a run must meet whatever its size; the goals of issue 17
/// (≤ 10 messages per node per second, detection ≤ 15 s at a 1 s probe
/// period) are among them.
fn check(r: &Report) -> std::result::Result<(), String> {
    let detect = r
        .detect_s
        .ok_or("the crashed member was not held down by every running member")?;
    if detect > 15.0 * r.probe_period_s {
        return Err(format!("detect_s {detect} above 15 probe periods"));
    }
    if r.messages_per_node_per_s > 10.0 {
        return Err(format!(
            "messages_per_node_per_s {} above 10",
            r.messages_per_node_per_s
        ));
    }
    r.converge_s
        .ok_or("the joiner and the cluster did not learn each other")?;
    r.leave_s.ok_or("the leave did not reach every running member")?;
    if r.false_downs > 0 {
        return Err(format!("{} running members were declared down", r.false_downs));
    }
    if r.views_agree == Some(false) {
        return Err(format!(
            "member lists disagree at the end: {}",
            r.views_disagreement.as_deref().unwrap_or("?")
        ));
    }
    if r.net.refused > 0 || r.net.timer_errors > 0 {
        return Err(format!("nodes reported errors: {:?}", r.errors));
    }
    Ok(())
}

pub(crate) fn run(a: &Args) -> Result<()> {
    let members = if a.smoke { 200 } else { a.members };
    if members < 10 {
        return Err(fail(
            ErrorKind::InvalidArgument,
            format!("--members {members}: at least 10"),
        ));
    }
    if !(0.0..0.5).contains(&a.loss) {
        return Err(fail(
            ErrorKind::InvalidArgument,
            format!("--loss {}: between 0 and 0.5", a.loss),
        ));
    }
    let mut sc = Scenario::new(members, a.seed);
    sc.config = SwimConfig::default();
    sc.net = Net {
        loss: a.loss,
        ..Net::default()
    };
    sc.threads = a.threads.max(1);
    sc.keep_views = a.views.unwrap_or(members <= 2000);
    let t = Instant::now();
    let mut phases = serde_json::Map::new();
    let mut last = ("build", Instant::now(), cpu_s());
    let r = sc.run_with(|p| {
        let (now, cpu) = (Instant::now(), cpu_s());
        phases.insert(
            format!("{}_wall_s", last.0),
            json!(round3((now - last.1).as_secs_f64())),
        );
        phases.insert(format!("{}_cpu_s", last.0), json!(round3(cpu - last.2)));
        last = (p, now, cpu);
    });
    let wall_s = t.elapsed().as_secs_f64();
    let checked = check(&r);
    let mut v = serde_json::to_value(&r).expect("serializable");
    let o = v.as_object_mut().expect("an object");
    for k in [
        "messages_per_node_per_s",
        "bytes_per_node_per_s",
        "all_to_all_messages_per_node_per_s",
        "simulated_s",
    ] {
        if let Some(x) = o.get(k).and_then(|x| x.as_f64()) {
            o.insert(k.into(), json!(round3(x)));
        }
    }
    o.insert("messages_vs_all_to_all".into(), json!(r.messages_vs_all_to_all));
    o.insert("seed".into(), json!(a.seed));
    o.insert("threads".into(), json!(sc.threads));
    o.insert("smoke".into(), json!(a.smoke));
    o.insert("wall_s".into(), json!(round3(wall_s)));
    // Where the time went: building the formed cluster (on `threads`
    // threads), then each simulated step (on one).
    o.insert("phases".into(), serde_json::Value::Object(phases));
    o.insert("peak_rss_mib".into(), json!(peak_rss_mib().map(round3)));
    o.insert(
        "checks".into(),
        json!(checked.as_ref().map(|()| "ok").unwrap_or_else(|e| e.as_str())),
    );
    print_json(&v, a.json);
    if a.smoke {
        checked.map_err(|e| fail(ErrorKind::Internal, format!("cluster-sim smoke: {e}")))?;
    }
    Ok(())
}
