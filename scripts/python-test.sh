#!/usr/bin/env bash
# Builds the kvtier wheel, proves it installs into a clean venv and ships
# the connectors, installs it into the venv of each vLLM version under test
# (scripts/python-env.sh, one venv per version, with the real vllm) and runs
# the Python tests as a matrix: python/tests once, in the first version's
# venv; each connector's tests once per version. Then connectors/dynamo/tests
# once, in the venv of scripts/dynamo-env.sh (NVIDIA Dynamo 1.6.1 added to
# the vLLM 0.31.0 venv), with the same wheel installed there whether or not
# 0.31.0 is in the matrix. connectors/lmcache/tests run in the LMCache venv,
# and connectors/s3/tests (real S3 clients: boto3, NIXL's OBJ plugin,
# s3torchconnector, against kvtierd's S3 listener) in the venv of
# scripts/s3-env.sh, which is the LMCache venv with those clients added.
#
# The versions: $KVTIER_VLLM_VERSIONS, default "0.34.0 0.31.0" (the newest
# vLLM we test, and NVIDIA Dynamo 1.6.1's pin). One wheel serves every venv:
# it is abi3 (pyo3's abi3-py311 feature, Cargo.toml), for any CPython >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a VLLM_VERSIONS <<<"${KVTIER_VLLM_VERSIONS:-0.34.0 0.31.0}"
if [ ${#VLLM_VERSIONS[@]} -eq 0 ]; then
  echo "python-test: KVTIER_VLLM_VERSIONS names no vllm version" >&2
  exit 2
fi
# Every venv first (each built once, then reused), so a version that cannot
# be installed fails the run before any test.
declare -A VENVS
for version in "${VLLM_VERSIONS[@]}"; do
  VENVS[$version]=$(./scripts/python-env.sh "$version")
done
DYNAMO_VENV=$(./scripts/dynamo-env.sh)
LMCACHE_VENV=$(./scripts/lmcache-env.sh)
S3_VENV=$(./scripts/s3-env.sh)
PY="${VENVS[${VLLM_VERSIONS[0]}]}/bin/python"   # builds the wheel, runs python/tests
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
# Each venv once: with 0.31.0 in the matrix, the Dynamo venv is its venv.
# LMCache has its own (it cannot share one with vLLM 0.34).
declare -A INSTALLED
for venv in "${VENVS[@]}" "$DYNAMO_VENV" "$LMCACHE_VENV" "$S3_VENV"; do
  [ -n "${INSTALLED[$venv]:-}" ] && continue
  "$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
  INSTALLED[$venv]=1
done
status=0
run_pytest() { # tests-dir venv label
  echo "== pytest $1 ($3)"
  # Bounded: a suite that hangs fails CI here instead of holding it (each
  # takes a minute or two); a test that hangs dumps every thread's stack
  # first (faulthandler_timeout), so the log says where.
  local rc=0
  (cd "$1" && timeout --kill-after=30 900 "$2/bin/python" -m pytest -q -p no:cacheprovider -o faulthandler_timeout=600 .) || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "pytest $1 ($3): timed out after 900 s" >&2
  fi
  [ "$rc" = 0 ] || status=1
}
run_pytest python/tests "${VENVS[${VLLM_VERSIONS[0]}]}" "vllm ${VLLM_VERSIONS[0]}"
for tests in connectors/*/tests; do
  [ "$tests" = connectors/dynamo/tests ] && continue   # Dynamo's own venv, below
  [ "$tests" = connectors/lmcache/tests ] && continue  # LMCache's own venv, below
  [ "$tests" = connectors/s3/tests ] && continue       # the S3 clients' venv, below
  for version in "${VLLM_VERSIONS[@]}"; do
    run_pytest "$tests" "${VENVS[$version]}" "vllm $version"
  done
done
run_pytest connectors/dynamo/tests "$DYNAMO_VENV" "dynamo 1.6.1, vllm 0.31.0"
run_pytest connectors/lmcache/tests "$LMCACHE_VENV" "lmcache 0.5.6"
run_pytest connectors/s3/tests "$S3_VENV" "s3 clients"
exit $status
