#!/usr/bin/env bash
# Installs (or reuses) Azurite, the Azure Storage emulator, pinned to 3.35.0
# (the newest that runs on Node 20), under ~/.cache/kvtier/azurite
# ($KVTIER_AZURITE_DIR). Prints the path of its azurite-blob command; the
# tests start it on a free 127.0.0.1 port with its data in a temporary
# directory, and stop it.
set -euo pipefail
DIR=${KVTIER_AZURITE_DIR:-$HOME/.cache/kvtier/azurite}
BIN="$DIR/node_modules/.bin/azurite-blob"
if [ ! -x "$BIN" ]; then
  command -v npm >/dev/null 2>&1 || { echo "azurite.sh: npm is missing (install Node.js 20)" >&2; exit 1; }
  mkdir -p "$DIR"
  (cd "$DIR" && npm install --silent --no-audit --no-fund azurite@3.35.0 >&2)
fi
echo "$BIN"
