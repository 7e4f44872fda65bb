#!/usr/bin/env bash
# Every check CI runs: formatting, lints, the benchmark and demo smoke runs,
# then every test of the workspace (unit, property, conformance, crash and
# full-disk tests; the full-disk test mounts a small tmpfs and needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A fresh clone's CI build: incremental artifacts only cost disk there.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
# The smokes write up to about 3 GiB under TMPDIR and the build about 20 GiB
# under target/: say so up front rather than fail later on ENOSPC.
for d in "${TMPDIR:-/tmp}" .; do
  free_kib=$(df -Pk "$d" | awk 'NR == 2 { print $4 }')
  if [ "$free_kib" -lt $((4 * 1024 * 1024)) ]; then
    echo "test.sh: only $((free_kib / 1024)) MiB free under $d; the smokes and tests need at least 4 GiB" >&2
    exit 1
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# Azurite before the bench smokes: the blob smoke and the blob tests start it.
KVTIER_AZURITE_BIN=$(./scripts/azurite.sh)
export KVTIER_AZURITE_BIN
echo "== bench smoke: kvtier-bench tiers --smoke, daemon --smoke, blob --smoke, replication --smoke, peers --smoke, replay, demo"
cargo build --release -q -p kvtier-bench -p kvtier-server
smoke_dir=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-smoke.XXXXXX")
trap 'rm -rf "$smoke_dir"' EXIT
./target/release/kvtier-bench tiers --smoke --json --dir "$smoke_dir/tiers"
./target/release/kvtier-bench daemon --smoke --json --dir "$smoke_dir/daemon"
./target/release/kvtier-bench blob --smoke --json --dir "$smoke_dir/blob" | tee "$smoke_dir/blob.json"
python3 - "$smoke_dir/blob.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
assert v["blob_put_requests"] == v["stored_blocks"] > 0, "each block uploaded once"
assert v["bytes_to_blob"] == v["stored_blocks"] * (v["block_bytes"] + 64), v["bytes_to_blob"]
served = v["loads"] * v["blocks_per_request"] * v["block_bytes"]
bo = v["blob_only"]
assert bo["throughput_reduction"] == 0, bo
assert bo["blob_get_requests"] == v["loads"] * v["blocks_per_request"], bo
for c in ("local_tiers", "local_tiers_with_host"):
    r = v[c]
    assert r["bytes_served"] == served, (c, r)
    assert r["throughput_reduction"] > 0, (c, r)
    assert r["blob_get_requests"] < bo["blob_get_requests"], (c, r)
    assert r["blob_put_requests"] == 0, (c, r)
print("blob: ok")
PY
./target/release/kvtier-bench replication --smoke --json --dir "$smoke_dir/replication" | tee "$smoke_dir/replication.json"
python3 - "$smoke_dir/replication.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
logical = v["fanout_logical_bytes_per_r"]
for r in (1, 2, 3):
    f = v["fanout"][f"r{r}"]
    assert abs(v["bytes_to_blob_ratio"][f"r{r}"] - 1.0) <= 0.01, (r, v["bytes_to_blob_ratio"])
    assert f["blob_put_requests"] == logical // v["block_bytes"], (r, f)
    assert f["replica_blocks_received_counted"] * v["block_bytes"] == f["replica_bytes_moved"], (r, f)
    assert v[f"fanout_gbps_r{r}"] > 0, (r, v)
