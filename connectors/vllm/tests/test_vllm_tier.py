"""KvTierSecondaryTier (kvtier.vllm_tier) under vLLM's real tiered offloading,
on CPU.

vLLM's own ``OffloadingSpecFactory`` builds the real ``TieringOffloadingSpec``
from an ``OffloadingConfig`` whose ``secondary_tiers`` name this tier by
module path; its real ``TieringOffloadingManager`` (the scheduler side of
vLLM's ``OffloadingConnector``) owns the real CPU tier (a shared-memory
region in /dev/shm) and drives the tier: cascades on ``complete_store``,
async lookups, promotions, ``reset_cache`` and ``shutdown``. The tests call
the manager as the connector's scheduler does, under its lock. The one part
played here is the GPU worker's copy between GPU blocks and the CPU tier (no
GPU): the test writes and reads its slot of each chunk through the worker's
own mapping of the region (``SharedOffloadRegion`` with rank 0), where
vLLM's GPU worker copies.
"""

import contextlib
import glob
import socket
import threading
import time
import uuid

import numpy as np
import pytest

pytest.importorskip(
    "vllm.v1.kv_offload.tiering.base",
    reason="this vLLM has no secondary-tier API (TieringOffloadingSpec / SecondaryTierManager)",
)

import kvtier  # noqa: E402
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.config import (  # noqa: E402
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion  # noqa: E402
from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402

if not hasattr(SecondaryTierFactory, "get_tier_class"):
    pytest.skip("this vLLM cannot load a secondary tier by module_path", allow_module_level=True)

import kvtier.vllm_tier as vt  # noqa: E402

TIER = {"type": "KvTierSecondaryTier", "module_path": "kvtier.vllm_tier"}
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
# One GPU block of one worker: 2 layers x K,V x 2 heads x 16 tokens x 40
# dims x 2 bytes = 10240 bytes; vLLM pads the CPU tier's chunk rows to pages
# (12288 bytes), so a chunk is the worker's slot and padding.
WORKER_BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 40 * 2
NUM_CHUNKS = 32
STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def offloading_config(tier: dict, engine_id: str, model: str = "kvtier-test/tiny") -> OffloadingConfig:
    row = -(-WORKER_BYTES_PER_BLOCK // 4096) * 4096
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=LAYERS, group_id=0),),
        worker_kv_bytes_per_block=WORKER_BYTES_PER_BLOCK,
        enable_kv_cache_events=False,
        extra_config={
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": NUM_CHUNKS * row,
            "secondary_tiers": [dict(TIER, **tier)],
        },
        engine_id=engine_id,
        model=OffloadingModelConfig(name=model, dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=1,
            tp_size=1,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )


