#!/usr/bin/env bash
# Every check CI runs: formatting, lints, the benchmark and demo smoke runs,
# then every test of the workspace (unit, property, conformance, crash and
# full-disk tests; the full-disk test mounts a small tmpfs and needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== bench smoke: kvtier-bench tiers --smoke, daemon --smoke, demo"
cargo build --release -q -p kvtier-bench -p kvtier-server
smoke_dir=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-smoke.XXXXXX")
trap 'rm -rf "$smoke_dir"' EXIT
./target/release/kvtier-bench tiers --smoke --json --dir "$smoke_dir/tiers"
./target/release/kvtier-bench daemon --smoke --json --dir "$smoke_dir/daemon"
./target/release/kvtier-bench demo --json --dir "$smoke_dir/demo" >/dev/null
echo "demo: ok"
./scripts/check-deploy.sh
echo "== python: wheel, clean-venv install, pytest"
./scripts/python-test.sh
./target/release/kvtier-bench python --smoke --json
./scripts/azurite.sh >/dev/null   # the blob tests start it
echo "== cargo test"
# The core crate last, so the run closes on its summary.
cargo test -p kvtier-bench --all-targets
cargo test -p kvtier-server --all-targets
cargo test -p kvtier --all-targets
