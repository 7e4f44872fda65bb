#!/usr/bin/env bash
# The main job on its embedded default: kvtierd, SSD-only KV offload with no
# cloud tier, blocks under ./kvtierd-data, gRPC on 127.0.0.1:50051 and
# Prometheus metrics on 127.0.0.1:9464. Stop it with Ctrl-C (SIGINT) or
# SIGTERM: it drains and seals its segments. Any KVTIER_* setting applies
# (see deploy/README.md); arguments go to kvtierd (e.g. --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p kvtier-server
exec ./target/release/kvtierd "$@"
