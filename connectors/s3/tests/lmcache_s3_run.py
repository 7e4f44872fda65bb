"""Run by test_lmcache.py in a mount namespace whose /etc/hosts maps the
virtual-host name to 127.0.0.1: LMCache 0.5.6's own ``s3://`` remote
backend (lmcache.v1.storage_backend.connector.s3_connector.S3Connector,
through the RemoteBackend that LMCache's CreateStorageBackends builds)
puts full chunks and reads them back.

Usage: lmcache_s3_run.py HOST:PORT REGION ACCESS_KEY SECRET_KEY MODEL
Prints one JSON line: {"keys": [...], "ok": true} or exits non-zero."""

import asyncio
import json
import os
import sys
import threading

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

CHUNK = 16
KV_SHAPE = (2, 2, CHUNK, 2, 32)  # layers, k/v, chunk tokens, heads, head size: 8 KiB chunks
# (LMCache uploads only chunks whose allocation, rounded to 4 KiB, is exactly
# the full chunk size)


def main():
    host, region, access_key, secret_key, model = sys.argv[1:6]
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.01,
        remote_url=f"s3://{host}",
        remote_serde="naive",
        blocking_timeout_secs=20,
        lmcache_instance_id="kvtier-s3-lmcache-test",
    )
    cfg.extra_config = {
        "s3_region": region,
        "disable_tls": True,  # http: kvtierd's listener on 127.0.0.1
        "s3_num_io_threads": 2,
        "aws_access_key_id": access_key,
        "aws_secret_access_key": secret_key,
    }
    metadata = LMCacheMetadata(
        model_name=model,
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=KV_SHAPE,
        chunk_size=CHUNK,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cpu = LocalCPUBackend(cfg, metadata, dst_device="cpu")
    remote = RemoteBackend(cfg, metadata, loop, cpu, "cpu")
    assert remote.connection is not None, "LMCache built no S3 connector"
    keys = [CacheEngineKey(model, 1, 0, h, torch.bfloat16) for h in (-(1 << 63), 7, (1 << 64) - 1)]
    (shape,) = metadata.get_shapes()
    want = []
    for i, k in enumerate(keys):
        assert not remote.contains(k), k.to_string()
        obj = cpu.allocate([shape], metadata.get_dtypes())
        obj.tensor.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16))
        want.append(obj.tensor.clone())
        remote.submit_put_task(k, obj).result(30)
    for k, w in zip(keys, want):
        assert remote.contains(k), k.to_string()
        got = remote.get_blocking(k)
        assert got is not None, k.to_string()
        assert torch.equal(got.tensor, w), k.to_string()
        got.ref_count_down()
    missing = CacheEngineKey(model, 1, 0, 12345, torch.bfloat16)
    assert not remote.contains(missing)
    assert remote.get_blocking(missing) is None
    # The object names LMCache used: the key string, '/' flattened to '_'.
    print(json.dumps({"keys": [k.to_string().replace("/", "_") for k in keys], "ok": True}), flush=True)
    # Not remote.close(): LMCache 0.5.6's S3Connector.close() deadlocks (its
    # AsyncPQExecutor.shutdown, called on the event loop, waits for a future
    # that only that loop would run). Every request has completed here.
    os._exit(0)


if __name__ == "__main__":
    main()
