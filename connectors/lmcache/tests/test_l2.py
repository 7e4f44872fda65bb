"""kvtier as the L2 of LMCache's multiprocess server, driven by LMCache's own
machinery: the ``native_plugin`` loader and ``NativeConnectorL2Adapter``
(what ``lmcache server --l2-adapter`` builds), with real CPU memory objects.
No GPU: the server's L1 objects are CPU tensors here, as in ``lmcache bench l2``."""

import argparse
import glob
import json
import select

import pytest
import torch

import kvtier
import kvtier.lmcache
from kvtier_testkit import Daemon, free_port

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
from lmcache.v1.platform import consume_fd

SIZE = 16 * 1024


def adapter(params):
    """The adapter exactly as `lmcache server --l2-adapter JSON` makes it."""
    spec = {
        "type": "native_plugin",
        "module_path": "kvtier.lmcache",
        "class_name": "KvTierL2",
        "adapter_params": {"chunk_bytes": SIZE, **params},
        "max_capacity_gb": 1,
    }
    cfg = parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[json.dumps(spec)]))
    return create_l2_adapter(cfg.adapters[0])


def wait(fd, what):
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(30_000), f"no {what} completion within 30 s"
    consume_fd(fd)


def objects(n, seed=None, size=SIZE):
    buf = torch.empty(n * size, dtype=torch.uint8)
    out = []
    for i in range(n):
        t = buf[i * size : (i + 1) * size]
        if seed is None:
            t.zero_()
        else:
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            t.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g))
        meta = MemoryObjMetadata(
            shape=torch.Size([size]), dtype=torch.uint8, address=i * size,
            phy_size=size, fmt=MemoryFormat.KV_2LTD, ref_count=1,
        )
        out.append(TensorMemoryObj(raw_data=t, metadata=meta, parent_allocator=None))
    return out


def keys(n, tag=0, model="org/model", rank=3, group=1, salt=""):
    return [
        ObjectKey(chunk_hash=bytes([tag]) + i.to_bytes(15, "little"), model_name=model, kv_rank=rank,
                  object_group_id=group, cache_salt=salt)
        for i in range(n)
    ]


def store(a, ks, objs):
    tid = a.submit_store_task(ks, objs)
    wait(a.get_store_event_fd(), "store")
    return a.pop_completed_store_tasks()[tid]


def lookup(a, ks):
    tid = a.submit_lookup_and_lock_task(ks, {1: MemoryLayoutDesc(shapes=[], dtypes=[])})
    wait(a.get_lookup_and_lock_event_fd(), "lookup")
    bm = a.query_lookup_and_lock_result(tid)
    a.submit_unlock(ks)
    return [bm.test(i) for i in range(len(ks))]


def load(a, ks, size=SIZE):
    dst = objects(len(ks), size=size)
    tid = a.submit_load_task(ks, dst)
    wait(a.get_load_event_fd(), "load")
    bm = a.query_load_result(tid)
    return [bm.test(i) for i in range(len(ks))], dst