class Engine:
    """One engine's offloading on CPU: vLLM's spec, manager and CPU tier,
    and the worker's mapping of that tier."""

    def __init__(self, tier: dict, model: str = "kvtier-test/tiny"):
        self.engine_id = f"kvtier-test-{uuid.uuid4().hex[:12]}"
        self.spec = OffloadingSpecFactory.create_spec(offloading_config(tier, self.engine_id, model))
        self.manager = self.spec.get_manager()
        (self.tier,) = self.manager.secondary_tiers
        assert isinstance(self.tier, vt.KvTierSecondaryTier)
        self.finished = []  # every JobResult the manager took from the tier
        real = self.tier.get_finished_jobs

        def recording():
            results = list(real())
            self.finished += results
            return results

        self.tier.get_finished_jobs = recording
        self.region = SharedOffloadRegion(
            engine_id=self.engine_id,
            num_chunks=self.spec.num_chunks,
            rank=0,
            kv_bytes_per_chunk=self.spec.kv_bytes_per_chunk,
            cpu_page_size=self.spec.cpu_page_size_per_worker,
        )
        # Where the GPU worker copies: its slot of each chunk, (chunks, slot bytes).
        self.slots = self.region.create_next_worker_view(self.spec.cpu_page_size_per_worker).numpy().view(np.uint8)
        self.closed = False

    def locked(self):
        """The manager's lock, held as the connector's scheduler holds it
        (vLLM 0.31's manager has none: one thread drives it)."""
        return getattr(self.manager, "lock", contextlib.nullcontext())

    def store(self, req_id: str, keys: list, payload: np.ndarray) -> None:
        """A request's chunks go GPU -> CPU tier (the worker's copy, played
        here) and vLLM cascades them to the secondary tier."""
        ctx = ReqContext(req_id=req_id)
        with self.locked():
            self.manager.on_new_request(ctx)
            out = self.manager.prepare_store(keys, ctx)
        assert out is not None and list(out.keys_to_store) == keys
        self.last_chunk_ids = list(out.store_spec.chunk_ids)
        for i, chunk in enumerate(out.store_spec.chunk_ids):
            self.slots[chunk] = payload[i]
        with self.locked():
            self.manager.complete_store(keys, ctx)
            self.manager.on_request_finished(ctx)

    def settle(self, deadline_s: float = 20.0) -> None:
        """Steps until no transfer of the tier is outstanding."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            with self.locked():
                self.manager.on_schedule_end(STEP)
                if not self.manager.has_pending_work():
                    return
            time.sleep(0.002)
        raise AssertionError(f"transfers still pending after {deadline_s} s")

    def lookup(self, ctx: ReqContext, keys: list, seen: list, deadline_s: float = 20.0, before_step=None) -> int:
        """The connector scheduler's prefix lookup, stepped until it settles
        (no RETRY, no HIT_PENDING); returns the leading HITs. Every answer
        is appended to `seen`. `before_step(answers)` runs before each step."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            answers = []
            with self.locked():
                for key in keys:
                    answers.append(self.manager.lookup(key, ctx))
                    if answers[-1] is LookupResult.MISS:
                        break
            seen.append(answers)
            pending = any(a in (LookupResult.RETRY, LookupResult.HIT_PENDING) for a in answers)
            if not pending:
                hits = 0
                while hits < len(answers) and answers[hits] is LookupResult.HIT:
                    hits += 1
                return hits
            if before_step is not None:
                before_step(answers)
            with self.locked():
                self.manager.on_schedule_end(STEP)
            time.sleep(0.002)
        raise AssertionError(f"lookups still pending after {deadline_s} s: {seen[-1]}")

    def load(self, req_id: str, keys: list, before_step=None) -> tuple[list[bytes], list]:
        """A request's prefix: looked up (promoted from the secondary tier
        as needed) and read CPU tier -> GPU (the worker's copy, played
        here). Returns the slots' bytes of the leading hits and every
        lookup answer."""
        ctx = ReqContext(req_id=req_id)
        seen = []
        with self.locked():
            self.manager.on_new_request(ctx)
        hits = self.lookup(ctx, keys, seen, before_step=before_step)
        got = []
        if hits:
            with self.locked():
                spec = self.manager.prepare_load(keys[:hits], ctx)
            self.last_chunk_ids = list(spec.chunk_ids)
            got = [self.slots[c].tobytes() for c in spec.chunk_ids]
            with self.locked():
                self.manager.complete_load(keys[:hits], ctx)
        with self.locked():
            self.manager.on_request_finished(ctx)
        self.settle()
        return got, seen

    def scatter_free_chunks(self) -> None:
        """Leaves the CPU tier's free chunks every other one, so the next
        chunks it hands out are not consecutive: vLLM fills it and fails
        the lot, odd ones first."""
        fill, _ = chunks(NUM_CHUNKS, seed=99)
        ctx = ReqContext(req_id="fill")
        with self.locked():
            self.manager.on_new_request(ctx)
            out = self.manager.prepare_store(fill, ctx)
            assert out is not None and len(out.keys_to_store) == NUM_CHUNKS
            self.manager.complete_store(fill[1::2] + fill[0::2], ctx, success=False)
            self.manager.on_request_finished(ctx)

    def clear_cpu_tier(self) -> None:
        """vLLM's reset_cache (sleep, weight update): the tier drains, the
        CPU tier forgets every chunk; its memory is zeroed here so nothing
        stale can pass for a load."""
        with self.locked():
            self.manager.reset_cache()
        if hasattr(self.manager, "on_reset_flushed"):  # vLLM >= 0.33
            self.manager.on_reset_flushed()
        self.slots[:] = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        del self.slots
        self.region.cleanup()
        self.manager.shutdown()  # without the lock, as vLLM calls it
        assert not glob.glob(f"/dev/shm/vllm_offload_{self.engine_id}*"), "the CPU tier's region was left behind"


