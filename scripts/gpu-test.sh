#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and driver (CI machines
# have none; ./scripts/test.sh covers the same code path on CPU tensors):
# - the CUDA copier's round trip through device memory (Rust test);
# - kvtier-bench transfer: d2h_gbps / h2d_gbps of block copies between GPU KV
#   tensors and pinned staging, next to one raw copy of the same bytes;
# - the Python binding moving blocks between CUDA tensors and staging.
# Every step fails, rather than skips, when no GPU is found.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export KVTIER_EXPECT_CUDA=1
echo "== cargo test (CUDA copier)"
cargo test -p kvtier --features cuda transfer::cuda -- --nocapture
echo "== kvtier-bench transfer"
cargo build --release -q -p kvtier-bench
./target/release/kvtier-bench transfer --require-gpu --json
echo "== python: blocks between CUDA tensors and staging"
VENV=$(./scripts/python-env.sh)
./scripts/python-test.sh >/dev/null
"$VENV/bin/python" - <<'PY'
import numpy as np, torch, kvtier
assert torch.cuda.is_available(), "torch sees no GPU"
kv = torch.randn(64, 2, 16, 256, dtype=torch.float16, device="cuda")   # (blocks, heads, tokens, K|V)
per = kv[0].numel() * kv.element_size()
staging = np.zeros(3 * per, np.uint8)
layers = [(kv.data_ptr(), kv.stride(0) * kv.element_size(), kv.shape[0])]
kvtier._kvtier._copy_blocks("save", layers, per, [5, 9, 63], staging, "cuda:0")
want = torch.cat([kv[i].contiguous().view(-1).view(torch.uint8).cpu() for i in (5, 9, 63)]).numpy()
assert np.array_equal(staging, want), "saved bytes differ"
kv.zero_()
kvtier._kvtier._copy_blocks("load", layers, per, [5, 9, 63], staging, "cuda:0")
got = torch.cat([kv[i].contiguous().view(-1).view(torch.uint8).cpu() for i in (5, 9, 63)]).numpy()
assert np.array_equal(got, staging), "loaded bytes differ"
print("python CUDA round trip: ok")
PY
