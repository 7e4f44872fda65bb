"""Loads dummy_remote_plugin through LMCache 0.5.6's own remote-storage
plugin path (remote_storage_plugins + extra_config, URL plugin://kvtier) into
a RemoteBackend over a CPU LocalCPUBackend, and puts, finds and gets one chunk.

Run: PYTHONPATH=connectors/lmcache/explore $(scripts/lmcache-env.sh)/bin/python \
       connectors/lmcache/explore/drive_remote_plugin.py
"""

import asyncio
import threading

import torch

import dummy_remote_plugin
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

CHUNK = 16
KV_SHAPE = (2, 2, CHUNK, 2, 8)  # layers, k/v, chunk tokens, heads, head size


def main():
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.01,
        remote_serde="naive", lmcache_instance_id="explore",
    )
    config.remote_storage_plugins = ["kvtier"]
    config.extra_config = {
        "remote_storage_plugin.kvtier.module_path": "dummy_remote_plugin",
        "remote_storage_plugin.kvtier.class_name": "DummyRemoteConnector",
    }
    metadata = LMCacheMetadata(
        model_name="org/model", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=KV_SHAPE,
        chunk_size=CHUNK,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cpu = LocalCPUBackend(config, metadata, dst_device="cpu")
    remote = RemoteBackend(config, metadata, loop, cpu, "cpu", plugin_name="kvtier")
    print("connection:", remote.connection)

    key = CacheEngineKey("org/model", 1, 0, 0xABCDEF, torch.bfloat16)
    print("key string:", key.to_string())
    # A full chunk, in the shapes LMCache itself uses for one (KV_2LTD).
    obj = cpu.allocate(metadata.get_shapes(), metadata.get_dtypes())
    obj.tensor.copy_(torch.randn(obj.tensor.shape).to(torch.bfloat16))
    want = obj.tensor.clone()
    print("contains before put:", remote.contains(key))
    fut = remote.submit_put_task(key, obj)
    fut.result(timeout=10)
    print("contains after put:", remote.contains(key))
    got = remote.get_blocking(key)
    print("get_blocking:", type(got).__name__, "equal:", torch.equal(got.tensor, want))
    missing = CacheEngineKey("org/model", 1, 0, 0x1, torch.bfloat16)
    print("get_blocking(missing):", remote.get_blocking(missing))
    got.ref_count_down()
    obj.ref_count_down()
    remote.close()
    print("calls:", dummy_remote_plugin.CALLS)


if __name__ == "__main__":
    main()
