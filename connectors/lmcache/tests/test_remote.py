"""kvtier as a remote-storage plugin of in-process LMCache, loaded by
LMCache 0.5.6's own plugin loader (``remote_storage_plugins`` plus
``extra_config``, URL ``plugin://kvtier``) into the ``RemoteBackend`` its
``CreateStorageBackends`` builds, over a real ``LocalCPUBackend``, with a
real kvtierd on 127.0.0.1 or an embedded store. No GPU: LMCache's chunks
are CPU tensors here, as in its own CPU-only runs."""

import asyncio
import glob
import subprocess
import sys
import threading
import time

import pytest
import torch

import kvtier
from kvtier_testkit import Daemon, free_port

from lmcache.utils import CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

CHUNK = 16
KV_SHAPE = (2, 2, CHUNK, 2, 8)  # layers, k/v, chunk tokens, heads, head size
MODEL = "org/model"


def eventually(what, check, secs=10):
    deadline = time.monotonic() + secs
    while not check():
        assert time.monotonic() < deadline, f"{what} within {secs} s"
        time.sleep(0.01)


class Engine:
    """What LMCache's CreateStorageBackends builds for
    ``remote_storage_plugins: [name]``: a LocalCPUBackend and a
    RemoteBackend for ``plugin://name``, with the engine's loop on a thread."""

    def __init__(self, options, *, name="kvtier", class_name="KvTierConnectorAdapter", model=MODEL,
                 dtype=torch.bfloat16, world_size=1, worker_id=0, timeout_s=10, **config):
        cfg = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.01, remote_serde="naive",
            lmcache_instance_id=f"kvtier-test-{id(self)}", blocking_timeout_secs=timeout_s, **config,
        )
        cfg.remote_storage_plugins = [name]
        cfg.extra_config = {
            f"remote_storage_plugin.{name}.module_path": "kvtier.lmcache",
            f"remote_storage_plugin.{name}.class_name": class_name,
            **{f"remote_storage_plugin.{name}.{k}": v for k, v in options.items()},
        }
        self.metadata = LMCacheMetadata(
            model_name=model, world_size=world_size, local_world_size=world_size, worker_id=worker_id,
            local_worker_id=worker_id, kv_dtype=dtype, kv_shape=KV_SHAPE, chunk_size=CHUNK,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cpu = LocalCPUBackend(cfg, self.metadata, dst_device="cpu")
        self.remote = RemoteBackend(cfg, self.metadata, self.loop, self.cpu, "cpu", plugin_name=name)
        self.closed = False

    @property
    def connector(self):
        """The kvtier connector inside LMCache's instrumentation wrapper. The
        loader logs its failures and goes on without the backend: assert."""
        conn = self.remote.connection
        assert conn is not None, "LMCache's plugin loader did not build the kvtier connector"
        inner = conn.getWrappedConnector()
        assert type(inner).__name__ == "KvTierConnector" and type(inner).__module__ == "kvtier._lmcache_remote"
        return inner

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def chunk(self, seed, tokens=CHUNK):
        """A chunk in the engine's layout (KV_2LTD), ``tokens`` of them."""
        (full,) = self.metadata.get_shapes()
        shape = torch.Size([full[0], full[1], tokens, full[3]])
        obj = self.cpu.allocate([shape], self.metadata.get_dtypes())
        g = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(shape, generator=g).to(self.metadata.kv_dtype))
        return obj

    def put(self, keys, objs):
        """Through the RemoteBackend: the first alone, the rest as a batch.
        Done when every chunk is back to the caller's one reference (the
        batched path has no future): kvtier and LMCache let go of them."""
        self.remote.submit_put_task(keys[0], objs[0]).result(30)
        if len(keys) > 1:
            self.remote.batched_submit_put_task(keys[1:], objs[1:])
        eventually("the put, and the chunks let go", lambda: all(o.get_ref_count() == 1 for o in objs))

    def list(self):
        return self.run(self.connector.list())

    def close(self):
        if not self.closed:
            self.closed = True
            self.remote.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def release(objs):
    for o in objs:
        o.ref_count_down()


