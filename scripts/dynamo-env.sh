#!/usr/bin/env bash
# Usage: ./scripts/dynamo-env.sh
#
# Makes (or reuses) the Python venv for NVIDIA Dynamo 1.6.1 on vLLM 0.31.0
# (the vllm that ai-dynamo 1.6.1's `vllm` extra pins) and prints its path on
# stdout, nothing else; progress goes to stderr. It is the vLLM 0.31.0 venv of
# scripts/python-env.sh with ai-dynamo-runtime and ai-dynamo added: a venv is
# about 9 GB, so Dynamo shares it rather than getting a copy. They are added
# once (the stamp file), under the venv's lock (the one python-env.sh takes),
# so two callers never install at the same time.
#
# Pins that cannot be installed as stated, each checked against the
# registry and the 0.31.0 venv:
#
# - ai-dynamo-runtime 1.6.1 requires pydantic>=2.10.6,<=2.13.5, while the
#   venv has pydantic 2.14.4 (with pydantic-core 2.50.5). vllm 0.31.0 needs
#   only pydantic>=2.12.0, and no other package in the venv needs more than
#   that, so pydantic 2.13.5 serves both. It brings its exact pydantic-core
#   (2.46.5) with it; `pip check` below proves nothing else breaks.
# - ai-dynamo 1.6.1 requires aisimulate==0.13.0 (Python 3.11 to 3.13). On
#   the registry 0.13.0 exists only as an sdist, a wheel_stub placeholder
#   whose build downloads the real wheel from pypi.nvidia.com, which is not
#   reachable here: building it fails. Only dynamo.planner imports
#   aisimulate; dynamo.vllm and dynamo.frontend do not. So ai-dynamo is
#   installed with --no-deps, after its other requirements (its wheel's
#   Requires-Dist, markers evaluated, extras left out: the `vllm` extra is
#   this venv's vllm 0.31.0, and its nixl, ray and audio packages are for
#   GPU transfers and models kvtier's tests do not run), without aisimulate.
#   `pip check` then reports that one missing requirement and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
DYNAMO_VERSION=1.6.1
VLLM_VERSION=0.31.0
# ai-dynamo's requirements left out, with the reason above.
EXCLUDED=(aisimulate)
# Installed with the requirements instead of what pip would pick (see above).
PYDANTIC=pydantic==2.13.5
VENV=$(./scripts/python-env.sh "$VLLM_VERSION")
STAMP="$VENV/.kvtier-dynamo-$DYNAMO_VERSION"
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
exec 9>"$VENV.lock"
flock 9
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
echo "dynamo-env: adding ai-dynamo $DYNAMO_VERSION to $VENV" >&2
PY="$VENV/bin/python"
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"$PY" -m pip download -q --no-deps -d "$wheel_dir" "ai-dynamo==$DYNAMO_VERSION" >&2
wheel=$(ls "$wheel_dir"/ai_dynamo-*.whl)
# Arguments: the wheel, then the names to leave out.
"$PY" - "$wheel" "${EXCLUDED[@]}" > "$wheel_dir/requirements.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
whl = zipfile.ZipFile(sys.argv[1])
excluded = {canonicalize_name(n) for n in sys.argv[2:]}
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
        print(f"dynamo-env: leaving out {req}", file=sys.stderr)
        seen.add(name)
        continue
    req.marker = None
    print(str(req))
stale = sorted(excluded - seen)
if stale:
    sys.exit(f"dynamo-env: EXCLUDED names {', '.join(stale)}, which this ai-dynamo wheel does not require")
PYEOF
"$PY" -m pip install -q "$PYDANTIC" -r "$wheel_dir/requirements.txt" >&2
"$PY" -m pip install -q --no-deps "$wheel" >&2
# Every requirement holds but the ones left out on purpose.
problems=$("$PY" -m pip check 2>&1 | grep -v -E "^ai-dynamo $DYNAMO_VERSION requires ($(IFS='|'; echo "${EXCLUDED[*]}")),") || true
if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
  echo "dynamo-env: pip check after installing ai-dynamo $DYNAMO_VERSION:" >&2
  echo "$problems" >&2
  exit 1
fi
# What `python -m dynamo.vllm` and `python -m dynamo.frontend` import before
# they parse their arguments. (Not `python -m dynamo.vllm --help`: on a host
# without a GPU, vLLM's CUDA build fails to infer a device while building
# its argument parser, after these imports.)
"$PY" -c "import dynamo.vllm.main, dynamo.frontend.main"
"$PY" - >&2 <<'PYEOF'
import importlib.metadata as md
names = ("ai-dynamo", "ai-dynamo-runtime", "vllm", "pydantic", "pydantic-core")
print("dynamo-env:", ", ".join(f"{n} {md.version(n)}" for n in names))
PYEOF
touch "$STAMP"
echo "$VENV"
