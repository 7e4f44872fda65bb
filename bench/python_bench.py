"""Put/get throughput of 2 MiB blocks through the kvtier Python binding.

Run by `kvtier-bench python`, which measures the same work in Rust in the
same run; prints one JSON object.
"""

import argparse
import json
import statistics
import time

import numpy as np

import kvtier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-bytes", type=int, required=True)
    ap.add_argument("--block-bytes", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    n = a.total_bytes // a.block_bytes
    store = kvtier.Store({"host": {"capacity_bytes": a.total_bytes + (4 << 20)}})
    ns = store.register_namespace(
        {
            "model_id": "python-bench",
            "layout": {
                "num_layers": 1,
                "kv_heads": 1,
                "head_dim": 16,
                "block_tokens": a.block_bytes // 64,
                "kind": "kv",
                "dtype": "f16",
            },
        }
    )
    src = np.random.default_rng(5).integers(0, 255, a.total_bytes, dtype=np.uint8)
    dst = np.ones(a.total_bytes, dtype=np.uint8)  # touched
    puts, gets = [], []
    for r in range(a.rounds):
        keys = [kvtier.key_from_hash(ns, bytes([r]) + i.to_bytes(8, "little")) for i in range(n)]
        t = time.perf_counter()
        for i, k in enumerate(keys):
            store.put(ns, [k], src[i * a.block_bytes : (i + 1) * a.block_bytes])
        puts.append(a.total_bytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        for i, k in enumerate(keys):
            loaded, _ = store.get(ns, [k], dst[i * a.block_bytes : (i + 1) * a.block_bytes])
            assert loaded == 1
        gets.append(a.total_bytes / (time.perf_counter() - t) / 1e9)
        assert np.array_equal(src, dst)
        store.delete(ns, keys)
    print(json.dumps({"py_put_gbps": statistics.median(puts), "py_get_gbps": statistics.median(gets)}))


if __name__ == "__main__":
    main()