def key(h, model=MODEL, dtype=torch.bfloat16, world_size=1, worker_id=0, tags=None):
    return CacheEngineKey(model, world_size, worker_id, h, dtype,
                          {f"lmcache.tag.{k}": v for k, v in (tags or {}).items()})


# Hashes as LMCache makes them: Python's hash (signed) and digests folded to
# 8 bytes (unsigned), the extremes included.
HASHES = [-(1 << 63), -5, 0, 0xABCDEF, (1 << 64) - 1]


@pytest.fixture
def engine(kvtierd):
    e = Engine({"endpoint": kvtierd.endpoint})
    yield e
    e.close()


@pytest.mark.parametrize("class_name", ["KvTierConnectorAdapter", "KvTierConnector"])
def test_put_exists_get_list_close_through_lmcaches_plugin_loader(kvtierd, class_name):
    e = Engine({"endpoint": kvtierd.endpoint}, class_name=class_name)
    try:
        e.connector  # noqa: B018 (asserts the loader built it)
        ks = [key(h) for h in HASHES] + [key(77, tags={"tenant": "a"})]
        # The last chunk of a prompt is shorter: 5 tokens of 16.
        src = [e.chunk(i) for i in range(len(HASHES))] + [e.chunk(99, tokens=5)]
        want = [o.tensor.clone() for o in src]
        assert [e.remote.contains(k) for k in ks] == [False] * len(ks)
        assert e.remote.batched_contains(ks) == 0
        e.put(ks, src)
        assert [e.remote.contains(k) for k in ks] == [True] * len(ks)
        missing = key(12345)
        assert e.remote.batched_contains(ks + [missing]) == len(ks)
        assert e.run(e.remote.batched_async_contains("l", [ks[0], missing, ks[1]])) == 1
        # Byte for byte, the short chunk at its own length.
        for k, w in zip(ks, want):
            got = e.remote.get_blocking(k)
            assert got.tensor.shape == w.shape
            assert torch.equal(got.tensor, w), k.to_string()
            got.ref_count_down()
        got = e.remote.batched_get_blocking(ks[:2] + [missing] + ks[-1:])
        assert got[2] is None
        assert torch.equal(got[0].tensor, want[0]) and torch.equal(got[3].tensor, want[-1])
        for g in got:
            if g is not None:
                g.ref_count_down()
        assert e.remote.get_blocking(missing) is None
        prefix = e.run(e.connector.batched_get_non_blocking("l", [ks[0], missing, ks[1]]))
        assert len(prefix) == 1 and torch.equal(prefix[0].tensor, want[0])
        prefix[0].ref_count_down()
        # A synchronous call made on LMCache's own loop does not deadlock.
        async def on_loop():
            return e.connector.exists_sync(ks[0])
        assert e.run(on_loop())
        assert sorted(e.list()) == sorted(k.to_string() for k in ks)
        assert e.remote.remove(ks[0])
        assert not e.remote.contains(ks[0])
        assert ks[0].to_string() not in e.list()
        assert e.run(e.connector.ping()) == 0
        release(src)
        # close is idempotent; afterwards everything is a miss, not a crash.
        conn = e.connector
        e.run(conn.close())
        e.run(conn.close())
        assert not e.remote.contains(ks[1])
        assert e.remote.get_blocking(ks[1]) is None
        assert e.run(conn.ping()) != 0
        e.close()
    finally:
        e.close()


