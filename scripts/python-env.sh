#!/usr/bin/env bash
# Makes (or reuses) the project's one Python venv with what the Python
# package and the vLLM connector tests need: maturin, pytest, numpy, and the
# real vllm package, pinned. It lives outside the checkout
# ($KVTIER_VENV, default ~/.cache/kvtier/venv-vllm-<version>) so that every
# clone on the machine (CI's fresh clones too) reuses it. Prints its path.
#
# vllm 0.33.0's wheel asks for certifi>=2026.10.19, which the registry does
# not carry: its requirements are installed with that pin relaxed, then the
# wheel itself with --no-deps. The venv is large (about 9 GB), so a present,
# complete one is reused; delete .venv to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.33.0
VENV=${KVTIER_VENV:-$HOME/.cache/kvtier/venv-vllm-$VLLM_VERSION}
STAMP="$VENV/.kvtier-env-$VLLM_VERSION"
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
echo "python-env: building $VENV (vllm $VLLM_VERSION; about 9 GB, a few minutes)" >&2
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "maturin>=1.9,<2" pytest numpy packaging
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"$PY" -m pip download -q --no-deps -d "$wheel_dir" "vllm==$VLLM_VERSION"
wheel=$(ls "$wheel_dir"/vllm-*.whl)
"$PY" - "$wheel" > "$wheel_dir/requirements.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() == "certifi":
        print("certifi")  # the pinned minimum is not on the registry
        continue
    req.marker = None
    print(str(req))
PYEOF
"$PY" -m pip install -q -r "$wheel_dir/requirements.txt"
"$PY" -m pip install -q --no-deps "$wheel"
"$PY" -c "import vllm, sys; print('python-env: vllm', vllm.__version__, file=sys.stderr)"
touch "$STAMP"
echo "$VENV"
