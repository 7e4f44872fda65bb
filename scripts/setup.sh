#!/usr/bin/env bash
# Installs what kvtier's build and tests need on a fresh Debian machine that
# has the Rust toolchain. Safe to run again: it skips what is already there.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v mount >/dev/null 2>&1 || need_apt+=(mount)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
# The partition tests cut one node off in a network namespace of their
# own (unshare, util-linux; policy routing rules, ip).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: missing ${need_apt[*]}; install them with apt-get (needs root)" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found: install the Rust toolchain" >&2; exit 1; }
cargo fmt --version >/dev/null 2>&1 || { echo "setup: rustfmt missing from the toolchain" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "setup: clippy missing from the toolchain" >&2; exit 1; }
