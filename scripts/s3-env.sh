#!/usr/bin/env bash
# Usage: ./scripts/s3-env.sh
#
# Makes (or reuses) the Python venv with the real S3 clients that
# connectors/s3/tests point at kvtierd's S3 listener, and prints its path on
# stdout, nothing else; progress goes to stderr. The clients:
#
# - boto3 (and botocore, s3transfer), the reference S3 client;
# - nixl-cu12 1.5.1, NVIDIA NIXL with its OBJ (S3) plugin, which runs on a
#   CPU. Not `nixl`: nixl 1.5.2, the registry's newest, is a meta-package
#   requiring nixl-cu12==1.5.2, which the registry does not carry; 1.5.1 is
#   the newest nixl-cu12 there, installed directly;
# - s3torchconnector 1.5.0 with its `dcp` extra (tenacity), for PyTorch
#   distributed checkpoints (S3StorageWriter / S3StorageReader); it is an
#   sdist, built here, around the s3torchconnectorclient 1.5.0 wheel;
# - pytest and numpy.
#
# Why the LMCache venv, not one of its own: nixl-cu12 and s3torchconnector
# need torch, and PyPI's Linux torch is the CUDA build (about 3 GB with its
# nvidia-* libraries). The LMCache 0.5.6 venv (scripts/lmcache-env.sh)
# already has torch 2.13.0, and every pin agrees with it (checked with
# `pip install --dry-run` and `pip check`): nixl-cu12 1.5.1 asks for any
# torch and numpy, s3torchconnector 1.5.0 for torch>=2.3,!=2.5.0,
# s3torchconnectorclient and boto3 for nothing the venv pins. The layer adds
# about 0.3 GB instead of a second ~5 GB venv, and puts LMCache's own
# `s3://` remote backend next to the clients. It is added once (the stamp
# file), under the venv's lock (the one lmcache-env.sh takes), so two
# callers never install at the same time.
#
# Pins relaxed: none of these clients'. One requirement is left unmet on
# purpose, the same one lmcache-env.sh leaves: torch's triton (about
# 0.7 GB), which lmcache-env.sh removes because only torch's GPU kernel
# compiler imports it; pip would otherwise reinstall it with these clients.
# So the clients' requirements are resolved by pip (`--dry-run --report`)
# and installed at exactly the resolved versions with --no-deps, all but
# triton. `pip check` then reports only what lmcache-env.sh names (triton,
# and lmcache's GPU-only cupy-cuda13x and cufile-python).
#
# boto3 is pinned (BOTO3) because the tests rely on what its botocore sends
# by default (flexible checksums since botocore 1.36: CRC32 in a header over
# HTTP, in an aws-chunked trailer over HTTPS); raise it deliberately.
set -euo pipefail
cd "$(dirname "$0")/.."
LMCACHE_VERSION=0.5.6
BOTO3=boto3==1.44.8
NIXL=nixl-cu12==1.5.1
S3TORCH="s3torchconnector[dcp]==1.5.0"
# Resolved as a requirement of the clients but not installed (see above).
REMOVED=(triton)
# What lmcache-env.sh leaves out of the LMCache venv, which pip check reports.
LMCACHE_LEFT_OUT=(cupy-cuda13x cufile-python triton)
VENV=$(./scripts/lmcache-env.sh "$LMCACHE_VERSION")
LAYER="s3-clients-1"   # bump when the list above changes
STAMP="$VENV/.kvtier-$LAYER"
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
echo "s3-env: adding the S3 clients ($BOTO3, $NIXL, $S3TORCH) to $VENV" >&2
PY="$VENV/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install -q --dry-run --report "$work/report.json" \
  "$BOTO3" "$NIXL" "$S3TORCH" pytest numpy >&2
# Arguments: the report, then the names not to install.
"$PY" - "$work/report.json" "${REMOVED[@]}" > "$work/requirements.txt" <<'PYEOF'
import json, sys
from packaging.utils import canonicalize_name
report = json.load(open(sys.argv[1]))
removed = {canonicalize_name(n) for n in sys.argv[2:]}
for item in report["install"]:
    meta = item["metadata"]
    name = canonicalize_name(meta["name"])
    if name in removed:
        print(f"s3-env: not installing {meta['name']} {meta['version']}", file=sys.stderr)
        continue
    print(f"{name}=={meta['version']}")
PYEOF
"$PY" -m pip install -q --no-deps -r "$work/requirements.txt" >&2
# Every requirement holds but the ones lmcache-env.sh leaves out on purpose.
problems=$("$PY" -m pip check 2>&1 | grep -v -i -E "requires ($(IFS='|'; echo "${LMCACHE_LEFT_OUT[*]}"))," ) || true
if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
  echo "s3-env: pip check after adding the S3 clients:" >&2
  echo "$problems" >&2
  exit 1
fi
# What the tests import: NIXL's agent (its OBJ plugin is found at
# create_backend time), s3torchconnector's DCP writer and reader, boto3.
"$PY" - >&2 <<'PYEOF'
import importlib.metadata as md, sys
import boto3, botocore.auth
import nixl_cu12._api  # nixl-cu12 installs the module nixl_cu12 (the `nixl` meta-package would alias it)
import s3torchconnector.dcp
from s3torchconnector._s3client import S3ClientConfig
import torch.distributed.checkpoint
names = ("boto3", "botocore", "nixl-cu12", "s3torchconnector", "s3torchconnectorclient", "torch", "lmcache")
print("s3-env:", ", ".join(f"{n} {md.version(n)}" for n in names), file=sys.stderr)
PYEOF
touch "$STAMP"
echo "$VENV"
