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
echo "== bench smoke: kvtier-bench tiers --smoke, daemon --smoke, s3 --smoke, blob --smoke, replication --smoke, placement --smoke, cluster-sim --smoke, peers --smoke, replay, demo"
cargo build --release -q -p kvtier-bench -p kvtier-server
smoke_dir=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-smoke.XXXXXX")
trap 'rm -rf "$smoke_dir"' EXIT
./target/release/kvtier-bench tiers --smoke --json --dir "$smoke_dir/tiers"
./target/release/kvtier-bench daemon --smoke --json --dir "$smoke_dir/daemon"
# kvtierd's S3 listener through a SigV4-signing HTTP/1.1 client: exits
# non-zero naming a broken invariant (every byte back as put, HEAD sizes,
# 404 NoSuchKey for a missing and a deleted key, finite figures).
./target/release/kvtier-bench s3 --smoke --json --dir "$smoke_dir/s3"
# Each smoke run checks its own invariants and exits non-zero, naming the
# broken one; replay's --check does the same for the replay and the sweep.
./target/release/kvtier-bench blob --smoke --json --dir "$smoke_dir/blob"
./target/release/kvtier-bench replication --smoke --json --dir "$smoke_dir/replication"
./target/release/kvtier-bench placement --smoke --json
# Gossip membership at 200 simulated members (simulated time and network, a
# fraction of a second): a crash held down everywhere, a join and a leave
# seen everywhere, no live member declared down, every member list equal.
./target/release/kvtier-bench cluster-sim --smoke --json
./target/release/kvtier-bench peers --smoke --json --dir "$smoke_dir/peers"
# The trace replay: real BlockManager, real bytes; LRU must reproduce the
# reference simulation computed in the same run.
./target/release/kvtier-bench replay --trace bench/traces/conversation_trace.jsonl \
    --capacity-blocks 2000 --policy lru --requests 2000 --json --check --dir "$smoke_dir/replay"
./target/release/kvtier-bench replay --trace bench/traces/conversation_trace.jsonl \
    --sweep --requests 1000 --json --check --png "$smoke_dir/replay.png" --dir "$smoke_dir/replay" >/dev/null
./target/release/kvtier-bench demo --json --dir "$smoke_dir/demo" >/dev/null
echo "demo: ok"
./scripts/check-deploy.sh
echo "== python: wheel, clean-venv install, pytest"
./scripts/python-test.sh
./target/release/kvtier-bench python --smoke --json
# The vLLM connector through vLLM's real scheduler, embedded and against
# kvtierd: checks its invariants (bytes back as saved) and exits non-zero
# naming a broken one.
./target/release/kvtier-bench connector --smoke --json
# NVIDIA Dynamo's real KV router over simulated engines with kvtier's tiers,
# GPU events only and with tier events, in a network namespace (only lo):
# checks its invariants (no hit rate above one cache of every block seen,
# tier events reach the router, kvtier serves hits).
./target/release/kvtier-bench routing --smoke --json
# kvtier as LMCache's L2 (SSD-only kvtierd) against LMCache's own disk L2
# adapters, through LMCache 0.5.6's adapter machinery, in the LMCache venv
# python-test.sh made and installed the wheel into: checks its invariants
# (every chunk back as put, the page cache dropped before each get phase).
lmcache_python=${KVTIER_LMCACHE_VENV:-$HOME/.cache/kvtier/venv-lmcache-0.5.6}/bin/python
if [ -x "$lmcache_python" ]; then
  ./target/release/kvtier-bench lmcache --smoke --json --python "$lmcache_python" --dir "$smoke_dir/lmcache"
else
  echo "lmcache smoke: SKIPPED: no LMCache venv at $lmcache_python (scripts/lmcache-env.sh makes it)"
fi
echo "== cargo test"
# The core crate last, so the run closes on its summary.
cargo test -p kvtier-proto -p kvtier-client -p kvtier-testkit -p kvtier-python -p kvtier-s3 --all-targets
cargo test -p kvtier-bench --all-targets
cargo test -p kvtier-server --all-targets
cargo test -p kvtier --all-targets
