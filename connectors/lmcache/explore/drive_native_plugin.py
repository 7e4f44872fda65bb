"""Drives dummy_native_plugin through LMCache 0.5.6's own `native_plugin`
loader and NativeConnectorL2Adapter, on CPU, with real TensorMemoryObj
buffers: store, lookup-and-lock, load, delete, usage, and a failing store.

Run: PYTHONPATH=connectors/lmcache/explore $(scripts/lmcache-env.sh)/bin/python \
       connectors/lmcache/explore/drive_native_plugin.py
"""

import argparse
import json
import os
import select
import tempfile

import torch

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config
from lmcache.v1.distributed.l2_adapters.native_connector_l2_adapter import (
    _object_key_to_string,
)
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
from lmcache.v1.platform import consume_fd

SIZE = 4096


def wait(fd, what):
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(10_000), f"no {what} completion within 10 s"
    consume_fd(fd)


def objects(n, fill):
    buf = torch.empty(n * SIZE, dtype=torch.uint8)
    out = []
    for i in range(n):
        t = buf[i * SIZE : (i + 1) * SIZE]
        t.fill_(fill + i if fill is not None else 0)
        meta = MemoryObjMetadata(
            shape=torch.Size([SIZE]), dtype=torch.uint8, address=i * SIZE,
            phy_size=SIZE, fmt=MemoryFormat.KV_2LTD, ref_count=1,
        )
        out.append(TensorMemoryObj(raw_data=t, metadata=meta, parent_allocator=None))
    return out


def adapter(params):
    spec = {
        "type": "native_plugin",
        "module_path": "dummy_native_plugin",
        "class_name": "DummyNativeConnector",
        "adapter_params": params,
        "max_capacity_gb": 1,
    }
    cfg = parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[json.dumps(spec)]))
    return create_l2_adapter(cfg.adapters[0])


def main():
    log = tempfile.mktemp(prefix="dummy-native-", suffix=".log")
    a = adapter({"log_path": log})
    print("adapter:", type(a).__name__, a.report_status())
    keys = [
        ObjectKey(chunk_hash=bytes([i]) * 16, model_name="org/model", kv_rank=3,
                  object_group_id=1, cache_salt="salt" if i == 2 else "")
        for i in range(3)
    ]
    print("key strings:", [_object_key_to_string(k) for k in keys])

    src = objects(3, 7)
    tid = a.submit_store_task(keys, src)
    wait(a.get_store_event_fd(), "store")
    print("store result:", a.pop_completed_store_tasks()[tid])

    probe = keys[:2] + [ObjectKey(chunk_hash=b"\xff" * 16, model_name="org/model", kv_rank=3)]
    tid = a.submit_lookup_and_lock_task(probe, {1: MemoryLayoutDesc(shapes=[], dtypes=[])})
    wait(a.get_lookup_and_lock_event_fd(), "lookup")
    bm = a.query_lookup_and_lock_result(tid)
    print("lookup bitmap:", [bm.test(i) for i in range(3)], "locked:", dict(a._locked_keys))
    a.submit_unlock(probe)

    dst = objects(3, None)
    tid = a.submit_load_task(probe, dst)
    wait(a.get_load_event_fd(), "load")
    bm = a.query_load_result(tid)
    print("load bitmap:", [bm.test(i) for i in range(3)])
    assert torch.equal(dst[0].raw_data, src[0].raw_data)
    assert torch.equal(dst[1].raw_data, src[1].raw_data)
    print("loaded bytes equal stored bytes: yes")

    print("usage before delete:", a.get_usage())
    a.delete(keys[:1])
    print("usage after delete:", a.get_usage())
    a.close()
    print("--- what the plugin was handed ---")
    print(open(log).read(), end="")
    os.unlink(log)

    b = adapter({"fail_sets": True})
    tid = b.submit_store_task(keys[:1], objects(1, 1))
    wait(b.get_store_event_fd(), "store")
    print("failing store result:", b.pop_completed_store_tasks()[tid])
    b.close()


if __name__ == "__main__":
    main()