@pytest.fixture
def engines(caplog):
    """Makes engines; closes them at the end, and checks that nothing (the
    tier's threads, its view of the CPU tier) kept vLLM from unmapping its
    CPU tier."""
    made = []

    def make(tier, **kw):
        e = Engine(tier, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()
    kept = [r.getMessage() for r in caplog.records if "still exported" in r.getMessage()]
    assert not kept, kept


def chunks(n: int, seed: int) -> tuple[list, np.ndarray]:
    """`n` offload keys (vLLM's: a 32-byte block hash and the group) and a
    distinct random payload for the worker's slot of each chunk."""
    rng = np.random.default_rng(seed)
    keys = [make_offload_key(rng.bytes(32), 0) for _ in range(n)]
    payload = rng.integers(0, 256, size=(n, 10240), dtype=np.uint8)
    return keys, payload


def assert_same(got: list[bytes], payload: np.ndarray) -> None:
    assert len(got) == len(payload)
    for i, (g, want) in enumerate(zip(got, payload)):
        assert g == want.tobytes(), f"chunk {i} differs from what was stored"


def ssd(tmp_path) -> dict:
    # kvtier's SSD tier holds at least two segments (256 MiB by default);
    # segment files grow as they fill.
    return {"disk_dir": str(tmp_path / "ssd"), "disk_capacity_bytes": 1 << 30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chunks_round_trip_through_the_embedded_ssd_byte_for_byte(tmp_path, engines):
    keys, payload = chunks(6, seed=1)
    a = engines(ssd(tmp_path))
    assert a.spec.kv_bytes_per_chunk == 12288 and a.tier.block_size_bytes == 12288
    a.store("r1", keys, payload)
    a.settle()
    stores = [r for r in a.finished if r.success]
    assert stores and sum(r.transfer_bytes for r in stores) == 6 * 12288, a.finished

    # The same engine after vLLM clears its CPU tier: the chunks come back
    # from kvtier (the first answer is the async probe's RETRY).
    a.clear_cpu_tier()
    got, seen = a.load("r2", keys)
    assert seen[0][0] is LookupResult.RETRY, seen
    assert any(LookupResult.HIT_PENDING in answers for answers in seen), "nothing was promoted from kvtier"
    assert_same(got, payload)
    a.close()

    # A fresh engine (empty CPU tier) on the same SSD.
    b = engines(ssd(tmp_path))
    got, _ = b.load("r3", keys)
    assert_same(got, payload)
    loads = [r for r in b.finished if r.success and r.transfer_bytes]
    assert sum(r.transfer_bytes for r in loads) == 6 * 12288, b.finished


def test_reset_cache_waits_for_the_transfers_in_flight(tmp_path, engines):
    """vLLM resets its CPU tier right after a cascade was submitted: the
    tier's drain_jobs lets the store finish first (vLLM then finds no job
    outstanding), and the chunks are in kvtier."""
    keys, payload = chunks(8, seed=12)
    a = engines(dict(ssd(tmp_path), io_threads=1))
    a.store("r1", keys, payload)
    a.clear_cpu_tier()  # reset_cache: drain_jobs, then every result collected
    assert [r.success for r in a.finished] == [True], a.finished
    got, _ = a.load("r2", keys)
    assert_same(got, payload)


def test_scattered_cpu_chunks_round_trip_byte_for_byte(tmp_path, engines):
    """Chunks that are not consecutive in the CPU tier are gathered for a
    store and scattered by a load."""
    keys, payload = chunks(3, seed=11)
    a = engines(ssd(tmp_path))
    a.scatter_free_chunks()
    a.store("r1", keys, payload)
    assert np.any(np.diff(a.last_chunk_ids) != 1), a.last_chunk_ids
    a.settle()
    assert all(r.success for r in a.finished), a.finished
    a.close()
    b = engines(ssd(tmp_path))
    b.scatter_free_chunks()
    got, _ = b.load("r2", keys)
    assert np.any(np.diff(b.last_chunk_ids) != 1), b.last_chunk_ids
    assert_same(got, payload)


def test_another_model_never_matches(tmp_path, engines):
    keys, payload = chunks(2, seed=2)
    a = engines(ssd(tmp_path))
    a.store("r1", keys, payload)
    a.settle()
    a.close()
    b = engines(ssd(tmp_path), model="kvtier-test/other")
    got, seen = b.load("r2", keys)
    assert got == [] and seen[-1] == [LookupResult.MISS], seen


def test_lookups_answer_each_key_on_its_own(kvtierd, engines):
    """vLLM asks a sliding-window group's keys last first, and a key after
    a miss may be present: each key gets its own answer."""
    keys, payload = chunks(5, seed=10)
    a = engines({"mode": "daemon", "endpoint": kvtierd.endpoint})
    stored = [0, 1, 3]
    a.store("r1", [keys[i] for i in stored], payload[stored])
    a.settle()
    assert [bool(r.success) for r in a.finished] == [True], a.finished
    assert a.tier._present(keys[::-1]) == [False, True, False, True, True]
    assert a.tier._present(keys) == [True, True, False, True, False]


def test_chunks_round_trip_through_kvtierd_byte_for_byte(kvtierd, engines):
    keys, payload = chunks(5, seed=3)
    tier = {"mode": "daemon", "endpoint": kvtierd.endpoint}
    a = engines(tier)
    a.store("r1", keys, payload)
    a.settle()
    assert all(r.success for r in a.finished), a.finished
    assert kvtier.Client(kvtierd.endpoint).stats()["stored_blocks"] == 5
    a.close()
    b = engines(tier)
    got, _ = b.load("r2", keys)
    assert_same(got, payload)


def test_a_daemon_that_is_down_fails_stores_and_answers_misses(engines):
    """Nothing listens at the endpoint: the engine starts, stores are
    reported failed (vLLM unpins their chunks), lookups are misses."""
    keys, payload = chunks(4, seed=4)
    a = engines({"mode": "daemon", "endpoint": f"http://127.0.0.1:{free_port()}"})
    a.store("r1", keys, payload)
    a.settle()
    assert a.finished and not any(r.success for r in a.finished), a.finished
    # The chunks are still in vLLM's CPU tier, unpinned: served from there.
    got, _ = a.load("r2", keys)
    assert_same(got, payload)
    a.clear_cpu_tier()
    got, seen = a.load("r3", keys)
    assert got == [] and seen[-1] == [LookupResult.MISS], seen


def test_a_daemon_that_dies_before_a_load_fails_the_load_cleanly(tmp_path, engines):
    from conftest import Daemon

    daemon = Daemon(tmp_path / "data")
    try:
        keys, payload = chunks(3, seed=5)
        tier = {"mode": "daemon", "endpoint": daemon.endpoint}
        a = engines(tier)
        a.store("r1", keys, payload)
        a.settle()
        assert all(r.success for r in a.finished), a.finished
        a.close()

        b = engines(tier)

        def stop_once_promoted(answers):
            # vLLM submits a promotion at the step's end: the daemon is gone by then.
            if LookupResult.HIT_PENDING in answers:
                daemon.stop()

        got, seen = b.load("r2", keys, before_step=stop_once_promoted)
        assert daemon.proc.poll() is not None, "the lookup never promoted"
        assert got == [] and seen[-1][0] is LookupResult.MISS, seen
        loads = [r for r in b.finished if r.transfer_bytes is None]
        assert loads and not any(r.success for r in loads), b.finished
        assert not any(LookupResult.HIT in answers for answers in seen), "a chunk that never arrived was a hit"
        # vLLM got its CPU chunks back: all of them can be stored to again.
        more, more_payload = chunks(NUM_CHUNKS, seed=6)
        ctx = ReqContext(req_id="r3")
        with b.locked():
            b.manager.on_new_request(ctx)
            out = b.manager.prepare_store(more, ctx)
            assert out is not None and len(out.keys_to_store) == NUM_CHUNKS
            b.manager.complete_store(more, ctx, success=False)
            b.manager.on_request_finished(ctx)
    finally:
        daemon.stop()


def test_a_corrupt_chunk_is_reported_failed_and_never_served(tmp_path, engines):
    store = {"mode": "ssd-only", "disk": {"dir": str(tmp_path / "ssd"), "capacity_bytes": 64 << 20, "segment_bytes": 8 << 20}}
    keys, payload = chunks(4, seed=7)
    a = engines({"store": store})
    a.store("r1", keys, payload)
    a.settle()
    assert all(r.success for r in a.finished), a.finished
    a.close()
    # Flip a byte of chunk 2 on the SSD, behind kvtier's back.
    from kvtier.vllm import open_store

    open_store({"mode": "embedded", "store": store}).flush()
    (seg,) = glob.glob(str(tmp_path / "ssd" / "*.seg"))
    data = open(seg, "rb").read()
    at = data.find(payload[2, 5000:5064].tobytes())
    assert at > 0 and data.find(payload[2, 5000:5064].tobytes(), at + 1) < 0
    with open(seg, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0xFF]))

    b = engines({"store": store})
    got, seen = b.load("r2", keys)
    # Chunks 0 and 1 arrive; 2 is reported failed (and 3 with it): misses.
    assert_same(got, payload[:2])
    (load,) = [r for r in b.finished if not r.success]
    assert list(load.successful_keys) == keys[:2], load
    assert seen[-1][:3] == [LookupResult.HIT, LookupResult.HIT, LookupResult.MISS], seen
    assert not any(len(answers) > 2 and answers[2] is LookupResult.HIT for answers in seen), "the corrupt chunk was a hit"