@pytest.fixture
def ssd(tmp_path):
    a = adapter({"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 256 << 20})
    yield a
    a.close()


@pytest.mark.parametrize("n", [1, 7, 200])
def test_set_exists_get_delete_byte_for_byte(ssd, n):
    ks, src = keys(n, tag=n), objects(n, seed=n)
    assert int(store(ssd, ks, src)) == n * SIZE
    probe = ks + keys(1, tag=250)
    assert lookup(ssd, probe) == [True] * n + [False]
    hit, dst = load(ssd, probe)
    assert hit == [True] * n + [False]
    for s, d in zip(src, dst):
        assert torch.equal(s.raw_data, d.raw_data)
    ssd.delete(ks[:1])
    assert lookup(ssd, ks[:2]) == [False] + [True] * (min(n, 2) - 1)


def test_a_short_last_chunk_round_trips_at_its_own_length(ssd):
    ks, src = keys(1, tag=9), objects(1, seed=9, size=SIZE // 3)
    store(ssd, ks, src)
    hit, dst = load(ssd, ks, size=SIZE // 3)
    assert hit == [True]
    assert torch.equal(src[0].raw_data, dst[0].raw_data)
    # Read into a buffer of another length it is a miss, never a wrong fill.
    hit, _ = load(ssd, ks, size=SIZE // 2)
    assert hit == [False]


def test_another_model_rank_group_or_salt_never_matches(ssd):
    ks = keys(2, tag=1)
    store(ssd, ks, objects(2, seed=1))
    for other in (keys(2, tag=1, model="org/other"), keys(2, tag=1, rank=4), keys(2, tag=1, group=2),
                  keys(2, tag=1, salt="tenant-b")):
        assert lookup(ssd, other) == [False, False]
        assert load(ssd, other)[0] == [False, False]
    assert lookup(ssd, ks) == [True, True]


def test_bad_keys_and_oversize_objects_fail_precisely_and_change_nothing(tmp_path):
    l2 = kvtier.lmcache.KvTierL2(chunk_bytes=SIZE, disk_dir=str(tmp_path / "ssd"),
                                 disk_capacity_bytes=64 << 20)
    try:
        fd = l2.event_fd()

        def done():
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(10_000)
            (c,) = l2.drain_completions()
            return c

        big = bytearray(SIZE + 1)
        l2.submit_batch_set(["m@00000000@0@aa", "not a key", "m@00000000@0@bb"],
                            [bytearray(8), bytearray(8), big])
        _, ok, error, per_key = done()
        assert not ok
        assert per_key == [True, False, False]
        assert "model@kv_rank@group@hash" in error and "chunk_bytes" in error
        l2.submit_batch_exists(["m@00000000@0@aa", "m@00000000@0@bb"])
        assert done()[3] == [True, False]
        with pytest.raises(kvtier.InvalidArgumentError, match="one buffer per key"):
            l2.submit_batch_get(["m@00000000@0@aa"], [])
    finally:
        l2.close()
        l2.close()  # idempotent
    with pytest.raises(kvtier.KvTierError, match="closed"):
        l2.submit_batch_exists(["m@00000000@0@aa"])
    with pytest.raises(kvtier.InvalidArgumentError, match="exactly one of"):
        kvtier.lmcache.KvTierL2(chunk_bytes=SIZE)
    with pytest.raises(kvtier.InvalidArgumentError, match="chunk_bytes"):
        kvtier.lmcache.KvTierL2(chunk_bytes=0, disk_dir=str(tmp_path / "x"))


def test_chunks_survive_a_restart_of_lmcache_and_kvtierd(tmp_path):
    port = free_port()
    env = {"KVTIER_LISTEN": f"127.0.0.1:{port}"}
    d = Daemon(tmp_path / "data", env=env)
    try:
        a = adapter({"endpoint": d.endpoint})
        ks, src = keys(5, tag=5), objects(5, seed=5)
        assert int(store(a, ks, src)) == 5 * SIZE
        a.close()
        d.stop()
        d = Daemon(tmp_path / "data", env=env)
        b = adapter({"endpoint": d.endpoint})
        assert lookup(b, ks) == [True] * 5
        hit, dst = load(b, ks)
        assert hit == [True] * 5
        assert all(torch.equal(s.raw_data, t.raw_data) for s, t in zip(src, dst))
        b.close()
    finally:
        d.stop()


def test_kvtierd_down_means_misses_then_it_comes_back(tmp_path):
    port = free_port()
    env = {"KVTIER_LISTEN": f"127.0.0.1:{port}"}
    d = Daemon(tmp_path / "data", env=env)
    a = adapter({"endpoint": d.endpoint, "timeout_s": 2.0})
    try:
        ks = keys(3, tag=3)
        store(a, ks, objects(3, seed=3))
        d.stop()
        # Down: stores fail (-1), lookups and loads miss; nothing raises.
        assert int(store(a, keys(1, tag=4), objects(1, seed=4))) == -1
        assert lookup(a, ks) == [False] * 3
        assert load(a, ks)[0] == [False] * 3
        d = Daemon(tmp_path / "data", env=env)
        # Back at the same address: the same adapter reaches it again, and
        # registers its shared-memory regions with the new daemon (the old
        # ids name nothing there).
        assert lookup(a, ks) == [True] * 3
        hit, dst = load(a, ks)
        assert hit == [True] * 3
        assert all(torch.equal(s.raw_data, t.raw_data) for s, t in zip(objects(3, seed=3), dst))
        assert int(store(a, keys(1, tag=4), objects(1, seed=4))) == SIZE
        assert a._client.transport() == "regions"
    finally:
        a.close()
        d.stop()


def test_a_corrupt_block_on_kvtiers_ssd_is_a_miss_never_wrong_bytes(tmp_path):
    a = adapter({"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 256 << 20})
    ks, src = keys(2, tag=6), objects(2, seed=6)
    store(a, ks, src)
    a.close()
    # Flip bytes of the first object where it lies on the SSD.
    needle = src[0].raw_data[:64].numpy().tobytes()
    hits = 0
    for seg in glob.glob(str(tmp_path / "ssd" / "*.seg")):
        data = bytearray(open(seg, "rb").read())
        at = data.find(needle)
        if at >= 0:
            data[at + 100] ^= 0xFF
            open(seg, "wb").write(bytes(data))
            hits += 1
    assert hits == 1, "the object's bytes were found once on the SSD"
    b = adapter({"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 256 << 20})
    try:
        hit, dst = load(b, ks)
        assert hit == [False, True]
        assert torch.equal(dst[1].raw_data, src[1].raw_data)
        assert not torch.equal(dst[0].raw_data, src[0].raw_data), "the corrupt object was not served"
    finally:
        b.close()


def l2_of(a):
    """The KvTierL2 inside LMCache's adapter."""
    return a._client


@pytest.mark.parametrize("shm", ["daemon's", "none", "other"])
def test_bytes_go_through_shared_memory_when_kvtierd_takes_them(tmp_path, shm):
    """With a local kvtierd the bytes move through regions in its shm_dir;
    with regions off on our side, or a daemon that cannot see our region
    (another shm_dir), they go over the socket, with the same results."""
    env = {"KVTIER_LISTEN": f"127.0.0.1:{free_port()}", "KVTIER_SHM_DIR": str(tmp_path / "shm")}
    (tmp_path / "shm").mkdir()
    (tmp_path / "elsewhere").mkdir()
    params = {
        "daemon's": {"shm_dir": str(tmp_path / "shm")},
        "none": {"shm_dir": None},
        "other": {"shm_dir": str(tmp_path / "elsewhere")},
    }[shm]
    d = Daemon(tmp_path / "data", env=env)
    a = adapter({"endpoint": d.endpoint, **params})
    try:
        ks, src = keys(40, tag=9), objects(40, seed=9)
        assert int(store(a, ks, src)) == 40 * SIZE
        assert lookup(a, ks) == [True] * 40
        hit, dst = load(a, ks)
        assert hit == [True] * 40
        assert all(torch.equal(s.raw_data, t.raw_data) for s, t in zip(src, dst))
        # A short chunk through the same path.
        short_k, short = keys(1, tag=10), objects(1, seed=10, size=SIZE // 3)
        assert int(store(a, short_k, short)) == SIZE // 3
        hit, back = load(a, short_k, size=SIZE // 3)
        assert hit == [True] and torch.equal(back[0].raw_data, short[0].raw_data)
        want = {"daemon's": "regions", "none": "socket", "other": "socket"}[shm]
        assert l2_of(a).transport() == want
        regions = list((tmp_path / "shm").glob("kvtier-*"))
        if want == "regions":
            assert regions, "no region file in the daemon's shm_dir"
    finally:
        a.close()
        d.stop()
    # Closing let the regions go: their files are removed.
    assert not list((tmp_path / "shm").glob("kvtier-*"))
    assert not list((tmp_path / "elsewhere").glob("kvtier-*"))
