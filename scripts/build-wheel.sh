#!/usr/bin/env bash
# Builds the kvtier wheel into target/wheels/ and prints its path. Extra
# arguments go to `maturin build` (default: --release).
#
# The engine connectors live in connectors/<engine>/, each with its tests
# and README; the wheel ships them under the import paths users type. Every
# file under connectors/<engine>/kvtier/ is the module of that path
# (connectors/vllm/kvtier/vllm.py is `kvtier.vllm`): it is copied into the
# package, python/kvtier/, before maturin packs it. The copies are ignored by
# git and overwritten by every build; edit the files in connectors/.
# (maturin's `include` keeps paths relative to python/, and a symlink does
# not survive every checkout and sdist: hence the copy.)
# scripts/python-test.sh checks that the installed wheel holds each one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${KVTIER_PYTHON:-$(./scripts/python-env.sh)/bin/python}
for module in connectors/*/kvtier/*.py; do
  [ -e "$module" ] || continue
  dest="python/kvtier/${module#connectors/*/kvtier/}"
  # The copy must never be committed: the source is the one in connectors/.
  if git rev-parse --git-dir >/dev/null 2>&1; then
    if git ls-files --error-unmatch "$dest" >/dev/null 2>&1; then
      echo "build-wheel: $dest is tracked by git: git rm --cached it (its source is $module)" >&2
      exit 1
    fi
    if ! git check-ignore -q --no-index "$dest"; then
      echo "build-wheel: add /$dest to .gitignore (its source is $module)" >&2
      exit 1
    fi
  fi
  cp "$module" "$dest"
done
rm -rf target/wheels
if [ $# -eq 0 ]; then set -- --release; fi
(cd python && "$PY" -m maturin build -q -o ../target/wheels "$@") >&2
ls target/wheels/kvtier-*.whl
