#!/usr/bin/env bash
# Usage: ./scripts/lmcache-env.sh [LMCACHE_VERSION]   (default 0.5.6)
#
# Makes (or reuses) the Python venv for the LMCache connector: the real
# lmcache package at one version, on CPU, with maturin, pytest, numpy and
# packaging. One venv per version, outside the checkout ($KVTIER_VENV,
# default ~/.cache/kvtier/venv-lmcache-<version>), reused by every clone on
# the machine. Prints its path on stdout, nothing else; progress goes to
# stderr. A complete venv (it has the stamp file) is reused; delete it to
# rebuild it.
#
# Why a venv of its own, not the vLLM one: lmcache 0.5.6 requires
# opentelemetry-api<=1.40.0, vllm 0.34.0 requires opentelemetry-api>=1.45.1,
# so the two cannot share one. vllm is not installed here: the LMCache
# multiprocess server (`lmcache server`), its L2 adapters and the in-process
# engine with its remote-storage plugins import no vllm module (only
# lmcache.integration.vllm and a few attention kernels do); see
# connectors/lmcache/NOTES.md.
#
# lmcache's pins are kept except these, each checked against the registry
# and the installed package:
#
# - torch: the wheel asks for any torch, but its extension modules
#   (lmcache_native, lmcache_fs, cuda_ops, ...) link libtorch and were built
#   against torch 2.13.0 (the sdist's pyproject.toml build-system pin), so
#   torch==2.13.0 is installed, not the registry's newest. PyPI has only the
#   CUDA build of torch for Linux: its nvidia-* libraries (about 3 GB) come
#   with it, as `import torch` loads them even without a GPU.
# - Left out (EXCLUDED), GPU-only and not imported on the CPU paths we use:
#   cupy-cuda13x (CUDA IPC, device contexts, blending) and cufile-python
#   (GPUDirect Storage backend).
# - Removed after installing (REMOVED): triton (about 0.7 GB), a requirement
#   of torch's, imported only when torch compiles GPU kernels.
#
# `pip check` then reports exactly those missing, and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
KNOWN_VERSIONS="0.5.6"
LMCACHE_VERSION=${1:-0.5.6}
# The torch that lmcache's extension modules were built against, per version.
TORCH_PINS=("0.5.6 torch==2.13.0")
EXCLUDED=(cupy-cuda13x cufile-python)
REMOVED=(triton)
case " $KNOWN_VERSIONS " in
  *" $LMCACHE_VERSION "*) ;;
  *)
    echo "lmcache-env: lmcache $LMCACHE_VERSION is not a supported version (known: $KNOWN_VERSIONS);" \
      "add it to KNOWN_VERSIONS, with its TORCH_PINS, in $0" >&2
    exit 2
    ;;
esac
torch_pin=
for entry in "${TORCH_PINS[@]}"; do
  read -r version requirement <<<"$entry"
  if [ "$version" = "$LMCACHE_VERSION" ]; then torch_pin=$requirement; fi
done
VENV=${KVTIER_VENV:-$HOME/.cache/kvtier/venv-lmcache-$LMCACHE_VERSION}
STAMP="$VENV/.kvtier-lmcache-$LMCACHE_VERSION"
for other in "$VENV"/.kvtier-lmcache-*; do
  # $KVTIER_VENV names one venv: it must not silently turn into another version's.
  [ -e "$other" ] || continue
  [ "$other" = "$STAMP" ] && continue
  echo "lmcache-env: $VENV holds lmcache ${other##*/.kvtier-lmcache-}, not $LMCACHE_VERSION;" \
    "point KVTIER_VENV elsewhere (or unset it) for this version" >&2
  exit 2
done
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
# Two callers must not build the same venv at once: the second waits, then
# finds the stamp.
exec 9>"$VENV.lock"
flock 9
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
echo "lmcache-env: building $VENV (lmcache $LMCACHE_VERSION, $torch_pin; about 4.7 GB, a few minutes)" >&2
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >&2
"$PY" -m pip install -q "maturin>=1.9,<2" pytest numpy packaging >&2
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"$PY" -m pip download -q --no-deps -d "$wheel_dir" "lmcache==$LMCACHE_VERSION" >&2
wheel=$(ls "$wheel_dir"/lmcache-*.whl)
# Arguments: the wheel, the torch requirement, then the names to leave out.
"$PY" - "$wheel" "$torch_pin" "${EXCLUDED[@]}" > "$wheel_dir/requirements.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
whl = zipfile.ZipFile(sys.argv[1])
torch_pin = sys.argv[2]
excluded = {canonicalize_name(n) for n in sys.argv[3:]}
seen = set()
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    if name in excluded:
        print(f"lmcache-env: leaving out {req}", file=sys.stderr)
        seen.add(name)
        continue
    if name == "torch":
        print(f"lmcache-env: {req} pinned to {torch_pin}", file=sys.stderr)
        print(torch_pin)
        continue
    req.marker = None
    print(str(req))
stale = sorted(excluded - seen)
if stale:
    sys.exit(f"lmcache-env: EXCLUDED names {', '.join(stale)}, which this lmcache wheel does not require")
PYEOF
"$PY" -m pip install -q -r "$wheel_dir/requirements.txt" >&2
"$PY" -m pip install -q --no-deps "$wheel" >&2
"$PY" -m pip uninstall -q -y "${REMOVED[@]}" >&2
# Every requirement holds but the ones left out or removed on purpose.
left_out=$(IFS='|'; echo "${EXCLUDED[*]}|${REMOVED[*]}")
problems=$("$PY" -m pip check 2>&1 | grep -v -i -E "requires ($left_out)," ) || true
if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
  echo "lmcache-env: pip check after installing lmcache $LMCACHE_VERSION:" >&2
  echo "$problems" >&2
  exit 1
fi
# What the connector's tests import: the MP server's L2 adapters and the
# in-process engine's remote-connector plugin loader; vllm must not be there.
"$PY" - >&2 <<'PYEOF'
import importlib.metadata as md, importlib.util, sys
import lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter
import lmcache.v1.storage_backend.remote_backend
import lmcache.v1.cache_engine
assert importlib.util.find_spec("vllm") is None, "vllm must not be in the lmcache venv"
names = ("lmcache", "torch", "numpy", "opentelemetry-api")
print("lmcache-env:", ", ".join(f"{n} {md.version(n)}" for n in names), file=sys.stderr)
PYEOF
touch "$STAMP"
echo "$VENV"
