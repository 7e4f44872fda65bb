#!/usr/bin/env bash
# Builds the kvtier wheel, proves it installs into a clean venv and ships
# the connectors, installs it into the project venv (with the real vllm) and
# runs the Python tests: python/tests, then each connector's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(./scripts/python-env.sh)
PY="$VENV/bin/python"
cargo build --release -q -p kvtier-server   # the tests start a real kvtierd
wheel=$(KVTIER_PYTHON="$PY" ./scripts/build-wheel.sh --release)
clean=$(mktemp -d)
trap 'rm -rf "$clean"' EXIT
python3 -m venv "$clean/venv"
"$clean/venv/bin/python" -m pip install -q "$wheel"
"$clean/venv/bin/python" -c "import kvtier; print('clean venv: kvtier', kvtier.__version__)"
# Each connector module is in the installed wheel under its import path,
# identical to its source. Found, not imported: the clean venv has no engine.
for module in connectors/*/kvtier/*.py; do
  name=kvtier.$(basename "$module" .py)
  source="$PWD/$module"
  (cd "$clean" && "$clean/venv/bin/python" - "$name" "$source") <<'PY'
import importlib.util, pathlib, sys
name, source = sys.argv[1], pathlib.Path(sys.argv[2])
spec = importlib.util.find_spec(name)
assert spec is not None and spec.origin, f"the installed wheel has no {name}"
installed = pathlib.Path(spec.origin)
assert "site-packages" in installed.parts, f"{name} comes from {installed}, not the wheel"
assert installed.read_bytes() == source.read_bytes(), f"{installed} differs from {source}"
print(f"clean venv: {name} from the wheel ({installed.name}, same bytes as {source})")
PY
done
"$PY" -m pip install -q --force-reinstall --no-deps "$wheel"
status=0
for tests in python/tests connectors/*/tests; do
  echo "== pytest $tests"
  (cd "$tests" && "$PY" -m pytest -q -p no:cacheprovider .) || status=1
done
exit $status
