//! `kvtier-bench placement`: what placing a key costs at the cluster sizes
//! kvtier is meant for, and what a join moves. No processes, no I/O: the
//! replication core's placement, measured as kvtierd uses it.
//!
//! For each member count N (synthetic members, weight 1):
//!
//! - `build_s`: [`SlotTable::new`] of N members (every thread), what a node
//!   computes at startup or after a large change of the member list, off
//!   its event loop.
//! - `placement_ns_per_key`: [`plan_write`] of a key at R = 3 on a view of
//!   N members all up: the replicas a write goes to, as kvtierd computes
//!   them per key (median of 3 passes over `--keys` keys). Next to it, in
//!   the same run: `slot_hash_ns_per_key` (hashing the key into its slot,
//!   the floor of any slot lookup) and `rendezvous_ns_per_key`, per-key
//!   rendezvous over the same N members (what placement cost before slots,
//!   on a few keys: it takes milliseconds each).
//! - `moved_fraction` on a join (R = 1): the share of slots, hence of keys
//!   on average, whose replica changes when one member joins, averaged
//!   over joins of distinct new members to the same N (each a real
//!   [`SlotTable::join`] and [`moves`]), against the expected `1 / (N + 1)`.
//!   A join moves a binomial count of slots, so enough joins are averaged
//!   that the expected total is at least 400 slots (about ±5%);
//!   `sd_of_ratio` says how close the ratio should be to 1.

use kvtier::BlockKey;
use kvtier::replication::membership::{Detector, Membership};
use kvtier::replication::placement::{self, Member, NodeId};
use kvtier::replication::slots::{DEFAULT_SLOTS, MAX_R, MAX_SLOTS, SlotTable, moves};
use kvtier::replication::{Replication, plan_write};
use kvtier::{ErrorKind, Result};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

use crate::util::{Invariants, key, median, namespace, ratio, report, round3};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Member counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    members: Vec<usize>,
    /// The slot count (kvtierd's `cluster.slots`).
    #[arg(long, default_value_t = DEFAULT_SLOTS)]
    slots: u32,
    /// Keys placed per pass.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Small sizes, for CI: 1,000 and 10,000 members, fewer keys.
    #[arg(long)]
    smoke: bool,
    /// Print one line of JSON.
    #[arg(long)]
    json: bool,
}

/// Replicas per key for the per-key cost.
const R: usize = 3;
/// Slots a join measurement moves in all, expected: the moved fraction is
/// then within about 1 / sqrt(400) = 5% of its expectation.
const MOVED_SLOTS: f64 = 400.0;
/// Joins averaged at most.
const MAX_JOINS: usize = 2_000;

fn member(i: usize, prefix: &str) -> Member {
    Member::new(
        format!("{prefix}-{i}"),
        format!("10.{}.{}.{}:50051", i >> 16, (i >> 8) & 255, i & 255),
    )
}

