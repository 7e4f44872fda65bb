#!/usr/bin/env bash
# Builds the kvtier wheel, proves it installs into a clean venv, installs it
# into the project venv (with the real vllm) and runs the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(./scripts/python-env.sh)
PY="$VENV/bin/python"
cargo build --release -q -p kvtier-server   # the tests start a real kvtierd
rm -rf target/wheels
(cd python && "$PY" -m maturin build --release -q -o ../target/wheels)
wheel=$(ls target/wheels/kvtier-*.whl)
clean=$(mktemp -d)
trap 'rm -rf "$clean"' EXIT
python3 -m venv "$clean/venv"
"$clean/venv/bin/python" -m pip install -q "$wheel"
"$clean/venv/bin/python" -c "import kvtier; print('clean venv: kvtier', kvtier.__version__)"
"$PY" -m pip install -q --force-reinstall --no-deps "$wheel"
cd python/tests
exec "$PY" -m pytest -q -p no:cacheprovider .