def test_list_reads_the_keys_back_after_lmcache_and_kvtierd_restart(tmp_path):
    env = {"KVTIER_LISTEN": f"127.0.0.1:{free_port()}"}
    d = Daemon(tmp_path / "data", env=env)
    try:
        mine = [key(h, worker_id=w, tags=t) for h in (-1, 2, 1 << 63)
                for w, t in ((0, None), (1, None), (0, {"tenant": "a b@c", "lora": 7}))]
        others = [key(3, model="org/other"), key(4, model=MODEL + "|x")]
        a = Engine({"endpoint": d.endpoint})
        src = [a.chunk(i) for i in range(len(mine + others))]
        a.put(mine + others, src)
        want = sorted(k.to_string() for k in mine)
        assert sorted(a.list()) == want, "other models are not this connector's"
        a.close()
        d.stop()
        d = Daemon(tmp_path / "data", env=env)
        b = Engine({"endpoint": d.endpoint})
        try:
            assert sorted(b.list()) == want
            for k, s in zip(mine, src):
                got = b.remote.get_blocking(k)
                assert torch.equal(got.tensor, s.tensor)
                got.ref_count_down()
            # At most list_max_keys, the rest left out (and a warning).
            c = Engine({"endpoint": d.endpoint, "list_max_keys": 4})
            assert len(c.list()) == 4 and set(c.list()) <= set(want)
            c.close()
            release(src)
        finally:
            b.close()
    finally:
        d.stop()