/// The figures of N members in `slots` slots, `keys` keys per pass.
pub(crate) fn figures(n: usize, slots: u32, keys: usize) -> Result<Value> {
    let members: Vec<Member> = (0..n).map(|i| member(i, "node")).collect();
    let start = Instant::now();
    let table = SlotTable::new(&members, slots, MAX_R).map_err(|e| e.into_error())?;
    let build_s = start.elapsed().as_secs_f64();
    let table = Arc::new(table);
    let view = Membership::new(members[0].id.clone(), table.clone(), Detector::default());
    let rep = Replication::strong(R.min(n));
    let ns = namespace("placement", 4096).id();
    let ks: Vec<BlockKey> = (0..keys).map(|i| key(ns, 0, i)).collect();

    let per_key = |f: &dyn Fn(&BlockKey) -> usize| -> f64 {
        let passes: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let mut sink = 0usize;
                for k in &ks {
                    sink += f(std::hint::black_box(k));
                }
                std::hint::black_box(sink);
                t.elapsed().as_secs_f64() * 1e9 / keys as f64
            })
            .collect();
        median(passes)
    };
    let placement_ns = per_key(&|k| plan_write(k, &view, rep).targets.len());
    let slot_hash_ns = per_key(&|k| table.slot_of(k) as usize);
    let lookup_ns = per_key(&|k| {
        let ids = table
            .replica_members(k, rep.replicas)
            .expect("r within the table's max_r");
        ids.map(|m| m.id.0.len()).sum()
    });
    // Per-key rendezvous costs O(N) a key: a few keys tell it.
    let few = (20_000_000 / n.max(1)).clamp(2, 200).min(keys);
    let t = Instant::now();
    let mut placed = 0;
    for k in &ks[..few] {
        placed += placement::replicas(std::hint::black_box(k), &members, rep.replicas).len();
    }
    let rendezvous_ns = t.elapsed().as_secs_f64() * 1e9 / few as f64;
    // Both placements agree on the replica count: the same plan, other
    // members.
    if placed != few * rep.replicas {
        return Err(kvtier::Error::new(
            ErrorKind::Internal,
            format!("{placed} replicas for {few} keys"),
        ));
    }

    // Joins of distinct new members, each to the same N.
    let expected = 1.0 / (n as f64 + 1.0);
    let joins = ((MOVED_SLOTS / (f64::from(slots) * expected)).ceil() as usize).clamp(1, MAX_JOINS);
    let (mut moved_slots, mut join_s) = (0usize, Vec::with_capacity(joins));
    for j in 0..joins {
        let mut joined = (*table).clone();
        let t = Instant::now();
        joined.join(member(j, "joiner")).map_err(|e| e.into_error())?;
        join_s.push(t.elapsed().as_secs_f64());
        let mv = moves(&table, &joined, 1).map_err(|e| e.into_error())?;
        // A join only ever takes slots for the joiner.
        let joiner = NodeId(format!("joiner-{j}"));
        if mv.iter().any(|(_, m)| m.gained != [joiner.clone()]) {
            return Err(kvtier::Error::new(
                ErrorKind::Internal,
                format!("a join of {joiner} moved a slot to another member"),
            ));
        }
        moved_slots += mv.len();
    }
    let moved_fraction = moved_slots as f64 / (joins as f64 * f64::from(slots));
    let expected_total = joins as f64 * f64::from(slots) * expected;
    Ok(json!({
        "members": n,
        "slots": slots,
        "max_r": MAX_R,
        "build_s": round3(build_s),
        "replicas": rep.replicas,
        "keys": keys,
        "placement_ns_per_key": round3(placement_ns),
        "what": "plan_write of one key on a view of every member up: the slot table's lookup, the ids cloned",
        "lookup_ns_per_key": round3(lookup_ns),
        "lookup": "the replicas' members read from the table, nothing cloned",
        "slot_hash_ns_per_key": round3(slot_hash_ns),
        "ratio_to_slot_hash": ratio(placement_ns, slot_hash_ns),
        "rendezvous_ns_per_key": round3(rendezvous_ns),
        "rendezvous_keys": few,
        "speedup_over_rendezvous": ratio(rendezvous_ns, placement_ns),
        "join": {
            "r": 1,
            "joins": joins,
            "moved_slots": moved_slots,
            "moved_fraction": moved_fraction,
            "expected_fraction": expected,
            "ratio_to_expected": ratio(moved_fraction, expected),
            "sd_of_ratio": round3(1.0 / expected_total.sqrt()),
            "join_ms_median": round3(median(join_s) * 1e3),
        },
    }))
}

pub(crate) fn run(a: &Args) -> Result<()> {
    if a.slots == 0 || a.slots > MAX_SLOTS || a.keys == 0 || a.members.contains(&0) {
        return Err(kvtier::Error::new(
            ErrorKind::InvalidArgument,
            format!("--slots must be 1 to {MAX_SLOTS}, --keys and every --members above 0"),
        ));
    }
    let (members, keys) = if a.smoke {
        (vec![1_000, 10_000], a.keys.min(100_000))
    } else {
        (a.members.clone(), a.keys)
    };
    let mut by = serde_json::Map::new();
    for n in &members {
        by.insert(n.to_string(), figures(*n, a.slots, keys)?);
    }
    let v = json!({
        "bench": "placement",
        "smoke": a.smoke,
        "threads": std::thread::available_parallelism().map_or(1, |p| p.get()),
        "goal": "placement_ns_per_key <= 2000 at 10,000 and 100,000 members; moved_fraction within 10% of 1/(N+1)",
        "members": by,
    });
    report(&v, a.json, a.smoke.then_some(check_smoke))
}

/// What CI holds a smoke run to: a key placed within the goal at every
/// size, and a join moving its share of the slots.
fn check_smoke(v: &Value) -> Result<()> {
    let c = Invariants::of("placement --smoke", v);
    for n in ["1000", "10000"] {
        let at = format!("/members/{n}");
        let ns = c.f(&format!("{at}/placement_ns_per_key"))?;
        c.ensure(ns > 0.0, || format!("{at}: placement_ns_per_key {ns}"))?;
        let r = c.f(&format!("{at}/join/ratio_to_expected"))?;
        let sd = c.f(&format!("{at}/join/sd_of_ratio"))?;
        c.ensure((r - 1.0).abs() <= 5.0 * sd, || {
            format!("{at}: a join moved {r} of its expected share (sd {sd})")
        })?;
    }
    Ok(())
}