def test_a_throttled_daemon_fails_that_store_and_keeps_serving(tmp_path, engines):
    """A real kvtierd whose write-through queue holds 2 blocks refuses a
    store of 3 as throttled: that job fails; the next store and a load from
    the same client work."""
    from kvtier_testkit import throttled_daemon

    daemon = throttled_daemon(tmp_path, 2)
    try:
        tier = {"mode": "daemon", "endpoint": daemon.endpoint}
        a = engines(tier)
        keys, payload = chunks(3, seed=8)
        a.store("r1", keys, payload)
        a.settle()
        assert len(a.finished) == 1 and not a.finished[0].success, a.finished
        one, one_payload = chunks(1, seed=9)
        a.store("r2", one, one_payload)
        a.settle()
        assert a.finished[-1].success, a.finished
        a.clear_cpu_tier()
        got, _ = a.load("r3", one)
        assert_same(got, one_payload)
        got, seen = a.load("r4", keys)
        assert got == [] and seen[-1] == [LookupResult.MISS], seen
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    "tier, error",
    [
        ({"disk_dir": "/tmp/x", "disk_size": 1}, "unknown key 'disk_size'"),
        ({"mode": "cluster"}, "mode 'cluster' must be 'embedded' or 'daemon'"),
        ({}, "mode 'embedded' needs disk_dir"),
        ({"mode": "daemon", "disk_dir": "/tmp/x"}, "disk_dir is a setting of mode 'embedded'"),
        ({"disk_dir": "/tmp/x", "endpoint": "http://127.0.0.1:1"}, "endpoint is a setting of mode 'daemon'"),
        ({"disk_dir": "/tmp/x", "store": {}}, "either store or disk_dir"),
        ({"disk_dir": "/tmp/x", "io_threads": 0}, "io_threads must be an integer >= 1, not 0"),
        ({"disk_dir": "/tmp/x", "max_batch_bytes": "64MiB"}, "max_batch_bytes must be an integer"),
        ({"disk_dir": "/tmp/x", "locality": "NEARBY"}, "locality 'NEARBY' must be 'LOCAL' or 'REMOTE'"),
        ({"store": "ssd"}, "store must be a table"),
    ],
)
def test_a_bad_tier_config_stops_startup_naming_the_key(tier, error):
    engine_id = f"kvtier-test-{uuid.uuid4().hex[:12]}"
    spec = OffloadingSpecFactory.create_spec(offloading_config(tier, engine_id))
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        spec.get_manager()
    assert not glob.glob(f"/dev/shm/vllm_offload_{engine_id}*"), "a failed start left the CPU tier's region"