def test_embedded_store_round_trips_and_lists_after_a_restart(tmp_path):
    opts = {"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 64 << 20}
    a = Engine(opts)
    ks = [key(h) for h in HASHES]
    src = [a.chunk(i, tokens=CHUNK if i else 3) for i in range(len(ks))]
    a.put(ks, src)
    a.close()
    b = Engine(opts)
    try:
        assert sorted(b.list()) == sorted(k.to_string() for k in ks)
        for k, s in zip(ks, src):
            got = b.remote.get_blocking(k)
            assert torch.equal(got.tensor, s.tensor)
            got.ref_count_down()
        release(src)
    finally:
        b.close()


def test_another_model_dtype_world_size_worker_or_tag_never_matches(tmp_path):
    e = Engine({"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 64 << 20})
    try:
        k = key(42, tags={"tenant": "a"})
        src = e.chunk(1)
        e.put([k], [src])
        for other in (key(42, model="org/other", tags={"tenant": "a"}), key(42, dtype=torch.float16, tags={"tenant": "a"}),
                      key(42, world_size=2, tags={"tenant": "a"}), key(42, worker_id=1, tags={"tenant": "a"}),
                      key(42, tags={"tenant": "b"}), key(42), key(42, tags={"tenant": "a", "x": "y"}),
                      key(43, tags={"tenant": "a"})):
            assert not e.remote.contains(other), other.to_string()
            assert e.remote.get_blocking(other) is None, other.to_string()
        assert e.remote.contains(k)
        release([src])
    finally:
        e.close()


def test_bad_input_fails_precisely_and_changes_nothing(tmp_path, caplog):
    e = Engine({"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 64 << 20})
    try:
        conn = e.connector
        good = e.chunk(1)
        for bad, why in [
            (key(1 << 64), r"chunk hash .* \[-2\^63, 2\^64\)"),
            (key(-(1 << 63) - 1), r"chunk hash"),
            (key(1, model="a@b"), "without '@'"),
            (LayerCacheEngineKey(MODEL, 1, 0, 1, torch.bfloat16, layer_id=0), "per-layer keys"),
        ]:
            with pytest.raises(ValueError, match=why):
                e.run(conn.put(bad, good))
            assert not e.remote.contains(bad)
            assert e.remote.get_blocking(bad) is None
        # Objects in another layout: refused, and the batch stores nothing.
        ks = [key(5), key(6)]
        wrong = e.cpu.allocate([torch.Size([2, 2, CHUNK, 8])], [torch.bfloat16])
        with pytest.raises(ValueError, match="shapes"):
            e.run(conn.batched_put(ks, [good, wrong]))
        other_dtype = e.cpu.allocate(e.metadata.get_shapes(), [torch.float16])
        with pytest.raises(ValueError, match="dtypes"):
            e.run(conn.put(ks[0], other_dtype))
        assert e.remote.batched_contains(ks) == 0
        assert e.list() == []
        assert [o.get_ref_count() for o in (good, wrong, other_dtype)] == [1, 1, 1]
        release([good, wrong, other_dtype])
    finally:
        e.close()
    # Options the plugin does not know, or of the wrong type: LMCache logs
    # the error and runs without the backend; built directly, it says which.
    from kvtier.lmcache import KvTierConnector
    for opts, why in [({"endpiont": "x"}, "endpiont"), ({"io_threads": "4"}, "io_threads"),
                      ({}, "exactly one of endpoint")]:
        bad = Engine(opts)
        assert bad.remote.connection is None
        with pytest.raises((ValueError, kvtier.InvalidArgumentError), match=why):
            KvTierConnector(bad.loop, bad.cpu, bad.cpu.config, bad.metadata, "kvtier")
        bad.close()
    layerwise = Engine({"disk_dir": str(tmp_path / "x")}, use_layerwise=True)
    assert layerwise.remote.connection is None
    layerwise.close()


def test_kvtierd_down_or_frozen_is_a_miss_and_back_it_works(tmp_path):
    env = {"KVTIER_LISTEN": f"127.0.0.1:{free_port()}"}
    d = Daemon(tmp_path / "data", env=env)
    e = Engine({"endpoint": d.endpoint, "timeout_s": 2.0}, timeout_s=1)
    try:
        ks = [key(h) for h in (1, 2, 3)]
        src = [e.chunk(i) for i in range(3)]
        e.put(ks, src)
        # Unreachable (frozen): LMCache's get times out and cancels; a miss.
        d.freeze()
        assert e.remote.get_blocking(ks[0]) is None
        d.thaw()
        eventually("the cancelled get's batch ends", lambda: not e.connector._pending)
        d.stop()
        # Down: misses and a failed put, nothing raises.
        assert not e.remote.contains(ks[0])
        assert e.remote.get_blocking(ks[0]) is None
        assert e.remote.batched_get_blocking(ks) == [None] * 3
        late = e.chunk(9)
        with pytest.raises(kvtier.KvTierError):
            e.remote.submit_put_task(key(9), late).result(30)
        late.ref_count_down()
        assert e.run(e.connector.ping()) != 0
        d = Daemon(tmp_path / "data", env=env)
        # Back at the same address: the same connector reaches it again.
        assert e.remote.batched_contains(ks) == 3
        got = e.remote.get_blocking(ks[1])
        assert torch.equal(got.tensor, src[1].tensor)
        got.ref_count_down()
        assert e.run(e.connector.ping()) == 0
        release(src)
    finally:
        e.close()
        d.stop()


def test_a_corrupt_block_on_kvtiers_ssd_is_a_miss_never_wrong_bytes(tmp_path):
    opts = {"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 64 << 20}
    a = Engine(opts)
    ks = [key(1), key(2)]
    src = [a.chunk(1), a.chunk(2)]
    a.put(ks, src)
    a.close()
    needle = src[0].tensor.flatten()[:32].view(torch.uint8).numpy().tobytes()
    hits = 0
    for seg in glob.glob(str(tmp_path / "ssd" / "*.seg")):
        data = bytearray(open(seg, "rb").read())
        at = data.find(needle)
        if at >= 0:
            data[at + 100] ^= 0xFF
            open(seg, "wb").write(bytes(data))
            hits += 1
    assert hits == 1, "the chunk's bytes were found once on the SSD"
    b = Engine(opts)
    try:
        assert b.remote.get_blocking(ks[0]) is None
        got = b.remote.get_blocking(ks[1])
        assert torch.equal(got.tensor, src[1].tensor)
        got.ref_count_down()
        release(src)
    finally:
        b.close()


def test_importing_kvtier_lmcache_does_not_import_lmcache():
    code = (
        "import sys, kvtier.lmcache\n"
        "assert 'lmcache' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "assert kvtier.lmcache.KvTierL2\n"
        "assert kvtier.lmcache.KvTierConnectorAdapter.__module__ == 'kvtier._lmcache_remote'\n"
        "assert 'lmcache' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
