#!/usr/bin/env bash
# Usage: ./scripts/python-env.sh [VLLM_VERSION]   (default 0.34.0)
#
# Makes (or reuses) the Python venv for one vLLM version, with what the
# Python package and the vLLM connector tests need: maturin, pytest, numpy,
# packaging, and the real vllm package at that version. One venv per version,
# outside the checkout ($KVTIER_VENV, default
# ~/.cache/kvtier/venv-vllm-<version>), so that every clone on the machine
# (CI's fresh clones too) reuses it. Prints its path on stdout, nothing else;
# progress goes to stderr.
#
# Only the versions in KNOWN_VERSIONS are supported: 0.34.0 (the newest we
# test) and 0.31.0 (NVIDIA Dynamo 1.6.1's pin). vllm's own pins are kept
# except those the registry cannot satisfy (RELAXED_PINS): its requirements
# are installed with those relaxed, then the wheel itself with --no-deps.
# A venv is large (about 9 GB), so a complete one (it has the stamp file) is
# reused; delete the venv to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
KNOWN_VERSIONS="0.34.0 0.31.0"
# Pins in a vllm wheel's Requires-Dist that the registry cannot satisfy, per
# vllm version: "<vllm version> <package> <requirement installed instead>".
# Every other pin of every known version resolves as vllm states it (checked
# with `pip install --dry-run` on the wheel's requirements).
RELAXED_PINS=(
  # vllm 0.34.0 pins flashinfer-python==0.7.3, a release the registry does
  # not carry (it has 0.7.2.post1 and 0.7.4): take 0.7.4, the next release
  # of the same series. The tests run on CPU and never load flashinfer.
  "0.34.0 flashinfer-python flashinfer-python==0.7.4"
)
VLLM_VERSION=${1:-0.34.0}
case " $KNOWN_VERSIONS " in
  *" $VLLM_VERSION "*) ;;
  *)
    echo "python-env: vllm $VLLM_VERSION is not a supported version (known: $KNOWN_VERSIONS);" \
      "add it to KNOWN_VERSIONS, with its RELAXED_PINS, in $0" >&2
    exit 2
    ;;
esac
VENV=${KVTIER_VENV:-$HOME/.cache/kvtier/venv-vllm-$VLLM_VERSION}
STAMP="$VENV/.kvtier-env-$VLLM_VERSION"
check_other_version() {
  # $KVTIER_VENV names one venv: it must not silently turn into another version's.
  local other
  for other in "$VENV"/.kvtier-env-*; do
    [ -e "$other" ] || continue
    [ "$other" = "$STAMP" ] && continue
    echo "python-env: $VENV holds vllm ${other##*/.kvtier-env-}, not $VLLM_VERSION;" \
      "point KVTIER_VENV elsewhere (or unset it) for this version" >&2
    exit 2
  done
}
check_other_version
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
# Two callers (CI and a person, or two matrix entries) must not build the
# same venv at once: the second waits, then finds the stamp.
exec 9>"$VENV.lock"
flock 9
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
echo "python-env: building $VENV (vllm $VLLM_VERSION; about 9 GB, a few minutes)" >&2
relaxed=()
for entry in "${RELAXED_PINS[@]}"; do
  read -r version name requirement <<<"$entry"
  if [ "$version" = "$VLLM_VERSION" ]; then relaxed+=("$name" "$requirement"); fi
done
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >&2
"$PY" -m pip install -q "maturin>=1.9,<2" pytest numpy packaging >&2
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"$PY" -m pip download -q --no-deps -d "$wheel_dir" "vllm==$VLLM_VERSION" >&2
wheel=$(ls "$wheel_dir"/vllm-*.whl)
# Arguments: the wheel, then pairs of (package, requirement instead).
"$PY" - "$wheel" ${relaxed[@]+"${relaxed[@]}"} > "$wheel_dir/requirements.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
whl = zipfile.ZipFile(sys.argv[1])
pairs = sys.argv[2:]
relaxed = {canonicalize_name(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}
used = set()
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    if name in relaxed:
        print(f"python-env: {req} relaxed to {relaxed[name]}", file=sys.stderr)
        print(relaxed[name])
        used.add(name)
        continue
    req.marker = None
    print(str(req))
stale = sorted(set(relaxed) - used)
if stale:
    sys.exit(f"python-env: RELAXED_PINS names {', '.join(stale)}, which this vllm wheel does not require")
PYEOF
"$PY" -m pip install -q -r "$wheel_dir/requirements.txt" >&2
"$PY" -m pip install -q --no-deps "$wheel" >&2
"$PY" -c "import vllm, sys; print('python-env: vllm', vllm.__version__, file=sys.stderr)"
touch "$STAMP"
echo "$VENV"