@pytest.mark.parametrize(
    "disk, error",
    [
        ({"capacity_bytes": 64 << 20, "segment_mb": 8}, "segment_mb"),
        ({"capacity_bytes": 64 << 20}, "at least two segments"),
    ],
)
def test_a_bad_store_config_is_kvtiers_precise_error(tmp_path, disk, error):
    engine_id = f"kvtier-test-{uuid.uuid4().hex[:12]}"
    store = {"mode": "ssd-only", "disk": dict(disk, dir=str(tmp_path))}
    spec = OffloadingSpecFactory.create_spec(offloading_config({"store": store}, engine_id))
    with pytest.raises(kvtier.InvalidArgumentError, match=error):
        spec.get_manager()
    assert not glob.glob(f"/dev/shm/vllm_offload_{engine_id}*"), "a failed start left the CPU tier's region"


def test_the_store_queue_is_bounded_and_loads_go_first():
    """The tier's job threads (no vLLM here): with the one thread busy, one
    store waits and the next is refused at once; a waiting load runs before
    the waiting store."""
    jobs = vt._Jobs(threads=1, max_queued_stores=1)
    release = threading.Event()
    order = []

    def blocked():
        release.wait(10)
        return 1

    def record(name):
        def run():
            order.append(name)
            return 1

        return run

    try:
        assert jobs.submit(1, False, blocked)
        end = time.monotonic() + 10
        while not jobs._running and time.monotonic() < end:  # the thread took job 1
            time.sleep(0.001)
        assert jobs.submit(2, False, record("store"))
        assert not jobs.submit(3, False, record("refused")), "a store beyond max_queued_stores was queued"
        assert jobs.submit(4, True, record("load"))
        release.set()
        jobs.wait_idle()
        assert order == ["load", "store"]
        assert sorted(o.job_id for o in jobs.take_outcomes()) == [1, 2, 4]
    finally:
        release.set()
        jobs.close()
    assert not jobs.submit(5, True, record("late")), "a closed tier queued a job"


def test_the_namespace_fingerprints_model_layout_and_size(tmp_path):
    engine_id = f"kvtier-test-{uuid.uuid4().hex[:12]}"
    spec = OffloadingSpecFactory.create_spec(offloading_config(ssd(tmp_path), engine_id))
    ns = vt.chunk_namespace(spec, 12288, None)
    assert ns["model_id"] == "kvtier-test/tiny"
    assert ns["layout"]["head_dim"] * ns["layout"]["block_tokens"] == 12288
    assert vt.chunk_namespace(spec, 16384, None) != ns
    assert vt.chunk_namespace(spec, 12288, "tenant-a")["salt"] == "tenant-a"
    other = OffloadingSpecFactory.create_spec(offloading_config(ssd(tmp_path), engine_id, model="kvtier-test/other"))
    assert vt.chunk_namespace(other, 12288, None)["revision"] != ns["revision"]
    # The namespace registers: a chunk is a block kvtier can hold.
    disk = {"dir": str(tmp_path / "ns"), "capacity_bytes": 64 << 20, "segment_bytes": 8 << 20}
    store = kvtier.Store({"mode": "ssd-only", "disk": disk})
    assert store.block_bytes(store.register_namespace(ns)) == 12288
