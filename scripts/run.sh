#!/usr/bin/env bash
# The main job on its embedded default: a block manager with host RAM in
# front of a local SSD directory stores the KV blocks of a few prompts,
# reloads them, restarts, and serves them again from the SSD, checking every
# byte. Set KVTIER_DATA_DIR to put the SSD tier elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p kvtier-bench
exec ./target/release/kvtier-bench demo --dir "${KVTIER_DATA_DIR:-./kvtier-data}" "$@"