# R = 3 on 3 nodes: two copies leave the coordinator whatever the placement.
assert v["fanout"]["r3"]["replica_bytes_moved"] == 2 * logical, v["fanout"]["r3"]
c = v["checkpoint"]
assert c["kvtier"]["restored_bytes_verified"] == c["bytes"] > 0, c
assert c["baseline"]["restored_bytes_verified"] == c["bytes"], c
# Two checkpoints of equal size (from memory, then files first): each
# chunk and manifest uploaded once.
assert c["kvtier"]["blob_put_requests"] == 2 * (c["chunks"] + 1), c
assert v["time_to_safe_files_first_s"] > 0, v
assert v["replica_copies_verified"] == 6 * logical // v["block_bytes"], v["replica_copies_verified"]
assert v["blob_requests"]["errors"] == 0, v["blob_requests"]
print("replication: ok")
PY
./target/release/kvtier-bench peers --smoke --json --dir "$smoke_dir/peers" | tee "$smoke_dir/peers.json"
python3 - "$smoke_dir/peers.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for side in ("kvtier", "foyer"):
    for k in ("put_gbps", "get_gbps", "get_p50_us", "get_p99_us", "put_p99_us", "hit_rate"):
        assert v[f"{side}_{k}"] > 0, (side, k, v[f"{side}_{k}"])
    io = v[side]["io"]
    # Every block came back and every byte was compared.
    assert io["get_misses"] == 0 and io["bytes_verified"] == v["total_bytes"], (side, io)
    assert v[side]["replay"]["bytes_verified"] > 0, (side, v[side]["replay"])
for k in ("put_ratio", "get_ratio", "p99_ratio", "hit_rate_ratio"):
    assert v[k] > 0, (k, v[k])
# Paced to its buffers, foyer drops nothing in the put/get part.
assert v["foyer"]["counters"]["dropped_entries"] == 0, v["foyer"]["counters"]
print("peers: ok")
PY
# The trace replay: real BlockManager, real bytes; LRU must reproduce the
# reference simulation computed in the same run.
./target/release/kvtier-bench replay --trace bench/traces/conversation_trace.jsonl \
    --capacity-blocks 2000 --policy lru --requests 2000 --json --dir "$smoke_dir/replay" | tee "$smoke_dir/replay.json"
./target/release/kvtier-bench replay --trace bench/traces/conversation_trace.jsonl \
    --sweep --requests 1000 --json --png "$smoke_dir/replay.png" --dir "$smoke_dir/replay" > "$smoke_dir/sweep.json"
python3 - "$smoke_dir/replay.json" "$smoke_dir/sweep.json" "$smoke_dir/replay.png" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
assert v["requests"] == 2000, v["requests"]
assert v["token_hit_rate"] > 0, v
assert abs(v["token_hit_rate"] - v["lru_reference_token_hit_rate"]) <= 0.005, v
assert v["optimum_token_hit_rate"] >= v["lru_reference_token_hit_rate"], v
assert v["blocks_loaded_verified"] == v["hits"]["host_blocks"] > 0, v
s = json.load(open(sys.argv[2]))
assert all(0 <= r <= 1 for r in s["optimum"]), s["optimum"]
assert set(s["policies"]) == {"lru", "frecency"}, list(s["policies"])
assert s["tiering_study"]["rows"][-1]["token_hit_rate"] > 0, s["tiering_study"]
# LRU behind an admission oracle lies between LRU and the optimum.
for lru, opt, o in zip(s["lru_reference"], s["optimum"], s["lru_with_admission_oracle"]):
    assert lru <= o["token_hit_rate"] <= opt + 1e-9, (lru, o, opt)
    need = o["last_uses_to_refuse_for_a_third_of_the_gap"]
    assert need is None or 0 <= need <= 1, o
png = open(sys.argv[3], "rb").read()
assert png.startswith(b"\x89PNG") and len(png) > 1000, len(png)
print("replay: ok")
PY
./target/release/kvtier-bench demo --json --dir "$smoke_dir/demo" >/dev/null
echo "demo: ok"
./scripts/check-deploy.sh
echo "== python: wheel, clean-venv install, pytest"
./scripts/python-test.sh
./target/release/kvtier-bench python --smoke --json
echo "== cargo test"
# The core crate last, so the run closes on its summary.
cargo test -p kvtier-bench --all-targets
cargo test -p kvtier-server --all-targets
cargo test -p kvtier --all-targets
